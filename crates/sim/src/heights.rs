//! Heights: how fast new commits reach every node of a network, through
//! height queries and PushCommit, each node's knowledge of its peers'
//! heights and its choice of whom to fetch from made by the production
//! PeerHeights core.
//!
//! The network is a snapshot of a simulated one ([`Sim`]): its nodes, the
//! connections Discovery made, and their round trips. What sync does with
//! a range once a peer is chosen is a cost, not the StateSync core: one
//! round trip to the peer plus a fixed time per commit (the verification
//! and apply work the benchmarks measure). When each node asks its peers
//! is the production schedule too: StateSync's [`HeightQueries`].

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use soma_actors::peer_heights::{
    Acquire, Config, FetchKind, Init, Input, Output, PeerHeightsCore, PeersBehind, PushHeight,
    Release, Transfer, UpdateHeight,
};
use soma_actors::state_sync::HeightQueries;
use soma_actors::{Driver, Time};
use soma_types::{ChainId, CommitIndex, Digest};

use crate::net::{Sim, peer_id};
use crate::queue::Queue;

/// How heights travel.
#[derive(Clone, Debug, PartialEq)]
pub struct HeightSettings {
    /// Every node asks every peer it is connected to for its height this
    /// often, in milliseconds (StateSync's `height_query_interval`).
    pub query_interval_ms: u64,
    /// Whether a node that synced tells the peers it knows to be behind
    /// (PushCommit). A push counts only where the receiver holds a
    /// connection to the pusher: PeerHeights ignores untracked callers.
    pub push: bool,
    /// Whether a push beyond every tracked claim brings the receiver's
    /// next round of queries forward, at most once per interval, as
    /// StateSync's [`HeightQueries`] does (off: the schedule before it).
    pub hint: bool,
    /// Commits fetched in one request at most (a sync batch).
    pub batch: u64,
    /// Time a node spends per commit it syncs (verification and apply),
    /// in microseconds: 100 is the 10,000 commits/s of a 2-core catch-up.
    pub apply_us_per_commit: u64,
}

impl Default for HeightSettings {
    fn default() -> Self {
        HeightSettings {
            query_interval_ms: 1_000,
            push: true,
            hint: true,
            batch: 400,
            apply_us_per_commit: 100,
        }
    }
}

/// How a new height spread.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Spread {
    /// Virtual time until every node knew of the new tip (a peer claimed
    /// it), in milliseconds, if within the run.
    pub all_know_ms: Option<u64>,
    /// Virtual time until every node had synced to the tip.
    pub all_synced_ms: Option<u64>,
    /// The median node's time to sync to the tip.
    pub median_synced_ms: Option<u64>,
    /// Height queries answered.
    pub queries: u64,
    /// Pushes sent.
    pub pushes: u64,
    /// Pushes the receiver took: it holds a connection to the pusher, so
    /// its PeerHeights tracks it (the others are ignored).
    pub pushes_taken: u64,
    /// Rounds of queries a push brought forward.
    pub early_rounds: u64,
    /// Fetches made.
    pub fetches: u64,
}

#[derive(Debug)]
enum Event {
    /// Node `node` asks all its peers, if this round is still its next
    /// (an early round moves the next one).
    Round { node: usize, generation: u64 },
    /// Node `from`'s height query reaches `to`.
    Query { from: usize, to: usize },
    /// `to` hears `from`'s height.
    Answer {
        to: usize,
        from: usize,
        highest: CommitIndex,
    },
    /// `to` hears `from`'s push.
    Push {
        to: usize,
        from: usize,
        highest: CommitIndex,
    },
    /// Node `node`'s fetch of up to `end` on lease `lease` is done.
    Fetched {
        node: usize,
        lease: u64,
        end: CommitIndex,
        took_ms: u64,
    },
}

struct Node {
    core: Driver<PeerHeightsCore>,
    queries: HeightQueries,
    /// Raised when an early round moves the next: the round planned
    /// before is dropped.
    generation: u64,
    height: CommitIndex,
    fetching: bool,
    knew_at: Option<u64>,
    synced_at: Option<u64>,
}

/// The run.
struct Run<'a> {
    sim: &'a Sim,
    settings: HeightSettings,
    nodes: Vec<Node>,
    queue: Queue<Event>,
    tip: CommitIndex,
    /// When the validators got the new commits: times are counted from it.
    start: u64,
    spread: Spread,
}

