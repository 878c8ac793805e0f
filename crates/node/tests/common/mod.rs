//! Helpers shared by the binary's integration tests: running `soma-p2p`,
//! child processes that never outlive their test, configuration edits.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::ops::RangeInclusive;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde::Deserialize;
use soma_chain::{Chain, ChainConfig};
use soma_store::{ConsensusStore, RedbStore};
use soma_types::{Authority, Committee, PeerId, PublicKey, Stake};

pub const BIN: &str = env!("CARGO_BIN_EXE_soma-p2p");

/// Runs `soma-p2p args` to completion.
pub fn soma(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("the binary runs")
}

pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A child process in its own process group, killed with the whole group
/// when dropped unless it has already been waited for: a failing test
/// leaves no node (nor a node's own children) running.
pub struct Spawned {
    pub child: Child,
}

impl Spawned {
    /// Starts `command`, first letting go of every port this test holds
    /// ([`free_port`]), so that the node it starts can listen on its own.
    pub fn spawn(command: &mut Command) -> Spawned {
        release_ports();
        let child = command
            .stdin(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("the binary starts");
        Spawned { child }
    }

    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    /// Panics with the log at `log` if the child has exited: a node that
    /// could not start (its port taken since it was found free, say) is
    /// named with its reason, not waited for until a deadline.
    pub fn assert_running(&mut self, log: &Path) {
        if let Some(status) = self.child.try_wait().expect("try_wait") {
            let log = fs::read_to_string(log).unwrap_or_default();
            panic!("{} exited ({status}):\n{log}", self.child.id());
        }
    }

    /// Waits at most 20 s for the child to exit, asserts that it exited
    /// cleanly (the log at `log` in the message otherwise), and returns
    /// that log.
    pub fn stopped_cleanly(&mut self, log: &Path) -> String {
        let exit = self.wait_for(Duration::from_secs(20));
        let text = fs::read_to_string(log).unwrap_or_default();
        let exit = exit.unwrap_or_else(|| panic!("the node did not stop within 20 s\n{text}"));
        assert!(exit.success(), "{exit}\n{text}");
        text
    }

    /// Waits for the child to exit, at most `limit`.
    pub fn wait_for(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        // Not yet reaped, so its pid (the group id) cannot have been reused.
        if let Ok(None) = self.child.try_wait() {
            let _ = killpg(self.pid(), Signal::SIGKILL);
            let _ = self.child.wait();
        }
    }
}

/// Ports on 127.0.0.1 this test found free, each held by a listener of
/// its own until the test next starts a process ([`Spawned::spawn`]). While
/// held, no other socket (another test's connection, given a port of the
/// same range, included) can take one: a test that fills a store or builds
/// a chain between choosing its nodes' ports and starting them cannot lose
/// a port in the meantime. What is left is the moment between letting go
/// and the node's own listen.
static HELD: Mutex<BTreeMap<u16, TcpListener>> = Mutex::new(BTreeMap::new());

fn held() -> std::sync::MutexGuard<'static, BTreeMap<u16, TcpListener>> {
    HELD.lock().unwrap_or_else(|e| e.into_inner())
}

/// Lets go of every port held.
fn release_ports() {
    held().clear();
}

/// Holds `port` again, once the node that listened on it has exited, until
/// the next start: a node restarted on it then finds it free. Whether it
/// could be held.
pub fn hold_port(port: u16) -> bool {
    match TcpListener::bind(("127.0.0.1", port)) {
        Ok(listener) => {
            held().insert(port, listener);
            true
        }
        Err(_) => false,
    }
}

/// A port free on 127.0.0.1, held until the test next starts a process.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("a free port");
    let port = listener.local_addr().expect("a bound address").port();
    held().insert(port, listener);
    port
}

/// The first of `n` consecutive ports free on 127.0.0.1, all held until
/// the test next starts a process.
pub fn free_ports(n: u16) -> u16 {
    loop {
        let first = TcpListener::bind("127.0.0.1:0").expect("a free port");
        let base = first.local_addr().expect("a bound address").port();
        if base.checked_add(n).is_none() {
            continue;
        }
        let rest: Option<Vec<TcpListener>> = (1..n)
            .map(|i| TcpListener::bind(("127.0.0.1", base + i)).ok())
            .collect();
        if let Some(rest) = rest {
            let mut held = held();
            held.insert(base, first);
            for (i, listener) in (1..n).zip(rest) {
                held.insert(base + i, listener);
            }
            return base;
        }
    }
}

/// The default configuration file, from `soma-p2p config --default`.
pub fn default_config() -> String {
    let output = soma(&["config", "--default"]);
    assert!(output.status.success(), "{}", stderr(&output));
    stdout(&output)
}

