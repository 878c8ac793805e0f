//! A store whose disk fills up on demand: writes of batches past a commit
//! fail (or panic, as a store asserting on a damaged file does), reads of
//! commits fail when asked to, other reads pass through.

use std::ops::RangeInclusive;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, PoisonError};

use soma_store::{ConsensusStore, Error, MemStore, Result, SyncedBatch};
use soma_types::{
    BlockRef, CommitIndex, CommitRef, Committee, Epoch, TrustedCommit, VerifiedBlock,
};

/// A [`MemStore`] that refuses batch writes holding a commit above a
/// chosen index with [`Error::Database`], as a full disk would, until
/// healed. Every other call passes through.
pub struct FailingStore {
    inner: MemStore,
    /// Writes of a commit above this fail (`u64::MAX`: none).
    fail_above: AtomicU64,
    failed: AtomicU64,
    /// The next write of a commit above this panics, once (`u64::MAX`:
    /// none).
    panic_above: AtomicU64,
    /// A block read first prunes below this, once (0: none)...
    prune_before_read: AtomicU64,
    /// ...once this many more block reads have passed.
    reads_before_prune: AtomicU64,
    /// The most blocks one read has asked for.
    most_blocks_read: AtomicU64,
    /// Reads of block encodings so far.
    block_bytes_reads: AtomicU64,
    /// Commits `commits_in_range` has returned so far.
    commits_read: AtomicU64,
    /// Whether reads of block encodings return nothing at all, against
    /// the trait's contract.
    no_block_bytes: AtomicBool,
    /// A batch write ending at this commit pauses once written (0: none).
    pause_after: AtomicU64,
    /// Reads of commits still to fail ([`FailingStore::fail_commit_reads`]).
    failing_reads: AtomicU64,
    /// Whether a write is paused, and what ends the pause.
    paused: (Mutex<bool>, Condvar),
}

impl FailingStore {
    /// A store over `inner` that fails nothing yet.
    pub fn new(inner: MemStore) -> Self {
        FailingStore {
            inner,
            fail_above: AtomicU64::new(u64::MAX),
            failed: AtomicU64::new(0),
            panic_above: AtomicU64::new(u64::MAX),
            prune_before_read: AtomicU64::new(0),
            reads_before_prune: AtomicU64::new(0),
            most_blocks_read: AtomicU64::new(0),
            block_bytes_reads: AtomicU64::new(0),
            commits_read: AtomicU64::new(0),
            no_block_bytes: AtomicBool::new(false),
            pause_after: AtomicU64::new(0),
            failing_reads: AtomicU64::new(0),
            paused: (Mutex::new(false), Condvar::new()),
        }
    }

    /// The write of a batch ending at commit `index` pauses once it is
    /// stored, before it returns, until [`FailingStore::resume`] (or a
    /// minute): whatever its writer does next waits, as if its thread
    /// were preempted there.
    pub fn pause_after_writing(&self, index: CommitIndex) {
        self.pause_after.store(index, Ordering::SeqCst);
    }

