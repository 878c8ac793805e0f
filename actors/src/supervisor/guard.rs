use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll, ready};
use std::time::Duration;

use actix::dev::{AsyncContextParts, ContextFut};
use actix::{Actor, Addr, Context, Supervised};
use tokio::sync::{oneshot, watch};

use super::actor::{ChildFailed, Decision, NodeFailure, Supervisor, TreeStatus};
use super::core::ActorFailure;

/// Who decides for a failed actor.
#[derive(Clone)]
pub(crate) enum Parent {
    /// The root supervisor.
    Root(Addr<Supervisor>),
    /// Nobody: the root itself, whose failure stops the node.
    Fatal(watch::Sender<TreeStatus>),
}

impl Parent {
    fn report(&self, actor: &'static str, failure: ActorFailure) -> oneshot::Receiver<Decision> {
        let (reply, decision) = oneshot::channel();
        match self {
            Parent::Root(root) => root.do_send(ChildFailed {
                actor,
                failure,
                reply,
            }),
            Parent::Fatal(status) => {
                status.send_modify(|s| {
                    s.failure.get_or_insert(NodeFailure {
                        actor: actor.to_owned(),
                        failures: 1,
                        window: Duration::ZERO,
                        last: failure,
                    });
                });
                let _ = reply.send(Decision::Stop);
            }
        }
        decision
    }
}

/// Starts `actor` in `ctx` (made beforehand, so its address could be
/// handed to other actors) on the current arbiter, under a guard that
/// reports its failures to `parent` and restarts it when told to.
pub(crate) fn start<A>(ctx: Context<A>, actor: A, name: &'static str, parent: Parent)
where
    A: Actor<Context = Context<A>> + Supervised,
{
    actix_rt::spawn(Guarded {
        fut: ctx.into_future(actor),
        name,
        parent,
        waiting: None,
    });
}

/// An actor's context, polled under `catch_unwind`.
struct Guarded<A: Actor<Context = Context<A>> + Supervised> {
    fut: ContextFut<A, Context<A>>,
    name: &'static str,
    parent: Parent,
    /// The parent's decision on the last failure, while it is awaited (the
    /// mailbox keeps its messages meanwhile).
    waiting: Option<oneshot::Receiver<Decision>>,
}

impl<A: Actor<Context = Context<A>> + Supervised> Unpin for Guarded<A> {}

impl<A: Actor<Context = Context<A>> + Supervised> Future for Guarded<A> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<()> {
        let this = &mut *self;
        loop {
            if let Some(waiting) = this.waiting.as_mut() {
                let decision = ready!(Pin::new(waiting).poll(cx));
                this.waiting = None;
                if decision != Ok(Decision::Restart) {
                    return Poll::Ready(());
                }
                // `restarting` rebuilds the actor's state; it may fail too.
                match catch_unwind(AssertUnwindSafe(|| this.fut.restart())) {
                    Ok(true) => continue,
                    // Nobody holds its address any more: nothing to restart.
                    Ok(false) => return Poll::Ready(()),
                    Err(panic) => {
                        let failure = panicked(panic.as_ref());
                        this.waiting = Some(this.parent.report(this.name, failure));
                        continue;
                    }
                }
            }
            let failure = match catch_unwind(AssertUnwindSafe(|| Pin::new(&mut this.fut).poll(cx)))
            {
                Ok(Poll::Pending) => return Poll::Pending,
                // Stopped with no sender left: the node is going away.
                Ok(Poll::Ready(())) if !this.fut.ctx().parts().connected() => {
                    return Poll::Ready(());
                }
                Ok(Poll::Ready(())) => ActorFailure::Stopped,
                Err(panic) => panicked(panic.as_ref()),
            };
            tracing::error!(actor = this.name, %failure, "actor failed");
            this.waiting = Some(this.parent.report(this.name, failure));
        }
    }
}

fn panicked(panic: &(dyn std::any::Any + Send)) -> ActorFailure {
    ActorFailure::Panicked {
        message: panic_message(panic),
    }
}

/// What a panic said, if it said it in a string.
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned())
}
