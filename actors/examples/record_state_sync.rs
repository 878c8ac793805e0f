//! Records the cores of a real catch-up, and of one where an actor fails
//! midway: two validators on 127.0.0.1 serve a 300-commit chain over two
//! epochs, and a fresh node syncs it over mutual TLS; then another fresh
//! node syncs it while its PeerHeights handler panics once, halfway.
//!
//! Written to `tests/replays/`: the first node's StateSync and PeerHeights
//! traces (`state_sync_catch_up.jsonl`, `peer_heights_catch_up.jsonl`, the
//! latter with every fetch slot acquired and released), the second node's
//! PeerHeights trace across its restart (`peer_heights_restart.jsonl`: a
//! second header holds the init it was rebuilt from, bans and running
//! leases included) and its supervisor's (`supervisor_restart.jsonl`).
//!
//! ```sh
//! cargo run -p soma-actors --example record_state_sync
//! ```

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use soma_actors::faults::FaultPlan;
use soma_actors::replay::TRACE_DIR_ENV;
use soma_actors::{P2pConfig, P2pHandle};
use soma_chain::{Chain, ChainBuilder, ChainConfig};
use soma_store::{ConsensusStore, MemStore};

fn main() -> Result<(), Box<dyn std::error::Error>> {
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
        catch_up(&chain, &validators, 9, None).await;
        // PeerHeights panics on its first input once 100 commits are in.
        let faults = Arc::new(FaultPlan::default());
        let store: Arc<dyn ConsensusStore> = Arc::new(MemStore::new(chain.genesis()));
        let watermark = store.clone();
        faults.panic_actor_when("peer_heights", move || {
            watermark
                .highest_synced_commit()
                .is_ok_and(|c| (100..200).contains(&c.index))
        });
        catch_up(&chain, &validators, 10, Some((store, faults.clone()))).await;
        assert_eq!(faults.injected("peer_heights"), 1, "the panic was injected");
        for v in validators {
            v.shutdown().await;
        }
    });

    let dir = traces.path();
    let traces: [(&str, &str, Score); 4] = [
        ("state_sync", "state_sync_catch_up", |t| {
            (headers(t) == 1).then(|| t.matches("\"apply\"").count())
        }),
        ("peer_heights", "peer_heights_catch_up", |t| {
            (headers(t) == 1).then(|| t.matches("\"granted\"").count())
        }),
        ("peer_heights", "peer_heights_restart", |t| {
            (headers(t) == 2).then_some(1)
        }),
        ("supervisor", "supervisor_restart", |t| {
            t.contains("\"restart\"").then_some(1)
        }),
    ];
    for (actor, name, score) in traces {
        let trace = best_trace(dir, actor, score)?;
        let to = PathBuf::from(format!("tests/replays/{name}.jsonl"));
        std::fs::copy(&trace, &to)?;
        println!("trace written to {}", to.display());
    }
    Ok(())
}

/// A fresh node, keyed `key`, syncs `chain` from `validators`; with a
/// store and faults if given.
async fn catch_up(
    chain: &Chain,
    validators: &[P2pHandle],
    key: u8,
    faulty: Option<(Arc<dyn ConsensusStore>, Arc<FaultPlan>)>,
) {
    let (store, faults) = match faulty {
        Some((store, faults)) => (store, Some(faults)),
        None => (Arc::new(MemStore::new(chain.genesis())) as _, None),
    };
    let config = P2pConfig {
        seed_peers: soma_testkit::seeds(&validators.iter().collect::<Vec<_>>()),
        faults,
        ..P2pConfig::default()
    };
    let node = soma_testkit::node(chain, key, config, store);
    let deadline = Instant::now() + Duration::from_secs(60);
    while node.sync_status().await.unwrap().synced < chain.tip() {
        assert!(Instant::now() < deadline, "sync did not finish");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    node.shutdown().await;
}

/// How a trace fits what is looked for (`None`: it does not).
type Score = fn(&str) -> Option<usize>;

/// Headers in a trace: one, plus one per restart.
fn headers(trace: &str) -> usize {
    trace.matches("\"init\"").count()
}

/// The trace of `actor` that `score` rates highest.
fn best_trace(dir: &Path, actor: &str, score: Score) -> std::io::Result<PathBuf> {
    let mut best: Option<(usize, PathBuf)> = None;
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let ours = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(&format!("{actor}-")));
        if !ours {
            continue;
        }
        let Some(s) = score(&std::fs::read_to_string(&path)?) else {
            continue;
        };
        if best.as_ref().is_none_or(|(b, _)| s > *b) {
            best = Some((s, path));
        }
    }
    best.map(|(_, p)| p)
        .ok_or_else(|| std::io::Error::other(format!("no {actor} trace fits")))
}
