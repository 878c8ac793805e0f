//! The `soma-p2p` binary as an operator runs it: help, configuration
//! errors, keys, the local network demo, a node stopped by SIGTERM, and
//! trace replay. Each test runs the built binary as a child process; every
//! child is killed when its test ends, even on failure, and every file goes
//! into a temporary directory removed at the end.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use soma_store::{ConsensusStore, RedbStore};
use soma_types::{ChainId, genesis_commit};

mod common;
use common::*;

/// Checks `output` is a usage failure: exit code 2 and a stderr of one
/// line, `error: …`, containing each of `needles`.
fn assert_usage_error(output: &Output, needles: &[&str]) {
    let err = stderr(output);
    assert_eq!(output.status.code(), Some(2), "stderr: {err}");
    let line = err.strip_suffix('\n').unwrap_or(&err);
    assert!(!line.contains('\n'), "one line expected, got:\n{err}");
    assert!(line.starts_with("error: "), "{line}");
    for needle in needles {
        assert!(line.contains(needle), "`{needle}` missing from: {line}");
    }
}

/// Runs `soma-p2p run` on a configuration file holding `text`.
fn run_with_config(text: &str) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.toml");
    fs::write(&path, text).unwrap();
    soma(&["run", "--config", path.to_str().unwrap()])
}

#[test]
fn help_is_given_for_every_subcommand() {
    let subcommands: &[(&str, &[&str])] = &[
        ("keygen", &["--out", "--force"]),
        (
            "genesis",
            &[
                "--validators",
                "--validator",
                "--stake",
                "--address",
                "--out",
                "--base-port",
                "--commits-per-epoch",
                "--force",
            ],
        ),
        ("run", &["--config", "--commit-rate"]),
        (
            "localnet",
            &[
                "--nodes",
                "--commits",
                "--dir",
                "--commit-rate",
                "--commits-per-epoch",
                "--transactions-per-block",
                "--timeout",
            ],
        ),
        ("status", &["--addr"]),
        ("replay", &["<FILE>"]),
        ("config", &["--default"]),
    ];

    let output = soma(&["--help"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let help = stdout(&output);
    for flag in ["--log-format", "--help", "--version"] {
        assert!(help.contains(flag), "`{flag}` missing from:\n{help}");
    }
    // The command list names exactly the subcommands checked here.
    let listed: Vec<&str> = help
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| *name != "help")
        .collect();
    let expected: Vec<&str> = subcommands.iter().map(|(name, _)| *name).collect();
    assert_eq!(listed, expected, "{help}");

    for (name, flags) in subcommands {
        let output = soma(&[name, "--help"]);
        assert!(output.status.success(), "{name}: {}", stderr(&output));
        let help = stdout(&output);
        for flag in flags.iter().chain(&["--log-format", "--help"]) {
            assert!(
                help.contains(flag),
                "`{flag}` missing from `{name} --help`:\n{help}"
            );
        }
    }
}

#[test]
fn an_unknown_config_key_is_named_in_a_one_line_error() {
    let text = set_line(
        &default_config(),
        "parallel-fetches",
        "parallel-fetchez = 8",
    );
    assert_usage_error(&run_with_config(&text), &["parallel-fetchez"]);
}

#[test]
fn an_out_of_range_config_value_is_named_with_its_range() {
    let text = set_line(
        &default_config(),
        "parallel-fetches",
        "parallel-fetches = 0",
    );
    assert_usage_error(
        &run_with_config(&text),
        &["p2p.parallel-fetches", "between 1 and 256", "got 0"],
    );
}

#[test]
fn a_config_value_of_the_wrong_type_is_refused_in_one_line() {
    let text = set_line(&default_config(), "timeout", "timeout = \"soon\"");
    assert_usage_error(&run_with_config(&text), &["\"soon\"", "duration"]);
}

#[test]
fn a_missing_config_file_is_named_in_a_one_line_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("absent.toml");
    let output = soma(&["run", "--config", path.to_str().unwrap()]);
    assert_usage_error(&output, &["absent.toml"]);
}

