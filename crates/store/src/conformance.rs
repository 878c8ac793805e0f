//! The conformance suite every [`ConsensusStore`] must pass.
//!
//! The idea comes from raft-rs's storage tests: the trait's contract is
//! written down once, as code, and each implementation's tests run it. Every
//! function here takes a factory that makes a fresh, empty store for a
//! genesis committee, builds a small deterministic chain ([`TestChain`]),
//! and panics like a failed test (with `unwrap` and `assert`) at the first
//! departure from the contract. [`run_all`] runs them all:
//!
//! ```
//! soma_store::conformance::run_all(soma_store::MemStore::new);
//! ```
//!
//! The chain is built from `soma_types` alone, since the crate with the real
//! chain builder depends on this one. Its blocks are signed, but they do not
//! form a valid DAG: a store stores, it does not verify.

use std::ops::RangeInclusive;

use bytes::Bytes;
use soma_types::{
    Authority, AuthorityIndex, Block, BlockRef, Commit, CommitIndex, CommitRef, Committee, Digest,
    EndOfEpoch, Epoch, KeyPair, PeerId, Round, TrustedCommit, VerifiedBlock, genesis_block_refs,
    genesis_commit,
};

use crate::{ConsensusStore, Error, SyncedBatch};

/// Number of authorities in a test committee.
const AUTHORITIES: u8 = 4;

/// Seed of the keys of [`TestChain`]'s committees.
const CHAIN_SEED: u8 = 1;

/// A committee of four authorities with stake 1 each, whose keys are derived
/// from `seed`: the same `(epoch, seed)` always gives the same committee, and
/// another seed another chain.
pub fn test_committee(epoch: Epoch, seed: u8) -> Committee {
    let authorities = (0..AUTHORITIES)
        .map(|i| Authority {
            stake: 1,
            protocol_key: test_key(seed, i, 0).public(),
            network_key: PeerId::from(test_key(seed, i, 1).public()),
            address: format!("127.0.0.1:{}", 9000 + u16::from(i)),
        })
        .collect();
    match Committee::new(epoch, authorities) {
        Ok(committee) => committee,
        Err(e) => panic!("test committee is invalid: {e}"),
    }
}

/// The protocol (`role` 0) or network (`role` 1) key of authority `index`.
fn test_key(seed: u8, index: u8, role: u8) -> KeyPair {
    let mut secret = [0u8; 32];
    secret[0] = seed;
    secret[1] = index;
    secret[2] = role;
    KeyPair::from_seed(secret)
}

/// A deterministic chain of signed blocks and commits, linked by digest from
/// the genesis commit, for store tests.
///
/// Commit `i` names the 3 or 4 blocks of round `i` (so commits differ in
/// size), the leader last. The blocks of round `i + 1` vote for commit `i`
/// and form its certificate, so a commit's certifiers are the next commit's
/// blocks, as in a real chain. The commit that ends an epoch is the
/// exception: its certifiers are blocks of its own epoch that no commit
/// names, and the next commit names round-1 blocks of the next epoch.
#[derive(Clone, Debug)]
pub struct TestChain {
    genesis: Committee,
    next_committee: Committee,
    epoch_end: Option<CommitIndex>,
    /// Entry `i - 1` is commit `i`.
    entries: Vec<Entry>,
}

#[derive(Clone, Debug)]
struct Entry {
    commit: TrustedCommit,
    blocks: Vec<VerifiedBlock>,
    certificate: Vec<VerifiedBlock>,
}

impl TestChain {
    /// Commits 1 to `last` of the chain started by
    /// `test_committee(0, 1)`. If `epoch_end` is set, that commit ends
    /// epoch 0 and the commits after it are in epoch 1.
    pub fn new(last: CommitIndex, epoch_end: Option<CommitIndex>) -> TestChain {
        let genesis = test_committee(0, CHAIN_SEED);
        let next_committee = test_committee(1, CHAIN_SEED);
        let ending = |index: CommitIndex| {
            (epoch_end == Some(index)).then(|| EndOfEpoch {
                next_committee: next_committee.clone(),
            })
        };

        let mut committee = genesis.clone();
        let mut round: Round = 1;
        let mut previous = genesis_commit(&genesis).reference();
        let mut blocks = make_round(
            &committee,
            round,
            &genesis_block_refs(&genesis),
            None,
            ending(1),
        );
        let mut entries = Vec::new();
        for index in 1..=last {
            let leader = blocks[blocks.len() - 1].clone();
            let commit = TrustedCommit::new_trusted(Commit {
                index,
                previous_digest: previous.digest,
                timestamp_ms: leader.block().timestamp_ms,
                leader: leader.reference(),
                blocks: refs(&blocks),
                epoch: committee.epoch(),
            });
            previous = commit.reference();
            let certificate = make_round(
                &committee,
                round + 1,
                &refs(&blocks),
                Some(previous),
                ending(index + 1),
            );
            let next_blocks = if epoch_end == Some(index) {
                committee = next_committee.clone();
                round = 1;
                make_round(
                    &committee,
                    round,
                    &genesis_block_refs(&committee),
                    None,
                    None,
                )
            } else {
                round += 1;
                certificate.clone()
            };
            entries.push(Entry {
                commit,
                blocks,
                certificate,
            });
            blocks = next_blocks;
        }
        TestChain {
            genesis,
            next_committee,
            epoch_end,
            entries,
        }
    }

    /// The genesis committee (epoch 0).
    pub fn genesis(&self) -> &Committee {
        &self.genesis
    }

    /// The committee of epoch 1, installed by the epoch-ending commit.
    pub fn next_committee(&self) -> &Committee {
        &self.next_committee
    }

    /// Index of the last commit.
    pub fn last_index(&self) -> CommitIndex {
        self.entries.len() as CommitIndex
    }

    /// Commit `index` (from 1 to [`TestChain::last_index`]).
    pub fn commit(&self, index: CommitIndex) -> &TrustedCommit {
        &self.entry(index).commit
    }

