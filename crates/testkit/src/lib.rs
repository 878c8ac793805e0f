//! Test support: in-process networks of soma-p2p nodes on 127.0.0.1.
//!
//! A dev-dependency only; no production crate depends on it.
#![warn(missing_docs, unreachable_pub)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use soma_actors::discovery::SeedPeer;
use soma_actors::{P2pBuilder, P2pConfig, P2pHandle};
use soma_chain::Chain;
use soma_store::{ConsensusStore, MemStore};
use soma_types::KeyPair;

/// A validator serving `chain` from a MemStore written in batches of 100,
/// identified by `KeyPair::from_seed([key; 32])`.
pub fn validator(chain: &Chain, key: u8) -> P2pHandle {
    validator_up_to(chain, chain.tip(), key)
}

/// A validator holding the batches of `chain` that end at or below
/// `commits`.
pub fn validator_up_to(chain: &Chain, commits: u64, key: u8) -> P2pHandle {
    let store = MemStore::new(chain.genesis());
    for range in chain.batch_ranges(100) {
        if *range.end() <= commits {
            store
                .write_synced_batch(chain.batch(range))
                .expect("a built chain writes into a fresh store");
        }
    }
    P2pBuilder::new(
        P2pConfig::default(),
        KeyPair::from_seed([key; 32]),
        chain.genesis().clone(),
        Arc::new(store),
    )
    .start()
    .expect("a validator starts")
}

/// Seed entries (with peer ids) for `nodes`.
pub fn seeds(nodes: &[&P2pHandle]) -> Vec<SeedPeer> {
    nodes
        .iter()
        .map(|n| SeedPeer {
            peer_id: Some(n.peer_id()),
            address: n.local_addr().to_string(),
        })
        .collect()
}

/// A node on `chain`'s genesis with `store`, started with `config`.
pub fn node(
    chain: &Chain,
    key: u8,
    config: P2pConfig,
    store: Arc<dyn ConsensusStore>,
) -> P2pHandle {
    P2pBuilder::new(
        config,
        KeyPair::from_seed([key; 32]),
        chain.genesis().clone(),
        store,
    )
    .start()
    .expect("the node starts")
}

/// Waits until `node` has synced `target`, polling every 10 ms; panics with
/// the node's sync status after `deadline`. Returns the time it took.
pub async fn wait_synced(node: &P2pHandle, target: u64, deadline: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let status = node.sync_status().await.expect("the node runs");
        if status.synced >= target {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < deadline,
            "sync stalled at {} of {target}: {status:?}",
            status.synced
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
