//! The signature acceptance rule (docs/protocol.md, "Signatures") on crafted
//! edge cases: every path of `SignatureBatch` and `PublicKey::verify` must
//! give each one the same verdict, and that verdict must be the one of the
//! ZIP-215 reference crate, `ed25519-consensus`, except where our rule
//! refuses a weak key first.

use curve25519_dalek::constants::{ED25519_BASEPOINT_POINT, EIGHT_TORSION};
use curve25519_dalek::edwards::{CompressedEdwardsY, EdwardsPoint};
use curve25519_dalek::scalar::Scalar;
use sha2::{Digest as _, Sha512};
use soma_types::verify::{Fill, SignatureBatch};
use soma_types::{Digest, Domain, Error, KeyCache, KeyPair, PublicKey, Signature, SignedItem};
use std::sync::Arc;

/// What the rule must say about a vector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    Accept,
    BadSignature,
    WeakKey,
    InvalidKey,
}

/// One crafted signature and its expected verdict.
#[derive(Clone, Debug)]
struct Vector {
    name: &'static str,
    key: [u8; 32],
    digest: Digest,
    signature: [u8; 64],
    verdict: Verdict,
    /// Whether plain ZIP-215 (the reference crate, which has no weak-key
    /// refusal) accepts it.
    zip215: bool,
}

/// The group order l, little-endian.
const L: [u8; 32] = [
    0xed, 0xd3, 0xf5, 0x5c, 0x1a, 0x63, 0x12, 0x58, 0xd6, 0x9c, 0xf7, 0xa2, 0xde, 0xf9, 0xde, 0x14,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
];

/// The encoding of y = p + `y` with sign bit `sign`: non-canonical, since
/// y ≥ p.
fn non_canonical_y(y: u8, sign: bool) -> [u8; 32] {
    let mut bytes = [0xff; 32];
    bytes[0] = 0xed + y;
    bytes[31] = if sign { 0xff } else { 0x7f };
    bytes
}

/// The identity point with the sign bit set although x = 0.
fn negative_zero_identity() -> [u8; 32] {
    let mut bytes = [0u8; 32];
    bytes[0] = 1;
    bytes[31] = 0x80;
    bytes
}

/// y = 2 is the y-coordinate of no curve point.
fn not_a_point() -> [u8; 32] {
    let mut bytes = [0u8; 32];
    bytes[0] = 2;
    bytes
}

fn secret(seed: u8) -> Scalar {
    Scalar::from_bytes_mod_order_wide(&[seed; 64])
}

fn message(digest: &Digest) -> [u8; 48] {
    Domain::Block.message(digest)
}

/// k = SHA-512(R || A || M) mod l.
fn challenge(r: &[u8; 32], key: &[u8; 32], digest: &Digest) -> Scalar {
    let hash = Sha512::new()
        .chain_update(r)
        .chain_update(key)
        .chain_update(message(digest))
        .finalize();
    Scalar::from_bytes_mod_order_wide(&hash.into())
}

/// A signature with nonce encoding `r_bytes` whose prime-order part is
/// [`r`]B, by the key encoded `key` whose prime-order part is [`a`]B:
/// s = r + k·a.
fn sign_raw(a: Scalar, key: [u8; 32], r: Scalar, r_bytes: [u8; 32], digest: &Digest) -> [u8; 64] {
    let s = r + challenge(&r_bytes, &key, digest) * a;
    join(r_bytes, s.to_bytes())
}

fn join(r: [u8; 32], s: [u8; 32]) -> [u8; 64] {
    let mut signature = [0u8; 64];
    signature[..32].copy_from_slice(&r);
    signature[32..].copy_from_slice(&s);
    signature
}

fn point(bytes: [u8; 32]) -> EdwardsPoint {
    CompressedEdwardsY(bytes).decompress().unwrap()
}

