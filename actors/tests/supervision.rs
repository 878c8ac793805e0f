//! The supervision tree on a real node: a panic injected into the handler
//! of each long-lived actor while the node is halfway through a catch-up.
//! The actor is restarted in place, sync completes with the validators'
//! chain, the restart is counted in `health()`, and the handle still
//! answers every call. An actor that panics on every input is restarted up
//! to the intensity limit, then the node stops, saying which actor failed.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use soma_actors::faults::FaultPlan;
use soma_actors::supervisor;
use soma_actors::system::{LocalCommit, P2pError};
use soma_actors::{P2pConfig, P2pHandle};
use soma_chain::{Chain, ChainBuilder, ChainConfig};
use soma_store::{ConsensusStore, MemStore};
use soma_testkit::byzantine::{Lie, serve_observed};
use soma_testkit::{assert_same_chain, init_tracing, seeds, validator, wait_synced};
use soma_wire::proto;

const COMMITS: u64 = 2_000;
/// The fault waits for the node's watermark to be inside this range: the
/// node has applied batches and has batches left to fetch.
const MID_SYNC: std::ops::RangeInclusive<u64> = 300..=1_700;
const DEADLINE: Duration = Duration::from_secs(180);

/// Every long-lived actor, by the name faults and `health()` use.
const ACTORS: [&str; 7] = [
    "peer_heights",
    "verifier",
    "connections",
    "discovery",
    "state_sync",
    "grpc_adapter",
    "reserved_slots",
];

fn chain() -> Chain {
    ChainBuilder::new(ChainConfig {
        commits_per_epoch: Some(800),
        ..ChainConfig::validators(4)
    })
    .build(COMMITS)
}

/// A fresh node syncing from `validators`, with `faults`; discovery and
/// height queries run often, so every actor gets inputs during the sync.
fn fresh(
    chain: &Chain,
    validators: &[P2pHandle],
    store: Arc<dyn ConsensusStore>,
    faults: Arc<FaultPlan>,
) -> P2pHandle {
    let mut config = P2pConfig {
        seed_peers: seeds(&validators.iter().collect::<Vec<_>>()),
        height_query_interval: Duration::from_millis(50),
        faults: Some(faults),
        ..P2pConfig::default()
    };
    config.discovery.interval_ms = 50;
    soma_testkit::node(chain, 9, config, store)
}

/// Panics the handler of `actor` once, on its first input after the
/// store's watermark entered [`MID_SYNC`].
fn panic_mid_sync(faults: &FaultPlan, actor: &str, store: &Arc<dyn ConsensusStore>) {
    let store = store.clone();
    faults.panic_actor_when(actor, move || {
        let watermark = store.highest_synced_commit().map_or(0, |c| c.index);
        MID_SYNC.contains(&watermark)
    });
}

/// Restarts of each actor, as `health()` reports them.
fn restarts(node: &P2pHandle) -> Vec<(&'static str, u64)> {
    node.health()
        .actors
        .iter()
        .map(|a| (a.name, a.restarts))
        .collect()
}

/// Every query of the handle gets an answer, and a local commit stored
/// already is taken as done (StateSync handled it).
async fn assert_handle_answers(node: &P2pHandle, chain: &Chain) {
    let status = node.sync_status().await.expect("sync status");
    assert_eq!(status.synced, chain.tip());
    assert!(!node.connected_peers().await.expect("connected").is_empty());
    node.known_peers().await.expect("known peers");
    assert!(!node.peer_heights().await.expect("heights").is_empty());
    let stale = LocalCommit {
        commit: chain.commit(1),
        blocks: chain.blocks_of(1).to_vec(),
        certificate: Vec::new(),
        next_committee: None,
    };
    assert!(
        matches!(node.send_commit(stale).await, Ok(())),
        "a commit stored already is taken as done"
    );
    let certificate = chain.certificate(chain.tip()).to_vec();
    node.send_certificate(chain.tip(), certificate)
        .await
        .expect("a certificate of a stored commit is stored");
}

/// A running scenario: validators serve the chain, the node syncs it, and
/// `actor` panics once mid-sync.
struct Scenario {
    actor: &'static str,
    chain: Chain,
    validators: Vec<P2pHandle>,
    store: Arc<dyn ConsensusStore>,
    faults: Arc<FaultPlan>,
    node: P2pHandle,
}

