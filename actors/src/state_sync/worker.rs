//! The sync worker: one fetch, from asking PeerHeights for a peer to the
//! Verifier's verdict.
//!
//! A worker leases a fetch slot on the best peer for its range, calls the
//! peer through [`Outbound`], releases the slot with how the transfer went
//! as soon as the peer's part is done, and has the Verifier check what
//! came. It decides nothing about what the result means for sync: the core
//! does (retry, avoid, ban, split). The checks it makes itself are those
//! that must happen as bytes arrive: a FetchBlocks stream is cut at the
//! first block whose digest was not asked for, or once it brings more
//! bytes than the fetch may hold.

use crate::dropped::{self, Droppable, try_send};
use std::collections::HashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use actix::{Addr, Recipient};
use futures::{FutureExt, StreamExt};
use soma_types::verify::{CertifiedRun, ExpectedBlocks, RefusedRun};
use soma_types::{
    BlockRef, CommitIndex, CommitRef, Epoch, FastMap, FastSet, PeerId, TrustedCommit, VerifiedBlock,
};
use soma_wire::convert::Availability;
use soma_wire::proto;
use tokio::sync::watch;
use tokio::task::{AbortHandle, JoinSet};

use super::apply::{Batch, Source};
use super::core::Config;
use super::hedging::{HEAD_HEDGE_MIN, HEDGE_MIN, HedgeBudget, HedgeShare, Hedging, lock};
use super::messages::{
    CommitBatchInfo, CommitsWanted, DeniedInHedge, Failure, LocalFailure, TaskId,
};
use crate::archive::ArchiveReader;
use crate::connections::{
    ActivePeers, Client, Connections, Outbound, ask_availability, push_commit,
};
use crate::faults::Faults;
use crate::peer_heights::{
    AcquirePeer, ClaimsRange, CoversRange, FetchKind, LeaseUnanswered, OutcomeKind, PeerHeights,
    PeersBehind, ReportBeaten, ReportOutcome, Slot, Transfer, UpdateHeight,
};
use crate::verifier::{Verifier, Verify, VerifyError, VerifyRequest, VerifyResponse};
use crate::{Blob, DecodedBlock, HashedBlob};

/// Data of a verified commit batch, held by the shell until applied.
pub(super) struct BatchData {
    pub(super) commits: Vec<TrustedCommit>,
    pub(super) certifiers: Vec<VerifiedBlock>,
    /// The blocks the commits name, in commit order.
    pub(super) refs: Vec<BlockRef>,
    pub(super) epoch: Epoch,
    pub(super) end: CommitIndex,
    pub(super) blocks: FastMap<BlockRef, VerifiedBlock>,
}

impl BatchData {
    /// A verified batch of `epoch`, none of its blocks fetched yet.
    fn new(commits: Vec<TrustedCommit>, certifiers: Vec<VerifiedBlock>, epoch: Epoch) -> Self {
        let refs: Vec<BlockRef> = commits
            .iter()
            .flat_map(|c| c.commit().blocks.iter().copied())
            .collect();
        let end = commits.last().map_or(0, TrustedCommit::index);
        BatchData {
            commits,
            certifiers,
            refs,
            epoch,
            end,
            blocks: FastMap::default(),
        }
    }

    /// Bytes of the commits and certifier blocks.
    pub(super) fn commit_bytes(&self) -> u64 {
        let commits = self.commits.iter().map(|c| c.serialized().len() as u64);
        let certifiers = self.certifiers.iter().map(|b| b.serialized().len() as u64);
        commits.chain(certifiers).sum()
    }

    /// What the core needs to know of it.
    pub(super) fn info(&self) -> CommitBatchInfo {
        // Only the certifiers that vote for the last commit, one per
        // author, are sized: a server may pad a certificate with others.
        let last = self.commits.last().map(TrustedCommit::reference);
        let mut authors = std::collections::HashSet::new();
        let voters: Vec<&VerifiedBlock> = self
            .certifiers
            .iter()
            .filter(|b| {
                let b = b.block();
                last.is_some_and(|l| b.commit_votes.contains(&l)) && authors.insert(b.author)
            })
            .collect();
        CommitBatchInfo {
            start: self.commits.first().map_or(0, TrustedCommit::index),
            end: self.end,
            last: self
                .commits
                .last()
                .map(TrustedCommit::reference)
                .unwrap_or_default(),
            epoch: self.epoch,
            block_count: self.refs.len(),
            bytes: self.commit_bytes(),
            certifier_blocks: voters.len(),
            certifier_bytes: voters.iter().map(|b| b.serialized().len() as u64).sum(),
        }
    }

    /// Blocks `offset..offset + len` of the batch starting at `batch`.
    pub(super) fn chunk(
        &self,
        batch: CommitIndex,
        offset: usize,
        len: usize,
        max_bytes: u64,
    ) -> BlockChunk {
        BlockChunk {
            batch,
            last: (self.commits.last())
                .map(TrustedCommit::reference)
                .unwrap_or_default(),
            commits: self.commits_naming(offset, len),
            epoch: self.epoch,
            refs: self.refs.iter().skip(offset).take(len).copied().collect(),
            max_bytes,
        }
    }

    /// The first and last commits that name blocks `offset..offset + len`
    /// (the batch's whole range if none do).
    fn commits_naming(&self, offset: usize, len: usize) -> (CommitIndex, CommitIndex) {
        let (chunk_start, chunk_end) = (offset, offset.saturating_add(len));
        let mut first = None;
        let mut last = None;
        let mut at = 0;
        for c in &self.commits {
            let named = c.commit().blocks.len();
            if at < chunk_end && chunk_start < at + named {
                first.get_or_insert(c.index());
                last = Some(c.index());
            }
            at += named;
        }
        let start = self.commits.first().map_or(0, TrustedCommit::index);
        (first.unwrap_or(start), last.unwrap_or(self.end))
    }

    /// Keeps verified blocks; returns their bytes, and the rule the
    /// batch breaks if one of them shows it: the leader of a commit before
    /// the last carrying the epoch's end. Such commits were certified by
    /// the epoch's committee past the epoch's end (a retired committee's
    /// keys); the blocks after the end are new, held by no honest peer, so
    /// the batch is refused as soon as the end arrives, before anyone is
    /// asked for them again and again.
    pub(super) fn add(&mut self, blocks: Vec<VerifiedBlock>) -> (u64, Option<soma_types::Error>) {
        let mut bytes = 0;
        let mut broken = None;
        let before_last = &self.commits[..self.commits.len().saturating_sub(1)];
        for b in blocks {
            bytes += b.serialized().len() as u64;
            if broken.is_none() && b.block().end_of_epoch.is_some() {
                let r = b.reference();
                broken = before_last
                    .iter()
                    .find(|c| c.commit().leader == r)
                    .map(|c| soma_types::Error::EpochEndInsideBatch(c.index()));
            }
            self.blocks.insert(b.reference(), b);
        }
        (bytes, broken)
    }

    /// The batch to write.
    pub(super) fn into_batch(self) -> Batch {
        Batch {
            commits: self.commits,
            blocks: self.blocks,
            certificate: self.certifiers,
            source: Source::Synced { epoch: self.epoch },
        }
    }
}

/// A chunk of blocks to fetch: `refs` of the batch starting at `batch`, of
/// `epoch`, named by the commits `commits` (first and last): a peer that
/// holds those can serve it. At most `max_bytes` of them.
pub(super) struct BlockChunk {
    pub(super) batch: CommitIndex,
    /// The batch's last commit: what a denial in a hedge is judged by.
    pub(super) last: CommitRef,
    pub(super) commits: (CommitIndex, CommitIndex),
    pub(super) epoch: Epoch,
    pub(super) refs: Vec<BlockRef>,
    pub(super) max_bytes: u64,
}

/// How a block fetch that ended with `failure` is told to PeerHeights. A
/// NOT_FOUND is [`Transfer::Withheld`]: an error now, a lie only once the
/// batch is applied ([`Output::WithheldBlocks`]). Until then the batch may
/// be a retired committee's forgery, certified by keys it still holds,
/// whose blocks no honest peer has.
fn block_transfer_of(failure: &Failure) -> Transfer {
    match transfer_of(failure) {
        Transfer::NotFound => Transfer::Withheld,
        transfer => transfer,
    }
}

/// A commit answer as received, not checked yet.
pub(super) struct CommitAnswer {
    /// Who sent it; `None`: the archive.
    pub(super) peer: Option<PeerId>,
    pub(super) response: proto::FetchCommitsResponse,
    /// Bytes of its commits.
    pub(super) bytes: u64,
    /// How long the peer took, for its score once the answer checks out.
    pub(super) latency_ms: u64,
    /// The answer certified ahead of its turn, if that passed.
    pub(super) certified: Option<CertifiedRun>,
    /// The answer refused ahead of its turn, if a rule refused it there.
    pub(super) refused: Option<RefusedRun>,
    /// The peer this answer beat (the first, if a hedge's answer won; the
    /// second, if the first's came after the hedge was late): settled once
    /// the answer is checked.
    pub(super) beaten: Option<Beaten>,
}

impl CommitAnswer {
    /// Bytes it holds: commits and certifier blocks.
    pub(super) fn held_bytes(&self) -> u64 {
        let certifiers = self.response.certifier_blocks.iter();
        self.bytes + certifiers.map(|b| b.len() as u64).sum::<u64>()
    }
}

/// What a worker ends with: the peer it asked, if one was leased, and the
/// result.
pub(super) type Outcome<T> = (Option<PeerId>, Result<T, Failure>);

/// What a sync worker needs; cloned per fetch.
#[derive(Clone)]
pub(super) struct Worker {
    pub(super) heights: Addr<PeerHeights>,
    pub(super) outbound: Outbound,
    pub(super) verifier: Addr<Verifier>,
    pub(super) check_signatures: bool,
    pub(super) config: Config,
    pub(super) faults: Faults,
    /// Where batches no connected peer holds are read, if anywhere.
    pub(super) archive: Option<Arc<ArchiveReader>>,
    /// When a late fetch asks a second peer; shared by the actor's workers.
    pub(super) hedging: Hedging,
    /// Bytes hedges in flight may hold; shared by the actor's workers.
    pub(super) hedge_budget: HedgeBudget,
    /// Provable lies in answers to hedges, which the core never sees:
    /// counted here, with the core's, in `invalid_responses`.
    pub(super) lies_in_hedges: Arc<AtomicU64>,
    /// Fetches a hedge's answer won, counted as their first peers are
    /// released late ([`Beaten::settle`]).
    pub(super) hedges_won: Arc<AtomicU64>,
    /// Hedges beaten by their first peer's answer after going unanswered
    /// as long as makes a peer late, counted as their peers are reported
    /// beaten.
    pub(super) hedges_late: Arc<AtomicU64>,
    /// Hedges that gave their share up, late, to hedges waiting for room
    /// ([`HedgeBudget::wanted`]).
    pub(super) hedges_given_way: Arc<AtomicU64>,
    /// Hedges that, late, left their peer for one not yet asked for the
    /// fetch, keeping their share ([`LateHedge::Move`]).
    pub(super) hedges_moved: Arc<AtomicU64>,
    /// Hedges that went on alone once their fetch's first peer failed
    /// while they were out.
    pub(super) hedges_alone: Arc<AtomicU64>,
    /// Hedges' answers of a part of what was asked, held while the first
    /// call had the time its own peer needs ([`Hedging::part_wait`]).
    pub(super) hedge_parts_held: Arc<AtomicU64>,
}

/// How a hedge late itself ends its call ([`Worker::late_hedge`]).
enum LateHedge {
    /// Its share is wanted by a hedge waiting for room: given up at this
    /// turn.
    GiveWay(u64),
    /// A slot free now on a peer not yet asked for the fetch: that peer
    /// is asked instead, with the same share.
    Move(Slot),
}

/// Ends once the call that went out as `sent` has waited `after()`, read
/// again each time it wakes, at least every `recheck`. Time before the
/// request went out (a wait for Connections, ours) does not count.
async fn until_waited(sent: &Sent, after: impl Fn() -> Duration, recheck: Duration) {
    loop {
        let after = after();
        match sent.waited() {
            Some(waited) if waited >= after => return,
            waited => {
                let left = after - waited.unwrap_or_default();
                tokio::time::sleep(left.min(recheck)).await;
            }
        }
    }
}

/// Whether a hedge in its call goes on alone once its fetch's first call
/// failed with `failure` ([`Worker::hedged_on`]): a refusal, a broken
/// connection or a denial, the peer's doing; not a timeout, nor a lie, nor
/// a denial of blocks once the race's one denier judged aside is taken
/// (`denier_taken`).
fn goes_alone(failure: &Failure, denier_taken: bool) -> bool {
    match failure {
        Failure::Status { .. } | Failure::Transport | Failure::NotFound => true,
        Failure::BlocksWithheld { .. } => !denier_taken,
        Failure::Timeout | Failure::Invalid(_) => false,
        // Ours, or before any call: nothing for a hedge to outlive.
        Failure::NoPeer
        | Failure::Disconnected
        | Failure::OverBudget { .. }
        | Failure::Local(_)
        | Failure::Panicked => false,
    }
}

