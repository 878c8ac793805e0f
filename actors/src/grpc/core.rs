use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use soma_types::PeerId;
use soma_wire::inbound;

use super::messages::*;
use crate::{Core, Time};

/// What the server accepts; every value is a named configuration setting.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Most commits returned by one FetchCommits.
    pub commit_sync_batch_size: u64,
    /// Most block references in one FetchBlocks.
    pub max_blocks_per_fetch: usize,
    /// Largest FetchBlocks chunk and FetchCommits response, in bytes.
    pub max_fetch_response_bytes: usize,
    /// Bytes of FetchCommits answers kept in memory to answer the same
    /// request again while the store is unchanged; 0 keeps none.
    #[serde(default = "default_answer_cache_bytes")]
    pub answer_cache_bytes: usize,
    /// FetchCommits and FetchBlocks running at once for one caller (all
    /// anonymous callers share one allowance).
    pub max_concurrent_fetches_per_peer: usize,
    /// FetchCommits and FetchBlocks running at once in total.
    pub max_concurrent_fetches: usize,
    /// FetchCommits and FetchBlocks running at once for the callers of
    /// one network (a /24, or an IPv6 /32: see `inbound::network`),
    /// whatever identities they use: committee members,
    /// allowlisted peers and exempt loopback callers are not counted.
    /// Identities are free where anyone may connect; networks are not.
    #[serde(default = "default_max_concurrent_fetches_per_network")]
    pub max_concurrent_fetches_per_network: usize,
    /// Of those, fetches running at once for the callers of one host (an
    /// IPv4 address, or an IPv6 /48: see `inbound::host`), whatever
    /// identities they use, so that one machine with a few identities
    /// cannot hold its whole network's slots and leave its neighbours
    /// only the answers it stalls.
    #[serde(default = "default_max_concurrent_fetches_per_host")]
    pub max_concurrent_fetches_per_host: usize,
    /// Time a response may take to be handed to the transport after its
    /// headers; past it the response is cut and all it holds released.
    pub send_timeout: Duration,
    /// An answer the transport has not asked a frame of for this long is
    /// stalled (the client's window is full: it does not read), and so is
    /// one under way this long that has been read at less than
    /// [`Limits::min_send_rate`]: while every fetch slot is held, a new
    /// fetch takes the slot of the longest-stalled one (then of the
    /// slowest), which is cut. Clients that never read, or read a little
    /// at a time, then hold slots only while nobody else wants them.
    #[serde(default = "default_fetch_stall_timeout")]
    pub fetch_stall_timeout: Duration,
    /// Bytes of answers built but not yet handed to the transport, per
    /// connection; past it new answers wait for earlier ones to be sent.
    pub max_buffered_bytes_per_connection: usize,
    /// Bytes of answers handed to the transport (HTTP/2) but not yet
    /// written to the socket, per connection; past it answers wait for the
    /// client to read (see `soma_wire::backlog`). What a client that does
    /// not read leaves in the transport's buffers, and the most of its
    /// answers that count as answered in full.
    #[serde(default = "default_max_unwritten_bytes_per_connection")]
    pub max_unwritten_bytes_per_connection: usize,
    /// Interval of HTTP/2 pings on inbound connections.
    pub http2_keepalive_interval: Duration,
    /// Time for a ping's acknowledgement before the connection is closed.
    pub http2_keepalive_timeout: Duration,
    /// Age after which an inbound connection is asked to close (GOAWAY).
    pub max_connection_age: Duration,
    /// Time after `max_connection_age` before it is closed regardless.
    pub max_connection_age_grace: Duration,
    /// HTTP/2 streams (calls) one connection may have open at once.
    pub max_concurrent_streams: u32,
    /// Requests of one connection being handled at once; more wait.
    pub concurrency_limit_per_connection: usize,
    /// Inbound connections open at once (handshakes included); more are
    /// reset as soon as they are accepted.
    pub max_inbound_connections: usize,
    /// GetCommitInfo and PushCommit calls per second each connection, and
    /// each authenticated caller, may make on average.
    #[serde(default = "default_cheap_calls_per_second")]
    pub cheap_calls_per_second: u32,
    /// Such calls one connection or caller may make at once after a quiet
    /// spell (the token bucket's depth).
    #[serde(default = "default_cheap_call_burst")]
    pub cheap_call_burst: u32,
    /// GetKnownPeers calls per minute each connection, and each
    /// authenticated caller, may make on average: an answer carries up to
    /// `max-peers-to-send` infos (about 220 KB), so this bounds what one
    /// caller may take per minute.
    #[serde(default = "default_known_peers_calls_per_minute")]
    pub known_peers_calls_per_minute: u32,
    /// GetKnownPeers calls one connection or caller may make at once.
    #[serde(default = "default_known_peers_burst")]
    pub known_peers_burst: u32,
    /// FetchCommits and FetchBlocks a caller may drop before their answers
    /// are read (a reset call, a closed connection), a minute on average:
    /// past its allowance, and past `abandoned-fetch-burst` after a quiet
    /// spell, its fetches are refused (RESOURCE_EXHAUSTED) until the
    /// allowance refills. A host and a network have as many callers'
    /// allowance as their fetch caps hold callers at the caller's cap
    /// (`max-concurrent-fetches-per-host` and `-per-network` over
    /// `-per-peer`), so identities minted on one host share it. An honest
    /// node drops a fetch it hedged and lost, or one past its timeout: a
    /// few a minute. A host that asks for reads and never downloads them
    /// would otherwise keep its share of the fetch slots reading for
    /// nothing, at any rate.
    #[serde(default = "default_abandoned_fetches_per_minute")]
    pub abandoned_fetches_per_minute: u32,
    /// Fetches a caller may drop unread at once after a quiet spell (the
    /// token bucket's depth).
    #[serde(default = "default_abandoned_fetch_burst")]
    pub abandoned_fetch_burst: u32,
    /// Connections and callers whose call rates are tracked at once; past
    /// it, the entries that have been quiet longest are forgotten, down to
    /// three quarters of it at once.
    #[serde(default = "default_max_rate_limited")]
    pub max_rate_limited: usize,
    /// Of `max_inbound_connections`, slots only committee members and
    /// allowlisted peers may hold.
    pub reserved_inbound_connections: usize,
    /// Inbound connections from one source address.
    pub max_inbound_per_ip: usize,
    /// Inbound connections from one /24 (IPv4) or /64 (IPv6); an IPv6 /32
    /// holds four times as many.
    pub max_inbound_per_prefix: usize,
    /// Whether loopback callers skip the per-address and per-prefix caps
    /// and the fetch caps per host and network (local test networks); they
    /// hold inbound slots as who they are, never reserved ones.
    pub inbound_exempt_loopback: bool,
    /// Time an inbound connection has to finish its TLS handshake.
    pub tls_handshake_timeout: Duration,
    /// Time without a request or an answer (pings do not count) after
    /// which an inbound connection is closed.
    pub inbound_idle_timeout: Duration,
}

impl Limits {
    /// The rate, in bytes per second, an answer of `max_fetch_response_bytes`
    /// must be read at to be sent within `send_timeout`: an answer read
    /// more slowly than this since it began counts as stalled (see
    /// `fetch_stall_timeout`). Derived rather than set, so the two bounds
    /// it comes from cannot disagree with it.
    pub fn min_send_rate(&self) -> u64 {
        let ms = self.send_timeout.as_millis().max(1);
        (self.max_fetch_response_bytes as u128 * 1_000 / ms) as u64
    }
}

fn default_max_concurrent_fetches_per_network() -> usize {
    16
}

fn default_max_concurrent_fetches_per_host() -> usize {
    8
}