/// The chain every node is on.
const CHAIN: ChainId = ChainId(Digest([7; 32]));

/// The up nodes of `sim`, connected as they are, all at height 0 but
/// `validators`, which hold `commits` new commits at time 0: runs until
/// every node has synced them or `max_ms` passed.
pub fn spread(
    sim: &Sim,
    validators: &[usize],
    commits: CommitIndex,
    settings: HeightSettings,
    seed: u64,
    max_ms: u64,
) -> Spread {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let up: Vec<usize> = sim
        .views()
        .iter()
        .filter(|v| v.up)
        .map(|v| v.index)
        .collect();
    let nodes = (0..sim.len())
        .map(|_| Node {
            core: Driver::new(Init::from(Config::new(CHAIN, rng.random())), None),
            queries: HeightQueries::new(settings.query_interval_ms),
            generation: 0,
            height: 0,
            fetching: false,
            knew_at: None,
            synced_at: None,
        })
        .collect();
    let mut run = Run {
        sim,
        settings,
        nodes,
        queue: Queue::default(),
        tip: commits,
        start: 0,
        spread: Spread {
            all_know_ms: None,
            all_synced_ms: None,
            median_synced_ms: None,
            queries: 0,
            pushes: 0,
            pushes_taken: 0,
            early_rounds: 0,
            fetches: 0,
        },
    };
    for &i in &up {
        for peer in sim.connections_of(i) {
            run.step(
                i,
                Input::Connected {
                    peer: peer_id(peer),
                },
            );
        }
        let first = rng.random_range(0..run.settings.query_interval_ms.max(1));
        run.schedule(
            first,
            Event::Round {
                node: i,
                generation: 0,
            },
        );
    }
    // Every node asks its peers once (all at height 0) before the new
    // commits appear, as in a running network.
    let warm_up = 2 * run.settings.query_interval_ms.max(1);
    run.go(&up, warm_up);
    run.queue.advance_to(warm_up);
    run.start = warm_up;
    run.spread.queries = 0;
    for &v in validators {
        let node = &mut run.nodes[v];
        node.height = commits;
        node.knew_at = Some(0);
        node.synced_at = Some(0);
    }
    // Commits of local consensus are pushed as synced ones are.
    if run.settings.push {
        for &v in validators {
            run.push(v);
        }
    }
    run.go(&up, warm_up + max_ms);
    let mut synced: Vec<u64> = up.iter().filter_map(|&i| run.nodes[i].synced_at).collect();
    synced.sort_unstable();
    if synced.len() == up.len() {
        run.spread.median_synced_ms = synced.get(synced.len() / 2).copied();
    }
    run.spread
}