#[test]
fn keygen_refuses_to_overwrite_keys_without_force() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    let out = keys.to_str().unwrap();
    let secrets = ["network.key", "protocol.key", "tls.key"];
    let read_all = || {
        ["network.key", "protocol.key", "tls.key", "tls.crt"]
            .map(|name| fs::read(keys.join(name)).expect("key file written"))
    };
    // Secrets readable by the owner alone, the rest by all, and nothing
    // else left in the directory (each file is written through a
    // temporary one renamed into place).
    let assert_private = || {
        for name in secrets {
            let mode = fs::metadata(keys.join(name)).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{name} has mode {mode:o}");
        }
        for name in ["tls.crt", "public.toml"] {
            let mode = fs::metadata(keys.join(name)).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o644, "{name} has mode {mode:o}");
        }
        let mut names: Vec<String> = fs::read_dir(&keys)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        let expected = [
            "network.key",
            "protocol.key",
            "public.toml",
            "tls.crt",
            "tls.key",
        ];
        assert_eq!(names, expected);
    };

    let output = soma(&["keygen", "--out", out]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_private();
    let first = read_all();

    let output = soma(&["keygen", "--out", out]);
    assert_usage_error(&output, &["--force"]);
    assert_eq!(read_all(), first, "keys changed without --force");

    let output = soma(&["keygen", "--out", out, "--force"]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_private();
    assert_ne!(read_all()[0], first[0], "network.key not replaced");
}

/// The value after `label` on the first line of `text` that starts with it
/// (after indentation), as `status` and the localnet summary print them.
fn summary_value<'a>(summary: &'a str, label: &str) -> &'a str {
    field(summary, label).unwrap_or_else(|| panic!("no `{label}` line in:\n{summary}"))
}

#[test]
fn localnet_syncs_a_fresh_node_and_reports_status_and_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let net = dir.path().join("net");
    let out_path = dir.path().join("stdout");
    let err_path = dir.path().join("stderr");
    // Bounded by its own --timeout: at most that long for production and
    // for sync each, then a few seconds to stop the validators.
    let mut localnet = Spawned::spawn(
        Command::new(BIN)
            .args(["localnet", "--nodes", "4", "--commits", "300"])
            .args(["--commit-rate", "500", "--timeout", "120", "--dir"])
            .arg(&net)
            .stdout(fs::File::create(&out_path).unwrap())
            .stderr(fs::File::create(&err_path).unwrap()),
    );
    let status = localnet.child.wait().unwrap();
    let summary = fs::read_to_string(&out_path).unwrap();
    let log = |name: &str| fs::read_to_string(net.join(name).join("node.log")).unwrap_or_default();
    assert!(
        status.success(),
        "{status}\nstdout:\n{summary}\nstderr:\n{}\njoiner log:\n{}",
        fs::read_to_string(&err_path).unwrap_or_default(),
        log("joiner"),
    );

    let synced: u64 = summary_value(&summary, "commits synced")
        .parse()
        .expect("a count");
    assert_eq!(synced, 300, "{summary}");

    let heights = summary_value(&summary, "heights (status)");
    let (fresh, validators) = heights
        .strip_prefix("fresh node ")
        .and_then(|h| h.split_once(", validators "))
        .unwrap_or_else(|| panic!("unexpected heights line: {heights}"));
    let fresh: u64 = fresh.parse().expect("a height");
    let validators: u64 = validators.parse().expect("a height");
    assert_eq!(fresh, validators, "{summary}");
    assert_eq!(fresh, 300, "the validators stop at 300: {summary}");

    let metric: f64 = summary_value(&summary, "commits (metrics)")
        .parse()
        .expect("a number");
    assert_eq!(metric, 300.0, "each commit counted once: {summary}");

    // The fresh node, seeded with one validator by address, found them all.
    let discovered: f64 = summary_value(&summary, "peers discovered")
        .parse()
        .expect("a number");
    assert_eq!(discovered, 4.0, "{summary}");
}

