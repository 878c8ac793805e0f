use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::dropped::{Droppable, try_send};
use actix::{
    Actor, ActorFutureExt, Addr, AsyncContext, Context, Handler, Message, ResponseActFuture,
    Supervised, WrapFuture,
};
use bytes::Bytes;
use soma_types::{Access, KeyPair, NodeInfo, PeerId, SignedNodeInfo, codec};
use soma_wire::proto;

use super::core::{DiscoveryCore, Init};
use super::messages::*;
use crate::Blob;
use crate::Driver;
use crate::connections::{
    ActiveConnections, Connect, Connections, DialError, Disconnect, Outbound, PeerEvent,
};
use crate::faults::Faults;
use crate::replay::Recorder;
use crate::verifier::{Verifier, Verify, VerifyRequest, VerifyResponse};

/// Infos verified from one peer's answer, for the core.
#[derive(Message)]
#[rtype(result = "()")]
struct Learned {
    /// The peer that answered.
    source: PeerId,
    infos: Vec<Arc<SignedNodeInfo>>,
    /// When they were verified.
    unix_ms: u64,
}

/// Time for a round.
#[derive(Message)]
#[rtype(result = "()")]
struct Tick;

/// What the Discovery actor is made from; kept across restarts.
#[derive(Clone)]
pub struct Deps {
    /// The core's settings, seeds and RNG seed.
    pub init: Init,
    /// The node's network key, which signs its info.
    pub key: KeyPair,
    /// The addresses the node advertises.
    pub addresses: Vec<String>,
    /// Where dials go, and calls to peers.
    pub connections: Addr<Connections>,
    /// Checks every info received.
    pub verifier: Addr<Verifier>,
    /// The runtime queries run on.
    pub runtime: tokio::runtime::Handle,
    /// Time allowed for one query.
    pub timeout: Duration,
    /// The largest encoded node info the Verifier accepts
    /// (`Limits::max_node_info_bytes`): with the most infos kept of an
    /// answer, what an answer to GetKnownPeers may decode to.
    pub max_node_info_bytes: usize,
    /// Capacity of its mailbox.
    pub mailbox_capacity: usize,
    pub(crate) faults: Faults,
}

/// The Discovery actor: a thin shell around [`DiscoveryCore`]. It signs our
/// node info afresh each round, runs GetKnownPeers queries on the tonic
/// runtime, has the Verifier check every info received, and turns dials
/// into [`Connect`] messages.
pub struct Discovery {
    deps: Deps,
    driver: Driver<DiscoveryCore>,
    own_info: Bytes,
    outbound: Outbound,
    /// Peers asked for their known peers whose call has not ended: a peer
    /// is asked once at a time, so one that holds its answers holds one
    /// call, not one per round.
    asking: Arc<Mutex<HashSet<PeerId>>>,
    next_id: u64,
    restarts: u64,
}

/// A query to a peer under way: the peer leaves [`Discovery::asking`]
/// when the query ends, however it ends.
struct Asking {
    peer: PeerId,
    asking: Arc<Mutex<HashSet<PeerId>>>,
}

impl Asking {
    /// `peer` marked as asked; `None` if a query to it is under way.
    fn start(asking: &Arc<Mutex<HashSet<PeerId>>>, peer: PeerId) -> Option<Asking> {
        let mut set = asking.lock().unwrap_or_else(PoisonError::into_inner);
        set.insert(peer).then(|| Asking {
            peer,
            asking: asking.clone(),
        })
    }
}

impl Drop for Asking {
    fn drop(&mut self) {
        let mut set = self.asking.lock().unwrap_or_else(PoisonError::into_inner);
        set.remove(&self.peer);
    }
}

impl Discovery {
    /// A Discovery actor made from `deps`; it records a trace if
    /// `recorder` is given.
    pub fn new(deps: Deps, recorder: Option<Recorder>) -> Self {
        let mut discovery = Discovery {
            driver: Driver::new(deps.init.clone(), recorder).with_faults(deps.faults.clone()),
            outbound: Outbound::new(deps.connections.clone(), deps.timeout),
            deps,
            own_info: Bytes::new(),
            asking: Arc::default(),
            next_id: 0,
            restarts: 0,
        };
        discovery.sign_own_info(unix_ms());
        discovery
    }

