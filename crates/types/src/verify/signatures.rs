use std::sync::Arc;

use crate::signature_rule::{BatchEntry, batch_equation_holds};
use crate::{
    Digest, Domain, Error, KeyCache, PreparedKey, PublicKey, Result, Signature, SignedItem,
};

/// Signatures collected for one batch verification.
///
/// Push every signature of a request, then call [`SignatureBatch::verify`].
/// Keys that are not points and weak (small-order) keys are refused before
/// any curve arithmetic. Every signature is judged by the one acceptance
/// rule of docs/protocol.md (ZIP-215): the batch equation and the single
/// check accept exactly the same signatures, so the verdict does not depend
/// on the batch around a signature or on how the batch is split. A batch
/// that fails is re-checked one signature at a time, so the error names the
/// first bad item.
#[derive(Default, Clone)]
pub struct SignatureBatch {
    messages: Vec<[u8; 48]>,
    signatures: Vec<[u8; 64]>,
    keys: Vec<PreparedKey>,
    items: Vec<SignedItem>,
    /// Positions whose key is not a valid point (a placeholder key is kept
    /// there so the vectors stay aligned).
    invalid: Vec<usize>,
    /// Positions whose key is weak (of small order), found when pushed.
    weak: Vec<usize>,
    /// Where decompressed keys are looked up first, if set, and whether
    /// keys not held are added to it.
    cache: Option<(Arc<KeyCache>, Fill)>,
}

/// Whether a batch adds the keys it decompresses to its cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fill {
    /// Keys not held are kept (input already matched to what was asked).
    Yes,
    /// Keys not held are decompressed and dropped (input from anyone, not
    /// yet authenticated: it must not push out the keys of verified work).
    No,
}

impl SignatureBatch {
    /// An empty batch with room for `n` signatures.
    pub fn with_capacity(n: usize) -> Self {
        SignatureBatch {
            messages: Vec::with_capacity(n),
            signatures: Vec::with_capacity(n),
            keys: Vec::with_capacity(n),
            items: Vec::with_capacity(n),
            invalid: Vec::new(),
            weak: Vec::new(),
            cache: None,
        }
    }

    /// An empty batch that decompresses keys through `cache`, adding the
    /// keys it lacks if `fill` says so.
    pub fn with_cache(n: usize, cache: Arc<KeyCache>, fill: Fill) -> Self {
        SignatureBatch {
            cache: Some((cache, fill)),
            ..Self::with_capacity(n)
        }
    }

    /// Adds the signature `signature` by `key` over `domain` and `digest`;
    /// `item` names it in errors.
    pub fn push(
        &mut self,
        key: &PublicKey,
        domain: Domain,
        digest: &Digest,
        signature: &Signature,
        item: SignedItem,
    ) {
        // Weakness is a property of the key: with a cache it is computed
        // once per key, not once per signature.
        let key = match &self.cache {
            Some((cache, Fill::Yes)) => cache.get(key),
            Some((cache, Fill::No)) => cache.peek(key),
            None => key.prepare(),
        };
        let key = key.unwrap_or_else(|_| {
            self.invalid.push(self.items.len());
            placeholder_key()
        });
        self.push_key(&key, domain, digest, signature, item);
    }

    /// Like [`SignatureBatch::push`], with a key already decompressed (the
    /// committee keeps its members' keys so). A weak key fails the batch.
    pub fn push_key(
        &mut self,
        key: &PreparedKey,
        domain: Domain,
        digest: &Digest,
        signature: &Signature,
        item: SignedItem,
    ) {
        if key.is_weak() {
            self.weak.push(self.items.len());
        }
        self.messages.push(domain.message(digest));
        self.signatures.push(signature.0);
        self.keys.push(*key);
        self.items.push(item);
    }

    /// Each signature's key (as received), signed message and signature,
    /// in push order: for checking the same signatures another way (the
    /// benchmark compares this rule with plain ed25519 batch verification).
    pub fn entries(&self) -> impl Iterator<Item = (&[u8; 32], &[u8; 48], &[u8; 64])> {
        self.keys
            .iter()
            .zip(&self.messages)
            .zip(&self.signatures)
            .map(|((k, m), s)| (k.as_bytes(), m, s))
    }

    /// Number of signatures in the batch.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Moves the signatures of `other` into this batch.
    pub fn append(&mut self, mut other: SignatureBatch) {
        self.messages.append(&mut other.messages);
        self.signatures.append(&mut other.signatures);
        let base = self.items.len();
        self.invalid.extend(other.invalid.iter().map(|i| i + base));
        self.weak.extend(other.weak.iter().map(|i| i + base));
        self.keys.append(&mut other.keys);
        self.items.append(&mut other.items);
    }

