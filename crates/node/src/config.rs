//! The node's configuration file: TOML, kebab-case keys, every setting of
//! the design with its default. Unknown keys and out-of-range values are
//! refused with a message naming the key and the allowed range.

use soma_actors::system::Retention;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use soma_actors::P2pConfig;
use soma_actors::discovery::{self, SeedPeer};
use soma_types::{Access, PeerId};

/// A configuration problem, naming the key (or file) at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML, or has an unknown key or a bad value.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong (names the key).
        message: String,
    },
    /// A value is out of its allowed range.
    #[error("{path}: key `{key}` must be {allowed}, got {got}")]
    Range {
        /// The file.
        path: PathBuf,
        /// The key.
        key: &'static str,
        /// The allowed range.
        allowed: &'static str,
        /// The value given.
        got: String,
    },
}

/// A seed peer in the configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct SeedConfig {
    /// The seed's peer id (hex), if known; otherwise learnt at the handshake.
    #[serde(default)]
    pub peer_id: Option<PeerId>,
    /// `host:port`.
    pub address: String,
}

/// Block production for a validator node of a local network.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ProducerConfig {
    /// Commits produced per second.
    pub commit_rate: f64,
    /// Stop producing after this many commits (0: never stop).
    #[serde(default)]
    pub max_commits: u64,
}

/// An archive of certified batches (docs/operations.md, "Archive").
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ArchiveSection {
    /// A local directory (relative to this file), `s3://bucket/prefix`,
    /// `gs://bucket/prefix` or `https://host/prefix`.
    pub url: String,
    /// Copy every certified batch into the archive.
    #[serde(default = "yes")]
    pub write: bool,
    /// Read batches no connected peer holds from the archive.
    #[serde(default = "yes")]
    pub read: bool,
    /// How often the writer looks for new certified batches.
    #[serde(default = "default_archive_interval", with = "humantime_serde")]
    pub interval: Duration,
    /// Time allowed for one archive request.
    #[serde(default = "default_archive_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Largest archive object read or written, in bytes.
    #[serde(default = "default_archive_object_bytes")]
    pub max_object_bytes: u64,
    /// Longest pause between retries of a failed write, and between
    /// reads of an archive whose reads keep failing (sync reads nothing
    /// from it during a pause).
    #[serde(default = "default_archive_max_retry", with = "humantime_serde")]
    pub max_retry: Duration,
}

fn yes() -> bool {
    true
}

fn default_archive_interval() -> Duration {
    soma_actors::archive::Config::new("").interval
}

fn default_archive_timeout() -> Duration {
    soma_actors::archive::Config::new("").request_timeout
}

fn default_archive_object_bytes() -> u64 {
    soma_actors::archive::Config::new("").max_object_bytes
}

fn default_archive_max_retry() -> Duration {
    soma_actors::archive::Config::new("").max_retry
}

/// Every tunable of the P2P layer (DESIGN section 7), with its default.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct P2pSection {
    /// Discovery round interval.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Connections discovery dials up to.
    pub target_concurrent_connections: usize,
    /// Connected peers asked for known peers each round.
    pub peers_to_query: usize,
    /// Most peers sent in one GetKnownPeers answer.
    pub max_peers_to_send: usize,
    /// Most peers known at once.
    pub max_known_peers: usize,
    /// Most known peers learnt from one source (one peer's answers, or all
    /// connect-back infos together).
    pub max_known_peers_per_source: usize,
    /// Most known peers whose address is in one /24 (IPv4) or /32 (IPv6).
    pub max_known_peers_per_prefix: usize,
    /// Most new peers learnt from one source per discovery interval.
    pub max_new_peers_per_source_per_interval: usize,
    /// How long before a new peer a known peer must have been last seen
    /// for a full table to give its place to the new one (the new peer's
    /// own source excepted); zero: any entry older than the new peer.
    #[serde(with = "humantime_serde")]
    pub min_evict_age: Duration,
    /// Whether infos with loopback or private addresses are accepted; a
    /// node on the public Internet sets it to false.
    pub allow_private_addresses: bool,
    /// How often a node at its connection target swaps one connection for
    /// one to another known peer; zero: never.
    #[serde(with = "humantime_serde")]
    pub rotation_interval: Duration,
    /// State sync tick.
    #[serde(with = "humantime_serde")]
    pub tick: Duration,
    /// How often every connected peer's height is asked.
    #[serde(with = "humantime_serde")]
    pub height_query_interval: Duration,
    /// Commits per sync batch.
    pub commit_sync_batch_size: u64,
    /// Block fetches at once.
    pub parallel_fetches: usize,
    /// Fetches sent to one peer at once.
    pub max_fetches_per_peer: usize,
    /// Batches fetched beyond the applied watermark.
    pub batches_ahead: usize,
    /// Commit batches fetched ahead of the one next in line at most (the
    /// depth adapts below it); 0: one commit fetch at a time.
    pub commit_fetches_ahead: usize,
    /// Blocks per FetchBlocks request.
    pub max_blocks_per_fetch: usize,
    /// Largest FetchBlocks chunk or FetchCommits answer, in bytes.
    pub max_fetch_response_bytes: usize,
    /// Bytes fetches may hold at most: each fetch in flight counts from
    /// the moment it is sent, fetched batches until applied.
    pub max_total_fetched_bytes: u64,
    /// Bytes hedges in flight may hold beyond `max_total_fetched_bytes`:
    /// each counts its fetch's reservation from the moment it is sent and
    /// waits for room first; 0: fetches are never hedged.
    pub max_hedged_bytes: u64,
    /// Bytes of blocks one FetchBlocks may bring (larger chunks are split).
    pub max_bytes_per_fetch: u64,
    /// Time allowed for one request.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Wait when no peer can serve.
    #[serde(with = "humantime_serde")]
    pub wait_interval_when_no_peer: Duration,
    /// How long a peer that sent invalid data is banned.
    #[serde(with = "humantime_serde")]
    pub ban_duration: Duration,
    /// Capacity of every actor's mailbox.
    pub mailbox_capacity: usize,
    /// Restarts of one actor (after a panic) allowed within
    /// `actor-restart-window`; one more failure stops the node.
    pub max_actor_restarts: u32,
    /// The window of `max-actor-restarts`.
    #[serde(with = "humantime_serde")]
    pub actor_restart_window: Duration,
    /// Capacity of the synced-commit broadcast.
    pub synced_commit_broadcast_capacity: usize,
    /// What the store keeps: `all`, `commits:N` (the last N commits) or
    /// `epochs:N` (every commit of the last N epochs).
    pub retention: String,
    /// How often the store is pruned to the retention.
    #[serde(with = "humantime_serde")]
    pub prune_interval: Duration,
    /// Commits removed in one write transaction at most.
    pub prune_batch_commits: u64,
    /// Time between advertising a new lowest commit and deleting below it.
    #[serde(with = "humantime_serde")]
    pub prune_grace: Duration,
    /// Commits sync fetches past the last one a registered executor took.
    pub max_lead_over_execution: u64,
    /// Whether synced block signatures are checked.
    pub verify_synced_block_signatures: bool,
    /// HTTP/2 streams one inbound connection may have open at once.
    pub max_concurrent_streams: u32,
    /// Requests of one inbound connection handled at once.
    pub concurrency_limit_per_connection: usize,
    /// Inbound connections open at once; more are refused.
    pub max_inbound_connections: usize,
    /// GetCommitInfo and PushCommit calls a second per connection and per
    /// authenticated caller.
    pub cheap_calls_per_second: u32,
    /// Such calls at once after a quiet spell.
    pub cheap_call_burst: u32,
    /// GetKnownPeers calls a minute per connection and per caller.
    pub known_peers_calls_per_minute: u32,
    /// GetKnownPeers calls at once after a quiet spell.
    pub known_peers_burst: u32,
    /// Fetches a caller may drop unread a minute (its host and network
    /// have a few callers' worth); past it its fetches are refused.
    pub abandoned_fetches_per_minute: u32,
    /// Such fetches at once after a quiet spell.
    pub abandoned_fetch_burst: u32,
    /// Connections and callers whose call rates are tracked at once.
    pub max_rate_limited: usize,
    /// Of those, slots only committee members and allowlisted peers hold.
    pub reserved_inbound_connections: usize,
    /// Inbound connections from one source address.
    pub max_inbound_per_ip: usize,
    /// Inbound connections from one /24 (IPv4) or /64 (IPv6); an IPv6 /32
    /// holds four times as many.
    pub max_inbound_per_prefix: usize,
    /// Whether loopback callers skip the per-address and per-prefix caps
    /// (and the fetch caps per host and network); they never hold
    /// reserved slots for being local.
    pub inbound_exempt_loopback: bool,
    /// Time an inbound connection has to finish its TLS handshake.
    #[serde(with = "humantime_serde")]
    pub tls_handshake_timeout: Duration,
    /// Time without a request or an answer (pings do not count) after
    /// which an inbound connection is closed.
    #[serde(with = "humantime_serde")]
    pub inbound_idle_timeout: Duration,
    /// Time a response may take to be handed to the transport; past it the
    /// response is cut and its fetch slot and buffers released.
    #[serde(with = "humantime_serde")]
    pub send_timeout: Duration,
    /// Bytes of answers built but not yet sent, per inbound connection.
    pub max_buffered_bytes_per_connection: usize,
    /// Bytes of answers handed to HTTP/2 but not yet written to the
    /// socket, per inbound connection: what a client that does not read
    /// leaves in the transport's buffers.
    pub max_unwritten_bytes_per_connection: usize,
    /// Bytes of FetchCommits answers kept to answer the same request
    /// again while the store is unchanged; 0 keeps none.
    pub answer_cache_bytes: usize,
    /// FetchCommits and FetchBlocks served at once, in all.
    pub max_concurrent_fetches: usize,
    /// An answer that sent nothing for this long, or was read more slowly
    /// than `max_fetch_response_bytes / send_timeout` for this long, gives
    /// its slot to a new fetch when every slot is held.
    #[serde(with = "humantime_serde")]
    pub fetch_stall_timeout: Duration,
    /// FetchCommits and FetchBlocks served at once to one caller (all
    /// anonymous callers share one allowance).
    pub max_concurrent_fetches_per_peer: usize,
    /// FetchCommits and FetchBlocks served at once to the callers of one
    /// network (/24, IPv6 /32), committee members, allowlisted peers and
    /// exempt loopback callers apart.
    pub max_concurrent_fetches_per_network: usize,
    /// Of those, fetches served at once to the callers of one host (an
    /// IPv4 address, an IPv6 /48), whatever identities they use. Unset (a
    /// file written before the key existed): the library's default, or
    /// `max_concurrent_fetches_per_network` if that is lower, so that such
    /// a file loads as it did.
    #[serde(default)]
    pub max_concurrent_fetches_per_host: Option<usize>,
    /// Interval of HTTP/2 pings on inbound connections.
    #[serde(with = "humantime_serde")]
    pub http2_keepalive_interval: Duration,
    /// Time for a ping's answer before the connection is closed.
    #[serde(with = "humantime_serde")]
    pub http2_keepalive_timeout: Duration,
    /// Age at which an inbound connection is asked to close.
    #[serde(with = "humantime_serde")]
    pub max_connection_age: Duration,
    /// Time after that before it is closed regardless.
    #[serde(with = "humantime_serde")]
    pub max_connection_age_grace: Duration,
}

impl P2pSection {
    /// The per-host fetch cap the node runs with (see
    /// `max_concurrent_fetches_per_host`).
    fn fetches_per_host(&self) -> usize {
        self.max_concurrent_fetches_per_host.unwrap_or_else(|| {
            let library = P2pConfig::default().grpc.max_concurrent_fetches_per_host;
            library.min(self.max_concurrent_fetches_per_network)
        })
    }
}

