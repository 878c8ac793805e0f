//! Attacks on a serving node, run from this process against a node that
//! may live in another: clients that never read their answers, one host
//! flooding the inbound connections, an anonymous client hammering the
//! cheap calls, a thousand fresh identities sending infos stamped ahead,
//! and a peer answering every GetKnownPeers with fakes.
//!
//! Each attack binds its sockets to a source address of its own, so a node
//! that does not exempt loopback sees it as a distinct host: every address
//! of 127.0.0.0/8 is loopback on Linux, and 127.0.0.1 stays the honest
//! peers'. An attack runs until it is stopped (or, for the identity flood,
//! until every identity has called), counting what it sent and what the
//! node did with it.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::StreamExt;
use soma_actors::discovery::SeedPeer;
use soma_types::{Access, BlockRef, KeyPair, NodeInfo, PeerId, SignedNodeInfo, codec};
use soma_wire::proto::{self, p2p_client::P2pClient, p2p_server::P2p, p2p_server::P2pServer};
use soma_wire::tls::{self, AccessPolicy, NodeIdentity};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::rustls::pki_types::ServerName;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Code, Request, Response, Status};

/// Pause after a refusal or a closed connection before an attacker tries
/// again: it keeps retrying, without spinning on the node's refusals.
const RETRY_PAUSE: Duration = Duration::from_millis(50);

/// Connections a client that must connect tries before it gives up.
const CONNECT_TRIES: usize = 100;

/// Time allowed to connect and finish a handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The node attacked.
#[derive(Clone, Copy, Debug)]
pub struct Target {
    /// Its listening address.
    pub address: SocketAddr,
    /// Its identity, if known (the TLS handshake checks it).
    pub peer_id: Option<PeerId>,
}

/// The loopback address of attacking host `host`: 127.`10 + host`.0.1, in
/// a /24 of its own, apart from 127.0.0.1.
pub fn host(host: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 10u8.saturating_add(host), 0, 1))
}

/// What an attack did, and what the node did with it.
#[derive(Debug, Default)]
pub struct Counts {
    /// Calls or connections sent.
    pub sent: AtomicU64,
    /// Calls answered in full, connections the handshake completed.
    pub answered: AtomicU64,
    /// Calls refused with RESOURCE_EXHAUSTED, connections reset or
    /// closed by the node before the handshake could finish.
    pub refused: AtomicU64,
    /// Calls or connections the node cut or closed after admitting them.
    pub cut: AtomicU64,
}

/// A plain copy of [`Counts`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    /// See [`Counts::sent`].
    pub sent: u64,
    /// See [`Counts::answered`].
    pub answered: u64,
    /// See [`Counts::refused`].
    pub refused: u64,
    /// See [`Counts::cut`].
    pub cut: u64,
}

impl Counts {
    fn add(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// The counts so far.
    pub fn tally(&self) -> Tally {
        Tally {
            sent: self.sent.load(Ordering::Relaxed),
            answered: self.answered.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
            cut: self.cut.load(Ordering::Relaxed),
        }
    }
}

/// A running attack: its tasks, aborted when it is stopped or dropped.
pub struct Attack {
    tasks: Vec<JoinHandle<()>>,
    counts: Arc<Counts>,
}

impl Attack {
    fn new(counts: Arc<Counts>) -> Self {
        Attack {
            tasks: Vec::new(),
            counts,
        }
    }

    /// What the attack did so far.
    pub fn tally(&self) -> Tally {
        self.counts.tally()
    }

    /// Stops the attack, closing its connections; returns what it did.
    pub fn stop(self) -> Tally {
        self.tally()
    }

    /// Waits until every task of the attack has ended by itself.
    pub async fn finished(mut self) -> Tally {
        for task in std::mem::take(&mut self.tasks) {
            let _ = task.await;
        }
        self.tally()
    }
}

impl Drop for Attack {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// A TCP connection to `target` from `source`.
async fn tcp(source: IpAddr, target: SocketAddr) -> std::io::Result<TcpStream> {
    connected(socket(source)?, target).await
}

/// A TCP socket bound to `source`.
fn socket(source: IpAddr) -> std::io::Result<TcpSocket> {
    let socket = match source {
        IpAddr::V4(_) => TcpSocket::new_v4()?,
        IpAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.bind(SocketAddr::new(source, 0))?;
    Ok(socket)
}

/// `socket` connected to `target` within the connect timeout.
async fn connected(socket: TcpSocket, target: SocketAddr) -> std::io::Result<TcpStream> {
    tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(target))
        .await
        .map_err(|_| std::io::ErrorKind::TimedOut)?
}

/// TCP from a fixed source address, for tonic's TLS connector.
#[derive(Clone)]
struct FromSource {
    source: IpAddr,
    target: SocketAddr,
}

impl tonic_tls::Transport for FromSource {
    type Io = TcpStream;
    type Error = std::io::Error;

