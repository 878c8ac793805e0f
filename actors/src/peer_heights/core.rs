use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use soma_types::{ChainId, CommitIndex, PeerId};

use super::messages::*;
use crate::{Core, Time};

/// Recent failures (each success halves the count) from which a peer keeps
/// failing: it ranks below every peer with fewer, measured or not.
const FAILING_AT: u32 = 3;
/// Failure count at which a peer's weight stops halving.
const MAX_FAILURES: u32 = 16;
/// How long, in milliseconds, a peer's failures count in full after its
/// last one: each such span since halves the failures it is ranked by.
/// Only a verified answer lowers the count itself, and a peer failing
/// for its faults is asked only while no other peer can serve the range,
/// so without this a peer that failed a few times at once (our own link
/// down for a timeout, say) would never be asked again while others can
/// serve: peers that answer valid data slowly could then keep every fetch
/// for as long as they stay connected. The span doubles for every
/// [`FAILING_AT`] failures since the peer's last verified answer, up to
/// [`MAX_FAILURE_DECAY_DOUBLINGS`] times, so that a peer that keeps
/// failing is tried less and less often.
const FAILURE_DECAY_MS: u64 = 8_000;
/// The most times [`FAILURE_DECAY_MS`] doubles (to 64 s).
const MAX_FAILURE_DECAY_DOUBLINGS: u32 = 3;
/// Throughput, in bytes per second, from which a measured peer is good: a
/// peer never measured is tried after every good peer and before measured
/// peers slower than this, so the first peer measured, however slow, cannot
/// starve the rest of ever being tried. Also the weight of unmeasured peers
/// among themselves.
pub const GOOD_THROUGHPUT_BPS: u64 = 1 << 20;
/// The same for commit fetches. A commit answer carries commits, not their
/// blocks (in the benchmarks' chains a 250-byte commit names 4 blocks of
/// 1.6 KB), so an honest server's commit answers move a small part of the
/// bytes its block answers do: 200 commits in 100 ms are 500 KB/s. Held to
/// the blocks' mark, honest peers would be slow for commit fetches, and a
/// peer never measured, such as a fresh identity, asked before them.
pub const GOOD_COMMIT_THROUGHPUT_BPS: u64 = GOOD_THROUGHPUT_BPS / 16;
/// Randomness added to balancer weights, in percent.
const JITTER_PERCENT: u64 = 20;
/// How long, in milliseconds, the claim of a peer that failed a commit
/// fetch is doubted above where the fetch started, the first time: as long
/// as state sync waits before asking again when no peer holds a range.
/// Each further failure, with no commit answer above it between, doubles
/// it, up to [`MAX_DOUBT_MS`].
const DOUBT_MS: u64 = 1_000;
/// The longest doubt: none of the failures that raise one proves a lie,
/// and an honest peer kept busy by others must still be asked now and
/// then.
const MAX_DOUBT_MS: u64 = 8_000;
/// How long, in milliseconds, a peer may refuse our commit fetches as
/// busy, with no commit answer between starting where the first refused
/// fetch did or above, before its claim is doubted. Longer than a node's default `fetch-stall-timeout`
/// (500 ms), after which a new fetch takes the slot of an answer its
/// client does not read: an honest node whose slots attackers fill serves
/// us within it, and a node that was only loaded for a moment is not
/// doubted for it.
const BUSY_GRACE_MS: u64 = DOUBT_MS;
/// How long, in milliseconds, a refusal as busy, while the peer served no
/// other fetch of ours, first ranks it with the failing ones (not held
/// back: it is loaded, not at fault); each such refusal in a row, with no
/// verified answer from it between, doubles that, up to
/// [`MAX_LOADED_MS`]; then its measures rank it again. A refusal is no
/// failure: counted as one, a few of them ranked a saturated validator
/// below every peer able to serve, until an answer from it, which it was
/// then asked for only when those were full; peers that answer each
/// commit fetch at once with one commit are never full, and a node among
/// them was left a commit per round trip (docs/simulation.md, "One-commit
/// peers"). The doubling keeps identities that refuse every fetch, and
/// never answer one, from being asked again each second for free.
const LOADED_MS: u64 = DOUBT_MS;
/// The longest a run of refusals as busy ranks a peer with the failing
/// ones: an honest peer others keep busy is still asked now and then.
const MAX_LOADED_MS: u64 = MAX_DOUBT_MS;

/// PeerHeights settings, and the seed of its RNG.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Config {
    /// The chain we are on; peers on another chain are kept out of answers.
    pub chain_id: ChainId,
    /// How long a peer that sent invalid data stays banned, in milliseconds.
    pub ban_duration_ms: u64,
    /// Seed of the balancer's randomness.
    pub seed: u64,
    /// Connected peers tracked at most; when one more connects, the peer
    /// heard from longest ago is forgotten.
    #[serde(default = "default_max_tracked_peers")]
    pub max_tracked_peers: usize,
    /// Bans kept at most (at least one); beyond, the ban that ends first is
    /// lifted early. Kept apart from tracked peers, so no flood of peers
    /// lifts a ban. Doubts on claims are kept apart likewise, as many at
    /// most.
    #[serde(default = "default_max_bans")]
    pub max_bans: usize,
    /// Fetches leased on one peer at once at most: a node serves each peer
    /// only so many (its `max-concurrent-fetches-per-peer`, 4 by default)
    /// and refuses the rest, which would cost a retry and the peer's score.
    #[serde(default = "default_max_fetches_per_peer")]
    pub max_fetches_per_peer: usize,
    /// Requests for a slot that wait at most; more are refused as busy.
    #[serde(default = "default_max_waiting_fetches")]
    pub max_waiting_fetches: usize,
}

fn default_max_tracked_peers() -> usize {
    1024
}

fn default_max_bans() -> usize {
    4096
}

fn default_max_fetches_per_peer() -> usize {
    4
}

fn default_max_waiting_fetches() -> usize {
    64
}

/// Everything a PeerHeights core is made from: its settings and, after a
/// restart, what must outlive the failed incarnation (the bans, the doubts
/// on claims, and the leases of fetches still running). Heights and
/// scores start empty.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Init {
    /// Settings.
    #[serde(flatten)]
    pub config: Config,
    /// Bans, with when each ends.
    #[serde(default)]
    pub bans: Vec<(PeerId, Time)>,
    /// Fetch slots held by fetches still running.
    #[serde(default)]
    pub leases: Vec<Lease>,
    /// The next lease id.
    #[serde(default)]
    pub next_lease: u64,
    /// Doubts on claims, by peer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub doubts: Vec<(PeerId, Doubt)>,
    /// Leases among `leases` whose peer's claim was doubted while they went
    /// unanswered.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub doubted_leases: Vec<u64>,
}

impl From<Config> for Init {
    fn from(config: Config) -> Self {
        Init {
            config,
            bans: Vec::new(),
            leases: Vec::new(),
            next_lease: 0,
            doubts: Vec::new(),
            doubted_leases: Vec::new(),
        }
    }
}

impl Config {
    /// Settings with the default ban of 60 s and the default bounds.
    pub fn new(chain_id: ChainId, seed: u64) -> Self {
        Config {
            chain_id,
            ban_duration_ms: Duration::from_secs(60).as_millis() as u64,
            seed,
            max_tracked_peers: default_max_tracked_peers(),
            max_bans: default_max_bans(),
            max_fetches_per_peer: default_max_fetches_per_peer(),
            max_waiting_fetches: default_max_waiting_fetches(),
        }
    }
}

/// A connected peer: its claim and its score.
#[derive(Clone, Debug)]
struct Peer {
    /// `None` until the peer answers an availability query (a PushCommit
    /// tells only a height); such a peer is in no sync answer.
    chain_id: Option<ChainId>,
    highest: CommitIndex,
    /// The highest it has claimed since it connected: what a denial is
    /// judged against. A node's highest synced commit never goes down, so
    /// a lower claim is no excuse for denying what it claimed before.
    most: CommitIndex,
    lowest: CommitIndex,
    throughput: Throughput,
    /// Its failures, halved by each verified answer: ranked by as they
    /// fade ([`Peer::failures_at`]).
    failures: u32,
    /// When it last failed.
    failed_at: Time,
    /// Its failures since its last verified answer: how slowly they fade.
    unanswered: u32,
    /// Outcomes held against it since it connected (never decays).
    faults: u64,
    /// When it connected or last reported a height: the stalest peer is
    /// the one forgotten when the table is full.
    heard: Time,
    /// Fetches it serves us at once, learned from its refusals (`None`:
    /// `max_fetches_per_peer`); see [`Transfer::Busy`].
    slots: Option<usize>,
    /// Until when it ranks as failing for its last refusal as busy.
    loaded_until: Time,
    /// Its refusals as busy in a row, while it served no other fetch of
    /// ours, since its last verified answer.
    refusals: u32,
}

/// Whether a claim in doubt counts as doubted when peers are ranked for a
/// range.
#[derive(Clone, Copy)]
enum Doubts {
    /// Only what it is credited with counts.
    Count,
    /// Its whole claim counts: for the last resort.
    Ignore,
}

/// The doubt on a peer's claim: a commit fetch it failed without a
/// provable lie leaves its claim above where the fetch started neither
/// counted nor leased for a while. Its point and count outlive the doubt
/// itself (they say which answer ends the doubling), the peer's connection
/// and a restart.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Doubt {
    /// The claim above this commit is doubted (or was, last).
    pub above: CommitIndex,
    /// Until when, while it is doubted.
    pub until: Option<Time>,
    /// Commit fetches it failed with no commit answer above `above`
    /// since: how long the next doubt lasts.
    pub count: u32,
    /// When it first refused a commit fetch of ours as busy, in a run no
    /// commit answer from it has ended yet (a run that lasts 1 s doubts the claim).
    #[serde(default)]
    pub busy_since: Option<Time>,
    /// The lowest start of the commit fetches it refused in that run: only
    /// a commit answer starting there or above ends it, which a peer
    /// claiming what it lacks cannot give by serving what it holds.
    #[serde(default)]
    pub busy_above: CommitIndex,
}

impl Peer {
    fn connected(now: Time) -> Self {
        Peer {
            chain_id: None,
            highest: 0,
            most: 0,
            lowest: 0,
            throughput: Throughput::default(),
            failures: 0,
            failed_at: Time(0),
            unanswered: 0,
            faults: 0,
            heard: now,
            slots: None,
            loaded_until: Time(0),
            refusals: 0,
        }
    }

    /// A peer connecting again: its record as `left` had it (how it
    /// served, failed and refused, and what it is learnt to serve at
    /// once), its heights unknown until it states them. Its faults, which
    /// never fade (one failure ranks a peer that never delivered as
    /// failing), start afresh: its failures, which fade, carry over.
    fn with_record_of(self, left: Peer) -> Self {
        Peer {
            throughput: left.throughput,
            failures: left.failures,
            failed_at: left.failed_at,
            unanswered: left.unanswered,
            slots: left.slots,
            loaded_until: left.loaded_until,
            refusals: left.refusals,
            ..self
        }
    }

    /// The highest commit it claims that counts for `kind`, under
    /// `doubt`: for a commit fetch, and for the highest known, its claim
    /// or less while a commit fetch it failed leaves the rest in doubt;
    /// for a block fetch (of commits already certified), its claim. A
    /// denial is judged on the whole claim either way.
    fn credited(&self, doubt: Option<&Doubt>, kind: FetchKind) -> CommitIndex {
        match (kind, doubt) {
            (FetchKind::Commits, Some(d)) if d.until.is_some() => self.highest.min(d.above),
            _ => self.highest,
        }
    }

    /// Whether it claims `start..=end`, as a denial is judged: from its
    /// lowest (which never goes down) to the most it has claimed since it
    /// connected. Claiming less to escape a judgement gives up the range
    /// for as long as it stays connected.
    fn claims(&self, start: CommitIndex, end: CommitIndex) -> bool {
        self.chain_id.is_some() && start <= end && self.lowest <= start && end <= self.most
    }

    /// Where the balancer ranks it for a fetch of `kind` at `now` before
    /// weights count: by its record, but with the failing peers for
    /// [`LOADED_MS`] after it refused us as busy.
    fn standing(&self, kind: FetchKind, now: Time) -> Standing {
        match self.record(kind, now) {
            standing if self.loaded_until <= now => standing,
            _ => Standing::Failing,
        }
    }

    /// Where its measures for `kind`, its failures at `now` and its faults
    /// rank it.
    fn record(&self, kind: FetchKind, now: Time) -> Standing {
        match self.throughput.of(kind) {
            _ if self.failures_at(now) >= FAILING_AT => Standing::Failing,
            // Never delivered, and already failed: it has shown nothing else.
            None if self.faults > 0 => Standing::Failing,
            None => Standing::Unmeasured,
            Some(_) if self.weight(kind, now) >= good(kind) => Standing::Good,
            Some(_) => Standing::Slow,
        }
    }

    /// Its weight within its standing for a fetch of `kind` at `now`:
    /// throughput halved per recent failure.
    fn weight(&self, kind: FetchKind, now: Time) -> u64 {
        let throughput = self.throughput.of(kind).unwrap_or(GOOD_THROUGHPUT_BPS);
        (throughput >> self.failures_at(now).min(MAX_FAILURES)).max(1)
    }

    /// Its failures as they count at `now`: halved for every
    /// [`FAILURE_DECAY_MS`] (doubled per [`FAILING_AT`] failures since its
    /// last verified answer) since its last failure.
    fn failures_at(&self, now: Time) -> u32 {
        let doublings = (self.unanswered / FAILING_AT).min(MAX_FAILURE_DECAY_DOUBLINGS);
        let span = FAILURE_DECAY_MS << doublings;
        let halvings = now.0.saturating_sub(self.failed_at.0) / span;
        u32::try_from(halvings)
            .ok()
            .and_then(|h| self.failures.checked_shr(h))
            .unwrap_or(0)
    }

    /// One failure more, at `now`.
    fn fail(&mut self, now: Time) {
        self.failures = (self.failures + 1).min(MAX_FAILURES);
        self.unanswered = self.unanswered.saturating_add(1);
        self.failed_at = now;
    }
}

/// The throughput from which a peer measured for `kind` is good.
pub(super) fn good(kind: FetchKind) -> u64 {
    match kind {
        FetchKind::Commits => GOOD_COMMIT_THROUGHPUT_BPS,
        FetchKind::Blocks => GOOD_THROUGHPUT_BPS,
    }
}

/// A peer's throughput, in bytes per second, measured apart for each kind
/// of fetch: a peer may serve blocks fast and commits a few at a time
/// (see [`ReportOutcome::delivered`]), and its block answers must not rank
/// it for commit fetches.
#[derive(Clone, Copy, Debug, Default)]
struct Throughput {
    commits: Option<u64>,
    blocks: Option<u64>,
}

impl Throughput {
    /// What it is ranked by for a fetch of `kind`: its measure for that
    /// kind, or until it has one, its measure for the other.
    fn of(&self, kind: FetchKind) -> Option<u64> {
        match kind {
            FetchKind::Commits => self.commits.or(self.blocks),
            FetchKind::Blocks => self.blocks.or(self.commits),
        }
    }

    /// Adds a sample of `kind`: a moving average, weight 1/4 on the new
    /// sample.
    fn add(&mut self, kind: FetchKind, sample: u64) {
        let rate = match kind {
            FetchKind::Commits => &mut self.commits,
            FetchKind::Blocks => &mut self.blocks,
        };
        *rate = Some(match *rate {
            Some(old) => (old.saturating_mul(3) / 4).saturating_add(sample / 4),
            None => sample,
        });
    }
}

