//! State sync over real mutual-TLS gRPC: a fresh node catches up from
//! validators, verifies everything, applies in order, and ends with the same
//! store.

use std::sync::Arc;
use std::time::{Duration, Instant};

use soma_actors::discovery::SeedPeer;
use soma_actors::{P2pBuilder, P2pConfig, P2pHandle};
use soma_chain::{Chain, ChainBuilder, ChainConfig};
use soma_store::{ConsensusStore, MemStore};
use soma_types::KeyPair;

const DEADLINE: Duration = Duration::from_secs(180);
/// A request timeout no test waits out.
const HOUR: Duration = Duration::from_secs(3_600);

use soma_testkit::{seeds, validator};

fn fresh(
    chain: &Chain,
    key: u8,
    peers: &[&P2pHandle],
    store: Arc<dyn ConsensusStore>,
) -> P2pHandle {
    let config = P2pConfig {
        seed_peers: seeds(peers),
        synced_commit_broadcast_capacity: 10_000,
        ..P2pConfig::default()
    };
    soma_testkit::node(chain, key, config, store)
}

async fn wait_synced(node: &P2pHandle, target: u64) {
    soma_testkit::wait_synced(node, target, DEADLINE).await;
}

fn assert_same_chain(chain: &Chain, store: &dyn ConsensusStore) {
    soma_testkit::assert_same_chain(chain, store);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fresh_node_catches_up_5000_commits_over_3_epochs_from_3_peers() {
    let chain = ChainBuilder::new(ChainConfig {
        commits_per_epoch: Some(1_800),
        ..ChainConfig::validators(4)
    })
    .build(5_000);
    assert_eq!(chain.committees().count(), 3);
    let validators: Vec<P2pHandle> = (1..=3).map(|k| validator(&chain, k)).collect();
    let store: Arc<dyn ConsensusStore> = Arc::new(MemStore::new(chain.genesis()));
    let node = fresh(
        &chain,
        9,
        &validators.iter().collect::<Vec<_>>(),
        store.clone(),
    );
    let mut commits = node.subscribe_synced_commits();
    let collector = tokio::spawn(async move {
        let mut seen = Vec::new();
        while seen.len() < 5_000 {
            match commits.recv().await {
                Ok(subdag) => seen.push(subdag.commit_ref),
                Err(e) => panic!("subscriber lost commits: {e}"),
            }
        }
        seen
    });

    wait_synced(&node, 5_000).await;
    let seen = tokio::time::timeout(DEADLINE, collector)
        .await
        .unwrap()
        .unwrap();
    let expected: Vec<_> = (1..=5_000).map(|i| chain.commit_ref(i)).collect();
    assert_eq!(seen, expected, "every commit exactly once, in order");
    assert_same_chain(&chain, store.as_ref());

    let status = node.sync_status().await.unwrap();
    assert_eq!(status.commits_applied, 5_000);
    assert_eq!(status.blocks_applied as usize, chain.block_count());
    node.shutdown().await;
    for v in validators {
        v.shutdown().await;
    }
}

/// The benchmarks' wait returns once the commit waited for is applied,
/// whether the node hands it over while the waiter listens, or applied it
/// before the wait began.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_for_a_commit_returns_once_it_is_applied() {
    let chain = ChainBuilder::new(ChainConfig::validators(4)).build(1_000);
    let validators: Vec<P2pHandle> = (1..=2).map(|k| validator(&chain, k)).collect();
    let store: Arc<dyn ConsensusStore> = Arc::new(MemStore::new(chain.genesis()));
    let node = fresh(
        &chain,
        9,
        &validators.iter().collect::<Vec<_>>(),
        store.clone(),
    );
    let watermark = || store.highest_synced_commit().unwrap().index;
    soma_testkit::wait_applied(&node, 600, DEADLINE).await;
    assert!(watermark() >= 600, "returned at {}", watermark());
    soma_testkit::wait_applied(&node, 1_000, DEADLINE).await;
    assert_eq!(watermark(), 1_000);
    // Applied before the wait: it returns at once.
    soma_testkit::wait_applied(&node, 1_000, Duration::ZERO).await;
    node.shutdown().await;
    for v in validators {
        v.shutdown().await;
    }
}

mod byzantine {
    //! Peers that lie. With one honest validator present, sync completes,
    //! nothing bad is stored or broadcast, and each liar is banned.

    use std::sync::atomic::Ordering;

    use soma_actors::peer_heights::PeerView;
    use soma_types::{AuthorityIndex, PeerId};

    pub(super) use soma_testkit::byzantine::{Lie, serve, serve_observed};
    use soma_testkit::byzantine::{
        Served, serve_denying_commit_hedges, serve_observed_slow_heights,
        serve_spoiling_commit_hedges, serve_spoiling_hedges, serve_withholding_hedges,
    };

    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sync_completes_from_the_honest_peer_and_every_liar_is_banned() {
        let chain = Arc::new(
            ChainBuilder::new(ChainConfig {
                commits_per_epoch: Some(250),
                ..ChainConfig::validators(4)
            })
            .build(600),
        );
        let honest = validator(&chain, 1);
        let lies = [
            Lie::ForgedCertifierSignature,
            Lie::BrokenDigestChain,
            Lie::ShortCertificate,
            Lie::WrongBlock,
            Lie::MissingBlock,
            Lie::ExtraBlock,
            Lie::OtherChain,
            Lie::NeverAnswers,
            Lie::StreamsForever,
        ];
        let mut liars = Vec::new();
        for (i, lie) in lies.iter().enumerate() {
            liars.push((
                *lie,
                serve_observed(chain.clone(), *lie, 100 + i as u8).await,
            ));
        }
        // Only liars at first, so that every one of them is asked.
        let seeds: Vec<SeedPeer> = liars.iter().map(|(_, served)| served.seed()).collect();
        let store: Arc<dyn ConsensusStore> = Arc::new(MemStore::new(chain.genesis()));
        let config = P2pConfig {
            seed_peers: seeds,
            timeout: Duration::from_secs(2),
            // Bans must outlast the test, to be observed.
            ban_duration: Duration::from_secs(3_600),
            synced_commit_broadcast_capacity: 10_000,
            connections: soma_actors::connections::Config {
                max_connections: 32,
                ..Default::default()
            },
            ..P2pConfig::default()
        };
        let node = P2pBuilder::new(
            config,
            KeyPair::from_seed([9; 32]),
            chain.genesis().clone(),
            store.clone(),
        )
        .start()
        .unwrap();
        let mut commits = node.subscribe_synced_commits();
        let collector = tokio::spawn(async move {
            let mut seen = Vec::new();
            while seen.len() < 600 {
                seen.push(commits.recv().await.expect("no commit lost").commit_ref);
            }
            seen
        });

        let silent = &liars
            .iter()
            .find(|(lie, _)| *lie == Lie::NeverAnswers)
            .expect("a silent peer")
            .1;
        // Every liar that sends bad data is caught and banned.
        let data_liars: Vec<soma_types::PeerId> = liars
            .iter()
            .filter(|(lie, _)| !matches!(lie, Lie::OtherChain | Lie::NeverAnswers))
            .map(|(_, served)| served.peer)
            .collect();
        let start = Instant::now();
        loop {
            let views = node.peer_heights().await.unwrap();
            let banned = data_liars
                .iter()
                .filter(|p| {
                    views
                        .iter()
                        .any(|v| v.peer == **p && v.banned_until.is_some())
                })
                .count();
            // The silent peer is the last left to ask: it is asked, and
            // scored down for its silence (a fetch it holds times out),
            // before the honest peer comes. Were the honest peer connected
            // while the silent one still held a fetch, that fetch could be
            // answered by the honest peer and dropped uncharged (a known
            // gap: docs/reliability.md, answers a reset forgets).
            let silent_scored = views
                .iter()
                .any(|v| v.peer == silent.peer && v.faults + u64::from(v.failures) > 0);
            if banned == data_liars.len() && silent.fetches() > 0 && silent_scored {
                break;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "{banned} liars banned, silent peer asked {} times: {views:?}",
                silent.fetches()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Nothing a liar sent was applied.
        assert_eq!(store.highest_synced_commit().unwrap().index, 0);

        // With an honest peer, sync completes; nothing bad is stored or
        // broadcast.
        node.connect(Some(honest.peer_id()), honest.local_addr().to_string())
            .expect("Connections takes the dial");
        wait_synced(&node, 600).await;
        assert_same_chain(&chain, store.as_ref());
        let seen = tokio::time::timeout(DEADLINE, collector)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            seen,
            (1..=600).map(|i| chain.commit_ref(i)).collect::<Vec<_>>()
        );

        // The peer on another chain is never asked for anything; the
        // silent one was asked, and is only scored down, not banned.
        let views = node.peer_heights().await.unwrap();
        for (lie, served) in &liars {
            let view = views.iter().find(|v| v.peer == served.peer);
            match lie {
                Lie::OtherChain => {
                    assert_ne!(view.and_then(|v| v.chain_id), Some(chain.chain_id()));
                    assert_eq!(
                        served.fetches(),
                        0,
                        "a peer of another chain was fetched from"
                    );
                }
                Lie::NeverAnswers => {
                    assert!(served.fetches() > 0, "the silent peer was never asked");
                    // Timed out (a fault) or beaten by another peer asked
                    // once it was late (a failure): scored down either way.
                    let view = view.expect("the silent peer is known");
                    assert!(view.faults + u64::from(view.failures) > 0, "{view:?}");
                    assert_eq!(view.banned_until, None, "{view:?}");
                }
                _ => assert!(served.fetches() > 0, "{lie:?} was never asked"),
            }
        }
        let status = node.sync_status().await.unwrap();
        assert!(
            status.invalid_responses >= data_liars.len() as u64,
            "{status:?}"
        );
        node.shutdown().await;
        honest.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_fetch_a_silent_peer_holds_is_asked_of_another_peer_long_before_its_timeout() {
        let chain = Arc::new(ChainBuilder::new(ChainConfig::validators(4)).build(600));
        let honest = validator(&chain, 1);
        let silent = serve_observed(chain.clone(), Lie::NeverAnswers, 120).await;
        let mut seed_peers = seeds(&[&honest]);
        seed_peers.push(silent.seed());
        let store: Arc<dyn ConsensusStore> = Arc::new(MemStore::new(chain.genesis()));
        let config = P2pConfig {
            seed_peers,
            // A fetch the silent peer holds would hold sync for an hour.
            timeout: Duration::from_secs(3_600),
            // One fetch per peer at once: while the honest peer serves
            // one, the next goes to the silent peer.
            max_fetches_per_peer: 1,
            synced_commit_broadcast_capacity: 10_000,
            ..P2pConfig::default()
        };
        let node = soma_testkit::node(&chain, 9, config, store.clone());
        wait_synced(&node, 600).await;
        assert_same_chain(&chain, store.as_ref());
        // It was asked, found late once the honest peer answered in its
        // place, and ranks lower for it; silence within the timeout is no
        // fault, and proves no lie.
        assert!(silent.fetches() > 0, "the silent peer was never asked");
        let views = node.peer_heights().await.unwrap();
        let view = views.iter().find(|v| v.peer == silent.peer);
        let view = view.expect("the silent peer is known");
        assert!(view.failures > 0, "{view:?}");
        assert_eq!((view.faults, view.banned_until), (0, None), "{view:?}");
        // Each failure is a fetch the honest peer's answer won, or a hedge
        // to the silent peer that outwaited its delay, and only the silent
        // peer, which never answers, was ever beaten.
        let status = node.sync_status().await.unwrap();
        let beaten = status.hedges_won + status.hedges_late;
        assert_eq!(beaten, u64::from(view.failures), "{status:?}");
        node.shutdown().await;
        honest.shutdown().await;
    }

    /// Three silent peers hold several fetches at once, each hedged. Two
    /// calls of a hedged fetch may each hold up to the fetch's
    /// reservation, so hedges take theirs from a budget of their own
    /// before they are sent: with a budget smaller than any hedge, each
    /// waits until no other is in flight (a hedge that went to another
    /// silent peer holds the budget until the timeout), and the catch-up
    /// still completes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn hedges_wait_for_room_in_their_budget_and_sync_completes() {
        let chain = Arc::new(ChainBuilder::new(ChainConfig::validators(4)).build(600));
        let honest = validator(&chain, 1);
        let mut seed_peers = seeds(&[&honest]);
        let mut silent = Vec::new();
        for key in 125..128 {
            let peer = serve_observed(chain.clone(), Lie::NeverAnswers, key).await;
            seed_peers.push(peer.seed());
            silent.push(peer);
        }
        let store: Arc<dyn ConsensusStore> = Arc::new(MemStore::new(chain.genesis()));
        let mut config = P2pConfig {
            seed_peers,
            timeout: Duration::from_secs(2),
            // Two fetches per peer at once: while the honest peer serves
            // two, the next go to the silent peers.
            max_fetches_per_peer: 2,
            synced_commit_broadcast_capacity: 10_000,
            ..P2pConfig::default()
        };
        // Small block fetches, many at once: the silent peers hold several.
        config.state_sync.max_blocks_per_fetch = 40;
        config.state_sync.max_hedged_bytes = 1024;
        let node = soma_testkit::node(&chain, 9, config, store.clone());
        wait_synced(&node, 600).await;
        assert_same_chain(&chain, store.as_ref());
        let status = node.sync_status().await.unwrap();
        let held: usize = silent.iter().map(|s| s.fetches()).sum();
        assert!(held > 1, "{held}");
        assert!(status.hedges_won > 0, "{status:?}");
        assert!(status.hedges_sent >= status.hedges_won, "{status:?}");
        assert_eq!(status.most_hedges_at_once, 1, "{status:?}");
        node.shutdown().await;
        honest.shutdown().await;
    }

    /// The same attack with the request timeout at an hour, and no honest
    /// peer at first: three silent peers hold the commit fetches, and the
    /// budget has room for one hedge, which goes to another silent peer.
    /// Such a hedge held its share until the timeout, with nothing to show
    /// for it, and every other late fetch waited that long for room: the
    /// catch-up stalled for an hour whoever connected later. A hedge late
    /// itself now gives its share up to a hedge waiting for room. Once two
    /// have given way, an honest validator is dialled: the hedges reach it,
    /// and the catch-up completes, the honest peer never ranked lower.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_late_hedge_gives_its_share_up_to_a_hedge_waiting_for_room() {
        let chain = Arc::new(ChainBuilder::new(ChainConfig::validators(4)).build(600));
        let mut silent = Vec::new();
        for key in 113..116 {
            silent.push(serve_observed(chain.clone(), Lie::NeverAnswers, key).await);
        }
        let store: Arc<dyn ConsensusStore> = Arc::new(MemStore::new(chain.genesis()));
        let mut config = P2pConfig {
            seed_peers: silent.iter().map(|s| s.seed()).collect(),
            // A share held until the timeout holds the catch-up an hour.
            timeout: Duration::from_secs(3_600),
            max_fetches_per_peer: 2,
            synced_commit_broadcast_capacity: 10_000,
            ..P2pConfig::default()
        };
        config.state_sync.max_hedged_bytes = 1024;
        let node = soma_testkit::node(&chain, 9, config, store.clone());
        let given_way = async || {
            let status = node.sync_status().await.unwrap();
            status.hedges_given_way >= 2
        };
        soma_testkit::wait_until("two hedges to give way", DEADLINE, given_way).await;
        let (honest, views) = synced_from_an_honest_peer_dialled(&node, &chain, store).await;
        let status = node.sync_status().await.unwrap();
        // Every hedge sent before the honest peer came went to a silent
        // peer, and one ended only by giving way to the next.
        assert!(status.hedges_sent > status.hedges_given_way, "{status:?}");
        // Giving way proves no lie.
        let silent: Vec<PeerId> = silent.iter().map(|s| s.peer).collect();
        assert_no_lie_proved(&views, &silent);
        node.shutdown().await;
        honest.shutdown().await;
    }

