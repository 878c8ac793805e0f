use std::collections::HashMap;
use std::fs::File;
use std::io::{LineWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use serde::Serialize;

use super::Line;
use crate::Time;

/// Directory in which shells write traces when set.
pub const TRACE_DIR_ENV: &str = "SOMA_TRACE_DIR";

/// The most bytes of traces in [`TRACE_DIR_ENV`], if set (a whole number
/// of bytes); [`DEFAULT_TRACE_MAX_BYTES`] otherwise.
pub const TRACE_MAX_BYTES_ENV: &str = "SOMA_TRACE_MAX_BYTES";

/// The most bytes of traces a directory holds unless
/// [`TRACE_MAX_BYTES_ENV`] says otherwise, and the most a file recorder
/// writes unless [`Recorder::with_max_bytes`] says otherwise: 1 GiB. A
/// trace records every input, so one left on in production would
/// otherwise grow until it filled the disk the node's store may share.
pub const DEFAULT_TRACE_MAX_BYTES: u64 = 1 << 30;

enum Sink {
    File(LineWriter<File>),
    Buffer(Vec<u8>),
}

/// Bytes recorders may still write, shared by those of one trace
/// directory in a process.
type Budget = Arc<AtomicU64>;

/// Writes a trace, one JSON line per input or output.
///
/// A recorder never fails its actor: if writing fails, it logs once and
/// stops recording (a write cut short by a full disk may leave its last
/// step incomplete). It also stops, logged once, before a header or an
/// input past its budget of bytes ([`Recorder::with_max_bytes`]; the
/// recorders [`Recorder::from_env`] makes share one for their directory):
/// what it wrote is then a whole trace, each input with its outputs, that
/// replays like any other (the outputs of the last input may pass the
/// budget by their own size, and a file's first header is always
/// written).
pub struct Recorder {
    sink: Option<Sink>,
    seq: u64,
    path: Option<PathBuf>,
    /// Bytes this recorder may still write before a header or an input.
    budget: Budget,
    /// Whether a line was written (the first header always is, so that
    /// the file replays).
    started: bool,
    /// Set once recording stopped (a file is closed then; a buffer keeps
    /// what it holds).
    stopped: bool,
}

impl Recorder {
    /// Records to a new file at `path`, at most [`DEFAULT_TRACE_MAX_BYTES`]
    /// unless [`Recorder::with_max_bytes`] says otherwise.
    pub fn to_file(path: &Path) -> std::io::Result<Self> {
        Ok(Self::new(
            Sink::File(LineWriter::new(File::create(path)?)),
            Some(path.to_path_buf()),
            Arc::new(AtomicU64::new(DEFAULT_TRACE_MAX_BYTES)),
        ))
    }

    fn new(sink: Sink, path: Option<PathBuf>, budget: Budget) -> Self {
        Recorder {
            sink: Some(sink),
            seq: 0,
            path,
            budget,
            started: false,
            stopped: false,
        }
    }

    /// Stops recording before a header or an input that would take the
    /// trace past `max_bytes` (`u64::MAX`: no bound).
    pub fn with_max_bytes(mut self, max_bytes: u64) -> Self {
        self.budget = Arc::new(AtomicU64::new(max_bytes));
        self
    }

    /// Records to a fresh file for `actor` in `dir`.
    pub fn in_dir(dir: &Path, actor: &str) -> std::io::Result<Self> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        std::fs::create_dir_all(dir)?;
        let name = format!(
            "{actor}-{}-{}.jsonl",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        Self::to_file(&dir.join(name))
    }

    /// Records into `SOMA_TRACE_DIR` if that variable is set, within
    /// `SOMA_TRACE_MAX_BYTES` for the whole directory: the traces already
    /// there (of earlier runs) count, and the recorders of this process
    /// share what is left. None once the directory is full (logged).
    pub fn from_env(actor: &str) -> Option<Self> {
        let dir = PathBuf::from(std::env::var_os(TRACE_DIR_ENV)?);
        let budget = directory_budget(&dir);
        if budget.load(Ordering::Relaxed) == 0 {
            tracing::warn!(
                actor,
                ?dir,
                "the trace directory holds {TRACE_MAX_BYTES_ENV} bytes already; not recording \
                 (empty it, or raise the bound)"
            );
            return None;
        }
        match Self::in_dir(&dir, actor) {
            Ok(r) => Some(Recorder { budget, ..r }),
            Err(e) => {
                tracing::warn!(
                    %e,
                    actor,
                    ?dir,
                    "cannot record a trace in {TRACE_DIR_ENV}: make the directory writable, \
                     or unset the variable"
                );
                None
            }
        }
    }

    /// Records into memory, without a bound unless one is set; see
    /// [`Recorder::into_string`].
    pub fn to_string_buffer() -> Self {
        Self::new(
            Sink::Buffer(Vec::new()),
            None,
            Arc::new(AtomicU64::new(u64::MAX)),
        )
    }

    /// The file being written, if any.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The trace recorded into memory so far (empty for a file recorder).
    pub fn into_string(self) -> String {
        match self.sink {
            Some(Sink::Buffer(b)) => String::from_utf8(b).unwrap_or_default(),
            _ => String::new(),
        }
    }

    pub(crate) fn header<T: Serialize>(&mut self, actor: &str, init: &T) {
        let line = Line {
            seq: self.seq,
            t: None,
            actor: actor.to_string(),
            init: serde_json::to_value(init).ok(),
            input: None,
            out: None,
        };
        self.write(&line, true);
    }

    pub(crate) fn record<T: Serialize>(&mut self, actor: &str, now: Time, kind: &str, msg: &T) {
        let value = serde_json::to_value(msg).ok();
        let (input, out) = if kind == "in" {
            (value, None)
        } else {
            (None, value)
        };
        let line = Line {
            seq: self.seq,
            t: Some(now.0),
            actor: actor.to_string(),
            init: None,
            input,
            out,
        };
        self.write(&line, kind == "in");
    }

    /// Writes `line`; one that `opens` a step (a header or an input) only
    /// if the budget holds it, or if it is the first line.
    fn write(&mut self, line: &Line, opens: bool) {
        self.seq += 1;
        if self.stopped {
            return;
        }
        let Some(sink) = self.sink.as_mut() else {
            return;
        };
        let text = match serde_json::to_string(line) {
            Ok(text) => text,
            Err(e) => return self.stop(&e.to_string()),
        };
        let len = text.len() as u64 + 1;
        let take = |left: u64| {
            if opens && self.started {
                left.checked_sub(len)
            } else {
                Some(left.saturating_sub(len))
            }
        };
        if self
            .budget
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, take)
            .is_err()
        {
            return self.stop(&format!(
                "the trace reached its bound of bytes ({TRACE_MAX_BYTES_ENV})"
            ));
        }
        let result = match sink {
            Sink::File(f) => writeln!(f, "{text}"),
            Sink::Buffer(b) => writeln!(b, "{text}"),
        };
        self.started = true;
        if let Err(e) = result {
            self.stop(&e.to_string());
        }
    }

    /// Ends a recording that must be whole (a rewritten trace): its file
    /// flushed and synced, or an error if recording stopped on the way.
    pub(crate) fn finish(mut self) -> std::io::Result<()> {
        if self.stopped {
            return Err(std::io::Error::other(format!(
                "the trace {:?} could not be written whole",
                self.path
            )));
        }
        if let Some(Sink::File(f)) = self.sink.as_mut() {
            f.flush()?;
            f.get_ref().sync_all()?;
        }
        Ok(())
    }

    fn stop(&mut self, why: &str) {
        tracing::warn!(why, path = ?self.path, "trace recording stopped");
        self.stopped = true;
        if matches!(self.sink, Some(Sink::File(_))) {
            self.sink = None;
        }
    }
}

