use actix::Message;
use serde::{Deserialize, Serialize};
use soma_store::SyncedBatch;
use soma_types::{CommitIndex, CommitRef, Epoch, PeerId, VerifiedBlock};

use super::apply::{Applied, ApplyError};
use super::worker::BatchData;
use crate::connections::CallError;
use crate::peer_heights::AcquireError;

/// Correlation id of a fetch task.
pub type TaskId = u64;

/// What a verified commit batch holds, as far as scheduling needs to know.
/// The commits and certificate themselves stay with the shell.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitBatchInfo {
    /// First commit.
    pub start: CommitIndex,
    /// Last commit (the server may end before the end asked for).
    pub end: CommitIndex,
    /// Reference of the last commit.
    pub last: CommitRef,
    /// Epoch of the batch.
    pub epoch: Epoch,
    /// Blocks the commits name.
    pub block_count: usize,
    /// Bytes of the commits and certifier blocks, held until applied.
    pub bytes: u64,
    /// Certifier blocks, verified: blocks of the chain whose size tells
    /// how many of its blocks a fetch may bring before any is fetched.
    #[serde(default)]
    pub certifier_blocks: usize,
    /// Their bytes.
    #[serde(default)]
    pub certifier_bytes: u64,
}

/// An epoch that starts once a batch is applied, and what the core needs
/// to know of its committee.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochStart {
    /// The new epoch.
    pub epoch: Epoch,
    /// Largest FetchCommits answer of the epoch (it depends on the
    /// committee: see `Limits::max_fetch_commits_response_bytes`).
    pub commit_answer_bytes: u64,
}

/// A commit fetch, as the core decided it: commits `start..=end`, which
/// must follow `after` and be of `epoch`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitsWanted {
    /// First commit.
    pub start: CommitIndex,
    /// Last commit wanted.
    pub end: CommitIndex,
    /// The commit they must link to.
    pub after: CommitRef,
    /// The epoch the commits must be of (the expected epoch).
    pub epoch: Epoch,
    /// Whether the expected epoch is certain: false while a fetched batch
    /// that may end it waits to be applied.
    pub settled: bool,
    /// Largest answer accepted, in bytes (its share of the budget).
    pub max_bytes: u64,
}

impl CommitsWanted {
    /// Whether `failure` is an answer that a later epoch has started at
    /// `start`, given while the expected epoch is not settled: what an
    /// honest peer answers right after an epoch's end we have fetched but
    /// not applied, and also after a continuation of the ended epoch that
    /// a retired committee's keys certified, which may run past the whole
    /// next epoch. Not a lie to punish at once but a claim, judged once the
    /// batches before it are applied.
    pub fn claims_later_epoch(&self, failure: &Failure) -> bool {
        matches!(
            failure,
            Failure::Invalid(soma_types::Error::CommitWrongEpoch { index, got, expected })
                if !self.settled && *index == self.start && got > expected
        )
    }
}

