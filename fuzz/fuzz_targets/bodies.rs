//! The fuzz targets' bodies, shared by the libFuzzer binaries (`make fuzz`)
//! and by `tests/fuzz_corpus.rs`, which runs them on seeded inputs and on
//! every input kept in `fuzz/regressions/<target>/` in `make test`.
//!
//! Each body feeds untrusted bytes to a decoder, a proto conversion or a
//! verification entry point. Errors are expected; a panic, a hang or a huge
//! allocation is a bug.

#![allow(dead_code)]

use std::collections::HashSet;

use bytes::Bytes;
use prost::Message;
use soma_types::verify::{self, NodeInfoPolicy};
use soma_types::{
    Authority, BlockRef, CommitRef, Committee, Digest, KeyPair, Limits, PeerId, SignedBlock,
    SignedNodeInfo, UnverifiedBlock, UnverifiedCommit, codec,
};
use soma_wire::convert::Availability;
use soma_wire::proto;

/// The keys of the fixed committee: validator `i`'s protocol key and
/// network key. Seeds are made with them (`tests/fuzz_corpus.rs`), so that
/// what they hold verifies against [`committee`].
pub fn keys(i: u8) -> (KeyPair, KeyPair) {
    (
        KeyPair::from_seed([i; 32]),
        KeyPair::from_seed([100 + i; 32]),
    )
}

/// A fixed committee of four, for the verification entry points.
pub fn committee() -> Committee {
    let authorities = (0..4u8)
        .map(|i| Authority {
            stake: 1,
            protocol_key: keys(i).0.public(),
            network_key: PeerId::from(keys(i).1.public()),
            address: format!("127.0.0.1:{}", 20_000 + u16::from(i)),
        })
        .collect();
    Committee::new(0, authorities).expect("a valid committee")
}

/// Splits `data` into chunks, each prefixed by its length as two
/// little-endian bytes (a chunk holds a commit or a block of up to 64 KiB).
pub fn chunks(data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut rest = data;
    while rest.len() >= 2 {
        let len = usize::from(u16::from_le_bytes([rest[0], rest[1]])).min(rest.len() - 2);
        out.push(&rest[2..2 + len]);
        rest = &rest[2 + len..];
    }
    out
}

/// The inverse of [`chunks`]: what a seed is made of.
pub fn join(parts: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for p in parts {
        let len = u16::try_from(p.len()).expect("a chunk fits in 64 KiB");
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(p);
    }
    out
}

/// A block decoded from arbitrary bytes, then verified. What decoding
/// accepts must be the canonical encoding of what it decoded, and the
/// digests it hashed from the bytes must be those of the decoded values.
pub fn decode_block(data: &[u8]) {
    let limits = Limits::default();
    let decoded = UnverifiedBlock::decode(Bytes::copy_from_slice(data), limits.max_block_bytes);
    // The block decoder walks the bytes itself: whatever the codec's own
    // decode takes and encodes back to the same bytes, it takes too, as the
    // same block.
    if let Ok(plain) = codec::decode::<SignedBlock>(data, limits.max_block_bytes)
        && codec::encode(&plain) == data
    {
        match &decoded {
            Ok(block) => assert_eq!(block.signed(), &plain, "decoded differently"),
            Err(e) => panic!("refused a canonical block: {e}"),
        }
    }
    if let Ok(block) = decoded {
        assert_eq!(
            codec::encode(block.signed()),
            data,
            "accepted a non-canonical block"
        );
        assert_eq!(block.reference().digest, Digest::of(data));
        for (i, tx) in block.block().transactions.iter().enumerate() {
            assert_eq!(block.transaction_signing_digest(i), tx.signing_digest());
        }
        let _ = verify::verify_blocks(vec![block], &committee(), &limits);
    }
}

/// A commit decoded from arbitrary bytes, then checked as a batch of one.
pub fn decode_commit(data: &[u8]) {
    let limits = Limits::default();
    if let Ok(commit) =
        UnverifiedCommit::decode(Bytes::copy_from_slice(data), limits.max_commit_bytes)
    {
        let last = CommitRef {
            index: commit.commit().index.saturating_sub(1),
            digest: commit.commit().previous_digest,
        };
        let _ = verify::verify_commit_batch(vec![commit], vec![], &committee(), last, &limits);
    }
}

