//! How far each peer's chain reaches, and which peers to fetch from.
//!
//! PeerHeights keeps, per connected peer, the chain it is on, its claimed
//! highest synced and lowest available commit, a throughput estimate and a
//! failure count; bans are kept apart and outlive disconnections. It answers
//! the questions state sync asks: the highest commit known on our chain, the
//! peers that can serve a range (best first, the PeerBalancer order), and the
//! peers that are behind. Peers on another chain, banned peers and departed
//! peers are left out of every answer.
//!
//! Heights are claims. An availability answer replaces the last one (it may
//! move down), a PushCommit may only raise it, and a NOT_FOUND for commits
//! inside the claim is a lie, punished like invalid data. Only peers with a
//! live connection held by Connections are tracked, so the table follows
//! `PeerEvent`s and is bounded by `max_tracked_peers`; bans by `max_bans`.
//!
//! PeerHeights also holds the fetch slots: state sync's workers acquire a
//! peer for a range ([`AcquirePeer`]), which grants the best peer with a
//! free slot (at most `max_fetches_per_peer` per peer) or waits for one, and
//! release the [`Lease`] with how the transfer went. Peer choice is so a
//! decision of the core, in its trace.

mod actor;
mod core;
mod messages;

pub use actor::{Deps, PeerHeights, Slot};
pub use core::{
    Config, Doubt, GOOD_COMMIT_THROUGHPUT_BPS, GOOD_THROUGHPUT_BPS, Init, PeerHeightsCore,
};
pub use messages::{
    Acquire, AcquireError, AcquirePeer, ClaimsRange, CountPeers, CoversRange, FetchKind,
    HeardHeights, HeightsHeard, HighestKnownCommit, Input, Lease, LeaseUnanswered, OutcomeKind,
    Output, PeerCounts, PeerView, PeersBehind, PeersForRange, PushHeight, Release, RemovePeer,
    ReportBeaten, ReportOutcome, Snapshot, Transfer, UpdateHeight, WHOLE_ANSWER_MAX_MARKS,
    WHOLE_ANSWER_MS,
};
