//! The codec's promises, checked on every public data type: values survive a
//! round trip byte for byte, hostile input fails cleanly and cheaply, and the
//! decoders that fix a digest accept only canonical encodings.

use std::fmt::Debug;

use bytes::Bytes;
use proptest::collection::vec;
use proptest::prelude::*;
use serde::Serialize;
use serde::de::DeserializeOwned;
use soma_types::{
    Access, Authority, AuthorityIndex, Block, BlockRef, ChainId, Commit, CommitRef, Committee,
    Digest, Domain, EndOfEpoch, Error, HashedBytes, KeyPair, Limits, NodeInfo, PeerId, PublicKey,
    Signature, SignedBlock, SignedNodeInfo, Transaction, UnverifiedBlock, UnverifiedCommit,
    VerifiedBlock, codec,
};

#[path = "support/allocations.rs"]
mod allocations;
use allocations::{largest_allocation, retained_allocation};

// ---- strategies ----

fn arb_keypair() -> impl Strategy<Value = KeyPair> {
    any::<[u8; 32]>().prop_map(KeyPair::from_seed)
}

fn arb_digest() -> impl Strategy<Value = Digest> {
    any::<[u8; 32]>().prop_map(Digest)
}

/// Keys of real key pairs, and any 32 bytes that decompress to a point:
/// the latter include weak and non-canonically encoded keys, which must
/// round trip byte for byte too.
fn arb_public_key() -> impl Strategy<Value = PublicKey> {
    prop_oneof![
        arb_keypair().prop_map(|k| k.public()),
        any::<[u8; 32]>().prop_filter_map("not a curve point", |b| PublicKey::from_bytes(&b).ok()),
    ]
}

fn arb_signature() -> impl Strategy<Value = Signature> {
    prop::array::uniform::<_, 64>(any::<u8>()).prop_map(Signature)
}

fn arb_peer_id() -> impl Strategy<Value = PeerId> {
    any::<[u8; 32]>().prop_map(PeerId)
}

fn arb_authority_index() -> impl Strategy<Value = AuthorityIndex> {
    any::<u32>().prop_map(AuthorityIndex)
}

fn arb_address() -> impl Strategy<Value = String> {
    prop_oneof!["[a-z0-9.-]{1,16}:[0-9]{1,5}", "\\PC{0,24}"]
}

prop_compose! {
    fn arb_authority()(
        // At most 4 authorities of at most u64::MAX / 8 each: no overflow.
        stake in 1..=u64::MAX / 8,
        protocol_key in arb_public_key(),
        network_key in arb_peer_id(),
        address in arb_address(),
    ) -> Authority {
        Authority { stake, protocol_key, network_key, address }
    }
}

prop_compose! {
    fn arb_committee()(epoch in any::<u64>(), authorities in vec(arb_authority(), 1..=4)) -> Committee {
        Committee::new(epoch, authorities).expect("positive stakes that cannot overflow")
    }
}

fn arb_chain_id() -> impl Strategy<Value = ChainId> {
    prop_oneof![
        arb_digest().prop_map(ChainId),
        arb_committee().prop_map(|c| ChainId::from_genesis(&c)),
    ]
}

prop_compose! {
    fn arb_transaction()(
        sender in arb_keypair(),
        nonce in any::<u64>(),
        payload in vec(any::<u8>(), 0..64),
    ) -> Transaction {
        Transaction::new(&sender, nonce, Bytes::from(payload))
    }
}

prop_compose! {
    fn arb_block_ref()(
        epoch in any::<u64>(),
        round in any::<u32>(),
        author in arb_authority_index(),
        digest in arb_digest(),
    ) -> BlockRef {
        BlockRef { epoch, round, author, digest }
    }
}

prop_compose! {
    fn arb_commit_ref()(index in any::<u64>(), digest in arb_digest()) -> CommitRef {
        CommitRef { index, digest }
    }
}

fn arb_end_of_epoch() -> impl Strategy<Value = EndOfEpoch> {
    arb_committee().prop_map(|next_committee| EndOfEpoch { next_committee })
}

prop_compose! {
    fn arb_block_with(tx_count: std::ops::Range<usize>)(
        epoch in any::<u64>(),
        round in any::<u32>(),
        author in arb_authority_index(),
        timestamp_ms in any::<u64>(),
        ancestors in vec(arb_block_ref(), 0..4),
        transactions in vec(arb_transaction(), tx_count),
        commit_votes in vec(arb_commit_ref(), 0..3),
        end_of_epoch in prop::option::of(arb_end_of_epoch()),
    ) -> Block {
        Block {
            epoch,
            round,
            author,
            timestamp_ms,
            ancestors,
            transactions,
            commit_votes,
            end_of_epoch,
        }
    }
}

fn arb_block() -> impl Strategy<Value = Block> {
    arb_block_with(0..3)
}

prop_compose! {
    fn arb_signed_block_with(tx_count: std::ops::Range<usize>)(
        block in arb_block_with(tx_count),
        key in arb_keypair(),
    ) -> SignedBlock {
        SignedBlock::new(block, &key)
    }
}

fn arb_signed_block() -> impl Strategy<Value = SignedBlock> {
    arb_signed_block_with(0..3)
}

prop_compose! {
    fn arb_commit()(
        index in any::<u64>(),
        previous_digest in arb_digest(),
        timestamp_ms in any::<u64>(),
        leader in arb_block_ref(),
        blocks in vec(arb_block_ref(), 0..6),
        epoch in any::<u64>(),
    ) -> Commit {
        Commit { index, previous_digest, timestamp_ms, leader, blocks, epoch }
    }
}

