use actix::Message;
use serde::{Deserialize, Serialize};
use soma_types::verify::{CertifiedRun, RefusedRun};
use soma_types::{
    CommitIndex, CommitRef, Epoch, PeerId, SignedNodeInfo, Transaction, TrustedCommit,
    VerifiedBlock,
};

use super::job::Job;
use crate::{Blob, DecodedBlock, HashedBlob};

/// What to verify. Items arrive as their encoded bytes, exactly as received
/// from the network; decoding is part of the work done on the pool.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VerifyRequest {
    /// Signed blocks of `epoch`: every block rule, and signatures of blocks
    /// and their transactions unless `check_signatures` is false.
    Blocks {
        /// Epoch whose committee signs the blocks.
        epoch: Epoch,
        /// Encoded signed blocks, hashed where they arrived.
        blocks: Vec<HashedBlob>,
        /// Whether to check signatures (structure is always checked).
        check_signatures: bool,
    },
    /// Signed blocks of `epoch` as sync hands them: decoded on the network
    /// threads as they arrived, once their bytes matched blocks of
    /// certified commits. Every rule of `Blocks` but the decoding, which
    /// is done; the answer is exactly that of `Blocks` with their bytes.
    DecodedBlocks {
        /// Epoch whose committee signs the blocks.
        epoch: Epoch,
        /// The blocks, decoded.
        blocks: Vec<DecodedBlock>,
        /// Whether to check signatures (structure is always checked).
        check_signatures: bool,
    },
    /// A fetched commit batch and the certificate of its last commit.
    CommitBatch {
        /// Epoch of the batch.
        epoch: Epoch,
        /// Encoded commits, in index order.
        commits: Vec<Blob>,
        /// Encoded certifier blocks.
        certifiers: Vec<Blob>,
        /// Our last synced commit, which the batch must follow.
        last_synced: CommitRef,
    },
    /// A commit batch fetched ahead of its turn: every rule of
    /// `CommitBatch` but the link of its first commit to the one before,
    /// which is not known yet (see [`soma_types::verify::CertifiedRun`]).
    CommitRun {
        /// Epoch the batch is expected to be of.
        epoch: Epoch,
        /// Index its first commit must have.
        start: CommitIndex,
        /// Encoded commits, in index order.
        commits: Vec<Blob>,
        /// Encoded certifier blocks.
        certifiers: Vec<Blob>,
    },
    /// Node infos received from a peer; each is judged on its own.
    NodeInfos {
        /// Encoded signed node infos.
        infos: Vec<Blob>,
        /// Current time, in milliseconds since the Unix epoch.
        now_ms: u64,
        /// Our own peer id.
        local: PeerId,
        /// In private mode, the only acceptable peers.
        allowlist: Option<Vec<PeerId>>,
    },
    /// Standalone transactions.
    Transactions {
        /// Encoded transactions.
        transactions: Vec<Blob>,
    },
}

impl VerifyRequest {
    /// Number of items, to size the split across threads.
    pub fn items(&self) -> usize {
        match self {
            VerifyRequest::Blocks { blocks, .. } => blocks.len(),
            VerifyRequest::DecodedBlocks { blocks, .. } => blocks.len(),
            VerifyRequest::CommitBatch {
                commits,
                certifiers,
                ..
            }
            | VerifyRequest::CommitRun {
                commits,
                certifiers,
                ..
            } => commits.len() + certifiers.len(),
            VerifyRequest::NodeInfos { infos, .. } => infos.len(),
            VerifyRequest::Transactions { transactions } => transactions.len(),
        }
    }

    /// Whether its items can be split across threads (the others run on
    /// one thread).
    pub fn splits(&self) -> bool {
        matches!(
            self,
            VerifyRequest::Blocks { .. }
                | VerifyRequest::DecodedBlocks { .. }
                | VerifyRequest::Transactions { .. }
        )
    }

