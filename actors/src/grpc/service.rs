use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use actix::{Addr, MailboxError};
use prost::Message;
use soma_store::ConsensusStore;
use soma_types::{BlockRef, CommitRef, SignedNodeInfo, codec};
use soma_wire::convert::{Availability, ConvertError};
use soma_wire::proto::{self, p2p_server::P2p};
use soma_wire::tls::{caller, origin, remote_addr};
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::actor::GrpcAdapter;
use super::answers::AnswerCache;
use super::budget::{ByteBudget, Connection, Reservation};
use super::core::Limits;
use super::core::fetch_work;
use super::deadline::{FetchSlot, Held, SendGuard, SendStats};
use super::kept::SlotKey;
use super::messages::{Admission, Call, CallMsg, Work};
use super::serve;
use crate::discovery::{Discovery, ExchangeInfo};

/// Whether a call's answer is still wanted: cleared when the call's
/// future is dropped (the caller reset the call) or ends.
struct Wanted(Arc<AtomicBool>);

impl Wanted {
    fn new() -> Self {
        Wanted(Arc::new(AtomicBool::new(true)))
    }

    /// The flag a read checks.
    fn flag(&self) -> Arc<AtomicBool> {
        self.0.clone()
    }
}

impl Drop for Wanted {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Relaxed);
    }
}

/// Chunks of a FetchBlocks stream buffered ahead of the client.
const STREAM_BUFFER: usize = 2;

type BlockStream = Counted<ReceiverStream<Result<proto::FetchBlocksResponse, Status>>>;

/// A response stream counted in [`RpcCounts`] by how it ends, as its caller
/// sees it: OK at its end, the code of the error it ends with, CANCELLED if
/// dropped before either (the caller went away, or the server cut the
/// answer). Counted before the end reaches the transport, so a caller that
/// has read the whole stream finds it counted.
pub struct Counted<S> {
    inner: S,
    method: &'static str,
    counts: RpcCounts,
    ended: bool,
}

impl<S> Counted<S> {
    fn new(inner: S, method: &'static str, counts: RpcCounts) -> Self {
        Counted {
            inner,
            method,
            counts,
            ended: false,
        }
    }

    fn end(&mut self, code: tonic::Code) {
        if !std::mem::replace(&mut self.ended, true) {
            *self.counts.entry((self.method, code)).or_default() += 1;
        }
    }
}

impl<S, T> Stream for Counted<S>
where
    S: Stream<Item = Result<T, Status>> + Unpin,
{
    type Item = Result<T, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let item = std::task::ready!(Pin::new(&mut self.inner).poll_next(cx));
        match &item {
            Some(Ok(_)) => {}
            Some(Err(status)) => self.end(status.code()),
            None => self.end(tonic::Code::Ok),
        }
        Poll::Ready(item)
    }
}

impl<S> Drop for Counted<S> {
    fn drop(&mut self) {
        self.end(tonic::Code::Cancelled);
    }
}