/// Balancer tiers, worst first: a peer never measured is tried after every
/// good peer (measured at [`GOOD_THROUGHPUT_BPS`] or more, for commit
/// fetches [`GOOD_COMMIT_THROUGHPUT_BPS`]) and before the
/// slower measured ones; a failing peer after all others.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Standing {
    Failing,
    Slow,
    Unmeasured,
    Good,
}

/// The logic of PeerHeights.
///
/// Only peers with a live authenticated connection are tracked: a peer
/// Connections dialled, whose certificate proved its id, that answered a
/// first call, and that has not been reported disconnected since (the
/// [`Input::Connected`] and [`Input::Remove`] inputs). A caller that reached
/// our server without our dialling it is authenticated too, but is not
/// tracked: we hold no client to fetch from it, and tracking every such
/// caller would let any number of identities fill the table. Reports of
/// peers not tracked are ignored.
pub struct PeerHeightsCore {
    config: Config,
    /// Exactly the connected peers (at most `max_tracked_peers`).
    peers: BTreeMap<PeerId, Peer>,
    /// Bans outlive disconnections, so a banned peer cannot reconnect its
    /// way out; at most `max_bans`.
    bans: BTreeMap<PeerId, Time>,
    /// Fetch slots taken, by lease id.
    leases: BTreeMap<u64, Lease>,
    next_lease: u64,
    /// Requests waiting for a slot, oldest first (at most
    /// `max_waiting_fetches`).
    waiting: VecDeque<Waiter>,
    /// Doubts on peers' claims, connected or not, so a peer cannot shed
    /// one by reconnecting; at most `max_bans`, as bans.
    doubts: BTreeMap<PeerId, Doubt>,
    /// The records of peers that left (measures, failures, refusals), by
    /// when they left, so a peer cannot shed them by
    /// reconnecting either: it comes back as it left, not unmeasured. At
    /// most `max_bans`, the earliest to leave forgotten first. Heights are
    /// not kept: a peer states them afresh on each connection.
    departed: BTreeMap<PeerId, Peer>,
    /// Commit fetches whose peer's claim was doubted while they went
    /// unanswered ([`Input::Unanswered`]), and still are: the doubt lasts
    /// while they do. A subset of `leases`.
    doubted_leases: BTreeSet<u64>,
    rng: ChaCha8Rng,
}

/// A request for a slot that found every eligible peer busy.
#[derive(Clone, Debug)]
struct Waiter {
    request: Acquire,
    until: Time,
}

impl Core for PeerHeightsCore {
    const NAME: &'static str = "peer_heights";
    type Init = Init;
    type Input = Input;
    type Output = Output;

    fn new(init: Init) -> Self {
        let mut core = PeerHeightsCore {
            rng: ChaCha8Rng::seed_from_u64(init.config.seed),
            config: init.config,
            peers: BTreeMap::new(),
            bans: BTreeMap::new(),
            leases: init.leases.into_iter().map(|l| (l.id, l)).collect(),
            next_lease: init.next_lease,
            waiting: VecDeque::new(),
            doubts: init.doubts.into_iter().collect(),
            doubted_leases: init.doubted_leases.into_iter().collect(),
            departed: BTreeMap::new(),
        };
        // Only leases carried over can be held doubted.
        let leases = &core.leases;
        core.doubted_leases.retain(|id| leases.contains_key(id));
        for (peer, until) in init.bans {
            core.ban(peer, until);
        }
        core
    }

    fn handle(&mut self, now: Time, input: Input) -> Vec<Output> {
        // A push from a peer not tracked changes nothing, and any caller
        // may push as often as its rate allows: it costs no pass over the
        // bans and the waiting requests (the next input makes that pass).
        if let Input::Push(PushHeight { peer, .. }) = &input
            && !self.peers.contains_key(peer)
        {
            return vec![];
        }
        self.bans.retain(|_, until| *until > now);
        // A doubt lasts at least as long as a commit fetch doubted while
        // unanswered stays so.
        let holding = self.holding();
        for (id, d) in &mut self.doubts {
            if d.until.is_some_and(|until| until <= now) && !holding.contains(id) {
                d.until = None;
            }
        }
        let mut out = self.expire_waiters(now);
        out.extend(self.input(now, input));
        self.serve_waiters(now, &mut out);
        out
    }
}

/// Inserts `peer` at `time` into `map`, which holds at most `max`
/// entries: when full, the entry of the earliest time goes first.
fn insert_bounded(map: &mut BTreeMap<PeerId, Time>, (peer, time): (PeerId, Time), max: usize) {
    if !map.contains_key(&peer) && map.len() >= max {
        let earliest = map.iter().min_by_key(|(_, t)| **t).map(|(id, _)| *id);
        if let Some(id) = earliest {
            map.remove(&id);
        }
    }
    map.insert(peer, time);
}

impl PeerHeightsCore {
    fn input(&mut self, now: Time, input: Input) -> Vec<Output> {
        match input {
            Input::Connected { peer } => {
                self.connected(now, peer);
                vec![]
            }
            Input::Update(u) => {
                let mut outputs = vec![];
                if let Some(p) = self.peers.get_mut(&u.peer) {
                    let ours = self.config.chain_id;
                    if u.chain_id != ours && p.chain_id.is_none() {
                        outputs.push(Output::OtherChain {
                            peer: u.peer,
                            chain_id: u.chain_id,
                        });
                    }
                    // The answer is the peer's claim now, its highest lower
                    // or not. Its lowest never goes down while it stays
                    // connected: a node deletes what it pruned, so a claim
                    // below it again is a lie to be leased fetches it
                    // denied (or an answer overtaken by a later one).
                    p.chain_id = Some(u.chain_id);
                    p.highest = u.highest;
                    p.most = p.most.max(u.highest);
                    p.lowest = p.lowest.max(u.lowest);
                    p.heard = now;
                }
                outputs
            }
            Input::Push(PushHeight { peer, highest }) => {
                if let Some(p) = self.peers.get_mut(&peer) {
                    p.highest = p.highest.max(highest);
                    p.most = p.most.max(highest);
                    p.heard = now;
                }
                vec![]
            }
            Input::Remove(RemovePeer { peer }) => {
                self.depart(now, peer);
                vec![]
            }
            Input::HighestKnown => vec![Output::HighestKnown(self.highest_known())],
            Input::HeightsHeard => vec![Output::HeightsHeard(HeardHeights {
                highest: self.highest_known(),
                awaiting: self.peers.values().filter(|p| p.chain_id.is_none()).count(),
            })],
            Input::PeersForRange(PeersForRange { start, end }) => {
                vec![Output::Peers(self.peers_for_range(
                    now,
                    FetchKind::Commits,
                    start,
                    end,
                    Doubts::Count,
                ))]
            }
            Input::PeersBehind(PeersBehind { index }) => vec![Output::Peers(
                self.eligible()
                    .filter(|(_, p)| p.highest < index)
                    .map(|(id, _)| *id)
                    .collect(),
            )],
            Input::CoversRange(CoversRange {
                kind,
                start,
                end,
                avoid,
            }) => vec![Output::Claims(
                !self.candidates(now, (kind, start, end), &avoid).is_empty(),
            )],
            Input::ClaimsRange(ClaimsRange { peer, start, end }) => vec![Output::Claims(
                self.peers.get(&peer).is_some_and(|p| p.claims(start, end)),
            )],
            Input::Outcome(o) => self.outcome(now, o),
            Input::Snapshot => vec![Output::Snapshot(self.snapshot())],
            Input::CountPeers => vec![Output::Counts(self.counts())],
            Input::Acquire(request) => self.acquire(now, request).into_iter().collect(),
            Input::Release(r) => self.release(now, r),
            Input::Beaten(ReportBeaten { peer }) => {
                self.beaten(now, peer);
                vec![]
            }
            Input::Unanswered { lease } => {
                if let Some(l) = self.leases.get(&lease).copied()
                    && l.kind == FetchKind::Commits
                    && self.doubted_leases.insert(lease)
                {
                    self.doubt(now, &l);
                }
                vec![]
            }
            Input::Tick => vec![],
        }
    }

    /// The chain this node is on.
    pub fn chain_id(&self) -> ChainId {
        self.config.chain_id
    }

    /// The bans in force, for a restart to carry over.
    pub fn bans(&self) -> Vec<(PeerId, Time)> {
        self.bans.iter().map(|(p, t)| (*p, *t)).collect()
    }

    /// The init a restarted core is made from: the same settings, the
    /// bans, and the leases of fetches still running.
    pub fn restart_init(&self) -> Init {
        Init {
            config: self.config.clone(),
            bans: self.bans(),
            leases: self.leases.values().copied().collect(),
            next_lease: self.next_lease,
            doubts: self.doubts.iter().map(|(p, d)| (*p, *d)).collect(),
            doubted_leases: self.doubted_leases.iter().copied().collect(),
        }
    }

    /// The peers not in `avoid` a fetch of `kind` of commits `start..=end`
    /// may be leased on, best first.
    fn candidates(
        &mut self,
        now: Time,
        (kind, start, end): (FetchKind, CommitIndex, CommitIndex),
        avoid: &[PeerId],
    ) -> Vec<PeerId> {
        let mut ranked = |doubts| {
            let peers = self.peers_for_range(now, kind, start, end, doubts);
            peers.into_iter().filter(|p| !avoid.contains(p)).collect()
        };
        let counted: Vec<PeerId> = ranked(Doubts::Count);
        if !counted.is_empty() {
            return counted;
        }
        // A claim in doubt is asked as the last resort, as a failing peer
        // is: when no other peer covers the range. An honest server whose
        // slots an attacker fills refuses us as busy and is doubted, and
        // it may be the only one that holds what we lack; it still counts
        // for nothing in the highest known.
        ranked(Doubts::Ignore)
    }

    /// Fetches leased on `peer` now.
    fn leased(&self, peer: &PeerId) -> usize {
        self.leases.values().filter(|l| l.peer == *peer).count()
    }

    /// The best peer for `request` with a free slot: `Ok(None)` when peers
    /// can serve it but every one is busy.
    fn choose(&mut self, now: Time, request: &Acquire) -> Result<Option<PeerId>, AcquireError> {
        let (kind, start, end) = (request.kind, request.start, request.end);
        let ranked = self.candidates(now, (kind, start, end), &request.avoid);
        let Some(best) = ranked.first() else {
            return Err(AcquireError::NoPeer);
        };
        // Failing for its faults (timeouts, errors) or for being beaten by
        // other peers, not for load: a peer failing only for refusing as
        // busy lately is only loaded.
        let faulty = |peer: &PeerId| {
            (self.peers.get(peer)).is_none_or(|p| p.record(request.kind, now) == Standing::Failing)
        };
        let settle_for_faulty = faulty(best);
        // Room to spare: its slots whole (none lost refusing us as busy, or
        // earned back), and the best standing of the peers not avoided that
        // cover the range, if that is good or unmeasured (once any is good,
        // a peer never measured may be a silent one).
        let standing = |peer: &PeerId| (self.peers.get(peer)).map(|p| p.standing(kind, now));
        let top = standing(best).filter(|s| *s >= Standing::Unmeasured);
        let spare = |peer: &PeerId| {
            let unrefused = (self.peers.get(peer)).is_some_and(|p| p.slots.is_none());
            !request.spare_only || (unrefused && top.is_some() && standing(peer) == top)
        };
        Ok(ranked
            .iter()
            .find(|p| self.leased(p) < self.slots(p) && spare(p))
            // A peer failing for its faults is asked only when no other can
            // serve the range: while one can, the request waits for its
            // slot. Else a peer that never answers takes a fetch whenever
            // the good ones are full, and holds it for a whole timeout each
            // time. A peer failing only for refusing as busy is not held
            // back: it is loaded, and its slots already shrank.
            .filter(|p| settle_for_faulty || !faulty(p))
            .copied())
    }

    /// Fetches `peer` may be leased at once: `max_fetches_per_peer`, or
    /// fewer once it refused some as busy.
    fn slots(&self, peer: &PeerId) -> usize {
        let max = self.config.max_fetches_per_peer.max(1);
        self.peers
            .get(peer)
            .and_then(|p| p.slots)
            .map_or(max, |s| s.clamp(1, max))
    }

    fn grant(&mut self, request: &Acquire, peer: PeerId) -> Output {
        let lease = Lease {
            id: self.next_lease,
            peer,
            start: request.start,
            end: request.end,
            kind: request.kind,
        };
        self.next_lease += 1;
        self.leases.insert(lease.id, lease);
        Output::Granted {
            request: request.request,
            lease,
        }
    }

    fn acquire(&mut self, now: Time, request: Acquire) -> Option<Output> {
        let refuse = |error| Output::Refused {
            request: request.request,
            error,
        };
        match self.choose(now, &request) {
            Err(e) => Some(refuse(e)),
            Ok(Some(peer)) => Some(self.grant(&request, peer)),
            // No wait asked for (a slot free now or none), or no room to
            // wait in.
            Ok(None)
                if request.wait_ms == 0
                    || self.waiting.len() >= self.config.max_waiting_fetches =>
            {
                Some(refuse(AcquireError::Busy))
            }
            Ok(None) => {
                let until = now.after(Duration::from_millis(request.wait_ms));
                self.waiting.push_back(Waiter { request, until });
                None
            }
        }
    }

    /// Refuses the waiting requests whose wait is over.
    fn expire_waiters(&mut self, now: Time) -> Vec<Output> {
        let (expired, waiting): (VecDeque<Waiter>, VecDeque<Waiter>) =
            std::mem::take(&mut self.waiting)
                .into_iter()
                .partition(|w| w.until <= now);
        self.waiting = waiting;
        expired
            .into_iter()
            .map(|w| Output::Refused {
                request: w.request.request,
                error: AcquireError::Busy,
            })
            .collect()
    }

    /// Grants waiting requests, oldest first, whatever slots are free now;
    /// refuses those no peer can serve any more.
    fn serve_waiters(&mut self, now: Time, out: &mut Vec<Output>) {
        let mut still = VecDeque::new();
        while let Some(w) = self.waiting.pop_front() {
            match self.choose(now, &w.request) {
                Err(error) => out.push(Output::Refused {
                    request: w.request.request,
                    error,
                }),
                Ok(Some(peer)) => out.push(self.grant(&w.request, peer)),
                Ok(None) => still.push_back(w),
            }
        }
        self.waiting = still;
    }

    fn release(&mut self, now: Time, r: Release) -> Vec<Output> {
        let Some(lease) = self.leases.remove(&r.lease) else {
            return vec![];
        };
        if lease.kind == FetchKind::Commits {
            self.doubted_leases.remove(&lease.id);
            self.judge_claim(now, &lease, r.transfer);
        }
        let kind = match r.transfer {
            Transfer::Busy => {
                // It was serving the fetches still leased to it: its slots
                // learn how many. Serving none, it serves us nothing for
                // now: it ranks with the failing peers for a while, with no
                // fault and no failure (see [`LOADED_MS`]).
                let serving = self.leased(&lease.peer);
                if let Some(p) = self.peers.get_mut(&lease.peer) {
                    p.slots = Some(serving.max(1));
                    if serving == 0 {
                        let doubled = LOADED_MS << p.refusals.min(8);
                        let loaded = doubled.min(MAX_LOADED_MS);
                        p.loaded_until = now.after(Duration::from_millis(loaded));
                        p.refusals = p.refusals.saturating_add(1);
                    }
                }
                return vec![];
            }
            Transfer::Late => {
                self.beaten(now, lease.peer);
                return vec![];
            }
            Transfer::Timeout => OutcomeKind::Timeout,
            Transfer::Error => OutcomeKind::Error,
            // Judged later ([`OutcomeKind::Withheld`]); an error for now.
            Transfer::Withheld => OutcomeKind::Error,
            Transfer::NotFound => OutcomeKind::NotFound {
                start: lease.start,
                end: lease.end,
            },
            Transfer::Received | Transfer::Cancelled => return vec![],
        };
        self.outcome(
            now,
            ReportOutcome {
                peer: lease.peer,
                bytes: r.bytes,
                latency_ms: r.latency_ms,
                kind,
            },
        )
    }

