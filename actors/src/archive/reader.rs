//! Reading batches back: what a sync worker asks when no peer holds its
//! range. Nothing read is trusted; the worker verifies it as a peer's
//! answer.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use soma_types::{BlockRef, CommitIndex, Digest};

use super::{Archive, ArchiveError, ArchiveStats, ArchivedBatch};

/// Reads archived batches for sync, keeping the last `cached_batches`
/// read: a batch's commits and then its blocks, chunk by chunk, come from
/// one object, and sync works on several batches at once.
///
/// An object is read whole (up to `max_object_bytes`) and decoded, so
/// reads are bounded apart from `max-total-fetched-bytes`: reads of one
/// batch at once are merged (the workers fetching its chunks wait for the
/// first, then find it kept), and at most `cached_batches` objects are
/// read at once. What the reader holds is so at most twice
/// `cached_batches` objects: those kept, and those being read.
#[derive(Debug)]
pub struct ArchiveReader {
    archive: Archive,
    batch_size: u64,
    recent: Mutex<VecDeque<Arc<Kept>>>,
    /// The batches being read, by the batch boundary looked under: a
    /// read holds its batch's lock, and a read of the same batch waits
    /// for it. Entries go when nobody holds or waits on them.
    reading: Mutex<HashMap<CommitIndex, Arc<ReadLock>>>,
    /// Objects read at once.
    reads: tokio::sync::Semaphore,
    /// The commits of objects read before, first to last, so that a walk
    /// from a window's boundary to a batch started mid-window reads each
    /// object before it once, not at every lookup. At most
    /// [`MAX_SPANS`] (the lowest go first).
    spans: Mutex<std::collections::BTreeMap<CommitIndex, CommitIndex>>,
    /// The pause after failed reads: no lookup reads the archive before
    /// it ends. Sync asks the archive every `wait-interval-when-no-peer`
    /// per range no peer holds, which, against a failing archive, was a
    /// request a second per worker for as long as it failed.
    backoff: Mutex<Backoff>,
}

/// Reads paused after the archive failed one: the pause doubles from
/// `min_retry` to `max_retry` while reads go on failing, and a read that
/// succeeds (a miss included) ends it.
#[derive(Debug, Default)]
struct Backoff {
    /// When the running pause began, or the last read succeeded: a read
    /// begun before that which fails later (one of several asked
    /// together, or one the success overtook) neither starts nor doubles
    /// a pause.
    since: Option<tokio::time::Instant>,
    /// No read begins before this.
    until: Option<tokio::time::Instant>,
    /// The next pause.
    next: Duration,
}

/// What a lookup found.
enum Lookup {
    Found(Arc<Kept>),
    /// The archive does not hold the commit.
    Missing,
    /// Not asked: reads are paused.
    Deferred,
}

/// A batch kept, with the digest of each of its blocks: hashed once, on
/// the blocking pool, where each chunk asked of the batch hashed every
/// block of it again (up to 64 MiB) on a runtime thread.
#[derive(Debug)]
struct Kept {
    batch: ArchivedBatch,
    digests: Vec<Digest>,
}

impl std::ops::Deref for Kept {
    type Target = ArchivedBatch;
    fn deref(&self) -> &ArchivedBatch {
        &self.batch
    }
}

/// Spans the reader remembers.
const MAX_SPANS: usize = 4_096;

/// A lookup (its waits for other reads, the read at its index, the walk
/// from the window's boundary) ends after this many `request_timeout`s,
/// whatever it read: an archive whose objects each come just within their
/// own timeout, laid out so that the walk reads a window's worth, held a
/// sync task (and, while no peer held the range, sync) for hours. An
/// honest archive answers a lookup with one object, or a few after an
/// epoch's end; a walk cut short keeps the spans it read, so the next
/// lookup goes on from there.
const LOOKUP_REQUESTS: u32 = 2;

/// Held while a batch is read.
type ReadLock = tokio::sync::Mutex<()>;