fn arb_access() -> impl Strategy<Value = Access> {
    prop_oneof![Just(Access::Public), Just(Access::Private)]
}

prop_compose! {
    fn arb_node_info()(
        peer_id in arb_peer_id(),
        addresses in vec(arb_address(), 0..4),
        timestamp_ms in any::<u64>(),
        access in arb_access(),
    ) -> NodeInfo {
        NodeInfo { peer_id, addresses, timestamp_ms, access }
    }
}

prop_compose! {
    fn arb_signed_node_info()(key in arb_keypair(), info in arb_node_info()) -> SignedNodeInfo {
        let info = NodeInfo { peer_id: key.public().into(), ..info };
        SignedNodeInfo::sign(info, &key)
    }
}

prop_compose! {
    fn arb_limits()(
        max_transaction_payload_bytes in any::<usize>(),
        max_transactions_per_block in any::<usize>(),
        max_block_bytes in any::<usize>(),
        max_votes_per_block in any::<usize>(),
        max_blocks_per_commit in any::<usize>(),
        max_commit_bytes in any::<usize>(),
        max_commits_per_batch in any::<usize>(),
        max_node_addresses in any::<usize>(),
        max_address_bytes in any::<usize>(),
        max_node_info_bytes in any::<usize>(),
        node_info_max_age_ms in any::<u64>(),
        node_info_max_skew_ms in any::<u64>(),
    ) -> Limits {
        Limits {
            max_transaction_payload_bytes,
            max_transactions_per_block,
            max_block_bytes,
            max_votes_per_block,
            max_blocks_per_commit,
            max_commit_bytes,
            max_commits_per_batch,
            max_node_addresses,
            max_address_bytes,
            max_node_info_bytes,
            node_info_max_age_ms,
            node_info_max_skew_ms,
        }
    }
}

// ---- helpers ----

/// Decoding the encoding of `value`, with a limit of exactly its length,
/// gives `value` back, and encoding that gives the same bytes.
fn check_round_trip<T>(value: &T) -> Result<(), TestCaseError>
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let bytes = codec::encode(value);
    let decoded: T = codec::decode(&bytes, bytes.len())
        .map_err(|e| TestCaseError::fail(format!("decoding failed: {e}")))?;
    prop_assert_eq!(&decoded, value);
    prop_assert_eq!(codec::encode(&decoded), bytes);
    Ok(())
}

/// The JSON of `value` decodes to `value` and encodes to the same JSON.
fn check_json_round_trip<T>(value: &T) -> Result<(), TestCaseError>
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let json = serde_json::to_string(value).expect("workspace types encode as JSON");
    let decoded: T = serde_json::from_str(&json)
        .map_err(|e| TestCaseError::fail(format!("JSON decoding failed: {e}: {json}")))?;
    prop_assert_eq!(&decoded, value);
    prop_assert_eq!(serde_json::to_string(&decoded).unwrap(), json);
    Ok(())
}

/// bincode varints in their long forms: marker byte, then little endian.
fn varint_u16(v: u16) -> Vec<u8> {
    let mut out = vec![251];
    out.extend_from_slice(&v.to_le_bytes());
    out
}

fn varint_u32(v: u32) -> Vec<u8> {
    let mut out = vec![252];
    out.extend_from_slice(&v.to_le_bytes());
    out
}

fn varint_u64(v: u64) -> Vec<u8> {
    let mut out = vec![253];
    out.extend_from_slice(&v.to_le_bytes());
    out
}

/// The longer encodings of the one-byte varint at `at` in `bytes`.
fn widened_varints(bytes: &[u8], at: usize) -> Vec<Vec<u8>> {
    let v = bytes[at];
    assert!(v < 251, "byte {at} is not a one-byte varint");
    [
        varint_u16(v.into()),
        varint_u32(v.into()),
        varint_u64(v.into()),
    ]
    .into_iter()
    .map(|long| [&bytes[..at], &long[..], &bytes[at + 1..]].concat())
    .collect()
}

fn key(seed: u8) -> KeyPair {
    KeyPair::from_seed([seed; 32])
}

/// A signed block with two transactions, a vote and an epoch end, for tests
/// that need one fixed valid encoding.
fn sample_signed_block() -> SignedBlock {
    let committee = Committee::new(
        3,
        (0..4u8)
            .map(|i| Authority {
                stake: u64::from(i) + 1,
                protocol_key: key(i).public(),
                network_key: key(100 + i).public().into(),
                address: format!("10.0.0.{i}:7000"),
            })
            .collect(),
    )
    .unwrap();
    let block = Block {
        epoch: 2,
        round: 300,
        author: AuthorityIndex(1),
        timestamp_ms: 1_700_000_000_000,
        ancestors: vec![BlockRef {
            epoch: 2,
            round: 299,
            author: AuthorityIndex(1),
            digest: Digest::of(b"parent"),
        }],
        transactions: vec![
            Transaction::new(&key(7), 1, Bytes::from_static(b"hello")),
            Transaction::new(&key(8), 70_000, Bytes::from(vec![0xAB; 300])),
        ],
        commit_votes: vec![CommitRef {
            index: 12,
            digest: Digest::of(b"commit"),
        }],
        end_of_epoch: Some(EndOfEpoch {
            next_committee: committee,
        }),
    };
    SignedBlock::new(block, &key(1))
}

fn sample_commit() -> Commit {
    Commit {
        index: 42,
        previous_digest: Digest::of(b"previous"),
        timestamp_ms: 1_700_000_000_000,
        leader: BlockRef {
            epoch: 5,
            round: 10,
            author: AuthorityIndex(2),
            digest: Digest::of(b"leader"),
        },
        blocks: vec![BlockRef::default(); 3],
        epoch: 5,
    }
}

