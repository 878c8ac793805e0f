use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};
use soma_types::{CommitIndex, CommitRef, Epoch, PeerId, batch_end};

use super::messages::*;
use crate::{Core, Time};

/// State sync's tunable settings (the design's defaults).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Config {
    /// Commits per batch; batches end on its multiples.
    pub commit_sync_batch_size: u64,
    /// Block fetches running at once.
    pub parallel_fetches: usize,
    /// Fetches sent to one peer at once at most: a node serves each peer
    /// only so many (its `max-concurrent-fetches-per-peer`, 4 by default)
    /// and refuses the rest, which would cost a retry and the peer's score.
    #[serde(default = "default_max_fetches_per_peer")]
    pub max_fetches_per_peer: usize,
    /// Batches fetched beyond the applied watermark at most.
    pub batches_ahead: usize,
    /// Bytes of fetched, not yet applied blocks at most.
    pub max_total_fetched_bytes: u64,
    /// Blocks asked for in one FetchBlocks.
    pub max_blocks_per_fetch: usize,
    /// How long to wait when no peer can serve, in milliseconds.
    pub wait_interval_when_no_peer_ms: u64,
    /// Restarts of one task within `restart_window_ms` before its range
    /// goes to another peer.
    pub max_restarts: u32,
    /// The window of the restart intensity limit, in milliseconds.
    pub restart_window_ms: u64,
    /// First wait before a restart, doubled per restart, in milliseconds.
    pub restart_backoff_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            commit_sync_batch_size: 100,
            parallel_fetches: 8,
            max_fetches_per_peer: default_max_fetches_per_peer(),
            batches_ahead: 32,
            max_total_fetched_bytes: 128 << 20,
            max_blocks_per_fetch: 1_000,
            wait_interval_when_no_peer_ms: 1_000,
            max_restarts: 3,
            restart_window_ms: 10_000,
            restart_backoff_ms: 50,
        }
    }
}

fn default_max_fetches_per_peer() -> usize {
    4
}

/// Everything a StateSync core is made from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Init {
    /// Tunable settings.
    pub config: Config,
    /// The stored watermark.
    pub synced: CommitRef,
    /// The epoch of the next commit to sync (the last committee installed).
    pub epoch: Epoch,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum ChunkState {
    Pending,
    InFlight(TaskId),
    Done(u64),
}

#[derive(Clone, Debug)]
struct Chunk {
    offset: usize,
    len: usize,
    state: ChunkState,
    supervision: Supervision,
}

#[derive(Clone, Debug)]
struct Batch {
    /// Last commit of the batch.
    end: CommitIndex,
    chunks: Vec<Chunk>,
}

impl Batch {
    fn complete(&self) -> bool {
        self.chunks
            .iter()
            .all(|c| matches!(c.state, ChunkState::Done(_)))
    }

    fn bytes(&self) -> u64 {
        self.chunks
            .iter()
            .map(|c| match c.state {
                ChunkState::Done(b) => b,
                _ => 0,
            })
            .sum()
    }
}

/// The restart policy of one unit of work (OTP style): failures within a
/// window are retried with doubling backoff; past the intensity limit the
/// work goes to another peer and the peer is avoided for it.
#[derive(Clone, Debug, Default)]
struct Supervision {
    failures: Vec<Time>,
    retry_at: Time,
    avoid: BTreeSet<PeerId>,
}

