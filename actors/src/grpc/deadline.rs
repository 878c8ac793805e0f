//! A send deadline for every response of the P2p service.
//!
//! tonic's server timeout ends when the response headers are ready; the
//! body is then polled by hyper only while the client's flow-control window
//! has room, so a client that never reads would keep the answer, its fetch
//! slot and its producer for ever, and a timer inside the body's poll would
//! never fire. [`SendDeadline`] wraps the service: each response body is
//! kept, with the [`SendGuard`] its handler attached (the fetch slot and the
//! [`Reservation`] of buffered bytes), in a slot registered by its deadline
//! with the service's one sweeper task. The guard goes when the body ends
//! or is dropped (which also unregisters it); at each of its ticks the
//! sweeper takes the slot of every response past its deadline and drops
//! body and guard from outside, which frees the encoded answer and, for a
//! block stream, the channel receiver that stops its producer. A response
//! is so cut within the deadline plus one tick ([`sweep_tick`]), and costs
//! no task and no timer of its own: two map operations under a lock.
//!
//! Frames go to hyper in copied slices of [`SLICE_BYTES`]: hyper holds one
//! frame while it waits for window, and a slice of a shared buffer would
//! keep the whole answer alive after the deadline. Each slice goes only
//! while its connection's bytes handed to HTTP/2 and not yet written stay
//! within `max_unwritten_bytes_per_connection` (`soma_wire::backlog`):
//! hyper takes frames whenever the client's window has room, read or not,
//! and the client sets the window.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context, Poll, Waker, ready};

use std::time::{Duration, Instant};

use bytes::{Buf, Bytes};
use http_body::Frame;
use soma_types::PeerId;
use soma_wire::backlog::{Hand, SendBacklog};
use soma_wire::tls::send_backlog;
use tokio::sync::Notify;
use tonic::Status;
use tonic::body::Body;
use tonic::codegen::{BoxFuture, Service, http};
use tonic::server::NamedService;

use super::actor::Permit;
use super::budget::Reservation;
use super::core::Crowded;
use super::kept::{KeptSlots, SlotKey};

/// Largest frame handed to hyper at once: what a response still holds
/// inside hyper once it is cut.
pub const SLICE_BYTES: usize = 64 << 10;

/// An answer is judged by its rate only once under way this many times
/// `fetch_stall_timeout`: TCP's first round trips (slow start, again after
/// an idle spell) are not held against it.
pub(super) const SLOW_AFTER_STALLS: u32 = 4;

/// Fetches refused for want of a slot, by the cap that was full: what
/// tells an operator which `max-concurrent-fetches*` setting binds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FetchesRefused {
    /// At `max_concurrent_fetches_per_peer` (anonymous callers share one).
    pub caller: u64,
    /// At `max_concurrent_fetches_per_host`.
    pub host: u64,
    /// At `max_concurrent_fetches_per_network`.
    pub network: u64,
    /// At `max_concurrent_fetches`.
    pub all: u64,
    /// Their caller, host or network had dropped its allowance of
    /// fetches before their answers were read
    /// (`abandoned-fetches-per-minute`).
    pub abandoning: u64,
}

/// What the server is sending; shared with the handle.
#[derive(Default)]
pub struct SendStats {
    fetches_in_flight: AtomicUsize,
    /// Admitted FetchCommits waiting for their connection's byte budget,
    /// by fetch id: since when, and how to cut the wait.
    waiting: Mutex<HashMap<u64, (Instant, Arc<Notify>)>>,
    cut: AtomicU64,
    preempted: AtomicU64,
    /// The answers of admitted fetches being sent, by fetch id.
    sending: Mutex<HashMap<u64, Weak<Mutex<State>>>>,
    /// Slots of answered fetches, kept for their connection's next fetch.
    pub(super) kept: KeptSlots,
    /// Fetches refused at a cap, by cap: the caller's, its host's, its
    /// network's, everyone's, and for fetches dropped unread.
    refused: [AtomicU64; 5],
    /// Fetches dropped before their answers were read, by caller and
    /// host, until the adapter charges them (at its next call). Each was
    /// admitted by the adapter and gave its slot back unkept, so there are
    /// never more than the slots the adapter handed out meanwhile.
    abandoned: Mutex<Vec<(Option<PeerId>, Option<IpAddr>)>>,
    /// Fetches dropped unread so far.
    abandoned_total: AtomicU64,
    /// Every response being sent, by deadline, for the sweeper.
    deadlines: Mutex<BTreeMap<Deadline, Registered>>,
    /// Responses registered so far: the second half of a deadline's key.
    registered: AtomicU64,
    /// Whether the sweeper task runs.
    sweeping: AtomicBool,
}

/// When a response must have been sent, and which one it is (the order
/// it was registered in).
type Deadline = (tokio::time::Instant, u64);

/// A response the sweeper watches, and the fetch it answers if any.
type Registered = (Weak<Mutex<State>>, Option<u64>);

/// How often the sweeper looks for responses past their deadline: an
/// eighth of `timeout`, between 10 ms and 1 s.
pub(crate) fn sweep_tick(timeout: Duration) -> Duration {
    (timeout / 8).clamp(Duration::from_millis(10), Duration::from_secs(1))
}

