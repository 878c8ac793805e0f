//! Each verification rule of the design: a valid case passes, and a case
//! that breaks exactly that rule fails with that rule's error.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use bytes::Bytes;
use soma_chain::{Chain, ChainBuilder, ChainConfig, corrupt};
use soma_types::verify::{
    ExpectedBlocks, NodeInfoPolicy, RefusedRun, certify_commit_run, epoch_change, verify_blocks,
    verify_commit_batch, verify_fetched_blocks, verify_node_infos, verify_transactions,
};
use soma_types::{
    Access, AuthorityIndex, BlockRef, Domain, Error, KeyCache, KeyPair, Limits, NodeInfo, PeerId,
    SignedBlock, SignedItem, SignedNodeInfo, Transaction, TrustedCommit, UnverifiedBlock,
    VerifiedBlock,
};

fn chain() -> Chain {
    ChainBuilder::new(ChainConfig {
        commits_per_epoch: Some(30),
        ..ChainConfig::validators(4)
    })
    .build(40)
}

/// A block from the middle of the chain (round > 1, epoch 0).
fn some_block(chain: &Chain) -> VerifiedBlock {
    chain.blocks_of(10)[2].clone()
}

fn key_of(chain: &Chain, block: &VerifiedBlock) -> KeyPair {
    let b = block.block();
    chain.config().protocol_key(b.epoch, b.author.get())
}

fn verify_one(chain: &Chain, block: UnverifiedBlock) -> Result<(), Error> {
    verify_blocks(vec![block], chain.genesis(), &Limits::default()).map(|_| ())
}

// ---- blocks ----

#[test]
fn valid_block_passes() {
    let chain = chain();
    let block = some_block(&chain);
    assert_eq!(verify_one(&chain, block.to_unverified()), Ok(()));
}

#[test]
fn forged_block_signature_fails() {
    let chain = chain();
    let forged = corrupt::forge_signature(&some_block(&chain));
    let r = forged.reference();
    assert_eq!(
        verify_one(&chain, forged),
        Err(Error::BadSignature(SignedItem::Block(r)))
    );
}

#[test]
fn block_signed_by_another_authority_fails() {
    let chain = chain();
    let block = some_block(&chain);
    let wrong_key = chain
        .config()
        .protocol_key(0, (block.block().author.get() + 1) % 4);
    let forged = corrupt::resign(&block, &wrong_key, |_| {});
    let r = forged.reference();
    assert_eq!(
        verify_one(&chain, forged),
        Err(Error::BadSignature(SignedItem::Block(r)))
    );
}

#[test]
fn block_by_an_author_with_a_weak_key_fails() {
    // The identity point is of small order: with it as the author's key,
    // any signature whose R is s·B would pass a plain verification.
    let chain = chain();
    let block = some_block(&chain);
    let author = block.block().author;
    let mut identity = [0u8; 32];
    identity[0] = 1;
    let weak = soma_types::PublicKey::from_bytes(&identity).expect("a point");
    let authorities = chain
        .genesis()
        .authorities()
        .map(|(i, a)| soma_types::Authority {
            protocol_key: if i == author { weak } else { a.protocol_key },
            ..a.clone()
        })
        .collect();
    let committee = soma_types::Committee::new(0, authorities).expect("a committee");
    let r = block.reference();
    assert_eq!(
        verify_blocks(vec![block.to_unverified()], &committee, &Limits::default()).map(|_| ()),
        Err(Error::WeakKey(SignedItem::Block(r)))
    );
}

#[test]
fn block_of_wrong_epoch_fails() {
    let chain = chain();
    let block = some_block(&chain);
    let bad = corrupt::resign(&block, &key_of(&chain, &block), |b| {
        b.epoch = 1;
        for a in &mut b.ancestors {
            a.epoch = 1;
        }
    });
    assert!(matches!(
        verify_one(&chain, bad),
        Err(Error::WrongEpoch {
            got: 1,
            expected: 0,
            ..
        })
    ));
}

#[test]
fn block_at_genesis_round_fails() {
    let chain = chain();
    let block = some_block(&chain);
    let bad = corrupt::resign(&block, &key_of(&chain, &block), |b| b.round = 0);
    assert!(matches!(
        verify_one(&chain, bad),
        Err(Error::GenesisRound(_))
    ));
}

#[test]
fn block_by_unknown_author_fails() {
    let chain = chain();
    let block = some_block(&chain);
    let bad = corrupt::resign(&block, &key_of(&chain, &block), |b| {
        b.author = AuthorityIndex(9)
    });
    assert!(matches!(
        verify_one(&chain, bad),
        Err(Error::UnknownAuthor {
            author: AuthorityIndex(9),
            ..
        })
    ));
}

