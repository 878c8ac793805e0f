//! An eclipse attack on the known-peer table, simulated on a
//! [`DiscoveryCore`] alone: no sockets, no clock, no signatures (the core
//! trusts the Verifier, so infos here carry blank ones). The unit tests
//! assert its bounds; a benchmark can run it at other settings and print
//! the honest fraction.
//!
//! First an honest network fills the table: `connected` honest peers, all
//! connected, answer the core's queries with samples of `honest_peers`
//! infos spread over `honest_prefixes` /24s. Then the attack, both at once
//! for `attack_intervals` rounds:
//!
//! - `malicious` peers, identities of one host (a /24 of its own),
//!   connected when the attack starts, answer each query with their own
//!   info and `fakes_per_call` never-seen identities, each in its own /24,
//!   stamped `ahead_ms` in the future;
//! - `sybils` identities, all calling from one /24, each send their own
//!   info (advertising an address in its own /24, stamped `ahead_ms`
//!   ahead) with GetKnownPeers every round, so the entries they hold are
//!   always the newest.
//!
//! The node dials from its table at each round, so what counts is the
//! table between rounds, at the round where the attackers hold the most.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use rand::Rng;
use rand::SeedableRng;
use rand::seq::IndexedRandom;
use rand_chacha::ChaCha8Rng;
use soma_types::{Access, NodeInfo, PeerId, Signature, SignedNodeInfo};

use super::core::{Config, DiscoveryCore, Init};
use super::messages::{Input, Output};
use crate::{Core, Time};

/// The wall clock when the scenario starts, in milliseconds since the Unix
/// epoch.
const START_MS: u64 = 1_700_000_000_000;

/// What the honest network and the attack look like.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Eclipse {
    /// Honest peers in the network; the first `connected` are connected.
    pub honest_peers: usize,
    /// /24 prefixes the honest peers' addresses are spread over.
    pub honest_prefixes: usize,
    /// Honest peers connected (and verified), the sources of honest infos.
    pub connected: usize,
    /// Rounds before the attack, for the honest network to fill the table.
    pub warmup_intervals: u64,
    /// Rounds of attack.
    pub attack_intervals: u64,
    /// How old honest infos in an answer are, at most, in milliseconds
    /// (they were signed at their owner's last rounds and passed on).
    pub honest_age_ms: u64,
    /// Malicious peers connected, all at addresses of one /24.
    pub malicious: usize,
    /// Fresh fake identities in each answer of a malicious peer.
    pub fakes_per_call: usize,
    /// Identities calling in with their own info every round, all from
    /// one /24.
    pub sybils: usize,
    /// How far ahead the attackers stamp their infos, in milliseconds.
    pub ahead_ms: u64,
    /// Seed of the core's and the scenario's randomness.
    pub seed: u64,
}

impl Default for Eclipse {
    /// An honest network larger than the default table, and an attack
    /// with every fake stamped 25 s ahead (within the 30 s accepted).
    fn default() -> Self {
        Eclipse {
            honest_peers: 1_200,
            honest_prefixes: 240,
            connected: 30,
            warmup_intervals: 40,
            attack_intervals: 60,
            honest_age_ms: 30_000,
            malicious: 1,
            fakes_per_call: 200,
            sybils: 1_000,
            ahead_ms: 25_000,
            seed: 7,
        }
    }
}

/// The table between two rounds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Table {
    /// Entries.
    pub known: usize,
    /// Honest entries.
    pub honest: usize,
    /// The malicious peers themselves and their fakes.
    pub from_malicious: usize,
    /// Identities that called in.
    pub from_sybils: usize,
    /// Honest connected peers in it.
    pub connected: usize,
}

impl Table {
    /// Attacker entries.
    pub fn attackers(&self) -> usize {
        self.from_malicious + self.from_sybils
    }

    /// Honest entries over all entries.
    pub fn honest_fraction(&self) -> f64 {
        self.honest as f64 / self.known.max(1) as f64
    }
}

/// What the attack achieved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EclipseOutcome {
    /// The table after the attack round where the attackers held the most.
    pub worst: Table,
    /// The table when the attack ends.
    pub end: Table,
    /// Most entries of the malicious peers after any attack round.
    pub most_from_malicious: usize,
    /// Most entries of the calling identities after any attack round.
    pub most_from_sybils: usize,
    /// Fewest honest connected peers known after any attack round.
    pub fewest_connected: usize,
    /// Answers of the malicious peers the core learnt from.
    pub malicious_answers: usize,
}

/// Who an identity of the scenario is, by its first byte.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Local = 0,
    Honest = 1,
    Malicious = 2,
    Fake = 3,
    Sybil = 4,
}

/// Identity `n` of kind `kind`.
fn peer(kind: Kind, n: usize) -> PeerId {
    let mut id = [0; 32];
    id[0] = kind as u8;
    id[1..9].copy_from_slice(&(n as u64).to_le_bytes());
    PeerId(id)
}

