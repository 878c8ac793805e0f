//! Answer bytes handed to HTTP/2 and not yet written, per inbound
//! connection.
//!
//! hyper takes an answer's frames into its stream's send buffer (up to
//! about 400 KiB a stream) whenever the client's flow-control window has
//! room, and the client sets the window. A client that declared large
//! windows and never read its socket so had each answer handed over in
//! full: counted as answered (its fetch slot kept for its next fetch,
//! nothing charged), the bytes piling up in hyper's buffers, tens of MiB
//! a connection. tonic does not expose hyper's buffer size, and hyper's
//! bound is per stream anyway.
//!
//! So the bytes are counted at both ends of HTTP/2: a response body counts
//! each frame before it hands it over ([`SendBacklog::try_hand`]), and the
//! connection's plaintext stream counts the DATA payload bytes HTTP/2
//! writes into TLS ([`crate::activity::Watched`]). A body hands a frame
//! only while what was handed and not written stays within the cap (or is
//! nothing, so a frame larger than the cap still goes, alone); otherwise
//! it waits for the connection to write. An answer whose client does not
//! read so stops at the cap, a stalled answer like any other.
//!
//! The count can overstate: HTTP/2 drops the queued frames of a stream
//! reset (by the client, or by the server cutting an answer), and the
//! server cannot tell how many there were. Such bytes are never written
//! and would shut the gate for good. So once the connection has written
//! nothing for [`SETTLE_AFTER`] while its last write went through (HTTP/2
//! is not waiting for the socket), what is left counted is forgotten, at
//! most the cap's worth a minute. A client that does not read keeps the
//! socket full, and is never forgiven. The limit is for a client that
//! keeps HTTP/2 from writing otherwise: one that opens each stream's
//! window a byte at a time gets a whole slice of each answer handed over
//! (hyper hands a frame once the stream has any room), held back by h2
//! for want of window while the socket is idle; forgotten without limit,
//! such answers would count as answered at the cap every quiet spell.
//! Bytes written never count past those handed, so bytes forgotten and
//! written after all credit at most what was handed by then.

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::task::Waker;
use std::time::Duration;

use tokio::time::Instant;

/// How long a connection whose socket takes writes must have written
/// nothing before what it still counts as handed is forgotten (see the
/// module docs): long enough for HTTP/2 to have written anything it could.
pub const SETTLE_AFTER: Duration = Duration::from_millis(250);

/// One connection's count; see the module docs.
#[derive(Debug, Default)]
pub struct SendBacklog {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// DATA payload bytes response bodies handed to HTTP/2.
    handed: u64,
    /// DATA payload bytes HTTP/2 wrote into the connection's stream.
    written: u64,
    /// The connection's last write or flush could not go on: its socket
    /// is full.
    blocked: bool,
    /// Since when the connection has written nothing, its socket taking
    /// writes, while counting bytes handed and not written (`None`: it
    /// counts none).
    quiet_since: Option<Instant>,
    /// Bodies waiting for the connection to write, by their ids (oldest
    /// first): a body registers once however often it asks, and goes once
    /// it hands its bytes over or is dropped, so there are never more
    /// than bodies waiting. A write wakes those whose bytes now fit, in
    /// turn.
    waiters: BTreeMap<u64, Waiter>,
    /// The cap the bodies ask with.
    max: u64,
    /// Bytes that may still be forgotten, as of `refilled_at` (`None`:
    /// never yet, so the whole cap).
    forgivable: u64,
    refilled_at: Option<Instant>,
}

/// A body waiting for its connection to write.
#[derive(Debug)]
struct Waiter {
    waker: Waker,
    /// The bytes it asked to hand over.
    bytes: u64,
}

/// What [`SendBacklog::try_hand`] decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hand {
    /// The bytes are counted: hand them over.
    Taken,
    /// Wait: the waker is woken when the connection writes, or when its
    /// socket, full now, takes bytes again. `Some(at)`: ask again at `at`
    /// too, when what is counted may be forgotten (see the module docs).
    Wait(Option<Instant>),
}

