//! Discovery convergence: N in-process nodes (8, 16, 32) all seeded with one
//! of them, over real mutual TLS and gRPC on 127.0.0.1, with rounds every
//! 500 ms (the design's default is 5 s) and every other discovery setting at
//! its default (peers-to-query 3, target-concurrent-connections 8). Measures
//! the seconds until every node knows every other, and the GetKnownPeers
//! calls made on the way. `cargo bench -p soma-actors --bench discovery`.
//!
//! Every run is a child process of this one, so each starts clean. The
//! timed runs (three per size, median reported) record nothing. The counted run repeats it with
//! `SOMA_TRACE_DIR` set, so that every Discovery shell records its core's
//! inputs and outputs; the calls are counted from those traces (one
//! `query` output per call made, one `serve` input per call answered), with
//! no counter in the production code. Recording slows the counted run a
//! little, which is why the time comes from the other.

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

const SIZES: [usize; 3] = [8, 16, 32];
const INTERVAL_MS: u64 = 500;
const PEERS_TO_QUERY: usize = 3;
/// Timed runs per size; the median is reported.
const RUNS: usize = 3;
/// A run that has not converged by then is reported as such.
const DEADLINE: Duration = Duration::from_secs(60);

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--run") {
        let n = args[i + 1].parse().expect("--run N");
        child(n);
        return;
    }
    println!(
        "discovery: N nodes from one seed, interval {INTERVAL_MS} ms, \
         peers-to-query {PEERS_TO_QUERY}, other settings default"
    );
    println!();
    println!(
        "| nodes | converged (s), median (min–max) of {RUNS} | intervals | bound: calls/node ≤ rounds × {PEERS_TO_QUERY} \
         | calls made/node (counted) | calls answered/node (counted) | converged, recording (s) |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    for n in SIZES {
        let mut times: Vec<f64> = (0..RUNS).map(|_| spawn(n, None).seconds).collect();
        times.sort_by(f64::total_cmp);
        let median = times[RUNS / 2];
        let dir = tempfile::tempdir().expect("a temporary directory");
        let counted = spawn(n, Some(dir.path()));
        let intervals = median * 1000.0 / INTERVAL_MS as f64;
        println!(
            "| {n} | {median:.2} ({:.2}–{:.2}) | {:.1} | {:.0} | {:.1} | {:.1} | {:.2} |",
            times[0],
            times[RUNS - 1],
            intervals,
            // A round at 0 and one per interval after; each asks at most
            // peers-to-query peers.
            (intervals.floor() + 1.0) * PEERS_TO_QUERY as f64,
            counted.made as f64 / n as f64,
            counted.answered as f64 / n as f64,
            counted.seconds,
        );
    }
}

/// What one run reports on its last line of output.
struct Outcome {
    seconds: f64,
    made: u64,
    answered: u64,
}

fn spawn(n: usize, trace_dir: Option<&Path>) -> Outcome {
    let mut command = Command::new(std::env::current_exe().expect("this executable"));
    command.arg("--run").arg(n.to_string());
    match trace_dir {
        Some(dir) => command.env(TRACE_DIR_ENV, dir),
        None => command.env_remove(TRACE_DIR_ENV),
    };
    let output = command.output().expect("the run starts");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "run of {n} nodes failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let last = stdout.lines().last().unwrap_or_default();
    let mut fields = last.split_whitespace().map(|f| f.parse::<f64>().unwrap());
    let mut next = || fields.next().expect("seconds made answered");
    Outcome {
        seconds: next(),
        made: next() as u64,
        answered: next() as u64,
    }
}

/// One run: prints `seconds made answered` (the counts are 0 unless
/// recording).
fn child(n: usize) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let chain = ChainBuilder::new(ChainConfig::validators(4)).build(5);
        let config = |seed_peers| P2pConfig {
            seed_peers,
            discovery: discovery::Config {
                interval_ms: INTERVAL_MS,
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
        // Each node's time to convergence, in its core's virtual time
        // (which starts a moment after `started`).
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

/// GetKnownPeers calls made (`query` outputs) and answered (`serve`
/// inputs) before each node's cut, summed over the Discovery traces in
/// `dir`.
fn count(dir: &Path, cut: &HashMap<PeerId, u64>) -> (u64, u64) {
    let (mut made, mut answered, mut traces) = (0, 0, 0);
    for entry in std::fs::read_dir(dir).expect("the trace directory") {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if !name.starts_with("discovery-") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let mut lines = text
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("a trace line is JSON"));
        let header = lines.next().expect("a header");
        let local: PeerId = serde_json::from_value(header["init"]["local"].clone()).unwrap();
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
