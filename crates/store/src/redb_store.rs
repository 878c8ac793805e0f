//! [`RedbStore`]: the chain in a redb database file.
//!
//! Tables:
//!
//! | table           | key                                  | value                              |
//! |-----------------|--------------------------------------|------------------------------------|
//! | `meta`          | name                                 | chain id, watermark, lowest commit |
//! | `commits`       | commit index                         | `TrustedCommit::serialized()`      |
//! | `blocks`        | [`block_key`]                        | `VerifiedBlock::serialized()`      |
//! | `certificates`  | commit index                         | encoded `Vec<BlockRef>`            |
//! | `committees`    | epoch                                | encoded `Committee`                |
//! | `epoch_ends`    | epoch                                | index of the epoch's last commit   |
//! | `block_holders` | [`block_key`] ‖ holder tag ‖ index   | `()`                               |
//!
//! `block_holders` is a reverse index saying which commits and certificates
//! name each block, so pruning deletes a block only when nothing retained
//! still names it. Every write is one redb write transaction, committed with
//! redb's default durability (fsync), so after a crash the watermark never
//! points past what is stored.

use std::fmt::Display;
use std::ops::RangeInclusive;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use redb::{
    Database, ReadTransaction, ReadableDatabase, ReadableTable, Table, TableDefinition,
    WriteTransaction,
};
use soma_types::{
    BlockRef, ChainId, CommitIndex, CommitRef, Committee, Digest, Epoch, TrustedCommit,
    VerifiedBlock, codec, genesis_commit,
};

use crate::check::{
    StoredEpochs, block_bytes_within, check_blocks, check_epochs, check_links, take_within_budget,
};
use crate::{ConsensusStore, Error, FIRST_COMMIT, Result, SyncedBatch};

const BLOCK_KEY_LEN: usize = 48;
const HOLDER_KEY_LEN: usize = BLOCK_KEY_LEN + 1 + 8;

/// Key of a block: epoch, round, author and digest, big-endian, so keys sort
/// like `BlockRef`s.
type BlockKey = [u8; BLOCK_KEY_LEN];

/// Key of a `block_holders` entry: the block's key, a holder tag and the
/// holder's commit index, big-endian. All holders of a block share its key as
/// a prefix.
type HolderKey = [u8; HOLDER_KEY_LEN];

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const COMMITS: TableDefinition<u64, &[u8]> = TableDefinition::new("commits");
const BLOCKS: TableDefinition<&BlockKey, &[u8]> = TableDefinition::new("blocks");
const CERTIFICATES: TableDefinition<u64, &[u8]> = TableDefinition::new("certificates");
const COMMITTEES: TableDefinition<u64, &[u8]> = TableDefinition::new("committees");
const EPOCH_ENDS: TableDefinition<u64, u64> = TableDefinition::new("epoch_ends");
const BLOCK_HOLDERS: TableDefinition<&HolderKey, ()> = TableDefinition::new("block_holders");

const CHAIN_ID: &str = "chain-id";
const WATERMARK: &str = "watermark";
const LOWEST: &str = "lowest-available";

/// A [`ConsensusStore`] persisted in a redb database file: the default store
/// of a running node.
///
/// Each read is one redb read transaction (a consistent snapshot) and each
/// write one write transaction, so a crash at any point leaves the store as
/// it was after its last completed write.
pub struct RedbStore {
    db: Database,
    /// See [`ConsensusStore::version`]: raised after every write
    /// transaction's commit.
    version: AtomicU64,
}

impl std::fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbStore").finish_non_exhaustive()
    }
}

impl RedbStore {
    /// The page cache a store gets from [`RedbStore::open`]: 64 MiB.
    pub const DEFAULT_CACHE_BYTES: usize = 64 << 20;

