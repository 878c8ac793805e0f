//! Discovery between handles in one process on 127.0.0.1 with ephemeral
//! ports, over real mutual TLS and real gRPC: seeds, peer exchange,
//! convergence, private nodes, forged infos, and peers that go away.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use soma_actors::connections::{self, PeerEvent};
use soma_actors::discovery::{self, SeedPeer};
use soma_actors::{P2pBuilder, P2pConfig, P2pHandle};
use soma_chain::{Chain, ChainBuilder, ChainConfig};
use soma_store::MemStore;
use soma_testkit::attack::{InfosOnly, ServesInfos};
use soma_types::{Access, KeyPair, NodeInfo, PeerId, SignedNodeInfo, codec};
use soma_wire::proto::{self, p2p_server::P2pServer};
use soma_wire::tls::{self, AccessPolicy, Caller, NodeIdentity};
use tokio::sync::broadcast;
use tonic::{Request, Response, Status};

/// Milliseconds between discovery rounds in these tests.
const INTERVAL_MS: u64 = 200;

/// Bounds every wait for something that should happen.
const WAIT: Duration = Duration::from_secs(30);

fn chain() -> Chain {
    ChainBuilder::new(ChainConfig::validators(4)).build(5)
}

/// Short rounds and backoffs, a modest connection target.
fn config(seed_peers: Vec<SeedPeer>) -> P2pConfig {
    P2pConfig {
        seed_peers,
        timeout: Duration::from_secs(5),
        discovery: discovery::Config {
            interval_ms: INTERVAL_MS,
            peers_to_query: 3,
            target_concurrent_connections: 4,
            dial_backoff_ms: INTERVAL_MS,
            max_dial_backoff_ms: 5 * INTERVAL_MS,
            pending_dial_timeout_ms: 5_000,
            ..discovery::Config::default()
        },
        connections: connections::Config {
            connect_timeout_ms: 5_000,
            ..connections::Config::default()
        },
        ..P2pConfig::default()
    }
}

fn start(chain: &Chain, config: P2pConfig, key: u8) -> P2pHandle {
    P2pBuilder::new(
        config,
        KeyPair::from_seed([key; 32]),
        chain.genesis().clone(),
        Arc::new(MemStore::new(chain.genesis())),
    )
    .start()
    .expect("node starts")
}

fn seed(node: &P2pHandle) -> SeedPeer {
    SeedPeer {
        peer_id: Some(node.peer_id()),
        address: node.local_addr().to_string(),
    }
}

fn peer_id(key: u8) -> PeerId {
    PeerId::from(KeyPair::from_seed([key; 32]).public())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

async fn known(node: &P2pHandle) -> BTreeSet<PeerId> {
    node.known_peers()
        .await
        .expect("discovery answers")
        .into_iter()
        .map(|i| i.info.peer_id)
        .collect()
}

async fn knows_all(node: &P2pHandle, others: &[PeerId]) -> bool {
    let known = known(node).await;
    others.iter().all(|p| known.contains(p))
}

async fn wait_for<F: std::future::Future<Output = bool>>(what: &str, mut check: impl FnMut() -> F) {
    let deadline = Instant::now() + WAIT;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Reads `events` until one matches, within the deadline.
async fn wait_for_event(
    what: &str,
    events: &mut broadcast::Receiver<PeerEvent>,
    mut matches: impl FnMut(&PeerEvent) -> bool,
) -> PeerEvent {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Err(_) => panic!("timed out waiting for {what}"),
            Ok(Ok(event)) if matches(&event) => return event,
            Ok(Ok(_)) | Ok(Err(broadcast::error::RecvError::Lagged(_))) => {}
            Ok(Err(broadcast::error::RecvError::Closed)) => panic!("events closed: {what}"),
        }
    }
}

