//! Every trace in `tests/replays/` replays exactly, and replay reports the
//! first difference when a recorded output is altered.

use std::path::{Path, PathBuf};

use soma_actors::replay::{REWRITE_ENV, ReplayError, check, replay_text};

fn traces() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("replays");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("tests/replays exists")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .collect();
    files.sort();
    files
}

#[test]
fn every_trace_replays_exactly() {
    let files = traces();
    assert_eq!(files.len(), TRACES, "the traces checked in: {files:?}");
    for file in files {
        let before = std::fs::read(&file).unwrap();
        match check(&file) {
            Ok(report) => {
                assert!(report.inputs > 0, "{} has no inputs", file.display());
                assert!(!report.rewritten, "{}", file.display());
            }
            Err(e) => panic!("{}: {e}", file.display()),
        }
        assert_eq!(
            std::fs::read(&file).unwrap(),
            before,
            "{} changed",
            file.display()
        );
    }
}

/// The traces in tests/replays.
const TRACES: usize = 12;

/// A rewrite is a deliberate act on one file (`SOMA_REPLAY_REWRITE=1
/// soma-p2p replay FILE`, see docs/replay.md), never a side effect of the
/// tests: with the variable exported they fail, rather than pass on traces
/// they rewrote.
#[test]
fn the_tests_run_with_rewriting_off() {
    assert!(
        std::env::var(REWRITE_ENV).is_err(),
        "{REWRITE_ENV} is set: the tests compare traces, they do not rewrite them; \
         unset it, and rewrite a trace with `{REWRITE_ENV}=1 soma-p2p replay FILE`"
    );
}

/// A trace recorded across a restart replays in two parts: a fresh core
/// from each header, and the second core's outputs (a lease granted after
/// the restart takes the id after the failed incarnation's last) match.
#[test]
fn a_trace_across_a_restart_replays_from_each_header() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("replays");
    let report = check(&dir.join("peer_heights_restart.jsonl")).unwrap();
    assert_eq!(
        (report.actor.as_str(), report.restarts),
        ("peer_heights", 1)
    );
    let report = check(&dir.join("supervisor_restart.jsonl")).unwrap();
    assert_eq!(
        (report.actor.as_str(), report.inputs, report.restarts),
        ("supervisor", 1, 0)
    );
    // Made from the first header instead, the core after the restart
    // would grant lease ids from 0 again: replay tells them apart.
    let text = std::fs::read_to_string(dir.join("peer_heights_restart.jsonl")).unwrap();
    let headers: Vec<&str> = text.lines().filter(|l| l.contains("\"init\"")).collect();
    assert_eq!(headers.len(), 2);
    let first_init = &headers[0][headers[0].find("\"init\"").unwrap()..];
    let second = headers[1];
    let altered = text.replace(
        second,
        &format!(
            "{}{}",
            &second[..second.find("\"init\"").unwrap()],
            first_init
        ),
    );
    assert!(matches!(
        replay_text(&altered, false),
        Err(ReplayError::Mismatch { .. })
    ));
}

#[test]
fn altered_output_is_reported_at_its_line() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("replays/peer_heights_ban_expires.jsonl");
    let text = std::fs::read_to_string(path).unwrap();
    // Line 13 records that the banned peer's height is known again.
    let altered = text.replace(
        r#""out":{"highest_known":500}"#,
        r#""out":{"highest_known":499}"#,
    );
    assert_ne!(altered, text);
    match replay_text(&altered, false) {
        Err(ReplayError::Mismatch {
            line,
            expected,
            got,
        }) => {
            assert_eq!(line, 13);
            assert_eq!(expected, r#"{"highest_known":499}"#);
            assert_eq!(got, r#"{"highest_known":500}"#);
        }
        other => panic!("expected a mismatch, got {other:?}"),
    }
}

#[test]
fn missing_and_extra_outputs_are_reported() {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("replays/peer_heights_peer_goes_away.jsonl");
    let text = std::fs::read_to_string(path).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    // Drop line 5, the answer to the first query: the core still produces
    // it, where the trace now has nothing.
    let without: String = lines
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 4)
        .map(|(_, l)| format!("{l}\n"))
        .collect();
    match replay_text(&without, false) {
        Err(ReplayError::Mismatch {
            line,
            expected,
            got,
        }) => {
            assert_eq!(line, 5);
            assert_eq!(expected, "nothing");
            assert_eq!(got, r#"{"highest_known":50}"#);
        }
        other => panic!("expected a mismatch, got {other:?}"),
    }
    // Drop line 4 instead, the query: its recorded answer is now extra.
    let without: String = lines
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 3)
        .map(|(_, l)| format!("{l}\n"))
        .collect();
    match replay_text(&without, false) {
        Err(ReplayError::Mismatch {
            line,
            expected,
            got,
        }) => {
            assert_eq!(line, 4);
            assert_eq!(expected, r#"{"highest_known":50}"#);
            assert_eq!(got, "nothing");
        }
        other => panic!("expected a mismatch, got {other:?}"),
    }
}

#[test]
fn rewrite_mode_regenerates_outputs() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("replays/peer_heights_ban_expires.jsonl");
    let text = std::fs::read_to_string(path).unwrap();
    let altered = text.replace(r#""until":61000"#, r#""until":1"#);
    let (report, rewritten) = replay_text(&altered, true).unwrap();
    assert!(report.rewritten);
    assert!(rewritten.contains(r#""until":61000"#));
    assert!(replay_text(&rewritten, false).is_ok());
}

#[test]
fn unknown_actor_and_bad_json_are_errors() {
    assert!(matches!(
        replay_text(r#"{"seq":0,"actor":"nobody","init":{}}"#, false),
        Err(ReplayError::UnknownActor(a)) if a == "nobody"
    ));
    assert!(matches!(
        replay_text("not json", false),
        Err(ReplayError::Parse { line: 1, .. })
    ));
}
