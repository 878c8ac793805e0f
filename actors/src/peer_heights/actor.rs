use std::collections::HashMap;

use actix::{
    Actor, ActorFutureExt, Addr, AsyncContext, Context, Handler, ResponseFuture, Supervised,
    WrapFuture,
};
use soma_types::{CommitIndex, PeerId};
use tokio::sync::oneshot;

use super::core::{Config, PeerHeightsCore};
use super::messages::*;
use crate::Driver;
use crate::connections::{ActivePeers, Connections, PeerEvent};
use crate::faults::Faults;
use crate::replay::Recorder;

/// What the PeerHeights actor is made from; kept across restarts.
#[derive(Clone)]
pub struct Deps {
    /// Its settings.
    pub config: Config,
    /// Where the peers connected when it starts (or restarts) are learnt
    /// from; `None` when it is driven alone.
    pub connections: Option<Addr<Connections>>,
    /// Capacity of its mailbox.
    pub mailbox_capacity: usize,
    pub(crate) faults: Faults,
}

impl Deps {
    /// Dependencies with no injected faults.
    pub fn new(
        config: Config,
        connections: Option<Addr<Connections>>,
        mailbox_capacity: usize,
    ) -> Self {
        Deps {
            config,
            connections,
            mailbox_capacity,
            faults: Faults::default(),
        }
    }
}

type Reply = oneshot::Sender<Result<Lease, AcquireError>>;

/// The PeerHeights actor: a thin shell around [`PeerHeightsCore`].
///
/// It receives Connections' [`PeerEvent`]s (the node wires it as a
/// subscriber): it tracks only connected peers. When it starts, and after
/// a restart, it first takes the peers connected now from Connections.
pub struct PeerHeights {
    deps: Deps,
    driver: Driver<PeerHeightsCore>,
    next_request: u64,
    /// Acquire requests not answered yet.
    replies: HashMap<u64, Reply>,
}

impl PeerHeights {
    /// A PeerHeights actor; it records a trace if `recorder` is given.
    pub fn new(deps: Deps, recorder: Option<Recorder>) -> Self {
        PeerHeights {
            driver: Driver::new(deps.config.clone().into(), recorder)
                .with_faults(deps.faults.clone()),
            deps,
            next_request: 0,
            replies: HashMap::new(),
        }
    }

    /// Steps the core and answers acquire requests; a slot granted to a
    /// caller that stopped waiting is released at once.
    fn step(&mut self, input: Input) -> Vec<Output> {
        let mut answers = Vec::new();
        let mut inputs = vec![input];
        while let Some(input) = inputs.pop() {
            for output in self.driver.step(input) {
                match output {
                    Output::Banned { peer, until } => {
                        tracing::warn!(%peer, until_ms = until.0, "peer banned");
                    }
                    Output::Granted { request, lease } => {
                        let delivered = self
                            .replies
                            .remove(&request)
                            .is_some_and(|r| r.send(Ok(lease)).is_ok());
                        if !delivered {
                            inputs.push(Input::Release(Release {
                                lease: lease.id,
                                transfer: Transfer::Cancelled,
                                bytes: 0,
                                latency_ms: 0,
                            }));
                        }
                    }
                    Output::Refused { request, error } => {
                        if let Some(r) = self.replies.remove(&request) {
                            let _ = r.send(Err(error));
                        }
                    }
                    other => answers.push(other),
                }
            }
        }
        answers
    }

    fn peers(&mut self, input: Input) -> Vec<PeerId> {
        match self.step(input).pop() {
            Some(Output::Peers(peers)) => peers,
            _ => Vec::new(),
        }
    }
}

impl Actor for PeerHeights {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(self.deps.mailbox_capacity);
        // The mailbox waits until the peers connected now are tracked, so
        // no event that follows this snapshot is handled before it.
        let Some(connections) = self.deps.connections.clone() else {
            return;
        };
        ctx.wait(
            async move { connections.send(ActivePeers).await.unwrap_or_default() }
                .into_actor(self)
                .map(|peers, act, _| {
                    for peer in peers {
                        act.step(Input::Connected { peer });
                    }
                }),
        );
    }
}

