use std::collections::{BTreeMap, HashMap, HashSet};
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::{
    Actor, ActorFutureExt, Addr, AsyncContext, Context, Handler, Message, ResponseActFuture,
    WrapFuture,
};
use dashmap::DashMap;
use futures::FutureExt;
use soma_store::{ConsensusStore, SyncedBatch};
use soma_types::verify::{ExpectedBlocks, epoch_change};
use soma_types::{
    BlockRef, ChainId, CommitIndex, CommitRef, CommittedSubDag, Committee, Epoch, Limits, PeerId,
    TrustedCommit, VerifiedBlock,
};
use soma_wire::convert::Availability;
use soma_wire::proto;
use tokio::sync::broadcast;

use super::core::{Init, StateSyncCore};
use super::messages::*;
use crate::Blob;
use crate::Driver;
use crate::connections::{ActivePeers, Connections, GetClient, PeerEvent, SubscribePeerEvents};
use crate::peer_heights::{
    HighestKnownCommit, OutcomeKind, PeerHeights, PeersBehind, PeersForRange, ReportOutcome,
    UpdateHeight,
};
use crate::replay::Recorder;
use crate::verifier::{
    InstallCommittee, Verifier, Verify, VerifyError, VerifyRequest, VerifyResponse,
};

/// Failures injected into sync workers, for tests of supervision: the next
/// `times` tasks touching the batch starting at a given commit panic (or
/// fail).
#[derive(Debug, Default)]
pub struct FaultPlan {
    /// Batch start → workers left to panic.
    pub panics: Mutex<HashMap<CommitIndex, u32>>,
    /// Batch start → workers left to fail with an error.
    pub failures: Mutex<HashMap<CommitIndex, u32>>,
}

impl FaultPlan {
    fn take(map: &Mutex<HashMap<CommitIndex, u32>>, batch: CommitIndex) -> bool {
        let mut map = map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match map.get_mut(&batch) {
            Some(n) if *n > 0 => {
                *n -= 1;
                true
            }
            _ => false,
        }
    }
}

/// The shell's settings.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Our chain.
    pub chain_id: ChainId,
    /// How often the core is ticked.
    pub tick: Duration,
    /// How often every connected peer's availability is asked.
    pub height_query_interval: Duration,
    /// Time allowed for one request.
    pub timeout: Duration,
    /// Whether synced block signatures are checked (digests always are).
    pub verify_synced_block_signatures: bool,
    /// The verification limits, which bound what peers may send.
    pub limits: Limits,
    /// Bytes of commits a server puts in one FetchCommits answer (the
    /// network's `max-fetch-response-bytes`); certifier blocks come on top.
    pub commit_budget_bytes: usize,
    /// Injected faults, for tests.
    pub faults: Option<Arc<FaultPlan>>,
}

/// What the node has synced, for the handle, metrics and progress bars.
#[derive(Clone, Debug, Default, PartialEq, Eq, actix::MessageResponse)]
pub struct SyncStatus {
    /// The applied watermark.
    pub synced: CommitIndex,
    /// The highest commit known among peers of our chain.
    pub highest_known: CommitIndex,
    /// Commits applied since start (synced and local).
    pub commits_applied: u64,
    /// Blocks applied since start.
    pub blocks_applied: u64,
    /// Bytes of verified blocks fetched.
    pub bytes_fetched: u64,
    /// Workers restarted after a failure or panic.
    pub restarts: u64,
    /// Requests refused because a peer sent invalid data.
    pub invalid_responses: u64,
    /// Chunks of blocks split in halves because their blocks were more
    /// bytes than one fetch may bring (each also counts as a restart).
    pub chunks_split: u64,
}

/// Asks for [`SyncStatus`].
#[derive(Message)]
#[rtype(result = "SyncStatus")]
pub struct GetSyncStatus;

/// A commit of local consensus: stored, broadcast and pushed like a synced one.
#[derive(Message)]
#[rtype(result = "Result<(), soma_store::Error>")]
pub struct ApplyLocal(pub SyncedBatch);

/// Data of a verified commit batch.
struct BatchData {
    commits: Vec<TrustedCommit>,
    certifiers: Vec<VerifiedBlock>,
    refs: Vec<BlockRef>,
    epoch: Epoch,
    end: CommitIndex,
    blocks: HashMap<BlockRef, VerifiedBlock>,
}

