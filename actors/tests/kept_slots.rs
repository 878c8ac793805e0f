//! Fetch slots kept by their connection: a connection fetching one batch
//! after another starts each fetch on the slot of its last, with the same
//! answers as through the adapter; the slot stays counted as its caller's,
//! so the per-peer cap holds exactly; and a kept slot never keeps another
//! caller, or another connection of the same caller, out.

#[path = "support/slow_readers.rs"]
mod support;

use std::sync::Arc;
use std::time::Duration;

use soma_actors::{P2pConfig, P2pHandle};
use soma_chain::{ChainBuilder, ChainConfig};
use soma_store::MemStore;
use soma_wire::proto::{self, p2p_client::P2pClient};
use support::{block_refs, client, server, wait_fetches};
use tonic::Code;
use tonic::transport::Channel;

const DEADLINE: Duration = Duration::from_secs(30);
/// A stream window that holds an unread FetchBlocks of 100 commits' blocks
/// (about 640 KB) part-sent; a FetchCommits is read whole.
const WINDOW: u32 = 65_535;

/// A server answering in batches of 100, the ranges the tests fetch.
fn config(per_peer: usize, in_all: usize) -> P2pConfig {
    let mut config = P2pConfig::default().with_commit_sync_batch_size(100);
    config.grpc.max_concurrent_fetches_per_peer = per_peer;
    config.grpc.max_concurrent_fetches = in_all;
    // Nothing is cut during a test: a held answer keeps its slot.
    config.grpc.send_timeout = Duration::from_secs(3_600);
    config.grpc.fetch_stall_timeout = Duration::from_secs(3_600);
    config
}

fn node(config: P2pConfig, commits: u64) -> (P2pHandle, Arc<soma_chain::Chain>) {
    let chain = Arc::new(ChainBuilder::new(ChainConfig::validators(4)).build(commits));
    let node = server(&chain, config, Arc::new(MemStore::new(chain.genesis())));
    (node, chain)
}

