use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::{BlockRef, ChainId, Committee, Digest, Epoch, Error, Result, VerifiedBlock, codec};

/// Position of a commit in the chain. Index 0 is the genesis commit.
pub type CommitIndex = u64;

/// The identity of a commit: its index and the digest of its encoding.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
pub struct CommitRef {
    /// Index of the commit.
    pub index: CommitIndex,
    /// blake3 of the encoded commit.
    pub digest: Digest,
}

impl std::fmt::Display for CommitRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "c{}:{}", self.index, self.digest)
    }
}

/// A consensus decision: a leader block and the blocks of its causal history
/// that no earlier commit included, in commit order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Commit {
    /// Position in the chain.
    pub index: CommitIndex,
    /// Digest of the commit at `index - 1`.
    pub previous_digest: Digest,
    /// Commit time (the leader's timestamp), in milliseconds.
    pub timestamp_ms: u64,
    /// The leader block.
    pub leader: BlockRef,
    /// Blocks committed, in order; the leader is the last.
    pub blocks: Vec<BlockRef>,
    /// Epoch of the commit.
    pub epoch: Epoch,
}

/// A commit that passed verification (or that this node made), with its
/// encoding and reference. Cheap to clone.
#[derive(Clone, Debug)]
pub struct TrustedCommit(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    commit: Commit,
    serialized: Bytes,
    reference: CommitRef,
}

/// A commit decoded from bytes, not yet verified.
#[derive(Clone, Debug)]
pub struct UnverifiedCommit {
    pub(crate) commit: Commit,
    pub(crate) serialized: Bytes,
    pub(crate) reference: CommitRef,
}

impl UnverifiedCommit {
    /// Decodes a commit from untrusted bytes, refusing non-canonical
    /// encodings so each commit has one digest.
    pub fn decode(serialized: Bytes, limit: usize) -> Result<Self> {
        let commit: Commit = codec::decode(&serialized, limit)?;
        let mut end = 0;
        if !codec::matches_at(&commit, &serialized, &mut end) || end != serialized.len() {
            return Err(Error::Malformed("non-canonical commit encoding".into()));
        }
        Ok(Self::assemble(commit, serialized))
    }

    /// Wraps a commit held in memory, encoding it once.
    pub fn from_commit(commit: Commit) -> Self {
        let serialized = Bytes::from(codec::encode(&commit));
        Self::assemble(commit, serialized)
    }

    fn assemble(commit: Commit, serialized: Bytes) -> Self {
        let reference = CommitRef {
            index: commit.index,
            digest: Digest::of(&serialized),
        };
        UnverifiedCommit {
            commit,
            serialized,
            reference,
        }
    }

    /// The commit.
    pub fn commit(&self) -> &Commit {
        &self.commit
    }

    /// The commit's reference, computed from its bytes.
    pub fn reference(&self) -> CommitRef {
        self.reference
    }

    /// The encoded commit.
    pub fn serialized(&self) -> &Bytes {
        &self.serialized
    }

    /// Treats the commit as verified. Only for commits this node made or
    /// read back from its own store.
    pub fn into_trusted(self) -> TrustedCommit {
        TrustedCommit(Arc::new(Inner {
            commit: self.commit,
            serialized: self.serialized,
            reference: self.reference,
        }))
    }
}

impl TrustedCommit {
    /// Wraps a commit this node made.
    pub fn new_trusted(commit: Commit) -> Self {
        UnverifiedCommit::from_commit(commit).into_trusted()
    }

    /// Decodes a commit from this node's own store.
    pub fn from_trusted_bytes(serialized: Bytes) -> Result<Self> {
        let commit: Commit = codec::decode(&serialized, codec::MAX_DECODE_BYTES)?;
        Ok(UnverifiedCommit::assemble(commit, serialized).into_trusted())
    }

    /// The commit.
    pub fn commit(&self) -> &Commit {
        &self.0.commit
    }

    /// Index of the commit.
    pub fn index(&self) -> CommitIndex {
        self.0.commit.index
    }

