//! The gRPC adapter: tonic calls in, actor messages out.
//!
//! The tonic service ([`P2pService`]) turns each call into a [`Call`] sent to
//! the [`GrpcAdapter`] actor, with the caller's identity from the TLS
//! handshake. The adapter's core decides, without I/O, whether the call is
//! admitted: ranges and reference counts within limits, fetches per peer
//! within their bound, PushCommit only from authenticated peers. Admitted
//! store reads (FetchCommits, FetchBlocks) then run on tokio's blocking pool,
//! not on the actor's thread, so one slow read never holds up other RPCs
//! (a FetchCommits answer still valid for the store's current version is
//! served from memory instead: `answers`);
//! each holds a [`Permit`] that returns its slot to the adapter when the call
//! ends, however it ends; a slot whose answer was sent in full is kept for
//! the next fetch of the same connection until the adapter takes it back
//! (`kept`), so a peer fetching batch after batch does not wait for the
//! actor each time.
//!
//! A call ends when its response has been handed to the transport, not when
//! it is built: [`SendDeadline`] cuts a response that is not sent within
//! `send_timeout` and releases all it holds, and each connection's buffered
//! answers stay within `max_buffered_bytes_per_connection` ([`budget`]).

mod actor;
mod answers;
pub mod budget;
mod core;
mod deadline;
mod kept;
mod messages;
mod serve;
mod service;

pub use actor::{Deps, GrpcAdapter, Permit};
pub use core::{Crowded, GrpcAdapterCore, Init, Limits};
pub use deadline::{DeadlineBody, FetchesRefused, SLICE_BYTES, SendDeadline, SendStats};
pub use messages::{Admission, Call, CallMsg, Code, Input, Output, Refusal, Work};
pub(crate) use serve::{Refused, commits_answer, minimal_certificate};
pub use service::{P2pService, RpcCounts, ServiceDeps};
