use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::{
    AuthorityIndex, CommitRef, Committee, Digest, Domain, Epoch, Error, KeyPair, PublicKey, Result,
    Signature, Transaction, codec,
};

/// A round of the DAG within an epoch. Round 0 holds the genesis blocks.
pub type Round = u32;

/// The identity of a block: where it sits in the DAG and the digest of its
/// encoded [`SignedBlock`].
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
pub struct BlockRef {
    /// Epoch of the block.
    pub epoch: Epoch,
    /// Round of the block within its epoch.
    pub round: Round,
    /// Author of the block.
    pub author: AuthorityIndex,
    /// blake3 of the encoded signed block.
    pub digest: Digest,
}

impl std::fmt::Display for BlockRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "e{}r{}{}:{}",
            self.epoch, self.round, self.author, self.digest
        )
    }
}

/// Carried by the leader block whose commit ends an epoch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndOfEpoch {
    /// The committee of the next epoch.
    pub next_committee: Committee,
}

/// A block of the DAG, as its author wrote it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Block {
    /// Epoch the block belongs to.
    pub epoch: Epoch,
    /// Round within the epoch, at least 1.
    pub round: Round,
    /// The authority that wrote it.
    pub author: AuthorityIndex,
    /// Author's clock when writing it, in milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
    /// Blocks of earlier rounds this one builds on, the author's own first.
    pub ancestors: Vec<BlockRef>,
    /// Transactions included by the author.
    pub transactions: Vec<Transaction>,
    /// Commits the author votes for.
    pub commit_votes: Vec<CommitRef>,
    /// Set on the leader block whose commit ends the epoch.
    pub end_of_epoch: Option<EndOfEpoch>,
}

/// A block and its author's signature over it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedBlock {
    /// The block.
    pub block: Block,
    /// Signature by the author's protocol key under [`Domain::Block`].
    pub signature: Signature,
}

impl SignedBlock {
    /// Signs `block` with `key`, which should be its author's protocol key.
    pub fn new(block: Block, key: &KeyPair) -> Self {
        let signature = key.sign(Domain::Block, &block);
        SignedBlock { block, signature }
    }
}

/// A block decoded from bytes with its digests computed, not yet verified.
///
/// Decoding checks that the bytes are the block's canonical encoding, so
/// each block has exactly one digest.
#[derive(Clone, Debug)]
pub struct UnverifiedBlock {
    pub(crate) signed: SignedBlock,
    pub(crate) serialized: Bytes,
    pub(crate) reference: BlockRef,
    /// The digest the author signed, when hashed at decoding (a block whose
    /// signatures are not checked skips it; it is computed if asked for).
    signing_digest: Option<Digest>,
    /// The signing digest of each transaction, hashed from the received
    /// bytes; empty when the block did not come from [`UnverifiedBlock::decode`]
    /// (then they are computed when needed).
    transaction_digests: Vec<Digest>,
}

impl UnverifiedBlock {
    /// Decodes a signed block from untrusted bytes of at most `limit` bytes.
    pub fn decode(serialized: Bytes, limit: usize) -> Result<Self> {
        Self::decode_for(serialized, limit, true)
    }

    /// [`UnverifiedBlock::decode`], hashing each transaction's signed part
    /// now only if `signatures` are to be checked: a node that does not
    /// check them (the block is proven by its digest) skips that work, and
    /// a digest asked for later is computed then.
    pub fn decode_for(serialized: Bytes, limit: usize, signatures: bool) -> Result<Self> {
        Self::decode_hashed(serialized, None, limit, signatures)
    }

    /// [`UnverifiedBlock::decode_for`] of bytes hashed as they arrived (to
    /// match them to a block asked for, in one pass with the digest its
    /// author signed): the block is not hashed again.
    pub fn decode_hashed_bytes(
        hashed: HashedBytes,
        limit: usize,
        signatures: bool,
    ) -> Result<Self> {
        Self::decode_hashed(hashed.bytes, Some(hashed.digests), limit, signatures)
    }

