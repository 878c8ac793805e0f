//! What only the persistent store must do: survive a reopen, refuse another
//! chain's file, and report corrupt bytes as errors.

use std::path::{Path, PathBuf};

use redb::{Database, TableDefinition};
use soma_store::conformance::{TestChain, snapshot, test_committee};
use soma_store::{ConsensusStore, Error, RedbStore};
use soma_types::BlockRef;
use tempfile::TempDir;

// The store's private table layout, repeated here to corrupt it.
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const COMMITS: TableDefinition<u64, &[u8]> = TableDefinition::new("commits");
const BLOCKS: TableDefinition<&[u8; 48], &[u8]> = TableDefinition::new("blocks");
const CERTIFICATES: TableDefinition<u64, &[u8]> = TableDefinition::new("certificates");
const COMMITTEES: TableDefinition<u64, &[u8]> = TableDefinition::new("committees");

fn db_path(dir: &TempDir) -> PathBuf {
    dir.path().join("store.redb")
}

fn block_key(block: &BlockRef) -> [u8; 48] {
    let mut key = [0u8; 48];
    key[..8].copy_from_slice(&block.epoch.to_be_bytes());
    key[8..12].copy_from_slice(&block.round.to_be_bytes());
    key[12..16].copy_from_slice(&block.author.0.to_be_bytes());
    key[16..].copy_from_slice(block.digest.as_bytes());
    key
}

/// Opens the file with redb directly and lets `f` write into it.
fn tamper(path: &Path, f: impl FnOnce(&redb::WriteTransaction)) {
    let db = Database::create(path).unwrap();
    let txn = db.begin_write().unwrap();
    f(&txn);
    txn.commit().unwrap();
}

fn is_corrupt<T>(result: soma_store::Result<T>) -> bool {
    matches!(result, Err(Error::Corrupt(_)))
}

#[test]
fn reopen_holds_exactly_what_was_committed() {
    let dir = TempDir::new().unwrap();
    let chain = TestChain::new(7, Some(4));
    let before = {
        let store = RedbStore::open(db_path(&dir), chain.genesis()).unwrap();
        store.write_synced_batch(chain.batch(1..=4)).unwrap();
        store.write_synced_batch(chain.batch(5..=6)).unwrap();
        store
            .insert_certificate(2, chain.certificate(2).to_vec())
            .unwrap();
        store.prune_below(2).unwrap();
        snapshot(&store, &chain)
    };

    let store = RedbStore::open(db_path(&dir), chain.genesis()).unwrap();
    assert_eq!(snapshot(&store, &chain), before);
    assert_eq!(
        store.highest_synced_commit().unwrap(),
        chain.commit(6).reference()
    );
    assert_eq!(store.lowest_available_commit().unwrap(), 2);
    assert_eq!(
        store.committee(1).unwrap().as_ref(),
        Some(chain.next_committee())
    );
    assert_eq!(store.last_commit_of_epoch(0).unwrap(), Some(4));
    let certificate = store.certificate(2).unwrap().unwrap();
    assert_eq!(certificate.len(), chain.certificate(2).len());

    // The reopened store goes on from its watermark.
    store.write_synced_batch(chain.batch(7..=7)).unwrap();
    assert_eq!(
        store.highest_synced_commit().unwrap(),
        chain.commit(7).reference()
    );
}

#[test]
fn reopen_with_another_genesis_is_refused() {
    let dir = TempDir::new().unwrap();
    let chain = TestChain::new(2, None);
    drop(RedbStore::open(db_path(&dir), chain.genesis()).unwrap());

    let other_keys = test_committee(0, 2);
    assert_eq!(
        RedbStore::open(db_path(&dir), &other_keys).err(),
        Some(Error::WrongChain)
    );
    let other_epoch = test_committee(1, 1);
    assert_eq!(
        RedbStore::open(db_path(&dir), &other_epoch).err(),
        Some(Error::WrongChain)
    );
    assert!(RedbStore::open(db_path(&dir), chain.genesis()).is_ok());
}

#[test]
fn refused_write_leaves_reopened_store_unchanged() {
    let dir = TempDir::new().unwrap();
    let chain = TestChain::new(5, None);
    let before = {
        let store = RedbStore::open(db_path(&dir), chain.genesis()).unwrap();
        store.write_synced_batch(chain.batch(1..=2)).unwrap();
        let before = snapshot(&store, &chain);

        let gap = store.write_synced_batch(chain.batch(4..=5));
        assert!(matches!(gap, Err(Error::NotContiguous { .. })), "{gap:?}");
        let mut lacking = chain.batch(3..=5);
        lacking.blocks.pop();
        let lacking = store.write_synced_batch(lacking);
        assert!(
            matches!(lacking, Err(Error::MissingBlock(_))),
            "{lacking:?}"
        );
        before
    };

    let store = RedbStore::open(db_path(&dir), chain.genesis()).unwrap();
    assert_eq!(snapshot(&store, &chain), before);
}

