//! Pruning: how much of the chain the node keeps, and removing the rest
//! in bounded steps.
//!
//! Which commits to keep is decided here without I/O ([`target`],
//! [`next_step`]); [`run`] performs the steps on the store, one write
//! transaction each, at most `max_steps_per_run` a run, so a sync write
//! never waits behind a long prune. Pruning is announced before it is
//! done: each run returns the retention's target, which the node
//! advertises as its lowest available commit at once, and commits below a
//! target are deleted only once it was announced `grace_ms` ago. Peers
//! ask a node's availability every height query interval, so they rarely
//! ask for a commit just pruned; one that does asks the node's
//! availability again before it judges the NOT_FOUND, and sees the
//! commit is no longer claimed.
//! Pruning never removes a commit the registered executor has not taken,
//! nor the watermark commit (the store refuses that).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use soma_store::ConsensusStore;
use soma_types::{CommitIndex, Epoch};
use soma_wire::convert::Availability;
use tokio::sync::watch;

use crate::system::Execution;

/// How much of the chain a node keeps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Retention {
    /// Every commit since genesis (an archive node; the default).
    #[default]
    All,
    /// The last `n` commits, the watermark included (at least 1).
    Commits(u64),
    /// Every commit of the last `n` epochs, the current one included (at
    /// least 1).
    Epochs(u64),
}

/// Pruning settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Config {
    /// What to keep.
    pub retention: Retention,
    /// How often the store is pruned, in milliseconds.
    pub interval_ms: u64,
    /// Commits removed in one write transaction at most.
    pub batch_commits: u64,
    /// Write transactions of one prune run at most; the next run goes on.
    pub max_steps_per_run: u32,
    /// Time between advertising a new lowest commit and deleting below it,
    /// in milliseconds: longer than peers take to learn it. The node
    /// binary refuses less than twice the height query interval plus a
    /// request timeout; the library takes anything up to a year, 0
    /// included, so an embedder keeps to that rule itself.
    pub grace_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            retention: Retention::All,
            interval_ms: 10_000,
            batch_commits: 1_000,
            max_steps_per_run: 16,
            grace_ms: 30_000,
        }
    }
}

/// Where the node's chain stands, as far as pruning is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Chain {
    /// The highest commit whose certificate is held: the watermark on a
    /// node that syncs; local commits above it still wait for theirs. It
    /// is what the node advertises, so it and its certificate are kept.
    pub certified: CommitIndex,
    /// The lowest commit stored.
    pub lowest: CommitIndex,
    /// The epoch of the next commit.
    pub epoch: Epoch,
    /// The last commit the registered executor has taken, if one is.
    pub executed: Option<CommitIndex>,
}

/// The index the store may prune below (every commit under it removed),
/// or `None` if nothing is to go. `epoch_start(e)` is the first commit of
/// epoch `e`, if known.
pub fn target(
    retention: Retention,
    chain: Chain,
    epoch_start: impl FnOnce(Epoch) -> Option<CommitIndex>,
) -> Option<CommitIndex> {
    let keep_from = match retention {
        Retention::All => return None,
        Retention::Commits(n) => (chain.certified + 1).saturating_sub(n.max(1)),
        Retention::Epochs(n) => {
            let first_kept = chain.epoch.checked_sub(n.max(1) - 1)?;
            epoch_start(first_kept)?
        }
    };
    // The executor still needs the commit after the one it holds.
    let floor = chain.executed.map_or(u64::MAX, |taken| taken + 1);
    let target = keep_from.min(floor).min(chain.certified);
    (target > chain.lowest).then_some(target)
}

/// The next step towards `target`: at most `batch` commits above `lowest`.
pub fn next_step(lowest: CommitIndex, target: CommitIndex, batch: u64) -> Option<CommitIndex> {
    (target > lowest).then(|| target.min(lowest.saturating_add(batch.max(1))))
}

