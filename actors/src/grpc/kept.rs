//! Fetch slots kept by their connection between two fetches.
//!
//! Every fetch needs a slot from the [`GrpcAdapter`](super::GrpcAdapter),
//! and asking for one is a round trip to the actor's thread: two thread
//! wake-ups, which cost a peer fetching batch after batch about 40 % of
//! what the server could serve it. So when a fetch's answer has been
//! handed to the transport in full, its slot is not given back at once:
//! it is kept for the next fetch of the same caller on the same
//! connection, which then starts without asking. The adapter's core still
//! counts the slot as held by that caller, so keeping it grants nothing
//! the caller did not hold already; and before the adapter admits a fetch
//! that kept slots stand in the way of, it takes them back
//! ([`KeptSlots::reclaim`]): the caller's own when it is at its cap, its
//! host's or network's at theirs, everyone's when every slot is held. So a kept slot never stands in the
//! way of another caller, or of the same caller on another connection,
//! and fetches that find a slot free (a stranger's, at any rate) leave
//! kept slots alone. A slot whose answer was cut (its
//! deadline, or taken by a newer fetch) or not sent in full is given back
//! as before, never kept.
//!
//! A fetch on a kept slot passes the same checks of its request as one the
//! core admits (`fetch_work`); an invalid one is refused and the slot
//! stays kept. There are at most as many kept slots as fetch slots
//! (`max-concurrent-fetches`): each is one the core counts, but for one
//! race: a preemption that takes a slot just as its connection's next
//! fetch took it from here lets that fetch finish uncounted (microseconds
//! wide, one answer long); its slot is then never kept ([`KeptSlots::revoke`]).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use soma_types::PeerId;

use super::actor::Permit;

/// Who may use a kept slot: the connection, by its remote address, and the
/// caller authenticated on it (so a later connection from the same
/// address by another identity does not inherit it); with the host the
/// slot counts in, if any (`None` for a connection holding
/// reserved slots), by which the slots in a full host's or network's way
/// are taken back.
pub(crate) type SlotKey = (SocketAddr, Option<PeerId>, Option<IpAddr>);

/// Revoked ids remembered for a slot not yet kept; only a preemption racing
/// the end of an answer leaves one, and the adapter forgets those whose
/// permit is gone, so a few suffice.
const MAX_REVOKED: usize = 64;

/// The slots kept, by connection and caller.
#[derive(Debug, Default)]
pub(crate) struct KeptSlots {
    state: Mutex<State>,
    reused: AtomicU64,
}

#[derive(Debug, Default)]
struct State {
    slots: HashMap<SlotKey, Vec<Permit>>,
    /// Slots the adapter took back (a preemption) whose answer ended just
    /// before it was cut: never to be kept.
    revoked: Vec<u64>,
}

impl KeptSlots {
    /// Keeps `permit` for the next fetch of `key`, unless the adapter has
    /// revoked its slot.
    pub(crate) fn keep(&self, key: SlotKey, permit: Permit) {
        let mut state = self.lock();
        if let Some(at) = state.revoked.iter().position(|id| *id == permit.id()) {
            state.revoked.swap_remove(at);
            drop(state);
            drop(permit);
            return;
        }
        state.slots.entry(key).or_default().push(permit);
    }

    /// The adapter gave the slot of fetch `id` to another fetch, but could
    /// not cut its answer (it had ended): the slot must not stay kept.
    pub(crate) fn revoke(&self, id: u64) {
        let mut state = self.lock();
        let found = state.slots.values_mut().find_map(|kept| {
            let at = kept.iter().position(|p| p.id() == id)?;
            Some(kept.swap_remove(at))
        });
        state.slots.retain(|_, kept| !kept.is_empty());
        if found.is_none() {
            if state.revoked.len() == MAX_REVOKED {
                state.revoked.remove(0);
            }
            state.revoked.push(id);
        }
        drop(state);
        drop(found);
    }

    /// A slot kept for `key`, if any.
    pub(crate) fn take(&self, key: SlotKey) -> Option<Permit> {
        let mut state = self.lock();
        let slots = &mut state.slots;
        let kept = slots.get_mut(&key)?;
        let permit = kept.pop();
        if kept.is_empty() {
            slots.remove(&key);
        }
        permit
    }

