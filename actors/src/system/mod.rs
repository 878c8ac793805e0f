//! The one handle a node embeds.
//!
//! [`P2pBuilder`] takes the configuration, the node's network key, the
//! genesis committee and a store; [`P2pBuilder::start`] starts the actors in
//! an actix System on a dedicated thread and the gRPC server on a tokio
//! runtime (owned, or one the node passes in), and returns a [`P2pHandle`]:
//! `Clone + Send + Sync`, usable from any thread or runtime.

//!
//! The actors run under a supervision tree (see [`crate::supervisor`]):
//! an actor that panics is restarted in place, its address unchanged, so
//! the handle keeps working; one that fails past the intensity limit stops
//! the node, which [`P2pHandle::health`] and [`P2pHandle::failed`] report.

mod allocator;
mod builder;
mod check;
mod commits;
mod config;
mod handle;
mod reserved;
mod store_gate;
mod tree;

pub use crate::state_sync::Retention;
pub use crate::supervisor::NodeFailure;
pub use allocator::{ARENA_ENV, limit_allocator_arenas};
pub use builder::{MAX_STANDARD_ANSWER_BYTES, MAX_STANDARD_REQUEST_BYTES, P2pBuilder, StartError};
pub use check::InvalidSetting;
pub(crate) use commits::Execution;
pub use commits::{CommitStream, StreamError};
pub use config::P2pConfig;
pub use handle::{ActorHealth, Health, InboundConnections, LocalCommit, P2pError, P2pHandle};
