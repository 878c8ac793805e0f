//! Benchmark 3: GetCommitAvailability through the node against a plain
//! tonic handler in the same process over the same mutual TLS; and
//! FetchCommits through the node against the bare service.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use soma_actors::P2pConfig;
use soma_store::MemStore;
use soma_types::{KeyPair, PeerId};
use soma_wire::proto::{self, p2p_client::P2pClient};
use soma_wire::tls::{self, NodeIdentity};
use tonic::transport::Channel;

use crate::bare::Bare;
use crate::report::{Cell, Section};
use crate::{Size, runtime};

/// What a load of clients achieved.
struct Load {
    requests: usize,
    bytes: usize,
    p50: Duration,
    p99: Duration,
    run: Duration,
}

/// `clients` clients, each on its own connection (one identity for all),
/// calling `call` in a loop for `run`.
async fn load<F, Fut>(clients: usize, run: Duration, address: &str, peer: PeerId, call: F) -> Load
where
    F: Fn(P2pClient<Channel>) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = usize> + Send,
{
    let identity = NodeIdentity::generate(&KeyPair::from_seed([200; 32])).expect("identity");
    let mut connected = Vec::new();
    for _ in 0..clients {
        let (channel, _) =
            tls::connect(address, Some(&identity), Some(peer), Duration::from_secs(5))
                .await
                .expect("the server accepts");
        connected.push(P2pClient::new(channel).max_decoding_message_size(usize::MAX));
    }
    let deadline = Instant::now() + run;
    let tasks: Vec<_> = connected
        .into_iter()
        .map(|client| {
            let call = call.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut bytes = 0;
                while Instant::now() < deadline {
                    let t = Instant::now();
                    bytes += call(client.clone()).await;
                    latencies.push(t.elapsed());
                }
                (latencies, bytes)
            })
        })
        .collect();
    let mut latencies = Vec::new();
    let mut bytes = 0;
    for t in tasks {
        let (l, b) = t.await.expect("a client task");
        latencies.extend(l);
        bytes += b;
    }
    latencies.sort();
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize];
    Load {
        requests: latencies.len(),
        bytes,
        p50: at(0.5),
        p99: at(0.99),
        run,
    }
}

async fn availability(mut c: P2pClient<Channel>) -> usize {
    c.get_commit_availability(proto::GetCommitAvailabilityRequest {})
        .await
        .expect("availability served");
    0
}

/// Ten FetchCommits of 100 commits; returns the bytes received.
async fn fetch(mut c: P2pClient<Channel>) -> usize {
    let mut bytes = 0;
    for start in (1..=1_000).step_by(100) {
        let r = c
            .fetch_commits(proto::FetchCommitsRequest {
                start,
                end: start + 99,
            })
            .await
            .expect("commits served")
            .into_inner();
        bytes += r
            .commits
            .iter()
            .chain(&r.certifier_blocks)
            .map(|b| b.len())
            .sum::<usize>();
    }
    bytes
}

/// The references of the blocks of commits `start..start + 100` of the
/// 1,000-commit chain, for each of its ten batches.
fn block_refs(chain: &soma_chain::Chain) -> Arc<Vec<Vec<proto::BlockRef>>> {
    Arc::new(
        (1..=1_000)
            .step_by(100)
            .map(|start| {
                (start..start + 100)
                    .flat_map(|i| chain.blocks_of(i))
                    .map(|b| b.reference().into())
                    .collect()
            })
            .collect(),
    )
}

/// Ten FetchBlocks, each of the blocks of 100 commits (about 400, what a
/// sync worker asks for one batch); returns the bytes received.
async fn fetch_blocks(mut c: P2pClient<Channel>, refs: Arc<Vec<Vec<proto::BlockRef>>>) -> usize {
    let mut bytes = 0;
    for refs in refs.iter() {
        let mut stream = c
            .fetch_blocks(proto::FetchBlocksRequest { refs: refs.clone() })
            .await
            .expect("blocks served")
            .into_inner();
        let mut blocks = 0;
        while let Some(chunk) = stream.message().await.expect("a chunk") {
            blocks += chunk.blocks.len();
            bytes += chunk.blocks.iter().map(|b| b.len()).sum::<usize>();
        }
        assert_eq!(blocks, refs.len(), "every block asked for is served");
    }
    bytes
}

