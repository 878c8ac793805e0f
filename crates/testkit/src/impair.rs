//! Impaired links: a TCP forwarder that sits between two nodes and gives
//! the path between them latency, jitter, a bandwidth limit, stalls and
//! connection resets, in userspace, where the kernel has no netem.
//!
//! Each accepted connection is forwarded to the upstream address over a
//! connection of its own. In each direction, a reader stamps every chunk it
//! reads with the time it is due (its arrival plus the one-way delay and a
//! jitter draw, never before the chunk ahead of it, so bytes are never
//! reordered) and queues it; a writer delivers each chunk at its time,
//! through a token bucket when the bandwidth is limited. The delay is a
//! propagation delay: many chunks are on the way at once, as on a long
//! path, so a sender that keeps enough in flight is not held to one chunk
//! per round trip. What is on the way is bounded by
//! [`Impairment::queue_bytes`] per direction of a connection; a full queue
//! stops the reader, and TCP's flow control pushes back on the sender.
//!
//! A reset closes every live connection with a TCP RST (zero linger), both
//! the accepted one and the upstream one, dropping whatever was queued; the
//! link keeps listening, so the node reconnects through it. Resets run on a
//! period ([`ImpairedLink::set_reset_every`], which a test turns on once the
//! work it disturbs has begun) or at once ([`ImpairedLink::reset_now`]).

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Bytes read from a socket at once: the unit the queues hold and the
/// delay stamps.
pub const CHUNK_BYTES: usize = 16 << 10;

/// Bytes on the way in one direction of one connection at most, by
/// default: 16 MiB, enough for 128 MB/s at 125 ms one way.
pub const DEFAULT_QUEUE_BYTES: usize = 16 << 20;

/// Live connections one link forwards at most; more are refused (closed at
/// once).
pub const MAX_CONNECTIONS: usize = 256;

/// Time allowed to connect upstream for an accepted connection.
const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// What a link does to the traffic through it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Impairment {
    /// Added to every chunk, each way (a round trip is twice this).
    pub one_way_delay: Duration,
    /// Each chunk's delay is drawn uniformly within `one_way_delay` ±
    /// `jitter` (never below zero), and never delivered before the chunk
    /// ahead of it.
    pub jitter: Duration,
    /// Bytes per second each way, shared by the link's connections;
    /// `None`: unlimited.
    pub bandwidth_bytes_per_s: Option<u64>,
    /// Reset every live connection on this period; `None`: never (it can
    /// be turned on later with [`ImpairedLink::set_reset_every`]).
    pub reset_every: Option<Duration>,
    /// Hold every byte back for a while, periodically, with the
    /// connections open; `None`: never.
    pub stall: Option<Stall>,
    /// Bytes on the way in one direction of one connection at most.
    pub queue_bytes: usize,
}

impl Default for Impairment {
    /// A plain forwarder: no delay, no limit, no resets.
    fn default() -> Self {
        Impairment {
            one_way_delay: Duration::ZERO,
            jitter: Duration::ZERO,
            bandwidth_bytes_per_s: None,
            reset_every: None,
            stall: None,
            queue_bytes: DEFAULT_QUEUE_BYTES,
        }
    }
}

impl Impairment {
    /// A link of `rtt` round trip (half of it each way), nothing else.
    pub fn round_trip(rtt: Duration) -> Self {
        Impairment {
            one_way_delay: rtt / 2,
            ..Impairment::default()
        }
    }
}

/// A periodic stall: every `every`, nothing is delivered for `length`
/// (shorter than `every`, or the link never delivers again).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stall {
    /// Time from the start of one stall to the start of the next.
    pub every: Duration,
    /// How long each stall lasts.
    pub length: Duration,
}

/// What a link has done so far.
#[derive(Debug, Default)]
struct Counters {
    connections: AtomicU64,
    refused: AtomicU64,
    resets: AtomicU64,
    connections_reset: AtomicU64,
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
    stalls: AtomicU64,
}

/// A plain copy of a link's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkStats {
    /// Connections accepted and forwarded upstream.
    pub connections: u64,
    /// Connections closed at once: upstream unreachable, or too many live.
    pub refused: u64,
    /// Resets that closed at least one live connection.
    pub resets: u64,
    /// Connections those resets closed.
    pub connections_reset: u64,
    /// Bytes delivered upstream (towards the upstream address).
    pub bytes_up: u64,
    /// Bytes delivered downstream (towards whoever connected).
    pub bytes_down: u64,
    /// Stalls begun.
    pub stalls: u64,
}

