//! The simulated network: nodes made of the production Discovery core,
//! links with a round trip per pair of regions, jitter and loss, churn and
//! partitions, all driven by one event queue in virtual time from one
//! seed. Nothing reads a clock or a socket, so a run is a pure function of
//! its [`Settings`] and the actions applied to it.
//!
//! What stands in for the node's shells, in the same way they behave:
//!
//! - **Connections.** A dial takes two round trips (TCP and TLS) and
//!   succeeds if the target is up, reachable, and the dialler holds fewer
//!   than `max_connections` connections; otherwise it fails after
//!   `call_timeout_ms` (the target does not answer) or one round trip (it
//!   refuses). A connection to a node that leaves, or across a partition,
//!   breaks after `call_timeout_ms`. With [`Settings::inbound`], the target
//!   admits the connection by the production inbound rules: refused, it
//!   fails; admitted, it may evict another node's connection, whose dialler
//!   sees it close a leg later.
//! - **GetKnownPeers.** A query goes to a connected peer with the caller's
//!   own info (the connect-back the real shell sends); the peer's core
//!   serves it, and the answer comes back with the peer's own info first,
//!   as the real service answers. Either leg may be lost.
//! - **Own info.** A node signs its own info as it starts and again at
//!   each round, as the Discovery actor does, and every call it makes or
//!   answers carries that info until the next round (a sybil signs afresh
//!   for every answer, as an attacker may).
//! - **Infos** carry blank signatures: the core trusts what the Verifier
//!   passed, and signatures are not what is simulated.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::digest::RunDigest;
use crate::inbound::Server;
use crate::queue::{Due, Queue};
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use soma_actors::discovery::{Config, DiscoveryCore, Init, Input, Output, SeedPeer};
use soma_actors::replay::Recorder;
use soma_actors::{Driver, Time};
use soma_types::{Access, NodeInfo, PeerId, Signature, SignedNodeInfo};

/// The wall clock at virtual time 0, in milliseconds since the Unix epoch.
pub const START_UNIX_MS: u64 = 1_750_000_000_000;

/// Round trips between regions, in milliseconds.
#[derive(Clone, Debug, PartialEq)]
pub struct Latency {
    /// The regions' names.
    pub regions: Vec<&'static str>,
    /// `rtt_ms[a][b]`: the round trip between a node in `a` and one in `b`.
    pub rtt_ms: Vec<Vec<u64>>,
}

impl Latency {
    /// One region: every round trip is `rtt_ms`.
    pub fn uniform(rtt_ms: u64) -> Self {
        Latency {
            regions: vec!["local"],
            rtt_ms: vec![vec![rtt_ms]],
        }
    }

    /// Five regions with round trips of the order public clouds measure
    /// between them (within a region: a few milliseconds).
    pub fn world() -> Self {
        Latency {
            regions: vec!["us-east", "us-west", "europe", "asia", "south-america"],
            rtt_ms: vec![
                vec![4, 65, 80, 190, 120],
                vec![65, 4, 140, 130, 170],
                vec![80, 140, 4, 220, 200],
                vec![190, 130, 220, 4, 300],
                vec![120, 170, 200, 300, 4],
            ],
        }
    }
}

/// What the simulated network is made of.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    /// Nodes at the start.
    pub nodes: usize,
    /// The first `seeds` nodes are every other node's seed peers.
    pub seeds: usize,
    /// Seed of everything random: latencies, losses, the cores' own
    /// randomness, churn.
    pub seed: u64,
    /// Every node's Discovery settings.
    pub discovery: Config,
    /// Round trips between regions; nodes are spread over them evenly.
    pub latency: Latency,
    /// Each delivery takes its leg's time times a factor drawn from
    /// `1 ± jitter`.
    pub jitter: f64,
    /// Probability that a message (a query or its answer) is lost.
    pub loss: f64,
    /// How long a call or dial waits for an answer, in milliseconds.
    pub call_timeout_ms: u64,
    /// Connections a node holds at most (its Connections actor's limit).
    pub max_connections: usize,
    /// The last `sybils` nodes are an attacker's: each on an address of
    /// its own /24 (the most addresses an attacker could hold, so the
    /// per-prefix caps do not help the honest nodes), connecting and
    /// querying at the limits of the protocol, and answering every
    /// GetKnownPeers call, however often, with as many fresh infos of
    /// sybils as an answer may hold.
    pub sybils: usize,
    /// Whether a node runs its first round as it starts, as the node's
    /// Discovery actor does; otherwise at a random point of its first
    /// interval (nodes of a real network do not start in step).
    pub first_round_at_start: bool,
    /// The inbound admission rules every node's server applies (the
    /// production `soma_wire::inbound::Rules`); `None`: every dial is
    /// accepted.
    pub inbound: Option<soma_wire::inbound::Config>,
    /// Threads that step nodes' cores side by side. The run is the same,
    /// bit for bit, whatever the number ([`Sim::run_until`] says how).
    pub threads: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            nodes: 100,
            seeds: 1,
            seed: 1,
            discovery: Config::default(),
            latency: Latency::world(),
            jitter: 0.1,
            loss: 0.0,
            call_timeout_ms: 10_000,
            max_connections: 32,
            sybils: 0,
            first_round_at_start: false,
            inbound: None,
            threads: 1,
        }
    }
}

/// Counts over the whole run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// GetKnownPeers calls sent.
    pub queries: u64,
    /// Calls answered (not lost, not rate limited).
    pub answers: u64,
    /// Calls refused by the callee's rate limit.
    pub rate_limited: u64,
    /// Messages lost.
    pub lost: u64,
    /// Infos received in answers.
    pub infos: u64,
    /// Bytes of the answers (their infos, encoded).
    pub bytes: u64,
    /// Dials started.
    pub dials: u64,
    /// Dials that failed.
    pub dials_failed: u64,
    /// Connections broken by a leave or a partition.
    pub broken: u64,
    /// Connections a node dropped to rotate them.
    pub rotated: u64,
    /// Dials the target's inbound rules refused.
    pub inbound_refused: u64,
    /// Connections a target's inbound rules closed to admit another.
    pub inbound_evicted: u64,
}

