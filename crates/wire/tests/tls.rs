//! The mutual-TLS transport end to end: a health server over `incoming`,
//! clients over `connect`, on 127.0.0.1 with ephemeral ports.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use soma_types::{Access, KeyPair, PeerId};
use soma_wire::inbound::ConnectionLimit;
use soma_wire::tls::{self, AccessPolicy, Caller, Forgery, NodeIdentity, TlsError};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint, Server};
use tonic_health::pb::HealthCheckRequest;

use rustls::crypto::ring;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// Bounds every wait of a test that should succeed quickly.
const PATIENCE: Duration = Duration::from_secs(10);

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .try_init();
}

fn identity() -> NodeIdentity {
    NodeIdentity::generate(&KeyPair::generate()).unwrap()
}

/// A health server over TLS that records the caller of every request.
struct TestServer {
    address: String,
    callers: Arc<Mutex<Vec<Caller>>>,
    task: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl TestServer {
    async fn start(identity: &NodeIdentity, policy: AccessPolicy) -> Self {
        Self::start_with(tls::server_config(identity, &policy).unwrap()).await
    }

    async fn start_with(config: Arc<rustls::ServerConfig>) -> Self {
        Self::start_limited(config, ConnectionLimit::default()).await
    }

    async fn start_limited(config: Arc<rustls::ServerConfig>, limit: ConnectionLimit) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let callers = Arc::new(Mutex::new(Vec::new()));
        let recorded = callers.clone();
        let (_reporter, health) = tonic_health::server::health_reporter();
        let service = InterceptedService::new(health, move |request: tonic::Request<()>| {
            recorded.lock().unwrap().push(tls::caller(&request));
            Ok(request)
        });
        let task = tokio::spawn(
            Server::builder()
                .add_service(service)
                .serve_with_incoming(tls::incoming_with_limit(listener, config, limit)),
        );
        TestServer {
            address,
            callers,
            task,
        }
    }

    fn callers(&self) -> Vec<Caller> {
        self.callers.lock().unwrap().clone()
    }