/// What a prune run did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pruned {
    /// The lowest commit stored after it.
    pub lowest: CommitIndex,
    /// Commits removed.
    pub commits: u64,
    /// Where the retention (and the executor) would have the store
    /// pruned to now: the lowest commit to advertise, deleted below once
    /// the grace has passed. `None` if nothing is to go.
    pub target: Option<CommitIndex>,
}

/// Prunes `store` towards the retention, deleting only below `ripe` (a
/// target announced a grace ago), never past `advertised` (the highest
/// commit the node advertises), one bounded write transaction per step,
/// at most `max_steps_per_run` steps. `executed` is called before each
/// step and returns the executor's position with a guard held across the
/// step, so an executor cannot register below a step in progress.
pub fn run<G>(
    store: &dyn ConsensusStore,
    config: &Config,
    (epoch, advertised): (Epoch, CommitIndex),
    ripe: Option<CommitIndex>,
    executed: impl Fn() -> (Option<CommitIndex>, G),
) -> Result<Pruned, soma_store::Error> {
    let start = store.lowest_available_commit()?;
    let mut lowest = start;
    let mut announced = None;
    for step in 0..=config.max_steps_per_run {
        let (executed, _guard) = executed();
        // What the node advertises, which its store may have passed by a
        // certificate written but not yet advertised.
        let served = store.highest_synced_commit()?.index.min(advertised);
        let chain = Chain {
            certified: store
                .highest_certified_in(lowest..=served)?
                .unwrap_or(lowest),
            lowest,
            epoch,
            executed,
        };
        let epoch_start = |e: Epoch| match e.checked_sub(1) {
            None => Some(1),
            Some(before) => store
                .last_commit_of_epoch(before)
                .ok()
                .flatten()
                .map(|last| last + 1),
        };
        let goal = target(config.retention, chain, epoch_start);
        if step == 0 {
            announced = goal;
        }
        let Some(goal) = goal.zip(ripe).map(|(g, r)| g.min(r)) else {
            break;
        };
        if step == config.max_steps_per_run {
            break;
        }
        let Some(next) = next_step(lowest, goal, config.batch_commits) else {
            break;
        };
        store.prune_below(next)?;
        lowest = store.lowest_available_commit()?;
        if lowest < next {
            // The store pruned less than asked (its watermark): done.
            break;
        }
    }
    Ok(Pruned {
        lowest,
        commits: lowest - start,
        target: announced,
    })
}

/// When the shell may prune, without a clock of its own: one run at a
/// time, and each target advertised with the time it was, so a run
/// deletes only below a target advertised at least a grace ago.
#[derive(Debug, Default)]
pub(super) struct Schedule {
    running: bool,
    /// Targets advertised and not yet a grace old, oldest first (one a
    /// rise at most, so at most a grace's worth of runs).
    announced: VecDeque<(Instant, CommitIndex)>,
    /// The highest target advertised at least a grace ago.
    ripe: Option<CommitIndex>,
}

impl Schedule {
    /// Starts a run at `now` unless one is under way: `Some` with the
    /// index the run may delete below (`None` inside: nothing yet).
    pub(super) fn start(&mut self, now: Instant, grace: Duration) -> Option<Option<CommitIndex>> {
        if self.running {
            return None;
        }
        while let Some(&(at, target)) = self.announced.front()
            && now.saturating_duration_since(at) >= grace
        {
            self.ripe = self.ripe.max(Some(target));
            self.announced.pop_front();
        }
        self.running = true;
        Some(self.ripe)
    }

    /// A run ended at `now`: a target above every one advertised is
    /// advertised from now. Returns the lowest commit to advertise.
    pub(super) fn finished(&mut self, now: Instant, pruned: &Pruned) -> CommitIndex {
        self.running = false;
        let last = self.announced.back().map(|(_, t)| *t).max(self.ripe);
        if let Some(target) = pruned.target.filter(|t| Some(*t) > last) {
            self.announced.push_back((now, target));
        }
        pruned.target.unwrap_or(0).max(pruned.lowest)
    }

