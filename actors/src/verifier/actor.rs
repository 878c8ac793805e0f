use std::collections::HashMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

use actix::{
    Actor, ActorContext, AsyncContext, Context, Handler, Message, Recipient, ResponseFuture,
    Supervised,
};
use soma_store::ConsensusStore;
use soma_types::{Committee, Epoch};
use tokio::sync::oneshot;

use super::core::{Config, VerifierCore};
use super::job::run_job;
use super::messages::*;
use crate::Driver;
use crate::faults::Faults;
use crate::holders::Holders;
use crate::replay::Recorder;

/// Installs the committee of an epoch; sent at each epoch change, before
/// anything of that epoch is verified.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct InstallCommittee(pub Committee);

/// The pool finished a request.
#[derive(Message)]
#[rtype(result = "()")]
struct JobDone(u64);

/// What the Verifier actor is made from; kept across restarts.
#[derive(Clone)]
pub struct Deps {
    /// Its settings.
    pub config: Config,
    /// Capacity of its mailbox.
    pub mailbox_capacity: usize,
    /// A store whose committees (from `first_epoch` on) are installed when
    /// the actor starts and again after a restart; without one, every
    /// committee comes by [`InstallCommittee`].
    pub committees: Option<(Arc<dyn ConsensusStore>, Epoch)>,
    /// Told of every committee installed, whatever path installed it.
    pub installed: Option<Recipient<InstallCommittee>>,
    pub(crate) faults: Faults,
}

impl Deps {
    /// A Verifier with `config`, committees by message only.
    pub fn new(config: Config, mailbox_capacity: usize) -> Self {
        Deps {
            config,
            mailbox_capacity,
            committees: None,
            installed: None,
            faults: Faults::default(),
        }
    }
}

/// The newest `most` committees `store` holds from `first` on, in epoch
/// order. A store holds the committee of every epoch from `first` to its
/// newest, so the newest is found by doubling steps and then halving them:
/// a number of reads that grows with the logarithm of the epochs, where a
/// read of every committee since `first` made each start of a node that
/// has run for many epochs read and hold them all.
pub(crate) fn stored_committees(
    store: &dyn ConsensusStore,
    first: Epoch,
    most: usize,
) -> Result<Vec<Committee>, soma_store::Error> {
    newest_committees(first, most, |epoch| store.committee(epoch))
}

/// [`stored_committees`], reading each committee with `read`.
fn newest_committees<E>(
    first: Epoch,
    most: usize,
    mut read: impl FnMut(Epoch) -> Result<Option<Committee>, E>,
) -> Result<Vec<Committee>, E> {
    let Some(mut newest) = read(first)? else {
        return Ok(Vec::new());
    };
    let mut held = first;
    let mut step: Epoch = 1;
    // An epoch past the newest, every one from `first` to `held` held.
    let mut missing = loop {
        let Some(epoch) = held.checked_add(step) else {
            break Epoch::MAX;
        };
        match read(epoch)? {
            Some(c) => (held, newest, step) = (epoch, c, step.saturating_mul(2)),
            None => break epoch,
        }
    };
    while missing - held > 1 {
        let middle = held + (missing - held) / 2;
        match read(middle)? {
            Some(c) => (held, newest) = (middle, c),
            None => missing = middle,
        }
    }
    let mut committees = vec![newest];
    while committees.len() < most.max(1) && held > first {
        held -= 1;
        match read(held)? {
            Some(c) => committees.push(c),
            None => break,
        }
    }
    committees.reverse();
    Ok(committees)
}

/// The Verifier actor: a thin shell around [`VerifierCore`] that runs the
/// admitted jobs on a rayon pool and answers each caller when its job ends.
pub struct Verifier {
    deps: Deps,
    driver: Driver<VerifierCore>,
    /// Outlives restarts, with the jobs running on it.
    pool: Arc<rayon::ThreadPool>,
    next_id: u64,
    /// The jobs still running on the pool.
    holders: Holders,
    /// Callers of the requests waiting for a thread, by request id.
    callers: HashMap<u64, oneshot::Sender<Result<VerifyResponse, VerifyError>>>,
}

