//! Records the Discovery core of a real node: three nodes on 127.0.0.1 over
//! mutual TLS, A and B seeded with S (A by address only), until all know
//! each other; then B stops, and A loses it and fails to redial it. A's
//! trace is copied to the path given (default:
//! `tests/replays/discovery_real_run.jsonl`).
//!
//! ```sh
//! cargo run -p soma-actors --example record_discovery -- tests/replays/discovery_real_run.jsonl
//! ```
//!
//! Every actor of every node records into `SOMA_TRACE_DIR` if it is set
//! (the traces are kept), else into a temporary directory.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use soma_actors::connections::PeerEvent;
use soma_actors::discovery::{self, SeedPeer};
use soma_actors::replay::TRACE_DIR_ENV;
use soma_actors::{P2pBuilder, P2pConfig, P2pHandle};
use soma_chain::{Chain, ChainBuilder, ChainConfig};
use soma_store::MemStore;
use soma_types::{KeyPair, PeerId};

const WAIT: Duration = Duration::from_secs(30);

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::env::args().nth(1).map_or_else(
        || PathBuf::from("tests/replays/discovery_real_run.jsonl"),
        PathBuf::from,
    );
    // Every actor of every node records; kept if SOMA_TRACE_DIR is set.
    let temporary = tempfile::tempdir()?;
    let traces = match std::env::var_os(TRACE_DIR_ENV) {
        Some(dir) => PathBuf::from(dir),
        None => {
            // SAFETY: no other thread runs yet (the runtime and the nodes
            // start below), so nothing reads the environment concurrently.
            unsafe { std::env::set_var(TRACE_DIR_ENV, temporary.path()) };
            temporary.path().to_path_buf()
        }
    };

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let a = runtime.block_on(run())?;
    let trace = trace_of(&traces, a)?;
    std::fs::copy(&trace, &out)?;
    println!("{} -> {}", trace.display(), out.display());
    Ok(())
}

fn config(seed_peers: Vec<SeedPeer>) -> P2pConfig {
    let mut config = P2pConfig {
        seed_peers,
        discovery: discovery::Config {
            interval_ms: 200,
            dial_backoff_ms: 200,
            max_dial_backoff_ms: 1_000,
            ..discovery::Config::default()
        },
        ..P2pConfig::default()
    };
    config.connections.probe_interval_ms = 200;
    config
}

fn start(chain: &Chain, config: P2pConfig, key: u8) -> P2pHandle {
    // A fixed RNG seed per node, for a reproducible choice of peers.
    let config = P2pConfig {
        seed: Some(u64::from(key)),
        ..config
    };
    P2pBuilder::new(
        config,
        KeyPair::from_seed([key; 32]),
        chain.genesis().clone(),
        Arc::new(MemStore::new(chain.genesis())),
    )
    .start()
    .expect("node starts")
}

async fn known(node: &P2pHandle) -> Vec<PeerId> {
    let infos = node.known_peers().await.unwrap_or_default();
    infos.into_iter().map(|i| i.info.peer_id).collect()
}

/// Runs the scenario; returns A's peer id.
async fn run() -> Result<PeerId, Box<dyn std::error::Error>> {
    let chain = ChainBuilder::new(ChainConfig::validators(4)).build(5);
    let s = start(&chain, config(vec![]), 1);
    let a = start(
        &chain,
        config(vec![SeedPeer {
            peer_id: None,
            address: s.local_addr().to_string(),
        }]),
        2,
    );
    let b = start(
        &chain,
        config(vec![SeedPeer {
            peer_id: Some(s.peer_id()),
            address: s.local_addr().to_string(),
        }]),
        3,
    );
    let mut a_events = a.subscribe_peer_events();
    let deadline = Instant::now() + WAIT;
    let ids = [s.peer_id(), a.peer_id(), b.peer_id()];
    // Polled sparingly: every poll of A is an input in its trace.
    'converge: loop {
        if Instant::now() > deadline {
            return Err("the nodes did not converge".into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        for node in [&s, &a, &b] {
            let known = known(node).await;
            if !ids
                .iter()
                .all(|p| *p == node.peer_id() || known.contains(p))
            {
                continue 'converge;
            }
        }
        break;
    }
    println!("all three know each other");

    let b_id = b.peer_id();
    while !a.connected_peers().await?.contains(&b_id) {
        if Instant::now() > deadline {
            return Err("a did not connect to b".into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    b.shutdown().await;
    let (mut lost, mut redialled) = (false, false);
    while !(lost && redialled) {
        let event = tokio::time::timeout_at(deadline.into(), a_events.recv()).await??;
        match event {
            PeerEvent::Disconnected { peer } if peer == b_id => lost = true,
            PeerEvent::DialFailed { peer, .. } if lost && peer == Some(b_id) => redialled = true,
            _ => {}
        }
    }
    println!("a lost b and failed to redial it");
    a.shutdown().await;
    s.shutdown().await;
    Ok(ids[1])
}

/// The Discovery trace whose header names `local`.
fn trace_of(dir: &Path, local: PeerId) -> Result<PathBuf, Box<dyn std::error::Error>> {
    let local = serde_json::to_value(local)?;
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let is_discovery = path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("discovery-"));
        if !is_discovery {
            continue;
        }
        let text = std::fs::read_to_string(&path)?;
        let header: serde_json::Value = serde_json::from_str(text.lines().next().unwrap_or("{}"))?;
        if header["init"]["local"] == local {
            if !text.contains(r#""in":{"learned""#) {
                return Err("the trace has no learned input".into());
            }
            return Ok(path);
        }
    }
    Err("no Discovery trace of node A".into())
}