/// The budget of the recorders of trace directory `dir` in this process:
/// the bound (`SOMA_TRACE_MAX_BYTES`, or the default) less the bytes of
/// the traces already there, counted once, when the first recorder of the
/// directory starts.
fn directory_budget(dir: &Path) -> Budget {
    static BUDGETS: Mutex<Option<HashMap<PathBuf, Budget>>> = Mutex::new(None);
    let mut budgets = BUDGETS.lock().unwrap_or_else(PoisonError::into_inner);
    let budgets = budgets.get_or_insert_with(HashMap::new);
    if let Some(budget) = budgets.get(dir) {
        return budget.clone();
    }
    let max = match std::env::var(TRACE_MAX_BYTES_ENV) {
        Err(_) => DEFAULT_TRACE_MAX_BYTES,
        Ok(text) => text.trim().parse().unwrap_or_else(|_| {
            tracing::warn!(
                value = %text,
                default = DEFAULT_TRACE_MAX_BYTES,
                "{TRACE_MAX_BYTES_ENV} is not a whole number of bytes (write 1073741824, not 1G); \
                 using the default"
            );
            DEFAULT_TRACE_MAX_BYTES
        }),
    };
    let budget = Arc::new(AtomicU64::new(left_in(dir, max)));
    budgets.insert(dir.to_path_buf(), budget.clone());
    budget
}

/// What a bound of `max` bytes leaves for new traces in `dir`.
fn left_in(dir: &Path, max: u64) -> u64 {
    max.saturating_sub(traces_in(dir))
}

