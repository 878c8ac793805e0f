use bytes::Bytes;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use soma_types::{Digest, HashedBytes, UnverifiedBlock};

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

/// A block decoded where it arrived, once its bytes matched a block asked
/// for, with the digests hashed there: the Verifier checks its rules and
/// signatures without decoding it again. A trace holds its bytes; reading
/// one decodes them again.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(try_from = "Blob", into = "Blob")]
pub struct DecodedBlock(UnverifiedBlock);

impl DecodedBlock {
    /// Decodes `hashed` (at most `limit` bytes), with the digests its
    /// signatures need if `signatures` (they are computed when asked for
    /// otherwise).
    pub fn decode(hashed: &HashedBlob, limit: usize, signatures: bool) -> soma_types::Result<Self> {
        UnverifiedBlock::decode_hashed_bytes(hashed.hashed().clone(), limit, signatures)
            .map(DecodedBlock)
    }

    /// The block.
    pub fn block(&self) -> &UnverifiedBlock {
        &self.0
    }

    /// The block, owned.
    pub fn into_block(self) -> UnverifiedBlock {
        self.0
    }
}

impl PartialEq for DecodedBlock {
    fn eq(&self, other: &Self) -> bool {
        self.0.serialized() == other.0.serialized()
    }
}

impl Eq for DecodedBlock {}

impl TryFrom<Blob> for DecodedBlock {
    type Error = soma_types::Error;
    fn try_from(blob: Blob) -> Result<Self, Self::Error> {
        UnverifiedBlock::decode_for(blob.0, usize::MAX, true).map(DecodedBlock)
    }
}

impl From<DecodedBlock> for Blob {
    fn from(block: DecodedBlock) -> Self {
        Blob(block.0.serialized().clone())
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

    #[test]
    fn a_decoded_block_is_traced_as_its_bytes_and_decoded_again_when_read() {
        let chain = soma_chain::ChainBuilder::new(soma_chain::ChainConfig::validators(4)).build(2);
        let block = chain.fetch_blocks(1..=1).remove(0);
        let hashed = HashedBlob::new(block.serialized().clone());
        let decoded = DecodedBlock::decode(&hashed, usize::MAX, true).unwrap();
        assert_eq!(decoded.block().reference(), block.reference());
        let json = serde_json::to_string(&decoded).unwrap();
        assert_eq!(
            json,
            serde_json::to_string(&Blob(block.serialized().clone())).unwrap()
        );
        let read: DecodedBlock = serde_json::from_str(&json).unwrap();
        assert_eq!(read, decoded);
        assert_eq!(read.block().reference(), block.reference());
        // Bytes that are no block fail to read.
        assert!(serde_json::from_str::<DecodedBlock>(r#""00ff""#).is_err());
    }
}
