//! The protocol's test vectors, `docs/test-vectors.json`: one of each signed
//! or digested object, built from fixed seeds and fixed timestamps, with its
//! encoding, digest and signature.
//!
//! The test rebuilds the vectors with the code and compares them with the
//! checked-in file byte for byte; it never writes the file unless asked:
//!
//! ```text
//! SOMA_WRITE_VECTORS=1 cargo test -p soma-tests --test test_vectors
//! ```
//!
//! It also checks every vector the way an outside implementer would, from
//! docs/protocol.md alone: the encodings against an encoder written here
//! from the spec, the digests as blake3 of the stated bytes with the stated
//! prefixes, the signatures with ed25519-dalek directly, and the TLS binding
//! through the transport's own certificate check.

use std::collections::HashMap;
use std::path::PathBuf;

use bytes::Bytes;
use ed25519_dalek::{Signature as DalekSignature, SigningKey, VerifyingKey};
use rcgen::PublicKeyData;
use serde::Serialize;
use soma_types::verify::{NodeInfoPolicy, epoch_change, verify_blocks, verify_node_infos};
use soma_types::{
    Access, Authority, AuthorityIndex, Block, BlockRef, ChainId, Commit, CommitRef, Committee,
    Digest, Domain, EndOfEpoch, KeyPair, Limits, NodeInfo, PeerId, SignedBlock, SignedNodeInfo,
    Transaction, TrustedCommit, UnverifiedBlock, codec, genesis_block_refs, genesis_commit,
};
use soma_wire::tls::{BINDING_OID, NodeIdentity};

/// The command that rewrites the vectors file.
const REGENERATE: &str = "SOMA_WRITE_VECTORS=1 cargo test -p soma-tests --test test_vectors";

/// A fixed P-256 TLS key (PKCS#8), so the binding's SubjectPublicKeyInfo is
/// the same in every run. Test material only.
const TLS_KEY_PEM: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg5IimIikr3rAevZ7F
M4QKZh4gTqPc2xfAFf72XqudhTqhRANCAAQCe2YMgHjuusWeXc/nswF9jmU1vu4p
ITl+831y8qxEgmZK2LlvfAe/402Noe9zV4/nGZ5+jA3qtbDWjiyhrEwN
-----END PRIVATE KEY-----
";

/// The stakes of the genesis validators: each varint form of a u64 below
/// 2^32 appears (one byte, 251 + u16, 252 + u32).
const STAKES: [u64; 4] = [1, 2, 300, 70_000];
const ADDRESSES: [&str; 4] = [
    "127.0.0.1:7000",
    "127.0.0.1:7001",
    "validator-2.example:7000",
    "[::1]:7003",
];
/// 2023-11-14T22:13:20Z, in milliseconds: a u64 that needs the 253 + u64
/// form.
const TIMESTAMP_MS: u64 = 1_700_000_000_000;

fn protocol_seed(i: usize) -> [u8; 32] {
    [0x01 + i as u8; 32]
}

fn network_seed(i: usize) -> [u8; 32] {
    [0x11 + i as u8; 32]
}

const SENDER_SEED: [u8; 32] = [0x21; 32];

fn path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/test-vectors.json")
}

// ---- the vectors file ----

#[derive(Serialize)]
struct Vectors {
    about: &'static str,
    regenerate: &'static str,
    keys: Vec<Key>,
    genesis: GenesisVector,
    transaction: Signed<Transaction>,
    blocks: Vec<BlockVector>,
    commits: Vec<CommitVector>,
    node_info: Signed<SignedNodeInfo>,
    tls_binding: TlsVector,
}

/// An ed25519 key pair: RFC 8032 secret seed and public key.
#[derive(Serialize)]
struct Key {
    name: String,
    secret_seed: String,
    public_key: String,
}

