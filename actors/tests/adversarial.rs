//! Peers that send data the node never judged before, or that exploits
//! what the node assumed: an epoch it was not expecting, commits of an
//! epoch that has ended, floods of blocks nobody asked for, repeated
//! blocks, heights they do not hold. Each attack runs among honest peers,
//! over real mutual-TLS gRPC.
//!
//! Every test has the same shape. The node starts with an honest validator
//! that holds only the first part of the chain, and the liar, which claims
//! all of it: once the node has what the honest peer holds, only the liar
//! can serve the rest, so it is surely asked. The test waits until the liar
//! is banned, checks nothing of it was applied, then connects a validator
//! holding the whole chain and checks the node ends with exactly the chain.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use soma_actors::discovery::SeedPeer;
use soma_actors::peer_heights::PeerView;
use soma_actors::{P2pConfig, P2pHandle};
use soma_chain::{Chain, ChainBuilder, ChainConfig};
use soma_store::{ConsensusStore, MemStore};
use soma_testkit::byzantine::{self, Lie};
use soma_testkit::{assert_same_chain, seeds, validator, validator_up_to, wait_banned, wait_until};
use soma_types::PeerId;

const DEADLINE: Duration = Duration::from_secs(120);
/// Commits of the chain, in two epochs of 250.
const TIP: u64 = 500;
/// The end of epoch 0, and all the first honest validator holds.
const EPOCH_END: u64 = 250;

fn chain() -> Arc<Chain> {
    Arc::new(
        ChainBuilder::new(ChainConfig {
            commits_per_epoch: Some(EPOCH_END),
            ..ChainConfig::validators(4)
        })
        .build(TIP),
    )
}

/// A running attack: the node under attack, its store, the liar and the
/// honest validator that holds the chain up to [`EPOCH_END`].
struct Attack {
    chain: Arc<Chain>,
    node: P2pHandle,
    store: Arc<dyn ConsensusStore>,
    liar: PeerId,
    /// Block fetches the liar answered NOT_FOUND.
    denied: Arc<AtomicUsize>,
    /// The liar's calls stalled right now.
    stalled: Arc<AtomicUsize>,
    partial: P2pHandle,
}

impl Attack {
    async fn start(lie: Lie, config: P2pConfig) -> Attack {
        let config = P2pConfig {
            timeout: Duration::from_secs(3),
            // Bans must outlast the test, to be observed.
            ban_duration: Duration::from_secs(3_600),
            ..config
        };
        Attack::start_with(lie, config).await
    }

    /// As [`Attack::start`], with `config` as it is (its seed peers
    /// aside).
    async fn start_with(lie: Lie, config: P2pConfig) -> Attack {
        soma_testkit::init_tracing();
        let chain = chain();
        let partial = validator_up_to(&chain, EPOCH_END, 1);
        let served = byzantine::serve_observed(chain.clone(), lie, 100).await;
        let mut seed_peers = seeds(&[&partial]);
        seed_peers.push(served.seed());
        let store: Arc<dyn ConsensusStore> = Arc::new(MemStore::new(chain.genesis()));
        let config = P2pConfig {
            seed_peers,
            ..config
        };
        let node = soma_testkit::node(&chain, 9, config, store.clone());
        Attack {
            chain,
            node,
            store,
            liar: served.peer,
            denied: served.denied,
            stalled: served.stalled,
            partial,
        }
    }

    /// Waits for the liar's ban, checks that nothing past what the honest
    /// peer holds was applied, then brings an honest validator holding
    /// the whole chain and waits for the node to sync it exactly.
    async fn liar_is_banned_then_sync_completes(self) {
        wait_banned(&self.node, &[self.liar], DEADLINE).await;
        let synced = self.store.highest_synced_commit().unwrap();
        assert!(synced.index <= EPOCH_END, "{synced:?}");
        assert_eq!(synced, self.chain.commit_ref(synced.index));
        let liar = self.liar;
        let views = self.sync_completes().await;
        let liar = views.iter().find(|v| v.peer == liar);
        assert!(liar.is_some_and(|v| v.banned_until.is_some()), "{views:?}");
    }

