//! When a late fetch also asks a second peer (a hedge), shared by the
//! actor's workers.
//!
//! A fetch waits for its peer alone for four times the usual answer time
//! of its kind: the lower median of the moving averages of the peers that
//! recently served verified data of that kind, one average per peer. A
//! peer's answers move only its own average, and the median moves only
//! when more than half of the peers serving are slow. So a peer that
//! answers just before the delay, again and again, cannot stretch it: with
//! one average of every answer, each of its answers raised the delay by up
//! to three quarters, and a dozen of them took it to half the request
//! timeout, where every fetch a silent peer held waited that long before
//! another peer was asked. Only answers that passed verification count: a
//! liar's instant garbage cannot shorten it either.
//!
//! The fetches of the batch after the last one applied are what the
//! pipeline waits on, since batches are applied in order: those wait only
//! twice the usual time (before any fetch of their kind answered, twice
//! the height queries' round trip, not the 100 ms floor that a peer that
//! never answers would otherwise cost each catch-up; at least
//! [`HEAD_HEDGE_MIN`]). A peer that serves
//! honestly but holds each answer as long as no other peer's beats it is
//! never slow enough to be hedged at four times the usual time, and one
//! such fetch at the head of the pipeline held a catch-up of 0.18 s up
//! about threefold (docs/benchmarks.md, "A peer that answers just before
//! it is beaten"); at twice, it holds it up little more than an honest
//! answer's time. A late fetch reads its delay again every
//! [`HEAD_HEDGE_MIN`], so one that reaches the head as the batches before
//! it are applied is hedged then.
//!
//! Peers count only where they are the majority of those serving, and
//! identities are free in public mode: a majority of them serving verified
//! data slowly can take the usual time up to half the request timeout. A
//! fetch the pipeline waits on is therefore hedged after a tenth of the
//! timeout at the latest, whatever the peers' averages: the most such a
//! majority can hold up each batch, bounded by the node's own setting.
//!
//! Only answers of all that was asked count. A commit answer may end
//! early (at an epoch's end, the server's byte budget, or any commit it
//! can certify), and its time says little of a whole one's: counted as
//! they came, peers answering each commit fetch at once with one commit
//! brought the usual time down to nothing, and the delay to its floor, so
//! that every honest fetch slower than the floor was also asked of a
//! second peer, which such a peer would answer with one commit again.
//! Counted as the time the whole would take at their pace, honest peers
//! whose answers end at their own batch ends looked slow, and where they
//! were most of those measured the delay grew with them.
//!
//! The table is bounded ([`HEDGE_PEERS`]): when it is full, a newcomer
//! replaces an entry not updated in the last [`HEDGE_STALE_ANSWERS`]
//! answers, else the slowest entry if it is slower than the newcomer, so
//! identities minted to answer slowly displace only each other, never the
//! faster peers the median is taken from. An entry that stops being
//! updated (a peer gone, or no longer asked) stops counting once that many
//! other answers came: the delay follows the peers that serve now.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;

use soma_types::{CommitIndex, PeerId};

use crate::peer_heights::FetchKind;

/// Earliest a late fetch asks a second peer, unless the pipeline waits on
/// it; also how often a hedge looks again for a second peer while none
/// covers the range.
pub const HEDGE_MIN: Duration = Duration::from_millis(100);

/// Earliest a late fetch at the head of the pipeline asks a second peer;
/// also how often a late fetch reads its delay again.
pub const HEAD_HEDGE_MIN: Duration = Duration::from_millis(20);

/// Peers whose answer times are kept, per kind of fetch.
pub const HEDGE_PEERS: usize = 32;

/// Answers of a kind after which a peer's average, not updated by any of
/// them, no longer counts.
pub const HEDGE_STALE_ANSWERS: u64 = 1_000;

/// Peers whose own averages are kept, each apart from the median's
/// table (per kind of fetch, of answers of all that was asked; and of
/// height queries' round trips): when full, the one heard from least
/// recently gives way, and an entry not updated in
/// [`HEDGE_STALE_ANSWERS`] answers of its table no longer counts.
/// Connected peers are queried every round, so this holds the round trip
/// of every peer a node connects to unless it keeps about as many
/// connections as that (64 by default).
pub const HEDGE_PEERS_APART: usize = 1_024;

/// When a fetch still unanswered also asks a second peer: after four times
/// the usual answer time of the peers that served verified data of its
/// kind (the lower median of their averages; see the module), at least
/// [`HEDGE_MIN`]. While none has, the round trip to peers stands in for
/// it: four times the recent answer time of height queries, which come
/// before any fetch (a peer slow to serve the first fetch would otherwise
/// hold sync up for a fixed part of the timeout), but never more than that
/// fixed part, a twentieth of the request timeout, so peers slow to answer
/// queries cannot stretch it. With neither, that twentieth; never past
/// half the timeout.
#[derive(Clone, Debug, Default)]
pub struct Hedging {
    fetches: Arc<Mutex<Fetches>>,
    /// The last commit applied: fetches of the batch after it are what
    /// the pipeline waits on.
    applied: Arc<AtomicU64>,
    /// Moving average of height queries' answer times, in milliseconds
    /// (0: none yet).
    queries_ms: Arc<AtomicU64>,
}

#[derive(Debug, Default)]
struct Fetches {
    commits: PeerTimes,
    blocks: PeerTimes,
    /// Each peer's own average answer time of whole commit answers, of
    /// block answers, and of height queries: unlike the median's tables,
    /// a slow peer is not pushed out by faster ones.
    own_commits: PeerAverages,
    own_blocks: PeerAverages,
    queries: PeerAverages,
}

/// Moving averages of answer times, per peer: at most
/// [`HEDGE_PEERS_APART`], the one updated least recently replaced.
#[derive(Debug, Default)]
struct PeerAverages {
    /// Answers recorded so far.
    answers: u64,
    /// In the order they came (no hash order: a simulated run is the same
    /// for the same inputs).
    peers: Vec<PeerTime>,
}

impl PeerAverages {
    fn record(&mut self, peer: PeerId, latency_ms: u64) {
        let Some(new) = moved((&mut self.peers, &mut self.answers), peer, latency_ms) else {
            return;
        };
        if self.peers.len() < HEDGE_PEERS_APART {
            self.peers.push(new);
        } else if let Some(oldest) = self.peers.iter_mut().min_by_key(|t| t.updated) {
            *oldest = new;
        }
    }

    /// `peer`'s average, unless [`HEDGE_STALE_ANSWERS`] answers came
    /// since it was last updated: a peer measured fast once and loaded now
    /// is not held to that for ever.
    fn of_peer(&self, peer: PeerId) -> Option<u64> {
        let t = self.peers.iter().find(|t| t.peer == peer)?;
        let stale = self.answers.saturating_sub(t.updated) > HEDGE_STALE_ANSWERS;
        (!stale).then_some(t.average_ms)
    }
}

/// One kind's answer times, per peer.
#[derive(Debug, Default)]
struct PeerTimes {
    /// Answers recorded so far.
    answers: u64,
    /// At most [`HEDGE_PEERS`], in the order they came: no hash order, so
    /// a simulated run is the same for the same inputs.
    peers: Vec<PeerTime>,
}

#[derive(Clone, Copy, Debug)]
struct PeerTime {
    peer: PeerId,
    /// Moving average, in milliseconds, at least 1.
    average_ms: u64,
    /// `answers` when it was last updated.
    updated: u64,
}

impl PeerTimes {
    fn stale(&self, t: &PeerTime) -> bool {
        self.answers.saturating_sub(t.updated) > HEDGE_STALE_ANSWERS
    }

