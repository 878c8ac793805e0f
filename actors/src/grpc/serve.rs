//! Reads that answer RPCs from the store. They run on tokio's blocking pool.

use std::sync::Arc;

use bytes::Bytes;
use soma_store::ConsensusStore;
use soma_types::{BlockRef, CommitIndex};
use soma_wire::proto;
use tokio::sync::mpsc;
use tonic::Status;

use super::core::Limits;

/// References read from the store at a time while streaming blocks.
const READ_BATCH: usize = 64;

pub(super) fn store_error(e: soma_store::Error) -> Status {
    Status::unavailable(format!("store: {e}"))
}

/// FetchCommits: commits from `start`, ending at the epoch's last commit if
/// that comes first, then at the highest commit in range whose certificate
/// is held, within the byte budget; with that certificate's blocks.
pub(super) fn fetch_commits(
    store: &dyn ConsensusStore,
    start: CommitIndex,
    end: CommitIndex,
    limits: &Limits,
) -> Result<proto::FetchCommitsResponse, Status> {
    let highest = store.highest_synced_commit().map_err(store_error)?.index;
    let lowest = store.lowest_available_commit().map_err(store_error)?;
    if start < lowest {
        return Err(Status::not_found(format!(
            "commits below {lowest} are pruned"
        )));
    }
    if start > highest {
        return Err(Status::not_found(format!(
            "commit {start} is past our highest, {highest}"
        )));
    }
    let mut end = end.min(highest);
    let first = store
        .commit(start)
        .map_err(store_error)?
        .ok_or_else(|| Status::not_found(format!("commit {start} is not held")))?;
    if let Some(last) = store
        .last_commit_of_epoch(first.commit().epoch)
        .map_err(store_error)?
    {
        end = end.min(last);
    }
    let mut commits = store
        .commits_in_range(start..=end, limits.max_fetch_response_bytes)
        .map_err(store_error)?;
    let read_end = commits.last().map_or(start, |c| c.index());
    let certified = store
        .highest_certified_in(start..=read_end)
        .map_err(store_error)?
        .ok_or_else(|| Status::not_found(format!("no certificate held in {start}..={read_end}")))?;
    commits.retain(|c| c.index() <= certified);
    let certifiers = store
        .certificate(certified)
        .map_err(store_error)?
        .unwrap_or_default();
    Ok(proto::FetchCommitsResponse {
        commits: commits.iter().map(|c| c.serialized().clone()).collect(),
        certifier_blocks: certifiers.iter().map(|b| b.serialized().clone()).collect(),
    })
}

/// FetchBlocks: streams the blocks in request order, in chunks of at most
/// `max_bytes` (a single larger block goes alone). Stops with NOT_FOUND at
/// the first block not held, and quietly when the caller goes away. The
/// channel is bounded, so a slow reader holds back the reads.
pub(super) fn stream_blocks(
    store: Arc<dyn ConsensusStore>,
    refs: Vec<BlockRef>,
    max_bytes: usize,
    tx: mpsc::Sender<Result<proto::FetchBlocksResponse, Status>>,
) {
    let mut chunk: Vec<Bytes> = Vec::new();
    let mut chunk_bytes = 0usize;
    let send = |chunk: Vec<Bytes>| {
        tx.blocking_send(Ok(proto::FetchBlocksResponse { blocks: chunk }))
            .is_ok()
    };
    for refs in refs.chunks(READ_BATCH) {
        let blocks = match store.blocks(refs) {
            Ok(b) => b,
            Err(e) => {
                let _ = tx.blocking_send(Err(store_error(e)));
                return;
            }
        };
        for (r, block) in refs.iter().zip(blocks) {
            let Some(block) = block else {
                let _ = tx.blocking_send(Err(Status::not_found(format!("block {r} is not held"))));
                return;
            };
            let bytes = block.serialized().clone();
            if !chunk.is_empty() && chunk_bytes + bytes.len() > max_bytes {
                if !send(std::mem::take(&mut chunk)) {
                    return;
                }
                chunk_bytes = 0;
            }
            chunk_bytes += bytes.len();
            chunk.push(bytes);
        }
    }
    if !chunk.is_empty() {
        send(chunk);
    }
}
