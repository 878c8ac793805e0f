//! Foundation benchmarks: signature checking, the codec, and verifying a
//! synced batch. Run with `make bench`; figures go in docs/benchmarks.md.

use std::time::Duration;

use bytes::Bytes;
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use soma_chain::{ChainBuilder, ChainConfig};
use soma_types::verify::{
    ExpectedBlocks, SignatureBatch, check_block, verify_commit_batch, verify_fetched_blocks,
};
use soma_types::{
    AuthorityIndex, Block, KeyPair, Limits, SignedBlock, Transaction, UnverifiedBlock,
    VerifiedBlock, codec,
};

fn block_signatures(c: &mut Criterion) {
    let chain = ChainBuilder::new(ChainConfig {
        transactions_per_block: 0,
        ..ChainConfig::validators(4)
    })
    .build(260);
    let blocks: Vec<UnverifiedBlock> = (1..=260)
        .flat_map(|i| chain.blocks_of(i).iter().map(VerifiedBlock::to_unverified))
        .take(1_000)
        .collect();
    let committee = chain.genesis();
    let limits = Limits::default();
    let mut batch = SignatureBatch::default();
    for b in &blocks {
        check_block(b, committee, &limits, Some(&mut batch)).unwrap();
    }
    let mut group = c.benchmark_group("block_signatures_1000");
    group.throughput(Throughput::Elements(batch.len() as u64));
    group.bench_function("verify_batch", |b| b.iter(|| batch.verify().unwrap()));
    group.bench_function("verify_single_each", |b| {
        b.iter(|| {
            for block in &blocks {
                let key = &committee
                    .authority(block.block().author)
                    .unwrap()
                    .protocol_key;
                let digest = soma_types::Digest::of(&codec::encode(block.block()));
                assert!(key.verify(
                    soma_types::Domain::Block,
                    &digest,
                    &block.signed().signature
                ));
            }
        })
    });
    group.finish();
}

fn codec_large_block(c: &mut Criterion) {
    let sender = KeyPair::from_seed([1; 32]);
    let author = KeyPair::from_seed([2; 32]);
    let transactions = (0..1_000)
        .map(|i| Transaction::new(&sender, i, Bytes::from(vec![i as u8; 100])))
        .collect();
    let block = SignedBlock::new(
        Block {
            epoch: 0,
            round: 5,
            author: AuthorityIndex(0),
            timestamp_ms: 1,
            ancestors: vec![],
            transactions,
            commit_votes: vec![],
            end_of_epoch: None,
        },
        &author,
    );
    let bytes = Bytes::from(codec::encode(&block));
    let mut group = c.benchmark_group("block_1000_transactions");
    group.throughput(Throughput::Bytes(bytes.len() as u64));
    group.bench_function("encode", |b| b.iter(|| codec::encode(&block)));
    group.bench_function("decode", |b| {
        b.iter(|| codec::decode::<SignedBlock>(&bytes, 4 << 20).unwrap())
    });
    group.bench_function("decode_canonical_with_digests", |b| {
        b.iter(|| UnverifiedBlock::decode(bytes.clone(), 4 << 20).unwrap())
    });
    group.finish();
}

fn verify_100_commit_batch(c: &mut Criterion) {
    let chain = ChainBuilder::new(ChainConfig {
        transactions_per_block: 10,
        ..ChainConfig::validators(4)
    })
    .build(100);
    let committee = chain.genesis();
    let limits = Limits::default();
    let blocks = chain.block_count() as u64;
    let mut group = c.benchmark_group("batch_100_commits");
    group.throughput(Throughput::Elements(100));
    group.bench_function("commits_and_certificate", |b| {
        b.iter_batched(
            || chain.fetch_commits(1..=100),
            |(commits, certs)| {
                verify_commit_batch(commits, certs, committee, chain.commit_ref(0), &limits)
                    .unwrap()
            },
            BatchSize::SmallInput,
        )
    });
    for check_signatures in [true, false] {
        group.bench_function(
            format!("commits_and_{blocks}_blocks_signatures_{check_signatures}"),
            |b| {
                b.iter_batched(
                    || (chain.fetch_commits(1..=100), chain.fetch_blocks(1..=100)),
                    |((commits, certs), fetched)| {
                        let (commits, _) = verify_commit_batch(
                            commits,
                            certs,
                            committee,
                            chain.commit_ref(0),
                            &limits,
                        )
                        .unwrap();
                        let mut expected = ExpectedBlocks::new(&commits);
                        verify_fetched_blocks(
                            &mut expected,
                            fetched,
                            committee,
                            &limits,
                            check_signatures,
                        )
                        .unwrap();
                        expected.finish().unwrap();
                    },
                    BatchSize::SmallInput,
                )
            },
        );
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    targets = block_signatures, codec_large_block, verify_100_commit_batch
}
criterion_main!(benches);
