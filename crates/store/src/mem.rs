//! [`MemStore`]: the chain in memory, behind one lock.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::RangeInclusive;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use smallvec::SmallVec;
use soma_types::{
    BlockRef, CommitIndex, CommitRef, Committee, Epoch, FastMap, TrustedCommit, VerifiedBlock,
    genesis_commit,
};

use crate::check::{
    StoredEpochs, block_bytes_within, check_blocks, check_epochs, check_links, take_within_budget,
};
use crate::{ConsensusStore, Error, FIRST_COMMIT, Result, SyncedBatch};

/// A [`ConsensusStore`] held in memory, for tests and light nodes.
///
/// All state sits behind one `RwLock`, so each method is one consistent read
/// or one atomic write. Nothing survives a restart.
#[derive(Debug)]
pub struct MemStore {
    state: RwLock<State>,
    /// See [`ConsensusStore::version`]: raised by every write, under the
    /// write lock.
    version: AtomicU64,
}

/// What holds a block in the store; a block is deleted by pruning when its
/// last holder goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Holder {
    /// The commit at this index names the block.
    Commit(CommitIndex),
    /// The block certifies the commit at this index.
    Certificate(CommitIndex),
}

/// A block as kept: its encoding beside the block, so that serving it
/// reads the map's entry and no further, and what holds it (nearly always
/// one commit; a certifier block also the certificates it is in), so that
/// a block stored costs one entry of one map and, with two holders or
/// fewer, no allocation of its own.
#[derive(Debug)]
struct Kept {
    bytes: bytes::Bytes,
    block: VerifiedBlock,
    holders: SmallVec<[Holder; 2]>,
}

#[derive(Debug)]
struct State {
    watermark: CommitRef,
    lowest: CommitIndex,
    commits: BTreeMap<CommitIndex, TrustedCommit>,
    /// Every block stored, with which commits and certificates hold it.
    /// Its keys are references of verified blocks, so no peer chooses
    /// them freely ([`FastMap`]).
    blocks: FastMap<BlockRef, Kept>,
    /// Certifier block references per commit, in the order given.
    certificates: BTreeMap<CommitIndex, Vec<BlockRef>>,
    committees: BTreeMap<Epoch, Committee>,
    epoch_ends: BTreeMap<Epoch, CommitIndex>,
}

impl State {
    /// Stores `block` unless it is stored already (with its holders).
    fn store_block(&mut self, block: &VerifiedBlock) {
        self.blocks
            .entry(block.reference())
            .or_insert_with(|| Kept {
                bytes: block.serialized().clone(),
                block: block.clone(),
                holders: SmallVec::new(),
            });
    }

    /// Adds `holder` to the holders of `block`, a stored block (the
    /// callers store or check every block before holding it).
    fn hold(&mut self, block: BlockRef, holder: Holder) {
        debug_assert!(self.blocks.contains_key(&block), "{block} held unstored");
        if let Some(kept) = self.blocks.get_mut(&block)
            && !kept.holders.contains(&holder)
        {
            kept.holders.push(holder);
        }
    }

    /// Drops `holder`'s claim on `block`, deleting the block once nothing
    /// holds it.
    fn release(&mut self, block: BlockRef, holder: Holder) {
        if let Some(kept) = self.blocks.get_mut(&block) {
            kept.holders.retain(|h| *h != holder);
            if kept.holders.is_empty() {
                self.blocks.remove(&block);
            }
        }
    }

    fn remove_certificate(&mut self, index: CommitIndex) {
        if let Some(refs) = self.certificates.remove(&index) {
            for block in refs {
                self.release(block, Holder::Certificate(index));
            }
        }
    }

    fn put_certificate(&mut self, index: CommitIndex, blocks: &[VerifiedBlock]) {
        for block in blocks {
            self.store_block(block);
            self.hold(block.reference(), Holder::Certificate(index));
        }
        let refs = blocks.iter().map(VerifiedBlock::reference).collect();
        self.certificates.insert(index, refs);
    }
}

