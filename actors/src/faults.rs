//! Fault injection, for tests of supervision.
//!
//! With the `testing` feature a node can be given a `FaultPlan`: panics
//! in an actor's handler on its Nth input (or on every input), panics or
//! failures in the sync workers of given batches, panics in dials,
//! StateSync's questions to PeerHeights held unanswered, and Connections'
//! probes held before they are sent.
//! Without the feature there is no plan to give, and the hooks below
//! compile to nothing, so a production build carries no way to trigger
//! them.

use soma_types::CommitIndex;

use crate::state_sync::Failure;

#[cfg(feature = "testing")]
pub use plan::{FAULTS_ENV, FaultPlan};

/// The faults a shell or a sync worker consults: a plan with the `testing`
/// feature, nothing without it.
#[derive(Clone, Default)]
pub(crate) struct Faults {
    #[cfg(feature = "testing")]
    plan: Option<std::sync::Arc<FaultPlan>>,
}

impl Faults {
    /// Faults following `plan`.
    #[cfg(feature = "testing")]
    pub(crate) fn new(plan: Option<std::sync::Arc<FaultPlan>>) -> Self {
        Faults { plan }
    }

    /// Called by a shell before its core handles an input: panics if the
    /// plan says this input of `actor` does.
    #[inline]
    pub(crate) fn on_input(&self, actor: &'static str) {
        #[cfg(feature = "testing")]
        if let Some(plan) = &self.plan {
            plan.on_input(actor);
        }
        #[cfg(not(feature = "testing"))]
        let _ = actor;
    }

    /// Called by a dialling task before it connects: panics if the plan
    /// has dials left to panic.
    #[inline]
    pub(crate) fn on_dial(&self) {
        #[cfg(feature = "testing")]
        if let Some(plan) = &self.plan {
            plan.on_dial();
        }
    }

    /// Called by StateSync at each tick, before it decides whether to ask
    /// PeerHeights for the highest commit known: counts the tick.
    #[inline]
    pub(crate) fn on_tick(&self) {
        #[cfg(feature = "testing")]
        if let Some(plan) = &self.plan {
            plan.on_tick();
        }
    }

    /// What a tick's question to PeerHeights waits for before it is sent:
    /// counts the question, and holds it while the plan holds such
    /// questions (as a PeerHeights held up would). Ready at once without
    /// a plan.
    // Not an `async fn`: the future must not borrow `self`. Without the
    // feature the body is that future alone, which clippy would have
    // written as one.
    #[cfg_attr(not(feature = "testing"), allow(clippy::manual_async_fn))]
    pub(crate) fn highest_question(&self) -> impl Future<Output = ()> + Send + 'static {
        #[cfg(feature = "testing")]
        let plan = self.plan.clone();
        async move {
            #[cfg(feature = "testing")]
            if let Some(plan) = plan {
                plan.highest_questions.pass().await;
            }
        }
    }

    /// What a probe of Connections waits for before it checks its
    /// connection: counts the probe, and holds it while the plan holds
    /// probes. Ready at once without a plan.
    #[cfg_attr(not(feature = "testing"), allow(clippy::manual_async_fn))]
    pub(crate) fn probe(&self) -> impl Future<Output = ()> + Send + 'static {
        #[cfg(feature = "testing")]
        let plan = self.plan.clone();
        async move {
            #[cfg(feature = "testing")]
            if let Some(plan) = plan {
                plan.probes.pass().await;
            }
        }
    }

    /// Called by a probe once its verdict (`broken` or not) is on its way
    /// to Connections.
    #[inline]
    pub(crate) fn on_probe_reported(&self, broken: bool) {
        #[cfg(feature = "testing")]
        if let Some(plan) = &self.plan {
            plan.on_probe_reported(broken);
        }
        #[cfg(not(feature = "testing"))]
        let _ = broken;
    }

    /// Called by a sync worker for the batch starting at `batch`: panics,
    /// or fails as a peer's transport would, if the plan says so.
    #[inline]
    pub(crate) fn on_worker(&self, batch: CommitIndex) -> Result<(), Failure> {
        #[cfg(feature = "testing")]
        if let Some(plan) = &self.plan {
            return plan.on_worker(batch);
        }
        let _ = batch;
        Ok(())
    }
}

