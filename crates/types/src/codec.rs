//! The one place that turns values into bytes and back.
//!
//! Everything signed, digested, stored or sent as `bytes` on the wire goes
//! through [`encode`] and [`decode`], which wrap bincode 2.0.1's serde API
//! with the standard configuration (little endian, variable-length
//! integers); blocks, the bulk of what a node receives, are decoded from
//! the same format by a walk of their bytes with [`Reader`], which the
//! tests compare with [`decode`] on valid and corrupted inputs. The bincode
//! project is no longer maintained; keeping every call here means the
//! codec can move to any bincode-compatible crate in one file.
//!
//! [`decode`] is for untrusted input: it refuses inputs over a byte limit
//! before reading them, rejects trailing bytes, and bounds every length
//! prefix by a small multiple of the input's own size, so a
//! forged prefix cannot make it allocate much more than the bytes it was
//! given. bincode accepts long forms of small integers, so one value may have
//! several encodings; where a digest must be unique (blocks, commits), the
//! decoders of [`UnverifiedBlock`](crate::UnverifiedBlock) and
//! [`UnverifiedCommit`](crate::UnverifiedCommit) also require the canonical
//! encoding.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The largest input [`decode`] accepts, whatever limit the caller passes.
pub const MAX_DECODE_BYTES: usize = 64 << 20;

/// Bound on in-memory size claimed per encoded byte (see [`decode`]).
const IN_MEMORY_FACTOR: usize = 8;

type Config<const N: usize> = bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Varint,
    bincode::config::Limit<N>,
>;

const fn config<const N: usize>() -> Config<N> {
    bincode::config::standard().with_limit::<N>()
}

/// Encodes `value`.
///
/// The types of this workspace always encode (they use no serde feature
/// bincode lacks), so this returns bytes rather than a `Result`.
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Vec<u8> {
    bincode::serde::encode_to_vec(value, config::<MAX_DECODE_BYTES>())
        .expect("workspace types use only serde features bincode supports")
}

/// Decodes a `T` from `bytes`, which must hold exactly one value and be at
/// most `limit` bytes long (and at most [`MAX_DECODE_BYTES`]). A `T` that
/// borrows (`&'a [u8]` fields with `#[serde(borrow)]`) points into `bytes`
/// instead of copying.
pub fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8], limit: usize) -> Result<T> {
    let (value, read) = decode_prefix(bytes, limit)?;
    if read != bytes.len() {
        return Err(Error::TrailingBytes(bytes.len() - read));
    }
    Ok(value)
}

/// Refuses `bytes` longer than `limit`, or than [`MAX_DECODE_BYTES`]
/// whatever the limit, before anything is read: every decoder of untrusted
/// input starts here.
pub fn check_size(bytes: &[u8], limit: usize) -> Result<()> {
    let limit = limit.min(MAX_DECODE_BYTES);
    if bytes.len() > limit {
        return Err(Error::TooLarge {
            len: bytes.len(),
            limit,
        });
    }
    Ok(())
}

/// [`decode`] of the value `bytes` begin with, and how many bytes it took;
/// the bytes after it are left to the caller.
pub fn decode_prefix<'a, T: Deserialize<'a>>(bytes: &'a [u8], limit: usize) -> Result<(T, usize)> {
    check_size(bytes, limit)?;
    // bincode's limit is a type parameter, and it counts the bytes read plus
    // each container's claimed size in memory (length × element size), which
    // for our types stays under 8× the encoded size. Pick the smallest tier
    // above that: an honest input always fits, and a forged length prefix is
    // refused before it allocates more than a small multiple of the input.
    let budget = bytes.len().saturating_mul(IN_MEMORY_FACTOR);
    if budget <= 1 << 10 {
        decode_within::<T, { 1 << 10 }>(bytes)
    } else if budget <= 1 << 12 {
        decode_within::<T, { 1 << 12 }>(bytes)
    } else if budget <= 1 << 14 {
        decode_within::<T, { 1 << 14 }>(bytes)
    } else if budget <= 1 << 16 {
        decode_within::<T, { 1 << 16 }>(bytes)
    } else if budget <= 1 << 18 {
        decode_within::<T, { 1 << 18 }>(bytes)
    } else if budget <= 1 << 20 {
        decode_within::<T, { 1 << 20 }>(bytes)
    } else if budget <= 1 << 22 {
        decode_within::<T, { 1 << 22 }>(bytes)
    } else if budget <= 1 << 24 {
        decode_within::<T, { 1 << 24 }>(bytes)
    } else if budget <= 1 << 26 {
        decode_within::<T, { 1 << 26 }>(bytes)
    } else {
        decode_within::<T, { IN_MEMORY_FACTOR * MAX_DECODE_BYTES }>(bytes)
    }
}

