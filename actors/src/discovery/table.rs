//! Discovery's table of known peers, with an index of each bucket its caps
//! count in (source, address prefix), oldest entry first. Making room for
//! a newcomer walks the source buckets involved from their oldest entry,
//! instead of scanning the whole table per cap: in a network larger than
//! the table (1,000 entries), where most answers bring peers the table
//! must make room for, that scan was most of a node's Discovery time. A
//! full prefix bucket (at most `per_prefix` entries) is read whole, since
//! the entry it gives up is its fullest source's oldest.
//!
//! An entry is indexed at a seen time no later than its own: a newer info
//! of a known peer (every peer signs afresh each interval, so most of what
//! a table takes in) only changes the entry, and each index is brought up
//! to date where it is read, as a bucket is walked from its oldest entry.
//! Walking stops at the first entry that may go, so only the oldest end of
//! the buckets a newcomer needs room in is ever settled, and an index
//! whose buckets are never walked (the prefix index, read by entry) is
//! never settled (docs/benchmarks.md, "The simulator's speed").

use std::cmp::Reverse;
use std::collections::{BTreeSet, HashMap};
use std::hash::Hash;
use std::ops::Bound;
use std::sync::Arc;

use indexmap::IndexMap;
use soma_types::{FastHasher, PeerId, SignedNodeInfo};

use super::core::{EVICTION_SEARCH_BUCKETS, Entry, Prefix, Source};

/// The hasher of a table's maps: foldhash, both its seeds drawn from
/// std's randomness ([`FastHasher`]). A SipHash of each 32-byte id was a
/// sixth of a large simulated network's time (docs/benchmarks.md, "The
/// simulator's speed"). Peer ids (and the addresses that make prefixes)
/// are whatever anyone mints, but without the seeds no one can aim them
/// at one slot, and a table holds at most `max_known_peers` entries, so
/// even a slot aimed at costs a bounded walk.
fn hasher() -> FastHasher {
    FastHasher::default()
}

/// An entry's seen time and peer: ordered oldest first, ties by id.
type Oldest = (u64, PeerId);

/// The caps [`Table::make_room`] keeps.
#[derive(Clone, Copy, Debug)]
pub(super) struct Caps {
    pub(super) total: usize,
    pub(super) per_source: usize,
    pub(super) per_prefix: usize,
    /// How long before a newcomer an entry the total cap gives up must
    /// have been seen; 0: any no newer than the newcomer.
    pub(super) min_evict_age_ms: u64,
}

/// A bucket's number in its index's items, and its size. Numbers are
/// reused once a bucket empties; an entry's bucket is never empty, so the
/// number a slot keeps stays its bucket's while the entry is in it.
#[derive(Clone, Copy)]
struct BucketInfo {
    id: u32,
    len: usize,
}

/// Entries by bucket, each bucket's oldest first. One ordered set for all
/// buckets (most prefix buckets hold one or two entries; a set per bucket
/// would cost a tree node each), each bucket named in it by a small
/// number, not by its key: an item is 48 bytes rather than up to 80, and
/// compares as integers, so a walk down the set touches half the memory
/// (docs/benchmarks.md, "The simulator's speed"). Each bucket's number and
/// size are looked up by hash (nothing depends on that map's order).
struct Ordered<K> {
    items: BTreeSet<(u32, u64, PeerId)>,
    buckets: HashMap<K, BucketInfo, FastHasher>,
    free: Vec<u32>,
    /// The buckets fullest first (ties: the lowest key), if kept: kept as
    /// sizes change, rather than sorted for each newcomer to a full table.
    ranked: Option<BTreeSet<(Reverse<usize>, K, u32)>>,
}

impl<K> Default for Ordered<K> {
    fn default() -> Self {
        Self {
            items: BTreeSet::new(),
            buckets: HashMap::with_hasher(hasher()),
            free: Vec::new(),
            ranked: None,
        }
    }
}

