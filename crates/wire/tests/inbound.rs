//! Inbound admission against a real TLS server on loopback: one host
//! flooding the server, stalled handshakes, idle connections, several
//! hosts of one network, and eviction when full. Every address of
//! 127.0.0.0/8 is loopback on Linux, so clients bind to distinct ones to
//! appear as distinct hosts and networks.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use soma_types::KeyPair;
use soma_wire::inbound::{Config, ConnectionLimit, Counts};
use soma_wire::tls::{self, AccessPolicy, NodeIdentity};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::client::TlsStream;
use tonic::transport::{Channel, Server};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

/// Bounds every wait of a test.
const PATIENCE: Duration = Duration::from_secs(20);

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .try_init();
}

fn identity() -> NodeIdentity {
    NodeIdentity::generate(&KeyPair::generate()).unwrap()
}

/// A health server over TLS on 127.0.0.1 admitting by `limit`.
struct TestServer {
    address: SocketAddr,
    task: JoinHandle<()>,
    /// Dropped or sent: the server shuts down.
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl TestServer {
    async fn start(limit: ConnectionLimit) -> Self {
        Self::start_pinging(limit, None).await
    }

    /// Like [`Self::start`], the server pinging every connection every
    /// `keepalive`, if given.
    async fn start_pinging(limit: ConnectionLimit, keepalive: Option<Duration>) -> Self {
        Self::start_with(limit, keepalive, Duration::MAX).await
    }

    /// Like [`Self::start_pinging`], each connection cut `stop_grace`
    /// after the server's stop if its own grace is longer.
    async fn start_with(
        limit: ConnectionLimit,
        keepalive: Option<Duration>,
        stop_grace: Duration,
    ) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let config = tls::server_config(&identity(), &AccessPolicy::default()).unwrap();
        let (_reporter, health) = tonic_health::server::health_reporter();
        let router = Server::builder()
            .http2_keepalive_interval(keepalive)
            .http2_keepalive_timeout(keepalive.map(|k| k * 10))
            .add_service(health);
        let incoming = tls::incoming_with_limit(listener, config, limit);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let stopped = async {
            let _ = stopped.await;
        };
        let task = tokio::spawn(soma_wire::serve::serve(
            router, incoming, stopped, stop_grace,
        ));
        TestServer {
            address,
            task,
            stop: Some(stop),
        }
    }

    /// An HTTP/2 connection from 127.0.0.1 that has made one call: its
    /// sender (kept, or the client would close the connection itself) and
    /// its driver, which ends with how the connection ended: `Ok` by a
    /// GOAWAY, an error if cut under the client.
    async fn after_one_call(
        &self,
    ) -> (
        h2::client::SendRequest<bytes::Bytes>,
        JoinHandle<Result<(), h2::Error>>,
    ) {
        let tls = self.tls("127.0.0.1", Some(&identity())).await;
        let (mut h2, connection) = h2::client::handshake(tls).await.unwrap();
        let connection = tokio::spawn(connection);
        raw_health_check(&mut h2).await;
        (h2, connection)
    }

    /// A TLS connection from 127.0.0.1 that sent the HTTP/2 preface and
    /// an empty SETTINGS frame, then nothing: it ignores all it is sent.
    async fn deaf(&self) -> TlsStream<TcpStream> {
        use tokio::io::AsyncWriteExt;
        let mut tls = self.tls("127.0.0.1", Some(&identity())).await;
        tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .unwrap();
        tls.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.unwrap();
        tls.flush().await.unwrap();
        tls
    }

    /// A TCP connection from `from` that never starts a handshake.
    async fn silent(&self, from: &str) -> TcpStream {
        self.try_silent(from).await.unwrap()
    }

    /// A TCP connection from `from`, if the server did not reset it
    /// before `connect` returned.
    async fn try_silent(&self, from: &str) -> std::io::Result<TcpStream> {
        let socket = TcpSocket::new_v4()?;
        socket.bind(SocketAddr::new(from.parse::<IpAddr>().unwrap(), 0))?;
        socket.connect(self.address).await
    }

