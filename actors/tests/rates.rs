//! Cheap calls are rated per connection and per authenticated caller: one
//! anonymous client hammering GetKnownPeers and GetCommitInfo uses up only
//! its own connection's allowance, while other clients, anonymous or not,
//! keep theirs and an honest node syncs from the same server throughout.

use std::sync::Arc;
use std::time::{Duration, Instant};

use soma_actors::{P2pConfig, P2pHandle};
use soma_chain::{ChainBuilder, ChainConfig};
use soma_store::{ConsensusStore, MemStore};
use soma_types::KeyPair;
use soma_wire::proto::{self, p2p_client::P2pClient};
use soma_wire::tls::{self, NodeIdentity};
use tonic::Code;
use tonic::transport::Channel;

const DEADLINE: Duration = Duration::from_secs(120);

async fn client(node: &P2pHandle, identity: Option<&NodeIdentity>) -> P2pClient<Channel> {
    let (channel, _) = tls::connect(
        &node.local_addr().to_string(),
        identity,
        Some(node.peer_id()),
        Duration::from_secs(5),
    )
    .await
    .expect("connects");
    P2pClient::new(channel).max_decoding_message_size(8 << 20)
}

/// Calls GetKnownPeers `n` times; returns how many were answered. Every
/// other answer must be RESOURCE_EXHAUSTED.
async fn known_peers(client: &mut P2pClient<Channel>, n: usize) -> usize {
    let mut answered = 0;
    for _ in 0..n {
        match client
            .get_known_peers(proto::GetKnownPeersRequest::default())
            .await
        {
            Ok(_) => answered += 1,
            Err(status) => assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}"),
        }
    }
    answered
}

async fn commit_infos(client: &mut P2pClient<Channel>, n: usize) -> usize {
    let mut answered = 0;
    for _ in 0..n {
        match client
            .get_commit_info(proto::GetCommitInfoRequest { index: None })
            .await
        {
            Ok(_) => answered += 1,
            Err(status) => assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}"),
        }
    }
    answered
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_hammering_cheap_calls_uses_up_only_its_own_allowance() {
    let chain = ChainBuilder::new(ChainConfig::validators(4)).build(1_000);
    let store = MemStore::new(chain.genesis());
    chain.write_to(&store, 100).unwrap();
    let mut config = P2pConfig::default();
    config.grpc.cheap_calls_per_second = 1;
    config.grpc.cheap_call_burst = 10;
    config.grpc.known_peers_calls_per_minute = 1;
    config.grpc.known_peers_burst = 5;
    let server = soma_testkit::node(&chain, 1, config, Arc::new(store));

    // An honest node syncs from the same server, started before the storm
    // (it may finish before the storm does).
    let fresh_store: Arc<dyn ConsensusStore> = Arc::new(MemStore::new(chain.genesis()));
    let fresh = soma_testkit::node(
        &chain,
        9,
        P2pConfig {
            seed_peers: soma_testkit::seeds(&[&server]),
            ..P2pConfig::default()
        },
        fresh_store.clone(),
    );

    // The anonymous hammerer: its connection gets the burst of five
    // GetKnownPeers (one more a minute) and no more.
    let mut hammer = client(&server, None).await;
    assert_eq!(known_peers(&mut hammer, 50).await, 5);
    // GetCommitInfo: the burst of ten, and one a second after it.
    let started = Instant::now();
    let answered = commit_infos(&mut hammer, 50).await;
    let refilled = started.elapsed().as_secs() as usize + 1;
    assert!(
        (10..=10 + refilled).contains(&answered),
        "{answered} answered in {:?}",
        started.elapsed()
    );

    // Another anonymous client, on its own connection, is not shut out.
    let mut stranger = client(&server, None).await;
    assert_eq!(known_peers(&mut stranger, 6).await, 5);

    // An authenticated caller is rated across its connections.
    let identity = NodeIdentity::generate(&KeyPair::from_seed([7; 32])).unwrap();
    let mut first = client(&server, Some(&identity)).await;
    let mut second = client(&server, Some(&identity)).await;
    assert_eq!(known_peers(&mut first, 3).await, 3);
    assert_eq!(known_peers(&mut second, 5).await, 2);

    soma_testkit::wait_synced(&fresh, chain.tip(), DEADLINE).await;
    soma_testkit::assert_same_chain(&chain, fresh_store.as_ref());
    fresh.shutdown().await;
    server.shutdown().await;
}
