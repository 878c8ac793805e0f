//! Writing batches: a task that copies each certified batch of the store
//! into the archive, behind sync and never in its way.

use std::sync::Arc;
use std::time::Duration;

use soma_store::ConsensusStore;
use soma_types::{BlockRef, CommitIndex, batch_end};
use tokio::sync::watch;

use super::{Archive, ArchiveError, ArchiveStats, ArchivedBatch, HeadRecord};
use crate::grpc::{self, Refused};

/// What the writer needs.
#[derive(Clone)]
pub(crate) struct WriterDeps {
    pub(crate) archive: Archive,
    pub(crate) store: Arc<dyn ConsensusStore>,
    /// The serving limits: a batch is what FetchCommits would answer.
    pub(crate) grpc: grpc::Limits,
    pub(crate) data: soma_types::Limits,
    /// Commits per batch (the node's `commit-sync-batch-size`).
    pub(crate) batch_size: u64,
    /// The next commit to archive, published for pruning: nothing at or
    /// above it is pruned.
    pub(crate) archived: watch::Sender<CommitIndex>,
    /// Set when the node stops.
    pub(crate) stopped: watch::Receiver<bool>,
}

/// What one look at the store found.
enum Step {
    /// A batch to write.
    Batch(ArchivedBatch),
    /// Nothing certified past what is archived yet.
    Idle,
    /// The next commit to archive is pruned already; go on from `lowest`.
    Pruned { lowest: CommitIndex },
}

/// [`run_writer`] until the node stops, started again after it panics,
/// after a pause that doubles from `min_retry` to `max_retry` while runs
/// archive nothing (store calls that panic on the blocking pool are
/// failed writes, retried within the run, not panics of it): pruning
/// waits on the writer, and a writer gone for good would hold it back
/// with nothing but the log to say so. Each restart is counted
/// (`ArchiveStatus::writer_restarts`) and logged; it goes on from the
/// archive's head as a writer started with the node does.
pub(crate) async fn supervise_writer(deps: WriterDeps) {
    use futures::FutureExt;
    let config = deps.archive.config().clone();
    let mut stopped = deps.stopped.clone();
    let stats = deps.archive.stats().clone();
    let mut pause = config.min_retry;
    loop {
        let written = stats.status().batches_written;
        let run = std::panic::AssertUnwindSafe(run_writer(deps.clone()));
        let Err(panic) = run.catch_unwind().await else {
            return;
        };
        ArchiveStats::count(&stats.writer_restarts);
        // A run that archived something was not part of a crash loop.
        if stats.status().batches_written > written {
            pause = config.min_retry;
        }
        let message = crate::supervisor::panic_message(panic.as_ref());
        tracing::error!(%message, ?pause, "the archive writer panicked; starting it again");
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = stopped.wait_for(|s| *s) => return,
        }
        pause = (pause * 2).min(config.max_retry);
    }
}

/// Copies certified batches into the archive until the node stops: at
/// once while there are some, every `interval` otherwise, and after a
/// failure again after a pause that doubles from `min_retry` to
/// `max_retry`. Failures are logged and counted, never fatal.
pub(crate) async fn run_writer(mut deps: WriterDeps) {
    let config = deps.archive.config().clone();
    let stats = deps.archive.stats().clone();
    let mut retry = config.min_retry;
    let mut next = None;
    loop {
        if *deps.stopped.borrow() {
            return;
        }
        let pause = match step(&deps, &mut next).await {
            Ok(true) => {
                retry = config.min_retry;
                Duration::ZERO
            }
            Ok(false) => {
                retry = config.min_retry;
                config.interval
            }
            // Refused by the store as the node stops: not a failure.
            Err(_) if *deps.stopped.borrow() => return,
            Err(e) => {
                ArchiveStats::count(&stats.write_errors);
                if matches!(e, ArchiveError::TooLarge { .. }) {
                    // One commit whose blocks alone pass the bound: it
                    // will be as large next time.
                    tracing::error!(
                        %e,
                        next = ?next,
                        ?retry,
                        "archive write failed: one commit's blocks make an object larger \
                         than archive.max-object-bytes; pruning waits for it"
                    );
                } else {
                    tracing::warn!(%e, next = ?next, ?retry, "archive write failed; retrying");
                }
                let pause = retry;
                retry = (retry * 2).min(config.max_retry);
                pause
            }
        };
        if pause.is_zero() {
            continue;
        }
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = deps.stopped.changed() => return,
        }
    }
}