#[test]
fn block_without_ancestors_fails() {
    let chain = chain();
    let block = some_block(&chain);
    let bad = corrupt::resign(&block, &key_of(&chain, &block), |b| b.ancestors.clear());
    assert!(matches!(
        verify_one(&chain, bad),
        Err(Error::NoAncestors(_))
    ));
}

#[test]
fn block_with_more_ancestors_than_authorities_fails() {
    let chain = chain();
    let block = some_block(&chain);
    let bad = corrupt::resign(&block, &key_of(&chain, &block), |b| {
        let extra = b.ancestors[1];
        b.ancestors.push(extra);
    });
    assert!(matches!(
        verify_one(&chain, bad),
        Err(Error::TooManyAncestors(_))
    ));
}

#[test]
fn block_with_duplicate_ancestor_authors_fails() {
    let chain = chain();
    let block = some_block(&chain);
    let bad = corrupt::resign(&block, &key_of(&chain, &block), |b| {
        let mut twin = b.ancestors[1];
        twin.round -= 1;
        twin.digest.0[0] ^= 1;
        b.ancestors[2] = twin;
    });
    assert!(matches!(
        verify_one(&chain, bad),
        Err(Error::DuplicateAncestorAuthor { .. })
    ));
}

#[test]
fn block_with_ancestor_at_its_own_round_fails() {
    let chain = chain();
    let block = some_block(&chain);
    let bad = corrupt::resign(&block, &key_of(&chain, &block), |b| {
        b.ancestors[1].round = b.round
    });
    assert!(matches!(
        verify_one(&chain, bad),
        Err(Error::InvalidAncestor { .. })
    ));
}

#[test]
fn block_not_listing_own_ancestor_first_fails() {
    let chain = chain();
    let block = some_block(&chain);
    let bad = corrupt::resign(&block, &key_of(&chain, &block), |b| b.ancestors.swap(0, 1));
    assert!(matches!(
        verify_one(&chain, bad),
        Err(Error::OwnAncestorNotFirst(_))
    ));
}

#[test]
fn block_missing_quorum_of_ancestors_fails() {
    let chain = chain();
    let block = some_block(&chain);
    // Own block and one other: stake 2 of 4, quorum is 3.
    let bad = corrupt::resign(&block, &key_of(&chain, &block), |b| b.ancestors.truncate(2));
    assert!(matches!(
        verify_one(&chain, bad),
        Err(Error::AncestorsBelowQuorum {
            stake: 2,
            quorum: 3,
            ..
        })
    ));
}

#[test]
fn block_over_transaction_limit_fails() {
    let chain = chain();
    let block = some_block(&chain);
    let limits = Limits {
        max_transactions_per_block: 1,
        ..Limits::default()
    };
    let result = verify_blocks(vec![block.to_unverified()], chain.genesis(), &limits);
    assert!(matches!(
        result,
        Err(Error::TooManyTransactions {
            count: 2,
            limit: 1,
            ..
        })
    ));
}

#[test]
fn block_with_forged_transaction_fails() {
    let chain = chain();
    let block = some_block(&chain);
    let bad = corrupt::resign(&block, &key_of(&chain, &block), |b| {
        b.transactions[1].payload = Bytes::from_static(b"changed after signing")
    });
    let r = bad.reference();
    assert_eq!(
        verify_one(&chain, bad),
        Err(Error::BadSignature(SignedItem::Transaction {
            block: r,
            index: 1
        }))
    );
}

#[test]
fn block_signature_replayed_from_another_domain_fails() {
    let chain = chain();
    let block = some_block(&chain);
    let key = key_of(&chain, &block);
    // The author signs the block's exact encoding, but as a transaction.
    let mut signed = block.signed().clone();
    signed.signature = key.sign(Domain::Transaction, &signed.block);
    let bad = UnverifiedBlock::from_signed(signed.clone());
    assert!(matches!(
        verify_one(&chain, bad),
        Err(Error::BadSignature(SignedItem::Block(_)))
    ));
    // And the genuine block signature does not pass as a node info's.
    signed.signature = key.sign(Domain::Block, &signed.block);
    assert!(!key.public().verify(
        Domain::NodeInfo,
        &soma_types::Digest::of(&soma_types::codec::encode(&signed.block)),
        &signed.signature
    ));
    assert_eq!(
        verify_one(&chain, UnverifiedBlock::from_signed(signed)),
        Ok(())
    );
}

// ---- transactions ----