/// Cuts, every [`sweep_tick`], the responses past their deadline; ends
/// once the stats are gone (the node and its handle dropped).
async fn sweep(stats: Weak<SendStats>, tick: Duration) {
    let mut ticks = tokio::time::interval(tick);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let Some(stats) = stats.upgrade() else { return };
        let now = tokio::time::Instant::now();
        let due: Vec<Registered> = {
            let mut deadlines = lock(&stats.deadlines);
            let later = deadlines.split_off(&(now, u64::MAX));
            std::mem::replace(&mut *deadlines, later)
                .into_values()
                .collect()
        };
        for (state, fetch) in due {
            let Some(state) = state.upgrade() else {
                continue;
            };
            if cut(&state, false, &stats.cut) {
                // The transport may keep the cut body (and so its
                // registration) until the connection closes.
                if let Some(id) = fetch {
                    stats.unregister(id, &state);
                }
                tracing::debug!("response not sent within its deadline; cut");
            }
        }
    }
}

impl std::fmt::Debug for SendStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SendStats")
            .field("fetches_in_flight", &self.fetches_in_flight())
            .field("cut", &self.responses_cut())
            .field("preempted", &self.responses_preempted())
            .field("on_kept_slots", &self.fetches_on_kept_slots())
            .finish()
    }
}

impl SendStats {
    /// Admitted fetches (FetchCommits, FetchBlocks) whose slot is still
    /// held: being read, or being sent.
    pub fn fetches_in_flight(&self) -> usize {
        // Acquire: with the release of a slot, what was counted before it
        // (a cut, a preemption).
        self.fetches_in_flight.load(Ordering::Acquire)
    }

    /// Admitted FetchCommits waiting, on their slot, for answers their
    /// connection has not read to be sent.
    pub fn fetches_waiting_for_budget(&self) -> usize {
        lock(&self.waiting).len()
    }

    /// Registers fetch `id` as waiting for its connection's byte budget
    /// until the guard returned is dropped: a newer fetch may take its
    /// slot, as it may a stalled answer's, and the guard then says so.
    pub(super) fn waiting_for_budget(self: &Arc<Self>, id: u64) -> WaitingForBudget {
        let cut = Arc::new(Notify::new());
        lock(&self.waiting).insert(id, (Instant::now(), cut.clone()));
        WaitingForBudget {
            id,
            cut,
            stats: self.clone(),
        }
    }

    /// Responses cut because they were not sent within the deadline.
    pub fn responses_cut(&self) -> u64 {
        self.cut.load(Ordering::Relaxed)
    }

    /// Stalled responses cut so that a new fetch could take their slot.
    pub fn responses_preempted(&self) -> u64 {
        self.preempted.load(Ordering::Relaxed)
    }

    /// Fetches that started on the slot their connection kept from its
    /// fetch before, without asking the adapter (see `grpc::kept`).
    pub fn fetches_on_kept_slots(&self) -> u64 {
        self.kept.reused()
    }

    /// Counts a fetch refused at the cap `crowded` names, or, if `None`,
    /// for its caller's fetches dropped unread.
    pub(super) fn count_refused(&self, crowded: Option<Crowded>) {
        let at = match crowded {
            Some(Crowded::Caller) => 0,
            Some(Crowded::Host(_)) => 1,
            Some(Crowded::Network(_)) => 2,
            Some(Crowded::All) => 3,
            None => 4,
        };
        self.refused[at].fetch_add(1, Ordering::Relaxed);
    }

    /// Fetches refused so far, by the cap that was full (with no stalled
    /// answer whose slot they could take), or for fetches dropped unread.
    pub fn fetches_refused(&self) -> FetchesRefused {
        let [caller, host, network, all, abandoning] =
            self.refused.each_ref().map(|n| n.load(Ordering::Relaxed));
        FetchesRefused {
            caller,
            host,
            network,
            all,
            abandoning,
        }
    }

    /// Fetches dropped before their answers were read (their callers reset
    /// the calls or closed the connections), since the node started.
    pub fn fetches_abandoned(&self) -> u64 {
        self.abandoned_total.load(Ordering::Relaxed)
    }

    /// Records a fetch of `caller` from `host` dropped unread.
    fn abandon(&self, caller: Option<PeerId>, host: Option<IpAddr>) {
        lock(&self.abandoned).push((caller, host));
        self.abandoned_total.fetch_add(1, Ordering::Relaxed);
    }

    /// The fetches dropped unread since the last call, in the order they
    /// were dropped, by caller and host.
    pub(super) fn take_abandoned(&self) -> Vec<(Option<PeerId>, Option<IpAddr>)> {
        std::mem::take(&mut *lock(&self.abandoned))
    }

    /// The fetches whose slots a newer fetch may take now, worst first
    /// (see [`Self::stalled_at`]).
    pub(super) fn stalled(&self, stall: Duration, min_rate: u64) -> Vec<u64> {
        self.stalled_at(Instant::now(), stall, min_rate)
    }