/// The time the node-info bodies verify at, in milliseconds since the
/// Unix epoch.
pub const NOW_MS: u64 = 1_700_000_000_000;

/// Node infos decoded from chunks of arbitrary bytes, then verified, with
/// and without an allowlist.
pub fn node_infos(data: &[u8]) {
    node_infos_checked(data);
}

/// [`node_infos`], returning what verification said of each info without
/// an allowlist (empty if no chunk decoded).
pub fn node_infos_checked(data: &[u8]) -> Vec<Result<(), soma_types::Error>> {
    let limits = Limits::default();
    let infos: Vec<SignedNodeInfo> = chunks(data)
        .into_iter()
        .filter_map(|c| codec::decode(c, limits.max_node_info_bytes).ok())
        .collect();
    let allowlist: HashSet<PeerId> = infos.iter().map(|i| i.info.peer_id).take(1).collect();
    let mut first = Vec::new();
    for allowlist in [None, Some(&allowlist)] {
        let policy = NodeInfoPolicy {
            now_ms: NOW_MS,
            local: PeerId([0; 32]),
            allowlist,
        };
        let verdicts = verify::verify_node_infos(&infos, &policy, &limits);
        if first.is_empty() {
            first = verdicts;
        }
    }
    first
}

/// Proto messages decoded from arbitrary bytes, then converted to types.
pub fn proto_conversions(data: &[u8]) {
    if let Ok(request) = proto::FetchBlocksRequest::decode(data) {
        for r in &request.refs {
            let _ = BlockRef::try_from(r);
        }
    }
    if let Ok(response) = proto::GetCommitAvailabilityResponse::decode(data) {
        let _ = Availability::try_from(&response);
    }
    if let Ok(response) = proto::GetCommitInfoResponse::decode(data)
        && let Some(info) = &response.commit
    {
        let _ = CommitRef::try_from(info);
    }
    if let Ok(response) = proto::FetchCommitsResponse::decode(data) {
        let limits = Limits::default();
        let commits: Vec<_> = response
            .commits
            .into_iter()
            .filter_map(|b| UnverifiedCommit::decode(b, limits.max_commit_bytes).ok())
            .collect();
        let certifiers: Vec<_> = response
            .certifier_blocks
            .into_iter()
            .filter_map(|b| UnverifiedBlock::decode(b, limits.max_block_bytes).ok())
            .collect();
        let last = CommitRef {
            index: 0,
            digest: Digest::ZERO,
        };
        let _ = verify::verify_commit_batch(commits, certifiers, &committee(), last, &limits);
    }
}

/// A commit batch and certifiers from arbitrary bytes, verified: the
/// first byte is the number of commits, then chunks (see [`chunks`]), the
/// commits first and the certifier blocks after.
pub fn commit_batch(data: &[u8]) {
    commit_batch_checked(data);
}

/// [`commit_batch`], returning the verification's verdict (`None` if no
/// commit decoded: nothing was verified).
pub fn commit_batch_checked(data: &[u8]) -> Option<Result<(), soma_types::Error>> {
    let limits = Limits::default();
    let (&n, data) = data.split_first()?;
    let parts = chunks(data);
    let (commits, certifiers) = parts.split_at(usize::from(n).min(parts.len()));
    let commits: Vec<_> = commits
        .iter()
        .filter_map(|c| {
            UnverifiedCommit::decode(Bytes::copy_from_slice(c), limits.max_commit_bytes).ok()
        })
        .collect();
    let certifiers: Vec<_> = certifiers
        .iter()
        .filter_map(|c| {
            UnverifiedBlock::decode(Bytes::copy_from_slice(c), limits.max_block_bytes).ok()
        })
        .collect();
    let last = commits.first().map(|c| CommitRef {
        index: c.commit().index.saturating_sub(1),
        digest: c.commit().previous_digest,
    })?;
    let verdict = verify::verify_commit_batch(commits, certifiers, &committee(), last, &limits);
    Some(verdict.map(|_| ()))
}