/// The bytes of the traces (`*.jsonl` files) in `dir`; 0 if it cannot be
/// read (it may not exist yet).
fn traces_in(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .filter(|e| e.path().extension().is_some_and(|x| x == "jsonl"))
        .filter_map(|e| e.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Driver;
    use crate::supervisor::{ActorFailure, Input, SupervisorCore};

    /// A recorder bounded to a few steps stops before the input that would
    /// pass its bound: what it wrote is the header and whole steps, each
    /// input with its output, and replays; nothing after the stop is
    /// written, a restart's header included.
    #[test]
    fn a_bounded_trace_stops_before_an_input_past_its_bound_and_replays() {
        let failed = |n: u32| Input::Failed {
            actor: format!("actor-{n}"),
            failure: ActorFailure::Stopped,
        };
        // The size of the header and of one step, from a trace unbounded.
        let mut sizes = Driver::<SupervisorCore>::new(
            crate::supervisor::Config::default(),
            Some(Recorder::to_string_buffer()),
        );
        sizes.step_at(Time(0), failed(0));
        let unbounded = sizes.into_recorder().unwrap().into_string();
        let lines: Vec<&str> = unbounded.lines().collect();
        assert_eq!(lines.len(), 3, "a header, an input, an output");
        let size = |line: &str| line.len() as u64 + 1;
        let (header, step) = (size(lines[0]), size(lines[1]) + size(lines[2]));

        // Room for the header, three steps and part of a fourth input.
        let bound = header + 3 * step + size(lines[1]) - 1;
        let recorder = Recorder::to_string_buffer().with_max_bytes(bound);
        let mut driver =
            Driver::<SupervisorCore>::new(crate::supervisor::Config::default(), Some(recorder));
        for n in 0..10 {
            driver.step_at(Time(u64::from(n)), failed(n));
        }
        driver.restart(crate::supervisor::Config::default());
        let text = driver.into_recorder().unwrap().into_string();
        assert_eq!(text.lines().count(), 1 + 3 * 2);
        assert!(text.len() as u64 <= bound);
        let (report, _) = crate::replay::replay_text(&text, false).expect("the trace replays");
        assert_eq!((report.inputs, report.outputs, report.restarts), (3, 3, 0));
    }

    /// A file's first header is written whatever the budget, so that a
    /// file made is a trace that replays; nothing after it.
    #[test]
    fn a_trace_without_budget_still_holds_its_header_and_replays() {
        let recorder = Recorder::to_string_buffer().with_max_bytes(0);
        let mut driver =
            Driver::<SupervisorCore>::new(crate::supervisor::Config::default(), Some(recorder));
        driver.step_at(
            Time(0),
            Input::Failed {
                actor: "a".into(),
                failure: ActorFailure::Stopped,
            },
        );
        let text = driver.into_recorder().unwrap().into_string();
        assert_eq!(text.lines().count(), 1);
        let (report, _) = crate::replay::replay_text(&text, false).expect("the trace replays");
        assert_eq!((report.inputs, report.outputs), (0, 0));
    }

    /// Recorders sharing a budget (those of one trace directory) stop
    /// together once it is spent; a directory's budget counts the traces
    /// already in it, and only those.
    #[test]
    fn recorders_of_one_directory_share_its_bound_and_its_old_traces_count() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("old.jsonl"), vec![b'x'; 100]).unwrap();
        std::fs::write(dir.path().join("notes.txt"), vec![b'x'; 50]).unwrap();
        assert_eq!(left_in(dir.path(), 1_000), 900);
        assert_eq!(left_in(dir.path(), 60), 0);
        assert_eq!(left_in(&dir.path().join("none"), 60), 60);

        let shared: Budget = Arc::new(AtomicU64::new(0));
        let recorder = || Recorder {
            budget: shared.clone(),
            ..Recorder::to_string_buffer()
        };
        let (mut a, mut b) = (recorder(), recorder());
        a.header("a", &1u8);
        b.header("b", &1u8);
        let line = |r: &Recorder| match &r.sink {
            Some(Sink::Buffer(bytes)) => bytes.len() as u64,
            _ => 0,
        };
        // Room for exactly one more input, then a's and b's in turn.
        let input_len = {
            let mut probe = Recorder::to_string_buffer();
            probe.record("a", Time(0), "in", &1u8);
            line(&probe)
        };
        shared.store(input_len, Ordering::Relaxed);
        a.record("a", Time(0), "in", &1u8);
        b.record("b", Time(0), "in", &1u8);
        a.record("a", Time(0), "in", &1u8);
        assert_eq!(
            a.into_string().lines().count(),
            2,
            "a's header and one input"
        );
        assert_eq!(b.into_string().lines().count(), 1, "b's header only");
    }
}
