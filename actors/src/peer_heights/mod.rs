//! How far each peer's chain reaches, and which peers to fetch from.
//!
//! PeerHeights keeps, per peer, the chain it is on, its highest synced and
//! lowest available commit, a throughput estimate, a failure count and a
//! ban. It answers the questions state sync asks: the highest commit known
//! on our chain, the peers that can serve a range (best first, the
//! PeerBalancer order), and the peers that are behind. Peers on another chain
//! and banned peers are left out of every answer.

mod actor;
mod core;
mod messages;

pub use actor::PeerHeights;
pub use core::{Config, PeerHeightsCore};
pub use messages::{
    HighestKnownCommit, Input, OutcomeKind, Output, PeerView, PeersBehind, PeersForRange,
    PushHeight, RemovePeer, ReportOutcome, Snapshot, UpdateHeight,
};
