//! Prometheus metrics on `/metrics`, read from the node's handle at each
//! scrape.

use soma_actors::dropped::{Droppable, dropped};
use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::routing::get;
use axum::serve::Listener;
use ipnet::IpNet;
use prometheus::core::Collector;
use prometheus::{Encoder, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder};
use soma_actors::P2pHandle;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The series of the design, registered once.
struct Series {
    registry: Registry,
    /// The last scrape's text, and when it began.
    scraped: tokio::sync::Mutex<Option<(Instant, String)>>,
    known_peers: IntGauge,
    connected_peers: IntGauge,
    banned_peers: IntGauge,
    doubted_peers: IntGauge,
    highest_synced: IntGauge,
    advertised: IntGauge,
    highest_known: IntGauge,
    commits: IntCounterVec,
    blocks: IntCounterVec,
    bytes: IntCounterVec,
    restarts: IntCounterVec,
    hedges_won: IntCounterVec,
    hedges_late: IntCounterVec,
    hedges_given_way: IntCounterVec,
    hedges_moved: IntCounterVec,
    hedges_alone: IntCounterVec,
    hedge_parts_held: IntCounterVec,
    hedges_sent: IntCounterVec,
    write_failures: IntCounterVec,
    failures: IntCounterVec,
    rpcs: IntCounterVec,
    inbound: IntGauge,
    fetches_in_flight: IntGauge,
    fetches_waiting_for_budget: IntGauge,
    unwritten_bytes: IntGauge,
    responses_cut: IntCounterVec,
    fetches_on_kept_slots: IntCounterVec,
    fetches_refused: IntCounterVec,
    fetches_abandoned: IntCounterVec,
    inbound_refused: IntCounterVec,
    inbound_closed: IntCounterVec,
    actor_up: IntGaugeVec,
    actor_restarts: IntCounterVec,
    lowest_available: IntGauge,
    pruned: IntCounterVec,
    unavailable: IntGauge,
    executor_lead: IntGauge,
    dropped: IntCounterVec,
    archive_next: IntGauge,
    archive_written: IntCounterVec,
    archive_read: IntCounterVec,
    archive_errors: IntCounterVec,
    archive_refused: IntCounterVec,
    archive_writer_restarts: IntCounterVec,
    /// Last values seen, to turn totals into counter increments.
    last: Mutex<std::collections::HashMap<String, u64>>,
}

fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("valid metric");
    registry
        .register(Box::new(g.clone()))
        .expect("registered once");
    g
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    registry
        .register(Box::new(c.clone()))
        .expect("registered once");
    c
}

