//! Benchmark 2: the Verifier actor against raw `verify_batch` on the same
//! number of threads.

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::Actor;
use rayon::prelude::*;
use soma_actors::state_sync::DEFAULT_COMMIT_SYNC_BATCH_SIZE;
use soma_actors::verifier::{Config, Deps, InstallCommittee, Verifier, Verify, VerifyRequest};
use soma_actors::{DecodedBlock, HashedBlob};
use soma_types::verify::{Fill, SignatureBatch, check_block};
use soma_types::{KeyCache, Limits, UnverifiedBlock};

use crate::Size;
use crate::report::{Cell, Section};

/// Blocks per request to the actor: a sync worker sends the blocks of one
/// batch (4 per commit with 4 validators: 800 for the default 200
/// commits) in one request; smaller requests are measured too, those of
/// the batches of 100 and of 25 commits.
const CHUNKS: [usize; 3] = [4 * DEFAULT_COMMIT_SYNC_BATCH_SIZE as usize, 400, 100];

/// Runs the benchmark.
pub fn section(size: &Size) -> Section {
    let threads = crate::cores();
    let chain = crate::sync::chain(4, size.verifier_commits);
    let blocks: Vec<UnverifiedBlock> = chain.fetch_blocks(1..=chain.tip());
    let committee = chain.genesis().clone();
    let limits = Limits::default();
    let mut all = SignatureBatch::default();
    for b in &blocks {
        check_block(b, &committee, &limits, Some(&mut all)).expect("a built block passes");
    }
    let signatures = all.len();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("a thread pool");

    // Raw: batches prepared beforehand (keys decompressed), one per thread.
    let parts = all.clone().split(threads);
    let raw = || pool.install(|| parts.par_iter().for_each(|p| p.verify().expect("valid")));

    // Raw with the preparation in the timed region: decode, rule checks,
    // signing digests, key decompression (with and without a key cache).
    // Each block's digest comes with its bytes, as in the node, where the
    // network threads hash a block as it arrives to match it to one asked
    // for; the actor gets the same.
    let blobs: Vec<HashedBlob> = blocks
        .iter()
        .map(|b| HashedBlob::new(b.serialized().clone()))
        .collect();
    let prepared_in = |cache: Option<&Arc<KeyCache>>, chunk_len: usize| {
        pool.install(|| {
            blobs.par_chunks(chunk_len).for_each(|chunk| {
                let mut batch = match cache {
                    Some(c) => SignatureBatch::with_cache(chunk.len(), c.clone(), Fill::Yes),
                    None => SignatureBatch::default(),
                };
                for blob in chunk {
                    let b = UnverifiedBlock::decode_hashed_bytes(
                        blob.hashed().clone(),
                        limits.max_block_bytes,
                        true,
                    )
                    .expect("decodes");
                    check_block(&b, &committee, &limits, Some(&mut batch)).expect("passes");
                }
                batch.verify().expect("valid");
            })
        })
    };
    let whole = blobs.len().div_ceil(threads);
    let cache = Arc::new(KeyCache::new(16_384));

    // The actor: every chunk sent at once, as sync workers would, the
    // blocks decoded as a worker decodes them before it sends them (like
    // their hashing above, before the timed region); then the same
    // requests as bytes, which the Verifier's threads decode.
    let decoded: Vec<DecodedBlock> = blobs
        .iter()
        .map(|b| DecodedBlock::decode(b, limits.max_block_bytes, true).expect("decodes"))
        .collect();
    let shapes: Vec<(usize, bool)> = CHUNKS
        .iter()
        .map(|&n| (n, true))
        .chain([(CHUNKS[0], false)])
        .collect();
    let requests = |chunk_len: usize, as_decoded: bool| -> Vec<VerifyRequest> {
        (0..blobs.len())
            .step_by(chunk_len)
            .map(|start| {
                let end = (start + chunk_len).min(blobs.len());
                if as_decoded {
                    VerifyRequest::DecodedBlocks {
                        epoch: 0,
                        blocks: decoded[start..end].to_vec(),
                        check_signatures: true,
                    }
                } else {
                    VerifyRequest::Blocks {
                        epoch: 0,
                        blocks: blobs[start..end].to_vec(),
                        check_signatures: true,
                    }
                }
            })
            .collect()
    };

    // Rounds: every row timed once in each, so that all rows see the same
    // machine (a row timed alone at another moment moved the ratios by
    // more than the gaps they measure); each row's best round counts.
    let best: Vec<Duration> = actix_rt::System::new().block_on(async {
        let config = Config {
            threads,
            ..Config::default()
        };
        let verifier = Verifier::new(Deps::new(config, 1024), None)
            .expect("a verifier")
            .start();
        verifier
            .send(InstallCommittee(committee.clone()))
            .await
            .expect("installed");
        let timed = |f: &dyn Fn()| {
            let t = Instant::now();
            f();
            t.elapsed()
        };
        let mut best: Vec<Duration> = Vec::new();
        for _ in 0..size.runs {
            let mut times = vec![
                timed(&raw),
                timed(&|| prepared_in(None, whole)),
                timed(&|| prepared_in(Some(&cache), whole)),
            ];
            times.extend(
                CHUNKS
                    .iter()
                    .map(|&n| timed(&|| prepared_in(Some(&cache), n))),
            );
            for &(chunk_len, as_decoded) in &shapes {
                // Built (their blocks' handles cloned) before the clock.
                let requests = requests(chunk_len, as_decoded);
                let t = Instant::now();
                let replies: Vec<_> = requests
                    .into_iter()
                    .map(|request| verifier.send(Verify(request)))
                    .collect();
                for r in futures::future::join_all(replies).await {
                    r.expect("the actor answers").expect("valid blocks");
                }
                times.push(t.elapsed());
            }
            if best.is_empty() {
                best = times;
            } else {
                best.iter_mut()
                    .zip(times)
                    .for_each(|(b, t)| *b = (*b).min(t));
            }
        }
        best
    });
    let raw = best[0];
    let (raw_prep, raw_cached) = (best[1], best[2]);
    let raw_cached_chunks = &best[3..3 + CHUNKS.len()];
    let actor = &best[3 + CHUNKS.len()..];

    let mut s = Section::new(
        "verifier",
        "Verifier actor against raw `verify_batch`",
        format!(
            "{} blocks of 10 signed transactions ({signatures} signatures), {threads} threads on \
             every path; {} rounds, each timing every row once, and each row's best round. \
             The actor gets all requests at once, their blocks as a sync worker hands them \
             (hashed as they arrived and decoded on the blocking pool, before the clock \
             starts): {} blocks per request (what a sync worker sends for a batch of {} \
             commits, the default), then {}; then {} blocks per request as received bytes, \
             decoded on the Verifier's threads.",
            blocks.len(),
            size.runs,
            CHUNKS[0],
            DEFAULT_COMMIT_SYNC_BATCH_SIZE,
            CHUNKS[1..]
                .iter()
                .map(usize::to_string)
                .collect::<Vec<_>>()
                .join(", then "),
            CHUNKS[0]
        ),
        &["path", "time (ms)", "signatures/s", "of raw"],
    );
    let actor_rows = shapes.iter().zip(actor).map(|(&(n, as_decoded), d)| {
        let what = if as_decoded {
            "decoded blocks"
        } else {
            "blocks as bytes"
        };
        (format!("Verifier actor, requests of {n} {what}"), *d)
    });
    for (label, d) in [
        ("raw `verify_batch`, prepared batches".to_string(), raw),
        (
            "raw decode + rule checks + `verify_batch`".to_string(),
            raw_prep,
        ),
        ("the same with the key cache".to_string(), raw_cached),
    ]
    .into_iter()
    .chain(
        CHUNKS
            .iter()
            .zip(raw_cached_chunks)
            .map(|(n, d)| (format!("the same, one batch per {n} blocks"), *d)),
    )
    .chain(actor_rows)
    {
        s.row(
            label,
            vec![
                Cell::ms(d),
                Cell::rate(signatures as f64, d),
                Cell::Ratio(raw.as_secs_f64() / d.as_secs_f64()),
            ],
        );
    }
    s
}
