//! Peers that lie: a gRPC server over mutual TLS that answers from a
//! [`Chain`] and breaks exactly the rule its [`Lie`] names.
//!
//! Tests start one or several beside honest nodes and check that sync
//! finishes from the honest ones, accepts nothing bad, and bans the liar.

use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use soma_chain::{Chain, corrupt};
use soma_types::{AuthorityIndex, BlockRef, ChainId, Digest, KeyPair, PeerId, batch_end};
use soma_wire::convert::Availability;
use soma_wire::proto::{self, p2p_server};
use soma_wire::tls::{self, AccessPolicy, NodeIdentity};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

/// How a byzantine peer lies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lie {
    /// A certifier block's signature flipped.
    ForgedCertifierSignature,
    /// A commit in the middle of the batch does not link to the one before.
    BrokenDigestChain,
    /// Certifier blocks below quorum stake.
    ShortCertificate,
    /// The first block of each answer edited after signing.
    WrongBlock,
    /// The last block of each answer left out.
    MissingBlock,
    /// A block nobody asked for added to each answer.
    ExtraBlock,
    /// Says it is on another chain.
    OtherChain,
    /// Answers GetCommitAvailability with a chain id of 64 KiB, far past
    /// what such an answer takes; honest otherwise.
    OversizedAvailability,
    /// Never answers a fetch.
    NeverAnswers,
    /// Repeats its block answer forever.
    StreamsForever,
    /// Honest, but answers every call after a long delay.
    Slow,
    /// Honest, but holds each fetch as long as it can without another
    /// peer's answer beating it: each hold that ends with the call still
    /// waiting makes the next one of its kind (commits, blocks) half as
    /// long again, each call dropped meanwhile (the node took another
    /// peer's answer) makes it two thirds as long; from 10 ms, at most
    /// 5 s. What it learns is the node's hedge delay, and each answer it
    /// gives just before it is a slow answer the node takes.
    Creeping,
    /// Honest, but answers each commit fetch with its first commit alone
    /// and its certificate (an answer may end early at any commit its
    /// server can certify).
    OneCommit,
    /// Honest commits; FetchBlocks sends half the blocks, then fails.
    CutsStreamMidway,
    /// Relays another validator's data, honest except for every block
    /// by this author: its signature forged.
    ForgesBlocksOf(AuthorityIndex),
    /// Likewise, with every block by this author edited after signing.
    TampersBlocksOf(AuthorityIndex),
    /// Likewise, with the author's certifier block forged too.
    ForgesCertificateOf(AuthorityIndex),
    /// Answers FetchCommits with well-formed commits that name the epoch
    /// `u64::MAX`; honest blocks.
    FutureEpoch,
    /// Holds the keys of every retired committee: asked for a range that
    /// an epoch's end falls just before or inside (not at its last
    /// commit), it answers with the true commits up to that end, then
    /// commits that continue the ended epoch up to the last one asked for
    /// (a batch at most), the last certified by a quorum of that epoch's
    /// keys, each naming a new block of that epoch, a copy of the ended
    /// commit's leader, which carries the epoch's end (so applying one
    /// would install a second next committee). Nobody serves those blocks,
    /// and honest peers answer NOT_FOUND for them. Where epochs are shorter
    /// than the continuation, the true commits after it are of an epoch
    /// two or more ahead. Honest otherwise.
    RetiredCommittee,
    /// Answers FetchBlocks with endless chunks of one block-sized blob that
    /// nobody asked for; honest commits.
    FloodsBlocks,
    /// As [`Lie::FloodsBlocks`], each blob one byte longer: past the bytes
    /// a node accepts for one block fetch, though within its largest
    /// message, so that it could pass for a block asked for that did not
    /// fit.
    FloodsBlocksPastBudget,
    /// Serves the chain honestly, each block fetch after a short hold, but
    /// answers a FetchBlocks asking for any block a [`Lie::NeverAnswers`]
    /// peer of its pair was asked for with one blob nobody asked for: it
    /// spoils the hedges of the fetches the silent peer holds, and is
    /// never asked first for what it spoils ([`serve_spoiling_hedges`]).
    SpoilsHedges,
    /// Serves the chain honestly, blocks at once, but holds every commit
    /// fetch unanswered until it is opened ([`Served::open`]); the fetches
    /// it holds or serves are shared with the [`Lie::SpoilsCommitHedges`]
    /// peer of its pair. (Holding block fetches too, it could hold its
    /// one fetch slot with a block fetch, and never a commit fetch.)
    HoldsCommitsUntilOpened,
    /// Claims the chain, holds every commit fetch unanswered until it is
    /// opened ([`Served::open`]), then refuses it with this status, as it
    /// refuses every other fetch at once: it fails a fetch only after the
    /// node had time to hedge it, and proves no lie.
    HoldsCommitsThenRefuses(tonic::Code),
    /// Serves the chain honestly and at once, except to a fetch its
    /// [`Lie::HoldsCommitsUntilOpened`] pair holds or serves, that is, to
    /// a hedge of it: a commit fetch then gets a certifier block with a
    /// forged signature, and a block fetch a refusal as busy, so that none
    /// of its hedges wins honestly ([`serve_spoiling_commit_hedges`]).
    SpoilsCommitHedges,
    /// Holds every block fetch unanswered until it is opened
    /// ([`Served::open`]), then serves the chain honestly; the blocks it
    /// was asked for are shared with the [`Lie::WithholdsHedgedBlocks`]
    /// peer of its pair.
    HoldsBlocksUntilOpened,
    /// Serves and claims the chain, commits at once, but holds every block
    /// fetch unanswered until it is opened ([`Served::open`]), then refuses
    /// it with this status, as it refuses every later block fetch at once:
    /// it fails a block fetch only after the node had time to hedge it,
    /// and proves no lie.
    HoldsBlocksThenRefuses(tonic::Code),
    /// Serves and claims the chain, commits at once, but holds every block
    /// fetch unanswered until it is opened ([`Served::open`]), then answers
    /// it, and every later block fetch at once, with one blob nobody asked
    /// for: a provable lie, told only after the node had time to hedge.
    HoldsBlocksThenSpoils,
    /// Serves the chain honestly and claims all of it, but answers
    /// NOT_FOUND to a block fetch asking for blocks its
    /// [`Lie::HoldsBlocksUntilOpened`] pair was asked for, that is, to a
    /// hedge of a fetch that peer holds ([`serve_withholding_hedges`]):
    /// it denies blocks only in hedges.
    WithholdsHedgedBlocks,
    /// Serves the chain honestly and claims all of it, but answers
    /// NOT_FOUND to a commit fetch its [`Lie::HoldsCommitsUntilOpened`]
    /// pair holds, that is, to a hedge of it ([`serve_denying_commit_hedges`]);
    /// from its first denial on, it answers height queries only after
    /// [`DENIER_QUERY_DELAY`].
    DeniesCommitHedges,
    /// Sends every block it is asked for twice; honest commits.
    RepeatsBlocks,
    /// Claims to hold a million commits more than the chain has, and
    /// answers NOT_FOUND to every fetch.
    ClaimsHeight,
    /// Claims as [`Lie::ClaimsHeight`] does, but refuses every fetch with
    /// this status, which proves no lie (RESOURCE_EXHAUSTED: busy;
    /// UNAVAILABLE), so it is never banned.
    ClaimsHeightRefusing(tonic::Code),
    /// Claims the chain and answers every commit fetch NOT_FOUND; from its
    /// first denial on, it holds every height query unanswered until it
    /// is opened ([`Served::open`]): it stalls the question that asks its
    /// claim afresh.
    DeniesCommitsThenHoldsHeights,
    /// Claims as [`Lie::ClaimsHeight`] does, and never answers a fetch.
    ClaimsHeightSilent,
    /// Claims the chain, as an honest peer does, and refuses every fetch
    /// with this status, which proves no lie.
    Refuses(tonic::Code),
    /// Serves the chain honestly, and claims as [`Lie::ClaimsHeight`]
    /// does, refusing every fetch past the chain's tip as busy
    /// (RESOURCE_EXHAUSTED): a peer that has delivered, and whose each
    /// refusal looks like load.
    ServesThenClaimsHeightBusy,
    /// Not a lie: an honest node that prunes. Honest until it is first
    /// asked for blocks of this epoch or a later one; then it advertises
    /// a lowest commit past the chain's tip (it holds nothing) and
    /// answers that fetch and every later one NOT_FOUND at once, as a
    /// node does whose peers' view of it is staler than its `prune-grace`.
    PrunesAtBlocksOf(u64),
    /// The same, pruning when first asked for commits of this epoch or a
    /// later one.
    PrunesAtCommitsOf(u64),
    /// Claims every commit and serves them, but answers NOT_FOUND to
    /// every block fetch asking for a block of this epoch or a later one.
    WithholdsBlocksOf(u64),
    /// As [`Lie::WithholdsBlocksOf`], and from its first denial on it
    /// answers height queries claiming no commit (a highest of 0), to
    /// escape a judgement on what it claims when it is asked again.
    WithholdsBlocksThenDisclaims(u64),
    /// Claims no commit (a highest of 0), so a node that dials it pushes
    /// it every new height, and never answers a PushCommit (each one
    /// counted stalled while it waits).
    StallsPushes,
    /// Claims no commit, as [`Lie::StallsPushes`] does, and answers each
    /// PushCommit at once with [`PADDED_PUSH_ANSWER_BYTES`] of a field
    /// the answer does not have: well-formed (a decoder skips a field it
    /// does not know), where the answer takes no byte.
    PadsPushAnswers,
    /// Not a lie: an honest node whose fetch slots others fill at times.
    /// Honest until its [`Served::load`] is called; from then on it
    /// refuses every second commit fetch (the first one included) with
    /// RESOURCE_EXHAUSTED, as a node refuses when its slots are all held,
    /// and serves the rest.
    BusyWhenLoaded,
    /// Serves the chain honestly and answers its first height query
    /// (GetCommitAvailability: the check of a node dialling it), then
    /// holds every later one open until its client drops it. Each is
    /// counted in [`Served::height_queries`].
    SilentAfterFirstHeightQuery,
}

