//! The one rule that decides whether an ed25519 signature is accepted.
//!
//! A signature must get the same verdict whether it is checked alone or in a
//! batch, whatever the batch around it and however the batch is split across
//! threads: otherwise nodes disagree about the same block. The rule is
//! ZIP-215, the rule of the `ed25519-consensus` crate, whose single and batch
//! checks agree; weak keys are refused before it (docs/protocol.md states the
//! rule). It is written here on `curve25519-dalek`, whose vector backend is
//! faster than the serial one `ed25519-consensus` builds on, and the test
//! vectors in `tests/signature_rule.rs` hold both to the same verdicts.
//!
//! For a key encoding `A`, a signature `R || s` and a message `M`:
//! - `A` and `R` are any 32 bytes that decode to a curve point, canonical or
//!   not (a y-coordinate ≥ p, or x = 0 with the sign bit set, is accepted);
//! - `s` must be below the group order l;
//! - `k` = SHA-512(`R` || `A` || `M`) mod l, over the bytes as received;
//! - the cofactored equation \[8\](\[s\]B − R − \[k\]A) = 0 must hold.

use curve25519_dalek::constants::ED25519_BASEPOINT_POINT;
use curve25519_dalek::edwards::{CompressedEdwardsY, EdwardsPoint};
use curve25519_dalek::scalar::Scalar;
use curve25519_dalek::traits::{IsIdentity, VartimeMultiscalarMul};
use sha2::{Digest as _, Sha512};

use crate::{Error, Result};

/// A public key decoded for verification: its point, and whether it is weak.
///
/// Decoding costs about a third of a signature check and learning weakness a
/// scalar multiplication, so both happen once per key: committees keep their
/// members' keys prepared and a [`KeyCache`](crate::KeyCache) keeps others'.
#[derive(Clone, Copy)]
pub struct PreparedKey {
    /// The encoding as received: `k` is hashed over these bytes.
    bytes: [u8; 32],
    /// The negated point, as the equation uses it.
    minus_a: EdwardsPoint,
    weak: bool,
}

impl PreparedKey {
    /// Decodes `bytes` as a key; fails if they are not a curve point.
    pub fn new(bytes: &[u8; 32]) -> Result<Self> {
        let a = CompressedEdwardsY(*bytes)
            .decompress()
            .ok_or(Error::InvalidPublicKey)?;
        Ok(PreparedKey {
            bytes: *bytes,
            minus_a: -a,
            weak: a.is_small_order(),
        })
    }

    /// The key's bytes, as received.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.bytes
    }

    /// Whether the key is of small order: anyone can sign for it, so its
    /// signatures are refused.
    pub fn is_weak(&self) -> bool {
        self.weak
    }

    /// Checks one signature of `message` by this key under the rule of this
    /// module, refusing a weak key.
    pub fn verify(&self, message: &[u8], signature: &[u8; 64]) -> bool {
        !self.weak && self.equation_holds(message, signature)
    }

    /// The ZIP-215 check alone, without the weak-key refusal.
    pub(crate) fn equation_holds(&self, message: &[u8], signature: &[u8; 64]) -> bool {
        let Some((r, s)) = decode_signature(signature) else {
            return false;
        };
        let k = challenge(signature, &self.bytes, message);
        // [s]B − [k]A, then the difference from R with its torsion cleared.
        let expected = EdwardsPoint::vartime_double_scalar_mul_basepoint(&k, &self.minus_a, &s);
        (r - expected).mul_by_cofactor().is_identity()
    }
}

impl std::fmt::Debug for PreparedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PreparedKey({})", hex::encode(self.bytes))
    }
}

/// `R` as a point (any encoding) and `s` as a scalar below l.
fn decode_signature(signature: &[u8; 64]) -> Option<(EdwardsPoint, Scalar)> {
    let (r, s) = signature.split_at(32);
    let s = Option::from(Scalar::from_canonical_bytes(s.try_into().ok()?))?;
    let r = CompressedEdwardsY(r.try_into().ok()?).decompress()?;
    Some((r, s))
}

/// k = SHA-512(R || A || M) mod l.
fn challenge(signature: &[u8; 64], key: &[u8; 32], message: &[u8]) -> Scalar {
    let hash = Sha512::new()
        .chain_update(&signature[..32])
        .chain_update(key)
        .chain_update(message)
        .finalize();
    Scalar::from_bytes_mod_order_wide(&hash.into())
}

/// One signature of a batch: the index of its key in the batch's key list,
/// the message and the signature.
pub(crate) struct BatchEntry<'a> {
    pub(crate) key: usize,
    pub(crate) message: &'a [u8],
    pub(crate) signature: &'a [u8; 64],
}