impl Default for P2pSection {
    fn default() -> Self {
        let p = P2pConfig::default();
        P2pSection {
            interval: Duration::from_millis(p.discovery.interval_ms),
            target_concurrent_connections: p.discovery.target_concurrent_connections,
            peers_to_query: p.discovery.peers_to_query,
            max_peers_to_send: p.discovery.max_peers_to_send,
            max_known_peers: p.discovery.max_known_peers,
            max_known_peers_per_source: p.discovery.max_known_peers_per_source,
            max_known_peers_per_prefix: p.discovery.max_known_peers_per_prefix,
            max_new_peers_per_source_per_interval: p
                .discovery
                .max_new_peers_per_source_per_interval,
            min_evict_age: Duration::from_millis(p.discovery.min_evict_age_ms),
            allow_private_addresses: p.discovery.allow_private_addresses,
            rotation_interval: Duration::from_millis(p.discovery.rotation_interval_ms),
            tick: p.tick,
            height_query_interval: p.height_query_interval,
            commit_sync_batch_size: p.state_sync.commit_sync_batch_size,
            parallel_fetches: p.state_sync.parallel_fetches,
            max_fetches_per_peer: p.max_fetches_per_peer,
            batches_ahead: p.state_sync.batches_ahead,
            commit_fetches_ahead: p.state_sync.commit_fetches_ahead,
            max_blocks_per_fetch: p.state_sync.max_blocks_per_fetch,
            max_fetch_response_bytes: p.grpc.max_fetch_response_bytes,
            max_total_fetched_bytes: p.state_sync.max_total_fetched_bytes,
            max_hedged_bytes: p.state_sync.max_hedged_bytes,
            max_bytes_per_fetch: p.state_sync.max_bytes_per_fetch,
            timeout: p.timeout,
            wait_interval_when_no_peer: Duration::from_millis(
                p.state_sync.wait_interval_when_no_peer_ms,
            ),
            ban_duration: p.ban_duration,
            mailbox_capacity: p.mailbox_capacity,
            max_actor_restarts: p.supervision.max_restarts,
            actor_restart_window: Duration::from_millis(p.supervision.restart_window_ms),
            synced_commit_broadcast_capacity: p.synced_commit_broadcast_capacity,
            retention: retention_text(p.prune.retention),
            prune_interval: Duration::from_millis(p.prune.interval_ms),
            prune_batch_commits: p.prune.batch_commits,
            prune_grace: Duration::from_millis(p.prune.grace_ms),
            max_lead_over_execution: p.state_sync.max_lead_over_execution,
            verify_synced_block_signatures: p.verify_synced_block_signatures,
            max_concurrent_streams: p.grpc.max_concurrent_streams,
            concurrency_limit_per_connection: p.grpc.concurrency_limit_per_connection,
            max_inbound_connections: p.grpc.max_inbound_connections,
            cheap_calls_per_second: p.grpc.cheap_calls_per_second,
            cheap_call_burst: p.grpc.cheap_call_burst,
            known_peers_calls_per_minute: p.grpc.known_peers_calls_per_minute,
            known_peers_burst: p.grpc.known_peers_burst,
            abandoned_fetches_per_minute: p.grpc.abandoned_fetches_per_minute,
            abandoned_fetch_burst: p.grpc.abandoned_fetch_burst,
            max_rate_limited: p.grpc.max_rate_limited,
            reserved_inbound_connections: p.grpc.reserved_inbound_connections,
            max_inbound_per_ip: p.grpc.max_inbound_per_ip,
            max_inbound_per_prefix: p.grpc.max_inbound_per_prefix,
            inbound_exempt_loopback: p.grpc.inbound_exempt_loopback,
            tls_handshake_timeout: p.grpc.tls_handshake_timeout,
            inbound_idle_timeout: p.grpc.inbound_idle_timeout,
            send_timeout: p.grpc.send_timeout,
            max_buffered_bytes_per_connection: p.grpc.max_buffered_bytes_per_connection,
            max_unwritten_bytes_per_connection: p.grpc.max_unwritten_bytes_per_connection,
            answer_cache_bytes: p.grpc.answer_cache_bytes,
            max_concurrent_fetches: p.grpc.max_concurrent_fetches,
            fetch_stall_timeout: p.grpc.fetch_stall_timeout,
            max_concurrent_fetches_per_peer: p.grpc.max_concurrent_fetches_per_peer,
            max_concurrent_fetches_per_network: p.grpc.max_concurrent_fetches_per_network,
            max_concurrent_fetches_per_host: Some(p.grpc.max_concurrent_fetches_per_host),
            http2_keepalive_interval: p.grpc.http2_keepalive_interval,
            http2_keepalive_timeout: p.grpc.http2_keepalive_timeout,
            max_connection_age: p.grpc.max_connection_age,
            max_connection_age_grace: p.grpc.max_connection_age_grace,
        }
    }
}

/// The largest archive object a batch is decoded from: a larger
/// `archive.max-object-bytes` is taken as this.
const MOST_OBJECT_BYTES: u64 = soma_types::codec::MAX_DECODE_BYTES as u64;

/// A node's configuration file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct NodeConfig {
    /// Directory of the node's store (`chain.redb`).
    pub data_dir: PathBuf,
    /// Directory of the node's keys (`soma-p2p keygen`).
    pub keys_dir: PathBuf,
    /// The genesis file (`soma-p2p genesis`).
    pub genesis: PathBuf,
    /// Where the gRPC server listens.
    pub listen_address: SocketAddr,
    /// Addresses advertised to peers (default: the listen address).
    #[serde(default)]
    pub external_addresses: Vec<String>,
    /// `public` or `private`.
    #[serde(default)]
    pub access: Access,
    /// Peers always allowed; in private mode the only ones.
    #[serde(default)]
    pub allowlist: Vec<PeerId>,
    /// Peers dialled when none is connected, and while known peers leave
    /// room under the connection target.
    #[serde(default)]
    pub seed_peers: Vec<SeedConfig>,
    /// Where Prometheus metrics are served, if anywhere.
    #[serde(default)]
    pub metrics_address: Option<SocketAddr>,
    /// Metrics connections served at once; more wait in the listen backlog.
    #[serde(default = "default_metrics_max_connections")]
    pub metrics_max_connections: usize,
    /// Metrics connections served at once from one network (a /24 or an
    /// IPv6 /64). Files written before it was counted by network name it
    /// by its old name, `metrics-max-connections-per-address`.
    #[serde(
        default = "default_metrics_max_connections_per_network",
        alias = "metrics-max-connections-per-address"
    )]
    pub metrics_max_connections_per_network: usize,
    /// How long a metrics connection lives, whatever it does.
    #[serde(
        default = "default_metrics_connection_lifetime",
        with = "humantime_serde"
    )]
    pub metrics_connection_lifetime: Duration,
    /// The networks whose clients the metrics endpoint serves, each in
    /// CIDR notation or as one address ([`metrics_network`]); empty, the
    /// default: every address.
    #[serde(default)]
    pub metrics_allowed_networks: Vec<String>,
    /// The store's page cache, in bytes: the bound on the memory it keeps.
    #[serde(default = "default_store_cache_bytes")]
    pub store_cache_bytes: usize,
    /// Block production (validators of a local network only).
    #[serde(default)]
    pub producer: Option<ProducerConfig>,
    /// An archive of certified batches, if any.
    #[serde(default)]
    pub archive: Option<ArchiveSection>,
    /// The P2P layer's tunables.
    #[serde(default)]
    pub p2p: P2pSection,
}

fn default_store_cache_bytes() -> usize {
    soma_store::RedbStore::DEFAULT_CACHE_BYTES
}

/// What peers accept as an address in a node's info.
const ADVERTISABLE: &str = "an IP address with a port that peers accept: not a host name, \
     not 0.0.0.0 or :: (set external-addresses when listening there), not link-local, \
     multicast or reserved, loopback and private addresses only with \
     p2p.allow-private-addresses = true, and not another service's port (SSH, mail, \
     databases... soma_actors::discovery::SERVICE_PORTS; 7000 is usual)";

