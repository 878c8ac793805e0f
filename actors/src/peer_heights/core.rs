use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use soma_types::{ChainId, CommitIndex, PeerId};

use super::messages::*;
use crate::{Core, Time};

/// Throughput assumed for a peer never measured, so new peers get tried.
const PRIOR_THROUGHPUT_BPS: u64 = 1_000_000;
/// Failure count at which a peer's weight stops halving.
const MAX_FAILURES: u32 = 16;
/// Randomness added to balancer weights, in percent.
const JITTER_PERCENT: u64 = 20;

/// PeerHeights settings, and the seed of its RNG.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Config {
    /// The chain we are on; peers on another chain are kept out of answers.
    pub chain_id: ChainId,
    /// How long a peer that sent invalid data stays banned, in milliseconds.
    pub ban_duration_ms: u64,
    /// Seed of the balancer's randomness.
    pub seed: u64,
    /// Peers tracked at most; reports from new peers beyond are ignored.
    #[serde(default = "default_max_tracked_peers")]
    pub max_tracked_peers: usize,
}

fn default_max_tracked_peers() -> usize {
    1024
}

impl Config {
    /// Settings with the default ban of 60 s.
    pub fn new(chain_id: ChainId, seed: u64) -> Self {
        Config {
            chain_id,
            ban_duration_ms: Duration::from_secs(60).as_millis() as u64,
            seed,
            max_tracked_peers: default_max_tracked_peers(),
        }
    }
}

#[derive(Clone, Debug)]
struct Peer {
    /// `None` until the peer reports its chain (a PushCommit tells only a
    /// height); such a peer is in no sync answer.
    chain_id: Option<ChainId>,
    highest: CommitIndex,
    lowest: CommitIndex,
    throughput_bps: Option<u64>,
    failures: u32,
}

/// The logic of PeerHeights.
pub struct PeerHeightsCore {
    config: Config,
    peers: BTreeMap<PeerId, Peer>,
    /// Bans outlive disconnections, so a banned peer cannot reconnect its
    /// way out.
    bans: HashMap<PeerId, Time>,
    rng: ChaCha8Rng,
}

impl Core for PeerHeightsCore {
    const NAME: &'static str = "peer_heights";
    type Init = Config;
    type Input = Input;
    type Output = Output;

    fn new(config: Config) -> Self {
        PeerHeightsCore {
            rng: ChaCha8Rng::seed_from_u64(config.seed),
            config,
            peers: BTreeMap::new(),
            bans: HashMap::new(),
        }
    }

    fn handle(&mut self, now: Time, input: Input) -> Vec<Output> {
        self.bans.retain(|_, until| *until > now);
        match input {
            Input::Update(u) => {
                self.update(u);
                vec![]
            }
            Input::Push(PushHeight { peer, highest }) => {
                let room = self.peers.len() < self.config.max_tracked_peers;
                match self.peers.get_mut(&peer) {
                    Some(p) => p.highest = p.highest.max(highest),
                    None if room => {
                        self.peers.insert(
                            peer,
                            Peer {
                                chain_id: None,
                                highest,
                                lowest: 0,
                                throughput_bps: None,
                                failures: 0,
                            },
                        );
                    }
                    None => {}
                }
                vec![]
            }
            Input::Remove(RemovePeer { peer }) => {
                self.peers.remove(&peer);
                vec![]
            }
            Input::HighestKnown => vec![Output::HighestKnown(self.highest_known())],
            Input::PeersForRange(PeersForRange { start, end }) => {
                vec![Output::Peers(self.peers_for_range(start, end))]
            }
            Input::PeersBehind(PeersBehind { index }) => vec![Output::Peers(
                self.eligible()
                    .filter(|(_, p)| p.highest < index)
                    .map(|(id, _)| *id)
                    .collect(),
            )],
            Input::Outcome(o) => self.outcome(now, o),
            Input::Snapshot => vec![Output::Snapshot(self.snapshot())],
        }
    }
}

impl PeerHeightsCore {
    fn update(&mut self, u: UpdateHeight) {
        if !self.peers.contains_key(&u.peer) && self.peers.len() >= self.config.max_tracked_peers {
            return;
        }
        match self.peers.get_mut(&u.peer) {
            // The first chain report of a peer that only pushed a height so
            // far is the same authenticated peer: its height still only
            // moves up.
            Some(p) if p.chain_id.is_none_or(|c| c == u.chain_id) => {
                p.chain_id = Some(u.chain_id);
                p.highest = p.highest.max(u.highest);
                p.lowest = u.lowest;
            }
            _ => {
                let stats = self.peers.remove(&u.peer);
                self.peers.insert(
                    u.peer,
                    Peer {
                        chain_id: Some(u.chain_id),
                        highest: u.highest,
                        lowest: u.lowest,
                        throughput_bps: stats.as_ref().and_then(|s| s.throughput_bps),
                        failures: stats.map_or(0, |s| s.failures),
                    },
                );
            }
        }
    }

