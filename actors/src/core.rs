use std::fmt::Debug;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde::de::DeserializeOwned;

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
/// for every actor.
pub struct Driver<C: Core> {
    core: C,
    start: Instant,
    recorder: Option<Recorder>,
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
        }
    }

    /// The current virtual time.
    pub fn now(&self) -> Time {
        Time(self.start.elapsed().as_millis() as u64)
    }

    /// Feeds `input` to the core at the current time, recording both the
    /// input and every output.
    pub fn step(&mut self, input: C::Input) -> Vec<C::Output> {
        let now = self.now();
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

    /// The core, for reads that are not inputs (metrics, debugging).
    pub fn core(&self) -> &C {
        &self.core
    }
}