    /// The fetches whose slots a newer fetch may take at `now`, worst
    /// first:
    /// - answers the transport has not asked a frame of for `stall` (their
    ///   clients' windows are full), longest-silent first;
    /// - answers under way for [`SLOW_AFTER_STALLS`] times `stall` or
    ///   longer that have been handed to the transport at fewer than
    ///   `min_rate` bytes per second since they began, slowest first: their
    ///   clients read, but too slowly for a whole answer to be sent within
    ///   the send deadline. A client that opens its window a little at a
    ///   time is never silent for `stall`; what it cannot do is read slowly
    ///   and keep its slot;
    /// - FetchCommits that have waited `stall` or longer on their slot for
    ///   their connection's byte budget, longest-waiting first: last, for
    ///   the connection they wait on may be reading at full speed (its
    ///   silent answers, if it does not read, come first), but a fetch that
    ///   has done nothing yet costs least to refuse.
    pub(super) fn stalled_at(&self, now: Instant, stall: Duration, min_rate: u64) -> Vec<u64> {
        // (silent: 0, slow: 1, waiting: 2; then the worst first: the
        // longest silence or wait, the lowest rate)
        let longest = |d: Duration| u128::MAX - d.as_micros();
        let judged_after = stall.saturating_mul(SLOW_AFTER_STALLS);
        let mut stalled: Vec<(u8, u128, u64)> = lock(&self.waiting)
            .iter()
            .filter_map(|(id, (since, _))| {
                let waited = now.saturating_duration_since(*since);
                (waited >= stall).then_some((2, longest(waited), *id))
            })
            .collect();
        let sending = lock(&self.sending);
        stalled.extend(sending.iter().filter_map(|(id, state)| {
            let state = state.upgrade()?;
            let (last_polled, began, sent) = match &*lock(&state) {
                State::Sending(s) => (s.last_polled, s.began, s.sent),
                _ => return None,
            };
            let silent = now.saturating_duration_since(last_polled);
            if silent >= stall {
                return Some((0, longest(silent), *id));
            }
            let under_way = now.saturating_duration_since(began);
            let rate = u128::from(sent) * 1_000_000 / under_way.as_micros().max(1);
            (under_way >= judged_after && rate < u128::from(min_rate)).then_some((1, rate, *id))
        }));
        stalled.sort_unstable();
        stalled.into_iter().map(|(_, _, id)| id).collect()
    }

    /// Forgets `state` as the answer of fetch `id`; only its own
    /// registration: a slot kept and reused by the next fetch has the same
    /// id, and that answer may be registered by now.
    fn unregister(&self, id: u64, state: &Arc<Mutex<State>>) {
        let mut sending = lock(&self.sending);
        if sending
            .get(&id)
            .is_some_and(|s| Weak::ptr_eq(s, &Arc::downgrade(state)))
        {
            sending.remove(&id);
        }
    }

    /// Cuts the answer of fetch `id` now, as its deadline would, for a
    /// newer fetch that took its slot.
    /// `held`: whether its permit is still alive (if not, its slot can no
    /// longer be kept either); `charged`: whether its answer counts as
    /// dropped unread (see `Output::Cut`).
    pub(super) fn preempt(&self, id: u64, held: bool, charged: bool) {
        if let Some((_, cut)) = lock(&self.waiting).remove(&id) {
            // Still waiting for its budget: it ends with a refusal and
            // drops its permit (whose slot the adapter gave away); counted
            // first, so that whoever sees the refusal sees the count.
            self.preempted.fetch_add(1, Ordering::Relaxed);
            cut.notify_one();
            tracing::debug!(id, "fetch waiting for its budget cut for a newer fetch");
            return;
        }
        let state = lock(&self.sending).remove(&id).and_then(|s| s.upgrade());
        if state.is_some_and(|state| cut(&state, charged, &self.preempted)) {
            tracing::debug!(id, "stalled response cut for a newer fetch");
        } else if held {
            // Its answer ended meanwhile: its slot, which the adapter gave
            // away, may be kept by now, about to be, or taken by the next
            // fetch of its connection.
            self.kept.revoke(id);
        }
    }
}

/// A fetch registered as waiting for its connection's byte budget (see
/// [`SendStats::waiting_for_budget`]); unregistered when dropped.
pub(super) struct WaitingForBudget {
    id: u64,
    cut: Arc<Notify>,
    stats: Arc<SendStats>,
}

impl WaitingForBudget {
    /// Ends once a newer fetch took the slot.
    pub(super) async fn cut(&self) {
        self.cut.notified().await;
    }

    /// Ends the wait: true if the fetch still holds its slot, false if a
    /// newer fetch took it meanwhile (its budget may have come at the same
    /// time). Under the same lock as [`SendStats::preempt`], so one of the
    /// two wins: a preemption after this finds no waiting fetch, and treats
    /// the slot as one whose answer may be about to start.
    pub(super) fn finish(self) -> bool {
        self.unregister()
    }

    fn unregister(&self) -> bool {
        let mut waiting = lock(&self.stats.waiting);
        let mine = waiting
            .get(&self.id)
            .is_some_and(|(_, cut)| Arc::ptr_eq(cut, &self.cut));
        if mine {
            waiting.remove(&self.id);
        }
        mine
    }
}

impl Drop for WaitingForBudget {
    fn drop(&mut self) {
        self.unregister();
    }
}