    /// Waits until the node has what the honest peer holds and the liar's
    /// claim past it is doubted (with a fetch held, if `holding`), then
    /// until sync completes from a full validator; the liar is never
    /// banned.
    async fn doubted_then_sync_completes(self, holding: bool) {
        soma_testkit::wait_synced(&self.node, EPOCH_END, DEADLINE).await;
        wait_doubted(&self, EPOCH_END, holding).await;
        let liar = self.liar;
        let views = self.sync_completes().await;
        let view = views.iter().find(|v| v.peer == liar).unwrap();
        assert_eq!(view.banned_until, None, "{view:?}");
    }

    /// Brings an honest validator holding the whole chain, waits for the
    /// node to sync it exactly, and returns PeerHeights' view of the
    /// peers then.
    async fn sync_completes(self) -> Vec<PeerView> {
        let full = validator(&self.chain, 2);
        self.node
            .connect(Some(full.peer_id()), full.local_addr().to_string())
            .expect("Connections takes the dial");
        soma_testkit::wait_synced(&self.node, TIP, DEADLINE).await;
        assert_same_chain(&self.chain, self.store.as_ref());
        let views = self.node.peer_heights().await.unwrap();
        self.node.shutdown().await;
        self.partial.shutdown().await;
        full.shutdown().await;
        views
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_naming_an_unexpected_epoch_get_their_server_banned_and_never_park_sync() {
    // The answer's commits say epoch u64::MAX. It used to be taken as the
    // epoch to wait for, which parked every later commit fetch for good.
    let attack = Attack::start(Lie::FutureEpoch, P2pConfig::default()).await;
    attack.liar_is_banned_then_sync_completes().await;
}

/// A restart of PeerHeights keeps its bans: a liar banned before it is
/// still banned, until the same time, after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ban_outlives_a_restart_of_peer_heights() {
    let faults = Arc::new(soma_actors::faults::FaultPlan::default());
    let config = P2pConfig {
        faults: Some(faults.clone()),
        ..P2pConfig::default()
    };
    let attack = Attack::start(Lie::FutureEpoch, config).await;
    wait_banned(&attack.node, &[attack.liar], DEADLINE).await;
    let ban = |views: Vec<soma_actors::peer_heights::PeerView>| {
        views
            .into_iter()
            .find(|v| v.peer == attack.liar)
            .and_then(|v| v.banned_until)
    };
    let before = ban(attack.node.peer_heights().await.unwrap());
    assert!(before.is_some());
    faults.panic_actor("peer_heights", 1);
    let restarted = || {
        attack
            .node
            .health()
            .actors
            .iter()
            .any(|a| a.name == "peer_heights" && a.restarts == 1)
    };
    let deadline = std::time::Instant::now() + DEADLINE;
    while !restarted() {
        assert!(std::time::Instant::now() < deadline, "never restarted");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(faults.injected("peer_heights"), 1);
    assert_eq!(ban(attack.node.peer_heights().await.unwrap()), before);
    attack.liar_is_banned_then_sync_completes().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retired_committee_cannot_extend_the_chain_past_its_epoch() {
    // Right after epoch 0 ends, the liar serves a commit of epoch 0 linked
    // to its last commit, certified by epoch 0's keys, whose leader carries
    // an end of epoch: accepted, it would fork the chain and overwrite the
    // committee of epoch 1.
    let attack = Attack::start(Lie::RetiredCommittee, P2pConfig::default()).await;
    let epoch1 = attack.chain.committee(1).unwrap().clone();
    let store = attack.store.clone();
    attack.liar_is_banned_then_sync_completes().await;
    assert_eq!(store.committee(1).unwrap(), Some(epoch1));
}

/// Waits until the attack's peer has answered NOT_FOUND to a fetch, then completes the sync from a full validator and returns the node's
/// view of that peer then.
async fn view_after_denied(attack: Attack) -> PeerView {
    let denied = attack.denied.clone();
    let what = "the peer to deny a fetch";
    wait_until(what, DEADLINE, async || denied.load(Ordering::SeqCst) > 0).await;
    let peer = attack.liar;
    let views = attack.sync_completes().await;
    let view = views.iter().find(|v| v.peer == peer);
    view.cloned()
        .unwrap_or_else(|| panic!("{peer} is not listed: {views:?}"))
}

/// The peer past the honest one's chain prunes when first asked for
/// blocks past it (of epoch 1), and denies them at once, before any
/// periodic height query has heard it pruned: as an honest node does
/// whose peers' view of it is staler than its `prune-grace`. The node
/// asks it afresh before judging, so, though the blocks, applied later
/// from another peer, existed, it is not banned (judged on its claim when
/// it was leased the fetch, or on the periodic queries' view, it was).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_pruned_the_blocks_it_denies_is_not_banned() {
    let attack = Attack::start(Lie::PrunesAtBlocksOf(1), P2pConfig::default()).await;
    let pruner = view_after_denied(attack).await;
    assert_eq!(pruner.banned_until, None, "{pruner:?}");
    // Its NOT_FOUND reached the node, as an error.
    assert!(pruner.faults > 0, "{pruner:?}");
    assert_eq!(pruner.lowest, TIP + 1, "{pruner:?}");
}

/// The same for commits: a peer that pruned the commits it denies, before
/// any periodic query heard so, is not banned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_pruned_the_commits_it_denies_is_not_banned() {
    let attack = Attack::start(Lie::PrunesAtCommitsOf(1), P2pConfig::default()).await;
    let pruner = view_after_denied(attack).await;
    assert_eq!(pruner.banned_until, None, "{pruner:?}");
    assert_eq!(pruner.lowest, TIP + 1, "{pruner:?}");
}

/// The same peer, still claiming the blocks it denies: banned once they
/// are applied from another peer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_denying_blocks_it_claims_is_banned_once_they_prove_to_exist() {
    let attack = Attack::start(Lie::WithholdsBlocksOf(1), P2pConfig::default()).await;
    let liar = view_after_denied(attack).await;
    assert!(liar.banned_until.is_some(), "{liar:?}");
}