/// Whether `bytes[*pos..]` begins with the encoding of `value`; if so,
/// moves `*pos` past it. Compares as it encodes, allocating nothing: the
/// canonical-encoding checks walk received bytes with it.
pub fn matches_at<T: Serialize + ?Sized>(value: &T, bytes: &[u8], pos: &mut usize) -> bool {
    let mut writer = MatchWriter {
        expected: bytes,
        pos: *pos,
    };
    let matched =
        bincode::serde::encode_into_writer(value, &mut writer, config::<MAX_DECODE_BYTES>())
            .is_ok();
    if matched {
        *pos = writer.pos;
    }
    matched
}

/// A bincode writer that checks each write against the expected bytes.
struct MatchWriter<'a> {
    expected: &'a [u8],
    pos: usize,
}

impl bincode::enc::write::Writer for MatchWriter<'_> {
    fn write(&mut self, bytes: &[u8]) -> std::result::Result<(), bincode::error::EncodeError> {
        let end = self.pos + bytes.len();
        if self.expected.get(self.pos..end) != Some(bytes) {
            return Err(bincode::error::EncodeError::Other("bytes differ"));
        }
        self.pos = end;
        Ok(())
    }
}

/// A reader of the codec's format that accepts only canonical encodings:
/// each integer in its shortest form, each fixed-size byte string with its
/// own length, each sequence no longer than the bytes left could hold. For
/// hand-written decoders of hot types (blocks), which need the canonical
/// check and the positions of their parts in one pass; everything else goes
/// through [`decode`].
///
/// The format (bincode's standard configuration): an unsigned integer below
/// 251 is one byte; otherwise a marker (251, 252, 253) then the value as
/// little-endian u16, u32 or u64. Byte strings and sequences are a length (an
/// integer) then their contents; an `Option` is a byte, 0 or 1, then the
/// value if 1.
pub struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    /// A reader at the start of `bytes`.
    pub fn new(bytes: &'a [u8]) -> Self {
        Reader { bytes, pos: 0 }
    }

    /// Bytes read so far.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// Bytes left.
    pub fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    /// The bytes left, not consumed.
    pub fn rest(&self) -> &'a [u8] {
        &self.bytes[self.pos..]
    }

    /// Moves past `n` bytes the caller has read from [`Reader::rest`].
    pub fn advance(&mut self, n: usize) -> Result<()> {
        self.take(n).map(|_| ())
    }

    /// The next `n` bytes.
    pub fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(malformed("unexpected end"));
        }
        let taken = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(taken)
    }

    fn byte(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    /// An unsigned integer in its shortest form.
    pub fn u64(&mut self) -> Result<u64> {
        let (value, shortest) = match self.byte()? {
            b @ 0..=250 => return Ok(u64::from(b)),
            251 => {
                let v = u64::from(u16::from_le_bytes(self.array()?));
                (v, v >= 251)
            }
            252 => {
                let v = u64::from(u32::from_le_bytes(self.array()?));
                (v, v > u64::from(u16::MAX))
            }
            253 => {
                let v = u64::from_le_bytes(self.array()?);
                (v, v > u64::from(u32::MAX))
            }
            _ => return Err(malformed("integer out of range")),
        };
        if shortest {
            Ok(value)
        } else {
            Err(malformed("integer not in its shortest form"))
        }
    }

    /// A `u32` in its shortest form.
    pub fn u32(&mut self) -> Result<u32> {
        u32::try_from(self.u64()?).map_err(|_| malformed("integer out of range"))
    }

    /// A length: a count of items each at least `min_item_bytes` long, so
    /// that the bytes left bound it before anything is allocated for it.
    pub fn len(&mut self, min_item_bytes: usize) -> Result<usize> {
        let len = self.u64()?;
        let room = self.remaining() / min_item_bytes.max(1);
        usize::try_from(len)
            .ok()
            .filter(|&len| len <= room)
            .ok_or_else(|| malformed("length past the bytes left"))
    }

    /// A byte string: its length, then its bytes.
    pub fn bytes(&mut self) -> Result<&'a [u8]> {
        let len = self.len(1)?;
        self.take(len)
    }

    /// A fixed-size byte string (a digest, a key, a signature), encoded as
    /// a byte string of exactly `N` bytes.
    pub fn fixed<const N: usize>(&mut self) -> Result<[u8; N]> {
        if self.u64()? != N as u64 {
            return Err(malformed("fixed-size bytes of the wrong length"));
        }
        self.array()
    }

    /// An `Option`'s tag: whether a value follows.
    pub fn some(&mut self) -> Result<bool> {
        match self.byte()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(malformed("option tag out of range")),
        }
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        Ok(self.take(N)?.try_into().expect("took N bytes"))
    }
}

