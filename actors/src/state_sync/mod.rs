//! Catching up: fetch the commits and blocks the node lacks, verify them,
//! apply them in order.
//!
//! The core is a pipeline over batches (aligned to `commit_sync_batch_size`,
//! ending early where a server does: at an epoch's end or its highest
//! certificate):
//!
//! 1. **Commits**, one batch at a time: each must link to the one before and
//!    carry a quorum certificate; it is cheap (about 1 ms per 100 commits).
//!    A batch of an epoch whose committee is not installed waits until the
//!    batch that ends the previous epoch is applied.
//! 2. **Blocks**, in chunks of `max_blocks_per_fetch`, up to
//!    `parallel_fetches` at once from the peers PeerHeights ranks best, each
//!    verified by the Verifier: this is where the time goes.
//! 3. **Apply**, strictly in index order, one atomic store write per batch.
//!
//! Work that fails is restarted by its supervision (OTP style: backoff,
//! intensity limit, then another peer); invalid data avoids and bans the
//! peer. Memory is bounded by `batches_ahead` and `max_total_fetched_bytes`.

mod actor;
mod core;
mod messages;

pub use actor::{ApplyLocal, FaultPlan, GetSyncStatus, Settings, StateSync, SyncStatus};
pub use core::{Config, Init, StateSyncCore};
pub use messages::{CommitBatchInfo, Failure, Input, Output, TaskId};