/// The link's shared state: its settings, its live connections and the
/// two directions' token buckets.
struct Shared {
    impairment: Impairment,
    counters: Counters,
    /// Each live connection's reset switch, by connection number.
    live: Mutex<HashMap<u64, watch::Sender<bool>>>,
    up: Option<Mutex<Bucket>>,
    down: Option<Mutex<Bucket>>,
    /// Until when nothing is delivered (a stall), if set.
    stalled_until: watch::Sender<Option<Instant>>,
}

impl Shared {
    /// Resets every live connection; returns how many.
    fn reset_all(&self) -> usize {
        let live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
        for switch in live.values() {
            let _ = switch.send(true);
        }
        let n = live.len();
        if n > 0 {
            self.counters.resets.fetch_add(1, Ordering::Relaxed);
            self.counters
                .connections_reset
                .fetch_add(n as u64, Ordering::Relaxed);
        }
        n
    }
}

/// A running impaired link: listens on [`ImpairedLink::local_addr`] and
/// forwards to its upstream address. Dropping it stops it and closes its
/// connections.
pub struct ImpairedLink {
    local_addr: SocketAddr,
    shared: Arc<Shared>,
    reset_every: watch::Sender<Option<Duration>>,
    tasks: Vec<JoinHandle<()>>,
}

impl ImpairedLink {
    /// Listens on 127.0.0.1 (a free port) and forwards to `upstream`.
    pub async fn listen(upstream: SocketAddr, impairment: Impairment) -> io::Result<Self> {
        let listener = TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0)).await?;
        Ok(Self::start(listener, upstream, impairment))
    }

    /// Forwards what `listener` accepts to `upstream`. Binding first lets
    /// a node be started with the link's address as the one it advertises,
    /// so that peers reach it through the link even when they redial.
    /// Runs on the current tokio runtime.
    pub fn start(listener: TcpListener, upstream: SocketAddr, impairment: Impairment) -> Self {
        let local_addr = listener
            .local_addr()
            .expect("a bound listener has an address");
        let bucket = |rate: Option<u64>| rate.map(|r| Mutex::new(Bucket::new(r)));
        let shared = Arc::new(Shared {
            up: bucket(impairment.bandwidth_bytes_per_s),
            down: bucket(impairment.bandwidth_bytes_per_s),
            counters: Counters::default(),
            live: Mutex::new(HashMap::new()),
            stalled_until: watch::channel(None).0,
            impairment,
        });
        let (reset_every, reset_rx) = watch::channel(shared.impairment.reset_every);
        let mut tasks = vec![
            tokio::spawn(accept_loop(listener, upstream, shared.clone())),
            tokio::spawn(reset_loop(reset_rx, shared.clone())),
        ];
        if let Some(stall) = shared.impairment.stall {
            tasks.push(tokio::spawn(stall_loop(stall, shared.clone())));
        }
        ImpairedLink {
            local_addr,
            shared,
            reset_every,
            tasks,
        }
    }

    /// Where the link listens.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Starts (or changes, or with `None` stops) the periodic resets; the
    /// first comes one period from now.
    pub fn set_reset_every(&self, period: Option<Duration>) {
        self.reset_every.send_replace(period);
    }

    /// Resets every live connection now; returns how many.
    pub fn reset_now(&self) -> usize {
        self.shared.reset_all()
    }

    /// Holds every byte back, connections open, until
    /// [`ImpairedLink::release`]: a peer that has gone quiet mid-transfer,
    /// switched on when a test has reached the state it needs.
    pub fn hold(&self) {
        // An hour stands for "until released": longer than any test.
        let until = Instant::now() + Duration::from_secs(3600);
        self.shared.stalled_until.send_replace(Some(until));
    }

    /// Ends a [`ImpairedLink::hold`] (or a periodic stall under way): what
    /// was held is delivered in order.
    pub fn release(&self) {
        self.shared.stalled_until.send_replace(None);
    }

    /// Connections forwarded right now.
    pub fn live_connections(&self) -> usize {
        self.shared
            .live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// What the link has done so far.
    pub fn stats(&self) -> LinkStats {
        let c = &self.shared.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        LinkStats {
            connections: get(&c.connections),
            refused: get(&c.refused),
            resets: get(&c.resets),
            connections_reset: get(&c.connections_reset),
            bytes_up: get(&c.bytes_up),
            bytes_down: get(&c.bytes_down),
            stalls: get(&c.stalls),
        }
    }
}

