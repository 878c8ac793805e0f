//! `soma-p2p status`: asks a running node, as an anonymous caller, for its
//! chain, heights, health and known peers.

use std::time::Duration;

use soma_types::{SignedNodeInfo, codec};
use soma_wire::convert::Availability;
use soma_wire::proto::{self, p2p_client::P2pClient};
use soma_wire::tls::with_causes;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

/// What `status` reports.
#[derive(Debug)]
pub struct NodeStatus {
    /// The node's availability.
    pub availability: Availability,
    /// The node's peer id, proven by its certificate.
    pub peer_id: soma_types::PeerId,
    /// Health of the P2p service.
    pub serving: bool,
    /// Peers the node advertises.
    pub known_peers: Vec<SignedNodeInfo>,
}

/// Queries the node at `address`, each call (the connection, then each of
/// the three questions) given `timeout` to answer: a node that takes the
/// connection and never answers its height is an error, not waited for
/// (health unanswered reads as not serving, peers as none).
pub async fn query(address: &str, timeout: Duration) -> Result<NodeStatus, String> {
    let (channel, peer_id) = soma_wire::tls::connect(address, None, None, timeout)
        .await
        .map_err(|e| {
            let hint = match &e {
                soma_wire::tls::TlsError::Connect(_) if e.to_string().contains("refused") => {
                    " (nothing listens there: is the node running, and is this its \
                     listen-address?)"
                }
                soma_wire::tls::TlsError::Connect(_)
                    if e.to_string().contains("InvalidContentType") =>
                {
                    " (not a node's gRPC port: its metrics-address, or another service?)"
                }
                soma_wire::tls::TlsError::Timeout => {
                    " (no answer: a firewall dropping packets, or a host that is down)"
                }
                _ => "",
            };
            format!("cannot reach {address}: {e}{hint}")
        })?;
    let mut client = P2pClient::new(channel.clone());
    let availability = client.get_commit_availability(proto::GetCommitAvailabilityRequest {});
    let availability = tokio::time::timeout(timeout, availability)
        .await
        .map_err(|_| format!("availability: no answer from {address} in {timeout:?}"))?
        .map_err(|s| format!("availability: {}", status_causes(&s)))?;
    let availability = Availability::try_from(availability.get_ref()).map_err(|e| e.to_string())?;
    let mut health = HealthClient::new(channel);
    let health = health.check(HealthCheckRequest {
        service: "soma.p2p.v1.P2p".into(),
    });
    let serving = tokio::time::timeout(timeout, health)
        .await
        .is_ok_and(|r| r.is_ok_and(|r| r.get_ref().status == 1));
    let peers = client.get_known_peers(proto::GetKnownPeersRequest::default());
    let known_peers = match tokio::time::timeout(timeout, peers).await {
        Ok(Ok(r)) => r
            .into_inner()
            .known_peers
            .iter()
            .filter_map(|b| codec::decode(b, 4096).ok())
            .collect(),
        // Refused or unanswered: the report says no peers.
        _ => Vec::new(),
    };
    Ok(NodeStatus {
        availability,
        peer_id,
        serving,
        known_peers,
    })
}

/// A failed call's message, its causes and, for a connection that failed
/// under the first call after its handshake, what that most likely means
/// (TLS 1.3 shows a refused client only then; how it shows varies).
fn status_causes(status: &tonic::Status) -> String {
    let text = with_causes(
        status.message().to_string(),
        std::error::Error::source(status),
    );
    if text.contains("transport error") {
        format!(
            "{text} (the connection failed right after the handshake: a private node, \
             access = \"private\", which serves only the peers on its allowlist (`status` \
             connects without a key), or a node at its connection limit, or stopping)"
        )
    } else {
        text
    }
}

/// Prints a status report.
pub fn print(address: &str, s: &NodeStatus) {
    println!("node        {address}");
    println!("peer id     {}", hex::encode(s.peer_id.0));
    println!("chain id    {}", hex::encode(s.availability.chain_id.0.0));
    println!(
        "health      {}",
        if s.serving { "serving" } else { "not serving" }
    );
    println!("highest     {}", s.availability.highest);
    println!("lowest      {}", s.availability.lowest);
    println!("peers       {}", s.known_peers.len());
    for p in &s.known_peers {
        println!(
            "  {}  {}",
            hex::encode(&p.info.peer_id.0[..8]),
            // Another node's strings: control characters escaped, so a
            // hostile one cannot drive the terminal.
            p.info
                .addresses
                .iter()
                .map(|a| a.escape_default().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use soma_chain::{ChainBuilder, ChainConfig};
    use soma_testkit::byzantine::{Lie, serve_observed_slow_heights};

    /// A node that takes the connection and holds its height answer (for
    /// an hour here) is reported once the timeout passes; before, `status`
    /// waited as long as the node held the call.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_node_holding_its_height_answer_is_reported_at_the_timeout() {
        let chain = Arc::new(ChainBuilder::new(ChainConfig::validators(4)).build(10));
        let hour = Duration::from_secs(3600);
        let node = serve_observed_slow_heights(chain, Lie::MissingBlock, 7, hour).await;
        let timeout = Duration::from_secs(3);
        let error = super::query(&node.address, timeout).await.unwrap_err();
        assert_eq!(
            error,
            format!("availability: no answer from {} in 3s", node.address)
        );
    }
}