// ---- 1. every type round trips through the codec ----

mod round_trip {
    use super::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn digest_round_trips(v in arb_digest()) { check_round_trip(&v)?; }

        #[test]
        fn public_key_round_trips(v in arb_public_key()) { check_round_trip(&v)?; }

        #[test]
        fn signature_round_trips(v in arb_signature()) { check_round_trip(&v)?; }

        #[test]
        fn peer_id_round_trips(v in arb_peer_id()) { check_round_trip(&v)?; }

        #[test]
        fn authority_index_round_trips(v in arb_authority_index()) { check_round_trip(&v)?; }

        #[test]
        fn authority_round_trips(v in arb_authority()) { check_round_trip(&v)?; }

        #[test]
        fn block_ref_round_trips(v in arb_block_ref()) { check_round_trip(&v)?; }

        #[test]
        fn commit_ref_round_trips(v in arb_commit_ref()) { check_round_trip(&v)?; }

        #[test]
        fn commit_round_trips(v in arb_commit()) { check_round_trip(&v)?; }

        #[test]
        fn node_info_round_trips(v in arb_node_info()) { check_round_trip(&v)?; }

        #[test]
        fn access_round_trips(v in arb_access()) { check_round_trip(&v)?; }

        #[test]
        fn limits_round_trip(v in arb_limits()) { check_round_trip(&v)?; }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn committee_round_trips(v in arb_committee()) {
            check_round_trip(&v)?;
            let decoded: Committee = codec::decode(&codec::encode(&v), usize::MAX).unwrap();
            prop_assert_eq!(decoded.total_stake(), v.total_stake());
        }

        #[test]
        fn chain_id_round_trips(v in arb_chain_id()) { check_round_trip(&v)?; }

        #[test]
        fn transaction_round_trips(v in arb_transaction()) { check_round_trip(&v)?; }

        #[test]
        fn block_round_trips(v in arb_block()) { check_round_trip(&v)?; }

        #[test]
        fn signed_block_round_trips(v in arb_signed_block()) { check_round_trip(&v)?; }

        #[test]
        fn signed_node_info_round_trips(v in arb_signed_node_info()) { check_round_trip(&v)?; }
    }

    #[test]
    fn block_with_epoch_end_transactions_and_votes_round_trips() {
        let signed = sample_signed_block();
        check_round_trip(&signed).unwrap();
        check_round_trip(&signed.block).unwrap();
    }

    #[test]
    fn default_limits_round_trip() {
        check_round_trip(&Limits::default()).unwrap();
    }
}

// ---- 2. decoding wrapped blocks and commits gives the same reference ----

mod unverified {
    use super::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn decoded_block_has_the_reference_of_the_signed_block(signed in arb_signed_block()) {
            let wrapped = UnverifiedBlock::from_signed(signed.clone());
            let decoded = UnverifiedBlock::decode(wrapped.serialized().clone(), usize::MAX).unwrap();
            prop_assert_eq!(decoded.reference(), wrapped.reference());
            prop_assert_eq!(decoded.signed(), &signed);
            prop_assert_eq!(decoded.serialized(), wrapped.serialized());
            prop_assert_eq!(wrapped.serialized().as_ref(), &codec::encode(&signed)[..]);
            prop_assert_eq!(wrapped.reference().digest, Digest::of(&codec::encode(&signed)));
            prop_assert_eq!(
                (decoded.reference().epoch, decoded.reference().round, decoded.reference().author),
                (signed.block.epoch, signed.block.round, signed.block.author)
            );
        }

        /// A decoded block's payloads are slices of its bytes, not copies,
        /// and the block is exactly what the plain decode of the same bytes
        /// gives, from the network (`decode`) or from a store
        /// (`from_trusted_bytes`).
        #[test]
        fn decoded_payloads_are_slices_of_the_blocks_bytes(
            signed in arb_signed_block_with(0..12)
        ) {
            let bytes = UnverifiedBlock::from_signed(signed.clone()).serialized().clone();
            let plain: SignedBlock = codec::decode(&bytes, usize::MAX).unwrap();
            let received = UnverifiedBlock::decode(bytes.clone(), usize::MAX).unwrap();
            let stored = VerifiedBlock::from_trusted_bytes(bytes.clone()).unwrap();
            prop_assert_eq!(received.signed(), &plain);
            prop_assert_eq!(stored.signed(), &plain);
            prop_assert_eq!(&plain, &signed);
            let within = |p: &Bytes| {
                let (start, end) = (bytes.as_ptr() as usize, bytes.as_ptr() as usize + bytes.len());
                let at = p.as_ptr() as usize;
                start <= at && at + p.len() <= end
            };
            for t in received.block().transactions.iter().chain(&stored.block().transactions) {
                prop_assert!(t.payload.is_empty() || within(&t.payload), "payload copied");
            }
        }

        /// Decoding without hashing the transactions now (signatures off)
        /// gives the same block, digests included, as the full decode.
        #[test]
        fn decoding_for_unchecked_signatures_gives_the_same_block(signed in arb_signed_block()) {
            let bytes = UnverifiedBlock::from_signed(signed.clone()).serialized().clone();
            let full = UnverifiedBlock::decode(bytes.clone(), usize::MAX).unwrap();
            let lazy = UnverifiedBlock::decode_for(bytes, usize::MAX, false).unwrap();
            prop_assert_eq!(lazy.reference(), full.reference());
            prop_assert_eq!(lazy.signed(), full.signed());
            prop_assert_eq!(lazy.serialized(), full.serialized());
            for i in 0..signed.block.transactions.len() {
                prop_assert_eq!(
                    lazy.transaction_signing_digest(i),
                    full.transaction_signing_digest(i)
                );
                prop_assert_eq!(
                    full.transaction_signing_digest(i),
                    signed.block.transactions[i].signing_digest()
                );
            }
        }

