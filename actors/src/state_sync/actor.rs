use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::time::Instant;

use actix::{
    Actor, ActorContext, ActorFutureExt, AsyncContext, Context, Handler, Message, ResponseFuture,
    Supervised, WrapFuture,
};
use soma_types::{CommitIndex, PeerId};
use tokio::sync::oneshot;
use tokio::task::{AbortHandle, JoinSet};

use super::apply::{self, ApplyError, Batch};
use super::core::StateSyncCore;
use super::deps::Deps;
use super::messages::*;
use super::prune;
use super::worker::{BatchData, CommitAnswer, Outcome, Worker, supervised};
use crate::Driver;
use crate::connections::PeerEvent;
use crate::dropped::{self, Droppable};
use crate::peer_heights::HighestKnownCommit;
use crate::replay::Recorder;
use crate::verifier::InstallCommittee;

/// The StateSync actor: a thin shell around [`StateSyncCore`]. It runs
/// the core's fetches as [`Worker`]s on the runtime, each under
/// `catch_unwind` (a panic is the task's [`Failure::Panicked`]), holds the
/// fetched batches until they are written, and performs writes through the
/// one [`apply`] path.
pub struct StateSync {
    deps: Deps,
    driver: Driver<StateSyncCore>,
    worker: Worker,
    buffers: BTreeMap<CommitIndex, BatchData>,
    /// Commit answers fetched ahead, unchecked, until the core uses or
    /// forgets them (it counts them against the fetch budget).
    ahead: HashMap<TaskId, CommitAnswer>,
    /// Workers running, aborted on a restart.
    workers: HashMap<TaskId, AbortHandle>,
    status: SyncStatus,
    /// Set when a restart could not read the store: the actor stops at
    /// once, a failure for its supervisor.
    broken: Option<soma_store::Error>,
    /// Rounds of height queries running: at most `max_background_calls`.
    queries: JoinSet<()>,
    /// The round of commit pushes running, if one is: one at a time, so
    /// peers that never answer a push cannot crowd out height queries.
    /// Both sets are aborted on a restart and when the actor is dropped.
    pushes: JoinSet<()>,
    /// Whether a prune run is under way (one at a time; it outlives a
    /// restart, and so does this flag).
    pruning: bool,
    /// Prune targets advertised and not yet a grace old, oldest first (one
    /// a run at most, so at most a grace's worth of runs).
    announced: VecDeque<(Instant, CommitIndex)>,
    /// The highest target advertised at least a grace ago: commits below
    /// it may be deleted.
    ripe: Option<CommitIndex>,
}

impl StateSync {
    /// A StateSync actor resuming from the store's watermark; it records a
    /// trace if `recorder` is given.
    pub fn new(deps: Deps, recorder: Option<Recorder>) -> Result<Self, soma_store::Error> {
        let init = deps.init(0)?;
        let status = SyncStatus {
            synced: init.synced.index,
            highest_known: init.synced.index,
            requested: init.synced.index,
            executed: init.executed,
            lowest_available: deps.store.lowest_available_commit()?,
            ..SyncStatus::default()
        };
        Ok(StateSync {
            driver: Driver::new(init, recorder).with_faults(deps.faults.clone()),
            worker: deps.worker(),
            deps,
            buffers: BTreeMap::new(),
            ahead: HashMap::new(),
            workers: HashMap::new(),
            status,
            broken: None,
            queries: JoinSet::new(),
            pushes: JoinSet::new(),
            pruning: false,
            announced: VecDeque::new(),
            ripe: None,
        })
    }

