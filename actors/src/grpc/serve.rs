//! Reads that answer RPCs from the store. They run on tokio's blocking pool;
//! block streams are sent from the async side.

use std::cmp::Reverse;
use std::collections::HashSet;
use std::sync::Arc;

use bytes::Bytes;
use prost::Message;
use soma_store::ConsensusStore;
use soma_types::{BlockRef, CommitIndex, CommitRef, Committee, Stake, VerifiedBlock};
use soma_wire::proto;
use tokio::sync::mpsc;
use tonic::Status;

use super::budget::Reservation;
use super::core::Limits;

pub(super) fn store_error(e: soma_store::Error) -> Status {
    Status::unavailable(format!("store: {e}"))
}

/// [`commits_answer`] as a status, whenever wanted: what the tests call.
#[cfg(test)]
pub(crate) fn fetch_commits(
    store: &dyn ConsensusStore,
    start: CommitIndex,
    end: CommitIndex,
    limits: &Limits,
    data: &soma_types::Limits,
) -> Result<proto::FetchCommitsResponse, Status> {
    commits_answer(store, start, end, limits, data, &|| true).map_err(Status::from)
}

/// Why [`commits_answer`] gave no answer.
#[derive(Debug)]
pub(crate) enum Refused {
    /// Not held: pruned, past the highest commit, or missing (NOT_FOUND).
    NotFound(String),
    /// Held, but no certificate is kept in range nor made from the votes
    /// after it yet (UNAVAILABLE, not NOT_FOUND, which a peer takes for a
    /// lie about the height claimed).
    NoCertificate(String),
    /// The store failed (UNAVAILABLE).
    Store(soma_store::Error),
    /// The answer was no longer wanted: the read stopped (CANCELLED).
    Abandoned,
    /// What the store holds breaks an invariant (INTERNAL).
    Internal(String),
}

impl From<Refused> for Status {
    fn from(refused: Refused) -> Self {
        match refused {
            Refused::NotFound(m) => Status::not_found(m),
            Refused::NoCertificate(m) => Status::unavailable(m),
            Refused::Store(e) => store_error(e),
            Refused::Internal(m) => Status::internal(m),
            Refused::Abandoned => Status::cancelled("the call was cancelled; its read stopped"),
        }
    }
}

