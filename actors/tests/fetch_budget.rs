//! FetchCommits over real gRPC and mutual TLS on a chain of near-maximal
//! blocks: the answer, certificate included, fits the size bound that both
//! sides derive from the limits and the committee size.

use std::time::Duration;

use prost::Message;
use soma_actors::P2pConfig;
use soma_chain::{Chain, ChainBuilder, ChainConfig};
use soma_types::verify::verify_commit_batch;
use soma_types::{KeyPair, Limits, UnverifiedBlock, UnverifiedCommit};
use soma_wire::proto::{self, p2p_client::P2pClient};
use soma_wire::tls::{self, NodeIdentity};
use tonic::Code;
use tonic::transport::Channel;

/// Transactions of the largest payload (64 KiB) that fit in one block of at
/// most 4 MiB: each block is within 2% of the largest allowed.
const FULL_BLOCK_TRANSACTIONS: usize = 63;

fn full_blocks_chain(commits: u64) -> Chain {
    ChainBuilder::new(ChainConfig {
        transactions_per_block: FULL_BLOCK_TRANSACTIONS,
        payload_bytes: Limits::default().max_transaction_payload_bytes,
        ..ChainConfig::validators(4)
    })
    .build(commits)
}

async fn client(node: &soma_actors::P2pHandle, max_decoding: usize) -> P2pClient<Channel> {
    let identity = NodeIdentity::generate(&KeyPair::from_seed([9; 32])).unwrap();
    let (channel, _) = tls::connect(
        &node.local_addr().to_string(),
        Some(&identity),
        Some(node.peer_id()),
        Duration::from_secs(5),
    )
    .await
    .expect("connects");
    P2pClient::new(channel).max_decoding_message_size(max_decoding)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_commits_of_full_blocks_fits_the_derived_decoding_cap() {
    let chain = full_blocks_chain(2);
    let limits = Limits::default();
    let certificate_bytes: usize = chain
        .certificate(2)
        .iter()
        .map(|b| b.serialized().len())
        .sum();
    // The whole stored certificate is far over the 4 MiB commit budget.
    assert!(certificate_bytes > 16_000_000, "{certificate_bytes}");
    let node = soma_testkit::validator(&chain, 1);
    let budget = P2pConfig::default().grpc.max_fetch_response_bytes;
    let cap = limits.max_fetch_commits_response_bytes(budget, chain.genesis().size());

    let mut derived = client(&node, cap).await;
    let response = derived
        .fetch_commits(proto::FetchCommitsRequest {
            start: 1,
            end: 100,
            ..Default::default()
        })
        .await
        .expect("a range of full blocks is served")
        .into_inner();
    assert!(response.encoded_len() <= cap);
    assert_eq!(response.commits.len(), 2);
    assert_eq!(response.certifier_blocks.len(), 3);
    let commits = response
        .commits
        .into_iter()
        .map(|b| UnverifiedCommit::decode(b, limits.max_commit_bytes).unwrap())
        .collect();
    let certifiers = response
        .certifier_blocks
        .into_iter()
        .map(|b| UnverifiedBlock::decode(b, limits.max_block_bytes).unwrap())
        .collect();
    let (commits, _) = verify_commit_batch(
        commits,
        certifiers,
        chain.genesis(),
        chain.commit_ref(0),
        &limits,
    )
    .unwrap();
    assert_eq!(commits.last().unwrap().reference(), chain.commit_ref(2));

    // A client with a fixed 8 MiB cap cannot take three full blocks.
    let mut fixed = client(&node, 8 << 20).await;
    let refused = fixed
        .fetch_commits(proto::FetchCommitsRequest {
            start: 1,
            end: 100,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::OutOfRange);
    node.shutdown().await;
}
