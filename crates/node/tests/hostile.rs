//! Sync among hostile peers, with real processes. A fresh `soma-p2p run`
//! node has as seed peers an honest validator, itself a `soma-p2p run`
//! process, and three liars served in this test's process
//! (`soma_testkit::byzantine`), lying in the ways of issue 13: a height
//! nobody holds, commits of an epoch nobody expects, a retired committee
//! extending its ended epoch, a flood of blocks nobody asked for, every
//! block sent twice.
//!
//! The validator holds only the first epoch at first, and the liars claim
//! the whole chain: once the node has the first epoch, only liars can
//! serve the rest. Commits and blocks may come from different peers, so
//! liars that lie about commits and liars that lie about blocks could
//! together serve a whole honest batch, and one of them would never be
//! caught; each test therefore gathers liars that all lie about the same
//! thing, so that nothing past the first epoch can be had from them, and
//! each is asked until it is caught. The test waits until the node's
//! metrics show every liar banned, with its watermark and its highest
//! known commit at what the validator holds (a banned peer's claim no
//! longer counts). Then the validator is restarted holding the whole
//! chain, the node syncs it, and its store, opened once it stops, is
//! exactly the validator's chain.
//!
//! The node's peak memory, apart from the liars' (they live in this test's
//! process), stays within its fetch budget over the validator's: a flood of
//! maximal chunks is cut at its first block.

use std::fs;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use soma_chain::ChainBuilder;
use soma_store::{ConsensusStore, RedbStore};
use soma_testkit::byzantine::{self, Lie};

mod common;
use common::*;

/// Commits of the chain, in two epochs.
const TIP: u64 = 500;
/// The end of epoch 0, and all the validator holds at first.
const EPOCH_END: u64 = 250;
/// Validators of the genesis; only the first one runs.
const VALIDATORS: u16 = 4;
/// The node's `max-total-fetched-bytes`.
const FETCH_BUDGET: u64 = 64 << 20;
/// A safety net on each wait; the test takes far less.
const PATIENCE: Duration = Duration::from_secs(120);

#[test]
fn liars_about_commits_are_all_banned_and_the_node_syncs_the_chain_from_the_validator() {
    // None of them gives the commit after the first epoch's end: one says
    // NOT_FOUND, one names the epoch u64::MAX, one extends the ended epoch.
    sync_among(&[Lie::ClaimsHeight, Lie::FutureEpoch, Lie::RetiredCommittee]);
}

#[test]
fn liars_about_blocks_are_all_banned_and_the_node_syncs_the_chain_from_the_validator() {
    // None of them gives a block past the first epoch: one says NOT_FOUND,
    // one floods, one repeats.
    sync_among(&[Lie::ClaimsHeight, Lie::FloodsBlocks, Lie::RepeatsBlocks]);
}

