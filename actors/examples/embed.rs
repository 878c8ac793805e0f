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
    let mut commits = p2p.subscribe_synced_commits();
    let mut executed = 0;
    while executed < 500 {
        let subdag = commits.recv().await?;
        // Execute the commit's blocks, in order.
        executed += 1;
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
