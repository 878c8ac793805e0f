use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use rand::SeedableRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use soma_types::{Access, PeerId, SignedNodeInfo};
use soma_wire::inbound::{IPV4_NETWORK_BITS, IPV6_NETWORK_BITS};

use super::messages::*;
use super::table::{Caps, Table};
use crate::{Core, Time};

/// A peer to dial when isolated; its id is learnt from the handshake if not
/// given.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeedPeer {
    /// The seed's peer id, if known.
    pub peer_id: Option<PeerId>,
    /// `host:port`.
    pub address: String,
}

/// Everything a Discovery core is made from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Init {
    /// Tunable settings.
    pub config: Config,
    /// Our own peer id.
    pub local: PeerId,
    /// Who may connect to us (and whom we accept infos of).
    pub access: Access,
    /// Peers dialled first and always, even past the target; in private
    /// mode the only ones.
    pub allowlist: Vec<PeerId>,
    /// Dialled when no peer is connected, and while known peers leave room
    /// under the connection target.
    pub seeds: Vec<SeedPeer>,
    /// Seed of the core's randomness.
    pub seed: u64,
    /// The addresses this node advertises in its own info. An info of
    /// this node's identity naming others, signed after the core started,
    /// is another node's that holds this node's key
    /// ([`Output::SameKeyElsewhere`]); empty, nothing is judged.
    #[serde(default)]
    pub addresses: Vec<String>,
}

/// Entries of the table of known peers allocated when a core is made.
const TABLE_PREALLOCATED: usize = 4_096;

/// Source buckets, fullest first, a full table searches for an entry old
/// enough to give up for a newcomer ([`Config::min_evict_age_ms`]): each
/// newcomer costs at most this many walks, however many sources the table
/// holds (every network a caller came from is one).
pub const EVICTION_SEARCH_BUCKETS: usize = 8;

/// Discovery's tunable settings.
///
/// The known-peer table resists eclipse attacks (in the spirit of Bitcoin's
/// addrman and discv5's tables): every entry is counted in the bucket of the
/// peer that told us of it (its source) and in the bucket of its address
/// prefix, and no bucket may hold more than its cap.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Config {
    /// Milliseconds between rounds.
    pub interval_ms: u64,
    /// Connected peers asked for their known peers each round.
    pub peers_to_query: usize,
    /// Connections Discovery dials up to.
    pub target_concurrent_connections: usize,
    /// Most infos sent in one GetKnownPeers answer.
    pub max_peers_to_send: usize,
    /// Most peers known at once. When full, a new peer takes the place of
    /// the entry with the oldest timestamp in the fullest source bucket
    /// that holds one old enough (`min_evict_age_ms`), never of a peer
    /// connected to and verified.
    pub max_known_peers: usize,
    /// Most known peers learnt from one source: one peer's answers, or the
    /// connect-back infos of callers from one /24 (IPv4) or /32 (IPv6)
    /// (callers of unknown address together). A source that lies fills only
    /// its own bucket.
    pub max_known_peers_per_source: usize,
    /// Most known peers whose dialled address is in one /24 (IPv4) or /32
    /// (IPv6) prefix, so that addresses an attacker holds cannot fill the
    /// table.
    pub max_known_peers_per_prefix: usize,
    /// How long before a newcomer an entry must have been seen for a full
    /// table to give it up for the newcomer, in milliseconds: the table
    /// keeps what its peers still vouch for, as Bitcoin's addrman keeps an
    /// address that still works over a new one, so that a flood of fresh
    /// infos can take only the places of peers gone or gone quiet. Only
    /// the [`EVICTION_SEARCH_BUCKETS`] fullest source buckets are searched;
    /// with none there, the newcomer is refused. The newcomer's own source
    /// gives up its oldest whatever its age, if it is among them: a source
    /// that is the fullest churns its own entries, as the source cap and
    /// the prefix cap make room whatever the age.
    ///
    /// 0 (the default): the oldest entry of the fullest source bucket
    /// goes, however fresh, and every bucket is searched. A trade, not a
    /// free gain (docs/benchmarks.md, "Keeping fresh incumbents"): 30 s
    /// keeps a network that converged before a sybil flood at 0.95 of
    /// honest entries where 0 keeps 0.25, but it does nothing against a
    /// flood from the first round, and a node that joins is held by a
    /// twelfth to a third as many tables, whether the network churns or
    /// not (docs/simulation.md, "Joining"); below 30 s (with the default
    /// 5 s rounds) it keeps little more than 0 does. The bound on the
    /// search is part of the defence: tables that searched every bucket
    /// let newcomers in, joiners and sybils alike.
    pub min_evict_age_ms: u64,
    /// Most peers not known yet taken from one source per interval,
    /// whether or not the table had room for them (each costs a search
    /// for an entry to evict).
    pub max_new_peers_per_source_per_interval: usize,
    /// Whether loopback and private addresses (10/8, 172.16/12,
    /// 192.168/16, 100.64/10, fc00::/7) are accepted in infos. True by
    /// default because the library's default node listens on loopback, and
    /// local networks, tests and private validator networks need it; a
    /// node on the public Internet sets it to false (docs/operations.md),
    /// so that peers cannot point its dials into private networks. The
    /// prefix caps apply to private ranges either way.
    pub allow_private_addresses: bool,
    /// GetKnownPeers calls answered per caller per interval.
    pub get_known_peers_rate_limit: u32,
    /// An info older than this is dropped, in milliseconds.
    pub node_info_max_age_ms: u64,
    /// First wait before redialling a peer whose dial failed, doubled per
    /// failure, in milliseconds. A fresh info of the peer, or a call from
    /// it, ends the wait.
    pub dial_backoff_ms: u64,
    /// Longest wait before redialling, in milliseconds. An address not
    /// dialled again within this long after its wait ended is forgotten:
    /// its next failure waits the first wait again.
    pub max_dial_backoff_ms: u64,
    /// A dial with no result after this long is forgotten, in milliseconds.
    pub pending_dial_timeout_ms: u64,
    /// Every this many milliseconds a node with no room under its target
    /// dials one known peer more, chosen at random, and once connected
    /// drops one of its other connections at random: its connections keep
    /// moving over what it knows, so that networks split by a partition
    /// join again once it heals. Never dropped: allowlisted peers, and the
    /// oldest half of the target (anchors), so that an attacker who fills
    /// the known-peer table still cannot rotate a node into holding only
    /// its peers. 0: never.
    pub rotation_interval_ms: u64,
}

impl Default for Config {
    /// The design's defaults.
    fn default() -> Self {
        Config {
            interval_ms: 5_000,
            peers_to_query: 3,
            target_concurrent_connections: 8,
            max_peers_to_send: 200,
            max_known_peers: 1_000,
            max_known_peers_per_source: 100,
            max_known_peers_per_prefix: 50,
            max_new_peers_per_source_per_interval: 50,
            min_evict_age_ms: 0,
            allow_private_addresses: true,
            get_known_peers_rate_limit: 10,
            node_info_max_age_ms: 24 * 60 * 60 * 1000,
            dial_backoff_ms: 1_000,
            max_dial_backoff_ms: 60_000,
            pending_dial_timeout_ms: 30_000,
            rotation_interval_ms: 60_000,
        }
    }
}

impl Init {
    /// Defaults for node `local`: public, no allowlist, no seeds.
    pub fn new(local: PeerId, seed: u64) -> Self {
        Init {
            config: Config::default(),
            local,
            access: Access::Public,
            allowlist: Vec::new(),
            seeds: Vec::new(),
            seed,
            addresses: Vec::new(),
        }
    }
}

/// Least time between two [`Output::SameKeyElsewhere`].
const SAME_KEY_WARNING_INTERVAL_MS: u64 = 10 * 60 * 1000;

#[derive(Clone, Copy, Debug)]
struct Backoff {
    failures: u32,
    retry_at: Time,
}

/// Where an info came from: the bucket its entry counts in. Identities
/// are free in public mode but addresses are not, so buckets are networks:
/// the identities one network holds, however many, fill one bucket of
/// each kind, never that of peers elsewhere. Callers and the peers we
/// dialled are apart: an attacker calling from an honest peer's network
/// does not use up what that peer's answers may bring.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) enum Source {
    /// Callers' own infos (connect-back) from calls of unknown address.
    Unknown,
    /// Callers' own infos (connect-back), by the network the call came
    /// from.
    Caller(Prefix),
    /// Answers to our GetKnownPeers queries, by the network of the
    /// address the peer was dialled at.
    Dialled(Prefix),
    /// Answers of the seed at this position of the configured seeds,
    /// dialled at a host name (whose network is not known without
    /// resolving it): the operator's choice, however many identities
    /// answer there.
    Seed(usize),
}

/// The /24 (IPv4) or /32 (IPv6) prefix of an address (its network, as
/// the inbound connection caps count it: `soma_wire::inbound::prefix`), its bits as a
/// number (the address with the host bits cleared, shifted right): ordered
/// as the bytes would be, compared without a call to `memcmp`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) enum Prefix {
    V4(u32),
    V6(u64),
}

/// The prefix of `ip`, an IPv4-mapped IPv6 address counting as IPv4.
fn ip_prefix(ip: IpAddr) -> Prefix {
    match canonical(ip) {
        IpAddr::V4(v4) => Prefix::V4(v4.to_bits() >> (32 - IPV4_NETWORK_BITS)),
        IpAddr::V6(v6) => Prefix::V6((v6.to_bits() >> (128 - IPV6_NETWORK_BITS)) as u64),
    }
}

/// `ip`, unwrapped if it is an IPv4-mapped IPv6 address.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

/// `address` as a peer must advertise it if it is an IP socket address:
/// as it prints (IPv6 in RFC 5952 form, lowercase and compressed), an
/// IPv4-mapped IPv6 address as its IPv4 address. Anything else is
/// returned as it is (peers refuse it).
pub fn canonical_address(address: &str) -> String {
    match address.parse::<SocketAddr>() {
        Ok(parsed) => SocketAddr::new(canonical(parsed.ip()), parsed.port()).to_string(),
        Err(_) => address.to_string(),
    }
}

/// Whether `address` is written exactly as `parsed` prints, without
/// allocating (the longest socket address prints in 47 bytes).
fn prints_as(parsed: SocketAddr, address: &str) -> bool {
    use std::fmt::Write;
    struct Buffer {
        bytes: [u8; 64],
        len: usize,
    }
    impl Write for Buffer {
        fn write_str(&mut self, s: &str) -> std::fmt::Result {
            let end = self.len + s.len();
            let room = self.bytes.get_mut(self.len..end).ok_or(std::fmt::Error)?;
            room.copy_from_slice(s.as_bytes());
            self.len = end;
            Ok(())
        }
    }
    let mut buffer = Buffer {
        bytes: [0; 64],
        len: 0,
    };
    write!(buffer, "{parsed}").is_ok() && buffer.bytes[..buffer.len] == *address.as_bytes()
}

/// Ports of services that are not for the public and ask for credentials
/// (remote shells, mail, name service, file sharing, databases, remote
/// desktops...): no node is advertised on one. Otherwise infos naming a
/// host at such a port would point every node that reads them at that
/// service, each a connection attempt its operator sees as an attack
/// (Bitcoin Core refuses to dial such ports for the same reason). The
/// list is the "bad ports" of the WHATWG Fetch standard, which browsers
/// refuse for the same reason, and the usual ports of databases, remote
/// desktops and caches. Sorted, for a binary search.
pub const SERVICE_PORTS: [u16; 91] = [
    1, 7, 9, 11, 13, 15, 17, 19, 20, 21, 22, 23, 25, 37, 42, 43, 53, 69, 77, 79, 87, 95, 101, 102,
    103, 104, 109, 110, 111, 113, 115, 117, 119, 123, 135, 137, 139, 143, 161, 179, 389, 427, 465,
    512, 513, 514, 515, 526, 530, 531, 532, 540, 548, 554, 556, 563, 587, 601, 636, 989, 990, 993,
    995, 1433, 1521, 1719, 1720, 1723, 2049, 3306, 3389, 3659, 4045, 4190, 5060, 5061, 5432, 5900,
    6000, 6379, 6566, 6665, 6666, 6667, 6668, 6669, 6679, 6697, 10080, 11211, 27017,
];

/// Whether peers take `address` in a node's info: an IP literal with a
/// port, spelled one way, reaching a host (docs/protocol.md, "Addresses");
/// loopback and private ones only with `allow_private`. A node checks its
/// own advertised addresses with it, since peers refuse an info whole for
/// one address they refuse.
pub fn is_advertisable(address: &str, allow_private: bool) -> bool {
    prefix(address, allow_private).is_some()
}

/// Whether `port` is one of [`SERVICE_PORTS`], where no node may be
/// advertised.
pub fn is_service_port(port: u16) -> bool {
    SERVICE_PORTS.binary_search(&port).is_ok()
}

/// The prefix of `address` if peers may advertise it: an IP literal with a
/// port, none of [`SERVICE_PORTS`], written as [`canonical_address`] writes it, neither unspecified,
/// multicast, broadcast, reserved (240/4) nor link-local, embedding no
/// IPv4 address ([`embeds_ipv4`]), and loopback, private or otherwise
/// not global only when allowed. Host names are refused: they cannot be
/// bucketed without resolving them. One spelling per address: peers are
/// dialled, and matched against those connected or being dialled, by the
/// string, so another spelling of a connected peer's address (zeros not
/// compressed, capitals, an IPv4-mapped form) would have it dialled again.
fn prefix(address: &str, allow_private: bool) -> Option<Prefix> {
    let parsed: SocketAddr = address.parse().ok()?;
    let ip = parsed.ip();
    let scoped = matches!(parsed, SocketAddr::V6(v6) if v6.scope_id() != 0);
    let port = parsed.port();
    if port == 0 || is_service_port(port) || scoped || canonical(ip) != ip {
        return None;
    }
    if !prints_as(parsed, address) {
        return None;
    }
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            let reserved = o[0] >= 240;
            if o[0] == 0 || v4.is_multicast() || v4.is_link_local() || reserved {
                return None;
            }
            let shared = o[0] == 100 && (o[1] & 0xc0) == 64;
            // 198.18/15 (benchmarking) and 192.0.0/24 (protocol
            // assignments) reach no public host either.
            let benchmarking = o[0] == 198 && (o[1] & 0xfe) == 18;
            let assignments = o[..3] == [192, 0, 0];
            let local = v4.is_loopback() || v4.is_private() || shared;
            if (local || benchmarking || assignments) && !allow_private {
                return None;
            }
        }
        IpAddr::V6(v6) => {
            let first = v6.segments()[0];
            if v6.is_unspecified() || v6.is_multicast() || (first & 0xffc0) == 0xfe80 {
                return None;
            }
            if embeds_ipv4(v6) {
                return None;
            }
            let unique_local = (first & 0xfe00) == 0xfc00;
            let site_local = (first & 0xffc0) == 0xfec0;
            if (v6.is_loopback() || unique_local || site_local) && !allow_private {
                return None;
            }
        }
    }
    Some(ip_prefix(ip))
}