#[derive(Serialize)]
struct GenesisVector {
    genesis_toml: String,
    committee: Committee,
    /// The committee's encoding.
    encoding: String,
    /// blake3(encoding).
    committee_digest: String,
    /// blake3("soma-p2p/chain/1" || encoding).
    chain_id: String,
    /// blake3("soma-p2p/genesis-block/1" || committee_digest || u32 LE
    /// author), by author.
    genesis_block_digests: Vec<String>,
}

/// A signed object: what is hashed, the message signed, the signature and
/// the whole encoding.
#[derive(Serialize)]
struct Signed<T> {
    signer: String,
    public_key: String,
    value: T,
    /// The bytes hashed: the encoding of the signed value.
    signed_bytes: String,
    /// blake3(signed_bytes).
    signed_digest: String,
    domain_tag: String,
    /// domain_tag || signed_digest: the 48 bytes the ed25519 signature is over.
    message: String,
    signature: String,
    /// The encoding of the signed object as it travels: signed_bytes, then
    /// 0x40 and the 64 signature bytes.
    encoding: String,
}

#[derive(Serialize)]
struct BlockVector {
    #[serde(flatten)]
    signed: Signed<SignedBlock>,
    /// blake3(encoding): the digest of its BlockRef.
    digest: String,
}

#[derive(Serialize)]
struct CommitVector {
    value: Commit,
    encoding: String,
    /// blake3(encoding): the digest of its CommitRef.
    digest: String,
}

#[derive(Serialize)]
struct TlsVector {
    signer: String,
    network_key: String,
    tls_private_key_pem: &'static str,
    /// The certificate's SubjectPublicKeyInfo, DER.
    spki_der: String,
    /// blake3(spki_der).
    signed_digest: String,
    domain_tag: String,
    /// domain_tag || signed_digest.
    message: String,
    signature: String,
    /// The OID of the certificate extension.
    extension_oid: String,
    /// The extension's content: 30 64 04 20 <network key> 04 40 <signature>.
    extension_der: String,
}

// ---- building them with the code ----

fn committee() -> Committee {
    let authorities = (0..STAKES.len())
        .map(|i| Authority {
            stake: STAKES[i],
            protocol_key: KeyPair::from_seed(protocol_seed(i)).public(),
            network_key: PeerId::from(KeyPair::from_seed(network_seed(i)).public()),
            address: ADDRESSES[i].to_owned(),
        })
        .collect();
    Committee::new(0, authorities).expect("a valid committee")
}

fn next_committee() -> Committee {
    let authorities = (0..3)
        .map(|i| Authority {
            stake: 1,
            protocol_key: KeyPair::from_seed(protocol_seed(i)).public(),
            network_key: PeerId::from(KeyPair::from_seed(network_seed(i)).public()),
            address: ADDRESSES[i].to_owned(),
        })
        .collect();
    Committee::new(1, authorities).expect("a valid committee")
}

fn genesis_toml(committee: &Committee) -> String {
    let mut text = String::from("commits-per-epoch = 1000\n");
    for (_, a) in committee.authorities() {
        text.push_str(&format!(
            "\n[[validator]]\nnetwork-key = \"{}\"\nprotocol-key = \"{}\"\nstake = {}\naddress = \"{}\"\n",
            hex::encode(a.network_key.0),
            hex::encode(a.protocol_key.to_bytes()),
            a.stake,
            a.address,
        ));
    }
    text
}

fn transaction() -> Transaction {
    Transaction::new(
        &KeyPair::from_seed(SENDER_SEED),
        300,
        Bytes::from_static(b"soma"),
    )
}

