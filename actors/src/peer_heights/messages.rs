use actix::Message;
use serde::{Deserialize, Serialize};
use soma_types::{ChainId, CommitIndex, PeerId};

use super::core::good;
use crate::Time;

/// A peer answered GetCommitAvailability: its current claim. Both bounds
/// replace the last claim, so `highest` may move down; ignored unless the
/// peer is connected.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Message)]
#[rtype(result = "()")]
pub struct UpdateHeight {
    /// The peer.
    pub peer: PeerId,
    /// The chain it reports being on.
    pub chain_id: ChainId,
    /// Its highest synced commit.
    pub highest: CommitIndex,
    /// Its lowest available commit.
    pub lowest: CommitIndex,
}

/// A peer told us (PushCommit) it synced up to `highest`: this only raises
/// its claim. Ignored unless the peer is connected; a peer that has not
/// reported its chain yet is kept out of every sync answer until it does.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Message)]
#[rtype(result = "()")]
pub struct PushHeight {
    /// The authenticated caller.
    pub peer: PeerId,
    /// Its new highest synced commit.
    pub highest: CommitIndex,
}

/// A peer disconnected: forget its claim and its score (a ban is kept).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Message)]
#[rtype(result = "()")]
pub struct RemovePeer {
    /// The peer.
    pub peer: PeerId,
}

/// The highest commit claimed by any connected, unbanned peer on our chain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Message)]
#[rtype(result = "Option<CommitIndex>")]
pub struct HighestKnownCommit;

/// How far the connected peers' heights are known: the highest commit
/// claimed (as [`HighestKnownCommit`]) and how many connected peers have
/// not answered a height query yet.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Message)]
#[rtype(result = "HeardHeights")]
pub struct HeightsHeard;

/// Answer to [`HeightsHeard`].
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, actix::MessageResponse,
)]
pub struct HeardHeights {
    /// See [`HighestKnownCommit`].
    pub highest: Option<CommitIndex>,
    /// Connected peers whose availability has not come in yet.
    pub awaiting: usize,
}

/// Peers that can serve commits `start..=end`, best first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Message)]
#[rtype(result = "Vec<PeerId>")]
pub struct PeersForRange {
    /// First commit needed.
    pub start: CommitIndex,
    /// Last commit needed.
    pub end: CommitIndex,
}

/// Whether a peer not in `avoid` could be leased for a fetch of `kind`
/// of commits `start..=end`, as [`AcquirePeer`] would choose one, whether
/// or not it has a slot free now: one whose claim is in doubt counts, as
/// the last resort it is there.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Message)]
#[rtype(result = "bool")]
pub struct CoversRange {
    /// The kind of fetch.
    pub kind: FetchKind,
    /// First commit.
    pub start: CommitIndex,
    /// Last commit.
    pub end: CommitIndex,
    /// Peers not to count.
    pub avoid: Vec<PeerId>,
}

/// Whether `peer` claims to hold commits `start..=end` now: the view a
/// NOT_FOUND for blocks is judged against ([`OutcomeKind::Withheld`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Message)]
#[rtype(result = "bool")]
pub struct ClaimsRange {
    /// The peer.
    pub peer: PeerId,
    /// First commit.
    pub start: CommitIndex,
    /// Last commit.
    pub end: CommitIndex,
}

/// The two kinds of fetch. Their answers take different times, and only
/// a commit fetch asks for commits nobody has shown to exist: a block
/// fetch is for the blocks of commits already certified.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FetchKind {
    /// FetchCommits.
    Commits,
    /// FetchBlocks.
    #[default]
    Blocks,
}

/// A fetch slot on one peer, granted for commits `start..=end`: the peer
/// is sent at most `max_fetches_per_peer` fetches at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// The lease's id, to release it.
    pub id: u64,
    /// The peer to fetch from.
    pub peer: PeerId,
    /// First commit of the range it was chosen for.
    pub start: CommitIndex,
    /// Last commit of that range.
    pub end: CommitIndex,
    /// What it fetches.
    #[serde(default)]
    pub kind: FetchKind,
}