fn default_max_unwritten_bytes_per_connection() -> usize {
    1 << 20
}

fn default_answer_cache_bytes() -> usize {
    16 << 20
}

fn default_fetch_stall_timeout() -> Duration {
    Duration::from_millis(500)
}

fn default_cheap_calls_per_second() -> u32 {
    20
}

fn default_cheap_call_burst() -> u32 {
    40
}

fn default_known_peers_calls_per_minute() -> u32 {
    30
}

fn default_known_peers_burst() -> u32 {
    5
}

fn default_abandoned_fetches_per_minute() -> u32 {
    60
}

fn default_abandoned_fetch_burst() -> u32 {
    20
}

fn default_max_rate_limited() -> usize {
    4_096
}

impl Limits {
    /// The admission settings of the server's inbound connections.
    pub fn inbound(&self) -> inbound::Config {
        inbound::Config {
            max: self.max_inbound_connections,
            reserved: self.reserved_inbound_connections,
            max_per_ip: self.max_inbound_per_ip,
            max_per_prefix: self.max_inbound_per_prefix,
            exempt_loopback: self.inbound_exempt_loopback,
            handshake_timeout: self.tls_handshake_timeout,
            idle_timeout: self.inbound_idle_timeout,
            // A call that crossed the GOAWAY is answered within it.
            idle_drain_grace: self.send_timeout,
            max_age: self.max_connection_age,
            max_age_grace: self.max_connection_age_grace,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            commit_sync_batch_size: crate::state_sync::DEFAULT_COMMIT_SYNC_BATCH_SIZE,
            max_blocks_per_fetch: 1_000,
            max_fetch_response_bytes: 4 << 20,
            answer_cache_bytes: default_answer_cache_bytes(),
            max_concurrent_fetches_per_peer: 4,
            max_concurrent_fetches_per_network: default_max_concurrent_fetches_per_network(),
            max_concurrent_fetches_per_host: default_max_concurrent_fetches_per_host(),
            max_concurrent_fetches: 64,
            send_timeout: Duration::from_secs(10),
            fetch_stall_timeout: default_fetch_stall_timeout(),
            max_buffered_bytes_per_connection: 16 << 20,
            max_unwritten_bytes_per_connection: default_max_unwritten_bytes_per_connection(),
            http2_keepalive_interval: Duration::from_secs(30),
            http2_keepalive_timeout: Duration::from_secs(10),
            max_connection_age: Duration::from_secs(30 * 60),
            max_connection_age_grace: Duration::from_secs(30),
            max_concurrent_streams: 128,
            concurrency_limit_per_connection: 64,
            max_inbound_connections: soma_wire::inbound::DEFAULT_MAX_CONNECTIONS,
            cheap_calls_per_second: default_cheap_calls_per_second(),
            cheap_call_burst: default_cheap_call_burst(),
            known_peers_calls_per_minute: default_known_peers_calls_per_minute(),
            known_peers_burst: default_known_peers_burst(),
            abandoned_fetches_per_minute: default_abandoned_fetches_per_minute(),
            abandoned_fetch_burst: default_abandoned_fetch_burst(),
            max_rate_limited: default_max_rate_limited(),
            reserved_inbound_connections: inbound::DEFAULT_RESERVED_CONNECTIONS,
            max_inbound_per_ip: inbound::DEFAULT_MAX_PER_IP,
            max_inbound_per_prefix: inbound::DEFAULT_MAX_PER_PREFIX,
            inbound_exempt_loopback: true,
            tls_handshake_timeout: inbound::DEFAULT_HANDSHAKE_TIMEOUT,
            inbound_idle_timeout: inbound::DEFAULT_IDLE_TIMEOUT,
        }
    }
}

/// Who a call rate is kept for: each connection, each authenticated
/// caller across its connections, and, for a caller of known address
/// (`Input::Call`'s origin), its address and its network (the /24 or /64
/// the inbound caps count), each with as many connections' allowance as
/// the inbound caps let it hold connections (`max_inbound_per_ip`,
/// `max_inbound_per_prefix`): an address that closes and opens
/// connections gets no fresh allowance with each, and a neighbour can use
/// up no more of a network's than it could take of its connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Payer {
    Connection(SocketAddr),
    Peer(PeerId),
    Address(IpAddr),
    Network(IpAddr),
}

/// The calls rated together.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Rate {
    /// GetCommitInfo and PushCommit.
    Cheap,
    /// GetKnownPeers.
    KnownPeers,
    /// Fetches dropped before their answers were read: charged when
    /// dropped, checked when a fetch arrives.
    Abandoned,
}

/// A token bucket, in thousandths of a call so refills need no floats.
/// Below zero for fetches dropped unread that were charged after the
/// fact: a payer admitted while it had a token may drop every fetch it
/// then held, and owes them all.
#[derive(Clone, Copy, Debug)]
struct Bucket {
    milli: i64,
    at: Time,
}

/// Thousandths of a call in a token.
const MILLI: i64 = 1_000;

/// Everything an adapter core is made from: its limits and, after a
/// restart, the fetches still running (their slots stay taken until their
/// permits are dropped). Call rates start afresh.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Init {
    /// The limits.
    #[serde(flatten)]
    pub limits: Limits,
    /// Admitted fetches still running, with their callers.
    #[serde(default)]
    pub running: Vec<(u64, Option<PeerId>)>,
    /// The hosts (see `Input::Call`'s `origin`) of those of them that
    /// count in a network.
    #[serde(default)]
    pub running_origins: Vec<(u64, IpAddr)>,
}

impl From<Limits> for Init {
    fn from(limits: Limits) -> Self {
        Init {
            limits,
            running: Vec::new(),
            running_origins: Vec::new(),
        }
    }
}

/// The adapter's admission logic.
pub struct GrpcAdapterCore {
    limits: Limits,
    /// Call rates by payer.
    buckets: HashMap<(Payer, Rate), Bucket>,
    /// Admitted fetches by caller.
    fetches: HashMap<Option<PeerId>, usize>,
    /// Caller of each admitted fetch still running.
    running: HashMap<u64, Option<PeerId>>,
    /// Admitted fetches still running by the host they came from, of
    /// those that count in a network.
    hosts: Tally,
    /// The same by network.
    networks: Tally,
}

/// Running fetches counted by where their callers call from (a host, or
/// a network): each fetch's key and each key's count, at most `cap`.
struct Tally {
    cap: usize,
    of: HashMap<u64, IpAddr>,
    count: HashMap<IpAddr, usize>,
}

impl Tally {
    fn new(cap: usize) -> Self {
        Tally {
            cap,
            of: HashMap::new(),
            count: HashMap::new(),
        }
    }

    fn hold(&mut self, id: u64, key: IpAddr) {
        self.of.insert(id, key);
        *self.count.entry(key).or_default() += 1;
    }

    fn release(&mut self, id: u64) {
        if let Some(key) = self.of.remove(&id)
            && let Some(n) = self.count.get_mut(&key)
        {
            *n -= 1;
            if *n == 0 {
                self.count.remove(&key);
            }
        }
    }

    /// Whether `key` holds its cap of fetches without fetch `without`.
    fn full(&self, key: IpAddr, without: Option<u64>) -> bool {
        let held = self.count.get(&key).copied().unwrap_or(0);
        let freed = without.is_some_and(|id| self.of.get(&id) == Some(&key));
        held - usize::from(freed) >= self.cap
    }
}

impl Core for GrpcAdapterCore {
    const NAME: &'static str = "grpc_adapter";
    type Init = Init;
    type Input = Input;
    type Output = Output;

