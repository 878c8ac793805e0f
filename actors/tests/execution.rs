//! The hand-off to the executor and pruning, on real nodes.
//!
//! - A registered executor much slower than sync receives every commit of
//!   a long catch-up exactly once, in order, while sync never asks for a
//!   commit more than `max_lead_over_execution` past it, and pruning on
//!   the same node never removes a commit it has not taken.
//! - A stream that starts behind reads the store, then goes live while
//!   commits keep arriving, with no gap and no duplicate at the switch,
//!   even when the live broadcast lags.
//! - Pruning nodes advertise the lowest commit they keep; a fresh node
//!   syncs from genesis through the one node that keeps everything, and
//!   one that only pruned peers can serve reports the range as unavailable
//!   instead of asking in a loop.

use std::sync::Arc;
use std::time::Duration;

use soma_actors::state_sync::prune;
use soma_actors::system::{LocalCommit, P2pError, Retention, StreamError};
use soma_actors::{P2pConfig, P2pHandle};
use soma_chain::{Chain, ChainBuilder, ChainConfig};
use soma_store::{ConsensusStore, MemStore};
use soma_testkit::{
    assert_same_chain, init_tracing, seeds, validator, validator_with, wait_synced,
};

const DEADLINE: Duration = Duration::from_secs(240);

/// A chain of `commits` small commits (no transactions), in one epoch.
fn small_chain(commits: u64) -> Chain {
    ChainBuilder::new(ChainConfig {
        transactions_per_block: 0,
        ..ChainConfig::validators(4)
    })
    .build(commits)
}

/// [`soma_testkit::wait_until`] with [`DEADLINE`].
async fn wait_until(what: &str, done: impl AsyncFnMut() -> bool) {
    soma_testkit::wait_until(what, DEADLINE, done).await
}

/// The executor takes ten commits, then works on them for ten times
/// `WORK`: about 430 commits a second here, against about 10,000 a second
/// this catch-up runs at unhindered (debug build, signatures off; see
/// docs/operations.md), so sync spends most of the run paused at the lead.
const WORK: Duration = Duration::from_millis(2);
const COMMITS: u64 = 20_000;
const LEAD: u64 = 1_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_executor_gets_every_commit_of_a_long_catch_up_once_and_sync_keeps_within_the_lead()
{
    init_tracing();
    let chain = small_chain(COMMITS);
    let validators: Vec<P2pHandle> = (1..=2).map(|k| validator(&chain, k)).collect();
    let store: Arc<dyn ConsensusStore> = Arc::new(MemStore::new(chain.genesis()));
    let mut config = P2pConfig {
        seed_peers: seeds(&validators.iter().collect::<Vec<_>>()),
        verify_synced_block_signatures: false,
        prune: prune::Config {
            retention: Retention::Commits(500),
            interval_ms: 50,
            batch_commits: 200,
            grace_ms: 0,
            ..prune::Config::default()
        },
        ..P2pConfig::default()
    };
    config.state_sync.max_lead_over_execution = LEAD;
    let node = soma_testkit::node(&chain, 9, config, store.clone());
    let mut executor = node.subscribe_executor_from(1).expect("the first executor");
    assert!(matches!(
        node.subscribe_executor_from(1),
        Err(P2pError::ExecutorRegistered)
    ));

    let mut received = Vec::with_capacity(COMMITS as usize);
    let (mut paused_seen, mut pruned_seen) = (false, false);
    while received.len() < COMMITS as usize {
        let subdag = executor.next().await.expect("no commit is lost or pruned");
        received.push(subdag.commit_ref);
        if subdag.commit_ref.index.is_multiple_of(100) {
            // The executor holds this commit and has taken every one before
            // it: sync may have asked for LEAD commits past that, no more.
            let status = node.sync_status().await.expect("status");
            let taken = subdag.commit_ref.index - 1;
            assert!(
                status.requested <= taken + LEAD,
                "sync asked for {} with the executor at {taken}",
                status.requested
            );
            paused_seen |= status.paused_for_executor;
            // Pruning never removes the commit after the one taken.
            let lowest = store.lowest_available_commit().unwrap();
            assert!(lowest <= taken + 1, "pruned to {lowest} with {taken} taken");
            pruned_seen |= lowest > 1;
        }
        if subdag.commit_ref.index.is_multiple_of(10) {
            tokio::time::sleep(WORK * 10).await;
        }
    }
    let expected: Vec<_> = (1..=COMMITS).map(|i| chain.commit_ref(i)).collect();
    assert!(received == expected, "every commit once, in order");
    assert!(
        paused_seen,
        "the executor was the slower: sync waited for it"
    );
    assert!(pruned_seen, "the node pruned while the executor worked");

    // The executor unregisters; pruning reaches the retention.
    drop(executor);
    wait_until("the executor unregistered", async || {
        node.sync_status().await.unwrap().executed.is_none()
    })
    .await;
    wait_until("pruning to the retention", async || {
        node.sync_status().await.unwrap().lowest_available == COMMITS - 499
    })
    .await;
    assert_eq!(store.lowest_available_commit().unwrap(), COMMITS - 499);
    let status = node.sync_status().await.unwrap();
    assert_eq!(status.commits_pruned, COMMITS - 500);
    // A second executor may register now, but not below what is kept.
    assert!(matches!(
        node.subscribe_executor_from(1),
        Err(P2pError::Pruned { index: 1, lowest }) if lowest == COMMITS - 499
    ));
    let late = node
        .subscribe_executor_from(COMMITS - 10)
        .expect("registers");
    drop(late);
    // A stream below what is kept is told so.
    let mut behind = node.subscribe_synced_commits_from(1);
    assert_eq!(
        behind.next().await.unwrap_err(),
        StreamError::Pruned {
            next: 1,
            lowest: COMMITS - 499
        }
    );
    node.shutdown().await;
    for v in validators {
        v.shutdown().await;
    }
}

