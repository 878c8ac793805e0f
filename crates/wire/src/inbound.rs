//! Admission of inbound connections: how many, from where, for how long.
//!
//! tonic holds every connection it accepts, without a bound. A server made
//! with [`tls::incoming`](crate::tls::incoming) accepts through a
//! [`ConnectionLimit`] instead. Each accepted socket gets a slot, and the
//! slot lives inside the connection's IO type ([`Admitted`]), so it comes
//! back when the connection ends, however it ends (handshake failure or
//! timeout, client gone, eviction, server shut down).
//!
//! The rules ([`Config`]), checked when a socket is accepted, before the
//! TLS handshake:
//! - at most `max_per_ip` connections from one source address and
//!   `max_per_prefix` from one network (/24 in IPv4, /64 in IPv6, and four
//!   times that from one IPv6 /32), so one
//!   host or one subnet cannot take every slot;
//! - at most `max` in all. When all are taken, the connection of an
//!   ordinary caller that has been idle longest is closed to make room
//!   (anonymous callers first, then authenticated ones, then the oldest
//!   handshake still running); if there is none, the socket is reset.
//!
//! A connection is admitted provisionally; once its handshake proves who
//! calls, a caller the node reserves slots for (a committee member or an
//! allowlisted peer, see [`ConnectionLimit::reserve_for`]) keeps its slot,
//! while ordinary callers (anonymous or any other peer) may hold at most
//! `max - reserved` established connections between them: one past that
//! evicts the longest-idle ordinary connection or is closed itself.
//!
//! Time bounds: a handshake must finish within `handshake_timeout`, and a
//! connection that neither asks nor is answered for `idle_timeout` (no
//! HTTP/2 HEADERS or DATA frame either way: pings and window updates do
//! not count, see [`crate::activity`]) is closed, as is one whose calls
//! stall as long. "Longest idle" is by the same measure. The idle close
//! is graceful where the server is [`crate::serve`]'s and the client has
//! set up HTTP/2: the connection's server is told (`Watched::closing`) and
//! sends a GOAWAY, so that a request that crosses it is still answered,
//! and the connection is cut only if it is still open
//! `idle_drain_grace` later. One that never set up HTTP/2, or whose
//! server does not listen for the signal (plain tonic), is cut at once.
//! A drain asked while one is under way keeps the first one's grace.
//!
//! A refused socket is reset at once, before any TLS work: past a limit, a
//! connection costs the server one accept and one close. The decisions are
//! made by a plain state machine without sockets or clocks
//! ([`Rules`]); the socket side only feeds it addresses, identities and
//! times, and closes what it names.
//!
//! Accept errors never reach tonic-tls, which would end the accept loop on
//! one (and with it the server): an error about one connection is skipped,
//! and running out of file descriptors or memory pauses accepting for
//! 100 ms before trying again.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::io::{self, IoSlice};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use futures::Stream;
use futures::task::AtomicWaker;
use soma_types::PeerId;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Sleep;
use tonic::transport::server::{Connected, TcpConnectInfo, TcpIncoming};

use crate::backlog::SendBacklog;
use crate::tls::Caller;

/// The default bound: 64 times the peers a node dials by default, about
/// 15 MiB of idle connections, and below the common open-file limit of
/// 1,024 with room left for outbound connections and the store (see
/// `docs/operations.md`).
pub const DEFAULT_MAX_CONNECTIONS: usize = 512;

/// Default slots only reserved callers may use: room for a committee of
/// 64 to hold one connection each however many ordinary callers come.
pub const DEFAULT_RESERVED_CONNECTIONS: usize = 64;

/// Default connections from one address: a node dials a peer once, so a
/// few nodes behind one NAT fit; a single host cannot take more than 8 of
/// 512 slots.
pub const DEFAULT_MAX_PER_IP: usize = 8;

/// Default connections from one /24 or /64: a few hosts of one provider's
/// subnet; taking every unreserved slot needs 14 distinct networks.
pub const DEFAULT_MAX_PER_PREFIX: usize = 32;

/// Default time a client has to finish the TLS handshake: a handshake
/// takes two round trips, well under a second on any real link.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Default time without a request or an answer after which a connection
/// is closed: six times the request timeout, sixty height queries of a
/// connected peer.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Default of [`Config::idle_drain_grace`]: the request timeout's
/// default, so that a call that crossed the GOAWAY can end.
pub const DEFAULT_IDLE_DRAIN_GRACE: Duration = Duration::from_secs(10);

/// Default of [`Config::max_age`].
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(30 * 60);

/// Default of [`Config::max_age_grace`].
pub const DEFAULT_MAX_AGE_GRACE: Duration = Duration::from_secs(30);

/// At most one warning of each kind (connections refused, accepts failed)
/// per this interval; each refusal is also logged at debug level.
const WARN_INTERVAL: Duration = Duration::from_secs(10);

/// Connections refused (or accepts failed) in a row before the accept
/// loop lets other tasks run, so a flood cannot hold a runtime thread.
const ACCEPTS_PER_POLL: usize = 64;

/// Pause of accepting after an error that is not about one connection.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// The admission settings of a server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Connections open at once, handshakes included.
    pub max: usize,
    /// Of `max`, slots only reserved callers may hold (ordinary callers
    /// share `max - reserved`).
    pub reserved: usize,
    /// Connections from one source address.
    pub max_per_ip: usize,
    /// Connections from one /24 (IPv4) or /64 (IPv6); an IPv6 /32 holds
    /// [`IPV6_NETWORK_PREFIXES`] times as many.
    pub max_per_prefix: usize,
    /// Whether loopback callers (this host) skip the per-address and
    /// per-prefix caps: every node of a local test network shares
    /// 127.0.0.1. They hold slots as who they are, never reserved ones
    /// for being local.
    pub exempt_loopback: bool,
    /// Time allowed for the TLS handshake.
    pub handshake_timeout: Duration,
    /// Time without a request or an answer (an HTTP/2 HEADERS or DATA
    /// frame either way) after which a connection is closed.
    pub idle_timeout: Duration,
    /// How long a connection found idle, or closed at the server's
    /// shutdown, may take to close itself once its server is told
    /// ([`crate::serve`]): its GOAWAY sent, and the calls that crossed it
    /// answered. Then it is cut. At the shutdown, the server's own stop
    /// grace applies if shorter, to every connection, those closing
    /// already included.
    pub idle_drain_grace: Duration,
    /// Age at which [`crate::serve`] closes a connection gracefully (a
    /// GOAWAY), so that its client reconnects, perhaps elsewhere.
    pub max_age: Duration,
    /// How long a connection closed for its age may take to close
    /// itself. Then it is cut.
    pub max_age_grace: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max: DEFAULT_MAX_CONNECTIONS,
            reserved: DEFAULT_RESERVED_CONNECTIONS,
            max_per_ip: DEFAULT_MAX_PER_IP,
            max_per_prefix: DEFAULT_MAX_PER_PREFIX,
            exempt_loopback: true,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            idle_drain_grace: DEFAULT_IDLE_DRAIN_GRACE,
            max_age: DEFAULT_MAX_AGE,
            max_age_grace: DEFAULT_MAX_AGE_GRACE,
        }
    }
}

