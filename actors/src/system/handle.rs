use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::MailboxError;
use soma_store::{ConsensusStore, SyncedBatch};
use soma_types::{
    ChainId, CommitIndex, CommittedSubDag, Committee, PeerId, SignedNodeInfo, TrustedCommit,
    VerifiedBlock,
};
use tokio::sync::{broadcast, oneshot, watch};

use super::commits::{CommitStream, Execution, Source};
use super::store_gate::Closed;
use super::tree::Actors;
use crate::connections::{ActivePeers, Connect, PeerEvent};
use crate::discovery::{KnownPeerCount, KnownPeers};
use crate::peer_heights::{CountPeers, PeerCounts, PeerView, Snapshot};
use crate::state_sync::{ApplyError, ApplyLocal, GetSyncStatus, StoreCertificate, SyncStatus};
use crate::supervisor::{NodeFailure, TreeStatus};

/// Time allowed for the server to finish in-flight calls at shutdown.
pub(super) const SERVER_DRAIN: Duration = Duration::from_secs(5);

/// Time a connection has to close gracefully at shutdown before it is
/// cut: a second of the drain is left for the cuts to end.
pub(super) const CONNECTION_STOP_GRACE: Duration = Duration::from_secs(4);

/// What shutdown stops. The server and the System are stopped first, by
/// [`P2pHandle::shutdown`] or, when an actor fails past the intensity
/// limit, by the node itself; threads are joined by `shutdown`.
pub(super) struct Running {
    pub(super) system: actix_rt::System,
    pub(super) actor_thread: std::thread::JoinHandle<()>,
    pub(super) actors_stopped: oneshot::Receiver<()>,
    pub(super) server: Option<tokio::task::JoinHandle<()>>,
    pub(super) shutdown: Option<oneshot::Sender<()>>,
    pub(super) owned_runtime: Option<OwnedRuntime>,
}

/// A runtime the node made for itself ([`super::P2pBuilder::start`] with
/// no runtime given). Dropped before [`P2pHandle::shutdown`] took it (an
/// error of `start`, a `shutdown` call dropped half-way, the last handle
/// gone), it shuts down in the background: dropped as it is, a runtime
/// panics inside async code.
pub(super) struct OwnedRuntime(Option<tokio::runtime::Runtime>);

impl OwnedRuntime {
    pub(super) fn new(runtime: tokio::runtime::Runtime) -> Self {
        OwnedRuntime(Some(runtime))
    }

    /// The runtime, for a shutdown that waits for it.
    fn take(mut self) -> Option<tokio::runtime::Runtime> {
        self.0.take()
    }
}

impl Drop for OwnedRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

pub(super) struct Inner {
    pub(super) rpc_counts: crate::grpc::RpcCounts,
    pub(super) send_stats: Arc<crate::grpc::SendStats>,
    pub(super) inbound: soma_wire::inbound::ConnectionLimit,
    pub(super) events: broadcast::Sender<PeerEvent>,
    pub(super) peer_id: PeerId,
    pub(super) local_addr: SocketAddr,
    pub(super) chain_id: ChainId,
    pub(super) own_info: SignedNodeInfo,
    /// The embedder's store, as given.
    pub(super) store: Arc<dyn ConsensusStore>,
    /// The node's way to it, closed at shutdown.
    pub(super) gate: Arc<super::store_gate::StoreGate>,
    pub(super) actors: Actors,
    pub(super) commits: broadcast::Sender<CommittedSubDag>,
    /// The registered executor's progress.
    pub(super) execution: Execution,
    /// Set once the node stops, for streams waiting on live commits and
    /// the archive writer.
    pub(super) stopped: watch::Sender<bool>,
    /// The archive's counters, if the node has an archive.
    pub(super) archive: Option<Arc<crate::archive::ArchiveStats>>,
    /// Bytes of commits a stream reads from the store at once.
    pub(super) commit_read_bytes: usize,
    pub(super) tree: watch::Receiver<TreeStatus>,
    pub(super) runtime: tokio::runtime::Handle,
    pub(super) timeout: Duration,
    pub(super) running: Mutex<Option<Running>>,
    /// Set once the server has drained and the actors are told to stop;
    /// a second caller (a failure and `shutdown` at once) waits for it.
    pub(super) halted: tokio::sync::OnceCell<()>,
    /// Set once `shutdown` has joined every thread; a second `shutdown`
    /// waits for the first's joins.
    pub(super) shut_down: tokio::sync::OnceCell<()>,
    /// Set by the thread that joins the node's once it has.
    pub(super) joined: Arc<watch::Sender<bool>>,
}