impl NodeConfig {
    /// Reads and checks a configuration file. Relative paths in it are
    /// relative to the file's directory.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = crate::files::read_text(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut config: NodeConfig = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: one_line(&e, &text),
        })?;
        config.check(path)?;
        for warning in config.warnings() {
            tracing::warn!("{warning}");
        }
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [
            &mut config.data_dir,
            &mut config.keys_dir,
            &mut config.genesis,
        ] {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        if let Some(archive) = &mut config.archive
            && !archive.url.contains("://")
            && Path::new(&archive.url).is_relative()
        {
            archive.url = base.join(&archive.url).display().to_string();
        }
        Ok(config)
    }

    fn check(&self, path: &Path) -> Result<(), ConfigError> {
        let p = &self.p2p;
        let range = |key, allowed, ok: bool, got: String| {
            if ok {
                Ok(())
            } else {
                Err(ConfigError::Range {
                    path: path.to_path_buf(),
                    key,
                    allowed,
                    got,
                })
            }
        };
        let ms = |d: Duration| format!("{}ms", d.as_millis());
        // Compared as durations: a count of milliseconds past u64 would
        // wrap into the range.
        let between = |d: Duration, lo: u64, hi: u64| {
            Duration::from_millis(lo) <= d && d <= Duration::from_millis(hi)
        };
        // Peers refuse a node's info whole for one address they refuse: a
        // node advertising one would never be discovered.
        let allow_private = p.allow_private_addresses;
        let accepted = |address: &str| {
            discovery::is_advertisable(&discovery::canonical_address(address), allow_private)
        };
        // The listen address is advertised only when no other is. At
        // another service's port it is refused: a lie could not aim dials
        // there, nor can a mistake. Any other address peers refuse is a
        // warning (`warnings`).
        if self.external_addresses.is_empty() {
            range(
                "listen-address",
                "a port other than another service's (SSH, mail, databases... \
                 soma_actors::discovery::SERVICE_PORTS), which peers refuse to dial; 7000 is usual",
                !discovery::is_service_port(self.listen_address.port()),
                self.listen_address.to_string(),
            )?;
        }
        for address in &self.external_addresses {
            let ok = accepted(address);
            range("external-addresses", ADVERTISABLE, ok, address.clone())?;
        }
        // Caught here rather than as the second bind failing, once the
        // store has been opened, with a message naming neither key.
        if let Some(metrics) = self.metrics_address {
            let listen = self.listen_address;
            let same_host = metrics.ip() == listen.ip()
                || metrics.ip().is_unspecified()
                || listen.ip().is_unspecified();
            let clash = metrics.port() != 0 && metrics.port() == listen.port() && same_host;
            range(
                "metrics-address",
                "an address other than listen-address's",
                !clash,
                metrics.to_string(),
            )?;
        }
        let connections = self.metrics_max_connections;
        range(
            "metrics-max-connections",
            "between 1 and 1024",
            (1..=1024).contains(&connections),
            connections.to_string(),
        )?;
        let per_network = self.metrics_max_connections_per_network;
        range(
            "metrics-max-connections-per-network",
            "between 1 and metrics-max-connections",
            (1..=connections).contains(&per_network),
            per_network.to_string(),
        )?;
        let lifetime = self.metrics_connection_lifetime;
        range(
            "metrics-connection-lifetime",
            "between 1s and 1h",
            between(lifetime, 1_000, 3_600_000),
            ms(lifetime),
        )?;
        for network in &self.metrics_allowed_networks {
            range(
                "metrics-allowed-networks",
                "a list of networks such as \"10.0.0.0/8\" or \"2001:db8::/32\" (no bits set \
                 past the prefix), or of addresses such as \"192.0.2.7\"",
                metrics_network(network).is_some(),
                format!("{network:?}"),
            )?;
        }
        // Peers refuse an info with more addresses than `Limits`'s (4): a
        // node advertising more would never be discovered.
        let most = soma_types::Limits::default().max_node_addresses;
        let advertised: std::collections::BTreeSet<String> = (self.external_addresses.iter())
            .map(|a| discovery::canonical_address(a))
            .collect();
        range(
            "external-addresses",
            "at most 4 distinct addresses (peers refuse an info with more)",
            advertised.len() <= most,
            format!("{} addresses", advertised.len()),
        )?;
        for seed in &self.seed_peers {
            range(
                "seed-peers",
                "host:port addresses, a port from 1 up (an IP address or a name that resolves)",
                crate::genesis::check_address(&seed.address).is_ok(),
                seed.address.clone(),
            )?;
        }
        range(
            "p2p.interval",
            "between 10ms and 1h",
            between(p.interval, 10, 3_600_000),
            ms(p.interval),
        )?;
        range(
            "p2p.min-evict-age",
            "between 0s and 1h",
            p.min_evict_age <= Duration::from_secs(3_600),
            ms(p.min_evict_age),
        )?;
        range(
            "p2p.rotation-interval",
            "0s (never) or between 1s and 1d",
            p.rotation_interval.is_zero() || between(p.rotation_interval, 1_000, 86_400_000),
            ms(p.rotation_interval),
        )?;
        range(
            "p2p.tick",
            "between 1ms and 10s",
            between(p.tick, 1, 10_000),
            ms(p.tick),
        )?;
        range(
            "p2p.height-query-interval",
            "between 10ms and 1h",
            between(p.height_query_interval, 10, 3_600_000),
            ms(p.height_query_interval),
        )?;
        // Restarts are counted by their times over the window: the count
        // bounds that record, and a node that never stops on failures is
        // not one the supervisor can stop.
        range(
            "p2p.max-actor-restarts",
            "between 0 and 1000",
            p.max_actor_restarts <= 1_000,
            p.max_actor_restarts.to_string(),
        )?;
        range(
            "p2p.actor-restart-window",
            "between 1s and 1d",
            between(p.actor_restart_window, 1_000, 86_400_000),
            ms(p.actor_restart_window),
        )?;
        range(
            "p2p.timeout",
            "between 100ms and 10m",
            between(p.timeout, 100, 600_000),
            ms(p.timeout),
        )?;
        range(
            "p2p.send-timeout",
            "between 100ms and 10m",
            between(p.send_timeout, 100, 600_000),
            ms(p.send_timeout),
        )?;
        range(
            "p2p.fetch-stall-timeout",
            "between 10ms and 1h",
            between(p.fetch_stall_timeout, 10, 3_600_000),
            ms(p.fetch_stall_timeout),
        )?;
        range(
            "p2p.http2-keepalive-interval",
            "between 1s and 1h",
            between(p.http2_keepalive_interval, 1_000, 3_600_000),
            ms(p.http2_keepalive_interval),
        )?;
        range(
            "p2p.http2-keepalive-timeout",
            "between 1s and 10m",
            between(p.http2_keepalive_timeout, 1_000, 600_000),
            ms(p.http2_keepalive_timeout),
        )?;
        range(
            "p2p.max-connection-age",
            "between 1m and 7 days",
            between(p.max_connection_age, 60_000, 7 * 86_400_000),
            ms(p.max_connection_age),
        )?;
        range(
            "p2p.max-connection-age-grace",
            "between 1s and 1h",
            between(p.max_connection_age_grace, 1_000, 3_600_000),
            ms(p.max_connection_age_grace),
        )?;
        range(
            "p2p.wait-interval-when-no-peer",
            "between 10ms and 1h",
            between(p.wait_interval_when_no_peer, 10, 3_600_000),
            ms(p.wait_interval_when_no_peer),
        )?;
        range(
            "p2p.ban-duration",
            "between 1s and 7 days",
            between(p.ban_duration, 1_000, 7 * 86_400_000),
            ms(p.ban_duration),
        )?;
        let count = |key, v: usize, lo: usize, hi: usize, allowed| {
            range(key, allowed, (lo..=hi).contains(&v), v.to_string())
        };
        count(
            "p2p.target-concurrent-connections",
            p.target_concurrent_connections,
            1,
            1_000,
            "between 1 and 1000",
        )?;
        count(
            "p2p.peers-to-query",
            p.peers_to_query,
            1,
            100,
            "between 1 and 100",
        )?;
        count(
            "p2p.max-peers-to-send",
            p.max_peers_to_send,
            1,
            1_000,
            "between 1 and 1000",
        )?;
        count(
            "p2p.max-known-peers",
            p.max_known_peers,
            1,
            100_000,
            "between 1 and 100000",
        )?;
        count(
            "p2p.max-known-peers-per-source",
            p.max_known_peers_per_source,
            1,
            p.max_known_peers.max(1),
            "between 1 and max-known-peers",
        )?;
        count(
            "p2p.max-known-peers-per-prefix",
            p.max_known_peers_per_prefix,
            1,
            p.max_known_peers.max(1),
            "between 1 and max-known-peers",
        )?;
        count(
            "p2p.max-new-peers-per-source-per-interval",
            p.max_new_peers_per_source_per_interval,
            1,
            100_000,
            "between 1 and 100000",
        )?;
        count(
            "p2p.parallel-fetches",
            p.parallel_fetches,
            1,
            256,
            "between 1 and 256",
        )?;
        count(
            "p2p.max-fetches-per-peer",
            p.max_fetches_per_peer,
            1,
            256,
            "between 1 and 256",
        )?;
        count(
            "p2p.concurrency-limit-per-connection",
            p.concurrency_limit_per_connection,
            1,
            10_000,
            "between 1 and 10000",
        )?;
        for (key, value) in [
            ("p2p.cheap-calls-per-second", p.cheap_calls_per_second),
            ("p2p.cheap-call-burst", p.cheap_call_burst),
            (
                "p2p.known-peers-calls-per-minute",
                p.known_peers_calls_per_minute,
            ),
            ("p2p.known-peers-burst", p.known_peers_burst),
            (
                "p2p.abandoned-fetches-per-minute",
                p.abandoned_fetches_per_minute,
            ),
            ("p2p.abandoned-fetch-burst", p.abandoned_fetch_burst),
        ] {
            count(key, value as usize, 1, 1_000_000, "between 1 and 1000000")?;
        }
        count(
            "p2p.max-rate-limited",
            p.max_rate_limited,
            16,
            1 << 24,
            "between 16 and 16777216",
        )?;
        count(
            "p2p.max-inbound-connections",
            p.max_inbound_connections,
            1,
            1 << 20,
            "between 1 and 1048576",
        )?;
        count(
            "p2p.reserved-inbound-connections",
            p.reserved_inbound_connections,
            0,
            p.max_inbound_connections.saturating_sub(1),
            "below p2p.max-inbound-connections",
        )?;
        count(
            "p2p.max-inbound-per-ip",
            p.max_inbound_per_ip,
            1,
            p.max_inbound_per_prefix,
            "between 1 and p2p.max-inbound-per-prefix",
        )?;
        count(
            "p2p.max-inbound-per-prefix",
            p.max_inbound_per_prefix,
            1,
            1 << 20,
            "between 1 and 1048576",
        )?;
        range(
            "p2p.tls-handshake-timeout",
            "between 100ms and 1m",
            between(p.tls_handshake_timeout, 100, 60_000),
            ms(p.tls_handshake_timeout),
        )?;
        // A call may be silent for up to the request timeout; an idle
        // timeout below it would cut honest slow calls.
        range(
            "p2p.inbound-idle-timeout",
            "between p2p.timeout (at least 1s) and 1 day",
            p.inbound_idle_timeout >= p.timeout
                && between(p.inbound_idle_timeout, 1_000, 86_400_000),
            ms(p.inbound_idle_timeout),
        )?;
        range(
            "p2p.max-concurrent-streams",
            "between 1 and 10000",
            (1..=10_000).contains(&p.max_concurrent_streams),
            p.max_concurrent_streams.to_string(),
        )?;
        count(
            "p2p.batches-ahead",
            p.batches_ahead,
            1,
            1_024,
            "between 1 and 1024",
        )?;
        count(
            "p2p.commit-fetches-ahead",
            p.commit_fetches_ahead,
            0,
            64,
            "between 0 and 64",
        )?;
        count(
            "p2p.max-blocks-per-fetch",
            p.max_blocks_per_fetch,
            1,
            10_000,
            "between 1 and 10000",
        )?;
        count(
            "p2p.mailbox-capacity",
            p.mailbox_capacity,
            16,
            1 << 20,
            "between 16 and 1048576",
        )?;
        range(
            "p2p.retention",
            RETENTION_FORMS,
            parse_retention(&p.retention).is_ok(),
            format!("{:?}", p.retention),
        )?;
        range(
            "p2p.prune-interval",
            "between 100ms and 1 day",
            between(p.prune_interval, 100, 86_400_000),
            ms(p.prune_interval),
        )?;
        // Peers learn a node's lowest commit by asking every
        // height-query-interval; a request may take up to the timeout, and
        // one may fail. A peer still claiming blocks it denies once they
        // are shown to exist is banned, so the grace covers a failed query.
        range(
            "p2p.prune-grace",
            "at least twice p2p.height-query-interval plus p2p.timeout, at most 1 day",
            p.prune_grace >= 2 * p.height_query_interval + p.timeout
                && between(p.prune_grace, 0, 86_400_000),
            ms(p.prune_grace),
        )?;
        range(
            "p2p.prune-batch-commits",
            "between 1 and 1000000",
            (1..=1_000_000).contains(&p.prune_batch_commits),
            p.prune_batch_commits.to_string(),
        )?;
        range(
            "p2p.max-lead-over-execution",
            "at least p2p.commit-sync-batch-size",
            p.max_lead_over_execution >= p.commit_sync_batch_size,
            p.max_lead_over_execution.to_string(),
        )?;
        count(
            "p2p.synced-commit-broadcast-capacity",
            p.synced_commit_broadcast_capacity,
            1,
            1 << 20,
            "between 1 and 1048576",
        )?;
        count(
            "p2p.max-fetch-response-bytes",
            p.max_fetch_response_bytes,
            64 << 10,
            64 << 20,
            "between 65536 and 67108864",
        )?;
        count(
            "p2p.max-buffered-bytes-per-connection",
            p.max_buffered_bytes_per_connection,
            1 << 20,
            4 << 30,
            "between 1048576 and 4294967296",
        )?;
        count(
            "p2p.max-unwritten-bytes-per-connection",
            p.max_unwritten_bytes_per_connection,
            64 << 10,
            1 << 30,
            "between 65536 and 1073741824",
        )?;
        count(
            "p2p.answer-cache-bytes",
            p.answer_cache_bytes,
            0,
            4 << 30,
            "between 0 (none kept) and 4294967296",
        )?;
        range(
            "p2p.max-concurrent-fetches",
            "between 1 and 65536",
            (1..=65_536).contains(&p.max_concurrent_fetches),
            p.max_concurrent_fetches.to_string(),
        )?;
        range(
            "p2p.max-concurrent-fetches-per-peer",
            "between 1 and max-concurrent-fetches",
            (1..=p.max_concurrent_fetches).contains(&p.max_concurrent_fetches_per_peer),
            p.max_concurrent_fetches_per_peer.to_string(),
        )?;
        range(
            "p2p.max-concurrent-fetches-per-network",
            "between 1 and max-concurrent-fetches",
            (1..=p.max_concurrent_fetches).contains(&p.max_concurrent_fetches_per_network),
            p.max_concurrent_fetches_per_network.to_string(),
        )?;
        range(
            "p2p.max-concurrent-fetches-per-host",
            "between 1 and max-concurrent-fetches-per-network",
            (1..=p.max_concurrent_fetches_per_network).contains(&p.fetches_per_host()),
            p.fetches_per_host().to_string(),
        )?;
        range(
            "p2p.commit-sync-batch-size",
            "between 1 and 1000",
            (1..=1_000).contains(&p.commit_sync_batch_size),
            p.commit_sync_batch_size.to_string(),
        )?;
        range(
            "p2p.max-total-fetched-bytes",
            "between 1048576 and 68719476736",
            ((1 << 20)..=(64u64 << 30)).contains(&p.max_total_fetched_bytes),
            p.max_total_fetched_bytes.to_string(),
        )?;
        range(
            "p2p.max-hedged-bytes",
            "0 (never hedge) or between 1048576 and 68719476736",
            p.max_hedged_bytes == 0 || ((1 << 20)..=(64u64 << 30)).contains(&p.max_hedged_bytes),
            p.max_hedged_bytes.to_string(),
        )?;
        range(
            "p2p.max-bytes-per-fetch",
            "between 4194304 (the largest block) and 1073741824",
            ((4 << 20)..=(1u64 << 30)).contains(&p.max_bytes_per_fetch),
            p.max_bytes_per_fetch.to_string(),
        )?;
        range(
            "store-cache-bytes",
            "between 1048576 and 68719476736",
            ((1 << 20)..=(64usize << 30)).contains(&self.store_cache_bytes),
            self.store_cache_bytes.to_string(),
        )?;
        if let Some(archive) = &self.archive {
            // Only the stores this binary can use: any other scheme was
            // opened and then failed every request (plain http, which the
            // HTTP store refuses unless told, and nothing here tells it).
            const STORES: [&str; 5] = ["file", "s3", "s3a", "gs", "https"];
            let scheme = (archive.url.split_once("://")).map(|(s, _)| s.to_ascii_lowercase());
            // `s3:/bucket` or `gs:bucket`, a slash short of a URL, would
            // otherwise be taken for a directory relative to the file's.
            let slashes_missing = scheme.is_none()
                && (archive.url.split_once(':')).is_some_and(|(s, _)| {
                    let s = s.to_ascii_lowercase();
                    STORES.contains(&s.as_str()) || s == "http"
                });
            range(
                "archive.url",
                "a directory, s3://bucket/prefix, gs://bucket/prefix or https://host/prefix \
                 (two slashes after the scheme; not plain http://; an S3-compatible server \
                 over plain HTTP is s3://bucket with AWS_ENDPOINT=http://host:port and \
                 AWS_ALLOW_HTTP=true)",
                !archive.url.trim().is_empty()
                    && !slashes_missing
                    && scheme.is_none_or(|s| STORES.contains(&s.as_str())),
                format!("{:?}", archive.url),
            )?;
            range(
                "archive.interval",
                "between 10ms and 1h",
                (Duration::from_millis(10)..=Duration::from_secs(3600)).contains(&archive.interval),
                humantime_serde::re::humantime::format_duration(archive.interval).to_string(),
            )?;
            range(
                "archive.request-timeout",
                "between 100ms and 1h",
                (Duration::from_millis(100)..=Duration::from_secs(3600))
                    .contains(&archive.request_timeout),
                humantime_serde::re::humantime::format_duration(archive.request_timeout)
                    .to_string(),
            )?;
            range(
                "archive.max-retry",
                "between 1s and 1h",
                (Duration::from_secs(1)..=Duration::from_secs(3600)).contains(&archive.max_retry),
                humantime_serde::re::humantime::format_duration(archive.max_retry).to_string(),
            )?;
            range(
                "archive.max-object-bytes",
                "between 16777216 and 17179869184",
                ((16 << 20)..=(16u64 << 30)).contains(&archive.max_object_bytes),
                archive.max_object_bytes.to_string(),
            )?;
        }
        if let Some(producer) = &self.producer {
            range(
                "producer.commit-rate",
                "between 0.1 and 10000",
                (0.1..=10_000.0).contains(&producer.commit_rate),
                producer.commit_rate.to_string(),
            )?;
        }
        Ok(())
    }

    /// What is allowed but most likely a mistake, each said with its fix:
    /// [`NodeConfig::load`] logs them.
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        let allow_private = self.p2p.allow_private_addresses;
        // The listen address is advertised only when no other is. One peers
        // refuse leaves the node undiscovered, but it still syncs by its own
        // dials (a follower behind a firewall): said, not refused.
        let listen = self.listen_address.to_string();
        if self.external_addresses.is_empty()
            && !discovery::is_advertisable(&discovery::canonical_address(&listen), allow_private)
        {
            warnings.push(format!(
                "peers refuse to dial the listen address {listen}, advertised for want of \
                 external-addresses: other nodes will not find this one; set \
                 external-addresses to {ADVERTISABLE}"
            ));
        }
        // Every caller through a proxy or tunnel on this host comes from a
        // loopback address: with the exemption, all of them together skip
        // the caps per address, per prefix, per host and per network.
        let loopback = self.listen_address.ip().to_canonical().is_loopback();
        if self.p2p.inbound_exempt_loopback && !loopback {
            warnings.push(format!(
                "p2p.inbound-exempt-loopback is on while the node listens on {listen}, \
                 beyond this host: callers that reach it through a proxy, tunnel or NAT on \
                 this host all come from a loopback address and skip every per-address and \
                 per-network cap; set p2p.inbound-exempt-loopback = false unless such \
                 callers are trusted"
            ));
        }
        // The metrics port is for the operator's monitoring: on every
        // address, with no networks named (or only networks of every
        // address, /0), it is open to whoever reaches the host.
        if let Some(metrics) = self.metrics_address
            && metrics.ip().is_unspecified()
            && (self.metrics_limits().allowed.iter()).all(|n| n.prefix_len() == 0)
        {
            warnings.push(format!(
                "metrics-address {metrics} listens on every address of this host: bind it \
                 to loopback or a private interface (e.g. 127.0.0.1:{}), name your \
                 scrapers' networks in metrics-allowed-networks, or firewall the port",
                metrics.port()
            ));
        }
        if let Some(archive) = &self.archive
            && archive.max_object_bytes > MOST_OBJECT_BYTES
        {
            warnings.push(format!(
                "archive.max-object-bytes {} is taken as {MOST_OBJECT_BYTES}, the most a \
                 batch is decoded from; larger batches are written in parts",
                archive.max_object_bytes
            ));
        }
        warnings
    }

    /// The P2P layer's settings.
    pub fn p2p_config(&self) -> P2pConfig {
        let p = &self.p2p;
        let mut c = P2pConfig {
            listen_address: self.listen_address,
            external_addresses: self.external_addresses.clone(),
            access: self.access,
            allowlist: self.allowlist.clone(),
            seed_peers: self
                .seed_peers
                .iter()
                .map(|s| SeedPeer {
                    peer_id: s.peer_id,
                    address: s.address.clone(),
                })
                .collect(),
            timeout: p.timeout,
            mailbox_capacity: p.mailbox_capacity,
            ban_duration: p.ban_duration,
            synced_commit_broadcast_capacity: p.synced_commit_broadcast_capacity,
            tick: p.tick,
            height_query_interval: p.height_query_interval,
            verify_synced_block_signatures: p.verify_synced_block_signatures,
            ..P2pConfig::default()
        };
        c.discovery.interval_ms = p.interval.as_millis() as u64;
        c.discovery.target_concurrent_connections = p.target_concurrent_connections;
        // Connections holds the target and the one dial past it that
        // rotates, and allowlisted peers, dialled whatever the target.
        c.connections.max_connections = c.connections.max_connections.max(
            p.target_concurrent_connections
                .saturating_add(1)
                .saturating_add(self.allowlist.len()),
        );
        c.discovery.peers_to_query = p.peers_to_query;
        c.discovery.max_peers_to_send = p.max_peers_to_send;
        c.discovery.max_known_peers = p.max_known_peers;
        c.discovery.max_known_peers_per_source = p.max_known_peers_per_source;
        c.discovery.max_known_peers_per_prefix = p.max_known_peers_per_prefix;
        c.discovery.max_new_peers_per_source_per_interval = p.max_new_peers_per_source_per_interval;
        c.discovery.min_evict_age_ms = p.min_evict_age.as_millis() as u64;
        c.discovery.allow_private_addresses = p.allow_private_addresses;
        c.discovery.rotation_interval_ms = p.rotation_interval.as_millis() as u64;
        c.state_sync.commit_sync_batch_size = p.commit_sync_batch_size;
        c.state_sync.max_lead_over_execution = p.max_lead_over_execution;
        c.prune = soma_actors::state_sync::prune::Config {
            // Checked by `validate`.
            retention: parse_retention(&p.retention).unwrap_or_default(),
            interval_ms: p.prune_interval.as_millis() as u64,
            batch_commits: p.prune_batch_commits,
            grace_ms: p.prune_grace.as_millis() as u64,
            ..soma_actors::state_sync::prune::Config::default()
        };
        c.state_sync.parallel_fetches = p.parallel_fetches;
        c.max_fetches_per_peer = p.max_fetches_per_peer;
        c.supervision.max_restarts = p.max_actor_restarts;
        c.supervision.restart_window_ms = p.actor_restart_window.as_millis() as u64;
        c.state_sync.batches_ahead = p.batches_ahead;
        c.state_sync.commit_fetches_ahead = p.commit_fetches_ahead;
        c.state_sync.max_blocks_per_fetch = p.max_blocks_per_fetch;
        c.state_sync.max_total_fetched_bytes = p.max_total_fetched_bytes;
        c.state_sync.max_hedged_bytes = p.max_hedged_bytes;
        c.state_sync.max_bytes_per_fetch = p.max_bytes_per_fetch;
        c.state_sync.wait_interval_when_no_peer_ms =
            p.wait_interval_when_no_peer.as_millis() as u64;
        c.grpc.commit_sync_batch_size = p.commit_sync_batch_size;
        c.grpc.max_blocks_per_fetch = p.max_blocks_per_fetch;
        c.grpc.max_fetch_response_bytes = p.max_fetch_response_bytes;
        c.grpc.max_concurrent_streams = p.max_concurrent_streams;
        c.grpc.concurrency_limit_per_connection = p.concurrency_limit_per_connection;
        c.grpc.max_inbound_connections = p.max_inbound_connections;
        c.grpc.cheap_calls_per_second = p.cheap_calls_per_second;
        c.grpc.cheap_call_burst = p.cheap_call_burst;
        c.grpc.known_peers_calls_per_minute = p.known_peers_calls_per_minute;
        c.grpc.known_peers_burst = p.known_peers_burst;
        c.grpc.abandoned_fetches_per_minute = p.abandoned_fetches_per_minute;
        c.grpc.abandoned_fetch_burst = p.abandoned_fetch_burst;
        c.grpc.max_rate_limited = p.max_rate_limited;
        c.grpc.reserved_inbound_connections = p.reserved_inbound_connections;
        c.grpc.max_inbound_per_ip = p.max_inbound_per_ip;
        c.grpc.max_inbound_per_prefix = p.max_inbound_per_prefix;
        c.grpc.inbound_exempt_loopback = p.inbound_exempt_loopback;
        c.grpc.tls_handshake_timeout = p.tls_handshake_timeout;
        c.grpc.inbound_idle_timeout = p.inbound_idle_timeout;
        c.grpc.send_timeout = p.send_timeout;
        c.grpc.max_buffered_bytes_per_connection = p.max_buffered_bytes_per_connection;
        c.grpc.max_unwritten_bytes_per_connection = p.max_unwritten_bytes_per_connection;
        c.grpc.answer_cache_bytes = p.answer_cache_bytes;
        c.grpc.max_concurrent_fetches = p.max_concurrent_fetches;
        c.grpc.fetch_stall_timeout = p.fetch_stall_timeout;
        c.grpc.max_concurrent_fetches_per_peer = p.max_concurrent_fetches_per_peer;
        c.grpc.max_concurrent_fetches_per_network = p.max_concurrent_fetches_per_network;
        c.grpc.max_concurrent_fetches_per_host = p.fetches_per_host();
        c.grpc.http2_keepalive_interval = p.http2_keepalive_interval;
        c.grpc.http2_keepalive_timeout = p.http2_keepalive_timeout;
        c.grpc.max_connection_age = p.max_connection_age;
        c.grpc.max_connection_age_grace = p.max_connection_age_grace;
        c.archive = self.archive.as_ref().map(|a| soma_actors::archive::Config {
            url: a.url.clone(),
            write: a.write,
            read: a.read,
            // A file written when the bound was higher still loads.
            max_object_bytes: a.max_object_bytes.min(MOST_OBJECT_BYTES),
            interval: a.interval,
            request_timeout: a.request_timeout,
            max_retry: a.max_retry,
            ..soma_actors::archive::Config::new("")
        });
        c
    }
}

