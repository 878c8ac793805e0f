use actix::{Actor, Context, Handler};
use soma_types::{CommitIndex, PeerId};

use super::core::{Config, PeerHeightsCore};
use super::messages::*;
use crate::Driver;
use crate::connections::PeerEvent;
use crate::replay::Recorder;

/// The PeerHeights actor: a thin shell around [`PeerHeightsCore`].
///
/// It must receive Connections' [`PeerEvent`]s (subscribe it with
/// `SubscribePeerEvents` before any dial): it tracks only connected peers.
pub struct PeerHeights {
    driver: Driver<PeerHeightsCore>,
    mailbox_capacity: usize,
}

impl PeerHeights {
    /// A PeerHeights actor; it records a trace if `recorder` is given.
    pub fn new(config: Config, mailbox_capacity: usize, recorder: Option<Recorder>) -> Self {
        PeerHeights {
            driver: Driver::new(config, recorder),
            mailbox_capacity,
        }
    }

    fn step(&mut self, input: Input) -> Vec<Output> {
        let outputs = self.driver.step(input);
        for output in &outputs {
            if let Output::Banned { peer, until } = output {
                tracing::warn!(%peer, until_ms = until.0, "peer banned for invalid data");
            }
        }
        outputs
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
        ctx.set_mailbox_capacity(self.mailbox_capacity);
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