/// Whether the ZIP-215 equation holds for every entry, checked as one
/// random linear combination: \[8\](Σ zᵢ(\[sᵢ\]B − Rᵢ − \[kᵢ\]Aᵢ)) = 0.
///
/// Each term is a multiple of the cofactor-cleared single equation, so a
/// batch whose entries all pass alone always passes, and one with a failing
/// entry passes with probability about 2⁻¹²⁸. Terms of one key share a
/// single coefficient (n + m points for n signatures by m keys). Weak keys
/// are not looked at here: callers refuse them first.
pub(crate) fn batch_equation_holds(keys: &[PreparedKey], entries: &[BatchEntry<'_>]) -> bool {
    let mut coefficients = Coefficients::new(keys, entries);
    let mut key_coefficients = vec![Scalar::ZERO; keys.len()];
    let mut r_coefficients = Vec::with_capacity(entries.len());
    let mut rs = Vec::with_capacity(entries.len());
    let mut b_coefficient = Scalar::ZERO;
    for entry in entries {
        let Some((r, s)) = decode_signature(entry.signature) else {
            return false;
        };
        let key = &keys[entry.key];
        let k = challenge(entry.signature, &key.bytes, entry.message);
        let z = coefficients.next();
        b_coefficient += z * s;
        key_coefficients[entry.key] += z * k;
        r_coefficients.push(-z);
        rs.push(r);
    }
    // [Σ zs]B + Σ [Σ zk](−A) + Σ [−z]R
    let sum = EdwardsPoint::vartime_multiscalar_mul(
        std::iter::once(&b_coefficient)
            .chain(&key_coefficients)
            .chain(&r_coefficients),
        std::iter::once(&ED25519_BASEPOINT_POINT)
            .chain(keys.iter().map(|k| &k.minus_a))
            .chain(&rs),
    );
    sum.mul_by_cofactor().is_identity()
}

/// The batch's random 128-bit coefficients, drawn from a hash of the whole
/// batch: no one can choose signatures knowing their coefficients, and the
/// verdict does not depend on any randomness of the machine.
struct Coefficients(blake3::OutputReader);

impl Coefficients {
    fn new(keys: &[PreparedKey], entries: &[BatchEntry<'_>]) -> Self {
        let mut hasher = blake3::Hasher::new_derive_key("soma-p2p ed25519 batch coefficients 1");
        for entry in entries {
            hasher.update(&keys[entry.key].bytes);
            hasher.update(entry.signature);
            hasher.update(&(entry.message.len() as u64).to_le_bytes());
            hasher.update(entry.message);
        }
        Coefficients(hasher.finalize_xof())
    }

    fn next(&mut self) -> Scalar {
        let mut z = [0u8; 16];
        self.0.fill(&mut z);
        Scalar::from(u128::from_le_bytes(z))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use curve25519_dalek::constants::EIGHT_TORSION;

    /// A message, its signature and the index of its key.
    type Signed = ([u8; 48], [u8; 64], usize);

    /// Signatures by keys of prime and of mixed order, whose nonces carry
    /// torsion components of every order: each passes the single check.
    fn signatures() -> (Vec<PreparedKey>, Vec<Signed>) {
        let secrets: Vec<Scalar> = (1..=3u8)
            .map(|i| Scalar::from_bytes_mod_order_wide(&[i; 64]))
            .collect();
        let mut keys: Vec<PreparedKey> = secrets
            .iter()
            .map(|a| PreparedKey::new(&(ED25519_BASEPOINT_POINT * a).compress().0).unwrap())
            .collect();
        let mixed = ED25519_BASEPOINT_POINT * secrets[0] + EIGHT_TORSION[3];
        keys.push(PreparedKey::new(&mixed.compress().0).unwrap());
        let mut out = Vec::new();
        for i in 0..24u8 {
            let key = usize::from(i % 4);
            let a = secrets[key % 3];
            let r = Scalar::from(u64::from(i) + 100);
            let nonce = (ED25519_BASEPOINT_POINT * r + EIGHT_TORSION[usize::from(i % 8)])
                .compress()
                .0;
            let mut message = [0u8; 48];
            message[0] = i;
            let mut signature = [0u8; 64];
            signature[..32].copy_from_slice(&nonce);
            let k = challenge(&signature, &keys[key].bytes, &message);
            signature[32..].copy_from_slice(&(r + k * a).to_bytes());
            assert!(keys[key].verify(&message, &signature));
            out.push((message, signature, key));
        }
        (keys, out)
    }

    fn holds(keys: &[PreparedKey], signatures: &[Signed]) -> bool {
        let entries: Vec<BatchEntry<'_>> = signatures
            .iter()
            .map(|(message, signature, key)| BatchEntry {
                key: *key,
                message,
                signature,
            })
            .collect();
        batch_equation_holds(keys, &entries)
    }

    /// The batch equation itself must pass whatever signatures that pass
    /// alone it holds: the single check that names a culprit would hide a
    /// batch equation refusing good batches, at the cost of a check per
    /// signature.
    #[test]
    fn batch_equation_holds_for_signatures_that_pass_alone() {
        let (keys, signatures) = signatures();
        assert!(holds(&keys, &signatures));
        for n in 1..signatures.len() {
            assert!(holds(&keys, &signatures[..n]), "first {n}");
            assert!(holds(&keys, &signatures[n..]), "from {n}");
        }
        for bad in [0, 5, 23] {
            let mut broken = signatures.clone();
            broken[bad].0[47] ^= 1;
            assert!(!holds(&keys, &broken), "broken at {bad}");
            assert!(!keys[broken[bad].2].verify(&broken[bad].0, &broken[bad].1));
        }
    }
}