/// The second peers that the hedges of one fetch left (giving way to
/// hedges waiting for room, or moving on), each with whether it was late
/// itself when left: passed over by the next hedge unless none other can
/// serve, and those left late beaten by the answer of all that was asked
/// that ends the race.
#[derive(Debug, Default)]
struct Left(std::sync::Mutex<Vec<(PeerId, bool)>>);

impl Left {
    /// A hedge left `peer`, `late` if it had gone unanswered as long as
    /// makes its peer late.
    fn leave(&self, peer: PeerId, late: bool) {
        let mut peers = lock(&self.0);
        match peers.iter_mut().find(|(p, _)| *p == peer) {
            Some((_, was_late)) => *was_late |= late,
            None => peers.push((peer, late)),
        }
    }

    /// A hedge asks `peer` again (no other could serve): no longer left,
    /// unless it was left late, which it stays (it is then neither beaten
    /// by its own answer nor counted twice: [`Self::beaten_by`]'s
    /// `except`). Forgotten, a peer left late and asked again escaped its
    /// charge whenever the first peer answered before it was late again.
    fn ask_again(&self, peer: PeerId) {
        lock(&self.0).retain(|(p, late)| *p != peer || *late);
    }

    /// The peers left.
    fn peers(&self) -> Vec<PeerId> {
        lock(&self.0).iter().map(|(p, _)| *p).collect()
    }

    /// The peers an answer beats, `whole` if it holds all that was asked:
    /// those left late but `except` (the peers that answered, or are
    /// beaten already), and none for a part of an answer. Taken: the race
    /// is over.
    fn beaten_by(&self, whole: bool, except: &[PeerId]) -> Vec<PeerId> {
        let peers = std::mem::take(&mut *lock(&self.0));
        let beaten = peers.into_iter().filter(|(_, late)| whole && *late);
        beaten
            .map(|(p, _)| p)
            .filter(|p| !except.contains(p))
            .collect()
    }
}

/// A fetch's kind and the commits it is for.
type Work = (FetchKind, (CommitIndex, CommitIndex));

/// A peer beaten, with where it is counted (fetches won by their hedge,
/// hedges late), if anywhere.
type BeatenPeer = (PeerId, Option<Arc<AtomicU64>>);

/// The first peer of a hedged fetch, beaten by a second peer's answer of
/// all that was asked (or the second peer, beaten by the first's answer
/// after going unanswered as long as makes a peer late): its slot was
/// released as cancelled when the race ended, and it is reported beaten
/// ([`ReportBeaten`], the failure a release [`Transfer::Late`] gives: it
/// ranks lower) only once that answer
/// has passed the checks that tell a true answer from junk
/// ([`Beaten::settle`]); dropped or failed, nothing is held against it. A
/// block answer is checked as it arrives, a commit answer only by the
/// Verifier: reported at once, the first peer would pay for a junk commit
/// answer that a second peer sent as fast as it could, and three such
/// answers, one banned identity each, would rank an honest peer as
/// failing. The second peers that hedges left, late, to give way to
/// hedges waiting for room ([`HedgeBudget::wanted`]) or to move on to a
/// peer not yet asked ([`LateHedge::Move`]), are beaten by the answer too,
/// on the same terms, each once, if it is all that was asked.
#[derive(Debug)]
#[must_use = "dropped, nothing is held against the peers beaten"]
pub(super) struct Beaten {
    heights: Addr<PeerHeights>,
    /// The peers beaten.
    peers: Vec<BeatenPeer>,
}

impl Beaten {
    /// Reports the peers beaten if the answer that beat them `passed` its
    /// checks, and counts them.
    pub(super) fn settle(self, passed: bool) {
        if passed {
            for (peer, count) in self.peers {
                if let Some(count) = count {
                    count.fetch_add(1, Ordering::Relaxed);
                }
                self.heights.do_send(ReportBeaten { peer });
            }
        }
    }
}

/// When a call's request went out: marked once its client is in hand, so
/// that a wait for Connections (our side's, never the peer's) is not
/// counted against a hedge judged late by how long it went unanswered.
#[derive(Clone, Debug, Default)]
pub(super) struct Sent(Arc<OnceLock<tokio::time::Instant>>);

impl Sent {
    /// The request goes out now.
    fn mark(&self) {
        let _ = self.0.set(tokio::time::Instant::now());
    }

    /// How long since the request went out, if it did.
    fn waited(&self) -> Option<Duration> {
        self.0.get().map(|sent| sent.elapsed())
    }
}

/// How a hedged fetch ended: the slot of the peer whose answer (or
/// failure) is kept, that answer, whether it came before any hedge was
/// sent, the peer it beat (the first, by a hedge's answer, unless the
/// hedge went on alone: the first is then judged by its failure; the
/// second, by the first's once the hedge was late), and the peer whose
/// denial of the blocks was judged aside, if any: a second peer that
/// withheld them in the hedge, or a first peer that did so while its hedge
/// went on alone (judged, as a first peer's denial returned to the core
/// is, once the batch is applied: [`Self::fetch_blocks`]).
struct Hedged<T> {
    slot: Slot,
    result: Result<T, Failure>,
    unhedged: bool,
    beaten: Option<Beaten>,
    withheld_by: Option<PeerId>,
}

/// How long a commit fetch goes unanswered, with no other peer to hedge
/// it on, before its peer's claim past its start is doubted: well above
/// an honest answer's time, so a fetch merely slow is seldom doubted (and
/// its answer ends the doubt).
pub const UNANSWERED_DOUBT: Duration = Duration::from_secs(1);

/// How many times its move delay ([`Hedging::move_delay`]: as long as
/// makes it late, at the head of the pipeline no longer than its fetch
/// waited before it was hedged) a hedge goes unanswered before it moves on
/// to any peer not yet asked with a slot free; until then only to a peer
/// with room to spare ([`AcquirePeer::spare_only`]). Moved to any free
/// peer at once, a hedge late on a loaded honest validator went to
/// identities answering each fetch with one commit, whose part of an
/// answer ended the race: in the simulator's catch-up of 1,000 nodes, 30 %
/// of them such identities, the last node synced in 24.5 s instead of
/// 19.1 s (65.6 s while such parts also counted as beating the peers
/// left). A silent peer is left all the same, within the first call's
/// deadline if this much later comes first (at the head, at most a fifth
/// of the request timeout after the hedge went out).
pub const MOVE_ANYWHERE_AFTER_MOVE_DELAYS: u32 = 2;

/// How long PeerHeights' mailbox may take to answer a request for a slot,
/// beyond the request's own wait.
const MAILBOX_MARGIN: Duration = Duration::from_secs(1);

/// How a transfer that ended with `failure` is told to PeerHeights.
fn transfer_of(failure: &Failure) -> Transfer {
    match failure {
        Failure::Timeout => Transfer::Timeout,
        busy if busy.is_busy() => Transfer::Busy,
        Failure::Status { .. } | Failure::Transport => Transfer::Error,
        Failure::NotFound | Failure::BlocksWithheld { .. } => Transfer::NotFound,
        // Cut on what it held: the core judges it (and reports a liar).
        Failure::Invalid(_) | Failure::OverBudget { .. } => Transfer::Received,
        _ => Transfer::Cancelled,
    }
}

impl Worker {
    /// How every fetch of the batch starting at `batch` begins: injected
    /// faults (tests only), then a slot on the best peer for `range` not in
    /// `avoid`, waiting at most the request timeout for one to be free.
    async fn begin(
        &self,
        batch: CommitIndex,
        work: (FetchKind, (CommitIndex, CommitIndex)),
        avoid: Vec<PeerId>,
    ) -> Result<Slot, Failure> {
        self.faults.on_worker(batch)?;
        self.acquire(work, avoid).await
    }

    /// A slot on the best peer for `start..=end` not in `avoid`, waiting
    /// at most the request timeout for one to be free.
    async fn acquire(
        &self,
        work: (FetchKind, (CommitIndex, CommitIndex)),
        avoid: Vec<PeerId>,
    ) -> Result<Slot, Failure> {
        self.lease(work, avoid, (self.outbound.timeout(), false))
            .await
    }

    /// A slot on the best peer for `start..=end` not in `avoid`, waiting
    /// at most `wait` for one to be free; with `spare_only`, only on a peer
    /// with room to spare ([`AcquirePeer::spare_only`]).
    async fn lease(
        &self,
        (kind, (start, end)): (FetchKind, (CommitIndex, CommitIndex)),
        avoid: Vec<PeerId>,
        (wait, spare_only): (Duration, bool),
    ) -> Result<Slot, Failure> {
        let request = AcquirePeer {
            start,
            end,
            kind,
            avoid,
            wait_ms: wait.as_millis() as u64,
            spare_only,
        };
        // PeerHeights answers within `wait`; the margin covers its mailbox.
        let answer = tokio::time::timeout(wait + MAILBOX_MARGIN, self.heights.send(request))
            .await
            .map_err(|_| Failure::Local(LocalFailure::PeersBusy))?
            .map_err(|_| Failure::Local(LocalFailure::ActorUnavailable))?;
        Ok(answer?)
    }

    /// Runs `call` on the peer `first` leases. If no answer came within
    /// the hedge delay (read again every [`HEAD_HEDGE_MIN`]: shorter once
    /// the fetch is one the pipeline waits on), also on a second peer for
    /// `range` (not that one,
    /// nor one in `avoid`), and keeps the answer that comes first, with the
    /// slot of the peer that sent it. The peer beaten (the first, by the
    /// second; or the second, by the first, once the hedge has itself
    /// gone unanswered as long as makes a peer late,
    /// [`Hedging::usual_delay`]) is released as cancelled and returned as
    /// [`Beaten`], for the caller
    /// to report once the answer is checked: it then ranks lower, with no
    /// fault (a slow peer is not a silent one, and the call that would
    /// tell them apart is dropped); a first peer beaten by an answer that
    /// `whole` says is only part of what was asked (a commit answer may
    /// end early) is not beaten: otherwise peers answering each hedge at once with
    /// one commit would have every honest peer they beat ranked as
    /// failing. While no other peer covers `range`, the second
    /// is looked for again ([`Self::second_peer`]). A second peer that
    /// fails has its slot released as `transfer` tells from its failure,
    /// and another peer is asked in its place (looked for the same way);
    /// a denial is judged as a first peer's is, on its claim asked afresh
    /// (commits at once, blocks once the batch is applied:
    /// [`Hedged::withheld_by`]). A second peer late itself is left as
    /// [`Self::late_hedge`] says. Only an empty budget leaves the first
    /// to answer alone. A first peer that fails while the hedge is in its
    /// call ([`goes_alone`]: refused, reset, denied) leaves the hedge to go
    /// on alone until it is late itself, at most until the first call's
    /// own deadline, the first's failure judged aside as a hedge's is if
    /// the hedge answers by then; a hedge alone that fails, would move on
    /// or give way ends the fetch with the first's failure.
    /// Either way one call's answer is returned, as if only it was sent.
    ///
    /// A fetch the pipeline waits on ([`Hedging::at_head`]) that its peer
    /// refuses as busy before any hedge was sent is handed once to the
    /// best other peer with room to spare ([`AcquirePeer::spare_only`])
    /// and a slot free now, if there is one, its first slot released as
    /// busy: it goes on at once rather than at the core's next tick, and a
    /// peer that refuses everything holds up no catch-up. Any other
    /// refusal is returned, retried at that tick, so that loaded peers are
    /// not asked more often than they were (handed on to any peer with a
    /// free slot, four in five were refused again where the validators are
    /// saturated: docs/simulation.md).
    async fn hedged<T, F, Fut>(
        &self,
        first: Slot,
        (work, reserved): ((FetchKind, (CommitIndex, CommitIndex)), u64),
        mut avoid: Vec<PeerId>,
        calls: (F, impl Fn(&Failure) -> Transfer, impl Fn(&T) -> bool),
    ) -> Hedged<T>
    where
        F: Fn(PeerId, Sent) -> Fut,
        Fut: Future<Output = Result<T, Failure>>,
    {
        let hedged = self
            .hedged_on(first, (work, reserved), avoid.clone(), &calls)
            .await;
        let head = self
            .hedging
            .at_head(work.1.0, self.config.commit_sync_batch_size);
        match hedged {
            // Refused before any hedge was sent: a refusal while a hedge
            // ran would drop the hedge, whose peer may then be chosen
            // again and refuse the request it still holds.
            Hedged {
                slot,
                result: Err(busy),
                unhedged: true,
                ..
            } if busy.is_busy() && head => {
                avoid.push(slot.lease().peer);
                match self.free_now(work, avoid.clone()).await {
                    Some(next) => {
                        slot.release(Transfer::Busy, 0);
                        self.hedged_on(next, (work, reserved), avoid, &calls).await
                    }
                    None => Hedged {
                        slot,
                        result: Err(busy),
                        unhedged: true,
                        beaten: None,
                        withheld_by: None,
                    },
                }
            }
            hedged => hedged,
        }
    }

