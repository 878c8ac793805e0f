use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::core::Intensity;
use crate::{Core, Time};

/// The intensity limit of the node's supervisor.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Config {
    /// Restarts of one actor allowed within `restart_window_ms`; one more
    /// failure and the node stops.
    pub max_restarts: u32,
    /// The window, in milliseconds.
    pub restart_window_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_restarts: 5,
            restart_window_ms: 60_000,
        }
    }
}

/// How an actor failed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActorFailure {
    /// Its handler, a timer or a future of its own panicked.
    Panicked {
        /// The panic's message.
        message: String,
    },
    /// It stopped while the node runs.
    Stopped,
}

impl std::fmt::Display for ActorFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ActorFailure::Panicked { message } => write!(f, "panicked: {message}"),
            ActorFailure::Stopped => write!(f, "stopped"),
        }
    }
}

/// Inputs of the supervisor's core.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Input {
    /// A supervised actor failed.
    Failed {
        /// The actor's name.
        actor: String,
        /// How.
        failure: ActorFailure,
    },
}

/// Outputs of the supervisor's core.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Output {
    /// Restart the actor; `restarts` counts its restarts so far, this one
    /// included.
    Restart {
        /// The actor's name.
        actor: String,
        /// Its restarts so far.
        restarts: u64,
    },
    /// The actor failed more than `max_restarts` times within the window:
    /// stop it, and the node.
    GiveUp {
        /// The actor's name.
        actor: String,
        /// Its failures within the window.
        failures: u32,
    },
}

#[derive(Debug, Default)]
struct Child {
    failures: Intensity,
    restarts: u64,
}

/// The logic of the root supervisor: the OTP intensity limit, per actor.
/// Once it gives up on one actor it restarts none: the node is stopping.
pub struct SupervisorCore {
    config: Config,
    children: BTreeMap<String, Child>,
    gave_up: bool,
}

impl SupervisorCore {
    /// The window of the intensity limit, in milliseconds.
    pub fn restart_window_ms(&self) -> u64 {
        self.config.restart_window_ms
    }
}

impl Core for SupervisorCore {
    const NAME: &'static str = "supervisor";
    type Init = Config;
    type Input = Input;
    type Output = Output;

    fn new(config: Config) -> Self {
        SupervisorCore {
            config,
            children: BTreeMap::new(),
            gave_up: false,
        }
    }

    fn handle(&mut self, now: Time, input: Input) -> Vec<Output> {
        let Input::Failed { actor, failure: _ } = input;
        let child = self.children.entry(actor.clone()).or_default();
        let failures = child.failures.record(now, self.config.restart_window_ms);
        if self.gave_up || failures > self.config.max_restarts {
            self.gave_up = true;
            return vec![Output::GiveUp { actor, failures }];
        }
        child.restarts += 1;
        vec![Output::Restart {
            actor,
            restarts: child.restarts,
        }]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failed(c: &mut SupervisorCore, t: u64, actor: &str) -> Output {
        let input = Input::Failed {
            actor: actor.into(),
            failure: ActorFailure::Stopped,
        };
        c.handle(Time(t), input).pop().unwrap()
    }

    fn restart(actor: &str, restarts: u64) -> Output {
        Output::Restart {
            actor: actor.into(),
            restarts,
        }
    }

    #[test]
    fn restarts_up_to_the_limit_within_the_window_then_gives_up() {
        let mut c = SupervisorCore::new(Config {
            max_restarts: 2,
            restart_window_ms: 1_000,
        });
        assert_eq!(failed(&mut c, 0, "a"), restart("a", 1));
        assert_eq!(failed(&mut c, 100, "a"), restart("a", 2));
        assert_eq!(
            failed(&mut c, 200, "a"),
            Output::GiveUp {
                actor: "a".into(),
                failures: 3
            }
        );
        // The node is stopping: no actor is restarted any more.
        assert_eq!(
            failed(&mut c, 300, "b"),
            Output::GiveUp {
                actor: "b".into(),
                failures: 1
            }
        );
    }

    #[test]
    fn failures_outside_the_window_and_of_other_actors_do_not_count() {
        let mut c = SupervisorCore::new(Config {
            max_restarts: 1,
            restart_window_ms: 1_000,
        });
        assert_eq!(failed(&mut c, 0, "a"), restart("a", 1));
        assert_eq!(failed(&mut c, 10, "b"), restart("b", 1));
        // The first failure of `a` left the window: one failure within it.
        assert_eq!(failed(&mut c, 1_000, "a"), restart("a", 2));
        assert_eq!(
            failed(&mut c, 1_500, "a"),
            Output::GiveUp {
                actor: "a".into(),
                failures: 2
            }
        );
    }
}
