//! Reserved inbound slots follow the committees installed at run time:
//! once sync applies an epoch's end, the members of the next committee
//! hold reserved slots without a restart. Real mutual TLS and gRPC on
//! 127.0.0.1, with the loopback exemption off so loopback callers are
//! judged like any other.

use std::sync::Arc;
use std::time::{Duration, Instant};

use soma_actors::{P2pBuilder, P2pConfig, P2pHandle, discovery, grpc};
use soma_chain::{Chain, ChainBuilder, ChainConfig};
use soma_store::{ConsensusStore, MemStore};
use soma_types::{KeyPair, PeerId};
use soma_wire::inbound::Counts;
use soma_wire::tls::{self, NodeIdentity};
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

/// Bounds every wait of the test.
const DEADLINE: Duration = Duration::from_secs(60);
/// The last commit of epoch 0.
const EPOCH_END: u64 = 50;
/// The chain's tip, inside epoch 1.
const TIP: u64 = 80;

/// Two epochs whose committees share no validator.
fn chain() -> Chain {
    ChainBuilder::new(ChainConfig {
        commits_per_epoch: Some(EPOCH_END),
        rotate_validators: true,
        ..ChainConfig::validators(4)
    })
    .build(TIP)
}

/// A server of the whole chain that never dials anyone, so it takes no
/// slot of the node under test.
fn silent_validator(chain: &Chain) -> P2pHandle {
    let store = MemStore::new(chain.genesis());
    chain.write_to(&store, 100).unwrap();
    let config = P2pConfig {
        discovery: discovery::Config {
            target_concurrent_connections: 0,
            ..discovery::Config::default()
        },
        ..P2pConfig::default()
    };
    P2pBuilder::new(
        config,
        KeyPair::from_seed([1; 32]),
        chain.genesis().clone(),
        Arc::new(store),
    )
    .start()
    .unwrap()
}

/// Polls `condition` every 10 ms until it holds; panics after [`DEADLINE`].
async fn wait_until(what: &str, condition: impl Fn() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Connects to `node` as `identity` and makes one call over the new
/// connection.
async fn call(node: &P2pHandle, identity: &NodeIdentity) -> Channel {
    let (channel, _) = tls::connect(
        &node.local_addr().to_string(),
        Some(identity),
        Some(node.peer_id()),
        DEADLINE,
    )
    .await
    .unwrap();
    call_again(&channel).await;
    channel
}

/// One call over `channel`.
async fn call_again(channel: &Channel) {
    HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("the call is served");
}

fn stranger() -> NodeIdentity {
    NodeIdentity::generate(&KeyPair::generate()).unwrap()
}

fn counts(admitted: u64, evicted: u64) -> Counts {
    Counts {
        admitted,
        evicted,
        ..Counts::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_of_a_committee_installed_by_sync_gets_a_reserved_slot() {
    soma_testkit::init_tracing();
    let chain = chain();
    assert_eq!(chain.committees().count(), 2);
    assert_eq!(chain.epoch_last(0), Some(EPOCH_END));
    let member = NodeIdentity::generate(&chain.config().network_key_in(1, 0)).unwrap();
    let genesis_members: Vec<PeerId> = chain
        .genesis()
        .authorities()
        .map(|(_, a)| a.network_key)
        .collect();
    assert!(!genesis_members.contains(&member.peer_id()));

    let validator = silent_validator(&chain);
    // Two slots, one of them reserved: ordinary callers share one. The
    // per-address caps (8 and 32) stay above the two slots, so only the
    // share decides.
    let ally = KeyPair::from_seed([50; 32]);
    let config = P2pConfig {
        allowlist: vec![ally.public().into()],
        grpc: grpc::Limits {
            max_inbound_connections: 2,
            reserved_inbound_connections: 1,
            inbound_exempt_loopback: false,
            inbound_idle_timeout: DEADLINE * 10,
            ..grpc::Limits::default()
        },
        ..P2pConfig::default()
    };
    let store: Arc<dyn ConsensusStore> = Arc::new(MemStore::new(chain.genesis()));
    let node = soma_testkit::node(&chain, 9, config, store);
    let inbound = || node.inbound_connections();
    // The allowlist and the genesis committee.
    assert_eq!(inbound().reserved_peers, 5);

    // Before the install the member is an ordinary caller: it holds the
    // one ordinary slot until a stranger takes it.
    let evicted = call(&node, &member).await;
    assert_eq!((inbound().counts, inbound().open), (counts(1, 0), 1));
    let _first = call(&node, &stranger()).await;
    assert_eq!((inbound().counts, inbound().open), (counts(2, 1), 1));
    // Its connection is already closed; dropping the channel keeps it
    // from dialling again.
    drop(evicted);

    // Sync crosses the end of epoch 0, which installs committee 1.
    node.connect(
        Some(validator.peer_id()),
        validator.local_addr().to_string(),
    )
    .expect("Connections takes the dial");
    soma_testkit::wait_synced(&node, TIP, DEADLINE).await;
    wait_until("committee 1 reserved", || inbound().reserved_peers == 9).await;

    // Now the member takes the reserved slot and evicts no one; the next
    // stranger evicts the other stranger, not the member, whose
    // connection keeps serving calls without a new admission.
    let reserved = call(&node, &member).await;
    assert_eq!((inbound().counts, inbound().open), (counts(3, 1), 2));
    let _second = call(&node, &stranger()).await;
    assert_eq!((inbound().counts, inbound().open), (counts(4, 2), 2));
    call_again(&reserved).await;
    assert_eq!((inbound().counts, inbound().open), (counts(4, 2), 2));

    node.shutdown().await;
    validator.shutdown().await;
}