#[test]
fn second_open_of_an_open_file_fails_cleanly() {
    let dir = TempDir::new().unwrap();
    let chain = TestChain::new(1, None);
    let _store = RedbStore::open(db_path(&dir), chain.genesis()).unwrap();
    let second = RedbStore::open(db_path(&dir), chain.genesis());
    assert!(matches!(second, Err(Error::Database(_))), "{second:?}");
}

#[test]
fn corrupt_values_read_as_corrupt() {
    let dir = TempDir::new().unwrap();
    let path = db_path(&dir);
    let chain = TestChain::new(3, None);
    {
        let store = RedbStore::open(&path, chain.genesis()).unwrap();
        store.write_synced_batch(chain.batch(1..=3)).unwrap();
    }
    let garbage: &[u8] = &[0xff; 7];
    let block = chain.blocks(1)[0].reference();
    tamper(&path, |txn| {
        let mut commits = txn.open_table(COMMITS).unwrap();
        commits.insert(2, garbage).unwrap();
        // Bytes of a valid commit, under the wrong index.
        commits
            .insert(1, chain.commit(3).serialized().as_ref())
            .unwrap();
        let mut blocks = txn.open_table(BLOCKS).unwrap();
        blocks.insert(&block_key(&block), garbage).unwrap();
        // Bytes of a valid block, under another block's key.
        let other = chain.blocks(1)[1].reference();
        blocks
            .insert(&block_key(&other), chain.blocks(2)[0].serialized().as_ref())
            .unwrap();
        txn.open_table(CERTIFICATES)
            .unwrap()
            .insert(3, garbage)
            .unwrap();
        txn.open_table(COMMITTEES)
            .unwrap()
            .insert(0, garbage)
            .unwrap();
    });

    let store = RedbStore::open(&path, chain.genesis()).unwrap();
    assert!(is_corrupt(store.commit(2)));
    assert!(is_corrupt(store.commit(1)));
    assert!(is_corrupt(store.commits_in_range(1..=3, usize::MAX)));
    assert!(is_corrupt(store.block(&block)));
    assert!(is_corrupt(store.block(&chain.blocks(1)[1].reference())));
    assert!(is_corrupt(store.blocks(&[block])));
    // Read as bytes, not decoded: still checked to be the block asked for.
    assert!(is_corrupt(store.block_bytes(&[block], usize::MAX)));
    assert!(is_corrupt(
        store.block_bytes(&[chain.blocks(1)[1].reference()], usize::MAX)
    ));
    assert_eq!(
        store
            .block_bytes(&[chain.blocks(1)[2].reference()], usize::MAX)
            .unwrap(),
        vec![Some(chain.blocks(1)[2].serialized().clone())]
    );
    // A corrupt block past the budget is neither copied nor checked: the
    // read ends before it.
    let good = chain.blocks(1)[2].clone();
    assert_eq!(
        store
            .block_bytes(&[good.reference(), block], good.serialized().len())
            .unwrap(),
        vec![Some(good.serialized().clone())]
    );
    assert!(is_corrupt(store.block_bytes(
        &[good.reference(), block],
        good.serialized().len() + garbage.len()
    )));
    assert!(is_corrupt(store.certificate(3)));
    assert!(is_corrupt(store.committee(0)));
    // Pruning must decode what it deletes, and refuses the corrupt commits
    // without deleting anything.
    assert!(is_corrupt(store.prune_below(3)));
    assert_eq!(store.lowest_available_commit().unwrap(), 1);
    assert!(store.commit(3).unwrap().is_some());
}

#[test]
fn corrupt_watermark_fails_the_open() {
    let dir = TempDir::new().unwrap();
    let path = db_path(&dir);
    let chain = TestChain::new(1, None);
    drop(RedbStore::open(&path, chain.genesis()).unwrap());
    tamper(&path, |txn| {
        let mut meta = txn.open_table(META).unwrap();
        meta.insert("watermark", [1u8, 2, 3].as_slice()).unwrap();
    });
    assert!(is_corrupt(RedbStore::open(&path, chain.genesis())));
}