impl StoredEpochs for State {
    fn genesis_epoch(&self) -> Result<Epoch> {
        self.committees
            .keys()
            .next()
            .copied()
            .ok_or_else(|| Error::Corrupt("no committee stored".into()))
    }

    fn commit_epoch(&self, index: CommitIndex) -> Result<Option<Epoch>> {
        Ok(self.commits.get(&index).map(|c| c.commit().epoch))
    }

    fn epoch_end(&self, epoch: Epoch) -> Result<Option<CommitIndex>> {
        Ok(self.epoch_ends.get(&epoch).copied())
    }

    fn has_committee(&self, epoch: Epoch) -> Result<bool> {
        Ok(self.committees.contains_key(&epoch))
    }
}

impl MemStore {
    /// A fresh store for the chain started by `genesis`: the watermark is the
    /// genesis commit and the genesis committee is known.
    pub fn new(genesis: &Committee) -> MemStore {
        let state = State {
            watermark: genesis_commit(genesis).reference(),
            lowest: FIRST_COMMIT,
            commits: BTreeMap::new(),
            blocks: FastMap::default(),
            certificates: BTreeMap::new(),
            committees: BTreeMap::from([(genesis.epoch(), genesis.clone())]),
            epoch_ends: BTreeMap::new(),
        };
        MemStore {
            state: RwLock::new(state),
            version: AtomicU64::new(0),
        }
    }

    // A poisoned lock means a panic interrupted a write, which may have left
    // the state half-written: refuse to go on rather than serve it.
    fn read(&self) -> Result<RwLockReadGuard<'_, State>> {
        self.state
            .read()
            .map_err(|_| Error::Database("memory store lock poisoned".into()))
    }

    /// The state to change. Raises the version while holding the lock, so
    /// a read that saw the old version either ran before the change or sees
    /// a newer version afterwards.
    fn write(&self) -> Result<RwLockWriteGuard<'_, State>> {
        let state = self
            .state
            .write()
            .map_err(|_| Error::Database("memory store lock poisoned".into()))?;
        self.version.fetch_add(1, Ordering::AcqRel);
        Ok(state)
    }
}

impl ConsensusStore for MemStore {
    fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    fn highest_synced_commit(&self) -> Result<CommitRef> {
        Ok(self.read()?.watermark)
    }

    fn lowest_available_commit(&self) -> Result<CommitIndex> {
        Ok(self.read()?.lowest)
    }

    fn commit(&self, index: CommitIndex) -> Result<Option<TrustedCommit>> {
        Ok(self.read()?.commits.get(&index).cloned())
    }

    fn commits_in_range(
        &self,
        range: RangeInclusive<CommitIndex>,
        max_bytes: usize,
    ) -> Result<Vec<TrustedCommit>> {
        if range.is_empty() {
            return Ok(Vec::new());
        }
        let state = self.read()?;
        let commits = state.commits.range(range).map(|(_, c)| Ok(c.clone()));
        take_within_budget(commits, max_bytes)
    }

    fn block(&self, block: &BlockRef) -> Result<Option<VerifiedBlock>> {
        Ok(self.read()?.blocks.get(block).map(|k| k.block.clone()))
    }

    fn blocks(&self, refs: &[BlockRef]) -> Result<Vec<Option<VerifiedBlock>>> {
        let state = self.read()?;
        Ok(refs
            .iter()
            .map(|r| state.blocks.get(r).map(|k| k.block.clone()))
            .collect())
    }

    fn block_bytes(
        &self,
        refs: &[BlockRef],
        max_bytes: usize,
    ) -> Result<Vec<Option<bytes::Bytes>>> {
        let state = self.read()?;
        block_bytes_within(
            refs,
            max_bytes,
            |r| Ok(state.blocks.get(r)),
            |kept| kept.bytes.len(),
            |_, kept| Ok(kept.bytes.clone()),
        )
    }

