//! The supervision tree: root → long-lived actors → sync workers.
//!
//! actix restarts an actor only when it stops itself, and a panic in a
//! handler ends the actor's task and closes its mailbox. So each
//! long-lived actor runs under a guard (`start`) of ours: a future that
//! polls the actor's context under `catch_unwind`. When the actor panics
//! (in a handler, a timer or a future of its own) or stops, the guard asks
//! the root [`Supervisor`] what to do and waits for the answer. The root's
//! core applies the OTP intensity limit (at most `max_restarts` restarts
//! within `restart_window`, per actor): within it the guard restarts the
//! actor in place, through `actix::Supervised::restarting`, which rebuilds
//! its state from the store and its dependencies; past it the root gives
//! up and the node stops.
//!
//! A restart keeps the actor's mailbox, so its address outlives the
//! restart: other actors, the gRPC service and the `P2pHandle` keep the
//! addresses they hold, subscriptions wired at start stay valid, and the
//! messages queued behind the one that panicked are handled by the
//! restarted actor. The caller of the message that panicked sees its
//! mailbox closed (a gRPC caller gets UNAVAILABLE). Sync workers are the
//! tree's third level, supervised by the StateSync core's own policy.

mod actor;
mod core;
mod guard;

pub(crate) use actor::TreeStatus;
pub use actor::{NodeFailure, Supervisor};
pub use core::{ActorFailure, Config, Input, Output, SupervisorCore};
pub(crate) use guard::{Parent, panic_message, start};