    async fn connect(&self, _: &Uri) -> Result<TcpStream, std::io::Error> {
        let stream = tcp(self.source, self.target).await?;
        stream.set_nodelay(true)?;
        Ok(stream)
    }
}

/// A gRPC client of `target` on a connection of its own from `source`, as
/// `identity` (anonymous if `None`). Each HTTP/2 stream opens with a window
/// of `window` bytes: 0 for a client that never reads.
pub async fn client(
    target: Target,
    source: IpAddr,
    identity: Option<&NodeIdentity>,
    window: Option<u32>,
) -> Result<P2pClient<Channel>, tonic::transport::Error> {
    let mut endpoint = endpoint(target);
    if let Some(window) = window {
        endpoint = endpoint.initial_stream_window_size(window);
    }
    let transport = FromSource {
        source,
        target: target.address,
    };
    connect(target, identity, endpoint, transport).await
}

/// A gRPC client like [`client`] that declares windows of 1 GiB, as if it
/// read everything, and stops reading its socket for good once `read`
/// bytes came (the handshake and the server's settings need a few KiB).
/// Its socket's receive buffer is kept small, so that what the server
/// sends it waits in the server's own buffers.
pub async fn client_that_stops_reading(
    target: Target,
    source: IpAddr,
    identity: Option<&NodeIdentity>,
    read: usize,
) -> Result<P2pClient<Channel>, tonic::transport::Error> {
    let endpoint = endpoint(target)
        .initial_stream_window_size(1 << 30)
        .initial_connection_window_size(1 << 30);
    let transport = StopsReading {
        source,
        target: target.address,
        read,
    };
    connect(target, identity, endpoint, transport).await
}

/// The blocks a FetchBlocks call for `refs` on `client` streamed back,
/// counted, or the status it ended with.
pub async fn blocks_fetched(
    mut client: P2pClient<Channel>,
    refs: Vec<BlockRef>,
) -> Result<usize, Status> {
    let request = proto::FetchBlocksRequest {
        refs: refs.into_iter().map(Into::into).collect(),
        ..Default::default()
    };
    let mut stream = client.fetch_blocks(request).await?.into_inner();
    let mut n = 0;
    while let Some(chunk) = stream.message().await? {
        n += chunk.blocks.len();
    }
    Ok(n)
}

fn endpoint(target: Target) -> Endpoint {
    Endpoint::from_shared(format!("http://{}", target.address))
        .expect("a socket address is a valid URI")
        .connect_timeout(CONNECT_TIMEOUT)
}

/// Connects `endpoint` over `transport`, with TLS as `identity`.
async fn connect<T>(
    target: Target,
    identity: Option<&NodeIdentity>,
    endpoint: Endpoint,
    transport: T,
) -> Result<P2pClient<Channel>, tonic::transport::Error>
where
    T: tonic_tls::Transport + Clone + Send + Sync + 'static,
    T::Io: Unpin + Send + 'static,
    T::Error: std::error::Error + Send + Sync + 'static,
{
    let (config, _) =
        tls::client_config(identity, target.peer_id).expect("a generated identity is valid");
    let connector = tonic_tls::rustls::TlsConnector::new(
        transport,
        config,
        ServerName::try_from(tls::SERVER_NAME).expect("a valid name"),
    );
    let channel = endpoint.connect_with_connector(connector).await?;
    Ok(P2pClient::new(channel).max_decoding_message_size(usize::MAX))
}

/// TCP from a fixed source address with a small receive buffer, whose
/// reads stop for good once `read` bytes came.
#[derive(Clone)]
struct StopsReading {
    source: IpAddr,
    target: SocketAddr,
    read: usize,
}

/// Smallest receive buffer Linux allows: the client's kernel holds next
/// to nothing of what it is sent.
const SMALL_RECEIVE_BUFFER: u32 = 4 << 10;

impl tonic_tls::Transport for StopsReading {
    type Io = ReadsStop;
    type Error = std::io::Error;

