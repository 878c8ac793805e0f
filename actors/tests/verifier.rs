//! The Verifier actor on a real thread pool: honest data passes, each kind of
//! corruption fails with the error naming the bad item, committees switch at
//! epoch boundaries, and random bytes never crash it.

use actix::{Actor, Addr};
use bytes::Bytes;
use rand::{Rng, SeedableRng};
use soma_actors::verifier::{
    Config, Deps, InstallCommittee, Verifier, Verify, VerifyError, VerifyRequest, VerifyResponse,
};
use soma_actors::{Blob, DecodedBlock, HashedBlob};
use soma_chain::{Chain, ChainBuilder, ChainConfig, corrupt};
use soma_types::{
    CommitRef, Error, KeyPair, PeerId, SignedItem, Transaction, UnverifiedBlock, UnverifiedCommit,
};

fn chain() -> Chain {
    ChainBuilder::new(ChainConfig {
        commits_per_epoch: Some(120),
        ..ChainConfig::validators(4)
    })
    .build(150)
}

fn start(config: Config, chain: &Chain) -> Addr<Verifier> {
    let addr = Verifier::new(Deps::new(config, 1024), None)
        .unwrap()
        .start();
    addr.do_send(InstallCommittee(chain.genesis().clone()));
    addr
}

fn blobs_of_commits(commits: &[UnverifiedCommit]) -> Vec<Blob> {
    commits
        .iter()
        .map(|c| Blob(c.serialized().clone()))
        .collect()
}

fn blobs_of_blocks<B: From<Blob>>(blocks: &[UnverifiedBlock]) -> Vec<B> {
    blocks
        .iter()
        .map(|b| Blob(b.serialized().clone()).into())
        .collect()
}

fn commit_batch(
    commits: &[UnverifiedCommit],
    certifiers: &[UnverifiedBlock],
    last_synced: CommitRef,
) -> Verify {
    Verify(VerifyRequest::CommitBatch {
        epoch: 0,
        commits: blobs_of_commits(commits),
        certifiers: blobs_of_blocks(certifiers),
        last_synced,
    })
}

fn invalid(result: Result<VerifyResponse, VerifyError>) -> Error {
    match result {
        Err(VerifyError::Invalid(e)) => e,
        other => panic!("expected a rule error, got {other:?}"),
    }
}

#[actix_rt::test]
async fn certified_batch_of_100_commits_passes() {
    let chain = chain();
    let verifier = start(Config::default(), &chain);
    let (commits, certifiers) = chain.fetch_commits(1..=100);
    let result = verifier
        .send(commit_batch(&commits, &certifiers, chain.commit_ref(0)))
        .await
        .unwrap();
    let Ok(VerifyResponse::CommitBatch {
        commits,
        certifiers,
    }) = result
    else {
        panic!("batch refused: {result:?}");
    };
    assert_eq!(commits.len(), 100);
    assert_eq!(commits[99].reference(), chain.commit_ref(100));
    // A minimal quorum of the four votes sent: three of equal stakes.
    assert_eq!(certifiers.len(), 3);
}

#[actix_rt::test]
async fn corrupted_batches_fail_naming_the_bad_item() {
    let chain = chain();
    let verifier = start(Config::default(), &chain);
    let genesis = chain.commit_ref(0);
    let (commits, certifiers) = chain.fetch_commits(1..=100);

    let broken = corrupt::break_link(&commits, 40);
    let e = invalid(
        verifier
            .send(commit_batch(&broken, &certifiers, genesis))
            .await
            .unwrap(),
    );
    assert_eq!(e, Error::BrokenLink(41));

    let gap = corrupt::drop_commit(&commits, 10);
    let e = invalid(
        verifier
            .send(commit_batch(&gap, &certifiers, genesis))
            .await
            .unwrap(),
    );
    assert_eq!(
        e,
        Error::UnexpectedIndex {
            expected: 11,
            got: 12
        }
    );

    let short = corrupt::certificate_below_quorum(&certifiers, chain.genesis());
    let e = invalid(
        verifier
            .send(commit_batch(&commits, &short, genesis))
            .await
            .unwrap(),
    );
    assert!(matches!(e, Error::NotCertified { index: 100, .. }));

    let mut forged = certifiers.clone();
    forged[2] = corrupt::forge_signature(&forged[2].clone().into_trusted());
    let e = invalid(
        verifier
            .send(commit_batch(&commits, &forged, genesis))
            .await
            .unwrap(),
    );
    assert_eq!(
        e,
        Error::BadSignature(SignedItem::Block(forged[2].reference()))
    );

    // Blocks: one forged signature among 400, split across the pool.
    let mut blocks = chain.fetch_blocks(1..=100);
    let bad = corrupt::forge_signature(&blocks[333].clone().into_trusted());
    let bad_ref = bad.reference();
    blocks[333] = bad;
    let e = invalid(
        verifier
            .send(Verify(VerifyRequest::Blocks {
                epoch: 0,
                blocks: blobs_of_blocks(&blocks),
                check_signatures: true,
            }))
            .await
            .unwrap(),
    );
    assert_eq!(e, Error::BadSignature(SignedItem::Block(bad_ref)));

    // A forged transaction inside an otherwise valid, re-signed block.
    let honest = chain.blocks_of(7)[1].clone();
    let key = chain.config().protocol_key(0, honest.block().author.get());
    let bad = corrupt::resign(&honest, &key, |b| b.transactions[0].nonce += 1);
    let r = bad.reference();
    let e = invalid(
        verifier
            .send(Verify(VerifyRequest::Blocks {
                epoch: 0,
                blocks: blobs_of_blocks(&[bad]),
                check_signatures: true,
            }))
            .await
            .unwrap(),
    );
    assert_eq!(
        e,
        Error::BadSignature(SignedItem::Transaction { block: r, index: 0 })
    );
}

