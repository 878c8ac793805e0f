use std::collections::{BTreeMap, BTreeSet, HashMap};

use rand::SeedableRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use soma_types::{Access, PeerId, SignedNodeInfo};

use super::messages::*;
use crate::{Core, Time};

/// A peer to dial when isolated; its id is learnt from the handshake if not
/// given.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeedPeer {
    /// The seed's peer id, if known.
    pub peer_id: Option<PeerId>,
    /// `host:port`.
    pub address: String,
}

/// Everything a Discovery core is made from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Init {
    /// Tunable settings.
    pub config: Config,
    /// Our own peer id.
    pub local: PeerId,
    /// Who may connect to us (and whom we accept infos of).
    pub access: Access,
    /// Peers dialled first and always, even past the target; in private
    /// mode the only ones.
    pub allowlist: Vec<PeerId>,
    /// Dialled when no peer is connected.
    pub seeds: Vec<SeedPeer>,
    /// Seed of the core's randomness.
    pub seed: u64,
}

/// Discovery's tunable settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Config {
    /// Milliseconds between rounds.
    pub interval_ms: u64,
    /// Connected peers asked for their known peers each round.
    pub peers_to_query: usize,
    /// Connections Discovery dials up to.
    pub target_concurrent_connections: usize,
    /// Most infos sent in one GetKnownPeers answer.
    pub max_peers_to_send: usize,
    /// Most peers known at once (the oldest info is dropped beyond).
    pub max_known_peers: usize,
    /// GetKnownPeers calls answered per caller per interval.
    pub get_known_peers_rate_limit: u32,
    /// An info older than this is dropped, in milliseconds.
    pub node_info_max_age_ms: u64,
    /// First wait before redialling a peer whose dial failed, doubled per
    /// failure, in milliseconds.
    pub dial_backoff_ms: u64,
    /// Longest wait before redialling, in milliseconds.
    pub max_dial_backoff_ms: u64,
    /// A dial with no result after this long is forgotten, in milliseconds.
    pub pending_dial_timeout_ms: u64,
}

impl Default for Config {
    /// The design's defaults.
    fn default() -> Self {
        Config {
            interval_ms: 5_000,
            peers_to_query: 3,
            target_concurrent_connections: 8,
            max_peers_to_send: 200,
            max_known_peers: 1_000,
            get_known_peers_rate_limit: 10,
            node_info_max_age_ms: 24 * 60 * 60 * 1000,
            dial_backoff_ms: 1_000,
            max_dial_backoff_ms: 60_000,
            pending_dial_timeout_ms: 30_000,
        }
    }
}

