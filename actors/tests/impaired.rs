//! Catch-up over an impaired path: every validator behind a link
//! (`soma_testkit::impair`) with a long round trip, every connection
//! through the links reset several times while sync runs. Sync must finish,
//! across epoch changes, with the store identical to the validators'.

use std::sync::Arc;
use std::time::{Duration, Instant};

use soma_actors::P2pConfig;
use soma_chain::{ChainBuilder, ChainConfig};
use soma_store::{ConsensusStore, MemStore};
use soma_testkit::impair::{ImpairedLink, Impairment};

const DEADLINE: Duration = Duration::from_secs(120);

/// Round trip of every link.
const ROUND_TRIP: Duration = Duration::from_millis(250);

/// Commits of the chain, and of each epoch.
const COMMITS: u64 = 2_000;
const PER_EPOCH: u64 = 800;

/// Every link resets its connections each time the node's watermark
/// passes another multiple of this (so every reset falls while sync runs,
/// whatever the machine's speed).
const RESET_STEP: u64 = 400;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catch_up_completes_through_links_of_250_ms_round_trip_with_resets() {
    soma_testkit::init_tracing();
    let chain = ChainBuilder::new(ChainConfig {
        commits_per_epoch: Some(PER_EPOCH),
        ..ChainConfig::validators(4)
    })
    .build(COMMITS);
    assert_eq!(chain.committees().count(), 3);
    let impairment = Impairment {
        jitter: Duration::from_millis(10),
        ..Impairment::round_trip(ROUND_TRIP)
    };
    let mut validators = Vec::new();
    let mut links: Vec<ImpairedLink> = Vec::new();
    let mut seeds = Vec::new();
    for k in 1..=3 {
        let (node, link, seed) = soma_testkit::validator_behind_link(
            &chain,
            k,
            P2pConfig::default(),
            impairment.clone(),
        )
        .await;
        validators.push(node);
        links.push(link);
        seeds.push(seed);
    }
    let store: Arc<dyn ConsensusStore> = Arc::new(MemStore::new(chain.genesis()));
    let mut config = P2pConfig {
        seed_peers: seeds,
        ..P2pConfig::default()
    };
    // A peer lost to a reset is redialled at the next discovery round.
    config.discovery.interval_ms = 500;
    let node = soma_testkit::node(&chain, 9, config, store.clone());

    // Resets while sync runs: each time the watermark passes a step, every
    // connection through every link is reset, the node's and the
    // validators' own alike.
    let start = Instant::now();
    let mut next_reset = RESET_STEP;
    let mut resets_sent = 0;
    loop {
        let status = node.sync_status().await.expect("the node runs");
        if status.synced >= chain.tip() {
            break;
        }
        if status.synced >= next_reset {
            for link in &links {
                link.reset_now();
            }
            resets_sent += 1;
            next_reset = status.synced / RESET_STEP * RESET_STEP + RESET_STEP;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "sync stalled at {} of {}: {status:?}",
            status.synced,
            chain.tip()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The node comes back through every link after its resets: a reset
    // just before the tip can leave a link to be redialled (at the next
    // discovery round) after the other links have brought the rest.
    soma_testkit::wait_until(
        "a connection through every link after its last reset",
        DEADLINE,
        async || {
            links.iter().all(|l| {
                let s = l.stats();
                s.connections > s.connections_reset
            })
        },
    )
    .await;
    let stats: Vec<_> = links.iter().map(ImpairedLink::stats).collect();
    let status = node.sync_status().await.unwrap();
    tracing::info!(?stats, ?status, resets_sent, "synced through the links");
    assert!(
        resets_sent >= 2,
        "{resets_sent} rounds of resets during sync"
    );
    for s in &stats {
        // Each reset found live connections to close, and the node came
        // back through the link after it.
        assert!(
            s.resets >= 2,
            "every link reset its connections during sync: {stats:?}"
        );
        assert!(s.connections > s.connections_reset, "{stats:?}");
    }
    soma_testkit::assert_same_chain(&chain, store.as_ref());
    assert_eq!(
        status.invalid_responses, 0,
        "no honest peer was taken for a liar"
    );
    assert_eq!(status.commits_applied, chain.tip());

    node.shutdown().await;
    for v in validators {
        v.shutdown().await;
    }
}

/// Near the tip a fetch is small: over a long round trip its answer moves
/// few bytes a second, and an honest peer measured by them alone ranked
/// slow, below a peer never measured. Fresh identities cost nothing in
/// public mode, so each silent one then took a fetch first and held it.
/// An answer of all that was asked within `WHOLE_ANSWER_MS` now ranks its
/// peer good. Here an honest validator behind a 150 ms round trip serves
/// batches of 10 commits, as near the tip (about 2.5 KB of commits and
/// 22 KB of blocks a fetch: by their bytes alone, 17 KB/s and 150 KB/s,
/// slow for both kinds), one batch ahead, so that fewer fetches are in
/// flight than it has slots; hedges are off, so that a fetch goes to a
/// silent peer only if the balancer ranks it first. Once the validator
/// is measured for both kinds (its first batch applied), three silent
/// identities claiming the chain connect. None of them is asked for
/// anything, and the chain completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_identities_are_not_asked_before_a_far_peer_whose_small_answers_came_whole() {
    use soma_testkit::byzantine::{Lie, serve_observed};

    let chain = ChainBuilder::new(ChainConfig::validators(4)).build(400);
    let (validator, _link, seed) = soma_testkit::validator_behind_link(
        &chain,
        1,
        P2pConfig::default(),
        Impairment::round_trip(Duration::from_millis(150)),
    )
    .await;
    let chain = Arc::new(chain);
    let store: Arc<dyn ConsensusStore> = Arc::new(MemStore::new(chain.genesis()));
    let mut config = P2pConfig {
        seed_peers: vec![seed],
        ..P2pConfig::default()
    }
    .with_commit_sync_batch_size(10);
    config.state_sync.batches_ahead = 1;
    config.state_sync.commit_fetches_ahead = 0;
    config.state_sync.max_hedged_bytes = 0;
    let node = soma_testkit::node(&chain, 9, config, store.clone());
    let views = async || node.peer_heights().await.expect("the node runs");
    let measured = async || {
        views().await.iter().any(|v| {
            v.peer == validator.peer_id() && v.throughput_bps > 0 && v.commit_throughput_bps > 0
        })
    };
    soma_testkit::wait_until("the validator measured", DEADLINE, measured).await;
    // Its first batch applied: its block answer is measured too.
    let first = async || node.sync_status().await.expect("the node runs").synced >= 10;
    soma_testkit::wait_until("the first batch applied", DEADLINE, first).await;
    let mut silent = Vec::new();
    for key in 131..=133 {
        let served = serve_observed(chain.clone(), Lie::NeverAnswers, key).await;
        node.connect(Some(served.peer), served.address.clone())
            .expect("Connections takes the dial");
        silent.push(served);
    }
    let tracked = async || {
        let views = views().await;
        silent.iter().all(|s| {
            views
                .iter()
                .any(|v| v.peer == s.peer && v.connected && v.highest == chain.tip())
        })
    };
    soma_testkit::wait_until(
        "the silent identities claiming the chain",
        DEADLINE,
        tracked,
    )
    .await;
    // The attack is on while most of the chain is still to come.
    let status = node.sync_status().await.expect("the node runs");
    assert!(status.synced < chain.tip() / 2, "{status:?}");
    let synced = async || node.sync_status().await.expect("the node runs").synced >= chain.tip();
    soma_testkit::wait_until("the chain synced", DEADLINE, synced).await;
    soma_testkit::assert_same_chain(&chain, store.as_ref());
    let asked: Vec<usize> = silent.iter().map(|s| s.fetches()).collect();
    let views = views().await;
    assert_eq!(asked, vec![0, 0, 0], "{views:?}");
    node.shutdown().await;
    validator.shutdown().await;
}
