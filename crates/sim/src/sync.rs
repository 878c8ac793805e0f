//! Catch-up: a network far behind its validators syncs from them and from
//! each other, every node made of the production StateSync and PeerHeights
//! cores, while some nodes are hostile.
//!
//! The StateSync core decides what to fetch, how far ahead, what to retry
//! and whom to avoid; the PeerHeights core tracks heights, leases fetch
//! slots on peers and bans liars. What stands in for their shells, as the
//! node's own shells behave:
//!
//! - **Workers.** A fetch leases a slot on a peer (waiting at most the
//!   request timeout for one), sends its request, and ends at the answer or
//!   at the timeout; the slot is released with what happened and the
//!   answer is verified on the node's one verification queue (a cost per
//!   block and per commit batch), then handed to the core. A batch fetched
//!   ahead is certified as it arrives and, at its turn, only linked. A
//!   fetch still unanswered after the production [`Hedging`] delay also
//!   asks a second peer, and the first answer is kept, as the worker does.
//!   A fetch the pipeline waits on that its peer refuses as busy goes once
//!   to a peer with room to spare and a slot free now, if there is one.
//! - **Servers.** A node serves the commits it holds: at most
//!   `serve_slots` fetches at once and `serve_slots_per_peer` per caller
//!   (more are refused as busy), each answer leaving through the node's
//!   upload at `upload_bytes_per_s` one after another.
//! - **Heights.** The core's height queries go to every peer the node
//!   dialled; a node that applies a batch pushes its height to the peers
//!   its PeerHeights knows to be behind.
//!
//! Commits and blocks are not built: a batch is its size and its end, and
//! verification is its cost. Everything else is the production code.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use soma_actors::peer_heights::{
    self, Acquire, AcquireError, Lease, OutcomeKind, PeerHeightsCore, PeersBehind, PushHeight,
    Release, ReportBeaten, ReportOutcome, Transfer, UpdateHeight,
};
use soma_actors::replay::Recorder;
use soma_actors::state_sync::{
    self, ApplyError, CommitBatchInfo, Failure, FetchKind, HEAD_HEDGE_MIN, HEDGE_MIN, Hedging,
    Input, LocalFailure, MOVE_ANYWHERE_AFTER_MOVE_DELAYS, Output, StateSyncCore, TaskId,
    UNANSWERED_DOUBT,
};
use soma_actors::{Driver, Time};
use soma_types::{ChainId, CommitIndex, CommitRef, Digest, PeerId};

use crate::digest::RunDigest;
use crate::net::{Sim, peer_id};
use crate::queue::Queue;

/// What a hostile node does with the fetches it is sent. Each claims to
/// hold every commit, so that it is asked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hostile {
    /// Never answers a fetch: each one ends at the caller's timeout.
    Silent,
    /// Answers every fetch at once with data that fails verification.
    Liar,
    /// Serves what it holds (everything), each answer `delay_ms` late.
    Slow {
        /// The delay added to each answer.
        delay_ms: u64,
    },
    /// Serves what it holds, each answer reaching the caller a millisecond
    /// before the caller would ask another peer: it is told the caller's
    /// hedge delay, the most such a peer could learn. A node that took
    /// every peer's answer time into one average would see its delay
    /// grow with each such answer, up to half its request timeout.
    Creeping,
    /// Serves what it holds, but answers each commit fetch at once with
    /// its first commit alone (an answer may end early at any commit its
    /// server can certify); block fetches whole.
    OneCommit,
    /// Refuses every fetch at once as busy, which proves no lie: it is
    /// never banned, and its refusals cost its callers only time.
    Busy,
    /// Half of them [`Hostile::Silent`], half [`Hostile::OneCommit`]
    /// (alternately, in the order of their indices): the silent ones, once
    /// leased a fetch, are hedged, and the others answer the hedges with
    /// one commit.
    SilentOrOneCommit,
}

/// How a catch-up runs.
#[derive(Clone, Debug, PartialEq)]
pub struct SyncSettings {
    /// Commits the validators hold and every other node lacks.
    pub commits: CommitIndex,
    /// Blocks each commit names.
    pub blocks_per_commit: u64,
    /// Bytes of one commit on the wire.
    pub commit_bytes: u64,
    /// Bytes of one block on the wire.
    pub block_bytes: u64,
    /// Certifier blocks sent with each commit batch.
    pub certifier_blocks: u64,
    /// Each node's upload, in bytes per second.
    pub upload_bytes_per_s: u64,
    /// Verification time per block, in microseconds (the node's cores
    /// together: 48 is the 21,000 blocks/s of a 2-core catch-up with
    /// signatures checked).
    pub verify_us_per_block: u64,
    /// Verification time of a commit batch and its certificate, in
    /// microseconds.
    pub verify_us_per_batch: u64,
    /// Fetches a node serves at once (`max-concurrent-fetches`).
    pub serve_slots: usize,
    /// Fetches a node serves one caller at once
    /// (`max-concurrent-fetches-per-peer`).
    pub serve_slots_per_peer: usize,
    /// Time allowed for one request (`timeout`), in milliseconds.
    pub timeout_ms: u64,
    /// StateSync's tick (`tick`), in milliseconds.
    pub tick_ms: u64,
    /// Hostile nodes: what they do, and the fraction of the nodes that
    /// are not validators.
    pub hostile: Option<(Hostile, f64)>,
    /// The StateSync core's settings.
    pub state_sync: state_sync::Config,
}

impl Default for SyncSettings {
    /// The node's defaults, and a chain like the benchmarks': 4 blocks per
    /// commit of 10 signed transactions each.
    fn default() -> Self {
        SyncSettings {
            commits: 10_000,
            blocks_per_commit: 4,
            commit_bytes: 250,
            block_bytes: 1_600,
            certifier_blocks: 3,
            upload_bytes_per_s: 125_000_000,
            verify_us_per_block: 48,
            verify_us_per_batch: 500,
            serve_slots: 64,
            serve_slots_per_peer: 4,
            timeout_ms: 10_000,
            tick_ms: 100,
            hostile: None,
            state_sync: state_sync::Config::default(),
        }
    }
}

/// How a catch-up went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyncRun {
    /// Honest nodes that had to sync (neither validators nor hostile).
    pub followers: usize,
    /// Hostile nodes.
    pub hostile: usize,
    /// Connections from followers to hostile nodes.
    pub hostile_connections: usize,
    /// Followers that synced every commit within the run.
    pub synced: usize,
    /// The median follower's time to sync, in milliseconds, once all did.
    pub median_synced_ms: Option<u64>,
    /// The 90th percentile, once all synced.
    pub p90_synced_ms: Option<u64>,
    /// Time until the last follower synced.
    pub all_synced_ms: Option<u64>,
    /// Fetches sent to a peer (hedges apart; a fetch handed on after a
    /// refusal as busy counts twice).
    pub fetches: u64,
    /// Second peers asked for a fetch that was late (hedges).
    pub hedges: u64,
    /// Hedges that went on alone once their fetch's first call failed
    /// (not by timing out) while they were out, as the worker's do
    /// (`Worker::hedged_on`).
    pub hedges_alone: u64,
    /// Of those, the ones whose answer came before they were late (at
    /// most by the first call's deadline): their fetch was not asked
    /// again.
    pub alone_answered: u64,
    /// Hedges that failed (refused, denied, timed out) and were asked of
    /// another peer in their place, as the worker's are.
    pub hedges_asked_again: u64,
    /// Late hedges that moved on to a peer not yet asked for their fetch
    /// with a slot free (`Worker::late_hedge`).
    pub hedges_moved: u64,
    /// Hedges' answers of a part of what was asked, held while their
    /// fetch's first call had the time its own peer needs
    /// (`Hedging::part_wait`), as the worker holds them.
    pub parts_held: u64,
    /// Of those, the ones the first call's answer replaced.
    pub parts_outrun: u64,
    /// Fetches that ended at their timeout.
    pub timeouts: u64,
    /// Answers that failed verification.
    pub invalid: u64,
    /// Fetches refused as busy.
    pub busy: u64,
    /// Work the StateSync cores restarted.
    pub restarts: u64,
    /// Bans PeerHeights cores imposed.
    pub bans: u64,
    /// The longest any fetch was to wait for its peer alone before a
    /// second peer was asked (the hedge delay), in milliseconds.
    pub longest_hedge_delay_ms: u64,
    /// Every StateSync output in order, hashed: equal for equal runs.
    pub digest: [u8; 32],
}

