//! Writing a batch: the one path of synced and local commits alike.
//!
//! Both become [`CommittedSubDag`]s in one atomic store write that moves
//! the watermark; the shell then installs a next committee, broadcasts the
//! sub-DAGs and pushes the height (see the actor's `applied`). They differ
//! only in where the next committee comes from: a synced batch's is derived
//! from its verified blocks (and checked), a local commit's is given by
//! local consensus. A synced batch may also overlap local commits applied
//! while it was on its way: those commits are skipped, while a local commit
//! at or below the watermark is refused, unless it is the very commit
//! stored there (sent again after a timeout), which is taken as done.

use serde::{Deserialize, Serialize};
use soma_store::{ConsensusStore, SyncedBatch};
use soma_types::verify::epoch_change;
use soma_types::{
    BlockRef, CommitIndex, CommitRef, CommittedSubDag, Committee, Epoch, FastMap, TrustedCommit,
    VerifiedBlock,
};
use tokio::sync::broadcast;

/// Why writing a batch failed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(rename_all = "snake_case")]
pub enum ApplyError {
    /// The store refused the write or failed.
    #[error("store: {0}")]
    Store(soma_store::Error),
    /// The batch's epoch change breaks a rule (only its last commit may end
    /// the epoch; the next committee must be of the next epoch).
    #[error("epoch change: {0}")]
    EpochChange(soma_types::Error),
    /// The store holds no committee for the batch's epoch.
    #[error("no committee for epoch {0}")]
    NoCommittee(Epoch),
    /// The batch holds no commit.
    #[error("empty batch")]
    Empty,
    /// The batch's data was dropped before it could be written.
    #[error("the batch's data is gone")]
    BatchGone,
    /// The write's task was cancelled (the node is stopping).
    #[error("the write was cancelled")]
    Cancelled,
    /// A local certificate's blocks do not hold a quorum of votes for the
    /// commit they are given for (the node could not serve it).
    #[error("the certificate of commit {0} holds no quorum of votes for it")]
    NoQuorum(CommitIndex),
    /// As many local commits as `max_local_writes` wait for the store
    /// already; try again once one is answered.
    #[error("too many local commits wait for the store")]
    Busy,
    /// A local commit sent again once its index was pruned: whether it is
    /// the one stored can no longer be told.
    #[error("commit {index} is pruned; the lowest kept is {lowest}")]
    Pruned {
        /// The commit sent.
        index: CommitIndex,
        /// The lowest commit kept.
        lowest: CommitIndex,
    },
}

impl From<soma_store::Error> for ApplyError {
    fn from(e: soma_store::Error) -> Self {
        ApplyError::Store(e)
    }
}

/// Where a batch comes from, as far as writing it is concerned.
#[derive(Clone, Debug)]
pub(super) enum Source {
    /// Fetched and verified against the committee of `epoch`.
    Synced {
        /// The epoch the commits were verified against.
        epoch: Epoch,
    },
    /// Made by local consensus, which says whether it ends the epoch.
    Local {
        /// The next committee, if the last commit ends its epoch.
        next_committee: Option<Committee>,
    },
}

/// A batch to write.
pub(super) struct Batch {
    pub(super) commits: Vec<TrustedCommit>,
    pub(super) blocks: FastMap<BlockRef, VerifiedBlock>,
    pub(super) certificate: Vec<VerifiedBlock>,
    pub(super) source: Source,
}

impl Batch {
    /// A local commit, as the handle passes it.
    pub(super) fn local(batch: SyncedBatch) -> Self {
        Batch {
            blocks: batch
                .blocks
                .into_iter()
                .map(|b| (b.reference(), b))
                .collect(),
            commits: batch.commits,
            certificate: batch.certificate,
            source: Source::Local {
                next_committee: batch.next_committee,
            },
        }
    }
}

