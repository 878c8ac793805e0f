//! Admission of inbound connections: at most a configured number open at
//! once.
//!
//! tonic holds every connection it accepts, without a bound. A server made
//! with [`tls::incoming`](crate::tls::incoming) accepts through a
//! [`ConnectionLimit`] instead: each accepted socket takes one permit of
//! the limit's semaphore, and the permit lives inside the connection's IO
//! type ([`Admitted`]), so it comes back when the connection ends, however
//! it ends (handshake failure or timeout, client gone, server shut down). A
//! socket accepted while no permit is left is reset at once, before the TLS
//! handshake: past the limit, a connection costs the server one accept and
//! one close.
//!
//! Accept errors never reach tonic-tls, which would end the accept loop on
//! one (and with it the server): an error about one connection is skipped,
//! and running out of file descriptors or memory pauses accepting for
//! 100 ms before trying again.

use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;
use tonic::transport::server::{Connected, TcpConnectInfo, TcpIncoming};

/// The default bound: 64 times the peers a node dials by default, about
/// 15 MiB of idle connections, and below the common open-file limit of
/// 1,024 with room left for outbound connections and the store (see
/// `docs/operations.md`).
pub const DEFAULT_MAX_CONNECTIONS: usize = 512;

/// At most one warning of each kind (connections refused, accepts failed)
/// per this interval; each refusal is also logged at debug level.
const WARN_INTERVAL: Duration = Duration::from_secs(10);

/// Connections refused (or accepts failed) in a row before the accept
/// loop lets other tasks run, so a flood cannot hold a runtime thread.
const ACCEPTS_PER_POLL: usize = 64;

/// Pause of accepting after an error that is not about one connection.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// The bound on a server's open inbound connections, with counts of what
/// it let in and refused. Clones share the bound and the counts.
#[derive(Clone, Debug)]
pub struct ConnectionLimit {
    permits: Arc<Semaphore>,
    max: usize,
    refused: Arc<AtomicU64>,
}

impl Default for ConnectionLimit {
    fn default() -> Self {
        ConnectionLimit::new(DEFAULT_MAX_CONNECTIONS)
    }
}

impl ConnectionLimit {
    /// At most `max` connections open at once (0 refuses every one).
    pub fn new(max: usize) -> Self {
        let max = max.min(Semaphore::MAX_PERMITS);
        ConnectionLimit {
            permits: Arc::new(Semaphore::new(max)),
            max,
            refused: Arc::new(AtomicU64::new(0)),
        }
    }

    /// The bound.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Connections open now, handshakes in progress included.
    pub fn open(&self) -> usize {
        self.max - self.permits.available_permits()
    }

    /// Connections refused so far because the bound was reached.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}

/// An accepted TCP connection holding its permit of a [`ConnectionLimit`]
/// until it is dropped.
#[derive(Debug)]
pub struct Admitted {
    stream: TcpStream,
    _permit: OwnedSemaphorePermit,
}

impl Connected for Admitted {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for Admitted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Admitted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// The TCP connections of a listener that got a permit of `limit`; the
/// others are reset as soon as they are accepted.
pub(crate) struct Admission {
    tcp: TcpIncoming,
    limit: ConnectionLimit,
    /// After an accept error not about one connection, accepting resumes
    /// when this ends.
    pause: Option<Pin<Box<Sleep>>>,
    refusals: Warning,
    accept_errors: Warning,
}

impl Admission {
    pub(crate) fn new(tcp: TcpIncoming, limit: ConnectionLimit) -> Self {
        Admission {
            tcp,
            limit,
            pause: None,
            refusals: Warning::default(),
            accept_errors: Warning::default(),
        }
    }

    fn refuse(&mut self, stream: TcpStream) {
        // Counted before the client can learn of it.
        self.limit.refused.fetch_add(1, Ordering::Relaxed);
        let peer = stream.peer_addr().ok();
        // A reset rather than a close: the client learns at once, and the
        // server keeps no TIME_WAIT state for it.
        let _ = stream.set_zero_linger();
        drop(stream);
        tracing::debug!(?peer, max = self.limit.max, "inbound connection refused");
        if let Some(refused) = self.refusals.due() {
            tracing::warn!(
                refused,
                max = self.limit.max,
                "inbound connections refused: at the limit"
            );
        }
    }

    /// An accept failed. If it is about the connection (the client gave up
    /// first), the next one is accepted at once. Otherwise (out of file
    /// descriptors or memory) the connection stays queued and accepting it
    /// again at once would fail again, so accepting pauses; the server
    /// keeps running either way.
    fn accept_failed(&mut self, error: io::Error) {
        use io::ErrorKind::*;
        if matches!(
            error.kind(),
            ConnectionAborted | ConnectionReset | BrokenPipe | Interrupted | WouldBlock | TimedOut
        ) {
            tracing::debug!(%error, "accept failed");
            return;
        }
        if let Some(failures) = self.accept_errors.due() {
            tracing::warn!(%error, failures, "accepting inbound connections failed; pausing");
        }
        self.pause = Some(Box::pin(tokio::time::sleep(ACCEPT_ERROR_PAUSE)));
    }
}

impl Stream for Admission {
    type Item = io::Result<Admitted>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        for _ in 0..ACCEPTS_PER_POLL {
            if let Some(pause) = &mut this.pause {
                ready!(pause.as_mut().poll(cx));
                this.pause = None;
            }
            match ready!(Pin::new(&mut this.tcp).poll_next(cx)) {
                None => return Poll::Ready(None),
                Some(Err(error)) => this.accept_failed(error),
                Some(Ok(stream)) => match this.limit.permits.clone().try_acquire_owned() {
                    Ok(permit) => {
                        return Poll::Ready(Some(Ok(Admitted {
                            stream,
                            _permit: permit,
                        })));
                    }
                    Err(_) => this.refuse(stream),
                },
            }
        }
        // Only refusals and failures so far: let other tasks run.
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

impl tonic_tls::Incoming for Admission {
    type Io = Admitted;
    type Error = io::Error;
}

/// A warning logged at most once per [`WARN_INTERVAL`], counting the
/// occurrences in between.
#[derive(Default)]
struct Warning {
    last: Option<Instant>,
    since: u64,
}

impl Warning {
    /// Counts one occurrence; returns how many there were since the last
    /// warning if one is due now.
    fn due(&mut self) -> Option<u64> {
        self.since += 1;
        if self.last.is_some_and(|at| at.elapsed() < WARN_INTERVAL) {
            return None;
        }
        self.last = Some(Instant::now());
        Some(std::mem::take(&mut self.since))
    }
}