/// Bytes of each blob a [`Lie::FloodsBlocks`] peer sends: the largest
/// block, the most one FetchBlocks message carries.
pub const FLOOD_BLOB_BYTES: usize = 4 << 20;

/// How long a [`Lie::SpoilsHedges`] peer holds each block fetch it serves:
/// longer than a whole answer may take and still rank its peer good
/// ([`soma_actors::peer_heights::WHOLE_ANSWER_MS`]), so that its small
/// answers measure it slow and a peer never measured, the silent one, is
/// asked before it, as the test of its attack needs.
const SPOILER_HOLD: Duration =
    Duration::from_millis(soma_actors::peer_heights::WHOLE_ANSWER_MS + 100);

/// How long a [`Lie::DeniesCommitHedges`] peer takes to answer a height
/// query once it has denied a fetch.
pub const DENIER_QUERY_DELAY: Duration = Duration::from_secs(1);

/// Commits a [`Lie::ClaimsHeight`] peer claims beyond the chain's tip.
pub const CLAIMED_EXTRA_COMMITS: u64 = 1_000_000;

struct Evil {
    chain: Arc<Chain>,
    lie: Lie,
    /// Calls stalled right now (see [`serve_counting`]).
    stalled: Arc<AtomicUsize>,
    /// FetchCommits and FetchBlocks calls received.
    fetches: Arc<AtomicUsize>,
    /// FetchCommits calls received.
    commit_fetches: Arc<AtomicUsize>,
    /// FetchBlocks calls received.
    block_fetches: Arc<AtomicUsize>,
    /// Fetches answered NOT_FOUND for what it pruned or withholds.
    denied: Arc<AtomicUsize>,
    /// Whether a pruning peer has pruned (or a disclaiming one denied).
    pruned: AtomicBool,
    /// Whether a [`Lie::BusyWhenLoaded`] peer is loaded.
    loaded: Arc<AtomicBool>,
    /// Commit fetches received while loaded.
    loaded_commit_fetches: AtomicUsize,
    /// GetCommitAvailability calls received.
    height_queries: Arc<AtomicUsize>,
    /// A [`Lie::Creeping`] peer's next hold of a commit fetch and of a
    /// block fetch, in milliseconds.
    creep_ms: [AtomicU64; 2],
    /// The index of each PushCommit received, in order.
    pushes: Arc<Mutex<Vec<u64>>>,
    /// What the first peer of a pair holds, shared with its spoiler.
    held: Arc<Held>,
}