/// FetchCommits: commits from `start`, ending at the epoch's last commit if
/// that comes first, within the byte budget: at the range's end if a
/// certificate of it is kept or the votes of the commits after it make one
/// ([`certificate_from_votes`]), else at the highest commit in range whose
/// certificate is kept; with a minimal quorum of that certificate's blocks
/// ([`minimal_certificate`]).
///
/// The answer stays within
/// [`soma_types::Limits::max_fetch_commits_response_bytes`] for the budget
/// and the served epoch's committee: commits within
/// `limits.max_fetch_response_bytes` (the first always goes), at most
/// `data.max_commits_per_batch` of them, and one certifier per author at
/// most. A client sets its decoding cap from the same function, so a range
/// of maximal blocks is still served.
///
/// Refused as a [`Refused`], so that the archive writer tells a range not
/// certified yet from a failure: a range holding no kept certificate whose
/// end the votes held do not certify is refused before any of it is read. Stopped ([`Refused::Abandoned`], which is
/// CANCELLED) before its first store read and before each read of the vote
/// search once `wanted` says the answer is no longer wanted: a caller that
/// resets its call at once would otherwise have the whole read done
/// without downloading anything.
pub(crate) fn commits_answer(
    store: &dyn ConsensusStore,
    start: CommitIndex,
    end: CommitIndex,
    limits: &Limits,
    data: &soma_types::Limits,
    wanted: &dyn Fn() -> bool,
) -> Result<proto::FetchCommitsResponse, Refused> {
    if !wanted() {
        return Err(Refused::Abandoned);
    }
    let highest = store.highest_synced_commit().map_err(Refused::Store)?.index;
    let lowest = store.lowest_available_commit().map_err(Refused::Store)?;
    if start < lowest {
        return Err(Refused::NotFound(format!(
            "commits below {lowest} are pruned"
        )));
    }
    if start > highest {
        return Err(Refused::NotFound(format!(
            "commit {start} is past our highest, {highest}"
        )));
    }
    // A verifier refuses longer batches, and the size bound counts on it.
    let longest = start.saturating_add(data.max_commits_per_batch.max(1) as u64 - 1);
    let mut end = end.min(highest).min(longest);
    let first = store
        .commit(start)
        .map_err(Refused::Store)?
        .ok_or_else(|| Refused::NotFound(format!("commit {start} is not held")))?;
    let epoch = first.commit().epoch;
    if let Some(last) = store.last_commit_of_epoch(epoch).map_err(Refused::Store)? {
        end = end.min(last);
    }
    let committee = store
        .committee(epoch)
        .map_err(Refused::Store)?
        .ok_or_else(|| Refused::Internal(format!("committee of epoch {epoch} is not held")))?;
    let per_read = vote_search_read(limits, data);
    // Decided before the range is read: with no certificate kept in it,
    // only the votes after its end can certify an answer. Where they do
    // not (local commits at our tip, the last commits of an epoch), the
    // call is refused for the cost of that search, not of a read of up
    // to the whole budget that a refusal would throw away. (A budget
    // that cut the answer short of `end` could have ended it at a commit
    // the votes certify; such a caller asks again once they do.)
    let kept_in_range = store
        .highest_certified_in(start..=end)
        .map_err(Refused::Store)?;
    let voted_end = match kept_in_range {
        Some(_) => None,
        None => {
            let at = store
                .commit(end)
                .map_err(Refused::Store)?
                .ok_or_else(|| Refused::Internal(format!("commit {end} is not held")))?;
            match certificate_from_votes(store, at.reference(), &committee, per_read, wanted)? {
                Some(voters) => Some((end, voters)),
                None => {
                    return Err(Refused::NoCertificate(format!(
                        "no certificate held yet in {start}..={end}"
                    )));
                }
            }
        }
    };
    let mut commits = commits_read(store, start..=end, limits.max_fetch_response_bytes, wanted)?;
    let read_end = commits.last().map_or(start, |c| c.index());
    let last = commits
        .last()
        .map(|c| c.reference())
        .ok_or_else(|| Refused::Internal(format!("commit {start} is not held")))?;
    // The highest kept in `start..=end` is the highest in the part read,
    // unless the budget cut the read below it.
    let kept = match kept_in_range {
        Some(certified) if certified > read_end => store
            .highest_certified_in(start..=read_end)
            .map_err(Refused::Store)?,
        kept => kept,
    };
    // The range's end, certified by a kept certificate or else by the
    // votes of the commits after it: a node that synced in other batches
    // than the client's answers the whole range in one answer.
    let at_end = match (kept, voted_end) {
        (Some(certified), _) if certified == read_end => None,
        (_, Some((voted, voters))) if voted == read_end => Some(voters),
        _ => certificate_from_votes(store, last, &committee, per_read, wanted)?,
    };
    let certifiers = match (at_end, kept) {
        (Some(voters), _) => voters,
        // Up to the highest kept certificate in range.
        (None, Some(certified)) => {
            commits.retain(|c| c.index() <= certified);
            let last = commits
                .last()
                .map(|c| c.reference())
                .ok_or_else(|| Refused::Internal(format!("commit {certified} is not held")))?;
            let stored = store
                .certificate(certified)
                .map_err(Refused::Store)?
                .unwrap_or_default();
            minimal_certificate(stored, last, &committee).ok_or_else(|| {
                Refused::Internal(format!(
                    "stored certificate of commit {certified} lacks quorum"
                ))
            })?
        }
        // Local commits whose votes are still to come.
        (None, None) => {
            return Err(Refused::NoCertificate(format!(
                "no certificate held yet in {start}..={read_end}"
            )));
        }
    };
    let response = proto::FetchCommitsResponse {
        commits: commits.iter().map(|c| c.serialized().clone()).collect(),
        certifier_blocks: certifiers.iter().map(|b| b.serialized().clone()).collect(),
    };
    // Holds by construction for data within `data`'s limits; a larger local
    // block would make the caller refuse the answer, so it is never sent.
    let bound =
        data.max_fetch_commits_response_bytes(limits.max_fetch_response_bytes, committee.size());
    let size = response.encoded_len();
    if size > bound {
        return Err(Refused::Internal(format!(
            "answer of {size} bytes exceeds the bound of {bound}"
        )));
    }
    Ok(response)
}

/// Commits read from the store at a time for a FetchCommits answer: a
/// call no longer wanted stops between two reads.
const COMMITS_READ: u64 = 32;

/// The stored commits of `range` within `max_bytes`, as one
/// `commits_in_range` would give them (the first whatever its size, then
/// in order while they fit), read [`COMMITS_READ`] at a time; stopped
/// ([`Refused::Abandoned`]) before each read after the first once
/// `wanted` says the answer is not wanted any more.
fn commits_read(
    store: &dyn ConsensusStore,
    range: std::ops::RangeInclusive<CommitIndex>,
    max_bytes: usize,
    wanted: &dyn Fn() -> bool,
) -> Result<Vec<soma_types::TrustedCommit>, Refused> {
    let (mut from, end) = range.into_inner();
    let mut commits = Vec::new();
    let mut bytes = 0usize;
    while from <= end {
        if !commits.is_empty() && !wanted() {
            return Err(Refused::Abandoned);
        }
        let to = from.saturating_add(COMMITS_READ - 1).min(end);
        let read = store
            .commits_in_range(from..=to, max_bytes.saturating_sub(bytes))
            .map_err(Refused::Store)?;
        // Fewer than asked: the budget or the stored commits end here.
        let mut done = (read.len() as u64) < to - from + 1;
        for commit in read {
            let len = commit.serialized().len();
            // A read's first commit comes whatever the budget left.
            if !commits.is_empty() && bytes.saturating_add(len) > max_bytes {
                done = true;
                break;
            }
            bytes = bytes.saturating_add(len);
            commits.push(commit);
        }
        if done || to == end {
            break;
        }
        from = to + 1;
    }
    Ok(commits)
}

