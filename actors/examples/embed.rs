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

use std::sync::Arc;

use soma_actors::discovery::SeedPeer;
use soma_actors::system::StreamError;
use soma_actors::{P2pBuilder, P2pConfig};
use soma_chain::{ChainBuilder, ChainConfig};
use soma_store::{ConsensusStore, MemStore, RedbStore};
use soma_types::KeyPair;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A validator somewhere on the network (here: in this process).
    let chain = ChainBuilder::new(ChainConfig::validators(4)).build(500);
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
    let mut commits = p2p.subscribe_executor_from(1)?;
    while commits.next_index() <= 500 {
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
        // Execute the commit's blocks, in order.
        if subdag.commit_ref.index % 100 == 0 {
            println!(
                "executed commit {} ({} blocks, epoch {})",
                subdag.commit_ref.index,
                subdag.blocks.len(),
                subdag.epoch
            );
        }
    }
    println!("synced: {:?}", p2p.sync_status().await?);
    p2p.shutdown().await;
    validator.shutdown().await;
    Ok(())
}