/// Asks for the best peer that can serve commits `start..=end`, is not in
/// `avoid`, and has a free fetch slot. When every such peer's slots are
/// taken the request waits, at most `wait_ms`, for one to be released;
/// with `wait_ms` 0 it is refused as busy at once.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Acquire {
    /// Correlation id of the request.
    pub request: u64,
    /// First commit needed.
    pub start: CommitIndex,
    /// Last commit needed.
    pub end: CommitIndex,
    /// What it fetches.
    #[serde(default)]
    pub kind: FetchKind,
    /// Peers not to choose (they failed this work).
    pub avoid: Vec<PeerId>,
    /// How long the request may wait for a slot, in milliseconds; 0: a
    /// slot free now, or none.
    pub wait_ms: u64,
    /// Only a peer with room to spare: one whose slots are whole (any it
    /// lost refusing us as busy were earned back by verified answers), of
    /// the best standing among the peers not avoided that cover the range
    /// if that is good or never measured (so not one never measured while
    /// a good one covers it: it may be silent). For a fetch handed on from
    /// a peer that refused it as busy: a peer that refused us too is
    /// likely as loaded.
    #[serde(default)]
    pub spare_only: bool,
}

/// [`Acquire`] as an actor message, answered once a slot is granted.
#[derive(Clone, Debug, PartialEq, Eq, Message)]
#[rtype(result = "Result<super::Slot, AcquireError>")]
pub struct AcquirePeer {
    /// First commit needed.
    pub start: CommitIndex,
    /// Last commit needed.
    pub end: CommitIndex,
    /// What it fetches.
    pub kind: FetchKind,
    /// Peers not to choose.
    pub avoid: Vec<PeerId>,
    /// How long to wait for a slot, in milliseconds.
    pub wait_ms: u64,
    /// Only a peer with room to spare (see [`Acquire::spare_only`]).
    pub spare_only: bool,
}

/// Why no fetch slot was granted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(rename_all = "snake_case")]
pub enum AcquireError {
    /// No connected, unbanned peer of our chain covers the range (or every
    /// one that does is avoided).
    #[error("no peer can serve the range")]
    NoPeer,
    /// Peers cover the range, but their slots stayed taken for as long as
    /// the request could wait, or too many requests wait already.
    #[error("every peer that can serve the range is busy")]
    Busy,
    /// PeerHeights restarted or stopped before answering.
    #[error("peer heights is unavailable")]
    Unavailable,
}

/// How the transfer of a leased fetch went, as its worker saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Transfer {
    /// The peer's part is done and what it sent is judged later (verified,
    /// or cut on what it held): a success is reported once verified, a liar
    /// by state sync, so nothing is counted yet. A liar's fast answers so
    /// never improve its score.
    Received,
    /// It did not answer in time.
    Timeout,
    /// The request failed (transport error, error status).
    Error,
    /// It refused for now (RESOURCE_EXHAUSTED): it serves fewer fetches
    /// from us at once than we sent. Not a fault: its slots for us shrink
    /// to the fetches it was serving, and each verified answer from it
    /// grows them back by one, up to `max_fetches_per_peer`.
    Busy,
    /// It answered NOT_FOUND: judged against its claim for the lease's range.
    NotFound,
    /// It answered NOT_FOUND to a block fetch. Counted as an error now,
    /// and a lie only if StateSync later reports the blocks existed
    /// ([`OutcomeKind::Withheld`]): until their batch is applied, they may
    /// be a retired committee's forgery that no honest peer holds.
    Withheld,
    /// The fetch ended on our side (cancelled, failed locally): nothing to
    /// hold against the peer or to measure.
    Cancelled,
    /// It had not answered when another peer, asked the same once this
    /// fetch was late, did. Not a fault (it may be slow, not silent): it
    /// ranks lower until it answers again, and after three it is asked only
    /// while no other peer covers the range.
    Late,
}

