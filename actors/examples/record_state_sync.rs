//! Records the StateSync core of a real catch-up: two validators on
//! 127.0.0.1 serve a 300-commit chain over two epochs, and a fresh node
//! syncs it over mutual TLS. The fresh node's StateSync trace is copied to
//! the path given (default: `tests/replays/state_sync_catch_up.jsonl`).
//!
//! ```sh
//! cargo run -p soma-actors --example record_state_sync -- tests/replays/state_sync_catch_up.jsonl
//! ```

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use soma_actors::discovery::SeedPeer;
use soma_actors::replay::TRACE_DIR_ENV;
use soma_actors::{P2pBuilder, P2pConfig, P2pHandle};
use soma_chain::{ChainBuilder, ChainConfig};
use soma_store::{ConsensusStore, MemStore};
use soma_types::KeyPair;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::env::args().nth(1).map_or_else(
        || PathBuf::from("tests/replays/state_sync_catch_up.jsonl"),
        PathBuf::from,
    );
    let traces = tempfile::tempdir()?;
    // SAFETY: no other thread runs yet (the runtimes and nodes start below).
    unsafe { std::env::set_var(TRACE_DIR_ENV, traces.path()) };

    let chain = ChainBuilder::new(ChainConfig {
        commits_per_epoch: Some(180),
        ..ChainConfig::validators(4)
    })
    .build(300);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let validators: Vec<P2pHandle> = (1..=2u8)
            .map(|k| soma_testkit::validator(&chain, k))
            .collect();
        let store: Arc<dyn ConsensusStore> = Arc::new(MemStore::new(chain.genesis()));
        let config = P2pConfig {
            seed_peers: validators
                .iter()
                .map(|v| SeedPeer {
                    peer_id: Some(v.peer_id()),
                    address: v.local_addr().to_string(),
                })
                .collect(),
            ..P2pConfig::default()
        };
        let node = P2pBuilder::new(
            config,
            KeyPair::from_seed([9; 32]),
            chain.genesis().clone(),
            store,
        )
        .start()
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while node.sync_status().await.unwrap().synced < 300 {
            assert!(Instant::now() < deadline, "sync did not finish");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        node.shutdown().await;
        for v in validators {
            v.shutdown().await;
        }
    });
    let trace = busiest_state_sync_trace(traces.path())?;
    std::fs::copy(&trace, &out)?;
    println!("trace written to {}", out.display());
    Ok(())
}

/// The StateSync trace that applied the most batches: the fresh node's.
fn busiest_state_sync_trace(dir: &Path) -> std::io::Result<PathBuf> {
    let mut best = (0, None);
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let is_sync = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("state_sync-"));
        if !is_sync {
            continue;
        }
        let applies = std::fs::read_to_string(&path)?.matches("\"apply\"").count();
        if applies > best.0 {
            best = (applies, Some(path));
        }
    }
    best.1
        .ok_or_else(|| std::io::Error::other("no state_sync trace applied anything"))
}