/// Whether `v6` is an IPv4 address behind a translation prefix: NAT64's
/// well-known `64:ff9b::/96` and local-use `64:ff9b:1::/48`, SIIT's
/// `::ffff:0:0/96`, the deprecated IPv4-compatible `::a.b.c.d` (the
/// unspecified and loopback addresses apart), 6to4's `2002::/16` or
/// Teredo's `2001::/32`. Such an address names no host of its own, and
/// through a translator or relay it reaches whatever IPv4 address it
/// embeds, private networks included, past `allow-private-addresses`.
fn embeds_ipv4(v6: Ipv6Addr) -> bool {
    let bits = v6.to_bits();
    let segments = v6.segments();
    let well_known = bits >> 32 == 0x0064_ff9b_0000_0000_0000_0000;
    let local_use = bits >> 80 == 0x0064_ff9b_0001;
    let siit = bits >> 32 == 0xffff_0000;
    let compatible = bits >> 32 == 0 && bits > 1;
    let six_to_four = segments[0] == 0x2002;
    let teredo = segments[..2] == [0x2001, 0];
    well_known || local_use || siit || compatible || six_to_four || teredo
}

/// A known peer.
#[derive(Clone, Debug)]
pub(super) struct Entry {
    pub info: Arc<SignedNodeInfo>,
    pub source: Source,
    pub prefix: Prefix,
    /// The info's timestamp, no later than our clock when it arrived: a
    /// timestamp in the future buys no precedence.
    pub seen_ms: u64,
    /// The info's own timestamp, kept beside it: comparing an incoming
    /// info with the entry reads no more than the entry.
    pub timestamp_ms: u64,
}

/// Whether a peer is never evicted: connected and verified (and not
/// failed since), or allowlisted.
fn pinned<'a>(
    verified: &'a BTreeSet<PeerId>,
    allowlist: &'a BTreeSet<PeerId>,
) -> impl Fn(&PeerId) -> bool + 'a {
    move |peer| verified.contains(peer) || allowlist.contains(peer)
}

/// The logic of Discovery.
pub struct DiscoveryCore {
    init: Init,
    config: Config,
    allowlist: BTreeSet<PeerId>,
    known: Table,
    connected: BTreeSet<PeerId>,
    /// Peers we connected to and verified, never evicted until a dial to
    /// them fails; at most the known and connected peers.
    verified: BTreeSet<PeerId>,
    /// The verified peers not connected now, the one that left first in
    /// front: at most `target_concurrent_connections` of them stay pinned
    /// ([`DiscoveryCore::limit_pins`]).
    pinned_apart: VecDeque<PeerId>,
    /// Dials in progress by address, with the peer expected and the start.
    pending: BTreeMap<String, (Option<PeerId>, Time)>,
    /// The identity each seed dialled by address turned out to have.
    seed_ids: BTreeMap<String, PeerId>,
    /// Backoff by address: only the failures of the last two longest
    /// waits ([`DiscoveryCore::forget_old_backoffs`]).
    backoff: BTreeMap<String, Backoff>,
    /// GetKnownPeers calls served this interval, per caller.
    served: HashMap<Option<PeerId>, u32>,
    /// When the next rotation dial is due (set at the first tick).
    next_rotation: Option<Time>,
    /// The address of the rotation dial in progress: once it connects,
    /// another connection is dropped.
    rotating: Option<String>,
    /// The order in which connected peers connected (a counter, not a
    /// time): the oldest are the anchors rotation leaves alone.
    connected_order: BTreeMap<PeerId, u64>,
    /// The address each connected peer was reached at: no other peer is
    /// dialled there (Connections drops a dial to an address it is
    /// connected to, and the dial would hold its slot until it timed out).
    connected_at: BTreeMap<PeerId, String>,
    connections_made: u64,
    /// New peers learnt this interval, per source (sources are peers we
    /// queried, and inbound).
    learned: BTreeMap<Source, usize>,
    /// The wall clock of the first input that read it: infos of this
    /// node's identity signed before are of an earlier run.
    started_ms: Option<u64>,
    /// Addresses of an info of this node's identity signed by another
    /// node, not told yet, and when that was last told.
    same_key: Option<Vec<String>>,
    same_key_told: Option<Time>,
    rng: ChaCha8Rng,
}

impl Core for DiscoveryCore {
    const NAME: &'static str = "discovery";
    type Init = Init;
    type Input = Input;
    type Output = Output;

    fn new(mut init: Init) -> Self {
        // Seeds spelled as infos must be, so a connection to a seed keeps
        // its address from being dialled again under another spelling.
        for seed in &mut init.seeds {
            seed.address = canonical_address(&seed.address);
        }
        // Room for a full table at once (up to a bound, whatever the
        // setting): one that grows keeps spare room as large again.
        let known = Table::with_capacity(init.config.max_known_peers.min(TABLE_PREALLOCATED));
        DiscoveryCore {
            rng: ChaCha8Rng::seed_from_u64(init.seed),
            allowlist: init.allowlist.iter().copied().collect(),
            config: init.config.clone(),
            init,
            known,
            connected: BTreeSet::new(),
            verified: BTreeSet::new(),
            pinned_apart: VecDeque::new(),
            pending: BTreeMap::new(),
            seed_ids: BTreeMap::new(),
            backoff: BTreeMap::new(),
            served: HashMap::new(),
            next_rotation: None,
            rotating: None,
            connected_order: BTreeMap::new(),
            connected_at: BTreeMap::new(),
            connections_made: 0,
            learned: BTreeMap::new(),
            started_ms: None,
            same_key: None,
            same_key_told: None,
        }
    }

    fn handle(&mut self, now: Time, input: Input) -> Vec<Output> {
        if let Input::Tick { unix_ms }
        | Input::Learned { unix_ms, .. }
        | Input::Serve { unix_ms, .. } = input
        {
            self.started_ms.get_or_insert(unix_ms);
        }
        let mut out = self.step(now, input);
        self.tell_same_key(now, &mut out);
        out
    }
}

impl DiscoveryCore {
    fn step(&mut self, now: Time, input: Input) -> Vec<Output> {
        match input {
            Input::Tick { unix_ms } => self.tick(now, unix_ms),
            Input::Connected { peer, address } => {
                if self.init.seeds.iter().any(|s| s.address == address) {
                    self.seed_ids.insert(address.clone(), peer);
                }
                let new = self.connected.insert(peer);
                self.connected_at.insert(peer, address.clone());
                self.verified.insert(peer);
                self.pinned_apart.retain(|p| *p != peer);
                if !self.connected_order.contains_key(&peer) {
                    self.connections_made += 1;
                    self.connected_order.insert(peer, self.connections_made);
                }
                self.pending.remove(&address);
                self.pending.retain(|_, (p, _)| *p != Some(peer));
                self.backoff.remove(&address);
                self.end_backoff(peer);
                let mut out = self.rotated(peer, &address);
                // A new connection is asked for its peers at once, not at
                // the next round: a server at its inbound limit closes its
                // longest-idle connection for each newcomer, and a seed
                // that many nodes dial at once would close this one before
                // it carried a single call.
                let dropped = out.contains(&Output::Disconnect { peer });
                if new && !dropped {
                    out.insert(0, Output::Query { peer });
                }
                out
            }
            Input::Disconnected { peer } => {
                self.connected.remove(&peer);
                self.connected_order.remove(&peer);
                self.connected_at.remove(&peer);
                // Still verified while known: it may be back at the next dial.
                if !self.known.contains_key(&peer) {
                    self.verified.remove(&peer);
                } else if self.verified.contains(&peer) {
                    self.pinned_apart.push_back(peer);
                    self.limit_pins();
                }
                vec![]
            }
            Input::DialFailed {
                peer,
                address,
                found,
            } => {
                self.pending.remove(&address);
                if self.rotating.as_ref() == Some(&address) {
                    self.rotating = None;
                }
                if let Some(p) = peer {
                    self.pending.retain(|_, (q, _)| *q != Some(p));
                    // Unreachable: no longer kept whatever comes.
                    self.verified.remove(&p);
                }
                if let (Some(p), Some(found)) = (peer, found)
                    && p != found
                    && let Some(out) = self.answered_by_another(now, p, found, &address)
                {
                    return out;
                }
                let b = self.backoff.entry(address).or_insert(Backoff {
                    failures: 0,
                    retry_at: now,
                });
                b.failures = b.failures.saturating_add(1);
                let wait = self
                    .config
                    .dial_backoff_ms
                    .saturating_mul(1 << b.failures.min(20).saturating_sub(1))
                    .min(self.config.max_dial_backoff_ms);
                b.retry_at = Time(now.0.saturating_add(wait));
                vec![]
            }
            // A seed at an IP address that is a peer held: known by its
            // identity from now on, so not dialled again while that peer
            // stays connected. A host name may name other servers too (a
            // pool): dialled again after a backoff, as after a failure.
            Input::AlreadyConnected { peer, address } if address.parse::<SocketAddr>().is_ok() => {
                self.pending.remove(&address);
                if self.rotating.as_ref() == Some(&address) {
                    self.rotating = None;
                }
                if self.init.seeds.iter().any(|s| s.address == address) {
                    self.seed_ids.insert(address, peer);
                }
                vec![]
            }
            Input::AlreadyConnected { address, .. } => self.handle(
                now,
                Input::DialFailed {
                    peer: None,
                    address,
                    found: None,
                },
            ),
            Input::Learned {
                source,
                infos,
                unix_ms,
            } => {
                // An answer of a peer no longer connected is dropped: its
                // network is not known for sure any more, and a peer must
                // not find a bucket beside its own by hanging up.
                let source = match source {
                    None => Some(Source::Unknown),
                    Some(peer) => self.source_of(peer),
                };
                if let Some(source) = source {
                    self.learn_all(infos, source, unix_ms);
                }
                vec![]
            }
            Input::Serve {
                id,
                caller,
                info,
                unix_ms,
                remote,
            } => self.serve(id, caller, info, unix_ms, remote),
            Input::KnownPeers => {
                let mut known: Vec<Arc<SignedNodeInfo>> =
                    self.known.values().map(|e| e.info.clone()).collect();
                known.sort_unstable_by_key(|i| i.info.peer_id);
                vec![Output::Known(known)]
            }
        }
    }
}

impl DiscoveryCore {
    /// The peers known now, in no particular order (a read, not an input:
    /// for metrics and simulations).
    pub fn known_peers(&self) -> impl Iterator<Item = &PeerId> {
        self.known.keys()
    }

    /// The bucket of the answers of `peer`: the network of the address it
    /// was dialled at, while connected (`None` once it is not).
    fn source_of(&self, peer: PeerId) -> Option<Source> {
        let address = self.connected_at.get(&peer)?;
        match address.parse::<SocketAddr>() {
            Ok(address) => Some(Source::Dialled(ip_prefix(address.ip()))),
            Err(_) => Some(
                (self.init.seeds.iter())
                    .position(|s| s.address == *address)
                    .map_or(Source::Unknown, Source::Seed),
            ),
        }
    }

    /// An info of this node's identity came back. Only a holder of this
    /// node's key signs one, so one that names other addresses than this
    /// node advertises, signed since this core started (not an earlier
    /// run's, before an address changed), is another node's running with
    /// the same keys: the two refuse to dial each other (each finds
    /// itself), peers hold one entry for both, and the validator's
    /// signatures come from two places.
    fn own_identity_seen(&mut self, info: &soma_types::NodeInfo) {
        let ours = &self.init.addresses;
        if !ours.is_empty()
            && info.addresses != *ours
            && self.started_ms.is_some_and(|s| info.timestamp_ms > s)
        {
            self.same_key = Some(info.addresses.clone());
        }
    }

    /// Tells a node of this node's identity seen elsewhere, at most once
    /// per [`SAME_KEY_WARNING_INTERVAL_MS`].
    fn tell_same_key(&mut self, now: Time, out: &mut Vec<Output>) {
        let due = self
            .same_key_told
            .is_none_or(|t| now.0 >= t.0.saturating_add(SAME_KEY_WARNING_INTERVAL_MS));
        if due && let Some(addresses) = self.same_key.take() {
            self.same_key_told = Some(now);
            out.push(Output::SameKeyElsewhere { addresses });
        }
    }

    fn acceptable(&self, peer: &PeerId) -> bool {
        *peer != self.init.local
            && (self.init.access == Access::Public || self.allowlist.contains(peer))
    }

    /// Forgets the backoff of every address whose wait ended more than a
    /// longest wait ago, that has not failed again since and that is not
    /// being dialled. Without this, every
    /// address that ever failed would stay (a departed peer's, or one a
    /// liar named) for as long as the node runs; with it, the map holds the
    /// failures of the last two longest waits at most, which the dials a
    /// round makes bound.
    fn forget_old_backoffs(&mut self, now: Time) {
        let forget_after = self.config.max_dial_backoff_ms;
        let pending = &self.pending;
        self.backoff.retain(|address, b| {
            now.0.saturating_sub(b.retry_at.0) < forget_after || pending.contains_key(address)
        });
    }

    /// Ends the dial backoff of every address of `peer`: it is up again.
    fn end_backoff(&mut self, peer: PeerId) {
        if self.backoff.is_empty() {
            return;
        }
        if let Some(entry) = self.known.get(&peer) {
            for a in &entry.info.info.addresses {
                self.backoff.remove(a);
            }
        }
    }

    /// Keeps the newest info per peer, within the caps of the table.
    /// Learns `infos`, all from `source`: its count of new peers this
    /// interval is looked up once, not for each info.
    fn learn_all(
        &mut self,
        infos: impl IntoIterator<Item = Arc<SignedNodeInfo>>,
        source: Source,
        unix_ms: u64,
    ) {
        let mut learned = self.learned.get(&source).copied().unwrap_or(0);
        for info in infos {
            self.learn(info, source, unix_ms, &mut learned);
        }
        if learned > 0 {
            self.learned.insert(source, learned);
        }
    }