    fn new(init: Init) -> Self {
        let mut core = GrpcAdapterCore {
            hosts: Tally::new(init.limits.max_concurrent_fetches_per_host),
            networks: Tally::new(init.limits.max_concurrent_fetches_per_network),
            limits: init.limits,
            buckets: HashMap::new(),
            fetches: HashMap::new(),
            running: HashMap::new(),
        };
        let origins: HashMap<u64, IpAddr> = init.running_origins.into_iter().collect();
        for (id, caller) in init.running {
            core.hold(id, caller, origins.get(&id).copied());
        }
        core
    }

    fn handle(&mut self, now: Time, input: Input) -> Vec<Output> {
        match input {
            Input::Call {
                id,
                caller,
                connection,
                origin,
                call,
                stalled,
            } => {
                let address = origin.map(|ip| ip.to_canonical());
                let origin = origin.map(inbound::host);
                let mut out = Vec::new();
                let admitted = self
                    .rate(now, (caller, connection, address), origin, &call)
                    .and_then(|()| self.admit(id, (caller, origin), call, &stalled, &mut out));
                out.push(match admitted {
                    Ok(work) => Output::Admit { id, work },
                    Err(refusal) => Output::Refuse { id, refusal },
                });
                out
            }
            Input::Done { id } => {
                self.release(id);
                vec![]
            }
            Input::Abandoned { caller, origin } => {
                self.charge_abandoned(now, caller, origin.map(inbound::host));
                vec![]
            }
        }
    }
}

/// What stands in the way of a fetch: its caller's cap, its host's, its
/// network's, or the slots of all callers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Crowded {
    /// The caller holds `max_concurrent_fetches_per_peer` fetches.
    Caller,
    /// The caller's host holds `max_concurrent_fetches_per_host` fetches.
    Host(IpAddr),
    /// The caller's network holds `max_concurrent_fetches_per_network`
    /// fetches.
    Network(IpAddr),
    /// `max_concurrent_fetches` fetches run.
    All,
}

impl GrpcAdapterCore {
    /// What would stop a fetch of `caller` from `origin` now, if
    /// anything: the slots kept by connections that stand in its way are
    /// only those (the caller's own, its host's, its network's, or
    /// everyone's).
    pub fn crowded(&self, caller: Option<PeerId>, origin: Option<IpAddr>) -> Option<Crowded> {
        let limits = &self.limits;
        if self.fetches.get(&caller).copied().unwrap_or(0) >= limits.max_concurrent_fetches_per_peer
        {
            return Some(Crowded::Caller);
        }
        if let Some(host) = origin.map(inbound::host) {
            if self.hosts.full(host, None) {
                return Some(Crowded::Host(host));
            }
            let network = inbound::network(host);
            if self.networks.full(network, None) {
                return Some(Crowded::Network(network));
            }
        }
        (self.running.len() >= limits.max_concurrent_fetches).then_some(Crowded::All)
    }

    /// Whether fetch `victim`'s slot, once freed, leaves room for a fetch
    /// of `caller` from host `origin` under every cap it is held to.
    fn fits_without(&self, victim: u64, caller: Option<PeerId>, origin: Option<IpAddr>) -> bool {
        let Some(holder) = self.running.get(&victim) else {
            return false;
        };
        let limits = &self.limits;
        let mine = self.fetches.get(&caller).copied().unwrap_or(0) - usize::from(*holder == caller);
        mine < limits.max_concurrent_fetches_per_peer
            && origin.is_none_or(|host| {
                !self.hosts.full(host, Some(victim))
                    && !self.networks.full(inbound::network(host), Some(victim))
            })
    }

    /// The init a restarted core is made from: the same limits and the
    /// fetches still running.
    pub fn restart_init(&self) -> Init {
        let mut running: Vec<(u64, Option<PeerId>)> =
            self.running.iter().map(|(id, c)| (*id, *c)).collect();
        running.sort_unstable();
        let mut running_origins: Vec<(u64, IpAddr)> =
            self.hosts.of.iter().map(|(id, h)| (*id, *h)).collect();
        running_origins.sort_unstable();
        Init {
            limits: self.limits.clone(),
            running,
            running_origins,
        }
    }

    /// Counts fetch `id` of `caller` from host `origin` as running.
    fn hold(&mut self, id: u64, caller: Option<PeerId>, origin: Option<IpAddr>) {
        *self.fetches.entry(caller).or_default() += 1;
        self.running.insert(id, caller);
        if let Some(host) = origin {
            self.hosts.hold(id, host);
            self.networks.hold(id, inbound::network(host));
        }
    }
}

/// What a fetch call reads, if it is well formed within `limits`
/// (FetchCommits capped at the batch size); the checks a fetch passes
/// before it may have a slot, whether the core admits it or it starts on a
/// slot its connection kept (see `KeptSlots`).
pub(crate) fn fetch_work(limits: &Limits, call: Call) -> Result<Work, Refusal> {
    match call {
        Call::FetchCommits { start, end } => {
            if start == 0 {
                return Err(refuse(Code::InvalidArgument, "start must be at least 1"));
            }
            if end < start {
                return Err(refuse(Code::InvalidArgument, "end is before start"));
            }
            let last = start.saturating_add(limits.commit_sync_batch_size.max(1) - 1);
            Ok(Work::FetchCommits {
                start,
                end: end.min(last),
            })
        }
        Call::FetchBlocks { refs } => {
            if refs == 0 {
                return Err(refuse(Code::InvalidArgument, "no block references"));
            }
            if refs > limits.max_blocks_per_fetch {
                return Err(refuse(
                    Code::InvalidArgument,
                    format!(
                        "{refs} block references exceed the limit of {}",
                        limits.max_blocks_per_fetch
                    ),
                ));
            }
            Ok(Work::FetchBlocks)
        }
        other => Err(refuse(
            Code::InvalidArgument,
            format!("{other:?} is not a fetch"),
        )),
    }
}

/// How a fetch refused for its caller's fetches dropped unread begins.
pub(crate) const ABANDONED_REFUSAL: &str =
    "too many fetches dropped before their answers were read";

/// Who pays for a fetch of `caller` from `host` dropped unread: the
/// caller if authenticated, and the host and its network if counted (see
/// `Input::Call`'s `origin`). An exempt or reserved anonymous caller pays
/// nothing.
fn abandoning(caller: Option<PeerId>, host: Option<IpAddr>) -> impl Iterator<Item = Payer> {
    caller
        .map(Payer::Peer)
        .into_iter()
        .chain(host.map(Payer::Address))
        .chain(host.map(|h| Payer::Network(inbound::network(h))))
}

fn refuse(code: Code, message: impl Into<String>) -> Refusal {
    Refusal {
        code,
        message: message.into(),
    }
}

