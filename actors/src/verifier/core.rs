use std::collections::{BTreeMap, HashSet};
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
}

impl Default for Config {
    fn default() -> Self {
        Config {
            threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
            queue_capacity: 256,
            limits: Limits::default(),
            key_cache_capacity: 16_384,
        }
    }
}

/// Everything a Verifier core is made from: its settings and, after a
/// restart, the jobs still running on the pool (they count against the
/// queue until they end). Committees are installed as inputs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Init {
    /// Settings.
    #[serde(flatten)]
    pub config: Config,
    /// Ids of jobs running on the pool.
    #[serde(default)]
    pub running: Vec<u64>,
}

impl From<Config> for Init {
    fn from(config: Config) -> Self {
        Init {
            config,
            running: Vec::new(),
        }
    }
}

/// The logic of the Verifier: committees, admission and splitting.
pub struct VerifierCore {
    config: Config,
    committees: BTreeMap<Epoch, Arc<Committee>>,
    in_flight: HashSet<u64>,
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
            in_flight: init.running.into_iter().collect(),
        }
    }

    fn handle(&mut self, _now: Time, input: Input) -> Vec<Output> {
        match input {
            Input::InstallCommittee(committee) => {
                let epoch = committee.epoch();
                self.committees.insert(epoch, Arc::new(committee));
                vec![Output::Installed { epoch }]
            }
            Input::Verify { id, request } => vec![self.admit(id, request)],
            Input::Done { id } => {
                self.in_flight.remove(&id);
                vec![]
            }
        }
    }
}

impl VerifierCore {
    /// The init a restarted core is made from: the same settings and the
    /// jobs still running.
    pub fn restart_init(&self) -> Init {
        let mut running: Vec<u64> = self.in_flight.iter().copied().collect();
        running.sort_unstable();
        Init {
            config: self.config.clone(),
            running,
        }
    }

    fn admit(&mut self, id: u64, request: VerifyRequest) -> Output {
        if self.in_flight.len() >= self.config.queue_capacity {
            return Output::Rejected {
                id,
                error: VerifyError::Busy {
                    capacity: self.config.queue_capacity,
                },
            };
        }
        let epoch = request.epoch();
        let committee = match epoch {
            Some(e) => match self.committees.get(&e) {
                Some(c) => Some(c.clone()),
                None => {
                    return Output::Rejected {
                        id,
                        error: VerifyError::UnknownEpoch(e),
                    };
                }
            },
            None => None,
        };
        // The threads are shared among the jobs in flight: a job that runs
        // alone gets them all, while jobs that run together each keep their
        // signatures in one batch (a batch verifies cheaper per signature
        // the larger it is).
        let threads = self.config.threads.max(1);
        let share = threads.div_ceil(self.in_flight.len() + 1);
        let parts = request.items().div_ceil(MIN_ITEMS_PER_PART).clamp(1, share);
        self.in_flight.insert(id);
        Output::Run {
            id,
            epoch,
            parts,
            job: JobSlot(Some(Job {
                request,
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

    fn blocks(epoch: Epoch, n: usize) -> VerifyRequest {
        VerifyRequest::Blocks {
            epoch,
            blocks: vec![HashedBlob::new(Default::default()); n],
            check_signatures: true,
        }
    }

    fn core(threads: usize, queue_capacity: usize) -> VerifierCore {
        let mut c = VerifierCore::new(
            Config {
                threads,
                queue_capacity,
                ..Config::default()
            }
            .into(),
        );
        c.handle(Time(0), Input::InstallCommittee(committee(0)));
        c
    }

    fn verify(c: &mut VerifierCore, id: u64, request: VerifyRequest) -> Output {
        c.handle(Time(0), Input::Verify { id, request })
            .pop()
            .unwrap()
    }

    #[test]
    fn requests_need_their_epochs_committee() {
        let mut c = core(4, 8);
        assert!(matches!(
            verify(&mut c, 1, blocks(0, 1)),
            Output::Run { epoch: Some(0), .. }
        ));
        assert_eq!(
            verify(&mut c, 2, blocks(1, 1)),
            Output::Rejected {
                id: 2,
                error: VerifyError::UnknownEpoch(1)
            }
        );
        c.handle(Time(0), Input::InstallCommittee(committee(1)));
        assert!(matches!(
            verify(&mut c, 3, blocks(1, 1)),
            Output::Run { epoch: Some(1), .. }
        ));
    }

    /// The parts a `Run` output splits its job into.
    fn parts(output: Output) -> usize {
        match output {
            Output::Run { parts, .. } => parts,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn work_is_split_by_size_up_to_the_thread_count() {
        let mut c = core(4, 8);
        assert_eq!(parts(verify(&mut c, 1, blocks(0, 1))), 1);
        c.handle(Time(0), Input::Done { id: 1 });
        assert_eq!(parts(verify(&mut c, 2, blocks(0, 17))), 2);
        c.handle(Time(0), Input::Done { id: 2 });
        assert_eq!(parts(verify(&mut c, 3, blocks(0, 10_000))), 4);
    }

    #[test]
    fn jobs_in_flight_share_the_threads() {
        let mut c = core(4, 8);
        // Alone: every thread. Beside one job: half. Beside three or more:
        // one part, so the job's signatures stay in one batch.
        assert_eq!(parts(verify(&mut c, 1, blocks(0, 10_000))), 4);
        assert_eq!(parts(verify(&mut c, 2, blocks(0, 10_000))), 2);
        assert_eq!(parts(verify(&mut c, 3, blocks(0, 10_000))), 2);
        assert_eq!(parts(verify(&mut c, 4, blocks(0, 10_000))), 1);
        assert_eq!(parts(verify(&mut c, 5, blocks(0, 10_000))), 1);
        // As jobs end, the share grows back.
        for id in 1..=4 {
            c.handle(Time(0), Input::Done { id });
        }
        assert_eq!(parts(verify(&mut c, 6, blocks(0, 10_000))), 2);
        c.handle(Time(0), Input::Done { id: 5 });
        c.handle(Time(0), Input::Done { id: 6 });
        assert_eq!(parts(verify(&mut c, 7, blocks(0, 10_000))), 4);
    }

    #[test]
    fn queue_is_bounded_and_freed_when_jobs_finish() {
        let mut c = core(2, 2);
        assert!(matches!(
            verify(&mut c, 1, blocks(0, 1)),
            Output::Run { .. }
        ));
        assert!(matches!(
            verify(&mut c, 2, blocks(0, 1)),
            Output::Run { .. }
        ));
        assert_eq!(
            verify(&mut c, 3, blocks(0, 1)),
            Output::Rejected {
                id: 3,
                error: VerifyError::Busy { capacity: 2 }
            }
        );
        c.handle(Time(0), Input::Done { id: 1 });
        assert!(matches!(
            verify(&mut c, 4, blocks(0, 1)),
            Output::Run { .. }
        ));
    }
}
