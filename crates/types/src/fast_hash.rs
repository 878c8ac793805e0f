//! Hash maps for hot paths, keyed by what no peer picks freely.
//!
//! std's maps hash with SipHash, a keyed hash strong enough that nobody
//! who cannot read the key can aim many entries at one slot. A catch-up
//! puts every block it fetches through several maps (the blocks a chunk
//! expects, those a batch fetched, the store's), and SipHash over each
//! 48-byte reference was a visible part of its time; a large simulated
//! network spent a sixth of its time hashing peer ids. [`FastMap`] and
//! [`FastSet`] hash with foldhash instead. foldhash's own seed comes from
//! addresses and the clock, so both of its seeds are drawn here from
//! std's randomly keyed hasher: unknown to any peer, though foldhash is
//! not a cryptographic hash. They are for keys whose insertion no peer
//! controls (references and digests of blocks a quorum certified, or that
//! verification accepted), or for maps whose size a limit bounds, so that
//! even a slot aimed at costs a bounded walk. A map filled from a peer's
//! unverified answer keeps std's SipHash.

use std::collections::{HashMap, HashSet};
use std::hash::BuildHasher;
use std::sync::OnceLock;

use foldhash::SharedSeed;
use foldhash::fast::{FoldHasher, SeedableRandomState};

/// The hasher of [`FastMap`] and [`FastSet`]: foldhash, with a seed per
/// process and one per map, both from std's randomness.
#[derive(Clone, Copy, Debug)]
pub struct FastHasher(SeedableRandomState);

impl Default for FastHasher {
    fn default() -> Self {
        static SHARED: OnceLock<SharedSeed> = OnceLock::new();
        let random = || std::hash::RandomState::new().hash_one(0u8);
        let shared = SHARED.get_or_init(|| SharedSeed::from_u64(random()));
        FastHasher(SeedableRandomState::with_seed(random(), shared))
    }
}

impl BuildHasher for FastHasher {
    type Hasher = FoldHasher;

    fn build_hasher(&self) -> FoldHasher {
        self.0.build_hasher()
    }
}

/// A [`HashMap`] hashed with foldhash (see the module's note on its keys).
pub type FastMap<K, V> = HashMap<K, V, FastHasher>;

/// A [`HashSet`] hashed with foldhash (see the module's note on its keys).
pub type FastSet<K> = HashSet<K, FastHasher>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_map_hashes_with_a_seed_of_its_own() {
        let (a, b) = (FastHasher::default(), FastHasher::default());
        let key = [7u8; 48];
        assert_eq!(a.hash_one(key), a.hash_one(key), "one map, one hash");
        assert_ne!(a.hash_one(key), b.hash_one(key), "two maps, two seeds");
    }
}