/// SIGTERM to `localnet` stops its nodes as Ctrl-C does: each logs its
/// stop, and the command fails naming the signal. Before, the signal
/// ended `localnet` at once and left its nodes running, producing on
/// their ports.
#[test]
fn localnet_stopped_by_sigterm_stops_its_nodes() {
    localnet_stopped_by(Signal::SIGTERM, false, "terminated");
}

/// Ctrl-C at the terminal (SIGINT to the whole foreground group) stops
/// `localnet`'s nodes cleanly: they are in groups of their own, so each
/// gets one signal, `localnet`'s. In its group, each took the terminal's
/// SIGINT and then `localnet`'s SIGTERM as a second signal, and exited
/// without stopping.
#[test]
fn localnet_interrupted_at_its_terminal_stops_its_nodes() {
    localnet_stopped_by(Signal::SIGINT, true, "interrupted");
}

/// Starts a `localnet` of two validators, sends `signal` to it (to its
/// whole process group if `group`) once both have started, and checks
/// that it fails saying `said` and that each node logged its stop.
fn localnet_stopped_by(signal: Signal, group: bool, said: &str) {
    const PATIENCE: Duration = Duration::from_secs(90);
    let dir = tempfile::tempdir().unwrap();
    let net = dir.path().join("net");
    let err_path = dir.path().join("stderr");
    let mut localnet = Spawned::spawn(
        Command::new(BIN)
            .args(["localnet", "--nodes", "2", "--commits", "1000000"])
            .args(["--commit-rate", "10", "--timeout", "120", "--dir"])
            .arg(&net)
            .stdout(Stdio::null())
            .stderr(fs::File::create(&err_path).unwrap()),
    );
    // Whatever happens, no node outlives the test.
    struct Reaper(PathBuf);
    impl Drop for Reaper {
        fn drop(&mut self) {
            kill_processes_naming(&self.0);
        }
    }
    let _reaper = Reaper(net.clone());
    let log = |i: usize| fs::read_to_string(net.join(format!("validator-{i}/node.log")));
    wait_for("both validators started", PATIENCE, || {
        (0..2).all(|i| log(i).is_ok_and(|l| l.contains("p2p node started")))
    });
    if group {
        nix::sys::signal::killpg(localnet.pid(), signal).unwrap();
    } else {
        kill(localnet.pid(), signal).unwrap();
    }
    let status = localnet.wait_for(PATIENCE).expect("localnet exits");
    let stderr = fs::read_to_string(&err_path).unwrap();
    assert!(
        !status.success() && stderr.contains(said),
        "{status}: {stderr}"
    );
    for i in 0..2 {
        let log = log(i).unwrap();
        assert!(log.contains("p2p node stopped"), "validator-{i}:\n{log}");
    }
}