    /// Splits the batch into at most `parts` batches of near-equal size, for
    /// checking on several threads.
    pub fn split(self, parts: usize) -> Vec<SignatureBatch> {
        let parts = parts.clamp(1, self.len().max(1));
        let chunk = self.len().div_ceil(parts).max(1);
        let mut out = Vec::with_capacity(parts);
        let mut rest = self;
        while rest.len() > chunk {
            let (head_invalid, tail_invalid) = rest.invalid.iter().partition(|&&i| i < chunk);
            rest.invalid = head_invalid;
            let (head_weak, tail_weak) = rest.weak.iter().partition(|&&i| i < chunk);
            rest.weak = head_weak;
            let tail = SignatureBatch {
                messages: rest.messages.split_off(chunk),
                signatures: rest.signatures.split_off(chunk),
                keys: rest.keys.split_off(chunk),
                items: rest.items.split_off(chunk),
                invalid: tail_invalid.into_iter().map(|i: usize| i - chunk).collect(),
                weak: tail_weak.into_iter().map(|i: usize| i - chunk).collect(),
                cache: rest.cache.clone(),
            };
            out.push(rest);
            rest = tail;
        }
        out.push(rest);
        out
    }

    /// Checks every signature; the error names the first bad one.
    pub fn verify(&self) -> Result<()> {
        match self.verify_whole() {
            // Under this rule a batch fails only if one of its signatures
            // fails alone, so the search below always finds the culprit.
            Err(Error::BadSignatures(_)) => match (0..self.len()).find(|&i| !self.verify_one(i)) {
                Some(i) => Err(Error::BadSignature(self.items[i].clone())),
                None => Ok(()),
            },
            checked => checked,
        }
    }

    /// Checks every signature as [`SignatureBatch::verify`] does, but does
    /// not search a failed batch for the bad signature: for data refused
    /// whole whichever it is ([`Error::BadSignatures`]).
    pub fn verify_whole(&self) -> Result<()> {
        if let Some(&i) = self.invalid.iter().min() {
            return Err(Error::InvalidKey(self.items[i].clone()));
        }
        if let Some(&i) = self.weak.iter().min() {
            return Err(Error::WeakKey(self.items[i].clone()));
        }
        if self.is_empty() || self.batch_passes() {
            return Ok(());
        }
        Err(Error::BadSignatures(self.len()))
    }

    /// Checks every signature and reports each one's result, in push order.
    pub fn verify_each(&self) -> Vec<Result<()>> {
        if self.verify().is_ok() {
            return vec![Ok(()); self.len()];
        }
        (0..self.len())
            .map(|i| {
                if self.invalid.contains(&i) {
                    Err(Error::InvalidKey(self.items[i].clone()))
                } else if self.weak.contains(&i) {
                    Err(Error::WeakKey(self.items[i].clone()))
                } else if self.verify_one(i) {
                    Ok(())
                } else {
                    Err(Error::BadSignature(self.items[i].clone()))
                }
            })
            .collect()
    }

    /// The batch equation over all signatures; keys were checked already.
    fn batch_passes(&self) -> bool {
        // Signatures by one key share a term of the equation, so each
        // distinct key enters it once.
        let mut distinct: Vec<PreparedKey> = Vec::new();
        let mut index = std::collections::HashMap::with_capacity(self.len());
        let entries: Vec<BatchEntry<'_>> = (0..self.len())
            .map(|i| {
                let key = *index.entry(self.keys[i].as_bytes()).or_insert_with(|| {
                    distinct.push(self.keys[i]);
                    distinct.len() - 1
                });
                BatchEntry {
                    key,
                    message: &self.messages[i],
                    signature: &self.signatures[i],
                }
            })
            .collect();
        batch_equation_holds(&distinct, &entries)
    }

    /// The single check of the same rule (weak keys were refused already).
    fn verify_one(&self, i: usize) -> bool {
        self.keys[i].equation_holds(&self.messages[i], &self.signatures[i])
    }
}

