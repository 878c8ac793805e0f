use soma_types::{BlockRef, CommitIndex, CommitRef};

/// Errors of the store.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
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
