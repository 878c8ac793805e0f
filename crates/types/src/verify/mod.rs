//! The verification rules, as pure functions.
//!
//! Each function checks one kind of input against the rules of the design and
//! returns the [`Error`](crate::Error) variant of the first rule broken. None
//! does I/O or reads a clock: callers pass the time where a rule needs it.
//!
//! Signatures are collected into a [`SignatureBatch`] and checked together
//! with ed25519 batch verification; when a batch fails, each signature is
//! checked alone to name the bad one. Both checks apply one acceptance rule
//! (ZIP-215, weak keys refused; docs/protocol.md), so they agree on every
//! signature.
//!
//! The flow for a synced batch:
//! 1. [`verify_commit_batch`]: the commits link to our last synced commit and
//!    to each other, and the last one carries a quorum certificate.
//! 2. [`ExpectedBlocks`]: every fetched block is one the verified commits
//!    name, none twice, none missing; [`verify_fetched_blocks`] checks their
//!    structure and (optionally) their signatures.
//! 3. [`epoch_change`]: whether the batch ends the epoch, and the next
//!    committee if it does.

mod block;
mod commit;
mod fetched;
mod node_info;
mod signatures;

pub use block::{check_block, check_transaction, verify_blocks, verify_transactions};
pub use commit::{CertifiedRun, RefusedRun, certify_commit_run, verify_commit_batch};
pub use fetched::{ExpectedBlocks, epoch_change, verify_fetched_blocks};
pub use node_info::{NodeInfoPolicy, check_node_info, verify_node_infos};
pub use signatures::{Fill, SignatureBatch};