/// Most commits after a commit whose blocks are searched for its votes.
pub(crate) const VOTE_SEARCH_COMMITS: u64 = 8;

/// The least a caller may have a server fill a FetchCommits answer or a
/// FetchBlocks message to (the smallest `max-fetch-response-bytes`): less
/// would have a server send its blocks one message each.
pub(crate) const MIN_ASKED_RESPONSE_BYTES: usize = 64 << 10;

/// What an answer, or a message of a block stream, is filled to for a
/// caller that takes at most `asked` bytes (0: not said, as callers before
/// the field sent): the server's `own` cap, or less if asked, never less
/// than [`MIN_ASKED_RESPONSE_BYTES`]. A server filling to its own cap a
/// caller's answers, decoded up to the caller's, had answers refused as
/// too large wherever the two settings differ.
pub(crate) fn asked_budget(own: usize, asked: u64) -> usize {
    match usize::try_from(asked) {
        Ok(0) => own,
        Ok(asked) => own.min(asked.max(MIN_ASKED_RESPONSE_BYTES)),
        Err(_) => own,
    }
}

/// Most blocks read in that search, per member of the committee: the
/// votes are in each authority's next block or two, and the answer's own
/// certificate grows with the committee too.
pub(crate) const VOTE_SEARCH_BLOCKS_PER_MEMBER: usize = 8;

/// Most blocks read from the store at a time in that search: only the
/// voters are kept, one per authority.
const VOTE_SEARCH_READ: usize = 16;

/// Blocks read at a time in the vote search: as many of the largest blocks
/// as one answer may hold, at least one, at most [`VOTE_SEARCH_READ`]. A
/// read holds its blocks' bytes and their decoding at once, and sixteen
/// of the largest blocks would be 64 MiB of each for a request of a few
/// bytes.
fn vote_search_read(limits: &Limits, data: &soma_types::Limits) -> usize {
    (limits.max_fetch_response_bytes / data.max_block_bytes.max(1)).clamp(1, VOTE_SEARCH_READ)
}

/// A certificate of commit `last` made of the blocks that vote for it among
/// the blocks of the commits after it, of its epoch: each authority votes in
/// its first block after it committed `last`, and those blocks are
/// committed a few commits later. A node keeps the certificates of its own
/// batch ends only; this lets it serve a client whose batches end
/// elsewhere. The search reads the blocks of at most
/// [`VOTE_SEARCH_COMMITS`] commits and [`VOTE_SEARCH_BLOCKS_PER_MEMBER`]
/// blocks per member of the committee, `per_read` blocks at a time, and
/// stops at the first quorum, or before a read once `wanted` says the
/// answer is not wanted any more ([`Refused::Abandoned`]). `None` if they hold no quorum of votes (the
/// commits after `last` are not held yet, for one).
///
/// Every stored block was verified before it was stored, so the votes are
/// the authorities' own; the client checks the certificate as any other.
pub(crate) fn certificate_from_votes(
    store: &dyn ConsensusStore,
    last: CommitRef,
    committee: &Committee,
    per_read: usize,
    wanted: &dyn Fn() -> bool,
) -> Result<Option<Vec<VerifiedBlock>>, Refused> {
    let highest = store.highest_synced_commit().map_err(Refused::Store)?.index;
    let end = last.index.saturating_add(VOTE_SEARCH_COMMITS).min(highest);
    // At most one voter per authority is kept, whatever else is read.
    let mut authors = HashSet::new();
    let mut voters: Vec<VerifiedBlock> = Vec::new();
    let most = VOTE_SEARCH_BLOCKS_PER_MEMBER.saturating_mul(committee.size());
    let mut read = 0;
    for index in last.index.saturating_add(1)..=end {
        let Some(commit) = store.commit(index).map_err(Refused::Store)? else {
            break;
        };
        if commit.commit().epoch != committee.epoch() {
            break;
        }
        let refs = commit.commit().blocks.as_slice();
        let refs = &refs[..refs.len().min(most - read)];
        read += refs.len();
        for group in refs.chunks(per_read.max(1)) {
            if !wanted() {
                return Err(Refused::Abandoned);
            }
            let read = store.blocks(group).map_err(Refused::Store)?;
            voters.extend(read.into_iter().flatten().filter(|b| {
                let b = b.block();
                b.commit_votes.contains(&last) && authors.insert(b.author)
            }));
        }
        if let Some(certificate) = minimal_certificate(voters.clone(), last, committee) {
            return Ok(Some(certificate));
        }
        if read == most {
            break;
        }
    }
    Ok(None)
}