    /// Opens the store at `path`, creating it for the chain started by
    /// `genesis` if the file does not exist, with a page cache of
    /// [`RedbStore::DEFAULT_CACHE_BYTES`].
    ///
    /// Fails with [`Error::WrongChain`] if the file holds another chain.
    pub fn open(path: impl AsRef<Path>, genesis: &Committee) -> Result<RedbStore> {
        Self::open_with_cache(path, genesis, Self::DEFAULT_CACHE_BYTES)
    }

    /// Like [`RedbStore::open`], with a page cache of at most `cache_bytes`:
    /// the bound on the memory the store keeps of the file.
    pub fn open_with_cache(
        path: impl AsRef<Path>,
        genesis: &Committee,
        cache_bytes: usize,
    ) -> Result<RedbStore> {
        // After an unclean shutdown redb walks the whole file before it
        // opens: said as it goes, so a long repair is not taken for a hang.
        let step = std::sync::atomic::AtomicU32::new(u32::MAX);
        let db = redb::Builder::new()
            .set_cache_size(cache_bytes)
            .set_repair_callback(move |session| {
                let progress = session.progress();
                let now = (progress * 20.0) as u32;
                if step.swap(now, std::sync::atomic::Ordering::Relaxed) != now {
                    tracing::info!(
                        progress = format!("{:.0}%", progress * 100.0),
                        "repairing the store after an unclean shutdown"
                    );
                }
            })
            .create(path)
            .map_err(db_err)?;
        let chain_id = ChainId::from_genesis(genesis);
        let txn = db.begin_write().map_err(db_err)?;
        {
            // Opening every table here creates the missing ones, so read
            // transactions can always open them.
            let mut tables = Tables::open(&txn)?;
            let stored: Option<ChainId> = match tables.meta.get(CHAIN_ID).map_err(db_err)? {
                Some(bytes) => Some(
                    codec::decode(bytes.value(), codec::MAX_DECODE_BYTES)
                        .map_err(corrupt(CHAIN_ID))?,
                ),
                None => None,
            };
            match stored {
                Some(stored) if stored != chain_id => return Err(Error::WrongChain),
                Some(_) => {}
                None => tables.init(genesis, chain_id)?,
            }
        }
        txn.commit().map_err(db_err)?;
        let store = RedbStore {
            db,
            version: AtomicU64::new(0),
        };
        // A corrupt meta table fails the open, not the first sync.
        let watermark = store.highest_synced_commit()?;
        let lowest = store.lowest_available_commit()?;
        tracing::debug!(chain = %chain_id, %watermark, lowest, "opened redb store");
        Ok(store)
    }

    fn read<T>(&self, f: impl FnOnce(&ReadTransaction) -> Result<T>) -> Result<T> {
        let txn = self.db.begin_read().map_err(db_err)?;
        f(&txn)
    }

    /// Runs `f` in one write transaction, committed only if `f` succeeds.
    fn write<T>(&self, f: impl FnOnce(&mut Tables<'_>) -> Result<T>) -> Result<T> {
        let txn = self.db.begin_write().map_err(db_err)?;
        let value = {
            let mut tables = Tables::open(&txn)?;
            // On error the transaction is dropped, which aborts it.
            f(&mut tables)?
        };
        let committed = txn.commit().map_err(db_err);
        // After the commit (or its failure, whose effect is unknown): a
        // read that saw the old version may have read the old snapshot.
        self.version.fetch_add(1, Ordering::AcqRel);
        committed?;
        Ok(value)
    }
}

impl ConsensusStore for RedbStore {
    fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    fn highest_synced_commit(&self) -> Result<CommitRef> {
        self.read(|txn| read_watermark(&txn.open_table(META).map_err(db_err)?))
    }

    fn lowest_available_commit(&self) -> Result<CommitIndex> {
        self.read(|txn| read_lowest(&txn.open_table(META).map_err(db_err)?))
    }