    fn decode_hashed(
        serialized: Bytes,
        handed: Option<BlockDigests>,
        limit: usize,
        signatures: bool,
    ) -> Result<Self> {
        let (signed, layout) = parse(&serialized, limit)?;
        debug_assert_eq!(layout.block_len + SIGNATURE_ENCODED_LEN, serialized.len());
        let (signing_digest, digest) = match (signatures, handed) {
            (true, None) => {
                let (signing, digest) = digests(&serialized, layout.block_len);
                (Some(signing), digest)
            }
            (true, Some(handed)) => {
                // The signing digest handed over is of everything but the
                // last SIGNATURE_ENCODED_LEN bytes, which the layout found
                // to be the signature.
                let signing = handed
                    .signing
                    .filter(|_| layout.block_len + SIGNATURE_ENCODED_LEN == serialized.len())
                    .unwrap_or_else(|| Digest::of(&serialized[..layout.block_len]));
                (Some(signing), handed.digest)
            }
            (false, None) => (None, Digest::of(&serialized)),
            (false, Some(handed)) => (None, handed.digest),
        };
        let transaction_digests = if signatures {
            layout
                .transactions
                .into_iter()
                .map(|signed_part| Digest::of(&serialized[signed_part]))
                .collect()
        } else {
            Vec::new()
        };
        Ok(UnverifiedBlock {
            transaction_digests,
            ..Self::assemble(signed, serialized, signing_digest, digest)
        })
    }

    /// Wraps a signed block held in memory, encoding it once.
    pub fn from_signed(signed: SignedBlock) -> Self {
        let block_bytes = codec::encode(&signed.block);
        let signing_digest = Digest::of(&block_bytes);
        let serialized = Bytes::from(codec::encode(&signed));
        let digest = Digest::of(&serialized);
        Self::assemble(signed, serialized, Some(signing_digest), digest)
    }

    fn assemble(
        signed: SignedBlock,
        serialized: Bytes,
        signing_digest: Option<Digest>,
        digest: Digest,
    ) -> Self {
        let b = &signed.block;
        let reference = BlockRef {
            epoch: b.epoch,
            round: b.round,
            author: b.author,
            digest,
        };
        UnverifiedBlock {
            signed,
            serialized,
            reference,
            signing_digest,
            transaction_digests: Vec::new(),
        }
    }

    /// The digest the author signed: the hash of the block's bytes, which
    /// come before the signature in its canonical encoding.
    pub fn signing_digest(&self) -> Digest {
        self.signing_digest.unwrap_or_else(|| {
            let block_len = self.serialized.len() - SIGNATURE_ENCODED_LEN;
            Digest::of(&self.serialized[..block_len])
        })
    }

    /// The digest the sender of transaction `index` signed.
    ///
    /// # Panics
    /// If the block has no transaction `index`.
    pub fn transaction_signing_digest(&self, index: usize) -> Digest {
        match self.transaction_digests.get(index) {
            Some(digest) => *digest,
            None => self.signed.block.transactions[index].signing_digest(),
        }
    }

    /// The block's reference, computed from its bytes.
    pub fn reference(&self) -> BlockRef {
        self.reference
    }

    /// The block.
    pub fn block(&self) -> &Block {
        &self.signed.block
    }

    /// The signed block.
    pub fn signed(&self) -> &SignedBlock {
        &self.signed
    }

    /// The encoded signed block.
    pub fn serialized(&self) -> &Bytes {
        &self.serialized
    }

    /// Treats the block as verified. Only for blocks this node wrote itself
    /// or read back from its own store.
    pub fn into_trusted(mut self) -> VerifiedBlock {
        // Only verification reads them; verified blocks are kept in caches.
        self.transaction_digests = Vec::new();
        VerifiedBlock(Arc::new(self))
    }
}

/// A block that passed verification (or that this node wrote), with its
/// encoding and reference kept so neither is computed twice. Cheap to clone.
#[derive(Clone, Debug)]
pub struct VerifiedBlock(Arc<UnverifiedBlock>);

/// Bytes of an encoded signature: its length (64, one byte) and the 64 bytes.
const SIGNATURE_ENCODED_LEN: usize = 65;

/// Smallest encodings of a [`BlockRef`], a [`Transaction`] and a
/// [`CommitRef`]: each integer one byte, each digest, key and signature its
/// length and its bytes, an empty payload.
const MIN_BLOCK_REF_BYTES: usize = 3 + 33;
const MIN_TRANSACTION_BYTES: usize = 33 + 1 + 1 + SIGNATURE_ENCODED_LEN;
const MIN_COMMIT_REF_BYTES: usize = 1 + 33;