/// A fetch, as the worker that runs it sees it.
#[derive(Clone, Copy, Debug)]
enum Work {
    Commits {
        task: TaskId,
        start: CommitIndex,
        end: CommitIndex,
    },
    Ahead {
        task: TaskId,
        start: CommitIndex,
        end: CommitIndex,
    },
    Blocks {
        task: TaskId,
        batch: CommitIndex,
        end: CommitIndex,
        len: u64,
    },
}

impl Work {
    /// The range a peer must hold to be leased: the first commit for a
    /// commit fetch (an honest peer serves it), the whole batch for blocks.
    fn range(&self) -> (CommitIndex, CommitIndex) {
        match *self {
            Work::Commits { start, .. } | Work::Ahead { start, .. } => (start, start),
            Work::Blocks { batch, end, .. } => (batch, end),
        }
    }

    /// The last commit asked for.
    fn end(&self) -> CommitIndex {
        match *self {
            Work::Commits { end, .. } | Work::Ahead { end, .. } | Work::Blocks { end, .. } => end,
        }
    }

    fn kind(&self) -> FetchKind {
        match self {
            Work::Commits { .. } | Work::Ahead { .. } => FetchKind::Commits,
            Work::Blocks { .. } => FetchKind::Blocks,
        }
    }
}

/// A commit answer: what the server sent.
#[derive(Clone, Copy, Debug)]
struct Answer {
    peer: PeerId,
    start: CommitIndex,
    end: CommitIndex,
    /// The last commit asked for.
    asked: CommitIndex,
    bytes: u64,
    /// What the worker scores its peer by: the bytes of a commit answer's
    /// commits (its certificate apart), of a block answer's blocks.
    scored_bytes: u64,
    /// From the request to the answer, in milliseconds.
    latency_ms: u64,
    valid: bool,
}

#[derive(Clone, Copy, Debug)]
enum Reply {
    Data {
        end: CommitIndex,
        bytes: u64,
        valid: bool,
    },
    Busy,
    NotFound,
}

#[derive(Debug)]
enum Event {
    /// StateSync's tick at `node`.
    Tick { node: usize },
    /// StateSync's wake-up at `node` for its earliest retry, set at `at`
    /// (superseded if the node's wake was set earlier since).
    Wake { node: usize, at: Time },
    /// PeerHeights' timer for waiting requests at `node`.
    HeightsTick { node: usize },
    /// `from`'s height query reaches `to`.
    Query {
        from: usize,
        to: usize,
        connecting: bool,
        /// When it was sent, in microseconds.
        sent_us: u64,
    },
    /// `to` hears `from`'s height.
    Height {
        to: usize,
        from: usize,
        highest: CommitIndex,
        connecting: bool,
        /// When its query was sent, in microseconds.
        sent_us: u64,
    },
    /// `to` hears `from`'s push.
    Push {
        to: usize,
        from: usize,
        highest: CommitIndex,
    },
    /// Call `call` of `client`, for `work`, reaches `server`.
    Request {
        server: usize,
        client: usize,
        call: u64,
        work: Work,
    },
    /// `server` has sent its answer to `client`: the slot is free.
    Served { server: usize, client: usize },
    /// The answer to call `call` reaches `client`.
    Reply {
        client: usize,
        call: u64,
        reply: Reply,
    },
    /// Call `call` of `client` reached its timeout.
    Timeout { client: usize, call: u64 },
    /// The hedge `call` of `client`, gone on alone, is late, or its first
    /// call reached its deadline: the hedge, if still unanswered, is
    /// dropped and the fetch ends with the first call's failure.
    AloneDeadline { client: usize, call: u64 },
    /// The first call `call` of `client`, whose hedge's part of an answer
    /// is held, has had the time its own peer needs: the part is taken.
    PartDue { client: usize, call: u64 },
    /// Whether call `call` of `client` is late enough to be hedged.
    HedgeCheck { client: usize, call: u64 },
    /// Whether the hedge `call` of `client` may move on to a peer not yet
    /// asked for its fetch.
    MoveCheck { client: usize, call: u64 },
    /// A worker of `node` ends: the core hears `input`; a verified answer
    /// of a fetch of its kind scores its peer first, and its answer time
    /// goes to hedging, as the worker has it.
    Done {
        node: usize,
        input: Input,
        verified: Option<Verified>,
    },
    /// `node` wrote the batch `start..=end`.
    Applied {
        node: usize,
        start: CommitIndex,
        end: CommitIndex,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Validator,
    Follower,
    Hostile(Hostile),
}

/// A call sent and not answered yet.
struct Call {
    work: Work,
    lease: Lease,
    sent_us: u64,
    /// Peers the work avoids.
    avoid: Vec<PeerId>,
    /// Set on a hedge: the call it hedges.
    hedge_of: Option<u64>,
    /// Set on a hedged call: its hedge, once sent.
    hedge: Option<u64>,
    /// Whether a hedge is being looked for or was sent (at most one per
    /// call).
    hedged: bool,
    /// Whether its peer's claim was doubted while it went unanswered.
    unanswered: bool,
    /// Whether it was handed on from a peer that refused it as busy (at
    /// most once per fetch).
    handed: bool,
    /// Whether its hedge delay has ended (a hedge was looked for).
    past_hedge: bool,
    /// Set on a hedge gone on alone: its first call, failed, with how its
    /// slot is to be released and its failure.
    alone: Option<Box<(Call, Transfer, Failure)>>,
    /// On a hedged call: the peers its hedges failed on (not asked again
    /// in this race) and the peers hedges moved on from, each with whether
    /// it was late itself then (those beaten by the answer of all that was
    /// asked that ends the race, if it passes its checks; a hedge at the
    /// head moves on before its peer is late). A peer asked again leaves
    /// the list unless it was left late, as the worker's `given_way`.
    hedges_failed: Vec<PeerId>,
    hedges_left: Vec<(PeerId, bool)>,
    /// Whether its next hedge may ask a peer a hedge of it moved away
    /// from: only once no other could be leased.
    ask_left: bool,
    /// On a hedge: how long makes its peer late, read as it was sent
    /// (`Hedging::late_after`'s `at_send`).
    late_at_send: Duration,
    /// On a first call: its hedge's answer of a part of what was asked,
    /// held until it has had the time its own peer needs.
    held_part: Option<Box<HeldPart>>,
}

/// A hedge's answer of a part of what was asked, held for its first call.
struct HeldPart {
    /// The hedge's call number.
    call: u64,
    hedge: Call,
    reply: Reply,
    /// Whether the first peer, unanswered by the time the part is taken,
    /// is beaten by it (`PartWait::beaten`).
    beats_first: bool,
}

/// A fetch waiting for a slot: its work, the peers it avoids, and the call
/// it hedges, if it is a hedge.
type Waiting = (Work, Vec<PeerId>, Option<u64>);

struct Node {
    role: Role,
    /// Commits held (and served).
    height: CommitIndex,
    sync: Option<Driver<StateSyncCore>>,
    /// When StateSync's core is to be woken for its next retry, as the
    /// actor's shell does.
    wake_at: Option<Time>,
    heights: Option<Driver<PeerHeightsCore>>,
    next_request: u64,
    /// Fetches waiting for a slot, by PeerHeights request.
    waiting: BTreeMap<u64, Waiting>,
    hedging: Hedging,
    calls: BTreeMap<u64, Call>,
    /// Commit answers fetched ahead, by task.
    ahead: BTreeMap<TaskId, Answer>,
    /// The end of each batch whose commits were verified, by start.
    batch_ends: BTreeMap<CommitIndex, CommitIndex>,
    /// When the verification queue is free, in microseconds.
    verifier_free_us: u64,
    /// When the upload is free, in microseconds.
    upload_free_us: u64,
    serving: BTreeMap<usize, usize>,
    serving_total: usize,
    synced_at_us: Option<u64>,
}

struct Run<'a> {
    sim: &'a Sim,
    settings: SyncSettings,
    nodes: Vec<Node>,
    /// Virtual time in microseconds.
    queue: Queue<Event>,
    next_call: u64,
    run: SyncRun,
    digest: RunDigest,
}

/// The chain every node is on.
const CHAIN: ChainId = ChainId(Digest([9; 32]));

/// gRPC's RESOURCE_EXHAUSTED: how a server refuses a fetch for now.
const RESOURCE_EXHAUSTED: i32 = 8;

