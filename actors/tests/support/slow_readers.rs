//! Clients that ask a node for data and never read the answers.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use soma_actors::{P2pBuilder, P2pConfig, P2pHandle};
use soma_chain::Chain;
use soma_store::ConsensusStore;
use soma_types::KeyPair;
use soma_wire::proto::{self, p2p_client::P2pClient};
use soma_wire::tls::{self, NodeIdentity};
use tonic::transport::{Channel, Endpoint};

/// A node serving all of `chain` from `store` with `config`.
pub fn server(chain: &Chain, config: P2pConfig, store: Arc<dyn ConsensusStore>) -> P2pHandle {
    chain
        .write_to(store.as_ref(), 100)
        .expect("a built chain is written");
    P2pBuilder::new(
        config,
        KeyPair::from_seed([1; 32]),
        chain.genesis().clone(),
        store,
    )
    .start()
    .expect("the server starts")
}

/// A client of `node` on a connection of its own, as the identity of
/// `key`; each of its HTTP/2 streams opens with a window of `window` bytes
/// (0: the server may send no data until the client reads, which it never
/// does).
pub async fn client(node: &P2pHandle, key: [u8; 32], window: u32) -> P2pClient<Channel> {
    let identity = NodeIdentity::generate(&KeyPair::from_seed(key)).expect("an identity");
    client_as(node, Some(&identity), window).await
}

/// Like [`client`], as `identity` (`None`: anonymous).
pub async fn client_as(
    node: &P2pHandle,
    identity: Option<&NodeIdentity>,
    window: u32,
) -> P2pClient<Channel> {
    let endpoint = Endpoint::from_shared(format!("http://{}", node.local_addr()))
        .expect("an address")
        .initial_stream_window_size(window)
        .connect_timeout(Duration::from_secs(5));
    let (config, _) = tls::client_config(identity, Some(node.peer_id())).expect("tls");
    let connector = tonic_tls::rustls::TlsConnector::new(
        tonic_tls::TcpTransport::from_endpoint(&endpoint),
        config,
        ServerName::try_from(tls::SERVER_NAME).expect("a name"),
    );
    let channel = endpoint
        .connect_with_connector(connector)
        .await
        .expect("connects");
    P2pClient::new(channel).max_decoding_message_size(usize::MAX)
}

/// The references of every block of commits `1..=commits`.
pub fn block_refs(chain: &Chain, commits: u64) -> Vec<proto::BlockRef> {
    (1..=commits)
        .flat_map(|i| chain.blocks_of(i).iter().map(|b| b.reference().into()))
        .collect()
}

/// Waits until `node` has `n` fetches in flight, polling every 10 ms;
/// panics after `deadline`.
pub async fn wait_fetches(node: &P2pHandle, n: usize, deadline: Duration) {
    let start = Instant::now();
    while node.fetches_in_flight() != n {
        assert!(
            start.elapsed() < deadline,
            "{} fetches in flight, waited for {n}",
            node.fetches_in_flight()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
