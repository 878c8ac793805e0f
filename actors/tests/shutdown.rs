//! Shutdown leaves no sync worker behind, even on a runtime the node does
//! not own (where nothing else would stop it).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use soma_actors::discovery::SeedPeer;
use soma_actors::{P2pBuilder, P2pConfig};
use soma_chain::{ChainBuilder, ChainConfig};
use soma_store::MemStore;
use soma_testkit::byzantine::{Lie, serve_counting};
use soma_testkit::init_tracing;
use soma_types::KeyPair;

const DEADLINE: Duration = Duration::from_secs(30);

/// A peer that never answers holds the node's commit fetches: the batch
/// next in line and the one fetched ahead of it; the request timeout is
/// far longer than the test. Shutting the node down aborts both workers:
/// the peer sees both calls dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_aborts_sync_workers_on_a_runtime_the_node_does_not_own() {
    init_tracing();
    let chain = Arc::new(ChainBuilder::new(ChainConfig::validators(4)).build(300));
    let (peer, address, stalled) = serve_counting(chain.clone(), Lie::NeverAnswers, 1).await;
    let config = P2pConfig {
        seed_peers: vec![SeedPeer {
            peer_id: Some(peer),
            address,
        }],
        timeout: Duration::from_secs(600),
        ..P2pConfig::default()
    };
    let node = P2pBuilder::new(
        config,
        KeyPair::from_seed([9; 32]),
        chain.genesis().clone(),
        Arc::new(MemStore::new(chain.genesis())),
    )
    .runtime(tokio::runtime::Handle::current())
    .start()
    .expect("the node starts");
    let start = Instant::now();
    // The depth of fetches ahead starts at one, and grows only when a
    // batch's turn comes, which the stalled first one never lets happen:
    // exactly two calls stall.
    while stalled.load(Ordering::SeqCst) != 2 {
        assert!(
            start.elapsed() < DEADLINE,
            "the fetch never reached the peer"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    node.shutdown().await;
    while stalled.load(Ordering::SeqCst) != 0 {
        assert!(
            start.elapsed() < DEADLINE,
            "a worker outlived the node: the peer still holds its call"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