impl BatchData {
    /// Bytes of the commits and certifier blocks.
    fn commit_bytes(&self) -> u64 {
        let commits = self.commits.iter().map(|c| c.serialized().len() as u64);
        let certifiers = self.certifiers.iter().map(|b| b.serialized().len() as u64);
        commits.chain(certifiers).sum()
    }
}

#[derive(Message)]
#[rtype(result = "()")]
struct TickMsg(Option<CommitIndex>);

#[derive(Message)]
#[rtype(result = "()")]
struct CommitsDone {
    task: TaskId,
    peer: Option<PeerId>,
    result: Result<BatchData, Failure>,
}

#[derive(Message)]
#[rtype(result = "()")]
struct BlocksDone {
    task: TaskId,
    batch: CommitIndex,
    peer: Option<PeerId>,
    result: Result<Vec<VerifiedBlock>, Failure>,
}

#[derive(Message)]
#[rtype(result = "()")]
struct ApplyDone {
    start: CommitIndex,
    result: Result<Applied, String>,
}

struct Applied {
    last: CommitRef,
    next_committee: Option<Committee>,
    subdags: Vec<CommittedSubDag>,
}

/// The StateSync actor: a thin shell around [`StateSyncCore`].
pub struct StateSync {
    driver: Driver<StateSyncCore>,
    settings: Settings,
    store: Arc<dyn ConsensusStore>,
    verifier: Addr<Verifier>,
    heights: Addr<PeerHeights>,
    connections: Addr<Connections>,
    runtime: tokio::runtime::Handle,
    commits: broadcast::Sender<CommittedSubDag>,
    buffers: BTreeMap<CommitIndex, BatchData>,
    status: SyncStatus,
    /// The node's availability, published for the gRPC service to read
    /// without asking an actor.
    availability: tokio::sync::watch::Sender<Availability>,
    mailbox_capacity: usize,
    /// Fetches in flight per peer, shared by the workers.
    in_flight: InFlight,
    /// The core's settings, for the workers' byte caps.
    config: super::core::Config,
    max_fetches_per_peer: usize,
}

