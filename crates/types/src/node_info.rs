use serde::{Deserialize, Serialize};

use crate::fixed_bytes::fixed_bytes_newtype;
use crate::{Digest, Domain, KeyPair, PublicKey, Result, Signature, codec};

/// A node's identity on the network: its ed25519 network public key.
///
/// Ordered by its bytes, as the array is.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PeerId(pub [u8; 32]);

fixed_bytes_newtype!(PeerId, 32);

impl Ord for PeerId {
    /// The bytes' order, compared as four big-endian words: peer ids key
    /// the ordered maps a large network's tables are made of, and a call
    /// to `memcmp` per comparison was a tenth of a simulation's time.
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        words(&self.0).cmp(&words(&other.0))
    }
}

impl PartialOrd for PeerId {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

fn words(bytes: &[u8; 32]) -> [u64; 4] {
    std::array::from_fn(|i| {
        let mut word = [0u8; 8];
        word.copy_from_slice(&bytes[i * 8..i * 8 + 8]);
        u64::from_be_bytes(word)
    })
}

impl PeerId {
    /// The public key this id stands for; fails if the bytes are not a
    /// valid curve point.
    pub fn public_key(&self) -> Result<PublicKey> {
        PublicKey::from_bytes(&self.0)
    }
}

impl From<PublicKey> for PeerId {
    fn from(key: PublicKey) -> Self {
        PeerId(key.to_bytes())
    }
}

/// Who may connect to a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Access {
    /// Anyone may connect; anonymous callers get read-only access.
    #[default]
    Public,
    /// Only allowlisted peers get past the handshake.
    Private,
}

/// What a node says about itself to its peers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// The node's network key.
    pub peer_id: PeerId,
    /// Addresses the node listens on, as `host:port`.
    pub addresses: Vec<String>,
    /// When the node made this info, in milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
    /// The node's access mode.
    pub access: Access,
}

/// A [`NodeInfo`] signed by the network key it names.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedNodeInfo {
    /// The info.
    pub info: NodeInfo,
    /// Signature by `info.peer_id` under [`Domain::NodeInfo`].
    pub signature: Signature,
}

impl SignedNodeInfo {
    /// Signs `info` with `key`, which should be the key of `info.peer_id`.
    pub fn sign(info: NodeInfo, key: &KeyPair) -> Self {
        let signature = key.sign(Domain::NodeInfo, &info);
        SignedNodeInfo { info, signature }
    }

    /// The digest that is signed.
    pub fn signing_digest(&self) -> Digest {
        Digest::of(&codec::encode(&self.info))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::PeerId;

    /// Ids that share a prefix of every length, so each word decides.
    fn pair() -> impl Strategy<Value = ([u8; 32], [u8; 32])> {
        (any::<[u8; 32]>(), any::<[u8; 32]>(), 0usize..=32).prop_map(|(a, mut b, shared)| {
            b[..shared].copy_from_slice(&a[..shared]);
            (a, b)
        })
    }

    proptest! {
        #[test]
        fn peer_ids_order_as_their_bytes((a, b) in pair()) {
            prop_assert_eq!(PeerId(a).cmp(&PeerId(b)), a.cmp(&b));
            prop_assert_eq!(PeerId(a).partial_cmp(&PeerId(b)), Some(a.cmp(&b)));
        }
    }
}
