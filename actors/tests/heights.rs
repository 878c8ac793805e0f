//! PeerHeights in running nodes, over real mutual TLS and real gRPC: only
//! peers the node holds a connection to are tracked, a flood of identities
//! pushing heights cannot crowd out an honest peer, a peer that never
//! answers a height query holds up no other peer's, and a peer that leaves
//! is forgotten.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures::StreamExt;
use soma_actors::connections::{CallError, DialError, PeerEvent};
use soma_actors::faults::FaultPlan;
use soma_actors::{P2pConfig, P2pHandle};
use soma_chain::{Chain, ChainBuilder, ChainConfig};
use soma_store::{ConsensusStore, MemStore};
use soma_testkit::byzantine::{Lie, serve_observed};
use soma_types::{KeyPair, PeerId};
use soma_wire::proto::{self, p2p_client::P2pClient};
use soma_wire::tls::{self, NodeIdentity};
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tonic::Code;

const WAIT: Duration = Duration::from_secs(60);

/// Identities that push heights, more than PeerHeights' 1,024 tracked peers.
const FLOOD: usize = 1_100;

/// Pushes in flight at once during the flood.
const FLOOD_CONCURRENCY: usize = 16;

fn chain() -> Chain {
    ChainBuilder::new(ChainConfig {
        commits_per_epoch: Some(150),
        ..ChainConfig::validators(4)
    })
    .build(300)
}

fn start(chain: &Chain, key: u8, config: P2pConfig) -> (P2pHandle, Arc<dyn ConsensusStore>) {
    let store: Arc<dyn ConsensusStore> = Arc::new(MemStore::new(chain.genesis()));
    let node = soma_testkit::node(chain, key, config, store.clone());
    (node, store)
}

/// The network key of flood identity `i`, distinct for every `i < 2^16`.
fn flood_key(i: usize) -> KeyPair {
    let mut seed = [0xF1; 32];
    seed[..2].copy_from_slice(&(i as u16).to_le_bytes());
    KeyPair::from_seed(seed)
}

/// Calls PushCommit on `node` as `identity`, over a connection of its own.
async fn push(node: &P2pHandle, identity: &NodeIdentity, index: u64) {
    let (channel, _) = tls::connect(
        &node.local_addr().to_string(),
        Some(identity),
        Some(node.peer_id()),
        Duration::from_secs(10),
    )
    .await
    .expect("connects");
    P2pClient::new(channel)
        .push_commit(proto::PushCommitRequest { index })
        .await
        .expect("the push is accepted");
}