/// Decodes the signed block `serialized` holds, which must be its
/// canonical encoding and at most `limit` bytes (and at most
/// [`codec::MAX_DECODE_BYTES`]), and finds where its parts lie, in one pass.
/// Payloads are slices of `serialized`, not copies: a block of many small
/// transactions costs one allocation for them. Walks [`Block`]'s fields in
/// their declared order, as the codec encodes them: a field added there
/// must be added here (the tests compare this with the codec's own decode
/// and encode of every field).
fn parse(serialized: &Bytes, limit: usize) -> Result<(SignedBlock, Layout)> {
    codec::check_size(serialized, limit)?;
    let mut r = codec::Reader::new(serialized);
    let epoch = r.u64()?;
    let round = r.u32()?;
    let author = AuthorityIndex(r.u32()?);
    let timestamp_ms = r.u64()?;
    let count = r.len(MIN_BLOCK_REF_BYTES)?;
    let ancestors = items(count, || block_ref(&mut r))?;
    let count = r.len(MIN_TRANSACTION_BYTES)?;
    let mut transactions = Vec::with_capacity(count);
    let mut ranges = Vec::with_capacity(count);
    for _ in 0..count {
        let start = r.position();
        let sender = PublicKey::from_raw(r.fixed()?);
        let nonce = r.u64()?;
        let payload = serialized.slice_ref(r.bytes()?);
        ranges.push(start..r.position());
        let signature = Signature(r.fixed()?);
        transactions.push(Transaction {
            sender,
            nonce,
            payload,
            signature,
        });
    }
    let count = r.len(MIN_COMMIT_REF_BYTES)?;
    let commit_votes = items(count, || {
        Ok(CommitRef {
            index: r.u64()?,
            digest: Digest(r.fixed()?),
        })
    })?;
    let end_of_epoch = if r.some()? {
        // Rare (one block an epoch) and holding a committee, whose decode
        // checks it: the codec decodes it, then its canonical form is
        // checked against the bytes.
        let rest = r.rest();
        let (end, read) = codec::decode_prefix::<EndOfEpoch>(rest, limit)?;
        let mut matched = 0;
        if !codec::matches_at(&end, rest, &mut matched) || matched != read {
            return Err(Error::Malformed("non-canonical block encoding".into()));
        }
        r.advance(read)?;
        Some(end)
    } else {
        None
    };
    let block_len = r.position();
    let signature = Signature(r.fixed()?);
    if r.remaining() > 0 {
        return Err(Error::TrailingBytes(r.remaining()));
    }
    let block = Block {
        epoch,
        round,
        author,
        timestamp_ms,
        ancestors,
        transactions,
        commit_votes,
        end_of_epoch,
    };
    let layout = Layout {
        block_len,
        transactions: ranges,
    };
    Ok((SignedBlock { block, signature }, layout))
}

/// `count` items read by `item`, in a vector of exactly their number.
fn items<T>(count: usize, mut item: impl FnMut() -> Result<T>) -> Result<Vec<T>> {
    let mut v = Vec::with_capacity(count);
    for _ in 0..count {
        v.push(item()?);
    }
    Ok(v)
}

fn block_ref(r: &mut codec::Reader<'_>) -> Result<BlockRef> {
    Ok(BlockRef {
        epoch: r.u64()?,
        round: r.u32()?,
        author: AuthorityIndex(r.u32()?),
        digest: Digest(r.fixed()?),
    })
}

/// Where the parts of an encoded signed block lie.
struct Layout {
    /// Length of the block's encoding, which the signature follows.
    block_len: usize,
    /// The signed part of each transaction: its encoding without the
    /// signature, which is the encoding of (sender, nonce, payload).
    transactions: Vec<std::ops::Range<usize>>,
}

/// A block's bytes as received, with their digests from one pass over
/// them: the digest of the whole (its reference's) and the digest its
/// author signed, of everything but the signature at its end (`None` for
/// bytes too short to hold one). Computed here from the bytes it holds, so
/// the two cannot disagree; the decode confirms where the signature lies
/// before the signing digest is used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HashedBytes {
    bytes: Bytes,
    digests: BlockDigests,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct BlockDigests {
    digest: Digest,
    signing: Option<Digest>,
}

