use crate::committee::AuthoritySet;
use crate::{
    Committee, Domain, Error, Limits, Result, SignedItem, Transaction, UnverifiedBlock,
    VerifiedBlock, verify::SignatureBatch,
};

/// Checks a transaction's structure (not its signature).
pub fn check_transaction(tx: &Transaction, limits: &Limits) -> Result<()> {
    if tx.payload.len() > limits.max_transaction_payload_bytes {
        return Err(Error::PayloadTooLarge {
            len: tx.payload.len(),
            limit: limits.max_transaction_payload_bytes,
        });
    }
    Ok(())
}

/// Verifies standalone transactions: structure, then all signatures in one
/// batch. Errors name the transaction by position.
pub fn verify_transactions(txs: &[Transaction], limits: &Limits) -> Result<()> {
    let mut batch = SignatureBatch::with_capacity(txs.len());
    for (i, tx) in txs.iter().enumerate() {
        check_transaction(tx, limits)?;
        batch.push(
            &tx.sender,
            Domain::Transaction,
            &tx.signing_digest(),
            &tx.signature,
            SignedItem::LooseTransaction(i as u32),
        );
    }
    batch.verify()
}

/// Checks every structural rule of a block against `committee`, and pushes
/// the block's signature and its transactions' signatures into `batch`
/// (`None` when signatures will not be checked, which also skips
/// decompressing the signers' keys).
///
/// Rules: epoch is the committee's; round > 0; author in the committee;
/// ancestors non-empty, at most one per authority, of this epoch, below the
/// block's round, by known authors, the author's own first, with quorum stake
/// at round − 1; bounded transactions and votes; every transaction valid.
pub fn check_block(
    block: &UnverifiedBlock,
    committee: &Committee,
    limits: &Limits,
    mut batch: Option<&mut SignatureBatch>,
) -> Result<()> {
    let r = block.reference();
    let b = block.block();
    if b.epoch != committee.epoch() {
        return Err(Error::WrongEpoch {
            block: r,
            got: b.epoch,
            expected: committee.epoch(),
        });
    }
    if b.round == 0 {
        return Err(Error::GenesisRound(r));
    }
    let Some(author_key) = committee.protocol_verifying_key(b.author) else {
        return Err(Error::UnknownAuthor {
            block: r,
            author: b.author,
        });
    };
    if b.ancestors.is_empty() {
        return Err(Error::NoAncestors(r));
    }
    if b.ancestors.len() > committee.size() {
        return Err(Error::TooManyAncestors(r));
    }
    let mut authors = AuthoritySet::new();
    let mut parent_stake = 0u64;
    for ancestor in &b.ancestors {
        if ancestor.epoch != b.epoch
            || ancestor.round >= b.round
            || committee.authority(ancestor.author).is_none()
        {
            return Err(Error::InvalidAncestor {
                block: r,
                ancestor: *ancestor,
            });
        }
        if !authors.insert(ancestor.author) {
            return Err(Error::DuplicateAncestorAuthor {
                block: r,
                author: ancestor.author,
            });
        }
        if ancestor.round == b.round - 1 {
            parent_stake += committee.stake(ancestor.author);
        }
    }
    if b.ancestors[0].author != b.author {
        return Err(Error::OwnAncestorNotFirst(r));
    }
    if !committee.is_quorum(parent_stake) {
        return Err(Error::AncestorsBelowQuorum {
            block: r,
            round: b.round - 1,
            stake: parent_stake,
            quorum: committee.quorum_threshold(),
        });
    }
    if b.transactions.len() > limits.max_transactions_per_block {
        return Err(Error::TooManyTransactions {
            block: r,
            count: b.transactions.len(),
            limit: limits.max_transactions_per_block,
        });
    }
    if b.commit_votes.len() > limits.max_votes_per_block {
        return Err(Error::TooManyVotes(r));
    }
    if let Some(batch) = batch.as_deref_mut() {
        batch.push_key(
            author_key,
            Domain::Block,
            &block.signing_digest(),
            &block.signed.signature,
            SignedItem::Block(r),
        );
    }
    for (index, tx) in b.transactions.iter().enumerate() {
        check_transaction(tx, limits)?;
        let Some(batch) = batch.as_deref_mut() else {
            continue;
        };
        batch.push(
            &tx.sender,
            Domain::Transaction,
            &block.transaction_signing_digest(index),
            &tx.signature,
            SignedItem::Transaction {
                block: r,
                index: index as u32,
            },
        );
    }
    Ok(())
}

/// Verifies blocks against `committee`: every structural rule, then all
/// signatures (blocks and their transactions) in one batch.
pub fn verify_blocks(
    blocks: Vec<UnverifiedBlock>,
    committee: &Committee,
    limits: &Limits,
) -> Result<Vec<VerifiedBlock>> {
    let mut batch = SignatureBatch::with_capacity(blocks.len());
    for block in &blocks {
        check_block(block, committee, limits, Some(&mut batch))?;
    }
    batch.verify()?;
    Ok(blocks
        .into_iter()
        .map(UnverifiedBlock::into_trusted)
        .collect())
}
