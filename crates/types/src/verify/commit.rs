use std::collections::HashSet;
use std::sync::Arc;

use crate::committee::AuthoritySet;
use crate::{
    BlockRef, CommitIndex, CommitRef, Committee, Domain, Epoch, Error, KeyCache, Limits, Result,
    SignedItem, TrustedCommit, UnverifiedBlock, UnverifiedCommit, VerifiedBlock,
    verify::{Fill, SignatureBatch, check_block},
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
///   that epoch, none named by a commit before it in the batch (a block is
///   committed once), and ends with its leader;
/// - the certifier blocks pass every block rule, and the distinct authors
///   among those voting for the last commit's reference hold quorum stake.
///
/// Certifying the last commit certifies them all, through the digest chain.
/// Returns the commits and the certifier blocks, now trusted. The same as
/// [`certify_commit_run`] from `last_synced.index + 1`, then
/// [`CertifiedRun::link`] to `last_synced`, except that the first commit's
/// epoch, then whether it follows `last_synced`, are named before anything
/// else is checked.
///
/// The epoch comes first because `last_synced` may be a commit a retired
/// committee certified past its epoch's end, verified before that end was
/// applied: the true next commit, of the next epoch, does not link to it,
/// and must be reported as of another epoch (which a caller expecting the
/// end may judge later) rather than as a broken link, blamed on its sender.
pub fn verify_commit_batch(
    commits: Vec<UnverifiedCommit>,
    certifiers: Vec<UnverifiedBlock>,
    committee: &Committee,
    last_synced: CommitRef,
    limits: &Limits,
) -> Result<(Vec<TrustedCommit>, Vec<VerifiedBlock>)> {
    if let Some(first) = commits.first() {
        of_epoch(first, committee.epoch())?;
        follows(first, last_synced)?;
    }
    certify_commit_run(
        commits,
        certifiers,
        committee,
        last_synced.index + 1,
        limits,
        None,
    )?
    .link(last_synced)
}

/// A run of commits from `start` whose every rule of
/// [`verify_commit_batch`] holds but one: that its first commit links to
/// the commit before it, which is not known yet. A commit batch fetched
/// ahead of its turn is certified as it arrives, off the path of the
/// batches before it; at its turn, [`CertifiedRun::link`] checks that last
/// rule, a comparison of digests.
#[derive(Clone, Debug)]
pub struct CertifiedRun {
    commits: Vec<UnverifiedCommit>,
    certifiers: Vec<UnverifiedBlock>,
    epoch: Epoch,
}

impl CertifiedRun {
    /// The epoch of the committee that certified it.
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// Bytes of its commits and certifier blocks, as received.
    pub fn bytes(&self) -> u64 {
        let commits = self.commits.iter().map(|c| c.serialized().len() as u64);
        let certifiers = self.certifiers.iter().map(|b| b.serialized().len() as u64);
        commits.chain(certifiers).sum()
    }

    /// The run, trusted, if its first commit follows `last_synced` (the
    /// index after it, linking to its digest).
    pub fn link(self, last_synced: CommitRef) -> Result<(Vec<TrustedCommit>, Vec<VerifiedBlock>)> {
        let first = self.commits.first().ok_or(Error::EmptyBatch)?;
        follows(first, last_synced)?;
        Ok((
            self.commits
                .into_iter()
                .map(UnverifiedCommit::into_trusted)
                .collect(),
            self.certifiers
                .into_iter()
                .map(UnverifiedBlock::into_trusted)
                .collect(),
        ))
    }
}

/// A commit batch fetched ahead and refused there, kept for its turn:
/// [`RefusedRun::verdict`] then gives what [`verify_commit_batch`] would
/// say of the same commits and certifier blocks, under the same committee,
/// without checking them again. A junk answer costs one check, not two.
#[derive(Clone, Debug)]
pub struct RefusedRun {
    /// The batch's first commit, if its commits and certifier blocks
    /// decoded: the full check tests its epoch and link before the run.
    /// `None` if they did not, since decoding comes before every rule.
    first: Option<UnverifiedCommit>,
    start: CommitIndex,
    epoch: Epoch,
    error: Error,
}

impl RefusedRun {
    /// A batch whose first commit had to be `start`, refused with `error`
    /// under the committee of `epoch`: by [`certify_commit_run`] (`first`
    /// is then the batch's first commit, if it has one), or before, when
    /// its bytes did not decode (`first` is `None`).
    pub fn new(
        first: Option<UnverifiedCommit>,
        start: CommitIndex,
        epoch: Epoch,
        error: Error,
    ) -> Self {
        RefusedRun {
            first,
            start,
            epoch,
            error,
        }
    }

    /// The epoch of the committee that refused it.
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// Why it was refused ahead.
    pub fn error(&self) -> &Error {
        &self.error
    }

    /// Whether the refusal stands whatever the commits before the run
    /// turn out to be: its first commit decoded and is of the epoch whose
    /// committee refused it. Honest commits of that epoch pass under its
    /// committee, and the true commits at the run's start are of that
    /// epoch or a later one, so only a run naming a later epoch can be
    /// honest data checked too early (an epoch's end not yet known where
    /// it was checked), and the refusal's sender can be judged at once. A
    /// run refused before its commits decoded does not stand alone: that
    /// refusal may be the committee's (more certifier blocks than it has
    /// members, the honest quorum of a larger next committee).
    pub fn stands_alone(&self) -> bool {
        self.first
            .as_ref()
            .is_some_and(|first| first.commit().epoch == self.epoch)
    }

    /// The error [`verify_commit_batch`] gives the batch after
    /// `last_synced` under the committee of [`RefusedRun::epoch`]: the
    /// first commit's epoch, then its link, then the run's own error.
    /// `None` if `last_synced` is not the commit before the run's start:
    /// the batch must then be checked in full.
    pub fn verdict(&self, last_synced: CommitRef) -> Option<Error> {
        if last_synced.index.checked_add(1) != Some(self.start) {
            return None;
        }
        if let Some(first) = &self.first
            && let Err(e) = of_epoch(first, self.epoch).and_then(|()| follows(first, last_synced))
        {
            return Some(e);
        }
        Some(self.error.clone())
    }
}

/// Whether `commit` is of `epoch`.
fn of_epoch(commit: &UnverifiedCommit, epoch: Epoch) -> Result<()> {
    let c = commit.commit();
    if c.epoch != epoch {
        return Err(Error::CommitWrongEpoch {
            index: c.index,
            got: c.epoch,
            expected: epoch,
        });
    }
    Ok(())
}

/// Whether `commit` is the one right after `previous`, linking to it.
fn follows(commit: &UnverifiedCommit, previous: CommitRef) -> Result<()> {
    let c = commit.commit();
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
    Ok(())
}

/// Checks every rule of [`verify_commit_batch`] on a batch whose first
/// commit must be `start`, except the link of that first commit to the one
/// before it: that is [`CertifiedRun::link`]'s. The certifier blocks'
/// transaction signers' keys are looked up in `keys` if given (a sync's
/// certificates come from the senders of the blocks it verifies); keys not
/// held are not added, since certifier blocks come from any peer and are
/// not yet authenticated here.
pub fn certify_commit_run(
    commits: Vec<UnverifiedCommit>,
    certifiers: Vec<UnverifiedBlock>,
    committee: &Committee,
    start: CommitIndex,
    limits: &Limits,
    keys: Option<&Arc<KeyCache>>,
) -> Result<CertifiedRun> {
    if commits.is_empty() {
        return Err(Error::EmptyBatch);
    }
    if commits.len() > limits.max_commits_per_batch {
        return Err(Error::BatchTooLong {
            len: commits.len(),
            limit: limits.max_commits_per_batch,
        });
    }
    let mut previous: Option<CommitRef> = None;
    // Filled from a peer's answer before anything in it is checked: std's
    // keyed SipHash, so no peer can aim the references at one slot.
    let mut named = HashSet::new();
    for unverified in &commits {
        let c = unverified.commit();
        match previous {
            Some(p) => follows(unverified, p)?,
            None if c.index != start => {
                return Err(Error::UnexpectedIndex {
                    expected: start,
                    got: c.index,
                });
            }
            None => {}
        }
        of_epoch(unverified, committee.epoch())?;
        check_commit_blocks(unverified, committee, limits, &mut named)?;
        previous = Some(unverified.reference());
    }
    let last = previous.expect("the batch is not empty");

    // A certificate needs at most one block per authority; more is padding.
    if certifiers.len() > committee.size() {
        return Err(Error::TooManyCertifiers {
            count: certifiers.len(),
            limit: committee.size(),
        });
    }
    // Only a minimal quorum of voters is checked, and kept: blocks of this
    // epoch voting for the last commit, one per author, the largest
    // stakes first, as a server sends them. Anything more is padding the
    // peer chose to send; checked, a retired validator's junk block of
    // thousands of transactions would cost a verifier thread seconds, and
    // kept, the store's room until pruning.
    let certifiers = minimal_voters(certifiers, last, committee);
    let stake: u64 = certifiers
        .iter()
        .map(|b| committee.stake(b.block().author))
        .sum();
    if !committee.is_quorum(stake) {
        return Err(Error::NotCertified {
            index: last.index,
            stake,
            quorum: committee.quorum_threshold(),
        });
    }
    // The certifiers' own signatures first, one per block, before the
    // batch with their transactions': a forged block claims its author's
    // vote for nothing, and would have every signature of its transactions
    // (thousands) checked before the batch found it.
    let mut signed = SignatureBatch::with_capacity(certifiers.len());
    for block in &certifiers {
        let b = block.block();
        if b.epoch != committee.epoch() {
            continue; // refused by `check_block`, as of another epoch
        }
        if let Some(key) = committee.protocol_verifying_key(b.author) {
            signed.push_key(
                key,
                Domain::Block,
                &block.signing_digest(),
                &block.signed.signature,
                SignedItem::Block(block.reference()),
            );
        }
    }
    signed.verify()?;
    let signatures = certifiers
        .iter()
        .map(|b| 1 + b.block().transactions.len())
        .sum();
    let mut batch = match keys {
        Some(keys) => SignatureBatch::with_cache(signatures, keys.clone(), Fill::No),
        None => SignatureBatch::with_capacity(signatures),
    };
    for block in &certifiers {
        check_block(block, committee, limits, Some(&mut batch))?;
    }
    // Refused whole: the peer's answer goes whatever signature is bad, so
    // no search for it (one signature at a time, some twice the batch's
    // cost).
    batch.verify_whole()?;
    Ok(CertifiedRun {
        commits,
        certifiers,
        epoch: committee.epoch(),
    })
}

/// Of `certifiers`, the fewest that make a quorum of votes for `last`:
/// blocks of the committee's epoch that vote for it, the first of each
/// author, taken in order of stake, largest first (ties in the order
/// sent), until their stake is a quorum. All of them if they make none.
fn minimal_voters(
    certifiers: Vec<UnverifiedBlock>,
    last: CommitRef,
    committee: &Committee,
) -> Vec<UnverifiedBlock> {
    let mut authors = AuthoritySet::new();
    let mut voters: Vec<UnverifiedBlock> = certifiers
        .into_iter()
        .filter(|b| {
            let b = b.block();
            b.epoch == committee.epoch()
                && committee.authority(b.author).is_some()
                && b.commit_votes.contains(&last)
                && authors.insert(b.author)
        })
        .collect();
    voters.sort_by_key(|b| std::cmp::Reverse(committee.stake(b.block().author)));
    let mut stake = 0u64;
    let needed = voters
        .iter()
        .position(|b| {
            stake += committee.stake(b.block().author);
            committee.is_quorum(stake)
        })
        .map_or(voters.len(), |i| i + 1);
    voters.truncate(needed);
    voters
}

/// The rules of one commit's blocks; `named` holds the blocks the commits
/// before it in the run named: a block is committed once.
fn check_commit_blocks(
    commit: &UnverifiedCommit,
    committee: &Committee,
    limits: &Limits,
    named: &mut HashSet<BlockRef>,
) -> Result<()> {
    let c = commit.commit();
    let invalid = || Error::InvalidCommitBlocks(c.index);
    if c.blocks.is_empty() || c.blocks.len() > limits.max_blocks_per_commit {
        return Err(invalid());
    }
    if c.blocks.last() != Some(&c.leader) {
        return Err(invalid());
    }
    for r in &c.blocks {
        let valid = r.epoch == c.epoch
            && r.round > 0
            && committee.authority(r.author).is_some()
            && named.insert(*r);
        if !valid {
            return Err(invalid());
        }
    }
    Ok(())
}
