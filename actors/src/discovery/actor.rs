use std::time::Duration;

use actix::{
    Actor, ActorFutureExt, Addr, AsyncContext, Context, Handler, Message, ResponseActFuture,
    WrapFuture,
};
use bytes::Bytes;
use soma_types::{Access, KeyPair, NodeInfo, PeerId, SignedNodeInfo, codec};
use soma_wire::proto;

use super::core::{DiscoveryCore, Init};
use super::messages::*;
use crate::Blob;
use crate::Driver;
use crate::connections::{
    Connect, Connections, GetClient, PeerEvent, ReportBroken, SubscribePeerEvents,
};
use crate::replay::Recorder;
use crate::verifier::{Verifier, Verify, VerifyRequest, VerifyResponse};

/// Infos verified from one peer's answer, for the core.
#[derive(Message)]
#[rtype(result = "()")]
struct Learned {
    /// The peer that answered.
    source: PeerId,
    infos: Vec<SignedNodeInfo>,
    /// When they were verified.
    unix_ms: u64,
}

/// Time for a round.
#[derive(Message)]
#[rtype(result = "()")]
struct Tick;

/// The Discovery actor: a thin shell around [`DiscoveryCore`]. It signs our
/// node info afresh each round, runs GetKnownPeers queries on the tonic
/// runtime, has the Verifier check every info received, and turns dials
/// into [`Connect`] messages.
pub struct Discovery {
    driver: Driver<DiscoveryCore>,
    init: Init,
    key: KeyPair,
    addresses: Vec<String>,
    own_info: Bytes,
    connections: Addr<Connections>,
    verifier: Addr<Verifier>,
    runtime: tokio::runtime::Handle,
    timeout: Duration,
    next_id: u64,
    mailbox_capacity: usize,
}

impl Discovery {
    /// A Discovery actor for the node with network key `key`, advertising
    /// `addresses`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        init: Init,
        key: KeyPair,
        addresses: Vec<String>,
        connections: Addr<Connections>,
        verifier: Addr<Verifier>,
        runtime: tokio::runtime::Handle,
        timeout: Duration,
        mailbox_capacity: usize,
        recorder: Option<Recorder>,
    ) -> Self {
        let mut discovery = Discovery {
            driver: Driver::new(init.clone(), recorder),
            init,
            key,
            addresses,
            own_info: Bytes::new(),
            connections,
            verifier,
            runtime,
            timeout,
            next_id: 0,
            mailbox_capacity,
        };
        discovery.sign_own_info(unix_ms());
        discovery
    }

    fn sign_own_info(&mut self, unix_ms: u64) {
        let info = SignedNodeInfo::sign(
            NodeInfo {
                peer_id: PeerId::from(self.key.public()),
                addresses: self.addresses.clone(),
                timestamp_ms: unix_ms,
                access: self.init.access,
            },
            &self.key,
        );
        self.own_info = Bytes::from(codec::encode(&info));
    }

    fn step(&mut self, input: Input, ctx: &mut Context<Self>) -> Vec<Output> {
        let mut replies = Vec::new();
        for output in self.driver.step(input) {
            match output {
                Output::Query { peer } => self.query(peer, ctx),
                Output::Dial { peer, address } => {
                    self.connections.do_send(Connect { peer, address })
                }
                other => replies.push(other),
            }
        }
        replies
    }

    /// Asks `peer` for its known peers; what comes back is verified before
    /// the core learns it.
    fn query(&self, peer: PeerId, ctx: &mut Context<Self>) {
        let (connections, verifier, addr) = (
            self.connections.clone(),
            self.verifier.clone(),
            ctx.address(),
        );
        let own_info = self.own_info.clone();
        let timeout = self.timeout;
        let local = self.init.local;
        let allowlist = (self.init.access == Access::Private).then(|| self.init.allowlist.clone());
        let max = self.init.config.max_peers_to_send;
        self.runtime.spawn(async move {
            let Ok(Some(mut client)) = connections.send(GetClient(peer)).await else {
                return;
            };
            let mut request = tonic::Request::new(proto::GetKnownPeersRequest { own_info });
            request.set_timeout(timeout);
            let response =
                match tokio::time::timeout(timeout, client.get_known_peers(request)).await {
                    Ok(Ok(r)) => r.into_inner(),
                    Ok(Err(status)) => {
                        tracing::debug!(%peer, %status, "get known peers failed");
                        // A transport failure means the connection is gone:
                        // have it checked now rather than at the next probe.
                        if status.code() == tonic::Code::Unavailable {
                            connections.do_send(ReportBroken { peer });
                        }
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "get known peers timed out");
                        connections.do_send(ReportBroken { peer });
                        return;
                    }
                };
            // Never more than a server may send, whatever it sends.
            let infos: Vec<Blob> = std::iter::once(response.own_info)
                .chain(response.known_peers.into_iter().take(max))
                .map(Blob)
                .collect();
            let now_ms = unix_ms();
            let request = VerifyRequest::NodeInfos {
                infos,
                now_ms,
                local,
                allowlist,
            };
            if let Ok(Ok(VerifyResponse::NodeInfos(results))) = verifier.send(Verify(request)).await
            {
                let rejected = results.iter().filter(|r| r.is_err()).count();
                if rejected > 0 {
                    tracing::debug!(%peer, rejected, "refused node infos");
                }
                addr.do_send(Learned {
                    source: peer,
                    infos: results.into_iter().filter_map(Result::ok).collect(),
                    unix_ms: now_ms,
                });
            }
        });
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Actor for Discovery {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(self.mailbox_capacity);
        self.connections
            .do_send(SubscribePeerEvents(ctx.address().recipient()));
        ctx.notify(Tick);
        let interval = Duration::from_millis(self.init.config.interval_ms.max(1));
        ctx.run_interval(interval, |_, ctx| ctx.notify(Tick));
    }
}