/// Block 0: author 0, round 1, one transaction, a vote for the genesis
/// commit. Block 1: author 1, round 1, ending the epoch.
fn blocks(committee: &Committee) -> Vec<SignedBlock> {
    let genesis = genesis_block_refs(committee);
    let ancestors = |author: usize| {
        let mut refs = vec![genesis[author]];
        refs.extend(genesis.iter().copied().filter(|r| r.author.get() != author));
        refs
    };
    let a = Block {
        epoch: 0,
        round: 1,
        author: AuthorityIndex(0),
        timestamp_ms: TIMESTAMP_MS,
        ancestors: ancestors(0),
        transactions: vec![transaction()],
        commit_votes: vec![genesis_commit(committee).reference()],
        end_of_epoch: None,
    };
    let b = Block {
        epoch: 0,
        round: 1,
        author: AuthorityIndex(1),
        timestamp_ms: TIMESTAMP_MS + 1,
        ancestors: ancestors(1),
        transactions: Vec::new(),
        commit_votes: Vec::new(),
        end_of_epoch: Some(EndOfEpoch {
            next_committee: next_committee(),
        }),
    };
    vec![
        SignedBlock::new(a, &KeyPair::from_seed(protocol_seed(0))),
        SignedBlock::new(b, &KeyPair::from_seed(protocol_seed(1))),
    ]
}

fn block_ref(signed: &SignedBlock) -> BlockRef {
    UnverifiedBlock::from_signed(signed.clone()).reference()
}

/// The genesis commit, and commit 1: both blocks, led by block 1, which
/// ends epoch 0.
fn commits(committee: &Committee, blocks: &[SignedBlock]) -> Vec<Commit> {
    let genesis = genesis_commit(committee);
    let leader = block_ref(&blocks[1]);
    let one = Commit {
        index: 1,
        previous_digest: genesis.reference().digest,
        timestamp_ms: blocks[1].block.timestamp_ms,
        leader,
        blocks: vec![block_ref(&blocks[0]), leader],
        epoch: 0,
    };
    vec![genesis.commit().clone(), one]
}

fn node_info() -> SignedNodeInfo {
    SignedNodeInfo::sign(
        NodeInfo {
            peer_id: PeerId::from(KeyPair::from_seed(network_seed(0)).public()),
            addresses: vec!["192.0.2.1:7000".to_owned(), "[2001:db8::1]:7000".to_owned()],
            timestamp_ms: TIMESTAMP_MS,
            access: Access::Private,
        },
        &KeyPair::from_seed(network_seed(0)),
    )
}

fn spki_der() -> Vec<u8> {
    rcgen::KeyPair::from_pem(TLS_KEY_PEM)
        .expect("a PKCS#8 P-256 key")
        .subject_public_key_info()
}

fn signed<T: Serialize, V: Serialize>(
    signer: &str,
    seed: [u8; 32],
    domain: Domain,
    value: T,
    signed_value: &V,
    signature: soma_types::Signature,
) -> Signed<T> {
    let signed_bytes = codec::encode(signed_value);
    let digest = Digest::of(&signed_bytes);
    Signed {
        signer: signer.to_owned(),
        public_key: hex::encode(KeyPair::from_seed(seed).public().to_bytes()),
        encoding: hex::encode(codec::encode(&value)),
        value,
        signed_bytes: hex::encode(&signed_bytes),
        signed_digest: hex::encode(digest.0),
        domain_tag: hex::encode(domain.tag()),
        message: hex::encode(domain.message(&digest)),
        signature: hex::encode(signature.0),
    }
}

fn key(name: &str, seed: [u8; 32]) -> Key {
    Key {
        name: name.to_owned(),
        secret_seed: hex::encode(seed),
        public_key: hex::encode(KeyPair::from_seed(seed).public().to_bytes()),
    }
}

