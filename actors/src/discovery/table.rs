//! Discovery's table of known peers, with an index of each bucket its caps
//! count in (source, address prefix), oldest entry first. Making room for
//! a newcomer walks the buckets involved from their oldest entry, instead
//! of scanning the whole table per cap: in a network larger than the table
//! (1,000 entries), where most answers bring peers the table must make
//! room for, that scan was most of a node's Discovery time.
//!
//! An entry is indexed at a seen time no later than its own: a newer info
//! of a known peer (every peer signs afresh each interval, so most of what
//! a table takes in) only changes the entry, and each index is brought up
//! to date where it is read, as a bucket is walked from its oldest entry.
//! Walking stops at the first entry that may go, so only the oldest end of
//! the buckets a newcomer needs room in is ever settled, and an index
//! whose buckets are never walked is never settled (docs/benchmarks.md,
//! "The simulator's speed").

use std::cmp::Reverse;
use std::collections::{BTreeSet, HashMap};
use std::hash::Hash;
use std::ops::Bound;
use std::sync::Arc;

use indexmap::IndexMap;
use soma_types::{PeerId, SignedNodeInfo};

use super::core::{Entry, Prefix, Source};

/// The caps [`Table::make_room`] keeps.
#[derive(Clone, Copy, Debug)]
pub(super) struct Caps {
    pub(super) total: usize,
    pub(super) per_source: usize,
    pub(super) per_prefix: usize,
}

/// Entries by bucket, each bucket's oldest first. One ordered set for all
/// buckets (most prefix buckets hold one or two entries; a set per bucket
/// would cost a tree node each), with each bucket's size beside it, looked
/// up by hash (read for every newcomer; nothing depends on its order).
struct Ordered<K> {
    items: BTreeSet<(K, u64, PeerId)>,
    sizes: HashMap<K, usize>,
}

impl<K> Default for Ordered<K> {
    fn default() -> Self {
        Self {
            items: BTreeSet::new(),
            sizes: HashMap::new(),
        }
    }
}

impl<K: Ord + Hash + Copy> Ordered<K> {
    fn insert(&mut self, key: K, seen_ms: u64, peer: PeerId) {
        if self.items.insert((key, seen_ms, peer)) {
            *self.sizes.entry(key).or_default() += 1;
        }
    }

    fn remove(&mut self, key: K, seen_ms: u64, peer: PeerId) {
        if self.items.remove(&(key, seen_ms, peer)) {
            match self.sizes.get_mut(&key) {
                Some(n) if *n > 1 => *n -= 1,
                _ => {
                    self.sizes.remove(&key);
                }
            }
        }
    }

    /// Moves an item within its bucket, from `from_ms` to `to_ms`; the
    /// bucket's size stays.
    fn relocate(&mut self, key: K, from_ms: u64, to_ms: u64, peer: PeerId) {
        if from_ms != to_ms && self.items.remove(&(key, from_ms, peer)) {
            self.items.insert((key, to_ms, peer));
        }
    }

    fn len(&self, key: K) -> usize {
        self.sizes.get(&key).copied().unwrap_or(0)
    }

    /// The first item of bucket `key` after `after` (from its oldest if
    /// `None`) indexed no later than `seen_ms`.
    fn next(&self, key: K, seen_ms: u64, after: Option<(u64, PeerId)>) -> Option<(u64, PeerId)> {
        let lower = match after {
            Some((ms, peer)) => Bound::Excluded((key, ms, peer)),
            None => Bound::Included((key, 0, PeerId([0; 32]))),
        };
        self.items
            .range((lower, Bound::Unbounded))
            .next()
            .filter(|(k, ms, _)| *k == key && *ms <= seen_ms)
            .map(|(_, ms, p)| (*ms, *p))
    }
}

/// An entry with the seen time each index holds it at: never later than
/// its own (`entry.seen_ms`), equal once settled. Each index is settled on
/// its own, as it is walked: a bucket that never needs room never is.
struct Slot {
    entry: Entry,
    source_ms: u64,
    prefix_ms: u64,
}

/// Which index a bucket is in.
#[derive(Clone, Copy)]
enum Bucket {
    Source(Source),
    Prefix(Prefix),
}