    fn record(&mut self, peer: PeerId, latency_ms: u64) {
        let Some(new) = moved((&mut self.peers, &mut self.answers), peer, latency_ms) else {
            return;
        };
        let sample = new.average_ms;
        if self.peers.len() < HEDGE_PEERS {
            self.peers.push(new);
            return;
        }
        let stale = self.peers.iter().position(|t| self.stale(t));
        let slowest = || {
            (self.peers.iter().enumerate())
                .max_by_key(|(_, t)| t.average_ms)
                .filter(|(_, t)| t.average_ms > sample)
                .map(|(i, _)| i)
        };
        if let Some(i) = stale.or_else(slowest) {
            self.peers[i] = new;
        }
    }

    /// The answer time fetches are judged by (0: none yet): the lower
    /// median of the current averages, so a fetch is late by the measure
    /// of at least half the peers serving, and peers that answer slowly
    /// stretch it only if they are more than half of those.
    fn expected_ms(&self) -> u64 {
        let mut current = [0u64; HEDGE_PEERS];
        let mut n = 0;
        for t in self.peers.iter().filter(|t| !self.stale(t)) {
            current[n] = t.average_ms;
            n += 1;
        }
        if n == 0 {
            return 0;
        }
        *current[..n].select_nth_unstable((n - 1) / 2).1
    }
}

/// Counts an answer of `peer` in `latency_ms` in `answers`, and moves its
/// average in `peers` if it has one; otherwise returns its first entry,
/// for the table to place as its rule says.
fn moved(
    (peers, answers): (&mut [PeerTime], &mut u64),
    peer: PeerId,
    latency_ms: u64,
) -> Option<PeerTime> {
    let sample = latency_ms.max(1);
    *answers += 1;
    let now = *answers;
    if let Some(t) = peers.iter_mut().find(|t| t.peer == peer) {
        t.average_ms = average(t.average_ms, sample);
        t.updated = now;
        return None;
    }
    Some(PeerTime {
        peer,
        average_ms: sample,
        updated: now,
    })
}

/// A moving average with weight 1/4 on the new sample.
fn average(old: u64, sample: u64) -> u64 {
    match old {
        0 => sample,
        old => (old.saturating_mul(3).saturating_add(sample)) / 4,
    }
}

impl Fetches {
    fn of(&mut self, kind: FetchKind) -> &mut PeerTimes {
        match kind {
            FetchKind::Commits => &mut self.commits,
            FetchKind::Blocks => &mut self.blocks,
        }
    }

    fn own(&mut self, kind: FetchKind) -> &mut PeerAverages {
        match kind {
            FetchKind::Commits => &mut self.own_commits,
            FetchKind::Blocks => &mut self.own_blocks,
        }
    }
}

impl Hedging {
    fn fetches(&self) -> std::sync::MutexGuard<'_, Fetches> {
        // A panic elsewhere while it was held leaves averages, not
        // invariants: keep using them.
        lock(&self.fetches)
    }

    /// `peer` answered a fetch of `kind` in `latency_ms` with `got` of the
    /// `asked` items (commits; a block fetch is answered whole or not at
    /// all), and what it sent passed verification. Only an answer of all
    /// that was asked counts.
    pub fn answered(
        &self,
        kind: FetchKind,
        peer: PeerId,
        latency_ms: u64,
        (got, asked): (u64, u64),
    ) {
        if got >= asked {
            let mut fetches = self.fetches();
            fetches.of(kind).record(peer, latency_ms);
            fetches.own(kind).record(peer, latency_ms);
        }
    }

    /// `peer` answered a height query in `latency_ms`.
    pub fn queried(&self, peer: PeerId, latency_ms: u64) {
        self.fetches().queries.record(peer, latency_ms);
        // Updates may race and one be lost: an estimate, not a count.
        let old = self.queries_ms.load(Ordering::Relaxed);
        let new = average(old, latency_ms.max(1));
        self.queries_ms.store(new, Ordering::Relaxed);
    }

    /// Commits up to `last` are applied.
    pub fn applied(&self, last: CommitIndex) {
        self.applied.fetch_max(last, Ordering::Relaxed);
    }

    /// The usual answer time of fetches of `kind` and of height queries
    /// (0: none answered yet).
    fn usual_ms(&self, kind: FetchKind) -> (u64, u64) {
        let fetches = self.fetches().of(kind).expected_ms();
        (fetches, self.queries_ms.load(Ordering::Relaxed))
    }

    /// How long a fetch of `kind` that the pipeline does not wait on, or
    /// another question to a peer, waits for that peer alone: four times
    /// the usual answer time, within [`HEDGE_MIN`] and half `timeout`.
    /// Also how long a hedge may go unanswered before its peer is late
    /// when the first peer's answer ends the race: never the shorter wait
    /// of a fetch at the head of the pipeline, which decides when to ask
    /// a second peer sooner, not how slow a peer is.
    pub fn usual_delay(&self, kind: FetchKind, timeout: Duration) -> Duration {
        let (fetches, queries) = self.usual_ms(kind);
        hedge_delay(fetches, queries, timeout)
    }

    /// How long a call for a fetch of `kind` goes unanswered before its
    /// peer is late: [`Self::usual_delay`], the longer of its value
    /// `at_send` (when the call was sent) and now, never the shorter wait
    /// of a fetch at the head of the pipeline.
    pub fn late_after(&self, kind: FetchKind, timeout: Duration, at_send: Duration) -> Duration {
        at_send.max(self.usual_delay(kind, timeout))
    }

    /// How long, from when it was sent, the first call of a fetch of
    /// `kind` to `peer` is waited for once a hedge answered the fetch with
    /// only a part of what was asked, and whether, still unanswered then,
    /// it is beaten by that part ([`PartWait`]). A commit answer may end at
    /// any commit its server can certify: taken as soon as it came,
    /// identities answering each hedge at once with one commit ended every
    /// race they were hedged into, and a node whose usual answer time they
    /// set (their whole answers are fast) fetched a commit per race while
    /// the honest first calls it dropped would have brought the whole
    /// batch.
    ///
    /// The wait is the late mark ([`Self::late_after`], from `at_send`),
    /// or longer: four times `peer`'s own average answer time for the kind
    /// (of answers of all that was asked, kept apart from the median's
    /// table, so a far peer is not pushed out by faster ones), else four
    /// times its height queries' round trip, else a tenth of `timeout`;
    /// never past that tenth (the most a fetch the pipeline waits on is
    /// held before it is hedged). A peer measured for the kind is beaten
    /// once it has had that time; one not measured, only if it had the
    /// whole tenth (answering queries slowly to be waited for long).
    /// Charged on a round trip, a loaded honest validator never measured
    /// for the kind (at the start of a catch-up, none is) would rank lower
    /// for each part of an identity's that outran it, and three such
    /// failures rank it failing for blocks too. So a silent identity that
    /// answers queries fast is not charged here either: leased first where
    /// the measured peers are full, it holds a part for the late mark or
    /// four times its trip, and nothing more. Nor is a peer beaten whose
    /// late mark is past the tenth (a slow majority).
    pub fn part_wait(
        &self,
        (kind, peer): (FetchKind, PeerId),
        timeout: Duration,
        at_send: Duration,
    ) -> PartWait {
        let late = self.late_after(kind, timeout, at_send);
        let most = timeout / 10;
        let four_times = |ms: u64| Duration::from_millis(ms.saturating_mul(4));
        let (own, trip) = {
            let mut fetches = self.fetches();
            let own = fetches.own(kind).of_peer(peer);
            (own, fetches.queries.of_peer(peer))
        };
        let own = own.map(four_times);
        let basis = own.or(trip.map(four_times)).unwrap_or(Duration::MAX);
        let wait = late.max(basis.min(most)).min(most);
        let beaten = late <= most && (own.is_some() || basis >= most);
        PartWait { wait, beaten }
    }

    /// How long the hedge of a fetch of `kind` for commits from `start`
    /// on goes unanswered before it moves on to a peer not yet asked: as
    /// long as makes its peer late ([`Self::late_after`], from `at_send`),
    /// but while the pipeline waits on the fetch, no longer than the fetch
    /// waited for its first peer alone ([`Self::delay`]: at most a tenth
    /// of `timeout`). Identities serving verified data slowly, made the
    /// majority of those measured, stretch the time that makes a peer
    /// late up to half the timeout, and each silent identity a hedge of
    /// the head of the pipeline moved to would have held it that long.
    pub fn move_delay(
        &self,
        (kind, start): (FetchKind, CommitIndex),
        batch: u64,
        timeout: Duration,
        at_send: Duration,
    ) -> Duration {
        let late = self.late_after(kind, timeout, at_send);
        match self.at_head(start, batch) {
            true => late.min(self.delay((kind, start), batch, timeout)),
            false => late,
        }
    }

    /// Whether a fetch for commits from `start` on is one the pipeline
    /// waits on: within the `batch` commits after the last applied.
    pub fn at_head(&self, start: CommitIndex, batch: u64) -> bool {
        let applied = self.applied.load(Ordering::Relaxed);
        start <= applied.saturating_add(batch.max(1))
    }

    /// How long a fetch of `kind` for commits from `start` on waits for
    /// its peer alone. A fetch within the `batch` commits after the last
    /// applied is one the pipeline waits on: it waits only twice the usual
    /// answer time (before any fetch of its kind answered, twice the height
    /// queries' round trip), at least [`HEAD_HEDGE_MIN`] and at most a
    /// tenth of `timeout`, so a peer that
    /// holds each answer as long as it is not beaten, or never answers,
    /// holds that fetch no longer.
    pub fn delay(
        &self,
        (kind, start): (FetchKind, CommitIndex),
        batch: u64,
        timeout: Duration,
    ) -> Duration {
        let (fetches, queries) = self.usual_ms(kind);
        let delay = hedge_delay(fetches, queries, timeout);
        let head = self.at_head(start, batch);
        // Before any fetch answered, the round trip of height queries.
        let usual = if fetches > 0 { fetches } else { queries };
        if head && usual > 0 {
            let twice = Duration::from_millis(usual.saturating_mul(2));
            return twice.max(HEAD_HEDGE_MIN).min(delay).min(timeout / 10);
        }
        delay
    }
}

