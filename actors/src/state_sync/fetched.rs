//! What the StateSync shell holds between a fetch and the write: verified
//! commit batches with the blocks fetched so far, and commit answers
//! fetched ahead (certified as they arrived if they were of the epoch then
//! expected), whose link to the batch before them is checked at their
//! turn. The core counts all of it against the fetch budget and says when to use or drop it; this only
//! keeps it, and turns a worker's result into the core's input.

use std::collections::{BTreeMap, HashMap};

use soma_types::CommitIndex;

use super::apply::Batch;
use super::messages::{AheadDone, BlocksDone, CommitsDone, Input, TaskId};
use super::worker::{BatchData, BlockChunk, CommitAnswer};

#[derive(Default)]
pub(super) struct Fetched {
    /// Verified commit batches by first index, until applied.
    batches: BTreeMap<CommitIndex, BatchData>,
    /// Commit answers fetched ahead, by task, until their turn or forgotten.
    ahead: HashMap<TaskId, CommitAnswer>,
}

impl Fetched {
    /// A commit fetch ended. Its batch is kept only if the core `awaited`
    /// the task: a late answer (a dropped task's, a failed incarnation's)
    /// must not replace a live batch's.
    pub(super) fn commits_done(&mut self, done: CommitsDone, awaited: bool) -> Input {
        let result = done.result.map(|data| {
            let info = data.info();
            if awaited {
                self.batches.insert(info.start, data);
            }
            info
        });
        let (task, peer) = (done.task, done.peer);
        Input::CommitsFetched { task, peer, result }
    }

    /// A commit fetch ahead ended; kept as fetched batches are.
    pub(super) fn ahead_done(&mut self, done: AheadDone, awaited: bool) -> Input {
        let result = done.result.map(|answer| {
            let bytes = answer.held_bytes();
            if awaited {
                self.ahead.insert(done.task, answer);
            }
            bytes
        });
        let (task, peer) = (done.task, done.peer);
        Input::CommitsPrefetched { task, peer, result }
    }

    /// A block fetch ended: its blocks join their batch if the core
    /// `awaited` the task (a dropped task's blocks may be of an older batch
    /// that started at the same commit, and would not be counted). Returns
    /// the core's inputs (the fetch's, then the batch's refusal if the
    /// blocks show it breaks a rule) and the bytes kept.
    pub(super) fn blocks_done(&mut self, done: BlocksDone, awaited: bool) -> (Vec<Input>, u64) {
        let mut kept = 0;
        let mut broken = None;
        let batch = done.batch;
        let result = done.result.map(|blocks| {
            if let Some(d) = self.batches.get_mut(&batch).filter(|_| awaited) {
                (kept, broken) = d.add(blocks);
            }
            kept
        });
        let (task, peer) = (done.task, done.peer);
        let mut inputs = vec![Input::BlocksFetched { task, peer, result }];
        inputs.extend(broken.map(|error| Input::BatchBroken {
            start: done.batch,
            error,
        }));
        (inputs, kept)
    }

    /// The answer fetched ahead by `task`, to be checked now.
    pub(super) fn take_ahead(&mut self, task: TaskId) -> Option<CommitAnswer> {
        self.ahead.remove(&task)
    }

    /// Drops the answer fetched ahead by `task`.
    pub(super) fn forget_ahead(&mut self, task: TaskId) {
        self.ahead.remove(&task);
    }

    /// Blocks `offset..offset + len` of the batch starting at `batch`.
    pub(super) fn chunk(
        &self,
        batch: CommitIndex,
        (offset, len, max_bytes): (usize, usize, u64),
    ) -> Option<BlockChunk> {
        let data = self.batches.get(&batch)?;
        Some(data.chunk(batch, offset, len, max_bytes))
    }

    /// The batch starting at `start`, to write.
    pub(super) fn take_batch(&mut self, start: CommitIndex) -> Option<Batch> {
        self.batches.remove(&start).map(BatchData::into_batch)
    }

    /// Drops the batch starting at `start`.
    pub(super) fn discard(&mut self, start: CommitIndex) {
        self.batches.remove(&start);
    }

    /// Drops every batch (the core reset its pipeline).
    pub(super) fn reset(&mut self) {
        self.batches.clear();
    }

    /// Drops everything (the actor restarts).
    pub(super) fn clear(&mut self) {
        self.batches.clear();
        self.ahead.clear();
    }
}
