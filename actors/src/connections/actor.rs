use std::collections::HashMap;
use std::time::Duration;

use actix::{Actor, AsyncContext, Context, Handler, Message, Recipient};
use soma_types::PeerId;
use soma_wire::proto::p2p_client::P2pClient;
use soma_wire::tls::{self, NodeIdentity};
use tonic::transport::Channel;

use super::core::{Config, ConnectionsCore};
use super::messages::*;
use crate::Driver;
use crate::replay::Recorder;

/// Largest message a client accepts (a FetchBlocks chunk plus framing).
pub(crate) const MAX_CLIENT_MESSAGE_BYTES: usize = 8 << 20;

/// A dial finished (sent by the dialling task).
#[derive(Message)]
#[rtype(result = "()")]
struct DialDone {
    address: String,
    expected: Option<PeerId>,
    result: Result<(Channel, PeerId), String>,
}

/// The Connections actor: a thin shell around [`ConnectionsCore`].
///
/// Dials and probes run on the tonic runtime, so client connections and
/// their I/O never run on the actors' thread.
pub struct Connections {
    driver: Driver<ConnectionsCore>,
    config: Config,
    identity: NodeIdentity,
    runtime: tokio::runtime::Handle,
    clients: HashMap<PeerId, P2pClient<Channel>>,
    subscribers: Vec<Recipient<PeerEvent>>,
    /// Peer events for the handle's subscribers (bounded broadcast).
    events: tokio::sync::broadcast::Sender<PeerEvent>,
    mailbox_capacity: usize,
}

impl Connections {
    /// A connection manager dialling as `identity`, with client tasks on
    /// `runtime`, publishing peer events to `events` as well as to
    /// subscribed actors.
    pub fn new(
        config: Config,
        identity: NodeIdentity,
        runtime: tokio::runtime::Handle,
        events: tokio::sync::broadcast::Sender<PeerEvent>,
        mailbox_capacity: usize,
        recorder: Option<Recorder>,
    ) -> Self {
        Connections {
            driver: Driver::new(config.clone(), recorder),
            config,
            identity,
            runtime,
            clients: HashMap::new(),
            subscribers: Vec::new(),
            events,
            mailbox_capacity,
        }
    }

    fn step(&mut self, input: Input, ctx: &mut Context<Self>, dialled: Option<Channel>) {
        let mut dialled = dialled;
        for output in self.driver.step(input) {
            match output {
                Output::Dial { address, expected } => self.dial(address, expected, ctx),
                Output::Keep { peer } => {
                    if let Some(channel) = dialled.take() {
                        self.clients.insert(peer, client(channel));
                    }
                }
                Output::Close { peer } => {
                    // A duplicate dial's channel is simply dropped; otherwise
                    // the peer's client goes.
                    if dialled.take().is_none() {
                        self.clients.remove(&peer);
                    }
                }
                Output::Event(event) => {
                    match &event {
                        PeerEvent::Connected { peer, address } => {
                            tracing::info!(%peer, %address, "peer connected")
                        }
                        PeerEvent::Disconnected { peer } => {
                            tracing::info!(%peer, "peer disconnected")
                        }
                        PeerEvent::DialFailed {
                            address, reason, ..
                        } => tracing::debug!(%address, %reason, "dial failed"),
                    }
                    // No receiver is fine: nobody subscribed.
                    let _ = self.events.send(event.clone());
                    // Peer events are rare and must not be lost: delivered
                    // past the subscriber's mailbox bound.
                    self.subscribers.retain(|s| s.connected());
                    for s in &self.subscribers {
                        s.do_send(event.clone());
                    }
                }
                Output::Peers(_) => {}
            }
        }
    }