/// Runs a fresh node seeded with `lies` and the validator, as the module
/// says, and checks it bans every liar and ends with exactly the chain.
fn sync_among(lies: &[Lie]) {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let port = free_ports(VALIDATORS);
    let genesis = local_genesis(d, VALIDATORS, port, EPOCH_END);
    let committee = genesis_committee(&genesis);
    let chain = Arc::new(ChainBuilder::new(chain_config(&genesis)).build(TIP));
    assert_eq!(chain.epoch_last(0), Some(EPOCH_END));

    let validator_store = d.join("validator-0/data/chain.redb");
    fs::create_dir_all(validator_store.parent().unwrap()).unwrap();
    hold(&validator_store, &committee, &chain, 1..=EPOCH_END);
    let validator_address = format!("127.0.0.1:{port}");
    let validator_config = node_config(d, "validator-0", port, &[], &[]);
    let validator_log = d.join("validator-0.log");
    let mut validator = run_node(&validator_config, &validator_log);
    wait_for("the validator to serve", PATIENCE, || {
        validator.assert_running(&validator_log);
        height(&validator_address) == Some(EPOCH_END)
    });

    // The liars serve from this process until the runtime is dropped.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let mut seeds: Vec<String> = lies
        .iter()
        .zip(100u8..)
        .map(|(lie, key)| {
            runtime
                .block_on(byzantine::serve(chain.clone(), *lie, key))
                .1
        })
        .collect();
    seeds.push(validator_address.clone());

    let out = soma(&["keygen", "--out", d.join("node/keys").to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let node_port = free_port();
    let node_address = format!("127.0.0.1:{node_port}");
    let node_metrics = format!("127.0.0.1:{}", free_port());
    let node_config = node_config(
        d,
        "node",
        node_port,
        &seeds,
        &[
            "timeout = \"3s\"",
            // Bans must outlast the test, to be counted at its end.
            "ban-duration = \"1h\"",
            &format!("max-total-fetched-bytes = {FETCH_BUDGET}"),
            &format!("metrics-address = \"{node_metrics}\""),
        ],
    );
    let node_log = d.join("node.log");
    let mut node = run_node(&node_config, &node_log);
    let sync_started = Instant::now();
    let report = || {
        let series = metrics(&node_metrics).unwrap_or_default();
        let log = fs::read_to_string(&node_log).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        format!(
            "metrics:\n{}\nlast lines of the node's log:\n{}",
            series
                .lines()
                .filter(|l| l.starts_with("soma_"))
                .collect::<Vec<_>>()
                .join("\n"),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        )
    };
    let series = |name: &str| metric(&node_metrics, name);

    // Every liar is caught, and at no point is anything applied past what
    // the honest validator holds: only liars could have served it.
    wait_or_report(
        "every liar banned, with the validator's epoch synced",
        PATIENCE,
        || {
            let synced = series("soma_highest_synced_commit");
            assert!(
                synced.is_none_or(|s| s <= EPOCH_END as f64),
                "applied past the validator's epoch, from liars\n{}",
                report()
            );
            series("soma_banned_peers") == Some(lies.len() as f64)
                && synced == Some(EPOCH_END as f64)
        },
        report,
    );
    let banned_after = sync_started.elapsed();
    // What the liars made the node hold: its peak memory over the
    // validator's, the same program serving the same epoch.
    let peak = |p: &Spawned| soma_testkit::peak_rss_of(p.child.id()).expect("the process runs");
    let grown = peak(&node).saturating_sub(peak(&validator));
    assert!(
        grown <= FETCH_BUDGET,
        "the node's peak memory is {} MiB over the validator's, past its {} MiB fetch budget",
        grown >> 20,
        FETCH_BUDGET >> 20
    );
    // With the liars banned, the highest known commit is the validator's,
    // not the million more that one of them claims.
    wait_or_report(
        "the banned liars' claims dropped",
        PATIENCE,
        || series("soma_highest_known_commit") == Some(EPOCH_END as f64),
        report,
    );
    assert_eq!(height(&node_address), Some(EPOCH_END));

    // The validator comes back holding the whole chain.
    kill(validator.pid(), Signal::SIGTERM).unwrap();
    assert!(
        validator
            .wait_for(PATIENCE)
            .expect("the validator stops")
            .success()
    );
    hold(&validator_store, &committee, &chain, EPOCH_END + 1..=TIP);
    let mut validator = run_node(&validator_config, &validator_log);
    let restarted = Instant::now();
    wait_or_report(
        "the node to sync the whole chain",
        PATIENCE,
        || height(&node_address) == Some(TIP),
        report,
    );
    let rest_synced = restarted.elapsed();

    // Still exactly the liars banned: the validator, which alone could serve
    // past the first epoch, never was.
    assert_eq!(series("soma_banned_peers"), Some(lies.len() as f64));
    let failures = series("soma_verification_failures_total{kind=\"invalid_response\"}");
    kill(node.pid(), Signal::SIGTERM).unwrap();
    assert!(node.wait_for(PATIENCE).expect("the node stops").success());
    kill(validator.pid(), Signal::SIGTERM).unwrap();
    assert!(
        validator
            .wait_for(PATIENCE)
            .expect("the validator stops")
            .success()
    );
    drop(runtime);

    // The node's store is the validator's chain, commit for commit, with
    // its epoch ends and committees: the retired committee's second next
    // committee never got in.
    let node_store = d.join("node/data/chain.redb");
    assert_eq!(check_store(&node_store, &committee, &chain), TIP);
    let reopened = RedbStore::open(&node_store, &committee).unwrap();
    for c in chain.committees() {
        assert_eq!(reopened.committee(c.epoch()).unwrap().as_ref(), Some(c));
        assert_eq!(
            reopened.last_commit_of_epoch(c.epoch()).unwrap(),
            chain.epoch_last(c.epoch())
        );
    }
    println!(
        "{lies:?} banned {banned_after:?} after the node started, its peak memory {} KiB \
         over the validator's; {failures:?} responses failed verification; the rest synced {rest_synced:?} \
         after the validator's restart; test {:?}",
        grown >> 10,
        started.elapsed()
    );
}
