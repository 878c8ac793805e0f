//! Test support: in-process networks of soma-p2p nodes on 127.0.0.1.
//!
//! A dev-dependency only; no production crate depends on it.
#![warn(missing_docs, unreachable_pub)]

pub mod attack;
pub mod byzantine;
pub mod failing_store;
pub mod impair;

use std::sync::Arc;
use std::time::{Duration, Instant};

use soma_actors::discovery::SeedPeer;
use soma_actors::{P2pBuilder, P2pConfig, P2pHandle};
use soma_chain::Chain;
use soma_store::{ConsensusStore, MemStore};
use soma_types::KeyPair;

/// A validator serving `chain` from a MemStore written in batches of 100,
/// identified by `KeyPair::from_seed([key; 32])`.
pub fn validator(chain: &Chain, key: u8) -> P2pHandle {
    validator_up_to(chain, chain.tip(), key)
}

/// A validator holding the batches of `chain` that end at or below
/// `commits`.
pub fn validator_up_to(chain: &Chain, commits: u64, key: u8) -> P2pHandle {
    node(
        chain,
        key,
        P2pConfig::default(),
        Arc::new(stored(chain, commits)),
    )
}

/// A validator serving `chain`, started with `config`.
pub fn validator_with(chain: &Chain, key: u8, config: P2pConfig) -> P2pHandle {
    node(chain, key, config, Arc::new(stored(chain, chain.tip())))
}

/// A validator serving `chain` (key `key`, started with `config`) that
/// peers reach through an impaired link: it advertises the link's address,
/// so that a peer redialling it (after a reset) comes through the link
/// again. Returns the validator, the link, and the seed entry to reach it.
pub async fn validator_behind_link(
    chain: &Chain,
    key: u8,
    config: P2pConfig,
    impairment: impair::Impairment,
) -> (P2pHandle, impair::ImpairedLink, SeedPeer) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a free port on 127.0.0.1");
    let address = listener.local_addr().expect("a bound listener");
    let node = validator_with(
        chain,
        key,
        P2pConfig {
            external_addresses: vec![address.to_string()],
            ..config
        },
    );
    let link = impair::ImpairedLink::start(listener, node.local_addr(), impairment);
    let seed = SeedPeer {
        peer_id: Some(node.peer_id()),
        address: address.to_string(),
    };
    (node, link, seed)
}

/// A MemStore holding the batches of 100 of `chain` that end at or below
/// `commits`.
pub fn stored(chain: &Chain, commits: u64) -> MemStore {
    let store = MemStore::new(chain.genesis());
    for range in chain.batch_ranges(100) {
        if *range.end() <= commits {
            store
                .write_synced_batch(chain.batch(range))
                .expect("a built chain writes into a fresh store");
        }
    }
    store
}

/// Commit `index` of `chain` as local consensus hands it over, with its
/// certificate.
pub fn local_commit(chain: &Chain, index: u64) -> soma_actors::system::LocalCommit {
    soma_actors::system::LocalCommit {
        commit: chain.commit(index),
        blocks: chain.blocks_of(index).to_vec(),
        certificate: chain.certificate(index).to_vec(),
        next_committee: None,
    }
}

/// Seed entries (with peer ids) for `nodes`.
pub fn seeds(nodes: &[&P2pHandle]) -> Vec<SeedPeer> {
    nodes
        .iter()
        .map(|n| SeedPeer {
            peer_id: Some(n.peer_id()),
            address: n.local_addr().to_string(),
        })
        .collect()
}

/// A node on `chain`'s genesis with `store`, started with `config`.
pub fn node(
    chain: &Chain,
    key: u8,
    config: P2pConfig,
    store: Arc<dyn ConsensusStore>,
) -> P2pHandle {
    P2pBuilder::new(
        config,
        KeyPair::from_seed([key; 32]),
        chain.genesis().clone(),
        store,
    )
    .start()
    .expect("the node starts")
}

