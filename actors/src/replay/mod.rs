//! Recording actors' inputs and outputs, and replaying them.
//!
//! A trace is a JSON Lines file. Its first line is the header: the actor's
//! name and the [`Core::Init`] it was made from, RNG seed included. Every
//! other line is one input (`"in"`) or one output (`"out"`) with a sequence
//! number, the virtual time in milliseconds (`"t"`) and the actor's name:
//!
//! ```text
//! {"seq":0,"actor":"peer_heights","init":{"seed":7,...}}
//! {"seq":1,"t":0,"actor":"peer_heights","in":{"update":{...}}}
//! {"seq":2,"t":0,"actor":"peer_heights","out":{"highest_known_changed":12}}
//! ```
//!
//! A restarted actor goes on writing the same trace: a header line in the
//! middle holds the init its core was rebuilt from, and replay makes a
//! fresh core there.
//!
//! Shells record when given a [`Recorder`] (for instance from
//! [`Recorder::from_env`], which reads `SOMA_TRACE_DIR`). [`replay`] makes a
//! fresh core from the header, feeds it every input at its recorded time, and
//! compares the outputs with the recorded ones; the first difference is an
//! error naming the line. With `SOMA_REPLAY_REWRITE=1` it rewrites the file
//! with the outputs the core produces now, for a change made on purpose; the
//! diff of the trace is then reviewed in the commit.

mod recorder;

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::Core;
use crate::connections::ConnectionsCore;
use crate::discovery::DiscoveryCore;
use crate::grpc::GrpcAdapterCore;
use crate::peer_heights::PeerHeightsCore;
use crate::state_sync::StateSyncCore;
use crate::supervisor::SupervisorCore;
use crate::verifier::VerifierCore;

pub use recorder::{DEFAULT_TRACE_MAX_BYTES, Recorder, TRACE_DIR_ENV, TRACE_MAX_BYTES_ENV};

/// Set to `1` to rewrite traces with the outputs the cores produce now.
pub const REWRITE_ENV: &str = "SOMA_REPLAY_REWRITE";

/// One line of a trace.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Line {
    seq: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    t: Option<u64>,
    actor: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    init: Option<Value>,
    #[serde(rename = "in", default, skip_serializing_if = "Option::is_none")]
    input: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    out: Option<Value>,
}

/// What a successful replay went through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// The actor whose core was replayed.
    pub actor: String,
    /// Inputs fed to the core.
    pub inputs: usize,
    /// Outputs compared.
    pub outputs: usize,
    /// Restarts the trace records: headers after the first, each making a
    /// fresh core from the init the restarted shell rebuilt.
    pub restarts: usize,
    /// Whether the trace was rewritten (`SOMA_REPLAY_REWRITE=1`).
    pub rewritten: bool,
}

/// Why a replay failed.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// The trace file could not be read or written.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// A line is not valid trace JSON.
    #[error("line {line}: {message}")]
    Parse {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// The header names an actor this build does not know.
    #[error("unknown actor {0:?}")]
    UnknownActor(String),
    /// The core's outputs differ from the recorded ones.
    #[error("line {line}: expected {expected}, got {got}")]
    Mismatch {
        /// 1-based line number of the first recorded output that differs
        /// (or where a missing output should be).
        line: usize,
        /// The recorded output (`nothing` if the core produced an extra one).
        expected: String,
        /// The output the core produced (`nothing` if it produced fewer).
        got: String,
    },
}

/// Replays the trace at `path`; rewrites it instead of failing on a
/// difference when `SOMA_REPLAY_REWRITE=1`. The trace is read a line at a
/// time, and a rewrite goes to a file beside it, renamed over it once
/// whole: a trace as large as a recorder writes (1 GiB) replays in the
/// memory of one step, not of the whole trace.
pub fn replay(path: &Path) -> Result<Report, ReplayError> {
    let rewrite = std::env::var(REWRITE_ENV).is_ok_and(|v| v == "1");
    if !rewrite {
        return check(path);
    }
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".rewrite");
    let temporary = path.with_file_name(name);
    let out = Recorder::to_file(&temporary)?.with_max_bytes(u64::MAX);
    let replayed = replay_lines(lines_of(path)?, Some(out), true);
    match replayed {
        Ok((report, out)) => {
            out.map(Recorder::finish).transpose()?;
            std::fs::rename(&temporary, path)?;
            Ok(report)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&temporary);
            Err(e)
        }
    }
}

/// Replays the trace at `path` and never rewrites it, whatever the
/// environment says: what tests use, so that a rewrite is always a
/// deliberate act (`SOMA_REPLAY_REWRITE=1 soma-p2p replay FILE`).
pub fn check(path: &Path) -> Result<Report, ReplayError> {
    replay_lines(lines_of(path)?, None, false).map(|(report, _)| report)
}

/// Replays a trace held in memory. With `rewrite`, differences are not
/// errors; the second value is the trace with the outputs produced now.
pub fn replay_text(text: &str, rewrite: bool) -> Result<(Report, String), ReplayError> {
    let lines = text.lines().map(|line| Ok(line.to_string()));
    let out = Recorder::to_string_buffer();
    let (report, out) = replay_lines(lines, Some(out), rewrite)?;
    Ok((report, out.map(Recorder::into_string).unwrap_or_default()))
}

/// The lines of the file at `path`, read as they are taken.
fn lines_of(path: &Path) -> std::io::Result<impl Iterator<Item = std::io::Result<String>> + use<>> {
    use std::io::BufRead;
    Ok(std::io::BufReader::new(std::fs::File::open(path)?).lines())
}