impl Series {
    fn new() -> Self {
        let r = Registry::new();
        let actor_up = IntGaugeVec::new(
            Opts::new("soma_actor_up", "1 if the actor's mailbox is open"),
            &["actor"],
        )
        .expect("valid metric");
        r.register(Box::new(actor_up.clone()))
            .expect("registered once");
        Series {
            scraped: tokio::sync::Mutex::new(None),
            known_peers: gauge(&r, "soma_known_peers", "Peers discovery knows"),
            connected_peers: gauge(&r, "soma_connected_peers", "Peers connected"),
            banned_peers: gauge(&r, "soma_banned_peers", "Peers banned for invalid data"),
            doubted_peers: gauge(
                &r,
                "soma_doubted_peers",
                "Peers whose claimed height is not counted for now: they failed a commit fetch",
            ),
            highest_synced: gauge(&r, "soma_highest_synced_commit", "Highest commit applied"),
            advertised: gauge(
                &r,
                "soma_advertised_commit",
                "Highest commit served and advertised: the highest whose certificate is held",
            ),
            highest_known: gauge(
                &r,
                "soma_highest_known_commit",
                "Highest commit known among peers",
            ),
            commits: counter(
                &r,
                "soma_commits_synced_total",
                "Commits applied (synced and local)",
                &[],
            ),
            blocks: counter(&r, "soma_blocks_synced_total", "Blocks applied", &[]),
            bytes: counter(
                &r,
                "soma_bytes_fetched_total",
                "Bytes of verified blocks fetched",
                &[],
            ),
            restarts: counter(
                &r,
                "soma_worker_restarts_total",
                "Sync workers restarted",
                &[],
            ),
            hedges_won: counter(
                &r,
                "soma_hedges_won_total",
                "Fetches a second peer, asked when the first was late, answered first with an answer that passed its checks",
                &[],
            ),
            hedges_late: counter(
                &r,
                "soma_hedges_late_total",
                "Hedges still unanswered, when the first peer answered, as long after they were sent as makes a peer late",
                &[],
            ),
            hedges_given_way: counter(
                &r,
                "soma_hedges_given_way_total",
                "Hedges given up, late themselves, to hedges waiting for room in max-hedged-bytes",
                &[],
            ),
            hedges_moved: counter(
                &r,
                "soma_hedges_moved_total",
                "Hedges that, late themselves, left their peer for one not yet asked for the fetch",
                &[],
            ),
            hedges_alone: counter(
                &r,
                "soma_hedges_alone_total",
                "Hedges that went on alone once their fetch's first peer failed while they were out",
                &[],
            ),
            hedge_parts_held: counter(
                &r,
                "soma_hedge_parts_held_total",
                "Hedges' answers of only a part of what was asked, held while the first peer had the time it needs",
                &[],
            ),
            hedges_sent: counter(
                &r,
                "soma_hedges_sent_total",
                "Late fetches asked of a second peer as well, each once its share of max-hedged-bytes was free",
                &[],
            ),
            write_failures: counter(
                &r,
                "soma_store_write_failures_total",
                "Batches the store failed to write (each fetched again after a pause)",
                &[],
            ),
            failures: counter(
                &r,
                "soma_verification_failures_total",
                "Peer responses that failed verification",
                &["kind"],
            ),
            rpcs: counter(&r, "soma_rpcs_total", "RPCs served", &["method", "status"]),
            inbound: gauge(&r, "soma_inbound_connections", "Inbound connections open"),
            fetches_in_flight: gauge(
                &r,
                "soma_fetches_in_flight",
                "Fetches served and not yet fully sent",
            ),
            unwritten_bytes: gauge(
                &r,
                "soma_answer_bytes_unwritten",
                "Answer bytes handed to HTTP/2 and not yet written to the sockets",
            ),
            fetches_waiting_for_budget: gauge(
                &r,
                "soma_fetches_waiting_for_budget",
                "FetchCommits waiting, on their fetch slot, for answers their connection has not read",
            ),
            responses_cut: counter(
                &r,
                "soma_responses_cut_total",
                "Answers cut unread: at send-timeout, or stalled when a newer fetch took the slot",
                &["reason"],
            ),
            fetches_on_kept_slots: counter(
                &r,
                "soma_fetches_on_kept_slots_total",
                "Fetches started on the slot their connection kept from its fetch before, without asking the GrpcAdapter",
                &[],
            ),
            fetches_refused: counter(
                &r,
                "soma_fetches_refused_total",
                "Fetches refused, by the cap that was full: a slot cap, or abandoned (the caller's allowance of fetches dropped unread)",
                &["cap"],
            ),
            fetches_abandoned: counter(
                &r,
                "soma_fetches_abandoned_total",
                "Fetches whose callers dropped them before reading their answers",
                &[],
            ),
            inbound_refused: counter(
                &r,
                "soma_inbound_connections_refused_total",
                "Inbound connections refused, by reason",
                &["reason"],
            ),
            inbound_closed: counter(
                &r,
                "soma_inbound_connections_closed_total",
                "Inbound connections closed by the server, by reason",
                &["reason"],
            ),
            actor_restarts: counter(
                &r,
                "soma_actor_restarts_total",
                "Restarts of a long-lived actor by its supervisor, after a panic or a stop",
                &["actor"],
            ),
            lowest_available: gauge(
                &r,
                "soma_lowest_available_commit",
                "Lowest commit the store keeps (pruning raises it)",
            ),
            pruned: counter(&r, "soma_commits_pruned_total", "Commits pruned", &[]),
            unavailable: gauge(
                &r,
                "soma_sync_unavailable_commit",
                "The next commit to sync while no connected peer holds it; 0 otherwise",
            ),
            executor_lead: gauge(
                &r,
                "soma_executor_lead",
                "Commits sync has asked for past the last one the registered executor took; 0 without one",
            ),
            dropped: counter(
                &r,
                "soma_dropped_messages_total",
                "Messages dropped because their receiver's mailbox was full (each is repeated later)",
                &["message"],
            ),
            archive_next: gauge(
                &r,
                "soma_archive_next_commit",
                "The next commit the archive writer will archive; every commit below it is archived",
            ),
            archive_written: counter(
                &r,
                "soma_archive_batches_written_total",
                "Certified batches written to the archive",
                &[],
            ),
            archive_read: counter(
                &r,
                "soma_archive_reads_total",
                "Archive reads for sync: batches handed to verification (read), not held (miss), or not asked while the archive's failures pause its reads (deferred)",
                &["outcome"],
            ),
            archive_errors: counter(
                &r,
                "soma_archive_errors_total",
                "Failed archive requests (each retried), by direction",
                &["op"],
            ),
            archive_refused: counter(
                &r,
                "soma_archive_refused_total",
                "Archived data that failed verification (a corrupt or forged archive); never applied",
                &[],
            ),
            archive_writer_restarts: counter(
                &r,
                "soma_archive_writer_restarts_total",
                "Times the archive writer panicked and was started again",
                &[],
            ),
            actor_up,
            registry: r,
            last: Mutex::new(Default::default()),
        }
    }