impl HashedBytes {
    /// `bytes`, hashed.
    pub fn new(bytes: Bytes) -> Self {
        let digests = match bytes.len().checked_sub(SIGNATURE_ENCODED_LEN) {
            Some(block_len) => {
                let (signing, digest) = digests(&bytes, block_len);
                BlockDigests {
                    digest,
                    signing: Some(signing),
                }
            }
            None => BlockDigests {
                digest: Digest::of(&bytes),
                signing: None,
            },
        };
        HashedBytes { bytes, digests }
    }

    /// The bytes.
    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }

    /// blake3 of the bytes.
    pub fn digest(&self) -> Digest {
        self.digests.digest
    }

    /// blake3 of the bytes but the last 65 (a signed block's encoded
    /// signature): the digest its author signed, if the bytes are a block.
    pub fn signing_digest(&self) -> Option<Digest> {
        self.digests.signing
    }

    /// The bytes, without their digests.
    pub fn into_bytes(self) -> Bytes {
        self.bytes
    }
}

/// The signing digest (of the block's bytes, the first `block_len`) and the
/// digest of the whole signed block, hashing the shared prefix once.
fn digests(serialized: &[u8], block_len: usize) -> (Digest, Digest) {
    let mut hasher = blake3::Hasher::new();
    hasher.update(&serialized[..block_len]);
    let signing = Digest(*hasher.finalize().as_bytes());
    hasher.update(&serialized[block_len..]);
    (signing, Digest(*hasher.finalize().as_bytes()))
}

impl VerifiedBlock {
    /// Signs `block` with `key` and wraps it; for blocks this node authors.
    pub fn sign(block: Block, key: &KeyPair) -> Self {
        UnverifiedBlock::from_signed(SignedBlock::new(block, key)).into_trusted()
    }

    /// Decodes a block from this node's own store, skipping signature checks.
    pub fn from_trusted_bytes(serialized: Bytes) -> Result<Self> {
        let (signed, _) = parse(&serialized, codec::MAX_DECODE_BYTES)?;
        // Stored bytes are canonical (they passed `UnverifiedBlock::decode`
        // or were encoded here): the block's bytes, then the signature.
        let block_len = serialized
            .len()
            .checked_sub(SIGNATURE_ENCODED_LEN)
            .ok_or_else(|| Error::Malformed("stored block too short".into()))?;
        let (signing_digest, digest) = digests(&serialized, block_len);
        let block = UnverifiedBlock::assemble(signed, serialized, Some(signing_digest), digest);
        Ok(block.into_trusted())
    }

    /// The block's reference.
    pub fn reference(&self) -> BlockRef {
        self.0.reference
    }

    /// The block.
    pub fn block(&self) -> &Block {
        &self.0.signed.block
    }

    /// The signed block.
    pub fn signed(&self) -> &SignedBlock {
        &self.0.signed
    }

    /// The encoded signed block, as sent and stored.
    pub fn serialized(&self) -> &Bytes {
        &self.0.serialized
    }

    /// Back to an unverified block, for tests that corrupt data.
    pub fn to_unverified(&self) -> UnverifiedBlock {
        (*self.0).clone()
    }
}

impl PartialEq for VerifiedBlock {
    fn eq(&self, other: &Self) -> bool {
        self.reference() == other.reference()
    }
}

impl Eq for VerifiedBlock {}

/// References of the round-0 genesis blocks of `committee`'s epoch, one per
/// authority, in authority order.
///
/// Genesis blocks are never signed, sent or stored: their digests are
/// derived from the committee, and round-1 blocks name them as ancestors.
pub fn genesis_block_refs(committee: &Committee) -> Vec<BlockRef> {
    let committee_digest = committee.digest();
    committee
        .authorities()
        .map(|(author, _)| BlockRef {
            epoch: committee.epoch(),
            round: 0,
            author,
            digest: Digest::of_parts(&[
                b"soma-p2p/genesis-block/1",
                committee_digest.as_bytes(),
                &author.0.to_le_bytes(),
            ]),
        })
        .collect()
}
