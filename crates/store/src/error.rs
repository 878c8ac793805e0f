use soma_types::{BlockRef, CommitIndex, CommitRef, Epoch};

/// Errors of the store. Serializable, so a refused write travels in traces
/// as what it is.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Error {
    /// A batch does not continue the stored chain: a commit does not follow
    /// the watermark, or the commit before it in the batch, by index and
    /// digest.
    #[error("commit {got} does not continue the chain at watermark {watermark}")]
    NotContiguous {
        /// The stored watermark.
        watermark: CommitRef,
        /// The offending commit's reference.
        got: CommitRef,
    },
    /// A batch lacks a block that one of its commits names.
    #[error("batch lacks block {0}")]
    MissingBlock(BlockRef),
    /// A batch's commit is not of the epoch the store is in: the watermark
    /// commit's epoch, or the next one once that epoch's end is recorded.
    #[error("commit {index} is of epoch {got}, not of the current epoch {expected}")]
    WrongEpoch {
        /// The offending commit's index.
        index: CommitIndex,
        /// The epoch the store is in.
        expected: Epoch,
        /// The commit's epoch.
        got: Epoch,
    },
    /// A batch's commits are of an epoch whose last commit is already
    /// recorded: an epoch end is never moved.
    #[error("epoch {epoch} already ended at commit {last}")]
    EpochEnded {
        /// The ended epoch.
        epoch: Epoch,
        /// Its recorded last commit.
        last: CommitIndex,
    },
    /// A batch carries a committee for an epoch that already has one: a
    /// stored committee is never replaced, not even by an identical one.
    #[error("committee of epoch {0} is already stored")]
    CommitteeExists(Epoch),
    /// A batch ending an epoch carries a committee of another epoch than
    /// the next one.
    #[error("next committee is of epoch {got}, not {expected}")]
    WrongNextEpoch {
        /// The epoch after the one the batch ends.
        expected: Epoch,
        /// The committee's epoch.
        got: Epoch,
    },
    /// A certificate was offered for a commit the store does not hold.
    #[error("commit {0} is not stored")]
    UnknownCommit(CommitIndex),
    /// The store was created for another genesis committee.
    #[error("store belongs to another chain")]
    WrongChain,
    /// Stored bytes failed to decode: the database is corrupt.
    #[error("corrupt store: {0}")]
    Corrupt(String),
    /// The embedded database failed.
    #[error("database: {0}")]
    Database(String),
}
