//! `soma-sim`'s command line: mistakes are refused before anything runs,
//! with what to do instead.

use std::process::Command;

fn sim(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_soma-sim"))
        .args(args)
        .output()
        .expect("soma-sim runs")
}

#[test]
fn an_unknown_section_is_refused_with_the_choices() {
    let output = sim(&["--only", "churn,warp"]);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("'warp'"), "{stderr}");
    assert!(
        stderr.contains(
            "convergence, inbound, churn, partition, eclipse, joining, heights, sync, bench, hour"
        ),
        "{stderr}"
    );
}

#[test]
fn a_report_with_nowhere_to_go_is_refused_before_the_run() {
    let dir = std::env::temp_dir().join(format!("soma-sim-cli-{}", std::process::id()));
    let out = dir.join("missing").join("simulation.md");
    // The long run at its default size would take minutes: refused at once.
    let output = sim(&["--only", "hour", "--out", out.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!(
            "{} is not a directory; pass --out",
            out.parent().unwrap().display()
        )),
        "{stderr}"
    );
    assert!(!out.exists());
}
