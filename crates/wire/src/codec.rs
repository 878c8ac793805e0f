//! The codec of every generated client and server: prost's, except that a
//! message's encoding reserves its whole length first.
//!
//! tonic encodes each message into a buffer that starts at 8 KiB and grows
//! by doubling as prost writes into it, so a 600 KB answer of blocks moved
//! through seven reallocations, each a copy of what was written so far.
//! prost knows a message's length before writing it (`encoded_len`, a walk
//! over the fields' lengths), so one reservation makes the buffer the right
//! size at once. The bytes written are prost's, unchanged.

use std::marker::PhantomData;

use prost::Message;
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, EncodeBuf, Encoder};
use tonic_prost::ProstCodec;

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
    type Decoder = <ProstCodec<T, U> as Codec>::Decoder;

    fn encoder(&mut self) -> Self::Encoder {
        ReservingEncoder(PhantomData)
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::default().decoder()
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