impl Drop for ImpairedLink {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        self.shared.reset_all();
    }
}

async fn accept_loop(listener: TcpListener, upstream: SocketAddr, shared: Arc<Shared>) {
    let mut next = 0u64;
    loop {
        let Ok((client, _)) = listener.accept().await else {
            // Out of descriptors, say: try again shortly rather than spin.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let id = next;
        next += 1;
        let (switch, reset) = watch::channel(false);
        {
            let mut live = shared.live.lock().unwrap_or_else(PoisonError::into_inner);
            if live.len() >= MAX_CONNECTIONS {
                shared.counters.refused.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            live.insert(id, switch);
        }
        let shared = shared.clone();
        tokio::spawn(async move {
            forward(client, upstream, id, reset, &shared).await;
            shared
                .live
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&id);
        });
    }
}

/// One connection, until either side closes or the link resets it.
async fn forward(
    client: TcpStream,
    upstream: SocketAddr,
    id: u64,
    mut reset: watch::Receiver<bool>,
    shared: &Shared,
) {
    let server =
        match tokio::time::timeout(UPSTREAM_CONNECT_TIMEOUT, TcpStream::connect(upstream)).await {
            Ok(Ok(s)) => s,
            _ => {
                shared.counters.refused.fetch_add(1, Ordering::Relaxed);
                let _ = client.set_zero_linger();
                return;
            }
        };
    shared.counters.connections.fetch_add(1, Ordering::Relaxed);
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    // Per connection and direction, so that runs are repeatable.
    let up = Direction::new(
        shared,
        shared.up.as_ref(),
        &shared.counters.bytes_up,
        id * 2,
    );
    let down = Direction::new(
        shared,
        shared.down.as_ref(),
        &shared.counters.bytes_down,
        id * 2 + 1,
    );
    let reset = tokio::select! {
        _ = reset.wait_for(|r| *r) => true,
        () = both(
            up.run(&mut client_read, &mut server_write),
            down.run(&mut server_read, &mut client_write),
        ) => false,
    };
    if reset {
        // Closed with RST, each side, whatever was queued dropped.
        let _ = client_write.as_ref().set_zero_linger();
        let _ = server_write.as_ref().set_zero_linger();
    }
}

/// Runs both directions: while one that ended in order (a half close)
/// leaves the other running, one that failed ends both.
async fn both<F: Future<Output = bool>>(a: F, b: F) {
    let (a, b) = (std::pin::pin!(a), std::pin::pin!(b));
    let (clean, other) = match futures::future::select(a, b).await {
        futures::future::Either::Left(done) | futures::future::Either::Right(done) => done,
    };
    if clean {
        other.await;
    }
}

/// One direction of one connection.
struct Direction<'a> {
    shared: &'a Shared,
    bucket: Option<&'a Mutex<Bucket>>,
    delivered: &'a AtomicU64,
    rng: StdRng,
}

impl<'a> Direction<'a> {
    fn new(
        shared: &'a Shared,
        bucket: Option<&'a Mutex<Bucket>>,
        delivered: &'a AtomicU64,
        seed: u64,
    ) -> Self {
        Direction {
            shared,
            bucket,
            delivered,
            rng: StdRng::seed_from_u64(seed),
        }
    }