#[test]
fn transactions_verify_and_name_the_bad_one() {
    let sender = KeyPair::from_seed([3; 32]);
    let mut txs: Vec<_> = (0..5)
        .map(|i| Transaction::new(&sender, i, Bytes::from(vec![i as u8; 10])))
        .collect();
    assert_eq!(verify_transactions(&txs, &Limits::default()), Ok(()));
    txs[3].nonce = 99;
    assert_eq!(
        verify_transactions(&txs, &Limits::default()),
        Err(Error::BadSignature(SignedItem::LooseTransaction(3)))
    );
}

#[test]
fn oversize_transaction_payload_fails() {
    let sender = KeyPair::from_seed([3; 32]);
    let tx = Transaction::new(&sender, 1, Bytes::from(vec![0; 101]));
    let limits = Limits {
        max_transaction_payload_bytes: 100,
        ..Limits::default()
    };
    assert_eq!(
        verify_transactions(&[tx], &limits),
        Err(Error::PayloadTooLarge {
            len: 101,
            limit: 100
        })
    );
}

// ---- commit batches ----

fn verify_batch_from(
    chain: &Chain,
    commits: Vec<soma_types::UnverifiedCommit>,
    certifiers: Vec<UnverifiedBlock>,
    start: u64,
) -> Result<(), Error> {
    verify_commit_batch(
        commits,
        certifiers,
        chain.committee_of(start),
        chain.commit_ref(start - 1),
        &Limits::default(),
    )
    .map(|_| ())
}

#[test]
fn certified_commit_batch_passes() {
    let chain = chain();
    let (commits, certifiers) = chain.fetch_commits(1..=20);
    let (trusted, cert) = verify_commit_batch(
        commits,
        certifiers,
        chain.genesis(),
        chain.commit_ref(0),
        &Limits::default(),
    )
    .unwrap();
    assert_eq!(trusted.last().unwrap().reference(), chain.commit_ref(20));
    // Of the four votes, a minimal quorum of equal stakes: the first three.
    let kept: Vec<_> = cert.iter().map(|b| b.reference()).collect();
    let sent: Vec<_> = chain
        .certificate(20)
        .iter()
        .map(|b| b.reference())
        .collect();
    assert_eq!(kept, sent[..3]);
}

/// Certifiers past a minimal quorum of votes for the last commit are
/// padding: neither checked nor kept. A retired validator's junk block
/// of thousands of transactions, or a forged one, past the quorum costs
/// nothing; nor does a block that votes for something else, wherever it
/// stands in the list.
#[test]
fn certifiers_past_a_minimal_quorum_are_neither_checked_nor_kept() {
    let chain = chain();
    let (commits, certifiers) = chain.fetch_commits(1..=20);
    let voters: Vec<_> = certifiers[..3].iter().map(|b| b.reference()).collect();
    let kept = |certifiers: Vec<_>| {
        let (_, kept) = verify_commit_batch(
            commits.clone(),
            certifiers,
            chain.genesis(),
            chain.commit_ref(0),
            &Limits::default(),
        )
        .unwrap();
        kept.iter().map(|b| b.reference()).collect::<Vec<_>>()
    };
    // A forged fourth vote.
    let mut forged = certifiers.clone();
    forged[3] = corrupt::forge_signature(&forged[3].clone().into_trusted());
    assert_eq!(kept(forged), voters);
    // A block voting for nothing of this batch (one of the chain's), sent
    // first, in the fourth vote's place.
    let stranger = chain.blocks_of(2)[0].to_unverified();
    assert!(
        !stranger
            .block()
            .commit_votes
            .contains(&chain.commit_ref(20))
    );
    let mut padded = certifiers[..3].to_vec();
    padded.insert(0, stranger);
    assert_eq!(kept(padded), voters);
}

#[test]
fn empty_and_overlong_batches_fail() {
    let chain = chain();
    assert_eq!(
        verify_batch_from(&chain, vec![], vec![], 1),
        Err(Error::EmptyBatch)
    );
    let (commits, certifiers) = chain.fetch_commits(1..=20);
    let result = verify_commit_batch(
        commits,
        certifiers,
        chain.genesis(),
        chain.commit_ref(0),
        &Limits {
            max_commits_per_batch: 10,
            ..Limits::default()
        },
    );
    assert_eq!(
        result.err(),
        Some(Error::BatchTooLong { len: 20, limit: 10 })
    );
}

#[test]
fn broken_digest_link_fails() {
    let chain = chain();
    let (commits, certifiers) = chain.fetch_commits(1..=20);
    let broken = corrupt::break_link(&commits, 7);
    assert_eq!(
        verify_batch_from(&chain, broken, certifiers, 1),
        Err(Error::BrokenLink(8))
    );
}