/// Calls answered, by method and status code; shared with the handle for
/// metrics.
pub type RpcCounts = Arc<dashmap::DashMap<(&'static str, tonic::Code), u64>>;

/// The tonic service of the P2p protocol. Every call goes through the
/// [`GrpcAdapter`] first; admitted reads run on the blocking pool.
#[derive(Clone)]
pub struct P2pService {
    deps: Arc<ServiceDeps>,
    budget: Arc<ByteBudget>,
    answers: Arc<AnswerCache>,
}

/// What a [`P2pService`] is made from.
pub struct ServiceDeps {
    /// Admits every call but GetCommitAvailability.
    pub adapter: Addr<GrpcAdapter>,
    /// Answers GetKnownPeers.
    pub discovery: Addr<Discovery>,
    /// Where admitted reads read from.
    pub store: Arc<dyn ConsensusStore>,
    /// The genesis commit (commit 0 is never stored).
    pub genesis: CommitRef,
    /// What the server accepts.
    pub limits: Limits,
    /// The sizes peers accept: answers are kept within them.
    pub data_limits: soma_types::Limits,
    /// Time allowed for the actors to answer.
    pub timeout: Duration,
    /// Calls answered, by method and code.
    pub counts: RpcCounts,
    /// The availability StateSync publishes.
    pub availability: tokio::sync::watch::Receiver<Availability>,
    /// Fetches, counted while their slot is held.
    pub stats: Arc<SendStats>,
}

impl P2pService {
    /// A service answering for the node `deps` describe.
    pub fn new(deps: ServiceDeps) -> Self {
        P2pService {
            budget: ByteBudget::new(deps.limits.max_buffered_bytes_per_connection),
            answers: Arc::new(AnswerCache::new(deps.limits.answer_cache_bytes)),
            deps: Arc::new(deps),
        }
    }

    fn count<T>(&self, method: &'static str, result: Result<T, Status>) -> Result<T, Status> {
        let code = result
            .as_ref()
            .map_or_else(Status::code, |_| tonic::Code::Ok);
        *self.deps.counts.entry((method, code)).or_default() += 1;
        result
    }

    async fn admit<T>(&self, request: &Request<T>, call: Call) -> Result<Admission, Status> {
        let caller = caller(request).peer_id();
        let connection = remote_addr(request);
        self.deps
            .adapter
            .send(CallMsg {
                caller,
                connection,
                origin: origin(request),
                call,
            })
            .timeout(self.deps.timeout)
            .await
            .map_err(mailbox_status)?
            .map_err(Status::from)
    }

    /// Admission for a fetch: the request checked here, as the adapter
    /// would, then on the slot its connection kept from its fetch before
    /// if there is one, else from the adapter. A request the adapter would
    /// refuse as invalid never reaches it: invalid ones sent by anyone at
    /// any rate would cost the actor's thread a message each (and, when
    /// every fetch took back the slots connections kept, honest
    /// connections those slots). Fetches are rated only by those dropped
    /// unread, which the adapter checks; a fetch dropped unread gives its
    /// slot back unkept, so such a caller's next fetch asks the adapter.
    async fn admit_fetch<T>(&self, request: &Request<T>, call: Call) -> Result<Admission, Status> {
        let work = fetch_work(&self.deps.limits, call.clone()).map_err(Status::from)?;
        let kept = &self.deps.stats.kept;
        if let Some(key) = slot_key(request)
            && let Some(permit) = kept.take(key)
        {
            kept.started();
            return Ok(Admission { work, permit });
        }
        self.admit(request, call).await
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn ConsensusStore) -> Result<T, Status> + Send + 'static,
    ) -> Result<T, Status> {
        let store = self.deps.store.clone();
        tokio::task::spawn_blocking(move || f(store.as_ref()))
            .await
            .map_err(|_| Status::unavailable("the read was cancelled"))?
    }
}

fn mailbox_status(e: MailboxError) -> Status {
    match e {
        MailboxError::Closed => {
            Status::unavailable("the node is restarting an actor or shutting down; retry")
        }
        MailboxError::Timeout => Status::deadline_exceeded("the node is overloaded"),
    }
}

#[tonic::async_trait]
impl P2p for P2pService {
    async fn get_known_peers(
        &self,
        request: Request<proto::GetKnownPeersRequest>,
    ) -> Result<Response<proto::GetKnownPeersResponse>, Status> {
        let result = self.get_known_peers_inner(request).await;
        self.count("GetKnownPeers", result)
    }

    async fn get_commit_availability(
        &self,
        request: Request<proto::GetCommitAvailabilityRequest>,
    ) -> Result<Response<proto::GetCommitAvailabilityResponse>, Status> {
        let result = self.get_commit_availability_inner(request).await;
        self.count("GetCommitAvailability", result)
    }

    async fn get_commit_info(
        &self,
        request: Request<proto::GetCommitInfoRequest>,
    ) -> Result<Response<proto::GetCommitInfoResponse>, Status> {
        let result = self.get_commit_info_inner(request).await;
        self.count("GetCommitInfo", result)
    }

    async fn push_commit(
        &self,
        request: Request<proto::PushCommitRequest>,
    ) -> Result<Response<proto::PushCommitResponse>, Status> {
        let result = self.push_commit_inner(request).await;
        self.count("PushCommit", result)
    }

    async fn fetch_commits(
        &self,
        request: Request<proto::FetchCommitsRequest>,
    ) -> Result<Response<proto::FetchCommitsResponse>, Status> {
        let result = self.fetch_commits_inner(request).await;
        self.count("FetchCommits", result)
    }

    type FetchBlocksStream = BlockStream;