impl Inner {
    fn running(&self) -> std::sync::MutexGuard<'_, Option<Running>> {
        self.running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Stops the server (it drains the calls in flight) and the actors;
    /// joining their thread is left to `shutdown` or the drop. Done once:
    /// every caller returns once it is done.
    async fn halt(&self) {
        self.halted.get_or_init(|| self.stop_serving()).await;
    }

    async fn stop_serving(&self) {
        let (shutdown, server, system) = {
            let mut running = self.running();
            let Some(r) = running.as_mut() else {
                return;
            };
            (r.shutdown.take(), r.server.take(), r.system.clone())
        };
        if let Some(shutdown) = shutdown {
            let _ = shutdown.send(());
        }
        self.stopped.send_replace(true);
        if let Some(server) = server {
            // Timed on the node's runtime: the caller may be on none. Each
            // connection is cut within `CONNECTION_STOP_GRACE` by its own
            // transport (tonic serves it in a task of its own, which no
            // abort here reaches); the server's task, still running when
            // the time is up, is aborted rather than left to run on a
            // runtime that may be the embedder's.
            let drained = self.runtime.spawn(async move {
                let abort = server.abort_handle();
                let drained = tokio::time::timeout(SERVER_DRAIN, server).await.is_ok();
                if !drained {
                    abort.abort();
                }
                drained
            });
            match drained.await {
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!("the server did not drain in time; stopped")
                }
                Err(_) => tracing::warn!("the node's runtime stopped before the server drained"),
            }
        }
        system.stop();
    }
}

impl Drop for Inner {
    /// The last handle going away stops the node without waiting.
    fn drop(&mut self) {
        self.stopped.send_replace(true);
        if let Some(running) = self.running().take() {
            if let Some(shutdown) = running.shutdown {
                let _ = shutdown.send(());
            }
            running.system.stop();
            // An owned runtime shuts down in the background as it drops.
        }
    }
}

/// Errors of handle calls.
#[derive(Debug, thiserror::Error)]
pub enum P2pError {
    /// The node is shut down.
    #[error("the node is shut down")]
    Stopped,
    /// An actor did not answer in time.
    #[error("timed out")]
    Timeout,
    /// The store failed or refused the write.
    #[error("store: {0}")]
    Store(#[from] soma_store::Error),
    /// The commit was refused before the store saw it.
    #[error("refused: {0}")]
    Refused(ApplyError),
    /// The actor's mailbox is full, or (from `send_commit` and
    /// `send_certificate`) as many writes as `max_local_writes` wait for
    /// the store; try again later.
    #[error("the node is busy; try again")]
    Busy,
    /// The executor asked for a commit the node has pruned.
    #[error("commit {index} is pruned; the lowest kept is {lowest}")]
    Pruned {
        /// The commit asked for.
        index: CommitIndex,
        /// The lowest commit the store keeps.
        lowest: CommitIndex,
    },
    /// An executor is registered already (its stream is alive).
    #[error("an executor is registered already")]
    ExecutorRegistered,
}

impl From<ApplyError> for P2pError {
    fn from(e: ApplyError) -> Self {
        match e {
            ApplyError::Store(e) => P2pError::Store(e),
            ApplyError::Busy => P2pError::Busy,
            ApplyError::Pruned { index, lowest } => P2pError::Pruned { index, lowest },
            e => P2pError::Refused(e),
        }
    }
}

fn mailbox(e: MailboxError) -> P2pError {
    match e {
        MailboxError::Closed => P2pError::Stopped,
        MailboxError::Timeout => P2pError::Timeout,
    }
}

/// A commit made by local consensus, handed to the P2P layer.
#[derive(Clone, Debug)]
pub struct LocalCommit {
    /// The commit; it must follow the node's highest synced commit.
    pub commit: TrustedCommit,
    /// Its blocks, in commit order.
    pub blocks: Vec<VerifiedBlock>,
    /// Blocks certifying it, if already known (else see
    /// [`P2pHandle::send_certificate`]).
    pub certificate: Vec<VerifiedBlock>,
    /// The next committee, if this commit ends its epoch.
    pub next_committee: Option<Committee>,
}

/// The node's inbound connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InboundConnections {
    /// Open now, TLS handshakes in progress included.
    pub open: usize,
    /// The most allowed open at once (`max_inbound_connections`).
    pub max: usize,
    /// Refused so far, every reason together.
    pub refused: u64,
    /// Peers that may use the reserved slots now: allowlisted peers and
    /// members of the newest two committees installed.
    pub reserved_peers: usize,
    /// Admissions, refusals by reason, evictions, handshake timeouts and
    /// idle closures so far.
    pub counts: soma_wire::inbound::Counts,
    /// Bytes of answers handed to HTTP/2 and not yet written to the
    /// sockets, over every open connection: each connection's at most
    /// `max_unwritten_bytes_per_connection` (but for one frame larger
    /// than it, alone).
    pub unwritten_bytes: u64,
}