impl Run<'_> {
    fn schedule(&mut self, after: u64, event: Event) {
        self.queue.schedule(after, event);
    }

    fn leg(&self, a: usize, b: usize) -> u64 {
        (self.sim.rtt_ms(a, b) / 2).max(1)
    }

    fn step(&mut self, node: usize, input: Input) -> Vec<Output> {
        self.nodes[node].core.step_at(Time(self.queue.now()), input)
    }

    fn go(&mut self, up: &[usize], max_ms: u64) {
        while let Some(event) = self.queue.next_until(max_ms) {
            self.handle(event);
            let all = |f: fn(&Node) -> Option<u64>, nodes: &[Node]| {
                up.iter().map(|&i| f(&nodes[i])).max().flatten()
            };
            if self.spread.all_know_ms.is_none()
                && up.iter().all(|&i| self.nodes[i].knew_at.is_some())
            {
                self.spread.all_know_ms = all(|n| n.knew_at, &self.nodes);
            }
            if up.iter().all(|&i| self.nodes[i].synced_at.is_some()) {
                self.spread.all_synced_ms = all(|n| n.synced_at, &self.nodes);
                break;
            }
        }
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Round { node, generation } => {
                let n = &mut self.nodes[node];
                if generation == n.generation && n.queries.due(Time(self.queue.now())) {
                    self.ask_peers(node);
                }
            }
            Event::Query { from, to } => {
                let highest = self.nodes[to].height;
                let leg = self.leg(from, to);
                self.spread.queries += 1;
                self.schedule(
                    leg,
                    Event::Answer {
                        to: from,
                        from: to,
                        highest,
                    },
                );
            }
            Event::Answer { to, from, highest } => {
                let update = UpdateHeight {
                    peer: peer_id(from),
                    chain_id: CHAIN,
                    highest,
                    lowest: 1,
                };
                self.step(to, Input::Update(update));
                self.sync(to);
            }
            Event::Push { to, from, highest } => {
                self.spread.pushes += 1;
                if self.sim.holds_connection(to, from) {
                    self.spread.pushes_taken += 1;
                }
                let push = PushHeight {
                    peer: peer_id(from),
                    highest,
                };
                self.step(to, Input::Push(push));
                self.sync(to);
                // StateSync's view: the tracked claims and its own height.
                let known = match self.step(to, Input::HighestKnown).pop() {
                    Some(Output::HighestKnown(k)) => k.unwrap_or(0),
                    _ => 0,
                }
                .max(self.nodes[to].height);
                let now = Time(self.queue.now());
                if self.settings.hint && self.nodes[to].queries.pushed(now, highest, known) {
                    self.spread.early_rounds += 1;
                    self.nodes[to].generation += 1;
                    self.ask_peers(to);
                }
            }
            Event::Fetched {
                node,
                lease,
                end,
                took_ms,
            } => {
                let release = Release {
                    lease,
                    transfer: Transfer::Received,
                    bytes: 0,
                    latency_ms: took_ms,
                };
                self.step(node, Input::Release(release));
                let n = &mut self.nodes[node];
                n.fetching = false;
                n.height = n.height.max(end);
                if n.height >= self.tip && n.synced_at.is_none() {
                    n.synced_at = Some(self.queue.now() - self.start);
                }
                if self.settings.push {
                    self.push(node);
                }
                self.sync(node);
            }
        }
    }

    /// Node `node` asks every peer it is connected to for its height, and
    /// plans its next round.
    fn ask_peers(&mut self, node: usize) {
        for peer in self.sim.connections_of(node) {
            let leg = self.leg(node, peer);
            self.schedule(
                leg,
                Event::Query {
                    from: node,
                    to: peer,
                },
            );
        }
        let n = &self.nodes[node];
        let generation = n.generation;
        let after = n.queries.next().0.saturating_sub(self.queue.now());
        self.schedule(after, Event::Round { node, generation });
    }

    /// Tells the peers `node` knows to be behind its new height.
    fn push(&mut self, node: usize) {
        let highest = self.nodes[node].height;
        let behind = self.step(node, Input::PeersBehind(PeersBehind { index: highest }));
        let Some(Output::Peers(peers)) = behind.into_iter().next() else {
            return;
        };
        for peer in peers {
            let Some(to) = self.sim.index_of(&peer) else {
                continue;
            };
            let leg = self.leg(node, to);
            self.schedule(
                leg,
                Event::Push {
                    to,
                    from: node,
                    highest,
                },
            );
        }
    }

    /// Starts `node`'s next fetch if a peer claims more than it holds.
    fn sync(&mut self, node: usize) {
        let out = self.step(node, Input::HighestKnown);
        let Some(Output::HighestKnown(Some(known))) = out.into_iter().next() else {
            return;
        };
        let n = &mut self.nodes[node];
        if known >= self.tip && n.knew_at.is_none() {
            n.knew_at = Some(self.queue.now() - self.start);
        }
        if n.fetching || known <= n.height {
            return;
        }
        let start = n.height + 1;
        let end = known.min(n.height + self.settings.batch);
        let acquire = Acquire {
            request: self.queue.last_sequence(),
            start,
            end,
            kind: FetchKind::Commits,
            avoid: Vec::new(),
            wait_ms: 0,
            spare_only: false,
        };
        let granted = self.step(node, Input::Acquire(acquire));
        let Some(Output::Granted { lease, .. }) = granted.into_iter().next() else {
            return;
        };
        let Some(from) = self.sim.index_of(&lease.peer) else {
            return;
        };
        self.nodes[node].fetching = true;
        self.spread.fetches += 1;
        let took_ms = self.sim.rtt_ms(node, from).max(1)
            + (end - start + 1) * self.settings.apply_us_per_commit / 1_000;
        self.schedule(
            took_ms,
            Event::Fetched {
                node,
                lease: lease.id,
                end,
                took_ms,
            },
        );
    }
}
