//! ed25519 keys and domain-separated signing.

use ed25519_dalek::{Signer, SigningKey};
use serde::Serialize;

use crate::fixed_bytes::fixed_bytes_newtype;
use crate::{Digest, PreparedKey, Result, codec};

/// What a signature is for. The tag is prepended to the digest being signed,
/// so a signature made for one kind of object never verifies as another.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Domain {
    /// A block, signed by its author's protocol key.
    Block,
    /// A transaction, signed by its sender.
    Transaction,
    /// A node's self-description, signed by its network key.
    NodeInfo,
    /// The binding of a TLS certificate key to a network key.
    TlsBinding,
}

impl Domain {
    /// The tag bytes of this domain.
    pub const fn tag(self) -> &'static [u8; 16] {
        match self {
            Domain::Block => b"soma-p2p/block/1",
            Domain::Transaction => b"soma-p2p/tx/1\0\0\0",
            Domain::NodeInfo => b"soma-p2p/node/1\0",
            Domain::TlsBinding => b"soma-p2p/tls/1\0\0",
        }
    }

    /// The exact bytes signed for an object whose encoding has `digest`.
    pub fn message(self, digest: &Digest) -> [u8; 48] {
        let mut m = [0u8; 48];
        m[..16].copy_from_slice(self.tag());
        m[16..].copy_from_slice(digest.as_bytes());
        m
    }
}

/// An ed25519 public key, as its 32 compressed bytes.
///
/// Decoding does not decompress the curve point: that costs microseconds and
/// is only needed to check a signature, so it happens then, and a key that
/// is not a valid point fails the check.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PublicKey([u8; 32]);

fixed_bytes_newtype!(PublicKey, 32);

impl PublicKey {
    /// Parses 32 bytes as a public key, checking they are a valid point.
    pub fn from_bytes(bytes: &[u8; 32]) -> Result<Self> {
        let key = PublicKey(*bytes);
        key.prepare()?;
        Ok(key)
    }

    /// 32 bytes as a key, unchecked, as decoding takes them: whether they
    /// are a valid point is learnt when a signature is checked with it.
    pub(crate) fn from_raw(bytes: [u8; 32]) -> Self {
        PublicKey(bytes)
    }

    /// The compressed key bytes.
    pub fn to_bytes(&self) -> [u8; 32] {
        self.0
    }

    /// The compressed key bytes, borrowed.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The decompressed key and its weakness, for verification.
    pub fn prepare(&self) -> Result<PreparedKey> {
        PreparedKey::new(&self.0)
    }

    /// Whether the key is of small order (anyone can sign for it) or not a
    /// valid point at all.
    pub fn is_weak(&self) -> bool {
        self.prepare().map_or(true, |k| k.is_weak())
    }

    /// Checks a signature over `domain`'s tag and `digest` under the
    /// protocol's one acceptance rule (ZIP-215, weak keys refused), the same
    /// rule [`SignatureBatch`](crate::verify::SignatureBatch) applies.
    pub fn verify(&self, domain: Domain, digest: &Digest, signature: &Signature) -> bool {
        self.prepare()
            .is_ok_and(|key| key.verify(&domain.message(digest), &signature.0))
    }
}

/// An ed25519 signature (64 bytes).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Signature(pub [u8; 64]);

fixed_bytes_newtype!(Signature, 64);

/// A signing key pair.
#[derive(Clone)]
pub struct KeyPair(SigningKey);

impl KeyPair {
    /// The key pair whose secret is `seed`. Deterministic: the same seed
    /// always gives the same keys.
    pub fn from_seed(seed: [u8; 32]) -> Self {
        KeyPair(SigningKey::from_bytes(&seed))
    }

    /// A fresh key pair from the operating system's randomness.
    pub fn generate() -> Self {
        Self::from_seed(rand::random())
    }

    /// The secret seed, for writing a key file.
    pub fn secret_bytes(&self) -> [u8; 32] {
        self.0.to_bytes()
    }

    /// The public half.
    pub fn public(&self) -> PublicKey {
        PublicKey(self.0.verifying_key().to_bytes())
    }

    /// Signs `domain`'s tag followed by `digest`.
    pub fn sign_digest(&self, domain: Domain, digest: &Digest) -> Signature {
        Signature(self.0.sign(&domain.message(digest)).to_bytes())
    }

    /// Signs the encoding of `value` under `domain`.
    pub fn sign<T: Serialize + ?Sized>(&self, domain: Domain, value: &T) -> Signature {
        self.sign_digest(domain, &Digest::of(&codec::encode(value)))
    }
}

impl std::fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyPair({})", self.public())
    }
}

/// A bounded cache of decompressed keys, shared by threads that verify.
///
/// Decompressing a key costs about a third of checking a signature, and the
/// same senders and authors sign again and again. When the cache is full it
/// is emptied and refilled, which keeps it bounded without bookkeeping.
#[derive(Debug)]
pub struct KeyCache {
    /// Each key decompressed, with whether it is weak (of small order).
    keys: std::sync::RwLock<std::collections::HashMap<[u8; 32], PreparedKey>>,
    capacity: usize,
}

impl KeyCache {
    /// A cache holding at most `capacity` keys.
    pub fn new(capacity: usize) -> Self {
        KeyCache {
            keys: std::sync::RwLock::new(std::collections::HashMap::with_capacity(
                capacity.min(1 << 16),
            )),
            capacity,
        }
    }

    /// The decompressed form of `key` with its weakness, from the cache or
    /// computed: both are computed once per key.
    pub fn get(&self, key: &PublicKey) -> Result<PreparedKey> {
        if let Some(k) = self.held(key) {
            return Ok(k);
        }
        let k = key.prepare()?;
        if let Ok(mut m) = self.keys.write() {
            if m.len() >= self.capacity {
                m.clear();
            }
            m.insert(key.to_bytes(), k);
        }
        Ok(k)
    }

    /// Like [`KeyCache::get`], but a key not held is decompressed without
    /// being kept: for keys from input not yet authenticated, which must
    /// not be able to push out the keys of verified work.
    pub fn peek(&self, key: &PublicKey) -> Result<PreparedKey> {
        match self.held(key) {
            Some(k) => Ok(k),
            None => key.prepare(),
        }
    }

    fn held(&self, key: &PublicKey) -> Option<PreparedKey> {
        self.keys
            .read()
            .ok()
            .and_then(|m| m.get(key.as_bytes()).copied())
    }

    /// Number of keys held.
    pub fn len(&self) -> usize {
        self.keys.read().map_or(0, |m| m.len())
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Error;

    #[test]
    fn key_cache_stays_bounded_and_refuses_invalid_points() {
        let cache = KeyCache::new(3);
        for i in 0..10u8 {
            let key = KeyPair::from_seed([i; 32]).public();
            assert_eq!(cache.get(&key).unwrap().as_bytes(), key.as_bytes());
            assert!(cache.len() <= 3);
        }
        let mut not_a_point = [0u8; 32];
        not_a_point[0] = 2;
        let bad: PublicKey =
            crate::codec::decode(&crate::codec::encode(&not_a_point[..]), 64).unwrap();
        assert_eq!(cache.get(&bad).err(), Some(Error::InvalidPublicKey));
    }
}