    fn sign_own_info(&mut self, unix_ms: u64) {
        let info = SignedNodeInfo::sign(
            NodeInfo {
                peer_id: PeerId::from(self.deps.key.public()),
                addresses: self.deps.addresses.clone(),
                timestamp_ms: unix_ms,
                access: self.deps.init.access,
            },
            &self.deps.key,
        );
        self.own_info = Bytes::from(codec::encode(&info));
    }

    /// The rules infos received are checked against.
    fn rules(&self) -> InfoRules {
        let init = &self.deps.init;
        InfoRules {
            local: init.local,
            allowlist: (init.access == Access::Private).then(|| init.allowlist.clone()),
        }
    }

    fn step(&mut self, input: Input, ctx: &mut Context<Self>) -> Vec<Output> {
        let mut replies = Vec::new();
        for output in self.driver.step(input) {
            match output {
                Output::Query { peer } => self.query(peer, ctx),
                // The next round dials again what a full mailbox drops.
                Output::Dial { peer, address } => try_send(
                    &self.deps.connections,
                    Connect { peer, address },
                    Droppable::Dial,
                ),
                Output::Disconnect { peer } => try_send(
                    &self.deps.connections,
                    Disconnect { peer },
                    Droppable::Disconnect,
                ),
                Output::SameKeyElsewhere { addresses } => tracing::warn!(
                    ?addresses,
                    "another node runs with this node's network key: its info, signed since \
                     this node started, names other addresses; two nodes must never share \
                     keys (peers hold one entry for both, and a validator would sign twice): \
                     stop one, or give it keys of its own (`soma-p2p keygen`)"
                ),
                other => replies.push(other),
            }
        }
        replies
    }

    /// Asks `peer` for its known peers; what comes back is verified before
    /// the core learns it.
    /// Not while a query to it is under way.
    fn query(&self, peer: PeerId, ctx: &mut Context<Self>) {
        let Some(asking) = Asking::start(&self.asking, peer) else {
            tracing::trace!(%peer, "still asking");
            return;
        };
        let (outbound, verifier, addr) = (
            self.outbound.clone(),
            self.deps.verifier.clone(),
            ctx.address(),
        );
        let message = proto::GetKnownPeersRequest {
            own_info: self.own_info.clone(),
        };
        let max = self.deps.init.config.max_peers_to_send;
        let most = answer_bytes(max, self.deps.max_node_info_bytes);
        let rules = self.rules();
        self.deps.runtime.spawn(async move {
            let _asking = asking;
            // Decoded within what the infos kept of it can take, not the
            // client's cap for every call (8 MiB): a larger answer was
            // decoded whole, as up to a quarter of a million empty
            // entries, to keep its first few hundred.
            let call = move |mut c: crate::connections::Client, r| async move {
                c = c.max_decoding_message_size(most);
                c.get_known_peers(r).await
            };
            let response = match outbound.call(peer, message, call).await {
                Ok(r) => r.into_inner(),
                Err(e) => {
                    tracing::debug!(%peer, %e, "get known peers failed");
                    return;
                }
            };
            // Never more than a server may send, whatever it sends.
            let infos: Vec<Blob> = std::iter::once(response.own_info)
                .chain(response.known_peers.into_iter().take(max))
                .map(Blob)
                .collect();
            let now_ms = unix_ms();
            let request = rules.request(infos, now_ms);
            if let Ok(Ok(VerifyResponse::NodeInfos(results))) = verifier.send(Verify(request)).await
            {
                let rejected = results.iter().filter(|r| r.is_err()).count();
                if rejected > 0 {
                    tracing::debug!(%peer, rejected, "refused node infos");
                }
                addr.do_send(Learned {
                    source: peer,
                    infos: results
                        .into_iter()
                        .filter_map(Result::ok)
                        .map(Arc::new)
                        .collect(),
                    unix_ms: now_ms,
                });
            }
        });
    }
}