/// One node's view, sampled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeView {
    /// The node.
    pub index: usize,
    /// Whether it runs.
    pub up: bool,
    /// Peers in its known-peer table.
    pub known: usize,
    /// Of those, peers that are up now.
    pub known_up: usize,
    /// Peers it holds a connection to.
    pub connected: usize,
    /// Virtual time it was last started, in milliseconds.
    pub started_ms: u64,
    /// Whether it is a sybil.
    pub sybil: bool,
}

#[derive(Debug)]
enum Event {
    Tick {
        node: usize,
        incarnation: u32,
    },
    Dialled {
        node: usize,
        incarnation: u32,
        target: Option<usize>,
        address: String,
        expected: Option<PeerId>,
        ok: bool,
    },
    Query {
        from: usize,
        to: usize,
        incarnation: u32,
        /// The caller's own info; taken when the call is stepped ahead.
        info: Option<Arc<SignedNodeInfo>>,
    },
    Answer {
        to: usize,
        from: usize,
        incarnation: u32,
        infos: Vec<Arc<SignedNodeInfo>>,
    },
    Broken {
        node: usize,
        incarnation: u32,
        peer: usize,
    },
    /// A connection the node dropped itself: its Connections closed it
    /// and tells Discovery so.
    Closed {
        node: usize,
        incarnation: u32,
        peer: usize,
    },
}

struct Node {
    id: PeerId,
    address: String,
    region: usize,
    up: bool,
    /// Raised at each restart: events of an earlier incarnation are
    /// dropped.
    incarnation: u32,
    started_ms: u64,
    /// Its own info, signed at its start and at each round since.
    own: Arc<SignedNodeInfo>,
    /// Peers this node dialled and holds a connection to.
    connections: BTreeSet<usize>,
    /// Its inbound side, with [`Settings::inbound`].
    server: Option<Server>,
    /// Its core, while it runs. A stopped node holds none, as a process
    /// that exited holds no memory (a long run under churn would otherwise
    /// keep every departed node's table); the recorded node keeps its
    /// driver, whose trace goes on across a restart (and so its table, in
    /// [`Sim::views`], while it is stopped), and so does a node never
    /// started.
    driver: Option<Driver<DiscoveryCore>>,
}

impl Node {
    /// The core's driver; only a running node is stepped.
    fn driver(&mut self) -> &mut Driver<DiscoveryCore> {
        self.driver.as_mut().expect("a node that runs has a core")
    }

    /// The peers its table holds (none while it is stopped).
    fn known_peers(&self) -> impl Iterator<Item = &PeerId> {
        self.driver.iter().flat_map(|d| d.core().known_peers())
    }
}

/// The simulation.
pub struct Sim {
    settings: Settings,
    rng: ChaCha8Rng,
    queue: Queue<Event>,
    nodes: Vec<Node>,
    by_address: BTreeMap<String, usize>,
    /// The side of the partition each node is on, while one holds.
    sides: Option<Vec<bool>>,
    /// Which node's core records a trace, if any.
    recorded: Option<usize>,
    counts: Counts,
    /// Every input and output, hashed in order: equal for equal runs.
    digest: RunDigest,
    /// Virtual time 0 for the inbound rules, which read `Instant`s.
    base: Instant,
    /// With more than one thread: the pool that, with the calling thread,
    /// steps nodes ahead.
    pool: Option<Arc<rayon::ThreadPool>>,
    /// Each node's place in the window being handled
    /// ([`Sim::step_ahead`]).
    marks: Vec<Mark>,
    /// Steps taken ahead of each node whose outputs wait for their turn.
    pending: Vec<usize>,
    /// Steps taken ahead in all.
    ahead: u64,
    stamp: u64,
    /// A buffer for the bytes that identify an input.
    scratch: Vec<u8>,
}

/// A step taken ahead of its event's turn: the bytes that identify its
/// input, and the core's outputs, still to be carried out.
struct Ahead {
    /// The time it was stepped at.
    at: u64,
    input: Vec<u8>,
    outputs: Vec<Output>,
    kind: Stepped,
}

/// What a step taken ahead was, for what remains to do at its turn.
enum Stepped {
    Tick,
    Answer,
    /// A call from `from`, to answer.
    Call {
        from: usize,
        incarnation: u32,
    },
}

/// What an event is to its node's core, within a window.
enum Kind {
    /// Steps it, with an input known ahead: a round, a call, an answer.
    Ahead,
    /// Leaves it alone (an event of an earlier incarnation, a sybil's call).
    Neutral,
    /// Steps it with an input that depends on the events before.
    Blocks,
}

/// A node's place in the window being stepped ahead.
#[derive(Clone, Copy, Default)]
struct Mark {
    stamp: u64,
    /// Its chain of events going ahead.
    chain: Option<usize>,
    /// An event that cannot go ahead came: the rest wait their turn.
    blocked: bool,
}

impl Event {
    /// The node whose core the event may step.
    fn node(&self) -> usize {
        match self {
            Event::Tick { node, .. }
            | Event::Dialled { node, .. }
            | Event::Broken { node, .. }
            | Event::Closed { node, .. } => *node,
            Event::Query { to, .. } | Event::Answer { to, .. } => *to,
        }
    }
}

/// The peer id of node `index`: deterministic, distinct.
pub fn peer_id(index: usize) -> PeerId {
    let mut id = [0u8; 32];
    id[..8].copy_from_slice(&(index as u64).to_le_bytes());
    id[31] = 0x51;
    PeerId(id)
}

/// The address of node `index`: each node in its own /24 of 16.0.0.0/4.
pub fn address(index: usize) -> String {
    format!("{}:7000", ip_of(index))
}

fn ip_of(index: usize) -> Ipv4Addr {
    Ipv4Addr::from(0x1000_0000 + ((index as u32) << 8) + 1)
}

