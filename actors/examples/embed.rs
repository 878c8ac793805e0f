//! Embedding soma-p2p in a node: start the P2P layer on your store, seed it
//! with a peer, and execute the commits it delivers, in order.
//!
//! To be self-contained this example also starts a validator (in the same
//! process) serving a 500-commit chain; a real node would only seed with the
//! network's peers.
//!
//! ```sh
//! cargo run -p soma-actors --example embed
//! ```
//!
//! The tests run it too (`cargo test -p soma-actors --example embed`).

use std::error::Error;
use std::sync::Arc;

use soma_actors::discovery::SeedPeer;
use soma_actors::system::StreamError;
use soma_actors::{P2pBuilder, P2pConfig};
use soma_chain::{ChainBuilder, ChainConfig};
use soma_store::{ConsensusStore, MemStore, RedbStore};
use soma_types::KeyPair;

/// The validator's chain length, and so what the node executes.
const CHAIN_COMMITS: u64 = 500;

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let executed = run().await?;
    println!("executed commits 1..={executed}");
    Ok(())
}

/// Starts a validator and the embedding node, and executes every commit
/// the node delivers up to the validator's tip; returns the last executed.
async fn run() -> Result<u64, Box<dyn Error>> {
    // A validator somewhere on the network (here: in this process).
    let chain = ChainBuilder::new(ChainConfig::validators(4)).build(CHAIN_COMMITS);
    let genesis = chain.genesis().clone();
    let validator_store = MemStore::new(&genesis);
    chain.write_to(&validator_store, 100)?;
    let validator = P2pBuilder::new(
        P2pConfig::default(),
        KeyPair::from_seed([1; 32]),
        genesis.clone(),
        Arc::new(validator_store),
    )
    .start()?;

    // --- the embedding node ---
    let dir = tempfile::tempdir()?;
    let store: Arc<dyn ConsensusStore> =
        Arc::new(RedbStore::open(dir.path().join("chain.redb"), &genesis)?);
    let config = P2pConfig {
        seed_peers: vec![SeedPeer {
            peer_id: Some(validator.peer_id()),
            address: validator.local_addr().to_string(),
        }],
        ..P2pConfig::default()
    };
    let p2p = P2pBuilder::new(config, KeyPair::generate(), genesis, store).start()?;
    // The executor's stream, registered right after start: every commit
    // from the one after the last executed (none yet here), exactly once,
    // in order; sync runs at most `max_lead_over_execution` commits ahead
    // of it, and pruning keeps what it has not taken.
    let mut executed = 0;
    let mut commits = p2p.subscribe_executor_from(executed + 1)?;
    while executed < CHAIN_COMMITS {
        let subdag = match commits.next().await {
            Ok(subdag) => subdag,
            // The store failed: the stream stays where it was; try again.
            Err(StreamError::Store(e)) => {
                eprintln!("store read failed, retrying: {e}");
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        // Execute the commit's blocks, in order. (The stream's promise,
        // checked here because this example is also a test.)
        if subdag.commit_ref.index != executed + 1 {
            return Err(format!(
                "commit {} delivered after commit {executed}",
                subdag.commit_ref.index
            )
            .into());
        }
        executed = subdag.commit_ref.index;
        if executed % 100 == 0 {
            println!(
                "executed commit {executed} ({} blocks, epoch {})",
                subdag.blocks.len(),
                subdag.epoch
            );
        }
    }
    println!("synced: {:?}", p2p.sync_status().await?);
    p2p.shutdown().await;
    validator.shutdown().await;
    Ok(executed)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    /// The example, as a newcomer runs it, executes the validator's whole
    /// chain in order and shuts down. A deadline, not a pause: sync that
    /// stalls fails the test instead of hanging it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_example_executes_the_validators_whole_chain_in_order() {
        let executed = tokio::time::timeout(Duration::from_secs(120), super::run())
            .await
            .expect("the example ends within two minutes")
            .expect("the example runs without error");
        assert_eq!(executed, super::CHAIN_COMMITS);
    }
}
