use actix::Message;
use serde::{Deserialize, Serialize};
use soma_types::{ChainId, CommitIndex, PeerId};

use crate::Time;

/// A peer reported its commit availability (GetCommitAvailability or
/// PushCommit). `highest` only ever moves up; `lowest` is taken as reported.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Message)]
#[rtype(result = "()")]
pub struct UpdateHeight {
    /// The peer.
    pub peer: PeerId,
    /// The chain it reports being on.
    pub chain_id: ChainId,
    /// Its highest synced commit.
    pub highest: CommitIndex,
    /// Its lowest available commit.
    pub lowest: CommitIndex,
}

/// A peer told us (PushCommit) it synced up to `highest`. A peer that has
/// not reported its chain yet is tracked, but kept out of every sync answer
/// until it does.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Message)]
#[rtype(result = "()")]
pub struct PushHeight {
    /// The authenticated caller.
    pub peer: PeerId,
    /// Its new highest synced commit.
    pub highest: CommitIndex,
}

/// A peer disconnected: forget its heights (a ban is kept).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Message)]
#[rtype(result = "()")]
pub struct RemovePeer {
    /// The peer.
    pub peer: PeerId,
}

/// The highest commit of any unbanned peer on our chain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Message)]
#[rtype(result = "Option<CommitIndex>")]
pub struct HighestKnownCommit;

/// Peers that can serve commits `start..=end`, best first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Message)]
#[rtype(result = "Vec<PeerId>")]
pub struct PeersForRange {
    /// First commit needed.
    pub start: CommitIndex,
    /// Last commit needed.
    pub end: CommitIndex,
}

/// Unbanned peers on our chain whose highest commit is below `index`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Message)]
#[rtype(result = "Vec<PeerId>")]
pub struct PeersBehind {
    /// The commit they lack.
    pub index: CommitIndex,
}

/// How a request to a peer went.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutcomeKind {
    /// It answered with valid data.
    Success,
    /// It did not answer in time.
    Timeout,
    /// The request failed (transport error, error status).
    Error,
    /// It sent data that failed verification: the peer is banned.
    InvalidData,
}

/// The result of a request to a peer, for the balancer and bans.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Message)]
#[rtype(result = "()")]
pub struct ReportOutcome {
    /// The peer.
    pub peer: PeerId,
    /// Bytes received.
    pub bytes: u64,
    /// Time the request took, in milliseconds.
    pub latency_ms: u64,
    /// How it went.
    pub kind: OutcomeKind,
}

/// Everything PeerHeights knows, for the handle and metrics.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Message)]
#[rtype(result = "Vec<PeerView>")]
pub struct Snapshot;

/// What PeerHeights knows of one peer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerView {
    /// The peer.
    pub peer: PeerId,
    /// The chain it is on, once it has reported it.
    pub chain_id: Option<ChainId>,
    /// Its highest synced commit.
    pub highest: CommitIndex,
    /// Its lowest available commit.
    pub lowest: CommitIndex,
    /// Estimated throughput, bytes per second.
    pub throughput_bps: u64,
    /// Recent failures (halved by each success).
    pub failures: u32,
    /// Banned until this time, if banned.
    pub banned_until: Option<Time>,
}

/// Inputs of the PeerHeights core.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Input {
    /// See [`UpdateHeight`].
    Update(UpdateHeight),
    /// See [`PushHeight`].
    Push(PushHeight),
    /// See [`RemovePeer`].
    Remove(RemovePeer),
    /// See [`HighestKnownCommit`].
    HighestKnown,
    /// See [`PeersForRange`].
    PeersForRange(PeersForRange),
    /// See [`PeersBehind`].
    PeersBehind(PeersBehind),
    /// See [`ReportOutcome`].
    Outcome(ReportOutcome),
    /// See [`Snapshot`].
    Snapshot,
}

/// Outputs of the PeerHeights core.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Output {
    /// Answer to [`Input::HighestKnown`].
    HighestKnown(Option<CommitIndex>),
    /// Answer to [`Input::PeersForRange`] and [`Input::PeersBehind`].
    Peers(Vec<PeerId>),
    /// Answer to [`Input::Snapshot`], ordered by peer id.
    Snapshot(Vec<PeerView>),
    /// A peer was banned after sending invalid data.
    Banned {
        /// The peer.
        peer: PeerId,
        /// When the ban ends.
        until: Time,
    },
}