/// A local commit of `chain` as consensus hands it over.
fn local(chain: &Chain, index: u64) -> LocalCommit {
    soma_testkit::local_commit(chain, index)
}

/// A node fed by local consensus: 400 commits are stored before the
/// streams start; the rest arrive while they read. One stream reads at
/// once and one starts at commit 250, both as the commits come; one is
/// read until it is live (caught up with the store, on the broadcast of
/// capacity 4), then not read while the other 800 commits are sent, so
/// the broadcast laps it and it falls back to the store. Each sees every
/// commit from its start exactly once, in order, and ends live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_switches_from_the_store_to_live_commits_without_gap_or_duplicate() {
    init_tracing();
    const TOTAL: u64 = 1_200;
    let chain = small_chain(TOTAL + 1);
    let config = P2pConfig {
        synced_commit_broadcast_capacity: 4,
        // Small store reads (a commit each): the stream switches many
        // times.
        synced_commit_read_bytes: 1,
        ..P2pConfig::default()
    };
    let store: Arc<dyn ConsensusStore> = Arc::new(MemStore::new(chain.genesis()));
    let node = soma_testkit::node(&chain, 9, config, store);
    for i in 1..=400 {
        node.send_commit(local(&chain, i)).await.expect("stored");
    }
    let read = |from: u64| {
        let mut stream = node.subscribe_synced_commits_from(from);
        tokio::spawn(async move {
            let mut seen = Vec::new();
            while seen.len() < (TOTAL - from + 1) as usize {
                seen.push(stream.next().await.expect("no error").commit_ref);
            }
            seen
        })
    };
    // The lapped stream: 400 commits read a commit a store read, then
    // the read that finds nothing more and puts it on the broadcast (a
    // call cut short loses nothing).
    let mut lapped = node.subscribe_synced_commits_from(1);
    let mut seen = Vec::new();
    for _ in 1..=400 {
        seen.push(lapped.next().await.expect("no error").commit_ref);
    }
    while lapped.store_reads() == 400 {
        let waited = tokio::time::timeout(Duration::from_millis(10), lapped.next()).await;
        assert!(waited.is_err(), "nothing to deliver yet");
    }
    assert_eq!(lapped.store_reads(), 401);
    let readers = [(1, read(1)), (250, read(250))];
    for i in 401..=TOTAL {
        node.send_commit(local(&chain, i)).await.expect("stored");
        if i % 50 == 0 {
            tokio::task::yield_now().await;
        }
    }
    while seen.len() < TOTAL as usize {
        seen.push(lapped.next().await.expect("no error").commit_ref);
    }
    let expected: Vec<_> = (1..=TOTAL).map(|i| chain.commit_ref(i)).collect();
    assert!(seen == expected, "lapped: every commit once, in order");
    // Lapped, it read from the store again: a commit a read.
    assert!(lapped.store_reads() > 401, "{}", lapped.store_reads());
    for (from, reader) in readers {
        let seen = tokio::time::timeout(DEADLINE, reader)
            .await
            .expect("the reader finishes")
            .unwrap();
        let expected: Vec<_> = (from..=TOTAL).map(|i| chain.commit_ref(i)).collect();
        assert!(seen == expected, "from {from}: every commit once, in order");
    }
    // A stream from the genesis commit starts at 1.
    let mut first = node.subscribe_synced_commits_from(0);
    assert_eq!(first.next().await.unwrap().commit_ref, chain.commit_ref(1));
    // One past the tip reads the store once, finds nothing and goes live
    // (a call cut short loses nothing); the next commit comes live.
    let mut next = node.subscribe_synced_commits_from(TOTAL + 1);
    while next.store_reads() == 0 {
        let waited = tokio::time::timeout(Duration::from_millis(10), next.next()).await;
        assert!(waited.is_err(), "nothing to deliver yet");
    }
    node.send_commit(local(&chain, TOTAL + 1)).await.unwrap();
    let live = next.next().await.unwrap();
    assert_eq!(live.commit_ref, chain.commit_ref(TOTAL + 1));
    assert_eq!(next.store_reads(), 1, "delivered live, not read back");
    node.shutdown().await;
    assert_eq!(next.next().await.unwrap_err(), StreamError::Stopped);
}

