//! The soak test: a node under a long, mixed load keeps flat.
//!
//! Three validators run as `soma-p2p run` processes and produce commits. A
//! syncing node runs in this test's process, seeded with them, with
//! pruning on and a deliberately slow executor registered. Over the run:
//! 2,000 distinct callers, half authenticated with identities of their
//! own and half anonymous, connect to the node, call every RPC of the
//! `P2p` service and disconnect (from a child process, so that their
//! memory, threads and sockets are not counted as the node's); validators
//! are killed and restarted; and random long-lived actors of the node
//! panic (the `testing` feature's fault plan) and are restarted by their
//! supervisor.
//!
//! Every sample interval the test records the process's resident memory,
//! open file descriptors and threads, the peers PeerHeights tracks, the
//! peers discovery knows, the store file's size, the sync lag (the
//! validators' highest commit minus the node's) and the executor's
//! position; and, reported but not judged, the live heap
//! ([`LIVE_HEAP`]). It passes when:
//! - after the warm-up, resident memory, descriptors, threads, tracked
//!   peers and known peers stay within [`FLAT`] times their first
//!   post-warm-up sample (peer counts against at least [`PEER_FLOOR`],
//!   descriptors with room for the churn's connections);
//! - after the warm-up, the store file stays within the retention bound
//!   ([`store_bound`]) and the sync lag within [`SYNC_LAG_BOUND`];
//! - the executor received every commit the node synced exactly once, in
//!   order;
//! - the node ends healthy, every injected panic was one restart of its
//!   actor, and every churn identity called.
//!
//! `SOAK_SECONDS` sets the run's length (default 60, the version `make
//! test` runs; `make soak` runs 600 in release). The warm-up is
//! min(60 s, run / 3) and the sample interval min(10 s, run / 12), so a
//! 60 s run takes 12 samples, 9 of them from the warm-up's end on. The
//! warm-up lets what fills once fill: the store up to its retention, the
//! known-peer table up to its caps, the runtime's threads. The samples
//! are printed as a table and written, with a summary and a plot,
//! to `target/soak/` (`samples.csv`, `summary.txt`, `samples.svg`).

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use rand::{Rng, SeedableRng};
use soma_actors::discovery::SeedPeer;
use soma_actors::faults::FaultPlan;
use soma_actors::state_sync::prune;
use soma_actors::system::{CommitStream, P2pError, Retention};
use soma_actors::{P2pBuilder, P2pConfig, P2pHandle, supervisor};
use soma_chain::ChainBuilder;
use soma_store::{ConsensusStore, RedbStore};
use soma_types::{Commit, CommittedSubDag, KeyPair, codec};
use soma_wire::proto::{self, p2p_client::P2pClient};
use soma_wire::tls::{self, NodeIdentity};

mod common;
use common::*;

/// Length of the run when `SOAK_SECONDS` is not set.
const DEFAULT_SECONDS: u64 = 60;
/// The shortest run accepted: its sample interval is then 2.5 s.
const MIN_SECONDS: u64 = 30;
/// Validator processes.
const VALIDATORS: u16 = 3;
/// Commits each validator produces per second: modest, so that a debug
/// build on 2 cores is not CPU-bound.
const COMMIT_RATE: u32 = 20;
/// Commits per epoch: a 60 s run crosses one epoch, a 600 s run twelve.
const COMMITS_PER_EPOCH: u64 = 1_000;
/// The executor's simulated work per commit: at most 50 commits a second,
/// 2.5 times the production rate, so it keeps up, but a catch-up runs at
/// its pace rather than sync's.
const EXECUTION_TIME: Duration = Duration::from_millis(20);
/// The node's retention: the last 200 commits (10 s of production).
const RETENTION_COMMITS: u64 = 200;
/// The node's `max_lead_over_execution`: sync runs at most this far ahead
/// of the executor.
const MAX_LEAD_OVER_EXECUTION: u64 = 100;
/// How often the node prunes, and how long it advertises a new lowest
/// commit before it deletes below it.
const PRUNE_INTERVAL: Duration = Duration::from_millis(500);
const PRUNE_GRACE: Duration = Duration::from_secs(2);
/// Commits produced while a prune target waits for its grace and the next
/// pruning pass: the store holds them on top of the retention.
const PRUNE_EVERY: u64 =
    COMMIT_RATE as u64 * (PRUNE_INTERVAL.as_millis() + PRUNE_GRACE.as_millis()) as u64 / 1_000 + 1;
/// Distinct callers over the run, half authenticated, half anonymous.
const IDENTITIES: usize = 2_000;
/// Callers connected at once at most. The node holds a descriptor for
/// each: a sample may catch any number of them up to this, so the
/// descriptors' reference counts them all (see [`Flat`]).
const CHURN_CONCURRENCY: usize = 4;
/// A panic is injected into a random actor each time the executor has
/// passed this many more commits (10 s of production). They start after
/// the first post-warm-up sample, half this many commits after it, so
/// that the reference is the node at rest, not one still reconnecting
/// after a panic of its Connections actor.
const PANIC_EVERY: u64 = 200;
/// Commits the validators hold when they start, and the node syncs first:
/// enough that the store reaches its steady size (retention, and the
/// pages pruning frees and redb reuses) during the warm-up. Written in
/// batches of [`BATCH`] commits, a certificate at each batch end.
const HISTORY: u64 = 400;
/// Every long-lived actor, by the name faults and `health()` use.
const ACTORS: [&str; 7] = [
    "peer_heights",
    "verifier",
    "connections",
    "discovery",
    "state_sync",
    "grpc_adapter",
    "reserved_slots",
];
/// Points of the run, as fractions of its length, at which a validator is
/// killed and restarted: away from the first post-warm-up sample.
const VALIDATOR_RESTARTS: [f64; 2] = [0.4, 0.7];
/// A sampled value after the warm-up may be at most this many times its
/// first post-warm-up sample.
const FLAT: f64 = 1.2;
/// Peer counts are compared against at least this many. A count of a
/// few peers moves by whole peers: 1.2 × 3 tracked validators allows no
/// fourth peer at all, though one more connection (discovery dials what
/// it learns, up to its connection target of 8) says nothing about growth.
/// With the floor up to 6 pass; a leak keeps growing past that.
const PEER_FLOOR: f64 = 5.0;
/// The sync lag allowed after the warm-up, in commits: 30 s of
/// production. The node hears of new commits at once (PushCommit) or
/// within a second (height queries) and syncs them within a second; a
/// killed validator's fetches go to the others. The longest gap is a
/// restart of the Connections actor: every connection is gone, and
/// discovery redials in rounds 5 s apart, picking among the peers it
/// knows, most of them churn callers that no longer answer; the
/// validators took up to 15 s to be connected again. Twice that is
/// allowed; a node that stops syncing passes it within 30 s.
const SYNC_LAG_BOUND: u64 = 30 * COMMIT_RATE as u64;
/// The store's overhead over the bytes of blocks it retains: B-tree pages
/// are at least half full (2×); commits, certificates and the index of
/// blocks' holders come on top of the blocks, and the pages a write frees
/// are reused only by later writes (one more time, together). A 600 s run
/// saw redb shrink its file to 2.1 times those bytes, then double it.
const STORE_SLACK: u64 = 3;
/// redb grows a full file to twice its size (below 4 GiB), so the file
/// may be up to twice what it holds.
const REDB_GROWTH: u64 = 2;
/// A safety net on each wait for a state.
const PATIENCE: Duration = Duration::from_secs(120);
/// Seed of the choice of actors to panic.
const SEED: u64 = 20_260_516;