    fn commit(&self, index: CommitIndex) -> Result<Option<TrustedCommit>> {
        self.read(|txn| {
            let commits = txn.open_table(COMMITS).map_err(db_err)?;
            let Some(bytes) = commits.get(index).map_err(db_err)? else {
                return Ok(None);
            };
            decode_commit(index, bytes.value()).map(Some)
        })
    }

    fn commits_in_range(
        &self,
        range: RangeInclusive<CommitIndex>,
        max_bytes: usize,
    ) -> Result<Vec<TrustedCommit>> {
        if range.is_empty() {
            return Ok(Vec::new());
        }
        self.read(|txn| {
            let commits = txn.open_table(COMMITS).map_err(db_err)?;
            // Decoded lazily, so a small budget reads few commits.
            let entries = commits.range(range).map_err(db_err)?.map(|entry| {
                let (index, bytes) = entry.map_err(db_err)?;
                decode_commit(index.value(), bytes.value())
            });
            take_within_budget(entries, max_bytes)
        })
    }

    fn block(&self, block: &BlockRef) -> Result<Option<VerifiedBlock>> {
        self.read(|txn| read_block(&txn.open_table(BLOCKS).map_err(db_err)?, block))
    }

    fn blocks(&self, refs: &[BlockRef]) -> Result<Vec<Option<VerifiedBlock>>> {
        self.read(|txn| {
            let blocks = txn.open_table(BLOCKS).map_err(db_err)?;
            refs.iter().map(|r| read_block(&blocks, r)).collect()
        })
    }

    fn block_bytes(&self, refs: &[BlockRef], max_bytes: usize) -> Result<Vec<Option<Bytes>>> {
        self.read(|txn| {
            let blocks = txn.open_table(BLOCKS).map_err(db_err)?;
            block_bytes_within(
                refs,
                max_bytes,
                |r| blocks.get(&block_key(r)).map_err(db_err),
                |stored| stored.value().len(),
                |r, stored| checked_block_bytes(r, stored.value()),
            )
        })
    }

    fn certificate(&self, index: CommitIndex) -> Result<Option<Vec<VerifiedBlock>>> {
        self.read(|txn| {
            let certificates = txn.open_table(CERTIFICATES).map_err(db_err)?;
            let Some(bytes) = certificates.get(index).map_err(db_err)? else {
                return Ok(None);
            };
            let refs: Vec<BlockRef> = codec::decode(bytes.value(), codec::MAX_DECODE_BYTES)
                .map_err(corrupt(format!("certificate {index}")))?;
            let blocks = txn.open_table(BLOCKS).map_err(db_err)?;
            let certifiers = refs
                .iter()
                .map(|r| {
                    read_block(&blocks, r)?.ok_or_else(|| {
                        Error::Corrupt(format!("certificate of commit {index} lacks block {r}"))
                    })
                })
                .collect::<Result<_>>()?;
            Ok(Some(certifiers))
        })
    }

    fn highest_certified_in(
        &self,
        range: RangeInclusive<CommitIndex>,
    ) -> Result<Option<CommitIndex>> {
        if range.is_empty() {
            return Ok(None);
        }
        self.read(|txn| {
            let certificates = txn.open_table(CERTIFICATES).map_err(db_err)?;
            let last = certificates.range(range).map_err(db_err)?.next_back();
            match last {
                Some(entry) => Ok(Some(entry.map_err(db_err)?.0.value())),
                None => Ok(None),
            }
        })
    }

    fn committee(&self, epoch: Epoch) -> Result<Option<Committee>> {
        self.read(|txn| {
            let committees = txn.open_table(COMMITTEES).map_err(db_err)?;
            let Some(bytes) = committees.get(epoch).map_err(db_err)? else {
                return Ok(None);
            };
            let committee: Committee = codec::decode(bytes.value(), codec::MAX_DECODE_BYTES)
                .map_err(corrupt(format!("committee {epoch}")))?;
            if committee.epoch() != epoch {
                return Err(Error::Corrupt(format!(
                    "committee of epoch {} stored under epoch {epoch}",
                    committee.epoch()
                )));
            }
            Ok(Some(committee))
        })
    }

