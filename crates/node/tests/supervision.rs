//! The supervision tree seen from outside a `soma-p2p run` process, with
//! faults injected through `SOMA_FAULTS` (test builds only): each
//! long-lived actor that panics once is restarted, counted in
//! `soma_actor_restarts_total{actor}`, and the node keeps producing and
//! serving; an actor that panics on every input stops the node, and `run`
//! exits non-zero naming it.

use std::fs;
use std::process::{Command, Stdio};
use std::time::Duration;

mod common;
use common::*;

/// The actors `health()` and the metrics name.
const ACTORS: [&str; 6] = [
    "state_sync",
    "peer_heights",
    "verifier",
    "connections",
    "discovery",
    "grpc_adapter",
];

/// A one-validator network producing `rate` commits a second with
/// `faults`, and `lines` set in its configuration; returns the process,
/// its gRPC address and its log's path.
fn producing_node(
    dir: &std::path::Path,
    faults: &str,
    lines: &[&str],
) -> (Spawned, String, std::path::PathBuf) {
    let port = free_port();
    // Epochs of 100 commits: the Verifier installs a committee each.
    local_genesis(dir, 1, port, 100);
    let config = node_config(dir, "validator-0", port, &[], lines);
    let log = dir.join("node.log");
    let node = Spawned::spawn(
        Command::new(BIN)
            .args(["run", "--commit-rate", "200", "--config"])
            .arg(&config)
            .env("SOMA_FAULTS", faults)
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap()),
    );
    (node, format!("127.0.0.1:{port}"), log)
}

#[test]
fn each_actor_panicking_once_is_restarted_counted_and_the_node_keeps_working() {
    let dir = tempfile::tempdir().unwrap();
    let metrics_address = format!("127.0.0.1:{}", free_port());
    // The third input of each actor panics (for the adapter, the third
    // call that reaches it: each `soma-p2p status` makes one).
    let faults: Vec<String> = ACTORS.iter().map(|a| format!("{a}=3")).collect();
    let metrics_line = format!("metrics-address = \"{metrics_address}\"");
    let (mut node, address, log) = producing_node(
        dir.path(),
        &faults.join(","),
        &[&metrics_line, "height-query-interval = \"50ms\""],
    );
    let restarts = |actor: &str| {
        metric(
            &metrics_address,
            &format!("soma_actor_restarts_total{{actor=\"{actor}\"}}"),
        )
    };
    wait_or_report(
        "every actor to be restarted once",
        Duration::from_secs(90),
        || {
            // A status call reaches the adapter.
            let _ = height(&address);
            ACTORS.iter().all(|a| restarts(a) == Some(1.0))
        },
        || {
            let counts: Vec<_> = ACTORS.iter().map(|a| (a, restarts(a))).collect();
            format!(
                "{counts:?}\n{}",
                fs::read_to_string(&log).unwrap_or_default()
            )
        },
    );
    assert_eq!(node.child.try_wait().unwrap(), None, "the node runs on");
    // Still producing and serving after all six restarts.
    let now = height(&address).expect("the node answers");
    wait_for("production to go on", Duration::from_secs(30), || {
        height(&address).is_some_and(|h| h > now + 20)
    });
    let status = stdout(&soma(&["status", "--addr", &address]));
    assert_eq!(field(&status, "health"), Some("serving"), "{status}");
    for actor in ACTORS {
        assert_eq!(restarts(actor), Some(1.0), "{actor}");
        let up = metric(
            &metrics_address,
            &format!("soma_actor_up{{actor=\"{actor}\"}}"),
        );
        assert_eq!(up, Some(1.0), "{actor}");
    }
}

#[test]
fn an_actor_failing_past_its_restarts_stops_run_with_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let (mut node, _, log) =
        producing_node(dir.path(), "state_sync=always", &["max-actor-restarts = 2"]);
    let exit = node
        .wait_for(Duration::from_secs(60))
        .expect("the node stops by itself");
    let log = fs::read_to_string(&log).unwrap();
    assert_eq!(exit.code(), Some(1), "{log}");
    let last = log.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("error: the state_sync actor failed 3 times within 60s"),
        "{log}"
    );
    assert!(last.contains("max-actor-restarts"), "{last}");
}