#[test]
fn first_commit_not_linking_to_our_last_fails() {
    let chain = chain();
    let (commits, certifiers) = chain.fetch_commits(11..=20);
    // We are at commit 10, but believe a different digest for it.
    let mut ours = chain.commit_ref(10);
    ours.digest.0[5] ^= 1;
    let result = verify_commit_batch(
        commits.clone(),
        certifiers.clone(),
        chain.genesis(),
        ours,
        &Limits::default(),
    );
    assert_eq!(result.err(), Some(Error::BrokenLink(11)));
    // Or we are at commit 9: the batch does not start where we asked.
    let result = verify_commit_batch(
        commits,
        certifiers,
        chain.genesis(),
        chain.commit_ref(9),
        &Limits::default(),
    );
    assert_eq!(
        result.err(),
        Some(Error::UnexpectedIndex {
            expected: 10,
            got: 11
        })
    );
}

#[test]
fn the_next_epochs_commits_after_a_forged_continuation_are_named_of_their_epoch() {
    // Epoch 0 ends at commit 30. A retired committee certified a commit 31
    // of epoch 0 continuing it, verified before the end was applied: what
    // we take for our last commit is that forgery, and epoch 0 is still
    // the one expected. The true commits from 31 (this test's from 32 are
    // the same case) are of epoch 1 and do not link to the forgery: they
    // are named of another epoch, a claim the caller judges once the end
    // is applied, not a broken link blamed on their honest sender.
    let chain = chain();
    assert_eq!(chain.epoch_last(0), Some(30));
    let (commits, certifiers) = chain.fetch_commits(32..=35);
    let forged = soma_types::CommitRef {
        index: 31,
        digest: soma_types::Digest([7; 32]),
    };
    let result = verify_commit_batch(
        commits,
        certifiers,
        chain.committee_of(30),
        forged,
        &Limits::default(),
    );
    assert_eq!(
        result.err(),
        Some(Error::CommitWrongEpoch {
            index: 32,
            got: 1,
            expected: 0
        })
    );
}

/// What a verification accepted, as bytes: commits then certifier blocks.
type Accepted = Result<(Vec<Bytes>, Vec<Bytes>), Error>;

fn accepted(result: Result<(Vec<TrustedCommit>, Vec<VerifiedBlock>), Error>) -> Accepted {
    result.map(|(commits, certifiers)| {
        (
            commits.iter().map(|c| c.serialized().clone()).collect(),
            certifiers.iter().map(|b| b.serialized().clone()).collect(),
        )
    })
}