impl Scenario {
    fn start(actor: &'static str) -> Scenario {
        init_tracing();
        let chain = chain();
        let validators: Vec<P2pHandle> = (1..=2).map(|k| validator(&chain, k)).collect();
        let store: Arc<dyn ConsensusStore> = Arc::new(MemStore::new(chain.genesis()));
        let faults = Arc::new(FaultPlan::default());
        panic_mid_sync(&faults, actor, &store);
        let node = fresh(&chain, &validators, store.clone(), faults.clone());
        Scenario {
            actor,
            chain,
            validators,
            store,
            faults,
            node,
        }
    }

    /// Sync completes with the validators' chain, the one panic was
    /// injected and counted as the actor's one restart, and the handle
    /// answers every call.
    async fn finish(self) {
        let Scenario {
            actor,
            chain,
            validators,
            store,
            faults,
            node,
        } = self;
        wait_synced_or_report(&node, chain.tip()).await;
        assert_same_chain(&chain, store.as_ref());
        assert_eq!(faults.injected(actor), 1, "the panic was injected mid-sync");
        let expected: Vec<(&str, u64)> = ACTORS
            .iter()
            .map(|a| (*a, u64::from(*a == actor)))
            .collect();
        assert_eq!(restarts(&node), expected);
        assert!(node.health().is_healthy(), "{:?}", node.health());
        assert_handle_answers(&node, &chain).await;
        node.shutdown().await;
        for v in validators {
            v.shutdown().await;
        }
    }
}

/// Waits for `node` to apply commit `tip`; past [`DEADLINE`], fails with
/// everything that says where it stands (sync status, each actor's health,
/// the peers it holds and their heights, its fetches in flight), so that a
/// stall says which step it is stuck in.
async fn wait_synced_or_report(node: &P2pHandle, tip: u64) {
    let waited = soma_testkit::wait_applied(node, tip, DEADLINE + Duration::from_secs(1));
    if tokio::time::timeout(DEADLINE, waited).await.is_err() {
        panic!(
            "sync stalled\nstatus: {:?}\nplan: {}\nhealth: {:?}\nconnected: {:?}\nheights: {:?}\nfetches in flight: {}",
            node.sync_status().await,
            node.sync_plan().await.unwrap_or_else(|e| e.to_string()),
            node.health(),
            node.connected_peers().await,
            node.peer_heights().await,
            node.fetches_in_flight(),
        );
    }
}