        /// A block decoded with the digest its receiver computed, signatures
        /// checked or not, is the block the plain decode gives: the same
        /// reference, bytes and signed value, and the same digest signed by
        /// its author (hashed at decoding, or when asked for).
        #[test]
        fn decoding_with_the_digest_handed_over_gives_the_same_block(signed in arb_signed_block()) {
            let bytes = UnverifiedBlock::from_signed(signed.clone()).serialized().clone();
            let plain = UnverifiedBlock::decode(bytes.clone(), usize::MAX).unwrap();
            let hashed = HashedBytes::new(bytes.clone());
            let signing = Digest::of(&codec::encode(&signed.block));
            prop_assert_eq!(hashed.digest(), Digest::of(&bytes));
            prop_assert_eq!(hashed.signing_digest(), Some(signing));
            prop_assert_eq!(plain.signing_digest(), signing);
            for signatures in [true, false] {
                let handed = UnverifiedBlock::decode_hashed_bytes(
                    hashed.clone(), usize::MAX, signatures,
                ).unwrap();
                let own = UnverifiedBlock::decode_for(bytes.clone(), usize::MAX, signatures).unwrap();
                for b in [&handed, &own] {
                    prop_assert_eq!(b.reference(), plain.reference());
                    prop_assert_eq!(b.signed(), plain.signed());
                    prop_assert_eq!(b.serialized(), plain.serialized());
                    prop_assert_eq!(b.signing_digest(), signing);
                }
            }
        }

        #[test]
        fn decoded_commit_has_the_reference_of_the_commit(commit in arb_commit()) {
            let wrapped = UnverifiedCommit::from_commit(commit.clone());
            let decoded = UnverifiedCommit::decode(wrapped.serialized().clone(), usize::MAX).unwrap();
            prop_assert_eq!(decoded.reference(), wrapped.reference());
            prop_assert_eq!(decoded.commit(), &commit);
            prop_assert_eq!(decoded.serialized(), wrapped.serialized());
            prop_assert_eq!(
                wrapped.reference(),
                CommitRef { index: commit.index, digest: Digest::of(&codec::encode(&commit)) }
            );
        }
    }
}

// ---- 3. JSON: byte arrays are hex strings ----

mod json {
    use super::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn digest_json_is_64_hex_characters(d in arb_digest()) {
            let value = serde_json::to_value(d).unwrap();
            let hex = value.as_str().expect("a digest is a JSON string");
            prop_assert_eq!(hex.len(), 64);
            prop_assert!(hex.bytes().all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)));
            prop_assert_eq!(hex, ::hex::encode(d.0));
            check_json_round_trip(&d)?;
        }

        #[test]
        fn block_ref_json_round_trips(r in arb_block_ref()) {
            check_json_round_trip(&r)?;
        }

        #[test]
        fn signed_node_info_json_round_trips(info in arb_signed_node_info()) {
            let value = serde_json::to_value(&info).unwrap();
            prop_assert_eq!(value["signature"].as_str().map(str::len), Some(128));
            prop_assert_eq!(value["info"]["peer_id"].as_str().map(str::len), Some(64));
            check_json_round_trip(&info)?;
        }

        #[test]
        fn committee_json_round_trips(c in arb_committee()) {
            check_json_round_trip(&c)?;
            let decoded: Committee = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
            prop_assert_eq!(decoded.total_stake(), c.total_stake());
        }
    }

    #[test]
    fn committee_json_with_zero_stake_is_refused() {
        let mut value = serde_json::to_value(sample_signed_block().block.end_of_epoch).unwrap();
        value["next_committee"]["authorities"][0]["stake"] = 0.into();
        assert!(serde_json::from_value::<Option<EndOfEpoch>>(value).is_err());
    }
}

// ---- 4. hostile input: no panic, no huge allocation, exact errors ----

mod hostile {
    use super::*;

