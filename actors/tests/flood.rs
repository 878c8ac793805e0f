//! A peer that answers block fetches with endless maximal chunks of blocks
//! nobody asked for. The node cuts the stream at the first such block,
//! bans the peer, keeps its memory within the fetch budget, and syncs from
//! the honest peers. Alone in its test binary, so the process's peak
//! memory is this test's.

use std::sync::Arc;
use std::time::Duration;

use soma_actors::P2pConfig;
use soma_actors::discovery::SeedPeer;
use soma_chain::{ChainBuilder, ChainConfig};
use soma_store::{ConsensusStore, MemStore};
use soma_testkit::byzantine::{self, Lie};
use soma_testkit::{assert_same_chain, seeds, validator, validator_up_to, wait_banned};

const DEADLINE: Duration = Duration::from_secs(120);
const MIB: u64 = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_unrequested_maximal_chunks_is_cut_at_the_first_block_and_memory_stays_bounded()
{
    let chain = Arc::new(ChainBuilder::new(ChainConfig::validators(4)).build(400));
    let partial = validator_up_to(&chain, 200, 1);
    let (liar, address) = byzantine::serve(chain.clone(), Lie::FloodsBlocks, 100).await;
    let mut seed_peers = seeds(&[&partial]);
    seed_peers.push(SeedPeer {
        peer_id: Some(liar),
        address,
    });
    let store: Arc<dyn ConsensusStore> = Arc::new(MemStore::new(chain.genesis()));
    let mut config = P2pConfig {
        seed_peers,
        timeout: Duration::from_secs(5),
        ban_duration: Duration::from_secs(3_600),
        ..P2pConfig::default()
    };
    let budget = 64 * MIB;
    config.state_sync.max_total_fetched_bytes = budget;
    let before = soma_testkit::peak_rss();
    let node = soma_testkit::node(&chain, 9, config, store.clone());
    wait_banned(&node, &[liar], DEADLINE).await;
    let status = node.sync_status().await.unwrap();
    assert!(status.synced <= 200, "{status:?}");
    // Each fetch to the liar holds one maximal message before it is cut:
    // far below a budget that the old behaviour (buffering up to 4 MiB per
    // block asked for, 400 blocks per fetch) overran many times over.
    let grown = soma_testkit::peak_rss().saturating_sub(before);
    eprintln!("peak memory grew by {} KiB", grown / 1024);
    assert!(
        grown <= budget,
        "peak memory grew by {} MiB, over the {} MiB fetch budget",
        grown / MIB,
        budget / MIB
    );
    let full = validator(&chain, 2);
    node.connect(Some(full.peer_id()), full.local_addr().to_string());
    soma_testkit::wait_synced(&node, chain.tip(), DEADLINE).await;
    assert_same_chain(&chain, store.as_ref());
    node.shutdown().await;
    partial.shutdown().await;
    full.shutdown().await;
}