    /// Raises a counter to the running total `now`.
    fn advance(&self, counter: &IntCounterVec, labels: &[&str], now: u64) {
        let key = format!("{}{labels:?}", counter.desc()[0].fq_name);
        let mut last = lock(&self.last);
        let before = last.insert(key, now).unwrap_or(0);
        counter
            .with_label_values(labels)
            .inc_by(now.saturating_sub(before));
    }

    async fn update(&self, handle: &P2pHandle) {
        // Asked together, each within the scrape's budget: one slow actor
        // leaves its gauges as they were and does not lose the scrape.
        let (status, known, connected, counts) = tokio::join!(
            within(handle.sync_status()),
            within(handle.known_peer_count()),
            within(handle.connected_peers()),
            within(handle.peer_counts()),
        );
        if let Ok(Ok(status)) = status {
            self.highest_synced.set(gauge_value(status.synced));
            self.advertised.set(gauge_value(status.advertised));
            self.highest_known.set(gauge_value(status.highest_known));
            self.advance(&self.commits, &[], status.commits_applied);
            self.advance(&self.blocks, &[], status.blocks_applied);
            self.advance(&self.bytes, &[], status.bytes_fetched);
            self.advance(&self.restarts, &[], status.restarts);
            self.advance(&self.hedges_won, &[], status.hedges_won);
            self.advance(&self.hedges_late, &[], status.hedges_late);
            self.advance(&self.hedges_given_way, &[], status.hedges_given_way);
            self.advance(&self.hedges_moved, &[], status.hedges_moved);
            self.advance(&self.hedges_alone, &[], status.hedges_alone);
            self.advance(&self.hedge_parts_held, &[], status.hedge_parts_held);
            self.advance(&self.hedges_sent, &[], status.hedges_sent);
            let writes_failed = status.store_write_failures;
            self.advance(&self.write_failures, &[], writes_failed);
            self.advance(
                &self.failures,
                &["invalid_response"],
                status.invalid_responses,
            );
            self.lowest_available
                .set(gauge_value(status.lowest_available));
            self.advance(&self.pruned, &[], status.commits_pruned);
            self.unavailable
                .set(gauge_value(status.unavailable.unwrap_or(0)));
            let lead = status
                .executed
                .map_or(0, |taken| status.requested.saturating_sub(taken));
            self.executor_lead.set(gauge_value(lead));
        }
        for kind in Droppable::ALL {
            self.advance(&self.dropped, &[kind.name()], dropped(kind));
        }
        if let Ok(Ok(known)) = known {
            self.known_peers.set(known as i64);
        }
        if let Ok(Ok(connected)) = connected {
            self.connected_peers.set(connected.len() as i64);
        }
        if let Ok(Ok(counts)) = counts {
            self.banned_peers.set(counts.banned as i64);
            self.doubted_peers.set(counts.doubted as i64);
        }
        for (method, code, n) in handle.rpc_counts() {
            self.advance(&self.rpcs, &[method, &format!("{code:?}")], n);
        }
        let inbound = handle.inbound_connections();
        self.inbound.set(inbound.open as i64);
        self.unwritten_bytes.set(inbound.unwritten_bytes as i64);
        self.fetches_in_flight
            .set(handle.fetches_in_flight() as i64);
        self.fetches_waiting_for_budget
            .set(handle.fetches_waiting_for_budget() as i64);
        self.advance(&self.responses_cut, &["deadline"], handle.responses_cut());
        self.advance(
            &self.responses_cut,
            &["stalled"],
            handle.responses_preempted(),
        );
        self.advance(
            &self.fetches_on_kept_slots,
            &[],
            handle.fetches_on_kept_slots(),
        );
        let refused = handle.fetches_refused();
        for (cap, n) in [
            ("peer", refused.caller),
            ("host", refused.host),
            ("network", refused.network),
            ("all", refused.all),
            ("abandoned", refused.abandoning),
        ] {
            self.advance(&self.fetches_refused, &[cap], n);
        }
        self.advance(&self.fetches_abandoned, &[], handle.fetches_abandoned());
        let c = inbound.counts;
        for (reason, n) in [
            ("per_ip", c.refused_per_ip),
            ("per_prefix", c.refused_per_prefix),
            ("full", c.refused_full),
            ("unreserved", c.refused_unreserved),
        ] {
            self.advance(&self.inbound_refused, &[reason], n);
        }
        for (reason, n) in [
            ("evicted", c.evicted),
            ("handshake_timeout", c.handshake_timeouts),
            ("idle", c.idle_closed),
            ("cut_after_grace", c.cut_after_grace),
        ] {
            self.advance(&self.inbound_closed, &[reason], n);
        }
        if let Some(a) = handle.archive_status() {
            self.archive_next.set(gauge_value(a.next));
            self.advance(&self.archive_written, &[], a.batches_written);
            self.advance(&self.archive_read, &["read"], a.batches_read);
            self.advance(&self.archive_read, &["miss"], a.read_misses);
            self.advance(&self.archive_read, &["deferred"], a.reads_deferred);
            self.advance(&self.archive_errors, &["write"], a.write_errors);
            self.advance(&self.archive_errors, &["read"], a.read_errors);
            self.advance(&self.archive_refused, &[], a.refused);
            self.advance(&self.archive_writer_restarts, &[], a.writer_restarts);
        }
        for actor in handle.health().actors {
            self.actor_up
                .with_label_values(&[actor.name])
                .set(i64::from(actor.alive));
            self.advance(&self.actor_restarts, &[actor.name], actor.restarts);
        }
    }
}