/// Archives one batch if there is one: `Ok(true)` if the writer moved on.
async fn step(deps: &WriterDeps, next: &mut Option<CommitIndex>) -> Result<bool, ArchiveError> {
    let archive = &deps.archive;
    let stats = archive.stats();
    let from = match *next {
        Some(n) => n,
        None => {
            let store = deps.store.clone();
            let lowest = blocking(move || Ok(store.lowest_available_commit()?)).await?;
            let n = match archive.head_record().await? {
                Some(head) => checked_head(deps, head, lowest).await?,
                None => lowest,
            };
            publish(deps, stats, n);
            *next = Some(n);
            n
        }
    };
    let store = deps.store.clone();
    let (grpc, data, batch_size) = (deps.grpc.clone(), deps.data.clone(), deps.batch_size);
    let max_bytes = archive.config().max_object_bytes;
    let found =
        blocking(move || build(store.as_ref(), from, &grpc, &data, batch_size, max_bytes)).await?;
    match found {
        Step::Idle => Ok(false),
        Step::Pruned { lowest } => {
            tracing::error!(
                from,
                lowest,
                "commits were pruned before they were archived; the archive has a gap"
            );
            *next = Some(lowest);
            publish(deps, stats, lowest);
            Ok(true)
        }
        Step::Batch(batch) => {
            archive.put_batch(&batch).await?;
            let after = batch.last + 1;
            // The head moves only once its batches are stored.
            archive.set_head(after, Some(batch.first)).await?;
            ArchiveStats::count(&stats.batches_written);
            tracing::debug!(first = batch.first, last = batch.last, "batch archived");
            *next = Some(after);
            publish(deps, stats, after);
            Ok(true)
        }
    }
}

/// `head`, read from the archive, if pruning may trust it: it prunes
/// nothing this store holds (at most `lowest`), or the highest commit this
/// store holds below it is in the archive's batch for it, as this store
/// holds it, and then at most one past the store's watermark. Otherwise
/// `lowest`, from which the writer archives again. That batch is the one
/// the head names as written last when the commit checked is the head's
/// last (the store has synced that far), and is looked up in a
/// listing only otherwise: a head naming a batch that does not back it is
/// not backed, whatever other batch might. A
/// `head.json` written wrongly (another writer's, a bug) had the node
/// prune history nobody archived; this checks it against the node's own
/// data. Whoever can write the bucket can still copy a genuine commit
/// there, or delete what a true head stands on: the archive is as safe
/// as its credentials.
async fn checked_head(
    deps: &WriterDeps,
    record: HeadRecord,
    lowest: CommitIndex,
) -> Result<CommitIndex, ArchiveError> {
    let store = deps.store.clone();
    let watermark = blocking(move || Ok(store.highest_synced_commit()?.index)).await?;
    // The genesis commit is never archived: a head of 0 says nothing is.
    let head = record.next.max(1);
    // The highest commit this store holds that the head says is archived.
    let check = head.saturating_sub(1).min(watermark);
    if head <= lowest || check < lowest {
        return Ok(head);
    }
    // The batch written last holds the head's last commit: no listing.
    let named = (record.last).filter(|_| check == record.next.saturating_sub(1));
    // A listing too long to read (a WebDAV archive past `max-object-bytes`
    // of listing, a store whose listing never ends) backs nothing; any
    // other failure is retried.
    let holding = match named {
        // One named past `check` backs nothing.
        Some(first) => (first <= check).then_some(first),
        None => match deps.archive.batch_holding(check, deps.batch_size).await {
            Ok(holding) => holding,
            Err(e @ ArchiveError::ListingTooLong { .. }) => {
                tracing::warn!(error = %e, "the archive's head cannot be checked");
                None
            }
            Err(e) => return Err(e),
        },
    };
    // An object there that is no batch (malformed, or past
    // `max-object-bytes`) backs nothing: retried, it would stop the writer,
    // and pruning, for as long as it stays; archiving again overwrites it.
    let batch = match holding {
        Some(first) => match deps.archive.batch(first).await {
            Ok(batch) => batch.filter(|b| b.last >= check),
            Err(e @ (ArchiveError::Malformed { .. } | ArchiveError::TooLarge { .. })) => {
                tracing::warn!(error = %e, "the batch before the archive's head is no batch");
                None
            }
            Err(e) => return Err(e),
        },
        None => None,
    };
    let held = match batch {
        Some(batch) => {
            let store = deps.store.clone();
            let at = usize::try_from(check - batch.first).unwrap_or(usize::MAX);
            let archived = batch.commits.get(at).cloned();
            blocking(move || {
                let ours = store.commit(check)?;
                Ok(ours.is_some_and(|c| Some(c.serialized()) == archived.as_ref()))
            })
            .await?
        }
        None => false,
    };
    if held {
        // Never past what this store holds: the writer goes on from there.
        return Ok(head.min(watermark + 1));
    }
    tracing::error!(
        head,
        lowest,
        "the archive's head is not backed by the batch before it; archiving again from the store's lowest commit"
    );
    Ok(lowest)
}

fn publish(deps: &WriterDeps, stats: &ArchiveStats, next: CommitIndex) {
    stats.next.store(next, std::sync::atomic::Ordering::Relaxed);
    deps.archived.send_replace(next);
}

/// Runs a store read on the blocking pool.
async fn blocking<T: Send + 'static>(
    read: impl FnOnce() -> Result<T, ArchiveError> + Send + 'static,
) -> Result<T, ArchiveError> {
    tokio::task::spawn_blocking(read)
        .await
        .map_err(|e| ArchiveError::Source(format!("the store read failed: {e}")))?
}

