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
        let out = builder.produce_round();
        for (index, blocks) in out.certified {
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