impl SendBacklog {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Bytes handed to HTTP/2 and not yet written.
    pub fn unwritten(&self) -> u64 {
        self.lock().unwritten()
    }

    /// Counts `bytes` about to be handed over at `now` by the body
    /// `waiter` (an id of its own) if what is handed and not written
    /// stays within `max` with them, or is nothing; else registers `waker`
    /// as the body's and says when to ask again.
    pub fn try_hand(
        &self,
        waiter: u64,
        waker: &Waker,
        bytes: usize,
        max: usize,
        now: Instant,
    ) -> Hand {
        let (bytes, max) = (bytes as u64, max as u64);
        let mut state = self.lock();
        state.max = max;
        if !state.fits(bytes, max) && state.settle(now, max) {
            state.wake_all();
        }
        if !state.fits(bytes, max) {
            match state.waiters.entry(waiter) {
                Entry::Occupied(mut known) => {
                    let known = known.get_mut();
                    known.bytes = bytes;
                    if !known.waker.will_wake(waker) {
                        known.waker = waker.clone();
                    }
                }
                Entry::Vacant(new) => {
                    let waker = waker.clone();
                    new.insert(Waiter { waker, bytes });
                }
            }
            return Hand::Wait(state.settle_at(now, bytes, max));
        }
        state.waiters.remove(&waiter);
        if state.unwritten() == 0 {
            state.quiet_since = Some(now);
        }
        state.handed += bytes;
        Hand::Taken
    }

    /// The connection wrote `data` DATA payload bytes (maybe none) at
    /// `now`: its socket took the write. Called by the connection's
    /// stream ([`crate::activity::Watched`]).
    pub fn wrote(&self, data: usize, now: Instant) {
        let mut state = self.lock();
        let unblocked = std::mem::replace(&mut state.blocked, false);
        // Never past what was handed: bytes forgotten and written after
        // all credit at most what was handed by then.
        state.written = state.handed.min(state.written + data as u64);
        if data > 0 || unblocked {
            // The quiet spell starts again: the connection moves.
            state.quiet_since = (state.unwritten() > 0).then_some(now);
        }
        if unblocked {
            // Each learns when it may ask again.
            state.wake_all();
        } else if data > 0 {
            state.wake_fitting();
        }
    }

    /// The connection's write or flush could not go on: its socket is
    /// full. Called by the connection's stream.
    pub fn blocked(&self) {
        self.lock().blocked = true;
    }

    /// The body `waiter` waits no more (it was cut, or dropped).
    pub fn stop_waiting(&self, waiter: u64) {
        self.lock().waiters.remove(&waiter);
    }
}

/// The time over which a connection may be forgiven its cap's worth of
/// bytes (see [`SendBacklog`]'s module docs).
const FORGIVEN_PER: Duration = Duration::from_secs(60);

impl State {
    fn unwritten(&self) -> u64 {
        self.handed.saturating_sub(self.written)
    }

    /// Whether `bytes` more may be handed over within `max`.
    fn fits(&self, bytes: u64, max: u64) -> bool {
        let unwritten = self.unwritten();
        unwritten == 0 || unwritten.saturating_add(bytes) <= max
    }

    fn wake_all(&mut self) {
        std::mem::take(&mut self.waiters)
            .into_values()
            .for_each(|w| w.waker.wake());
    }

    /// Wakes the waiters whose bytes fit now, oldest first, each counted
    /// as if it took its bytes, up to the first that does not fit: a
    /// write wakes no more bodies than it made room for.
    fn wake_fitting(&mut self) {
        let mut unwritten = self.unwritten();
        while let Some(entry) = self.waiters.first_entry() {
            let bytes = entry.get().bytes;
            if unwritten > 0 && unwritten.saturating_add(bytes) > self.max {
                return;
            }
            unwritten = unwritten.saturating_add(bytes);
            entry.remove().waker.wake();
        }
    }