impl From<soma_store::Error> for ArchiveError {
    fn from(e: soma_store::Error) -> Self {
        ArchiveError::Source(e.to_string())
    }
}

/// The batch starting at `from`, as FetchCommits would answer it, with
/// every block its commits name, in an object of at most `max_bytes`: a
/// batch whose blocks make it larger is cut to half its commits, again
/// until it fits or holds one commit (a reader finds batches that start
/// mid-window). Left larger, it would be refused by every reader, or
/// stop the writer, and pruning with it, for good.
fn build(
    store: &dyn ConsensusStore,
    from: CommitIndex,
    grpc: &grpc::Limits,
    data: &soma_types::Limits,
    batch_size: u64,
    max_bytes: u64,
) -> Result<Step, ArchiveError> {
    let mut span = batch_size.max(1);
    let mut cut = false;
    loop {
        let step = build_within(store, from, grpc, data, batch_size, span)?;
        match &step {
            Step::Batch(b) if b.most_encoded_bytes() > max_bytes && b.last > b.first => {
                // Half its commits, rounded down: n.div_ceil(2) of n + 1.
                span = (b.last - b.first).div_ceil(2);
                cut = true;
            }
            // No certificate at the cut (its votes come later than the
            // commits after it show): a commit earlier.
            Step::Idle if cut && span > 1 => span -= 1,
            Step::Idle if cut => {
                return Err(ArchiveError::Source(format!(
                    "no certified commit from {from} on ends a batch within \
                     archive.max-object-bytes"
                )));
            }
            _ => return Ok(step),
        }
    }
}

