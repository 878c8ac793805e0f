//! Load: hundreds of connections and thousands of in-flight RPCs against
//! one node while another node syncs from it. Every call ends whole,
//! refused with RESOURCE_EXHAUSTED, or cut (as the server counts), sync
//! moves on during the storm, honest peers are still served, and
//! oversize requests are refused by the transport before anything
//! decodes them. The limits themselves are counted exactly in limits.rs.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use soma_actors::P2pConfig;
use soma_chain::{ChainBuilder, ChainConfig};
use soma_store::MemStore;
use soma_testkit::attack::blocks_fetched;
use soma_testkit::{validator_with, wait_synced};
use soma_types::{BlockRef, KeyPair};
use soma_wire::proto::{self, p2p_client::P2pClient};
use soma_wire::tls::{self, NodeIdentity};
use tonic::Code;

const CONNECTIONS: usize = 500;
const CALLS_PER_CONNECTION: usize = 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_thousand_in_flight_rpcs_are_bounded_and_the_node_keeps_working() {
    let chain = ChainBuilder::new(ChainConfig::validators(4)).build(1_500);
    // Room for every connection of the storm in the ordinary slots: all
    // of them come from loopback, which skips the address caps but holds
    // slots as any caller does.
    let server = validator_with(
        &chain,
        1,
        P2pConfig {
            grpc: soma_actors::grpc::Limits {
                max_inbound_connections: CONNECTIONS + 128,
                ..Default::default()
            },
            ..P2pConfig::default()
        },
    );
    let address = server.local_addr().to_string();
    // Half the connections authenticated (each its own identity), half
    // anonymous (all sharing one allowance).
    let mut clients = Vec::with_capacity(CONNECTIONS);
    for i in 0..CONNECTIONS {
        let identity = (i % 2 == 0).then(|| {
            NodeIdentity::generate(&KeyPair::from_seed([(i % 251) as u8 + 3; 32])).unwrap()
        });
        let (channel, _) = tls::connect(
            &address,
            identity.as_ref(),
            Some(server.peer_id()),
            Duration::from_secs(30),
        )
        .await
        .expect("connects");
        clients.push(P2pClient::new(channel).max_decoding_message_size(8 << 20));
    }
    let refs: Vec<BlockRef> = (1..=30)
        .flat_map(|i| chain.blocks_of(i).iter().map(|b| b.reference()))
        .collect();
    // A node syncing from the server through a link 40 ms away, so that
    // its sync is still under way when the storm starts.
    let link = soma_testkit::impair::ImpairedLink::start(
        tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        server.local_addr(),
        soma_testkit::impair::Impairment::round_trip(Duration::from_millis(40)),
    );
    let syncing = soma_testkit::node(
        &chain,
        2,
        P2pConfig {
            seed_peers: vec![soma_actors::discovery::SeedPeer {
                peer_id: Some(server.peer_id()),
                address: link.local_addr().to_string(),
            }],
            ..P2pConfig::default()
        },
        Arc::new(MemStore::new(chain.genesis())),
    );
    let synced = async || syncing.sync_status().await.unwrap().synced;
    soma_testkit::wait_until("sync under way", Duration::from_secs(60), async || {
        synced().await >= 100
    })
    .await;
    let before = synced().await;
    // The most fetches the server serves at once, sampled until the storm
    // has ended.
    let storm_over = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let most_in_flight = tokio::spawn({
        let (server, storm_over) = (server.clone(), storm_over.clone());
        async move {
            let mut most = 0;
            while !storm_over.load(std::sync::atomic::Ordering::Relaxed) {
                most = most.max(server.fetches_in_flight());
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            most
        }
    });
    let mut calls = Vec::with_capacity(CONNECTIONS * CALLS_PER_CONNECTION);
    for client in &clients {
        for _ in 0..CALLS_PER_CONNECTION {
            calls.push(tokio::spawn(blocks_fetched(client.clone(), refs.clone())));
        }
    }
    assert_eq!(calls.len(), 5_000);
    let mut outcomes: HashMap<Code, usize> = HashMap::new();
    // The last call returned is the end of the storm; sync moved on while
    // it lasted.
    let mut during = before;
    for call in calls {
        if call.is_finished() {
            during = during.max(synced().await);
        }
        match call.await.unwrap() {
            Ok(n) => {
                assert_eq!(n, refs.len(), "an admitted fetch returns every block");
                *outcomes.entry(Code::Ok).or_default() += 1;
            }
            Err(status) => *outcomes.entry(status.code()).or_default() += 1,
        }
    }
    storm_over.store(true, std::sync::atomic::Ordering::Relaxed);
    let most_in_flight = most_in_flight.await.unwrap();
    let count = |code| outcomes.get(&code).copied().unwrap_or(0);
    // Bounded: the server never served more fetches at once than its cap
    // (a fetch whose slot a newer one took holds it until its answer is
    // cut: at most one more each), and refused the calls past it.
    let cap = soma_actors::grpc::Limits::default().max_concurrent_fetches;
    let preempted = server.responses_preempted() as usize;
    assert!(
        most_in_flight <= cap + preempted,
        "{most_in_flight} fetches at once, {preempted} preempted"
    );
    assert!(count(Code::ResourceExhausted) > 0, "{outcomes:?}");
    // An admitted answer is whole, refused, or cut: a reader starved of
    // CPU for `fetch-stall-timeout` while every slot is wanted has its
    // stream reset (INTERNAL at the client), and the server counts it.
    // The syncing node reads from the same server, and a fetch of its
    // cut so is one of its worker restarts.
    let cut = server.responses_cut() + server.responses_preempted();
    let internal = count(Code::Internal) as u64;
    let sync_restarts = syncing.sync_status().await.unwrap().restarts;
    assert!(
        internal <= cut && cut <= internal + sync_restarts,
        "{outcomes:?}: {cut} cut, {sync_restarts} sync restarts"
    );
    assert_eq!(
        count(Code::Ok) + count(Code::ResourceExhausted) + count(Code::Internal),
        5_000,
        "only whole answers, RESOURCE_EXHAUSTED and cut answers: {outcomes:?}"
    );
    assert!(before < 1_500, "sync had ended before the storm");
    assert!(
        during > before,
        "no batch applied during the storm: {before}, {outcomes:?}"
    );

    // The node kept syncing, and an honest peer is still served.
    wait_synced(&syncing, 1_500, Duration::from_secs(120)).await;
    let honest = NodeIdentity::generate(&KeyPair::from_seed([250; 32])).unwrap();
    let (channel, _) = tls::connect(
        &address,
        Some(&honest),
        Some(server.peer_id()),
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    let client = P2pClient::new(channel).max_decoding_message_size(8 << 20);
    assert_eq!(
        blocks_fetched(client.clone(), refs.clone()).await.unwrap(),
        refs.len()
    );

    // An oversize request (more than 1 MiB) is refused by the transport.
    let many: Vec<BlockRef> = std::iter::repeat_n(refs[0], 40_000).collect();
    let status = blocks_fetched(client.clone(), many).await.unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    // ...and the server still answers.
    assert!(
        client
            .clone()
            .get_commit_availability(proto::GetCommitAvailabilityRequest {})
            .await
            .is_ok()
    );
    assert!(server.health().is_healthy());
    println!(
        "outcomes of 5,000 in-flight fetches: {outcomes:?}; oversize: {:?}",
        status.code()
    );
    drop(clients);
    syncing.shutdown().await;
    server.shutdown().await;
}