/// A TOML error on one line, naming the line and the text there (so the
/// key of a bad value is named).
const RETENTION_FORMS: &str = "\"all\", \"commits:N\" or \"epochs:N\" with N at least 1";

/// `all`, `commits:N` or `epochs:N`, as the configuration writes it.
pub fn parse_retention(text: &str) -> Result<Retention, &'static str> {
    const EXPECTED: &str = RETENTION_FORMS;
    let number = |n: &str| n.trim().parse::<u64>().ok().filter(|n| *n >= 1);
    match text.trim().split_once(':') {
        None if text.trim() == "all" => Ok(Retention::All),
        Some(("commits", n)) => number(n).map(Retention::Commits).ok_or(EXPECTED),
        Some(("epochs", n)) => number(n).map(Retention::Epochs).ok_or(EXPECTED),
        _ => Err(EXPECTED),
    }
}

fn retention_text(retention: Retention) -> String {
    match retention {
        Retention::All => "all".into(),
        Retention::Commits(n) => format!("commits:{n}"),
        Retention::Epochs(n) => format!("epochs:{n}"),
    }
}

fn one_line(e: &toml::de::Error, text: &str) -> String {
    let message = e.message().trim().replace('\n', " ");
    match e.span() {
        Some(span) => {
            let start = span.start.min(text.len());
            let line = text[..start].matches('\n').count() + 1;
            let content = text.lines().nth(line - 1).unwrap_or("").trim();
            let message = misplaced(&message, content, &section_at(text, line)).unwrap_or(message);
            // std's words for a bad socket address say nothing of the form.
            let message = match message.as_str() {
                "invalid socket address syntax" => format!(
                    "{message}: expected an IP address and a port, such as 0.0.0.0:7000 or \
                     [::]:7000 (not a host name)"
                ),
                _ => message,
            };
            format!("line {line} (`{content}`): {message}")
        }
        None => message,
    }
}

/// The table line `line` (from 1) of `text` is in, as TOML reads it:
/// `""` before any header (a commented header is no header).
fn section_at(text: &str, line: usize) -> String {
    (text.lines().take(line).filter_map(table_header))
        .last()
        .unwrap_or_default()
}

/// The name of the table a line opens, `[name]`, with spaces and a
/// trailing comment as TOML allows them (`[[name]]`, an array of tables,
/// is named `[name]`).
fn table_header(line: &str) -> Option<String> {
    let line = line.split('#').next()?.trim();
    let name = line.strip_prefix('[')?.strip_suffix(']')?;
    Some(name.trim().to_string())
}

