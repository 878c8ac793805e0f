use std::collections::HashSet;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

use bytes::Bytes;
use rayon::prelude::*;
use soma_types::verify::{
    self, Fill, NodeInfoPolicy, SignatureBatch, check_block, check_transaction,
};
use soma_types::{
    Committee, Domain, KeyCache, Limits, SignedItem, SignedNodeInfo, Transaction, UnverifiedBlock,
    UnverifiedCommit, VerifiedBlock, codec,
};

use super::messages::{VerifyError, VerifyRequest, VerifyResponse};
use crate::{Blob, DecodedBlock, HashedBlob};

/// Room for a transaction's fixed fields beyond its payload.
const TRANSACTION_OVERHEAD: usize = 256;

/// Work the core started: one request, or block requests of one epoch and
/// rule to verify as one batch; the committee they need and how many parts
/// to split the work into.
#[derive(Debug)]
pub struct Job {
    /// What to verify, in order.
    pub requests: Vec<VerifyRequest>,
    /// The committee of the request's epoch.
    pub committee: Option<Arc<Committee>>,
    /// Parts to split the work into (one per thread at most).
    pub parts: usize,
    /// Size limits.
    pub limits: Limits,
    /// Decompressed signer keys, shared by every job.
    pub keys: Arc<KeyCache>,
}

/// Runs a job: one result per request, in order, each exactly what the
/// request verified alone would give. Parts run in parallel on the current
/// rayon pool; errors are reported for the first bad item in request
/// order, whatever the split.
///
/// Merged block requests are verified as one batch; if it fails, each
/// request is verified again on its own, so that one request's bad item
/// fails that request only. Blocks reach the Verifier matched to the
/// digests of certified commits, so a failure means a faulty committee,
/// and the second pass is not a cost a peer can impose.
pub fn run_job(mut job: Job) -> Vec<Result<VerifyResponse, VerifyError>> {
    if job.requests.len() > 1
        && let Ok(Ok(verified)) = catch_unwind(AssertUnwindSafe(|| verify_merged_blocks(&mut job)))
    {
        return verified;
    }
    // One at a time, a panic failing only its own request.
    std::mem::take(&mut job.requests)
        .into_iter()
        .map(|request| {
            catch_unwind(AssertUnwindSafe(|| run_request(request, &job)))
                .unwrap_or(Err(VerifyError::Internal))
        })
        .collect()
}

/// The merged block requests of `job` as one batch, split back into one
/// answer per request. The requests are taken out of `job` only once the
/// batch has passed.
pub(super) fn verify_merged_blocks(
    job: &mut Job,
) -> Result<Vec<Result<VerifyResponse, VerifyError>>, VerifyError> {
    let committee = job.committee.clone().ok_or(VerifyError::Internal)?;
    // Signatures checked, blocks decoded: the same for every request.
    let mut rule = None;
    let mut bytes = Vec::new();
    let mut decoded = Vec::new();
    let mut lengths = Vec::with_capacity(job.requests.len());
    for request in &job.requests {
        let (epoch, this_rule, n) = match request {
            VerifyRequest::Blocks {
                epoch,
                blocks,
                check_signatures,
            } => {
                bytes.extend(blocks.iter().cloned());
                (*epoch, (*check_signatures, false), blocks.len())
            }
            VerifyRequest::DecodedBlocks {
                epoch,
                blocks,
                check_signatures,
            } => {
                decoded.extend(blocks.iter().map(DecodedBlock::block));
                (*epoch, (*check_signatures, true), blocks.len())
            }
            _ => return Err(VerifyError::Internal),
        };
        if epoch != committee.epoch() || *rule.get_or_insert(this_rule) != this_rule {
            return Err(VerifyError::Internal);
        }
        lengths.push(n);
    }
    let (check_signatures, _) = rule.ok_or(VerifyError::Internal)?;
    let limits = &job.limits;
    if !decoded.is_empty() {
        check_in_parts(
            &decoded,
            job.parts,
            &committee,
            limits,
            check_signatures,
            &job.keys,
        )?;
        drop(decoded);
        return Ok(std::mem::take(&mut job.requests)
            .into_iter()
            .map(|request| match request {
                VerifyRequest::DecodedBlocks { blocks, .. } => {
                    Ok(VerifyResponse::Blocks(trusted(blocks)))
                }
                _ => Err(VerifyError::Internal),
            })
            .collect());
    }
    let mut verified = in_parts(&bytes, job.parts, |_, chunk| {
        verify_block_chunk(chunk, &committee, limits, check_signatures, &job.keys)
    })?
    .into_iter();
    Ok(lengths
        .into_iter()
        .map(|n| Ok(VerifyResponse::Blocks(verified.by_ref().take(n).collect())))
        .collect())
}

