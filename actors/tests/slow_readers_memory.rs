//! Clients that never read ask for many megabytes of blocks on every
//! stream they may open. What the node buffers for them stays within each
//! connection's budget of unsent answers until the send deadline releases
//! it. Alone in its test binary, so the process's peak memory is this
//! test's.

#[path = "support/slow_readers.rs"]
mod support;

use std::sync::Arc;
use std::time::Duration;

use soma_actors::P2pConfig;
use soma_chain::{ChainBuilder, ChainConfig};
use soma_store::RedbStore;
use soma_wire::proto;
use support::{block_refs, client, server, wait_fetches};

const MIB: u64 = 1 << 20;
const CONNECTIONS: u8 = 16;
const STREAMS_PER_CONNECTION: usize = 4;
const BUDGET: u64 = 4 * MIB;
const SEND_TIMEOUT: Duration = Duration::from_secs(5);
const DEADLINE: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unread_block_streams_hold_at_most_the_connection_budget() {
    // 160 blocks of about 256 KiB: 40 MiB asked for by every stream.
    let chain = ChainBuilder::new(ChainConfig {
        transactions_per_block: 4,
        payload_bytes: 64 << 10,
        ..ChainConfig::validators(4)
    })
    .build(40);
    let mut config = P2pConfig::default();
    config.grpc.max_fetch_response_bytes = MIB as usize;
    config.grpc.max_buffered_bytes_per_connection = BUDGET as usize;
    config.grpc.max_concurrent_fetches_per_peer = STREAMS_PER_CONNECTION;
    config.grpc.max_concurrent_fetches = CONNECTIONS as usize * STREAMS_PER_CONNECTION;
    config.grpc.send_timeout = SEND_TIMEOUT;
    // Blocks read from redb are fresh buffers, as on a real node (a
    // MemStore would share them with the chain); a small page cache keeps
    // the store's own memory out of the measure.
    let dir = tempfile::tempdir().unwrap();
    let store = RedbStore::open_with_cache(dir.path().join("chain.redb"), chain.genesis(), 4 << 20)
        .expect("a store");
    let node = server(&chain, config, Arc::new(store));
    let mut readers =
        futures::future::join_all((0..CONNECTIONS).map(|i| client(&node, [100 + i; 32], 0))).await;
    let refs = block_refs(&chain, chain.tip());
    let asked: usize = (1..=chain.tip())
        .flat_map(|i| chain.blocks_of(i))
        .map(|b| b.serialized().len())
        .sum();
    assert!(asked as u64 > 32 * MIB, "{asked}");

    let before = soma_testkit::peak_rss();
    let mut streams = Vec::new();
    for reader in &mut readers {
        for _ in 0..STREAMS_PER_CONNECTION {
            let request = proto::FetchBlocksRequest {
                refs: refs.clone(),
                ..Default::default()
            };
            streams.push(reader.fetch_blocks(request).await.expect("admitted"));
        }
    }
    let streams_open = streams.len();
    wait_fetches(&node, streams_open, SEND_TIMEOUT).await;
    wait_fetches(&node, 0, DEADLINE).await;
    assert_eq!(node.responses_cut(), streams_open as u64);

    // Without the budget each stream held four chunks (two queued, one
    // being encoded, one being read): 256 MiB here.
    let grown = soma_testkit::peak_rss().saturating_sub(before);
    let bound = u64::from(CONNECTIONS) * BUDGET + 48 * MIB;
    eprintln!(
        "peak memory grew by {} KiB; bound {} KiB",
        grown / 1024,
        bound / 1024
    );
    assert!(
        grown <= bound,
        "peak memory grew by {} MiB, over {} MiB",
        grown / MIB,
        bound / MIB
    );
    drop(streams);
    node.shutdown().await;
}