#[test]
fn a_run_certified_ahead_then_linked_is_exactly_the_batch_verified_in_turn() {
    // Every batch of a chain over an epoch change, whole or corrupted, under
    // each committee, after the right commit and after wrong ones: a run
    // certified ahead and linked at its turn is accepted exactly when the
    // batch is verified in turn, as the same commits and certifier blocks,
    // and a run refused ahead gives at its turn the error the batch
    // verified in turn gives.
    let chain = chain();
    let limits = Limits::default();
    // Shared by every batch, as the Verifier shares it: a key decompressed
    // for one batch is reused by the next.
    let keys = Arc::new(KeyCache::new(64));
    let mut accepted_count = 0;
    let mut refused_count = 0;
    let mut standing_count = 0;
    for start in (1..=31).step_by(10) {
        let (commits, certifiers) = chain.fetch_commits(start..=start + 9);
        let certifiers_short =
            corrupt::certificate_below_quorum(&certifiers, chain.committee_of(start + 9));
        // A certifier validly signed by its author over a transaction whose
        // sender's signature is wrong: refused by the signer keys' path,
        // cached (ahead) or not (in turn).
        let mut forged_transaction = certifiers.clone();
        let mut signed = forged_transaction[0].signed().clone();
        signed.block.transactions[0].signature.0[0] ^= 1;
        let author = chain
            .config()
            .protocol_key(signed.block.epoch, signed.block.author.get());
        forged_transaction[0] =
            UnverifiedBlock::from_signed(SignedBlock::new(signed.block, &author));
        let batches = [
            (commits.clone(), certifiers.clone()),
            (corrupt::break_link(&commits, 4), certifiers.clone()),
            (corrupt::drop_commit(&commits, 0), certifiers.clone()),
            (commits.clone(), certifiers_short),
            (commits.clone(), forged_transaction),
        ];
        let mut other_digest = chain.commit_ref(start - 1);
        other_digest.digest.0[0] ^= 1;
        let afters = [
            chain.commit_ref(start - 1),
            other_digest,
            chain.commit_ref(start),
        ];
        for (commits, certifiers) in &batches {
            for committee in chain.committees() {
                for after in afters {
                    let in_turn = accepted(verify_commit_batch(
                        commits.clone(),
                        certifiers.clone(),
                        committee,
                        after,
                        &limits,
                    ));
                    // Refused ahead: the verdict kept for its turn, and none
                    // for a turn after another commit than the one before
                    // its start.
                    let ahead = accepted(
                        match certify_commit_run(
                            commits.clone(),
                            certifiers.clone(),
                            committee,
                            after.index + 1,
                            &limits,
                            Some(&keys),
                        ) {
                            Ok(run) => {
                                assert_eq!(run.epoch(), committee.epoch());
                                run.link(after)
                            }
                            Err(e) => {
                                let refused = RefusedRun::new(
                                    commits.first().cloned(),
                                    after.index + 1,
                                    committee.epoch(),
                                    e,
                                );
                                assert_eq!(
                                    refused.verdict(chain.commit_ref(after.index + 1)),
                                    None
                                );
                                refused_count += 1;
                                // Judged at once only where no commit before
                                // its start could make it pass: refused in
                                // turn after each one tried there.
                                if refused.stands_alone() {
                                    standing_count += 1;
                                    for other in afters.iter().filter(|a| a.index == after.index) {
                                        let checked = verify_commit_batch(
                                            commits.clone(),
                                            certifiers.clone(),
                                            committee,
                                            *other,
                                            &limits,
                                        );
                                        assert!(checked.is_err(), "batch {start}, {other:?}");
                                    }
                                }
                                Err(refused.verdict(after).expect("after the commit before"))
                            }
                        },
                    );
                    assert_eq!(in_turn, ahead, "batch {start}, {after:?}");
                    accepted_count += usize::from(in_turn.is_ok());
                }
            }
        }
    }
    // Under its own epoch's committee: each whole batch after the commit
    // before it, and each batch without its first commit after that commit.
    assert_eq!(accepted_count, 8);
    // 4 starts × 5 batches × 2 committees × 3 commits before, less the 8
    // accepted and the 4 whole batches under their own committee after a
    // commit of another digest, refused only for their first link (a run
    // passes without it): 108 refused ahead, each verdict the in-turn one.
    assert_eq!(chain.committees().count(), 2);
    assert_eq!(refused_count, 108);
    // Standing whatever comes before: the refusals under the committee of
    // the epoch the batch's first commit names, one committee of the two
    // for each of the 20 batches, after each of 3 commits (60), less the 8
    // accepted and the 4 certified only to fail their link.
    assert_eq!(standing_count, 48);
}

#[test]
fn a_run_certified_ahead_is_refused_at_its_turn_if_it_does_not_follow_our_last_commit() {
    let chain = chain();
    let (commits, certifiers) = chain.fetch_commits(11..=20);
    let certify = || {
        certify_commit_run(
            commits.clone(),
            certifiers.clone(),
            chain.genesis(),
            11,
            &Limits::default(),
            None,
        )
        .unwrap()
    };
    let mut ours = chain.commit_ref(10);
    ours.digest.0[5] ^= 1;
    assert_eq!(certify().link(ours).err(), Some(Error::BrokenLink(11)));
    assert_eq!(
        certify().link(chain.commit_ref(9)).err(),
        Some(Error::UnexpectedIndex {
            expected: 10,
            got: 11
        })
    );
    let (trusted, _) = certify().link(chain.commit_ref(10)).unwrap();
    assert_eq!(trusted.last().unwrap().reference(), chain.commit_ref(20));
    // Certified from the wrong first index: refused before any link.
    let wrong_start = certify_commit_run(
        commits.clone(),
        certifiers.clone(),
        chain.genesis(),
        12,
        &Limits::default(),
        None,
    );
    assert_eq!(
        wrong_start.err(),
        Some(Error::UnexpectedIndex {
            expected: 12,
            got: 11
        })
    );
}

#[test]
fn gap_in_batch_fails() {
    let chain = chain();
    let (commits, certifiers) = chain.fetch_commits(1..=20);
    assert_eq!(
        verify_batch_from(&chain, corrupt::drop_commit(&commits, 4), certifiers, 1),
        Err(Error::UnexpectedIndex {
            expected: 5,
            got: 6
        })
    );
}

#[test]
fn certificate_one_vote_short_fails() {
    let chain = chain();
    let (commits, certifiers) = chain.fetch_commits(1..=20);
    let short = corrupt::certificate_below_quorum(&certifiers, chain.genesis());
    assert_eq!(short.len(), 2);
    assert_eq!(
        verify_batch_from(&chain, commits, short, 1),
        Err(Error::NotCertified {
            index: 20,
            stake: 2,
            quorum: 3
        })
    );
}