    fn step(&mut self, input: Input, ctx: &mut Context<Self>) {
        for output in self.driver.step(input) {
            match output {
                Output::FetchCommits {
                    task,
                    wanted,
                    avoid,
                    prefetched: None,
                } => {
                    let work = self.worker.clone().fetch_commits(wanted, avoid);
                    self.spawn(task, work, ctx, move |(peer, result)| CommitsDone {
                        task,
                        peer,
                        result,
                    });
                }
                Output::FetchCommits {
                    task,
                    wanted,
                    prefetched: Some(ahead),
                    ..
                } => {
                    let Some(answer) = self.ahead.remove(&ahead) else {
                        let result = Err(Failure::Local(LocalFailure::BatchGone));
                        ctx.notify(CommitsDone {
                            task,
                            peer: None,
                            result,
                        });
                        continue;
                    };
                    let peer = answer.peer;
                    let worker = self.worker.clone();
                    let work = async move { (peer, worker.check_commits(answer, wanted).await) };
                    self.spawn(task, work, ctx, move |(peer, result)| CommitsDone {
                        task,
                        peer,
                        result,
                    });
                }
                Output::FetchCommitsAhead {
                    task,
                    start,
                    end,
                    max_bytes,
                    avoid,
                } => {
                    let worker = self.worker.clone();
                    let work =
                        async move { worker.commit_answer((start, end), max_bytes, avoid).await };
                    self.spawn(task, work, ctx, move |(peer, result)| AheadDone {
                        task,
                        peer,
                        result,
                    });
                }
                Output::ForgetCommitsAhead { task } => {
                    self.ahead.remove(&task);
                }
                Output::FetchBlocks {
                    task,
                    batch,
                    offset,
                    len,
                    max_bytes,
                    avoid,
                } => self.fetch_blocks(task, batch, (offset, len, max_bytes), avoid, ctx),
                Output::Apply { start } => match self.buffers.remove(&start) {
                    Some(data) => self.write(data.into_batch(), Origin::Synced(start), ctx),
                    None => ctx.notify(ApplyDone {
                        origin: Origin::Synced(start),
                        result: Err(ApplyError::BatchGone),
                    }),
                },
                Output::Restarted { task, failure } => {
                    self.status.restarts += 1;
                    if let Failure::OverBudget { .. } = failure {
                        self.status.chunks_split += 1;
                    }
                    tracing::debug!(task, ?failure, "sync worker restarted");
                }
                Output::Misbehaved { peer } => {
                    self.status.invalid_responses += 1;
                    self.deps.calls().misbehaved(peer);
                }
                Output::QueryHeights { peer } => {
                    let round = self.deps.calls().query_heights(peer);
                    let most = self.deps.max_background_calls;
                    spawn_within(&mut self.queries, most, round, &self.deps.runtime);
                }
                Output::Reset => self.buffers.clear(),
                Output::Discard { start } => {
                    self.buffers.remove(&start);
                }
            }
        }
        let core = self.driver.core();
        self.status.synced = core.synced().index;
        self.status.highest_known = core.highest_known();
        self.status.requested = core.requested();
        self.status.paused_for_executor = core.paused_for_executor();
        self.status.unavailable = core.unavailable();
        let synced = self.status.synced;
        self.deps.availability.send_if_modified(|a| {
            let changed = a.highest != synced;
            a.highest = synced;
            changed
        });
    }

