//! The hash of a run: every input and output, in order.

/// Bytes gathered before they are hashed: blake3 hashes a long update many
/// chunks side by side (16 at a time with AVX-512), where the short
/// updates a run makes (a node, a time, one input) go one 64-byte block at
/// a time, a few times slower per byte.
const BUFFER_BYTES: usize = 64 << 10;

/// blake3 of everything written, in order. Gathering bytes changes no
/// digest: blake3's output depends on the bytes only, never on how they
/// were split into updates.
#[derive(Clone)]
pub(crate) struct RunDigest {
    hasher: blake3::Hasher,
    pending: Vec<u8>,
}

impl Default for RunDigest {
    fn default() -> Self {
        RunDigest {
            hasher: blake3::Hasher::new(),
            pending: Vec::with_capacity(BUFFER_BYTES),
        }
    }
}

impl RunDigest {
    /// Adds `bytes`.
    pub(crate) fn update(&mut self, bytes: &[u8]) {
        self.pending.extend_from_slice(bytes);
        self.flush_full();
    }

    /// Adds what `write` appends to the buffer it is handed.
    pub(crate) fn write(&mut self, write: impl FnOnce(&mut Vec<u8>)) {
        write(&mut self.pending);
        self.flush_full();
    }

    fn flush_full(&mut self) {
        if self.pending.len() >= BUFFER_BYTES {
            self.hasher.update(&self.pending);
            self.pending.clear();
        }
    }

    /// The digest of everything added so far.
    pub(crate) fn finalize(&self) -> [u8; 32] {
        let mut hasher = self.hasher.clone();
        hasher.update(&self.pending);
        *hasher.finalize().as_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The digest is blake3 of the bytes, whatever the updates: short
    /// ones, ones across the buffer's end, and one larger than it.
    #[test]
    fn the_digest_is_blake3_of_every_byte_in_order() {
        let bytes: Vec<u8> = (0..3 * BUFFER_BYTES + 12_345)
            .map(|i| (i * 7 + i / 251) as u8)
            .collect();
        let mut digest = RunDigest::default();
        let mut at = 0;
        for len in [1, 8, 31, 1_000, BUFFER_BYTES - 3, 2 * BUFFER_BYTES + 17]
            .into_iter()
            .cycle()
        {
            let end = (at + len).min(bytes.len());
            if at % 2 == 0 {
                digest.update(&bytes[at..end]);
            } else {
                digest.write(|b| b.extend_from_slice(&bytes[at..end]));
            }
            assert_eq!(digest.finalize(), *blake3::hash(&bytes[..end]).as_bytes());
            at = end;
            if at == bytes.len() {
                break;
            }
        }
    }
}
