//! Handles in one process on 127.0.0.1 with ephemeral ports, over real mutual
//! TLS and real gRPC, serving a ChainBuilder chain.

#[path = "support/slow_readers.rs"]
#[allow(dead_code)]
mod slow_readers;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use soma_actors::{P2pBuilder, P2pConfig, P2pHandle};
use soma_chain::{Chain, ChainBuilder, ChainConfig};
use soma_store::{ConsensusStore, MemStore};
use soma_types::verify::{ExpectedBlocks, verify_commit_batch, verify_fetched_blocks};
use soma_types::{
    BlockRef, KeyPair, Limits, PeerId, SignedNodeInfo, UnverifiedBlock, UnverifiedCommit, codec,
};
use soma_wire::convert::Availability;
use soma_wire::proto::{self, p2p_client::P2pClient};
use soma_wire::tls::{self, NodeIdentity};
use tonic::Code;
use tonic::transport::Channel;

const WAIT: Duration = Duration::from_secs(20);

fn chain(payload_bytes: usize) -> Chain {
    ChainBuilder::new(ChainConfig {
        commits_per_epoch: Some(150),
        transactions_per_block: if payload_bytes > 100 { 10 } else { 2 },
        payload_bytes,
        ..ChainConfig::validators(4)
    })
    .build(300)
}

/// A node serving and syncing in batches of 100, the batches its store is
/// written in.
fn start(chain: &Chain, store: Arc<dyn ConsensusStore>, key: u8) -> P2pHandle {
    P2pBuilder::new(
        P2pConfig::default().with_commit_sync_batch_size(100),
        KeyPair::from_seed([key; 32]),
        chain.genesis().clone(),
        store,
    )
    .start()
    .expect("node starts")
}

fn validator(chain: &Chain, key: u8) -> P2pHandle {
    let store = MemStore::new(chain.genesis());
    chain.write_to(&store, 100).unwrap();
    start(chain, Arc::new(store), key)
}

/// A node of key 1 holding the first 100 commits of `chain`, with the
/// default settings as `edit` changes them.
fn validator_with(chain: &Chain, edit: impl FnOnce(&mut P2pConfig)) -> P2pHandle {
    let store = MemStore::new(chain.genesis());
    chain.write_to(&store, 100).unwrap();
    let mut config = P2pConfig::default();
    edit(&mut config);
    soma_testkit::node(chain, 1, config, Arc::new(store))
}

/// An anonymous caller's channel to `node`.
async fn anonymous(node: &P2pHandle) -> Channel {
    let address = node.local_addr().to_string();
    let (channel, _) = tls::connect(&address, None, None, Duration::from_secs(5))
        .await
        .expect("connects");
    channel
}

fn empty(chain: &Chain, key: u8) -> P2pHandle {
    start(chain, Arc::new(MemStore::new(chain.genesis())), key)
}

async fn client(node: &P2pHandle, identity: Option<&NodeIdentity>) -> P2pClient<Channel> {
    let (channel, peer) = tls::connect(
        &node.local_addr().to_string(),
        identity,
        Some(node.peer_id()),
        Duration::from_secs(5),
    )
    .await
    .expect("connects");
    assert_eq!(peer, node.peer_id());
    P2pClient::new(channel).max_decoding_message_size(8 << 20)
}

fn identity(seed: u8) -> NodeIdentity {
    NodeIdentity::generate(&KeyPair::from_seed([seed; 32])).unwrap()
}