/// What the first peer of a pair ([`Lie::NeverAnswers`],
/// [`Lie::HoldsCommitsUntilOpened`]) was asked for or holds, shared with
/// the spoiler of its pair ([`serve_spoiling_hedges`],
/// [`serve_spoiling_commit_hedges`]).
struct Held {
    /// Blocks it was asked for (a [`Lie::HoldsCommitsUntilOpened`] peer
    /// serves them: only a hedge asks for them again).
    blocks: Mutex<HashSet<BlockRef>>,
    /// Where the commit fetches a [`Lie::HoldsCommitsUntilOpened`] peer
    /// holds start, with how many of its calls hold each.
    commits: Mutex<HashMap<u64, usize>>,
    /// Whether a [`Lie::HoldsCommitsUntilOpened`] peer answers.
    opened: tokio::sync::watch::Sender<bool>,
    /// How long each height answer waits ([`serve_observed_slow_heights`]).
    height_delay: Duration,
}

impl Default for Held {
    fn default() -> Self {
        Held {
            blocks: Mutex::default(),
            commits: Mutex::default(),
            opened: tokio::sync::watch::channel(false).0,
            height_delay: Duration::ZERO,
        }
    }
}

impl Held {
    fn was_asked_for(&self, mut refs: impl Iterator<Item = BlockRef>) -> bool {
        let blocks = lock(&self.blocks);
        refs.any(|r| blocks.contains(&r))
    }

    fn holds_commits_from(&self, start: u64) -> bool {
        lock(&self.commits).contains_key(&start)
    }

    /// Holds a call asking for the commits from `start` until the peer is
    /// opened: they count as held until then, or until the caller drops
    /// the call.
    async fn until_opened(&self, start: u64) {
        let _holding = Holding { held: self, start };
        *lock(&self.commits).entry(start).or_default() += 1;
        let mut opened = self.opened.subscribe();
        // The sender lives as long as `self`.
        let _ = opened.wait_for(|open| *open).await;
    }
}

/// A [`Held::until_opened`] call under way: its start stops counting as
/// held when it ends.
struct Holding<'a> {
    held: &'a Held,
    start: u64,
}

impl Drop for Holding<'_> {
    fn drop(&mut self) {
        let mut commits = lock(&self.held.commits);
        if let Some(n) = commits.get_mut(&self.start) {
            *n -= 1;
            if *n == 0 {
                commits.remove(&self.start);
            }
        }
    }
}

/// The pushes seen, whatever a panicking holder left.
fn locked(m: &Mutex<Vec<u64>>) -> MutexGuard<'_, Vec<u64>> {
    lock(m)
}

/// `m`'s contents, whatever a panicking holder left.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A [`Lie::Creeping`] peer's first hold, and its longest.
const CREEP_FIRST_MS: u64 = 10;
const CREEP_MAX_MS: u64 = 5_000;

/// A [`Lie::Creeping`] hold under way: dropped before it is `kept`, the
/// call was dropped by the node, and the next hold is shorter.
struct Creep<'a> {
    next_ms: &'a AtomicU64,
    kept: bool,
}

impl Creep<'_> {
    fn scale(&self, times: u64, by: u64) {
        let ms = self.next_ms.load(Ordering::SeqCst) * times / by;
        let ms = ms.clamp(CREEP_FIRST_MS, CREEP_MAX_MS);
        self.next_ms.store(ms, Ordering::SeqCst);
    }
}

impl Drop for Creep<'_> {
    fn drop(&mut self) {
        if self.kept {
            self.scale(3, 2);
        } else {
            self.scale(2, 3);
        }
    }
}

/// Counts a stalled call while it lives: a call dropped by its client
/// (cancelled, its connection closed) stops counting.
struct Stalled(Arc<AtomicUsize>);

impl Stalled {
    fn new(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        Stalled(count.clone())
    }
}

impl Drop for Stalled {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

type BlockStream = Pin<Box<dyn Stream<Item = Result<proto::FetchBlocksResponse, Status>> + Send>>;

impl Evil {
    /// Holds a fetch (of commits if `commits`, else of blocks) as the lie
    /// says; a refusing liar refuses it here.
    async fn stall(&self, commits: bool) -> Result<(), Status> {
        let _stalled = Stalled::new(&self.stalled);
        match self.lie {
            Lie::NeverAnswers | Lie::ClaimsHeightSilent => std::future::pending::<()>().await,
            Lie::Slow => tokio::time::sleep(Duration::from_millis(1_500)).await,
            Lie::Creeping => {
                let next_ms = &self.creep_ms[usize::from(!commits)];
                let mut creep = Creep {
                    next_ms,
                    kept: false,
                };
                let hold = next_ms.load(Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(hold)).await;
                creep.kept = true;
            }
            Lie::ClaimsHeightRefusing(code)
            | Lie::Refuses(code)
            | Lie::HoldsCommitsThenRefuses(code) => {
                return Err(Status::new(code, "refused"));
            }
            Lie::HoldsBlocksThenRefuses(code) if !commits => {
                return Err(Status::new(code, "refused"));
            }
            _ => {}
        }
        Ok(())
    }