async fn shutdown_all(nodes: &[P2pHandle]) {
    for node in nodes {
        node.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_through_one_seed_all_know_each_other() {
    soma_testkit::init_tracing();
    let chain = chain();
    let s = start(&chain, config(vec![]), 1);
    let a = start(&chain, config(vec![seed(&s)]), 2);
    // B knows the seed only by address: its id comes from the handshake.
    let b = start(
        &chain,
        config(vec![SeedPeer {
            peer_id: None,
            address: s.local_addr().to_string(),
        }]),
        3,
    );
    let nodes = [s, a, b];
    let ids: Vec<PeerId> = nodes.iter().map(P2pHandle::peer_id).collect();
    for (i, node) in nodes.iter().enumerate() {
        let others: Vec<PeerId> = ids.iter().copied().filter(|p| *p != ids[i]).collect();
        wait_for(&format!("node {i} to know the other two"), || {
            knows_all(node, &others)
        })
        .await;
        let known = known(node).await;
        assert!(!known.contains(&ids[i]), "node {i} knows itself");
        assert_eq!(known.len(), 2, "node {i} knows {known:?}");
    }
    // Every info known is the one its peer signed, addresses included.
    for node in &nodes {
        for info in node.known_peers().await.unwrap() {
            let owner = nodes.iter().find(|n| n.peer_id() == info.info.peer_id);
            let owner = owner.expect("an info of a running node");
            assert_eq!(info.info.addresses, vec![owner.local_addr().to_string()]);
        }
    }
    for node in &nodes {
        assert!(node.health().is_healthy());
    }
    shutdown_all(&nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_nodes_through_one_seed_converge() {
    soma_testkit::init_tracing();
    const N: usize = 16;
    let chain = chain();
    let mut nodes = vec![start(&chain, config(vec![]), 1)];
    let seed0 = seed(&nodes[0]);
    for key in 2..=N as u8 {
        nodes.push(start(&chain, config(vec![seed0.clone()]), key));
    }
    let ids: Vec<PeerId> = nodes.iter().map(P2pHandle::peer_id).collect();
    wait_for("every node to know every other", || async {
        for (i, node) in nodes.iter().enumerate() {
            if known(node).await.len() < N - 1 {
                return false;
            }
            let others: Vec<PeerId> = ids.iter().copied().filter(|p| *p != ids[i]).collect();
            if !knows_all(node, &others).await {
                return false;
            }
        }
        true
    })
    .await;
    // How fast is measured by `make bench` (discovery section), not here.
    for (i, node) in nodes.iter().enumerate() {
        let known = known(node).await;
        assert_eq!(known.len(), N - 1, "node {i}");
        assert!(!known.contains(&ids[i]), "node {i} knows itself");
        // The connection target holds (allowlisted peers aside, none here).
        let connected = node.connected_peers().await.unwrap();
        assert!(connected.len() <= 4, "node {i} holds {}", connected.len());
    }
    shutdown_all(&nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_node_is_reachable_only_by_allowlisted_peers() {
    soma_testkit::init_tracing();
    let chain = chain();
    let (a_id, b_id) = (peer_id(2), peer_id(3));
    let p = start(
        &chain,
        P2pConfig {
            access: Access::Private,
            allowlist: vec![a_id],
            ..config(vec![])
        },
        1,
    );
    let a = start(&chain, config(vec![seed(&p)]), 2);
    let b = start(&chain, config(vec![seed(&p)]), 3);
    let mut b_events = b.subscribe_peer_events();
    assert_eq!(b.peer_id(), b_id);

    // A, allowlisted, gets through: each side learns the other.
    wait_for("a to connect to p", || async {
        a.connected_peers().await.unwrap().contains(&p.peer_id())
    })
    .await;
    wait_for("a to learn p", || async {
        known(&a).await.contains(&p.peer_id())
    })
    .await;
    wait_for("p to learn a", || async { known(&p).await.contains(&a_id) }).await;

    // B is refused at the handshake: its dial of P fails, and it never
    // holds a connection to P nor learns it.
    let (p_id, p_address) = (p.peer_id(), p.local_addr().to_string());
    let mut refused = |e: &PeerEvent| {
        assert!(
            !matches!(e, PeerEvent::Connected { peer, .. } if *peer == p_id),
            "b connected to p: {e:?}"
        );
        matches!(e, PeerEvent::DialFailed { address, .. } if *address == p_address)
    };
    let failed = wait_for_event("b's dial of p to fail", &mut b_events, &mut refused).await;
    eprintln!("b: {failed:?}");
    // A second failure shows B retried (after its backoff) and failed again.
    wait_for_event("b's second dial of p to fail", &mut b_events, &mut refused).await;
    assert!(!b.connected_peers().await.unwrap().contains(&p.peer_id()));
    assert!(known(&b).await.is_empty());
    assert!(!known(&p).await.contains(&b_id));
    // B never had a connection to P, nor to anyone.
    while let Ok(event) = b_events.try_recv() {
        refused(&event);
    }
    assert!(b.connected_peers().await.unwrap().is_empty());
    // P's known peers are its allowlist at most.
    assert_eq!(known(&p).await, BTreeSet::from([a_id]));
    shutdown_all(&[p, a, b]).await;
}

/// A peer that answers GetKnownPeers with its own valid info and infos of
/// other peers it made up, and GetCommitAvailability so it stays connected.
struct Malicious {
    key: KeyPair,
    address: String,
    forged: Vec<SignedNodeInfo>,
    /// The timestamp of the first own info sent to each caller.
    answered: Arc<Mutex<HashMap<PeerId, u64>>>,
    /// GetKnownPeers calls answered, all callers together.
    calls: Arc<AtomicUsize>,
    /// If set, GetKnownPeers calls are held, never answered.
    holding: Option<Arc<Holding>>,
}

/// GetKnownPeers calls a [`Malicious`] peer holds.
#[derive(Default)]
struct Holding {
    /// Held now.
    now: AtomicUsize,
    /// Most held at once.
    most: AtomicUsize,
}

/// One held call: counted while it lasts.
struct Held(Arc<Holding>);

impl Held {
    fn new(holding: &Arc<Holding>) -> Held {
        let now = holding.now.fetch_add(1, Ordering::SeqCst) + 1;
        holding.most.fetch_max(now, Ordering::SeqCst);
        Held(holding.clone())
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.0.now.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Malicious {
    fn own_info(&self) -> SignedNodeInfo {
        SignedNodeInfo::sign(
            NodeInfo {
                peer_id: PeerId::from(self.key.public()),
                addresses: vec![self.address.clone()],
                timestamp_ms: now_ms(),
                access: Access::Public,
            },
            &self.key,
        )
    }
}

#[tonic::async_trait]
impl ServesInfos for Malicious {
    async fn known_peers(
        &self,
        request: Request<proto::GetKnownPeersRequest>,
    ) -> Result<Response<proto::GetKnownPeersResponse>, Status> {
        let own_info = self.own_info();
        self.calls.fetch_add(1, Ordering::SeqCst);
        if let Some(holding) = &self.holding {
            let _held = Held::new(holding);
            std::future::pending::<()>().await;
        }
        if let Caller::Peer(caller) = tls::caller(&request) {
            let mut answered = self.answered.lock().unwrap();
            answered.entry(caller).or_insert(own_info.info.timestamp_ms);
        }
        Ok(Response::new(proto::GetKnownPeersResponse {
            own_info: Bytes::from(codec::encode(&own_info)),
            known_peers: self
                .forged
                .iter()
                .map(|i| Bytes::from(codec::encode(i)))
                .collect(),
        }))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_node_info_relayed_by_a_malicious_peer_is_never_accepted() {
    soma_testkit::init_tracing();
    let chain = chain();
    let evil_key = KeyPair::from_seed([66; 32]);
    let evil_id = PeerId::from(evil_key.public());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let evil_address = listener.local_addr().unwrap().to_string();

    // Victims: none of them runs; only the malicious peer speaks for them.
    let forged_victim = peer_id(90);
    let expired_victim = KeyPair::from_seed([91; 32]);
    let future_victim = KeyPair::from_seed([92; 32]);
    let info = |peer: PeerId, timestamp_ms: u64| NodeInfo {
        peer_id: peer,
        addresses: vec![evil_address.clone()],
        timestamp_ms,
        access: Access::Public,
    };
    let day_ms = 24 * 60 * 60 * 1000;
    let forged = vec![
        // Signed by the wrong key: the malicious peer's own.
        SignedNodeInfo::sign(info(forged_victim, now_ms()), &evil_key),
        // Signed by its own key, but two days old.
        SignedNodeInfo::sign(
            info(PeerId::from(expired_victim.public()), now_ms() - 2 * day_ms),
            &expired_victim,
        ),
        // Signed by its own key, but an hour ahead.
        SignedNodeInfo::sign(
            info(PeerId::from(future_victim.public()), now_ms() + 3_600_000),
            &future_victim,
        ),
    ];
    let victims: Vec<PeerId> = forged.iter().map(|i| i.info.peer_id).collect();

    let answered = Arc::new(Mutex::new(HashMap::new()));
    let identity = NodeIdentity::generate(&evil_key).unwrap();
    let evil = Malicious {
        key: evil_key,
        address: evil_address.clone(),
        forged,
        answered: answered.clone(),
        calls: Arc::default(),
        holding: None,
    };
    let (stop, server) = serve_malicious(evil, &identity, listener);

    // H1 is seeded with the malicious peer; H2 knows only H1.
    let h1 = start(
        &chain,
        config(vec![SeedPeer {
            peer_id: Some(evil_id),
            address: evil_address,
        }]),
        1,
    );
    let h2 = start(&chain, config(vec![seed(&h1)]), 2);

    // H1 processed a malicious answer: it knew no one else, so it learnt the
    // peer's own info from the peer, in the answer carrying the forgeries.
    wait_for("h1 to learn the malicious peer", || async {
        known(&h1).await.contains(&evil_id)
    })
    .await;
    // H2 knew only H1, so it first learnt the malicious peer relayed by H1
    // (valid, so relayed); then it connects and asks the peer itself.
    wait_for("h2 to learn the malicious peer", || async {
        known(&h2).await.contains(&evil_id)
    })
    .await;
    // An info at least as new as that answer's: the answer was processed
    // (or a newer one, relayed by H1, which got the same forgeries).
    wait_answer_processed(&h2, evil_id, &answered, 0).await;

    for (name, node) in [("h1", &h1), ("h2", &h2)] {
        let known = known(node).await;
        for victim in &victims {
            assert!(!known.contains(victim), "{name} accepted {victim}");
        }
        assert!(
            known
                .iter()
                .all(|p| [evil_id, h1.peer_id(), h2.peer_id()].contains(p)),
            "{name} knows {known:?}"
        );
    }
    shutdown_all(&[h1, h2]).await;
    let _ = stop.send(());
    server.await.unwrap().unwrap();
}

/// An answer to GetKnownPeers larger than the infos a node keeps of one
/// can take is refused whole, not decoded to keep its first few hundred:
/// four thousand valid infos, the server's own first, teach the node
/// nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_larger_than_the_infos_kept_of_it_is_refused_whole() {
    let chain = chain();
    let evil_key = KeyPair::from_seed([67; 32]);
    let evil_id = PeerId::from(evil_key.public());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let evil_address = listener.local_addr().unwrap().to_string();
    // Valid infos, each signed by its own key, at the malicious address.
    let forged: Vec<SignedNodeInfo> = (0..4_000u32)
        .map(|n| {
            let mut seed = [7u8; 32];
            seed[..4].copy_from_slice(&n.to_le_bytes());
            let key = KeyPair::from_seed(seed);
            let info = NodeInfo {
                peer_id: PeerId::from(key.public()),
                addresses: vec![evil_address.clone()],
                timestamp_ms: now_ms(),
                access: Access::Public,
            };
            SignedNodeInfo::sign(info, &key)
        })
        .collect();
    let size: usize = forged.iter().map(|i| codec::encode(i).len()).sum();
    let most = discovery::Config::default().max_peers_to_send + 1;
    assert!(
        size > most * (2 << 10),
        "the answer, {size} bytes, must be past what its kept infos take"
    );
    let calls = Arc::new(AtomicUsize::new(0));
    let identity = NodeIdentity::generate(&evil_key).unwrap();
    let evil = Malicious {
        key: evil_key,
        address: evil_address.clone(),
        forged,
        answered: Arc::default(),
        calls: calls.clone(),
        holding: None,
    };
    let (stop, server) = serve_malicious(evil, &identity, listener);
    let node = start(
        &chain,
        config(vec![SeedPeer {
            peer_id: Some(evil_id),
            address: evil_address,
        }]),
        1,
    );
    // Three answers sent, two rounds apart at least: a learnt answer would
    // have been learnt long before.
    wait_for("three answers", || async {
        calls.load(Ordering::SeqCst) >= 3
    })
    .await;
    assert!(
        known(&node).await.is_empty(),
        "learnt from an oversized answer"
    );
    shutdown_all(&[node]).await;
    let _ = stop.send(());
    server.await.unwrap().unwrap();
}

/// A peer that holds its GetKnownPeers answers is asked again only once
/// its call ended (at the call's timeout), not at every round: it never
/// holds two calls of the node's at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_holding_its_answer_is_asked_once_at_a_time() {
    soma_testkit::init_tracing();
    let chain = chain();
    let mut peers = Vec::new();
    let holding = Arc::new(Holding::default());
    for (n, holding) in [(68u8, Some(holding.clone())), (69, None)] {
        let key = KeyPair::from_seed([n; 32]);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let seed = SeedPeer {
            peer_id: Some(PeerId::from(key.public())),
            address: address.clone(),
        };
        let identity = NodeIdentity::generate(&key).unwrap();
        let calls = Arc::new(AtomicUsize::new(0));
        let peer = Malicious {
            key,
            address,
            forged: Vec::new(),
            answered: Arc::default(),
            calls: calls.clone(),
            holding,
        };
        let (stop, server) = serve_malicious(peer, &identity, listener);
        peers.push((seed, calls, stop, server));
    }
    let mut node_config = config(peers.iter().map(|p| p.0.clone()).collect());
    // A held call lasts five rounds.
    node_config.timeout = Duration::from_millis(5 * INTERVAL_MS);
    let node = start(&chain, node_config, 1);
    let held_calls = peers[0].1.clone();
    wait_for("three calls held one after the other", || async {
        held_calls.load(Ordering::SeqCst) >= 3
    })
    .await;
    assert_eq!(holding.most.load(Ordering::SeqCst), 1);
    shutdown_all(&[node]).await;
    for (_, _, stop, server) in peers {
        let _ = stop.send(());
        // Its held call would keep a graceful stop waiting.
        server.abort();
    }
}

/// Serves `evil` over mutual TLS on `listener` until `stop` fires.
/// Waits until the malicious peer `evil_id` has answered `node` and `node`
/// knows an info of it at least `newer_by_ms` newer than the one in that
/// answer: the answer, with its forgeries, has been judged.
async fn wait_answer_processed(
    node: &P2pHandle,
    evil_id: PeerId,
    answered: &Mutex<HashMap<PeerId, u64>>,
    newer_by_ms: u64,
) {
    wait_for("the malicious peer to answer", || async {
        answered.lock().unwrap().contains_key(&node.peer_id())
    })
    .await;
    let sent = answered.lock().unwrap()[&node.peer_id()];
    wait_for("the malicious answer to be processed", || async {
        node.known_peers()
            .await
            .unwrap()
            .iter()
            .any(|i| i.info.peer_id == evil_id && i.info.timestamp_ms >= sent + newer_by_ms)
    })
    .await;
}

fn serve_malicious(
    evil: Malicious,
    identity: &NodeIdentity,
    listener: tokio::net::TcpListener,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
) {
    let server_config = tls::server_config(identity, &AccessPolicy::default()).unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(P2pServer::new(InfosOnly(evil)))
            .serve_with_incoming_shutdown(tls::incoming(listener, server_config), async {
                let _ = stopped.await;
            }),
    );
    (stop, server)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_copies_of_an_honest_peers_info_change_nothing_about_it() {
    soma_testkit::init_tracing();
    let chain = chain();
    let h_key = KeyPair::from_seed([1; 32]);
    let h = start(&chain, config(vec![]), 1);
    let h_id = h.peer_id();
    let h_address = h.local_addr().to_string();
    let evil_key = KeyPair::from_seed([66; 32]);
    let evil_id = PeerId::from(evil_key.public());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let evil_address = listener.local_addr().unwrap().to_string();

    // What the malicious peer relays about H, each pointing H's id at the
    // malicious peer's own address and newer than anything H has signed.
    let genuine = h.node_info().clone();
    let redirected = NodeInfo {
        addresses: vec![evil_address.clone()],
        timestamp_ms: now_ms() + 10_000,
        ..genuine.info.clone()
    };
    let mut flipped = genuine.clone();
    flipped.signature.0[0] ^= 1;
    let tampered = vec![
        // H's signature kept over an edited info.
        SignedNodeInfo {
            info: redirected.clone(),
            signature: genuine.signature,
        },
        // Signed again by the malicious peer's key.
        SignedNodeInfo::sign(redirected.clone(), &evil_key),
        // H's own info with its signature damaged.
        flipped,
        // A genuine info of H, but older: replayed, it must not replace a
        // newer one.
        SignedNodeInfo::sign(
            NodeInfo {
                timestamp_ms: genuine.info.timestamp_ms - 60_000,
                ..redirected
            },
            &h_key,
        ),
    ];
    let answered = Arc::new(Mutex::new(HashMap::new()));
    let identity = NodeIdentity::generate(&evil_key).unwrap();
    let evil = Malicious {
        key: evil_key,
        address: evil_address.clone(),
        forged: tampered,
        answered: answered.clone(),
        calls: Arc::default(),
        holding: None,
    };
    let (stop, server) = serve_malicious(evil, &identity, listener);

    // V knows both; the malicious peer answers it every round.
    let v = start(
        &chain,
        config(vec![
            seed(&h),
            SeedPeer {
                peer_id: Some(evil_id),
                address: evil_address,
            },
        ]),
        2,
    );
    wait_for("v to learn h and the malicious peer", || async {
        knows_all(&v, &[h_id, evil_id]).await
    })
    .await;
    // Two answers processed: each carries the peer's own info, so a known
    // info of it this new means the answer's tampered infos were judged.
    wait_answer_processed(&v, evil_id, &answered, INTERVAL_MS).await;

    // V's info of H is one H signed, with H's address.
    let known = v.known_peers().await.unwrap();
    let h_info = known
        .iter()
        .find(|i| i.info.peer_id == h_id)
        .expect("h is still known");
    assert_eq!(h_info.info.addresses, vec![h_address]);
    assert!(h_info.info.timestamp_ms >= genuine.info.timestamp_ms);
    assert!(
        h_id.public_key().unwrap().verify(
            soma_types::Domain::NodeInfo,
            &h_info.signing_digest(),
            &h_info.signature
        ),
        "{h_info:?}"
    );
    // H stays connected and is not held responsible for any of it.
    assert!(v.connected_peers().await.unwrap().contains(&h_id));
    let views = v.peer_heights().await.unwrap();
    let h_view = views.iter().find(|p| p.peer == h_id);
    assert!(
        h_view.is_some_and(|p| p.banned_until.is_none() && p.failures == 0),
        "{h_view:?}"
    );
    shutdown_all(&[v, h]).await;
    let _ = stop.send(());
    server.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_peer_stays_known_until_it_expires_and_is_redialled() {
    soma_testkit::init_tracing();
    // Infos expire after 3 s; connections are probed every round.
    const MAX_AGE_MS: u64 = 3_000;
    let chain = chain();
    let short = |seeds| {
        let mut c = config(seeds);
        c.discovery.node_info_max_age_ms = MAX_AGE_MS;
        c.connections.probe_interval_ms = INTERVAL_MS;
        c
    };
    let a = start(&chain, short(vec![]), 1);
    let b = start(&chain, short(vec![seed(&a)]), 2);
    let (a_id, b_id) = (a.peer_id(), b.peer_id());
    let b_address = b.local_addr().to_string();
    let mut a_events = a.subscribe_peer_events();

    wait_for("a and b to know each other", || async {
        known(&a).await.contains(&b_id) && known(&b).await.contains(&a_id)
    })
    .await;
    wait_for("a to connect back to b", || async {
        a.connected_peers().await.unwrap().contains(&b_id)
    })
    .await;

    b.shutdown().await;
    let stopped = Instant::now();
    wait_for_event("a to lose b", &mut a_events, |e| {
        *e == PeerEvent::Disconnected { peer: b_id }
    })
    .await;
    // Gone, but its info is still fresh: still known.
    let info = a
        .known_peers()
        .await
        .unwrap()
        .into_iter()
        .find(|i| i.info.peer_id == b_id)
        .expect("b is still known once disconnected");
    assert!(!a.connected_peers().await.unwrap().contains(&b_id));

    // Known and not connected, so A dials B again, and fails.
    wait_for_event("a to redial b", &mut a_events, |e| {
        matches!(e, PeerEvent::DialFailed { peer: Some(p), address, .. }
            if *p == b_id && *address == b_address)
    })
    .await;

    // Once its last info is older than the maximum age, B is forgotten.
    wait_for("b's info to expire at a", || async {
        !known(&a).await.contains(&b_id)
    })
    .await;
    let expired_at = now_ms();
    assert!(
        expired_at >= info.info.timestamp_ms + MAX_AGE_MS,
        "forgotten {} ms after its info was signed",
        expired_at - info.info.timestamp_ms
    );
    eprintln!("b forgotten {:?} after it stopped", stopped.elapsed());
    assert!(a.health().is_healthy());
    a.shutdown().await;
}

/// A node at its connection target of one swaps its connection over what
/// it knows: it connects to a peer past its target and drops the other,
/// every peer still up (so a drop can only be the rotation's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_at_its_target_rotates_its_connection_to_another_known_peer() {
    soma_testkit::init_tracing();
    let chain = chain();
    let s = start(&chain, config(vec![]), 1);
    let others: Vec<P2pHandle> = (2..=4)
        .map(|k| start(&chain, config(vec![seed(&s)]), k))
        .collect();
    let mut c = config(vec![seed(&s)]);
    c.discovery.target_concurrent_connections = 1;
    c.discovery.rotation_interval_ms = 500;
    let node = start(&chain, c, 9);
    let mut events = node.subscribe_peer_events();
    // The seed may have connected before the subscription: what was
    // connected once subscribed counts with the events after it.
    let mut connected: BTreeSet<PeerId> = node
        .connected_peers()
        .await
        .expect("the node runs")
        .into_iter()
        .collect();
    let ids: Vec<PeerId> = others.iter().map(P2pHandle::peer_id).collect();
    wait_for("the node to know the other three", || {
        knows_all(&node, &ids)
    })
    .await;
    // Events before the rotation are the seed's connection (and perhaps
    // dials to the others it learnt before it was full); the first drop
    // is a rotation's.
    let dropped = loop {
        match wait_for_event("a connection dropped", &mut events, |_| true).await {
            PeerEvent::Connected { peer, .. } => {
                connected.insert(peer);
            }
            PeerEvent::Disconnected { peer } => break peer,
            PeerEvent::DialFailed { .. } => panic!("every peer is up"),
        }
    };
    // Isolated, it dialled its seed only; full, it waited for the
    // rotation, which connected one of the others and dropped the seed.
    let rotated_in: Vec<PeerId> = connected
        .iter()
        .filter(|p| ids.contains(p))
        .copied()
        .collect();
    assert_eq!(rotated_in.len(), 1, "{connected:?}");
    assert_eq!(connected, BTreeSet::from([s.peer_id(), rotated_in[0]]));
    assert_eq!(dropped, s.peer_id(), "never the peer rotated in");
    for n in others.iter().chain([&s]) {
        assert!(n.health().is_healthy());
    }
    shutdown_all(&[node]).await;
    shutdown_all(&others).await;
    s.shutdown().await;
}

/// GetKnownPeers calls `node` has answered.
fn known_peers_answered(node: &P2pHandle) -> u64 {
    node.rpc_counts()
        .iter()
        .filter(|(method, code, _)| *method == "GetKnownPeers" && *code == tonic::Code::Ok)
        .map(|(_, _, n)| n)
        .sum()
}

/// The validator is a seed twice: by its identity at its own address, and
/// by address alone through a forwarder. Whichever dial lands second finds
/// the validator connected already: Connections closes it and says so
/// (`DialFailed { AlreadyConnected }`), and Discovery's actor hands that to
/// its core as `AlreadyConnected`, so the seed address is known as the
/// validator from then on and not dialled while the validator stays
/// connected. Handed on as a plain failed dial, the seed was dialled again
/// after each backoff, a TLS handshake with the validator every round.
/// Ten rounds after the node connected (each asks the validator for the
/// peers it knows), the forwarder has carried exactly one connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seed_address_found_to_be_a_connected_peer_is_not_dialled_again_while_it_stays() {
    use soma_testkit::impair::{ImpairedLink, Impairment};

    let chain = chain();
    let validator = start(&chain, config(vec![]), 1);
    let link = ImpairedLink::listen(validator.local_addr(), Impairment::default())
        .await
        .expect("the forwarder listens");
    let by_address = SeedPeer {
        peer_id: None,
        address: link.local_addr().to_string(),
    };
    let node = start(&chain, config(vec![seed(&validator), by_address]), 9);
    let connected = async || {
        let peers = node.connected_peers().await.expect("the node runs");
        peers == vec![validator.peer_id()]
    };
    wait_for("the validator connected", connected).await;
    let first = known_peers_answered(&validator);
    wait_for("ten rounds of discovery", async || {
        known_peers_answered(&validator) >= first + 10
    })
    .await;
    let stats = link.stats();
    assert_eq!(stats.connections, 1, "{stats:?}");
    assert_eq!(
        node.connected_peers().await.expect("the node runs"),
        vec![validator.peer_id()]
    );
    shutdown_all(&[node, validator]).await;
}

/// A node dialling its own address (a seed list every node shares names
/// each one's own) is refused as itself, holds no connection to itself,
/// and still connects to the other address it is given. Before, it
/// connected to itself, counted itself a connected peer, and asked itself
/// for peers every round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_dialling_its_own_address_does_not_connect_to_itself() {
    soma_testkit::init_tracing();
    let chain = chain();
    let other = start(&chain, config(vec![]), 1);
    let node = start(&chain, config(vec![]), 2);
    let mut events = node.subscribe_peer_events();
    node.connect(None, node.local_addr().to_string()).unwrap();
    let failed = wait_for_event("the dial of itself to end", &mut events, |e| {
        matches!(
            e,
            PeerEvent::DialFailed { .. } | PeerEvent::Connected { .. }
        )
    })
    .await;
    let PeerEvent::DialFailed { reason, .. } = failed else {
        panic!("connected to itself: {failed:?}");
    };
    assert_eq!(reason, connections::DialError::Ourselves);
    node.connect(None, other.local_addr().to_string()).unwrap();
    wait_for_event("the other node connected", &mut events, |e| {
        matches!(e, PeerEvent::Connected { .. })
    })
    .await;
    assert_eq!(node.connected_peers().await.unwrap(), vec![other.peer_id()]);
    shutdown_all(&[node, other]).await;
}