/// The certificate sent for commit `last`: of `stored`, only blocks voting
/// for `last`, one per author, the largest stakes first (ties by author
/// index), stopping as soon as their stake reaches quorum. `None` if the
/// voters among `stored` hold no quorum.
///
/// Fewest blocks is what keeps an answer's size bounded by the committee
/// size times the largest block, and the order makes the answer the same
/// every time.
pub(crate) fn minimal_certificate(
    stored: Vec<VerifiedBlock>,
    last: CommitRef,
    committee: &Committee,
) -> Option<Vec<VerifiedBlock>> {
    let mut authors = HashSet::with_capacity(stored.len());
    let mut voters: Vec<VerifiedBlock> = Vec::with_capacity(stored.len());
    for block in stored {
        let b = block.block();
        let counted = committee.authority(b.author).is_some()
            && b.commit_votes.contains(&last)
            && authors.insert(b.author);
        if counted {
            voters.push(block);
        }
    }
    voters.sort_by_key(|v| {
        let author = v.block().author;
        (Reverse(committee.stake(author)), author)
    });
    let mut stake: Stake = 0;
    let mut certificate = Vec::new();
    for block in voters {
        stake = stake.saturating_add(committee.stake(block.block().author));
        certificate.push(block);
        if committee.is_quorum(stake) {
            return Some(certificate);
        }
    }
    None
}

/// Bytes a message takes in a response body: its encoding and gRPC's
/// 5-byte frame header (no compression is used).
pub(super) fn encoded_message_len(message: &impl Message) -> usize {
    message.encoded_len() + GRPC_HEADER_BYTES
}

/// The header gRPC puts before each message (flag and length).
const GRPC_HEADER_BYTES: usize = 5;

type BlockSender = mpsc::Sender<Result<proto::FetchBlocksResponse, Status>>;

/// FetchBlocks: streams the blocks in request order, in chunks of at most
/// `max_bytes` (a single larger block goes alone). Stops with NOT_FOUND at
/// the first block not held, with INTERNAL if the store breaks its
/// contract or a read fails, and quietly when the caller goes away.
///
/// Each chunk is read on the blocking pool ([`read_chunk`]); sending is
/// async, so a client that does not read holds no thread. Before a chunk is
/// read it takes `estimate` from the connection's budget (`reservation`):
/// at least `max_bytes`, and at least the largest block, since a chunk
/// always holds a block whatever the budget;
/// waiting while the connection holds too much, and the reservation is set
/// to the chunk's size once read (never waiting again: streams that each
/// hold an estimate would wait on each other): all the producer holds is
/// counted. The response's body gives the bytes back as it hands them to
/// the transport.
pub(super) async fn stream_blocks(
    store: Arc<dyn ConsensusStore>,
    refs: Vec<BlockRef>,
    max_bytes: usize,
    estimate: usize,
    reservation: Arc<Reservation>,
    tx: BlockSender,
) {
    let refs: Arc<[BlockRef]> = refs.into();
    let mut next = 0;
    while next < refs.len() {
        if !unless_closed(&tx, reservation.add(estimate)).await {
            return;
        }
        let read = {
            let (store, refs) = (store.clone(), refs.clone());
            tokio::task::spawn_blocking(move || read_chunk(store.as_ref(), &refs, next, max_bytes))
                .await
        };
        // A read that panicked ends the stream with INTERNAL, not
        // quietly: a stream that just stops reads as blocks withheld.
        let chunk = read.unwrap_or_else(|_| Chunk {
            blocks: Vec::new(),
            next,
            error: Some(Status::internal("the block read failed")),
        });
        next = chunk.next;
        let message = proto::FetchBlocksResponse {
            blocks: chunk.blocks,
        };
        let len = if message.blocks.is_empty() {
            0
        } else {
            encoded_message_len(&message)
        };
        reservation.settle(estimate, len);
        if len > 0 && tx.send(Ok(message)).await.is_err() {
            return;
        }
        if let Some(status) = chunk.error {
            let _ = tx.send(Err(status)).await;
            return;
        }
    }
}

/// Runs `wait` unless the caller goes away (or the response is cut) first;
/// false then.
async fn unless_closed(tx: &BlockSender, wait: impl std::future::Future<Output = ()>) -> bool {
    tokio::select! {
        _ = wait => true,
        _ = tx.closed() => false,
    }
}

/// One chunk of a block stream, as read.
struct Chunk {
    blocks: Vec<Bytes>,
    /// Index of the first reference not in this chunk.
    next: usize,
    /// Why the stream ends after this chunk, if it does.
    error: Option<Status>,
}

/// Reads, in one call of the store, the blocks of `refs` from `start` that
/// fit in `max_bytes` (at least one). A store error ends the stream with
/// nothing of its chunk; a store that returns no block at all, against its
/// contract, ends it too rather than read the same chunk for ever.
fn read_chunk(
    store: &dyn ConsensusStore,
    refs: &[BlockRef],
    start: usize,
    max_bytes: usize,
) -> Chunk {
    let mut chunk = Chunk {
        blocks: Vec::new(),
        next: start,
        error: None,
    };
    let asked = &refs[start..];
    let blocks = match store.block_bytes(asked, max_bytes) {
        Ok(blocks) if blocks.is_empty() && !asked.is_empty() => {
            chunk.error = Some(Status::internal("the store returned no block"));
            return chunk;
        }
        Ok(blocks) => blocks,
        Err(e) => {
            chunk.error = Some(store_error(e));
            return chunk;
        }
    };
    for (r, block) in asked.iter().zip(blocks) {
        let Some(block) = block else {
            chunk.error = Some(Status::not_found(format!("block {r} is not held")));
            return chunk;
        };
        chunk.blocks.push(block);
        chunk.next += 1;
    }
    chunk
}