    async fn connect(&self, _: &Uri) -> Result<ReadsStop, std::io::Error> {
        let socket = socket(self.source)?;
        // Before the connection, so that the window it offers is small.
        socket.set_recv_buffer_size(SMALL_RECEIVE_BUFFER)?;
        let stream = connected(socket, self.target).await?;
        stream.set_nodelay(true)?;
        Ok(ReadsStop {
            stream,
            left: self.read,
        })
    }
}

/// A TCP stream whose reads stop for good once `left` more bytes came.
pub struct ReadsStop {
    stream: TcpStream,
    left: usize,
}

impl tokio::io::AsyncRead for ReadsStop {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.left == 0 {
            // Never woken: the client reads no more.
            return std::task::Poll::Pending;
        }
        let room = buf.remaining().min(self.left);
        let mut part = tokio::io::ReadBuf::new(&mut buf.initialize_unfilled()[..room]);
        let polled = std::pin::Pin::new(&mut self.stream).poll_read(cx, &mut part);
        let n = part.filled().len();
        buf.advance(n);
        self.left -= n;
        polled
    }
}

impl tokio::io::AsyncWrite for ReadsStop {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.stream).poll_write(cx, data)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Counts the outcome of a call: refused, cut after admission, or
/// answered.
fn judge<T>(counts: &Counts, result: &Result<T, Status>) {
    match result {
        Ok(_) => Counts::add(&counts.answered),
        Err(s) if s.code() == Code::ResourceExhausted => Counts::add(&counts.refused),
        Err(_) => Counts::add(&counts.cut),
    }
}

/// The key of fresh identity `i` of attack `attack`, distinct for every
/// pair.
pub fn fresh_key(attack: u8, i: usize) -> KeyPair {
    let mut seed = [0xE0 | attack; 32];
    seed[..4].copy_from_slice(&(i as u32).to_le_bytes());
    KeyPair::from_seed(seed)
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The info of `key`, public, at `address`, stamped `timestamp_ms`.
pub fn signed_info(key: &KeyPair, address: &str, timestamp_ms: u64) -> SignedNodeInfo {
    SignedNodeInfo::sign(
        NodeInfo {
            peer_id: PeerId::from(key.public()),
            addresses: vec![address.to_string()],
            timestamp_ms,
            access: Access::Public,
        },
        key,
    )
}

/// What never-reading clients ask for.
#[derive(Clone, Debug)]
pub struct Unread {
    /// Blocks of each FetchBlocks.
    pub blocks: Vec<proto::BlockRef>,
    /// Commits of each FetchCommits.
    pub commits: proto::FetchCommitsRequest,
    /// FetchBlocks each client keeps open at once.
    pub fetch_blocks: usize,
    /// FetchCommits each client keeps open at once. A connection's budget
    /// of unsent answers (`max-buffered-bytes-per-connection`) may hold
    /// back a second answer on one connection until the first is sent.
    pub fetch_commits: usize,
    /// How long a client holds a call whose end it has not seen before it
    /// drops it and asks again (a cut is not always seen while the window
    /// is zero): longer than the node's send deadline, so that the slots
    /// are freed by the node's deadline, not by the attacker.
    pub hold: Duration,
}

/// `identities` clients that never read, each from host
/// [`host`]`(first_host + i)` on a connection of its own with a zero
/// window, each keeping `what.fetch_blocks` FetchBlocks and
/// `what.fetch_commits` FetchCommits open: every call the node cuts or refuses, or that was
/// held for `what.hold`, is sent again. Every client connects before any
/// of them calls.
pub async fn never_reading(
    target: Target,
    identities: usize,
    first_host: u8,
    what: Unread,
) -> Attack {
    let counts = Arc::new(Counts::default());
    let mut attack = Attack::new(counts.clone());
    let what = Arc::new(what);
    // Every client connects before any of them calls; a handshake the
    // node times out is tried again.
    let readers = futures::future::join_all((0..identities).map(|i| {
        let counts = counts.clone();
        async move {
            let identity = NodeIdentity::generate(&fresh_key(1, i)).expect("an identity");
            let source = host(first_host.saturating_add(i as u8));
            for _ in 0..CONNECT_TRIES {
                match client(target, source, Some(&identity), Some(0)).await {
                    Ok(reader) => return Some(reader),
                    Err(_) => {
                        Counts::add(&counts.refused);
                        tokio::time::sleep(RETRY_PAUSE).await;
                    }
                }
            }
            None
        }
    }))
    .await;
    for reader in readers.into_iter().flatten() {
        for _ in 0..what.fetch_blocks {
            let (mut blocks, counts_b, what_b) = (reader.clone(), counts.clone(), what.clone());
            attack.tasks.push(tokio::spawn(async move {
                loop {
                    Counts::add(&counts_b.sent);
                    let request = proto::FetchBlocksRequest {
                        refs: what_b.blocks.clone(),
                        ..Default::default()
                    };
                    // The headers come at once; a body never can. The
                    // stream ends only when the node cuts it.
                    let call = async {
                        let mut stream = blocks.fetch_blocks(request).await?.into_inner();
                        while stream.message().await?.is_some() {}
                        Ok(())
                    };
                    let Ok(result) = tokio::time::timeout(what_b.hold, call).await else {
                        continue;
                    };
                    judge(&counts_b, &result);
                    if result.is_err() {
                        tokio::time::sleep(RETRY_PAUSE).await;
                    }
                }
            }));
        }
        for _ in 0..what.fetch_commits {
            let (mut commits, counts_c, what_c) = (reader.clone(), counts.clone(), what.clone());
            attack.tasks.push(tokio::spawn(async move {
                loop {
                    Counts::add(&counts_c.sent);
                    let call = commits.fetch_commits(what_c.commits);
                    let Ok(result) = tokio::time::timeout(what_c.hold, call).await else {
                        continue;
                    };
                    judge(&counts_c, &result);
                    if result.is_err() {
                        tokio::time::sleep(RETRY_PAUSE).await;
                    }
                }
            }));
        }
    }
    attack
}

/// One host, [`host`]`(source_host)`, holding `connections` inbound
/// connections of `target`: half finish the TLS handshake (anonymous) and
/// then stay idle, half never send a byte. Each one the node closes or
/// refuses is opened again. Counted: a handshake finished in
/// [`Counts::answered`], one refused in [`Counts::refused`], and the end
/// of every connection that got a socket in [`Counts::cut`] (for the
/// silent half, a reset at accept included: it cannot tell the two
/// apart).
pub fn connection_flood(target: Target, source_host: u8, connections: usize) -> Attack {
    let counts = Arc::new(Counts::default());
    let mut attack = Attack::new(counts.clone());
    let source = host(source_host);
    let (config, _) = tls::client_config(None, target.peer_id).expect("an anonymous config");
    let connector = tokio_rustls::TlsConnector::from(config);
    for i in 0..connections {
        let (counts, connector) = (counts.clone(), connector.clone());
        attack.tasks.push(tokio::spawn(async move {
            loop {
                Counts::add(&counts.sent);
                let Ok(mut stream) = tcp(source, target.address).await else {
                    Counts::add(&counts.refused);
                    tokio::time::sleep(RETRY_PAUSE).await;
                    continue;
                };
                let mut byte = [0u8; 1];
                if i % 2 == 0 {
                    let name = ServerName::try_from(tls::SERVER_NAME).expect("a valid name");
                    match tokio::time::timeout(CONNECT_TIMEOUT, connector.connect(name, stream))
                        .await
                    {
                        Ok(Ok(mut tls)) => {
                            // The handshake's last flight may still be
                            // buffered: send it, so the node sees it done.
                            let _ = tls.flush().await;
                            Counts::add(&counts.answered);
                            // Idle: nothing is sent, and what the node sends
                            // (its HTTP/2 settings) is read until it closes
                            // the connection.
                            while tls.read(&mut byte).await.is_ok_and(|n| n > 0) {}
                            Counts::add(&counts.cut);
                        }
                        _ => Counts::add(&counts.refused),
                    }
                } else {
                    // Never starts the handshake; a read ends when the node
                    // resets (refused) or times the handshake out (cut).
                    let _ = stream.read(&mut byte).await;
                    Counts::add(&counts.cut);
                }
                tokio::time::sleep(RETRY_PAUSE).await;
            }
        }));
    }
    attack
}

/// One anonymous client, from [`host`]`(source_host)` on one connection,
/// calling GetKnownPeers and GetCommitInfo in turn, as fast as the node
/// answers. Refusals count in [`Counts::refused`].
pub async fn hammer(target: Target, source_host: u8) -> Attack {
    let counts = Arc::new(Counts::default());
    let mut attack = Attack::new(counts.clone());
    let Ok(mut hammer) = client(target, host(source_host), None, None).await else {
        Counts::add(&counts.refused);
        return attack;
    };
    attack.tasks.push(tokio::spawn(async move {
        loop {
            Counts::add(&counts.sent);
            let known = hammer
                .get_known_peers(proto::GetKnownPeersRequest::default())
                .await;
            judge(&counts, &known);
            Counts::add(&counts.sent);
            let info = hammer
                .get_commit_info(proto::GetCommitInfoRequest { index: None })
                .await;
            judge(&counts, &info);
            if known.is_err() && info.is_err() {
                // Refused both: a real attacker would wait too.
                tokio::task::yield_now().await;
            }
        }
    }));
    attack
}

/// `identities` fresh identities, all from [`host`]`(source_host)`, each
/// calling GetKnownPeers once on a connection of its own with its own info
/// at `advertised`, stamped `ahead_ms` in the future; `concurrency` calls
/// at once. Ends when every identity has called.
pub fn sybil_infos(
    target: Target,
    source_host: u8,
    identities: usize,
    advertised: String,
    ahead_ms: u64,
    concurrency: usize,
) -> Attack {
    let counts = Arc::new(Counts::default());
    let mut attack = Attack::new(counts.clone());
    let source = host(source_host);
    attack.tasks.push(tokio::spawn(async move {
        futures::stream::iter(0..identities)
            .for_each_concurrent(concurrency, |i| {
                let (counts, advertised) = (counts.clone(), advertised.clone());
                async move {
                    Counts::add(&counts.sent);
                    let key = fresh_key(2, i);
                    let identity = NodeIdentity::generate(&key).expect("an identity");
                    let Ok(mut sybil) = client(target, source, Some(&identity), None).await else {
                        Counts::add(&counts.refused);
                        return;
                    };
                    let info = signed_info(&key, &advertised, now_ms() + ahead_ms);
                    let result = sybil
                        .get_known_peers(proto::GetKnownPeersRequest {
                            own_info: Bytes::from(codec::encode(&info)),
                        })
                        .await;
                    judge(&counts, &result);
                }
            })
            .await;
    }));
    attack
}

/// A peer served over mutual TLS on 127.0.0.1 that answers GetKnownPeers
/// with its own fresh info and `per_call` of its fakes (a different window
/// each call), and GetCommitAvailability, so that it stays connected; it
/// serves nothing else.
struct FakeInfos {
    key: KeyPair,
    address: String,
    fakes: Vec<SignedNodeInfo>,
    per_call: usize,
    counts: Arc<Counts>,
    /// Timestamps of the own infos sent, in order.
    sent: Arc<std::sync::Mutex<Vec<u64>>>,
}

#[tonic::async_trait]
impl ServesInfos for FakeInfos {
    async fn known_peers(
        &self,
        _: Request<proto::GetKnownPeersRequest>,
    ) -> Result<Response<proto::GetKnownPeersResponse>, Status> {
        let own = signed_info(&self.key, &self.address, now_ms());
        let call = {
            let mut sent = self.sent.lock().unwrap_or_else(PoisonError::into_inner);
            sent.push(own.info.timestamp_ms);
            self.counts.answered.fetch_add(1, Ordering::SeqCst) as usize
        };
        let known_peers = (0..self.per_call.min(self.fakes.len()))
            .map(|k| &self.fakes[(call * self.per_call + k) % self.fakes.len()])
            .map(|i| Bytes::from(codec::encode(i)))
            .collect();
        Ok(Response::new(proto::GetKnownPeersResponse {
            own_info: Bytes::from(codec::encode(&own)),
            known_peers,
        }))
    }
}

/// A test peer that serves GetKnownPeers its own way and nothing else:
/// its service is [`InfosOnly`].
#[tonic::async_trait]
pub trait ServesInfos: Send + Sync + 'static {
    /// Its answer to GetKnownPeers.
    async fn known_peers(
        &self,
        request: Request<proto::GetKnownPeersRequest>,
    ) -> Result<Response<proto::GetKnownPeersResponse>, Status>;
}

/// The gRPC service of a [`ServesInfos`] peer: GetKnownPeers as it
/// answers, GetCommitAvailability with an empty answer (so that a node
/// stays connected to it), every other call refused as unimplemented.
pub struct InfosOnly<T>(pub T);

#[tonic::async_trait]
impl<T: ServesInfos> P2p for InfosOnly<T> {
    async fn get_known_peers(
        &self,
        request: Request<proto::GetKnownPeersRequest>,
    ) -> Result<Response<proto::GetKnownPeersResponse>, Status> {
        self.0.known_peers(request).await
    }