/// Why a task failed. Peer faults and local faults are told apart, so that
/// our own back-pressure is never charged to the peer that served us.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Failure {
    /// No connected peer can serve the range.
    NoPeer,
    /// The peer did not answer in time.
    Timeout,
    /// The peer answered with an error status (its gRPC code).
    Status {
        /// The gRPC status code.
        code: i32,
    },
    /// The connection failed under the call.
    Transport,
    /// The peer left (or its connection was dropped) before it was asked.
    Disconnected,
    /// The peer said it does not hold what it was asked for.
    NotFound,
    /// The peer answered NOT_FOUND to a block fetch after sending `held`
    /// of the blocks asked for (an honest server sends them in the order
    /// asked, up to the first it lacks).
    BlocksWithheld {
        /// Blocks received before the NOT_FOUND.
        held: usize,
        /// Whether, when the answer came, PeerHeights still had the peer
        /// claiming the commits that name the blocks. Only then is the
        /// NOT_FOUND a lie once the batch is applied: a peer whose new
        /// lowest commit we had learnt deleted them after its
        /// `prune-grace`, as an honest node does. Traces recorded before
        /// it existed read as not claimed.
        #[serde(default)]
        claimed: bool,
    },
    /// The peer sent data that failed verification. A commit answer of the
    /// epoch after the expected one may be an honest peer's, right after an
    /// epoch change: the core judges that, not the worker.
    Invalid(soma_types::Error),
    /// The requested blocks hold more bytes than the fetch may buffer: the
    /// chunk is split. Not the peer's fault, unless the chunk is one block
    /// (the digest fixes a block's size, within the limit).
    OverBudget {
        /// Bytes received when the stream was cut.
        received: u64,
        /// Bytes the fetch could hold.
        max: u64,
        /// Blocks asked for that came whole before the cut, their digests
        /// matched (none for a commit answer).
        #[serde(default)]
        held_blocks: usize,
        /// Their bytes: what the next chunks are sized by.
        #[serde(default)]
        held_bytes: u64,
    },
    /// Our side failed; never held against the peer.
    Local(LocalFailure),
    /// The task panicked (caught by the supervisor).
    Panicked,
}

impl Failure {
    /// Whether the peer refused for now (RESOURCE_EXHAUSTED): it serves
    /// fewer fetches from us at once than we sent, or is loaded. Load, not
    /// a fault: the work is retried after a pause and the peer is not
    /// avoided for it (PeerHeights lowers its slots and its rank).
    pub fn is_busy(&self) -> bool {
        matches!(self, Failure::Status { code } if *code == tonic::Code::ResourceExhausted as i32)
    }

    /// Whether the failure is the serving peer's doing.
    pub fn is_peer_fault(&self) -> bool {
        matches!(
            self,
            Failure::Timeout
                | Failure::Status { .. }
                | Failure::Transport
                | Failure::NotFound
                | Failure::BlocksWithheld { .. }
                | Failure::Invalid(_)
        )
    }
}

impl From<CallError> for Failure {
    fn from(e: CallError) -> Self {
        match e {
            CallError::NoConnection => Failure::Disconnected,
            CallError::Timeout => Failure::Timeout,
            CallError::Transport => Failure::Transport,
            e if e.is_not_found() => Failure::NotFound,
            CallError::Status { code } => Failure::Status { code },
        }
    }
}

impl From<AcquireError> for Failure {
    fn from(e: AcquireError) -> Self {
        match e {
            AcquireError::NoPeer => Failure::NoPeer,
            AcquireError::Busy => Failure::Local(LocalFailure::PeersBusy),
            AcquireError::Unavailable => Failure::Local(LocalFailure::ActorUnavailable),
        }
    }
}

/// A failure on our own side of a fetch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LocalFailure {
    /// The Verifier's queue was full.
    VerifierBusy,
    /// The Verifier stopped or failed internally.
    VerifierUnavailable,
    /// The Verifier has no committee for the expected epoch.
    UnknownEpoch(Epoch),
    /// PeerHeights or Connections did not answer.
    ActorUnavailable,
    /// Every peer that covers the range had all its fetch slots taken for
    /// as long as the fetch could wait.
    PeersBusy,
    /// The batch's data is gone (reset or discarded meanwhile).
    BatchGone,
}