impl<K: Ord + Hash + Copy> Ordered<K> {
    /// Adds `peer` to bucket `key` at `seen_ms`; the bucket's number.
    fn insert(&mut self, key: K, seen_ms: u64, peer: PeerId) -> u32 {
        let next = self.buckets.len() as u32;
        let free = &mut self.free;
        let bucket = self.buckets.entry(key).or_insert_with(|| BucketInfo {
            id: free.pop().unwrap_or(next),
            len: 0,
        });
        let id = bucket.id;
        if self.items.insert((id, seen_ms, peer)) {
            bucket.len += 1;
            let len = bucket.len;
            self.rerank(key, id, len - 1, len);
        } else {
            // Already there: then so is its bucket, counted.
            debug_assert!(bucket.len > 0, "an indexed item's bucket is counted");
        }
        id
    }

    /// Bucket `key` (number `id`) went from `from` entries to `to`.
    fn rerank(&mut self, key: K, id: u32, from: usize, to: usize) {
        if let Some(ranked) = &mut self.ranked {
            if from > 0 {
                ranked.remove(&(Reverse(from), key, id));
            }
            if to > 0 {
                ranked.insert((Reverse(to), key, id));
            }
        }
    }

    /// The first ranked bucket after `after` (from the fullest if `None`)
    /// that `skip` does not name.
    fn ranked_after(
        &self,
        after: Option<(Reverse<usize>, K, u32)>,
        skip: impl Fn(&K) -> bool,
    ) -> Option<(Reverse<usize>, K, u32)> {
        let ranked = self.ranked.as_ref()?;
        let lower = after.map_or(Bound::Unbounded, Bound::Excluded);
        ranked
            .range((lower, Bound::Unbounded))
            .find(|(_, k, _)| !skip(k))
            .copied()
    }

    /// Takes `peer`, indexed at `seen_ms`, out of bucket `key` (number
    /// `id`).
    fn remove(&mut self, key: K, id: u32, seen_ms: u64, peer: PeerId) {
        if self.items.remove(&(id, seen_ms, peer))
            && let Some(bucket) = self.buckets.get_mut(&key)
        {
            bucket.len -= 1;
            let len = bucket.len;
            if len == 0 {
                self.buckets.remove(&key);
                self.free.push(id);
            }
            self.rerank(key, id, len + 1, len);
        }
    }

    /// Moves an item within its bucket (number `id`), from `from_ms` to
    /// `to_ms`; the bucket's size stays.
    fn relocate(&mut self, id: u32, from_ms: u64, to_ms: u64, peer: PeerId) {
        if from_ms != to_ms && self.items.remove(&(id, from_ms, peer)) {
            self.items.insert((id, to_ms, peer));
        }
    }

    fn get(&self, key: K) -> Option<BucketInfo> {
        self.buckets.get(&key).copied()
    }

    /// The first item of bucket number `id` after `after` (from its oldest
    /// if `None`) indexed no later than `seen_ms`.
    fn next(&self, id: u32, seen_ms: u64, after: Option<(u64, PeerId)>) -> Option<(u64, PeerId)> {
        let lower = match after {
            Some((ms, peer)) => Bound::Excluded((id, ms, peer)),
            None => Bound::Included((id, 0, PeerId([0; 32]))),
        };
        self.items
            .range((lower, Bound::Unbounded))
            .next()
            .filter(|(i, ms, _)| *i == id && *ms <= seen_ms)
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
    /// The numbers of the entry's buckets in each index.
    source_id: u32,
    prefix_id: u32,
}

/// Where an entry lies in both indexes.
#[derive(Clone, Copy)]
struct Indexed {
    source: Source,
    source_id: u32,
    source_ms: u64,
    prefix: Prefix,
    prefix_id: u32,
    prefix_ms: u64,
}

impl Slot {
    fn indexed(&self) -> Indexed {
        Indexed {
            source: self.entry.source,
            source_id: self.source_id,
            source_ms: self.source_ms,
            prefix: self.entry.prefix,
            prefix_id: self.prefix_id,
            prefix_ms: self.prefix_ms,
        }
    }
}

/// Known peers by id, indexed by source and by prefix. The entries lie in
/// one array with a hash index beside it: a lookup is a hash and a probe
/// rather than a walk down a tree of 32-byte keys, and an answer draws its
/// infos by position. The order of the array is the order entries came in,
/// with the last moved into each removed one's place: it depends on the
/// inputs only, never on the hashes, so a core's outputs stay the same for
/// the same inputs whatever the hasher's keys.
pub(super) struct Table {
    entries: IndexMap<PeerId, Slot, FastHasher>,
    by_source: Ordered<Source>,
    by_prefix: Ordered<Prefix>,
}

impl Table {
    /// An empty table with room for `capacity` entries before it grows.
    pub(super) fn with_capacity(capacity: usize) -> Self {
        Table {
            entries: IndexMap::with_capacity_and_hasher(capacity, hasher()),
            by_source: Ordered {
                ranked: Some(BTreeSet::new()),
                ..Ordered::default()
            },
            by_prefix: Ordered::default(),
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
        // Replaced in place: the entry keeps its position.
        if let Some(old) = self.entries.get(&peer) {
            let old = old.indexed();
            self.unindex(peer, old);
        }
        let slot = Slot {
            entry,
            source_ms: seen_ms,
            prefix_ms: seen_ms,
            source_id: self.by_source.insert(source, seen_ms, peer),
            prefix_id: self.by_prefix.insert(prefix, seen_ms, peer),
        };
        self.entries.insert(peer, slot);
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
                .relocate(slot.source_id, slot.source_ms, seen_ms, peer);
            slot.source_ms = seen_ms;
        }
        if entry.prefix != prefix || seen_ms < slot.prefix_ms {
            self.by_prefix
                .remove(entry.prefix, slot.prefix_id, slot.prefix_ms, peer);
            slot.prefix_id = self.by_prefix.insert(prefix, seen_ms, peer);
            slot.prefix_ms = seen_ms;
        }
        entry.timestamp_ms = info.info.timestamp_ms;
        entry.info = info;
        entry.prefix = prefix;
        entry.seen_ms = seen_ms;
    }

