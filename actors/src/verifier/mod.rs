//! Signature and rule checks, off the actor threads.
//!
//! The Verifier holds the committee of each epoch and checks what peers send:
//! blocks, commit batches with their certificates, node infos and
//! transactions. The checks themselves are the pure functions of
//! [`soma_types::verify`]; they run on a rayon thread pool sized to the
//! machine, and large requests are split across its threads, each part
//! batch-verified. The core decides what runs: it picks the committee, sizes
//! the split, and refuses work beyond a bounded queue with
//! [`VerifyError::Busy`] instead of letting memory grow.

mod actor;
mod core;
mod job;
mod messages;

pub(crate) use actor::stored_committees;
pub use actor::{Deps, InstallCommittee, Verifier};
pub use core::{Config, Init, VerifierCore};
pub use job::{Job, run_job};
pub use messages::{Input, Output, Verify, VerifyError, VerifyRequest, VerifyResponse};
