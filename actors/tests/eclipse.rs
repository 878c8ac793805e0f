//! Eclipse attacks on discovery, over real mutual TLS and real gRPC on
//! 127.0.0.1 with ephemeral ports: a thousand fresh identities stamping
//! their infos ahead of time, through connect-back calls and through a
//! malicious peer's answers, cannot push honest peers out of a node's
//! table; and a restarted peer is redialled as soon as it shows up again.
//!
//! All nodes share 127.0.0.1, so every address is in one /24: the
//! per-prefix cap is set out of the way here and the per-source cap carries
//! the defence (connect-back infos count by the caller's /24, so here all
//! of them share one bucket). The prefix cap, and callers of different
//! prefixes in different buckets, are checked by the Discovery core's unit
//! tests.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use soma_actors::connections::{self, PeerEvent};
use soma_actors::discovery::{self, SeedPeer};
use soma_actors::{P2pBuilder, P2pConfig, P2pHandle};
use soma_chain::{Chain, ChainBuilder, ChainConfig};
use soma_store::MemStore;
use soma_testkit::attack::{self, FakeInfoPeer, fresh_key, now_ms, serve_infos, signed_info};
use soma_types::{KeyPair, PeerId, SignedNodeInfo, codec};
use soma_wire::proto::{self, p2p_client::P2pClient};
use soma_wire::tls::{self, NodeIdentity};
use tokio::sync::broadcast;

/// Milliseconds between discovery rounds in these tests.
const INTERVAL_MS: u64 = 200;

/// Bounds every wait for something that should happen.
const WAIT: Duration = Duration::from_secs(60);

/// Fresh identities in each attack.
const SYBILS: usize = 1_000;

/// How far ahead the attackers stamp their infos (within the 30 s accepted).
const AHEAD_MS: u64 = 25_000;

/// Honest peers the node is connected to.
const HONEST: usize = 10;

/// The node's table size and per-source cap in the attack test.
const MAX_KNOWN: usize = 16;
const PER_SOURCE: usize = 4;

/// Connect-back calls in flight at once.
const CONCURRENCY: usize = 16;

fn chain() -> Chain {
    ChainBuilder::new(ChainConfig::validators(4)).build(5)
}

/// Short rounds; the connection target covers every seed.
fn config(seed_peers: Vec<SeedPeer>) -> P2pConfig {
    P2pConfig {
        seed_peers,
        timeout: Duration::from_secs(5),
        discovery: discovery::Config {
            interval_ms: INTERVAL_MS,
            target_concurrent_connections: 16,
            dial_backoff_ms: INTERVAL_MS,
            max_dial_backoff_ms: 5 * INTERVAL_MS,
            pending_dial_timeout_ms: 5_000,
            ..discovery::Config::default()
        },
        connections: connections::Config {
            connect_timeout_ms: 5_000,
            probe_interval_ms: INTERVAL_MS,
            ..connections::Config::default()
        },
        ..P2pConfig::default()
    }
}

fn start(chain: &Chain, config: P2pConfig, key: &KeyPair) -> P2pHandle {
    P2pBuilder::new(
        config,
        key.clone(),
        chain.genesis().clone(),
        Arc::new(MemStore::new(chain.genesis())),
    )
    .start()
    .expect("node starts")
}

async fn known(node: &P2pHandle) -> BTreeSet<PeerId> {
    node.known_peers()
        .await
        .expect("discovery answers")
        .into_iter()
        .map(|i| i.info.peer_id)
        .collect()
}