/// The child process that runs the churn ([`churn_helper`], an ignored
/// test the soak test runs) reads the node's address here.
const CHURN_ENV: &str = "SOAK_CHURN";
/// Seconds the churn spreads its identities over.
const CHURN_SECONDS_ENV: &str = "SOAK_CHURN_SECONDS";
/// Where the churn writes its tally.
const CHURN_OUT_ENV: &str = "SOAK_CHURN_OUT";
/// The child process that writes the validators' history
/// ([`history_helper`], an ignored test the soak test runs) reads the
/// genesis directory here, and the store's path in the next.
const HISTORY_ENV: &str = "SOAK_HISTORY";
const HISTORY_STORE_ENV: &str = "SOAK_HISTORY_STORE";
/// Time allowed to connect, and for each call of a churn identity.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// The address churn identities advertise: nothing listens on port 1, so
/// the node's dials to them fail at once.
const ADVERTISED: &str = "127.0.0.1:1";

/// Bytes allocated in this process and not yet freed: the heap the node
/// holds, beside what the allocator keeps resident after frees. It tells
/// a leak (the heap grows) from freed memory the allocator keeps (only
/// the resident memory grows); it is reported, not judged.
static LIVE_HEAP: AtomicU64 = AtomicU64::new(0);

/// The system allocator, counting [`LIVE_HEAP`].
struct Counting;

// SAFETY: every call goes to the system allocator unchanged; the counter
// only adds and subtracts the sizes of the blocks it returns and frees.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's guarantees, passed on.
        let block = unsafe { System.alloc(layout) };
        if !block.is_null() {
            LIVE_HEAP.fetch_add(layout.size() as u64, Ordering::Relaxed);
        }
        block
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's guarantees, passed on.
        let block = unsafe { System.alloc_zeroed(layout) };
        if !block.is_null() {
            LIVE_HEAP.fetch_add(layout.size() as u64, Ordering::Relaxed);
        }
        block
    }

    unsafe fn dealloc(&self, block: *mut u8, layout: Layout) {
        // SAFETY: the caller's guarantees, passed on.
        unsafe { System.dealloc(block, layout) };
        LIVE_HEAP.fetch_sub(layout.size() as u64, Ordering::Relaxed);
    }

    unsafe fn realloc(&self, block: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller's guarantees, passed on.
        let moved = unsafe { System.realloc(block, layout, new_size) };
        if !moved.is_null() {
            LIVE_HEAP.fetch_add(new_size as u64, Ordering::Relaxed);
            LIVE_HEAP.fetch_sub(layout.size() as u64, Ordering::Relaxed);
        }
        moved
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// The run's length, warm-up and sample interval.
#[derive(Clone, Copy, Debug)]
struct Plan {
    duration: Duration,
    warm_up: Duration,
    interval: Duration,
}

impl Plan {
    /// From `SOAK_SECONDS`; a value that is not a whole number of seconds
    /// of at least [`MIN_SECONDS`] is refused.
    fn from_env() -> Plan {
        let seconds = match std::env::var("SOAK_SECONDS") {
            Err(_) => DEFAULT_SECONDS,
            Ok(text) => match text.trim().parse::<u64>() {
                Ok(s) if s >= MIN_SECONDS => s,
                _ => panic!(
                    "SOAK_SECONDS must be a whole number of seconds, at least {MIN_SECONDS}; got {text:?}"
                ),
            },
        };
        let duration = Duration::from_secs(seconds);
        Plan {
            duration,
            warm_up: Duration::from_secs(60).min(duration / 3),
            interval: Duration::from_secs(10).min(duration / 12),
        }
    }
}

/// One sample of the node.
#[derive(Clone, Debug)]
struct Sample {
    /// Seconds since the node started.
    t: f64,
    rss_bytes: u64,
    /// Of `rss_bytes`, anonymous memory (heap, stacks), and pages of files
    /// (the binary's code, faulted in as new paths run).
    rss_anon_bytes: u64,
    rss_file_bytes: u64,
    /// See [`LIVE_HEAP`].
    heap_bytes: u64,
    fds: u64,
    threads: u64,
    tracked_peers: u64,
    known_peers: u64,
    store_bytes: u64,
    synced: u64,
    /// The highest commit known among the node's peers.
    highest_known: u64,
    /// The validators' highest commit, asked of them right after the
    /// node's sample.
    tip: u64,
    executed: u64,
}

impl Sample {
    /// How far the node is behind the validators. Their own answer, not
    /// the node's `highest_known`: a node that has lost its peers knows of
    /// no higher commit and would show no lag while it stalls.
    fn sync_lag(&self) -> u64 {
        self.tip.saturating_sub(self.synced)
    }
}

/// The warm-up after which resident memory is judged.
const RSS_SETTLES: Duration = Duration::from_secs(60);

/// A series held to [`FLAT`] times its reference: its first post-warm-up
/// sample plus `headroom`, or `floor` if that is more.
struct Flat {
    name: &'static str,
    value: fn(&Sample) -> u64,
    /// What the node holds on behalf of the churn at most, which a sample
    /// may catch all or none of.
    headroom: f64,
    /// The least the reference is.
    floor: f64,
}

const FLAT_SERIES: [Flat; 5] = [
    Flat {
        name: "rss",
        value: |s| s.rss_bytes,
        headroom: 0.0,
        floor: 0.0,
    },
    Flat {
        name: "fds",
        value: |s| s.fds,
        // A descriptor for each churn connection open at once.
        headroom: CHURN_CONCURRENCY as f64,
        floor: 0.0,
    },
    Flat {
        name: "threads",
        value: |s| s.threads,
        headroom: 0.0,
        floor: 0.0,
    },
    Flat {
        name: "tracked peers",
        value: |s| s.tracked_peers,
        headroom: 0.0,
        floor: PEER_FLOOR,
    },
    Flat {
        name: "known peers",
        value: |s| s.known_peers,
        headroom: 0.0,
        floor: PEER_FLOOR,
    },
];

/// A `Name:   value kB` field of `/proc/self/status`.
fn proc_status(field: &str) -> u64 {
    let status = fs::read_to_string("/proc/self/status").expect("/proc is mounted");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("/proc/self/status has no {field}"))
}