    /// Learns `info` from `source`, which has brought `learned` new peers
    /// this interval.
    fn learn(
        &mut self,
        info: Arc<SignedNodeInfo>,
        source: Source,
        unix_ms: u64,
        learned: &mut usize,
    ) {
        let peer = info.info.peer_id;
        if peer == self.init.local {
            self.own_identity_seen(&info.info);
            return;
        }
        if !self.acceptable(&peer) {
            return;
        }
        // Infos no newer than the one held, and new peers past their
        // source's allowance (in a network larger than the table, most of
        // an answer), are dropped before their addresses are parsed:
        // together about four in ten of what a large network brings
        // (docs/benchmarks.md, "The simulator's speed").
        let old = self.known.get(&peer);
        if old.is_some_and(|old| old.timestamp_ms >= info.info.timestamp_ms) {
            return;
        }
        let allowance = self.config.max_new_peers_per_source_per_interval;
        if old.is_none() && *learned >= allowance {
            return;
        }
        // Every address valid; the first, the one dialled, buckets it. A
        // peer that signs afresh mostly keeps its addresses: those were
        // checked when its entry was made.
        let first = match old {
            Some(old) if old.info.info.addresses == info.info.addresses => old.prefix,
            _ => match self.prefix_of(&info.info.addresses) {
                Some(first) => first,
                None => return,
            },
        };
        let seen_ms = info.info.timestamp_ms.min(unix_ms);
        if let Some(old) = old {
            let victims = if old.prefix == first {
                Vec::new()
            } else {
                match self.make_room(None, first, seen_ms, peer) {
                    Some(v) => v,
                    None => return,
                }
            };
            for v in victims {
                self.known.remove(&v);
            }
            // A newer info means the peer signed it since: it may have
            // restarted, so an old dial failure says nothing any more.
            self.end_backoff(peer);
            self.known.update(peer, info, first, seen_ms);
            return;
        }
        // A newcomer counts against its source's allowance whether or not
        // it finds room: each one that finds none costs a walk over the
        // source buckets, and a source must not buy an unbounded number
        // of walks with infos older than everything the table holds.
        *learned += 1;
        let Some(victims) = self.make_room(Some(source), first, seen_ms, peer) else {
            return;
        };
        for v in victims {
            self.known.remove(&v);
        }
        self.known.insert(
            peer,
            Entry {
                timestamp_ms: info.info.timestamp_ms,
                info,
                source,
                prefix: first,
                seen_ms,
            },
        );
    }

    /// The bucket of `addresses`: the prefix of the first, if every one is
    /// a valid address here.
    fn prefix_of(&self, addresses: &[String]) -> Option<Prefix> {
        let allow_private = self.config.allow_private_addresses;
        let mut prefixes = addresses.iter().map(|a| prefix(a, allow_private));
        let first = prefixes.next()??;
        prefixes.all(|p| p.is_some()).then_some(first)
    }

    /// The entries to evict so that `peer`, seen at `seen_ms` with prefix
    /// `prefix` and (when new) from `source`, fits every cap; `None` if it
    /// cannot. A victim is never pinned nor newer than the newcomer.
    fn make_room(
        &mut self,
        source: Option<Source>,
        prefix: Prefix,
        seen_ms: u64,
        peer: PeerId,
    ) -> Option<Vec<PeerId>> {
        let caps = Caps {
            total: self.config.max_known_peers,
            per_source: self.config.max_known_peers_per_source,
            per_prefix: self.config.max_known_peers_per_prefix,
            min_evict_age_ms: self.config.min_evict_age_ms,
        };
        let pinned = pinned(&self.verified, &self.allowlist);
        self.known
            .make_room(caps, source, prefix, seen_ms, peer, pinned)
    }

    fn tick(&mut self, now: Time, unix_ms: u64) -> Vec<Output> {
        let max_age = self.config.node_info_max_age_ms;
        self.known
            .retain(|e| unix_ms.saturating_sub(e.timestamp_ms) <= max_age);
        let (known, connected) = (&self.known, &self.connected);
        self.verified
            .retain(|p| known.contains_key(p) || connected.contains(p));
        let timeout = self.config.pending_dial_timeout_ms;
        self.pending
            .retain(|_, (_, since)| now.0.saturating_sub(since.0) < timeout);
        if let Some(address) = &self.rotating
            && !self.pending.contains_key(address)
        {
            self.rotating = None;
        }
        self.served.clear();
        self.learned.clear();
        self.forget_old_backoffs(now);

        let mut out = Vec::new();
        let connected: Vec<PeerId> = self.connected.iter().copied().collect();
        for peer in connected.choose_multiple(&mut self.rng, self.config.peers_to_query) {
            out.push(Output::Query { peer: *peer });
        }
        self.dial(now, &mut out);
        out
    }

    fn dialable(&self, now: Time, address: &str) -> bool {
        self.address_free(address) && self.backoff.get(address).is_none_or(|b| b.retry_at <= now)
    }

    /// Whether no dial is on its way to `address` and no peer is connected
    /// there.
    fn address_free(&self, address: &str) -> bool {
        !self.pending.contains_key(address) && !self.connected_at.values().any(|a| a == address)
    }

    /// Whether `peer` is one to dial: not connected, no dial to it in
    /// progress, and acceptable.
    fn wanted(&self, peer: &PeerId, pending_peers: &BTreeSet<PeerId>) -> bool {
        !self.connected.contains(peer) && !pending_peers.contains(peer) && self.acceptable(peer)
    }

    /// The address to dial `entry`'s peer at, if it may be dialled now.
    fn dial_address(&self, now: Time, entry: &Entry) -> Option<String> {
        let address = entry.info.info.addresses.first()?;
        self.dialable(now, address).then(|| address.clone())
    }

    fn dial(&mut self, now: Time, out: &mut Vec<Output>) {
        let pending_peers: BTreeSet<PeerId> =
            self.pending.values().filter_map(|(p, _)| *p).collect();
        // One dial per address a round: `pending` learns of each only as
        // it starts, and identities that all name one address (free to
        // mint) would otherwise take every slot of the round with dials
        // Connections drops as repeats.
        let mut picked: BTreeSet<String> = BTreeSet::new();
        // Allowlisted peers always; the rest up to the connection target.
        let allowlisted: Vec<(PeerId, String)> = self
            .allowlist
            .iter()
            .filter(|p| self.wanted(p, &pending_peers))
            .filter_map(|p| Some((*p, self.dial_address(now, self.known.get(p)?)?)))
            .filter(|(_, address)| picked.insert(address.clone()))
            .collect();
        let slots = self
            .config
            .target_concurrent_connections
            .saturating_sub(self.connected.len() + self.pending.len())
            .saturating_sub(allowlisted.len());
        // Full: one dial more now and then, to rotate a connection.
        let interval = self.config.rotation_interval_ms;
        let due = *self
            .next_rotation
            .get_or_insert(Time(now.0.saturating_add(interval)));
        let rotate = interval > 0 && slots == 0 && now >= due && self.rotating.is_none();
        // A random choice of the others: only as many as are dialled have
        // their addresses checked, the step a full node takes every tick.
        let count = if rotate { 1 } else { slots };
        let mut others = Vec::new();
        if count > 0 {
            let mut candidates: Vec<(&PeerId, &Entry)> = self
                .known
                .iter()
                .filter(|(p, _)| self.wanted(p, &pending_peers) && !self.allowlist.contains(p))
                .collect();
            candidates.shuffle(&mut self.rng);
            others = candidates
                .into_iter()
                .filter_map(|(p, e)| Some((*p, self.dial_address(now, e)?)))
                .filter(|(_, address)| picked.insert(address.clone()))
                .take(count)
                .collect();
        }
        for (peer, address) in allowlisted {
            self.start_dial(now, Some(peer), address, out);
        }
        let mut others_dialled = 0;
        if rotate {
            self.next_rotation = Some(Time(now.0.saturating_add(interval)));
            if let Some((peer, address)) = others.pop() {
                self.rotating = Some(address.clone());
                self.start_dial(now, Some(peer), address, out);
            }
        } else {
            others_dialled = others.len();
            for (peer, address) in others {
                self.start_dial(now, Some(peer), address, out);
            }
        }
        // The seeds: all of them when isolated; otherwise those not
        // connected, while known peers leave room under the target. Peers
        // that stay connected but serve nothing (banned liars) must not
        // keep a node from its seeds for ever.
        let isolated = self.connected.is_empty() && self.pending.is_empty();
        let room = slots.saturating_sub(others_dialled);
        if isolated || room > 0 {
            let seeds: Vec<SeedPeer> = self
                .init
                .seeds
                .iter()
                .filter(|s| {
                    let id = s.peer_id.or_else(|| self.seed_ids.get(&s.address).copied());
                    id != Some(self.init.local)
                        && id.is_none_or(|id| !self.connected.contains(&id))
                        && self.dialable(now, &s.address)
                })
                .take(if isolated { usize::MAX } else { room })
                .cloned()
                .collect();
            for seed in seeds {
                self.start_dial(now, seed.peer_id, seed.address, out);
            }
        }
    }

    /// After `peer` connected at `address`: if that was the rotation dial
    /// and the node now holds more connections than its target, one other
    /// connection, at random, is dropped: never an allowlisted peer nor
    /// one of the anchors (the oldest half of the target); with no other
    /// to drop, the new one goes.
    fn rotated(&mut self, peer: PeerId, address: &str) -> Vec<Output> {
        if self.rotating.as_deref() != Some(address) {
            return vec![];
        }
        self.rotating = None;
        let target = self.config.target_concurrent_connections;
        if self.connected.len() <= target {
            return vec![];
        }
        let mut others: Vec<(u64, PeerId)> = self
            .connected
            .iter()
            .filter(|p| **p != peer && !self.allowlist.contains(*p))
            .map(|p| (self.connected_order.get(p).copied().unwrap_or(0), *p))
            .collect();
        others.sort_unstable();
        let anchors = (target / 2).min(others.len());
        let victim = others[anchors..]
            .choose(&mut self.rng)
            .map_or(peer, |(_, p)| *p);
        vec![Output::Disconnect { peer: victim }]
    }

    /// Unpins the verified peers not connected now past the first
    /// `target_concurrent_connections` to leave, those that left first.
    /// Every peer the node ever connects to is verified, and a sybil that
    /// answers its first query and hangs up stays reachable and known:
    /// pinned for ever, such peers piled up with each connection made and
    /// refused honest newcomers once they filled the table.
    fn limit_pins(&mut self) {
        let (verified, connected) = (&self.verified, &self.connected);
        self.pinned_apart
            .retain(|p| verified.contains(p) && !connected.contains(p));
        let most = self.config.target_concurrent_connections.max(1);
        while self.pinned_apart.len() > most {
            if let Some(p) = self.pinned_apart.pop_front() {
                self.verified.remove(&p);
            }
        }
    }

    /// A dial to `expected` at `address` reached a server whose
    /// certificate names `found` (a claim: the handshake stopped there).
    /// `expected`'s entry named an address that is not its own (an info
    /// gone stale, or one made up to shadow another peer), so it is
    /// forgotten, unless allowlisted. If `found` is one to dial and its own
    /// signed info names that address, it is dialled there at once, past
    /// any backoff of the address (`Some`): identities minted to copy an
    /// honest peer's address otherwise took turns failing there, each
    /// failure backing the address off, and kept the node from dialling
    /// that peer again. Otherwise (`None`) the address is backed off as
    /// for any failed dial, so that fakes naming the address of a peer not
    /// known here cannot have every node dial it again and again.
    fn answered_by_another(
        &mut self,
        now: Time,
        expected: PeerId,
        found: PeerId,
        address: &str,
    ) -> Option<Vec<Output>> {
        if !self.allowlist.contains(&expected) {
            self.known.remove(&expected);
        }
        let pending_peers: BTreeSet<PeerId> =
            self.pending.values().filter_map(|(p, _)| *p).collect();
        let named = (self.known.get(&found))
            .is_some_and(|e| e.info.info.addresses.first().map(String::as_str) == Some(address));
        if !(named && self.address_free(address) && self.wanted(&found, &pending_peers)) {
            return None;
        }
        self.backoff.remove(address);
        let mut out = Vec::new();
        self.start_dial(now, Some(found), address.to_string(), &mut out);
        Some(out)
    }

    fn start_dial(
        &mut self,
        now: Time,
        peer: Option<PeerId>,
        address: String,
        out: &mut Vec<Output>,
    ) {
        self.pending.insert(address.clone(), (peer, now));
        out.push(Output::Dial { peer, address });
    }

    fn serve(
        &mut self,
        id: u64,
        caller: Option<PeerId>,
        info: Option<SignedNodeInfo>,
        unix_ms: u64,
        remote: Option<IpAddr>,
    ) -> Vec<Output> {
        // Anonymous callers share no allowance here, or one stranger could
        // use up everyone's: the GrpcAdapter rates each connection.
        if let Some(caller) = caller {
            let count = self.served.entry(Some(caller)).or_default();
            if *count >= self.config.get_known_peers_rate_limit {
                return vec![Output::RateLimited { id }];
            }
            *count += 1;
        }
        // The entry held for the caller, signed at other addresses than the
        // info it sends: an earlier run's, or another node's that holds the
        // caller's key. It goes back with the answer, for the caller to
        // tell which (no one else can tell the caller its key is used
        // twice: each of the two finds itself at the other's address, and
        // neither is sent its own entry otherwise).
        let twin = match (caller, &info) {
            (Some(caller), Some(sent)) if sent.info.peer_id == caller => self
                .known
                .get(&caller)
                .filter(|e| e.info.info.addresses != sent.info.addresses)
                .map(|e| e.info.clone()),
            _ => None,
        };
        if let Some(caller) = caller {
            // An authenticated call proves the caller is up: dial it again
            // now rather than when an old failure's backoff ends.
            self.end_backoff(caller);
            // Connect-back: only the caller's own info.
            if let Some(info) = info
                && info.info.peer_id == caller
            {
                let source = remote.map_or(Source::Unknown, |ip| Source::Caller(ip_prefix(ip)));
                self.learn_all([Arc::new(info)], source, unix_ms);
            }
        }
        // Drawn by position, the caller's own entry left out: only the
        // entries sent are read (a walk over the whole table cost a cache
        // miss per entry in a large network).
        let skip = caller.and_then(|c| self.known.position(&c));
        let len = self.known.len() - usize::from(skip.is_some());
        let amount = self.config.max_peers_to_send.min(len);
        let mut infos: Vec<Arc<SignedNodeInfo>> =
            rand::seq::index::sample(&mut self.rng, len, amount)
                .into_iter()
                .filter_map(|i| {
                    let position = match skip {
                        Some(s) if i >= s => i + 1,
                        _ => i,
                    };
                    self.known.get_index(position).map(|(_, e)| e.info.clone())
                })
                .collect();
        // First: a caller keeps the first infos of an answer longer than
        // its own bound.
        if let Some(twin) = twin
            && self.config.max_peers_to_send > 0
        {
            infos.truncate(self.config.max_peers_to_send - 1);
            infos.insert(0, twin);
        }
        vec![Output::Answer { id, infos }]
    }
}

