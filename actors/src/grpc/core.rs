use std::collections::HashMap;

use std::time::Duration;

use serde::{Deserialize, Serialize};
use soma_types::PeerId;

use super::messages::*;
use crate::{Core, Time};

/// What the server accepts; every value is a named configuration setting.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Most commits returned by one FetchCommits.
    pub commit_sync_batch_size: u64,
    /// Most block references in one FetchBlocks.
    pub max_blocks_per_fetch: usize,
    /// Largest FetchBlocks chunk and FetchCommits response, in bytes.
    pub max_fetch_response_bytes: usize,
    /// FetchCommits and FetchBlocks running at once for one caller (all
    /// anonymous callers share one allowance).
    pub max_concurrent_fetches_per_peer: usize,
    /// FetchCommits and FetchBlocks running at once in total.
    pub max_concurrent_fetches: usize,
    /// Time a response may take to be handed to the transport after its
    /// headers; past it the response is cut and all it holds released.
    pub send_timeout: Duration,
    /// Bytes of answers built but not yet handed to the transport, per
    /// connection; past it new answers wait for earlier ones to be sent.
    pub max_buffered_bytes_per_connection: usize,
    /// Interval of HTTP/2 pings on inbound connections.
    pub http2_keepalive_interval: Duration,
    /// Time for a ping's acknowledgement before the connection is closed.
    pub http2_keepalive_timeout: Duration,
    /// Age after which an inbound connection is asked to close (GOAWAY).
    pub max_connection_age: Duration,
    /// Time after `max_connection_age` before it is closed regardless.
    pub max_connection_age_grace: Duration,
    /// HTTP/2 streams (calls) one connection may have open at once.
    pub max_concurrent_streams: u32,
    /// Requests of one connection being handled at once; more wait.
    pub concurrency_limit_per_connection: usize,
    /// Inbound connections open at once (handshakes included); more are
    /// reset as soon as they are accepted.
    pub max_inbound_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            commit_sync_batch_size: 100,
            max_blocks_per_fetch: 1_000,
            max_fetch_response_bytes: 4 << 20,
            max_concurrent_fetches_per_peer: 4,
            max_concurrent_fetches: 64,
            send_timeout: Duration::from_secs(10),
            max_buffered_bytes_per_connection: 16 << 20,
            http2_keepalive_interval: Duration::from_secs(30),
            http2_keepalive_timeout: Duration::from_secs(10),
            max_connection_age: Duration::from_secs(30 * 60),
            max_connection_age_grace: Duration::from_secs(30),
            max_concurrent_streams: 128,
            concurrency_limit_per_connection: 64,
            max_inbound_connections: soma_wire::inbound::DEFAULT_MAX_CONNECTIONS,
        }
    }
}

/// The adapter's admission logic.
pub struct GrpcAdapterCore {
    limits: Limits,
    /// Admitted fetches by caller.
    fetches: HashMap<Option<PeerId>, usize>,
    /// Caller of each admitted fetch still running.
    running: HashMap<u64, Option<PeerId>>,
}

impl Core for GrpcAdapterCore {
    const NAME: &'static str = "grpc_adapter";
    type Init = Limits;
    type Input = Input;
    type Output = Output;

    fn new(limits: Limits) -> Self {
        GrpcAdapterCore {
            limits,
            fetches: HashMap::new(),
            running: HashMap::new(),
        }
    }

    fn handle(&mut self, _now: Time, input: Input) -> Vec<Output> {
        match input {
            Input::Call { id, caller, call } => vec![match self.admit(id, caller, call) {
                Ok(work) => Output::Admit { id, work },
                Err(refusal) => Output::Refuse { id, refusal },
            }],
            Input::Done { id } => {
                if let Some(caller) = self.running.remove(&id)
                    && let Some(n) = self.fetches.get_mut(&caller)
                {
                    *n -= 1;
                    if *n == 0 {
                        self.fetches.remove(&caller);
                    }
                }
                vec![]
            }
        }
    }
}

fn refuse(code: Code, message: impl Into<String>) -> Refusal {
    Refusal {
        code,
        message: message.into(),
    }
}

impl GrpcAdapterCore {
    fn admit(&mut self, id: u64, caller: Option<PeerId>, call: Call) -> Result<Work, Refusal> {
        match call {
            Call::CommitInfo { index } => Ok(Work::CommitInfo { index }),
            Call::KnownPeers => Ok(Work::KnownPeers),
            Call::PushCommit { index } => match caller {
                Some(peer) => Ok(Work::PushCommit { peer, index }),
                None => Err(refuse(
                    Code::PermissionDenied,
                    "anonymous callers may not push commits",
                )),
            },
            Call::FetchCommits { start, end } => {
                if start == 0 {
                    return Err(refuse(Code::InvalidArgument, "start must be at least 1"));
                }
                if end < start {
                    return Err(refuse(Code::InvalidArgument, "end is before start"));
                }
                self.take_fetch_slot(id, caller)?;
                let last = start.saturating_add(self.limits.commit_sync_batch_size.max(1) - 1);
                Ok(Work::FetchCommits {
                    start,
                    end: end.min(last),
                })
            }
            Call::FetchBlocks { refs } => {
                if refs == 0 {
                    return Err(refuse(Code::InvalidArgument, "no block references"));
                }
                if refs > self.limits.max_blocks_per_fetch {
                    return Err(refuse(
                        Code::InvalidArgument,
                        format!(
                            "{refs} block references exceed the limit of {}",
                            self.limits.max_blocks_per_fetch
                        ),
                    ));
                }
                self.take_fetch_slot(id, caller)?;
                Ok(Work::FetchBlocks)
            }
        }
    }