    /// Forwards `from` to `to` until `from` ends (then `to` is shut down
    /// for writing) or either fails; returns whether it ended in order.
    async fn run(self, from: &mut OwnedReadHalf, to: &mut OwnedWriteHalf) -> bool {
        let Direction {
            shared,
            bucket,
            delivered,
            mut rng,
        } = self;
        let capacity = shared.impairment.queue_bytes.div_ceil(CHUNK_BYTES).max(1);
        let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(capacity);
        let delay = shared.impairment.one_way_delay;
        let jitter = shared.impairment.jitter;
        let read = async {
            let mut last = Instant::now();
            let mut clean = false;
            loop {
                let mut chunk = vec![0u8; CHUNK_BYTES];
                let n = match from.read(&mut chunk).await {
                    Ok(0) => {
                        clean = true;
                        break;
                    }
                    Err(_) => break,
                    Ok(n) => n,
                };
                chunk.truncate(n);
                let due = Instant::now() + draw(&mut rng, delay, jitter);
                last = last.max(due);
                if tx.send((last, chunk)).await.is_err() {
                    break;
                }
            }
            // The writer ends once it has delivered what was queued.
            drop(tx);
            clean
        };
        let mut stalled = shared.stalled_until.subscribe();
        let write = async {
            let mut ok = true;
            while let Some((due, chunk)) = rx.recv().await {
                tokio::time::sleep_until(due).await;
                wait_stall(&mut stalled).await;
                if let Some(bucket) = bucket {
                    let wait = bucket
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .take(chunk.len() as u64, Instant::now());
                    tokio::time::sleep(wait).await;
                }
                if to.write_all(&chunk).await.is_err() {
                    ok = false;
                    break;
                }
                delivered.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            }
            // The source ended (or failed): pass the end on in order; a
            // failure is the connection's end, decided by the caller.
            if ok {
                ok = to.shutdown().await.is_ok();
            }
            ok
        };
        // A failed write ends the reading too: nothing more can pass.
        let (read, write) = (std::pin::pin!(read), std::pin::pin!(write));
        match futures::future::select(read, write).await {
            futures::future::Either::Left((clean, write)) => write.await && clean,
            futures::future::Either::Right((true, read)) => read.await,
            futures::future::Either::Right((false, _)) => false,
        }
    }
}

/// Waits while a stall is on; a stall ended early ([`ImpairedLink::release`])
/// ends the wait at once.
async fn wait_stall(stalled: &mut watch::Receiver<Option<Instant>>) {
    loop {
        let until = *stalled.borrow_and_update();
        match until {
            Some(t) if t > Instant::now() => {
                tokio::select! {
                    _ = tokio::time::sleep_until(t) => {}
                    _ = stalled.changed() => {}
                }
            }
            _ => return,
        }
    }
}

/// A chunk's delay: `delay` ± `jitter`, uniformly, not below zero.
fn draw(rng: &mut StdRng, delay: Duration, jitter: Duration) -> Duration {
    if jitter.is_zero() {
        return delay;
    }
    let low = delay.saturating_sub(jitter);
    let high = delay + jitter;
    Duration::from_nanos(rng.random_range(low.as_nanos() as u64..=high.as_nanos() as u64))
}

async fn reset_loop(mut period: watch::Receiver<Option<Duration>>, shared: Arc<Shared>) {
    loop {
        let current = *period.borrow_and_update();
        match current {
            None => {
                if period.changed().await.is_err() {
                    return;
                }
            }
            Some(p) => {
                tokio::select! {
                    changed = period.changed() => {
                        if changed.is_err() {
                            return;
                        }
                    }
                    () = tokio::time::sleep(p) => {
                        shared.reset_all();
                    }
                }
            }
        }
    }
}

async fn stall_loop(stall: Stall, shared: Arc<Shared>) {
    let mut next = Instant::now() + stall.every;
    loop {
        tokio::time::sleep_until(next).await;
        shared.counters.stalls.fetch_add(1, Ordering::Relaxed);
        shared.stalled_until.send_replace(Some(next + stall.length));
        next += stall.every.max(Duration::from_millis(1));
    }
}

/// A token bucket of `rate` bytes per second, holding at most a tenth of a
/// second's worth (at least one chunk). Tokens may go below zero: a sender
/// then waits for the debt to be paid.
#[derive(Debug)]
struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Option<Instant>,
}

impl Bucket {
    fn new(rate: u64) -> Self {
        let rate = rate.max(1) as f64;
        let burst = (rate / 10.0).max(CHUNK_BYTES as f64);
        Bucket {
            rate,
            burst,
            tokens: burst,
            at: None,
        }
    }

