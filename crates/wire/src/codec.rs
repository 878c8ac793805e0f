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
//! A decoded `bytes` field is a slice of the received message, which keeps
//! all of it alive: a peer that pads a message with unknown fields (which
//! prost skips) would have the receiver hold the padding while it counts
//! only the fields. A message received longer than its decoded fields
//! encode to is decoded again from an exact copy of them
//! ([`compact`]); an honest message, encoded canonically, is not.

use std::marker::PhantomData;

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
    type Decoder = CompactingDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ReservingEncoder(PhantomData)
    }

    fn decoder(&mut self) -> Self::Decoder {
        CompactingDecoder(PhantomData)
    }
}

/// Decodes a prost message; one received longer than its fields encode to
/// is decoded again from an exact copy ([`compact`]).
#[derive(Debug, Clone, Copy)]
pub struct CompactingDecoder<U>(PhantomData<U>);

impl<U: Message + Default> Decoder for CompactingDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        let received = bytes::Buf::remaining(buf);
        let item = U::decode(buf).map_err(decode_error)?;
        compact(item, received).map(Some).map_err(decode_error)
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}

/// `item`, decoded from `received` bytes, as it keeps no more than its
/// own encoding alive: if `received` is more than that (unknown fields,
/// non-canonical lengths), decoded again from an exact encoding of it, so
/// that its `bytes` fields are slices of that and the received message
/// can be dropped.
pub fn compact<U: Message + Default>(item: U, received: usize) -> Result<U, prost::DecodeError> {
    if received <= item.encoded_len() {
        return Ok(item);
    }
    U::decode(bytes::Bytes::from(item.encode_to_vec()))
}

/// As tonic maps a protobuf decoding error (INTERNAL).
fn decode_error(e: prost::DecodeError) -> Status {
    Status::internal(e.to_string())
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

#[cfg(test)]
mod tests {
    use bytes::{BufMut, Bytes, BytesMut};

    use super::*;
    use crate::proto::FetchBlocksResponse;

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

    #[test]
    fn a_padded_message_keeps_only_what_it_decoded_to() {
        let message = FetchBlocksResponse {
            blocks: vec![Bytes::from(vec![1u8; 100]), Bytes::from(vec![2u8; 50])],
        };
        let received = padded(&message, 1 << 20);
        let decoded = FetchBlocksResponse::decode(received.clone()).unwrap();
        // As prost decodes it: slices of the whole padded message.
        assert!(decoded.blocks.iter().all(|b| inside(&received, b)));
        let kept = compact(decoded, received.len()).unwrap();
        assert_eq!(kept, message);
        assert!(kept.blocks.iter().all(|b| !inside(&received, b)));
    }

    #[test]
    fn a_canonical_message_is_kept_as_received() {
        let message = FetchBlocksResponse {
            blocks: vec![Bytes::from(vec![1u8; 100])],
        };
        let received = Bytes::from(message.encode_to_vec());
        let decoded = FetchBlocksResponse::decode(received.clone()).unwrap();
        let kept = compact(decoded, received.len()).unwrap();
        assert_eq!(kept, message);
        // No copy: still the received bytes.
        assert!(kept.blocks.iter().all(|b| inside(&received, b)));
    }
}