fn vectors() -> Vectors {
    let committee = committee();
    let encoding = codec::encode(&committee);
    let mut keys = Vec::new();
    for i in 0..STAKES.len() {
        keys.push(key(
            &format!("validator {i} protocol key"),
            protocol_seed(i),
        ));
        keys.push(key(&format!("validator {i} network key"), network_seed(i)));
    }
    keys.push(key("transaction sender", SENDER_SEED));

    let genesis = GenesisVector {
        genesis_toml: genesis_toml(&committee),
        encoding: hex::encode(&encoding),
        committee_digest: hex::encode(committee.digest().0),
        chain_id: hex::encode(ChainId::from_genesis(&committee).0.0),
        genesis_block_digests: genesis_block_refs(&committee)
            .iter()
            .map(|r| hex::encode(r.digest.0))
            .collect(),
        committee: committee.clone(),
    };

    let tx = transaction();
    let transaction = signed(
        "transaction sender",
        SENDER_SEED,
        Domain::Transaction,
        tx.clone(),
        &(&tx.sender, tx.nonce, &tx.payload),
        tx.signature,
    );

    let blocks_ = blocks(&committee);
    let commits_ = commits(&committee, &blocks_);
    let blocks = blocks_
        .iter()
        .map(|b| {
            let author = b.block.author.get();
            BlockVector {
                digest: hex::encode(Digest::of(&codec::encode(b)).0),
                signed: signed(
                    &format!("validator {author} protocol key"),
                    protocol_seed(author),
                    Domain::Block,
                    b.clone(),
                    &b.block,
                    b.signature,
                ),
            }
        })
        .collect();
    let commits = commits_
        .into_iter()
        .map(|c| {
            let encoding = codec::encode(&c);
            CommitVector {
                digest: hex::encode(Digest::of(&encoding).0),
                encoding: hex::encode(encoding),
                value: c,
            }
        })
        .collect();

    let info = node_info();
    let node_info = signed(
        "validator 0 network key",
        network_seed(0),
        Domain::NodeInfo,
        info.clone(),
        &info.info,
        info.signature,
    );

    let network = KeyPair::from_seed(network_seed(0));
    let spki = spki_der();
    let spki_digest = Digest::of(&spki);
    let signature = network.sign_digest(Domain::TlsBinding, &spki_digest);
    let mut extension = vec![0x30, 0x64, 0x04, 0x20];
    extension.extend_from_slice(network.public().as_bytes());
    extension.extend_from_slice(&[0x04, 0x40]);
    extension.extend_from_slice(&signature.0);
    let tls_binding = TlsVector {
        signer: "validator 0 network key".to_owned(),
        network_key: hex::encode(network.public().to_bytes()),
        tls_private_key_pem: TLS_KEY_PEM,
        spki_der: hex::encode(&spki),
        signed_digest: hex::encode(spki_digest.0),
        domain_tag: hex::encode(Domain::TlsBinding.tag()),
        message: hex::encode(Domain::TlsBinding.message(&spki_digest)),
        signature: hex::encode(signature.0),
        extension_oid: BINDING_OID
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join("."),
        extension_der: hex::encode(extension),
    };

    Vectors {
        about: "soma-p2p protocol test vectors; docs/protocol.md (Test vectors) says how each \
                value is computed. Hex strings are bytes; every digest is blake3 (32 bytes).",
        regenerate: REGENERATE,
        keys,
        genesis,
        transaction,
        blocks,
        commits,
        node_info,
        tls_binding,
    }
}

fn render() -> String {
    let mut text = serde_json::to_string_pretty(&vectors()).expect("vectors serialize");
    text.push('\n');
    text
}

#[test]
fn checked_in_vectors_match_the_code() {
    let fresh = render();
    if std::env::var_os("SOMA_WRITE_VECTORS").is_some() {
        std::fs::write(path(), &fresh).expect("write docs/test-vectors.json");
        return;
    }
    let stored = std::fs::read_to_string(path()).unwrap_or_default();
    if stored != fresh {
        let first = stored
            .lines()
            .zip(fresh.lines())
            .position(|(a, b)| a != b)
            .unwrap_or_else(|| stored.lines().count().min(fresh.lines().count()));
        panic!(
            "docs/test-vectors.json differs from what the code produces (first at line {}):\n\
             stored:   {}\nproduced: {}\n\
             If the change is intended, regenerate the file with\n  {REGENERATE}\n\
             and review its diff.",
            first + 1,
            stored.lines().nth(first).unwrap_or("<end of file>"),
            fresh.lines().nth(first).unwrap_or("<end of file>"),
        );
    }
}

// ---- checking them as an outside implementer would ----

/// An encoder written from docs/protocol.md (Encoding), not bincode.
#[derive(Default)]
struct Enc(Vec<u8>);

