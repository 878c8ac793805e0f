//! Benchmark 8: catch-up among hostile peers, and memory under a flood.
//!
//! A fresh node catches up a chain of several epochs from 3 honest
//! validators plus one peer that lies in one way, all known from the
//! start; its time is set against the time from the 3 validators alone,
//! measured in the same rounds. Then a node in a child process (so its
//! peak RSS is its own) catches up with a fetch budget, once among honest
//! peers and once with a peer that floods maximal chunks of blocks nobody
//! asked for: the flood's growth of the peak is set against the budget.

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use soma_actors::discovery::SeedPeer;
use soma_actors::{P2pConfig, P2pHandle};
use soma_chain::{Chain, ChainBuilder, ChainConfig};
use soma_store::{ConsensusStore, MemStore, RedbStore};
use soma_testkit::byzantine::{self, FLOOD_BLOB_BYTES, Lie};
use soma_types::PeerId;

use crate::report::{Cell, Section};
use crate::{Size, runtime};

/// The hostile kinds, each with the label of its row.
const KINDS: [(Lie, &str); 14] = [
    (Lie::FutureEpoch, "commits of epoch u64::MAX"),
    (
        Lie::RetiredCommittee,
        "a retired committee extends its epoch",
    ),
    (
        Lie::FloodsBlocks,
        "endless maximal chunks of unasked blocks",
    ),
    (Lie::RepeatsBlocks, "every block sent twice"),
    (Lie::ClaimsHeight, "claims a million commits it lacks"),
    (
        Lie::ClaimsHeightRefusing(tonic::Code::ResourceExhausted),
        "claims a million commits, refuses every fetch as busy",
    ),
    (
        Lie::ClaimsHeightSilent,
        "claims a million commits, never answers a fetch",
    ),
    (
        Lie::ServesThenClaimsHeightBusy,
        "serves the chain, claims a million commits more, refuses those as busy",
    ),
    (Lie::NeverAnswers, "never answers a fetch"),
    (Lie::Slow, "honest, 1.5 s late"),
    (
        Lie::Creeping,
        "honest, each answer held as long as no other peer's beats it",
    ),
    (
        Lie::OneCommit,
        "honest, each commit fetch answered with one commit",
    ),
    (Lie::WrongBlock, "a block edited after signing"),
    (
        Lie::ForgedCertifierSignature,
        "a forged certifier signature",
    ),
];

/// The fetch budget (`state_sync.max_total_fetched_bytes`) of the flood
/// runs: room for 3 block fetches at once, each reserving a largest
/// answer and a largest message.
const FLOOD_BUDGET: u64 = 32 << 20;

/// Page cache of the flood runs' RedbStore: small, so the store's cache
/// does not hide what fetching holds.
const FLOOD_CACHE: usize = 8 << 20;

/// The key of every hostile peer.
const LIAR_KEY: u8 = 100;

/// The section's chain: 4 validators, 10 signed transactions per block,
/// epochs of `epoch` commits. The flood child rebuilds its genesis.
fn chain_config(epoch: u64) -> ChainConfig {
    ChainConfig {
        seed: [43; 32],
        transactions_per_block: 10,
        commits_per_epoch: Some(epoch),
        ..ChainConfig::validators(4)
    }
}

/// What became of the hostile peer by the end of one catch-up, as the
/// node's PeerHeights saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Verdict {
    /// Banned for invalid data or a lie about its height.
    Banned,
    /// Not banned, but its claim is doubted: a commit fetch past what
    /// the other peers hold failed on it, or went unanswered.
    Doubted,
    /// Not banned, but failed (a timeout): ranked after every other peer.
    Avoided,
    /// Not banned and never failed, but refused fetches as busy: sent
    /// fewer at once, and ranked after the other peers for a while.
    Refused,
    /// Served data that was accepted.
    Served,
    /// Never asked for anything: it was ranked below measured peers.
    NotAsked,
}

