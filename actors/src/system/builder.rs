use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use soma_store::ConsensusStore;
use soma_types::{ChainId, Committee, KeyPair, NodeInfo, PeerId, SignedNodeInfo, genesis_commit};
use soma_wire::inbound::ConnectionLimit;
use soma_wire::proto::p2p_server::P2pServer;
use soma_wire::tls::{self, AccessPolicy, NodeIdentity};
use tokio::sync::{broadcast, oneshot, watch};

use super::Execution;
use super::config::P2pConfig;
use super::handle::{CONNECTION_STOP_GRACE, Inner, OwnedRuntime, P2pHandle, Running};
use super::store_gate::StoreGate;
use super::tree::{self, NodeParts};
use crate::archive::{Archive, ArchiveReader, WriterDeps, supervise_writer};
use crate::discovery;
use crate::grpc::{P2pService, SendDeadline, SendStats, ServiceDeps};
use crate::supervisor::TreeStatus;

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

/// The largest request the standard services (health and reflection)
/// decode: a service or symbol name and a host, a few hundred bytes for
/// any client. tonic's default is 4 MiB, and a reflection answer copies
/// its request: a caller sending such requests on streams whose answers
/// it never read held about 20 MiB a stream, 2.5 GiB a connection.
pub const MAX_STANDARD_REQUEST_BYTES: usize = 4 << 10;