/// Gives a lease's slot back, with how the transfer went.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Message)]
#[rtype(result = "()")]
pub struct Release {
    /// The lease.
    pub lease: u64,
    /// How the transfer went.
    pub transfer: Transfer,
    /// Bytes received.
    pub bytes: u64,
    /// Time the transfer took, in milliseconds.
    pub latency_ms: u64,
}

/// Another peer's answer beat `peer`'s on a hedged fetch (a second peer's
/// beat the first, or the first's came after the hedge to `peer` was
/// itself late), and has since passed the checks that tell a true answer
/// from junk: the same failure as a release [`Transfer::Late`], told once
/// it is earned. The fetch's slot on `peer` was released as cancelled when
/// the race ended, so that the peer is not held to a slot while the answer
/// is checked.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Message)]
#[rtype(result = "()")]
pub struct ReportBeaten {
    /// The peer whose answer was beaten.
    pub peer: PeerId,
}

/// A commit fetch on `lease` went unanswered past the hedge delay, and no
/// other peer covers its first commit: the peer alone claims it and has
/// not shown it. Its claim above is doubted at once, as if the fetch had
/// failed, rather than counted in full until the fetch ends; an answer
/// still ends the doubt.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Message)]
#[rtype(result = "()")]
pub struct LeaseUnanswered {
    /// The lease.
    pub lease: u64,
}

/// Connected, unbanned peers on our chain whose highest commit is below
/// `index`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Message)]
#[rtype(result = "Vec<PeerId>")]
pub struct PeersBehind {
    /// The commit they lack.
    pub index: CommitIndex,
}

/// How a request to a peer went.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutcomeKind {
    /// It answered a fetch of this kind with valid data.
    Success(FetchKind),
    /// It did not answer in time.
    Timeout,
    /// The request failed (transport error, error status).
    Error,
    /// It sent data that failed verification: the peer is banned.
    InvalidData,
    /// It answered NOT_FOUND for commits `start..=end`. Judged against its
    /// claim: inside `[lowest, highest]` it lied about its height and is
    /// banned; starting below `lowest` it pruned, no fault; above its
    /// claim, a failure.
    NotFound {
        /// First commit asked for.
        start: CommitIndex,
        /// Last commit asked for.
        end: CommitIndex,
    },
    /// The blocks it answered NOT_FOUND for ([`Transfer::Withheld`]) are
    /// now applied, so they existed: banned. It is reported only if it
    /// still claimed the commits naming them just after its answer
    /// ([`ClaimsRange`], after asking it afresh). An honest node advertises
    /// a new lowest commit before it deletes below it, so its fresh answer
    /// no longer claims what it pruned; only if that answer does not come
    /// is it judged on the view of the periodic queries.
    Withheld,
}

/// The result of a request to a peer, for the balancer and bans.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Message)]
#[rtype(result = "()")]
pub struct ReportOutcome {
    /// The peer.
    pub peer: PeerId,
    /// Bytes it is scored by (see [`ReportOutcome::delivered`]).
    pub bytes: u64,
    /// Time the request took, in milliseconds.
    pub latency_ms: u64,
    /// How it went.
    pub kind: OutcomeKind,
}

/// How long an answer of all that was asked may take, however small, and
/// still rank its peer good: it scores at least the mark of its kind. A
/// small answer measures the round trip, not the peer's rate: near the tip
/// a fetch is a commit or two, a few KB, and over 100 ms an honest peer
/// scored below the marks, slow, so that a peer never measured (a fresh
/// identity, free to mint in public mode, and maybe silent) ranked above
/// it. Long enough for a round trip across the world and the server's
/// read; a slower answer scores by its bytes alone.
pub const WHOLE_ANSWER_MS: u64 = 500;

