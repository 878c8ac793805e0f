use std::collections::BTreeMap;
use std::time::Duration;

use actix::{Actor, Context, Handler, Message, Supervised};
use tokio::sync::{oneshot, watch};

use super::core::{ActorFailure, Config, Input, Output, SupervisorCore};
use crate::Driver;
use crate::replay::Recorder;

/// What the guard of a failed actor is told to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Restart it in place.
    Restart,
    /// Leave it stopped: the node stops.
    Stop,
}

/// A supervised actor failed; `reply` takes the decision.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct ChildFailed {
    pub(crate) actor: &'static str,
    pub(crate) failure: ActorFailure,
    pub(crate) reply: oneshot::Sender<Decision>,
}

/// Why the node stopped on its own: an actor failed past the intensity
/// limit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeFailure {
    /// The actor.
    pub actor: String,
    /// Its failures within the window.
    pub failures: u32,
    /// The window of the intensity limit.
    pub window: Duration,
    /// Its last failure.
    pub last: ActorFailure,
}

impl std::fmt::Display for NodeFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the {} actor failed {} times within {:?}, more than its restarts allow \
             (max-actor-restarts); the node stopped. Last failure: {}",
            self.actor, self.failures, self.window, self.last
        )
    }
}

/// What the tree reports to the handle: restarts per actor, and the
/// failure that stopped the node, if one did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct TreeStatus {
    pub(crate) restarts: BTreeMap<String, u64>,
    pub(crate) failure: Option<NodeFailure>,
}

/// The root of the supervision tree: decides, through
/// [`SupervisorCore`], whether a failed actor is restarted, and publishes
/// what happened for the handle (`health()`, metrics, the node stopping).
pub struct Supervisor {
    driver: Driver<SupervisorCore>,
    status: watch::Sender<TreeStatus>,
}

impl Supervisor {
    /// A root supervisor publishing to `status`; it records a trace if
    /// `recorder` is given.
    pub(crate) fn new(
        config: Config,
        status: watch::Sender<TreeStatus>,
        recorder: Option<Recorder>,
    ) -> Self {
        Supervisor {
            driver: Driver::new(config, recorder),
            status,
        }
    }
}

impl Actor for Supervisor {
    type Context = Context<Self>;
}

/// The root is never restarted (its guard reports its own failure as the
/// node's); the trait is what its guard needs.
impl Supervised for Supervisor {}

impl Handler<ChildFailed> for Supervisor {
    type Result = ();
    fn handle(&mut self, msg: ChildFailed, _: &mut Context<Self>) {
        let window = Duration::from_millis(self.driver.core().restart_window_ms());
        let input = Input::Failed {
            actor: msg.actor.to_owned(),
            failure: msg.failure.clone(),
        };
        let mut decision = Decision::Stop;
        for output in self.driver.step(input) {
            match output {
                Output::Restart { actor, restarts } => {
                    tracing::warn!(%actor, restarts, failure = %msg.failure, "actor restarted");
                    self.status.send_modify(|s| {
                        s.restarts.insert(actor, restarts);
                    });
                    decision = Decision::Restart;
                }
                Output::GiveUp { actor, failures } => {
                    let failure = NodeFailure {
                        actor,
                        failures,
                        window,
                        last: msg.failure.clone(),
                    };
                    tracing::error!(%failure, "stopping the node");
                    self.status.send_modify(|s| {
                        s.failure.get_or_insert(failure);
                    });
                }
            }
        }
        let _ = msg.reply.send(decision);
    }
}