    async fn get_commit_availability(
        &self,
        _: Request<proto::GetCommitAvailabilityRequest>,
    ) -> Result<Response<proto::GetCommitAvailabilityResponse>, Status> {
        Ok(Response::new(
            proto::GetCommitAvailabilityResponse::default(),
        ))
    }

    async fn get_commit_info(
        &self,
        _: Request<proto::GetCommitInfoRequest>,
    ) -> Result<Response<proto::GetCommitInfoResponse>, Status> {
        Err(Status::unimplemented("serves infos only"))
    }

    async fn push_commit(
        &self,
        _: Request<proto::PushCommitRequest>,
    ) -> Result<Response<proto::PushCommitResponse>, Status> {
        Err(Status::unimplemented("serves infos only"))
    }

    async fn fetch_commits(
        &self,
        _: Request<proto::FetchCommitsRequest>,
    ) -> Result<Response<proto::FetchCommitsResponse>, Status> {
        Err(Status::unimplemented("serves infos only"))
    }

    type FetchBlocksStream = tokio_stream::Empty<Result<proto::FetchBlocksResponse, Status>>;

    async fn fetch_blocks(
        &self,
        _: Request<proto::FetchBlocksRequest>,
    ) -> Result<Response<Self::FetchBlocksStream>, Status> {
        Err(Status::unimplemented("serves infos only"))
    }
}

/// A running peer that answers with infos: its address and identity (a
/// seed entry for the node attacked), and the own infos it sent. Serves
/// until dropped.
pub struct FakeInfoPeer {
    /// Where it listens.
    pub address: String,
    /// Its identity.
    pub peer_id: PeerId,
    /// The identities whose infos it hands out.
    pub fakes: Vec<PeerId>,
    sent: Arc<std::sync::Mutex<Vec<u64>>>,
    _attack: Attack,
}

impl FakeInfoPeer {
    /// GetKnownPeers answers sent so far.
    pub fn answers(&self) -> u64 {
        self.sent().len() as u64
    }