    /// Runs a worker, tracked so a restart can abort it.
    fn spawn<T: Send + 'static, M>(
        &mut self,
        task: TaskId,
        work: impl Future<Output = Outcome<T>> + Send + 'static,
        ctx: &mut Context<Self>,
        done: impl FnOnce(Outcome<T>) -> M + Send + 'static,
    ) where
        M: Message<Result = ()> + Send + 'static,
        Self: Handler<M>,
    {
        let handle = supervised(&self.deps.runtime, work, ctx.address(), done);
        self.workers.insert(task, handle);
    }

    fn fetch_blocks(
        &mut self,
        task: TaskId,
        batch: CommitIndex,
        (offset, len, max_bytes): (usize, usize, u64),
        avoid: Vec<PeerId>,
        ctx: &mut Context<Self>,
    ) {
        let Some(data) = self.buffers.get(&batch) else {
            let result = Err(Failure::Local(LocalFailure::BatchGone));
            let peer = None;
            return ctx.notify(BlocksDone {
                task,
                batch,
                peer,
                result,
            });
        };
        let chunk = data.chunk(batch, offset, len, max_bytes);
        let work = self.worker.clone().fetch_blocks(chunk, avoid);
        self.spawn(task, work, ctx, move |(peer, result)| BlocksDone {
            task,
            batch,
            peer,
            result,
        });
    }

    /// Prunes the store towards its retention on the blocking pool: only
    /// below a target advertised at least `grace_ms` ago. A panic in the
    /// run is reported like a store error, so pruning goes on next time.
    fn prune(&mut self, ctx: &mut Context<Self>) {
        if self.pruning || self.deps.prune.retention == prune::Retention::All {
            return;
        }
        let grace = std::time::Duration::from_millis(self.deps.prune.grace_ms);
        while let Some(&(at, target)) = self.announced.front()
            && at.elapsed() >= grace
        {
            self.ripe = self.ripe.max(Some(target));
            self.announced.pop_front();
        }
        self.pruning = true;
        let (store, addr) = (self.deps.store.clone(), ctx.address());
        let (config, execution) = (self.deps.prune.clone(), self.deps.execution.clone());
        let (epoch, mut ripe) = (self.driver.core().expected_epoch(), self.ripe);
        if let Some(archived) = &self.deps.archived {
            // Nothing is pruned before it is archived.
            ripe = ripe.map(|r| r.min(*archived.borrow()));
        }
        self.deps.runtime.spawn_blocking(move || {
            let run = || prune::run(store.as_ref(), &config, epoch, ripe, || execution.hold());
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)).unwrap_or(
                Err(soma_store::Error::Database("the prune run panicked".into())),
            );
            // One run at a time: this send cannot pile up.
            addr.do_send(PruneDone(result));
        });
    }

    /// Writes a batch on the blocking pool; [`ApplyDone`] comes back even
    /// if the actor restarts meanwhile, so no write goes unpublished.
    fn write(&self, batch: Batch, origin: Origin, ctx: &mut Context<Self>) {
        let (store, addr) = (self.deps.store.clone(), ctx.address());
        self.deps.runtime.spawn_blocking(move || {
            let result = apply::write(store.as_ref(), batch);
            addr.do_send(ApplyDone { origin, result });
        });
    }
}

impl Handler<ApplyDone> for StateSync {
    type Result = ();

    /// After a write: first what must not be lost if anything later
    /// fails, the sub-DAGs to subscribers in order and a local commit's
    /// answer; then the next committee to the Verifier (before anything of
    /// its epoch is verified: the Verifier's mailbox is FIFO and the next
    /// fetch starts after this step), the core told, the height pushed to
    /// peers behind.
    fn handle(&mut self, done: ApplyDone, ctx: &mut Context<Self>) {
        let (applied, origin) = match (done.result, done.origin) {
            (Ok(applied), origin) => (applied, origin),
            (Err(error), Origin::Synced(start)) => {
                return self.step(Input::ApplyFailed { start, error }, ctx);
            }
            (Err(error), Origin::Local(reply)) => {
                let _ = reply.send(Err(error));
                return;
            }
        };
        let (last, wrote) = (applied.last, !applied.subdags.is_empty());
        for subdag in applied.subdags {
            self.status.commits_applied += 1;
            self.status.blocks_applied += subdag.blocks.len() as u64;
            // No receiver is not an error; a lagging one is told by the channel.
            let _ = self.deps.commits.send(subdag);
        }
        let synced = match origin {
            Origin::Synced(start) => Some(start),
            Origin::Local(reply) => {
                let _ = reply.send(Ok(()));
                None
            }
        };
        let next_epoch = applied.next_committee.as_ref().map(|c| EpochStart {
            epoch: c.epoch(),
            commit_answer_bytes: self.deps.commit_answer_bytes(c),
        });
        if let Some(next) = applied.next_committee {
            tracing::info!(epoch = next.epoch(), "epoch changed");
            self.deps.verifier.do_send(InstallCommittee(next));
        }
        let input = match synced {
            Some(start) => Input::Applied {
                start,
                last,
                next_epoch,
            },
            None => Input::LocalApplied { last, next_epoch },
        };
        self.step(input, ctx);
        if wrote {
            // A round still running skips this one; the next write pushes
            // a newer height.
            let round = self.deps.calls().push_commit(last);
            spawn_within(&mut self.pushes, 1, round, &self.deps.runtime);
        }
    }
}