    /// Whether a write is paused now.
    pub fn paused(&self) -> bool {
        *self.paused.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Ends the pause of a paused write.
    pub fn resume(&self) {
        *self.paused.0.lock().unwrap_or_else(PoisonError::into_inner) = false;
        self.paused.1.notify_all();
    }

    /// The most blocks one read of blocks has asked for so far.
    pub fn most_blocks_read_at_once(&self) -> u64 {
        self.most_blocks_read.load(Ordering::SeqCst)
    }

    /// From now on, reads of block encodings return no entry at all, not
    /// even the first block's: a faulty store.
    pub fn return_no_block_bytes(&self) {
        self.no_block_bytes.store(true, Ordering::SeqCst);
    }

    /// Commits [`ConsensusStore::commits_in_range`] has returned so far.
    pub fn commits_read(&self) -> u64 {
        self.commits_read.load(Ordering::SeqCst)
    }

    /// Reads of block encodings ([`ConsensusStore::block_bytes`]) so far.
    pub fn block_bytes_reads(&self) -> u64 {
        self.block_bytes_reads.load(Ordering::SeqCst)
    }

    /// Once `after` more reads of blocks have passed, the next one first
    /// prunes the store below `index`, once: a prune run that lands
    /// between a reader's read of commits and its read of their blocks.
    pub fn prune_below_at_block_read(&self, index: CommitIndex, after: u64) {
        self.reads_before_prune.store(after, Ordering::SeqCst);
        self.prune_before_read.store(index, Ordering::SeqCst);
    }

    /// The next batch write holding a commit above `index` panics, once;
    /// the writes after it pass.
    pub fn panic_once_above(&self, index: CommitIndex) {
        self.panic_above.store(index, Ordering::SeqCst);
    }

    /// The next `reads` reads of a range of commits fail with
    /// [`Error::Database`], as a disk that fails a read now and then does;
    /// the reads after them pass.
    pub fn fail_commit_reads(&self, reads: u64) {
        self.failing_reads.store(reads, Ordering::SeqCst);
    }

    /// From now on, a batch write holding a commit above `index` fails.
    pub fn fail_writes_above(&self, index: CommitIndex) {
        self.fail_above.store(index, Ordering::SeqCst);
    }

    /// Writes succeed again.
    pub fn heal(&self) {
        self.fail_above.store(u64::MAX, Ordering::SeqCst);
    }

    /// Writes failed so far.
    pub fn failed_writes(&self) -> u64 {
        self.failed.load(Ordering::SeqCst)
    }

    /// The store underneath.
    pub fn inner(&self) -> &MemStore {
        &self.inner
    }
}

impl ConsensusStore for FailingStore {
    fn version(&self) -> u64 {
        self.inner.version()
    }
    fn highest_synced_commit(&self) -> Result<CommitRef> {
        self.inner.highest_synced_commit()
    }
    fn lowest_available_commit(&self) -> Result<CommitIndex> {
        self.inner.lowest_available_commit()
    }
    fn commit(&self, index: CommitIndex) -> Result<Option<TrustedCommit>> {
        self.inner.commit(index)
    }
    fn commits_in_range(
        &self,
        range: RangeInclusive<CommitIndex>,
        max_bytes: usize,
    ) -> Result<Vec<TrustedCommit>> {
        let failing = self.failing_reads.load(Ordering::SeqCst);
        if failing > 0 {
            self.failing_reads.store(failing - 1, Ordering::SeqCst);
            return Err(Error::Database("a read failed (a test's fault)".into()));
        }
        let commits = self.inner.commits_in_range(range, max_bytes)?;
        self.commits_read
            .fetch_add(commits.len() as u64, Ordering::SeqCst);
        Ok(commits)
    }
    fn block(&self, block: &BlockRef) -> Result<Option<VerifiedBlock>> {
        self.inner.block(block)
    }
    fn blocks(&self, refs: &[BlockRef]) -> Result<Vec<Option<VerifiedBlock>>> {
        self.most_blocks_read
            .fetch_max(refs.len() as u64, Ordering::SeqCst);
        let waiting = self.reads_before_prune.load(Ordering::SeqCst);
        if waiting > 0 {
            self.reads_before_prune.store(waiting - 1, Ordering::SeqCst);
        } else {
            let prune = self.prune_before_read.swap(0, Ordering::SeqCst);
            if prune > 0 {
                self.inner.prune_below(prune)?;
            }
        }
        self.inner.blocks(refs)
    }
    fn block_bytes(
        &self,
        refs: &[BlockRef],
        max_bytes: usize,
    ) -> Result<Vec<Option<bytes::Bytes>>> {
        self.block_bytes_reads.fetch_add(1, Ordering::SeqCst);
        if self.no_block_bytes.load(Ordering::SeqCst) {
            return Ok(Vec::new());
        }
        self.inner.block_bytes(refs, max_bytes)
    }
    fn certificate(&self, index: CommitIndex) -> Result<Option<Vec<VerifiedBlock>>> {
        self.inner.certificate(index)
    }
    fn highest_certified_in(
        &self,
        range: RangeInclusive<CommitIndex>,
    ) -> Result<Option<CommitIndex>> {
        self.inner.highest_certified_in(range)
    }
    fn committee(&self, epoch: Epoch) -> Result<Option<Committee>> {
        self.inner.committee(epoch)
    }
    fn last_commit_of_epoch(&self, epoch: Epoch) -> Result<Option<CommitIndex>> {
        self.inner.last_commit_of_epoch(epoch)
    }
    fn write_synced_batch(&self, batch: SyncedBatch) -> Result<()> {
        let last = batch.commits.last().map_or(0, TrustedCommit::index);
        if last > self.panic_above.load(Ordering::SeqCst) {
            self.panic_above.store(u64::MAX, Ordering::SeqCst);
            self.failed.fetch_add(1, Ordering::SeqCst);
            panic!("the store's file is damaged (a test's panic)");
        }
        if last > self.fail_above.load(Ordering::SeqCst) {
            self.failed.fetch_add(1, Ordering::SeqCst);
            return Err(Error::Database("no space left on device".into()));
        }
        self.inner.write_synced_batch(batch)?;
        if last > 0
            && self
                .pause_after
                .compare_exchange(last, 0, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
        {
            let (lock, resumed) = &self.paused;
            let mut paused = lock.lock().unwrap_or_else(PoisonError::into_inner);
            *paused = true;
            let pause = std::time::Duration::from_secs(60);
            let (mut paused, _) = resumed
                .wait_timeout_while(paused, pause, |p| *p)
                .unwrap_or_else(PoisonError::into_inner);
            *paused = false;
        }
        Ok(())
    }
    fn insert_certificate(&self, index: CommitIndex, blocks: Vec<VerifiedBlock>) -> Result<()> {
        self.inner.insert_certificate(index, blocks)
    }
    fn prune_below(&self, index: CommitIndex) -> Result<()> {
        self.inner.prune_below(index)
    }
}