/// Three validators: one keeps everything, two keep the last 300 commits.
/// The pruned ones advertise what their stores hold; a fresh node syncs
/// from genesis through the one that keeps everything, holding no NOT_FOUND
/// against anyone; a node whose only peer pruned reports the range.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_node_syncs_from_genesis_among_pruning_peers() {
    init_tracing();
    const TIP: u64 = 2_000;
    let chain = small_chain(TIP);
    let pruning = P2pConfig {
        prune: prune::Config {
            retention: Retention::Commits(300),
            interval_ms: 20,
            batch_commits: 250,
            grace_ms: 0,
            ..prune::Config::default()
        },
        ..P2pConfig::default()
    };
    let archive = validator(&chain, 1);
    let pruned: Vec<P2pHandle> = (2..=3)
        .map(|k| validator_with(&chain, k, pruning.clone()))
        .collect();
    for v in &pruned {
        wait_until("a validator pruned", async || {
            v.sync_status().await.unwrap().lowest_available == TIP - 299
        })
        .await;
        assert_eq!(v.store().lowest_available_commit().unwrap(), TIP - 299);
        assert!(v.store().commit(TIP - 300).unwrap().is_none());
    }

    // A node that knows only a pruned peer: nobody holds commit 1.
    let stranded = soma_testkit::node(
        &chain,
        8,
        P2pConfig {
            seed_peers: seeds(&[&pruned[0]]),
            ..P2pConfig::default()
        },
        Arc::new(MemStore::new(chain.genesis())),
    );
    wait_until("the range reported unavailable", async || {
        stranded.sync_status().await.unwrap().unavailable == Some(1)
    })
    .await;
    let heights = stranded.peer_heights().await.unwrap();
    assert_eq!(heights.len(), 1);
    assert_eq!(
        (heights[0].lowest, heights[0].highest),
        (TIP - 299, TIP),
        "the pruned peer advertises what its store holds"
    );
    assert_eq!(heights[0].faults, 0);
    assert_eq!(
        fetches_served(&pruned[0]),
        0,
        "nobody asks a peer for what it said it pruned"
    );

    let fresh_store: Arc<dyn ConsensusStore> = Arc::new(MemStore::new(chain.genesis()));
    let all: Vec<&P2pHandle> = std::iter::once(&archive).chain(pruned.iter()).collect();
    let fresh = soma_testkit::node(
        &chain,
        9,
        P2pConfig {
            seed_peers: seeds(&all),
            ..P2pConfig::default()
        },
        fresh_store.clone(),
    );
    wait_synced(&fresh, TIP, DEADLINE).await;
    assert_same_chain(&chain, fresh_store.as_ref());
    let status = fresh.sync_status().await.unwrap();
    assert_eq!(status.invalid_responses, 0);
    assert_eq!(status.unavailable, None);
    for view in fresh.peer_heights().await.unwrap() {
        assert_eq!(view.faults, 0, "{view:?}");
        assert_eq!(view.banned_until, None, "{view:?}");
    }
    // Nobody asked a pruned peer below its lowest: commits 1..=1700
    // came from the archive.
    for v in &pruned {
        assert_eq!(count(v, "FetchCommits", tonic::Code::NotFound), 0);
    }
    for node in [stranded, fresh, archive].iter().chain(pruned.iter()) {
        node.shutdown().await;
    }
}