impl Config {
    /// At most `max` connections, and no other cap: no reserved slots, no
    /// per-address or per-prefix cap, default timeouts.
    pub fn only_max(max: usize) -> Self {
        Config {
            max,
            reserved: 0,
            max_per_ip: max,
            max_per_prefix: max,
            exempt_loopback: false,
            ..Config::default()
        }
    }
}

/// Why a connection was refused or closed by the rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Its source address already had `max_per_ip` connections.
    #[error("too many connections from this address")]
    PerIp,
    /// Its /24 or /64 already had `max_per_prefix` connections (or its
    /// IPv6 /32 four times that).
    #[error("too many connections from this network")]
    PerPrefix,
    /// All `max` slots were taken and none could be freed.
    #[error("no connection slot left")]
    Full,
    /// After the handshake: an ordinary caller, with every unreserved
    /// slot held by established connections and none to evict.
    #[error("no unreserved connection slot left")]
    Unreserved,
}

/// What happened to inbound connections so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Sockets given a slot at accept.
    pub admitted: u64,
    /// Refused at accept: source address at `max_per_ip`.
    pub refused_per_ip: u64,
    /// Refused at accept: network at `max_per_prefix`.
    pub refused_per_prefix: u64,
    /// Refused at accept: `max` reached and nothing to evict.
    pub refused_full: u64,
    /// Closed after the handshake: an ordinary caller with no unreserved
    /// slot free and nothing to evict.
    pub refused_unreserved: u64,
    /// Connections closed to make room for another.
    pub evicted: u64,
    /// Connections whose handshake did not finish in time.
    pub handshake_timeouts: u64,
    /// Connections closed for being idle.
    pub idle_closed: u64,
    /// Connections told to close (a GOAWAY, when idle or at the server's
    /// shutdown) and still open `idle_drain_grace` later: cut.
    pub cut_after_grace: u64,
}

impl Counts {
    /// Refusals of every reason.
    pub fn refused(&self) -> u64 {
        self.refused_per_ip + self.refused_per_prefix + self.refused_full + self.refused_unreserved
    }

    fn refuse(&mut self, refusal: Refusal) {
        *match refusal {
            Refusal::PerIp => &mut self.refused_per_ip,
            Refusal::PerPrefix => &mut self.refused_per_prefix,
            Refusal::Full => &mut self.refused_full,
            Refusal::Unreserved => &mut self.refused_unreserved,
        } += 1;
    }
}

/// A connection's number, unique for the life of its [`ConnectionLimit`].
pub type ConnId = u64;

/// Where a connection stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Class {
    /// Admitted at accept, handshake still running.
    Handshake,
    /// Established, caller without an identity.
    Anonymous,
    /// Established, a peer without reserved slots.
    Peer,
    /// Established, a caller with reserved slots.
    Reserved,
}

#[derive(Clone, Debug)]
struct Entry {
    /// The source and its network, `None` for an exempt loopback caller.
    source: Option<(IpAddr, IpAddr)>,
    /// The source's IPv6 /32, if it is one and not exempt.
    network: Option<Ipv6Addr>,
    class: Class,
    accepted: Instant,
}

/// The admission rules as a state machine: no sockets, no clock. Times
/// come in as arguments; so does each connection's last activity, which
/// the IO side measures.
#[derive(Debug)]
pub struct Rules {
    config: Config,
    reserved_for: HashSet<PeerId>,
    entries: HashMap<ConnId, Entry>,
    per_ip: HashMap<IpAddr, usize>,
    per_prefix: HashMap<IpAddr, usize>,
    per_network: HashMap<Ipv6Addr, usize>,
    /// Established connections of ordinary callers.
    ordinary: usize,
    next: ConnId,
    counts: Counts,
}

/// A socket admitted by [`Rules::admit`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Admit {
    /// The new connection.
    pub id: ConnId,
    /// The connection closed to make room, if any.
    pub evicted: Option<ConnId>,
}

impl Rules {
    /// No connection yet, no caller with reserved slots.
    pub fn new(config: Config) -> Self {
        Rules {
            config,
            reserved_for: HashSet::new(),
            entries: HashMap::new(),
            per_ip: HashMap::new(),
            per_prefix: HashMap::new(),
            per_network: HashMap::new(),
            ordinary: 0,
            next: 0,
            counts: Counts::default(),
        }
    }

    /// The settings.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Replaces the peers that may use reserved slots. Connections already
    /// established keep their class.
    pub fn reserve_for(&mut self, peers: impl IntoIterator<Item = PeerId>) {
        self.reserved_for = peers.into_iter().collect();
    }

    /// How many peers may use reserved slots.
    pub fn reserved_peers(&self) -> usize {
        self.reserved_for.len()
    }

    /// Connections holding a slot, handshakes included.
    pub fn open(&self) -> usize {
        self.entries.len()
    }

    /// The counts so far.
    pub fn counts(&self) -> Counts {
        self.counts
    }

    /// A socket from `ip` was accepted at `now`: admits it (possibly
    /// evicting another connection, which the caller must close) or says
    /// why not. `last_active` gives each open connection's last read or
    /// write.
    pub fn admit(
        &mut self,
        now: Instant,
        ip: IpAddr,
        last_active: impl Fn(ConnId) -> Instant,
    ) -> Result<Admit, Refusal> {
        let result = self.try_admit(now, ip, last_active);
        match result {
            Ok(Admit { evicted, .. }) => {
                self.counts.admitted += 1;
                self.counts.evicted += u64::from(evicted.is_some());
            }
            Err(refusal) => self.counts.refuse(refusal),
        }
        result
    }

    fn try_admit(
        &mut self,
        now: Instant,
        ip: IpAddr,
        last_active: impl Fn(ConnId) -> Instant,
    ) -> Result<Admit, Refusal> {
        let ip = ip.to_canonical();
        let exempt = self.config.exempt_loopback && ip.is_loopback();
        let source = (!exempt).then(|| (ip, prefix(ip)));
        let network = source.and_then(|(ip, _)| ipv6_network(ip));
        if let Some((ip, prefix)) = source {
            if self.per_ip.get(&ip).copied().unwrap_or(0) >= self.config.max_per_ip {
                return Err(Refusal::PerIp);
            }
            if self.per_prefix.get(&prefix).copied().unwrap_or(0) >= self.config.max_per_prefix {
                return Err(Refusal::PerPrefix);
            }
        }
        if let Some(network) = network {
            let most = self
                .config
                .max_per_prefix
                .saturating_mul(IPV6_NETWORK_PREFIXES);
            if self.per_network.get(&network).copied().unwrap_or(0) >= most {
                return Err(Refusal::PerPrefix);
            }
        }
        let mut evicted = None;
        if self.entries.len() >= self.config.max {
            let victim = self
                .victim(&last_active)
                .or_else(|| self.oldest_handshake())
                .ok_or(Refusal::Full)?;
            self.release(victim);
            evicted = Some(victim);
        }
        let id = self.next;
        self.next += 1;
        if let Some((ip, prefix)) = source {
            *self.per_ip.entry(ip).or_default() += 1;
            *self.per_prefix.entry(prefix).or_default() += 1;
        }
        if let Some(network) = network {
            *self.per_network.entry(network).or_default() += 1;
        }
        self.entries.insert(
            id,
            Entry {
                source,
                network,
                class: Class::Handshake,
                accepted: now,
            },
        );
        Ok(Admit { id, evicted })
    }

