use crate::dropped::{Droppable, try_send};
use std::sync::Arc;

use actix::{Actor, Addr, Context, Handler, Supervised};
use soma_wire::inbound;

use super::core::{ABANDONED_REFUSAL, Crowded, GrpcAdapterCore, Limits};
use super::deadline::SendStats;
use super::messages::*;
use crate::Driver;
use crate::faults::Faults;
use crate::holders::{Holders, Token};
use crate::peer_heights::{PeerHeights, PushHeight};
use crate::replay::Recorder;
use crate::state_sync::{HeightPushed, StateSync};

/// An admitted fetch's slot; dropping it (the call ended, failed or was
/// cancelled) gives the slot back to the adapter, which learns of it at
/// its next call (from the permit's token): a fetch's end costs no message and
/// no wake-up of the adapter's thread.
#[derive(Debug)]
pub struct Permit {
    id: u64,
    _token: Token,
}

impl Permit {
    pub(crate) fn new(id: u64, token: Token) -> Self {
        Permit { id, _token: token }
    }

    /// The fetch's correlation id.
    pub(crate) fn id(&self) -> u64 {
        self.id
    }
}

/// What the GrpcAdapter actor is made from; kept across restarts.
#[derive(Clone)]
pub struct Deps {
    /// What the server admits.
    pub limits: Limits,
    /// Where pushed heights go: PeerHeights takes those of the peers it
    /// tracks, and StateSync may ask its peers at once.
    pub peer_heights: Addr<PeerHeights>,
    /// See `peer_heights`.
    pub state_sync: Addr<StateSync>,
    /// The answers being sent, to find stalled ones and cut them.
    pub send_stats: Arc<SendStats>,
    /// Capacity of its mailbox.
    pub mailbox_capacity: usize,
    pub(crate) faults: Faults,
}

/// The GrpcAdapter actor: admits calls through [`GrpcAdapterCore`] and
/// performs the side effects of admitted ones (a pushed height goes to
/// PeerHeights, and to StateSync as a hint to ask heights at once).
pub struct GrpcAdapter {
    deps: Deps,
    driver: Driver<GrpcAdapterCore>,
    /// Outlives restarts, so a fetch id is never given twice.
    next_id: u64,
    /// The admitted calls whose [`Permit`] is still held.
    holders: Holders,
}

impl GrpcAdapter {
    /// An adapter made from `deps`; it records a trace if `recorder` is
    /// given.
    pub fn new(deps: Deps, recorder: Option<Recorder>) -> Self {
        GrpcAdapter {
            driver: Driver::new(deps.limits.clone().into(), recorder)
                .with_faults(deps.faults.clone()),
            deps,
            next_id: 0,
            holders: Holders::default(),
        }
    }
}

impl Actor for GrpcAdapter {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(self.deps.mailbox_capacity);
    }
}

impl Supervised for GrpcAdapter {
    /// The fetches still running keep their slots (their permits are
    /// dropped later, as ever), but not those whose permit is gone; call
    /// rates start afresh.
    fn restarting(&mut self, _: &mut Context<Self>) {
        let mut init = self.driver.core().restart_init();
        self.holders.ended();
        init.running.retain(|(id, _)| self.holders.held(*id));
        self.driver.restart(init);
    }
}

impl GrpcAdapter {
    /// Tells the core of the fetches that ended since it last heard, in
    /// id order, so a replay sees the same inputs.
    /// Fetches dropped unread are charged first: each was recorded
    /// before its permit went.
    fn step_ended(&mut self) {
        for (caller, origin) in self.deps.send_stats.take_abandoned() {
            self.driver.step(Input::Abandoned { caller, origin });
        }
        for id in self.holders.ended() {
            self.driver.step(Input::Done { id });
        }
    }
}

impl Handler<CallMsg> for GrpcAdapter {
    type Result = Result<Admission, Refusal>;