fn info(id: PeerId, address: &str, timestamp_ms: u64) -> Arc<SignedNodeInfo> {
    Arc::new(SignedNodeInfo {
        info: NodeInfo {
            peer_id: id,
            addresses: vec![address.to_string()],
            timestamp_ms,
            access: Access::Public,
        },
        signature: Signature([0; 64]),
    })
}

/// Infos a sybil keeps of each answer it gets.
const SYBIL_LEARNS: usize = 10;

/// Bytes of one info as the wire carries it (one IPv4 address).
const INFO_BYTES: u64 = 32 + 8 + 1 + 1 + 16 + 64 + 8;

impl Sim {
    /// A network of `settings.nodes` nodes, none started yet; `recorded`
    /// names the node whose core records a trace.
    pub fn new(settings: Settings, recorded: Option<usize>) -> Self {
        let rng = ChaCha8Rng::seed_from_u64(settings.seed);
        let pool = (settings.threads > 1).then(|| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(settings.threads - 1)
                .thread_name(|i| format!("soma-sim-{i}"))
                .build()
                .expect("the simulator's threads start");
            Arc::new(pool)
        });
        let mut sim = Sim {
            settings,
            rng,
            queue: Queue::default(),
            nodes: Vec::new(),
            by_address: BTreeMap::new(),
            sides: None,
            recorded,
            counts: Counts::default(),
            digest: RunDigest::default(),
            base: Instant::now(),
            pool,
            marks: Vec::new(),
            pending: Vec::new(),
            ahead: 0,
            stamp: 0,
            scratch: Vec::new(),
        };
        for _ in 0..sim.settings.nodes {
            sim.add_node();
        }
        sim
    }

    /// Virtual time now, in milliseconds.
    pub fn now(&self) -> u64 {
        self.queue.now()
    }

    /// Counts so far.
    pub fn counts(&self) -> &Counts {
        &self.counts
    }

    /// Steps taken ahead of their turn, side by side
    /// ([`Settings::threads`]); none on one thread.
    pub fn steps_ahead(&self) -> u64 {
        self.ahead
    }

    /// The number of nodes ever made (up or not).
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether there is no node.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// A hash of every input and output so far: two runs are the same run
    /// exactly when their digests are equal.
    pub fn digest(&self) -> [u8; 32] {
        self.digest.finalize()
    }

    /// The trace of the recorded node so far, if one records.
    pub fn trace(self) -> Option<String> {
        let index = self.recorded?;
        let node = self.nodes.into_iter().nth(index)?;
        node.driver?.into_recorder().map(Recorder::into_string)
    }

    /// Adds a node (not started): its region, identity and address.
    pub fn add_node(&mut self) -> usize {
        let index = self.nodes.len();
        let region = index % self.settings.latency.regions.len();
        let (id, address) = (peer_id(index), address(index));
        self.by_address.insert(address.clone(), index);
        let driver = self.make_driver(index, id);
        let own = info(id, &address, START_UNIX_MS + self.queue.now());
        self.nodes.push(Node {
            id,
            own,
            address,
            region,
            up: false,
            incarnation: 0,
            started_ms: 0,
            connections: BTreeSet::new(),
            server: None,
            driver: Some(driver),
        });
        index
    }

    /// Whether node `index` is a sybil.
    pub fn is_sybil(&self, index: usize) -> bool {
        index >= self.settings.nodes.saturating_sub(self.settings.sybils)
            && index < self.settings.nodes
    }

    /// A sybil's answer: as many infos of sybils as an answer holds,
    /// stamped now.
    fn sybil_answer(&mut self, unix_ms: u64) -> Vec<Arc<SignedNodeInfo>> {
        let first = self.settings.nodes - self.settings.sybils;
        let sybils: Vec<usize> = (first..self.settings.nodes).collect();
        let count = self.settings.discovery.max_peers_to_send;
        sybils
            .choose_multiple(&mut self.rng, count)
            .map(|&i| info_of(&self.nodes[i], unix_ms))
            .collect()
    }

    fn init(&mut self, index: usize, id: PeerId) -> Init {
        let seeds = (0..self.settings.seeds)
            .filter(|s| *s != index)
            .map(|s| SeedPeer {
                peer_id: Some(peer_id(s)),
                address: address(s),
            })
            .collect();
        let mut config = self.settings.discovery.clone();
        if self.is_sybil(index) {
            // At the limits: as many connections as a node holds, every
            // connected peer asked every round.
            config.target_concurrent_connections = self.settings.max_connections;
            config.peers_to_query = self.settings.max_connections;
        }
        Init {
            config,
            seeds,
            addresses: vec![address(index)],
            ..Init::new(id, self.rng.random())
        }
    }

    fn make_driver(&mut self, index: usize, id: PeerId) -> Driver<DiscoveryCore> {
        let init = self.init(index, id);
        let recorder = (self.recorded == Some(index)).then(Recorder::to_string_buffer);
        Driver::new(init, recorder)
    }

    /// Starts node `index`; after a leave, with a fresh core, as a
    /// restarted process has. Its first round comes within an interval.
    pub fn start(&mut self, index: usize) {
        if self.nodes[index].incarnation > 0 {
            let init = self.init(index, self.nodes[index].id);
            match self.nodes[index].driver.as_mut() {
                Some(driver) => driver.restart(init),
                None => self.nodes[index].driver = Some(Driver::new(init, None)),
            }
        }
        let server = (self.settings.inbound.clone()).map(|config| Server::new(config, self.base));
        let node = &mut self.nodes[index];
        node.up = true;
        node.started_ms = self.queue.now();
        node.own = info_of(node, START_UNIX_MS + self.queue.now());
        node.incarnation += 1;
        node.connections.clear();
        node.server = server;
        let incarnation = node.incarnation;
        let interval = self.settings.discovery.interval_ms.max(1);
        let first = if self.settings.first_round_at_start {
            0
        } else {
            self.rng.random_range(0..interval)
        };
        self.schedule(
            first,
            Event::Tick {
                node: index,
                incarnation,
            },
        );
    }

    /// Starts every node.
    pub fn start_all(&mut self) {
        for i in 0..self.nodes.len() {
            self.start(i);
        }
    }

    /// Stops node `index`: its peers' connections to it break.
    pub fn stop(&mut self, index: usize) {
        self.nodes[index].up = false;
        for target in std::mem::take(&mut self.nodes[index].connections) {
            self.release(target, index);
        }
        self.nodes[index].server = None;
        // Not the recorded node's, and not one never started (its core is
        // the one it starts with).
        if self.recorded != Some(index) && self.nodes[index].incarnation > 0 {
            self.nodes[index].driver = None;
        }
        self.break_links(|a, b| a == index || b == index);
    }

    /// Splits the network: nodes for which `side` is true on one side.
    /// Connections across break; calls across are lost.
    pub fn partition(&mut self, side: impl Fn(usize) -> bool) {
        let sides: Vec<bool> = (0..self.nodes.len()).map(side).collect();
        self.sides = Some(sides.clone());
        self.break_links(|a, b| sides.get(a) != sides.get(b));
    }

    /// Ends the partition.
    pub fn heal(&mut self) {
        self.sides = None;
    }

    fn break_links(&mut self, broken: impl Fn(usize, usize) -> bool) {
        let timeout = self.settings.call_timeout_ms;
        for a in 0..self.nodes.len() {
            let gone: Vec<usize> = self.nodes[a]
                .connections
                .iter()
                .copied()
                .filter(|b| broken(a, *b))
                .collect();
            for b in gone {
                let incarnation = self.nodes[a].incarnation;
                self.schedule(
                    timeout,
                    Event::Broken {
                        node: a,
                        incarnation,
                        peer: b,
                    },
                );
            }
        }
    }

    fn reachable(&self, a: usize, b: usize) -> bool {
        self.nodes[b].up && self.sides.as_ref().is_none_or(|s| s.get(a) == s.get(b))
    }

    /// One leg (half a round trip) between `a` and `b`, jittered.
    fn leg(&mut self, a: usize, b: usize) -> u64 {
        let (ra, rb) = (self.nodes[a].region, self.nodes[b].region);
        let rtt = self.settings.latency.rtt_ms[ra][rb] as f64;
        let jitter = self.settings.jitter;
        let factor = if jitter > 0.0 {
            self.rng.random_range(1.0 - jitter..=1.0 + jitter)
        } else {
            1.0
        };
        ((rtt / 2.0) * factor).round().max(1.0) as u64
    }

    fn lost(&mut self) -> bool {
        let lost = self.settings.loss > 0.0 && self.rng.random_bool(self.settings.loss);
        self.counts.lost += u64::from(lost);
        lost
    }

    fn schedule(&mut self, after: u64, event: Event) {
        self.queue.schedule(after, event);
    }

    /// Runs every event up to virtual time `until`.
    ///
    /// With [`Settings::threads`] above one, events are taken a window at a
    /// time, as wide as the shortest delay anything handled can schedule
    /// (the shortest leg between two nodes), so nothing handled in a
    /// window schedules an event into it but the close a node's own output
    /// asks for at once, which reaches a node already reached. Each node's
    /// rounds, calls and answers in the window, up to its first event whose
    /// input depends on what came before (a dial's result, a broken or
    /// closed connection), are stepped ahead, the nodes side by side, each
    /// step at its own time; then every event is handled in its order,
    /// those stepped ahead carrying out the outputs their step gave. A step
    /// reads and changes only its own node's core, and everything else
    /// (connections, servers, own infos, the network's randomness, the
    /// counts, the digest) changes in the order one thread would change it:
    /// the run is the same. An event scheduled into the window that reached
    /// a node with steps ahead still to carry out would break that; it
    /// panics instead (as a step's panic does; a `Sim` left by a panic is
    /// mid-window, not to be run again).
    pub fn run_until(&mut self, until: u64) {
        let width = if self.pool.is_some() {
            self.window()
        } else {
            1
        };
        let mut due = Vec::new();
        while self.queue.take_window(until, width, &mut due) {
            let mut ahead = self.step_ahead(&mut due);
            for (i, d) in due.drain(..).enumerate() {
                while let Some(first) = self.queue.next_before(d.at, d.sequence) {
                    assert!(
                        self.pending.get(first.event.node()).is_none_or(|n| *n == 0),
                        "an event scheduled within the window reached a node stepped ahead"
                    );
                    self.handle(first.event, first.sequence);
                }
                self.queue.advance_to(d.at);
                match ahead.get_mut(i).and_then(Option::take) {
                    Some(a) => {
                        self.pending[d.event.node()] -= 1;
                        self.finish(d.event, a);
                    }
                    None => self.handle(d.event, d.sequence),
                }
            }
        }
        self.queue.advance_to(until);
    }

    /// The width of a window: one more than the shortest delay a handled
    /// event can schedule another after (a leg between the two closest
    /// regions at the lowest jitter, a dial's timeout, a round), the
    /// close a node's own output asks for at once aside. An event
    /// scheduled from the window's first instant lands at its last at the
    /// earliest, after every event already there.
    fn window(&self) -> u64 {
        let s = &self.settings;
        let low = 1.0 - s.jitter.max(0.0);
        let leg = s
            .latency
            .rtt_ms
            .iter()
            .flatten()
            .min()
            .map_or(1, |&rtt| ((rtt as f64 / 2.0) * low).round().max(1.0) as u64);
        leg.min(s.call_timeout_ms)
            .min(s.discovery.interval_ms.max(1))
            + 1
    }

    /// Steps ahead, on the pool, each node's events of `due` (one
    /// window's) up to its first that cannot go ahead, taking what they
    /// carry out of them; what each step gave, by the event's position
    /// (none if fewer than two nodes have any).
    fn step_ahead(&mut self, due: &mut [Due<Event>]) -> Vec<Option<Ahead>> {
        let Some(pool) = self.pool.clone() else {
            return Vec::new();
        };
        self.stamp += 1;
        let stamp = self.stamp;
        self.marks.resize(self.nodes.len(), Mark::default());
        self.pending.resize(self.nodes.len(), 0);
        // Each node's chain: the positions of its events that go ahead.
        let mut chains: Vec<(usize, Vec<usize>)> = Vec::new();
        for (i, d) in due.iter().enumerate() {
            let node = d.event.node();
            let kind = self.kind(&d.event);
            let mark = &mut self.marks[node];
            if mark.stamp != stamp {
                *mark = Mark {
                    stamp,
                    chain: None,
                    blocked: false,
                };
            }
            match kind {
                Kind::Neutral => {}
                _ if mark.blocked => {}
                Kind::Ahead => {
                    let chain = *mark.chain.get_or_insert(chains.len());
                    if chain == chains.len() {
                        chains.push((node, Vec::new()));
                    }
                    chains[chain].1.push(i);
                }
                Kind::Blocks => mark.blocked = true,
            }
        }
        if chains.len() < 2 {
            return Vec::new();
        }
        // By node, as `disjoint_mut` takes them.
        chains.sort_unstable_by_key(|(node, _)| *node);
        let jobs: Vec<Job> = chains
            .iter()
            .map(|(node, chain)| {
                self.pending[*node] = chain.len();
                chain
                    .iter()
                    .map(|&i| (i, Time(due[i].at), self.input_ahead(&mut due[i])))
                    .collect()
            })
            .collect();
        let nodes = disjoint_mut(&mut self.nodes, chains.iter().map(|(node, _)| *node));
        // The heaviest chains first, each taken by the next free thread
        // (this one among them): the window ends soonest.
        let mut work: Vec<(usize, &mut Node, Job)> = nodes
            .into_iter()
            .zip(jobs)
            .map(|(n, job)| (weight(&job), n, job))
            .collect();
        work.sort_by_key(|(w, ..)| std::cmp::Reverse(*w));
        let slots: Vec<Mutex<Option<(&mut Node, Job)>>> = work
            .into_iter()
            .map(|(_, n, job)| Mutex::new(Some((n, job))))
            .collect();
        let next = AtomicUsize::new(0);
        let done: Mutex<Vec<(usize, Ahead)>> = Mutex::new(Vec::with_capacity(due.len()));
        let run = || {
            let mut mine = Vec::new();
            while let Some(slot) = slots.get(next.fetch_add(1, Ordering::Relaxed)) {
                let taken = slot.lock().expect("no step panicked").take();
                let (n, job) = taken.expect("each chain is taken once");
                for (i, at, (input, kind)) in job {
                    let mut bytes = Vec::new();
                    input_bytes(&mut bytes, &input);
                    let outputs = n.driver().step_at(at, input);
                    let input = bytes;
                    mine.push((
                        i,
                        Ahead {
                            at: at.0,
                            input,
                            outputs,
                            kind,
                        },
                    ));
                }
            }
            done.lock().expect("no step panicked").append(&mut mine);
        };
        pool.in_place_scope(|scope| {
            for _ in 0..pool.current_num_threads() {
                scope.spawn(|_| run());
            }
            run();
        });
        let stepped = done.into_inner().expect("no step panicked");
        self.ahead += stepped.len() as u64;
        let mut ahead: Vec<Option<Ahead>> = due.iter().map(|_| None).collect();
        for (i, a) in stepped {
            ahead[i] = Some(a);
        }
        ahead
    }

    /// Whether `event` can be stepped ahead, or leaves its node's core
    /// alone (so the node's later events still can), or neither.
    fn kind(&self, event: &Event) -> Kind {
        let (steps, ahead) = match event {
            Event::Tick { node, incarnation }
            | Event::Answer {
                to: node,
                incarnation,
                ..
            } => (self.current(*node, *incarnation), true),
            // A sybil answers without its core.
            Event::Query { to, .. } => (self.nodes[*to].up && !self.is_sybil(*to), true),
            Event::Dialled {
                node, incarnation, ..
            }
            | Event::Broken {
                node, incarnation, ..
            }
            | Event::Closed {
                node, incarnation, ..
            } => (self.current(*node, *incarnation), false),
        };
        match (steps, ahead) {
            (false, _) => Kind::Neutral,
            (true, true) => Kind::Ahead,
            (true, false) => Kind::Blocks,
        }
    }

    /// The input of a round, a call or an answer (an event that may go
    /// ahead), taking what it carries.
    fn input_ahead(&mut self, due: &mut Due<Event>) -> (Input, Stepped) {
        match &mut due.event {
            Event::Tick { .. } => (
                Input::Tick {
                    unix_ms: START_UNIX_MS + due.at,
                },
                Stepped::Tick,
            ),
            Event::Answer {
                to, from, infos, ..
            } => {
                let input = self.learned(*to, *from, std::mem::take(infos), due.at);
                (input, Stepped::Answer)
            }
            Event::Query {
                from,
                to,
                info,
                incarnation,
            } => {
                let input = self.serve_input(*from, *to, info.take(), due.at, due.sequence);
                let call = Stepped::Call {
                    from: *from,
                    incarnation: *incarnation,
                };
                (input, call)
            }
            _ => unreachable!("only rounds, calls and answers go ahead"),
        }
    }

    /// Carries out, at its turn, what `event`'s step gave, taken ahead or
    /// now.
    fn finish(&mut self, event: Event, ahead: Ahead) {
        let node = event.node();
        let Ahead {
            at,
            input,
            outputs,
            kind,
        } = ahead;
        match kind {
            Stepped::Tick => {
                let unix_ms = START_UNIX_MS + self.queue.now();
                self.nodes[node].own = info_of(&self.nodes[node], unix_ms);
                self.carry_out(node, at, &input, outputs);
                if let Event::Tick { incarnation, .. } = event {
                    let interval = self.settings.discovery.interval_ms.max(1);
                    self.schedule(interval, Event::Tick { node, incarnation });
                }
            }
            Stepped::Answer => {
                self.carry_out(node, at, &input, outputs);
            }
            Stepped::Call { from, incarnation } => {
                self.touch(node, from);
                let rest = self.carry_out(node, at, &input, outputs);
                self.answer(node, from, incarnation, rest);
            }
        }
    }

    /// The input an answer from `from` brings `to` at time `at`, counted.
    fn learned(
        &mut self,
        to: usize,
        from: usize,
        mut infos: Vec<Arc<SignedNodeInfo>>,
        at: u64,
    ) -> Input {
        self.counts.answers += 1;
        self.counts.infos += infos.len() as u64;
        self.counts.bytes += infos.len() as u64 * INFO_BYTES;
        // A sybil keeps only the first few infos of an answer: enough to
        // find honest nodes to connect to, and the attack does not depend
        // on its own table (which would cost the simulation most of its
        // time).
        if self.is_sybil(to) {
            infos.truncate(SYBIL_LEARNS);
        }
        Input::Learned {
            source: Some(self.nodes[from].id),
            infos,
            unix_ms: START_UNIX_MS + at,
        }
    }

    /// The input `from`'s call, carrying `info`, brings `to` at time `at`;
    /// `sequence` (the call's) names it.
    fn serve_input(
        &self,
        from: usize,
        to: usize,
        info: Option<Arc<SignedNodeInfo>>,
        at: u64,
        sequence: u64,
    ) -> Input {
        debug_assert!(!self.is_sybil(to), "a sybil's answers are not its core's");
        Input::Serve {
            id: sequence,
            caller: Some(self.nodes[from].id),
            info: info.map(Arc::unwrap_or_clone),
            unix_ms: START_UNIX_MS + at,
            remote: Some(IpAddr::V4(ip_of(from))),
        }
    }

    /// `from`'s call reached `to`'s server: the connection is active.
    fn touch(&mut self, to: usize, from: usize) {
        let now = self.queue.now();
        if let Some(server) = self.nodes[to].server.as_mut() {
            server.touch(from, now);
        }
    }

    /// Sends `to`'s answer to `from`'s call, out of `outputs`.
    fn answer(&mut self, to: usize, from: usize, incarnation: u32, outputs: Vec<Output>) {
        let unix_ms = START_UNIX_MS + self.queue.now();
        for output in outputs {
            match output {
                Output::Answer { infos, .. } => {
                    if self.lost() || !self.reachable(to, from) {
                        continue;
                    }
                    let own = self.own_info(to, unix_ms);
                    let infos = std::iter::once(own).chain(infos).collect();
                    let leg = self.leg(to, from);
                    self.schedule(
                        leg,
                        Event::Answer {
                            to: from,
                            from: to,
                            incarnation,
                            infos,
                        },
                    );
                }
                Output::RateLimited { .. } => self.counts.rate_limited += 1,
                _ => {}
            }
        }
    }

    /// Handles `event`, whose sequence number is `sequence`.
    fn handle(&mut self, event: Event, sequence: u64) {
        if let Kind::Ahead = self.kind(&event) {
            // A round, a call or an answer: stepped now the way a step
            // taken ahead is, and carried out the same way.
            let at = self.queue.now();
            let mut due = Due {
                at,
                sequence,
                event,
            };
            let (input, kind) = self.input_ahead(&mut due);
            let mut bytes = Vec::new();
            input_bytes(&mut bytes, &input);
            let node = due.event.node();
            let outputs = self.nodes[node].driver().step_at(Time(at), input);
            let ahead = Ahead {
                at,
                input: bytes,
                outputs,
                kind,
            };
            self.finish(due.event, ahead);
            return;
        }
        match event {
            // Rounds and answers of an earlier incarnation.
            Event::Tick { .. } | Event::Answer { .. } => {}
            Event::Dialled {
                node,
                incarnation,
                target,
                address,
                expected,
                ok,
            } => {
                if !self.current(node, incarnation) {
                    return;
                }
                match target.filter(|&t| ok && self.admitted(t, node)) {
                    Some(t) => {
                        self.nodes[node].connections.insert(t);
                        let peer = self.nodes[t].id;
                        self.step(node, Input::Connected { peer, address });
                    }
                    None => {
                        self.counts.dials_failed += 1;
                        self.step(
                            node,
                            Input::DialFailed {
                                peer: expected,
                                address,
                                found: None,
                            },
                        );
                    }
                }
            }
            Event::Query {
                from,
                to,
                incarnation,
                ..
            } => {
                // A call to a sybil, which answers without its core, or to
                // a node that is down.
                if !self.nodes[to].up {
                    return;
                }
                self.touch(to, from);
                let unix_ms = START_UNIX_MS + self.queue.now();
                let outputs = vec![Output::Answer {
                    id: sequence,
                    infos: self.sybil_answer(unix_ms),
                }];
                self.answer(to, from, incarnation, outputs);
            }
            Event::Broken {
                node,
                incarnation,
                peer,
            } => {
                if !self.current(node, incarnation) || !self.nodes[node].connections.remove(&peer) {
                    return;
                }
                self.release(peer, node);
                self.counts.broken += 1;
                let peer = self.nodes[peer].id;
                self.step(node, Input::Disconnected { peer });
            }
            Event::Closed {
                node,
                incarnation,
                peer,
            } => {
                if self.current(node, incarnation) {
                    let peer = self.nodes[peer].id;
                    self.step(node, Input::Disconnected { peer });
                }
            }
        }
    }

    fn current(&self, node: usize, incarnation: u32) -> bool {
        self.nodes[node].up && self.nodes[node].incarnation == incarnation
    }

    /// Feeds `input` to node `node`'s core now and carries out what it asks.
    fn step(&mut self, node: usize, input: Input) -> Vec<Output> {
        let mut bytes = std::mem::take(&mut self.scratch);
        bytes.clear();
        input_bytes(&mut bytes, &input);
        let outputs = self.nodes[node]
            .driver()
            .step_at(Time(self.queue.now()), input);
        let rest = self.carry_out(node, self.queue.now(), &bytes, outputs);
        self.scratch = bytes;
        rest
    }

    /// Carries out what node `node`'s core asked when given, at time `at`,
    /// the input `input` identifies; returns the outputs left to the
    /// caller.
    fn carry_out(
        &mut self,
        node: usize,
        at: u64,
        input: &[u8],
        outputs: Vec<Output>,
    ) -> Vec<Output> {
        self.digest.update(&(node as u64).to_le_bytes());
        self.digest.update(&at.to_le_bytes());
        self.digest.update(input);
        let mut rest = Vec::new();
        for output in outputs {
            hash_output(&mut self.digest, &output);
            match output {
                Output::Query { peer } => self.query(node, peer),
                Output::Dial { peer, address } => self.dial(node, peer, address),
                Output::Disconnect { peer } => self.close(node, peer),
                other => rest.push(other),
            }
        }
        rest
    }

    fn query(&mut self, from: usize, peer: PeerId) {
        let Some(to) = self.index_of(&peer) else {
            return;
        };
        self.counts.queries += 1;
        if !self.nodes[from].connections.contains(&to) || self.lost() || !self.reachable(from, to) {
            return;
        }
        let info = self.own_info(from, START_UNIX_MS + self.queue.now());
        let incarnation = self.nodes[from].incarnation;
        let leg = self.leg(from, to);
        self.schedule(
            leg,
            Event::Query {
                from,
                to,
                incarnation,
                info: Some(info),
            },
        );
    }

    /// Closes `node`'s connection to `peer` at once, as its Connections
    /// would; Discovery hears of it as the next event.
    fn close(&mut self, node: usize, peer: PeerId) {
        let Some(index) = self.index_of(&peer) else {
            return;
        };
        if self.nodes[node].connections.remove(&index) {
            self.release(index, node);
            self.counts.rotated += 1;
            let incarnation = self.nodes[node].incarnation;
            self.schedule(
                0,
                Event::Closed {
                    node,
                    incarnation,
                    peer: index,
                },
            );
        }
    }

    fn dial(&mut self, node: usize, expected: Option<PeerId>, address: String) {
        self.counts.dials += 1;
        let target = self.by_address.get(&address).copied();
        let incarnation = self.nodes[node].incarnation;
        let (after, ok) = match target {
            Some(t) if t != node && self.reachable(node, t) => {
                let full = self.nodes[node].connections.len() >= self.settings.max_connections;
                let wrong = expected.is_some_and(|p| p != self.nodes[t].id);
                let rtt = self.leg(node, t) * 2;
                (if full || wrong { rtt } else { 2 * rtt }, !full && !wrong)
            }
            _ => (self.settings.call_timeout_ms, false),
        };
        self.schedule(
            after,
            Event::Dialled {
                node,
                incarnation,
                target,
                address,
                expected,
                ok,
            },
        );
    }

    /// Whether `target`'s inbound rules admit `dialler`'s connection; the
    /// connections evicted for it close, each seen by its dialler a leg
    /// later. Without rules (or a server, the target being down), yes.
    fn admitted(&mut self, target: usize, dialler: usize) -> bool {
        let ip = IpAddr::V4(ip_of(dialler));
        let (now, peer) = (self.queue.now(), self.nodes[dialler].id);
        let Some(server) = self.nodes[target].server.as_mut() else {
            return true;
        };
        match server.accept(now, dialler, ip, peer) {
            Ok(evicted) => {
                for d in evicted {
                    self.counts.inbound_evicted += 1;
                    if self.nodes[d].connections.remove(&target) {
                        let incarnation = self.nodes[d].incarnation;
                        let leg = self.leg(target, d);
                        let event = Event::Closed {
                            node: d,
                            incarnation,
                            peer: target,
                        };
                        self.schedule(leg, event);
                    }
                }
                true
            }
            Err(_) => {
                self.counts.inbound_refused += 1;
                false
            }
        }
    }

    /// `dialler`'s connection to `target` closed: `target`'s server frees
    /// its slot.
    fn release(&mut self, target: usize, dialler: usize) {
        if let Some(server) = self.nodes[target].server.as_mut() {
            server.release(dialler);
        }
    }

    /// The info node `index` sends with a call or an answer now: the one
    /// it signed last; a sybil's, signed now.
    fn own_info(&self, index: usize, unix_ms: u64) -> Arc<SignedNodeInfo> {
        if self.is_sybil(index) {
            info_of(&self.nodes[index], unix_ms)
        } else {
            Arc::clone(&self.nodes[index].own)
        }
    }

    /// Inbound connections `index`'s server holds (0 without rules).
    pub fn inbound_open(&self, index: usize) -> usize {
        self.nodes[index].server.as_ref().map_or(0, Server::open)
    }

    /// The node whose identity is `peer`, if any.
    pub fn index_of(&self, peer: &PeerId) -> Option<usize> {
        let mut n = [0u8; 8];
        n.copy_from_slice(&peer.0[..8]);
        let index = u64::from_le_bytes(n) as usize;
        (index < self.nodes.len() && self.nodes[index].id == *peer).then_some(index)
    }

    /// Whether node `index` runs now.
    pub fn is_up(&self, index: usize) -> bool {
        self.nodes[index].up
    }

    /// Every node's view now.
    pub fn views(&self) -> Vec<NodeView> {
        self.nodes
            .iter()
            .enumerate()
            .map(|(index, n)| {
                let known: Vec<usize> = n.known_peers().filter_map(|p| self.index_of(p)).collect();
                NodeView {
                    index,
                    up: n.up,
                    known: known.len(),
                    known_up: known.iter().filter(|k| self.nodes[**k].up).count(),
                    connected: n.connections.len(),
                    started_ms: n.started_ms,
                    sybil: self.is_sybil(index),
                }
            })
            .collect()
    }

    /// The nodes node `index` knows.
    pub fn known_by(&self, index: usize) -> Vec<usize> {
        self.nodes[index]
            .known_peers()
            .filter_map(|p| self.index_of(p))
            .collect()
    }

    /// The round trip between nodes `a` and `b`, without jitter, in
    /// milliseconds.
    pub fn rtt_ms(&self, a: usize, b: usize) -> u64 {
        let (ra, rb) = (self.nodes[a].region, self.nodes[b].region);
        self.settings.latency.rtt_ms[ra][rb]
    }

    /// Whether node `a` holds a connection to node `b`.
    pub fn holds_connection(&self, a: usize, b: usize) -> bool {
        self.nodes[a].connections.contains(&b)
    }

    /// The nodes node `index` holds a connection to.
    pub fn connections_of(&self, index: usize) -> Vec<usize> {
        self.nodes[index].connections.iter().copied().collect()
    }

    /// The settings the network was made with.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }
}