    /// A run failed: the next interval tries again.
    pub(super) fn failed(&mut self) {
        self.running = false;
    }
}

/// The shell of pruning: runs on the blocking pool, one run at a time, as
/// the [`Schedule`] allows. It outlives a restart of the actor, so a run
/// under way still reports.
pub(super) struct Pruner {
    schedule: Schedule,
    config: Config,
    store: Arc<dyn ConsensusStore>,
    execution: Execution,
    /// The next commit the archive writer will archive, if the node
    /// writes an archive: nothing from it on is pruned.
    archived: Option<watch::Receiver<CommitIndex>>,
    /// What the node advertises: its highest commit is never pruned.
    advertised: watch::Receiver<Availability>,
    runtime: tokio::runtime::Handle,
}

impl Pruner {
    pub(super) fn new(deps: &super::Deps) -> Self {
        Pruner {
            schedule: Schedule::default(),
            config: deps.prune.clone(),
            store: deps.store.clone(),
            execution: deps.execution.clone(),
            archived: deps.archived.clone(),
            advertised: deps.availability.subscribe(),
            runtime: deps.runtime.clone(),
        }
    }

    /// Starts a run towards the retention, with `epoch` the epoch of the
    /// next commit, unless the node keeps everything or a run is under
    /// way; `done` gets its result on the blocking pool. A panic in the run
    /// is reported like a store error, so pruning goes on next time.
    pub(super) fn start(
        &mut self,
        epoch: Epoch,
        done: impl FnOnce(Result<Pruned, soma_store::Error>) + Send + 'static,
    ) {
        let grace = Duration::from_millis(self.config.grace_ms);
        if self.config.retention == Retention::All {
            return;
        }
        let Some(mut ripe) = self.schedule.start(Instant::now(), grace) else {
            return;
        };
        if let Some(archived) = &self.archived {
            ripe = ripe.map(|r| r.min(*archived.borrow()));
        }
        let (store, config) = (self.store.clone(), self.config.clone());
        let advertised = self.advertised.borrow().highest;
        let execution = self.execution.clone();
        self.runtime.spawn_blocking(move || {
            let run = || {
                let position = (epoch, advertised);
                run(store.as_ref(), &config, position, ripe, || execution.hold())
            };
            let result = super::apply::unless_panicked("prune run", run);
            done(result);
        });
    }