    /// A slot free now on the best peer for `work` with room to spare, not
    /// in `avoid`.
    async fn free_now(
        &self,
        work: (FetchKind, (CommitIndex, CommitIndex)),
        avoid: Vec<PeerId>,
    ) -> Option<Slot> {
        self.lease(work, avoid, (Duration::ZERO, true)).await.ok()
    }

    /// [`Self::hedged`] on the peer `first` leases, with no handing on.
    /// The second call is sent only once the hedge's share of the
    /// [`HedgeBudget`], `reserved` (what the core reserved for the fetch),
    /// is free: the two calls together never hold more than the fetch's
    /// reservation plus that share, given back when the race ends.
    async fn hedged_on<T, F, Fut>(
        &self,
        first: Slot,
        ((kind, range), reserved): ((FetchKind, (CommitIndex, CommitIndex)), u64),
        mut avoid: Vec<PeerId>,
        (call, transfer, whole): &(F, impl Fn(&Failure) -> Transfer, impl Fn(&T) -> bool),
    ) -> Hedged<T>
    where
        F: Fn(PeerId, Sent) -> Fut,
        Fut: Future<Output = Result<T, Failure>>,
    {
        let first_peer = first.lease().peer;
        // Boxed, so that it can be dropped as soon as a hedge beats it.
        let mut first_call = Box::pin(call(first_peer, Sent::default()));
        // The delay is read again as other fetches answer: a fetch sent
        // before any answered is not left to the default.
        let started = tokio::time::Instant::now();
        let batch = self.config.commit_sync_batch_size;
        loop {
            let at = (kind, range.0);
            let delay = self.hedging.delay(at, batch, self.outbound.timeout());
            let left = delay.saturating_sub(started.elapsed());
            if left.is_zero() {
                break;
            }
            let wait = left.min(HEAD_HEDGE_MIN);
            if let Ok(result) = tokio::time::timeout(wait, &mut first_call).await {
                return Hedged {
                    slot: first,
                    result,
                    unhedged: true,
                    beaten: None,
                    withheld_by: None,
                };
            }
        }
        avoid.push(first_peer);
        let first_lease = first.lease().id;
        let withheld_by = std::sync::OnceLock::new();
        // The peer the hedge waits on, since when, and how long it may
        // take before it is late, as read when it was sent.
        let hedge_on = std::sync::Mutex::new(None);
        let timeout = self.outbound.timeout();
        // Second peers that hedges left (giving way to hedges waiting for
        // room, or moving on), each with whether it was late itself then:
        // those beaten by the answer, if it passes its checks.
        let given_way = Left::default();
        // Set once the first peer's answer ends the race: a hedge polled
        // after that looks for no other peer.
        let over = std::sync::atomic::AtomicBool::new(false);
        // Set once the first peer failed while the hedge was in its call
        // ([`goes_alone`]): the hedge goes on alone, but one that fails,
        // would move on or give way then ends the fetch with the first's
        // failure, for the core to retry (nothing else would bound a
        // search for another peer).
        let alone = std::sync::atomic::AtomicBool::new(false);
        let mut second = std::pin::pin!(async {
            // A hedge that gave way takes room back only from hedges given
            // theirs since ([`HedgeBudget::share`]).
            let mut after = 0;
            // The share of a hedge asking another peer after a failure.
            let mut kept = None;
            // The slot and share of a hedge moving on from a late peer.
            let mut moved = None;
            loop {
                let passed_over = given_way.peers();
                let (slot, mut share) = match moved.take() {
                    Some(next) => next,
                    None => {
                        self.second_peer(
                            ((kind, range), (avoid.clone(), passed_over)),
                            first_lease,
                            (started, (reserved, &mut after)),
                            kept.take(),
                        )
                        .await?
                    }
                };
                share.sent();
                let peer = slot.lease().peer;
                // Asked again (no other peer could serve): no longer left,
                // so neither beaten by its own answer nor counted twice.
                given_way.ask_again(peer);
                let late_after = self.hedging.usual_delay(kind, timeout);
                let sent = Sent::default();
                *lock(&hedge_on) = Some((peer, sent.clone(), late_after));
                // Every peer asked for this fetch: a late hedge moves on
                // only to a peer outside them.
                let asked = [&avoid[..], &given_way.peers(), &[peer]].concat();
                let answer = tokio::select! {
                    answer = call(peer, sent.clone()) => Ok(answer),
                    late = self.late_hedge(((kind, range), &sent, late_after), &share, asked) => Err(late),
                };
                // Answered, or given up: judged here, never late.
                *lock(&hedge_on) = None;
                let answer = match answer {
                    Ok(answer) => answer,
                    Err(late) => {
                        // Late itself: its call is dropped, and its peer
                        // beaten by the answer that ends the race, if that
                        // passes its checks. A hedge whose share a hedge
                        // waiting for room wants asks another peer (this
                        // one again only if no other can serve) with a
                        // share taken afresh, behind the hedges already
                        // waiting; one that moves on keeps its own, and
                        // the slot leased for it.
                        slot.release(Transfer::Cancelled, 0);
                        // The race over, or the hedge alone (which then
                        // ends the fetch for the core to retry, rather than
                        // move on or give way): no other peer (a slot
                        // leased to move to is given back as it drops).
                        if over.load(Ordering::Relaxed) || alone.load(Ordering::Relaxed) {
                            return None;
                        }
                        // Beaten only if late itself: a hedge at the head
                        // of the pipeline moves on after the head's own
                        // wait, before its peer could be late.
                        let late_itself = sent
                            .waited()
                            .is_some_and(|w| w >= self.late_after(kind, late_after));
                        given_way.leave(peer, late_itself);
                        match late {
                            LateHedge::Move(next) => {
                                self.hedges_moved.fetch_add(1, Ordering::Relaxed);
                                moved = Some((next, share));
                            }
                            LateHedge::GiveWay(turn) => {
                                drop(share);
                                self.hedges_given_way.fetch_add(1, Ordering::Relaxed);
                                after = turn;
                            }
                        }
                        continue;
                    }
                };
                match answer {
                    Ok(answer) => return Some((slot, answer, share)),
                    Err(failure) => {
                        self.judge_aside(slot, &failure, transfer(&failure), &withheld_by);
                        // The race ended as it failed, or the hedge was
                        // alone: no other peer.
                        if over.load(Ordering::Relaxed) || alone.load(Ordering::Relaxed) {
                            return None;
                        }
                        // Whatever the failure, another peer is asked in
                        // its place, with the same share (unless a hedge
                        // waiting for room was told it in that instant).
                        // Given up on, the fetch waited for a first peer
                        // that may never answer, for the whole timeout: a
                        // silent identity and one refusing hedges held
                        // every fetch they were first and second peer of
                        // that long.
                        avoid.push(peer);
                        match share.told() {
                            Some(turn) => after = turn,
                            None => kept = Some(share),
                        }
                    }
                }
            }
        });
        tokio::select! {
            result = &mut first_call => {
                // Failed, by its peer's doing, while the hedge was in its
                // call: the hedge goes on alone and its answer is the
                // fetch's. Ended with the race, an answer in flight was
                // dropped and the fetch asked again at the core's next
                // tick, so a peer that failed each fetch just after its
                // hedge went out cost every such fetch a hedge delay and a
                // tick. Alone, the hedge has until it is late itself (a
                // silent peer holds it no longer than that) and at most
                // until the first call's own deadline (the request timeout
                // from when it began), so going alone never holds a fetch
                // longer than its first call could; the first's failure is
                // judged as a hedge's is if the hedge's answer wins, and
                // returned to the core otherwise. Not a hedge late already,
                // nor after a first call that timed out
                // (its hedge has been out nearly as long), nor one that
                // lied (reported by the core at once, and banned), nor one
                // denying blocks in a race whose one denier judged aside
                // is taken already: those end the race, as before.
                let hedge = lock(&hedge_on).clone();
                if let Err(failure) = &result
                    && goes_alone(failure, withheld_by.get().is_some())
                    && let Some((_, sent, at_send)) = hedge
                    && sent.waited().is_some_and(|w| w < self.late_after(kind, at_send))
                {
                    alone.store(true, Ordering::Relaxed);
                    self.hedges_alone.fetch_add(1, Ordering::Relaxed);
                    let deadline = started + timeout;
                    // The hedge's answer first: one ready as it becomes
                    // late is taken, not dropped.
                    let answered = tokio::select! {
                        biased;
                        answered = tokio::time::timeout_at(deadline, second.as_mut()) => answered.ok().flatten(),
                        () = self.until_late(kind, &sent, at_send) => None,
                    };
                    if let Some((slot, answer, share)) = answered {
                        drop(share);
                        self.judge_aside(first, failure, transfer(failure), &withheld_by);
                        let won = (None, slot.lease().peer);
                        let beaten = self.beaten(won, &given_way, whole(&answer));
                        let withheld_by = withheld_by.get().copied();
                        return Hedged { slot, result: Ok(answer), unhedged: false, beaten, withheld_by };
                    }
                }
                // A hedge whose answer came in the same instant is not
                // late: polled once more, it ends its call (its answer is
                // dropped, its slot released as cancelled, a denial
                // judged). Only a hedge in its call is polled: one still
                // looking for a peer could lease one.
                if lock(&hedge_on).is_some() {
                    over.store(true, Ordering::Relaxed);
                    let _ = second.as_mut().now_or_never();
                }
                let withheld_by = withheld_by.get().copied();
                // A hedge unanswered for as long as makes a peer late
                // ([`Hedging::usual_delay`], the longer of its value when
                // the hedge was sent and now, never the shorter wait of a
                // fetch at the head of the pipeline) was late as the first
                // peer was: its peer is beaten, once this answer passes its
                // checks. One asked less long ago is not: an honest peer
                // asked just before the first answered could not have
                // answered. What the answer holds does not matter here (an
                // answer may end early): the hedge is judged by the time
                // it had.
                let hedge = lock(&hedge_on).clone();
                let outwaited = hedge
                    .filter(|(_, sent, at_send)| sent.waited().is_some_and(|w| w >= self.late_after(kind, *at_send)))
                    .map(|(peer, _, _)| peer);
                let late = outwaited.filter(|_| result.is_ok());
                let late = late.map(|peer| (peer, Some(self.hedges_late.clone())));
                let whole = result.as_ref().is_ok_and(whole);
                let beaten = self.beaten((late, first_peer), &given_way, whole);
                Hedged { slot: first, result, unhedged: false, beaten, withheld_by }
            }
            Some((slot, answer, share)) = &mut second => {
                let part_only = !whole(&answer);
                // A part of what was asked ends the race only once the
                // first call has had the time its own peer needs
                // ([`Hedging::part_wait`]): until then, the first's
                // answer, or failure, comes first. Unanswered then, the
                // first peer is beaten by the part if that time was its
                // own measure's.
                let mut first_late = !part_only;
                if part_only {
                    let part = (self.hedging).part_wait((kind, first_peer), timeout, Duration::ZERO);
                    let due = started + part.wait;
                    if due > tokio::time::Instant::now() {
                        self.hedge_parts_held.fetch_add(1, Ordering::Relaxed);
                    }
                    match tokio::time::timeout_at(due, &mut first_call).await {
                        Ok(Ok(answer)) => {
                            // The part dropped, its peer not beaten: it
                            // answered.
                            slot.release(Transfer::Cancelled, 0);
                            drop(share);
                            let beaten = self.beaten((None, first_peer), &given_way, whole(&answer));
                            let withheld_by = withheld_by.get().copied();
                            return Hedged { slot: first, result: Ok(answer), unhedged: false, beaten, withheld_by };
                        }
                        Ok(Err(failure)) => {
                            drop(share);
                            self.judge_aside(first, &failure, transfer(&failure), &withheld_by);
                            let beaten = self.beaten((None, slot.lease().peer), &given_way, false);
                            let withheld_by = withheld_by.get().copied();
                            return Hedged { slot, result: Ok(answer), unhedged: false, beaten, withheld_by };
                        }
                        Err(_) => first_late = part.beaten,
                    }
                }
                first.release(Transfer::Cancelled, 0);
                let won = first_late.then(|| (first_peer, Some(self.hedges_won.clone())));
                let beaten = self.beaten((won, slot.lease().peer), &given_way, !part_only);
                // What the first call holds goes before the share does.
                drop(first_call);
                drop(share);
                let withheld_by = withheld_by.get().copied();
                Hedged { slot, result: Ok(answer), unhedged: false, beaten, withheld_by }
            }
        }
    }