impl Supervised for PeerHeights {
    /// Bans and the leases of running fetches carry over; heights, scores
    /// and waiting requests (whose callers see an error and retry) do not.
    fn restarting(&mut self, _: &mut Context<Self>) {
        let init = self.driver.core().restart_init();
        self.replies.clear();
        self.driver.restart(init);
    }
}

impl Handler<PeerEvent> for PeerHeights {
    type Result = ();
    fn handle(&mut self, event: PeerEvent, _: &mut Context<Self>) {
        let input = match event {
            PeerEvent::Connected { peer, .. } => Input::Connected { peer },
            PeerEvent::Disconnected { peer } => Input::Remove(RemovePeer { peer }),
            PeerEvent::DialFailed { .. } => return,
        };
        self.step(input);
    }
}

impl Handler<UpdateHeight> for PeerHeights {
    type Result = ();
    fn handle(&mut self, msg: UpdateHeight, _: &mut Context<Self>) {
        self.step(Input::Update(msg));
    }
}

impl Handler<PushHeight> for PeerHeights {
    type Result = ();
    fn handle(&mut self, msg: PushHeight, _: &mut Context<Self>) {
        self.step(Input::Push(msg));
    }
}

impl Handler<RemovePeer> for PeerHeights {
    type Result = ();
    fn handle(&mut self, msg: RemovePeer, _: &mut Context<Self>) {
        self.step(Input::Remove(msg));
    }
}

impl Handler<ReportOutcome> for PeerHeights {
    type Result = ();
    fn handle(&mut self, msg: ReportOutcome, _: &mut Context<Self>) {
        self.step(Input::Outcome(msg));
    }
}

impl Handler<AcquirePeer> for PeerHeights {
    type Result = ResponseFuture<Result<Lease, AcquireError>>;
    fn handle(&mut self, msg: AcquirePeer, _: &mut Context<Self>) -> Self::Result {
        let request = self.next_request;
        self.next_request += 1;
        let (tx, rx) = oneshot::channel();
        self.replies.insert(request, tx);
        self.step(Input::Acquire(Acquire {
            request,
            start: msg.start,
            end: msg.end,
            avoid: msg.avoid,
            wait_ms: msg.wait_ms,
        }));
        Box::pin(async move { rx.await.unwrap_or(Err(AcquireError::Unavailable)) })
    }
}

impl Handler<Release> for PeerHeights {
    type Result = ();
    fn handle(&mut self, msg: Release, _: &mut Context<Self>) {
        self.step(Input::Release(msg));
    }
}

impl Handler<HighestKnownCommit> for PeerHeights {
    type Result = Option<CommitIndex>;
    fn handle(&mut self, _: HighestKnownCommit, _: &mut Context<Self>) -> Option<CommitIndex> {
        match self.step(Input::HighestKnown).pop() {
            Some(Output::HighestKnown(h)) => h,
            _ => None,
        }
    }
}

impl Handler<PeersForRange> for PeerHeights {
    type Result = Vec<PeerId>;
    fn handle(&mut self, msg: PeersForRange, _: &mut Context<Self>) -> Vec<PeerId> {
        self.peers(Input::PeersForRange(msg))
    }
}

impl Handler<PeersBehind> for PeerHeights {
    type Result = Vec<PeerId>;
    fn handle(&mut self, msg: PeersBehind, _: &mut Context<Self>) -> Vec<PeerId> {
        self.peers(Input::PeersBehind(msg))
    }
}

impl Handler<Snapshot> for PeerHeights {
    type Result = Vec<PeerView>;
    fn handle(&mut self, _: Snapshot, _: &mut Context<Self>) -> Vec<PeerView> {
        match self.step(Input::Snapshot).pop() {
            Some(Output::Snapshot(s)) => s,
            _ => Vec::new(),
        }
    }
}