/// The reference of commit `index` of the simulated chain.
fn commit_ref(index: CommitIndex) -> CommitRef {
    let mut digest = [0u8; 32];
    digest[..8].copy_from_slice(&index.to_le_bytes());
    CommitRef {
        index,
        digest: Digest(digest),
    }
}

/// The up nodes of `sim`, connected as Discovery left them: `validators`
/// hold `settings.commits` commits, a fraction of the rest is hostile, and
/// every other node starts at commit 0 and syncs. Runs until every such
/// node has synced or `max_ms` passed. `recorded` names a node whose
/// StateSync core records a trace, returned with the run.
pub fn catch_up(
    sim: &Sim,
    validators: &[usize],
    settings: SyncSettings,
    seed: u64,
    max_ms: u64,
    recorded: Option<usize>,
) -> (SyncRun, Option<String>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let up: Vec<usize> = (0..sim.len()).filter(|&i| sim.is_up(i)).collect();
    let others: Vec<usize> = up
        .iter()
        .copied()
        .filter(|i| !validators.contains(i))
        .collect();
    let hostile: BTreeSet<usize> = match settings.hostile {
        Some((_, fraction)) => {
            let count = (others.len() as f64 * fraction).round() as usize;
            others.choose_multiple(&mut rng, count).copied().collect()
        }
        None => BTreeSet::new(),
    };
    // A mixed kind, alternately by index.
    let kind_of = |i: usize, kind: Hostile| match kind {
        Hostile::SilentOrOneCommit => match hostile.range(..i).count() % 2 {
            0 => Hostile::Silent,
            _ => Hostile::OneCommit,
        },
        kind => kind,
    };
    let nodes = (0..sim.len())
        .map(|i| {
            let role = match settings.hostile {
                _ if validators.contains(&i) => Role::Validator,
                Some((kind, _)) if hostile.contains(&i) => Role::Hostile(kind_of(i, kind)),
                _ => Role::Follower,
            };
            let follows = role == Role::Follower && sim.is_up(i);
            let config = peer_heights::Config::new(CHAIN, rng.random());
            let recorder = (recorded == Some(i)).then(Recorder::to_string_buffer);
            Node {
                role,
                height: if role == Role::Follower {
                    0
                } else {
                    settings.commits
                },
                sync: follows.then(|| Driver::new(init(&settings), recorder)),
                heights: follows.then(|| Driver::new(peer_heights::Init::from(config), None)),
                next_request: 0,
                waiting: BTreeMap::new(),
                hedging: Hedging::default(),
                calls: BTreeMap::new(),
                ahead: BTreeMap::new(),
                batch_ends: BTreeMap::new(),
                verifier_free_us: 0,
                upload_free_us: 0,
                serving: BTreeMap::new(),
                serving_total: 0,
                synced_at_us: None,
                wake_at: None,
            }
        })
        .collect();
    let followers: Vec<usize> = up
        .iter()
        .copied()
        .filter(|&i| !validators.contains(&i) && !hostile.contains(&i))
        .collect();
    let mut run = Run {
        sim,
        settings,
        nodes,
        queue: Queue::default(),
        next_call: 0,
        run: SyncRun {
            followers: followers.len(),
            hostile: hostile.len(),
            hostile_connections: followers
                .iter()
                .map(|&i| {
                    let peers = sim.connections_of(i);
                    peers.iter().filter(|p| hostile.contains(p)).count()
                })
                .sum(),
            synced: 0,
            median_synced_ms: None,
            p90_synced_ms: None,
            all_synced_ms: None,
            fetches: 0,
            hedges: 0,
            hedges_alone: 0,
            alone_answered: 0,
            hedges_asked_again: 0,
            hedges_moved: 0,
            parts_held: 0,
            parts_outrun: 0,
            timeouts: 0,
            invalid: 0,
            busy: 0,
            restarts: 0,
            longest_hedge_delay_ms: 0,
            bans: 0,
            digest: [0; 32],
        },
        digest: RunDigest::default(),
    };
    for &node in &followers {
        for peer in sim.connections_of(node) {
            let peer = peer_id(peer);
            run.heights_step(node, peer_heights::Input::Connected { peer });
            run.sync_step(node, Input::PeerConnected { peer });
        }
        let tick = run.ms_to_us(run.settings.tick_ms);
        run.queue.schedule(tick, Event::Tick { node });
    }
    run.go(&followers, max_ms.saturating_mul(1_000));
    let mut synced: Vec<u64> = followers
        .iter()
        .filter_map(|&i| run.nodes[i].synced_at_us)
        .map(|us| us / 1_000)
        .collect();
    synced.sort_unstable();
    run.run.synced = synced.len();
    if synced.len() == followers.len() && !synced.is_empty() {
        run.run.median_synced_ms = Some(synced[synced.len() / 2]);
        run.run.p90_synced_ms = Some(synced[(synced.len() * 9).div_ceil(10) - 1]);
        run.run.all_synced_ms = synced.last().copied();
    }
    run.run.digest = run.digest.finalize();
    let trace = recorded.and_then(|i| {
        let driver = run.nodes[i].sync.take()?;
        driver.into_recorder().map(Recorder::into_string)
    });
    (run.run, trace)
}

/// A follower's StateSync core at commit 0 of epoch 0.
fn init(settings: &SyncSettings) -> state_sync::Init {
    state_sync::Init {
        config: settings.state_sync.clone(),
        synced: commit_ref(0),
        epoch: 0,
        // The node's largest fetch answer (`max-fetch-response-bytes`).
        commit_answer_bytes: 4 << 20,
        first_task: 0,
        executed: None,
    }
}