    /// Judges the failure of a call whose fetch went on without it (a
    /// hedge's; a first peer's whose hedge went on alone and won), which
    /// the core never sees: a denial as a first peer's is, commits on the
    /// claim asked afresh, blocks once the batch is applied (the first
    /// denier of a race, set in `withheld_by`); a provable lie (blocks
    /// nobody asked for, say; a hedge's only, as a first peer's lie never
    /// goes alone) reported at once; anything else released as `transfer`
    /// tells. Counted as an error, a peer that denied only hedges was
    /// never banned.
    fn judge_aside(
        &self,
        slot: Slot,
        failure: &Failure,
        transfer: Transfer,
        withheld_by: &OnceLock<PeerId>,
    ) {
        let peer = slot.lease().peer;
        match transfer {
            Transfer::NotFound => self.judge_denial(slot),
            Transfer::Withheld => {
                let _ = withheld_by.set(peer);
                slot.release(Transfer::Withheld, 0);
            }
            other => {
                slot.release(other, 0);
            }
        }
        if matches!(failure, Failure::Invalid(_)) {
            misbehaved(&self.heights, peer);
            self.lies_in_hedges.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Releases the slot of a commit fetch its peer denied (NOT_FOUND) once
    /// that peer's claim was asked afresh ([`Self::refresh`]): judged on
    /// the claim it then makes, or on none if it answered and PeerHeights
    /// did not take that. In a task of its own, holding the slot until
    /// then (at most a commit hedge delay): a race that ends, or a retry
    /// that goes on, while the question is out neither drops the
    /// judgement nor waits for it. Waited for before the worker returned,
    /// a first peer's denial let an identity that then stalled its height
    /// answer hold the retry that long, once per identity.
    fn judge_denial(&self, slot: Slot) {
        let worker = self.clone();
        tokio::spawn(async move {
            let transfer = match worker.refresh(slot.lease().peer).await {
                true => Transfer::NotFound,
                false => Transfer::Error,
            };
            slot.release(transfer, 0);
        });
    }

    /// The peers an answer beats, if any: `peer`, and, if the answer is
    /// `whole` (all that was asked), the second peers that hedges left
    /// once they were late themselves (counted in `hedges_given_way` or
    /// `hedges_moved` already, as they were left). A part of an answer
    /// beats none of those: a hedge that moved on to an identity answering
    /// each fetch with one commit would otherwise have the honest peer it
    /// left ranked lower each time. Nor does any answer beat a peer left
    /// before it was late (a hedge at the head of the pipeline moves on
    /// after the head's shorter wait): a silent identity leased the fetch
    /// the pipeline waits on would otherwise have each honest peer its
    /// hedge went to ranked lower for not answering within that wait.
    /// The peer whose answer it is (`answered`) is never among them.
    fn beaten(
        &self,
        (peer, answered): (Option<BeatenPeer>, PeerId),
        given_way: &Left,
        whole: bool,
    ) -> Option<Beaten> {
        let except: Vec<PeerId> = peer.iter().map(|(p, _)| *p).chain([answered]).collect();
        let given_way = given_way
            .beaten_by(whole, &except)
            .into_iter()
            .map(|p| (p, None));
        let peers: Vec<_> = peer.into_iter().chain(given_way).collect();
        (!peers.is_empty()).then(|| Beaten {
            heights: self.heights.clone(),
            peers,
        })
    }

    /// How long a call for a fetch of `kind` goes unanswered before its
    /// peer is late ([`Hedging::late_after`]).
    fn late_after(&self, kind: FetchKind, at_send: Duration) -> Duration {
        (self.hedging).late_after(kind, self.outbound.timeout(), at_send)
    }

    /// Ends once the hedge of a fetch of `kind` from commit `start` whose
    /// request went out as `sent` is late ([`Self::late_after`], from
    /// `at_send`) and a hedge waiting for room wants its `share`
    /// ([`HedgeBudget::wanted`]; told last if the pipeline waits on the
    /// fetch then). Time spent before the request went out (a wait for
    /// Connections, ours) does not count.
    async fn late_and_wanted(
        &self,
        ((kind, start), sent, at_send): ((FetchKind, CommitIndex), &Sent, Duration),
        share: &HedgeShare,
    ) -> u64 {
        self.until_late(kind, sent, at_send).await;
        self.wanted(start, share).await
    }

    /// Ends once the hedge of a fetch of `kind` whose request went out as
    /// `sent` is late ([`Self::late_after`], from `at_send`).
    async fn until_late(&self, kind: FetchKind, sent: &Sent, at_send: Duration) {
        let late_after = || self.late_after(kind, at_send);
        until_waited(sent, late_after, Duration::MAX).await;
    }

    /// Ends once a hedge waiting for room wants `share`, held by the late
    /// hedge of a fetch from commit `start` ([`HedgeBudget::wanted`]; told
    /// last if the pipeline waits on the fetch then).
    async fn wanted(&self, start: CommitIndex, share: &HedgeShare) -> u64 {
        let head = (self.hedging).at_head(start, self.config.commit_sync_batch_size);
        self.hedge_budget.wanted(share, head).await
    }

    /// For a hedge in its call: ends once it is late
    /// ([`Self::until_late`]) and a hedge waiting for room wants its
    /// `share` ([`LateHedge::GiveWay`]), or once it may move on
    /// ([`Self::until_moveable`]: as late, or at the head of the pipeline
    /// as soon as its fetch was hedged) and a slot is free now on a peer
    /// outside `asked` (every peer asked for the fetch so far) with room to
    /// spare, or on any such peer once the hedge has gone unanswered
    /// [`MOVE_ANYWHERE_AFTER_MOVE_DELAYS`] times its move delay, looked
    /// for every [`HEDGE_MIN`] ([`LateHedge::Move`], with that slot: the late
    /// call is dropped only once the next peer is sure). A hedge that only
    /// gave way to others, with nothing waiting for its room, held its
    /// fetch on a silent second peer as long as the first: for the whole
    /// request timeout, at the head of the pipeline too, while a peer
    /// never asked stood idle. Each move leaves a peer for one not asked
    /// before, so a fetch's hedge moves at most once per peer that covers
    /// it; once every such peer was asked it stays where it is, a peer
    /// left is not asked again.
    async fn late_hedge(
        &self,
        ((kind, range), sent, at_send): (Work, &Sent, Duration),
        share: &HedgeShare,
        asked: Vec<PeerId>,
    ) -> LateHedge {
        let wanted = async {
            self.until_late(kind, sent, at_send).await;
            self.wanted(range.0, share).await
        };
        let another = async {
            self.until_moveable((kind, range.0), sent, at_send).await;
            loop {
                let delay = self.move_delay((kind, range.0), at_send);
                let anywhere = delay * MOVE_ANYWHERE_AFTER_MOVE_DELAYS;
                let spare_only = sent.waited().is_none_or(|w| w < anywhere);
                let free_now = (Duration::ZERO, spare_only);
                if let Ok(slot) = self.lease((kind, range), asked.clone(), free_now).await {
                    return slot;
                }
                tokio::time::sleep(HEDGE_MIN).await;
            }
        };
        let late = tokio::select! {
            turn = wanted => LateHedge::GiveWay(turn),
            slot = another => LateHedge::Move(slot),
        };
        // Told to give way in the instant it could move: the hedge waiting
        // counts on its room.
        match (late, share.told()) {
            (LateHedge::Move(slot), Some(turn)) => {
                slot.release(Transfer::Cancelled, 0);
                LateHedge::GiveWay(turn)
            }
            (late, _) => late,
        }
    }

    /// Ends once the hedge of a fetch of `kind` from commit `start` whose
    /// request went out as `sent` may move on ([`Hedging::move_delay`],
    /// from `at_send`), read again every [`HEAD_HEDGE_MIN`]: a fetch
    /// reaches the head of the pipeline as the batches before it are
    /// applied.
    async fn until_moveable(
        &self,
        (kind, start): (FetchKind, CommitIndex),
        sent: &Sent,
        at_send: Duration,
    ) {
        let after = || self.move_delay((kind, start), at_send);
        until_waited(sent, after, HEAD_HEDGE_MIN).await;
    }

    /// How long the hedge of a fetch of `kind` from commit `start`, sent
    /// when a peer was late after `at_send`, waits before it may move on
    /// ([`Hedging::move_delay`]).
    fn move_delay(&self, (kind, start): (FetchKind, CommitIndex), at_send: Duration) -> Duration {
        let (batch, timeout) = (self.config.commit_sync_batch_size, self.outbound.timeout());
        (self.hedging).move_delay((kind, start), batch, timeout, at_send)
    }

    /// A slot for the hedge of the fetch leased as `first`, sent at
    /// `started`, with the hedge's share of the [`HedgeBudget`]
    /// (`reserved`), taken first: a slot is never held idle while the
    /// hedge waits for room, nor timed from before it could be used; the
    /// share is given back while no peer is found. While no other peer
    /// covers `range`, asked again every
    /// [`HEDGE_MIN`], for one may come (a peer that reached the range
    /// since), so a peer that holds the fetch unanswered holds it only
    /// until another can serve it. A commit fetch that no other peer could
    /// take and that is still unanswered [`UNANSWERED_DOUBT`] after it was
    /// sent has its peer's claim doubted at once ([`LeaseUnanswered`]).
    /// A hedge asking another peer after a failure brings its share
    /// (`kept`) and asks for none. `None` only if the budget is empty (no
    /// hedge is ever sent). A lease that fails for want of a free slot,
    /// or of an answer from PeerHeights, is asked again as when no peer
    /// covers the range.
    async fn second_peer(
        &self,
        ((kind, range), (avoid, passed_over)): (Work, (Vec<PeerId>, Vec<PeerId>)),
        first: u64,
        (started, (reserved, after)): (tokio::time::Instant, (u64, &mut u64)),
        mut kept: Option<HedgeShare>,
    ) -> Option<(Slot, HedgeShare)> {
        let mut doubted = kind != FetchKind::Commits;
        let timeout = self.outbound.timeout();
        loop {
            // The hedge of a fetch the pipeline waits on waits first.
            let head = (self.hedging).at_head(range.0, self.config.commit_sync_batch_size);
            let share = match kept.take() {
                Some(share) => share,
                None => self.hedge_budget.share(reserved, (*after, head)).await?,
            };
            // Waiting for a slot with its share held, a hedge gives the
            // share up as a late one does.
            let given = Sent::default();
            given.mark();
            let at_given = self.hedging.usual_delay(kind, timeout);
            let leased = tokio::select! {
                leased = self.acquire_passing_over((kind, range), &avoid, &passed_over) => leased,
                turn = self.late_and_wanted(((kind, range.0), &given, at_given), &share) => {
                    *after = turn;
                    continue;
                }
            };
            match leased {
                Ok(slot) => return Some((slot, share)),
                // No peer; or none free in time, PeerHeights' queue of
                // waiting fetches full, or PeerHeights not answering: the
                // share is given back and a peer looked for again while
                // the first call runs. Given up on, a failed lease left
                // the first peer, silent perhaps, the fetch for the whole
                // timeout.
                Err(_) => drop(share),
            }
            // Room is asked for again only once a peer could be leased: a
            // hedge waiting for room makes late hedges give way, and room
            // given to a hedge with no peer to ask is given for nothing.
            loop {
                if !doubted && started.elapsed() >= UNANSWERED_DOUBT {
                    doubted = true;
                    self.heights.do_send(LeaseUnanswered { lease: first });
                }
                tokio::time::sleep(HEDGE_MIN).await;
                if self.covered((kind, range), &avoid).await {
                    break;
                }
            }
        }
    }

    /// [`Self::acquire`] for a peer in neither `avoid` nor `passed_over`
    /// (second peers that hedges left, late), or, if none can serve, in
    /// `passed_over`: being left late proves nothing against a peer.
    async fn acquire_passing_over(
        &self,
        work: Work,
        avoid: &[PeerId],
        passed_over: &[PeerId],
    ) -> Result<Slot, Failure> {
        let all = [avoid, passed_over].concat();
        match self.acquire(work, all).await {
            Err(Failure::NoPeer) if !passed_over.is_empty() => {
                self.acquire(work, avoid.to_vec()).await
            }
            leased => leased,
        }
    }

    /// Whether a peer not in `avoid` could be leased for `work`, as
    /// PeerHeights would choose one (unknown, if it does not answer in
    /// time, is yes).
    async fn covered(&self, (kind, (start, end)): Work, avoid: &[PeerId]) -> bool {
        let avoid = avoid.to_vec();
        let query = self.heights.send(CoversRange {
            kind,
            start,
            end,
            avoid,
        });
        !matches!(
            tokio::time::timeout(MAILBOX_MARGIN, query).await,
            Ok(Ok(false))
        )
    }

    /// Scores `peer` for a fetch of `kind` that brought `bytes` in
    /// `latency_ms`, `share.0` of the `share.1` items asked, and whose
    /// data passed verification, and counts its answer time for hedging
    /// if it brought all that was asked; a failed verification is the
    /// core's to report, and its time counts for nothing.
    fn verified<T>(
        &self,
        (kind, peer): (FetchKind, PeerId),
        (bytes, share): (u64, (u64, u64)),
        latency_ms: u64,
        result: &Result<T, Failure>,
    ) {
        if result.is_ok() {
            self.hedging.answered(kind, peer, latency_ms, share);
            let delivered = ReportOutcome::delivered((kind, peer), (bytes, latency_ms), share);
            self.heights.do_send(delivered);
        }
    }

    /// Fetches and verifies the commits `wanted` names.
    pub(super) async fn fetch_commits(
        self,
        wanted: CommitsWanted,
        avoid: Vec<PeerId>,
    ) -> Outcome<BatchData> {
        let fetched = self
            .commit_answer((wanted.start, wanted.end), (wanted.max_bytes, false), avoid)
            .await;
        match fetched {
            (peer, Ok(answer)) => (peer, self.check_commits(answer, wanted).await),
            (peer, Err(f)) => (peer, Err(f)),
        }
    }

    /// Certifies a commit answer fetched ahead as it arrives, if its
    /// commits are of `epoch`: every rule but the link of its first commit
    /// to the one before. A peer's answer refused whatever comes before it
    /// ([`RefusedRun::stands_alone`]) fails now, as invalid, so that its
    /// sender is judged at once and given no more fetches meanwhile. Any
    /// other refusal is kept: at its turn, if the epoch was guessed right,
    /// its verdict is what the full check would give
    /// ([`RefusedRun::verdict`]), judged there; anything else is checked
    /// again in full at its turn.
    pub(super) async fn certify_ahead(
        &self,
        mut answer: CommitAnswer,
        start: CommitIndex,
        epoch: Epoch,
    ) -> Result<CommitAnswer, Failure> {
        let request = VerifyRequest::CommitRun {
            epoch,
            start,
            commits: answer.response.commits.iter().cloned().map(Blob).collect(),
            certifiers: (answer.response.certifier_blocks.iter().cloned())
                .map(Blob)
                .collect(),
        };
        match self.verifier.send(Verify(request)).await {
            Ok(Ok(VerifyResponse::CommitRun(run))) => answer.certified = Some(run),
            Ok(Ok(VerifyResponse::RefusedRun(refused))) => answer.refused = Some(*refused),
            _ => {}
        }
        // Settled now, not at its turn. An answer that failed here only for
        // a wrong guess of its epoch costs the peer it beat nothing.
        if let Some(beaten) = answer.beaten.take() {
            beaten.settle(answer.certified.is_some());
        }
        // An archive's answer is judged at its turn, where its refusal is
        // counted against the archive.
        match answer.refused.take() {
            Some(refused) if answer.peer.is_some() && refused.stands_alone() => {
                Err(Failure::Invalid(refused.error().clone()))
            }
            refused => Ok(CommitAnswer { refused, ..answer }),
        }
    }

    /// Verifies a commit answer fetched ahead, as [`Self::fetch_commits`]
    /// verifies one it fetched: if it was certified ahead for the epoch
    /// `wanted`, only the link of its first commit is left to check.
    pub(super) async fn check_commits(
        self,
        mut answer: CommitAnswer,
        wanted: CommitsWanted,
    ) -> Result<BatchData, Failure> {
        let beaten = answer.beaten.take();
        let share = (
            answer.response.commits.len() as u64,
            wanted.end.saturating_sub(wanted.start).saturating_add(1),
        );
        // Refused ahead under this epoch's committee, after the commit
        // before it: the full check's verdict, without checking again.
        let verdict = (answer.refused.as_ref())
            .filter(|refused| refused.epoch() == wanted.epoch)
            .and_then(|refused| refused.verdict(wanted.after));
        let result = match (answer.certified, verdict) {
            (Some(run), _) if run.epoch() == wanted.epoch => run
                .link(wanted.after)
                .map(|(commits, certifiers)| BatchData::new(commits, certifiers, wanted.epoch))
                .map_err(Failure::Invalid),
            (_, Some(error)) => Err(Failure::Invalid(error)),
            _ => self.verify_commits(answer.response, wanted).await,
        };
        if let Some(beaten) = beaten {
            beaten.settle(result.is_ok());
        }
        match (answer.peer, &self.archive) {
            (Some(peer), _) => self.verified(
                (FetchKind::Commits, peer),
                (answer.bytes, share),
                answer.latency_ms,
                &result,
            ),
            (None, Some(archive)) => {
                // Commits of a later epoch, asked for while the batch that
                // ends the expected one waits to be applied, are the core's
                // to judge (as from a peer): a true copy, not a corrupt one.
                let claim = matches!(&result, Err(f) if wanted.claims_later_epoch(f));
                if !claim {
                    refused_by(archive, wanted.start, &result);
                }
            }
            (None, None) => {}
        }
        result
    }

    /// Fetches the commits `start..=end`, unchecked: the answer of a peer
    /// leased for `start`, at most `max_bytes`.
    /// `estimated`: `max_bytes` is the core's estimate for a fetch ahead,
    /// below the most an answer may be; an answer over it is then
    /// [`Failure::OverBudget`], no fault of the peer's.
    pub(super) async fn commit_answer(
        &self,
        (start, end): (CommitIndex, CommitIndex),
        (max_bytes, estimated): (u64, bool),
        avoid: Vec<PeerId>,
    ) -> Outcome<CommitAnswer> {
        // The peer is chosen for `start` alone: an honest one serves it.
        let work = (FetchKind::Commits, (start, start));
        let slot = match self.begin(start, work, avoid.clone()).await {
            Ok(slot) => slot,
            Err(Failure::NoPeer) => {
                return (None, self.archive_answer(start, end, max_bytes).await);
            }
            Err(f) => return (None, Err(f)),
        };
        // The answer may be as large as the core reserved for it, no larger.
        let max = to_usize(max_bytes);
        // Filled to what this node decodes, whatever the peer's own cap.
        let max_commit_bytes = self.config.max_message_bytes;
        let message = proto::FetchCommitsRequest {
            start,
            end,
            max_commit_bytes,
        };
        let judge = |failure: &Failure| match failure {
            Failure::OverBudget { .. } => Transfer::Late,
            failure => transfer_of(failure),
        };
        let call = |peer, sent: Sent| async move {
            let call = move |mut c: Client, r| async move {
                sent.mark();
                c = c.max_decoding_message_size(max);
                c.fetch_commits(r).await
            };
            let answer = self.outbound.call(peer, message, call).await;
            answer
                .map(|r| r.into_inner())
                .map_err(|e| over_cap(Failure::from(e), (max_bytes, estimated)))
        };
        let asked = (end - start).saturating_add(1);
        let whole = |r: &proto::FetchCommitsResponse| whole_commit_answer(r, asked);
        let work = (work, max_bytes);
        let hedged = self.hedged(slot, work, avoid, (call, judge, whole)).await;
        let (slot, answer, beaten) = (hedged.slot, hedged.result, hedged.beaten);
        let peer = slot.lease().peer;
        let response = match answer.and_then(|r| kept(r, asked)) {
            Ok(response) => response,
            Err(failure) => {
                if let Some(beaten) = beaten {
                    beaten.settle(false);
                }
                // A denial is judged on the claim the peer makes now, in a
                // task of its own: the retry, which avoids this peer, does
                // not wait on a question the peer may stall.
                match judge(&failure) {
                    Transfer::NotFound => self.judge_denial(slot),
                    transfer => {
                        slot.release(transfer, 0);
                    }
                }
                return (Some(peer), Err(failure));
            }
        };
        let bytes = response.commits.iter().map(|c| c.len() as u64).sum();
        // The peer's part is done; verifying does not hold its slot.
        let latency_ms = slot.release(Transfer::Received, bytes);
        let answer = CommitAnswer {
            peer: Some(peer),
            response,
            bytes,
            latency_ms,
            certified: None,
            refused: None,
            beaten,
        };
        (Some(peer), Ok(answer))
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
            })) => Ok(BatchData::new(commits, certifiers, wanted.epoch)),
            Ok(Err(e)) => Err(verify_failure(e)),
            Ok(Ok(_)) | Err(_) => Err(Failure::Local(LocalFailure::VerifierUnavailable)),
        }
    }

    /// Fetches and verifies a chunk of blocks.
    ///
    /// A peer that withheld the blocks in a hedge, or as first peer while
    /// its hedge went on alone to win, while claiming their commits (asked
    /// afresh, as a first peer is) is set in `withheld_by`, whatever the
    /// fetch's outcome: it is judged with the batch's own deniers once the
    /// batch is applied.
    pub(super) async fn fetch_blocks(
        self,
        chunk: BlockChunk,
        avoid: Vec<PeerId>,
        denied: Recipient<DeniedInHedge>,
    ) -> Outcome<Vec<VerifiedBlock>> {
        let range = chunk.commits;
        let work = (FetchKind::Blocks, range);
        let slot = match self.begin(chunk.batch, work, avoid.clone()).await {
            Ok(slot) => slot,
            Err(Failure::NoPeer) => return (None, self.blocks_from_archive(&chunk).await),
            Err(f) => return (None, Err(f)),
        };
        let message_bytes = to_usize(self.config.block_message_bytes(chunk.max_bytes));
        let message = proto::FetchBlocksRequest {
            refs: chunk.refs.iter().copied().map(Into::into).collect(),
            // Each message within what this node decodes of one.
            max_message_bytes: self.config.max_message_bytes.min(chunk.max_bytes),
        };
        let outbound = &self.outbound;
        let call = |peer, sent: Sent| {
            let message = message.clone();
            let (refs, max_bytes) = (chunk.refs.clone(), chunk.max_bytes);
            async move {
                let call = move |c: Client, r| async move {
                    sent.mark();
                    let mut stream = c
                        .max_decoding_message_size(message_bytes)
                        .fetch_blocks(r)
                        .await?
                        .into_inner();
                    receive_blocks(&mut stream, &refs, max_bytes).await
                };
                let received = outbound.call(peer, message, call).await;
                match received.map_err(Failure::from).and_then(|r| r) {
                    // Refused before any block: none held.
                    Err(Failure::NotFound) => Err(Failure::BlocksWithheld {
                        held: 0,
                        claimed: false,
                    }),
                    other => other,
                }
            }
        };
        let work = (work, self.config.block_reserve(chunk.max_bytes));
        let hedged = self
            .hedged(slot, work, avoid, (call, block_transfer_of, |_: &_| true))
            .await;
        let (slot, received, beaten) = (hedged.slot, hedged.result, hedged.beaten);
        // A hedge's denier is asked afresh in a task of its own, and its
        // verdict reaches the core whenever it comes: waited for here, a
        // denier that stalled its height answer held a fetch already
        // answered, at the head of the pipeline too, for up to the usual
        // delay (half the timeout with a slow majority).
        if let Some(peer) = hedged.withheld_by {
            let (worker, last) = (self.clone(), chunk.last);
            tokio::spawn(async move {
                if worker.claims_afresh(peer, range).await {
                    denied.do_send(DeniedInHedge { last, peer });
                }
            });
        }
        // Blocks are checked against the refs asked for as they arrive.
        if let Some(beaten) = beaten {
            beaten.settle(received.is_ok());
        }
        let peer = slot.lease().peer;
        let blobs = match received {
            Ok(blobs) => blobs,
            Err(Failure::BlocksWithheld { held, .. }) => {
                slot.release(Transfer::Withheld, 0);
                let claimed = self.claims_afresh(peer, range).await;
                return (Some(peer), Err(Failure::BlocksWithheld { held, claimed }));
            }
            Err(failure) => {
                slot.release(block_transfer_of(&failure), 0);
                return (Some(peer), Err(failure));
            }
        };
        let bytes = blobs.iter().map(|b| b.bytes().len() as u64).sum();
        let latency = slot.release(Transfer::Received, bytes);
        let result = self.verify_blocks(chunk.epoch, blobs, &chunk.refs).await;
        // A block fetch is answered whole or not at all.
        self.verified((FetchKind::Blocks, peer), (bytes, (1, 1)), latency, &result);
        (Some(peer), result)
    }

    /// Whether `peer`, which has just denied blocks of commits `range`,
    /// still claims them once asked afresh ([`Self::refresh`]): its denial
    /// is then a lie if the blocks prove to exist.
    async fn claims_afresh(&self, peer: PeerId, range: (CommitIndex, CommitIndex)) -> bool {
        self.refresh(peer).await && self.claims(peer, range).await
    }

    /// Whether `peer` claims commits `start..=end` in PeerHeights' view:
    /// a NOT_FOUND for the blocks they name is then a lie, once the blocks
    /// are shown to exist. Unknown (PeerHeights restarting or slow) is no.
    async fn claims(&self, peer: PeerId, (start, end): (CommitIndex, CommitIndex)) -> bool {
        let query = ClaimsRange { peer, start, end };
        let answer = tokio::time::timeout(self.outbound.timeout(), self.heights.send(query)).await;
        matches!(answer, Ok(Ok(true)))
    }

    /// Asks `peer`, which has just answered NOT_FOUND, for its
    /// availability now, and has PeerHeights take the answer before
    /// anything sent after this returns; whether its NOT_FOUND may then be
    /// judged on PeerHeights' view. An honest node advertises a new lowest
    /// commit before it deletes below it, so its answer no longer claims
    /// what it pruned, whatever the height query interval and the grace.
    /// A liar that answers so to escape gives those commits up while it
    /// stays connected: PeerHeights never lowers a peer's lowest, and
    /// judges on the most it has claimed, not a lower highest.
    ///
    /// The answer is waited for no longer than a late fetch is before
    /// another peer is asked (the hedge delay of commit fetches): one
    /// that does not come by then leaves the view as it is (kept current
    /// by `prune-grace`), so a peer that stalls the question holds up its
    /// judgement by at most that delay (commits: [`Self::judge_denial`],
    /// the retry going on meanwhile), and the retry of blocks it denied,
    /// which carries whether it still claims them, as long. An answer
    /// PeerHeights did not take (our overload) is `false`: no judgement on
    /// a view the peer may have corrected.
    async fn refresh(&self, peer: PeerId) -> bool {
        let timeout = self.outbound.timeout();
        let wait = self.hedging.usual_delay(FetchKind::Commits, timeout);
        match tokio::time::timeout(wait, availability(&self.outbound, peer)).await {
            Ok(Some(update)) => {
                let taken = tokio::time::timeout(timeout, self.heights.send(update)).await;
                matches!(taken, Ok(Ok(())))
            }
            Ok(None) | Err(_) => true,
        }
    }

    /// With no peer for the range: the archive's copy, unchecked, to be
    /// verified as a peer's answer is ([`Self::check_commits`]). A range
    /// the archive lacks stays [`Failure::NoPeer`].
    async fn archive_answer(
        &self,
        start: CommitIndex,
        end: CommitIndex,
        max_bytes: u64,
    ) -> Result<CommitAnswer, Failure> {
        let archive = self.archive.as_ref().ok_or(Failure::NoPeer)?;
        let (commits, certifier_blocks) = archive
            .commits(start, end, max_bytes)
            .await
            .ok_or(Failure::NoPeer)?;
        Ok(CommitAnswer {
            peer: None,
            bytes: commits.iter().map(|c| c.len() as u64).sum(),
            response: proto::FetchCommitsResponse {
                commits,
                certifier_blocks,
            },
            latency_ms: 0,
            certified: None,
            refused: None,
            beaten: None,
        })
    }

    /// [`Self::archive_answer`] for a chunk of blocks: checked as
    /// they would be arriving on a stream, then verified.
    async fn blocks_from_archive(&self, chunk: &BlockChunk) -> Result<Vec<VerifiedBlock>, Failure> {
        let Some(archive) = &self.archive else {
            return Err(Failure::NoPeer);
        };
        let blobs = archive
            .blocks(chunk.commits, &chunk.refs)
            .await
            .ok_or(Failure::NoPeer)?;
        let mut intake = Intake::new(&chunk.refs, chunk.max_bytes);
        let result = match blobs.into_iter().try_for_each(|b| intake.accept(b)) {
            Ok(()) => match intake.finish() {
                Ok(blobs) => self.verify_blocks(chunk.epoch, blobs, &chunk.refs).await,
                Err(f) => Err(f),
            },
            Err(f) => Err(f),
        };
        refused_by(archive, chunk.commits.0, &result);
        result
    }

    /// Decodes the blocks of a complete answer (their digests matched
    /// those asked for, so their bytes are those certified commits name),
    /// then has the Verifier check them. The decoding runs on the
    /// runtime's blocking pool, once the answer is whole and its peer's
    /// slot released: not on the threads that serve peers, not timed as the
    /// peer's latency, and never for an answer that is dropped. The
    /// Verifier's threads, the bound with signatures checked, are left the
    /// rules and signatures.
    async fn verify_blocks(
        &self,
        epoch: Epoch,
        blobs: Vec<HashedBlob>,
        refs: &[BlockRef],
    ) -> Result<Vec<VerifiedBlock>, Failure> {
        let (limit, signatures) = (to_usize(self.config.max_block_bytes), self.check_signatures);
        let decoding = tokio::task::spawn_blocking(move || {
            blobs
                .iter()
                .map(|b| DecodedBlock::decode(b, limit, signatures))
                .collect::<Result<Vec<_>, _>>()
        });
        let blocks = match decoding.await {
            Ok(Ok(blocks)) => blocks,
            Ok(Err(e)) => return Err(Failure::Invalid(e)),
            Err(_) => return Err(Failure::Local(LocalFailure::VerifierUnavailable)),
        };
        let request = VerifyRequest::DecodedBlocks {
            epoch,
            blocks,
            check_signatures: self.check_signatures,
        };
        let blocks = match self.verifier.send(Verify(request)).await {
            Ok(Ok(VerifyResponse::Blocks(blocks))) => blocks,
            Ok(Err(e)) => return Err(verify_failure(e)),
            Ok(Ok(_)) | Err(_) => return Err(Failure::Local(LocalFailure::VerifierUnavailable)),
        };
        // The digests matched; the whole references must too (the epoch,
        // round and author a commit names are those of the block).
        let wanted: FastSet<BlockRef> = refs.iter().copied().collect();
        if let Some(block) = blocks.iter().find(|b| !wanted.contains(&b.reference())) {
            return Err(Failure::Invalid(soma_types::Error::UnexpectedBlock(
                block.reference(),
            )));
        }
        Ok(blocks)
    }
}