impl GrpcAdapterCore {
    /// Takes a token for `call` from its connection's bucket and, for an
    /// authenticated caller, from the caller's, and for a caller of known
    /// `address`, from its address's and its network's. Fetches are
    /// bounded by their slots instead, and refused while their caller, or
    /// their `host` or its network, has dropped its allowance of fetches
    /// unread ([`Rate::Abandoned`]).
    fn rate(
        &mut self,
        now: Time,
        (caller, connection, address): (Option<PeerId>, Option<SocketAddr>, Option<IpAddr>),
        host: Option<IpAddr>,
        call: &Call,
    ) -> Result<(), Refusal> {
        let rate = match call {
            Call::CommitInfo { .. } | Call::PushCommit { .. } => Rate::Cheap,
            Call::KnownPeers => Rate::KnownPeers,
            Call::FetchCommits { .. } | Call::FetchBlocks { .. } => {
                return match self.refusal_for_abandoning(now, caller, host) {
                    Some(refusal) => Err(refusal),
                    None => Ok(()),
                };
            }
        };
        let payers: Vec<Payer> = connection
            .map(Payer::Connection)
            .into_iter()
            .chain(caller.map(Payer::Peer))
            .chain(address.map(Payer::Address))
            .chain(address.map(|ip| Payer::Network(inbound::prefix(ip))))
            .collect();
        // Refill, then check every payer before taking from any.
        let mut levels = Vec::with_capacity(payers.len());
        for payer in &payers {
            let (level, (_, per_minute)) = self.level(now, *payer, rate);
            if level < MILLI {
                return Err(refuse(
                    Code::ResourceExhausted,
                    format!("rate limited: at most {per_minute} such calls a minute"),
                ));
            }
            levels.push(level);
        }
        for (payer, level) in payers.into_iter().zip(levels) {
            self.buckets.insert(
                (payer, rate),
                Bucket {
                    milli: level - MILLI,
                    at: now,
                },
            );
        }
        self.forget_quiet();
        Ok(())
    }

    /// Why a fetch of `caller` from `host` would be refused at `now` for
    /// the fetches dropped unread, if it would: its caller's allowance, or
    /// its host's, is gone; or its network's is, and its host has dropped
    /// fetches lately itself (its allowance is not whole), so that a
    /// network's other hosts that drop nothing are not shut out by one
    /// that does.
    pub fn refusal_for_abandoning(
        &self,
        now: Time,
        caller: Option<PeerId>,
        host: Option<IpAddr>,
    ) -> Option<Refusal> {
        let host = host.map(inbound::host);
        let host_whole = host.is_none_or(|h| {
            let (level, (capacity, _)) = self.level(now, Payer::Address(h), Rate::Abandoned);
            level >= capacity
        });
        abandoning(caller, host).find_map(|payer| {
            let (level, (capacity, per_minute)) = self.level(now, payer, Rate::Abandoned);
            // Hosts taking turns do not spare a network more than its
            // allowance again.
            let spared = matches!(payer, Payer::Network(_)) && host_whole && level > -capacity;
            (level < MILLI && !spared).then(|| {
                refuse(
                    Code::ResourceExhausted,
                    format!("{ABANDONED_REFUSAL}: at most {per_minute} a minute may go unread"),
                )
            })
        })
    }

    /// A fetch of `caller` from `host` was dropped before its answer was
    /// read: a token from each of their [`Rate::Abandoned`] buckets, below
    /// empty if need be. Charged after the fact, so a payer may drop as
    /// many more as it had fetches running when its allowance ran out
    /// (which its slots bound); it owes them, and is refused until they
    /// are refilled too.
    fn charge_abandoned(&mut self, now: Time, caller: Option<PeerId>, host: Option<IpAddr>) {
        for payer in abandoning(caller, host) {
            let (level, _) = self.level(now, payer, Rate::Abandoned);
            self.buckets.insert(
                (payer, Rate::Abandoned),
                Bucket {
                    milli: level.saturating_sub(MILLI),
                    at: now,
                },
            );
        }
        self.forget_quiet();
    }

    /// `payer`'s allowance for `rate`: its bucket's depth in thousandths
    /// of a call, and its calls a minute. An address and a network have
    /// as many connections' allowance as the inbound caps let them hold
    /// connections (`max_inbound_per_ip`, `max_inbound_per_prefix`); for
    /// fetches dropped unread, a host and a network as many callers' as
    /// their fetch caps hold callers at the caller's cap.
    fn allowance(&self, payer: Payer, rate: Rate) -> (i64, i64) {
        let limits = &self.limits;
        let (per_minute, burst) = match rate {
            Rate::Cheap => (
                u64::from(limits.cheap_calls_per_second) * 60,
                limits.cheap_call_burst,
            ),
            Rate::KnownPeers => (
                u64::from(limits.known_peers_calls_per_minute),
                limits.known_peers_burst,
            ),
            Rate::Abandoned => (
                u64::from(limits.abandoned_fetches_per_minute),
                limits.abandoned_fetch_burst,
            ),
        };
        let callers = |cap: usize| cap.div_ceil(limits.max_concurrent_fetches_per_peer.max(1));
        let share = match (rate, payer) {
            (Rate::Abandoned, Payer::Address(_)) => callers(limits.max_concurrent_fetches_per_host),
            (Rate::Abandoned, Payer::Network(_)) => {
                callers(limits.max_concurrent_fetches_per_network)
            }
            (_, Payer::Address(_)) => limits.max_inbound_per_ip,
            (_, Payer::Network(_)) => limits.max_inbound_per_prefix,
            (_, Payer::Connection(_) | Payer::Peer(_)) => 1,
        }
        .max(1);
        let share = i64::try_from(share).unwrap_or(i64::MAX);
        let per_minute = i64::try_from(per_minute).unwrap_or(i64::MAX);
        (
            i64::from(burst.max(1))
                .saturating_mul(MILLI)
                .saturating_mul(share),
            per_minute.saturating_mul(share),
        )
    }

    /// The level of `payer`'s bucket for `rate` at `now`, refilled since
    /// it was last taken from (full if it is not tracked), with its
    /// [`allowance`](Self::allowance).
    fn level(&self, now: Time, payer: Payer, rate: Rate) -> (i64, (i64, i64)) {
        let (capacity, per_minute) = self.allowance(payer, rate);
        let bucket = self.buckets.get(&(payer, rate)).copied();
        let level = bucket.map_or(capacity, |b| {
            let elapsed_ms = i64::try_from(now.0.saturating_sub(b.at.0)).unwrap_or(i64::MAX);
            // per_minute calls a minute is per_minute thousandths a
            // millisecond over 60.
            let refill = elapsed_ms.saturating_mul(per_minute) / 60;
            b.milli.saturating_add(refill).min(capacity)
        });
        (level, (capacity, per_minute))
    }

    /// When `bucket` of `key` is whole again, in milliseconds of the core's
    /// clock (`u64::MAX` if it never refills).
    fn whole_at(&self, (payer, rate): (Payer, Rate), bucket: &Bucket) -> u64 {
        let (capacity, per_minute) = self.allowance(payer, rate);
        let missing = capacity.saturating_sub(bucket.milli).max(0);
        if per_minute <= 0 {
            return if missing == 0 { bucket.at.0 } else { u64::MAX };
        }
        // per_minute thousandths of a token a millisecond over 60.
        let ms = u64::try_from(missing.saturating_mul(60)).unwrap_or(u64::MAX);
        let ms = ms.div_ceil(u64::try_from(per_minute).unwrap_or(u64::MAX));
        bucket.at.0.saturating_add(ms)
    }

    /// Keeps the rate table within `max_rate_limited` entries: past it,
    /// the buckets untouched longest go (a forgotten bucket starts full
    /// again, so only the quietest payers gain from it), down to three
    /// quarters of the bound at once. One pass over the table then serves
    /// a quarter of it in new entries: a host opening connection after
    /// connection, each a new payer, would otherwise cost a pass (and a
    /// sort) per connection on the actors' thread. The buckets whole
    /// again soonest go first (those whole already lose nothing): a
    /// forgotten bucket starts whole, and one of fetches dropped unread,
    /// owing and refilling slowly, would otherwise be handed back whole.
    fn forget_quiet(&mut self) {
        let max = self.limits.max_rate_limited.max(1);
        if self.buckets.len() <= max {
            return;
        }
        let keep = max - max / 4;
        let mut by_age: Vec<(u64, (Payer, Rate))> = self
            .buckets
            .iter()
            .map(|(key, b)| (self.whole_at(*key, b), *key))
            .collect();
        let excess = by_age.len() - keep;
        by_age.select_nth_unstable(excess);
        for (_, key) in &by_age[..excess] {
            self.buckets.remove(key);
        }
    }