impl StateSync {
    /// A StateSync actor resuming from the store's watermark.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        init: Init,
        settings: Settings,
        store: Arc<dyn ConsensusStore>,
        verifier: Addr<Verifier>,
        heights: Addr<PeerHeights>,
        connections: Addr<Connections>,
        runtime: tokio::runtime::Handle,
        commits: broadcast::Sender<CommittedSubDag>,
        availability: tokio::sync::watch::Sender<Availability>,
        mailbox_capacity: usize,
        recorder: Option<Recorder>,
    ) -> Self {
        let status = SyncStatus {
            synced: init.synced.index,
            highest_known: init.synced.index,
            ..SyncStatus::default()
        };
        let max_fetches_per_peer = init.config.max_fetches_per_peer.max(1);
        let config = init.config.clone();
        StateSync {
            driver: Driver::new(init, recorder),
            settings,
            store,
            verifier,
            heights,
            connections,
            runtime,
            commits,
            buffers: BTreeMap::new(),
            status,
            availability,
            mailbox_capacity,
            in_flight: InFlight::default(),
            config,
            max_fetches_per_peer,
        }
    }

    fn step(&mut self, input: Input, ctx: &mut Context<Self>) {
        for output in self.driver.step(input) {
            match output {
                Output::FetchCommits {
                    task,
                    wanted,
                    avoid,
                } => self.fetch_commits(task, wanted, avoid, ctx),
                Output::FetchBlocks {
                    task,
                    batch,
                    offset,
                    len,
                    max_bytes,
                    avoid,
                } => self.fetch_blocks(task, batch, (offset, len, max_bytes), avoid, ctx),
                Output::Apply { start } => self.apply(start, ctx),
                Output::Restarted { task, failure } => {
                    self.status.restarts += 1;
                    match failure {
                        Failure::Invalid(_) => self.status.invalid_responses += 1,
                        Failure::OverBudget => self.status.chunks_split += 1,
                        _ => {}
                    }
                    tracing::debug!(task, ?failure, "sync worker restarted");
                }
                Output::Misbehaved { peer } => {
                    tracing::warn!(%peer, "peer claimed an epoch change that did not happen");
                    self.status.invalid_responses += 1;
                    self.heights.do_send(ReportOutcome {
                        peer,
                        bytes: 0,
                        latency_ms: 0,
                        kind: OutcomeKind::InvalidData,
                    });
                }
                Output::Reset => self.buffers.clear(),
                Output::Discard { start } => {
                    self.buffers.remove(&start);
                }
            }
        }
        let core = self.driver.core();
        self.status.synced = core.synced().index;
        self.status.highest_known = core.highest_known();
        let synced = self.status.synced;
        self.availability.send_if_modified(|a| {
            let changed = a.highest != synced;
            a.highest = synced;
            changed
        });
    }

    /// Runs a sync worker on the tonic runtime under the supervisor's
    /// watch: a panic becomes [`Failure::Panicked`] for the core to restart.
    fn supervise<T: Send + 'static>(
        &self,
        work: impl std::future::Future<Output = (Option<PeerId>, Result<T, Failure>)> + Send + 'static,
        done: impl FnOnce(Option<PeerId>, Result<T, Failure>) + Send + 'static,
    ) {
        self.runtime.spawn(async move {
            let (peer, result) = AssertUnwindSafe(work)
                .catch_unwind()
                .await
                .unwrap_or((None, Err(Failure::Panicked)));
            done(peer, result);
        });
    }

    fn fetch_commits(
        &mut self,
        task: TaskId,
        wanted: CommitsWanted,
        avoid: Vec<PeerId>,
        ctx: &mut Context<Self>,
    ) {
        let worker = Worker::new(self, avoid);
        let faults = self.settings.faults.clone();
        let addr = ctx.address();
        self.supervise(
            async move {
                inject(&faults, wanted.start)?;
                worker.fetch_commits(wanted).await
            }
            .map(|r| match r {
                Ok(x) => x,
                Err(f) => (None, Err(f)),
            }),
            move |peer, result| addr.do_send(CommitsDone { task, peer, result }),
        );
    }

    fn fetch_blocks(
        &mut self,
        task: TaskId,
        batch: CommitIndex,
        (offset, len, max_bytes): (usize, usize, u64),
        avoid: Vec<PeerId>,
        ctx: &mut Context<Self>,
    ) {
        let addr = ctx.address();
        let Some(data) = self.buffers.get(&batch) else {
            addr.do_send(BlocksDone {
                task,
                batch,
                peer: None,
                result: Err(Failure::Local(LocalFailure::BatchGone)),
            });
            return;
        };
        let refs: Vec<BlockRef> = data.refs.iter().skip(offset).take(len).copied().collect();
        let (epoch, end) = (data.epoch, data.end);
        let worker = Worker::new(self, avoid);
        let faults = self.settings.faults.clone();
        self.supervise(
            async move {
                inject(&faults, batch)?;
                worker
                    .fetch_blocks(batch, end, epoch, refs, max_bytes)
                    .await
            }
            .map(|r| match r {
                Ok(x) => x,
                Err(f) => (None, Err(f)),
            }),
            move |peer, result| {
                addr.do_send(BlocksDone {
                    task,
                    batch,
                    peer,
                    result,
                })
            },
        );
    }

    fn apply(&mut self, start: CommitIndex, ctx: &mut Context<Self>) {
        let addr = ctx.address();
        let Some(data) = self.buffers.remove(&start) else {
            addr.do_send(ApplyDone {
                start,
                result: Err("batch data missing".into()),
            });
            return;
        };
        let store = self.store.clone();
        self.runtime.spawn_blocking(move || {
            let result = write_batch(store.as_ref(), data);
            addr.do_send(ApplyDone { start, result });
        });
    }

    fn query_heights(&self, peers: Vec<PeerId>) {
        for peer in peers {
            let (connections, heights) = (self.connections.clone(), self.heights.clone());
            let timeout = self.settings.timeout;
            self.runtime.spawn(async move {
                let Ok(Some(mut client)) = connections.send(GetClient(peer)).await else {
                    return;
                };
                let mut request = tonic::Request::new(proto::GetCommitAvailabilityRequest {});
                request.set_timeout(timeout);
                let Ok(Ok(response)) =
                    tokio::time::timeout(timeout, client.get_commit_availability(request)).await
                else {
                    return;
                };
                if let Ok(a) = Availability::try_from(response.get_ref()) {
                    heights.do_send(UpdateHeight {
                        peer,
                        chain_id: a.chain_id,
                        highest: a.highest,
                        lowest: a.lowest,
                    });
                }
            });
        }
    }

    /// What the core needs to know of the epoch `committee` starts.
    fn epoch_start(&self, committee: &Committee) -> EpochStart {
        EpochStart {
            epoch: committee.epoch(),
            commit_answer_bytes: commit_answer_bytes(
                &self.settings.limits,
                self.settings.commit_budget_bytes,
                committee,
            ),
        }
    }

    fn push_to_peers_behind(&self, last: CommitRef) {
        let (connections, heights) = (self.connections.clone(), self.heights.clone());
        let timeout = self.settings.timeout;
        self.runtime.spawn(async move {
            let Ok(peers) = heights.send(PeersBehind { index: last.index }).await else {
                return;
            };
            for peer in peers {
                if let Ok(Some(mut client)) = connections.send(GetClient(peer)).await {
                    let mut request =
                        tonic::Request::new(proto::PushCommitRequest { index: last.index });
                    request.set_timeout(timeout);
                    let _ = client.push_commit(request).await;
                }
            }
        });
    }

    fn publish(&mut self, subdags: Vec<CommittedSubDag>) {
        for subdag in subdags {
            self.status.commits_applied += 1;
            self.status.blocks_applied += subdag.blocks.len() as u64;
            // No receiver is not an error; a lagging one is told by the channel.
            let _ = self.commits.send(subdag);
        }
    }
}

