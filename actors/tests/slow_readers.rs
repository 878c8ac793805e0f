//! Clients that ask for commits and blocks and never read the answers,
//! from more identities than there are fetch slots, while an honest peer
//! syncs from the node. Each unread answer is cut at the send deadline,
//! which frees its slot: the honest sync completes and new fetches are
//! admitted again.

#[path = "support/slow_readers.rs"]
mod support;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use soma_actors::P2pConfig;
use soma_chain::{ChainBuilder, ChainConfig};
use soma_store::{ConsensusStore, MemStore};
use soma_testkit::{assert_same_chain, seeds, wait_synced};
use soma_wire::proto;
use support::{block_refs, client, server, wait_fetches};
use tonic::Code;

/// Identities of the clients that never read; each takes two slots.
const READERS: u8 = 16;
const SEND_TIMEOUT: Duration = Duration::from_secs(3);
const DEADLINE: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_reading_clients_lose_their_fetch_slots_at_the_send_deadline() {
    let chain = Arc::new(ChainBuilder::new(ChainConfig::validators(4)).build(300));
    let slots = 2 * READERS as usize;
    let mut config = P2pConfig::default();
    config.grpc.max_concurrent_fetches = slots;
    config.grpc.max_concurrent_fetches_per_peer = 2;
    config.grpc.send_timeout = SEND_TIMEOUT;
    // The deadline alone frees the slots here: no stalled answer gives its
    // slot to a newer fetch (crates/node/tests/under_attack.rs covers that).
    config.grpc.fetch_stall_timeout = Duration::from_secs(3_600);
    let node = server(&chain, config, Arc::new(MemStore::new(chain.genesis())));

    // Connected first, so all the fetches below start within one deadline.
    let mut readers =
        futures::future::join_all((0..READERS).map(|i| client(&node, [100 + i; 32], 0))).await;
    let mut late = client(&node, [99; 32], 65_535).await;
    let refs = block_refs(&chain, 100);
    let mut streams = Vec::new();
    let mut unary = Vec::new();
    for reader in &mut readers {
        // The headers come at once; no byte of the body can.
        let request = proto::FetchBlocksRequest { refs: refs.clone() };
        streams.push(reader.fetch_blocks(request).await.expect("admitted"));
        let mut reader = reader.clone();
        unary.push(tokio::spawn(async move {
            let request = proto::FetchCommitsRequest { start: 1, end: 100 };
            reader.fetch_commits(request).await
        }));
    }
    wait_fetches(&node, slots, SEND_TIMEOUT).await;
    let refused = late
        .fetch_commits(proto::FetchCommitsRequest { start: 1, end: 100 })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");

    let store: Arc<dyn ConsensusStore> = Arc::new(MemStore::new(chain.genesis()));
    let honest_config = P2pConfig {
        seed_peers: seeds(&[&node]),
        ..P2pConfig::default()
    };
    let honest = soma_testkit::node(&chain, 9, honest_config, store.clone());
    wait_synced(&honest, chain.tip(), DEADLINE).await;
    assert_same_chain(&chain, store.as_ref());

    // Every unread answer was cut; no slot stays taken.
    wait_fetches(&node, 0, DEADLINE).await;
    assert_eq!(node.responses_cut(), slots as u64);
    assert!(unary.iter().all(|call| !call.is_finished()));

    // A client that reads is served in full.
    let request = proto::FetchBlocksRequest { refs: refs.clone() };
    let mut stream = late.fetch_blocks(request).await.unwrap().into_inner();
    let mut blocks = 0;
    while let Some(chunk) = stream.next().await {
        blocks += chunk.unwrap().blocks.len();
    }
    assert_eq!(blocks, refs.len());
    assert_eq!(node.fetches_in_flight(), 0);

    for call in unary {
        call.abort();
    }
    drop(streams);
    honest.shutdown().await;
    node.shutdown().await;
}