/// For an unknown key that is a setting of another section (a top-level
/// key written under `[p2p]`, say), what to say instead of the list of
/// the section's keys, or with it when that list is short: where a
/// setting of that name belongs. The sections are those of the default
/// file, whose every setting is written, commented out or not. A key
/// inside an inline table (`content`, the line, does not start with it:
/// a seed-peers entry) is no section's setting.
fn misplaced(message: &str, content: &str, section: &str) -> Option<String> {
    const SHORT_LIST: usize = 12;
    let key = message.strip_prefix("unknown field `")?.split_once('`')?.0;
    if !content.starts_with(key) {
        return None;
    }
    let mut homes: Vec<String> = Vec::new();
    let mut current = String::new();
    for line in default_file().lines() {
        let line = line.trim().trim_start_matches('#').trim();
        if let Some(name) = table_header(line) {
            current = name;
        }
        if line.split_once(" = ").is_some_and(|(k, _)| k == key) && !homes.contains(&current) {
            homes.push(current.clone());
        }
    }
    if homes.is_empty() || homes.iter().any(|h| h == section) {
        return None;
    }
    let place = |s: &str| match s {
        "" => "at the top of the file, before any [section]".to_string(),
        s => format!("under [{s}]"),
    };
    let here = match section {
        "" => "a top-level setting".to_string(),
        s => format!("a setting of [{s}]"),
    };
    let homes: Vec<String> = homes.iter().map(|h| place(h)).collect();
    let mut told = format!(
        "`{key}` is not {here}; a setting of that name belongs {}",
        homes.join(" or ")
    );
    if message.matches('`').count() / 2 <= SHORT_LIST + 1 {
        told.push_str(&format!(" ({message})"));
    }
    Some(told)
}

fn default_metrics_max_connections() -> usize {
    crate::metrics::Limits::default().connections
}

fn default_metrics_max_connections_per_network() -> usize {
    crate::metrics::Limits::default().per_network
}

fn default_metrics_connection_lifetime() -> Duration {
    crate::metrics::Limits::default().lifetime
}

/// A network of `metrics-allowed-networks`: CIDR notation, or one
/// address, taken as the network of that address alone. A network with
/// bits set past its prefix (`10.1.2.3/8`) is refused as ambiguous. An
/// IPv4-mapped IPv6 network (`::ffff:10.0.0.0/104`) is taken as the IPv4
/// network it maps, since clients are matched as IPv4 addresses.
pub fn metrics_network(text: &str) -> Option<ipnet::IpNet> {
    use ipnet::{IpNet, Ipv4Net};
    let network = match text.trim().parse::<IpNet>() {
        Ok(network) => (network.trunc() == network).then_some(network)?,
        Err(_) => IpNet::from(text.trim().parse::<std::net::IpAddr>().ok()?),
    };
    let IpNet::V6(v6) = network else {
        return Some(network);
    };
    match v6.network().to_ipv4_mapped() {
        Some(v4) if v6.prefix_len() >= 96 => {
            Some(IpNet::V4(Ipv4Net::new(v4, v6.prefix_len() - 96).ok()?))
        }
        _ => Some(network),
    }
}

impl NodeConfig {
    /// What the metrics endpoint allows its clients. Networks that do
    /// not parse are left out: loading the file refused them already.
    pub fn metrics_limits(&self) -> crate::metrics::Limits {
        crate::metrics::Limits {
            connections: self.metrics_max_connections,
            per_network: self.metrics_max_connections_per_network,
            lifetime: self.metrics_connection_lifetime,
            allowed: (self.metrics_allowed_networks.iter())
                .filter_map(|n| metrics_network(n))
                .collect(),
        }
    }
}