impl Actor for StateSync {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(self.deps.mailbox_capacity);
        if let Some(e) = self.broken.take() {
            tracing::error!(%e, "state sync cannot read its watermark");
            return ctx.stop();
        }
        // The executor's progress, as it moves (a watch: only the latest
        // value is kept, so a fast executor cannot flood the mailbox).
        let executed = futures::stream::unfold(
            (self.deps.execution.subscribe(), true),
            |(mut rx, first)| async move {
                if !first {
                    rx.changed().await.ok()?;
                }
                let taken = *rx.borrow_and_update();
                Some((ExecutorMoved(taken), (rx, false)))
            },
        );
        ctx.add_stream(executed);
        let prune_every = std::time::Duration::from_millis(self.deps.prune.interval_ms.max(1));
        ctx.run_interval(prune_every, |act, ctx| act.prune(ctx));
        ctx.run_interval(self.deps.tick, |act, ctx| {
            let heights = act.deps.heights.clone();
            ctx.spawn(
                async move { heights.send(HighestKnownCommit).await.ok().flatten() }
                    .into_actor(act)
                    .map(|highest, _, ctx| ctx.notify(TickMsg(highest))),
            );
        });
    }
}

impl StateSync {
    /// Aborts every worker and background call (their fetch slots are
    /// released as they drop).
    fn abort_tasks(&mut self) {
        for (_, worker) in self.workers.drain() {
            worker.abort();
        }
        self.queries.abort_all();
        self.pushes.abort_all();
    }
}

impl Drop for StateSync {
    /// At shutdown (the System stops and drops its actors), no task of
    /// this actor outlives it, even on a runtime the node does not own.
    fn drop(&mut self) {
        self.abort_tasks();
    }
}

impl Supervised for StateSync {
    /// Workers are aborted (their slots are released as they drop) and
    /// fetched batches dropped; the watermark and epoch are read from the
    /// store again, and task ids go on from the failed incarnation's.
    /// Counters carry over. A write in flight still reports, as a write
    /// this core did not plan.
    fn restarting(&mut self, _: &mut Context<Self>) {
        self.abort_tasks();
        self.buffers.clear();
        self.ahead.clear();
        match self.deps.init(self.driver.core().next_task()) {
            Ok(init) => self.driver.restart(init),
            Err(e) => self.broken = Some(e),
        }
    }
}

impl Handler<TickMsg> for StateSync {
    type Result = ();
    fn handle(&mut self, msg: TickMsg, ctx: &mut Context<Self>) {
        self.step(
            Input::Tick {
                highest_known: msg.0,
            },
            ctx,
        );
    }
}

impl Handler<PeerEvent> for StateSync {
    type Result = ();
    fn handle(&mut self, event: PeerEvent, ctx: &mut Context<Self>) {
        if let PeerEvent::Connected { peer, .. } = event {
            self.step(Input::PeerConnected { peer }, ctx);
        }
    }
}

impl Handler<CommitsDone> for StateSync {
    type Result = ();
    fn handle(&mut self, msg: CommitsDone, ctx: &mut Context<Self>) {
        self.workers.remove(&msg.task);
        // Only the data of a fetch the core waits for is kept: a late answer
        // (a dropped task's, a failed incarnation's) must not replace a live
        // batch's.
        let awaited = self.driver.core().awaits(msg.task);
        let result = msg.result.map(|data| {
            let info = data.info();
            if awaited {
                self.buffers.insert(info.start, data);
            }
            info
        });
        let (task, peer) = (msg.task, msg.peer);
        self.step(Input::CommitsFetched { task, peer, result }, ctx);
    }
}