/// Inputs of the StateSync core.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Input {
    /// The tick, with the highest commit claimed by peers of our chain (a
    /// claim: it may go down when liars are banned or peers leave).
    Tick {
        /// From PeerHeights.
        highest_known: Option<CommitIndex>,
    },
    /// The time of a retry came
    /// ([`StateSyncCore::next_retry`](super::StateSyncCore::next_retry)):
    /// work waiting out a backoff is scheduled now, not at the next tick.
    Wake,
    /// A caller pushed its new height (PushCommit): see
    /// [`HeightQueries::pushed`](super::HeightQueries::pushed).
    Pushed {
        /// The height it claims.
        index: CommitIndex,
    },
    /// The registered executor has taken every commit up to `taken`
    /// (`None`: no executor is registered, so the lead is not held).
    Executed {
        /// The last commit it has taken.
        taken: Option<CommitIndex>,
    },
    /// Connections holds a new connection to `peer`.
    PeerConnected {
        /// The peer.
        peer: PeerId,
    },
    /// A commit fetch ended.
    CommitsFetched {
        /// The task.
        task: TaskId,
        /// The peer asked, if one was found.
        peer: Option<PeerId>,
        /// The verified batch, or why not.
        result: Result<CommitBatchInfo, Failure>,
    },
    /// A commit fetch ahead ended; its answer, not checked yet, is held
    /// by the shell.
    CommitsPrefetched {
        /// The task.
        task: TaskId,
        /// The peer asked, if one was found.
        peer: Option<PeerId>,
        /// Bytes of the answer, or why not.
        result: Result<u64, Failure>,
    },
    /// A peer answered NOT_FOUND, in a hedge, for blocks named by commits
    /// of a batch ending at `last`, and still claimed those commits once
    /// asked afresh: judged with the deniers of a batch ending at that very
    /// commit once it is applied ([`Output::WithheldBlocks`]), or, if the
    /// watermark has passed `last` already, if the store holds that very
    /// commit ([`Output::WithheldIfStored`]). It comes whenever the peer
    /// answered that question, after its fetch ended maybe (a peer that
    /// stalled its answer held the fetch that long while it was waited
    /// for), so it names the batch by its last commit, not by the fetch.
    WithheldInHedge {
        /// The last commit of the batch.
        last: CommitRef,
        /// The peer.
        peer: PeerId,
    },
    /// A block fetch ended.
    BlocksFetched {
        /// The task.
        task: TaskId,
        /// The peer asked, if one was found.
        peer: Option<PeerId>,
        /// Bytes of the verified blocks, or why not.
        result: Result<u64, Failure>,
    },
    /// The batch starting at `start` was written; the watermark is `last`.
    /// A batch the core is not applying (one a failed incarnation sent to
    /// the store before a restart) moves the watermark like local commits.
    Applied {
        /// First commit of the batch.
        start: CommitIndex,
        /// The new watermark.
        last: CommitRef,
        /// Set when the batch ended its epoch: the epoch now current.
        next_epoch: Option<EpochStart>,
    },
    /// Applying the batch failed; everything after the watermark is
    /// fetched again.
    ApplyFailed {
        /// First commit of the batch.
        start: CommitIndex,
        /// Why.
        error: ApplyError,
    },
    /// The blocks of the batch starting at `start`, as they arrived, show
    /// that its commits break a rule their certificate cannot: a commit
    /// before the last carries the epoch's end. Its server is banned and
    /// everything after the watermark fetched again.
    BatchBroken {
        /// First commit of the batch.
        start: CommitIndex,
        /// The rule broken.
        error: soma_types::Error,
    },
    /// Local consensus applied commits up to `last` (through the same path).
    LocalApplied {
        /// The new watermark.
        last: CommitRef,
        /// Set when the commit ended its epoch.
        next_epoch: Option<EpochStart>,
    },
}

