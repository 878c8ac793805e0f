use std::collections::HashMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

use actix::{Actor, AsyncContext, Context, Handler, Message, Recipient, ResponseFuture};
use soma_types::Committee;
use tokio::sync::oneshot;

use super::core::{Config, VerifierCore};
use super::job::run_job;
use super::messages::*;
use crate::Driver;
use crate::replay::Recorder;

/// Installs the committee of an epoch; sent at genesis and at each epoch
/// change, before anything of that epoch is verified.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct InstallCommittee(pub Committee);

/// The pool finished a request.
#[derive(Message)]
#[rtype(result = "()")]
struct JobDone(u64);

/// The Verifier actor: a thin shell around [`VerifierCore`] that runs the
/// admitted jobs on a rayon pool and answers each caller when its job ends.
pub struct Verifier {
    driver: Driver<VerifierCore>,
    pool: Arc<rayon::ThreadPool>,
    next_id: u64,
    mailbox_capacity: usize,
    /// Told of every committee installed, whatever path installed it.
    installed: Option<Recipient<InstallCommittee>>,
}

impl Verifier {
    /// A Verifier with a pool of `config.threads` threads.
    pub fn new(
        config: Config,
        mailbox_capacity: usize,
        recorder: Option<Recorder>,
    ) -> std::io::Result<Self> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(config.threads.max(1))
            .thread_name(|i| format!("soma-verify-{i}"))
            .build()
            .map_err(std::io::Error::other)?;
        Ok(Verifier {
            driver: Driver::new(config, recorder),
            pool: Arc::new(pool),
            next_id: 0,
            mailbox_capacity,
            installed: None,
        })
    }

    /// Forwards every committee this Verifier installs to `to` (the node's
    /// reserved inbound slots follow the committees).
    pub fn forward_installed(mut self, to: Recipient<InstallCommittee>) -> Self {
        self.installed = Some(to);
        self
    }
}

impl Actor for Verifier {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(self.mailbox_capacity);
    }
}

impl Handler<InstallCommittee> for Verifier {
    type Result = ();
    fn handle(&mut self, msg: InstallCommittee, _: &mut Context<Self>) {
        tracing::info!(epoch = msg.0.epoch(), "committee installed");
        if let Some(to) = &self.installed {
            to.do_send(InstallCommittee(msg.0.clone()));
        }
        self.driver.step(Input::InstallCommittee(msg.0));
    }
}

impl Handler<JobDone> for Verifier {
    type Result = ();
    fn handle(&mut self, msg: JobDone, _: &mut Context<Self>) {
        self.driver.step(Input::Done { id: msg.0 });
    }
}

impl Handler<Verify> for Verifier {
    type Result = ResponseFuture<Result<VerifyResponse, VerifyError>>;

    fn handle(&mut self, msg: Verify, ctx: &mut Context<Self>) -> Self::Result {
        let id = self.next_id;
        self.next_id += 1;
        let outputs = self.driver.step(Input::Verify { id, request: msg.0 });
        let mut replies = HashMap::new();
        for output in outputs {
            match output {
                Output::Run {
                    id,
                    job: JobSlot(Some(job)),
                    ..
                } => {
                    let (tx, rx) = oneshot::channel();
                    let addr = ctx.address();
                    self.pool.spawn(move || {
                        let result = catch_unwind(AssertUnwindSafe(|| run_job(job)))
                            .unwrap_or(Err(VerifyError::Internal));
                        // Free the slot before answering: the mailbox is
                        // FIFO, so a caller's next request, sent after the
                        // answer, always finds the slot free.
                        addr.do_send(JobDone(id));
                        let _ = tx.send(result);
                    });
                    replies.insert(id, Ok(rx));
                }
                Output::Rejected { id, error } => {
                    replies.insert(id, Err(error));
                }
                Output::Run { .. } | Output::Installed { .. } => {}
            }
        }
        let reply = replies.remove(&id).unwrap_or(Err(VerifyError::Internal));
        Box::pin(async move {
            match reply {
                Ok(rx) => rx.await.unwrap_or(Err(VerifyError::Stopped)),
                Err(e) => Err(e),
            }
        })
    }
}
