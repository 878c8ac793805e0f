//! When StateSync asks its peers for their heights.
//!
//! Every connected peer is asked once per interval. A PushCommit brings the
//! next round forward when it claims more than any tracked peer does: the
//! pusher is often a peer this node never dialled, whose claim PeerHeights
//! does not take (identities are free in public mode, and pushers must not
//! evict the peers it tracks), but the push still says that a newer height
//! is out there, so the peers this node does track are asked at once. A
//! pusher can buy one early round per interval at most, whoever it is: a
//! flood of pushes costs at most twice the queries of a quiet interval.
//!
//! The simulator (crates/sim) schedules its nodes' rounds with this same
//! type.

use serde::{Deserialize, Serialize};
use soma_types::CommitIndex;

use crate::Time;

/// The schedule of height-query rounds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeightQueries {
    interval_ms: u64,
    /// When the next periodic round is due.
    next: Time,
    /// When a push last brought a round forward.
    hinted: Option<Time>,
}

impl HeightQueries {
    /// A schedule of one round every `interval_ms` (at least 1), the first
    /// due at once.
    pub fn new(interval_ms: u64) -> Self {
        HeightQueries {
            interval_ms: interval_ms.max(1),
            next: Time(0),
            hinted: None,
        }
    }

    /// Whether a periodic round is due at `now`; if so, the next one is
    /// planned an interval on.
    pub fn due(&mut self, now: Time) -> bool {
        if now < self.next {
            return false;
        }
        self.next = Time(now.0.saturating_add(self.interval_ms));
        true
    }

    /// Whether a push claiming `index`, when the peers tracked claim at
    /// most `highest_known`, starts a round at `now`: only if the claim is
    /// beyond theirs and no push brought one forward within the last
    /// interval. A round started so moves the next periodic one an
    /// interval on.
    pub fn pushed(&mut self, now: Time, index: CommitIndex, highest_known: CommitIndex) -> bool {
        if index <= highest_known
            || self
                .hinted
                .is_some_and(|at| now.0 < at.0.saturating_add(self.interval_ms))
        {
            return false;
        }
        self.hinted = Some(now);
        self.next = Time(now.0.saturating_add(self.interval_ms));
        true
    }

    /// When the next periodic round is due.
    pub fn next(&self) -> Time {
        self.next
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_come_once_per_interval_from_the_first_tick() {
        let mut q = HeightQueries::new(1_000);
        assert!(q.due(Time(5)));
        assert!(!q.due(Time(1_004)));
        assert!(q.due(Time(1_005)));
        assert_eq!(q.next(), Time(2_005));
    }

    #[test]
    fn a_push_beyond_every_claim_starts_a_round_and_moves_the_next() {
        let mut q = HeightQueries::new(1_000);
        assert!(q.due(Time(0)));
        assert!(!q.pushed(Time(300), 10, 10), "not beyond the claims");
        assert!(q.pushed(Time(300), 11, 10));
        assert_eq!(q.next(), Time(1_300));
        assert!(!q.due(Time(1_000)));
        assert!(q.due(Time(1_300)));
    }

    #[test]
    fn pushes_bring_a_round_forward_at_most_once_per_interval() {
        let mut q = HeightQueries::new(1_000);
        assert!(q.due(Time(0)));
        let started: Vec<u64> = (0..40)
            .map(|n| 100 + n * 100)
            .filter(|&at| q.pushed(Time(at), 50 + at, 10))
            .collect();
        // Whoever pushes, whatever it claims: one round per interval.
        assert_eq!(started, vec![100, 1_100, 2_100, 3_100]);
    }
}