/// Outputs of the StateSync core.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Output {
    /// Fetch and verify the commits `wanted` names.
    FetchCommits {
        /// The task.
        task: TaskId,
        /// What to fetch, and what it must be.
        wanted: CommitsWanted,
        /// Peers not to ask (they failed this range).
        avoid: Vec<PeerId>,
        /// The fetch ahead whose answer to check instead of asking a peer.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        prefetched: Option<TaskId>,
    },
    /// Fetch the commits `start..=end` ahead of their turn, and hold the
    /// answer until then. It is certified as it arrives if its commits are
    /// of `epoch`; at its turn only the link of its first commit to the one
    /// before is left to check (a batch of another epoch is checked in
    /// full then).
    FetchCommitsAhead {
        /// The task.
        task: TaskId,
        /// First commit.
        start: CommitIndex,
        /// Last commit wanted.
        end: CommitIndex,
        /// The epoch expected when the fetch is sent.
        epoch: Epoch,
        /// Largest answer accepted, in bytes.
        max_bytes: u64,
        /// Peers not to ask.
        avoid: Vec<PeerId>,
    },
    /// Drop the answer of a fetch ahead: it will not be used.
    ForgetCommitsAhead {
        /// The task that fetched it.
        task: TaskId,
    },
    /// Fetch and verify blocks `offset..offset + len` of the batch starting
    /// at `batch`.
    FetchBlocks {
        /// The task.
        task: TaskId,
        /// First commit of the batch.
        batch: CommitIndex,
        /// First block of the chunk, in the batch's block order.
        offset: usize,
        /// Number of blocks.
        len: usize,
        /// Bytes of blocks the fetch may accept; more is cut off.
        max_bytes: u64,
        /// Peers not to ask.
        avoid: Vec<PeerId>,
    },
    /// `peer` answered NOT_FOUND for blocks of a batch now applied, so
    /// they existed, while it claimed the commits naming them
    /// ([`Failure::BlocksWithheld`]'s `claimed`): a lie.
    WithheldBlocks {
        /// The peer.
        peer: PeerId,
    },
    /// `peer` answered NOT_FOUND, while it claimed the commits naming
    /// them, for blocks of a batch ending at `commit` that was dropped
    /// before it was applied (a reset); the watermark has passed `commit`
    /// since, in batches ending elsewhere: a lie, judged as
    /// [`Output::WithheldBlocks`], if the store holds that very commit (a
    /// forged batch's commit at that index, which nobody may hold the
    /// blocks of, judges no one).
    WithheldIfStored {
        /// The peer.
        peer: PeerId,
        /// The last commit of the batch it withheld blocks of.
        commit: CommitRef,
    },
    /// Every block of the batch starting at `start` is in: write it.
    Apply {
        /// First commit of the batch.
        start: CommitIndex,
    },
    /// A worker failed and is restarted (counted for metrics).
    Restarted {
        /// The task that failed.
        task: TaskId,
        /// Why.
        failure: Failure,
    },
    /// A peer sent data that failed verification, or its claim proved
    /// false once our own data settled it (it said the next epoch had
    /// started, and it had not): ban it.
    Misbehaved {
        /// The peer.
        peer: PeerId,
    },
    /// Ask `peer` (every connected peer if `None`) for its availability.
    QueryHeights {
        /// The peer, or all.
        peer: Option<PeerId>,
    },
    /// Drop the shell's data of batches after the watermark.
    Reset,
    /// Drop the shell's data of the batch starting at `start`: local
    /// commits covered all of it.
    Discard {
        /// First commit of the batch.
        start: CommitIndex,
    },
}