fn vectors() -> Vec<Vector> {
    let digest = Digest::of(b"edge case");
    let a = secret(1);
    let key = (ED25519_BASEPOINT_POINT * a).compress().0;
    let r = secret(2);
    let nonce = (ED25519_BASEPOINT_POINT * r).compress().0;
    let valid = sign_raw(a, key, r, nonce, &digest);
    let torsion8 = EIGHT_TORSION[1];
    let mut out = vec![
        Vector {
            name: "valid",
            key,
            digest,
            signature: valid,
            verdict: Verdict::Accept,
            zip215: true,
        },
        Vector {
            name: "valid, made by the signing key pair",
            key: KeyPair::from_seed([3; 32]).public().to_bytes(),
            digest,
            signature: KeyPair::from_seed([3; 32])
                .sign_digest(Domain::Block, &digest)
                .0,
            verdict: Verdict::Accept,
            zip215: true,
        },
        Vector {
            name: "signature of another message",
            key,
            digest: Digest::of(b"another"),
            signature: valid,
            verdict: Verdict::BadSignature,
            zip215: false,
        },
        Vector {
            name: "signature of another domain",
            key: KeyPair::from_seed([3; 32]).public().to_bytes(),
            digest,
            signature: KeyPair::from_seed([3; 32])
                .sign_digest(Domain::Transaction, &digest)
                .0,
            verdict: Verdict::BadSignature,
            zip215: false,
        },
    ];
    // (a) R = [r]B + T for T of order 8, 4 and 2: the cofactored equation
    // holds, strict verification refused it, the old batch equation
    // accepted it for some batches only.
    for (name, t) in [
        ("R with a torsion component of order 8", EIGHT_TORSION[1]),
        ("R with a torsion component of order 4", EIGHT_TORSION[2]),
        ("R with a torsion component of order 2", EIGHT_TORSION[4]),
    ] {
        let nonce = (ED25519_BASEPOINT_POINT * r + t).compress().0;
        out.push(Vector {
            name,
            key,
            digest,
            signature: sign_raw(a, key, r, nonce, &digest),
            verdict: Verdict::Accept,
            zip215: true,
        });
    }
    // (b) A' = [a]B + T, of mixed order (not weak), signing with a.
    let mixed = (ED25519_BASEPOINT_POINT * a + torsion8).compress().0;
    assert!(!point(mixed).is_small_order());
    out.push(Vector {
        name: "key of mixed order",
        key: mixed,
        digest,
        signature: sign_raw(a, mixed, r, nonce, &digest),
        verdict: Verdict::Accept,
        zip215: true,
    });
    // (c) R encoded non-canonically: the identity as y = p + 1, and with
    // its sign bit set; r = 0 so s = k·a.
    for (name, nonce) in [
        (
            "R the identity encoded as y = p + 1",
            non_canonical_y(1, false),
        ),
        (
            "R the identity encoded with x = -0",
            negative_zero_identity(),
        ),
    ] {
        assert_ne!(point(nonce).compress().0, nonce, "{name} is non-canonical");
        out.push(Vector {
            name,
            key,
            digest,
            signature: sign_raw(a, key, Scalar::ZERO, nonce, &digest),
            verdict: Verdict::Accept,
            zip215: true,
        });
    }
    let mut wrong = sign_raw(a, key, Scalar::ZERO, non_canonical_y(1, false), &digest);
    wrong[32] ^= 1;
    out.push(Vector {
        name: "R non-canonical, s wrong",
        key,
        digest,
        signature: wrong,
        verdict: Verdict::BadSignature,
        zip215: false,
    });
    // (c) A encoded non-canonically: a point of large order (y = p + 3)
    // whose secret no one knows, and the identity (y = p + 1), weak.
    let large = non_canonical_y(3, false);
    assert!(!point(large).is_small_order());
    assert_ne!(point(large).compress().0, large);
    out.push(Vector {
        name: "key non-canonical, of large order",
        key: large,
        digest,
        signature: valid,
        verdict: Verdict::BadSignature,
        zip215: false,
    });
    let identity = EdwardsPoint::default().compress().0;
    out.push(Vector {
        name: "key the identity encoded as y = p + 1",
        key: non_canonical_y(1, false),
        digest,
        signature: join(identity, [0; 32]),
        verdict: Verdict::WeakKey,
        zip215: true,
    });
    // (d) s + l: the equation holds modulo l, but s must be below l.
    let mut unreduced = [0u8; 32];
    let mut carry = 0u16;
    for i in 0..32 {
        let sum = u16::from(valid[32 + i]) + u16::from(L[i]) + carry;
        unreduced[i] = sum as u8;
        carry = sum >> 8;
    }
    assert_eq!(carry, 0);
    assert_eq!(
        Scalar::from_bytes_mod_order(unreduced).to_bytes()[..],
        valid[32..]
    );
    out.push(Vector {
        name: "s not reduced (s + l)",
        key,
        digest,
        signature: join(nonce, unreduced),
        verdict: Verdict::BadSignature,
        zip215: false,
    });
    // (e) small-order keys: with R of small order and s = 0 the equation
    // holds for any message, which is why such keys are refused.
    out.push(Vector {
        name: "key of order 8",
        key: torsion8.compress().0,
        digest,
        signature: join(EIGHT_TORSION[2].compress().0, [0; 32]),
        verdict: Verdict::WeakKey,
        zip215: true,
    });
    out.push(Vector {
        name: "key the identity",
        key: identity,
        digest,
        signature: join(identity, [0; 32]),
        verdict: Verdict::WeakKey,
        zip215: true,
    });
    out.push(Vector {
        name: "key not a point",
        key: not_a_point(),
        digest,
        signature: valid,
        verdict: Verdict::InvalidKey,
        zip215: false,
    });
    out.push(Vector {
        name: "R not a point",
        key,
        digest,
        signature: join(not_a_point(), valid[32..].try_into().unwrap()),
        verdict: Verdict::BadSignature,
        zip215: false,
    });
    out
}

