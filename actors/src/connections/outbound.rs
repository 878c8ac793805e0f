//! The one way to call a peer: get its client from Connections, bound the
//! call by the request timeout, and type what went wrong.

use crate::dropped::{Droppable, try_send_to};
use std::future::Future;
use std::time::Duration;

use actix::{Addr, Recipient};
use serde::{Deserialize, Serialize};
use soma_types::PeerId;
use soma_wire::proto::p2p_client::P2pClient;
use tonic::transport::Channel;

use super::actor::Connections;
use super::messages::{GetClient, ReportBroken};

/// The gRPC client of a connected peer.
pub type Client = P2pClient<Channel>;

/// Largest answer taken to a call whose answer has a fixed size:
/// GetCommitAvailability (a 32-byte chain id and two numbers, 56 bytes at
/// most) and PushCommit (nothing), with room for fields a later version
/// may add. Without it each such call in flight could be made to decode
/// the client's cap for every call, 8 MiB.
pub const MAX_SMALL_ANSWER_BYTES: usize = 1 << 10;

/// `client`, taking answers of at most [`MAX_SMALL_ANSWER_BYTES`].
fn small(client: Client) -> Client {
    client.max_decoding_message_size(MAX_SMALL_ANSWER_BYTES)
}

/// GetCommitAvailability on `client`, its answer capped as a fixed-size
/// one: the one way a dial's first call, the probe and the height query
/// ask it.
pub(crate) async fn ask_availability(
    client: Client,
    request: tonic::Request<soma_wire::proto::GetCommitAvailabilityRequest>,
) -> Result<tonic::Response<soma_wire::proto::GetCommitAvailabilityResponse>, tonic::Status> {
    small(client).get_commit_availability(request).await
}

/// PushCommit on `client`, its answer capped as a fixed-size one: the one
/// way the sync worker pushes a height.
pub(crate) async fn push_commit(
    client: Client,
    request: tonic::Request<soma_wire::proto::PushCommitRequest>,
) -> Result<tonic::Response<soma_wire::proto::PushCommitResponse>, tonic::Status> {
    small(client).push_commit(request).await
}