    /// The blocks commit `index` names, in commit order.
    pub fn blocks(&self, index: CommitIndex) -> &[VerifiedBlock] {
        &self.entry(index).blocks
    }

    /// The blocks certifying commit `index`.
    pub fn certificate(&self, index: CommitIndex) -> &[VerifiedBlock] {
        &self.entry(index).certificate
    }

    /// Every block of the chain: those commits name and all certifiers.
    pub fn all_blocks(&self) -> Vec<VerifiedBlock> {
        let mut all: Vec<VerifiedBlock> = Vec::new();
        for entry in &self.entries {
            for block in entry.blocks.iter().chain(&entry.certificate) {
                if !all.contains(block) {
                    all.push(block.clone());
                }
            }
        }
        all
    }

    /// The batch of commits `range`: their blocks, the certificate of the
    /// last, and the next committee if the last ends the epoch.
    pub fn batch(&self, range: RangeInclusive<CommitIndex>) -> SyncedBatch {
        let last = *range.end();
        let commits: Vec<TrustedCommit> = range.clone().map(|i| self.commit(i).clone()).collect();
        let blocks = range.flat_map(|i| self.blocks(i).to_vec()).collect();
        SyncedBatch {
            commits,
            blocks,
            certificate: self.certificate(last).to_vec(),
            next_committee: (self.epoch_end == Some(last)).then(|| self.next_committee.clone()),
        }
    }

    fn entry(&self, index: CommitIndex) -> &Entry {
        match index
            .checked_sub(1)
            .and_then(|i| self.entries.get(usize::try_from(i).ok()?))
        {
            Some(entry) => entry,
            None => panic!("test chain has no commit {index}"),
        }
    }
}

/// One round of signed blocks: 3 or 4 authorities, the last one the
/// leader, which carries `end_of_epoch` if given.
fn make_round(
    committee: &Committee,
    round: Round,
    ancestors: &[BlockRef],
    vote: Option<CommitRef>,
    end_of_epoch: Option<EndOfEpoch>,
) -> Vec<VerifiedBlock> {
    let width = 3 + (round % 2) as u8;
    (0..width)
        .map(|a| {
            let leader = a == width - 1;
            let block = Block {
                epoch: committee.epoch(),
                round,
                author: AuthorityIndex(u32::from(a)),
                timestamp_ms: u64::from(round) * 1_000 + u64::from(a),
                ancestors: ancestors.to_vec(),
                transactions: Vec::new(),
                commit_votes: vote.into_iter().collect(),
                end_of_epoch: if leader { end_of_epoch.clone() } else { None },
            };
            VerifiedBlock::sign(block, &test_key(CHAIN_SEED, a, 0))
        })
        .collect()
}

fn refs(blocks: &[VerifiedBlock]) -> Vec<BlockRef> {
    blocks.iter().map(VerifiedBlock::reference).collect()
}

/// Commit `commit` moved to `epoch`, linking where it did.
fn in_epoch(commit: &TrustedCommit, epoch: Epoch) -> TrustedCommit {
    let mut forged = commit.commit().clone();
    forged.epoch = epoch;
    TrustedCommit::new_trusted(forged)
}

/// Commit `commit` with another `previous_digest`: a commit that breaks the
/// digest chain.
fn relinked(commit: &TrustedCommit, previous_digest: Digest) -> TrustedCommit {
    let mut forged = commit.commit().clone();
    forged.previous_digest = previous_digest;
    TrustedCommit::new_trusted(forged)
}

fn commit_bytes(commits: &[TrustedCommit]) -> Vec<Bytes> {
    commits.iter().map(|c| c.serialized().clone()).collect()
}

fn block_bytes(blocks: &[VerifiedBlock]) -> Vec<Bytes> {
    blocks.iter().map(|b| b.serialized().clone()).collect()
}

/// Everything a store holds about a [`TestChain`], read through the trait,
/// to check that a refused write or a reopen changed nothing.
#[derive(Debug, PartialEq, Eq)]
pub struct Snapshot {
    watermark: CommitRef,
    lowest: CommitIndex,
    commits: Vec<Option<Bytes>>,
    blocks: Vec<Option<Bytes>>,
    certificates: Vec<Option<Vec<Bytes>>>,
    committees: Vec<Option<Committee>>,
    epoch_ends: Vec<Option<CommitIndex>>,
}

/// Reads a [`Snapshot`] of `store` covering every commit and block of
/// `chain` (and one commit past its end).
pub fn snapshot<S: ConsensusStore>(store: &S, chain: &TestChain) -> Snapshot {
    let indices = 0..=chain.last_index() + 1;
    Snapshot {
        watermark: store.highest_synced_commit().unwrap(),
        lowest: store.lowest_available_commit().unwrap(),
        commits: indices
            .clone()
            .map(|i| store.commit(i).unwrap().map(|c| c.serialized().clone()))
            .collect(),
        blocks: store
            .blocks(&refs(&chain.all_blocks()))
            .unwrap()
            .into_iter()
            .map(|b| b.map(|b| b.serialized().clone()))
            .collect(),
        certificates: indices
            .map(|i| store.certificate(i).unwrap().map(|c| block_bytes(&c)))
            .collect(),
        committees: (0..3).map(|e| store.committee(e).unwrap()).collect(),
        epoch_ends: (0..3)
            .map(|e| store.last_commit_of_epoch(e).unwrap())
            .collect(),
    }
}

/// The encodings of the decoded blocks `store.blocks(refs)` returns.
fn decoded_bytes<S: ConsensusStore>(store: &S, refs: &[BlockRef]) -> Vec<Option<Bytes>> {
    store
        .blocks(refs)
        .unwrap()
        .into_iter()
        .map(|b| b.map(|b| b.serialized().clone()))
        .collect()
}