impl Verdict {
    fn of(node_views: &[soma_actors::peer_heights::PeerView], liar: PeerId) -> Verdict {
        match node_views.iter().find(|v| v.peer == liar) {
            Some(v) if v.banned_until.is_some() => Verdict::Banned,
            Some(v) if v.doubted_above.is_some() => Verdict::Doubted,
            Some(v) if v.failures > 0 => Verdict::Avoided,
            Some(v) if v.busy_slots.is_some() => Verdict::Refused,
            Some(v) if v.throughput_bps > 0 => Verdict::Served,
            _ => Verdict::NotAsked,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Verdict::Banned => "banned",
            Verdict::Doubted => "doubted",
            Verdict::Avoided => "avoided",
            Verdict::Refused => "refused as busy",
            Verdict::Served => "served",
            Verdict::NotAsked => "not asked",
        }
    }

    /// The form the flood child prints it in.
    fn code(self) -> &'static str {
        match self {
            Verdict::Banned => "banned",
            Verdict::Doubted => "doubted",
            Verdict::Avoided => "avoided",
            Verdict::Refused => "refused",
            Verdict::Served => "served",
            Verdict::NotAsked => "not-asked",
        }
    }

    fn parse(code: &str) -> Option<Verdict> {
        [
            Verdict::Banned,
            Verdict::Doubted,
            Verdict::Avoided,
            Verdict::Refused,
            Verdict::Served,
            Verdict::NotAsked,
        ]
        .into_iter()
        .find(|v| v.code() == code)
    }
}

/// Each verdict with how many runs reached it: `banned 2/3, not asked 1/3`.
fn tally(mut verdicts: Vec<Verdict>) -> String {
    let runs = verdicts.len();
    verdicts.sort();
    let mut parts: Vec<String> = Vec::new();
    let mut rest = verdicts.as_slice();
    while let Some(first) = rest.first() {
        let n = rest.iter().take_while(|v| *v == first).count();
        parts.push(format!("{} {n}/{runs}", first.name()));
        rest = &rest[n..];
    }
    parts.join(", ")
}

/// One catch-up of the in-process node.
struct Run {
    elapsed: Duration,
    verdict: Option<Verdict>,
}

impl Run {
    /// Whether the node asked the hostile peer anything.
    fn asked(&self) -> bool {
        self.verdict.is_some_and(|v| v != Verdict::NotAsked)
    }
}

/// A fresh node (on a MemStore, key `key`) catching up `chain` from
/// `honest` and, if given, a peer telling `lie`, all seeded from the start.
fn catch_up(
    chain: &Arc<Chain>,
    honest: &[P2pHandle],
    lie: Option<Lie>,
    key: u8,
    timeout: Duration,
) -> Run {
    // A runtime of its own: the hostile server ends with it.
    let rt = runtime(2);
    rt.block_on(async {
        let mut seed_peers = soma_testkit::seeds(&honest.iter().collect::<Vec<_>>());
        let mut liar = None;
        if let Some(lie) = lie {
            let (peer, address) = byzantine::serve(chain.clone(), lie, LIAR_KEY).await;
            seed_peers.insert(
                0,
                SeedPeer {
                    peer_id: Some(peer),
                    address,
                },
            );
            liar = Some(peer);
        }
        let config = P2pConfig {
            seed_peers,
            timeout,
            ..P2pConfig::default()
        };
        let store: Arc<dyn ConsensusStore> = Arc::new(MemStore::new(chain.genesis()));
        let start = Instant::now();
        let node = soma_testkit::node(chain, key, config, store);
        soma_testkit::wait_applied(&node, chain.tip(), Duration::from_secs(600)).await;
        let elapsed = start.elapsed();
        let views = node.peer_heights().await.expect("the node runs");
        node.shutdown().await;
        Run {
            elapsed,
            verdict: liar.map(|l| Verdict::of(&views, l)),
        }
    })
}

/// One run of the flood child: its time, peak RSS and what became of the
/// flooding peer.
struct ChildRun {
    elapsed: Duration,
    peak_kib: u64,
    verdict: Option<Verdict>,
}

impl ChildRun {
    /// Whether the node asked the flooding peer anything.
    fn asked(&self) -> bool {
        self.verdict.is_some_and(|v| v != Verdict::NotAsked)
    }
}