/// SIGKILLs every process whose command line names `path`.
fn kill_processes_naming(path: &std::path::Path) {
    let path = path.to_string_lossy().into_owned();
    for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmdline = fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(&path) {
            let _ = kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

#[test]
fn sigterm_stops_a_node_cleanly_and_its_store_reopens_consistent() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let address = format!("127.0.0.1:{port}");
    let output = soma(&[
        "genesis",
        "--validators",
        "1",
        "--out",
        dir.path().to_str().unwrap(),
        "--base-port",
        &port.to_string(),
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let chain_id = field(&stdout(&output), "chain id")
        .expect("genesis prints the chain id")
        .to_string();

    // Relative paths are relative to the configuration file's directory.
    let mut config = default_config();
    config = set_line(&config, "data-dir", "data-dir = \"validator-0/data\"");
    config = set_line(&config, "keys-dir", "keys-dir = \"validator-0/keys\"");
    config = set_line(&config, "genesis", "genesis = \"genesis.toml\"");
    config = set_line(
        &config,
        "listen-address",
        &format!("listen-address = \"{address}\""),
    );
    // A table: it must come before `[p2p]`, or its keys would land there.
    assert_eq!(config.matches("\n[p2p]\n").count(), 1, "{config}");
    config = config.replace("\n[p2p]\n", "\n[producer]\ncommit-rate = 200.0\n\n[p2p]\n");
    let config_path = dir.path().join("node.toml");
    fs::write(&config_path, config).unwrap();

    let log_path = dir.path().join("node.log");
    let mut node = Spawned::spawn(
        Command::new(BIN)
            .arg("run")
            .arg("--config")
            .arg(&config_path)
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log_path).unwrap()),
    );
    let log = || fs::read_to_string(&log_path).unwrap_or_default();

    // Wait for the node to serve and produce at least 50 commits.
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        let output = soma(&["status", "--addr", &address]);
        let text = stdout(&output);
        let highest = field(&text, "highest").and_then(|h| h.parse::<u64>().ok());
        if output.status.success() && highest.is_some_and(|h| h >= 50) {
            break text;
        }
        if let Some(exit) = node.child.try_wait().unwrap() {
            panic!("the node exited early: {exit}\n{}", log());
        }
        assert!(
            Instant::now() < deadline,
            "no 50 commits in 60 s; last status:\n{text}{}\nlog:\n{}",
            stderr(&output),
            log()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(field(&status, "chain id"), Some(&*chain_id), "{status}");
    assert_eq!(field(&status, "health"), Some("serving"), "{status}");

    kill(node.pid(), Signal::SIGTERM).unwrap();
    node.stopped_cleanly(&log_path);

    // The store reopens, and every commit up to the watermark is there with
    // its blocks, each linked to the one before.
    let committee = genesis_committee(&dir.path().join("genesis.toml"));
    assert_eq!(hex::encode(ChainId::from_genesis(&committee).0.0), chain_id);
    let data: PathBuf = dir.path().join("validator-0/data/chain.redb");
    let store = RedbStore::open(&data, &committee).expect("the store reopens");
    let watermark = store.highest_synced_commit().unwrap();
    assert!(watermark.index >= 50, "watermark {watermark}");
    assert_eq!(store.lowest_available_commit().unwrap(), 1);
    let top = store
        .commit(watermark.index)
        .unwrap()
        .expect("watermark commit");
    assert_eq!(top.reference(), watermark);
    let mut previous = genesis_commit(&committee);
    for index in 1..=watermark.index {
        let commit = store
            .commit(index)
            .unwrap()
            .unwrap_or_else(|| panic!("commit {index} missing below watermark {watermark}"));
        assert_eq!(commit.index(), index);
        assert_eq!(
            commit.commit().previous_digest,
            previous.reference().digest,
            "commit {index} does not link to commit {}",
            index - 1
        );
        let blocks = store.blocks(&commit.commit().blocks).unwrap();
        assert!(!blocks.is_empty(), "commit {index} names no block");
        for (block, reference) in blocks.iter().zip(&commit.commit().blocks) {
            assert!(
                block.is_some(),
                "commit {index}: block {reference:?} missing"
            );
        }
        previous = commit;
    }
}

#[test]
fn replay_command_reports_the_first_difference() {
    let trace = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/replays/peer_heights_ban_expires.jsonl"
    );
    let output = soma(&["replay", trace]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(
        stdout(&output).contains("replayed exactly"),
        "{}",
        stdout(&output)
    );

    let text = fs::read_to_string(trace).unwrap();
    let (recorded, altered) = ("\"highest_known\":500", "\"highest_known\":499");
    assert_eq!(text.matches(recorded).count(), 1, "one output to alter");
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("altered.jsonl");
    fs::write(&copy, text.replace(recorded, altered)).unwrap();
    let output = soma(&["replay", copy.to_str().unwrap()]);
    let err = stderr(&output);
    assert_eq!(output.status.code(), Some(1), "stderr: {err}");
    assert!(err.contains("line 13"), "{err}");

    // Rewritten on purpose: the file holds the outputs the core produces
    // now (the recorded trace again), written beside it and renamed over
    // it, nothing left beside it.
    let output = std::process::Command::new(BIN)
        .args(["replay", copy.to_str().unwrap()])
        .env("SOMA_REPLAY_REWRITE", "1")
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(fs::read_to_string(&copy).unwrap(), text);
    let left: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(left.len(), 1, "{left:?}");
}

/// What localnet and genesis would only find out late, or after writing
/// files, is refused first, naming the fix: a `--timeout` past a day (it
/// panicked adding it to the clock, after the validators started), a
/// `--dir` holding an earlier run (its keys and producer secret were
/// overwritten, and its stores refused the new genesis until the timeout),
/// a commit rate the children refuse, and a genesis whose ports run past
/// 65535 (it wrote every validator's keys first, so the corrected run was
/// refused for keys already there).
#[test]
fn localnet_and_genesis_refuse_bad_input_before_starting_or_writing_anything() {
    let output = soma(&["localnet", "--timeout", "18446744073709551615"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("not in 1..=86400"),
        "{}",
        stderr(&output)
    );
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("genesis.toml"), "an earlier run's").unwrap();
    let used = dir.path().to_str().unwrap();
    let output = soma(&["localnet", "--dir", used]);
    assert_usage_error(&output, &["is not empty", "--dir"]);
    assert_eq!(
        fs::read_to_string(dir.path().join("genesis.toml")).unwrap(),
        "an earlier run's"
    );
    let output = soma(&["localnet", "--commit-rate", "0"]);
    assert_usage_error(&output, &["--commit-rate", "between 0.1 and 10000"]);

    let out = tempfile::tempdir().unwrap();
    let path = out.path().to_str().unwrap();
    let args = [
        "genesis",
        "--validators",
        "4",
        "--base-port",
        "65534",
        "--out",
        path,
    ];
    assert_usage_error(&soma(&args), &["--base-port 65534", "65535"]);
    // Validator 2 would be at MySQL's port, which `run` refuses.
    let args = ["genesis", "--validators", "4", "--base-port", "3304"];
    let output = soma(&[&args[..], &["--out", path]].concat());
    assert_usage_error(&output, &["127.0.0.1:3306", "another service's port"]);
    assert_eq!(
        fs::read_dir(out.path()).unwrap().count(),
        0,
        "nothing written"
    );
    // A validator at every address of its host, which peers cannot dial.
    let keys = tempfile::tempdir().unwrap();
    let keys_dir = keys.path().join("keys");
    let made = soma(&["keygen", "--out", keys_dir.to_str().unwrap()]);
    assert!(made.status.success(), "{}", stderr(&made));
    let public = keys_dir.join("public.toml");
    let mut args = ["genesis", "--validator", public.to_str().unwrap()].to_vec();
    args.extend(["--stake", "1", "--address", "0.0.0.0:7000", "--out", path]);
    let output = soma(&args);
    assert_usage_error(&output, &["validator 1 (0.0.0.0:7000)", "every address"]);
    assert_eq!(fs::read_dir(out.path()).unwrap().count(), 0);
    let args = [
        "genesis",
        "--validators",
        "4",
        "--base-port",
        "65530",
        "--out",
        path,
    ];
    let output = soma(&args);
    assert!(output.status.success(), "{}", stderr(&output));
}

/// A node whose log reader went away (a `| tee` or a log shipper that
/// exited, leaving stderr a closed pipe) runs on, and a SIGTERM still
/// stops it cleanly: a log line it cannot write is dropped. Before, the
/// logger reported the failed write with `eprintln!`, which panicked in
/// every thread that logged, and the node exited 101 from its stop.
#[test]
fn a_node_whose_log_reader_went_away_runs_on_and_stops_cleanly() {
    const PATIENCE: Duration = Duration::from_secs(60);
    let dir = tempfile::tempdir().unwrap();
    let base = free_ports(1);
    local_genesis(dir.path(), 1, base, 1_000);
    let (addresses, configs, _) = validator_network(dir.path(), base, 1);
    let mut node = Spawned::spawn(
        Command::new(BIN)
            .arg("run")
            .arg("--config")
            .arg(&configs[0])
            .stdout(Stdio::null())
            .stderr(Stdio::piped()),
    );
    let log = node.child.stderr.take().expect("a piped stderr");
    // The log is read until the node says it runs; then its reader goes.
    let (said, running) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        let mut lines = std::io::BufReader::new(log).lines();
        let seen = lines.any(|l| l.is_ok_and(|l| l.contains("node running")));
        let _ = said.send(seen);
    });
    assert_eq!(
        running.recv_timeout(PATIENCE),
        Ok(true),
        "the node said it runs"
    );
    wait_for("the node to answer with its log closed", PATIENCE, || {
        height(&addresses[0]).is_some()
    });
    // Stopping logs; those lines go nowhere.
    kill(node.pid(), Signal::SIGTERM).unwrap();
    let exit = node
        .wait_for(Duration::from_secs(20))
        .expect("the node stops within 20 s");
    assert!(exit.success(), "{exit}");
}

