use bytes::Bytes;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use soma_types::{Digest, HashedBytes};

/// Bytes in a message: raw in binary encodings, hex in JSON traces.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Blob(pub Bytes);

impl From<Bytes> for Blob {
    fn from(b: Bytes) -> Self {
        Blob(b)
    }
}

impl From<Vec<u8>> for Blob {
    fn from(b: Vec<u8>) -> Self {
        Blob(Bytes::from(b))
    }
}

impl Serialize for Blob {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.serialize_str(&hex::encode(&self.0))
        } else {
            s.serialize_bytes(&self.0)
        }
    }
}

impl<'de> Deserialize<'de> for Blob {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            let s = String::deserialize(d)?;
            hex::decode(s)
                .map(Blob::from)
                .map_err(serde::de::Error::custom)
        } else {
            Bytes::deserialize(d).map(Blob)
        }
    }
}

/// A block's bytes with their digests, hashed once where they arrive (to
/// match them to a block asked for): the Verifier does not hash them
/// again. The digests are always those of the bytes: they are computed
/// here, and a trace holds the bytes alone, hashed again when read.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "Blob", into = "Blob")]
pub struct HashedBlob(HashedBytes);

impl HashedBlob {
    /// `bytes`, hashed: the digest of the whole, and in the same pass the
    /// digest a block's author signs (all but its signature).
    pub fn new(bytes: Bytes) -> Self {
        HashedBlob(HashedBytes::new(bytes))
    }

    /// The bytes.
    pub fn bytes(&self) -> &Bytes {
        self.0.bytes()
    }

    /// The digest of the bytes.
    pub fn digest(&self) -> Digest {
        self.0.digest()
    }

    /// The bytes with both their digests, for decoding as a block.
    pub fn hashed(&self) -> &HashedBytes {
        &self.0
    }
}

impl From<Blob> for HashedBlob {
    fn from(blob: Blob) -> Self {
        HashedBlob::new(blob.0)
    }
}

impl From<HashedBlob> for Blob {
    fn from(hashed: HashedBlob) -> Self {
        Blob(hashed.0.into_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hashed_blob_is_traced_as_its_bytes_and_hashed_again_when_read() {
        let hashed = HashedBlob::new(Bytes::from_static(b"a block's bytes"));
        assert_eq!(hashed.digest(), Digest::of(b"a block's bytes"));
        let json = serde_json::to_string(&hashed).unwrap();
        assert_eq!(
            json,
            serde_json::to_string(&Blob(hashed.bytes().clone())).unwrap()
        );
        let read: HashedBlob = serde_json::from_str(&json).unwrap();
        assert_eq!(read, hashed);
        // Other bytes under the same text cannot keep the old digest.
        let other: HashedBlob = serde_json::from_str(&json.replace("61", "62")).unwrap();
        assert_eq!(other.digest(), Digest::of(other.bytes()));
        assert_ne!(other.digest(), hashed.digest());
    }
}
