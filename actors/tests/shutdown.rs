//! Shutdown leaves no sync worker behind, even on a runtime the node does
//! not own (where nothing else would stop it).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use soma_actors::discovery::SeedPeer;
use soma_actors::{P2pBuilder, P2pConfig};
use soma_chain::{ChainBuilder, ChainConfig};
use soma_store::{ConsensusStore, MemStore, RedbStore};
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

/// A node shut down while it syncs (from a validator 40 ms away, held
/// quiet mid-transfer) and serves another node's sync: shutdown returns within the server's drain
/// (a safety net, not a timing), no task of the node is left on the
/// runtime it was given, and its store reopens consistent: the watermark a
/// commit of the chain, everything below it stored and certified.
#[test]
fn a_node_shut_down_while_it_syncs_and_serves_leaves_no_task_and_a_consistent_store() {
    init_tracing();
    let chain = ChainBuilder::new(ChainConfig::validators(4)).build(3_000);
    let tip = chain.tip();
    let node_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let test_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("chain.redb");
    test_rt.block_on(async {
        let rtt = soma_testkit::impair::Impairment::round_trip(Duration::from_millis(40));
        let (source, link, seed) =
            soma_testkit::validator_behind_link(&chain, 1, P2pConfig::default(), rtt).await;
        let store = RedbStore::open(&path, chain.genesis()).unwrap();
        let config = P2pConfig {
            seed_peers: vec![seed],
            ..P2pConfig::default()
        };
        let node = P2pBuilder::new(
            config,
            KeyPair::from_seed([8; 32]),
            chain.genesis().clone(),
            Arc::new(store),
        )
        .runtime(node_rt.handle().clone())
        .start()
        .expect("the node starts");
        // Mid-sync: part of the chain synced, then its source goes quiet
        // with the node's fetches open, so the node can never finish
        // before the shutdown, however fast this machine.
        soma_testkit::wait_until("the node mid-sync", DEADLINE, async || {
            node.sync_status().await.unwrap().synced >= 500
        })
        .await;
        link.hold();
        let config = P2pConfig {
            seed_peers: soma_testkit::seeds(&[&node]),
            ..P2pConfig::default()
        };
        let downstream =
            soma_testkit::node(&chain, 9, config, Arc::new(MemStore::new(chain.genesis())));
        // And serving: the node downstream has synced part of what the
        // node holds from it.
        soma_testkit::wait_until("the node serving", DEADLINE, async || {
            downstream.sync_status().await.unwrap().synced >= 200
        })
        .await;
        let synced = node.sync_status().await.unwrap().synced;
        assert!(synced < tip, "the node finished despite its held source");

        tokio::time::timeout(DEADLINE, node.shutdown())
            .await
            .expect("shutdown returns within the server's drain");
        drop(node);
        soma_testkit::wait_until("no task of the node left", DEADLINE, async || {
            node_rt.metrics().num_alive_tasks() == 0
        })
        .await;
        downstream.shutdown().await;
        source.shutdown().await;
    });
    // Nothing holds the store any more: it reopens, consistent.
    let store = RedbStore::open(&path, chain.genesis()).expect("the store reopens");
    let watermark = store.highest_synced_commit().unwrap();
    assert!(watermark.index >= 500, "{watermark:?}");
    assert_eq!(watermark, chain.commit_ref(watermark.index));
    for i in 1..=watermark.index {
        let commit = store
            .commit(i)
            .unwrap()
            .unwrap_or_else(|| panic!("commit {i} missing"));
        assert_eq!(commit.reference(), chain.commit_ref(i));
        let refs: Vec<_> = chain.blocks_of(i).iter().map(|b| b.reference()).collect();
        assert!(
            store.blocks(&refs).unwrap().iter().all(Option::is_some),
            "blocks of {i}"
        );
    }
    soma_testkit::assert_certified(&chain, &store, 1..=watermark.index);
}