impl Enc {
    fn uint(&mut self, v: u64) -> &mut Self {
        match v {
            0..=250 => self.0.push(v as u8),
            251..=0xffff => {
                self.0.push(251);
                self.0.extend_from_slice(&(v as u16).to_le_bytes());
            }
            0x1_0000..=0xffff_ffff => {
                self.0.push(252);
                self.0.extend_from_slice(&(v as u32).to_le_bytes());
            }
            _ => {
                self.0.push(253);
                self.0.extend_from_slice(&v.to_le_bytes());
            }
        }
        self
    }

    fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.uint(b.len() as u64);
        self.0.extend_from_slice(b);
        self
    }

    fn block_ref(&mut self, r: &BlockRef) -> &mut Self {
        self.uint(r.epoch)
            .uint(r.round.into())
            .uint(r.author.0.into())
            .bytes(&r.digest.0)
    }

    fn commit_ref(&mut self, r: &CommitRef) -> &mut Self {
        self.uint(r.index).bytes(&r.digest.0)
    }

    fn committee(&mut self, c: &Committee) -> &mut Self {
        self.uint(c.epoch()).uint(c.size() as u64);
        for (_, a) in c.authorities() {
            self.uint(a.stake)
                .bytes(a.protocol_key.as_bytes())
                .bytes(&a.network_key.0)
                .bytes(a.address.as_bytes());
        }
        self
    }

    fn transaction_data(&mut self, t: &Transaction) -> &mut Self {
        self.bytes(t.sender.as_bytes())
            .uint(t.nonce)
            .bytes(&t.payload)
    }

    fn block(&mut self, b: &Block) -> &mut Self {
        self.uint(b.epoch)
            .uint(b.round.into())
            .uint(b.author.0.into())
            .uint(b.timestamp_ms)
            .uint(b.ancestors.len() as u64);
        for r in &b.ancestors {
            self.block_ref(r);
        }
        self.uint(b.transactions.len() as u64);
        for t in &b.transactions {
            self.transaction_data(t).bytes(&t.signature.0);
        }
        self.uint(b.commit_votes.len() as u64);
        for v in &b.commit_votes {
            self.commit_ref(v);
        }
        match &b.end_of_epoch {
            None => self.0.push(0),
            Some(end) => {
                self.0.push(1);
                self.committee(&end.next_committee);
            }
        }
        self
    }

    fn commit(&mut self, c: &Commit) -> &mut Self {
        self.uint(c.index)
            .bytes(&c.previous_digest.0)
            .uint(c.timestamp_ms)
            .block_ref(&c.leader)
            .uint(c.blocks.len() as u64);
        for r in &c.blocks {
            self.block_ref(r);
        }
        self.uint(c.epoch)
    }

    fn node_info(&mut self, i: &NodeInfo) -> &mut Self {
        self.bytes(&i.peer_id.0).uint(i.addresses.len() as u64);
        for a in &i.addresses {
            self.bytes(a.as_bytes());
        }
        self.uint(i.timestamp_ms).uint(match i.access {
            Access::Public => 0,
            Access::Private => 1,
        })
    }
}

fn encode_with(f: impl FnOnce(&mut Enc) -> &mut Enc) -> String {
    let mut enc = Enc::default();
    f(&mut enc);
    hex::encode(enc.0)
}

fn unhex(s: &str) -> Vec<u8> {
    hex::decode(s).expect("hex")
}

fn blake3_of(parts: &[&[u8]]) -> String {
    let mut hasher = blake3::Hasher::new();
    for part in parts {
        hasher.update(part);
    }
    hex::encode(hasher.finalize().as_bytes())
}

