//! Serving a router on accepted connections, each with a server of its
//! own, so that one connection can be closed gracefully.
//!
//! tonic closes connections gracefully only all at once, at the server's
//! shutdown, and at their age only by cutting them when a grace is set. A
//! connection found idle ([`crate::inbound`]) was therefore cut: a request
//! the client sent as it was cut failed, though nothing was wrong with
//! either side. Here each connection is served by its own tonic server (a
//! clone of one [`Router`], so every setting and layer is the same), whose
//! shutdown signal is the first of: the connection found idle, its end,
//! its age ([`Config::max_age`](crate::inbound::Config::max_age)), the
//! whole server's shutdown. At any of them but its end, hyper sends a
//! GOAWAY, answers the requests that crossed it, and closes; a connection
//! still open a grace later (`idle_drain_grace`, or `max_age_grace` at its
//! age) is cut; at the server's shutdown, the lesser of `idle_drain_grace`
//! and the server's own stop grace.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;

use futures::StreamExt;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tonic::transport::server::Router;

use crate::tls::{Connection, Incoming};

/// Serves `router` on every connection `incoming` yields until `shutdown`
/// completes; then stops accepting (the listener is closed), has every
/// connection close gracefully (each cut `idle_drain_grace`, or
/// `stop_grace` if less, later if still open), and returns once all have
/// closed. The cut is the connection's own (its transport fails), so it
/// holds whatever task serves the connection: tonic runs each in a task
/// of its own, which no abort of this future reaches.
pub async fn serve(
    router: Router,
    incoming: Incoming,
    shutdown: impl Future<Output = ()>,
    stop_grace: std::time::Duration,
) {
    let (stop, stopped) = watch::channel(false);
    let mut connections = JoinSet::new();
    // What drains each connection served, by its server's task: at the
    // stop every one is told, those already closing (found idle, or at
    // their age) included, whose own grace may be far longer.
    let mut drainers = HashMap::new();
    let mut incoming = incoming;
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = incoming.next() => match accepted {
                Some(Ok(connection)) => {
                    let closing = closing(&connection, stopped.clone());
                    let drainer = connection.drainer();
                    // One connection, then none: the server waits for its
                    // signal rather than ending with its incoming stream.
                    let one = futures::stream::iter([Ok::<_, Infallible>(connection)])
                        .chain(futures::stream::pending());
                    let server = router.clone().serve_with_incoming_shutdown(one, closing);
                    let task = connections.spawn(async move {
                        if let Err(error) = server.await {
                            tracing::debug!(%error, "inbound connection's server failed");
                        }
                    });
                    drainers.insert(task.id(), drainer);
                }
                Some(Err(error)) => tracing::debug!(%error, "inbound connection not accepted"),
                None => break,
            },
            // Reaps the servers of closed connections.
            Some(ended) = connections.join_next_with_id(), if !connections.is_empty() => {
                match ended {
                    Ok((id, ())) => drainers.remove(&id),
                    Err(error) => {
                        tracing::warn!(%error, "inbound connection's server panicked");
                        drainers.remove(&error.id())
                    }
                };
            }
        }
    }
    // No new connection: the listener closes now, not after the drain.
    drop(incoming);
    stop.send_replace(true);
    for drainer in drainers.values() {
        drainer.drain(drainer.config().idle_drain_grace.min(stop_grace));
    }
    while connections.join_next().await.is_some() {}
}

/// The shutdown signal of `connection`'s server: found idle (it is then
/// draining already), closed, too old (it drains, cut if still open
/// `max_age_grace` later), or all to close (`serve` drains it).
fn closing(
    connection: &Connection,
    mut stopped: watch::Receiver<bool>,
) -> impl Future<Output = ()> + Send + 'static {
    let ended = connection.closing();
    let drainer = connection.drainer();
    async move {
        let config = drainer.config().clone();
        tokio::select! {
            _ = ended => {}
            // `serve` tells every connection's drainer at its stop.
            _ = stopped.wait_for(|stop| *stop) => {}
            _ = tokio::time::sleep(config.max_age) => drainer.drain(config.max_age_grace),
        }
    }
}