fn inject(faults: &Option<Arc<FaultPlan>>, batch: CommitIndex) -> Result<(), Failure> {
    if let Some(f) = faults {
        if FaultPlan::take(&f.panics, batch) {
            panic!("injected panic in a sync worker for batch {batch}");
        }
        if FaultPlan::take(&f.failures, batch) {
            return Err(Failure::Status {
                code: tonic::Code::Unavailable as i32,
            });
        }
    }
    Ok(())
}

/// Writes a complete batch: checks the epoch change, then one atomic write.
/// Commits at or below the store's watermark (applied meanwhile from local
/// consensus) are skipped; the rest must link to it.
fn write_batch(store: &dyn ConsensusStore, mut data: BatchData) -> Result<Applied, String> {
    let watermark = store.highest_synced_commit().map_err(|e| e.to_string())?;
    data.commits.retain(|c| c.index() > watermark.index);
    if data.commits.is_empty() {
        // Local commits covered the whole batch while it was on its way.
        return Ok(Applied {
            last: watermark,
            next_committee: None,
            subdags: Vec::new(),
        });
    }
    let committee = store
        .committee(data.epoch)
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("no committee for epoch {}", data.epoch))?;
    let next_committee =
        epoch_change(&data.commits, &data.blocks, &committee).map_err(|e| e.to_string())?;
    let subdags = data
        .commits
        .iter()
        .map(|c| CommittedSubDag::new(c, |r| data.blocks.get(r).cloned()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    let last = data
        .commits
        .last()
        .map(TrustedCommit::reference)
        .ok_or("empty batch")?;
    let blocks = subdags
        .iter()
        .flat_map(|s| s.blocks.iter().cloned())
        .collect();
    store
        .write_synced_batch(SyncedBatch {
            commits: data.commits,
            blocks,
            certificate: data.certifiers,
            next_committee: next_committee.clone(),
        })
        .map_err(|e| e.to_string())?;
    Ok(Applied {
        last,
        next_committee,
        subdags,
    })
}

/// Fetches in flight per peer, shared by a node's sync workers, so that no
/// peer is asked for more at once than it serves.
#[derive(Clone, Default)]
struct InFlight {
    counts: Arc<DashMap<PeerId, usize>>,
    freed: Arc<tokio::sync::Notify>,
}

impl InFlight {
    /// A slot for one more fetch from `peer`, if it has fewer than `max`.
    fn take(&self, peer: PeerId, max: usize) -> Option<Slot> {
        let mut count = self.counts.entry(peer).or_insert(0);
        if *count >= max {
            return None;
        }
        *count += 1;
        Some(Slot {
            peer,
            in_flight: self.clone(),
        })
    }
}

/// One fetch in flight from a peer; freed when dropped.
struct Slot {
    peer: PeerId,
    in_flight: InFlight,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.in_flight.counts.remove_if_mut(&self.peer, |_, count| {
            *count = count.saturating_sub(1);
            *count == 0
        });
        self.in_flight.freed.notify_waiters();
    }
}

/// What a sync worker needs: the actors it talks to and its settings.
struct Worker {
    heights: Addr<PeerHeights>,
    connections: Addr<Connections>,
    verifier: Addr<Verifier>,
    timeout: Duration,
    check_signatures: bool,
    config: super::core::Config,
    avoid: HashSet<PeerId>,
    in_flight: InFlight,
    max_fetches_per_peer: usize,
}

type Client = proto::p2p_client::P2pClient<tonic::transport::Channel>;

