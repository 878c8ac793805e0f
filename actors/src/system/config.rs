use std::net::SocketAddr;
use std::time::Duration;

use soma_types::{Access, PeerId};

use crate::discovery::{self, SeedPeer};
use crate::{connections, grpc, state_sync, supervisor, verifier};

/// Settings of a P2P node. Every queue, buffer and response is bounded by one
/// of these; the defaults are those of the design.
#[derive(Clone, Debug)]
pub struct P2pConfig {
    /// Where the gRPC server listens; port 0 picks a free one.
    pub listen_address: SocketAddr,
    /// Addresses advertised to peers; empty means the bound listen address.
    pub external_addresses: Vec<String>,
    /// Who may connect.
    pub access: Access,
    /// Peers always allowed (and, in private mode, the only ones).
    pub allowlist: Vec<PeerId>,
    /// Peers dialled when none is connected, and while known peers leave
    /// room under the connection target.
    pub seed_peers: Vec<SeedPeer>,
    /// Time allowed for one request to a peer, and for the adapter to answer.
    pub timeout: Duration,
    /// Capacity of each actor's mailbox.
    pub mailbox_capacity: usize,
    /// How long a peer that sent invalid data stays banned.
    pub ban_duration: Duration,
    /// Fetches sent to one peer at once at most: a node serves each peer
    /// only so many (its `max-concurrent-fetches-per-peer`) and refuses the
    /// rest. PeerHeights leases the slots.
    pub max_fetches_per_peer: usize,
    /// Fetches that may wait for a free slot at once; more are refused as
    /// busy and retried by state sync.
    pub max_waiting_fetches: usize,
    /// Local commits ([`super::P2pHandle::send_commit`]) and certificates
    /// ([`super::P2pHandle::send_certificate`]) whose writes may be in
    /// flight at once; one more is refused with [`super::P2pError::Busy`].
    /// Bounds what callers that retry after timeouts queue behind a slow
    /// store. Local commits sent without awaiting each other are written
    /// one at a time, in the order sent; a certificate is written at once,
    /// not after the commits sent before it: await the commit before
    /// sending its certificate.
    pub max_local_writes: usize,
    /// The supervisor's intensity limit: restarts of one actor within a
    /// window before the node stops.
    pub supervision: supervisor::Config,
    /// Capacity of the synced-commit broadcast; a subscriber further behind
    /// misses commits and is told how many. Streams from an index
    /// ([`super::CommitStream`]) read the store instead and miss nothing.
    pub synced_commit_broadcast_capacity: usize,
    /// Bytes of commits a [`super::CommitStream`] reads from the store at
    /// once while it is behind (their blocks come on top).
    pub synced_commit_read_bytes: usize,
    /// What the store keeps (`retention`), and how often and in what steps
    /// it is pruned.
    pub prune: state_sync::prune::Config,
    /// An archive of certified batches to write, and to read what no
    /// connected peer holds; `None`: no archive.
    pub archive: Option<crate::archive::Config>,
    /// What the server accepts.
    pub grpc: grpc::Limits,
    /// The verification pool.
    pub verifier: verifier::Config,
    /// Outbound connections.
    pub connections: connections::Config,
    /// Peer discovery.
    pub discovery: discovery::Config,
    /// State sync.
    pub state_sync: state_sync::Config,
    /// How often state sync looks for work.
    pub tick: Duration,
    /// How often every connected peer's availability is asked.
    pub height_query_interval: Duration,
    /// Whether synced block signatures are checked; the digest match against
    /// certified commits is checked either way.
    pub verify_synced_block_signatures: bool,
    /// Faults to inject (the `testing` feature only).
    #[cfg(feature = "testing")]
    pub faults: Option<std::sync::Arc<crate::faults::FaultPlan>>,
    /// Capacity of the peer-event broadcast of the handle.
    pub peer_event_broadcast_capacity: usize,
    /// Seed of the actors' randomness; `None` draws one.
    pub seed: Option<u64>,
}

impl P2pConfig {
    /// The same config with `commits` per sync batch, for syncing
    /// (`state_sync`) and as the most one FetchCommits answer holds
    /// (`grpc`): the two settings a batch size is made of.
    pub fn with_commit_sync_batch_size(mut self, commits: u64) -> Self {
        self.state_sync.commit_sync_batch_size = commits;
        self.grpc.commit_sync_batch_size = commits;
        self
    }
}

impl Default for P2pConfig {
    fn default() -> Self {
        P2pConfig {
            listen_address: SocketAddr::from(([127, 0, 0, 1], 0)),
            external_addresses: Vec::new(),
            access: Access::Public,
            allowlist: Vec::new(),
            seed_peers: Vec::new(),
            timeout: Duration::from_secs(10),
            mailbox_capacity: 1024,
            ban_duration: Duration::from_secs(60),
            max_fetches_per_peer: 4,
            max_waiting_fetches: 64,
            max_local_writes: 64,
            supervision: supervisor::Config::default(),
            synced_commit_broadcast_capacity: 1024,
            synced_commit_read_bytes: 1 << 20,
            prune: state_sync::prune::Config::default(),
            archive: None,
            grpc: grpc::Limits::default(),
            verifier: verifier::Config::default(),
            connections: connections::Config::default(),
            discovery: discovery::Config::default(),
            state_sync: state_sync::Config::default(),
            tick: Duration::from_millis(100),
            height_query_interval: Duration::from_secs(1),
            verify_synced_block_signatures: true,
            #[cfg(feature = "testing")]
            faults: None,
            peer_event_broadcast_capacity: 256,
            seed: None,
        }
    }
}
