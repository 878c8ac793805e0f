use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::{Digest, Domain, KeyPair, PublicKey, Signature, codec};

/// A transaction, signed by its sender.
///
/// The signature covers the transaction's data (sender, nonce, payload) under
/// [`Domain::Transaction`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transaction {
    /// The sender's public key.
    pub sender: PublicKey,
    /// Sender-chosen sequence number.
    pub nonce: u64,
    /// Opaque application data. In a block decoded from received bytes it
    /// is a slice of the block's bytes, which may share the buffer the
    /// block arrived in (up to a response's size): copy it
    /// (`Bytes::copy_from_slice`) to keep it long after the block.
    pub payload: Bytes,
    /// The sender's signature over the fields above.
    pub signature: Signature,
}

impl Transaction {
    /// A transaction signed by `sender`.
    pub fn new(sender: &KeyPair, nonce: u64, payload: Bytes) -> Self {
        let public = sender.public();
        let digest = signing_digest(&public, nonce, &payload);
        Transaction {
            sender: public,
            nonce,
            payload,
            signature: sender.sign_digest(Domain::Transaction, &digest),
        }
    }

    /// The digest the sender signs.
    pub fn signing_digest(&self) -> Digest {
        signing_digest(&self.sender, self.nonce, &self.payload)
    }
}

fn signing_digest(sender: &PublicKey, nonce: u64, payload: &Bytes) -> Digest {
    Digest::of(&codec::encode(&(sender, nonce, payload)))
}
