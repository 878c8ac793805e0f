use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use soma_types::{Committee, Epoch, KeyCache, Limits};

use super::job::Job;
use super::messages::*;
use crate::{Core, Time};

/// Fewest items worth a thread of their own.
const MIN_ITEMS_PER_PART: usize = 16;

/// Verifier settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Config {
    /// Threads of the verification pool.
    pub threads: usize,
    /// Requests accepted but not yet answered; beyond this, `Busy`.
    pub queue_capacity: usize,
    /// Size limits on what is decoded and checked.
    pub limits: Limits,
    /// Decompressed signer keys kept for reuse.
    pub key_cache_capacity: usize,
    /// Most blocks one thread verifies in one batch when block requests
    /// that waited for a thread are merged into one job. Batches of about
    /// 400 blocks (4,400 signatures) verified fastest per signature here:
    /// larger ones outgrow the caches.
    #[serde(default = "default_merge_blocks_per_thread")]
    pub merge_blocks_per_thread: usize,
    /// Committees kept, those of the newest epochs installed (at least
    /// one): a request of an older epoch is refused (`UnknownEpoch`), and
    /// installing one older than all kept drops it at once. Sync verifies
    /// against the epoch it has reached, whose committee is the newest
    /// installed (a node catching up across seven epochs with one kept is
    /// tested), so a node that runs for years holds this many committees,
    /// not one per epoch it has seen.
    #[serde(default = "default_max_committees")]
    pub max_committees: usize,
}

fn default_merge_blocks_per_thread() -> usize {
    400
}

fn default_max_committees() -> usize {
    16
}

impl Default for Config {
    fn default() -> Self {
        Config {
            threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
            queue_capacity: 256,
            limits: Limits::default(),
            key_cache_capacity: 16_384,
            merge_blocks_per_thread: default_merge_blocks_per_thread(),
            max_committees: default_max_committees(),
        }
    }
}

/// A job on the pool, as a restarted core must still count it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Running {
    /// The job's id (that of its first request).
    pub id: u64,
    /// Threads it took.
    pub threads: usize,
    /// Requests it answers.
    pub requests: usize,
}

/// Everything a Verifier core is made from: its settings and, after a
/// restart, the jobs still running on the pool (they count against the
/// queue and hold their threads until they end). Committees are installed
/// as inputs; requests that were waiting for a thread are not carried over
/// (their callers are told the Verifier stopped).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Init {
    /// Settings.
    #[serde(flatten)]
    pub config: Config,
    /// Jobs running on the pool.
    #[serde(default)]
    pub running: Vec<Running>,
}

impl From<Config> for Init {
    fn from(config: Config) -> Self {
        Init {
            config,
            running: Vec::new(),
        }
    }
}

/// Epoch, signatures checked, decoded: block requests alike in these can
/// be verified as one batch.
type BlockKind = (Epoch, bool, bool);

/// A request admitted and waiting for a thread.
struct Waiting {
    id: u64,
    request: VerifyRequest,
    committee: Option<Arc<Committee>>,
}

impl Waiting {
    /// What block requests must share to be verified in one batch: the
    /// committee's epoch, whether signatures are checked, and whether the
    /// blocks come decoded.
    fn block_kind(&self) -> Option<BlockKind> {
        match &self.request {
            VerifyRequest::Blocks {
                epoch,
                check_signatures,
                ..
            } => Some((*epoch, *check_signatures, false)),
            VerifyRequest::DecodedBlocks {
                epoch,
                check_signatures,
                ..
            } => Some((*epoch, *check_signatures, true)),
            _ => None,
        }
    }
}

/// The logic of the Verifier: committees, admission, and scheduling on the
/// pool's threads.
///
/// A request runs at once when a thread is free, split across the free
/// threads; otherwise it waits. When threads free up, the oldest waiting
/// request runs next, and block requests of its kind waiting behind it
/// join it in one job (a batch verifies cheaper per signature the larger
/// it is). A job takes a share of what waits in proportion to the threads
/// free, so that threads freeing up later find work too.
pub struct VerifierCore {
    config: Config,
    committees: BTreeMap<Epoch, Arc<Committee>>,
    running: BTreeMap<u64, Running>,
    waiting: VecDeque<Waiting>,
    keys: Arc<KeyCache>,
}

impl Core for VerifierCore {
    const NAME: &'static str = "verifier";
    type Init = Init;
    type Input = Input;
    type Output = Output;