/// What a write did.
#[derive(Clone, Debug)]
pub(super) struct Applied {
    /// The watermark after it.
    pub(super) last: CommitRef,
    /// The committee it installed, if it ended an epoch.
    pub(super) next_committee: Option<Committee>,
    /// The sub-DAGs written, in index order (none if local commits had
    /// covered the whole batch).
    pub(super) subdags: Vec<CommittedSubDag>,
    /// The commit whose certificate the write stored: every synced
    /// batch's last (also when local commits had covered it), a local
    /// commit only if it came with its certificate.
    pub(super) certified: Option<CommitRef>,
}

/// Writes `batch` in one atomic store write.
/// What `run` (work on the store, on the blocking pool) returns, or a
/// store error if it panicked: a blocking task that panics sends no
/// answer, and the actor waiting for one would wait for good.
pub(super) fn unless_panicked<T, E: From<soma_store::Error>>(
    what: &str,
    run: impl FnOnce() -> Result<T, E>,
) -> Result<T, E> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)).unwrap_or_else(|_| {
        tracing::error!("the store {what} panicked");
        Err(soma_store::Error::Database(format!("the store {what} panicked")).into())
    })
}

pub(super) fn write(store: &dyn ConsensusStore, mut batch: Batch) -> Result<Applied, ApplyError> {
    if let Source::Local { .. } = batch.source
        && let Some(done) = stored_already(store, &mut batch)?
    {
        return Ok(done);
    }
    let next_committee = match &batch.source {
        Source::Local { next_committee } => next_committee.clone(),
        Source::Synced { epoch } => {
            let watermark = store.highest_synced_commit()?;
            let batch_last = batch.commits.last().map(TrustedCommit::index);
            batch.commits.retain(|c| c.index() > watermark.index);
            if batch.commits.is_empty() {
                // Local commits covered the whole batch on its way; their
                // certificates may still be to come, and this one is
                // verified. Kept only if it certifies the commit stored.
                let certified = match batch_last {
                    Some(index) => certify(store, index, batch.certificate).unwrap_or_else(|e| {
                        // A verified certificate that does not certify the
                        // local commit at its index: two chains.
                        tracing::warn!(index, %e, "a synced certificate of local commits not kept");
                        None
                    }),
                    None => None,
                };
                return Ok(Applied {
                    last: watermark,
                    next_committee: None,
                    subdags: Vec::new(),
                    certified,
                });
            }
            let committee = store
                .committee(*epoch)?
                .ok_or(ApplyError::NoCommittee(*epoch))?;
            epoch_change(&batch.commits, &batch.blocks, &committee)
                .map_err(ApplyError::EpochChange)?
        }
    };
    let last = batch
        .commits
        .last()
        .map(TrustedCommit::reference)
        .ok_or(ApplyError::Empty)?;
    let subdags = batch
        .commits
        .iter()
        .map(|c| {
            CommittedSubDag::new(c, |r| batch.blocks.get(r).cloned()).map_err(|_| {
                let missing = c
                    .commit()
                    .blocks
                    .iter()
                    .find(|r| !batch.blocks.contains_key(r));
                soma_store::Error::MissingBlock(missing.copied().unwrap_or_default())
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let blocks = subdags
        .iter()
        .flat_map(|s| s.blocks.iter().cloned())
        .collect();
    let certified = if batch.certificate.is_empty() {
        None
    } else {
        if let Source::Local { .. } = batch.source {
            let epoch = batch.commits.last().map_or(0, |c| c.commit().epoch);
            let committee = store
                .committee(epoch)?
                .ok_or(ApplyError::NoCommittee(epoch))?;
            check_quorum(&batch.certificate, last, &committee)?;
        }
        Some(last)
    };
    store.write_synced_batch(SyncedBatch {
        commits: batch.commits,
        blocks,
        certificate: batch.certificate,
        next_committee: next_committee.clone(),
    })?;
    Ok(Applied {
        last,
        next_committee,
        subdags,
        certified,
    })
}

/// A local batch whose commits are all stored already, each the same
/// commit at its index (and the same next committee, if it ends an
/// epoch): sent again after a send that timed out once its write had
/// landed. Taken as done (its certificate stored, if it brings one), not
/// refused as not contiguous. A different commit at a stored index is left
/// to the write, which refuses it; one pruned since is refused as pruned,
/// since it can no longer be compared.
fn stored_already(
    store: &dyn ConsensusStore,
    batch: &mut Batch,
) -> Result<Option<Applied>, ApplyError> {
    let watermark = store.highest_synced_commit()?;
    let Some(last) = batch.commits.last().map(TrustedCommit::reference) else {
        return Ok(None);
    };
    if last.index > watermark.index {
        return Ok(None);
    }
    let lowest = store.lowest_available_commit()?;
    for commit in &batch.commits {
        let index = commit.index();
        if index < lowest {
            return Err(ApplyError::Pruned { index, lowest });
        }
        let stored = store.commit(index)?;
        if stored.map(|s| s.reference()) != Some(commit.reference()) {
            return Ok(None);
        }
    }
    if let Source::Local {
        next_committee: Some(next),
    } = &batch.source
        && store.committee(next.epoch())?.as_ref() != Some(next)
    {
        return Ok(None);
    }
    let certificate = std::mem::take(&mut batch.certificate);
    Ok(Some(Applied {
        last: watermark,
        next_committee: None,
        subdags: Vec::new(),
        certified: certify(store, last.index, certificate)?,
    }))
}

/// Stores `blocks` as the certificate of the stored commit `index`, if
/// they hold a quorum of votes for it; returns that commit. An empty
/// `blocks` certifies nothing (`None`).
pub(super) fn certify(
    store: &dyn ConsensusStore,
    index: CommitIndex,
    blocks: Vec<VerifiedBlock>,
) -> Result<Option<CommitRef>, ApplyError> {
    if blocks.is_empty() {
        return Ok(None);
    }
    let commit = store
        .commit(index)?
        .ok_or(soma_store::Error::UnknownCommit(index))?;
    let epoch = commit.commit().epoch;
    let committee = store
        .committee(epoch)?
        .ok_or(ApplyError::NoCommittee(epoch))?;
    check_quorum(&blocks, commit.reference(), &committee)?;
    store.insert_certificate(index, blocks)?;
    Ok(Some(commit.reference()))
}

/// Refuses a certificate the node could not serve: one whose blocks hold
/// no quorum of votes for `last` (the rule of
/// [`minimal_certificate`](crate::grpc::minimal_certificate)).
fn check_quorum(
    certificate: &[VerifiedBlock],
    last: CommitRef,
    committee: &Committee,
) -> Result<(), ApplyError> {
    crate::grpc::minimal_certificate(certificate.to_vec(), last, committee)
        .map(|_| ())
        .ok_or(ApplyError::NoQuorum(last.index))
}

/// Hands the written sub-DAGs to subscribers in index order; returns the
/// commits and blocks handed. No receiver is not an error, and a lagging
/// one is told so by the channel.
pub(super) fn publish(
    subdags: Vec<CommittedSubDag>,
    subscribers: &broadcast::Sender<CommittedSubDag>,
) -> (u64, u64) {
    let (mut commits, mut blocks) = (0, 0);
    for subdag in subdags {
        commits += 1;
        blocks += subdag.blocks.len() as u64;
        let _ = subscribers.send(subdag);
    }
    (commits, blocks)
}

#[cfg(test)]
mod tests {
    use soma_chain::{Chain, ChainBuilder, ChainConfig};
    use soma_store::MemStore;

    use super::*;

    /// Commits `range` of `chain` as one batch, with the given certificate.
    fn batch(
        chain: &Chain,
        range: std::ops::RangeInclusive<u64>,
        certificate: Vec<VerifiedBlock>,
        source: Source,
    ) -> Batch {
        let mut batch = Batch::local(SyncedBatch {
            commits: range.clone().map(|i| chain.commit(i)).collect(),
            blocks: range.flat_map(|i| chain.blocks_of(i).to_vec()).collect(),
            certificate,
            next_committee: None,
        });
        batch.source = source;
        batch
    }

    fn local() -> Source {
        Source::Local {
            next_committee: None,
        }
    }

    #[test]
    fn a_local_certificate_short_of_a_quorum_is_refused_and_nothing_written() {
        let chain = ChainBuilder::new(ChainConfig::validators(4)).build(2);
        let store = MemStore::new(chain.genesis());
        let short = chain.certificate(1)[..2].to_vec();
        let refused = write(&store, batch(&chain, 1..=1, short, local()));
        assert_eq!(refused.err(), Some(ApplyError::NoQuorum(1)));
        assert_eq!(store.highest_synced_commit().unwrap().index, 0);
        let full = chain.certificate(1).to_vec();
        let applied = write(&store, batch(&chain, 1..=1, full, local())).unwrap();
        assert_eq!(applied.certified, Some(chain.commit_ref(1)));
        // Without a certificate: stored, not certified.
        let applied = write(&store, batch(&chain, 2..=2, Vec::new(), local())).unwrap();
        assert_eq!(
            (applied.last, applied.certified),
            (chain.commit_ref(2), None)
        );
    }

    /// A local commit sent again, as a caller does after a send that
    /// timed out once the write had landed, is taken as done, and its
    /// certificate kept if it brings one; another commit at a stored index
    /// is still refused.
    #[test]
    fn a_local_commit_sent_again_is_taken_as_done_and_another_refused() {
        let chain = ChainBuilder::new(ChainConfig::validators(4)).build(3);
        let store = MemStore::new(chain.genesis());
        write(&store, batch(&chain, 1..=3, Vec::new(), local())).unwrap();
        let version = store.version();
        let again = write(&store, batch(&chain, 2..=2, Vec::new(), local())).unwrap();
        assert_eq!(
            (again.last, again.subdags.len(), again.certified),
            (chain.commit_ref(3), 0, None)
        );
        assert_eq!(store.version(), version, "nothing written");
        let certificate = chain.certificate(3).to_vec();
        let again = write(&store, batch(&chain, 3..=3, certificate, local())).unwrap();
        assert_eq!(again.certified, Some(chain.commit_ref(3)));
        assert!(store.certificate(3).unwrap().is_some());
        // A commit of another chain at index 2 is not the one stored.
        let other = ChainBuilder::new(ChainConfig {
            transactions_per_block: 3,
            ..ChainConfig::validators(4)
        })
        .build(2);
        assert_ne!(other.commit_ref(2), chain.commit_ref(2));
        let refused = write(&store, batch(&other, 2..=2, Vec::new(), local()));
        assert!(
            matches!(
                refused,
                Err(ApplyError::Store(soma_store::Error::NotContiguous { .. }))
            ),
            "{refused:?}"
        );
        assert_eq!(store.highest_synced_commit().unwrap(), chain.commit_ref(3));
        // Pruned since, it can no longer be compared: refused as pruned.
        store.prune_below(3).unwrap();
        let pruned = write(&store, batch(&chain, 2..=2, Vec::new(), local()));
        assert_eq!(
            pruned.err(),
            Some(ApplyError::Pruned {
                index: 2,
                lowest: 3
            })
        );
    }

    #[test]
    fn a_synced_batch_covered_by_local_commits_still_gives_them_its_certificate() {
        let chain = ChainBuilder::new(ChainConfig::validators(4)).build(10);
        let store = MemStore::new(chain.genesis());
        write(&store, batch(&chain, 1..=10, Vec::new(), local())).unwrap();
        let synced = || Source::Synced { epoch: 0 };
        // A certificate that is not one of commit 10: not kept.
        let wrong = chain.certificate(9).to_vec();
        let applied = write(&store, batch(&chain, 1..=10, wrong, synced())).unwrap();
        assert_eq!(
            (applied.last, applied.certified),
            (chain.commit_ref(10), None)
        );
        assert!(store.certificate(10).unwrap().is_none());
        let right = chain.certificate(10).to_vec();
        let applied = write(&store, batch(&chain, 1..=10, right, synced())).unwrap();
        assert!(applied.subdags.is_empty());
        assert_eq!(applied.certified, Some(chain.commit_ref(10)));
        assert_eq!(store.highest_certified_in(1..=10).unwrap(), Some(10));
    }
}