/// Cuts a response still being sent: its body, producer and guard are
/// dropped (outside the lock), and the transport's task is woken, so it
/// polls the body again and sends the error. (The task may be waiting on
/// the producer just dropped, which would never wake it: the client would
/// wait for the rest of the answer for good.) False if it had ended
/// already. `charged`: its answer counts as dropped unread, its slot
/// charged to its caller as a reset would be. `count` is incremented
/// before the slot is given back and the client told, so that whoever
/// sees either sees the count.
fn cut(state: &Mutex<State>, charged: bool, count: &AtomicU64) -> bool {
    let cut = {
        let mut state = lock(state);
        match *state {
            State::Sending(_) => std::mem::replace(&mut *state, State::Cut),
            _ => return false,
        }
    };
    count.fetch_add(1, Ordering::Relaxed);
    if let State::Sending(mut sending) = cut {
        if charged && let Some(slot) = &mut sending.guard.slot {
            slot.abandon();
        }
        let waker = sending.waker.take();
        drop(sending);
        if let Some(waker) = waker {
            waker.wake();
        }
    }
    true
}

/// An admitted fetch's slot, counted in [`SendStats`] while held. Once
/// its answer is handed to the transport in full ([`FetchSlot::answered`])
/// it is kept for the next fetch of its connection (`grpc::kept`);
/// otherwise dropping it gives the slot back to the adapter, and if its
/// caller went away before reading the answer ([`FetchSlot::abandon`]),
/// charges the caller for it.
#[derive(Debug)]
pub(super) struct FetchSlot {
    permit: Option<Permit>,
    stats: Arc<SendStats>,
    /// Where the slot is kept once answered, if the connection is known.
    keep_for: Option<SlotKey>,
    answered: bool,
    abandoned: bool,
}

impl FetchSlot {
    /// Holds `permit`, counting it as a fetch in flight; `keep_for` names
    /// the connection and caller that may reuse it once answered.
    pub(super) fn new(permit: Permit, stats: &Arc<SendStats>, keep_for: Option<SlotKey>) -> Self {
        stats.fetches_in_flight.fetch_add(1, Ordering::Relaxed);
        FetchSlot {
            permit: Some(permit),
            stats: stats.clone(),
            keep_for,
            answered: false,
            abandoned: false,
        }
    }

    /// The answer was handed to the transport in full: the slot may be kept.
    fn answered(&mut self) {
        self.answered = true;
    }

    /// The caller went away before the answer was read: the reset call,
    /// or the closed connection, is charged to the caller and its host
    /// when the slot is given back (before its permit goes).
    pub(super) fn abandon(&mut self) {
        self.abandoned = true;
    }
}

impl Drop for FetchSlot {
    fn drop(&mut self) {
        self.stats.fetches_in_flight.fetch_sub(1, Ordering::Release);
        if self.answered
            && let (Some(key), Some(permit)) = (self.keep_for, self.permit.take())
        {
            self.stats.kept.keep(key, permit);
        } else if self.abandoned
            && let Some((_, caller, host)) = self.keep_for
        {
            self.stats.abandon(caller, host);
        }
    }
}

/// What a response holds until it is sent: released when its body ends,
/// is dropped, or misses the deadline.
#[derive(Debug, Default)]
pub(super) struct SendGuard {
    slot: Option<FetchSlot>,
    reservation: Option<Arc<Reservation>>,
}

impl SendGuard {
    /// A fetch's admission `slot` and the `reservation` of its bytes not
    /// yet handed to the transport.
    pub(super) fn new(slot: Option<FetchSlot>, reservation: Option<Arc<Reservation>>) -> Self {
        SendGuard { slot, reservation }
    }
}

/// The response extension a handler puts its [`SendGuard`] in (extensions
/// must be `Clone`, the guard is not).
#[derive(Clone, Debug)]
pub(super) struct Held(Arc<Mutex<Option<SendGuard>>>);

impl Held {
    /// Wraps `guard` for a response's extensions.
    pub(super) fn new(guard: SendGuard) -> Self {
        Held(Arc::new(Mutex::new(Some(guard))))
    }

    fn take(self) -> Option<SendGuard> {
        lock(&self.0).take()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The P2p service with a send deadline on every response.
#[derive(Clone, Debug)]
pub struct SendDeadline<S> {
    inner: S,
    timeout: Duration,
    max_unwritten: usize,
    stats: Arc<SendStats>,
}

impl<S> SendDeadline<S> {
    /// `inner`, whose responses must be handed to the transport within
    /// `timeout` of their headers, each frame only while its connection
    /// has at most `max_unwritten` bytes handed and not yet written (see
    /// `soma_wire::backlog`).
    pub fn new(inner: S, timeout: Duration, max_unwritten: usize, stats: Arc<SendStats>) -> Self {
        SendDeadline {
            inner,
            timeout,
            max_unwritten,
            stats,
        }
    }
}

impl<S: NamedService> NamedService for SendDeadline<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> Service<http::Request<Body>> for SendDeadline<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = http::Response<DeadlineBody>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let gate = send_backlog(request.extensions()).map(|b| (b, self.max_unwritten));
        let response = self.inner.call(request);
        let (timeout, stats) = (self.timeout, self.stats.clone());
        Box::pin(async move {
            let (mut parts, body) = response.await?.into_parts();
            let guard = parts
                .extensions
                .remove::<Held>()
                .and_then(Held::take)
                .unwrap_or_default();
            let body = DeadlineBody::new(body, guard, timeout, gate, stats);
            Ok(http::Response::from_parts(parts, body))
        })
    }
}

/// Where a response is: still being sent, sent, or cut at the deadline.
enum State {
    /// Boxed: the other states hold nothing.
    Sending(Box<Sending>),
    Finished,
    Cut,
}

