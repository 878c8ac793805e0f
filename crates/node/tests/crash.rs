//! Crash safety: a node is killed with SIGKILL at random (seeded) moments
//! while it syncs, twenty times, and restarted each time on the same
//! RedbStore. After every kill the store opens, its watermark is a stored
//! commit of the chain, nothing is missing below it, and every commit links
//! to the one before; at the end sync completes to exactly the validators'
//! chain.

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use rand::{Rng, SeedableRng};
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
    let chain = ChainBuilder::new(chain_config(&genesis)).build(COMMITS);

    let v0 = format!("127.0.0.1:{base}");
    let seed0 = format!("{{ address = \"{v0}\" }}");
    let _validators = [
        run_node(
            &node_config(d, "validator-0", base, "", Some(2_000.0)),
            &d.join("validator-0.log"),
        ),
        run_node(
            &node_config(d, "validator-1", base + 1, &seed0, Some(2_000.0)),
            &d.join("validator-1.log"),
        ),
    ];
    let deadline = Instant::now() + Duration::from_secs(120);
    while height(&v0) != Some(COMMITS) {
        assert!(
            Instant::now() < deadline,
            "the validators did not produce {COMMITS} commits"
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

    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(20261122);
    let mut watermarks = Vec::new();
    for _ in 0..KILLS {
        let mut node = run_node(&config, &log);
        // The kill point is the experiment: a random moment of the sync.
        std::thread::sleep(Duration::from_millis(rng.random_range(50..700)));
        kill(node.pid(), Signal::SIGKILL).unwrap();
        node.wait_for(Duration::from_secs(10))
            .expect("a killed node exits");
        watermarks.push(check_store(&store, &committee, &chain));
    }
    let mid_sync = watermarks
        .iter()
        .filter(|w| **w > 0 && **w < COMMITS)
        .count();
    assert!(
        mid_sync >= 3,
        "too few kills landed mid-sync: {watermarks:?}"
    );
    assert!(
        watermarks.windows(2).all(|w| w[0] <= w[1]),
        "progress was lost: {watermarks:?}"
    );

    // Once more, to the end.
    let mut node = run_node(&config, &log);
    let address = format!("127.0.0.1:{jport}");
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