/// A share of the lock of the reads of one batch; the reader forgets the
/// lock when the last share goes, however its read ends (a dropped read
/// included).
struct Gate<'a> {
    reader: &'a ArchiveReader,
    boundary: CommitIndex,
    lock: Arc<ReadLock>,
}

impl<'a> Gate<'a> {
    fn new(reader: &'a ArchiveReader, boundary: CommitIndex) -> Self {
        let lock = reader.reading().entry(boundary).or_default().clone();
        Gate {
            reader,
            boundary,
            lock,
        }
    }
}

impl Drop for Gate<'_> {
    fn drop(&mut self) {
        let mut reading = self.reader.reading();
        // Every share is taken under this lock: none other is left.
        if Arc::strong_count(&self.lock) == 2 {
            reading.remove(&self.boundary);
        }
    }
}

impl ArchiveReader {
    /// A reader of `archive` for a node whose batches are `batch_size`
    /// commits long (the archive's are found at the same boundaries).
    pub fn new(archive: Archive, batch_size: u64) -> Self {
        let reads = tokio::sync::Semaphore::new(archive.config().cached_batches.max(1));
        ArchiveReader {
            archive,
            batch_size: batch_size.max(1),
            recent: Mutex::new(VecDeque::new()),
            reading: Mutex::new(HashMap::new()),
            reads,
            spans: Mutex::default(),
            backoff: Mutex::default(),
        }
    }

    /// The archive's counters.
    pub fn stats(&self) -> &Arc<ArchiveStats> {
        self.archive.stats()
    }

    /// Counts data of the archive that verification refused, and drops
    /// the batch kept that holds `index`, and the spans remembered from
    /// its window's boundary up to it (the walk that found it went by
    /// them): the next read of it asks the archive again, which may have
    /// been repaired meanwhile, walking from the boundary. Other batches
    /// kept, and other windows' spans, stay: one forged object neither
    /// empties the cache of the ranges the workers are reading nor sends
    /// their walks back to their boundaries.
    pub(crate) fn refused(&self, index: CommitIndex) {
        ArchiveStats::count(&self.archive.stats().refused);
        self.recent()
            .retain(|b| !(b.first <= index && index <= b.last));
        let boundary = self.boundary(index);
        self.spans()
            .retain(|first, _| *first < boundary || *first > index);
    }

    /// The first commit of the window of `batch_size` commits holding
    /// `index`.
    fn boundary(&self, index: CommitIndex) -> CommitIndex {
        (index.saturating_sub(1) / self.batch_size) * self.batch_size + 1
    }