/// Runs one request.
fn run_request(request: VerifyRequest, job: &Job) -> Result<VerifyResponse, VerifyError> {
    let limits = &job.limits;
    let committee = || job.committee.as_deref().ok_or(VerifyError::Internal);
    match request {
        VerifyRequest::Blocks {
            blocks,
            check_signatures,
            ..
        } => {
            let committee = committee()?;
            let verified = in_parts(&blocks, job.parts, |_, chunk| {
                verify_block_chunk(chunk, committee, limits, check_signatures, &job.keys)
            })?;
            Ok(VerifyResponse::Blocks(verified))
        }
        VerifyRequest::DecodedBlocks {
            blocks,
            check_signatures,
            ..
        } => {
            let committee = committee()?;
            let refs: Vec<&UnverifiedBlock> = blocks.iter().map(DecodedBlock::block).collect();
            check_in_parts(
                &refs,
                job.parts,
                committee,
                limits,
                check_signatures,
                &job.keys,
            )?;
            drop(refs);
            Ok(VerifyResponse::Blocks(trusted(blocks)))
        }
        VerifyRequest::CommitBatch {
            commits,
            certifiers,
            last_synced,
            ..
        } => {
            let committee = committee()?;
            let (commits, certifiers) =
                decode_commit_batch(&commits, &certifiers, committee, limits)?;
            let (commits, certifiers) =
                verify::verify_commit_batch(commits, certifiers, committee, last_synced, limits)
                    .map_err(VerifyError::Invalid)?;
            Ok(VerifyResponse::CommitBatch {
                commits,
                certifiers,
            })
        }
        VerifyRequest::CommitRun {
            start,
            commits,
            certifiers,
            ..
        } => {
            let committee = committee()?;
            // Refused by a rule: kept with what the check at its turn
            // needs to give the same verdict without checking again.
            let refused = |first, error| {
                Ok(VerifyResponse::RefusedRun(Box::new(
                    verify::RefusedRun::new(first, start, committee.epoch(), error),
                )))
            };
            let (commits, certifiers) =
                match decode_commit_batch(&commits, &certifiers, committee, limits) {
                    Ok(decoded) => decoded,
                    Err(VerifyError::Invalid(e)) => return refused(None, e),
                    Err(e) => return Err(e),
                };
            let first = commits.first().cloned();
            match verify::certify_commit_run(
                commits,
                certifiers,
                committee,
                start,
                limits,
                Some(&job.keys),
            ) {
                Ok(run) => Ok(VerifyResponse::CommitRun(run)),
                Err(e) => refused(first, e),
            }
        }
        VerifyRequest::NodeInfos {
            infos,
            now_ms,
            local,
            allowlist,
        } => {
            let allowlist: Option<HashSet<_>> = allowlist.map(|a| a.into_iter().collect());
            let policy = NodeInfoPolicy {
                now_ms,
                local,
                allowlist: allowlist.as_ref(),
            };
            let decoded: Vec<Result<SignedNodeInfo, soma_types::Error>> = infos
                .iter()
                .map(|b| codec::decode(&b.0, limits.max_node_info_bytes))
                .collect();
            let good: Vec<SignedNodeInfo> = decoded.iter().filter_map(|d| d.clone().ok()).collect();
            let mut checked = verify::verify_node_infos(&good, &policy, limits).into_iter();
            let results = decoded
                .into_iter()
                .map(|d| {
                    let info = d?;
                    checked
                        .next()
                        .unwrap_or(Err(soma_types::Error::Malformed("missing result".into())))?;
                    Ok(info)
                })
                .collect();
            Ok(VerifyResponse::NodeInfos(results))
        }
        VerifyRequest::Transactions { transactions } => {
            let verified = in_parts(&transactions, job.parts, |offset, chunk| {
                verify_transaction_chunk(chunk, offset, limits, &job.keys)
            })?;
            Ok(VerifyResponse::Transactions(verified))
        }
    }
}

