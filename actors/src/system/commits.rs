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
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

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
    /// The store failed, or holds a commit without a block it names. Not
    /// final: the stream stays where it was (an executor's registered),
    /// and the next call reads the same commit again.
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
pub(crate) struct Execution {
    taken: watch::Sender<Option<CommitIndex>>,
    /// Held across each prune step and each registration, so an executor
    /// never registers below a step in progress.
    pruning: Arc<Mutex<()>>,
}

impl Execution {
    pub(crate) fn new() -> Self {
        Execution {
            taken: watch::Sender::new(None),
            pruning: Arc::default(),
        }
    }

    /// The executor's position, with the guard a prune step holds.
    pub(crate) fn hold(&self) -> (Option<CommitIndex>, MutexGuard<'_, ()>) {
        let guard = self.pruning.lock().unwrap_or_else(PoisonError::into_inner);
        (self.executed(), guard)
    }

    /// The executor's position now and each time it moves. Only the
    /// latest is kept (a watch), so a fast executor cannot flood a
    /// mailbox; the stream ends when the node is dropped.
    pub(crate) fn moves(&self) -> impl futures::Stream<Item = Option<CommitIndex>> + use<> {
        let rx = self.taken.subscribe();
        futures::stream::unfold((rx, true), |(mut rx, first)| async move {
            if !first {
                rx.changed().await.ok()?;
            }
            let taken = *rx.borrow_and_update();
            Some((taken, (rx, false)))
        })
    }

    /// The last commit the executor has taken, if one is registered.
    pub(crate) fn executed(&self) -> Option<CommitIndex> {
        *self.taken.borrow()
    }

    /// Registers an executor that has taken every commit up to `taken`,
    /// unless one is registered already or the commit after `taken` is
    /// pruned.
    fn register(&self, taken: CommitIndex, store: &dyn ConsensusStore) -> Result<(), Refused> {
        let _guard = self.pruning.lock().unwrap_or_else(PoisonError::into_inner);
        let lowest = store.lowest_available_commit().map_err(Refused::Store)?;
        if taken + 1 < lowest {
            return Err(Refused::Pruned(lowest));
        }
        let registered = self.taken.send_if_modified(|e| match e {
            Some(_) => false,
            None => {
                *e = Some(taken);
                true
            }
        });
        if registered {
            Ok(())
        } else {
            Err(Refused::Taken)
        }
    }

    fn advance(&self, taken: CommitIndex) {
        self.taken.send_if_modified(|e| match e {
            Some(at) if *at < taken => {
                *at = taken;
                true
            }
            _ => false,
        });
    }

    fn unregister(&self) {
        self.taken.send_replace(None);
    }
}

/// Why an executor could not register.
#[derive(Debug)]
pub(super) enum Refused {
    /// Another executor is registered.
    Taken,
    /// The first commit it asks for is pruned; the lowest kept.
    Pruned(CommitIndex),
    /// The store failed.
    Store(soma_store::Error),
}

/// What a [`CommitStream`] is made from.
pub(super) struct Source {
    pub(super) store: Arc<dyn ConsensusStore>,
    /// The broadcast of applied commits, subscribed to only while the
    /// stream has caught up with the store ([`CommitStream::next`]).
    pub(super) live: broadcast::WeakSender<CommittedSubDag>,
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
    /// The broadcast, subscribed to once a store read found the stream
    /// caught up, and dropped as soon as it falls behind. A receiver keeps
    /// every commit broadcast after it subscribed until it has read it, so
    /// one held while the stream reads the store (an executor far behind,
    /// say) would keep the whole broadcast ring of commits, blocks and all,
    /// in memory for as long as it is behind.
    live: Option<broadcast::Receiver<CommittedSubDag>>,
    /// Whether the next commit is read from the store (the stream is
    /// behind) rather than taken from the broadcast.
    behind: bool,
    executor: Option<Execution>,
    store_reads: u64,
}

impl CommitStream {
    /// A stream whose first commit is `from` (commit 0, the genesis
    /// commit, is never delivered: a stream from 0 starts at 1).
    pub(super) fn new(source: Source, from: CommitIndex) -> Self {
        CommitStream {
            source,
            next: from.max(1),
            buffer: VecDeque::new(),
            live: None,
            behind: true,
            executor: None,
            store_reads: 0,
        }
    }