    /// `peer` was beaten by another peer's answer: one failure, no fault
    /// (slow is not silent).
    fn beaten(&mut self, now: Time, peer: PeerId) {
        if let Some(p) = self.peers.get_mut(&peer) {
            p.fail(now);
        }
    }

    /// Judges a peer's claim on how a commit fetch leased on it ended
    /// (`lease` is no longer counted among its leases). An error status,
    /// no answer in time, or refusals as busy for [`BUSY_GRACE_MS`] while
    /// it served no other fetch of ours prove no lie, but leave its claim
    /// above where the fetch started in doubt ([`PeerHeightsCore::doubt`]).
    /// A refusal as busy while it served others of ours says only that we
    /// sent too many (its slots learn it), and an answer later than a
    /// hedge's that another peer covered the range. An answer starting
    /// above where it was last doubted ends the doubt and its doubling;
    /// one starting where a run of refusals as busy did, or above, ends
    /// the run.
    fn judge_claim(&mut self, now: Time, lease: &Lease, transfer: Transfer) {
        match transfer {
            Transfer::Received => {
                let Some(d) = self.doubts.get_mut(&lease.peer) else {
                    return;
                };
                if lease.start > d.above {
                    (d.until, d.count) = (None, 0);
                }
                if lease.start >= d.busy_above {
                    d.busy_since = None;
                }
                if (d.until, d.count, d.busy_since) == (None, 0, None) {
                    self.doubts.remove(&lease.peer);
                }
            }
            Transfer::Timeout | Transfer::Error => self.doubt(now, lease),
            // Busy with none of our other fetches: a peer refusing so may
            // be loaded, maybe by an attacker filling its slots, and it may
            // be the only one to hold what we lack (doubting it at once
            // would lower the highest known to what we hold, and stop the
            // catch-up for the doubt's length each time). It is doubted
            // only once it has refused so for [`BUSY_GRACE_MS`] without
            // serving the commits refused: a loaded node serves them within
            // it, a peer claiming what it lacks never does. Each such doubt
            // needs a run of its own, so an attacker keeping an honest
            // node's slots full must win a whole grace each time.
            Transfer::Busy if self.leased(&lease.peer) == 0 => {
                let d = self.doubt_entry(lease.peer);
                if d.busy_since.is_none() {
                    d.busy_above = lease.start;
                }
                let since = *d.busy_since.get_or_insert(now);
                d.busy_above = d.busy_above.min(lease.start);
                if since.after(Duration::from_millis(BUSY_GRACE_MS)) <= now {
                    d.busy_since = None;
                    self.doubt(now, lease);
                }
            }
            _ => {}
        }
    }

    /// A commit fetch asks for commits nobody has shown to exist, on a
    /// peer's claim: `lease`'s peer has not answered it, or answered with
    /// a failure that proves no lie. Its claim above where the fetch
    /// started is in doubt: not counted in the highest known, nor leased
    /// for commit fetches, for [`DOUBT_MS`], doubled by each further
    /// failure up to [`MAX_DOUBT_MS`] until it answers a commit fetch
    /// above that point. Else a peer claiming far more than it holds, and
    /// refusing each fetch in a way that proves nothing, is never banned
    /// and keeps the highest known, and the fetches planned from it, where
    /// no honest peer is. An honest peer doubted so is asked for those
    /// commits a little later, or another peer is.
    fn doubt(&mut self, now: Time, lease: &Lease) {
        let d = self.doubt_entry(lease.peer);
        let ms = (DOUBT_MS << d.count.min(8)).min(MAX_DOUBT_MS);
        d.count = d.count.saturating_add(1);
        let above = lease.start.saturating_sub(1);
        d.above = if d.until.is_some() {
            d.above.min(above)
        } else {
            above
        };
        let until = now.after(Duration::from_millis(ms));
        d.until = Some(d.until.map_or(until, |was| was.max(until)));
    }

    /// The doubt kept on `peer`'s claim, made room for if new: at most
    /// `max_bans` are kept.
    fn doubt_entry(&mut self, peer: PeerId) -> &mut Doubt {
        if !self.doubts.contains_key(&peer) && self.doubts.len() >= self.config.max_bans {
            // The first of the doubts that end first (ended ones first),
            // in id order, so the choice is replayable; one held by an
            // unanswered fetch last, whatever its time says.
            let holding = self.holding();
            let first = (self.doubts.iter())
                .min_by_key(|(id, d)| (holding.contains(id), d.until))
                .map(|(id, _)| *id);
            if let Some(id) = first {
                self.doubts.remove(&id);
            }
        }
        self.doubts.entry(peer).or_default()
    }

    /// Peers with a commit fetch doubted while unanswered, still so.
    fn holding(&self) -> BTreeSet<PeerId> {
        (self.doubted_leases.iter())
            .filter_map(|id| self.leases.get(id).map(|l| l.peer))
            .collect()
    }

    fn connected(&mut self, now: Time, peer: PeerId) {
        if let Some(p) = self.peers.get_mut(&peer) {
            p.heard = now;
            return;
        }
        if self.peers.len() >= self.config.max_tracked_peers {
            // The first minimum in id order, so the choice is replayable.
            let stalest = self
                .peers
                .iter()
                .min_by_key(|(_, p)| p.heard)
                .map(|(id, _)| *id);
            if let Some(id) = stalest {
                self.depart(now, id);
            }
        }
        if self.peers.len() < self.config.max_tracked_peers {
            let record = match self.departed.remove(&peer) {
                Some(left) => Peer {
                    heard: now,
                    ..Peer::connected(now).with_record_of(left)
                },
                None => Peer::connected(now),
            };
            self.peers.insert(peer, record);
        }
    }

    /// `peer` is no longer tracked; its record is kept with the others of
    /// peers that left.
    fn depart(&mut self, now: Time, peer: PeerId) {
        let Some(mut record) = self.peers.remove(&peer) else {
            return;
        };
        record.heard = now;
        if self.departed.len() >= self.config.max_bans.max(1) {
            // The first to leave (ties: the first in id order).
            let earliest = (self.departed.iter())
                .min_by_key(|(_, p)| p.heard)
                .map(|(id, _)| *id);
            if let Some(id) = earliest {
                self.departed.remove(&id);
            }
        }
        self.departed.insert(peer, record);
    }

    /// Peers on our chain and not banned.
    fn eligible(&self) -> impl Iterator<Item = (&PeerId, &Peer)> {
        self.peers.iter().filter(|(id, p)| {
            p.chain_id == Some(self.config.chain_id) && !self.bans.contains_key(id)
        })
    }

    fn highest_known(&self) -> Option<CommitIndex> {
        (self.eligible())
            .map(|(id, p)| p.credited(self.doubts.get(id), FetchKind::Commits))
            .max()
    }

    /// The PeerBalancer order: by standing (measured, then never measured,
    /// then failing), then by weight times up to 20% seeded randomness so
    /// load spreads over peers of similar speed.
    fn peers_for_range(
        &mut self,
        now: Time,
        kind: FetchKind,
        start: CommitIndex,
        end: CommitIndex,
        doubts: Doubts,
    ) -> Vec<PeerId> {
        let doubt = |id: &PeerId| match doubts {
            Doubts::Count => self.doubts.get(id),
            Doubts::Ignore => None,
        };
        let candidates: Vec<(Standing, u64, PeerId)> = self
            .eligible()
            .filter(|(id, p)| p.lowest <= start && p.credited(doubt(id), kind) >= end)
            .map(|(id, p)| (p.standing(kind, now), p.weight(kind, now), *id))
            .collect();
        let mut ranked: Vec<(Standing, u128, PeerId)> = candidates
            .into_iter()
            .map(|(standing, weight, id)| {
                let jitter = 100 + self.rng.random_range(0..=JITTER_PERCENT);
                (standing, u128::from(weight) * u128::from(jitter), id)
            })
            .collect();
        ranked.sort_by(|a, b| b.cmp(a));
        ranked.into_iter().map(|(_, _, id)| id).collect()
    }

    fn outcome(&mut self, now: Time, o: ReportOutcome) -> Vec<Output> {
        let lie = match o.kind {
            OutcomeKind::InvalidData => true,
            // Denying commits it claims to hold is lying about its height.
            OutcomeKind::NotFound { start, end } => self
                .peers
                .get(&o.peer)
                .is_some_and(|p| p.claims(start, end)),
            OutcomeKind::Withheld => true,
            OutcomeKind::Success(_) | OutcomeKind::Timeout | OutcomeKind::Error => false,
        };
        let mut outputs = Vec::new();
        if lie {
            let until = now.after(Duration::from_millis(self.config.ban_duration_ms));
            self.ban(o.peer, until);
            outputs.push(Output::Banned {
                peer: o.peer,
                until,
            });
        }
        if let Some(p) = self.peers.get_mut(&o.peer) {
            let failed = match o.kind {
                OutcomeKind::Success(kind) => {
                    let sample = o.bytes.saturating_mul(1000) / o.latency_ms.max(1);
                    p.throughput.add(kind, sample);
                    p.failures /= 2;
                    p.unanswered = 0;
                    (p.loaded_until, p.refusals) = (Time(0), 0);
                    // Probe for the slot it refused, one answer at a time.
                    let max = self.config.max_fetches_per_peer.max(1);
                    p.slots = p.slots.map(|s| s + 1).filter(|s| *s < max);
                    false
                }
                // Asked below its lowest, it pruned since its claim: no fault.
                OutcomeKind::NotFound { start, .. } => lie || start >= p.lowest,
                // Counted when it answered.
                OutcomeKind::Withheld => false,
                OutcomeKind::Timeout | OutcomeKind::Error | OutcomeKind::InvalidData => true,
            };
            if failed {
                p.fail(now);
                p.faults += 1;
            }
        }
        outputs
    }

    fn ban(&mut self, peer: PeerId, until: Time) {
        insert_bounded(&mut self.bans, (peer, until), self.config.max_bans);
    }

    /// The banned and doubted peers a snapshot would show, counted
    /// without building it (an input, as the snapshot is, so that bans and
    /// doubts past their end are dropped first).
    fn counts(&self) -> PeerCounts {
        let doubted = (self.peers.keys())
            .filter(|id| self.doubts.get(*id).is_some_and(|d| d.until.is_some()))
            .count();
        PeerCounts {
            banned: self.bans.len(),
            doubted,
        }
    }

    fn snapshot(&self) -> Vec<PeerView> {
        let mut views: BTreeMap<PeerId, PeerView> = self
            .peers
            .iter()
            .map(|(id, p)| {
                let view = PeerView {
                    peer: *id,
                    connected: true,
                    chain_id: p.chain_id,
                    highest: p.highest,
                    lowest: p.lowest,
                    doubted_above: (self.doubts.get(id)).and_then(|d| d.until.map(|_| d.above)),
                    throughput_bps: p.throughput.of(FetchKind::Blocks).unwrap_or(0),
                    commit_throughput_bps: p.throughput.of(FetchKind::Commits).unwrap_or(0),
                    failures: p.failures,
                    busy_slots: p.slots,
                    faults: p.faults,
                    banned_until: self.bans.get(id).copied(),
                };
                (*id, view)
            })
            .collect();
        for (id, until) in &self.bans {
            views.entry(*id).or_insert(PeerView {
                peer: *id,
                connected: false,
                chain_id: None,
                highest: 0,
                lowest: 0,
                doubted_above: None,
                throughput_bps: 0,
                commit_throughput_bps: 0,
                failures: 0,
                busy_slots: None,
                faults: 0,
                banned_until: Some(*until),
            });
        }
        views.into_values().collect()
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
        PeerHeightsCore::new(Config::new(OURS, seed).into())
    }

    fn connect(c: &mut PeerHeightsCore, now: Time, p: u8) -> Vec<Output> {
        c.handle(now, Input::Connected { peer: peer(p) })
    }

    fn update(c: &mut PeerHeightsCore, p: u8, chain: ChainId, lowest: u64, highest: u64) {
        let out = c.handle(
            Time(0),
            Input::Update(UpdateHeight {
                peer: peer(p),
                chain_id: chain,
                highest,
                lowest,
            }),
        );
        // A peer's first answer of another chain is told (tested below).
        assert!(
            out.iter().all(|o| matches!(o, Output::OtherChain { .. })),
            "{out:?}"
        );
    }

    /// A peer connects and answers an availability query.
    fn join(c: &mut PeerHeightsCore, p: u8, chain: ChainId, lowest: u64, highest: u64) {
        assert_eq!(connect(c, Time(0), p), vec![]);
        update(c, p, chain, lowest, highest);
    }

    fn push(c: &mut PeerHeightsCore, now: Time, p: u8, highest: u64) {
        let out = c.handle(
            now,
            Input::Push(PushHeight {
                peer: peer(p),
                highest,
            }),
        );
        assert_eq!(out, vec![]);
    }

