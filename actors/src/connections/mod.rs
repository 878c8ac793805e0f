//! The connection manager: the one place outbound connections are made.
//!
//! Connections dials peers over the mutual-TLS transport, keeps one gRPC
//! client per connected peer, and tells subscribers when a peer connects or
//! disconnects ([`PeerEvent`]). It never dials a peer that is connected or
//! being dialled; a seed known only by address is dialled by address and its
//! peer id learnt from the handshake. A periodic probe (one cheap call)
//! notices dead connections, as does any call through [`Outbound`], the one
//! way the other actors call a peer.

mod actor;
mod core;
mod messages;
mod outbound;

pub use actor::{Connections, Deps};
pub use core::{Config, ConnectionsCore};
pub use messages::{
    ActiveConnections, ActivePeers, Connect, DialError, DialResult, Disconnect, GetClient, Input,
    Output, PeerEvent, ReportBroken,
};
pub use outbound::MAX_SMALL_ANSWER_BYTES;
pub use outbound::{CallError, Client, Outbound};
pub(crate) use outbound::{ask_availability, push_commit};
