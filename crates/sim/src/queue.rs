//! The event queue every simulation here runs on: events in virtual time,
//! taken in time order and, at equal times, in the order they were
//! scheduled, so a run is a pure function of its inputs.

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;

/// Events of type `E` waiting for their time.
pub struct Queue<E> {
    now: u64,
    sequence: u64,
    heap: BinaryHeap<Reverse<Scheduled<E>>>,
}

/// An event taken from the queue, with its time and sequence number.
pub struct Due<E> {
    /// Its virtual time.
    pub at: u64,
    /// Its sequence number, unique within the run.
    pub sequence: u64,
    /// The event.
    pub event: E,
}

struct Scheduled<E> {
    at: u64,
    sequence: u64,
    event: E,
}

impl<E> PartialEq for Scheduled<E> {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.sequence) == (other.at, other.sequence)
    }
}

impl<E> Eq for Scheduled<E> {}

impl<E> PartialOrd for Scheduled<E> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl<E> Ord for Scheduled<E> {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.at, self.sequence).cmp(&(other.at, other.sequence))
    }
}

impl<E> Default for Queue<E> {
    fn default() -> Self {
        Queue {
            now: 0,
            sequence: 0,
            heap: BinaryHeap::new(),
        }
    }
}

impl<E> Queue<E> {
    /// Virtual time now: that of the last event taken, or of the last
    /// [`Queue::advance_to`].
    pub fn now(&self) -> u64 {
        self.now
    }

    /// Schedules `event` `after` from now; returns its sequence number,
    /// unique within the run.
    pub fn schedule(&mut self, after: u64, event: E) -> u64 {
        self.sequence += 1;
        self.heap.push(Reverse(Scheduled {
            at: self.now + after,
            sequence: self.sequence,
            event,
        }));
        self.sequence
    }

    /// The sequence number of the last event scheduled.
    pub fn last_sequence(&self) -> u64 {
        self.sequence
    }

    /// The next event due at or before `until`, with the clock moved to
    /// its time; `None` when there is none.
    pub fn next_until(&mut self, until: u64) -> Option<E> {
        if self.heap.peek()?.0.at > until {
            return None;
        }
        let Reverse(next) = self.heap.pop()?;
        self.now = next.at;
        Some(next.event)
    }

    /// Every event due within `width` (at least 1) of the earliest one
    /// waiting, and at or before `until`, appended to `out` in their order;
    /// false when none is due. The clock does not move: the caller moves it
    /// to each event's time as it handles them ([`Queue::advance_to`]),
    /// taking first the events scheduled meanwhile that come before
    /// ([`Queue::next_before`]).
    pub fn take_window(&mut self, until: u64, width: u64, out: &mut Vec<Due<E>>) -> bool {
        let Some(first) = self.heap.peek().map(|next| next.0.at) else {
            return false;
        };
        if first > until {
            return false;
        }
        let end = first
            .saturating_add(width.max(1))
            .min(until.saturating_add(1));
        while self.heap.peek().is_some_and(|next| next.0.at < end) {
            if let Some(Reverse(next)) = self.heap.pop() {
                out.push(Due {
                    at: next.at,
                    sequence: next.sequence,
                    event: next.event,
                });
            }
        }
        true
    }

    /// The next event waiting if it comes before time `at` and sequence
    /// `sequence`, with the clock moved to its time.
    pub fn next_before(&mut self, at: u64, sequence: u64) -> Option<Due<E>> {
        let next = &self.heap.peek()?.0;
        if (next.at, next.sequence) >= (at, sequence) {
            return None;
        }
        let Reverse(next) = self.heap.pop()?;
        self.now = next.at;
        Some(Due {
            at: next.at,
            sequence: next.sequence,
            event: next.event,
        })
    }

    /// Moves the clock forward to `time` (never back).
    pub fn advance_to(&mut self, time: u64) {
        self.now = self.now.max(time);
    }
}