/// Has PeerHeights ban `peer`: it sent invalid data or a false claim.
fn misbehaved(heights: &Addr<PeerHeights>, peer: PeerId) {
    tracing::warn!(%peer, "peer sent invalid data or a false claim");
    judge(heights, peer, OutcomeKind::InvalidData);
}

fn judge(heights: &Addr<PeerHeights>, peer: PeerId, kind: OutcomeKind) {
    heights.do_send(ReportOutcome {
        peer,
        bytes: 0,
        latency_ms: 0,
        kind,
    });
}

/// The calls StateSync makes besides fetches: availability queries,
/// pushes of the new height, and reports of liars.
#[derive(Clone)]
pub(super) struct PeerCalls {
    pub(super) outbound: Outbound,
    pub(super) heights: Addr<PeerHeights>,
    pub(super) connections: Addr<Connections>,
    /// The workers' hedging, told how long height queries take.
    pub(super) hedging: Hedging,
}

impl PeerCalls {
    /// The peers connected now: those a round of height queries asks.
    pub(super) fn connected(&self) -> impl Future<Output = Vec<PeerId>> + 'static {
        let connections = self.connections.clone();
        async move { connections.send(ActivePeers).await.unwrap_or_default() }
    }

    /// Has PeerHeights ban `peer`: it sent invalid data or a false claim.
    pub(super) fn misbehaved(&self, peer: PeerId) {
        misbehaved(&self.heights, peer);
    }

    /// Has PeerHeights judge `peer`'s NOT_FOUND for blocks of a batch
    /// applied since: a lie if it claimed to hold them when it answered.
    pub(super) fn withheld(&self, peer: PeerId) {
        judge(&self.heights, peer, OutcomeKind::Withheld);
    }

    /// Asks `peer` for its availability; the answer goes to PeerHeights,
    /// its answer time to [`Hedging`].
    pub(super) async fn query_height(self, peer: PeerId) {
        let asked = Instant::now();
        if let Some(update) = availability(&self.outbound, peer).await {
            self.hedging
                .queried(peer, asked.elapsed().as_millis() as u64);
            // The next query repeats a dropped answer.
            try_send(&self.heights, update, Droppable::UpdateHeight);
        }
    }

    /// The peers known to be behind `index`.
    pub(super) async fn peers_behind(self, index: CommitIndex) -> Vec<PeerId> {
        self.heights
            .send(PeersBehind { index })
            .await
            .unwrap_or_default()
    }

    /// Tells `peer` the highest commit we serve, paced by
    /// [`paced_pushes`] at [`PUSH_INTERVAL`].
    pub(super) async fn push_commits(
        self,
        peer: PeerId,
        advertised: watch::Receiver<Availability>,
    ) {
        let outbound = self.outbound;
        paced_pushes(advertised, PUSH_INTERVAL, move |index| {
            let outbound = outbound.clone();
            async move {
                let message = proto::PushCommitRequest { index };
                outbound.call(peer, message, push_commit).await.is_ok()
            }
        })
        .await;
    }
}

