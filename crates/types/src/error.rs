use crate::{AuthorityIndex, BlockRef, CommitIndex, Epoch, PeerId, Round};

/// Names the signed object whose signature failed, so a caller can tell a
/// peer exactly what it sent wrong.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum SignedItem {
    /// The block with this reference.
    Block(BlockRef),
    /// Transaction number `index` of the block `block`.
    Transaction {
        /// The block carrying the transaction.
        block: BlockRef,
        /// Position of the transaction in the block.
        index: u32,
    },
    /// The node info of this peer.
    NodeInfo(PeerId),
    /// A standalone transaction, by position in the request.
    LooseTransaction(u32),
}

impl std::fmt::Display for SignedItem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SignedItem::Block(r) => write!(f, "block {r}"),
            SignedItem::Transaction { block, index } => {
                write!(f, "transaction {index} of block {block}")
            }
            SignedItem::NodeInfo(p) => write!(f, "node info of {p}"),
            SignedItem::LooseTransaction(i) => write!(f, "transaction {i}"),
        }
    }
}

/// Every way data can fail to decode or to pass a verification rule.
///
/// Each verification rule of the design has its own variant, so tests and
/// peers' penalties can tell which rule was broken.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, serde::Serialize, serde::Deserialize)]
pub enum Error {
    // ---- codec ----
    /// The input is longer than the limit given to the decoder.
    #[error("input of {len} bytes exceeds the limit of {limit}")]
    TooLarge {
        /// Length of the input.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// The input is not a valid encoding of the expected type.
    #[error("malformed encoding: {0}")]
    Malformed(String),
    /// The input holds a valid value followed by extra bytes.
    #[error("{0} trailing bytes after the value")]
    TrailingBytes(usize),
    /// Bytes that should hold an ed25519 public key do not.
    #[error("invalid public key")]
    InvalidPublicKey,

    // ---- signatures ----
    /// A signer's public key is not a valid curve point.
    #[error("invalid public key for {0}")]
    InvalidKey(SignedItem),
    /// A public key is of small order, so anyone could forge its signatures.
    #[error("weak public key for {0}")]
    WeakKey(SignedItem),
    /// A signature does not verify.
    #[error("bad signature on {0}")]
    BadSignature(SignedItem),
    /// A batch of signatures does not verify, and was not searched for
    /// the bad one (the data is refused whole).
    #[error("a batch of {0} signatures does not verify")]
    BadSignatures(usize),

    // ---- committee ----
    /// A committee has no authorities.
    #[error("committee is empty")]
    EmptyCommittee,
    /// A committee has more authorities than [`crate::MAX_COMMITTEE_SIZE`].
    #[error("committee of {size} authorities exceeds the {limit} allowed")]
    CommitteeTooLarge {
        /// Authorities named.
        size: usize,
        /// The most allowed.
        limit: usize,
    },
    /// An authority has zero stake, or the total stake overflows.
    #[error("committee stake is invalid")]
    InvalidStake,
    /// Two authorities share a network key or a protocol key: one signer
    /// would count twice towards a quorum.
    #[error("authority {index} repeats the key of an earlier authority")]
    RepeatedKey {
        /// The later authority's index.
        index: u32,
    },

    // ---- transactions ----
    /// A transaction payload exceeds the configured limit.
    #[error("transaction payload of {len} bytes exceeds {limit}")]
    PayloadTooLarge {
        /// Payload length.
        len: usize,
        /// The limit.
        limit: usize,
    },

    // ---- blocks ----
    /// The block's epoch is not the committee's.
    #[error("block {block} is of epoch {got}, expected {expected}")]
    WrongEpoch {
        /// The offending block.
        block: BlockRef,
        /// Epoch in the block.
        got: Epoch,
        /// Epoch of the committee.
        expected: Epoch,
    },
    /// Round 0 holds only genesis blocks, which are never sent.
    #[error("block {0} claims round 0")]
    GenesisRound(BlockRef),
    /// The author index is not in the committee.
    #[error("block {block} has unknown author {author}")]
    UnknownAuthor {
        /// The offending block.
        block: BlockRef,
        /// The author index.
        author: AuthorityIndex,
    },
    /// The block has no ancestors.
    #[error("block {0} has no ancestors")]
    NoAncestors(BlockRef),
    /// The block has more ancestors than the committee has members.
    #[error("block {0} has more ancestors than authorities")]
    TooManyAncestors(BlockRef),
    /// Two ancestors have the same author.
    #[error("block {block} has two ancestors by {author}")]
    DuplicateAncestorAuthor {
        /// The offending block.
        block: BlockRef,
        /// The repeated author.
        author: AuthorityIndex,
    },
    /// An ancestor is not below the block's round, is of another epoch, or
    /// names an author outside the committee.
    #[error("block {block} has invalid ancestor {ancestor}")]
    InvalidAncestor {
        /// The offending block.
        block: BlockRef,
        /// The bad ancestor.
        ancestor: BlockRef,
    },
    /// The first ancestor is not the author's own block.
    #[error("block {0} does not list its own author's block first")]
    OwnAncestorNotFirst(BlockRef),
    /// Ancestors at round − 1 do not reach quorum stake.
    #[error("block {block} has ancestor stake {stake} at round {round}, quorum is {quorum}")]
    AncestorsBelowQuorum {
        /// The offending block.
        block: BlockRef,
        /// Round of the ancestors counted.
        round: Round,
        /// Stake of those ancestors.
        stake: u64,
        /// Stake needed.
        quorum: u64,
    },
    /// A block carries more transactions than the limit.
    #[error("block {block} has {count} transactions, limit is {limit}")]
    TooManyTransactions {
        /// The offending block.
        block: BlockRef,
        /// Number of transactions.
        count: usize,
        /// The limit.
        limit: usize,
    },
    /// A block carries more commit votes than the limit.
    #[error("block {0} has too many commit votes")]
    TooManyVotes(BlockRef),

    // ---- commits ----
    /// A commit batch is empty.
    #[error("empty commit batch")]
    EmptyBatch,
    /// A commit batch is longer than allowed.
    #[error("commit batch of {len} exceeds the limit of {limit}")]
    BatchTooLong {
        /// Number of commits.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// A commit's index is not the one expected at its position.
    #[error("expected commit {expected}, got {got}")]
    UnexpectedIndex {
        /// Index expected.
        expected: CommitIndex,
        /// Index received.
        got: CommitIndex,
    },
    /// A commit's `previous_digest` does not match its predecessor's digest.
    #[error("commit {0} does not link to its predecessor")]
    BrokenLink(CommitIndex),
    /// A commit belongs to another epoch than the batch's committee.
    #[error("commit {index} is of epoch {got}, expected {expected}")]
    CommitWrongEpoch {
        /// The commit.
        index: CommitIndex,
        /// Its epoch.
        got: Epoch,
        /// The committee's epoch.
        expected: Epoch,
    },
    /// A commit's block list is empty, repeats a block (its own or one an
    /// earlier commit of the batch named), lacks its leader or names blocks
    /// of another epoch.
    #[error("commit {0} has an invalid block list")]
    InvalidCommitBlocks(CommitIndex),
    /// The certifier blocks do not carry quorum votes for the last commit.
    #[error("commit {index} has certificate stake {stake}, quorum is {quorum}")]
    NotCertified {
        /// The commit that should be certified.
        index: CommitIndex,
        /// Stake of the distinct authorities voting for it.
        stake: u64,
        /// Stake needed.
        quorum: u64,
    },
    /// More certifier blocks than a certificate can need.
    #[error("{count} certifier blocks exceed the committee size {limit}")]
    TooManyCertifiers {
        /// Blocks received.
        count: usize,
        /// Committee size.
        limit: usize,
    },

    // ---- fetched blocks ----
    /// A fetched block is not named by any commit being synced.
    #[error("block {0} is not named by any commit")]
    UnexpectedBlock(BlockRef),
    /// The same block arrived twice.
    #[error("block {0} arrived twice")]
    DuplicateBlock(BlockRef),
    /// A fetched block's digest is not that of any block asked for.
    #[error("a block of digest {0} was not asked for")]
    UnrequestedBlock(crate::Digest),
    /// Blocks named by the commits did not arrive.
    #[error("{count} named blocks are missing, first {first}")]
    MissingBlocks {
        /// How many are missing.
        count: usize,
        /// The first one missing.
        first: BlockRef,
    },

    // ---- epochs ----
    /// A commit that ends its epoch is not the last of its batch.
    #[error("commit {0} ends its epoch but is not the last of the batch")]
    EpochEndInsideBatch(CommitIndex),
    /// The next committee announced at an epoch end is invalid.
    #[error("next committee is invalid: epoch {got}, expected {expected}")]
    InvalidNextCommittee {
        /// Epoch of the announced committee.
        got: Epoch,
        /// The epoch it should have.
        expected: Epoch,
    },

    // ---- node info ----
    /// A node info's timestamp is too old.
    #[error("node info of {0} is expired")]
    NodeInfoExpired(PeerId),
    /// A node info's timestamp is too far in the future.
    #[error("node info of {0} is from the future")]
    NodeInfoFromFuture(PeerId),
    /// A node info lists too many addresses or an address is too long.
    #[error("node info of {0} has too many or too long addresses")]
    InvalidAddresses(PeerId),
    /// A node info is of a peer that is not on our allowlist.
    #[error("peer {0} is not allowlisted")]
    NotAllowlisted(PeerId),
}