/// Runs the flood child against `honest` and, if `flood`, a FloodsBlocks
/// peer served from this process.
fn flood_run(chain: &Arc<Chain>, honest: &[P2pHandle], flood: bool, size: &Size) -> ChildRun {
    let rt = runtime(2);
    let mut seeds: Vec<String> = honest
        .iter()
        .map(|v| format!("{}@{}", hex::encode(v.peer_id().0), v.local_addr()))
        .collect();
    let mut liar = "-".to_string();
    if flood {
        // Spawned on `rt`, whose workers serve it while the child runs.
        let (peer, address) =
            rt.block_on(byzantine::serve(chain.clone(), Lie::FloodsBlocks, LIAR_KEY));
        seeds.insert(0, format!("{}@{address}", hex::encode(peer.0)));
        liar = hex::encode(peer.0);
    }
    let (commits, epoch) = (size.adversarial_commits, size.adversarial_epoch);
    let output = Command::new(std::env::current_exe().expect("this executable"))
        .args([
            "child-flood",
            &commits.to_string(),
            &epoch.to_string(),
            &FLOOD_BUDGET.to_string(),
            &size.adversarial_timeout.as_millis().to_string(),
            &seeds.join(","),
            &liar,
        ])
        .output()
        .expect("the child starts");
    drop(rt);
    let (elapsed, peak_kib, rest) = crate::child_report(&output, "flood run");
    ChildRun {
        elapsed,
        peak_kib,
        verdict: rest.first().and_then(|f| Verdict::parse(f)),
    }
}

/// Flood runs with the flooding peer, until it was asked in `runs` of
/// them or `3 × runs` were made: a run where it was never asked floods
/// nothing.
fn flood_runs(chain: &Arc<Chain>, honest: &[P2pHandle], size: &Size) -> Vec<ChildRun> {
    let mut flooded: Vec<ChildRun> = Vec::new();
    while flooded.iter().filter(|r| r.asked()).count() < size.adversarial_runs
        && flooded.len() < 3 * size.adversarial_runs
    {
        flooded.push(flood_run(chain, honest, true, size));
    }
    flooded
}

