//! Verifier actor throughput against raw `verify_batch` on the same number of
//! threads, measured in one run. Prints signatures per second and the ratio.
//!
//! `cargo bench -p soma-actors --bench verifier` (or `make bench`).

use std::time::{Duration, Instant};

use actix::Actor;
use soma_actors::Blob;
use soma_actors::verifier::{Config, InstallCommittee, Verifier, Verify, VerifyRequest};
use soma_chain::{ChainBuilder, ChainConfig};
use soma_types::verify::{SignatureBatch, check_block};
use soma_types::{Limits, UnverifiedBlock};

const COMMITS: u64 = 500;
const CHUNK: usize = 100;
const RUNS: usize = 5;

fn best_of(runs: usize, mut f: impl FnMut()) -> Duration {
    (0..runs)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .min()
        .unwrap()
}

fn main() {
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let chain = ChainBuilder::new(ChainConfig {
        transactions_per_block: 10,
        ..ChainConfig::validators(4)
    })
    .build(COMMITS);
    let blocks: Vec<UnverifiedBlock> = chain.fetch_blocks(1..=COMMITS);
    let committee = chain.genesis().clone();
    let limits = Limits::default();

    let mut all = SignatureBatch::default();
    for b in &blocks {
        check_block(b, &committee, &limits, Some(&mut all)).unwrap();
    }
    let signatures = all.len();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();

    // The crypto limit: prepared batches (keys decompressed), one part per thread.
    let parts = all.clone().split(threads);
    let raw = best_of(RUNS, || {
        pool.install(|| {
            use rayon::prelude::*;
            parts.par_iter().for_each(|p| p.verify().unwrap());
        })
    });

    // The same, but building each batch from the blocks (decode, digests,
    // sender key decompression) inside the timed region.
    let blobs: Vec<Blob> = blocks
        .iter()
        .map(|b| Blob(b.serialized().clone()))
        .collect();
    let raw_with_prep = best_of(RUNS, || {
        pool.install(|| {
            use rayon::prelude::*;
            blobs
                .par_chunks(blobs.len().div_ceil(threads))
                .for_each(|chunk| {
                    let mut batch = SignatureBatch::default();
                    for blob in chunk {
                        let b = UnverifiedBlock::decode(blob.0.clone(), limits.max_block_bytes)
                            .unwrap();
                        check_block(&b, &committee, &limits, Some(&mut batch)).unwrap();
                    }
                    batch.verify().unwrap();
                });
        })
    });

    // The same with the Verifier's key cache: what the actor's jobs do.
    let cache = std::sync::Arc::new(soma_types::KeyCache::new(16_384));
    let raw_cached = best_of(RUNS, || {
        pool.install(|| {
            use rayon::prelude::*;
            blobs
                .par_chunks(blobs.len().div_ceil(threads))
                .for_each(|chunk| {
                    let mut batch = SignatureBatch::with_cache(chunk.len(), cache.clone());
                    for blob in chunk {
                        let b = UnverifiedBlock::decode(blob.0.clone(), limits.max_block_bytes)
                            .unwrap();
                        check_block(&b, &committee, &limits, Some(&mut batch)).unwrap();
                    }
                    batch.verify().unwrap();
                });
        })
    });

    // The Verifier actor: every chunk of blocks sent at once, as sync workers
    // would, on a pool of the same size.
    let actor = actix_rt::System::new().block_on(async {
        let verifier = Verifier::new(
            Config {
                threads,
                ..Config::default()
            },
            1024,
            None,
        )
        .unwrap()
        .start();
        verifier
            .send(InstallCommittee(committee.clone()))
            .await
            .unwrap();
        let mut best = Duration::MAX;
        for _ in 0..RUNS {
            let t = Instant::now();
            let replies = blobs.chunks(CHUNK).map(|chunk| {
                verifier.send(Verify(VerifyRequest::Blocks {
                    epoch: 0,
                    blocks: chunk.to_vec(),
                    check_signatures: true,
                }))
            });
            for r in futures_join(replies).await {
                r.unwrap().unwrap();
            }
            best = best.min(t.elapsed());
        }
        best
    });

    let rate = |d: Duration| signatures as f64 / d.as_secs_f64();
    println!(
        "verifier benchmark: {} blocks, {signatures} signatures, {threads} threads",
        blocks.len()
    );
    println!(
        "{:<44} {:>12} {:>14} {:>8}",
        "path", "time", "signatures/s", "ratio"
    );
    for (name, d) in [
        ("raw verify_batch (prepared batches)", raw),
        ("raw decode + checks + verify_batch", raw_with_prep),
        ("the same with the key cache", raw_cached),
        ("Verifier actor (chunks of 100 blocks)", actor),
    ] {
        println!(
            "{name:<44} {:>10.1}ms {:>14.0} {:>8.3}",
            d.as_secs_f64() * 1e3,
            rate(d),
            raw.as_secs_f64() / d.as_secs_f64()
        );
    }
}

/// Awaits all futures, in order.
async fn futures_join<F: std::future::Future>(futures: impl Iterator<Item = F>) -> Vec<F::Output> {
    let handles: Vec<_> = futures.map(|f| Box::pin(f)).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await);
    }
    out
}