/// The largest GetKnownPeers answer worth decoding when `max` infos of it
/// are kept, each at most `info_bytes` encoded: the server's own info and
/// `max` others, each with its field's tag and length, and a little
/// spare.
fn answer_bytes(max: usize, info_bytes: usize) -> usize {
    const FIELD_OVERHEAD: usize = 1 + 3;
    const SPARE: usize = 1 << 10;
    max.saturating_add(1)
        .saturating_mul(info_bytes.saturating_add(FIELD_OVERHEAD))
        .saturating_add(SPARE)
}

/// What a received info must be besides validly signed and fresh:
/// allowlisted when the node is private, unless it is ours (the core never
/// adds itself, but tells whether another node signs with its key).
#[derive(Clone)]
struct InfoRules {
    local: PeerId,
    allowlist: Option<Vec<PeerId>>,
}

impl InfoRules {
    fn request(self, infos: Vec<Blob>, now_ms: u64) -> VerifyRequest {
        VerifyRequest::NodeInfos {
            infos,
            now_ms,
            local: self.local,
            allowlist: self.allowlist,
        }
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
        ctx.set_mailbox_capacity(self.deps.mailbox_capacity);
        // The peers connected now first: the mailbox waits for them, so no
        // peer event that follows this snapshot is handled before it.
        let connections = self.deps.connections.clone();
        ctx.wait(
            async move {
                connections
                    .send(ActiveConnections)
                    .await
                    .unwrap_or_default()
            }
            .into_actor(self)
            .map(|held, act, ctx| {
                for (peer, address) in held {
                    act.step(Input::Connected { peer, address }, ctx);
                }
            }),
        );
        ctx.notify(Tick);
        let interval = Duration::from_millis(self.deps.init.config.interval_ms.max(1));
        ctx.run_interval(interval, |_, ctx| ctx.notify(Tick));
    }
}

impl Supervised for Discovery {
    /// Known peers start empty (seeds, the peers connected and their
    /// answers fill the table again); the RNG takes a seed of its own per
    /// incarnation, so a restart does not repeat the same choices.
    fn restarting(&mut self, _: &mut Context<Self>) {
        self.restarts += 1;
        let mut init = self.deps.init.clone();
        init.seed = init.seed.wrapping_add(self.restarts);
        self.driver.restart(init);
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
            PeerEvent::DialFailed {
                address,
                reason: DialError::AlreadyConnected { peer },
                ..
            } => Input::AlreadyConnected { peer, address },
            // A seed at this node's own address: known by this node's own
            // identity from now on, which is never dialled.
            PeerEvent::DialFailed {
                address,
                reason: DialError::Ourselves,
                ..
            } => Input::AlreadyConnected {
                peer: self.deps.init.local,
                address,
            },
            PeerEvent::DialFailed {
                peer,
                address,
                reason,
            } => Input::DialFailed {
                peer,
                address,
                found: match reason {
                    DialError::UnexpectedPeer { found, .. } => Some(found),
                    _ => None,
                },
            },
        };
        self.step(input, ctx);
    }
}

impl Handler<KnownPeers> for Discovery {
    type Result = Vec<SignedNodeInfo>;
    fn handle(&mut self, _: KnownPeers, ctx: &mut Context<Self>) -> Vec<SignedNodeInfo> {
        match self.step(Input::KnownPeers, ctx).pop() {
            Some(Output::Known(k)) => k.into_iter().map(Arc::unwrap_or_clone).collect(),
            _ => Vec::new(),
        }
    }
}

impl Handler<KnownPeerCount> for Discovery {
    type Result = usize;
    /// A read of the core, not an input: nothing to record.
    fn handle(&mut self, _: KnownPeerCount, _: &mut Context<Self>) -> usize {
        self.driver.core().known_peers().count()
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
            let request = self.rules().request(vec![Blob(msg.info)], now_ms);
            self.deps.verifier.send(Verify(request))
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