/// The most a small whole answer scores, in marks of its kind: the floor
/// is the mark times [`WHOLE_ANSWER_MS`] over the answer's time, up to
/// this. Uncapped, a few quick answers of a commit or two would score a
/// hundred marks at a short round trip, and the moving average would
/// carry that credit over many slow or partial answers after.
pub const WHOLE_ANSWER_MAX_MARKS: u64 = 2;

impl ReportOutcome {
    /// A fetch from `peer` whose data passed verification: `bytes` in
    /// `latency_ms`, bringing `got` of the `asked` items (commits; a block
    /// fetch comes whole). It scores the bytes times the share of what was
    /// asked that they are. A commit answer may end early at any commit
    /// its server can certify, so a peer answering each commit fetch at
    /// once with one commit breaks no rule; scored by its bytes alone, its
    /// round trip would measure it fast, and its free slots would take
    /// every fetch from the peers not yet measured that send whole
    /// batches, leaving the node a commit per round trip. By its share it
    /// scores as slow, asked when the better peers are full. An honest
    /// answer cut at the size cap is cut so at every honest peer.
    ///
    /// An answer of all that was asked within [`WHOLE_ANSWER_MS`] scores
    /// at least what a peer at the mark moves in that time, up to
    /// [`WHOLE_ANSWER_MAX_MARKS`] times what it moves in the answer's, so
    /// that small answers (near the tip) rank an honest peer good; a share
    /// of what was asked never does.
    pub fn delivered(
        (kind, peer): (FetchKind, PeerId),
        (bytes, latency_ms): (u64, u64),
        (got, asked): (u64, u64),
    ) -> Self {
        let share = u128::from(got.min(asked)) * u128::from(bytes) / u128::from(asked.max(1));
        let share = u64::try_from(share).unwrap_or(u64::MAX);
        let whole = got >= asked && asked > 0 && latency_ms <= WHOLE_ANSWER_MS;
        let floor_ms =
            WHOLE_ANSWER_MS.min(WHOLE_ANSWER_MAX_MARKS.saturating_mul(latency_ms.max(1)));
        let floor = (good(kind) * floor_ms).div_ceil(1000);
        ReportOutcome {
            peer,
            bytes: if whole { share.max(floor) } else { share },
            latency_ms,
            kind: OutcomeKind::Success(kind),
        }
    }
}

/// Everything PeerHeights knows, for the handle and metrics.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Message)]
#[rtype(result = "Vec<PeerView>")]
pub struct Snapshot;

/// How many peers of a [`Snapshot`] are banned and how many doubted,
/// without building it (for metrics).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Message)]
#[rtype(result = "PeerCounts")]
pub struct CountPeers;

/// What [`CountPeers`] answers.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, actix::MessageResponse,
)]
pub struct PeerCounts {
    /// Peers banned, connected or not.
    pub banned: usize,
    /// Connected peers whose claims are doubted.
    pub doubted: usize,
}

/// What PeerHeights knows of one peer: a connected peer, or a banned one
/// that has left (then only its ban is known).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerView {
    /// The peer.
    pub peer: PeerId,
    /// Whether it is connected (tracked); a departed peer is listed only
    /// while banned.
    pub connected: bool,
    /// The chain it is on, once it has reported it.
    pub chain_id: Option<ChainId>,
    /// Its claimed highest synced commit.
    pub highest: CommitIndex,
    /// Its claimed lowest available commit.
    pub lowest: CommitIndex,
    /// While its claim above this commit is doubted: it failed a commit
    /// fetch starting just after, and is neither counted nor asked there
    /// for a while (it may be lying about its height in a way that proves
    /// nothing, refusing as busy, say).
    #[serde(default)]
    pub doubted_above: Option<CommitIndex>,
    /// What block fetches rank it by: the estimated throughput of its
    /// block answers as [`ReportOutcome::delivered`] scores them (a small
    /// whole answer at least at the mark), bytes per second (until it has
    /// answered one, of its commit answers; 0 until measured).
    pub throughput_bps: u64,
    /// What commit fetches rank it by: the estimated throughput of its
    /// commit answers, each scaled by its share of what was asked
    /// ([`ReportOutcome::delivered`]), bytes per second (until it has
    /// answered one, of its block answers; 0 until measured).
    #[serde(default)]
    pub commit_throughput_bps: u64,
    /// Recent failures (halved by each success); a refusal as busy is
    /// none.
    pub failures: u32,
    /// The fetches it serves us at once, as its refusals as busy taught
    /// (`None`: all `max_fetches_per_peer`: it refused none, or its
    /// answers since earned them back).
    #[serde(default)]
    pub busy_slots: Option<usize>,
    /// Outcomes held against it (timeouts, errors, invalid data, denied
    /// ranges) since it connected; unlike `failures`, never decays.
    pub faults: u64,
    /// Banned until this time, if banned.
    pub banned_until: Option<Time>,
}

