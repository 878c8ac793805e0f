use serde::{Deserialize, Serialize};

use crate::fixed_bytes::fixed_bytes_newtype;
use crate::{Digest, Domain, KeyPair, PublicKey, Result, Signature, codec};

/// A node's identity on the network: its ed25519 network public key.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PeerId(pub [u8; 32]);

fixed_bytes_newtype!(PeerId, 32);

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