    /// Dials an honest validator, waits until the node has synced the
    /// chain, and checks what it stored, and that the honest peer was
    /// never held at fault. Returns the validator, to shut down, and the
    /// node's peer table.
    async fn synced_from_an_honest_peer_dialled(
        node: &P2pHandle,
        chain: &Chain,
        store: Arc<dyn ConsensusStore>,
    ) -> (P2pHandle, Vec<PeerView>) {
        let honest = validator(chain, 1);
        node.connect(Some(honest.peer_id()), honest.local_addr().to_string())
            .expect("Connections takes the dial");
        wait_synced(node, chain.tip()).await;
        assert_same_chain(chain, store.as_ref());
        let views = node.peer_heights().await.unwrap();
        assert_unbanned_with(&views, honest.peer_id(), (0, 0));
        (honest, views)
    }

    /// `peer`'s row of the peer table.
    fn view(views: &[PeerView], peer: PeerId) -> &PeerView {
        views.iter().find(|v| v.peer == peer).expect("tracked")
    }

    /// Asserts that `peer` has exactly `failures` and `faults`, and no ban.
    fn assert_unbanned_with(views: &[PeerView], peer: PeerId, (failures, faults): (u32, u64)) {
        let v = view(views, peer);
        let fate = (v.failures, v.faults, v.banned_until);
        assert_eq!(fate, (failures, faults, None), "{v:?}");
    }

    /// Asserts that none of `peers` was found at fault, nor banned.
    fn assert_no_lie_proved(views: &[PeerView], peers: &[PeerId]) {
        for &peer in peers {
            let v = view(views, peer);
            assert_eq!((v.faults, v.banned_until), (0, None), "{v:?}");
        }
    }