/// What the node has synced, for the handle, metrics and progress bars.
#[derive(Clone, Debug, Default, PartialEq, Eq, actix::MessageResponse)]
pub struct SyncStatus {
    /// The applied watermark.
    pub synced: CommitIndex,
    /// The highest commit the node serves, and advertises to peers: the
    /// highest whose certificate it holds. Below `synced` while local
    /// commits wait for their certificates.
    pub advertised: CommitIndex,
    /// The highest commit known among peers of our chain.
    pub highest_known: CommitIndex,
    /// Commits applied since start (synced and local).
    pub commits_applied: u64,
    /// Blocks applied since start.
    pub blocks_applied: u64,
    /// Bytes of verified blocks fetched.
    pub bytes_fetched: u64,
    /// Workers restarted after a failure or panic.
    pub restarts: u64,
    /// Answers refused because a peer sent invalid data or made a false
    /// claim.
    pub invalid_responses: u64,
    /// Fetches answered first by the second peer asked (a hedge, sent when
    /// the first was late), counted once that answer passed the checks
    /// that tell a true answer from junk: each ranked its first peer lower.
    pub hedges_won: u64,
    /// Hedges still unanswered, when the first peer's answer came (and
    /// passed its checks), as long after they were sent as makes a peer
    /// late: each ranked its peer lower, as a late first peer is ranked.
    pub hedges_late: u64,
    /// Hedges given up, late themselves, to hedges waiting for room in
    /// `max_hedged_bytes`: each fetch asked another peer, and the peer
    /// given up on ranks lower once the fetch's answer passes its checks,
    /// as a first peer beaten by a hedge does.
    pub hedges_given_way: u64,
    /// Hedges that, unanswered as long as makes a peer late, left their
    /// peer for one not yet asked for the fetch, keeping their share: the
    /// peer left ranks lower once the fetch's answer passes its checks.
    pub hedges_moved: u64,
    /// Hedges that went on alone once their fetch's first peer refused,
    /// reset or denied it while they were out (not a timeout, nor a lie,
    /// nor a block denial once the race's denier judged aside is taken):
    /// the fetch became theirs until they were late, at most until the
    /// first call's own deadline, their answer kept rather than dropped
    /// and asked for again if it came by then. Counted as they go alone,
    /// whatever comes of them.
    pub hedges_alone: u64,
    /// Hedges whose answer held only a part of what was asked (a commit
    /// answer may end early) while their fetch's first call was still out
    /// and had not had the time its own peer needs: the part was held
    /// until the first call answered (its answer then the fetch's, the
    /// part dropped), failed, or had that time (the part then the fetch's
    /// answer, and the first peer ranked lower once it passes its checks
    /// if that time was its own answer time: [`crate::state_sync::PartWait`]).
    /// Counted as they are held, whatever comes of them.
    pub hedge_parts_held: u64,
    /// Hedges sent since start, one per share of `max_hedged_bytes`
    /// taken: a hedge that asks another peer with the share it holds
    /// (after its peer failed, or moving on) is not counted again; one
    /// that gave way, and takes a share afresh, is.
    pub hedges_sent: u64,
    /// The most hedges in flight at once since start.
    pub most_hedges_at_once: usize,
    /// The most bytes hedges in flight reserved at once since start (at
    /// most `max_hedged_bytes`, or one hedge larger than that alone).
    pub most_hedged_bytes: u64,
    /// Chunks of blocks split in halves because their blocks were more
    /// bytes than one fetch may bring (each also counts as a restart).
    pub chunks_split: u64,
    /// The highest commit a commit fetch has asked for.
    pub requested: CommitIndex,
    /// The last commit the registered executor has taken, if one is.
    pub executed: Option<CommitIndex>,
    /// Whether sync waits for the executor (it is `max_lead_over_execution`
    /// commits ahead of it).
    pub paused_for_executor: bool,
    /// Batches (synced or local) the store failed to write.
    pub store_write_failures: u64,
    /// The lowest commit the store holds (pruning raises it).
    pub lowest_available: CommitIndex,
    /// Commits pruned since start.
    pub commits_pruned: u64,
    /// Set while the next commit to sync is held by no connected peer
    /// (every peer that claims commits past it pruned it, or has not
    /// stored it): that commit. Sync asks again every
    /// `wait_interval_when_no_peer_ms`, not in a loop.
    pub unavailable: Option<CommitIndex>,
}

impl SyncStatus {
    /// Takes the core's view of where sync stands.
    pub(super) fn follow(&mut self, core: &super::core::StateSyncCore) {
        self.synced = core.synced().index;
        self.highest_known = core.highest_known();
        self.requested = core.requested();
        self.paused_for_executor = core.paused_for_executor();
        self.unavailable = core.unavailable();
    }
}

/// Asks for [`SyncStatus`].
#[derive(Message)]
#[rtype(result = "SyncStatus")]
pub struct GetSyncStatus;

/// Asks for the core's plan, as text (`StateSyncCore::plan`).
#[derive(Message)]
#[rtype(result = "String")]
pub struct GetSyncPlan;

/// A caller's PushCommit, from the GrpcAdapter: the height it claims may
/// bring the next height query forward ([`Input::Pushed`]).
#[derive(Clone, Debug, Message)]
#[rtype(result = "()")]
pub struct HeightPushed {
    /// The height claimed.
    pub index: CommitIndex,
}

