//! Fetch slots through the PeerHeights actor: a slot granted to a worker
//! that stopped waiting is released, so a peer's slots never leak.

use std::time::Duration;

use actix::Actor;
use soma_actors::connections::PeerEvent;
use soma_actors::peer_heights::{
    AcquireError, AcquirePeer, Config, Deps, FetchKind, PeerHeights, Transfer, UpdateHeight,
};
use soma_types::{ChainId, Digest, PeerId};

const PEER: PeerId = PeerId([1; 32]);
const CHAIN: ChainId = ChainId(Digest([7; 32]));

fn acquire(wait_ms: u64) -> AcquirePeer {
    AcquirePeer {
        start: 1,
        end: 10,
        kind: FetchKind::Blocks,
        avoid: Vec::new(),
        wait_ms,
        spare_only: false,
    }
}

#[actix_rt::test]
async fn a_slot_granted_after_its_worker_stopped_waiting_is_released() {
    let config = Config {
        max_fetches_per_peer: 1,
        ..Config::new(CHAIN, 1)
    };
    let heights = PeerHeights::new(Deps::new(config, None, 64), None).start();
    let connected = PeerEvent::Connected {
        peer: PEER,
        address: "10.0.0.1:1".into(),
    };
    heights.send(connected).await.unwrap();
    let claim = UpdateHeight {
        peer: PEER,
        chain_id: CHAIN,
        highest: 100,
        lowest: 1,
    };
    heights.send(claim).await.unwrap();

    let held = heights.send(acquire(60_000)).await.unwrap().unwrap();
    assert_eq!(held.lease().peer, PEER);
    // A second worker waits for the one slot, then gives up and goes away.
    let gave_up = tokio::time::timeout(Duration::from_millis(50), heights.send(acquire(60_000)));
    assert!(
        gave_up.await.is_err(),
        "the slot is taken: the request waits"
    );
    // The slot freed is granted to the request that went away ...
    held.release(Transfer::Received, 0);
    // ... and released again at once: a new request gets it, not `Busy`.
    let again = heights.send(acquire(200)).await.unwrap();
    assert!(
        again.as_ref().is_ok_and(|s| s.lease().peer == PEER),
        "the slot leaked: {again:?}"
    );
    // With the slot held, one more request waits and is refused at the end
    // of its wait: exactly one slot for the peer.
    let busy = heights.send(acquire(100)).await.unwrap();
    assert_eq!(busy.err(), Some(AcquireError::Busy));
}