    /// Whether a loaded [`Lie::BusyWhenLoaded`] peer refuses this commit
    /// fetch (every second one), counted as denied.
    fn busy(&self) -> bool {
        if self.lie != Lie::BusyWhenLoaded || !self.loaded.load(Ordering::SeqCst) {
            return false;
        }
        let refused = (self.loaded_commit_fetches.fetch_add(1, Ordering::SeqCst)).is_multiple_of(2);
        if refused {
            self.denied.fetch_add(1, Ordering::SeqCst);
        }
        refused
    }

    /// Whether a fetch asking for data of `epochs` is denied, and counted
    /// so: a pruning peer prunes at the first it is meant to.
    fn denies(&self, commits: bool, mut epochs: impl Iterator<Item = u64>) -> bool {
        let denied = match self.lie {
            Lie::PrunesAtBlocksOf(first) | Lie::PrunesAtCommitsOf(first) => {
                let trigger = commits == matches!(self.lie, Lie::PrunesAtCommitsOf(_));
                if trigger && epochs.any(|e| e >= first) {
                    self.pruned.store(true, Ordering::SeqCst);
                }
                self.pruned.load(Ordering::SeqCst)
            }
            Lie::WithholdsBlocksOf(first) | Lie::WithholdsBlocksThenDisclaims(first) => {
                !commits && epochs.any(|e| e >= first)
            }
            _ => false,
        };
        if denied && matches!(self.lie, Lie::WithholdsBlocksThenDisclaims(_)) {
            self.pruned.store(true, Ordering::SeqCst);
        }
        if denied {
            self.denied.fetch_add(1, Ordering::SeqCst);
        }
        denied
    }

    /// The commit after the end of epoch `epoch` (commit `last`) as a
    /// retired committee would certify it: same epoch, linked to `last`,
    /// with `last`'s blocks and leader, voted for by re-signed certifiers.
    /// Commits `last + 1..=end` (a batch at most) continuing the epoch
    /// that ended at `last`, each naming one block of its own (the ended
    /// commit's leader, signed again with a later timestamp), the last
    /// certified by a quorum of the retired committee's keys. No one holds
    /// the blocks: not even this peer serves them.
    fn retired_continuation(&self, last: u64, end: u64) -> proto::FetchCommitsResponse {
        let chain = &self.chain;
        let ended = chain.commit(last);
        let epoch = ended.commit().epoch;
        let leader = chain.blocks_of(last).last().expect("a commit has a leader");
        let leader_key = chain
            .config()
            .protocol_key(epoch, leader.block().author.0 as usize);
        let count = end.saturating_sub(last).clamp(1, 100);
        let mut previous = ended.reference();
        let fakes: Vec<_> = (1..=count)
            .map(|i| {
                let block = corrupt::resign(leader, &leader_key, |b| b.timestamp_ms += i);
                let fake = corrupt::edit_commit(&ended.to_unverified(), |c| {
                    c.index = last + i;
                    c.previous_digest = previous.digest;
                    c.timestamp_ms += i;
                    c.leader = block.reference();
                    c.blocks = vec![block.reference()];
                });
                previous = fake.reference();
                fake
            })
            .collect();
        let certifiers: Vec<Bytes> = chain
            .certificate(last)
            .iter()
            .map(|b| {
                let key = chain
                    .config()
                    .protocol_key(epoch, b.block().author.0 as usize);
                corrupt::resign(b, &key, |block| {
                    block.commit_votes = vec![previous];
                })
                .serialized()
                .clone()
            })
            .collect();
        proto::FetchCommitsResponse {
            commits: fakes.iter().map(|c| c.serialized().clone()).collect(),
            certifier_blocks: certifiers,
        }
    }
}

#[tonic::async_trait]
impl p2p_server::P2p for Evil {
    async fn get_known_peers(
        &self,
        _: Request<proto::GetKnownPeersRequest>,
    ) -> Result<Response<proto::GetKnownPeersResponse>, Status> {
        Err(Status::unimplemented("liar"))
    }

    async fn get_commit_availability(
        &self,
        _: Request<proto::GetCommitAvailabilityRequest>,
    ) -> Result<Response<proto::GetCommitAvailabilityResponse>, Status> {
        let before = self.height_queries.fetch_add(1, Ordering::SeqCst);
        if !self.held.height_delay.is_zero() {
            tokio::time::sleep(self.held.height_delay).await;
        }
        if self.lie == Lie::SilentAfterFirstHeightQuery && before > 0 {
            let _stalled = Stalled::new(&self.stalled);
            std::future::pending::<()>().await;
        }
        if self.lie == Lie::DeniesCommitsThenHoldsHeights && self.denied.load(Ordering::SeqCst) > 0
        {
            let _stalled = Stalled::new(&self.stalled);
            let mut opened = self.held.opened.subscribe();
            // The sender lives as long as `self`.
            let _ = opened.wait_for(|open| *open).await;
        }
        if self.lie == Lie::DeniesCommitHedges && self.denied.load(Ordering::SeqCst) > 0 {
            // Asked afresh after its denial: slow to say what it holds.
            tokio::time::sleep(DENIER_QUERY_DELAY).await;
        }
        let chain_id = if self.lie == Lie::OtherChain {
            ChainId(Digest([0xee; 32]))
        } else {
            self.chain.chain_id()
        };
        let highest = match self.lie {
            Lie::ClaimsHeight
            | Lie::ClaimsHeightRefusing(_)
            | Lie::ClaimsHeightSilent
            | Lie::ServesThenClaimsHeightBusy => self.chain.tip() + CLAIMED_EXTRA_COMMITS,
            Lie::StallsPushes | Lie::PadsPushAnswers => 0,
            _ => self.chain.tip(),
        };
        if self.lie == Lie::OversizedAvailability {
            return Ok(Response::new(proto::GetCommitAvailabilityResponse {
                chain_id: vec![0xee; 64 << 10].into(),
                highest_synced_commit: highest,
                lowest_available_commit: 1,
            }));
        }
        let (lowest, highest) = match self.pruned.load(Ordering::SeqCst) {
            false => (1, highest),
            true if matches!(self.lie, Lie::WithholdsBlocksThenDisclaims(_)) => (1, 0),
            true => (highest + 1, highest),
        };
        Ok(Response::new(
            Availability {
                chain_id,
                highest,
                lowest,
            }
            .into(),
        ))
    }

