//! Serving a router on accepted connections, each with a server of its
//! own, so that one connection can be closed gracefully.
//!
//! tonic closes connections gracefully only all at once, at the server's
//! shutdown. A connection found idle ([`crate::inbound`]) was therefore
//! cut: a request the client sent as it was cut failed, though nothing
//! was wrong with either side. Here each connection is served by its own
//! tonic server (a clone of one [`Router`], so every setting and layer is
//! the same), whose shutdown signal is that connection's idle signal or
//! the whole server's shutdown: at either, hyper sends a GOAWAY, answers
//! the requests that crossed it, and closes. A connection that does not
//! close within `idle_drain_grace` ([`crate::inbound::Config`]) of
//! its idle signal is cut as before.

use std::convert::Infallible;
use std::future::Future;

use futures::StreamExt;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tonic::transport::server::Router;

use crate::tls::Incoming;

/// Serves `router` on every connection `incoming` yields until `shutdown`
/// completes; then stops accepting, has every connection close
/// gracefully, and returns once all have closed.
pub async fn serve(router: Router, incoming: Incoming, shutdown: impl Future<Output = ()>) {
    let (stop, stopped) = watch::channel(false);
    let mut connections = JoinSet::new();
    let mut incoming = std::pin::pin!(incoming);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = incoming.next() => match accepted {
                Some(Ok(connection)) => {
                    // Its server ends when the connection is idle (after a
                    // graceful close), closed, or all are to close.
                    let ended = connection.closing();
                    let mut stopped = stopped.clone();
                    let closing = async move {
                        tokio::select! {
                            _ = ended => {}
                            _ = stopped.wait_for(|stop| *stop) => {}
                        }
                    };
                    // One connection, then none: the server waits for its
                    // signal rather than ending with its incoming stream.
                    let one = futures::stream::iter([Ok::<_, Infallible>(connection)])
                        .chain(futures::stream::pending());
                    let server = router.clone().serve_with_incoming_shutdown(one, closing);
                    connections.spawn(async move {
                        if let Err(error) = server.await {
                            tracing::debug!(%error, "inbound connection's server failed");
                        }
                    });
                }
                Some(Err(error)) => tracing::debug!(%error, "inbound connection not accepted"),
                None => break,
            },
            // Reaps the servers of closed connections.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    stop.send_replace(true);
    while connections.join_next().await.is_some() {}
}