    fn last_commit_of_epoch(&self, epoch: Epoch) -> Result<Option<CommitIndex>> {
        self.read(|txn| {
            let epoch_ends = txn.open_table(EPOCH_ENDS).map_err(db_err)?;
            Ok(epoch_ends.get(epoch).map_err(db_err)?.map(|i| i.value()))
        })
    }

    fn write_synced_batch(&self, batch: SyncedBatch) -> Result<()> {
        let Some(last) = batch.commits.last() else {
            return Ok(());
        };
        self.write(|t| {
            let watermark = read_watermark(&t.meta)?;
            check_links(watermark, &batch.commits)?;
            check_epochs(watermark, &batch, t)?;
            check_blocks(&batch, |r| t.blocks.contains(r))?;

            for block in &batch.blocks {
                t.blocks.put(block)?;
            }
            for commit in &batch.commits {
                let index = commit.index();
                t.commits
                    .insert(index, commit.serialized().as_ref())
                    .map_err(db_err)?;
                for block in &commit.commit().blocks {
                    t.blocks.hold(block, Holder::Commit(index))?;
                }
            }
            if !batch.certificate.is_empty() {
                t.put_certificate(last.index(), &batch.certificate)?;
            }
            if let Some(next) = &batch.next_committee {
                t.committees
                    .insert(next.epoch(), codec::encode(next).as_slice())
                    .map_err(db_err)?;
                t.epoch_ends
                    .insert(last.commit().epoch, last.index())
                    .map_err(db_err)?;
            }
            t.set_meta(WATERMARK, &codec::encode(&last.reference()))
        })?;
        tracing::debug!(watermark = %last.reference(), "redb store wrote batch");
        Ok(())
    }

    fn insert_certificate(&self, index: CommitIndex, blocks: Vec<VerifiedBlock>) -> Result<()> {
        self.write(|t| {
            if t.commits.get(index).map_err(db_err)?.is_none() {
                return Err(Error::UnknownCommit(index));
            }
            // An empty certificate certifies nothing, as in a batch.
            if blocks.is_empty() {
                return Ok(());
            }
            // Replacing a certificate: hold the new blocks before releasing
            // the old ones, so a block in both is never deleted in between.
            let old = t.take_certificate(index)?;
            t.put_certificate(index, &blocks)?;
            let kept: Vec<BlockRef> = blocks.iter().map(VerifiedBlock::reference).collect();
            for block in old.iter().filter(|b| !kept.contains(b)) {
                t.blocks.release(block, Holder::Certificate(index))?;
            }
            Ok(())
        })
    }

    fn prune_below(&self, index: CommitIndex) -> Result<()> {
        let pruned = self.write(|t| {
            let watermark = read_watermark(&t.meta)?;
            let lowest = read_lowest(&t.meta)?;
            let target = index.min(watermark.index);
            if target <= lowest {
                return Ok(None);
            }
            let removed = t
                .commits
                .extract_from_if(..target, |_, _| true)
                .map_err(db_err)?;
            for entry in removed {
                let (key, bytes) = entry.map_err(db_err)?;
                let commit = decode_commit(key.value(), bytes.value())?;
                for block in &commit.commit().blocks {
                    t.blocks.release(block, Holder::Commit(commit.index()))?;
                }
            }
            let removed = t
                .certificates
                .extract_from_if(..target, |_, _| true)
                .map_err(db_err)?;
            for entry in removed {
                let (key, bytes) = entry.map_err(db_err)?;
                let refs: Vec<BlockRef> = codec::decode(bytes.value(), codec::MAX_DECODE_BYTES)
                    .map_err(corrupt(format!("certificate {}", key.value())))?;
                for block in &refs {
                    t.blocks.release(block, Holder::Certificate(key.value()))?;
                }
            }
            t.set_meta(LOWEST, &codec::encode(&target))?;
            Ok(Some(target))
        })?;
        if let Some(lowest) = pruned {
            tracing::debug!(lowest, "redb store pruned");
        }
        Ok(())
    }
}

/// Every table, opened in one write transaction.
struct Tables<'t> {
    meta: Table<'t, &'static str, &'static [u8]>,
    commits: Table<'t, u64, &'static [u8]>,
    certificates: Table<'t, u64, &'static [u8]>,
    committees: Table<'t, u64, &'static [u8]>,
    epoch_ends: Table<'t, u64, u64>,
    blocks: BlockTables<'t>,
}