/// Known peers by id, indexed by source and by prefix. The entries lie in
/// one array with a hash index beside it: a lookup is a hash and a probe
/// rather than a walk down a tree of 32-byte keys, and an answer draws its
/// infos by position. The order of the array is the order entries came in,
/// with the last moved into each removed one's place: it depends on the
/// inputs only, never on the hashes, so a core's outputs stay the same for
/// the same inputs whatever the hasher's keys.
#[derive(Default)]
pub(super) struct Table {
    entries: IndexMap<PeerId, Slot>,
    by_source: Ordered<Source>,
    by_prefix: Ordered<Prefix>,
}

impl Table {
    /// An empty table with room for `capacity` entries before it grows.
    pub(super) fn with_capacity(capacity: usize) -> Self {
        Table {
            entries: IndexMap::with_capacity(capacity),
            ..Table::default()
        }
    }

    pub(super) fn get(&self, peer: &PeerId) -> Option<&Entry> {
        self.entries.get(peer).map(|s| &s.entry)
    }

    pub(super) fn len(&self) -> usize {
        self.entries.len()
    }

    /// The entry at `position` (in `0..len()`), with its peer.
    pub(super) fn get_index(&self, position: usize) -> Option<(&PeerId, &Entry)> {
        self.entries.get_index(position).map(|(p, s)| (p, &s.entry))
    }

    /// Where `peer`'s entry lies, if known.
    pub(super) fn position(&self, peer: &PeerId) -> Option<usize> {
        self.entries.get_index_of(peer)
    }

    pub(super) fn contains_key(&self, peer: &PeerId) -> bool {
        self.entries.contains_key(peer)
    }

    pub(super) fn keys(&self) -> impl Iterator<Item = &PeerId> {
        self.entries.keys()
    }

