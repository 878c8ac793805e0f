//! Starting the supervision tree: every long-lived actor under the root
//! supervisor, on the actors' own thread.

use super::Execution;
use std::sync::Arc;

use actix::{Actor, Addr, AsyncContext, Context, Supervised};
use soma_store::ConsensusStore;
use soma_types::{ChainId, CommittedSubDag, Epoch, KeyPair};
use soma_wire::convert::Availability;
use soma_wire::inbound::ConnectionLimit;
use soma_wire::tls::NodeIdentity;
use tokio::sync::{broadcast, oneshot, watch};

use super::builder::StartError;
use super::config::P2pConfig;
use super::reserved::ReservedSlots;
use crate::connections::{self, Connections, PeerEvent};
use crate::discovery::{self, Discovery};
use crate::faults::Faults;
use crate::grpc::{self, GrpcAdapter, SendStats};
use crate::peer_heights::{self, PeerHeights};
use crate::replay::Recorder;
use crate::state_sync::{self, StateSync};
use crate::supervisor::{self, Parent, Supervisor, TreeStatus};
use crate::verifier::{self, Verifier};

/// The long-lived actors. Their addresses outlive restarts: the handle and
/// the gRPC service hold them for the life of the node.
#[derive(Clone)]
pub(super) struct Actors {
    pub(super) heights: Addr<PeerHeights>,
    pub(super) verifier: Addr<Verifier>,
    pub(super) connections: Addr<Connections>,
    pub(super) discovery: Addr<Discovery>,
    pub(super) state_sync: Addr<StateSync>,
    pub(super) adapter: Addr<GrpcAdapter>,
    pub(super) reserved: Addr<ReservedSlots>,
}

