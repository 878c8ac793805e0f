//! Reading batches back: what a sync worker asks when no peer holds its
//! range. Nothing read is trusted; the worker verifies it as a peer's
//! answer.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use soma_types::{BlockRef, CommitIndex, Digest};

use super::{Archive, ArchiveError, ArchiveStats, ArchivedBatch};

/// Reads archived batches for sync, keeping the last `cached_batches`
/// read: a batch's commits and then its blocks, chunk by chunk, come from
/// one object, and sync works on several batches at once.
#[derive(Debug)]
pub struct ArchiveReader {
    archive: Archive,
    batch_size: u64,
    recent: Mutex<VecDeque<Arc<ArchivedBatch>>>,
}

impl ArchiveReader {
    /// A reader of `archive` for a node whose batches are `batch_size`
    /// commits long (the archive's are found at the same boundaries).
    pub fn new(archive: Archive, batch_size: u64) -> Self {
        ArchiveReader {
            archive,
            batch_size: batch_size.max(1),
            recent: Mutex::new(VecDeque::new()),
        }
    }

    /// The archive's counters.
    pub fn stats(&self) -> &Arc<ArchiveStats> {
        self.archive.stats()
    }

    /// Counts data of the archive that verification refused, and drops the
    /// batch kept: the next read asks the archive again, which may have
    /// been repaired meanwhile.
    pub(crate) fn refused(&self) {
        ArchiveStats::count(&self.archive.stats().refused);
        self.recent().clear();
    }

    /// The archived batch that holds commit `index`: the one starting
    /// there, else the one starting at the batch boundary below it.
    async fn holding(
        &self,
        index: CommitIndex,
    ) -> Result<Option<Arc<ArchivedBatch>>, ArchiveError> {
        let holds = |b: &ArchivedBatch| b.first <= index && index <= b.last;
        let cached = self.recent().iter().find(|b| holds(b)).cloned();
        if let Some(batch) = cached {
            return Ok(Some(batch));
        }
        let boundary = (index.saturating_sub(1) / self.batch_size) * self.batch_size + 1;
        let mut firsts = vec![index];
        if boundary != index {
            firsts.push(boundary);
        }
        for first in firsts {
            if let Some(batch) = self.archive.batch(first).await?.filter(holds) {
                let batch = Arc::new(batch);
                let mut recent = self.recent();
                recent.push_back(batch.clone());
                while recent.len() > self.archive.config().cached_batches {
                    recent.pop_front();
                }
                return Ok(Some(batch));
            }
        }
        Ok(None)
    }

    fn recent(&self) -> std::sync::MutexGuard<'_, VecDeque<Arc<ArchivedBatch>>> {
        self.recent.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// [`Self::holding`], counted: a miss or an error is `None`.
    async fn find(&self, index: CommitIndex) -> Option<Arc<ArchivedBatch>> {
        let stats = self.archive.stats();
        match self.holding(index).await {
            Ok(Some(batch)) => Some(batch),
            Ok(None) => {
                ArchiveStats::count(&stats.read_misses);
                None
            }
            Err(e) => {
                tracing::warn!(index, %e, "archive read failed");
                ArchiveStats::count(&stats.read_errors);
                None
            }
        }
    }

    /// Commits from `start` to the end of the archived batch holding it,
    /// with that batch's certificate: the shape of a peer's FetchCommits
    /// answer. `None` if the archive does not hold `start`, if its batch
    /// ends past `end`, or if the answer would be larger than `max_bytes`.
    pub async fn commits(
        &self,
        start: CommitIndex,
        end: CommitIndex,
        max_bytes: u64,
    ) -> Option<(Vec<Bytes>, Vec<Bytes>)> {
        let batch = self.find(start).await?;
        let stats = self.archive.stats();
        let skip = usize::try_from(start - batch.first).unwrap_or(usize::MAX);
        let commits = batch.commits.get(skip..).unwrap_or_default().to_vec();
        let bytes: u64 = commits
            .iter()
            .chain(&batch.certifiers)
            .map(|b| b.len() as u64)
            .sum();
        if batch.last > end || bytes > max_bytes {
            tracing::debug!(
                start,
                end,
                last = batch.last,
                bytes,
                max_bytes,
                "the archived batch does not fit the fetch"
            );
            ArchiveStats::count(&stats.read_misses);
            return None;
        }
        ArchiveStats::count(&stats.batches_read);
        Some((commits, batch.certifiers.clone()))
    }

    /// Of the blocks archived with the batch holding commit `batch`, those
    /// `refs` names (matched by the digest of their bytes, so a wrong
    /// block is never picked). `None` if the archive holds no such batch.
    pub async fn blocks(&self, batch: CommitIndex, refs: &[BlockRef]) -> Option<Vec<Bytes>> {
        let archived = self.find(batch).await?;
        let wanted: HashSet<Digest> = refs.iter().map(|r| r.digest).collect();
        Some(
            archived
                .blocks
                .iter()
                .filter(|b| wanted.contains(&Digest::of(b)))
                .cloned()
                .collect(),
        )
    }
}