#[cfg(test)]
mod tests {
    use soma_chain::{Chain, ChainBuilder, ChainConfig};
    use soma_store::MemStore;
    use soma_types::verify::verify_commit_batch;
    use soma_types::{AuthorityIndex, UnverifiedBlock, UnverifiedCommit};

    use super::*;

    /// A caller's limit lowers what an answer is filled to, never below
    /// the floor, never above the server's own; an old caller's (0) is
    /// the server's own.
    #[test]
    fn answers_are_filled_to_the_callers_limit_within_the_floor_and_our_own() {
        let own = 4 << 20;
        assert_eq!(asked_budget(own, 0), own);
        assert_eq!(asked_budget(own, 128 << 10), 128 << 10);
        assert_eq!(asked_budget(own, 1), MIN_ASKED_RESPONSE_BYTES);
        assert_eq!(asked_budget(own, 64 << 20), own);
        assert_eq!(asked_budget(own, u64::MAX), own);
    }

    /// Transactions of the largest payload (64 KiB) that fit in one block
    /// of at most 4 MiB: each block is within 2% of the largest allowed.
    const FULL_BLOCK_TRANSACTIONS: usize = 63;

    fn full_blocks_chain(stakes: Vec<Stake>, commits: CommitIndex) -> Chain {
        ChainBuilder::new(ChainConfig {
            stakes,
            transactions_per_block: FULL_BLOCK_TRANSACTIONS,
            payload_bytes: soma_types::Limits::default().max_transaction_payload_bytes,
            ..ChainConfig::default()
        })
        .build(commits)
    }

    fn small_blocks_chain(stakes: Vec<Stake>, commits: CommitIndex) -> Chain {
        ChainBuilder::new(ChainConfig {
            stakes,
            ..ChainConfig::default()
        })
        .build(commits)
    }

    fn stored(chain: &Chain) -> MemStore {
        let store = MemStore::new(chain.genesis());
        chain.write_to(&store, 100).unwrap();
        store
    }

    fn authors(blocks: &[VerifiedBlock]) -> Vec<u32> {
        blocks.iter().map(|b| b.block().author.0).collect()
    }

    /// Decodes an answer as a client does and checks it with the client's
    /// rule, from the commit after `after`; returns the certifiers' authors.
    fn verify_answer_after(
        response: &proto::FetchCommitsResponse,
        chain: &Chain,
        data: &soma_types::Limits,
        after: u64,
    ) -> Vec<u32> {
        let commits = response
            .commits
            .iter()
            .map(|b| UnverifiedCommit::decode(b.clone(), data.max_commit_bytes).unwrap())
            .collect();
        let certifiers = response
            .certifier_blocks
            .iter()
            .map(|b| UnverifiedBlock::decode(b.clone(), data.max_block_bytes).unwrap())
            .collect();
        let (_, certifiers) = verify_commit_batch(
            commits,
            certifiers,
            chain.genesis(),
            chain.commit_ref(after),
            data,
        )
        .unwrap();
        authors(&certifiers)
    }

    /// [`verify_answer_after`] the genesis commit.
    fn verify_answer(
        response: &proto::FetchCommitsResponse,
        chain: &Chain,
        data: &soma_types::Limits,
    ) -> Vec<u32> {
        verify_answer_after(response, chain, data, 0)
    }