    fn spans(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::BTreeMap<CommitIndex, CommitIndex>> {
        self.spans.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn remember(&self, batch: &ArchivedBatch) {
        let mut spans = self.spans();
        spans.insert(batch.first, batch.last);
        while spans.len() > MAX_SPANS {
            spans.pop_first();
        }
    }

    /// The archived batch that holds commit `index`: the one starting
    /// there, else the one starting at the batch boundary below it or, as
    /// a writer starts a batch mid-window after an epoch's end or a batch
    /// cut for size, one found from there by following each batch's end.
    async fn holding(&self, index: CommitIndex) -> Result<Lookup, ArchiveError> {
        let holds = |b: &ArchivedBatch| b.first <= index && index <= b.last;
        let cached = || self.recent().iter().find(|b| holds(b)).cloned();
        if let Some(batch) = cached() {
            return Ok(Lookup::Found(batch));
        }
        let boundary = self.boundary(index);
        // Merged with a read of the same batch under way: kept once it ends.
        let gate = Gate::new(self, boundary);
        let _read = gate.lock.lock().await;
        if let Some(batch) = cached() {
            return Ok(Lookup::Found(batch));
        }
        // Not behind the reads in flight during a pause: deferred at once.
        if self.may_read().is_none() {
            return Ok(Lookup::Deferred);
        }
        let _read = self
            .reads
            .acquire()
            .await
            .expect("the semaphore is never closed");
        // And read only if the lookup may read once it has a place: lookups
        // queued when a failure paused reads do not ask the archive during
        // the pause.
        let Some(started) = self.may_read() else {
            return Ok(Lookup::Deferred);
        };
        match self.read(index, boundary, holds).await {
            Ok(found) => {
                self.succeeded();
                Ok(found.map_or(Lookup::Missing, Lookup::Found))
            }
            Err(e) => {
                match self.failed(started) {
                    Some(pause) => {
                        tracing::warn!(index, %e, ?pause, "archive read failed; reads paused")
                    }
                    None => tracing::warn!(index, %e, "archive read failed"),
                }
                Err(e)
            }
        }
    }

    fn reading(&self) -> std::sync::MutexGuard<'_, HashMap<CommitIndex, Arc<ReadLock>>> {
        self.reading.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Reads the batch holding `index`, starting there or at `boundary`
    /// (then at the commit after each batch read from there that ends
    /// below `index`, at most a window's worth of batches), and keeps it;
    /// its caller holds one of the `cached_batches` places to read.
    async fn read(
        &self,
        index: CommitIndex,
        boundary: CommitIndex,
        holds: impl Fn(&ArchivedBatch) -> bool,
    ) -> Result<Option<Arc<Kept>>, ArchiveError> {
        if let Some(batch) = self.archive.batch(index).await?.filter(&holds) {
            return self.keep(batch).await.map(Some);
        }
        // Each batch read moves `first` on by a commit at least, and a
        // window holds `batch_size` commits.
        // Twice at most: a walk that skipped objects by spans remembered
        // and found nothing walks again reading each, since an object may
        // have been written again since with other ends.
        for trust in [true, false] {
            let mut first = boundary;
            let mut skipped = false;
            for _ in 0..self.batch_size {
                if first >= index {
                    break;
                }
                // An object read before that ends below `index`: not again.
                let known = trust.then(|| self.spans().get(&first).copied()).flatten();
                if let Some(last) = known.filter(|last| *last < index && *last >= first) {
                    first = last + 1;
                    skipped = true;
                    continue;
                }
                let Some(batch) = self.archive.batch(first).await? else {
                    break;
                };
                self.remember(&batch);
                if holds(&batch) {
                    return self.keep(batch).await.map(Some);
                }
                if batch.last >= index {
                    break;
                }
                first = batch.last + 1;
            }
            if !skipped {
                break;
            }
            self.spans().retain(|f, _| *f < boundary || *f >= index);
        }
        Ok(None)
    }

    /// Hashes `batch`'s blocks on the blocking pool and keeps it, the
    /// oldest kept going past `cached_batches`.
    async fn keep(&self, batch: ArchivedBatch) -> Result<Arc<Kept>, ArchiveError> {
        let hashed = tokio::task::spawn_blocking(move || {
            let digests = batch.blocks.iter().map(|b| Digest::of(b)).collect();
            Kept { batch, digests }
        });
        let kept = Arc::new(
            hashed
                .await
                .map_err(|e| ArchiveError::Source(format!("the hashing failed: {e}")))?,
        );
        let mut recent = self.recent();
        recent.push_back(kept.clone());
        while recent.len() > self.archive.config().cached_batches {
            recent.pop_front();
        }
        Ok(kept)
    }

    fn recent(&self) -> std::sync::MutexGuard<'_, VecDeque<Arc<Kept>>> {
        self.recent.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// How long one lookup may take, waits for other reads included:
    /// [`LOOKUP_REQUESTS`] times the archive's `request_timeout`.
    fn lookup_deadline(&self) -> Duration {
        self.archive
            .config()
            .request_timeout
            .saturating_mul(LOOKUP_REQUESTS)
    }

    /// [`Self::holding`] within [`Self::lookup_deadline`], counted: a miss,
    /// an error, a lookup past its deadline, or one during the pause after
    /// a failed read ([`Backoff`]) is `None`. The deadline pauses nothing:
    /// it counts waits for other reads, which an honest archive of large
    /// objects may make long.
    async fn find(&self, index: CommitIndex) -> Option<Arc<Kept>> {
        let stats = self.archive.stats();
        let deadline = self.lookup_deadline();
        let found = tokio::time::timeout(deadline, self.holding(index))
            .await
            .unwrap_or(Err(ArchiveError::Timeout(deadline)));
        match found {
            Ok(Lookup::Found(batch)) => Some(batch),
            Ok(Lookup::Missing) => {
                ArchiveStats::count(&stats.read_misses);
                None
            }
            Ok(Lookup::Deferred) => {
                ArchiveStats::count(&stats.reads_deferred);
                None
            }
            Err(e) => {
                tracing::warn!(index, %e, "archive lookup failed");
                ArchiveStats::count(&stats.read_errors);
                None
            }
        }
    }

    /// The time a read may begin now, or `None` during a pause.
    fn may_read(&self) -> Option<tokio::time::Instant> {
        let now = tokio::time::Instant::now();
        let paused = self.backoff().until.is_some_and(|until| now < until);
        (!paused).then_some(now)
    }

    /// Starts the pause after a read begun at `started` failed, doubling
    /// the next one, and returns it; `None` for a read begun before the
    /// running pause began or the last read succeeded (one of several
    /// asked together, or one a success overtook): it neither starts nor
    /// doubles a pause.
    fn failed(&self, started: tokio::time::Instant) -> Option<Duration> {
        let config = self.archive.config();
        let now = tokio::time::Instant::now();
        let mut backoff = self.backoff();
        if backoff.since.is_some_and(|since| since > started) {
            return None;
        }
        let pause = backoff.next.max(config.min_retry).min(config.max_retry);
        backoff.since = Some(now);
        backoff.until = Some(now + pause);
        backoff.next = pause.saturating_mul(2).min(config.max_retry);
        Some(pause)
    }

    /// The archive answered a read: reads are no longer paused, and the
    /// next failure pauses them for `min_retry`.
    fn succeeded(&self) {
        *self.backoff() = Backoff {
            since: Some(tokio::time::Instant::now()),
            ..Backoff::default()
        };
    }

    fn backoff(&self) -> std::sync::MutexGuard<'_, Backoff> {
        self.backoff.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Commits from `start` to the end of the archived batch holding it,
    /// with that batch's certificate: the shape of a peer's FetchCommits
    /// answer. `None` if the archive does not hold `start`, if its batch
    /// ends past `end`, or if the answer would be larger than `max_bytes`.
    pub async fn commits(
        &self,
        start: CommitIndex,
        end: CommitIndex,
        max_bytes: u64,
    ) -> Option<(Vec<Bytes>, Vec<Bytes>)> {
        let batch = self.find(start).await?;
        let stats = self.archive.stats();
        let skip = usize::try_from(start - batch.first).unwrap_or(usize::MAX);
        let commits = batch.commits.get(skip..).unwrap_or_default().to_vec();
        let bytes: u64 = commits
            .iter()
            .chain(&batch.certifiers)
            .map(|b| b.len() as u64)
            .sum();
        if batch.last > end || bytes > max_bytes {
            tracing::debug!(
                start,
                end,
                last = batch.last,
                bytes,
                max_bytes,
                "the archived batch does not fit the fetch"
            );
            ArchiveStats::count(&stats.read_misses);
            return None;
        }
        ArchiveStats::count(&stats.batches_read);
        Some((commits, batch.certifiers.clone()))
    }

    /// Of the blocks archived with the batch holding the commits `first`
    /// to `last`, those `refs` names (matched by the digest of their
    /// bytes, so a wrong block is never picked). `None` if no archived
    /// batch holds them all (commits fetched from peers in other batches
    /// than the archive's may name blocks of two archived batches: left to
    /// peers, not refused as missing).
    pub async fn blocks(
        &self,
        (first, last): (CommitIndex, CommitIndex),
        refs: &[BlockRef],
    ) -> Option<Vec<Bytes>> {
        let archived = self.find(first).await?;
        if archived.last < last {
            ArchiveStats::count(&self.archive.stats().read_misses);
            return None;
        }
        let wanted: HashSet<Digest> = refs.iter().map(|r| r.digest).collect();
        let blocks = archived.blocks.iter().zip(&archived.digests);
        Some(
            blocks
                .filter(|(_, digest)| wanted.contains(digest))
                .map(|(block, _)| block.clone())
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use object_store::memory::InMemory;
    use object_store::path::Path;
    use object_store::throttle::{ThrottleConfig, ThrottledStore};
    use soma_types::ChainId;

    use super::super::{Config, encoding};
    use super::*;

    /// Each object read takes `GET` of (paused) time.
    const GET: Duration = Duration::from_millis(50);

    /// A reader of batches 1..=2, 101..=102, … (`batches` of them, in
    /// batches of 100), from a store whose every read takes [`GET`],
    /// keeping `cached` batches.
    async fn reader(batches: u64, cached: usize) -> ArchiveReader {
        let store = ThrottledStore::new(
            InMemory::new(),
            ThrottleConfig {
                wait_get_per_call: GET,
                ..ThrottleConfig::default()
            },
        );
        let config = Config {
            cached_batches: cached,
            ..Config::new("memory")
        };
        let archive = Archive::with_store(
            Arc::new(store),
            Path::default(),
            config,
            ChainId(soma_types::Digest([3; 32])),
        );
        for b in 0..batches {
            let first = b * 100 + 1;
            let batch = ArchivedBatch {
                first,
                last: first + 1,
                commits: vec![encoding("c1"), encoding("c2")],
                certifiers: Vec::new(),
                blocks: Vec::new(),
            };
            archive.put_batch(&batch).await.unwrap();
        }
        ArchiveReader::new(archive, 100)
    }

    fn objects_read(reader: &ArchiveReader) -> u64 {
        reader.stats().status().objects_read
    }

    /// Eight workers asking for one batch at once (its commits, its block
    /// chunks) read its object once: the others wait for that read and
    /// are answered from it.
    #[tokio::test(start_paused = true)]
    async fn reads_of_one_batch_at_once_read_its_object_once() {
        let reader = reader(1, 4).await;
        let asked = (0..8).map(|_| reader.commits(1, 2, u64::MAX));
        let answers = futures::future::join_all(asked).await;
        assert!(
            answers
                .iter()
                .all(|a| a.as_ref().is_some_and(|(c, _)| c.len() == 2))
        );
        assert_eq!(objects_read(&reader), 1);
        assert!(reader.reading().is_empty(), "the read's lock is forgotten");
    }

    /// Reads of distinct batches at once go `cached_batches` at a time:
    /// what a reader holds stays within twice that many objects.
    #[tokio::test(start_paused = true)]
    async fn at_most_cached_batches_objects_are_read_at_once() {
        let reader = reader(4, 2).await;
        let asked = (0..4).map(|b| reader.commits(b * 100 + 1, b * 100 + 2, u64::MAX));
        let probe = async {
            let mut seen = Vec::new();
            for _ in 0..3 {
                tokio::time::sleep(GET).await;
                tokio::task::yield_now().await;
                seen.push(objects_read(&reader));
            }
            seen
        };
        let (answers, seen) = tokio::join!(futures::future::join_all(asked), probe);
        assert!(answers.iter().all(Option::is_some));
        // Two objects by the end of the first read's time, four by the
        // end of the second's.
        assert_eq!(seen, vec![2, 4, 4]);
        assert!(reader.reading().is_empty());
    }

    /// A batch of commits `first..=last`, each encoded as `c<index>`
    /// (padded), with no certifier or block.
    fn numbered(first: u64, last: u64) -> ArchivedBatch {
        ArchivedBatch {
            first,
            last,
            commits: (first..=last).map(|i| encoding(&format!("c{i}"))).collect(),
            certifiers: Vec::new(),
            blocks: Vec::new(),
        }
    }

    /// Batches a writer started mid-window (1..=30, 31..=80, 81..=100 in
    /// windows of 100) are found from any commit they hold, by following
    /// each batch's end from the window's boundary; blocks are given only
    /// for commits one batch holds whole.
    #[tokio::test]
    async fn batches_started_mid_window_are_found_by_following_the_batches_before() {
        let archive =
            Archive::in_memory(Config::new("memory"), ChainId(soma_types::Digest([3; 32])));
        let block = encoding("block of 31");
        for (first, last) in [(1, 30), (31, 80), (81, 100)] {
            let batch = ArchivedBatch {
                blocks: vec![block.clone()],
                ..numbered(first, last)
            };
            archive.put_batch(&batch).await.unwrap();
        }
        let reader = ArchiveReader::new(archive, 100);
        let (commits, _) = reader.commits(60, 80, u64::MAX).await.expect("found");
        assert_eq!(commits.len(), 21);
        assert_eq!(commits[0], encoding("c60"));
        // None at 60; then 1..=30 and 31..=80 from the boundary.
        assert_eq!(objects_read(&reader), 2);
        let (commits, _) = reader.commits(95, 100, u64::MAX).await.expect("found");
        assert_eq!(commits.len(), 6);
        // None at 95; then 81..=100 only: the objects before are known.
        assert_eq!(objects_read(&reader), 3);
        // Its end past the fetch's: not an answer to it.
        assert_eq!(reader.commits(60, 79, u64::MAX).await, None);
        let wanted = [BlockRef {
            digest: Digest::of(&block),
            ..BlockRef::default()
        }];
        assert_eq!(
            reader.blocks((40, 80), &wanted).await,
            Some(vec![block.clone()])
        );
        assert_eq!(reader.blocks((40, 81), &wanted).await, None, "two batches");
    }

    /// A hostile archive: one-commit objects from the window's boundary
    /// up, none holding the commit asked for, each object's head and body
    /// coming within `request_timeout` apart but not together. An object
    /// is refused at one `request_timeout` for its head and body together,
    /// and a lookup ends at [`LOOKUP_REQUESTS`] of them whatever its walk
    /// would still read (it read up to 150 objects, about 18 minutes).
    #[tokio::test(start_paused = true)]
    async fn a_lookup_ends_at_its_deadline_whatever_the_archive_lays_out() {
        let timeout = Duration::from_secs(10);
        let config = Config {
            request_timeout: timeout,
            ..Config::new("memory")
        };
        let chain_id = ChainId(soma_types::Digest([3; 32]));
        let memory = Arc::new(InMemory::new());
        let writer = Archive::with_store(memory.clone(), Path::default(), config.clone(), chain_id);
        for i in 1..=150 {
            writer.put_batch(&numbered(i, i)).await.unwrap();
        }
        let slow = |per_call: Duration, per_byte: Duration| {
            let store = ThrottledStore::new(
                memory.clone(),
                ThrottleConfig {
                    wait_get_per_call: per_call,
                    wait_get_per_byte: per_byte,
                    ..ThrottleConfig::default()
                },
            );
            let archive =
                Archive::with_store(Arc::new(store), Path::default(), config.clone(), chain_id);
            ArchiveReader::new(archive, 200)
        };

        // Heads in 7 s each, bodies at once: the read at 180 (none), then
        // the walk from 1, one object every 7 s, until the deadline.
        let reader = slow(Duration::from_secs(7), Duration::ZERO);
        let started = tokio::time::Instant::now();
        assert_eq!(reader.commits(180, 180, u64::MAX).await, None);
        assert_eq!(started.elapsed(), timeout * LOOKUP_REQUESTS);
        let status = reader.stats().status();
        assert_eq!((status.objects_read, status.read_errors), (1, 1));

        // Head and body each within the timeout, together past it: the
        // object is not read.
        let size = writer.batch(1).await.unwrap().unwrap().encode().len() as u32;
        let reader = slow(Duration::from_secs(7), Duration::from_secs(7) / size);
        let started = tokio::time::Instant::now();
        assert_eq!(reader.commits(1, 1, u64::MAX).await, None);
        assert_eq!(started.elapsed(), timeout);
        let status = reader.stats().status();
        assert_eq!((status.objects_read, status.read_errors), (0, 1));
    }

    /// An object written again with other ends after its span was
    /// remembered (31..=80 become 31..=90 and 91..=100): a walk that a
    /// remembered span leads to nothing walks again, reading each object.
    #[tokio::test]
    async fn a_walk_led_astray_by_a_remembered_span_walks_again_reading_each_object() {
        let archive =
            Archive::in_memory(Config::new("memory"), ChainId(soma_types::Digest([3; 32])));
        for (first, last) in [(1, 30), (31, 80)] {
            archive.put_batch(&numbered(first, last)).await.unwrap();
        }
        let reader = ArchiveReader::new(archive, 100);
        assert!(reader.commits(60, 80, u64::MAX).await.is_some());
        for (first, last) in [(31, 90), (91, 100)] {
            reader
                .archive
                .put_batch(&numbered(first, last))
                .await
                .unwrap();
        }
        let (commits, _) = reader.commits(95, 100, u64::MAX).await.expect("found");
        assert_eq!(commits.len(), 6);
    }

    /// A batch verification refused is dropped alone: the other batches
    /// kept are still answered without a read, and the refused one is
    /// read again.
    #[tokio::test(start_paused = true)]
    async fn a_refused_batch_is_dropped_alone_and_read_again() {
        let reader = reader(3, 4).await;
        for first in [1, 101, 201] {
            assert!(reader.commits(first, first + 1, u64::MAX).await.is_some());
        }
        assert_eq!(objects_read(&reader), 3);
        reader.refused(102);
        assert!(reader.commits(1, 2, u64::MAX).await.is_some());
        assert!(reader.commits(201, 202, u64::MAX).await.is_some());
        assert_eq!(
            objects_read(&reader),
            3,
            "the batches not refused stay kept"
        );
        assert!(reader.commits(101, 102, u64::MAX).await.is_some());
        assert_eq!(objects_read(&reader), 4, "the refused batch is read again");
        assert_eq!(reader.stats().status().refused, 1);
    }

    /// An archive that fails is not asked again before a pause that
    /// doubles from `min_retry` while its reads go on failing; batches
    /// kept are still answered meanwhile, and a read that succeeds ends
    /// the pauses, so the next failure pauses for `min_retry` again.
    #[tokio::test(start_paused = true)]
    async fn reads_of_a_failing_archive_pause_doubling_and_a_success_ends_the_pauses() {
        let min = Duration::from_millis(500);
        let reader = failing(min, ThrottleConfig::default()).await;
        // (objects read, read errors, reads deferred)
        let counts = || counts(&reader);
        assert!(reader.commits(101, 102, u64::MAX).await.is_some());
        assert_eq!(reader.commits(1, 2, u64::MAX).await, None);
        assert_eq!(counts(), (2, 1, 0));
        // Paused for `min`: not read, but the batch kept is answered.
        assert_eq!(reader.commits(1, 2, u64::MAX).await, None);
        assert!(reader.commits(101, 102, u64::MAX).await.is_some());
        assert_eq!(counts(), (2, 1, 1));
        tokio::time::advance(min - Duration::from_millis(1)).await;
        assert_eq!(reader.commits(1, 2, u64::MAX).await, None);
        assert_eq!(counts(), (2, 1, 2));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(reader.commits(1, 2, u64::MAX).await, None);
        assert_eq!(counts(), (3, 2, 2), "read again once the pause ended");
        // The next pause is twice as long.
        tokio::time::advance(min * 2 - Duration::from_millis(1)).await;
        assert_eq!(reader.commits(1, 2, u64::MAX).await, None);
        assert_eq!(counts(), (3, 2, 3));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(reader.commits(1, 2, u64::MAX).await, None);
        assert_eq!(counts(), (4, 3, 3));
        // Repaired: read after the third pause (four times `min`).
        reader.archive.put_batch(&numbered(1, 2)).await.unwrap();
        tokio::time::advance(min * 4).await;
        assert!(reader.commits(1, 2, u64::MAX).await.is_some());
        assert_eq!(counts(), (5, 3, 3));
        // The next failure pauses for `min` again.
        assert_eq!(reader.commits(201, 202, u64::MAX).await, None);
        assert_eq!(counts(), (6, 4, 3));
        tokio::time::advance(min).await;
        assert_eq!(reader.commits(201, 202, u64::MAX).await, None);
        assert_eq!(counts(), (7, 5, 3));
    }

    /// A reader (`min_retry` of `min`, its reads throttled by `throttle`)
    /// of an archive holding batch 101..=102 and, at 1 and 201, objects
    /// that are not batches (11 and 1,000 bytes).
    async fn failing(min: Duration, throttle: ThrottleConfig) -> ArchiveReader {
        use object_store::{ObjectStoreExt, PutPayload};
        let config = Config {
            min_retry: min,
            max_retry: Duration::from_secs(60),
            ..Config::new("memory")
        };
        let memory = Arc::new(InMemory::new());
        let chain_id = ChainId(soma_types::Digest([3; 32]));
        let writer = Archive::with_store(memory.clone(), Path::default(), config.clone(), chain_id);
        writer.put_batch(&numbered(101, 102)).await.unwrap();
        let not_batches = [
            (1, PutPayload::from_static(b"not a batch")),
            (201, PutPayload::from(vec![0u8; 1_000])),
        ];
        for (first, garbage) in not_batches {
            memory
                .put(&writer.batch_path(first), garbage)
                .await
                .unwrap();
        }
        let store = ThrottledStore::new(memory, throttle);
        let archive = Archive::with_store(Arc::new(store), Path::default(), config, chain_id);
        ArchiveReader::new(archive, 100)
    }

    /// The reader's (objects read, read errors, reads deferred).
    fn counts(reader: &ArchiveReader) -> (u64, u64, u64) {
        let s = reader.stats().status();
        (s.objects_read, s.read_errors, s.reads_deferred)
    }

    /// A slow read begun with a fast one, both failing, the slow one only
    /// once the pause the fast one began has ended: it starts no pause of
    /// its own, and the next lookup reads.
    #[tokio::test(start_paused = true)]
    async fn a_read_begun_before_a_pause_that_fails_after_it_ended_starts_none() {
        let min = Duration::from_millis(500);
        let throttle = ThrottleConfig {
            wait_get_per_byte: Duration::from_millis(1),
            ..ThrottleConfig::default()
        };
        let reader = failing(min, throttle).await;
        let started = tokio::time::Instant::now();
        let (fast, slow) = tokio::join!(
            reader.commits(1, 2, u64::MAX),
            reader.commits(201, 202, u64::MAX)
        );
        assert_eq!((fast, slow), (None, None));
        assert!(
            started.elapsed() >= Duration::from_secs(1),
            "the slow read outlived the pause"
        );
        assert_eq!(counts(&reader), (2, 2, 0));
        assert_eq!(reader.commits(1, 2, u64::MAX).await, None);
        assert_eq!(counts(&reader), (3, 3, 0), "read, not deferred");
    }

    /// Reads asked together that all fail pause reads once, for
    /// `min_retry`, not once each (doubling with each), and the next
    /// failure doubles it once.
    #[tokio::test(start_paused = true)]
    async fn reads_failing_together_pause_once() {
        let min = Duration::from_millis(500);
        let throttle = ThrottleConfig {
            wait_get_per_call: GET,
            ..ThrottleConfig::default()
        };
        let reader = failing(min, throttle).await;
        let counts = || counts(&reader);
        let (a, b) = tokio::join!(
            reader.commits(1, 2, u64::MAX),
            reader.commits(201, 202, u64::MAX)
        );
        assert_eq!((a, b), (None, None));
        assert_eq!(counts(), (2, 2, 0), "both read, both failed");
        tokio::time::advance(min).await;
        assert_eq!(reader.commits(1, 2, u64::MAX).await, None);
        assert_eq!(counts(), (3, 3, 0), "read again after one pause of min");
        // That failure doubled the pause once.
        tokio::time::advance(min * 2 - Duration::from_millis(1)).await;
        assert_eq!(reader.commits(1, 2, u64::MAX).await, None);
        assert_eq!(counts(), (3, 3, 1));
    }
}
