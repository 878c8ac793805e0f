//! A bare tonic `P2p` service: the same protocol and the same mutual TLS as a
//! node, answering from memory with no actors, no admission, no store and no
//! decoding. What it achieves is the reference the node is measured against.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use futures::Stream;
use soma_chain::Chain;
use soma_types::{Digest, KeyPair, PeerId};
use soma_wire::convert::Availability;
use soma_wire::proto::{self, p2p_server};
use soma_wire::tls::{self, AccessPolicy, NodeIdentity};
use tonic::{Request, Response, Status};

/// The chain's encoded data, ready to be sent.
struct Data {
    availability: proto::GetCommitAvailabilityResponse,
    chain: Arc<Chain>,
    blocks: HashMap<Digest, Bytes>,
    max_response_bytes: usize,
}

/// The bare service.
#[derive(Clone)]
pub struct Bare(Arc<Data>);

impl Bare {
    /// Serves `chain` (all of it), with FetchBlocks responses chunked at
    /// `max_response_bytes` as a node chunks them.
    pub fn new(chain: Arc<Chain>, max_response_bytes: usize) -> Self {
        let blocks = (1..=chain.tip())
            .flat_map(|i| chain.blocks_of(i))
            .map(|b| (b.reference().digest, b.serialized().clone()))
            .collect();
        let availability = Availability {
            chain_id: chain.chain_id(),
            highest: chain.tip(),
            lowest: 1,
        }
        .into();
        Bare(Arc::new(Data {
            availability,
            chain,
            blocks,
            max_response_bytes,
        }))
    }

    /// Starts serving on 127.0.0.1 on `runtime`, under the identity of
    /// `key`; returns the address and peer id to dial.
    pub fn serve(self, runtime: &tokio::runtime::Runtime, key: &KeyPair) -> (String, PeerId) {
        let identity = NodeIdentity::generate(key).expect("a TLS identity");
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("a loopback port");
        let address = listener.local_addr().expect("bound").to_string();
        let config =
            tls::server_config(&identity, &AccessPolicy::default()).expect("a server config");
        runtime.spawn(
            tonic::transport::Server::builder()
                .add_service(
                    p2p_server::P2pServer::new(self)
                        .max_encoding_message_size(usize::MAX)
                        .max_decoding_message_size(8 << 20),
                )
                .serve_with_incoming(tls::incoming(listener, config)),
        );
        (address, identity.peer_id())
    }
}

type BlockStream = Pin<Box<dyn Stream<Item = Result<proto::FetchBlocksResponse, Status>> + Send>>;

#[tonic::async_trait]
impl p2p_server::P2p for Bare {
    async fn get_known_peers(
        &self,
        _: Request<proto::GetKnownPeersRequest>,
    ) -> Result<Response<proto::GetKnownPeersResponse>, Status> {
        Err(Status::unimplemented("bare service"))
    }

    async fn get_commit_availability(
        &self,
        _: Request<proto::GetCommitAvailabilityRequest>,
    ) -> Result<Response<proto::GetCommitAvailabilityResponse>, Status> {
        Ok(Response::new(self.0.availability.clone()))
    }

    async fn get_commit_info(
        &self,
        _: Request<proto::GetCommitInfoRequest>,
    ) -> Result<Response<proto::GetCommitInfoResponse>, Status> {
        Err(Status::unimplemented("bare service"))
    }

    async fn push_commit(
        &self,
        _: Request<proto::PushCommitRequest>,
    ) -> Result<Response<proto::PushCommitResponse>, Status> {
        Err(Status::unimplemented("bare service"))
    }

    async fn fetch_commits(
        &self,
        request: Request<proto::FetchCommitsRequest>,
    ) -> Result<Response<proto::FetchCommitsResponse>, Status> {
        let r = request.into_inner();
        let chain = &self.0.chain;
        if r.start == 0 || r.start > r.end || r.end > chain.tip() {
            return Err(Status::out_of_range("no such commits"));
        }
        let commits = (r.start..=r.end)
            .map(|i| chain.commit(i).serialized().clone())
            .collect();
        let certifier_blocks = chain
            .certificate(r.end)
            .iter()
            .map(|b| b.serialized().clone())
            .collect();
        Ok(Response::new(proto::FetchCommitsResponse {
            commits,
            certifier_blocks,
        }))
    }

    type FetchBlocksStream = BlockStream;

    async fn fetch_blocks(
        &self,
        request: Request<proto::FetchBlocksRequest>,
    ) -> Result<Response<BlockStream>, Status> {
        let mut chunks = Vec::new();
        let mut chunk = proto::FetchBlocksResponse::default();
        let mut size = 0;
        for r in &request.get_ref().refs {
            let digest = <[u8; 32]>::try_from(&r.digest[..])
                .map(Digest)
                .map_err(|_| Status::invalid_argument("a digest is 32 bytes"))?;
            let block = self
                .0
                .blocks
                .get(&digest)
                .ok_or_else(|| Status::not_found("no such block"))?;
            if size + block.len() > self.0.max_response_bytes && !chunk.blocks.is_empty() {
                chunks.push(Ok(std::mem::take(&mut chunk)));
                size = 0;
            }
            size += block.len();
            chunk.blocks.push(block.clone());
        }
        if !chunk.blocks.is_empty() {
            chunks.push(Ok(chunk));
        }
        Ok(Response::new(Box::pin(futures::stream::iter(chunks))))
    }
}