    /// The epoch whose committee the request needs, if any.
    pub fn epoch(&self) -> Option<Epoch> {
        match self {
            VerifyRequest::Blocks { epoch, .. }
            | VerifyRequest::DecodedBlocks { epoch, .. }
            | VerifyRequest::CommitBatch { epoch, .. }
            | VerifyRequest::CommitRun { epoch, .. } => Some(*epoch),
            VerifyRequest::NodeInfos { .. } | VerifyRequest::Transactions { .. } => None,
        }
    }
}

/// What passed verification.
#[derive(Clone, Debug)]
pub enum VerifyResponse {
    /// The blocks, verified, in request order.
    Blocks(Vec<VerifiedBlock>),
    /// The commits and certifier blocks, verified.
    CommitBatch {
        /// The commits, in order.
        commits: Vec<TrustedCommit>,
        /// The certifier blocks.
        certifiers: Vec<VerifiedBlock>,
    },
    /// The commit run, certified; its first link still to check.
    CommitRun(CertifiedRun),
    /// The commit run, refused by a rule (its bytes, the commits or the
    /// certificate): the answer to a `CommitRun` that fails, kept for the
    /// verdict at its turn.
    RefusedRun(Box<RefusedRun>),
    /// One result per node info, in request order.
    NodeInfos(Vec<Result<SignedNodeInfo, soma_types::Error>>),
    /// The transactions, verified, in request order.
    Transactions(Vec<Transaction>),
}

/// Why a verification request failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VerifyError {
    /// The data broke a rule (or did not decode).
    #[error("invalid: {0}")]
    Invalid(#[serde(with = "error_text")] soma_types::Error),
    /// No committee is installed for the epoch.
    #[error("no committee for epoch {0}")]
    UnknownEpoch(Epoch),
    /// The queue of pending requests is full; retry later.
    #[error("verifier busy: {capacity} requests pending")]
    Busy {
        /// The queue's capacity.
        capacity: usize,
    },
    /// The verifier stopped before answering.
    #[error("verifier stopped")]
    Stopped,
    /// A check panicked; this is a bug, reported rather than crashing.
    #[error("verification failed internally")]
    Internal,
}

/// The rule errors are not serialisable; traces carry their message.
mod error_text {
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(e: &soma_types::Error, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&e.to_string())
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<soma_types::Error, D::Error> {
        String::deserialize(d).map(soma_types::Error::Malformed)
    }
}

/// Asks the Verifier to check `VerifyRequest`.
#[derive(Debug, Message)]
#[rtype(result = "Result<VerifyResponse, VerifyError>")]
pub struct Verify(pub VerifyRequest);

/// Inputs of the Verifier core.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Input {
    /// Install the committee of its epoch.
    InstallCommittee(soma_types::Committee),
    /// A request, with the id its reply is correlated by.
    Verify {
        /// Correlation id.
        id: u64,
        /// The request.
        request: VerifyRequest,
    },
    /// The pool finished job `id`.
    Done {
        /// The job's id.
        id: u64,
    },
}

/// Outputs of the Verifier core.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum Output {
    /// A committee was installed.
    Installed {
        /// Its epoch.
        epoch: Epoch,
    },
    /// Run job `id` on the pool, split in `parts`: one request, or block
    /// requests merged into one batch.
    Run {
        /// The job's id: that of its first request.
        id: u64,
        /// The requests it answers, in order.
        requests: Vec<u64>,
        /// Epoch of the committee used, if any.
        epoch: Option<Epoch>,
        /// Number of parts the work is split into.
        parts: usize,
        /// The work itself (not part of traces: the input already holds it).
        #[serde(skip)]
        job: JobSlot,
    },
    /// Request `id` is refused.
    Rejected {
        /// Correlation id.
        id: u64,
        /// Why.
        error: VerifyError,
    },
}

/// Carries a [`Job`] from the core to the shell. Equal to any other slot,
/// so outputs compare on what traces record.
#[derive(Default)]
pub struct JobSlot(pub Option<Job>);

impl PartialEq for JobSlot {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl std::fmt::Debug for JobSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "JobSlot(job)"
        } else {
            "JobSlot(empty)"
        })
    }
}