impl Verifier {
    /// A Verifier with a pool of `deps.config.threads` threads.
    pub fn new(deps: Deps, recorder: Option<Recorder>) -> std::io::Result<Self> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(deps.config.threads.max(1))
            .thread_name(|i| format!("soma-verify-{i}"))
            .build()
            .map_err(std::io::Error::other)?;
        Ok(Verifier {
            driver: Driver::new(deps.config.clone().into(), recorder)
                .with_faults(deps.faults.clone()),
            deps,
            pool: Arc::new(pool),
            next_id: 0,
            holders: Holders::default(),
            callers: HashMap::new(),
        })
    }

    fn install(&mut self, committee: Committee) {
        tracing::info!(epoch = committee.epoch(), "committee installed");
        if let Some(to) = &self.deps.installed {
            to.do_send(InstallCommittee(committee.clone()));
        }
        self.driver.step(Input::InstallCommittee(committee));
    }
}

impl Actor for Verifier {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(self.deps.mailbox_capacity);
        let Some((store, first)) = self.deps.committees.clone() else {
            return;
        };
        // Only the newest are kept: the others are not read.
        match stored_committees(store.as_ref(), first, self.deps.config.max_committees) {
            Ok(committees) => committees.into_iter().for_each(|c| self.install(c)),
            Err(e) => {
                // Without its committees it can verify nothing: a failure
                // for the supervisor.
                tracing::error!(%e, "the verifier cannot read the committees");
                ctx.stop();
            }
        }
    }
}

impl Supervised for Verifier {
    /// The pool and the jobs still running on it carry over (their callers
    /// are answered by the pool directly; a job whose end was reported in
    /// the message that panicked is not counted for ever); the requests
    /// waiting for a thread are dropped, their callers told the Verifier
    /// stopped; committees are installed again from the store when the
    /// actor starts.
    fn restarting(&mut self, _: &mut Context<Self>) {
        let mut init = self.driver.core().restart_init();
        init.running.retain(|job| self.holders.held(job.id));
        self.driver.restart(init);
        self.callers.clear();
    }
}

impl Handler<InstallCommittee> for Verifier {
    type Result = ();
    fn handle(&mut self, msg: InstallCommittee, _: &mut Context<Self>) {
        self.install(msg.0);
    }
}

impl Handler<JobDone> for Verifier {
    type Result = ();
    fn handle(&mut self, msg: JobDone, ctx: &mut Context<Self>) {
        let outputs = self.driver.step(Input::Done { id: msg.0 });
        self.act(outputs, ctx);
    }
}

impl Handler<Verify> for Verifier {
    type Result = ResponseFuture<Result<VerifyResponse, VerifyError>>;

    fn handle(&mut self, msg: Verify, ctx: &mut Context<Self>) -> Self::Result {
        let id = self.next_id;
        self.next_id += 1;
        let (tx, rx) = oneshot::channel();
        self.callers.insert(id, tx);
        let outputs = self.driver.step(Input::Verify { id, request: msg.0 });
        self.act(outputs, ctx);
        Box::pin(async move { rx.await.unwrap_or(Err(VerifyError::Stopped)) })
    }
}

impl Verifier {
    /// Starts the jobs the core started on the pool and answers the
    /// requests it refused.
    fn act(&mut self, outputs: Vec<Output>, ctx: &mut Context<Self>) {
        for output in outputs {
            match output {
                Output::Run {
                    id,
                    requests,
                    job: JobSlot(Some(job)),
                    ..
                } => {
                    let callers: Vec<_> = requests.iter().map(|r| self.callers.remove(r)).collect();
                    let addr = ctx.address();
                    let token = self.holders.hold(id);
                    self.pool.spawn(move || {
                        let n = callers.len();
                        let results = catch_unwind(AssertUnwindSafe(|| run_job(job)))
                            .unwrap_or_else(|_| vec![Err(VerifyError::Internal); n]);
                        // The job has ended: a restart from here on forgets
                        // it, so that its threads are not held for ever if
                        // the handler of its end is what fails.
                        drop(token);
                        // Free the threads before answering: the mailbox is
                        // FIFO, so a caller's next request, sent after the
                        // answer, always finds them free.
                        addr.do_send(JobDone(id));
                        for (caller, result) in callers.into_iter().zip(results) {
                            if let Some(caller) = caller {
                                let _ = caller.send(result);
                            }
                        }
                    });
                }
                Output::Rejected { id, error } => {
                    if let Some(caller) = self.callers.remove(&id) {
                        let _ = caller.send(Err(error));
                    }
                }
                // A run without its job (only a replayed trace has one):
                // its callers are told, and its threads freed.
                Output::Run { id, requests, .. } => {
                    for r in requests {
                        if let Some(caller) = self.callers.remove(&r) {
                            let _ = caller.send(Err(VerifyError::Internal));
                        }
                    }
                    ctx.address().do_send(JobDone(id));
                }
                Output::Installed { .. } => {}
            }
        }
    }
}