    /// Peers on our chain and not banned.
    fn eligible(&self) -> impl Iterator<Item = (&PeerId, &Peer)> {
        self.peers.iter().filter(|(id, p)| {
            p.chain_id == Some(self.config.chain_id) && !self.bans.contains_key(id)
        })
    }

    fn highest_known(&self) -> Option<CommitIndex> {
        self.eligible().map(|(_, p)| p.highest).max()
    }

    /// The PeerBalancer order: weight is measured throughput halved per
    /// recent failure, times up to 20% seeded randomness so load spreads
    /// over peers of similar speed.
    fn peers_for_range(&mut self, start: CommitIndex, end: CommitIndex) -> Vec<PeerId> {
        let candidates: Vec<(PeerId, u64)> = self
            .eligible()
            .filter(|(_, p)| p.lowest <= start && p.highest >= end)
            .map(|(id, p)| {
                let throughput = p.throughput_bps.unwrap_or(PRIOR_THROUGHPUT_BPS);
                (*id, (throughput >> p.failures.min(MAX_FAILURES)).max(1))
            })
            .collect();
        let mut weighted: Vec<(u128, PeerId)> = candidates
            .into_iter()
            .map(|(id, weight)| {
                let jitter = 100 + self.rng.random_range(0..=JITTER_PERCENT);
                (u128::from(weight) * u128::from(jitter), id)
            })
            .collect();
        weighted.sort_by(|a, b| b.cmp(a));
        weighted.into_iter().map(|(_, id)| id).collect()
    }

    fn outcome(&mut self, now: Time, o: ReportOutcome) -> Vec<Output> {
        let mut outputs = Vec::new();
        if o.kind == OutcomeKind::InvalidData {
            let until = now.after(Duration::from_millis(self.config.ban_duration_ms));
            self.bans.insert(o.peer, until);
            outputs.push(Output::Banned {
                peer: o.peer,
                until,
            });
        }
        if let Some(p) = self.peers.get_mut(&o.peer) {
            match o.kind {
                OutcomeKind::Success => {
                    let sample = o.bytes.saturating_mul(1000) / o.latency_ms.max(1);
                    // Exponential moving average, weight 1/4 on the new sample.
                    p.throughput_bps = Some(match p.throughput_bps {
                        Some(old) => (old.saturating_mul(3) / 4).saturating_add(sample / 4),
                        None => sample,
                    });
                    p.failures /= 2;
                }
                OutcomeKind::Timeout | OutcomeKind::Error | OutcomeKind::InvalidData => {
                    p.failures = (p.failures + 1).min(MAX_FAILURES);
                }
            }
        }
        outputs
    }

