use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use actix::Actor;
use soma_store::ConsensusStore;
use soma_types::{ChainId, Committee, KeyPair, NodeInfo, PeerId, SignedNodeInfo, genesis_commit};
use soma_wire::inbound::ConnectionLimit;
use soma_wire::proto::p2p_server::P2pServer;
use soma_wire::tls::{self, AccessPolicy, NodeIdentity};
use tokio::sync::{broadcast, oneshot};

use super::config::P2pConfig;
use super::handle::{Actors, Inner, P2pHandle, Running};
use super::reserved::{ReservedPeers, ReservedSlots};
use crate::connections::{Connections, SubscribePeerEvents};
use crate::discovery::{self, Discovery};
use crate::grpc::{GrpcAdapter, P2pService, SendDeadline, SendStats};
use crate::peer_heights::{self, PeerHeights};
use crate::replay::Recorder;
use crate::state_sync::{self, StateSync};
use crate::verifier::{InstallCommittee, Verifier};

/// Most bytes one block reference takes in a request: epoch, round and
/// author as varints and a 32-byte digest, each with its field key and the
/// entry's own key and length (58 at most).
const MAX_BLOCK_REF_BYTES: usize = 64;

/// Largest request the server decodes: the largest real request, a
/// FetchBlocks of `max_blocks_per_fetch` references (about 60 KB for
/// 1,000) or a GetKnownPeers carrying the caller's own info, plus framing.
/// Anything larger is refused before it is decoded.
pub(crate) fn max_request_bytes(grpc: &crate::grpc::Limits, data: &soma_types::Limits) -> usize {
    let fetch = grpc
        .max_blocks_per_fetch
        .saturating_mul(MAX_BLOCK_REF_BYTES);
    fetch.max(data.max_node_info_bytes).saturating_add(1 << 10)
}

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The listen address could not be bound.
    #[error("cannot listen on {address}: {source}")]
    Bind {
        /// The address.
        address: std::net::SocketAddr,
        /// The error.
        source: std::io::Error,
    },
    /// The TLS identity or configuration failed.
    #[error("tls: {0}")]
    Tls(#[from] tls::TlsError),
    /// The runtime or the actors' thread could not start.
    #[error("cannot start: {0}")]
    Runtime(std::io::Error),
    /// The store could not be read.
    #[error("store: {0}")]
    Store(#[from] soma_store::Error),
    /// The store holds another chain than the genesis committee's.
    #[error("the store belongs to another chain")]
    WrongChain,
}

/// Builds and starts a P2P node.
pub struct P2pBuilder {
    config: P2pConfig,
    network_key: KeyPair,
    genesis: Committee,
    store: Arc<dyn ConsensusStore>,
    identity: Option<NodeIdentity>,
    runtime: Option<tokio::runtime::Handle>,
}

impl P2pBuilder {
    /// A node with `config`, identified by `network_key`, on the chain of
    /// `genesis`, keeping the chain in `store`.
    pub fn new(
        config: P2pConfig,
        network_key: KeyPair,
        genesis: Committee,
        store: Arc<dyn ConsensusStore>,
    ) -> Self {
        P2pBuilder {
            config,
            network_key,
            genesis,
            store,
            identity: None,
            runtime: None,
        }
    }

    /// Uses this TLS identity (e.g. loaded from PEM files) instead of a
    /// fresh one; it must be bound to the network key.
    pub fn identity(mut self, identity: NodeIdentity) -> Self {
        self.identity = Some(identity);
        self
    }

    /// Runs the gRPC server and client connections on the node's own tokio
    /// runtime rather than a runtime owned by the handle.
    pub fn runtime(mut self, runtime: tokio::runtime::Handle) -> Self {
        self.runtime = Some(runtime);
        self
    }

    /// Starts the node.
    pub fn start(self) -> Result<P2pHandle, StartError> {
        let P2pBuilder {
            config,
            network_key,
            genesis,
            store,
            identity,
            runtime,
        } = self;
        let identity = match identity {
            Some(i) => i,
            None => NodeIdentity::generate(&network_key)?,
        };
        let peer_id = PeerId::from(network_key.public());
        let chain_id = ChainId::from_genesis(&genesis);
        if store.committee(genesis.epoch())?.as_ref() != Some(&genesis) {
            return Err(StartError::WrongChain);
        }
        let (owned_runtime, runtime) = match runtime {
            Some(handle) => (None, handle),
            None => {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .thread_name("soma-net")
                    .enable_all()
                    .build()
                    .map_err(StartError::Runtime)?;
                let handle = rt.handle().clone();
                (Some(rt), handle)
            }
        };

        let listener = std::net::TcpListener::bind(config.listen_address).map_err(|source| {
            StartError::Bind {
                address: config.listen_address,
                source,
            }
        })?;
        let local_addr = listener.local_addr().map_err(StartError::Runtime)?;
        listener
            .set_nonblocking(true)
            .map_err(StartError::Runtime)?;
        let listener = {
            let _guard = runtime.enter();
            tokio::net::TcpListener::from_std(listener).map_err(StartError::Runtime)?
        };

        let addresses = if config.external_addresses.is_empty() {
            vec![local_addr.to_string()]
        } else {
            config.external_addresses.clone()
        };
        let own_info = SignedNodeInfo::sign(
            NodeInfo {
                peer_id,
                addresses,
                timestamp_ms: now_ms(),
                access: config.access,
            },
            &network_key,
        );

        let synced = store.highest_synced_commit()?;
        // Every committee the store knows, installed before anything is verified.
        let mut committees = Vec::new();
        let mut epoch = genesis.epoch();
        while let Some(c) = store.committee(epoch)? {
            committees.push(c);
            epoch += 1;
        }
        // Reserved slots from the first accept on; committees installed
        // later reach the admission through the ReservedSlots actor.
        let inbound = ConnectionLimit::with_config(config.grpc.inbound());
        let mut reserved = ReservedPeers::new(config.allowlist.iter().copied());
        for committee in &committees {
            reserved.install(committee);
        }
        inbound.reserve_for(reserved.peers());

        let seed = config.seed.unwrap_or_else(rand::random);
        let (events, _) = broadcast::channel(config.peer_event_broadcast_capacity.max(1));
        let discovery = discovery::Init {
            config: config.discovery.clone(),
            local: peer_id,
            access: config.access,
            allowlist: config.allowlist.clone(),
            seeds: config.seed_peers.clone(),
            seed,
        };
        let (commits, _) = broadcast::channel(config.synced_commit_broadcast_capacity.max(1));
        let (availability, published) =
            tokio::sync::watch::channel(soma_wire::convert::Availability {
                chain_id,
                highest: synced.index,
                lowest: store.lowest_available_commit()?,
            });
        let send_stats = Arc::new(SendStats::default());
        let node = NodeParts {
            availability,
            store: store.clone(),
            synced,
            commits: commits.clone(),
            chain_id,
            seed,
            committees,
            reserved: ReservedSlots::new(reserved, inbound.clone()),
            identity: identity.clone(),
            runtime: runtime.clone(),
            events: events.clone(),
            discovery,
            key: network_key,
            addresses: own_info.info.addresses.clone(),
            send_stats: send_stats.clone(),
        };
        let (actors, system, actor_thread, actors_stopped) = start_actors(&config, node)?;
        let rpc_counts = crate::grpc::RpcCounts::default();

        let service = P2pService::new(
            actors.adapter.clone(),
            actors.discovery.clone(),
            store.clone(),
            genesis_commit(&genesis).reference(),
            config.grpc.clone(),
            config.verifier.limits.clone(),
            config.timeout,
            rpc_counts.clone(),
            published,
            send_stats.clone(),
        );
        let policy = AccessPolicy {
            access: config.access,
            allowlist: config.allowlist.iter().copied().collect(),
        };
        let server_config = tls::server_config(&identity, &policy)?;
        let (shutdown, shutdown_rx) = oneshot::channel::<()>();
        let server = {
            let _guard = runtime.enter();
            let (health_reporter, health) = tonic_health::server::health_reporter();
            let reflection = tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(soma_wire::proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                .build_v1()
                .map_err(|e| StartError::Runtime(std::io::Error::other(e)))?;
            // tonic caps encoding per service, not per call, and the
            // FetchCommits bound grows with the committee of the epoch
            // served, which a later epoch may enlarge: each answer is held
            // to its exact bound where it is built (grpc's `serve`), so the
            // service-wide cap is left open rather than set too low.
            let p2p = P2pServer::new(service)
                .max_decoding_message_size(max_request_bytes(&config.grpc, &config.verifier.limits))
                .max_encoding_message_size(usize::MAX);
            let p2p = SendDeadline::new(p2p, config.grpc.send_timeout, send_stats.clone());
            let incoming = tls::incoming_with_limit(listener, server_config, inbound.clone());
            let timeout = config.timeout;
            let limits = config.grpc.clone();
            runtime.spawn(async move {
                health_reporter.set_serving::<P2pServer<P2pService>>().await;
                // `timeout` ends at the response headers; the body's send
                // is bounded by `SendDeadline`, dead peers by the pings,
                // and every connection by its age.
                tonic::transport::Server::builder()
                    .timeout(timeout)
                    .max_concurrent_streams(limits.max_concurrent_streams)
                    .concurrency_limit_per_connection(limits.concurrency_limit_per_connection)
                    .http2_keepalive_interval(Some(limits.http2_keepalive_interval))
                    .http2_keepalive_timeout(Some(limits.http2_keepalive_timeout))
                    .max_connection_age(limits.max_connection_age)
                    .max_connection_age_grace(limits.max_connection_age_grace)
                    .add_service(health)
                    .add_service(reflection)
                    .add_service(p2p)
                    .serve_with_incoming_shutdown(incoming, async {
                        let _ = shutdown_rx.await;
                    })
                    .await
            })
        };
        tracing::info!(%peer_id, %local_addr, %chain_id, "p2p node started");

        Ok(P2pHandle::from_inner(Inner {
            rpc_counts,
            send_stats,
            inbound,
            events,
            peer_id,
            local_addr,
            chain_id,
            own_info,
            store,
            actors,
            commits,
            runtime: runtime.clone(),
            timeout: config.timeout,
            running: std::sync::Mutex::new(Some(Running {
                system,
                actor_thread,
                actors_stopped,
                server,
                shutdown,
                owned_runtime,
            })),
        }))
    }
}

type Started = (
    Actors,
    actix_rt::System,
    std::thread::JoinHandle<()>,
    oneshot::Receiver<()>,
);

/// What the actors of one node are made from, besides the configuration.
struct NodeParts {
    availability: tokio::sync::watch::Sender<soma_wire::convert::Availability>,
    store: Arc<dyn ConsensusStore>,
    synced: soma_types::CommitRef,
    commits: broadcast::Sender<soma_types::CommittedSubDag>,
    chain_id: ChainId,
    seed: u64,
    committees: Vec<Committee>,
    reserved: ReservedSlots,
    identity: NodeIdentity,
    runtime: tokio::runtime::Handle,
    events: broadcast::Sender<crate::connections::PeerEvent>,
    send_stats: Arc<SendStats>,
    discovery: discovery::Init,
    key: KeyPair,
    addresses: Vec<String>,
}

/// Starts the actors in an actix System on a thread of their own.
fn start_actors(config: &P2pConfig, node: NodeParts) -> Result<Started, StartError> {
    let config = config.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    let (stopped_tx, stopped_rx) = oneshot::channel();
    let thread = std::thread::Builder::new()
        .name("soma-actors".into())
        .spawn(move || {
            let system = actix_rt::System::new();
            let started = system.block_on(async move {
                let NodeParts {
                    availability,
                    store,
                    synced,
                    commits,
                    chain_id,
                    seed,
                    committees,
                    reserved,
                    identity,
                    runtime,
                    events,
                    send_stats,
                    discovery,
                    key,
                    addresses,
                } = node;
                let capacity = config.mailbox_capacity;
                let heights = PeerHeights::new(
                    peer_heights::Config {
                        ban_duration_ms: config.ban_duration.as_millis() as u64,
                        ..peer_heights::Config::new(chain_id, seed)
                    },
                    capacity,
                    Recorder::from_env("peer_heights"),
                )
                .start();
                let epoch = committees.last().map_or(0, Committee::epoch);
                let last_committee = committees.last().cloned();
                let reserved = reserved.start();
                let verifier = Verifier::new(
                    config.verifier.clone(),
                    capacity,
                    Recorder::from_env("verifier"),
                )?
                .forward_installed(reserved.clone().recipient())
                .start();
                for committee in committees {
                    verifier.do_send(InstallCommittee(committee));
                }
                let connections = Connections::new(
                    config.connections.clone(),
                    identity,
                    runtime.clone(),
                    events,
                    capacity,
                    Recorder::from_env("connections"),
                )
                .start();
                // Before any dial, so PeerHeights sees every connection.
                connections.do_send(SubscribePeerEvents(heights.clone().recipient()));
                let state_sync = StateSync::new(
                    state_sync::Init {
                        config: sync_config(&config),
                        synced,
                        epoch,
                        commit_answer_bytes: last_committee.as_ref().map_or(0, |c| {
                            state_sync::commit_answer_bytes(
                                &config.verifier.limits,
                                config.grpc.max_fetch_response_bytes,
                                c,
                            )
                        }),
                    },
                    state_sync::Settings {
                        chain_id,
                        tick: config.tick,
                        height_query_interval: config.height_query_interval,
                        timeout: config.timeout,
                        verify_synced_block_signatures: config.verify_synced_block_signatures,
                        limits: config.verifier.limits.clone(),
                        commit_budget_bytes: config.grpc.max_fetch_response_bytes,
                        faults: config.faults.clone(),
                    },
                    store,
                    verifier.clone(),
                    heights.clone(),
                    connections.clone(),
                    runtime.clone(),
                    commits,
                    availability,
                    capacity,
                    Recorder::from_env("state_sync"),
                )
                .start();
                let discovery = Discovery::new(
                    discovery,
                    key,
                    addresses,
                    connections.clone(),
                    verifier.clone(),
                    runtime,
                    config.timeout,
                    capacity,
                    Recorder::from_env("discovery"),
                )
                .start();
                let adapter = GrpcAdapter::new(
                    config.grpc.clone(),
                    heights.clone(),
                    capacity,
                    send_stats,
                    Recorder::from_env("grpc_adapter"),
                )
                .start();
                Ok::<_, std::io::Error>((
                    Actors {
                        heights,
                        verifier,
                        connections,
                        discovery,
                        state_sync,
                        adapter,
                        reserved,
                    },
                    actix_rt::System::current(),
                ))
            });
            let ok = started.is_ok();
            let _ = tx.send(started);
            if ok {
                let _ = system.run();
            }
            let _ = stopped_tx.send(());
        })
        .map_err(StartError::Runtime)?;
    let (actors, system) = rx
        .recv()
        .map_err(|_| StartError::Runtime(std::io::Error::other("the actors' thread died")))?
        .map_err(StartError::Runtime)?;
    Ok((actors, system, thread, stopped_rx))
}

pub(super) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The StateSync core's settings, with the limits it shares with the rest
/// of the node filled in: the largest block, the servers' message size,
/// and a restart window that spans several request timeouts (or a
/// peer that always times out would never pass the intensity limit).
fn sync_config(config: &P2pConfig) -> state_sync::Config {
    let mut sync = config.state_sync.clone();
    sync.max_block_bytes = config.verifier.limits.max_block_bytes as u64;
    sync.max_message_bytes = config.grpc.max_fetch_response_bytes as u64;
    sync.max_bytes_per_fetch = sync.max_bytes_per_fetch.max(sync.max_block_bytes);
    let timeouts = u64::from(sync.max_restarts) + 1;
    let span = (config.timeout.as_millis() as u64).saturating_mul(timeouts);
    sync.restart_window_ms = sync.restart_window_ms.max(span);
    sync
}