    async fn fetch_blocks(
        &self,
        request: Request<proto::FetchBlocksRequest>,
    ) -> Result<Response<BlockStream>, Status> {
        // A stream opened is counted as it ends ([`Counted`]): one that
        // stops at a block not held is no OK call.
        match self.fetch_blocks_inner(request).await {
            Ok(stream) => Ok(stream),
            refused => self.count("FetchBlocks", refused),
        }
    }
}

impl P2pService {
    async fn get_known_peers_inner(
        &self,
        request: Request<proto::GetKnownPeersRequest>,
    ) -> Result<Response<proto::GetKnownPeersResponse>, Status> {
        let own_info = &request.get_ref().own_info;
        if !own_info.is_empty() {
            codec::decode::<SignedNodeInfo>(own_info, self.deps.data_limits.max_node_info_bytes)
                .map_err(|e| Status::invalid_argument(format!("own_info: {e}")))?;
        }
        self.admit(&request, Call::KnownPeers).await?;
        let caller = caller(&request).peer_id();
        let exchanged = self
            .deps
            .discovery
            .send(ExchangeInfo {
                caller,
                remote: remote_addr(&request).map(|a| a.ip()),
                info: request.into_inner().own_info,
            })
            .timeout(self.deps.timeout)
            .await
            .map_err(mailbox_status)??;
        Ok(Response::new(proto::GetKnownPeersResponse {
            own_info: exchanged.own_info,
            known_peers: exchanged.known_peers,
        }))
    }

    /// Answered from the availability StateSync publishes: read-mostly
    /// state needs neither an actor round trip nor a store read, and
    /// admits every caller, so it skips the adapter.
    async fn get_commit_availability_inner(
        &self,
        _: Request<proto::GetCommitAvailabilityRequest>,
    ) -> Result<Response<proto::GetCommitAvailabilityResponse>, Status> {
        let availability = *self.deps.availability.borrow();
        Ok(Response::new(availability.into()))
    }

    async fn get_commit_info_inner(
        &self,
        request: Request<proto::GetCommitInfoRequest>,
    ) -> Result<Response<proto::GetCommitInfoResponse>, Status> {
        let index = request.get_ref().index;
        self.admit(&request, Call::CommitInfo { index }).await?;
        let genesis = self.deps.genesis;
        let commit = self
            .blocking(move |store| {
                match index {
                    None => store.highest_synced_commit().map(Some),
                    Some(0) => Ok(Some(genesis)),
                    Some(i) => store.commit(i).map(|c| c.map(|c| c.reference())),
                }
                .map_err(serve::store_error)
            })
            .await?;
        Ok(Response::new(proto::GetCommitInfoResponse {
            commit: commit.map(Into::into),
        }))
    }

    async fn push_commit_inner(
        &self,
        request: Request<proto::PushCommitRequest>,
    ) -> Result<Response<proto::PushCommitResponse>, Status> {
        let index = request.get_ref().index;
        self.admit(&request, Call::PushCommit { index }).await?;
        Ok(Response::new(proto::PushCommitResponse {}))
    }