    /// The same stream, registered as the executor.
    pub(super) fn executor(mut self, execution: &Execution) -> Result<Self, Refused> {
        execution.register(self.next - 1, self.source.store.as_ref())?;
        self.executor = Some(execution.clone());
        Ok(self)
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
    /// move on. Cancel-safe: a call dropped before it returns loses
    /// nothing (the commit is read again by the next call).
    ///
    /// After [`StreamError::Store`] the stream is where it was, and an
    /// executor's stays registered (holding sync and pruning back): the
    /// next call reads the same commit again. [`StreamError::Pruned`] and
    /// [`StreamError::Stopped`] are final: an executor's stream is
    /// unregistered then, since it cannot go on.
    pub async fn next(&mut self) -> Result<CommittedSubDag, StreamError> {
        if let Some(execution) = &self.executor {
            execution.advance(self.next - 1);
        }
        let result = self.next_commit().await;
        if let Err(StreamError::Pruned { .. } | StreamError::Stopped) = result
            && let Some(execution) = self.executor.take()
        {
            // An executor that cannot go on must not hold sync and pruning.
            // One whose read failed may: unregistered then, pruning would
            // remove the commits it has not taken while it tried again.
            execution.unregister();
        }
        result
    }

    /// Store reads made so far (one more each time the stream falls
    /// behind or catches up).
    pub fn store_reads(&self) -> u64 {
        self.store_reads
    }

    async fn next_commit(&mut self) -> Result<CommittedSubDag, StreamError> {
        loop {
            if let Some(subdag) = self.buffer.pop_front() {
                return Ok(self.deliver(subdag));
            }
            if self.behind {
                // Subscribed before the read: if the read finds the stream
                // caught up, whatever is applied after it is broadcast
                // after this subscription. Kept only then.
                let sender = self.source.live.upgrade().ok_or(StreamError::Stopped)?;
                let live = sender.subscribe();
                drop(sender);
                let read = self.read().await?;
                self.store_reads += 1;
                if read.is_empty() {
                    self.behind = false;
                    self.live = Some(live);
                }
                self.buffer = read.into();
                continue;
            }
            let Some(live) = self.live.as_mut() else {
                self.behind = true;
                continue;
            };
            let received = tokio::select! {
                r = live.recv() => r,
                _ = self.source.stopped.wait_for(|s| *s) => return Err(StreamError::Stopped),
            };
            match received {
                Ok(subdag) if subdag.commit_ref.index < self.next => {}
                Ok(subdag) if subdag.commit_ref.index == self.next => {
                    return Ok(self.deliver(subdag));
                }
                // A gap: the commits between are in the store.
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {
                    self.behind = true;
                    self.live = None;
                }
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
        match (self.source.runtime)
            .spawn_blocking(move || read_from(store.as_ref(), next, bytes))
            .await
        {
            Ok(read) => read,
            // A read that panicked is the store's failure, not the node's
            // end: the node goes on, and the next call reads again.
            Err(e) if e.is_panic() => Err(StreamError::Store(soma_store::Error::Database(
                "a store read panicked".into(),
            ))),
            Err(_) => Err(StreamError::Stopped),
        }
    }
}

impl Drop for CommitStream {
    fn drop(&mut self) {
        if let Some(execution) = &self.executor {
            execution.unregister();
        }
    }
}

/// The stored commits from `next` up to the watermark, each with its
/// blocks, stopping before `max_bytes` of commits and again before
/// `max_bytes` of blocks (at least one commit).
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
    let mut subdags = Vec::with_capacity(commits.len());
    let mut block_bytes = 0;
    for commit in &commits {
        if !subdags.is_empty() && block_bytes >= max_bytes {
            break;
        }
        let refs: &[BlockRef] = &commit.commit().blocks;
        let found = store.blocks(refs)?;
        let mut blocks = std::collections::HashMap::with_capacity(refs.len());
        for (r, block) in refs.iter().zip(found) {
            let Some(block) = block else {
                // Pruned since the commits were read, or missing: the
                // commits read whole are delivered, and the next read
                // says which.
                if !subdags.is_empty() {
                    return Ok(subdags);
                }
                let lowest = store.lowest_available_commit()?;
                if commit.index() < lowest {
                    return Err(StreamError::Pruned {
                        next: commit.index(),
                        lowest,
                    });
                }
                return Err(soma_store::Error::MissingBlock(*r).into());
            };
            block_bytes += block.serialized().len();
            blocks.insert(*r, block);
        }
        let subdag = CommittedSubDag::new(commit, |r| blocks.get(r).cloned()).map_err(|_| {
            soma_store::Error::MissingBlock(refs.first().copied().unwrap_or_default())
        })?;
        subdags.push(subdag);
    }
    Ok(subdags)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use soma_chain::{ChainBuilder, ChainConfig};
    use soma_store::MemStore;

    use super::*;

    /// Writes commits `range` of `chain` to `store` as one batch, then
    /// broadcasts each, as StateSync applies a batch.
    fn apply(
        chain: &soma_chain::Chain,
        store: &MemStore,
        live: &broadcast::Sender<CommittedSubDag>,
        range: std::ops::RangeInclusive<CommitIndex>,
    ) {
        store
            .write_synced_batch(chain.batch(range.clone()))
            .unwrap();
        for i in range {
            // No receiver is no error here: a stream subscribes when it
            // needs to.
            let _ = live.send(chain.subdag(i));
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn blocks_pruned_between_a_streams_reads_end_it_as_pruned() {
        use soma_testkit::failing_store::FailingStore;
        let chain = ChainBuilder::new(ChainConfig::validators(4)).build(200);
        let store = Arc::new(FailingStore::new(MemStore::new(chain.genesis())));
        chain.write_to(store.as_ref(), 100).unwrap();
        let (live, _) = broadcast::channel(16);
        let (_stop, stopped) = watch::channel(false);
        let source = |store: Arc<FailingStore>| Source {
            store,
            live: live.downgrade(),
            stopped: stopped.clone(),
            runtime: tokio::runtime::Handle::current(),
            read_bytes: 1 << 20,
        };
        // A prune run lands after the stream read commits 1..=200 and
        // before it read their blocks.
        store.prune_below_at_block_read(51, 0);
        let mut stream = CommitStream::new(source(store.clone()), 1);
        match stream.next().await {
            Err(StreamError::Pruned {
                next: 1,
                lowest: 51,
            }) => {}
            other => panic!(
                "expected Pruned {{ 1, 51 }}, got {:?}",
                other.map(|s| s.commit_ref)
            ),
        }
        // Landing after the blocks of commits 51 and 52 were read: those
        // two are delivered, and the next read says the rest is pruned.
        let mut stream = CommitStream::new(source(store.clone()), 51);
        store.prune_below_at_block_read(60, 2);
        for i in 51..=52 {
            assert_eq!(stream.next().await.unwrap().commit_ref, chain.commit_ref(i));
        }
        match stream.next().await {
            Err(StreamError::Pruned {
                next: 53,
                lowest: 60,
            }) => {}
            other => panic!(
                "expected Pruned {{ 53, 60 }}, got {:?}",
                other.map(|s| s.commit_ref)
            ),
        }
    }

    /// A read that fails once leaves the executor registered, holding
    /// pruning at the commit it has not taken, and the next call delivers
    /// that commit. Before, the failure unregistered it: pruning then went
    /// past commits it never executed, and its stream went on as an
    /// observer's, to be told they were pruned.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_executor_whose_read_fails_stays_registered_and_misses_nothing() {
        use soma_testkit::failing_store::FailingStore;
        let chain = ChainBuilder::new(ChainConfig::validators(4)).build(40);
        let store = Arc::new(FailingStore::new(MemStore::new(chain.genesis())));
        store.write_synced_batch(chain.batch(1..=20)).unwrap();
        let (live, _) = broadcast::channel(16);
        let (_stop, stopped) = watch::channel(false);
        let source = Source {
            store: store.clone(),
            live: live.downgrade(),
            stopped,
            runtime: tokio::runtime::Handle::current(),
            read_bytes: 1 << 20,
        };
        let execution = Execution::new();
        let mut stream = CommitStream::new(source, 1).executor(&execution).unwrap();
        for i in 1..=20 {
            assert_eq!(stream.next().await.unwrap().commit_ref, chain.commit_ref(i));
        }
        store.write_synced_batch(chain.batch(21..=40)).unwrap();
        store.fail_commit_reads(1);
        match stream.next().await {
            Err(StreamError::Store(soma_store::Error::Database(_))) => {}
            other => panic!(
                "expected a store error, got {:?}",
                other.map(|s| s.commit_ref)
            ),
        }
        assert!(stream.is_executor());
        assert_eq!(execution.executed(), Some(20));
        for i in 21..=40 {
            assert_eq!(stream.next().await.unwrap().commit_ref, chain.commit_ref(i));
        }
        assert_eq!(execution.executed(), Some(39));
        drop(live);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stream_reading_the_store_holds_no_broadcast_commits_and_misses_none() {
        let chain = ChainBuilder::new(ChainConfig::validators(4)).build(400);
        let store = Arc::new(MemStore::new(chain.genesis()));
        let (live, _) = broadcast::channel(1_024);
        let (_stop, stopped) = watch::channel(false);
        apply(&chain, &store, &live, 1..=200);
        let source = Source {
            store: store.clone(),
            live: live.downgrade(),
            stopped,
            runtime: tokio::runtime::Handle::current(),
            // About 100 commits a read.
            read_bytes: 100 * chain.commit(1).serialized().len(),
        };
        let mut stream = CommitStream::new(source, 1);
        for i in 1..=100 {
            assert_eq!(stream.next().await.unwrap().commit_ref, chain.commit_ref(i));
        }
        // Behind, reading the store: what is applied meanwhile is kept by
        // no receiver of this stream.
        apply(&chain, &store, &live, 201..=300);
        assert_eq!(
            live.len(),
            0,
            "commits kept for a stream that reads the store"
        );
        for i in 101..=300 {
            assert_eq!(stream.next().await.unwrap().commit_ref, chain.commit_ref(i));
        }
        // Caught up, the stream takes the broadcast; what is applied next
        // comes once each, in order, whichever way it is read.
        let next = tokio::spawn(async move {
            let got = stream.next().await.map(|s| s.commit_ref);
            (stream, got)
        });
        let subscribed = async || live.receiver_count() == 1;
        soma_testkit::wait_until(
            "the stream to subscribe",
            Duration::from_secs(10),
            subscribed,
        )
        .await;
        apply(&chain, &store, &live, 301..=400);
        let (mut stream, got) = next.await.unwrap();
        assert_eq!(got.unwrap(), chain.commit_ref(301));
        for i in 302..=400 {
            assert_eq!(stream.next().await.unwrap().commit_ref, chain.commit_ref(i));
        }
    }
}