/// Whether one long-lived actor is running.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ActorHealth {
    /// The actor.
    pub name: &'static str,
    /// Whether its mailbox is open.
    pub alive: bool,
    /// Times its supervisor restarted it after a panic or a stop.
    pub restarts: u64,
}

/// The node's health.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Health {
    /// Whether the node has been neither shut down nor stopped by a
    /// failure.
    pub running: bool,
    /// Each long-lived actor.
    pub actors: Vec<ActorHealth>,
    /// Why the node stopped on its own, if it did.
    pub failure: Option<NodeFailure>,
}

impl Health {
    /// Whether the node runs and every actor is alive.
    pub fn is_healthy(&self) -> bool {
        self.running && self.failure.is_none() && self.actors.iter().all(|a| a.alive)
    }
}

/// The handle to a running P2P node. Cheap to clone; every clone controls the
/// same node, which stops when [`P2pHandle::shutdown`] is called or the last
/// clone is dropped.
#[derive(Clone)]
pub struct P2pHandle {
    inner: Arc<Inner>,
}

impl P2pHandle {
    pub(super) fn from_inner(inner: Inner) -> Self {
        P2pHandle {
            inner: Arc::new(inner),
        }
    }

    /// The node's peer id (its network public key).
    pub fn peer_id(&self) -> PeerId {
        self.inner.peer_id
    }

