//! Lossless delivery of applied commits: [`CommitStream`].
//!
//! A stream delivers every commit from a chosen index on, exactly once and
//! in index order. While it is behind it reads the store, a bounded batch
//! at a time; once it has caught up it takes commits from the live
//! broadcast. It subscribes to the broadcast before it first reads the
//! store, and it delivers by index, not by arrival: a broadcast commit at
//! or below the last one delivered is skipped, and a gap (the broadcast
//! lagged, or the stream was reading the store when a commit went by)
//! sends it back to the store. So the switch in either direction can
//! neither lose nor repeat a commit.
//!
//! One stream may register as the node's executor
//! ([`super::P2pHandle::subscribe_executor_from`]): state sync then fetches
//! at most `max_lead_over_execution` commits past the last commit the
//! executor has taken, and pruning never removes a commit it has not been
//! given yet.

use std::collections::VecDeque;
use std::sync::Arc;

use soma_store::ConsensusStore;
use soma_types::{BlockRef, CommitIndex, CommittedSubDag};
use tokio::sync::{broadcast, watch};

/// Why a [`CommitStream`] cannot deliver the next commit.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    /// The next commit was pruned from the store: the stream is behind
    /// the node's retention (only an executor is protected from that).
    #[error("commit {next} is pruned; the lowest stored is {lowest}")]
    Pruned {
        /// The commit the stream needed.
        next: CommitIndex,
        /// The lowest commit the store holds.
        lowest: CommitIndex,
    },
    /// The store failed, or holds a commit without a block it names.
    #[error("store: {0}")]
    Store(soma_store::Error),
    /// The node stopped.
    #[error("the node stopped")]
    Stopped,
}

impl From<soma_store::Error> for StreamError {
    fn from(e: soma_store::Error) -> Self {
        StreamError::Store(e)
    }
}

/// The registered executor's progress, shared by the handle's streams and
/// state sync: `None` while no executor is registered, otherwise the last
/// commit the executor has taken (it has executed every commit before the
/// one it holds).
#[derive(Clone, Debug)]
pub(crate) struct Execution(watch::Sender<Option<CommitIndex>>);

impl Execution {
    pub(crate) fn new() -> Self {
        Execution(watch::Sender::new(None))
    }

    /// Where the executor is, as state sync and pruning see it.
    pub(crate) fn subscribe(&self) -> watch::Receiver<Option<CommitIndex>> {
        self.0.subscribe()
    }

    /// The last commit the executor has taken, if one is registered.
    pub(crate) fn executed(&self) -> Option<CommitIndex> {
        *self.0.borrow()
    }

    /// Registers an executor that has taken every commit up to `taken`;
    /// false if one is registered already.
    fn register(&self, taken: CommitIndex) -> bool {
        self.0.send_if_modified(|e| match e {
            Some(_) => false,
            None => {
                *e = Some(taken);
                true
            }
        })
    }

    fn advance(&self, taken: CommitIndex) {
        self.0.send_if_modified(|e| match e {
            Some(at) if *at < taken => {
                *at = taken;
                true
            }
            _ => false,
        });
    }

    fn unregister(&self) {
        self.0.send_replace(None);
    }
}

/// What a [`CommitStream`] is made from.
pub(super) struct Source {
    pub(super) store: Arc<dyn ConsensusStore>,
    pub(super) live: broadcast::Receiver<CommittedSubDag>,
    pub(super) stopped: watch::Receiver<bool>,
    pub(super) runtime: tokio::runtime::Handle,
    /// Bytes of commits one store read brings at most (its blocks on top).
    pub(super) read_bytes: usize,
}

/// Every applied commit from a given index on, exactly once, in order.
///
/// Made by [`super::P2pHandle::subscribe_synced_commits_from`] (an
/// observer) or [`super::P2pHandle::subscribe_executor_from`] (the
/// executor, which holds sync back and pruning off). Dropping an executor's
/// stream unregisters it.
pub struct CommitStream {
    source: Source,
    /// The index of the next commit to deliver.
    next: CommitIndex,
    /// Commits read from the store, not delivered yet.
    buffer: VecDeque<CommittedSubDag>,
    /// Whether the next commit is read from the store (the stream is
    /// behind) rather than taken from the broadcast.
    behind: bool,
    executor: Option<Execution>,
}