impl Init {
    /// Defaults for node `local`: public, no allowlist, no seeds.
    pub fn new(local: PeerId, seed: u64) -> Self {
        Init {
            config: Config::default(),
            local,
            access: Access::Public,
            allowlist: Vec::new(),
            seeds: Vec::new(),
            seed,
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Backoff {
    failures: u32,
    retry_at: Time,
}

/// The logic of Discovery.
pub struct DiscoveryCore {
    init: Init,
    config: Config,
    allowlist: BTreeSet<PeerId>,
    known: BTreeMap<PeerId, SignedNodeInfo>,
    connected: BTreeSet<PeerId>,
    /// Dials in progress by address, with the peer expected and the start.
    pending: BTreeMap<String, (Option<PeerId>, Time)>,
    /// Backoff by address.
    backoff: BTreeMap<String, Backoff>,
    /// GetKnownPeers calls served this interval, per caller.
    served: HashMap<Option<PeerId>, u32>,
    rng: ChaCha8Rng,
}

impl Core for DiscoveryCore {
    const NAME: &'static str = "discovery";
    type Init = Init;
    type Input = Input;
    type Output = Output;

    fn new(init: Init) -> Self {
        DiscoveryCore {
            rng: ChaCha8Rng::seed_from_u64(init.seed),
            allowlist: init.allowlist.iter().copied().collect(),
            config: init.config.clone(),
            init,
            known: BTreeMap::new(),
            connected: BTreeSet::new(),
            pending: BTreeMap::new(),
            backoff: BTreeMap::new(),
            served: HashMap::new(),
        }
    }

    fn handle(&mut self, now: Time, input: Input) -> Vec<Output> {
        match input {
            Input::Tick { unix_ms } => self.tick(now, unix_ms),
            Input::Connected { peer } => {
                self.connected.insert(peer);
                self.pending.retain(|_, (p, _)| *p != Some(peer));
                if let Some(info) = self.known.get(&peer) {
                    for a in &info.info.addresses {
                        self.backoff.remove(a);
                    }
                }
                vec![]
            }
            Input::Disconnected { peer } => {
                self.connected.remove(&peer);
                vec![]
            }
            Input::DialFailed { peer, address } => {
                self.pending.remove(&address);
                if let Some(p) = peer {
                    self.pending.retain(|_, (q, _)| *q != Some(p));
                }
                let b = self.backoff.entry(address).or_insert(Backoff {
                    failures: 0,
                    retry_at: now,
                });
                b.failures = b.failures.saturating_add(1);
                let wait = self
                    .config
                    .dial_backoff_ms
                    .saturating_mul(1 << b.failures.min(20).saturating_sub(1))
                    .min(self.config.max_dial_backoff_ms);
                b.retry_at = Time(now.0.saturating_add(wait));
                vec![]
            }
            Input::Learned { infos } => {
                for info in infos {
                    self.learn(info);
                }
                vec![]
            }
            Input::Serve { id, caller, info } => self.serve(id, caller, info),
            Input::KnownPeers => vec![Output::Known(self.known.values().cloned().collect())],
        }
    }
}

impl DiscoveryCore {
    fn acceptable(&self, peer: &PeerId) -> bool {
        *peer != self.init.local
            && (self.init.access == Access::Public || self.allowlist.contains(peer))
    }

    /// Keeps the newest info per peer, within the bound on known peers.
    fn learn(&mut self, info: SignedNodeInfo) {
        let peer = info.info.peer_id;
        if !self.acceptable(&peer) {
            return;
        }
        match self.known.get(&peer) {
            Some(old) if old.info.timestamp_ms >= info.info.timestamp_ms => return,
            Some(_) => {}
            None if self.known.len() >= self.config.max_known_peers => {
                let oldest = self
                    .known
                    .iter()
                    .min_by_key(|(_, i)| i.info.timestamp_ms)
                    .map(|(p, _)| *p);
                match oldest {
                    Some(p) if self.known[&p].info.timestamp_ms < info.info.timestamp_ms => {
                        self.known.remove(&p);
                    }
                    _ => return,
                }
            }
            None => {}
        }
        self.known.insert(peer, info);
    }

    fn tick(&mut self, now: Time, unix_ms: u64) -> Vec<Output> {
        let max_age = self.config.node_info_max_age_ms;
        self.known
            .retain(|_, i| unix_ms.saturating_sub(i.info.timestamp_ms) <= max_age);
        let timeout = self.config.pending_dial_timeout_ms;
        self.pending
            .retain(|_, (_, since)| now.0.saturating_sub(since.0) < timeout);
        self.served.clear();

        let mut out = Vec::new();
        let connected: Vec<PeerId> = self.connected.iter().copied().collect();
        for peer in connected.choose_multiple(&mut self.rng, self.config.peers_to_query) {
            out.push(Output::Query { peer: *peer });
        }
        self.dial(now, &mut out);
        out
    }

    fn dialable(&self, now: Time, address: &str) -> bool {
        !self.pending.contains_key(address)
            && self.backoff.get(address).is_none_or(|b| b.retry_at <= now)
    }

    fn dial(&mut self, now: Time, out: &mut Vec<Output>) {
        let pending_peers: BTreeSet<PeerId> =
            self.pending.values().filter_map(|(p, _)| *p).collect();
        let mut allowlisted = Vec::new();
        let mut others = Vec::new();
        for (peer, info) in &self.known {
            if self.connected.contains(peer)
                || pending_peers.contains(peer)
                || !self.acceptable(peer)
            {
                continue;
            }
            let Some(address) = info.info.addresses.first() else {
                continue;
            };
            if !self.dialable(now, address) {
                continue;
            }
            let target = (*peer, address.clone());
            if self.allowlist.contains(peer) {
                allowlisted.push(target);
            } else {
                others.push(target);
            }
        }
        others.shuffle(&mut self.rng);
        // Allowlisted peers always; the rest up to the connection target.
        let mut slots = self
            .config
            .target_concurrent_connections
            .saturating_sub(self.connected.len() + self.pending.len());
        for (peer, address) in allowlisted {
            slots = slots.saturating_sub(1);
            self.start_dial(now, Some(peer), address, out);
        }
        for (peer, address) in others.into_iter().take(slots) {
            self.start_dial(now, Some(peer), address, out);
        }
        // Isolated: the seeds.
        if self.connected.is_empty() && self.pending.is_empty() {
            let seeds: Vec<SeedPeer> = self
                .init
                .seeds
                .iter()
                .filter(|s| s.peer_id != Some(self.init.local) && self.dialable(now, &s.address))
                .cloned()
                .collect();
            for seed in seeds {
                self.start_dial(now, seed.peer_id, seed.address, out);
            }
        }
    }

    fn start_dial(
        &mut self,
        now: Time,
        peer: Option<PeerId>,
        address: String,
        out: &mut Vec<Output>,
    ) {
        self.pending.insert(address.clone(), (peer, now));
        out.push(Output::Dial { peer, address });
    }

    fn serve(
        &mut self,
        id: u64,
        caller: Option<PeerId>,
        info: Option<SignedNodeInfo>,
    ) -> Vec<Output> {
        let count = self.served.entry(caller).or_default();
        if *count >= self.config.get_known_peers_rate_limit {
            return vec![Output::RateLimited { id }];
        }
        *count += 1;
        // Connect-back: only an authenticated caller's own info.
        if let (Some(caller), Some(info)) = (caller, info)
            && info.info.peer_id == caller
        {
            self.learn(info);
        }
        let candidates: Vec<&SignedNodeInfo> = self
            .known
            .values()
            .filter(|i| Some(i.info.peer_id) != caller)
            .collect();
        let infos = candidates
            .choose_multiple(&mut self.rng, self.config.max_peers_to_send)
            .map(|i| (*i).clone())
            .collect();
        vec![Output::Answer { id, infos }]
    }
}
