use actix::{Message, Recipient};
use serde::{Deserialize, Serialize};
use soma_types::PeerId;
use soma_wire::proto::p2p_client::P2pClient;
use tonic::transport::Channel;

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
        reason: String,
    },
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
}

/// The peers we hold a connection to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Message)]
#[rtype(result = "Vec<PeerId>")]
pub struct ActivePeers;

/// The gRPC client of a connected peer.
#[derive(Clone, Debug, Message)]
#[rtype(result = "Option<P2pClient<Channel>>")]
pub struct GetClient(pub PeerId);

/// Receive every [`PeerEvent`] from now on.
#[derive(Message)]
#[rtype(result = "()")]
pub struct SubscribePeerEvents(pub Recipient<PeerEvent>);

/// How a dial ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DialResult {
    /// Connected to this (verified) peer.
    Connected(PeerId),
    /// The dial failed.
    Failed(String),
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
}