fn kind(peer: &PeerId) -> u8 {
    peer.0[0]
}

/// The counter an identity of the scenario was made from.
fn peer_index(peer: &PeerId) -> usize {
    let mut n = [0; 8];
    n.copy_from_slice(&peer.0[1..9]);
    u64::from_le_bytes(n) as usize
}

/// An info as the Verifier passes it on; its signature is never read.
fn info(peer_id: PeerId, ip: Ipv4Addr, timestamp_ms: u64) -> Arc<SignedNodeInfo> {
    Arc::new(SignedNodeInfo {
        info: NodeInfo {
            peer_id,
            addresses: vec![format!("{ip}:7000")],
            timestamp_ms,
            access: Access::Public,
        },
        signature: Signature([0; 64]),
    })
}

/// Host `host` of /24 number `prefix` counted from `base` (public unicast
/// blocks, so both the default and the public settings accept them).
fn address(base: [u8; 4], prefix: usize, host: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from_be_bytes(base) + ((prefix as u32) << 8) + 1 + (host % 254) as u32)
}

/// Runs the scenario on a core with `config`.
pub fn eclipse_scenario(config: Config, scenario: &Eclipse) -> EclipseOutcome {
    let mut init = Init::new(peer(Kind::Local, 0), scenario.seed);
    init.config = config;
    let interval = init.config.interval_ms.max(1);
    let max_to_send = init.config.max_peers_to_send;
    let mut core = DiscoveryCore::new(init);
    let mut rng = ChaCha8Rng::seed_from_u64(scenario.seed ^ 0x5eed);

    let honest_address = |h: usize| {
        let prefixes = scenario.honest_prefixes.max(1);
        address([32, 0, 0, 0], h % prefixes, h / prefixes)
    };
    let honest: Vec<usize> = (0..scenario.honest_peers).collect();
    let malicious_ip = |m: usize| address([96, 0, 0, 0], 0, m);
    let malicious: Vec<PeerId> = (0..scenario.malicious)
        .map(|m| peer(Kind::Malicious, m))
        .collect();
    let sybil_remote = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 7));
    for c in 0..scenario.connected {
        let address = honest_address(c).to_string() + ":7000";
        core.handle(
            Time(0),
            Input::Connected {
                peer: peer(Kind::Honest, c),
                address,
            },
        );
    }

    let connected: BTreeSet<PeerId> = (0..scenario.connected)
        .map(|c| peer(Kind::Honest, c))
        .collect();
    let (mut fakes, mut calls) = (0, 0);
    let mut outcome = EclipseOutcome {
        worst: Table::default(),
        end: Table::default(),
        most_from_malicious: 0,
        most_from_sybils: 0,
        fewest_connected: scenario.connected,
        malicious_answers: 0,
    };
    let rounds = scenario.warmup_intervals + scenario.attack_intervals;
    for round in 0..rounds {
        let now = Time(round * interval);
        let unix_ms = START_MS + round * interval;
        let attack = round >= scenario.warmup_intervals;
        if round == scenario.warmup_intervals {
            for (m, &peer) in malicious.iter().enumerate() {
                let address = format!("{}:7000", malicious_ip(m));
                core.handle(now, Input::Connected { peer, address });
            }
        }
        let queried: Vec<PeerId> = core
            .handle(now, Input::Tick { unix_ms })
            .into_iter()
            .filter_map(|o| match o {
                Output::Query { peer } => Some(peer),
                _ => None,
            })
            .collect();
        for source in queried {
            let infos = if kind(&source) == Kind::Malicious as u8 {
                outcome.malicious_answers += 1;
                let ahead = unix_ms + scenario.ahead_ms;
                let own = info(source, malicious_ip(peer_index(&source)), ahead);
                let fresh = (fakes..fakes + scenario.fakes_per_call)
                    .map(|n| info(peer(Kind::Fake, n), address([64, 0, 0, 0], n, 0), ahead));
                fakes += scenario.fakes_per_call;
                std::iter::once(own).chain(fresh).collect()
            } else {
                let own = info(source, honest_address(peer_index(&source)), unix_ms);
                let sample = honest.choose_multiple(&mut rng, max_to_send);
                let mut infos = vec![own];
                for &h in sample {
                    let age = rng.random_range(0..=scenario.honest_age_ms);
                    infos.push(info(
                        peer(Kind::Honest, h),
                        honest_address(h),
                        unix_ms.saturating_sub(age),
                    ));
                }
                infos
            };
            core.handle(
                now,
                Input::Learned {
                    source: Some(source),
                    infos,
                    unix_ms,
                },
            );
        }
        if !attack {
            continue;
        }
        for s in 0..scenario.sybils {
            let id = peer(Kind::Sybil, s);
            let own = info(
                id,
                address([128, 0, 0, 0], s, 0),
                unix_ms + scenario.ahead_ms,
            );
            calls += 1;
            core.handle(
                now,
                Input::Serve {
                    id: calls,
                    caller: Some(id),
                    info: Some(Arc::unwrap_or_clone(own)),
                    unix_ms,
                    remote: Some(sybil_remote),
                },
            );
        }
        let t = table(&mut core, now, &connected);
        if t.attackers() > outcome.worst.attackers() {
            outcome.worst = t;
        }
        outcome.most_from_malicious = outcome.most_from_malicious.max(t.from_malicious);
        outcome.most_from_sybils = outcome.most_from_sybils.max(t.from_sybils);
        outcome.fewest_connected = outcome.fewest_connected.min(t.connected);
        outcome.end = t;
    }
    outcome
}

