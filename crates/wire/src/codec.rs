//! The codec of every generated client and server: prost's, except that a
//! message's encoding reserves its whole length first, and a received
//! message keeps alive no more than what it decoded to.
//!
//! tonic encodes each message into a buffer that starts at 8 KiB and grows
//! by doubling as prost writes into it, so a 600 KB answer of blocks moved
//! through seven reallocations, each a copy of what was written so far.
//! prost knows a message's length before writing it (`encoded_len`, a walk
//! over the fields' lengths), so one reservation makes the buffer the right
//! size at once. The bytes written are prost's, unchanged.
//!
//! A decoded `bytes` field would be a slice of tonic's read buffer, which
//! keeps all of it alive, and that buffer is reused from message to
//! message of a stream: a peer padding messages with unknown fields (which
//! prost skips) could have a block counted at its own size keep a buffer
//! of the message size limit alive. Messages are decoded so that every
//! `bytes` field is a copy of its own bytes ([`decode_copying`]): one
//! memcpy per field, and what is kept is what is counted.
//!
//! Each decoded entry of a repeated field costs a `Bytes` or a struct (32
//! to 48 bytes) however short its encoding: a message made of empty
//! entries, two bytes each, would decode to sixteen times its size or
//! more (a cap-sized FetchCommits answer to hundreds of megabytes) before
//! any check could count them. A message with more top-level fields than
//! its length allows ([`MIN_FIELD_BYTES`]) is refused before it is
//! decoded, so what a message decodes to stays within a few times its
//! size, which is what its caller reserved for.

use std::marker::PhantomData;

use prost::encoding::{WireType, decode_key, decode_varint};

use bytes::Buf;
use prost::Message;
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

/// A [`Codec`] for prost messages that encodes each in one reservation.
#[derive(Debug, Clone, Copy)]
pub struct ReservingCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for ReservingCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> Codec for ReservingCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ReservingEncoder<T>;
    type Decoder = CopyingDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ReservingEncoder(PhantomData)
    }

    fn decoder(&mut self) -> Self::Decoder {
        CopyingDecoder(PhantomData)
    }
}

/// Encodes a prost message after reserving its encoded length.
#[derive(Debug, Clone, Copy)]
pub struct ReservingEncoder<T>(PhantomData<T>);

impl<T: Message> Encoder for ReservingEncoder<T> {
    type Item = T;
    type Error = Status;

    fn encode(&mut self, item: T, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        buf.reserve(item.encoded_len());
        item.encode(buf)
            .map_err(|e| Status::internal(format!("encoding a message: {e}")))
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}

/// Decodes a prost message, every `bytes` field a copy of its own bytes
/// ([`decode_copying`]).
#[derive(Debug, Clone, Copy)]
pub struct CopyingDecoder<U>(PhantomData<U>);

impl<U: Message + Default> Decoder for CopyingDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        decode_copying(buf).map(Some)
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}

/// The fewest bytes, on average, that each top-level field of a message
/// takes past the first [`FREE_FIELDS`]. Every repeated entry of the
/// protocol takes more: a block reference 36 bytes or more, a commit, a
/// block or a node info hundreds. Past it a message is refused undecoded
/// (INTERNAL, as a malformed message is), so it decodes to at most about
/// three times its size, its vectors' spare capacity included.
pub const MIN_FIELD_BYTES: usize = 32;

/// Top-level fields any message may hold whatever its length: a
/// message's singular fields, a byte or two each.
pub const FREE_FIELDS: usize = 64;

/// Decodes a `U` from `buf` with every `bytes` field copied out: prost
/// takes such a field with `Buf::copy_to_bytes`, which on tonic's buffer
/// (as on `Bytes`) is a slice of it. Through `Copying`, which leaves
/// `copy_to_bytes` to its default, it is a new allocation of exactly the
/// field's length. A message with more top-level fields than its length
/// allows (see [`MIN_FIELD_BYTES`]) is refused before anything is
/// decoded; errors are as tonic reports a malformed message (INTERNAL).
pub fn decode_copying<U: Message + Default, B: Buf>(buf: &mut B) -> Result<U, Status> {
    if buf.chunk().len() < buf.remaining() {
        // Not one slice (tonic hands one): counted on a contiguous copy.
        let mut whole = vec![0; buf.remaining()];
        buf.copy_to_slice(&mut whole);
        return decode_copying(&mut whole.as_slice());
    }
    check_field_count(buf.chunk())?;
    U::decode(Copying(buf)).map_err(decode_error)
}

/// Refuses `message`, an encoded message, if it has more top-level fields
/// than [`FREE_FIELDS`] plus one per [`MIN_FIELD_BYTES`] of its length.
/// Reads only keys and lengths, and stops at the first malformed one,
/// which the decoder then refuses. A group is refused: proto3 has none,
/// and prost would skip one unread, with whatever follows it.
fn check_field_count(mut message: &[u8]) -> Result<(), Status> {
    let len = message.len();
    let allowed = FREE_FIELDS + len / MIN_FIELD_BYTES;
    let mut fields = 0usize;
    while !message.is_empty() {
        let Ok((_, wire_type)) = decode_key(&mut message) else {
            break;
        };
        let skip = match wire_type {
            WireType::Varint => match decode_varint(&mut message) {
                Ok(_) => 0,
                Err(_) => break,
            },
            WireType::SixtyFourBit => 8,
            WireType::ThirtyTwoBit => 4,
            WireType::LengthDelimited => match decode_varint(&mut message) {
                Ok(len) => usize::try_from(len).unwrap_or(usize::MAX),
                Err(_) => break,
            },
            WireType::StartGroup | WireType::EndGroup => {
                return Err(Status::internal("a group in a proto3 message"));
            }
        };
        if skip > message.len() {
            break;
        }
        message = &message[skip..];
        fields += 1;
        if fields > allowed {
            return Err(Status::internal(format!(
                "more than {allowed} fields in a message of {len} bytes \
                 ({FREE_FIELDS}, and one per {MIN_FIELD_BYTES} bytes)"
            )));
        }
    }
    Ok(())
}