    async fn connect(
        &self,
        identity: Option<&NodeIdentity>,
        expected: Option<PeerId>,
    ) -> Result<(Channel, PeerId), TlsError> {
        tls::connect(&self.address, identity, expected, PATIENCE).await
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `victim`'s certificate with `thief`'s TLS key: what someone who copied
/// a node's (public) certificate could present.
fn stolen(victim: &NodeIdentity, thief: &NodeIdentity) -> Arc<SingleCertAndKey> {
    let cert = CertificateDer::from_pem_slice(victim.cert_pem().as_bytes()).unwrap();
    let key = PrivateKeyDer::from_pem_slice(thief.key_pem().as_bytes()).unwrap();
    let key = ring::default_provider()
        .key_provider
        .load_private_key(key)
        .unwrap();
    Arc::new(CertifiedKey::new(vec![cert], key).into())
}

/// One health check over `channel`.
async fn check(channel: Channel) -> Result<(), tonic::Status> {
    let response = tokio::time::timeout(
        PATIENCE,
        HealthClient::new(channel).check(HealthCheckRequest {
            service: String::new(),
        }),
    )
    .await
    .expect("the call ends")?;
    assert_eq!(response.into_inner().status, ServingStatus::Serving as i32);
    Ok(())
}

/// The server refused the client: with TLS 1.3 the client learns it at
/// connect or, at the latest, on its first call.
async fn assert_refused(connected: Result<(Channel, PeerId), TlsError>) {
    if let Ok((channel, _)) = connected {
        assert!(
            check(channel).await.is_err(),
            "a refused client got an answer"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn dialling_with_the_right_peer_id_succeeds_and_both_sides_learn_ids() {
    init_tracing();
    let (client, server) = (identity(), identity());
    let running = TestServer::start(&server, AccessPolicy::default()).await;

    let (channel, peer) = running
        .connect(Some(&client), Some(server.peer_id()))
        .await
        .unwrap();

    assert_eq!(peer, server.peer_id());
    check(channel).await.unwrap();
    assert_eq!(running.callers(), vec![Caller::Peer(client.peer_id())]);
}

#[tokio::test(flavor = "multi_thread")]
async fn dialling_with_the_wrong_expected_peer_id_fails() {
    init_tracing();
    let (client, server) = (identity(), identity());
    let someone_else = PeerId::from(KeyPair::generate().public());
    let running = TestServer::start(&server, AccessPolicy::default()).await;

    let result = running.connect(Some(&client), Some(someone_else)).await;

    match result {
        Err(TlsError::UnexpectedPeer { expected, found }) => {
            assert_eq!(expected, someone_else);
            assert_eq!(found, server.peer_id());
        }
        other => panic!("expected UnexpectedPeer, got {other:?}"),
    }
    assert!(running.callers().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn seed_dialled_without_peer_id_reveals_it() {
    init_tracing();
    let (client, seed) = (identity(), identity());
    let running = TestServer::start(&seed, AccessPolicy::default()).await;

    let (channel, peer) = running.connect(Some(&client), None).await.unwrap();

    assert_eq!(peer, seed.peer_id());
    check(channel).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn certificate_with_a_forged_binding_is_refused() {
    init_tracing();
    let forgeries = || [Forgery::SignedByAnotherKey, Forgery::BindsOtherCertificate];

    // As a server: the client refuses it.
    for forgery in forgeries() {
        let forged = NodeIdentity::forged(&KeyPair::generate(), forgery).unwrap();
        let running = TestServer::start(&forged, AccessPolicy::default()).await;
        for expected in [None, Some(forged.peer_id())] {
            let result = running.connect(Some(&identity()), expected).await;
            assert!(
                matches!(result, Err(TlsError::InvalidBinding)),
                "{result:?}"
            );
        }
        assert!(running.callers().is_empty());
    }

    // As a client: the server refuses it, and keeps serving honest clients.
    let server = identity();
    let running = TestServer::start(&server, AccessPolicy::default()).await;
    for forgery in forgeries() {
        let forged = NodeIdentity::forged(&KeyPair::generate(), forgery).unwrap();
        assert_refused(running.connect(Some(&forged), Some(server.peer_id())).await).await;
    }
    assert!(running.callers().is_empty());
    let honest = identity();
    let (channel, _) = running.connect(Some(&honest), None).await.unwrap();
    check(channel).await.unwrap();
    assert_eq!(running.callers(), vec![Caller::Peer(honest.peer_id())]);
}

#[tokio::test(flavor = "multi_thread")]
async fn certificate_without_the_binding_is_refused() {
    init_tracing();
    let unbound = NodeIdentity::forged(&KeyPair::generate(), Forgery::NoBinding).unwrap();

    // A node's server must prove its id.
    let running = TestServer::start(&unbound, AccessPolicy::default()).await;
    let result = running.connect(Some(&identity()), None).await;
    assert!(
        matches!(result, Err(TlsError::MissingBinding)),
        "{result:?}"
    );

    // A client with a plain self-signed certificate (as grpcurl or grpcio
    // present) is an anonymous caller in public mode...
    let server = identity();
    let running = TestServer::start(&server, AccessPolicy::default()).await;
    let (channel, _) = running.connect(Some(&unbound), None).await.unwrap();
    check(channel).await.unwrap();
    assert_eq!(running.callers(), vec![Caller::Anonymous]);

    // ...and refused in private mode.
    let private = AccessPolicy {
        access: Access::Private,
        allowlist: [unbound.peer_id()].into_iter().collect(),
    };
    let running = TestServer::start(&server, private).await;
    assert_refused(running.connect(Some(&unbound), None).await).await;
    assert!(running.callers().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stolen_certificate_without_its_key_is_refused() {
    init_tracing();
    let (victim, thief) = (identity(), identity());

    // As a server: the handshake signature is not the certificate key's.
    let server_config = |certified: Arc<SingleCertAndKey>| {
        let mut config =
            rustls::ServerConfig::builder_with_provider(ring::default_provider().into())
                .with_protocol_versions(&[&rustls::version::TLS13])
                .unwrap()
                .with_no_client_auth()
                .with_cert_resolver(certified);
        config.alpn_protocols = vec![b"h2".to_vec()];
        Arc::new(config)
    };
    let running = TestServer::start_with(server_config(stolen(&victim, &thief))).await;
    let result = running.connect(None, Some(victim.peer_id())).await;
    assert!(matches!(result, Err(TlsError::Connect(_))), "{result:?}");
    // The same rig with the right key works.
    let running = TestServer::start_with(server_config(stolen(&victim, &victim))).await;
    let (channel, _) = running.connect(None, Some(victim.peer_id())).await.unwrap();
    check(channel).await.unwrap();

    // As a client: the server refuses it.
    let server = identity();
    let running = TestServer::start(&server, AccessPolicy::default()).await;
    let connect_presenting = |certified: Arc<SingleCertAndKey>| {
        let (config, _) = tls::client_config(None, Some(server.peer_id())).unwrap();
        let mut config = (*config).clone();
        config.client_auth_cert_resolver = certified;
        let endpoint = Endpoint::from_shared(format!("http://{}", running.address)).unwrap();
        let connector = tonic_tls::rustls::TlsConnector::new(
            tonic_tls::TcpTransport::from_endpoint(&endpoint),
            Arc::new(config),
            ServerName::try_from(tls::SERVER_NAME).unwrap(),
        );
        async move { endpoint.connect_with_connector(connector).await }
    };
    if let Ok(channel) = connect_presenting(stolen(&victim, &thief)).await {
        assert!(check(channel).await.is_err(), "a thief got an answer");
    }
    assert!(running.callers().is_empty());
    // The same rig with the right key works.
    let channel = connect_presenting(stolen(&victim, &victim)).await.unwrap();
    check(channel).await.unwrap();
    assert_eq!(running.callers(), vec![Caller::Peer(victim.peer_id())]);
}

#[tokio::test(flavor = "multi_thread")]
async fn anonymous_caller_is_allowed_in_public_mode() {
    init_tracing();
    let server = identity();
    let running = TestServer::start(&server, AccessPolicy::default()).await;

    let (channel, peer) = running.connect(None, Some(server.peer_id())).await.unwrap();

    assert_eq!(peer, server.peer_id());
    check(channel).await.unwrap();
    assert_eq!(running.callers(), vec![Caller::Anonymous]);
}

#[tokio::test(flavor = "multi_thread")]
async fn private_mode_refuses_callers_not_on_the_allowlist_at_the_handshake() {
    init_tracing();
    let (server, friend, stranger) = (identity(), identity(), identity());
    let policy = AccessPolicy {
        access: Access::Private,
        allowlist: HashSet::from([friend.peer_id()]),
    };
    let running = TestServer::start(&server, policy).await;

    assert_refused(
        running
            .connect(Some(&stranger), Some(server.peer_id()))
            .await,
    )
    .await;
    assert_refused(running.connect(None, Some(server.peer_id())).await).await;
    assert!(running.callers().is_empty());

    let (channel, _) = running
        .connect(Some(&friend), Some(server.peer_id()))
        .await
        .unwrap();
    check(channel).await.unwrap();
    assert_eq!(running.callers(), vec![Caller::Peer(friend.peer_id())]);
}

#[tokio::test(flavor = "multi_thread")]
async fn plain_tcp_client_is_refused() {
    init_tracing();
    let server = identity();
    let running = TestServer::start(&server, AccessPolicy::default()).await;

    let plain = Endpoint::from_shared(format!("http://{}", running.address))
        .unwrap()
        .connect_timeout(PATIENCE)
        .connect()
        .await;
    if let Ok(channel) = plain {
        assert!(check(channel).await.is_err(), "plaintext got an answer");
    }
    assert!(running.callers().is_empty());

    let (channel, _) = running.connect(Some(&identity()), None).await.unwrap();
    check(channel).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn pem_round_trip_keeps_the_identity() {
    init_tracing();
    let original = identity();

    let loaded = NodeIdentity::from_pem(&original.cert_pem(), &original.key_pem()).unwrap();

    assert_eq!(loaded.peer_id(), original.peer_id());
    let running = TestServer::start(&loaded, AccessPolicy::default()).await;
    let (channel, peer) = running
        .connect(Some(&loaded), Some(original.peer_id()))
        .await
        .unwrap();
    assert_eq!(peer, original.peer_id());
    check(channel).await.unwrap();
    assert_eq!(running.callers(), vec![Caller::Peer(original.peer_id())]);

    // Loading checks what a peer would check.
    let other = identity();
    let result = NodeIdentity::from_pem(&original.cert_pem(), &other.key_pem());
    assert!(matches!(result, Err(TlsError::KeyMismatch)), "{result:?}");
    let forged =
        NodeIdentity::forged(&KeyPair::generate(), Forgery::BindsOtherCertificate).unwrap();
    let result = NodeIdentity::from_pem(&forged.cert_pem(), &forged.key_pem());
    assert!(
        matches!(result, Err(TlsError::InvalidBinding)),
        "{result:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn connect_times_out_on_a_silent_listener() {
    init_tracing();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    // Accepts and holds every connection, never answering.
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    let timeout = Duration::from_millis(300);

    let started = Instant::now();
    let result = tokio::time::timeout(
        PATIENCE,
        tls::connect(&address, Some(&identity()), None, timeout),
    )
    .await
    .expect("connect is bounded by its timeout");

    assert!(matches!(result, Err(TlsError::Timeout)), "{result:?}");
    assert!(started.elapsed() >= timeout);
    silent.abort();
}

/// Polls `condition` until it holds, for at most [`PATIENCE`].
async fn wait_until(what: &str, condition: impl Fn() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_connection_past_the_limit_is_reset_before_any_handshake() {
    init_tracing();
    let server = identity();
    let limit = ConnectionLimit::new(2);
    let config = tls::server_config(&server, &AccessPolicy::default()).unwrap();
    let running = TestServer::start_limited(config, limit.clone()).await;

    // Two clients that never start their handshake hold both slots.
    let mut silent = Vec::new();
    for _ in 0..2 {
        silent.push(TcpStream::connect(&running.address).await.unwrap());
    }
    wait_until("both slots taken", || limit.open() == 2).await;

    // A third is reset without a byte from the server.
    let read = tokio::time::timeout(PATIENCE, async {
        // The reset may come before connect returns.
        let mut third = TcpStream::connect(&running.address).await?;
        third.read(&mut [0u8; 1]).await
    })
    .await
    .expect("the server ends the connection");
    assert!(
        matches!(&read, Ok(0)) || read.as_ref().is_err(),
        "the server sent something: {read:?}"
    );
    // Refused by the limit, not timed out: the refusal is counted.
    assert_eq!((limit.open(), limit.refused()), (2, 1));
    // So is a TLS client.
    assert!(running.connect(Some(&identity()), None).await.is_err());
    assert_eq!((limit.open(), limit.refused()), (2, 2));

    // The silent clients leave: their slots come back, and a TLS client
    // gets in and is served.
    drop(silent);
    wait_until("the slots to come back", || limit.open() == 0).await;
    let (channel, _) = running.connect(Some(&identity()), None).await.unwrap();
    check(channel.clone()).await.unwrap();
    assert_eq!((limit.open(), limit.refused()), (1, 2));
}