    /// Whether what is counted may be forgotten at `now`: the connection
    /// wrote nothing for [`SETTLE_AFTER`] while its socket took writes.
    fn quiet(&self, now: Instant) -> bool {
        !self.blocked
            && self
                .quiet_since
                .is_some_and(|since| now.saturating_duration_since(since) >= SETTLE_AFTER)
    }

    /// Bytes that may be forgotten at `now`: `max` a [`FORGIVEN_PER`],
    /// `max` at most, refilled since the last time.
    fn forgivable_at(&self, now: Instant, max: u64) -> u64 {
        match self.refilled_at {
            None => max,
            Some(at) => {
                let elapsed = now.saturating_duration_since(at).as_millis();
                let refill = elapsed * u128::from(max) / FORGIVEN_PER.as_millis();
                let refill = u64::try_from(refill).unwrap_or(u64::MAX);
                self.forgivable.saturating_add(refill).min(max)
            }
        }
    }

    /// Forgets what is counted, as much as the connection may be forgiven
    /// now, if it is quiet; whether anything was forgotten.
    fn settle(&mut self, now: Instant, max: u64) -> bool {
        if !self.quiet(now) {
            return false;
        }
        let forgivable = self.forgivable_at(now, max);
        let forgiven = self.unwritten().min(forgivable);
        self.forgivable = forgivable - forgiven;
        self.refilled_at = Some(now);
        if forgiven == 0 {
            return false;
        }
        tracing::debug!(
            bytes = forgiven,
            "answer bytes counted as handed were never written; forgotten"
        );
        self.written += forgiven;
        // What is left waits for a quiet spell (and a refill) again.
        self.quiet_since = (self.unwritten() > 0).then_some(now);
        true
    }