/// Counts the entries of `core`'s table by kind.
fn table(core: &mut DiscoveryCore, now: Time, connected: &BTreeSet<PeerId>) -> Table {
    let known: Vec<PeerId> = match core.handle(now, Input::KnownPeers).pop() {
        Some(Output::Known(infos)) => infos.iter().map(|i| i.info.peer_id).collect(),
        _ => Vec::new(),
    };
    let count = |k: Kind| known.iter().filter(|p| kind(p) == k as u8).count();
    Table {
        known: known.len(),
        honest: count(Kind::Honest),
        from_malicious: count(Kind::Malicious) + count(Kind::Fake),
        from_sybils: count(Kind::Sybil),
        connected: known.iter().filter(|p| connected.contains(p)).count(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_eclipse_flood_leaves_nine_tenths_of_a_full_table_honest_at_the_defaults() {
        let config = Config::default();
        let scenario = Eclipse::default();
        let out = eclipse_scenario(config.clone(), &scenario);
        eprintln!(
            "honest fraction at worst {:.3}, at the end {:.3} (per source {}, per prefix {}): {out:?}",
            out.worst.honest_fraction(),
            out.end.honest_fraction(),
            config.max_known_peers_per_source,
            config.max_known_peers_per_prefix,
        );
        // The attack ran: the malicious peer was asked often enough to
        // fill its bucket several times over.
        let cap = config.max_known_peers_per_source;
        assert!(out.malicious_answers * scenario.fakes_per_call >= 5 * cap);
        // At every round the table is full, every honest connected peer
        // is in it, and each attacker holds at most one bucket.
        assert_eq!(out.worst.known, config.max_known_peers);
        assert_eq!(out.end.known, config.max_known_peers);
        assert_eq!(out.fewest_connected, scenario.connected);
        assert!(out.most_from_malicious <= cap, "{out:?}");
        assert!(out.most_from_sybils <= cap, "{out:?}");
        assert_eq!(out.worst.honest + out.worst.attackers(), out.worst.known);
        // So at least nine tenths of the table is honest, at every round.
        assert!(10 * out.worst.honest >= 9 * out.worst.known, "{out:?}");
    }

    #[test]
    fn with_eight_honest_sources_the_attackers_hold_two_full_buckets() {
        // As many honest sources as the default connection target, with
        // the malicious peer connected on top of them.
        let config = Config::default();
        let scenario = Eclipse {
            connected: 8,
            attack_intervals: 40,
            sybils: 200,
            ..Eclipse::default()
        };
        let out = eclipse_scenario(config.clone(), &scenario);
        eprintln!(
            "honest fraction at worst {:.3}: {out:?}",
            out.worst.honest_fraction()
        );
        // Every bucket is full, the attackers' two as well: a fifth of the
        // table, whatever the per-source cap (eight honest buckets and two
        // attacking ones).
        let cap = config.max_known_peers_per_source;
        let want = Table {
            known: config.max_known_peers,
            honest: 8 * cap,
            from_malicious: cap,
            from_sybils: cap,
            connected: 8,
        };
        assert_eq!(out.worst, want);
        assert_eq!(out.end, want);
    }

    #[test]
    fn malicious_identities_dialled_in_one_network_hold_one_bucket_between_them() {
        // Four identities of one host, each dialled and asked every round
        // alongside eight honest peers: one network, so one source bucket
        // for all four, however many identities it mints.
        let config = Config::default();
        let scenario = Eclipse {
            connected: 8,
            attack_intervals: 40,
            malicious: 4,
            sybils: 0,
            ..Eclipse::default()
        };
        let out = eclipse_scenario(config.clone(), &scenario);
        let cap = config.max_known_peers_per_source;
        // They were asked often enough to fill four buckets five times over.
        assert!(out.malicious_answers * scenario.fakes_per_call >= 4 * 5 * cap);
        // Eight honest buckets full, and one for the four (a third of the
        // table when each identity had a bucket of its own).
        let want = Table {
            known: 9 * cap,
            honest: 8 * cap,
            from_malicious: cap,
            from_sybils: 0,
            connected: 8,
        };
        assert_eq!(out.worst, want);
        assert_eq!(out.end, want);
    }
}
