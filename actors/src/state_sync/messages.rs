use serde::{Deserialize, Serialize};
use soma_types::{CommitIndex, CommitRef, Epoch, PeerId};

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
}

/// Why a task failed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Failure {
    /// No connected peer can serve the range.
    NoPeer,
    /// The peer did not answer in time.
    Timeout,
    /// The request failed (transport or status).
    Error(String),
    /// The peer sent data that failed verification.
    Invalid(String),
    /// The batch is of an epoch whose committee is not installed yet.
    UnknownEpoch(Epoch),
    /// The task panicked (caught by the supervisor).
    Panicked,
}

/// Inputs of the StateSync core.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Input {
    /// The tick, with the highest commit known among peers of our chain.
    Tick {
        /// From PeerHeights.
        highest_known: Option<CommitIndex>,
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
    Applied {
        /// First commit of the batch.
        start: CommitIndex,
        /// The new watermark.
        last: CommitRef,
        /// Set when the batch ended its epoch: the epoch now current.
        next_epoch: Option<Epoch>,
    },
    /// Applying the batch failed; everything after the watermark is
    /// fetched again.
    ApplyFailed {
        /// First commit of the batch.
        start: CommitIndex,
        /// Why.
        reason: String,
    },
    /// Local consensus applied commits up to `last` (through the same path).
    LocalApplied {
        /// The new watermark.
        last: CommitRef,
        /// Set when the commit ended its epoch.
        next_epoch: Option<Epoch>,
    },
}

/// Outputs of the StateSync core.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Output {
    /// Fetch and verify commits `start..=end`, which must follow `after`.
    FetchCommits {
        /// The task.
        task: TaskId,
        /// First commit.
        start: CommitIndex,
        /// Last commit wanted.
        end: CommitIndex,
        /// The commit they must link to.
        after: CommitRef,
        /// Peers not to ask (they failed this range).
        avoid: Vec<PeerId>,
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
        /// Peers not to ask.
        avoid: Vec<PeerId>,
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
    /// Drop the shell's data of batches after the watermark.
    Reset,
    /// Drop the shell's data of the batch starting at `start`: local
    /// commits covered all of it.
    Discard {
        /// First commit of the batch.
        start: CommitIndex,
    },
}