/// A commented configuration file with every default, for `config --default`.
pub fn default_file() -> String {
    let p = P2pSection::default();
    format!(
        r#"# soma-p2p node configuration. Relative paths are relative to this file.

# Directory of the node's store (chain.redb).
data-dir = "data"
# Directory of the keys written by `soma-p2p keygen`.
keys-dir = "keys"
# The genesis file written by `soma-p2p genesis`.
genesis = "genesis.toml"
# Where the gRPC server listens.
listen-address = "127.0.0.1:7000"
# Addresses advertised to peers; empty means the listen address.
external-addresses = []
# "public": anyone may connect, anonymous callers read only.
# "private": only allowlisted peers get past the TLS handshake.
access = "public"
# Peer ids (hex) always allowed, and in private mode the only ones.
allowlist = []
# Peers dialled when none is connected, and while known peers leave room
# under target-concurrent-connections; peer-id is optional.
# seed-peers = [{{ peer-id = "…", address = "10.0.0.5:7000" }}]
seed-peers = []
# Prometheus metrics (/metrics); omit to serve none.
# metrics-address = "127.0.0.1:9100"
# Metrics connections served at once (more wait unaccepted), at once from
# one network, a /24 or an IPv6 /64 (more are closed), and how long each
# lives.
# metrics-max-connections = 8
# metrics-max-connections-per-network = 2
# metrics-connection-lifetime = "10s"
# The networks of the scrapers: connections from any other address are
# closed at once. Empty: every address is served.
# metrics-allowed-networks = ["127.0.0.1", "10.0.0.0/8"]
# The store's page cache in bytes: the bound on the memory it keeps.
store-cache-bytes = {cache}

# An archive of certified batches: written in the background, read when
# no connected peer holds a range this node needs (docs/operations.md).
# [archive]
# url = "archive"              # a directory, s3://…, gs://… or https://…
# write = true
# read = true
# interval = "1s"
# request-timeout = "30s"
# max-object-bytes = 67108864
# max-retry = "1m"

# Block production, for validators of a local network only: it reads the
# producer secrets in producer.toml beside the genesis.
# [producer]
# commit-rate = 10.0
# max-commits = 0

[p2p]
# Discovery: round interval, connection target, peers asked per round,
# most peers sent per answer.
interval = "{interval}"
target-concurrent-connections = {target}
peers-to-query = {query}
max-peers-to-send = {send}
# The known-peer table: its size; caps per source (the peer that told us,
# or all callers' own infos together), per /24 or /32 address prefix, and
# on new peers per source per interval. Connected peers are never evicted.
max-known-peers = {known}
max-known-peers-per-source = {per_source}
max-known-peers-per-prefix = {per_prefix}
max-new-peers-per-source-per-interval = {new_per_source}
# A full table gives a new peer the place of a known one only if that one
# was last seen this long before (or came from the new peer's own source):
# a flood of fresh infos takes only the places of peers gone quiet, but a
# new honest node spreads more slowly; "0s": any older entry
# (docs/operations.md).
min-evict-age = "{min_evict_age}"
# Accept peers advertising loopback or private addresses (local networks,
# tests). Set to false on a node reachable from the Internet.
allow-private-addresses = {private}
# At its connection target, swap one connection for one to another known
# peer this often, so that networks rejoin after a partition; "0s": never.
rotation-interval = "{rotation}"
# State sync: tick, height queries, batch size, parallel block fetches,
# fetches sent to one peer at once (keep at or below the peers'
# max-concurrent-fetches-per-peer), batches fetched ahead, blocks per request.
tick = "{tick}"
height-query-interval = "{hqi}"
commit-sync-batch-size = {batch}
parallel-fetches = {parallel}
max-fetches-per-peer = {per_peer}
batches-ahead = {ahead}
# Commit batches fetched ahead of the one next in line, at most: what keeps
# sync fast over long round trips (0: one at a time).
commit-fetches-ahead = {commits_ahead}
max-blocks-per-fetch = {blocks}
# Bounds: largest response chunk; bytes fetches may hold (each fetch counts
# the most its answer may bring from the moment it is sent); bytes hedges
# (late fetches also asked of a second peer) may hold beyond that, 0: never
# hedge; bytes of blocks one block fetch may bring (larger chunks are split).
max-fetch-response-bytes = {resp}
max-total-fetched-bytes = {total}
max-hedged-bytes = {hedged}
max-bytes-per-fetch = {per_fetch}
# Time allowed per request; wait when no peer can serve; ban for bad data.
timeout = "{timeout}"
wait-interval-when-no-peer = "{wait}"
ban-duration = "{ban}"
# Queues: each actor's mailbox, the synced-commit broadcast.
mailbox-capacity = {mailbox}
# An actor that panics is restarted in place, at most max-actor-restarts
# times within actor-restart-window; one more failure stops the node (and
# `soma-p2p run` exits with an error naming the actor).
max-actor-restarts = {actor_restarts}
actor-restart-window = "{actor_window}"
synced-commit-broadcast-capacity = {broadcast}
# What the store keeps: "all" (an archive), "commits:N" (the last N
# commits) or "epochs:N" (the last N epochs). Pruning runs every
# prune-interval, at most prune-batch-commits per write, and never removes
# a commit a registered executor has not taken yet. A new lowest commit is
# advertised prune-grace before commits below it are deleted, so peers
# with an older view are still served (at least twice height-query-interval
# plus timeout).
retention = "{retention}"
prune-interval = "{prune_interval}"
prune-batch-commits = {prune_batch}
prune-grace = "{prune_grace}"
# Commits sync fetches past the last one a registered executor has taken
# (at least commit-sync-batch-size); sync pauses there.
max-lead-over-execution = {lead}
# Check synced block signatures (digests are always checked).
verify-synced-block-signatures = {verify}
# Inbound connections: open calls at once, calls handled at once.
max-concurrent-streams = {streams}
concurrency-limit-per-connection = {per_connection}
# Inbound connections open at once; more are reset right after accept.
# Keep it below the open-file limit (ulimit -n).
max-inbound-connections = {inbound}
# Call rates, per connection and per authenticated caller (token buckets):
# GetCommitInfo and PushCommit a second and at once; GetKnownPeers (answers
# of up to max-peers-to-send infos) a minute and at once; how many
# connections and callers are tracked.
cheap-calls-per-second = {cheap_rate}
cheap-call-burst = {cheap_burst}
known-peers-calls-per-minute = {known_rate}
known-peers-burst = {known_burst}
# FetchCommits and FetchBlocks a caller may drop before reading their
# answers, a minute and at once (a host and a network have as many callers'
# worth as their fetch caps hold callers); past it its fetches are refused.
abandoned-fetches-per-minute = {abandoned_rate}
abandoned-fetch-burst = {abandoned_burst}
max-rate-limited = {rate_limited}
# Of those, slots only committee members and allowlisted peers may hold;
# anonymous and other callers share the rest, and when it is full the
# longest-idle of them (anonymous first) is closed for a newcomer.
reserved-inbound-connections = {reserved}
# Inbound connections from one address, and from one /24 (IPv4) or /64
# (IPv6) network; an IPv6 /32 holds four times as many.
max-inbound-per-ip = {per_ip}
max-inbound-per-prefix = {inbound_per_prefix}
# Loopback callers (this host) skip the two caps above: local test
# networks share 127.0.0.1. They never hold the reserved slots. Turn off
# if untrusted local processes or a local proxy carry remote traffic; the
# node warns when it is on and listen-address is not a loopback address.
inbound-exempt-loopback = {exempt}
# Time to finish the TLS handshake; time without a request or an answer
# (HTTP/2 pings do not count) after which an inbound connection is closed
# (at least `timeout`).
tls-handshake-timeout = "{handshake}"
inbound-idle-timeout = "{idle}"
# Answers: time to hand each one to the transport (past it, it is cut and
# its fetch slot freed; keep it at or above the peers' timeout); bytes of
# answers built but not yet sent, per connection (past it, new answers wait
# for earlier ones to be sent).
send-timeout = "{send_timeout}"
max-buffered-bytes-per-connection = {buffered}
# Bytes of answers handed to HTTP/2 but not yet written to the socket, per
# connection: past it, answers wait for the client to read. What a client
# that does not read leaves in the transport's buffers.
max-unwritten-bytes-per-connection = {unwritten}
# FetchCommits answers kept in memory, in bytes, to answer the same request
# again (syncing peers ask for the same batches) while the store is
# unchanged; 0 keeps none.
answer-cache-bytes = {answer_cache}
# Fetches (FetchCommits, FetchBlocks) served at once, in all, to one
# caller, to the callers of one network (/24, IPv6 /32) and to those of
# one host (an address, an IPv6 /48) within it (committee members and
# allowlisted peers apart, whatever identities the rest use); past them a
# fetch gets RESOURCE_EXHAUSTED. Each holds a slot until its answer is sent
# or cut at send-timeout. Without max-concurrent-fetches-per-host, a host
# gets 8, or the network's cap if that is lower.
max-concurrent-fetches = {fetches}
max-concurrent-fetches-per-peer = {fetches_per_peer}
max-concurrent-fetches-per-network = {fetches_per_network}
max-concurrent-fetches-per-host = {fetches_per_host}
# An answer that sent nothing for this long, or was read more slowly than
# max-fetch-response-bytes per send-timeout, is stalled: when every slot is
# held, a new fetch takes the longest-stalled one's slot and it is cut.
fetch-stall-timeout = "{stall}"
# HTTP/2 pings find dead connections; every connection is asked to close
# at its maximum age and closed after the grace.
http2-keepalive-interval = "{keepalive}"
http2-keepalive-timeout = "{keepalive_timeout}"
max-connection-age = "{age}"
max-connection-age-grace = "{grace}"
"#,
        cache = default_store_cache_bytes(),
        interval = humantime_serde::re::humantime::format_duration(p.interval),
        target = p.target_concurrent_connections,
        query = p.peers_to_query,
        send = p.max_peers_to_send,
        known = p.max_known_peers,
        per_source = p.max_known_peers_per_source,
        per_prefix = p.max_known_peers_per_prefix,
        new_per_source = p.max_new_peers_per_source_per_interval,
        min_evict_age = humantime_serde::re::humantime::format_duration(p.min_evict_age),
        private = p.allow_private_addresses,
        rotation = humantime_serde::re::humantime::format_duration(p.rotation_interval),
        tick = humantime_serde::re::humantime::format_duration(p.tick),
        hqi = humantime_serde::re::humantime::format_duration(p.height_query_interval),
        batch = p.commit_sync_batch_size,
        parallel = p.parallel_fetches,
        per_peer = p.max_fetches_per_peer,
        ahead = p.batches_ahead,
        commits_ahead = p.commit_fetches_ahead,
        blocks = p.max_blocks_per_fetch,
        resp = p.max_fetch_response_bytes,
        total = p.max_total_fetched_bytes,
        hedged = p.max_hedged_bytes,
        per_fetch = p.max_bytes_per_fetch,
        timeout = humantime_serde::re::humantime::format_duration(p.timeout),
        wait = humantime_serde::re::humantime::format_duration(p.wait_interval_when_no_peer),
        ban = humantime_serde::re::humantime::format_duration(p.ban_duration),
        mailbox = p.mailbox_capacity,
        actor_restarts = p.max_actor_restarts,
        actor_window = humantime_serde::re::humantime::format_duration(p.actor_restart_window),
        broadcast = p.synced_commit_broadcast_capacity,
        retention = p.retention,
        prune_interval = humantime_serde::re::humantime::format_duration(p.prune_interval),
        prune_batch = p.prune_batch_commits,
        prune_grace = humantime_serde::re::humantime::format_duration(p.prune_grace),
        lead = p.max_lead_over_execution,
        verify = p.verify_synced_block_signatures,
        streams = p.max_concurrent_streams,
        per_connection = p.concurrency_limit_per_connection,
        inbound = p.max_inbound_connections,
        cheap_rate = p.cheap_calls_per_second,
        cheap_burst = p.cheap_call_burst,
        known_rate = p.known_peers_calls_per_minute,
        known_burst = p.known_peers_burst,
        abandoned_rate = p.abandoned_fetches_per_minute,
        abandoned_burst = p.abandoned_fetch_burst,
        rate_limited = p.max_rate_limited,
        reserved = p.reserved_inbound_connections,
        per_ip = p.max_inbound_per_ip,
        inbound_per_prefix = p.max_inbound_per_prefix,
        exempt = p.inbound_exempt_loopback,
        handshake = humantime_serde::re::humantime::format_duration(p.tls_handshake_timeout),
        idle = humantime_serde::re::humantime::format_duration(p.inbound_idle_timeout),
        send_timeout = humantime_serde::re::humantime::format_duration(p.send_timeout),
        buffered = p.max_buffered_bytes_per_connection,
        unwritten = p.max_unwritten_bytes_per_connection,
        answer_cache = p.answer_cache_bytes,
        fetches = p.max_concurrent_fetches,
        fetches_per_peer = p.max_concurrent_fetches_per_peer,
        fetches_per_network = p.max_concurrent_fetches_per_network,
        fetches_per_host = p.fetches_per_host(),
        stall = humantime_serde::re::humantime::format_duration(p.fetch_stall_timeout),
        keepalive = humantime_serde::re::humantime::format_duration(p.http2_keepalive_interval),
        keepalive_timeout =
            humantime_serde::re::humantime::format_duration(p.http2_keepalive_timeout),
        age = humantime_serde::re::humantime::format_duration(p.max_connection_age),
        grace = humantime_serde::re::humantime::format_duration(p.max_connection_age_grace),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<NodeConfig, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.toml");
        std::fs::write(&path, text).unwrap();
        NodeConfig::load(&path)
    }

    #[test]
    fn the_default_file_parses_to_the_defaults() {
        let config = parse(&default_file()).unwrap();
        assert_eq!(config.p2p, P2pSection::default());
        assert_eq!(config.p2p.interval, Duration::from_secs(5));
        assert_eq!(config.p2p.parallel_fetches, 8);
        assert_eq!(config.p2p.max_total_fetched_bytes, 128 << 20);
        assert_eq!(config.p2p.max_hedged_bytes, 64 << 20);
        assert_eq!(config.p2p.max_inbound_connections, 512);
        assert_eq!(
            (
                config.p2p.reserved_inbound_connections,
                config.p2p.max_inbound_per_ip,
                config.p2p.max_inbound_per_prefix,
                config.p2p.inbound_exempt_loopback,
            ),
            (64, 8, 32, true)
        );
        assert_eq!(config.p2p.tls_handshake_timeout, Duration::from_secs(5));
        assert_eq!(config.p2p.inbound_idle_timeout, Duration::from_secs(60));
        let inbound = config.p2p_config().grpc.inbound();
        assert_eq!(inbound, soma_wire::inbound::Config::default());
        assert_eq!(config.p2p.send_timeout, Duration::from_secs(10));
        assert_eq!(config.p2p.max_buffered_bytes_per_connection, 16 << 20);
        assert_eq!(config.p2p.max_unwritten_bytes_per_connection, 1 << 20);
        assert_eq!(config.p2p.answer_cache_bytes, 16 << 20);
        assert_eq!(config.p2p.max_connection_age, Duration::from_secs(1_800));
        let grpc = config.p2p_config().grpc;
        assert_eq!(grpc.send_timeout, Duration::from_secs(10));
        assert_eq!(grpc.http2_keepalive_interval, Duration::from_secs(30));
        assert_eq!(grpc.http2_keepalive_timeout, Duration::from_secs(10));
        assert_eq!(grpc.max_connection_age_grace, Duration::from_secs(30));
    }

    /// Other valid-looking values for a key's default `value`, as TOML.
    fn other_values(key: &str, value: &str) -> Vec<String> {
        let special: &[(&str, &[&str])] = &[
            ("listen-address", &["\"127.0.0.1:7001\""]),
            ("external-addresses", &["[\"192.0.2.1:7000\"]"]),
            ("access", &["\"private\""]),
            (
                "allowlist",
                &[concat!(
                    "[\"",
                    "0101010101010101010101010101010101010101010101010101010101010101",
                    "\"]"
                )],
            ),
            ("seed-peers", &["[{ address = \"192.0.2.1:7000\" }]"]),
            ("retention", &["\"commits:100\"", "\"epochs:2\""]),
            ("url", &["\"elsewhere\""]),
            // The default is the most used: a larger value is taken as it.
            ("max-object-bytes", &["33554432"]),
        ];
        if let Some((_, values)) = special.iter().find(|(k, _)| *k == key) {
            return values.iter().map(|v| v.to_string()).collect();
        }
        match value {
            "true" => return vec!["false".into()],
            "false" => return vec!["true".into()],
            _ => {}
        }
        // A number, or a duration in quotes: its digits changed.
        let inner = value.trim_matches('"');
        let digits: String = inner
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == '.')
            .collect();
        let unit = &inner[digits.len()..];
        let quote = if value.starts_with('"') { "\"" } else { "" };
        let Ok(n) = digits.parse::<f64>() else {
            panic!("{key} = {value}: no other value known; add one here");
        };
        [n + 1.0, n - 1.0, n * 2.0, (n / 2.0).floor()]
            .into_iter()
            .filter(|m| *m >= 0.0 && *m != n)
            .map(|m| {
                let m = if digits.contains('.') {
                    format!("{m:.1}")
                } else {
                    format!("{m}")
                };
                format!("{quote}{m}{unit}{quote}")
            })
            .collect()
    }

    #[test]
    fn every_key_set_to_another_value_changes_the_settings_the_node_runs_with() {
        // Keys `run` reads straight from the file (paths, the store's
        // cache, block production): their use is tested where they are
        // used. Every other key must change the P2P settings, or it is read
        // and dropped.
        const READ_BY_RUN: [&str; 5] = [
            "data-dir",
            "keys-dir",
            "genesis",
            "store-cache-bytes",
            "commit-rate",
        ];
        let file = with_archive(|section| section.to_string());
        // One directory for all: relative paths resolve alike.
        let dir = tempfile::tempdir().unwrap();
        let parse = |text: &str| {
            let path = dir.path().join("node.toml");
            std::fs::write(&path, text).unwrap();
            NodeConfig::load(&path)
        };
        let settings = |c: &NodeConfig| format!("{:?}", c.p2p_config());
        let base = settings(&parse(&file).expect("the default file with [archive] parses"));
        let again = settings(&parse(&file).unwrap());
        assert_eq!(base, again, "the same file gives the same settings");
        let mut checked = 0;
        for line in file.lines() {
            let Some((key, value)) = line.split_once(" = ") else {
                continue;
            };
            if line.starts_with('#') || READ_BY_RUN.contains(&key) {
                continue;
            }
            let value = value.split(" #").next().unwrap().trim();
            let tried: Vec<_> = other_values(key, value)
                .into_iter()
                .map(|v| {
                    let text = file.replacen(line, &format!("{key} = {v}"), 1);
                    (v, parse(&text))
                })
                .collect();
            let Some((v, config)) = tried
                .iter()
                .find_map(|(v, c)| c.as_ref().ok().map(|c| (v, c)))
            else {
                panic!(
                    "{key}: no other value loads: {:?}",
                    tried
                        .iter()
                        .map(|(v, c)| (v, c.as_ref().err()))
                        .collect::<Vec<_>>()
                );
            };
            assert_ne!(
                settings(config),
                base,
                "`{key} = {v}` does not reach the node's settings"
            );
            checked += 1;
        }
        // Every key of the default file but those `run` reads itself: the
        // top level, [p2p] and [archive].
        assert_eq!(checked, 5 + 65 + 7);
    }

    /// The default file with its commented `[archive]` section enabled,
    /// `edit` applied to the section's text.
    fn with_archive(edit: impl Fn(&str) -> String) -> String {
        let file = default_file();
        let start = file
            .find("# [archive]")
            .expect("the default file shows [archive]");
        let end = start + file[start..].find("\n\n").expect("the section ends");
        let section: String = file[start..end]
            .lines()
            .map(|l| format!("{}\n", l.strip_prefix("# ").unwrap_or(l)))
            .collect();
        // A table must come after the top-level keys, before `[p2p]`.
        format!("{}{}{}", &file[..start], edit(&section), &file[end..])
    }

    #[test]
    fn an_archive_section_is_read_and_its_bad_values_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.toml");
        std::fs::write(&path, with_archive(|s| s.to_string())).unwrap();
        let config = NodeConfig::load(&path).unwrap();
        let archive = config.p2p_config().archive.expect("an archive");
        // A relative directory is relative to the file.
        assert_eq!(
            archive.url,
            dir.path().join("archive").display().to_string()
        );
        assert_eq!(
            (archive.write, archive.read, archive.max_object_bytes),
            (true, true, 64 << 20)
        );
        assert_eq!(archive.interval, Duration::from_secs(1));
        assert_eq!(archive.request_timeout, Duration::from_secs(30));
        assert_eq!(archive.max_retry, Duration::from_secs(60));

        let s3 = parse(&with_archive(|s| {
            s.replace("url = \"archive\"", "url = \"s3://bucket/soma\"")
                .replace("write = true", "write = false")
        }))
        .unwrap()
        .p2p_config()
        .archive
        .unwrap();
        assert_eq!(
            (s3.url.as_str(), s3.write, s3.read),
            ("s3://bucket/soma", false, true)
        );

        // A store this binary cannot use is refused at once, with the way
        // to reach a plain-HTTP S3 server; so is a URL a slash short, which
        // would be read as a directory.
        for url in [
            "http://host/prefix",
            "ftp://host/prefix",
            "memory:///",
            "s3:/bucket/soma",
            "GS:bucket",
            "https:/host/soma",
            "file:/var/soma",
        ] {
            let e = parse(&with_archive(|s| {
                s.replace("url = \"archive\"", &format!("url = \"{url}\""))
            }))
            .unwrap_err()
            .to_string();
            assert!(
                e.contains("archive.url") && e.contains(url) && e.contains("AWS_ALLOW_HTTP=true"),
                "{e}"
            );
        }
        for url in ["gs://bucket/soma", "https://host/soma", "file:///var/soma"] {
            let loaded = parse(&with_archive(|s| {
                s.replace("url = \"archive\"", &format!("url = \"{url}\""))
            }));
            assert_eq!(loaded.unwrap().p2p_config().archive.unwrap().url, url);
        }

        let e = parse(&with_archive(|s| {
            s.replace("interval = \"1s\"", "interval = \"0s\"")
        }))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("archive.interval") && e.contains("between 10ms and 1h"),
            "{e}"
        );
        let e = parse(&with_archive(|s| {
            s.replace("max-object-bytes = 67108864", "max-object-bytes = 10")
        }))
        .unwrap_err()
        .to_string();
        assert!(e.contains("archive.max-object-bytes"), "{e}");
        // A file written when the bound was higher loads, taken as 64 MiB.
        let old = parse(&with_archive(|s| {
            s.replace(
                "max-object-bytes = 67108864",
                "max-object-bytes = 268435456",
            )
        }))
        .unwrap();
        let archive = old.p2p_config().archive.unwrap();
        assert_eq!(archive.max_object_bytes, 64 << 20);
    }

    #[test]
    fn what_is_allowed_but_likely_a_mistake_is_warned_with_its_fix() {
        // The default file: loopback, private addresses allowed, the
        // loopback exemption on, no archive.
        assert_eq!(
            parse(&default_file()).unwrap().warnings(),
            Vec::<String>::new()
        );
        let public = |file: &str| {
            file.replace(
                "listen-address = \"127.0.0.1:7000\"",
                "listen-address = \"203.0.113.7:7000\"",
            )
        };
        let exempt_off = |file: &str| {
            file.replace(
                "inbound-exempt-loopback = true",
                "inbound-exempt-loopback = false",
            )
        };
        let warned = |file: &str| parse(file).unwrap().warnings();

        // Listening beyond this host with the exemption on: one warning,
        // naming the setting and its fix. Off, none.
        let warnings = warned(&public(&default_file()));
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].contains("203.0.113.7:7000")
                && warnings[0].contains("set p2p.inbound-exempt-loopback = false"),
            "{warnings:?}"
        );
        assert_eq!(
            warned(&exempt_off(&public(&default_file()))),
            Vec::<String>::new()
        );
        // On every address, 0.0.0.0 included (advertised addresses set).
        let anywhere = default_file()
            .replace(
                "listen-address = \"127.0.0.1:7000\"",
                "listen-address = \"0.0.0.0:7000\"",
            )
            .replace(
                "external-addresses = []",
                "external-addresses = [\"203.0.113.7:7000\"]",
            );
        let warnings = warned(&anywhere);
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains("0.0.0.0:7000"), "{warnings:?}");

        // A listen address peers refuse, advertised for want of another.
        let private_refused = exempt_off(&default_file()).replace(
            "allow-private-addresses = true",
            "allow-private-addresses = false",
        );
        let warnings = warned(&private_refused);
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].contains("peers refuse to dial the listen address 127.0.0.1:7000")
                && warnings[0].contains("set external-addresses"),
            "{warnings:?}"
        );

        // Metrics on every address; on loopback, none.
        let metrics = |address: &str| {
            default_file().replace(
                "# metrics-address = \"127.0.0.1:9100\"",
                &format!("metrics-address = \"{address}\""),
            )
        };
        let warnings = warned(&metrics("0.0.0.0:9100"));
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].contains("metrics-address 0.0.0.0:9100 listens on every address")
                && warnings[0].contains("127.0.0.1:9100"),
            "{warnings:?}"
        );
        assert_eq!(warned(&metrics("127.0.0.1:9100")), Vec::<String>::new());
        // On every address, but serving only the networks named: none;
        // naming every address (/0) is no naming.
        let named = |networks: &str| {
            default_file().replace(
                "# metrics-address = \"127.0.0.1:9100\"",
                &format!(
                    "metrics-address = \"0.0.0.0:9100\"\nmetrics-allowed-networks = {networks}"
                ),
            )
        };
        assert_eq!(warned(&named("[\"10.0.0.0/8\"]")), Vec::<String>::new());
        let everyone = warned(&named("[\"0.0.0.0/0\", \"::/0\"]"));
        assert_eq!(everyone.len(), 1, "{everyone:?}");
        assert!(
            everyone[0].contains("metrics-allowed-networks"),
            "{everyone:?}"
        );

        // An archive object bound past what a batch is decoded from.
        let large = with_archive(|s| {
            s.replace(
                "max-object-bytes = 67108864",
                "max-object-bytes = 268435456",
            )
        });
        let warnings = warned(&large);
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].contains("archive.max-object-bytes 268435456 is taken as 67108864"),
            "{warnings:?}"
        );
    }

    #[test]
    fn a_connection_target_past_the_librarys_default_limit_raises_the_limit() {
        let config = parse(&default_file()).unwrap().p2p_config();
        let limit = config.connections.max_connections;
        assert_eq!(config.check(), Ok(()));
        let text = default_file().replace(
            &format!(
                "target-concurrent-connections = {}",
                config.discovery.target_concurrent_connections
            ),
            &format!("target-concurrent-connections = {}", limit + 36),
        );
        let config = parse(&text).unwrap().p2p_config();
        assert_eq!(config.discovery.target_concurrent_connections, limit + 36);
        // Room for the dial that rotates, past the target.
        assert_eq!(config.connections.max_connections, limit + 37);
        assert_eq!(config.check(), Ok(()));
    }

    #[test]
    fn retention_is_parsed_and_a_bad_one_is_named() {
        let config = parse(&default_file()).unwrap();
        assert_eq!(config.p2p_config().prune.retention, Retention::All);
        for (text, retention) in [
            ("commits:5000", Retention::Commits(5_000)),
            ("epochs:3", Retention::Epochs(3)),
        ] {
            let file =
                default_file().replace("retention = \"all\"", &format!("retention = \"{text}\""));
            assert_eq!(
                parse(&file).unwrap().p2p_config().prune.retention,
                retention
            );
        }
        for bad in ["some", "commits:0", "epochs:x", "commits"] {
            let file =
                default_file().replace("retention = \"all\"", &format!("retention = \"{bad}\""));
            let e = parse(&file).unwrap_err().to_string();
            assert!(
                e.contains("p2p.retention") && e.contains("commits:N"),
                "{e}"
            );
        }
        let file = default_file().replace(
            "max-lead-over-execution = 10000",
            "max-lead-over-execution = 10",
        );
        let e = parse(&file).unwrap_err().to_string();
        assert!(e.contains("p2p.max-lead-over-execution"), "{e}");
    }

    #[test]
    fn inbound_caps_are_checked_against_each_other() {
        let text = default_file().replace(
            "reserved-inbound-connections = 64",
            "reserved-inbound-connections = 512",
        );
        let e = parse(&text).unwrap_err().to_string();
        assert!(
            e.contains("p2p.reserved-inbound-connections") && e.contains("512"),
            "{e}"
        );
        let text = default_file().replace("max-inbound-per-ip = 8", "max-inbound-per-ip = 33");
        let e = parse(&text).unwrap_err().to_string();
        assert!(e.contains("p2p.max-inbound-per-ip"), "{e}");
        let text = default_file().replace(
            "inbound-idle-timeout = \"1m\"",
            "inbound-idle-timeout = \"5s\"",
        );
        let e = parse(&text).unwrap_err().to_string();
        assert!(
            e.contains("p2p.inbound-idle-timeout") && e.contains("5000ms"),
            "{e}"
        );
        let text = default_file().replace(
            "tls-handshake-timeout = \"5s\"",
            "tls-handshake-timeout = \"10m\"",
        );
        let e = parse(&text).unwrap_err().to_string();
        assert!(e.contains("p2p.tls-handshake-timeout"), "{e}");
    }

    #[test]
    fn unknown_keys_are_named() {
        let text = default_file().replace("parallel-fetches = 8", "parallel-fetchez = 8");
        let e = parse(&text).unwrap_err().to_string();
        assert!(e.contains("parallel-fetchez"), "{e}");
        assert!(!e.contains('\n'), "one line: {e}");
    }

    /// A peer id or an address of the wrong form is refused saying what
    /// form is expected (the words of hex and std said only "Odd number of
    /// digits" or "invalid socket address syntax").
    #[test]
    fn values_of_the_wrong_form_are_told_the_form_expected() {
        let refused = |from: &str, to: &str| {
            assert!(default_file().contains(from), "{from}");
            let e = parse(&default_file().replace(from, to))
                .unwrap_err()
                .to_string();
            let (_, message) = e.split_once("`): ").expect("a line named");
            message.to_string()
        };
        let seed = "seed-peers = [{ peer-id = \"abc\", address = \"10.0.0.5:7000\" }]";
        let e = refused("seed-peers = []", seed);
        assert!(
            e.contains("expected 64 hex characters (32 bytes), got 3 bytes of text"),
            "{e}"
        );
        let e = refused("allowlist = []", "allowlist = [\"zz\"]");
        assert!(
            e.starts_with("expected 64 hex characters (32 bytes), got 2"),
            "{e}"
        );
        let e = refused(
            "listen-address = \"127.0.0.1:7000\"",
            "listen-address = \"localhost:7000\"",
        );
        assert_eq!(
            e,
            "invalid socket address syntax: expected an IP address and a port, such as \
             0.0.0.0:7000 or [::]:7000 (not a host name)"
        );
    }

    /// A setting written in another section than its own is told where it
    /// belongs, rather than listed against the section's keys.
    #[test]
    fn a_setting_in_the_wrong_section_is_told_where_it_belongs() {
        let refused = |text: String| {
            let e = parse(&text).unwrap_err().to_string();
            let (_, message) = e.split_once("`): ").expect("a line named");
            message.to_string()
        };
        let under_p2p = |line: &str| default_file().replace("[p2p]\n", &format!("[p2p]\n{line}\n"));
        assert_eq!(
            refused(under_p2p("metrics-address = \"127.0.0.1:9100\"")),
            "`metrics-address` is not a setting of [p2p]; a setting of that name belongs at \
             the top of the file, before any [section]"
        );
        // A commented-out section's setting.
        assert_eq!(
            refused(under_p2p("request-timeout = \"5s\"")),
            "`request-timeout` is not a setting of [p2p]; a setting of that name belongs \
             under [archive]"
        );
        // Under [archive], whose settings are few: they are listed too.
        let archive = with_archive(|s| s.replace("write = true", "write = true\ntimeout = \"5s\""));
        let told = refused(archive);
        assert!(
            told.starts_with(
                "`timeout` is not a setting of [archive]; a setting of that name belongs \
                 under [p2p] (unknown field `timeout`, expected one of `url`"
            ) && told.contains("`request-timeout`"),
            "{told}"
        );
        // A setting uncommented without its commented header: top-level.
        let stray = default_file().replace("# url = \"archive\"", "url = \"archive\"");
        assert!(refused(stray).starts_with(
            "`url` is not a top-level setting; a setting of that name belongs under [archive]"
        ),);
        // A header with a trailing comment is read as TOML reads it.
        let commented = default_file().replace(
            "[p2p]\n",
            "[p2p] # the layer\nmetrics-address = \"127.0.0.1:9100\"\n",
        );
        assert!(refused(commented).starts_with("`metrics-address` is not a setting of [p2p];"));
        // A key inside a seed-peers entry is no section's setting.
        let entry = default_file().replace(
            "seed-peers = []",
            "seed-peers = [{ address = \"10.0.0.5:7000\", interval = \"1s\" }]",
        );
        let told = refused(entry);
        assert!(
            told.starts_with("unknown field `interval`, expected"),
            "{told}"
        );
        let top = default_file()
            .replace("allow-private-addresses = true", "")
            .replace(
                "store-cache-bytes",
                "allow-private-addresses = true\nstore-cache-bytes",
            );
        assert_eq!(
            refused(top),
            "`allow-private-addresses` is not a top-level setting; a setting of that name \
             belongs under [p2p]"
        );
        // A key of no section: the section's keys, as before.
        let typo = refused(under_p2p("intervall = \"1s\""));
        assert!(
            typo.starts_with("unknown field `intervall`, expected one of `interval`"),
            "{typo}"
        );
    }

    /// Five distinct external addresses: peers would refuse the node's
    /// info (at most 4), so the file is refused; one address spelled five
    /// ways is one.
    #[test]
    fn more_addresses_than_peers_take_in_one_info_are_refused() {
        let addresses = |list: &[&str]| {
            let quoted: Vec<String> = list.iter().map(|a| format!("\"{a}\"")).collect();
            default_file().replace(
                "external-addresses = []",
                &format!("external-addresses = [{}]", quoted.join(", ")),
            )
        };
        let five = [
            "192.0.2.1:7000",
            "192.0.2.2:7000",
            "192.0.2.3:7000",
            "192.0.2.4:7000",
        ];
        let config = parse(&addresses(&five)).expect("four load");
        assert_eq!(config.external_addresses.len(), 4);
        let mut five = five.to_vec();
        five.push("192.0.2.5:7000");
        let e = parse(&addresses(&five)).unwrap_err().to_string();
        assert!(
            e.contains("external-addresses")
                && e.contains("at most 4")
                && e.contains("5 addresses"),
            "{e}"
        );
        let one = [
            "[2001:db8::1]:7000",
            "[2001:DB8::1]:7000",
            "[2001:db8:0:0::1]:7000",
        ];
        let twice = [&one[..], &one[..2]].concat();
        assert!(parse(&addresses(&twice)).is_ok());
    }

    #[test]
    fn the_metrics_endpoints_limits_are_read_from_the_file_and_bounded() {
        assert_eq!(
            format!("{:?}", parse(&default_file()).unwrap().metrics_limits()),
            format!("{:?}", crate::metrics::Limits::default())
        );
        let set = |lines: &str| {
            default_file().replace(
                "# metrics-address = \"127.0.0.1:9100\"",
                &format!("metrics-address = \"127.0.0.1:9100\"\n{lines}"),
            )
        };
        let text = set("metrics-max-connections = 16\n\
             metrics-max-connections-per-network = 4\n\
             metrics-connection-lifetime = \"30s\"");
        let limits = parse(&text).unwrap().metrics_limits();
        assert_eq!(
            (limits.connections, limits.per_network, limits.lifetime),
            (16, 4, Duration::from_secs(30))
        );
        // The setting's name before it counted networks still loads.
        let old = set("metrics-max-connections-per-address = 3");
        assert_eq!(parse(&old).unwrap().metrics_limits().per_network, 3);
        // Networks, and addresses as the networks of themselves alone.
        let text = set(
            "metrics-allowed-networks = [\"10.0.0.0/8\", \" 192.0.2.7 \", \
             \"2001:db8::/32\", \"::1\", \"::ffff:172.16.0.0/108\", \"::ffff:192.0.2.8\"]",
        );
        let allowed: Vec<String> = (parse(&text).unwrap().metrics_limits().allowed.iter())
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            allowed,
            [
                "10.0.0.0/8",
                "192.0.2.7/32",
                "2001:db8::/32",
                "::1/128",
                "172.16.0.0/12",
                "192.0.2.8/32"
            ]
        );
        for (line, key, allowed) in [
            (
                "metrics-max-connections = 0",
                "metrics-max-connections",
                "between 1 and 1024",
            ),
            (
                "metrics-max-connections-per-network = 9",
                "metrics-max-connections-per-network",
                "between 1 and metrics-max-connections",
            ),
            (
                "metrics-connection-lifetime = \"0s\"",
                "metrics-connection-lifetime",
                "between 1s and 1h",
            ),
            (
                "metrics-allowed-networks = [\"10.0.0.0/8\", \"10.0.0/8\"]",
                "metrics-allowed-networks",
                "got \"10.0.0/8\"",
            ),
            (
                "metrics-allowed-networks = [\"192.168.1.5/16\"]",
                "metrics-allowed-networks",
                "no bits set past the prefix",
            ),
            (
                "metrics-allowed-networks = [\"\"]",
                "metrics-allowed-networks",
                "got \"\"",
            ),
            (
                "metrics-allowed-networks = [\"10.0.0.0/33\"]",
                "metrics-allowed-networks",
                "a list of networks such as \"10.0.0.0/8\"",
            ),
        ] {
            let e = parse(&set(line)).unwrap_err().to_string();
            assert!(e.contains(key) && e.contains(allowed), "{line}: {e}");
        }
    }

    #[test]
    fn out_of_range_values_are_named_with_their_range() {
        // The metrics endpoint at the node's own port.
        let text = default_file().replace(
            "# metrics-address = \"127.0.0.1:9100\"",
            "metrics-address = \"0.0.0.0:7000\"",
        );
        let e = parse(&text).unwrap_err().to_string();
        assert!(
            e.contains("metrics-address") && e.contains("other than listen-address"),
            "{e}"
        );
        let text = default_file().replace("min-evict-age = \"0s\"", "min-evict-age = \"61m\"");
        let e = parse(&text).unwrap_err().to_string();
        assert!(
            e.contains("p2p.min-evict-age") && e.contains("between 0s and 1h"),
            "{e}"
        );
        let text = default_file().replace("min-evict-age = \"0s\"", "min-evict-age = \"30s\"");
        let config = parse(&text).unwrap().p2p_config();
        assert_eq!(config.discovery.min_evict_age_ms, 30_000);
        let text = default_file().replace("max-actor-restarts = 5", "max-actor-restarts = 1001");
        let e = parse(&text).unwrap_err().to_string();
        assert!(
            e.contains("p2p.max-actor-restarts") && e.contains("between 0 and 1000"),
            "{e}"
        );
        let text = default_file().replace("parallel-fetches = 8", "parallel-fetches = 0");
        let e = parse(&text).unwrap_err().to_string();
        assert!(
            e.contains("p2p.parallel-fetches") && e.contains("between 1 and 256"),
            "{e}"
        );
        let text = default_file().replace(
            "max-inbound-connections = 512",
            "max-inbound-connections = 0",
        );
        let e = parse(&text).unwrap_err().to_string();
        assert!(
            e.contains("p2p.max-inbound-connections") && e.contains("between 1 and 1048576"),
            "{e}"
        );
        let text = default_file().replace(
            "max-buffered-bytes-per-connection = 16777216",
            "max-buffered-bytes-per-connection = 1024",
        );
        let e = parse(&text).unwrap_err().to_string();
        assert!(
            e.contains("p2p.max-buffered-bytes-per-connection")
                && e.contains("between 1048576 and 4294967296"),
            "{e}"
        );
        // A host's share is at most its network's.
        let text = default_file().replace(
            "max-concurrent-fetches-per-host = 8",
            "max-concurrent-fetches-per-host = 17",
        );
        let e = parse(&text).unwrap_err().to_string();
        assert!(
            e.contains("p2p.max-concurrent-fetches-per-host")
                && e.contains("between 1 and max-concurrent-fetches-per-network"),
            "{e}"
        );
        // A node advertised at another service's port is never dialled.
        let text = default_file().replace("127.0.0.1:7000", "127.0.0.1:22");
        let e = parse(&text).unwrap_err().to_string();
        assert!(
            e.contains("key `listen-address`") && e.contains("another service's"),
            "{e}"
        );
        let text = default_file().replace(
            "external-addresses = []",
            "external-addresses = [\"192.0.2.1:7000\", \"192.0.2.1:5432\"]",
        );
        let e = parse(&text).unwrap_err().to_string();
        assert!(
            e.contains("key `external-addresses`") && e.contains("got 192.0.2.1:5432"),
            "{e}"
        );
        // Addresses peers would refuse are refused at load: a host name,
        // an unspecified or link-local address, a private one where
        // private addresses are refused; a seed with no port likewise.
        for (key, from, to) in [
            (
                "external-addresses",
                "external-addresses = []",
                "external-addresses = [\"node.example:7000\"]",
            ),
            (
                "external-addresses",
                "external-addresses = []",
                "external-addresses = [\"169.254.1.1:7000\"]",
            ),
            (
                "seed-peers",
                "seed-peers = []",
                "seed-peers = [{ address = \"10.0.0.5\" }]",
            ),
            (
                "seed-peers",
                "seed-peers = []",
                "seed-peers = [{ address = \"2001:db8::1\" }]",
            ),
        ] {
            let text = default_file().replace(from, to);
            assert_ne!(text, default_file(), "{to}");
            let e = parse(&text).unwrap_err().to_string();
            assert!(e.contains(&format!("key `{key}`")), "{to}: {e}");
        }
        // A listen address peers refuse, advertised for want of another,
        // leaves the node undiscovered but syncing by its own dials: it
        // loads (with a warning).
        let text = default_file().replace("127.0.0.1:7000", "0.0.0.0:7000");
        assert_ne!(text, default_file());
        assert!(parse(&text).is_ok());
        // Advertised elsewhere, the node may listen there (behind a
        // forwarded port).
        let text = default_file()
            .replace("127.0.0.1:7000", "127.0.0.1:22")
            .replace(
                "external-addresses = []",
                "external-addresses = [\"192.0.2.1:7000\"]",
            );
        assert!(parse(&text).is_ok());
        for bytes in ["1024", "68719476737"] {
            let text = default_file().replace(
                "max-hedged-bytes = 67108864",
                &format!("max-hedged-bytes = {bytes}"),
            );
            let e = parse(&text).unwrap_err().to_string();
            assert!(
                e.contains("p2p.max-hedged-bytes") && e.contains("0 (never hedge) or between"),
                "{e}"
            );
        }
        let text = default_file().replace("max-hedged-bytes = 67108864", "max-hedged-bytes = 0");
        assert_eq!(
            parse(&text)
                .unwrap()
                .p2p_config()
                .state_sync
                .max_hedged_bytes,
            0
        );
        let text = default_file().replace("send-timeout = \"10s\"", "send-timeout = \"1h\"");
        let e = parse(&text).unwrap_err().to_string();
        assert!(e.contains("p2p.send-timeout"), "{e}");
        // A duration whose milliseconds pass u64 does not wrap into range
        // (2^64 ms + 10 s read as 10 s before).
        let huge = "\ntimeout = \"18446744073709561s 616ms\"";
        let text = default_file().replace("\ntimeout = \"10s\"", huge);
        assert_ne!(text, default_file());
        let e = parse(&text).unwrap_err().to_string();
        assert!(e.contains("key `p2p.timeout`"), "{e}");
        // At the start of a line: other keys end in "timeout" too.
        let text = default_file().replace("\ntimeout = \"10s\"", "\ntimeout = \"1h\"");
        let e = parse(&text).unwrap_err().to_string();
        assert!(e.contains("p2p.timeout"), "{e}");
        // 2 × 1s + 10s: 12s is the least grace the defaults allow.
        let grace = |g: &str| default_file().replace("prune-grace = \"30s\"", g);
        assert!(parse(&grace("prune-grace = \"12s\"")).is_ok());
        let e = parse(&grace("prune-grace = \"11s 999ms\""))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("p2p.prune-grace")
                && e.contains("twice p2p.height-query-interval plus p2p.timeout"),
            "{e}"
        );
    }

    /// A file written before the per-host cap existed loads as it did,
    /// even with a network cap below the host cap's default.
    #[test]
    fn a_file_without_the_host_cap_loads_with_its_network_cap() {
        let text = default_file()
            .replace("max-concurrent-fetches-per-host = 8\n", "")
            .replace(
                "max-concurrent-fetches-per-network = 16",
                "max-concurrent-fetches-per-network = 4",
            );
        assert!(!text.contains("max-concurrent-fetches-per-host ="));
        let grpc = parse(&text).expect("loads").p2p_config().grpc;
        assert_eq!(
            (
                grpc.max_concurrent_fetches_per_network,
                grpc.max_concurrent_fetches_per_host
            ),
            (4, 4)
        );
        let text = default_file().replace("max-concurrent-fetches-per-host = 8\n", "");
        let grpc = parse(&text).expect("loads").p2p_config().grpc;
        assert_eq!(grpc.max_concurrent_fetches_per_host, 8);
    }

    #[test]
    fn bad_values_are_refused_naming_their_key() {
        let text = default_file().replace("access = \"public\"", "access = \"open\"");
        assert!(parse(&text).unwrap_err().to_string().contains("open"));
        let text = default_file().replace("tick = \"100ms\"", "tick = \"soon\"");
        let e = parse(&text).unwrap_err().to_string();
        assert!(e.contains("tick = \"soon\""), "{e}");
        assert!(!e.contains('\n'), "{e}");
    }
}