impl Supervision {
    fn failed(&mut self, now: Time, peer: Option<PeerId>, failure: &Failure, config: &Config) {
        match failure {
            Failure::NoPeer => {
                self.retry_at = Time(now.0 + config.wait_interval_when_no_peer_ms);
                // Nobody could serve: give every peer another chance.
                self.avoid.clear();
                return;
            }
            Failure::UnknownEpoch(_) => return,
            Failure::Invalid(_) => {
                // A liar is never asked again for this work.
                self.avoid.extend(peer);
            }
            Failure::Timeout | Failure::Error(_) | Failure::Panicked => {}
        }
        self.failures
            .retain(|t| now.0.saturating_sub(t.0) < config.restart_window_ms);
        self.failures.push(now);
        let restarts = self.failures.len() as u32;
        if restarts > config.max_restarts {
            // Past the intensity limit: hand the work to another peer.
            self.avoid.extend(peer);
            self.failures.clear();
            self.retry_at = now;
        } else {
            let backoff = config.restart_backoff_ms << (restarts.saturating_sub(1)).min(10);
            self.retry_at = Time(now.0 + backoff);
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Task {
    Commits,
    Blocks { batch: CommitIndex, chunk: usize },
}

/// The logic of state sync: what to fetch next, from whom to retry, and
/// when a batch is ready to apply.
pub struct StateSyncCore {
    config: Config,
    /// The applied watermark.
    synced: CommitRef,
    /// The epoch whose committee is installed last.
    epoch: Epoch,
    highest_known: CommitIndex,
    /// The end of the last verified commit batch (the next must link to it).
    verified: CommitRef,
    /// The commit stage: at most one fetch at a time.
    commit_task: Option<TaskId>,
    commit_supervision: Supervision,
    /// Set when the next commits are of an epoch not installed yet.
    waiting_for_epoch: Option<Epoch>,
    batches: BTreeMap<CommitIndex, Batch>,
    tasks: HashMap<TaskId, Task>,
    applying: Option<CommitIndex>,
    next_task: TaskId,
}

impl Core for StateSyncCore {
    const NAME: &'static str = "state_sync";
    type Init = Init;
    type Input = Input;
    type Output = Output;

    fn new(init: Init) -> Self {
        StateSyncCore {
            config: init.config,
            synced: init.synced,
            epoch: init.epoch,
            highest_known: init.synced.index,
            verified: init.synced,
            commit_task: None,
            commit_supervision: Supervision::default(),
            waiting_for_epoch: None,
            batches: BTreeMap::new(),
            tasks: HashMap::new(),
            applying: None,
            next_task: 0,
        }
    }

    fn handle(&mut self, now: Time, input: Input) -> Vec<Output> {
        let mut out = Vec::new();
        match input {
            Input::Tick { highest_known } => {
                self.highest_known = self.highest_known.max(highest_known.unwrap_or(0));
            }
            Input::CommitsFetched { task, peer, result } => {
                if self.tasks.remove(&task).is_some() {
                    self.commit_task = None;
                    self.commits_fetched(now, task, peer, result, &mut out);
                }
            }
            Input::BlocksFetched { task, peer, result } => {
                if let Some(Task::Blocks { batch, chunk }) = self.tasks.remove(&task) {
                    self.blocks_fetched(now, task, peer, batch, chunk, result, &mut out);
                }
            }
            Input::Applied {
                start,
                last,
                next_epoch,
            } => {
                self.applying = None;
                self.batches.remove(&start);
                self.advance(last, next_epoch);
            }
            Input::ApplyFailed { start, reason } => {
                tracing::warn!(start, %reason, "applying a batch failed; refetching");
                self.applying = None;
                self.reset(&mut out);
            }
            Input::LocalApplied { last, next_epoch } => {
                self.advance(last, next_epoch);
                if self.verified.index < last.index {
                    // Local consensus moved past what sync planned.
                    self.reset(&mut out);
                } else {
                    self.discard_applied(&mut out);
                }
            }
        }
        self.schedule(now, &mut out);
        out
    }
}

impl StateSyncCore {
    /// The applied watermark.
    pub fn synced(&self) -> CommitRef {
        self.synced
    }

    /// The highest commit known among peers.
    pub fn highest_known(&self) -> CommitIndex {
        self.highest_known
    }

    fn advance(&mut self, last: CommitRef, next_epoch: Option<Epoch>) {
        if last.index > self.synced.index {
            self.synced = last;
        }
        if let Some(e) = next_epoch {
            self.epoch = self.epoch.max(e);
        }
        if self.waiting_for_epoch.is_some_and(|e| e <= self.epoch) {
            self.waiting_for_epoch = None;
        }
        self.highest_known = self.highest_known.max(self.synced.index);
    }

    /// Drops the batches that local commits have wholly covered. A batch
    /// the watermark falls inside stays: applying it writes only the commits
    /// after the watermark.
    fn discard_applied(&mut self, out: &mut Vec<Output>) {
        let covered: Vec<CommitIndex> = self
            .batches
            .iter()
            .filter(|(start, b)| b.end <= self.synced.index && self.applying != Some(**start))
            .map(|(start, _)| *start)
            .collect();
        for start in covered {
            self.batches.remove(&start);
            self.tasks
                .retain(|_, t| !matches!(t, Task::Blocks { batch, .. } if *batch == start));
            out.push(Output::Discard { start });
        }
    }

    /// Forgets every batch after the watermark, to fetch them again.
    fn reset(&mut self, out: &mut Vec<Output>) {
        self.batches.clear();
        self.tasks.clear();
        self.commit_task = None;
        self.verified = self.synced;
        self.waiting_for_epoch = None;
        out.push(Output::Reset);
    }

    fn commits_fetched(
        &mut self,
        now: Time,
        task: TaskId,
        peer: Option<PeerId>,
        result: Result<CommitBatchInfo, Failure>,
        out: &mut Vec<Output>,
    ) {
        match result {
            Ok(info) if info.start == self.verified.index + 1 && info.end >= info.start => {
                self.commit_supervision = Supervision::default();
                self.verified = info.last;
                let step = self.config.max_blocks_per_fetch.max(1);
                let chunks = (0..info.block_count)
                    .step_by(step)
                    .map(|offset| Chunk {
                        offset,
                        len: step.min(info.block_count - offset),
                        state: ChunkState::Pending,
                        supervision: Supervision::default(),
                    })
                    .collect();
                self.batches.insert(
                    info.start,
                    Batch {
                        end: info.end,
                        chunks,
                    },
                );
            }
            // A stale answer (after a reset): ignore it.
            Ok(_) => {}
            Err(Failure::UnknownEpoch(e)) => self.waiting_for_epoch = Some(e),
            Err(failure) => {
                self.commit_supervision
                    .failed(now, peer, &failure, &self.config);
                if !matches!(failure, Failure::NoPeer) {
                    out.push(Output::Restarted { task, failure });
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn blocks_fetched(
        &mut self,
        now: Time,
        task: TaskId,
        peer: Option<PeerId>,
        batch: CommitIndex,
        chunk: usize,
        result: Result<u64, Failure>,
        out: &mut Vec<Output>,
    ) {
        let Some(c) = self
            .batches
            .get_mut(&batch)
            .and_then(|b| b.chunks.get_mut(chunk))
        else {
            return;
        };
        match result {
            Ok(bytes) => c.state = ChunkState::Done(bytes),
            Err(failure) => {
                c.state = ChunkState::Pending;
                c.supervision.failed(now, peer, &failure, &self.config);
                if !matches!(failure, Failure::NoPeer) {
                    out.push(Output::Restarted { task, failure });
                }
            }
        }
    }

    fn task(&mut self, task: Task) -> TaskId {
        let id = self.next_task;
        self.next_task += 1;
        self.tasks.insert(id, task);
        id
    }

    fn fetched_bytes(&self) -> u64 {
        self.batches.values().map(Batch::bytes).sum()
    }

    /// Starts whatever work is due: the next apply, the next commit fetch,
    /// and block fetches up to the limits.
    fn schedule(&mut self, now: Time, out: &mut Vec<Output>) {
        // Apply strictly in order. The next batch may start at or below the
        // watermark when local commits covered part of it.
        if self.applying.is_none()
            && let Some((&start, batch)) = self.batches.first_key_value()
            && start <= self.synced.index + 1
            && batch.end > self.synced.index
            && batch.complete()
        {
            self.applying = Some(start);
            out.push(Output::Apply { start });
        }

        // Commits: one fetch at a time, within the read-ahead bound.
        let start = self.verified.index + 1;
        if self.commit_task.is_none()
            && self.waiting_for_epoch.is_none()
            && start <= self.highest_known
            && self.batches.len() < self.config.batches_ahead
            && self.commit_supervision.retry_at <= now
        {
            let end = batch_end(
                start,
                self.config.commit_sync_batch_size,
                None,
                self.highest_known,
            );
            let avoid = self.commit_supervision.avoid.iter().copied().collect();
            let task = self.task(Task::Commits);
            self.commit_task = Some(task);
            out.push(Output::FetchCommits {
                task,
                start,
                end,
                after: self.verified,
                avoid,
            });
        }

        // Blocks: oldest batches first, within the parallelism and byte bounds.
        let running = self
            .tasks
            .values()
            .filter(|t| matches!(t, Task::Blocks { .. }))
            .count();
        let mut due = Vec::new();
        'batches: for (&start, batch) in &self.batches {
            for (i, chunk) in batch.chunks.iter().enumerate() {
                if running + due.len() >= self.config.parallel_fetches {
                    break 'batches;
                }
                if chunk.state == ChunkState::Pending && chunk.supervision.retry_at <= now {
                    due.push((start, i));
                }
            }
        }
        if self.fetched_bytes() >= self.config.max_total_fetched_bytes {
            // Only the batch next in line may still fetch: it frees memory.
            let next = self.synced.index + 1;
            due.retain(|(start, _)| *start == next);
        }
        for (start, i) in due {
            let task = self.task(Task::Blocks {
                batch: start,
                chunk: i,
            });
            let Some(chunk) = self
                .batches
                .get_mut(&start)
                .and_then(|b| b.chunks.get_mut(i))
            else {
                continue;
            };
            chunk.state = ChunkState::InFlight(task);
            out.push(Output::FetchBlocks {
                task,
                batch: start,
                offset: chunk.offset,
                len: chunk.len,
                avoid: chunk.supervision.avoid.iter().copied().collect(),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use soma_types::Digest;

    use super::*;

    fn r(index: u64) -> CommitRef {
        CommitRef {
            index,
            digest: Digest([index as u8; 32]),
        }
    }

    fn core(config: Config) -> StateSyncCore {
        StateSyncCore::new(Init {
            config,
            synced: r(0),
            epoch: 0,
        })
    }

    fn config() -> Config {
        Config {
            commit_sync_batch_size: 10,
            parallel_fetches: 3,
            batches_ahead: 4,
            max_blocks_per_fetch: 5,
            ..Config::default()
        }
    }

    fn tick(c: &mut StateSyncCore, now: u64, highest: u64) -> Vec<Output> {
        c.handle(
            Time(now),
            Input::Tick {
                highest_known: Some(highest),
            },
        )
    }

    fn commit_fetch(out: &[Output]) -> Option<(TaskId, u64, u64)> {
        out.iter().find_map(|o| match o {
            Output::FetchCommits {
                task, start, end, ..
            } => Some((*task, *start, *end)),
            _ => None,
        })
    }

    /// A block fetch's task, batch and offset.
    type BlockFetch = (TaskId, u64, usize);

    fn block_fetches(out: &[Output]) -> Vec<BlockFetch> {
        out.iter()
            .filter_map(|o| match o {
                Output::FetchBlocks {
                    task,
                    batch,
                    offset,
                    ..
                } => Some((*task, *batch, *offset)),
                _ => None,
            })
            .collect()
    }

    fn commits_ok(
        c: &mut StateSyncCore,
        now: u64,
        task: TaskId,
        start: u64,
        end: u64,
        blocks: usize,
    ) -> Vec<Output> {
        c.handle(
            Time(now),
            Input::CommitsFetched {
                task,
                peer: Some(PeerId([1; 32])),
                result: Ok(CommitBatchInfo {
                    start,
                    end,
                    last: r(end),
                    epoch: 0,
                    block_count: blocks,
                }),
            },
        )
    }

    fn applied(c: &mut StateSyncCore, start: u64, last: u64) -> Vec<Output> {
        c.handle(
            Time(0),
            Input::Applied {
                start,
                last: r(last),
                next_epoch: None,
            },
        )
    }

    fn blocks_ok(c: &mut StateSyncCore, task: TaskId) -> Vec<Output> {
        c.handle(
            Time(0),
            Input::BlocksFetched {
                task,
                peer: Some(PeerId([1; 32])),
                result: Ok(1_000),
            },
        )
    }

    #[test]
    fn batches_are_aligned_to_the_batch_size_and_the_tip() {
        let mut c = core(config());
        let (t, s, e) = commit_fetch(&tick(&mut c, 0, 25)).unwrap();
        assert_eq!((s, e), (1, 10));
        let out = commits_ok(&mut c, 0, t, 1, 10, 5);
        let (t, s, e) = commit_fetch(&out).unwrap();
        assert_eq!((s, e), (11, 20));
        let out = commits_ok(&mut c, 0, t, 11, 20, 5);
        assert_eq!(commit_fetch(&out).map(|(_, s, e)| (s, e)), Some((21, 25)));
    }

    #[test]
    fn a_short_answer_continues_where_it_ended() {
        // The server ended early (epoch end or certificate): the next batch
        // starts after what was verified.
        let mut c = core(config());
        let (t, _, _) = commit_fetch(&tick(&mut c, 0, 100)).unwrap();
        let out = commits_ok(&mut c, 0, t, 1, 7, 5);
        assert_eq!(commit_fetch(&out).map(|(_, s, e)| (s, e)), Some((8, 10)));
    }

    #[test]
    fn read_ahead_is_bounded_by_batches_ahead() {
        let mut c = core(Config {
            parallel_fetches: 0,
            ..config()
        });
        let mut fetched = 0;
        let mut out = tick(&mut c, 0, 1_000);
        while let Some((t, s, e)) = commit_fetch(&out) {
            fetched += 1;
            out = commits_ok(&mut c, 0, t, s, e, 5);
        }
        assert_eq!(fetched, 4);
    }

    #[test]
    fn block_fetches_are_bounded_by_parallel_fetches() {
        let mut c = core(config());
        let (t, _, _) = commit_fetch(&tick(&mut c, 0, 10)).unwrap();
        // 12 blocks in chunks of 5: three chunks, three fetches allowed.
        let out = commits_ok(&mut c, 0, t, 1, 10, 12);
        assert_eq!(block_fetches(&out).len(), 3);
        let offsets: Vec<usize> = block_fetches(&out).iter().map(|f| f.2).collect();
        assert_eq!(offsets, vec![0, 5, 10]);
    }

    /// A core with batches 1..=10 and 11..=20 fetched (5 blocks each, one
    /// chunk), and the block fetches of each.
    fn two_fetched_batches() -> (StateSyncCore, Vec<BlockFetch>, Vec<BlockFetch>) {
        let mut c = core(Config {
            parallel_fetches: 10,
            ..config()
        });
        let (t, _, _) = commit_fetch(&tick(&mut c, 0, 30)).unwrap();
        let out1 = commits_ok(&mut c, 0, t, 1, 10, 5);
        let (t2, _, _) = commit_fetch(&out1).unwrap();
        let first = block_fetches(&out1);
        let out2 = commits_ok(&mut c, 0, t2, 11, 20, 5);
        let second = block_fetches(&out2);
        (c, first, second)
    }

    #[test]
    fn batches_apply_strictly_in_order_whatever_order_blocks_arrive() {
        let (mut c, first, second) = two_fetched_batches();
        // The second batch completes first: nothing to apply yet.
        let out = blocks_ok(&mut c, second[0].0);
        assert!(!out.iter().any(|o| matches!(o, Output::Apply { .. })));
        let out = blocks_ok(&mut c, first[0].0);
        assert_eq!(
            out.iter()
                .filter(|o| matches!(o, Output::Apply { .. }))
                .count(),
            1
        );
        assert!(out.contains(&Output::Apply { start: 1 }));
        // Only once the first is applied does the second go.
        let out = applied(&mut c, 1, 10);
        assert!(out.contains(&Output::Apply { start: 11 }));
        applied(&mut c, 11, 20);
        assert_eq!(c.synced(), r(20));
    }

    #[test]
    fn local_commits_inside_fetched_batches_do_not_wedge_sync() {
        // A node that produces commits itself while it syncs: local commits
        // land inside batches sync has already fetched.
        let (mut c, first, second) = two_fetched_batches();
        // Local consensus applies 1..=14: all of the first batch and part of
        // the second.
        let out = c.handle(
            Time(0),
            Input::LocalApplied {
                last: r(14),
                next_epoch: None,
            },
        );
        assert!(out.contains(&Output::Discard { start: 1 }), "{out:?}");
        assert!(!out.contains(&Output::Reset));
        // The first batch's blocks arrive late: nothing to do with them.
        let out = blocks_ok(&mut c, first[0].0);
        assert!(!out.iter().any(|o| matches!(o, Output::Apply { .. })));
        // The second batch, which the watermark falls inside, is applied
        // (the shell writes only 15..=20).
        let out = blocks_ok(&mut c, second[0].0);
        assert!(out.contains(&Output::Apply { start: 11 }), "{out:?}");
        applied(&mut c, 11, 20);
        assert_eq!(c.synced(), r(20));
    }

    #[test]
    fn next_epoch_waits_for_its_committee() {
        let mut c = core(config());
        let (t, _, _) = commit_fetch(&tick(&mut c, 0, 30)).unwrap();
        let out = commits_ok(&mut c, 0, t, 1, 10, 5);
        let (t2, _, _) = commit_fetch(&out).unwrap();
        let fetch = block_fetches(&out);
        // The next commits are of epoch 1, whose committee is not installed.
        let out = c.handle(
            Time(0),
            Input::CommitsFetched {
                task: t2,
                peer: None,
                result: Err(Failure::UnknownEpoch(1)),
            },
        );
        assert!(commit_fetch(&out).is_none());
        assert!(commit_fetch(&tick(&mut c, 5_000, 30)).is_none());
        let out = blocks_ok(&mut c, fetch[0].0);
        assert!(out.contains(&Output::Apply { start: 1 }));
        let out = c.handle(
            Time(0),
            Input::Applied {
                start: 1,
                last: r(10),
                next_epoch: Some(1),
            },
        );
        assert_eq!(commit_fetch(&out).map(|(_, s, _)| s), Some(11));
    }

    #[test]
    fn failures_restart_with_backoff_then_move_to_another_peer() {
        let mut c = core(config());
        let liar = PeerId([9; 32]);
        let (t, _, _) = commit_fetch(&tick(&mut c, 0, 10)).unwrap();
        let fail = |c: &mut StateSyncCore, now, task, failure| {
            c.handle(
                Time(now),
                Input::CommitsFetched {
                    task,
                    peer: Some(liar),
                    result: Err(failure),
                },
            )
        };
        let out = fail(&mut c, 0, t, Failure::Timeout);
        assert!(out.iter().any(|o| matches!(o, Output::Restarted { .. })));
        // Backoff: not before 50 ms.
        assert!(commit_fetch(&tick(&mut c, 49, 10)).is_none());
        let (t, _, _) = commit_fetch(&tick(&mut c, 50, 10)).unwrap();
        fail(&mut c, 50, t, Failure::Panicked);
        let (t, _, _) = commit_fetch(&tick(&mut c, 200, 10)).unwrap();
        fail(&mut c, 200, t, Failure::Error("reset".into()));
        let (t, _, _) = commit_fetch(&tick(&mut c, 500, 10)).unwrap();
        // The fourth failure in the window passes the limit of 3 restarts:
        // the range goes to another peer at once.
        let out = fail(&mut c, 500, t, Failure::Timeout);
        let retried =
            commit_fetch(&out).is_some() || commit_fetch(&tick(&mut c, 500, 10)).is_some();
        assert!(retried);
    }

    #[test]
    fn invalid_data_avoids_the_peer_for_that_work() {
        let mut c = core(config());
        let liar = PeerId([9; 32]);
        let (t, _, _) = commit_fetch(&tick(&mut c, 0, 10)).unwrap();
        c.handle(
            Time(0),
            Input::CommitsFetched {
                task: t,
                peer: Some(liar),
                result: Err(Failure::Invalid("forged".into())),
            },
        );
        let out = tick(&mut c, 1_000, 10);
        let avoid = out.iter().find_map(|o| match o {
            Output::FetchCommits { avoid, .. } => Some(avoid.clone()),
            _ => None,
        });
        assert_eq!(avoid, Some(vec![liar]));
    }

    #[test]
    fn no_peer_waits_the_configured_interval() {
        let mut c = core(config());
        let (t, _, _) = commit_fetch(&tick(&mut c, 0, 10)).unwrap();
        c.handle(
            Time(0),
            Input::CommitsFetched {
                task: t,
                peer: None,
                result: Err(Failure::NoPeer),
            },
        );
        assert!(commit_fetch(&tick(&mut c, 999, 10)).is_none());
        assert!(commit_fetch(&tick(&mut c, 1_000, 10)).is_some());
    }

    #[test]
    fn fetched_bytes_are_bounded() {
        let mut c = core(Config {
            max_total_fetched_bytes: 1_500,
            parallel_fetches: 10,
            max_blocks_per_fetch: 5,
            ..config()
        });
        let (t, _, _) = commit_fetch(&tick(&mut c, 0, 30)).unwrap();
        let out = commits_ok(&mut c, 0, t, 1, 10, 5);
        let first = block_fetches(&out);
        let (t2, _, _) = commit_fetch(&out).unwrap();
        let out = commits_ok(&mut c, 0, t2, 11, 20, 15);
        let second = block_fetches(&out);
        // Two chunks of batch 2 done (2,000 bytes): past the bound, only the
        // batch next in line may fetch.
        blocks_ok(&mut c, second[0].0);
        blocks_ok(&mut c, second[1].0);
        c.handle(
            Time(0),
            Input::BlocksFetched {
                task: second[2].0,
                peer: None,
                result: Err(Failure::Timeout),
            },
        );
        assert!(block_fetches(&tick(&mut c, 10_000, 30)).is_empty());
        c.handle(
            Time(0),
            Input::BlocksFetched {
                task: first[0].0,
                peer: None,
                result: Err(Failure::Timeout),
            },
        );
        let out = tick(&mut c, 20_000, 30);
        assert_eq!(
            block_fetches(&out).iter().map(|f| f.1).collect::<Vec<_>>(),
            vec![1]
        );
    }
}