#[test]
fn duplicate_votes_from_one_authority_count_once() {
    let chain = chain();
    let (commits, certifiers) = chain.fetch_commits(1..=20);
    let mut short = corrupt::certificate_below_quorum(&certifiers, chain.genesis());
    // A second, validly signed block by an authority that already voted.
    let voter = short[0].clone().into_trusted();
    let twin = corrupt::resign(&voter, &key_of(&chain, &voter), |b| b.timestamp_ms += 1);
    short.push(twin);
    assert!(matches!(
        verify_batch_from(&chain, commits, short, 1),
        Err(Error::NotCertified { stake: 2, .. })
    ));
}

#[test]
fn votes_for_another_commit_do_not_certify() {
    let chain = chain();
    let (commits, _) = chain.fetch_commits(1..=20);
    let (_, other_certifiers) = chain.fetch_commits(1..=19);
    assert!(matches!(
        verify_batch_from(&chain, commits, other_certifiers, 1),
        Err(Error::NotCertified { stake: 0, .. })
    ));
}

#[test]
fn forged_certifier_signature_fails() {
    let chain = chain();
    let (commits, mut certifiers) = chain.fetch_commits(1..=20);
    certifiers[1] = corrupt::forge_signature(&certifiers[1].clone().into_trusted());
    let r = certifiers[1].reference();
    assert_eq!(
        verify_batch_from(&chain, commits, certifiers, 1),
        Err(Error::BadSignature(SignedItem::Block(r)))
    );
}

#[test]
fn padded_certificate_fails() {
    let chain = chain();
    let (commits, mut certifiers) = chain.fetch_commits(1..=20);
    certifiers.push(certifiers[0].clone());
    assert_eq!(
        verify_batch_from(&chain, commits, certifiers, 1),
        Err(Error::TooManyCertifiers { count: 5, limit: 4 })
    );
}

#[test]
fn commit_of_another_epoch_fails() {
    let chain = chain();
    let (mut commits, certifiers) = chain.fetch_commits(1..=1);
    commits[0] = corrupt::edit_commit(&commits[0], |c| c.epoch = 1);
    assert_eq!(
        verify_batch_from(&chain, commits, certifiers, 1),
        Err(Error::CommitWrongEpoch {
            index: 1,
            got: 1,
            expected: 0
        })
    );
}

#[test]
fn a_block_named_by_two_commits_of_a_batch_fails() {
    // A block is committed once. A batch naming one twice (a forger
    // reusing blocks for commits it made up) would have each fetched
    // twice, and an honest server answering both would be blamed.
    let chain = chain();
    let (mut commits, certifiers) = chain.fetch_commits(5..=6);
    let earlier = commits[0].commit().blocks[0];
    commits[1] = corrupt::edit_commit(&commits[1], |c| c.blocks.insert(0, earlier));
    assert_eq!(
        verify_batch_from(&chain, commits, certifiers, 5),
        Err(Error::InvalidCommitBlocks(6))
    );
}

#[test]
fn commit_whose_leader_is_not_last_fails() {
    let chain = chain();
    let (mut commits, certifiers) = chain.fetch_commits(5..=5);
    commits[0] = corrupt::edit_commit(&commits[0], |c| c.blocks.reverse());
    assert_eq!(
        verify_batch_from(&chain, commits, certifiers, 5),
        Err(Error::InvalidCommitBlocks(5))
    );
}

// ---- fetched blocks ----

fn trusted_commits(
    chain: &Chain,
    range: std::ops::RangeInclusive<u64>,
) -> Vec<soma_types::TrustedCommit> {
    range.map(|i| chain.commit(i)).collect()
}

#[test]
fn fetched_blocks_named_by_commits_pass() {
    let chain = chain();
    let commits = trusted_commits(&chain, 1..=20);
    let mut expected = ExpectedBlocks::new(&commits);
    let blocks = chain.fetch_blocks(1..=20);
    let n = blocks.len();
    let (first, rest) = blocks.split_at(n / 2);
    for chunk in [first.to_vec(), rest.to_vec()] {
        verify_fetched_blocks(
            &mut expected,
            chunk,
            chain.genesis(),
            &Limits::default(),
            true,
        )
        .unwrap();
    }
    assert_eq!(expected.finish(), Ok(()));
    assert_eq!(expected.received(), n);
}

/// Checks `blocks` as the fetched blocks of the commits in `range`.
fn check_fetched(
    chain: &Chain,
    range: std::ops::RangeInclusive<u64>,
    blocks: Vec<UnverifiedBlock>,
    signatures: bool,
) -> (ExpectedBlocks, Result<Vec<VerifiedBlock>, Error>) {
    let mut expected = ExpectedBlocks::new(&trusted_commits(chain, range));
    let result = verify_fetched_blocks(
        &mut expected,
        blocks,
        chain.genesis(),
        &Limits::default(),
        signatures,
    );
    (expected, result)
}