    #[test]
    fn certificate_of_full_blocks_is_served_within_the_derived_bound() {
        let chain = full_blocks_chain(vec![1; 4], 2);
        let store = stored(&chain);
        let (limits, data) = (Limits::default(), soma_types::Limits::default());
        for block in chain.certificate(2) {
            let len = block.serialized().len();
            assert!(len > data.max_block_bytes * 98 / 100 && len <= data.max_block_bytes);
        }
        let bound = data.max_fetch_commits_response_bytes(limits.max_fetch_response_bytes, 4);

        let response = fetch_commits(&store, 1, 100, &limits, &data).unwrap();
        assert_eq!(response.commits.len(), 2);
        assert_eq!(verify_answer(&response, &chain, &data), vec![0, 1, 2]);
        assert!(response.encoded_len() <= bound);

        // A stored certificate padded with blocks that do not vote (the
        // commit's own full blocks) is still cut to the same minimal quorum.
        let mut padded = chain.certificate(2).to_vec();
        padded.extend(chain.blocks_of(2).iter().cloned());
        store.insert_certificate(2, padded).unwrap();
        let response = fetch_commits(&store, 1, 100, &limits, &data).unwrap();
        assert_eq!(verify_answer(&response, &chain, &data), vec![0, 1, 2]);
        assert!(response.encoded_len() <= bound);

        // Blocks over the limits peers accept make an answer over the
        // bound: it is refused here rather than sent and refused there.
        let smaller = soma_types::Limits {
            max_block_bytes: 1 << 20,
            ..data.clone()
        };
        let refused = fetch_commits(&store, 1, 100, &limits, &smaller).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Internal);
    }

    #[test]
    fn commits_held_without_a_certificate_yet_are_unavailable_not_denied() {
        let chain = small_blocks_chain(vec![1; 4], 4);
        let store = MemStore::new(chain.genesis());
        store.write_synced_batch(chain.batch(1..=2)).unwrap();
        // Commits 3 and 4 from local consensus, their votes still to come.
        for i in 3..=4 {
            store
                .write_synced_batch(soma_store::SyncedBatch {
                    commits: vec![chain.commit(i)],
                    blocks: chain.blocks_of(i).to_vec(),
                    certificate: Vec::new(),
                    next_committee: None,
                })
                .unwrap();
        }
        let (limits, data) = (Limits::default(), soma_types::Limits::default());
        let refused = fetch_commits(&store, 3, 4, &limits, &data).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused}");
        // A range reaching certified commits is served up to them.
        let response = fetch_commits(&store, 1, 4, &limits, &data).unwrap();
        assert_eq!(response.commits.len(), 2);
        // Once the certificate of 4 is in, 3 and 4 are served.
        store
            .insert_certificate(4, chain.certificate(4).to_vec())
            .unwrap();
        let response = fetch_commits(&store, 3, 4, &limits, &data).unwrap();
        assert_eq!(response.commits.len(), 2);
        verify_answer(
            &fetch_commits(&store, 1, 4, &limits, &data).unwrap(),
            &chain,
            &data,
        );
    }

    #[test]
    fn a_range_is_certified_at_its_end_by_the_votes_after_it_when_no_certificate_of_it_is_kept() {
        // Certificates kept at 20 and 40 only, as a node keeps them that
        // synced in batches of 20. Each authority votes for commit c in its
        // block of round c + 3, committed by commit c + 4: every commit up to
        // 36 has its votes held, 37..=39 do not.
        let chain = small_blocks_chain(vec![1; 4], 40);
        let store = MemStore::new(chain.genesis());
        chain.write_to(&store, 20).unwrap();
        let (limits, data) = (Limits::default(), soma_types::Limits::default());
        for end in 21..=40 {
            let answer = fetch_commits(&store, 21, end, &limits, &data);
            if (37..=39).contains(&end) {
                let refused = answer.unwrap_err();
                assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused}");
                continue;
            }
            let answer = answer.unwrap();
            assert_eq!(answer.commits.len() as u64, end - 20, "21..={end}");
            let certifiers = verify_answer_after(&answer, &chain, &data, 20);
            assert_eq!(certifiers.len(), 3, "a minimal quorum for 21..={end}");
        }
        // Below a kept certificate, the range ends where it was asked to.
        let answer = fetch_commits(&store, 1, 10, &limits, &data).unwrap();
        assert_eq!(answer.commits.len(), 10);
        assert_eq!(verify_answer(&answer, &chain, &data), [0, 1, 2]);
        // Past one too, in one answer, when the votes after it are held ...
        let answer = fetch_commits(&store, 1, 30, &limits, &data).unwrap();
        assert_eq!(answer.commits.len(), 30);
        assert_eq!(verify_answer(&answer, &chain, &data), [0, 1, 2]);
        // ... and up to the kept certificate when they are not.
        let answer = fetch_commits(&store, 1, 38, &limits, &data).unwrap();
        assert_eq!(answer.commits.len(), 20);
        assert_eq!(verify_answer(&answer, &chain, &data), [0, 1, 2]);
    }

    /// A range no kept certificate covers, whose end the votes held do not
    /// certify yet, is refused before a commit of it is read: the refusal
    /// costs its caller nothing, so it must cost us no read of the range.
    #[test]
    fn a_range_no_certificate_covers_is_refused_before_it_is_read() {
        use soma_testkit::failing_store::FailingStore;
        // As above: kept at 20 and 40, votes held for every commit to 36.
        let chain = small_blocks_chain(vec![1; 4], 40);
        let store = FailingStore::new(MemStore::new(chain.genesis()));
        chain.write_to(&store, 20).unwrap();
        let (limits, data) = (Limits::default(), soma_types::Limits::default());
        let refused = commits_answer(&store, 21, 38, &limits, &data, &|| true).unwrap_err();
        assert!(matches!(refused, Refused::NoCertificate(_)), "{refused:?}");
        assert_eq!(store.commits_read(), 0);
        // Certified by the votes after it: read once, from 21 to 36, with
        // the certificate the search before the read made.
        let answer = commits_answer(&store, 21, 36, &limits, &data, &|| true).unwrap();
        assert_eq!(answer.commits.len(), 16);
        assert_eq!(store.commits_read(), 16);
        assert_eq!(verify_answer_after(&answer, &chain, &data, 20).len(), 3);
        // Reaching the kept certificate at 40: read to its end.
        let answer = commits_answer(&store, 37, 40, &limits, &data, &|| true).unwrap();
        assert_eq!(answer.commits.len(), 4);
        assert_eq!(store.commits_read(), 20);
    }

    #[test]
    fn a_chunk_of_blocks_is_one_read_of_the_store_and_holds_as_many_as_fit() {
        use soma_testkit::failing_store::FailingStore;
        let chain = small_blocks_chain(vec![1; 4], 30);
        let store = FailingStore::new(MemStore::new(chain.genesis()));
        chain.write_to(&store, 10).unwrap();
        let blocks: Vec<Bytes> = (1..=30)
            .flat_map(|i| chain.blocks_of(i).iter().map(|b| b.serialized().clone()))
            .collect();
        let mut refs: Vec<BlockRef> = (1..=30)
            .flat_map(|i| chain.blocks_of(i).iter().map(VerifiedBlock::reference))
            .collect();
        // Room for ten and a half of the first blocks.
        let max_bytes = blocks[..10].iter().map(Bytes::len).sum::<usize>() + blocks[10].len() / 2;
        // The chunks a greedy cut of the blocks' sizes gives.
        let mut expected: Vec<Vec<Bytes>> = vec![Vec::new()];
        for block in &blocks {
            let held: usize = expected.last().unwrap().iter().map(Bytes::len).sum();
            if held + block.len() > max_bytes {
                expected.push(Vec::new());
            }
            expected.last_mut().unwrap().push(block.clone());
        }
        assert!(expected.len() > 5, "{} chunks", expected.len());

        let read_all = |refs: &[BlockRef]| {
            let (mut next, mut chunks) = (0, Vec::new());
            while next < refs.len() {
                let chunk = read_chunk(&store, refs, next, max_bytes);
                next = chunk.next;
                chunks.push(chunk.blocks);
                if let Some(status) = chunk.error {
                    return (chunks, Some(status));
                }
            }
            (chunks, None)
        };
        let (chunks, error) = read_all(&refs);
        assert!(error.is_none(), "{error:?}");
        assert_eq!(chunks, expected);
        assert_eq!(store.block_bytes_reads(), expected.len() as u64);

        // A block not held ends the stream with NOT_FOUND after the blocks
        // before it.
        refs[12].digest = soma_types::Digest::ZERO;
        let (chunks, error) = read_all(&refs);
        assert_eq!(chunks.concat(), blocks[..12]);
        assert_eq!(error.map(|s| s.code()), Some(tonic::Code::NotFound));

        // A faulty store that returns no block at all ends the stream
        // rather than have the same chunk read again and again.
        store.return_no_block_bytes();
        let chunk = read_chunk(&store, &refs, 3, max_bytes);
        assert_eq!((chunk.blocks.len(), chunk.next), (0, 3));
        assert_eq!(chunk.error.map(|s| s.code()), Some(tonic::Code::Internal));
    }

    #[test]
    fn a_read_no_longer_wanted_stops_before_the_vote_search_reads_a_block() {
        use std::cell::Cell;

        use soma_testkit::failing_store::FailingStore;
        let chain = small_blocks_chain(vec![1; 4], 40);
        let store = FailingStore::new(MemStore::new(chain.genesis()));
        chain.write_to(&store, 20).unwrap();
        let (limits, data) = (Limits::default(), soma_types::Limits::default());
        // Wanted when the read starts, not after: the caller reset its call
        // while the commits were read. 21..=25 has no kept certificate, so
        // its end is certified by the votes after it, which are not read.
        let checks = Cell::new(0);
        let wanted = || {
            checks.set(checks.get() + 1);
            checks.get() == 1
        };
        let refused = commits_answer(&store, 21, 25, &limits, &data, &wanted).unwrap_err();
        assert!(matches!(refused, Refused::Abandoned), "{refused:?}");
        assert_eq!(Status::from(refused).code(), tonic::Code::Cancelled);
        assert_eq!(store.most_blocks_read_at_once(), 0, "no block read");
        // Wanted throughout, the same request reads the votes (a block at
        // a time: by default an answer has room for one of the largest).
        let answer = commits_answer(&store, 21, 25, &limits, &data, &|| true).unwrap();
        assert_eq!(answer.commits.len(), 5);
        assert_eq!(store.most_blocks_read_at_once(), 1);
        // Not wanted from the start: nothing is read at all.
        let refused = commits_answer(&store, 1, 20, &limits, &data, &|| false).unwrap_err();
        assert!(matches!(refused, Refused::Abandoned), "{refused:?}");
    }

    #[test]
    fn commits_read_a_few_at_a_time_are_those_of_one_read_and_stop_once_not_wanted() {
        use std::cell::Cell;

        let chain = small_blocks_chain(vec![1; 4], 100);
        let store = stored(&chain);
        let size = chain.commit(1).serialized().len();
        let indexes =
            |c: &[soma_types::TrustedCommit]| c.iter().map(|c| c.index()).collect::<Vec<_>>();
        let sizes = |range: std::ops::RangeInclusive<CommitIndex>| {
            range
                .map(|i| chain.commit(i).serialized().len())
                .sum::<usize>()
        };
        for (start, end) in [(1, 100), (5, 70), (33, 64), (90, 120), (100, 100)] {
            // Exactly the first read's commits, and one byte more: the
            // second read's first commit comes whatever the budget left.
            let first = sizes(start..=(start + COMMITS_READ - 1).min(100));
            let budgets = [
                0,
                1,
                size,
                first - 1,
                first,
                first + 1,
                2 * first,
                usize::MAX,
            ];
            for budget in budgets {
                let whole = store.commits_in_range(start..=end, budget).unwrap();
                let read = commits_read(&store, start..=end, budget, &|| true).unwrap();
                assert_eq!(
                    indexes(&read),
                    indexes(&whole),
                    "{start}..={end} in {budget}"
                );
            }
        }
        // No longer wanted once the first read is done: the second is not
        // made.
        let checks = Cell::new(0);
        let wanted = || {
            checks.set(checks.get() + 1);
            false
        };
        let refused = commits_read(&store, 1..=100, usize::MAX, &wanted).unwrap_err();
        assert!(matches!(refused, Refused::Abandoned), "{refused:?}");
        assert_eq!(checks.get(), 1);
    }

    #[test]
    fn the_vote_search_reads_no_more_blocks_at_once_than_an_answer_may_hold() {
        use soma_testkit::failing_store::FailingStore;
        // Seven authorities: a commit names seven blocks, all read in one
        // go unless the reads are held to what an answer may hold.
        let chain = small_blocks_chain(vec![1; 7], 40);
        let store = FailingStore::new(MemStore::new(chain.genesis()));
        chain.write_to(&store, 20).unwrap();
        let data = soma_types::Limits::default();
        // Room for two of the largest blocks in an answer.
        let limits = Limits {
            max_fetch_response_bytes: 2 * data.max_block_bytes,
            ..Limits::default()
        };
        // No certificate kept at 25: certified by the votes after it.
        let answer = fetch_commits(&store, 21, 25, &limits, &data).unwrap();
        assert_eq!(answer.commits.len(), 5);
        assert_eq!(verify_answer_after(&answer, &chain, &data, 20).len(), 5);
        assert_eq!(store.most_blocks_read_at_once(), 2);
    }

    #[test]
    fn unequal_stakes_send_the_fewest_certifiers_the_client_accepts() {
        // Total 7, quorum 5: authors 0 (3) and 3 (2) are the fewest.
        let chain = small_blocks_chain(vec![3, 1, 1, 2], 4);
        let store = stored(&chain);
        let (limits, data) = (Limits::default(), soma_types::Limits::default());
        let response = fetch_commits(&store, 1, 100, &limits, &data).unwrap();
        assert_eq!(response.commits.len(), 4);
        assert_eq!(verify_answer(&response, &chain, &data), vec![0, 3]);
    }

    #[test]
    fn minimal_certificate_of_four_equal_stakes_has_three_blocks() {
        let chain = small_blocks_chain(vec![1; 4], 3);
        let certificate = chain.certificate(3);
        assert_eq!(authors(certificate), vec![0, 1, 2, 3]);
        let sent = minimal_certificate(certificate.to_vec(), chain.commit_ref(3), chain.genesis())
            .unwrap();
        assert_eq!(authors(&sent), vec![0, 1, 2]);
    }

    #[test]
    fn minimal_certificate_takes_the_largest_stakes_first() {
        // Total 10, quorum 7: author 3 alone.
        let chain = small_blocks_chain(vec![1, 1, 1, 7], 3);
        let sent = minimal_certificate(
            chain.certificate(3).to_vec(),
            chain.commit_ref(3),
            chain.genesis(),
        )
        .unwrap();
        assert_eq!(authors(&sent), vec![3]);

        // Total 6, quorum 5: ties go by author index, 1 before 2.
        let chain = small_blocks_chain(vec![1, 2, 2, 1], 3);
        let sent = minimal_certificate(
            chain.certificate(3).to_vec(),
            chain.commit_ref(3),
            chain.genesis(),
        )
        .unwrap();
        assert_eq!(authors(&sent), vec![1, 2, 0]);
    }

    #[test]
    fn minimal_certificate_counts_only_distinct_voters_for_the_commit() {
        let chain = small_blocks_chain(vec![1; 4], 3);
        let (voters, last) = (chain.certificate(3), chain.commit_ref(3));
        // Non-voting blocks first, and author 0 twice: neither counts.
        let mut stored: Vec<VerifiedBlock> = chain.blocks_of(3).to_vec();
        stored.extend([voters[0].clone(), voters[0].clone(), voters[3].clone()]);
        assert!(minimal_certificate(stored.clone(), last, chain.genesis()).is_none());
        stored.push(voters[2].clone());
        let sent = minimal_certificate(stored, last, chain.genesis()).unwrap();
        assert_eq!(authors(&sent), vec![0, 2, 3]);
        assert!(sent.iter().all(
            |b| b.block().commit_votes.contains(&last) && b.block().author != AuthorityIndex(1)
        ));
        // Votes for another commit certify nothing here.
        assert!(
            minimal_certificate(voters.to_vec(), chain.commit_ref(2), chain.genesis()).is_none()
        );
    }
}