    /// A run ended: the lowest commit to advertise now, if it succeeded
    /// (commits below it are deleted a grace later).
    pub(super) fn finished(
        &mut self,
        result: &Result<Pruned, soma_store::Error>,
    ) -> Option<CommitIndex> {
        match result {
            Ok(pruned) => {
                if pruned.commits > 0 {
                    tracing::debug!(lowest = pruned.lowest, pruned.commits, "store pruned");
                }
                Some(self.schedule.finished(Instant::now(), pruned))
            }
            Err(e) => {
                self.schedule.failed();
                tracing::warn!(%e, "pruning failed; tried again at the next interval");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(certified: u64, lowest: u64, epoch: Epoch, executed: Option<u64>) -> Chain {
        Chain {
            certified,
            lowest,
            epoch,
            executed,
        }
    }

    #[test]
    fn keeping_everything_prunes_nothing() {
        let c = chain(10_000, 1, 5, None);
        assert_eq!(target(Retention::All, c, |_| Some(1)), None);
    }

    #[test]
    fn the_last_n_commits_are_kept_with_the_watermark() {
        let c = chain(1_000, 1, 0, None);
        // Commits 901..=1000 are kept.
        assert_eq!(target(Retention::Commits(100), c, |_| None), Some(901));
        // Keeping none still keeps the watermark commit.
        assert_eq!(target(Retention::Commits(0), c, |_| None), Some(1_000));
        // More than the chain: nothing to prune.
        assert_eq!(target(Retention::Commits(1_000), c, |_| None), None);
        // Already pruned there.
        let c = chain(1_000, 901, 0, None);
        assert_eq!(target(Retention::Commits(100), c, |_| None), None);
    }

    #[test]
    fn the_last_n_epochs_are_kept_from_the_first_commit_of_the_oldest() {
        let starts = |e: Epoch| Some(1 + e * 500);
        let c = chain(2_200, 1, 4, None);
        // Epochs 3 and 4 are kept: from commit 1501.
        assert_eq!(target(Retention::Epochs(2), c, starts), Some(1_501));
        // The current epoch alone.
        assert_eq!(target(Retention::Epochs(1), c, starts), Some(2_001));
        // More epochs than there are: nothing.
        assert_eq!(target(Retention::Epochs(5), c, starts), None);
        // An epoch whose start is unknown: nothing.
        assert_eq!(target(Retention::Epochs(2), c, |_| None), None);
    }

    #[test]
    fn nothing_the_executor_has_not_taken_is_pruned() {
        // The executor holds 400: it needs 401 on.
        let c = chain(1_000, 1, 0, Some(400));
        assert_eq!(target(Retention::Commits(100), c, |_| None), Some(401));
        // An executor that has taken nothing yet keeps everything.
        let c = chain(1_000, 1, 0, Some(0));
        assert_eq!(target(Retention::Commits(100), c, |_| None), None);
    }

    #[test]
    fn steps_are_bounded_by_the_batch() {
        assert_eq!(next_step(1, 2_501, 1_000), Some(1_001));
        assert_eq!(next_step(1_001, 2_501, 1_000), Some(2_001));
        assert_eq!(next_step(2_001, 2_501, 1_000), Some(2_501));
        assert_eq!(next_step(2_501, 2_501, 1_000), None);
        // A zero batch still moves.
        assert_eq!(next_step(5, 10, 0), Some(6));
    }

    /// Commits 1..=250 of a 4-validator chain, one per write, each with its
    /// certificate if `certified` says so.
    fn store_of_250(certified: impl Fn(u64) -> bool) -> soma_store::MemStore {
        use soma_chain::{ChainBuilder, ChainConfig};
        use soma_store::{MemStore, SyncedBatch};
        let built = ChainBuilder::new(ChainConfig::validators(4)).build(250);
        let store = MemStore::new(built.genesis());
        for i in 1..=250 {
            let certificate = if certified(i) {
                built.certificate(i).to_vec()
            } else {
                Vec::new()
            };
            store
                .write_synced_batch(SyncedBatch {
                    commits: vec![built.commit(i)],
                    blocks: built.blocks_of(i).to_vec(),
                    certificate,
                    next_committee: None,
                })
                .unwrap();
        }
        store
    }

    #[test]
    fn the_highest_certified_commit_is_kept_with_the_commits_above_it() {
        // Local commits 201..=250 still wait for their certificates: the
        // node advertises 200, and keeps what it advertises.
        let store = store_of_250(|i| i % 100 == 0);
        let config = |n| Config {
            retention: Retention::Commits(n),
            ..Config::default()
        };
        let announced = |n| run(&store, &config(n), (0, 250), None, || (None, ())).unwrap();
        assert_eq!(announced(50).target, Some(151));
        assert_eq!(announced(0).target, Some(200));
        // A certificate of 250 written but not yet advertised: pruning
        // keeps to the advertised 200.
        let store = store_of_250(|i| i % 50 == 0);
        let announced = run(&store, &config(0), (0, 200), None, || (None, ())).unwrap();
        assert_eq!(announced.target, Some(200));
        // Nothing certified: nothing could be served, nothing is pruned.
        let store = store_of_250(|_| false);
        let pruned = run(&store, &config(0), (0, 250), None, || (None, ())).unwrap();
        assert_eq!(pruned.target, None);
    }

    #[test]
    fn a_run_prunes_in_bounded_steps_below_what_was_announced() {
        let store = store_of_250(|_| true);
        let config = Config {
            retention: Retention::Commits(50),
            batch_commits: 60,
            max_steps_per_run: 2,
            ..Config::default()
        };
        let with = |taken: Option<u64>| move || (taken, ());
        // Nothing announced yet: nothing deleted, the target is announced.
        let pruned = run(&store, &config, (0, 250), None, with(None)).unwrap();
        let announced = Pruned {
            lowest: 1,
            commits: 0,
            target: Some(201),
        };
        assert_eq!(pruned, announced);
        assert!(store.commit(1).unwrap().is_some());
        // Announced: two steps of 60 a run, then the next run goes on.
        let pruned = run(&store, &config, (0, 250), Some(201), with(None)).unwrap();
        assert_eq!((pruned.lowest, pruned.commits), (121, 120));
        assert!(store.commit(120).unwrap().is_none());
        assert!(store.commit(121).unwrap().is_some());
        // The executor holds 150: pruning stops below 151.
        let pruned = run(&store, &config, (0, 250), Some(201), with(Some(150))).unwrap();
        assert_eq!(
            pruned,
            Pruned {
                lowest: 151,
                commits: 30,
                target: Some(151)
            }
        );
        // Only as far as was announced: 180, though the target is 201.
        let pruned = run(&store, &config, (0, 250), Some(180), with(None)).unwrap();
        assert_eq!((pruned.lowest, pruned.target), (180, Some(201)));
        let pruned = run(&store, &config, (0, 250), Some(201), with(None)).unwrap();
        assert_eq!(pruned.lowest, 201);
        assert_eq!(store.lowest_available_commit().unwrap(), 201);
        // Retention reached: nothing more.
        let pruned = run(&store, &config, (0, 250), Some(250), with(None)).unwrap();
        assert_eq!(
            pruned,
            Pruned {
                lowest: 201,
                commits: 0,
                target: None
            }
        );
    }

    #[test]
    fn a_run_deletes_only_below_targets_advertised_a_grace_ago_one_run_at_a_time() {
        let (t0, grace) = (Instant::now(), Duration::from_secs(30));
        let at = |s: u64| t0 + Duration::from_secs(s);
        let ran = |lowest, target| Pruned {
            lowest,
            commits: 0,
            target,
        };
        let mut schedule = Schedule::default();
        // Nothing advertised yet: the first run deletes nothing.
        assert_eq!(schedule.start(at(0), grace), Some(None));
        // One run at a time.
        assert_eq!(schedule.start(at(1), grace), None);
        // Its target is advertised at once.
        assert_eq!(schedule.finished(at(1), &ran(1, Some(101))), 101);
        // Not yet a grace old.
        assert_eq!(schedule.start(at(30), grace), Some(None));
        assert_eq!(schedule.finished(at(30), &ran(1, Some(151))), 151);
        // 101 is a grace old at 31 s, 151 not until 60 s.
        assert_eq!(schedule.start(at(31), grace), Some(Some(101)));
        assert_eq!(schedule.finished(at(31), &ran(101, Some(151))), 151);
        assert_eq!(schedule.start(at(59), grace), Some(Some(101)));
        // A failed run advertises nothing and frees the schedule.
        schedule.failed();
        assert_eq!(schedule.start(at(60), grace), Some(Some(151)));
        // A target no higher than one advertised is not queued again: the
        // queue holds one entry a rise, however often runs end.
        assert_eq!(schedule.finished(at(60), &ran(151, Some(201))), 201);
        for t in 61..90 {
            assert_eq!(schedule.start(at(t), grace), Some(Some(151)));
            assert_eq!(schedule.finished(at(t), &ran(151, Some(201))), 201);
        }
        assert_eq!(schedule.announced.len(), 1);
        assert_eq!(schedule.start(at(90), grace), Some(Some(201)));
        // Nothing to go: the lowest stored is what is advertised.
        assert_eq!(schedule.finished(at(101), &ran(201, None)), 201);
    }
}