    /// The address the gRPC server is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.local_addr
    }

    /// The chain the node is on.
    pub fn chain_id(&self) -> ChainId {
        self.inner.chain_id
    }

    /// The node's signed self-description, as sent to peers.
    pub fn node_info(&self) -> &SignedNodeInfo {
        &self.inner.own_info
    }

    /// The node's store.
    pub fn store(&self) -> &Arc<dyn ConsensusStore> {
        &self.inner.store
    }

    /// Every commit the node applies from now on, in index order, for
    /// observers that accept gaps (a dashboard, a log). A subscriber that
    /// falls more than the broadcast capacity behind gets
    /// `RecvError::Lagged(n)` and misses `n` commits; it never slows sync.
    /// Use [`P2pHandle::subscribe_synced_commits_from`] to miss nothing.
    pub fn subscribe_synced_commits(&self) -> broadcast::Receiver<CommittedSubDag> {
        self.inner.commits.subscribe()
    }

    /// Every commit from `index` on, exactly once and in index order: read
    /// from the store while the stream is behind, taken live once it has
    /// caught up. It never slows sync; if it falls below what the node's
    /// retention keeps, it says so ([`super::StreamError::Pruned`]) rather than
    /// skip. For the executor, use [`P2pHandle::subscribe_executor_from`].
    pub fn subscribe_synced_commits_from(&self, index: CommitIndex) -> CommitStream {
        CommitStream::new(
            Source {
                store: self.inner.store.clone(),
                live: self.inner.commits.downgrade(),
                stopped: self.inner.stopped.subscribe(),
                runtime: self.inner.runtime.clone(),
                read_bytes: self.inner.commit_read_bytes,
            },
            index,
        )
    }

    /// Like [`P2pHandle::subscribe_synced_commits_from`], registered as
    /// the node's executor: sync fetches at most the state sync setting
    /// `max_lead_over_execution` commits past the last commit the executor
    /// has taken (a call to [`CommitStream::next`] means every commit
    /// delivered before it is executed), pausing rather than dropping
    /// anything, and pruning never removes a commit it has not taken.
    /// One executor at a time: [`P2pError::ExecutorRegistered`] while
    /// another's stream lives; dropping the stream unregisters it. A
    /// [`crate::system::StreamError::Store`] leaves it registered, holding
    /// sync and pruning back while the executor retries: back off between
    /// tries, and drop the stream to release them if the store stays
    /// broken.
    ///
    /// The node does not persist the executor's position: register it
    /// right after start (the first prune runs one `prune.interval_ms`
    /// later), or a pruning node may remove commits it has not executed.
    ///
    /// It blocks the calling thread while a prune step runs (one write of
    /// up to `prune.batch_commits` commits) and for one read of the
    /// store's lowest commit: from async code on a busy node, call it
    /// inside `spawn_blocking`.
    pub fn subscribe_executor_from(&self, index: CommitIndex) -> Result<CommitStream, P2pError> {
        use super::commits::Refused;
        self.subscribe_synced_commits_from(index)
            .executor(&self.inner.execution)
            .map_err(|e| match e {
                Refused::Taken => P2pError::ExecutorRegistered,
                Refused::Pruned(lowest) => P2pError::Pruned { index, lowest },
                Refused::Store(e) => P2pError::Store(e),
            })
    }

    /// Hands a commit of local consensus to the node. It takes the path of
    /// synced commits: one atomic store write, then the broadcast to
    /// subscribers, then, if it came with its certificate, PushCommit to
    /// peers known to be behind (else at [`P2pHandle::send_certificate`]). A commit
    /// that does not link to the highest synced commit, or lacks a block it
    /// names, is refused with an error.
    ///
    /// An error does not always mean the commit was not stored: once sent,
    /// the write goes on whatever the caller does, so after
    /// [`P2pError::Timeout`] (or `Stopped` at shutdown) it may have landed.
    /// Sending it again is safe: a commit already stored, the same at its
    /// index, is taken as done (its certificate stored if it brings one),
    /// while another commit at a stored index is refused as not contiguous,
    /// and one pruned since with [`P2pError::Pruned`].
    pub async fn send_commit(&self, local: LocalCommit) -> Result<(), P2pError> {
        let batch = SyncedBatch {
            commits: vec![local.commit],
            blocks: local.blocks,
            certificate: local.certificate,
            next_committee: local.next_committee,
        };
        self.ask(&self.inner.actors.state_sync, ApplyLocal(batch))
            .await?
            .map_err(P2pError::from)
    }

    /// What StateSync is doing, as text for a person to read (the
    /// watermarks, each task in flight, the batches fetched and their
    /// chunks still to come, the fetches ahead): a diagnostic, whose
    /// wording may change.
    pub async fn sync_plan(&self) -> Result<String, P2pError> {
        self.ask(
            &self.inner.actors.state_sync,
            crate::state_sync::GetSyncPlan,
        )
        .await
    }

    /// Sends `message` to `actor` and waits for its answer, at most the
    /// handle's timeout, a full mailbox included (actix's own timeout is
    /// not polled while its send waits for room). The timer is the
    /// caller's runtime's, or, called from a thread without one, the
    /// node's: the handle's calls work from any thread, and from any tokio
    /// runtime with its time driver on (`enable_time` or `enable_all`;
    /// tokio panics on a timer of a runtime without one).
    fn ask<A, M>(
        &self,
        actor: &actix::Addr<A>,
        message: M,
    ) -> impl Future<Output = Result<M::Result, P2pError>> + use<A, M>
    where
        A: actix::Handler<M>,
        A::Context: actix::dev::ToEnvelope<A, M>,
        M: actix::Message + Send + 'static,
        M::Result: Send,
    {
        let request = {
            let _runtime = (tokio::runtime::Handle::try_current().is_err())
                .then(|| self.inner.runtime.enter());
            tokio::time::timeout(self.inner.timeout, actor.send(message))
        };
        async move {
            match request.await {
                Ok(answer) => answer.map_err(mailbox),
                Err(_) => Err(P2pError::Timeout),
            }
        }
    }

    /// How far the node has synced, and how far its peers reach.
    pub async fn sync_status(&self) -> Result<SyncStatus, P2pError> {
        self.ask(&self.inner.actors.state_sync, GetSyncStatus).await
    }

    /// Stores the certificate of an already stored local commit, so the node
    /// can serve batches ending there. The node advertises (and pushes to
    /// peers behind) only commits whose certificate it holds: a local
    /// commit sent without one is served, and claimed, from this call on.
    /// Refused ([`ApplyError::NoQuorum`]) if `blocks` hold no quorum of
    /// votes for the commit; an empty `blocks` certifies nothing. Once
    /// sent, the write and the advertisement happen even if this call is
    /// dropped or times out.
    pub async fn send_certificate(
        &self,
        index: CommitIndex,
        blocks: Vec<VerifiedBlock>,
    ) -> Result<(), P2pError> {
        self.ask(
            &self.inner.actors.state_sync,
            StoreCertificate { index, blocks },
        )
        .await?
        .map_err(P2pError::from)
    }

    /// Dials a peer at `address`; with `peer` given, the server must prove
    /// that identity. The result shows in [`P2pHandle::connected_peers`].
    /// Refused with [`P2pError::Busy`] while Connections' mailbox is full.
    pub fn connect(
        &self,
        peer: Option<PeerId>,
        address: impl Into<String>,
    ) -> Result<(), P2pError> {
        let connect = Connect {
            peer,
            address: address.into(),
        };
        self.inner
            .actors
            .connections
            .try_send(connect)
            .map_err(|e| match e {
                actix::prelude::SendError::Full(_) => P2pError::Busy,
                actix::prelude::SendError::Closed(_) => P2pError::Stopped,
            })
    }

    /// The peers the node holds a connection to.
    pub async fn connected_peers(&self) -> Result<Vec<PeerId>, P2pError> {
        self.ask(&self.inner.actors.connections, ActivePeers).await
    }

    /// The peers discovery knows, with the newest signed info of each.
    pub async fn known_peers(&self) -> Result<Vec<SignedNodeInfo>, P2pError> {
        self.ask(&self.inner.actors.discovery, KnownPeers).await
    }

    /// How many peers discovery knows: [`P2pHandle::known_peers`]' length,
    /// without copying the table.
    pub async fn known_peer_count(&self) -> Result<usize, P2pError> {
        self.ask(&self.inner.actors.discovery, KnownPeerCount).await
    }

    /// Every peer event from now on: connections, disconnections, failed
    /// dials. A subscriber more than `peer_event_broadcast_capacity` behind
    /// gets `RecvError::Lagged(n)`.
    pub fn subscribe_peer_events(&self) -> broadcast::Receiver<PeerEvent> {
        self.inner.events.subscribe()
    }

    /// Calls the node's server answered, by method and status code.
    pub fn rpc_counts(&self) -> Vec<(&'static str, tonic::Code, u64)> {
        self.inner
            .rpc_counts
            .iter()
            .map(|e| (e.key().0, e.key().1, *e.value()))
            .collect()
    }

    /// What the archive did, if the node has one: the writer's position,
    /// batches written and read, failures, and archived data refused.
    pub fn archive_status(&self) -> Option<crate::archive::ArchiveStatus> {
        self.inner.archive.as_ref().map(|a| a.status())
    }

    /// Fetches (FetchCommits, FetchBlocks) the server has admitted and not
    /// yet finished sending.
    pub fn fetches_in_flight(&self) -> usize {
        self.inner.send_stats.fetches_in_flight()
    }

    /// FetchCommits waiting, on their fetch slot, for the answers their
    /// connection has not read yet to be sent (see
    /// `max_buffered_bytes_per_connection`); not counted in
    /// [`Self::fetches_in_flight`].
    pub fn fetches_waiting_for_budget(&self) -> usize {
        self.inner.send_stats.fetches_waiting_for_budget()
    }

    /// Responses the server cut because the caller did not read them
    /// within `send_timeout`.
    pub fn responses_cut(&self) -> u64 {
        self.inner.send_stats.responses_cut()
    }

    /// Stalled responses the server cut so that a newer fetch could take
    /// their slot (see `fetch_stall_timeout`).
    pub fn responses_preempted(&self) -> u64 {
        self.inner.send_stats.responses_preempted()
    }

    /// Fetches the server refused for want of a slot, by the cap that was
    /// full: which `max_concurrent_fetches*` setting binds.
    pub fn fetches_refused(&self) -> crate::grpc::FetchesRefused {
        self.inner.send_stats.fetches_refused()
    }

    /// Fetches the server started on the slot their connection kept from
    /// its fetch before, without a round trip to the GrpcAdapter (see
    /// docs/architecture.md, "Fetch slots kept by their connection").
    pub fn fetches_on_kept_slots(&self) -> u64 {
        self.inner.send_stats.fetches_on_kept_slots()
    }

    /// Fetches whose callers dropped them before reading their answers (a
    /// reset call, a closed connection): each is charged to the caller's
    /// `abandoned-fetches-per-minute` allowance.
    pub fn fetches_abandoned(&self) -> u64 {
        self.inner.send_stats.fetches_abandoned()
    }

    /// How many inbound connections are open, and what admission did so
    /// far (refusals by reason, evictions, timeouts).
    pub fn inbound_connections(&self) -> InboundConnections {
        let limit = &self.inner.inbound;
        InboundConnections {
            open: limit.open(),
            max: limit.max(),
            refused: limit.refused(),
            reserved_peers: limit.reserved_peers(),
            counts: limit.counts(),
            unwritten_bytes: limit.unwritten_bytes(),
        }
    }

    /// What the node knows of each peer's chain.
    pub async fn peer_heights(&self) -> Result<Vec<PeerView>, P2pError> {
        self.ask(&self.inner.actors.heights, Snapshot).await
    }

    /// How many of [`P2pHandle::peer_heights`]' peers are banned and how
    /// many doubted, without building the views.
    pub async fn peer_counts(&self) -> Result<PeerCounts, P2pError> {
        self.ask(&self.inner.actors.heights, CountPeers).await
    }

    /// Whether the node and each of its long-lived actors are running, and
    /// how often each was restarted.
    pub fn health(&self) -> Health {
        let tree = self.inner.tree.borrow().clone();
        let running = self.inner.running().is_some() && tree.failure.is_none();
        let actors = self
            .inner
            .actors
            .alive()
            .into_iter()
            .map(|(name, alive)| ActorHealth {
                name,
                alive,
                restarts: tree.restarts.get(name).copied().unwrap_or(0),
            })
            .collect();
        Health {
            running,
            actors,
            failure: tree.failure,
        }
    }

    /// Why the node stopped on its own, if it did: an actor failed more
    /// often than the supervisor's intensity limit allows.
    pub fn failure(&self) -> Option<NodeFailure> {
        self.inner.tree.borrow().failure.clone()
    }

    /// Waits until the node stops on its own and says why; `None` if it
    /// was shut down instead.
    pub async fn failed(&self) -> Option<NodeFailure> {
        let mut tree = self.inner.tree.clone();
        let failed = tree.wait_for(|t| t.failure.is_some()).await.ok()?;
        failed.failure.clone()
    }

    /// Stops the server and the actors once an actor fails past the
    /// intensity limit: the node never runs half its actors.
    pub(super) fn stop_on_failure(&self) {
        let inner = Arc::downgrade(&self.inner);
        let mut tree = self.inner.tree.clone();
        self.inner.runtime.spawn(async move {
            if tree.wait_for(|t| t.failure.is_some()).await.is_err() {
                return;
            }
            if let Some(inner) = inner.upgrade() {
                inner.halt().await;
            }
        });
    }

    /// Stops the node gracefully: the server stops accepting calls and
    /// drains the running ones (each connection is cut if still open 4 s
    /// into the stop, or sooner at a grace of its own; the server is
    /// stopped at 5 s), the actors stop, and their thread is joined,
    /// as is an owned runtime's (for up to 5 s); store calls still under
    /// way are waited for within the same 5 s. The Verifier's pool is let
    /// go, not joined: its threads end once their last job does. A second
    /// call, at once or later, returns once the first has finished.
    pub async fn shutdown(&self) {
        // Once: a second call waits for the first's joins.
        self.inner
            .shut_down
            .get_or_init(|| self.stop_and_join())
            .await;
    }

    /// The joins run on a thread of their own, which a caller dropped half
    /// way does not stop: the next caller (`shut_down` runs this again if
    /// the first was dropped) waits for the same thread.
    async fn stop_and_join(&self) {
        self.inner.halt().await;
        let mut joined = self.inner.joined.subscribe();
        let running = self.inner.running().take();
        if let Some(running) = running {
            let done = self.inner.joined.clone();
            let (gate, gate_now) = (self.inner.gate.clone(), self.inner.gate.clone());
            let join = move || {
                let Running {
                    actor_thread,
                    actors_stopped,
                    owned_runtime,
                    ..
                } = running;
                let _ = actors_stopped.blocking_recv();
                let _ = actor_thread.join();
                // One drain for both: an owned runtime's blocking store
                // calls and, on a runtime the node does not own, those
                // still under way.
                let deadline = std::time::Instant::now() + SERVER_DRAIN;
                if let Some(rt) = owned_runtime.and_then(OwnedRuntime::take) {
                    rt.shutdown_timeout(SERVER_DRAIN);
                }
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                if let Closed::Busy(calls) = gate.close(left) {
                    tracing::warn!(
                        calls,
                        "store calls still under way at shutdown; they hold the store until they return"
                    );
                }
                done.send_replace(true);
            };
            let spawned = std::thread::Builder::new()
                .name("soma-stop".into())
                .spawn(join);
            if let Err(e) = spawned {
                // Refuses the node's store calls from now on, at least.
                let _ = gate_now.close(Duration::ZERO);
                // The node's parts were dropped with the closure: an owned
                // runtime shuts down in the background.
                tracing::warn!(%e, "cannot start a thread to join the node's; not waiting");
                self.inner.joined.send_replace(true);
            }
        }
        let _ = joined.wait_for(|joined| *joined).await;
        tracing::info!(peer_id = %self.inner.peer_id, "p2p node stopped");
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use soma_chain::{ChainBuilder, ChainConfig};
    use soma_store::MemStore;
    use soma_types::KeyPair;

    use super::*;
    use crate::P2pConfig;
    use crate::connections::{Disconnect, GetClient, ReportBroken};

    /// Waits until Connections holds a connection to `peer` or not, as
    /// `held` says.
    async fn wait_held(node: &P2pHandle, peer: PeerId, held: bool) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while node.connected_peers().await.unwrap().contains(&peer) != held {
            assert!(Instant::now() < deadline, "never held: {held}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// A failure reported of a connection since replaced (closed, and the
    /// peer dialled again) closes nothing; one of the connection held
    /// closes it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failure_of_a_replaced_connection_closes_nothing() {
        let chain = ChainBuilder::new(ChainConfig::validators(4)).build(20);
        let start = |key: u8| {
            let store = Arc::new(MemStore::new(chain.genesis()));
            let key = KeyPair::from_seed([key; 32]);
            crate::P2pBuilder::new(P2pConfig::default(), key, chain.genesis().clone(), store)
                .start()
                .expect("the node starts")
        };
        let (source, node) = (start(1), start(9));
        let (peer, address) = (source.peer_id(), source.local_addr().to_string());
        let connections = node.inner.actors.connections.clone();
        let number = async || {
            let held = connections.send(GetClient(peer)).await.unwrap();
            held.expect("a client of the peer").0
        };
        node.connect(Some(peer), address.clone()).unwrap();
        wait_held(&node, peer, true).await;
        let first = number().await;
        connections.send(Disconnect { peer }).await.unwrap();
        wait_held(&node, peer, false).await;
        node.connect(Some(peer), address).unwrap();
        wait_held(&node, peer, true).await;
        let second = number().await;
        assert_ne!(first, second);
        // Handled in order: the failure, then the question.
        connections.do_send(ReportBroken {
            peer,
            connection: first,
        });
        assert!(node.connected_peers().await.unwrap().contains(&peer));
        assert_eq!(number().await, second);
        connections.do_send(ReportBroken {
            peer,
            connection: second,
        });
        assert!(!node.connected_peers().await.unwrap().contains(&peer));
        node.shutdown().await;
        source.shutdown().await;
    }
}