async fn wait_for<F: std::future::Future<Output = bool>>(what: &str, mut check: impl FnMut() -> F) {
    let deadline = Instant::now() + WAIT;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Calls GetKnownPeers on `node` as `key`, sending `own_info`; returns the
/// peer ids of the answer.
async fn call(node: &P2pHandle, key: &KeyPair, own_info: &SignedNodeInfo) -> Vec<PeerId> {
    let identity = NodeIdentity::generate(key).unwrap();
    let (channel, _) = tls::connect(
        &node.local_addr().to_string(),
        Some(&identity),
        Some(node.peer_id()),
        Duration::from_secs(10),
    )
    .await
    .expect("connects");
    let answer = P2pClient::new(channel)
        .get_known_peers(proto::GetKnownPeersRequest {
            own_info: Bytes::from(codec::encode(own_info)),
        })
        .await
        .expect("answered")
        .into_inner();
    answer
        .known_peers
        .iter()
        .map(|b| {
            codec::decode::<SignedNodeInfo>(b, 4096)
                .expect("a node info")
                .info
                .peer_id
        })
        .collect()
}

/// Waits until `node` has judged the answer `stub` sent after `after`
/// answers: it knows the stub's own info from that answer or a newer one,
/// and own info and fakes of one answer are learnt in one step.
async fn wait_answers_judged(node: &P2pHandle, stub: &FakeInfoPeer, after: usize) {
    let id = stub.peer_id;
    wait_for("the stub to answer again", || async {
        stub.sent().len() > after
    })
    .await;
    let sent = stub.sent()[after];
    wait_for("the stub's answer to be judged", || async {
        node.known_peers()
            .await
            .unwrap()
            .iter()
            .any(|i| i.info.peer_id == id && i.info.timestamp_ms >= sent)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_identities_stamped_ahead_do_not_evict_honest_peers() {
    soma_testkit::init_tracing();
    let chain = chain();
    let nowhere = attack::closed_address();

    // The honest peers, and a malicious one offering 200 of its 1,000 fake
    // identities in every answer, each stamped 25 s ahead: each at a
    // loopback address of a /24 of its own, as peers of a real network
    // are (answers count in the bucket of the network a peer was dialled
    // in).
    let mut honest = Vec::new();
    for h in 0..HONEST {
        let key = KeyPair::from_seed([h as u8 + 1; 32]);
        honest.push(serve_infos(key, attack::host(100 + h as u8), Vec::new(), 0).await);
    }
    let fakes: Vec<SignedNodeInfo> = (0..SYBILS)
        .map(|i| signed_info(&fresh_key(1, i), &nowhere, now_ms() + AHEAD_MS))
        .collect();
    let fake_ids: BTreeSet<PeerId> = fakes.iter().map(|i| i.info.peer_id).collect();
    let evil = serve_infos(KeyPair::from_seed([66; 32]), attack::host(99), fakes, 200).await;
    let evil_id = evil.peer_id;
    let honest_ids: BTreeSet<PeerId> = honest.iter().map(|h| h.peer_id).collect();

    let mut seeds: Vec<SeedPeer> = honest.iter().map(FakeInfoPeer::seed).collect();
    seeds.push(evil.seed());
    let mut node_config = config(seeds);
    node_config.discovery.max_known_peers = MAX_KNOWN;
    node_config.discovery.max_known_peers_per_source = PER_SOURCE;
    node_config.discovery.max_new_peers_per_source_per_interval = PER_SOURCE;
    // Everyone is on 127.0.0/24: the prefix cap is out of the way here.
    node_config.discovery.max_known_peers_per_prefix = MAX_KNOWN;
    let node = start(&chain, node_config, &KeyPair::from_seed([99; 32]));

    wait_for("the node to connect to every seed", || async {
        node.connected_peers().await.unwrap().len() == HONEST + 1
    })
    .await;
    wait_for("the node to learn every honest peer", || async {
        known(&node).await.is_superset(&honest_ids)
    })
    .await;

    // A thousand fresh identities call in, each sending its own info
    // stamped 25 s ahead (connect-back), and read the answer.
    let most_fakes_passed_on = futures::stream::iter(0..SYBILS)
        .map(|i| {
            let (node, nowhere, honest_ids) = (&node, &nowhere, &honest_ids);
            async move {
                let key = fresh_key(2, i);
                let info = signed_info(&key, nowhere, now_ms() + AHEAD_MS);
                let answer = call(node, &key, &info).await;
                answer.iter().filter(|p| !honest_ids.contains(p)).count()
            }
        })
        .buffer_unordered(CONCURRENCY)
        .fold(0, |most, n| async move { most.max(n) })
        .await;

    // Connect-back infos of callers from one /24 share one bucket, whoever
    // sent them: every caller here comes from 127.0.0.1.
    let sybil_ids: BTreeSet<PeerId> = (0..SYBILS)
        .map(|i| PeerId::from(fresh_key(2, i).public()))
        .collect();
    let sybils_known = known(&node).await.intersection(&sybil_ids).count();
    assert!(
        sybils_known <= PER_SOURCE,
        "{sybils_known} connect-back infos"
    );

    // The malicious peer has offered all its fakes at least twice since.
    let answers = evil.sent().len();
    wait_answers_judged(&node, &evil, answers + 2 * SYBILS / 200).await;

    // The guarantee: every honest peer connected to and verified is kept;
    // the attackers hold what is left of the table, and no more than one
    // bucket of PER_SOURCE for the malicious peer (itself included) and
    // one for the connect-back infos of 127.0.0/24.
    let known = known(&node).await;
    let attackers: BTreeSet<PeerId> = known.difference(&honest_ids).copied().collect();
    assert!(known.is_superset(&honest_ids), "{known:?}");
    assert_eq!(known.len(), MAX_KNOWN);
    assert_eq!(attackers.len(), MAX_KNOWN - HONEST);
    assert!(attackers.len() <= 2 * PER_SOURCE);
    let from_evil = attackers
        .iter()
        .filter(|p| **p == evil_id || fake_ids.contains(p))
        .count();
    assert!(
        from_evil <= PER_SOURCE,
        "{from_evil} from the malicious peer"
    );
    assert!(attackers.len() - from_evil <= PER_SOURCE);
    eprintln!(
        "honest {HONEST} of {} known ({:.1}%), attackers {}",
        known.len(),
        100.0 * HONEST as f64 / known.len() as f64,
        attackers.len()
    );

    // What the node passes on: never more attackers than it holds.
    assert!(most_fakes_passed_on <= MAX_KNOWN - HONEST);
    let key = fresh_key(3, 0);
    let answer = call(&node, &key, &signed_info(&key, &nowhere, now_ms())).await;
    let answered: BTreeSet<PeerId> = answer.into_iter().collect();
    assert!(answered.is_superset(&honest_ids));
    assert!(answered.difference(&honest_ids).count() <= MAX_KNOWN - HONEST);

    node.shutdown().await;
    drop((honest, evil));
}

/// Reads `events` until one matches, within the deadline.
async fn wait_for_event(
    what: &str,
    events: &mut broadcast::Receiver<PeerEvent>,
    mut matches: impl FnMut(&PeerEvent) -> bool,
) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Err(_) => panic!("timed out waiting for {what}"),
            Ok(Ok(event)) if matches(&event) => return,
            Ok(Ok(_)) | Ok(Err(broadcast::error::RecvError::Lagged(_))) => {}
            Ok(Err(broadcast::error::RecvError::Closed)) => panic!("events closed: {what}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_peer_is_redialled_when_it_shows_up_not_after_its_backoff() {
    soma_testkit::init_tracing();
    let chain = chain();
    // After one failed dial the node would wait an hour, far past every
    // wait of this test: a redial can only come from the peer showing up.
    let hour_ms = 3_600_000;
    let mut node_config = config(Vec::new());
    node_config.discovery.dial_backoff_ms = hour_ms;
    node_config.discovery.max_dial_backoff_ms = hour_ms;
    let node = start(&chain, node_config, &KeyPair::from_seed([1; 32]));
    let node_seed = SeedPeer {
        peer_id: Some(node.peer_id()),
        address: node.local_addr().to_string(),
    };
    let mut events = node.subscribe_peer_events();

    // P calls in (connect-back), so the node learns it and dials it.
    let p_key = KeyPair::from_seed([2; 32]);
    let p = start(&chain, config(vec![node_seed.clone()]), &p_key);
    let (p_id, p_address) = (p.peer_id(), p.local_addr());
    wait_for_event(
        "the node to connect to p",
        &mut events,
        |e| matches!(e, PeerEvent::Connected { peer, .. } if *peer == p_id),
    )
    .await;

    // P stops: the node loses it, redials it, fails, and backs off.
    p.shutdown().await;
    wait_for_event("the node to lose p", &mut events, |e| {
        *e == PeerEvent::Disconnected { peer: p_id }
    })
    .await;
    wait_for_event(
        "the node's dial of p to fail",
        &mut events,
        |e| matches!(e, PeerEvent::DialFailed { peer: Some(p), .. } if *p == p_id),
    )
    .await;

    // P restarts on the same address and calls in with a fresh info: the
    // next event about P is the node's dial succeeding, an hour early.
    let mut restarted = config(vec![node_seed]);
    restarted.listen_address = p_address;
    let p = start(&chain, restarted, &p_key);
    wait_for_event("the node to redial p", &mut events, |e| match e {
        PeerEvent::Connected { peer, .. } if *peer == p_id => true,
        PeerEvent::DialFailed { peer: Some(p), .. } if *p == p_id => {
            panic!("a dial of p failed after its restart")
        }
        _ => false,
    })
    .await;
    p.shutdown().await;
    node.shutdown().await;
}