/// A key as it arrives from the network: bytes not checked to be a point.
fn public_key(bytes: [u8; 32]) -> PublicKey {
    soma_types::codec::decode(&soma_types::codec::encode(&bytes[..]), 64).unwrap()
}

fn item(i: usize) -> SignedItem {
    SignedItem::LooseTransaction(i as u32)
}

fn expected(verdict: Verdict, at: usize) -> soma_types::Result<()> {
    match verdict {
        Verdict::Accept => Ok(()),
        Verdict::BadSignature => Err(Error::BadSignature(item(at))),
        Verdict::WeakKey => Err(Error::WeakKey(item(at))),
        Verdict::InvalidKey => Err(Error::InvalidKey(item(at))),
    }
}

/// Twenty valid signatures by four keys, so that several share a key.
fn valid_signatures() -> Vec<(PublicKey, Digest, Signature)> {
    (0..20u8)
        .map(|i| {
            let key = KeyPair::from_seed([10 + i % 4; 32]);
            let digest = Digest::of(&[i]);
            (
                key.public(),
                digest,
                key.sign_digest(Domain::Block, &digest),
            )
        })
        .collect()
}

/// The twenty valid signatures with `v` inserted at `at`, each signature
/// named by its position.
fn mixed_batch(v: &Vector, at: usize, cache: Option<Arc<KeyCache>>) -> SignatureBatch {
    let mut batch = match cache {
        Some(cache) => SignatureBatch::with_cache(21, cache, Fill::Yes),
        None => SignatureBatch::default(),
    };
    let mut valid = valid_signatures().into_iter();
    for i in 0..21 {
        if i == at {
            let key = public_key(v.key);
            batch.push(
                &key,
                Domain::Block,
                &v.digest,
                &Signature(v.signature),
                item(i),
            );
        } else {
            let (key, digest, signature) = valid.next().unwrap();
            batch.push(&key, Domain::Block, &digest, &signature, item(i));
        }
    }
    batch
}