    /// The handshake of `id` proved `caller`. A reserved caller keeps its
    /// slot; an ordinary one keeps it if an
    /// unreserved slot is free or can be freed by evicting the
    /// longest-idle ordinary connection (returned, for the caller to
    /// close). On refusal, `id` is released.
    pub fn identify(
        &mut self,
        id: ConnId,
        caller: Caller,
        last_active: impl Fn(ConnId) -> Instant,
    ) -> Result<Option<ConnId>, Refusal> {
        if !self.entries.contains_key(&id) {
            // Evicted during its handshake.
            return Err(Refusal::Full);
        }
        let class = match caller {
            // An exempt loopback caller skipped the address caps only: it
            // holds a slot as who it is, so a local proxy carrying remote
            // callers cannot fill the slots kept for the committee.
            Caller::Peer(peer) if self.reserved_for.contains(&peer) => Class::Reserved,
            Caller::Peer(_) => Class::Peer,
            Caller::Anonymous => Class::Anonymous,
        };
        let mut evicted = None;
        if class != Class::Reserved
            && self.ordinary >= self.config.max.saturating_sub(self.config.reserved)
        {
            match self.victim(&last_active) {
                Some(victim) => {
                    self.release(victim);
                    self.counts.evicted += 1;
                    evicted = Some(victim);
                }
                None => {
                    self.release(id);
                    self.counts.refuse(Refusal::Unreserved);
                    return Err(Refusal::Unreserved);
                }
            }
        }
        if class != Class::Reserved {
            self.ordinary += 1;
        }
        if let Some(entry) = self.entries.get_mut(&id) {
            entry.class = class;
        }
        Ok(evicted)
    }

    /// Whether connection `id` is established with reserved slots: its
    /// caller is a committee member or allowlisted.
    pub fn reserved(&self, id: ConnId) -> bool {
        self.entries
            .get(&id)
            .is_some_and(|e| e.class == Class::Reserved)
    }

    /// Whether connection `id` is an exempt loopback caller's: it skipped
    /// the address caps.
    pub fn exempt(&self, id: ConnId) -> bool {
        self.entries.get(&id).is_some_and(|e| e.source.is_none())
    }

    /// A handshake did not finish in time (its connection is released
    /// when dropped).
    pub fn handshake_timed_out(&mut self) {
        self.counts.handshake_timeouts += 1;
    }

    /// A connection was closed for being idle.
    pub fn idle_closed(&mut self) {
        self.counts.idle_closed += 1;
    }

    /// A connection told to close was still open a grace later: cut.
    pub fn cut_after_grace(&mut self) {
        self.counts.cut_after_grace += 1;
    }

    /// Connection `id` ended: its slot and counts come back. Releasing a
    /// connection already released (evicted, refused) does nothing.
    pub fn release(&mut self, id: ConnId) {
        let Some(entry) = self.entries.remove(&id) else {
            return;
        };
        if matches!(entry.class, Class::Anonymous | Class::Peer) {
            self.ordinary -= 1;
        }
        if let Some((ip, prefix)) = entry.source {
            decrement(&mut self.per_ip, ip);
            decrement(&mut self.per_prefix, prefix);
        }
        if let Some(network) = entry.network {
            decrement(&mut self.per_network, network);
        }
    }

    /// The established ordinary connection to close first: anonymous
    /// before authenticated, then longest idle, then oldest id.
    fn victim(&self, last_active: &impl Fn(ConnId) -> Instant) -> Option<ConnId> {
        self.entries
            .iter()
            .filter(|(_, e)| matches!(e.class, Class::Anonymous | Class::Peer))
            .min_by_key(|&(&id, e)| (e.class == Class::Peer, last_active(id), id))
            .map(|(&id, _)| id)
    }

    /// The handshake running longest: an honest one takes a few round
    /// trips, so the oldest is the likeliest to be stalling.
    fn oldest_handshake(&self) -> Option<ConnId> {
        self.entries
            .iter()
            .filter(|(_, e)| e.class == Class::Handshake)
            .min_by_key(|&(&id, e)| (e.accepted, id))
            .map(|(&id, _)| id)
    }
}

fn decrement<K: std::hash::Hash + Eq>(counts: &mut HashMap<K, usize>, key: K) {
    if let Some(n) = counts.get_mut(&key) {
        *n -= 1;
        if *n == 0 {
            counts.remove(&key);
        }
    }
}

/// Leading bits of an IPv6 address that name one subscriber's LAN: what
/// [`Config::max_per_prefix`] counts, as it counts an IPv4 /24.
pub const IPV6_PREFIX_BITS: u32 = 64;

/// Leading bits of an IPv6 address that name its network: a /32, as
/// Bitcoin's address manager groups IPv6. Discovery buckets known peers by
/// it; here a /32 holds at most [`IPV6_NETWORK_PREFIXES`] times
/// `max_per_prefix` connections. One subscriber holds hundreds of /64s (a
/// /56 is 256, a tunnel broker's free /48 65,536): counted by /64 alone,
/// one IPv6 customer took every unreserved slot. Counted by /32 alone, one
/// server rented from a provider would shut out every other node of that
/// provider, the refusal coming before the handshake tells who calls.
pub const IPV6_NETWORK_BITS: u32 = 32;

/// How many /64s' worth of connections one IPv6 /32 may hold.
pub const IPV6_NETWORK_PREFIXES: usize = 4;

/// Leading bits of an IPv6 address that name one host as fetch slots count
/// it within a network: a /48, the most one site is commonly given (a
/// tunnel broker gives one for free). A /64 would let one subscriber's /56
/// count as 256 hosts.
pub const IPV6_HOST_BITS: u32 = 48;

/// Leading bits of an IPv4 address that name its network: a /24.
pub const IPV4_NETWORK_BITS: u32 = 24;

/// The network of `ip` that a server's fetch slots count (its /24 in IPv4,
/// its /32 in IPv6, as Discovery buckets addresses; an IPv4-mapped address
/// counting as IPv4). Coarser than [`prefix`] for IPv6: fetch slots are
/// counted after the handshake, with committee members and allowlisted
/// peers apart, so a provider's /32 costs no member its place, and a
/// subscriber's many /64s buy no more.
pub fn network(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(_) => prefix(ip),
        IpAddr::V6(v6) => IpAddr::V6(ipv6_masked(v6, IPV6_NETWORK_BITS)),
    }
}