/// `text` with the one line setting `key` replaced by `line`.
pub fn set_line(text: &str, key: &str, line: &str) -> String {
    let prefix = format!("{key} = ");
    let matching = text.lines().filter(|l| l.starts_with(&prefix)).count();
    assert_eq!(matching, 1, "one `{key}` line in:\n{text}");
    text.lines()
        .map(|l| if l.starts_with(&prefix) { line } else { l })
        .map(|l| format!("{l}\n"))
        .collect()
}

/// The genesis file written by `soma-p2p genesis`: public material only.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct GenesisFile {
    commits_per_epoch: Option<u64>,
    #[serde(rename = "validator")]
    validators: Vec<GenesisValidator>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct GenesisValidator {
    network_key: String,
    protocol_key: String,
    stake: Stake,
    address: String,
}

/// The local network's producer secrets, beside its genesis.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct ProducerFile {
    seed: String,
    transactions_per_block: usize,
    payload_bytes: usize,
}

fn read_genesis(path: &Path) -> GenesisFile {
    toml::from_str(&fs::read_to_string(path).unwrap()).unwrap()
}

fn key32(text: &str) -> [u8; 32] {
    let mut bytes = [0u8; 32];
    hex::decode_to_slice(text, &mut bytes).unwrap();
    bytes
}

/// The chain a local network's producer builds: its genesis, with the
/// seed of `producer.toml` beside it.
pub fn chain_config(path: &Path) -> ChainConfig {
    let file = read_genesis(path);
    let producer: ProducerFile =
        toml::from_str(&fs::read_to_string(path.with_file_name("producer.toml")).unwrap()).unwrap();
    ChainConfig {
        seed: key32(&producer.seed),
        stakes: file.validators.iter().map(|v| v.stake).collect(),
        addresses: Some(file.validators.iter().map(|v| v.address.clone()).collect()),
        transactions_per_block: producer.transactions_per_block,
        payload_bytes: producer.payload_bytes,
        commits_per_epoch: file.commits_per_epoch,
        ..ChainConfig::default()
    }
}