    fn admit(
        &mut self,
        id: u64,
        (caller, origin): (Option<PeerId>, Option<IpAddr>),
        call: Call,
        stalled: &[u64],
        out: &mut Vec<Output>,
    ) -> Result<Work, Refusal> {
        match call {
            Call::CommitInfo { index } => Ok(Work::CommitInfo { index }),
            Call::KnownPeers => Ok(Work::KnownPeers),
            Call::PushCommit { index } => match caller {
                Some(peer) => Ok(Work::PushCommit { peer, index }),
                None => Err(refuse(
                    Code::PermissionDenied,
                    "anonymous callers may not push commits",
                )),
            },
            Call::FetchCommits { .. } | Call::FetchBlocks { .. } => {
                let work = fetch_work(&self.limits, call)?;
                self.take_fetch_slot(id, (caller, origin), stalled, out)?;
                Ok(work)
            }
        }
    }

    /// Whether running fetch `victim` is of `caller` (an authenticated
    /// one), or of host `origin` or its network.
    fn of_the_same(&self, victim: u64, caller: Option<PeerId>, origin: Option<IpAddr>) -> bool {
        let same_caller = caller.is_some() && self.running.get(&victim) == Some(&caller);
        let same_network = match (self.hosts.of.get(&victim), origin) {
            (Some(host), Some(origin)) => inbound::network(*host) == inbound::network(origin),
            _ => false,
        };
        same_caller || same_network
    }

    /// Frees the slot of fetch `id`, if it holds one.
    fn release(&mut self, id: u64) {
        if let Some(caller) = self.running.remove(&id)
            && let Some(n) = self.fetches.get_mut(&caller)
        {
            *n -= 1;
            if *n == 0 {
                self.fetches.remove(&caller);
            }
        }
        self.hosts.release(id);
        self.networks.release(id);
    }