async fn fetch(
    client: &mut P2pClient<Channel>,
    start: u64,
    end: u64,
) -> Result<proto::FetchCommitsResponse, tonic::Status> {
    client
        .fetch_commits(proto::FetchCommitsRequest {
            start,
            end,
            ..Default::default()
        })
        .await
        .map(tonic::Response::into_inner)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_fetching_batch_after_batch_reuses_its_slot_with_the_same_answers() {
    let (node, _) = node(config(4, 16), 300);
    let ranges = [
        (1, 100),
        (101, 200),
        (201, 300),
        (1, 100),
        (51, 100),
        (201, 300),
    ];
    let mut a = client(&node, [100; 32], 1 << 24).await;
    let mut kept = Vec::new();
    for (start, end) in ranges {
        kept.push(fetch(&mut a, start, end).await.expect("served"));
    }
    // Every fetch after the first started on the slot of the one before.
    assert_eq!(node.fetches_on_kept_slots(), ranges.len() as u64 - 1);

    // An invalid request on a kept slot is refused as the adapter refuses
    // it, and the slot stays kept for the next.
    let refused = fetch(&mut a, 0, 5).await.expect_err("start 0 is invalid");
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert_eq!(refused.message(), "start must be at least 1");
    let refused = fetch(&mut a, 9, 8).await.expect_err("a reversed range");
    assert_eq!(refused.message(), "end is before start");
    // Capped at the batch size as the adapter caps it.
    let capped = fetch(&mut a, 1, 1_000).await.expect("served");
    assert_eq!(capped, kept[0]);
    assert_eq!(node.fetches_on_kept_slots(), ranges.len() as u64);

    // The same requests, each on a new connection (each asks the adapter),
    // get the same answers, and reuse no slot.
    for ((start, end), answer) in ranges.into_iter().zip(&kept) {
        let mut fresh = client(&node, [101; 32], 1 << 24).await;
        let through_adapter = fetch(&mut fresh, start, end).await.expect("served");
        assert_eq!(&through_adapter, answer, "{start}..={end}");
    }
    assert_eq!(node.fetches_on_kept_slots(), ranges.len() as u64);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_slot_counts_against_its_callers_cap() {
    const PER_PEER: usize = 2;
    let (node, chain) = node(config(PER_PEER, 16), 100);
    let refs = block_refs(&chain, 100);
    let mut a = client(&node, [100; 32], WINDOW).await;
    fetch(&mut a, 1, 100).await.expect("served");
    wait_fetches(&node, 0, DEADLINE).await;

    // Three block fetches held part-sent on the same connection: the
    // first on the kept slot, the second admitted up to the cap, the
    // third refused. Keeping a slot gave the caller nothing more.
    let mut held = Vec::new();
    let mut outcomes = Vec::new();
    for _ in 0..3 {
        let request = proto::FetchBlocksRequest {
            refs: refs.clone(),
            ..Default::default()
        };
        match a.fetch_blocks(request).await {
            Ok(stream) => {
                held.push(stream.into_inner());
                outcomes.push(Ok(()));
            }
            Err(status) => outcomes.push(Err(status.message().to_string())),
        }
    }
    assert_eq!(
        outcomes,
        [
            Ok(()),
            Ok(()),
            Err(format!("at most {PER_PEER} fetches at once per peer")),
        ]
    );
    assert_eq!(node.fetches_on_kept_slots(), 1);
    wait_fetches(&node, PER_PEER, DEADLINE).await;
    drop(held);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_slot_never_keeps_another_caller_or_connection_out() {
    // One fetch slot in all: whoever keeps it would shut everyone else
    // out if the adapter did not take it back.
    let (node, _) = node(config(1, 1), 100);
    let mut a = client(&node, [100; 32], 1 << 24).await;
    let mut b = client(&node, [101; 32], 1 << 24).await;
    let mut a_again = client(&node, [100; 32], 1 << 24).await;
    let answer = fetch(&mut a, 1, 100).await.expect("served");
    wait_fetches(&node, 0, DEADLINE).await;
    // a's slot is kept; b, then a on its second connection, then a on its
    // first are each admitted in turn.
    assert_eq!(fetch(&mut b, 1, 100).await.expect("b served"), answer);
    assert_eq!(
        fetch(&mut a_again, 1, 100)
            .await
            .expect("a's other connection served"),
        answer
    );
    assert_eq!(fetch(&mut a, 1, 100).await.expect("a served"), answer);
    // Each asked the adapter: every kept slot was taken back first.
    assert_eq!(node.fetches_on_kept_slots(), 0);
    // With nobody else asking, a's next fetch reuses its slot.
    assert_eq!(fetch(&mut a, 1, 100).await.expect("a served"), answer);
    assert_eq!(node.fetches_on_kept_slots(), 1);
    node.shutdown().await;
}

/// Fetches that find a slot free leave the slots connections kept alone,
/// and invalid ones never reach the adapter. Every fetch that reached it
/// took back every kept slot, and fetches are not rate-limited: a
/// stranger's fetches, valid or not, at any rate, cost honest connections
/// their kept slots (and invalid ones cost the actor's thread a message
/// each).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetches_from_anyone_that_find_a_slot_free_leave_the_slots_connections_kept() {
    let (node, _) = node(config(2, 4), 100);
    let mut a = client(&node, [100; 32], 1 << 24).await;
    let answer = fetch(&mut a, 1, 100).await.expect("served");
    wait_fetches(&node, 0, DEADLINE).await;
    let mut b = client(&node, [101; 32], 1 << 24).await;
    for _ in 0..20 {
        let refused = fetch(&mut b, 0, 100).await.expect_err("start 0 is refused");
        assert_eq!(refused.code(), Code::InvalidArgument);
        let refused = fetch(&mut b, 50, 10)
            .await
            .expect_err("a reversed range is refused");
        assert_eq!(refused.code(), Code::InvalidArgument);
    }
    // Valid fetches, each on a connection of its own, so each asks the
    // adapter: b keeps at most its 2 slots, a its 1, of 4.
    for _ in 0..10 {
        let mut again = client(&node, [101; 32], 1 << 24).await;
        fetch(&mut again, 1, 1).await.expect("served");
    }
    wait_fetches(&node, 0, DEADLINE).await;
    // a's slot was kept through all of them.
    assert_eq!(fetch(&mut a, 1, 100).await.expect("a served"), answer);
    assert_eq!(node.fetches_on_kept_slots(), 1);
    node.shutdown().await;
}

/// A kept slot never keeps out a neighbour: at its host's cap, a fetch
/// takes back the slots its host's connections kept, and at its network's
/// cap the slots its network's kept; the slots kept in other networks
/// stay kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_slot_never_keeps_another_identity_of_its_host_or_network_out() {
    let (node, _) = node(counted_by_address(1, 2), 100);
    let mut elsewhere = from(&node, 99, [127, 10, 3, 1]).await;
    let mut a = from(&node, 100, [127, 10, 2, 1]).await;
    let mut b = from(&node, 101, [127, 10, 2, 1]).await;
    let mut c = from(&node, 102, [127, 10, 2, 2]).await;
    let mut d = from(&node, 103, [127, 10, 2, 3]).await;
    let answer = fetch(&mut elsewhere, 1, 100).await.expect("served");
    assert_eq!(fetch(&mut a, 1, 100).await.expect("a served"), answer);
    wait_fetches(&node, 0, DEADLINE).await;
    // a's slot is kept, its host's one: b, of the same host, takes it back.
    assert_eq!(fetch(&mut b, 1, 100).await.expect("b served"), answer);
    // c, of another host, finds room in the network; then c's and b's
    // kept slots fill it, and d, of a third host, takes them back.
    assert_eq!(fetch(&mut c, 1, 100).await.expect("c served"), answer);
    wait_fetches(&node, 0, DEADLINE).await;
    assert_eq!(fetch(&mut d, 1, 100).await.expect("d served"), answer);
    // Each asked the adapter; the slot kept in another network was left.
    assert_eq!(node.fetches_on_kept_slots(), 0);
    assert_eq!(fetch(&mut elsewhere, 1, 100).await.expect("served"), answer);
    assert_eq!(node.fetches_on_kept_slots(), 1);
    node.shutdown().await;
}

/// A fetch with more than one cap in its way takes back the kept slots in
/// each: an identity at its own cap, calling from another network whose
/// cap others' kept slots fill, takes back its own slot kept elsewhere,
/// then that network's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetch_takes_back_the_kept_slots_of_every_cap_in_its_way() {
    let (node, _) = node(counted_by_address(1, 1), 100);
    let mut x = from(&node, 100, [127, 10, 4, 1]).await;
    let mut y = from(&node, 101, [127, 10, 5, 1]).await;
    let mut x_elsewhere = from(&node, 100, [127, 10, 5, 2]).await;
    let answer = fetch(&mut x, 1, 100).await.expect("x served");
    assert_eq!(fetch(&mut y, 1, 100).await.expect("y served"), answer);
    wait_fetches(&node, 0, DEADLINE).await;
    assert_eq!(
        fetch(&mut x_elsewhere, 1, 100)
            .await
            .expect("x served from y's network"),
        answer
    );
    assert_eq!(node.fetches_on_kept_slots(), 0);
    node.shutdown().await;
}

/// One fetch per peer, eight in all, and loopback callers counted by
/// address (not exempt): `per_host` per host, `per_network` per /24.
fn counted_by_address(per_host: usize, per_network: usize) -> P2pConfig {
    let mut config = config(1, 8);
    config.grpc.inbound_exempt_loopback = false;
    config.grpc.max_concurrent_fetches_per_host = per_host;
    config.grpc.max_concurrent_fetches_per_network = per_network;
    config
}

/// A client of `node` as identity `seed` from `source`, reading freely.
async fn from(node: &P2pHandle, seed: u8, source: [u8; 4]) -> P2pClient<Channel> {
    use soma_testkit::attack;
    use soma_wire::tls::NodeIdentity;

    let target = attack::Target {
        address: node.local_addr(),
        peer_id: Some(node.peer_id()),
    };
    let key = soma_types::KeyPair::from_seed([seed; 32]);
    let identity = NodeIdentity::generate(&key).expect("an identity");
    let source = std::net::IpAddr::from(source);
    attack::client(target, source, Some(&identity), Some(1 << 24))
        .await
        .expect("connects")
}