impl Actors {
    /// Each actor's name (its core's, in traces and metrics) and whether
    /// its mailbox is open.
    pub(super) fn alive(&self) -> [(&'static str, bool); 7] {
        use crate::Core;
        [
            (
                peer_heights::PeerHeightsCore::NAME,
                self.heights.connected(),
            ),
            (verifier::VerifierCore::NAME, self.verifier.connected()),
            (
                connections::ConnectionsCore::NAME,
                self.connections.connected(),
            ),
            (discovery::DiscoveryCore::NAME, self.discovery.connected()),
            (state_sync::StateSyncCore::NAME, self.state_sync.connected()),
            (grpc::GrpcAdapterCore::NAME, self.adapter.connected()),
            (RESERVED_SLOTS, self.reserved.connected()),
        ]
    }
}

/// The name of the reserved-slots actor (it has no core).
const RESERVED_SLOTS: &str = "reserved_slots";

/// What the actors of one node are made from, besides the configuration.
pub(super) struct NodeParts {
    pub(super) availability: watch::Sender<Availability>,
    pub(super) store: Arc<dyn ConsensusStore>,
    pub(super) genesis_epoch: Epoch,
    pub(super) commits: broadcast::Sender<CommittedSubDag>,
    pub(super) execution: Execution,
    pub(super) chain_id: ChainId,
    pub(super) seed: u64,
    pub(super) admission: ConnectionLimit,
    pub(super) identity: NodeIdentity,
    pub(super) runtime: tokio::runtime::Handle,
    pub(super) events: broadcast::Sender<PeerEvent>,
    pub(super) send_stats: Arc<SendStats>,
    pub(super) discovery_init: discovery::Init,
    pub(super) key: KeyPair,
    pub(super) addresses: Vec<String>,
    pub(super) tree: watch::Sender<TreeStatus>,
    pub(super) faults: Faults,
    pub(super) archive: Option<Arc<crate::archive::ArchiveReader>>,
    pub(super) archived: Option<watch::Receiver<soma_types::CommitIndex>>,
}

/// The running actors' System and thread.
pub(super) struct Started {
    pub(super) actors: Actors,
    pub(super) system: actix_rt::System,
    pub(super) thread: std::thread::JoinHandle<()>,
    pub(super) stopped: oneshot::Receiver<()>,
}

/// Starts the actors in an actix System on a thread of their own.
pub(super) fn start(config: &P2pConfig, parts: NodeParts) -> Result<Started, StartError> {
    let config = config.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    let (stopped_tx, stopped) = oneshot::channel();
    let thread = std::thread::Builder::new()
        .name("soma-actors".into())
        .spawn(move || {
            let system = actix_rt::System::new();
            let started = system.block_on(async move {
                start_tree(&config, parts).map(|a| (a, actix_rt::System::current()))
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
        .map_err(|_| StartError::Runtime(std::io::Error::other("the actors' thread died")))??;
    Ok(Started {
        actors,
        system,
        thread,
        stopped,
    })
}

/// Starts `actor` in `ctx` under the root.
fn supervised<A>(ctx: Context<A>, actor: A, name: &'static str, root: &Addr<Supervisor>)
where
    A: Actor<Context = Context<A>> + Supervised,
{
    supervisor::start(ctx, actor, name, Parent::Root(root.clone()));
}

/// Makes every actor's context first, so each actor is built knowing the
/// addresses of those it talks to, then starts them under the root.
fn start_tree(config: &P2pConfig, parts: NodeParts) -> Result<Actors, StartError> {
    use crate::Core;
    let NodeParts {
        availability,
        store,
        genesis_epoch,
        commits,
        execution,
        chain_id,
        seed,
        admission,
        identity,
        runtime,
        events,
        send_stats,
        discovery_init,
        key,
        addresses,
        tree,
        faults,
        archive,
        archived,
    } = parts;
    let capacity = config.mailbox_capacity;
    let root_ctx = Context::<Supervisor>::new();
    let root = root_ctx.address();
    let heights_ctx = Context::<PeerHeights>::new();
    let verifier_ctx = Context::<Verifier>::new();
    let connections_ctx = Context::<Connections>::new();
    let discovery_ctx = Context::<Discovery>::new();
    let state_sync_ctx = Context::<StateSync>::new();
    let adapter_ctx = Context::<GrpcAdapter>::new();
    let reserved_ctx = Context::<ReservedSlots>::new();
    let actors = Actors {
        heights: heights_ctx.address(),
        verifier: verifier_ctx.address(),
        connections: connections_ctx.address(),
        discovery: discovery_ctx.address(),
        state_sync: state_sync_ctx.address(),
        adapter: adapter_ctx.address(),
        reserved: reserved_ctx.address(),
    };

    let reserved = ReservedSlots::new(
        config.allowlist.clone(),
        (store.clone(), genesis_epoch),
        admission,
    );
    let verifier = Verifier::new(
        verifier::Deps {
            committees: Some((store.clone(), genesis_epoch)),
            installed: Some(actors.reserved.clone().recipient()),
            faults: faults.clone(),
            ..verifier::Deps::new(config.verifier.clone(), capacity)
        },
        Recorder::from_env(verifier::VerifierCore::NAME),
    )
    .map_err(StartError::Runtime)?;
    let heights_config = peer_heights::Config {
        ban_duration_ms: config.ban_duration.as_millis() as u64,
        max_fetches_per_peer: config.max_fetches_per_peer,
        max_waiting_fetches: config.max_waiting_fetches,
        ..peer_heights::Config::new(chain_id, seed)
    };
    let max_tracked_peers = heights_config.max_tracked_peers;
    let heights = PeerHeights::new(
        peer_heights::Deps {
            faults: faults.clone(),
            ..peer_heights::Deps::new(heights_config, Some(actors.connections.clone()), capacity)
        },
        Recorder::from_env(peer_heights::PeerHeightsCore::NAME),
    );
    let connections = Connections::new(
        connections::Deps {
            config: config.connections.clone(),
            identity,
            runtime: runtime.clone(),
            // Wired once: the subscribers' addresses outlive restarts.
            subscribers: vec![
                actors.heights.clone().recipient(),
                actors.discovery.clone().recipient(),
                actors.state_sync.clone().recipient(),
            ],
            events,
            mailbox_capacity: capacity,
            faults: faults.clone(),
        },
        Recorder::from_env(connections::ConnectionsCore::NAME),
    );
    let state_sync = StateSync::new(
        state_sync::Deps {
            config: sync_config(config),
            genesis_epoch,
            tick: config.tick,
            timeout: config.timeout,
            verify_synced_block_signatures: config.verify_synced_block_signatures,
            limits: config.verifier.limits.clone(),
            commit_budget_bytes: config.grpc.max_fetch_response_bytes,
            store,
            verifier: actors.verifier.clone(),
            heights: actors.heights.clone(),
            connections: actors.connections.clone(),
            runtime: runtime.clone(),
            commits,
            availability,
            execution,
            prune: config.prune.clone(),
            mailbox_capacity: capacity,
            local_writes: Arc::new(tokio::sync::Semaphore::new(config.max_local_writes)),
            max_queries: config.connections.max_connections.max(1),
            max_pushes: max_tracked_peers.max(1),
            archive,
            archived,
            faults: faults.clone(),
        },
        Recorder::from_env(state_sync::StateSyncCore::NAME),
    )?;
    let discovery = Discovery::new(
        discovery::Deps {
            init: discovery_init,
            key,
            addresses,
            connections: actors.connections.clone(),
            verifier: actors.verifier.clone(),
            runtime,
            timeout: config.timeout,
            max_node_info_bytes: config.verifier.limits.max_node_info_bytes,
            mailbox_capacity: capacity,
            faults: faults.clone(),
        },
        Recorder::from_env(discovery::DiscoveryCore::NAME),
    );
    let adapter = GrpcAdapter::new(
        grpc::Deps {
            limits: config.grpc.clone(),
            peer_heights: actors.heights.clone(),
            state_sync: actors.state_sync.clone(),
            send_stats,
            mailbox_capacity: capacity,
            faults,
        },
        Recorder::from_env(grpc::GrpcAdapterCore::NAME),
    );

    let recorder = Recorder::from_env(supervisor::SupervisorCore::NAME);
    let root_actor = Supervisor::new(config.supervision.clone(), tree.clone(), recorder);
    supervisor::start(
        root_ctx,
        root_actor,
        supervisor::SupervisorCore::NAME,
        Parent::Fatal(tree),
    );
    // The Verifier first: it installs every stored committee before it
    // handles any message.
    supervised(verifier_ctx, verifier, verifier::VerifierCore::NAME, &root);
    supervised(reserved_ctx, reserved, RESERVED_SLOTS, &root);
    supervised(
        heights_ctx,
        heights,
        peer_heights::PeerHeightsCore::NAME,
        &root,
    );
    supervised(
        connections_ctx,
        connections,
        connections::ConnectionsCore::NAME,
        &root,
    );
    supervised(
        state_sync_ctx,
        state_sync,
        state_sync::StateSyncCore::NAME,
        &root,
    );
    supervised(
        discovery_ctx,
        discovery,
        discovery::DiscoveryCore::NAME,
        &root,
    );
    supervised(adapter_ctx, adapter, grpc::GrpcAdapterCore::NAME, &root);
    Ok(actors)
}

/// The StateSync core's settings, with the limits it shares with the rest
/// of the node filled in: the largest block, the servers' message size,
/// the height query interval, and a restart window that spans several
/// request timeouts (or a peer that always times out would never pass the
/// intensity limit).
fn sync_config(config: &P2pConfig) -> state_sync::Config {
    let mut sync = config.state_sync.clone();
    sync.max_block_bytes = config.verifier.limits.max_block_bytes as u64;
    sync.max_message_bytes = config.grpc.max_fetch_response_bytes as u64;
    sync.max_bytes_per_fetch = sync.max_bytes_per_fetch.max(sync.max_block_bytes);
    sync.height_query_interval_ms = config.height_query_interval.as_millis() as u64;
    // Batches are never cut at the lead: it holds one batch at least.
    sync.max_lead_over_execution = sync
        .max_lead_over_execution
        .max(sync.commit_sync_batch_size);
    let timeouts = u64::from(sync.max_restarts) + 1;
    let span = (config.timeout.as_millis() as u64).saturating_mul(timeouts);
    sync.restart_window_ms = sync.restart_window_ms.max(span);
    sync
}