impl Handler<Tick> for Discovery {
    type Result = ();
    fn handle(&mut self, _: Tick, ctx: &mut Context<Self>) {
        let now = unix_ms();
        self.sign_own_info(now);
        self.step(Input::Tick { unix_ms: now }, ctx);
    }
}

impl Handler<Learned> for Discovery {
    type Result = ();
    fn handle(&mut self, msg: Learned, ctx: &mut Context<Self>) {
        let input = Input::Learned {
            source: Some(msg.source),
            infos: msg.infos,
            unix_ms: msg.unix_ms,
        };
        self.step(input, ctx);
    }
}

impl Handler<PeerEvent> for Discovery {
    type Result = ();
    fn handle(&mut self, event: PeerEvent, ctx: &mut Context<Self>) {
        let input = match event {
            PeerEvent::Connected { peer, address } => Input::Connected { peer, address },
            PeerEvent::Disconnected { peer } => Input::Disconnected { peer },
            PeerEvent::DialFailed { peer, address, .. } => Input::DialFailed { peer, address },
        };
        self.step(input, ctx);
    }
}

impl Handler<KnownPeers> for Discovery {
    type Result = Vec<SignedNodeInfo>;
    fn handle(&mut self, _: KnownPeers, ctx: &mut Context<Self>) -> Vec<SignedNodeInfo> {
        match self.step(Input::KnownPeers, ctx).pop() {
            Some(Output::Known(k)) => k,
            _ => Vec::new(),
        }
    }
}

impl Handler<ExchangeInfo> for Discovery {
    type Result = ResponseActFuture<Self, Result<Exchanged, tonic::Status>>;

    fn handle(&mut self, msg: ExchangeInfo, _: &mut Context<Self>) -> Self::Result {
        let id = self.next_id;
        self.next_id += 1;
        let (caller, remote) = (msg.caller, msg.remote);
        let now_ms = unix_ms();
        // Only an authenticated caller's own info is worth verifying: it is
        // remembered to connect back. Anonymous callers get an answer only.
        let verify = (caller.is_some() && !msg.info.is_empty()).then(|| {
            let request = VerifyRequest::NodeInfos {
                infos: vec![Blob(msg.info)],
                now_ms,
                local: self.init.local,
                allowlist: (self.init.access == Access::Private)
                    .then(|| self.init.allowlist.clone()),
            };
            self.verifier.send(Verify(request))
        });
        let verified = async move {
            let Some(verify) = verify else {
                return Ok(None);
            };
            match verify.await {
                Ok(Ok(VerifyResponse::NodeInfos(mut results))) => match results.pop() {
                    Some(Ok(info)) => Ok(Some(info)),
                    Some(Err(e)) => Err(tonic::Status::invalid_argument(format!("own_info: {e}"))),
                    None => Ok(None),
                },
                Ok(Err(e)) => Err(tonic::Status::unavailable(format!("verifier: {e}"))),
                Ok(Ok(_)) => Ok(None),
                Err(_) => Err(tonic::Status::unavailable("the verifier stopped")),
            }
        };
        Box::pin(verified.into_actor(self).map(move |verified, act, ctx| {
            let info = verified?;
            let own_info = act.own_info.clone();
            let input = Input::Serve {
                id,
                caller,
                info,
                unix_ms: now_ms,
                remote,
            };
            match act.step(input, ctx).pop() {
                Some(Output::Answer { infos, .. }) => Ok(Exchanged {
                    own_info,
                    known_peers: infos
                        .iter()
                        .map(|i| Bytes::from(codec::encode(i)))
                        .collect(),
                }),
                Some(Output::RateLimited { .. }) => Err(tonic::Status::resource_exhausted(
                    "too many GetKnownPeers calls; retry next interval",
                )),
                _ => Err(tonic::Status::internal("no answer")),
            }
        }))
    }
}
