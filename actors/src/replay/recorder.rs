use std::fs::File;
use std::io::{LineWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

use super::Line;
use crate::Time;

/// Directory in which shells write traces when set.
pub const TRACE_DIR_ENV: &str = "SOMA_TRACE_DIR";

/// The most bytes of a trace file written from [`TRACE_DIR_ENV`], if set
/// (a whole number of bytes); [`DEFAULT_TRACE_MAX_BYTES`] otherwise.
pub const TRACE_MAX_BYTES_ENV: &str = "SOMA_TRACE_MAX_BYTES";

/// The most bytes a trace file holds unless [`TRACE_MAX_BYTES_ENV`] says
/// otherwise: 256 MiB per actor. A trace records every input, so one left
/// on in production would otherwise grow until it filled the disk the
/// node's store may share.
pub const DEFAULT_TRACE_MAX_BYTES: u64 = 256 << 20;

enum Sink {
    File(LineWriter<File>),
    Buffer(Vec<u8>),
}

/// Writes a trace, one JSON line per input or output.
///
/// A recorder never fails its actor: if writing fails, it logs once and
/// stops recording. It also stops, logged once, before a header or an
/// input that would take it past its most bytes
/// ([`Recorder::with_max_bytes`]): what it wrote is a whole trace, each
/// input with its outputs, that replays like any other (the outputs of
/// the last input may pass the bound by their own size).
pub struct Recorder {
    sink: Option<Sink>,
    seq: u64,
    path: Option<PathBuf>,
    /// Bytes written so far.
    written: u64,
    /// The most bytes written before a header or an input.
    max_bytes: u64,
    /// Set once recording stopped (a file is closed then; a buffer keeps
    /// what it holds).
    stopped: bool,
}

impl Recorder {
    /// Records to a new file at `path`.
    pub fn to_file(path: &Path) -> std::io::Result<Self> {
        Ok(Recorder {
            sink: Some(Sink::File(LineWriter::new(File::create(path)?))),
            seq: 0,
            path: Some(path.to_path_buf()),
            written: 0,
            max_bytes: DEFAULT_TRACE_MAX_BYTES,
            stopped: false,
        })
    }

    /// Stops recording before a header or an input that would take the
    /// trace past `max_bytes`.
    pub fn with_max_bytes(mut self, max_bytes: u64) -> Self {
        self.max_bytes = max_bytes;
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

    /// Records into `SOMA_TRACE_DIR` if that variable is set, at most
    /// `SOMA_TRACE_MAX_BYTES` per file.
    pub fn from_env(actor: &str) -> Option<Self> {
        let dir = std::env::var_os(TRACE_DIR_ENV)?;
        let max_bytes = match std::env::var(TRACE_MAX_BYTES_ENV) {
            Err(_) => DEFAULT_TRACE_MAX_BYTES,
            Ok(text) => text.trim().parse().unwrap_or_else(|_| {
                tracing::warn!(
                    value = %text,
                    default = DEFAULT_TRACE_MAX_BYTES,
                    "{TRACE_MAX_BYTES_ENV} is not a whole number of bytes (write it as 1073741824, \
                     not 1G); recording to the default bound"
                );
                DEFAULT_TRACE_MAX_BYTES
            }),
        };
        match Self::in_dir(Path::new(&dir), actor) {
            Ok(r) => Some(r.with_max_bytes(max_bytes)),
            Err(e) => {
                tracing::warn!(%e, actor, "cannot record a trace");
                None
            }
        }
    }

    /// Records into memory, without a bound unless one is set; see
    /// [`Recorder::into_string`].
    pub fn to_string_buffer() -> Self {
        Recorder {
            sink: Some(Sink::Buffer(Vec::new())),
            seq: 0,
            path: None,
            written: 0,
            max_bytes: u64::MAX,
            stopped: false,
        }
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
    /// if it keeps the trace within its most bytes.
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
        if opens && self.written.saturating_add(len) > self.max_bytes {
            return self.stop(&format!(
                "the trace reached its bound of {} bytes ({TRACE_MAX_BYTES_ENV})",
                self.max_bytes
            ));
        }
        let result = match sink {
            Sink::File(f) => writeln!(f, "{text}"),
            Sink::Buffer(b) => writeln!(b, "{text}"),
        };
        match result {
            Ok(()) => self.written += len,
            Err(e) => self.stop(&e.to_string()),
        }
    }

    fn stop(&mut self, why: &str) {
        tracing::warn!(why, path = ?self.path, "trace recording stopped");
        self.stopped = true;
        if matches!(self.sink, Some(Sink::File(_))) {
            self.sink = None;
        }
    }
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
}