/// The most a scrape waits for each actor it asks: an actor slower than
/// that (a full mailbox) leaves its gauges as they were, and the scrape
/// still answers within Prometheus' default `scrape_timeout` of 10 s.
const SCRAPE_BUDGET: Duration = Duration::from_secs(2);

/// `ask`, if it answers within [`SCRAPE_BUDGET`].
async fn within<T>(ask: impl Future<Output = T>) -> Result<T, tokio::time::error::Elapsed> {
    tokio::time::timeout(SCRAPE_BUDGET, ask).await
}

async fn metrics(State((handle, series)): State<(P2pHandle, Arc<Series>)>) -> String {
    let asked = Instant::now();
    // Scrapes wait for one another, so one asks the actors at a time; one
    // that waited gets the text of a scrape begun after it was asked
    // (never older), so scrapes arriving together cost one.
    let mut last = series.scraped.lock().await;
    if let Some((began, text)) = &*last
        && *began >= asked
    {
        return text.clone();
    }
    let began = Instant::now();
    series.update(&handle).await;
    let mut out = Vec::new();
    let _ = TextEncoder::new().encode(&series.registry.gather(), &mut out);
    let text = String::from_utf8(out).unwrap_or_default();
    *last = Some((began, text.clone()));
    text
}

/// What the metrics endpoint allows its clients.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Connections served at once; more wait, unaccepted, in the
    /// listen backlog until one ends.
    pub connections: usize,
    /// Connections served at once from one network (a /24 in IPv4, a /64
    /// in IPv6, as the gRPC server counts prefixes); more are closed as
    /// soon as they are accepted, so one client, however many addresses
    /// its network gives it, cannot hold every slot.
    pub per_network: usize,
    /// How long a connection lives, whatever it does: a scraper connects
    /// again, and a client that sends nothing, or sends slowly, holds a
    /// connection (and a file descriptor) no longer.
    pub lifetime: Duration,
    /// The networks whose clients are served; a connection from any other
    /// address is closed as soon as it is accepted, before it holds a
    /// slot. Empty: every address is.
    pub allowed: Vec<IpNet>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            connections: 8,
            per_network: 2,
            lifetime: Duration::from_secs(10),
            allowed: Vec::new(),
        }
    }
}