#[cfg(test)]
mod newest_committees_tests {
    use super::*;

    /// The newest committees of stores holding epochs `first..=last`, for
    /// every `last` up to 300 (and one far past): exactly the newest
    /// `most`, in order, each found in reads logarithmic in the epochs.
    #[test]
    fn the_newest_committees_are_found_in_logarithmic_reads() {
        let chain = soma_chain::ChainBuilder::new(soma_chain::ChainConfig::validators(4)).build(1);
        let authorities: Vec<_> = chain
            .genesis()
            .authorities()
            .map(|(_, a)| a.clone())
            .collect();
        let committee = |epoch| Committee::new(epoch, authorities.clone()).unwrap();
        for first in [0, 7] {
            for last in (first..=first + 300).chain([first + 100_000]) {
                for most in [0, 1, 2, 16] {
                    let mut reads = 0u64;
                    let found = newest_committees(first, most, |epoch| {
                        reads += 1;
                        Ok::<_, ()>((first..=last).contains(&epoch).then(|| committee(epoch)))
                    })
                    .unwrap();
                    let wanted = most.max(1).min((last - first + 1) as usize) as u64;
                    let epochs: Vec<Epoch> = found.iter().map(Committee::epoch).collect();
                    assert_eq!(
                        epochs,
                        (last + 1 - wanted..=last).collect::<Vec<_>>(),
                        "{first}..={last}, most {most}"
                    );
                    // Doubling up to twice the span, halving down, then
                    // the older ones.
                    let log = u64::from(64 - (last - first + 1).leading_zeros());
                    assert!(
                        reads <= 2 * log + 2 + wanted,
                        "{reads} reads for {first}..={last}"
                    );
                }
            }
        }
        // No committee at all, and a failed read, are told as such.
        assert!(
            newest_committees(0, 2, |_| Ok::<_, ()>(None))
                .unwrap()
                .is_empty()
        );
        assert_eq!(
            newest_committees(0, 2, |_| Err::<Option<Committee>, _>("broken")).unwrap_err(),
            "broken"
        );
    }
}

#[cfg(all(test, feature = "testing"))]
mod tests {
    use std::ops::RangeInclusive;

    use soma_chain::{Chain, ChainBuilder, ChainConfig};
    use soma_types::CommitIndex;
    use tokio::sync::watch;

    use super::*;
    use crate::faults::FaultPlan;
    use crate::supervisor::{self, Parent, Supervisor, TreeStatus};
    use crate::{Core, HashedBlob};

    /// A Verifier of one thread under a supervisor, its faults from
    /// `plan`; the tree's status, to keep while the test runs.
    fn supervised(plan: &Arc<FaultPlan>) -> (actix::Addr<Verifier>, watch::Receiver<TreeStatus>) {
        let (tree, status) = watch::channel(TreeStatus::default());
        let root_ctx = Context::<Supervisor>::new();
        let root = root_ctx.address();
        supervisor::start(
            root_ctx,
            Supervisor::new(Default::default(), tree.clone(), None),
            "supervisor",
            Parent::Fatal(tree),
        );
        let deps = Deps {
            faults: Faults::new(Some(plan.clone())),
            ..Deps::new(
                Config {
                    threads: 1,
                    ..Config::default()
                },
                64,
            )
        };
        let ctx = Context::<Verifier>::new();
        let verifier = ctx.address();
        supervisor::start(
            ctx,
            Verifier::new(deps, None).unwrap(),
            VerifierCore::NAME,
            Parent::Root(root),
        );
        (verifier, status)
    }

