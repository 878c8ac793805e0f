use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use soma_types::PeerId;

use super::messages::*;
use crate::{Core, Time};

/// Connections settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Config {
    /// Connections held at most (dials beyond are refused).
    pub max_connections: usize,
    /// Time allowed for TCP connect and TLS handshake, in milliseconds.
    pub connect_timeout_ms: u64,
    /// How often each connection is probed, in milliseconds.
    pub probe_interval_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_connections: 64,
            connect_timeout_ms: 10_000,
            probe_interval_ms: 5_000,
        }
    }
}

/// The logic of Connections: who is connected, who is being dialled.
pub struct ConnectionsCore {
    config: Config,
    connected: BTreeMap<PeerId, String>,
    /// Dials in progress, by address.
    dialing: BTreeSet<String>,
    /// Peers being dialled (when their id is known).
    dialing_peers: BTreeSet<PeerId>,
}

impl Core for ConnectionsCore {
    const NAME: &'static str = "connections";
    type Init = Config;
    type Input = Input;
    type Output = Output;

    fn new(config: Config) -> Self {
        ConnectionsCore {
            config,
            connected: BTreeMap::new(),
            dialing: BTreeSet::new(),
            dialing_peers: BTreeSet::new(),
        }
    }

    fn handle(&mut self, _now: Time, input: Input) -> Vec<Output> {
        match input {
            Input::Connect(Connect { peer, address }) => self.connect(peer, address),
            Input::Disconnect(Disconnect { peer }) | Input::Broken { peer } => {
                if self.connected.remove(&peer).is_some() {
                    vec![
                        Output::Close { peer },
                        Output::Event(PeerEvent::Disconnected { peer }),
                    ]
                } else {
                    vec![]
                }
            }
            Input::Dialed {
                address,
                expected,
                result,
            } => self.dialed(address, expected, result),
            Input::ActivePeers => vec![Output::Peers(self.connected.keys().copied().collect())],
            Input::ActiveConnections => vec![Output::Connections(
                self.connected
                    .iter()
                    .map(|(p, a)| (*p, a.clone()))
                    .collect(),
            )],
        }
    }
}