/// Asserts that every block of `blocks` is stored (`true`) or not, read
/// decoded and as encodings alike.
fn assert_blocks_stored<S: ConsensusStore>(store: &S, blocks: &[VerifiedBlock], stored: bool) {
    for block in blocks {
        let found = store.block(&block.reference()).unwrap();
        assert_eq!(
            found.is_some(),
            stored,
            "block {} stored: expected {stored}",
            block.reference()
        );
        if let Some(found) = found {
            assert_eq!(found.serialized(), block.serialized());
        }
    }
    // The encodings alone are exactly what the decoded reads give.
    let refs: Vec<BlockRef> = blocks.iter().map(VerifiedBlock::reference).collect();
    let decoded = decoded_bytes(store, &refs);
    let expected: Vec<Option<Bytes>> = blocks
        .iter()
        .map(|b| stored.then(|| b.serialized().clone()))
        .collect();
    assert_eq!(decoded, expected);
    // Read as encodings, they end after the first block not stored.
    let cut = expected
        .iter()
        .position(Option::is_none)
        .map_or(expected.len(), |i| i + 1);
    assert_eq!(
        store.block_bytes(&refs, usize::MAX).unwrap(),
        expected[..cut]
    );
}

/// Runs the whole suite against stores made by `new_store`.
pub fn run_all<S: ConsensusStore>(new_store: impl Fn(&Committee) -> S) {
    fresh_store_starts_at_genesis(&new_store);
    batch_reads_back_exactly(&new_store);
    watermark_follows_each_batch(&new_store);
    empty_batch_is_a_noop(&new_store);
    refuses_gap_after_watermark(&new_store);
    refuses_wrong_previous_digest(&new_store);
    refuses_broken_link_inside_batch(&new_store);
    refuses_batch_missing_a_block(&new_store);
    accepts_blocks_already_stored(&new_store);
    commits_in_range_respects_byte_budget(&new_store);
    commits_in_range_clamps_to_stored(&new_store);
    blocks_keep_order_and_mark_unknown(&new_store);
    block_bytes_respect_byte_budget(&new_store);
    highest_certified_in_finds_last_certificate(&new_store);
    epoch_end_installs_next_committee(&new_store);
    refuses_commits_of_an_ended_epoch(&new_store);
    refuses_commits_of_another_epoch(&new_store);
    refuses_replacing_a_committee(&new_store);
    refuses_next_committee_of_another_epoch(&new_store);
    insert_certificate_needs_stored_commit(&new_store);
    prune_below_deletes_commits_blocks_and_certificates(&new_store);
    prune_below_clamps_at_watermark(&new_store);
    prune_below_never_lowers_lowest(&new_store);
    version_rises_with_every_write(&new_store);
}

/// A fresh store holds the genesis commit as watermark, nothing to serve,
/// and the genesis committee.
pub fn fresh_store_starts_at_genesis<S: ConsensusStore>(new_store: impl Fn(&Committee) -> S) {
    let chain = TestChain::new(2, None);
    let store = new_store(chain.genesis());

    assert_eq!(
        store.highest_synced_commit().unwrap(),
        genesis_commit(chain.genesis()).reference()
    );
    assert_eq!(store.lowest_available_commit().unwrap(), 1);
    // The genesis commit is derived, never stored.
    assert!(store.commit(0).unwrap().is_none());
    assert!(store.commit(1).unwrap().is_none());
    assert!(
        store
            .commits_in_range(0..=10, usize::MAX)
            .unwrap()
            .is_empty()
    );
    assert!(
        store
            .block(&chain.blocks(1)[0].reference())
            .unwrap()
            .is_none()
    );
    assert!(store.certificate(0).unwrap().is_none());
    assert!(store.certificate(1).unwrap().is_none());
    assert_eq!(store.highest_certified_in(0..=10).unwrap(), None);
    assert_eq!(store.committee(0).unwrap().as_ref(), Some(chain.genesis()));
    assert_eq!(store.committee(1).unwrap(), None);
    assert_eq!(store.last_commit_of_epoch(0).unwrap(), None);
}

/// A written batch reads back byte for byte: commits, blocks, and the
/// certificate of its last commit only.
pub fn batch_reads_back_exactly<S: ConsensusStore>(new_store: impl Fn(&Committee) -> S) {
    let chain = TestChain::new(5, None);
    let store = new_store(chain.genesis());
    store.write_synced_batch(chain.batch(1..=5)).unwrap();

    assert_eq!(
        store.highest_synced_commit().unwrap(),
        chain.commit(5).reference()
    );
    assert_eq!(store.lowest_available_commit().unwrap(), 1);
    for i in 1..=5 {
        let commit = store.commit(i).unwrap().unwrap();
        assert_eq!(commit.serialized(), chain.commit(i).serialized());
        assert_eq!(commit.reference(), chain.commit(i).reference());
        assert_blocks_stored(&store, chain.blocks(i), true);
        let blocks = store.blocks(&refs(chain.blocks(i))).unwrap();
        let blocks: Vec<VerifiedBlock> = blocks.into_iter().map(Option::unwrap).collect();
        assert_eq!(block_bytes(&blocks), block_bytes(chain.blocks(i)));
    }
    let certificate = store.certificate(5).unwrap().unwrap();
    assert_eq!(block_bytes(&certificate), block_bytes(chain.certificate(5)));
    assert_blocks_stored(&store, chain.certificate(5), true);
    for i in 1..=4 {
        assert!(store.certificate(i).unwrap().is_none(), "certificate {i}");
    }
}

/// The watermark moves to the last commit of each batch written.
pub fn watermark_follows_each_batch<S: ConsensusStore>(new_store: impl Fn(&Committee) -> S) {
    let chain = TestChain::new(8, None);
    let store = new_store(chain.genesis());
    for range in [1..=3, 4..=4, 5..=8] {
        let last = *range.end();
        store.write_synced_batch(chain.batch(range)).unwrap();
        assert_eq!(
            store.highest_synced_commit().unwrap(),
            chain.commit(last).reference()
        );
    }
    let all = store.commits_in_range(1..=8, usize::MAX).unwrap();
    assert_eq!(
        commit_bytes(&all),
        commit_bytes(&chain.batch(1..=8).commits)
    );
}