#[test]
fn fetched_block_that_no_commit_names_fails() {
    let chain = chain();
    let stranger = chain.blocks_of(15)[0].to_unverified();
    let r = stranger.reference();
    let blocks = corrupt::swap_block(&chain.fetch_blocks(1..=10), 3, stranger);
    let (_, result) = check_fetched(&chain, 1..=10, blocks, true);
    assert_eq!(result.err(), Some(Error::UnexpectedBlock(r)));
}

#[test]
fn tampered_fetched_block_fails_even_without_signature_checks() {
    let chain = chain();
    let honest = chain.blocks_of(4)[1].clone();
    let tampered = corrupt::tamper(&honest, |b| b.timestamp_ms += 1);
    let blocks = corrupt::swap_block(&chain.fetch_blocks(1..=10), 0, tampered);
    let (_, result) = check_fetched(&chain, 1..=10, blocks, false);
    assert!(matches!(result, Err(Error::UnexpectedBlock(_))));
}

#[test]
fn fetched_block_arriving_twice_fails() {
    let chain = chain();
    let mut blocks = chain.fetch_blocks(1..=10);
    blocks.push(blocks[2].clone());
    let r = blocks[2].reference();
    let (_, result) = check_fetched(&chain, 1..=10, blocks, true);
    assert_eq!(result.err(), Some(Error::DuplicateBlock(r)));
}

#[test]
fn missing_fetched_block_fails() {
    let chain = chain();
    let mut blocks = chain.fetch_blocks(1..=10);
    let dropped = blocks.remove(5).reference();
    let (expected, result) = check_fetched(&chain, 1..=10, blocks, true);
    result.unwrap();
    assert_eq!(
        expected.finish(),
        Err(Error::MissingBlocks {
            count: 1,
            first: dropped
        })
    );
    assert_eq!(
        expected.missing().copied().collect::<Vec<_>>(),
        vec![dropped]
    );
}

// ---- epochs ----

fn block_map(
    chain: &Chain,
    range: std::ops::RangeInclusive<u64>,
) -> HashMap<BlockRef, VerifiedBlock> {
    range
        .flat_map(|i| chain.blocks_of(i).iter().cloned())
        .map(|b| (b.reference(), b))
        .collect()
}

#[test]
fn batch_ending_the_epoch_yields_the_next_committee() {
    let chain = chain();
    let last = chain.epoch_last(0).unwrap();
    assert_eq!(last, 30);
    let commits = trusted_commits(&chain, 21..=last);
    let next = epoch_change(&commits, &block_map(&chain, 21..=last), chain.genesis()).unwrap();
    assert_eq!(next.as_ref(), chain.committee(1));
    let commits = trusted_commits(&chain, 11..=20);
    assert_eq!(
        epoch_change(&commits, &block_map(&chain, 11..=20), chain.genesis()),
        Ok(None)
    );
}

#[test]
fn epoch_end_inside_a_batch_fails() {
    let chain = chain();
    let commits = trusted_commits(&chain, 29..=32);
    assert_eq!(
        epoch_change(&commits, &block_map(&chain, 29..=32), chain.genesis()),
        Err(Error::EpochEndInsideBatch(30))
    );
}

#[test]
fn next_committee_of_wrong_epoch_fails() {
    let chain = chain();
    let leader = chain.blocks_of(30).last().unwrap().clone();
    let skipped = chain.committee(1).unwrap().clone();
    let skipped =
        soma_types::Committee::new(5, skipped.authorities().map(|(_, a)| a.clone()).collect())
            .unwrap();
    let bad_leader = corrupt::resign(&leader, &key_of(&chain, &leader), |b| {
        b.end_of_epoch = Some(soma_types::EndOfEpoch {
            next_committee: skipped,
        })
    })
    .into_trusted();
    let commit = corrupt::edit_commit(&chain.commit(30).to_unverified(), |c| {
        c.leader = bad_leader.reference();
        *c.blocks.last_mut().unwrap() = bad_leader.reference();
    })
    .into_trusted();
    let blocks = HashMap::from([(bad_leader.reference(), bad_leader)]);
    assert_eq!(
        epoch_change(&[commit], &blocks, chain.genesis()),
        Err(Error::InvalidNextCommittee {
            got: 5,
            expected: 1
        })
    );
}

