//! Load: hundreds of connections and thousands of in-flight RPCs against
//! one node. Per-peer and total fetch limits hold (the excess gets
//! RESOURCE_EXHAUSTED), honest peers are still served, the node keeps
//! syncing meanwhile, and oversize requests are refused by the transport
//! before anything decodes them.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use soma_actors::P2pConfig;
use soma_chain::{ChainBuilder, ChainConfig};
use soma_store::{ConsensusStore, MemStore};
use soma_testkit::{seeds, validator, wait_synced};
use soma_types::{BlockRef, KeyPair};
use soma_wire::proto::{self, p2p_client::P2pClient};
use soma_wire::tls::{self, NodeIdentity};
use tonic::Code;
use tonic::transport::Channel;

const CONNECTIONS: usize = 500;
const CALLS_PER_CONNECTION: usize = 10;

async fn fetch(
    mut client: P2pClient<Channel>,
    refs: Vec<BlockRef>,
) -> Result<usize, tonic::Status> {
    let request = proto::FetchBlocksRequest {
        refs: refs.into_iter().map(Into::into).collect(),
    };
    let mut stream = client.fetch_blocks(request).await?.into_inner();
    let mut n = 0;
    while let Some(chunk) = stream.message().await? {
        n += chunk.blocks.len();
    }
    Ok(n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_thousand_in_flight_rpcs_are_bounded_and_the_node_keeps_working() {
    let chain = ChainBuilder::new(ChainConfig::validators(4)).build(1_500);
    let server = validator(&chain, 1);
    let address = server.local_addr().to_string();
    // A node syncing from the server during the storm.
    let syncing_store: Arc<dyn ConsensusStore> = Arc::new(MemStore::new(chain.genesis()));
    let syncing = soma_testkit::node(
        &chain,
        2,
        P2pConfig {
            seed_peers: seeds(&[&server]),
            ..P2pConfig::default()
        },
        syncing_store,
    );

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
    let mut calls = Vec::with_capacity(CONNECTIONS * CALLS_PER_CONNECTION);
    for client in &clients {
        for _ in 0..CALLS_PER_CONNECTION {
            calls.push(tokio::spawn(fetch(client.clone(), refs.clone())));
        }
    }
    assert_eq!(calls.len(), 5_000);
    let mut outcomes: HashMap<Code, usize> = HashMap::new();
    for call in calls {
        match call.await.unwrap() {
            Ok(n) => {
                assert_eq!(n, refs.len(), "an admitted fetch returns every block");
                *outcomes.entry(Code::Ok).or_default() += 1;
            }
            Err(status) => *outcomes.entry(status.code()).or_default() += 1,
        }
    }
    let ok = outcomes.get(&Code::Ok).copied().unwrap_or(0);
    let exhausted = outcomes.get(&Code::ResourceExhausted).copied().unwrap_or(0);
    assert_eq!(
        ok + exhausted,
        5_000,
        "only successes and RESOURCE_EXHAUSTED: {outcomes:?}"
    );
    assert!(ok > 0 && exhausted > 0, "{outcomes:?}");

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
        fetch(client.clone(), refs.clone()).await.unwrap(),
        refs.len()
    );

    // An oversize request (more than 1 MiB) is refused by the transport.
    let many: Vec<BlockRef> = std::iter::repeat_n(refs[0], 40_000).collect();
    let status = fetch(client.clone(), many).await.unwrap_err();
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