/// Waits until `node` has synced `target`, polling every 10 ms; panics with
/// the node's sync status after `deadline`. Returns the time it took.
pub async fn wait_synced(node: &P2pHandle, target: u64, deadline: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let status = node.sync_status().await.expect("the node runs");
        if status.synced >= target {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < deadline,
            "sync stalled at {} of {target}: {status:?}",
            status.synced
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until `node` hands the node commit `target` (or has applied it
/// already), and returns the time it took: the moment it is handed over,
/// not the next poll, for benchmarks whose catch-ups are a few hundred
/// milliseconds ([`wait_synced`] may add up to its 10 ms poll). A
/// subscriber that falls behind the broadcast reads the applied watermark
/// instead. Panics with the node's sync status after `deadline`.
pub async fn wait_applied(node: &P2pHandle, target: u64, deadline: Duration) -> Duration {
    use tokio::sync::broadcast::error::RecvError;
    let start = Instant::now();
    let mut commits = node.subscribe_synced_commits();
    let applied = || {
        node.store()
            .highest_synced_commit()
            .is_ok_and(|c| c.index >= target)
    };
    if applied() {
        return start.elapsed();
    }
    let until = tokio::time::Instant::from_std(start + deadline);
    loop {
        match tokio::time::timeout_at(until, commits.recv()).await {
            Ok(Ok(commit)) if commit.commit_ref.index >= target => return start.elapsed(),
            Ok(Ok(_)) => {}
            Ok(Err(RecvError::Lagged(_))) if applied() => return start.elapsed(),
            Ok(Err(RecvError::Lagged(_))) => {}
            Ok(Err(RecvError::Closed)) | Err(_) => {
                let status = node.sync_status().await;
                panic!("commit {target} was not applied in {deadline:?}: {status:?}");
            }
        }
    }
}

/// Polls `done` every 10 ms until it holds; panics with `what` after
/// `deadline`.
pub async fn wait_until(what: &str, deadline: Duration, mut done: impl AsyncFnMut() -> bool) {
    let start = Instant::now();
    while !done().await {
        assert!(start.elapsed() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Asserts that `store` holds exactly `chain`: its watermark is the tip, and
/// every commit, every block (byte for byte), every committee and every
/// epoch end is the chain's.
pub fn assert_same_chain(chain: &Chain, store: &dyn ConsensusStore) {
    assert_eq!(
        store.highest_synced_commit().expect("the store reads"),
        chain.commit_ref(chain.tip())
    );
    for i in 1..=chain.tip() {
        let commit = store
            .commit(i)
            .expect("the store reads")
            .unwrap_or_else(|| panic!("commit {i} missing"));
        assert_eq!(commit.reference(), chain.commit_ref(i));
        let expected = chain.blocks_of(i);
        let refs: Vec<_> = expected.iter().map(|b| b.reference()).collect();
        let blocks = store.blocks(&refs).expect("the store reads");
        for ((r, block), want) in refs.iter().zip(blocks).zip(expected) {
            let block = block.unwrap_or_else(|| panic!("block {r} of commit {i} missing"));
            assert_eq!(block.serialized(), want.serialized(), "block {r}");
        }
    }
    for c in chain.committees() {
        assert_eq!(
            store
                .committee(c.epoch())
                .expect("the store reads")
                .as_ref(),
            Some(c),
            "committee of epoch {}",
            c.epoch()
        );
        assert_eq!(
            store
                .last_commit_of_epoch(c.epoch())
                .expect("the store reads"),
            chain.epoch_last(c.epoch()),
            "end of epoch {}",
            c.epoch()
        );
    }
    assert_eq!(
        store.lowest_available_commit().expect("the store reads"),
        1,
        "the lowest commit kept"
    );
    assert_certified(chain, store, 1..=chain.tip());
}

/// Asserts that every certificate `store` holds for a commit of `range` is
/// a quorum of the source's certifier blocks of that commit (blocks by the
/// committee that voted for it, no author twice), and that every commit of
/// `range` is covered: a commit at or after it, in its epoch, is
/// certified, so the store can serve every batch of the range to others.
/// Returns how many commits hold a certificate.
pub fn assert_certified(
    chain: &Chain,
    store: &dyn ConsensusStore,
    range: std::ops::RangeInclusive<soma_types::CommitIndex>,
) -> usize {
    let mut certified = Vec::new();
    for i in range.clone() {
        let Some(certificate) = store.certificate(i).expect("the store reads") else {
            continue;
        };
        let source: Vec<_> = chain
            .certificate(i)
            .iter()
            .map(|b| b.serialized())
            .collect();
        let committee = chain.committee_of(i);
        let mut authors = std::collections::HashSet::new();
        let mut stake = 0;
        for block in &certificate {
            assert!(
                source.contains(&block.serialized()),
                "commit {i}: certifier {} is not one of the source's",
                block.reference()
            );
            let author = block.block().author;
            assert!(authors.insert(author), "commit {i}: author {author} twice");
            assert!(
                block.block().commit_votes.contains(&chain.commit_ref(i)),
                "commit {i}: certifier {} does not vote for it",
                block.reference()
            );
            stake += committee.stake(author);
        }
        assert!(
            committee.is_quorum(stake),
            "commit {i}: certificate of {} blocks holds no quorum",
            certificate.len()
        );
        certified.push(i);
    }
    for i in range {
        let epoch = chain.commit(i).commit().epoch;
        let last = chain.epoch_last(epoch).unwrap_or(chain.tip());
        assert!(
            certified.iter().any(|&c| c >= i && c <= last),
            "commit {i}: no certified commit from it to the end of epoch {epoch}: \
             the store could not serve it"
        );
    }
    certified.len()
}

/// Waits until `node` has banned every peer of `peers`, polling every
/// 20 ms; panics with what the node knows of its peers after `deadline`.
pub async fn wait_banned(node: &P2pHandle, peers: &[soma_types::PeerId], deadline: Duration) {
    let start = Instant::now();
    loop {
        let views = node.peer_heights().await.expect("the node runs");
        let banned = |p: &soma_types::PeerId| {
            views
                .iter()
                .any(|v| v.peer == *p && v.banned_until.is_some())
        };
        if peers.iter().all(banned) {
            return;
        }
        assert!(start.elapsed() < deadline, "not all banned: {views:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// This process's peak resident memory so far (VmHWM), in bytes. A test
/// that measures it runs alone in its binary, so the peak is its own.
pub fn peak_rss() -> u64 {
    peak_rss_of(std::process::id()).expect("/proc is mounted")
}

/// The peak resident memory (VmHWM) of process `pid`, in bytes; `None` if
/// the process is gone or /proc does not report it.
pub fn peak_rss_of(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())?;
    Some(kib * 1024)
}

/// Sends the test's tracing to its output, filtered by `RUST_LOG`, so a
/// failing test shows what happened; later calls do nothing.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .try_init();
}