    async fn get_commit_info(
        &self,
        _: Request<proto::GetCommitInfoRequest>,
    ) -> Result<Response<proto::GetCommitInfoResponse>, Status> {
        Ok(Response::new(proto::GetCommitInfoResponse { commit: None }))
    }

    async fn push_commit(
        &self,
        request: Request<proto::PushCommitRequest>,
    ) -> Result<Response<proto::PushCommitResponse>, Status> {
        locked(&self.pushes).push(request.get_ref().index);
        if self.lie == Lie::StallsPushes {
            let _stalled = Stalled::new(&self.stalled);
            std::future::pending::<()>().await;
        }
        Ok(Response::new(proto::PushCommitResponse {}))
    }

    async fn fetch_commits(
        &self,
        request: Request<proto::FetchCommitsRequest>,
    ) -> Result<Response<proto::FetchCommitsResponse>, Status> {
        self.fetches.fetch_add(1, Ordering::SeqCst);
        self.commit_fetches.fetch_add(1, Ordering::SeqCst);
        let start = request.get_ref().start;
        if matches!(
            self.lie,
            Lie::HoldsCommitsUntilOpened | Lie::HoldsCommitsThenRefuses(_)
        ) {
            let _stalled = Stalled::new(&self.stalled);
            self.held.until_opened(start).await;
        }
        let denies = match self.lie {
            Lie::DeniesCommitHedges => self.held.holds_commits_from(start),
            Lie::DeniesCommitsThenHoldsHeights => true,
            _ => false,
        };
        if denies {
            self.denied.fetch_add(1, Ordering::SeqCst);
            return Err(Status::not_found("commits not held"));
        }
        // A hedge of a fetch its pair holds: answered at once, forged.
        let spoiled = self.lie == Lie::SpoilsCommitHedges && self.held.holds_commits_from(start);
        self.stall(true).await?;
        if self.busy() {
            return Err(Status::resource_exhausted("every fetch slot is held"));
        }
        let r = request.into_inner();
        let chain = &self.chain;
        if self.lie == Lie::ServesThenClaimsHeightBusy && r.start > chain.tip() {
            return Err(Status::resource_exhausted("every fetch slot is held"));
        }
        if self.lie == Lie::ClaimsHeight || r.start > chain.tip() || r.start == 0 {
            return Err(Status::not_found("not held"));
        }
        let epochs = (r.start..=r.end.min(chain.tip())).map(|i| chain.commit(i).commit().epoch);
        if self.denies(true, epochs) {
            return Err(Status::not_found("not held"));
        }
        if self.lie == Lie::RetiredCommittee {
            // An epoch that ends just before the range or inside it, not at
            // its end.
            let ended = chain
                .committees()
                .filter_map(|c| chain.epoch_last(c.epoch()))
                .find(|&last| last + 1 >= r.start && last < r.end);
            if let Some(last) = ended {
                let mut answer = self.retired_continuation(last, r.end);
                // The true commits up to the end, then the forged ones, in
                // one batch.
                if last >= r.start {
                    let (commits, _) = chain.fetch_commits(r.start..=last);
                    let forged = std::mem::take(&mut answer.commits);
                    answer.commits = commits.iter().map(|c| c.serialized().clone()).collect();
                    answer.commits.extend(forged);
                }
                return Ok(Response::new(answer));
            }
        }
        let epoch = chain.commit(r.start).commit().epoch;
        let end = match self.lie {
            Lie::OneCommit => r.start,
            // A spoiled hedge answers all that was asked, so that it beats
            // the peer holding the fetch.
            _ if spoiled => batch_end(
                r.start,
                u64::MAX,
                chain.epoch_last(epoch),
                r.end.min(chain.tip()),
            ),
            _ => batch_end(r.start, 100, chain.epoch_last(epoch), chain.tip()).min(r.end),
        };
        let (mut commits, mut certifiers) = chain.fetch_commits(r.start..=end);
        let lie = if spoiled {
            Lie::ForgedCertifierSignature
        } else {
            self.lie
        };
        match lie {
            Lie::ForgedCertifierSignature => {
                certifiers[0] = corrupt::forge_signature(&certifiers[0].clone().into_trusted())
            }
            Lie::BrokenDigestChain if commits.len() > 1 => {
                commits = corrupt::break_link(&commits, commits.len() / 2)
            }
            Lie::ShortCertificate => {
                certifiers = corrupt::certificate_below_quorum(&certifiers, chain.committee_of(end))
            }
            Lie::ForgesCertificateOf(author) => {
                for certifier in &mut certifiers {
                    if certifier.block().author == author {
                        *certifier = corrupt::forge_signature(&certifier.clone().into_trusted());
                    }
                }
            }
            Lie::FutureEpoch => {
                commits = commits
                    .iter()
                    .map(|c| corrupt::edit_commit(c, |c| c.epoch = u64::MAX))
                    .collect();
            }
            _ => {}
        }
        Ok(Response::new(proto::FetchCommitsResponse {
            commits: commits.iter().map(|c| c.serialized().clone()).collect(),
            certifier_blocks: certifiers.iter().map(|b| b.serialized().clone()).collect(),
        }))
    }

    type FetchBlocksStream = BlockStream;