/// On a runtime the node does not own, a store write under way when the
/// node is shut down (a local commit's, held up once stored) is waited
/// for: `shutdown` returns only once it has, and then nothing of the node
/// holds the store but the handle. Before, `shutdown` returned with the
/// write still running on the blocking pool, holding the store: an
/// embedder reopening its database found it in use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_on_a_runtime_the_node_does_not_own_waits_for_the_store_write_under_way() {
    use soma_testkit::failing_store::FailingStore;
    let chain = ChainBuilder::new(ChainConfig::validators(4)).build(1);
    let store = Arc::new(FailingStore::new(MemStore::new(chain.genesis())));
    let node = P2pBuilder::new(
        P2pConfig::default(),
        KeyPair::from_seed([9; 32]),
        chain.genesis().clone(),
        store.clone(),
    )
    .runtime(tokio::runtime::Handle::current())
    .start()
    .expect("the node starts");
    store.pause_after_writing(1);
    let sending = {
        let (node, commit) = (node.clone(), soma_testkit::local_commit(&chain, 1));
        tokio::spawn(async move { node.send_commit(commit).await })
    };
    let start = Instant::now();
    while !store.paused() {
        assert!(start.elapsed() < DEADLINE, "the write never started");
        tokio::task::yield_now().await;
    }
    let mut shutdown = Box::pin({
        let node = node.clone();
        async move { node.shutdown().await }
    });
    // Once the node's parts let go of it, the test, the handle and the
    // write under way hold the store.
    while Arc::strong_count(&store) > 3 {
        assert!(start.elapsed() < DEADLINE, "the node never stopped");
        if futures::poll!(&mut shutdown).is_ready() {
            panic!("shutdown returned with the write under way");
        }
        tokio::task::yield_now().await;
    }
    // The write is held: shutdown cannot end (had it not waited, it would
    // end as soon as the actors' thread is joined).
    let early = tokio::time::timeout(Duration::from_millis(300), &mut shutdown).await;
    assert!(early.is_err(), "shutdown returned with the write under way");
    store.resume();
    shutdown.await;
    assert_eq!(store.inner().highest_synced_commit().unwrap().index, 1);
    assert_eq!(Arc::strong_count(&store), 2, "the test's and the handle's");
    // Stored, though the node stopped before it could say so.
    let _ = sending.await.unwrap();
}

/// A FetchBlocks answer no one reads, its send deadline an hour, holds
/// the server's drain past its 5 s (its own grace, the send deadline, an
/// hour). `shutdown`, on a runtime the node
/// does not own, cuts that connection once the drain's time is up: before,
/// it returned with the connection's server still running on the
/// embedder's runtime, holding its answer until the deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_cuts_the_connections_the_drain_left_on_a_runtime_the_node_does_not_own() {
    use soma_testkit::attack::{self, Target, Unread};
    let chain = ChainBuilder::new(ChainConfig::validators(4)).build(100);
    let store = MemStore::new(chain.genesis());
    chain.write_to(&store, 100).unwrap();
    let mut config = P2pConfig::default();
    config.grpc.send_timeout = Duration::from_secs(3_600);
    let node = P2pBuilder::new(
        config,
        KeyPair::from_seed([9; 32]),
        chain.genesis().clone(),
        Arc::new(store),
    )
    .runtime(tokio::runtime::Handle::current())
    .start()
    .expect("the node starts");
    let blocks = (1..=100)
        .flat_map(|i| chain.blocks_of(i).iter())
        .map(|b| b.reference().into())
        .collect();
    let unread = Unread {
        blocks,
        commits: Default::default(),
        fetch_blocks: 1,
        fetch_commits: 0,
        hold: Duration::from_secs(3_600),
    };
    let target = Target {
        address: node.local_addr(),
        peer_id: Some(node.peer_id()),
    };
    let attack = attack::never_reading(target, 1, 0, unread).await;
    let start = Instant::now();
    while node.fetches_in_flight() != 1 {
        assert!(start.elapsed() < DEADLINE, "the fetch was never served");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(attack.tally().cut, 0);
    node.shutdown().await;
    // The client sees its call end: the connection was cut.
    while attack.tally().cut == 0 {
        assert!(
            start.elapsed() < DEADLINE,
            "the unread answer's connection outlived shutdown: {:?}",
            attack.tally()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(attack.stop().answered, 0);
}
