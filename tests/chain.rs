//! The ChainBuilder's chains verify end to end with the pure verification
//! functions, exactly as a syncing node would check them, and are
//! deterministic.

use std::collections::HashMap;

use soma_chain::{ChainBuilder, ChainConfig};
use soma_store::{ConsensusStore, MemStore};
use soma_types::verify::{
    ExpectedBlocks, epoch_change, verify_commit_batch, verify_fetched_blocks,
};
use soma_types::{CommitRef, Limits};

#[test]
fn four_validator_chain_of_1000_commits_over_3_epochs_verifies_end_to_end() {
    let chain = ChainBuilder::new(ChainConfig {
        commits_per_epoch: Some(400),
        ..ChainConfig::validators(4)
    })
    .build(1_000);
    assert_eq!(chain.tip(), 1_000);
    assert_eq!(chain.epoch_last(0), Some(400));
    assert_eq!(chain.epoch_last(1), Some(800));
    assert_eq!(chain.committees().count(), 3);

    let limits = Limits::default();
    let mut committee = chain.genesis().clone();
    let mut last: CommitRef = chain.commit_ref(0);
    let mut epochs_seen = vec![committee.epoch()];
    let mut blocks_verified = 0;
    for range in chain.batch_ranges(100) {
        let (commits, certifiers) = chain.fetch_commits(range.clone());
        let (commits, _) =
            verify_commit_batch(commits, certifiers, &committee, last, &limits).unwrap();
        let mut expected = ExpectedBlocks::new(&commits);
        let blocks = verify_fetched_blocks(
            &mut expected,
            chain.fetch_blocks(range),
            &committee,
            &limits,
            true,
        )
        .unwrap();
        expected.finish().unwrap();
        blocks_verified += blocks.len();
        let by_ref: HashMap<_, _> = blocks.into_iter().map(|b| (b.reference(), b)).collect();
        last = commits.last().unwrap().reference();
        if let Some(next) = epoch_change(&commits, &by_ref, &committee).unwrap() {
            committee = next;
            epochs_seen.push(committee.epoch());
        }
    }
    assert_eq!(last, chain.commit_ref(1_000));
    assert_eq!(epochs_seen, vec![0, 1, 2]);
    assert_eq!(blocks_verified, chain.block_count());
}

#[test]
fn batch_ranges_end_at_multiples_epoch_ends_and_tip() {
    let chain = ChainBuilder::new(ChainConfig {
        commits_per_epoch: Some(25),
        ..ChainConfig::validators(4)
    })
    .build(70);
    let ends: Vec<u64> = chain.batch_ranges(20).iter().map(|r| *r.end()).collect();
    // Epoch 0 ends at 25, epoch 1 at 50.
    assert_eq!(ends, vec![20, 25, 40, 50, 60, 70]);
}

#[test]
fn same_seed_gives_the_same_chain() {
    let config = ChainConfig {
        commits_per_epoch: Some(10),
        ..ChainConfig::validators(4)
    };
    let a = ChainBuilder::new(config.clone()).build(30);
    let b = ChainBuilder::new(config.clone()).build(30);
    let refs = |c: &soma_chain::Chain| (1..=30).map(|i| c.commit_ref(i)).collect::<Vec<_>>();
    assert_eq!(refs(&a), refs(&b));
    assert_eq!(a.chain_id(), b.chain_id());
    for i in 1..=30 {
        let bytes = |c: &soma_chain::Chain| {
            c.blocks_of(i)
                .iter()
                .map(|b| b.serialized().clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(bytes(&a), bytes(&b));
    }
    let other = ChainBuilder::new(ChainConfig {
        seed: [8; 32],
        ..config
    })
    .build(30);
    assert_ne!(other.chain_id(), a.chain_id());
    assert_ne!(other.commit_ref(30), a.commit_ref(30));
}

#[test]
fn every_commit_is_certified_and_epoch_ends_are_leaders_with_next_committee() {
    let chain = ChainBuilder::new(ChainConfig {
        commits_per_epoch: Some(10),
        stakes: vec![1, 2, 3, 4, 5],
        ..ChainConfig::default()
    })
    .build(35);
    for i in 1..=35 {
        assert!(chain.is_certified(i), "commit {i} lacks a certificate");
        let blocks = chain.blocks_of(i);
        assert_eq!(
            blocks.last().unwrap().reference(),
            chain.commit(i).commit().leader
        );
    }
    for (epoch, last) in [(0, 10), (1, 20), (2, 30)] {
        assert_eq!(chain.epoch_last(epoch), Some(last));
        let leader = chain.blocks_of(last).last().unwrap();
        let end = leader.block().end_of_epoch.as_ref().unwrap();
        assert_eq!(end.next_committee.epoch(), epoch + 1);
        // The first commit of the next epoch is of that epoch and links back.
        let next = chain.commit(last + 1);
        assert_eq!(next.commit().epoch, epoch + 1);
        assert_eq!(next.commit().previous_digest, chain.commit_ref(last).digest);
    }
}

#[test]
fn chain_written_to_a_store_is_served_back() {
    let chain = ChainBuilder::new(ChainConfig {
        commits_per_epoch: Some(40),
        ..ChainConfig::validators(4)
    })
    .build(100);
    let store = MemStore::new(chain.genesis());
    chain.write_to(&store, 30).unwrap();
    assert_eq!(
        store.highest_synced_commit().unwrap(),
        chain.commit_ref(100)
    );
    assert_eq!(store.committee(1).unwrap().as_ref(), chain.committee(1));
    assert_eq!(store.last_commit_of_epoch(0).unwrap(), Some(40));
    for end in [30, 40, 60, 80, 90, 100] {
        assert!(
            store.certificate(end).unwrap().is_some(),
            "no certificate at {end}"
        );
    }
    let block = &chain.blocks_of(55)[2];
    assert_eq!(
        store
            .block(&block.reference())
            .unwrap()
            .unwrap()
            .serialized(),
        block.serialized()
    );
}