/// A hang-up (the terminal the node was started from closed) stops the
/// node cleanly, as SIGTERM does: left to its default, it killed the node
/// mid-write, and the next start repaired the store.
#[test]
fn a_hangup_stops_the_node_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let base = free_ports(1);
    local_genesis(dir.path(), 1, base, 1_000);
    let (addresses, configs, logs) = validator_network(dir.path(), base, 1);
    let mut node = run_node(&configs[0], &logs[0]);
    wait_for("the node to answer", Duration::from_secs(60), || {
        height(&addresses[0]).is_some()
    });
    kill(node.pid(), Signal::SIGHUP).unwrap();
    let log = node.stopped_cleanly(&logs[0]);
    assert!(log.contains("hung up"), "{log}");
}

/// `status` that cannot get an answer says why, with what to check: no
/// node at the port, or a private node that serves only its allowlist
/// (before, both said little more than "transport error").
#[test]
fn status_says_why_a_node_does_not_answer() {
    // A port just let go of: nothing listens there.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .to_string();
    let output = soma(&["status", "--addr", &closed]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let err = stderr(&output);
    assert!(
        err.contains("Connection refused") && err.contains("nothing listens there"),
        "{err}"
    );

    let dir = tempfile::tempdir().unwrap();
    let base = free_ports(1);
    local_genesis(dir.path(), 1, base, 1_000);
    let (addresses, configs, logs) =
        validator_network_with(dir.path(), base, 1, |_| vec!["access = \"private\"".into()]);
    let _node = run_node(&configs[0], &logs[0]);
    let log = || fs::read_to_string(&logs[0]).unwrap_or_default();
    wait_or_report(
        "the node to run",
        Duration::from_secs(60),
        || log().contains("node running"),
        log,
    );
    let output = soma(&["status", "--addr", &addresses[0]]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let err = stderr(&output);
    assert!(
        err.contains("transport error") && err.contains("private node"),
        "{err}"
    );
}

/// A node started under `nohup` (SIGHUP ignored) runs on after a hang-up,
/// as it did before the node handled SIGHUP: a handler installed over the
/// inherited "ignore" would stop it at logout.
#[test]
fn a_node_started_under_nohup_runs_on_after_a_hangup() {
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let base = free_ports(1);
    local_genesis(dir.path(), 1, base, 1_000);
    let (addresses, configs, logs) = validator_network(dir.path(), base, 1);
    let log_file = fs::File::create(&logs[0]).unwrap();
    let mut command = Command::new(BIN);
    command
        .arg("run")
        .arg("--config")
        .arg(&configs[0])
        .stdout(Stdio::null())
        .stderr(log_file);
    // SAFETY: sets a signal disposition between fork and exec, which is
    // async-signal-safe.
    unsafe {
        command.pre_exec(|| {
            use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, sigaction};
            let ignore = SigAction::new(SigHandler::SigIgn, SaFlags::empty(), SigSet::empty());
            sigaction(Signal::SIGHUP, &ignore)
                .map(|_| ())
                .map_err(std::io::Error::from)
        });
    }
    let mut node = Spawned::spawn(&mut command);
    wait_for("the node to answer", Duration::from_secs(60), || {
        height(&addresses[0]).is_some()
    });
    // Ignored, not caught: a hang-up is discarded by the kernel.
    let status = fs::read_to_string(format!("/proc/{}/status", node.pid())).unwrap();
    let mask = |field: &str| {
        let line = status.lines().find(|l| l.starts_with(field)).unwrap();
        u64::from_str_radix(line[field.len()..].trim(), 16).unwrap()
    };
    assert_eq!(mask("SigIgn:") & 1, 1, "SIGHUP ignored\n{status}");
    assert_eq!(mask("SigCgt:") & 1, 0, "SIGHUP not caught\n{status}");
    kill(node.pid(), Signal::SIGHUP).unwrap();
    kill(node.pid(), Signal::SIGTERM).unwrap();
    let log = node.stopped_cleanly(&logs[0]);
    assert!(log.contains("terminated"), "{log}");
    assert!(!log.contains("hung up"), "{log}");
}

/// Two nodes run with one key (validator-0's, copied to a second host):
/// peers pass each one's info on to the other, and the node that sees its
/// own identity at addresses not its own warns, naming them. The third
/// node, a seed to both, holds one entry for the two. At start, each says
/// what it is in the genesis: the copy, listening elsewhere than
/// validator-0's entry names, is warned of that.
#[test]
fn a_node_whose_keys_run_elsewhere_too_warns_naming_the_other_address() {
    const WARNING: &str = "another node runs with this node's network key";
    let dir = tempfile::tempdir().unwrap();
    let base = free_ports(3);
    local_genesis(dir.path(), 2, base, 1_000);
    let (addresses, configs, logs) = validator_network(dir.path(), base, 2);
    let twin_address = format!("127.0.0.1:{}", base + 2);
    let twin = node_config(
        dir.path(),
        "twin",
        base + 2,
        &addresses[1..],
        &["keys-dir = \"validator-0/keys\""],
    );
    let twin_log = dir.path().join("twin.log");
    let _nodes = [
        run_node(&configs[0], &logs[0]),
        run_node(&configs[1], &logs[1]),
        run_node(&twin, &twin_log),
    ];
    let warned = |log: &PathBuf| {
        let text = fs::read_to_string(log).unwrap_or_default();
        (text.lines())
            .find(|l| l.contains(WARNING))
            .map(str::to_owned)
    };
    wait_or_report(
        "a warning of the key used twice",
        Duration::from_secs(60),
        || warned(&logs[0]).is_some() || warned(&twin_log).is_some(),
        || fs::read_to_string(&twin_log).unwrap_or_default(),
    );
    // Each names the other's address, never its own.
    if let Some(line) = warned(&logs[0]) {
        assert!(line.contains(&twin_address), "{line}");
    }
    if let Some(line) = warned(&twin_log) {
        assert!(line.contains(&addresses[0]), "{line}");
    }
    assert_eq!(warned(&logs[1]), None, "validator-1's keys are its own");
    // Each says at start what it is in the genesis; the twin, not at the
    // address validator-0's entry names, is told so.
    let log = |path: &PathBuf| fs::read_to_string(path).unwrap();
    let elsewhere = format!(
        "the genesis names validator #0 at {}, but the node advertises {twin_address}",
        addresses[0]
    );
    wait_or_report(
        "the twin to say it is not at its genesis address",
        Duration::from_secs(20),
        || log(&twin_log).contains(&elsewhere),
        || log(&twin_log),
    );
    let role = "validator #0 of the genesis committee, at";
    wait_or_report(
        "validator-0 to say what it is",
        Duration::from_secs(20),
        || log(&logs[0]).contains(role),
        || log(&logs[0]),
    );
    assert!(!log(&logs[0]).contains("the genesis names"));
}

/// `keygen --tls-only` makes a new TLS pair for the network key already
/// there: the peer id it prints is the node's, and the other keys stay
/// as they were; with `--force` too it is refused as a usage error.
#[test]
fn keygen_tls_only_keeps_the_nodes_identity() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    let out = keys.to_str().unwrap();
    let first = soma(&["keygen", "--out", out]);
    assert!(first.status.success(), "{}", stderr(&first));
    let peer = field(&stdout(&first), "peer id").map(str::to_owned);
    assert!(peer.is_some(), "{}", stdout(&first));
    let others = ["network.key", "protocol.key", "public.toml"]
        .map(|name| fs::read(keys.join(name)).expect("key file written"));
    let old_cert = fs::read(keys.join("tls.crt")).unwrap();
    fs::remove_file(keys.join("tls.key")).unwrap();

    let again = soma(&["keygen", "--tls-only", "--out", out]);
    assert!(again.status.success(), "{}", stderr(&again));
    assert_eq!(field(&stdout(&again), "peer id").map(str::to_owned), peer);
    let now = ["network.key", "protocol.key", "public.toml"]
        .map(|name| fs::read(keys.join(name)).expect("key file kept"));
    assert_eq!(now, others);
    assert!(keys.join("tls.key").exists());
    assert_ne!(fs::read(keys.join("tls.crt")).unwrap(), old_cert);

    let both = soma(&["keygen", "--tls-only", "--force", "--out", out]);
    assert_eq!(both.status.code(), Some(2), "{}", stderr(&both));
}

