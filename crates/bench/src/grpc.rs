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

/// Rounds each load of a comparison is split into, the loads taking turns
/// (see [`interleaved`]).
const ROUNDS: u32 = 4;

/// What a load of clients achieved.
#[derive(Default)]
struct Load {
    bytes: usize,
    /// One per request.
    latencies: Vec<Duration>,
    run: Duration,
}

impl Load {
    /// Adds the figures of another round of the same load.
    fn merge(&mut self, round: Load) {
        self.bytes += round.bytes;
        self.latencies.extend(round.latencies);
        self.run += round.run;
    }

    /// The latency at quantile `q`.
    fn at(&self, q: f64) -> Duration {
        let mut sorted = self.latencies.clone();
        sorted.sort();
        sorted[((sorted.len() - 1) as f64 * q) as usize]
    }
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
    let mut total = Load {
        run,
        ..Load::default()
    };
    for t in tasks {
        let (latencies, bytes) = t.await.expect("a client task");
        total.latencies.extend(latencies);
        total.bytes += bytes;
    }
    total
}

/// The same load of `clients` calling `call` on each of `targets`, for
/// `run` each in all: in [`ROUNDS`] rounds in which the targets take
/// turns, in order and then in reverse, so that a machine that speeds up
/// or slows down over the comparison weighs on every target alike.
async fn interleaved<F, Fut>(
    targets: &[(&str, PeerId)],
    clients: usize,
    run: Duration,
    call: F,
) -> Vec<Load>
where
    F: Fn(P2pClient<Channel>) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = usize> + Send,
{
    let mut loads: Vec<Load> = targets.iter().map(|_| Load::default()).collect();
    for round in 0..ROUNDS {
        for i in crate::turns(round as usize, targets.len()) {
            let (address, peer) = targets[i];
            let part = load(clients, run / ROUNDS, address, peer, call.clone()).await;
            loads[i].merge(part);
        }
    }
    loads
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
                ..Default::default()
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
            .fetch_blocks(proto::FetchBlocksRequest {
                refs: refs.clone(),
                ..Default::default()
            })
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
    let uncached_address = uncached.local_addr().to_string();
    // (address, identity) of the plain service, the node, and the node
    // keeping no answers.
    let bare = (bare_address.as_str(), bare_peer);
    let cached = (node_address.as_str(), node.peer_id());
    let without_cache = (uncached_address.as_str(), uncached.peer_id());
    let mut calls = clients
        .block_on(interleaved(&[bare, cached], n, run, availability))
        .into_iter();
    let (plain, through) = (calls.next().unwrap(), calls.next().unwrap());
    let targets = [bare, cached, without_cache];
    let mut fetches = clients
        .block_on(interleaved(&targets, per_peer, run, fetch))
        .into_iter();
    let (bare_fetch, node_fetch, uncached_fetch) = (
        fetches.next().unwrap(),
        fetches.next().unwrap(),
        fetches.next().unwrap(),
    );
    let refs = block_refs(&chain);
    let blocks = move |c| fetch_blocks(c, refs.clone());
    let mut streams = clients
        .block_on(interleaved(&[bare, cached], per_peer, run, blocks))
        .into_iter();
    let (bare_blocks, node_blocks) = (streams.next().unwrap(), streams.next().unwrap());
    clients.block_on(node.shutdown());
    clients.block_on(uncached.shutdown());

    let mut s = Section::new(
        "grpc",
        "gRPC service against a plain tonic handler",
        format!(
            "A validator node (1,000 commits, MemStore) started with `P2pBuilder`, and in the same \
             process a plain tonic `P2p` service answering from memory, both over mutual TLS on \
             127.0.0.1, each on its own 2-worker runtime; clients on a third. GetCommitAvailability: \
             {n} clients, each on its own connection, call in a loop. FetchCommits: \
             one peer with {per_peer} connections (its per-peer allowance) fetching batches of \
             100 commits with their certificate, ten per request; the node keeps answers in memory \
             while its store is unchanged (`answer-cache-bytes`), and the row with the cache off \
             reads every answer from the store. FetchBlocks: the same peer fetching the blocks of \
             100 commits (about 400 blocks, 1.6 KB each) per call, ten per request. Each load \
             runs {:.1} s in all, in {ROUNDS} rounds taken in turn with the rows it is compared \
             with (in order, then in reverse), so that a machine that speeds up or slows down \
             weighs on both alike. Server and clients share the {} cores.",
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
    let rate = |l: &Load| l.latencies.len() as f64 / l.run.as_secs_f64();
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
                Cell::ms(l.at(0.5)),
                Cell::ms(l.at(0.99)),
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