    /// A TLS connection from `from` as `identity`, nothing sent on it.
    async fn tls(&self, from: &str, identity: Option<&NodeIdentity>) -> TlsStream<TcpStream> {
        let tcp = self.silent(from).await;
        let (config, _) = tls::client_config(identity, None).unwrap();
        let name = ServerName::try_from(tls::SERVER_NAME).unwrap();
        tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .unwrap()
    }

    /// A TLS connection from `from`, handshake done and the server's
    /// first HTTP/2 bytes read, that then sends nothing (not even the
    /// HTTP/2 preface).
    async fn idle(&self, from: &str, identity: Option<&NodeIdentity>) -> TlsStream<TcpStream> {
        let mut stream = self.tls(from, identity).await;
        let read = tokio::time::timeout(PATIENCE, stream.read(&mut [0u8; 64])).await;
        assert!(matches!(read, Ok(Ok(n)) if n > 0), "{read:?}");
        stream
    }

    /// Connects from 127.0.0.1 as `identity` and makes one call.
    async fn call(&self, identity: &NodeIdentity) -> Channel {
        let (channel, _) = tls::connect(&self.address.to_string(), Some(identity), None, PATIENCE)
            .await
            .unwrap();
        tokio::time::timeout(
            PATIENCE,
            HealthClient::new(channel.clone()).check(HealthCheckRequest {
                service: String::new(),
            }),
        )
        .await
        .expect("the call ends")
        .expect("the call is served");
        channel
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A limit of 8 connections, closing those idle for `idle_timeout` with
/// a GOAWAY, each cut if still open `grace` later.
fn closing_when_idle(idle_timeout: Duration, grace: Duration) -> ConnectionLimit {
    ConnectionLimit::with_config(Config {
        idle_timeout,
        idle_drain_grace: grace,
        ..config(8, 0, 8, 8)
    })
}

/// Polls `condition` until it holds, for at most [`PATIENCE`].
async fn wait_until(what: &str, condition: impl Fn() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Whether the server ended the connection within [`PATIENCE`]: reads
/// (discarding what the server sent before) reach the end or an error.
async fn ended<S: tokio::io::AsyncRead + Unpin>(stream: &mut S) -> bool {
    let mut buf = [0u8; 1024];
    tokio::time::timeout(PATIENCE, async {
        while matches!(stream.read(&mut buf).await, Ok(1..)) {}
    })
    .await
    .is_ok()
}

fn config(max: usize, reserved: usize, per_ip: usize, per_prefix: usize) -> Config {
    Config {
        max,
        reserved,
        max_per_ip: per_ip,
        max_per_prefix: per_prefix,
        exempt_loopback: false,
        handshake_timeout: Duration::from_millis(1_000),
        idle_timeout: Duration::from_millis(2_000),
        idle_drain_grace: Duration::from_millis(500),
        ..Config::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn one_host_flooding_gets_its_cap_stallers_and_idlers_are_cut_and_peers_still_call() {
    init_tracing();
    const MAX: usize = 32;
    let limit = ConnectionLimit::with_config(config(MAX, 4, 8, 16));
    let honest = identity();
    limit.reserve_for([honest.peer_id()]);
    let server = TestServer::start(limit.clone()).await;
    let attacker = "127.0.1.1";

    // Twice the bound from one host: four finish their handshake and go
    // silent, four never start one, and the rest are past the host's cap.
    let mut idle = Vec::new();
    for i in 0..4 {
        let who = (i % 2 == 0).then(identity);
        idle.push(server.idle(attacker, who.as_ref()).await);
    }
    let mut stalled = Vec::new();
    for _ in 0..4 {
        stalled.push(server.silent(attacker).await);
    }
    wait_until("eight admitted", || limit.counts().admitted == 8).await;
    let mut refused = Vec::new();
    for _ in 0..2 * MAX - 8 {
        // The reset may come before connect returns.
        if let Ok(stream) = server.try_silent(attacker).await {
            refused.push(stream);
        }
    }
    wait_until("the excess refused", || limit.counts().refused_per_ip == 56).await;
    assert_eq!(
        limit.counts(),
        Counts {
            admitted: 8,
            refused_per_ip: 56,
            ..Counts::default()
        }
    );
    assert_eq!(limit.open(), 8);
    for stream in &mut refused {
        assert!(ended(stream).await, "a refused connection stayed open");
    }

    // An honest peer connects and is served.
    drop(server.call(&honest).await);
    wait_until("the honest connection to close", || limit.open() == 8).await;

    // Stalled handshakes are cut at the handshake timeout; the honest
    // peer is still served.
    wait_until("stalled handshakes cut", || {
        limit.counts().handshake_timeouts == 4
    })
    .await;
    for stream in &mut stalled {
        assert!(ended(stream).await, "a stalled handshake stayed open");
    }
    drop(server.call(&honest).await);
    wait_until("the honest connection to close", || limit.open() == 4).await;

    // Silent connections are closed at the idle timeout.
    wait_until("idle connections closed", || {
        limit.counts().idle_closed == 4
    })
    .await;
    for stream in &mut idle {
        assert!(ended(stream).await, "an idle connection stayed open");
    }
    drop(server.call(&honest).await);
    wait_until("every connection closed", || limit.open() == 0).await;

    assert_eq!(
        limit.counts(),
        Counts {
            admitted: 11,
            refused_per_ip: 56,
            handshake_timeouts: 4,
            idle_closed: 4,
            ..Counts::default()
        }
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn hosts_of_one_network_share_the_prefix_cap() {
    init_tracing();
    let limit = ConnectionLimit::with_config(config(64, 0, 8, 12));
    let server = TestServer::start(limit.clone()).await;

    let mut held = Vec::new();
    // Two hosts of 127.0.2.0/24: the first gets its 8, the second the 4
    // left of the network's 12.
    for host in ["127.0.2.1", "127.0.2.2"] {
        for _ in 0..8 {
            held.push(server.try_silent(host).await);
        }
    }
    // A third host of the network gets nothing; a host of another does.
    held.push(server.try_silent("127.0.2.3").await);
    held.push(server.try_silent("127.0.3.1").await);
    wait_until("every connection judged", || {
        let c = limit.counts();
        c.admitted + c.refused() == 18
    })
    .await;
    assert_eq!(
        limit.counts(),
        Counts {
            admitted: 13,
            refused_per_prefix: 5,
            ..Counts::default()
        }
    );
    assert_eq!(limit.open(), 13);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_server_evicts_idle_anonymous_connections_and_keeps_reserved_ones() {
    init_tracing();
    // Three ordinary slots and one reserved; no idle timeout in reach.
    let limit = ConnectionLimit::with_config(Config {
        idle_timeout: PATIENCE * 10,
        ..config(4, 1, 8, 16)
    });
    let member = identity();
    limit.reserve_for([member.peer_id()]);
    let server = TestServer::start(limit.clone()).await;

    // The committee member connects first, and stays idle longest.
    let channel = server.call(&member).await;
    // Connected one after the other: each is idle since the server's
    // first bytes, which it has read. The server is then full.
    let mut anonymous = Vec::new();
    for host in ["127.0.4.1", "127.0.4.2", "127.0.4.3"] {
        anonymous.push(server.idle(host, None).await);
    }
    assert_eq!(limit.open(), 4);

    // Another anonymous caller evicts one anonymous connection; so does
    // a peer without reserved slots.
    let mut newcomers = vec![server.idle("127.0.4.4", None).await];
    wait_until("one eviction", || limit.counts().evicted == 1).await;
    newcomers.push(server.idle("127.0.4.5", Some(&identity())).await);
    wait_until("two evictions", || limit.counts().evicted == 2).await;
    // The idlest go: the first two, in order.
    for stream in &mut anonymous[..2] {
        assert!(
            ended(stream).await,
            "an idle anonymous connection stayed open"
        );
    }

    // The member's connection was never evicted: its calls go over it,
    // with no new connection admitted. The channel is held until the
    // counts are read: dropping its last handle closes the connection,
    // which frees the slot.
    let admitted = limit.counts().admitted;
    HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap();
    let counts = Counts {
        admitted,
        evicted: 2,
        ..Counts::default()
    };
    assert_eq!(limit.counts(), counts);
    assert_eq!((admitted, limit.open()), (6, 4));

    // Connections the clients close give their slots back and count as
    // nothing.
    drop((channel, anonymous, newcomers));
    wait_until("every connection closed", || limit.open() == 0).await;
    assert_eq!(limit.counts(), counts);
}

/// Only requests and answers keep a connection from its idle timeout: the
/// server's HTTP/2 pings and the client's acknowledgements, every 100 ms,
/// do not. A connection that calls more often than the timeout stays
/// open; once it stops calling, it is closed at the timeout although the
/// pings go on, and the client's next call connects again.
#[tokio::test(flavor = "multi_thread")]
async fn pings_do_not_keep_a_connection_that_asks_nothing_from_its_idle_timeout() {
    init_tracing();
    let limit = ConnectionLimit::with_config(Config {
        idle_timeout: Duration::from_millis(1_000),
        ..config(8, 0, 8, 8)
    });
    let server = TestServer::start_pinging(limit.clone(), Some(Duration::from_millis(100))).await;
    let honest = identity();
    let channel = server.call(&honest).await;
    let mut health = HealthClient::new(channel);
    let check = || HealthCheckRequest {
        service: String::new(),
    };
    // Calls 250 ms apart, over three times the idle timeout.
    for _ in 0..12 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        health.check(check()).await.expect("served");
    }
    assert_eq!(limit.counts().idle_closed, 0);
    assert_eq!(limit.counts().admitted, 1);

    // Silent but for the pings: closed at the timeout.
    wait_until("the quiet connection closed", || {
        limit.counts().idle_closed == 1
    })
    .await;
    wait_until("its slot freed", || limit.open() == 0).await;
    // The client may send its next call before it saw the close: that one
    // fails, and the next connects again.
    let mut served = false;
    for _ in 0..3 {
        if health.check(check()).await.is_ok() {
            served = true;
            break;
        }
    }
    assert!(served, "not served again");
    assert_eq!(limit.counts().admitted, 2);
}

/// Calls the health service over a raw HTTP/2 connection `h2`, reading
/// the answer whole.
async fn raw_health_check(h2: &mut h2::client::SendRequest<bytes::Bytes>) {
    let call = tonic::codegen::http::Request::builder()
        .method("POST")
        .uri("http://soma/grpc.health.v1.Health/Check")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    // An empty HealthCheckRequest: a frame of no bytes.
    let (answer, mut send) = h2.send_request(call, false).unwrap();
    send.send_data(bytes::Bytes::from_static(&[0, 0, 0, 0, 0]), true)
        .unwrap();
    let answer = tokio::time::timeout(PATIENCE, answer)
        .await
        .unwrap()
        .unwrap();
    let mut body = answer.into_body();
    while let Some(data) = body.data().await {
        let data = data.unwrap();
        let _ = body.flow_control().release_capacity(data.len());
    }
    let trailers = body.trailers().await.unwrap().expect("trailers");
    assert_eq!(trailers.get("grpc-status").unwrap(), "0");
}

/// With `config`, a connection that made one call over HTTP/2 and then
/// went quiet ends cleanly (a GOAWAY), not cut under its client (an
/// error, as a call that crossed the cut would be); then its slot is
/// freed. Returns the limit, to read its counts.
async fn a_quiet_connection_is_closed_with_a_goaway(config: Config) -> ConnectionLimit {
    let limit = ConnectionLimit::with_config(config);
    let server = TestServer::start(limit.clone()).await;
    let (_h2, connection) = server.after_one_call().await;
    let ended = tokio::time::timeout(PATIENCE, connection).await;
    let ended = ended.expect("closed within the patience").unwrap();
    assert!(ended.is_ok(), "the connection was cut: {ended:?}");
    wait_until("its slot freed", || limit.open() == 0).await;
    limit
}

/// An idle connection that set up HTTP/2 is closed with a GOAWAY, not
/// cut under the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_is_closed_with_a_goaway_not_cut() {
    init_tracing();
    let limit = a_quiet_connection_is_closed_with_a_goaway(Config {
        idle_timeout: Duration::from_millis(500),
        // Long: a cut before the graceful close could end would show.
        idle_drain_grace: Duration::from_secs(5),
        ..config(8, 0, 8, 8)
    })
    .await;
    assert_eq!(limit.counts().idle_closed, 1);
}

/// A connection past its age is closed with a GOAWAY too (tonic's own
/// age, with a grace set, cut it), while it is not idle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_connection_is_closed_with_a_goaway_not_cut() {
    init_tracing();
    let limit = a_quiet_connection_is_closed_with_a_goaway(Config {
        idle_timeout: PATIENCE,
        max_age: Duration::from_millis(500),
        max_age_grace: Duration::from_secs(5),
        ..config(8, 0, 8, 8)
    })
    .await;
    assert_eq!(limit.counts().idle_closed, 0);
}

/// Reads `stream` until a GOAWAY frame arrives (true) or it ends
/// (false), skipping the other frames.
async fn reads_a_goaway<S: tokio::io::AsyncRead + Unpin>(stream: &mut S) -> bool {
    reads_a_frame(stream, &mut Vec::new(), 0x7).await
}

/// Reads `stream` until a frame of type `kind` arrives (true) or it ends
/// (false), skipping the other frames; `bytes` holds what was read past
/// the last whole frame, for the next call.
async fn reads_a_frame<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut S,
    bytes: &mut Vec<u8>,
    kind: u8,
) -> bool {
    while let Some(frame) = next_frame(stream, bytes).await {
        if frame.kind == kind {
            return true;
        }
    }
    false
}

/// An HTTP/2 frame as read off the wire.
#[derive(Debug)]
struct Frame {
    kind: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
}

/// The next whole frame of `stream`, `None` once it ends; `bytes` holds
/// what was read past the last whole frame, for the next call.
async fn next_frame<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut S,
    bytes: &mut Vec<u8>,
) -> Option<Frame> {
    let mut buf = [0u8; 4096];
    loop {
        // A 9-byte header: 24-bit length, type, flags, stream id.
        if bytes.len() >= 9 {
            let len =
                usize::from(bytes[0]) << 16 | usize::from(bytes[1]) << 8 | usize::from(bytes[2]);
            if bytes.len() >= 9 + len {
                let id = u32::from_be_bytes([bytes[5], bytes[6], bytes[7], bytes[8]]);
                let frame = Frame {
                    kind: bytes[3],
                    flags: bytes[4],
                    stream: id & 0x7fff_ffff,
                    payload: bytes[9..9 + len].to_vec(),
                };
                bytes.drain(..9 + len);
                return Some(frame);
            }
        }
        match tokio::time::timeout(PATIENCE, stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => bytes.extend_from_slice(&buf[..n]),
            _ => return None,
        }
    }
}

/// An HTTP/2 frame header for a payload of `len` bytes.
fn frame_header(len: usize, kind: u8, flags: u8, stream: u32) -> Vec<u8> {
    let len = u32::try_from(len).unwrap().to_be_bytes();
    let mut header = vec![len[1], len[2], len[3], kind, flags];
    header.extend_from_slice(&stream.to_be_bytes());
    header
}

/// The frames of a health check on stream `stream`: HEADERS (HPACK,
/// plain literals and static-table names) and one DATA frame holding an
/// empty `HealthCheckRequest`, which ends the stream.
fn health_check_frames(stream: u32) -> Vec<u8> {
    fn literal(block: &mut Vec<u8>, value: &[u8]) {
        block.push(u8::try_from(value.len()).unwrap());
        block.extend_from_slice(value);
    }
    // :method POST (static 3), :scheme http (static 6).
    let mut block = vec![0x83, 0x86];
    // :path and :authority, names from the static table (4 and 1),
    // without indexing.
    block.push(0x04);
    literal(&mut block, b"/grpc.health.v1.Health/Check");
    block.push(0x01);
    literal(&mut block, b"soma");
    // content-type (static 31: 15 in the prefix, then 16).
    block.extend_from_slice(&[0x0f, 0x10]);
    literal(&mut block, b"application/grpc");
    // te, a new name.
    block.push(0x00);
    literal(&mut block, b"te");
    literal(&mut block, b"trailers");
    // HEADERS, END_HEADERS; then DATA, END_STREAM.
    let mut frames = frame_header(block.len(), 0x1, 0x4, stream);
    frames.extend_from_slice(&block);
    frames.extend_from_slice(&frame_header(5, 0x0, 0x1, stream));
    frames.extend_from_slice(&[0, 0, 0, 0, 0]);
    frames
}

/// A call sent as the idle close's GOAWAY arrives (after the client read
/// it, before the server's drain has ended) is answered in full: the
/// close waits for the calls that crossed it, where a cut fails them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_sent_as_the_idle_goaway_arrives_is_answered() {
    use tokio::io::AsyncWriteExt;
    init_tracing();
    let limit = closing_when_idle(Duration::from_millis(500), Duration::from_secs(5));
    let server = TestServer::start(limit.clone()).await;
    let mut tls = server.deaf().await;
    // The server's SETTINGS acknowledged; then nothing until the GOAWAY.
    tls.write_all(&frame_header(0, 0x4, 0x1, 0)).await.unwrap();
    tls.flush().await.unwrap();
    let mut read = Vec::new();
    assert!(reads_a_frame(&mut tls, &mut read, 0x7).await, "no GOAWAY");
    assert_eq!(limit.counts().idle_closed, 1);
    tls.write_all(&health_check_frames(1)).await.unwrap();
    tls.flush().await.unwrap();
    // Its answer: headers, the SERVING status, then trailers that end the
    // stream; nothing reset.
    let mut answer = Vec::new();
    while let Some(frame) = next_frame(&mut tls, &mut read).await {
        assert_ne!(frame.kind, 0x3, "the call was reset: {frame:?}");
        if frame.stream != 1 {
            continue;
        }
        let last = frame.flags & 0x1 != 0;
        answer.push((frame.kind, frame.payload));
        if last {
            break;
        }
    }
    let kinds: Vec<u8> = answer.iter().map(|(kind, _)| *kind).collect();
    assert_eq!(kinds, [0x1, 0x0, 0x1], "{answer:?}");
    // HealthCheckResponse { status: SERVING }, length-prefixed.
    assert_eq!(answer[1].1, [0, 0, 0, 0, 2, 0x08, 0x01]);
}

/// A client that set up HTTP/2 and then ignores the GOAWAY of the idle
/// close (it never reads, never answers the server's ping, never closes)
/// is cut once the drain grace is over: it holds its slot no longer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_client_that_ignores_the_goaway_is_cut_after_the_grace() {
    init_tracing();
    let limit = closing_when_idle(Duration::from_millis(500), Duration::from_secs(2));
    let server = TestServer::start(limit.clone()).await;
    let mut tls = server.deaf().await;
    // Told to go away, which it ignores (the server's ping unanswered)...
    assert!(reads_a_goaway(&mut tls).await, "no GOAWAY");
    assert_eq!(limit.counts().idle_closed, 1);
    // ...and cut once the grace is over.
    assert!(ended(&mut tls).await, "not cut");
    wait_until("its slot freed", || limit.open() == 0).await;
    assert_eq!(limit.counts().cut_after_grace, 1);
}

/// Each connection is served by a server of its own: once the connection
/// closes, its server ends too, so a node that accepts connections for
/// weeks keeps no task per connection it ever served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_connection_leaves_no_task_behind() {
    init_tracing();
    let limit = ConnectionLimit::with_config(config(8, 0, 8, 8));
    let server = TestServer::start(limit.clone()).await;
    let tasks = || {
        tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks()
    };
    let before = tasks();
    for _ in 0..4 {
        let channel = server.call(&identity()).await;
        drop(channel);
    }
    wait_until("every connection closed", || limit.open() == 0).await;
    wait_until("their tasks ended", || tasks() == before).await;
}

