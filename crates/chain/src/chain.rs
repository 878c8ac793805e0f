use std::collections::BTreeMap;
use std::ops::RangeInclusive;

use soma_store::{ConsensusStore, SyncedBatch};
use soma_types::{
    BlockRef, ChainId, CommitIndex, CommitRef, CommittedSubDag, Committee, Epoch, TrustedCommit,
    UnverifiedBlock, UnverifiedCommit, VerifiedBlock, batch_end, genesis_commit,
};

use crate::{ChainConfig, RoundOutput};

/// A finished chain: every commit with its blocks and certificate, and the
/// committee of every epoch.
#[derive(Clone, Debug)]
pub struct Chain {
    config: ChainConfig,
    genesis: Committee,
    committees: BTreeMap<Epoch, Committee>,
    /// Commit `i` is at position `i - 1`.
    commits: Vec<TrustedCommit>,
    /// The blocks of each commit, in commit order, parallel to `commits`.
    commit_blocks: Vec<Vec<VerifiedBlock>>,
    certificates: BTreeMap<CommitIndex, Vec<VerifiedBlock>>,
    epoch_ends: BTreeMap<Epoch, CommitIndex>,
}

impl Chain {
    pub(crate) fn new(config: ChainConfig, genesis: Committee) -> Self {
        Chain {
            config,
            committees: BTreeMap::from([(genesis.epoch(), genesis.clone())]),
            genesis,
            commits: Vec::new(),
            commit_blocks: Vec::new(),
            certificates: BTreeMap::new(),
            epoch_ends: BTreeMap::new(),
        }
    }

    pub(crate) fn absorb(&mut self, out: RoundOutput, limit: CommitIndex) {
        if let Some((commit, blocks, next)) = out.commit
            && commit.index() <= limit
        {
            if let Some(next) = next {
                self.epoch_ends
                    .insert(commit.commit().epoch, commit.index());
                self.committees.insert(next.epoch(), next);
            }
            self.commits.push(commit);
            self.commit_blocks.push(blocks);
        }
        for (index, blocks) in out.certified {
            if index <= limit {
                self.certificates.insert(index, blocks);
            }
        }
    }

    /// The configuration the chain was built from (and its keys).
    pub fn config(&self) -> &ChainConfig {
        &self.config
    }

    /// The genesis committee.
    pub fn genesis(&self) -> &Committee {
        &self.genesis
    }

    /// The chain id.
    pub fn chain_id(&self) -> ChainId {
        ChainId::from_genesis(&self.genesis)
    }

    /// Index of the last commit.
    pub fn tip(&self) -> CommitIndex {
        self.commits.len() as CommitIndex
    }

    /// Whether commit `index` has a certificate (the genesis commit always does).
    pub fn is_certified(&self, index: CommitIndex) -> bool {
        index == 0 || self.certificates.contains_key(&index)
    }

    /// The committee of `epoch`.
    pub fn committee(&self, epoch: Epoch) -> Option<&Committee> {
        self.committees.get(&epoch)
    }

    /// All committees, by epoch.
    pub fn committees(&self) -> impl Iterator<Item = &Committee> {
        self.committees.values()
    }

    /// The committee that certified commit `index`.
    pub fn committee_of(&self, index: CommitIndex) -> &Committee {
        let epoch = self.commit(index).commit().epoch;
        &self.committees[&epoch]
    }

    /// The last commit of `epoch`, if the epoch ended within the chain.
    pub fn epoch_last(&self, epoch: Epoch) -> Option<CommitIndex> {
        self.epoch_ends.get(&epoch).copied()
    }

    /// Every commit, from index 1.
    pub fn commits(&self) -> &[TrustedCommit] {
        &self.commits
    }

    /// Commit `index`; index 0 is the genesis commit.
    ///
    /// # Panics
    /// If `index` is past the tip.
    pub fn commit(&self, index: CommitIndex) -> TrustedCommit {
        if index == 0 {
            genesis_commit(&self.genesis)
        } else {
            self.commits[index as usize - 1].clone()
        }
    }