    async fn fetch_blocks(
        &self,
        request: Request<proto::FetchBlocksRequest>,
    ) -> Result<Response<BlockStream>, Status> {
        self.fetches.fetch_add(1, Ordering::SeqCst);
        self.block_fetches.fetch_add(1, Ordering::SeqCst);
        let asked = || {
            request
                .get_ref()
                .refs
                .iter()
                .filter_map(|r| BlockRef::try_from(r).ok())
        };
        let holds = matches!(
            self.lie,
            Lie::NeverAnswers | Lie::HoldsCommitsUntilOpened | Lie::HoldsBlocksUntilOpened
        );
        if holds {
            lock(&self.held.blocks).extend(asked());
        }
        let held_until_opened = matches!(
            self.lie,
            Lie::HoldsBlocksUntilOpened
                | Lie::HoldsBlocksThenRefuses(_)
                | Lie::HoldsBlocksThenSpoils
        );
        if held_until_opened {
            let _stalled = Stalled::new(&self.stalled);
            let mut opened = self.held.opened.subscribe();
            // The sender lives as long as `self`.
            let _ = opened.wait_for(|open| *open).await;
        }
        if self.lie == Lie::WithholdsHedgedBlocks && self.held.was_asked_for(asked()) {
            self.denied.fetch_add(1, Ordering::SeqCst);
            return Err(Status::not_found("block not held"));
        }
        if self.lie == Lie::SpoilsCommitHedges && self.held.was_asked_for(asked()) {
            return Err(Status::resource_exhausted("every fetch slot is held"));
        }
        let spoils = match self.lie {
            Lie::SpoilsHedges => self.held.was_asked_for(asked()),
            Lie::HoldsBlocksThenSpoils => true,
            _ => false,
        };
        if spoils {
            let chunk = proto::FetchBlocksResponse {
                blocks: vec![Bytes::from_static(b"spoiled")],
            };
            return Ok(Response::new(Box::pin(tokio_stream::iter([Ok(chunk)]))));
        }
        if self.lie == Lie::SpoilsHedges {
            // Busy a while with each block fetch it serves: with one fetch
            // per peer, the next goes to the silent peer.
            tokio::time::sleep(SPOILER_HOLD).await;
        }
        self.stall(false).await?;
        if self.lie == Lie::ClaimsHeight {
            return Err(Status::not_found("not held"));
        }
        let refs = request
            .get_ref()
            .refs
            .iter()
            .map(BlockRef::try_from)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if self.denies(false, refs.iter().map(|r| r.epoch)) {
            return Err(Status::not_found("not held"));
        }
        if matches!(self.lie, Lie::FloodsBlocks | Lie::FloodsBlocksPastBudget) {
            let past = usize::from(self.lie == Lie::FloodsBlocksPastBudget);
            let blob = Bytes::from(vec![0x5a; FLOOD_BLOB_BYTES + past]);
            let chunk = proto::FetchBlocksResponse { blocks: vec![blob] };
            let endless = tokio_stream::iter(std::iter::repeat(Ok(chunk)));
            return Ok(Response::new(Box::pin(endless)));
        }
        let all: std::collections::HashMap<BlockRef, Bytes> = (1..=self.chain.tip())
            .flat_map(|i| self.chain.blocks_of(i).iter())
            .map(|b| (b.reference(), b.serialized().clone()))
            .collect();
        let mut blocks = refs
            .iter()
            .map(|r| all.get(r).cloned())
            .collect::<Option<Vec<Bytes>>>()
            .ok_or_else(|| Status::not_found("block not held"))?;
        let stranger = self.chain.blocks_of(self.chain.tip())[0]
            .serialized()
            .clone();
        match self.lie {
            // These liars also lie about blocks, so nothing can be applied
            // from liars alone and each one is asked until caught.
            Lie::WrongBlock
            | Lie::ForgedCertifierSignature
            | Lie::BrokenDigestChain
            | Lie::ShortCertificate => blocks[0] = tamper(&blocks[0]),
            Lie::MissingBlock => {
                blocks.pop();
            }
            Lie::ForgesBlocksOf(author) | Lie::ForgesCertificateOf(author) => {
                for (r, b) in refs.iter().zip(&mut blocks) {
                    if r.author == author {
                        *b = forge(b);
                    }
                }
            }
            Lie::TampersBlocksOf(author) => {
                for (r, b) in refs.iter().zip(&mut blocks) {
                    if r.author == author {
                        *b = tamper(b);
                    }
                }
            }
            Lie::ExtraBlock => blocks.push(stranger),
            Lie::RepeatsBlocks => {
                blocks = blocks.into_iter().flat_map(|b| [b.clone(), b]).collect();
            }
            Lie::StreamsForever => {
                let chunk = proto::FetchBlocksResponse { blocks };
                let endless = tokio_stream::iter(std::iter::repeat(Ok(chunk)));
                return Ok(Response::new(Box::pin(endless)));
            }
            Lie::CutsStreamMidway => {
                let half = blocks.len() / 2;
                blocks.truncate(half.max(1));
                let parts = vec![
                    Ok(proto::FetchBlocksResponse { blocks }),
                    Err(Status::unavailable("connection reset")),
                ];
                return Ok(Response::new(Box::pin(tokio_stream::iter(parts))));
            }
            _ => {}
        }
        let chunk = proto::FetchBlocksResponse { blocks };
        Ok(Response::new(Box::pin(tokio_stream::iter(vec![Ok(chunk)]))))
    }
}

/// The block changed after signing: its digest is no longer the one a
/// commit names.
fn tamper(bytes: &Bytes) -> Bytes {
    let block = soma_types::VerifiedBlock::from_trusted_bytes(bytes.clone())
        .expect("the chain's own blocks decode");
    corrupt::tamper(&block, |b| b.timestamp_ms += 1)
        .serialized()
        .clone()
}

/// The block with its signature forged (so its digest changes too).
fn forge(bytes: &Bytes) -> Bytes {
    let block = soma_types::VerifiedBlock::from_trusted_bytes(bytes.clone())
        .expect("the chain's own blocks decode");
    corrupt::forge_signature(&block).serialized().clone()
}

/// Serves `lie` about `chain` over mutual TLS on 127.0.0.1, as the node
/// `KeyPair::from_seed([key; 32])`; returns its peer id and address. It
/// runs on the current tokio runtime until that runtime ends.
pub async fn serve(chain: Arc<Chain>, lie: Lie, key: u8) -> (PeerId, String) {
    let (peer, address, _) = serve_counting(chain, lie, key).await;
    (peer, address)
}

/// Like [`serve`], also returning how many calls are stalled at the
/// moment ([`Lie::NeverAnswers`], [`Lie::Slow`]): a call stops counting
/// when it is answered or its client drops it.
pub async fn serve_counting(
    chain: Arc<Chain>,
    lie: Lie,
    key: u8,
) -> (PeerId, String, Arc<AtomicUsize>) {
    let served = serve_observed(chain, lie, key).await;
    (served.peer, served.address, served.stalled)
}

/// A byzantine peer started by [`serve_observed`], and what it sees.
pub struct Served {
    /// Its peer id.
    pub peer: PeerId,
    /// Its address.
    pub address: String,
    /// Calls stalled right now.
    pub stalled: Arc<AtomicUsize>,
    /// FetchCommits and FetchBlocks calls it has received.
    pub fetches: Arc<AtomicUsize>,
    /// FetchCommits calls it has received.
    pub commit_fetches: Arc<AtomicUsize>,
    /// FetchBlocks calls it has received.
    pub block_fetches: Arc<AtomicUsize>,
    /// Fetches it has refused: NOT_FOUND for what it pruned or withholds
    /// ([`Lie::PrunesAtBlocksOf`], [`Lie::PrunesAtCommitsOf`],
    /// [`Lie::WithholdsBlocksOf`], [`Lie::WithholdsHedgedBlocks`],
    /// [`Lie::DeniesCommitHedges`]), busy
    /// while loaded
    /// ([`Lie::BusyWhenLoaded`]).
    pub denied: Arc<AtomicUsize>,
    /// GetCommitAvailability calls it has received.
    pub height_queries: Arc<AtomicUsize>,
    /// The index of each PushCommit it has received, in order.
    pub pushes: Arc<Mutex<Vec<u64>>>,
    loaded: Arc<AtomicBool>,
    held: Arc<Held>,
}

impl Served {
    /// Its seed entry.
    pub fn seed(&self) -> soma_actors::discovery::SeedPeer {
        soma_actors::discovery::SeedPeer {
            peer_id: Some(self.peer),
            address: self.address.clone(),
        }
    }