/// At its shutdown the server stops accepting at once, closes every
/// connection with a GOAWAY, cuts one that ignores it `idle_drain_grace`
/// later, and ends once all are closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_closes_connections_with_a_goaway_and_cuts_those_that_ignore_it() {
    init_tracing();
    let limit = closing_when_idle(PATIENCE, Duration::from_secs(1));
    let mut server = TestServer::start(limit.clone()).await;
    // An HTTP/2 client, after one call, and one that ignores everything.
    let (_h2, connection) = server.after_one_call().await;
    let mut deaf = server.deaf().await;
    // The server's SETTINGS: its HTTP/2 connection is being served.
    let mut read = Vec::new();
    assert!(
        reads_a_frame(&mut deaf, &mut read, 0x4).await,
        "no SETTINGS"
    );
    assert_eq!(limit.open(), 2);

    let _ = server.stop.take().expect("running").send(());
    let closed = tokio::time::timeout(PATIENCE, connection).await;
    let closed = closed.expect("closed within the patience").unwrap();
    // The client may end with a broken pipe or a reset: its own close can
    // cross the server's (the server closes a socket with the client's
    // last frames unread, and its kernel answers with a reset). Whether
    // the server cut it is the count below.
    if let Err(e) = &closed {
        let kind = e.get_io().map(std::io::Error::kind);
        assert!(
            matches!(
                kind,
                Some(std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset)
            ),
            "the connection ended in error: {closed:?}"
        );
    }
    // New callers are refused from the start of the drain.
    assert!(
        server.try_silent("127.0.0.1").await.is_err(),
        "still listening"
    );
    assert!(reads_a_frame(&mut deaf, &mut read, 0x7).await, "no GOAWAY");
    cut_and_the_server_ends(&mut deaf, &mut server).await;
    // Only the deaf client was cut; the other closed when told to.
    let counts = limit.counts();
    assert_eq!(
        (limit.open(), counts.idle_closed, counts.cut_after_grace),
        (0, 0, 1)
    );
}