struct Sending {
    body: Body,
    /// Its connection's count of bytes handed and not written, and the
    /// cap on it (see `soma_wire::backlog`); `None` for a connection not
    /// served over `soma_wire::tls::incoming`.
    gate: Option<Gate>,
    /// Set while its gate waits for a time at which what its connection
    /// counts may be forgotten.
    settle: Option<Pin<Box<tokio::time::Sleep>>>,
    /// The part of the last data frame not yet handed over.
    rest: Bytes,
    guard: SendGuard,
    /// When the transport last asked for a frame and could take it (or
    /// the response began): it asks only while the client's window has
    /// room, and takes a frame only while its connection's unwritten
    /// bytes are within the cap, so a client that does not read leaves
    /// this behind.
    last_polled: Instant,
    /// When the response began.
    began: Instant,
    /// Bytes handed to the transport so far.
    sent: u64,
    /// The transport's task, as of its last poll: woken by a cut.
    waker: Option<Waker>,
}

/// A connection's count of bytes handed and not written, and its cap.
#[derive(Debug)]
struct Gate {
    backlog: Arc<SendBacklog>,
    max: usize,
    /// The body's id among those waiting on the backlog: the second half
    /// of its deadline's key.
    waiter: u64,
}

impl Drop for Gate {
    /// The body ended, or was cut or dropped: it waits no more.
    fn drop(&mut self) {
        self.backlog.stop_waiting(self.waiter);
    }
}

/// A response body cut at its deadline; see the module docs.
pub struct DeadlineBody {
    state: Arc<Mutex<State>>,
    /// The fetch it answers, registered in `stats` while being sent.
    fetch: Option<u64>,
    /// Its key in the sweeper's deadlines.
    deadline: Deadline,
    stats: Arc<SendStats>,
}

impl DeadlineBody {
    fn new(
        body: Body,
        guard: SendGuard,
        timeout: Duration,
        gate: Option<(Arc<SendBacklog>, usize)>,
        stats: Arc<SendStats>,
    ) -> Self {
        let id = guard
            .slot
            .as_ref()
            .and_then(|s| s.permit.as_ref().map(Permit::id));
        let registered = stats.registered.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        let state = Arc::new(Mutex::new(State::Sending(Box::new(Sending {
            body,
            gate: gate.map(|(backlog, max)| Gate {
                backlog,
                max,
                waiter: registered,
            }),
            settle: None,
            rest: Bytes::new(),
            guard,
            last_polled: now,
            began: now,
            sent: 0,
            waker: None,
        }))));
        if let Some(id) = id {
            lock(&stats.sending).insert(id, Arc::downgrade(&state));
        }
        let deadline = (tokio::time::Instant::now() + timeout, registered);
        lock(&stats.deadlines).insert(deadline, (Arc::downgrade(&state), id));
        if !stats.sweeping.swap(true, Ordering::Relaxed) {
            tokio::spawn(sweep(Arc::downgrade(&stats), sweep_tick(timeout)));
        }
        DeadlineBody {
            state,
            fetch: id,
            deadline,
            stats,
        }
    }
}

impl Sending {
    /// Ready once the next slice of `rest` may be handed over: its
    /// connection's bytes handed and not written stay within the cap with
    /// it (see `soma_wire::backlog`), and it is counted there.
    fn poll_gate(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let Some(gate) = &self.gate else {
            return Poll::Ready(());
        };
        let n = self.rest.len().min(SLICE_BYTES);
        loop {
            let now = tokio::time::Instant::now();
            match gate
                .backlog
                .try_hand(gate.waiter, cx.waker(), n, gate.max, now)
            {
                Hand::Taken => {
                    self.settle = None;
                    return Poll::Ready(());
                }
                Hand::Wait(None) => {
                    self.settle = None;
                    return Poll::Pending;
                }
                Hand::Wait(Some(at)) => {
                    // Never in the past: the count was kept at `now`, so
                    // asking again at once would spin.
                    let at = at.max(now + Duration::from_millis(1));
                    let timer = self
                        .settle
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
                    if timer.deadline() != at {
                        timer.as_mut().reset(at);
                    }
                    // Once it fires, what is counted may be forgotten.
                    ready!(timer.as_mut().poll(cx));
                }
            }
        }
    }

    /// The next slice of `rest`, counted as handed over.
    fn slice(&mut self) -> Frame<Bytes> {
        let n = self.rest.len().min(SLICE_BYTES);
        let slice = Bytes::copy_from_slice(&self.rest[..n]);
        self.rest.advance(n);
        self.sent += n as u64;
        if let Some(reservation) = &self.guard.reservation {
            reservation.release(n);
        }
        Frame::data(slice)
    }
}

/// Ends a response being sent: what it holds is released outside the
/// lock, its fetch slot kept for the connection if `answered` (all of it
/// handed to the transport).
fn finish(mut state: MutexGuard<'_, State>, answered: bool) {
    let mut done = std::mem::replace(&mut *state, State::Finished);
    drop(state);
    if answered
        && let State::Sending(sending) = &mut done
        && let Some(slot) = &mut sending.guard.slot
    {
        slot.answered();
    }
    drop(done);
}

