//! The data model of soma-p2p and the rules that make it trustworthy.
//!
//! Everything a node exchanges with its peers is defined here: identities and
//! keys ([`PeerId`], [`PublicKey`], [`KeyPair`]), the committee that signs the
//! chain ([`Committee`]), the chain itself ([`SignedBlock`], [`Commit`]) and
//! what a node advertises about itself ([`SignedNodeInfo`]).
//!
//! Three ideas run through the crate:
//!
//! - **One codec.** Every signed or digested structure is encoded by
//!   [`codec`], which wraps bincode. Decoding network input always takes a
//!   byte limit and rejects trailing bytes.
//! - **Domain-separated signatures.** A signature covers
//!   `DOMAIN_TAG || blake3(encoding)`, with one tag per kind of object
//!   ([`Domain`]), so a block signature can never pass as a transaction's.
//!   The TLS binding hashes the certificate's SubjectPublicKeyInfo DER
//!   instead of an encoding. docs/protocol.md specifies the bytes of each.
//! - **Pure verification.** The rules in [`verify`] are plain functions with
//!   no I/O, returning an [`Error`] variant per rule broken. Objects that
//!   passed them are wrapped in [`VerifiedBlock`] and [`TrustedCommit`], which
//!   also keep their encoded bytes and digest so nothing is encoded twice.
#![warn(missing_docs, unreachable_pub)]

mod block;
pub mod codec;
mod commit;
mod committee;
mod crypto;
mod digest;
mod error;
mod fast_hash;
mod fixed_bytes;
mod limits;
mod node_info;
mod signature_rule;
mod transaction;
pub mod verify;

pub use block::{
    Block, BlockRef, EndOfEpoch, HashedBytes, Round, SignedBlock, UnverifiedBlock, VerifiedBlock,
    genesis_block_refs,
};
pub use commit::{
    Commit, CommitIndex, CommitRef, CommittedSubDag, TrustedCommit, UnverifiedCommit, batch_end,
    genesis_commit,
};
pub use committee::{
    Authority, AuthorityIndex, ChainId, Committee, Epoch, MAX_COMMITTEE_SIZE, Stake,
};
pub use crypto::{Domain, KeyCache, KeyPair, PublicKey, Signature};
pub use digest::Digest;
pub use error::{Error, SignedItem};
pub use fast_hash::{FastHasher, FastMap, FastSet};
pub use limits::Limits;
pub use node_info::{Access, NodeInfo, PeerId, SignedNodeInfo};
pub use signature_rule::PreparedKey;
pub use transaction::Transaction;

/// Result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