/// [`build`] of a batch of at most `span` commits.
fn build_within(
    store: &dyn ConsensusStore,
    from: CommitIndex,
    grpc: &grpc::Limits,
    data: &soma_types::Limits,
    batch_size: u64,
    span: u64,
) -> Result<Step, ArchiveError> {
    let watermark = store.highest_synced_commit()?.index;
    if from > watermark {
        return Ok(Step::Idle);
    }
    let lowest = store.lowest_available_commit()?;
    if from < lowest {
        return Ok(Step::Pruned { lowest });
    }
    // The range `fetch_commits` reads: it ends at the epoch's last commit.
    let epoch_last = match store.commit(from)? {
        Some(c) => store.last_commit_of_epoch(c.commit().epoch)?,
        None => None,
    };
    let end = batch_end(from, batch_size, epoch_last, watermark).min(from.saturating_add(span - 1));
    // What a peer would be served: a range holding none of the
    // certificates kept (the node synced in other batches) ends with the
    // certificate its next commits' votes make.
    let answer = match grpc::commits_answer(store, from, end, grpc, data, &|| true) {
        Ok(answer) => answer,
        // Local commits whose certificate is still to come: nothing to
        // archive yet.
        Err(Refused::NoCertificate(_)) => return Ok(Step::Idle),
        // Pruned meanwhile: the next look finds where the store stands.
        Err(Refused::NotFound(_)) => return Ok(Step::Idle),
        Err(Refused::Store(e)) => return Err(e.into()),
        Err(Refused::Internal(m)) => return Err(ArchiveError::Source(m)),
        // Never: the writer always wants its answer.
        Err(Refused::Abandoned) => return Ok(Step::Idle),
    };
    let last = from + answer.commits.len() as u64 - 1;
    let commits = store.commits_in_range(from..=last, usize::MAX)?;
    let refs: Vec<BlockRef> = commits
        .iter()
        .flat_map(|c| c.commit().blocks.iter().copied())
        .collect();
    let blocks = store
        .blocks(&refs)?
        .into_iter()
        .zip(&refs)
        .map(|(b, r)| {
            b.map(|b| b.serialized().clone())
                .ok_or_else(|| ArchiveError::Source(format!("block {r:?} is not stored")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Step::Batch(ArchivedBatch {
        first: from,
        last,
        commits: answer.commits,
        certifiers: answer.certifier_blocks,
        blocks,
    }))
}

#[cfg(test)]
mod tests {
    use soma_chain::{ChainBuilder, ChainConfig};
    use soma_store::MemStore;
    use std::sync::Arc;

    use super::*;

    /// A chain of `commits` in epochs of `per_epoch`, and a store holding
    /// each commit as a local one without its certificate.
    fn uncertified(per_epoch: u64, commits: u64) -> (soma_chain::Chain, MemStore) {
        let chain = ChainBuilder::new(ChainConfig {
            commits_per_epoch: Some(per_epoch),
            ..ChainConfig::validators(4)
        })
        .build(commits);
        let store = MemStore::new(chain.genesis());
        for i in 1..=commits {
            let mut batch = chain.batch(i..=i);
            batch.certificate.clear();
            store.write_synced_batch(batch).unwrap();
        }
        (chain, store)
    }

    #[test]
    fn local_commits_wait_for_their_certificate_before_they_are_archived() {
        // Epoch 0 ends at commit 4; commits 1..=6 are local, without
        // certificates.
        let (chain, store) = uncertified(4, 6);
        let (grpc, data) = (grpc::Limits::default(), soma_types::Limits::default());
        let look = |store: &MemStore| build(store, 1, &grpc, &data, 100, u64::MAX).unwrap();
        assert!(matches!(look(&store), Step::Idle));
        // A certificate past the epoch's end: still nothing to archive
        // from commit 1, whose batch ends with the epoch.
        let certify = |i: u64| store.insert_certificate(i, chain.certificate(i).to_vec());
        certify(6).unwrap();
        assert!(matches!(look(&store), Step::Idle));
        certify(3).unwrap();
        let Step::Batch(batch) = look(&store) else {
            panic!("commits 1..=3 are certified");
        };
        assert_eq!((batch.first, batch.last), (1, 3));
    }

    /// A writer of a store of 300 commits on an archive in memory, with
    /// its `archived` watch.
    fn writer(store: Arc<MemStore>, chain_id: soma_types::ChainId) -> WriterDeps {
        let archive = Archive::in_memory(super::super::Config::new("memory"), chain_id);
        WriterDeps {
            archive,
            store,
            grpc: grpc::Limits::default(),
            data: soma_types::Limits::default(),
            batch_size: 100,
            archived: watch::channel(0).0,
            stopped: watch::channel(false).1,
        }
    }

    /// `head.json` is trusted for pruning only when the batch before it is
    /// stored and holds that commit as the store does: a forged head (any
    /// writer of the bucket can put one) had the node prune history that
    /// was never archived.
    #[tokio::test]
    async fn pruning_trusts_the_archives_head_only_when_its_last_batch_backs_it() {
        let chain = ChainBuilder::new(ChainConfig::validators(4)).build(300);
        let store = Arc::new(MemStore::new(chain.genesis()));
        chain.write_to(store.as_ref(), 300).unwrap();
        // First archive 1..=200 as a writer does.
        let honest = writer(store.clone(), chain.chain_id());
        let mut next = None;
        for _ in 0..2 {
            assert!(step(&honest, &mut next).await.unwrap());
        }
        assert_eq!(*honest.archived.borrow(), 201);
        // A restarted writer trusts that head: it goes on at 201.
        let restarted = WriterDeps {
            archive: honest.archive.clone(),
            archived: watch::channel(0).0,
            ..writer(store.clone(), chain.chain_id())
        };
        assert!(step(&restarted, &mut None).await.unwrap());
        assert_eq!(*restarted.archived.borrow(), 301);
        // Forged heads: past everything archived, and backed by a batch
        // whose last commit is not ours. Each time the writer archives
        // again from the store's lowest commit.
        let restart_at = |head| {
            let deps = WriterDeps {
                archive: honest.archive.clone(),
                archived: watch::channel(0).0,
                ..writer(store.clone(), chain.chain_id())
            };
            async move {
                deps.archive.set_head(head, None).await.unwrap();
                step(&deps, &mut None).await.unwrap();
                *deps.archived.borrow()
            }
        };
        // A head past everything: backed at 300, and so taken, but never
        // past the store's watermark (at 2^64 - 1 the writer idled for
        // good and pruning took whatever came).
        assert_eq!(restart_at(u64::MAX).await, 301);
        // A head of 0, the genesis commit no writer archives: taken as 1,
        // the writer archives from there (its check underflowed before).
        assert_eq!(restart_at(0).await, 101);
        let mut wrong = honest.archive.batch(201).await.unwrap().unwrap();
        let last = wrong.commits.len() - 1;
        wrong.commits[last] = chain.commit(299).serialized().clone();
        honest.archive.put_batch(&wrong).await.unwrap();
        assert_eq!(restart_at(301).await, 101);
        // The batch before the head put back: trusted again.
        let right = honest.archive.batch(201).await.unwrap().unwrap();
        assert_eq!(right.first, 201);
        let mut fixed = right;
        fixed.commits[last] = chain.commit(300).serialized().clone();
        honest.archive.put_batch(&fixed).await.unwrap();
        assert_eq!(restart_at(301).await, 301);
        // A head past what an archive holds (1..=100 only): nothing backs
        // it at 300, so the writer starts again at 1.
        let short = writer(store.clone(), chain.chain_id());
        assert!(step(&short, &mut None).await.unwrap());
        short.archive.set_head(301, None).await.unwrap();
        let again = WriterDeps {
            archive: short.archive.clone(),
            archived: watch::channel(0).0,
            ..writer(store.clone(), chain.chain_id())
        };
        step(&again, &mut None).await.unwrap();
        assert_eq!(*again.archived.borrow(), 101);
    }

    #[test]
    fn a_store_synced_in_larger_batches_is_archived_in_the_writers_batches() {
        // Certificates kept at 200 and the tip, 300: the writer's batches of
        // 100 end at 100 with the certificate the later votes make.
        let chain = ChainBuilder::new(ChainConfig::validators(4)).build(300);
        let store = MemStore::new(chain.genesis());
        chain.write_to(&store, 200).unwrap();
        let (grpc, data) = (grpc::Limits::default(), soma_types::Limits::default());
        let mut from = 1;
        let mut objects = Vec::new();
        while let Step::Batch(batch) = build(&store, from, &grpc, &data, 100, u64::MAX).unwrap() {
            let voters = batch
                .certifiers
                .iter()
                .map(|b| soma_types::UnverifiedBlock::decode(b.clone(), data.max_block_bytes))
                .filter(|b| {
                    b.as_ref()
                        .unwrap()
                        .block()
                        .commit_votes
                        .contains(&chain.commit_ref(batch.last))
                })
                .count();
            objects.push((batch.first, batch.last, voters));
            from = batch.last + 1;
        }
        assert_eq!(objects, [(1, 100, 3), (101, 200, 3), (201, 300, 3)]);
    }

    /// Batches whose blocks would make an object past `max-object-bytes`
    /// are cut until they fit, each still ending at a certified commit,
    /// one after the other with no gap.
    #[test]
    fn batches_too_large_for_an_object_are_cut_to_fit_and_stay_certified() {
        let chain = ChainBuilder::new(ChainConfig::validators(4)).build(300);
        let store = MemStore::new(chain.genesis());
        chain.write_to(&store, 100).unwrap();
        let (grpc, data) = (grpc::Limits::default(), soma_types::Limits::default());
        let whole = match build(&store, 1, &grpc, &data, 100, u64::MAX).unwrap() {
            Step::Batch(batch) => batch.most_encoded_bytes(),
            _ => panic!("a batch"),
        };
        let max_bytes = whole / 3;
        let mut from = 1;
        let mut ends = Vec::new();
        while let Step::Batch(batch) = build(&store, from, &grpc, &data, 100, max_bytes).unwrap() {
            assert!(batch.most_encoded_bytes() <= max_bytes, "{}", batch.last);
            assert!(batch.encode().len() as u64 <= max_bytes);
            let last = chain.commit_ref(batch.last);
            let certified = batch.certifiers.iter().all(|b| {
                let block = soma_types::UnverifiedBlock::decode(b.clone(), data.max_block_bytes);
                block.unwrap().block().commit_votes.contains(&last)
            });
            assert!(certified && batch.certifiers.len() == 3, "{}", batch.last);
            assert_eq!(batch.first, from);
            ends.push(batch.last);
            from = batch.last + 1;
        }
        // Each window of 100, a third of an object about every 25 commits:
        // 1..=100 halved twice to 25; 26..=100 (75) halved twice to 18;
        // 44..=100 (57) halved once to 28; 72..=100 (29) fits.
        assert_eq!(
            ends,
            [25, 43, 71, 100, 125, 143, 171, 200, 225, 243, 271, 300]
        );
    }

    /// A cut whose last commit no certificate covers (the last four
    /// commits of an epoch are voted for only by the next epoch's blocks,
    /// which do not count) steps back a commit at a time to one that is
    /// certified; where none within the object's bound is, the writer
    /// fails, naming the setting, rather than idle for good.
    #[test]
    fn a_cut_without_a_certificate_steps_back_to_a_certified_commit() {
        let (chain, store) = uncertified(20, 30);
        store
            .insert_certificate(20, chain.certificate(20).to_vec())
            .unwrap();
        let (grpc, data) = (grpc::Limits::default(), soma_types::Limits::default());
        let span = |from, span| match build_within(&store, from, &grpc, &data, 100, span) {
            Ok(Step::Batch(b)) => Some((b.last, b.most_encoded_bytes())),
            _ => None,
        };
        // Votes certify 16, not 17 to 19; the epoch's end, 20, is kept.
        assert_eq!(span(15, 2).map(|(last, _)| last), Some(16));
        assert_eq!(span(15, 3), None);
        assert_eq!(span(15, 6).map(|(last, _)| last), Some(20));
        let max_bytes = span(15, 2).unwrap().1;
        // 15..=20 is too large; its half, 15..=17, is not certified; one
        // commit less is.
        let Step::Batch(batch) = build(&store, 15, &grpc, &data, 100, max_bytes).unwrap() else {
            panic!("a batch from 15");
        };
        assert_eq!((batch.first, batch.last), (15, 16));
        // From 17 only 20 is certified, and 17..=20 does not fit.
        let error = build(&store, 17, &grpc, &data, 100, max_bytes).err();
        assert!(
            matches!(&error, Some(ArchiveError::Source(m)) if m.contains("archive.max-object-bytes")),
            "{error:?}"
        );
    }

    /// An object store in memory with a fault of a backend's client or
    /// server.
    #[derive(Debug, Default)]
    struct Faulty {
        inner: object_store::memory::InMemory,
        /// The first write panics.
        panics_once: bool,
        panicked: std::sync::atomic::AtomicBool,
        /// Writes of batches are answered as done and not kept.
        drops_batches: std::sync::atomic::AtomicBool,
        /// Listings never end: after the entries held, one of a name no
        /// batch has, and another, ...
        floods_listings: bool,
        /// Entries of a listing flood taken.
        flooded: Arc<std::sync::atomic::AtomicU64>,
    }

    impl std::fmt::Display for Faulty {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "Faulty({})", self.inner)
        }
    }

    #[async_trait::async_trait]
    impl object_store::ObjectStore for Faulty {
        async fn put_opts(
            &self,
            location: &object_store::path::Path,
            payload: object_store::PutPayload,
            opts: object_store::PutOptions,
        ) -> object_store::Result<object_store::PutResult> {
            use std::sync::atomic::Ordering;
            assert!(
                !self.panics_once || self.panicked.swap(true, Ordering::SeqCst),
                "the object store's first write panics"
            );
            let batch = location.as_ref().ends_with(".batch");
            if batch && self.drops_batches.load(Ordering::SeqCst) {
                return Ok(object_store::PutResult {
                    e_tag: None,
                    version: None,
                });
            }
            self.inner.put_opts(location, payload, opts).await
        }
        async fn put_multipart_opts(
            &self,
            location: &object_store::path::Path,
            opts: object_store::PutMultipartOptions,
        ) -> object_store::Result<Box<dyn object_store::MultipartUpload>> {
            self.inner.put_multipart_opts(location, opts).await
        }
        async fn get_opts(
            &self,
            location: &object_store::path::Path,
            options: object_store::GetOptions,
        ) -> object_store::Result<object_store::GetResult> {
            self.inner.get_opts(location, options).await
        }
        fn delete_stream(
            &self,
            locations: futures::stream::BoxStream<
                'static,
                object_store::Result<object_store::path::Path>,
            >,
        ) -> futures::stream::BoxStream<'static, object_store::Result<object_store::path::Path>>
        {
            self.inner.delete_stream(locations)
        }
        fn list(
            &self,
            prefix: Option<&object_store::path::Path>,
        ) -> futures::stream::BoxStream<'static, object_store::Result<object_store::ObjectMeta>>
        {
            use futures::StreamExt;
            let held = self.inner.list(prefix);
            if !self.floods_listings {
                return held;
            }
            let flooded = self.flooded.clone();
            let flood = futures::stream::iter(0u64..).map(move |n| {
                flooded.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                Ok(object_store::ObjectMeta {
                    location: format!("batches/flood-{n:020}.batch").into(),
                    last_modified: Default::default(),
                    size: 0,
                    e_tag: None,
                    version: None,
                })
            });
            // Each entry yields, as a store's pages, awaited from the
            // network, do: a timeout can cut the walk.
            let flood = flood.then(|entry| async {
                tokio::task::yield_now().await;
                entry
            });
            held.chain(flood).boxed()
        }
        async fn list_with_delimiter(
            &self,
            prefix: Option<&object_store::path::Path>,
        ) -> object_store::Result<object_store::ListResult> {
            self.inner.list_with_delimiter(prefix).await
        }
        async fn copy_opts(
            &self,
            from: &object_store::path::Path,
            to: &object_store::path::Path,
            options: object_store::CopyOptions,
        ) -> object_store::Result<()> {
            self.inner.copy_opts(from, to, options).await
        }
    }

    /// An archive for chain `id` on a store in memory whose listings end
    /// in a flood if `floods_listings`, and the store.
    fn flooding(floods_listings: bool, id: soma_types::ChainId) -> (Archive, Arc<Faulty>) {
        let faulty = Arc::new(Faulty {
            floods_listings,
            ..Faulty::default()
        });
        let config = super::super::Config {
            request_timeout: Duration::from_secs(60),
            ..super::super::Config::new("memory")
        };
        let root = object_store::path::Path::default();
        (
            Archive::with_store(faulty.clone(), root, config, id),
            faulty,
        )
    }

    /// A store that never ends a listing: the lookup of the batch holding
    /// a commit reads at most its bound of entries, keeping none of them,
    /// and fails; a listing within the bound is read whole. Collected as
    /// before, the flood was held in memory until the request timed out.
    /// A writer whose head that lookup cannot check archives again from
    /// its store's lowest commit, as for a head nothing backs.
    #[tokio::test]
    async fn a_listing_without_end_is_read_only_to_its_bound() {
        use std::sync::atomic::Ordering;
        let lookup = async |floods_listings, most| {
            let (archive, faulty) = flooding(
                floods_listings,
                soma_types::ChainId(soma_types::Digest([7; 32])),
            );
            for first in [1, 101, 201] {
                let (path, object) = (archive.batch_path(first), b"batch".to_vec());
                archive.put(&path, object).await.unwrap();
            }
            let found = archive.batch_holding_within(150, 100, most).await;
            (found, faulty.flooded.load(Ordering::SeqCst), archive)
        };
        // Listed from 50: the batches at 101 and 201, then the flood.
        let (found, flooded, archive) = lookup(true, 1000).await;
        match found {
            Err(ArchiveError::ListingTooLong { from, reason }) => {
                assert_eq!(from, archive.batch_path(50).to_string());
                assert_eq!(reason, "passed 1000 entries");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(flooded, 999);
        // Without the flood, two entries: found within a bound of two.
        assert_eq!(lookup(false, 2).await.0.unwrap(), Some(101));

        let chain = ChainBuilder::new(ChainConfig::validators(4)).build(300);
        let store = Arc::new(MemStore::new(chain.genesis()));
        chain.write_to(store.as_ref(), 300).unwrap();
        let (archive, faulty) = flooding(true, chain.chain_id());
        let deps = WriterDeps {
            archive,
            ..writer(store, chain.chain_id())
        };
        deps.archive.set_head(301, None).await.unwrap();
        assert!(step(&deps, &mut None).await.unwrap());
        assert_eq!(*deps.archived.borrow(), 101);
        // No batch held: the flood's first entry past the bound ended it.
        let flooded = faulty.flooded.load(Ordering::SeqCst);
        assert_eq!(flooded, super::super::MOST_LISTED + 1);
    }

    /// A restarted writer checks a head that names the batch written last
    /// against that batch, without listing the archive: over a store whose
    /// listing never ends (as a WebDAV archive past `max-object-bytes` of
    /// listing fails) it goes on from the head, where a head naming no
    /// batch had it archive everything again. A head naming a batch that
    /// does not back it is not backed.
    #[tokio::test]
    async fn a_head_naming_its_last_batch_is_checked_without_a_listing() {
        use std::sync::atomic::Ordering;
        let chain = ChainBuilder::new(ChainConfig::validators(4)).build(300);
        let store = Arc::new(MemStore::new(chain.genesis()));
        chain.write_to(store.as_ref(), 300).unwrap();
        let (archive, faulty) = flooding(true, chain.chain_id());
        let first = WriterDeps {
            archive: archive.clone(),
            ..writer(store.clone(), chain.chain_id())
        };
        let mut next = None;
        for _ in 0..3 {
            assert!(step(&first, &mut next).await.unwrap());
        }
        let written = archive.head_record().await.unwrap();
        assert_eq!(
            written,
            Some(HeadRecord {
                next: 301,
                last: Some(201)
            })
        );
        let restart_on = async |store: &Arc<MemStore>, record: HeadRecord| {
            let deps = WriterDeps {
                archive: archive.clone(),
                archived: watch::channel(0).0,
                ..writer(store.clone(), chain.chain_id())
            };
            deps.archive
                .set_head(record.next, record.last)
                .await
                .unwrap();
            step(&deps, &mut None).await.unwrap();
            *deps.archived.borrow()
        };
        let restart = async |record| restart_on(&store, record).await;
        // Nothing left to archive past 300: the writer idles at its head.
        assert_eq!(
            restart(HeadRecord {
                next: 301,
                last: Some(201)
            })
            .await,
            301
        );
        assert_eq!(faulty.flooded.load(Ordering::SeqCst), 0);
        // Named wrongly (a batch that ends before 300, one past it, and at
        // 201 one past the head's last commit, 200, though it holds 200
        // and more): not backed, archived again from commit 1, still with
        // no listing.
        for (next, last) in [(301, 101), (301, 301), (201, 201)] {
            let last = Some(last);
            assert_eq!(restart(HeadRecord { next, last }).await, 101);
        }
        assert_eq!(faulty.flooded.load(Ordering::SeqCst), 0);
        // A store synced only to 250 checks its own last commit, which the
        // batch named does hold, but looks it up in the listing, which
        // fails here: archived again from 1.
        let behind = Arc::new(MemStore::new(chain.genesis()));
        for range in chain.batch_ranges(50).into_iter().take(5) {
            behind.write_synced_batch(chain.batch(range)).unwrap();
        }
        assert_eq!(behind.highest_synced_commit().unwrap().index, 250);
        let named = HeadRecord {
            next: 301,
            last: Some(201),
        };
        assert_eq!(restart_on(&behind, named).await, 101);
        let flooded = faulty.flooded.load(Ordering::SeqCst);
        // The batch at 201, then the flood up to the entry past the bound.
        assert_eq!(flooded, super::super::MOST_LISTED);
        // Naming none, the head is looked up in the listing, which fails.
        assert_eq!(
            restart(HeadRecord {
                next: 301,
                last: None
            })
            .await,
            101
        );
        let flooded = faulty.flooded.load(Ordering::SeqCst);
        assert_eq!(flooded, 2 * super::super::MOST_LISTED);
    }

    /// An object past `max-object-bytes` at the path of the batch a head
    /// stands on, named or listed (a bucket's other writer planted it):
    /// the head is not backed, and the writer archives again from commit
    /// 1, overwriting it, where it failed the same read for good and
    /// pruning waited with it.
    #[tokio::test]
    async fn an_oversize_object_where_the_heads_batch_is_backs_nothing() {
        let chain = ChainBuilder::new(ChainConfig::validators(4)).build(300);
        let store = Arc::new(MemStore::new(chain.genesis()));
        chain.write_to(store.as_ref(), 300).unwrap();
        let config = super::super::Config {
            max_object_bytes: 1 << 20,
            ..super::super::Config::new("memory")
        };
        let archive = Archive::in_memory(config, chain.chain_id());
        let deps = || WriterDeps {
            archive: archive.clone(),
            archived: watch::channel(0).0,
            ..writer(store.clone(), chain.chain_id())
        };
        let first = deps();
        let mut next = None;
        for _ in 0..3 {
            assert!(step(&first, &mut next).await.unwrap());
        }
        let honest = archive.batch(201).await.unwrap().unwrap();
        assert!(honest.most_encoded_bytes() < 1 << 20);
        for last in [Some(201), None] {
            let path = archive.batch_path(201);
            archive.put(&path, vec![0; (1 << 20) + 1]).await.unwrap();
            let planted = archive.batch(201).await;
            assert!(
                matches!(planted, Err(ArchiveError::TooLarge { size, .. }) if size == (1 << 20) + 1),
                "{planted:?}"
            );
            archive.set_head(301, last).await.unwrap();
            let restarted = deps();
            let mut next = None;
            assert!(step(&restarted, &mut next).await.unwrap());
            assert_eq!(*restarted.archived.borrow(), 101, "head naming {last:?}");
            for _ in 0..2 {
                assert!(step(&restarted, &mut next).await.unwrap());
            }
            assert_eq!(*restarted.archived.borrow(), 301);
            let rewritten = archive.batch(201).await.unwrap().unwrap();
            assert_eq!(rewritten.commits, honest.commits);
        }
    }

    /// A 300-commit store and a writer of it (`supervise_writer` if
    /// `supervised`, else `run_writer`) into an archive on `faulty`, its
    /// retries 1 to 4 ms apart; the writer's task, the archive, the next
    /// commit it publishes, and the switch that stops it.
    struct Writing {
        task: tokio::task::JoinHandle<()>,
        archive: Archive,
        archived: watch::Receiver<CommitIndex>,
        stop: watch::Sender<bool>,
    }

    fn writing(faulty: Arc<Faulty>, supervised: bool) -> Writing {
        let chain = ChainBuilder::new(ChainConfig::validators(4)).build(300);
        let store = Arc::new(MemStore::new(chain.genesis()));
        chain.write_to(store.as_ref(), 100).unwrap();
        let config = super::super::Config {
            min_retry: Duration::from_millis(1),
            max_retry: Duration::from_millis(4),
            ..super::super::Config::new("memory")
        };
        let archive = Archive::with_store(
            faulty,
            object_store::path::Path::default(),
            config,
            chain.chain_id(),
        );
        let (stop, stopped) = watch::channel(false);
        let deps = WriterDeps {
            archive: archive.clone(),
            stopped,
            ..writer(store, chain.chain_id())
        };
        let archived = deps.archived.subscribe();
        let task = if supervised {
            tokio::spawn(supervise_writer(deps))
        } else {
            tokio::spawn(run_writer(deps))
        };
        Writing {
            task,
            archive,
            archived,
            stop,
        }
    }

    impl Writing {
        /// Waits for the whole store to be archived and published, checks
        /// the three batches, and stops the writer.
        async fn archives_everything(mut self) {
            let all = self.archived.wait_for(|next| *next == 301);
            tokio::time::timeout(Duration::from_secs(60), all)
                .await
                .expect("everything archived")
                .unwrap();
            for first in [1, 101, 201] {
                let batch = self.archive.batch(first).await.unwrap().unwrap();
                assert_eq!((batch.first, batch.last), (first, first + 99));
            }
            self.stop.send_replace(true);
            tokio::time::timeout(Duration::from_secs(60), self.task)
                .await
                .expect("the writer stops with the node")
                .unwrap();
        }
    }

    /// A writer task that panics (its object store's first write) is
    /// started again, counted once, and archives the whole store; it
    /// stops when the node does.
    #[tokio::test]
    async fn a_writer_that_panics_is_started_again_and_archives_everything() {
        let faulty = Faulty {
            panics_once: true,
            ..Faulty::default()
        };
        let writing = writing(Arc::new(faulty), true);
        let archive = writing.archive.clone();
        writing.archives_everything().await;
        let status = archive.stats().status();
        assert_eq!((status.writer_restarts, status.batches_written), (1, 3));
    }

    /// A store that answers each batch's write as done and keeps nothing:
    /// the writer finds the object missing, counts a failed write and
    /// publishes nothing for pruning (it published 101, 201, 301, and
    /// pruning would have deleted commits no copy held); once the store
    /// keeps its writes, everything is archived and published.
    #[tokio::test]
    async fn batches_the_store_reports_written_but_does_not_hold_are_never_published() {
        use std::sync::atomic::Ordering;
        let faulty = Arc::new(Faulty::default());
        faulty.drops_batches.store(true, Ordering::SeqCst);
        let writing = writing(faulty.clone(), false);
        let archive = writing.archive.clone();
        let failed_thrice = async {
            while archive.stats().status().write_errors < 3 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(60), failed_thrice)
            .await
            .expect("writes the store did not keep are failures");
        assert_eq!(
            *writing.archived.borrow(),
            1,
            "nothing published past the lowest"
        );
        assert_eq!(archive.stats().status().batches_written, 0);
        assert_eq!(archive.head().await.unwrap(), None);

        faulty.drops_batches.store(false, Ordering::SeqCst);
        writing.archives_everything().await;
        assert_eq!(archive.stats().status().batches_written, 3);
    }
}
