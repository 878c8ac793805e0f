//! Both stores pass the conformance suite.

use std::ops::RangeInclusive;
use std::sync::atomic::{AtomicUsize, Ordering};

use soma_store::{ConsensusStore, MemStore, RedbStore, Result, SyncedBatch, conformance};
use soma_types::{
    BlockRef, CommitIndex, CommitRef, Committee, Epoch, TrustedCommit, VerifiedBlock,
};
use tempfile::TempDir;

#[test]
fn mem_store_conforms() {
    conformance::run_all(MemStore::new);
}

#[test]
fn redb_store_conforms() {
    let dir = TempDir::new().unwrap();
    // Each check gets a fresh database file in the same directory.
    let next = AtomicUsize::new(0);
    conformance::run_all(|genesis| {
        let n = next.fetch_add(1, Ordering::Relaxed);
        RedbStore::open(dir.path().join(format!("store-{n}.redb")), genesis).unwrap()
    });
}

/// A store that leaves `block_bytes` to the trait's default, as a store
/// that keeps no encodings apart would: everything else is a `MemStore`'s.
struct DefaultBlockBytes(MemStore);

impl ConsensusStore for DefaultBlockBytes {
    fn version(&self) -> u64 {
        self.0.version()
    }
    fn highest_synced_commit(&self) -> Result<CommitRef> {
        self.0.highest_synced_commit()
    }
    fn lowest_available_commit(&self) -> Result<CommitIndex> {
        self.0.lowest_available_commit()
    }
    fn commit(&self, index: CommitIndex) -> Result<Option<TrustedCommit>> {
        self.0.commit(index)
    }
    fn commits_in_range(
        &self,
        range: RangeInclusive<CommitIndex>,
        max_bytes: usize,
    ) -> Result<Vec<TrustedCommit>> {
        self.0.commits_in_range(range, max_bytes)
    }
    fn block(&self, block: &BlockRef) -> Result<Option<VerifiedBlock>> {
        self.0.block(block)
    }
    fn blocks(&self, refs: &[BlockRef]) -> Result<Vec<Option<VerifiedBlock>>> {
        self.0.blocks(refs)
    }
    fn certificate(&self, index: CommitIndex) -> Result<Option<Vec<VerifiedBlock>>> {
        self.0.certificate(index)
    }
    fn highest_certified_in(
        &self,
        range: RangeInclusive<CommitIndex>,
    ) -> Result<Option<CommitIndex>> {
        self.0.highest_certified_in(range)
    }
    fn committee(&self, epoch: Epoch) -> Result<Option<Committee>> {
        self.0.committee(epoch)
    }
    fn last_commit_of_epoch(&self, epoch: Epoch) -> Result<Option<CommitIndex>> {
        self.0.last_commit_of_epoch(epoch)
    }
    fn write_synced_batch(&self, batch: SyncedBatch) -> Result<()> {
        self.0.write_synced_batch(batch)
    }
    fn insert_certificate(&self, index: CommitIndex, blocks: Vec<VerifiedBlock>) -> Result<()> {
        self.0.insert_certificate(index, blocks)
    }
    fn prune_below(&self, index: CommitIndex) -> Result<()> {
        self.0.prune_below(index)
    }
}

#[test]
fn the_default_block_bytes_conforms() {
    conformance::run_all(|genesis| DefaultBlockBytes(MemStore::new(genesis)));
}
