//! The node's way to the embedder's store. Every call the node makes goes
//! through a [`StoreGate`], which `shutdown` closes: it waits for the calls
//! under way to return, then lets go of the store, and every later call is
//! refused. On a runtime the node does not own, a store write, a prune run
//! or a read already started on the blocking pool could otherwise still
//! be running, holding the store, after `shutdown` returned: an embedder
//! reopening its database then found it in use, or closed it under a
//! write.

use std::ops::RangeInclusive;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use soma_store::{ConsensusStore, Error, Result, SyncedBatch};
use soma_types::{
    BlockRef, CommitIndex, CommitRef, Committee, Epoch, TrustedCommit, VerifiedBlock,
};

/// A [`ConsensusStore`] that passes each call to the store it was made
/// with until it is closed.
pub(crate) struct StoreGate {
    state: Mutex<Gate>,
    /// Signalled when the last call under way returns.
    idle: Condvar,
}

struct Gate {
    /// `None` once closed.
    store: Option<Arc<dyn ConsensusStore>>,
    /// Calls under way.
    calls: usize,
}

/// How long [`StoreGate::close`] waited, and whether calls were still
/// under way when it gave up.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Closed {
    /// Every call had returned; the gate no longer holds the store.
    Idle,
    /// This many calls were still under way at the deadline (a hung
    /// disk); they hold the store until they return.
    Busy(usize),
}

impl StoreGate {
    pub(crate) fn new(store: Arc<dyn ConsensusStore>) -> Self {
        StoreGate {
            state: Mutex::new(Gate {
                store: Some(store),
                calls: 0,
            }),
            idle: Condvar::new(),
        }
    }

    /// Refuses every call from now on, waits up to `limit` for the calls
    /// under way to return, and lets go of the store. Blocks: call it
    /// from a thread that may wait.
    pub(crate) fn close(&self, limit: Duration) -> Closed {
        let deadline = Instant::now() + limit;
        let mut gate = self.lock();
        gate.store = None;
        while gate.calls > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Closed::Busy(gate.calls);
            }
            gate = self
                .idle
                .wait_timeout(gate, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        Closed::Idle
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Gate> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `call` on the store, counted as under way until it returns (or
    /// panics); refused once the gate is closed.
    fn with<T>(&self, call: impl FnOnce(&dyn ConsensusStore) -> Result<T>) -> Result<T> {
        let under_way = {
            let mut gate = self.lock();
            let Some(store) = gate.store.clone() else {
                return Err(Error::Database("the node has stopped".into()));
            };
            gate.calls += 1;
            UnderWay {
                gate: self,
                store: Some(store),
            }
        };
        call(under_way.store())
    }
}

/// A call under way, holding the store; counted as returned when
/// dropped (a panic's unwinding included), once it has let go of the
/// store, so that `close` never finds the calls done while one still
/// holds it.
struct UnderWay<'a> {
    gate: &'a StoreGate,
    store: Option<Arc<dyn ConsensusStore>>,
}

impl UnderWay<'_> {
    fn store(&self) -> &dyn ConsensusStore {
        self.store.as_deref().expect("held until dropped")
    }
}

impl Drop for UnderWay<'_> {
    fn drop(&mut self) {
        drop(self.store.take());
        let mut gate = self.gate.lock();
        gate.calls -= 1;
        if gate.calls == 0 {
            self.gate.idle.notify_all();
        }
    }
}