impl<'t> Tables<'t> {
    fn open(txn: &'t WriteTransaction) -> Result<Self> {
        Ok(Tables {
            meta: txn.open_table(META).map_err(db_err)?,
            commits: txn.open_table(COMMITS).map_err(db_err)?,
            certificates: txn.open_table(CERTIFICATES).map_err(db_err)?,
            committees: txn.open_table(COMMITTEES).map_err(db_err)?,
            epoch_ends: txn.open_table(EPOCH_ENDS).map_err(db_err)?,
            blocks: BlockTables {
                blocks: txn.open_table(BLOCKS).map_err(db_err)?,
                holders: txn.open_table(BLOCK_HOLDERS).map_err(db_err)?,
            },
        })
    }

    /// Fills a new database: the chain id, the genesis watermark and the
    /// genesis committee.
    fn init(&mut self, genesis: &Committee, chain_id: ChainId) -> Result<()> {
        self.set_meta(CHAIN_ID, &codec::encode(&chain_id))?;
        self.set_meta(
            WATERMARK,
            &codec::encode(&genesis_commit(genesis).reference()),
        )?;
        self.set_meta(LOWEST, &codec::encode(&FIRST_COMMIT))?;
        self.committees
            .insert(genesis.epoch(), codec::encode(genesis).as_slice())
            .map_err(db_err)?;
        Ok(())
    }

    fn set_meta(&mut self, key: &str, value: &[u8]) -> Result<()> {
        self.meta.insert(key, value).map_err(db_err)?;
        Ok(())
    }

    fn put_certificate(&mut self, index: CommitIndex, certifiers: &[VerifiedBlock]) -> Result<()> {
        for block in certifiers {
            self.blocks.put(block)?;
            self.blocks
                .hold(&block.reference(), Holder::Certificate(index))?;
        }
        let refs: Vec<BlockRef> = certifiers.iter().map(VerifiedBlock::reference).collect();
        self.certificates
            .insert(index, codec::encode(&refs).as_slice())
            .map_err(db_err)?;
        Ok(())
    }

    /// Removes the certificate entry of `index` (not its blocks), returning
    /// the blocks it named.
    fn take_certificate(&mut self, index: CommitIndex) -> Result<Vec<BlockRef>> {
        match self.certificates.remove(index).map_err(db_err)? {
            Some(bytes) => codec::decode(bytes.value(), codec::MAX_DECODE_BYTES)
                .map_err(corrupt(format!("certificate {index}"))),
            None => Ok(Vec::new()),
        }
    }
}

impl StoredEpochs for Tables<'_> {
    fn genesis_epoch(&self) -> Result<Epoch> {
        match self.committees.first().map_err(db_err)? {
            Some((epoch, _)) => Ok(epoch.value()),
            None => Err(Error::Corrupt("no committee stored".into())),
        }
    }

    fn commit_epoch(&self, index: CommitIndex) -> Result<Option<Epoch>> {
        match self.commits.get(index).map_err(db_err)? {
            Some(bytes) => Ok(Some(decode_commit(index, bytes.value())?.commit().epoch)),
            None => Ok(None),
        }
    }

    fn epoch_end(&self, epoch: Epoch) -> Result<Option<CommitIndex>> {
        Ok(self
            .epoch_ends
            .get(epoch)
            .map_err(db_err)?
            .map(|i| i.value()))
    }

    fn has_committee(&self, epoch: Epoch) -> Result<bool> {
        Ok(self.committees.get(epoch).map_err(db_err)?.is_some())
    }
}

