//! Benchmark 9: serving under attack. A node in a child process (so its
//! peak RSS is its own) serves a chain from memory, with the loopback
//! exemption off so that each attacking host, bound to a 127/8 address of
//! its own, meets the caps a remote host would. An honest node in this
//! process catches the chain up from it alone, once unattacked and once
//! during each attack of `soma_testkit::attack` (started first, and
//! holding what it aims at before the honest node starts). Then the
//! eclipse scenario of the Discovery core, at the production defaults.

use std::process::{Child, ChildStdin};
use std::sync::Arc;
use std::time::{Duration, Instant};

use soma_actors::P2pConfig;
use soma_actors::discovery::SeedPeer;
use soma_actors::discovery::scenario::{Eclipse, eclipse_scenario};
use soma_chain::{Chain, ChainBuilder, ChainConfig};
use soma_store::MemStore;
use soma_testkit::attack::{self, Attack, Tally, Target, Unread};
use soma_types::KeyPair;
use soma_wire::proto;

use crate::report::{Cell, Section};
use crate::{Size, runtime};

/// The served node's send deadline.
const SEND_TIMEOUT: Duration = Duration::from_secs(2);
/// Its fetch slots, in all and per caller.
const FETCHES: usize = 32;
const FETCHES_PER_PEER: usize = 2;
/// Its inbound connections.
const INBOUND: usize = 64;
/// Fresh identities of the identity flood.
const SYBILS: usize = 1_000;
/// Patience with anything that should happen.
const PATIENCE: Duration = Duration::from_secs(300);

/// The attacks, each with the label of its row; `None` is the reference.
#[derive(Clone, Copy, Debug)]
enum Kind {
    None,
    NeverReading,
    NeverReadingResend,
    ConnectionFlood,
    Hammer,
    Identities,
}

const KINDS: [(Kind, &str); 6] = [
    (Kind::None, "no attack"),
    (
        Kind::NeverReading,
        "16 identities never read (all 32 fetch slots)",
    ),
    (
        Kind::NeverReadingResend,
        "the same, asking again at each send deadline",
    ),
    (
        Kind::ConnectionFlood,
        "one host opens 128 connections (idle, stalled)",
    ),
    (Kind::Hammer, "one anonymous client hammers cheap calls"),
    (
        Kind::Identities,
        "1,000 identities + a peer with 200 fakes per answer",
    ),
];

fn chain(commits: u64) -> Chain {
    ChainBuilder::new(ChainConfig::validators(4)).build(commits)
}

/// The served node's settings: the defaults, with the loopback exemption
/// off and the serving limits small enough for the attacks to reach.
fn served_config() -> P2pConfig {
    let mut config = P2pConfig::default();
    let grpc = &mut config.grpc;
    grpc.inbound_exempt_loopback = false;
    grpc.send_timeout = SEND_TIMEOUT;
    grpc.max_concurrent_fetches = FETCHES;
    grpc.max_concurrent_fetches_per_peer = FETCHES_PER_PEER;
    grpc.max_inbound_connections = INBOUND;
    grpc.reserved_inbound_connections = 8;
    grpc.tls_handshake_timeout = Duration::from_secs(1);
    grpc.inbound_idle_timeout = Duration::from_secs(3);
    config.timeout = Duration::from_secs(2);
    config
}

/// The served node, in a child process: serves a chain of `commits`,
/// with `seed` (`address peer-id-hex`, or empty) as its seed peer, prints
/// `address peer-id-hex`, and stops when its stdin closes.
pub fn child(commits: u64, seed: &str) {
    let chain = chain(commits);
    let store = MemStore::new(chain.genesis());
    chain.write_to(&store, 100).expect("the chain writes");
    let mut config = served_config();
    if let Some((address, peer)) = seed.split_once(' ') {
        config.seed_peers = vec![SeedPeer {
            peer_id: crate::peer_id_from_hex(peer),
            address: address.to_owned(),
        }];
    }
    let node = soma_testkit::node(&chain, 1, config, Arc::new(store));
    crate::serve_until_stdin_closes(node);
}

/// A running served node.
struct Served {
    child: Child,
    stdin: Option<ChildStdin>,
    target: Target,
}

impl Served {
    fn start(commits: u64, seed: &str) -> Served {
        let (mut child, address, peer) =
            crate::spawn_serving_child(&["child-attacked", &commits.to_string(), seed]);
        let target = Target {
            address: address.parse().expect("a socket address"),
            peer_id: Some(peer),
        };
        Served {
            stdin: child.stdin.take(),
            child,
            target,
        }
    }

