//! Catching up: fetch the commits and blocks the node lacks, verify them,
//! apply them in order.
//!
//! The core is a pipeline over batches (aligned to `commit_sync_batch_size`,
//! ending early where a server does: at an epoch's end or its highest
//! certificate):
//!
//! 1. **Commits**, one batch at a time: each must link to the one before,
//!    be of the *expected* epoch (the epoch after the applied watermark,
//!    never the one the answer names) and carry a quorum certificate of that
//!    epoch's committee; it is cheap (about 1 ms per 100 commits). Batches
//!    are checked one at a time, but fetched ahead (`commit_fetches_ahead`,
//!    an adaptive depth), so a long round trip is not paid once per batch:
//!    an answer fetched ahead is held unchecked until its turn. An answer
//!    of the next epoch, while a fetched batch that may end ours is not
//!    applied, is set aside: commit fetching pauses until every fetched
//!    batch is applied, and the peer is banned if the epoch did not change.
//! 2. **Blocks**, in chunks of `max_blocks_per_fetch`, up to
//!    `parallel_fetches` at once from the peers PeerHeights ranks best, each
//!    verified by the Verifier: this is where the time goes.
//! 3. **Apply**, strictly in index order, one atomic store write per batch.
//!
//! Work that fails is restarted by its supervision (OTP style: backoff,
//! intensity limit, then another peer); invalid data avoids and bans the
//! peer; our own failures (a busy Verifier) are never held against a peer.
//! Memory is bounded by `batches_ahead` and `max_total_fetched_bytes`, which
//! counts every fetch from the moment it is sent at the most its answer may
//! bring, and fetched batches at their size.
//!
//! The folder: `core.rs` decides all of the above; `worker.rs` is one fetch
//! (a fetch slot leased from PeerHeights, the call, the Verifier's check),
//! and `hedging.rs` when a late one also asks a second peer;
//! `apply.rs` is the one write path of synced and local commits;
//! `actor.rs` is the shell that runs them, made from `deps.rs`, holding
//! what was fetched in `fetched.rs`; `prune.rs`
//! keeps the store within its retention.

mod actor;
mod apply;
mod core;
mod deps;
mod fetched;
mod hedging;
mod messages;
pub mod prune;
mod queries;
mod worker;
mod writes;

pub use crate::peer_heights::FetchKind;
pub use actor::StateSync;
pub use apply::ApplyError;
pub use core::{Config, DEFAULT_COMMIT_SYNC_BATCH_SIZE, Init, StateSyncCore, commit_answer_bytes};
pub use deps::Deps;
pub use hedging::{
    HEAD_HEDGE_MIN, HEDGE_MIN, HEDGE_PEERS, HEDGE_PEERS_APART, HEDGE_STALE_ANSWERS, Hedging,
    PartWait,
};
pub use messages::{
    ApplyLocal, CommitBatchInfo, CommitsWanted, EpochStart, Failure, GetSyncPlan, GetSyncStatus,
    HeightPushed, Input, LocalFailure, Output, StoreCertificate, SyncStatus, TaskId,
};
pub use prune::Retention;
pub use queries::HeightQueries;
pub use worker::{MOVE_ANYWHERE_AFTER_MOVE_DELAYS, UNANSWERED_DOUBT};
