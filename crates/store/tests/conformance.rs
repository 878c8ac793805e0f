//! Both stores pass the conformance suite.

use std::sync::atomic::{AtomicUsize, Ordering};

use soma_store::{MemStore, RedbStore, conformance};
use tempfile::TempDir;

#[test]
fn mem_store_conforms() {
    conformance::run_all(MemStore::new);
}

#[test]
fn redb_store_conforms() {
    let dir = TempDir::new().unwrap();
    // Each check gets a fresh database file in the same directory.
    let next = AtomicUsize::new(0);
    conformance::run_all(|genesis| {
        let n = next.fetch_add(1, Ordering::Relaxed);
        RedbStore::open(dir.path().join(format!("store-{n}.redb")), genesis).unwrap()
    });
}