/// Least time between two pushes to one peer: a tenth of a second, half
/// the rate of cheap calls a server takes from a caller by default
/// (`cheap-calls-per-second`, 20). Pushed as fast as commits came, a
/// validator committing more than 20 a second had most of its pushes
/// refused, each ending its push until the next commit.
pub(super) const PUSH_INTERVAL: Duration = Duration::from_millis(100);

/// Pushes the highest commit `advertised` reads, as it reads when each
/// push is sent, then waits `gap` and pushes again if it rose meanwhile:
/// a height that rose while a push was on its way, or during the wait,
/// still reaches the peer, at most one push per `gap`. Ends a `gap` after
/// the first push that fails (`push` returns false), or once a wait saw
/// no rise; while it runs, the caller starts no other for that peer.
pub(super) async fn paced_pushes<F, Fut>(
    mut advertised: watch::Receiver<Availability>,
    gap: Duration,
    mut push: F,
) where
    F: FnMut(CommitIndex) -> Fut,
    Fut: Future<Output = bool>,
{
    let mut sent = 0;
    loop {
        let index = advertised.borrow_and_update().highest;
        if index <= sent {
            return;
        }
        let pushed = push(index).await;
        // After a failure too: a task started at the next commit must not
        // push at once, faster than the pace.
        tokio::time::sleep(gap).await;
        if !pushed {
            return;
        }
        sent = index;
    }
}

/// `peer`'s availability, as PeerHeights takes it; `None` if it does not
/// answer, or answers with something that is not one.
async fn availability(outbound: &Outbound, peer: PeerId) -> Option<UpdateHeight> {
    let message = proto::GetCommitAvailabilityRequest {};
    let response = outbound.call(peer, message, ask_availability).await.ok()?;
    let a = Availability::try_from(response.get_ref()).ok()?;
    Some(UpdateHeight {
        peer,
        chain_id: a.chain_id,
        highest: a.highest,
        lowest: a.lowest,
    })
}

/// A commit fetch's `failure`, given the cap its answer was decoded with
/// and whether that cap was the core's estimate: tonic refuses a message
/// over the cap as OUT_OF_RANGE, and over an estimate that is
/// [`Failure::OverBudget`], no fault of the peer's (it is asked again with
/// the most an answer may be). It ranks the peer lower all the same
/// ([`Transfer::Late`]), since a peer can send that status itself.
fn over_cap(failure: Failure, (max_bytes, estimated): (u64, bool)) -> Failure {
    match failure {
        Failure::Status { code } if estimated && code == tonic::Code::OutOfRange as i32 => {
            Failure::OverBudget {
                received: max_bytes.saturating_add(1),
                max: max_bytes,
                held_blocks: 0,
                held_bytes: 0,
            }
        }
        failure => failure,
    }
}

/// Counts and logs archive data that verification refused, and forgets
/// the archived batch it came from, the one holding commit `read` (the
/// index the reader looked up: a sync batch may span archived batches),
/// so the next attempt reads the archive again.
fn refused_by<T>(archive: &ArchiveReader, read: CommitIndex, result: &Result<T, Failure>) {
    if let Err(Failure::Invalid(e)) = result {
        tracing::warn!(read, %e, "archived data refused: the archive is corrupt or forged");
        archive.refused(read);
    }
}

/// Blocks as they arrive, judged by the digest of their bytes: the first
/// block not asked for or repeated, or past `max_bytes`, ends the intake.
/// Nothing is decoded or signature-checked before every block asked for
/// is in; the digests go on with the bytes.
struct Intake {
    expected: ExpectedBlocks,
    blobs: Vec<HashedBlob>,
    bytes: u64,
    max_bytes: u64,
}

impl Intake {
    fn new(refs: &[BlockRef], max_bytes: u64) -> Self {
        Intake {
            expected: ExpectedBlocks::from_refs(refs.iter().copied()),
            blobs: Vec::with_capacity(refs.len()),
            bytes: 0,
            max_bytes,
        }
    }

    /// Takes `blob`, judged by its digest before its size: a blob asked
    /// for by no digest (or repeated) is a lie whatever its size. Judged
    /// by its size first, junk one byte past the cap passed for a block
    /// asked for that did not fit, which only splits the chunk and holds
    /// nothing against the peer.
    fn accept(&mut self, blob: bytes::Bytes) -> Result<(), Failure> {
        let blob = HashedBlob::new(blob);
        self.expected
            .accept_digest(blob.digest())
            .map_err(Failure::Invalid)?;
        let held_bytes = self.bytes;
        self.bytes += blob.bytes().len() as u64;
        if self.bytes > self.max_bytes {
            return Err(Failure::OverBudget {
                received: self.bytes,
                max: self.max_bytes,
                held_blocks: self.blobs.len(),
                held_bytes,
            });
        }
        self.blobs.push(blob);
        Ok(())
    }

    /// Whether every block asked for is in.
    fn complete(&self) -> bool {
        self.expected.missing_count() == 0
    }

    /// The blocks, once every one asked for is in.
    fn finish(self) -> Result<Vec<HashedBlob>, Failure> {
        self.expected.finish().map_err(Failure::Invalid)?;
        Ok(self.blobs)
    }
}