impl Run<'_> {
    fn ms_to_us(&self, ms: u64) -> u64 {
        ms.saturating_mul(1_000)
    }

    fn now(&self) -> Time {
        Time(self.queue.now() / 1_000)
    }

    /// Half the round trip between `a` and `b`, in microseconds.
    fn leg(&self, a: usize, b: usize) -> u64 {
        (self.sim.rtt_ms(a, b) * 1_000 / 2).max(1)
    }

    fn go(&mut self, followers: &[usize], until_us: u64) {
        let mut left = followers.len();
        while left > 0 {
            let Some(event) = self.queue.next_until(until_us) else {
                break;
            };
            if let Event::Applied { node, .. } = &event {
                let node = *node;
                let before = self.nodes[node].synced_at_us.is_some();
                self.handle(event);
                if !before && self.nodes[node].synced_at_us.is_some() {
                    left -= 1;
                }
            } else {
                self.handle(event);
            }
        }
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Tick { node } => {
                let highest_known = match self.heights_step(node, peer_heights::Input::HighestKnown)
                {
                    Some(peer_heights::Output::HighestKnown(h)) => h,
                    _ => None,
                };
                self.sync_step(node, Input::Tick { highest_known });
                let tick = self.ms_to_us(self.settings.tick_ms);
                self.queue.schedule(tick, Event::Tick { node });
            }
            Event::Wake { node, at } => {
                if self.nodes[node].wake_at == Some(at) {
                    self.nodes[node].wake_at = None;
                    self.sync_step(node, Input::Wake);
                }
            }
            Event::HeightsTick { node } => {
                self.heights_step(node, peer_heights::Input::Tick);
            }
            Event::Query {
                from,
                to,
                connecting,
                sent_us,
            } => {
                let highest = match self.nodes[to].role {
                    Role::Hostile(_) => self.settings.commits,
                    _ => self.nodes[to].height,
                };
                let leg = self.leg(from, to);
                let height = Event::Height {
                    to: from,
                    from: to,
                    highest,
                    connecting,
                    sent_us,
                };
                self.queue.schedule(leg, height);
            }
            Event::Height {
                to,
                from,
                highest,
                connecting,
                sent_us,
            } => {
                // As the shell does: its answer time goes to hedging.
                let latency_ms = (self.queue.now() - sent_us) / 1_000;
                self.nodes[to].hedging.queried(peer_id(from), latency_ms);
                let update = UpdateHeight {
                    peer: peer_id(from),
                    chain_id: CHAIN,
                    highest,
                    lowest: 1,
                };
                self.heights_step(to, peer_heights::Input::Update(update));
                // A new connection's answer: once every connected peer's is
                // in, the shell ticks at once.
                if connecting
                    && let Some(peer_heights::Output::HeightsHeard(heard)) =
                        self.heights_step(to, peer_heights::Input::HeightsHeard)
                    && heard.awaiting == 0
                {
                    self.sync_step(
                        to,
                        Input::Tick {
                            highest_known: heard.highest,
                        },
                    );
                }
            }
            Event::Push { to, from, highest } => {
                if self.nodes[to].sync.is_some() {
                    let push = PushHeight {
                        peer: peer_id(from),
                        highest,
                    };
                    self.heights_step(to, peer_heights::Input::Push(push));
                    self.sync_step(to, Input::Pushed { index: highest });
                }
            }
            Event::Request {
                server,
                client,
                call,
                work,
            } => self.serve(server, client, call, work),
            Event::Served { server, client } => {
                let n = &mut self.nodes[server];
                n.serving_total -= 1;
                if let Some(count) = n.serving.get_mut(&client) {
                    *count -= 1;
                    if *count == 0 {
                        n.serving.remove(&client);
                    }
                }
            }
            Event::Reply {
                client,
                call,
                reply,
            } => self.replied(client, call, reply),
            Event::Timeout { client, call } => {
                if let Some(call) = self.nodes[client].calls.remove(&call) {
                    self.run.timeouts += 1;
                    self.failed_call(client, call, (Transfer::Timeout, Failure::Timeout));
                }
            }
            Event::AloneDeadline { client, call } => {
                if let Some((hedge, first)) = self.take_call(client, call, |c| c.alone.take()) {
                    self.release(client, &hedge, Transfer::Cancelled, 0);
                    self.end_alone(client, *first);
                }
            }
            Event::PartDue { client, call } => {
                if let Some((first, part)) = self.take_call(client, call, |c| c.held_part.take()) {
                    // Late by its own peer's measure: beaten by the part,
                    // if that passes its checks.
                    let transfer = match part.reply {
                        Reply::Data { valid: true, .. } if part.beats_first => Transfer::Late,
                        _ => Transfer::Cancelled,
                    };
                    self.release(client, &first, transfer, 0);
                    self.take_part(client, *part);
                }
            }
            Event::HedgeCheck { client, call } => self.hedge_check(client, call),
            Event::MoveCheck { client, call } => self.move_check(client, call),
            Event::Done {
                node,
                input,
                verified,
            } => {
                if let Some((kind, outcome, share)) = verified {
                    let hedging = &self.nodes[node].hedging;
                    hedging.answered(kind, outcome.peer, outcome.latency_ms, share);
                    self.heights_step(node, peer_heights::Input::Outcome(outcome));
                }
                self.sync_step(node, input);
            }
            Event::Applied { node, start, end } => {
                let n = &mut self.nodes[node];
                n.height = n.height.max(end);
                n.hedging.applied(n.height);
                if n.height >= self.settings.commits && n.synced_at_us.is_none() {
                    n.synced_at_us = Some(self.queue.now());
                }
                let applied = Input::Applied {
                    start,
                    last: commit_ref(end),
                    next_epoch: None,
                };
                self.sync_step(node, applied);
                self.push(node, end);
            }
        }
    }

    /// Feeds `input` to `node`'s StateSync core and carries out what it
    /// decides, as the actor's shell does.
    fn sync_step(&mut self, node: usize, input: Input) {
        let now = self.now();
        let Some(driver) = self.nodes[node].sync.as_mut() else {
            return;
        };
        let outputs = driver.step_at(now, input);
        for output in outputs {
            self.digest.update(&self.queue.now().to_le_bytes());
            self.digest.update(&(node as u64).to_le_bytes());
            self.digest.update(format!("{output:?}").as_bytes());
            self.carry_out(node, output);
        }
        let n = &mut self.nodes[node];
        let next = n.sync.as_ref().and_then(|d| d.core().next_retry(now));
        if let Some(at) = next
            && n.wake_at.is_none_or(|set| at < set)
        {
            n.wake_at = Some(at);
            let after = (at.0 * 1_000).saturating_sub(self.queue.now());
            self.queue.schedule(after, Event::Wake { node, at });
        }
    }

    fn carry_out(&mut self, node: usize, output: Output) {
        match output {
            Output::FetchCommits {
                task,
                wanted,
                avoid,
                prefetched,
            } => match prefetched {
                None => {
                    let work = Work::Commits {
                        task,
                        start: wanted.start,
                        end: wanted.end,
                    };
                    self.begin(node, work, avoid);
                }
                Some(ahead) => match self.nodes[node].ahead.remove(&ahead) {
                    // Certified as it arrived: only its link is checked.
                    Some(answer) if answer.valid => {
                        let input = self.commits_input(node, task, &answer);
                        let verified = Some(success(FetchKind::Commits, &answer));
                        let done = Event::Done {
                            node,
                            input,
                            verified,
                        };
                        self.queue.schedule(0, done);
                    }
                    // Its early check failed: checked in full now.
                    Some(answer) => {
                        let work = Work::Commits {
                            task,
                            start: answer.start,
                            end: answer.end,
                        };
                        self.verify(node, work, answer);
                    }
                    None => {
                        let gone = Failure::Local(LocalFailure::BatchGone);
                        let work = Work::Commits {
                            task,
                            start: wanted.start,
                            end: wanted.end,
                        };
                        self.finish(node, work, None, gone);
                    }
                },
            },
            Output::FetchCommitsAhead {
                task,
                start,
                end,
                avoid,
                ..
            } => self.begin(node, Work::Ahead { task, start, end }, avoid),
            Output::ForgetCommitsAhead { task } => {
                self.nodes[node].ahead.remove(&task);
            }
            Output::FetchBlocks {
                task,
                batch,
                len,
                avoid,
                ..
            } => {
                let end = self.nodes[node].batch_ends.get(&batch).copied();
                let work = Work::Blocks {
                    task,
                    batch,
                    end: end.unwrap_or(batch),
                    len: len as u64,
                };
                match end {
                    Some(_) => self.begin(node, work, avoid),
                    None => {
                        let gone = Failure::Local(LocalFailure::BatchGone);
                        self.finish(node, work, None, gone);
                    }
                }
            }
            Output::Apply { start } => match self.nodes[node].batch_ends.remove(&start) {
                Some(end) => {
                    self.queue.schedule(0, Event::Applied { node, start, end });
                }
                None => {
                    let error = ApplyError::BatchGone;
                    let done = Event::Done {
                        node,
                        input: Input::ApplyFailed { start, error },
                        verified: None,
                    };
                    self.queue.schedule(0, done);
                }
            },
            Output::Restarted { .. } => self.run.restarts += 1,
            Output::Misbehaved { peer } => self.judge(node, peer, OutcomeKind::InvalidData),
            Output::WithheldBlocks { peer } => self.judge(node, peer, OutcomeKind::Withheld),
            // The simulated chain is the only one with valid batches (no
            // peer here forges one a retired committee certified): the
            // commit is the one stored.
            Output::WithheldIfStored { peer, .. } => self.judge(node, peer, OutcomeKind::Withheld),
            Output::QueryHeights { peer } => {
                let (peers, connecting) = match peer {
                    Some(peer) => (self.sim.index_of(&peer).into_iter().collect(), true),
                    None => (self.sim.connections_of(node), false),
                };
                for to in peers {
                    let leg = self.leg(node, to);
                    let query = Event::Query {
                        from: node,
                        to,
                        connecting,
                        sent_us: self.queue.now(),
                    };
                    self.queue.schedule(leg, query);
                }
            }
            Output::Reset => self.nodes[node].ahead.clear(),
            Output::Discard { start } => {
                self.nodes[node].batch_ends.remove(&start);
            }
        }
    }

    /// Has `node`'s PeerHeights judge what `peer` did, as the StateSync
    /// shell reports it.
    fn judge(&mut self, node: usize, peer: PeerId, kind: OutcomeKind) {
        let outcome = ReportOutcome {
            peer,
            bytes: 0,
            latency_ms: 0,
            kind,
        };
        self.heights_step(node, peer_heights::Input::Outcome(outcome));
    }

    /// Feeds `input` to `node`'s PeerHeights core; a slot granted or
    /// refused goes to the fetch that waits for it, anything else is
    /// returned.
    fn heights_step(
        &mut self,
        node: usize,
        input: peer_heights::Input,
    ) -> Option<peer_heights::Output> {
        let now = self.now();
        let outputs = self.nodes[node].heights.as_mut()?.step_at(now, input);
        self.heights_outputs(node, outputs)
    }

    /// Carries out what `node`'s PeerHeights core output, as
    /// [`Self::heights_step`] says.
    fn heights_outputs(
        &mut self,
        node: usize,
        outputs: Vec<peer_heights::Output>,
    ) -> Option<peer_heights::Output> {
        let mut answer = None;
        for output in outputs {
            match output {
                peer_heights::Output::Granted { request, lease } => {
                    let Some((work, avoid, hedge_of)) = self.nodes[node].waiting.remove(&request)
                    else {
                        continue;
                    };
                    match hedge_of {
                        // The hedged call ended while its hedge waited: the
                        // slot is given back unused.
                        Some(first) if !self.nodes[node].calls.contains_key(&first) => {
                            self.give_back(node, lease);
                        }
                        _ => self.send(node, (work, avoid, hedge_of), lease),
                    }
                }
                peer_heights::Output::Refused { request, error } => {
                    match self.nodes[node].waiting.remove(&request) {
                        Some((_, _, Some(first))) => self.no_second_peer(node, first, error),
                        None => {}
                        Some((work, _, None)) => {
                            self.finish(node, work, None, Failure::from(error))
                        }
                    }
                }
                peer_heights::Output::Banned { .. } => self.run.bans += 1,
                other => answer = Some(other),
            }
        }
        answer
    }

    /// A worker begins: it asks for a slot on a peer for the work's range,
    /// waiting at most the request timeout.
    fn begin(&mut self, node: usize, work: Work, avoid: Vec<PeerId>) {
        self.acquire(node, (work, avoid, None));
    }

    /// Asks PeerHeights for a slot for `waiting`'s work.
    fn acquire(&mut self, node: usize, waiting: Waiting) {
        let (work, avoid) = (waiting.0, waiting.1.clone());
        let n = &mut self.nodes[node];
        n.next_request += 1;
        let request = n.next_request;
        n.waiting.insert(request, waiting);
        let (start, end) = work.range();
        let acquire = Acquire {
            request,
            start,
            end,
            kind: work.kind(),
            avoid,
            wait_ms: self.settings.timeout_ms,
            spare_only: false,
        };
        self.heights_step(node, peer_heights::Input::Acquire(acquire));
        if self.nodes[node].waiting.contains_key(&request) {
            let wait = self.ms_to_us(self.settings.timeout_ms);
            self.queue.schedule(wait, Event::HeightsTick { node });
        }
    }

    /// Sends the work's request to the leased peer, with its timeout; a
    /// call that is not a hedge is watched for lateness.
    fn send(&mut self, node: usize, (work, avoid, hedge_of): Waiting, lease: Lease) {
        let lease_peer = lease.peer;
        let Some(server) = self.sim.index_of(&lease.peer) else {
            return self.finish(node, work, None, Failure::Disconnected);
        };
        self.next_call += 1;
        let call = self.next_call;
        let sent_us = self.queue.now();
        let timeout = Duration::from_millis(self.settings.timeout_ms);
        let late_at_send = self.nodes[node].hedging.usual_delay(work.kind(), timeout);
        let entry = Call {
            work,
            lease,
            sent_us,
            avoid,
            hedge_of,
            hedge: None,
            hedged: false,
            unanswered: false,
            handed: false,
            past_hedge: false,
            alone: None,
            hedges_failed: Vec::new(),
            hedges_left: Vec::new(),
            ask_left: false,
            late_at_send,
            held_part: None,
        };
        let calls = &mut self.nodes[node].calls;
        calls.insert(call, entry);
        match hedge_of {
            Some(first) => {
                if let Some(first) = calls.get_mut(&first) {
                    first.hedge = Some(call);
                    // Left late, it stays left, as the worker's.
                    first
                        .hedges_left
                        .retain(|(p, late)| *p != lease_peer || *late);
                }
                self.run.hedges += 1;
                let check = self.move_wait(node, call);
                self.queue
                    .schedule(check, Event::MoveCheck { client: node, call });
            }
            None => {
                self.run.fetches += 1;
                let check = self.hedge_wait(node, work, 0);
                self.queue
                    .schedule(check, Event::HedgeCheck { client: node, call });
            }
        }
        let leg = self.leg(node, server);
        let request = Event::Request {
            server,
            client: node,
            call,
            work,
        };
        self.queue.schedule(leg, request);
        let timeout = self.ms_to_us(self.settings.timeout_ms);
        self.queue
            .schedule(timeout, Event::Timeout { client: node, call });
    }

    /// `server` answers call `call` of `client`, as its role has it.
    fn serve(&mut self, server: usize, client: usize, call: u64, work: Work) {
        let s = &self.settings;
        let (serve_slots, per_peer) = (s.serve_slots, s.serve_slots_per_peer);
        let leg = self.leg(server, client);
        let n = &mut self.nodes[server];
        let delay = match n.role {
            Role::Hostile(Hostile::Silent) => return,
            Role::Hostile(Hostile::Slow { delay_ms }) => delay_ms * 1_000,
            Role::Hostile(Hostile::Creeping) => self.just_before_hedge(client, call, leg),
            _ => 0,
        };
        let n = &mut self.nodes[server];
        let from_client = n.serving.get(&client).copied().unwrap_or(0);
        let refuses = n.role == Role::Hostile(Hostile::Busy);
        if refuses || n.serving_total >= serve_slots || from_client >= per_peer {
            let busy = Event::Reply {
                client,
                call,
                reply: Reply::Busy,
            };
            self.queue.schedule(leg, busy);
            return;
        }
        let reply = answer_to(work, n.height, &self.settings);
        let reply = match (n.role, reply) {
            (Role::Hostile(Hostile::Liar), Reply::Data { end, bytes, .. }) => Reply::Data {
                end,
                bytes,
                valid: false,
            },
            (Role::Hostile(Hostile::OneCommit), Reply::Data { .. }) => match work {
                Work::Commits { start, .. } | Work::Ahead { start, .. } => Reply::Data {
                    end: start,
                    bytes: s.commit_bytes + s.certifier_blocks * s.block_bytes,
                    valid: true,
                },
                Work::Blocks { .. } => reply,
            },
            (_, reply) => reply,
        };
        let bytes = match reply {
            Reply::Data { bytes, .. } => bytes,
            Reply::Busy | Reply::NotFound => 0,
        };
        n.serving_total += 1;
        *n.serving.entry(client).or_default() += 1;
        let now = self.queue.now();
        let start = now.max(n.upload_free_us);
        n.upload_free_us = start + bytes * 1_000_000 / self.settings.upload_bytes_per_s.max(1);
        let sent = n.upload_free_us - now;
        // A creeping server's hold counts its upload's wait too.
        let delay = match n.role {
            Role::Hostile(Hostile::Creeping) => delay.saturating_sub(sent),
            _ => delay,
        };
        self.queue.schedule(sent, Event::Served { server, client });
        let arrives = Event::Reply {
            client,
            call,
            reply,
        };
        self.queue.schedule(sent + leg + delay, arrives);
    }

    /// The answer to call `call` reaches `client`.
    fn replied(&mut self, client: usize, call: u64, reply: Reply) {
        let id = call;
        let Some(mut call) = self.nodes[client].calls.remove(&call) else {
            return;
        };
        // A hedge's part: held while its first call has the time its own
        // peer needs; past that, it beats the first peer if it may.
        let part = match reply {
            Reply::Data { end, .. } if end < call.work.end() => self.part_due(client, &call),
            _ => None,
        };
        let part_beats_first = match part {
            None => false,
            Some((due_us, beats_first)) if due_us <= self.queue.now() => beats_first,
            Some((due_us, beats_first)) => {
                let first = call.hedge_of.expect("only a hedge's part is held");
                let f = self.nodes[client]
                    .calls
                    .get_mut(&first)
                    .expect("found by part_due");
                f.held_part = Some(Box::new(HeldPart {
                    call: id,
                    hedge: call,
                    reply,
                    beats_first,
                }));
                self.run.parts_held += 1;
                let wait = due_us - self.queue.now();
                self.queue.schedule(
                    wait,
                    Event::PartDue {
                        client,
                        call: first,
                    },
                );
                return;
            }
        };
        // A first call answering while its hedge's part is held: the part
        // is dropped.
        if matches!(reply, Reply::Data { .. })
            && let Some(part) = call.held_part.take()
        {
            self.release(client, &part.hedge, Transfer::Cancelled, 0);
            self.run.parts_outrun += 1;
        }
        let peer = call.lease.peer;
        match reply {
            Reply::Busy => {
                if call.hedge_of.is_none() {
                    self.run.busy += 1;
                    let (start, _) = call.work.range();
                    let batch = self.settings.state_sync.commit_sync_batch_size;
                    let head = self.nodes[client].hedging.at_head(start, batch);
                    let alone = !call.past_hedge;
                    if head && alone && !call.handed && self.hand_on(client, &call) {
                        return;
                    }
                }
                let busy = Failure::Status {
                    code: RESOURCE_EXHAUSTED,
                };
                self.failed_call(client, call, (Transfer::Busy, busy));
            }
            Reply::NotFound => {
                // As the worker releases it: a NOT_FOUND for blocks is
                // an error until their batch is applied. The core is told
                // a plain NOT_FOUND, never judged: a simulated server's
                // height only grows and fetches are leased to peers
                // claiming the range, so none denies blocks it holds.
                let transfer = match call.work {
                    Work::Blocks { .. } => Transfer::Withheld,
                    Work::Commits { .. } | Work::Ahead { .. } => Transfer::NotFound,
                };
                self.failed_call(client, call, (transfer, Failure::NotFound));
            }
            Reply::Data { end, bytes, valid } => {
                // A hedge gone on alone: its first call's failure is judged
                // now, as the worker judges it aside.
                // Peers late hedges of the fetch moved on from.
                let mut left = late_only(std::mem::take(&mut call.hedges_left));
                if let Some(first) = call.alone.take() {
                    let (mut first, transfer, _) = *first;
                    self.release(client, &first, transfer, 0);
                    self.run.alone_answered += 1;
                    left = late_only(std::mem::take(&mut first.hedges_left));
                }
                // The first answer is kept; the other call is dropped, the
                // hedged peer released as late if this answer is whole.
                let asked = call.work.end();
                let whole = end >= asked;
                if !whole {
                    left.clear();
                }
                let other = call.hedge_of.or(call.hedge);
                if let Some(mut other) = other.and_then(|o| self.nodes[client].calls.remove(&o)) {
                    let transfer = match other.hedge_of {
                        None if whole || (part_beats_first && valid) => Transfer::Late,
                        _ => Transfer::Cancelled,
                    };
                    self.release(client, &other, transfer, 0);
                    if whole {
                        left.extend(late_only(std::mem::take(&mut other.hedges_left)));
                    }
                    // A hedge the first call's answer outran once it was
                    // late itself, whatever that answer holds.
                    let outwaited = other.hedge_of.is_some() && self.outwaited(client, &other);
                    if outwaited && !left.contains(&other.lease.peer) {
                        left.push(other.lease.peer);
                    }
                }
                // Never the peer whose answer this is.
                left.retain(|p| *p != peer);
                // Beaten by an answer that passes its checks, as the worker
                // reports them (`Worker::beaten`): the peers hedges left
                // only by an answer of all that was asked.
                if valid {
                    for peer in left {
                        let beaten = peer_heights::Input::Beaten(ReportBeaten { peer });
                        self.heights_step(client, beaten);
                    }
                }
                self.release(client, &call, Transfer::Received, bytes);
                let latency_ms = (self.queue.now() - call.sent_us) / 1_000;
                let (start, _) = call.work.range();
                let scored_bytes = match call.work.kind() {
                    FetchKind::Commits => (end - start + 1) * self.settings.commit_bytes,
                    FetchKind::Blocks => bytes,
                };
                let answer = Answer {
                    peer,
                    start,
                    end,
                    asked,
                    bytes,
                    scored_bytes,
                    latency_ms,
                    valid,
                };
                self.verify(client, call.work, answer);
            }
        }
    }

    /// For a part of an answer that the hedge `hedge` of `client` brought,
    /// while its first call is still out (as the worker has it,
    /// `Worker::hedged_on`): when the part is taken, once the first call
    /// has waited as long as its own peer needs (`Hedging::part_wait`,
    /// from when it was sent), in microseconds of virtual time, and
    /// whether the first peer, unanswered then, is beaten by it.
    fn part_due(&self, client: usize, hedge: &Call) -> Option<(u64, bool)> {
        let first = hedge.hedge_of.filter(|_| hedge.alone.is_none())?;
        let f = self.nodes[client].calls.get(&first)?;
        let timeout = Duration::from_millis(self.settings.timeout_ms);
        let hedging = &self.nodes[client].hedging;
        let part = hedging.part_wait((f.work.kind(), f.lease.peer), timeout, Duration::ZERO);
        Some((f.sent_us + part.wait.as_micros() as u64, part.beaten))
    }

    /// Call `call` of `client`, removed, with what `state` takes out of it,
    /// if it is still out and `state` finds something (a timer's event
    /// whose call has moved on does nothing).
    fn take_call<T>(
        &mut self,
        client: usize,
        call: u64,
        state: impl FnOnce(&mut Call) -> Option<T>,
    ) -> Option<(Call, T)> {
        let calls = &mut self.nodes[client].calls;
        let taken = state(calls.get_mut(&call)?)?;
        Some((calls.remove(&call).expect("found above"), taken))
    }

    /// A held part of an answer is taken: its hedge answers now, as if its
    /// first call had gone (released already).
    fn take_part(&mut self, client: usize, part: HeldPart) {
        self.nodes[client].calls.insert(part.call, part.hedge);
        self.replied(client, part.call, part.reply);
    }

    /// As the worker does (`Worker::hedged`): the fetch of `call`, one
    /// the pipeline waits on, refused as busy before its hedge delay
    /// ended, goes to the best other peer with room to spare and a slot
    /// free now, its slot released as busy. False if there is none.
    fn hand_on(&mut self, node: usize, call: &Call) -> bool {
        let mut avoid = call.avoid.clone();
        avoid.push(call.lease.peer);
        let Some(lease) = self.lease_now(node, call.work, avoid.clone(), true) else {
            return false;
        };
        self.release(node, call, Transfer::Busy, 0);
        let sent = self.next_call + 1;
        self.send(node, (call.work, avoid, None), lease);
        if let Some(handed) = self.nodes[node].calls.get_mut(&sent) {
            handed.handed = true;
        }
        true
    }

    /// A slot for `work` free now on the best peer not in `avoid` (with
    /// `spare_only`, on one with room to spare), if any: PeerHeights is
    /// asked with no wait, as the worker asks it.
    fn lease_now(
        &mut self,
        node: usize,
        work: Work,
        avoid: Vec<PeerId>,
        spare_only: bool,
    ) -> Option<Lease> {
        let n = &mut self.nodes[node];
        n.next_request += 1;
        let request = n.next_request;
        let (start, end) = work.range();
        let acquire = Acquire {
            request,
            start,
            end,
            kind: work.kind(),
            avoid,
            wait_ms: 0,
            spare_only,
        };
        let now = self.now();
        let heights = self.nodes[node].heights.as_mut()?;
        let mut outputs = heights.step_at(now, peer_heights::Input::Acquire(acquire));
        let ours = outputs.iter().position(|o| match o {
            peer_heights::Output::Granted { request: r, .. }
            | peer_heights::Output::Refused { request: r, .. } => *r == request,
            _ => false,
        });
        let ours = ours.map(|at| outputs.remove(at));
        self.heights_outputs(node, outputs);
        match ours {
            Some(peer_heights::Output::Granted { lease, .. }) => Some(lease),
            _ => None,
        }
    }

    /// How long until the hedge `call` of `node` may move on: its move
    /// delay from when it was sent (`Hedging::move_delay`), read again
    /// at most every [`HEAD_HEDGE_MIN`] as batches are applied, as the
    /// worker does; 0 once it may.
    fn move_wait(&self, node: usize, call: u64) -> u64 {
        let Some(c) = self.nodes[node].calls.get(&call) else {
            return 0;
        };
        let timeout = Duration::from_millis(self.settings.timeout_ms);
        let batch = self.settings.state_sync.commit_sync_batch_size;
        let at = (c.work.kind(), c.work.range().0);
        let hedging = &self.nodes[node].hedging;
        let delay = hedging.move_delay(at, batch, timeout, c.late_at_send);
        let elapsed = self.queue.now() - c.sent_us;
        let left = (delay.as_micros() as u64).saturating_sub(elapsed);
        left.min(HEAD_HEDGE_MIN.as_micros() as u64)
    }

    /// As the worker's late hedge does (`Worker::late_hedge`): once the
    /// hedge `call` of `client` may move on, it does so as soon as a slot
    /// is free on a peer not yet asked for its fetch with room to spare,
    /// or on any such peer once it has gone unanswered
    /// [`MOVE_ANYWHERE_AFTER_MOVE_DELAYS`] times its move delay, looked
    /// for every [`HEDGE_MIN`]: its call is dropped, its peer beaten by the answer
    /// that ends the race if that passes its checks, and the fetch asked
    /// of that peer. Each move leaves a peer for one never asked, so a
    /// fetch's hedge moves at most once per peer covering it. A hedge gone
    /// on alone that could move ends the fetch with its first call's
    /// failure instead, the slot found given back. (The hedge budget, and
    /// giving way to a hedge waiting for room, are not modelled.)
    fn move_check(&mut self, client: usize, call: u64) {
        let Some(hedge) = self.nodes[client].calls.get(&call) else {
            return;
        };
        let wait = self.move_wait(client, call);
        if wait > 0 {
            self.queue.schedule(wait, Event::MoveCheck { client, call });
            return;
        }
        let first = hedge.hedge_of.expect("only hedges move");
        let first_call = match &hedge.alone {
            Some(alone) => Some(&alone.0),
            None => self.nodes[client].calls.get(&first),
        };
        let Some(f) = first_call else {
            return;
        };
        let mut asked = f.avoid.clone();
        asked.push(f.lease.peer);
        asked.extend(&f.hedges_failed);
        asked.extend(f.hedges_left.iter().map(|(p, _)| *p));
        asked.push(hedge.lease.peer);
        let (work, alone) = (hedge.work, hedge.alone.is_some());
        // Only to a peer with room to spare until it has gone unanswered
        // long enough.
        let waited = Duration::from_micros(self.queue.now() - hedge.sent_us);
        let timeout = Duration::from_millis(self.settings.timeout_ms);
        let batch = self.settings.state_sync.commit_sync_batch_size;
        let at = (work.kind(), work.range().0);
        let hedging = &self.nodes[client].hedging;
        let delay = hedging.move_delay(at, batch, timeout, hedge.late_at_send);
        let spare_only = waited < delay * MOVE_ANYWHERE_AFTER_MOVE_DELAYS;
        let Some(lease) = self.lease_now(client, work, asked.clone(), spare_only) else {
            let again = HEDGE_MIN.as_micros() as u64;
            self.queue
                .schedule(again, Event::MoveCheck { client, call });
            return;
        };
        let mut hedge = self.nodes[client].calls.remove(&call).expect("found above");
        let late = self.outwaited(client, &hedge);
        self.release(client, &hedge, Transfer::Cancelled, 0);
        if alone {
            self.give_back(client, lease);
            if let Some(first) = hedge.alone.take() {
                self.end_alone(client, *first);
            }
            return;
        }
        self.run.hedges_moved += 1;
        if let Some(f) = self.nodes[client].calls.get_mut(&first) {
            f.hedge = None;
            f.hedges_left.push((hedge.lease.peer, late));
        }
        self.send(client, (work, asked, Some(first)), lease);
    }

    /// A call failed, its slot to be released as `transfer` says. A hedge
    /// that fails is asked of another peer in its place (not of one a
    /// hedge of the fetch failed on), or, gone on alone itself, ends the
    /// fetch with its first call's failure. A first call
    /// that fails, not by timing out, while its hedge is out and not late
    /// leaves the hedge to go on alone until it is late, at most until the
    /// first call's own deadline, its own release held until the hedge
    /// ends, as the worker does
    /// (`Worker::hedged_on`); any other ends the fetch, and its hedge is
    /// dropped.
    fn failed_call(
        &mut self,
        client: usize,
        mut call: Call,
        (transfer, failure): (Transfer, Failure),
    ) {
        // A first call that fails while its hedge's part is held: its
        // failure is judged aside, and the part is the fetch's answer.
        if let Some(part) = call.held_part.take() {
            self.release(client, &call, transfer, 0);
            return self.take_part(client, *part);
        }
        if let Some(first) = call.hedge_of {
            self.release(client, &call, transfer, 0);
            if let Some(f) = self.nodes[client].calls.get_mut(&first) {
                // Another peer is asked in its place, as the worker does.
                f.hedge = None;
                f.hedged = false;
                f.hedges_failed.push(call.lease.peer);
                self.run.hedges_asked_again += 1;
                self.hedge_check(client, first);
            } else if let Some(first) = call.alone.take() {
                self.end_alone(client, *first);
            }
            return;
        }
        let hedge = call
            .hedge
            .filter(|h| self.nodes[client].calls.contains_key(h));
        // Until the hedge is late itself, at most until the first call's
        // deadline; a hedge late already is not left alone.
        let timeout = self.ms_to_us(self.settings.timeout_ms);
        let late_us = self.nodes[client]
            .hedging
            .usual_delay(call.work.kind(), Duration::from_micros(timeout))
            .as_micros() as u64;
        let now = self.queue.now();
        let late_at = hedge
            .and_then(|h| self.nodes[client].calls.get(&h))
            .map(|h| h.sent_us + late_us);
        if let (Some(hedge), Some(late_at)) = (hedge, late_at)
            && late_at > now
            && !matches!(failure, Failure::Timeout)
        {
            self.run.hedges_alone += 1;
            let deadline = (call.sent_us + timeout).min(late_at) - now;
            let ended = Event::AloneDeadline {
                client,
                call: hedge,
            };
            self.queue.schedule(deadline, ended);
            if let Some(h) = self.nodes[client].calls.get_mut(&hedge) {
                h.alone = Some(Box::new((call, transfer, failure)));
            }
            return;
        }
        self.release(client, &call, transfer, 0);
        if let Some(hedge) = hedge.and_then(|h| self.nodes[client].calls.remove(&h)) {
            self.release(client, &hedge, Transfer::Cancelled, 0);
        }
        self.finish(client, call.work, Some(call.lease.peer), failure);
    }

    /// A hedge gone on alone ended unanswered: its first call's slot goes
    /// back as its failure says, and the fetch ends with that failure.
    fn end_alone(&mut self, client: usize, (first, transfer, failure): (Call, Transfer, Failure)) {
        self.release(client, &first, transfer, 0);
        self.finish(client, first.work, Some(first.lease.peer), failure);
    }

    /// How long a creeping server holds its answer to call `call` of
    /// `client`, `leg` away, for it to arrive a millisecond before the
    /// call's hedge delay ends (at once if that has passed).
    fn just_before_hedge(&self, client: usize, call: u64, leg: u64) -> u64 {
        let Some(c) = self.nodes[client].calls.get(&call) else {
            return 0;
        };
        let timeout = Duration::from_millis(self.settings.timeout_ms);
        let hedging = &self.nodes[client].hedging;
        let at = (c.work.kind(), c.work.range().0);
        let delay = hedging.delay(at, self.settings.state_sync.commit_sync_batch_size, timeout);
        let arrives = c.sent_us + delay.as_micros() as u64 - 1_000;
        arrives.saturating_sub(self.queue.now() + leg)
    }

    /// How long until a call for `work`, sent `elapsed_us` ago, is checked
    /// again: its hedge delay, read afresh at most every
    /// [`HEAD_HEDGE_MIN`], as the worker does.
    fn hedge_wait(&mut self, node: usize, work: Work, elapsed_us: u64) -> u64 {
        let timeout = Duration::from_millis(self.settings.timeout_ms);
        let batch = self.settings.state_sync.commit_sync_batch_size;
        let at = (work.kind(), work.range().0);
        let delay = self.nodes[node].hedging.delay(at, batch, timeout);
        let longest = &mut self.run.longest_hedge_delay_ms;
        *longest = (*longest).max(delay.as_millis() as u64);
        let left = (delay.as_micros() as u64).saturating_sub(elapsed_us);
        left.min(HEAD_HEDGE_MIN.as_micros() as u64)
    }

    /// Hedges call `call` of `client` if it is still unanswered past its
    /// delay: a second peer is asked for the same range.
    fn hedge_check(&mut self, client: usize, call: u64) {
        let now = self.queue.now();
        let Some(c) = self.nodes[client].calls.get(&call) else {
            return;
        };
        if c.hedged {
            return;
        }
        let (work, elapsed) = (c.work, now - c.sent_us);
        let wait = self.hedge_wait(client, work, elapsed);
        if wait > 0 {
            let check = Event::HedgeCheck { client, call };
            self.queue.schedule(wait, check);
            return;
        }
        let c = self.nodes[client]
            .calls
            .get_mut(&call)
            .expect("checked above");
        (c.hedged, c.past_hedge) = (true, true);
        let mut avoid = c.avoid.clone();
        avoid.push(c.lease.peer);
        avoid.extend(&c.hedges_failed);
        if !c.ask_left {
            avoid.extend(c.hedges_left.iter().map(|(p, _)| *p));
        }
        self.acquire(client, (work, avoid, Some(call)));
    }

    /// No second peer for the hedge of call `first`: none covers the
    /// range, or none had a slot free in time. As the worker does
    /// (`Worker::second_peer`, `Worker::acquire_passing_over`): with no
    /// peer but those hedges moved away from, one of those is asked at
    /// once; otherwise one is looked for again after [`HEDGE_MIN`], and a
    /// commit fetch still unanswered [`UNANSWERED_DOUBT`] after it was
    /// sent has its peer's claim doubted.
    fn no_second_peer(&mut self, node: usize, first: u64, error: AcquireError) {
        let now = self.queue.now();
        let Some(c) = self.nodes[node].calls.get_mut(&first) else {
            return;
        };
        c.hedged = false;
        if error == AcquireError::NoPeer && !c.hedges_left.is_empty() && !c.ask_left {
            c.ask_left = true;
            return self.hedge_check(node, first);
        }
        c.ask_left = false;
        let unanswered = now - c.sent_us >= UNANSWERED_DOUBT.as_micros() as u64;
        if c.work.kind() == FetchKind::Commits && !c.unanswered && unanswered {
            c.unanswered = true;
            let lease = c.lease.id;
            self.heights_step(node, peer_heights::Input::Unanswered { lease });
        }
        let again = HEDGE_MIN.as_micros() as u64;
        let check = Event::HedgeCheck {
            client: node,
            call: first,
        };
        self.queue.schedule(again, check);
    }

    /// Whether the hedge `hedge` of `node` has gone unanswered as long as
    /// makes its peer late (`Hedging::late_after`, from its value when it
    /// was sent).
    fn outwaited(&self, node: usize, hedge: &Call) -> bool {
        let timeout = Duration::from_millis(self.settings.timeout_ms);
        let hedging = &self.nodes[node].hedging;
        let late = hedging.late_after(hedge.work.kind(), timeout, hedge.late_at_send);
        Duration::from_micros(self.queue.now() - hedge.sent_us) >= late
    }

    /// A slot leased for a call never sent goes back unused.
    fn give_back(&mut self, node: usize, lease: Lease) {
        let release = Release {
            lease: lease.id,
            transfer: Transfer::Cancelled,
            bytes: 0,
            latency_ms: 0,
        };
        self.heights_step(node, peer_heights::Input::Release(release));
    }

    /// The worker's slot goes back, with how the transfer went.
    fn release(&mut self, node: usize, call: &Call, transfer: Transfer, bytes: u64) {
        let release = Release {
            lease: call.lease.id,
            transfer,
            bytes,
            latency_ms: (self.queue.now() - call.sent_us) / 1_000,
        };
        self.heights_step(node, peer_heights::Input::Release(release));
    }

    /// Verifies `answer` on the node's verification queue, then hands the
    /// result to the core. An answer fetched ahead is certified as it
    /// arrives and held; whatever that finds is judged at its turn.
    fn verify(&mut self, node: usize, work: Work, answer: Answer) {
        let s = &self.settings;
        let cost = match work {
            Work::Commits { .. } | Work::Ahead { .. } => s.verify_us_per_batch,
            Work::Blocks { len, .. } => len * s.verify_us_per_block,
        };
        let now = self.queue.now();
        let n = &mut self.nodes[node];
        n.verifier_free_us = n.verifier_free_us.max(now) + cost;
        let after = n.verifier_free_us - now;
        let (input, verified) = match work {
            Work::Ahead { task, .. } => {
                self.nodes[node].ahead.insert(task, answer);
                let input = Input::CommitsPrefetched {
                    task,
                    peer: Some(answer.peer),
                    result: Ok(answer.bytes),
                };
                (input, None)
            }
            _ if !answer.valid => {
                self.run.invalid += 1;
                let lie = Failure::Invalid(soma_types::Error::Malformed("a forged answer".into()));
                (failed(work, Some(answer.peer), lie), None)
            }
            Work::Commits { task, .. } => {
                let input = self.commits_input(node, task, &answer);
                (input, Some(success(FetchKind::Commits, &answer)))
            }
            Work::Blocks { task, .. } => {
                let input = Input::BlocksFetched {
                    task,
                    peer: Some(answer.peer),
                    result: Ok(answer.bytes),
                };
                (input, Some(success(FetchKind::Blocks, &answer)))
            }
        };
        let done = Event::Done {
            node,
            input,
            verified,
        };
        self.queue.schedule(after, done);
    }

    /// A verified commit batch: its end is kept for its block fetches and
    /// its write.
    fn commits_input(&mut self, node: usize, task: TaskId, answer: &Answer) -> Input {
        self.nodes[node].batch_ends.insert(answer.start, answer.end);
        let count = answer.end - answer.start + 1;
        let info = CommitBatchInfo {
            start: answer.start,
            end: answer.end,
            last: commit_ref(answer.end),
            epoch: 0,
            block_count: (count * self.settings.blocks_per_commit) as usize,
            bytes: answer.bytes,
            certifier_blocks: self.settings.certifier_blocks as usize,
            certifier_bytes: self.settings.certifier_blocks * self.settings.block_bytes,
        };
        Input::CommitsFetched {
            task,
            peer: Some(answer.peer),
            result: Ok(info),
        }
    }

    /// A worker ends with `failure`, as soon as the core can hear it.
    fn finish(&mut self, node: usize, work: Work, peer: Option<PeerId>, failure: Failure) {
        let done = Event::Done {
            node,
            input: failed(work, peer, failure),
            verified: None,
        };
        self.queue.schedule(0, done);
    }

    /// Tells the peers `node`'s PeerHeights knows to be behind that it
    /// holds `index`.
    fn push(&mut self, node: usize, index: CommitIndex) {
        let behind = peer_heights::Input::PeersBehind(PeersBehind { index });
        let Some(peer_heights::Output::Peers(peers)) = self.heights_step(node, behind) else {
            return;
        };
        for peer in peers {
            let Some(to) = self.sim.index_of(&peer) else {
                continue;
            };
            let leg = self.leg(node, to);
            let push = Event::Push {
                to,
                from: node,
                highest: index,
            };
            self.queue.schedule(leg, push);
        }
    }
}