/// Writes a local network of `validators` on ports from `base_port` into
/// `dir` with `soma-p2p genesis`; returns the genesis file's path.
pub fn local_genesis(
    dir: &Path,
    validators: u16,
    base_port: u16,
    commits_per_epoch: u64,
) -> PathBuf {
    let out = soma(&[
        "genesis",
        "--validators",
        &validators.to_string(),
        "--out",
        dir.to_str().expect("temporary paths are UTF-8"),
        "--base-port",
        &base_port.to_string(),
        "--commits-per-epoch",
        &commits_per_epoch.to_string(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    dir.join("genesis.toml")
}

/// The genesis committee a genesis file describes, read from its public
/// entries alone.
pub fn genesis_committee(path: &Path) -> Committee {
    let authorities = read_genesis(path)
        .validators
        .into_iter()
        .map(|v| Authority {
            stake: v.stake,
            protocol_key: PublicKey::from_bytes(&key32(&v.protocol_key)).unwrap(),
            network_key: PeerId(key32(&v.network_key)),
            address: v.address,
        })
        .collect();
    Committee::new(0, authorities).unwrap()
}

/// The value of a `label   value` line of `soma-p2p` output.
pub fn field<'a>(text: &'a str, label: &str) -> Option<&'a str> {
    text.lines().find_map(|l| {
        let rest = l.trim_start().strip_prefix(label)?;
        rest.starts_with(char::is_whitespace).then(|| rest.trim())
    })
}

/// `soma-p2p run --config config`, its logs appended to `log`.
pub fn run_node(config: &Path, log: &Path) -> Spawned {
    run_node_with(config, log, &[])
}

/// `soma-p2p run --config config` with `args` besides, its logs appended
/// to `log`.
pub fn run_node_with(config: &Path, log: &Path, args: &[&str]) -> Spawned {
    Spawned::spawn(
        Command::new(BIN)
            .arg("run")
            .args(args)
            .arg("--config")
            .arg(config)
            .stdout(Stdio::null())
            .stderr(
                fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(log)
                    .unwrap(),
            ),
    )
}

/// A local network of `n` validators in `dir` on ports from `base`, each
/// seeded with the others: their addresses, configuration files and log
/// paths (`validator-{i}`, as `soma-p2p genesis` names them).
pub fn validator_network(
    dir: &Path,
    base: u16,
    n: u16,
) -> (Vec<String>, Vec<PathBuf>, Vec<PathBuf>) {
    validator_network_with(dir, base, n, |_| Vec::new())
}

/// [`validator_network`], validator `i`'s file with the lines `lines(i)`.
pub fn validator_network_with(
    dir: &Path,
    base: u16,
    n: u16,
    lines: impl Fn(u16) -> Vec<String>,
) -> (Vec<String>, Vec<PathBuf>, Vec<PathBuf>) {
    let addresses: Vec<String> = (0..n).map(|i| format!("127.0.0.1:{}", base + i)).collect();
    let configs = (0..n)
        .map(|i| {
            let others: Vec<String> = addresses
                .iter()
                .filter(|a| **a != addresses[i as usize])
                .cloned()
                .collect();
            let lines = lines(i);
            let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
            node_config(dir, &format!("validator-{i}"), base + i, &others, &lines)
        })
        .collect();
    let logs = (0..n)
        .map(|i| dir.join(format!("validator-{i}.log")))
        .collect();
    (addresses, configs, logs)
}

/// The highest synced commit of the node at `address`, from
/// `soma-p2p status`; `None` if it does not answer.
pub fn height(address: &str) -> Option<u64> {
    let output = soma(&["status", "--addr", address]);
    field(&stdout(&output), "highest")?.parse().ok()
}

/// Commits per batch of a store [`hold`] writes, as a node syncs them.
pub const BATCH: u64 = 100;

/// Writes into the store at `path` the batches of `chain` that end in
/// `ends`, with the certificate at each batch end.
pub fn hold(path: &Path, committee: &Committee, chain: &Chain, ends: RangeInclusive<u64>) {
    fs::create_dir_all(path.parent().expect("a store file's directory")).unwrap();
    let store = RedbStore::open(path, committee).unwrap();
    for range in chain.batch_ranges(BATCH) {
        if ends.contains(range.end()) {
            store.write_synced_batch(chain.batch(range)).unwrap();
        }
    }
}

/// Opens the store at `path` and checks everything up to its watermark is
/// `chain`: the watermark is a commit of the chain, and every commit below
/// it is stored with all its blocks and links to the one before. Returns
/// the watermark.
pub fn check_store(path: &Path, committee: &Committee, chain: &Chain) -> u64 {
    let store = RedbStore::open(path, committee).expect("the store opens");
    let watermark = store.highest_synced_commit().unwrap();
    assert_eq!(
        watermark,
        chain.commit_ref(watermark.index),
        "the watermark is a commit of the chain"
    );
    for index in 1..=watermark.index {
        let commit = store.commit(index).unwrap().unwrap_or_else(|| {
            panic!("commit {index} missing below watermark {}", watermark.index)
        });
        assert_eq!(commit.reference(), chain.commit_ref(index));
        assert_eq!(
            commit.commit().previous_digest,
            chain.commit_ref(index - 1).digest
        );
        let blocks = store.blocks(&commit.commit().blocks).unwrap();
        assert!(
            blocks.iter().all(Option::is_some),
            "a block of commit {index} is missing below the watermark"
        );
    }
    soma_testkit::assert_certified(chain, &store, 1..=watermark.index);
    watermark.index
}

/// Writes `dir/<node>.toml`: the default configuration with the node's
/// directories, port and seeds, and `lines` replacing their keys' lines
/// (or, for a key the default file leaves out, added at the top level).
pub fn node_config(dir: &Path, node: &str, port: u16, seeds: &[String], lines: &[&str]) -> PathBuf {
    let seeds: Vec<String> = seeds
        .iter()
        .map(|a| format!("{{ address = \"{a}\" }}"))
        .collect();
    let mut config = default_config();
    for line in [
        format!("data-dir = \"{node}/data\""),
        format!("keys-dir = \"{node}/keys\""),
        "genesis = \"genesis.toml\"".to_string(),
        format!("listen-address = \"127.0.0.1:{port}\""),
        format!("seed-peers = [{}]", seeds.join(", ")),
        "interval = \"200ms\"".to_string(),
    ]
    .iter()
    .map(String::as_str)
    .chain(lines.iter().copied())
    {
        let key = line.split(" = ").next().unwrap();
        if config.lines().any(|l| l.starts_with(&format!("{key} = "))) {
            config = set_line(&config, key, line);
        } else {
            config = format!("{line}\n{config}");
        }
    }
    let path = dir.join(format!("{node}.toml"));
    fs::write(&path, config).unwrap();
    path
}

/// The text served at `/metrics` on `address`; `None` if it does not answer.
pub fn metrics(address: &str) -> Option<String> {
    let mut stream = std::net::TcpStream::connect(address).ok()?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: soma\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    Some(text)
}

/// The value of the series `name` at `/metrics` on `address`; a labelled
/// series is named as the text format writes it
/// (`name{label="value"}`).
pub fn metric(address: &str, name: &str) -> Option<f64> {
    metrics(address)?.lines().find_map(|l| {
        let value = l.strip_prefix(name)?.strip_prefix(' ')?;
        value.parse().ok()
    })
}

/// Polls `done` every 50 ms until it holds; panics naming `what` after
/// `limit`.
pub fn wait_for(what: &str, limit: Duration, done: impl FnMut() -> bool) {
    wait_or_report(what, limit, done, String::new);
}

/// [`wait_for`], with what `report` says at the deadline in the panic.
pub fn wait_or_report(
    what: &str,
    limit: Duration,
    mut done: impl FnMut() -> bool,
    report: impl Fn() -> String,
) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}\n{}",
            report()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