/// Splits `items` into `parts` consecutive chunks, runs `f(first index,
/// chunk)` on each in parallel, and concatenates the results in order; the
/// first failing chunk in order decides the error.
fn in_parts<I: Sync, T: Send>(
    items: &[I],
    parts: usize,
    f: impl Fn(usize, &[I]) -> Result<Vec<T>, VerifyError> + Sync,
) -> Result<Vec<T>, VerifyError> {
    if items.is_empty() {
        return Ok(Vec::new());
    }
    let chunk_len = items.len().div_ceil(parts.max(1));
    let results: Vec<Result<Vec<T>, VerifyError>> = items
        .par_chunks(chunk_len)
        .enumerate()
        .map(|(i, chunk)| f(i * chunk_len, chunk))
        .collect();
    let mut out = Vec::with_capacity(items.len());
    for r in results {
        out.extend(r?);
    }
    Ok(out)
}

/// The commits and certifier blocks of a commit answer, decoded; more
/// certifier blocks than `committee` has members (a certificate needs one
/// per authority at most) are refused before any is decoded.
///
/// A first commit of another epoch than `committee`'s is refused as such
/// before the certifiers are counted, as the full check refuses it before
/// any other rule: a batch of a later epoch is that epoch's claim, judged
/// once the epoch is known, and its certificate is counted against its
/// own committee, which may be larger (the first batches past an epoch's
/// end, fetched before it was known, were refused as having too many
/// certifiers and their honest senders banned).
fn decode_commit_batch(
    commits: &[Blob],
    certifiers: &[Blob],
    committee: &Committee,
    limits: &Limits,
) -> Result<(Vec<UnverifiedCommit>, Vec<UnverifiedBlock>), VerifyError> {
    let commits = decode_all(commits, |b| {
        UnverifiedCommit::decode(b, limits.max_commit_bytes)
    })?;
    if let Some(first) = commits.first().map(UnverifiedCommit::commit)
        && first.epoch != committee.epoch()
    {
        return Err(VerifyError::Invalid(soma_types::Error::CommitWrongEpoch {
            index: first.index,
            got: first.epoch,
            expected: committee.epoch(),
        }));
    }
    if certifiers.len() > committee.size() {
        return Err(VerifyError::Invalid(soma_types::Error::TooManyCertifiers {
            count: certifiers.len(),
            limit: committee.size(),
        }));
    }
    let certifiers = decode_all(certifiers, |b| {
        UnverifiedBlock::decode(b, limits.max_block_bytes)
    })?;
    Ok((commits, certifiers))
}

fn decode_all<T>(
    items: &[Blob],
    decode: impl Fn(Bytes) -> soma_types::Result<T>,
) -> Result<Vec<T>, VerifyError> {
    items
        .iter()
        .map(|b| decode(b.0.clone()).map_err(VerifyError::Invalid))
        .collect()
}

