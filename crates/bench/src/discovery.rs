//! Benchmark 4: discovery convergence. N nodes, all seeded with one of them,
//! over mutual TLS on 127.0.0.1; the time until every node knows every
//! other, and the GetKnownPeers calls made on the way.
//!
//! Every run is a child process of the harness, so each starts clean. The
//! timed runs record nothing; a separate run records every Discovery core's
//! inputs and outputs (`SOMA_TRACE_DIR`) and the calls are counted from
//! those traces (one `query` output per call made, one `serve` input per
//! call answered), with no counter in the production code.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use soma_actors::discovery::{self, SeedPeer};
use soma_actors::replay::TRACE_DIR_ENV;
use soma_actors::{P2pBuilder, P2pConfig, P2pHandle};
use soma_chain::{ChainBuilder, ChainConfig};
use soma_store::MemStore;
use soma_types::{KeyPair, PeerId};

use crate::Size;
use crate::report::{Cell, Section};

const PEERS_TO_QUERY: usize = 3;
/// A run that has not converged by then fails.
const DEADLINE: Duration = Duration::from_secs(120);

/// What one run reports on its last line of output.
struct Outcome {
    seconds: f64,
    made: u64,
    answered: u64,
}

/// Runs the benchmark.
pub fn section(size: &Size) -> Section {
    let interval = size.discovery_interval_ms;
    let mut s = Section::new(
        "discovery",
        "Discovery convergence from one seed",
        format!(
            "N nodes in one child process, all seeded with node 0, over mutual TLS on 127.0.0.1; \
             discovery interval {interval} ms, peers-to-query {PEERS_TO_QUERY}, other settings \
             default. Time: median of {} runs. Calls: counted exactly from the Discovery traces of \
             one more, recorded, run, up to each node's convergence. The reference is the bound \
             the protocol allows: a round at start and one per interval, each asking at most \
             peers-to-query peers, and one call to each new connection, at most the \
             connection target (8) of them before the first rotation.",
            size.discovery_runs
        ),
        &[
            "nodes",
            "converged (s)",
            "fastest–slowest (s)",
            "rounds",
            "calls made/node",
            "calls answered/node",
            "bound: calls/node",
        ],
    );
    for &n in &size.discovery_nodes {
        let mut times: Vec<f64> = (0..size.discovery_runs)
            .map(|_| spawn(n, interval, None).seconds)
            .collect();
        times.sort_by(f64::total_cmp);
        let median = times[times.len() / 2];
        let dir = tempfile::tempdir().expect("a temporary directory");
        let counted = spawn(n, interval, Some(dir.path()));
        let rounds = median * 1000.0 / interval as f64;
        s.row(
            n.to_string(),
            vec![
                Cell::num(median, 2),
                Cell::text(format!("{:.2}–{:.2}", times[0], times[times.len() - 1])),
                Cell::num(rounds, 1),
                Cell::num(counted.made as f64 / n as f64, 1),
                Cell::num(counted.answered as f64 / n as f64, 1),
                Cell::int(calls_bound(rounds, n) as u32),
            ],
        );
    }
    s
}

/// The most GetKnownPeers calls a node of `n` may make in `rounds`
/// intervals: a round at start and one per interval, and one per new
/// connection (a node connects to at most its target before it rotates).
fn calls_bound(rounds: f64, n: usize) -> usize {
    let target = discovery::Config::default().target_concurrent_connections;
    (rounds.floor() as usize + 1) * PEERS_TO_QUERY + target.min(n - 1)
}