async fn wait_for<F: std::future::Future<Output = bool>>(what: &str, mut check: impl FnMut() -> F) {
    let deadline = Instant::now() + WAIT;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn assert_same_chain(chain: &Chain, store: &dyn ConsensusStore) {
    soma_testkit::assert_same_chain(chain, store);
}

async fn tracked(node: &P2pHandle) -> Vec<PeerId> {
    node.peer_heights()
        .await
        .unwrap()
        .iter()
        .map(|v| v.peer)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heights_pushed_by_a_flood_of_identities_do_not_stop_sync_from_an_honest_peer() {
    soma_testkit::init_tracing();
    let chain = chain();
    let (node, store) = start(&chain, 9, P2pConfig::default());
    // The honest peer comes first: the node syncs from it while the flood
    // goes on.
    let honest = soma_testkit::validator(&chain, 1);
    node.connect(Some(honest.peer_id()), honest.local_addr().to_string())
        .expect("Connections takes the dial");
    wait_for("the honest peer tracked", || async {
        tracked(&node).await == vec![honest.peer_id()]
    })
    .await;

    // 1,100 authenticated callers, none of which the node dialled, each
    // claim a height far past the chain's tip.
    let started = Instant::now();
    let pushed = futures::stream::iter(0..FLOOD)
        .map(|i| {
            let node = &node;
            async move {
                let identity = NodeIdentity::generate(&flood_key(i)).unwrap();
                push(node, &identity, 1_000_000 + i as u64).await;
            }
        })
        .buffer_unordered(FLOOD_CONCURRENCY)
        .count()
        .await;
    assert_eq!(pushed, FLOOD);
    tracing::info!(elapsed = ?started.elapsed(), "flood pushed");
    // Each push reached PeerHeights before its answer was sent, so this
    // snapshot comes after all of them: none of the flood is tracked.
    assert_eq!(tracked(&node).await, vec![honest.peer_id()]);

    // The node syncs all of the honest peer's chain.
    soma_testkit::wait_synced(&node, chain.tip(), WAIT).await;
    assert_same_chain(&chain, store.as_ref());
    let views = node.peer_heights().await.unwrap();
    assert_eq!(
        views
            .iter()
            .map(|v| (v.peer, v.connected, v.highest))
            .collect::<Vec<_>>(),
        vec![(honest.peer_id(), true, chain.tip())]
    );
    assert_eq!(node.sync_status().await.unwrap().highest_known, chain.tip());
    node.shutdown().await;
    honest.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_counts_only_from_a_peer_the_node_is_connected_to() {
    soma_testkit::init_tracing();
    let chain = chain();
    // Heights are asked once, at connection; only pushes move them after.
    let config = P2pConfig {
        height_query_interval: Duration::from_secs(3_600),
        ..P2pConfig::default()
    };
    let (a, _) = start(&chain, 1, config);
    let (b, _) = start(&chain, 42, P2pConfig::default());
    let stranger = NodeIdentity::generate(&KeyPair::from_seed([43; 32])).unwrap();
    push(&a, &stranger, 77).await;

    a.connect(Some(b.peer_id()), b.local_addr().to_string())
        .expect("Connections takes the dial");
    wait_for("b's availability answer", || async {
        a.peer_heights()
            .await
            .unwrap()
            .iter()
            .any(|v| v.peer == b.peer_id() && v.chain_id == Some(chain.chain_id()))
    })
    .await;
    // Another TLS certificate bound to b's network key is b.
    let as_b = NodeIdentity::generate(&KeyPair::from_seed([42; 32])).unwrap();
    push(&a, &as_b, 10_000).await;
    wait_for("b's pushed height", || async {
        a.peer_heights()
            .await
            .unwrap()
            .iter()
            .any(|v| v.peer == b.peer_id() && v.highest == 10_000)
    })
    .await;
    // The stranger pushed first, through the same adapter: it was ignored,
    // not merely late.
    assert_eq!(tracked(&a).await, vec![b.peer_id()]);
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_from_a_stranger_has_the_node_ask_its_own_peers_at_once() {
    soma_testkit::init_tracing();
    let chain = chain();
    // Heights are asked at connection, then only when a push hints.
    let config = P2pConfig {
        height_query_interval: Duration::from_secs(3_600),
        ..P2pConfig::default()
    };
    let (a, store) = start(&chain, 1, config);
    let (b, _) = start(&chain, 42, P2pConfig::default());
    a.connect(Some(b.peer_id()), b.local_addr().to_string())
        .expect("Connections takes the dial");
    let b_at = |height: u64| {
        let a = &a;
        let b = b.peer_id();
        let chain_id = chain.chain_id();
        async move {
            a.peer_heights()
                .await
                .unwrap()
                .iter()
                .any(|v| v.peer == b && v.chain_id == Some(chain_id) && v.highest == height)
        }
    };
    wait_for("b's availability answer, at genesis", || b_at(0)).await;

    // b syncs from a validator a does not know; b does not push to a, a
    // peer it never dialled.
    let validator = soma_testkit::validator(&chain, 1);
    b.connect(
        Some(validator.peer_id()),
        validator.local_addr().to_string(),
    )
    .expect("Connections takes the dial");
    soma_testkit::wait_synced(&b, chain.tip(), WAIT).await;
    assert!(b_at(0).await, "a still holds b's height of its connection");

    // A stranger's push is not taken as a claim, but a asks b at once.
    let stranger = NodeIdentity::generate(&KeyPair::from_seed([43; 32])).unwrap();
    push(&a, &stranger, chain.tip()).await;
    soma_testkit::wait_synced(&a, chain.tip(), WAIT).await;
    assert_same_chain(&chain, store.as_ref());
    assert_eq!(tracked(&a).await, vec![b.peer_id()]);
    for node in [a, b, validator] {
        node.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_that_disconnects_is_forgotten() {
    soma_testkit::init_tracing();
    let chain = chain();
    let mut config = P2pConfig::default();
    // A dead connection is noticed at the next probe.
    config.connections.probe_interval_ms = 100;
    let (node, _) = start(&chain, 9, config);
    let honest = soma_testkit::validator(&chain, 1);
    node.connect(Some(honest.peer_id()), honest.local_addr().to_string())
        .expect("Connections takes the dial");
    soma_testkit::wait_synced(&node, chain.tip(), WAIT).await;
    assert_eq!(tracked(&node).await, vec![honest.peer_id()]);

    honest.shutdown().await;
    wait_for("the departed peer to be forgotten", || async {
        tracked(&node).await.is_empty()
    })
    .await;
    assert!(node.connected_peers().await.unwrap().is_empty());
    node.shutdown().await;
}

/// Height queries `node` has answered.
fn height_queries_answered(node: &P2pHandle) -> u64 {
    node.rpc_counts()
        .iter()
        .filter(|(method, code, _)| *method == "GetCommitAvailability" && *code == Code::Ok)
        .map(|(_, _, n)| n)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_stops_answering_height_queries_holds_up_only_its_own() {
    // A node connected to three validators and to a peer that serves the
    // chain but, once connected (its first height query is the check of
    // the dial), holds every height query open. The request timeout is an
    // hour and connections are not probed, so that no query of the silent
    // peer ends and it stays connected during the test: the validators
    // must still be asked round after round (a round waiting for every
    // peer's answer would ask them once), each as often as the others,
    // and the silent peer only once more in all (its one query still on
    // its way).
    const ROUNDS: u64 = 30;
    let chain = Arc::new(chain());
    let validators: Vec<P2pHandle> = (1..=3)
        .map(|k| soma_testkit::validator(&chain, k))
        .collect();
    let silent = serve_observed(chain.clone(), Lie::SilentAfterFirstHeightQuery, 40).await;
    let mut seed_peers = soma_testkit::seeds(&validators.iter().collect::<Vec<_>>());
    seed_peers.push(silent.seed());
    let mut config = P2pConfig {
        seed_peers,
        timeout: Duration::from_secs(3_600),
        height_query_interval: Duration::from_millis(20),
        ..P2pConfig::default()
    };
    config.connections.probe_interval_ms = 3_600_000;
    let (node, store) = start(&chain, 9, config);
    wait_for("every validator asked its height 30 times", || async {
        validators
            .iter()
            .all(|v| height_queries_answered(v) >= ROUNDS)
    })
    .await;
    // Every validator asked in every round: none left behind the others
    // (with too few queries allowed at once, the one last in a round's
    // order was: 30 against 234).
    let asked: Vec<u64> = validators.iter().map(height_queries_answered).collect();
    let (fewest, most) = (asked.iter().min().unwrap(), asked.iter().max().unwrap());
    assert!(most - fewest <= ROUNDS / 3, "{asked:?}");
    let connected = node.connected_peers().await.unwrap();
    assert!(connected.contains(&silent.peer), "{connected:?}");
    let queries = || silent.height_queries.load(Ordering::SeqCst);
    assert_eq!(queries(), 2, "the dial's check, then one query held");
    assert_eq!(silent.stalled.load(Ordering::SeqCst), 1, "still held open");
    // The honest work is done: the chain, from the validators.
    soma_testkit::wait_synced(&node, chain.tip(), WAIT).await;
    assert_same_chain(&chain, store.as_ref());
    assert_eq!(queries(), 2);
    node.shutdown().await;
    for v in validators {
        v.shutdown().await;
    }
}

/// A connection's probe is not sent again while the last one is on its
/// way: with probes every 20 ms and calls that never time out, a peer that
/// holds every check after its first holds one probe, not one more every
/// interval. A validator answering beside it is probed all the while.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_holding_its_probe_is_probed_once_at_a_time() {
    soma_testkit::init_tracing();
    const PROBES: u64 = 50;
    let chain = Arc::new(chain());
    let validator = soma_testkit::validator(&chain, 1);
    let silent = serve_observed(chain.clone(), Lie::SilentAfterFirstHeightQuery, 40).await;
    let mut config = P2pConfig {
        seed_peers: vec![soma_testkit::seeds(&[&validator]).remove(0), silent.seed()],
        timeout: Duration::from_secs(3_600),
        height_query_interval: Duration::from_secs(3_600),
        ..P2pConfig::default()
    };
    config.connections.probe_interval_ms = 20;
    config.connections.connect_timeout_ms = 3_600_000;
    let (node, _) = start(&chain, 9, config);
    wait_for("the silent peer connected", || async {
        let connected = node.connected_peers().await.unwrap();
        connected.contains(&silent.peer)
    })
    .await;
    let start = height_queries_answered(&validator);
    wait_for("the validator probed 50 times more", || async {
        height_queries_answered(&validator) >= start + PROBES
    })
    .await;
    // The dial's check, then the height query StateSync sends a new
    // connection and one probe, both held.
    assert_eq!(silent.height_queries.load(Ordering::SeqCst), 3);
    assert_eq!(silent.stalled.load(Ordering::SeqCst), 2);
    node.shutdown().await;
    validator.shutdown().await;
}

/// A probe that fails after its connection was replaced closes nothing:
/// the peer went away while a probe of its connection was held, the node
/// dropped that connection on a failed height query and connected to the
/// same peer again at another address, and the held probe, let go, found
/// the first connection broken. Its verdict names the connection it went
/// over, so the one held now stays, as `a_failure_of_a_replaced_connection_closes_nothing`
/// shows for a failure reported directly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_probe_failing_late_on_a_replaced_connection_closes_nothing() {
    soma_testkit::init_tracing();
    let chain = chain();
    let faults = Arc::new(FaultPlan::default());
    faults.hold_probes(true);
    let mut config = P2pConfig {
        height_query_interval: Duration::from_millis(50),
        faults: Some(faults.clone()),
        ..P2pConfig::default()
    };
    config.connections.probe_interval_ms = 20;
    let (node, _) = start(&chain, 9, config);
    let held = async || node.connected_peers().await.unwrap();

    let first = soma_testkit::validator(&chain, 1);
    let (peer, first_address) = (first.peer_id(), first.local_addr());
    node.connect(Some(peer), first_address.to_string())
        .expect("Connections takes the dial");
    wait_for("a probe of the first connection held", || async {
        faults.probes() == 1
    })
    .await;
    first.shutdown().await;
    wait_for("the first connection dropped", || async {
        !held().await.contains(&peer)
    })
    .await;

    let second = soma_testkit::validator(&chain, 1);
    assert_eq!(second.peer_id(), peer);
    // Another address: at the first's, the held probe would reach the
    // second and find nothing broken.
    assert_ne!(second.local_addr(), first_address);
    node.connect(Some(peer), second.local_addr().to_string())
        .expect("Connections takes the dial");
    wait_for("a probe of the second connection held", || async {
        faults.probes() == 2
    })
    .await;
    assert!(held().await.contains(&peer));
    assert_eq!(faults.probes_broken(), 0);

    let mut events = node.subscribe_peer_events();
    faults.hold_probes(false);
    wait_for("the first connection's probe failed", || async {
        faults.probes_broken() == 1
    })
    .await;
    // Handled after that probe's verdict: the second connection is held.
    assert_eq!(held().await, vec![peer]);
    loop {
        match events.try_recv() {
            Ok(PeerEvent::Disconnected { peer: p }) if p == peer => {
                panic!("the second connection was closed")
            }
            Ok(_) | Err(TryRecvError::Lagged(_)) => {}
            Err(TryRecvError::Empty) => break,
            Err(TryRecvError::Closed) => panic!("peer events closed"),
        }
    }
    // The second connection's probes answer, and none fails since.
    let probed = faults.probes();
    wait_for("the second connection probed again", || async {
        faults.probes() > probed + 2
    })
    .await;
    assert_eq!(faults.probes_broken(), 1);
    assert_eq!(held().await, vec![peer]);
    node.shutdown().await;
    second.shutdown().await;
}

/// A peer answering the cheap height query with 64 KiB, of a call whose
/// answer takes 56 bytes, is refused at the decoder's cap (the first call
/// of a dial, a probe, a height query): the node never holds such an
/// answer, nor a connection to its sender, and syncs from an honest peer
/// all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_height_answer_is_refused_at_the_cap_and_sync_goes_on() {
    soma_testkit::init_tracing();
    let chain = chain();
    let liar = serve_observed(Arc::new(chain.clone()), Lie::OversizedAvailability, 31).await;
    const { assert!(64 << 10 > soma_actors::connections::MAX_SMALL_ANSWER_BYTES) };
    let (node, store) = start(&chain, 9, P2pConfig::default());
    let mut events = node.subscribe_peer_events();
    node.connect(Some(liar.peer), liar.address.clone())
        .expect("Connections takes the dial");
    let refused = loop {
        match tokio::time::timeout(WAIT, events.recv()).await {
            Err(_) => panic!("timed out waiting for the dial of the liar to end"),
            Ok(Ok(PeerEvent::DialFailed { peer, reason, .. })) if peer == Some(liar.peer) => {
                break reason;
            }
            Ok(Ok(PeerEvent::Connected { peer, .. })) if peer == liar.peer => {
                panic!("connected to a peer whose first answer was 64 KiB")
            }
            Ok(Ok(_)) | Ok(Err(RecvError::Lagged(_))) => {}
            Ok(Err(RecvError::Closed)) => panic!("peer events closed"),
        }
    };
    assert_eq!(
        refused,
        DialError::FirstCall(CallError::Status {
            code: Code::OutOfRange as i32
        })
    );

    let honest = soma_testkit::validator(&chain, 1);
    node.connect(Some(honest.peer_id()), honest.local_addr().to_string())
        .expect("Connections takes the dial");
    soma_testkit::wait_synced(&node, chain.tip(), WAIT).await;
    assert_same_chain(&chain, store.as_ref());
    assert_eq!(tracked(&node).await, vec![honest.peer_id()]);
    node.shutdown().await;
    honest.shutdown().await;
}
