//! Deterministic, fully signed chains.
//!
//! [`ChainBuilder`] plays a committee of validators: every round each
//! authority signs a block with signed transactions that builds on all
//! blocks of the previous round; each round after the second commits the
//! leader of two rounds earlier with its uncommitted history; the next
//! round's blocks carry votes for that commit, which certify it. Epochs end
//! with a leader block that announces the next committee (with fresh
//! protocol keys). The same [`ChainConfig`] always gives the same chain,
//! byte for byte.
//!
//! Tests use the finished [`Chain`]: its pieces as a server would send them,
//! a validator's store written in aligned batches, and the [`corrupt`]
//! helpers that break exactly one rule. A node can also run the builder
//! round by round ([`ChainBuilder::produce_round`]) as a block producer.
#![warn(missing_docs, unreachable_pub)]

mod builder;
mod chain;
pub mod corrupt;

pub use builder::{ChainBuilder, ChainConfig, RoundOutput};
pub use chain::Chain;