fn malformed(what: &str) -> Error {
    Error::Malformed(what.into())
}

fn decode_within<'a, T: Deserialize<'a>, const N: usize>(bytes: &'a [u8]) -> Result<(T, usize)> {
    bincode::serde::borrow_decode_from_slice(bytes, config::<N>())
        .map_err(|e| Error::Malformed(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_at_accepts_the_encoding_and_advances() {
        let bytes = encode(&(300u64, "abc", 7u8));
        let mut pos = 0;
        assert!(matches_at(&300u64, &bytes, &mut pos));
        assert!(matches_at("abc", &bytes, &mut pos));
        assert!(matches_at(&7u8, &bytes, &mut pos));
        assert_eq!(pos, bytes.len());
    }

    #[test]
    fn matches_at_refuses_other_bytes_and_keeps_its_place() {
        let bytes = encode(&(300u64, "abc"));
        let mut pos = 0;
        assert!(!matches_at(&301u64, &bytes, &mut pos));
        assert_eq!(pos, 0);
        // A long form of 5 (a u16 marker, then two bytes) is not its encoding.
        let long_form = [251u8, 5, 0];
        assert!(!matches_at(&5u64, &long_form, &mut pos));
        // Running off the end is a mismatch, not a panic.
        assert!(matches_at(&300u64, &bytes, &mut pos));
        assert!(!matches_at("abcdef", &bytes, &mut pos));
    }

    #[test]
    fn decode_rejects_trailing_bytes() {
        let mut bytes = encode(&(7u64, "seven"));
        bytes.push(0);
        assert_eq!(
            decode::<(u64, String)>(&bytes, 1024),
            Err(Error::TrailingBytes(1))
        );
    }

    #[test]
    fn decode_rejects_input_over_limit() {
        let bytes = encode(&vec![1u8; 100]);
        assert!(matches!(
            decode::<Vec<u8>>(&bytes, 50),
            Err(Error::TooLarge { limit: 50, .. })
        ));
    }

    #[test]
    fn oversize_length_prefix_fails_without_allocating() {
        // A varint length prefix claiming 2^62 elements, and nothing behind it.
        let mut bytes = vec![0xFF];
        bytes.extend_from_slice(&(1u64 << 62).to_le_bytes());
        assert!(decode::<Vec<u64>>(&bytes, 1024).is_err());
        assert!(decode::<String>(&bytes, 1024).is_err());
    }

    #[test]
    fn truncated_input_fails() {
        let bytes = encode(&(1u64, vec![9u8; 40]));
        for cut in 0..bytes.len() {
            assert!(decode::<(u64, Vec<u8>)>(&bytes[..cut], 1024).is_err());
        }
    }
}