/// Asserts that `parts`, split from a batch with `v` at `at`, give `v`'s
/// verdict in the part holding it and accept the rest.
fn assert_parts(v: &Vector, at: usize, parts: Vec<SignatureBatch>) {
    let mut start = 0;
    for part in parts {
        let end = start + part.len();
        let want = if (start..end).contains(&at) {
            expected(v.verdict, at)
        } else {
            Ok(())
        };
        assert_eq!(part.verify(), want, "{}: part {start}..{end}", v.name);
        start = end;
    }
    assert_eq!(start, 21);
}

#[test]
fn every_path_gives_each_vector_its_verdict() {
    let cache = Arc::new(KeyCache::new(64));
    for v in vectors() {
        let key = public_key(v.key);
        // The single check.
        assert_eq!(
            key.verify(Domain::Block, &v.digest, &Signature(v.signature)),
            v.verdict == Verdict::Accept,
            "{}: PublicKey::verify",
            v.name
        );
        // A batch of one, without and with the key cache, and through
        // push_key with the key prepared beforehand.
        let mut alone = SignatureBatch::default();
        alone.push(
            &key,
            Domain::Block,
            &v.digest,
            &Signature(v.signature),
            item(0),
        );
        assert_eq!(alone.verify(), expected(v.verdict, 0), "{}: alone", v.name);
        assert_eq!(
            alone.verify_each(),
            vec![expected(v.verdict, 0)],
            "{}",
            v.name
        );
        let mut cached = SignatureBatch::with_cache(1, cache.clone(), Fill::Yes);
        cached.push(
            &key,
            Domain::Block,
            &v.digest,
            &Signature(v.signature),
            item(0),
        );
        assert_eq!(
            cached.verify(),
            expected(v.verdict, 0),
            "{}: cached",
            v.name
        );
        match key.prepare() {
            Ok(prepared) => {
                let mut pushed = SignatureBatch::default();
                pushed.push_key(
                    &prepared,
                    Domain::Block,
                    &v.digest,
                    &Signature(v.signature),
                    item(0),
                );
                assert_eq!(
                    pushed.verify(),
                    expected(v.verdict, 0),
                    "{}: push_key",
                    v.name
                );
            }
            Err(e) => {
                assert_eq!(e, Error::InvalidPublicKey);
                assert_eq!(v.verdict, Verdict::InvalidKey, "{}", v.name);
            }
        }
        // Among twenty valid signatures, at several places, whole, split
        // in two and in three, and each signature on its own.
        for at in [0, 1, 7, 13, 20] {
            for cache in [None, Some(cache.clone())] {
                let batch = mixed_batch(&v, at, cache);
                assert_eq!(
                    batch.verify(),
                    expected(v.verdict, at),
                    "{}: at {at}",
                    v.name
                );
                let each = batch.verify_each();
                for (i, result) in each.into_iter().enumerate() {
                    let want = if i == at {
                        expected(v.verdict, at)
                    } else {
                        Ok(())
                    };
                    assert_eq!(result, want, "{}: verify_each at {at}, {i}", v.name);
                }
                assert_parts(&v, at, batch.clone().split(2));
                assert_parts(&v, at, batch.split(3));
            }
        }
    }
}