impl ConnectionsCore {
    /// The peers connected now, for a restart to report disconnected.
    pub fn connected(&self) -> impl Iterator<Item = PeerId> + '_ {
        self.connected.keys().copied()
    }

    fn connect(&mut self, peer: Option<PeerId>, address: String) -> Vec<Output> {
        let busy = peer
            .is_some_and(|p| self.connected.contains_key(&p) || self.dialing_peers.contains(&p))
            || self.dialing.contains(&address)
            || self.connected.values().any(|a| *a == address);
        if busy {
            return vec![];
        }
        if self.connected.len() + self.dialing.len() >= self.config.max_connections {
            return vec![Output::Event(PeerEvent::DialFailed {
                peer,
                address,
                reason: DialError::LimitReached,
            })];
        }
        self.dialing.insert(address.clone());
        if let Some(p) = peer {
            self.dialing_peers.insert(p);
        }
        vec![Output::Dial {
            address,
            expected: peer,
        }]
    }

    fn dialed(
        &mut self,
        address: String,
        expected: Option<PeerId>,
        result: DialResult,
    ) -> Vec<Output> {
        let planned = self.dialing.remove(&address);
        if let Some(p) = expected {
            self.dialing_peers.remove(&p);
        }
        match result {
            DialResult::Connected(peer) if self.connected.contains_key(&peer) => {
                // A seed dialled by address turned out to be a peer we hold:
                // said, so that its dial is not left pending.
                vec![
                    Output::Close { peer },
                    Output::Event(PeerEvent::DialFailed {
                        peer: expected,
                        address,
                        reason: DialError::AlreadyConnected { peer },
                    }),
                ]
            }
            // A dial this core did not start (a failed incarnation's) counts
            // like a new one against the limit.
            DialResult::Connected(peer)
                if !planned
                    && self.connected.len() + self.dialing.len() >= self.config.max_connections =>
            {
                vec![Output::Close { peer }]
            }
            DialResult::Connected(peer) => {
                self.connected.insert(peer, address.clone());
                vec![
                    Output::Keep { peer },
                    Output::Event(PeerEvent::Connected { peer, address }),
                ]
            }
            DialResult::Failed(reason) => vec![Output::Event(PeerEvent::DialFailed {
                peer: expected,
                address,
                reason,
            })],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(n: u8) -> PeerId {
        PeerId([n; 32])
    }

    fn connect(c: &mut ConnectionsCore, p: Option<u8>, address: &str) -> Vec<Output> {
        c.handle(
            Time(0),
            Input::Connect(Connect {
                peer: p.map(peer),
                address: address.into(),
            }),
        )
    }

    fn dialed(
        c: &mut ConnectionsCore,
        p: Option<u8>,
        address: &str,
        result: DialResult,
    ) -> Vec<Output> {
        c.handle(
            Time(0),
            Input::Dialed {
                address: address.into(),
                expected: p.map(peer),
                result,
            },
        )
    }

    #[test]
    fn never_dials_a_connected_or_pending_peer() {
        let mut c = ConnectionsCore::new(Config::default());
        assert_eq!(connect(&mut c, Some(1), "a:1").len(), 1);
        assert!(connect(&mut c, Some(1), "a:1").is_empty());
        assert!(connect(&mut c, Some(1), "other:1").is_empty());
        assert!(connect(&mut c, None, "a:1").is_empty());
        let out = dialed(&mut c, Some(1), "a:1", DialResult::Connected(peer(1)));
        assert!(out.contains(&Output::Event(PeerEvent::Connected {
            peer: peer(1),
            address: "a:1".into()
        })));
        assert!(connect(&mut c, Some(1), "a:1").is_empty());
        assert!(connect(&mut c, None, "a:1").is_empty());
        assert_eq!(
            c.handle(Time(0), Input::ActivePeers),
            vec![Output::Peers(vec![peer(1)])]
        );
    }

    #[test]
    fn seed_by_address_resolving_to_a_held_peer_is_closed_and_said_so() {
        let mut c = ConnectionsCore::new(Config::default());
        connect(&mut c, Some(1), "a:1");
        dialed(&mut c, Some(1), "a:1", DialResult::Connected(peer(1)));
        connect(&mut c, None, "alias:1");
        assert_eq!(
            dialed(&mut c, None, "alias:1", DialResult::Connected(peer(1))),
            vec![
                Output::Close { peer: peer(1) },
                Output::Event(PeerEvent::DialFailed {
                    peer: None,
                    address: "alias:1".into(),
                    reason: DialError::AlreadyConnected { peer: peer(1) },
                }),
            ]
        );
        assert_eq!(
            c.handle(Time(0), Input::ActivePeers),
            vec![Output::Peers(vec![peer(1)])]
        );
    }

    #[test]
    fn failed_dial_is_reported_and_can_be_retried() {
        let mut c = ConnectionsCore::new(Config::default());
        connect(&mut c, Some(2), "b:1");
        let out = dialed(
            &mut c,
            Some(2),
            "b:1",
            DialResult::Failed(DialError::Unreachable),
        );
        assert!(matches!(
            out[0],
            Output::Event(PeerEvent::DialFailed { .. })
        ));
        assert_eq!(connect(&mut c, Some(2), "b:1").len(), 1);
    }

    #[test]
    fn broken_connection_is_dropped_once_and_reported() {
        let mut c = ConnectionsCore::new(Config::default());
        connect(&mut c, Some(3), "c:1");
        dialed(&mut c, Some(3), "c:1", DialResult::Connected(peer(3)));
        let out = c.handle(Time(0), Input::Broken { peer: peer(3) });
        assert_eq!(
            out,
            vec![
                Output::Close { peer: peer(3) },
                Output::Event(PeerEvent::Disconnected { peer: peer(3) })
            ]
        );
        assert!(
            c.handle(Time(0), Input::Broken { peer: peer(3) })
                .is_empty()
        );
    }

    #[test]
    fn a_dial_the_core_did_not_start_counts_against_the_limit() {
        let mut c = ConnectionsCore::new(Config {
            max_connections: 1,
            ..Config::default()
        });
        connect(&mut c, Some(1), "a:1");
        dialed(&mut c, Some(1), "a:1", DialResult::Connected(peer(1)));
        // A restarted core hears of a dial its failed incarnation started.
        assert_eq!(
            dialed(&mut c, Some(2), "b:1", DialResult::Connected(peer(2))),
            vec![Output::Close { peer: peer(2) }]
        );
        assert_eq!(
            c.handle(Time(0), Input::ActivePeers),
            vec![Output::Peers(vec![peer(1)])]
        );
    }

    #[test]
    fn connection_limit_is_enforced() {
        let mut c = ConnectionsCore::new(Config {
            max_connections: 1,
            ..Config::default()
        });
        connect(&mut c, Some(1), "a:1");
        assert!(matches!(
            connect(&mut c, Some(2), "b:1")[0],
            Output::Event(PeerEvent::DialFailed { .. })
        ));
    }
}
