//! The one way to call a peer: get its client from Connections, bound the
//! call by the request timeout, and type what went wrong.

use crate::dropped::{Droppable, try_send};
use std::future::Future;
use std::time::Duration;

use actix::Addr;
use serde::{Deserialize, Serialize};
use soma_types::PeerId;
use soma_wire::proto::p2p_client::P2pClient;
use tonic::transport::Channel;

use super::actor::Connections;
use super::messages::{GetClient, ReportBroken};

/// The gRPC client of a connected peer.
pub type Client = P2pClient<Channel>;

/// Why a call to a peer failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(rename_all = "snake_case")]
pub enum CallError {
    /// We hold no connection to the peer (it left, or Connections is
    /// restarting).
    #[error("not connected")]
    NoConnection,
    /// The peer did not answer within the request timeout.
    #[error("timed out")]
    Timeout,
    /// The peer answered with an error status (the gRPC code).
    #[error("status {code}")]
    Status {
        /// The gRPC status code.
        code: i32,
    },
    /// The connection failed under the call (reset, closed, unreachable).
    #[error("transport failed")]
    Transport,
}

impl CallError {
    /// What a status seen by a client means. One without a source error is
    /// the peer's answer. One with a source was made on our side: by the
    /// client's own deadline (the request's timeout, `TimeoutExpired`),
    /// which is a timeout, or by the transport failing under the call.
    pub fn from_status(status: &tonic::Status) -> Self {
        let mut source = std::error::Error::source(status);
        if source.is_none() {
            return CallError::Status {
                code: status.code() as i32,
            };
        }
        while let Some(e) = source {
            if e.is::<tonic::TimeoutExpired>() {
                return CallError::Timeout;
            }
            source = e.source();
        }
        CallError::Transport
    }

    /// Whether the peer answered NOT_FOUND.
    pub fn is_not_found(&self) -> bool {
        *self
            == CallError::Status {
                code: tonic::Code::NotFound as i32,
            }
    }
}

/// Calls peers through the clients Connections holds. A transport failure
/// is reported to Connections, which drops the connection and tells its
/// subscribers, so every caller notices a dead peer the same way.
#[derive(Clone)]
pub struct Outbound {
    connections: Addr<Connections>,
    timeout: Duration,
}

impl Outbound {
    /// Calls through `connections`, each bounded by `timeout`.
    pub fn new(connections: Addr<Connections>, timeout: Duration) -> Self {
        Outbound {
            connections,
            timeout,
        }
    }

    /// The timeout of every call.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Sends `message` to `peer` with `call` (for instance
    /// `|mut c, r| async move { c.fetch_commits(r).await }`), the request
    /// carrying the timeout as its gRPC deadline; the whole of `call`,
    /// reading a streamed answer included, must end within it.
    pub async fn call<M, T, F, Fut>(
        &self,
        peer: PeerId,
        message: M,
        call: F,
    ) -> Result<T, CallError>
    where
        F: FnOnce(Client, tonic::Request<M>) -> Fut,
        Fut: Future<Output = Result<T, tonic::Status>>,
    {
        let client = match self.connections.send(GetClient(peer)).await {
            Ok(Some(client)) => client,
            Ok(None) | Err(_) => return Err(CallError::NoConnection),
        };
        let result = call_client(client, self.timeout, message, call).await;
        if result.as_ref().err() == Some(&CallError::Transport) {
            // The probe finds a broken connection too, if this is dropped.
            try_send(
                &self.connections,
                ReportBroken { peer },
                Droppable::ReportBroken,
            );
        }
        result
    }
}

/// Sends `message` with `call` on `client`, bounded by `timeout`.
pub(crate) async fn call_client<M, T, F, Fut>(
    client: Client,
    timeout: Duration,
    message: M,
    call: F,
) -> Result<T, CallError>
where
    F: FnOnce(Client, tonic::Request<M>) -> Fut,
    Fut: Future<Output = Result<T, tonic::Status>>,
{
    let mut request = tonic::Request::new(message);
    request.set_timeout(timeout);
    match tokio::time::timeout(timeout, call(client, request)).await {
        Err(_) => Err(CallError::Timeout),
        Ok(Err(status)) => Err(CallError::from_status(&status)),
        Ok(Ok(answer)) => Ok(answer),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_is_the_peers_answer_a_timeout_or_a_failed_transport() {
        let answered = tonic::Status::not_found("no such commit");
        assert!(CallError::from_status(&answered).is_not_found());
        let unavailable = tonic::Status::unavailable("shutting down");
        assert_eq!(
            CallError::from_status(&unavailable),
            CallError::Status {
                code: tonic::Code::Unavailable as i32
            }
        );
        // The client's deadline, as tonic reports it.
        let deadline = tonic::Status::from_error(Box::new(tonic::TimeoutExpired(())));
        assert_eq!(CallError::from_status(&deadline), CallError::Timeout);
        let reset = tonic::Status::from_error(Box::new(std::io::Error::from(
            std::io::ErrorKind::ConnectionReset,
        )));
        assert_eq!(CallError::from_status(&reset), CallError::Transport);
    }
}
