//! GetCommitAvailability through the GrpcAdapter actor against a plain tonic
//! handler reading the same value, in the same process over the same mutual
//! TLS; and FetchCommits throughput. `cargo bench -p soma-actors --bench grpc`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use soma_actors::{P2pBuilder, P2pConfig};
use soma_chain::{ChainBuilder, ChainConfig};
use soma_store::{ConsensusStore, MemStore};
use soma_types::KeyPair;
use soma_wire::convert::Availability;
use soma_wire::proto::{self, p2p_client::P2pClient, p2p_server};
use soma_wire::tls::{self, AccessPolicy, NodeIdentity};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

const CLIENTS: usize = 64;
const RUN: Duration = Duration::from_secs(4);

/// Answers GetCommitAvailability straight from the store, nothing else.
struct Plain {
    store: Arc<dyn ConsensusStore>,
    chain_id: soma_types::ChainId,
}

#[tonic::async_trait]
impl p2p_server::P2p for Plain {
    async fn get_known_peers(
        &self,
        _: Request<proto::GetKnownPeersRequest>,
    ) -> Result<Response<proto::GetKnownPeersResponse>, Status> {
        Err(Status::unimplemented(""))
    }
    async fn get_commit_availability(
        &self,
        _: Request<proto::GetCommitAvailabilityRequest>,
    ) -> Result<Response<proto::GetCommitAvailabilityResponse>, Status> {
        // The cheapest plain handler: an in-memory store read, inline.
        let a = Availability {
            chain_id: self.chain_id,
            highest: self.store.highest_synced_commit().unwrap().index,
            lowest: self.store.lowest_available_commit().unwrap(),
        };
        Ok(Response::new(a.into()))
    }
    async fn get_commit_info(
        &self,
        _: Request<proto::GetCommitInfoRequest>,
    ) -> Result<Response<proto::GetCommitInfoResponse>, Status> {
        Err(Status::unimplemented(""))
    }
    async fn push_commit(
        &self,
        _: Request<proto::PushCommitRequest>,
    ) -> Result<Response<proto::PushCommitResponse>, Status> {
        Err(Status::unimplemented(""))
    }
    async fn fetch_commits(
        &self,
        _: Request<proto::FetchCommitsRequest>,
    ) -> Result<Response<proto::FetchCommitsResponse>, Status> {
        Err(Status::unimplemented(""))
    }
    type FetchBlocksStream = ReceiverStream<Result<proto::FetchBlocksResponse, Status>>;
    async fn fetch_blocks(
        &self,
        _: Request<proto::FetchBlocksRequest>,
    ) -> Result<Response<Self::FetchBlocksStream>, Status> {
        Err(Status::unimplemented(""))
    }
}

struct Load {
    requests: usize,
    bytes: usize,
    p50: Duration,
    p99: Duration,
}

/// Runs `clients` clients (each on its own connection, all with one
/// identity) calling `call` in a loop for `RUN`.
async fn load<F, Fut>(clients: usize, address: String, peer: soma_types::PeerId, call: F) -> Load
where
    F: Fn(P2pClient<tonic::transport::Channel>) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = usize> + Send,
{
    let identity = NodeIdentity::generate(&KeyPair::from_seed([200; 32])).unwrap();
    let deadline = Instant::now() + RUN;
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (channel, _) = tls::connect(
            &address,
            Some(&identity),
            Some(peer),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        let client = P2pClient::new(channel).max_decoding_message_size(8 << 20);
        let call = call.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut bytes = 0;
            while Instant::now() < deadline {
                let t = Instant::now();
                bytes += call(client.clone()).await;
                latencies.push(t.elapsed());
            }
            (latencies, bytes)
        }));
    }
    let mut latencies = Vec::new();
    let mut bytes = 0;
    for t in tasks {
        let (l, b) = t.await.unwrap();
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
    }
}

fn main() {
    let chain = ChainBuilder::new(ChainConfig {
        transactions_per_block: 10,
        ..ChainConfig::validators(4)
    })
    .build(1_000);
    let store = MemStore::new(chain.genesis());
    chain.write_to(&store, 100).unwrap();
    let store: Arc<dyn ConsensusStore> = Arc::new(store);

    // The node, with its own runtime, as a node embeds it.
    let node = P2pBuilder::new(
        P2pConfig::default(),
        KeyPair::from_seed([1; 32]),
        chain.genesis().clone(),
        store.clone(),
    )
    .start()
    .unwrap();

    // The plain handler: the same store, the same TLS, its own runtime of
    // the same size.
    let plain_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let plain_identity = NodeIdentity::generate(&KeyPair::from_seed([2; 32])).unwrap();
    let listener = plain_rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let plain_address = listener.local_addr().unwrap().to_string();
    let server_config = tls::server_config(&plain_identity, &AccessPolicy::default()).unwrap();
    let plain = Plain {
        store: store.clone(),
        chain_id: chain.chain_id(),
    };
    plain_rt.spawn(
        tonic::transport::Server::builder()
            .add_service(p2p_server::P2pServer::new(plain))
            .serve_with_incoming(tls::incoming(listener, server_config)),
    );

    let clients = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let availability = |mut c: P2pClient<tonic::transport::Channel>| async move {
        c.get_commit_availability(proto::GetCommitAvailabilityRequest {})
            .await
            .unwrap();
        0
    };
    let plain_load = clients.block_on(load(
        CLIENTS,
        plain_address,
        plain_identity.peer_id(),
        availability,
    ));
    let actor_load = clients.block_on(load(
        CLIENTS,
        node.local_addr().to_string(),
        node.peer_id(),
        availability,
    ));

    let fetch = |mut c: P2pClient<tonic::transport::Channel>| async move {
        let mut bytes = 0;
        for start in (1..=1_000).step_by(100) {
            let r = c
                .fetch_commits(proto::FetchCommitsRequest {
                    start,
                    end: start + 99,
                })
                .await
                .unwrap()
                .into_inner();
            bytes += r
                .commits
                .iter()
                .chain(&r.certifier_blocks)
                .map(|b| b.len())
                .sum::<usize>();
        }
        bytes
    };
    // One syncing peer fetching as many batches at once as the server allows it.
    let fetch_load = clients.block_on(load(
        P2pConfig::default().grpc.max_concurrent_fetches_per_peer,
        node.local_addr().to_string(),
        node.peer_id(),
        fetch,
    ));

    let rate = |l: &Load| l.requests as f64 / RUN.as_secs_f64();
    println!(
        "grpc benchmark: {CLIENTS} clients, {}s per run, 2 cores shared by server and clients",
        RUN.as_secs()
    );
    println!(
        "{:<46} {:>12} {:>10} {:>10} {:>8}",
        "path", "requests/s", "p50", "p99", "ratio"
    );
    for (name, l) in [
        ("GetCommitAvailability, plain tonic handler", &plain_load),
        (
            "GetCommitAvailability, the node (published state)",
            &actor_load,
        ),
    ] {
        println!(
            "{name:<46} {:>12.0} {:>8.2}ms {:>8.2}ms {:>8.3}",
            rate(l),
            l.p50.as_secs_f64() * 1e3,
            l.p99.as_secs_f64() * 1e3,
            rate(l) / rate(&plain_load)
        );
    }
    println!(
        "FetchCommits, 4 clients (batches of 100 commits + certificate): {:.1} MB/s, {:.0} batches/s",
        fetch_load.bytes as f64 / RUN.as_secs_f64() / 1e6,
        fetch_load.requests as f64 * 10.0 / RUN.as_secs_f64()
    );
    clients.block_on(node.shutdown());
}
