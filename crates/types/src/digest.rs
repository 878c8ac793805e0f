use crate::fixed_bytes::fixed_bytes_newtype;

/// A blake3 digest: the identity of blocks, commits and the chain.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Digest(pub [u8; 32]);

fixed_bytes_newtype!(Digest, 32);

impl Digest {
    /// The all-zero digest.
    pub const ZERO: Digest = Digest([0; 32]);

    /// blake3 of `bytes`.
    pub fn of(bytes: &[u8]) -> Digest {
        Digest(*blake3::hash(bytes).as_bytes())
    }

    /// blake3 of the concatenation of `parts`, without copying them.
    pub fn of_parts(parts: &[&[u8]]) -> Digest {
        let mut hasher = blake3::Hasher::new();
        for part in parts {
            hasher.update(part);
        }
        Digest(*hasher.finalize().as_bytes())
    }

    /// The digest as bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}
