use actix::Message;
use serde::{Deserialize, Serialize};
use soma_types::{CommitIndex, PeerId};

use super::actor::Permit;

/// One RPC, as the adapter sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Call {
    /// GetCommitInfo, for `index` or the latest.
    CommitInfo {
        /// The commit, `None` for the highest synced.
        index: Option<CommitIndex>,
    },
    /// PushCommit.
    PushCommit {
        /// The caller's new height.
        index: CommitIndex,
    },
    /// FetchCommits.
    FetchCommits {
        /// First commit wanted.
        start: CommitIndex,
        /// Last commit wanted.
        end: CommitIndex,
    },
    /// FetchBlocks, with the number of references asked for.
    FetchBlocks {
        /// Number of references.
        refs: usize,
    },
    /// GetKnownPeers.
    KnownPeers,
}

/// A status code the adapter answers with (the gRPC codes it uses).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Code {
    /// The request is malformed or asks for something no server serves.
    InvalidArgument,
    /// A limit on concurrent work is reached; retry later.
    ResourceExhausted,
    /// The caller may not make this call.
    PermissionDenied,
    /// The data asked for is not held.
    NotFound,
    /// The node is shutting down or an actor is gone.
    Unavailable,
}

impl From<Code> for tonic::Code {
    fn from(c: Code) -> Self {
        match c {
            Code::InvalidArgument => tonic::Code::InvalidArgument,
            Code::ResourceExhausted => tonic::Code::ResourceExhausted,
            Code::PermissionDenied => tonic::Code::PermissionDenied,
            Code::NotFound => tonic::Code::NotFound,
            Code::Unavailable => tonic::Code::Unavailable,
        }
    }
}

/// Why a call was refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    /// The status code.
    pub code: Code,
    /// A short lowercase explanation.
    pub message: String,
}

impl From<Refusal> for tonic::Status {
    fn from(r: Refusal) -> Self {
        tonic::Status::new(r.code.into(), r.message)
    }
}

/// What an admitted call does.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Work {
    /// Look up one commit.
    CommitInfo {
        /// The commit, `None` for the highest synced.
        index: Option<CommitIndex>,
    },
    /// Record the caller's height.
    PushCommit {
        /// The authenticated caller.
        peer: PeerId,
        /// Its height.
        index: CommitIndex,
    },
    /// Read commits `start..=end` (already capped at the batch size).
    FetchCommits {
        /// First commit.
        start: CommitIndex,
        /// Last commit.
        end: CommitIndex,
    },
    /// Read and stream blocks.
    FetchBlocks,
    /// Answer with our node info and known peers.
    KnownPeers,
}

/// Inputs of the adapter core.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Input {
    /// A call arrived.
    Call {
        /// Correlation id.
        id: u64,
        /// The authenticated caller, `None` if anonymous.
        caller: Option<PeerId>,
        /// The connection it came on (the caller's socket address), if
        /// known.
        #[serde(default)]
        connection: Option<std::net::SocketAddr>,
        /// The caller's address, counted by its host (the IPv4 address,
        /// or the IPv6 /48: see `inbound::host`), whose
        /// fetches `max_concurrent_fetches_per_host` caps, and those of its
        /// network (the host's /24, or IPv6 /32)
        /// `max_concurrent_fetches_per_network`; `None` for a caller with
        /// reserved slots (a committee member, an allowlisted peer, an
        /// exempt loopback caller) or of unknown address.
        #[serde(default)]
        origin: Option<std::net::IpAddr>,
        /// The call.
        call: Call,
        /// Admitted fetches whose answers are stalled (nothing handed to
        /// the transport for `fetch_stall_timeout`, or read too slowly),
        /// worst first:
        /// the slots a fetch may take when none is free.
        #[serde(default)]
        stalled: Vec<u64>,
    },
    /// A call admitted earlier ended (its permit was dropped).
    Done {
        /// Correlation id.
        id: u64,
    },
    /// A fetch admitted earlier was dropped before its answer was read
    /// (its caller reset the call or closed the connection, or its stalled
    /// answer was cut for a newer fetch of its own caller, host or
    /// network); reported as its slot is given back, most often before
    /// its `Done` (a charge touches no slot, so the order does not
    /// matter).
    Abandoned {
        /// Its authenticated caller, `None` if anonymous.
        caller: Option<PeerId>,
        /// The host it counted in, as `Call`'s `origin`.
        origin: Option<std::net::IpAddr>,
    },
}

/// Outputs of the adapter core.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Output {
    /// Call `id` may proceed with `work`.
    Admit {
        /// Correlation id.
        id: u64,
        /// What to do.
        work: Work,
    },
    /// Fetch `id` lost its slot to a newer one: cut its answer.
    Cut {
        /// Correlation id of the fetch to cut.
        id: u64,
        /// Whether its answer counts as dropped unread: the newer fetch
        /// is of its caller, its host or its network, which may take the
        /// slot of its own stalled answer, and must not so get reads for
        /// free by letting answers be cut rather than resetting them.
        #[serde(default)]
        charged: bool,
    },
    /// Call `id` is refused.
    Refuse {
        /// Correlation id.
        id: u64,
        /// Why.
        refusal: Refusal,
    },
}

/// A call sent by the tonic service to the adapter.
#[derive(Debug, Message)]
#[rtype(result = "Result<Admission, Refusal>")]
pub struct CallMsg {
    /// The authenticated caller, `None` if anonymous.
    pub caller: Option<PeerId>,
    /// The connection it came on, if known.
    pub connection: Option<std::net::SocketAddr>,
    /// The caller's host, `None` if it holds reserved slots (see
    /// `Input::Call`).
    pub origin: Option<std::net::IpAddr>,
    /// The call.
    pub call: Call,
}

/// An admitted call: what to do, and the permit that holds its slot.
#[derive(Debug)]
pub struct Admission {
    /// What to do.
    pub work: Work,
    /// Returns the call's slot to the adapter when dropped.
    pub permit: Permit,
}
