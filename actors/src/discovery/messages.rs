use std::net::IpAddr;
use std::sync::Arc;

use actix::Message;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use soma_types::{PeerId, SignedNodeInfo};

/// Inputs of the Discovery core.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Input {
    /// The interval elapsed; `unix_ms` is the wall clock, for expiry.
    Tick {
        /// Milliseconds since the Unix epoch.
        unix_ms: u64,
    },
    /// Connections holds a connection to `peer`.
    Connected {
        /// The peer.
        peer: PeerId,
        /// The address dialled (a seed may have been dialled by address).
        #[serde(default)]
        address: String,
    },
    /// The connection to `peer` is gone.
    Disconnected {
        /// The peer.
        peer: PeerId,
    },
    /// A dial failed.
    DialFailed {
        /// The peer expected, if known.
        peer: Option<PeerId>,
        /// The address dialled.
        address: String,
        /// The peer the certificate of the server at `address` named, when
        /// it was not the one expected (a claim: the handshake stopped
        /// there, before the server proved it holds that peer's key).
        #[serde(default)]
        found: Option<PeerId>,
    },
    /// A dial of `address` reached `peer`, connected already at another
    /// address: nothing failed, and the connection held stays.
    AlreadyConnected {
        /// The peer the server proved to be.
        peer: PeerId,
        /// The address dialled.
        address: String,
    },
    /// Infos received from a peer, already verified.
    Learned {
        /// The peer that sent them (the one queried); `None` if unknown,
        /// counted with connect-back infos.
        #[serde(default)]
        source: Option<PeerId>,
        /// The infos, shared: a table and the answers built from it hold
        /// the same info, not copies.
        infos: Vec<Arc<SignedNodeInfo>>,
        /// The wall clock when they were verified, in milliseconds since the
        /// Unix epoch: later timestamps count as this one.
        #[serde(default)]
        unix_ms: u64,
    },
    /// A GetKnownPeers call to answer.
    Serve {
        /// Correlation id.
        id: u64,
        /// The authenticated caller, `None` if anonymous.
        caller: Option<PeerId>,
        /// The caller's own info, verified, if it sent a valid one.
        info: Option<SignedNodeInfo>,
        /// The wall clock when it was verified, in milliseconds since the
        /// Unix epoch: a later timestamp counts as this one.
        #[serde(default)]
        unix_ms: u64,
        /// The address the call came from, if known: its /24 or /32 is the
        /// bucket the caller's info counts in.
        #[serde(default)]
        remote: Option<IpAddr>,
    },
    /// The handle asks for the known peers.
    KnownPeers,
}

/// Outputs of the Discovery core.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Output {
    /// Ask `peer` for the peers it knows.
    Query {
        /// The peer.
        peer: PeerId,
    },
    /// Dial `address`, expecting `peer` if known.
    Dial {
        /// The peer, if known.
        peer: Option<PeerId>,
        /// The address.
        address: String,
    },
    /// Drop the connection to `peer` (a connection rotated out).
    Disconnect {
        /// The peer.
        peer: PeerId,
    },
    /// Answer GetKnownPeers call `id` with these infos.
    Answer {
        /// Correlation id.
        id: u64,
        /// A random sample of known infos.
        infos: Vec<Arc<SignedNodeInfo>>,
    },
    /// Refuse GetKnownPeers call `id`: the caller exceeded its rate.
    RateLimited {
        /// Correlation id.
        id: u64,
    },
    /// Answer to [`Input::KnownPeers`], in id order.
    Known(Vec<Arc<SignedNodeInfo>>),
    /// Another node runs with this node's keys: an info of this node's
    /// identity, signed since it started, names `addresses`, not this
    /// node's own.
    SameKeyElsewhere {
        /// The addresses the other node advertises.
        addresses: Vec<String>,
    },
}

/// A GetKnownPeers call, from the gRPC service: the caller, where the call
/// came from and the encoded info it sent (empty if none).
#[derive(Debug, Message)]
#[rtype(result = "Result<Exchanged, tonic::Status>")]
pub struct ExchangeInfo {
    /// The authenticated caller, `None` if anonymous.
    pub caller: Option<PeerId>,
    /// The remote address of the connection, if known.
    pub remote: Option<IpAddr>,
    /// The caller's encoded `SignedNodeInfo`, empty if none.
    pub info: Bytes,
}

/// The answer to a GetKnownPeers call, encoded.
#[derive(Clone, Debug)]
pub struct Exchanged {
    /// Our own signed info.
    pub own_info: Bytes,
    /// Infos of peers we know.
    pub known_peers: Vec<Bytes>,
}

/// The peers Discovery knows, newest info per peer.
#[derive(Debug, Message)]
#[rtype(result = "Vec<SignedNodeInfo>")]
pub struct KnownPeers;

/// How many peers Discovery knows: [`KnownPeers`]' length, without the
/// copy of the table (for metrics).
#[derive(Debug, Message)]
#[rtype(result = "usize")]
pub struct KnownPeerCount;