/// How long a first call is waited for once a hedge brought only a part
/// of what was asked ([`Hedging::part_wait`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PartWait {
    /// From when the first call was sent.
    pub wait: Duration,
    /// Whether the first peer, unanswered that long, is beaten by the part
    /// (ranked lower once it passes its checks).
    pub beaten: bool,
}

/// Bytes that hedges in flight may hold, shared by the actor's workers.
///
/// A hedged fetch runs two calls until one answers, and the first keeps
/// what its peer sent so far: a peer that sends all but the end of an
/// answer and then stalls makes the fetch hold up to twice what the core
/// reserved for it. A hedge therefore takes its fetch's reservation from
/// this budget before it is sent, and gives it back when the race ends,
/// so hedges hold at most `max_hedged_bytes` beyond the core's
/// `max_total_fetched_bytes`. A hedge larger than the whole budget takes
/// all of it: it is sent only when no other hedge is in flight. Hedges
/// wait in the order they asked, so a large one is not passed over for
/// ever by small ones; the first ask of a hedge of a fetch the pipeline
/// waits on goes before the asks of the others.
///
/// A hedge holds its share only while it is not late itself
/// ([`Self::wanted`]): once its peer has gone unanswered as long as makes
/// a peer late, it gives the share up as soon as a hedge waiting for room
/// lacks it, the oldest late first and only as many as the waiting lack,
/// counting what the late hedges already told will give back. Hedges of
/// fetches the pipeline waited on when they became late give way last.
/// Held until its answer or the request timeout, a share was a hedge's
/// whatever its
/// peer did: identities that are free to mint, made first and second peer
/// of a few fetches at once and never answering either, held the whole
/// budget for the timeout, and every other late fetch, the one the
/// pipeline waits on included, waited that long for room. A hedge that
/// gave way and asks again takes room back only from hedges given room
/// after it gave way (its turn comes round), not from hedges late before:
/// one waiting hedge does not set off a chain of them. (Room is given in
/// turn, so room a hedge behind it makes an older late hedge give up may
/// still come to it first.)
#[derive(Clone, Debug)]
pub(super) struct HedgeBudget {
    capacity_kib: u32,
    state: Arc<Mutex<BudgetState>>,
}

/// The budget's room, the hedges waiting for it, and the late hedges that
/// give way to them.
#[derive(Debug, Default)]
struct BudgetState {
    /// Kibibytes free.
    free: u32,
    /// Hedges waiting for room, first come first served (first asks of
    /// hedges of fetches the pipeline waits on before the others).
    queue: VecDeque<Waiter>,
    /// Late hedges holding shares, by the order they became late.
    late: BTreeMap<u64, LateHedge>,
    /// Kibibytes of hedges told to give way and not given back yet, and
    /// the turn each was told, by the turn their shares were given.
    told: BTreeMap<u64, (u32, u64)>,
    /// The next turn: shares given, hedges late, hedges told, in order.
    turn: u64,
    held: HedgesHeld,
}

/// A hedge waiting for room.
#[derive(Debug)]
struct Waiter {
    key: u64,
    kib: u32,
    /// It takes room back only from hedges given theirs after this turn.
    after: u64,
    /// The first ask of a hedge of a fetch the pipeline waits on: it
    /// waits before the others.
    head: bool,
    /// Told the turn of its share once room is given.
    given: oneshot::Sender<u64>,
}

/// A late hedge, and how it is told to give its share up.
#[derive(Debug)]
struct LateHedge {
    kib: u32,
    /// The turn its share was given.
    given: u64,
    /// Of a fetch the pipeline waits on: told after the others.
    head: bool,
    /// Told the turn at which it gave way.
    tell: oneshot::Sender<u64>,
}

impl BudgetState {
    fn turn(&mut self) -> u64 {
        self.turn += 1;
        self.turn
    }

    /// Gives room to the waiting, in order, while the first fits.
    fn give(&mut self) {
        while let Some(first) = self.queue.front() {
            if first.kib > self.free {
                break;
            }
            let first = self.queue.pop_front().expect("a first");
            let turn = self.turn();
            if first.given.send(turn).is_ok() {
                self.free -= first.kib;
            }
        }
    }

    /// Tells late hedges to give way while a waiting hedge lacks room that
    /// neither the free room nor the hedges told already will give: for
    /// each in order, the oldest late hedge it may take room back from,
    /// those of fetches the pipeline waits on last.
    fn settle(&mut self) {
        let told: u32 = self.told.values().map(|(kib, _)| kib).sum();
        let mut coming = u64::from(self.free) + u64::from(told);
        for i in 0..self.queue.len() {
            let (kib, after) = (u64::from(self.queue[i].kib), self.queue[i].after);
            while coming < kib {
                let oldest = |head: bool| {
                    (self.late.iter())
                        .find(|(_, late)| late.head == head && late.given > after)
                        .map(|(key, _)| *key)
                };
                let Some(key) = oldest(false).or_else(|| oldest(true)) else {
                    break;
                };
                let late = self.late.remove(&key).expect("found");
                let turn = self.turn();
                if late.tell.send(turn).is_ok() {
                    self.told.insert(late.given, (late.kib, turn));
                    coming += u64::from(late.kib);
                }
            }
            // What it lacks is not there for those behind it either.
            coming = coming.saturating_sub(kib);
        }
    }
}