#[cfg(test)]
mod tests {
    use soma_types::{KeyPair, NodeInfo};

    use super::*;

    const NOW_MS: u64 = 1_700_000_000_000;
    const DAY_MS: u64 = 24 * 60 * 60 * 1000;

    fn key(n: u8) -> KeyPair {
        KeyPair::from_seed([n; 32])
    }

    fn id(n: u8) -> PeerId {
        PeerId::from(key(n).public())
    }

    fn info(n: u8, timestamp_ms: u64) -> SignedNodeInfo {
        SignedNodeInfo::sign(
            NodeInfo {
                peer_id: id(n),
                addresses: vec![format!("10.0.0.{n}:7000")],
                timestamp_ms,
                access: Access::Public,
            },
            &key(n),
        )
    }

    fn init(target: usize) -> Init {
        let mut init = Init::new(id(0), 9);
        init.config.target_concurrent_connections = target;
        init
    }

    fn core(target: usize) -> DiscoveryCore {
        DiscoveryCore::new(init(target))
    }

    fn learn(c: &mut DiscoveryCore, infos: Vec<SignedNodeInfo>) {
        learn_from(c, 200, NOW_MS, infos);
    }

    /// Infos from peer `source`, arriving when the wall clock reads `unix_ms`:
    /// an answer of a peer dialled in a network of its own.
    fn learn_from(c: &mut DiscoveryCore, source: u8, unix_ms: u64, infos: Vec<SignedNodeInfo>) {
        c.connected_at
            .insert(id(source), format!("172.16.{source}.1:7000"));
        c.handle(
            Time(0),
            Input::Learned {
                source: Some(id(source)),
                infos: infos.into_iter().map(Arc::new).collect(),
                unix_ms,
            },
        );
    }

    fn info_at(n: u8, timestamp_ms: u64, addresses: &[&str]) -> SignedNodeInfo {
        SignedNodeInfo::sign(
            NodeInfo {
                peer_id: id(n),
                addresses: addresses.iter().map(|a| a.to_string()).collect(),
                timestamp_ms,
                access: Access::Public,
            },
            &key(n),
        )
    }

    fn sorted(mut ids: Vec<PeerId>) -> Vec<PeerId> {
        ids.sort();
        ids
    }

    fn ids(ns: impl IntoIterator<Item = u8>) -> Vec<PeerId> {
        sorted(ns.into_iter().map(id).collect())
    }

    fn connect(c: &mut DiscoveryCore, n: u8) {
        c.handle(
            Time(0),
            Input::Connected {
                address: format!("10.0.0.{n}:7000"),
                peer: id(n),
            },
        );
    }

    fn config(edit: impl FnOnce(&mut Config)) -> DiscoveryCore {
        let mut i = init(0);
        edit(&mut i.config);
        DiscoveryCore::new(i)
    }

    /// A dial of peer 1 (at its address in [`info`]) failed at `at`.
    fn peer_1_dial_failed(c: &mut DiscoveryCore, at: u64) -> Vec<Output> {
        c.handle(
            Time(at),
            Input::DialFailed {
                peer: Some(id(1)),
                address: "10.0.0.1:7000".to_string(),
                found: None,
            },
        )
    }

    fn known(c: &mut DiscoveryCore) -> Vec<PeerId> {
        match c.handle(Time(0), Input::KnownPeers).pop() {
            Some(Output::Known(k)) => k.iter().map(|i| i.info.peer_id).collect(),
            other => panic!("{other:?}"),
        }
    }

    fn tick(c: &mut DiscoveryCore, now: Time, unix_ms: u64) -> Vec<Output> {
        c.handle(now, Input::Tick { unix_ms })
    }

