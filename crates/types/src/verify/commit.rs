use std::collections::HashSet;

use crate::{
    CommitRef, Committee, Error, Limits, Result, TrustedCommit, UnverifiedBlock, UnverifiedCommit,
    VerifiedBlock,
    verify::{SignatureBatch, check_block},
};

/// Verifies a fetched batch of commits and the certificate of its last one.
///
/// Rules:
/// - the batch is non-empty and at most `limits.max_commits_per_batch` long;
/// - the first commit is `last_synced.index + 1` and links to
///   `last_synced.digest`; each next commit is index + 1 and links to the
///   digest of the one before;
/// - every commit is of the committee's epoch (a batch never crosses an
///   epoch), names at most `limits.max_blocks_per_commit` distinct blocks of
///   that epoch, and ends with its leader;
/// - the certifier blocks pass every block rule, and the distinct authors
///   among those voting for the last commit's reference hold quorum stake.
///
/// Certifying the last commit certifies them all, through the digest chain.
/// Returns the commits and the certifier blocks, now trusted.
pub fn verify_commit_batch(
    commits: Vec<UnverifiedCommit>,
    certifiers: Vec<UnverifiedBlock>,
    committee: &Committee,
    last_synced: CommitRef,
    limits: &Limits,
) -> Result<(Vec<TrustedCommit>, Vec<VerifiedBlock>)> {
    if commits.is_empty() {
        return Err(Error::EmptyBatch);
    }
    if commits.len() > limits.max_commits_per_batch {
        return Err(Error::BatchTooLong {
            len: commits.len(),
            limit: limits.max_commits_per_batch,
        });
    }
    let mut previous = last_synced;
    for unverified in &commits {
        let c = unverified.commit();
        let expected = previous.index + 1;
        if c.index != expected {
            return Err(Error::UnexpectedIndex {
                expected,
                got: c.index,
            });
        }
        if c.previous_digest != previous.digest {
            return Err(Error::BrokenLink(c.index));
        }
        if c.epoch != committee.epoch() {
            return Err(Error::CommitWrongEpoch {
                index: c.index,
                got: c.epoch,
                expected: committee.epoch(),
            });
        }
        check_commit_blocks(unverified, committee, limits)?;
        previous = unverified.reference();
    }
    let last = previous;

    // A certificate needs at most one block per authority; more is padding.
    if certifiers.len() > committee.size() {
        return Err(Error::TooManyCertifiers {
            count: certifiers.len(),
            limit: committee.size(),
        });
    }
    let mut batch = SignatureBatch::with_capacity(certifiers.len());
    let mut voters = HashSet::with_capacity(certifiers.len());
    let mut stake = 0u64;
    for block in &certifiers {
        check_block(block, committee, limits, Some(&mut batch))?;
        let b = block.block();
        if b.commit_votes.contains(&last) && voters.insert(b.author) {
            stake += committee.stake(b.author);
        }
    }
    if !committee.is_quorum(stake) {
        return Err(Error::NotCertified {
            index: last.index,
            stake,
            quorum: committee.quorum_threshold(),
        });
    }
    batch.verify()?;
    Ok((
        commits
            .into_iter()
            .map(UnverifiedCommit::into_trusted)
            .collect(),
        certifiers
            .into_iter()
            .map(UnverifiedBlock::into_trusted)
            .collect(),
    ))
}

fn check_commit_blocks(
    commit: &UnverifiedCommit,
    committee: &Committee,
    limits: &Limits,
) -> Result<()> {
    let c = commit.commit();
    let invalid = || Error::InvalidCommitBlocks(c.index);
    if c.blocks.is_empty() || c.blocks.len() > limits.max_blocks_per_commit {
        return Err(invalid());
    }
    if c.blocks.last() != Some(&c.leader) {
        return Err(invalid());
    }
    let mut seen = HashSet::with_capacity(c.blocks.len());
    for r in &c.blocks {
        let valid = r.epoch == c.epoch
            && r.round > 0
            && committee.authority(r.author).is_some()
            && seen.insert(*r);
        if !valid {
            return Err(invalid());
        }
    }
    Ok(())
}