impl Worker {
    fn new(sync: &StateSync, avoid: Vec<PeerId>) -> Self {
        Worker {
            heights: sync.heights.clone(),
            connections: sync.connections.clone(),
            verifier: sync.verifier.clone(),
            timeout: sync.settings.timeout,
            check_signatures: sync.settings.verify_synced_block_signatures,
            config: sync.config.clone(),
            avoid: avoid.into_iter().collect(),
            in_flight: sync.in_flight.clone(),
            max_fetches_per_peer: sync.max_fetches_per_peer,
        }
    }

    /// The best connected peer covering `start..=end`, not avoided, with a
    /// free fetch slot. When every such peer has `max_fetches_per_peer`
    /// fetches out, waits for one to finish (at most the request timeout)
    /// rather than sending a request the peer would refuse.
    async fn client(
        &self,
        start: CommitIndex,
        end: CommitIndex,
    ) -> Result<(PeerId, Client, Slot), Failure> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        loop {
            // Registered before looking, so a slot freed meanwhile wakes us.
            let freed = self.in_flight.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            let peers = self
                .heights
                .send(PeersForRange { start, end })
                .await
                .map_err(|_| Failure::Local(LocalFailure::ActorUnavailable))?;
            let mut busy = false;
            for peer in peers.into_iter().filter(|p| !self.avoid.contains(p)) {
                let Some(slot) = self.in_flight.take(peer, self.max_fetches_per_peer) else {
                    busy = true;
                    continue;
                };
                if let Ok(Some(client)) = self.connections.send(GetClient(peer)).await {
                    return Ok((peer, client, slot));
                }
            }
            if !busy {
                return Err(Failure::NoPeer);
            }
            if tokio::time::timeout_at(deadline, freed).await.is_err() {
                return Err(Failure::Timeout);
            }
        }
    }

    /// Tells PeerHeights how a request went. Only what the peer did counts:
    /// our own failures (a busy Verifier, say) are never held against it.
    /// `range` is the range the peer was chosen for: a NOT_FOUND inside
    /// what it claims to hold is a lie about its height.
    fn report(
        &self,
        peer: PeerId,
        started: Instant,
        bytes: u64,
        (start, end): (CommitIndex, CommitIndex),
        result: &Result<impl Sized, Failure>,
    ) {
        let kind = match result {
            Ok(_) => OutcomeKind::Success,
            Err(Failure::Timeout) => OutcomeKind::Timeout,
            Err(Failure::Invalid(_)) => OutcomeKind::InvalidData,
            Err(Failure::NotFound) => OutcomeKind::NotFound { start, end },
            Err(Failure::Status { .. }) => OutcomeKind::Error,
            Err(_) => return,
        };
        self.heights.do_send(ReportOutcome {
            peer,
            bytes,
            latency_ms: started.elapsed().as_millis() as u64,
            kind,
        });
    }

    async fn fetch_commits(
        self,
        wanted: CommitsWanted,
    ) -> Result<(Option<PeerId>, Result<BatchData, Failure>), Failure> {
        let (peer, client, slot) = self.client(wanted.start, wanted.start).await?;
        // The answer may be as large as the core reserved for it, no larger.
        let mut client = client.max_decoding_message_size(to_usize(wanted.max_bytes));
        let started = Instant::now();
        let mut request = tonic::Request::new(proto::FetchCommitsRequest {
            start: wanted.start,
            end: wanted.end,
        });
        request.set_timeout(self.timeout);
        let response = match tokio::time::timeout(self.timeout, client.fetch_commits(request)).await
        {
            Err(_) => Err(Failure::Timeout),
            Ok(Err(status)) => Err(status_failure(&status)),
            Ok(Ok(r)) => Ok(r.into_inner()),
        };
        // The peer's part is done; verifying does not hold its slot.
        drop(slot);
        let result = match response {
            Ok(r) => self.verify_commits(r, wanted).await,
            Err(f) => Err(f),
        };
        let bytes = result.as_ref().map_or(0, BatchData::commit_bytes);
        // The peer was chosen for `start` alone: an honest one serves it.
        self.report(peer, started, bytes, (wanted.start, wanted.start), &result);
        Ok((Some(peer), result))
    }

    /// Verifies a commit answer against the expected epoch's committee,
    /// and no other: the epoch the commits claim is checked, never trusted.
    async fn verify_commits(
        &self,
        response: proto::FetchCommitsResponse,
        wanted: CommitsWanted,
    ) -> Result<BatchData, Failure> {
        let request = VerifyRequest::CommitBatch {
            epoch: wanted.epoch,
            commits: response.commits.into_iter().map(Blob).collect(),
            certifiers: response.certifier_blocks.into_iter().map(Blob).collect(),
            last_synced: wanted.after,
        };
        match self.verifier.send(Verify(request)).await {
            Ok(Ok(VerifyResponse::CommitBatch {
                commits,
                certifiers,
            })) => {
                let refs: Vec<BlockRef> = commits
                    .iter()
                    .flat_map(|c| c.commit().blocks.iter().copied())
                    .collect();
                let end = commits.last().map_or(0, TrustedCommit::index);
                Ok(BatchData {
                    commits,
                    certifiers,
                    refs,
                    epoch: wanted.epoch,
                    end,
                    blocks: HashMap::new(),
                })
            }
            // The first commit is of the next epoch while a batch that may
            // end ours is not applied yet: an honest peer answers so right
            // after an epoch change. Judged once our own data tells.
            Ok(Err(VerifyError::Invalid(soma_types::Error::CommitWrongEpoch {
                index,
                got,
                expected,
            }))) if !wanted.settled
                && index == wanted.start
                && Some(got) == expected.checked_add(1) =>
            {
                Err(Failure::NextEpoch { claimed: got })
            }
            Ok(Err(e)) => Err(verify_failure(e)),
            Ok(Ok(_)) => Err(Failure::Local(LocalFailure::VerifierUnavailable)),
            Err(_) => Err(Failure::Local(LocalFailure::VerifierUnavailable)),
        }
    }

    async fn fetch_blocks(
        self,
        batch: CommitIndex,
        end: CommitIndex,
        epoch: Epoch,
        refs: Vec<BlockRef>,
        max_bytes: u64,
    ) -> Result<(Option<PeerId>, Result<Vec<VerifiedBlock>, Failure>), Failure> {
        let (peer, client, slot) = self.client(batch, end).await?;
        let message_bytes = self.config.block_message_bytes(max_bytes);
        let mut client = client.max_decoding_message_size(to_usize(message_bytes));
        let started = Instant::now();
        let fetched = tokio::time::timeout(
            self.timeout,
            self.receive_blocks(&mut client, &refs, max_bytes),
        )
        .await
        .unwrap_or(Err(Failure::Timeout));
        drop(slot);
        let result = match fetched {
            Ok(blobs) => self.verify_blocks(epoch, blobs, &refs).await,
            Err(f) => Err(f),
        };
        let bytes = result.as_ref().map_or(0, |blocks| {
            blocks.iter().map(|b| b.serialized().len() as u64).sum()
        });
        self.report(peer, started, bytes, (batch, end), &result);
        Ok((Some(peer), result))
    }

    /// Reads a FetchBlocks stream, judging each block by the digest of its
    /// bytes as it arrives: the stream is cut at the first block not asked
    /// for or repeated, and once the blocks pass `max_bytes`. Nothing is
    /// decoded or signature-checked before every block asked for is in.
    async fn receive_blocks(
        &self,
        client: &mut Client,
        refs: &[BlockRef],
        max_bytes: u64,
    ) -> Result<Vec<Blob>, Failure> {
        let mut request = tonic::Request::new(proto::FetchBlocksRequest {
            refs: refs.iter().copied().map(Into::into).collect(),
        });
        request.set_timeout(self.timeout);
        let mut stream = client
            .fetch_blocks(request)
            .await
            .map_err(|s| status_failure(&s))?
            .into_inner();
        let mut expected = ExpectedBlocks::from_refs(refs.iter().copied());
        let mut blobs = Vec::with_capacity(refs.len());
        let mut bytes = 0u64;
        while let Some(chunk) = stream.message().await.map_err(|s| status_failure(&s))? {
            for blob in chunk.blocks {
                bytes += blob.len() as u64;
                if bytes > max_bytes {
                    // One block never exceeds the cap of a one-block fetch:
                    // such a block is not the one the digest names.
                    return Err(if refs.len() == 1 {
                        Failure::Invalid(soma_types::Error::TooLarge {
                            len: to_usize(bytes),
                            limit: to_usize(max_bytes),
                        })
                    } else {
                        Failure::OverBudget
                    });
                }
                expected.accept_bytes(&blob).map_err(Failure::Invalid)?;
                blobs.push(Blob(blob));
            }
        }
        expected.finish().map_err(Failure::Invalid)?;
        Ok(blobs)
    }

    async fn verify_blocks(
        &self,
        epoch: Epoch,
        blobs: Vec<Blob>,
        refs: &[BlockRef],
    ) -> Result<Vec<VerifiedBlock>, Failure> {
        let request = VerifyRequest::Blocks {
            epoch,
            blocks: blobs,
            check_signatures: self.check_signatures,
        };
        let blocks = match self.verifier.send(Verify(request)).await {
            Ok(Ok(VerifyResponse::Blocks(blocks))) => blocks,
            Ok(Err(e)) => return Err(verify_failure(e)),
            Ok(Ok(_)) | Err(_) => return Err(Failure::Local(LocalFailure::VerifierUnavailable)),
        };
        // The digests matched; the whole references must too (the epoch,
        // round and author a commit names are those of the block).
        let wanted: HashSet<BlockRef> = refs.iter().copied().collect();
        if let Some(block) = blocks.iter().find(|b| !wanted.contains(&b.reference())) {
            return Err(Failure::Invalid(soma_types::Error::UnexpectedBlock(
                block.reference(),
            )));
        }
        Ok(blocks)
    }
}

