//! A node that holds no peer connection says so: at the default log level
//! a wrong seed list, a firewall or a wrong peer id was silent, and the
//! node sat with no peers for as long as it ran.

use std::time::Duration;

use tokio::time::Instant;

/// How long a node with seeds may hold no connection before it warns, and
/// how often it warns again while that lasts.
pub const ALONE_WARNING_AFTER: Duration = Duration::from_secs(60);

/// How often the node counts its connections.
const LOOK_EVERY: Duration = Duration::from_secs(5);

/// What to say after a look at the connections.
#[derive(Debug, PartialEq, Eq)]
pub enum Say {
    /// No connection for this long.
    Alone(Duration),
    /// Connected again (to this many peers) after a warning.
    Back(usize),
}

/// The sans-I/O core: told the connection count at each look, it says
/// when to warn.
#[derive(Debug)]
pub struct Alone {
    /// Since when no peer has been connected (`None`: one is).
    since: Option<Instant>,
    /// When it last warned, while alone.
    warned: Option<Instant>,
}

impl Alone {
    /// A node that started alone at `now`.
    pub fn new(now: Instant) -> Self {
        Alone {
            since: Some(now),
            warned: None,
        }
    }

    /// `connected` peers at `now`: what to say, if anything.
    pub fn look(&mut self, now: Instant, connected: usize) -> Option<Say> {
        if connected > 0 {
            self.since = None;
            return self.warned.take().map(|_| Say::Back(connected));
        }
        let since = *self.since.get_or_insert(now);
        let last = self.warned.unwrap_or(since);
        if now.duration_since(last) < ALONE_WARNING_AFTER {
            return None;
        }
        self.warned = Some(now);
        Some(Say::Alone(now.duration_since(since)))
    }
}

/// Counts the node's connections every few seconds until it stops,
/// warning while it has none.
pub async fn watch(handle: soma_actors::P2pHandle) {
    let mut alone = Alone::new(Instant::now());
    let mut looks = tokio::time::interval(LOOK_EVERY);
    loop {
        looks.tick().await;
        let peers = match handle.connected_peers().await {
            Ok(peers) => peers,
            Err(soma_actors::system::P2pError::Stopped) => return,
            // A slow answer (an overloaded node) is no count: look again.
            Err(_) => continue,
        };
        match alone.look(Instant::now(), peers.len()) {
            Some(Say::Alone(time)) => tracing::warn!(
                seconds = time.as_secs(),
                "no peer connected: check seed-peers (each address reachable, its peer-id \
                 right), the seeds' access and firewalls; RUST_LOG=soma_actors=debug logs \
                 each dial failure with its reason"
            ),
            Some(Say::Back(peers)) => tracing::info!(peers, "peers connected again"),
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Alone from the start: a warning once a minute has passed, then once
    /// a minute; a connection ends it (said once), and being alone again
    /// waits a minute afresh.
    #[test]
    fn a_node_alone_warns_each_minute_and_says_once_when_peers_are_back() {
        let start = Instant::now();
        let at = |s: u64| start + Duration::from_secs(s);
        let mut alone = Alone::new(start);
        assert_eq!(alone.look(at(5), 0), None);
        assert_eq!(alone.look(at(59), 0), None);
        assert_eq!(
            alone.look(at(60), 0),
            Some(Say::Alone(Duration::from_secs(60)))
        );
        assert_eq!(alone.look(at(65), 0), None);
        assert_eq!(alone.look(at(119), 0), None);
        assert_eq!(
            alone.look(at(120), 0),
            Some(Say::Alone(Duration::from_secs(120)))
        );
        assert_eq!(alone.look(at(125), 3), Some(Say::Back(3)));
        assert_eq!(alone.look(at(130), 3), None);
        assert_eq!(alone.look(at(135), 0), None);
        assert_eq!(alone.look(at(194), 0), None);
        assert_eq!(
            alone.look(at(195), 0),
            Some(Say::Alone(Duration::from_secs(60)))
        );
    }

    /// A node that connects before the first minute never warns, and
    /// says nothing when its peers come.
    #[test]
    fn a_node_that_connects_in_time_says_nothing() {
        let start = Instant::now();
        let mut alone = Alone::new(start);
        assert_eq!(alone.look(start + Duration::from_secs(30), 2), None);
        assert_eq!(alone.look(start + Duration::from_secs(90), 2), None);
    }
}