/// The largest answer the standard services send: a reflection answer
/// holds one file of the protocol's descriptors (a few KiB) and a copy of
/// its request.
pub const MAX_STANDARD_ANSWER_BYTES: usize = 256 << 10;

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
    /// The archive could not be opened.
    #[error("{0}")]
    Archive(#[from] crate::archive::ArchiveError),
    /// A setting is outside its range ([`P2pConfig::check`]).
    #[error("{0}")]
    Config(#[from] super::InvalidSetting),
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
    /// runtime rather than a runtime owned by the handle. Its I/O and time
    /// drivers must be on (`enable_all`): tokio panics in
    /// [`P2pBuilder::start`] on a runtime without I/O.
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
        config.check()?;
        let identity = match identity {
            Some(i) => i,
            None => NodeIdentity::generate(&network_key)?,
        };
        let peer_id = PeerId::from(network_key.public());
        let chain_id = ChainId::from_genesis(&genesis);
        // Before anything that must be stopped if it fails.
        let archive = match &config.archive {
            Some(c) => Some(Archive::open(c.clone(), chain_id)?),
            None => None,
        };
        if store.committee(genesis.epoch())?.as_ref() != Some(&genesis) {
            return Err(StartError::WrongChain);
        }
        // Every call the node makes to the store from here on goes
        // through the gate, which shutdown closes once the calls under
        // way have returned.
        let gate = Arc::new(StoreGate::new(store.clone()));
        let (given_store, store) = (store, gate.clone() as Arc<dyn ConsensusStore>);
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
                (Some(OwnedRuntime::new(rt)), handle)
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

        // As peers accept them: one spelling per address.
        let addresses = if config.external_addresses.is_empty() {
            vec![crate::discovery::canonical_address(&local_addr.to_string())]
        } else {
            // Each once, in the order given: peers count an info's
            // addresses as listed.
            let mut addresses: Vec<String> = Vec::new();
            for address in &config.external_addresses {
                let address = crate::discovery::canonical_address(address);
                if !addresses.contains(&address) {
                    addresses.push(address);
                }
            }
            addresses
        };
        for address in &addresses {
            let port = address.parse::<std::net::SocketAddr>().map(|a| a.port());
            if port.is_ok_and(crate::discovery::is_service_port) {
                tracing::warn!(
                    %address,
                    "peers refuse to dial a node advertised at the port of another service \
                     (docs/operations.md, `listen-address`); listen or advertise another port"
                );
            }
        }
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
        // Reserved slots from the first accept on (the ReservedSlots actor
        // reserves for the stored committees as it is made); committees
        // installed later reach the admission through it.
        let inbound = ConnectionLimit::with_config(config.grpc.inbound());
        let seed = config.seed.unwrap_or_else(rand::random);
        let (events, _) = broadcast::channel(config.peer_event_broadcast_capacity.max(1));
        let discovery_init = discovery::Init {
            config: config.discovery.clone(),
            local: peer_id,
            access: config.access,
            allowlist: config.allowlist.clone(),
            seeds: config.seed_peers.clone(),
            seed,
            addresses: own_info.info.addresses.clone(),
        };
        let (commits, _) = broadcast::channel(config.synced_commit_broadcast_capacity.max(1));
        // Advertised: the highest commit whose certificate is held (a local
        // commit stored without one is not served until it has one).
        let lowest = store.lowest_available_commit()?;
        let certified = store.highest_certified_in(lowest..=synced.index)?;
        let (availability, published) =
            tokio::sync::watch::channel(soma_wire::convert::Availability {
                chain_id,
                highest: certified.unwrap_or(0),
                lowest,
            });
        let execution = Execution::new();
        let (stopped, _) = watch::channel(false);
        let batch_size = config.state_sync.commit_sync_batch_size;
        let reader = archive
            .as_ref()
            .filter(|a| a.config().read)
            .map(|a| Arc::new(ArchiveReader::new(a.clone(), batch_size)));
        let writer = archive.as_ref().filter(|a| a.config().write).map(|a| {
            let (archived, watched) = watch::channel(0);
            let deps = WriterDeps {
                archive: a.clone(),
                store: store.clone(),
                grpc: config.grpc.clone(),
                data: config.verifier.limits.clone(),
                batch_size,
                archived,
                stopped: stopped.subscribe(),
            };
            (deps, watched)
        });
        let (writer, archived) = match writer {
            Some((deps, watched)) => (Some(deps), Some(watched)),
            None => (None, None),
        };
        let send_stats = Arc::new(SendStats::default());
        let (tree, tree_status) = tokio::sync::watch::channel(TreeStatus::default());
        let parts = NodeParts {
            availability,
            store: store.clone(),
            genesis_epoch: genesis.epoch(),
            commits: commits.clone(),
            execution: execution.clone(),
            chain_id,
            seed,
            admission: inbound.clone(),
            identity: identity.clone(),
            runtime: runtime.clone(),
            events: events.clone(),
            send_stats: send_stats.clone(),
            discovery_init,
            key: network_key,
            addresses: own_info.info.addresses.clone(),
            tree,
            faults: faults(&config),
            archive: reader,
            archived,
        };
        // The last steps that may fail, before the actors start: an error
        // after them would have to stop them.
        let policy = AccessPolicy {
            access: config.access,
            allowlist: config.allowlist.iter().copied().collect(),
        };
        let server_config = tls::server_config(&identity, &policy)?;
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(soma_wire::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .map_err(|e| StartError::Runtime(std::io::Error::other(e)))?;
        let started = tree::start(&config, parts)?;
        let actors = started.actors.clone();
        let rpc_counts = crate::grpc::RpcCounts::default();

        let service = P2pService::new(ServiceDeps {
            adapter: actors.adapter.clone(),
            discovery: actors.discovery.clone(),
            store: store.clone(),
            genesis: genesis_commit(&genesis).reference(),
            limits: config.grpc.clone(),
            data_limits: config.verifier.limits.clone(),
            timeout: config.timeout,
            counts: rpc_counts.clone(),
            availability: published,
            stats: send_stats.clone(),
        });
        let (shutdown, shutdown_rx) = oneshot::channel::<()>();
        let server = {
            let _guard = runtime.enter();
            let (health_reporter, health) = tonic_health::server::health_reporter();
            let health = health
                .max_decoding_message_size(MAX_STANDARD_REQUEST_BYTES)
                .max_encoding_message_size(MAX_STANDARD_ANSWER_BYTES);
            // Health's Watch is a stream that never ends on its own: cut at
            // the send deadline too (its caller watches again), or each
            // connection could hold its whole stream limit of them open,
            // with their buffers, for as long as it lives.
            let health = SendDeadline::new(
                health,
                config.grpc.send_timeout,
                config.grpc.max_unwritten_bytes_per_connection,
                send_stats.clone(),
            );
            // Reflection is a stream of answers, each held until the caller
            // reads it: bounded in size as health is, and cut at the send
            // deadline as the P2p service's answers are, so that a caller
            // that stops reading frees what it holds.
            let reflection = reflection
                .max_decoding_message_size(MAX_STANDARD_REQUEST_BYTES)
                .max_encoding_message_size(MAX_STANDARD_ANSWER_BYTES);
            let reflection = SendDeadline::new(
                reflection,
                config.grpc.send_timeout,
                config.grpc.max_unwritten_bytes_per_connection,
                send_stats.clone(),
            );
            // tonic caps encoding per service, not per call, and the
            // FetchCommits bound grows with the committee of the epoch
            // served, which a later epoch may enlarge: each answer is held
            // to its exact bound where it is built (grpc's `serve`), so the
            // service-wide cap is left open rather than set too low.
            let p2p = P2pServer::new(service)
                .max_decoding_message_size(max_request_bytes(&config.grpc, &config.verifier.limits))
                .max_encoding_message_size(usize::MAX);
            let p2p = SendDeadline::new(
                p2p,
                config.grpc.send_timeout,
                config.grpc.max_unwritten_bytes_per_connection,
                send_stats.clone(),
            );
            let incoming = tls::incoming_with_limit(listener, server_config, inbound.clone());
            let timeout = config.timeout;
            let limits = config.grpc.clone();
            runtime.spawn(async move {
                health_reporter.set_serving::<P2pServer<P2pService>>().await;
                // `timeout` ends at the response headers; the body's send
                // is bounded by `SendDeadline`, dead peers by the pings,
                // and every connection by its age.
                let router = tonic::transport::Server::builder()
                    .timeout(timeout)
                    .max_concurrent_streams(limits.max_concurrent_streams)
                    .concurrency_limit_per_connection(limits.concurrency_limit_per_connection)
                    .http2_keepalive_interval(Some(limits.http2_keepalive_interval))
                    .http2_keepalive_timeout(Some(limits.http2_keepalive_timeout))
                    .add_service(health)
                    .add_service(reflection)
                    .add_service(p2p);
                // Each connection its own server: an idle or old one is
                // closed with a GOAWAY, not cut under a crossing request
                // (its age is the inbound limit's, not tonic's, which
                // cuts old connections without a GOAWAY once a grace is
                // set).
                let stopped = async {
                    let _ = shutdown_rx.await;
                };
                soma_wire::serve::serve(router, incoming, stopped, CONNECTION_STOP_GRACE).await
            })
        };
        if let Some(deps) = writer {
            runtime.spawn(supervise_writer(deps));
        }
        tracing::info!(%peer_id, %local_addr, %chain_id, "p2p node started");

        let handle = P2pHandle::from_inner(Inner {
            rpc_counts,
            send_stats,
            inbound,
            events,
            peer_id,
            local_addr,
            chain_id,
            own_info,
            store: given_store,
            gate,
            actors,
            commits,
            execution,
            stopped,
            archive: archive.map(|a| a.stats().clone()),
            commit_read_bytes: config.synced_commit_read_bytes.max(1),
            tree: tree_status,
            runtime: runtime.clone(),
            timeout: config.timeout,
            running: std::sync::Mutex::new(Some(Running {
                system: started.system,
                actor_thread: started.thread,
                actors_stopped: started.stopped,
                server: Some(server),
                shutdown: Some(shutdown),
                owned_runtime,
            })),
            halted: tokio::sync::OnceCell::new(),
            shut_down: tokio::sync::OnceCell::new(),
            joined: Arc::new(tokio::sync::watch::channel(false).0),
        });
        handle.stop_on_failure();
        Ok(handle)
    }
}

/// The faults the node's actors consult: the configuration's plan, or one
/// from the environment (the `testing` feature only).
#[cfg(feature = "testing")]
fn faults(config: &P2pConfig) -> crate::faults::Faults {
    let plan = config
        .faults
        .clone()
        .or_else(|| crate::faults::FaultPlan::from_env().map(Arc::new));
    crate::faults::Faults::new(plan)
}

#[cfg(not(feature = "testing"))]
fn faults(_: &P2pConfig) -> crate::faults::Faults {
    crate::faults::Faults::default()
}

pub(super) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