/// Replays `lines`, recording into `out` what the core does now; with
/// `rewrite`, differences are not errors.
fn replay_lines(
    lines: impl Iterator<Item = std::io::Result<String>>,
    out: Option<Recorder>,
    rewrite: bool,
) -> Result<(Report, Option<Recorder>), ReplayError> {
    let mut lines = parse(lines).peekable();
    let actor = match lines.peek() {
        None => {
            return Err(ReplayError::Parse {
                line: 1,
                message: "empty trace".into(),
            });
        }
        Some(Err(_)) => return Err(lines.next().and_then(Result::err).expect("an error")),
        Some(Ok((_, header))) => header.actor.clone(),
    };
    match actor.as_str() {
        PeerHeightsCore::NAME => replay_core::<PeerHeightsCore>(lines, out, rewrite),
        VerifierCore::NAME => replay_core::<VerifierCore>(lines, out, rewrite),
        DiscoveryCore::NAME => replay_core::<DiscoveryCore>(lines, out, rewrite),
        ConnectionsCore::NAME => replay_core::<ConnectionsCore>(lines, out, rewrite),
        GrpcAdapterCore::NAME => replay_core::<GrpcAdapterCore>(lines, out, rewrite),
        StateSyncCore::NAME => replay_core::<StateSyncCore>(lines, out, rewrite),
        SupervisorCore::NAME => replay_core::<SupervisorCore>(lines, out, rewrite),
        other => Err(ReplayError::UnknownActor(other.to_string())),
    }
}

/// The non-empty lines of a trace, parsed, with their 1-based numbers.
fn parse(
    lines: impl Iterator<Item = std::io::Result<String>>,
) -> impl Iterator<Item = Result<(usize, Line), ReplayError>> {
    lines
        .enumerate()
        .filter(|(_, l)| l.as_ref().map_or(true, |l| !l.trim().is_empty()))
        .map(|(i, l)| {
            let line = l?;
            serde_json::from_str(&line)
                .map(|parsed| (i + 1, parsed))
                .map_err(|e| ReplayError::Parse {
                    line: i + 1,
                    message: e.to_string(),
                })
        })
}

fn replay_core<C: Core>(
    mut lines: std::iter::Peekable<impl Iterator<Item = Result<(usize, Line), ReplayError>>>,
    mut out: Option<Recorder>,
    rewrite: bool,
) -> Result<(Report, Option<Recorder>), ReplayError> {
    let parse_err = |line: usize, e: serde_json::Error| ReplayError::Parse {
        line,
        message: e.to_string(),
    };
    if let Some(Ok((header_line, header))) = lines.peek()
        && header.init.is_none()
    {
        return Err(ReplayError::Parse {
            line: *header_line,
            message: "the first line must be the header with \"init\"".into(),
        });
    }
    let mut core: Option<C> = None;
    let mut report = Report {
        actor: C::NAME.to_string(),
        inputs: 0,
        outputs: 0,
        restarts: 0,
        rewritten: rewrite,
    };
    while let Some(next) = lines.next() {
        let (line_no, line) = next?;
        // A header: the first core, or a restart with the init the shell
        // rebuilt it from.
        if let Some(init) = line.init {
            let init: C::Init = serde_json::from_value(init).map_err(|e| parse_err(line_no, e))?;
            if let Some(out) = out.as_mut() {
                out.header(C::NAME, &init);
            }
            if core.is_some() {
                report.restarts += 1;
            }
            core = Some(C::new(init));
            continue;
        }
        let Some(input_value) = line.input else {
            return Err(ReplayError::Parse {
                line: line_no,
                message: "an output with no input before it".into(),
            });
        };
        let input: C::Input =
            serde_json::from_value(input_value).map_err(|e| parse_err(line_no, e))?;
        let now = crate::Time(line.t.unwrap_or(0));
        if let Some(out) = out.as_mut() {
            out.record(C::NAME, now, "in", &input);
        }
        let produced = core
            .as_mut()
            .expect("the first line is a header")
            .handle(now, input);
        report.inputs += 1;

        // The recorded outputs of this input are the lines up to the next
        // input or header.
        let mut recorded = Vec::new();
        while let Some(Ok((_, next))) = lines.peek()
            && next.input.is_none()
            && next.init.is_none()
        {
            recorded.push(lines.next().expect("peeked")?);
        }
        if let Some(out) = out.as_mut() {
            for output in &produced {
                out.record(C::NAME, now, "out", output);
            }
        }
        report.outputs += produced.len();
        if rewrite {
            continue;
        }
        for k in 0..produced.len().max(recorded.len()) {
            let got = produced
                .get(k)
                .map(|o| serde_json::to_value(o).map_err(|e| parse_err(line_no, e)))
                .transpose()?;
            let expected = recorded
                .get(k)
                .map(|(_, l)| l.out.clone().unwrap_or(Value::Null));
            if got != expected {
                let line = recorded.get(k).map_or_else(
                    || recorded.last().map_or(line_no, |(n, _)| *n) + 1,
                    |(n, _)| *n,
                );
                let show =
                    |v: Option<Value>| v.map_or_else(|| "nothing".to_string(), |v| v.to_string());
                return Err(ReplayError::Mismatch {
                    line,
                    expected: show(expected),
                    got: show(got),
                });
            }
        }
    }
    Ok((report, out))
}