#[actix_rt::test]
async fn large_requests_split_across_threads_keep_order_and_name_items_globally() {
    let chain = chain();
    let verifier = start(
        Config {
            threads: 2,
            ..Config::default()
        },
        &chain,
    );
    let blocks = chain.fetch_blocks(1..=100);
    let Ok(VerifyResponse::Blocks(verified)) = verifier
        .send(Verify(VerifyRequest::Blocks {
            epoch: 0,
            blocks: blobs_of_blocks(&blocks),
            check_signatures: true,
        }))
        .await
        .unwrap()
    else {
        panic!("honest blocks refused");
    };
    let refs: Vec<_> = verified.iter().map(|b| b.reference()).collect();
    let expected: Vec<_> = blocks.iter().map(UnverifiedBlock::reference).collect();
    assert_eq!(refs, expected);

    let sender = KeyPair::from_seed([5; 32]);
    let mut txs: Vec<Transaction> = (0..100)
        .map(|i| Transaction::new(&sender, i, Bytes::from(vec![1; 8])))
        .collect();
    txs[77].nonce = 1_000;
    let blobs = txs
        .iter()
        .map(|t| Blob::from(soma_types::codec::encode(t)))
        .collect();
    let e = invalid(
        verifier
            .send(Verify(VerifyRequest::Transactions {
                transactions: blobs,
            }))
            .await
            .unwrap(),
    );
    assert_eq!(e, Error::BadSignature(SignedItem::LooseTransaction(77)));
}

#[actix_rt::test]
async fn committees_switch_at_the_epoch_boundary() {
    let chain = chain();
    let verifier = start(Config::default(), &chain);
    let first_of_epoch_1 = chain.epoch_last(0).unwrap() + 1;
    let epoch_1_blocks: Vec<_> = chain
        .blocks_of(first_of_epoch_1 + 5)
        .iter()
        .map(|b| b.to_unverified())
        .collect();
    let request = |epoch| {
        Verify(VerifyRequest::Blocks {
            epoch,
            blocks: blobs_of_blocks(&epoch_1_blocks),
            check_signatures: true,
        })
    };
    assert_eq!(
        verifier.send(request(1)).await.unwrap().err(),
        Some(VerifyError::UnknownEpoch(1))
    );
    // Checked against epoch 0's committee, they are of the wrong epoch.
    assert!(matches!(
        invalid(verifier.send(request(0)).await.unwrap()),
        Error::WrongEpoch { .. }
    ));
    verifier.do_send(InstallCommittee(chain.committee(1).unwrap().clone()));
    assert!(verifier.send(request(1)).await.unwrap().is_ok());
    // Epoch 0 is still checkable with its own committee.
    let (commits, certifiers) = chain.fetch_commits(1..=10);
    assert!(
        verifier
            .send(commit_batch(&commits, &certifiers, chain.commit_ref(0)))
            .await
            .unwrap()
            .is_ok()
    );
}

#[actix_rt::test]
async fn full_queue_refuses_with_busy() {
    let chain = chain();
    let verifier = start(
        Config {
            queue_capacity: 1,
            ..Config::default()
        },
        &chain,
    );
    let blocks = blobs_of_blocks(&chain.fetch_blocks(1..=100));
    let request = || {
        Verify(VerifyRequest::Blocks {
            epoch: 0,
            blocks: blocks.clone(),
            check_signatures: true,
        })
    };
    // Both requests are in the mailbox before the first job can finish.
    let (first, second) = tokio::join!(verifier.send(request()), verifier.send(request()));
    assert!(first.unwrap().is_ok());
    assert_eq!(
        second.unwrap().err(),
        Some(VerifyError::Busy { capacity: 1 })
    );
    // Once the first is done, there is room again.
    assert!(verifier.send(request()).await.unwrap().is_ok());
}