    /// The timestamps of the own infos sent in its answers, in order.
    pub fn sent(&self) -> Vec<u64> {
        self.sent
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Its seed entry.
    pub fn seed(&self) -> SeedPeer {
        SeedPeer {
            peer_id: Some(self.peer_id),
            address: self.address.clone(),
        }
    }
}

/// Serves, as `key` on attacking host `on` ([`host`]), `fakes` fresh
/// identities of infos at `advertised` stamped `ahead_ms` ahead (signed
/// when it starts), `per_call` in each GetKnownPeers answer.
pub async fn serve_fake_infos(
    key: KeyPair,
    on: u8,
    fakes: usize,
    advertised: &str,
    ahead_ms: u64,
    per_call: usize,
) -> FakeInfoPeer {
    let stamped = now_ms() + ahead_ms;
    let fakes = (0..fakes)
        .map(|i| signed_info(&fresh_key(3, i), advertised, stamped))
        .collect();
    serve_infos(key, host(on), fakes, per_call).await
}

/// Serves, as `key` on `ip` (127.0.0.1, or an attacking [`host`]: a
/// node buckets the answers of peers by the network it dialled them in),
/// GetKnownPeers answers of its own fresh info and `per_call` of `infos`
/// (a different window each call), and GetCommitAvailability (so a node
/// stays connected to it); nothing else. With no infos, an honest peer
/// that knows no one.
pub async fn serve_infos(
    key: KeyPair,
    ip: IpAddr,
    infos: Vec<SignedNodeInfo>,
    per_call: usize,
) -> FakeInfoPeer {
    let listener = tokio::net::TcpListener::bind(SocketAddr::new(ip, 0))
        .await
        .expect("binds an ephemeral port");
    let address = listener.local_addr().expect("bound").to_string();
    let identity = NodeIdentity::generate(&key).expect("an identity");
    let peer_id = PeerId::from(key.public());
    let fake_ids = infos.iter().map(|i| i.info.peer_id).collect();
    let counts = Arc::new(Counts::default());
    let mut attack = Attack::new(counts.clone());
    let sent = Arc::new(std::sync::Mutex::new(Vec::new()));
    let server = FakeInfos {
        key,
        address: address.clone(),
        fakes: infos,
        per_call,
        counts,
        sent: sent.clone(),
    };
    let config = tls::server_config(&identity, &AccessPolicy::default()).expect("tls");
    attack.tasks.push(tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(P2pServer::new(InfosOnly(server)))
            .serve_with_incoming(tls::incoming(listener, config))
            .await;
    }));
    FakeInfoPeer {
        address,
        peer_id,
        fakes: fake_ids,
        sent,
        _attack: attack,
    }
}