/// Runs the benchmark.
pub fn section(size: &Size) -> Section {
    let chain = crate::sync::chain(4, 1_000);
    let store = MemStore::new(chain.genesis());
    chain.write_to(&store, 100).expect("the chain writes");
    // The node, with its own runtime, as a node embeds it.
    let node = soma_testkit::node(&chain, 1, P2pConfig::default(), Arc::new(store));
    // The same node keeping no answers: every FetchCommits reads the store.
    let uncached = {
        let store = MemStore::new(chain.genesis());
        chain.write_to(&store, 100).expect("the chain writes");
        let mut config = P2pConfig::default();
        config.grpc.answer_cache_bytes = 0;
        soma_testkit::node(&chain, 3, config, Arc::new(store))
    };
    // The bare service: its own runtime of the same size.
    let bare_rt = runtime(2);
    let (bare_address, bare_peer) = Bare::new(
        chain.clone(),
        P2pConfig::default().grpc.max_fetch_response_bytes,
    )
    .serve(&bare_rt, &KeyPair::from_seed([2; 32]));
    let node_address = node.local_addr().to_string();
    let per_peer = P2pConfig::default().grpc.max_concurrent_fetches_per_peer;

    let clients = runtime(2);
    let run = size.grpc_run;
    let n = size.grpc_clients;
    let plain = clients.block_on(load(n, run, &bare_address, bare_peer, availability));
    let through = clients.block_on(load(n, run, &node_address, node.peer_id(), availability));
    let bare_fetch = clients.block_on(load(per_peer, run, &bare_address, bare_peer, fetch));
    let node_fetch = clients.block_on(load(per_peer, run, &node_address, node.peer_id(), fetch));
    let uncached_address = uncached.local_addr().to_string();
    let uncached_fetch = clients.block_on(load(
        per_peer,
        run,
        &uncached_address,
        uncached.peer_id(),
        fetch,
    ));
    let refs = block_refs(&chain);
    let blocks = {
        let refs = refs.clone();
        move |c| fetch_blocks(c, refs.clone())
    };
    let bare_blocks = clients.block_on(load(
        per_peer,
        run,
        &bare_address,
        bare_peer,
        blocks.clone(),
    ));
    let node_blocks = clients.block_on(load(per_peer, run, &node_address, node.peer_id(), blocks));
    clients.block_on(node.shutdown());
    clients.block_on(uncached.shutdown());

    let mut s = Section::new(
        "grpc",
        "gRPC service against a plain tonic handler",
        format!(
            "A validator node (1,000 commits, MemStore) started with `P2pBuilder`, and in the same \
             process a plain tonic `P2p` service answering from memory, both over mutual TLS on \
             127.0.0.1, each on its own 2-worker runtime; clients on a third. GetCommitAvailability: \
             {n} clients, each on its own connection, call in a loop for {:.1} s. FetchCommits: \
             one peer with {per_peer} connections (its per-peer allowance) fetching batches of \
             100 commits with their certificate, ten per request; the node keeps answers in memory \
             while its store is unchanged (`answer-cache-bytes`), and the row with the cache off \
             reads every answer from the store. FetchBlocks: the same peer fetching the blocks of \
             100 commits (about 400 blocks, 1.6 KB each) per call, ten per request. Server and \
             clients share the {} cores.",
            run.as_secs_f64(),
            crate::cores()
        ),
        &[
            "path",
            "requests/s",
            "p50 (ms)",
            "p99 (ms)",
            "MB/s",
            "of plain",
        ],
    );
    let rate = |l: &Load| l.requests as f64 / l.run.as_secs_f64();
    let mb = |l: &Load| l.bytes as f64 / 1e6 / l.run.as_secs_f64();
    for (label, l, reference, bytes) in [
        (
            "GetCommitAvailability, plain handler",
            &plain,
            &plain,
            false,
        ),
        ("GetCommitAvailability, the node", &through, &plain, false),
        (
            "FetchCommits ×10, plain handler",
            &bare_fetch,
            &bare_fetch,
            true,
        ),
        ("FetchCommits ×10, the node", &node_fetch, &bare_fetch, true),
        (
            "FetchCommits ×10, the node, answer cache off",
            &uncached_fetch,
            &bare_fetch,
            true,
        ),
        (
            "FetchBlocks ×10, plain handler",
            &bare_blocks,
            &bare_blocks,
            true,
        ),
        (
            "FetchBlocks ×10, the node",
            &node_blocks,
            &bare_blocks,
            true,
        ),
    ] {
        s.row(
            label,
            vec![
                Cell::int(rate(l).round()),
                Cell::ms(l.p50),
                Cell::ms(l.p99),
                if bytes {
                    Cell::num(mb(l), 1)
                } else {
                    Cell::Empty
                },
                Cell::Ratio(rate(l) / rate(reference)),
            ],
        );
    }
    s
}