/// Inputs of the PeerHeights core.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Input {
    /// Connections holds a verified connection to `peer`: it is tracked
    /// from now on.
    Connected {
        /// The peer.
        peer: PeerId,
    },
    /// See [`UpdateHeight`].
    Update(UpdateHeight),
    /// See [`PushHeight`].
    Push(PushHeight),
    /// See [`RemovePeer`]; also the shell's input for a disconnection.
    Remove(RemovePeer),
    /// See [`HighestKnownCommit`].
    HighestKnown,
    /// See [`HeightsHeard`].
    HeightsHeard,
    /// See [`PeersForRange`].
    PeersForRange(PeersForRange),
    /// See [`PeersBehind`].
    PeersBehind(PeersBehind),
    /// See [`ClaimsRange`].
    ClaimsRange(ClaimsRange),
    /// See [`CoversRange`].
    CoversRange(CoversRange),
    /// See [`ReportOutcome`].
    Outcome(ReportOutcome),
    /// See [`Snapshot`].
    Snapshot,
    /// See [`CountPeers`].
    CountPeers,
    /// See [`Acquire`].
    Acquire(Acquire),
    /// See [`Release`].
    Release(Release),
    /// See [`ReportBeaten`].
    Beaten(ReportBeaten),
    /// See [`LeaseUnanswered`].
    Unanswered {
        /// The lease.
        lease: u64,
    },
    /// Time passed: the shell's timer for a waiting request's end, so its
    /// refusal does not wait for another input.
    Tick,
}

/// Outputs of the PeerHeights core.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Output {
    /// Answer to [`Input::HighestKnown`].
    HighestKnown(Option<CommitIndex>),
    /// Answer to [`Input::HeightsHeard`].
    HeightsHeard(HeardHeights),
    /// Answer to [`Input::PeersForRange`] and [`Input::PeersBehind`].
    Peers(Vec<PeerId>),
    /// Answer to [`Input::ClaimsRange`] and [`Input::CoversRange`].
    Claims(bool),
    /// Answer to [`Input::Snapshot`]: connected peers and banned departed
    /// ones, ordered by peer id.
    Snapshot(Vec<PeerView>),
    /// Answer to [`Input::CountPeers`].
    Counts(PeerCounts),
    /// A connected peer answered that it is on another chain, for the
    /// first time since it connected: it is never synced from. Every peer
    /// saying so is a node given another network's genesis.
    OtherChain {
        /// The peer.
        peer: PeerId,
        /// The chain it says it is on.
        chain_id: ChainId,
    },
    /// A peer was banned after sending invalid data or denying commits it
    /// claims to hold.
    Banned {
        /// The peer.
        peer: PeerId,
        /// When the ban ends.
        until: Time,
    },
    /// Answer to [`Input::Acquire`]: a fetch slot on `lease.peer`.
    Granted {
        /// The request answered.
        request: u64,
        /// The slot.
        lease: Lease,
    },
    /// Answer to [`Input::Acquire`]: no slot (see [`AcquireError`]).
    Refused {
        /// The request answered.
        request: u64,
        /// Why.
        error: AcquireError,
    },
}