/// Open file descriptors: the least of [`FD_READS`] reads 100 ms apart.
/// Churn connections, failed dials and `soma-p2p status` pipes each hold
/// one for milliseconds; a leaked descriptor stays in every read.
fn open_fds() -> u64 {
    let read = || {
        fs::read_dir("/proc/self/fd")
            .expect("/proc is mounted")
            .count() as u64
    };
    let mut least = read();
    for _ in 1..FD_READS {
        // The reads' spacing: a measurement window, not a wait.
        std::thread::sleep(Duration::from_millis(100));
        least = least.min(read());
    }
    least
}

/// Reads of the descriptors per sample.
const FD_READS: usize = 5;

/// Asks the node, again if an armed panic hit this very call: the actor
/// that panicked drops the request it was handling, and a client asks
/// again.
async fn ask<T, F: std::future::Future<Output = Result<T, P2pError>>>(
    what: &str,
    call: impl Fn() -> F,
) -> Result<T, String> {
    let mut last = None;
    for _ in 0..3 {
        match call().await {
            Ok(v) => return Ok(v),
            Err(e) => last = Some(e),
        }
    }
    Err(format!("{what}: {}", last.expect("three tries")))
}

/// What the sampler needs to reach.
struct Sampled<'a> {
    node: &'a P2pHandle,
    runtime: &'a tokio::runtime::Runtime,
    store_path: &'a Path,
    executed: &'a AtomicU64,
    validators: &'a [String],
}

impl Sampled<'_> {
    /// One sample: the process first, then the node, the store and the
    /// executor, then the validators' tip.
    fn sample(&self, t: f64) -> Result<Sample, String> {
        let (rss_bytes, rss_anon_bytes, rss_file_bytes) = (
            proc_status("VmRSS") * 1024,
            proc_status("RssAnon") * 1024,
            proc_status("RssFile") * 1024,
        );
        let (heap_bytes, fds, threads) = (
            LIVE_HEAP.load(Ordering::Relaxed),
            open_fds(),
            proc_status("Threads"),
        );
        let node = self.node;
        let (status, tracked, known) = self.runtime.block_on(async {
            Ok::<_, String>((
                ask("sync status", || node.sync_status()).await?,
                ask("peer heights", || node.peer_heights()).await?,
                ask("known peers", || node.known_peers()).await?,
            ))
        })?;
        Ok(Sample {
            t,
            rss_bytes,
            rss_anon_bytes,
            rss_file_bytes,
            heap_bytes,
            fds,
            threads,
            tracked_peers: tracked.len() as u64,
            known_peers: known.len() as u64,
            store_bytes: fs::metadata(self.store_path).map_or(0, |m| m.len()),
            synced: status.synced,
            highest_known: status.highest_known,
            executed: self.executed.load(Ordering::SeqCst),
            tip: network_tip(self.validators),
        })
    }
}

/// The node's registered executor: every commit from 1 on, once, in
/// order; sync stays within [`MAX_LEAD_OVER_EXECUTION`] of it and pruning
/// never passes it.
struct Executor {
    commits: CommitStream,
}

impl Executor {
    fn register(node: &P2pHandle) -> Executor {
        Executor {
            commits: node
                .subscribe_executor_from(1)
                .expect("the one executor registers"),
        }
    }

    /// The next commit; `None` once the node has stopped (or the stream
    /// failed, which the ledger then shows as missing commits).
    async fn next_commit(&mut self) -> Option<CommittedSubDag> {
        self.commits.next().await.ok()
    }
}

/// What the executor received: each commit once, in order, from commit 1,
/// is what it must see; anything else is recorded (and bounded: the run
/// must not grow the test's own memory).
#[derive(Debug)]
struct Ledger {
    /// The index the next commit must have.
    next: u64,
    executed: u64,
    /// Commits received again, or out of order.
    duplicates: u64,
    /// Ranges of commits never received: the first few, and how many.
    gaps: Vec<(u64, u64)>,
    gap_count: u64,
    /// Bytes of the blocks of the commits executed.
    block_bytes: u64,
}

impl Default for Ledger {
    fn default() -> Self {
        Ledger {
            next: 1,
            executed: 0,
            duplicates: 0,
            gaps: Vec::new(),
            gap_count: 0,
            block_bytes: 0,
        }
    }
}

impl Ledger {
    fn record(&mut self, commit: &CommittedSubDag) {
        let index = commit.commit_ref.index;
        if index < self.next {
            self.duplicates += 1;
            return;
        }
        if index > self.next {
            self.gap_count += 1;
            if self.gaps.len() < 8 {
                self.gaps.push((self.next, index - 1));
            }
        }
        self.next = index + 1;
        self.executed += 1;
        self.block_bytes += commit
            .blocks
            .iter()
            .map(|b| b.serialized().len() as u64)
            .sum::<u64>();
    }