/// The key is the seed's, the message is the tag and blake3 of the signed
/// bytes, ed25519-dalek accepts the signature, and the object's encoding is
/// the signed bytes followed by the signature as a 64-byte string.
fn check_signed<T>(v: &Signed<T>, keys: &HashMap<String, (String, String)>, tag: &[u8; 16]) {
    let (seed, public) = &keys[&v.signer];
    assert_eq!(&v.public_key, public);
    let seed: [u8; 32] = unhex(seed).try_into().expect("32 bytes");
    let signing = SigningKey::from_bytes(&seed);
    assert_eq!(
        hex::encode(signing.verifying_key().to_bytes()),
        v.public_key
    );
    let signed_bytes = unhex(&v.signed_bytes);
    assert_eq!(v.signed_digest, blake3_of(&[&signed_bytes]));
    assert_eq!(v.domain_tag, hex::encode(tag));
    let message = [&tag[..], &unhex(&v.signed_digest)].concat();
    assert_eq!(v.message, hex::encode(&message));
    let signature = DalekSignature::from_slice(&unhex(&v.signature)).expect("64 bytes");
    let key = VerifyingKey::from_bytes(&unhex(&v.public_key).try_into().expect("32 bytes"))
        .expect("a valid key");
    key.verify_strict(&message, &signature)
        .expect("the signature verifies");
    // RFC 8032 signatures are deterministic.
    assert_eq!(
        hex::encode(ed25519_dalek::Signer::sign(&signing, &message).to_bytes()),
        v.signature
    );
    let expected = [&signed_bytes[..], &[0x40], &unhex(&v.signature)].concat();
    assert_eq!(v.encoding, hex::encode(expected));
}