/// A commit of local consensus: stored, broadcast and pushed like a synced
/// one. Answered once the write is done, and applied even if StateSync
/// restarts meanwhile.
#[derive(Message)]
#[rtype(result = "Result<(), ApplyError>")]
pub struct ApplyLocal(pub SyncedBatch);

/// The certificate of a stored local commit
/// ([`P2pHandle::send_certificate`](crate::P2pHandle::send_certificate)):
/// stored once its blocks hold a quorum of votes for the commit, then
/// advertised and pushed, since the node can serve batches ending there.
/// Answered once advertised; written and advertised even if the sender
/// goes away meanwhile.
#[derive(Message)]
#[rtype(result = "Result<(), ApplyError>")]
pub struct StoreCertificate {
    /// The commit certified.
    pub index: CommitIndex,
    /// Its certifier blocks.
    pub blocks: Vec<VerifiedBlock>,
}

/// The tick, with PeerHeights' answer.
#[derive(Message)]
#[rtype(result = "()")]
pub(super) struct TickMsg(pub(super) Option<CommitIndex>);

/// A commit fetch ended.
#[derive(Message)]
#[rtype(result = "()")]
pub(super) struct CommitsDone {
    pub(super) task: TaskId,
    pub(super) peer: Option<PeerId>,
    pub(super) result: Result<BatchData, Failure>,
}

/// A commit fetch ahead ended.
#[derive(Message)]
#[rtype(result = "()")]
pub(super) struct AheadDone {
    pub(super) task: TaskId,
    pub(super) peer: Option<PeerId>,
    pub(super) result: Result<super::worker::CommitAnswer, Failure>,
}

/// A block fetch ended.
#[derive(Message)]
#[rtype(result = "()")]
pub(super) struct BlocksDone {
    pub(super) task: TaskId,
    pub(super) batch: CommitIndex,
    pub(super) peer: Option<PeerId>,
    pub(super) result: Result<Vec<VerifiedBlock>, Failure>,
}

/// A peer denied blocks of a batch ending at `last` in a hedge, and still
/// claimed their commits once asked afresh ([`Input::WithheldInHedge`]).
#[derive(Message)]
#[rtype(result = "()")]
pub(super) struct DeniedInHedge {
    pub(super) last: CommitRef,
    pub(super) peer: PeerId,
}

/// Who waits for a write.
pub(super) enum Origin {
    /// Sync's batch starting at this commit.
    Synced(CommitIndex),
    /// A local commit, whose sender waits for the answer, and its place
    /// among the local writes in flight (given back with the answer).
    Local {
        /// Where the answer goes.
        reply: tokio::sync::oneshot::Sender<Result<(), ApplyError>>,
        /// Held until the write is answered.
        _place: tokio::sync::OwnedSemaphorePermit,
    },
}

/// A certificate's write ended: the commit it certified, if any.
#[derive(Message)]
#[rtype(result = "()")]
pub(super) struct CertificateStored {
    pub(super) result: Result<Option<CommitRef>, ApplyError>,
    pub(super) reply: tokio::sync::oneshot::Sender<Result<(), ApplyError>>,
}

/// A write ended, or (not `written`) a batch to apply was found gone
/// before any write started.
#[derive(Message)]
#[rtype(result = "()")]
pub(super) struct ApplyDone {
    pub(super) origin: Origin,
    pub(super) result: Result<Applied, ApplyError>,
    /// Whether it ends a write the actor started: only such an end lets
    /// the next write start.
    pub(super) written: bool,
}

/// The registered executor's progress moved (see `Execution`).
#[derive(Message)]
#[rtype(result = "()")]
pub(super) struct ExecutorMoved(pub(super) Option<CommitIndex>);

/// A prune run ended.
#[derive(Message)]
#[rtype(result = "()")]
pub(super) struct PruneDone(pub(super) Result<super::prune::Pruned, soma_store::Error>);
