//! Crash safety: a node is killed with SIGKILL each time it has synced
//! past where it was last killed, twenty times, restarted each time on the same
//! RedbStore. After every kill the store opens, its watermark is a stored
//! commit of the chain, nothing is missing below it, and every commit links
//! to the one before; at the end sync completes to exactly the validators'
//! chain.

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use soma_chain::ChainBuilder;
use soma_store::{ConsensusStore, RedbStore};

mod common;
use common::*;

const COMMITS: u64 = 3_000;
const KILLS: usize = 20;

fn node_config(
    dir: &Path,
    node: &str,
    port: u16,
    seeds: &str,
    producer: Option<f64>,
) -> std::path::PathBuf {
    let mut config = default_config();
    config = set_line(&config, "data-dir", &format!("data-dir = \"{node}/data\""));
    config = set_line(&config, "keys-dir", &format!("keys-dir = \"{node}/keys\""));
    config = set_line(&config, "genesis", "genesis = \"genesis.toml\"");
    config = set_line(
        &config,
        "listen-address",
        &format!("listen-address = \"127.0.0.1:{port}\""),
    );
    config = set_line(&config, "seed-peers", &format!("seed-peers = [{seeds}]"));
    config = set_line(&config, "interval", "interval = \"200ms\"");
    if producer.is_none() {
        // The syncing node goes slowly, one small fetch at a time, so that
        // kills land in the middle of its sync.
        config = set_line(&config, "parallel-fetches", "parallel-fetches = 1");
        config = set_line(&config, "max-blocks-per-fetch", "max-blocks-per-fetch = 10");
        config = set_line(
            &config,
            "commit-sync-batch-size",
            "commit-sync-batch-size = 5",
        );
    }
    if let Some(rate) = producer {
        config = config.replace(
            "\n[p2p]\n",
            &format!("\n[producer]\ncommit-rate = {rate}\nmax-commits = {COMMITS}\n\n[p2p]\n"),
        );
    }
    let path = dir.join(format!("{node}.toml"));
    fs::write(&path, config).unwrap();
    path
}

#[test]
fn a_node_killed_twenty_times_during_sync_loses_nothing_and_finishes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Two validators on consecutive free ports.
    let base = free_ports(2);
    let genesis = local_genesis(d, 2, base, 600);
    let committee = genesis_committee(&genesis);

    // Started right after their ports were found free, the chain built
    // once they run: the less time between, the less chance another
    // process takes a port meanwhile.
    let v0 = format!("127.0.0.1:{base}");
    let seed0 = format!("{{ address = \"{v0}\" }}");
    let logs = [d.join("validator-0.log"), d.join("validator-1.log")];
    let mut validators = [
        run_node(
            &node_config(d, "validator-0", base, "", Some(2_000.0)),
            &logs[0],
        ),
        run_node(
            &node_config(d, "validator-1", base + 1, &seed0, Some(2_000.0)),
            &logs[1],
        ),
    ];
    let chain = ChainBuilder::new(chain_config(&genesis)).build(COMMITS);
    let deadline = Instant::now() + Duration::from_secs(120);
    while height(&v0) != Some(COMMITS) {
        for (validator, log) in validators.iter_mut().zip(&logs) {
            validator.assert_running(log);
        }
        assert!(
            Instant::now() < deadline,
            "the validators did not produce {COMMITS} commits: {}",
            fs::read_to_string(&logs[0]).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    let out = soma(&["keygen", "--out", d.join("joiner/keys").to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let jport = free_port();
    let seeds = format!("{seed0}, {{ address = \"127.0.0.1:{}\" }}", base + 1);
    let config = node_config(d, "joiner", jport, &seeds, None);
    let log = d.join("joiner.log");
    let store = d.join("joiner/data/chain.redb");

    // Each run is killed as soon as it has synced past the last run's
    // watermark: a moment of the sync chosen by its state, not by a clock.
    let address = format!("127.0.0.1:{jport}");
    let mut watermarks: Vec<u64> = Vec::new();
    for _ in 0..KILLS {
        let mut node = run_node(&config, &log);
        let before = watermarks.last().copied().unwrap_or(0);
        let deadline = Instant::now() + Duration::from_secs(60);
        let seen = loop {
            match height(&address) {
                Some(h) if h > before => break h,
                _ => {}
            }
            assert!(
                Instant::now() < deadline,
                "no progress past {before}: {}",
                fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(5));
        };
        kill(node.pid(), Signal::SIGKILL).unwrap();
        node.wait_for(Duration::from_secs(10))
            .expect("a killed node exits");
        // Kept for the next run, while the store is checked.
        hold_port(jport);
        let watermark = check_store(&store, &committee, &chain);
        // What the node reported as synced was on disk.
        assert!(watermark >= seen, "reported {seen}, stored {watermark}");
        watermarks.push(watermark);
    }
    assert!(
        watermarks.windows(2).all(|w| w[0] < w[1]),
        "every run made progress and kept it: {watermarks:?}"
    );
    assert!(
        *watermarks.last().unwrap() < COMMITS,
        "the last kill landed after the sync: slow the node down: {watermarks:?}"
    );

    // Once more, to the end.
    let mut node = run_node(&config, &log);
    let deadline = Instant::now() + Duration::from_secs(120);
    while height(&address) != Some(COMMITS) {
        assert!(
            Instant::now() < deadline,
            "sync did not finish after the kills: {watermarks:?}\n{}",
            fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    kill(node.pid(), Signal::SIGTERM).unwrap();
    assert!(
        node.wait_for(Duration::from_secs(20))
            .expect("the node stops")
            .success()
    );
    assert_eq!(check_store(&store, &committee, &chain), COMMITS);
    let reopened = RedbStore::open(&store, &committee).unwrap();
    for epoch in 0..2 {
        assert_eq!(
            reopened.last_commit_of_epoch(epoch).unwrap(),
            chain.epoch_last(epoch)
        );
    }
    println!("watermarks after each kill: {watermarks:?}");
}