/// A batch without commits changes nothing, even if it carries blocks.
pub fn empty_batch_is_a_noop<S: ConsensusStore>(new_store: impl Fn(&Committee) -> S) {
    let chain = TestChain::new(3, None);
    let store = new_store(chain.genesis());
    store.write_synced_batch(chain.batch(1..=1)).unwrap();
    let before = snapshot(&store, &chain);
    let mut batch = chain.batch(2..=3);
    batch.commits.clear();
    store.write_synced_batch(batch).unwrap();
    assert_eq!(snapshot(&store, &chain), before);
}

/// A batch whose first commit skips an index is refused, and the store is
/// unchanged.
pub fn refuses_gap_after_watermark<S: ConsensusStore>(new_store: impl Fn(&Committee) -> S) {
    let chain = TestChain::new(6, None);
    let store = new_store(chain.genesis());
    store.write_synced_batch(chain.batch(1..=3)).unwrap();
    let before = snapshot(&store, &chain);

    assert_eq!(
        store.write_synced_batch(chain.batch(5..=6)),
        Err(Error::NotContiguous {
            watermark: chain.commit(3).reference(),
            got: chain.commit(5).reference(),
        })
    );
    // Commits already stored are not written again either.
    assert_eq!(
        store.write_synced_batch(chain.batch(2..=4)),
        Err(Error::NotContiguous {
            watermark: chain.commit(3).reference(),
            got: chain.commit(2).reference(),
        })
    );
    assert_eq!(snapshot(&store, &chain), before);
}

/// A batch whose first commit has the right index but does not link to the
/// watermark's digest is refused, and the store is unchanged.
pub fn refuses_wrong_previous_digest<S: ConsensusStore>(new_store: impl Fn(&Committee) -> S) {
    let chain = TestChain::new(4, None);
    let store = new_store(chain.genesis());
    store.write_synced_batch(chain.batch(1..=2)).unwrap();
    let before = snapshot(&store, &chain);

    let mut batch = chain.batch(3..=4);
    let forged = relinked(chain.commit(3), Digest::ZERO);
    batch.commits[0] = forged.clone();
    assert_eq!(
        store.write_synced_batch(batch),
        Err(Error::NotContiguous {
            watermark: chain.commit(2).reference(),
            got: forged.reference(),
        })
    );
    assert_eq!(snapshot(&store, &chain), before);
}

/// A batch whose commits do not link to each other (wrong digest, repeated
/// or skipped index) is refused whole: not even its valid prefix is stored.
pub fn refuses_broken_link_inside_batch<S: ConsensusStore>(new_store: impl Fn(&Committee) -> S) {
    let chain = TestChain::new(4, None);
    let store = new_store(chain.genesis());
    let before = snapshot(&store, &chain);
    let watermark = store.highest_synced_commit().unwrap();

    let mut batch = chain.batch(1..=4);
    let forged = relinked(chain.commit(3), chain.commit(1).reference().digest);
    batch.commits[2] = forged.clone();
    assert_eq!(
        store.write_synced_batch(batch),
        Err(Error::NotContiguous {
            watermark,
            got: forged.reference(),
        })
    );

    let mut repeated = chain.batch(1..=3);
    repeated.commits.insert(2, chain.commit(2).clone());
    assert_eq!(
        store.write_synced_batch(repeated),
        Err(Error::NotContiguous {
            watermark,
            got: chain.commit(2).reference(),
        })
    );

    let mut skipped = chain.batch(1..=4);
    skipped.commits.remove(2);
    assert_eq!(
        store.write_synced_batch(skipped),
        Err(Error::NotContiguous {
            watermark,
            got: chain.commit(4).reference(),
        })
    );
    assert_eq!(snapshot(&store, &chain), before);
}

/// A batch lacking a block that one of its commits names is refused, and
/// the store is unchanged.
pub fn refuses_batch_missing_a_block<S: ConsensusStore>(new_store: impl Fn(&Committee) -> S) {
    let chain = TestChain::new(3, None);
    let store = new_store(chain.genesis());
    let before = snapshot(&store, &chain);

    let mut batch = chain.batch(1..=3);
    let missing = chain.blocks(2)[1].reference();
    batch.blocks.retain(|b| b.reference() != missing);
    assert_eq!(
        store.write_synced_batch(batch),
        Err(Error::MissingBlock(missing))
    );
    assert_eq!(snapshot(&store, &chain), before);
}

/// A batch need not carry blocks the store already holds, such as the
/// certifiers of the previous batch, which the next commit names.
pub fn accepts_blocks_already_stored<S: ConsensusStore>(new_store: impl Fn(&Committee) -> S) {
    let chain = TestChain::new(4, None);
    let store = new_store(chain.genesis());
    store.write_synced_batch(chain.batch(1..=3)).unwrap();

    let mut batch = chain.batch(4..=4);
    batch.blocks.clear();
    store.write_synced_batch(batch).unwrap();
    assert_eq!(
        store.highest_synced_commit().unwrap(),
        chain.commit(4).reference()
    );
    assert_blocks_stored(&store, chain.blocks(4), true);
}