async fn panic_mid_sync_and_recover(actor: &'static str) {
    Scenario::start(actor).finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_state_sync_mid_sync_is_restarted_and_sync_completes() {
    panic_mid_sync_and_recover("state_sync").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_peer_heights_mid_sync_is_restarted_and_sync_completes() {
    panic_mid_sync_and_recover("peer_heights").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_the_verifier_mid_sync_is_restarted_and_sync_completes() {
    panic_mid_sync_and_recover("verifier").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_connections_mid_sync_is_restarted_and_sync_completes() {
    panic_mid_sync_and_recover("connections").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_discovery_mid_sync_is_restarted_and_sync_completes() {
    panic_mid_sync_and_recover("discovery").await;
}

/// The syncing node's adapter hears calls to the node: a client calls
/// GetCommitInfo throughout, and the validators' discovery and height
/// queries call it too. The panic hits whichever call the adapter handles
/// first once the fault is armed; that call alone is refused UNAVAILABLE,
/// and the calls after the restart are answered again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_the_grpc_adapter_mid_sync_is_restarted_and_sync_completes() {
    let scenario = Scenario::start("grpc_adapter");
    let address = scenario.node.local_addr().to_string();
    let faults = scenario.faults.clone();
    let caller = tokio::spawn(async move {
        let timeout = Duration::from_secs(5);
        let (channel, _) = soma_wire::tls::connect(&address, None, None, timeout)
            .await
            .expect("an anonymous caller connects");
        let mut client = proto::p2p_client::P2pClient::new(channel);
        let mut codes = Vec::new();
        // Until a call sent after the panic was injected is answered.
        loop {
            let injected_before = faults.injected("grpc_adapter") == 1;
            let request = proto::GetCommitInfoRequest { index: None };
            let code = match client.get_commit_info(request).await {
                Ok(_) => tonic::Code::Ok,
                Err(status) => status.code(),
            };
            codes.push(code);
            if injected_before && code == tonic::Code::Ok {
                return codes;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    let codes = tokio::time::timeout(DEADLINE, caller)
        .await
        .expect("the caller saw the adapter come back")
        .unwrap();
    // The caller's call was refused only if it was the one that panicked.
    let refused: Vec<&tonic::Code> = codes.iter().filter(|c| **c != tonic::Code::Ok).collect();
    assert!(
        refused.is_empty() || refused == vec![&tonic::Code::Unavailable],
        "{codes:?}"
    );
    scenario.finish().await;
}

/// An actor that panics on every input is restarted `max_restarts` times;
/// its next failure stops the node: the server and every actor, the
/// handle's calls then refused, and `failed()` naming the actor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_actor_failing_past_the_intensity_limit_stops_the_node_cleanly() {
    init_tracing();
    let chain = ChainBuilder::new(ChainConfig::validators(4)).build(200);
    let validators: Vec<P2pHandle> = (1..=2).map(|k| validator(&chain, k)).collect();
    let store: Arc<dyn ConsensusStore> = Arc::new(MemStore::new(chain.genesis()));
    let faults = Arc::new(FaultPlan::default());
    faults.panic_actor_always("state_sync");
    let config = P2pConfig {
        seed_peers: seeds(&validators.iter().collect::<Vec<_>>()),
        supervision: supervisor::Config {
            max_restarts: 3,
            restart_window_ms: 60_000,
        },
        faults: Some(faults.clone()),
        ..P2pConfig::default()
    };
    let node = soma_testkit::node(&chain, 9, config, store);
    let address = node.local_addr();
    let failure = tokio::time::timeout(DEADLINE, node.failed())
        .await
        .expect("the node stops")
        .expect("on a failure");
    assert_eq!(failure.actor, "state_sync");
    assert_eq!(failure.failures, 4);
    assert!(
        failure
            .to_string()
            .contains("the state_sync actor failed 4 times"),
        "{failure}"
    );
    // Three restarts, then the fourth failure: four injected panics.
    assert_eq!(faults.injected("state_sync"), 4);
    let health = node.health();
    assert!(!health.running && !health.is_healthy(), "{health:?}");
    assert_eq!(health.failure, Some(failure));
    let state_sync = health.actors.iter().find(|a| a.name == "state_sync");
    assert_eq!(state_sync.map(|a| a.restarts), Some(3));
    // Never half-running: every actor stops, and the server with them.
    let deadline = Instant::now() + DEADLINE;
    while node.health().actors.iter().any(|a| a.alive) {
        assert!(Instant::now() < deadline, "{:?}", node.health());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(matches!(node.sync_status().await, Err(P2pError::Stopped)));
    assert!(matches!(
        node.connected_peers().await,
        Err(P2pError::Stopped)
    ));
    let address = address.to_string();
    let refused = soma_wire::tls::connect(&address, None, None, Duration::from_secs(2)).await;
    assert!(refused.is_err(), "the server stopped listening");
    node.shutdown().await;
    for v in validators {
        v.shutdown().await;
    }
}

/// Waits until `done`, polling; fails past [`DEADLINE`].
async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A StateSync restart aborts its pushes to the peers behind; it pushes
/// the advertised height to them again, even when that height never rises
/// again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_sync_restart_pushes_the_advertised_height_again_to_peers_behind() {
    init_tracing();
    let chain = Arc::new(ChainBuilder::new(ChainConfig::validators(4)).build(300));
    let source = validator(&chain, 1);
    // Claims no commit, so it is behind, and holds every push open: the
    // push on its way when StateSync restarts is aborted, not answered.
    let behind = serve_observed(chain.clone(), Lie::StallsPushes, 40).await;
    let faults = Arc::new(FaultPlan::default());
    let config = P2pConfig {
        seed_peers: vec![seeds(&[&source]).remove(0), behind.seed()],
        // No push or query ends by its timeout during the test.
        timeout: Duration::from_secs(3_600),
        faults: Some(faults.clone()),
        ..P2pConfig::default()
    };
    let store: Arc<dyn ConsensusStore> = Arc::new(MemStore::new(chain.genesis()));
    let node = soma_testkit::node(&chain, 9, config, store);
    wait_synced(&node, chain.tip(), DEADLINE).await;
    // One push reached the peer behind, and is held: each peer gets one
    // push at a time, and this one is never answered.
    wait_for("a push held by the peer behind", || {
        behind.stalled.load(Ordering::SeqCst) == 1
    })
    .await;
    let before = behind.pushes();
    assert_eq!(before.len(), 1, "{before:?}");

    faults.panic_actor("state_sync", 1);
    wait_for("StateSync restarted", || {
        restarts(&node).contains(&("state_sync", 1))
    })
    .await;
    // The aborted push is sent again, with the height advertised now.
    wait_for("the height pushed again", || behind.pushes().len() == 2).await;
    assert_eq!(behind.pushes(), [before[0], chain.tip()]);
    wait_for("the new push held", || {
        behind.stalled.load(Ordering::SeqCst) == 1
    })
    .await;
    node.shutdown().await;
    source.shutdown().await;
}

/// A dial whose task panics (an unwinding task reports nothing) frees the
/// address and the slot it held: the node dials its one seed again and
/// connects. Before, the address stayed "being dialled" for as long as
/// Connections lived, and every later dial of it was dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dial_whose_task_panics_frees_its_address_and_the_seed_is_dialled_again() {
    init_tracing();
    let chain = ChainBuilder::new(ChainConfig::validators(4)).build(20);
    let source = validator(&chain, 1);
    let faults = Arc::new(FaultPlan::default());
    *faults.dial_panics.lock().unwrap() = 2;
    let config = P2pConfig {
        seed_peers: seeds(&[&source]),
        faults: Some(faults.clone()),
        ..P2pConfig::default()
    };
    let store: Arc<dyn ConsensusStore> = Arc::new(MemStore::new(chain.genesis()));
    let node = soma_testkit::node(&chain, 9, config, store);
    let deadline = Instant::now() + DEADLINE;
    loop {
        let connected = node.connected_peers().await.expect("connected peers");
        if connected.contains(&source.peer_id()) {
            assert_eq!(connected.len(), 1, "{connected:?}");
            break;
        }
        assert!(Instant::now() < deadline, "the seed was never connected");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(faults.injected("dial"), 2);
    wait_synced(&node, chain.tip(), DEADLINE).await;
    // Only the panics: Connections itself was never restarted.
    assert!(
        restarts(&node).iter().all(|(_, r)| *r == 0),
        "{:?}",
        restarts(&node)
    );
    node.shutdown().await;
    source.shutdown().await;
}

/// A tick whose question to PeerHeights is still on its way asks nothing
/// more: with PeerHeights held up (its questions held) for a hundred ticks
/// of a millisecond, exactly one question is out, where each tick used to
/// send one more; let go, the ticks ask again and the node syncs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tick_asks_peer_heights_one_question_at_a_time_while_it_is_held_up() {
    init_tracing();
    let chain = chain();
    let validators: Vec<P2pHandle> = (1..=2).map(|k| validator(&chain, k)).collect();
    let faults = Arc::new(FaultPlan::default());
    faults.hold_highest_questions(true);
    let config = P2pConfig {
        seed_peers: seeds(&validators.iter().collect::<Vec<_>>()),
        tick: Duration::from_millis(1),
        faults: Some(faults.clone()),
        ..P2pConfig::default()
    };
    let store: Arc<dyn ConsensusStore> = Arc::new(MemStore::new(chain.genesis()));
    let node = soma_testkit::node(&chain, 9, config, store.clone());
    soma_testkit::wait_until("a hundred ticks", DEADLINE, async || faults.ticks() >= 100).await;
    assert_eq!(faults.highest_questions(), 1, "one question out at a time");
    faults.hold_highest_questions(false);
    let asked = faults.highest_questions();
    soma_testkit::wait_until("the ticks asking again", DEADLINE, async || {
        faults.highest_questions() > asked
    })
    .await;
    wait_synced_or_report(&node, chain.tip()).await;
    assert_same_chain(&chain, store.as_ref());
    node.shutdown().await;
    for v in validators {
        v.shutdown().await;
    }
}
