use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use soma_types::{Committee, Epoch, Limits};

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
}

impl Default for Config {
    fn default() -> Self {
        Config {
            threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
            queue_capacity: 256,
            limits: Limits::default(),
        }
    }
}

/// The logic of the Verifier: committees, admission and splitting.
pub struct VerifierCore {
    config: Config,
    committees: BTreeMap<Epoch, Arc<Committee>>,
    in_flight: HashSet<u64>,
}

impl Core for VerifierCore {
    const NAME: &'static str = "verifier";
    type Init = Config;
    type Input = Input;
    type Output = Output;

    fn new(config: Config) -> Self {
        VerifierCore {
            config,
            committees: BTreeMap::new(),
            in_flight: HashSet::new(),
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
        let parts = request
            .items()
            .div_ceil(MIN_ITEMS_PER_PART)
            .clamp(1, self.config.threads.max(1));
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
            })),
        }
    }
}