    fn new(init: Init) -> Self {
        VerifierCore {
            keys: Arc::new(KeyCache::new(init.config.key_cache_capacity)),
            config: init.config,
            committees: BTreeMap::new(),
            running: init.running.into_iter().map(|r| (r.id, r)).collect(),
            waiting: VecDeque::new(),
        }
    }

    fn handle(&mut self, _now: Time, input: Input) -> Vec<Output> {
        match input {
            Input::InstallCommittee(committee) => {
                let epoch = committee.epoch();
                self.committees.insert(epoch, Arc::new(committee));
                while self.committees.len() > self.config.max_committees.max(1) {
                    self.committees.pop_first();
                }
                vec![Output::Installed { epoch }]
            }
            Input::Verify { id, request } => match self.admit(id, request) {
                Ok(()) => self.dispatch(),
                Err(error) => vec![Output::Rejected { id, error }],
            },
            Input::Done { id } => {
                self.running.remove(&id);
                self.dispatch()
            }
        }
    }
}

impl VerifierCore {
    /// The init a restarted core is made from: the same settings and the
    /// jobs still running.
    pub fn restart_init(&self) -> Init {
        Init {
            config: self.config.clone(),
            running: self.running.values().cloned().collect(),
        }
    }

    /// Ids of the requests waiting for a thread, oldest first.
    #[cfg(test)]
    fn waiting(&self) -> Vec<u64> {
        self.waiting.iter().map(|w| w.id).collect()
    }

    fn threads(&self) -> usize {
        self.config.threads.max(1)
    }

    fn free_threads(&self) -> usize {
        let taken: usize = self.running.values().map(|r| r.threads).sum();
        self.threads().saturating_sub(taken)
    }

    fn pending(&self) -> usize {
        self.waiting.len() + self.running.values().map(|r| r.requests).sum::<usize>()
    }

    /// Queues request `id`, or says why not.
    fn admit(&mut self, id: u64, request: VerifyRequest) -> Result<(), VerifyError> {
        if self.pending() >= self.config.queue_capacity {
            return Err(VerifyError::Busy {
                capacity: self.config.queue_capacity,
            });
        }
        let committee = match request.epoch() {
            Some(e) => Some(
                self.committees
                    .get(&e)
                    .cloned()
                    .ok_or(VerifyError::UnknownEpoch(e))?,
            ),
            None => None,
        };
        self.waiting.push_back(Waiting {
            id,
            request,
            committee,
        });
        Ok(())
    }

    /// Starts jobs while threads are free and requests wait.
    fn dispatch(&mut self) -> Vec<Output> {
        let mut outputs = Vec::new();
        loop {
            let free = self.free_threads();
            if free == 0 {
                break;
            }
            let Some(first) = self.waiting.pop_front() else {
                break;
            };
            let mut taken = vec![first];
            if let Some(kind) = taken[0].block_kind() {
                self.merge_into(&mut taken, kind, free);
            }
            outputs.push(self.start(taken, free));
        }
        outputs
    }

    /// Moves into `taken` (a block request of `kind`) the waiting block
    /// requests of the same kind, oldest first, up to this job's share of
    /// them: in proportion to the `free` threads among all, within
    /// `merge_blocks_per_thread` for each free thread.
    fn merge_into(&mut self, taken: &mut Vec<Waiting>, kind: BlockKind, free: usize) {
        let of_kind: usize = self
            .waiting
            .iter()
            .filter(|w| w.block_kind() == Some(kind))
            .map(|w| w.request.items())
            .sum();
        let mut items = taken[0].request.items();
        let share = (items + of_kind)
            .saturating_mul(free)
            .div_ceil(self.threads());
        let limit = free.saturating_mul(self.config.merge_blocks_per_thread);
        let committee = taken[0].committee.clone();
        let same_committee = |w: &Waiting| match (&w.committee, &committee) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            _ => false,
        };
        let mut i = 0;
        while i < self.waiting.len() && items < share {
            let next = &self.waiting[i];
            // Of the same kind, and admitted under the same committee (one
            // installed again for its epoch is another).
            if next.block_kind() != Some(kind) || !same_committee(next) {
                i += 1;
                continue;
            }
            if items + next.request.items() > limit {
                break;
            }
            items += next.request.items();
            taken.extend(self.waiting.remove(i));
        }
    }

    fn start(&mut self, taken: Vec<Waiting>, free: usize) -> Output {
        let id = taken[0].id;
        let epoch = taken[0].request.epoch();
        let committee = taken[0].committee.clone();
        let items: usize = taken.iter().map(|w| w.request.items()).sum();
        let parts = if taken[0].request.splits() {
            items.div_ceil(MIN_ITEMS_PER_PART).clamp(1, free)
        } else {
            1
        };
        let requests: Vec<u64> = taken.iter().map(|w| w.id).collect();
        self.running.insert(
            id,
            Running {
                id,
                threads: parts,
                requests: requests.len(),
            },
        );
        Output::Run {
            id,
            requests,
            epoch,
            parts,
            job: JobSlot(Some(Job {
                requests: taken.into_iter().map(|w| w.request).collect(),
                committee,
                parts,
                limits: self.config.limits.clone(),
                keys: self.keys.clone(),
            })),
        }
    }
}

