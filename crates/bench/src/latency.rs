//! Catch-up over long paths: the same catch-up as the sync benchmark, with
//! every validator behind an impaired link (`soma_testkit::impair`) that
//! adds a round trip of 0, 25, 100 or 250 ms, and once with every
//! connection reset on a period; each beside the same catch-up over plain
//! loopback, measured in the same run.

use std::sync::Arc;
use std::time::{Duration, Instant};

use soma_actors::P2pConfig;
use soma_actors::discovery::SeedPeer;
use soma_chain::Chain;
use soma_store::{ConsensusStore, MemStore};
use soma_testkit::impair::{ImpairedLink, Impairment};

use crate::report::{Cell, Section};
use crate::{Size, runtime};

/// One catch-up and what the links did.
struct Run {
    elapsed: Duration,
    restarts: u64,
    resets: u64,
}

/// A fresh node catching up `chain` from 3 validators, each behind a link
/// with `impairment` (`None`: no link, plain loopback).
async fn catch_up(chain: &Chain, impairment: Option<Impairment>, key: u8) -> Run {
    let mut validators = Vec::new();
    let mut links: Vec<ImpairedLink> = Vec::new();
    let mut seeds: Vec<SeedPeer> = Vec::new();
    for k in 1..=3u8 {
        match &impairment {
            Some(i) => {
                let (node, link, seed) =
                    soma_testkit::validator_behind_link(chain, k, P2pConfig::default(), i.clone())
                        .await;
                validators.push(node);
                links.push(link);
                seeds.push(seed);
            }
            None => {
                let node = soma_testkit::validator(chain, k);
                seeds.extend(soma_testkit::seeds(&[&node]));
                validators.push(node);
            }
        }
    }
    let config = P2pConfig {
        seed_peers: seeds,
        ..P2pConfig::default()
    };
    let store: Arc<dyn ConsensusStore> = Arc::new(MemStore::new(chain.genesis()));
    let start = Instant::now();
    let node = soma_testkit::node(chain, key, config, store);
    soma_testkit::wait_applied(&node, chain.tip(), Duration::from_secs(1_800)).await;
    let elapsed = start.elapsed();
    let status = node.sync_status().await.expect("the node runs");
    let resets = links.iter().map(|l| l.stats().resets).sum();
    node.shutdown().await;
    drop(links);
    crate::sync::stop(validators).await;
    Run {
        elapsed,
        restarts: status.restarts,
        resets,
    }
}

/// The round trips measured, in milliseconds.
const ROUND_TRIPS_MS: [u64; 4] = [0, 25, 100, 250];

/// The round trip of the row with resets, in milliseconds.
const RESET_ROUND_TRIP_MS: u64 = 100;

/// Benchmark: catch-up through impaired links.
pub fn section(size: &Size) -> Section {
    let commits = size.latency_commits;
    let chain = crate::sync::chain(4, commits);
    let blocks = chain.block_count();
    let defaults = P2pConfig::default();
    let sync = &defaults.state_sync;
    let mut s = Section::new(
        "latency",
        "Catch-up over long paths: latency and resets",
        format!(
            "A fresh node on a MemStore catches up {commits} commits ({blocks} blocks; \
             4-validator committee, block signatures checked) from 3 validator nodes, each behind \
             its own impaired link (`soma_testkit::impair`, a userspace TCP forwarder on \
             127.0.0.1): half the round trip is added each way to every chunk, as a propagation \
             delay, with no bandwidth limit. The validators advertise the links' addresses, so \
             every connection to them, redials included, goes through a link. Reference: the \
             same catch-up straight over loopback, in the same run. Default settings: {} block \
             fetches at once, commit batches fetched up to {} ahead (adaptive depth), at most {} \
             fetches per peer. Everything \
             in one process on {} cores.",
            sync.parallel_fetches,
            sync.commit_fetches_ahead,
            defaults.max_fetches_per_peer,
            crate::cores(),
        ),
        &[
            "path",
            "round trip (ms)",
            "time (s)",
            "commits/s",
            "of loopback",
            "connection resets",
            "worker restarts",
        ],
    );
    let rt = runtime(2);
    let mut key = 110u8;
    let mut run = |impairment: Option<Impairment>| {
        key += 1;
        rt.block_on(catch_up(&chain, impairment, key))
    };
    let loopback = run(None);
    let row = |s: &mut Section, label: String, rtt: Option<u64>, r: &Run| {
        s.row(
            label,
            vec![
                rtt.map_or(Cell::Empty, |ms| Cell::int(ms as f64)),
                Cell::secs(r.elapsed),
                Cell::rate(commits as f64, r.elapsed),
                Cell::Ratio(loopback.elapsed.as_secs_f64() / r.elapsed.as_secs_f64()),
                Cell::int(r.resets as f64),
                Cell::int(r.restarts as f64),
            ],
        );
    };
    row(
        &mut s,
        "loopback, no link (reference)".into(),
        None,
        &loopback,
    );
    for ms in ROUND_TRIPS_MS {
        let r = run(Some(Impairment::round_trip(Duration::from_millis(ms))));
        row(
            &mut s,
            format!("through links, {ms} ms round trip"),
            Some(ms),
            &r,
        );
    }
    let period = size.latency_reset_every;
    let r = run(Some(Impairment {
        reset_every: Some(period),
        ..Impairment::round_trip(Duration::from_millis(RESET_ROUND_TRIP_MS))
    }));
    row(
        &mut s,
        format!(
            "through links, {RESET_ROUND_TRIP_MS} ms round trip, every connection reset every {} s",
            period.as_secs_f64()
        ),
        Some(RESET_ROUND_TRIP_MS),
        &r,
    );
    s
}