async fn wait_for<F: std::future::Future<Output = bool>>(what: &str, mut check: impl FnMut() -> F) {
    let deadline = Instant::now() + WAIT;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn fetch_blocks(
    client: &mut P2pClient<Channel>,
    refs: &[BlockRef],
) -> Result<Vec<Vec<Bytes>>, tonic::Status> {
    let request = proto::FetchBlocksRequest {
        refs: refs.iter().copied().map(Into::into).collect(),
        ..Default::default()
    };
    let mut stream = client.fetch_blocks(request).await?.into_inner();
    let mut chunks = Vec::new();
    while let Some(chunk) = stream.message().await? {
        chunks.push(chunk.blocks);
    }
    Ok(chunks)
}

/// A server that cuts one answer (not handed to the transport within its
/// send deadline, the caller not reading) resets that call's stream, not
/// the connection: the caller sees the peer's status, not a transport
/// failure (which would have it drop the whole connection), and its next
/// call on the same connection is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_the_server_cuts_fails_its_call_not_the_connection() {
    use soma_actors::connections::CallError;
    const SEND_TIMEOUT: Duration = Duration::from_millis(300);
    let chain = chain(1_000);
    let a = validator_with(&chain, |c| {
        c.grpc.send_timeout = SEND_TIMEOUT;
        // A first chunk that crosses the window in a few round trips, well
        // within the deadline however busy the machine.
        c.grpc.max_fetch_response_bytes = 32 << 10;
    });
    // A stream window of 64 KiB: unread, the answer cannot all be handed
    // to the transport.
    let mut client = slow_readers::client(&a, [42; 32], 65_535).await;
    let refs: Vec<BlockRef> = (1..=100)
        .flat_map(|i| chain.commit(i).commit().blocks.clone())
        .collect();
    let request = proto::FetchBlocksRequest {
        refs: refs.iter().copied().map(Into::into).collect(),
        ..Default::default()
    };
    let mut stream = client.fetch_blocks(request).await.unwrap().into_inner();
    assert!(stream.message().await.unwrap().is_some(), "a first chunk");
    wait_for("the answer to be cut", || async { a.responses_cut() == 1 }).await;
    let status = loop {
        match stream.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the whole answer came"),
            Err(status) => break status,
        }
    };
    // The server reset the stream (INTERNAL): its answer, not a failure
    // of the transport.
    assert_eq!(
        CallError::from_status(&status),
        CallError::Status {
            code: tonic::Code::Internal as i32
        },
        "{status:?}"
    );
    // The same connection answers the next call.
    let availability = client
        .get_commit_availability(proto::GetCommitAvailabilityRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(availability.highest_synced_commit, 300);
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_handles_connect_over_mutual_tls() {
    let chain = chain(32);
    let a = validator(&chain, 1);
    let b = empty(&chain, 2);
    let c = empty(&chain, 3);
    b.connect(Some(a.peer_id()), a.local_addr().to_string())
        .expect("Connections takes the dial");
    c.connect(Some(a.peer_id()), a.local_addr().to_string())
        .expect("Connections takes the dial");
    a.connect(Some(b.peer_id()), b.local_addr().to_string())
        .expect("Connections takes the dial");
    // A seed known only by address: its id is learnt from the handshake.
    c.connect(None, b.local_addr().to_string())
        .expect("Connections takes the dial");
    wait_for("b to connect to a", || async {
        b.connected_peers().await.unwrap() == vec![a.peer_id()]
    })
    .await;
    wait_for("a to connect to b", || async {
        a.connected_peers().await.unwrap() == vec![b.peer_id()]
    })
    .await;
    wait_for("c to connect to a and b", || async {
        let mut got = c.connected_peers().await.unwrap();
        got.sort();
        let mut want = vec![a.peer_id(), b.peer_id()];
        want.sort();
        got == want
    })
    .await;
    for node in [&a, &b, &c] {
        assert!(node.health().is_healthy());
        node.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_is_served_from_the_store() {
    let chain = chain(32);
    let a = validator(&chain, 1);
    let caller = identity(9);
    let mut client = client(&a, Some(&caller)).await;

    let availability = client
        .get_commit_availability(proto::GetCommitAvailabilityRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        Availability::try_from(&availability).unwrap(),
        Availability {
            chain_id: chain.chain_id(),
            highest: 300,
            lowest: 1
        }
    );

    for (index, expected) in [
        (None, Some(chain.commit_ref(300))),
        (Some(0), Some(chain.commit_ref(0))),
        (Some(57), Some(chain.commit_ref(57))),
        (Some(301), None),
    ] {
        let info = client
            .get_commit_info(proto::GetCommitInfoRequest { index })
            .await
            .unwrap()
            .into_inner();
        let got = info
            .commit
            .as_ref()
            .map(|c| soma_types::CommitRef::try_from(c).unwrap());
        assert_eq!(got, expected, "commit info for {index:?}");
    }

    // FetchCommits: capped at the batch size of 100, certified, verifiable.
    let response = client
        .fetch_commits(proto::FetchCommitsRequest {
            start: 1,
            end: 1_000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.commits.len(), 100);
    let commits = response
        .commits
        .into_iter()
        .map(|b| UnverifiedCommit::decode(b, 1 << 20).unwrap())
        .collect();
    let certifiers = response
        .certifier_blocks
        .into_iter()
        .map(|b| UnverifiedBlock::decode(b, 4 << 20).unwrap())
        .collect();
    let limits = Limits::default();
    let (commits, _) = verify_commit_batch(
        commits,
        certifiers,
        chain.genesis(),
        chain.commit_ref(0),
        &limits,
    )
    .unwrap();

    // FetchBlocks: every named block, verifiable against the commits.
    let refs: Vec<BlockRef> = commits
        .iter()
        .flat_map(|c| c.commit().blocks.clone())
        .collect();
    let chunks = fetch_blocks(&mut client, &refs).await.unwrap();
    let blocks: Vec<UnverifiedBlock> = chunks
        .into_iter()
        .flatten()
        .map(|b| UnverifiedBlock::decode(b, 4 << 20).unwrap())
        .collect();
    let mut expected = ExpectedBlocks::new(&commits);
    verify_fetched_blocks(&mut expected, blocks, chain.genesis(), &limits, true).unwrap();
    expected.finish().unwrap();

    // GetKnownPeers: the node's own signed info.
    let peers = client
        .get_known_peers(proto::GetKnownPeersRequest {
            own_info: Bytes::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let info: SignedNodeInfo = codec::decode(&peers.own_info, 2048).unwrap();
    assert_eq!(info.info.peer_id, a.peer_id());
    assert!(a.peer_id().public_key().unwrap().verify(
        soma_types::Domain::NodeInfo,
        &info.signing_digest(),
        &info.signature
    ));
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_commits_never_crosses_an_epoch() {
    let chain = chain(32);
    let a = validator(&chain, 1);
    let mut client = client(&a, Some(&identity(9))).await;
    let fetch = |start, end| proto::FetchCommitsRequest {
        start,
        end,
        ..Default::default()
    };
    let r = client
        .fetch_commits(fetch(101, 300))
        .await
        .unwrap()
        .into_inner();
    // Epoch 0 ends at 150.
    assert_eq!(r.commits.len(), 50);
    let last = UnverifiedCommit::decode(r.commits.last().unwrap().clone(), 1 << 20).unwrap();
    assert_eq!(last.reference(), chain.commit_ref(150));
    // A request from 151 is cut at the batch size, at 250, where the
    // validator keeps no certificate (it keeps them at 200 and 300): the
    // votes of the commits after 250 certify it.
    let r = client
        .fetch_commits(fetch(151, 300))
        .await
        .unwrap()
        .into_inner();
    let first = UnverifiedCommit::decode(r.commits[0].clone(), 1 << 20).unwrap();
    assert_eq!(first.commit().epoch, 1);
    assert_eq!(r.commits.len(), 100);
    let last = UnverifiedCommit::decode(r.commits.last().unwrap().clone(), 1 << 20).unwrap();
    assert_eq!(last.reference(), chain.commit_ref(250));
    assert!(r.certifier_blocks.iter().all(|b| {
        let block = UnverifiedBlock::decode(b.clone(), 1 << 23).unwrap();
        block.block().commit_votes.contains(&chain.commit_ref(250))
    }));
    let r = client
        .fetch_commits(fetch(201, 300))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.commits.len(), 100);
    a.shutdown().await;
}

/// What `node` answers to GetCommitAvailability.
async fn availability(node: &P2pHandle) -> Availability {
    let mut client = client(node, Some(&identity(9))).await;
    let answer = client
        .get_commit_availability(proto::GetCommitAvailabilityRequest {})
        .await
        .unwrap();
    Availability::try_from(answer.get_ref()).unwrap()
}

/// A node advertises, and pushes, only commits whose certificate it holds.
/// A local commit stored before its votes arrive is answered UNAVAILABLE
/// until `send_certificate`; claiming it earlier had followers ask for it
/// and count the refusal against an honest node. A node started on such a
/// store advertises the same, and a certificate without a quorum of votes
/// is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_commits_with_a_certificate_held_are_advertised_and_pushed() {
    use soma_actors::state_sync::ApplyError;
    use soma_actors::system::{LocalCommit, P2pError};
    let chain = ChainBuilder::new(ChainConfig::validators(4)).build(26);
    let store: Arc<dyn ConsensusStore> = Arc::new(MemStore::new(chain.genesis()));
    // Every height is asked only as a connection opens, so each node
    // learns of the other's certificates from its push alone; the
    // producer's discovery dials the follower back soon.
    let quiet = || P2pConfig {
        height_query_interval: Duration::from_secs(3_600),
        ..P2pConfig::default()
    };
    let mut config = quiet();
    config.discovery.interval_ms = 50;
    let producer = soma_testkit::node(&chain, 1, config, store.clone());
    let local = |i, certified: bool| LocalCommit {
        commit: chain.commit(i),
        blocks: chain.blocks_of(i).to_vec(),
        certificate: if certified {
            chain.certificate(i).to_vec()
        } else {
            Vec::new()
        },
        next_committee: None,
    };
    for i in 1..=20 {
        producer.send_commit(local(i, false)).await.unwrap();
    }
    let advertised = |highest| Availability {
        chain_id: chain.chain_id(),
        highest,
        lowest: 1,
    };
    assert_eq!(availability(&producer).await, advertised(0));

    let config = P2pConfig {
        seed_peers: soma_testkit::seeds(&[&producer]),
        ..quiet()
    };
    let follower = soma_testkit::node(&chain, 2, config, Arc::new(MemStore::new(chain.genesis())));
    let view = async |of: &P2pHandle, peer: PeerId| {
        let views = of.peer_heights().await.unwrap();
        views.into_iter().find(|v| v.peer == peer)
    };
    let (producer_id, follower_id) = (producer.peer_id(), follower.peer_id());
    wait_for("each hears the other's height", async || {
        let heard = async |of, peer| view(of, peer).await.is_some_and(|v| v.chain_id.is_some());
        heard(&follower, producer_id).await && heard(&producer, follower_id).await
    })
    .await;
    assert_eq!(view(&follower, producer_id).await.unwrap().highest, 0);

    // Each certificate is advertised, and the follower syncs to it.
    let certify = async |i| {
        let certificate = chain.certificate(i).to_vec();
        producer.send_certificate(i, certificate).await.unwrap();
        assert_eq!(availability(&producer).await, advertised(i));
        soma_testkit::wait_synced(&follower, i, WAIT).await;
    };
    certify(10).await;
    // A node started on the producer's store: commits 1..=20, a
    // certificate of commit 10 alone.
    let second = start(&chain, store.clone(), 3);
    assert_eq!(availability(&second).await, advertised(10));
    second.shutdown().await;
    certify(20).await;

    // With the follower listening: local commits without certificates are
    // not claimed, nor is an empty certificate or one short of a quorum.
    for i in 21..=25 {
        producer.send_commit(local(i, false)).await.unwrap();
    }
    producer.send_certificate(25, Vec::new()).await.unwrap();
    let short = chain.certificate(25)[..1].to_vec();
    assert!(matches!(
        producer.send_certificate(25, short).await,
        Err(P2pError::Refused(ApplyError::NoQuorum(25)))
    ));
    assert_eq!(availability(&producer).await, advertised(20));
    let status = producer.sync_status().await.unwrap();
    assert_eq!((status.synced, status.advertised), (25, 20));
    assert_eq!(view(&follower, producer_id).await.unwrap().highest, 20);
    // A local commit sent with its certificate is claimed and pushed.
    producer.send_commit(local(26, true)).await.unwrap();
    assert_eq!(availability(&producer).await, advertised(26));
    soma_testkit::wait_synced(&follower, 26, WAIT).await;
    assert!(store.certificate(25).unwrap().is_none());
    let view = view(&follower, producer_id).await.unwrap();
    assert_eq!(
        (view.highest, view.failures, view.faults, view.banned_until),
        (26, 0, 0, None),
        "{view:?}"
    );
    follower.shutdown().await;
    producer.shutdown().await;
}

/// A validator holding a chain of blocks of 10 transactions with
/// `payload_bytes` payloads, a client of it, and the references of the
/// first 1,000 blocks (the most one FetchBlocks may ask for).
async fn serving_a_thousand_blocks(
    payload_bytes: usize,
) -> (P2pHandle, P2pClient<Channel>, Vec<BlockRef>) {
    let chain = chain(payload_bytes);
    let a = validator(&chain, 1);
    let client = client(&a, Some(&identity(9))).await;
    let refs: Vec<BlockRef> = (1..=260)
        .flat_map(|i| chain.blocks_of(i).iter().map(|b| b.reference()))
        .take(1_000)
        .collect();
    assert_eq!(refs.len(), 1_000);
    (a, client, refs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_blocks_streams_chunks_of_at_most_4_mib() {
    // Blocks of 10 transactions with 1,000-byte payloads: about 11 KB each.
    let (a, mut client, refs) = serving_a_thousand_blocks(1_000).await;
    let chunks = fetch_blocks(&mut client, &refs).await.unwrap();
    assert!(
        chunks.len() >= 2,
        "expected several chunks, got {}",
        chunks.len()
    );
    for chunk in &chunks {
        let bytes: usize = chunk.iter().map(Bytes::len).sum();
        assert!(bytes <= 4 << 20, "chunk of {bytes} bytes");
    }
    let got: Vec<BlockRef> = chunks
        .into_iter()
        .flatten()
        .map(|b| UnverifiedBlock::decode(b, 4 << 20).unwrap().reference())
        .collect();
    assert_eq!(got, refs);
    a.shutdown().await;
}

/// A FetchBlocks stream is counted (`soma_rpcs_total`) by how it ends, as
/// its caller sees it: OK once every block was sent, NOT_FOUND when it
/// stopped at a block not held, CANCELLED when the caller went away first;
/// a request refused before any stream, by its refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_stream_is_counted_by_how_it_ends() {
    // Blocks of about 60 KB: the 1,000 blocks of a request, some 60 MB,
    // are far more than the connection's budget (16 MiB) and the caller's
    // flow-control windows hold, so the stream cannot end before the
    // caller goes away.
    let (a, mut client, refs) = serving_a_thousand_blocks(6_000).await;
    let count = |code| {
        a.rpc_counts()
            .iter()
            .filter(|(rpc, c, _)| *rpc == "FetchBlocks" && *c == code)
            .map(|(_, _, n)| n)
            .sum::<u64>()
    };
    let codes = [Code::Ok, Code::NotFound, Code::Cancelled];
    let counted = || codes.map(count);

    // A stream is counted before its end goes out: a caller that read it
    // to the end finds it counted.
    let whole = fetch_blocks(&mut client, &refs[..10]).await.unwrap();
    assert_eq!(whole.concat().len(), 10);
    assert_eq!(counted(), [1, 0, 0]);

    let mut unknown = refs[0];
    unknown.digest.0[0] ^= 1;
    let denied = fetch_blocks(&mut client, &[refs[1], unknown]).await;
    assert_eq!(denied.unwrap_err().code(), Code::NotFound);
    assert_eq!(counted(), [1, 1, 0]);

    // One chunk read of a long stream, then the caller goes away.
    let request = proto::FetchBlocksRequest {
        refs: refs.iter().copied().map(Into::into).collect(),
        ..Default::default()
    };
    let mut stream = client.fetch_blocks(request).await.unwrap().into_inner();
    let first = stream.message().await.unwrap().expect("a first chunk");
    assert!(
        first.blocks.len() < refs.len() / 4,
        "{}",
        first.blocks.len()
    );
    drop(stream);
    // Counted once the server hears of it.
    wait_for("the stream counted as cancelled", || async {
        counted() == [1, 1, 1]
    })
    .await;

    // Refused before any stream: counted by its refusal, and no stream.
    let empty = fetch_blocks(&mut client, &[]).await;
    assert_eq!(empty.unwrap_err().code(), Code::InvalidArgument);
    assert_eq!(count(Code::InvalidArgument), 1);
    assert_eq!(counted(), [1, 1, 1]);
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_caller_reads_but_may_not_push() {
    let chain = chain(32);
    let a = validator(&chain, 1);
    let mut anonymous = client(&a, None).await;
    assert!(
        anonymous
            .get_commit_availability(proto::GetCommitAvailabilityRequest {})
            .await
            .is_ok()
    );
    let push = anonymous
        .push_commit(proto::PushCommitRequest { index: 5 })
        .await
        .unwrap_err();
    assert_eq!(push.code(), Code::PermissionDenied);
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dialling_with_the_wrong_peer_id_fails() {
    let chain = chain(32);
    let a = validator(&chain, 1);
    let wrong = PeerId::from(KeyPair::from_seed([77; 32]).public());
    let result = tls::connect(
        &a.local_addr().to_string(),
        Some(&identity(9)),
        Some(wrong),
        Duration::from_secs(5),
    )
    .await;
    assert!(result.is_err());
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_the_right_status_and_the_server_stays_up() {
    let chain = chain(32);
    let a = validator(&chain, 1);
    let mut client = client(&a, Some(&identity(9))).await;
    let fetch = |start, end| proto::FetchCommitsRequest {
        start,
        end,
        ..Default::default()
    };
    let code = |r: Result<tonic::Response<proto::FetchCommitsResponse>, tonic::Status>| {
        r.unwrap_err().code()
    };
    assert_eq!(
        code(client.fetch_commits(fetch(10, 5)).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(client.fetch_commits(fetch(0, 5)).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(client.fetch_commits(fetch(301, 400)).await),
        Code::NotFound
    );

    let refs: Vec<BlockRef> = (1..=300)
        .flat_map(|i| chain.blocks_of(i).iter().map(|b| b.reference()))
        .take(1_001)
        .collect();
    assert_eq!(
        fetch_blocks(&mut client, &refs).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    assert_eq!(
        fetch_blocks(&mut client, &[]).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let mut unknown = refs[0];
    unknown.digest.0[0] ^= 1;
    assert_eq!(
        fetch_blocks(&mut client, &[refs[1], unknown])
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    let garbage_digest = proto::FetchBlocksRequest {
        refs: vec![proto::BlockRef {
            digest: Bytes::from_static(b"not a digest"),
            ..refs[0].into()
        }],
        ..Default::default()
    };
    let status = client.fetch_blocks(garbage_digest).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    // The request cap fits the largest real request (1,000 references of
    // at most 58 bytes each, within 64,000 + 1,024 bytes) and no more: a
    // request twice that size is refused before it is decoded.
    let oversized = proto::FetchBlocksRequest {
        refs: std::iter::repeat_n(proto::BlockRef::from(refs[0]), 4_000).collect(),
        ..Default::default()
    };
    assert!(prost::Message::encoded_len(&oversized) > 2 * 65_024);
    let status = client.fetch_blocks(oversized).await.unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    let largest_real = proto::FetchBlocksRequest {
        refs: refs[..1_000]
            .iter()
            .map(|r| proto::BlockRef::from(*r))
            .collect(),
        max_message_bytes: u64::MAX,
    };
    let mut stream = client
        .fetch_blocks(largest_real)
        .await
        .unwrap()
        .into_inner();
    let mut received = 0;
    while let Some(chunk) = stream.message().await.unwrap() {
        received += chunk.blocks.len();
    }
    assert_eq!(received, 1_000);
    let garbage_info = proto::GetKnownPeersRequest {
        own_info: Bytes::from_static(&[0xff; 40]),
    };
    assert_eq!(
        client
            .get_known_peers(garbage_info)
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );

    // Still serving.
    assert!(
        client
            .get_commit_availability(proto::GetCommitAvailabilityRequest {})
            .await
            .is_ok()
    );
    assert!(a.health().is_healthy());
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_fetches_get_whole_answers_or_resource_exhausted() {
    let chain = chain(32);
    let a = validator(&chain, 1);
    let client = client(&a, Some(&identity(9))).await;
    let refs: Vec<BlockRef> = (1..=100)
        .flat_map(|i| chain.blocks_of(i).iter().map(|b| b.reference()))
        .collect();
    let tasks: Vec<_> = (0..200)
        .map(|_| {
            let mut client = client.clone();
            let refs = refs.clone();
            tokio::spawn(async move { fetch_blocks(&mut client, &refs).await })
        })
        .collect();
    let mut outcomes: HashMap<&'static str, usize> = HashMap::new();
    for t in tasks {
        match t.await.unwrap() {
            Ok(chunks) => {
                assert_eq!(chunks.iter().map(Vec::len).sum::<usize>(), refs.len());
                *outcomes.entry("ok").or_default() += 1;
            }
            Err(s) if s.code() == Code::ResourceExhausted => {
                *outcomes.entry("exhausted").or_default() += 1
            }
            Err(s) => panic!("unexpected status {s:?}"),
        }
    }
    // How many of each depends on how fast answers go; the limits
    // themselves are counted exactly in tests/limits.rs.
    assert_eq!(outcomes.values().sum::<usize>(), 200, "{outcomes:?}");
    // The slots come back: a fetch after the storm is served.
    let mut client = client;
    assert!(fetch_blocks(&mut client, &refs[..10]).await.is_ok());
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_the_port_joins_threads_and_is_idempotent() {
    let chain = chain(32);
    let a = validator(&chain, 1);
    let address = a.local_addr();
    assert!(tokio::net::TcpStream::connect(address).await.is_ok());
    a.shutdown().await;
    assert!(tokio::net::TcpStream::connect(address).await.is_err());
    let health = a.health();
    assert!(!health.running);
    assert!(health.actors.iter().all(|actor| !actor.alive), "{health:?}");
    a.shutdown().await;
    assert!(!a.health().running);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standard_health_and_reflection_services_answer_anonymous_callers() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let chain = chain(32);
    let a = validator(&chain, 1);
    let channel = anonymous(&a).await;
    let mut health = HealthClient::new(channel.clone());
    for service in ["", "soma.p2p.v1.P2p"] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(
            status,
            ServingStatus::Serving as i32,
            "health of {service:?}"
        );
    }
    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = reflection
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .unwrap()
        .into_inner();
    let response = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection answer");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(names.contains(&"soma.p2p.v1.P2p".to_string()), "{names:?}");
    assert!(
        names.contains(&"grpc.health.v1.Health".to_string()),
        "{names:?}"
    );
    a.shutdown().await;
}

/// Reads one answer from `stream`, then asserts it ends with nothing more
/// answered, no sooner than `deadline` after `started` (taken before the
/// call was made: the server's deadline starts when the call reaches it)
/// and within 30 s.
async fn answered_once_then_cut<T: std::fmt::Debug>(
    stream: &mut tonic::Streaming<T>,
    started: Instant,
    deadline: Duration,
) {
    assert!(stream.message().await.unwrap().is_some(), "answered first");
    let end = tokio::time::timeout(Duration::from_secs(30), stream.message())
        .await
        .expect("the stream ends");
    assert!(
        !matches!(end, Ok(Some(_))),
        "nothing more is answered: {end:?}"
    );
    assert!(
        started.elapsed() >= deadline,
        "cut at the deadline, not before"
    );
}

/// Health and reflection decode what P2p decodes, not tonic's 4 MiB: a
/// reflection answer copies its request, and a caller that sent maximal
/// requests on streams it never read held gigabytes a connection. A
/// reflection stream or a health Watch left open is cut at the send
/// deadline, as every P2p answer is, and the node answers anyone after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_requests_to_the_standard_services_are_refused_and_open_reflection_and_health_watch_streams_end()
 {
    use soma_actors::system::MAX_STANDARD_REQUEST_BYTES;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;

    const SEND_TIMEOUT: Duration = Duration::from_millis(500);
    let chain = chain(32);
    let a = validator_with(&chain, |c| c.grpc.send_timeout = SEND_TIMEOUT);
    let channel = anonymous(&a).await;
    let list = |host: String| ServerReflectionRequest {
        host,
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut reflection = ServerReflectionClient::new(channel.clone());
    // One byte past the cap, on each service: never answered (reflection
    // ends the stream at a request it cannot decode; health refuses it).
    let over = "x".repeat(MAX_STANDARD_REQUEST_BYTES + 1);
    let refused = match reflection
        .server_reflection_info(tokio_stream::iter(vec![list(over.clone())]))
        .await
    {
        Ok(stream) => stream.into_inner().message().await.map(|m| m.is_some()),
        Err(status) => Err(status),
    };
    // Ended before the whole request was read, the stream may also end in
    // a reset: either way, nothing was answered.
    assert!(!matches!(refused, Ok(true)), "{refused:?}");
    let status = HealthClient::new(channel.clone())
        .check(HealthCheckRequest { service: over })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange);
    // A stream whose caller never ends it: answered, then cut at the send
    // deadline rather than held open for the connection's age.
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(list(String::new())).await.unwrap();
    let started = Instant::now();
    let mut open = reflection
        .server_reflection_info(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    answered_once_then_cut(&mut open, started, SEND_TIMEOUT).await;
    drop(tx);
    // Health's Watch, which never ends on its own: cut at the deadline too.
    let started = Instant::now();
    let mut watch = HealthClient::new(channel.clone())
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    answered_once_then_cut(&mut watch, started, SEND_TIMEOUT).await;
    // An honest request of the same kind, after all that.
    let mut stream = reflection
        .server_reflection_info(tokio_stream::iter(vec![list(String::new())]))
        .await
        .unwrap()
        .into_inner();
    assert!(stream.message().await.unwrap().is_some());
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_connections_past_the_limit_are_refused_until_one_closes() {
    const LIMIT: usize = 3;
    let chain = chain(32);
    // The connections held are allowlisted peers': reserved, so a newcomer
    // cannot take their slots (an ordinary caller's, the longest idle,
    // would go for it).
    let held_ids: Vec<_> = (0..LIMIT)
        .map(|i| identity(10 + i as u8).peer_id())
        .collect();
    let a = validator_with(&chain, |c| {
        c.grpc.max_inbound_connections = LIMIT;
        c.grpc.reserved_inbound_connections = 0;
        c.allowlist = held_ids;
    });
    let available = |client: &mut P2pClient<Channel>| {
        let mut client = client.clone();
        async move {
            client
                .get_commit_availability(proto::GetCommitAvailabilityRequest {})
                .await
                .map(|r| r.into_inner().highest_synced_commit)
        }
    };

    // LIMIT connections, held open, are each served.
    let mut held = Vec::new();
    for i in 0..LIMIT {
        let mut c = client(&a, Some(&identity(10 + i as u8))).await;
        assert_eq!(available(&mut c).await.unwrap(), chain.tip());
        held.push(c);
    }
    assert_eq!(a.inbound_connections().open, LIMIT);

    // One more is refused, authenticated or not, and costs no slot.
    for caller in [Some(identity(20)), None] {
        let refused = tls::connect(
            &a.local_addr().to_string(),
            caller.as_ref(),
            Some(a.peer_id()),
            Duration::from_secs(5),
        )
        .await;
        match refused {
            Err(e) => eprintln!("refused: {e}"),
            Ok((channel, _)) => {
                let mut c = P2pClient::new(channel);
                let status = available(&mut c).await.unwrap_err();
                eprintln!("refused at the first call: {status}");
            }
        }
    }
    let inbound = a.inbound_connections();
    assert_eq!(
        (inbound.open, inbound.max, inbound.refused),
        (LIMIT, LIMIT, 2)
    );
    for c in &mut held {
        assert_eq!(available(c).await.unwrap(), chain.tip());
    }

    // One goes away: its slot comes back and a new connection gets in.
    drop(held.pop());
    wait_for("the closed connection's slot to come back", || async {
        a.inbound_connections().open == LIMIT - 1
    })
    .await;
    let mut late = client(&a, Some(&identity(30))).await;
    assert_eq!(available(&mut late).await.unwrap(), chain.tip());
    assert_eq!(a.inbound_connections().open, LIMIT);
    assert_eq!(a.inbound_connections().refused, 2);
    a.shutdown().await;
}

/// A node started from async code with a port already taken fails with
/// the bind error: the runtime it made for itself is shut down in the
/// background. Dropped as it was, inside async code, that runtime
/// panicked ("Cannot drop a runtime in a context where blocking is not
/// allowed") instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_started_from_async_code_on_a_taken_port_fails_with_the_bind_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = taken.local_addr().unwrap();
    let chain = chain(0);
    let config = P2pConfig {
        listen_address: address,
        ..P2pConfig::default()
    };
    match start_on_a_fresh_store(&chain, config) {
        Err(soma_actors::system::StartError::Bind { address: a, .. }) => assert_eq!(a, address),
        Err(e) => panic!("expected the bind error, got {e}"),
        Ok(_) => panic!("started on a taken port"),
    }
}

/// `P2pBuilder::start` of a node with `config` on a fresh store of `chain`.
fn start_on_a_fresh_store(
    chain: &Chain,
    config: P2pConfig,
) -> Result<P2pHandle, soma_actors::system::StartError> {
    P2pBuilder::new(
        config,
        KeyPair::from_seed([5; 32]),
        chain.genesis().clone(),
        Arc::new(MemStore::new(chain.genesis())),
    )
    .start()
}

/// A config the node cannot work with (here a tick of zero, which made
/// the actors' interval fire without end) is refused by `start`, naming
/// the field.
#[test]
fn a_node_started_with_a_zero_tick_is_refused_naming_it() {
    let chain = chain(0);
    let config = P2pConfig {
        tick: Duration::ZERO,
        ..P2pConfig::default()
    };
    match start_on_a_fresh_store(&chain, config) {
        Err(soma_actors::system::StartError::Config(e)) => {
            assert_eq!((e.field, e.got.as_str()), ("tick", "0ms"))
        }
        Err(e) => panic!("expected the config error, got {e}"),
        Ok(_) => panic!("started with a zero tick"),
    }
}

/// External addresses are advertised once each, in the order given,
/// however they are spelled: peers refuse an info listing more than 4,
/// and the node's config counts them so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_addresses_are_advertised_once_each_whatever_their_spelling() {
    let chain = chain(0);
    let spelled = ["[2001:db8::1]:7000", "192.0.2.1:7000", "[2001:DB8::1]:7000"];
    let config = P2pConfig {
        external_addresses: spelled.iter().map(|a| a.to_string()).collect(),
        ..P2pConfig::default()
    };
    let node = soma_testkit::node(&chain, 6, config, Arc::new(MemStore::new(chain.genesis())));
    assert_eq!(
        node.node_info().info.addresses,
        vec![
            "[2001:db8::1]:7000".to_string(),
            "192.0.2.1:7000".to_string()
        ]
    );
    node.shutdown().await;
}

/// The handle's calls work from a thread that runs no tokio runtime, as
/// the handle's docs promise (their timers are made on the node's
/// runtime), and so does the shutdown. Before, each call panicked there:
/// "there is no reactor running".
#[test]
fn the_handles_calls_work_from_a_thread_without_a_runtime() {
    let chain = chain(0);
    let node = validator(&chain, 1);
    let status = futures::executor::block_on(node.sync_status()).expect("a status");
    assert_eq!(status.synced, 300);
    let peers = futures::executor::block_on(node.connected_peers()).expect("peers");
    assert_eq!(peers, Vec::new());
    futures::executor::block_on(node.shutdown());
    assert!(matches!(
        futures::executor::block_on(node.sync_status()),
        Err(soma_actors::system::P2pError::Stopped)
    ));
}

/// Two `shutdown` calls at once: the second returns only once the first
/// has joined what the node started (its actors' thread and its own
/// runtime), so that nothing of the node holds the store any longer but
/// the handle itself. Before, the second returned as soon as the server
/// had drained and the actors were told to stop, while the first was
/// still joining.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_shutdown_returns_once_the_first_has_joined_the_node() {
    let chain = chain(0);
    let node = validator(&chain, 1);
    let store = node.store();
    assert!(Arc::strong_count(store) > 1, "the actors hold the store");
    let first = node.shutdown();
    let second = async {
        node.shutdown().await;
        Arc::strong_count(store)
    };
    let ((), holders) = tokio::join!(first, second);
    assert_eq!(holders, 1, "only the handle holds the store");
}

/// A `shutdown` dropped once it has taken the node's threads to join
/// (the node no longer says it runs), then a second call: the second
/// returns once those threads are joined, so that only the handle holds
/// the store. Before, the second found nothing left to join and returned
/// at once, with the actors' thread still running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_dropped_half_way_is_finished_by_the_next_call() {
    let chain = chain(0);
    let node = validator(&chain, 1);
    let store = node.store();
    {
        let mut first = Box::pin(node.shutdown());
        while node.health().running {
            if futures::poll!(&mut first).is_ready() {
                break;
            }
            tokio::task::yield_now().await;
        }
    }
    node.shutdown().await;
    assert_eq!(
        Arc::strong_count(store),
        1,
        "only the handle holds the store"
    );
}

/// A node that decodes smaller answers than its peers fill
/// (`max_fetch_response_bytes` of 128 KiB against their 4 MiB) syncs
/// blocks of about 20 KB from them: each request says what it takes, and
/// the peers fill each message to that. Before, the peers filled messages
/// to their own cap, the node refused each as too large, and it never
/// synced a block.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_taking_smaller_answers_than_its_peers_fill_syncs_from_them() {
    let chain = ChainBuilder::new(ChainConfig {
        transactions_per_block: 10,
        payload_bytes: 1_900,
        ..ChainConfig::validators(4)
    })
    .build(100);
    let validators: Vec<P2pHandle> = (1..=2)
        .map(|k| soma_testkit::validator(&chain, k))
        .collect();
    let mut config = P2pConfig {
        seed_peers: soma_testkit::seeds(&validators.iter().collect::<Vec<_>>()),
        verify_synced_block_signatures: false,
        ..P2pConfig::default()
    };
    config.grpc.max_fetch_response_bytes = 128 << 10;
    let store: Arc<dyn ConsensusStore> = Arc::new(MemStore::new(chain.genesis()));
    let node = soma_testkit::node(&chain, 9, config, store.clone());
    soma_testkit::wait_synced(&node, 100, Duration::from_secs(60)).await;
    soma_testkit::assert_same_chain(&chain, store.as_ref());
    let status = node.sync_status().await.unwrap();
    assert_eq!(status.invalid_responses, 0);
}