#[actix_rt::test]
async fn ten_thousand_random_byte_strings_never_crash_it() {
    let chain = chain();
    let verifier = start(Config::default(), &chain);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(99);
    let mut random_blobs = |n: usize| -> Vec<Blob> {
        (0..n)
            .map(|_| {
                let len = rng.random_range(0..600);
                Blob::from((0..len).map(|_| rng.random::<u8>()).collect::<Vec<u8>>())
            })
            .collect()
    };
    let mut sent = 0;
    for round in 0..25 {
        let requests = [
            VerifyRequest::Blocks {
                epoch: 0,
                blocks: random_blobs(100)
                    .into_iter()
                    .map(HashedBlob::from)
                    .collect(),
                check_signatures: round % 2 == 0,
            },
            VerifyRequest::CommitBatch {
                epoch: 0,
                commits: random_blobs(50),
                certifiers: random_blobs(50),
                last_synced: chain.commit_ref(0),
            },
            VerifyRequest::NodeInfos {
                infos: random_blobs(100),
                now_ms: 1_700_000_000_000,
                local: PeerId([0; 32]),
                allowlist: None,
            },
            VerifyRequest::Transactions {
                transactions: random_blobs(100),
            },
        ];
        for request in requests {
            sent += request.items();
            match verifier.send(Verify(request)).await.unwrap() {
                Err(VerifyError::Invalid(_)) => {}
                Ok(VerifyResponse::NodeInfos(results)) => {
                    assert!(results.iter().all(Result::is_err));
                }
                other => panic!("random bytes were not refused: {other:?}"),
            }
        }
    }
    assert_eq!(sent, 10_000);
    // Still alive and correct.
    let (commits, certifiers) = chain.fetch_commits(1..=20);
    assert!(
        verifier
            .send(commit_batch(&commits, &certifiers, chain.commit_ref(0)))
            .await
            .unwrap()
            .is_ok()
    );
}

#[actix_rt::test]
async fn block_requests_that_wait_for_a_thread_are_verified_together_and_answered_apart() {
    let chain = chain();
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("verifier.jsonl");
    let verifier = Verifier::new(
        Deps::new(
            Config {
                threads: 1,
                ..Config::default()
            },
            1024,
        ),
        Some(soma_actors::replay::Recorder::to_file(&trace).unwrap()),
    )
    .unwrap()
    .start();
    verifier.do_send(InstallCommittee(chain.genesis().clone()));
    let of = |commits: std::ops::RangeInclusive<u64>| chain.fetch_blocks(commits);
    let mut forged = of(21..=30);
    let bad = corrupt::forge_signature(&forged[17].clone().into_trusted());
    let bad_ref = bad.reference();
    forged[17] = bad;
    let request = |blocks: &[UnverifiedBlock]| {
        verifier.send(Verify(VerifyRequest::Blocks {
            epoch: 0,
            blocks: blobs_of_blocks(blocks),
            check_signatures: true,
        }))
    };
    // All four are in the mailbox before the first job can report its
    // end, so the last three wait for the one thread and run as one job.
    let (first, second, third, fourth) = tokio::join!(
        request(&of(1..=10)),
        request(&of(11..=20)),
        request(&forged),
        request(&of(31..=40)),
    );
    for (answer, commits) in [(first, 1..=10), (second, 11..=20), (fourth, 31..=40)] {
        let Ok(VerifyResponse::Blocks(verified)) = answer.unwrap() else {
            panic!("honest blocks refused");
        };
        let got: Vec<_> = verified.iter().map(|b| b.reference()).collect();
        let expected: Vec<_> = of(commits).iter().map(UnverifiedBlock::reference).collect();
        assert_eq!(got, expected);
    }
    // The forged block fails its own request, as it would alone.
    assert_eq!(
        invalid(third.unwrap()),
        Error::BadSignature(SignedItem::Block(bad_ref))
    );
    let runs: Vec<serde_json::Value> = std::fs::read_to_string(&trace)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter_map(|l| l["out"]["run"].get("requests").cloned())
        .collect();
    assert_eq!(runs, [serde_json::json!([0]), serde_json::json!([1, 2, 3])]);
}

/// The blocks as sync hands them: decoded where they arrived.
fn decoded(blocks: &[UnverifiedBlock], signatures: bool) -> Vec<DecodedBlock> {
    blocks
        .iter()
        .map(|b| {
            let hashed = HashedBlob::new(b.serialized().clone());
            DecodedBlock::decode(&hashed, usize::MAX, signatures).unwrap()
        })
        .collect()
}

/// An answer as what can be compared: the verified blocks' bytes, or the
/// error.
fn outcome(answer: Result<VerifyResponse, VerifyError>) -> Result<Vec<Bytes>, VerifyError> {
    match answer {
        Ok(VerifyResponse::Blocks(blocks)) => {
            Ok(blocks.iter().map(|b| b.serialized().clone()).collect())
        }
        Ok(other) => panic!("not blocks: {other:?}"),
        Err(e) => Err(e),
    }
}

