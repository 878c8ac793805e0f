//! The actors of soma-p2p and the one handle a node embeds.
//!
//! Every actor is two pieces, in the spirit of quinn-proto and raft-rs:
//!
//! - a **core**: a plain struct implementing [`Core`], whose
//!   `handle(now, input) -> outputs` holds all of the actor's logic. It does
//!   no I/O, reads no clock and owns its randomness (a seeded RNG), so unit
//!   tests drive it with a fake clock and the replay harness can re-run it
//!   exactly;
//! - a **shell**: a thin actix actor that turns mailbox messages into inputs,
//!   passes the time, performs the outputs, and can record every input and
//!   output to a trace ([`replay`]).
//!
//! The actors: [`connections`] (the one place connections are made),
//! [`discovery`] (finding peers), [`peer_heights`] (how far each peer's
//! chain reaches, and fetch slots on peers), [`state_sync`] (catching up),
//! [`verifier`] (signature and rule checks on a thread pool) and [`grpc`]
//! (the server's admission). They run under the [`supervisor`] tree, and a
//! node embeds them through [`P2pHandle`] ([`system`]).
//!
//! Features: `cloud` opens archives in object stores reached over HTTP
//! (S3-compatible, GCS, WebDAV; without it an [`archive`] is a local
//! directory); `testing` compiles in fault injection ([`faults`]) for tests
//! of supervision, and production builds leave it out.
#![warn(missing_docs, unreachable_pub)]

pub mod archive;
mod blob;
pub mod connections;
mod core;
pub mod discovery;
pub mod dropped;
pub mod faults;
pub mod files;
pub mod grpc;
mod holders;
pub mod peer_heights;
pub mod replay;
pub mod state_sync;
pub mod supervisor;
pub mod system;
pub mod verifier;

pub use blob::{Blob, DecodedBlock, HashedBlob};
pub use core::{Core, Driver, Time};
pub use system::{InvalidSetting, P2pBuilder, P2pConfig, P2pHandle};
