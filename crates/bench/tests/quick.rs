//! The harness's quick mode runs every benchmark at a tiny size and produces
//! every figure. Nothing here is timed: the figures of a tiny run under a
//! debug build mean nothing, only that each was measured.

use std::process::Command;

use serde_json::Value;

/// Each benchmark and the rows it must produce.
const EXPECTED: [(&str, usize); 11] = [
    ("sync", 9),
    // Replaced below by 2 per core count the machine allows (1, 2).
    ("cores", 0),
    ("latency", 6),
    ("verifier", 10),
    ("grpc", 7),
    ("discovery", 3),
    ("memory", 4),
    ("scaling", 6),
    ("load", 2),
    ("adversarial", 17),
    ("attack", 6),
];

/// Figures that may be zero or below: a difference of two measurements,
/// a count of what an attack or a link met, which may be nothing in a short
/// run, or a setting that is zero in one row (the round trip of a link).
const DIFFERENCES: [&str; 7] = [
    "peak RSS growth (MiB)",
    "growth of fetch budget",
    "refused",
    "cut",
    "connection resets",
    "worker restarts",
    "round trip (ms)",
];

#[test]
fn quick_run_produces_every_figure() {
    let dir = tempfile::tempdir().unwrap();
    let markdown = dir.path().join("benchmarks.md");
    let json = dir.path().join("benchmarks.json");
    let output = Command::new(env!("CARGO_BIN_EXE_soma-bench"))
        .arg("--quick")
        .arg("--markdown")
        .arg(&markdown)
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "soma-bench --quick failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );

    let report: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(report["mode"], "quick");
    assert!(report["machine"]["cores"].as_u64().unwrap() >= 1);
    assert!(!report["machine"]["cpu"].as_str().unwrap().is_empty());
    assert!(!report["machine"]["commit"].as_str().unwrap().is_empty());
    let sections = report["sections"].as_object().unwrap();
    assert_eq!(sections.len(), EXPECTED.len(), "{:?}", sections.keys());
    let text = std::fs::read_to_string(&markdown).unwrap();
    for (key, rows) in EXPECTED {
        let section = &sections[key];
        let title = section["title"].as_str().unwrap();
        assert!(text.contains(title), "{key}'s table is in the Markdown");
        assert!(stdout.contains(title), "{key}'s table is printed");
        let got = section["rows"].as_array().unwrap();
        let rows = match key {
            "cores" => 2 * report["machine"]["cores"].as_u64().unwrap().min(2) as usize,
            _ => rows,
        };
        assert_eq!(got.len(), rows, "{key} rows: {got:?}");
        for row in got {
            let values = row["values"].as_object().unwrap();
            let numbers: Vec<f64> = values
                .iter()
                .filter(|(name, _)| !DIFFERENCES.contains(&name.as_str()))
                .filter_map(|(_, v)| v.as_f64())
                .collect();
            assert!(!numbers.is_empty(), "{key} row has figures: {row}");
            for n in numbers {
                assert!(n.is_finite() && n > 0.0, "{key} figure {n} in {row}");
            }
        }
    }
    // Each measured figure sits beside its reference: the ratio columns.
    let ratio = |key: &str, row: usize, column: &str| {
        sections[key]["rows"][row]["values"][column]
            .as_f64()
            .unwrap_or_else(|| panic!("{key} row {row} has `{column}`"))
    };
    // A ratio is its row's figure against the reference row's (row 0),
    // recomputed here from the figures: the row's over the reference's
    // when `over`, else the other way round (a time against the
    // reference's time, where the ratio says how fast).
    let consistent = |key: &str, row: usize, column: &str, figure: &str, over: bool| {
        let (got, reference) = (ratio(key, row, figure), ratio(key, 0, figure));
        let want = if over {
            got / reference
        } else {
            reference / got
        };
        let have = ratio(key, row, column);
        assert!(
            (have - want).abs() <= 0.01 * want,
            "{key} row {row}: `{column}` {have}, but its `{figure}` against row 0's gives {want}"
        );
    };
    consistent("sync", 1, "of crypto limit", "signatures/s", true);
    assert!(ratio("sync", 3, "of crypto limit") > 0.0);
    assert!(ratio("sync", 4, "of transport limit") > 0.0);
    // The chain of large blocks: its own limits, then its catch-ups.
    assert!(ratio("sync", 7, "of crypto limit") > 0.0);
    assert!(ratio("sync", 8, "of transport limit") > 0.0);
    for row in 1..=5 {
        consistent("latency", row, "of loopback", "time (s)", false);
    }
    for row in 1..=6 {
        consistent("verifier", row, "of raw", "time (ms)", false);
    }
    assert!(ratio("grpc", 1, "of plain") > 0.0);
    for row in [2, 4, 5, 6] {
        assert!(ratio("grpc", row, "of plain") > 0.0);
    }
    assert!(ratio("cores", 0, "CPU ms per 1,000 commits") > 0.0);
    let notes = sections["cores"]["notes"].to_string();
    assert!(
        notes.contains("Projected ceiling with signatures off"),
        "{notes}"
    );
    assert!(ratio("memory", 1, "of the short chain's peak") > 0.0);
    assert!(ratio("scaling", 5, "of crypto limit") > 0.0);
    assert!(ratio("load", 1, "of idle") > 0.0);
    assert!(ratio("load", 1, "calls served") > 0.0);
    for row in 1..=14 {
        let time = "catch-up (s), median";
        consistent("adversarial", row, "of honest-only", time, true);
        let fate = sections["adversarial"]["rows"][row]["values"]["hostile peer, per run"]
            .as_str()
            .unwrap();
        assert!(fate.ends_with("1/1"), "one verdict per run: {fate}");
    }
    assert!(ratio("adversarial", 16, "peak RSS (MiB), median") > 0.0);
    for row in 1..=5 {
        consistent("attack", row, "of unattacked", "catch-up (s)", false);
        assert!(ratio("attack", row, "attack calls / connections") > 0.0);
    }
    let notes = sections["attack"]["notes"].to_string();
    assert!(notes.contains("30 honest peers connected"), "{notes}");
    assert!(
        stdout.contains("An honest peer was served after the storm."),
        "{stdout}"
    );
}

#[test]
fn an_unknown_benchmark_is_refused_with_the_choices() {
    let output = Command::new(env!("CARGO_BIN_EXE_soma-bench"))
        .args(["--only", "sync,warp"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("`warp`"), "{stderr}");
    assert!(
        stderr.contains("sync, cores, latency, verifier"),
        "{stderr}"
    );
}

#[test]
fn catch_ups_print_each_run_then_their_median() {
    let output = Command::new(env!("CARGO_BIN_EXE_soma-bench"))
        .args(["catch-ups", "--times", "3", "--commits", "40"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 4, "{stdout}");
    for (i, line) in lines[..3].iter().enumerate() {
        assert!(
            line.starts_with(&format!("catch-up {i}: "))
                && line.ends_with(" 0 worker restarts, 0 fetches dropped unread at the validators"),
            "{line}"
        );
    }
    assert!(lines[3].starts_with("median of 3: "), "{stdout}");
}
