//! Who may use the reserved inbound slots, kept up to date as committees
//! are installed.
//!
//! The inbound admission ([`ConnectionLimit`]) keeps
//! `reserved-inbound-connections` slots for the peers it is told to
//! reserve them for. [`ReservedPeers`] decides who that is; the
//! [`ReservedSlots`] actor owns it, hears of every committee the Verifier
//! installs (at start and at each epoch change, synced or local) and hands
//! the new set to the admission.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use actix::{Actor, Context, Handler, Supervised};
use soma_store::ConsensusStore;
use soma_types::{Committee, Epoch, PeerId};
use soma_wire::inbound::ConnectionLimit;

use crate::verifier::{InstallCommittee, stored_committees};

/// Committees whose members hold reservations: the newest installed (the
/// epoch the node has reached) and the one before it.
///
/// Not every committee ever installed: a reserved caller is never evicted
/// and skips the ordinary callers' share, so a reservation is a privilege.
/// Members of the committee that just ended still finish and serve its
/// last commits to peers crossing the boundary, so they keep theirs for
/// one more epoch; a validator retired longer than that is an ordinary
/// peer again (its operator gone, its key perhaps sold), and the set stays
/// near one committee's size however many epochs pass, which is what
/// `reserved-inbound-connections` is sized for.
pub(crate) const RESERVED_COMMITTEES: usize = 2;

/// The peers the reserved inbound slots are for: the allowlist and the
/// members of the [`RESERVED_COMMITTEES`] newest committees installed.
#[derive(Clone, Debug)]
pub(crate) struct ReservedPeers {
    allowlist: BTreeSet<PeerId>,
    /// Network keys of the members, by epoch; the newest only.
    committees: BTreeMap<Epoch, BTreeSet<PeerId>>,
}

impl ReservedPeers {
    /// The allowlist, no committee yet.
    pub(crate) fn new(allowlist: impl IntoIterator<Item = PeerId>) -> Self {
        ReservedPeers {
            allowlist: allowlist.into_iter().collect(),
            committees: BTreeMap::new(),
        }
    }

    /// `committee` was installed. Installing one again, or one older than
    /// the reserved ones, changes nothing.
    pub(crate) fn install(&mut self, committee: &Committee) {
        let members = committee.authorities().map(|(_, a)| a.network_key);
        self.committees.insert(committee.epoch(), members.collect());
        while self.committees.len() > RESERVED_COMMITTEES {
            self.committees.pop_first();
        }
    }

    /// Every peer with reserved slots, each once.
    pub(crate) fn peers(&self) -> BTreeSet<PeerId> {
        self.committees
            .values()
            .flatten()
            .chain(&self.allowlist)
            .copied()
            .collect()
    }
}

/// Owns [`ReservedPeers`] and tells the admission each new set. It hears
/// one message per committee installed, so its mailbox needs no bound of
/// its own.
pub(crate) struct ReservedSlots {
    allowlist: Vec<PeerId>,
    /// The store whose committees (from the genesis epoch on) are reserved
    /// for at start and after a restart.
    committees: (Arc<dyn ConsensusStore>, Epoch),
    peers: ReservedPeers,
    admission: ConnectionLimit,
}

impl ReservedSlots {
    /// Keeps `admission` reserving for the allowlist, the committees the
    /// store holds, and those installed from now on.
    pub(crate) fn new(
        allowlist: Vec<PeerId>,
        committees: (Arc<dyn ConsensusStore>, Epoch),
        admission: ConnectionLimit,
    ) -> Self {
        let mut slots = ReservedSlots {
            peers: ReservedPeers::new(allowlist.iter().copied()),
            allowlist,
            committees,
            admission,
        };
        slots.rebuild();
        slots
    }

    /// The reserved peers from the allowlist and the stored committees.
    fn rebuild(&mut self) {
        self.peers = ReservedPeers::new(self.allowlist.iter().copied());
        let (store, first) = &self.committees;
        match stored_committees(store.as_ref(), *first, RESERVED_COMMITTEES) {
            Ok(committees) => committees.iter().for_each(|c| self.peers.install(c)),
            Err(e) => tracing::warn!(%e, "reserved slots: cannot read the committees"),
        }
        self.admission.reserve_for(self.peers.peers());
    }
}

impl Actor for ReservedSlots {
    type Context = Context<Self>;
}

impl Supervised for ReservedSlots {
    fn restarting(&mut self, _: &mut Context<Self>) {
        self.rebuild();
    }
}

impl Handler<InstallCommittee> for ReservedSlots {
    type Result = ();
    fn handle(&mut self, msg: InstallCommittee, _: &mut Context<Self>) {
        self.peers.install(&msg.0);
        self.admission.reserve_for(self.peers.peers());
    }
}

#[cfg(test)]
mod tests {
    use soma_types::{Authority, KeyPair};

    use super::*;

    fn peer(seed: u8) -> PeerId {
        KeyPair::from_seed([seed; 32]).public().into()
    }

    /// A committee of `epoch` whose members are the peers of `seeds`.
    fn committee(epoch: Epoch, seeds: &[u8]) -> Committee {
        let authorities = seeds
            .iter()
            .map(|&s| Authority {
                stake: 1,
                protocol_key: KeyPair::from_seed([s; 32]).public(),
                network_key: peer(s),
                address: format!("127.0.0.1:{}", 20_000 + u16::from(s)),
            })
            .collect();
        Committee::new(epoch, authorities).unwrap()
    }

    fn peers(seeds: &[u8]) -> BTreeSet<PeerId> {
        seeds.iter().map(|&s| peer(s)).collect()
    }

    #[test]
    fn the_allowlist_and_the_two_newest_committees_are_reserved() {
        let mut reserved = ReservedPeers::new([peer(9), peer(1)]);
        assert_eq!(reserved.peers(), peers(&[9, 1]));
        reserved.install(&committee(0, &[1, 2, 3]));
        assert_eq!(reserved.peers(), peers(&[9, 1, 2, 3]));
        // A new committee adds its members; the previous one stays.
        reserved.install(&committee(1, &[3, 4, 5]));
        assert_eq!(reserved.peers(), peers(&[9, 1, 2, 3, 4, 5]));
        // The third retires the first: 2 leaves, 1 stays allowlisted.
        reserved.install(&committee(2, &[5, 6]));
        assert_eq!(reserved.peers(), peers(&[9, 1, 3, 4, 5, 6]));
    }

    #[test]
    fn a_committee_installed_again_or_late_changes_nothing() {
        let mut reserved = ReservedPeers::new([]);
        reserved.install(&committee(1, &[1]));
        reserved.install(&committee(2, &[2]));
        reserved.install(&committee(2, &[2]));
        reserved.install(&committee(0, &[7]));
        assert_eq!(reserved.peers(), peers(&[1, 2]));
    }
}