    /// Loads a [`Lie::BusyWhenLoaded`] peer: from now on it refuses every
    /// second commit fetch as busy.
    pub fn load(&self) {
        self.loaded.store(true, Ordering::SeqCst);
    }

    /// Opens a [`Lie::HoldsCommitsUntilOpened`] or
    /// [`Lie::HoldsBlocksUntilOpened`] peer: it answers every fetch it
    /// holds, and every later one at once (a
    /// [`Lie::HoldsCommitsThenRefuses`] or [`Lie::HoldsBlocksThenRefuses`]
    /// peer refuses them).
    pub fn open(&self) {
        self.held.opened.send_replace(true);
    }

    /// Fetches it has received so far.
    pub fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }

    /// FetchCommits calls it has received so far.
    pub fn commit_fetches(&self) -> usize {
        self.commit_fetches.load(Ordering::SeqCst)
    }

    /// FetchBlocks calls it has received so far.
    pub fn block_fetches(&self) -> usize {
        self.block_fetches.load(Ordering::SeqCst)
    }

    /// The index of each PushCommit it has received so far, in order.
    pub fn pushes(&self) -> Vec<u64> {
        locked(&self.pushes).clone()
    }
}

/// Like [`serve`], returning what the peer sees as well.
pub async fn serve_observed(chain: Arc<Chain>, lie: Lie, key: u8) -> Served {
    serve_sharing(chain, lie, key, Arc::default()).await
}

/// Like [`serve_observed`], answering every GetCommitAvailability only
/// after `height_delay`: a node that measures its peers by their height
/// answers (before any fetch answered) then waits longer before it hedges
/// a fetch, and before it holds a hedge late.
pub async fn serve_observed_slow_heights(
    chain: Arc<Chain>,
    lie: Lie,
    key: u8,
    height_delay: Duration,
) -> Served {
    let held = Arc::new(Held {
        height_delay,
        ..Held::default()
    });
    serve_sharing(chain, lie, key, held).await
}

/// A [`Lie::NeverAnswers`] peer (key `silent`) and a [`Lie::SpoilsHedges`]
/// peer (key `spoiler`) that spoils the hedges of the block fetches the
/// first holds.
pub async fn serve_spoiling_hedges(chain: Arc<Chain>, silent: u8, spoiler: u8) -> (Served, Served) {
    serve_pair(
        chain,
        (Lie::NeverAnswers, silent),
        (Lie::SpoilsHedges, spoiler),
    )
    .await
}

/// A [`Lie::HoldsCommitsUntilOpened`] peer (key `held`) and a
/// [`Lie::SpoilsCommitHedges`] peer (key `spoiler`) that answers the
/// hedges of the commit fetches the first holds with forged certificates.
pub async fn serve_spoiling_commit_hedges(
    chain: Arc<Chain>,
    held: u8,
    spoiler: u8,
) -> (Served, Served) {
    let pair = (Lie::HoldsCommitsUntilOpened, held);
    serve_pair(chain, pair, (Lie::SpoilsCommitHedges, spoiler)).await
}

/// A [`Lie::HoldsBlocksUntilOpened`] peer (key `held`) and a
/// [`Lie::WithholdsHedgedBlocks`] peer (key `liar`) that denies the blocks
/// of every fetch the first holds when asked for them in a hedge.
pub async fn serve_withholding_hedges(chain: Arc<Chain>, held: u8, liar: u8) -> (Served, Served) {
    let pair = (Lie::HoldsBlocksUntilOpened, held);
    serve_pair(chain, pair, (Lie::WithholdsHedgedBlocks, liar)).await
}