/// The peers of `left` (peers hedges moved on from) that were late when
/// left: those an answer beats.
fn late_only(left: Vec<(PeerId, bool)>) -> Vec<PeerId> {
    left.into_iter()
        .filter(|(_, late)| *late)
        .map(|(p, _)| p)
        .collect()
}

/// What an honest server holding `height` commits sends for `work`.
fn answer_to(work: Work, height: CommitIndex, settings: &SyncSettings) -> Reply {
    match work {
        Work::Commits { start, end, .. } | Work::Ahead { start, end, .. } => {
            if height < start {
                return Reply::NotFound;
            }
            let end = end.min(height);
            let bytes = (end - start + 1) * settings.commit_bytes
                + settings.certifier_blocks * settings.block_bytes;
            Reply::Data {
                end,
                bytes,
                valid: true,
            }
        }
        Work::Blocks { end, len, .. } => {
            if height < end {
                return Reply::NotFound;
            }
            Reply::Data {
                end,
                bytes: len * settings.block_bytes,
                valid: true,
            }
        }
    }
}

/// The core's input for `work` ended by `failure`.
fn failed(work: Work, peer: Option<PeerId>, failure: Failure) -> Input {
    match work {
        Work::Commits { task, .. } => Input::CommitsFetched {
            task,
            peer,
            result: Err(failure),
        },
        Work::Ahead { task, .. } => Input::CommitsPrefetched {
            task,
            peer,
            result: Err(failure),
        },
        Work::Blocks { task, .. } => Input::BlocksFetched {
            task,
            peer,
            result: Err(failure),
        },
    }
}

/// The score of a transfer whose data passed verification.
fn success(kind: FetchKind, answer: &Answer) -> Verified {
    // Of the commits asked, those answered; a block fetch comes whole.
    let share = match kind {
        FetchKind::Commits => (
            answer.end - answer.start + 1,
            answer.asked - answer.start + 1,
        ),
        FetchKind::Blocks => (1, 1),
    };
    let delivered = (answer.scored_bytes, answer.latency_ms);
    let outcome = ReportOutcome::delivered((kind, answer.peer), delivered, share);
    (kind, outcome, share)
}

/// A transfer whose data passed verification: its kind, its score, and
/// the share of what was asked that it brought.
type Verified = (FetchKind, ReportOutcome, (u64, u64));