    fn remove(c: &mut PeerHeightsCore, now: Time, p: u8) {
        let out = c.handle(now, Input::Remove(RemovePeer { peer: peer(p) }));
        assert_eq!(out, vec![]);
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

    /// The snapshot, checked against the counts metrics read instead.
    fn snapshot(c: &mut PeerHeightsCore, now: Time) -> Vec<PeerView> {
        let views = match c.handle(now, Input::Snapshot).pop() {
            Some(Output::Snapshot(s)) => s,
            other => panic!("unexpected {other:?}"),
        };
        let counted = |f: fn(&PeerView) -> bool| views.iter().filter(|v| f(v)).count();
        let counts = PeerCounts {
            banned: counted(|v| v.banned_until.is_some()),
            doubted: counted(|v| v.doubted_above.is_some()),
        };
        assert_eq!(c.handle(now, Input::CountPeers), [Output::Counts(counts)]);
        views
    }

    /// Each tracked or banned peer as (id byte, connected, lowest, highest,
    /// failures, banned until).
    fn table(c: &mut PeerHeightsCore, now: Time) -> Vec<(u8, bool, u64, u64, u32, Option<u64>)> {
        snapshot(c, now)
            .into_iter()
            .map(|v| {
                (
                    v.peer.0[0],
                    v.connected,
                    v.lowest,
                    v.highest,
                    v.failures,
                    v.banned_until.map(|t| t.0),
                )
            })
            .collect()
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

    /// Peer `p` answered a commit fetch with `bytes` in `ms`.
    fn succeeded(c: &mut PeerHeightsCore, now: Time, p: u8, bytes: u64, ms: u64) -> Vec<Output> {
        outcome(
            c,
            now,
            p,
            OutcomeKind::Success(FetchKind::Commits),
            bytes,
            ms,
        )
    }

    fn not_found(c: &mut PeerHeightsCore, now: Time, p: u8, start: u64, end: u64) -> Vec<Output> {
        outcome(c, now, p, OutcomeKind::NotFound { start, end }, 0, 5)
    }

    /// A connected peer's first answer naming another chain is told once
    /// (the shell warns: every peer saying so is a wrong genesis); later
    /// answers, answers of our chain, and a peer not connected are not.
    #[test]
    fn a_peers_first_answer_of_another_chain_is_told_once() {
        let mut c = core(1);
        let answer = |c: &mut PeerHeightsCore, p: u8, chain_id| {
            c.handle(
                Time(0),
                Input::Update(UpdateHeight {
                    peer: peer(p),
                    chain_id,
                    highest: 10,
                    lowest: 1,
                }),
            )
        };
        assert_eq!(answer(&mut c, 1, THEIRS), vec![], "not connected");
        connect(&mut c, Time(0), 1);
        connect(&mut c, Time(0), 2);
        let told = vec![Output::OtherChain {
            peer: peer(1),
            chain_id: THEIRS,
        }];
        assert_eq!(answer(&mut c, 1, THEIRS), told);
        assert_eq!(answer(&mut c, 1, THEIRS), vec![], "once per connection");
        assert_eq!(answer(&mut c, 2, OURS), vec![]);
        // Connected again: told again.
        c.handle(Time(0), Input::Remove(RemovePeer { peer: peer(1) }));
        connect(&mut c, Time(0), 1);
        assert_eq!(answer(&mut c, 1, THEIRS), told);
    }

    #[test]
    fn highest_known_is_the_max_over_peers() {
        let mut c = core(1);
        assert_eq!(highest(&mut c, Time(0)), None);
        join(&mut c, 1, OURS, 1, 50);
        join(&mut c, 2, OURS, 1, 80);
        assert_eq!(highest(&mut c, Time(0)), Some(80));
    }

    fn heard(c: &mut PeerHeightsCore) -> HeardHeights {
        match c.handle(Time(0), Input::HeightsHeard).pop() {
            Some(Output::HeightsHeard(h)) => h,
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn heights_heard_counts_the_connected_peers_not_answered_yet() {
        let mut c = core(1);
        let expect = |highest, awaiting| HeardHeights { highest, awaiting };
        assert_eq!(heard(&mut c), expect(None, 0));
        for p in 1..=3 {
            assert_eq!(connect(&mut c, Time(0), p), vec![]);
        }
        assert_eq!(heard(&mut c), expect(None, 3));
        update(&mut c, 2, OURS, 1, 50);
        assert_eq!(heard(&mut c), expect(Some(50), 2));
        // A peer of another chain has answered too; its claim counts for
        // nothing.
        update(&mut c, 1, THEIRS, 1, 900);
        assert_eq!(heard(&mut c), expect(Some(50), 1));
        // A push is no answer: the peer is still awaited.
        push(&mut c, Time(0), 3, 70);
        assert_eq!(heard(&mut c), expect(Some(50), 1));
        // One that leaves before answering is no longer awaited.
        remove(&mut c, Time(0), 3);
        assert_eq!(heard(&mut c), expect(Some(50), 0));
        join(&mut c, 4, OURS, 1, 60);
        assert_eq!(heard(&mut c), expect(Some(60), 0));
    }

    #[test]
    fn availability_answer_replaces_the_claim_even_downwards() {
        let mut c = core(1);
        join(&mut c, 1, OURS, 10, 100);
        join(&mut c, 2, OURS, 1, 70);
        update(&mut c, 1, OURS, 40, 60);
        assert_eq!(
            table(&mut c, Time(0)),
            vec![(1, true, 40, 60, 0, None), (2, true, 1, 70, 0, None)]
        );
        assert_eq!(highest(&mut c, Time(0)), Some(70));
        assert_eq!(for_range(&mut c, Time(0), 61, 70), vec![peer(2)]);
    }

    #[test]
    fn a_peers_lowest_never_goes_down_while_it_stays_connected() {
        let mut c = core(1);
        join(&mut c, 1, OURS, 10, 100);
        update(&mut c, 1, OURS, 40, 120);
        update(&mut c, 1, OURS, 1, 130);
        assert_eq!(table(&mut c, Time(0)), vec![(1, true, 40, 130, 0, None)]);
        assert_eq!(for_range(&mut c, Time(0), 39, 50), Vec::<PeerId>::new());
        // A new connection starts afresh.
        remove(&mut c, Time(0), 1);
        join(&mut c, 1, OURS, 1, 130);
        assert_eq!(table(&mut c, Time(0)), vec![(1, true, 1, 130, 0, None)]);
    }

    #[test]
    fn push_only_raises_the_claim() {
        let mut c = core(1);
        join(&mut c, 1, OURS, 1, 10);
        push(&mut c, Time(0), 1, 40);
        push(&mut c, Time(0), 1, 30);
        assert_eq!(table(&mut c, Time(0)), vec![(1, true, 1, 40, 0, None)]);
        assert_eq!(highest(&mut c, Time(0)), Some(40));
        // The next availability answer is the claim again, lower or not.
        update(&mut c, 1, OURS, 1, 20);
        assert_eq!(highest(&mut c, Time(0)), Some(20));
    }

    #[test]
    fn other_chain_peers_are_kept_out_of_every_answer() {
        let mut c = core(1);
        join(&mut c, 1, THEIRS, 1, 1_000);
        join(&mut c, 2, OURS, 1, 10);
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
        join(&mut c, 1, OURS, 1, 10);
        connect(&mut c, Time(0), 9);
        // Peer 9's chain is unknown: tracked, but in no answer.
        push(&mut c, Time(0), 9, 1_000);
        assert_eq!(highest(&mut c, Time(0)), Some(10));
        assert!(for_range(&mut c, Time(0), 1, 500).is_empty());
        update(&mut c, 9, OURS, 1, 20);
        assert_eq!(highest(&mut c, Time(0)), Some(20));
    }

    #[test]
    fn reports_of_peers_not_connected_are_ignored() {
        let mut c = core(1);
        update(&mut c, 5, OURS, 1, 100);
        push(&mut c, Time(0), 6, 200);
        assert_eq!(highest(&mut c, Time(0)), None);
        assert_eq!(table(&mut c, Time(0)), vec![]);
        // Connected, a peer is tracked before it reports anything.
        connect(&mut c, Time(0), 5);
        assert_eq!(table(&mut c, Time(0)), vec![(5, true, 0, 0, 0, None)]);
        update(&mut c, 5, OURS, 1, 100);
        assert_eq!(highest(&mut c, Time(0)), Some(100));
        // A report that arrives after the disconnection is ignored too.
        remove(&mut c, Time(1), 5);
        update(&mut c, 5, OURS, 1, 100);
        push(&mut c, Time(2), 5, 300);
        assert_eq!(highest(&mut c, Time(2)), None);
        assert_eq!(table(&mut c, Time(2)), vec![]);
    }

    #[test]
    fn departed_peer_leaves_every_answer() {
        let mut c = core(1);
        join(&mut c, 1, OURS, 1, 100);
        join(&mut c, 2, OURS, 1, 40);
        remove(&mut c, Time(0), 1);
        assert_eq!(highest(&mut c, Time(0)), Some(40));
        assert!(for_range(&mut c, Time(0), 1, 100).is_empty());
        assert_eq!(behind(&mut c, 500), vec![peer(2)]);
        assert_eq!(table(&mut c, Time(0)), vec![(2, true, 1, 40, 0, None)]);
    }

    #[test]
    fn full_table_forgets_the_peer_heard_from_longest_ago() {
        let mut c = PeerHeightsCore::new(
            Config {
                max_tracked_peers: 2,
                ..Config::new(OURS, 1)
            }
            .into(),
        );
        connect(&mut c, Time(0), 1);
        connect(&mut c, Time(1), 2);
        // Peer 1 reports after peer 2 connected: peer 2 is now the stalest.
        c.handle(
            Time(5),
            Input::Update(UpdateHeight {
                peer: peer(1),
                chain_id: OURS,
                highest: 10,
                lowest: 1,
            }),
        );
        assert_eq!(connect(&mut c, Time(6), 3), vec![]);
        assert_eq!(
            table(&mut c, Time(6)),
            vec![(1, true, 1, 10, 0, None), (3, true, 0, 0, 0, None)]
        );
        // The forgotten peer's reports are ignored until it connects again.
        push(&mut c, Time(7), 2, 99);
        assert_eq!(
            table(&mut c, Time(7))
                .iter()
                .map(|v| v.0)
                .collect::<Vec<_>>(),
            vec![1, 3]
        );
        // A push counts as hearing from a peer: peer 3 now outlasts peer 1.
        push(&mut c, Time(8), 3, 5);
        connect(&mut c, Time(9), 4);
        assert_eq!(
            table(&mut c, Time(9)),
            vec![(3, true, 0, 5, 0, None), (4, true, 0, 0, 0, None)]
        );
    }

    #[test]
    fn a_flood_of_peers_never_lifts_a_ban() {
        let mut c = PeerHeightsCore::new(
            Config {
                max_tracked_peers: 2,
                ..Config::new(OURS, 1)
            }
            .into(),
        );
        join(&mut c, 1, OURS, 1, 100);
        outcome(&mut c, Time(0), 1, OutcomeKind::InvalidData, 0, 5);
        for p in 2..=9 {
            connect(&mut c, Time(u64::from(p)), p);
        }
        // Peer 1 left the table, its ban did not.
        assert_eq!(
            table(&mut c, Time(10)),
            vec![
                (1, false, 0, 0, 0, Some(60_000)),
                (8, true, 0, 0, 0, None),
                (9, true, 0, 0, 0, None)
            ]
        );
        connect(&mut c, Time(20), 1);
        update(&mut c, 1, OURS, 1, 100);
        assert_eq!(highest(&mut c, Time(30)), None);
        assert!(behind(&mut c, 1_000).is_empty());
    }

    #[test]
    fn full_ban_list_lifts_the_ban_that_ends_first() {
        let mut c = keeping_two_bans();
        for (p, now) in [(1, 0), (2, 10), (3, 20)] {
            assert_eq!(
                outcome(&mut c, Time(now), p, OutcomeKind::InvalidData, 0, 5),
                vec![Output::Banned {
                    peer: peer(p),
                    until: Time(now + 60_000)
                }]
            );
        }
        assert_eq!(
            table(&mut c, Time(30)),
            vec![
                (2, false, 0, 0, 0, Some(60_010)),
                (3, false, 0, 0, 0, Some(60_020))
            ]
        );
    }

    #[test]
    fn peers_for_range_need_the_whole_range() {
        let mut c = core(1);
        join(&mut c, 1, OURS, 1, 100);
        join(&mut c, 2, OURS, 50, 300);
        join(&mut c, 3, OURS, 1, 40);
        let mut got = for_range(&mut c, Time(0), 60, 90);
        got.sort();
        assert_eq!(got, vec![peer(1), peer(2)]);
        assert_eq!(for_range(&mut c, Time(0), 101, 200), vec![peer(2)]);
        assert!(for_range(&mut c, Time(0), 10, 200).is_empty());
    }

    #[test]
    fn peers_behind_are_below_the_index() {
        let mut c = core(1);
        join(&mut c, 1, OURS, 1, 100);
        join(&mut c, 2, OURS, 1, 200);
        assert_eq!(behind(&mut c, 150), vec![peer(1)]);
        assert!(behind(&mut c, 100).is_empty());
    }

    #[test]
    fn invalid_data_bans_until_the_ban_ends() {
        let mut c = core(1);
        join(&mut c, 1, OURS, 1, 100);
        join(&mut c, 2, OURS, 1, 50);
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

    /// The counts metrics read drop a ban at its end, though nothing else
    /// reached the core since (a node with no peers to ask).
    #[test]
    fn counts_drop_a_ban_at_its_end_with_no_other_input() {
        let mut c = core(1);
        join(&mut c, 1, OURS, 1, 100);
        outcome(&mut c, Time(1_000), 1, OutcomeKind::InvalidData, 0, 5);
        let count = |c: &mut PeerHeightsCore, at| match c.handle(Time(at), Input::CountPeers).pop()
        {
            Some(Output::Counts(counts)) => counts.banned,
            other => panic!("{other:?}"),
        };
        assert_eq!(count(&mut c, 60_999), 1);
        assert_eq!(count(&mut c, 61_000), 0);
    }

    #[test]
    fn ban_survives_disconnect_and_reconnect() {
        let mut c = core(1);
        join(&mut c, 1, OURS, 1, 100);
        outcome(&mut c, Time(0), 1, OutcomeKind::InvalidData, 0, 5);
        remove(&mut c, Time(10), 1);
        assert_eq!(
            table(&mut c, Time(10)),
            vec![(1, false, 0, 0, 0, Some(60_000))]
        );
        join(&mut c, 1, OURS, 1, 100);
        assert_eq!(highest(&mut c, Time(20)), None);
        assert_eq!(highest(&mut c, Time(60_000)), Some(100));
    }

    #[test]
    fn banned_peers_are_not_told_of_commits() {
        let mut c = core(1);
        join(&mut c, 1, OURS, 1, 10);
        outcome(&mut c, Time(0), 1, OutcomeKind::InvalidData, 0, 5);
        assert!(behind(&mut c, 100).is_empty());
    }

    #[test]
    fn not_found_inside_the_claim_is_a_lie_and_bans() {
        let mut c = core(1);
        join(&mut c, 1, OURS, 10, 100);
        join(&mut c, 2, OURS, 1, 50);
        assert_eq!(
            not_found(&mut c, Time(1_000), 1, 10, 100),
            vec![Output::Banned {
                peer: peer(1),
                until: Time(61_000)
            }]
        );
        assert_eq!(
            table(&mut c, Time(1_000)),
            vec![
                (1, true, 10, 100, 1, Some(61_000)),
                (2, true, 1, 50, 0, None)
            ]
        );
        assert_eq!(highest(&mut c, Time(1_000)), Some(50));
        assert!(for_range(&mut c, Time(1_000), 60, 70).is_empty());
    }

    #[test]
    fn not_found_below_the_claimed_lowest_is_no_fault() {
        let mut c = core(1);
        join(&mut c, 1, OURS, 10, 100);
        assert_eq!(not_found(&mut c, Time(0), 1, 5, 20), vec![]);
        // Asked on an older claim; the peer has pruned since.
        update(&mut c, 1, OURS, 50, 100);
        assert_eq!(not_found(&mut c, Time(0), 1, 10, 49), vec![]);
        assert_eq!(table(&mut c, Time(0)), vec![(1, true, 50, 100, 0, None)]);
        assert_eq!(for_range(&mut c, Time(0), 50, 100), vec![peer(1)]);
    }

    #[test]
    fn not_found_above_the_claim_is_a_failure_that_lowers_nothing() {
        let mut c = core(1);
        join(&mut c, 1, OURS, 10, 100);
        assert_eq!(not_found(&mut c, Time(0), 1, 90, 150), vec![]);
        assert_eq!(not_found(&mut c, Time(0), 1, 101, 200), vec![]);
        // An empty range claims nothing either.
        assert_eq!(not_found(&mut c, Time(0), 1, 50, 20), vec![]);
        assert_eq!(table(&mut c, Time(0)), vec![(1, true, 10, 100, 3, None)]);
        assert_eq!(highest(&mut c, Time(0)), Some(100));
    }

    #[test]
    fn not_found_from_a_peer_not_tracked_is_ignored() {
        let mut c = core(1);
        assert_eq!(not_found(&mut c, Time(0), 1, 1, 10), vec![]);
        assert_eq!(table(&mut c, Time(0)), vec![]);
        // Connected but never answered: it claimed nothing, so no lie.
        connect(&mut c, Time(0), 1);
        assert_eq!(not_found(&mut c, Time(0), 1, 0, 0), vec![]);
        assert_eq!(table(&mut c, Time(0)), vec![(1, true, 0, 0, 1, None)]);
    }

    #[test]
    fn balancer_order_is_deterministic_for_a_seed() {
        let order = |seed| {
            let mut c = core(seed);
            for p in 1..=8 {
                join(&mut c, p, OURS, 1, 100);
            }
            (0..5)
                .map(|_| for_range(&mut c, Time(0), 1, 100))
                .collect::<Vec<_>>()
        };
        assert_eq!(order(42), order(42));
        assert_ne!(order(42), order(43));
    }

    #[test]
    fn unmeasured_peer_ranks_below_good_peers_and_above_slow_ones() {
        let mut c = three_peers(5);
        // Peer 1: 1 KB/s. Peer 2: 100 MB/s, one timeout. Peer 3: unmeasured.
        succeeded(&mut c, Time(0), 1, 1_000, 1_000);
        succeeded(&mut c, Time(0), 2, 10_000_000, 100);
        outcome(&mut c, Time(0), 2, OutcomeKind::Timeout, 0, 10_000);
        // A slow peer measured first must not keep the others from ever
        // being tried.
        for _ in 0..50 {
            assert_eq!(
                for_range(&mut c, Time(0), 1, 100),
                vec![peer(2), peer(3), peer(1)]
            );
        }
    }

    #[test]
    fn peer_that_keeps_timing_out_sinks_below_every_good_peer() {
        let mut c = three_peers(9);
        // Peer 1: 10 GB/s, then times out again and again. Peer 2: 1 B/s.
        // Peer 3: unmeasured.
        succeeded(&mut c, Time(0), 1, 1_000_000_000, 100);
        succeeded(&mut c, Time(0), 2, 1, 1_000);
        for _ in 0..2 {
            outcome(&mut c, Time(0), 1, OutcomeKind::Timeout, 0, 10_000);
        }
        assert_eq!(for_range(&mut c, Time(0), 1, 100)[0], peer(1));
        outcome(&mut c, Time(0), 1, OutcomeKind::Timeout, 0, 10_000);
        for _ in 0..50 {
            assert_eq!(
                for_range(&mut c, Time(0), 1, 100),
                vec![peer(3), peer(2), peer(1)]
            );
        }
        // Still offered last, and successes win it back.
        succeeded(&mut c, Time(0), 1, 1_000_000_000, 100);
        assert_eq!(for_range(&mut c, Time(0), 1, 100)[0], peer(1));
    }

    #[test]
    fn balancer_favours_a_fast_peer_over_a_failing_one() {
        let mut c = core(7);
        join(&mut c, 1, OURS, 1, 100);
        join(&mut c, 2, OURS, 1, 100);
        join(&mut c, 3, OURS, 1, 100);
        // Peer 1: fast. Peer 2: slow. Peer 3: fast but times out.
        succeeded(&mut c, Time(0), 1, 10_000_000, 100);
        succeeded(&mut c, Time(0), 2, 100_000, 100);
        succeeded(&mut c, Time(0), 3, 10_000_000, 100);
        for _ in 0..3 {
            outcome(&mut c, Time(0), 3, OutcomeKind::Timeout, 0, 10_000);
        }
        for _ in 0..20 {
            assert_eq!(for_range(&mut c, Time(0), 1, 100)[0], peer(1));
        }
        // Successes win a failing peer back.
        for _ in 0..5 {
            succeeded(&mut c, Time(0), 3, 20_000_000, 100);
        }
        assert_eq!(for_range(&mut c, Time(0), 1, 100)[0], peer(3));
    }

    /// The peers ranked for a fetch of `kind` of commits 1..=100.
    fn ranked(c: &mut PeerHeightsCore, kind: FetchKind) -> Vec<u8> {
        let ranked = c.peers_for_range(Time(0), kind, 1, 100, Doubts::Count);
        ranked.iter().map(|p| p.0[0]).collect()
    }

    fn delivered(
        c: &mut PeerHeightsCore,
        p: u8,
        kind: FetchKind,
        (bytes, ms): (u64, u64),
        share: (u64, u64),
    ) {
        let delivered = ReportOutcome::delivered((kind, peer(p)), (bytes, ms), share);
        c.handle(Time(0), Input::Outcome(delivered));
    }

    #[test]
    fn a_commit_answer_scores_its_bytes_times_its_share_of_what_was_asked() {
        let bytes = |share| {
            ReportOutcome::delivered((FetchKind::Commits, peer(1)), (400_000, 1), share).bytes
        };
        assert_eq!(bytes((200, 200)), 400_000);
        assert_eq!(bytes((1, 200)), 2_000);
        assert_eq!(bytes((150, 200)), 300_000);
        // More than was asked counts as all of it; nothing asked, as nothing.
        assert_eq!(bytes((300, 200)), 400_000);
        assert_eq!(bytes((0, 0)), 0);
        let huge = ReportOutcome::delivered((FetchKind::Blocks, peer(1)), (u64::MAX, 1), (3, 3));
        assert_eq!(
            (huge.bytes, huge.kind),
            (u64::MAX, OutcomeKind::Success(FetchKind::Blocks))
        );
    }

    #[test]
    fn a_whole_answer_in_the_whole_answer_time_scores_at_least_the_mark_and_at_most_twice() {
        let bytes = |kind, (bytes, ms), share| {
            ReportOutcome::delivered((kind, peer(1)), (bytes, ms), share).bytes
        };
        let rate = |kind, answer, share| bytes(kind, answer, share) * 1000 / answer.1;
        let (commits, blocks) = (GOOD_COMMIT_THROUGHPUT_BPS, GOOD_THROUGHPUT_BPS);
        // Two commits of 250 bytes, four blocks of 1.6 KB: at 400 ms, the
        // mark and a quarter; at 100 ms and at 10 ms, twice the mark.
        assert_eq!(bytes(FetchKind::Commits, (500, 400), (2, 2)), 32_768);
        assert_eq!(
            rate(FetchKind::Commits, (500, 400), (2, 2)),
            commits * 5 / 4
        );
        assert_eq!(
            rate(FetchKind::Blocks, (6_400, 400), (4, 4)),
            blocks * 5 / 4
        );
        for (ms, floors) in [(10, (1_311, 20_972)), (100, (13_108, 209_716))] {
            // What a peer at the mark moves in twice the answer's time,
            // rounded up.
            assert_eq!(bytes(FetchKind::Commits, (500, ms), (2, 2)), floors.0);
            assert_eq!(bytes(FetchKind::Blocks, (6_400, ms), (4, 4)), floors.1);
            assert!(rate(FetchKind::Commits, (500, ms), (2, 2)) >= 2 * commits);
            assert!(rate(FetchKind::Blocks, (6_400, ms), (4, 4)) >= 2 * blocks);
        }
        // At the whole-answer time, the mark; past it, the bytes alone.
        assert_eq!(rate(FetchKind::Blocks, (6_400, 500), (4, 4)), blocks);
        assert_eq!(bytes(FetchKind::Blocks, (6_400, 501), (4, 4)), 6_400);
        // Above the floor, the bytes.
        assert_eq!(bytes(FetchKind::Blocks, (600_000, 100), (4, 4)), 600_000);
        // A share of what was asked scores by its bytes alone, however
        // small and quick.
        assert_eq!(bytes(FetchKind::Commits, (500, 1), (1, 2)), 250);
        assert_eq!(bytes(FetchKind::Commits, (4_000, 1), (1, 200)), 20);
    }

    #[test]
    fn a_peer_answering_small_fetches_whole_in_a_round_trip_ranks_above_one_never_measured() {
        // Near the tip: peer 1 answers fetches of two commits (500 bytes)
        // and of their eight blocks (13 KB) whole in 150 ms, a far peer's
        // round trip; peer 2 is never measured (a fresh identity, maybe
        // silent). By their bytes alone, 3 KB/s and 87 KB/s, peer 1 would
        // be slow for both and rank below peer 2.
        let mut c = three_peers(17);
        c.handle(Time(0), Input::Remove(RemovePeer { peer: peer(3) }));
        delivered(&mut c, 1, FetchKind::Commits, (500, 150), (2, 2));
        delivered(&mut c, 1, FetchKind::Blocks, (13_000, 150), (8, 8));
        for kind in [FetchKind::Commits, FetchKind::Blocks] {
            assert_eq!(c.peers[&peer(1)].record(kind, Time(0)), Standing::Good);
            for _ in 0..20 {
                assert_eq!(ranked(&mut c, kind), vec![1, 2], "{kind:?}");
            }
        }
        // An answer of all that was asked slower than the whole-answer
        // time scores by its bytes alone: a peer creeping through small
        // fetches is slow.
        for _ in 0..20 {
            delivered(&mut c, 1, FetchKind::Blocks, (13_000, 2_000), (8, 8));
        }
        assert_eq!(
            c.peers[&peer(1)].record(FetchKind::Blocks, Time(0)),
            Standing::Slow
        );
        assert_eq!(ranked(&mut c, FetchKind::Blocks), vec![2, 1]);
        // Quick small answers build no credit past twice the mark: after
        // twenty at 10 ms, a peer that turns to answering each commit
        // fetch with one commit of 200 (20 KB/s by its share) is slow at
        // its fourth such answer. Uncapped (50 marks) it would take 15.
        for _ in 0..20 {
            delivered(&mut c, 1, FetchKind::Commits, (500, 10), (2, 2));
        }
        let record = |c: &PeerHeightsCore| c.peers[&peer(1)].record(FetchKind::Commits, Time(0));
        for _ in 0..3 {
            delivered(&mut c, 1, FetchKind::Commits, (4_000, 1), (1, 200));
            assert_eq!(record(&c), Standing::Good);
        }
        delivered(&mut c, 1, FetchKind::Commits, (4_000, 1), (1, 200));
        assert_eq!(record(&c), Standing::Slow);
    }

    /// A core seeded `seed` with peers 1, 2 and 3 holding commits 1..=100.
    fn three_peers(seed: u64) -> PeerHeightsCore {
        let mut c = core(seed);
        for p in 1..=3 {
            join(&mut c, p, OURS, 1, 100);
        }
        c
    }

    #[test]
    fn honest_commit_answers_rank_a_peer_good_at_a_sixteenth_of_the_blocks_mark() {
        let mut c = three_peers(13);
        // Peer 1 answers whole commit fetches at 500 KB/s (500 KB in 1 s,
        // past the whole-answer time, so that the floor is not what
        // counts), peer 2 block fetches at the same pace; peer 3 is never
        // measured. For commits, both are good and rank above peer 3
        // (peer 2 by its blocks, until it answers commits); for blocks,
        // both are slow and rank below it.
        delivered(&mut c, 1, FetchKind::Commits, (500_000, 1_000), (200, 200));
        delivered(&mut c, 2, FetchKind::Blocks, (500_000, 1_000), (1, 1));
        for _ in 0..20 {
            assert_eq!(ranked(&mut c, FetchKind::Commits)[2], 3);
            assert_eq!(ranked(&mut c, FetchKind::Blocks)[0], 3);
        }
        // At the mark and just under it.
        let (at, under) = (GOOD_COMMIT_THROUGHPUT_BPS, GOOD_COMMIT_THROUGHPUT_BPS - 1);
        delivered(&mut c, 1, FetchKind::Commits, (at * 4, 1_000), (1, 1));
        delivered(&mut c, 2, FetchKind::Commits, (under, 1_000), (1, 1));
        let record =
            |c: &PeerHeightsCore, p: u8| c.peers[&peer(p)].record(FetchKind::Commits, Time(0));
        assert_eq!(
            c.peers[&peer(1)].throughput.commits,
            Some(500_000 * 3 / 4 + at)
        );
        assert_eq!(
            (record(&c, 1), record(&c, 2)),
            (Standing::Good, Standing::Slow)
        );
    }

    #[test]
    fn a_peer_serving_blocks_fast_and_commits_one_at_a_time_is_ranked_apart_for_each() {
        let mut c = three_peers(11);
        // Peer 1 serves blocks at 10 MB/s; peer 2 has answered nothing yet,
        // peer 3 a whole commit fetch at 2 MB/s. Until peer 1 answers a
        // commit fetch, its blocks rank it for commits too.
        delivered(&mut c, 1, FetchKind::Blocks, (1_000_000, 100), (1, 1));
        delivered(&mut c, 3, FetchKind::Commits, (200_000, 100), (200, 200));
        for kind in [FetchKind::Commits, FetchKind::Blocks] {
            for _ in 0..20 {
                assert_eq!(ranked(&mut c, kind), vec![1, 3, 2], "{kind:?}");
            }
        }
        // Then it answers each commit fetch at once with one commit of
        // 4 KB out of 200 asked: 4 MB/s by its bytes alone, but 20 KB/s
        // by its share. For commits it ranks below the peer never asked;
        // for blocks it stays first.
        for _ in 0..10 {
            delivered(&mut c, 1, FetchKind::Commits, (4_000, 1), (1, 200));
        }
        for _ in 0..20 {
            assert_eq!(ranked(&mut c, FetchKind::Commits), vec![3, 2, 1]);
            assert_eq!(ranked(&mut c, FetchKind::Blocks), vec![1, 3, 2]);
        }
        // Views tell both rates apart.
        let view = snapshot(&mut c, Time(0))
            .into_iter()
            .find(|v| v.peer == peer(1))
            .unwrap();
        assert_eq!(view.throughput_bps, 10_000_000);
        assert_eq!(view.commit_throughput_bps, 20_000);
    }

    #[test]
    fn jitter_spreads_load_over_equal_peers() {
        let mut c = core(3);
        join(&mut c, 1, OURS, 1, 100);
        join(&mut c, 2, OURS, 1, 100);
        let firsts: std::collections::HashSet<_> = (0..50)
            .map(|_| for_range(&mut c, Time(0), 1, 100)[0])
            .collect();
        assert_eq!(firsts.len(), 2);
    }

    fn acquire(c: &mut PeerHeightsCore, now: u64, request: u64, avoid: &[u8]) -> Vec<Output> {
        c.handle(
            Time(now),
            Input::Acquire(Acquire {
                request,
                start: 1,
                end: 100,
                kind: FetchKind::Blocks,
                avoid: avoid.iter().map(|p| peer(*p)).collect(),
                wait_ms: 1_000,
                spare_only: false,
            }),
        )
    }

    fn release(c: &mut PeerHeightsCore, now: u64, lease: u64, transfer: Transfer) -> Vec<Output> {
        c.handle(
            Time(now),
            Input::Release(Release {
                lease,
                transfer,
                bytes: 1_000_000,
                latency_ms: 10,
            }),
        )
    }

    /// The lease granted by `out`, as (request, lease id, peer byte).
    fn granted(out: &[Output]) -> Vec<(u64, u64, u8)> {
        out.iter()
            .filter_map(|o| match o {
                Output::Granted { request, lease } => Some((*request, lease.id, lease.peer.0[0])),
                _ => None,
            })
            .collect()
    }

    fn refused(out: &[Output]) -> Vec<(u64, AcquireError)> {
        out.iter()
            .filter_map(|o| match o {
                Output::Refused { request, error } => Some((*request, *error)),
                _ => None,
            })
            .collect()
    }

    fn slots(max_fetches_per_peer: usize, max_waiting_fetches: usize) -> PeerHeightsCore {
        PeerHeightsCore::new(
            Config {
                max_fetches_per_peer,
                max_waiting_fetches,
                ..Config::new(OURS, 1)
            }
            .into(),
        )
    }

    /// A lease for `kind` of `start..=end`, asked at `now`, and its id
    /// and peer byte once granted.
    fn lease_for(
        c: &mut PeerHeightsCore,
        now: u64,
        kind: FetchKind,
        (start, end): (u64, u64),
    ) -> Option<(u64, u8)> {
        let out = c.handle(
            Time(now),
            Input::Acquire(Acquire {
                request: now,
                start,
                end,
                kind,
                avoid: Vec::new(),
                wait_ms: 0,
                spare_only: false,
            }),
        );
        granted(&out).first().map(|&(_, lease, p)| (lease, p))
    }

    #[test]
    fn a_claim_whose_commit_fetch_failed_is_doubted_above_it_for_a_doubling_while() {
        let mut c = core(1);
        join(&mut c, 1, OURS, 1, 1_000_000);
        join(&mut c, 2, OURS, 1, 500);
        assert_eq!(highest(&mut c, Time(0)), Some(1_000_000));
        // Peer 1 alone claims 501: commit fetches from it, refused as busy
        // while it served nothing else of ours, and never anything. Loaded
        // for a moment, maybe by others filling its slots: no doubt until
        // it has refused so for a second.
        let commits = FetchKind::Commits;
        for at in [0, 999, 1_000] {
            let (lease, 1) = lease_for(&mut c, at, commits, (501, 501)).unwrap() else {
                panic!("only peer 1 claims 501");
            };
            assert_eq!(highest(&mut c, Time(at)), Some(1_000_000), "at {at}");
            assert_eq!(release(&mut c, at, lease, Transfer::Busy), vec![]);
        }
        // Its claim above 500 counts no more, for a second: it is not
        // known, and it is leased commits above 500 only as the last
        // resort, while no other peer claims them (an honest server whose
        // slots an attacker fills is refused as busy too, and may be the
        // only one to hold them); blocks and the commits below are still
        // its to serve.
        assert_eq!(highest(&mut c, Time(1_999)), Some(500));
        let (last_resort, 1) = lease_for(&mut c, 1_999, commits, (501, 501)).unwrap() else {
            panic!("peer 1 alone claims 501");
        };
        release(&mut c, 1_999, last_resort, Transfer::Cancelled);
        join(&mut c, 3, OURS, 1, 600);
        assert_eq!(
            lease_for(&mut c, 1_999, commits, (501, 501)).map(|l| l.1),
            Some(3)
        );
        remove(&mut c, Time(1_999), 3);
        let (blocks, 1) = lease_for(&mut c, 1_999, FetchKind::Blocks, (501, 600)).unwrap() else {
            panic!("peer 1 still serves blocks");
        };
        release(&mut c, 1_999, blocks, Transfer::Cancelled);
        assert!(for_range(&mut c, Time(1_999), 400, 500).contains(&peer(1)));
        assert_eq!(view(&mut c, 1_999), (1_000_000, Some(500), None));
        assert_eq!(highest(&mut c, Time(2_000)), Some(1_000_000));
        assert_eq!(view(&mut c, 2_000).1, None);
        // Each further failure that proves nothing doubles the doubt, up
        // to eight seconds.
        let mut at = 2_000;
        for (transfer, doubt) in [
            (Transfer::Error, 2_000),
            (Transfer::Timeout, 4_000),
            (Transfer::Error, 8_000),
            (Transfer::Timeout, 8_000),
        ] {
            let (lease, 1) = lease_for(&mut c, at, commits, (501, 501)).unwrap() else {
                panic!("the doubt is over at {at}");
            };
            release(&mut c, at, lease, transfer);
            assert_eq!(
                highest(&mut c, Time(at + doubt - 1)),
                Some(500),
                "{transfer:?}"
            );
            assert_eq!(highest(&mut c, Time(at + doubt)), Some(1_000_000));
            at += doubt;
        }
        // An answer no further than where it was doubted changes nothing;
        // one above starts it over. (Peer 2 leaves, so peer 1, failing,
        // is leased the commits below too.)
        remove(&mut c, Time(at), 2);
        commit_fetch_on_peer_1(&mut c, at, 500, Transfer::Received);
        commit_fetch_on_peer_1(&mut c, at, 501, Transfer::Timeout);
        assert_eq!(highest(&mut c, Time(at + 7_999)), Some(500));
        at += 8_000;
        commit_fetch_on_peer_1(&mut c, at, 501, Transfer::Received);
        commit_fetch_on_peer_1(&mut c, at, 601, Transfer::Error);
        assert_eq!(view(&mut c, at).1, Some(600));
        assert_eq!(highest(&mut c, Time(at + 1_000)), Some(1_000_000));
        // A commit answer started the refusals as busy over: the next is
        // within the grace again.
        commit_fetch_on_peer_1(&mut c, at + 1_000, 601, Transfer::Busy);
        assert_eq!(view(&mut c, at + 1_000).1, None);
        // A denial is still judged on the whole claim, doubted or not.
        let denied = c.handle(
            Time(at + 1_000),
            Input::Outcome(ReportOutcome {
                peer: peer(1),
                bytes: 0,
                latency_ms: 1,
                kind: OutcomeKind::NotFound {
                    start: 700,
                    end: 800,
                },
            }),
        );
        assert!(matches!(denied[..], [Output::Banned { .. }]), "{denied:?}");
    }

    /// Peer 1's claim, where it is doubted, and its ban.
    fn view(c: &mut PeerHeightsCore, now: u64) -> (u64, Option<u64>, Option<Time>) {
        let views = snapshot(c, Time(now));
        let v = views.iter().find(|v| v.peer == peer(1)).cloned().unwrap();
        (v.highest, v.doubted_above, v.banned_until)
    }

    #[test]
    fn refusals_as_busy_count_from_the_first_through_a_reconnection_and_a_restart() {
        let mut c = core(1);
        join(&mut c, 1, OURS, 1, 1_000);
        // Having served us before is no exemption: a liar relays what
        // others hold, then refuses what it claims past it.
        succeeded(&mut c, Time(0), 1, 100_000, 10);
        let busy = |c: &mut PeerHeightsCore, at| {
            let (lease, 1) = lease_for(c, at, FetchKind::Commits, (101, 101)).unwrap() else {
                panic!("peer 1 claims 101");
            };
            release(c, at, lease, Transfer::Busy);
            view(c, at).1
        };
        assert_eq!(busy(&mut c, 0), None);
        // Leaving and coming back does not start the grace over, nor does
        // a restart.
        remove(&mut c, Time(500), 1);
        join(&mut c, 1, OURS, 1, 1_000);
        let mut c = PeerHeightsCore::new(c.restart_init());
        join(&mut c, 1, OURS, 1, 1_000);
        succeeded(&mut c, Time(999), 1, 100_000, 10);
        // Nor do answers below what it refused, of commits or blocks: a
        // liar serves what it holds and refuses what it claims past it.
        commit_fetch_on_peer_1(&mut c, 999, 100, Transfer::Received);
        let (blocks, 1) = lease_for(&mut c, 999, FetchKind::Blocks, (1, 100)).unwrap() else {
            panic!("peer 1 holds the blocks");
        };
        release(&mut c, 999, blocks, Transfer::Received);
        assert_eq!(busy(&mut c, 999), None);
        assert_eq!(busy(&mut c, 1_000), Some(100));
        // The doubt's second is over. Each doubt needs a run of its own
        // (an attacker filling an honest node's slots must win a whole
        // grace again), and doubles as any failure's does.
        assert_eq!(busy(&mut c, 2_000), None);
        assert_eq!(busy(&mut c, 2_999), None);
        assert_eq!(busy(&mut c, 3_000), Some(100));
        assert_eq!(highest(&mut c, Time(4_999)), Some(100));
        assert_eq!(highest(&mut c, Time(5_000)), Some(1_000));
    }

    #[test]
    fn a_doubt_outlives_a_reconnection_and_the_doubts_kept_are_bounded() {
        let mut c = keeping_two_bans();
        join(&mut c, 1, OURS, 1, 1_000);
        commit_fetch_on_peer_1(&mut c, 0, 101, Transfer::Error);
        // It leaves and is dialled again at once, claiming as much: still
        // doubted, and its next failure doubles the doubt.
        remove(&mut c, Time(10), 1);
        join(&mut c, 1, OURS, 1, 1_000);
        assert_eq!(highest(&mut c, Time(999)), Some(100));
        assert_eq!(view(&mut c, 999).1, Some(100));
        commit_fetch_on_peer_1(&mut c, 1_000, 101, Transfer::Error);
        assert_eq!(highest(&mut c, Time(2_999)), Some(100));
        assert_eq!(highest(&mut c, Time(3_000)), Some(1_000));
        // Two doubts are kept at most here: a third peer's doubt forgets
        // the one that ended first.
        for p in [2, 3] {
            join(&mut c, p, OURS, 1, 1_000);
        }
        assert_eq!(peers_2_and_3_time_out(&mut c, 3_000), vec![2, 3]);
        assert_eq!(c.doubts.len(), 2);
    }

    #[test]
    fn a_doubt_held_by_an_unanswered_fetch_is_forgotten_last() {
        let mut c = keeping_two_bans();
        for p in 1..=3 {
            join(&mut c, p, OURS, 1, 1_000);
        }
        // Peer 1 holds a commit fetch unanswered: in doubt while it does,
        // though its second has long passed.
        let (held, 1) = lease_for_peer(&mut c, 0, 1) else {
            panic!("peer 1 was asked for");
        };
        c.handle(Time(0), Input::Unanswered { lease: held });
        assert_eq!(peers_2_and_3_time_out(&mut c, 5_000), vec![1, 3]);
    }

    #[test]
    fn doubts_and_the_fetches_holding_them_outlive_a_restart() {
        let mut c = core(1);
        for p in 1..=2 {
            join(&mut c, p, OURS, 1, 1_000);
        }
        let (held, 1) = lease_for_peer(&mut c, 0, 1) else {
            panic!("peer 1 was asked for");
        };
        c.handle(Time(0), Input::Unanswered { lease: held });
        let (lease, 2) = lease_for_peer(&mut c, 0, 2) else {
            panic!("peer 2 was asked for");
        };
        release(&mut c, 0, lease, Transfer::Error);
        // Restarted at 5 s: peer 2's doubt is over; peer 1's is held by
        // the fetch still running. Peers are tracked again as they
        // answer.
        let mut c = PeerHeightsCore::new(c.restart_init());
        for p in 1..=2 {
            join(&mut c, p, OURS, 1, 1_000);
        }
        assert_eq!(view(&mut c, 5_000).1, Some(100));
        assert_eq!(highest(&mut c, Time(5_000)), Some(1_000));
        // Peer 2's next failure is its second in a row (2 s).
        let (lease, 2) = lease_for_peer(&mut c, 5_000, 2) else {
            panic!("peer 2 was asked for");
        };
        release(&mut c, 5_000, lease, Transfer::Error);
        remove(&mut c, Time(5_000), 1);
        assert_eq!(highest(&mut c, Time(6_999)), Some(100));
        assert_eq!(highest(&mut c, Time(7_000)), Some(1_000));
        // The held fetch answers at last: peer 1's doubt ends.
        join(&mut c, 1, OURS, 1, 1_000);
        release(&mut c, 7_000, held, Transfer::Received);
        assert_eq!(view(&mut c, 7_000).1, None);
    }

    /// A commit fetch of `start` at `at`, leased on peer 1 (it must be),
    /// released with `transfer`.
    fn commit_fetch_on_peer_1(c: &mut PeerHeightsCore, at: u64, start: u64, transfer: Transfer) {
        let lease = lease_for(c, at, FetchKind::Commits, (start, start));
        let Some((lease, 1)) = lease else {
            panic!("not leased on peer 1 at {at}: {lease:?}");
        };
        release(c, at, lease, transfer);
    }

    /// A core that keeps two bans at most, and as many doubts.
    fn keeping_two_bans() -> PeerHeightsCore {
        let config = Config {
            max_bans: 2,
            ..Config::new(OURS, 1)
        };
        PeerHeightsCore::new(config.into())
    }

    /// Commit fetches on peers 2 and 3 time out at `at`; returns the peers
    /// doubted then.
    fn peers_2_and_3_time_out(c: &mut PeerHeightsCore, at: u64) -> Vec<u8> {
        for p in [2, 3] {
            let (lease, got) = lease_for_peer(c, at, p);
            assert_eq!(got, p);
            release(c, at, lease, Transfer::Timeout);
        }
        (snapshot(c, Time(at)).iter())
            .filter(|v| v.doubted_above.is_some())
            .map(|v| v.peer.0[0])
            .collect()
    }

    /// A commit lease of 101 on peer `p`, the others avoided.
    fn lease_for_peer(c: &mut PeerHeightsCore, now: u64, p: u8) -> (u64, u8) {
        let avoid = (1..=3).filter(|&q| q != p).map(peer).collect();
        let out = c.handle(
            Time(now),
            Input::Acquire(Acquire {
                request: now,
                start: 101,
                end: 101,
                kind: FetchKind::Commits,
                avoid,
                wait_ms: 0,
                spare_only: false,
            }),
        );
        let (_, lease, got) = granted(&out)[0];
        (lease, got)
    }

    #[test]
    fn failures_that_say_nothing_of_the_claim_raise_no_doubt() {
        let mut c = core(1);
        join(&mut c, 1, OURS, 1, 1_000);
        // Blocks are fetched for certified commits: a failure there says
        // nothing of the claim.
        for transfer in [Transfer::Busy, Transfer::Error, Transfer::Timeout] {
            let (lease, 1) = lease_for(&mut c, 0, FetchKind::Blocks, (1, 100)).unwrap() else {
                panic!("peer 1 holds the blocks");
            };
            release(&mut c, 0, lease, transfer);
            assert_eq!(highest(&mut c, Time(0)), Some(1_000));
        }
        // Nor do our own cancellations, an answer later than another
        // peer's (a hedge covered the range, so another peer claims it), or
        // a NOT_FOUND (judged as a lie or not on its own).
        for transfer in [Transfer::Cancelled, Transfer::Late, Transfer::NotFound] {
            let (lease, 1) = lease_for(&mut c, 0, FetchKind::Commits, (1_001, 1_001))
                .or_else(|| lease_for(&mut c, 0, FetchKind::Commits, (101, 101)))
                .unwrap()
            else {
                panic!("peer 1 claims 101");
            };
            release(&mut c, 0, lease, transfer);
        }
        assert_eq!(view(&mut c, 0).1, None);
        // Refused as busy while it served another fetch of ours: it serves
        // us fewer at once than we sent, which its slots learn.
        let mut c = core(1);
        join(&mut c, 1, OURS, 1, 1_000);
        let (other, 1) = lease_for(&mut c, 0, FetchKind::Blocks, (1, 100)).unwrap() else {
            panic!("peer 1 holds the blocks");
        };
        let (lease, 1) = lease_for(&mut c, 0, FetchKind::Commits, (101, 101)).unwrap() else {
            panic!("peer 1 claims 101");
        };
        release(&mut c, 0, lease, Transfer::Busy);
        assert_eq!(highest(&mut c, Time(0)), Some(1_000));
        release(&mut c, 0, other, Transfer::Received);
        // Refused as busy, serving nothing else of ours, by a peer that
        // serves what it refused soon after: loaded (an attacker may hold
        // its slots), and maybe the only one to hold what we lack. Its
        // answer starts the run of refusals over.
        let mut c = core(1);
        join(&mut c, 1, OURS, 1, 1_000);
        for at in [0, 900, 1_800, 2_700] {
            commit_fetch_on_peer_1(&mut c, at, 101, Transfer::Busy);
            commit_fetch_on_peer_1(&mut c, at + 800, 101, Transfer::Received);
            assert_eq!(highest(&mut c, Time(at + 800)), Some(1_000));
            assert_eq!(view(&mut c, at + 800).1, None);
        }
    }

    #[test]
    fn a_doubt_only_widens_and_an_unanswered_commit_fetch_raises_it_at_once() {
        let mut c = core(1);
        join(&mut c, 1, OURS, 1, 1_000);
        let commits = FetchKind::Commits;
        let unanswered = |c: &mut PeerHeightsCore, now, lease| {
            assert_eq!(c.handle(Time(now), Input::Unanswered { lease }), vec![]);
        };
        let (low, 1) = lease_for(&mut c, 0, commits, (201, 201)).unwrap() else {
            panic!("peer 1 claims 201");
        };
        let (high, 1) = lease_for(&mut c, 0, commits, (301, 301)).unwrap() else {
            panic!("peer 1 claims 301");
        };
        // Unanswered past the hedge delay with no other peer for it: in
        // doubt at once, above 200, for a second; once only.
        unanswered(&mut c, 100, low);
        unanswered(&mut c, 100, low);
        assert_eq!(view(&mut c, 100).1, Some(200));
        // A failure higher up while it is in doubt keeps the doubt where
        // it is widest, and lasts its own time (2 s, the second in a row).
        release(&mut c, 500, high, Transfer::Timeout);
        assert_eq!(view(&mut c, 500).1, Some(200));
        // Those 2 s are over, but the fetch doubted while unanswered still
        // is: the doubt lasts while it does.
        assert_eq!(highest(&mut c, Time(2_500)), Some(200));
        // It fails at last: a third failure (4 s).
        release(&mut c, 3_000, low, Transfer::Timeout);
        assert_eq!(highest(&mut c, Time(6_999)), Some(200));
        assert_eq!(highest(&mut c, Time(7_000)), Some(1_000));
        // The next is the fourth (8 s), and the doubt lasts while the
        // fetch stays unanswered, past those 8 s; its answer ends it.
        let (slow, 1) = lease_for(&mut c, 7_000, commits, (301, 301)).unwrap() else {
            panic!("the doubt is over");
        };
        unanswered(&mut c, 8_000, slow);
        assert_eq!(highest(&mut c, Time(15_999)), Some(300));
        assert_eq!(highest(&mut c, Time(20_000)), Some(300));
        release(&mut c, 20_000, slow, Transfer::Received);
        assert_eq!(highest(&mut c, Time(20_000)), Some(1_000));
        assert_eq!(view(&mut c, 20_000).1, None);
        // Blocks' leases are never doubted so.
        let (blocks, 1) = lease_for(&mut c, 20_000, FetchKind::Blocks, (1, 100)).unwrap() else {
            panic!("peer 1 holds the blocks");
        };
        unanswered(&mut c, 20_000, blocks);
        assert_eq!(highest(&mut c, Time(20_000)), Some(1_000));
    }

    #[test]
    fn a_peer_that_never_delivered_and_timed_out_is_asked_only_when_no_other_can_serve() {
        let mut c = slots(1, 8);
        join(&mut c, 1, OURS, 1, 100);
        join(&mut c, 2, OURS, 1, 100);
        let mut leases = granted(&acquire(&mut c, 0, 0, &[]));
        leases.extend(granted(&acquire(&mut c, 0, 1, &[])));
        leases.sort_by_key(|&(.., p)| p);
        let [(_, silent, 1), (_, serving, 2)] = leases[..] else {
            panic!("one lease on each peer: {leases:?}");
        };
        // Peer 1 never answers. Peer 2's slot is still taken: the next
        // request waits for it rather than go to peer 1 again.
        assert_eq!(release(&mut c, 10_000, silent, Transfer::Timeout), vec![]);
        assert_eq!(acquire(&mut c, 10_000, 2, &[]), vec![]);
        let out = release(&mut c, 10_001, serving, Transfer::Received);
        assert_eq!(granted(&out), vec![(2, 2, 2)]);
        // With no other peer for the range, peer 1 is asked after all.
        remove(&mut c, Time(10_002), 2);
        assert_eq!(granted(&acquire(&mut c, 10_002, 3, &[])), vec![(3, 3, 1)]);
    }

    #[test]
    fn a_late_peer_beaten_by_another_ranks_lower_with_no_fault() {
        let mut c = slots(4, 8);
        join(&mut c, 1, OURS, 1, 100);
        join(&mut c, 2, OURS, 1, 100);
        // Peer 2 has answered before; peer 1 never has. Both are beaten
        // three times: each time a failure, never a fault. Peer 1's slot
        // is released late; peer 2's as cancelled, then reported beaten
        // once the answer that beat it checked out: the same.
        succeeded(&mut c, Time(0), 2, 10_000_000, 10);
        for round in 0..3 {
            let mut leases = granted(&acquire(&mut c, 0, 2 * round, &[2]));
            leases.extend(granted(&acquire(&mut c, 0, 2 * round + 1, &[1])));
            assert_eq!(leases.iter().map(|l| l.2).collect::<Vec<_>>(), vec![1, 2]);
            let [(_, first, _), (_, second, _)] = leases[..] else {
                panic!("two leases: {leases:?}");
            };
            assert_eq!(release(&mut c, 500, first, Transfer::Late), vec![]);
            assert_eq!(release(&mut c, 500, second, Transfer::Cancelled), vec![]);
            let beaten = Input::Beaten(ReportBeaten { peer: peer(2) });
            assert_eq!(c.handle(Time(500), beaten), vec![]);
        }
        let views = snapshot(&mut c, Time(500));
        let record = |p: u8| {
            let v = views.iter().find(|v| v.peer == peer(p)).expect("known");
            (v.failures, v.faults)
        };
        assert_eq!((record(1), record(2)), ((3, 0), (3, 0)));
        // Three in a row: the never-measured peer is tried last, yet
        // still asked when no other can serve (it is at no fault).
        assert_eq!(granted(&acquire(&mut c, 600, 6, &[])), vec![(6, 6, 2)]);
        assert_eq!(granted(&acquire(&mut c, 600, 7, &[2])), vec![(7, 7, 1)]);
    }

    #[test]
    fn a_peer_beaten_three_times_is_asked_only_when_no_other_can_serve() {
        let mut c = slots(1, 8);
        join(&mut c, 1, OURS, 1, 100);
        join(&mut c, 2, OURS, 1, 100);
        succeeded(&mut c, Time(0), 2, 10_000_000, 10);
        // Peer 1 is asked three times, and each time peer 2 answers first.
        for request in 0..3 {
            let lease = granted(&acquire(&mut c, 0, request, &[2]));
            assert_eq!(lease, vec![(request, request, 1)]);
            assert_eq!(release(&mut c, 200, request, Transfer::Late), vec![]);
        }
        // Peer 2's one slot is taken: the next request waits for it rather
        // than go to peer 1, and gets it once it is free.
        assert_eq!(granted(&acquire(&mut c, 300, 3, &[])), vec![(3, 3, 2)]);
        assert_eq!(acquire(&mut c, 300, 4, &[]), vec![]);
        let out = release(&mut c, 310, 3, Transfer::Received);
        assert_eq!(granted(&out), vec![(4, 4, 2)]);
    }

    #[test]
    fn a_peer_failing_for_old_failures_is_asked_again_while_a_slower_peer_is_full() {
        let mut c = slots(1, 8);
        join(&mut c, 1, OURS, 1, 100);
        join(&mut c, 2, OURS, 1, 100);
        let blocks = OutcomeKind::Success(FetchKind::Blocks);
        // Both have served blocks: peer 1 fast, peer 2 valid but slowly.
        outcome(&mut c, Time(0), 1, blocks, 10_000_000, 10);
        outcome(&mut c, Time(0), 2, blocks, 1_000, 9_900);
        // Peer 1's fetches time out three times at once (our own link was
        // down for a timeout, say): it is failing.
        for request in 0..3 {
            assert_eq!(
                granted(&acquire(&mut c, 0, request, &[2])),
                vec![(request, request, 1)]
            );
            assert_eq!(release(&mut c, 10_000, request, Transfer::Timeout), vec![]);
        }
        // Peer 2 holds its one slot; a request waits for it rather than go
        // to peer 1 while peer 1's failures are recent.
        assert_eq!(granted(&acquire(&mut c, 10_000, 3, &[])), vec![(3, 3, 2)]);
        assert_eq!(acquire(&mut c, 10_000, 4, &[]), vec![]);
        assert_eq!(granted(&acquire(&mut c, 25_999, 5, &[])), vec![]);
        // Three failures fade over twice the first span: from then on peer
        // 1 ranks by its measures again, first, and is asked.
        assert_eq!(granted(&acquire(&mut c, 26_000, 6, &[])), vec![(6, 4, 1)]);
    }

    /// A silent identity that leaves and connects again comes back as it
    /// left, failing, not as a peer never measured (which ranks above a
    /// measured slow one); the records kept of peers that left are
    /// bounded, the earliest to leave forgotten first.
    #[test]
    fn a_peer_comes_back_with_the_record_it_left_with_and_the_records_kept_are_bounded() {
        let mut c = keeping_two_bans();
        join(&mut c, 1, OURS, 1, 100);
        join(&mut c, 2, OURS, 1, 100);
        // Peer 2 serves, slowly; peer 1, never measured, is asked first
        // and times out three times.
        outcome(
            &mut c,
            Time(0),
            2,
            OutcomeKind::Success(FetchKind::Commits),
            1_000,
            9_900,
        );
        assert_eq!(for_range(&mut c, Time(0), 1, 100), vec![peer(1), peer(2)]);
        for _ in 0..3 {
            outcome(&mut c, Time(10_000), 1, OutcomeKind::Timeout, 0, 10_000);
        }
        assert_eq!(
            for_range(&mut c, Time(10_000), 1, 100),
            vec![peer(2), peer(1)]
        );
        // It leaves and is back at once: still ranked below peer 2.
        remove(&mut c, Time(10_001), 1);
        join(&mut c, 1, OURS, 1, 100);
        assert_eq!(
            for_range(&mut c, Time(10_002), 1, 100),
            vec![peer(2), peer(1)]
        );
        assert_eq!(table(&mut c, Time(10_002))[0], (1, true, 1, 100, 3, None));
        // Two records are kept here: peers 1, 3 and 4 leave in turn, and
        // peer 1, the first to leave, comes back unmeasured.
        join(&mut c, 3, OURS, 1, 100);
        join(&mut c, 4, OURS, 1, 100);
        for (at, p) in [(20_000, 1), (20_001, 3), (20_002, 4)] {
            remove(&mut c, Time(at), p);
        }
        assert_eq!(c.departed.len(), 2);
        join(&mut c, 1, OURS, 1, 100);
        assert_eq!(table(&mut c, Time(20_003))[0], (1, true, 1, 100, 0, None));
        assert_eq!(
            for_range(&mut c, Time(20_003), 1, 100),
            vec![peer(1), peer(2)]
        );
    }

    #[test]
    fn a_peer_failing_only_for_refusing_as_busy_is_still_leased_when_the_others_are_full() {
        let mut c = slots(1, 8);
        join(&mut c, 1, OURS, 1, 100);
        join(&mut c, 2, OURS, 1, 100);
        // Peer 2 is measured and good: it ranks first, and holds its slot.
        succeeded(&mut c, Time(0), 2, 10_000_000, 10);
        assert_eq!(granted(&acquire(&mut c, 0, 0, &[])), vec![(0, 0, 2)]);
        // Peer 1 refuses three fetches as busy: ranked with the failing
        // peers, with no fault.
        for request in 1..=3 {
            let lease = request;
            assert_eq!(
                granted(&acquire(&mut c, 1, request, &[])),
                vec![(request, lease, 1)]
            );
            assert_eq!(release(&mut c, 1, lease, Transfer::Busy), vec![]);
        }
        // It is loaded, not at fault: the next request still goes to it.
        assert_eq!(granted(&acquire(&mut c, 2, 4, &[])), vec![(4, 4, 1)]);
    }

    #[test]
    fn refusals_as_busy_of_a_peer_serving_us_nothing_rank_it_failing_for_a_doubling_while() {
        let mut c = slots(4, 8);
        join(&mut c, 1, OURS, 1, 100);
        join(&mut c, 2, OURS, 1, 100);
        let success = OutcomeKind::Success(FetchKind::Commits);
        // Peer 1 serves commits at 10 MB/s, peer 2 at 100 KB/s.
        for (p, bytes) in [(1, 100_000), (2, 1_000)] {
            outcome(&mut c, Time(0), p, success, bytes, 10);
        }
        let first = |c: &mut PeerHeightsCore, now: u64| for_range(c, Time(now), 1, 100)[0];
        assert_eq!(first(&mut c, 0), peer(1));
        // Each refusal of a fetch while peer 1 serves no other of ours
        // ranks it below peer 2: 1 s, then 2, 4 and 8 s, and no longer.
        let mut request = 0;
        let mut refuse = |c: &mut PeerHeightsCore, now: u64| {
            request += 1;
            let (_, lease, p) = granted(&acquire(c, now, request, &[2]))[0];
            assert_eq!(p, 1);
            assert_eq!(release(c, now, lease, Transfer::Busy), vec![]);
        };
        let mut at = 100;
        for loaded in [1_000, 2_000, 4_000, 8_000, 8_000] {
            refuse(&mut c, at);
            assert_eq!(first(&mut c, at + loaded - 1), peer(2), "{at} {loaded}");
            assert_eq!(first(&mut c, at + loaded), peer(1), "{at} {loaded}");
            at += loaded;
        }
        // A verified answer ends the run: the next refusal counts 1 s.
        outcome(&mut c, Time(at), 1, success, 100_000, 10);
        refuse(&mut c, at);
        assert_eq!(first(&mut c, at + 999), peer(2));
        assert_eq!(first(&mut c, at + 1_000), peer(1));
        // A refusal while it serves another fetch of ours says we sent
        // too many: its slots learn it, and its rank stays.
        at += 1_000;
        outcome(&mut c, Time(at), 1, success, 100_000, 10);
        let (_, serving, _) = granted(&acquire(&mut c, at, 100, &[2]))[0];
        refuse(&mut c, at);
        assert_eq!(first(&mut c, at), peer(1));
        release(&mut c, at, serving, Transfer::Received);
        // No refusal was a failure or a fault; its slots are the one fetch
        // it served at the last.
        let view = snapshot(&mut c, Time(at))
            .into_iter()
            .find(|v| v.peer == peer(1))
            .unwrap();
        assert_eq!(
            (view.failures, view.faults, view.busy_slots),
            (0, 0, Some(1))
        );
    }

    #[test]
    fn a_peer_is_leased_at_most_max_fetches_per_peer_at_once() {
        let mut c = slots(2, 8);
        join(&mut c, 1, OURS, 1, 100);
        assert_eq!(granted(&acquire(&mut c, 0, 0, &[])), vec![(0, 0, 1)]);
        assert_eq!(granted(&acquire(&mut c, 0, 1, &[])), vec![(1, 1, 1)]);
        // The third waits: no answer yet.
        assert_eq!(acquire(&mut c, 0, 2, &[]), vec![]);
        // A release hands its slot to the waiting request at once.
        assert_eq!(
            granted(&release(&mut c, 5, 0, Transfer::Received)),
            vec![(2, 2, 1)]
        );
        assert_eq!(acquire(&mut c, 5, 3, &[]), vec![]);
    }

    #[test]
    fn a_peer_that_refuses_as_busy_gets_the_slots_it_served_then_earns_them_back() {
        let mut c = slots(4, 8);
        join(&mut c, 1, OURS, 1, 100);
        for request in 0..4 {
            assert_eq!(granted(&acquire(&mut c, 0, request, &[])).len(), 1);
        }
        // It serves 2 at once: the 4th is refused while 3 are leased, then
        // the 3rd while 2 are.
        assert_eq!(release(&mut c, 1, 3, Transfer::Busy), vec![]);
        assert_eq!(release(&mut c, 1, 2, Transfer::Busy), vec![]);
        // 2 leased, 2 slots: a new request waits, it is not sent.
        assert_eq!(acquire(&mut c, 2, 4, &[]), vec![]);
        // A slot freed goes to the waiting request, and no more.
        assert_eq!(
            granted(&release(&mut c, 3, 0, Transfer::Received)),
            vec![(4, 4, 1)]
        );
        assert_eq!(acquire(&mut c, 3, 5, &[]), vec![]);
        // A verified answer earns one slot back: the waiting request goes
        // at once, and the next waits again (3 leased, 3 slots).
        let out = succeeded(&mut c, Time(4), 1, 1_000, 10);
        assert_eq!(granted(&out), vec![(5, 5, 1)]);
        assert_eq!(acquire(&mut c, 4, 6, &[]), vec![]);
        // Answers up to the configured 4 slots, never past them.
        let out = succeeded(&mut c, Time(5), 1, 1_000, 10);
        assert_eq!(granted(&out), vec![(6, 6, 1)]);
        succeeded(&mut c, Time(6), 1, 1_000, 10);
        assert_eq!(acquire(&mut c, 6, 7, &[]), vec![], "4 leased, 4 slots");
        // Busy is load, not a fault.
        assert_eq!(c.peers[&peer(1)].faults, 0);
    }

    #[test]
    fn a_busy_peer_hands_the_request_to_the_next_best_free_one() {
        let mut c = slots(1, 8);
        join(&mut c, 1, OURS, 1, 100);
        join(&mut c, 2, OURS, 1, 100);
        let first = granted(&acquire(&mut c, 0, 0, &[]))[0].2;
        let second = granted(&acquire(&mut c, 0, 1, &[]))[0].2;
        assert_eq!(
            std::collections::BTreeSet::from([first, second]),
            std::collections::BTreeSet::from([1, 2])
        );
    }

    #[test]
    fn avoided_or_missing_peers_leave_no_peer_and_waiting_requests_expire_busy() {
        let mut c = slots(1, 8);
        assert_eq!(
            refused(&acquire(&mut c, 0, 0, &[])),
            vec![(0, AcquireError::NoPeer)]
        );
        join(&mut c, 1, OURS, 1, 100);
        assert_eq!(
            refused(&acquire(&mut c, 0, 1, &[1])),
            vec![(1, AcquireError::NoPeer)]
        );
        assert_eq!(granted(&acquire(&mut c, 0, 2, &[])), vec![(2, 0, 1)]);
        assert_eq!(acquire(&mut c, 0, 3, &[]), vec![]);
        // Its wait (1 s) is over at the first input after it.
        assert_eq!(highest(&mut c, Time(999)), Some(100));
        assert_eq!(
            refused(&c.handle(Time(1_000), Input::HighestKnown)),
            vec![(3, AcquireError::Busy)]
        );
        // A waiting request whose only peer leaves has no peer any more.
        assert_eq!(acquire(&mut c, 1_000, 4, &[]), vec![]);
        let out = c.handle(Time(1_001), Input::Remove(RemovePeer { peer: peer(1) }));
        assert_eq!(refused(&out), vec![(4, AcquireError::NoPeer)]);
    }

    #[test]
    fn waiting_requests_are_bounded() {
        let mut c = slots(1, 2);
        join(&mut c, 1, OURS, 1, 100);
        assert_eq!(granted(&acquire(&mut c, 0, 0, &[])).len(), 1);
        assert_eq!(acquire(&mut c, 0, 1, &[]), vec![]);
        assert_eq!(acquire(&mut c, 0, 2, &[]), vec![]);
        assert_eq!(
            refused(&acquire(&mut c, 0, 3, &[])),
            vec![(3, AcquireError::Busy)]
        );
    }

    /// A request for blocks 1..=100 that may not wait, avoiding `avoid`,
    /// for a peer with room to spare if `spare_only`.
    fn acquire_now(
        c: &mut PeerHeightsCore,
        now: u64,
        request: u64,
        avoid: &[u8],
        spare_only: bool,
    ) -> Vec<Output> {
        let acquire = Acquire {
            request,
            start: 1,
            end: 100,
            kind: FetchKind::Blocks,
            avoid: avoid.iter().map(|p| peer(*p)).collect(),
            wait_ms: 0,
            spare_only,
        };
        c.handle(Time(now), Input::Acquire(acquire))
    }

    #[test]
    fn a_request_that_may_not_wait_gets_a_slot_free_now_or_is_refused_at_once() {
        let mut c = slots(1, 8);
        join(&mut c, 1, OURS, 1, 100);
        join(&mut c, 2, OURS, 1, 100);
        // Peer 1 taken: the slot free now is peer 2's.
        let out = acquire_now(&mut c, 0, 0, &[2], false);
        assert_eq!(granted(&out), vec![(0, 0, 1)]);
        let out = acquire_now(&mut c, 0, 1, &[1], false);
        assert_eq!(granted(&out), vec![(1, 1, 2)]);
        // Both taken: refused at once, and never granted later.
        let out = acquire_now(&mut c, 0, 2, &[], false);
        assert_eq!(refused(&out), vec![(2, AcquireError::Busy)]);
        assert_eq!(release(&mut c, 1, 0, Transfer::Cancelled), vec![]);
        assert_eq!(granted(&acquire(&mut c, 1, 3, &[])), vec![(3, 2, 1)]);
        // No peer for the range at all is told as such.
        let out = acquire_now(&mut c, 1, 4, &[1, 2], false);
        assert_eq!(refused(&out), vec![(4, AcquireError::NoPeer)]);
    }

    #[test]
    fn a_request_for_room_to_spare_passes_over_a_peer_that_refused_us_or_is_of_a_lower_standing() {
        let mut c = slots(2, 8);
        join(&mut c, 1, OURS, 1, 100);
        join(&mut c, 2, OURS, 1, 100);
        // Peer 1 refuses one of two fetches as busy: loaded by us, not
        // ranked loaded, its slots shrunk to the one it served.
        assert_eq!(
            granted(&acquire_now(&mut c, 0, 0, &[2], false)),
            vec![(0, 0, 1)]
        );
        assert_eq!(
            granted(&acquire_now(&mut c, 0, 1, &[2], false)),
            vec![(1, 1, 1)]
        );
        assert_eq!(release(&mut c, 0, 0, Transfer::Busy), vec![]);
        assert_eq!(release(&mut c, 0, 1, Transfer::Received), vec![]);
        // Its slot is free, but it has no room to spare.
        let out = acquire_now(&mut c, 0, 2, &[2], true);
        assert_eq!(refused(&out), vec![(2, AcquireError::Busy)]);
        assert_eq!(
            granted(&acquire_now(&mut c, 0, 3, &[2], false)),
            vec![(3, 2, 1)]
        );
        assert_eq!(
            granted(&acquire_now(&mut c, 0, 4, &[], true)),
            vec![(4, 3, 2)]
        );
        // A verified answer earns its slot back: room to spare again.
        assert_eq!(release(&mut c, 0, 2, Transfer::Received), vec![]);
        delivered(&mut c, 1, FetchKind::Blocks, (1_000_000, 10), (1, 1));
        assert_eq!(
            granted(&acquire_now(&mut c, 0, 5, &[2], true)),
            vec![(5, 4, 1)]
        );
        // A peer never measured has no room to spare while a good one
        // covers the range (it may be a silent one), even a full one.
        join(&mut c, 3, OURS, 1, 100);
        assert_eq!(
            granted(&acquire_now(&mut c, 0, 6, &[2, 3], false)),
            vec![(6, 5, 1)]
        );
        let out = acquire_now(&mut c, 0, 7, &[2], true);
        assert_eq!(refused(&out), vec![(7, AcquireError::Busy)]);
        assert_eq!(
            granted(&acquire_now(&mut c, 0, 8, &[2], false)),
            vec![(8, 6, 3)]
        );
    }

    #[test]
    fn a_release_scores_the_transfer_and_judges_not_found_by_the_leased_range() {
        let mut c = slots(4, 8);
        join(&mut c, 1, OURS, 1, 100);
        acquire(&mut c, 0, 0, &[]);
        acquire(&mut c, 0, 1, &[]);
        acquire(&mut c, 0, 2, &[]);
        // A timeout counts a failure; a transfer received (judged later)
        // and a cancelled one count nothing.
        assert_eq!(release(&mut c, 0, 0, Transfer::Timeout), vec![]);
        assert_eq!(release(&mut c, 0, 1, Transfer::Received), vec![]);
        assert_eq!(table(&mut c, Time(0)), vec![(1, true, 1, 100, 1, None)]);
        // NOT_FOUND for 1..=100, leased as inside its claim: a lie.
        assert_eq!(
            release(&mut c, 0, 2, Transfer::NotFound),
            vec![Output::Banned {
                peer: peer(1),
                until: Time(60_000)
            }]
        );
        // A lease released twice, or unknown, changes nothing.
        assert_eq!(release(&mut c, 0, 2, Transfer::Timeout), vec![]);
        assert_eq!(
            table(&mut c, Time(0)),
            vec![(1, true, 1, 100, 2, Some(60_000))]
        );
    }

    #[test]
    fn blocks_withheld_are_an_error_then_a_ban_once_they_prove_to_exist() {
        let mut c = slots(4, 8);
        join(&mut c, 1, OURS, 1, 100);
        join(&mut c, 2, OURS, 1, 100);
        for (request, p) in [(0, 1), (1, 2)] {
            let other = 3 - p;
            assert_eq!(granted(&acquire(&mut c, 0, request, &[other]))[0].2, p);
        }
        // Both deny blocks of commits they were leased for, so claimed:
        // an error now, no ban, since the blocks may be a forgery no one
        // holds.
        assert_eq!(release(&mut c, 0, 0, Transfer::Withheld), vec![]);
        assert_eq!(release(&mut c, 0, 1, Transfer::Withheld), vec![]);
        assert_eq!(
            table(&mut c, Time(0)),
            vec![(1, true, 1, 100, 1, None), (2, true, 1, 100, 1, None)]
        );
        // Peer 1 then claims to have pruned them, peer 2 leaves: neither
        // undoes what it answered.
        update(&mut c, 1, OURS, 101, 200);
        c.handle(Time(0), Input::Remove(RemovePeer { peer: peer(2) }));
        // The blocks existed (their batch is applied): both lied.
        let until = Time(60_000);
        for p in [1, 2] {
            assert_eq!(
                outcome(&mut c, Time(0), p, OutcomeKind::Withheld, 0, 0),
                vec![Output::Banned {
                    peer: peer(p),
                    until
                }]
            );
        }
        // Counted once, when it answered.
        assert_eq!(
            table(&mut c, Time(0))[0],
            (1, true, 101, 200, 1, Some(60_000))
        );
    }

    #[test]
    fn a_range_is_covered_wherever_a_fetch_of_its_kind_could_be_leased() {
        let mut c = core(1);
        join(&mut c, 1, OURS, 1, 1_000);
        join(&mut c, 2, OURS, 1, 100);
        let covers = |c: &mut PeerHeightsCore, now, kind, (start, end), avoid: &[u8]| {
            let avoid = avoid.iter().map(|p| peer(*p)).collect();
            let input = Input::CoversRange(CoversRange {
                kind,
                start,
                end,
                avoid,
            });
            c.handle(Time(now), input) == vec![Output::Claims(true)]
        };
        let commits = FetchKind::Commits;
        assert!(covers(&mut c, 0, commits, (201, 201), &[]));
        assert!(covers(&mut c, 0, commits, (50, 50), &[1]));
        assert!(!covers(&mut c, 0, commits, (201, 201), &[1]));
        assert!(!covers(&mut c, 0, commits, (1_001, 1_001), &[]));
        // Peer 1's claim above 200 in doubt: still covered, as a lease
        // there would take it as the last resort, and for blocks, whose
        // leases doubt does not touch.
        let (low, 1) = lease_for(&mut c, 0, commits, (201, 201)).unwrap() else {
            panic!("peer 1 claims 201");
        };
        assert_eq!(
            c.handle(Time(100), Input::Unanswered { lease: low }),
            vec![]
        );
        assert_eq!(view(&mut c, 100).1, Some(200));
        assert!(covers(&mut c, 100, commits, (201, 201), &[2]));
        assert!(covers(&mut c, 100, FetchKind::Blocks, (201, 300), &[2]));
        // A slot free or not: peer 1's only one is held by that lease.
        assert!(covers(&mut c, 100, commits, (1, 1), &[2]));
    }

    #[test]
    fn a_claim_is_judged_on_the_view_now() {
        let mut c = slots(1, 8);
        join(&mut c, 1, OURS, 10, 100);
        let claims = |c: &mut PeerHeightsCore, p: u8, start, end| {
            let input = Input::ClaimsRange(ClaimsRange {
                peer: peer(p),
                start,
                end,
            });
            c.handle(Time(0), input)
        };
        let yes = vec![Output::Claims(true)];
        let no = vec![Output::Claims(false)];
        assert_eq!(claims(&mut c, 1, 10, 100), yes);
        assert_eq!(claims(&mut c, 1, 9, 100), no);
        assert_eq!(claims(&mut c, 1, 10, 101), no);
        // Unknown peers claim nothing.
        assert_eq!(claims(&mut c, 2, 10, 100), no);
        // Its new lowest commit, once heard, ends the claim below it.
        update(&mut c, 1, OURS, 51, 120);
        assert_eq!(claims(&mut c, 1, 10, 100), no);
        assert_eq!(claims(&mut c, 1, 51, 120), yes);
        // A lower highest does not: it is judged on the most it claimed,
        // though fetches are leased on what it claims now.
        update(&mut c, 1, OURS, 51, 0);
        assert_eq!(claims(&mut c, 1, 51, 120), yes);
        assert_eq!(claims(&mut c, 1, 51, 121), no);
        assert_eq!(for_range(&mut c, Time(0), 51, 60), Vec::<PeerId>::new());
        // Pushes count too.
        push(&mut c, Time(0), 1, 130);
        assert_eq!(claims(&mut c, 1, 121, 130), yes);
    }

    #[test]
    fn a_restart_keeps_the_bans_and_the_leases_of_running_fetches() {
        let mut c = slots(1, 8);
        join(&mut c, 1, OURS, 1, 100);
        join(&mut c, 2, OURS, 1, 100);
        outcome(&mut c, Time(0), 2, OutcomeKind::InvalidData, 0, 1);
        assert_eq!(granted(&acquire(&mut c, 0, 0, &[])), vec![(0, 0, 1)]);
        let mut restarted = PeerHeightsCore::new(c.restart_init());
        // Heights start empty; the peers connected are told again.
        assert_eq!(highest(&mut restarted, Time(10)), None);
        join(&mut restarted, 1, OURS, 1, 100);
        join(&mut restarted, 2, OURS, 1, 100);
        assert_eq!(
            table(&mut restarted, Time(10)),
            vec![
                (1, true, 1, 100, 0, None),
                (2, true, 1, 100, 0, Some(60_000))
            ]
        );
        // Peer 1's one slot is still held by the running fetch, and peer 2
        // is banned: the request waits, and gets the slot when the fetch
        // leased before the restart ends. New leases take new ids.
        assert_eq!(acquire(&mut restarted, 10, 1, &[]), vec![]);
        assert_eq!(
            granted(&release(&mut restarted, 20, 0, Transfer::Received)),
            vec![(1, 1, 1)]
        );
    }
}
