use std::fs::File;
use std::io::{LineWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

use super::Line;
use crate::Time;

/// Directory in which shells write traces when set.
pub const TRACE_DIR_ENV: &str = "SOMA_TRACE_DIR";

enum Sink {
    File(LineWriter<File>),
    Buffer(Vec<u8>),
}

/// Writes a trace, one JSON line per input or output.
///
/// A recorder never fails its actor: if writing fails, it logs once and
/// stops recording.
pub struct Recorder {
    sink: Option<Sink>,
    seq: u64,
    path: Option<PathBuf>,
}

impl Recorder {
    /// Records to a new file at `path`.
    pub fn to_file(path: &Path) -> std::io::Result<Self> {
        Ok(Recorder {
            sink: Some(Sink::File(LineWriter::new(File::create(path)?))),
            seq: 0,
            path: Some(path.to_path_buf()),
        })
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

    /// Records into `SOMA_TRACE_DIR` if that variable is set.
    pub fn from_env(actor: &str) -> Option<Self> {
        let dir = std::env::var_os(TRACE_DIR_ENV)?;
        match Self::in_dir(Path::new(&dir), actor) {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::warn!(%e, actor, "cannot record a trace");
                None
            }
        }
    }

    /// Records into memory; see [`Recorder::into_string`].
    pub fn to_string_buffer() -> Self {
        Recorder {
            sink: Some(Sink::Buffer(Vec::new())),
            seq: 0,
            path: None,
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
        self.write(&line);
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
        self.write(&line);
    }

    fn write(&mut self, line: &Line) {
        self.seq += 1;
        let Some(sink) = self.sink.as_mut() else {
            return;
        };
        let result = serde_json::to_string(line)
            .map_err(std::io::Error::other)
            .and_then(|text| match sink {
                Sink::File(f) => writeln!(f, "{text}"),
                Sink::Buffer(b) => writeln!(b, "{text}"),
            });
        if let Err(e) = result {
            tracing::warn!(%e, path = ?self.path, "trace recording stopped");
            self.sink = None;
        }
    }
}
