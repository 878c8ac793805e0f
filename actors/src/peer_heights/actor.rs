use std::collections::HashMap;
use std::time::Instant;

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
use crate::holders::{Holders, Token};
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

type Reply = oneshot::Sender<Result<Slot, AcquireError>>;

/// A fetch slot granted by PeerHeights. Dropped without [`Slot::release`]
/// (the fetch failed, was aborted, or its worker stopped waiting before the
/// grant reached it), it is released as cancelled: no path leaks a slot.
#[derive(Debug)]
pub struct Slot {
    lease: Lease,
    heights: Addr<PeerHeights>,
    granted: Instant,
    released: bool,
    _token: Token,
}

impl Slot {
    /// The lease: the peer to fetch from, and the range it was chosen for.
    pub fn lease(&self) -> Lease {
        self.lease
    }

    /// Gives the slot back with how the transfer went and the bytes it
    /// brought; returns how long the transfer took since the grant, in
    /// milliseconds.
    pub fn release(mut self, transfer: Transfer, bytes: u64) -> u64 {
        self.released = true;
        let latency_ms = self.granted.elapsed().as_millis() as u64;
        self.heights.do_send(Release {
            lease: self.lease.id,
            transfer,
            bytes,
            latency_ms,
        });
        latency_ms
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if !self.released {
            self.heights.do_send(Release {
                lease: self.lease.id,
                transfer: Transfer::Cancelled,
                bytes: 0,
                latency_ms: 0,
            });
        }
    }
}

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
    /// The leases whose [`Slot`] is still held.
    holders: Holders,
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
            holders: Holders::default(),
        }
    }

    /// Steps the core and answers acquire requests with [`Slot`]s. A slot
    /// that reaches no caller is dropped, and so released.
    fn step(&mut self, input: Input, ctx: &mut Context<Self>) -> Vec<Output> {
        let mut answers = Vec::new();
        for output in self.driver.step(input) {
            match output {
                Output::Banned { peer, until } => {
                    tracing::warn!(%peer, until_ms = until.0, "peer banned");
                }
                Output::OtherChain { peer, chain_id } => {
                    tracing::warn!(
                        %peer,
                        theirs = %hex::encode(chain_id.0.0),
                        ours = %hex::encode(self.driver.core().chain_id().0.0),
                        "peer is on another chain: never synced from (if every peer says \
                         so, this node's genesis file is another network's)"
                    );
                }
                Output::Granted { request, lease } => {
                    let slot = Slot {
                        lease,
                        heights: ctx.address(),
                        granted: Instant::now(),
                        released: false,
                        _token: self.holders.hold(lease.id),
                    };
                    if let Some(r) = self.replies.remove(&request) {
                        let _ = r.send(Ok(slot));
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
        answers
    }

    fn peers(&mut self, input: Input, ctx: &mut Context<Self>) -> Vec<PeerId> {
        match self.step(input, ctx).pop() {
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
                .map(|peers, act, ctx| {
                    for peer in peers {
                        act.step(Input::Connected { peer }, ctx);
                    }
                }),
        );
    }
}

impl Supervised for PeerHeights {
    /// Bans, doubts on claims and the leases of running fetches carry
    /// over (those whose slot is still held: a release lost with the
    /// panicking message is not counted for ever); heights, scores and
    /// waiting requests (whose callers see an error and retry) do not.
    fn restarting(&mut self, _: &mut Context<Self>) {
        let mut init = self.driver.core().restart_init();
        init.leases.retain(|l| self.holders.held(l.id));
        self.replies.clear();
        self.driver.restart(init);
    }
}

impl Handler<PeerEvent> for PeerHeights {
    type Result = ();
    fn handle(&mut self, event: PeerEvent, ctx: &mut Context<Self>) {
        let input = match event {
            PeerEvent::Connected { peer, .. } => Input::Connected { peer },
            PeerEvent::Disconnected { peer } => Input::Remove(RemovePeer { peer }),
            PeerEvent::DialFailed { .. } => return,
        };
        self.step(input, ctx);
    }
}

impl Handler<UpdateHeight> for PeerHeights {
    type Result = ();
    fn handle(&mut self, msg: UpdateHeight, ctx: &mut Context<Self>) {
        self.step(Input::Update(msg), ctx);
    }
}

impl Handler<PushHeight> for PeerHeights {
    type Result = ();
    fn handle(&mut self, msg: PushHeight, ctx: &mut Context<Self>) {
        self.step(Input::Push(msg), ctx);
    }
}

impl Handler<RemovePeer> for PeerHeights {
    type Result = ();
    fn handle(&mut self, msg: RemovePeer, ctx: &mut Context<Self>) {
        self.step(Input::Remove(msg), ctx);
    }
}

impl Handler<ReportOutcome> for PeerHeights {
    type Result = ();
    fn handle(&mut self, msg: ReportOutcome, ctx: &mut Context<Self>) {
        self.step(Input::Outcome(msg), ctx);
    }
}

impl Handler<AcquirePeer> for PeerHeights {
    type Result = ResponseFuture<Result<Slot, AcquireError>>;
    fn handle(&mut self, msg: AcquirePeer, ctx: &mut Context<Self>) -> Self::Result {
        let request = self.next_request;
        self.next_request += 1;
        let (tx, rx) = oneshot::channel();
        self.replies.insert(request, tx);
        let acquire = Acquire {
            request,
            start: msg.start,
            end: msg.end,
            kind: msg.kind,
            avoid: msg.avoid,
            wait_ms: msg.wait_ms,
            spare_only: msg.spare_only,
        };
        self.step(Input::Acquire(acquire), ctx);
        if self.replies.contains_key(&request) {
            // It waits: the core refuses it when its wait is over, at the
            // first input from then on; this timer makes sure there is one.
            let wait = std::time::Duration::from_millis(msg.wait_ms);
            ctx.run_later(wait, |act, ctx| {
                act.step(Input::Tick, ctx);
            });
        }
        Box::pin(async move { rx.await.unwrap_or(Err(AcquireError::Unavailable)) })
    }
}

impl Handler<Release> for PeerHeights {
    type Result = ();
    fn handle(&mut self, msg: Release, ctx: &mut Context<Self>) {
        self.step(Input::Release(msg), ctx);
    }
}

impl Handler<ReportBeaten> for PeerHeights {
    type Result = ();
    fn handle(&mut self, msg: ReportBeaten, ctx: &mut Context<Self>) {
        self.step(Input::Beaten(msg), ctx);
    }
}

impl Handler<LeaseUnanswered> for PeerHeights {
    type Result = ();
    fn handle(&mut self, LeaseUnanswered { lease }: LeaseUnanswered, ctx: &mut Context<Self>) {
        self.step(Input::Unanswered { lease }, ctx);
    }
}

impl Handler<HighestKnownCommit> for PeerHeights {
    type Result = Option<CommitIndex>;
    fn handle(&mut self, _: HighestKnownCommit, ctx: &mut Context<Self>) -> Option<CommitIndex> {
        match self.step(Input::HighestKnown, ctx).pop() {
            Some(Output::HighestKnown(h)) => h,
            _ => None,
        }
    }
}

impl Handler<HeightsHeard> for PeerHeights {
    type Result = HeardHeights;
    fn handle(&mut self, _: HeightsHeard, ctx: &mut Context<Self>) -> HeardHeights {
        match self.step(Input::HeightsHeard, ctx).pop() {
            Some(Output::HeightsHeard(h)) => h,
            _ => HeardHeights::default(),
        }
    }
}

impl Handler<ClaimsRange> for PeerHeights {
    type Result = bool;
    fn handle(&mut self, msg: ClaimsRange, ctx: &mut Context<Self>) -> bool {
        matches!(
            self.step(Input::ClaimsRange(msg), ctx).pop(),
            Some(Output::Claims(true))
        )
    }
}

impl Handler<CoversRange> for PeerHeights {
    type Result = bool;
    fn handle(&mut self, msg: CoversRange, ctx: &mut Context<Self>) -> bool {
        matches!(
            self.step(Input::CoversRange(msg), ctx).pop(),
            Some(Output::Claims(true))
        )
    }
}

impl Handler<PeersForRange> for PeerHeights {
    type Result = Vec<PeerId>;
    fn handle(&mut self, msg: PeersForRange, ctx: &mut Context<Self>) -> Vec<PeerId> {
        self.peers(Input::PeersForRange(msg), ctx)
    }
}

impl Handler<PeersBehind> for PeerHeights {
    type Result = Vec<PeerId>;
    fn handle(&mut self, msg: PeersBehind, ctx: &mut Context<Self>) -> Vec<PeerId> {
        self.peers(Input::PeersBehind(msg), ctx)
    }
}

impl Handler<CountPeers> for PeerHeights {
    type Result = PeerCounts;
    fn handle(&mut self, _: CountPeers, ctx: &mut Context<Self>) -> PeerCounts {
        match self.step(Input::CountPeers, ctx).pop() {
            Some(Output::Counts(counts)) => counts,
            _ => PeerCounts::default(),
        }
    }
}

impl Handler<Snapshot> for PeerHeights {
    type Result = Vec<PeerView>;
    fn handle(&mut self, _: Snapshot, ctx: &mut Context<Self>) -> Vec<PeerView> {
        match self.step(Input::Snapshot, ctx).pop() {
            Some(Output::Snapshot(s)) => s,
            _ => Vec::new(),
        }
    }
}