#[test]
fn vectors_follow_the_documented_formulas() {
    let v = vectors();
    let keys: HashMap<String, (String, String)> = v
        .keys
        .iter()
        .map(|k| {
            (
                k.name.clone(),
                (k.secret_seed.clone(), k.public_key.clone()),
            )
        })
        .collect();

    // Genesis: the encoding, the two digests, the genesis blocks.
    let g = &v.genesis;
    assert_eq!(g.encoding, encode_with(|e| e.committee(&g.committee)));
    let encoding = unhex(&g.encoding);
    assert_eq!(g.committee_digest, blake3_of(&[&encoding]));
    assert_eq!(g.chain_id, blake3_of(&[b"soma-p2p/chain/1", &encoding]));
    assert_ne!(g.chain_id, g.committee_digest);
    for (author, digest) in g.genesis_block_digests.iter().enumerate() {
        let author = (author as u32).to_le_bytes();
        let committee_digest = unhex(&g.committee_digest);
        assert_eq!(
            *digest,
            blake3_of(&[b"soma-p2p/genesis-block/1", &committee_digest, &author])
        );
    }
    for (i, (_, a)) in g.committee.authorities().enumerate() {
        assert!(g.genesis_toml.contains(&format!(
            "network-key = \"{}\"\nprotocol-key = \"{}\"\nstake = {}\naddress = \"{}\"",
            keys[&format!("validator {i} network key")].1,
            keys[&format!("validator {i} protocol key")].1,
            a.stake,
            a.address
        )));
    }

    // The transaction signs (sender, nonce, payload).
    let t = &v.transaction;
    check_signed(t, &keys, b"soma-p2p/tx/1\0\0\0");
    assert_eq!(
        t.signed_bytes,
        encode_with(|e| e.transaction_data(&t.value))
    );

    // Blocks sign the block; their digest is of the signed block.
    for b in &v.blocks {
        check_signed(&b.signed, &keys, b"soma-p2p/block/1");
        assert_eq!(
            b.signed.signed_bytes,
            encode_with(|e| e.block(&b.signed.value.block))
        );
        assert_eq!(b.digest, blake3_of(&[&unhex(&b.signed.encoding)]));
    }
    // They pass every block rule against the genesis committee.
    let decoded: Vec<UnverifiedBlock> = v
        .blocks
        .iter()
        .map(|b| {
            UnverifiedBlock::decode(Bytes::from(unhex(&b.signed.encoding)), 1 << 20)
                .expect("canonical")
        })
        .collect();
    let verified = verify_blocks(decoded, &g.committee, &Limits::default()).expect("valid blocks");
    for (b, verified) in v.blocks.iter().zip(&verified) {
        assert_eq!(hex::encode(verified.reference().digest.0), b.digest);
    }

    // Commits: unsigned, digest of the encoding, linked by digest; commit 0
    // links to the chain id and its leader is validator 0's genesis block.
    let mut previous = g.chain_id.clone();
    for c in &v.commits {
        assert_eq!(c.encoding, encode_with(|e| e.commit(&c.value)));
        assert_eq!(c.digest, blake3_of(&[&unhex(&c.encoding)]));
        assert_eq!(hex::encode(c.value.previous_digest.0), previous);
        previous = c.digest.clone();
    }
    let genesis = &v.commits[0].value;
    assert_eq!(
        hex::encode(genesis.leader.digest.0),
        g.genesis_block_digests[0]
    );
    assert!(genesis.blocks.is_empty() && genesis.timestamp_ms == 0);
    // Commit 1's leader ends the epoch: the next committee is epoch 1's.
    let by_ref: HashMap<_, _> = verified
        .iter()
        .map(|b| (b.reference(), b.clone()))
        .collect();
    let one = TrustedCommit::new_trusted(v.commits[1].value.clone());
    let next = epoch_change(&[one], &by_ref, &g.committee).expect("a valid epoch end");
    assert_eq!(next.map(|c| c.epoch()), Some(1));

    // The node info signs the info.
    let n = &v.node_info;
    check_signed(n, &keys, b"soma-p2p/node/1\0");
    assert_eq!(n.signed_bytes, encode_with(|e| e.node_info(&n.value.info)));
    let decoded: SignedNodeInfo = codec::decode(&unhex(&n.encoding), 2 << 10).expect("decodes");
    let policy = NodeInfoPolicy {
        now_ms: TIMESTAMP_MS,
        local: PeerId([0; 32]),
        allowlist: None,
    };
    assert_eq!(
        verify_node_infos(&[decoded], &policy, &Limits::default()),
        vec![Ok(())]
    );

    // The TLS binding signs blake3 of the SubjectPublicKeyInfo DER.
    let tls = &v.tls_binding;
    let (seed, public) = &keys[&tls.signer];
    assert_eq!(&tls.network_key, public);
    let spki = unhex(&tls.spki_der);
    assert_eq!(tls.signed_digest, blake3_of(&[&spki]));
    let tag = b"soma-p2p/tls/1\0\0";
    assert_eq!(tls.domain_tag, hex::encode(tag));
    let message = [&tag[..], &unhex(&tls.signed_digest)].concat();
    assert_eq!(tls.message, hex::encode(&message));
    let signing = SigningKey::from_bytes(&unhex(seed).try_into().expect("32 bytes"));
    let signature = DalekSignature::from_slice(&unhex(&tls.signature)).expect("64 bytes");
    signing
        .verifying_key()
        .verify_strict(&message, &signature)
        .expect("the binding verifies");
    assert_eq!(tls.extension_oid, "1.3.6.1.4.1.53594.1.1");
    let extension = [
        &[0x30, 0x64, 0x04, 0x20][..],
        &unhex(public),
        &[0x04, 0x40],
        &unhex(&tls.signature),
    ]
    .concat();
    assert_eq!(tls.extension_der, hex::encode(&extension));

    // A certificate of that key carrying that extension proves the network
    // key to the transport's own check.
    let tls_key = rcgen::KeyPair::from_pem(tls.tls_private_key_pem).expect("the key");
    assert_eq!(tls_key.subject_public_key_info(), spki);
    let mut params =
        rcgen::CertificateParams::new(vec!["soma-p2p".to_owned()]).expect("certificate params");
    params.custom_extensions = vec![rcgen::CustomExtension::from_oid_content(
        BINDING_OID,
        extension,
    )];
    let cert = params.self_signed(&tls_key).expect("a certificate");
    let identity =
        NodeIdentity::from_pem(&cert.pem(), tls.tls_private_key_pem).expect("a valid binding");
    assert_eq!(hex::encode(identity.peer_id().0), tls.network_key);
}