/// A valid point standing in for a key that is not one; the position is
/// marked invalid, so its signature is never accepted.
fn placeholder_key() -> PreparedKey {
    let mut identity = [0u8; 32];
    identity[0] = 1;
    PreparedKey::new(&identity).expect("the identity is a valid point")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::KeyPair;

    fn batch(n: usize, bad: Option<usize>) -> SignatureBatch {
        let mut b = SignatureBatch::default();
        for i in 0..n {
            let key = KeyPair::from_seed([i as u8 + 1; 32]);
            let digest = Digest::of(&[i as u8]);
            let mut sig = key.sign_digest(Domain::Block, &digest);
            if bad == Some(i) {
                sig.0[0] ^= 1;
            }
            b.push(
                &key.public(),
                Domain::Block,
                &digest,
                &sig,
                SignedItem::LooseTransaction(i as u32),
            );
        }
        b
    }

    #[test]
    fn good_batch_passes() {
        assert_eq!(batch(10, None).verify(), Ok(()));
        assert_eq!(SignatureBatch::default().verify(), Ok(()));
    }

    #[test]
    fn bad_signature_is_named() {
        assert_eq!(
            batch(10, Some(7)).verify(),
            Err(Error::BadSignature(SignedItem::LooseTransaction(7)))
        );
        let each = batch(4, Some(2)).verify_each();
        assert_eq!(each.iter().filter(|r| r.is_err()).count(), 1);
        assert!(each[2].is_err());
    }

    #[test]
    fn weak_key_is_refused_through_the_cache_and_after_a_split() {
        let mut identity = [0u8; 32];
        identity[0] = 1;
        let weak = PublicKey::from_bytes(&identity).unwrap();
        let cache = Arc::new(KeyCache::new(8));
        for _ in 0..2 {
            // The second time the key's weakness comes from the cache.
            let mut b = SignatureBatch::with_cache(4, cache.clone(), Fill::Yes);
            b.append(batch(3, None));
            b.push(
                &weak,
                Domain::Block,
                &Digest::ZERO,
                &Signature([1; 64]),
                SignedItem::LooseTransaction(9),
            );
            assert_eq!(
                b.verify(),
                Err(Error::WeakKey(SignedItem::LooseTransaction(9)))
            );
            let parts = b.split(2);
            assert_eq!(parts[0].verify(), Ok(()));
            assert_eq!(
                parts[1].verify(),
                Err(Error::WeakKey(SignedItem::LooseTransaction(9)))
            );
        }
        assert_eq!(cache.get(&weak).map(|k| k.is_weak()), Ok(true));
    }

    #[test]
    fn a_batch_that_does_not_fill_its_cache_reads_it_and_leaves_it_as_it_was() {
        let mut identity = [0u8; 32];
        identity[0] = 1;
        let weak = PublicKey::from_bytes(&identity).unwrap();
        let held = KeyPair::from_seed([40; 32]).public();
        let cache = Arc::new(KeyCache::new(8));
        cache.get(&held).unwrap();
        let fresh = KeyPair::from_seed([41; 32]);
        let mut b = SignatureBatch::with_cache(3, cache.clone(), Fill::No);
        // A valid signature by a key not held, one by the held key (whose
        // signature is wrong), and a weak key: each judged as without a
        // cache, and only the key held before is held after.
        let digest = Digest::of(b"message");
        let signatures = [
            (
                fresh.public(),
                fresh.sign_digest(Domain::Transaction, &digest),
            ),
            (held, Signature([7; 64])),
            (weak, Signature([1; 64])),
        ];
        for (i, (key, signature)) in signatures.iter().enumerate() {
            let item = SignedItem::LooseTransaction(i as u32);
            b.push(key, Domain::Transaction, &digest, signature, item);
        }
        let each = b.verify_each();
        assert_eq!(each[0], Ok(()));
        assert_eq!(
            each[1],
            Err(Error::BadSignature(SignedItem::LooseTransaction(1)))
        );
        assert_eq!(
            each[2],
            Err(Error::WeakKey(SignedItem::LooseTransaction(2)))
        );
        assert_eq!(cache.len(), 1);
        assert!(cache.peek(&fresh.public()).is_ok());
        assert_eq!(cache.len(), 1, "a key peeked at is not kept");
    }

    #[test]
    fn weak_key_is_refused() {
        // The identity point: a small-order key that validates any signature
        // whose R is also of small order.
        let mut identity = [0u8; 32];
        identity[0] = 1;
        let weak = PublicKey::from_bytes(&identity).unwrap();
        assert!(weak.is_weak());
        let mut sig = [0u8; 64];
        sig[0] = 1;
        let mut b = SignatureBatch::default();
        b.push(
            &weak,
            Domain::Block,
            &Digest::ZERO,
            &Signature(sig),
            SignedItem::LooseTransaction(0),
        );
        assert_eq!(
            b.verify(),
            Err(Error::WeakKey(SignedItem::LooseTransaction(0)))
        );
    }

    #[test]
    fn key_that_is_not_a_point_is_named() {
        // y = 2 is not the y-coordinate of any point on the curve.
        let mut bytes = [0u8; 32];
        bytes[0] = 2;
        assert!(PublicKey::from_bytes(&bytes).is_err());
        let key: PublicKey = crate::codec::decode(&crate::codec::encode(&bytes[..]), 64).unwrap();
        let mut b = batch(3, None);
        b.push(
            &key,
            Domain::Block,
            &Digest::ZERO,
            &Signature([0; 64]),
            SignedItem::LooseTransaction(3),
        );
        assert_eq!(
            b.verify(),
            Err(Error::InvalidKey(SignedItem::LooseTransaction(3)))
        );
        let each = b.verify_each();
        assert!(each[..3].iter().all(Result::is_ok));
        assert_eq!(
            each[3],
            Err(Error::InvalidKey(SignedItem::LooseTransaction(3)))
        );
        let parts = b.split(2);
        assert!(parts[0].verify().is_ok());
        assert_eq!(
            parts[1].verify(),
            Err(Error::InvalidKey(SignedItem::LooseTransaction(3)))
        );
    }

    #[test]
    fn split_keeps_every_signature() {
        let parts = batch(10, Some(9)).split(3);
        assert_eq!(parts.len(), 3);
        assert_eq!(parts.iter().map(SignatureBatch::len).sum::<usize>(), 10);
        assert!(parts[2].verify().is_err());
        assert!(parts[0].verify().is_ok());
        assert_eq!(batch(2, None).split(8).len(), 2);
    }
}