/// FetchCommits calls `node` answered (any status).
fn fetches_served(node: &P2pHandle) -> u64 {
    node.rpc_counts()
        .iter()
        .filter(|(rpc, _, _)| *rpc == "FetchCommits")
        .map(|(_, _, n)| n)
        .sum()
}

/// Calls of `rpc` that `node` answered with `code`.
fn count(node: &P2pHandle, rpc: &str, code: tonic::Code) -> u64 {
    node.rpc_counts()
        .iter()
        .filter(|(r, c, _)| *r == rpc && *c == code)
        .map(|(_, _, n)| n)
        .sum()
}

/// A pruning node advertises its new lowest commit a grace before it
/// deletes below it: a peer that still holds the old claim is served, not
/// refused (which it would take for a lie about the range).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pruning_node_advertises_its_new_lowest_a_grace_before_it_deletes() {
    init_tracing();
    const TIP: u64 = 1_000;
    let chain = small_chain(TIP);
    let pruning = validator_with(
        &chain,
        2,
        P2pConfig {
            prune: prune::Config {
                retention: Retention::Commits(300),
                interval_ms: 20,
                grace_ms: 3_600_000,
                ..prune::Config::default()
            },
            ..P2pConfig::default()
        },
    );
    let observer = soma_testkit::node(
        &chain,
        8,
        P2pConfig {
            seed_peers: seeds(&[&pruning]),
            ..P2pConfig::default()
        },
        Arc::new(MemStore::new(chain.genesis())),
    );
    wait_until("the new lowest advertised", async || {
        let heights = observer.peer_heights().await.unwrap();
        heights.first().is_some_and(|v| v.lowest == TIP - 299)
    })
    .await;
    // Nothing deleted within the grace: an old claim is still good.
    assert_eq!(pruning.store().lowest_available_commit().unwrap(), 1);
    let address = pruning.local_addr().to_string();
    let (channel, _) = soma_wire::tls::connect(&address, None, None, Duration::from_secs(5))
        .await
        .expect("an anonymous caller connects");
    let mut client = soma_wire::proto::p2p_client::P2pClient::new(channel);
    let answer = client
        .fetch_commits(soma_wire::proto::FetchCommitsRequest {
            start: 1,
            end: 100,
            ..Default::default()
        })
        .await
        .expect("commits below the advertised lowest are served within the grace");
    assert_eq!(answer.get_ref().commits.len(), 100);
    observer.shutdown().await;
    pruning.shutdown().await;
}