impl Drop for DeadlineBody {
    fn drop(&mut self) {
        // Dropped by the transport while still being sent, and not at its
        // end: the client reset the call or closed the connection.
        if let State::Sending(sending) = &mut *lock(&self.state)
            && !(sending.rest.is_empty() && http_body::Body::is_end_stream(&sending.body))
            && let Some(slot) = &mut sending.guard.slot
        {
            slot.abandon();
        }
        lock(&self.stats.deadlines).remove(&self.deadline);
        if let Some(id) = self.fetch {
            self.stats.unregister(id, &self.state);
        }
    }
}

impl http_body::Body for DeadlineBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let mut state = lock(&self.state);
        let sending = match &mut *state {
            State::Sending(s) => {
                if !s.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    s.waker = Some(cx.waker().clone());
                }
                s
            }
            State::Finished => return Poll::Ready(None),
            State::Cut => {
                return Poll::Ready(Some(Err(Status::deadline_exceeded(
                    "the response was not read in time",
                ))));
            }
        };
        if sending.rest.is_empty() {
            // The transport asks: whatever the answer waits for now is the
            // server's doing, not the client's.
            sending.last_polled = Instant::now();
            let polled = ready!(Pin::new(&mut sending.body).poll_frame(cx));
            match polled {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) if !data.is_empty() => sending.rest = data,
                    Ok(empty) => return Poll::Ready(Some(Ok(Frame::data(empty)))),
                    Err(trailers) => {
                        // An answer that ended in an error status was not
                        // sent in full.
                        let ok = trailers
                            .trailers_ref()
                            .and_then(|t| t.get("grpc-status"))
                            .is_none_or(|status| status == "0");
                        finish(state, ok);
                        return Poll::Ready(Some(Ok(trailers)));
                    }
                },
                end => {
                    finish(state, end.is_none());
                    return Poll::Ready(end);
                }
            }
        }
        ready!(sending.poll_gate(cx));
        sending.last_polled = Instant::now();
        Poll::Ready(Some(Ok(sending.slice())))
    }

    fn is_end_stream(&self) -> bool {
        match &*lock(&self.state) {
            State::Sending(s) => s.rest.is_empty() && s.body.is_end_stream(),
            State::Finished => true,
            State::Cut => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use http_body::Body as _;

    use super::*;
    use crate::grpc::budget::{ByteBudget, Connection};

    fn at(port: u16) -> Connection {
        Some(std::net::SocketAddr::from(([127, 0, 0, 1], port)))
    }

    /// Frames given out in order, as tonic's encoder would.
    struct Frames(VecDeque<Frame<Bytes>>);

    impl http_body::Body for Frames {
        type Data = Bytes;
        type Error = Status;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
            Poll::Ready(self.0.pop_front().map(Ok))
        }
    }

    /// A body of `frames` data frames of `len` bytes, then trailers.
    fn body(frames: usize, len: usize) -> Body {
        let data = (0..frames).map(|i| Frame::data(Bytes::from(vec![i as u8; len])));
        let trailers = Frame::trailers(http::HeaderMap::new());
        Body::new(Frames(data.chain([trailers]).collect()))
    }

    async fn next(body: &mut DeadlineBody) -> Option<Result<Frame<Bytes>, Status>> {
        std::future::poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx)).await
    }

    #[tokio::test]
    async fn bytes_are_released_as_slices_are_handed_over_and_the_guard_at_the_end() {
        let budget = ByteBudget::new(1 << 20);
        let reservation = Arc::new(budget.reservation(at(1)));
        assert!(reservation.try_add(2 * 100_000));
        let stats = Arc::new(SendStats::default());
        let guard = SendGuard::new(None, Some(reservation.clone()));
        let mut sent = DeadlineBody::new(
            body(2, 100_000),
            guard,
            Duration::from_secs(3_600),
            None,
            stats,
        );
        let mut lens = Vec::new();
        while let Some(frame) = next(&mut sent).await {
            let frame = frame.unwrap();
            if let Some(data) = frame.data_ref() {
                lens.push(data.len());
                assert_eq!(budget.held(at(1)), 200_000 - lens.iter().sum::<usize>());
            }
        }
        // 100,000 = 65,536 + 34,464, twice.
        assert_eq!(lens, vec![65_536, 34_464, 65_536, 34_464]);
        assert_eq!(budget.held(at(1)), 0);
        // The body ended: the guard (our reservation's other holder) is gone.
        assert_eq!(Arc::strong_count(&reservation), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn an_unread_response_is_cut_at_the_deadline_releasing_all_it_holds() {
        let budget = ByteBudget::new(1 << 20);
        let reservation = Arc::new(budget.reservation(at(1)));
        assert!(reservation.try_add(100_000));
        let stats = Arc::new(SendStats::default());
        let guard = SendGuard::new(None, Some(reservation));
        let mut sent = DeadlineBody::new(
            body(1, 100_000),
            guard,
            Duration::from_secs(1),
            None,
            stats.clone(),
        );
        // One slice handed over, then the client stops reading.
        let first = next(&mut sent).await.unwrap().unwrap();
        assert_eq!(first.data_ref().map(Bytes::len), Some(SLICE_BYTES));
        assert_eq!(budget.held(at(1)), 100_000 - SLICE_BYTES);
        assert_eq!(stats.responses_cut(), 0);
        // Not before its deadline; by the sweeper's first tick after it.
        tokio::time::sleep(Duration::from_millis(999)).await;
        tokio::task::yield_now().await;
        assert_eq!(stats.responses_cut(), 0);
        tokio::time::sleep(sweep_tick(Duration::from_secs(1))).await;
        tokio::task::yield_now().await;
        assert_eq!(stats.responses_cut(), 1);
        assert_eq!(budget.held(at(1)), 0);
        assert_eq!(budget.connections(), 0);
        let after = next(&mut sent).await.unwrap().unwrap_err();
        assert_eq!(after.code(), tonic::Code::DeadlineExceeded);
    }

    /// A producer that never yields a frame (the handler is starved).
    struct Pending;

    impl http_body::Body for Pending {
        type Data = Bytes;
        type Error = Status;

        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
            Poll::Pending
        }
    }

    /// A response waiting on its producer when a newer fetch preempts it:
    /// the transport's task is woken and gets the error, rather than wait
    /// for good on a producer that was dropped.
    #[tokio::test]
    async fn a_response_cut_while_its_producer_is_pending_wakes_the_transport() {
        let stats = Arc::new(SendStats::default());
        let mut sent = DeadlineBody::new(
            Body::new(Pending),
            SendGuard::default(),
            Duration::from_secs(3_600),
            None,
            stats.clone(),
        );
        // Registered as fetch 7's answer, as an admitted fetch's is.
        lock(&stats.sending).insert(7, Arc::downgrade(&sent.state));
        let transport = tokio::spawn(async move { next(&mut sent).await });
        // The transport has polled the body and waits on the producer.
        while lock(&stats.sending)
            .get(&7)
            .and_then(Weak::upgrade)
            .is_some_and(|s| matches!(&*lock(&s), State::Sending(s) if s.waker.is_none()))
        {
            tokio::task::yield_now().await;
        }
        stats.preempt(7, true, false);
        let frame = tokio::time::timeout(Duration::from_secs(10), transport)
            .await
            .expect("the transport was woken")
            .unwrap();
        assert_eq!(
            frame.unwrap().unwrap_err().code(),
            tonic::Code::DeadlineExceeded
        );
        assert_eq!(stats.responses_preempted(), 1);
    }

    #[tokio::test]
    async fn silent_answers_are_taken_before_fetches_waiting_for_their_budget() {
        let stats = Arc::new(SendStats::default());
        let mut holders = crate::holders::Holders::default();
        let stall = Duration::from_secs(1);
        let start = Instant::now();
        let waiting = stats.waiting_for_budget(7);
        let guard = SendGuard::new(Some(slot(&stats, &mut holders, 8)), None);
        let _silent = DeadlineBody::new(
            body(1, 10),
            guard,
            Duration::from_secs(60),
            None,
            stats.clone(),
        );
        assert_eq!(stats.fetches_waiting_for_budget(), 1);
        // Neither has been stalled for a second yet; then both are, the
        // silent answer first.
        assert!(stats.stalled_at(start, stall, 0).is_empty());
        let later = Instant::now() + 2 * stall;
        assert_eq!(stats.stalled_at(later, stall, 0), vec![8, 7]);
        // Taken by a newer fetch: the wait learns of it, whether it was
        // still waiting or its budget came at the same time.
        stats.preempt(7, true, false);
        tokio::time::timeout(Duration::from_secs(10), waiting.cut())
            .await
            .expect("the wait learns it was cut");
        assert!(!waiting.finish());
        assert_eq!(stats.fetches_waiting_for_budget(), 0);
        assert_eq!(stats.responses_preempted(), 1);
        assert_eq!(stats.stalled_at(later, stall, 0), vec![8]);
    }

    #[test]
    fn a_slot_taken_just_after_its_wait_ended_is_never_kept() {
        let stats = Arc::new(SendStats::default());
        let mut holders = crate::holders::Holders::default();
        let waiting = stats.waiting_for_budget(3);
        assert!(waiting.finish());
        // The adapter gave the slot away as the wait ended: the fetch goes
        // on uncounted for one answer, and its slot is then not kept.
        stats.preempt(3, true, false);
        assert_eq!(stats.responses_preempted(), 0);
        let mut answered = slot(&stats, &mut holders, 3);
        answered.answered();
        drop(answered);
        assert_eq!(stats.kept.len(), 0);
        assert_eq!(holders.ended(), vec![3]);
    }

    /// An answer hands a frame over only while its connection's bytes
    /// handed and not written stay within the cap. Waiting, it is silent
    /// (a stalled answer); it goes on when the connection writes, or once
    /// the connection, its socket taking writes, wrote nothing for
    /// `SETTLE_AFTER`, never while its socket is full.
    #[tokio::test(start_paused = true)]
    async fn frames_wait_for_their_connection_to_write_and_waiting_is_a_stall() {
        use futures::FutureExt;
        use soma_wire::backlog::SETTLE_AFTER;

        let stats = Arc::new(SendStats::default());
        let mut holders = crate::holders::Holders::default();
        let backlog = Arc::new(SendBacklog::default());
        let gate = (backlog.clone(), SLICE_BYTES);
        let guard = SendGuard::new(Some(slot(&stats, &mut holders, 5)), None);
        let timeout = Duration::from_secs(100_000);
        let answer = body(1, 4 * SLICE_BYTES);
        let mut sent = DeadlineBody::new(answer, guard, timeout, Some(gate), stats.clone());
        let slice = |frame: Option<Result<Frame<Bytes>, Status>>| {
            frame.unwrap().unwrap().into_data().unwrap().len()
        };
        // Nothing counted: the first slice goes; the second would pass
        // the cap.
        assert_eq!(slice(next(&mut sent).await), SLICE_BYTES);
        assert_eq!(backlog.unwritten(), SLICE_BYTES as u64);
        let waiting_since = Instant::now();
        assert!(next(&mut sent).now_or_never().is_none());
        // Asked, and not able to take the frame: silent since its last one.
        let stall = Duration::from_secs(1);
        assert_eq!(stats.stalled_at(waiting_since + stall, stall, 0), vec![5]);
        // The connection writes: the second slice goes.
        backlog.wrote(SLICE_BYTES, tokio::time::Instant::now());
        assert_eq!(slice(next(&mut sent).now_or_never().unwrap()), SLICE_BYTES);
        // Its bytes are never written (its stream was reset, say) while
        // the socket takes writes: forgotten after SETTLE_AFTER.
        let counted = tokio::time::Instant::now();
        assert_eq!(slice(next(&mut sent).await), SLICE_BYTES);
        assert_eq!(counted.elapsed(), SETTLE_AFTER);
        // A full socket is never forgiven; it waits for the write.
        backlog.blocked();
        let waited = tokio::time::timeout(timeout / 2, next(&mut sent)).await;
        assert!(waited.is_err(), "handed over past the cap");
        backlog.wrote(SLICE_BYTES, tokio::time::Instant::now());
        assert_eq!(slice(next(&mut sent).await), SLICE_BYTES);
        // Then its end: answered in full, its slot kept.
        while next(&mut sent).await.is_some() {}
        assert_eq!(stats.kept.len(), 1);
    }

    fn slot(stats: &Arc<SendStats>, holders: &mut crate::holders::Holders, id: u64) -> FetchSlot {
        let key = (
            std::net::SocketAddr::from(([127, 0, 0, 1], 9)),
            Some(soma_types::PeerId([9; 32])),
            None,
        );
        let permit = Permit::new(id, holders.hold_keeping_ended(id));
        FetchSlot::new(permit, stats, Some(key))
    }

    #[tokio::test(start_paused = true)]
    async fn a_slot_is_kept_only_once_its_answer_was_sent_whole() {
        let stats = Arc::new(SendStats::default());
        let mut holders = crate::holders::Holders::default();
        let timeout = Duration::from_secs(1);
        // Sent whole: kept, still held.
        let guard = SendGuard::new(Some(slot(&stats, &mut holders, 1)), None);
        let mut sent = DeadlineBody::new(body(1, 10), guard, timeout, None, stats.clone());
        while next(&mut sent).await.is_some() {}
        assert_eq!(stats.kept.len(), 1);
        assert_eq!(stats.fetches_in_flight(), 0);
        // The next fetch reuses id 1 while the old body is still around:
        // dropping the old body leaves the new answer registered.
        let reused = stats.kept.reclaim(|_| true).pop().expect("kept");
        let guard = SendGuard::new(Some(FetchSlot::new(reused, &stats, None)), None);
        let mut again = DeadlineBody::new(body(1, 100_000), guard, timeout, None, stats.clone());
        drop(sent);
        assert!(lock(&stats.sending).contains_key(&1));
        // Cut at its deadline: not kept, given back.
        next(&mut again).await.unwrap().unwrap();
        tokio::time::sleep(timeout).await;
        tokio::task::yield_now().await;
        assert_eq!(stats.responses_cut(), 1);
        assert_eq!(stats.kept.len(), 0);
        assert_eq!(holders.ended(), vec![1]);
        // The cut body is still around (the transport keeps it until the
        // connection goes) but is no longer an answer being sent.
        assert!(!lock(&stats.sending).contains_key(&1));
        drop(again);
        // Preempted: not kept either.
        let guard = SendGuard::new(Some(slot(&stats, &mut holders, 2)), None);
        let mut cut = DeadlineBody::new(body(1, 100_000), guard, timeout, None, stats.clone());
        next(&mut cut).await.unwrap().unwrap();
        stats.preempt(2, true, false);
        assert_eq!(stats.kept.len(), 0);
        assert_eq!(holders.ended(), vec![2]);
        // Ended with an error status: not sent in full, not kept.
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("5"));
        let failed = Body::new(Frames(VecDeque::from([
            Frame::data(Bytes::from_static(b"x")),
            Frame::trailers(trailers),
        ])));
        let guard = SendGuard::new(Some(slot(&stats, &mut holders, 4)), None);
        let mut sent = DeadlineBody::new(failed, guard, timeout, None, stats.clone());
        while next(&mut sent).await.is_some() {}
        assert_eq!(stats.kept.len(), 0);
        assert_eq!(holders.ended(), vec![4]);
        // Dropped unsent (the connection went): not kept.
        let guard = SendGuard::new(Some(slot(&stats, &mut holders, 3)), None);
        drop(DeadlineBody::new(
            body(1, 10),
            guard,
            timeout,
            None,
            stats.clone(),
        ));
        assert_eq!(stats.kept.len(), 0);
        assert_eq!(holders.ended(), vec![3]);
    }
}
