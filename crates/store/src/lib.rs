//! Where a node keeps the chain: commits, blocks, certificates, committees
//! and the sync watermark.
//!
//! [`ConsensusStore`] is what state sync and the gRPC server need from
//! storage. Two implementations pass the same conformance suite
//! (`conformance`, with the `testing` feature): [`MemStore`] for tests and light nodes, and
//! [`RedbStore`], persistent and crash-safe, the default for a running node.
//!
//! The store's one invariant: the watermark ([`ConsensusStore::highest_synced_commit`])
//! never points past what is stored. Every commit at or below it (down to
//! [`ConsensusStore::lowest_available_commit`]) is stored with all its
//! blocks, and every write that moves it is a single atomic transaction.
#![warn(missing_docs, unreachable_pub)]

mod check;
#[cfg(feature = "testing")]
pub mod conformance;
mod error;
mod mem;
mod redb_store;

use std::ops::RangeInclusive;

use bytes::Bytes;
use soma_types::{
    BlockRef, CommitIndex, CommitRef, Committee, Epoch, TrustedCommit, VerifiedBlock,
};

pub use error::Error;
pub use mem::MemStore;
pub use redb_store::RedbStore;

/// Result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The lowest available commit of a store never pruned: commit 0 is the
/// genesis commit, derived from the genesis committee and never stored.
const FIRST_COMMIT: CommitIndex = 1;

/// A verified run of commits, written in one atomic step.
#[derive(Clone, Debug)]
pub struct SyncedBatch {
    /// The commits, in index order; the first must follow the watermark.
    pub commits: Vec<TrustedCommit>,
    /// Every block the commits name (any order).
    pub blocks: Vec<VerifiedBlock>,
    /// Blocks certifying the last commit: stored so this node can serve the
    /// batch to others. Empty when the batch has no certificate yet (a local
    /// commit whose votes are still to come).
    pub certificate: Vec<VerifiedBlock>,
    /// Set when the last commit ends its epoch: the committee of the next
    /// epoch, installed in the same write.
    pub next_committee: Option<Committee>,
}

/// Storage for the chain as state sync and the gRPC server see it.
///
/// Implementations are shared between threads (`Send + Sync`) and each
/// method is one consistent read or one atomic write.
pub trait ConsensusStore: Send + Sync + 'static {
    /// A number raised by every write (after it is visible to reads), never
    /// lowered while the store is open. An answer computed from reads begun
    /// after observing version `v` is still what the same reads would give
    /// as long as the version is `v`: caches of answers key on it. Starts
    /// at 0 when the store is opened.
    fn version(&self) -> u64;

    /// The highest commit stored with all its blocks: the sync watermark.
    /// On a fresh store, the genesis commit (index 0).
    fn highest_synced_commit(&self) -> Result<CommitRef>;

    /// The lowest commit this store can serve: 1 on a store never pruned,
    /// otherwise the index the last [`ConsensusStore::prune_below`] pruned
    /// to (clamped to the watermark).
    fn lowest_available_commit(&self) -> Result<CommitIndex>;

    /// The commit at `index`, if stored. The genesis commit (index 0) is
    /// derived from the genesis committee and never stored.
    fn commit(&self, index: CommitIndex) -> Result<Option<TrustedCommit>>;

    /// Stored commits in `range`, in order, stopping before the total
    /// encoded size would exceed `max_bytes` (the first commit is always
    /// returned if stored, so a caller always makes progress). The range is
    /// clamped to the stored commits; an empty or reversed range gives an
    /// empty vector.
    fn commits_in_range(
        &self,
        range: RangeInclusive<CommitIndex>,
        max_bytes: usize,
    ) -> Result<Vec<TrustedCommit>>;

    /// The block with reference `block`, if stored.
    fn block(&self, block: &BlockRef) -> Result<Option<VerifiedBlock>>;

    /// The blocks with the given references, in the same order; `None` for
    /// each one not stored.
    fn blocks(&self, refs: &[BlockRef]) -> Result<Vec<Option<VerifiedBlock>>>;

    /// The encodings of the blocks of `refs`, in order, as many as fit in
    /// `max_bytes` (the first always, whatever its size, so a caller makes
    /// progress), ending after the first block not stored, given as `None`:
    /// exactly the `serialized()` bytes of what [`blocks`](Self::blocks)
    /// returns for the same references, cut there. What a FetchBlocks answer
    /// needs: one call for a whole chunk of an answer, never holding more
    /// than the chunk. A store that keeps blocks encoded returns them
    /// without decoding them (it still checks that the bytes are the block
    /// asked for), and neither copies nor checks a block past the budget;
    /// both stores here read a whole call under one lock or transaction.
    /// The default reads one block at a time with [`block`](Self::block),
    /// decoding at most one past the budget.
    fn block_bytes(&self, refs: &[BlockRef], max_bytes: usize) -> Result<Vec<Option<Bytes>>> {
        check::block_bytes_within(
            refs,
            max_bytes,
            |r| Ok(self.block(r)?.map(|b| b.serialized().clone())),
            Bytes::len,
            |_, bytes| Ok(bytes),
        )
    }

    /// The certifier blocks stored for the commit at `index`, if any.
    fn certificate(&self, index: CommitIndex) -> Result<Option<Vec<VerifiedBlock>>>;

    /// The highest commit in `range` for which a certificate is stored.
    fn highest_certified_in(
        &self,
        range: RangeInclusive<CommitIndex>,
    ) -> Result<Option<CommitIndex>>;

    /// The committee of `epoch`, if known.
    fn committee(&self, epoch: Epoch) -> Result<Option<Committee>>;

    /// The index of the last commit of `epoch`, once that epoch has ended.
    fn last_commit_of_epoch(&self, epoch: Epoch) -> Result<Option<CommitIndex>>;

    /// Writes a verified batch and moves the watermark to its last commit,
    /// atomically. Refuses (with [`Error::NotContiguous`]) a batch whose
    /// first commit does not follow the watermark by index and digest, or
    /// whose commits do not link to each other, and (with
    /// [`Error::MissingBlock`]) one that lacks a block its commits name,
    /// unless that block is already stored. Epochs only move forward:
    /// every commit must be of the current epoch (the watermark commit's,
    /// or the next one once that epoch's end is recorded), else
    /// [`Error::EpochEnded`] for an ended epoch and [`Error::WrongEpoch`]
    /// for any other; a `next_committee` must be of the epoch after the
    /// current one ([`Error::WrongNextEpoch`]) and not stored yet
    /// ([`Error::CommitteeExists`], even if identical). A refused batch
    /// writes nothing; a batch without commits is accepted and writes
    /// nothing.
    ///
    /// A non-empty `certificate` is stored as the last commit's. A
    /// `next_committee` is stored under its epoch, and the last commit is
    /// recorded as the last of its epoch.
    fn write_synced_batch(&self, batch: SyncedBatch) -> Result<()>;

    /// Stores a certificate for an already stored commit (a local commit's
    /// votes arrive after it), replacing any earlier one, and stores its
    /// blocks. Refuses (with [`Error::UnknownCommit`]) a commit not stored;
    /// an empty `blocks` stores nothing.
    fn insert_certificate(&self, index: CommitIndex, blocks: Vec<VerifiedBlock>) -> Result<()>;

    /// Deletes commits below `index`, their certificates, and the blocks
    /// they name that no retained commit or certificate names, and raises
    /// the lowest available commit to `index`.
    ///
    /// Never prunes the watermark commit: an `index` above the watermark
    /// prunes up to it. An `index` at or below the lowest available commit
    /// changes nothing.
    fn prune_below(&self, index: CommitIndex) -> Result<()>;
}