    /// The reference of commit `index` (0 for genesis).
    pub fn commit_ref(&self, index: CommitIndex) -> CommitRef {
        self.commit(index).reference()
    }

    /// The blocks of commit `index`, in commit order.
    pub fn blocks_of(&self, index: CommitIndex) -> &[VerifiedBlock] {
        &self.commit_blocks[index as usize - 1]
    }

    /// The certifier blocks of commit `index`.
    pub fn certificate(&self, index: CommitIndex) -> &[VerifiedBlock] {
        self.certificates.get(&index).map_or(&[], Vec::as_slice)
    }

    /// Total number of committed blocks.
    pub fn block_count(&self) -> usize {
        self.commit_blocks.iter().map(Vec::len).sum()
    }

    /// The sub-DAG a node receives for commit `index`.
    pub fn subdag(&self, index: CommitIndex) -> CommittedSubDag {
        let commit = self.commit(index);
        let blocks: BTreeMap<BlockRef, VerifiedBlock> = self
            .blocks_of(index)
            .iter()
            .map(|b| (b.reference(), b.clone()))
            .collect();
        CommittedSubDag::new(&commit, |r| blocks.get(r).cloned())
            .expect("a built commit has all its blocks")
    }

    /// The commit ranges a syncing node fetches with `batch_size`: ending on
    /// multiples of it, at each epoch's last commit, and at the tip.
    pub fn batch_ranges(&self, batch_size: u64) -> Vec<RangeInclusive<CommitIndex>> {
        let mut ranges = Vec::new();
        let mut start = 1;
        while start <= self.tip() {
            let epoch = self.commit(start).commit().epoch;
            let end = batch_end(start, batch_size, self.epoch_last(epoch), self.tip());
            ranges.push(start..=end);
            start = end + 1;
        }
        ranges
    }

    /// The commits in `range` with all their blocks and the certificate of
    /// the last one, as one store write.
    pub fn batch(&self, range: RangeInclusive<CommitIndex>) -> SyncedBatch {
        let end = *range.end();
        let next_committee = self
            .epoch_ends
            .iter()
            .find(|(_, last)| **last == end)
            .and_then(|(epoch, _)| self.committees.get(&(epoch + 1)).cloned());
        SyncedBatch {
            commits: range.clone().map(|i| self.commit(i)).collect(),
            blocks: range
                .flat_map(|i| self.blocks_of(i).iter().cloned())
                .collect(),
            certificate: self.certificate(end).to_vec(),
            next_committee,
        }
    }

    /// Writes the chain into `store` as a validator holds it, in the batches
    /// of [`Chain::batch_ranges`], each with its certificate.
    pub fn write_to(&self, store: &dyn ConsensusStore, batch_size: u64) -> soma_store::Result<()> {
        for range in self.batch_ranges(batch_size) {
            store.write_synced_batch(self.batch(range))?;
        }
        Ok(())
    }

    /// What an honest server answers to FetchCommits for `range`: the
    /// commits and the certifier blocks of the last one.
    pub fn fetch_commits(
        &self,
        range: RangeInclusive<CommitIndex>,
    ) -> (Vec<UnverifiedCommit>, Vec<UnverifiedBlock>) {
        let end = *range.end();
        (
            range.map(|i| self.commit(i).to_unverified()).collect(),
            self.certificate(end)
                .iter()
                .map(VerifiedBlock::to_unverified)
                .collect(),
        )
    }

    /// What an honest server answers to FetchBlocks for every block of the
    /// commits in `range`.
    pub fn fetch_blocks(&self, range: RangeInclusive<CommitIndex>) -> Vec<UnverifiedBlock> {
        range
            .flat_map(|i| self.blocks_of(i).iter().map(VerifiedBlock::to_unverified))
            .collect()
    }
}
