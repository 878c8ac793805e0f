use std::collections::{HashMap, HashSet};
use std::time::Duration;

use actix::{Actor, AsyncContext, Context, Handler, Message, Recipient, Supervised};
use soma_types::PeerId;
use soma_wire::proto;
use soma_wire::tls::{self, NodeIdentity};
use tonic::transport::Channel;

use super::core::{Config, ConnectionsCore};
use super::messages::*;
use super::outbound::{CallError, Client, ask_availability, call_client};
use crate::Driver;
use crate::faults::Faults;
use crate::replay::Recorder;

/// Largest message a client accepts (a FetchBlocks chunk plus framing).
pub(crate) const MAX_CLIENT_MESSAGE_BYTES: usize = 8 << 20;

/// A dial finished (sent by the dialling task).
#[derive(Message)]
#[rtype(result = "()")]
struct DialDone {
    address: String,
    expected: Option<PeerId>,
    result: Result<(Channel, PeerId), DialError>,
}

/// A probe finished (sent by the probing task): connection `connection`
/// to `peer` failed its check if `broken`.
#[derive(Message)]
#[rtype(result = "()")]
struct Probed {
    peer: PeerId,
    connection: u64,
    broken: bool,
}

/// One message from a task to the actor: the one the task sends, or, if
/// the task ends without sending it (it panicked, or its runtime dropped
/// it), `fallback`, so that what the actor holds for the task (a dial's
/// slot and address, a peer marked as being probed) is freed either way
/// rather than held for as long as the actor lives.
struct ReportOnce<M>
where
    M: Message<Result = ()> + Send + 'static,
{
    to: Recipient<M>,
    fallback: Option<M>,
}

impl<M> ReportOnce<M>
where
    M: Message<Result = ()> + Send + 'static,
{
    fn send(mut self, message: M) {
        self.fallback = None;
        self.to.do_send(message);
    }
}

impl<M> Drop for ReportOnce<M>
where
    M: Message<Result = ()> + Send + 'static,
{
    fn drop(&mut self) {
        if let Some(message) = self.fallback.take() {
            self.to.do_send(message);
        }
    }
}

/// What the Connections actor is made from; kept across restarts.
#[derive(Clone)]
pub struct Deps {
    /// Its settings.
    pub config: Config,
    /// The TLS identity it dials as.
    pub identity: NodeIdentity,
    /// The runtime dials and probes run on.
    pub runtime: tokio::runtime::Handle,
    /// The actors told of every [`PeerEvent`]; wired once, since their
    /// addresses outlive restarts.
    pub subscribers: Vec<Recipient<PeerEvent>>,
    /// Peer events for the handle's subscribers (bounded broadcast).
    pub events: tokio::sync::broadcast::Sender<PeerEvent>,
    /// Capacity of its mailbox.
    pub mailbox_capacity: usize,
    pub(crate) faults: Faults,
}

/// The Connections actor: a thin shell around [`ConnectionsCore`].
///
/// Dials and probes run on the tonic runtime, so client connections and
/// their I/O never run on the actors' thread.
pub struct Connections {
    deps: Deps,
    driver: Driver<ConnectionsCore>,
    /// Each connected peer's client, with the number of its connection.
    clients: HashMap<PeerId, (u64, Client)>,
    /// The number of the next connection kept.
    next_connection: u64,
    /// Connections whose probe is on its way; each is removed by its
    /// probe's [`Probed`], which the probing task sends whatever becomes of
    /// it.
    probing: HashSet<(PeerId, u64)>,
}

impl Connections {
    /// A connection manager made from `deps`; it records a trace if
    /// `recorder` is given.
    pub fn new(deps: Deps, recorder: Option<Recorder>) -> Self {
        Connections {
            driver: Driver::new(deps.config.clone(), recorder).with_faults(deps.faults.clone()),
            deps,
            clients: HashMap::new(),
            next_connection: 0,
            probing: HashSet::new(),
        }
    }

    fn step(&mut self, input: Input, ctx: &mut Context<Self>, dialled: Option<Channel>) {
        let mut dialled = dialled;
        for output in self.driver.step(input) {
            match output {
                Output::Dial { address, expected } => self.dial(address, expected, ctx),
                Output::Keep { peer } => {
                    if let Some(channel) = dialled.take() {
                        self.next_connection += 1;
                        let kept = (self.next_connection, client(channel));
                        self.clients.insert(peer, kept);
                    }
                }
                Output::Close { peer } => {
                    // A duplicate dial's channel is simply dropped; otherwise
                    // the peer's client goes.
                    if dialled.take().is_none() {
                        self.clients.remove(&peer);
                    }
                }
                Output::Event(event) => self.publish(event),
                Output::Peers(_) | Output::Connections(_) => {}
            }
        }
    }

    /// Connection `connection` to `peer` failed a call or a probe: it is
    /// closed if it is still the one held. A failure of a connection since
    /// replaced (closed, and the peer dialled again) says nothing of the
    /// new one.
    fn broken(&mut self, peer: PeerId, connection: u64, ctx: &mut Context<Self>) {
        if self
            .clients
            .get(&peer)
            .is_some_and(|(held, _)| *held == connection)
        {
            self.step(Input::Broken { peer }, ctx, None);
        }
    }