/// `commits_in_range` stops before the byte budget is exceeded, but always
/// returns the first stored commit.
pub fn commits_in_range_respects_byte_budget<S: ConsensusStore>(
    new_store: impl Fn(&Committee) -> S,
) {
    let chain = TestChain::new(8, None);
    let store = new_store(chain.genesis());
    store.write_synced_batch(chain.batch(1..=8)).unwrap();
    let size = |i: CommitIndex| chain.commit(i).serialized().len();
    let expected = |range: RangeInclusive<CommitIndex>| commit_bytes(&chain.batch(range).commits);
    let read = |range: RangeInclusive<CommitIndex>, max_bytes: usize| {
        commit_bytes(&store.commits_in_range(range, max_bytes).unwrap())
    };

    assert_eq!(read(1..=8, usize::MAX), expected(1..=8));
    let all: usize = (1..=8).map(size).sum();
    assert_eq!(read(1..=8, all), expected(1..=8));
    assert_eq!(read(1..=8, all - 1), expected(1..=7));
    let three = size(1) + size(2) + size(3);
    assert_eq!(read(1..=8, three), expected(1..=3));
    assert_eq!(read(1..=8, three - 1), expected(1..=2));
    assert_eq!(read(1..=8, 0), expected(1..=1));
    assert_eq!(read(1..=8, 1), expected(1..=1));
    assert_eq!(read(3..=8, size(3)), expected(3..=3));
    assert_eq!(read(5..=5, 0), expected(5..=5));
}

/// `block_bytes` returns, in order, the encodings of as many blocks as fit
/// in its budget, at least one, and ends after the first block not stored:
/// exactly what reading each block alone gives, cut there.
pub fn block_bytes_respect_byte_budget<S: ConsensusStore>(new_store: impl Fn(&Committee) -> S) {
    let chain = TestChain::new(4, None);
    let store = new_store(chain.genesis());
    store.write_synced_batch(chain.batch(1..=4)).unwrap();
    let stored: Vec<VerifiedBlock> = (1..=4).flat_map(|i| chain.blocks(i).to_vec()).collect();
    // Each stored block read alone, the plain path.
    let alone: Vec<Bytes> = stored
        .iter()
        .map(|b| {
            store
                .block(&b.reference())
                .unwrap()
                .unwrap()
                .serialized()
                .clone()
        })
        .collect();
    let refs: Vec<BlockRef> = stored.iter().map(VerifiedBlock::reference).collect();
    let read = |refs: &[BlockRef], max_bytes: usize| store.block_bytes(refs, max_bytes).unwrap();
    let taken = |n: usize| -> Vec<Option<Bytes>> { alone[..n].iter().cloned().map(Some).collect() };

    // Every budget from nothing to all the blocks: the longest run whose
    // total fits, never fewer than one block.
    let mut total = 0;
    for (n, block) in alone.iter().enumerate() {
        if n > 0 {
            assert_eq!(
                read(&refs, total),
                taken(n),
                "a budget of exactly {n} blocks"
            );
        }
        assert_eq!(read(&refs, total + block.len() - 1), taken(n.max(1)));
        total += block.len();
    }
    assert_eq!(read(&refs, total), taken(alone.len()));
    assert_eq!(read(&refs, usize::MAX), taken(alone.len()));
    assert_eq!(read(&refs, 0), taken(1));
    // A first block larger than the budget comes alone.
    assert_eq!(read(&refs[2..], 1), vec![Some(alone[2].clone())]);

    // A block not stored ends the read, given as `None`, within the budget
    // or not.
    let unknown = BlockRef {
        digest: Digest::ZERO,
        ..refs[0]
    };
    let mut asked = refs[..3].to_vec();
    asked.push(unknown);
    asked.extend_from_slice(&refs[3..]);
    let mut ended = taken(3);
    ended.push(None);
    assert_eq!(read(&asked, usize::MAX), ended);
    // Found missing before the budget is asked: with the budget spent
    // exactly, the block not stored still ends the read.
    let three = alone[..3].iter().map(Bytes::len).sum();
    assert_eq!(read(&asked, three), ended);
    assert_eq!(read(&asked, three - 1), taken(2));
    assert_eq!(read(&asked, 0), taken(1));
    assert_eq!(read(&[unknown], 0), vec![None]);
    assert!(read(&[], 0).is_empty());
}

/// `commits_in_range` clamps its range to the stored commits; an empty or
/// reversed range gives nothing.
pub fn commits_in_range_clamps_to_stored<S: ConsensusStore>(new_store: impl Fn(&Committee) -> S) {
    let chain = TestChain::new(8, None);
    let store = new_store(chain.genesis());
    store.write_synced_batch(chain.batch(1..=8)).unwrap();
    let expected = |range: RangeInclusive<CommitIndex>| commit_bytes(&chain.batch(range).commits);
    let read = |range: RangeInclusive<CommitIndex>| {
        commit_bytes(&store.commits_in_range(range, usize::MAX).unwrap())
    };

    assert_eq!(read(0..=3), expected(1..=3));
    assert_eq!(read(6..=100), expected(6..=8));
    assert_eq!(read(0..=CommitIndex::MAX), expected(1..=8));
    assert_eq!(read(4..=4), expected(4..=4));
    assert!(read(9..=20).is_empty());
    assert!(read(0..=0).is_empty());
    assert!(read(CommitIndex::MAX..=CommitIndex::MAX).is_empty());
    #[allow(clippy::reversed_empty_ranges)]
    let reversed = 5..=3;
    assert!(read(reversed).is_empty());
}

/// `blocks` answers in the order asked, with `None` for unknown blocks.
pub fn blocks_keep_order_and_mark_unknown<S: ConsensusStore>(new_store: impl Fn(&Committee) -> S) {
    let chain = TestChain::new(3, None);
    let store = new_store(chain.genesis());
    store.write_synced_batch(chain.batch(1..=3)).unwrap();

    let known_a = &chain.blocks(3)[0];
    let known_b = &chain.blocks(1)[2];
    let unknown = BlockRef {
        digest: Digest::ZERO,
        ..known_a.reference()
    };
    let asked = [
        known_a.reference(),
        unknown,
        known_b.reference(),
        known_a.reference(),
    ];
    let found = decoded_bytes(&store, &asked);
    assert_eq!(
        found,
        vec![
            Some(known_a.serialized().clone()),
            None,
            Some(known_b.serialized().clone()),
            Some(known_a.serialized().clone()),
        ]
    );
    // As encodings, up to the first block not stored, which ends them.
    assert_eq!(store.block_bytes(&asked, usize::MAX).unwrap(), found[..2]);
    assert_eq!(
        store.block_bytes(&asked[2..], usize::MAX).unwrap(),
        found[2..]
    );
    assert!(store.blocks(&[]).unwrap().is_empty());
    assert!(store.block_bytes(&[], usize::MAX).unwrap().is_empty());
    assert!(store.block(&unknown).unwrap().is_none());
}