    fn handle(&mut self, msg: CallMsg, _: &mut Context<Self>) -> Self::Result {
        let fetch = matches!(
            msg.call,
            Call::FetchCommits { .. } | Call::FetchBlocks { .. }
        );
        // The fetches that ended since the last call free their slots
        // first (in id order, so a replay sees the same inputs).
        self.step_ended();
        // A fetch that slots kept by connections for their next fetch
        // (see `kept`) stand in the way of takes them back first: the
        // caller's own at its cap, its host's at the host's cap, its
        // network's at the network's cap, everyone's when every slot is
        // held; then the next cap in its way, if any (the caller's own
        // kept slots may be another host's), each cap once at most.
        // Taking them back for every fetch let anyone's fetches, at any
        // rate, cost honest connections their kept slots.
        // A fetch refused for its caller's fetches dropped unread takes
        // no kept slot back: such a caller could otherwise strip its
        // neighbours of theirs at any rate.
        let refused = fetch
            && (self.driver.core())
                .refusal_for_abandoning(self.driver.now(), msg.caller, msg.origin)
                .is_some();
        if fetch && !refused {
            let stats = self.deps.send_stats.clone();
            let kept = &stats.kept;
            let mut tried = Vec::new();
            while let Some(crowded) = self.driver.core().crowded(msg.caller, msg.origin) {
                if tried.contains(&crowded) {
                    break;
                }
                tried.push(crowded);
                let taken = match crowded {
                    Crowded::Caller => kept.reclaim(|(_, caller, _)| *caller == msg.caller),
                    Crowded::Host(host) => {
                        kept.reclaim(|(_, _, counted_in)| *counted_in == Some(host))
                    }
                    Crowded::Network(network) => kept.reclaim(|(_, _, counted_in)| {
                        counted_in.is_some_and(|host| inbound::network(host) == network)
                    }),
                    Crowded::All => kept.reclaim(|_| true),
                };
                if taken.is_empty() {
                    break;
                }
                drop(taken);
                self.step_ended();
            }
            kept.forget_revoked(|id| self.holders.held(id));
        }
        let id = self.next_id;
        self.next_id += 1;
        // A fetch may take a stalled answer's slot (see the core); at most
        // `max_concurrent_fetches` answers to look at.
        let stalled = if fetch {
            let limits = &self.deps.limits;
            self.deps
                .send_stats
                .stalled(limits.fetch_stall_timeout, limits.min_send_rate())
        } else {
            Vec::new()
        };
        // The cap a refused fetch was refused at, for the operator.
        let in_way = if fetch {
            self.driver.core().crowded(msg.caller, msg.origin)
        } else {
            None
        };
        let outputs = self.driver.step(Input::Call {
            id,
            caller: msg.caller,
            connection: msg.connection,
            origin: msg.origin,
            call: msg.call,
            stalled,
        });
        let mut result = Err(Refusal {
            code: Code::Unavailable,
            message: "the adapter gave no answer".into(),
        });
        for output in outputs {
            match output {
                Output::Admit { id: admitted, work } if admitted == id => {
                    if let Work::PushCommit { peer, index } = &work {
                        // A height claim: the next query repeats it.
                        let push = PushHeight {
                            peer: *peer,
                            highest: *index,
                        };
                        try_send(&self.deps.peer_heights, push, Droppable::PushHeight);
                        let hint = HeightPushed { index: *index };
                        try_send(&self.deps.state_sync, hint, Droppable::PushHeight);
                    }
                    result = Ok(Admission {
                        work,
                        permit: Permit::new(id, self.holders.hold_keeping_ended(id)),
                    });
                }
                Output::Cut {
                    id: victim,
                    charged,
                } => {
                    let held = self.holders.held(victim);
                    self.deps.send_stats.preempt(victim, held, charged);
                }
                Output::Refuse {
                    id: refused,
                    refusal,
                } if refused == id => {
                    if refusal.code == Code::ResourceExhausted && fetch {
                        if refusal.message.starts_with(ABANDONED_REFUSAL) {
                            self.deps.send_stats.count_refused(None);
                        } else if in_way.is_some() {
                            self.deps.send_stats.count_refused(in_way);
                        }
                    }
                    result = Err(refusal);
                }
                _ => {}
            }
        }
        result
    }
}