    fn take_fetch_slot(&mut self, id: u64, caller: Option<PeerId>) -> Result<(), Refusal> {
        if self.running.len() >= self.limits.max_concurrent_fetches {
            return Err(refuse(
                Code::ResourceExhausted,
                "too many fetches in progress",
            ));
        }
        let n = self.fetches.entry(caller).or_default();
        if *n >= self.limits.max_concurrent_fetches_per_peer {
            return Err(refuse(
                Code::ResourceExhausted,
                format!(
                    "at most {} fetches at once per peer",
                    self.limits.max_concurrent_fetches_per_peer
                ),
            ));
        }
        *n += 1;
        self.running.insert(id, caller);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn core() -> GrpcAdapterCore {
        GrpcAdapterCore::new(Limits {
            max_concurrent_fetches_per_peer: 2,
            max_concurrent_fetches: 3,
            ..Limits::default()
        })
    }

    fn call(c: &mut GrpcAdapterCore, id: u64, caller: Option<u8>, call: Call) -> Output {
        c.handle(
            Time(0),
            Input::Call {
                id,
                caller: caller.map(|p| PeerId([p; 32])),
                call,
            },
        )
        .pop()
        .unwrap()
    }

    fn code(o: Output) -> Option<Code> {
        match o {
            Output::Refuse { refusal, .. } => Some(refusal.code),
            Output::Admit { .. } => None,
        }
    }

    #[test]
    fn empty_reversed_and_zero_ranges_are_invalid() {
        let mut c = core();
        let fetch = |start, end| Call::FetchCommits { start, end };
        assert_eq!(
            code(call(&mut c, 1, Some(1), fetch(0, 5))),
            Some(Code::InvalidArgument)
        );
        assert_eq!(
            code(call(&mut c, 2, Some(1), fetch(9, 5))),
            Some(Code::InvalidArgument)
        );
        assert_eq!(
            code(call(&mut c, 3, Some(1), Call::FetchBlocks { refs: 0 })),
            Some(Code::InvalidArgument)
        );
    }

    #[test]
    fn fetch_commits_is_capped_at_the_batch_size() {
        let mut c = core();
        assert_eq!(
            call(
                &mut c,
                1,
                Some(1),
                Call::FetchCommits {
                    start: 101,
                    end: 10_000
                }
            ),
            Output::Admit {
                id: 1,
                work: Work::FetchCommits {
                    start: 101,
                    end: 200
                }
            }
        );
    }

    #[test]
    fn too_many_refs_are_refused() {
        let mut c = core();
        assert_eq!(
            code(call(&mut c, 1, Some(1), Call::FetchBlocks { refs: 1_001 })),
            Some(Code::InvalidArgument)
        );
        assert_eq!(
            code(call(&mut c, 2, Some(1), Call::FetchBlocks { refs: 1_000 })),
            None
        );
    }

    #[test]
    fn anonymous_push_is_denied_and_attributed_push_is_admitted() {
        let mut c = core();
        assert_eq!(
            code(call(&mut c, 1, None, Call::PushCommit { index: 5 })),
            Some(Code::PermissionDenied)
        );
        assert_eq!(
            call(&mut c, 2, Some(7), Call::PushCommit { index: 5 }),
            Output::Admit {
                id: 2,
                work: Work::PushCommit {
                    peer: PeerId([7; 32]),
                    index: 5
                }
            }
        );
    }

    #[test]
    fn fetches_per_peer_and_in_total_are_bounded_and_released() {
        let mut c = core();
        let blocks = Call::FetchBlocks { refs: 1 };
        assert_eq!(code(call(&mut c, 1, Some(1), blocks.clone())), None);
        assert_eq!(code(call(&mut c, 2, Some(1), blocks.clone())), None);
        assert_eq!(
            code(call(&mut c, 3, Some(1), blocks.clone())),
            Some(Code::ResourceExhausted)
        );
        // Another peer has its own allowance, up to the total.
        assert_eq!(code(call(&mut c, 4, Some(2), blocks.clone())), None);
        assert_eq!(
            code(call(&mut c, 5, Some(3), blocks.clone())),
            Some(Code::ResourceExhausted)
        );
        c.handle(Time(0), Input::Done { id: 1 });
        assert_eq!(code(call(&mut c, 6, Some(1), blocks.clone())), None);
        // Reads that are not fetches are never limited this way.
        assert_eq!(
            code(call(&mut c, 7, Some(1), Call::CommitInfo { index: None })),
            None
        );
    }
}
