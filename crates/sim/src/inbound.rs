//! A node's server admitting inbound connections by the production rules
//! (`soma_wire::inbound::Rules`, the state machine the node's accept loop
//! runs): caps on connections in all, per address and per prefix, and,
//! when full, the eviction of the longest-idle ordinary connection.
//!
//! The rules read times as `Instant`s; here they are the simulation's
//! virtual milliseconds after one fixed base, so a run stays a pure
//! function of its seed. A connection's activity is the GetKnownPeers
//! calls it carries (the node's height queries, every second, are not
//! simulated here).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use soma_types::PeerId;
use soma_wire::inbound::{Config, ConnId, Refusal, Rules};
use soma_wire::tls::Caller;

/// One node's inbound side.
pub(crate) struct Server {
    rules: Rules,
    base: Instant,
    /// The connection of each node that dialled this one.
    by_dialler: BTreeMap<usize, ConnId>,
    by_conn: BTreeMap<ConnId, usize>,
    /// Virtual time of each connection's last call, in milliseconds.
    active: BTreeMap<ConnId, u64>,
}

impl Server {
    pub(crate) fn new(config: Config, base: Instant) -> Self {
        Server {
            rules: Rules::new(config),
            base,
            by_dialler: BTreeMap::new(),
            by_conn: BTreeMap::new(),
            active: BTreeMap::new(),
        }
    }

    /// Node `dialler`, at `ip` with identity `peer`, connects at `now_ms`:
    /// admitted (with the diallers whose connections were evicted for it)
    /// or refused.
    pub(crate) fn accept(
        &mut self,
        now_ms: u64,
        dialler: usize,
        ip: IpAddr,
        peer: PeerId,
    ) -> Result<Vec<usize>, Refusal> {
        let now = self.base + Duration::from_millis(now_ms);
        let (base, active) = (self.base, &self.active);
        let last_active =
            |id: ConnId| base + Duration::from_millis(active.get(&id).copied().unwrap_or(0));
        let admit = self.rules.admit(now, ip, last_active)?;
        let mut evicted: Vec<ConnId> = admit.evicted.into_iter().collect();
        let caller = Caller::Peer(peer);
        evicted.extend(self.rules.identify(admit.id, caller, last_active)?);
        let gone = evicted
            .into_iter()
            .filter_map(|id| self.forget(id))
            .collect();
        self.by_dialler.insert(dialler, admit.id);
        self.by_conn.insert(admit.id, dialler);
        self.active.insert(admit.id, now_ms);
        Ok(gone)
    }

    /// `dialler`'s connection carried a call at `now_ms`.
    pub(crate) fn touch(&mut self, dialler: usize, now_ms: u64) {
        if let Some(id) = self.by_dialler.get(&dialler) {
            self.active.insert(*id, now_ms);
        }
    }

    /// `dialler`'s connection closed.
    pub(crate) fn release(&mut self, dialler: usize) {
        if let Some(id) = self.by_dialler.get(&dialler).copied() {
            self.rules.release(id);
            self.forget(id);
        }
    }

    /// Inbound connections open.
    pub(crate) fn open(&self) -> usize {
        self.rules.open()
    }

    /// Drops the bookkeeping of connection `id` (released by the rules);
    /// its dialler.
    fn forget(&mut self, id: ConnId) -> Option<usize> {
        let dialler = self.by_conn.remove(&id)?;
        self.by_dialler.remove(&dialler);
        self.active.remove(&id);
        Some(dialler)
    }
}