/// A closed port on 127.0.0.1: dials to it are refused at once.
pub fn closed_address() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binds");
    listener.local_addr().expect("bound").to_string()
}

/// How a [`trickle`] reads.
#[derive(Clone, Copy, Debug)]
pub struct Trickle {
    /// The stream's window: bytes the node may send before the reader
    /// opens it again.
    pub window: u32,
    /// Time between openings; each opens the window by what arrived.
    pub pause: Duration,
}

/// A FetchBlocks of `request`, on a connection of its own from `source`
/// as `identity`, read `how.window` bytes at a time every `how.pause`:
/// HTTP/2 by hand, since a gRPC client opens the window as fast as it
/// decodes. The transport always has a frame to ask for soon, so such an
/// answer is never silent, only slow. Returns the bytes of the answer
/// read, once the node ends or cuts the stream (`Err`: how it ended, if
/// not in full), and counts each chunk of data in `read`.
pub async fn trickle(
    target: Target,
    source: IpAddr,
    identity: &NodeIdentity,
    request: proto::FetchBlocksRequest,
    how: Trickle,
    read: Arc<AtomicU64>,
) -> Result<u64, String> {
    use prost::Message as _;
    let (config, _) =
        tls::client_config(Some(identity), target.peer_id).map_err(|e| e.to_string())?;
    let tcp = tcp(source, target.address)
        .await
        .map_err(|e| e.to_string())?;
    let name = ServerName::try_from(tls::SERVER_NAME).expect("a valid name");
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let (mut h2, connection) = h2::client::Builder::new()
        .initial_window_size(how.window)
        .handshake::<_, Bytes>(tls)
        .await
        .map_err(|e| e.to_string())?;
    let driver = tokio::spawn(connection);
    let call = tonic::codegen::http::Request::builder()
        .method("POST")
        .uri(format!(
            "http://{}/soma.p2p.v1.P2p/FetchBlocks",
            target.address
        ))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .expect("a valid request");
    let message = request.encode_to_vec();
    let mut body = Vec::with_capacity(5 + message.len());
    body.push(0);
    body.extend_from_slice(&(message.len() as u32).to_be_bytes());
    body.extend_from_slice(&message);
    let (response, mut send) = h2.send_request(call, false).map_err(|e| e.to_string())?;
    send.send_data(Bytes::from(body), true)
        .map_err(|e| e.to_string())?;
    let response = response.await.map_err(|e| e.to_string())?;
    let mut stream = response.into_body();
    let mut total = 0u64;
    let ended = loop {
        match stream.data().await {
            Some(Ok(data)) => {
                total += data.len() as u64;
                read.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(how.pause).await;
                let _ = stream.flow_control().release_capacity(data.len());
            }
            Some(Err(e)) => break Err(e.to_string()),
            None => break Ok(()),
        }
    };
    let status = match ended {
        Ok(()) => stream
            .trailers()
            .await
            .map_err(|e| e.to_string())?
            .and_then(|t| t.get("grpc-status").cloned()),
        Err(e) => {
            driver.abort();
            return Err(e);
        }
    };
    driver.abort();
    match status {
        Some(s) if s == "0" => Ok(total),
        other => Err(format!(
            "ended with grpc-status {other:?} after {total} bytes"
        )),
    }
}