/// Runs the benchmark.
pub fn section(size: &Size) -> Section {
    let (commits, epoch, runs) = (
        size.adversarial_commits,
        size.adversarial_epoch,
        size.adversarial_runs,
    );
    let built = Instant::now();
    let chain = Arc::new(ChainBuilder::new(chain_config(epoch)).build(commits));
    eprintln!(
        "  chain of {commits} commits, {} blocks built in {:.1}s",
        chain.block_count(),
        built.elapsed().as_secs_f64()
    );
    let honest = crate::sync::validators(&chain, 3);
    let timeout = size.adversarial_timeout;

    // Rounds of every setup in turn, so drift over the run (the machine,
    // the validators' caches) weighs on each setup alike.
    let mut reference: Vec<Run> = Vec::new();
    let mut hostile: Vec<Vec<Run>> = KINDS.iter().map(|_| Vec::new()).collect();
    let mut key = 0u8;
    let mut next_key = || {
        // Each node its own identity: the validators hold per-peer state.
        key = key.wrapping_add(1);
        110u8.wrapping_add(key % 120)
    };
    for _ in 0..runs {
        reference.push(catch_up(&chain, &honest, None, next_key(), timeout));
        for ((lie, _), runs) in KINDS.iter().zip(&mut hostile) {
            runs.push(catch_up(&chain, &honest, Some(*lie), next_key(), timeout));
        }
    }
    let mut quiet: Vec<ChildRun> = (0..runs)
        .map(|_| flood_run(&chain, &honest, false, size))
        .collect();
    let mut flooded = flood_runs(&chain, &honest, size);
    runtime(1).block_on(crate::sync::stop(honest));

    let mut s = Section::new(
        "adversarial",
        "Adversarial: catch-up beside a hostile peer, memory under a flood",
        format!(
            "A fresh node on a MemStore catches up {commits} commits ({} blocks of 10 signed \
             transactions; 4-validator committee, epochs of {epoch} commits) from 3 validator \
             nodes plus one peer that lies as the row says, all 4 seeded from the start, over \
             mutual TLS on 127.0.0.1; default settings but a request timeout of {} s. Reference: \
             the same catch-up from the 3 validators alone, in the same rounds. Times are medians \
             of {runs} runs; \"when asked\" is the median over the runs where the node asked the \
             hostile peer anything, whose fate is read from the node's peer table at the tip. \
             Flood: the syncing node is a child process on a RedbStore ({} MiB page cache) with \
             a fetch budget (`max_total_fetched_bytes`) of {} MiB, among the 3 validators, \
             without and then with a peer that answers every block fetch with endless {} MiB \
             chunks of a blob nobody asked for, dialled first and alone, the validators once \
             it is banned (repeated until it was asked in {runs} runs); \
             growth is the highest peak RSS of a run where it was asked less the median peak \
             without it, against the budget.",
            chain.block_count(),
            timeout.as_secs_f64(),
            FLOOD_CACHE >> 20,
            FLOOD_BUDGET >> 20,
            FLOOD_BLOB_BYTES >> 20,
        ),
        &[
            "peers",
            "catch-up (s), median",
            "fastest–slowest (s)",
            "of honest-only",
            "of honest-only, when asked",
            "hostile peer, per run",
            "peak RSS (MiB), median",
            "peak RSS growth (MiB)",
            "growth of fetch budget",
        ],
    );
    let range = |times: &[Duration]| {
        Cell::text(format!(
            "{:.2}–{:.2}",
            times[0].as_secs_f64(),
            times[times.len() - 1].as_secs_f64()
        ))
    };
    let honest_times = sorted(reference.iter().map(|r| r.elapsed));
    let honest_time = median(&honest_times);
    let of_honest = |d: Duration| d.as_secs_f64() / honest_time.as_secs_f64();
    s.row(
        "3 honest validators (reference)",
        vec![
            Cell::secs(honest_time),
            range(&honest_times),
            Cell::Ratio(1.0),
            Cell::Empty,
            Cell::Empty,
            Cell::Empty,
            Cell::Empty,
            Cell::Empty,
        ],
    );
    for ((_, label), runs) in KINDS.iter().zip(&hostile) {
        let times = sorted(runs.iter().map(|r| r.elapsed));
        let asked = sorted(runs.iter().filter(|r| r.asked()).map(|r| r.elapsed));
        s.row(
            format!("+ 1 peer: {label}"),
            vec![
                Cell::secs(median(&times)),
                range(&times),
                Cell::Ratio(of_honest(median(&times))),
                if asked.is_empty() {
                    Cell::Empty
                } else {
                    Cell::Ratio(of_honest(median(&asked)))
                },
                Cell::text(tally(runs.iter().filter_map(|r| r.verdict).collect())),
                Cell::Empty,
                Cell::Empty,
                Cell::Empty,
            ],
        );
    }

    let mib = |kib: u64| kib as f64 / 1024.0;
    quiet.sort_by_key(|r| r.peak_kib);
    flooded.sort_by_key(|r| r.peak_kib);
    let quiet_peak = quiet[quiet.len() / 2].peak_kib;
    let quiet_times = sorted(quiet.iter().map(|r| r.elapsed));
    let quiet_time = median(&quiet_times);
    s.row(
        format!(
            "child, {} MiB budget: 3 honest validators",
            FLOOD_BUDGET >> 20
        ),
        vec![
            Cell::secs(quiet_time),
            range(&quiet_times),
            Cell::Ratio(1.0),
            Cell::Empty,
            Cell::Empty,
            Cell::num(mib(quiet_peak), 1),
            Cell::Empty,
            Cell::Empty,
        ],
    );
    let flood_times = sorted(flooded.iter().map(|r| r.elapsed));
    let asked_times = sorted(flooded.iter().filter(|r| r.asked()).map(|r| r.elapsed));
    let worst = flooded
        .iter()
        .filter(|r| r.asked())
        .map(|r| r.peak_kib)
        .max();
    let growth = worst.map(|w| mib(w) - mib(quiet_peak));
    let budget_mib = (FLOOD_BUDGET >> 20) as f64;
    s.row(
        format!(
            "child, {} MiB budget: + 1 flooding peer",
            FLOOD_BUDGET >> 20
        ),
        vec![
            Cell::secs(median(&flood_times)),
            range(&flood_times),
            Cell::Ratio(median(&flood_times).as_secs_f64() / quiet_time.as_secs_f64()),
            if asked_times.is_empty() {
                Cell::Empty
            } else {
                Cell::Ratio(median(&asked_times).as_secs_f64() / quiet_time.as_secs_f64())
            },
            Cell::text(tally(flooded.iter().filter_map(|r| r.verdict).collect())),
            Cell::num(mib(flooded[flooded.len() / 2].peak_kib), 1),
            growth.map_or(Cell::Empty, |g| Cell::num(g, 1)),
            growth.map_or(Cell::Empty, |g| Cell::Ratio(g / budget_mib)),
        ],
    );
    s.notes.push(format!(
        "Peak RSS of the flood runs: {:.1}–{:.1} MiB without the flooding peer, {:.1}–{:.1} MiB \
         with it.",
        mib(quiet[0].peak_kib),
        mib(quiet[quiet.len() - 1].peak_kib),
        mib(flooded[0].peak_kib),
        mib(flooded[flooded.len() - 1].peak_kib),
    ));
    s
}