#[test]
fn committees_switch_at_the_epoch_boundary() {
    let chain = chain();
    let first_of_epoch_1 = chain.epoch_last(0).unwrap() + 1;
    let block = chain.blocks_of(first_of_epoch_1 + 3)[1].to_unverified();
    assert!(matches!(
        verify_blocks(vec![block.clone()], chain.genesis(), &Limits::default()),
        Err(Error::WrongEpoch { .. })
    ));
    let epoch_1 = chain.committee(1).unwrap();
    assert!(verify_blocks(vec![block], epoch_1, &Limits::default()).is_ok());
    // An epoch-0 block re-labelled as epoch 1 and signed with the old key
    // fails: the next committee has fresh protocol keys.
    let old = chain.blocks_of(10)[0].clone();
    let relabelled = corrupt::resign(&old, &key_of(&chain, &old), |b| {
        b.epoch = 1;
        for a in &mut b.ancestors {
            a.epoch = 1;
        }
    });
    assert!(matches!(
        verify_blocks(vec![relabelled], epoch_1, &Limits::default()),
        Err(Error::BadSignature(_))
    ));
}

// ---- node info ----

fn node_info(key: &KeyPair, timestamp_ms: u64) -> SignedNodeInfo {
    SignedNodeInfo::sign(
        NodeInfo {
            peer_id: PeerId::from(key.public()),
            addresses: vec!["127.0.0.1:9000".into()],
            timestamp_ms,
            access: Access::Public,
        },
        key,
    )
}

const NOW: u64 = 1_700_000_000_000;
const DAY: u64 = 24 * 60 * 60 * 1000;

fn check(infos: &[SignedNodeInfo], allowlist: Option<&HashSet<PeerId>>) -> Vec<Result<(), Error>> {
    let policy = NodeInfoPolicy {
        now_ms: NOW,
        local: PeerId::from(KeyPair::from_seed([0; 32]).public()),
        allowlist,
    };
    verify_node_infos(infos, &policy, &Limits::default())
}

#[test]
fn node_info_rules() {
    let a = KeyPair::from_seed([1; 32]);
    let b = KeyPair::from_seed([2; 32]);
    let me = KeyPair::from_seed([0; 32]);
    let a_id = PeerId::from(a.public());

    let valid = node_info(&a, NOW - 1000);
    let mut wrong_key = node_info(&a, NOW);
    wrong_key.signature = b.sign(Domain::NodeInfo, &wrong_key.info);
    let expired = node_info(&a, NOW - DAY - 1);
    let future = node_info(&a, NOW + 30_001);
    // Our own, passed back: checked as any other (another node may hold
    // our key); one signed by another key is refused.
    let own = node_info(&me, NOW);
    let mut forged_own = node_info(&me, NOW);
    forged_own.signature = b.sign(Domain::NodeInfo, &forged_own.info);
    let me_id = PeerId::from(me.public());
    let mut many = node_info(&a, NOW).info;
    many.addresses = vec!["x:1".into(); 5];
    let many = SignedNodeInfo::sign(many, &a);
    let mut long = node_info(&a, NOW).info;
    long.addresses = vec!["x".repeat(257)];
    let long = SignedNodeInfo::sign(long, &a);

    let results = check(
        &[
            valid.clone(),
            wrong_key,
            expired,
            future,
            own,
            forged_own,
            many,
            long,
        ],
        None,
    );
    assert_eq!(
        results,
        vec![
            Ok(()),
            Err(Error::BadSignature(SignedItem::NodeInfo(a_id))),
            Err(Error::NodeInfoExpired(a_id)),
            Err(Error::NodeInfoFromFuture(a_id)),
            Ok(()),
            Err(Error::BadSignature(SignedItem::NodeInfo(me_id))),
            Err(Error::InvalidAddresses(a_id)),
            Err(Error::InvalidAddresses(a_id)),
        ]
    );
    // Just inside the bounds passes.
    assert_eq!(
        check(
            &[node_info(&a, NOW - DAY), node_info(&a, NOW + 30_000)],
            None
        ),
        vec![Ok(()), Ok(())]
    );
}

#[test]
fn node_info_outside_allowlist_fails_when_private() {
    let a = KeyPair::from_seed([1; 32]);
    let b = KeyPair::from_seed([2; 32]);
    let allow = HashSet::from([PeerId::from(a.public())]);
    assert_eq!(
        check(&[node_info(&a, NOW), node_info(&b, NOW)], Some(&allow)),
        vec![Ok(()), Err(Error::NotAllowlisted(PeerId::from(b.public())))]
    );
    // Our own info is ours to judge, allowlisted or not.
    let me = KeyPair::from_seed([0; 32]);
    assert_eq!(check(&[node_info(&me, NOW)], Some(&allow)), vec![Ok(())]);
}