    /// When `bytes` more may fit within `max` by forgetting, if ever
    /// without a write: once the connection is quiet and may be forgiven
    /// enough. `None` while its socket is full.
    fn settle_at(&self, now: Instant, bytes: u64, max: u64) -> Option<Instant> {
        let since = self.quiet_since.filter(|_| !self.blocked)?;
        let quiet_at = since + SETTLE_AFTER;
        // To forget so that the bytes fit (or all, for a frame past the
        // cap), beyond what may be forgiven now.
        let needed = (self.unwritten() + bytes)
            .saturating_sub(max)
            .min(self.unwritten());
        let short = needed.saturating_sub(self.forgivable_at(now, max));
        let refill_ms = (u128::from(short) * FORGIVEN_PER.as_millis())
            .div_ceil(u128::from(max.max(1)))
            .min(FORGIVEN_PER.as_millis());
        let refilled_at = now + Duration::from_millis(refill_ms as u64);
        Some(quiet_at.max(refilled_at))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Wake;

    use super::*;

    /// Counts its wake-ups.
    #[derive(Default)]
    struct Woken(AtomicUsize);

    impl Wake for Woken {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn waker() -> (Arc<Woken>, Waker) {
        let woken = Arc::new(Woken::default());
        (woken.clone(), Waker::from(woken))
    }

    fn woken(w: &Woken) -> usize {
        w.0.load(Ordering::Relaxed)
    }

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn bytes_are_handed_within_the_cap_of_what_is_not_written() {
        let t0 = Instant::now();
        let backlog = SendBacklog::default();
        let (w, waker) = waker();
        // Nothing counted: even a frame past the cap goes, alone.
        assert_eq!(backlog.try_hand(9, &waker, 150, 100, t0), Hand::Taken);
        assert_eq!(backlog.unwritten(), 150);
        assert_eq!(
            backlog.try_hand(9, &waker, 1, 100, t0),
            Hand::Wait(Some(t0 + SETTLE_AFTER))
        );
        // Written in part: what fits in the cap goes, not a byte more.
        backlog.wrote(110, t0 + MS);
        assert_eq!(woken(&w), 1);
        assert_eq!(backlog.try_hand(9, &waker, 60, 100, t0 + MS), Hand::Taken);
        assert_eq!(backlog.unwritten(), 100);
        assert_eq!(
            backlog.try_hand(9, &waker, 1, 100, t0 + MS),
            Hand::Wait(Some(t0 + MS + SETTLE_AFTER))
        );
        // Registered once however often it asks.
        assert_eq!(
            backlog.try_hand(9, &waker, 1, 100, t0 + MS),
            Hand::Wait(Some(t0 + MS + SETTLE_AFTER))
        );
        backlog.wrote(100, t0 + 2 * MS);
        assert_eq!(woken(&w), 2);
        assert_eq!(backlog.unwritten(), 0);
        // A write of no data wakes no one.
        backlog.wrote(0, t0 + 3 * MS);
        assert_eq!(woken(&w), 2);
    }

    #[test]
    fn at_most_the_cap_is_forgotten_a_minute_and_writes_never_pass_what_was_handed() {
        let t0 = Instant::now();
        let backlog = SendBacklog::default();
        let (_, waker) = waker();
        assert_eq!(backlog.try_hand(9, &waker, 100, 100, t0), Hand::Taken);
        // Held back by HTTP/2 while the socket is idle: forgotten once,
        // the whole allowance.
        let quiet = t0 + SETTLE_AFTER;
        assert_eq!(backlog.try_hand(9, &waker, 100, 100, quiet), Hand::Taken);
        assert_eq!(backlog.unwritten(), 100);
        // Again: nothing left to forgive until the allowance refills, a
        // minute for the whole cap.
        let later = quiet + SETTLE_AFTER;
        let refilled = later + FORGIVEN_PER;
        assert_eq!(
            backlog.try_hand(9, &waker, 100, 100, later),
            Hand::Wait(Some(refilled))
        );
        // Half a minute on, half the cap is forgotten, and the rest waits
        // for the other half.
        let half = later + FORGIVEN_PER / 2;
        assert_eq!(
            backlog.try_hand(9, &waker, 100, 100, half),
            Hand::Wait(Some(refilled))
        );
        assert_eq!(backlog.unwritten(), 50);
        assert_eq!(backlog.try_hand(9, &waker, 100, 100, refilled), Hand::Taken);
        // The forgotten bytes written after all are no credit.
        backlog.wrote(1_000, refilled + MS);
        assert_eq!(backlog.unwritten(), 0);
        assert_eq!(
            backlog.try_hand(9, &waker, 100, 100, refilled + MS),
            Hand::Taken
        );
        // Its allowance spent, one byte more waits for a hundredth of it.
        assert_eq!(
            backlog.try_hand(9, &waker, 1, 100, refilled + MS),
            Hand::Wait(Some(refilled + MS + FORGIVEN_PER / 100))
        );
    }

    #[test]
    fn a_body_waits_once_however_often_it_asks_and_not_once_gone() {
        let t0 = Instant::now();
        let backlog = SendBacklog::default();
        let (_, first) = waker();
        assert_eq!(backlog.try_hand(0, &first, 100, 100, t0), Hand::Taken);
        let (w1, waker1) = waker();
        let (w2, waker2) = waker();
        for _ in 0..3 {
            assert!(matches!(
                backlog.try_hand(1, &waker1, 1, 100, t0),
                Hand::Wait(_)
            ));
        }
        // Asking with another waker replaces the body's.
        assert!(matches!(
            backlog.try_hand(2, &waker1, 1, 100, t0),
            Hand::Wait(_)
        ));
        assert!(matches!(
            backlog.try_hand(2, &waker2, 1, 100, t0),
            Hand::Wait(_)
        ));
        assert_eq!(backlog.lock().waiters.len(), 2);
        backlog.stop_waiting(2);
        backlog.wrote(1, t0 + MS);
        assert_eq!((woken(&w1), woken(&w2)), (1, 0));
        // Handing its bytes over, a body waits no more.
        assert!(matches!(
            backlog.try_hand(1, &waker1, 1, 100, t0 + MS),
            Hand::Taken
        ));
        assert!(matches!(
            backlog.try_hand(3, &waker2, 1, 100, t0 + MS),
            Hand::Wait(_)
        ));
        assert_eq!(backlog.lock().waiters.len(), 1);
    }

    #[test]
    fn a_write_wakes_the_waiters_it_made_room_for_oldest_first() {
        let t0 = Instant::now();
        let backlog = SendBacklog::default();
        let (_, first) = waker();
        assert_eq!(backlog.try_hand(0, &first, 100, 100, t0), Hand::Taken);
        let waiters: Vec<_> = (1..=3).map(|_| waker()).collect();
        for (id, (_, waker)) in (1..).zip(&waiters) {
            assert!(matches!(
                backlog.try_hand(id, waker, 40, 100, t0),
                Hand::Wait(_)
            ));
        }
        let woken_now = || waiters.iter().map(|(w, _)| woken(w)).collect::<Vec<_>>();
        // Room for one: the oldest is woken, not the others.
        backlog.wrote(50, t0 + MS);
        assert_eq!(woken_now(), vec![1, 0, 0]);
        // Room for two more.
        backlog.wrote(50, t0 + 2 * MS);
        assert_eq!(woken_now(), vec![1, 1, 1]);
        assert_eq!(backlog.lock().waiters.len(), 0);
    }

    #[test]
    fn a_full_socket_is_never_forgiven_and_its_draining_wakes_the_waiters() {
        let t0 = Instant::now();
        let backlog = SendBacklog::default();
        let (w, waker) = waker();
        assert_eq!(backlog.try_hand(9, &waker, 100, 100, t0), Hand::Taken);
        backlog.blocked();
        // The client does not read: however long, nothing is forgotten.
        let much_later = t0 + 1_000 * SETTLE_AFTER;
        assert_eq!(
            backlog.try_hand(9, &waker, 1, 100, much_later),
            Hand::Wait(None)
        );
        assert_eq!(backlog.unwritten(), 100);
        assert_eq!(woken(&w), 0);
        // The socket takes bytes again (of no DATA frame yet): the waiter
        // learns when it may ask again, the quiet spell counted from now.
        backlog.wrote(0, much_later);
        assert_eq!(woken(&w), 1);
        assert_eq!(
            backlog.try_hand(9, &waker, 1, 100, much_later + MS),
            Hand::Wait(Some(much_later + SETTLE_AFTER))
        );
    }

    #[test]
    fn bytes_never_written_while_the_socket_takes_writes_are_forgotten() {
        let t0 = Instant::now();
        let backlog = SendBacklog::default();
        let (_, waker) = waker();
        assert_eq!(backlog.try_hand(9, &waker, 80, 100, t0), Hand::Taken);
        backlog.wrote(30, t0 + 10 * MS);
        // 50 bytes of a stream reset meanwhile will never be written.
        let settle_at = t0 + 10 * MS + SETTLE_AFTER;
        assert_eq!(
            backlog.try_hand(9, &waker, 60, 100, settle_at - MS),
            Hand::Wait(Some(settle_at))
        );
        assert_eq!(backlog.unwritten(), 50);
        assert_eq!(backlog.try_hand(9, &waker, 60, 100, settle_at), Hand::Taken);
        assert_eq!(backlog.unwritten(), 60);
        // Blocked, then writing: the quiet spell starts again at the write.
        backlog.blocked();
        backlog.wrote(10, settle_at + MS);
        assert_eq!(
            backlog.try_hand(9, &waker, 60, 100, settle_at + SETTLE_AFTER),
            Hand::Wait(Some(settle_at + MS + SETTLE_AFTER))
        );
    }
}
