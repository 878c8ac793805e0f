//! Conversions between the generated proto messages and [`soma_types`].
//!
//! Proto messages carry fixed-size values (digests, chain ids) as `bytes`
//! and indices as integers; converting them back checks every length and
//! range, and a failure names the field. [`ConvertError`] becomes an
//! `INVALID_ARGUMENT` status on the server.

use bytes::Bytes;
use soma_types::{AuthorityIndex, BlockRef, ChainId, CommitRef, Digest};

use crate::proto;

/// A proto field that does not convert.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConvertError {
    /// A fixed-size field has the wrong length.
    #[error("{field}: expected {expected} bytes, got {got}")]
    BadLength {
        /// The field.
        field: &'static str,
        /// The length it must have.
        expected: usize,
        /// The length it has.
        got: usize,
    },
    /// A required field is absent.
    #[error("{0} is missing")]
    Missing(&'static str),
}

impl From<ConvertError> for tonic::Status {
    fn from(e: ConvertError) -> Self {
        tonic::Status::invalid_argument(e.to_string())
    }
}

/// A 32-byte digest from a `bytes` field.
pub fn digest(field: &'static str, bytes: &[u8]) -> Result<Digest, ConvertError> {
    <[u8; 32]>::try_from(bytes)
        .map(Digest)
        .map_err(|_| ConvertError::BadLength {
            field,
            expected: 32,
            got: bytes.len(),
        })
}

/// A chain id from a `bytes` field.
pub fn chain_id(bytes: &[u8]) -> Result<ChainId, ConvertError> {
    digest("chain_id", bytes).map(ChainId)
}

/// Bytes of a digest, for a `bytes` field.
pub fn digest_bytes(d: &Digest) -> Bytes {
    Bytes::copy_from_slice(d.as_bytes())
}

impl From<BlockRef> for proto::BlockRef {
    fn from(r: BlockRef) -> Self {
        proto::BlockRef {
            epoch: r.epoch,
            round: r.round,
            author: r.author.0,
            digest: digest_bytes(&r.digest),
        }
    }
}

impl TryFrom<&proto::BlockRef> for BlockRef {
    type Error = ConvertError;
    fn try_from(r: &proto::BlockRef) -> Result<Self, ConvertError> {
        Ok(BlockRef {
            epoch: r.epoch,
            round: r.round,
            author: AuthorityIndex(r.author),
            digest: digest("refs.digest", &r.digest)?,
        })
    }
}

impl From<CommitRef> for proto::CommitInfo {
    fn from(r: CommitRef) -> Self {
        proto::CommitInfo {
            index: r.index,
            digest: digest_bytes(&r.digest),
        }
    }
}

impl TryFrom<&proto::CommitInfo> for CommitRef {
    type Error = ConvertError;
    fn try_from(c: &proto::CommitInfo) -> Result<Self, ConvertError> {
        Ok(CommitRef {
            index: c.index,
            digest: digest("commit.digest", &c.digest)?,
        })
    }
}

/// The availability a server reports, in types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Availability {
    /// The chain the server is on.
    pub chain_id: ChainId,
    /// Its highest synced commit.
    pub highest: u64,
    /// Its lowest available commit.
    pub lowest: u64,
}

impl From<Availability> for proto::GetCommitAvailabilityResponse {
    fn from(a: Availability) -> Self {
        proto::GetCommitAvailabilityResponse {
            chain_id: digest_bytes(&a.chain_id.0),
            highest_synced_commit: a.highest,
            lowest_available_commit: a.lowest,
        }
    }
}

impl TryFrom<&proto::GetCommitAvailabilityResponse> for Availability {
    type Error = ConvertError;
    fn try_from(r: &proto::GetCommitAvailabilityResponse) -> Result<Self, ConvertError> {
        Ok(Availability {
            chain_id: chain_id(&r.chain_id)?,
            highest: r.highest_synced_commit,
            lowest: r.lowest_available_commit,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_ref_round_trips_and_checks_digest_length() {
        let r = BlockRef {
            epoch: 3,
            round: 9,
            author: AuthorityIndex(2),
            digest: Digest([7; 32]),
        };
        let p = proto::BlockRef::from(r);
        assert_eq!(BlockRef::try_from(&p), Ok(r));
        let short = proto::BlockRef {
            digest: Bytes::from_static(&[1, 2, 3]),
            ..p
        };
        assert_eq!(
            BlockRef::try_from(&short),
            Err(ConvertError::BadLength {
                field: "refs.digest",
                expected: 32,
                got: 3
            })
        );
        let status = tonic::Status::from(BlockRef::try_from(&short).unwrap_err());
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
    }

    #[test]
    fn availability_and_commit_info_round_trip() {
        let a = Availability {
            chain_id: ChainId(Digest([1; 32])),
            highest: 10,
            lowest: 1,
        };
        let p = proto::GetCommitAvailabilityResponse::from(a);
        assert_eq!(Availability::try_from(&p), Ok(a));
        let c = CommitRef {
            index: 5,
            digest: Digest([9; 32]),
        };
        assert_eq!(CommitRef::try_from(&proto::CommitInfo::from(c)), Ok(c));
        assert!(chain_id(&[0; 31]).is_err());
    }
}
