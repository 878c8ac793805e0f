//! Writing a batch: the one path of synced and local commits alike.
//!
//! Both become [`CommittedSubDag`]s in one atomic store write that moves
//! the watermark; the shell then installs a next committee, broadcasts the
//! sub-DAGs and pushes the height (see the actor's `applied`). They differ
//! only in where the next committee comes from: a synced batch's is derived
//! from its verified blocks (and checked), a local commit's is given by
//! local consensus. A synced batch may also overlap local commits applied
//! while it was on its way: those commits are skipped, while a local commit
//! at or below the watermark is refused.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use soma_store::{ConsensusStore, SyncedBatch};
use soma_types::verify::epoch_change;
use soma_types::{
    BlockRef, CommitRef, CommittedSubDag, Committee, Epoch, TrustedCommit, VerifiedBlock,
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
    pub(super) blocks: HashMap<BlockRef, VerifiedBlock>,
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
    /// Whether the write stored a certificate of `last`: every synced
    /// batch's does, a local commit's only if it came with one.
    pub(super) certified: bool,
}

/// Writes `batch` in one atomic store write.
pub(super) fn write(store: &dyn ConsensusStore, mut batch: Batch) -> Result<Applied, ApplyError> {
    let next_committee = match &batch.source {
        Source::Local { next_committee } => next_committee.clone(),
        Source::Synced { epoch } => {
            let watermark = store.highest_synced_commit()?;
            batch.commits.retain(|c| c.index() > watermark.index);
            if batch.commits.is_empty() {
                // Local commits covered the whole batch on its way.
                return Ok(Applied {
                    last: watermark,
                    next_committee: None,
                    subdags: Vec::new(),
                    certified: false,
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
    let certified = !batch.certificate.is_empty();
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
