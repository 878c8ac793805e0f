//! Bytes of responses produced but not yet handed to the transport, per
//! connection.
//!
//! A client that never reads makes its answers wait in the server's memory;
//! per-peer limits do not bound that, because identities are free. So each
//! inbound connection (keyed by its remote address) may hold at most
//! `max_buffered_bytes_per_connection` of answers built and not yet handed
//! to HTTP/2. [`Buffered`] is the accounting, without I/O; [`ByteBudget`]
//! shares it between the handlers, the block-stream producers and the
//! response bodies, and [`Reservation`] returns its bytes on drop, so no
//! path leaks them.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::Notify;

/// An inbound connection, by its remote address (`None`: unknown, all such
/// callers share one budget).
pub type Connection = Option<SocketAddr>;

/// Bytes held per connection, each within `max`.
#[derive(Debug)]
pub struct Buffered {
    max: usize,
    /// Only connections holding bytes have an entry, so the map is never
    /// larger than the responses in flight.
    held: HashMap<Connection, usize>,
}

impl Buffered {
    /// No bytes held; at most `max` per connection.
    pub fn new(max: usize) -> Self {
        Buffered {
            max,
            held: HashMap::new(),
        }
    }

    /// Takes `bytes` for `connection` if they fit within the budget. A
    /// connection holding nothing may take any amount, so a single answer
    /// larger than the budget is still served, alone.
    pub fn try_reserve(&mut self, connection: Connection, bytes: usize) -> bool {
        let held = self.held(connection);
        if held > 0 && held.saturating_add(bytes) > self.max {
            return false;
        }
        if bytes > 0 {
            *self.held.entry(connection).or_default() += bytes;
        }
        true
    }

    /// Takes `bytes` for `connection` whatever it holds: for the part of an
    /// answer beyond the estimate it was admitted with, which waiting for
    /// could deadlock streams that each hold an estimate.
    pub fn grow(&mut self, connection: Connection, bytes: usize) {
        if bytes > 0 {
            *self.held.entry(connection).or_default() += bytes;
        }
    }

    /// Gives back `bytes` of `connection`'s (never more than it holds); the
    /// connection's entry goes when it holds nothing.
    pub fn release(&mut self, connection: Connection, bytes: usize) {
        if let Some(held) = self.held.get_mut(&connection) {
            *held = held.saturating_sub(bytes);
            if *held == 0 {
                self.held.remove(&connection);
            }
        }
    }

    /// Bytes `connection` holds.
    pub fn held(&self, connection: Connection) -> usize {
        self.held.get(&connection).copied().unwrap_or(0)
    }

    /// Connections holding bytes.
    pub fn connections(&self) -> usize {
        self.held.len()
    }
}

/// [`Buffered`] shared by the server's tasks, waking waiters on release.
#[derive(Debug)]
pub struct ByteBudget {
    buffered: Mutex<Buffered>,
    released: Notify,
}

