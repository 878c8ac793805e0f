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
            Input::Connected { peer, address } => {
                self.connected.insert(peer);
                self.pending.remove(&address);
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

#[cfg(test)]
mod tests {
    use soma_types::{KeyPair, NodeInfo};

    use super::*;

    const NOW_MS: u64 = 1_700_000_000_000;
    const DAY_MS: u64 = 24 * 60 * 60 * 1000;

    fn key(n: u8) -> KeyPair {
        KeyPair::from_seed([n; 32])
    }

    fn id(n: u8) -> PeerId {
        PeerId::from(key(n).public())
    }

    fn info(n: u8, timestamp_ms: u64) -> SignedNodeInfo {
        SignedNodeInfo::sign(
            NodeInfo {
                peer_id: id(n),
                addresses: vec![format!("10.0.0.{n}:7000")],
                timestamp_ms,
                access: Access::Public,
            },
            &key(n),
        )
    }

    fn init(target: usize) -> Init {
        let mut init = Init::new(id(0), 9);
        init.config.target_concurrent_connections = target;
        init
    }

    fn core(target: usize) -> DiscoveryCore {
        DiscoveryCore::new(init(target))
    }

    fn learn(c: &mut DiscoveryCore, infos: Vec<SignedNodeInfo>) {
        c.handle(Time(0), Input::Learned { infos });
    }

    fn known(c: &mut DiscoveryCore) -> Vec<PeerId> {
        match c.handle(Time(0), Input::KnownPeers).pop() {
            Some(Output::Known(k)) => k.iter().map(|i| i.info.peer_id).collect(),
            other => panic!("{other:?}"),
        }
    }

    fn tick(c: &mut DiscoveryCore, now: Time, unix_ms: u64) -> Vec<Output> {
        c.handle(now, Input::Tick { unix_ms })
    }

    fn dials(out: &[Output]) -> Vec<(Option<PeerId>, String)> {
        out.iter()
            .filter_map(|o| match o {
                Output::Dial { peer, address } => Some((*peer, address.clone())),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn keeps_the_newest_info_per_peer() {
        let mut c = core(8);
        learn(&mut c, vec![info(1, NOW_MS), info(1, NOW_MS - 5)]);
        let Some(Output::Known(k)) = c.handle(Time(0), Input::KnownPeers).pop() else {
            panic!()
        };
        assert_eq!(k.len(), 1);
        assert_eq!(k[0].info.timestamp_ms, NOW_MS);
        learn(&mut c, vec![info(1, NOW_MS + 10)]);
        let Some(Output::Known(k)) = c.handle(Time(0), Input::KnownPeers).pop() else {
            panic!()
        };
        assert_eq!(k[0].info.timestamp_ms, NOW_MS + 10);
    }

    #[test]
    fn never_learns_itself_and_only_allowlisted_peers_when_private() {
        let mut c = core(8);
        learn(&mut c, vec![info(0, NOW_MS)]);
        assert!(known(&mut c).is_empty());

        let mut private = init(8);
        private.access = Access::Private;
        private.allowlist = vec![id(2)];
        let mut c = DiscoveryCore::new(private);
        learn(&mut c, vec![info(1, NOW_MS), info(2, NOW_MS)]);
        assert_eq!(known(&mut c), vec![id(2)]);
    }

    #[test]
    fn expired_infos_are_dropped_at_the_tick() {
        let mut c = core(0);
        learn(
            &mut c,
            vec![info(1, NOW_MS - DAY_MS), info(2, NOW_MS - DAY_MS - 1)],
        );
        tick(&mut c, Time(0), NOW_MS);
        assert_eq!(known(&mut c), vec![id(1)]);
    }

    #[test]
    fn known_peers_are_bounded_dropping_the_oldest() {
        let mut i = init(0);
        i.config.max_known_peers = 2;
        let mut c = DiscoveryCore::new(i);
        learn(
            &mut c,
            vec![info(1, NOW_MS - 10), info(2, NOW_MS - 5), info(3, NOW_MS)],
        );
        let mut k = known(&mut c);
        k.sort();
        let mut want = vec![id(2), id(3)];
        want.sort();
        assert_eq!(k, want);
        // An info older than all kept ones does not get in.
        learn(&mut c, vec![info(4, NOW_MS - 100)]);
        assert!(!known(&mut c).contains(&id(4)));
    }

    #[test]
    fn never_dials_a_connected_or_pending_peer() {
        let mut c = core(8);
        learn(&mut c, vec![info(1, NOW_MS), info(2, NOW_MS)]);
        c.handle(
            Time(0),
            Input::Connected {
                address: String::new(),
                peer: id(1),
            },
        );
        let out = tick(&mut c, Time(0), NOW_MS);
        assert_eq!(
            dials(&out),
            vec![(Some(id(2)), "10.0.0.2:7000".to_string())]
        );
        // Still pending: not dialled again.
        assert!(dials(&tick(&mut c, Time(100), NOW_MS)).is_empty());
        // A pending dial with no answer is forgotten after the timeout.
        let later = Time(30_000);
        assert_eq!(dials(&tick(&mut c, later, NOW_MS)).len(), 1);
    }

    #[test]
    fn dials_up_to_the_target() {
        let mut c = core(2);
        learn(&mut c, (1..=5).map(|n| info(n, NOW_MS)).collect());
        c.handle(
            Time(0),
            Input::Connected {
                address: String::new(),
                peer: id(1),
            },
        );
        assert_eq!(dials(&tick(&mut c, Time(0), NOW_MS)).len(), 1);
    }

    #[test]
    fn seeds_are_dialled_only_when_isolated() {
        let mut i = init(8);
        i.seeds = vec![SeedPeer {
            peer_id: None,
            address: "seed:1".into(),
        }];
        let mut c = DiscoveryCore::new(i);
        assert_eq!(
            dials(&tick(&mut c, Time(0), NOW_MS)),
            vec![(None, "seed:1".to_string())]
        );
        // Pending: no second dial.
        assert!(dials(&tick(&mut c, Time(10), NOW_MS)).is_empty());
        c.handle(
            Time(20),
            Input::Connected {
                address: "seed:1".into(),
                peer: id(7),
            },
        );
        c.handle(
            Time(20),
            Input::DialFailed {
                peer: None,
                address: "seed:1".into(),
            },
        );
        // Connected to someone: seeds are left alone.
        assert!(dials(&tick(&mut c, Time(60_000), NOW_MS)).is_empty());
        c.handle(Time(60_000), Input::Disconnected { peer: id(7) });
        assert_eq!(dials(&tick(&mut c, Time(120_000), NOW_MS)).len(), 1);
    }

    #[test]
    fn a_seed_dialled_by_address_is_no_longer_pending_once_connected() {
        let mut i = init(8);
        i.seeds = vec![SeedPeer {
            peer_id: None,
            address: "seed:1".into(),
        }];
        let mut c = DiscoveryCore::new(i);
        assert_eq!(dials(&tick(&mut c, Time(0), NOW_MS)).len(), 1);
        c.handle(
            Time(10),
            Input::Connected {
                address: "seed:1".into(),
                peer: id(7),
            },
        );
        c.handle(Time(20), Input::Disconnected { peer: id(7) });
        // Isolated again: the seed is redialled at the next round, not after
        // the pending-dial timeout.
        assert_eq!(
            dials(&tick(&mut c, Time(5_000), NOW_MS)),
            vec![(None, "seed:1".to_string())]
        );
    }

    #[test]
    fn failed_dials_back_off_exponentially() {
        let mut c = core(8);
        learn(&mut c, vec![info(1, NOW_MS)]);
        let address = "10.0.0.1:7000".to_string();
        let fail = |c: &mut DiscoveryCore, at: u64| {
            c.handle(
                Time(at),
                Input::DialFailed {
                    peer: Some(id(1)),
                    address: address.clone(),
                },
            );
        };
        assert_eq!(dials(&tick(&mut c, Time(0), NOW_MS)).len(), 1);
        fail(&mut c, 0);
        assert!(dials(&tick(&mut c, Time(999), NOW_MS)).is_empty());
        assert_eq!(dials(&tick(&mut c, Time(1_000), NOW_MS)).len(), 1);
        fail(&mut c, 1_000);
        assert!(dials(&tick(&mut c, Time(2_999), NOW_MS)).is_empty());
        assert_eq!(dials(&tick(&mut c, Time(3_000), NOW_MS)).len(), 1);
    }

    #[test]
    fn allowlisted_peers_are_dialled_first_and_past_the_target() {
        let mut i = init(1);
        i.allowlist = vec![id(5), id(6)];
        let mut c = DiscoveryCore::new(i);
        learn(&mut c, (1..=6).map(|n| info(n, NOW_MS)).collect());
        let got: Vec<_> = dials(&tick(&mut c, Time(0), NOW_MS))
            .into_iter()
            .map(|(p, _)| p.unwrap())
            .collect();
        assert_eq!(got, vec![id(5), id(6)]);
    }

    #[test]
    fn queries_at_most_peers_to_query_connected_peers() {
        let mut c = core(0);
        for n in 1..=5 {
            c.handle(
                Time(0),
                Input::Connected {
                    address: String::new(),
                    peer: id(n),
                },
            );
        }
        let queries = tick(&mut c, Time(0), NOW_MS)
            .iter()
            .filter(|o| matches!(o, Output::Query { .. }))
            .count();
        assert_eq!(queries, 3);
    }

    #[test]
    fn serving_remembers_only_the_callers_own_info_and_is_rate_limited() {
        let mut i = init(0);
        i.config.get_known_peers_rate_limit = 2;
        let mut c = DiscoveryCore::new(i);
        learn(&mut c, vec![info(1, NOW_MS)]);
        // Peer 2 sends peer 3's info as its own: not remembered.
        let out = c.handle(
            Time(0),
            Input::Serve {
                id: 1,
                caller: Some(id(2)),
                info: Some(info(3, NOW_MS)),
            },
        );
        assert!(matches!(&out[0], Output::Answer { id: 1, infos } if infos.len() == 1));
        assert!(!known(&mut c).contains(&id(3)));
        // Its own info is (connect-back), and it is not sent back to itself.
        let out = c.handle(
            Time(0),
            Input::Serve {
                id: 2,
                caller: Some(id(2)),
                info: Some(info(2, NOW_MS)),
            },
        );
        assert!(known(&mut c).contains(&id(2)));
        let Output::Answer { infos, .. } = &out[0] else {
            panic!()
        };
        assert!(infos.iter().all(|i| i.info.peer_id != id(2)));
        // Third call this interval: refused; the next interval resets.
        let serve = |c: &mut DiscoveryCore, id| {
            c.handle(
                Time(0),
                Input::Serve {
                    id,
                    caller: Some(self::id(2)),
                    info: None,
                },
            )
        };
        assert_eq!(serve(&mut c, 3), vec![Output::RateLimited { id: 3 }]);
        tick(&mut c, Time(5_000), NOW_MS);
        assert!(matches!(serve(&mut c, 4)[0], Output::Answer { .. }));
    }

    #[test]
    fn answers_are_a_bounded_random_sample() {
        let mut i = init(0);
        i.config.max_peers_to_send = 3;
        let mut c = DiscoveryCore::new(i);
        learn(&mut c, (1..=10).map(|n| info(n, NOW_MS)).collect());
        let serve = |c: &mut DiscoveryCore, id| match c
            .handle(
                Time(0),
                Input::Serve {
                    id,
                    caller: None,
                    info: None,
                },
            )
            .pop()
        {
            Some(Output::Answer { infos, .. }) => infos,
            other => panic!("{other:?}"),
        };
        let a = serve(&mut c, 1);
        assert_eq!(a.len(), 3);
        let samples: std::collections::HashSet<Vec<PeerId>> = (2..8)
            .map(|id| serve(&mut c, id).iter().map(|i| i.info.peer_id).collect())
            .collect();
        assert!(samples.len() > 1, "every sample was the same");
    }
}