#[cfg(test)]
mod tests {
    use soma_types::{Authority, KeyPair, PeerId};

    use super::*;
    use crate::HashedBlob;

    fn committee(epoch: Epoch) -> Committee {
        let authorities = (0..4u8)
            .map(|i| Authority {
                stake: 1,
                protocol_key: KeyPair::from_seed([i; 32]).public(),
                network_key: PeerId([i; 32]),
                address: String::new(),
            })
            .collect();
        Committee::new(epoch, authorities).unwrap()
    }

    fn blocks_checked(epoch: Epoch, n: usize, check_signatures: bool) -> VerifyRequest {
        VerifyRequest::Blocks {
            epoch,
            blocks: vec![HashedBlob::new(Default::default()); n],
            check_signatures,
        }
    }

    fn blocks(epoch: Epoch, n: usize) -> VerifyRequest {
        blocks_checked(epoch, n, true)
    }

    fn infos(n: usize) -> VerifyRequest {
        VerifyRequest::NodeInfos {
            infos: vec![Default::default(); n],
            now_ms: 0,
            local: PeerId([9; 32]),
            allowlist: None,
        }
    }

    fn core_with(threads: usize, queue_capacity: usize, merge: usize) -> VerifierCore {
        let mut c = VerifierCore::new(
            Config {
                threads,
                queue_capacity,
                merge_blocks_per_thread: merge,
                ..Config::default()
            }
            .into(),
        );
        c.handle(Time(0), Input::InstallCommittee(committee(0)));
        c
    }

    fn core(threads: usize, queue_capacity: usize) -> VerifierCore {
        core_with(threads, queue_capacity, 1_024)
    }

    /// A job started: its id, the requests it answers and its parts.
    #[derive(Debug, PartialEq)]
    struct Started {
        id: u64,
        requests: Vec<u64>,
        parts: usize,
    }

    fn started(outputs: Vec<Output>) -> Vec<Started> {
        outputs
            .into_iter()
            .map(|o| match o {
                Output::Run {
                    id,
                    requests,
                    parts,
                    job: JobSlot(Some(job)),
                    ..
                } => {
                    assert_eq!(job.requests.len(), requests.len());
                    assert_eq!(job.parts, parts);
                    Started {
                        id,
                        requests,
                        parts,
                    }
                }
                other => panic!("not a job: {other:?}"),
            })
            .collect()
    }

    fn job(id: u64, requests: &[u64], parts: usize) -> Started {
        Started {
            id,
            requests: requests.to_vec(),
            parts,
        }
    }

    fn verify(c: &mut VerifierCore, id: u64, request: VerifyRequest) -> Vec<Output> {
        c.handle(Time(0), Input::Verify { id, request })
    }

    fn done(c: &mut VerifierCore, id: u64) -> Vec<Started> {
        started(c.handle(Time(0), Input::Done { id }))
    }

    #[test]
    fn only_the_newest_committees_are_kept() {
        // Epochs 0 to 20 installed with room for 16: epochs 5 to 20 stay.
        let mut c = VerifierCore::new(
            Config {
                threads: 64,
                max_committees: 16,
                ..Config::default()
            }
            .into(),
        );
        for epoch in 0..=20 {
            c.handle(Time(0), Input::InstallCommittee(committee(epoch)));
        }
        let kept: Vec<Epoch> = c.committees.keys().copied().collect();
        assert_eq!(kept, (5..=20).collect::<Vec<_>>());
        assert_eq!(
            verify(&mut c, 1, blocks(4, 1)),
            vec![Output::Rejected {
                id: 1,
                error: VerifyError::UnknownEpoch(4)
            }]
        );
        assert!(matches!(
            verify(&mut c, 2, blocks(5, 1))[..],
            [Output::Run { epoch: Some(5), .. }]
        ));
        // An epoch older than all kept, installed late, is dropped at once;
        // one installed again changes nothing.
        c.handle(Time(0), Input::InstallCommittee(committee(2)));
        c.handle(Time(0), Input::InstallCommittee(committee(20)));
        let now: Vec<Epoch> = c.committees.keys().copied().collect();
        assert_eq!(now, kept);
    }