    /// The commit's reference.
    pub fn reference(&self) -> CommitRef {
        self.0.reference
    }

    /// The encoded commit, as sent and stored.
    pub fn serialized(&self) -> &Bytes {
        &self.0.serialized
    }

    /// Back to an unverified commit, for tests that corrupt data.
    pub fn to_unverified(&self) -> UnverifiedCommit {
        UnverifiedCommit {
            commit: self.0.commit.clone(),
            serialized: self.0.serialized.clone(),
            reference: self.0.reference,
        }
    }
}

impl PartialEq for TrustedCommit {
    fn eq(&self, other: &Self) -> bool {
        self.reference() == other.reference()
    }
}

impl Eq for TrustedCommit {}

/// The genesis commit (index 0) of the chain started by `genesis`.
///
/// It is derived, never fetched: it links to the chain id and names no
/// blocks, and commit 1 links to its digest.
pub fn genesis_commit(genesis: &Committee) -> TrustedCommit {
    let leader = crate::genesis_block_refs(genesis)[0];
    TrustedCommit::new_trusted(Commit {
        index: 0,
        previous_digest: ChainId::from_genesis(genesis).0,
        timestamp_ms: 0,
        leader,
        blocks: Vec::new(),
        epoch: genesis.epoch(),
    })
}

/// What the node receives for each commit: the commit's identity and its
/// blocks in commit order. Synced and locally produced commits look alike.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommittedSubDag {
    /// The commit.
    pub commit_ref: CommitRef,
    /// Its leader block.
    pub leader: BlockRef,
    /// Its blocks in commit order, the leader last.
    pub blocks: Vec<VerifiedBlock>,
    /// Commit time, in milliseconds.
    pub timestamp_ms: u64,
    /// Epoch of the commit.
    pub epoch: Epoch,
}

impl CommittedSubDag {
    /// Assembles the sub-DAG of `commit` from its blocks, which must be given
    /// in any order but include every block the commit names.
    pub fn new(
        commit: &TrustedCommit,
        lookup: impl Fn(&BlockRef) -> Option<VerifiedBlock>,
    ) -> Result<Self> {
        let c = commit.commit();
        let blocks = c
            .blocks
            .iter()
            .map(|r| {
                lookup(r).ok_or(Error::MissingBlocks {
                    count: 1,
                    first: *r,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(CommittedSubDag {
            commit_ref: commit.reference(),
            leader: c.leader,
            blocks,
            timestamp_ms: c.timestamp_ms,
            epoch: c.epoch,
        })
    }
}

/// Where a sync batch starting at `start` ends: at the next multiple of
/// `batch_size`, or earlier at the last commit of the epoch (when known) or
/// at the tip. Every node stores a certificate for each such end, so any
/// node can serve any batch it holds.
pub fn batch_end(
    start: CommitIndex,
    batch_size: u64,
    epoch_last: Option<CommitIndex>,
    tip: CommitIndex,
) -> CommitIndex {
    let batch_size = batch_size.max(1);
    let aligned = (start.saturating_sub(1) / batch_size + 1).saturating_mul(batch_size);
    let mut end = aligned.min(tip);
    if let Some(last) = epoch_last
        && last >= start
    {
        end = end.min(last);
    }
    end.max(start)
}

#[cfg(test)]
mod tests {
    use super::batch_end;

    #[test]
    fn batches_end_on_multiples_of_the_batch_size() {
        assert_eq!(batch_end(1, 100, None, 1_000), 100);
        assert_eq!(batch_end(101, 100, None, 1_000), 200);
        assert_eq!(batch_end(150, 100, None, 1_000), 200);
        assert_eq!(batch_end(200, 100, None, 1_000), 200);
    }

    #[test]
    fn batches_end_early_at_epoch_end_or_tip() {
        assert_eq!(batch_end(101, 100, Some(149), 1_000), 149);
        assert_eq!(batch_end(150, 100, Some(149), 1_000), 200);
        assert_eq!(batch_end(101, 100, None, 130), 130);
        assert_eq!(batch_end(1, 0, None, 10), 1);
    }
}
