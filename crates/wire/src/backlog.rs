//! Answer bytes handed to HTTP/2 and not yet written, per inbound
//! connection.
//!
//! hyper takes an answer's frames into its stream's send buffer (up to
//! about 400 KiB a stream) whenever the client's flow-control window has
//! room, and the client sets the window. A client that declared large
//! windows and never read its socket so had each answer handed over in
//! full: counted as answered (its fetch slot kept for its next fetch,
//! nothing charged), the bytes piling up in hyper's buffers, tens of MiB
//! a connection. tonic does not expose hyper's buffer size, and hyper's
//! bound is per stream anyway.
//!
//! So the bytes are counted at both ends of HTTP/2: a response body counts
//! each frame before it hands it over ([`SendBacklog::try_hand`]), and the
//! connection's plaintext stream counts the DATA payload bytes HTTP/2
//! writes into TLS ([`crate::activity::Watched`]). A body hands a frame
//! only while what was handed and not written stays within the cap (or is
//! nothing, so a frame larger than the cap still goes, alone); otherwise
//! it waits for the connection to write. An answer whose client does not
//! read so stops at the cap, a stalled answer like any other.
//!
//! The count can overstate: HTTP/2 drops the queued frames of a stream
//! reset (by the client, or by the server cutting an answer), and the
//! server cannot tell how many there were. Such bytes are never written
//! and would shut the gate for good. So once the connection has written
//! nothing for [`SETTLE_AFTER`] while its last write went through (HTTP/2
//! is not waiting for the socket, so it has nothing it may write), what is
//! left counted is forgotten. A client that does not read keeps the
//! socket full, and is never forgiven.

use std::sync::{Mutex, MutexGuard, PoisonError};
use std::task::Waker;
use std::time::Duration;

use tokio::time::Instant;

/// How long a connection whose socket takes writes must have written
/// nothing before what it still counts as handed is forgotten (see the
/// module docs): long enough for HTTP/2 to have written anything it could.
pub const SETTLE_AFTER: Duration = Duration::from_millis(250);

/// One connection's count; see the module docs.
#[derive(Debug, Default)]
pub struct SendBacklog {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// DATA payload bytes response bodies handed to HTTP/2.
    handed: u64,
    /// DATA payload bytes HTTP/2 wrote into the connection's stream.
    written: u64,
    /// The connection's last write or flush could not go on: its socket
    /// is full.
    blocked: bool,
    /// Since when the connection has written nothing, its socket taking
    /// writes, while counting bytes handed and not written (`None`: it
    /// counts none).
    quiet_since: Option<Instant>,
    /// Bodies waiting for the connection to write, woken when it does.
    waiters: Vec<Waker>,
}

/// What [`SendBacklog::try_hand`] decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hand {
    /// The bytes are counted: hand them over.
    Taken,
    /// Wait: the waker is woken when the connection writes, or when its
    /// socket, full now, takes bytes again. `Some(at)`: ask again at `at`
    /// too, when what is counted may be forgotten (see the module docs).
    Wait(Option<Instant>),
}

impl SendBacklog {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Bytes handed to HTTP/2 and not yet written.
    pub fn unwritten(&self) -> u64 {
        self.lock().unwritten()
    }

    /// Counts `bytes` about to be handed over at `now` if what is handed
    /// and not written stays within `max` with them, or is nothing; else
    /// registers `waker` and says when to ask again.
    pub fn try_hand(&self, waker: &Waker, bytes: usize, max: usize, now: Instant) -> Hand {
        let mut state = self.lock();
        let unwritten = state.unwritten();
        let fits = unwritten.saturating_add(bytes as u64) <= max as u64;
        if unwritten > 0 && !fits && !state.settle(now) {
            if !state.waiters.iter().any(|w| w.will_wake(waker)) {
                state.waiters.push(waker.clone());
            }
            let settle_at = match (state.blocked, state.quiet_since) {
                (false, Some(since)) => Some(since + SETTLE_AFTER),
                _ => None,
            };
            return Hand::Wait(settle_at);
        }
        if state.unwritten() == 0 {
            state.quiet_since = Some(now);
        }
        state.handed += bytes as u64;
        Hand::Taken
    }

    /// The connection wrote `data` DATA payload bytes (maybe none) at
    /// `now`: its socket took the write. Called by the connection's
    /// stream ([`crate::activity::Watched`]).
    pub fn wrote(&self, data: usize, now: Instant) {
        let mut state = self.lock();
        let unblocked = std::mem::replace(&mut state.blocked, false);
        state.written += data as u64;
        if data > 0 || unblocked {
            // The quiet spell starts again: the connection moves.
            state.quiet_since = (state.unwritten() > 0).then_some(now);
            let waiters = std::mem::take(&mut state.waiters);
            drop(state);
            waiters.into_iter().for_each(Waker::wake);
        }
    }

    /// The connection's write or flush could not go on: its socket is
    /// full. Called by the connection's stream.
    pub fn blocked(&self) {
        self.lock().blocked = true;
    }
}