/// Reads a FetchBlocks stream (a [`tonic::Streaming`]) through an
/// [`Intake`]: the stream is cut where the intake ends. A NOT_FOUND after
/// some blocks is [`Failure::BlocksWithheld`]; any other status error of
/// the stream is the call's failure (the outer `Result`).
async fn receive_blocks<S>(
    stream: &mut S,
    refs: &[BlockRef],
    max_bytes: u64,
) -> Result<Result<Vec<HashedBlob>, Failure>, tonic::Status>
where
    S: futures::Stream<Item = Result<proto::FetchBlocksResponse, tonic::Status>> + Unpin,
{
    let mut intake = Intake::new(refs, max_bytes);
    loop {
        let chunk = match stream.next().await {
            Some(Ok(chunk)) => chunk,
            None => return Ok(intake.finish()),
            // Every block came, then NOT_FOUND: nothing is missing.
            Some(Err(status)) if status.code() == tonic::Code::NotFound && intake.complete() => {
                return Ok(intake.finish());
            }
            Some(Err(status)) if status.code() == tonic::Code::NotFound => {
                let held = intake.blobs.len();
                // Judged against the peer's claim by the caller.
                let claimed = false;
                return Ok(Err(Failure::BlocksWithheld { held, claimed }));
            }
            Some(Err(status)) => return Err(status),
        };
        for blob in chunk.blocks {
            if let Err(f) = intake.accept(blob) {
                return Ok(Err(f));
            }
        }
    }
}

/// Whether a commit answer holds all the `asked` commits: only such an
/// answer from a hedge beats the first peer asked.
fn whole_commit_answer(response: &proto::FetchCommitsResponse, asked: u64) -> bool {
    u64::try_from(response.commits.len()).unwrap_or(u64::MAX) >= asked
}

/// Certifier blocks a commit answer may carry before anything is checked:
/// more than any committee's quorum (the Verifier holds the answer to the
/// expected committee's size).
const MAX_CERTIFIER_BLOCKS: usize = 1_024;

/// A commit answer of at most `asked` commits, refused before it is kept
/// if it has more entries than could be valid: each costs a `Bytes` in
/// memory however short it is on the wire. (What the entries hold is no
/// more than they count: the codec copies each out of the received
/// message, `soma_wire::codec::decode_copying`.)
fn kept(
    response: proto::FetchCommitsResponse,
    asked: u64,
) -> Result<proto::FetchCommitsResponse, Failure> {
    let commits = response.commits.len();
    if u64::try_from(commits).unwrap_or(u64::MAX) > asked {
        return Err(Failure::Invalid(soma_types::Error::BatchTooLong {
            len: commits,
            limit: usize::try_from(asked).unwrap_or(usize::MAX),
        }));
    }
    let certifiers = response.certifier_blocks.len();
    if certifiers > MAX_CERTIFIER_BLOCKS {
        return Err(Failure::Invalid(soma_types::Error::TooManyCertifiers {
            count: certifiers,
            limit: MAX_CERTIFIER_BLOCKS,
        }));
    }
    Ok(response)
}

/// A Verifier refusal as a failure: only a broken rule is the peer's doing.
fn verify_failure(error: VerifyError) -> Failure {
    match error {
        VerifyError::Invalid(e) => Failure::Invalid(e),
        VerifyError::UnknownEpoch(e) => {
            tracing::warn!(epoch = e, "the verifier holds no committee of this epoch");
            Failure::Local(LocalFailure::UnknownEpoch(e))
        }
        VerifyError::Busy { .. } => Failure::Local(LocalFailure::VerifierBusy),
        VerifyError::Stopped | VerifyError::Internal => {
            Failure::Local(LocalFailure::VerifierUnavailable)
        }
    }
}

pub(super) fn to_usize(bytes: u64) -> usize {
    usize::try_from(bytes).unwrap_or(usize::MAX)
}

/// Tasks on the runtime, one per peer at most at a time, and at most
/// `most` in all: a peer that never answers holds up only its own next
/// call, not the calls to any other peer.
struct PerPeer {
    set: JoinSet<()>,
    /// The task on its way to each peer, by peer and by task.
    by_peer: HashMap<PeerId, tokio::task::Id>,
    by_task: HashMap<tokio::task::Id, PeerId>,
    most: usize,
}

impl PerPeer {
    fn new(most: usize) -> Self {
        PerPeer {
            set: JoinSet::new(),
            by_peer: HashMap::new(),
            by_task: HashMap::new(),
            most,
        }
    }

    /// Runs `call` to `peer`, unless a call to it is on its way (skipped:
    /// the caller repeats it later) or `most` are (dropped, counted).
    fn spawn(
        &mut self,
        peer: PeerId,
        call: impl Future<Output = ()> + Send + 'static,
        runtime: &tokio::runtime::Handle,
    ) {
        while let Some(ended) = self.set.try_join_next_with_id() {
            let id = ended.map_or_else(|e| e.id(), |(id, ())| id);
            if let Some(peer) = self.by_task.remove(&id) {
                self.by_peer.remove(&peer);
            }
        }
        if self.by_peer.contains_key(&peer) {
            return;
        }
        if self.set.len() >= self.most {
            return dropped::count(Droppable::PeerCall);
        }
        let id = self.set.spawn_on(call, runtime).id();
        self.by_peer.insert(peer, id);
        self.by_task.insert(id, peer);
    }

    /// Peers with a call on its way.
    #[cfg(test)]
    fn peers(&self) -> usize {
        self.by_peer.len()
    }

    fn abort_all(&mut self) {
        self.set.abort_all();
        self.by_peer.clear();
        self.by_task.clear();
    }
}

/// Every task StateSync runs on the runtime, aborted together on a
/// restart and when the actor is dropped (a worker's fetch slot is
/// released as it drops), but the judgements of denials
/// ([`Worker::judge_denial`]), which outlive the worker that spawned them
/// on purpose (at most one per fetch slot held, each ending within a
/// commit hedge delay and PeerHeights' answer): sync workers by task;
/// height queries and commit pushes, each one task per peer and at most
/// one per peer at a time ([`PerPeer`]), at most `most_queries` and
/// `most_pushes` of each. A query or push to a peer whose last one is
/// still on its way is skipped: a peer that never answers (a silent one
/// holds its call for the whole timeout) holds up only its own next one,
/// never a round's queries to the other peers. The next round asks it
/// again; for a push, the one on its way, or the next, or the peer's
/// height queries, bring it a height.
pub(super) struct Tasks {
    workers: HashMap<TaskId, AbortHandle>,
    queries: PerPeer,
    pushes: PerPeer,
    runtime: tokio::runtime::Handle,
}

impl Tasks {
    pub(super) fn new(
        most_queries: usize,
        most_pushes: usize,
        runtime: tokio::runtime::Handle,
    ) -> Self {
        Tasks {
            workers: HashMap::new(),
            queries: PerPeer::new(most_queries),
            pushes: PerPeer::new(most_pushes),
            runtime,
        }
    }

    /// Runs a worker under its supervisor's watch: a panic becomes
    /// [`Failure::Panicked`] for the core to restart, and the outcome goes
    /// to `addr` as `done` makes it.
    pub(super) fn worker<T, M, A>(
        &mut self,
        task: TaskId,
        work: impl Future<Output = Outcome<T>> + Send + 'static,
        addr: Addr<A>,
        done: impl FnOnce(Outcome<T>) -> M + Send + 'static,
    ) where
        T: Send + 'static,
        M: actix::Message<Result = ()> + Send + 'static,
        A: actix::Handler<M>,
        A::Context: actix::dev::ToEnvelope<A, M>,
    {
        let handle = self.runtime.spawn(async move {
            let outcome = AssertUnwindSafe(work)
                .catch_unwind()
                .await
                .unwrap_or((None, Err(Failure::Panicked)));
            addr.do_send(done(outcome));
        });
        self.workers.insert(task, handle.abort_handle());
    }

    /// A worker ended: it is no longer tracked.
    pub(super) fn ended(&mut self, task: TaskId) {
        self.workers.remove(&task);
    }

    /// Runs `query` of `peer`'s height, unless one is on its way.
    pub(super) fn query(&mut self, peer: PeerId, query: impl Future<Output = ()> + Send + 'static) {
        self.queries.spawn(peer, query, &self.runtime);
    }

    /// Runs `push` to `peer`, unless one is on its way (which carries a
    /// newer height itself: [`PeerCalls::push_commits`]).
    pub(super) fn push_to(
        &mut self,
        peer: PeerId,
        push: impl Future<Output = ()> + Send + 'static,
    ) {
        self.pushes.spawn(peer, push, &self.runtime);
    }