    fn dial(&self, address: String, expected: Option<PeerId>, ctx: &mut Context<Self>) {
        let addr = ctx.address();
        let identity = self.identity.clone();
        let timeout = Duration::from_millis(self.config.connect_timeout_ms);
        self.runtime.spawn(async move {
            let result = match tls::connect(&address, Some(&identity), expected, timeout).await {
                // With TLS 1.3 a server refusing our certificate (private,
                // not allowlisted) only shows on the first call: one call
                // proves the connection before it counts as connected.
                Ok((channel, peer)) => check(client(channel.clone()), timeout)
                    .await
                    .map(|()| (channel, peer))
                    .map_err(|e| format!("refused after the handshake: {e}")),
                Err(e) => Err(e.to_string()),
            };
            addr.do_send(DialDone {
                address,
                expected,
                result,
            });
        });
    }

    fn probe(&self, ctx: &mut Context<Self>) {
        let timeout = Duration::from_millis(self.config.connect_timeout_ms);
        for (peer, client) in &self.clients {
            let (peer, client, addr) = (*peer, client.clone(), ctx.address());
            self.runtime.spawn(async move {
                if check(client, timeout).await.is_err() {
                    addr.do_send(ReportBroken { peer });
                }
            });
        }
    }
}

fn client(channel: Channel) -> P2pClient<Channel> {
    P2pClient::new(channel).max_decoding_message_size(MAX_CLIENT_MESSAGE_BYTES)
}

/// One cheap call, to tell a working connection from a dead or refused one.
async fn check(mut client: P2pClient<Channel>, timeout: Duration) -> Result<(), String> {
    let mut request = tonic::Request::new(soma_wire::proto::GetCommitAvailabilityRequest {});
    request.set_timeout(timeout);
    match tokio::time::timeout(timeout, client.get_commit_availability(request)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(status)) => Err(status.to_string()),
        Err(_) => Err("timed out".into()),
    }
}

impl Actor for Connections {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(self.mailbox_capacity);
        let interval = Duration::from_millis(self.config.probe_interval_ms.max(1));
        ctx.run_interval(interval, |act, ctx| act.probe(ctx));
    }
}

impl Handler<Connect> for Connections {
    type Result = ();
    fn handle(&mut self, msg: Connect, ctx: &mut Context<Self>) {
        self.step(Input::Connect(msg), ctx, None);
    }
}

impl Handler<Disconnect> for Connections {
    type Result = ();
    fn handle(&mut self, msg: Disconnect, ctx: &mut Context<Self>) {
        self.step(Input::Disconnect(msg), ctx, None);
    }
}

impl Handler<ReportBroken> for Connections {
    type Result = ();
    fn handle(&mut self, msg: ReportBroken, ctx: &mut Context<Self>) {
        self.step(Input::Broken { peer: msg.peer }, ctx, None);
    }
}

impl Handler<DialDone> for Connections {
    type Result = ();
    fn handle(&mut self, msg: DialDone, ctx: &mut Context<Self>) {
        let (result, channel) = match msg.result {
            Ok((channel, peer)) => (DialResult::Connected(peer), Some(channel)),
            Err(reason) => (DialResult::Failed(reason), None),
        };
        let input = Input::Dialed {
            address: msg.address,
            expected: msg.expected,
            result,
        };
        self.step(input, ctx, channel);
    }
}

impl Handler<ActivePeers> for Connections {
    type Result = Vec<PeerId>;
    fn handle(&mut self, _: ActivePeers, _: &mut Context<Self>) -> Vec<PeerId> {
        match self.driver.step(Input::ActivePeers).pop() {
            Some(Output::Peers(p)) => p,
            _ => Vec::new(),
        }
    }
}

impl Handler<GetClient> for Connections {
    type Result = Option<P2pClient<Channel>>;
    fn handle(&mut self, msg: GetClient, _: &mut Context<Self>) -> Self::Result {
        self.clients.get(&msg.0).cloned()
    }
}

impl Handler<SubscribePeerEvents> for Connections {
    type Result = ();
    fn handle(&mut self, msg: SubscribePeerEvents, _: &mut Context<Self>) {
        self.subscribers.push(msg.0);
    }
}