/// What holds a block in the store; pruning deletes a block when its last
/// holder goes.
#[derive(Clone, Copy, Debug)]
enum Holder {
    /// The commit at this index names the block.
    Commit(CommitIndex),
    /// The block certifies the commit at this index.
    Certificate(CommitIndex),
}

/// The blocks table and its reverse index, kept in step.
struct BlockTables<'t> {
    blocks: Table<'t, &'static BlockKey, &'static [u8]>,
    holders: Table<'t, &'static HolderKey, ()>,
}

impl BlockTables<'_> {
    fn contains(&self, block: &BlockRef) -> Result<bool> {
        Ok(self
            .blocks
            .get(&block_key(block))
            .map_err(db_err)?
            .is_some())
    }

    fn put(&mut self, block: &VerifiedBlock) -> Result<()> {
        self.blocks
            .insert(&block_key(&block.reference()), block.serialized().as_ref())
            .map_err(db_err)?;
        Ok(())
    }

    fn hold(&mut self, block: &BlockRef, holder: Holder) -> Result<()> {
        self.holders
            .insert(&holder_key(block, holder), ())
            .map_err(db_err)?;
        Ok(())
    }

    /// Drops `holder`'s claim on `block`, deleting the block once nothing
    /// holds it.
    fn release(&mut self, block: &BlockRef, holder: Holder) -> Result<()> {
        self.holders
            .remove(&holder_key(block, holder))
            .map_err(db_err)?;
        let key = block_key(block);
        let mut first = [0u8; HOLDER_KEY_LEN];
        let mut last = [0xffu8; HOLDER_KEY_LEN];
        first[..BLOCK_KEY_LEN].copy_from_slice(&key);
        last[..BLOCK_KEY_LEN].copy_from_slice(&key);
        let still_held = self
            .holders
            .range::<&HolderKey>(&first..=&last)
            .map_err(db_err)?
            .next()
            .is_some();
        if !still_held {
            self.blocks.remove(&key).map_err(db_err)?;
        }
        Ok(())
    }
}

fn block_key(block: &BlockRef) -> BlockKey {
    let mut key = [0u8; BLOCK_KEY_LEN];
    key[..8].copy_from_slice(&block.epoch.to_be_bytes());
    key[8..12].copy_from_slice(&block.round.to_be_bytes());
    key[12..16].copy_from_slice(&block.author.0.to_be_bytes());
    key[16..].copy_from_slice(block.digest.as_bytes());
    key
}

fn holder_key(block: &BlockRef, holder: Holder) -> HolderKey {
    let (tag, index) = match holder {
        Holder::Commit(index) => (0u8, index),
        Holder::Certificate(index) => (1u8, index),
    };
    let mut key = [0u8; HOLDER_KEY_LEN];
    key[..BLOCK_KEY_LEN].copy_from_slice(&block_key(block));
    key[BLOCK_KEY_LEN] = tag;
    key[BLOCK_KEY_LEN + 1..].copy_from_slice(&index.to_be_bytes());
    key
}

fn read_meta(meta: &impl ReadableTable<&'static str, &'static [u8]>, key: &str) -> Result<Vec<u8>> {
    match meta.get(key).map_err(db_err)? {
        Some(value) => Ok(value.value().to_vec()),
        None => Err(Error::Corrupt(format!("meta entry {key} is missing"))),
    }
}

fn read_watermark(meta: &impl ReadableTable<&'static str, &'static [u8]>) -> Result<CommitRef> {
    codec::decode(&read_meta(meta, WATERMARK)?, codec::MAX_DECODE_BYTES).map_err(corrupt(WATERMARK))
}