    fn publish(&self, event: PeerEvent) {
        match &event {
            PeerEvent::Connected { peer, address } => {
                tracing::info!(%peer, %address, "peer connected")
            }
            PeerEvent::Disconnected { peer } => tracing::info!(%peer, "peer disconnected"),
            PeerEvent::DialFailed {
                address, reason, ..
            } => tracing::debug!(%address, %reason, "dial failed"),
        }
        // No receiver is fine: nobody subscribed.
        let _ = self.deps.events.send(event.clone());
        // Peer events are rare and must not be lost: delivered past the
        // subscriber's mailbox bound.
        for s in &self.deps.subscribers {
            s.do_send(event.clone());
        }
    }

    fn dial(&self, address: String, expected: Option<PeerId>, ctx: &mut Context<Self>) {
        let report = ReportOnce {
            to: ctx.address().recipient(),
            fallback: Some(DialDone {
                address: address.clone(),
                expected,
                result: Err(DialError::Abandoned),
            }),
        };
        let identity = self.deps.identity.clone();
        let faults = self.deps.faults.clone();
        let timeout = Duration::from_millis(self.deps.config.connect_timeout_ms);
        self.deps.runtime.spawn(async move {
            faults.on_dial();
            let result = match tls::connect(&address, Some(&identity), expected, timeout).await {
                // A seed list shared by every node names each node's own
                // address too: not a peer, and not to be asked for peers.
                Ok((_, peer)) if peer == identity.peer_id() => {
                    tracing::info!(%address, "dialled this node's own address; closed");
                    Err(DialError::Ourselves)
                }
                // With TLS 1.3 a server refusing our certificate (private,
                // not allowlisted) only shows on the first call: one call
                // proves the connection before it counts as connected.
                Ok((channel, peer)) => check(client(channel.clone()), timeout)
                    .await
                    .map(|()| (channel, peer))
                    .map_err(DialError::FirstCall),
                Err(e) => {
                    tracing::debug!(%address, %e, "dial failed");
                    Err(DialError::from(&e))
                }
            };
            report.send(DialDone {
                address,
                expected,
                result,
            });
        });
    }

    /// Checks each connection not being checked already: with a probe
    /// interval shorter than the connect timeout, a silent peer would
    /// otherwise hold a new call each interval until its first timed out.
    fn probe(&mut self, ctx: &mut Context<Self>) {
        let timeout = Duration::from_millis(self.deps.config.connect_timeout_ms);
        for (&peer, (connection, client)) in &self.clients {
            let connection = *connection;
            if !self.probing.insert((peer, connection)) {
                continue;
            }
            let report = ReportOnce {
                to: ctx.address().recipient(),
                fallback: Some(Probed {
                    peer,
                    connection,
                    broken: false,
                }),
            };
            let client = client.clone();
            let faults = self.deps.faults.clone();
            let held = faults.probe();
            self.deps.runtime.spawn(async move {
                held.await;
                let broken = check(client, timeout).await.is_err();
                report.send(Probed {
                    peer,
                    connection,
                    broken,
                });
                faults.on_probe_reported(broken);
            });
        }
    }
}

fn client(channel: Channel) -> Client {
    Client::new(channel).max_decoding_message_size(MAX_CLIENT_MESSAGE_BYTES)
}

/// One cheap call, to tell a working connection from a dead or refused one.
async fn check(client: Client, timeout: Duration) -> Result<(), CallError> {
    let message = proto::GetCommitAvailabilityRequest {};
    call_client(client, timeout, message, ask_availability)
        .await
        .map(drop)
}

impl Actor for Connections {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(self.deps.mailbox_capacity);
        let interval = Duration::from_millis(self.deps.config.probe_interval_ms.max(1));
        ctx.run_interval(interval, |act, ctx| act.probe(ctx));
    }
}

impl Supervised for Connections {
    /// Starts empty: the clients of the failed incarnation are dropped and
    /// every peer it held is reported disconnected, so the actors that
    /// follow peer events forget them and Discovery dials them again.
    fn restarting(&mut self, _: &mut Context<Self>) {
        let held: Vec<PeerId> = self.driver.core().connected().collect();
        self.clients.clear();
        // `probing` stays: the probes on their way still report, each
        // freeing its peer.
        self.driver.restart(self.deps.config.clone());
        for peer in held {
            self.publish(PeerEvent::Disconnected { peer });
        }
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
        self.broken(msg.peer, msg.connection, ctx);
    }
}

impl Handler<Probed> for Connections {
    type Result = ();
    fn handle(&mut self, msg: Probed, ctx: &mut Context<Self>) {
        self.probing.remove(&(msg.peer, msg.connection));
        if msg.broken {
            self.broken(msg.peer, msg.connection, ctx);
        }
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

impl Handler<ActiveConnections> for Connections {
    type Result = Vec<(PeerId, String)>;
    fn handle(&mut self, _: ActiveConnections, _: &mut Context<Self>) -> Self::Result {
        match self.driver.step(Input::ActiveConnections).pop() {
            Some(Output::Connections(c)) => c,
            _ => Vec::new(),
        }
    }
}

impl Handler<GetClient> for Connections {
    type Result = Option<(u64, Client)>;
    fn handle(&mut self, msg: GetClient, _: &mut Context<Self>) -> Self::Result {
        self.clients.get(&msg.0).cloned()
    }
}