    fn unindex(&mut self, peer: PeerId, at: Indexed) {
        self.by_source
            .remove(at.source, at.source_id, at.source_ms, peer);
        self.by_prefix
            .remove(at.prefix, at.prefix_id, at.prefix_ms, peer);
    }

    pub(super) fn remove(&mut self, peer: &PeerId) -> Option<Entry> {
        let slot = self.entries.swap_remove(peer)?;
        self.unindex(*peer, slot.indexed());
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

    /// Source bucket number `id`'s oldest entry that may go (ties: the
    /// lowest id):
    /// none newer than `seen_ms`, pinned or chosen. Entries indexed earlier
    /// than they were seen are moved to their place as they are met: every
    /// entry met before the one returned is then where it belongs, and one
    /// not met is indexed, so seen, later than it.
    fn first_evictable(
        &mut self,
        id: u32,
        seen_ms: u64,
        chosen: &[PeerId],
        pinned: &dyn Fn(&PeerId) -> bool,
    ) -> Option<PeerId> {
        let mut after = None;
        loop {
            let (indexed_ms, peer) = self.by_source.next(id, seen_ms, after)?;
            let slot = self.entries.get_mut(&peer)?;
            let seen = slot.entry.seen_ms;
            if seen != indexed_ms {
                self.by_source.relocate(id, indexed_ms, seen, peer);
                slot.source_ms = seen;
                // The next item is now the one after where it was.
                continue;
            }
            if !chosen.contains(&peer) && !pinned(&peer) {
                return Some(peer);
            }
            after = Some((indexed_ms, peer));
        }
    }

    /// The entry a full prefix bucket (number `id`) gives up: the oldest
    /// evictable one (none newer than `seen_ms`, pinned or chosen) of the
    /// source that holds the most of the bucket (ties: the lowest source),
    /// as the whole table gives up the oldest of its fullest source. Its
    /// oldest entry whatever its source went before: one source stamping
    /// fakes with addresses of a network it chose pushed every honest
    /// entry of that network out, newer than any of them. A prefix bucket
    /// holds at most `per_prefix` entries, all read here; it fills only
    /// where many peers share a network.
    fn prefix_victim(
        &self,
        id: u32,
        seen_ms: u64,
        chosen: &[PeerId],
        pinned: &dyn Fn(&PeerId) -> bool,
    ) -> Option<PeerId> {
        let items = self
            .by_prefix
            .items
            .range((id, 0, PeerId([0; 32]))..=(id, u64::MAX, PeerId([u8::MAX; 32])));
        // Each source's entries in the bucket, and its oldest evictable.
        let mut sources: Vec<(Source, usize, Option<Oldest>)> = Vec::new();
        for &(_, _, peer) in items {
            if chosen.contains(&peer) {
                continue;
            }
            let Some(entry) = self.get(&peer) else {
                continue;
            };
            let evictable = !pinned(&peer) && entry.seen_ms <= seen_ms;
            let candidate = evictable.then_some((entry.seen_ms, peer));
            match sources.iter_mut().find(|(s, _, _)| *s == entry.source) {
                Some((_, n, oldest)) => {
                    *n += 1;
                    *oldest = match (*oldest, candidate) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    };
                }
                None => sources.push((entry.source, 1, candidate)),
            }
        }
        sources.sort_unstable_by_key(|&(s, n, _)| (Reverse(n), s));
        sources
            .into_iter()
            .find_map(|(_, _, oldest)| oldest.map(|(_, peer)| peer))
    }

