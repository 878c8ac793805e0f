use actix::Message;
use serde::{Deserialize, Serialize};
use soma_types::PeerId;
use soma_wire::tls::TlsError;

use super::outbound::{CallError, Client};

/// A peer connected or disconnected.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Message)]
#[rtype(result = "()")]
#[serde(rename_all = "snake_case")]
pub enum PeerEvent {
    /// We hold a verified connection to `peer`.
    Connected {
        /// The peer, as proven by its certificate.
        peer: PeerId,
        /// The address dialled.
        address: String,
    },
    /// The connection to `peer` is gone.
    Disconnected {
        /// The peer.
        peer: PeerId,
    },
    /// A dial failed (Discovery backs off on such peers).
    DialFailed {
        /// The peer expected, if known.
        peer: Option<PeerId>,
        /// The address dialled.
        address: String,
        /// Why.
        reason: DialError,
    },
}

/// Why a dial failed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum DialError {
    /// We hold `max_connections` connections or dials already.
    #[error("connection limit reached")]
    LimitReached,
    /// The address is not `host:port`.
    #[error("invalid address")]
    InvalidAddress,
    /// Connecting or the handshake took longer than `connect_timeout`.
    #[error("timed out")]
    Timeout,
    /// TCP, the TLS handshake or HTTP/2 failed.
    #[error("unreachable")]
    Unreachable,
    /// The server proved another identity than the peer dialled.
    #[error("peer is {found}, expected {expected}")]
    UnexpectedPeer {
        /// The peer dialled.
        expected: PeerId,
        /// The peer the server proved to be.
        found: PeerId,
    },
    /// The server proved to be `peer`, connected already at another
    /// address (a seed dialled by address, say): the new connection was
    /// closed, the one held stays.
    #[error("already connected to {peer}")]
    AlreadyConnected {
        /// The peer the server proved to be.
        peer: PeerId,
    },
    /// The server proved to be this node: its address (a seed, say) is
    /// our own. The connection was closed.
    #[error("the address is this node's own")]
    Ourselves,
    /// The server's certificate or its identity binding is not valid.
    #[error("invalid certificate")]
    InvalidCertificate,
    /// The server's admission or access rules refused us, or our own TLS
    /// configuration failed.
    #[error("refused")]
    Refused,
    /// The dial's task ended without a result (it panicked, or its
    /// runtime dropped it).
    #[error("the dial ended without a result")]
    Abandoned,
    /// The handshake passed but the first call failed (a private server
    /// refusing our certificate shows only then).
    #[error("first call failed: {0}")]
    FirstCall(CallError),
}

impl From<&TlsError> for DialError {
    fn from(e: &TlsError) -> Self {
        match e {
            TlsError::Address(_) => DialError::InvalidAddress,
            TlsError::Timeout => DialError::Timeout,
            TlsError::Connect(_) => DialError::Unreachable,
            TlsError::UnexpectedPeer { expected, found } => DialError::UnexpectedPeer {
                expected: *expected,
                found: *found,
            },
            TlsError::Certificate(_)
            | TlsError::NotSelfSigned
            | TlsError::MissingBinding
            | TlsError::MalformedBinding
            | TlsError::InvalidBinding => DialError::InvalidCertificate,
            TlsError::Generate(_)
            | TlsError::Pem(_)
            | TlsError::KeyMismatch
            | TlsError::NotAllowed(_)
            | TlsError::Rustls(_)
            | TlsError::NotAdmitted(_) => DialError::Refused,
        }
    }
}

/// Dial `address`; if `peer` is given the server must prove that identity.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Message)]
#[rtype(result = "()")]
pub struct Connect {
    /// The peer expected there, if known.
    pub peer: Option<PeerId>,
    /// `host:port`.
    pub address: String,
}

/// Close the connection to a peer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Message)]
#[rtype(result = "()")]
pub struct Disconnect {
    /// The peer.
    pub peer: PeerId,
}

/// A caller saw the connection to `peer` fail (transport error or no answer
/// in time): it is dropped and reported disconnected; discovery may dial it
/// again.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Message)]
#[rtype(result = "()")]
pub struct ReportBroken {
    /// The peer.
    pub peer: PeerId,
    /// The connection the call went over, as [`GetClient`] numbered it: a
    /// failure of a connection since replaced closes nothing.
    pub connection: u64,
}

/// The peers we hold a connection to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Message)]
#[rtype(result = "Vec<PeerId>")]
pub struct ActivePeers;

/// The peers we hold a connection to, with the address each was dialled
/// at: what an actor that follows [`PeerEvent`]s rebuilds its view from
/// after a restart.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Message)]
#[rtype(result = "Vec<(PeerId, String)>")]
pub struct ActiveConnections;

/// The gRPC client of a connected peer, with the number of its connection
/// (to name in a [`ReportBroken`]).
#[derive(Clone, Debug, Message)]
#[rtype(result = "Option<(u64, Client)>")]
pub struct GetClient(pub PeerId);

/// How a dial ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DialResult {
    /// Connected to this (verified) peer.
    Connected(PeerId),
    /// The dial failed.
    Failed(DialError),
}

/// Inputs of the Connections core.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Input {
    /// See [`Connect`].
    Connect(Connect),
    /// See [`Disconnect`].
    Disconnect(Disconnect),
    /// A dial of `address` ended.
    Dialed {
        /// The address dialled.
        address: String,
        /// The peer expected, if any.
        expected: Option<PeerId>,
        /// How it ended.
        result: DialResult,
    },
    /// The connection to `peer` failed a probe or a call.
    Broken {
        /// The peer.
        peer: PeerId,
    },
    /// See [`ActivePeers`].
    ActivePeers,
    /// See [`ActiveConnections`].
    ActiveConnections,
}

/// Outputs of the Connections core.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Output {
    /// Dial `address`, expecting `expected`.
    Dial {
        /// The address.
        address: String,
        /// The peer expected, if known.
        expected: Option<PeerId>,
    },
    /// Keep the client just dialled for `peer`.
    Keep {
        /// The peer.
        peer: PeerId,
    },
    /// Drop the client of `peer` (or the one just dialled, if a duplicate).
    Close {
        /// The peer.
        peer: PeerId,
    },
    /// Tell subscribers.
    Event(PeerEvent),
    /// Answer to [`Input::ActivePeers`].
    Peers(Vec<PeerId>),
    /// Answer to [`Input::ActiveConnections`].
    Connections(Vec<(PeerId, String)>),
}