/// Why a call to a peer failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(rename_all = "snake_case")]
pub enum CallError {
    /// We hold no connection to the peer (it left, or Connections is
    /// restarting), or Connections did not hand out its client within the
    /// call's timeout.
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
    /// which is a timeout; by the peer resetting this call's stream alone
    /// (an HTTP/2 `RST_STREAM` it sent, as a server does when it cuts an
    /// answer at its send deadline), which is the peer's answer too, its
    /// connection still up; or by the transport failing under the call.
    pub fn from_status(status: &tonic::Status) -> Self {
        let answered = CallError::Status {
            code: status.code() as i32,
        };
        let mut source = std::error::Error::source(status);
        if source.is_none() {
            return answered;
        }
        while let Some(e) = source {
            if e.is::<tonic::TimeoutExpired>() {
                return CallError::Timeout;
            }
            if let Some(h2) = e.downcast_ref::<h2::Error>()
                && h2.is_reset()
                && h2.is_remote()
            {
                return answered;
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
    clients: Recipient<GetClient>,
    broken: Recipient<ReportBroken>,
    timeout: Duration,
}

impl Outbound {
    /// Calls through `connections`, each bounded by `timeout`.
    pub fn new(connections: Addr<Connections>, timeout: Duration) -> Self {
        Self::through(
            connections.clone().recipient(),
            connections.recipient(),
            timeout,
        )
    }

    /// Calls with the clients `clients` hands out, reporting broken
    /// connections to `broken`.
    fn through(
        clients: Recipient<GetClient>,
        broken: Recipient<ReportBroken>,
        timeout: Duration,
    ) -> Self {
        Outbound {
            clients,
            broken,
            timeout,
        }
    }

    /// The timeout of every call.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Sends `message` to `peer` with `call` (for instance
    /// `|mut c, r| async move { c.fetch_commits(r).await }`), the request
    /// carrying the timeout as its gRPC deadline. The timeout runs from
    /// this call on: asking Connections for the peer's client (which waits
    /// while Connections is busy or restarting) and the whole of `call`,
    /// reading a streamed answer included, must end within it. A client
    /// that does not come within it is [`CallError::NoConnection`], our
    /// side's failure, never held against the peer.
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
        let deadline = tokio::time::Instant::now() + self.timeout;
        let asked = tokio::time::timeout_at(deadline, self.clients.send(GetClient(peer)));
        let (connection, client) = match asked.await {
            Ok(Ok(Some(held))) => held,
            // Not connected, Connections gone, or no client in time.
            _ => return Err(CallError::NoConnection),
        };
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let result = call_client(client, left, message, call).await;
        if result.as_ref().err() == Some(&CallError::Transport) {
            // The probe finds a broken connection too, if this is dropped.
            let report = ReportBroken { peer, connection };
            try_send_to(&self.broken, report, Droppable::ReportBroken);
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
    use actix::{Actor, Context, Handler, ResponseFuture};
    use soma_wire::proto;

    /// Connections that never hands out a client: busy, or waiting to be
    /// restarted.
    struct Unanswering;

    impl Actor for Unanswering {
        type Context = Context<Self>;
    }

    impl Handler<GetClient> for Unanswering {
        type Result = ResponseFuture<Option<(u64, Client)>>;
        fn handle(&mut self, _: GetClient, _: &mut Context<Self>) -> Self::Result {
            Box::pin(std::future::pending())
        }
    }

    impl Handler<ReportBroken> for Unanswering {
        type Result = ();
        fn handle(&mut self, _: ReportBroken, _: &mut Context<Self>) {}
    }

    /// The timeout runs from the call on: a call whose client never comes
    /// ends at the request timeout, not never, as a connection we do not
    /// have (our side's failure), not as the peer's timeout.
    #[actix_rt::test]
    async fn a_call_ends_at_its_timeout_when_connections_never_hands_out_the_client() {
        tokio::time::pause();
        let connections = Unanswering.start();
        let timeout = Duration::from_secs(10);
        let outbound = Outbound::through(
            connections.clone().recipient(),
            connections.recipient(),
            timeout,
        );
        let started = tokio::time::Instant::now();
        let call = outbound.call(
            PeerId([1; 32]),
            proto::GetCommitAvailabilityRequest {},
            |mut c, r| async move { c.get_commit_availability(r).await },
        );
        let result = tokio::time::timeout(2 * timeout, call)
            .await
            .expect("the call ended by itself");
        assert_eq!(result.err(), Some(CallError::NoConnection));
        // tokio's timers fire on the millisecond after their deadline.
        let elapsed = started.elapsed();
        assert!(
            elapsed >= timeout && elapsed <= timeout + Duration::from_millis(1),
            "{elapsed:?}"
        );
    }

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

    /// A peer that answers PushCommit, whose answer takes no byte, with
    /// 64 KiB of a field the answer does not have is refused at the small
    /// answers' cap: a push in flight holds no more of its answer than
    /// that. The same answer to a client without the cap decodes (a
    /// decoder skips a field it does not know), so the cap is what
    /// refuses it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_push_answer_past_the_small_answers_cap_is_refused() {
        use soma_testkit::byzantine::{Lie, PADDED_PUSH_ANSWER_BYTES, serve_observed};
        const { assert!(PADDED_PUSH_ANSWER_BYTES > MAX_SMALL_ANSWER_BYTES) };

        let chain = soma_chain::ChainBuilder::new(soma_chain::ChainConfig::validators(4)).build(2);
        let liar = serve_observed(std::sync::Arc::new(chain), Lie::PadsPushAnswers, 41).await;
        let identity =
            soma_wire::tls::NodeIdentity::generate(&soma_types::KeyPair::from_seed([42; 32]))
                .expect("an identity");
        let (channel, _) = soma_wire::tls::connect(
            &liar.address,
            Some(&identity),
            Some(liar.peer),
            Duration::from_secs(5),
        )
        .await
        .expect("connects");
        let client = Client::new(channel);
        let push = |index| tonic::Request::new(proto::PushCommitRequest { index });
        let status = push_commit(client.clone(), push(7)).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::OutOfRange, "{status:?}");
        let uncapped = client.max_decoding_message_size(usize::MAX);
        let answer = uncapped.clone().push_commit(push(8)).await;
        assert!(answer.is_ok(), "{answer:?}");
        assert_eq!(*liar.pushes.lock().unwrap(), vec![7, 8]);
    }
}