    /// A slot for fetch `id` of `caller` from host `origin`: a free one,
    /// or the slot of the first of `stalled` that is running and whose
    /// freeing makes room under every cap the fetch is held to (its cut
    /// goes to `out`). At its own cap a caller may so take only its own
    /// stalled answer's slot (all anonymous callers share one allowance,
    /// so a stranger that never reads cannot keep the others out), at its
    /// host's cap only one of its host's, at its network's cap only one
    /// of its network's; below all three, when every slot is held, any
    /// stalled answer's.
    fn take_fetch_slot(
        &mut self,
        id: u64,
        (caller, origin): (Option<PeerId>, Option<IpAddr>),
        stalled: &[u64],
        out: &mut Vec<Output>,
    ) -> Result<(), Refusal> {
        if let Some(crowded) = self.crowded(caller, origin) {
            let victim = (stalled.iter().copied()).find(|v| self.fits_without(*v, caller, origin));
            let Some(victim) = victim else {
                let limits = &self.limits;
                return Err(refuse(
                    Code::ResourceExhausted,
                    match crowded {
                        Crowded::Caller => format!(
                            "at most {} fetches at once per peer",
                            limits.max_concurrent_fetches_per_peer
                        ),
                        Crowded::Host(host) => format!(
                            "at most {} fetches at once from {host}",
                            limits.max_concurrent_fetches_per_host
                        ),
                        Crowded::Network(network) => format!(
                            "at most {} fetches at once from the network of {network}",
                            limits.max_concurrent_fetches_per_network
                        ),
                        Crowded::All => "too many fetches in progress".into(),
                    },
                ));
            };
            let charged = self.of_the_same(victim, caller, origin);
            self.release(victim);
            out.push(Output::Cut {
                id: victim,
                charged,
            });
        }
        self.hold(id, caller, origin);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn core() -> GrpcAdapterCore {
        GrpcAdapterCore::new(Init::from(Limits {
            max_concurrent_fetches_per_peer: 2,
            max_concurrent_fetches: 3,
            ..Limits::default()
        }))
    }

    fn call(c: &mut GrpcAdapterCore, id: u64, caller: Option<u8>, call: Call) -> Output {
        c.handle(
            Time(0),
            Input::Call {
                id,
                caller: caller.map(|p| PeerId([p; 32])),
                connection: None,
                origin: None,
                call,
                stalled: Vec::new(),
            },
        )
        .pop()
        .unwrap()
    }

    fn code(o: Output) -> Option<Code> {
        match o {
            Output::Refuse { refusal, .. } => Some(refusal.code),
            Output::Admit { .. } | Output::Cut { .. } => None,
        }
    }

    /// Fetch `id` of `caller` with `stalled` fetches to take a slot from.
    fn fetch_past(c: &mut GrpcAdapterCore, id: u64, caller: u8, stalled: &[u64]) -> Vec<Output> {
        fetch_from(c, id, caller, None, stalled)
    }

    /// Fetch `id` of `caller` from host `origin`, with `stalled` fetches
    /// to take a slot from.
    fn fetch_from(
        c: &mut GrpcAdapterCore,
        id: u64,
        caller: u8,
        origin: Option<&str>,
        stalled: &[u64],
    ) -> Vec<Output> {
        c.handle(
            Time(0),
            Input::Call {
                id,
                caller: Some(PeerId([caller; 32])),
                connection: None,
                origin: origin.map(|n| n.parse().unwrap()),
                call: Call::FetchBlocks { refs: 1 },
                stalled: stalled.to_vec(),
            },
        )
    }

    fn admitted(out: &[Output]) -> bool {
        matches!(out.last(), Some(Output::Admit { .. }))
    }

    /// The one refusal in `out`'s message.
    fn refused(out: &[Output]) -> &str {
        match out {
            [Output::Refuse { refusal, .. }] => {
                assert_eq!(refusal.code, Code::ResourceExhausted);
                &refusal.message
            }
            other => panic!("{other:?}"),
        }
    }

    fn network_core(per_network: usize, total: usize) -> GrpcAdapterCore {
        GrpcAdapterCore::new(Init::from(Limits {
            max_concurrent_fetches_per_peer: 4,
            max_concurrent_fetches_per_network: per_network,
            max_concurrent_fetches: total,
            ..Limits::default()
        }))
    }

    fn ip(a: &str) -> IpAddr {
        a.parse().unwrap()
    }

    #[test]
    fn callers_of_one_network_share_its_cap_whatever_their_identities() {
        let mut c = network_core(2, 8);
        assert!(admitted(&fetch_from(&mut c, 1, 1, Some("10.0.0.1"), &[])));
        assert!(admitted(&fetch_from(&mut c, 2, 2, Some("10.0.0.2"), &[])));
        // A third identity of the network, on a third host, is refused,
        // and told why.
        let out = fetch_from(&mut c, 3, 3, Some("10.0.0.3"), &[]);
        assert_eq!(
            refused(&out),
            "at most 2 fetches at once from the network of 10.0.0.0"
        );
        let host = Some(ip("10.0.0.3"));
        assert_eq!(
            c.crowded(Some(PeerId([3; 32])), host),
            Some(Crowded::Network(ip("10.0.0.0")))
        );
        // Another network, and a caller counted in none, are not.
        assert!(admitted(&fetch_from(&mut c, 4, 3, Some("10.0.1.3"), &[])));
        assert!(admitted(&fetch_from(&mut c, 5, 3, None, &[])));
        // A restarted core counts what still runs.
        let mut c = GrpcAdapterCore::new(c.restart_init());
        assert_eq!(
            code(
                fetch_from(&mut c, 6, 4, Some("10.0.0.4"), &[])
                    .pop()
                    .unwrap()
            ),
            Some(Code::ResourceExhausted)
        );
        // A fetch of the network ends: a newcomer of it takes the room.
        c.handle(Time(0), Input::Done { id: 1 });
        assert_eq!(c.crowded(Some(PeerId([3; 32])), host), None);
        assert!(admitted(&fetch_from(&mut c, 7, 4, Some("10.0.0.4"), &[])));
    }

    #[test]
    fn at_its_networks_cap_a_fetch_takes_only_a_stalled_slot_of_its_network() {
        let mut c = network_core(1, 2);
        assert!(admitted(&fetch_from(&mut c, 1, 1, Some("10.0.0.1"), &[])));
        assert!(admitted(&fetch_from(&mut c, 2, 2, Some("10.0.1.1"), &[])));
        // Both answers stalled, the other network's first: freeing it
        // would leave this network over its cap, so its own goes.
        let out = fetch_from(&mut c, 3, 3, Some("10.0.0.3"), &[2, 1]);
        // Of the newcomer's network: charged as dropped unread.
        assert_eq!(
            out[0],
            Output::Cut {
                id: 1,
                charged: true
            }
        );
        assert!(admitted(&out));
        // A third network, with nothing stalled, finds every slot held.
        let out = fetch_from(&mut c, 4, 4, Some("10.0.2.1"), &[]);
        assert_eq!(refused(&out), "too many fetches in progress");
    }

    /// One machine's identities share its host's cap, so its neighbours
    /// in the network keep the rest of the network's slots however many
    /// identities it mints; an IPv6 host is its /48.
    #[test]
    fn one_hosts_identities_hold_at_most_its_share_of_the_network() {
        let mut c = GrpcAdapterCore::new(Init::from(Limits {
            max_concurrent_fetches_per_peer: 4,
            max_concurrent_fetches_per_host: 2,
            max_concurrent_fetches_per_network: 4,
            max_concurrent_fetches: 16,
            ..Limits::default()
        }));
        // Host 10.0.0.1, three identities: two fetches, then no more.
        assert!(admitted(&fetch_from(&mut c, 1, 1, Some("10.0.0.1"), &[])));
        assert!(admitted(&fetch_from(&mut c, 2, 2, Some("10.0.0.1"), &[])));
        let out = fetch_from(&mut c, 3, 3, Some("10.0.0.1"), &[]);
        assert_eq!(refused(&out), "at most 2 fetches at once from 10.0.0.1");
        assert_eq!(
            c.crowded(Some(PeerId([3; 32])), Some(ip("10.0.0.1"))),
            Some(Crowded::Host(ip("10.0.0.1")))
        );
        // Its neighbour takes the network's other two.
        assert!(admitted(&fetch_from(&mut c, 4, 4, Some("10.0.0.2"), &[])));
        assert!(admitted(&fetch_from(&mut c, 5, 4, Some("10.0.0.2"), &[])));
        let out = fetch_from(&mut c, 6, 5, Some("10.0.0.3"), &[]);
        assert_eq!(
            refused(&out),
            "at most 4 fetches at once from the network of 10.0.0.0"
        );
        // At its cap, a host takes only a stalled slot of its own: the
        // neighbour's, stalled first, would leave it over its cap.
        let out = fetch_from(&mut c, 7, 3, Some("10.0.0.1"), &[4, 2]);
        assert_eq!(
            out[0],
            Output::Cut {
                id: 2,
                charged: true
            }
        );
        assert!(admitted(&out));
        // A restarted core counts each host's running fetches.
        let mut c = GrpcAdapterCore::new(c.restart_init());
        let out = fetch_from(&mut c, 8, 6, Some("10.0.0.1"), &[]);
        assert_eq!(refused(&out), "at most 2 fetches at once from 10.0.0.1");
        c.handle(Time(0), Input::Done { id: 4 });
        assert!(admitted(&fetch_from(&mut c, 9, 6, Some("10.0.0.2"), &[])));
        // IPv6: one /48 is one host, whatever /64s it uses.
        for (id, caller, host) in [(10, 7, "2001:db8:aa:1::1"), (11, 8, "2001:db8:aa:2::1")] {
            assert!(admitted(&fetch_from(&mut c, id, caller, Some(host), &[])));
        }
        let out = fetch_from(&mut c, 12, 9, Some("2001:db8:aa:3::1"), &[]);
        assert_eq!(
            refused(&out),
            "at most 2 fetches at once from 2001:db8:aa::"
        );
        assert!(admitted(&fetch_from(
            &mut c,
            13,
            9,
            Some("2001:db8:ab:1::1"),
            &[]
        )));
        // An IPv4-mapped address is its IPv4 host.
        let out = fetch_from(&mut c, 14, 9, Some("::ffff:10.0.0.1"), &[]);
        assert_eq!(refused(&out), "at most 2 fetches at once from 10.0.0.1");
    }

    #[test]
    fn when_every_slot_is_held_a_fetch_takes_the_longest_stalled_slot() {
        let mut c = core();
        // Three slots, held by callers 1, 1 and 2.
        for (id, caller) in [(1, 1), (2, 1), (3, 2)] {
            assert!(matches!(
                fetch_past(&mut c, id, caller, &[])[..],
                [Output::Admit { .. }]
            ));
        }
        // Nothing stalled: refused.
        assert_eq!(
            code(fetch_past(&mut c, 4, 3, &[]).pop().unwrap()),
            Some(Code::ResourceExhausted)
        );
        // Stalled ids that hold no slot (ended, or never admitted) are
        // passed over; the first one holding a slot is cut.
        let out = fetch_past(&mut c, 5, 3, &[9, 2, 1]);
        assert_eq!(
            out,
            vec![
                // Another caller's, of no known host: not charged.
                Output::Cut {
                    id: 2,
                    charged: false
                },
                Output::Admit {
                    id: 5,
                    work: Work::FetchBlocks
                }
            ]
        );
        // The cut fetch's slot was its caller's: caller 1 has one again,
        // and is charged for the answer it let be cut.
        assert!(matches!(
            fetch_past(&mut c, 6, 1, &[1])[..],
            [
                Output::Cut {
                    id: 1,
                    charged: true
                },
                Output::Admit { id: 6, .. }
            ]
        ));
        // Its permit's end, arriving later, frees nothing twice: the three
        // slots are still held (ids 3, 5, 6).
        c.handle(Time(0), Input::Done { id: 2 });
        c.handle(Time(0), Input::Done { id: 1 });
        assert_eq!(
            code(fetch_past(&mut c, 7, 4, &[]).pop().unwrap()),
            Some(Code::ResourceExhausted)
        );
        // A caller at its own cap never takes another's slot: caller 3
        // takes caller 2's (its second), then is refused.
        assert!(matches!(
            fetch_past(&mut c, 8, 3, &[3])[..],
            [
                Output::Cut {
                    id: 3,
                    charged: false
                },
                Output::Admit { id: 8, .. }
            ]
        ));
        assert_eq!(
            fetch_past(&mut c, 9, 3, &[6]),
            vec![Output::Refuse {
                id: 9,
                refusal: refuse(
                    Code::ResourceExhausted,
                    "at most 2 fetches at once per peer"
                ),
            }]
        );
    }

    #[test]
    fn empty_reversed_and_zero_ranges_are_invalid() {
        let mut c = core();
        let fetch = |start, end| Call::FetchCommits { start, end };
        assert_eq!(
            code(call(&mut c, 1, Some(1), fetch(0, 5))),
            Some(Code::InvalidArgument)
        );
        assert_eq!(
            code(call(&mut c, 2, Some(1), fetch(9, 5))),
            Some(Code::InvalidArgument)
        );
        assert_eq!(
            code(call(&mut c, 3, Some(1), Call::FetchBlocks { refs: 0 })),
            Some(Code::InvalidArgument)
        );
    }

    #[test]
    fn fetch_commits_is_capped_at_the_batch_size() {
        // The default batch size, 200, caps 101..=10,000 at 300.
        let mut c = core();
        assert_eq!(
            call(
                &mut c,
                1,
                Some(1),
                Call::FetchCommits {
                    start: 101,
                    end: 10_000
                }
            ),
            Output::Admit {
                id: 1,
                work: Work::FetchCommits {
                    start: 101,
                    end: 300
                }
            }
        );
    }

    #[test]
    fn too_many_refs_are_refused() {
        let mut c = core();
        assert_eq!(
            code(call(&mut c, 1, Some(1), Call::FetchBlocks { refs: 1_001 })),
            Some(Code::InvalidArgument)
        );
        assert_eq!(
            code(call(&mut c, 2, Some(1), Call::FetchBlocks { refs: 1_000 })),
            None
        );
    }

    #[test]
    fn anonymous_push_is_denied_and_attributed_push_is_admitted() {
        let mut c = core();
        assert_eq!(
            code(call(&mut c, 1, None, Call::PushCommit { index: 5 })),
            Some(Code::PermissionDenied)
        );
        assert_eq!(
            call(&mut c, 2, Some(7), Call::PushCommit { index: 5 }),
            Output::Admit {
                id: 2,
                work: Work::PushCommit {
                    peer: PeerId([7; 32]),
                    index: 5
                }
            }
        );
    }

    #[test]
    fn fetches_per_peer_and_in_total_are_bounded_and_released() {
        let mut c = core();
        let blocks = Call::FetchBlocks { refs: 1 };
        assert_eq!(code(call(&mut c, 1, Some(1), blocks.clone())), None);
        assert_eq!(code(call(&mut c, 2, Some(1), blocks.clone())), None);
        assert_eq!(
            code(call(&mut c, 3, Some(1), blocks.clone())),
            Some(Code::ResourceExhausted)
        );
        // Another peer has its own allowance, up to the total.
        assert_eq!(code(call(&mut c, 4, Some(2), blocks.clone())), None);
        assert_eq!(
            code(call(&mut c, 5, Some(3), blocks.clone())),
            Some(Code::ResourceExhausted)
        );
        c.handle(Time(0), Input::Done { id: 1 });
        assert_eq!(code(call(&mut c, 6, Some(1), blocks.clone())), None);
        // Reads that are not fetches are never limited this way.
        assert_eq!(
            code(call(&mut c, 7, Some(1), Call::CommitInfo { index: None })),
            None
        );
    }

    fn rated(
        c: &mut GrpcAdapterCore,
        now: u64,
        caller: Option<u8>,
        port: u16,
        call: Call,
    ) -> Option<Code> {
        code(
            c.handle(
                Time(now),
                Input::Call {
                    id: now,
                    caller: caller.map(|p| PeerId([p; 32])),
                    connection: Some(SocketAddr::from(([127, 0, 0, 1], port))),
                    origin: None,
                    call,
                    stalled: Vec::new(),
                },
            )
            .pop()
            .unwrap(),
        )
    }

    fn limited() -> GrpcAdapterCore {
        GrpcAdapterCore::new(Init::from(Limits {
            cheap_calls_per_second: 10,
            cheap_call_burst: 3,
            known_peers_calls_per_minute: 6,
            known_peers_burst: 2,
            ..Limits::default()
        }))
    }

    #[test]
    fn cheap_calls_are_rated_per_connection_with_a_burst_then_a_steady_rate() {
        let mut c = limited();
        let info = || Call::CommitInfo { index: None };
        // A burst of 3, then refused.
        for _ in 0..3 {
            assert_eq!(rated(&mut c, 0, None, 1, info()), None);
        }
        assert_eq!(
            rated(&mut c, 0, None, 1, info()),
            Some(Code::ResourceExhausted)
        );
        // Another connection, even anonymous, has its own allowance.
        assert_eq!(rated(&mut c, 0, None, 2, info()), None);
        // 10 a second: one more after 100 ms, not before.
        assert_eq!(
            rated(&mut c, 99, None, 1, info()),
            Some(Code::ResourceExhausted)
        );
        assert_eq!(rated(&mut c, 100, None, 1, info()), None);
        assert_eq!(
            rated(&mut c, 100, None, 1, info()),
            Some(Code::ResourceExhausted)
        );
        // Fetches are bounded by their slots, not by rates.
        assert_eq!(
            rated(&mut c, 100, None, 1, Call::FetchBlocks { refs: 1 }),
            None
        );
    }

    #[test]
    fn an_authenticated_caller_is_rated_across_its_connections() {
        let mut c = limited();
        let peers = || Call::KnownPeers;
        assert_eq!(rated(&mut c, 0, Some(7), 1, peers()), None);
        assert_eq!(rated(&mut c, 0, Some(7), 2, peers()), None);
        // A third connection does not buy the same identity more.
        assert_eq!(
            rated(&mut c, 0, Some(7), 3, peers()),
            Some(Code::ResourceExhausted)
        );
        // 6 a minute: one more after 10 s.
        assert_eq!(
            rated(&mut c, 9_999, Some(7), 3, peers()),
            Some(Code::ResourceExhausted)
        );
        assert_eq!(rated(&mut c, 10_000, Some(7), 3, peers()), None);
        // GetKnownPeers and the cheap calls have separate allowances.
        assert_eq!(
            rated(&mut c, 10_000, Some(7), 3, Call::PushCommit { index: 1 }),
            None
        );
    }

    /// An address that opens a new connection for each call gets no fresh
    /// allowance with each: it has as many connections' worth as it may
    /// hold connections; another address has its own, within its
    /// network's, which is as many connections' worth as the network may
    /// hold.
    #[test]
    fn an_address_reconnecting_for_each_call_gets_its_connections_worth_and_no_more() {
        let mut c = GrpcAdapterCore::new(Init::from(Limits {
            known_peers_calls_per_minute: 6,
            known_peers_burst: 2,
            max_inbound_per_ip: 3,
            max_inbound_per_prefix: 4,
            ..Limits::default()
        }));
        let mut call = |now: u64, ip: [u8; 4], port: u16| {
            let ip = IpAddr::from(ip);
            let out = c.handle(
                Time(now),
                Input::Call {
                    id: now * 1_000 + u64::from(port),
                    caller: None,
                    connection: Some(SocketAddr::new(ip, port)),
                    origin: Some(ip),
                    call: Call::KnownPeers,
                    stalled: Vec::new(),
                },
            );
            code(out.last().unwrap().clone())
        };
        // Three connections' burst of two, each call on a new connection.
        let (first, neighbour) = ([203, 0, 113, 9], [203, 0, 113, 10]);
        for port in 1..=6 {
            assert_eq!(call(0, first, port), None, "call {port}");
        }
        assert_eq!(call(0, first, 7), Some(Code::ResourceExhausted));
        // Another address of the /24: the network's four connections'
        // worth, eight calls, of which six are gone.
        assert_eq!(call(0, neighbour, 1), None);
        assert_eq!(call(0, neighbour, 2), None);
        assert_eq!(call(0, neighbour, 3), Some(Code::ResourceExhausted));
        // Another network has its own.
        assert_eq!(call(0, [198, 51, 100, 1], 1), None);
        // Three connections' rate, 18 a minute: one more after 3,334 ms.
        assert_eq!(call(3_333, first, 8), Some(Code::ResourceExhausted));
        assert_eq!(call(3_334, first, 9), None);
    }

    #[test]
    fn the_rate_table_forgets_the_quietest_payers_first() {
        let mut c = GrpcAdapterCore::new(
            Limits {
                max_rate_limited: 8,
                cheap_call_burst: 1,
                ..Limits::default()
            }
            .into(),
        );
        let info = || Call::CommitInfo { index: None };
        let kept = |c: &GrpcAdapterCore| {
            let mut ports: Vec<u16> = c
                .buckets
                .keys()
                .filter_map(|(p, _)| match p {
                    Payer::Connection(a) => Some(a.port()),
                    Payer::Peer(_) | Payer::Address(_) | Payer::Network(_) => None,
                })
                .collect();
            ports.sort_unstable();
            ports
        };
        for port in 1..=8 {
            assert_eq!(rated(&mut c, u64::from(port), None, port, info()), None);
        }
        assert_eq!(kept(&c), (1..=8).collect::<Vec<_>>());
        // Past the bound: down to three quarters of it at once, the
        // quietest first; the next new payers fit without a pass.
        assert_eq!(rated(&mut c, 9, None, 9, info()), None);
        assert_eq!(kept(&c), vec![4, 5, 6, 7, 8, 9]);
        assert_eq!(rated(&mut c, 10, None, 10, info()), None);
        assert_eq!(rated(&mut c, 11, None, 11, info()), None);
        assert_eq!(kept(&c), vec![4, 5, 6, 7, 8, 9, 10, 11]);
        // Port 5 is still tracked and empty: refused.
        assert_eq!(
            rated(&mut c, 5, None, 5, info()),
            Some(Code::ResourceExhausted)
        );
    }

    /// Fetch `id` of `caller` from `host` at `now`; its slot is given
    /// back at once (so no slot cap is in the way). The refusal's message
    /// if refused.
    fn fetch_then_done(
        c: &mut GrpcAdapterCore,
        now: u64,
        id: u64,
        caller: u8,
        host: &str,
    ) -> Result<(), String> {
        let out = c.handle(
            Time(now),
            Input::Call {
                id,
                caller: Some(PeerId([caller; 32])),
                connection: None,
                origin: Some(ip(host)),
                call: Call::FetchCommits { start: 1, end: 1 },
                stalled: Vec::new(),
            },
        );
        c.handle(Time(now), Input::Done { id });
        match out.as_slice() {
            [Output::Admit { .. }] => Ok(()),
            [Output::Refuse { refusal, .. }] => {
                assert_eq!(refusal.code, Code::ResourceExhausted);
                Err(refusal.message.clone())
            }
            other => panic!("{other:?}"),
        }
    }

    /// A fetch of `caller` from `host` dropped unread at `now`.
    fn abandon(c: &mut GrpcAdapterCore, now: u64, caller: u8, host: &str) {
        let out = c.handle(
            Time(now),
            Input::Abandoned {
                caller: Some(PeerId([caller; 32])),
                origin: Some(ip(host)),
            },
        );
        assert_eq!(out, vec![]);
    }

    #[test]
    fn fetches_dropped_unread_use_up_the_allowance_of_their_caller_host_and_network() {
        // One dropped fetch every 10 s, three at once; a host holds two
        // callers at their cap (8 / 4), a network four (16 / 4).
        let mut c = GrpcAdapterCore::new(Init::from(Limits {
            abandoned_fetches_per_minute: 6,
            abandoned_fetch_burst: 3,
            max_concurrent_fetches_per_peer: 4,
            max_concurrent_fetches_per_host: 8,
            max_concurrent_fetches_per_network: 16,
            ..Limits::default()
        }));
        let message = |per_minute: u32| {
            format!(
                "too many fetches dropped before their answers were read: \
                 at most {per_minute} a minute may go unread"
            )
        };
        let (caller, host, network) = (message(6), message(12), message(24));
        // Fetches answered in full cost nothing, however many.
        for id in 0..50 {
            assert_eq!(fetch_then_done(&mut c, 0, id, 1, "10.0.0.1"), Ok(()));
        }
        // Caller 1 drops three: its own allowance is gone.
        for _ in 0..3 {
            abandon(&mut c, 0, 1, "10.0.0.1");
        }
        assert_eq!(
            fetch_then_done(&mut c, 0, 100, 1, "10.0.0.1"),
            Err(caller.clone())
        );
        // A fresh identity on the same host has the host's other half.
        assert_eq!(fetch_then_done(&mut c, 0, 101, 2, "10.0.0.1"), Ok(()));
        for _ in 0..3 {
            abandon(&mut c, 0, 2, "10.0.0.1");
        }
        assert_eq!(
            fetch_then_done(&mut c, 0, 102, 3, "10.0.0.1"),
            Err(host.clone())
        );
        // Refills: the host's 12 a minute give a token after 5 s, the
        // caller's own 6 after 10 s; a refusal takes nothing.
        assert_eq!(
            fetch_then_done(&mut c, 4_999, 103, 3, "10.0.0.1"),
            Err(host)
        );
        assert_eq!(fetch_then_done(&mut c, 5_000, 104, 3, "10.0.0.1"), Ok(()));
        assert_eq!(
            fetch_then_done(&mut c, 9_999, 105, 1, "10.0.0.1"),
            Err(caller)
        );
        assert_eq!(fetch_then_done(&mut c, 10_000, 106, 1, "10.0.0.1"), Ok(()));
        assert_eq!(fetch_then_done(&mut c, 10_000, 107, 1, "10.0.0.1"), Ok(()));

        // By then the network has 10 of its 12: two neighbours drop them.
        for (caller, neighbour) in [(4, "10.0.0.2"), (5, "10.0.0.3")] {
            for _ in 0..5 {
                abandon(&mut c, 10_000, caller, neighbour);
            }
        }
        // A host of the drained network that drops nothing is still
        // served; once it drops, the network refuses it, and it owes
        // what it dropped past the network's allowance.
        assert_eq!(fetch_then_done(&mut c, 10_000, 108, 6, "10.0.0.4"), Ok(()));
        for _ in 0..2 {
            abandon(&mut c, 10_000, 6, "10.0.0.4");
        }
        assert_eq!(
            fetch_then_done(&mut c, 10_000, 109, 7, "10.0.0.4"),
            Err(network.clone())
        );
        // Another network's callers are untouched.
        assert_eq!(fetch_then_done(&mut c, 10_000, 110, 8, "10.0.1.1"), Ok(()));
        // Two tokens owed and one to take: 3 tokens at 24 a minute.
        assert_eq!(
            fetch_then_done(&mut c, 17_499, 111, 7, "10.0.0.4"),
            Err(network)
        );
        assert_eq!(fetch_then_done(&mut c, 17_500, 112, 7, "10.0.0.4"), Ok(()));

        // Hosts taking turns, each quiet until it drops: the network
        // spares them down to its allowance owed once more, no further.
        for (i, fresh) in (20..26).enumerate() {
            let fresh = format!("10.0.0.{fresh}");
            assert_eq!(
                fetch_then_done(&mut c, 17_500, 113 + i as u64, 20 + i as u8, &fresh),
                Ok(())
            );
            for _ in 0..2 {
                abandon(&mut c, 17_500, 20 + i as u8, &fresh);
            }
        }
        // One token there, twelve dropped since: eleven owed.
        assert_eq!(
            fetch_then_done(&mut c, 17_500, 120, 30, "10.0.0.26"),
            Ok(())
        );
        abandon(&mut c, 17_500, 30, "10.0.0.26");
        assert_eq!(
            fetch_then_done(&mut c, 17_500, 121, 31, "10.0.0.27"),
            Err(message(24))
        );
    }
}