/// Whether a client at `ip` may be served under `allowed` (every address
/// if empty). An IPv4 client of a dual-stack listener, seen as an
/// IPv4-mapped IPv6 address, is matched as the IPv4 address it is.
fn allowed(allowed: &[IpNet], ip: IpAddr) -> bool {
    let ip = ip.to_canonical();
    allowed.is_empty() || allowed.iter().any(|network| network.contains(&ip))
}

/// Serves `/metrics` on `listener`, within `limits`, until `shutdown`
/// resolves.
pub async fn serve(
    handle: P2pHandle,
    listener: tokio::net::TcpListener,
    limits: Limits,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .with_state((handle, Arc::new(Series::new())));
    let listener = Limited {
        listener,
        slots: Arc::new(Semaphore::new(limits.connections.max(1))),
        per_network: limits.per_network.max(1),
        open: Arc::default(),
        lifetime: limits.lifetime,
        allowed: limits.allowed,
    };
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

/// A listener that accepts a connection only from the networks it
/// allows, while fewer than its slots are open, and fewer than
/// `per_network` from its network, each connection ending at its lifetime.
struct Limited {
    listener: tokio::net::TcpListener,
    slots: Arc<Semaphore>,
    per_network: usize,
    /// Connections open, by network (only networks with one open).
    open: Arc<Mutex<HashMap<IpAddr, usize>>>,
    lifetime: Duration,
    allowed: Vec<IpNet>,
}

impl Listener for Limited {
    type Io = Bounded;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Bounded, SocketAddr) {
        loop {
            let slot = match self.slots.clone().acquire_owned().await {
                Ok(slot) => slot,
                // Never closed; were it, nothing would be accepted again.
                Err(_) => std::future::pending().await,
            };
            let (io, address) = Listener::accept(&mut self.listener).await;
            if !allowed(&self.allowed, address.ip()) {
                // Closed at once, as below.
                tracing::debug!(%address, "metrics connection from outside metrics-allowed-networks closed");
                continue;
            }
            let network = soma_wire::inbound::prefix(address.ip());
            {
                let mut open = lock(&self.open);
                let count = open.entry(network).or_default();
                if *count >= self.per_network {
                    // Closed at once; its slot goes back with `slot`.
                    continue;
                }
                *count += 1;
            }
            let ends = Box::pin(tokio::time::sleep(self.lifetime));
            let from = (network, self.open.clone());
            return (
                Bounded {
                    io,
                    ends,
                    from,
                    _slot: slot,
                },
                address,
            );
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}

/// A connection of the metrics endpoint: it fails every read and write
/// once its lifetime is over, and frees its slot when dropped.
struct Bounded {
    io: tokio::net::TcpStream,
    ends: Pin<Box<tokio::time::Sleep>>,
    /// Its network, counted among those open until it is dropped.
    from: (IpAddr, Arc<Mutex<HashMap<IpAddr, usize>>>),
    _slot: OwnedSemaphorePermit,
}

impl Drop for Bounded {
    fn drop(&mut self) {
        let (network, open) = &self.from;
        let mut open = lock(open);
        if let Some(count) = open.get_mut(network) {
            *count -= 1;
            if *count == 0 {
                open.remove(network);
            }
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Bounded {
    fn over(&mut self, cx: &mut Context<'_>) -> Option<std::io::Error> {
        self.ends.as_mut().poll(cx).is_ready().then(|| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "metrics connection lifetime over",
            )
        })
    }
}

impl AsyncRead for Bounded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if let Some(e) = self.over(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Bounded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if let Some(e) = self.over(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if let Some(e) = self.over(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// A count or a commit index as a gauge's value: past `i64::MAX` (a
/// peer's claim of the highest commit may be anything) the gauge reads
/// `i64::MAX`, not a negative number.
fn gauge_value(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use soma_actors::P2pConfig;
    use soma_chain::{ChainBuilder, ChainConfig};
    use soma_store::MemStore;

    use super::*;

    /// The value of the series `series` (name and labels, as exposed).
    fn value(text: &str, series: &str) -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no series {series} in\n{text}"))
    }

    async fn scrape(handle: &P2pHandle, series: &Arc<Series>) -> String {
        metrics(State((handle.clone(), series.clone()))).await
    }

    /// A peer may claim any height: past `i64::MAX` the gauge reads
    /// `i64::MAX`, where a cast read a negative number (-1 for `u64::MAX`).
    #[test]
    fn a_height_past_what_a_gauge_holds_reads_as_its_largest() {
        assert_eq!(gauge_value(0), 0);
        assert_eq!(gauge_value(1_234), 1_234);
        assert_eq!(gauge_value(i64::MAX as u64), i64::MAX);
        assert_eq!(gauge_value(i64::MAX as u64 + 1), i64::MAX);
        assert_eq!(gauge_value(u64::MAX), i64::MAX);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn after_a_known_sync_the_metrics_say_exactly_what_happened() {
        // A fresh node syncs three batches of the default size from one
        // validator, with nothing going wrong.
        let tip = 3 * P2pConfig::default().state_sync.commit_sync_batch_size;
        let chain = ChainBuilder::new(ChainConfig::validators(4)).build(tip);
        let source = soma_testkit::validator(&chain, 1);
        let config = P2pConfig {
            seed_peers: soma_testkit::seeds(&[&source]),
            ..P2pConfig::default()
        };
        let store = Arc::new(MemStore::new(chain.genesis()));
        let node = soma_testkit::node(&chain, 9, config, store);
        soma_testkit::wait_synced(&node, tip, Duration::from_secs(120)).await;

        let ours = scrape(&node, &Arc::new(Series::new())).await;
        let blocks = (1..=tip).flat_map(|i| chain.blocks_of(i));
        let bytes: usize = blocks.clone().map(|b| b.serialized().len()).sum();
        assert_eq!(value(&ours, "soma_highest_synced_commit"), tip as f64);
        assert_eq!(value(&ours, "soma_advertised_commit"), tip as f64);
        assert_eq!(value(&ours, "soma_highest_known_commit"), tip as f64);
        assert_eq!(value(&ours, "soma_commits_synced_total"), tip as f64);
        assert_eq!(
            value(&ours, "soma_blocks_synced_total"),
            blocks.count() as f64
        );
        assert_eq!(value(&ours, "soma_bytes_fetched_total"), bytes as f64);
        assert_eq!(value(&ours, "soma_worker_restarts_total"), 0.0);
        // One peer: no fetch is ever hedged.
        assert_eq!(value(&ours, "soma_hedges_won_total"), 0.0);
        assert_eq!(value(&ours, "soma_hedges_late_total"), 0.0);
        assert_eq!(value(&ours, "soma_hedges_given_way_total"), 0.0);
        assert_eq!(value(&ours, "soma_hedges_moved_total"), 0.0);
        assert_eq!(value(&ours, "soma_hedges_alone_total"), 0.0);
        assert_eq!(value(&ours, "soma_hedge_parts_held_total"), 0.0);
        assert_eq!(value(&ours, "soma_hedges_sent_total"), 0.0);
        assert_eq!(value(&ours, "soma_store_write_failures_total"), 0.0);
        let invalid = r#"soma_verification_failures_total{kind="invalid_response"}"#;
        assert_eq!(value(&ours, invalid), 0.0);
        assert_eq!(value(&ours, "soma_connected_peers"), 1.0);
        assert_eq!(value(&ours, "soma_banned_peers"), 0.0);
        assert_eq!(value(&ours, "soma_doubted_peers"), 0.0);
        let actors = [
            "connections",
            "discovery",
            "grpc_adapter",
            "peer_heights",
            "reserved_slots",
            "state_sync",
            "verifier",
        ];
        for actor in actors {
            let up = format!("soma_actor_up{{actor=\"{actor}\"}}");
            assert_eq!(value(&ours, &up), 1.0, "{actor}");
            let restarts = format!("soma_actor_restarts_total{{actor=\"{actor}\"}}");
            assert_eq!(value(&ours, &restarts), 0.0, "{actor}");
        }
        let listed = ours.lines().filter(|l| l.starts_with("soma_actor_up{"));
        assert_eq!(listed.count(), actors.len());

        // The source served each batch once: its commits, then its blocks
        // in one call (fewer than max-blocks-per-fetch each).
        let theirs = scrape(&source, &Arc::new(Series::new())).await;
        for method in ["FetchCommits", "FetchBlocks"] {
            let served = format!("soma_rpcs_total{{method=\"{method}\",status=\"Ok\"}}");
            assert_eq!(value(&theirs, &served), 3.0, "{method}\n{theirs}");
        }
        let refused = theirs
            .lines()
            .filter(|l| l.starts_with("soma_rpcs_total{") && !l.contains("status=\"Ok\""));
        assert_eq!(refused.collect::<Vec<_>>(), Vec::<&str>::new());
        for cap in ["peer", "host", "network", "all", "abandoned"] {
            let refused = format!("soma_fetches_refused_total{{cap=\"{cap}\"}}");
            assert_eq!(value(&theirs, &refused), 0.0, "{cap}");
        }
        assert_eq!(value(&theirs, "soma_inbound_connections"), 1.0);
        assert_eq!(value(&theirs, "soma_fetches_in_flight"), 0.0);
        // Every answer was read: none of its bytes wait in HTTP/2.
        assert_eq!(value(&theirs, "soma_answer_bytes_unwritten"), 0.0);
        node.shutdown().await;
        source.shutdown().await;
    }

    /// Waits (30 s at most) for the server to close `stream` having sent
    /// nothing on it; `kept` says what it means if it does not.
    async fn closed_unanswered(stream: &mut tokio::net::TcpStream, kept: &str) {
        use tokio::io::AsyncReadExt;
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut rest));
        assert!(read.await.is_ok(), "{kept}");
        assert_eq!(rest, Vec::<u8>::new());
    }

    /// A connection to `address` from `ip`, an address of this host.
    async fn connect_from(ip: &str, address: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind(format!("{ip}:0").parse().expect("an address"))?;
        socket.connect(address).await
    }

    /// One HTTP/1.1 request for `/metrics` on `stream`; the answer's body,
    /// read to the end (the endpoint closes after answering a `close`).
    async fn get(stream: &mut tokio::net::TcpStream) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let request = "GET /metrics HTTP/1.1\r\nhost: node\r\nconnection: close\r\n\r\n";
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.unwrap();
        answer
    }

    /// A client that sends nothing holds a connection of the endpoint no
    /// longer than its lifetime, no more clients are served at once than
    /// its slots (one more waits, unaccepted, until a slot frees), no more
    /// from one network than its share, and none from outside the
    /// networks allowed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connections_are_bounded_by_lifetime_slots_shares_and_allowed_networks() {
        use tokio::net::TcpStream;
        let chain = ChainBuilder::new(ChainConfig::validators(4)).build(1);
        let store = Arc::new(MemStore::new(chain.genesis()));
        let node = soma_testkit::node(&chain, 9, P2pConfig::default(), store);
        let start = |limits: Limits| {
            let node = node.clone();
            async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                let address = listener.local_addr().unwrap();
                let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
                let server = tokio::spawn(serve(node, listener, limits, async {
                    let _ = stopped.await;
                }));
                (address, stop, server)
            }
        };

        // One slot, held by a client that sends nothing: it is closed at
        // its lifetime's end, with nothing sent to it.
        let lifetime = Duration::from_millis(300);
        let (address, stop, server) = start(Limits {
            connections: 1,
            per_network: 8,
            lifetime,
            ..Limits::default()
        })
        .await;
        let mut idle = TcpStream::connect(address).await.unwrap();
        closed_unanswered(&mut idle, "the idle connection outlived its lifetime").await;
        let _ = stop.send(());
        server.await.unwrap().unwrap();

        // One slot, held for an hour: a second client is not served while
        // the first holds it, and is once the first has gone.
        let (address, stop, server) = start(Limits {
            connections: 1,
            per_network: 8,
            lifetime: Duration::from_secs(3_600),
            ..Limits::default()
        })
        .await;
        let holder = TcpStream::connect(address).await.unwrap();
        let mut waiting = TcpStream::connect(address).await.unwrap();
        let mut asked = tokio::spawn(async move { get(&mut waiting).await });
        let early = tokio::time::timeout(Duration::from_millis(500), &mut asked).await;
        assert!(early.is_err(), "served past the one slot: {early:?}");
        drop(holder);
        let answer = tokio::time::timeout(Duration::from_secs(30), asked).await;
        let answer = answer.expect("answered once the slot freed").unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.contains("soma_known_peers 0"), "{answer}");
        let _ = stop.send(());
        server.await.unwrap().unwrap();

        // Four slots, one per network: a second connection from the
        // address holding one, or from another address of its /24, is
        // closed at once, unanswered, while another network is served.
        let (address, stop, server) = start(Limits {
            connections: 4,
            per_network: 1,
            lifetime: Duration::from_secs(3_600),
            ..Limits::default()
        })
        .await;
        let _holder = TcpStream::connect(address).await.unwrap();
        let mut second = TcpStream::connect(address).await.unwrap();
        closed_unanswered(&mut second, "a second connection of one address was kept").await;
        let mut neighbour = connect_from("127.0.0.2", address).await.unwrap();
        closed_unanswered(
            &mut neighbour,
            "a second connection of one network was kept",
        )
        .await;
        let mut elsewhere = connect_from("127.0.1.1", address).await.unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(30), get(&mut elsewhere)).await;
        assert!(answer.expect("answered").starts_with("HTTP/1.1 200"));
        let _ = stop.send(());
        server.await.unwrap().unwrap();

        // One slot, and only 127.0.2.0/24 allowed: connections from
        // elsewhere are closed at once, unanswered, and hold no slot, so
        // the allowed network's client is served after them.
        let (address, stop, server) = start(Limits {
            connections: 1,
            per_network: 1,
            lifetime: Duration::from_secs(3_600),
            allowed: vec!["127.0.2.0/24".parse().unwrap()],
        })
        .await;
        for outsider in ["127.0.0.1", "127.0.1.1", "127.0.3.1"] {
            let mut outsider = connect_from(outsider, address).await.unwrap();
            closed_unanswered(&mut outsider, "a connection from outside was kept").await;
        }
        let mut inside = connect_from("127.0.2.9", address).await.unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(30), get(&mut inside)).await;
        assert!(answer.expect("answered").starts_with("HTTP/1.1 200"));
        let _ = stop.send(());
        server.await.unwrap().unwrap();
        node.shutdown().await;
    }

    #[test]
    fn clients_are_allowed_by_network_and_ipv4_clients_of_a_dual_stack_listener_as_ipv4() {
        let networks: Vec<IpNet> = ["10.0.0.0/8", "2001:db8::/32"]
            .iter()
            .map(|n| n.parse().unwrap())
            .collect();
        let ip = |text: &str| text.parse::<IpAddr>().unwrap();
        for (client, served) in [
            ("10.200.0.1", true),
            ("::ffff:10.200.0.1", true),
            ("11.0.0.1", false),
            ("::ffff:11.0.0.1", false),
            ("2001:db8:1::1", true),
            ("2001:db9::1", false),
        ] {
            assert_eq!(allowed(&networks, ip(client)), served, "{client}");
        }
        assert!(
            allowed(&[], ip("203.0.113.1")),
            "empty allows every address"
        );
    }
}