impl ConsensusStore for StoreGate {
    /// Once closed, the highest version: no answer cached before matches
    /// it (a version is never lowered).
    fn version(&self) -> u64 {
        self.with(|s| Ok(s.version())).unwrap_or(u64::MAX)
    }
    fn highest_synced_commit(&self) -> Result<CommitRef> {
        self.with(|s| s.highest_synced_commit())
    }
    fn lowest_available_commit(&self) -> Result<CommitIndex> {
        self.with(|s| s.lowest_available_commit())
    }
    fn commit(&self, index: CommitIndex) -> Result<Option<TrustedCommit>> {
        self.with(|s| s.commit(index))
    }
    fn commits_in_range(
        &self,
        range: RangeInclusive<CommitIndex>,
        max_bytes: usize,
    ) -> Result<Vec<TrustedCommit>> {
        self.with(|s| s.commits_in_range(range, max_bytes))
    }
    fn block(&self, block: &BlockRef) -> Result<Option<VerifiedBlock>> {
        self.with(|s| s.block(block))
    }
    fn blocks(&self, refs: &[BlockRef]) -> Result<Vec<Option<VerifiedBlock>>> {
        self.with(|s| s.blocks(refs))
    }
    fn block_bytes(&self, refs: &[BlockRef], max_bytes: usize) -> Result<Vec<Option<Bytes>>> {
        self.with(|s| s.block_bytes(refs, max_bytes))
    }
    fn certificate(&self, index: CommitIndex) -> Result<Option<Vec<VerifiedBlock>>> {
        self.with(|s| s.certificate(index))
    }
    fn highest_certified_in(
        &self,
        range: RangeInclusive<CommitIndex>,
    ) -> Result<Option<CommitIndex>> {
        self.with(|s| s.highest_certified_in(range))
    }
    fn committee(&self, epoch: Epoch) -> Result<Option<Committee>> {
        self.with(|s| s.committee(epoch))
    }
    fn last_commit_of_epoch(&self, epoch: Epoch) -> Result<Option<CommitIndex>> {
        self.with(|s| s.last_commit_of_epoch(epoch))
    }
    fn write_synced_batch(&self, batch: SyncedBatch) -> Result<()> {
        self.with(|s| s.write_synced_batch(batch))
    }
    fn insert_certificate(&self, index: CommitIndex, blocks: Vec<VerifiedBlock>) -> Result<()> {
        self.with(|s| s.insert_certificate(index, blocks))
    }
    fn prune_below(&self, index: CommitIndex) -> Result<()> {
        self.with(|s| s.prune_below(index))
    }
}

#[cfg(test)]
mod tests {
    use soma_chain::{ChainBuilder, ChainConfig};
    use soma_store::MemStore;
    use soma_testkit::failing_store::FailingStore;

    use super::*;

    /// Spins until `done`, for a minute at most.
    fn wait(done: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !done() {
            assert!(Instant::now() < deadline, "waited a minute");
            std::thread::yield_now();
        }
    }

    type Writing = std::thread::JoinHandle<Result<()>>;

    /// A gate over a store of a 2-commit chain, and the write of commit 1
    /// through it, held up once stored.
    fn writing_held() -> (
        soma_chain::Chain,
        Arc<FailingStore>,
        Arc<StoreGate>,
        Writing,
    ) {
        let chain = ChainBuilder::new(ChainConfig::validators(4)).build(2);
        let store = Arc::new(FailingStore::new(MemStore::new(chain.genesis())));
        let gate = Arc::new(StoreGate::new(store.clone()));
        store.pause_after_writing(1);
        let writing = {
            let (gate, batch) = (gate.clone(), chain.batch(1..=1));
            std::thread::spawn(move || gate.write_synced_batch(batch))
        };
        wait(|| store.paused() || writing.is_finished());
        assert!(store.paused(), "the write pauses once stored");
        (chain, store, gate, writing)
    }

    /// A write under way when the gate closes is waited for and stored;
    /// then the gate holds the store no more, and refuses every call.
    #[test]
    fn closing_waits_for_the_write_under_way_then_refuses_and_lets_go() {
        let (chain, store, gate, writing) = writing_held();
        let closing = {
            let gate = gate.clone();
            std::thread::spawn(move || gate.close(Duration::from_secs(60)))
        };
        // Once closing, the gate refuses new calls (the write under way
        // still counts, so `close` is still waiting for it).
        wait(|| gate.highest_synced_commit().is_err());
        assert!(!closing.is_finished(), "close waits for the write");
        assert_eq!(
            Arc::strong_count(&store),
            2,
            "the test's, and the write's under way"
        );
        store.resume();
        assert_eq!(closing.join().unwrap(), Closed::Idle);
        writing
            .join()
            .unwrap()
            .expect("the write under way is stored");
        assert_eq!(store.inner().highest_synced_commit().unwrap().index, 1);
        assert_eq!(Arc::strong_count(&store), 1, "only the test holds it");
        let refused = gate.write_synced_batch(chain.batch(2..=2)).unwrap_err();
        assert!(refused.to_string().contains("stopped"), "{refused}");
        assert_eq!(gate.version(), u64::MAX);
    }

    /// A call that never returns (a hung disk) holds `close` only until
    /// its limit, which says how many were still under way.
    #[test]
    fn closing_gives_up_on_a_call_that_does_not_return_in_time() {
        let (_, store, gate, writing) = writing_held();
        assert_eq!(gate.close(Duration::from_millis(1)), Closed::Busy(1));
        store.resume();
        writing.join().unwrap().unwrap();
    }
}