fn read_lowest(meta: &impl ReadableTable<&'static str, &'static [u8]>) -> Result<CommitIndex> {
    codec::decode(&read_meta(meta, LOWEST)?, codec::MAX_DECODE_BYTES).map_err(corrupt(LOWEST))
}

fn read_block(
    blocks: &impl ReadableTable<&'static BlockKey, &'static [u8]>,
    block: &BlockRef,
) -> Result<Option<VerifiedBlock>> {
    let Some(bytes) = blocks.get(&block_key(block)).map_err(db_err)? else {
        return Ok(None);
    };
    let stored = VerifiedBlock::from_trusted_bytes(Bytes::copy_from_slice(bytes.value()))
        .map_err(corrupt(format!("block {block}")))?;
    // The reference is recomputed from the bytes, so this catches bytes
    // that decode but are not the block asked for.
    if stored.reference() != *block {
        return Err(Error::Corrupt(format!(
            "block {block} holds block {}",
            stored.reference()
        )));
    }
    Ok(Some(stored))
}

/// The stored bytes of `block`, a copy, checked to be that block by their
/// digest (the key holds the rest of its reference) but not decoded: a
/// block's digest is the blake3 of its encoding, so bytes that hash to it
/// are the bytes that were stored.
fn checked_block_bytes(block: &BlockRef, bytes: &[u8]) -> Result<Bytes> {
    if Digest::of(bytes) != block.digest {
        return Err(Error::Corrupt(format!(
            "block {block} holds bytes of digest {}",
            Digest::of(bytes)
        )));
    }
    Ok(Bytes::copy_from_slice(bytes))
}

fn decode_commit(index: CommitIndex, bytes: &[u8]) -> Result<TrustedCommit> {
    let commit = TrustedCommit::from_trusted_bytes(Bytes::copy_from_slice(bytes))
        .map_err(corrupt(format!("commit {index}")))?;
    if commit.index() != index {
        return Err(Error::Corrupt(format!(
            "commit {index} holds commit {}",
            commit.index()
        )));
    }
    Ok(commit)
}

/// Maps a decoding failure of stored bytes (`what`) to [`Error::Corrupt`].
fn corrupt(what: impl Display) -> impl FnOnce(soma_types::Error) -> Error {
    move |e| Error::Corrupt(format!("{what}: {e}"))
}

fn db_err(error: impl Display) -> Error {
    Error::Database(error.to_string())
}

#[cfg(test)]
mod tests {
    use soma_types::{AuthorityIndex, Digest};

    use super::*;

    #[test]
    fn block_keys_sort_like_block_refs() {
        let mut refs = Vec::new();
        for epoch in [0, 1, 256, u64::MAX] {
            for round in [0, 1, 255, 256, 70_000, u32::MAX] {
                for author in [0, 1, 256] {
                    for digest in [Digest::ZERO, Digest([1; 32]), Digest([0xff; 32])] {
                        refs.push(BlockRef {
                            epoch,
                            round,
                            author: AuthorityIndex(author),
                            digest,
                        });
                    }
                }
            }
        }
        let mut by_key = refs.clone();
        by_key.sort_by_key(block_key);
        refs.sort();
        assert_eq!(by_key, refs);
    }

    #[test]
    fn holder_keys_start_with_their_block_key() {
        let block = BlockRef {
            epoch: 3,
            round: 9,
            author: AuthorityIndex(2),
            digest: Digest([7; 32]),
        };
        for holder in [Holder::Commit(5), Holder::Certificate(u64::MAX)] {
            assert_eq!(
                holder_key(&block, holder)[..BLOCK_KEY_LEN],
                block_key(&block)
            );
        }
        assert_ne!(
            holder_key(&block, Holder::Commit(5)),
            holder_key(&block, Holder::Certificate(5))
        );
    }
}