/// What hedges hold now, and the most they held at once.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct HedgesHeld {
    /// Hedges sent and not ended.
    pub hedges: usize,
    /// Bytes reserved by the shares held (hedges sent, or about to be).
    pub bytes: u64,
    /// Hedges sent since start.
    pub sent: u64,
    /// The most hedges in flight at once.
    pub most_hedges: usize,
    /// The most bytes reserved at once.
    pub most_bytes: u64,
}

/// A hedge's share of the [`HedgeBudget`], given back when dropped.
#[must_use = "the share is given back when dropped"]
pub(super) struct HedgeShare {
    kib: u32,
    bytes: u64,
    /// The turn it was given.
    given: u64,
    sent: bool,
    state: Arc<Mutex<BudgetState>>,
}

impl HedgeBudget {
    /// A budget of `bytes` (counted in whole kibibytes, rounded down).
    pub(super) fn new(bytes: u64) -> Self {
        let capacity_kib = u32::try_from(bytes / 1024).unwrap_or(u32::MAX);
        let state = BudgetState {
            free: capacity_kib,
            ..BudgetState::default()
        };
        HedgeBudget {
            capacity_kib,
            state: Arc::new(Mutex::new(state)),
        }
    }

    /// Waits until a hedge reserving `bytes` fits (all of the budget if it
    /// is larger), then holds that room until the share is dropped. While
    /// it waits, late hedges give way to it: any, or after a hedge gave
    /// way at turn `after`, only those given their room since. The first
    /// ask (`after` 0) of a hedge of a fetch the pipeline waits on (`head`)
    /// waits before the others; a hedge that gave way asks again behind
    /// every hedge waiting, or it would take back the room it gave up.
    /// `None` if the budget is empty: no hedge is ever sent.
    pub(super) async fn share(&self, bytes: u64, (after, head): (u64, bool)) -> Option<HedgeShare> {
        if self.capacity_kib == 0 {
            return None;
        }
        let kib = u32::try_from(bytes.div_ceil(1024)).unwrap_or(u32::MAX);
        let kib = kib.clamp(1, self.capacity_kib);
        let (given, waiting) = {
            let mut state = lock(&self.state);
            if state.queue.is_empty() && state.free >= kib {
                state.free -= kib;
                (Some(state.turn()), None)
            } else {
                let key = state.turn();
                let (given, rx) = oneshot::channel();
                let waiter = Waiter {
                    key,
                    kib,
                    after,
                    head: head && after == 0,
                    given,
                };
                let at = match head && after == 0 {
                    true => state.queue.iter().position(|w| !w.head),
                    false => None,
                };
                let at = at.unwrap_or(state.queue.len());
                state.queue.insert(at, waiter);
                state.give();
                state.settle();
                (None, Some((key, rx)))
            }
        };
        let given = match (given, waiting) {
            (Some(given), _) => given,
            (None, Some((key, rx))) => {
                let mut waiting = Waiting {
                    budget: self,
                    key,
                    kib,
                    given: Some(rx),
                };
                let rx = waiting.given.as_mut().expect("set");
                let given = rx.await.ok()?;
                waiting.given = None;
                given
            }
            (None, None) => unreachable!("a share is given or waited for"),
        };
        let mut state = lock(&self.state);
        state.held.bytes += bytes;
        state.held.most_bytes = state.held.most_bytes.max(state.held.bytes);
        Some(HedgeShare {
            kib,
            bytes,
            given,
            sent: false,
            state: self.state.clone(),
        })
    }

    /// What hedges hold now, and held at most.
    pub(super) fn held(&self) -> HedgesHeld {
        lock(&self.state).held
    }

    /// For a hedge that is late, holding `share`: ends once a hedge
    /// waiting for room needs that share, at once if one waits already,
    /// with the turn at which it gave way. Hedges are told in the order
    /// they became late, those of fetches the pipeline waits on (`head`)
    /// last, and only as many as the waiting lack. Dropped, the hedge is
    /// no longer counted late.
    pub(super) async fn wanted(&self, share: &HedgeShare, head: bool) -> u64 {
        let (tell, told) = oneshot::channel();
        let key = {
            let mut state = lock(&self.state);
            let key = state.turn();
            let late = LateHedge {
                kib: share.kib,
                given: share.given,
                head,
                tell,
            };
            state.late.insert(key, late);
            state.settle();
            key
        };
        let _late = Late { budget: self, key };
        match told.await {
            Ok(turn) => turn,
            Err(_) => std::future::pending().await,
        }
    }
}

/// A hedge waiting for room: taken out of the queue if it stops waiting,
/// and what it was given then given back.
struct Waiting<'a> {
    budget: &'a HedgeBudget,
    key: u64,
    kib: u32,
    given: Option<oneshot::Receiver<u64>>,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let Some(mut given) = self.given.take() else {
            return;
        };
        let mut state = lock(&self.budget.state);
        state.queue.retain(|w| w.key != self.key);
        if given.try_recv().is_ok() {
            state.free += self.kib;
        }
        state.give();
        state.settle();
    }
}

/// A late hedge, counted in [`BudgetState::late`] while it lives.
struct Late<'a> {
    budget: &'a HedgeBudget,
    key: u64,
}

impl Drop for Late<'_> {
    fn drop(&mut self) {
        lock(&self.budget.state).late.remove(&self.key);
    }
}

impl HedgeShare {
    /// The turn at which the hedge holding this share was told to give it
    /// up ([`HedgeBudget::wanted`]), if it was: a hedge waiting for room
    /// counts on it, so a hedge that ends its call for another reason in
    /// the same instant (its call failed, or it moves on) must give it up
    /// all the same, not keep it for its next peer.
    pub(super) fn told(&self) -> Option<u64> {
        lock(&self.state)
            .told
            .get(&self.given)
            .map(|(_, turn)| *turn)
    }

    /// The hedge holding this share is sent: counted in flight until the
    /// share is dropped.
    pub(super) fn sent(&mut self) {
        if !self.sent {
            self.sent = true;
            let held = &mut lock(&self.state).held;
            held.hedges += 1;
            held.sent += 1;
            held.most_hedges = held.most_hedges.max(held.hedges);
        }
    }
}

impl Drop for HedgeShare {
    fn drop(&mut self) {
        let mut state = lock(&self.state);
        state.held.hedges -= usize::from(self.sent);
        state.held.bytes -= self.bytes;
        state.told.remove(&self.given);
        state.free += self.kib;
        state.give();
        state.settle();
    }
}