    async fn fetch_commits_inner(
        &self,
        request: Request<proto::FetchCommitsRequest>,
    ) -> Result<Response<proto::FetchCommitsResponse>, Status> {
        let r = request.get_ref();
        let call = Call::FetchCommits {
            start: r.start,
            end: r.end,
        };
        let admission = self.admit_fetch(&request, call).await?;
        let Work::FetchCommits { start, end } = admission.work else {
            return Err(Status::internal("unexpected admission"));
        };
        let mut limits = self.deps.limits.clone();
        // Filled to what the caller takes, if it said less than ours.
        let own = limits.max_fetch_response_bytes;
        limits.max_fetch_response_bytes =
            serve::asked_budget(own, request.get_ref().max_commit_bytes);
        let budget = limits.max_fetch_response_bytes;
        let data_limits = self.deps.data_limits.clone();
        // The answer's commits are within our own limit (its first commit
        // whatever the caller asked); its size is known once read.
        let estimate = own;
        let connection = connection(&request);
        let reservation = self.budget.reservation(connection);
        // Waits, on its slot, for answers of this connection to be sent
        // first: registered meanwhile, so that a newer fetch may take the
        // slot of one that waits on a connection that does not read, as it
        // may a stalled answer's. A client that reads none of them is
        // refused rather than kept waiting.
        let waiting = self.deps.stats.waiting_for_budget(admission.permit.id());
        let waited = tokio::select! {
            biased;
            () = waiting.cut() => None,
            waited = tokio::time::timeout(limits.send_timeout, reservation.add(estimate)) => {
                Some(waited.is_ok())
            }
        };
        // Cut, or its budget came just as a newer fetch took its slot.
        if waited.is_none() || !waiting.finish() {
            return Err(Status::resource_exhausted(
                "the fetch's slot went to a newer fetch while it waited for this \
                 connection to read earlier answers",
            ));
        }
        if waited == Some(false) {
            return Err(Status::resource_exhausted(format!(
                "{} bytes of answers wait for this connection to read them",
                self.budget.held(connection)
            )));
        }
        // Held by the read, so a cancelled call frees its slot only once
        // the read is done; then by the response until it is sent.
        let slot = FetchSlot::new(admission.permit, &self.deps.stats, slot_key(&request));
        // Observed before reading: an answer read now is kept for this
        // version only (see `answers`).
        let version = self.deps.store.version();
        let kept = self.answers.get(version, start, end, budget);
        let (response, slot) = match kept {
            Some(kept) => (kept, slot),
            None => {
                // A call dropped (its caller reset it) stops its read at
                // the next store call, and is charged to its caller; a
                // read done whole is kept even so, so the same request
                // asked again is not read again.
                let wanted = Wanted::new();
                let (read_wanted, answers) = (wanted.flag(), self.answers.clone());
                let mut slot = slot;
                self.blocking(move |store| {
                    let wanted = || read_wanted.load(Ordering::Relaxed);
                    let answer =
                        serve::commits_answer(store, start, end, &limits, &data_limits, &wanted);
                    if !wanted() {
                        slot.abandon();
                    }
                    let response = answer.map_err(Status::from)?;
                    let size = response.encoded_len();
                    answers.insert(version, (start, end, budget), &response, size);
                    Ok((response, slot))
                })
                .await?
            }
        };
        reservation.settle(estimate, serve::encoded_message_len(&response));
        Ok(guarded(
            Response::new(response),
            slot,
            Arc::new(reservation),
        ))
    }

    async fn fetch_blocks_inner(
        &self,
        request: Request<proto::FetchBlocksRequest>,
    ) -> Result<Response<BlockStream>, Status> {
        let call = Call::FetchBlocks {
            refs: request.get_ref().refs.len(),
        };
        // Malformed references are refused before any slot is taken.
        let refs = request
            .get_ref()
            .refs
            .iter()
            .map(BlockRef::try_from)
            .collect::<Result<Vec<_>, ConvertError>>()?;
        let admission = self.admit_fetch(&request, call).await?;
        let slot = FetchSlot::new(admission.permit, &self.deps.stats, slot_key(&request));
        let reservation = Arc::new(self.budget.reservation(connection(&request)));
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let own = self.deps.limits.max_fetch_response_bytes;
        let max_bytes = serve::asked_budget(own, request.get_ref().max_message_bytes);
        // A chunk holds one block at least, whatever the budget.
        let estimate = max_bytes.max(self.deps.data_limits.max_block_bytes);
        tokio::spawn(serve::stream_blocks(
            self.deps.store.clone(),
            refs,
            max_bytes,
            estimate,
            reservation.clone(),
            tx,
        ));
        Ok(guarded(
            Response::new(Counted::new(
                ReceiverStream::new(rx),
                "FetchBlocks",
                self.deps.counts.clone(),
            )),
            slot,
            reservation,
        ))
    }
}

/// `response`, holding `slot` and `reservation` until it is sent.
fn guarded<T>(
    mut response: Response<T>,
    slot: FetchSlot,
    reservation: Arc<Reservation>,
) -> Response<T> {
    response
        .extensions_mut()
        .insert(Held::new(SendGuard::new(Some(slot), Some(reservation))));
    response
}

/// Who may reuse the slot of a fetch of `request`: its connection and
/// caller, with the host it counts in; `None` (never kept) when the
/// connection is not known.
fn slot_key<T>(request: &Request<T>) -> Option<SlotKey> {
    Some((
        remote_addr(request)?,
        caller(request).peer_id(),
        origin(request),
    ))
}

/// The connection a request came on, by its remote address.
fn connection<T>(request: &Request<T>) -> Connection {
    remote_addr(request)
}
