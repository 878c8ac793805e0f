//! Finding peers: signed node infos, seeds, peer exchange, dialling.
//!
//! Every interval Discovery asks a few random connected peers for the peers
//! they know (GetKnownPeers, sending our freshly signed info), keeps the
//! newest verified info per peer, drops expired ones, and dials known peers
//! that are neither connected nor being dialled until the connection target
//! is met: allowlisted peers first and always, seeds when nothing is
//! connected, with backoff on peers whose dials fail. It answers other
//! nodes' GetKnownPeers with a random sample and remembers the caller's own
//! info, so it can connect back.
//!
//! The table of known peers resists eclipse attacks: see [`Config`] for its
//! buckets and caps. Fresh infos of a peer, or a call from it, end its dial
//! backoff, so a restarted peer is redialled at the next round.
//!
//! Received infos are checked by the Verifier (signature by the info's own
//! key, age, clock skew, not us, bounded addresses, allowlist in private
//! mode) before the core sees them.

mod actor;
mod core;
mod messages;
pub mod scenario;
mod table;

pub use actor::{Deps, Discovery};
pub use core::{
    Config, DiscoveryCore, EVICTION_SEARCH_BUCKETS, Init, SERVICE_PORTS, SeedPeer,
    canonical_address, is_advertisable, is_service_port,
};
pub use messages::{ExchangeInfo, Exchanged, Input, KnownPeerCount, KnownPeers, Output};
