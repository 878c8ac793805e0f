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

    /// Moves the clock forward to `time` (never back).
    pub fn advance_to(&mut self, time: u64) {
        self.now = self.now.max(time);
    }
}
