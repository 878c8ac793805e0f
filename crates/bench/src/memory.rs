//! Benchmark 5: peak memory of a node catching up a short and a long chain.
//! The syncing node runs in a child process of the harness, on a RedbStore,
//! so its peak RSS (`VmHWM`) is its own; 3 validators in the harness serve
//! the chain.

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use soma_actors::P2pConfig;
use soma_actors::discovery::SeedPeer;
use soma_chain::{Chain, ChainBuilder, ChainConfig};
use soma_store::{ConsensusStore, RedbStore};

use crate::report::{Cell, Section};
use crate::{Size, runtime};

/// A chain of many small commits: 4 validators, 2 signed transactions of
/// 32 bytes per block, epochs of 10,000 commits.
fn chain_config() -> ChainConfig {
    ChainConfig {
        seed: [42; 32],
        stakes: vec![1; 4],
        transactions_per_block: 2,
        payload_bytes: 32,
        commits_per_epoch: Some(10_000),
        ..ChainConfig::default()
    }
}

/// One run: the child's time and peak RSS.
struct Run {
    elapsed: Duration,
    peak_kib: u64,
}

fn catch_up(chain: &Chain, commits: u64, cache: usize) -> Run {
    let rt = runtime(2);
    let validators: Vec<_> = (1..=3)
        .map(|k| soma_testkit::validator_up_to(chain, commits, k))
        .collect();
    let seeds: Vec<String> = validators
        .iter()
        .map(|v| format!("{}@{}", hex::encode(v.peer_id().0), v.local_addr()))
        .collect();
    let output = Command::new(std::env::current_exe().expect("this executable"))
        .args([
            "child-memory",
            &commits.to_string(),
            &cache.to_string(),
            &seeds.join(","),
        ])
        .output()
        .expect("the child starts");
    rt.block_on(crate::sync::stop(validators));
    let (elapsed, peak_kib, _) =
        crate::child_report(&output, &format!("memory run of {commits} commits"));
    Run { elapsed, peak_kib }
}

/// Runs the benchmark.
pub fn section(size: &Size) -> Section {
    let (small, large) = size.memory_commits;
    let built = Instant::now();
    let chain = ChainBuilder::new(chain_config()).build(large);
    eprintln!(
        "  chain of {large} commits built in {:.1}s",
        built.elapsed().as_secs_f64()
    );
    let mut s = Section::new(
        "memory",
        "Memory: peak RSS catching up a short and a long chain",
        format!(
            "The syncing node is a child process on a RedbStore; its peak RSS (`VmHWM`) is its \
             own. 3 validators in the harness serve the first {small}, then {large}, commits of one \
             chain (4 validators, 2 signed transactions per block, epochs of 10,000 commits). \
             Default settings but the store's page cache, which is the bound that grows to fill: \
             the default ({} MiB) and 8 MiB. Each figure is the median of {} runs. Reference: the \
             short chain's peak.",
            RedbStore::DEFAULT_CACHE_BYTES >> 20,
            size.memory_runs
        ),
        &[
            "store page cache, commits",
            "time (s)",
            "commits/s",
            "peak RSS (MiB), median",
            "lowest–highest (MiB)",
            "of the short chain's peak",
        ],
    );
    for cache in [RedbStore::DEFAULT_CACHE_BYTES, 8 << 20] {
        // The peak depends on how many fetched batches happen to be in
        // flight at once, so each figure is the median of several runs.
        let median = |n: u64| {
            let mut runs: Vec<Run> = (0..size.memory_runs)
                .map(|_| catch_up(&chain, n, cache))
                .collect();
            runs.sort_by_key(|r| r.peak_kib);
            let spread = (runs[0].peak_kib, runs[runs.len() - 1].peak_kib);
            (runs.swap_remove(runs.len() / 2), spread)
        };
        let (short, short_spread) = median(small);
        let (long, long_spread) = median(large);
        for (n, run, (low, high)) in [(small, &short, short_spread), (large, &long, long_spread)] {
            s.row(
                format!("{} MiB, {n}", cache >> 20),
                vec![
                    Cell::secs(run.elapsed),
                    Cell::rate(n as f64, run.elapsed),
                    Cell::num(run.peak_kib as f64 / 1024.0, 1),
                    Cell::text(format!(
                        "{:.1}–{:.1}",
                        low as f64 / 1024.0,
                        high as f64 / 1024.0
                    )),
                    Cell::Ratio(run.peak_kib as f64 / short.peak_kib.max(1) as f64),
                ],
            );
        }
    }
    s
}

/// The syncing node, in a child process: syncs `commits` from `seeds`
/// (`peer-id-hex@address`, comma-separated) into a RedbStore with a page
/// cache of `cache` bytes; prints `seconds peak-KiB`.
pub fn child(commits: u64, cache: usize, seeds: &str) {
    let genesis = ChainBuilder::new(chain_config()).genesis().clone();
    let seed_peers: Vec<SeedPeer> = seeds
        .split(',')
        .map(|s| {
            let (id, address) = s.split_once('@').expect("peer-id@address");
            SeedPeer {
                peer_id: Some(crate::peer_id_from_hex(id).expect("a 32-byte hex peer id")),
                address: address.to_string(),
            }
        })
        .collect();
    let dir = tempfile::tempdir().expect("a temporary directory");
    let store: Arc<dyn ConsensusStore> = Arc::new(
        RedbStore::open_with_cache(dir.path().join("store.redb"), &genesis, cache)
            .expect("the store opens"),
    );
    runtime(2).block_on(async move {
        let start = Instant::now();
        let node = soma_actors::P2pBuilder::new(
            P2pConfig {
                seed_peers,
                ..P2pConfig::default()
            },
            soma_types::KeyPair::from_seed([120; 32]),
            genesis,
            store,
        )
        .start()
        .expect("the node starts");
        soma_testkit::wait_synced(&node, commits, Duration::from_secs(1_800)).await;
        let elapsed = start.elapsed();
        let peak = crate::peak_rss_kib(std::process::id());
        node.shutdown().await;
        println!("{} {peak}", elapsed.as_secs_f64());
    });
}
