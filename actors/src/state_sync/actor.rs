use std::sync::atomic::Ordering;
use std::time::Duration;

use actix::{
    Actor, ActorContext, ActorFutureExt, AsyncContext, Context, Handler, ResponseFuture,
    SpawnHandle, Supervised, WrapFuture,
};
use futures::StreamExt;
use soma_types::{CommitIndex, CommitRef, PeerId};
use tokio::sync::oneshot;

use super::apply::{self, ApplyError, Batch, unless_panicked};
use super::core::StateSyncCore;
use super::deps::Deps;
use super::fetched::Fetched;
use super::messages::*;
use super::prune::Pruner;
use super::worker::{PeerCalls, Tasks, Worker};
use super::writes::{Report, WriteQueue};
use crate::connections::PeerEvent;
use crate::peer_heights::{HeightsHeard, HighestKnownCommit};
use crate::replay::Recorder;
use crate::verifier::InstallCommittee;
use crate::{Driver, Time};

/// The StateSync actor: a thin shell around [`StateSyncCore`]. It runs
/// the core's fetches as `Worker`s on the runtime, each under
/// `catch_unwind` (a panic is the task's [`Failure::Panicked`]), holds the
/// fetched batches until they are written, and performs writes through the
/// one `apply` path.
pub struct StateSync {
    deps: Deps,
    driver: Driver<StateSyncCore>,
    worker: Worker,
    /// Fetched batches and answers, until written or dropped.
    fetched: Fetched,
    status: SyncStatus,
    /// Set when a restart could not read the store: the actor stops at
    /// once, a failure for its supervisor.
    broken: Option<soma_store::Error>,
    /// Workers and background calls running.
    tasks: Tasks,
    /// Keeps the store within its retention.
    pruner: Pruner,
    /// Set while PeerHeights is asked which peers to push the advertised
    /// height to: whether the height rose since it was asked (then it is
    /// asked again once it answers).
    asking_behind: Option<bool>,
    /// Whether a round's question to Connections (the peers to ask) is
    /// on its way: one at a time.
    asking_connected: bool,
    /// Whether a tick's question to PeerHeights (the highest commit known)
    /// is on its way: one at a time, so that ticks do not pile up
    /// questions while PeerHeights is held up (its start waits for
    /// Connections).
    asking_highest: bool,
    /// The wake-up set for the core's next retry, and its time.
    wake: Option<(Time, SpawnHandle)>,
    /// Store writes, one at a time in the order asked ([`WriteQueue`]):
    /// at most one synced batch waiting (the core applies one at a time)
    /// and the local commits that hold places of `max_local_writes`. Kept
    /// across restarts: a write in flight still reports to the restarted
    /// actor.
    writes: WriteQueue<(Batch, Origin)>,
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
        let worker = deps.worker();
        worker.hedging.applied(init.synced.index);
        Ok(StateSync {
            driver: Driver::new(init, recorder).with_faults(deps.faults.clone()),
            worker,
            tasks: Tasks::new(deps.max_queries, deps.max_pushes, deps.runtime.clone()),
            pruner: Pruner::new(&deps),
            deps,
            fetched: Fetched::default(),
            status,
            broken: None,
            asking_behind: None,
            asking_connected: false,
            asking_highest: false,
            wake: None,
            writes: WriteQueue::default(),
        })
    }

    fn step(&mut self, input: Input, ctx: &mut Context<Self>) {
        for output in self.driver.step(input) {
            match output {
                Output::FetchCommits {
                    task,
                    wanted,
                    avoid,
                    prefetched,
                } => self.fetch_commits(task, wanted, avoid, prefetched, ctx),
                Output::FetchCommitsAhead {
                    task,
                    start,
                    end,
                    epoch,
                    max_bytes,
                    avoid,
                } => {
                    let worker = self.worker.clone();
                    let work = async move {
                        let cap = (max_bytes, true);
                        match worker.commit_answer((start, end), cap, avoid).await {
                            (peer, Ok(answer)) => {
                                (peer, worker.certify_ahead(answer, start, epoch).await)
                            }
                            failed => failed,
                        }
                    };
                    self.tasks
                        .worker(task, work, ctx.address(), move |(peer, result)| AheadDone {
                            task,
                            peer,
                            result,
                        });
                }
                Output::ForgetCommitsAhead { task } => self.fetched.forget_ahead(task),
                Output::FetchBlocks {
                    task,
                    batch,
                    offset,
                    len,
                    max_bytes,
                    avoid,
                } => self.fetch_blocks(task, batch, (offset, len, max_bytes), avoid, ctx),
                Output::Apply { start } => match self.fetched.take_batch(start) {
                    Some(batch) => self.write(batch, Origin::Synced(start), ctx),
                    None => ctx.notify(ApplyDone {
                        origin: Origin::Synced(start),
                        result: Err(ApplyError::BatchGone),
                        written: false,
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
                    self.calls().misbehaved(peer);
                }
                Output::WithheldBlocks { peer } => self.calls().withheld(peer),
                Output::WithheldIfStored { peer, commit } => {
                    let (store, calls) = (self.deps.store.clone(), self.calls());
                    self.deps.runtime.spawn_blocking(move || {
                        let stored = store.commit(commit.index);
                        if stored.is_ok_and(|c| c.is_some_and(|c| c.reference() == commit)) {
                            calls.withheld(peer);
                        }
                    });
                }
                // A round: each connected peer asked in a task of its own,
                // so that one that never answers holds up no other's. A
                // round due while the last one's question to Connections
                // is unanswered is skipped: the next one asks.
                Output::QueryHeights { peer: None } if !self.asking_connected => {
                    self.asking_connected = true;
                    let connected = self.calls().connected();
                    ctx.spawn(connected.into_actor(self).map(|peers, act, _| {
                        act.asking_connected = false;
                        for peer in peers {
                            let query = act.calls().query_height(peer);
                            act.tasks.query(peer, query);
                        }
                    }));
                }
                // A new connection's height: once every connected peer's is
                // in (at start, the seeds'), a tick schedules what they allow
                // instead of the next interval. Waiting for all of them
                // spreads the first fetches over every peer: the first to
                // answer does not get them all.
                Output::QueryHeights { peer: Some(peer) } => {
                    let query = self.calls().query_height(peer);
                    let (heights, me) = (self.deps.heights.clone(), ctx.address());
                    self.tasks.query(peer, async move {
                        query.await;
                        if let Ok(heard) = heights.send(HeightsHeard).await
                            && heard.awaiting == 0
                        {
                            me.do_send(TickMsg(heard.highest));
                        }
                    });
                }
                Output::QueryHeights { peer: None } => {}
                Output::Reset => self.fetched.reset(),
                Output::Discard { start } => self.fetched.discard(start),
            }
        }
        self.status.follow(self.driver.core());
        self.wake_for_retries(ctx);
    }

    /// Sets a wake-up for the core's earliest retry, unless one is set
    /// for that time or earlier: work waiting out a backoff starts when
    /// the backoff ends, not at the next tick.
    fn wake_for_retries(&mut self, ctx: &mut Context<Self>) {
        let now = self.driver.now();
        let Some(at) = self.driver.core().next_retry(now) else {
            return;
        };
        if self.wake.as_ref().is_some_and(|(set, _)| *set <= at) {
            return;
        }
        if let Some((_, handle)) = self.wake.take() {
            ctx.cancel_future(handle);
        }
        let delay = Duration::from_millis(at.0 - now.0);
        let handle = ctx.run_later(delay, |act, ctx| {
            act.wake = None;
            act.step(Input::Wake, ctx);
        });
        self.wake = Some((at, handle));
    }

    /// Advertises `commit` as the highest this node serves, if it is
    /// higher than the one advertised: the highest commit whose
    /// certificate is stored, never a local commit still without one
    /// (answered UNAVAILABLE). Pushes it to the peers known to be behind,
    /// one push per peer at a time ([`Tasks::push_to`]).
    fn advertise(&mut self, commit: CommitRef, ctx: &mut Context<Self>) {
        let raised = self.deps.availability.send_if_modified(|a| {
            let raised = commit.index > a.highest;
            a.highest = a.highest.max(commit.index);
            raised
        });
        if raised {
            self.push_advertised(ctx);
        }
    }

    /// Pushes the advertised height to the peers known to be behind it:
    /// one question to PeerHeights at a time, asked again if the height
    /// rose meanwhile.
    fn push_advertised(&mut self, ctx: &mut Context<Self>) {
        if let Some(rose) = &mut self.asking_behind {
            *rose = true;
            return;
        }
        self.asking_behind = Some(false);
        let index = self.deps.availability.borrow().highest;
        let behind = self.calls().peers_behind(index);
        ctx.spawn(behind.into_actor(self).map(|peers, act, ctx| {
            for peer in peers {
                let advertised = act.deps.availability.subscribe();
                let push = act.calls().push_commits(peer, advertised);
                act.tasks.push_to(peer, push);
            }
            if act.asking_behind.take() == Some(true) {
                act.push_advertised(ctx);
            }
        }));
    }

    fn fetch_commits(
        &mut self,
        task: TaskId,
        wanted: CommitsWanted,
        avoid: Vec<PeerId>,
        prefetched: Option<TaskId>,
        ctx: &mut Context<Self>,
    ) {
        let done = move |(peer, result)| CommitsDone { task, peer, result };
        let worker = self.worker.clone();
        match prefetched.map(|ahead| self.fetched.take_ahead(ahead)) {
            None => {
                let work = worker.fetch_commits(wanted, avoid);
                self.tasks.worker(task, work, ctx.address(), done);
            }
            Some(Some(answer)) => {
                let peer = answer.peer;
                let work = async move { (peer, worker.check_commits(answer, wanted).await) };
                self.tasks.worker(task, work, ctx.address(), done);
            }
            Some(None) => ctx.notify(done((None, Err(Failure::Local(LocalFailure::BatchGone))))),
        }
    }

    fn fetch_blocks(
        &mut self,
        task: TaskId,
        batch: CommitIndex,
        chunk: (usize, usize, u64),
        avoid: Vec<PeerId>,
        ctx: &mut Context<Self>,
    ) {
        let done = move |(peer, result)| BlocksDone {
            task,
            batch,
            peer,
            result,
        };
        match self.fetched.chunk(batch, chunk) {
            Some(chunk) => {
                let denied = ctx.address().recipient();
                let work = self.worker.clone().fetch_blocks(chunk, avoid, denied);
                self.tasks.worker(task, work, ctx.address(), done);
            }
            None => ctx.notify(done((None, Err(Failure::Local(LocalFailure::BatchGone))))),
        }
    }

    /// Writes a batch on the blocking pool; [`ApplyDone`] comes back even
    /// if the actor restarts meanwhile, so no write goes unpublished, and
    /// even if the write panics (a store bug, or a damaged file a store
    /// asserts on), as a failed write: the core's pause and retry then
    /// take it, where a lost answer would leave the batch applying for as
    /// long as the node runs.
    fn write(&mut self, batch: Batch, origin: Origin, ctx: &mut Context<Self>) {
        if let Some(write) = self.writes.offer((batch, origin)) {
            self.start_write(write, ctx);
        }
    }

    /// Starts a write the queue let go (see [`Self::write`]).
    fn start_write(&mut self, (batch, origin): (Batch, Origin), ctx: &mut Context<Self>) {
        let store = self.deps.store.clone();
        let mut report = Report::new(ctx.address().recipient(), origin);
        self.deps.runtime.spawn_blocking(move || {
            let result = unless_panicked("write", || apply::write(store.as_ref(), batch));
            report.send(result);
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
        // The next write starts now; its result is handled after this one.
        if let Some(next) = self.writes.ended(done.written) {
            self.start_write(next, ctx);
        }
        let applied = match done.result {
            Ok(applied) => applied,
            Err(error) => {
                self.status.store_write_failures += 1;
                return match done.origin {
                    Origin::Synced(start) => self.step(Input::ApplyFailed { start, error }, ctx),
                    Origin::Local { reply, .. } => drop(reply.send(Err(error))),
                };
            }
        };
        let last = applied.last;
        self.worker.hedging.applied(last.index);
        // Advertised before a local commit's sender hears it is stored.
        if let Some(certified) = applied.certified {
            self.advertise(certified, ctx);
        }
        let (commits, blocks) = apply::publish(applied.subdags, &self.deps.commits);
        self.status.commits_applied += commits;
        self.status.blocks_applied += blocks;
        let next_epoch = applied.next_committee.as_ref().map(|c| EpochStart {
            epoch: c.epoch(),
            commit_answer_bytes: self.deps.commit_answer_bytes(c),
        });
        let input = match done.origin {
            Origin::Synced(start) => Input::Applied {
                start,
                last,
                next_epoch,
            },
            Origin::Local { reply, .. } => {
                let _ = reply.send(Ok(()));
                Input::LocalApplied { last, next_epoch }
            }
        };
        if let Some(next) = applied.next_committee {
            tracing::info!(epoch = next.epoch(), "epoch changed");
            self.deps.verifier.do_send(InstallCommittee(next));
        }
        self.step(input, ctx);
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
        // The executor's progress, as it moves.
        ctx.add_stream(self.deps.execution.moves().map(ExecutorMoved));
        let prune_every = Duration::from_millis(self.deps.prune.interval_ms.max(1));
        ctx.run_interval(prune_every, |act, ctx| {
            let addr = ctx.address();
            let epoch = act.driver.core().expected_epoch();
            // One run at a time: this send cannot pile up.
            act.pruner
                .start(epoch, move |run| addr.do_send(PruneDone(run)));
        });
        // At least a millisecond, as every other interval: actix fires an
        // interval of zero again and again within one poll, which would
        // pin the actors' thread (an embedder's `tick` is not checked).
        let tick = self.deps.tick.max(Duration::from_millis(1));
        ctx.run_interval(tick, |act, ctx| {
            act.deps.faults.on_tick();
            if std::mem::replace(&mut act.asking_highest, true) {
                return;
            }
            let heights = act.deps.heights.clone();
            let held = act.deps.faults.highest_question();
            ctx.spawn(
                async move {
                    held.await;
                    heights.send(HighestKnownCommit).await.ok().flatten()
                }
                .into_actor(act)
                .map(|highest, act, ctx| {
                    act.asking_highest = false;
                    ctx.notify(TickMsg(highest))
                }),
            );
        });
    }
}

impl Drop for StateSync {
    /// At shutdown (the System stops and drops its actors), no task of
    /// this actor outlives it, even on a runtime the node does not own.
    fn drop(&mut self) {
        self.tasks.abort_all();
    }
}

impl Supervised for StateSync {
    /// Workers are aborted (their slots are released as they drop) and
    /// fetched batches dropped, a synced batch waiting to be written
    /// included; the watermark and epoch are read from the store again,
    /// and task ids go on from the failed incarnation's. Counters carry
    /// over. A write in flight still reports, as a write this core did not
    /// plan, and local commits waiting are written in turn.
    fn restarting(&mut self, ctx: &mut Context<Self>) {
        self.tasks.abort_all();
        // The questions to PeerHeights and Connections went with the
        // context's futures.
        self.asking_behind = None;
        self.asking_connected = false;
        self.asking_highest = false;
        self.wake = None;
        self.fetched.clear();
        // A synced batch waiting to be written goes with the fetched ones
        // (the restarted core fetches from the store's watermark); local
        // commits waiting keep their turn, their callers waiting too.
        self.writes
            .retain(|(_, origin)| matches!(origin, Origin::Local { .. }));
        match self.deps.init(self.driver.core().next_task()) {
            Ok(init) => self.driver.restart(init),
            Err(e) => self.broken = Some(e),
        }
        // The pushes to the peers behind went with the tasks, and so did
        // the question of who they are: both again, for the height
        // advertised now (it may never rise again).
        if self.deps.availability.borrow().highest > 0 {
            self.push_advertised(ctx);
        }
    }
}

impl Handler<TickMsg> for StateSync {
    type Result = ();
    fn handle(&mut self, TickMsg(highest_known): TickMsg, ctx: &mut Context<Self>) {
        self.step(Input::Tick { highest_known }, ctx);
    }
}

impl Handler<HeightPushed> for StateSync {
    type Result = ();
    fn handle(&mut self, HeightPushed { index }: HeightPushed, ctx: &mut Context<Self>) {
        self.step(Input::Pushed { index }, ctx);
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

impl StateSync {
    /// The calls to peers besides fetches, sharing the workers' hedging.
    fn calls(&self) -> PeerCalls {
        self.deps.calls(self.worker.hedging.clone())
    }

    /// A worker ended: it is no longer tracked. Whether the core awaits
    /// its result (only then is its data kept).
    fn ended(&mut self, task: TaskId) -> bool {
        self.tasks.ended(task);
        self.driver.core().awaits(task)
    }
}

impl Handler<CommitsDone> for StateSync {
    type Result = ();
    fn handle(&mut self, done: CommitsDone, ctx: &mut Context<Self>) {
        let awaited = self.ended(done.task);
        let input = self.fetched.commits_done(done, awaited);
        self.step(input, ctx);
    }
}

impl Handler<AheadDone> for StateSync {
    type Result = ();
    fn handle(&mut self, done: AheadDone, ctx: &mut Context<Self>) {
        let awaited = self.ended(done.task);
        let input = self.fetched.ahead_done(done, awaited);
        self.step(input, ctx);
    }
}

impl Handler<DeniedInHedge> for StateSync {
    type Result = ();
    fn handle(&mut self, DeniedInHedge { last, peer }: DeniedInHedge, ctx: &mut Context<Self>) {
        self.step(Input::WithheldInHedge { last, peer }, ctx);
    }
}

impl Handler<BlocksDone> for StateSync {
    type Result = ();
    fn handle(&mut self, done: BlocksDone, ctx: &mut Context<Self>) {
        let awaited = self.ended(done.task);
        let (inputs, bytes) = self.fetched.blocks_done(done, awaited);
        self.status.bytes_fetched += bytes;
        for input in inputs {
            self.step(input, ctx);
        }
    }
}

impl Handler<GetSyncStatus> for StateSync {
    type Result = SyncStatus;
    fn handle(&mut self, _: GetSyncStatus, _: &mut Context<Self>) -> SyncStatus {
        let hedges = self.worker.hedge_budget.held();
        SyncStatus {
            advertised: self.deps.availability.borrow().highest,
            invalid_responses: self.status.invalid_responses
                + self.worker.lies_in_hedges.load(Ordering::Relaxed),
            hedges_won: self.worker.hedges_won.load(Ordering::Relaxed),
            hedges_late: self.worker.hedges_late.load(Ordering::Relaxed),
            hedges_given_way: self.worker.hedges_given_way.load(Ordering::Relaxed),
            hedges_moved: self.worker.hedges_moved.load(Ordering::Relaxed),
            hedges_alone: self.worker.hedges_alone.load(Ordering::Relaxed),
            hedge_parts_held: self.worker.hedge_parts_held.load(Ordering::Relaxed),
            hedges_sent: hedges.sent,
            most_hedges_at_once: hedges.most_hedges,
            most_hedged_bytes: hedges.most_bytes,
            ..self.status.clone()
        }
    }
}

impl Handler<GetSyncPlan> for StateSync {
    type Result = String;
    fn handle(&mut self, _: GetSyncPlan, _: &mut Context<Self>) -> String {
        self.driver.core().plan()
    }
}

impl Handler<ApplyLocal> for StateSync {
    type Result = ResponseFuture<Result<(), ApplyError>>;

    fn handle(&mut self, msg: ApplyLocal, ctx: &mut Context<Self>) -> Self::Result {
        // A caller retrying after timeouts behind a slow store queues a
        // write each time: at most `max_local_writes` wait at once.
        let Ok(place) = self.deps.local_writes.clone().try_acquire_owned() else {
            return Box::pin(async { Err(ApplyError::Busy) });
        };
        let (reply, answer) = oneshot::channel();
        self.write(
            Batch::local(msg.0),
            Origin::Local {
                reply,
                _place: place,
            },
            ctx,
        );
        Box::pin(async move { answer.await.unwrap_or(Err(ApplyError::Cancelled)) })
    }
}

impl Handler<StoreCertificate> for StateSync {
    type Result = ResponseFuture<Result<(), ApplyError>>;

    fn handle(&mut self, msg: StoreCertificate, ctx: &mut Context<Self>) -> Self::Result {
        // Certificate writes share the places of local commits' writes:
        // a caller retrying behind a slow store queues no more of them.
        let Ok(place) = self.deps.local_writes.clone().try_acquire_owned() else {
            return Box::pin(async { Err(ApplyError::Busy) });
        };
        let (reply, answer) = oneshot::channel();
        let (store, addr) = (self.deps.store.clone(), ctx.address());
        self.deps.runtime.spawn_blocking(move || {
            let certify = || apply::certify(store.as_ref(), msg.index, msg.blocks);
            let result = unless_panicked("certificate write", certify);
            drop(place);
            addr.do_send(CertificateStored { result, reply });
        });
        Box::pin(async move { answer.await.unwrap_or(Err(ApplyError::Cancelled)) })
    }
}

impl Handler<CertificateStored> for StateSync {
    type Result = ();
    fn handle(&mut self, stored: CertificateStored, ctx: &mut Context<Self>) {
        if let Ok(Some(commit)) = stored.result {
            self.advertise(commit, ctx);
        }
        let _ = stored.reply.send(stored.result.map(|_| ()));
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
    fn handle(&mut self, PruneDone(run): PruneDone, _: &mut Context<Self>) {
        let Some(advertised) = self.pruner.finished(&run) else {
            return;
        };
        if let Ok(pruned) = run {
            self.status.lowest_available = pruned.lowest;
            self.status.commits_pruned += pruned.commits;
        }
        // Advertised at once, deleted below a grace later.
        self.deps.availability.send_if_modified(|a| {
            let raised = advertised > a.lowest;
            a.lowest = a.lowest.max(advertised);
            raised
        });
    }
}