/// The host of `ip`, as fetch slots count it within a network: the address
/// itself in IPv4, its /48 in IPv6 (see [`IPV6_HOST_BITS`]), an
/// IPv4-mapped address counting as IPv4. [`network`] of a host is the
/// network of each of its addresses.
pub fn host(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => IpAddr::V6(ipv6_masked(v6, IPV6_HOST_BITS)),
    }
}

/// The network of `ip` that [`Config::max_per_prefix`] counts: its /24 in
/// IPv4, its /64 in IPv6 (an IPv4-mapped address counting as IPv4).
pub fn prefix(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(v4) => {
            let mask = u32::MAX << (32 - IPV4_NETWORK_BITS);
            IpAddr::V4(Ipv4Addr::from_bits(v4.to_bits() & mask))
        }
        IpAddr::V6(v6) => IpAddr::V6(ipv6_masked(v6, IPV6_PREFIX_BITS)),
    }
}

/// The /32 of an IPv6 `ip` (not IPv4-mapped), which holds at most
/// [`IPV6_NETWORK_PREFIXES`] times `max_per_prefix` connections.
pub fn ipv6_network(ip: IpAddr) -> Option<Ipv6Addr> {
    match ip.to_canonical() {
        IpAddr::V4(_) => None,
        IpAddr::V6(v6) => Some(ipv6_masked(v6, IPV6_NETWORK_BITS)),
    }
}

fn ipv6_masked(v6: Ipv6Addr, bits: u32) -> Ipv6Addr {
    Ipv6Addr::from_bits(v6.to_bits() & (u128::MAX << (128 - bits)))
}

/// The admission of a server's inbound connections (see the module docs),
/// with counts of what it let in, refused and closed. Clones share the
/// slots and the counts.
#[derive(Clone, Debug)]
pub struct ConnectionLimit {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    config: Config,
    /// The zero of every connection's activity clock.
    base: Instant,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    rules: Rules,
    /// The live half of each admitted connection, to read its activity
    /// and close it.
    conns: HashMap<ConnId, Arc<Activity>>,
}

impl Default for ConnectionLimit {
    fn default() -> Self {
        ConnectionLimit::with_config(Config::default())
    }
}

impl ConnectionLimit {
    /// At most `max` connections open at once (0 refuses every one), and
    /// no other cap ([`Config::only_max`]).
    pub fn new(max: usize) -> Self {
        ConnectionLimit::with_config(Config::only_max(max))
    }

    /// Admission by `config`.
    pub fn with_config(config: Config) -> Self {
        ConnectionLimit {
            shared: Arc::new(Shared {
                config: config.clone(),
                base: Instant::now(),
                state: Mutex::new(State {
                    rules: Rules::new(config),
                    conns: HashMap::new(),
                }),
            }),
        }
    }

    /// The settings.
    pub fn config(&self) -> &Config {
        &self.shared.config
    }

    /// The bound on open connections.
    pub fn max(&self) -> usize {
        self.shared.config.max
    }

    /// Replaces the peers that may use reserved slots (committee members,
    /// allowlisted peers); connections already established keep theirs.
    pub fn reserve_for(&self, peers: impl IntoIterator<Item = PeerId>) {
        self.lock().rules.reserve_for(peers);
    }

    /// How many peers may use reserved slots now.
    pub fn reserved_peers(&self) -> usize {
        self.lock().rules.reserved_peers()
    }

    /// Connections open now, handshakes in progress included.
    pub fn open(&self) -> usize {
        self.lock().rules.open()
    }

    /// Connections refused so far, every reason together.
    pub fn refused(&self) -> u64 {
        self.counts().refused()
    }

    /// Everything counted so far.
    pub fn counts(&self) -> Counts {
        self.lock().rules.counts()
    }

    /// Answer bytes handed to HTTP/2 and not yet written, over every open
    /// connection (see [`crate::backlog`]).
    pub fn unwritten_bytes(&self) -> u64 {
        // Read outside the limit's lock, which admissions take.
        let backlogs: Vec<_> = self
            .lock()
            .conns
            .values()
            .map(|a| a.backlog.clone())
            .collect();
        backlogs.iter().map(|b| b.unwritten()).sum()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.shared
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Admits `stream`, from `ip`, or says why not.
    fn admit(&self, stream: TcpStream, ip: IpAddr) -> Result<Admitted, (TcpStream, Refusal)> {
        let now = Instant::now();
        let mut state = self.lock();
        let State { rules, conns } = &mut *state;
        let admit = match rules.admit(now, ip, |id| self.last_active(conns, id)) {
            Ok(admit) => admit,
            Err(refusal) => return Err((stream, refusal)),
        };
        close(conns, admit.evicted);
        let activity = Arc::new(Activity {
            last_ms: AtomicU64::new(self.now_ms()),
            ..Activity::default()
        });
        conns.insert(admit.id, activity.clone());
        drop(state);
        let deadline = now + self.shared.config.idle_timeout;
        Ok(Admitted {
            stream,
            idle: Box::pin(tokio::time::sleep_until(deadline.into())),
            caller: OnceLock::new(),
            slot: Slot {
                id: admit.id,
                limit: self.clone(),
                activity,
            },
        })
    }

    /// The handshake of `id` proved `caller`; see [`Rules::identify`].
    fn identify(&self, id: ConnId, caller: Caller) -> Result<(), Refusal> {
        let mut state = self.lock();
        let State { rules, conns } = &mut *state;
        let evicted = rules.identify(id, caller, |id| self.last_active(conns, id))?;
        close(conns, evicted);
        Ok(())
    }

    /// Counts a handshake that did not finish in time.
    pub(crate) fn handshake_timed_out(&self) {
        self.lock().rules.handshake_timed_out();
    }

    fn last_active(&self, conns: &HashMap<ConnId, Arc<Activity>>, id: ConnId) -> Instant {
        let ms = conns
            .get(&id)
            .map_or(0, |a| a.last_ms.load(Ordering::Relaxed));
        self.shared.base + Duration::from_millis(ms)
    }

    fn now_ms(&self) -> u64 {
        self.shared.base.elapsed().as_millis() as u64
    }
}

/// Closes the connection `id`, if any: its IO fails at the next poll.
fn close(conns: &mut HashMap<ConnId, Arc<Activity>>, id: Option<ConnId>) {
    if let Some(activity) = id.and_then(|id| conns.remove(&id)) {
        activity.closed.store(true, Ordering::Release);
        activity.waker.wake();
    }
}

/// What the IO side of a connection shares with its [`ConnectionLimit`].
#[derive(Debug, Default)]
struct Activity {
    /// Last request or answer (see [`crate::activity`]), or the
    /// admission, in ms since [`Shared::base`].
    last_ms: AtomicU64,
    /// Set to close the connection.
    closed: AtomicBool,
    /// The connection's task, woken when `closed` is set.
    waker: AtomicWaker,
    /// Set once the client's first HTTP/2 frame came: from then on its
    /// server can close it gracefully.
    framed: AtomicBool,
    /// Set once its server listens for the idle close ([`crate::serve`]):
    /// found idle, it is closed gracefully rather than cut.
    graceful: AtomicBool,
    /// Set once the connection is to close (found idle, or its server told
    /// to close it): it is cut a grace later.
    draining: AtomicBool,
    /// A grace in milliseconds, set by its server to have it close
    /// ([`Drainer::drain`]); read and cleared by the connection's task.
    drain_asked_ms: AtomicU64,
    /// Set once the connection is closed (its slot given back).
    gone: AtomicBool,
    /// Wakes those waiting for `draining` or `gone`
    /// ([`Toucher::closing`]).
    drain: tokio::sync::Notify,
    /// Its answers' bytes handed to HTTP/2 and not yet written.
    backlog: Arc<SendBacklog>,
}

/// Marks a connection active: it asked for something or was answered.
#[derive(Debug)]
pub(crate) struct Toucher {
    activity: Arc<Activity>,
    limit: ConnectionLimit,
}

impl Toucher {
    /// The connection is active now.
    pub(crate) fn touch(&self) {
        let now = self.limit.now_ms();
        self.activity.last_ms.store(now, Ordering::Relaxed);
    }

