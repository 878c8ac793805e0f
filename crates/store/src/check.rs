//! The checks both stores run before writing a batch, so that they refuse
//! exactly the same batches.

use std::collections::HashSet;

use soma_types::{BlockRef, CommitRef, TrustedCommit};

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

/// Keeps the commits of `commits` (in index order) whose encodings fit in
/// `max_bytes`, always keeping the first so a caller makes progress.
pub(crate) fn take_within_budget(
    commits: impl IntoIterator<Item = Result<TrustedCommit>>,
    max_bytes: usize,
) -> Result<Vec<TrustedCommit>> {
    let mut taken = Vec::new();
    let mut total = 0usize;
    for commit in commits {
        let commit = commit?;
        let len = commit.serialized().len();
        if !taken.is_empty() && total.saturating_add(len) > max_bytes {
            break;
        }
        total = total.saturating_add(len);
        taken.push(commit);
    }
    Ok(taken)
}