    #[test]
    fn requests_need_their_epochs_committee() {
        let mut c = core(4, 8);
        assert!(matches!(
            verify(&mut c, 1, blocks(0, 1))[..],
            [Output::Run { epoch: Some(0), .. }]
        ));
        assert_eq!(
            verify(&mut c, 2, blocks(1, 1)),
            vec![Output::Rejected {
                id: 2,
                error: VerifyError::UnknownEpoch(1)
            }]
        );
        c.handle(Time(0), Input::InstallCommittee(committee(1)));
        assert!(matches!(
            verify(&mut c, 3, blocks(1, 1))[..],
            [Output::Run { epoch: Some(1), .. }]
        ));
    }

    #[test]
    fn work_is_split_by_size_up_to_the_free_threads() {
        let mut c = core(4, 8);
        assert_eq!(started(verify(&mut c, 1, blocks(0, 1))), [job(1, &[1], 1)]);
        // Three threads are left; 17 blocks are worth two of them.
        assert_eq!(started(verify(&mut c, 2, blocks(0, 17))), [job(2, &[2], 2)]);
        assert_eq!(
            started(verify(&mut c, 3, blocks(0, 10_000))),
            [job(3, &[3], 1)]
        );
        done(&mut c, 1);
        done(&mut c, 2);
        done(&mut c, 3);
        assert_eq!(
            started(verify(&mut c, 4, blocks(0, 10_000))),
            [job(4, &[4], 4)]
        );
    }

    #[test]
    fn requests_that_do_not_split_take_one_thread() {
        let mut c = core(4, 8);
        assert_eq!(started(verify(&mut c, 1, infos(1_000))), [job(1, &[1], 1)]);
        assert_eq!(
            started(verify(&mut c, 2, blocks(0, 1_000))),
            [job(2, &[2], 3)]
        );
    }

    #[test]
    fn requests_wait_for_a_free_thread_in_order() {
        let mut c = core(2, 8);
        assert_eq!(
            started(verify(&mut c, 1, blocks(0, 400))),
            [job(1, &[1], 2)]
        );
        // Every thread is taken: the others wait, whatever their kind.
        assert_eq!(verify(&mut c, 2, infos(3)), vec![]);
        assert_eq!(verify(&mut c, 3, blocks(0, 400)), vec![]);
        assert_eq!(c.waiting(), [2, 3]);
        // The oldest first, on one thread; the next on the thread left.
        assert_eq!(done(&mut c, 1), [job(2, &[2], 1), job(3, &[3], 1)]);
        assert_eq!(c.waiting(), Vec::<u64>::new());
        assert_eq!(done(&mut c, 2), []);
    }

    #[test]
    fn waiting_block_requests_of_one_kind_run_as_one_job() {
        let mut c = core(2, 16);
        assert_eq!(
            started(verify(&mut c, 1, blocks(0, 400))),
            [job(1, &[1], 2)]
        );
        c.handle(Time(0), Input::InstallCommittee(committee(1)));
        for (id, request) in [
            (2, blocks(0, 400)),
            (3, blocks(1, 400)),
            (4, blocks_checked(0, 400, false)),
            (5, infos(2)),
            (6, blocks(0, 400)),
            (7, blocks(0, 100)),
        ] {
            assert_eq!(verify(&mut c, id, request), vec![]);
        }
        // All threads free: requests 2, 6 and 7 (epoch 0, signatures
        // checked) in one job over both threads; another epoch or rule is
        // not merged.
        assert_eq!(done(&mut c, 1), [job(2, &[2, 6, 7], 2)]);
        assert_eq!(c.waiting(), [3, 4, 5]);
        assert_eq!(done(&mut c, 2), [job(3, &[3], 2)]);
        assert_eq!(done(&mut c, 3), [job(4, &[4], 2)]);
        assert_eq!(done(&mut c, 4), [job(5, &[5], 1)]);
    }

    #[test]
    fn requests_of_a_committee_installed_again_are_not_merged_with_older_ones() {
        let mut c = core(1, 8);
        assert_eq!(started(verify(&mut c, 1, blocks(0, 1))), [job(1, &[1], 1)]);
        assert_eq!(verify(&mut c, 2, blocks(0, 1)), vec![]);
        c.handle(Time(0), Input::InstallCommittee(committee(0)));
        assert_eq!(verify(&mut c, 3, blocks(0, 1)), vec![]);
        assert_eq!(verify(&mut c, 4, blocks(0, 1)), vec![]);
        assert_eq!(done(&mut c, 1), [job(2, &[2], 1)]);
        assert_eq!(done(&mut c, 2), [job(3, &[3, 4], 1)]);
    }