    /// Aborts every task.
    pub(super) fn abort_all(&mut self) {
        for (_, worker) in self.workers.drain() {
            worker.abort();
        }
        self.queries.abort_all();
        self.pushes.abort_all();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// A call that counts itself in `count` and, if `forever`, never
    /// ends (a peer that never answers).
    fn call(count: &Arc<AtomicUsize>, forever: bool) -> impl Future<Output = ()> + use<> {
        let count = count.clone();
        async move {
            count.fetch_add(1, Ordering::SeqCst);
            if forever {
                std::future::pending::<()>().await;
            }
        }
    }

    /// Runs `set`'s tasks until only `left` are on their way (the rest end
    /// within a few turns of the runtime; a bound on the turns makes a
    /// task that never ends a failure, not a hang).
    async fn until_left(set: &mut PerPeer, left: usize) {
        for _ in 0..1_000 {
            if set.set.len() <= left {
                return;
            }
            tokio::task::yield_now().await;
            while let Some(ended) = set.set.try_join_next_with_id() {
                let peer = set.by_task.remove(&ended.unwrap().0).unwrap();
                set.by_peer.remove(&peer);
            }
        }
        panic!("{} calls on their way, not {left}", set.set.len());
    }

    /// A validator committing every 10 ms pushes to a peer once per
    /// [`PUSH_INTERVAL`], each push the height as it then is, the last one
    /// its last height; a failed push ends the pushes.
    #[tokio::test(start_paused = true)]
    async fn pushes_to_a_peer_are_paced_and_its_last_height_reaches_it() {
        let height = |highest| Availability {
            chain_id: soma_types::ChainId(soma_types::Digest([0; 32])),
            highest,
            lowest: 0,
        };
        let (rises, advertised) = watch::channel(height(1));
        let start = tokio::time::Instant::now();
        let pushed: Arc<std::sync::Mutex<Vec<(u128, u64)>>> = Arc::default();
        let record = pushed.clone();
        let pushes = tokio::spawn(paced_pushes(advertised, PUSH_INTERVAL, move |index| {
            record
                .lock()
                .unwrap()
                .push((start.elapsed().as_millis(), index));
            async { true }
        }));
        // New commits at 5, 15, ..., 995 ms: heights 2 to 101.
        tokio::time::sleep(Duration::from_millis(5)).await;
        for highest in 2..=101 {
            rises.send_modify(|a| a.highest = highest);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        pushes.await.unwrap();
        let expected: Vec<(u128, u64)> = (0..=10).map(|k| (k * 100, k as u64 * 10 + 1)).collect();
        assert_eq!(*pushed.lock().unwrap(), expected);

        // A failed push ends the pushes, a pace after it: the next task
        // for that peer cannot push sooner.
        let (_rises, advertised) = watch::channel(height(7));
        let tried = Arc::new(AtomicUsize::new(0));
        let count = tried.clone();
        let start = tokio::time::Instant::now();
        paced_pushes(advertised, PUSH_INTERVAL, move |_| {
            count.fetch_add(1, Ordering::SeqCst);
            async { false }
        })
        .await;
        assert_eq!(tried.load(Ordering::SeqCst), 1);
        assert_eq!(start.elapsed(), PUSH_INTERVAL);
    }

    #[tokio::test]
    async fn a_push_to_a_peer_waits_for_its_last_and_holds_up_no_other() {
        let mut tasks = Tasks::new(1, 8, tokio::runtime::Handle::current());
        let peer = |n| PeerId([n; 32]);
        let (stuck, pushed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        // Peer 1 never answers: its next pushes are skipped, and peer 2
        // is pushed every time, each push after the one before ended.
        for _ in 0..5 {
            tasks.push_to(peer(1), call(&stuck, true));
            tasks.push_to(peer(2), call(&pushed, false));
            until_left(&mut tasks.pushes, 1).await;
        }
        assert_eq!(stuck.load(Ordering::SeqCst), 1);
        assert_eq!(pushed.load(Ordering::SeqCst), 5);
        assert_eq!(tasks.pushes.peers(), 1);
        tasks.abort_all();
        assert_eq!(tasks.pushes.peers(), 0);
        tasks.push_to(peer(1), call(&stuck, false));
        assert_eq!(tasks.pushes.peers(), 1);
    }

    #[tokio::test]
    async fn a_silent_peer_holds_up_only_its_own_next_height_query() {
        // Eight connected peers, room for a query to each (the connections
        // held at most), and peer 1 never answers: each round asks the
        // seven others, and peer 1 once in all. (When a round was one task
        // waiting for all its queries, each round lasted a call timeout,
        // and past the rounds allowed at once they were dropped whole.)
        let peers = 8;
        let mut tasks = Tasks::new(peers, 8, tokio::runtime::Handle::current());
        let peer = |n| PeerId([n; 32]);
        let silent = Arc::new(AtomicUsize::new(0));
        let answered: Vec<Arc<AtomicUsize>> =
            (0..peers).map(|_| Arc::new(AtomicUsize::new(0))).collect();
        let rounds = 10;
        for _ in 0..rounds {
            // A round asks every peer at once, as the actor does.
            tasks.query(peer(1), call(&silent, true));
            for n in 2..=peers {
                tasks.query(peer(n as u8), call(&answered[n - 1], false));
            }
            until_left(&mut tasks.queries, 1).await;
        }
        assert_eq!(silent.load(Ordering::SeqCst), 1);
        for n in 2..=peers {
            assert_eq!(answered[n - 1].load(Ordering::SeqCst), rounds, "peer {n}");
        }
        assert_eq!(tasks.queries.peers(), 1);
    }

    #[test]
    fn only_an_answer_of_all_that_was_asked_is_whole() {
        let answer = |commits: usize| proto::FetchCommitsResponse {
            commits: vec![bytes::Bytes::from_static(b"c"); commits],
            certifier_blocks: Vec::new(),
        };
        let beats = |commits, asked| whole_commit_answer(&answer(commits), asked);
        assert!(beats(200, 200));
        // One commit of 200 (an answer may end early at any commit its
        // server can certify): a part, held while the first call has its
        // own peer's time, and beating it only after.
        assert!(!beats(1, 200));
        assert!(!beats(199, 200));
    }

    #[test]
    fn only_an_estimated_caps_out_of_range_is_over_budget() {
        let out_of_range = Failure::Status {
            code: tonic::Code::OutOfRange as i32,
        };
        // tonic's status for an answer over the decoding cap (checked over
        // the network by `fetch_budget`'s test).
        assert_eq!(
            over_cap(out_of_range.clone(), (300_000, true)),
            Failure::OverBudget {
                received: 300_001,
                max: 300_000,
                held_blocks: 0,
                held_bytes: 0,
            }
        );
        // Over the most an answer may be: the peer's fault, as sent.
        assert_eq!(
            over_cap(out_of_range.clone(), (300_000, false)),
            out_of_range
        );
        let other = Failure::Status {
            code: tonic::Code::Internal as i32,
        };
        assert_eq!(over_cap(other.clone(), (300_000, true)), other);
        assert_eq!(
            over_cap(Failure::Timeout, (300_000, true)),
            Failure::Timeout
        );
    }

    type Received = Result<Result<Vec<HashedBlob>, Failure>, tonic::Status>;

    /// The blocks of commits 1 and 2 of a chain, as bytes, and their refs.
    fn two_commits_blocks() -> (Vec<bytes::Bytes>, Vec<BlockRef>) {
        let chain = soma_chain::ChainBuilder::new(soma_chain::ChainConfig::validators(4)).build(2);
        (1..=2)
            .flat_map(|i| chain.blocks_of(i))
            .map(|b| (b.serialized().clone(), b.reference()))
            .unzip()
    }

    /// What [`receive_blocks`] makes of a stream of `messages` (each a
    /// list of indices into [`two_commits_blocks`]) ending with `end`
    /// (none: the stream ends cleanly), asked for every one of the blocks.
    async fn received(messages: &[&[usize]], end: Option<tonic::Status>) -> Received {
        let (blocks, refs) = two_commits_blocks();
        let mut items: Vec<Result<proto::FetchBlocksResponse, tonic::Status>> = messages
            .iter()
            .map(|m| {
                let blocks = m.iter().map(|i| blocks[*i].clone()).collect();
                Ok(proto::FetchBlocksResponse { blocks })
            })
            .collect();
        items.extend(end.map(Err));
        receive_blocks(&mut futures::stream::iter(items), &refs, u64::MAX).await
    }

    #[tokio::test]
    async fn a_block_stream_is_taken_whole_whatever_status_ends_it() {
        let not_found = || Some(tonic::Status::not_found("no more"));
        let n = two_commits_blocks().1.len();
        assert!(n >= 4, "{n}");
        let every: Vec<usize> = (0..n).collect();
        // Every block, then the end of the stream or NOT_FOUND: complete.
        for end in [None, not_found()] {
            let blobs = received(&[&every[..2], &every[2..]], end).await;
            assert_eq!(blobs.unwrap().unwrap().len(), n);
        }
        // Some, then NOT_FOUND: withheld after what came.
        assert_eq!(
            received(&[&every[..3]], not_found()).await.unwrap(),
            Err(Failure::BlocksWithheld {
                held: 3,
                claimed: false
            })
        );
        // Some, then a clean end: blocks missing, invalid.
        let result = received(&[&every[..3]], None).await;
        assert!(matches!(result, Ok(Err(Failure::Invalid(_)))), "{result:?}");
        // Any other status is the call's failure.
        let result = received(&[&every[..1]], Some(tonic::Status::internal("x"))).await;
        assert_eq!(result.unwrap_err().code(), tonic::Code::Internal);
        // A block repeated ends the intake, whatever follows.
        let result = received(&[&[0, 0]], not_found()).await;
        assert!(matches!(result, Ok(Err(Failure::Invalid(_)))), "{result:?}");
    }

    #[tokio::test]
    async fn a_stream_cut_at_the_cap_counts_only_the_blocks_asked_for_that_came_whole() {
        let (blocks, refs) = two_commits_blocks();
        let len = |i: usize| blocks[i].len() as u64;
        let cut = |items: Vec<bytes::Bytes>, max_bytes: u64| {
            let refs = refs.clone();
            async move {
                let items = vec![Ok(proto::FetchBlocksResponse { blocks: items })];
                receive_blocks(&mut futures::stream::iter(items), &refs, max_bytes)
                    .await
                    .unwrap()
            }
        };
        // Room for two blocks and part of a third.
        let max = len(0) + len(1) + len(2) / 2;
        assert_eq!(
            cut(blocks[..3].to_vec(), max).await,
            Err(Failure::OverBudget {
                received: len(0) + len(1) + len(2),
                max,
                held_blocks: 2,
                held_bytes: len(0) + len(1),
            })
        );
        // A blob asked for by no digest, past the cap at once: a lie, not
        // a block too large for the budget (which would only split the
        // chunk and hold nothing against the peer).
        let junk = bytes::Bytes::from(vec![0u8; 10_000]);
        let result = cut(vec![junk], 5_000).await;
        assert!(
            matches!(
                result,
                Err(Failure::Invalid(soma_types::Error::UnrequestedBlock(_)))
            ),
            "{result:?}"
        );
        // A block asked for, repeated past the cap: a lie too.
        let result = cut(vec![blocks[0].clone(), blocks[0].clone()], len(0) + 1).await;
        assert!(matches!(result, Err(Failure::Invalid(_))), "{result:?}");
    }

    #[test]
    fn a_batch_is_sized_by_its_distinct_voting_certifiers_only() {
        let chain = soma_chain::ChainBuilder::new(soma_chain::ChainConfig::validators(4)).build(10);
        let voters = chain.certificate(10).to_vec();
        let voting_bytes: u64 = voters.iter().map(|b| b.serialized().len() as u64).sum();
        // Padded with a repeat of a voter and a block voting for nothing.
        let mut padded = voters.clone();
        padded.push(voters[0].clone());
        padded.push(chain.blocks_of(1)[0].clone());
        let data = BatchData::new(chain.commits()[..10].to_vec(), padded, 0);
        let info = data.info();
        assert_eq!(
            (info.certifier_blocks, info.certifier_bytes),
            (voters.len(), voting_bytes)
        );
    }

    #[test]
    fn a_chunk_is_leased_for_the_commits_that_name_its_blocks() {
        let chain = soma_chain::ChainBuilder::new(soma_chain::ChainConfig::validators(4)).build(10);
        let commits = chain.commits()[..10].to_vec();
        let counts: Vec<usize> = commits.iter().map(|c| c.commit().blocks.len()).collect();
        let data = BatchData::new(commits, Vec::new(), 0);
        let total: usize = counts.iter().sum();
        assert_eq!(data.commits_naming(0, total), (1, 10));
        // The first commit's blocks alone, then one block past them.
        assert_eq!(data.commits_naming(0, counts[0]), (1, 1));
        assert_eq!(data.commits_naming(0, counts[0] + 1), (1, 2));
        // The last block: the last commit's leader.
        assert_eq!(data.commits_naming(total - 1, 1), (10, 10));
        // Blocks of the third commit only.
        let third = counts[0] + counts[1];
        assert_eq!(data.commits_naming(third, counts[2]), (3, 3));
    }

    #[test]
    fn a_commit_answer_is_kept_only_with_entries_that_could_be_valid() {
        let message = bytes::Bytes::from(vec![7u8; 4_096]);
        let answer = |commits: usize, certifiers: usize| proto::FetchCommitsResponse {
            commits: vec![message.slice(0..10); commits],
            certifier_blocks: vec![message.slice(10..20); certifiers],
        };
        assert_eq!(kept(answer(3, 4), 3), Ok(answer(3, 4)));
        assert_eq!(
            kept(answer(4, 4), 3),
            Err(Failure::Invalid(soma_types::Error::BatchTooLong {
                len: 4,
                limit: 3
            }))
        );
        assert_eq!(
            kept(answer(0, MAX_CERTIFIER_BLOCKS + 1), 3),
            Err(Failure::Invalid(soma_types::Error::TooManyCertifiers {
                count: MAX_CERTIFIER_BLOCKS + 1,
                limit: MAX_CERTIFIER_BLOCKS
            }))
        );
    }

    #[test]
    fn not_found_for_blocks_is_left_to_the_core() {
        assert_eq!(block_transfer_of(&Failure::NotFound), Transfer::Withheld);
        let withheld = Failure::BlocksWithheld {
            held: 3,
            claimed: true,
        };
        assert_eq!(block_transfer_of(&withheld), Transfer::Withheld);
        assert_eq!(transfer_of(&withheld), Transfer::NotFound);
        assert_eq!(transfer_of(&Failure::NotFound), Transfer::NotFound);
        // Every other failure is told as for any fetch.
        assert_eq!(block_transfer_of(&Failure::Timeout), Transfer::Timeout);
        assert_eq!(block_transfer_of(&Failure::Transport), Transfer::Error);
    }

    #[test]
    fn only_peers_left_late_are_beaten_and_a_peer_asked_again_stays_left_only_if_late() {
        let peer = |i: u8| PeerId([i; 32]);
        let left = Left::default();
        left.leave(peer(1), false);
        left.leave(peer(2), true);
        left.leave(peer(3), true);
        // Left early, then late: late.
        left.leave(peer(1), true);
        left.leave(peer(4), false);
        // Asked again: one left early is no longer left; one left late
        // stays, and is beaten unless it answered or is beaten already.
        left.ask_again(peer(4));
        left.ask_again(peer(3));
        assert_eq!(left.peers(), vec![peer(1), peer(2), peer(3)]);
        assert_eq!(left.beaten_by(true, &[peer(3)]), vec![peer(1), peer(2)]);
        // Taken with the race.
        assert_eq!(left.peers(), vec![]);
        left.leave(peer(5), true);
        assert_eq!(left.beaten_by(false, &[]), vec![]);
        assert_eq!(left.peers(), vec![]);
        left.leave(peer(6), true);
        left.ask_again(peer(6));
        assert_eq!(left.beaten_by(true, &[]), vec![peer(6)]);
    }

    #[test]
    fn a_hedge_goes_on_alone_after_a_refusal_a_reset_or_a_denial_only() {
        let busy = Failure::Status {
            code: tonic::Code::ResourceExhausted as i32,
        };
        let unavailable = Failure::Status {
            code: tonic::Code::Unavailable as i32,
        };
        let withheld = Failure::BlocksWithheld {
            held: 0,
            claimed: true,
        };
        for failure in [&busy, &unavailable, &Failure::Transport, &Failure::NotFound] {
            assert!(goes_alone(failure, false), "{failure:?}");
            assert!(goes_alone(failure, true), "{failure:?}");
        }
        // A block denial only while no denier judged aside is taken: the
        // race judges one, and the core judges the first's otherwise.
        assert!(goes_alone(&withheld, false));
        assert!(!goes_alone(&withheld, true));
        // A timeout: the hedge has been out nearly as long. A lie: the
        // core reports it at once. Ours, or no peer's: nothing to go on.
        let lie = Failure::Invalid(soma_types::Error::InvalidPublicKey);
        let over = Failure::OverBudget {
            received: 10,
            max: 5,
            held_blocks: 0,
            held_bytes: 0,
        };
        let ours = Failure::Local(LocalFailure::VerifierBusy);
        for failure in [
            &Failure::Timeout,
            &lie,
            &over,
            &ours,
            &Failure::Disconnected,
        ] {
            assert!(!goes_alone(failure, false), "{failure:?}");
        }
    }
}