/// Waits for `deaf` to be cut and then for `server`, stopped, to end.
async fn cut_and_the_server_ends<S: tokio::io::AsyncRead + Unpin>(
    deaf: &mut S,
    server: &mut TestServer,
) {
    assert!(ended(deaf).await, "not cut");
    tokio::time::timeout(PATIENCE, &mut server.task)
        .await
        .expect("the server ended")
        .unwrap();
}

/// A connection found idle closes with the idle drain's grace (an hour
/// here) and ignores the GOAWAY; the server's stop, whose grace is far
/// shorter, cuts it then, and the server ends: before, a connection
/// closing already kept its own grace past the stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_cuts_a_connection_closing_already_at_its_own_shorter_grace() {
    init_tracing();
    let limit = closing_when_idle(Duration::from_millis(300), Duration::from_secs(3_600));
    let mut server = TestServer::start_with(limit.clone(), None, Duration::from_millis(200)).await;
    let mut deaf = server.deaf().await;
    assert!(reads_a_goaway(&mut deaf).await, "no GOAWAY");
    assert_eq!(limit.counts().idle_closed, 1);
    assert_eq!(limit.open(), 1);
    let _ = server.stop.take().expect("running").send(());
    cut_and_the_server_ends(&mut deaf, &mut server).await;
    let counts = limit.counts();
    assert_eq!((limit.open(), counts.cut_after_grace), (0, 1));
}
