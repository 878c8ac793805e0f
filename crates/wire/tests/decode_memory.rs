//! What decoding a received message costs in memory: a message whose
//! fields are too many for its length (each decoded entry costs a `Bytes`
//! or a struct however short it is on the wire) is refused before anything
//! is decoded, and one within the allowance decodes to at most three times
//! its size. Measured with the allocator of the types crate's tests,
//! which records, per thread, the most bytes held at once.

use bytes::{BufMut, Bytes, BytesMut};
use prost::encoding::{WireType, encode_key, encode_varint};
use soma_wire::codec::{FREE_FIELDS, MIN_FIELD_BYTES, decode_copying};
use soma_wire::proto::{FetchBlocksResponse, FetchCommitsResponse};

#[path = "../../types/tests/support/allocations.rs"]
mod allocations;
use allocations::peak_allocation;

/// `entries` empty entries of field 1 (two bytes each), after an unknown
/// field (number 15) of `padding` bytes.
fn message(padding: usize, entries: usize) -> Bytes {
    let mut buf = BytesMut::new();
    if padding > 0 {
        encode_key(15, WireType::LengthDelimited, &mut buf);
        encode_varint(padding as u64, &mut buf);
        buf.put_bytes(0, padding);
    }
    for _ in 0..entries {
        buf.put_slice(&[0x0a, 0x00]);
    }
    buf.freeze()
}

/// A FetchCommits answer at the 16 MiB a four-member committee's batch
/// may take, made of empty commits: decoded, it held 8 Mi `Bytes` of 32
/// bytes (and its vector's doubling), over 256 MiB; refused, nothing.
#[test]
fn a_message_of_empty_entries_is_refused_before_it_costs_memory() {
    let junk = message(0, 8 << 20);
    let (decoded, peak) =
        peak_allocation(|| decode_copying::<FetchCommitsResponse, _>(&mut junk.clone()));
    assert!(peak < 4096, "{peak} bytes held to refuse it");
    match decoded {
        Ok(decoded) => panic!("{} commits decoded", decoded.commits.len()),
        Err(refused) => assert_eq!(refused.code(), tonic::Code::Internal, "{refused:?}"),
    }
}

/// At the allowance, the emptiest entries a message may hold decode to at
/// most three times its size.
#[test]
fn a_message_at_the_allowance_decodes_within_three_times_its_size() {
    let padding = 1 << 20;
    // The entries a message of this length may hold: one per
    // MIN_FIELD_BYTES of it, and FREE_FIELDS more, the padding one of them.
    let padded = message(padding, 0).len();
    let fits = |entries: usize| entries < FREE_FIELDS + (padded + 2 * entries) / MIN_FIELD_BYTES;
    let entries = (0..).take_while(|n| fits(*n)).last().unwrap();
    let full = message(padding, entries);
    let (decoded, peak) =
        peak_allocation(|| decode_copying::<FetchBlocksResponse, _>(&mut full.clone()));
    assert_eq!(decoded.expect("within the allowance").blocks.len(), entries);
    assert!(
        peak <= 3 * full.len(),
        "{peak} bytes held for a message of {}",
        full.len()
    );
    let over = message(padding, entries + 1);
    assert!(decode_copying::<FetchBlocksResponse, _>(&mut over.clone()).is_err());
}
