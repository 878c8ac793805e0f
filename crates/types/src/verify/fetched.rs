use std::collections::BTreeSet;

use crate::{
    BlockRef, Committee, Digest, Error, FastMap, Limits, Result, TrustedCommit, UnverifiedBlock,
    VerifiedBlock,
    verify::{SignatureBatch, check_block},
};

/// The blocks a set of verified commits names, and which have arrived.
///
/// Fetched blocks arrive in chunks. [`ExpectedBlocks::accept_bytes`] judges
/// each block by the digest of the bytes received, before anything is
/// decoded or any signature checked, so a stream can be cut at the first
/// block nobody asked for; [`ExpectedBlocks::accept`] does the same for a
/// decoded block and also compares its whole reference.
/// [`ExpectedBlocks::finish`] checks that nothing is missing. A block that
/// passes is exactly the block the quorum certified.
#[derive(Debug, Default)]
pub struct ExpectedBlocks {
    pending: BTreeSet<BlockRef>,
    by_digest: FastMap<Digest, BlockRef>,
}

impl ExpectedBlocks {
    /// The blocks named by `commits`.
    pub fn new(commits: &[TrustedCommit]) -> Self {
        Self::from_refs(
            commits
                .iter()
                .flat_map(|c| c.commit().blocks.iter().copied()),
        )
    }

    /// The blocks `refs` (a chunk of what verified commits name).
    pub fn from_refs(refs: impl IntoIterator<Item = BlockRef>) -> Self {
        let pending: BTreeSet<BlockRef> = refs.into_iter().collect();
        let by_digest = pending.iter().map(|r| (r.digest, *r)).collect();
        ExpectedBlocks { pending, by_digest }
    }

    /// Blocks not yet received, in reference order.
    pub fn missing(&self) -> impl Iterator<Item = &BlockRef> {
        self.pending.iter()
    }

    /// Number of blocks not yet received.
    pub fn missing_count(&self) -> usize {
        self.pending.len()
    }

    /// Number of blocks received so far.
    pub fn received(&self) -> usize {
        self.by_digest.len() - self.pending.len()
    }

    /// Marks the block encoded as `encoded` as received, judged by the
    /// digest of those bytes alone: it must be one asked for that has not
    /// arrived yet. Returns its reference.
    pub fn accept_bytes(&mut self, encoded: &[u8]) -> Result<BlockRef> {
        self.accept_digest(Digest::of(encoded))
    }

    /// [`ExpectedBlocks::accept_bytes`] for bytes already hashed:
    /// `digest` is the digest of the block's encoding.
    pub fn accept_digest(&mut self, digest: Digest) -> Result<BlockRef> {
        let r = *self
            .by_digest
            .get(&digest)
            .ok_or(Error::UnrequestedBlock(digest))?;
        if self.pending.remove(&r) {
            Ok(r)
        } else {
            Err(Error::DuplicateBlock(r))
        }
    }

    /// Marks `block` as received, if it is named and has not arrived yet.
    pub fn accept(&mut self, block: &UnverifiedBlock) -> Result<()> {
        let r = block.reference();
        match self.by_digest.get(&r.digest) {
            Some(named) if *named == r => {
                if self.pending.remove(&r) {
                    Ok(())
                } else {
                    Err(Error::DuplicateBlock(r))
                }
            }
            _ => Err(Error::UnexpectedBlock(r)),
        }
    }

    /// Succeeds when every named block has arrived.
    pub fn finish(&self) -> Result<()> {
        match self.pending.first() {
            None => Ok(()),
            Some(first) => Err(Error::MissingBlocks {
                count: self.pending.len(),
                first: *first,
            }),
        }
    }
}

/// Verifies one chunk of fetched blocks against the commits' expectations.
///
/// Every block must be named by a verified commit and arrive once (checked
/// through `expected`); structure is checked against `committee`; signatures
/// of blocks and transactions are batch-checked when `check_signatures` is
/// true. The digest match already proves a block is the one the quorum
/// certified, so turning signatures off is safe; it exists for speed.
pub fn verify_fetched_blocks(
    expected: &mut ExpectedBlocks,
    blocks: Vec<UnverifiedBlock>,
    committee: &Committee,
    limits: &Limits,
    check_signatures: bool,
) -> Result<Vec<VerifiedBlock>> {
    let mut batch = SignatureBatch::with_capacity(if check_signatures { blocks.len() } else { 0 });
    for block in &blocks {
        expected.accept(block)?;
        check_block(
            block,
            committee,
            limits,
            check_signatures.then_some(&mut batch),
        )?;
    }
    batch.verify()?;
    Ok(blocks
        .into_iter()
        .map(UnverifiedBlock::into_trusted)
        .collect())
}

/// Finds whether a verified batch ends its epoch.
///
/// A commit whose leader block carries `end_of_epoch` ends the epoch; only
/// the last commit of a batch may do so. Returns the next committee when the
/// batch ends the epoch, after checking it is for the next epoch.
/// `blocks` must hold every block the commits name.
pub fn epoch_change<S: std::hash::BuildHasher>(
    commits: &[TrustedCommit],
    blocks: &std::collections::HashMap<BlockRef, VerifiedBlock, S>,
    committee: &Committee,
) -> Result<Option<Committee>> {
    let mut next = None;
    for (i, commit) in commits.iter().enumerate() {
        let leader_ref = commit.commit().leader;
        let leader = blocks.get(&leader_ref).ok_or(Error::MissingBlocks {
            count: 1,
            first: leader_ref,
        })?;
        if let Some(end) = &leader.block().end_of_epoch {
            if i + 1 != commits.len() {
                return Err(Error::EpochEndInsideBatch(commit.index()));
            }
            let expected = committee.epoch() + 1;
            if end.next_committee.epoch() != expected {
                return Err(Error::InvalidNextCommittee {
                    got: end.next_committee.epoch(),
                    expected,
                });
            }
            next = Some(end.next_committee.clone());
        }
    }
    Ok(next)
}