/// A [`Lie::HoldsCommitsUntilOpened`] peer (key `held`) and a
/// [`Lie::DeniesCommitHedges`] peer (key `liar`) that denies the commits
/// of every fetch the first holds when asked for them in a hedge.
pub async fn serve_denying_commit_hedges(
    chain: Arc<Chain>,
    held: u8,
    liar: u8,
) -> (Served, Served) {
    let pair = (Lie::HoldsCommitsUntilOpened, held);
    serve_pair(chain, pair, (Lie::DeniesCommitHedges, liar)).await
}

/// Two peers sharing what the first holds.
async fn serve_pair(chain: Arc<Chain>, first: (Lie, u8), second: (Lie, u8)) -> (Served, Served) {
    let held = Arc::new(Held::default());
    (
        serve_sharing(chain.clone(), first.0, first.1, held.clone()).await,
        serve_sharing(chain, second.0, second.1, held).await,
    )
}

async fn serve_sharing(chain: Arc<Chain>, lie: Lie, key: u8, held: Arc<Held>) -> Served {
    let (stalled, fetches) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let denied = Arc::new(AtomicUsize::new(0));
    let commit_fetches = Arc::new(AtomicUsize::new(0));
    let block_fetches = Arc::new(AtomicUsize::new(0));
    let loaded = Arc::new(AtomicBool::new(false));
    let height_queries = Arc::new(AtomicUsize::new(0));
    let pushes = Arc::new(Mutex::new(Vec::new()));
    let identity =
        NodeIdentity::generate(&KeyPair::from_seed([key; 32])).expect("an identity is made");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a loopback port is free");
    let address = listener
        .local_addr()
        .expect("a bound listener has an address")
        .to_string();
    let config =
        tls::server_config(&identity, &AccessPolicy::default()).expect("a server config is made");
    let server = p2p_server::P2pServer::new(Evil {
        chain,
        lie,
        stalled: stalled.clone(),
        fetches: fetches.clone(),
        commit_fetches: commit_fetches.clone(),
        block_fetches: block_fetches.clone(),
        denied: denied.clone(),
        pruned: AtomicBool::new(false),
        loaded: loaded.clone(),
        loaded_commit_fetches: AtomicUsize::new(0),
        creep_ms: [CREEP_FIRST_MS, CREEP_FIRST_MS].map(AtomicU64::new),
        height_queries: height_queries.clone(),
        pushes: pushes.clone(),
        held: held.clone(),
    });
    let server = PadsPushAnswers {
        inner: server,
        pads: (lie == Lie::PadsPushAnswers).then(|| pushes.clone()),
    };
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(server)
            .serve_with_incoming(tls::incoming(listener, config)),
    );
    Served {
        peer: identity.peer_id(),
        address,
        stalled,
        fetches,
        commit_fetches,
        block_fetches,
        denied,
        height_queries,
        pushes,
        loaded,
        held,
    }
}

/// What a [`Lie::PadsPushAnswers`] peer answers a PushCommit with.
pub const PADDED_PUSH_ANSWER_BYTES: usize = 64 << 10;

/// A PushCommit answer with a field the answer does not have: decoded as
/// an empty [`proto::PushCommitResponse`], the field skipped.
#[derive(Clone, PartialEq, prost::Message)]
struct PaddedPushAnswer {
    #[prost(bytes = "vec", tag = "15")]
    padding: Vec<u8>,
}

/// The P2p service `inner`, but for PushCommit when `pads` is set: each
/// one recorded in it, then answered with [`PaddedPushAnswer`] of
/// [`PADDED_PUSH_ANSWER_BYTES`].
#[derive(Clone)]
struct PadsPushAnswers<S> {
    inner: S,
    pads: Option<Arc<Mutex<Vec<u64>>>>,
}

impl<S: tonic::server::NamedService> tonic::server::NamedService for PadsPushAnswers<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> tonic::codegen::Service<tonic::codegen::http::Request<tonic::body::Body>>
    for PadsPushAnswers<S>
where
    S: tonic::codegen::Service<
            tonic::codegen::http::Request<tonic::body::Body>,
            Response = tonic::codegen::http::Response<tonic::body::Body>,
            Error = std::convert::Infallible,
        >,
    S::Future: Send + 'static,
{
    type Response = tonic::codegen::http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: tonic::codegen::http::Request<tonic::body::Body>) -> Self::Future {
        match &self.pads {
            Some(pushes) if request.uri().path() == "/soma.p2p.v1.P2p/PushCommit" => {
                let pushes = pushes.clone();
                Box::pin(async move {
                    let codec = soma_wire::codec::ReservingCodec::<
                        PaddedPushAnswer,
                        proto::PushCommitRequest,
                    >::default();
                    let mut grpc = tonic::server::Grpc::new(codec);
                    Ok(grpc.unary(PaddedPush(pushes), request).await)
                })
            }
            _ => Box::pin(self.inner.call(request)),
        }
    }
}

/// Answers a PushCommit, recording its index, with a padded answer.
struct PaddedPush(Arc<Mutex<Vec<u64>>>);

impl tonic::server::UnaryService<proto::PushCommitRequest> for PaddedPush {
    type Response = PaddedPushAnswer;
    type Future = Pin<
        Box<dyn std::future::Future<Output = Result<Response<PaddedPushAnswer>, Status>> + Send>,
    >;

    fn call(&mut self, request: Request<proto::PushCommitRequest>) -> Self::Future {
        locked(&self.0).push(request.get_ref().index);
        Box::pin(async {
            Ok(Response::new(PaddedPushAnswer {
                padding: vec![0xee; PADDED_PUSH_ANSWER_BYTES],
            }))
        })
    }
}
