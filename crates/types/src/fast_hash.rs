//! Hash maps for the hot paths of sync, keyed by block references and
//! digests.
//!
//! std's maps hash with SipHash, a keyed hash strong enough that nobody
//! who cannot read the key can aim many entries at one slot. A catch-up
//! puts every block it fetches through several maps (the blocks a batch
//! expects, those fetched, the store's), and SipHash over each 44-byte
//! reference was a visible part of its time. These maps hash with
//! foldhash, seeded per process from the system's randomness: unknown to a
//! peer, though not a cryptographic guarantee. They are for keys no peer
//! picks freely: references and digests of blocks a quorum certified, or
//! that verification accepted, whatever the lookups.

use std::collections::{HashMap, HashSet};

/// The hasher of [`FastMap`] and [`FastSet`]: foldhash, seeded per process.
pub type FastHasher = foldhash::fast::RandomState;

/// A [`HashMap`] hashed with foldhash (see the module's note on its keys).
pub type FastMap<K, V> = HashMap<K, V, FastHasher>;

/// A [`HashSet`] hashed with foldhash (see the module's note on its keys).
pub type FastSet<K> = HashSet<K, FastHasher>;