#[actix_rt::test]
async fn blocks_decoded_where_they_arrived_get_exactly_the_answer_of_their_bytes() {
    let chain = chain();
    let verifier = start(Config::default(), &chain);
    let honest = chain.fetch_blocks(1..=30);
    let mut forged_block = honest.clone();
    forged_block[57] = corrupt::forge_signature(&forged_block[57].clone().into_trusted());
    let mut forged_transaction = honest.clone();
    let key = chain
        .config()
        .protocol_key(0, forged_transaction[33].block().author.get());
    forged_transaction[33] =
        corrupt::resign(&forged_transaction[33].clone().into_trusted(), &key, |b| {
            b.transactions[1].nonce += 1
        });
    let first_of_epoch_1 = chain.epoch_last(0).unwrap() + 1;
    let other_epoch: Vec<_> = chain
        .blocks_of(first_of_epoch_1)
        .iter()
        .map(|b| b.to_unverified())
        .collect();
    let mut cases = 0;
    for blocks in [&honest, &forged_block, &forged_transaction, &other_epoch] {
        for check_signatures in [true, false] {
            // Decoded with or without the signatures' digests: these are
            // computed when needed.
            for digests in [true, false] {
                let as_bytes = verifier
                    .send(Verify(VerifyRequest::Blocks {
                        epoch: 0,
                        blocks: blobs_of_blocks(blocks),
                        check_signatures,
                    }))
                    .await
                    .unwrap();
                let as_decoded = verifier
                    .send(Verify(VerifyRequest::DecodedBlocks {
                        epoch: 0,
                        blocks: decoded(blocks, digests),
                        check_signatures,
                    }))
                    .await
                    .unwrap();
                assert_eq!(outcome(as_decoded), outcome(as_bytes));
                cases += 1;
            }
        }
    }
    assert_eq!(cases, 16);
    // What each case gave, for the record: the honest blocks pass, a
    // forged block or transaction fails naming it when signatures are
    // checked, a block of another epoch always fails.
    let answer = |blocks: &[UnverifiedBlock], check_signatures| {
        verifier.send(Verify(VerifyRequest::DecodedBlocks {
            epoch: 0,
            blocks: decoded(blocks, true),
            check_signatures,
        }))
    };
    let sent: Vec<Bytes> = honest.iter().map(|b| b.serialized().clone()).collect();
    assert_eq!(outcome(answer(&honest, true).await.unwrap()), Ok(sent));
    assert_eq!(
        invalid(answer(&forged_block, true).await.unwrap()),
        Error::BadSignature(SignedItem::Block(forged_block[57].reference()))
    );
    assert_eq!(
        invalid(answer(&forged_transaction, true).await.unwrap()),
        Error::BadSignature(SignedItem::Transaction {
            block: forged_transaction[33].reference(),
            index: 1
        })
    );
    assert!(outcome(answer(&forged_transaction, false).await.unwrap()).is_ok());
    assert!(matches!(
        invalid(answer(&other_epoch, false).await.unwrap()),
        Error::WrongEpoch { .. }
    ));
}

#[actix_rt::test]
async fn decoded_blocks_are_held_to_the_verifiers_size_limit_like_their_bytes() {
    let chain = chain();
    let blocks = chain.fetch_blocks(1..=10);
    let mut sizes: Vec<usize> = blocks.iter().map(|b| b.serialized().len()).collect();
    sizes.sort_unstable();
    // The largest blocks are over the Verifier's limit; they were decoded
    // with none.
    let limit = sizes[sizes.len() - 1] - 1;
    let verifier = start(
        Config {
            limits: soma_types::Limits {
                max_block_bytes: limit,
                ..soma_types::Limits::default()
            },
            ..Config::default()
        },
        &chain,
    );
    let as_bytes = verifier
        .send(Verify(VerifyRequest::Blocks {
            epoch: 0,
            blocks: blobs_of_blocks(&blocks),
            check_signatures: true,
        }))
        .await
        .unwrap();
    let as_decoded = verifier
        .send(Verify(VerifyRequest::DecodedBlocks {
            epoch: 0,
            blocks: decoded(&blocks, true),
            check_signatures: true,
        }))
        .await
        .unwrap();
    let first_over = blocks
        .iter()
        .map(|b| b.serialized().len())
        .find(|len| *len > limit)
        .unwrap();
    assert_eq!(
        invalid(as_decoded),
        Error::TooLarge {
            len: first_over,
            limit
        }
    );
    assert_eq!(
        invalid(as_bytes),
        Error::TooLarge {
            len: first_over,
            limit
        }
    );
}
