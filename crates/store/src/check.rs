//! The checks both stores run before writing a batch, so that they refuse
//! exactly the same batches.

use std::collections::HashSet;

use bytes::Bytes;
use soma_types::{BlockRef, CommitIndex, CommitRef, Epoch, TrustedCommit};

use crate::{Error, Result, SyncedBatch};

/// Checks that `commits` continue the chain at `watermark`: each commit's
/// index is one more than the previous one's and its `previous_digest` is
/// the previous one's digest, starting from the watermark.
pub(crate) fn check_links(watermark: CommitRef, commits: &[TrustedCommit]) -> Result<()> {
    let mut previous = watermark;
    for commit in commits {
        let c = commit.commit();
        let follows =
            previous.index.checked_add(1) == Some(c.index) && c.previous_digest == previous.digest;
        if !follows {
            return Err(Error::NotContiguous {
                watermark,
                got: commit.reference(),
            });
        }
        previous = commit.reference();
    }
    Ok(())
}

/// Checks that every block named by the batch's commits is either in
/// `batch.blocks` or already stored (`is_stored`), so that after the write
/// every commit at or below the watermark has all its blocks.
pub(crate) fn check_blocks(
    batch: &SyncedBatch,
    mut is_stored: impl FnMut(&BlockRef) -> Result<bool>,
) -> Result<()> {
    let provided: HashSet<BlockRef> = batch.blocks.iter().map(|b| b.reference()).collect();
    for commit in &batch.commits {
        for block in &commit.commit().blocks {
            if !provided.contains(block) && !is_stored(block)? {
                return Err(Error::MissingBlock(*block));
            }
        }
    }
    Ok(())
}

/// What [`check_epochs`] reads of a store, inside the write's own lock or
/// transaction.
pub(crate) trait StoredEpochs {
    /// The epoch of the genesis committee: the lowest epoch with a stored
    /// committee, since later ones are only stored for the epoch after the
    /// current one.
    fn genesis_epoch(&self) -> Result<Epoch>;
    /// The epoch of the stored commit at `index`.
    fn commit_epoch(&self, index: CommitIndex) -> Result<Option<Epoch>>;
    /// The recorded last commit of `epoch`.
    fn epoch_end(&self, epoch: Epoch) -> Result<Option<CommitIndex>>;
    /// Whether a committee of `epoch` is stored.
    fn has_committee(&self, epoch: Epoch) -> Result<bool>;
}

/// Checks `batch` against the stored epochs: every commit is of the
/// current epoch (the watermark commit's, or the next one once that epoch's
/// end is recorded, so the current epoch has no recorded end); a next
/// committee is of the epoch after the current one and none is stored for
/// it yet. So an ended epoch never gets another end and a committee is
/// never replaced.
pub(crate) fn check_epochs(
    watermark: CommitRef,
    batch: &SyncedBatch,
    stored: &impl StoredEpochs,
) -> Result<()> {
    let watermark_epoch = match watermark.index {
        // The genesis commit is derived, never stored.
        0 => stored.genesis_epoch()?,
        index => stored
            .commit_epoch(index)?
            .ok_or_else(|| Error::Corrupt(format!("watermark commit {index} is not stored")))?,
    };
    let current = match stored.epoch_end(watermark_epoch)? {
        None => watermark_epoch,
        Some(last) => watermark_epoch.checked_add(1).ok_or(Error::EpochEnded {
            epoch: watermark_epoch,
            last,
        })?,
    };
    if let Some(commit) = batch.commits.iter().find(|c| c.commit().epoch != current) {
        let got = commit.commit().epoch;
        return Err(match stored.epoch_end(got)? {
            Some(last) => Error::EpochEnded { epoch: got, last },
            None => Error::WrongEpoch {
                index: commit.index(),
                expected: current,
                got,
            },
        });
    }
    if let Some(next) = &batch.next_committee {
        let got = next.epoch();
        if stored.has_committee(got)? {
            return Err(Error::CommitteeExists(got));
        }
        if current.checked_add(1) != Some(got) {
            return Err(Error::WrongNextEpoch {
                expected: current.saturating_add(1),
                got,
            });
        }
    }
    Ok(())
}

/// A read bounded by bytes: items are taken in order while their total
/// stays within `max`, and the first is always taken, whatever its size,
/// so that a caller makes progress.
struct ByteBudget {
    max: usize,
    total: usize,
    taken: bool,
}

impl ByteBudget {
    fn new(max: usize) -> Self {
        ByteBudget {
            max,
            total: 0,
            taken: false,
        }
    }

    /// Takes an item of `len` bytes if it fits; false, and nothing taken,
    /// if it would take the total past the budget.
    fn take(&mut self, len: usize) -> bool {
        if self.taken && self.total.saturating_add(len) > self.max {
            return false;
        }
        self.total = self.total.saturating_add(len);
        self.taken = true;
        true
    }
}

/// Keeps the commits of `commits` (in index order) whose encodings fit in
/// `max_bytes`, always keeping the first so a caller makes progress.
pub(crate) fn take_within_budget(
    commits: impl IntoIterator<Item = Result<TrustedCommit>>,
    max_bytes: usize,
) -> Result<Vec<TrustedCommit>> {
    let mut budget = ByteBudget::new(max_bytes);
    let mut taken = Vec::new();
    for commit in commits {
        let commit = commit?;
        if !budget.take(commit.serialized().len()) {
            break;
        }
        taken.push(commit);
    }
    Ok(taken)
}

/// The rule of [`ConsensusStore::block_bytes`](crate::ConsensusStore::block_bytes)
/// for a store that finds a block's entry (`find`), knows its encoded
/// length from the entry (`len`) and only then takes its bytes (`bytes`):
/// a block past the budget is found, then dropped, its bytes never taken
/// (a copy and a check, for redb).
pub(crate) fn block_bytes_within<E>(
    refs: &[BlockRef],
    max_bytes: usize,
    mut find: impl FnMut(&BlockRef) -> Result<Option<E>>,
    len: impl Fn(&E) -> usize,
    mut bytes: impl FnMut(&BlockRef, E) -> Result<Bytes>,
) -> Result<Vec<Option<Bytes>>> {
    let mut budget = ByteBudget::new(max_bytes);
    let mut taken = Vec::new();
    for r in refs {
        let Some(entry) = find(r)? else {
            taken.push(None);
            break;
        };
        if !budget.take(len(&entry)) {
            break;
        }
        taken.push(Some(bytes(r, entry)?));
    }
    Ok(taken)
}
