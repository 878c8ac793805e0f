//! Faults of whole processes. The validators a fresh node syncs from are
//! separate `soma-p2p run` processes, killed with SIGKILL while their
//! metrics show them serving a fetch and restarted once the node has synced
//! further: the node ends with exactly their chain and never applies part
//! of a batch. And a
//! node that runs out of file descriptors keeps accepting connections once
//! some are free again.

use std::collections::BTreeSet;
use std::fs;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use soma_chain::ChainBuilder;
use soma_store::{ConsensusStore, RedbStore};

mod common;
use common::*;

const COMMITS: u64 = 3_000;
/// Commits per sync batch of the syncing node; the validators hold a
/// certificate at the end of each such batch.
const BATCH: u64 = 5;
/// Not a multiple of [`BATCH`], so that epoch ends cut batches short.
const COMMITS_PER_EPOCH: u64 = 1_001;
const VALIDATORS: u16 = 3;
/// Validator processes killed (and restarted) while the node syncs.
const KILLS: usize = 12;
/// Bounds the sync under faults, and each wait for a process.
const PATIENCE: Duration = Duration::from_secs(90);

#[test]
fn serving_validators_killed_and_restarted_mid_batch_leave_the_syncing_node_whole() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = free_ports(VALIDATORS);
    let genesis = local_genesis(d, VALIDATORS, base, COMMITS_PER_EPOCH);
    let committee = genesis_committee(&genesis);
    let chain = ChainBuilder::new(chain_config(&genesis)).build(COMMITS);

    // The validators hold the whole chain from the start, as their own
    // production would have left it: a certificate at each batch end.
    let stores: Vec<PathBuf> = (0..VALIDATORS)
        .map(|i| d.join(format!("validator-{i}/data/chain.redb")))
        .collect();
    for store in &stores {
        fs::create_dir_all(store.parent().unwrap()).unwrap();
    }
    {
        let store = RedbStore::open(&stores[0], &committee).unwrap();
        chain.write_to(&store, BATCH).unwrap();
    }
    for store in &stores[1..] {
        fs::copy(&stores[0], store).unwrap();
    }
    // Each validator's metrics say when it is serving a fetch.
    let vmetrics: Vec<String> = (0..VALIDATORS)
        .map(|_| format!("127.0.0.1:{}", free_port()))
        .collect();
    let (addresses, configs, logs) = validator_network_with(d, base, VALIDATORS, |i| {
        vec![format!("metrics-address = \"{}\"", vmetrics[i as usize])]
    });
    let mut validators: Vec<Option<Spawned>> = (0..VALIDATORS as usize)
        .map(|i| Some(run_node(&configs[i], &logs[i])))
        .collect();
    for (i, address) in addresses.iter().enumerate() {
        wait_for("a validator to serve", PATIENCE, || {
            if let Some(validator) = validators[i].as_mut() {
                validator.assert_running(&logs[i]);
            }
            height(address) == Some(COMMITS)
        });
    }

    // The syncing node goes slowly, one small fetch at a time, so that
    // every kill of a validator lands with a batch in flight.
    let out = soma(&["keygen", "--out", d.join("joiner/keys").to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let jport = free_port();
    let jmetrics = format!("127.0.0.1:{}", free_port());
    let joiner_config = node_config(
        d,
        "joiner",
        jport,
        &addresses,
        &[
            "parallel-fetches = 1",
            "max-blocks-per-fetch = 10",
            &format!("commit-sync-batch-size = {BATCH}"),
            &format!("metrics-address = \"{jmetrics}\""),
        ],
    );
    let jlog = d.join("joiner.log");
    let joiner_address = format!("127.0.0.1:{jport}");
    let mut joiner = run_node(&joiner_config, &jlog);
    let sync_started = Instant::now();

    // Kill a validator seen serving a fetch, never the last one up, once
    // the node has synced past where it stood at the kill before; restart
    // it once the node has synced past where it stood at its kill. KILLS
    // times, all while the node syncs.
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(20261123);
    let mut killed_at: Vec<Option<u64>> = vec![None; VALIDATORS as usize];
    let mut kills: Vec<(usize, u64)> = Vec::new();
    let mut seen = BTreeSet::new();
    let mut synced = 0;
    let deadline = Instant::now() + PATIENCE;
    while synced < COMMITS {
        assert!(
            Instant::now() < deadline,
            "sync stalled at {synced} after kills {kills:?}\n{}",
            fs::read_to_string(&jlog).unwrap_or_default()
        );
        if let Some(h) = height(&joiner_address) {
            seen.insert(h);
            synced = h;
        }
        for (i, at) in killed_at.iter_mut().enumerate() {
            if at.is_some_and(|at| synced > at) {
                validators[i] = Some(run_node(&configs[i], &logs[i]));
                *at = None;
            }
        }
        let up: Vec<usize> = (0..killed_at.len())
            .filter(|i| killed_at[*i].is_none())
            .collect();
        let progressed = kills.last().is_none_or(|(_, at)| synced > *at);
        if progressed && up.len() > 1 && kills.len() < KILLS && synced < COMMITS {
            // Looked at in a seeded order, the first seen serving killed
            // at once, while its fetch is likeliest still in flight.
            let mut order = up.clone();
            order.shuffle(&mut rng);
            let serving = order
                .into_iter()
                .find(|i| metric(&vmetrics[*i], "soma_fetches_in_flight").is_some_and(|n| n > 0.0));
            if let Some(victim) = serving {
                let mut process = validators[victim].take().unwrap();
                kill(process.pid(), Signal::SIGKILL).unwrap();
                process
                    .wait_for(PATIENCE)
                    .expect("a killed validator exits");
                // Kept for its restart (another start lets go of it sooner).
                hold_port(base + victim as u16);
                kills.push((victim, synced));
                killed_at[victim] = Some(synced);
                continue;
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let sync_time = sync_started.elapsed();

    // A killed server is a failure, not a lie: no validator was banned.
    assert_eq!(metric(&jmetrics, "soma_banned_peers"), Some(0.0));
    let restarts = metric(&jmetrics, "soma_worker_restarts_total").unwrap_or(0.0);
    kill(joiner.pid(), Signal::SIGTERM).unwrap();
    assert!(joiner.wait_for(PATIENCE).expect("the node stops").success());
    drop(validators);

    // Every watermark the node showed was the end of a whole batch.
    let ends: BTreeSet<u64> = std::iter::once(0)
        .chain(chain.batch_ranges(BATCH).iter().map(|r| *r.end()))
        .collect();
    let partial: Vec<&u64> = seen.difference(&ends).collect();
    assert!(partial.is_empty(), "watermarks inside a batch: {partial:?}");
    // Every kill came while the node synced, each at a height of its own.
    let heights: BTreeSet<u64> = kills.iter().map(|(_, h)| *h).collect();
    assert_eq!(heights.len(), KILLS, "kills while syncing: {kills:?}");
    assert!(heights.iter().all(|h| *h < COMMITS), "{kills:?}");
    assert!(restarts > 0.0, "no kill cut a fetch short");

    // The node's store is the validators' chain, commit for commit, and the
    // killed validators' stores are whole.
    let joiner_store = d.join("joiner/data/chain.redb");
    assert_eq!(check_store(&joiner_store, &committee, &chain), COMMITS);
    let reopened = RedbStore::open(&joiner_store, &committee).unwrap();
    for epoch in 0..2 {
        assert_eq!(
            reopened.last_commit_of_epoch(epoch).unwrap(),
            chain.epoch_last(epoch)
        );
    }
    for c in chain.committees() {
        assert_eq!(reopened.committee(c.epoch()).unwrap().as_ref(), Some(c));
    }
    drop(reopened);
    for store in &stores {
        assert_eq!(check_store(store, &committee, &chain), COMMITS);
    }
    println!(
        "{} kills: {kills:?}; {} watermarks seen; \
         {restarts} sync workers restarted; synced in {sync_time:?}, test {:?}",
        kills.len(),
        seen.len(),
        started.elapsed()
    );
}

#[test]
fn a_node_out_of_file_descriptors_keeps_accepting_once_some_are_free() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let port = free_port();
    let address = format!("127.0.0.1:{port}");
    let out = soma(&[
        "genesis",
        "--validators",
        "1",
        "--out",
        d.to_str().unwrap(),
        "--base-port",
        &port.to_string(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    // The connection bound is above what the file descriptor limit allows,
    // so the limit is hit first.
    let config = node_config(
        d,
        "validator-0",
        port,
        &[],
        &["max-inbound-connections = 1000"],
    );
    let log = d.join("node.log");
    let mut node = Spawned::spawn(
        Command::new("sh")
            .args(["-c", "ulimit -n 64 && exec \"$0\" run --config \"$1\""])
            .arg(BIN)
            .arg(&config)
            // Accept errors are logged at debug level by the TLS layer.
            .env("RUST_LOG", "info,tonic_tls=debug")
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap()),
    );
    let log = || fs::read_to_string(d.join("node.log")).unwrap_or_default();
    wait_for("the node to serve", PATIENCE, || height(&address).is_some());

    // Connections that never start their handshake use up the node's
    // descriptors; accepting fails.
    let held: Vec<std::net::TcpStream> = (0..100)
        .filter_map(|_| std::net::TcpStream::connect(&address).ok())
        .collect();
    wait_for("accepting to fail", PATIENCE, || {
        log().contains("Too many open files")
    });
    assert!(node.child.try_wait().unwrap().is_none(), "{}", log());

    // They leave: the node accepts and serves again.
    drop(held);
    wait_for("the node to serve again", PATIENCE, || {
        height(&address).is_some()
    });
    kill(node.pid(), Signal::SIGTERM).unwrap();
    assert!(
        node.wait_for(PATIENCE).expect("the node stops").success(),
        "{}",
        log()
    );
}
