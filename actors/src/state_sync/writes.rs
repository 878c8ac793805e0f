//! The order of store writes: one at a time, in the order asked, and a
//! report of each write's end that cannot be lost.

use std::collections::VecDeque;

use super::apply::{Applied, ApplyError};
use super::messages::{ApplyDone, Origin};

/// Store writes, one at a time, in the order asked: local commits sent
/// without awaiting each other are stored in the order sent, and their
/// results, hence the broadcast, come in index order. (Spawned each on the
/// blocking pool, they raced for the store: a later commit written first
/// was refused as not contiguous.)
#[derive(Debug)]
pub(super) struct WriteQueue<T> {
    /// Whether a write is on its way (its end not handled yet).
    writing: bool,
    /// Writes waiting for the one on its way, in order.
    queued: VecDeque<T>,
}

impl<T> Default for WriteQueue<T> {
    fn default() -> Self {
        WriteQueue {
            writing: false,
            queued: VecDeque::new(),
        }
    }
}

impl<T> WriteQueue<T> {
    /// `write` to start now, or `None`: a write is on its way, and this
    /// one waits its turn.
    pub(super) fn offer(&mut self, write: T) -> Option<T> {
        if self.writing {
            self.queued.push_back(write);
            return None;
        }
        self.writing = true;
        Some(write)
    }

    /// A write's end came: the next write to start, if one waits. An end
    /// no write made (`written` false: an answer for a batch gone before
    /// its write) starts nothing, or two writes would run at once.
    pub(super) fn ended(&mut self, written: bool) -> Option<T> {
        if !written {
            return None;
        }
        self.writing = false;
        let next = self.queued.pop_front()?;
        self.writing = true;
        Some(next)
    }

    /// Keeps only the waiting writes `keep` says (the write on its way is
    /// not among them: it still ends).
    pub(super) fn retain(&mut self, keep: impl FnMut(&T) -> bool) {
        self.queued.retain(keep);
    }
}

/// Sends a write's [`ApplyDone`] once: with its result, or, dropped
/// without one (the runtime dropped the write unrun, shutting down), as
/// cancelled, so the writes queued behind it do not wait for good.
pub(super) struct Report {
    to: actix::Recipient<ApplyDone>,
    origin: Option<Origin>,
}

impl Report {
    /// A report of the write of `origin`, to `to`.
    pub(super) fn new(to: actix::Recipient<ApplyDone>, origin: Origin) -> Self {
        Report {
            to,
            origin: Some(origin),
        }
    }

    /// Reports `result`, unless reported already.
    pub(super) fn send(&mut self, result: Result<Applied, ApplyError>) {
        if let Some(origin) = self.origin.take() {
            self.to.do_send(ApplyDone {
                origin,
                result,
                written: true,
            });
        }
    }
}

impl Drop for Report {
    fn drop(&mut self) {
        self.send(Err(ApplyError::Cancelled));
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use actix::{Actor, Context, Handler};

    use super::*;

    /// Writes start one at a time in the order offered; an end no write
    /// made starts none, and each real end starts the next.
    #[test]
    fn writes_start_one_at_a_time_in_order_and_only_a_real_end_starts_the_next() {
        let mut queue = WriteQueue::default();
        assert_eq!(queue.offer(1), Some(1));
        assert_eq!(queue.offer(2), None);
        assert_eq!(queue.offer(3), None);
        // A batch gone before its write: its answer ends nothing.
        assert_eq!(queue.ended(false), None);
        assert_eq!(queue.offer(4), None, "write 1 is still on its way");
        assert_eq!(queue.ended(true), Some(2));
        queue.retain(|w| *w != 3);
        assert_eq!(queue.ended(true), Some(4));
        assert_eq!(queue.ended(true), None);
        assert_eq!(queue.offer(5), Some(5), "nothing on its way");
    }

    /// Receives reports into a channel.
    struct Collector(std::sync::mpsc::Sender<ApplyDone>);

    impl Actor for Collector {
        type Context = Context<Self>;
    }

    impl Handler<ApplyDone> for Collector {
        type Result = ();
        fn handle(&mut self, done: ApplyDone, _: &mut Context<Self>) {
            let _ = self.0.send(done);
        }
    }

    /// A write the runtime drops unrun (it is shutting down) still
    /// reports, as cancelled and as a write's end, once.
    #[actix_rt::test]
    async fn a_write_dropped_unrun_reports_itself_cancelled_once() {
        let (sent, reports) = std::sync::mpsc::channel();
        let to = Collector(sent).start().recipient();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let handle = runtime.handle().clone();
        runtime.shutdown_background();
        let mut report = Report::new(to, Origin::Synced(7));
        let ran = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let ran_in_task = ran.clone();
        drop(handle.spawn_blocking(move || {
            ran_in_task.store(true, std::sync::atomic::Ordering::SeqCst);
            report.send(Err(ApplyError::BatchGone));
        }));
        let done =
            tokio::task::spawn_blocking(move || reports.recv_timeout(Duration::from_secs(30)))
                .await
                .unwrap()
                .expect("a report of the write dropped unrun");
        assert!(
            !ran.load(std::sync::atomic::Ordering::SeqCst),
            "the write never ran"
        );
        assert!(matches!(done.origin, Origin::Synced(7)));
        assert!(matches!(done.result, Err(ApplyError::Cancelled)));
        assert!(done.written);
    }
}
