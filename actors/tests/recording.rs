//! Traces recorded by the real actor shells replay exactly against fresh
//! cores: what the shells feed their cores is all the cores depend on.

use actix::Actor;
use soma_actors::HashedBlob;
use soma_actors::connections::PeerEvent;
use soma_actors::peer_heights::{
    Config as HeightsConfig, Deps as HeightsDeps, FetchKind, HighestKnownCommit, OutcomeKind,
    PeerHeights, PeersForRange, ReportOutcome, UpdateHeight,
};
use soma_actors::replay::{Recorder, check};
use soma_actors::verifier::{
    Config, Deps, InstallCommittee, Verifier, Verify, VerifyError, VerifyRequest, VerifyResponse,
};
use soma_chain::{ChainBuilder, ChainConfig};
use soma_types::PeerId;

#[actix_rt::test]
async fn recorded_actor_runs_replay_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let chain = ChainBuilder::new(ChainConfig::validators(4)).build(30);

    let heights_trace = dir.path().join("heights.jsonl");
    let heights = PeerHeights::new(
        HeightsDeps::new(HeightsConfig::new(chain.chain_id(), 5), None, 64),
        Some(Recorder::to_file(&heights_trace).unwrap()),
    )
    .start();
    for p in 1..=5u8 {
        heights
            .send(PeerEvent::Connected {
                peer: PeerId([p; 32]),
                address: format!("10.0.0.{p}:8080"),
            })
            .await
            .unwrap();
        heights
            .send(UpdateHeight {
                peer: PeerId([p; 32]),
                chain_id: chain.chain_id(),
                highest: 10 * u64::from(p),
                lowest: 1,
            })
            .await
            .unwrap();
    }
    for round in 0..10u64 {
        let peers = heights
            .send(PeersForRange { start: 1, end: 20 })
            .await
            .unwrap();
        let kind = if round % 3 == 0 {
            OutcomeKind::Timeout
        } else {
            OutcomeKind::Success(FetchKind::Commits)
        };
        heights
            .send(ReportOutcome {
                peer: peers[0],
                bytes: 1_000 * round,
                latency_ms: 7,
                kind,
            })
            .await
            .unwrap();
    }
    assert_eq!(heights.send(HighestKnownCommit).await.unwrap(), Some(50));

    let verifier_trace = dir.path().join("verifier.jsonl");
    let config = Config {
        threads: 2,
        ..Config::default()
    };
    let verifier = Verifier::new(
        Deps::new(config, 64),
        Some(Recorder::to_file(&verifier_trace).unwrap()),
    )
    .unwrap()
    .start();
    verifier.do_send(InstallCommittee(chain.genesis().clone()));
    let blocks: Vec<HashedBlob> = chain
        .fetch_blocks(1..=10)
        .iter()
        .map(|b| HashedBlob::new(b.serialized().clone()))
        .collect();
    // Epoch 0's committee is installed: the ten commits' blocks verify,
    // in order. Epoch 3 has none: refused as such.
    let mut answers = Vec::new();
    for epoch in [0, 3] {
        let answer = verifier
            .send(Verify(VerifyRequest::Blocks {
                epoch,
                blocks: blocks.clone(),
                check_signatures: true,
            }))
            .await
            .unwrap();
        answers.push(answer);
    }
    match &answers[0] {
        Ok(VerifyResponse::Blocks(verified)) => {
            let got: Vec<_> = verified.iter().map(|b| b.serialized().clone()).collect();
            let sent: Vec<_> = blocks.iter().map(|b| b.bytes().clone()).collect();
            assert_eq!(got, sent);
        }
        other => panic!("epoch 0's blocks verify: {other:?}"),
    }
    assert!(
        matches!(answers[1], Err(VerifyError::UnknownEpoch(3))),
        "{:?}",
        answers[1]
    );
    // The pool reports a finished job just after answering: wait (with a
    // deadline) until the verifier has recorded it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !std::fs::read_to_string(&verifier_trace)
        .unwrap()
        .contains(r#""in":{"done""#)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the job's end was never recorded"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }

    let report = check(&heights_trace).unwrap();
    // Five connections and updates, ten queries with ten outcomes, one
    // last query.
    assert_eq!((report.actor.as_str(), report.inputs), ("peer_heights", 31));
    let report = check(&verifier_trace).unwrap();
    assert_eq!(report.actor, "verifier");
    // Install, two requests, and the Done of the one that ran.
    assert_eq!(report.inputs, 4);
}