impl Handler<AheadDone> for StateSync {
    type Result = ();
    fn handle(&mut self, msg: AheadDone, ctx: &mut Context<Self>) {
        self.workers.remove(&msg.task);
        // Kept only while the core waits for it, as fetched batches are.
        let awaited = self.driver.core().awaits(msg.task);
        let result = msg.result.map(|answer| {
            let bytes = answer.held_bytes();
            if awaited {
                self.ahead.insert(msg.task, answer);
            }
            bytes
        });
        let (task, peer) = (msg.task, msg.peer);
        self.step(Input::CommitsPrefetched { task, peer, result }, ctx);
    }
}

impl Handler<BlocksDone> for StateSync {
    type Result = ();
    fn handle(&mut self, msg: BlocksDone, ctx: &mut Context<Self>) {
        self.workers.remove(&msg.task);
        let result = msg.result.map(|blocks| {
            let bytes = self
                .buffers
                .get_mut(&msg.batch)
                .map_or(0, |d| d.add(blocks));
            self.status.bytes_fetched += bytes;
            bytes
        });
        let (task, peer) = (msg.task, msg.peer);
        self.step(Input::BlocksFetched { task, peer, result }, ctx);
    }
}

impl Handler<GetSyncStatus> for StateSync {
    type Result = SyncStatus;
    fn handle(&mut self, _: GetSyncStatus, _: &mut Context<Self>) -> SyncStatus {
        self.status.clone()
    }
}

impl Handler<ApplyLocal> for StateSync {
    type Result = ResponseFuture<Result<(), ApplyError>>;

    fn handle(&mut self, msg: ApplyLocal, ctx: &mut Context<Self>) -> Self::Result {
        let (reply, answer) = oneshot::channel();
        self.write(Batch::local(msg.0), Origin::Local(reply), ctx);
        Box::pin(async move { answer.await.unwrap_or(Err(ApplyError::Cancelled)) })
    }
}

impl actix::StreamHandler<ExecutorMoved> for StateSync {
    fn handle(&mut self, moved: ExecutorMoved, ctx: &mut Context<Self>) {
        self.status.executed = moved.0;
        self.step(Input::Executed { taken: moved.0 }, ctx);
    }

    /// The watch closes only when the node is dropped.
    fn finished(&mut self, _: &mut Context<Self>) {}
}

impl Handler<PruneDone> for StateSync {
    type Result = ();
    fn handle(&mut self, done: PruneDone, _: &mut Context<Self>) {
        self.pruning = false;
        match done.0 {
            Ok(pruned) => {
                self.status.lowest_available = pruned.lowest;
                self.status.commits_pruned += pruned.commits;
                if pruned.commits > 0 {
                    tracing::debug!(lowest = pruned.lowest, pruned.commits, "store pruned");
                }
                // Advertised at once, deleted below a grace later.
                let last = self.announced.back().map(|(_, t)| *t).max(self.ripe);
                if let Some(target) = pruned.target.filter(|t| Some(*t) > last) {
                    self.announced.push_back((Instant::now(), target));
                }
                let advertised = pruned.target.unwrap_or(0).max(pruned.lowest);
                self.deps.availability.send_if_modified(|a| {
                    let raised = advertised > a.lowest;
                    a.lowest = a.lowest.max(advertised);
                    raised
                });
            }
            Err(e) => tracing::warn!(%e, "pruning failed; tried again at the next interval"),
        }
    }
}

/// Runs a round of calls to peers in `set`, unless `most` run already (the
/// next tick or write repeats it: counted as dropped).
fn spawn_within(
    set: &mut JoinSet<()>,
    most: usize,
    round: impl Future<Output = ()> + Send + 'static,
    runtime: &tokio::runtime::Handle,
) {
    while set.try_join_next().is_some() {}
    if set.len() >= most {
        return dropped::count(Droppable::PeerCall);
    }
    set.spawn_on(round, runtime);
}
