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

use std::marker::PhantomData;

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
        decode_copying(buf).map(Some).map_err(decode_error)
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}

/// Decodes a `U` from `buf` with every `bytes` field copied out: prost
/// takes such a field with `Buf::copy_to_bytes`, which on tonic's buffer
/// (as on `Bytes`) is a slice of it. Through `Copying`, which leaves
/// `copy_to_bytes` to its default, it is a new allocation of exactly the
/// field's length.
pub fn decode_copying<U: Message + Default, B: Buf>(buf: &mut B) -> Result<U, prost::DecodeError> {
    U::decode(Copying(buf))
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