/// The version rises with every write that changes the store (a batch, a
/// certificate, pruning) and stays put across reads.
pub fn version_rises_with_every_write<S: ConsensusStore>(new_store: impl Fn(&Committee) -> S) {
    let chain = TestChain::new(6, None);
    let store = new_store(chain.genesis());
    let mut seen = store.version();
    let mut rose = |store: &S, what: &str| {
        let now = store.version();
        assert!(now > seen, "{what}: version {now}, {seen} before");
        seen = now;
    };
    store.write_synced_batch(chain.batch(1..=3)).unwrap();
    rose(&store, "a batch");
    store.write_synced_batch(chain.batch(4..=6)).unwrap();
    rose(&store, "a second batch");
    store
        .insert_certificate(5, chain.certificate(5).to_vec())
        .unwrap();
    rose(&store, "a certificate");
    store.prune_below(3).unwrap();
    rose(&store, "pruning");
    let before = store.version();
    store.commits_in_range(1..=6, usize::MAX).unwrap();
    store.certificate(6).unwrap();
    store.highest_synced_commit().unwrap();
    assert_eq!(store.version(), before, "reads do not move the version");
}

/// `highest_certified_in` finds the highest certified commit in a range.
pub fn highest_certified_in_finds_last_certificate<S: ConsensusStore>(
    new_store: impl Fn(&Committee) -> S,
) {
    let chain = TestChain::new(6, None);
    let store = new_store(chain.genesis());
    store.write_synced_batch(chain.batch(1..=3)).unwrap();
    store.write_synced_batch(chain.batch(4..=6)).unwrap();
    store
        .insert_certificate(5, chain.certificate(5).to_vec())
        .unwrap();

    assert_eq!(store.highest_certified_in(1..=10).unwrap(), Some(6));
    assert_eq!(
        store.highest_certified_in(0..=CommitIndex::MAX).unwrap(),
        Some(6)
    );
    assert_eq!(store.highest_certified_in(1..=5).unwrap(), Some(5));
    assert_eq!(store.highest_certified_in(1..=4).unwrap(), Some(3));
    assert_eq!(store.highest_certified_in(3..=3).unwrap(), Some(3));
    assert_eq!(store.highest_certified_in(1..=2).unwrap(), None);
    assert_eq!(store.highest_certified_in(4..=4).unwrap(), None);
    #[allow(clippy::reversed_empty_ranges)]
    let reversed = 6..=3;
    assert_eq!(store.highest_certified_in(reversed).unwrap(), None);
}

/// A batch ending an epoch installs the next committee and records the
/// epoch's last commit; the next epoch's commits follow it.
pub fn epoch_end_installs_next_committee<S: ConsensusStore>(new_store: impl Fn(&Committee) -> S) {
    let chain = TestChain::new(6, Some(4));
    let store = new_store(chain.genesis());

    store.write_synced_batch(chain.batch(1..=2)).unwrap();
    assert_eq!(store.committee(1).unwrap(), None);
    assert_eq!(store.last_commit_of_epoch(0).unwrap(), None);

    let batch = chain.batch(3..=4);
    assert!(batch.next_committee.is_some());
    store.write_synced_batch(batch).unwrap();
    assert_eq!(store.committee(0).unwrap().as_ref(), Some(chain.genesis()));
    assert_eq!(
        store.committee(1).unwrap().as_ref(),
        Some(chain.next_committee())
    );
    assert_eq!(store.last_commit_of_epoch(0).unwrap(), Some(4));
    assert_eq!(store.last_commit_of_epoch(1).unwrap(), None);
    let certificate = store.certificate(4).unwrap().unwrap();
    assert_eq!(block_bytes(&certificate), block_bytes(chain.certificate(4)));

    store.write_synced_batch(chain.batch(5..=6)).unwrap();
    assert_eq!(
        store.highest_synced_commit().unwrap(),
        chain.commit(6).reference()
    );
    assert_eq!(store.commit(5).unwrap().unwrap().commit().epoch, 1);
    assert_eq!(store.last_commit_of_epoch(0).unwrap(), Some(4));
}

/// After an epoch's end is recorded, a batch continuing the chain with
/// commits of that ended epoch is refused, even one carrying another
/// committee for the next epoch: neither the end nor the committee moves.
pub fn refuses_commits_of_an_ended_epoch<S: ConsensusStore>(new_store: impl Fn(&Committee) -> S) {
    let chain = TestChain::new(6, Some(4));
    let store = new_store(chain.genesis());
    store.write_synced_batch(chain.batch(1..=4)).unwrap();
    let before = snapshot(&store, &chain);

    let mut batch = chain.batch(5..=5);
    batch.commits = vec![in_epoch(chain.commit(5), 0)];
    batch.next_committee = Some(test_committee(1, CHAIN_SEED + 1));
    assert_eq!(
        store.write_synced_batch(batch),
        Err(Error::EpochEnded { epoch: 0, last: 4 })
    );
    let mut batch = chain.batch(5..=6);
    batch.commits[1] = in_epoch(chain.commit(6), 0);
    assert_eq!(
        store.write_synced_batch(batch),
        Err(Error::EpochEnded { epoch: 0, last: 4 })
    );
    assert_eq!(snapshot(&store, &chain), before);
    assert_eq!(
        store.committee(1).unwrap().as_ref(),
        Some(chain.next_committee())
    );

    // The next epoch's own commits still follow.
    store.write_synced_batch(chain.batch(5..=6)).unwrap();
    assert_eq!(
        store.highest_synced_commit().unwrap(),
        chain.commit(6).reference()
    );
}