/// A [`Buf`] that hands out copies, never slices, of what it holds.
struct Copying<'a, B>(&'a mut B);

impl<B: Buf> Buf for Copying<'_, B> {
    fn remaining(&self) -> usize {
        self.0.remaining()
    }

    fn chunk(&self) -> &[u8] {
        self.0.chunk()
    }

    fn advance(&mut self, n: usize) {
        self.0.advance(n);
    }
}

/// As tonic maps a protobuf decoding error (INTERNAL).
fn decode_error(e: prost::DecodeError) -> Status {
    Status::internal(e.to_string())
}

#[cfg(test)]
mod tests {
    use bytes::{BufMut, Bytes, BytesMut};

    use super::*;
    use crate::proto::{BlockRef, FetchBlocksRequest, FetchBlocksResponse};

    /// `message` encoded, then an unknown length-delimited field (number
    /// 15) of `padding` bytes.
    fn padded(message: &FetchBlocksResponse, padding: usize) -> Bytes {
        let mut buf = BytesMut::new();
        message.encode(&mut buf).unwrap();
        prost::encoding::encode_key(15, prost::encoding::WireType::LengthDelimited, &mut buf);
        prost::encoding::encode_varint(padding as u64, &mut buf);
        buf.put_bytes(0, padding);
        buf.freeze()
    }

    fn inside(buf: &Bytes, field: &Bytes) -> bool {
        buf.as_ptr_range().contains(&field.as_ptr())
    }

    /// `entries` empty entries of field 1, each two bytes on the wire.
    fn empty_entries(entries: usize) -> Bytes {
        Bytes::from([0x0a, 0x00].repeat(entries))
    }

    #[test]
    fn a_message_of_more_fields_than_its_length_allows_is_refused_undecoded() {
        // 4 MiB of empty entries: 2 Mi fields, against 64 + 4 Mi / 32.
        let junk = empty_entries(2 << 20);
        let refused = decode_copying::<FetchBlocksResponse, _>(&mut junk.clone()).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Internal);
        assert_eq!(
            refused.message(),
            "more than 131136 fields in a message of 4194304 bytes (64, and one per 32 bytes)"
        );
        // Up to the allowance, the same entries decode: 68 of them take
        // 136 bytes, which allow 64 + 4.
        for (entries, ok) in [(64, true), (68, true), (69, false)] {
            let message = empty_entries(entries);
            let decoded = decode_copying::<FetchBlocksResponse, _>(&mut message.clone());
            assert_eq!(decoded.is_ok(), ok, "{entries}");
            if let Ok(decoded) = decoded {
                assert_eq!(decoded.blocks.len(), entries);
            }
        }
        // A request of many block references, the shortest entries the
        // protocol sends, decodes whole.
        let refs = FetchBlocksRequest {
            refs: (0..1_000)
                .map(|i| BlockRef {
                    epoch: 0,
                    round: i,
                    author: 0,
                    digest: Bytes::from(vec![7u8; 32]),
                })
                .collect(),
            ..Default::default()
        };
        let encoded = Bytes::from(refs.encode_to_vec());
        let decoded: FetchBlocksRequest = decode_copying(&mut encoded.clone()).unwrap();
        assert_eq!(decoded, refs);
    }

    /// A group (an empty one, field 15) before the entries does not end
    /// the count: groups are refused.
    #[test]
    fn a_group_is_refused_not_skipped() {
        let mut junk = vec![0x7b, 0x7c];
        junk.extend_from_slice(&empty_entries(1 << 16));
        let refused = decode_copying::<FetchBlocksResponse, _>(&mut Bytes::from(junk)).unwrap_err();
        assert_eq!(refused.message(), "a group in a proto3 message");
    }

    /// A message split over several chunks is counted as one.
    #[test]
    fn a_message_in_pieces_is_counted_whole() {
        let junk = empty_entries(69);
        let mut pieces = junk.slice(..100).chain(junk.slice(100..));
        let refused = decode_copying::<FetchBlocksResponse, _>(&mut pieces).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Internal);
        let fine = empty_entries(68);
        let mut pieces = fine.slice(..100).chain(fine.slice(100..));
        let decoded: FetchBlocksResponse = decode_copying(&mut pieces).unwrap();
        assert_eq!(decoded.blocks.len(), 68);
    }

    #[test]
    fn decoded_fields_keep_nothing_of_the_received_buffer_alive() {
        let message = FetchBlocksResponse {
            blocks: vec![Bytes::from(vec![1u8; 100]), Bytes::from(vec![2u8; 50])],
        };
        for received in [
            padded(&message, 1 << 20),
            Bytes::from(message.encode_to_vec()),
        ] {
            // As prost decodes from a shared buffer: slices of all of it.
            let sliced = FetchBlocksResponse::decode(received.clone()).unwrap();
            assert!(sliced.blocks.iter().all(|b| inside(&received, b)));
            let copied: FetchBlocksResponse = decode_copying(&mut received.clone()).unwrap();
            assert_eq!(copied, message);
            assert!(copied.blocks.iter().all(|b| !inside(&received, b)));
        }
    }
}