    /// Decodes `bytes` as every network type, each with its limit from
    /// `limits`, and returns the largest allocation made.
    fn decode_as_everything(bytes: &[u8]) -> usize {
        let limits = Limits::default();
        let ((), largest) = largest_allocation(|| {
            let _ = codec::decode::<SignedBlock>(bytes, limits.max_block_bytes);
            let _ = codec::decode::<Commit>(bytes, limits.max_commit_bytes);
            let _ = codec::decode::<SignedNodeInfo>(bytes, limits.max_node_info_bytes);
            let _ = codec::decode::<Committee>(bytes, limits.max_block_bytes);
            let _ = codec::decode::<Transaction>(bytes, limits.max_transaction_payload_bytes);
            let _ = UnverifiedBlock::decode(Bytes::copy_from_slice(bytes), limits.max_block_bytes);
            let _ =
                UnverifiedCommit::decode(Bytes::copy_from_slice(bytes), limits.max_commit_bytes);
        });
        largest
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in vec(any::<u8>(), 0..4096)) {
            let largest = decode_as_everything(&bytes);
            prop_assert!(largest <= codec::MAX_DECODE_BYTES, "allocated {largest} bytes");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Random bytes rarely get past the first fields; corrupting a valid
        /// encoding reaches every field.
        #[test]
        fn decoding_corrupted_encodings_never_panics(
            edits in vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
            cut in any::<prop::sample::Index>(),
        ) {
            for valid in [
                codec::encode(&sample_signed_block()),
                codec::encode(&sample_commit()),
                codec::encode(&SignedNodeInfo::sign(
                    NodeInfo {
                        peer_id: key(9).public().into(),
                        addresses: vec!["a:1".into(), "b:2".into()],
                        timestamp_ms: 5,
                        access: Access::Private,
                    },
                    &key(9),
                )),
            ] {
                let mut bytes = valid;
                for (at, byte) in &edits {
                    let at = at.index(bytes.len());
                    bytes[at] = *byte;
                }
                let largest = decode_as_everything(&bytes);
                prop_assert!(largest <= codec::MAX_DECODE_BYTES, "allocated {largest} bytes");
                bytes.truncate(cut.index(bytes.len() + 1));
                decode_as_everything(&bytes);
            }
        }

        /// Whatever the wrapped decoders accept is the canonical encoding of
        /// what they decoded, even after corruption.
        #[test]
        fn accepted_corrupted_encodings_are_canonical(
            edits in vec((any::<prop::sample::Index>(), any::<u8>()), 1..3),
        ) {
            let mut block = codec::encode(&sample_signed_block());
            let mut commit = codec::encode(&sample_commit());
            for (at, byte) in &edits {
                let i = at.index(block.len());
                block[i] = *byte;
                let i = at.index(commit.len());
                commit[i] = *byte;
            }
            if let Ok(b) = UnverifiedBlock::decode(Bytes::from(block.clone()), usize::MAX) {
                prop_assert_eq!(codec::encode(b.signed()), block);
            }
            if let Ok(c) = UnverifiedCommit::decode(Bytes::from(commit.clone()), usize::MAX) {
                prop_assert_eq!(codec::encode(c.commit()), commit);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// The block decoder (a walk of the bytes, not the codec's serde
        /// path) accepts exactly what the codec decodes and encodes back to
        /// the same bytes, and decodes it to the same block: valid,
        /// corrupted, lengthened, cut and widened encodings alike, with and
        /// without an epoch's end.
        #[test]
        fn the_block_decoder_accepts_exactly_the_canonical_encodings(
            signed in arb_signed_block_with(0..4),
            edits in vec((any::<prop::sample::Index>(), any::<u8>()), 0..3),
            insert in proptest::option::of(
                (any::<prop::sample::Index>(), vec(any::<u8>(), 1..4))
            ),
            cut in proptest::option::of(any::<prop::sample::Index>()),
            widen in proptest::option::of(any::<prop::sample::Index>()),
        ) {
            for valid in [codec::encode(&signed), codec::encode(&sample_signed_block())] {
                let mut bytes = valid;
                // A byte below 251 in its long form: a non-canonical
                // integer if it was one, junk otherwise.
                if let Some(at) = &widen {
                    let at = at.index(bytes.len());
                    if bytes[at] < 251 {
                        bytes = widened_varints(&bytes, at).swap_remove(0);
                    }
                }
                for (at, byte) in &edits {
                    let i = at.index(bytes.len());
                    bytes[i] = *byte;
                }
                if let Some((at, extra)) = &insert {
                    let i = at.index(bytes.len() + 1);
                    bytes.splice(i..i, extra.iter().copied());
                }
                if let Some(cut) = &cut {
                    bytes.truncate(cut.index(bytes.len() + 1));
                }
                let canonical = codec::decode::<SignedBlock>(&bytes, usize::MAX)
                    .ok()
                    .filter(|b| codec::encode(b) == bytes);
                let decoded = UnverifiedBlock::decode(Bytes::from(bytes.clone()), usize::MAX);
                prop_assert_eq!(
                    decoded.as_ref().ok().map(UnverifiedBlock::signed),
                    canonical.as_ref(),
                    "{:?}",
                    decoded.as_ref().err()
                );
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(16))]

        #[test]
        fn decoding_truncated_block_fails(signed in arb_signed_block_with(1..3)) {
            let bytes = codec::encode(&signed);
            for cut in 0..bytes.len() {
                let prefix = &bytes[..cut];
                prop_assert!(codec::decode::<SignedBlock>(prefix, usize::MAX).is_err(), "cut {cut}");
                prop_assert!(
                    UnverifiedBlock::decode(Bytes::copy_from_slice(prefix), usize::MAX).is_err(),
                    "cut {cut}"
                );
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn decoding_truncated_commit_or_node_info_fails(
            commit in arb_commit(),
            info in arb_signed_node_info(),
        ) {
            let bytes = codec::encode(&commit);
            for cut in 0..bytes.len() {
                prop_assert!(codec::decode::<Commit>(&bytes[..cut], usize::MAX).is_err());
                prop_assert!(
                    UnverifiedCommit::decode(Bytes::copy_from_slice(&bytes[..cut]), usize::MAX).is_err()
                );
            }
            let bytes = codec::encode(&info);
            for cut in 0..bytes.len() {
                prop_assert!(codec::decode::<SignedNodeInfo>(&bytes[..cut], usize::MAX).is_err());
            }
        }

        #[test]
        fn decoding_with_trailing_bytes_fails(
            signed in arb_signed_block(),
            commit in arb_commit(),
            info in arb_signed_node_info(),
            committee in arb_committee(),
            tx in arb_transaction(),
            extra in vec(any::<u8>(), 1..32),
        ) {
            let n = extra.len();
            let with_extra = |bytes: Vec<u8>| [bytes, extra.clone()].concat();

            let bytes = with_extra(codec::encode(&signed));
            prop_assert_eq!(codec::decode::<SignedBlock>(&bytes, usize::MAX), Err(Error::TrailingBytes(n)));
            prop_assert_eq!(
                UnverifiedBlock::decode(Bytes::from(bytes), usize::MAX).err(),
                Some(Error::TrailingBytes(n))
            );
            let bytes = with_extra(codec::encode(&commit));
            prop_assert_eq!(codec::decode::<Commit>(&bytes, usize::MAX), Err(Error::TrailingBytes(n)));
            prop_assert_eq!(
                UnverifiedCommit::decode(Bytes::from(bytes), usize::MAX).err(),
                Some(Error::TrailingBytes(n))
            );
            let bytes = with_extra(codec::encode(&info));
            prop_assert_eq!(codec::decode::<SignedNodeInfo>(&bytes, usize::MAX), Err(Error::TrailingBytes(n)));
            let bytes = with_extra(codec::encode(&committee));
            prop_assert_eq!(codec::decode::<Committee>(&bytes, usize::MAX), Err(Error::TrailingBytes(n)));
            let bytes = with_extra(codec::encode(&tx));
            prop_assert_eq!(codec::decode::<Transaction>(&bytes, usize::MAX), Err(Error::TrailingBytes(n)));
        }

        #[test]
        fn decoding_over_limit_fails(signed in arb_signed_block(), commit in arb_commit()) {
            let bytes = codec::encode(&signed);
            let len = bytes.len();
            prop_assert_eq!(
                codec::decode::<SignedBlock>(&bytes, len - 1),
                Err(Error::TooLarge { len, limit: len - 1 })
            );
            prop_assert_eq!(
                UnverifiedBlock::decode(Bytes::from(bytes.clone()), len - 1).err(),
                Some(Error::TooLarge { len, limit: len - 1 })
            );
            prop_assert!(codec::decode::<SignedBlock>(&bytes, len).is_ok());

            let bytes = codec::encode(&commit);
            let len = bytes.len();
            prop_assert_eq!(
                UnverifiedCommit::decode(Bytes::from(bytes.clone()), 0).err(),
                Some(Error::TooLarge { len, limit: 0 })
            );
            prop_assert!(UnverifiedCommit::decode(Bytes::from(bytes), len).is_ok());
        }
    }

    #[test]
    fn limit_above_the_codec_maximum_is_clamped() {
        let bytes = vec![0u8; codec::MAX_DECODE_BYTES + 1];
        assert_eq!(
            codec::decode::<Vec<u8>>(&bytes, usize::MAX),
            Err(Error::TooLarge {
                len: codec::MAX_DECODE_BYTES + 1,
                limit: codec::MAX_DECODE_BYTES
            })
        );
    }

    /// Length prefixes claiming more elements than any input could hold.
    fn oversize_prefixes() -> Vec<Vec<u8>> {
        vec![
            varint_u64(u64::MAX),
            varint_u64(1 << 40),
            varint_u64((codec::MAX_DECODE_BYTES + 1) as u64),
            varint_u32(u32::MAX),
            varint_u16(u16::MAX),
        ]
    }

    /// Encodings of blocks and commits cut where a length prefix starts, each
    /// followed by a forged prefix and a little filler.
    fn forged_inputs() -> Vec<(&'static str, Vec<u8>)> {
        let block_head = codec::encode(&(2u64, 300u32, AuthorityIndex(1), 17u64));
        let tx_head = codec::encode(&(key(7).public(), 9u64));
        let commit_head = codec::encode(&(42u64, Digest::of(b"p"), 17u64, BlockRef::default()));
        let mut inputs = Vec::new();
        for prefix in oversize_prefixes() {
            let filler = [&prefix[..], &[0u8; 16][..]].concat();
            let cases: [(&'static str, Vec<u8>); 8] = [
                ("block ancestors", [&block_head[..], &filler].concat()),
                (
                    "block transactions",
                    [&block_head[..], &[0], &filler].concat(),
                ),
                ("block votes", [&block_head[..], &[0, 0], &filler].concat()),
                (
                    "transaction payload",
                    [&block_head[..], &[0, 1], &tx_head, &filler].concat(),
                ),
                (
                    "ancestor digest",
                    [&block_head[..], &[1, 0, 0, 0], &filler].concat(),
                ),
                ("commit previous digest", [&[42][..], &filler].concat()),
                ("commit blocks", [&commit_head[..], &filler].concat()),
                (
                    "leader digest",
                    [&commit_head[..commit_head.len() - 33], &filler].concat(),
                ),
            ];
            inputs.extend(cases);
        }
        inputs
    }

    #[test]
    fn decoding_oversize_length_prefix_fails_without_huge_allocation() {
        for (what, bytes) in forged_inputs() {
            let limit = Limits::default().max_block_bytes;
            let (results, largest) = largest_allocation(|| {
                [
                    codec::decode::<Block>(&bytes, limit).is_err(),
                    codec::decode::<SignedBlock>(&bytes, limit).is_err(),
                    UnverifiedBlock::decode(Bytes::copy_from_slice(&bytes), limit).is_err(),
                    codec::decode::<Commit>(&bytes, limit).is_err(),
                    UnverifiedCommit::decode(Bytes::copy_from_slice(&bytes), limit).is_err(),
                ]
            });
            assert_eq!(results, [true; 5], "{what}: {bytes:?}");
            // serde preallocates at most 1 MiB for a sequence whatever its
            // prefix claims; bincode refuses byte strings over the codec maximum.
            assert!(largest <= 1 << 20, "{what}: allocated {largest} bytes");
        }
    }

    /// A forged prefix cannot make the codec allocate more than the caller's
    /// limit: strings and `Bytes` payloads are read into a buffer sized by
    /// their prefix, so the codec bounds prefixes by the input's size.
    #[test]
    fn forged_byte_string_prefix_allocates_no_more_than_the_limit() {
        let claim = varint_u32(60 << 20);
        let limits = Limits::default();
        let key_bytes = codec::encode(&key(1).public());
        let block_head = codec::encode(&(2u64, 300u32, AuthorityIndex(1), 17u64));
        type Decoder = fn(&[u8], usize) -> bool;
        let cases: [(&str, Vec<u8>, usize, Decoder); 3] = [
            (
                "transaction payload",
                [&key_bytes[..], &[9], &claim].concat(),
                limits.max_transaction_payload_bytes,
                |b, l| codec::decode::<Transaction>(b, l).is_err(),
            ),
            (
                "node info address",
                [&key_bytes[..], &[1], &claim].concat(),
                limits.max_node_info_bytes,
                |b, l| codec::decode::<SignedNodeInfo>(b, l).is_err(),
            ),
            (
                "payload of a block's transaction",
                [&block_head[..], &[0, 1], &key_bytes, &[9], &claim].concat(),
                limits.max_block_bytes,
                |b, l| codec::decode::<SignedBlock>(b, l).is_err(),
            ),
        ];
        for (what, bytes, limit, fails) in cases {
            let (failed, largest) = largest_allocation(|| fails(&bytes, limit));
            assert!(failed, "{what}");
            assert!(
                largest <= limit,
                "{what}: allocated {largest} bytes, limit {limit}"
            );
        }
    }
}

// ---- 5. one block, one encoding, one digest ----

mod canonical {
    use super::*;

    /// bincode's varint decoder accepts the long forms of small values, so
    /// plain `codec::decode` is not enough to fix a digest.
    #[test]
    fn codec_decode_accepts_widened_varints() {
        let commit = sample_commit();
        let bytes = codec::encode(&commit);
        for widened in widened_varints(&bytes, 0) {
            assert_eq!(
                codec::decode::<Commit>(&widened, usize::MAX),
                Ok(commit.clone())
            );
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn non_canonical_commit_is_refused(mut commit in arb_commit(), index in 0u64..251, epoch in 0u64..251) {
            commit.index = index;
            commit.epoch = epoch;
            let bytes = codec::encode(&commit);
            // The index is the first field and the epoch the last.
            for at in [0, bytes.len() - 1] {
                for widened in widened_varints(&bytes, at) {
                    prop_assert!(
                        matches!(
                            UnverifiedCommit::decode(Bytes::from(widened), usize::MAX),
                            Err(Error::Malformed(_))
                        ),
                        "widened byte {}", at
                    );
                }
            }
        }

        #[test]
        fn non_canonical_block_is_refused(mut signed in arb_signed_block(), epoch in 0u64..251) {
            signed.block.epoch = epoch;
            let bytes = codec::encode(&signed);
            // The epoch is the first field; the signature's length prefix
            // (64) sits 65 bytes from the end.
            for at in [0, bytes.len() - 65] {
                for widened in widened_varints(&bytes, at) {
                    prop_assert!(
                        matches!(
                            UnverifiedBlock::decode(Bytes::from(widened), usize::MAX),
                            Err(Error::Malformed(_))
                        ),
                        "widened byte {}", at
                    );
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Decoding hashes the digests from the received bytes; they must be
        /// the digests of the decoded values.
        #[test]
        fn digests_from_received_bytes_are_the_values_digests(signed in arb_signed_block_with(0..5)) {
            let bytes = codec::encode(&signed);
            let decoded = UnverifiedBlock::decode(Bytes::from(bytes.clone()), usize::MAX).unwrap();
            let from_values = UnverifiedBlock::from_signed(signed.clone());
            prop_assert_eq!(decoded.reference(), from_values.reference());
            prop_assert_eq!(decoded.reference().digest, Digest::of(&bytes));
            for (i, tx) in signed.block.transactions.iter().enumerate() {
                prop_assert_eq!(decoded.transaction_signing_digest(i), tx.signing_digest());
            }
        }
    }

    #[test]
    fn non_canonical_lengths_inside_a_block_are_refused() {
        let signed = sample_signed_block();
        let bytes = codec::encode(&signed);
        let head = codec::encode(&(
            signed.block.epoch,
            signed.block.round,
            signed.block.author,
            signed.block.timestamp_ms,
        ));
        // The ancestor count, then the length of the first ancestor's digest.
        let ancestors_len = head.len();
        let digest_len =
            ancestors_len + 1 + codec::encode(&(2u64, 299u32, AuthorityIndex(1))).len();
        assert_eq!(bytes[ancestors_len], 1);
        assert_eq!(bytes[digest_len], 32);
        for at in [ancestors_len, digest_len] {
            for widened in widened_varints(&bytes, at) {
                assert_eq!(
                    codec::decode::<SignedBlock>(&widened, usize::MAX),
                    Ok(signed.clone())
                );
                assert!(matches!(
                    UnverifiedBlock::decode(Bytes::from(widened), usize::MAX),
                    Err(Error::Malformed(_))
                ));
            }
        }
    }
}

// ---- 6. signatures are bound to their domain ----

mod domains {
    use super::*;

    const OTHER_THAN_BLOCK: [Domain; 3] =
        [Domain::Transaction, Domain::NodeInfo, Domain::TlsBinding];

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        #[test]
        fn block_signature_verifies_only_under_block_domain(block in arb_block(), key in arb_keypair()) {
            let signature = key.sign(Domain::Block, &block);
            let digest = Digest::of(&codec::encode(&block));
            let public = key.public();
            prop_assert!(public.verify(Domain::Block, &digest, &signature));
            for domain in OTHER_THAN_BLOCK {
                prop_assert!(!public.verify(domain, &digest, &signature), "{:?}", domain);
            }
            prop_assert_eq!(SignedBlock::new(block, &key).signature, signature);
        }

        #[test]
        fn transaction_signature_verifies_only_under_transaction_domain(tx in arb_transaction()) {
            let digest = tx.signing_digest();
            prop_assert!(tx.sender.verify(Domain::Transaction, &digest, &tx.signature));
            for domain in [Domain::Block, Domain::NodeInfo, Domain::TlsBinding] {
                prop_assert!(!tx.sender.verify(domain, &digest, &tx.signature), "{:?}", domain);
            }
        }

        #[test]
        fn node_info_signature_verifies_only_under_node_info_domain(info in arb_signed_node_info()) {
            let key = info.info.peer_id.public_key().unwrap();
            let digest = info.signing_digest();
            prop_assert!(key.verify(Domain::NodeInfo, &digest, &info.signature));
            for domain in [Domain::Block, Domain::Transaction, Domain::TlsBinding] {
                prop_assert!(!key.verify(domain, &digest, &info.signature), "{:?}", domain);
            }
        }
    }

    #[test]
    fn domain_tags_are_distinct() {
        let domains = [
            Domain::Block,
            Domain::Transaction,
            Domain::NodeInfo,
            Domain::TlsBinding,
        ];
        for (i, a) in domains.iter().enumerate() {
            for b in &domains[i + 1..] {
                assert_ne!(a.tag(), b.tag());
            }
        }
    }
}

/// What a block holds in memory once decoded, against its encoded size: its
/// bytes are kept beside the decoded fields (payloads are slices of them),
/// so a budget that counts bytes holds a bounded multiple of them.
mod footprint {
    use super::*;

    /// A block of `author` 1 with the given parts, its signature a blank
    /// one (decoding checks none).
    fn block(transactions: Vec<Transaction>, ancestors: usize, votes: usize) -> Bytes {
        let block = Block {
            epoch: 2,
            round: 300,
            author: AuthorityIndex(1),
            timestamp_ms: 1_700_000_000_000,
            ancestors: (0..ancestors)
                .map(|i| BlockRef {
                    epoch: 2,
                    round: 1,
                    author: AuthorityIndex(i as u32 % 100),
                    digest: Digest([7; 32]),
                })
                .collect(),
            transactions,
            commit_votes: (0..votes)
                .map(|i| CommitRef {
                    index: i as u64 % 100,
                    digest: Digest([9; 32]),
                })
                .collect(),
            end_of_epoch: None,
        };
        let signed = SignedBlock {
            block,
            signature: Signature([0; 64]),
        };
        Bytes::from(codec::encode(&signed))
    }

    fn transactions(count: usize, payload: usize) -> Vec<Transaction> {
        (0..count)
            .map(|i| Transaction {
                sender: key(3).public(),
                nonce: i as u64 % 100,
                payload: Bytes::from(vec![5; payload]),
                signature: Signature([0; 64]),
            })
            .collect()
    }

    /// Bytes held by the block decoded from `bytes`, as sync keeps it:
    /// the decoded value behind a reference count, and the bytes.
    fn held(bytes: &Bytes) -> usize {
        let (block, retained) = retained_allocation(|| {
            let decoded = UnverifiedBlock::decode(bytes.clone(), usize::MAX).unwrap();
            std::sync::Arc::new(decoded)
        });
        drop(block);
        retained + bytes.len()
    }

    #[test]
    fn a_decoded_block_holds_a_bounded_multiple_of_its_bytes() {
        let limit = Limits::default().max_block_bytes;
        // As many items as fit in a block, from what a thousand add.
        let fill = |make: &dyn Fn(usize) -> Bytes| {
            let per_item = (make(1_001).len() - make(1).len()) / 1_000;
            (limit - make(0).len()) / per_item
        };
        let empty = |n| block(transactions(n, 0), 0, 0);
        let ancestors = |n| block(Vec::new(), n, 0);
        let votes = |n| block(Vec::new(), 0, n);
        let shapes = [
            (
                "10 transactions of 100 bytes",
                block(transactions(10, 100), 4, 4),
            ),
            ("empty", block(Vec::new(), 0, 0)),
            ("one ancestor", block(Vec::new(), 1, 0)),
            ("just past a growth of ancestors", ancestors(87_382)),
            (
                "just past a growth of empty transactions",
                empty(7_711 * 4 + 1),
            ),
            ("empty transactions up to the limit", empty(fill(&empty))),
            ("ancestors up to the limit", ancestors(fill(&ancestors))),
            ("commit votes up to the limit", votes(fill(&votes))),
        ];
        for (name, bytes) in &shapes {
            assert!(bytes.len() <= limit, "{name}: {} bytes", bytes.len());
            let (len, held) = (bytes.len() as f64, held(bytes) as f64);
            // The decoded value and its reference count: a fixed part, and
            // under 1.75 times the bytes of the items (a transaction of 98
            // bytes decodes to 168 with its digest), with no room to spare
            // in their vectors.
            assert!(
                held <= 2.75 * len + PER_BLOCK_BYTES as f64,
                "{name}: {held} bytes held for {len}"
            );
            assert!(held / len <= 6.0, "{name}: {held} bytes held for {len}");
        }
        // An ordinary block holds its bytes about twice: its payloads are
        // slices of them (copies would make this 2.4).
        let ordinary = &shapes[0].1;
        let ratio = held(ordinary) as f64 / ordinary.len() as f64;
        assert!(ratio <= 2.1, "{ratio}");
    }

    /// The fixed part of a decoded block, beside its bytes and items.
    const PER_BLOCK_BYTES: usize = 400;
}