    /// The connection wrote `data` bytes of DATA frames (see
    /// [`crate::backlog`]); its socket took the write.
    pub(crate) fn wrote(&self, data: u64) {
        let data = usize::try_from(data).unwrap_or(usize::MAX);
        self.activity
            .backlog
            .wrote(data, tokio::time::Instant::now());
    }

    /// The connection's socket is full.
    pub(crate) fn blocked(&self) {
        self.activity.backlog.blocked();
    }

    /// The client's HTTP/2 connection is set up.
    pub(crate) fn framed(&self) {
        self.activity.framed.store(true, Ordering::Release);
    }

    /// Ready once the connection was found idle (its server is to close
    /// it gracefully within [`Config::idle_drain_grace`], after which it
    /// is cut) or is closed. Asking for it makes the idle close graceful;
    /// otherwise an idle connection is cut at once.
    pub(crate) fn closing(&self) -> impl Future<Output = ()> + Send + 'static {
        self.activity.graceful.store(true, Ordering::Release);
        let activity = self.activity.clone();
        async move {
            loop {
                let notified = activity.drain.notified();
                tokio::pin!(notified);
                // Registered before the flag is read: no wake-up is lost.
                notified.as_mut().enable();
                if activity.draining.load(Ordering::Acquire)
                    || activity.gone.load(Ordering::Acquire)
                {
                    return;
                }
                notified.await;
            }
        }
    }
}

/// The longest grace a drain is given.
const LONGEST_GRACE: Duration = Duration::from_secs(365 * 86_400);

/// Tells a connection that its server is closing it gracefully: it is
/// cut if still open a grace later.
#[derive(Debug)]
pub struct Drainer {
    activity: Arc<Activity>,
    config: Config,
}

impl Drainer {
    /// The connection is to close: cut if still open `grace` from now, or
    /// at the cut an earlier call set, if sooner.
    pub fn drain(&self, grace: Duration) {
        let ms = u64::try_from(grace.as_millis()).unwrap_or(u64::MAX).max(1);
        // Two asked before the connection reads them: the shorter holds.
        let _ = self.activity.drain_asked_ms.fetch_update(
            Ordering::AcqRel,
            Ordering::Acquire,
            |asked| Some(if asked == 0 { ms } else { asked.min(ms) }),
        );
        // Its task reads the request at its next poll.
        self.activity.waker.wake();
    }

    /// The settings of the connection's limit.
    pub fn config(&self) -> &Config {
        &self.config
    }
}

impl Toucher {
    /// What closes the connection gracefully from its server's side.
    pub(crate) fn drainer(&self) -> Drainer {
        Drainer {
            activity: self.activity.clone(),
            config: self.limit.shared.config.clone(),
        }
    }
}

/// A connection's slot, given back when dropped.
#[derive(Debug)]
struct Slot {
    id: ConnId,
    limit: ConnectionLimit,
    activity: Arc<Activity>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut state = self.limit.lock();
        state.rules.release(self.id);
        state.conns.remove(&self.id);
        drop(state);
        // Whoever waits for it to close learns it is gone.
        self.activity.gone.store(true, Ordering::Release);
        self.activity.drain.notify_waiters();
    }
}

/// An accepted TCP connection holding its slot of a [`ConnectionLimit`]
/// until it is dropped. Its reads and writes fail once it was idle for the
/// idle timeout or was evicted.
#[derive(Debug)]
pub struct Admitted {
    stream: TcpStream,
    slot: Slot,
    /// Fires at the earliest time the connection may be idle too long.
    idle: Pin<Box<Sleep>>,
    /// Who the handshake proved, once it did, and whether the connection
    /// holds a reserved slot; every request on the connection reads them
    /// from [`ConnInfo`] instead of parsing the certificate again.
    caller: OnceLock<(Caller, bool)>,
}

/// What the handlers learn about the connection a request came on: the
/// socket's addresses and the caller its handshake proved.
#[derive(Clone, Debug)]
pub struct ConnInfo {
    /// The socket's addresses.
    pub tcp: TcpConnectInfo,
    /// The caller, `None` before the handshake proved one.
    pub caller: Option<Caller>,
    /// Whether the per-host and per-network caps skip its caller, as of
    /// its handshake: it holds a reserved slot (a committee member or an
    /// allowlisted peer) or is an exempt loopback caller.
    pub uncapped: bool,
    /// Its answers' bytes handed to HTTP/2 and not yet written.
    pub backlog: Arc<SendBacklog>,
}

impl Admitted {
    /// The handshake proved `caller`: keeps the slot or says why not.
    pub(crate) fn identify(&self, caller: Caller) -> Result<(), Refusal> {
        self.slot.limit.identify(self.slot.id, caller)?;
        let rules = &self.slot.limit.lock().rules;
        let uncapped = rules.reserved(self.slot.id) || rules.exempt(self.slot.id);
        // Set once, by the one handshake of this connection.
        self.caller.get_or_init(|| (caller, uncapped));
        Ok(())
    }

    /// What marks the connection active (see [`crate::activity`]).
    pub(crate) fn toucher(&self) -> Toucher {
        Toucher {
            activity: self.slot.activity.clone(),
            limit: self.slot.limit.clone(),
        }
    }