#[test]
fn each_vector_gets_the_verdict_of_the_zip215_reference() {
    use ed25519_consensus::{Signature as RefSignature, VerificationKey, VerificationKeyBytes};
    for v in vectors() {
        let message = message(&v.digest);
        let single = VerificationKey::try_from(v.key)
            .and_then(|key| key.verify(&RefSignature::from(v.signature), &message));
        assert_eq!(single.is_ok(), v.zip215, "{}: reference single", v.name);
        let mut batch = ed25519_consensus::batch::Verifier::new();
        let valid: Vec<_> = valid_signatures()
            .into_iter()
            .map(|(key, digest, signature)| (key, Domain::Block.message(&digest), signature))
            .collect();
        for (key, message, signature) in &valid {
            batch.queue((
                VerificationKeyBytes::from(key.to_bytes()),
                RefSignature::from(signature.0),
                &message[..],
            ));
        }
        batch.queue((
            VerificationKeyBytes::from(v.key),
            RefSignature::from(v.signature),
            &message[..],
        ));
        assert_eq!(
            batch.verify(rand_core_06::OsRng).is_ok(),
            v.zip215,
            "{}: reference batch",
            v.name
        );
        // Ours is ZIP-215 with keys that are not points or of small order
        // refused first.
        let ours = match CompressedEdwardsY(v.key).decompress() {
            None => Verdict::InvalidKey,
            Some(key) if key.is_small_order() => Verdict::WeakKey,
            Some(_) if v.zip215 => Verdict::Accept,
            Some(_) => Verdict::BadSignature,
        };
        assert_eq!(ours, v.verdict, "{}", v.name);
    }
}

/// The checks this rule replaced: `ed25519_dalek::verify_batch` (no
/// cofactor, coefficients drawn from the batch's contents), then
/// `verify_strict` on each signature when it failed.
fn old_verdict(signatures: &[(PublicKey, Digest, [u8; 64])]) -> bool {
    let messages: Vec<[u8; 48]> = signatures.iter().map(|(_, d, _)| message(d)).collect();
    let messages: Vec<&[u8]> = messages.iter().map(|m| &m[..]).collect();
    let sigs: Vec<ed25519_dalek::Signature> = signatures
        .iter()
        .map(|(_, _, s)| ed25519_dalek::Signature::from_bytes(s))
        .collect();
    let keys: Vec<ed25519_dalek::VerifyingKey> = signatures
        .iter()
        .map(|(k, _, _)| ed25519_dalek::VerifyingKey::from_bytes(k.as_bytes()).unwrap())
        .collect();
    ed25519_dalek::verify_batch(&messages, &sigs, &keys).is_ok()
        || keys
            .iter()
            .zip(&messages)
            .zip(&sigs)
            .all(|((k, m), s)| k.verify_strict(m, s).is_ok())
}

#[test]
fn the_old_checks_judged_a_torsion_component_in_r_by_its_batch() {
    let v = vectors()
        .into_iter()
        .find(|v| v.name == "R with a torsion component of order 8")
        .unwrap();
    let key = public_key(v.key);
    let verdicts: Vec<bool> = (0..=20)
        .map(|at| {
            let mut signatures: Vec<_> = valid_signatures()
                .into_iter()
                .map(|(k, d, s)| (k, d, s.0))
                .collect();
            signatures.insert(at, (key, v.digest, v.signature));
            old_verdict(&signatures)
        })
        .collect();
    // The same signature was accepted in some batches and refused in
    // others: the batch equation holds for it when its coefficient is a
    // multiple of 8, and only then. The positions are fixed, since the old
    // coefficients were drawn from the batch's contents.
    assert_eq!(
        verdicts
            .iter()
            .enumerate()
            .filter(|&(_, &ok)| ok)
            .map(|(at, _)| at)
            .collect::<Vec<_>>(),
        vec![0, 2, 5, 11, 16],
        "positions where the old checks accepted it"
    );
    // Checked alone, strict verification refused it.
    let strict = ed25519_dalek::VerifyingKey::from_bytes(&v.key)
        .unwrap()
        .verify_strict(
            &message(&v.digest),
            &ed25519_dalek::Signature::from_bytes(&v.signature),
        );
    assert!(strict.is_err());
    // The new rule accepts it wherever it is.
    for at in [0, 3, 5, 20] {
        assert_eq!(mixed_batch(&v, at, None).verify(), Ok(()));
    }
}