    fn exactly_once(&self) -> bool {
        self.duplicates == 0 && self.gap_count == 0 && self.executed + 1 == self.next
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Runs the executor until the node stops: each commit takes
/// [`EXECUTION_TIME`] of work, then is recorded.
async fn execute(mut executor: Executor, ledger: Arc<Mutex<Ledger>>, position: Arc<AtomicU64>) {
    while let Some(commit) = executor.next_commit().await {
        // The work itself, simulated: a fixed time per commit.
        tokio::time::sleep(EXECUTION_TIME).await;
        let index = commit.commit_ref.index;
        lock(&ledger).record(&commit);
        position.store(index, Ordering::SeqCst);
    }
}

/// Once `begin` is set, each time the executor has passed [`PANIC_EVERY`]
/// more commits, arms a panic in the next input of an actor chosen at
/// random; returns the panics armed, as (executor position, actor).
async fn inject_panics(
    faults: Arc<FaultPlan>,
    position: Arc<AtomicU64>,
    begin: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
) -> Vec<(u64, &'static str)> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(SEED);
    let mut armed = Vec::new();
    let mut next = None;
    while !stop.load(Ordering::SeqCst) {
        let at = position.load(Ordering::SeqCst);
        match next {
            None if begin.load(Ordering::SeqCst) => next = Some(at + PANIC_EVERY / 2),
            Some(n) if at >= n => {
                let actor = ACTORS[rng.random_range(0..ACTORS.len())];
                faults.panic_actor(actor, 1);
                armed.push((at, actor));
                next = Some(n + PANIC_EVERY);
            }
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    armed
}
/// The validators: genesis, configuration and process of each.
struct Validators {
    addresses: Vec<String>,
    configs: Vec<PathBuf>,
    logs: Vec<PathBuf>,
    processes: Vec<Spawned>,
    committee: soma_types::Committee,
}

fn run_validator(config: &Path, log: &Path) -> Spawned {
    run_node_with(config, log, &["--commit-rate", &COMMIT_RATE.to_string()])
}

fn log_tail(log: &Path) -> String {
    let text = fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

impl Validators {
    /// A local network of [`VALIDATORS`], each seeded with the others and
    /// holding [`HISTORY`], producing; returns once each serves past it.
    fn start(dir: &Path) -> Validators {
        let base = free_ports(VALIDATORS);
        let genesis = local_genesis(dir, VALIDATORS, base, COMMITS_PER_EPOCH);
        let committee = genesis_committee(&genesis);
        // Each validator's producer skips the commits its store holds.
        let first = dir.join("validator-0/data/chain.redb");
        write_history(dir, &first);
        for i in 1..VALIDATORS {
            let store = dir.join(format!("validator-{i}/data/chain.redb"));
            fs::create_dir_all(store.parent().expect("a directory")).unwrap();
            fs::copy(&first, &store).unwrap();
        }
        let (addresses, configs, logs) = validator_network(dir, base, VALIDATORS);
        let processes = configs
            .iter()
            .zip(&logs)
            .map(|(c, l)| run_validator(c, l))
            .collect();
        let validators = Validators {
            addresses,
            configs,
            logs,
            processes,
            committee,
        };
        for i in 0..validators.addresses.len() {
            validators.wait_serving(i, HISTORY + 1);
        }
        validators
    }

    /// Waits until validator `i` serves commit `index`.
    fn wait_serving(&self, i: usize, index: u64) {
        wait_or_report(
            &format!("validator {i} to serve commit {index}"),
            PATIENCE,
            || height(&self.addresses[i]).is_some_and(|h| h >= index),
            || log_tail(&self.logs[i]),
        );
    }

    /// Kills validator `i` with SIGKILL, restarts it on its store, and
    /// waits until it serves again, caught up with where another
    /// validator was when it restarted. Returns the time that took.
    fn restart(&mut self, i: usize) -> Duration {
        let started = Instant::now();
        kill(self.processes[i].pid(), Signal::SIGKILL).expect("the validator is signalled");
        self.processes[i]
            .wait_for(PATIENCE)
            .expect("a killed validator exits");
        let other = (i + 1) % self.addresses.len();
        let reached = height(&self.addresses[other]).unwrap_or(0);
        self.processes[i] = run_validator(&self.configs[i], &self.logs[i]);
        self.wait_serving(i, reached);
        started.elapsed()
    }
}

/// This test's binary again, running only the test `name` (a helper that
/// does its work when its variable is set), its output in `log`: work
/// that must not weigh on the measured process.
fn helper(name: &str, log: &Path) -> Command {
    let exe = std::env::current_exe().expect("the test binary's path");
    let stdout = fs::File::create(log).expect("the helper's log opens");
    let stderr = stdout.try_clone().expect("the helper's log opens");
    let mut command = Command::new(exe);
    command
        .args([
            name,
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .stdout(stdout)
        .stderr(stderr);
    command
}

/// Writes [`HISTORY`] of the genesis in `dir` into the store at `store`,
/// in a child process ([`history_helper`]): the chain built in memory
/// would stay in the measured process's heap.
fn write_history(dir: &Path, store: &Path) {
    let log = dir.join("history.log");
    let mut process = Spawned::spawn(
        helper("history_helper", &log)
            .env(HISTORY_ENV, dir)
            .env(HISTORY_STORE_ENV, store),
    );
    let status = process
        .wait_for(PATIENCE)
        .unwrap_or_else(|| panic!("the history was not written\n{}", log_tail(&log)));
    assert!(
        status.success(),
        "writing the history failed: {status}\n{}",
        log_tail(&log)
    );
}

/// With `SOAK_HISTORY` set to a directory holding `genesis.toml`, writes
/// its first [`HISTORY`] commits into the store named by
/// `SOAK_HISTORY_STORE`; otherwise does nothing.
#[test]
#[ignore = "a helper the soak test runs in a child process"]
fn history_helper() {
    let dir = std::env::var(HISTORY_ENV).expect("SOAK_HISTORY names the genesis's directory");
    let store = std::env::var(HISTORY_STORE_ENV).expect("the store's path is given");
    let genesis = Path::new(&dir).join("genesis.toml");
    let chain = ChainBuilder::new(chain_config(&genesis)).build(HISTORY);
    hold(
        Path::new(&store),
        &genesis_committee(&genesis),
        &chain,
        1..=HISTORY,
    );
}

/// The churn, running in a child process ([`churn_helper`]).
struct Churn {
    process: Spawned,
    out: PathBuf,
    log: PathBuf,
}

impl Churn {
    fn start(dir: &Path, address: &str, seconds: u64) -> Churn {
        let out = dir.join("churn.tally");
        let log = dir.join("churn.log");
        let process = Spawned::spawn(
            helper("churn_helper", &log)
                .env(CHURN_ENV, address)
                .env(CHURN_SECONDS_ENV, seconds.to_string())
                .env(CHURN_OUT_ENV, &out),
        );
        Churn { process, out, log }
    }

    /// Waits for the churn to end; returns its tally.
    fn finish(mut self) -> BTreeMap<String, u64> {
        let status = self
            .process
            .wait_for(PATIENCE)
            .unwrap_or_else(|| panic!("the churn did not end\n{}", log_tail(&self.log)));
        assert!(
            status.success(),
            "the churn failed: {status}\n{}",
            log_tail(&self.log)
        );
        read_tally(&self.out)
    }
}

/// The churn's tally: `key\tcount` lines.
fn read_tally(path: &Path) -> BTreeMap<String, u64> {
    let text = fs::read_to_string(path).expect("the churn wrote its tally");
    text.lines()
        .filter_map(|l| {
            let (key, value) = l.rsplit_once('\t')?;
            Some((key.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// Commits the store may hold at once: [`RETENTION_COMMITS`] below the
/// executor, what sync may have applied ahead of it, and those executed
/// since the last pruning pass.
const RETAINED_COMMITS: u64 = RETENTION_COMMITS + MAX_LEAD_OVER_EXECUTION + PRUNE_EVERY;

/// The most the store file may take: what it took when opened (redb's
/// header and allocator, the genesis) and [`STORE_SLACK`] times the bytes
/// of the blocks of [`RETAINED_COMMITS`], the file grown by
/// [`REDB_GROWTH`] to hold them.
fn store_bound(opened_bytes: u64, bytes_per_commit: u64) -> u64 {
    REDB_GROWTH * (opened_bytes + STORE_SLACK * RETAINED_COMMITS * bytes_per_commit)
}

/// The highest commit any validator serves; 0 if none answers.
fn network_tip(addresses: &[String]) -> u64 {
    addresses
        .iter()
        .filter_map(|a| height(a))
        .max()
        .unwrap_or(0)
}

#[test]
fn soak_node_stays_flat() {
    soma_testkit::init_tracing();
    // Panics print their message and place, never a backtrace: resolving
    // one (RUST_BACKTRACE) loads the binary's debug info into the measured
    // process, tens of MiB that are not the node's. The supervisor logs
    // each injected panic as the actor's failure.
    std::panic::set_hook(Box::new(|info| eprintln!("{info}")));
    let plan = Plan::from_env();
    let results = results_dir();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    println!(
        "soak: {} s, warm-up {} s, a sample every {} s; network in {}",
        plan.duration.as_secs(),
        plan.warm_up.as_secs_f64(),
        plan.interval.as_secs_f64(),
        d.display()
    );
    let mut validators = Validators::start(d);

    // The node is embedded the way `soma-p2p run` embeds it: on the
    // process's multi-threaded runtime.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let store_path = d.join("node/chain.redb");
    fs::create_dir_all(store_path.parent().unwrap()).unwrap();
    let store: Arc<dyn ConsensusStore> =
        Arc::new(RedbStore::open(&store_path, &validators.committee).unwrap());
    let opened_bytes = fs::metadata(&store_path).unwrap().len();
    let faults = Arc::new(FaultPlan::default());
    let config = P2pConfig {
        seed_peers: validators
            .addresses
            .iter()
            .map(|a| SeedPeer {
                peer_id: None,
                address: a.clone(),
            })
            .collect(),
        // Every injected panic is a restart, never the node's end.
        supervision: supervisor::Config {
            max_restarts: 1_000,
            restart_window_ms: 60_000,
        },
        faults: Some(faults.clone()),
        prune: prune::Config {
            retention: Retention::Commits(RETENTION_COMMITS),
            interval_ms: PRUNE_INTERVAL.as_millis() as u64,
            grace_ms: PRUNE_GRACE.as_millis() as u64,
            ..prune::Config::default()
        },
        ..P2pConfig::default()
    };
    let mut config = config;
    config.state_sync.max_lead_over_execution = MAX_LEAD_OVER_EXECUTION;
    let node = P2pBuilder::new(
        config,
        KeyPair::generate(),
        validators.committee.clone(),
        store.clone(),
    )
    .runtime(runtime.handle().clone())
    .start()
    .expect("the node starts");
    let started = Instant::now();
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let position = Arc::new(AtomicU64::new(0));
    runtime.spawn(execute(
        Executor::register(&node),
        ledger.clone(),
        position.clone(),
    ));
    let (begin, stop) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    let injector = runtime.spawn(inject_panics(
        faults.clone(),
        position.clone(),
        begin.clone(),
        stop.clone(),
    ));
    let churn = Churn::start(d, &node.local_addr().to_string(), plan.duration.as_secs());

    let addresses = validators.addresses.clone();
    // Validators are restarted on a thread of their own, on schedule,
    // while the samples are taken.
    let restarter = std::thread::spawn(move || {
        let mut restarts = Vec::new();
        for (k, at) in VALIDATOR_RESTARTS.iter().enumerate() {
            let when = started + plan.duration.mul_f64(*at);
            std::thread::sleep(when.saturating_duration_since(Instant::now()));
            let i = 1 + k % (VALIDATORS as usize - 1);
            let took = validators.restart(i);
            restarts.push((started.elapsed().as_secs_f64(), i, took));
        }
        (validators, restarts)
    });

    let sampled = Sampled {
        node: &node,
        runtime: &runtime,
        store_path: &store_path,
        executed: &position,
        validators: &addresses,
    };
    println!("{}", header());
    let mut samples = Vec::new();
    let mut errors = Vec::new();
    let mut k = 1;
    while plan.interval * k <= plan.duration {
        // The schedule of the samples, not a wait for a state.
        std::thread::sleep((started + plan.interval * k).saturating_duration_since(Instant::now()));
        let t = started.elapsed().as_secs_f64();
        match sampled.sample(t) {
            Ok(s) => {
                if s.t >= plan.warm_up.as_secs_f64() {
                    begin.store(true, Ordering::SeqCst);
                }
                println!("{}", row(&s));
                samples.push(s);
            }
            Err(e) => errors.push(format!("sample at {t:.0} s: {e}")),
        }
        k += 1;
    }

    let tally = churn.finish();
    let (validators, restarts) = restarter.join().expect("the restarts ran");
    stop.store(true, Ordering::SeqCst);
    let armed = runtime.block_on(injector).expect("the injector ran");
    // The executor catches up with everything the node has synced.
    let synced = match runtime.block_on(node.sync_status()) {
        Ok(status) => status.synced,
        Err(e) => {
            errors.push(format!("sync status at the end: {e}"));
            0
        }
    };
    let deadline = Instant::now() + PATIENCE;
    while position.load(Ordering::SeqCst) < synced && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let health = node.health();
    let rpcs = node.rpc_counts();
    runtime.block_on(node.shutdown());
    drop(validators);
    let ledger = lock(&ledger);
    let injected: Vec<(&str, u64, u64)> = ACTORS
        .iter()
        .map(|a| {
            let restarts = health
                .actors
                .iter()
                .find(|h| h.name == *a)
                .map_or(0, |h| h.restarts);
            (*a, faults.injected(a), restarts)
        })
        .collect();

    let bytes_per_commit = ledger.block_bytes / ledger.executed.max(1);
    let verdict = judge(&plan, &samples, store_bound(opened_bytes, bytes_per_commit));
    let mut summary = String::new();
    let _ = writeln!(
        summary,
        "run {} s, warm-up {} s, interval {} s, {} samples ({} after the warm-up)",
        plan.duration.as_secs(),
        plan.warm_up.as_secs_f64(),
        plan.interval.as_secs_f64(),
        samples.len(),
        verdict.after_warm_up
    );
    let _ = writeln!(summary, "{}", verdict.text);
    let _ = writeln!(
        summary,
        "store bound: {REDB_GROWTH} × ({opened_bytes} bytes opened + {STORE_SLACK} × {RETAINED_COMMITS} commits × {bytes_per_commit} block bytes)"
    );
    let _ = writeln!(
        summary,
        "executor: {} commits executed, up to {}, {} duplicates, {} gaps {:?}; {} block bytes per commit",
        ledger.executed,
        ledger.next - 1,
        ledger.duplicates,
        ledger.gap_count,
        ledger.gaps,
        bytes_per_commit
    );
    let _ = writeln!(
        summary,
        "validator restarts (at s, validator, took): {restarts:.1?}"
    );
    let _ = writeln!(
        summary,
        "panics armed (executor position, actor): {armed:?}"
    );
    let _ = writeln!(
        summary,
        "panics injected / restarts per actor: {injected:?}"
    );
    let _ = writeln!(summary, "churn: {tally:?}");
    let mut rpcs: Vec<String> = rpcs
        .iter()
        .map(|(m, c, n)| format!("{m} {c:?} {n}"))
        .collect();
    rpcs.sort();
    let _ = writeln!(summary, "rpcs served: {}", rpcs.join(", "));
    let _ = writeln!(summary, "health: {health:?}");

    let mut failures = errors;
    if verdict.after_warm_up < 2 {
        failures.push(format!(
            "{} samples after the warm-up, too few",
            verdict.after_warm_up
        ));
    }
    failures.extend(verdict.failures.iter().cloned());
    if !ledger.exactly_once() {
        failures.push(format!(
            "the executor did not receive every commit exactly once: {} duplicates, {} gaps {:?}",
            ledger.duplicates, ledger.gap_count, ledger.gaps
        ));
    }
    if ledger.next <= synced {
        failures.push(format!(
            "the executor stopped at {} of the {synced} commits synced",
            ledger.next - 1
        ));
    }
    if !health.is_healthy() {
        failures.push(format!("the node is not healthy: {health:?}"));
    }
    if injected.iter().all(|(_, injected, _)| *injected == 0) {
        failures.push(format!("no armed panic was injected: {armed:?}"));
    }
    for (actor, injected, restarts) in &injected {
        if injected != restarts {
            failures.push(format!(
                "{actor}: {injected} panics injected but {restarts} restarts"
            ));
        }
    }
    if restarts.len() != VALIDATOR_RESTARTS.len() {
        failures.push(format!("validator restarts: {restarts:?}"));
    }
    if tally.get("identities").copied() != Some(IDENTITIES as u64) {
        failures.push(format!("not every churn identity called: {tally:?}"));
    }
    for rpc in RPCS {
        if tally.get(&format!("{rpc} Ok")).copied().unwrap_or(0) == 0 {
            failures.push(format!("the node never answered {rpc} to the churn"));
        }
    }
    if failures.is_empty() {
        let _ = writeln!(summary, "result: pass");
    } else {
        let _ = writeln!(summary, "result: FAIL\n{}", failures.join("\n"));
    }

    println!("\n{}", header());
    for s in &samples {
        println!("{}", row(s));
    }
    println!("\n{summary}");
    write_results(&results, &plan, &samples, &summary, &verdict);
    println!("results in {}", results.display());
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Where the results go: `soak/` in the target directory.
fn results_dir() -> PathBuf {
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let dir = tmp.parent().unwrap_or(tmp).join("soak");
    fs::create_dir_all(&dir).expect("the results directory is made");
    dir
}

fn header() -> String {
    format!(
        "{:>6} {:>9} {:>9} {:>9} {:>5} {:>7} {:>7} {:>5} {:>9} {:>7} {:>5} {:>8}",
        "t s",
        "rss MiB",
        "anon MiB",
        "heap MiB",
        "fds",
        "threads",
        "tracked",
        "known",
        "store KiB",
        "synced",
        "lag",
        "executed"
    )
}

fn row(s: &Sample) -> String {
    format!(
        "{:>6.0} {:>9.1} {:>9.1} {:>9.1} {:>5} {:>7} {:>7} {:>5} {:>9} {:>7} {:>5} {:>8}",
        s.t,
        s.rss_bytes as f64 / (1 << 20) as f64,
        s.rss_anon_bytes as f64 / (1 << 20) as f64,
        s.heap_bytes as f64 / (1 << 20) as f64,
        s.fds,
        s.threads,
        s.tracked_peers,
        s.known_peers,
        s.store_bytes / 1024,
        s.synced,
        s.sync_lag(),
        s.executed
    )
}

/// The pass criteria on the samples.
struct Verdict {
    after_warm_up: usize,
    /// Each criterion broken, with the sample that broke it.
    failures: Vec<String>,
    /// What each criterion allowed and what it saw.
    text: String,
    /// Each flat series' reference (see [`Flat`]).
    baselines: Vec<f64>,
    store_bound: u64,
}

fn judge(plan: &Plan, samples: &[Sample], bound: u64) -> Verdict {
    let warm_up = plan.warm_up.as_secs_f64();
    // Sample times drift a little late of the schedule, never early.
    let after: Vec<&Sample> = samples.iter().filter(|s| s.t >= warm_up).collect();
    let mut failures = Vec::new();
    let mut text = String::new();
    let mut baselines = Vec::new();
    for Flat {
        name,
        value,
        headroom,
        floor,
    } in FLAT_SERIES
    {
        let Some(first) = after.first() else { break };
        let baseline = (value(first) as f64 + headroom).max(floor);
        baselines.push(baseline);
        let worst = after.iter().map(|s| value(s)).max().unwrap_or(0);
        // Resident memory settles only after the first minute: before,
        // the allocator keeps pages of the start's catch-ups (the live heap
        // stays flat). A run whose warm-up is shorter reports it only.
        let judged = name != "rss" || plan.warm_up >= RSS_SETTLES;
        let _ = writeln!(
            text,
            "{name}: first after warm-up {}, reference {baseline}, most {worst} ({:.3}×, limit {FLAT}×){}",
            value(first),
            worst as f64 / baseline,
            if judged {
                ""
            } else {
                " (reported, not judged: warm-up under a minute)"
            }
        );
        for s in after.iter().filter(|_| judged) {
            if value(s) as f64 > FLAT * baseline {
                failures.push(format!(
                    "{name} at {:.0} s is {}, over {FLAT} × {baseline}",
                    s.t,
                    value(s)
                ));
            }
        }
    }
    if let Some(first) = after.first() {
        let worst = after.iter().map(|s| s.heap_bytes).max().unwrap_or(0);
        let _ = writeln!(
            text,
            "live heap (reported, not judged): first after warm-up {}, most {worst} ({:.3}×)",
            first.heap_bytes,
            worst as f64 / first.heap_bytes.max(1) as f64
        );
    }
    let worst_store = after.iter().map(|s| s.store_bytes).max().unwrap_or(0);
    let _ = writeln!(
        text,
        "store: most {worst_store} bytes, retention bound {bound} ({:.2}×)",
        worst_store as f64 / bound.max(1) as f64
    );
    let worst_lag = after.iter().map(|s| s.sync_lag()).max().unwrap_or(0);
    let _ = writeln!(
        text,
        "sync lag: most {worst_lag} commits, bound {SYNC_LAG_BOUND}"
    );
    for s in &after {
        if s.store_bytes > bound {
            failures.push(format!(
                "store at {:.0} s is {} bytes, over the retention bound {bound}",
                s.t, s.store_bytes
            ));
        }
        if s.sync_lag() > SYNC_LAG_BOUND {
            failures.push(format!(
                "sync lag at {:.0} s is {}, over {SYNC_LAG_BOUND}",
                s.t,
                s.sync_lag()
            ));
        }
    }
    Verdict {
        after_warm_up: after.len(),
        failures,
        text,
        baselines,
        store_bound: bound,
    }
}

fn write_results(dir: &Path, plan: &Plan, samples: &[Sample], summary: &str, verdict: &Verdict) {
    let mut csv = String::from(
        "t_s,rss_bytes,rss_anon_bytes,rss_file_bytes,heap_bytes,fds,threads,tracked_peers,known_peers,store_bytes,synced,highest_known,tip,sync_lag,executed\n",
    );
    for s in samples {
        let _ = writeln!(
            csv,
            "{:.1},{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
            s.t,
            s.rss_bytes,
            s.rss_anon_bytes,
            s.rss_file_bytes,
            s.heap_bytes,
            s.fds,
            s.threads,
            s.tracked_peers,
            s.known_peers,
            s.store_bytes,
            s.synced,
            s.highest_known,
            s.tip,
            s.sync_lag(),
            s.executed
        );
    }
    fs::write(dir.join("samples.csv"), csv).expect("samples.csv is written");
    fs::write(dir.join("summary.txt"), summary).expect("summary.txt is written");
    if let Err(e) = plot(&dir.join("samples.svg"), plan, samples, verdict) {
        panic!("samples.svg: {e}");
    }
}

/// Plots each flat series over its reference, and the store and the sync
/// lag over their bounds, with the two limits and the warm-up's end.
fn plot(
    path: &Path,
    plan: &Plan,
    samples: &[Sample],
    verdict: &Verdict,
) -> Result<(), Box<dyn std::error::Error>> {
    use plotters::prelude::*;

    let mut series: Vec<(String, Vec<(f64, f64)>)> = FLAT_SERIES
        .iter()
        .zip(&verdict.baselines)
        .map(|(Flat { name, value, .. }, baseline)| {
            let points = samples
                .iter()
                .map(|s| (s.t, value(s) as f64 / baseline))
                .collect();
            (format!("{name} / first after warm-up"), points)
        })
        .collect();
    let warm_up = plan.warm_up.as_secs_f64();
    if let Some(first) = samples.iter().find(|s| s.t >= warm_up) {
        let heap = first.heap_bytes.max(1) as f64;
        series.push((
            "live heap / first after warm-up (not judged)".to_owned(),
            samples
                .iter()
                .map(|s| (s.t, s.heap_bytes as f64 / heap))
                .collect(),
        ));
    }
    let bound = verdict.store_bound.max(1) as f64;
    series.push((
        "store / retention bound".to_owned(),
        samples
            .iter()
            .map(|s| (s.t, s.store_bytes as f64 / bound))
            .collect(),
    ));
    series.push((
        "sync lag / its bound".to_owned(),
        samples
            .iter()
            .map(|s| (s.t, s.sync_lag() as f64 / SYNC_LAG_BOUND as f64))
            .collect(),
    ));
    let colors = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(23, 190, 207),
        RGBColor(188, 189, 34),
        RGBColor(227, 119, 194),
    ];
    let t_max = samples.last().map_or(1.0, |s| s.t).max(1.0);
    // Room above the 1.2 line for the legend.
    let y_max = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|(_, y)| *y * 1.1))
        .fold(1.9_f64, f64::max)
        .min(5.0);

    let root = SVGBackend::new(path, (1100, 650)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("soak: the node's samples over time", ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0.0..t_max, 0.0..y_max)?;
    chart
        .configure_mesh()
        .x_desc("seconds since the node started")
        .y_desc("ratio")
        .draw()?;
    for ((name, points), color) in series.into_iter().zip(colors.iter().cycle()) {
        let color = *color;
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))?
            .label(name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    let limits = [
        (FLAT, "limit of the flat series (1.2)", RED),
        (1.0, "limit of store and sync lag (1.0)", BLACK),
    ];
    for (level, label, color) in limits {
        chart
            .draw_series(DashedLineSeries::new(
                vec![(0.0, level), (t_max, level)],
                8,
                5,
                color.into(),
            ))?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart
        .draw_series(DashedLineSeries::new(
            vec![(warm_up, 0.0), (warm_up, y_max)],
            3,
            4,
            BLACK.mix(0.6).into(),
        ))?
        .label("end of the warm-up")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK.mix(0.6)));
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()?;
    root.present()?;
    Ok(())
}

/// The RPCs of the `P2p` service, as the churn's tally names them.
const RPCS: [&str; 6] = [
    "GetCommitAvailability",
    "GetCommitInfo",
    "FetchCommits",
    "FetchBlocks",
    "GetKnownPeers",
    "PushCommit",
];

/// The churn, when run by [`soak_node_stays_flat`] in a child process
/// (with `SOAK_CHURN` set; otherwise it does nothing): [`IDENTITIES`]
/// callers, started evenly over `SOAK_CHURN_SECONDS`, at most
/// [`CHURN_CONCURRENCY`] at once. Even-numbered callers authenticate with
/// an identity of their own, odd-numbered ones are anonymous. Each
/// connects, calls every RPC, and disconnects; the node's refusals are
/// expected and counted.
#[test]
#[ignore = "a helper the soak test runs in a child process"]
fn churn_helper() {
    let address = std::env::var(CHURN_ENV).expect("the churn's target address is given");
    let seconds: u64 = std::env::var(CHURN_SECONDS_ENV)
        .expect("the churn's length is given")
        .parse()
        .expect("the churn's length is a number of seconds");
    let out = std::env::var(CHURN_OUT_ENV).expect("the churn's tally path is given");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let tally = Arc::new(Tally::default());
    runtime.block_on(async {
        let slots = Arc::new(tokio::sync::Semaphore::new(CHURN_CONCURRENCY));
        let mut callers = tokio::task::JoinSet::new();
        let spacing = Duration::from_secs(seconds) / IDENTITIES as u32;
        let mut pace = tokio::time::interval(spacing);
        for i in 0..IDENTITIES {
            pace.tick().await;
            let slot = slots.clone().acquire_owned().await.expect("never closed");
            let (address, counts) = (address.clone(), tally.clone());
            callers.spawn(async move {
                visit(&address, i, &counts).await;
                drop(slot);
            });
            tally.add("identities");
        }
        while callers.join_next().await.is_some() {}
    });
    let text: String = lock(&tally.counts)
        .iter()
        .map(|(k, v)| format!("{k}\t{v}\n"))
        .collect();
    fs::write(&out, text).expect("the tally is written");
}

/// Counts by key: `connected`, `connect failed`, `<RPC> <code>`.
#[derive(Default)]
struct Tally {
    counts: Mutex<BTreeMap<String, u64>>,
}

impl Tally {
    fn add(&self, key: &str) {
        *lock(&self.counts).entry(key.to_owned()).or_default() += 1;
    }

    fn call<T>(&self, rpc: &str, result: &Result<T, tonic::Status>) {
        let code = match result {
            Ok(_) => tonic::Code::Ok,
            Err(status) => status.code(),
        };
        self.add(&format!("{rpc} {code:?}"));
    }
}

/// `request`, with [`CALL_TIMEOUT`] to answer.
fn timed<T>(request: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(request);
    request.set_timeout(CALL_TIMEOUT);
    request
}

/// Churn caller `i`: connects, calls each RPC once, disconnects.
async fn visit(address: &str, i: usize, tally: &Tally) {
    let mut seed = [0x5A; 32];
    seed[..8].copy_from_slice(&(i as u64).to_le_bytes());
    let key = KeyPair::from_seed(seed);
    let identity = i
        .is_multiple_of(2)
        .then(|| NodeIdentity::generate(&key).expect("a fresh identity is valid"));
    let channel = match tls::connect(address, identity.as_ref(), None, CALL_TIMEOUT).await {
        Ok((channel, _)) => channel,
        Err(_) => {
            tally.add("connect failed");
            return;
        }
    };
    tally.add("connected");
    let mut client = P2pClient::new(channel).max_decoding_message_size(usize::MAX);
    let availability = client
        .get_commit_availability(timed(proto::GetCommitAvailabilityRequest {}))
        .await;
    tally.call("GetCommitAvailability", &availability);
    let (lowest, highest) = availability.map_or((1, 1), |a| {
        let a = a.into_inner();
        (a.lowest_available_commit.max(1), a.highest_synced_commit)
    });

    let info = client
        .get_commit_info(timed(proto::GetCommitInfoRequest {
            index: Some(highest),
        }))
        .await;
    tally.call("GetCommitInfo", &info);

    let commits = client
        .fetch_commits(timed(proto::FetchCommitsRequest {
            start: highest.saturating_sub(4).max(lowest),
            end: highest,
            ..Default::default()
        }))
        .await;
    tally.call("FetchCommits", &commits);
    let refs: Vec<proto::BlockRef> = commits
        .ok()
        .and_then(|c| c.into_inner().commits.into_iter().next())
        .and_then(|bytes| codec::decode::<Commit>(&bytes, codec::MAX_DECODE_BYTES).ok())
        .map(|c| c.blocks.into_iter().map(Into::into).collect())
        .unwrap_or_default();

    let blocks = async {
        let mut stream = client
            .fetch_blocks(timed(proto::FetchBlocksRequest {
                refs,
                ..Default::default()
            }))
            .await?
            .into_inner();
        let mut n = 0;
        while let Some(chunk) = stream.message().await? {
            n += chunk.blocks.len();
        }
        Ok::<usize, tonic::Status>(n)
    }
    .await;
    tally.call("FetchBlocks", &blocks);

    // Authenticated callers introduce themselves; anonymous ones cannot.
    let own_info = identity.as_ref().map_or_else(Vec::new, |_| {
        codec::encode(&soma_testkit::attack::signed_info(
            &key,
            ADVERTISED,
            soma_testkit::attack::now_ms(),
        ))
    });
    let known = client
        .get_known_peers(timed(proto::GetKnownPeersRequest {
            own_info: own_info.into(),
        }))
        .await;
    tally.call("GetKnownPeers", &known);

    let push = client
        .push_commit(timed(proto::PushCommitRequest { index: highest }))
        .await;
    tally.call("PushCommit", &push);
    // Dropping the client closes the connection.
}