    fn snapshot(&self) -> Vec<PeerView> {
        self.peers
            .iter()
            .map(|(id, p)| PeerView {
                peer: *id,
                chain_id: p.chain_id,
                highest: p.highest,
                lowest: p.lowest,
                throughput_bps: p.throughput_bps.unwrap_or(0),
                failures: p.failures,
                banned_until: self.bans.get(id).copied(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use soma_types::Digest;

    use super::*;

    const OURS: ChainId = ChainId(Digest([1; 32]));
    const THEIRS: ChainId = ChainId(Digest([2; 32]));

    fn peer(n: u8) -> PeerId {
        PeerId([n; 32])
    }

    fn core(seed: u64) -> PeerHeightsCore {
        PeerHeightsCore::new(Config::new(OURS, seed))
    }

    fn update(c: &mut PeerHeightsCore, p: u8, chain: ChainId, lowest: u64, highest: u64) {
        c.handle(
            Time(0),
            Input::Update(UpdateHeight {
                peer: peer(p),
                chain_id: chain,
                highest,
                lowest,
            }),
        );
    }

    fn highest(c: &mut PeerHeightsCore, now: Time) -> Option<CommitIndex> {
        match c.handle(now, Input::HighestKnown).pop() {
            Some(Output::HighestKnown(h)) => h,
            other => panic!("unexpected {other:?}"),
        }
    }

    fn for_range(c: &mut PeerHeightsCore, now: Time, start: u64, end: u64) -> Vec<PeerId> {
        match c
            .handle(now, Input::PeersForRange(PeersForRange { start, end }))
            .pop()
        {
            Some(Output::Peers(p)) => p,
            other => panic!("unexpected {other:?}"),
        }
    }

    fn behind(c: &mut PeerHeightsCore, index: u64) -> Vec<PeerId> {
        match c
            .handle(Time(0), Input::PeersBehind(PeersBehind { index }))
            .pop()
        {
            Some(Output::Peers(p)) => p,
            other => panic!("unexpected {other:?}"),
        }
    }

    fn outcome(
        c: &mut PeerHeightsCore,
        now: Time,
        p: u8,
        kind: OutcomeKind,
        bytes: u64,
        ms: u64,
    ) -> Vec<Output> {
        c.handle(
            now,
            Input::Outcome(ReportOutcome {
                peer: peer(p),
                bytes,
                latency_ms: ms,
                kind,
            }),
        )
    }

    #[test]
    fn highest_known_is_the_max_over_peers() {
        let mut c = core(1);
        assert_eq!(highest(&mut c, Time(0)), None);
        update(&mut c, 1, OURS, 1, 50);
        update(&mut c, 2, OURS, 1, 80);
        assert_eq!(highest(&mut c, Time(0)), Some(80));
    }

    #[test]
    fn height_never_moves_down_and_lowest_is_as_reported() {
        let mut c = core(1);
        update(&mut c, 1, OURS, 10, 100);
        update(&mut c, 1, OURS, 40, 60);
        let Some(Output::Snapshot(s)) = c.handle(Time(0), Input::Snapshot).pop() else {
            panic!("no snapshot")
        };
        assert_eq!((s[0].lowest, s[0].highest), (40, 100));
    }

    #[test]
    fn other_chain_peers_are_kept_out_of_every_answer() {
        let mut c = core(1);
        update(&mut c, 1, THEIRS, 1, 1_000);
        update(&mut c, 2, OURS, 1, 10);
        assert_eq!(highest(&mut c, Time(0)), Some(10));
        assert_eq!(for_range(&mut c, Time(0), 1, 10), vec![peer(2)]);
        assert_eq!(behind(&mut c, 500), vec![peer(2)]);
        // A peer that moves to our chain is judged on its new report.
        update(&mut c, 1, OURS, 1, 5);
        assert_eq!(highest(&mut c, Time(0)), Some(10));
        assert_eq!(behind(&mut c, 8), vec![peer(1)]);
    }

    #[test]
    fn pushed_height_counts_only_once_the_chain_is_known() {
        let mut c = core(1);
        update(&mut c, 1, OURS, 1, 10);
        let push = |c: &mut PeerHeightsCore, p, highest| {
            c.handle(
                Time(0),
                Input::Push(PushHeight {
                    peer: peer(p),
                    highest,
                }),
            )
        };
        push(&mut c, 1, 40);
        push(&mut c, 1, 30);
        // Peer 9's chain is unknown: tracked, but in no answer.
        push(&mut c, 9, 1_000);
        assert_eq!(highest(&mut c, Time(0)), Some(40));
        assert!(for_range(&mut c, Time(0), 1, 500).is_empty());
        update(&mut c, 9, OURS, 1, 20);
        assert_eq!(highest(&mut c, Time(0)), Some(1_000));
    }

    #[test]
    fn tracked_peers_are_bounded() {
        let mut c = PeerHeightsCore::new(Config {
            max_tracked_peers: 2,
            ..Config::new(OURS, 1)
        });
        for p in 1..=3 {
            update(&mut c, p, OURS, 1, u64::from(p));
        }
        c.handle(
            Time(0),
            Input::Push(PushHeight {
                peer: peer(4),
                highest: 99,
            }),
        );
        assert_eq!(highest(&mut c, Time(0)), Some(2));
        let Some(Output::Snapshot(s)) = c.handle(Time(0), Input::Snapshot).pop() else {
            panic!("no snapshot")
        };
        assert_eq!(s.len(), 2);
    }

    #[test]
    fn removed_peer_is_forgotten() {
        let mut c = core(1);
        update(&mut c, 1, OURS, 1, 100);
        c.handle(Time(0), Input::Remove(RemovePeer { peer: peer(1) }));
        assert_eq!(highest(&mut c, Time(0)), None);
        assert!(for_range(&mut c, Time(0), 1, 10).is_empty());
    }

    #[test]
    fn peers_for_range_need_the_whole_range() {
        let mut c = core(1);
        update(&mut c, 1, OURS, 1, 100);
        update(&mut c, 2, OURS, 50, 300);
        update(&mut c, 3, OURS, 1, 40);
        let mut got = for_range(&mut c, Time(0), 60, 90);
        got.sort();
        assert_eq!(got, vec![peer(1), peer(2)]);
        assert_eq!(for_range(&mut c, Time(0), 101, 200), vec![peer(2)]);
        assert!(for_range(&mut c, Time(0), 10, 200).is_empty());
    }

    #[test]
    fn peers_behind_are_below_the_index() {
        let mut c = core(1);
        update(&mut c, 1, OURS, 1, 100);
        update(&mut c, 2, OURS, 1, 200);
        assert_eq!(behind(&mut c, 150), vec![peer(1)]);
        assert!(behind(&mut c, 100).is_empty());
    }

    #[test]
    fn invalid_data_bans_until_the_ban_ends() {
        let mut c = core(1);
        update(&mut c, 1, OURS, 1, 100);
        update(&mut c, 2, OURS, 1, 50);
        let out = outcome(&mut c, Time(1_000), 1, OutcomeKind::InvalidData, 0, 5);
        assert_eq!(
            out,
            vec![Output::Banned {
                peer: peer(1),
                until: Time(61_000)
            }]
        );
        assert_eq!(highest(&mut c, Time(1_000)), Some(50));
        assert_eq!(for_range(&mut c, Time(60_999), 1, 50), vec![peer(2)]);
        assert_eq!(behind(&mut c, 1_000), vec![peer(2)]);
        // At the end of the ban the peer is back.
        assert_eq!(highest(&mut c, Time(61_000)), Some(100));
    }

    #[test]
    fn ban_survives_disconnect_and_reconnect() {
        let mut c = core(1);
        update(&mut c, 1, OURS, 1, 100);
        outcome(&mut c, Time(0), 1, OutcomeKind::InvalidData, 0, 5);
        c.handle(Time(10), Input::Remove(RemovePeer { peer: peer(1) }));
        update(&mut c, 1, OURS, 1, 100);
        assert_eq!(highest(&mut c, Time(20)), None);
        assert_eq!(highest(&mut c, Time(60_000)), Some(100));
    }

    #[test]
    fn banned_peers_are_not_told_of_commits() {
        let mut c = core(1);
        update(&mut c, 1, OURS, 1, 10);
        outcome(&mut c, Time(0), 1, OutcomeKind::InvalidData, 0, 5);
        assert!(behind(&mut c, 100).is_empty());
    }

    #[test]
    fn balancer_order_is_deterministic_for_a_seed() {
        let order = |seed| {
            let mut c = core(seed);
            for p in 1..=8 {
                update(&mut c, p, OURS, 1, 100);
            }
            (0..5)
                .map(|_| for_range(&mut c, Time(0), 1, 100))
                .collect::<Vec<_>>()
        };
        assert_eq!(order(42), order(42));
        assert_ne!(order(42), order(43));
    }

    #[test]
    fn balancer_favours_a_fast_peer_over_a_failing_one() {
        let mut c = core(7);
        update(&mut c, 1, OURS, 1, 100);
        update(&mut c, 2, OURS, 1, 100);
        update(&mut c, 3, OURS, 1, 100);
        // Peer 1: fast. Peer 2: slow. Peer 3: fast but times out.
        outcome(&mut c, Time(0), 1, OutcomeKind::Success, 10_000_000, 100);
        outcome(&mut c, Time(0), 2, OutcomeKind::Success, 100_000, 100);
        outcome(&mut c, Time(0), 3, OutcomeKind::Success, 10_000_000, 100);
        for _ in 0..3 {
            outcome(&mut c, Time(0), 3, OutcomeKind::Timeout, 0, 10_000);
        }
        for _ in 0..20 {
            assert_eq!(for_range(&mut c, Time(0), 1, 100)[0], peer(1));
        }
        // Successes win a failing peer back.
        for _ in 0..5 {
            outcome(&mut c, Time(0), 3, OutcomeKind::Success, 20_000_000, 100);
        }
        assert_eq!(for_range(&mut c, Time(0), 1, 100)[0], peer(3));
    }

    #[test]
    fn jitter_spreads_load_over_equal_peers() {
        let mut c = core(3);
        update(&mut c, 1, OURS, 1, 100);
        update(&mut c, 2, OURS, 1, 100);
        let firsts: std::collections::HashSet<_> = (0..50)
            .map(|_| for_range(&mut c, Time(0), 1, 100)[0])
            .collect();
        assert_eq!(firsts.len(), 2);
    }
}