/// The same, claiming nothing from its first denial on, so that the claim
/// it makes when asked again covers nothing: judged on the most it
/// claimed while connected, it is banned all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_denying_blocks_then_disclaiming_them_is_banned_all_the_same() {
    let lie = Lie::WithholdsBlocksThenDisclaims(1);
    let attack = Attack::start(lie, P2pConfig::default()).await;
    let liar = view_after_denied(attack).await;
    assert!(liar.banned_until.is_some(), "{liar:?}");
    assert_eq!(liar.highest, 0, "{liar:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_repeating_blocks_is_cut_off_and_banned() {
    let attack = Attack::start(Lie::RepeatsBlocks, P2pConfig::default()).await;
    attack.liar_is_banned_then_sync_completes().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_claiming_heights_it_does_not_hold_is_banned_and_its_claim_dropped() {
    let attack = Attack::start(Lie::ClaimsHeight, P2pConfig::default()).await;
    // The claim draws the node's fetches beyond what the honest peer holds.
    wait_banned(&attack.node, &[attack.liar], DEADLINE).await;
    // Once the liar is banned its claim no longer counts: what is known is
    // what the honest peer holds, not a million commits more.
    let start = std::time::Instant::now();
    loop {
        let status = attack.node.sync_status().await.unwrap();
        if status.highest_known == EPOCH_END {
            break;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "the lie still counts: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    attack.liar_is_banned_then_sync_completes().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_claiming_heights_it_refuses_as_busy_is_doubted_and_its_claim_not_counted() {
    refusing_liar_is_doubted(tonic::Code::ResourceExhausted).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_claiming_heights_it_refuses_as_unavailable_is_doubted_and_its_claim_not_counted() {
    refusing_liar_is_doubted(tonic::Code::Unavailable).await;
}

/// Waits until the liar's claim is doubted above `at` and the highest
/// known commit is `at` (and, if `holding`, the liar holds a fetch); it is
/// never banned.
async fn wait_doubted(attack: &Attack, at: u64, holding: bool) {
    let (node, start) = (&attack.node, std::time::Instant::now());
    loop {
        let status = node.sync_status().await.unwrap();
        let views = node.peer_heights().await.unwrap();
        let view = views.iter().find(|v| v.peer == attack.liar).unwrap();
        assert_eq!(view.banned_until, None, "{view:?}");
        let held = attack.stalled.load(Ordering::SeqCst) > 0;
        if (held || !holding) && status.highest_known == at && view.doubted_above == Some(at) {
            return;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "not doubted above {at}: holding {held}, {status:?}, {view:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The liar claims a million commits more than the chain has and refuses
/// every fetch with `code`, which proves no lie: it is never banned, but
/// once it fails a commit fetch past what the honest peer holds, its claim
/// above that is doubted and not counted, and sync completes when a peer
/// holding the chain comes.
async fn refusing_liar_is_doubted(code: tonic::Code) {
    let attack = Attack::start(Lie::ClaimsHeightRefusing(code), P2pConfig::default()).await;
    attack.doubted_then_sync_completes(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_served_us_then_refuses_as_busy_past_the_tip_is_doubted_there() {
    // The liar relays the true chain, so it has delivered to us, and
    // claims a million commits more, refusing every fetch past the tip as
    // busy. Once the node holds the chain, nothing but those refusals
    // comes from it: its claim past the tip is doubted, not counted.
    let attack = Attack::start(Lie::ServesThenClaimsHeightBusy, P2pConfig::default()).await;
    soma_testkit::wait_synced(&attack.node, TIP, DEADLINE).await;
    assert_same_chain(&attack.chain, attack.store.as_ref());
    let views = attack.node.peer_heights().await.unwrap();
    let liar = views.iter().find(|v| v.peer == attack.liar).unwrap();
    assert!(
        liar.throughput_bps > 0,
        "the liar never delivered: {liar:?}"
    );
    wait_doubted(&attack, TIP, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_peer_claiming_heights_holds_no_fetch_once_another_peer_can_serve_it() {
    // The liar claims a million commits more than the chain has and never
    // answers a fetch; the request timeout is ten minutes. Past what the
    // honest peer holds, only the liar claims the next commit, so the
    // commit fetch next in line is its, and no hedge finds another peer.
    let config = P2pConfig {
        timeout: Duration::from_secs(600),
        ..P2pConfig::default()
    };
    let attack = Attack::start_with(Lie::ClaimsHeightSilent, config).await;
    // Once the liar holds that fetch unanswered for a second, its claim is
    // doubted: what is known is what the honest peer holds. Then a peer
    // holding the chain comes: the held fetch goes to it as soon as it
    // claims the commit, not after the liar's ten minutes.
    attack.doubted_then_sync_completes(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sole_peer_that_served_us_and_refuses_as_busy_is_never_doubted() {
    // The attack of filling an honest node's fetch slots, seen from a node
    // syncing from it alone: once the peer has served a commit batch, it
    // refuses every second commit fetch as busy. It is loaded, not lying:
    // were its claim doubted, the highest known would fall to what the
    // node holds and the catch-up would stop for each doubt's length.
    soma_testkit::init_tracing();
    let chain = Arc::new(ChainBuilder::new(ChainConfig::validators(4)).build(LOADED_TIP));
    let loaded = byzantine::serve_observed(chain.clone(), Lie::BusyWhenLoaded, 100).await;
    // Loaded once a batch it served is applied (so it has delivered).
    let (node, store) = node_synced_from(&chain, &loaded, 1).await;
    loaded.load();
    let start = std::time::Instant::now();
    loop {
        let status = node.sync_status().await.unwrap();
        let views = node.peer_heights().await.unwrap();
        let view = views.iter().find(|v| v.peer == loaded.peer).unwrap();
        assert_eq!(
            (status.highest_known, view.doubted_above, view.banned_until),
            (LOADED_TIP, None, None),
            "{status:?} {view:?}"
        );
        if status.synced == LOADED_TIP {
            break;
        }
        assert!(start.elapsed() < DEADLINE, "sync stalled: {status:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_same_chain(&chain, store.as_ref());
    // The load was met: commit fetches were refused while it lasted.
    let refused = loaded.denied.load(Ordering::SeqCst);
    assert!(refused > 0, "no commit fetch was refused");
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetch_the_pipeline_waits_on_refused_as_busy_goes_at_once_to_a_free_peer() {
    // A peer that served us well refuses every second commit fetch as
    // busy from now on (the first included), and an honest validator,
    // never measured, has free slots. The loaded peer, good, is asked
    // first; its refusal of that fetch at the head of the pipeline goes on
    // to the validator in the same worker, so the core never hears of a
    // failure (each it hears of is a restart, retried only at its next
    // tick).
    soma_testkit::init_tracing();
    let chain = Arc::new(
        ChainBuilder::new(ChainConfig {
            transactions_per_block: 0,
            ..ChainConfig::validators(4)
        })
        .build(HEAD_TIP),
    );
    let loaded = byzantine::serve_observed(chain.clone(), Lie::BusyWhenLoaded, 100).await;
    let store: Arc<dyn ConsensusStore> = Arc::new(MemStore::new(chain.genesis()));
    let mut config = P2pConfig {
        seed_peers: vec![loaded.seed()],
        ..P2pConfig::default()
    };
    // The executor holds sync at a batch until the validator has joined.
    config.state_sync.max_lead_over_execution = HEAD_LEAD;
    let node = soma_testkit::node(&chain, 9, config, store.clone());
    let mut executor = node.subscribe_executor_from(1).expect("the executor");
    wait_until(
        "the first batch from the loaded peer alone",
        DEADLINE,
        async || {
            let status = node.sync_status().await.unwrap();
            status.synced == HEAD_LEAD && status.paused_for_executor
        },
    )
    .await;
    let before = node.sync_status().await.unwrap();
    assert_eq!(
        (before.restarts, loaded.denied.load(Ordering::SeqCst)),
        (0, 0)
    );
    let views = node.peer_heights().await.unwrap();
    let view = views.iter().find(|v| v.peer == loaded.peer).unwrap();
    // Good for commit fetches, so ranked above a peer never measured.
    let good = soma_actors::peer_heights::GOOD_COMMIT_THROUGHPUT_BPS;
    assert!(view.commit_throughput_bps >= good, "{view:?}");

    loaded.load();
    let honest = validator(&chain, 1);
    node.connect(Some(honest.peer_id()), honest.local_addr().to_string())
        .expect("Connections takes the dial");
    wait_until("the validator's height", DEADLINE, async || {
        let views = node.peer_heights().await.unwrap();
        (views.iter()).any(|v| v.peer == honest.peer_id() && v.highest == HEAD_TIP)
    })
    .await;
    for index in 1..=HEAD_TIP {
        let subdag = executor.next().await.expect("every commit");
        assert_eq!(subdag.commit_ref, chain.commit_ref(index));
    }
    assert_same_chain(&chain, store.as_ref());
    let status = node.sync_status().await.unwrap();
    let refused = loaded.denied.load(Ordering::SeqCst);
    // The loaded peer was asked first, and refused.
    assert!(refused > 0, "no commit fetch was refused: {status:?}");
    assert_eq!(status.restarts, 0, "{refused} refused: {status:?}");
    node.shutdown().await;
}

/// Commits of the chain of the hand-on test: all within a batch of the
/// first [`HEAD_LEAD`], so that every fetch after them is at the head.
const HEAD_TIP: u64 = 400;
const HEAD_LEAD: u64 = 200;

/// Three honest validators join `node`, which then holds the whole chain;
/// their handles.
async fn validators_join_then_sync_completes(
    chain: &Chain,
    node: &P2pHandle,
    store: &dyn ConsensusStore,
) -> Vec<P2pHandle> {
    let honest: Vec<P2pHandle> = (1..=3).map(|k| validator(chain, k)).collect();
    for h in &honest {
        node.connect(Some(h.peer_id()), h.local_addr().to_string())
            .expect("Connections takes the dial");
    }
    soma_testkit::wait_synced(node, TIP, DEADLINE).await;
    assert_same_chain(chain, store);
    honest
}

/// A node on a MemStore whose only seed is `served`, once it has
/// `synced` commits from it.
async fn node_synced_from(
    chain: &Chain,
    served: &byzantine::Served,
    synced: u64,
) -> (P2pHandle, Arc<dyn ConsensusStore>) {
    let store: Arc<dyn ConsensusStore> = Arc::new(MemStore::new(chain.genesis()));
    let config = P2pConfig {
        seed_peers: vec![served.seed()],
        ..P2pConfig::default()
    };
    let node = soma_testkit::node(chain, 9, config, store.clone());
    wait_until("commits from the seed alone", DEADLINE, async || {
        node.sync_status().await.unwrap().synced >= synced
    })
    .await;
    (node, store)
}

/// Commits of the chain served by a loaded peer: enough commit fetches
/// remain after the first batch is applied (at most 8 are ahead).
const LOADED_TIP: u64 = 2_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verifier_back_pressure_is_never_charged_to_the_serving_peer() {
    // A Verifier that admits one request at a time refuses most of the
    // node's parallel requests as busy: a failure on our side, retried,
    // never counted against the honest peer that served the data.
    let chain = chain();
    let honest = validator(&chain, 1);
    let store: Arc<dyn ConsensusStore> = Arc::new(MemStore::new(chain.genesis()));
    let mut config = P2pConfig {
        seed_peers: seeds(&[&honest]),
        ..P2pConfig::default()
    };
    config.verifier.queue_capacity = 1;
    let node = soma_testkit::node(&chain, 9, config, store.clone());
    soma_testkit::wait_synced(&node, TIP, DEADLINE).await;
    assert_same_chain(&chain, store.as_ref());
    let status = node.sync_status().await.unwrap();
    assert!(
        status.restarts > 0,
        "the Verifier was never busy: {status:?}"
    );
    assert_eq!(status.invalid_responses, 0, "{status:?}");
    let views = node.peer_heights().await.unwrap();
    let view = views
        .iter()
        .find(|v| v.peer == honest.peer_id())
        .expect("the honest peer is tracked");
    assert_eq!((view.faults, view.banned_until), (0, None), "{view:?}");
    node.shutdown().await;
    honest.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_peer_measured_first_does_not_keep_faster_peers_from_being_tried() {
    // The slow peer (every answer 1.5 s late) is the only one at first, so
    // it is the first and only peer measured. Unmeasured peers rank below
    // good measured ones and above slow ones (the PeerHeights core test
    // `unmeasured_peer_ranks_below_good_peers_and_above_slow_ones`): once
    // the honest validators are known, they carry the chain, and the slow
    // peer is asked nothing more.
    let chain = chain();
    let served = byzantine::serve_observed(chain.clone(), Lie::Slow, 100).await;
    let slow = served.peer;
    let store: Arc<dyn ConsensusStore> = Arc::new(MemStore::new(chain.genesis()));
    let config = P2pConfig {
        seed_peers: vec![served.seed()],
        ..P2pConfig::default()
    };
    let node = soma_testkit::node(&chain, 9, config, store.clone());
    wait_until("the slow peer measured", DEADLINE, async || {
        let views = node.peer_heights().await.unwrap();
        views.iter().any(|v| v.peer == slow && v.throughput_bps > 0)
    })
    .await;
    let honest: Vec<P2pHandle> = (1..=3).map(|k| validator(&chain, k)).collect();
    for h in &honest {
        node.connect(Some(h.peer_id()), h.local_addr().to_string())
            .expect("Connections takes the dial");
    }
    wait_until(
        "the honest validators' heights known",
        DEADLINE,
        async || {
            let views = node.peer_heights().await.unwrap();
            honest.iter().all(|h| {
                views
                    .iter()
                    .any(|v| v.peer == h.peer_id() && v.highest == TIP)
            })
        },
    )
    .await;
    let asked = served.fetches.load(Ordering::SeqCst);
    soma_testkit::wait_synced(&node, TIP, DEADLINE).await;
    assert_same_chain(&chain, store.as_ref());
    // Once the honest validators are known, the slow peer is asked
    // nothing more: every fetch goes to one of them.
    assert_eq!(
        served.fetches.load(Ordering::SeqCst),
        asked,
        "the slow peer was asked again beside the honest validators"
    );
    let views = node.peer_heights().await.unwrap();
    let tried = honest
        .iter()
        .filter(|h| {
            views
                .iter()
                .any(|v| v.peer == h.peer_id() && v.throughput_bps > 0)
        })
        .count();
    assert!(tried > 0, "no honest peer was ever tried: {views:?}");
    node.shutdown().await;
    for h in honest {
        h.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_answering_each_commit_fetch_with_one_commit_leaves_the_chain_to_the_others() {
    // The peer serves the true chain, but each commit fetch with its first
    // commit alone and its certificate: legal, since an answer may end at
    // any commit its server can certify. Alone, it is the node's only
    // source, and the chain comes a commit at a time; once honest
    // validators come, they carry the rest, and the peer's short answers
    // are no fault of its.
    let chain = chain();
    let short = byzantine::serve_observed(chain.clone(), Lie::OneCommit, 100).await;
    let (node, store) = node_synced_from(&chain, &short, 3).await;
    let honest = validators_join_then_sync_completes(&chain, &node, store.as_ref()).await;
    let views = node.peer_heights().await.unwrap();
    let view = views.iter().find(|v| v.peer == short.peer).unwrap();
    assert_eq!((view.faults, view.banned_until), (0, None), "{view:?}");
    // Each of its commit answers brought one commit: it served a small
    // part of the 500, the honest validators the rest. Its commit
    // answers, scored by their share of what was asked, rank it for
    // commit fetches far below its block answers (which came whole) and
    // below every validator that served commits (each over 100 times:
    // about 900 B/s against 2–130 MB/s and 26–30 MB/s here).
    let served = |p: PeerId| views.iter().any(|v| v.peer == p && v.throughput_bps > 0);
    assert!(honest.iter().any(|h| served(h.peer_id())), "{views:?}");
    assert!(view.commit_throughput_bps > 0, "{view:?}");
    assert!(
        view.commit_throughput_bps * 100 < view.throughput_bps,
        "{view:?}"
    );
    for v in views
        .iter()
        .filter(|v| v.peer != short.peer && v.commit_throughput_bps > 0)
    {
        assert!(
            view.commit_throughput_bps * 100 < v.commit_throughput_bps,
            "{views:?}"
        );
    }
    let fetches = short.fetches.load(Ordering::SeqCst);
    assert!(
        fetches < TIP as usize / 2,
        "{fetches} fetches to the short peer"
    );
    node.shutdown().await;
    for h in honest {
        h.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retired_committees_batch_never_gets_the_honest_peers_after_it_banned() {
    soma_testkit::init_tracing();
    // Epochs of 20 commits: 24 epoch ends at which the liar, holding every
    // retired committee's keys, answers a fetch from the commit after the
    // end with commits continuing the ended epoch to the end of the range
    // asked (up to 80: four epochs' worth), each naming a new block nobody
    // serves. Fetched ahead of its turn, before the end is applied, that
    // batch is certified like any other. Then each honest answer about
    // what follows must not be blamed on its server:
    // - the commits after it do not link to it, and are of an epoch one or
    //   more ahead (a claim, judged once the end is applied);
    // - its blocks are NOT_FOUND (no proof of a lie before every batch
    //   before theirs is applied).
    // Whether the liar is asked for such a range while the end is not
    // applied depends on timing, so eight fresh nodes catch up in turn.
    let chain = Arc::new(
        ChainBuilder::new(ChainConfig {
            commits_per_epoch: Some(20),
            ..ChainConfig::validators(4)
        })
        .build(TIP),
    );
    let honest: Vec<P2pHandle> = (1..=3).map(|k| validator(&chain, k)).collect();
    let (liar, address) = byzantine::serve(chain.clone(), Lie::RetiredCommittee, 100).await;
    let mut seed_peers = seeds(&honest.iter().collect::<Vec<_>>());
    seed_peers.push(SeedPeer {
        peer_id: Some(liar),
        address,
    });
    for key in 9..17 {
        let store: Arc<dyn ConsensusStore> = Arc::new(MemStore::new(chain.genesis()));
        let config = P2pConfig {
            seed_peers: seed_peers.clone(),
            // A wrongful ban would outlast the test.
            ban_duration: Duration::from_secs(3_600),
            ..P2pConfig::default()
        };
        let node = soma_testkit::node(&chain, key, config, store.clone());
        soma_testkit::wait_synced(&node, TIP, DEADLINE).await;
        assert_same_chain(&chain, store.as_ref());
        let views = node.peer_heights().await.unwrap();
        for h in &honest {
            let view = views.iter().find(|v| v.peer == h.peer_id());
            assert!(
                view.is_some_and(|v| v.banned_until.is_none()),
                "node {key}: an honest peer was banned: {views:?}"
            );
        }
        node.shutdown().await;
    }
    for h in honest {
        h.shutdown().await;
    }
}

/// A peer that never answers PushCommit holds up pushes to itself only:
/// the node pushes each new height to its other peers at once, and keeps
/// one push at most on its way to the staller. Pushes used to go out in
/// rounds, one round at a time, each waiting for every peer: one such peer
/// held a round for the whole request timeout, and every push meanwhile
/// was dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_never_answers_pushes_holds_up_only_pushes_to_itself() {
    let chain = Arc::new(ChainBuilder::new(ChainConfig::validators(4)).build(10));
    let staller = byzantine::serve_observed(chain.clone(), Lie::StallsPushes, 100).await;
    // Heights are asked only as a connection opens, so the follower learns
    // of each commit from the producer's push alone; a push the staller
    // holds waits the whole (long) request timeout.
    let quiet = || P2pConfig {
        height_query_interval: Duration::from_secs(3_600),
        timeout: Duration::from_secs(600),
        ..P2pConfig::default()
    };
    let mut config = quiet();
    config.discovery.interval_ms = 50;
    let empty = || Arc::new(MemStore::new(chain.genesis()));
    let producer = soma_testkit::node(&chain, 1, config, empty());
    producer
        .connect(Some(staller.peer), staller.address.clone())
        .unwrap();
    let config = P2pConfig {
        seed_peers: seeds(&[&producer]),
        ..quiet()
    };
    let follower = soma_testkit::node(&chain, 2, config, empty());
    let heard = [staller.peer, follower.peer_id()];
    wait_until("the producer hears both heights", DEADLINE, async || {
        let views = producer.peer_heights().await.unwrap();
        let heard_from = |peer| views.iter().any(|v| v.peer == peer && v.chain_id.is_some());
        heard.iter().all(|p| heard_from(*p))
    })
    .await;
    let wait = Duration::from_secs(30);
    let local = |i| soma_testkit::local_commit(&chain, i);
    for i in 1..=5 {
        producer.send_commit(local(i)).await.unwrap();
        soma_testkit::wait_synced(&follower, i, wait).await;
    }
    // A burst: heights that rise while a push is on its way reach the
    // follower with the push after it.
    for i in 6..=10 {
        producer.send_commit(local(i)).await.unwrap();
    }
    soma_testkit::wait_synced(&follower, 10, wait).await;
    assert_eq!(staller.stalled.load(Ordering::SeqCst), 1);
    follower.shutdown().await;
    producer.shutdown().await;
}