    /// Ready with an error once the connection is to be closed: evicted,
    /// idle for the idle timeout (at once if it cannot be closed
    /// gracefully), or still open a grace after it was told to close.
    /// Registers the task to learn any of them.
    fn poll_closed(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        let activity = &self.slot.activity;
        activity.waker.register(cx.waker());
        let limit = &self.slot.limit;
        // Told to close by its server ([`Drainer`]): cut after the grace.
        // Told again while it closes already (found idle, or at its age),
        // the earlier cut holds: the server's stop shortens a long grace.
        let asked_ms = activity.drain_asked_ms.swap(0, Ordering::AcqRel);
        if asked_ms > 0 {
            // A year at most: an `Instant` past the clock's range panics.
            let grace = Duration::from_millis(asked_ms).min(LONGEST_GRACE);
            let cut_at = tokio::time::Instant::from(Instant::now()) + grace;
            if !activity.draining.swap(true, Ordering::AcqRel) {
                activity.drain.notify_waiters();
                self.idle.as_mut().reset(cut_at);
            } else if cut_at < self.idle.deadline() {
                self.idle.as_mut().reset(cut_at);
            }
        }
        loop {
            if activity.closed.load(Ordering::Acquire) {
                return Poll::Ready(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    "connection closed to free its slot",
                ));
            }
            ready!(self.idle.as_mut().poll(cx));
            if activity.draining.load(Ordering::Acquire) {
                // Told to close, and still open after the grace: cut.
                activity.closed.store(true, Ordering::Release);
                limit.lock().rules.cut_after_grace();
                tracing::debug!(
                    id = self.slot.id,
                    "closing inbound connection still open; cut"
                );
                return Poll::Ready(io::Error::new(io::ErrorKind::TimedOut, "not closed"));
            }
            let last =
                limit.shared.base + Duration::from_millis(activity.last_ms.load(Ordering::Relaxed));
            let deadline = last + limit.shared.config.idle_timeout;
            let now = Instant::now();
            if now < deadline {
                self.idle.as_mut().reset(deadline.into());
                continue;
            }
            limit.lock().rules.idle_closed();
            let graceful = activity.graceful.load(Ordering::Acquire)
                && activity.framed.load(Ordering::Acquire);
            if !graceful {
                // No server to send a GOAWAY, or no HTTP/2 set up (no
                // request can cross the close): cut at once.
                activity.closed.store(true, Ordering::Release);
                tracing::debug!(id = self.slot.id, "inbound connection idle; closed");
                return Poll::Ready(io::Error::new(io::ErrorKind::TimedOut, "idle"));
            }
            // Its server sends a GOAWAY and closes it once the calls that
            // crossed it are answered; cut after the grace.
            activity.draining.store(true, Ordering::Release);
            activity.drain.notify_waiters();
            tracing::debug!(id = self.slot.id, "inbound connection idle; closing");
            let grace = limit.shared.config.idle_drain_grace;
            self.idle.as_mut().reset((now + grace).into());
        }
    }

    /// `result` of the stream, or the reason to close if it is pending.
    fn or_closed<T>(
        &mut self,
        cx: &mut Context<'_>,
        result: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        match result {
            Poll::Pending => self.poll_closed(cx).map(Err),
            ready => ready,
        }
    }

    fn closed_now(&self) -> Option<io::Error> {
        self.slot
            .activity
            .closed
            .load(Ordering::Acquire)
            .then(|| io::Error::new(io::ErrorKind::ConnectionAborted, "connection closed"))
    }
}

impl Connected for Admitted {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        ConnInfo {
            tcp: self.stream.connect_info(),
            caller: self.caller.get().map(|(caller, _)| *caller),
            uncapped: self.caller.get().is_some_and(|(_, uncapped)| *uncapped),
            backlog: self.slot.activity.backlog.clone(),
        }
    }
}

impl AsyncRead for Admitted {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(error) = this.closed_now() {
            return Poll::Ready(Err(error));
        }
        let result = Pin::new(&mut this.stream).poll_read(cx, buf);
        this.or_closed(cx, result)
    }
}

impl AsyncWrite for Admitted {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(error) = this.closed_now() {
            return Poll::Ready(Err(error));
        }
        let result = Pin::new(&mut this.stream).poll_write(cx, buf);
        this.or_closed(cx, result)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(error) = this.closed_now() {
            return Poll::Ready(Err(error));
        }
        let result = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        this.or_closed(cx, result)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// The TCP connections of a listener that `limit` admitted; the others are
/// reset as soon as they are accepted.
pub(crate) struct Admission {
    tcp: TcpIncoming,
    limit: ConnectionLimit,
    /// After an accept error not about one connection, accepting resumes
    /// when this ends.
    pause: Option<Pin<Box<Sleep>>>,
    refusals: Warning,
    accept_errors: Warning,
}

impl Admission {
    pub(crate) fn new(tcp: TcpIncoming, limit: ConnectionLimit) -> Self {
        Admission {
            tcp,
            limit,
            pause: None,
            refusals: Warning::default(),
            accept_errors: Warning::default(),
        }
    }

    fn refuse(&mut self, stream: TcpStream, refusal: Refusal) {
        let peer = stream.peer_addr().ok();
        // A reset rather than a close: the client learns at once, and the
        // server keeps no TIME_WAIT state for it.
        let _ = stream.set_zero_linger();
        drop(stream);
        tracing::debug!(?peer, %refusal, "inbound connection refused");
        if let Some(refused) = self.refusals.due() {
            tracing::warn!(
                refused,
                last = %refusal,
                max = self.limit.max(),
                "inbound connections refused"
            );
        }
    }