    /// The entries to evict so that `peer`, seen at `seen_ms` with prefix
    /// `prefix` and (when new) from `source`, fits every cap; `None` if it
    /// cannot. A victim is never pinned nor newer than the newcomer (nor,
    /// for the total cap and outside the newcomer's source, seen less than
    /// `min_evict_age_ms` before it); of a bucket's candidates the oldest
    /// goes (ties: the lowest id).
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
        // A bucket not yet made counts as empty: under a cap of 0 there is
        // nothing to evict and the newcomer is refused.
        if let Some(source) = source {
            let bucket = self.by_source.get(source);
            let len = bucket.map_or(0, |b| b.len);
            if size(self, len, &chosen, &|e| e.source == source) >= caps.per_source {
                let id = bucket?.id;
                let victim = self.first_evictable(id, seen_ms, &chosen, &pinned)?;
                chosen.push(victim);
            }
        }
        let bucket = self.by_prefix.get(prefix);
        let len = bucket.map_or(0, |b| b.len);
        if size(self, len, &chosen, &|e| e.prefix == prefix) >= caps.per_prefix {
            let id = bucket?.id;
            let victim = self.prefix_victim(id, seen_ms, &chosen, &pinned)?;
            chosen.push(victim);
        }
        // `peer` is new to the table here (an update passes no source).
        let kept = self.entries.len() + 1 - chosen.len();
        if source.is_some() && kept >= caps.total {
            // The fullest source bucket with an evictable entry gives up
            // its oldest (ties: the lowest source). The buckets of the
            // entries chosen already rank without them: at most two, taken
            // in turn with the others.
            let mut less: Vec<(Source, usize)> = Vec::new();
            for e in chosen[1..].iter().filter_map(|p| self.get(p)) {
                match less.iter_mut().find(|(s, _)| *s == e.source) {
                    Some((_, n)) => *n += 1,
                    None => less.push((e.source, 1)),
                }
            }
            let mut moved: Vec<(Reverse<usize>, Source, u32)> = less
                .iter()
                .filter_map(|&(s, n)| {
                    let b = self.by_source.get(s)?;
                    Some((Reverse(b.len - n), s, b.id))
                })
                .collect();
            moved.sort_unstable();
            let mut moved = moved.into_iter().peekable();
            let mut after = None;
            // From the fullest buckets only, an entry seen long enough
            // before the newcomer; or the oldest of the newcomer's own
            // source, which then takes no one else's place. With no age
            // asked, the oldest of any bucket.
            let (old_enough, mut tries) = match caps.min_evict_age_ms {
                0 => (Some(seen_ms), usize::MAX),
                age => (seen_ms.checked_sub(age), EVICTION_SEARCH_BUCKETS),
            };
            let victim = loop {
                tries = tries.checked_sub(1)?;
                let ranked = self
                    .by_source
                    .ranked_after(after, |s| less.iter().any(|(l, _)| l == s));
                let (_, bucket, id) = match (ranked, moved.peek()) {
                    (Some(r), Some(m)) if *m < r => moved.next()?,
                    (Some(r), _) => {
                        after = Some(r);
                        r
                    }
                    (None, _) => moved.next()?,
                };
                let limit = if source == Some(bucket) {
                    Some(seen_ms)
                } else {
                    old_enough
                };
                if let Some(v) = limit.and_then(|l| self.first_evictable(id, l, &chosen, &pinned)) {
                    break v;
                }
            };
            chosen.push(victim);
        }
        chosen.remove(0);
        Some(chosen)
    }
}