/// A peer's error status as a failure: NOT_FOUND says the peer lacks the
/// range; anything else (a refusal, a transport failure) is an error.
fn status_failure(status: &tonic::Status) -> Failure {
    match status.code() {
        tonic::Code::NotFound => Failure::NotFound,
        code => Failure::Status { code: code as i32 },
    }
}

/// A Verifier refusal as a failure: only a broken rule is the peer's doing.
fn verify_failure(error: VerifyError) -> Failure {
    match error {
        VerifyError::Invalid(e) => Failure::Invalid(e),
        VerifyError::UnknownEpoch(e) => Failure::Local(LocalFailure::UnknownEpoch(e)),
        VerifyError::Busy { .. } => Failure::Local(LocalFailure::VerifierBusy),
        VerifyError::Stopped | VerifyError::Internal => {
            Failure::Local(LocalFailure::VerifierUnavailable)
        }
    }
}

/// The largest FetchCommits answer of `committee`'s epoch: the limits'
/// bound for a certificate of at most [`max_certifiers`] blocks.
pub fn commit_answer_bytes(
    limits: &Limits,
    commit_budget_bytes: usize,
    committee: &Committee,
) -> u64 {
    let bytes =
        limits.max_fetch_commits_response_bytes(commit_budget_bytes, max_certifiers(committee));
    u64::try_from(bytes).unwrap_or(u64::MAX)
}