fn info_of(node: &Node, unix_ms: u64) -> Arc<SignedNodeInfo> {
    info(node.id, &node.address, unix_ms)
}

/// A node's chain of steps taken ahead: each event's position in its
/// window, its time, its input and what it is.
type Job = Vec<(usize, Time, (Input, Stepped))>;

/// About how long a chain takes: an answer's infos each cost a lookup in
/// the table, a call an answer's sample, a round little.
fn weight(job: &Job) -> usize {
    job.iter()
        .map(|(_, _, (input, _))| match input {
            Input::Learned { infos, .. } => infos.len(),
            Input::Serve { .. } => 50,
            _ => 10,
        })
        .sum()
}

/// Indices of `items`, ascending and distinct, to their items.
fn disjoint_mut<T>(items: &mut [T], ascending: impl Iterator<Item = usize>) -> Vec<&mut T> {
    let (mut rest, mut base) = (items, 0);
    let mut out = Vec::new();
    for i in ascending {
        let (_, tail) = std::mem::take(&mut rest).split_at_mut(i - base);
        let (item, tail) = tail
            .split_first_mut()
            .expect("indices ascending, distinct and in range");
        out.push(item);
        (rest, base) = (tail, i + 1);
    }
    out
}

/// What identifies `input`, to be hashed: its kind and every peer, address
/// and time it names (cheaper than its whole text, as precise for a run).
fn input_bytes(h: &mut Vec<u8>, input: &Input) {
    match input {
        Input::Tick { unix_ms } => {
            h.extend_from_slice(b"t");
            h.extend_from_slice(&unix_ms.to_le_bytes());
        }
        Input::Connected { peer, address } => {
            h.extend_from_slice(b"c");
            h.extend_from_slice(&peer.0);
            h.extend_from_slice(address.as_bytes());
        }
        Input::Disconnected { peer } => {
            h.extend_from_slice(b"d");
            h.extend_from_slice(&peer.0);
        }
        Input::DialFailed {
            peer,
            address,
            found,
        } => {
            h.extend_from_slice(b"f");
            h.extend_from_slice(&peer.map_or([0; 32], |p| p.0));
            h.extend_from_slice(address.as_bytes());
            // Never set here: simulated addresses are their nodes' own.
            if let Some(found) = found {
                h.extend_from_slice(&found.0);
            }
        }
        Input::AlreadyConnected { peer, address } => {
            h.extend_from_slice(b"a");
            h.extend_from_slice(&peer.0);
            h.extend_from_slice(address.as_bytes());
        }
        Input::Learned {
            source,
            infos,
            unix_ms,
        } => {
            h.extend_from_slice(b"l");
            h.extend_from_slice(&source.map_or([0; 32], |p| p.0));
            h.extend_from_slice(&unix_ms.to_le_bytes());
            info_bytes(h, infos);
        }
        Input::Serve {
            id,
            caller,
            info,
            unix_ms,
            remote,
        } => {
            h.extend_from_slice(b"s");
            h.extend_from_slice(&id.to_le_bytes());
            h.extend_from_slice(&caller.map_or([0; 32], |p| p.0));
            h.extend_from_slice(&unix_ms.to_le_bytes());
            let (peer, stamp) = info
                .as_ref()
                .map_or(([0; 32], 0), |i| (i.info.peer_id.0, i.info.timestamp_ms));
            h.extend_from_slice(&peer);
            h.extend_from_slice(&stamp.to_le_bytes());
            match remote {
                Some(IpAddr::V4(ip)) => h.extend_from_slice(&ip.octets()),
                Some(IpAddr::V6(ip)) => h.extend_from_slice(&ip.octets()),
                None => h.extend_from_slice(b"-"),
            }
        }
        Input::KnownPeers => {
            h.extend_from_slice(b"k");
        }
    }
}

