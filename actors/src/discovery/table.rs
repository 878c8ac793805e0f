//! Discovery's table of known peers, with an index of each bucket its caps
//! count in (source, address prefix), oldest entry first. Making room for
//! a newcomer walks the buckets involved from their oldest entry, instead
//! of scanning the whole table per cap: in a network larger than the table
//! (1,000 entries), where most answers bring peers the table must make
//! room for, that scan was most of a node's Discovery time. The index
//! costs every newer info of a known peer two re-insertions; in a small
//! network, where the table never fills, that makes Discovery slower
//! (docs/benchmarks.md, "The simulator's speed", measures both).

use std::cmp::Reverse;
use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::ops::Bound;
use std::sync::Arc;

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
/// would cost a tree node each), with each bucket's size beside it.
struct Ordered<K> {
    items: BTreeSet<(K, u64, PeerId)>,
    sizes: BTreeMap<K, usize>,
}

impl<K> Default for Ordered<K> {
    fn default() -> Self {
        Self {
            items: BTreeSet::new(),
            sizes: BTreeMap::new(),
        }
    }
}

impl<K: Ord + Copy> Ordered<K> {
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

    /// Bucket `key`'s oldest entry that may go (ties: the lowest id): none
    /// newer than `seen_ms`, pinned or chosen.
    fn first_evictable(
        &self,
        key: K,
        seen_ms: u64,
        chosen: &[PeerId],
        pinned: &dyn Fn(&PeerId) -> bool,
    ) -> Option<PeerId> {
        self.items
            .range((Bound::Included((key, 0, PeerId([0; 32]))), Bound::Unbounded))
            .take_while(|(k, seen, _)| *k == key && *seen <= seen_ms)
            .find(|(_, _, p)| !chosen.contains(p) && !pinned(p))
            .map(|(_, _, p)| *p)
    }
}

/// Known peers by id, indexed by source and by prefix.
#[derive(Default)]
pub(super) struct Table {
    entries: BTreeMap<PeerId, Entry>,
    by_source: Ordered<Source>,
    by_prefix: Ordered<Prefix>,
}

impl Table {
    pub(super) fn get(&self, peer: &PeerId) -> Option<&Entry> {
        self.entries.get(peer)
    }

    pub(super) fn contains_key(&self, peer: &PeerId) -> bool {
        self.entries.contains_key(peer)
    }

    pub(super) fn keys(&self) -> impl Iterator<Item = &PeerId> {
        self.entries.keys()
    }

    pub(super) fn values(&self) -> impl Iterator<Item = &Entry> {
        self.entries.values()
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = (&PeerId, &Entry)> {
        self.entries.iter()
    }

    /// Adds or replaces `peer`'s entry.
    pub(super) fn insert(&mut self, peer: PeerId, entry: Entry) {
        let (source, prefix, seen_ms) = (entry.source, entry.prefix, entry.seen_ms);
        if let Some(old) = self.entries.insert(peer, entry) {
            self.unindex(peer, &old);
        }
        self.by_source.insert(source, seen_ms, peer);
        self.by_prefix.insert(prefix, seen_ms, peer);
    }

    /// Gives `peer`'s entry a newer info, seen at `seen_ms`, with the
    /// prefix `prefix`; its source stays. Nothing happens if unknown.
    pub(super) fn update(
        &mut self,
        peer: PeerId,
        info: Arc<SignedNodeInfo>,
        prefix: Prefix,
        seen_ms: u64,
    ) {
        let Some(entry) = self.entries.get_mut(&peer) else {
            return;
        };
        self.by_source
            .relocate(entry.source, entry.seen_ms, seen_ms, peer);
        if entry.prefix == prefix {
            self.by_prefix
                .relocate(prefix, entry.seen_ms, seen_ms, peer);
        } else {
            self.by_prefix.remove(entry.prefix, entry.seen_ms, peer);
            self.by_prefix.insert(prefix, seen_ms, peer);
        }
        entry.timestamp_ms = info.info.timestamp_ms;
        entry.info = info;
        entry.prefix = prefix;
        entry.seen_ms = seen_ms;
    }

    fn unindex(&mut self, peer: PeerId, entry: &Entry) {
        self.by_source.remove(entry.source, entry.seen_ms, peer);
        self.by_prefix.remove(entry.prefix, entry.seen_ms, peer);
    }

    pub(super) fn remove(&mut self, peer: &PeerId) -> Option<Entry> {
        let entry = self.entries.remove(peer)?;
        self.unindex(*peer, &entry);
        Some(entry)
    }

    /// Keeps only the entries `keep` accepts.
    pub(super) fn retain(&mut self, mut keep: impl FnMut(&Entry) -> bool) {
        let gone: Vec<PeerId> = self
            .entries
            .iter()
            .filter(|(_, e)| !keep(e))
            .map(|(p, _)| *p)
            .collect();
        for peer in gone {
            self.remove(&peer);
        }
    }

    /// The entries to evict so that `peer`, seen at `seen_ms` with prefix
    /// `prefix` and (when new) from `source`, fits every cap; `None` if it
    /// cannot. A victim is never pinned nor newer than the newcomer; of a
    /// bucket's candidates the oldest goes (ties: the lowest id).
    pub(super) fn make_room(
        &self,
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
        let size = |len: usize, chosen: &[PeerId], in_bucket: &dyn Fn(&Entry) -> bool| {
            let gone = chosen[1..]
                .iter()
                .filter(|p| self.entries.get(*p).is_some_and(in_bucket))
                .count();
            len - gone
        };
        if let Some(source) = source {
            let len = self.by_source.len(source);
            if size(len, &chosen, &|e| e.source == source) >= caps.per_source {
                chosen.push(
                    self.by_source
                        .first_evictable(source, seen_ms, &chosen, &pinned)?,
                );
            }
        }
        let len = self.by_prefix.len(prefix);
        if size(len, &chosen, &|e| e.prefix == prefix) >= caps.per_prefix {
            chosen.push(
                self.by_prefix
                    .first_evictable(prefix, seen_ms, &chosen, &pinned)?,
            );
        }
        // `peer` is new to the table here (an update passes no source).
        let kept = self.entries.len() + 1 - chosen.len();
        if source.is_some() && kept >= caps.total {
            // The fullest source bucket with an evictable entry gives up
            // its oldest (ties: the lowest source).
            let mut fullest: Vec<(Reverse<usize>, Source)> = self
                .by_source
                .sizes
                .iter()
                .map(|(s, n)| (Reverse(size(*n, &chosen, &|e| e.source == *s)), *s))
                .collect();
            fullest.sort_unstable();
            let victim = fullest
                .into_iter()
                .find_map(|(_, s)| self.by_source.first_evictable(s, seen_ms, &chosen, &pinned))?;
            chosen.push(victim);
        }
        chosen.remove(0);
        Some(chosen)
    }
}