fn to_usize(bytes: u64) -> usize {
    usize::try_from(bytes).unwrap_or(usize::MAX)
}

/// Most blocks a certificate of `committee` needs: a quorum of the members
/// with the smallest stakes. A server sends a minimal quorum, so no honest
/// certificate is larger.
fn max_certifiers(committee: &Committee) -> usize {
    let mut stakes: Vec<u64> = committee.authorities().map(|(_, a)| a.stake).collect();
    stakes.sort_unstable();
    let mut total = 0u64;
    for (i, stake) in stakes.iter().enumerate() {
        total = total.saturating_add(*stake);
        if committee.is_quorum(total) {
            return i + 1;
        }
    }
    stakes.len()
}

impl Actor for StateSync {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(self.mailbox_capacity);
        self.connections
            .do_send(SubscribePeerEvents(ctx.address().recipient()));
        ctx.run_interval(self.settings.tick, |act, ctx| {
            let heights = act.heights.clone();
            ctx.spawn(
                async move { heights.send(HighestKnownCommit).await.ok().flatten() }
                    .into_actor(act)
                    .map(|highest, _, ctx| ctx.notify(TickMsg(highest))),
            );
        });
        ctx.run_interval(self.settings.height_query_interval, |act, ctx| {
            let connections = act.connections.clone();
            ctx.spawn(
                async move { connections.send(ActivePeers).await.unwrap_or_default() }
                    .into_actor(act)
                    .map(|peers, act, _| act.query_heights(peers)),
            );
        });
    }
}

impl Handler<TickMsg> for StateSync {
    type Result = ();
    fn handle(&mut self, msg: TickMsg, ctx: &mut Context<Self>) {
        self.step(
            Input::Tick {
                highest_known: msg.0,
            },
            ctx,
        );
    }
}

impl Handler<PeerEvent> for StateSync {
    type Result = ();
    fn handle(&mut self, event: PeerEvent, _: &mut Context<Self>) {
        // A new peer's height is asked at once, not at the next interval.
        if let PeerEvent::Connected { peer, .. } = event {
            self.query_heights(vec![peer]);
        }
    }
}