pub(super) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// [`Hedging`]'s delay from the usual answer time of the peers serving
/// fetches of a kind and the average of height queries (0: none yet).
fn hedge_delay(fetches_ms: u64, queries_ms: u64, timeout: Duration) -> Duration {
    let four_times = |ms: u64| Duration::from_millis(ms.saturating_mul(4));
    let delay = match (fetches_ms, queries_ms) {
        (0, 0) => timeout / 20,
        (0, ms) => four_times(ms).min(timeout / 20),
        (ms, _) => four_times(ms),
    };
    delay.max(HEDGE_MIN).min(timeout / 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(10);
    /// Commits a batch; a fetch from [`AHEAD`] on is not at the head of
    /// the pipeline while nothing past its start is applied.
    const BATCH: u64 = 200;
    const AHEAD: CommitIndex = 1_000_000;
    /// An answer of all that was asked.
    const WHOLE: (u64, u64) = (1, 1);

    /// The delay of a fetch of `kind` not at the head of the pipeline.
    fn ahead(hedging: &Hedging, kind: FetchKind) -> Duration {
        hedging.delay((kind, AHEAD), BATCH, TIMEOUT)
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn peer(n: u16) -> PeerId {
        let mut id = [0; 32];
        id[..2].copy_from_slice(&n.to_be_bytes());
        PeerId(id)
    }

    #[test]
    fn a_late_fetch_asks_a_second_peer_after_four_times_the_usual_answer_time() {
        // Nothing answered yet: a twentieth of the timeout.
        assert_eq!(hedge_delay(0, 0, TIMEOUT), ms(500));
        assert_eq!(hedge_delay(60, 0, TIMEOUT), ms(240));
        // No fetch yet: the height queries' round trip stands in, up to
        // the twentieth.
        assert_eq!(hedge_delay(0, 40, TIMEOUT), ms(160));
        assert_eq!(hedge_delay(0, 200, TIMEOUT), ms(500));
        // Once fetches answer, theirs counts alone.
        assert_eq!(hedge_delay(60, 40, TIMEOUT), ms(240));
        assert_eq!(hedge_delay(60, 4_000, TIMEOUT), ms(240));
        // Never before 100 ms, never past half the timeout.
        assert_eq!(hedge_delay(5, 0, TIMEOUT), ms(100));
        assert_eq!(hedge_delay(0, 1, TIMEOUT), ms(100));
        assert_eq!(hedge_delay(3_000, 0, TIMEOUT), ms(5_000));
        assert_eq!(hedge_delay(0, 3_000, TIMEOUT), ms(500));
        assert_eq!(hedge_delay(0, 0, ms(1_000)), ms(100));
    }

    #[test]
    fn a_fetch_the_pipeline_waits_on_is_hedged_after_twice_the_usual_time() {
        let hedging = Hedging::default();
        let at = |kind, start| hedging.delay((kind, start), BATCH, TIMEOUT);
        // Before anything answered, as for any fetch: a twentieth.
        assert_eq!(at(FetchKind::Blocks, 1), ms(500));
        // Before any fetch answered, twice the height queries' 30 ms at
        // the head, four times elsewhere.
        hedging.queried(peer(90), 30);
        assert_eq!(at(FetchKind::Blocks, 1), ms(60));
        assert_eq!(at(FetchKind::Blocks, 201), ms(120));
        hedging.answered(FetchKind::Blocks, peer(1), 60, WHOLE);
        // The batch after the last applied (commits 1..=200 here): twice
        // 60 ms; later ones, four times.
        assert_eq!(at(FetchKind::Blocks, 1), ms(120));
        assert_eq!(at(FetchKind::Blocks, 200), ms(120));
        assert_eq!(at(FetchKind::Blocks, 201), ms(240));
        // Once 1..=200 are applied, 201 is at the head.
        hedging.applied(200);
        assert_eq!(at(FetchKind::Blocks, 201), ms(120));
        assert_eq!(at(FetchKind::Blocks, 401), ms(240));
        // A question that is no fetch of a batch waits the usual four
        // times, wherever the pipeline stands.
        assert_eq!(hedging.usual_delay(FetchKind::Blocks, TIMEOUT), ms(240));
        // The watermark only rises.
        hedging.applied(100);
        assert_eq!(at(FetchKind::Blocks, 201), ms(120));
        // Never before 20 ms, never past the delay of any fetch.
        hedging.answered(FetchKind::Commits, peer(1), 5, WHOLE);
        assert_eq!(at(FetchKind::Commits, 201), HEAD_HEDGE_MIN);
        assert_eq!(at(FetchKind::Commits, 401), HEDGE_MIN);
        // However slow the peers serving: at most half the timeout, and
        // at the head a tenth.
        for _ in 0..20 {
            hedging.answered(FetchKind::Commits, peer(1), 3_000, WHOLE);
        }
        assert_eq!(at(FetchKind::Commits, 401), ms(5_000));
        assert_eq!(at(FetchKind::Commits, 201), ms(1_000));
    }

    /// Identities are free: five serve verified data, each answer a
    /// millisecond before the delay ends, beside three honest peers at 50
    /// ms. They are the median, and take the usual delay to half the
    /// timeout.
    fn slow_majority() -> Hedging {
        let hedging = Hedging::default();
        for n in 1..=3 {
            hedging.answered(FetchKind::Blocks, peer(n), 50, WHOLE);
        }
        for _ in 0..20 {
            for n in 10..15 {
                let late = hedging.usual_delay(FetchKind::Blocks, TIMEOUT).as_millis() as u64 - 1;
                hedging.answered(FetchKind::Blocks, peer(n), late, WHOLE);
            }
        }
        assert_eq!(hedging.usual_delay(FetchKind::Blocks, TIMEOUT), TIMEOUT / 2);
        hedging
    }

    #[test]
    fn a_majority_of_slow_identities_holds_the_head_of_the_pipeline_a_tenth_of_the_timeout() {
        // The fetch the pipeline waits on is hedged after a tenth of the
        // timeout all the same.
        let hedging = slow_majority();
        assert_eq!(
            hedging.delay((FetchKind::Blocks, 1), BATCH, TIMEOUT),
            TIMEOUT / 10
        );
    }

    #[test]
    fn a_hedge_at_the_head_of_the_pipeline_moves_on_after_the_heads_own_wait() {
        // With the slow majority, a hedge's peer is late only at half the
        // timeout; a hedge of the fetch the pipeline waits on moves on
        // after a tenth, as its fetch was hedged, however long its peer
        // had when it was sent. Ahead, it waits as long as makes its peer
        // late, the longer of then and now.
        let hedging = slow_majority();
        let blocks = FetchKind::Blocks;
        assert_eq!(hedging.late_after(blocks, TIMEOUT, ms(0)), TIMEOUT / 2);
        assert_eq!(
            hedging.move_delay((blocks, 1), BATCH, TIMEOUT, ms(0)),
            TIMEOUT / 10
        );
        assert_eq!(
            hedging.move_delay((blocks, 1), BATCH, TIMEOUT, TIMEOUT),
            TIMEOUT / 10
        );
        assert_eq!(
            hedging.move_delay((blocks, AHEAD), BATCH, TIMEOUT, ms(0)),
            TIMEOUT / 2
        );
        let longer = TIMEOUT / 2 + ms(1);
        assert_eq!(
            hedging.move_delay((blocks, AHEAD), BATCH, TIMEOUT, longer),
            longer
        );
        // Once its batch is the next to apply, the same hedge moves on
        // after the head's wait.
        hedging.applied(AHEAD - 1);
        assert_eq!(
            hedging.move_delay((blocks, AHEAD), BATCH, TIMEOUT, ms(0)),
            TIMEOUT / 10
        );
    }

    #[test]
    fn a_first_call_outrun_by_a_part_has_its_own_peers_time_and_is_beaten_only_past_its_own_measure()
     {
        let commits = FetchKind::Commits;
        let hedging = Hedging::default();
        // Fast identities set the usual time: a peer is late after 100 ms.
        for p in 1..=3 {
            hedging.answered(commits, peer(p), 5, WHOLE);
        }
        hedging.answered(commits, peer(4), 150, WHOLE);
        assert_eq!(hedging.late_after(commits, TIMEOUT, ms(0)), ms(100));
        let wait = |p| hedging.part_wait((commits, peer(p)), TIMEOUT, ms(0));
        let part = |wait, beaten| PartWait { wait, beaten };
        // A far peer measured at 150 ms has four times that, a fast one
        // the late mark, each beaten past it; one never measured nor
        // queried (a validator every answer of which a part outran), the
        // tenth of the timeout, and beaten only past that.
        assert_eq!(wait(4), part(ms(600), true));
        assert_eq!(wait(1), part(ms(100), true));
        assert_eq!(wait(9), part(TIMEOUT / 10, true));
        // Never past the tenth.
        hedging.answered(commits, peer(5), 2_000, WHOLE);
        assert_eq!(wait(5), part(TIMEOUT / 10, true));
        // Measured apart from the median's table: a slow peer pushed out
        // of that by 32 faster ones keeps its own average.
        for p in 100..100 + HEDGE_PEERS as u16 {
            hedging.answered(commits, peer(p), 3, WHOLE);
        }
        assert_eq!(wait(4), part(ms(600), true));
        // A part does not measure its peer: only answers of all asked do.
        hedging.answered(commits, peer(6), 1, (1, 200));
        assert_eq!(wait(6), part(TIMEOUT / 10, true));
        // Not measured for the kind, its height queries' round trip
        // stands in: a peer answering queries at once is waited for only
        // as long as any late peer, a far one four times its trip, and
        // neither is beaten on its trip, which does not show its load
        // (whole blocks delivered or not: at the start of a catch-up no
        // validator has). One answering queries slowly, to be waited for
        // long, is waited the tenth, and beaten.
        hedging.queried(peer(6), 2);
        hedging.queried(peer(9), 200);
        hedging.queried(peer(7), 400);
        hedging.queried(peer(8), 2);
        hedging.answered(FetchKind::Blocks, peer(8), 300, WHOLE);
        assert_eq!(wait(6), part(ms(100), false));
        assert_eq!(wait(9), part(ms(800), false));
        assert_eq!(wait(7), part(TIMEOUT / 10, true));
        assert_eq!(wait(8), part(ms(100), false));
        // Its own answers of the kind, once measured, count instead.
        hedging.answered(commits, peer(9), 50, WHOLE);
        assert_eq!(wait(9), part(ms(200), true));
        // With a slow majority the late mark is past the tenth: the tenth
        // all the same (the most the head of the pipeline is held), and
        // no peer beaten before it is late.
        let slow = slow_majority();
        let late = slow.late_after(FetchKind::Blocks, TIMEOUT, ms(0));
        assert_eq!(late, TIMEOUT / 2);
        let wait = slow.part_wait((FetchKind::Blocks, peer(1)), TIMEOUT, ms(0));
        assert_eq!(wait, part(TIMEOUT / 10, false));
    }

    #[test]
    fn an_own_average_not_updated_in_many_answers_stops_counting() {
        let commits = FetchKind::Commits;
        let hedging = Hedging::default();
        for p in 1..=3 {
            hedging.answered(commits, peer(p), 5, WHOLE);
        }
        hedging.answered(commits, peer(4), 150, WHOLE);
        let wait = |p| hedging.part_wait((commits, peer(p)), TIMEOUT, ms(0)).wait;
        assert_eq!(wait(4), ms(600));
        for _ in 0..HEDGE_STALE_ANSWERS {
            hedging.answered(commits, peer(1), 5, WHOLE);
        }
        assert_eq!(wait(4), ms(600));
        hedging.answered(commits, peer(1), 5, WHOLE);
        // Measured once, then not heard from: as if never measured.
        assert_eq!(wait(4), TIMEOUT / 10);
    }

    #[test]
    fn own_averages_are_kept_per_peer_and_the_least_recently_heard_gives_way() {
        let hedging = Hedging::default();
        let trip = |p| hedging.fetches().queries.of_peer(peer(p));
        for p in 0..HEDGE_PEERS_APART as u16 {
            hedging.queried(peer(p), 10 + u64::from(p));
        }
        // Peer 0 heard from again: peer 1 is now the least recently.
        hedging.queried(peer(0), 10);
        hedging.queried(peer(5000), 70);
        // Peer 1 gave way; peer 2, still there, was last heard over
        // HEDGE_STALE_ANSWERS answers ago and no longer counts.
        assert_eq!(
            (trip(0), trip(1), trip(2), trip(1_023), trip(5000)),
            (Some(10), None, None, Some(1_033), Some(70))
        );
        assert_eq!(hedging.fetches().queries.peers.len(), HEDGE_PEERS_APART);
        // A moving average, a quarter weight on the new trip.
        hedging.queried(peer(5000), 30);
        assert_eq!(trip(5000), Some(60));
    }

    #[test]
    fn only_answers_of_all_that_was_asked_count() {
        // Five identities answer each commit fetch of 200 at once (1 ms)
        // with one commit; three honest peers answer all 200 in 50 ms.
        // Counted, the five would take the delay to its floor, and every
        // honest answer slower than 100 ms would be asked of one of them
        // again.
        let hedging = Hedging::default();
        for n in 1..=3 {
            hedging.answered(FetchKind::Commits, peer(n), 50, (200, 200));
        }
        for _ in 0..10 {
            for n in 10..15 {
                hedging.answered(FetchKind::Commits, peer(n), 1, (1, 200));
            }
        }
        assert_eq!(hedging.usual_delay(FetchKind::Commits, TIMEOUT), ms(200));
        let fetches = hedging.fetches();
        assert_eq!(fetches.commits.peers.len(), 3);
    }

    #[test]
    fn a_peers_answer_times_are_averaged_by_kind() {
        let hedging = Hedging::default();
        hedging.answered(FetchKind::Blocks, peer(1), 100, WHOLE);
        assert_eq!(ahead(&hedging, FetchKind::Blocks), ms(400));
        // A quarter of each new answer time counts.
        hedging.answered(FetchKind::Blocks, peer(1), 500, WHOLE);
        assert_eq!(ahead(&hedging, FetchKind::Blocks), ms(800));
        // Commit fetches have their own: none yet, so a twentieth.
        assert_eq!(ahead(&hedging, FetchKind::Commits), ms(500));
        hedging.answered(FetchKind::Commits, peer(1), 0, WHOLE);
        assert_eq!(ahead(&hedging, FetchKind::Commits), HEDGE_MIN);
    }

    #[test]
    fn height_queries_set_the_delay_only_until_a_fetch_of_the_kind_answers() {
        let hedging = Hedging::default();
        hedging.queried(peer(90), 50);
        hedging.queried(peer(90), 90);
        // (3 × 50 + 90) / 4 = 60, four times over.
        assert_eq!(ahead(&hedging, FetchKind::Commits), ms(240));
        assert_eq!(ahead(&hedging, FetchKind::Blocks), ms(240));
        hedging.answered(FetchKind::Blocks, peer(1), 30, WHOLE);
        assert_eq!(ahead(&hedging, FetchKind::Blocks), ms(120));
        assert_eq!(ahead(&hedging, FetchKind::Commits), ms(240));
    }

    #[test]
    fn the_delay_follows_the_lower_median_peer() {
        let hedging = Hedging::default();
        hedging.answered(FetchKind::Blocks, peer(1), 300, WHOLE);
        assert_eq!(ahead(&hedging, FetchKind::Blocks), ms(1_200));
        // Of two, the faster.
        hedging.answered(FetchKind::Blocks, peer(2), 60, WHOLE);
        assert_eq!(ahead(&hedging, FetchKind::Blocks), ms(240));
        // Of three, the middle one; of four, the second fastest.
        hedging.answered(FetchKind::Blocks, peer(3), 200, WHOLE);
        assert_eq!(ahead(&hedging, FetchKind::Blocks), ms(800));
        hedging.answered(FetchKind::Blocks, peer(4), 900, WHOLE);
        assert_eq!(ahead(&hedging, FetchKind::Blocks), ms(800));
    }

    #[test]
    fn peers_answering_just_before_the_delay_do_not_stretch_it() {
        // The attack: each answer comes a millisecond before the fetch
        // would be asked of another peer. With one average for all peers,
        // each raised the delay by three quarters; here the honest peers'
        // answers set it, whatever the others send, while they are fewer.
        let hedging = Hedging::default();
        for (n, honest) in [(1, 50), (2, 60), (3, 55)] {
            hedging.answered(FetchKind::Blocks, peer(n), honest, WHOLE);
        }
        for round in 0..100 {
            for attacker in [10, 11] {
                let delay = ahead(&hedging, FetchKind::Blocks);
                let late = delay.as_millis() as u64 - 1;
                hedging.answered(FetchKind::Blocks, peer(attacker), late, WHOLE);
            }
            hedging.answered(FetchKind::Blocks, peer(1 + round % 3), 55, WHOLE);
        }
        // The honest averages are all 55 ms now.
        assert_eq!(ahead(&hedging, FetchKind::Blocks), ms(220));
    }

    #[test]
    fn slow_identities_past_the_bound_displace_only_each_other() {
        // Honest peers fill half the table; a thousand identities, each
        // faster than the one before but all slow, come after.
        let hedging = Hedging::default();
        let honest = HEDGE_PEERS as u16 / 2;
        for n in 0..honest {
            hedging.answered(FetchKind::Commits, peer(n), 40, WHOLE);
        }
        for n in honest..honest + 1_000 {
            let slow = 3_000 - u64::from(n);
            hedging.answered(FetchKind::Commits, peer(n), slow, WHOLE);
            // The honest peers keep answering.
            hedging.answered(FetchKind::Commits, peer(n % honest), 40, WHOLE);
        }
        let ids: Vec<PeerId> = (hedging.fetches().commits.peers.iter())
            .map(|t| t.peer)
            .collect();
        assert_eq!(ids.len(), HEDGE_PEERS);
        assert!((0..honest).all(|n| ids.contains(&peer(n))), "{ids:?}");
        assert_eq!(ahead(&hedging, FetchKind::Commits), ms(160));
    }

    #[test]
    fn a_full_table_takes_a_slower_newcomer_only_in_place_of_a_stale_entry() {
        let hedging = Hedging::default();
        for n in 0..HEDGE_PEERS as u16 {
            hedging.answered(FetchKind::Blocks, peer(n), 10 + u64::from(n), WHOLE);
        }
        // Slower than all: dropped, the table unchanged.
        hedging.answered(FetchKind::Blocks, peer(999), 5_000, WHOLE);
        let ids = |h: &Hedging| -> Vec<PeerId> {
            h.fetches().blocks.peers.iter().map(|t| t.peer).collect()
        };
        assert!(!ids(&hedging).contains(&peer(999)));
        // Faster than the slowest (41 ms): it takes that one's place.
        hedging.answered(FetchKind::Blocks, peer(1_000), 20, WHOLE);
        let now = ids(&hedging);
        assert!(now.contains(&peer(1_000)) && !now.contains(&peer(31)));
        assert_eq!(ahead(&hedging, FetchKind::Blocks), ms(100));
    }

    #[test]
    fn a_peer_not_heard_from_in_many_answers_stops_counting() {
        let hedging = Hedging::default();
        hedging.answered(FetchKind::Blocks, peer(1), 20, WHOLE);
        for _ in 0..HEDGE_STALE_ANSWERS {
            hedging.answered(FetchKind::Blocks, peer(2), 250, WHOLE);
        }
        // Peer 1 was updated 1,000 answers ago: it still counts.
        assert_eq!(ahead(&hedging, FetchKind::Blocks), ms(100));
        hedging.answered(FetchKind::Blocks, peer(2), 250, WHOLE);
        assert_eq!(ahead(&hedging, FetchKind::Blocks), ms(1_000));
    }

    const MIB: u64 = 1 << 20;

    fn held(hedges: usize, bytes: u64, sent: u64, most: (usize, u64)) -> HedgesHeld {
        HedgesHeld {
            hedges,
            bytes,
            sent,
            most_hedges: most.0,
            most_bytes: most.1,
        }
    }

    #[test]
    fn hedges_wait_for_room_in_the_budget_and_give_it_back_when_they_end() {
        use futures::FutureExt;
        let budget = HedgeBudget::new(10 * MIB);
        /// The share if it is there now.
        fn now<F: Future<Output = Option<HedgeShare>>>(
            share: &mut std::pin::Pin<Box<F>>,
        ) -> Option<HedgeShare> {
            share.as_mut().now_or_never().map(|s| s.expect("a budget"))
        }
        let sent = |share: Option<HedgeShare>| {
            let mut share = share.expect("room now");
            share.sent();
            share
        };
        let mut a = room_now(&budget, 4 * MIB);
        let b = room_now(&budget, 4 * MIB);
        // Held, not sent yet: their bytes count, they are not in flight.
        assert_eq!(budget.held(), held(0, 8 * MIB, 0, (0, 8 * MIB)));
        a.sent();
        a.sent();
        let b = sent(Some(b));
        // A third would hold 12 MiB: it waits, and is not counted.
        let mut c = Box::pin(budget.share(4 * MIB, (0, false)));
        assert!(now(&mut c).is_none());
        assert_eq!(budget.held(), held(2, 8 * MIB, 2, (2, 8 * MIB)));
        drop(a);
        let c = sent(now(&mut c));
        assert_eq!(budget.held(), held(2, 8 * MIB, 3, (2, 8 * MIB)));
        // One larger than the whole budget waits until no other holds
        // any, then takes all of it; a small one asking after it waits
        // behind it (first come, first served).
        let mut large = Box::pin(budget.share(25 * MIB, (0, false)));
        assert!(now(&mut large).is_none());
        drop(b);
        assert!(now(&mut large).is_none());
        let mut small = Box::pin(budget.share(MIB, (0, false)));
        drop(c);
        let large = sent(now(&mut large));
        assert!(now(&mut small).is_none());
        assert_eq!(budget.held(), held(1, 25 * MIB, 4, (2, 25 * MIB)));
        drop(large);
        // Given back unsent (no peer was found for it): never counted.
        let small = now(&mut small).expect("room again");
        assert_eq!(budget.held(), held(0, MIB, 4, (2, 25 * MIB)));
        drop(small);
        assert_eq!(budget.held(), held(0, 0, 4, (2, 25 * MIB)));
    }

    /// A share of `bytes` that fits at once.
    fn room_now(budget: &HedgeBudget, bytes: u64) -> HedgeShare {
        use futures::FutureExt;
        let share = budget.share(bytes, (0, false)).now_or_never().flatten();
        share.expect("fits")
    }

    /// Whether a late hedge was told to give way, and at which turn.
    fn told<F: Future<Output = u64>>(wanted: &mut std::pin::Pin<Box<F>>) -> Option<u64> {
        use futures::FutureExt;
        wanted.as_mut().now_or_never()
    }

    #[test]
    fn late_hedges_give_their_shares_up_oldest_first_as_far_as_hedges_waiting_lack() {
        use futures::FutureExt;
        let budget = HedgeBudget::new(10 * MIB);
        let share = |bytes| room_now(&budget, bytes);
        // Given room in this order: c, b, a.
        let c = share(2 * MIB);
        let (b, a) = (share(4 * MIB), share(4 * MIB));
        // Late in this order, with no hedge waiting for room: none is told.
        let mut a_late = Box::pin(budget.wanted(&a, false));
        let mut b_late = Box::pin(budget.wanted(&b, false));
        assert_eq!((told(&mut a_late), told(&mut b_late)), (None, None));
        // A hedge of 3 MiB waits: the hedge late first is told, though b
        // was given its room before. c, not late, is never told.
        let mut d = Box::pin(budget.share(3 * MIB, (0, false)));
        assert!(d.as_mut().now_or_never().is_none());
        assert!(told(&mut a_late).is_some());
        assert_eq!(told(&mut b_late), None);
        // What a gives back covers a hedge of 1 MiB waiting behind: b is
        // still not told.
        let mut g = Box::pin(budget.share(MIB, (0, false)));
        assert!(g.as_mut().now_or_never().is_none());
        assert_eq!(told(&mut b_late), None);
        drop(a_late);
        drop(a);
        let d = d.now_or_never().flatten().expect("room given back");
        let g = g.now_or_never().flatten().expect("room given back");
        // A hedge of 4 MiB finds none free: b is told.
        let mut e = Box::pin(budget.share(4 * MIB, (0, false)));
        assert!(e.as_mut().now_or_never().is_none());
        assert!(told(&mut b_late).is_some());
        drop(b_late);
        // g ends as hedges do: with b's 4 MiB to come, 1 MiB free is
        // more than e lacks, so a hedge late from now is not told.
        drop(g);
        let mut c_late = Box::pin(budget.wanted(&c, false));
        assert_eq!(told(&mut c_late), None);
        drop(b);
        let e = e.now_or_never().flatten().expect("room given back");
        // No longer late (its hedge answered): never told, though a hedge
        // now lacks room.
        drop(c_late);
        let mut f = Box::pin(budget.share(8 * MIB, (0, false)));
        assert!(f.as_mut().now_or_never().is_none());
        // A hedge late while another waits is told at once.
        let mut c_late = Box::pin(budget.wanted(&c, false));
        assert!(told(&mut c_late).is_some());
        drop(c_late);
        // Only room given back makes room: f lacks 7 MiB, c held 2.
        drop(c);
        assert!(f.as_mut().now_or_never().is_none());
        drop((d, e));
        assert!(f.now_or_never().flatten().is_some());
    }

    #[test]
    fn a_share_knows_it_was_told_to_give_way_though_its_hedge_never_heard() {
        use futures::FutureExt;
        let budget = HedgeBudget::new(8 * MIB);
        let (a, b) = (room_now(&budget, 4 * MIB), room_now(&budget, 4 * MIB));
        let mut a_late = Box::pin(budget.wanted(&a, false));
        let mut b_late = Box::pin(budget.wanted(&b, false));
        assert_eq!((a.told(), told(&mut a_late)), (None, None));
        let mut w = Box::pin(budget.share(4 * MIB, (0, false)));
        assert!(w.as_mut().now_or_never().is_none());
        // a is told; its hedge ends its call otherwise before it hears.
        let turn = a.told().expect("told");
        assert_eq!(told(&mut a_late), Some(turn));
        assert_eq!(told(&mut b_late), None);
        drop((a_late, b_late));
        assert_eq!(b.told(), None);
        // The hedge waiting counts on a's room, and gets it once a's hedge
        // gives it up; b is never told.
        drop(a);
        assert!(w.now_or_never().flatten().is_some());
        assert_eq!(b.told(), None);
    }

    #[test]
    fn a_hedge_that_gave_way_takes_room_back_only_from_hedges_given_room_since() {
        use futures::FutureExt;
        let budget = HedgeBudget::new(8 * MIB);
        let share = |bytes| room_now(&budget, bytes);
        let (a, b) = (share(4 * MIB), share(4 * MIB));
        let mut a_late = Box::pin(budget.wanted(&a, false));
        let mut b_late = Box::pin(budget.wanted(&b, false));
        let mut w = Box::pin(budget.share(4 * MIB, (0, false)));
        assert!(w.as_mut().now_or_never().is_none());
        let turn = told(&mut a_late).expect("the oldest late hedge is told");
        // a's fetch asks again: b, late but given its room before a gave
        // way, is not told for it (no chain of hedges giving way).
        let mut r = Box::pin(budget.share(4 * MIB, (turn, false)));
        assert!(r.as_mut().now_or_never().is_none());
        assert_eq!(told(&mut b_late), None);
        drop(a_late);
        drop(a);
        let w = w.now_or_never().flatten().expect("room given back");
        assert!(r.as_mut().now_or_never().is_none());
        // w, given a's room after a gave way, gives it back once late.
        let mut w_late = Box::pin(budget.wanted(&w, false));
        assert!(told(&mut w_late).is_some());
        assert_eq!(told(&mut b_late), None);
        drop(w_late);
        // A hedge that stops waiting is out of the queue, and the room it
        // was given meanwhile is given back.
        drop(w);
        drop(r);
        drop(b_late);
        let again = share(4 * MIB);
        assert_eq!(budget.held().bytes, 8 * MIB);
        drop((again, b));
        assert_eq!(budget.held().bytes, 0);
        assert!(
            budget
                .share(8 * MIB, (0, false))
                .now_or_never()
                .flatten()
                .is_some()
        );
    }

    #[test]
    fn hedges_of_fetches_the_pipeline_waits_on_wait_first_and_give_way_last() {
        use futures::FutureExt;
        fn now<F: Future<Output = Option<HedgeShare>>>(
            share: &mut std::pin::Pin<Box<F>>,
        ) -> Option<HedgeShare> {
            share.as_mut().now_or_never().flatten()
        }
        let budget = HedgeBudget::new(12 * MIB);
        let (a, b, c) = (
            room_now(&budget, 4 * MIB),
            room_now(&budget, 4 * MIB),
            room_now(&budget, 4 * MIB),
        );
        // a is of the fetch the pipeline waits on, and late first.
        let mut a_late = Box::pin(budget.wanted(&a, true));
        let mut b_late = Box::pin(budget.wanted(&b, false));
        assert_eq!((told(&mut a_late), told(&mut b_late)), (None, None));
        // A hedge waits: b is told, though a became late first.
        let mut n = Box::pin(budget.share(4 * MIB, (0, false)));
        assert!(now(&mut n).is_none());
        assert_eq!(told(&mut a_late), None);
        let turn = told(&mut b_late).expect("told");
        drop(b_late);
        // b's fetch asks again, though at the head: behind every hedge
        // waiting, or it would take back the room it gave up; and a, given
        // its room before b gave way, is not told for it.
        let mut r = Box::pin(budget.share(4 * MIB, (turn, true)));
        assert!(now(&mut r).is_none());
        assert_eq!(told(&mut a_late), None);
        // Two first asks of hedges at the head: before n, in turn. b's room
        // is the first's; n lacks room then, and a, the one late hedge
        // left, is told.
        let mut h1 = Box::pin(budget.share(4 * MIB, (0, true)));
        let mut h2 = Box::pin(budget.share(4 * MIB, (0, true)));
        assert!(now(&mut h1).is_none() && now(&mut h2).is_none());
        assert!(told(&mut a_late).is_some());
        drop(a_late);
        drop(b);
        let h1 = now(&mut h1).expect("first in line");
        assert!(now(&mut h2).is_none() && now(&mut n).is_none());
        drop(a);
        let h2 = now(&mut h2).expect("next in line");
        assert!(now(&mut n).is_none());
        drop(c);
        let n = now(&mut n).expect("n's turn");
        assert!(now(&mut r).is_none());
        drop(h1);
        let r = now(&mut r).expect("r's turn");
        // A first ask at the head that fits goes at once, past a hedge
        // waiting that does not.
        drop(h2);
        let mut large = Box::pin(budget.share(8 * MIB, (0, false)));
        assert!(now(&mut large).is_none());
        let head = now(&mut Box::pin(budget.share(4 * MIB, (0, true)))).expect("at once");
        drop((head, n, r));
        assert!(now(&mut large).is_some());
        assert_eq!(budget.held().bytes, 0);
    }

    #[test]
    fn an_empty_budget_sends_no_hedge() {
        use futures::FutureExt;
        let budget = HedgeBudget::new(1023);
        assert!(
            budget
                .share(1, (0, false))
                .now_or_never()
                .expect("at once")
                .is_none()
        );
        assert_eq!(budget.held(), HedgesHeld::default());
    }
}
