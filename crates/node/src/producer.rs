//! Block production for the validators of a local network: a ChainBuilder
//! playing the committee, its commits fed to the node through `send_commit`
//! at a fixed rate. Every validator derives the same chain from the genesis
//! seed; a commit the node already synced from a peer is skipped.

use std::time::Duration;

use soma_actors::P2pHandle;
use soma_actors::system::{LocalCommit, P2pError};
use soma_chain::{ChainBuilder, ChainConfig};

/// Produces commits at `rate` per second until `max_commits` (0: forever)
/// or until the node stops. Each commit is handed over with its
/// certificate, which the round after it brings, in one store write.
pub async fn produce(handle: P2pHandle, chain: ChainConfig, rate: f64, max_commits: u64) {
    let mut builder = ChainBuilder::new(chain);
    let period = Duration::from_secs_f64(1.0 / rate.max(0.001));
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut pending: Option<LocalCommit> = None;
    loop {
        // A round catching up to the store's watermark awaits nothing
        // else: yielding here lets the task be stopped at any round.
        tokio::task::yield_now().await;
        let out = builder.produce_round();
        for (index, blocks) in out.certified {
            // Checked before anything is sent: commits up to the limit may
            // arrive by sync instead, and none past it may be produced.
            if max_commits > 0 && index > max_commits {
                return;
            }
            let Some(mut local) = pending.take_if(|p| p.commit.index() == index) else {
                continue;
            };
            local.certificate = blocks;
            let synced = handle
                .store()
                .highest_synced_commit()
                .map_or(0, |c| c.index);
            if index <= synced {
                // Synced from a peer already.
                continue;
            }
            ticker.tick().await;
            match handle.send_commit(local).await {
                Ok(()) => {}
                Err(P2pError::Stopped) => return,
                Err(e) => tracing::warn!(index, %e, "local commit refused"),
            }
            if max_commits > 0 && index >= max_commits {
                return;
            }
        }
        if let Some((commit, blocks, next_committee)) = out.commit {
            pending = Some(LocalCommit {
                commit,
                blocks,
                certificate: Vec::new(),
                next_committee,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use soma_actors::P2pConfig;
    use soma_chain::{ChainBuilder, ChainConfig};
    use soma_store::{ConsensusStore, MemStore};

    use super::produce;

    #[test]
    fn a_node_that_synced_up_to_the_limit_produces_nothing_past_it() {
        let config = ChainConfig::validators(4);
        let chain = ChainBuilder::new(config.clone()).build(30);
        let store = MemStore::new(chain.genesis());
        chain.write_to(&store, 10).unwrap();
        let store: Arc<dyn ConsensusStore> = Arc::new(store);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let node = soma_testkit::node(&chain, 1, P2pConfig::default(), store.clone());
            tokio::time::timeout(
                Duration::from_secs(60),
                produce(node.clone(), config, 1_000.0, 30),
            )
            .await
            .expect("the producer stops at its limit");
            assert_eq!(store.highest_synced_commit().unwrap().index, 30);
            node.shutdown().await;
        });
    }
}
