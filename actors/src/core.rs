use std::fmt::Debug;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::faults::Faults;
use crate::replay::Recorder;

/// Virtual time: milliseconds since the shell started its core.
///
/// Cores never read a clock; the shell passes `now` with every input, and a
/// trace records it, so replay sees exactly the times the run saw.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, serde::Deserialize,
)]
pub struct Time(pub u64);

impl Time {
    /// `self + d`, saturating.
    pub fn after(self, d: Duration) -> Time {
        Time(self.0.saturating_add(d.as_millis() as u64))
    }

    /// Time from `earlier` to `self` (zero if `earlier` is later).
    pub fn since(self, earlier: Time) -> Duration {
        Duration::from_millis(self.0.saturating_sub(earlier.0))
    }
}

/// The logic of one actor, free of I/O.
///
/// A core is made from its [`Core::Init`] (configuration and RNG seed) and
/// then driven only through [`Core::handle`]. Given the same init and the
/// same inputs at the same times, it produces the same outputs: this is what
/// makes replay exact.
pub trait Core: Sized {
    /// The actor's name in traces.
    const NAME: &'static str;
    /// Everything needed to make a fresh core, including its RNG seed.
    type Init: Serialize + DeserializeOwned + Clone + Debug;
    /// What the core reacts to.
    type Input: Serialize + DeserializeOwned + Debug;
    /// What the core asks its shell to do, or answers.
    type Output: Serialize + DeserializeOwned + Debug + PartialEq;

    /// A fresh core.
    fn new(init: Self::Init) -> Self;

    /// Handles one input at time `now`.
    fn handle(&mut self, now: Time, input: Self::Input) -> Vec<Self::Output>;
}

/// What a shell holds: the core, the clock, and an optional recorder.
///
/// Shells call [`Driver::step`] for every input, so recording is the same
/// for every actor. A restarted actor keeps its driver's clock and
/// recorder: [`Driver::restart`] writes the new core's init as a header in
/// the middle of the trace, and replay starts a fresh core there.
pub struct Driver<C: Core> {
    core: C,
    start: Instant,
    recorder: Option<Recorder>,
    faults: Faults,
}

impl<C: Core> Driver<C> {
    /// A driver for a core made from `init`, recording to `recorder` if given.
    pub fn new(init: C::Init, recorder: Option<Recorder>) -> Self {
        let mut recorder = recorder;
        if let Some(r) = recorder.as_mut() {
            r.header(C::NAME, &init);
        }
        Driver {
            core: C::new(init),
            start: Instant::now(),
            recorder,
            faults: Faults::default(),
        }
    }

    /// Consults `faults` before every input (tests of supervision).
    pub(crate) fn with_faults(mut self, faults: Faults) -> Self {
        self.faults = faults;
        self
    }

    /// Replaces the core with a fresh one made from `init`, as a restart
    /// does; the clock and the recorder go on.
    pub fn restart(&mut self, init: C::Init) {
        if let Some(r) = self.recorder.as_mut() {
            r.header(C::NAME, &init);
        }
        self.core = C::new(init);
    }

    /// The current virtual time.
    pub fn now(&self) -> Time {
        Time(self.start.elapsed().as_millis() as u64)
    }

    /// Feeds `input` to the core at the current time, recording both the
    /// input and every output.
    pub fn step(&mut self, input: C::Input) -> Vec<C::Output> {
        let now = self.now();
        self.step_at(now, input)
    }

    /// Feeds `input` at time `now` rather than the clock's: for a
    /// simulation in virtual time, whose traces replay like any other.
    pub fn step_at(&mut self, now: Time, input: C::Input) -> Vec<C::Output> {
        // An injected panic comes before the input is recorded: the trace
        // holds only inputs the core handled.
        self.faults.on_input(C::NAME);
        if let Some(r) = self.recorder.as_mut() {
            r.record(C::NAME, now, "in", &input);
        }
        let outputs = self.core.handle(now, input);
        if let Some(r) = self.recorder.as_mut() {
            for output in &outputs {
                r.record(C::NAME, now, "out", output);
            }
        }
        outputs
    }

    /// The recorder, once the driver is done with it (a simulation's
    /// trace).
    pub fn into_recorder(self) -> Option<Recorder> {
        self.recorder
    }

    /// The core, for reads that are not inputs (metrics, debugging).
    pub fn core(&self) -> &C {
        &self.core
    }
}

/// Failures within a sliding window: the intensity limit of an OTP
/// supervisor, shared by the node's supervisor and the sync workers'.
#[derive(Clone, Debug, Default)]
pub(crate) struct Intensity {
    failures: Vec<Time>,
}

impl Intensity {
    /// Records a failure at `now` and returns how many fell within the
    /// last `window_ms`, this one included.
    pub(crate) fn record(&mut self, now: Time, window_ms: u64) -> u32 {
        self.failures
            .retain(|t| now.0.saturating_sub(t.0) < window_ms);
        self.failures.push(now);
        u32::try_from(self.failures.len()).unwrap_or(u32::MAX)
    }

    /// Forgets every failure.
    pub(crate) fn clear(&mut self) {
        self.failures.clear();
    }
}
