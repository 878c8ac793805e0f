use std::sync::Arc;
use std::time::Duration;

use actix::{Actor, Addr, Context, Handler, Message};

use super::core::{GrpcAdapterCore, Limits};
use super::deadline::SendStats;
use super::messages::*;
use crate::Driver;
use crate::peer_heights::{PeerHeights, PushHeight};
use crate::replay::Recorder;

/// An admitted fetch's slot; dropping it (the call ended, failed or was
/// cancelled) gives the slot back to the adapter.
#[derive(Debug)]
pub struct Permit {
    id: u64,
    adapter: Addr<GrpcAdapter>,
}

impl Permit {
    /// The fetch's correlation id.
    pub(crate) fn id(&self) -> u64 {
        self.id
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.adapter.do_send(Done(self.id));
    }
}

#[derive(Message)]
#[rtype(result = "()")]
struct Done(u64);

/// The GrpcAdapter actor: admits calls through [`GrpcAdapterCore`] and
/// performs the side effects of admitted ones (a pushed height goes to
/// PeerHeights).
pub struct GrpcAdapter {
    driver: Driver<GrpcAdapterCore>,
    peer_heights: Addr<PeerHeights>,
    next_id: u64,
    mailbox_capacity: usize,
    /// The answers being sent, to find stalled ones and cut them.
    send_stats: Arc<SendStats>,
    stall: Duration,
}

impl GrpcAdapter {
    /// An adapter enforcing `limits`.
    pub fn new(
        limits: Limits,
        peer_heights: Addr<PeerHeights>,
        mailbox_capacity: usize,
        send_stats: Arc<SendStats>,
        recorder: Option<Recorder>,
    ) -> Self {
        GrpcAdapter {
            stall: limits.fetch_stall_timeout,
            driver: Driver::new(limits, recorder),
            peer_heights,
            next_id: 0,
            mailbox_capacity,
            send_stats,
        }
    }
}

impl Actor for GrpcAdapter {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(self.mailbox_capacity);
    }
}

impl Handler<CallMsg> for GrpcAdapter {
    type Result = Result<Admission, Refusal>;

    fn handle(&mut self, msg: CallMsg, ctx: &mut Context<Self>) -> Self::Result {
        use actix::AsyncContext;
        let id = self.next_id;
        self.next_id += 1;
        // A fetch may take a stalled answer's slot (see the core); at most
        // `max_concurrent_fetches` answers to look at.
        let stalled = if matches!(
            msg.call,
            Call::FetchCommits { .. } | Call::FetchBlocks { .. }
        ) {
            self.send_stats.stalled(self.stall)
        } else {
            Vec::new()
        };
        let outputs = self.driver.step(Input::Call {
            id,
            caller: msg.caller,
            connection: msg.connection,
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
                        self.peer_heights.do_send(PushHeight {
                            peer: *peer,
                            highest: *index,
                        });
                    }
                    result = Ok(Admission {
                        work,
                        permit: Permit {
                            id,
                            adapter: ctx.address(),
                        },
                    });
                }
                Output::Cut { id: victim } => self.send_stats.preempt(victim),
                Output::Refuse {
                    id: refused,
                    refusal,
                } if refused == id => result = Err(refusal),
                _ => {}
            }
        }
        result
    }
}

impl Handler<Done> for GrpcAdapter {
    type Result = ();
    fn handle(&mut self, msg: Done, _: &mut Context<Self>) {
        self.driver.step(Input::Done { id: msg.0 });
    }
}
