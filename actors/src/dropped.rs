//! Messages dropped on purpose because their receiver's mailbox was full.
//!
//! actix's `do_send` queues past a mailbox's capacity, so a receiver that
//! falls behind would let its queue grow without bound. Every send whose
//! loss is harmless (the next round, query or probe repeats it) goes
//! through `try_send` instead, and a full mailbox drops it and counts it
//! here; sends that must not be lost are bounded by construction (see
//! docs/architecture.md, "Bounded sends"). The counts are per process, as
//! the metric `soma_dropped_messages_total{message}` reports them.

use std::sync::atomic::{AtomicU64, Ordering};

use actix::dev::ToEnvelope;
use actix::{Actor, Addr, Handler, Message, Recipient};

/// The sends that may be dropped, by the name the metric uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Droppable {
    /// A PushCommit's height, from the gRPC adapter to PeerHeights or
    /// StateSync.
    PushHeight,
    /// A dial Discovery asks of Connections.
    Dial,
    /// A connection Discovery rotates out, asked of Connections (the next
    /// rotation drops one again while the node is over its target).
    Disconnect,
    /// A broken connection reported by a failed call.
    ReportBroken,
    /// A peer's availability answer, to PeerHeights.
    UpdateHeight,
    /// A background call to peers (height queries, commit pushes) not
    /// started because as many are running as allowed.
    PeerCall,
}

impl Droppable {
    /// Every kind, in metric order.
    pub const ALL: [Droppable; 6] = [
        Droppable::PushHeight,
        Droppable::Dial,
        Droppable::Disconnect,
        Droppable::ReportBroken,
        Droppable::UpdateHeight,
        Droppable::PeerCall,
    ];

    /// The metric label.
    pub fn name(self) -> &'static str {
        match self {
            Droppable::PushHeight => "push_height",
            Droppable::Dial => "dial",
            Droppable::Disconnect => "disconnect",
            Droppable::ReportBroken => "report_broken",
            Droppable::UpdateHeight => "update_height",
            Droppable::PeerCall => "peer_call",
        }
    }
}

static DROPPED: [AtomicU64; Droppable::ALL.len()] =
    [const { AtomicU64::new(0) }; Droppable::ALL.len()];

/// Counts one dropped message of `kind`.
pub(crate) fn count(kind: Droppable) {
    DROPPED[kind as usize].fetch_add(1, Ordering::Relaxed);
    tracing::debug!(
        message = kind.name(),
        "dropped: the receiver's mailbox is full"
    );
}

/// Messages of `kind` dropped since the process started.
pub fn dropped(kind: Droppable) -> u64 {
    DROPPED[kind as usize].load(Ordering::Relaxed)
}

/// Sends `msg` unless `to`'s mailbox is full, then drops and counts it as
/// `kind` (a closed mailbox drops it uncounted).
pub(crate) fn try_send<A, M>(to: &Addr<A>, msg: M, kind: Droppable)
where
    A: Actor + Handler<M>,
    A::Context: ToEnvelope<A, M>,
    M: Message + Send + 'static,
    M::Result: Send,
{
    counted(to.try_send(msg), kind);
}

/// [`try_send`] to a recipient.
pub(crate) fn try_send_to<M>(to: &Recipient<M>, msg: M, kind: Droppable)
where
    M: Message + Send + 'static,
    M::Result: Send,
{
    counted(to.try_send(msg), kind);
}

/// Counts a send refused by a full mailbox as a drop of `kind`; a closed
/// mailbox is a stopping actor, not a drop to count.
fn counted<M>(sent: Result<(), actix::prelude::SendError<M>>, kind: Droppable) {
    if let Err(actix::prelude::SendError::Full(_)) = sent {
        count(kind);
    }
}