fn spawn(n: usize, interval_ms: u64, trace_dir: Option<&Path>) -> Outcome {
    let mut command = Command::new(std::env::current_exe().expect("this executable"));
    command.args(["child-discovery", &n.to_string(), &interval_ms.to_string()]);
    match trace_dir {
        Some(dir) => command.env(TRACE_DIR_ENV, dir),
        None => command.env_remove(TRACE_DIR_ENV),
    };
    let output = command.output().expect("the run starts");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "discovery run of {n} nodes failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let last = stdout.lines().last().unwrap_or_default();
    let mut fields = last
        .split_whitespace()
        .map(|f| f.parse::<f64>().expect("a number"));
    let mut next = || fields.next().expect("seconds made answered");
    Outcome {
        seconds: next(),
        made: next() as u64,
        answered: next() as u64,
    }
}

/// One run in a child process: prints `seconds made answered` (the counts
/// are 0 unless recording).
pub fn child(n: usize, interval_ms: u64) {
    crate::runtime(2).block_on(async move {
        let chain = ChainBuilder::new(ChainConfig::validators(4)).build(5);
        let config = |seed_peers| P2pConfig {
            seed_peers,
            discovery: discovery::Config {
                interval_ms,
                peers_to_query: PEERS_TO_QUERY,
                ..discovery::Config::default()
            },
            ..P2pConfig::default()
        };
        let start = |config, key: usize| {
            let started = Instant::now();
            let node = P2pBuilder::new(
                config,
                KeyPair::from_seed([key as u8; 32]),
                chain.genesis().clone(),
                Arc::new(MemStore::new(chain.genesis())),
            )
            .start()
            .expect("node starts");
            (node, started)
        };
        let mut nodes: Vec<(P2pHandle, Instant)> = vec![start(config(vec![]), 1)];
        let seed = SeedPeer {
            peer_id: Some(nodes[0].0.peer_id()),
            address: nodes[0].0.local_addr().to_string(),
        };
        let began = Instant::now();
        for key in 2..=n {
            nodes.push(start(config(vec![seed.clone()]), key));
        }
        loop {
            let mut all = true;
            for (node, _) in &nodes {
                if node.known_peers().await.map_or(0, |k| k.len()) < n - 1 {
                    all = false;
                    break;
                }
            }
            if all {
                break;
            }
            assert!(began.elapsed() < DEADLINE, "{n} nodes did not converge");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let converged = Instant::now();
        let seconds = (converged - began).as_secs_f64();
        // Each node's time to convergence in its core's virtual time (which
        // starts a moment after `started`).
        let cut: HashMap<PeerId, u64> = nodes
            .iter()
            .map(|(node, started)| (node.peer_id(), (converged - *started).as_millis() as u64))
            .collect();
        for (node, _) in &nodes {
            node.shutdown().await;
        }
        let (made, answered) = match std::env::var_os(TRACE_DIR_ENV) {
            Some(dir) => count(Path::new(&dir), &cut),
            None => (0, 0),
        };
        println!("{seconds} {made} {answered}");
    });
}

/// GetKnownPeers calls made (`query` outputs) and answered (`serve` inputs)
/// before each node's cut, summed over the Discovery traces in `dir`.
fn count(dir: &Path, cut: &HashMap<PeerId, u64>) -> (u64, u64) {
    let (mut made, mut answered, mut traces) = (0, 0, 0);
    for entry in std::fs::read_dir(dir).expect("the trace directory") {
        let path = entry.expect("an entry").path();
        let name = path
            .file_name()
            .expect("a name")
            .to_string_lossy()
            .into_owned();
        if !name.starts_with("discovery-") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("a trace");
        let mut lines = text
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("a trace line is JSON"));
        let header = lines.next().expect("a header");
        let local: PeerId =
            serde_json::from_value(header["init"]["local"].clone()).expect("the local peer id");
        let until = cut[&local];
        traces += 1;
        for line in lines {
            if line["t"].as_u64().unwrap_or(0) > until {
                break;
            }
            if line["out"].get("query").is_some() {
                made += 1;
            }
            if line["in"].get("serve").is_some() {
                answered += 1;
            }
        }
    }
    assert_eq!(traces, cut.len(), "one Discovery trace per node");
    (made, answered)
}
