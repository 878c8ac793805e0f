//! The connection manager: the one place outbound connections are made.
//!
//! Connections dials peers over the mutual-TLS transport, keeps one gRPC
//! client per connected peer, and tells subscribers when a peer connects or
//! disconnects ([`PeerEvent`]). It never dials a peer that is connected or
//! being dialled; a seed known only by address is dialled by address and its
//! peer id learnt from the handshake. A periodic probe (the standard health
//! check) notices dead connections, as does any caller reporting a failure.

mod actor;
mod core;
mod messages;

pub use actor::Connections;
pub use core::{Config, ConnectionsCore};
pub use messages::{
    ActivePeers, Connect, DialResult, Disconnect, GetClient, Input, Output, PeerEvent,
    ReportBroken, SubscribePeerEvents,
};