/// Local commits whose writes wait for a slow store are bounded by
/// `max_local_writes`: with commit 1's write held up and commit 2's
/// waiting behind it (2 of 2), commit 3 and a certificate are refused as
/// busy at once, and taken once the store moves again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_commits_waiting_for_a_slow_store_are_bounded_and_the_rest_refused_as_busy() {
    use soma_actors::system::P2pError;
    use soma_testkit::failing_store::FailingStore;
    let chain = small_chain(3);
    let store = Arc::new(FailingStore::new(MemStore::new(chain.genesis())));
    let config = P2pConfig {
        max_local_writes: 2,
        ..P2pConfig::default()
    };
    let node = soma_testkit::node(&chain, 9, config, store.clone());
    store.pause_after_writing(1);
    let first = {
        let (node, commit) = (node.clone(), local(&chain, 1));
        tokio::spawn(async move { node.send_commit(commit).await })
    };
    wait_until("commit 1 stored and its write held up", async || {
        store.paused()
    })
    .await;
    // Polled once, commit 2 is in StateSync's mailbox, ahead of commit 3.
    let mut second = Box::pin(node.send_commit(local(&chain, 2)));
    assert!(futures::poll!(&mut second).is_pending());
    assert!(matches!(
        node.send_commit(local(&chain, 3)).await,
        Err(P2pError::Busy)
    ));
    // A certificate's write takes a place too.
    assert!(matches!(
        node.send_certificate(1, chain.certificate(1).to_vec())
            .await,
        Err(P2pError::Busy)
    ));
    store.resume();
    first.await.unwrap().expect("commit 1 stored");
    second.await.expect("commit 2 stored");
    node.send_commit(local(&chain, 3))
        .await
        .expect("commit 3 stored once the writes before it are answered");
    node.send_certificate(1, chain.certificate(1).to_vec())
        .await
        .expect("the certificate stored once there is room");
    assert_eq!(store.inner().highest_synced_commit().unwrap().index, 3);
    node.shutdown().await;
}

/// Commits reach the broadcast in index order even when a write is stored
/// and then held up before it reports (a preempted thread): the local
/// commit sent meanwhile, whose write could otherwise be stored and
/// reported first, waits for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_are_broadcast_in_order_when_a_write_is_held_up_after_it_is_stored() {
    use soma_testkit::failing_store::FailingStore;
    let chain = small_chain(2);
    let store = Arc::new(FailingStore::new(MemStore::new(chain.genesis())));
    let node = soma_testkit::node(&chain, 9, P2pConfig::default(), store.clone());
    let mut raw = node.subscribe_synced_commits();
    store.pause_after_writing(1);
    let send = |i: u64| {
        let (node, commit) = (node.clone(), local(&chain, i));
        tokio::spawn(async move { node.send_commit(commit).await })
    };
    let first = send(1);
    wait_until("commit 1 stored and its write held up", async || {
        store.paused()
    })
    .await;
    let second = send(2);
    // Unordered, commit 2 is stored (and broadcast) while commit 1's
    // write is held up; ordered, it waits for it. A second is plenty for
    // the first; the order is asserted, not this wait.
    let stored_two = async {
        while store.inner().highest_synced_commit().unwrap().index < 2 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), stored_two).await;
    store.resume();
    first.await.unwrap().expect("commit 1 stored");
    second.await.unwrap().expect("commit 2 stored");
    let order = [raw.recv().await.unwrap(), raw.recv().await.unwrap()].map(|s| s.commit_ref.index);
    assert_eq!(order, [1, 2]);
    node.shutdown().await;
}

/// Local commits sent at once, without awaiting each answer before the
/// next, are written in the order they were sent: each is stored, none
/// refused as not contiguous, and the broadcast sees them in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_commits_sent_at_once_are_written_in_the_order_sent() {
    let chain = small_chain(64);
    let store = Arc::new(MemStore::new(chain.genesis()));
    let node = soma_testkit::node(&chain, 9, P2pConfig::default(), store.clone());
    let mut raw = node.subscribe_synced_commits();
    // Each polled once, in order: its message is in StateSync's mailbox
    // before the next is sent.
    let mut sends = Vec::new();
    for i in 1..=64 {
        let mut send = Box::pin(node.send_commit(local(&chain, i)));
        let _ = futures::poll!(&mut send);
        sends.push(send);
    }
    for (i, result) in futures::future::join_all(sends)
        .await
        .into_iter()
        .enumerate()
    {
        assert!(result.is_ok(), "commit {}: {result:?}", i + 1);
    }
    assert_eq!(store.highest_synced_commit().unwrap().index, 64);
    let mut order = Vec::new();
    for _ in 0..64 {
        order.push(raw.recv().await.unwrap().commit_ref.index);
    }
    assert_eq!(order, (1..=64).collect::<Vec<_>>());
    node.shutdown().await;
}