impl CommitStream {
    /// A stream whose first commit is `from` (commit 0, the genesis
    /// commit, is never delivered: a stream from 0 starts at 1).
    pub(super) fn new(source: Source, from: CommitIndex) -> Self {
        CommitStream {
            source,
            next: from.max(1),
            buffer: VecDeque::new(),
            behind: true,
            executor: None,
        }
    }

    /// The same stream, registered as the executor; `None` if an executor
    /// is registered already.
    pub(super) fn executor(mut self, execution: &Execution) -> Option<Self> {
        if !execution.register(self.next - 1) {
            return None;
        }
        self.executor = Some(execution.clone());
        Some(self)
    }

    /// The index of the commit the next call delivers.
    pub fn next_index(&self) -> CommitIndex {
        self.next
    }

    /// Whether this stream is the registered executor.
    pub fn is_executor(&self) -> bool {
        self.executor.is_some()
    }

    /// The next commit. An executor's call also tells the node that every
    /// commit delivered before has been executed: its lead and pruning
    /// move on.
    pub async fn next(&mut self) -> Result<CommittedSubDag, StreamError> {
        if let Some(execution) = &self.executor {
            execution.advance(self.next - 1);
        }
        loop {
            if let Some(subdag) = self.buffer.pop_front() {
                return Ok(self.deliver(subdag));
            }
            if self.behind {
                let read = self.read().await?;
                if read.is_empty() {
                    // Caught up: whatever is applied next is broadcast
                    // after this subscriber subscribed.
                    self.behind = false;
                }
                self.buffer = read.into();
                continue;
            }
            let received = tokio::select! {
                r = self.source.live.recv() => r,
                _ = self.source.stopped.wait_for(|s| *s) => return Err(StreamError::Stopped),
            };
            match received {
                Ok(subdag) if subdag.commit_ref.index < self.next => {}
                Ok(subdag) if subdag.commit_ref.index == self.next => {
                    return Ok(self.deliver(subdag));
                }
                // A gap: the commits between are in the store.
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => self.behind = true,
                Err(broadcast::error::RecvError::Closed) => return Err(StreamError::Stopped),
            }
        }
    }

    fn deliver(&mut self, subdag: CommittedSubDag) -> CommittedSubDag {
        self.next = subdag.commit_ref.index + 1;
        subdag
    }

    /// The stored commits from the next on, at most `read_bytes` of them;
    /// empty once the stream has caught up with the watermark.
    async fn read(&self) -> Result<Vec<CommittedSubDag>, StreamError> {
        let (store, next, bytes) = (self.source.store.clone(), self.next, self.source.read_bytes);
        self.source
            .runtime
            .spawn_blocking(move || read_from(store.as_ref(), next, bytes))
            .await
            .map_err(|_| StreamError::Stopped)?
    }
}

impl Drop for CommitStream {
    fn drop(&mut self) {
        if let Some(execution) = &self.executor {
            execution.unregister();
        }
    }
}

/// The stored commits from `next` up to the watermark, stopping before
/// `max_bytes` of commits (at least one), each with its blocks.
fn read_from(
    store: &dyn ConsensusStore,
    next: CommitIndex,
    max_bytes: usize,
) -> Result<Vec<CommittedSubDag>, StreamError> {
    let watermark = store.highest_synced_commit()?.index;
    if next > watermark {
        return Ok(Vec::new());
    }
    let commits = store.commits_in_range(next..=watermark, max_bytes)?;
    if commits.first().map(|c| c.index()) != Some(next) {
        let lowest = store.lowest_available_commit()?;
        return Err(StreamError::Pruned { next, lowest });
    }
    let refs: Vec<BlockRef> = commits
        .iter()
        .flat_map(|c| c.commit().blocks.iter().copied())
        .collect();
    let found = store.blocks(&refs)?;
    let blocks: std::collections::HashMap<BlockRef, _> = refs
        .into_iter()
        .zip(found)
        .filter_map(|(r, b)| Some((r, b?)))
        .collect();
    commits
        .iter()
        .map(|c| {
            CommittedSubDag::new(c, |r| blocks.get(r).cloned()).map_err(|_| {
                let missing = c.commit().blocks.iter().find(|r| !blocks.contains_key(r));
                StreamError::Store(soma_store::Error::MissingBlock(
                    missing.copied().unwrap_or_default(),
                ))
            })
        })
        .collect()
}