/// A batch with a commit of an epoch other than the current one (the
/// watermark commit's, or the next right after its recorded end) is
/// refused, whether it starts the batch or comes in the middle.
pub fn refuses_commits_of_another_epoch<S: ConsensusStore>(new_store: impl Fn(&Committee) -> S) {
    let chain = TestChain::new(6, Some(4));
    let store = new_store(chain.genesis());
    let fresh = snapshot(&store, &chain);
    let mut batch = chain.batch(1..=1);
    batch.commits[0] = in_epoch(chain.commit(1), 1);
    assert_eq!(
        store.write_synced_batch(batch),
        Err(Error::WrongEpoch {
            index: 1,
            expected: 0,
            got: 1
        })
    );
    assert_eq!(snapshot(&store, &chain), fresh);

    store.write_synced_batch(chain.batch(1..=2)).unwrap();
    let before = snapshot(&store, &chain);
    // The commit ending the epoch, moved to the next epoch before its end.
    let mut batch = chain.batch(3..=4);
    batch.commits[1] = in_epoch(chain.commit(4), 1);
    assert_eq!(
        store.write_synced_batch(batch),
        Err(Error::WrongEpoch {
            index: 4,
            expected: 0,
            got: 1
        })
    );
    assert_eq!(snapshot(&store, &chain), before);

    store.write_synced_batch(chain.batch(3..=4)).unwrap();
    let before = snapshot(&store, &chain);
    // Right after the end of epoch 0 the store is in epoch 1, not 2.
    let mut batch = chain.batch(5..=5);
    batch.commits = vec![in_epoch(chain.commit(5), 2)];
    assert_eq!(
        store.write_synced_batch(batch),
        Err(Error::WrongEpoch {
            index: 5,
            expected: 1,
            got: 2
        })
    );
    assert_eq!(snapshot(&store, &chain), before);
}

/// A batch carrying a committee for an epoch that already has one is
/// refused, even when the committee is identical to the stored one.
pub fn refuses_replacing_a_committee<S: ConsensusStore>(new_store: impl Fn(&Committee) -> S) {
    let chain = TestChain::new(6, Some(4));
    let store = new_store(chain.genesis());
    let mut batch = chain.batch(1..=2);
    batch.next_committee = Some(chain.genesis().clone());
    assert_eq!(
        store.write_synced_batch(batch),
        Err(Error::CommitteeExists(0))
    );

    store.write_synced_batch(chain.batch(1..=4)).unwrap();
    let before = snapshot(&store, &chain);
    for committee in [
        chain.next_committee().clone(),
        test_committee(1, CHAIN_SEED + 1),
    ] {
        let mut batch = chain.batch(5..=6);
        batch.next_committee = Some(committee);
        assert_eq!(
            store.write_synced_batch(batch),
            Err(Error::CommitteeExists(1))
        );
    }
    assert_eq!(snapshot(&store, &chain), before);
    assert_eq!(
        store.committee(1).unwrap().as_ref(),
        Some(chain.next_committee())
    );
}

/// A batch ending an epoch must carry the committee of the next epoch, not
/// of a later one.
pub fn refuses_next_committee_of_another_epoch<S: ConsensusStore>(
    new_store: impl Fn(&Committee) -> S,
) {
    let chain = TestChain::new(4, Some(4));
    let store = new_store(chain.genesis());
    let fresh = snapshot(&store, &chain);
    let mut batch = chain.batch(1..=4);
    batch.next_committee = Some(test_committee(2, CHAIN_SEED));
    assert_eq!(
        store.write_synced_batch(batch),
        Err(Error::WrongNextEpoch {
            expected: 1,
            got: 2
        })
    );
    assert_eq!(snapshot(&store, &chain), fresh);
    store.write_synced_batch(chain.batch(1..=4)).unwrap();
    assert_eq!(store.last_commit_of_epoch(0).unwrap(), Some(4));
}

/// `insert_certificate` stores a certificate and its blocks for a stored
/// commit, replaces an earlier one, ignores an empty one, and refuses a
/// commit the store does not hold.
pub fn insert_certificate_needs_stored_commit<S: ConsensusStore>(
    new_store: impl Fn(&Committee) -> S,
) {
    let chain = TestChain::new(5, None);
    let store = new_store(chain.genesis());
    let mut batch = chain.batch(1..=4);
    batch.certificate.clear();
    store.write_synced_batch(batch).unwrap();
    assert!(store.certificate(4).unwrap().is_none());
    assert_blocks_stored(&store, chain.certificate(4), false);

    // Commit 4's certifiers are not stored yet: inserting stores them.
    store
        .insert_certificate(4, chain.certificate(4).to_vec())
        .unwrap();
    let certificate = store.certificate(4).unwrap().unwrap();
    assert_eq!(block_bytes(&certificate), block_bytes(chain.certificate(4)));
    assert_blocks_stored(&store, chain.certificate(4), true);

    store
        .insert_certificate(2, chain.certificate(2).to_vec())
        .unwrap();
    let certificate = store.certificate(2).unwrap().unwrap();
    assert_eq!(block_bytes(&certificate), block_bytes(chain.certificate(2)));
    assert_eq!(store.highest_certified_in(1..=3).unwrap(), Some(2));

    // A second certificate replaces the first.
    let other: Vec<VerifiedBlock> = chain.certificate(2)[..2].to_vec();
    store.insert_certificate(2, other.clone()).unwrap();
    let certificate = store.certificate(2).unwrap().unwrap();
    assert_eq!(block_bytes(&certificate), block_bytes(&other));

    store.insert_certificate(3, Vec::new()).unwrap();
    assert!(store.certificate(3).unwrap().is_none());

    let before = snapshot(&store, &chain);
    assert_eq!(
        store.insert_certificate(5, chain.certificate(5).to_vec()),
        Err(Error::UnknownCommit(5))
    );
    assert_eq!(
        store.insert_certificate(0, chain.certificate(1).to_vec()),
        Err(Error::UnknownCommit(0))
    );
    assert_eq!(snapshot(&store, &chain), before);
    assert_eq!(
        store.highest_synced_commit().unwrap(),
        chain.commit(4).reference()
    );
}