    /// A request to verify the blocks of `commits`, signatures checked.
    fn verify_blocks(chain: &Chain, commits: RangeInclusive<CommitIndex>) -> Verify {
        Verify(VerifyRequest::Blocks {
            epoch: 0,
            blocks: chain
                .fetch_blocks(commits)
                .iter()
                .map(|b| HashedBlob::new(b.serialized().clone()))
                .collect(),
            check_signatures: true,
        })
    }

    /// How many blocks an answer verified; panics, saying `what`, if the
    /// answer is not verified blocks.
    fn blocks_verified(
        answer: Result<Result<VerifyResponse, VerifyError>, actix::MailboxError>,
        what: &str,
    ) -> usize {
        match answer {
            Ok(Ok(VerifyResponse::Blocks(blocks))) => blocks.len(),
            other => panic!("{what}: {other:?}"),
        }
    }

    #[actix_rt::test]
    async fn a_restart_tells_the_waiting_callers_and_the_running_job_still_answers() {
        let chain = ChainBuilder::new(ChainConfig::validators(4)).build(20);
        let plan = Arc::new(FaultPlan::default());
        let (verifier, _status) = supervised(&plan);
        let install = || InstallCommittee(chain.genesis().clone());
        verifier.send(install()).await.unwrap();
        let request = |commits| verifier.send(verify_blocks(&chain, commits));
        // The first runs on the one thread, the second waits, and the
        // handler panics on the third: the actor restarts.
        plan.panic_actor(VerifierCore::NAME, 3);
        // A deadline only so that a caller never answered fails the test
        // rather than hanging it.
        let (running, waiting, failed) =
            tokio::time::timeout(std::time::Duration::from_secs(60), async {
                tokio::join!(request(1..=5), request(6..=10), request(11..=15))
            })
            .await
            .expect("every caller is answered");
        assert_eq!(plan.injected(VerifierCore::NAME), 1);
        assert_eq!(
            blocks_verified(running, "the running job's caller is answered"),
            chain.fetch_blocks(1..=5).len()
        );
        assert_eq!(waiting.unwrap().err(), Some(VerifyError::Stopped));
        // The request whose handling panicked is never answered: its
        // caller sees the reply dropped (a sync worker's "Verifier
        // unavailable", as for `Stopped`).
        assert!(failed.is_err(), "{failed:?}");
        // The restarted Verifier (committees come again, here by message)
        // answers the next request.
        verifier.send(install()).await.unwrap();
        assert!(matches!(
            request(16..=20).await.unwrap(),
            Ok(VerifyResponse::Blocks(_))
        ));
    }

    #[actix_rt::test]
    async fn a_panic_in_the_handler_of_a_jobs_end_frees_its_thread_for_the_next_request() {
        let chain = ChainBuilder::new(ChainConfig::validators(4)).build(10);
        let plan = Arc::new(FaultPlan::default());
        let (verifier, _status) = supervised(&plan);
        let install = || InstallCommittee(chain.genesis().clone());
        let request = |commits| verifier.send(verify_blocks(&chain, commits));
        verifier.send(install()).await.unwrap();
        // The request is the next input, its job's end the one after: the
        // handler of the end panics and the actor restarts.
        plan.panic_actor(VerifierCore::NAME, 2);
        assert_eq!(
            blocks_verified(request(1..=5).await, "the job answers its caller itself"),
            chain.fetch_blocks(1..=5).len()
        );
        // The end came before the answer, so the restart comes before
        // these. Had the restarted core still counted the job, its one
        // thread would stay taken and the request would wait for ever (the
        // deadline only turns that into a failure).
        verifier.send(install()).await.unwrap();
        let next = tokio::time::timeout(std::time::Duration::from_secs(30), request(6..=10))
            .await
            .expect("the thread is free again");
        assert_eq!(plan.injected(VerifierCore::NAME), 1);
        assert_eq!(
            blocks_verified(next, "the restarted Verifier verifies"),
            chain.fetch_blocks(6..=10).len()
        );
    }
}