/// Decodes a chunk of blocks received as bytes and checks them.
fn verify_block_chunk(
    chunk: &[HashedBlob],
    committee: &Committee,
    limits: &Limits,
    check_signatures: bool,
    keys: &Arc<KeyCache>,
) -> Result<Vec<VerifiedBlock>, VerifyError> {
    let blocks = chunk
        .iter()
        .map(|b| {
            UnverifiedBlock::decode_hashed_bytes(
                b.hashed().clone(),
                limits.max_block_bytes,
                check_signatures,
            )
            .map_err(VerifyError::Invalid)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let refs: Vec<&UnverifiedBlock> = blocks.iter().collect();
    check_blocks(&refs, committee, limits, check_signatures, keys)?;
    Ok(blocks
        .into_iter()
        .map(UnverifiedBlock::into_trusted)
        .collect())
}

/// Decoded blocks checked as their bytes would be, on `parts` chunks in
/// parallel: in each chunk the size limit the bytes would have been
/// decoded within (whoever decoded them may have used another), then
/// [`check_blocks`]; the first failing chunk in order decides the error.
fn check_in_parts(
    blocks: &[&UnverifiedBlock],
    parts: usize,
    committee: &Committee,
    limits: &Limits,
    check_signatures: bool,
    keys: &Arc<KeyCache>,
) -> Result<(), VerifyError> {
    let limit = limits.max_block_bytes.min(codec::MAX_DECODE_BYTES);
    in_parts(blocks, parts, |_, chunk| {
        if let Some(b) = chunk.iter().find(|b| b.serialized().len() > limit) {
            let len = b.serialized().len();
            return Err(VerifyError::Invalid(soma_types::Error::TooLarge {
                len,
                limit,
            }));
        }
        check_blocks(chunk, committee, limits, check_signatures, keys).map(|()| Vec::<()>::new())
    })
    .map(drop)
}

/// Every block rule, and the signatures of the blocks and their
/// transactions in one batch if `check_signatures`.
fn check_blocks(
    blocks: &[&UnverifiedBlock],
    committee: &Committee,
    limits: &Limits,
    check_signatures: bool,
    keys: &Arc<KeyCache>,
) -> Result<(), VerifyError> {
    let signatures = blocks
        .iter()
        .map(|b| 1 + b.block().transactions.len())
        .sum();
    // Blocks matched to digests of certified commits: their keys are kept.
    let mut batch = SignatureBatch::with_cache(signatures, keys.clone(), Fill::Yes);
    for block in blocks {
        check_block(
            block,
            committee,
            limits,
            check_signatures.then_some(&mut batch),
        )
        .map_err(VerifyError::Invalid)?;
    }
    batch.verify().map_err(VerifyError::Invalid)
}

/// Blocks that passed every check, as verified blocks.
fn trusted(blocks: Vec<DecodedBlock>) -> Vec<VerifiedBlock> {
    blocks
        .into_iter()
        .map(|b| b.into_block().into_trusted())
        .collect()
}

fn verify_transaction_chunk(
    chunk: &[Blob],
    offset: usize,
    limits: &Limits,
    keys: &Arc<KeyCache>,
) -> Result<Vec<Transaction>, VerifyError> {
    let limit = limits.max_transaction_payload_bytes + TRANSACTION_OVERHEAD;
    let txs: Vec<Transaction> = decode_all(chunk, |b| codec::decode(&b, limit))?;
    // Anyone's transactions, not yet checked: looked up, never kept.
    let mut batch = SignatureBatch::with_cache(txs.len(), keys.clone(), Fill::No);
    for (i, tx) in txs.iter().enumerate() {
        check_transaction(tx, limits).map_err(VerifyError::Invalid)?;
        batch.push(
            &tx.sender,
            Domain::Transaction,
            &tx.signing_digest(),
            &tx.signature,
            SignedItem::LooseTransaction((offset + i) as u32),
        );
    }
    batch.verify().map_err(VerifyError::Invalid)?;
    Ok(txs)
}

#[cfg(test)]
mod tests {
    use soma_chain::{ChainBuilder, ChainConfig};

    use super::*;

    /// More certifier blocks than the committee has members are refused
    /// before one is decoded: bytes that decode to nothing, past the
    /// count, give the count's error, not a decoding one. A run refused
    /// ahead for its bytes keeps that error as its verdict for its turn,
    /// as the full check decodes before any rule: even after a commit its
    /// first does not link to. Neither refusal stands alone: more
    /// certifiers than this committee has members is the honest quorum of
    /// a larger next committee, checked under this one too early.
    #[test]
    fn certifiers_past_the_committee_size_are_refused_before_decoding() {
        let chain = ChainBuilder::new(ChainConfig::validators(4)).build(1);
        let job = Job {
            requests: Vec::new(),
            committee: Some(Arc::new(chain.genesis().clone())),
            parts: 1,
            limits: Limits::default(),
            keys: Arc::new(KeyCache::new(64)),
        };
        let (commits, _) = chain.fetch_commits(1..=1);
        let garbage = |n| vec![Blob(Bytes::from_static(b"not a block")); n];
        let request = |certifiers| VerifyRequest::CommitRun {
            epoch: 0,
            start: 1,
            commits: vec![Blob(commits[0].serialized().clone())],
            certifiers,
        };
        let mut unlinked = chain.commit_ref(0);
        unlinked.digest.0[0] ^= 1;
        let refusal = |certifiers| match run_request(request(certifiers), &job) {
            Ok(VerifyResponse::RefusedRun(refused)) => {
                assert_eq!(refused.epoch(), 0);
                assert_eq!(
                    refused.verdict(unlinked).as_ref(),
                    Some(refused.error()),
                    "the verdict is the decoding's"
                );
                assert!(!refused.stands_alone(), "judged before its turn");
                refused.error().clone()
            }
            other => panic!("{other:?}"),
        };
        assert_eq!(
            refusal(garbage(5)),
            soma_types::Error::TooManyCertifiers { count: 5, limit: 4 }
        );
        // As many as the committee: decoded, and refused as undecodable.
        let decoded = refusal(garbage(4));
        assert!(
            !matches!(decoded, soma_types::Error::TooManyCertifiers { .. }),
            "{decoded:?}"
        );
    }

    #[test]
    fn merged_block_requests_verify_as_one_batch_and_each_gets_its_own_blocks() {
        let chain = ChainBuilder::new(ChainConfig::validators(4)).build(30);
        let ranges = [1..=4, 5..=5, 6..=30];
        let blobs = |r: &std::ops::RangeInclusive<u64>| -> Vec<HashedBlob> {
            chain
                .fetch_blocks(r.clone())
                .iter()
                .map(|b| HashedBlob::new(b.serialized().clone()))
                .collect()
        };
        // As bytes, and decoded where they arrived.
        for decoded in [false, true] {
            let requests = ranges
                .iter()
                .map(|r| match decoded {
                    false => VerifyRequest::Blocks {
                        epoch: 0,
                        blocks: blobs(r),
                        check_signatures: true,
                    },
                    true => VerifyRequest::DecodedBlocks {
                        epoch: 0,
                        blocks: blobs(r)
                            .iter()
                            .map(|b| DecodedBlock::decode(b, usize::MAX, true).unwrap())
                            .collect(),
                        check_signatures: true,
                    },
                })
                .collect();
            let mut job = Job {
                requests,
                committee: Some(Arc::new(chain.genesis().clone())),
                parts: 2,
                limits: Limits::default(),
                keys: Arc::new(KeyCache::new(64)),
            };
            // The batch of all three passes as one, not request by request.
            let answers = verify_merged_blocks(&mut job).expect("honest blocks pass as one batch");
            assert_eq!(answers.len(), 3);
            for (answer, range) in answers.into_iter().zip(ranges.clone()) {
                let Ok(VerifyResponse::Blocks(blocks)) = answer else {
                    panic!("honest blocks refused");
                };
                let got: Vec<_> = blocks.iter().map(|b| b.reference()).collect();
                let expected: Vec<_> = chain
                    .fetch_blocks(range)
                    .iter()
                    .map(UnverifiedBlock::reference)
                    .collect();
                assert_eq!(got, expected);
            }
        }
    }
}