    pub(super) fn values(&self) -> impl Iterator<Item = &Entry> {
        self.entries.values().map(|s| &s.entry)
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = (&PeerId, &Entry)> {
        self.entries.iter().map(|(p, s)| (p, &s.entry))
    }

    /// Adds or replaces `peer`'s entry.
    pub(super) fn insert(&mut self, peer: PeerId, entry: Entry) {
        let (source, prefix, seen_ms) = (entry.source, entry.prefix, entry.seen_ms);
        let slot = Slot {
            entry,
            source_ms: seen_ms,
            prefix_ms: seen_ms,
        };
        if let Some(old) = self.entries.insert(peer, slot) {
            self.unindex(peer, &old);
        }
        self.by_source.insert(source, seen_ms, peer);
        self.by_prefix.insert(prefix, seen_ms, peer);
    }

    /// Gives `peer`'s entry a newer info, seen at `seen_ms`, with the
    /// prefix `prefix`; its source stays. Nothing happens if unknown. A
    /// later seen time with the same prefix leaves the indexes as they are
    /// (settled when walked); anything else moves the entry in them now.
    pub(super) fn update(
        &mut self,
        peer: PeerId,
        info: Arc<SignedNodeInfo>,
        prefix: Prefix,
        seen_ms: u64,
    ) {
        let Some(slot) = self.entries.get_mut(&peer) else {
            return;
        };
        let entry = &mut slot.entry;
        if seen_ms < slot.source_ms {
            self.by_source
                .relocate(entry.source, slot.source_ms, seen_ms, peer);
            slot.source_ms = seen_ms;
        }
        if entry.prefix != prefix || seen_ms < slot.prefix_ms {
            self.by_prefix.remove(entry.prefix, slot.prefix_ms, peer);
            self.by_prefix.insert(prefix, seen_ms, peer);
            slot.prefix_ms = seen_ms;
        }
        entry.timestamp_ms = info.info.timestamp_ms;
        entry.info = info;
        entry.prefix = prefix;
        entry.seen_ms = seen_ms;
    }

    fn unindex(&mut self, peer: PeerId, slot: &Slot) {
        self.by_source
            .remove(slot.entry.source, slot.source_ms, peer);
        self.by_prefix
            .remove(slot.entry.prefix, slot.prefix_ms, peer);
    }

    pub(super) fn remove(&mut self, peer: &PeerId) -> Option<Entry> {
        let slot = self.entries.swap_remove(peer)?;
        self.unindex(*peer, &slot);
        Some(slot.entry)
    }

    /// Keeps only the entries `keep` accepts.
    pub(super) fn retain(&mut self, mut keep: impl FnMut(&Entry) -> bool) {
        let gone: Vec<PeerId> = self
            .entries
            .iter()
            .filter(|(_, s)| !keep(&s.entry))
            .map(|(p, _)| *p)
            .collect();
        for peer in gone {
            self.remove(&peer);
        }
    }

    /// Bucket `bucket`'s oldest entry that may go (ties: the lowest id):
    /// none newer than `seen_ms`, pinned or chosen. Entries indexed earlier
    /// than they were seen are moved to their place as they are met: every
    /// entry met before the one returned is then where it belongs, and one
    /// not met is indexed, so seen, later than it.
    fn first_evictable(
        &mut self,
        bucket: Bucket,
        seen_ms: u64,
        chosen: &[PeerId],
        pinned: &dyn Fn(&PeerId) -> bool,
    ) -> Option<PeerId> {
        let mut after = None;
        loop {
            let (indexed_ms, peer) = match bucket {
                Bucket::Source(key) => self.by_source.next(key, seen_ms, after),
                Bucket::Prefix(key) => self.by_prefix.next(key, seen_ms, after),
            }?;
            let slot = self.entries.get_mut(&peer)?;
            let seen = slot.entry.seen_ms;
            if seen != indexed_ms {
                match bucket {
                    Bucket::Source(key) => {
                        self.by_source.relocate(key, indexed_ms, seen, peer);
                        slot.source_ms = seen;
                    }
                    Bucket::Prefix(key) => {
                        self.by_prefix.relocate(key, indexed_ms, seen, peer);
                        slot.prefix_ms = seen;
                    }
                }
                // The next item is now the one after where it was.
                continue;
            }
            if !chosen.contains(&peer) && !pinned(&peer) {
                return Some(peer);
            }
            after = Some((indexed_ms, peer));
        }
    }

    /// The entries to evict so that `peer`, seen at `seen_ms` with prefix
    /// `prefix` and (when new) from `source`, fits every cap; `None` if it
    /// cannot. A victim is never pinned nor newer than the newcomer; of a
    /// bucket's candidates the oldest goes (ties: the lowest id).
    pub(super) fn make_room(
        &mut self,
        caps: Caps,
        source: Option<Source>,
        prefix: Prefix,
        seen_ms: u64,
        peer: PeerId,
        pinned: impl Fn(&PeerId) -> bool,
    ) -> Option<Vec<PeerId>> {
        let mut chosen = vec![peer];
        // A bucket's size without the entries chosen already. `peer`
        // itself is in none of the buckets counted: it is new to the
        // table, or (an update, which comes here only for a new prefix)
        // still in its old prefix's bucket; it is not looked up.
        let size =
            |table: &Self, len: usize, chosen: &[PeerId], in_bucket: &dyn Fn(&Entry) -> bool| {
                let gone = chosen[1..]
                    .iter()
                    .filter(|p| table.get(p).is_some_and(in_bucket))
                    .count();
                len - gone
            };
        if let Some(source) = source {
            let len = self.by_source.len(source);
            if size(self, len, &chosen, &|e| e.source == source) >= caps.per_source {
                let victim =
                    self.first_evictable(Bucket::Source(source), seen_ms, &chosen, &pinned)?;
                chosen.push(victim);
            }
        }
        let len = self.by_prefix.len(prefix);
        if size(self, len, &chosen, &|e| e.prefix == prefix) >= caps.per_prefix {
            let victim = self.first_evictable(Bucket::Prefix(prefix), seen_ms, &chosen, &pinned)?;
            chosen.push(victim);
        }
        // `peer` is new to the table here (an update passes no source).
        let kept = self.entries.len() + 1 - chosen.len();
        if source.is_some() && kept >= caps.total {
            // The fullest source bucket with an evictable entry gives up
            // its oldest (ties: the lowest source; the sizes' own order is
            // the hash's, so the sort decides).
            let mut fullest: Vec<(Reverse<usize>, Source)> = self
                .by_source
                .sizes
                .iter()
                .map(|(s, n)| (Reverse(size(self, *n, &chosen, &|e| e.source == *s)), *s))
                .collect();
            fullest.sort_unstable();
            let victim = fullest.into_iter().find_map(|(_, s)| {
                self.first_evictable(Bucket::Source(s), seen_ms, &chosen, &pinned)
            })?;
            chosen.push(victim);
        }
        chosen.remove(0);
        Some(chosen)
    }
}