    /// An accept failed. If it is about the connection (the client gave up
    /// first), the next one is accepted at once. Otherwise (out of file
    /// descriptors or memory) the connection stays queued and accepting it
    /// again at once would fail again, so accepting pauses; the server
    /// keeps running either way.
    fn accept_failed(&mut self, error: io::Error) {
        use io::ErrorKind::*;
        if matches!(
            error.kind(),
            ConnectionAborted | ConnectionReset | BrokenPipe | Interrupted | WouldBlock | TimedOut
        ) {
            tracing::debug!(%error, "accept failed");
            return;
        }
        if let Some(failures) = self.accept_errors.due() {
            tracing::warn!(%error, failures, "accepting inbound connections failed; pausing");
        }
        self.pause = Some(Box::pin(tokio::time::sleep(ACCEPT_ERROR_PAUSE)));
    }
}

impl Stream for Admission {
    type Item = io::Result<Admitted>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        for _ in 0..ACCEPTS_PER_POLL {
            if let Some(pause) = &mut this.pause {
                ready!(pause.as_mut().poll(cx));
                this.pause = None;
            }
            match ready!(Pin::new(&mut this.tcp).poll_next(cx)) {
                None => return Poll::Ready(None),
                Some(Err(error)) => this.accept_failed(error),
                Some(Ok(stream)) => {
                    let Ok(peer) = stream.peer_addr() else {
                        // The client is already gone: nothing to admit.
                        continue;
                    };
                    match this.limit.admit(stream, peer.ip()) {
                        Ok(admitted) => return Poll::Ready(Some(Ok(admitted))),
                        Err((stream, refusal)) => this.refuse(stream, refusal),
                    }
                }
            }
        }
        // Only refusals and failures so far: let other tasks run.
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

impl tonic_tls::Incoming for Admission {
    type Io = Admitted;
    type Error = io::Error;
}

/// A warning logged at most once per [`WARN_INTERVAL`], counting the
/// occurrences in between.
#[derive(Default)]
struct Warning {
    last: Option<Instant>,
    since: u64,
}

impl Warning {
    /// Counts one occurrence; returns how many there were since the last
    /// warning if one is due now.
    fn due(&mut self) -> Option<u64> {
        self.since += 1;
        if self.last.is_some_and(|at| at.elapsed() < WARN_INTERVAL) {
            return None;
        }
        self.last = Some(Instant::now());
        Some(std::mem::take(&mut self.since))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use soma_types::KeyPair;

    /// A fixed clock start; times in the tests are offsets from it.
    fn t0() -> Instant {
        static T0: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        *T0.get_or_init(Instant::now)
    }

    fn at(s: u64) -> Instant {
        t0() + Duration::from_secs(s)
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn peer(seed: u8) -> PeerId {
        KeyPair::from_seed([seed; 32]).public().into()
    }

    fn config(max: usize, reserved: usize, per_ip: usize, per_prefix: usize) -> Config {
        Config {
            max,
            reserved,
            max_per_ip: per_ip,
            max_per_prefix: per_prefix,
            exempt_loopback: false,
            ..Config::default()
        }
    }

    /// Rules plus each connection's last activity, as the IO side keeps it.
    struct Harness {
        rules: Rules,
        active: HashMap<ConnId, Instant>,
    }

    impl Harness {
        fn new(config: Config) -> Self {
            Harness {
                rules: Rules::new(config),
                active: HashMap::new(),
            }
        }

        fn admit(&mut self, now: u64, from: &str) -> Result<Admit, Refusal> {
            let active = &self.active;
            let admit = self.rules.admit(at(now), ip(from), |id| {
                active.get(&id).copied().unwrap_or(t0())
            })?;
            self.active.insert(admit.id, at(now));
            Ok(admit)
        }

        /// Admits and identifies, expecting no eviction.
        fn established(&mut self, now: u64, from: &str, caller: Caller) -> ConnId {
            let admit = self.admit(now, from).unwrap();
            assert_eq!(admit.evicted, None);
            assert_eq!(self.identify(admit.id, caller), Ok(None));
            admit.id
        }

        fn identify(&mut self, id: ConnId, caller: Caller) -> Result<Option<ConnId>, Refusal> {
            let active = &self.active;
            self.rules
                .identify(id, caller, |id| active.get(&id).copied().unwrap_or(t0()))
        }

        fn touch(&mut self, id: ConnId, now: u64) {
            self.active.insert(id, at(now));
        }
    }

    #[test]
    fn one_address_gets_at_most_max_per_ip() {
        let mut h = Harness::new(config(100, 0, 2, 100));
        let first = h.admit(0, "10.0.0.1").unwrap().id;
        h.admit(0, "10.0.0.1").unwrap();
        assert_eq!(h.admit(0, "10.0.0.1"), Err(Refusal::PerIp));
        // The IPv4-mapped form of the same address is the same address.
        assert_eq!(h.admit(0, "::ffff:10.0.0.1"), Err(Refusal::PerIp));
        h.admit(0, "10.0.0.2").unwrap();
        // A slot of the address comes back when its connection ends.
        h.rules.release(first);
        h.admit(0, "10.0.0.1").unwrap();
        assert_eq!(h.admit(0, "10.0.0.1"), Err(Refusal::PerIp));
        let counts = h.rules.counts();
        assert_eq!((counts.admitted, counts.refused_per_ip), (4, 3));
        assert_eq!((h.rules.open(), counts.refused()), (3, 3));
    }

    #[test]
    fn one_network_gets_at_most_max_per_prefix() {
        let mut h = Harness::new(config(100, 0, 2, 3));
        h.admit(0, "10.0.0.1").unwrap();
        h.admit(0, "10.0.0.1").unwrap();
        h.admit(0, "10.0.0.200").unwrap();
        assert_eq!(h.admit(0, "10.0.0.3"), Err(Refusal::PerPrefix));
        // Another /24 is another network.
        h.admit(0, "10.0.1.1").unwrap();
        // IPv6: one /64, whatever the interface id.
        h.admit(0, "2001:db8::1").unwrap();
        h.admit(0, "2001:db8::1").unwrap();
        h.admit(0, "2001:db8::ffff:ffff:ffff:1").unwrap();
        assert_eq!(h.admit(0, "2001:db8::2"), Err(Refusal::PerPrefix));
        h.admit(0, "2001:db8:0:1::2").unwrap();
        let counts = h.rules.counts();
        assert_eq!(
            (
                counts.admitted,
                counts.refused_per_prefix,
                counts.refused_per_ip
            ),
            (8, 2, 0)
        );
        assert_eq!(prefix(ip("192.168.7.9")), ip("192.168.7.0"));
        assert_eq!(prefix(ip("2001:db8:1:2:3:4:5:6")), ip("2001:db8:1:2::"));
        assert_eq!(prefix(ip("::ffff:192.168.7.9")), ip("192.168.7.0"));
    }

    /// Fetch slots count an IPv4 address by its /24 and an IPv6 one by its
    /// /32, whatever /64 it is in: a subscriber's /56 is one network.
    #[test]
    fn fetch_slots_count_an_ipv6_address_by_its_32() {
        let net = |a: &str| network(a.parse().unwrap()).to_string();
        assert_eq!(net("10.1.2.3"), "10.1.2.0");
        assert_eq!(net("::ffff:10.1.2.3"), "10.1.2.0");
        assert_eq!(net("2001:db8:0:1::7"), "2001:db8::");
        assert_eq!(net("2001:db8:ff00:5::1"), "2001:db8::");
        assert_eq!(net("2001:db9::1"), "2001:db9::");
    }

    /// Within a network, fetch slots count a host: an IPv4 address, or an
    /// IPv6 /48 (one site's /64s are free to it); a host's network is its
    /// addresses' network.
    #[test]
    fn fetch_slots_count_a_host_by_its_address_or_its_ipv6_48() {
        let host = |a: &str| host(a.parse().unwrap()).to_string();
        assert_eq!(host("10.1.2.3"), "10.1.2.3");
        assert_eq!(host("::ffff:10.1.2.3"), "10.1.2.3");
        assert_eq!(host("2001:db8:aa:1::7"), "2001:db8:aa::");
        assert_eq!(host("2001:db8:aa:ffff:ffff::1"), "2001:db8:aa::");
        assert_eq!(host("2001:db8:ab:1::7"), "2001:db8:ab::");
        for a in ["10.1.2.3", "::ffff:10.1.2.3", "2001:db8:ff00:5::1"] {
            let ip: IpAddr = a.parse().unwrap();
            assert_eq!(network(super::host(ip)), network(ip), "{a}");
        }
    }

    /// One subscriber's many /64s: each holds `max_per_prefix`, and their
    /// /32 four times that, so one IPv6 customer cannot take every slot,
    /// nor one server rented in a provider's /32 shut out the rest of it.
    #[test]
    fn one_ipv6_network_gets_at_most_four_prefixes_worth() {
        let mut h = Harness::new(config(100, 0, 3, 3));
        for subnet in 0..4 {
            for host in 1..=3 {
                h.admit(0, &format!("2001:db8:0:{subnet}::{host}")).unwrap();
            }
            let full = format!("2001:db8:0:{subnet}::9");
            assert_eq!(h.admit(0, &full), Err(Refusal::PerPrefix));
        }
        // A fifth /64 of the same /32: its network holds 12 already.
        assert_eq!(h.admit(0, "2001:db8:0:ff::1"), Err(Refusal::PerPrefix));
        // Another /32 is another network.
        h.admit(0, "2001:db9::1").unwrap();
        assert_eq!(h.rules.open(), 13);
        assert_eq!(
            ipv6_network(ip("2001:db8:1:2::3")),
            "2001:db8::".parse().ok()
        );
        assert_eq!(ipv6_network(ip("::ffff:1.2.3.4")), None);
    }

    #[test]
    fn reserved_slots_are_left_to_reserved_callers() {
        let mut h = Harness::new(config(4, 2, 10, 10));
        let committee = peer(1);
        h.rules.reserve_for([committee, committee]);
        assert_eq!(h.rules.reserved_peers(), 1);
        let anonymous = h.established(0, "10.0.0.1", Caller::Anonymous);
        let other = h.established(1, "10.0.0.2", Caller::Peer(peer(2)));
        h.touch(anonymous, 5);
        // The ordinary slots (4 - 2) are taken: a third ordinary caller
        // evicts an ordinary one, anonymous first, though the
        // authenticated one is idler.
        let third = h.admit(6, "10.0.0.3").unwrap();
        assert_eq!(third.evicted, None);
        assert_eq!(h.identify(third.id, Caller::Anonymous), Ok(Some(anonymous)));
        h.rules.release(anonymous);
        // A committee member takes a reserved slot and evicts no one.
        h.established(7, "10.0.0.4", Caller::Peer(committee));
        h.established(7, "10.0.0.5", Caller::Peer(committee));
        assert_eq!(h.rules.open(), 4);
        // Full: newcomers evict the ordinary callers, anonymous first,
        // never a reserved one.
        assert_eq!(h.admit(8, "10.0.0.6").unwrap().evicted, Some(third.id));
        assert_eq!(h.admit(8, "10.0.0.7").unwrap().evicted, Some(other));
    }

    #[test]
    fn ordinary_callers_evict_the_longest_idle_ordinary_connection() {
        let mut h = Harness::new(config(4, 2, 10, 10));
        let a = h.established(0, "10.0.0.1", Caller::Anonymous);
        let b = h.established(0, "10.0.0.2", Caller::Anonymous);
        h.touch(a, 3);
        h.touch(b, 2);
        let c = h.admit(4, "10.0.0.3").unwrap().id;
        // b was idle longer.
        assert_eq!(h.identify(c, Caller::Peer(peer(9))), Ok(Some(b)));
        // Released twice (evicted, then its IO dropped): counted once.
        h.rules.release(b);
        assert_eq!(h.rules.open(), 2);
        let counts = h.rules.counts();
        assert_eq!((counts.evicted, counts.refused()), (1, 0));
    }

    #[test]
    fn without_unreserved_slots_ordinary_callers_are_refused_after_the_handshake() {
        let mut h = Harness::new(config(2, 2, 10, 10));
        h.rules.reserve_for([peer(1)]);
        let id = h.admit(0, "10.0.0.1").unwrap().id;
        assert_eq!(h.identify(id, Caller::Anonymous), Err(Refusal::Unreserved));
        assert_eq!(h.rules.open(), 0);
        let id = h.admit(0, "10.0.0.1").unwrap().id;
        assert_eq!(
            h.identify(id, Caller::Peer(peer(2))),
            Err(Refusal::Unreserved)
        );
        h.established(0, "10.0.0.1", Caller::Peer(peer(1)));
        let counts = h.rules.counts();
        assert_eq!((counts.admitted, counts.refused_unreserved), (3, 2));
        assert_eq!(h.rules.open(), 1);
    }

    #[test]
    fn when_full_anonymous_then_peers_then_the_oldest_handshake_are_evicted() {
        let mut h = Harness::new(config(5, 0, 10, 10));
        let reserved = peer(1);
        h.rules.reserve_for([reserved]);
        let member = h.established(0, "10.0.0.1", Caller::Peer(reserved));
        let other = h.established(0, "10.0.0.2", Caller::Peer(peer(2)));
        let anon_busy = h.established(0, "10.0.0.3", Caller::Anonymous);
        let anon_idle = h.established(0, "10.0.0.4", Caller::Anonymous);
        let handshake = h.admit(1, "10.0.0.5").unwrap().id;
        h.touch(anon_busy, 8);
        h.touch(anon_idle, 3);
        h.touch(member, 0);

        // The member is idlest, but holds a reserved slot; of the ordinary
        // callers the anonymous go first, the longest idle first, even
        // though the authenticated one is idler.
        let evictions: Vec<_> = (0..4)
            .map(|i| h.admit(10 + i, "10.0.1.1").unwrap().evicted)
            .collect();
        assert_eq!(
            evictions,
            [
                Some(anon_idle),
                Some(anon_busy),
                Some(other),
                Some(handshake)
            ]
        );
        // Only handshakes left besides the member: the oldest goes, and
        // learns it when its handshake ends.
        let (first, last) = (handshake + 1, handshake + 4);
        let next = h.admit(20, "10.0.2.1").unwrap();
        assert_eq!(next.evicted, Some(first));
        assert_eq!(h.identify(first, Caller::Anonymous), Err(Refusal::Full));
        // With reserved callers only, nothing can be evicted: refused.
        for id in (first + 1..=last).chain([next.id]) {
            assert_eq!(h.identify(id, Caller::Peer(reserved)), Ok(None));
        }
        assert_eq!(h.admit(30, "10.0.3.1"), Err(Refusal::Full));
        let counts = h.rules.counts();
        assert_eq!(
            (counts.admitted, counts.evicted, counts.refused_full),
            (10, 5, 1)
        );
    }

    #[test]
    fn exempt_loopback_callers_skip_the_address_caps_but_hold_ordinary_slots() {
        // Four slots, one reserved; one connection per address and network.
        let mut h = Harness::new(Config {
            exempt_loopback: true,
            ..config(4, 1, 1, 1)
        });
        let first = h.established(0, "127.0.0.1", Caller::Anonymous);
        for n in 1..3 {
            h.established(n, "127.0.0.1", Caller::Anonymous);
        }
        // The ordinary slots are full: a fourth loopback caller takes the
        // longest-idle one's, as any anonymous newcomer would.
        let fourth = h.admit(10, "127.0.0.1").unwrap();
        assert_eq!(fourth.evicted, None);
        assert_eq!(h.identify(fourth.id, Caller::Anonymous), Ok(Some(first)));
        // The reserved slot is still there for a committee member.
        let member = PeerId([7; 32]);
        h.rules.reserve_for([member]);
        h.established(11, "10.0.0.1", Caller::Peer(member));

        let mut h = Harness::new(config(4, 3, 1, 1));
        h.established(0, "127.0.0.1", Caller::Anonymous);
        assert_eq!(h.admit(0, "127.0.0.1"), Err(Refusal::PerIp));
        assert_eq!(h.admit(0, "127.0.0.2"), Err(Refusal::PerPrefix));
    }
}