    #[test]
    fn a_job_takes_its_share_of_the_waiting_blocks_for_the_threads_free() {
        let mut c = core(2, 16);
        assert_eq!(started(verify(&mut c, 1, infos(1))), [job(1, &[1], 1)]);
        assert_eq!(started(verify(&mut c, 2, infos(1))), [job(2, &[2], 1)]);
        for id in 3..=10 {
            assert_eq!(verify(&mut c, id, blocks(0, 100)), vec![]);
        }
        // One thread of two is free: half of the 800 blocks waiting.
        assert_eq!(done(&mut c, 1), [job(3, &[3, 4, 5, 6], 1)]);
        // Each thread freeing up takes half of what is left, so that the
        // last jobs are short and end together.
        assert_eq!(done(&mut c, 2), [job(7, &[7, 8], 1)]);
        assert_eq!(done(&mut c, 3), [job(9, &[9], 1)]);
        assert_eq!(done(&mut c, 7), [job(10, &[10], 1)]);
        assert_eq!(c.waiting(), Vec::<u64>::new());
    }

    #[test]
    fn a_merged_job_holds_at_most_its_limit_of_blocks_per_thread() {
        let mut c = core_with(2, 16, 250);
        assert_eq!(started(verify(&mut c, 1, blocks(0, 10))), [job(1, &[1], 1)]);
        assert_eq!(started(verify(&mut c, 2, blocks(0, 10))), [job(2, &[2], 1)]);
        for id in 3..=8 {
            assert_eq!(verify(&mut c, id, blocks(0, 100)), vec![]);
        }
        assert_eq!(done(&mut c, 1), [job(3, &[3, 4], 1)]);
        // A request larger than the limit still runs, alone.
        assert_eq!(verify(&mut c, 9, blocks(0, 600)), vec![]);
        assert_eq!(done(&mut c, 2), [job(5, &[5, 6], 1)]);
        assert_eq!(done(&mut c, 3), [job(7, &[7, 8], 1)]);
        assert_eq!(done(&mut c, 5), [job(9, &[9], 1)]);
    }

    #[test]
    fn the_queue_counts_waiting_and_running_requests() {
        let mut c = core(1, 3);
        assert_eq!(started(verify(&mut c, 1, blocks(0, 1))), [job(1, &[1], 1)]);
        assert_eq!(verify(&mut c, 2, blocks(0, 1)), vec![]);
        assert_eq!(verify(&mut c, 3, blocks(0, 1)), vec![]);
        assert_eq!(
            verify(&mut c, 4, blocks(0, 1)),
            vec![Output::Rejected {
                id: 4,
                error: VerifyError::Busy { capacity: 3 }
            }]
        );
        // Requests 2 and 3 merge into one job: both still count.
        assert_eq!(done(&mut c, 1), [job(2, &[2, 3], 1)]);
        assert_eq!(verify(&mut c, 5, blocks(0, 1)), vec![]);
        assert!(matches!(
            verify(&mut c, 6, blocks(0, 1))[..],
            [Output::Rejected { id: 6, .. }]
        ));
        assert_eq!(done(&mut c, 2), [job(5, &[5], 1)]);
    }

    #[test]
    fn a_restarted_core_counts_the_jobs_still_running() {
        let mut c = core(2, 3);
        assert_eq!(started(verify(&mut c, 1, blocks(0, 1))), [job(1, &[1], 1)]);
        assert_eq!(
            started(verify(&mut c, 2, blocks(0, 400))),
            [job(2, &[2], 1)]
        );
        let init = c.restart_init();
        assert_eq!(
            init.running,
            [
                Running {
                    id: 1,
                    threads: 1,
                    requests: 1
                },
                Running {
                    id: 2,
                    threads: 1,
                    requests: 1
                }
            ]
        );
        let mut c = VerifierCore::new(init);
        c.handle(Time(0), Input::InstallCommittee(committee(0)));
        // Both threads are still taken, and two of three requests.
        assert_eq!(verify(&mut c, 3, blocks(0, 1)), vec![]);
        assert!(matches!(
            verify(&mut c, 4, blocks(0, 1))[..],
            [Output::Rejected { id: 4, .. }]
        ));
        assert_eq!(done(&mut c, 2), [job(3, &[3], 1)]);
    }
}