    /// Takes `bytes` at `now`; returns how long to wait before sending.
    fn take(&mut self, bytes: u64, now: Instant) -> Duration {
        if let Some(at) = self.at {
            let earned = now.saturating_duration_since(at).as_secs_f64() * self.rate;
            self.tokens = (self.tokens + earned).min(self.burst);
        }
        self.at = Some(now);
        self.tokens -= bytes as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo server: returns everything each connection sends.
    async fn echo() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.into_split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    /// Sends `data` through the link and reads the echo back whole.
    async fn round(link: &ImpairedLink, data: &[u8]) -> io::Result<Vec<u8>> {
        let stream = TcpStream::connect(link.local_addr()).await?;
        let (mut r, mut w) = stream.into_split();
        let sent = data.to_vec();
        let writer = tokio::spawn(async move {
            w.write_all(&sent).await?;
            w.shutdown().await
        });
        let mut back = Vec::new();
        r.read_to_end(&mut back).await?;
        writer.await.unwrap()?;
        Ok(back)
    }

    #[tokio::test]
    async fn bytes_arrive_intact_and_in_order_through_jitter() {
        crate::init_tracing();
        let link = ImpairedLink::listen(
            echo().await,
            Impairment {
                one_way_delay: Duration::from_millis(2),
                jitter: Duration::from_millis(2),
                ..Impairment::default()
            },
        )
        .await
        .unwrap();
        let data = pattern(3 << 20);
        assert_eq!(round(&link, &data).await.unwrap(), data);
        let stats = link.stats();
        assert_eq!(stats.connections, 1);
        assert_eq!(stats.bytes_up, data.len() as u64);
        assert_eq!(stats.bytes_down, data.len() as u64);
    }

    #[tokio::test(start_paused = true)]
    async fn a_round_trip_takes_at_least_twice_the_one_way_delay() {
        crate::init_tracing();
        let delay = Duration::from_millis(150);
        let link = ImpairedLink::listen(echo().await, Impairment::round_trip(delay * 2))
            .await
            .unwrap();
        let stream = TcpStream::connect(link.local_addr()).await.unwrap();
        let (mut r, mut w) = stream.into_split();
        // The clock is tokio's, paused: it moves only when every task
        // waits, so what it shows is the delays the link imposed.
        for i in 0..3u8 {
            let sent = Instant::now();
            w.write_all(&[i; 100]).await.unwrap();
            let mut back = [0u8; 100];
            r.read_exact(&mut back).await.unwrap();
            assert_eq!(back, [i; 100]);
            assert!(
                sent.elapsed() >= delay * 2,
                "round {i}: {:?}",
                sent.elapsed()
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_delay_is_paid_once_for_many_chunks_in_flight() {
        crate::init_tracing();
        let delay = Duration::from_millis(100);
        let link = ImpairedLink::listen(echo().await, Impairment::round_trip(delay * 2))
            .await
            .unwrap();
        // 64 chunks sent back to back come back after about one round
        // trip, not 64: the link pipelines. (The paused clock makes this
        // exact: it only moves when everything waits on a timer.)
        let data = pattern(64 * CHUNK_BYTES);
        let sent = Instant::now();
        assert_eq!(round(&link, &data).await.unwrap(), data);
        let elapsed = sent.elapsed();
        assert!(elapsed >= delay * 2, "{elapsed:?}");
        assert!(elapsed < delay * 2 * 8, "{elapsed:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn the_bandwidth_limit_holds_bytes_back() {
        crate::init_tracing();
        let rate = 1 << 20;
        let link = ImpairedLink::listen(
            echo().await,
            Impairment {
                bandwidth_bytes_per_s: Some(rate),
                ..Impairment::default()
            },
        )
        .await
        .unwrap();
        // 4 MiB each way at 1 MiB/s: at least 4 s less the first burst.
        let data = pattern(4 << 20);
        let sent = Instant::now();
        assert_eq!(round(&link, &data).await.unwrap(), data);
        assert!(
            sent.elapsed() >= Duration::from_secs(3),
            "{:?}",
            sent.elapsed()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_stall_holds_every_byte_for_its_length() {
        crate::init_tracing();
        let stall = Stall {
            every: Duration::from_secs(10),
            length: Duration::from_secs(4),
        };
        let link = ImpairedLink::listen(
            echo().await,
            Impairment {
                stall: Some(stall),
                ..Impairment::default()
            },
        )
        .await
        .unwrap();
        let stream = TcpStream::connect(link.local_addr()).await.unwrap();
        let (mut r, mut w) = stream.into_split();
        let start = Instant::now();
        tokio::time::sleep(Duration::from_secs(11)).await;
        assert_eq!(link.stats().stalls, 1);
        w.write_all(b"held").await.unwrap();
        let mut back = [0u8; 4];
        r.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"held");
        assert!(
            start.elapsed() >= Duration::from_secs(14),
            "{:?}",
            start.elapsed()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_held_link_delivers_nothing_until_released_then_everything_in_order() {
        crate::init_tracing();
        let link = ImpairedLink::listen(echo().await, Impairment::default())
            .await
            .unwrap();
        let stream = TcpStream::connect(link.local_addr()).await.unwrap();
        let (mut r, mut w) = stream.into_split();
        link.hold();
        w.write_all(b"held").await.unwrap();
        let mut back = [0u8; 4];
        // The paused clock jumps to the timeout at once when every task
        // waits: ten minutes of a held link pass in no real time.
        let read = tokio::time::timeout(Duration::from_secs(600), r.read_exact(&mut back));
        assert!(read.await.is_err(), "a byte passed a held link");
        assert_eq!(link.stats().bytes_up, 0, "nothing delivered upstream");
        link.release();
        r.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"held");
    }

    #[tokio::test]
    async fn a_reset_closes_every_connection_and_counts_it() {
        crate::init_tracing();
        let link = ImpairedLink::listen(echo().await, Impairment::default())
            .await
            .unwrap();
        let mut streams = Vec::new();
        for _ in 0..3 {
            let mut s = TcpStream::connect(link.local_addr()).await.unwrap();
            // Echoed: the connection is forwarded and live.
            s.write_all(b"up").await.unwrap();
            let mut back = [0u8; 2];
            s.read_exact(&mut back).await.unwrap();
            streams.push(s);
        }
        assert_eq!(link.live_connections(), 3);
        assert_eq!(link.reset_now(), 3);
        for mut s in streams {
            let mut buf = [0u8; 16];
            // Reset: the read fails (RST) or, at worst, ends; nothing
            // comes back.
            match s.read(&mut buf).await {
                Ok(0) => {}
                Err(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{e}"),
                Ok(n) => panic!("{n} bytes after a reset"),
            }
        }
        let stats = link.stats();
        assert_eq!(stats.resets, 1);
        assert_eq!(stats.connections_reset, 3);
        // Nothing live to reset: not counted as a reset.
        wait_until(|| link.live_connections() == 0).await;
        assert_eq!(link.reset_now(), 0);
        assert_eq!(link.stats().resets, 1);

        // The link still listens: a new connection goes through.
        let data = pattern(100_000);
        assert_eq!(round(&link, &data).await.unwrap(), data);
        assert_eq!(link.stats().connections, 4);
    }

    #[tokio::test(start_paused = true)]
    async fn periodic_resets_start_when_turned_on() {
        crate::init_tracing();
        let link = ImpairedLink::listen(echo().await, Impairment::default())
            .await
            .unwrap();
        let mut s = TcpStream::connect(link.local_addr()).await.unwrap();
        s.write_all(b"up").await.unwrap();
        let mut back = [0u8; 2];
        s.read_exact(&mut back).await.unwrap();
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert_eq!(link.stats().resets, 0, "off until turned on");
        link.set_reset_every(Some(Duration::from_secs(10)));
        let mut buf = [0u8; 4];
        assert!(!matches!(s.read(&mut buf).await, Ok(n) if n > 0));
        assert_eq!(link.stats().resets, 1);
    }

    /// Polls `done` on the (paused or real) clock until it holds.
    async fn wait_until(done: impl Fn() -> bool) {
        while !done() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[test]
    fn the_bucket_charges_debt_beyond_its_burst() {
        let t = Instant::now();
        let mut b = Bucket::new(100_000);
        // Burst: max(10,000, one chunk) = 16 KiB, free.
        assert_eq!(b.take(CHUNK_BYTES as u64, t), Duration::ZERO);
        // 50,000 more at 100,000/s: half a second.
        assert_eq!(b.take(50_000, t), Duration::from_millis(500));
        // Paid by the time it is due: the next 1,000 wait 10 ms more.
        assert_eq!(
            b.take(1_000, t + Duration::from_millis(500)),
            Duration::from_millis(10)
        );
    }

    #[test]
    fn jitter_stays_within_its_bounds() {
        let mut rng = StdRng::seed_from_u64(1);
        let (delay, jitter) = (Duration::from_millis(10), Duration::from_millis(4));
        for _ in 0..1_000 {
            let d = draw(&mut rng, delay, jitter);
            assert!(d >= delay - jitter && d <= delay + jitter, "{d:?}");
        }
        let small = draw(&mut rng, Duration::from_millis(1), Duration::from_millis(5));
        assert!(small <= Duration::from_millis(6));
    }
}