/// Start errors an operator makes name the setting and the fix, as usage
/// errors (exit code 2): a `data-dir` that is a file, a `keys-dir` with no
/// keys, a missing genesis, and a store made for another genesis.
#[test]
fn start_errors_name_the_setting_and_the_fix() {
    // Logs may come first (the allocator's line); the error is the last.
    let assert_start_error = |output: &Output, needles: &[&str]| {
        let err = stderr(output);
        assert_eq!(output.status.code(), Some(2), "stderr: {err}");
        let last = err.lines().last().unwrap_or_default();
        assert!(last.starts_with("error: "), "{err}");
        for needle in needles {
            assert!(last.contains(needle), "`{needle}` missing from: {last}");
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = free_ports(1);
    local_genesis(d, 1, base, 1_000);
    let (_, configs, _) = validator_network(d, base, 1);
    let text = fs::read_to_string(&configs[0]).unwrap();
    let run = |name: &str, key: &str, line: &str| {
        let path = d.join(name);
        fs::write(&path, set_line(&text, key, line)).unwrap();
        soma(&["run", "--config", path.to_str().unwrap()])
    };

    fs::write(d.join("afile"), b"").unwrap();
    let output = run("file.toml", "data-dir", "data-dir = \"afile\"");
    assert_start_error(
        &output,
        &["data-dir", "afile", "point data-dir at a directory"],
    );

    let output = run("nokeys.toml", "keys-dir", "keys-dir = \"nokeys\"");
    assert_start_error(
        &output,
        &[
            "keys-dir is ",
            "nokeys: point it at",
            "soma-p2p keygen --out ",
        ],
    );

    let output = run("nogenesis.toml", "genesis", "genesis = \"none.toml\"");
    assert_start_error(&output, &["genesis: cannot read ", "none.toml"]);

    // A store made by a node of another network's genesis.
    let other = d.join("other");
    fs::create_dir(&other).unwrap();
    local_genesis(&other, 1, base + 100, 1_000);
    let (_, other_configs, _) = validator_network(&other, base + 100, 1);
    let other_text = fs::read_to_string(&other_configs[0]).unwrap();
    let other_data = other.join("validator-0/data");
    let made = set_line(
        &other_text,
        "data-dir",
        &format!("data-dir = \"{}\"", other_data.display()),
    );
    let made_path = other.join("made.toml");
    fs::write(&made_path, &made).unwrap();
    let mut maker = run_node(&made_path, &other.join("made.log"));
    wait_for("the other network's store", Duration::from_secs(30), || {
        other_data.join("chain.redb").exists()
    });
    kill(maker.pid(), Signal::SIGTERM).unwrap();
    assert!(
        maker
            .wait_for(Duration::from_secs(20))
            .is_some_and(|e| e.success())
    );
    let line = format!("data-dir = \"{}\"", other_data.display());
    let output = run("wrongchain.toml", "data-dir", &line);
    assert_start_error(
        &output,
        &["belongs to another chain", "point data-dir elsewhere"],
    );
}