    fn certificate(&self, index: CommitIndex) -> Result<Option<Vec<VerifiedBlock>>> {
        let state = self.read()?;
        let Some(refs) = state.certificates.get(&index) else {
            return Ok(None);
        };
        let blocks = refs
            .iter()
            .map(|r| {
                state.blocks.get(r).map(|k| k.block.clone()).ok_or_else(|| {
                    Error::Corrupt(format!("certificate of commit {index} lacks block {r}"))
                })
            })
            .collect::<Result<_>>()?;
        Ok(Some(blocks))
    }

    fn highest_certified_in(
        &self,
        range: RangeInclusive<CommitIndex>,
    ) -> Result<Option<CommitIndex>> {
        if range.is_empty() {
            return Ok(None);
        }
        let state = self.read()?;
        Ok(state.certificates.range(range).next_back().map(|(i, _)| *i))
    }

    fn committee(&self, epoch: Epoch) -> Result<Option<Committee>> {
        Ok(self.read()?.committees.get(&epoch).cloned())
    }

    fn last_commit_of_epoch(&self, epoch: Epoch) -> Result<Option<CommitIndex>> {
        Ok(self.read()?.epoch_ends.get(&epoch).copied())
    }

    fn write_synced_batch(&self, batch: SyncedBatch) -> Result<()> {
        let Some(last) = batch.commits.last().cloned() else {
            return Ok(());
        };
        let mut state = self.write()?;
        // Every check runs before the first change, so a refused batch
        // leaves the state untouched.
        check_links(state.watermark, &batch.commits)?;
        check_epochs(state.watermark, &batch, &*state)?;
        check_blocks(&batch, |r| Ok(state.blocks.contains_key(r)))?;

        for block in &batch.blocks {
            state.store_block(block);
        }
        for commit in &batch.commits {
            let index = commit.index();
            for block in &commit.commit().blocks {
                state.hold(*block, Holder::Commit(index));
            }
            state.commits.insert(index, commit.clone());
        }
        if !batch.certificate.is_empty() {
            state.put_certificate(last.index(), &batch.certificate);
        }
        if let Some(next) = batch.next_committee {
            state.epoch_ends.insert(last.commit().epoch, last.index());
            state.committees.insert(next.epoch(), next);
        }
        state.watermark = last.reference();
        tracing::debug!(watermark = %state.watermark, "memory store wrote batch");
        Ok(())
    }

    fn insert_certificate(&self, index: CommitIndex, blocks: Vec<VerifiedBlock>) -> Result<()> {
        let mut state = self.write()?;
        if !state.commits.contains_key(&index) {
            return Err(Error::UnknownCommit(index));
        }
        // An empty certificate certifies nothing, as in a batch.
        if blocks.is_empty() {
            return Ok(());
        }
        // Replacing a certificate: hold the new blocks before releasing the
        // old ones, so a block in both is never deleted in between.
        let old = state.certificates.remove(&index).unwrap_or_default();
        state.put_certificate(index, &blocks);
        let kept: BTreeSet<BlockRef> = blocks.iter().map(VerifiedBlock::reference).collect();
        for block in old.into_iter().filter(|b| !kept.contains(b)) {
            state.release(block, Holder::Certificate(index));
        }
        Ok(())
    }

    fn prune_below(&self, index: CommitIndex) -> Result<()> {
        let mut state = self.write()?;
        let target = index.min(state.watermark.index);
        if target <= state.lowest {
            return Ok(());
        }
        let pruned: Vec<TrustedCommit> = state
            .commits
            .range(..target)
            .map(|(_, c)| c.clone())
            .collect();
        for commit in pruned {
            let i = commit.index();
            state.commits.remove(&i);
            for block in &commit.commit().blocks {
                state.release(*block, Holder::Commit(i));
            }
        }
        let certified: Vec<CommitIndex> = state
            .certificates
            .range(..target)
            .map(|(i, _)| *i)
            .collect();
        for i in certified {
            state.remove_certificate(i);
        }
        state.lowest = target;
        tracing::debug!(lowest = target, "memory store pruned");
        Ok(())
    }
}