#[cfg(feature = "testing")]
mod plan {
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};

    use tokio::sync::Notify;

    use soma_types::CommitIndex;

    use crate::state_sync::Failure;

    /// Environment variable a node started by [`crate::P2pBuilder`] reads
    /// a plan from when its configuration has none (with the `testing`
    /// feature only): comma-separated `actor=N` (its Nth input panics) or
    /// `actor=always`, for instance `state_sync=always`.
    pub const FAULTS_ENV: &str = "SOMA_FAULTS";

    /// A condition of the system a fault waits for (read when the actor
    /// gets an input).
    type Condition = Arc<dyn Fn() -> bool + Send + Sync>;

    /// When an actor's handler panics.
    #[derive(Clone)]
    enum Trigger {
        /// On the input this many inputs from now (1: the next one), once.
        Nth(u64),
        /// On every input.
        Always,
        /// On the first input that finds the condition true, once.
        When(Condition),
    }

    impl std::fmt::Debug for Trigger {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            match self {
                Trigger::Nth(n) => write!(f, "Nth({n})"),
                Trigger::Always => write!(f, "Always"),
                Trigger::When(_) => write!(f, "When(..)"),
            }
        }
    }

    /// Faults to inject into a node.
    #[derive(Debug, Default)]
    pub struct FaultPlan {
        /// Batch start → sync workers left to panic.
        pub panics: Mutex<HashMap<CommitIndex, u32>>,
        /// Batch start → sync workers left to fail with a transport error.
        pub failures: Mutex<HashMap<CommitIndex, u32>>,
        /// Batch start → sync workers left to fail as if their peer had
        /// sent invalid data (no peer is asked, so none is blamed).
        pub invalid: Mutex<HashMap<CommitIndex, u32>>,
        /// Dials left to panic in their task, before they connect.
        pub dial_panics: Mutex<u32>,
        /// Actor name → when its handler panics.
        actors: Mutex<HashMap<String, Trigger>>,
        /// Actor name → panics injected so far.
        injected: Mutex<HashMap<String, u64>>,
        /// StateSync's ticks so far.
        ticks: AtomicU64,
        /// StateSync's ticks' questions to PeerHeights.
        pub(super) highest_questions: Gate,
        /// Connections' probes, before they check their connection.
        pub(super) probes: Gate,
        /// Probes that found their connection broken and said so to
        /// Connections, so far.
        probes_broken: AtomicU64,
    }

    /// A point tasks pass, counted, and held there while it is closed.
    #[derive(Debug, Default)]
    pub(super) struct Gate {
        /// Tasks come to the gate so far, held or not.
        passed: AtomicU64,
        /// Whether the gate holds the tasks that come to it.
        closed: Mutex<bool>,
        /// Wakes the held tasks once it opens.
        opened: Notify,
    }

    impl Gate {
        /// Closes the gate (`true`) or opens it (`false`), letting go of
        /// every task it held.
        fn close(&self, closed: bool) {
            *lock(&self.closed) = closed;
            if !closed {
                self.opened.notify_waiters();
            }
        }

        fn passed(&self) -> u64 {
            self.passed.load(Ordering::Relaxed)
        }

        /// Counts the task, then returns once the gate is open.
        pub(super) async fn pass(&self) {
            self.passed.fetch_add(1, Ordering::Relaxed);
            loop {
                // Registered before the flag is read, so an opening
                // between the two is not missed.
                let opened = self.opened.notified();
                let mut opened = std::pin::pin!(opened);
                opened.as_mut().enable();
                if !*lock(&self.closed) {
                    return;
                }
                opened.await;
            }
        }
    }

    fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
        m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    impl FaultPlan {
        /// The handler of `actor` (its core's name, e.g. `"state_sync"`)
        /// panics on its `nth` input from now (1: the next), once.
        pub fn panic_actor(&self, actor: &str, nth: u64) {
            lock(&self.actors).insert(actor.to_owned(), Trigger::Nth(nth.max(1)));
        }

        /// The handler of `actor` panics once, on its first input that
        /// finds `condition` true: a fault started when the system reached a
        /// state (say, a store's watermark halfway to the tip).
        pub fn panic_actor_when(
            &self,
            actor: &str,
            condition: impl Fn() -> bool + Send + Sync + 'static,
        ) {
            lock(&self.actors).insert(actor.to_owned(), Trigger::When(Arc::new(condition)));
        }

        /// The handler of `actor` panics on every input from now on.
        pub fn panic_actor_always(&self, actor: &str) {
            lock(&self.actors).insert(actor.to_owned(), Trigger::Always);
        }

        /// Holds (`true`) or lets go (`false`) StateSync's questions to
        /// PeerHeights for the highest commit known, as a PeerHeights that
        /// does not answer would hold them; those held go once let go.
        pub fn hold_highest_questions(&self, hold: bool) {
            self.highest_questions.close(hold);
        }

        /// Holds (`true`) or lets go (`false`) Connections' probes before
        /// they check their connection; those held check it once let go.
        pub fn hold_probes(&self, hold: bool) {
            self.probes.close(hold);
        }

        /// Probes Connections has started (held or not) so far.
        pub fn probes(&self) -> u64 {
            self.probes.passed()
        }

        /// Probes that found their connection broken so far, counted once
        /// their verdict is sent: a message sent to Connections after this
        /// count moved is handled after that verdict.
        pub fn probes_broken(&self) -> u64 {
            self.probes_broken.load(Ordering::Acquire)
        }

        pub(super) fn on_probe_reported(&self, broken: bool) {
            if broken {
                // Released after the verdict was sent, for the promise
                // above.
                self.probes_broken.fetch_add(1, Ordering::Release);
            }
        }

        /// StateSync's ticks so far.
        pub fn ticks(&self) -> u64 {
            self.ticks.load(Ordering::Relaxed)
        }

        /// Questions StateSync's ticks have sent PeerHeights (or had held)
        /// so far.
        pub fn highest_questions(&self) -> u64 {
            self.highest_questions.passed()
        }

        pub(super) fn on_tick(&self) {
            self.ticks.fetch_add(1, Ordering::Relaxed);
        }

        /// Panics injected into `actor` so far (`"dial"`: into dials).
        pub fn injected(&self, actor: &str) -> u64 {
            lock(&self.injected).get(actor).copied().unwrap_or(0)
        }

        /// A plan from [`FAULTS_ENV`], if it is set and well-formed.
        pub fn from_env() -> Option<Self> {
            let text = std::env::var(FAULTS_ENV).ok()?;
            let plan = FaultPlan::default();
            for entry in text.split(',').filter(|e| !e.trim().is_empty()) {
                let (actor, when) = entry.trim().split_once('=')?;
                match when {
                    "always" => plan.panic_actor_always(actor),
                    n => plan.panic_actor(actor, n.parse().ok()?),
                }
            }
            Some(plan)
        }

        pub(super) fn on_input(&self, actor: &'static str) {
            let condition = {
                let mut actors = lock(&self.actors);
                match actors.get_mut(actor) {
                    Some(Trigger::Always) => None,
                    Some(Trigger::Nth(n)) if *n <= 1 => {
                        actors.remove(actor);
                        None
                    }
                    Some(Trigger::Nth(n)) => {
                        *n -= 1;
                        return;
                    }
                    Some(Trigger::When(c)) => Some(c.clone()),
                    None => return,
                }
            };
            // Read outside the lock: the condition may take locks of its own.
            if let Some(condition) = condition {
                if !condition() {
                    return;
                }
                lock(&self.actors).remove(actor);
            }
            *lock(&self.injected).entry(actor.to_owned()).or_default() += 1;
            panic!("injected panic in the {actor} actor");
        }

        pub(super) fn on_dial(&self) {
            {
                let mut left = lock(&self.dial_panics);
                if *left == 0 {
                    return;
                }
                *left -= 1;
            }
            *lock(&self.injected).entry("dial".to_owned()).or_default() += 1;
            panic!("injected panic in a dial");
        }

        pub(super) fn on_worker(&self, batch: CommitIndex) -> Result<(), Failure> {
            if take(&self.panics, batch) {
                panic!("injected panic in a sync worker for batch {batch}");
            }
            if take(&self.failures, batch) {
                return Err(Failure::Transport);
            }
            if take(&self.invalid, batch) {
                let error = soma_types::Error::Malformed("injected".to_owned());
                return Err(Failure::Invalid(error));
            }
            Ok(())
        }
    }

    fn take(map: &Mutex<HashMap<CommitIndex, u32>>, batch: CommitIndex) -> bool {
        match lock(map).get_mut(&batch) {
            Some(n) if *n > 0 => {
                *n -= 1;
                true
            }
            _ => false,
        }
    }
}