/// `times`, sorted.
fn sorted(times: impl Iterator<Item = Duration>) -> Vec<Duration> {
    let mut times: Vec<Duration> = times.collect();
    times.sort();
    times
}

/// The median of sorted, non-empty `times`.
fn median(times: &[Duration]) -> Duration {
    times[times.len() / 2]
}

/// The syncing node of the flood runs, in a child process: syncs
/// `commits` of the section's chain (epochs of `epoch`) from `seeds`
/// (`peer-id-hex@address`, comma-separated) into a RedbStore, with a fetch
/// budget of `budget` bytes and a request timeout of `timeout_ms`; prints
/// `seconds peak-KiB verdict`, the verdict on `liar` (a hex peer id, or
/// `-` for none).
pub fn child(commits: u64, epoch: u64, budget: u64, timeout_ms: u64, seeds: &str, liar: &str) {
    let genesis = ChainBuilder::new(chain_config(epoch)).genesis().clone();
    let seed_peers: Vec<SeedPeer> = seeds
        .split(',')
        .map(|s| {
            let (id, address) = s.split_once('@').expect("peer-id@address");
            SeedPeer {
                peer_id: Some(crate::peer_id_from_hex(id).expect("a 32-byte hex peer id")),
                address: address.to_string(),
            }
        })
        .collect();
    let liar = crate::peer_id_from_hex(liar);
    // The flooding peer is dialled first and alone, the validators once it
    // is banned (or after a minute): beside measured validators a peer
    // never measured is asked only when their slots are full, which a
    // catch-up this short may never reach, and a flood never asked floods
    // nothing.
    let (seed_peers, later): (Vec<SeedPeer>, Vec<SeedPeer>) = match liar {
        Some(l) => seed_peers.into_iter().partition(|s| s.peer_id == Some(l)),
        None => (seed_peers, Vec::new()),
    };
    let dir = tempfile::tempdir().expect("a temporary directory");
    let store: Arc<dyn ConsensusStore> = Arc::new(
        RedbStore::open_with_cache(dir.path().join("store.redb"), &genesis, FLOOD_CACHE)
            .expect("the store opens"),
    );
    let mut config = P2pConfig {
        seed_peers,
        timeout: Duration::from_millis(timeout_ms),
        ..P2pConfig::default()
    };
    config.state_sync.max_total_fetched_bytes = budget;
    runtime(2).block_on(async move {
        let start = Instant::now();
        let node = soma_actors::P2pBuilder::new(
            config,
            soma_types::KeyPair::from_seed([121; 32]),
            genesis,
            store,
        )
        .start()
        .expect("the node starts");
        if let Some(liar) = liar {
            let banned = async || {
                let views = node.peer_heights().await.unwrap_or_default();
                Verdict::of(&views, liar) == Verdict::Banned
            };
            let minute = Duration::from_secs(60);
            let _ = tokio::time::timeout(minute, async {
                while !banned().await {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
            .await;
            for s in later {
                node.connect(s.peer_id, s.address)
                    .expect("Connections takes the dial");
            }
        }
        soma_testkit::wait_applied(&node, commits, Duration::from_secs(600)).await;
        let elapsed = start.elapsed();
        let peak = crate::peak_rss_kib(std::process::id());
        let views = node.peer_heights().await.expect("the node runs");
        node.shutdown().await;
        let verdict = liar.map_or("-", |l| Verdict::of(&views, l).code());
        println!("{} {peak} {verdict}", elapsed.as_secs_f64());
    });
}
