//! Helpers that break exactly one rule, for tests of verification and of
//! byzantine peers.
//!
//! Each takes honest pieces (from [`crate::Chain`]) and returns what a lying
//! peer would send instead.

use soma_types::{
    Block, Commit, CommitIndex, Committee, KeyPair, SignedBlock, UnverifiedBlock, UnverifiedCommit,
    VerifiedBlock,
};

/// The block with one bit of its signature flipped.
pub fn forge_signature(block: &VerifiedBlock) -> UnverifiedBlock {
    let mut signed = block.signed().clone();
    signed.signature.0[0] ^= 1;
    UnverifiedBlock::from_signed(signed)
}

/// The block changed by `edit` and signed again with `key`: a validly signed
/// block that breaks whatever rule `edit` breaks.
pub fn resign(
    block: &VerifiedBlock,
    key: &KeyPair,
    edit: impl FnOnce(&mut Block),
) -> UnverifiedBlock {
    let mut b = block.block().clone();
    edit(&mut b);
    UnverifiedBlock::from_signed(SignedBlock::new(b, key))
}

/// The block changed by `edit`, keeping its old (now wrong) signature.
pub fn tamper(block: &VerifiedBlock, edit: impl FnOnce(&mut Block)) -> UnverifiedBlock {
    let mut signed = block.signed().clone();
    edit(&mut signed.block);
    UnverifiedBlock::from_signed(signed)
}

/// The commit changed by `edit`, encoded again (so its digest changes too).
pub fn edit_commit(commit: &UnverifiedCommit, edit: impl FnOnce(&mut Commit)) -> UnverifiedCommit {
    let mut c = commit.commit().clone();
    edit(&mut c);
    UnverifiedCommit::from_commit(c)
}

/// The batch with commit at position `at` pointing to a wrong predecessor.
pub fn break_link(commits: &[UnverifiedCommit], at: usize) -> Vec<UnverifiedCommit> {
    let mut out = commits.to_vec();
    out[at] = edit_commit(&out[at], |c| c.previous_digest.0[0] ^= 1);
    out
}

/// The batch without commit at position `at` (a gap in the chain).
pub fn drop_commit(commits: &[UnverifiedCommit], at: usize) -> Vec<UnverifiedCommit> {
    let mut out = commits.to_vec();
    out.remove(at);
    out
}

/// Certifier blocks whose stake is the largest below quorum: one vote short.
pub fn certificate_below_quorum(
    certifiers: &[UnverifiedBlock],
    committee: &Committee,
) -> Vec<UnverifiedBlock> {
    let mut out = Vec::new();
    let mut stake = 0;
    for block in certifiers {
        let s = committee.stake(block.block().author);
        if !committee.is_quorum(stake + s) {
            stake += s;
            out.push(block.clone());
        }
    }
    out
}

/// Replaces the block at position `at` of a fetched list with `other`.
pub fn swap_block(
    blocks: &[UnverifiedBlock],
    at: usize,
    other: UnverifiedBlock,
) -> Vec<UnverifiedBlock> {
    let mut out = blocks.to_vec();
    out[at] = other;
    out
}

/// The commit index a corrupted item belongs to, for readable assertions.
pub fn index_of(commit: &UnverifiedCommit) -> CommitIndex {
    commit.commit().index
}