impl State {
    fn unwritten(&self) -> u64 {
        self.handed.saturating_sub(self.written)
    }

    /// Forgets what is counted if the connection wrote nothing for
    /// [`SETTLE_AFTER`] before `now` while its socket took its writes.
    fn settle(&mut self, now: Instant) -> bool {
        let quiet = self
            .quiet_since
            .is_some_and(|since| now.saturating_duration_since(since) >= SETTLE_AFTER);
        if self.blocked || !quiet {
            return false;
        }
        tracing::debug!(
            bytes = self.unwritten(),
            "answer bytes counted as handed were never written; forgotten"
        );
        self.written = self.handed;
        self.quiet_since = None;
        true
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Wake;

    use super::*;

    /// Counts its wake-ups.
    #[derive(Default)]
    struct Woken(AtomicUsize);

    impl Wake for Woken {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn waker() -> (Arc<Woken>, Waker) {
        let woken = Arc::new(Woken::default());
        (woken.clone(), Waker::from(woken))
    }

    fn woken(w: &Woken) -> usize {
        w.0.load(Ordering::Relaxed)
    }

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn bytes_are_handed_within_the_cap_of_what_is_not_written() {
        let t0 = Instant::now();
        let backlog = SendBacklog::default();
        let (w, waker) = waker();
        // Nothing counted: even a frame past the cap goes, alone.
        assert_eq!(backlog.try_hand(&waker, 150, 100, t0), Hand::Taken);
        assert_eq!(backlog.unwritten(), 150);
        assert_eq!(
            backlog.try_hand(&waker, 1, 100, t0),
            Hand::Wait(Some(t0 + SETTLE_AFTER))
        );
        // Written in part: what fits in the cap goes, not a byte more.
        backlog.wrote(110, t0 + MS);
        assert_eq!(woken(&w), 1);
        assert_eq!(backlog.try_hand(&waker, 60, 100, t0 + MS), Hand::Taken);
        assert_eq!(backlog.unwritten(), 100);
        assert_eq!(
            backlog.try_hand(&waker, 1, 100, t0 + MS),
            Hand::Wait(Some(t0 + MS + SETTLE_AFTER))
        );
        // Registered once however often it asks.
        assert_eq!(
            backlog.try_hand(&waker, 1, 100, t0 + MS),
            Hand::Wait(Some(t0 + MS + SETTLE_AFTER))
        );
        backlog.wrote(100, t0 + 2 * MS);
        assert_eq!(woken(&w), 2);
        assert_eq!(backlog.unwritten(), 0);
        // A write of no data wakes no one.
        backlog.wrote(0, t0 + 3 * MS);
        assert_eq!(woken(&w), 2);
    }

    #[test]
    fn a_full_socket_is_never_forgiven_and_its_draining_wakes_the_waiters() {
        let t0 = Instant::now();
        let backlog = SendBacklog::default();
        let (w, waker) = waker();
        assert_eq!(backlog.try_hand(&waker, 100, 100, t0), Hand::Taken);
        backlog.blocked();
        // The client does not read: however long, nothing is forgotten.
        let much_later = t0 + 1_000 * SETTLE_AFTER;
        assert_eq!(
            backlog.try_hand(&waker, 1, 100, much_later),
            Hand::Wait(None)
        );
        assert_eq!(backlog.unwritten(), 100);
        assert_eq!(woken(&w), 0);
        // The socket takes bytes again (of no DATA frame yet): the waiter
        // learns when it may ask again, the quiet spell counted from now.
        backlog.wrote(0, much_later);
        assert_eq!(woken(&w), 1);
        assert_eq!(
            backlog.try_hand(&waker, 1, 100, much_later + MS),
            Hand::Wait(Some(much_later + SETTLE_AFTER))
        );
    }

    #[test]
    fn bytes_never_written_while_the_socket_takes_writes_are_forgotten() {
        let t0 = Instant::now();
        let backlog = SendBacklog::default();
        let (_, waker) = waker();
        assert_eq!(backlog.try_hand(&waker, 80, 100, t0), Hand::Taken);
        backlog.wrote(30, t0 + 10 * MS);
        // 50 bytes of a stream reset meanwhile will never be written.
        let settle_at = t0 + 10 * MS + SETTLE_AFTER;
        assert_eq!(
            backlog.try_hand(&waker, 60, 100, settle_at - MS),
            Hand::Wait(Some(settle_at))
        );
        assert_eq!(backlog.unwritten(), 50);
        assert_eq!(backlog.try_hand(&waker, 60, 100, settle_at), Hand::Taken);
        assert_eq!(backlog.unwritten(), 60);
        // Blocked, then writing: the quiet spell starts again at the write.
        backlog.blocked();
        backlog.wrote(10, settle_at + MS);
        assert_eq!(
            backlog.try_hand(&waker, 60, 100, settle_at + SETTLE_AFTER),
            Hand::Wait(Some(settle_at + MS + SETTLE_AFTER))
        );
    }
}
