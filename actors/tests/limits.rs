//! Fetch slots held to their exact limits: per caller, in all, and one
//! allowance shared by every anonymous caller. The clients here open their
//! streams with a window of 0, so no admitted answer can finish and give
//! its slot back: every admission and refusal is counted exactly.

#[path = "support/slow_readers.rs"]
mod support;

use std::sync::Arc;
use std::time::Duration;

use soma_actors::P2pConfig;
use soma_chain::{ChainBuilder, ChainConfig};
use soma_store::MemStore;
use soma_wire::proto::{self, p2p_client::P2pClient};
use support::{block_refs, client, client_as, server, wait_fetches};
use tonic::Code;
use tonic::codec::Streaming;
use tonic::transport::Channel;

const PER_PEER: usize = 4;
const IN_ALL: usize = 16;
const DEADLINE: Duration = Duration::from_secs(30);

/// What `calls` FetchBlocks of `client` got, in order: the streams
/// admitted (held open) and the refusals' messages.
async fn ask(
    client: &mut P2pClient<Channel>,
    calls: usize,
    refs: &[proto::BlockRef],
    held: &mut Vec<Streaming<proto::FetchBlocksResponse>>,
) -> Vec<Result<(), String>> {
    let mut outcomes = Vec::new();
    for _ in 0..calls {
        let request = proto::FetchBlocksRequest {
            refs: refs.to_vec(),
            ..Default::default()
        };
        match client.fetch_blocks(request).await {
            Ok(stream) => {
                held.push(stream.into_inner());
                outcomes.push(Ok(()));
            }
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                outcomes.push(Err(status.message().to_string()));
            }
        }
    }
    outcomes
}

fn admitted(outcomes: &[Result<(), String>]) -> usize {
    outcomes.iter().filter(|o| o.is_ok()).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_slots_hold_exactly_per_caller_in_all_and_for_anonymous_callers() {
    let chain = Arc::new(ChainBuilder::new(ChainConfig::validators(4)).build(100));
    let mut config = P2pConfig::default();
    config.grpc.max_concurrent_fetches_per_peer = PER_PEER;
    config.grpc.max_concurrent_fetches = IN_ALL;
    // Nothing is cut during the test: the slots stay held.
    config.grpc.send_timeout = Duration::from_secs(3_600);
    config.grpc.fetch_stall_timeout = Duration::from_secs(3_600);
    let node = server(&chain, config, Arc::new(MemStore::new(chain.genesis())));
    let refs = block_refs(&chain, 100);
    let mut held = Vec::new();

    // One caller: its first four are admitted, the rest refused.
    let mut a = client(&node, [100; 32], 0).await;
    let outcomes = ask(&mut a, 7, &refs, &mut held).await;
    assert_eq!(admitted(&outcomes[..PER_PEER]), PER_PEER, "{outcomes:?}");
    for refused in &outcomes[PER_PEER..] {
        let message = refused.as_ref().unwrap_err();
        assert_eq!(
            message,
            &format!("at most {PER_PEER} fetches at once per peer")
        );
    }
    wait_fetches(&node, PER_PEER, DEADLINE).await;

    // Anonymous callers on three connections share one allowance.
    let mut anonymous = Vec::new();
    for _ in 0..3 {
        anonymous.push(client_as(&node, None, 0).await);
    }
    let mut outcomes = Vec::new();
    for c in &mut anonymous {
        outcomes.extend(ask(c, 2, &refs, &mut held).await);
    }
    assert_eq!(
        outcomes.iter().map(Result::is_ok).collect::<Vec<_>>(),
        [true, true, true, true, false, false],
        "{outcomes:?}"
    );
    wait_fetches(&node, 2 * PER_PEER, DEADLINE).await;

    // Two more callers fill the node: 16 in all; a fifth caller, below
    // its own cap, is refused because the node is full.
    for key in [101, 102] {
        let mut c = client(&node, [key; 32], 0).await;
        let outcomes = ask(&mut c, PER_PEER, &refs, &mut held).await;
        assert_eq!(admitted(&outcomes), PER_PEER, "{outcomes:?}");
    }
    wait_fetches(&node, IN_ALL, DEADLINE).await;
    let mut late = client(&node, [103; 32], 0).await;
    let outcomes = ask(&mut late, 1, &refs, &mut held).await;
    let message = outcomes[0].as_ref().unwrap_err();
    assert_eq!(message, "too many fetches in progress");
    assert_eq!(held.len(), IN_ALL);
    assert_eq!(node.fetches_in_flight(), IN_ALL);

    // Dropping the streams gives every slot back: the late caller is
    // admitted up to its own cap.
    held.clear();
    wait_fetches(&node, 0, DEADLINE).await;
    let outcomes = ask(&mut late, PER_PEER + 1, &refs, &mut held).await;
    assert_eq!(admitted(&outcomes), PER_PEER, "{outcomes:?}");
    held.clear();
    node.shutdown().await;
}