/// `prune_below` deletes older commits, their certificates, and every block
/// that no retained commit or certificate names; it keeps committees and
/// epoch ends.
pub fn prune_below_deletes_commits_blocks_and_certificates<S: ConsensusStore>(
    new_store: impl Fn(&Committee) -> S,
) {
    // Commit 3 ends epoch 0: its certifiers are named by no commit.
    let chain = TestChain::new(8, Some(3));
    let store = new_store(chain.genesis());
    store.write_synced_batch(chain.batch(1..=3)).unwrap();
    store.write_synced_batch(chain.batch(4..=6)).unwrap();
    store.write_synced_batch(chain.batch(7..=8)).unwrap();
    store
        .insert_certificate(2, chain.certificate(2).to_vec())
        .unwrap();
    // Commit 4's certifiers are commit 5's blocks.
    store
        .insert_certificate(4, chain.certificate(4).to_vec())
        .unwrap();
    // A retained certificate made of a pruned commit's blocks keeps them.
    store
        .insert_certificate(7, chain.blocks(3).to_vec())
        .unwrap();

    store.prune_below(5).unwrap();

    assert_eq!(store.lowest_available_commit().unwrap(), 5);
    assert_eq!(
        store.highest_synced_commit().unwrap(),
        chain.commit(8).reference()
    );
    for i in 0..=4 {
        assert!(store.commit(i).unwrap().is_none(), "commit {i}");
        assert!(store.certificate(i).unwrap().is_none(), "certificate {i}");
    }
    for i in 5..=8 {
        assert_eq!(
            store.commit(i).unwrap().unwrap().serialized(),
            chain.commit(i).serialized()
        );
        assert_blocks_stored(&store, chain.blocks(i), true);
    }
    let served = store.commits_in_range(0..=8, usize::MAX).unwrap();
    assert_eq!(
        commit_bytes(&served),
        commit_bytes(&chain.batch(5..=8).commits)
    );
    assert_eq!(store.highest_certified_in(0..=4).unwrap(), None);
    assert_eq!(store.highest_certified_in(0..=8).unwrap(), Some(8));

    assert_blocks_stored(&store, chain.blocks(1), false);
    assert_blocks_stored(&store, chain.blocks(2), false);
    assert_blocks_stored(&store, chain.blocks(4), false);
    // Certifiers of the epoch end: only the pruned certificate named them.
    assert_blocks_stored(&store, chain.certificate(3), false);
    // Held by the certificate of commit 7.
    assert_blocks_stored(&store, chain.blocks(3), true);
    let certificate = store.certificate(7).unwrap().unwrap();
    assert_eq!(block_bytes(&certificate), block_bytes(chain.blocks(3)));
    assert_blocks_stored(&store, chain.certificate(8), true);

    assert_eq!(store.committee(0).unwrap().as_ref(), Some(chain.genesis()));
    assert_eq!(
        store.committee(1).unwrap().as_ref(),
        Some(chain.next_committee())
    );
    assert_eq!(store.last_commit_of_epoch(0).unwrap(), Some(3));
    assert_eq!(
        store.insert_certificate(2, chain.certificate(2).to_vec()),
        Err(Error::UnknownCommit(2))
    );
}

/// `prune_below` never prunes the watermark commit: a higher index prunes
/// up to it, and writing goes on from it.
pub fn prune_below_clamps_at_watermark<S: ConsensusStore>(new_store: impl Fn(&Committee) -> S) {
    let chain = TestChain::new(6, None);
    let store = new_store(chain.genesis());
    store.write_synced_batch(chain.batch(1..=4)).unwrap();

    store.prune_below(100).unwrap();
    assert_eq!(store.lowest_available_commit().unwrap(), 4);
    assert_eq!(
        store.highest_synced_commit().unwrap(),
        chain.commit(4).reference()
    );
    assert!(store.commit(3).unwrap().is_none());
    assert!(store.commit(4).unwrap().is_some());
    assert_blocks_stored(&store, chain.blocks(4), true);
    let served = store.commits_in_range(0..=100, usize::MAX).unwrap();
    assert_eq!(
        commit_bytes(&served),
        commit_bytes(&chain.batch(4..=4).commits)
    );

    store.write_synced_batch(chain.batch(5..=6)).unwrap();
    assert_eq!(
        store.highest_synced_commit().unwrap(),
        chain.commit(6).reference()
    );
    store.prune_below(CommitIndex::MAX).unwrap();
    assert_eq!(store.lowest_available_commit().unwrap(), 6);
    assert!(store.commit(6).unwrap().is_some());
    assert!(store.certificate(6).unwrap().is_some());
}

/// Pruning at or below the lowest available commit changes nothing; on a
/// fresh store, pruning changes nothing.
pub fn prune_below_never_lowers_lowest<S: ConsensusStore>(new_store: impl Fn(&Committee) -> S) {
    let chain = TestChain::new(6, None);
    let store = new_store(chain.genesis());
    let fresh = snapshot(&store, &chain);
    store.prune_below(10).unwrap();
    store.prune_below(0).unwrap();
    assert_eq!(snapshot(&store, &chain), fresh);

    store.write_synced_batch(chain.batch(1..=6)).unwrap();
    let written = snapshot(&store, &chain);
    store.prune_below(0).unwrap();
    store.prune_below(1).unwrap();
    assert_eq!(snapshot(&store, &chain), written);

    store.prune_below(4).unwrap();
    assert_eq!(store.lowest_available_commit().unwrap(), 4);
    let pruned = snapshot(&store, &chain);
    store.prune_below(2).unwrap();
    store.prune_below(4).unwrap();
    assert_eq!(snapshot(&store, &chain), pruned);
}