fn hash_output(h: &mut RunDigest, output: &Output) {
    match output {
        Output::Query { peer } => {
            h.update(b"Q");
            h.update(&peer.0);
        }
        Output::Dial { address, .. } => {
            h.update(b"D");
            h.update(address.as_bytes());
        }
        Output::Disconnect { peer } => {
            h.update(b"X");
            h.update(&peer.0);
        }
        Output::Answer { id, infos } => {
            h.update(b"A");
            h.update(&id.to_le_bytes());
            hash_infos(h, infos);
        }
        Output::RateLimited { id } => {
            h.update(b"R");
            h.update(&id.to_le_bytes());
        }
        Output::Known(infos) => {
            h.update(b"K");
            hash_infos(h, infos);
        }
        Output::SameKeyElsewhere { addresses } => {
            h.update(b"S");
            for address in addresses {
                h.update(address.as_bytes());
            }
        }
    }
}

fn hash_infos(h: &mut RunDigest, infos: &[Arc<SignedNodeInfo>]) {
    h.write(|bytes| info_bytes(bytes, infos));
}

/// What identifies `infos`: each one's peer and timestamp.
fn info_bytes(out: &mut Vec<u8>, infos: &[Arc<SignedNodeInfo>]) {
    out.reserve(infos.len() * 40);
    for i in infos {
        out.extend_from_slice(&i.info.peer_id.0);
        out.extend_from_slice(&i.info.timestamp_ms.to_le_bytes());
    }
}
