//! How fast a node's store grows, and what pruning keeps it at: writes
//! `commits` commits into a fresh redb store in batches of 100 and prints
//! the file size per commit; then writes as many again, pruning to the
//! last `KEEP` commits as they come, and prints the size once more; and
//! for comparison writes all of them into a second store unpruned. (redb
//! grows its file in steps and reuses the pages pruning frees.)
//!
//! `cargo run --release -p soma-bench --example disk_growth [commits] [transactions-per-block]`

use soma_chain::{ChainBuilder, ChainConfig};
use soma_store::{ConsensusStore, RedbStore};

const KEEP: u64 = 1_000;

fn main() {
    let mut args = std::env::args().skip(1);
    let commits: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let transactions: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(2);
    let chain = ChainBuilder::new(ChainConfig {
        transactions_per_block: transactions,
        ..ChainConfig::validators(4)
    })
    .build(commits * 2);
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("chain.redb");
    let store = RedbStore::open(&path, chain.genesis()).expect("the store opens");
    let size = || std::fs::metadata(&path).map_or(0, |m| m.len());
    let ranges = chain.batch_ranges(100);
    let (first, second) = ranges.split_at(ranges.len() / 2);
    for range in first {
        store
            .write_synced_batch(chain.batch(range.clone()))
            .unwrap();
    }
    let full = size();
    println!(
        "{commits} commits, 4 validators, {transactions} transactions of {} bytes per block: \
         {full} bytes, {} bytes per commit",
        ChainConfig::default().payload_bytes,
        full / commits
    );
    for range in second {
        store
            .write_synced_batch(chain.batch(range.clone()))
            .unwrap();
        let watermark = *range.end();
        store
            .prune_below(watermark.saturating_sub(KEEP - 1))
            .unwrap();
    }
    println!(
        "{commits} more, pruned to the last {KEEP} as they came: {} bytes (lowest commit {})",
        size(),
        store.lowest_available_commit().unwrap()
    );
    let path = dir.path().join("unpruned.redb");
    let unpruned = RedbStore::open(&path, chain.genesis()).expect("the store opens");
    for range in ranges {
        unpruned.write_synced_batch(chain.batch(range)).unwrap();
    }
    let size = std::fs::metadata(&path).map_or(0, |m| m.len());
    println!("all {} commits unpruned: {size} bytes", commits * 2);
}