    /// The commit fetch the pipeline waits on is asked of a silent peer
    /// and, late, hedged to the only other, silent too, with the request
    /// timeout at an hour and no other hedge to give way to. The hedge
    /// held the fetch on its silent peer, and the catch-up stalled for the
    /// hour, though an honest peer dialled meanwhile stood idle (this
    /// stalled the test above about once in forty runs on a loaded
    /// machine). A late hedge now moves on to a peer not yet asked for its
    /// fetch: the honest peer, dialled once both silent peers hold the
    /// fetch, takes it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_late_hedge_moves_on_to_a_peer_not_yet_asked_for_its_fetch() {
        let chain = Arc::new(ChainBuilder::new(ChainConfig::validators(4)).build(20));
        let mut silent = Vec::new();
        for key in 140..142 {
            silent.push(serve_observed(chain.clone(), Lie::NeverAnswers, key).await);
        }
        let store: Arc<dyn ConsensusStore> = Arc::new(MemStore::new(chain.genesis()));
        let config = P2pConfig {
            seed_peers: silent.iter().map(|s| s.seed()).collect(),
            // A fetch held until the timeout holds the catch-up an hour.
            timeout: Duration::from_secs(3_600),
            ..P2pConfig::default()
        };
        let node = soma_testkit::node(&chain, 9, config, store.clone());
        // The one commit fetch, and its hedge.
        let held = async || silent.iter().all(|s| s.fetches() == 1);
        soma_testkit::wait_until("both silent peers to hold the fetch", DEADLINE, held).await;
        let status = node.sync_status().await.unwrap();
        assert_eq!(
            (status.hedges_sent, status.hedges_moved),
            (1, 0),
            "{status:?}"
        );
        let (honest, views) = synced_from_an_honest_peer_dialled(&node, &chain, store).await;
        let status = node.sync_status().await.unwrap();
        // The commit fetch's hedge moved to the honest peer: nothing else
        // could end it. (Block fetches may be hedged, and move, too, as
        // the machine's load has them late.) None gave way: the budget
        // has room for every hedge.
        assert!(status.hedges_moved >= 1, "{status:?}");
        assert_eq!(status.hedges_given_way, 0, "{status:?}");
        // Being left proves no lie.
        let silent: Vec<PeerId> = silent.iter().map(|s| s.peer).collect();
        assert_no_lie_proved(&views, &silent);
        node.shutdown().await;
        honest.shutdown().await;
    }

    /// The commit fetch the pipeline waits on is held by a silent peer
    /// and hedged to another silent one; both answer height queries after
    /// a second, so the hedge's peer is late only four seconds after the
    /// hedge went out, while a hedge at the head of the pipeline may move
    /// on after the head's own wait, two. A validator dialled once the
    /// hedge is held (serving commits at once, blocks once opened) has
    /// room to spare: the hedge moves to it before the peer it leaves is
    /// late, and its answer used to count as beating that peer, a failure
    /// for not answering within a wait shorter than its late mark (a
    /// silent identity leased the head fetch could so rank each honest
    /// peer a hedge went to lower). A peer left before it was late is not
    /// beaten now. Read once the first block fetch is out: the commits'
    /// answer was checked and its verdicts taken by then, and no block
    /// fetch can end before the validator is opened.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_peer_a_head_hedge_left_before_it_was_late_is_not_beaten() {
        let chain = Arc::new(ChainBuilder::new(ChainConfig::validators(4)).build(20));
        let peers = ((Lie::NeverAnswers, 150), (Lie::NeverAnswers, 151));
        let commits: fn(&Served) -> usize = Served::commit_fetches;
        let fetches = (commits, Duration::from_secs(1), HOUR);
        let (node, (first, left), store) = hedged_once_after(&chain, peers, fetches).await;
        let (first, left) = (&first, &left);
        let validator = serve_observed(chain.clone(), Lie::HoldsBlocksUntilOpened, 152).await;
        node.connect(Some(validator.peer), validator.address.clone())
            .expect("Connections takes the dial");
        let all = [first, left, &validator];
        let blocks_asked = async || all.iter().any(|s| s.block_fetches() > 0);
        soma_testkit::wait_until("a block fetch", DEADLINE, blocks_asked).await;
        let status = node.sync_status().await.unwrap();
        let hedges = (status.hedges_sent, status.hedges_moved, status.hedges_won);
        assert_eq!(hedges, (1, 1, 1), "{status:?}");
        assert_eq!(validator.commit_fetches(), 1);
        let views = node.peer_heights().await.unwrap();
        // The peer left before it was late: no failure.
        assert_unbanned_with(&views, left.peer, (0, 0));
        // The first peer, outrun by the hedge's answer of all it asked
        // for: one failure, no fault.
        assert_unbanned_with(&views, first.peer, (1, 0));
        validator.open();
        wait_synced(&node, chain.tip()).await;
        assert_same_chain(&chain, store.as_ref());
        node.shutdown().await;
    }

    /// The one commit fetch of a chain of 20 commits is held by its first
    /// peer (an honest validator, slow here) and hedged to an identity
    /// that answers each commit fetch at once with its first commit alone
    /// (legal: an answer may end at any commit its server can certify).
    /// That part used to end the race: the first call was dropped and the
    /// other 19 commits asked again, of the identity as often as not, a
    /// commit per race (in the simulator, nodes whose usual answer time
    /// such identities set synced 5 to 10 times slower than the rest). The
    /// part is now held while the first call has the time its own peer
    /// needs (four times its round trip; the test opens it long before):
    /// the first's answer of all 20 is the fetch's, each peer is
    /// asked for commits once, and neither is held to have failed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_hedges_part_of_an_answer_waits_for_the_first_peer_to_have_its_own_time() {
        let chain = Arc::new(ChainBuilder::new(ChainConfig::validators(4)).build(20));
        let peers = ((Lie::HoldsCommitsUntilOpened, 153), (Lie::OneCommit, 154));
        // Height queries answered after a second: the hedge goes out after
        // two, and the first call is waited for until four (its round
        // trip's four times), far past the test's opening it.
        let commits: fn(&Served) -> usize = Served::commit_fetches;
        let fetches = (commits, Duration::from_secs(1), HOUR);
        let (node, (first, hedge), store) = hedged_once_after(&chain, peers, fetches).await;
        let held = async || {
            node.sync_status()
                .await
                .is_ok_and(|s| s.hedge_parts_held == 1)
        };
        soma_testkit::wait_until("the hedge's part to be held", DEADLINE, held).await;
        first.open();
        wait_synced(&node, chain.tip()).await;
        assert_same_chain(&chain, store.as_ref());
        assert_eq!((first.commit_fetches(), hedge.commit_fetches()), (1, 1));
        let status = node.sync_status().await.unwrap();
        let hedges = (
            status.hedges_sent,
            status.hedge_parts_held,
            status.hedges_won,
        );
        assert_eq!(hedges, (1, 1, 0), "{status:?}");
        let views = node.peer_heights().await.unwrap();
        for served in [&first, &hedge] {
            assert_unbanned_with(&views, served.peer, (0, 0));
        }
        node.shutdown().await;
    }

    /// As above, but the first peer never answers, and answers height
    /// queries so slowly that four times its round trip is past a tenth
    /// of the request timeout (here 20 s: 600 ms against 2 s), the most a
    /// part is held: once it has had that tenth, the part is the fetch's
    /// answer, and the first peer ranks lower for its silence once the
    /// part passes its checks, as a first peer beaten by a whole answer
    /// does. A part used to charge nobody, and a silent identity paired
    /// with one answering in parts could have held each such commit for
    /// the whole tenth, again and again. (A first peer that delivered
    /// whole blocks but was never measured for commits, whose round trip
    /// is shorter, is waited for four times it and not charged: a loaded
    /// honest validator's trip does not show its load. One that never
    /// delivered anything is charged either way.) Read once the beaten
    /// peer is counted; an honest validator dialled then completes the
    /// chain.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_first_peer_silent_past_its_own_time_is_beaten_by_a_hedges_part() {
        let chain = Arc::new(ChainBuilder::new(ChainConfig::validators(4)).build(20));
        let peers = ((Lie::NeverAnswers, 155), (Lie::OneCommit, 156));
        // The hedge goes out after twice the round trip, 1.2 s; the part
        // is taken at 2 s, and a later fetch hedged no sooner than 1.2 s
        // after that.
        let commits: fn(&Served) -> usize = Served::commit_fetches;
        let fetches = (commits, Duration::from_millis(600), Duration::from_secs(20));
        let (node, (first, _hedge), store) = hedged_once_after(&chain, peers, fetches).await;
        let won = async || node.sync_status().await.is_ok_and(|s| s.hedges_won == 1);
        soma_testkit::wait_until("the part to beat the first peer", DEADLINE, won).await;
        let status = node.sync_status().await.unwrap();
        assert_eq!(status.hedge_parts_held, 1, "{status:?}");
        let views = node.peer_heights().await.unwrap();
        assert_unbanned_with(&views, first.peer, (1, 0));
        let honest = validator(&chain, 1);
        node.connect(Some(honest.peer_id()), honest.local_addr().to_string())
            .expect("Connections takes the dial");
        wait_synced(&node, chain.tip()).await;
        assert_same_chain(&chain, store.as_ref());
        node.shutdown().await;
        honest.shutdown().await;
    }

    /// The commit fetch the pipeline waits on is held by a silent peer,
    /// the request timeout at an hour; its hedge goes to the one peer
    /// dialled next, which refuses every fetch (UNAVAILABLE, which proves
    /// no lie). A hedge whose second peer failed left the first to answer
    /// alone, so the two identities held the fetch, and the catch-up,
    /// for the hour. Now another peer is asked in the refuser's place:
    /// the honest validator dialled once the refusal is in takes it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_hedge_its_second_peer_refuses_is_asked_of_another() {
        let chain = Arc::new(ChainBuilder::new(ChainConfig::validators(4)).build(20));
        let silent = serve_observed(chain.clone(), Lie::NeverAnswers, 142).await;
        let refuser =
            serve_observed(chain.clone(), Lie::Refuses(tonic::Code::Unavailable), 143).await;
        let store: Arc<dyn ConsensusStore> = Arc::new(MemStore::new(chain.genesis()));
        let config = P2pConfig {
            seed_peers: vec![silent.seed()],
            timeout: Duration::from_secs(3_600),
            ..P2pConfig::default()
        };
        let node = soma_testkit::node(&chain, 9, config, store.clone());
        let held = async || silent.fetches() == 1;
        soma_testkit::wait_until("the silent peer to hold the fetch", DEADLINE, held).await;
        node.connect(Some(refuser.peer), refuser.address.clone())
            .expect("Connections takes the dial");
        // Its only fetch is the hedge: no commit is known yet to ask it
        // for blocks.
        let refused = async || refuser.fetches() == 1;
        soma_testkit::wait_until("the refuser to refuse the hedge", DEADLINE, refused).await;
        let status = node.sync_status().await.unwrap();
        assert_eq!((status.hedges_sent, status.synced), (1, 0), "{status:?}");
        let (honest, views) = synced_from_an_honest_peer_dialled(&node, &chain, store).await;
        let status = node.sync_status().await.unwrap();
        assert!(status.hedges_won >= 1, "{status:?}");
        // Silence proves no lie; a refusal counts against its peer, but
        // bans no one.
        assert_no_lie_proved(&views, &[silent.peer]);
        let r = view(&views, refuser.peer);
        assert_eq!(r.banned_until, None, "{r:?}");
        assert!(r.failures >= 1, "{r:?}");
        node.shutdown().await;
        honest.shutdown().await;
    }

    /// The one commit fetch is held by a peer that refuses it only once
    /// the node has hedged it to the only other peer, which holds the
    /// hedge until the test opens it. The refusal used to end the race:
    /// the hedge's call was dropped and the fetch asked again at the next
    /// tick, of the hedge's peer as often as not, a hedge delay and a tick
    /// lost each time. The hedge now goes on alone until it is late
    /// itself: its answer is the fetch's, and its peer is asked for the
    /// commits once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_hedge_goes_on_alone_when_the_first_peer_fails_after_it_went_out() {
        let chain = Arc::new(ChainBuilder::new(ChainConfig::validators(4)).build(20));
        let held = Lie::HoldsCommitsUntilOpened;
        let (node, (first, hedge), store) = refused_once_hedged(&chain, held).await;
        hedge.open();
        wait_synced(&node, chain.tip()).await;
        assert_same_chain(&chain, store.as_ref());
        // Each peer was asked for the commits once: the hedge's answer was
        // kept, not asked for again.
        let asked = (first.commit_fetches(), hedge.commit_fetches());
        assert_eq!(asked, (1, 1));
        // Each of the first peer's fetches failed once, the commit fetch
        // its hedge outlived too (few enough to stay under PeerHeights'
        // cap on failures, and none of them a hedge, with the only commit
        // fetch held by it).
        assert_won_alone(&node, (&first, first.fetches()), &hedge).await;
        node.shutdown().await;
    }

    /// As above, but the hedge's peer holds the hedge past the hedge's
    /// late mark. Bounded only by the first call's deadline, here an hour,
    /// a hedge alone on a silent peer held its fetch that long, where the
    /// race used to end at the refusal. It ends once it is late, and the
    /// fetch is asked again, of the hedge's peer (the first refuses
    /// everything now), which the test then opens.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_hedge_alone_ends_once_it_is_late_itself() {
        let chain = Arc::new(ChainBuilder::new(ChainConfig::validators(4)).build(20));
        let held = Lie::HoldsCommitsUntilOpened;
        let (node, (_first, hedge), store) = refused_once_hedged(&chain, held).await;
        let again = async || hedge.commit_fetches() == 2;
        soma_testkit::wait_until("the fetch to be asked again", DEADLINE, again).await;
        hedge.open();
        wait_synced(&node, chain.tip()).await;
        assert_same_chain(&chain, store.as_ref());
        assert_eq!(hedge.commit_fetches(), 2);
        let status = node.sync_status().await.unwrap();
        assert_eq!(status.hedges_alone, 1, "{status:?}");
        node.shutdown().await;
    }

    /// As [`a_hedge_goes_on_alone_when_the_first_peer_fails_after_it_went_out`],
    /// but the hedge's peer refuses the hedge too once it is alone. A
    /// hedge alone that fails looks for no other peer: the fetch ends with
    /// the first peer's failure, which the core retries (of an honest
    /// validator, dialled as the hedge is refused), and each failure is
    /// judged once: every fetch of either peer counts as one failure of
    /// its peer, the hedge's refusal too, which the core never sees.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_hedge_alone_that_fails_ends_the_fetch_and_both_failures_count() {
        let chain = Arc::new(ChainBuilder::new(ChainConfig::validators(4)).build(20));
        let refusing = Lie::HoldsCommitsThenRefuses(tonic::Code::Unavailable);
        let (node, (first, hedge), store) = refused_once_hedged(&chain, refusing).await;
        hedge.open();
        let (honest, views) = synced_from_an_honest_peer_dialled(&node, &chain, store).await;
        let status = node.sync_status().await.unwrap();
        let hedges = (status.hedges_alone, status.hedges_won);
        assert_eq!(hedges, (1, 0), "{status:?}");
        // Each refusal counts against its peer once, as a failure and a
        // fault (few enough to stay under PeerHeights' cap on failures),
        // but bans no one.
        for served in [&first, &hedge] {
            let v = view(&views, served.peer);
            let fetches = served.fetches();
            let fate = (v.failures as usize, v.faults as usize, v.banned_until);
            assert_eq!(fate, (fetches, fetches, None), "{v:?}");
        }
        node.shutdown().await;
        honest.shutdown().await;
    }

    /// The block fetch of a chain of 20 commits, its one chunk held by a
    /// first peer that serves the commits at once, is hedged to the only
    /// other peer, which holds the hedge until the test opens it; the
    /// first peer then refuses the fetch (UNAVAILABLE). As with commits,
    /// the hedge goes on alone, its answer is the fetch's, each peer is
    /// asked for the blocks once, and the first peer's refusal is judged
    /// aside, once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_block_hedge_goes_on_alone_when_the_first_peer_fails_after_it_went_out() {
        let chain = Arc::new(ChainBuilder::new(ChainConfig::validators(4)).build(20));
        let refusing = Lie::HoldsBlocksThenRefuses(tonic::Code::Unavailable);
        let (node, (first, hedge), store) = block_fetch_hedged(&chain, (refusing, 146)).await;
        first.open();
        let alone = async || node.sync_status().await.is_ok_and(|s| s.hedges_alone == 1);
        soma_testkit::wait_until("the block hedge to go on alone", DEADLINE, alone).await;
        hedge.open();
        wait_synced(&node, chain.tip()).await;
        assert_same_chain(&chain, store.as_ref());
        let asked = (first.block_fetches(), hedge.block_fetches());
        assert_eq!(asked, (1, 1));
        assert_eq!((first.commit_fetches(), hedge.commit_fetches()), (1, 0));
        // The first peer's refusal, judged aside, counts once.
        assert_won_alone(&node, (&first, 1), &hedge).await;
        node.shutdown().await;
    }

    /// Asserts that `node` sent one hedge, which went on alone and whose
    /// answer was the fetch's (not counted as won: the first peer had
    /// failed), that the first peer's refusals count as `failures` and
    /// ban it not, and that the hedge's peer has no failure and no fault.
    async fn assert_won_alone(
        node: &P2pHandle,
        (first, failures): (&Served, usize),
        hedge: &Served,
    ) {
        let status = node.sync_status().await.unwrap();
        let hedges = (status.hedges_sent, status.hedges_alone, status.hedges_won);
        assert_eq!(hedges, (1, 1, 0), "{status:?}");
        let views = node.peer_heights().await.unwrap();
        assert_no_lie_proved(&views, &[hedge.peer]);
        let f = view(&views, first.peer);
        let fate = (f.failures as usize, f.faults as usize, f.banned_until);
        assert_eq!(fate, (failures, failures, None), "{f:?}");
        let h = view(&views, hedge.peer);
        assert_eq!(h.failures, 0, "{h:?}");
    }

    /// As above, but the first peer answers the block fetch, once hedged,
    /// with a blob nobody asked for: a provable lie, which the core must
    /// see at once (to ban its peer and avoid it), not behind a hedge
    /// alone. The race ends as the lie comes, the hedge's call is dropped,
    /// and the fetch is asked of the hedge's peer again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_first_peer_that_lies_after_its_fetch_was_hedged_ends_the_race() {
        let chain = Arc::new(ChainBuilder::new(ChainConfig::validators(4)).build(20));
        let spoiling = (Lie::HoldsBlocksThenSpoils, 148);
        let (node, (first, hedge), store) = block_fetch_hedged(&chain, spoiling).await;
        first.open();
        wait_banned(&node, &[first.peer]).await;
        let again = async || hedge.block_fetches() == 2;
        soma_testkit::wait_until("the blocks to be asked again", DEADLINE, again).await;
        hedge.open();
        wait_synced(&node, chain.tip()).await;
        assert_same_chain(&chain, store.as_ref());
        assert_eq!((first.block_fetches(), hedge.block_fetches()), (1, 2));
        let status = node.sync_status().await.unwrap();
        let hedges = (
            status.hedges_sent,
            status.hedges_alone,
            status.invalid_responses,
        );
        assert_eq!(hedges, (1, 0, 1), "{status:?}");
        let views = node.peer_heights().await.unwrap();
        assert_no_lie_proved(&views, &[hedge.peer]);
        node.shutdown().await;
    }

    /// The first peer of the one commit fetch denies it (NOT_FOUND, for
    /// commits it claims), then holds the height query that asks its
    /// claim afresh until the test opens it; it answered height queries
    /// after a second before, so the node waits four seconds for that
    /// answer. The denial used to be judged on the answer before the
    /// worker returned: such an identity held the retry that long (half
    /// the request timeout with a slow majority), once per identity. It
    /// is now judged in a task of its own: the core has the failure, and
    /// retries, while the question is still out and the denier not yet
    /// judged; an honest validator dialled then takes the fetch, and the
    /// denial counts once the wait for the answer ends.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_first_peer_that_denies_and_stalls_its_height_answer_holds_no_retry() {
        let chain = Arc::new(ChainBuilder::new(ChainConfig::validators(4)).build(20));
        let lie = Lie::DeniesCommitsThenHoldsHeights;
        let slow = Duration::from_secs(1);
        let denier = serve_observed_slow_heights(chain.clone(), lie, 149, slow).await;
        let store: Arc<dyn ConsensusStore> = Arc::new(MemStore::new(chain.genesis()));
        let config = P2pConfig {
            seed_peers: vec![denier.seed()],
            timeout: Duration::from_secs(3_600),
            // The only height query held is the one asking afresh.
            height_query_interval: Duration::from_secs(3_600),
            ..P2pConfig::default()
        };
        let node = soma_testkit::node(&chain, 9, config, store.clone());
        // The question asking its claim afresh, answered only after a
        // second, reaches the denier's hold only then.
        let asked = async || denier.stalled.load(Ordering::SeqCst) == 1;
        soma_testkit::wait_until("the claim to be asked afresh", DEADLINE, asked).await;
        // The core has the failure already (it retries while the denier is
        // the only peer, each retry finding no peer); the denial is not
        // judged yet.
        let status = node.sync_status().await.unwrap();
        assert!(status.restarts >= 1, "{status:?}");
        let views = node.peer_heights().await.unwrap();
        let d = view(&views, denier.peer);
        assert_eq!((d.failures, d.faults), (0, 0), "{d:?}");
        let (honest, _) = synced_from_an_honest_peer_dialled(&node, &chain, store).await;
        // Unanswered, the question leaves the claim as it was: each denial
        // (a retry with no other peer may ask the denier again) is of
        // commits it claims, a lie, counted once its wait ends.
        let judged = async || {
            let denied = denier.denied.load(Ordering::SeqCst) as u64;
            let views = node.peer_heights().await.unwrap_or_default();
            views.iter().any(|v| {
                let fate = (u64::from(v.failures), v.faults, v.banned_until.is_some());
                v.peer == denier.peer && fate == (denied, denied, true)
            })
        };
        soma_testkit::wait_until("each denial to be judged a lie", DEADLINE, judged).await;
        denier.open();
        node.shutdown().await;
        honest.shutdown().await;
    }

    /// A node with a request timeout of an hour syncing a chain of 20
    /// commits, the block fetch (one chunk) held by a first peer lying as
    /// `first` says (with its key), which serves the commits at once, and
    /// hedged to the only other peer, which holds its block fetches until
    /// opened: returned once the hedge is out, neither opened.
    async fn block_fetch_hedged(
        chain: &Arc<Chain>,
        first: (Lie, u8),
    ) -> (P2pHandle, (Served, Served), Arc<dyn ConsensusStore>) {
        let hedge = (Lie::HoldsBlocksUntilOpened, 147);
        hedged_once(chain, (first, hedge), Served::block_fetches).await
    }

    /// A node with a request timeout of an hour whose one commit fetch
    /// (a chain of 20 commits) is held by a first peer, hedged to the only
    /// other peer, which holds the hedge until it is opened (and then
    /// does as `hedge_lie` says), and then refused by the first peer:
    /// returned once the node reports the hedge gone on alone.
    async fn refused_once_hedged(
        chain: &Arc<Chain>,
        hedge_lie: Lie,
    ) -> (P2pHandle, (Served, Served), Arc<dyn ConsensusStore>) {
        let refusing = Lie::HoldsCommitsThenRefuses(tonic::Code::Unavailable);
        let peers = ((refusing, 144), (hedge_lie, 145));
        let (node, (first, hedge), store) = hedged_once(chain, peers, Served::commit_fetches).await;
        first.open();
        let alone = async || node.sync_status().await.is_ok_and(|s| s.hedges_alone == 1);
        soma_testkit::wait_until("the hedge to go on alone", DEADLINE, alone).await;
        (node, (first, hedge), store)
    }

    /// A node with a request timeout of an hour syncing `chain` from a
    /// first peer, then, once that peer holds a fetch, from a second one,
    /// each lying as said (with its key) and answering height queries
    /// after 250 ms, so that a hedge is late a second after it goes out:
    /// returned once the second peer has had one fetch of the kind
    /// `fetches` counts (a hedge of what the first holds).
    async fn hedged_once(
        chain: &Arc<Chain>,
        peers: ((Lie, u8), (Lie, u8)),
        fetches: fn(&Served) -> usize,
    ) -> (P2pHandle, (Served, Served), Arc<dyn ConsensusStore>) {
        let slow = Duration::from_millis(250);
        hedged_once_after(chain, peers, (fetches, slow, HOUR)).await
    }

    /// [`hedged_once`], the peers answering height queries after `slow`
    /// (a hedge is late four times that after it goes out, at most a
    /// twentieth of `timeout`), the request timeout `timeout`.
    async fn hedged_once_after(
        chain: &Arc<Chain>,
        ((first_lie, first_key), (hedge_lie, hedge_key)): ((Lie, u8), (Lie, u8)),
        (fetches, slow, timeout): (fn(&Served) -> usize, Duration, Duration),
    ) -> (P2pHandle, (Served, Served), Arc<dyn ConsensusStore>) {
        let first = serve_observed_slow_heights(chain.clone(), first_lie, first_key, slow).await;
        let hedge = serve_observed_slow_heights(chain.clone(), hedge_lie, hedge_key, slow).await;
        let store: Arc<dyn ConsensusStore> = Arc::new(MemStore::new(chain.genesis()));
        let config = P2pConfig {
            seed_peers: vec![first.seed()],
            timeout,
            ..P2pConfig::default()
        };
        let node = soma_testkit::node(chain, 9, config, store.clone());
        dial_once_held(&node, &first, &hedge).await;
        let hedged = async || fetches(&hedge) == 1;
        soma_testkit::wait_until("the hedge to go out", DEADLINE, hedged).await;
        let status = node.sync_status().await.unwrap();
        assert_eq!((status.hedges_sent, status.synced), (1, 0), "{status:?}");
        (node, (first, hedge), store)
    }

    /// A block fetch the silent peer holds is hedged to the only other
    /// peer, which answers the hedge with a blob nobody asked for. That
    /// lie is the hedge's, which the core never sees: it used to be
    /// dropped with no record, and the fetch then waited for the silent
    /// peer, here for an hour. The liar is banned at its lie, the hedge
    /// looks on for another peer, and the honest validator connected once
    /// the ban is in takes it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_peer_that_spoils_a_hedge_is_banned_and_the_hedge_goes_to_another_peer() {
        let chain = Arc::new(ChainBuilder::new(ChainConfig::validators(4)).build(300));
        let (silent, spoiler) = serve_spoiling_hedges(chain.clone(), 121, 122).await;
        let store: Arc<dyn ConsensusStore> = Arc::new(MemStore::new(chain.genesis()));
        let config = P2pConfig {
            seed_peers: vec![silent.seed(), spoiler.seed()],
            // A fetch the silent peer holds would hold sync for an hour.
            timeout: Duration::from_secs(3_600),
            // While the spoiler serves one fetch, the next goes to the
            // silent peer.
            max_fetches_per_peer: 1,
            ..P2pConfig::default()
        };
        let node = soma_testkit::node(&chain, 9, config, store.clone());
        wait_banned(&node, &[spoiler.peer]).await;
        let honest = validator(&chain, 1);
        node.connect(Some(honest.peer_id()), honest.local_addr().to_string())
            .expect("Connections takes the dial");
        wait_synced(&node, chain.tip()).await;
        assert_same_chain(&chain, store.as_ref());
        // The silent peer held a block fetch, and proved no lie.
        assert!(silent.fetches() > 0, "the silent peer was never asked");
        let views = node.peer_heights().await.unwrap();
        let view = views.iter().find(|v| v.peer == silent.peer);
        assert_eq!(view.and_then(|v| v.banned_until), None, "{view:?}");
        // The one lie, told in a hedge's answer, is counted.
        let status = node.sync_status().await.unwrap();
        assert_eq!(status.invalid_responses, 1, "{status:?}");
        node.shutdown().await;
        honest.shutdown().await;
    }

    /// A peer holds every block fetch it gets until the test opens it;
    /// each is hedged to the only other peer, which serves the chain but
    /// answers NOT_FOUND to those hedges, for blocks of commits it claims.
    /// A hedge's denial used to count as an error, never judged: a peer
    /// that denied blocks only in hedges was never banned. It is now
    /// judged as a first peer's is, once the batch is applied.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_peer_denying_blocks_only_in_hedges_is_banned_once_they_prove_to_exist() {
        let chain = Arc::new(ChainBuilder::new(ChainConfig::validators(4)).build(300));
        let (held, liar) = serve_withholding_hedges(chain.clone(), 126, 127).await;
        let node = denied_in_a_hedge(&chain, (&held, &liar), false).await;
        wait_banned(&node, &[liar.peer]).await;
        wait_synced(&node, chain.tip()).await;
        let views = node.peer_heights().await.unwrap();
        let view = views.iter().find(|v| v.peer == held.peer).expect("tracked");
        assert_eq!(view.banned_until, None, "{view:?}");
        node.shutdown().await;
    }

    /// Waits until `held` holds a fetch of `node`'s, then has `node` dial
    /// `other`: what `other` is asked first is then a fetch `held` does
    /// not hold, or a hedge of one it does.
    async fn dial_once_held(node: &P2pHandle, held: &Served, other: &Served) {
        let stalled = held.stalled.clone();
        let holds = async || stalled.load(Ordering::SeqCst) > 0;
        soma_testkit::wait_until("the held peer to hold a fetch", DEADLINE, holds).await;
        node.connect(Some(other.peer), other.address.clone())
            .expect("Connections takes the dial");
    }

    /// A node syncing `chain` from `held` alone until `held` holds a
    /// fetch, then from `liar` too, which is then asked only in hedges of
    /// what `held` holds (no fetch times out before it is opened); once
    /// `liar` has denied a hedge (and, if `asked_afresh`, has been asked
    /// its height since: the node read the denial and judges it now),
    /// `held` is opened.
    async fn denied_in_a_hedge(
        chain: &Arc<Chain>,
        (held, liar): (&Served, &Served),
        asked_afresh: bool,
    ) -> P2pHandle {
        let store: Arc<dyn ConsensusStore> = Arc::new(MemStore::new(chain.genesis()));
        let config = P2pConfig {
            seed_peers: vec![held.seed()],
            timeout: Duration::from_secs(3_600),
            max_fetches_per_peer: 1,
            ..P2pConfig::default()
        };
        let node = soma_testkit::node(chain, 9, config, store);
        dial_once_held(&node, held, liar).await;
        let denied = liar.denied.clone();
        let asked = async || denied.load(Ordering::SeqCst) > 0;
        soma_testkit::wait_until("the liar to deny a hedge", DEADLINE, asked).await;
        if asked_afresh {
            // Opened as soon as its server counted the denial, the held
            // peer's answer could end the race before the node read the
            // denial, which then went unjudged (a stall of this test, about
            // one run in twenty on a loaded machine).
            let queries = liar.height_queries.clone();
            let at_denial = queries.load(Ordering::SeqCst);
            let again = async || queries.load(Ordering::SeqCst) > at_denial;
            soma_testkit::wait_until("the liar to be asked afresh", DEADLINE, again).await;
        }
        held.open();
        node
    }

    /// The same for commits: a peer that answers NOT_FOUND only to the
    /// hedges of commit fetches another peer holds, for commits it
    /// claims, is banned on its claim asked afresh, as a first peer is.
    /// It is slow to answer that question
    /// (`soma_testkit::byzantine::DENIER_QUERY_DELAY`), and the held peer
    /// answers meanwhile, ending the race: the judgement goes on all the
    /// same (it was dropped with the race before).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_peer_denying_commits_only_in_hedges_is_banned() {
        let chain = Arc::new(ChainBuilder::new(ChainConfig::validators(4)).build(300));
        let (held, liar) = serve_denying_commit_hedges(chain.clone(), 128, 129).await;
        let node = denied_in_a_hedge(&chain, (&held, &liar), true).await;
        wait_synced(&node, chain.tip()).await;
        wait_banned(&node, &[liar.peer]).await;
        assert_eq!(liar.denied.load(Ordering::SeqCst), 1);
        node.shutdown().await;
    }

    /// A peer holds the one commit fetch of a catch-up until the test
    /// opens it; the fetch is hedged to the only other peer, which never
    /// answers anything. The hedge waits longer than makes a peer late
    /// (before any fetch has answered, at most a twentieth of the
    /// timeout), then the first peer answers: the silent second peer was
    /// late just as a first peer beaten by a hedge is, and ranks lower for
    /// it. It used to be released as cancelled, nothing held against it,
    /// so a peer silent only to hedges wasted every hedge sent to it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_second_peer_silent_past_its_hedge_delay_ranks_lower_when_the_first_answers() {
        const TIMEOUT: Duration = Duration::from_secs(20);
        // One batch of commits: one commit fetch, which the held peer holds.
        let chain = Arc::new(ChainBuilder::new(ChainConfig::validators(4)).build(200));
        let held = serve_observed(chain.clone(), Lie::HoldsCommitsUntilOpened, 116).await;
        let silent = serve_observed(chain.clone(), Lie::NeverAnswers, 117).await;
        let store: Arc<dyn ConsensusStore> = Arc::new(MemStore::new(chain.genesis()));
        let config = P2pConfig {
            seed_peers: vec![held.seed()],
            timeout: TIMEOUT,
            max_fetches_per_peer: 1,
            ..P2pConfig::default()
        };
        let node = soma_testkit::node(&chain, 9, config, store.clone());
        let stalled = held.stalled.clone();
        let holds = async || stalled.load(Ordering::SeqCst) > 0;
        soma_testkit::wait_until("the held peer to hold the fetch", DEADLINE, holds).await;
        node.connect(Some(silent.peer), silent.address.clone())
            .expect("Connections takes the dial");
        let asked = async || silent.fetches() > 0;
        soma_testkit::wait_until("the hedge to reach the silent peer", DEADLINE, asked).await;
        // The time the hedge waits is what the rule reads: past the most
        // its delay can be here.
        tokio::time::sleep(TIMEOUT / 20 + Duration::from_millis(500)).await;
        held.open();
        wait_synced(&node, chain.tip()).await;
        assert_same_chain(&chain, store.as_ref());
        let status = node.sync_status().await.unwrap();
        // The commit hedge, at least; a later block fetch the held peer
        // was slow to answer may have had its hedge late too.
        assert!(status.hedges_late >= 1, "{status:?}");
        let views = node.peer_heights().await.unwrap();
        let view = |peer| views.iter().find(|v| v.peer == peer).expect("tracked");
        // Its other failures, if any, are block fetches it held as first
        // peer that the held peer, opened, answered in its place.
        let s = view(silent.peer);
        let beaten = status.hedges_won + status.hedges_late;
        assert_eq!(u64::from(s.failures), beaten, "{s:?} {status:?}");
        assert_eq!((s.faults, s.banned_until), (0, None), "{s:?}");
        assert_unbanned_with(&views, held.peer, (0, 0));
        node.shutdown().await;
    }

    /// A peer holds a commit fetch (it answers nothing until the test
    /// opens it), and the fetch is hedged to the only other peer, which
    /// answers a hedge at once with a forged certificate. That junk wins
    /// the race, but is found out by the Verifier: the liar is banned, and
    /// the peer it beat, which lied about nothing, is released with
    /// nothing held against it, not ranked lower for being late. Before,
    /// it was released late as soon as the junk came, and three such
    /// answers, one banned identity each, ranked an honest peer as
    /// failing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_junk_answer_to_a_commit_hedge_costs_the_peer_it_beat_nothing() {
        // Two commit batches (of the default 200). The node knows only the
        // held peer until it holds the first batch; the spoiler, dialled
        // then, serves the second honestly or is asked first for a hedge
        // of the first, which it spoils. Had both been known from the
        // start, the spoiler could have served both batches before the
        // held peer's height was known: no hedge, nothing spoiled.
        let chain = Arc::new(ChainBuilder::new(ChainConfig::validators(4)).build(300));
        let (held, spoiler) = serve_spoiling_commit_hedges(chain.clone(), 123, 124).await;
        let store: Arc<dyn ConsensusStore> = Arc::new(MemStore::new(chain.genesis()));
        let config = P2pConfig {
            seed_peers: vec![held.seed()],
            // No fetch the held peer holds times out before it is opened.
            timeout: Duration::from_secs(3_600),
            // The held peer holds the first batch; the second waits.
            max_fetches_per_peer: 1,
            ..P2pConfig::default()
        };
        let node = soma_testkit::node(&chain, 9, config, store.clone());
        dial_once_held(&node, &held, &spoiler).await;
        wait_banned(&node, &[spoiler.peer]).await;
        // The held peer has answered nothing yet, so nothing has halved
        // a failure it was given.
        let views = node.peer_heights().await.unwrap();
        let view = views.iter().find(|v| v.peer == held.peer).expect("tracked");
        assert_eq!((view.failures, view.banned_until), (0, None), "{view:?}");
        let status = node.sync_status().await.unwrap();
        assert_eq!((status.invalid_responses, status.hedges_won), (1, 0));
        held.open();
        wait_synced(&node, chain.tip()).await;
        assert_same_chain(&chain, store.as_ref());
        // Only the held peer was left to ask: nothing more was hedged.
        let status = node.sync_status().await.unwrap();
        assert_eq!((status.invalid_responses, status.hedges_won), (1, 0));
        node.shutdown().await;
    }

    async fn wait_banned(node: &P2pHandle, peers: &[soma_types::PeerId]) {
        soma_testkit::wait_banned(node, peers, DEADLINE).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_peer_relaying_corrupted_data_is_banned_never_its_author() {
        let chain = Arc::new(ChainBuilder::new(ChainConfig::validators(4)).build(300));
        // H is the node of authority 0: every block by that author is its own.
        let author = AuthorityIndex(0);
        let h_key = chain.config().network_key(author.get());
        let h_id = soma_types::PeerId::from(h_key.public());
        assert_eq!(chain.genesis().authority(author).unwrap().network_key, h_id);
        // H has produced nothing yet, so only the relays can be asked.
        let h = P2pBuilder::new(
            P2pConfig::default(),
            h_key,
            chain.genesis().clone(),
            Arc::new(MemStore::new(chain.genesis())),
        )
        .start()
        .unwrap();
        let lies = [
            Lie::ForgesBlocksOf(author),
            Lie::TampersBlocksOf(author),
            Lie::ForgesCertificateOf(author),
        ];
        let mut relays = Vec::new();
        for (i, lie) in lies.iter().enumerate() {
            relays.push(serve(chain.clone(), *lie, 130 + i as u8).await);
        }
        let mut seeds: Vec<SeedPeer> = relays
            .iter()
            .map(|(peer, address)| SeedPeer {
                peer_id: Some(*peer),
                address: address.clone(),
            })
            .collect();
        seeds.extend(soma_testkit::seeds(&[&h]));
        let store: Arc<dyn ConsensusStore> = Arc::new(MemStore::new(chain.genesis()));
        let config = P2pConfig {
            seed_peers: seeds,
            timeout: Duration::from_secs(2),
            ban_duration: Duration::from_secs(3_600),
            ..P2pConfig::default()
        };
        let node = soma_testkit::node(&chain, 9, config, store.clone());

        // Each relay is banned for what it sent; nothing of it is applied.
        let relay_ids: Vec<soma_types::PeerId> = relays.iter().map(|(p, _)| *p).collect();
        wait_banned(&node, &relay_ids).await;
        assert_eq!(store.highest_synced_commit().unwrap().index, 0);
        // H, the author of every corrupted block, is connected and untouched:
        // not banned, no failure on its record, its height its own.
        let start = Instant::now();
        let h_view = loop {
            let views = node.peer_heights().await.unwrap();
            if let Some(v) = views
                .iter()
                .find(|v| v.peer == h_id && v.chain_id.is_some())
            {
                break v.clone();
            }
            assert!(start.elapsed() < DEADLINE, "h never reported: {views:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(h_view.chain_id, Some(chain.chain_id()));
        assert_eq!(
            (h_view.banned_until, h_view.failures, h_view.highest),
            (None, 0, 0),
            "{h_view:?}"
        );
        assert!(node.connected_peers().await.unwrap().contains(&h_id));

        // H now commits the chain itself: the node syncs all of it from H.
        for i in 1..=chain.tip() {
            h.send_commit(soma_actors::system::LocalCommit {
                commit: chain.commit(i),
                blocks: chain.blocks_of(i).to_vec(),
                certificate: chain.certificate(i).to_vec(),
                next_committee: None,
            })
            .await
            .unwrap();
        }
        wait_synced(&node, chain.tip()).await;
        assert_same_chain(&chain, store.as_ref());
        let views = node.peer_heights().await.unwrap();
        let h_view = views.iter().find(|v| v.peer == h_id).expect("h is known");
        assert_eq!(
            (h_view.banned_until, h_view.failures, h_view.highest),
            (None, 0, chain.tip()),
            "{h_view:?}"
        );
        assert!(h_view.throughput_bps > 0, "h served the sync: {h_view:?}");
        assert!(node.connected_peers().await.unwrap().contains(&h_id));
        for relay in &relay_ids {
            let view = views.iter().find(|v| v.peer == *relay);
            assert!(view.is_some_and(|v| v.banned_until.is_some()), "{view:?}");
        }
        let status = node.sync_status().await.unwrap();
        assert!(status.invalid_responses >= 3, "{status:?}");
        node.shutdown().await;
        h.shutdown().await;
    }
}

/// A fresh node on `store` syncing from `peers` with `faults` injected,
/// its other settings `config`'s.
fn faulty(
    chain: &Chain,
    peers: &[P2pHandle],
    faults: &Arc<soma_actors::faults::FaultPlan>,
    config: P2pConfig,
    store: Arc<dyn ConsensusStore>,
) -> P2pHandle {
    let config = P2pConfig {
        seed_peers: seeds(&peers.iter().collect::<Vec<_>>()),
        faults: Some(faults.clone()),
        ..config
    };
    P2pBuilder::new(
        config,
        KeyPair::from_seed([9; 32]),
        chain.genesis().clone(),
        store,
    )
    .start()
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_that_panic_or_fail_are_restarted_and_sync_completes() {
    use soma_actors::faults::FaultPlan;
    let chain = ChainBuilder::new(ChainConfig::validators(4)).build(500);
    let validators: Vec<P2pHandle> = (1..=2).map(|k| validator(&chain, k)).collect();
    let faults = Arc::new(FaultPlan::default());
    // Batch 201: two workers panic. Batch 401: five fail, past the
    // intensity limit of three restarts.
    faults.panics.lock().unwrap().insert(201, 2);
    faults.failures.lock().unwrap().insert(401, 5);
    let store: Arc<dyn ConsensusStore> = Arc::new(MemStore::new(chain.genesis()));
    let config = P2pConfig::default();
    let node = faulty(&chain, &validators, &faults, config, store.clone());
    wait_synced(&node, 500).await;
    assert_same_chain(&chain, store.as_ref());
    let status = node.sync_status().await.unwrap();
    assert!(status.restarts >= 7, "restarts counted: {status:?}");
    assert!(faults.panics.lock().unwrap().values().all(|n| *n == 0));
    assert!(faults.failures.lock().unwrap().values().all(|n| *n == 0));
    assert!(
        node.health().is_healthy(),
        "a panicking worker took an actor down"
    );
    node.shutdown().await;
    for v in validators {
        v.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetch_that_failed_as_invalid_is_retried_when_its_backoff_ends_without_a_tick() {
    // Ticks an hour apart: after the one that starts sync (every seed's
    // height heard), nothing but the end of a backoff can start the
    // fetch that failed. Batch 1's first fetch fails as invalid data does
    // (its retry avoids the peer, so it is woken); sync completes.
    use soma_actors::faults::FaultPlan;
    let chain = ChainBuilder::new(ChainConfig::validators(4)).build(300);
    let validators: Vec<P2pHandle> = (1..=2).map(|k| validator(&chain, k)).collect();
    let faults = Arc::new(FaultPlan::default());
    faults.invalid.lock().unwrap().insert(1, 1);
    let store: Arc<dyn ConsensusStore> = Arc::new(MemStore::new(chain.genesis()));
    let config = P2pConfig {
        tick: Duration::from_secs(3_600),
        ..P2pConfig::default()
    };
    let node = faulty(&chain, &validators, &faults, config, store.clone());
    wait_synced(&node, 300).await;
    assert_same_chain(&chain, store.as_ref());
    assert_eq!(faults.invalid.lock().unwrap()[&1], 0, "the fault was met");
    assert_eq!(node.sync_status().await.unwrap().restarts, 1);
    node.shutdown().await;
    for v in validators {
        v.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_stopped_mid_sync_resumes_from_its_watermark_on_the_same_store() {
    use soma_store::RedbStore;
    let chain = ChainBuilder::new(ChainConfig {
        commits_per_epoch: Some(1_000),
        ..ChainConfig::validators(4)
    })
    .build(3_000);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("chain.redb");

    // First the validators hold 1,500 commits: the node stops there.
    let partial: Vec<P2pHandle> = (1..=2)
        .map(|k| soma_testkit::validator_up_to(&chain, 1_500, k))
        .collect();
    let store: Arc<dyn ConsensusStore> = Arc::new(RedbStore::open(&path, chain.genesis()).unwrap());
    let node = fresh(&chain, 9, &partial.iter().collect::<Vec<_>>(), store);
    wait_synced(&node, 1_500).await;
    node.shutdown().await;
    drop(node);
    for v in partial {
        v.shutdown().await;
    }
    let store = RedbStore::open(&path, chain.genesis()).unwrap();
    assert_eq!(
        store.highest_synced_commit().unwrap(),
        chain.commit_ref(1_500)
    );
    drop(store);

    // Restarted on the same store, with validators of the whole chain:
    // it fetches and applies exactly what it lacks.
    let validators: Vec<P2pHandle> = (1..=2).map(|k| validator(&chain, k)).collect();
    let store: Arc<dyn ConsensusStore> = Arc::new(RedbStore::open(&path, chain.genesis()).unwrap());
    let node = fresh(
        &chain,
        9,
        &validators.iter().collect::<Vec<_>>(),
        store.clone(),
    );
    assert_eq!(node.sync_status().await.unwrap().synced, 1_500);
    wait_synced(&node, 3_000).await;
    assert_same_chain(&chain, store.as_ref());
    let status = node.sync_status().await.unwrap();
    let lacked = (1_501..=3_000).flat_map(|i| chain.blocks_of(i));
    assert_eq!(status.commits_applied, 1_500);
    assert_eq!(status.blocks_applied, lacked.clone().count() as u64);
    let bytes: usize = lacked.map(|b| b.serialized().len()).sum();
    assert_eq!(
        status.bytes_fetched, bytes as u64,
        "only the lacking blocks fetched"
    );
    node.shutdown().await;
    for v in validators {
        v.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_commits_take_the_sync_path_and_a_commit_that_does_not_link_is_refused() {
    let chain = ChainBuilder::new(ChainConfig::validators(4)).build(20);
    let store: Arc<dyn ConsensusStore> = Arc::new(MemStore::new(chain.genesis()));
    let node = P2pBuilder::new(
        P2pConfig::default(),
        KeyPair::from_seed([9; 32]),
        chain.genesis().clone(),
        store.clone(),
    )
    .start()
    .unwrap();
    let mut commits = node.subscribe_synced_commits();
    let local = |i| soma_testkit::local_commit(&chain, i);
    for i in 1..=10 {
        node.send_commit(local(i)).await.unwrap();
        let subdag = commits.recv().await.unwrap();
        assert_eq!(subdag.commit_ref, chain.commit_ref(i));
        assert_eq!(subdag.blocks.len(), chain.blocks_of(i).len());
    }
    // Commit 12 does not follow commit 10: refused, nothing stored or sent.
    let refused = node.send_commit(local(12)).await;
    assert!(
        matches!(
            refused,
            Err(soma_actors::system::P2pError::Store(
                soma_store::Error::NotContiguous { .. }
            ))
        ),
        "{refused:?}"
    );
    // A commit missing one of its blocks: refused too.
    let mut partial = local(11);
    partial.blocks.pop();
    assert!(node.send_commit(partial).await.is_err());
    assert_eq!(store.highest_synced_commit().unwrap(), chain.commit_ref(10));
    assert!(commits.try_recv().is_err());
    assert_eq!(node.sync_status().await.unwrap().synced, 10);
    node.send_commit(local(11)).await.unwrap();
    assert_eq!(
        commits.recv().await.unwrap().commit_ref,
        chain.commit_ref(11)
    );
    node.shutdown().await;
}

mod faults {
    //! Peers that vanish, crawl or cut streams while a node syncs: sync
    //! completes from the rest, and nothing partial is applied (the store
    //! ends identical to the validators').

    use super::byzantine::{Lie, serve_observed};
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn serving_peers_shut_down_mid_sync_and_sync_completes_from_the_rest() {
        let chain = ChainBuilder::new(ChainConfig {
            commits_per_epoch: Some(700),
            ..ChainConfig::validators(4)
        })
        .build(2_000);
        // The survivor sits behind a link that can be held quiet, so the
        // second shutdown lands mid-sync however fast this machine is.
        let (survivor, link, survivor_seed) = soma_testkit::validator_behind_link(
            &chain,
            1,
            P2pConfig::default(),
            soma_testkit::impair::Impairment::default(),
        )
        .await;
        let mut validators: Vec<P2pHandle> = (2..=3).map(|k| validator(&chain, k)).collect();
        let store: Arc<dyn ConsensusStore> = Arc::new(MemStore::new(chain.genesis()));
        let mut seed_peers = seeds(&validators.iter().collect::<Vec<_>>());
        seed_peers.push(survivor_seed);
        let mut config = P2pConfig {
            seed_peers,
            timeout: Duration::from_secs(2),
            ..P2pConfig::default()
        };
        // Small steps, so the first shutdown lands mid-sync.
        config.state_sync.parallel_fetches = 1;
        config.state_sync.max_blocks_per_fetch = 10;
        let node = soma_testkit::node(&chain, 9, config, store.clone());
        wait_synced(&node, 300).await;
        validators.pop().unwrap().shutdown().await;
        wait_synced(&node, 900).await;
        link.hold();
        validators.pop().unwrap().shutdown().await;
        let synced_when_down = node.sync_status().await.unwrap().synced;
        assert!(
            synced_when_down < 2_000,
            "the node finished with its one peer left held quiet"
        );
        link.release();
        wait_synced(&node, 2_000).await;
        assert_same_chain(&chain, store.as_ref());
        node.shutdown().await;
        survivor.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn slow_peers_and_streams_cut_midway_do_not_stop_sync() {
        let chain = Arc::new(ChainBuilder::new(ChainConfig::validators(4)).build(400));
        let honest = validator(&chain, 1);
        let slow = serve_observed(chain.clone(), Lie::Slow, 120).await;
        let cutter = serve_observed(chain.clone(), Lie::CutsStreamMidway, 121).await;
        // Only the slow and the cutting peer at first, so both are asked.
        let store: Arc<dyn ConsensusStore> = Arc::new(MemStore::new(chain.genesis()));
        let config = P2pConfig {
            seed_peers: vec![slow.seed(), cutter.seed()],
            // The slow peer answers 1.5 s late: well within the timeout,
            // so it is used, slowly.
            timeout: Duration::from_secs(10),
            ..P2pConfig::default()
        };
        let node = soma_testkit::node(&chain, 9, config, store.clone());
        // The cutter never completes a block fetch: a batch applied means
        // the slow peer served its blocks, and a fault on the cutter's
        // record means a stream was cut and counted.
        soma_testkit::wait_until(
            "a slow answer applied and a cut counted",
            DEADLINE,
            async || {
                let synced = node.sync_status().await.unwrap().synced;
                let views = node.peer_heights().await.unwrap();
                let cut = views.iter().any(|v| v.peer == cutter.peer && v.faults > 0);
                synced >= 100 && cut
            },
        )
        .await;
        assert!(cutter.fetches() > 0 && slow.fetches() > 0);
        node.connect(Some(honest.peer_id()), honest.local_addr().to_string())
            .expect("Connections takes the dial");
        wait_synced(&node, 400).await;
        assert_same_chain(&chain, store.as_ref());
        // The cut streams were failures, not lies: the cutter is scored
        // down, not banned; the slow peer served and is held to nothing.
        let views = node.peer_heights().await.unwrap();
        let view = |peer| views.iter().find(|v| v.peer == peer).expect("still known");
        let cut = view(cutter.peer);
        assert!(cut.faults > 0 && cut.banned_until.is_none(), "{cut:?}");
        let late = view(slow.peer);
        assert!(late.throughput_bps > 0, "it served: {late:?}");
        assert_eq!((late.faults, late.banned_until), (0, None), "{late:?}");
        node.shutdown().await;
        honest.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_peer_is_never_sent_more_fetches_than_it_serves() {
    // Eight fetches at once and a single peer that serves four per peer:
    // the node must keep to four, not have the rest refused and retried
    // (which would also lower an honest peer's score).
    let chain = ChainBuilder::new(ChainConfig {
        transactions_per_block: 10,
        ..ChainConfig::validators(4)
    })
    .build(2_000);
    let server = validator(&chain, 1);
    let mut config = P2pConfig {
        seed_peers: seeds(&[&server]),
        ..P2pConfig::default()
    };
    config.state_sync.parallel_fetches = 8;
    config.state_sync.max_blocks_per_fetch = 50;
    assert!(
        config.max_fetches_per_peer <= P2pConfig::default().grpc.max_concurrent_fetches_per_peer
    );
    let store: Arc<dyn ConsensusStore> = Arc::new(MemStore::new(chain.genesis()));
    let node = soma_testkit::node(&chain, 9, config, store.clone());
    wait_synced(&node, chain.tip()).await;
    let status = node.sync_status().await.unwrap();
    assert_eq!(status.restarts, 0, "no fetch was refused: {status:?}");
    let heights = node.peer_heights().await.unwrap();
    let peer = heights
        .iter()
        .find(|h| h.peer == server.peer_id())
        .expect("the server is tracked");
    assert_eq!(peer.failures, 0, "the server's record is clean: {peer:?}");
    assert_same_chain(&chain, store.as_ref());
    node.shutdown().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_starts_once_every_seed_answered_its_height_query_and_certifies_batches_ahead_across_epochs()
 {
    // State sync never ticks here (an interval of an hour): only the seeds'
    // height answers can start it, once all three are in. Epochs of 250
    // commits with batches of 200 fetched up to 8 ahead: batches fetched
    // ahead are certified as they arrive, those past an epoch's end (not
    // of the epoch expected then) are checked in full at their turn.
    let chain = ChainBuilder::new(ChainConfig {
        commits_per_epoch: Some(250),
        ..ChainConfig::validators(4)
    })
    .build(1_500);
    assert_eq!(chain.committees().count(), 7);
    let validators: Vec<P2pHandle> = (1..=3).map(|k| validator(&chain, k)).collect();
    let mut config = P2pConfig {
        seed_peers: seeds(&validators.iter().collect::<Vec<_>>()),
        tick: Duration::from_secs(3_600),
        ..P2pConfig::default()
    };
    // The Verifier keeps only the newest committee: across seven epochs
    // sync never asks it to verify against an older one.
    config.verifier.max_committees = 1;
    let store: Arc<dyn ConsensusStore> = Arc::new(MemStore::new(chain.genesis()));
    let node = soma_testkit::node(&chain, 9, config, store.clone());
    wait_synced(&node, chain.tip()).await;
    assert_same_chain(&chain, store.as_ref());
    let status = node.sync_status().await.unwrap();
    assert_eq!(status.commits_applied, chain.tip());
    assert_eq!(status.restarts, 0, "no batch was refused: {status:?}");
    node.shutdown().await;
    for v in validators {
        v.shutdown().await;
    }
}

/// Epochs of 250 commits whose committee grows from 4 validators to 7 at
/// the first epoch change, caught up with batches fetched ahead: answers
/// past the end of epoch 0 are certified by 5 blocks, more than epoch 0's
/// committee has members, and are checked under epoch 0's committee as
/// they arrive (the end not known yet). They are claims for their turn,
/// not lies: sync ends with no batch refused and no peer banned. (A first
/// version judged such a refusal at once and banned the honest servers.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_catch_up_across_a_committee_that_grows_refuses_nothing_and_bans_no_one() {
    let chain = ChainBuilder::new(ChainConfig {
        commits_per_epoch: Some(250),
        later_stakes: Some(vec![1; 7]),
        ..ChainConfig::validators(4)
    })
    .build(1_000);
    let sizes: Vec<usize> = chain.committees().map(|c| c.size()).collect();
    assert_eq!(sizes, [4, 7, 7, 7, 7]);
    let validators: Vec<P2pHandle> = (1..=3).map(|k| validator(&chain, k)).collect();
    let config = P2pConfig {
        seed_peers: seeds(&validators.iter().collect::<Vec<_>>()),
        ..P2pConfig::default()
    };
    let store: Arc<dyn ConsensusStore> = Arc::new(MemStore::new(chain.genesis()));
    let node = soma_testkit::node(&chain, 9, config, store.clone());
    wait_synced(&node, chain.tip()).await;
    assert_same_chain(&chain, store.as_ref());
    let status = node.sync_status().await.unwrap();
    assert_eq!(
        (status.restarts, status.invalid_responses),
        (0, 0),
        "{status:?}"
    );
    let views = node.peer_heights().await.unwrap();
    assert!(views.iter().all(|v| v.banned_until.is_none()), "{views:?}");
    node.shutdown().await;
    for v in validators {
        v.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_of_maximal_blocks_and_certificates_is_synced() {
    // Blocks within 2% of the 4 MiB limit (63 transactions of 64 KiB): each
    // certificate is three times the servers' 4 MiB commit budget, and any
    // chunk of two blocks is more than one block fetch may bring, so
    // chunks must be single blocks. None of it is the peer's fault.
    let chain = ChainBuilder::new(ChainConfig {
        transactions_per_block: 63,
        payload_bytes: soma_types::Limits::default().max_transaction_payload_bytes,
        ..ChainConfig::validators(4)
    })
    .build(3);
    let smallest = (1..=chain.tip())
        .flat_map(|i| chain.blocks_of(i))
        .map(|b| b.serialized().len())
        .min()
        .unwrap();
    assert!(smallest > 4_000_000, "{smallest}");
    let honest = validator(&chain, 1);
    let store: Arc<dyn ConsensusStore> = Arc::new(MemStore::new(chain.genesis()));
    let node = fresh(&chain, 9, &[&honest], store.clone());
    wait_synced(&node, chain.tip()).await;
    assert_same_chain(&chain, store.as_ref());
    let status = node.sync_status().await.unwrap();
    // One batch, whose certifier blocks are as large as its blocks: they
    // size its chunks at one block each before any is fetched, so none
    // is cut at the cap (before, the batch went as one chunk and was
    // halved eight times). (Other restarts, say a fetch that waited too
    // long under load, are not the peer's fault either.)
    assert_eq!(status.chunks_split, 0, "{status:?}");
    assert_eq!(status.invalid_responses, 0, "{status:?}");
    // Whatever the peer is charged with comes from the restarts (none,
    // unless a fetch waited too long on a loaded machine).
    let views = node.peer_heights().await.unwrap();
    let view = views.iter().find(|v| v.peer == honest.peer_id()).unwrap();
    assert!(view.faults <= status.restarts, "{view:?} {status:?}");
    assert_eq!(view.banned_until, None, "{view:?}");
    node.shutdown().await;
    honest.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_synced_from_a_synced_node_serves_a_third_with_certificates() {
    // A → B → C: B syncs from a validator A, A stops, and C syncs from B
    // alone. C can only finish if B stored certificates it can serve:
    // at batch ends, at epoch ends that are not batch ends, and at the tip.
    let chain = ChainBuilder::new(ChainConfig {
        commits_per_epoch: Some(450),
        ..ChainConfig::validators(4)
    })
    .build(1_000);
    assert_eq!(chain.committees().count(), 3);
    let a = validator(&chain, 1);
    let b_store: Arc<dyn ConsensusStore> = Arc::new(MemStore::new(chain.genesis()));
    let b = fresh(&chain, 8, &[&a], b_store.clone());
    wait_synced(&b, 1_000).await;
    a.shutdown().await;
    assert_same_chain(&chain, b_store.as_ref());

    let c_store: Arc<dyn ConsensusStore> = Arc::new(MemStore::new(chain.genesis()));
    let c = fresh(&chain, 9, &[&b], c_store.clone());
    wait_synced(&c, 1_000).await;
    assert_same_chain(&chain, c_store.as_ref());
    // C's certificates are what B served: the same minimal quorums.
    for i in 1..=1_000 {
        assert_eq!(
            c_store.certificate(i).unwrap(),
            b_store.certificate(i).unwrap(),
            "certificate of commit {i}"
        );
    }
    let peers: Vec<_> = c.peer_heights().await.unwrap();
    let peers: Vec<_> = peers.iter().map(|v| v.peer).collect();
    assert_eq!(peers, [b.peer_id()], "C knew no peer but B");
    c.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_smaller_batches_syncs_from_a_node_that_synced_in_larger_ones() {
    // B syncs from a validator in batches of 200 and keeps certificates
    // only at its batch ends (the multiples of 200 and the epoch ends 450
    // and 900). A stops; C, syncing in batches of 100, asks B alone for
    // ranges such as 1..=100 that hold none of them, and is served each
    // with the certificate the votes of the commits after it make.
    let chain = ChainBuilder::new(ChainConfig {
        commits_per_epoch: Some(450),
        ..ChainConfig::validators(4)
    })
    .build(1_000);
    let a = validator(&chain, 1);
    let b_store: Arc<dyn ConsensusStore> = Arc::new(MemStore::new(chain.genesis()));
    let b = fresh(&chain, 8, &[&a], b_store.clone());
    wait_synced(&b, 1_000).await;
    a.shutdown().await;
    let kept: Vec<u64> = (1..=1_000)
        .filter(|&i| b_store.certificate(i).unwrap().is_some())
        .collect();
    assert_eq!(kept, [200, 400, 450, 600, 800, 900, 1_000]);

    let c_store: Arc<dyn ConsensusStore> = Arc::new(MemStore::new(chain.genesis()));
    let c = soma_testkit::node(
        &chain,
        9,
        P2pConfig {
            seed_peers: seeds(&[&b]),
            ..P2pConfig::default().with_commit_sync_batch_size(100)
        },
        c_store.clone(),
    );
    wait_synced(&c, 1_000).await;
    assert_same_chain(&chain, c_store.as_ref());
    // C's batch ends: the multiples of 100, the epoch ends, each with a
    // certificate it checked (its votes are for that very commit).
    let ends: Vec<u64> = (1..=1_000)
        .filter(|&i| c_store.certificate(i).unwrap().is_some())
        .collect();
    assert_eq!(
        ends,
        [100, 200, 300, 400, 450, 500, 600, 700, 800, 900, 1_000]
    );
    for i in ends {
        let certificate = c_store.certificate(i).unwrap().unwrap();
        assert_eq!(certificate.len(), 3, "a minimal quorum of commit {i}");
        assert!(
            certificate
                .iter()
                .all(|b| b.block().commit_votes.contains(&chain.commit_ref(i))),
            "every certifier of commit {i} votes for it"
        );
    }
    c.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_fails_writes_mid_sync_holds_the_watermark_and_sync_recovers_when_it_heals() {
    use soma_testkit::failing_store::FailingStore;
    let chain = ChainBuilder::new(ChainConfig::validators(4)).build(1_500);
    let validators: Vec<P2pHandle> = (1..=2).map(|k| validator(&chain, k)).collect();
    // The disk fills up once the store holds 600 commits (three batches).
    let store = Arc::new(FailingStore::new(MemStore::new(chain.genesis())));
    store.fail_writes_above(600);
    let node = fresh(
        &chain,
        9,
        &validators.iter().collect::<Vec<_>>(),
        store.clone(),
    );
    soma_testkit::wait_until("three failed writes", DEADLINE, async || {
        store.failed_writes() >= 3
    })
    .await;
    let status = node.sync_status().await.unwrap();
    assert_eq!(status.synced, 600, "nothing past the full disk: {status:?}");
    assert_eq!(
        store.inner().highest_synced_commit().unwrap(),
        chain.commit_ref(600)
    );
    assert_eq!(
        status.invalid_responses, 0,
        "a full disk is no peer's fault"
    );

    store.heal();
    wait_synced(&node, 1_500).await;
    let status = node.sync_status().await.unwrap();
    assert_eq!(status.store_write_failures, store.failed_writes());
    assert_eq!(status.invalid_responses, 0);
    assert_same_chain(&chain, store.as_ref());
    // Nobody was banned for our disk.
    let views = node.peer_heights().await.unwrap();
    assert!(views.iter().all(|v| v.banned_until.is_none()), "{views:?}");
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_write_that_panics_is_a_failed_write_and_sync_goes_on() {
    use soma_testkit::failing_store::FailingStore;
    let chain = ChainBuilder::new(ChainConfig::validators(4)).build(1_000);
    let validators: Vec<P2pHandle> = (1..=2).map(|k| validator(&chain, k)).collect();
    // The write of the third batch panics, as a store asserting on a
    // damaged page would; the blocking task that ran it sends nothing.
    let store = Arc::new(FailingStore::new(MemStore::new(chain.genesis())));
    store.panic_once_above(400);
    let node = fresh(
        &chain,
        9,
        &validators.iter().collect::<Vec<_>>(),
        store.clone(),
    );
    wait_synced(&node, 1_000).await;
    let status = node.sync_status().await.unwrap();
    assert_eq!(store.failed_writes(), 1, "the write panicked once");
    assert_eq!(status.store_write_failures, 1, "counted as a failed write");
    assert_eq!(
        status.invalid_responses, 0,
        "a store's panic is no peer's fault"
    );
    assert_same_chain(&chain, store.as_ref());
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_lags_at_the_default_capacity_is_told_what_it_missed() {
    // The default broadcast capacity, as operators run it: a subscriber
    // that does not read while 3,000 commits are applied misses all but
    // the last 1,024, is told the exact count, and then reads the rest in
    // order; a stream from an index misses nothing.
    let config = P2pConfig::default();
    let capacity = config.synced_commit_broadcast_capacity;
    assert_eq!(capacity, 1_024);
    let chain = ChainBuilder::new(ChainConfig::validators(4)).build(3_000);
    let source = validator(&chain, 1);
    let store: Arc<dyn ConsensusStore> = Arc::new(MemStore::new(chain.genesis()));
    // No seed: nothing is applied before both subscribe.
    let node = soma_testkit::node(&chain, 9, config, store);
    let mut lagging = node.subscribe_synced_commits();
    let mut stream = node.subscribe_synced_commits_from(1);
    node.connect(Some(source.peer_id()), source.local_addr().to_string())
        .unwrap();
    wait_synced(&node, 3_000).await;

    let missed = 3_000 - capacity as u64;
    match lagging.recv().await {
        Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => assert_eq!(n, missed),
        other => panic!(
            "expected Lagged({missed}), got {:?}",
            other.map(|s| s.commit_ref)
        ),
    }
    for i in missed + 1..=3_000 {
        let subdag = lagging.recv().await.unwrap();
        assert_eq!(subdag.commit_ref, chain.commit_ref(i));
    }
    assert!(lagging.try_recv().is_err(), "nothing past the tip");
    for i in 1..=3_000 {
        let subdag = stream.next().await.unwrap();
        assert_eq!(
            subdag.commit_ref,
            chain.commit_ref(i),
            "the stream misses nothing"
        );
    }
    node.shutdown().await;
    source.shutdown().await;
}