impl ByteBudget {
    /// A budget of `max` bytes per connection.
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(ByteBudget {
            buffered: Mutex::new(Buffered::new(max)),
            released: Notify::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Buffered> {
        self.buffered.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A reservation of nothing yet for `connection`.
    pub fn reservation(self: &Arc<Self>, connection: Connection) -> Reservation {
        Reservation {
            budget: self.clone(),
            connection,
            held: AtomicUsize::new(0),
        }
    }

    /// Bytes `connection` holds.
    pub fn held(&self, connection: Connection) -> usize {
        self.lock().held(connection)
    }

    /// Connections holding bytes.
    pub fn connections(&self) -> usize {
        self.lock().connections()
    }
}

/// One response's share of its connection's budget: what it produced and
/// has not yet handed to the transport. Dropping it gives the rest back.
#[derive(Debug)]
pub struct Reservation {
    budget: Arc<ByteBudget>,
    connection: Connection,
    /// Changed only under the budget's lock.
    held: AtomicUsize,
}

impl Reservation {
    /// Adds `bytes` if the connection's budget has room (see
    /// [`Buffered::try_reserve`]).
    pub fn try_add(&self, bytes: usize) -> bool {
        let mut buffered = self.budget.lock();
        let ok = buffered.try_reserve(self.connection, bytes);
        if ok {
            self.held.fetch_add(bytes, Ordering::Relaxed);
        }
        ok
    }

    /// Adds `bytes`, waiting until the connection's budget has room.
    pub async fn add(&self, bytes: usize) {
        loop {
            let released = self.budget.released.notified();
            tokio::pin!(released);
            // Registered before the check, so a release in between wakes us.
            released.as_mut().enable();
            if self.try_add(bytes) {
                return;
            }
            released.await;
        }
    }

    /// Adds `bytes` whatever the budget holds (see [`Buffered::grow`]).
    pub fn grow(&self, bytes: usize) {
        let mut buffered = self.budget.lock();
        buffered.grow(self.connection, bytes);
        self.held.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Sets what this reservation holds from `estimate` (taken earlier) to
    /// `actual`: growing past the budget if need be, or giving back the rest.
    pub fn settle(&self, estimate: usize, actual: usize) {
        if actual > estimate {
            self.grow(actual - estimate);
        } else {
            self.release(estimate - actual);
        }
    }

    /// Gives back `bytes` (at most what this reservation holds): they were
    /// handed to the transport.
    pub fn release(&self, bytes: usize) {
        let mut buffered = self.budget.lock();
        let held = self.held.load(Ordering::Relaxed);
        let bytes = bytes.min(held);
        if bytes == 0 {
            return;
        }
        self.held.store(held - bytes, Ordering::Relaxed);
        buffered.release(self.connection, bytes);
        drop(buffered);
        self.budget.released.notify_waiters();
    }

    /// Bytes this reservation holds.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.release(usize::MAX);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(port: u16) -> Connection {
        Some(SocketAddr::from(([127, 0, 0, 1], port)))
    }

    #[test]
    fn a_connection_holds_at_most_its_budget_and_its_entry_goes_at_zero() {
        let mut b = Buffered::new(100);
        assert!(b.try_reserve(at(1), 60));
        assert!(b.try_reserve(at(1), 40));
        assert!(!b.try_reserve(at(1), 1));
        assert_eq!(b.held(at(1)), 100);
        // Another connection has its own budget.
        assert!(b.try_reserve(at(2), 70));
        assert_eq!(b.connections(), 2);
        b.release(at(1), 30);
        assert!(!b.try_reserve(at(1), 31));
        assert!(b.try_reserve(at(1), 30));
        b.release(at(1), 100);
        assert_eq!(b.held(at(1)), 0);
        assert_eq!(b.connections(), 1);
        // More than held is never released, and nothing is created.
        b.release(at(2), 1_000);
        b.release(at(3), 5);
        assert_eq!(b.connections(), 0);
    }

    #[test]
    fn an_answer_larger_than_the_budget_goes_alone() {
        let mut b = Buffered::new(100);
        assert!(b.try_reserve(at(1), 250));
        assert!(!b.try_reserve(at(1), 1));
        b.release(at(1), 250);
        assert!(b.try_reserve(at(1), 1));
        // Growing past the budget is allowed; new answers then wait.
        assert!(b.try_reserve(at(1), 99));
        b.grow(at(1), 20);
        assert_eq!(b.held(at(1)), 120);
        assert!(!b.try_reserve(at(1), 1));
    }

    #[test]
    fn reservations_release_as_sent_and_the_rest_when_dropped() {
        let budget = ByteBudget::new(1_000);
        let first = budget.reservation(at(1));
        let second = budget.reservation(at(1));
        assert!(first.try_add(600));
        assert!(second.try_add(400));
        assert!(!second.try_add(1));
        assert_eq!(budget.held(at(1)), 1_000);
        // Handed to the transport: 250 of the first.
        first.release(250);
        assert_eq!((first.held(), budget.held(at(1))), (350, 750));
        assert!(second.try_add(250));
        assert_eq!(budget.held(at(1)), 1_000);
        // An answer larger than its estimate: 400 taken, 450 built.
        second.settle(400, 450);
        assert_eq!((second.held(), budget.held(at(1))), (700, 1_050));
        // One smaller: 250 taken, 100 built.
        second.settle(250, 100);
        assert_eq!((second.held(), budget.held(at(1))), (550, 900));
        // A release beyond what a reservation holds frees only its own.
        first.release(10_000);
        assert_eq!((first.held(), budget.held(at(1))), (0, 550));
        // Cut at the deadline: dropping gives back all it held.
        drop(second);
        assert_eq!(budget.held(at(1)), 0);
        assert_eq!(budget.connections(), 0);
        drop(first);
        assert_eq!(budget.connections(), 0);
    }

    #[tokio::test]
    async fn a_waiting_reservation_proceeds_when_bytes_are_released() {
        let budget = ByteBudget::new(100);
        let held = budget.reservation(at(1));
        assert!(held.try_add(100));
        let waiting = Arc::new(budget.reservation(at(1)));
        let task = tokio::spawn({
            let waiting = waiting.clone();
            async move { waiting.add(60).await }
        });
        // On this single-threaded runtime the waiter runs until it waits.
        tokio::task::yield_now().await;
        assert!(!task.is_finished());
        assert_eq!(waiting.held(), 0);
        held.release(60);
        task.await.unwrap();
        assert_eq!((waiting.held(), budget.held(at(1))), (60, 100));
    }
}
