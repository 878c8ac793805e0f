//! Catch-up throughput over loopback against the verification limit,
//! measured in one run: a node `SOMA_BENCH_COMMITS` (default 20,000) commits
//! behind syncs from 3 validators (4-validator committee, blocks of 10
//! signed transactions), with block signatures checked and then not; the
//! reference is the same signatures through raw `verify_batch` on all cores.
//!
//! `cargo bench -p soma-actors --bench sync`

use std::sync::Arc;
use std::time::{Duration, Instant};

use rayon::prelude::*;
use soma_actors::{P2pBuilder, P2pConfig, P2pHandle};
use soma_chain::{Chain, ChainBuilder, ChainConfig};
use soma_store::{ConsensusStore, MemStore};
use soma_types::verify::{SignatureBatch, check_block};
use soma_types::{KeyPair, Limits, VerifiedBlock};

fn validators(chain: &Chain) -> Vec<P2pHandle> {
    (1..=3u8)
        .map(|k| soma_testkit::validator(chain, k))
        .collect()
}

struct Run {
    elapsed: Duration,
    bytes: u64,
    restarts: u64,
}

async fn catch_up(chain: &Chain, peers: &[P2pHandle], key: u8, signatures: bool) -> Run {
    let config = P2pConfig {
        seed_peers: soma_testkit::seeds(&peers.iter().collect::<Vec<_>>()),
        verify_synced_block_signatures: signatures,
        ..P2pConfig::default()
    };
    let store: Arc<dyn ConsensusStore> = Arc::new(MemStore::new(chain.genesis()));
    let start = Instant::now();
    let node = P2pBuilder::new(
        config,
        KeyPair::from_seed([key; 32]),
        chain.genesis().clone(),
        store,
    )
    .start()
    .unwrap();
    loop {
        let status = node.sync_status().await.unwrap();
        if status.synced >= chain.tip() {
            let run = Run {
                elapsed: start.elapsed(),
                bytes: status.bytes_fetched,
                restarts: status.restarts,
            };
            node.shutdown().await;
            return run;
        }
        assert!(
            start.elapsed() < Duration::from_secs(1_800),
            "sync stalled: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn main() {
    let commits: u64 = std::env::var("SOMA_BENCH_COMMITS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let built = Instant::now();
    let chain = ChainBuilder::new(ChainConfig {
        transactions_per_block: 10,
        ..ChainConfig::validators(4)
    })
    .build(commits);
    println!(
        "chain of {commits} commits built in {:.1}s",
        built.elapsed().as_secs_f64()
    );
    let blocks: Vec<VerifiedBlock> = (1..=commits)
        .flat_map(|i| chain.blocks_of(i).iter().cloned())
        .collect();

    // The crypto limit: every block and transaction signature of the chain,
    // batches prepared beforehand, verified on all cores.
    let limits = Limits::default();
    let batches: Vec<SignatureBatch> = blocks
        .chunks(100)
        .map(|chunk| {
            let mut batch = SignatureBatch::default();
            for b in chunk {
                check_block(
                    &b.to_unverified(),
                    chain.genesis(),
                    &limits,
                    Some(&mut batch),
                )
                .unwrap();
            }
            batch
        })
        .collect();
    let signatures: usize = batches.iter().map(SignatureBatch::len).sum();
    let t = Instant::now();
    batches.par_iter().for_each(|b| b.verify().unwrap());
    let limit = t.elapsed();

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (with, without) = runtime.block_on(async {
        let peers = validators(&chain);
        let with = catch_up(&chain, &peers, 101, true).await;
        let without = catch_up(&chain, &peers, 102, false).await;
        for p in peers {
            p.shutdown().await;
        }
        (with, without)
    });

    let per_s = |n: f64, d: Duration| n / d.as_secs_f64();
    println!(
        "catch-up benchmark: {commits} commits, {} blocks, {signatures} signatures, 3 peers, {cores} cores",
        blocks.len()
    );
    println!(
        "{:<40} {:>9} {:>11} {:>10} {:>14} {:>8} {:>8}",
        "path", "time", "commits/s", "blocks/s", "signatures/s", "MB/s", "ratio"
    );
    println!(
        "{:<40} {:>8.2}s {:>11} {:>10} {:>14.0} {:>8} {:>8.3}",
        "raw verify_batch, all cores (limit)",
        limit.as_secs_f64(),
        "-",
        "-",
        per_s(signatures as f64, limit),
        "-",
        1.0
    );
    for (name, run, checked) in [
        ("catch-up, block signatures checked", &with, true),
        ("catch-up, block signatures off", &without, false),
    ] {
        let sigs = if checked { signatures as f64 } else { 0.0 };
        println!(
            "{name:<40} {:>8.2}s {:>11.0} {:>10.0} {:>14.0} {:>8.1} {:>8.3}   (restarts: {})",
            run.elapsed.as_secs_f64(),
            per_s(commits as f64, run.elapsed),
            per_s(blocks.len() as f64, run.elapsed),
            per_s(sigs, run.elapsed),
            per_s(run.bytes as f64 / 1e6, run.elapsed),
            if checked {
                per_s(sigs, run.elapsed) / per_s(signatures as f64, limit)
            } else {
                f64::NAN
            },
            run.restarts
        );
    }
}
