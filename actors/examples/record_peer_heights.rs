//! Runs the PeerHeights actor through a small sync scenario with recording
//! on, writing the trace to the path given (default:
//! `tests/replays/peer_heights_real_run.jsonl`).
//!
//! ```sh
//! cargo run -p soma-actors --example record_peer_heights -- tests/replays/peer_heights_real_run.jsonl
//! ```

use std::path::PathBuf;

use actix::Actor;
use soma_actors::connections::PeerEvent;
use soma_actors::peer_heights::{
    Config, Deps, FetchKind, HighestKnownCommit, OutcomeKind, PeerHeights, PeersBehind,
    PeersForRange, RemovePeer, ReportOutcome, Snapshot, UpdateHeight,
};
use soma_actors::replay::Recorder;
use soma_types::{ChainId, Digest, PeerId};

fn main() -> std::io::Result<()> {
    let path = std::env::args().nth(1).map_or_else(
        || PathBuf::from("tests/replays/peer_heights_real_run.jsonl"),
        PathBuf::from,
    );
    let recorder = Recorder::to_file(&path)?;
    let ours = ChainId(Digest([1; 32]));
    let theirs = ChainId(Digest([2; 32]));
    let peer = |n: u8| PeerId([n; 32]);

    actix_rt::System::new().block_on(async move {
        let deps = Deps::new(Config::new(ours, 2024), None, 1024);
        let heights = PeerHeights::new(deps, Some(recorder)).start();
        let update = |p: u8, chain, lowest, highest| UpdateHeight {
            peer: peer(p),
            chain_id: chain,
            highest,
            lowest,
        };
        // Three peers on our chain, one on another; only connected peers
        // are tracked.
        for p in 1..=4 {
            heights
                .send(PeerEvent::Connected {
                    peer: peer(p),
                    address: format!("10.0.0.{p}:8080"),
                })
                .await
                .unwrap();
        }
        heights.send(update(1, ours, 1, 400)).await.unwrap();
        heights.send(update(2, ours, 1, 350)).await.unwrap();
        heights.send(update(3, ours, 101, 420)).await.unwrap();
        heights.send(update(4, theirs, 1, 9_000)).await.unwrap();
        println!(
            "highest known: {:?}",
            heights.send(HighestKnownCommit).await.unwrap()
        );
        // Batches of 100 from whoever covers them; outcomes feed the balancer.
        for (start, end) in [(1, 100), (101, 200), (201, 300), (301, 400)] {
            let peers = heights.send(PeersForRange { start, end }).await.unwrap();
            println!("{start}..={end}: {} peers", peers.len());
            if let Some(first) = peers.first() {
                let kind = if first == &peer(2) {
                    OutcomeKind::Timeout
                } else {
                    OutcomeKind::Success(FetchKind::Commits)
                };
                heights
                    .send(ReportOutcome {
                        peer: *first,
                        bytes: 2_000_000,
                        latency_ms: 40,
                        kind,
                    })
                    .await
                    .unwrap();
            }
        }
        // Peer 3 sends a forged block and is banned; peer 2 leaves.
        heights
            .send(ReportOutcome {
                peer: peer(3),
                bytes: 0,
                latency_ms: 5,
                kind: OutcomeKind::InvalidData,
            })
            .await
            .unwrap();
        heights.send(RemovePeer { peer: peer(2) }).await.unwrap();
        heights.send(update(1, ours, 1, 430)).await.unwrap();
        println!(
            "highest known: {:?}",
            heights.send(HighestKnownCommit).await.unwrap()
        );
        println!(
            "behind 430: {:?}",
            heights
                .send(PeersBehind { index: 430 })
                .await
                .unwrap()
                .len()
        );
        println!(
            "snapshot: {} peers",
            heights.send(Snapshot).await.unwrap().len()
        );
    });
    println!("trace written to {}", path.display());
    Ok(())
}
