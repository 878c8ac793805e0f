//! A peer that answers block fetches with endless maximal chunks of blocks
//! nobody asked for. The node cuts the stream at the first such block,
//! bans the peer, and syncs from the honest peers. The node's memory under
//! the same flood is measured where the node is a process of its own, apart
//! from the liar's: crates/node/tests/hostile.rs.

use std::sync::Arc;
use std::time::Duration;

use soma_actors::P2pConfig;
use soma_actors::discovery::SeedPeer;
use soma_chain::{ChainBuilder, ChainConfig};
use soma_store::{ConsensusStore, MemStore};
use soma_testkit::byzantine::{self, Lie};
use soma_testkit::{assert_same_chain, seeds, validator, validator_up_to, wait_banned};

const DEADLINE: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_unrequested_maximal_chunks_is_cut_at_the_first_block_and_the_flooder_banned() {
    flooded_then_synced(Lie::FloodsBlocks).await;
}

/// Blobs one byte past what the node accepts for a block fetch: judged by
/// their size first, they passed for blocks asked for that did not fit,
/// so the node split the chunk and held nothing against the peer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unrequested_chunks_past_the_fetch_budget_are_lies_and_the_flooder_banned() {
    flooded_then_synced(Lie::FloodsBlocksPastBudget).await;
}

/// A node beside a peer holding half the chain and a flooder: the flooder
/// is banned before the node holds more than that half, and the node then
/// syncs the whole chain from an honest peer.
async fn flooded_then_synced(lie: Lie) {
    let chain = Arc::new(ChainBuilder::new(ChainConfig::validators(4)).build(400));
    let partial = validator_up_to(&chain, 200, 1);
    let (liar, address) = byzantine::serve(chain.clone(), lie, 100).await;
    let mut seed_peers = seeds(&[&partial]);
    seed_peers.push(SeedPeer {
        peer_id: Some(liar),
        address,
    });
    let store: Arc<dyn ConsensusStore> = Arc::new(MemStore::new(chain.genesis()));
    let config = P2pConfig {
        seed_peers,
        timeout: Duration::from_secs(5),
        ban_duration: Duration::from_secs(3_600),
        ..P2pConfig::default()
    };
    let node = soma_testkit::node(&chain, 9, config, store.clone());
    wait_banned(&node, &[liar], DEADLINE).await;
    let status = node.sync_status().await.unwrap();
    assert!(status.synced <= 200, "{status:?}");
    // Banned at its first answer, as a liar: no chunk was split as if its
    // blobs were blocks too large for the fetch.
    assert_eq!(status.chunks_split, 0, "{status:?}");
    let full = validator(&chain, 2);
    node.connect(Some(full.peer_id()), full.local_addr().to_string())
        .expect("Connections takes the dial");
    soma_testkit::wait_synced(&node, chain.tip(), DEADLINE).await;
    assert_same_chain(&chain, store.as_ref());
    node.shutdown().await;
    partial.shutdown().await;
    full.shutdown().await;
}