    fn dials(out: &[Output]) -> Vec<(Option<PeerId>, String)> {
        out.iter()
            .filter_map(|o| match o {
                Output::Dial { peer, address } => Some((*peer, address.clone())),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn keeps_the_newest_info_per_peer() {
        let mut c = core(8);
        learn(&mut c, vec![info(1, NOW_MS), info(1, NOW_MS - 5)]);
        let Some(Output::Known(k)) = c.handle(Time(0), Input::KnownPeers).pop() else {
            panic!()
        };
        assert_eq!(k.len(), 1);
        assert_eq!(k[0].info.timestamp_ms, NOW_MS);
        learn(&mut c, vec![info(1, NOW_MS + 10)]);
        let Some(Output::Known(k)) = c.handle(Time(0), Input::KnownPeers).pop() else {
            panic!()
        };
        assert_eq!(k[0].info.timestamp_ms, NOW_MS + 10);
        // Older than the info the update brought, newer than the first:
        // the entry compares with the newest.
        learn(&mut c, vec![info(1, NOW_MS + 5)]);
        let Some(Output::Known(k)) = c.handle(Time(0), Input::KnownPeers).pop() else {
            panic!()
        };
        assert_eq!(k[0].info.timestamp_ms, NOW_MS + 10);
    }

    #[test]
    fn never_learns_itself_and_only_allowlisted_peers_when_private() {
        let mut c = core(8);
        learn(&mut c, vec![info(0, NOW_MS)]);
        assert!(known(&mut c).is_empty());

        let mut private = init(8);
        private.access = Access::Private;
        private.allowlist = vec![id(2)];
        let mut c = DiscoveryCore::new(private);
        learn(&mut c, vec![info(1, NOW_MS), info(2, NOW_MS)]);
        assert_eq!(known(&mut c), vec![id(2)]);
    }

    #[test]
    fn expired_infos_are_dropped_at_the_tick() {
        let mut c = core(0);
        learn(
            &mut c,
            vec![info(1, NOW_MS - DAY_MS), info(2, NOW_MS - DAY_MS - 1)],
        );
        tick(&mut c, Time(0), NOW_MS);
        assert_eq!(known(&mut c), vec![id(1)]);
    }

    #[test]
    fn known_peers_are_bounded_dropping_the_oldest() {
        let mut i = init(0);
        i.config.max_known_peers = 2;
        let mut c = DiscoveryCore::new(i);
        learn(
            &mut c,
            vec![info(1, NOW_MS - 10), info(2, NOW_MS - 5), info(3, NOW_MS)],
        );
        let mut k = known(&mut c);
        k.sort();
        let mut want = vec![id(2), id(3)];
        want.sort();
        assert_eq!(k, want);
        // An info older than all kept ones does not get in.
        learn(&mut c, vec![info(4, NOW_MS - 100)]);
        assert!(!known(&mut c).contains(&id(4)));
    }

    #[test]
    fn never_dials_a_connected_or_pending_peer() {
        let mut c = core(8);
        learn(&mut c, vec![info(1, NOW_MS), info(2, NOW_MS)]);
        c.handle(
            Time(0),
            Input::Connected {
                address: String::new(),
                peer: id(1),
            },
        );
        let out = tick(&mut c, Time(0), NOW_MS);
        assert_eq!(
            dials(&out),
            vec![(Some(id(2)), "10.0.0.2:7000".to_string())]
        );
        // Still pending: not dialled again.
        assert!(dials(&tick(&mut c, Time(100), NOW_MS)).is_empty());
        // A pending dial with no answer is forgotten after the timeout.
        let later = Time(30_000);
        assert_eq!(dials(&tick(&mut c, later, NOW_MS)).len(), 1);
    }

    #[test]
    fn dials_up_to_the_target() {
        let mut c = core(2);
        learn(&mut c, (1..=5).map(|n| info(n, NOW_MS)).collect());
        c.handle(
            Time(0),
            Input::Connected {
                address: String::new(),
                peer: id(1),
            },
        );
        assert_eq!(dials(&tick(&mut c, Time(0), NOW_MS)).len(), 1);
    }

    fn disconnects(out: &[Output]) -> Vec<PeerId> {
        out.iter()
            .filter_map(|o| match o {
                Output::Disconnect { peer } => Some(*peer),
                _ => None,
            })
            .collect()
    }

    /// The one dial in `out`, of a known peer.
    fn one_dial(out: &[Output]) -> (PeerId, String) {
        match dials(out).as_slice() {
            [(Some(peer), address)] => (*peer, address.clone()),
            _ => panic!("one dial of a known peer: {out:?}"),
        }
    }

    /// A core at its target of 2 (peers 1 and 2 connected) that knows
    /// peers 1 to 5.
    fn full(edit: impl FnOnce(&mut Init)) -> DiscoveryCore {
        let mut i = init(2);
        edit(&mut i);
        let mut c = DiscoveryCore::new(i);
        learn(&mut c, (1..=5).map(|n| info(n, NOW_MS)).collect());
        connect(&mut c, 1);
        connect(&mut c, 2);
        c
    }

    #[test]
    fn a_full_node_rotates_one_connection_per_interval() {
        let mut c = full(|_| {});
        let interval = Config::default().rotation_interval_ms;
        assert_eq!(dials(&tick(&mut c, Time(0), NOW_MS)), vec![]);
        assert_eq!(dials(&tick(&mut c, Time(interval - 1), NOW_MS)), vec![]);
        let (new, address) = one_dial(&tick(&mut c, Time(interval), NOW_MS));
        assert!(ids(3..=5).contains(&new), "a known peer not connected");
        // One rotation at a time, however many ticks pass.
        assert_eq!(dials(&tick(&mut c, Time(interval + 1), NOW_MS)), vec![]);
        let out = c.handle(
            Time(interval + 2),
            Input::Connected {
                peer: new,
                address: address.clone(),
            },
        );
        // Peer 1, the oldest, is the anchor (half the target of 2).
        let dropped = disconnects(&out);
        assert_eq!(dropped, vec![id(2)], "{out:?}");
        c.handle(Time(interval + 3), Input::Disconnected { peer: dropped[0] });
        // Back at the target: the next rotation an interval later.
        assert_eq!(dials(&tick(&mut c, Time(2 * interval - 1), NOW_MS)), vec![]);
        assert_eq!(dials(&tick(&mut c, Time(2 * interval), NOW_MS)).len(), 1);
    }

    #[test]
    fn a_new_connection_is_asked_for_its_peers_at_once() {
        let mut c = config(|_| {});
        let connected = |c: &mut DiscoveryCore, n: u8| {
            let address = format!("10.0.0.{n}:7000");
            c.handle(
                Time(0),
                Input::Connected {
                    address,
                    peer: id(n),
                },
            )
        };
        assert_eq!(connected(&mut c, 1), vec![Output::Query { peer: id(1) }]);
        // Told again of a connection it holds: no second call.
        assert_eq!(connected(&mut c, 1), vec![]);
        c.handle(Time(0), Input::Disconnected { peer: id(1) });
        assert_eq!(connected(&mut c, 1), vec![Output::Query { peer: id(1) }]);
        assert_eq!(connected(&mut c, 2), vec![Output::Query { peer: id(2) }]);
    }

    #[test]
    fn a_failed_rotation_dial_drops_nothing() {
        let mut c = full(|_| {});
        let interval = Config::default().rotation_interval_ms;
        tick(&mut c, Time(0), NOW_MS);
        let (peer, address) = one_dial(&tick(&mut c, Time(interval), NOW_MS));
        let peer = Some(peer);
        let out = c.handle(
            Time(interval + 1),
            Input::DialFailed {
                peer,
                address,
                found: None,
            },
        );
        assert_eq!(out, vec![]);
        // A dial that connects later is an ordinary one: nothing dropped.
        let out = c.handle(
            Time(interval + 2),
            Input::Connected {
                peer: id(3),
                address: "10.0.0.3:7000".into(),
            },
        );
        assert_eq!(disconnects(&out), vec![]);
    }

    #[test]
    fn rotation_never_drops_an_allowlisted_peer() {
        // Target 1; allowlisted 1 and ordinary 2 connected: the only
        // connection a rotation may drop is 2's.
        let mut c = full(|i| {
            i.allowlist = vec![id(1)];
            i.config.target_concurrent_connections = 1;
        });
        let interval = Config::default().rotation_interval_ms;
        tick(&mut c, Time(0), NOW_MS);
        let (new, address) = one_dial(&tick(&mut c, Time(interval), NOW_MS));
        let out = c.handle(Time(interval + 1), Input::Connected { peer: new, address });
        assert_eq!(disconnects(&out), vec![id(2)]);
    }

    #[test]
    fn rotation_never_drops_the_anchors_the_oldest_half_of_the_target() {
        // Target 4: peers 1 and 2, connected first, are the anchors; 30
        // rotations over peers 3 to 12 never drop them.
        let mut c = core(4);
        learn(&mut c, (1..=12).map(|n| info(n, NOW_MS)).collect());
        for n in 1..=4 {
            connect(&mut c, n);
        }
        let interval = Config::default().rotation_interval_ms;
        tick(&mut c, Time(0), NOW_MS);
        let mut dropped = BTreeSet::new();
        for k in 1..=30 {
            let now = Time(k * interval);
            let (new, address) = one_dial(&tick(&mut c, now, NOW_MS));
            let out = c.handle(now, Input::Connected { peer: new, address });
            let [victim] = disconnects(&out)[..] else {
                panic!("one connection dropped: {out:?}")
            };
            assert!(victim != id(1) && victim != id(2) && victim != new, "{k}");
            dropped.insert(victim);
            c.handle(now, Input::Disconnected { peer: victim });
        }
        // And the rest do move: more than the two first non-anchors went.
        assert!(dropped.len() > 2, "{dropped:?}");
    }

    #[test]
    fn rotation_off_never_dials_past_the_target() {
        let mut c = full(|i| i.config.rotation_interval_ms = 0);
        for minute in 0..10 {
            assert_eq!(dials(&tick(&mut c, Time(minute * 60_000), NOW_MS)), vec![]);
        }
    }

    /// The eviction as it was first written, a scan of the table per
    /// bucket: the reference the indexed version must agree with.
    fn make_room_reference(
        c: &DiscoveryCore,
        source: Option<Source>,
        prefix: Prefix,
        seen_ms: u64,
        peer: PeerId,
    ) -> Option<Vec<PeerId>> {
        let mut chosen = vec![peer];
        let count = |chosen: &[PeerId], in_bucket: &dyn Fn(&Entry) -> bool| {
            c.known
                .iter()
                .filter(|(p, e)| in_bucket(e) && !chosen.contains(p))
                .count()
        };
        let older = |chosen: &[PeerId], in_bucket: &dyn Fn(&Entry) -> bool, limit: u64| {
            c.known
                .iter()
                .filter(|(p, e)| {
                    in_bucket(e)
                        && !chosen.contains(p)
                        && !pinned(&c.verified, &c.allowlist)(p)
                        && e.seen_ms <= limit
                })
                .min_by_key(|(p, e)| (e.seen_ms, **p))
                .map(|(p, _)| *p)
        };
        let victim = |chosen: &[PeerId], in_bucket: &dyn Fn(&Entry) -> bool| {
            older(chosen, in_bucket, seen_ms)
        };
        if let Some(source) = source {
            let in_source = |e: &Entry| e.source == source;
            if count(&chosen, &in_source) >= c.config.max_known_peers_per_source {
                chosen.push(victim(&chosen, &in_source)?);
            }
        }
        let in_prefix = |e: &Entry| e.prefix == prefix;
        if count(&chosen, &in_prefix) >= c.config.max_known_peers_per_prefix {
            // The source holding the most of the prefix gives up its oldest.
            let mut sizes: BTreeMap<Source, usize> = BTreeMap::new();
            for (p, e) in c.known.iter() {
                if in_prefix(e) && !chosen.contains(p) {
                    *sizes.entry(e.source).or_default() += 1;
                }
            }
            let mut sizes: Vec<(Source, usize)> = sizes.into_iter().collect();
            sizes.sort_by_key(|(s, n)| (std::cmp::Reverse(*n), *s));
            let v = sizes
                .iter()
                .find_map(|(s, _)| victim(&chosen, &|e: &Entry| in_prefix(e) && e.source == *s))?;
            chosen.push(v);
        }
        if source.is_some() && count(&chosen, &|_| true) >= c.config.max_known_peers {
            let mut sizes: BTreeMap<Source, usize> = BTreeMap::new();
            for (p, e) in c.known.iter() {
                if !chosen.contains(p) {
                    *sizes.entry(e.source).or_default() += 1;
                }
            }
            let mut sizes: Vec<(Source, usize)> = sizes.into_iter().collect();
            sizes.sort_by_key(|(s, n)| (std::cmp::Reverse(*n), *s));
            // From the fullest buckets, an entry seen long enough before,
            // or the newcomer's own source's oldest; with no age asked,
            // any bucket's oldest.
            let age = c.config.min_evict_age_ms;
            let (old_enough, searched) = match age {
                0 => (Some(seen_ms), sizes.len()),
                _ => (seen_ms.checked_sub(age), EVICTION_SEARCH_BUCKETS),
            };
            let v = sizes.iter().take(searched).find_map(|(s, _)| {
                let limit = if source == Some(*s) {
                    Some(seen_ms)
                } else {
                    old_enough
                };
                older(&chosen, &|e: &Entry| e.source == *s, limit?)
            })?;
            chosen.push(v);
        }
        chosen.remove(0);
        Some(chosen)
    }

    #[test]
    fn eviction_from_the_bucket_index_chooses_what_a_scan_per_bucket_chooses() {
        use rand::Rng;
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let unsigned = |peer: PeerId| SignedNodeInfo {
            info: NodeInfo {
                peer_id: peer,
                addresses: vec![],
                timestamp_ms: 0,
                access: Access::Public,
            },
            signature: soma_types::Signature([0; 64]),
        };
        // More sources than a search for an old enough entry reads.
        let mut sources = vec![
            Source::Unknown,
            Source::Caller(Prefix::V4(0x01_02_03)),
            Source::Dialled(Prefix::V4(0x01_02_03)),
            Source::Dialled(Prefix::V4(0x01_02_05)),
        ];
        sources.extend((0..EVICTION_SEARCH_BUCKETS).map(Source::Seed));
        let prefixes = [0u32, 1, 2, 3].map(|n| Prefix::V4(0x0a_00_00 | n));
        let (mut evicted, mut refused) = (0, [0; 3]);
        for case in 0..3_000 {
            // No age asked, one some entries pass, one none can.
            let ages = [0, 20, 100];
            let kind = case % ages.len();
            let mut c = config(|c| {
                c.max_known_peers = 30;
                c.max_known_peers_per_source = 9;
                c.max_known_peers_per_prefix = 10;
                c.min_evict_age_ms = ages[kind];
            });
            let mut peers = Vec::new();
            for _ in 0..rng.random_range(0..40) {
                let peer = PeerId(rng.random());
                let entry = Entry {
                    timestamp_ms: 0,
                    info: unsigned(peer).into(),
                    source: *sources.choose(&mut rng).unwrap(),
                    prefix: *prefixes.choose(&mut rng).unwrap(),
                    seen_ms: rng.random_range(0..50),
                };
                c.known.insert(peer, entry);
                peers.push(peer);
                if rng.random_bool(0.2) {
                    c.verified.insert(peer);
                }
            }
            // Updates and removals move entries between buckets: the
            // index must follow. Newer infos are indexed lazily and settled
            // where a bucket is walked: rounds of updates and evictions, so
            // that walks meet entries left unsettled by earlier walks.
            for _round in 0..3 {
                for _ in 0..rng.random_range(0..10) {
                    let Some(&peer) = peers.choose(&mut rng) else {
                        break;
                    };
                    match c.known.get(&peer).cloned() {
                        Some(_) if rng.random_bool(0.3) => {
                            c.known.remove(&peer);
                        }
                        Some(entry) => {
                            // Half keep their prefix: a newer info seen
                            // later is then indexed lazily.
                            let prefix = if rng.random_bool(0.5) {
                                entry.prefix
                            } else {
                                *prefixes.choose(&mut rng).unwrap()
                            };
                            let seen_ms = rng.random_range(0..50);
                            c.known.update(peer, entry.info, prefix, seen_ms);
                        }
                        None => {}
                    }
                }
                let source = rng
                    .random_bool(0.8)
                    .then(|| *sources.choose(&mut rng).unwrap());
                let prefix = *prefixes.choose(&mut rng).unwrap();
                let (seen_ms, peer) = (rng.random_range(0..60), PeerId(rng.random()));
                let want = make_room_reference(&c, source, prefix, seen_ms, peer);
                assert_eq!(c.make_room(source, prefix, seen_ms, peer), want);
                evicted += want.as_ref().map_or(0, |v| v.len());
                refused[kind] += usize::from(want.is_none());
            }
        }
        // The cases reach the caps: evictions happen, often, and an age
        // asked refuses newcomers more often the longer it is.
        assert!(evicted > 1_000, "{evicted}");
        assert!(
            refused[0] < refused[1] && refused[1] < refused[2],
            "{refused:?}"
        );
    }

    #[test]
    fn a_cap_of_zero_admits_no_peer() {
        let caps: [fn(&mut Config); 3] = [
            |c| c.max_known_peers = 0,
            |c| c.max_known_peers_per_source = 0,
            |c| c.max_known_peers_per_prefix = 0,
        ];
        for cap in caps {
            let mut c = config(cap);
            learn(&mut c, vec![info(1, NOW_MS), info(2, NOW_MS)]);
            assert_eq!(known(&mut c), vec![]);
        }
    }

    /// A seed configured in another spelling is dialled, and counted
    /// connected, as infos spell its address: a fake advertising it so is
    /// not dialled while the seed is connected.
    #[test]
    fn a_seed_is_dialled_at_its_address_as_infos_spell_it() {
        let mut i = init(8);
        i.seeds = vec![SeedPeer {
            peer_id: None,
            address: "[2001:DB8:0::1]:7000".into(),
        }];
        let mut c = DiscoveryCore::new(i);
        let address = "[2001:db8::1]:7000".to_string();
        assert_eq!(
            dials(&tick(&mut c, Time(0), NOW_MS)),
            vec![(None, address.clone())]
        );
        c.handle(
            Time(20),
            Input::Connected {
                address: address.clone(),
                peer: id(7),
            },
        );
        learn(&mut c, vec![info_at(9, NOW_MS, &[&address])]);
        assert!(dials(&tick(&mut c, Time(5_000), NOW_MS)).is_empty());
    }

    #[test]
    fn a_connected_seed_is_not_dialled_again() {
        let mut i = init(8);
        i.seeds = vec![SeedPeer {
            peer_id: None,
            address: "seed:1".into(),
        }];
        let mut c = DiscoveryCore::new(i);
        assert_eq!(
            dials(&tick(&mut c, Time(0), NOW_MS)),
            vec![(None, "seed:1".to_string())]
        );
        // Pending: no second dial.
        assert!(dials(&tick(&mut c, Time(10), NOW_MS)).is_empty());
        c.handle(
            Time(20),
            Input::Connected {
                address: "seed:1".into(),
                peer: id(7),
            },
        );
        c.handle(
            Time(20),
            Input::DialFailed {
                peer: None,
                address: "seed:1".into(),
                found: None,
            },
        );
        // Connected to someone: seeds are left alone.
        assert!(dials(&tick(&mut c, Time(60_000), NOW_MS)).is_empty());
        c.handle(Time(60_000), Input::Disconnected { peer: id(7) });
        assert_eq!(dials(&tick(&mut c, Time(120_000), NOW_MS)).len(), 1);
    }

    #[test]
    fn seeds_are_redialled_while_other_peers_leave_room_under_the_target() {
        let mut i = init(8);
        i.seeds = vec![SeedPeer {
            peer_id: None,
            address: "seed:1".into(),
        }];
        let mut c = DiscoveryCore::new(i);
        // Connected to a peer that is not the seed (say, one that is
        // banned and serves nothing): the seed is dialled all the same.
        c.handle(
            Time(0),
            Input::Connected {
                address: "10.0.0.3:7000".into(),
                peer: id(3),
            },
        );
        assert_eq!(
            dials(&tick(&mut c, Time(0), NOW_MS)),
            vec![(None, "seed:1".to_string())]
        );
        c.handle(
            Time(10),
            Input::Connected {
                address: "seed:1".into(),
                peer: id(7),
            },
        );
        // Connected: left alone.
        assert!(dials(&tick(&mut c, Time(20), NOW_MS)).is_empty());
        // Gone while the other peer stays: dialled again.
        c.handle(Time(30), Input::Disconnected { peer: id(7) });
        assert_eq!(
            dials(&tick(&mut c, Time(40), NOW_MS)),
            vec![(None, "seed:1".to_string())]
        );
    }

    #[test]
    fn with_no_room_under_the_target_a_connected_node_leaves_its_seeds_alone() {
        let mut i = init(1);
        i.seeds = vec![SeedPeer {
            peer_id: None,
            address: "seed:1".into(),
        }];
        let mut c = DiscoveryCore::new(i);
        c.handle(
            Time(0),
            Input::Connected {
                address: "10.0.0.3:7000".into(),
                peer: id(3),
            },
        );
        assert!(dials(&tick(&mut c, Time(0), NOW_MS)).is_empty());
    }

    #[test]
    fn a_seed_dialled_by_address_is_no_longer_pending_once_connected() {
        let mut i = init(8);
        i.seeds = vec![SeedPeer {
            peer_id: None,
            address: "seed:1".into(),
        }];
        let mut c = DiscoveryCore::new(i);
        assert_eq!(dials(&tick(&mut c, Time(0), NOW_MS)).len(), 1);
        c.handle(
            Time(10),
            Input::Connected {
                address: "seed:1".into(),
                peer: id(7),
            },
        );
        c.handle(Time(20), Input::Disconnected { peer: id(7) });
        // Isolated again: the seed is redialled at the next round, not after
        // the pending-dial timeout.
        assert_eq!(
            dials(&tick(&mut c, Time(5_000), NOW_MS)),
            vec![(None, "seed:1".to_string())]
        );
    }

    /// Only an info signed with this node's key, since it started, at
    /// other addresses than its own is another node's, told at most once
    /// per interval.
    #[test]
    fn an_info_of_this_nodes_identity_from_another_node_is_told_once_per_interval() {
        let ours = "203.0.113.1:7000";
        let mut c = DiscoveryCore::new(Init {
            addresses: vec![ours.into()],
            ..init(8)
        });
        let told = |c: &mut DiscoveryCore, at: u64, info: SignedNodeInfo| {
            c.connected_at.insert(id(7), "172.16.7.1:7000".into());
            let out = c.handle(
                Time(at),
                Input::Learned {
                    source: Some(id(7)),
                    infos: vec![Arc::new(info)],
                    unix_ms: NOW_MS + at,
                },
            );
            let told: Vec<Output> = (out.into_iter())
                .filter(|o| matches!(o, Output::SameKeyElsewhere { .. }))
                .collect();
            told
        };
        tick(&mut c, Time(0), NOW_MS);
        let elsewhere = |at: u64| info_at(0, NOW_MS + at, &["198.51.100.9:7000"]);
        let told_there = vec![Output::SameKeyElsewhere {
            addresses: vec!["198.51.100.9:7000".into()],
        }];
        // Its own info, passed on by a peer: nothing to tell.
        assert_eq!(told(&mut c, 1, info_at(0, NOW_MS + 1, &[ours])), []);
        // Its info of an earlier run, from before its address changed.
        assert_eq!(
            told(&mut c, 2, info_at(0, NOW_MS - 1, &["198.51.100.9:7000"])),
            []
        );
        // Signed since it started, at other addresses: another node.
        assert_eq!(told(&mut c, 3, elsewhere(3)), told_there);
        assert!(!c.known_peers().any(|p| *p == id(0)), "never its own entry");
        // Within the interval, not told again; once it has passed, told.
        let interval = SAME_KEY_WARNING_INTERVAL_MS;
        assert_eq!(told(&mut c, 4, elsewhere(4)), []);
        assert_eq!(told(&mut c, 3 + interval - 1, elsewhere(interval)), []);
        assert_eq!(
            told(&mut c, 3 + interval, elsewhere(interval + 1)),
            told_there
        );
        // A core not told its addresses judges nothing.
        let mut blind = core(8);
        tick(&mut blind, Time(0), NOW_MS);
        assert_eq!(told(&mut blind, 3, elsewhere(3)), []);
    }

    #[test]
    fn a_seed_found_to_be_this_node_is_never_dialled_again() {
        let seed = "192.0.2.10:7000";
        let mut i = init(8);
        i.seeds = vec![SeedPeer {
            peer_id: None,
            address: seed.into(),
        }];
        let local = i.local;
        let mut c = DiscoveryCore::new(i);
        assert_eq!(
            dials(&tick(&mut c, Time(0), NOW_MS)),
            vec![(None, seed.to_string())]
        );
        // Connections found the server to be this node (the actor's
        // translation of `DialError::Ourselves`).
        c.handle(
            Time(10),
            Input::AlreadyConnected {
                peer: local,
                address: seed.into(),
            },
        );
        // Alone, every round dials its seeds; never this one again.
        let timeout = c.config.pending_dial_timeout_ms;
        for round in 1..=5 {
            let now = Time(round * timeout);
            assert_eq!(dials(&tick(&mut c, now, NOW_MS)), vec![], "round {round}");
        }
    }

    /// A seed dialled at an IP address that turns out to be a peer
    /// connected already (under the address it advertises) is not dialled
    /// again while that peer stays: before, its dial stayed pending until
    /// the pending-dial timeout and the seed was dialled after it, again
    /// and again. A seed at a host name, which may name other servers
    /// too, is dialled again after a backoff, as after a failure.
    #[test]
    fn a_seed_that_is_a_peer_held_is_not_dialled_again_while_it_stays() {
        let seed = "192.0.2.10:7000";
        let mut i = init(8);
        i.seeds = ["seed.example:7000", seed]
            .map(|address| SeedPeer {
                peer_id: None,
                address: address.into(),
            })
            .to_vec();
        let mut c = DiscoveryCore::new(i);
        c.handle(
            Time(0),
            Input::Connected {
                address: "10.0.0.7:7000".into(),
                peer: id(7),
            },
        );
        let both = vec![
            (None, "seed.example:7000".to_string()),
            (None, seed.to_string()),
        ];
        assert_eq!(dials(&tick(&mut c, Time(0), NOW_MS)), both);
        for address in ["seed.example:7000", seed] {
            let address = address.into();
            c.handle(
                Time(10),
                Input::AlreadyConnected {
                    peer: id(7),
                    address,
                },
            );
        }
        // Rounds well past the pending-dial timeout: the seed at an IP
        // address is left alone; the one at a host name is dialled again
        // once its backoff ends.
        let backoff = c.config.dial_backoff_ms;
        assert_eq!(dials(&tick(&mut c, Time(10 + backoff - 1), NOW_MS)), vec![]);
        assert_eq!(
            dials(&tick(&mut c, Time(10 + backoff), NOW_MS)),
            vec![(None, "seed.example:7000".to_string())]
        );
        let timeout = c.config.pending_dial_timeout_ms;
        for round in 1..=3 {
            let now = Time(round * timeout);
            let dialled = dials(&tick(&mut c, now, NOW_MS));
            assert!(
                !dialled.contains(&(None, seed.to_string())),
                "round {round}"
            );
        }
        // Gone: the seed is dialled again at once.
        c.handle(Time(4 * timeout), Input::Disconnected { peer: id(7) });
        assert!(
            dials(&tick(&mut c, Time(4 * timeout + 1), NOW_MS)).contains(&(None, seed.to_string()))
        );
    }

    #[test]
    fn failed_dials_back_off_exponentially() {
        let mut c = core(8);
        learn(&mut c, vec![info(1, NOW_MS)]);
        assert_eq!(dials(&tick(&mut c, Time(0), NOW_MS)).len(), 1);
        peer_1_dial_failed(&mut c, 0);
        assert!(dials(&tick(&mut c, Time(999), NOW_MS)).is_empty());
        assert_eq!(dials(&tick(&mut c, Time(1_000), NOW_MS)).len(), 1);
        peer_1_dial_failed(&mut c, 1_000);
        assert!(dials(&tick(&mut c, Time(2_999), NOW_MS)).is_empty());
        assert_eq!(dials(&tick(&mut c, Time(3_000), NOW_MS)).len(), 1);
    }

    #[test]
    fn allowlisted_peers_are_dialled_first_and_past_the_target() {
        let mut i = init(1);
        i.allowlist = vec![id(5), id(6)];
        let mut c = DiscoveryCore::new(i);
        learn(&mut c, (1..=6).map(|n| info(n, NOW_MS)).collect());
        let got: Vec<_> = dials(&tick(&mut c, Time(0), NOW_MS))
            .into_iter()
            .map(|(p, _)| p.unwrap())
            .collect();
        assert_eq!(got, vec![id(5), id(6)]);
    }

    #[test]
    fn queries_at_most_peers_to_query_connected_peers() {
        let mut c = core(0);
        for n in 1..=5 {
            c.handle(
                Time(0),
                Input::Connected {
                    address: String::new(),
                    peer: id(n),
                },
            );
        }
        let queries = tick(&mut c, Time(0), NOW_MS)
            .iter()
            .filter(|o| matches!(o, Output::Query { .. }))
            .count();
        assert_eq!(queries, 3);
    }

    #[test]
    fn a_caller_is_sent_its_own_entry_only_if_signed_at_other_addresses() {
        let mut i = init(0);
        i.config.max_peers_to_send = 3;
        let mut c = DiscoveryCore::new(i);
        learn(
            &mut c,
            (1..=5)
                .map(|n| info_at(n, NOW_MS, &[&format!("198.51.100.{n}:7000")]))
                .collect(),
        );
        let serve = |c: &mut DiscoveryCore, sent: SignedNodeInfo| {
            let out = c.handle(
                Time(0),
                Input::Serve {
                    id: 1,
                    caller: Some(id(2)),
                    info: Some(sent),
                    unix_ms: NOW_MS + 10,
                    remote: None,
                },
            );
            let [Output::Answer { infos, .. }] = &out[..] else {
                panic!("{out:?}")
            };
            infos.clone()
        };
        // The same addresses: its own entry is not sent back.
        let infos = serve(&mut c, info_at(2, NOW_MS + 1, &["198.51.100.2:7000"]));
        assert_eq!(infos.len(), 3);
        assert!(infos.iter().all(|i| i.info.peer_id != id(2)), "{infos:?}");
        // Another node signs with its key, elsewhere: the entry held goes
        // back to it, within the bound, first.
        let infos = serve(&mut c, info_at(2, NOW_MS + 2, &["203.0.113.2:7000"]));
        assert_eq!(infos.len(), 3);
        assert_eq!(
            infos.iter().filter(|i| i.info.peer_id == id(2)).count(),
            1,
            "{infos:?}"
        );
        assert_eq!(infos[0].info.addresses, ["198.51.100.2:7000"]);
        assert_eq!(infos[0].info.timestamp_ms, NOW_MS + 1);
    }

    #[test]
    fn serving_remembers_only_the_callers_own_info_and_is_rate_limited() {
        let mut i = init(0);
        i.config.get_known_peers_rate_limit = 2;
        let mut c = DiscoveryCore::new(i);
        learn(&mut c, vec![info(1, NOW_MS)]);
        // Peer 2 sends peer 3's info as its own: not remembered.
        let out = c.handle(
            Time(0),
            Input::Serve {
                id: 1,
                caller: Some(id(2)),
                info: Some(info(3, NOW_MS)),
                unix_ms: NOW_MS,
                remote: None,
            },
        );
        assert!(matches!(&out[0], Output::Answer { id: 1, infos } if infos.len() == 1));
        assert!(!known(&mut c).contains(&id(3)));
        // Its own info is (connect-back), and it is not sent back to itself.
        let out = c.handle(
            Time(0),
            Input::Serve {
                id: 2,
                caller: Some(id(2)),
                info: Some(info(2, NOW_MS)),
                unix_ms: NOW_MS,
                remote: None,
            },
        );
        assert!(known(&mut c).contains(&id(2)));
        let Output::Answer { infos, .. } = &out[0] else {
            panic!()
        };
        assert!(infos.iter().all(|i| i.info.peer_id != id(2)));
        // Third call this interval: refused; the next interval resets.
        let serve = |c: &mut DiscoveryCore, id| {
            c.handle(
                Time(0),
                Input::Serve {
                    id,
                    caller: Some(self::id(2)),
                    info: None,
                    unix_ms: NOW_MS,
                    remote: None,
                },
            )
        };
        assert_eq!(serve(&mut c, 3), vec![Output::RateLimited { id: 3 }]);
        tick(&mut c, Time(5_000), NOW_MS);
        assert!(matches!(serve(&mut c, 4)[0], Output::Answer { .. }));
    }

    /// A core that knows peers 1 to 10 and sends `max_peers_to_send`.
    fn knowing_ten(max_peers_to_send: usize) -> DiscoveryCore {
        let mut i = init(0);
        i.config.max_peers_to_send = max_peers_to_send;
        let mut c = DiscoveryCore::new(i);
        learn(&mut c, (1..=10).map(|n| info(n, NOW_MS)).collect());
        c
    }

    /// The infos of the answer to GetKnownPeers call `id` from `caller`.
    fn answer(c: &mut DiscoveryCore, id: u64, caller: Option<PeerId>) -> Vec<Arc<SignedNodeInfo>> {
        let serve = Input::Serve {
            id,
            caller,
            info: None,
            unix_ms: NOW_MS,
            remote: None,
        };
        match c.handle(Time(0), serve).pop() {
            Some(Output::Answer { infos, .. }) => infos,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn answers_are_a_bounded_random_sample() {
        let mut c = knowing_ten(3);
        let serve = |c: &mut DiscoveryCore, id| answer(c, id, None);
        let a = serve(&mut c, 1);
        assert_eq!(a.len(), 3);
        let samples: std::collections::HashSet<Vec<PeerId>> = (2..8)
            .map(|id| serve(&mut c, id).iter().map(|i| i.info.peer_id).collect())
            .collect();
        assert!(samples.len() > 1, "every sample was the same");
    }

    #[test]
    fn an_answer_with_room_for_all_holds_every_peer_but_the_caller() {
        // Answers are drawn by position in the table: wherever the caller
        // lies, it is left out and every other peer can be drawn.
        let mut c = knowing_ten(9);
        let answer = |c: &mut DiscoveryCore, caller: Option<PeerId>| {
            sorted(
                answer(c, 1, caller)
                    .iter()
                    .map(|i| i.info.peer_id)
                    .collect(),
            )
        };
        for caller in 1..=10 {
            let others = ids((1..=10).filter(|n| *n != caller));
            assert_eq!(answer(&mut c, Some(id(caller))), others, "caller {caller}");
            tick(&mut c, Time(0), NOW_MS);
        }
        // A caller the table does not hold: any 9 of the 10.
        let mut drawn = answer(&mut c, Some(id(11)));
        drawn.dedup();
        assert_eq!(drawn.len(), 9);
        assert!(drawn.iter().all(|p| ids(1..=10).contains(p)));
    }

    #[test]
    fn future_timestamps_count_as_now_when_evicting() {
        let mut c = config(|c| c.max_known_peers = 2);
        // Stamped 25 s ahead, it arrives at NOW: it counts as seen at NOW.
        learn_from(&mut c, 200, NOW_MS, vec![info(1, NOW_MS + 25_000)]);
        learn_from(&mut c, 200, NOW_MS + 1, vec![info(2, NOW_MS + 1)]);
        // The next newcomer evicts the future-stamped entry, not peer 2.
        learn_from(&mut c, 200, NOW_MS + 2, vec![info(3, NOW_MS + 2)]);
        assert_eq!(sorted(known(&mut c)), ids([2, 3]));
        // Another one stamped ahead, arriving at NOW, is older than both.
        learn_from(&mut c, 200, NOW_MS, vec![info(4, NOW_MS + 25_000)]);
        assert_eq!(sorted(known(&mut c)), ids([2, 3]));
    }

    #[test]
    fn a_source_fills_only_its_own_bucket() {
        let mut c = config(|c| {
            c.max_known_peers_per_source = 3;
            c.max_known_peers = 10;
        });
        // Source 100 sends ten peers: its bucket keeps the three newest.
        let lies = (1..=10).map(|n| info(n, NOW_MS + u64::from(n))).collect();
        learn_from(&mut c, 100, NOW_MS + 100, lies);
        assert_eq!(sorted(known(&mut c)), ids([8, 9, 10]));
        // Another source's peers are untouched by it.
        learn_from(
            &mut c,
            101,
            NOW_MS,
            vec![info(11, NOW_MS), info(12, NOW_MS)],
        );
        learn_from(&mut c, 100, NOW_MS + 100, vec![info(13, NOW_MS + 50)]);
        assert_eq!(sorted(known(&mut c)), ids([9, 10, 11, 12, 13]));
    }

    #[test]
    fn a_full_table_evicts_from_the_fullest_source_bucket() {
        let mut c = config(|c| c.max_known_peers = 4);
        // Peer 1 is the oldest entry, but its source holds one peer only.
        learn_from(&mut c, 101, NOW_MS, vec![info(1, NOW_MS - 100)]);
        let three = (2..=4).map(|n| info(n, NOW_MS + u64::from(n))).collect();
        learn_from(&mut c, 100, NOW_MS + 10, three);
        learn_from(&mut c, 102, NOW_MS + 10, vec![info(5, NOW_MS + 5)]);
        assert_eq!(sorted(known(&mut c)), ids([1, 3, 4, 5]));
    }

    /// With an eviction age, a full table gives a newcomer from another
    /// source only the place of an entry seen that long before it; the
    /// newcomer's own source gives up its oldest whatever its age.
    #[test]
    fn a_full_table_keeps_entries_seen_less_than_the_eviction_age_before_a_newcomer() {
        let mut c = config(|c| {
            c.max_known_peers = 4;
            c.min_evict_age_ms = 30_000;
        });
        let then = NOW_MS - 10_000;
        learn_from(&mut c, 100, NOW_MS, vec![info(1, then)]);
        // Peers 2, 3 and 4 seen 2 ms, 1 ms and 0 ms before peer 1.
        let three = (2..=4).map(|n| info(n, then + u64::from(n) - 4)).collect();
        learn_from(&mut c, 101, NOW_MS, three);
        // 10 s newer than every entry, and 1 ms short of 30 s newer than
        // the oldest: refused.
        learn_from(&mut c, 102, NOW_MS, vec![info(5, NOW_MS)]);
        let late = then + 30_000;
        learn_from(&mut c, 102, late, vec![info(6, late - 3)]);
        assert_eq!(sorted(known(&mut c)), ids([1, 2, 3, 4]));
        // From the fullest source itself: its oldest goes, however fresh.
        learn_from(&mut c, 101, NOW_MS, vec![info(7, NOW_MS)]);
        assert_eq!(sorted(known(&mut c)), ids([1, 3, 4, 7]));
        // 30 s after peer 3: the oldest of the fullest bucket goes, not
        // peer 1 of a smaller one.
        learn_from(&mut c, 102, late, vec![info(8, late)]);
        assert_eq!(sorted(known(&mut c)), ids([1, 4, 7, 8]));
    }

    #[test]
    fn new_peers_per_source_per_interval_are_capped() {
        let mut c = config(|c| c.max_new_peers_per_source_per_interval = 2);
        learn_from(
            &mut c,
            100,
            NOW_MS,
            (1..=5).map(|n| info(n, NOW_MS)).collect(),
        );
        assert_eq!(sorted(known(&mut c)), ids([1, 2]));
        // The allowance is per interval, not per answer.
        learn_from(&mut c, 100, NOW_MS, vec![info(7, NOW_MS)]);
        assert_eq!(sorted(known(&mut c)), ids([1, 2]));
        // Newer infos of known peers are not new peers; another source has
        // its own allowance.
        learn_from(&mut c, 100, NOW_MS, vec![info(1, NOW_MS + 1)]);
        learn_from(&mut c, 101, NOW_MS, vec![info(3, NOW_MS)]);
        assert_eq!(sorted(known(&mut c)), ids([1, 2, 3]));
        tick(&mut c, Time(5_000), NOW_MS);
        learn_from(
            &mut c,
            100,
            NOW_MS,
            (4..=6).map(|n| info(n, NOW_MS)).collect(),
        );
        assert_eq!(sorted(known(&mut c)), ids([1, 2, 3, 4, 5]));
    }

    /// Answers count in the bucket of the network their peer was dialled
    /// in: identities of one network share one allowance, peers of
    /// another have their own, callers of the network have theirs, and
    /// an answer from a peer no longer connected is dropped, never counted
    /// in a bucket of its identity's own.
    #[test]
    fn answers_count_by_the_network_their_peer_was_dialled_in() {
        let mut c = config(|c| c.max_new_peers_per_source_per_interval = 2);
        let answer = |c: &mut DiscoveryCore, source: u8, address: &str, infos: &[u8]| {
            if !address.is_empty() {
                c.handle(
                    Time(0),
                    Input::Connected {
                        peer: id(source),
                        address: address.to_string(),
                    },
                );
            }
            c.handle(
                Time(0),
                Input::Learned {
                    source: Some(id(source)),
                    infos: infos.iter().map(|&n| Arc::new(info(n, NOW_MS))).collect(),
                    unix_ms: NOW_MS,
                },
            );
        };
        answer(&mut c, 100, "198.51.100.1:7000", &[1, 2]);
        answer(&mut c, 101, "198.51.100.2:7000", &[3, 4]);
        answer(&mut c, 102, "203.0.113.9:7000", &[5, 6]);
        assert_eq!(sorted(known(&mut c)), ids([1, 2, 5, 6]));
        // A caller from the first network has an allowance of its own:
        // callers cannot use up what dialled peers bring, nor the reverse.
        let caller = Input::Serve {
            id: 1,
            caller: Some(id(7)),
            info: Some(info(7, NOW_MS)),
            unix_ms: NOW_MS,
            remote: Some("198.51.100.9".parse().unwrap()),
        };
        c.handle(Time(0), caller);
        assert_eq!(sorted(known(&mut c)), ids([1, 2, 5, 6, 7]));
        // The answers of a peer no longer connected, or never, are dropped,
        // not counted in a bucket beside its network's.
        answer(&mut c, 103, "192.0.2.1:7000", &[]);
        c.handle(Time(0), Input::Disconnected { peer: id(103) });
        answer(&mut c, 103, "", &[8, 9]);
        answer(&mut c, 104, "", &[10, 11]);
        assert_eq!(sorted(known(&mut c)), ids([1, 2, 5, 6, 7]));
    }

    /// Newcomers that find no room (every entry newer, none evictable)
    /// still count against their source's allowance: each cost a walk
    /// over the source buckets, and a source sending only infos older
    /// than the table's entries could otherwise buy that walk for every
    /// info of every answer.
    #[test]
    fn newcomers_refused_for_want_of_room_count_against_the_allowance() {
        let mut c = config(|c| {
            c.max_known_peers = 4;
            c.max_new_peers_per_source_per_interval = 3;
        });
        for (source, peers) in [(100, [1, 2]), (102, [3, 4])] {
            let fresh = peers.map(|n| info(n, NOW_MS + 100)).to_vec();
            learn_from(&mut c, source, NOW_MS + 100, fresh);
        }
        assert_eq!(sorted(known(&mut c)), ids([1, 2, 3, 4]));
        // Three older newcomers from source 101: no room for any.
        let old = (5..=7).map(|n| info(n, NOW_MS)).collect();
        learn_from(&mut c, 101, NOW_MS + 100, old);
        assert_eq!(sorted(known(&mut c)), ids([1, 2, 3, 4]));
        // A newer one that would have room is past the allowance now.
        learn_from(&mut c, 101, NOW_MS + 200, vec![info(8, NOW_MS + 200)]);
        assert_eq!(sorted(known(&mut c)), ids([1, 2, 3, 4]));
        // Next interval it is taken, in place of the fullest bucket's
        // oldest entry.
        tick(&mut c, Time(10_000), NOW_MS + 200);
        learn_from(&mut c, 101, NOW_MS + 200, vec![info(8, NOW_MS + 200)]);
        assert_eq!(known(&mut c).len(), 4);
        assert!(known(&mut c).contains(&id(8)));
    }

    #[test]
    fn a_prefix_is_the_24_or_32_bits_and_orders_as_the_address() {
        let p = |a: &str| prefix(a, false).unwrap();
        assert_eq!(p("1.2.3.4:2"), Prefix::V4(0x01_02_03));
        assert_eq!(p("1.2.3.4:2"), p("1.2.3.254:3"));
        // An IPv4-mapped address is refused (one spelling per address),
        // but a caller's counts as its IPv4 address.
        assert_eq!(prefix("[::ffff:1.2.3.9]:2", false), None);
        assert_eq!(ip_prefix("::ffff:1.2.3.9".parse().unwrap()), p("1.2.3.4:2"));
        assert_eq!(p("[2001:db8:1:2::1]:2"), Prefix::V6(0x2001_0db8));
        // Every /64 of one /32 is one network.
        assert_eq!(p("[2001:db8:1:2::1]:2"), p("[2001:db8:ffff:9::9]:2"));
        assert_ne!(p("[2001:db8::1]:2"), p("[2001:db9::1]:2"));
        let ordered = [
            "1.2.3.4:2",
            "1.2.4.1:2",
            "1.3.0.1:2",
            "2.0.0.1:2",
            "[2001:1::1]:2",
        ];
        assert!(ordered.windows(2).all(|w| p(w[0]) < p(w[1])));
    }

    #[test]
    fn an_address_prefix_fills_only_its_own_bucket() {
        let mut c = config(|c| c.max_known_peers_per_prefix = 2);
        let at = |n: u8, a: &str| info_at(n, NOW_MS + u64::from(n), &[a]);
        learn_from(
            &mut c,
            100,
            NOW_MS + 100,
            vec![
                at(1, "1.2.3.1:7000"),
                at(2, "1.2.3.2:7000"),
                at(3, "1.2.3.3:7000"),
                at(4, "1.2.4.4:7000"),
                at(5, "[2001:db8::5]:7000"),
                at(6, "[2001:db8:0:1::ffff:6]:7000"),
                at(7, "[2001:db8:ff::7]:7000"),
                at(8, "[2001:db9::8]:7000"),
            ],
        );
        // 1.2.3/24 and 2001:db8::/32 keep their two newest.
        assert_eq!(sorted(known(&mut c)), ids([2, 3, 4, 6, 7, 8]));
        // A known peer moving into a full prefix evicts its oldest.
        let moved = info_at(4, NOW_MS + 50, &["1.2.3.9:7000"]);
        learn_from(&mut c, 100, NOW_MS + 100, vec![moved]);
        assert_eq!(sorted(known(&mut c)), ids([3, 4, 6, 7, 8]));
    }

    /// Sybils the node connects to, each answering and hanging up, stay
    /// known: only the last `target_concurrent_connections` of them to
    /// leave stay pinned. Pinned for ever, they filled the table, and an
    /// honest newcomer, however new its info, was refused.
    #[test]
    fn only_the_last_peers_to_leave_stay_pinned_apart() {
        let mut c = config(|c| {
            c.max_known_peers = 4;
            c.target_concurrent_connections = 2;
        });
        let sybils = [11, 12, 13, 14];
        learn(&mut c, sybils.map(|n| info(n, NOW_MS)).to_vec());
        for n in sybils {
            connect(&mut c, n);
            c.handle(Time(0), Input::Disconnected { peer: id(n) });
        }
        assert_eq!(sorted(known(&mut c)), ids(sybils));
        let newcomer = |c: &mut DiscoveryCore, n: u8| {
            learn_from(c, 100 + n, NOW_MS, vec![info(n, NOW_MS + 10)]);
        };
        // The first two to leave are no longer pinned: two newcomers take
        // their places.
        newcomer(&mut c, 1);
        newcomer(&mut c, 2);
        assert_eq!(sorted(known(&mut c)), ids([1, 2, 13, 14]));
        // The last two stay, whatever comes.
        for n in 3..7 {
            newcomer(&mut c, n);
        }
        let held = known(&mut c);
        assert_eq!(held.len(), 4);
        assert!(held.contains(&id(13)) && held.contains(&id(14)), "{held:?}");
        // Back and gone again, a peer is counted once: both stay.
        connect(&mut c, 13);
        c.handle(Time(0), Input::Disconnected { peer: id(13) });
        for n in 7..11 {
            newcomer(&mut c, n);
        }
        let held = known(&mut c);
        assert_eq!(held.len(), 4);
        assert!(held.contains(&id(13)) && held.contains(&id(14)), "{held:?}");
    }

    /// One source stamps 50 fakes with addresses of a network where five
    /// honest peers are known, each newer than theirs. A full prefix gives
    /// up the oldest entry of the source holding the most of it: the
    /// fakes push out each other (honest entries only of a source holding
    /// as many of the network). Its oldest whatever the source went
    /// before, and the five were pushed out, with the table nowhere near
    /// full.
    #[test]
    fn fakes_in_one_network_push_out_only_each_other() {
        let mut c = core(8);
        let honest: Vec<SignedNodeInfo> = (1..=5)
            .map(|n| info_at(n, NOW_MS - 10_000, &[&format!("203.0.113.{n}:7000")]))
            .collect();
        learn_from(&mut c, 100, NOW_MS, honest);
        let fakes: Vec<SignedNodeInfo> = (10..60)
            .map(|n| info_at(n, NOW_MS + 25_000, &[&format!("203.0.113.{n}:7000")]))
            .collect();
        learn_from(&mut c, 150, NOW_MS, fakes);
        let known = known(&mut c);
        assert_eq!(known.len(), 50, "the prefix cap");
        for n in 1..=5 {
            assert!(known.contains(&id(n)), "honest peer {n} pushed out");
        }
    }

    #[test]
    fn verified_peers_are_never_evicted_until_a_dial_fails() {
        let mut c = config(|c| c.max_known_peers = 2);
        learn(&mut c, vec![info(1, NOW_MS - 100)]);
        connect(&mut c, 1);
        c.handle(Time(0), Input::Disconnected { peer: id(1) });
        learn(&mut c, vec![info(2, NOW_MS), info(3, NOW_MS + 1)]);
        assert_eq!(sorted(known(&mut c)), ids([1, 3]));
        c.handle(
            Time(0),
            Input::DialFailed {
                peer: Some(id(1)),
                address: "10.0.0.1:7000".into(),
                found: None,
            },
        );
        learn(&mut c, vec![info(4, NOW_MS + 2)]);
        assert_eq!(sorted(known(&mut c)), ids([3, 4]));
    }

    /// Caller `n` calls in from `remote`, sending its own info stamped
    /// `timestamp_ms`.
    fn call_in(c: &mut DiscoveryCore, n: u8, timestamp_ms: u64, remote: Option<&str>) {
        c.handle(
            Time(0),
            Input::Serve {
                id: u64::from(n),
                caller: Some(id(n)),
                info: Some(info(n, timestamp_ms)),
                unix_ms: NOW_MS + 1_000,
                remote: remote.map(|r| r.parse().unwrap()),
            },
        );
    }

    #[test]
    fn connect_back_infos_count_by_the_callers_prefix() {
        let mut c = config(|c| c.max_known_peers_per_source = 2);
        let from = [
            // 198.51.100/24, an IPv4-mapped address included.
            (1, Some("198.51.100.1")),
            (2, Some("198.51.100.2")),
            (3, Some("::ffff:198.51.100.3")),
            // 2001:db8::/32 (two of its /64s), and another /32.
            (4, Some("2001:db8::4")),
            (5, Some("2001:db8:0:1::5")),
            (6, Some("2001:db9::6")),
            // 203.0.113/24.
            (7, Some("203.0.113.7")),
            // Unknown addresses: one bucket for them all.
            (8, None),
            (9, None),
            (10, None),
        ];
        for (n, remote) in from {
            call_in(&mut c, n, NOW_MS + u64::from(n), remote);
        }
        // Each bucket of two keeps its two newest: 1 and 8 are gone.
        assert_eq!(sorted(known(&mut c)), ids([2, 3, 4, 5, 6, 7, 9, 10]));
        // Infos learnt from a peer are in yet another bucket.
        learn(&mut c, vec![info(11, NOW_MS)]);
        assert_eq!(sorted(known(&mut c)), ids([2, 3, 4, 5, 6, 7, 9, 10, 11]));
    }

    #[test]
    fn a_flood_from_one_prefix_never_evicts_connect_back_infos_from_another() {
        // 200 identities from one /24.
        flooded_by_callers("198.51.100.2", |_| "203.0.113.7".to_string());
    }

    /// The same flood from 200 /64s of one IPv6 /32 (one subscriber holds
    /// hundreds of /64s): one network still. Keyed by /64, each caller
    /// was a bucket of its own, and eviction from the fullest bucket took
    /// the honest callers too.
    #[test]
    fn a_flood_from_many_subnets_of_one_ipv6_network_never_evicts_callers_from_another() {
        flooded_by_callers("2001:db9::2", |n| format!("2001:db8:0:{n:x}::1"));
    }

    /// Two honest callers (from 198.51.100.1 and `second`), then 200
    /// identities calling from `flood(n)`, each stamped ahead and newer
    /// than the honest callers, over several rounds: the honest callers'
    /// infos stay, and the flood holds its one bucket.
    fn flooded_by_callers(second: &str, flood: impl Fn(u8) -> String) {
        let mut c = config(|c| {
            c.max_known_peers = 10;
            c.max_known_peers_per_source = 4;
        });
        call_in(&mut c, 1, NOW_MS - 100, Some("198.51.100.1"));
        call_in(&mut c, 2, NOW_MS - 100, Some(second));
        for round in 0..4 {
            for n in 10..210 {
                call_in(&mut c, n, NOW_MS + 25_000, Some(&flood(n)));
            }
            tick(&mut c, Time(round * 5_000), NOW_MS);
        }
        let known = known(&mut c);
        assert!(
            known.contains(&id(1)) && known.contains(&id(2)),
            "{known:?}"
        );
        assert_eq!(known.len(), 2 + 4);
    }

    /// 49 identities minted with peer 1's address: a dial of one reaches
    /// peer 1, which proves itself. The fake is forgotten and peer 1 is
    /// dialled there at once. Before, the address was backed off: peer 1
    /// was not dialled again while the fakes took their turns failing.
    #[test]
    fn identities_copying_a_peers_address_are_forgotten_once_dialled_and_the_peer_dialled_there() {
        const AT: &str = "10.0.0.1:7000";
        for seed in 0..20 {
            let mut i = init(1);
            i.seed = seed;
            let mut c = DiscoveryCore::new(i);
            learn(&mut c, vec![info(1, NOW_MS)]);
            connect(&mut c, 1);
            c.handle(Time(0), Input::Disconnected { peer: id(1) });
            let fakes: Vec<SignedNodeInfo> = (10..59)
                .map(|n| info_at(n, NOW_MS + u64::from(n), &[AT]))
                .collect();
            learn(&mut c, fakes);
            assert_eq!(known(&mut c).len(), 50);
            let out = tick(&mut c, Time(0), NOW_MS);
            let [(peer, address)] = &dials(&out)[..] else {
                panic!("one dial: {out:?}")
            };
            assert_eq!(address, AT);
            let Some(fake) = peer.filter(|p| *p != id(1)) else {
                continue;
            };
            let out = c.handle(
                Time(0),
                Input::DialFailed {
                    peer: Some(fake),
                    address: AT.to_string(),
                    found: Some(id(1)),
                },
            );
            assert_eq!(dials(&out), vec![(Some(id(1)), AT.to_string())]);
            let known = known(&mut c);
            assert!(!known.contains(&fake) && known.contains(&id(1)));
            assert_eq!(known.len(), 49);
        }
    }

    /// Identities naming the address of a peer this node does not know:
    /// the one dialled is forgotten, and the address is backed off as for
    /// any failed dial, so that such fakes cannot have every node dial that
    /// peer again and again.
    #[test]
    fn fakes_naming_a_peer_not_known_here_back_its_address_off() {
        const AT: &str = "10.0.0.1:7000";
        let mut c = core(1);
        let fakes: Vec<SignedNodeInfo> = (10..59)
            .map(|n| info_at(n, NOW_MS + u64::from(n), &[AT]))
            .collect();
        learn(&mut c, fakes);
        let out = tick(&mut c, Time(0), NOW_MS);
        let [(Some(fake), address)] = &dials(&out)[..] else {
            panic!("one dial: {out:?}")
        };
        assert_eq!(address, AT);
        let out = c.handle(
            Time(0),
            Input::DialFailed {
                peer: Some(*fake),
                address: AT.to_string(),
                found: Some(id(1)),
            },
        );
        assert_eq!(dials(&out), vec![]);
        assert_eq!(known(&mut c).len(), 48);
        // Within the backoff (1 s), no other fake is dialled there.
        assert_eq!(dials(&tick(&mut c, Time(500), NOW_MS)), vec![]);
        assert_eq!(dials(&tick(&mut c, Time(1_000), NOW_MS)).len(), 1);
    }

    /// While peer 1 is connected at its address, identities naming that
    /// address are never dialled: Connections would drop such a dial, and
    /// it would hold its slot until it timed out. Peer 2 is dialled.
    #[test]
    fn identities_naming_one_address_take_one_dial_of_a_round() {
        let mut c = core(8);
        let shared = "203.0.113.9:7000";
        learn(
            &mut c,
            (10..18).map(|n| info_at(n, NOW_MS, &[shared])).collect(),
        );
        learn(&mut c, vec![info_at(20, NOW_MS, &["203.0.114.9:7000"])]);
        let mut addresses: Vec<String> = dials(&tick(&mut c, Time(0), NOW_MS))
            .into_iter()
            .map(|(_, a)| a)
            .collect();
        addresses.sort();
        assert_eq!(
            addresses,
            vec![shared.to_string(), "203.0.114.9:7000".to_string()]
        );
    }

    #[test]
    fn no_peer_is_dialled_at_the_address_of_a_connected_peer() {
        let mut c = core(2);
        learn(&mut c, vec![info(1, NOW_MS)]);
        connect(&mut c, 1);
        let fakes: Vec<SignedNodeInfo> = (10..59)
            .map(|n| info_at(n, NOW_MS + u64::from(n), &["10.0.0.1:7000"]))
            .collect();
        learn(&mut c, fakes);
        // From another source (the first has brought its 50 this
        // interval), in another network (10.0.0/24 holds its 50).
        learn_from(
            &mut c,
            201,
            NOW_MS,
            vec![info_at(2, NOW_MS, &["10.0.1.2:7000"])],
        );
        assert_eq!(known(&mut c).len(), 51);
        for round in 0..10 {
            let out = tick(&mut c, Time(round * 1_000), NOW_MS);
            let dialled = dials(&out);
            if !dialled.is_empty() {
                assert_eq!(dialled, vec![(Some(id(2)), "10.0.1.2:7000".to_string())]);
                return;
            }
        }
        panic!("peer 2 was never dialled");
    }

    /// A node advertises its addresses as peers accept them.
    #[test]
    fn a_node_advertises_one_spelling_per_address() {
        for (configured, advertised) in [
            ("[2001:DB8:0:0::1]:7000", "[2001:db8::1]:7000"),
            ("[::ffff:1.2.3.4]:7000", "1.2.3.4:7000"),
            ("1.2.3.4:7000", "1.2.3.4:7000"),
            ("seed.example:7000", "seed.example:7000"),
        ] {
            assert_eq!(canonical_address(configured), advertised);
        }
        for spelling in ["[2001:DB8:0:0::1]:7000", "[::ffff:1.2.3.4]:7000"] {
            assert_eq!(prefix(spelling, true), None, "{spelling}");
            assert!(prefix(&canonical_address(spelling), true).is_some());
        }
    }

    #[test]
    fn service_ports_are_sorted_and_found() {
        assert!(SERVICE_PORTS.windows(2).all(|w| w[0] < w[1]));
        for port in SERVICE_PORTS {
            assert!(is_service_port(port), "{port}");
        }
        for port in [0, 2, 80, 443, 7000, 8080, 65535] {
            assert!(!is_service_port(port), "{port}");
        }
    }

    #[test]
    fn advertised_addresses_are_validated() {
        let never = [
            "0.0.0.0:7000",
            "0.1.2.3:7000",
            "224.0.0.1:7000",
            "169.254.1.1:7000",
            "255.255.255.255:7000",
            "[::]:7000",
            "[ff02::1]:7000",
            "[fe80::1]:7000",
            "[::ffff:169.254.0.1]:7000",
            // IPv4 behind NAT64 (well-known and local-use prefixes), and
            // IPv4-compatible: 10.0.0.1 and 1.2.3.4 each way.
            "[64:ff9b::a00:1]:7000",
            "[64:ff9b::102:304]:7000",
            "[64:ff9b:1::a00:1]:7000",
            "[::a00:1]:7000",
            "[::102:304]:7000",
            // SIIT, 6to4 and Teredo forms, each embedding an IPv4 address.
            "[::ffff:0:a00:1]:7000",
            "[2002:a00:1::1]:7000",
            "[2001:0:4136:e378:8000:63bf:3fff:fdd2]:7000",
            // Reserved.
            "240.0.0.1:7000",
            "250.1.2.3:7000",
            "255.255.255.255:7000",
            // Other spellings of an address (one spelling per address):
            // IPv4-mapped, zeros not compressed, capitals.
            "[::ffff:1.2.3.4]:7000",
            "[::ffff:127.0.0.1]:7000",
            "[0:0:0:0:0:0:0:1]:7000",
            "[2001:db8:0:0:0:0:0:1]:7000",
            "[2001:DB8::1]:7000",
            "[2001:0db8::1]:7000",
            "[2001:db8::1%7]:7000",
            "seed.example:7000",
            "1.2.3.4:0",
            "1.2.3.4",
            // Ports of services that are not nodes, whatever the address.
            "1.2.3.4:22",
            "1.2.3.4:25",
            "1.2.3.4:1",
            "[2001:db8::1]:3306",
            "127.0.0.1:5432",
            "10.0.0.1:27017",
        ];
        let private = [
            "127.0.0.1:7000",
            "10.1.2.3:7000",
            "172.16.0.1:7000",
            "192.168.1.1:7000",
            "100.64.0.1:7000",
            "[::1]:7000",
            "[fd00::1]:7000",
            "[fec0::1]:7000",
            "198.18.0.1:7000",
            "198.19.255.1:7000",
            "192.0.0.8:7000",
        ];
        let public = [
            "1.2.3.4:7000",
            "198.20.0.1:7000",
            "192.0.1.1:7000",
            "223.255.255.1:2",
            "1.2.3.4:443",
            "1.2.3.4:80",
            "[2001:db8::1]:7000",
            "[2001:1::1]:7000",
            "[2003::1]:65535",
        ];
        for allow in [false, true] {
            for a in never {
                assert_eq!(prefix(a, allow), None, "{a}");
            }
            for a in private {
                assert_eq!(prefix(a, allow).is_some(), allow, "{a}");
            }
            for a in public {
                assert!(prefix(a, allow).is_some(), "{a}");
            }
        }
        // One bad address spoils the info; the first one buckets it.
        let mut c = config(|c| c.allow_private_addresses = false);
        learn(
            &mut c,
            vec![
                info_at(1, NOW_MS, &["1.2.3.4:7000", "10.0.0.1:7000"]),
                info_at(2, NOW_MS, &["1.2.3.4:7000", "5.6.7.8:7000"]),
                info_at(3, NOW_MS, &[]),
            ],
        );
        assert_eq!(known(&mut c), vec![id(2)]);
    }

    #[test]
    fn dial_backoffs_are_forgotten_a_longest_wait_after_they_end_and_kept_while_in_use() {
        let mut c = config(|c| {
            c.dial_backoff_ms = 1_000;
            c.max_dial_backoff_ms = 60_000;
        });
        // A node running for two weeks, a new address failing each round
        // (departed peers, or addresses a liar named): the map holds the
        // failures of the last 61 s, 13 of them, not every one since.
        let rounds: u64 = 14 * DAY_MS / 5_000;
        for k in 0..rounds {
            let now = Time(k * 5_000);
            tick(&mut c, now, NOW_MS);
            c.handle(
                now,
                Input::DialFailed {
                    peer: None,
                    address: format!("10.{}.{}.{}:7000", k >> 16, (k >> 8) & 255, k & 255),
                    found: None,
                },
            );
            assert!(c.backoff.len() <= 13, "{k}: {}", c.backoff.len());
        }
        assert_eq!(c.backoff.len(), 13);

        // An address that keeps failing keeps its doubling wait, capped
        // at the longest: forgetting never restarts a wait in use.
        let mut c = config(|c| {
            c.target_concurrent_connections = 8;
            c.dial_backoff_ms = 1_000;
            c.max_dial_backoff_ms = 60_000;
        });
        learn(&mut c, vec![info(1, NOW_MS)]);
        let mut dialled = Vec::new();
        for k in 0..120 {
            let now = Time(k * 5_000);
            for (peer, address) in dials(&tick(&mut c, now, NOW_MS)) {
                dialled.push(now.0);
                c.handle(
                    now,
                    Input::DialFailed {
                        peer,
                        address,
                        found: None,
                    },
                );
            }
        }
        let gaps: Vec<u64> = dialled.windows(2).map(|w| w[1] - w[0]).collect();
        assert_eq!(
            gaps,
            [
                5_000, 5_000, 5_000, 10_000, 20_000, 35_000, 60_000, 60_000, 60_000, 60_000,
                60_000, 60_000, 60_000, 60_000
            ]
        );
    }

    #[test]
    fn a_dial_backoff_is_kept_while_its_address_is_being_dialled() {
        // A dial that outlasts the longest wait (its timeout set longer
        // here) keeps its address's backoff: its failure doubles the wait.
        let mut c = config(|c| {
            c.target_concurrent_connections = 8;
            c.dial_backoff_ms = 1_000;
            c.max_dial_backoff_ms = 60_000;
            c.pending_dial_timeout_ms = 120_000;
        });
        learn(&mut c, vec![info(1, NOW_MS)]);
        assert_eq!(dials(&tick(&mut c, Time(0), NOW_MS)).len(), 1);
        peer_1_dial_failed(&mut c, 0);
        // Dialled again once the first wait ends, and not answered for a
        // minute: its wait ended 64 s ago.
        assert_eq!(dials(&tick(&mut c, Time(5_000), NOW_MS)).len(), 1);
        assert!(dials(&tick(&mut c, Time(65_000), NOW_MS)).is_empty());
        peer_1_dial_failed(&mut c, 65_000);
        // The second failure waits 2 s, not the first's 1 s again.
        assert!(dials(&tick(&mut c, Time(66_000), NOW_MS)).is_empty());
        assert_eq!(dials(&tick(&mut c, Time(67_000), NOW_MS)).len(), 1);
    }

    #[test]
    fn a_fresh_info_ends_the_dial_backoff() {
        let mut c = config(|c| {
            c.target_concurrent_connections = 8;
            c.dial_backoff_ms = 3_600_000;
        });
        let address = "10.0.0.1:7000".to_string();
        let fail = |c: &mut DiscoveryCore| {
            c.handle(
                Time(0),
                Input::DialFailed {
                    peer: Some(id(1)),
                    address: address.clone(),
                    found: None,
                },
            )
        };
        learn(&mut c, vec![info(1, NOW_MS)]);
        assert_eq!(dials(&tick(&mut c, Time(0), NOW_MS)).len(), 1);
        fail(&mut c);
        assert!(dials(&tick(&mut c, Time(10), NOW_MS)).is_empty());
        // The same info again says nothing new: still backing off.
        learn(&mut c, vec![info(1, NOW_MS)]);
        assert!(dials(&tick(&mut c, Time(20), NOW_MS)).is_empty());
        // A newer one (the peer restarted): dialled at the next round.
        learn(&mut c, vec![info(1, NOW_MS + 1)]);
        assert_eq!(
            dials(&tick(&mut c, Time(30), NOW_MS)),
            vec![(Some(id(1)), address.clone())]
        );
        // A call from it does the same.
        fail(&mut c);
        assert!(dials(&tick(&mut c, Time(40), NOW_MS)).is_empty());
        c.handle(
            Time(50),
            Input::Serve {
                id: 1,
                caller: Some(id(1)),
                info: None,
                unix_ms: NOW_MS,
                remote: None,
            },
        );
        assert_eq!(
            dials(&tick(&mut c, Time(60), NOW_MS)),
            vec![(Some(id(1)), address)]
        );
    }
}