    /// Stops the child; returns its peak RSS in KiB.
    fn stop(mut self) -> u64 {
        let peak = crate::peak_rss_kib(self.child.id());
        drop(self.stdin.take());
        let _ = self.child.wait();
        peak
    }
}

/// Polls `done` every 10 ms; panics naming `what` after [`PATIENCE`].
async fn wait_until(what: &str, done: impl Fn() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < PATIENCE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Starts `kind` against `target` and waits until it holds what it aims
/// at (the identity flood is left running: it is the attack).
async fn start_attack(kind: Kind, target: Target, chain: &Chain) -> Option<Attack> {
    match kind {
        Kind::None => None,
        Kind::NeverReading | Kind::NeverReadingResend => {
            // The node's cut reaches hyper only when the client's window
            // opens, so a client that never reads never sees it: it either
            // holds its calls (and the node frees the slots at the
            // deadline), or, knowing the deadline, asks again right after.
            let hold = if matches!(kind, Kind::NeverReading) {
                5 * SEND_TIMEOUT
            } else {
                SEND_TIMEOUT + Duration::from_millis(50)
            };
            let unread = Unread {
                blocks: (1..=chain.tip().min(100))
                    .flat_map(|i| chain.blocks_of(i).iter())
                    .map(|b| b.reference().into())
                    .collect(),
                commits: proto::FetchCommitsRequest {
                    start: 1,
                    end: chain.tip().min(100),
                    ..Default::default()
                },
                fetch_blocks: 1,
                fetch_commits: 1,
                hold,
            };
            let identities = FETCHES / FETCHES_PER_PEER;
            let attack = attack::never_reading(target, identities, 0, unread).await;
            wait_until("every fetch slot asked for", || {
                attack.tally().sent >= FETCHES as u64
            })
            .await;
            Some(attack)
        }
        Kind::ConnectionFlood => {
            let attack = attack::connection_flood(target, 0, 2 * INBOUND);
            wait_until("the host's share held and the rest refused", || {
                let t = attack.tally();
                t.answered > 0 && t.refused > 0
            })
            .await;
            Some(attack)
        }
        Kind::Hammer => {
            let attack = attack::hammer(target, 0).await;
            wait_until("the hammerer refused", || attack.tally().refused > 0).await;
            Some(attack)
        }
        Kind::Identities => Some(attack::sybil_infos(
            target,
            0,
            SYBILS,
            "127.10.0.1:9".into(),
            25_000,
            16,
        )),
    }
}

/// How long an honest catch-up may take before the run is counted as
/// stalled (about 20 times the slowest catch-up measured).
const STALLED_AFTER: Duration = Duration::from_secs(60);

/// One catch-up of `chain` from a fresh served node under `kind`: the
/// time (`None`: not at the tip after [`STALLED_AFTER`]), the served
/// node's peak RSS (KiB) and what the attack did.
fn run(chain: &Arc<Chain>, kind: Kind, key: u8) -> (Option<Duration>, u64, Tally) {
    let attack_rt = runtime(1);
    // The identity flood comes with a peer of fakes, a seed of the node.
    let fake_peer = matches!(kind, Kind::Identities).then(|| {
        attack_rt.block_on(attack::serve_fake_infos(
            KeyPair::from_seed([66; 32]),
            1,
            SYBILS,
            "127.11.0.1:9",
            25_000,
            200,
        ))
    });
    let seed = fake_peer
        .as_ref()
        .map(|p| format!("{} {}", p.address, hex::encode(p.peer_id.0)))
        .unwrap_or_default();
    let served = Served::start(chain.tip(), &seed);
    eprintln!("  {kind:?}: attacking");
    let attack = attack_rt.block_on(start_attack(kind, served.target, chain));
    eprintln!("  {kind:?}: catching up");
    let sync_rt = runtime(2);
    let elapsed = sync_rt.block_on(async {
        let config = P2pConfig {
            seed_peers: vec![SeedPeer {
                peer_id: served.target.peer_id,
                address: served.target.address.to_string(),
            }],
            ..P2pConfig::default()
        };
        let node = soma_testkit::node(chain, key, config, Arc::new(MemStore::new(chain.genesis())));
        let synced = soma_testkit::wait_applied(&node, chain.tip(), PATIENCE);
        let elapsed = tokio::time::timeout(STALLED_AFTER, synced).await.ok();
        if elapsed.is_none() {
            let status = node.sync_status().await;
            eprintln!("  {kind:?}: stalled after {STALLED_AFTER:?}: {status:?}");
        }
        node.shutdown().await;
        elapsed
    });
    let tally = attack.map(Attack::stop).unwrap_or_default();
    drop(fake_peer);
    let peak = served.stop();
    (elapsed, peak, tally)
}

fn median<T: Copy + Ord>(values: &mut [T]) -> T {
    values.sort();
    values[values.len() / 2]
}

/// Runs the benchmark.
pub fn section(size: &Size) -> Section {
    let (commits, runs) = (size.attack_commits, size.attack_runs);
    let chain = Arc::new(chain(commits));
    let blocks = chain.block_count() as f64;
    let mut results: Vec<Vec<(Option<Duration>, u64, Tally)>> =
        KINDS.iter().map(|_| Vec::new()).collect();
    // Rounds of every setup in turn, so drift weighs on each alike.
    let mut key = 0u8;
    for _ in 0..runs {
        for ((kind, _), results) in KINDS.iter().zip(&mut results) {
            key = key.wrapping_add(1);
            results.push(run(&chain, *kind, 120u8.wrapping_add(key % 100)));
        }
    }
    let mut s = Section::new(
        "attack",
        "Under attack: an honest catch-up from a node being attacked",
        format!(
            "A node in a child process serves a {commits}-commit chain ({blocks} blocks) from \
             memory with the loopback exemption off, {FETCHES} fetch slots ({FETCHES_PER_PEER} \
             per caller), {INBOUND} inbound connections (8 reserved, 8 per address), a {}s send deadline, \
             1 s handshake and 3 s idle timeouts, and the default call rates. Each attack runs \
             from this process, each attacking host bound to a 127/8 address of its own; it \
             starts first and holds what it aims at before an honest node in this process \
             catches the chain up from the served node alone. Median of {runs} run(s), a fresh \
             served node each; a catch-up not at the tip after {}s is counted as stalled and \
             left out of the medians. `of unattacked`: the honest throughput over the \
             unattacked one's (aim: at least 0.5).",
            SEND_TIMEOUT.as_secs(),
            STALLED_AFTER.as_secs()
        ),
        &[
            "attack",
            "catch-up (s)",
            "blocks/s",
            "of unattacked",
            "served peak RSS (MiB)",
            "attack calls / connections",
            "refused",
            "cut",
            "stalled runs",
        ],
    );
    let completed = |results: &[(Option<Duration>, u64, Tally)]| -> Vec<Duration> {
        results.iter().filter_map(|r| r.0).collect()
    };
    let median_of = |mut times: Vec<Duration>| (!times.is_empty()).then(|| median(&mut times));
    let reference = median_of(completed(&results[0]));
    for ((kind, label), results) in KINDS.iter().zip(&results) {
        let time = median_of(completed(results));
        let peak = median(&mut results.iter().map(|r| r.1).collect::<Vec<_>>());
        let tally = results[results.len() / 2].2;
        let stalled = results.len() - completed(results).len();
        let mut cells = match time {
            Some(time) => vec![
                Cell::secs(time),
                Cell::rate(blocks, time),
                reference.map_or(Cell::Empty, |r| {
                    Cell::Ratio(r.as_secs_f64() / time.as_secs_f64())
                }),
            ],
            None => vec![Cell::Empty, Cell::Empty, Cell::Empty],
        };
        cells.push(Cell::num(peak as f64 / 1024.0, 1));
        if matches!(kind, Kind::None) {
            cells.extend([Cell::Empty, Cell::Empty, Cell::Empty]);
        } else {
            cells.extend([
                Cell::int(tally.sent as f64),
                Cell::int(tally.refused as f64),
                Cell::int(tally.cut as f64),
            ]);
        }
        cells.push(Cell::text(format!("{stalled}/{}", results.len())));
        s.row(*label, cells);
    }

    // The share of honest entries an eclipse flood leaves in a full table,
    // from the Discovery core itself at the production defaults.
    let defaults = soma_actors::discovery::Config::default();
    for connected in [30, 8] {
        let scenario = Eclipse {
            connected,
            ..Eclipse::default()
        };
        let outcome = eclipse_scenario(defaults.clone(), &scenario);
        let worst = &outcome.worst;
        s.notes.push(format!(
            "Eclipse flood on the Discovery core (production defaults: {} known, {} per source, \
             {} per prefix), {connected} honest peers connected, {} fakes per answer from one \
             malicious peer and {} identities calling in from one /24 every round: at worst \
             {}/{} entries honest ({:.3}), {} from the malicious peer, {} from the callers.",
            defaults.max_known_peers,
            defaults.max_known_peers_per_source,
            defaults.max_known_peers_per_prefix,
            scenario.fakes_per_call,
            scenario.sybils,
            worst.honest,
            worst.known,
            worst.honest_fraction(),
            worst.from_malicious,
            worst.from_sybils,
        ));
    }
    s
}