impl Handler<CommitsDone> for StateSync {
    type Result = ();
    fn handle(&mut self, msg: CommitsDone, ctx: &mut Context<Self>) {
        let result = msg.result.map(|data| {
            let info = CommitBatchInfo {
                start: data.commits.first().map_or(0, TrustedCommit::index),
                end: data.end,
                last: data
                    .commits
                    .last()
                    .map(TrustedCommit::reference)
                    .unwrap_or_default(),
                epoch: data.epoch,
                block_count: data.refs.len(),
                bytes: data.commit_bytes(),
            };
            self.buffers.insert(info.start, data);
            info
        });
        self.step(
            Input::CommitsFetched {
                task: msg.task,
                peer: msg.peer,
                result,
            },
            ctx,
        );
    }
}

impl Handler<BlocksDone> for StateSync {
    type Result = ();
    fn handle(&mut self, msg: BlocksDone, ctx: &mut Context<Self>) {
        let result = msg.result.map(|blocks| {
            let mut bytes = 0;
            if let Some(data) = self.buffers.get_mut(&msg.batch) {
                for b in blocks {
                    bytes += b.serialized().len() as u64;
                    data.blocks.insert(b.reference(), b);
                }
            }
            self.status.bytes_fetched += bytes;
            bytes
        });
        self.step(
            Input::BlocksFetched {
                task: msg.task,
                peer: msg.peer,
                result,
            },
            ctx,
        );
    }
}

impl Handler<ApplyDone> for StateSync {
    type Result = ();
    fn handle(&mut self, msg: ApplyDone, ctx: &mut Context<Self>) {
        match msg.result {
            Ok(applied) => {
                let next_epoch = applied.next_committee.as_ref().map(|c| self.epoch_start(c));
                // The next epoch's committee is installed before anything of
                // that epoch is verified: the Verifier's mailbox is FIFO, and
                // the next commit fetch starts after this step.
                if let Some(next) = applied.next_committee {
                    tracing::info!(epoch = next.epoch(), "epoch changed");
                    self.verifier.do_send(InstallCommittee(next));
                }
                let last = applied.last;
                self.publish(applied.subdags);
                self.step(
                    Input::Applied {
                        start: msg.start,
                        last,
                        next_epoch,
                    },
                    ctx,
                );
                self.push_to_peers_behind(last);
            }
            Err(reason) => self.step(
                Input::ApplyFailed {
                    start: msg.start,
                    reason,
                },
                ctx,
            ),
        }
    }
}

impl Handler<GetSyncStatus> for StateSync {
    type Result = SyncStatus;
    fn handle(&mut self, _: GetSyncStatus, _: &mut Context<Self>) -> SyncStatus {
        self.status.clone()
    }
}

impl Handler<ApplyLocal> for StateSync {
    type Result = ResponseActFuture<Self, Result<(), soma_store::Error>>;

    fn handle(&mut self, msg: ApplyLocal, _: &mut Context<Self>) -> Self::Result {
        let store = self.store.clone();
        let batch = msg.0;
        let write = self.runtime.spawn_blocking(move || {
            let blocks: HashMap<BlockRef, VerifiedBlock> = batch
                .blocks
                .iter()
                .map(|b| (b.reference(), b.clone()))
                .collect();
            let subdags = batch
                .commits
                .iter()
                .map(|c| CommittedSubDag::new(c, |r| blocks.get(r).cloned()))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|_| {
                    let first = batch
                        .commits
                        .iter()
                        .flat_map(|c| c.commit().blocks.iter())
                        .find(|r| !blocks.contains_key(r))
                        .copied()
                        .unwrap_or_default();
                    soma_store::Error::MissingBlock(first)
                })?;
            let last = batch.commits.last().map(TrustedCommit::reference);
            let next_committee = batch.next_committee.clone();
            store.write_synced_batch(batch)?;
            Ok((subdags, last, next_committee))
        });
        Box::pin(
            async move {
                write
                    .await
                    .map_err(|_| soma_store::Error::Database("the write was cancelled".into()))?
            }
            .into_actor(self)
            .map(|result, act, ctx| {
                let (subdags, last, next_committee) = result?;
                let next_epoch = next_committee.as_ref().map(|c| act.epoch_start(c));
                if let Some(next) = next_committee {
                    act.verifier.do_send(InstallCommittee(next));
                }
                act.publish(subdags);
                if let Some(last) = last {
                    act.step(Input::LocalApplied { last, next_epoch }, ctx);
                    act.push_to_peers_behind(last);
                }
                Ok(())
            }),
        )
    }
}