    /// Counts a fetch started on a kept slot (its request was valid).
    pub(crate) fn started(&self) {
        self.reused.fetch_add(1, Ordering::Relaxed);
    }

    /// Forgets the revoked ids `held` says are no longer held: their
    /// permits are gone, so none of them can be kept any more.
    pub(crate) fn forget_revoked(&self, held: impl Fn(u64) -> bool) {
        self.lock().revoked.retain(|id| held(*id));
    }

    /// The kept slots whose connection and caller `which` names, taken
    /// out: dropping them gives their slots back to the adapter (which
    /// learns of it from their tokens).
    pub(crate) fn reclaim(&self, which: impl Fn(&SlotKey) -> bool) -> Vec<Permit> {
        let mut state = self.lock();
        let taken: Vec<SlotKey> = (state.slots.keys())
            .filter(|key| which(key))
            .copied()
            .collect();
        taken
            .into_iter()
            .filter_map(|key| state.slots.remove(&key))
            .flatten()
            .collect()
    }

    /// Fetches that started on a kept slot, with no round trip to the
    /// adapter.
    pub(crate) fn reused(&self) -> u64 {
        self.reused.load(Ordering::Relaxed)
    }

    /// Slots kept now.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.lock().slots.values().map(Vec::len).sum()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::holders::Holders;

    fn key(port: u16, caller: u8) -> SlotKey {
        (
            SocketAddr::from(([127, 0, 0, 1], port)),
            Some(PeerId([caller; 32])),
            None,
        )
    }

    #[test]
    fn a_kept_slot_goes_only_to_its_connection_and_caller_and_all_come_back_at_a_reclaim() {
        let mut holders = Holders::default();
        let kept = KeptSlots::default();
        kept.keep(key(1, 1), Permit::new(1, holders.hold_keeping_ended(1)));
        kept.keep(key(1, 1), Permit::new(2, holders.hold_keeping_ended(2)));
        kept.keep(key(2, 1), Permit::new(3, holders.hold_keeping_ended(3)));
        // Another identity on the same address, another connection of the
        // same identity: nothing.
        assert!(kept.take(key(1, 2)).is_none());
        assert!(kept.take(key(3, 1)).is_none());
        assert_eq!(kept.take(key(2, 1)).map(|p| p.id()), Some(3));
        assert!(kept.take(key(2, 1)).is_none());
        // Only the slot taken (and dropped here) ended; the kept ones are
        // still held, and the adapter still counts them.
        assert_eq!(holders.ended(), vec![3]);
        assert_eq!(kept.len(), 2);
        // Taken back by caller: another caller's are left.
        kept.keep(key(3, 2), Permit::new(4, holders.hold_keeping_ended(4)));
        drop(kept.reclaim(|(_, caller, _)| *caller == Some(PeerId([1; 32]))));
        assert_eq!(kept.len(), 1);
        assert_eq!(holders.ended(), vec![1, 2]);
        drop(kept.reclaim(|_| true));
        assert_eq!(kept.len(), 0);
        assert_eq!(holders.ended(), vec![4]);
    }

    #[test]
    fn a_revoked_slot_is_never_kept_whether_it_was_kept_before_or_after() {
        let mut holders = Holders::default();
        let kept = KeptSlots::default();
        // Kept, then revoked: given back at once.
        kept.keep(key(1, 1), Permit::new(1, holders.hold_keeping_ended(1)));
        kept.revoke(1);
        assert!(kept.take(key(1, 1)).is_none());
        assert_eq!(holders.ended(), vec![1]);
        // Revoked while its answer was ending, then kept: given back.
        kept.revoke(2);
        kept.keep(key(1, 1), Permit::new(2, holders.hold_keeping_ended(2)));
        assert!(kept.take(key(1, 1)).is_none());
        assert_eq!(holders.ended(), vec![2]);
        // Others are kept as ever.
        kept.keep(key(1, 1), Permit::new(3, holders.hold_keeping_ended(3)));
        assert_eq!(kept.take(key(1, 1)).map(|p| p.id()), Some(3));
        // A revoked id whose permit went without being kept is forgotten
        // once the adapter sees it is no longer held.
        kept.revoke(4);
        kept.forget_revoked(|id| id != 4);
        kept.keep(key(1, 1), Permit::new(4, holders.hold_keeping_ended(4)));
        assert_eq!(kept.take(key(1, 1)).map(|p| p.id()), Some(4));
    }
}
