//! The archive: certified commit batches kept in an object store, for
//! nodes that need history no connected peer holds any more.
//!
//! A node with `write` on copies every certified batch it holds into the
//! archive (`writer`), in the background: a slow or failing archive is
//! counted and retried, and never holds up sync. A node with `read` on
//! turns to the archive when no connected peer holds the range it needs
//! (every peer's lowest available commit is above it): a sync worker reads
//! the batch there instead ([`ArchiveReader`]) and hands it to the same
//! verification as a peer's answer. The archive is not trusted: a batch
//! that fails verification is refused, counted, and not applied.
//!
//! # Layout
//!
//! Under the archive's root (a local directory, or `s3://bucket/prefix`,
//! `gs://bucket/prefix`, `https://host/prefix`):
//!
//! - `batches/<first>.batch`, `<first>` the batch's first commit index in
//!   20 decimal digits: one [`ArchivedBatch`], in the protocol's codec
//!   (docs/protocol.md, "Archive").
//! - `head.json`: `{"chain_id": "<hex>", "next": <index>, "last": <index>}`,
//!   the next commit the writer will archive (every commit below it from
//!   the first batch up is archived) and the first commit of the batch it
//!   wrote last, the one ending at `next - 1` (absent in heads written
//!   before it was kept).
//!
//! A batch is what a peer's FetchCommits answer would hold for the range
//! (up to the highest certified commit within a batch of the writer's
//! `commit-sync-batch-size`, ending at the epoch's last commit if that
//! comes first), with its minimal certificate, plus every block its commits
//! name, in commit order.

#[cfg(feature = "cloud")]
mod http;
mod reader;
mod writer;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};
use soma_types::{ChainId, CommitIndex};

pub use reader::ArchiveReader;
pub(crate) use writer::{WriterDeps, supervise_writer};

/// The largest `head.json` read: a chain id and an index take under 100
/// bytes.
pub const MAX_HEAD_BYTES: u64 = 4 << 10;

/// The most entries of one listing read: the lookup of the batch holding
/// the commit before `head.json`'s, listed from a batch's length before
/// it to the archive's end, a few entries in an honest archive (a WebDAV
/// archive is listed whole, but in one body, bounded by
/// `max_object_bytes`). A longer listing fails the lookup, and the writer
/// archives again from its store's lowest commit.
pub const MOST_LISTED: u64 = 1 << 20;

/// How a node uses an archive.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Config {
    /// Where the archive is: a local directory (a path, or `file:///…`),
    /// `s3://bucket/prefix` (S3 and compatible servers; credentials and
    /// endpoint from the `AWS_*` environment variables),
    /// `gs://bucket/prefix` (`GOOGLE_*`), or `https://host/prefix`
    /// (WebDAV). Object stores other than a local directory need the
    /// feature `cloud` of this crate, as the node binary has.
    pub url: String,
    /// Copy every certified batch into the archive.
    pub write: bool,
    /// Read batches no connected peer holds from the archive.
    pub read: bool,
    /// Largest archive object read or written, in bytes.
    pub max_object_bytes: u64,
    /// How often the writer looks for new certified batches.
    pub interval: Duration,
    /// Time allowed for one object store request.
    pub request_timeout: Duration,
    /// First pause after a failed write, or a failed read before the
    /// archive is read again; it doubles up to `max_retry`.
    pub min_retry: Duration,
    /// Longest pause between retries of a failed write, or reads of an
    /// archive that keeps failing.
    pub max_retry: Duration,
    /// Batches a reader keeps after reading them: sync reads a batch's
    /// commits, then its blocks in chunks, for several batches at once.
    pub cached_batches: usize,
    /// Object store options (`aws_endpoint`, `aws_access_key_id`, …, as
    /// the `object_store` crate names them), over those taken from the
    /// `AWS_*` and `GOOGLE_*` environment variables.
    pub options: Vec<(String, String)>,
}

impl Config {
    /// An archive at `url`, written and read, other settings default.
    pub fn new(url: impl Into<String>) -> Self {
        Config {
            url: url.into(),
            write: true,
            read: true,
            max_object_bytes: soma_types::codec::MAX_DECODE_BYTES as u64,
            interval: Duration::from_secs(1),
            request_timeout: Duration::from_secs(30),
            min_retry: Duration::from_millis(500),
            max_retry: Duration::from_secs(60),
            cached_batches: 4,
            options: Vec::new(),
        }
    }
}

/// Why the archive could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// The URL names no archive this build can open.
    #[error("archive url {url:?}: {reason}")]
    Url {
        /// The URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// The object store failed.
    #[error("archive: {0}")]
    Store(#[from] object_store::Error),
    /// A request took longer than `request_timeout`.
    #[error("archive: no answer within {0:?}")]
    Timeout(Duration),
    /// An object is larger than `max_object_bytes`.
    #[error("archive object {path} has {size} bytes, more than the {max} allowed")]
    TooLarge {
        /// The object.
        path: String,
        /// Its size.
        size: u64,
        /// The limit.
        max: u64,
    },
    /// An object could not be decoded.
    #[error("archive object {path} is malformed: {reason}")]
    Malformed {
        /// The object.
        path: String,
        /// Why.
        reason: String,
    },
    /// The node's own store could not give the batch.
    #[error("archive: {0}")]
    Source(String),
    /// The store reported a write done but does not hold the object as
    /// written.
    #[error(
        "archive object {path}: the store reported {size} bytes written but holds {}",
        found.map_or("nothing".to_string(), |n| format!("{n} bytes"))
    )]
    NotKept {
        /// The object.
        path: String,
        /// Its size as written.
        size: u64,
        /// Its size as the store holds it, if at all.
        found: Option<u64>,
    },
    /// A listing passed what is read of one: [`MOST_LISTED`] entries, or
    /// a body past `max_object_bytes` (a WebDAV listing is of the whole
    /// archive, in one body).
    #[error("the archive's listing from {from} {reason}")]
    ListingTooLong {
        /// Where the listing started.
        from: String,
        /// What it passed.
        reason: String,
    },
    /// The archive holds another chain.
    #[error("the archive holds chain {found}, not ours ({ours})")]
    WrongChain {
        /// The archive's chain id.
        found: String,
        /// Ours.
        ours: String,
    },
}

/// One archived batch: commits `first..=last` as their encodings, the
/// certifier blocks of `last`, and every block the commits name, in commit
/// order. Read back, every part is verified as a peer's answer would be.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchivedBatch {
    /// Index of the first commit.
    pub first: CommitIndex,
    /// Index of the last commit.
    pub last: CommitIndex,
    /// The commits, encoded.
    #[serde(deserialize_with = "capped")]
    pub commits: Vec<Bytes>,
    /// Blocks voting for the last commit (a minimal quorum), encoded.
    #[serde(deserialize_with = "capped")]
    pub certifiers: Vec<Bytes>,
    /// The blocks the commits name, encoded.
    #[serde(deserialize_with = "capped")]
    pub blocks: Vec<Bytes>,
}

/// The most encodings one list of a batch holds when read back: far past
/// any honest batch (a batch of 1,000 commits of 1,000 blocks), and a
/// bound on what a forged length costs. The codec's bound on memory per
/// encoded byte does not cover a list of empty encodings, one byte each
/// but 32 in memory: without this, 64 MiB of them would take 2 GiB.
pub const MAX_BATCH_ENCODINGS: usize = 1 << 20;

/// The fewest bytes an encoding in a batch has: every commit holds two
/// digests (the previous commit's, the leader's), every block a 64-byte
/// signature. Each encoding read costs its bytes plus about 48 (its
/// `Bytes` and its allocation's overhead): at a byte each, a 64 MiB
/// object of the most encodings decoded into some 300 MiB; at 64 or more,
/// under twice its size.
pub const MIN_ENCODING_BYTES: usize = 64;

/// A list of encodings of at most [`MAX_BATCH_ENCODINGS`], none shorter
/// than [`MIN_ENCODING_BYTES`], refused as soon as it passes either.
fn capped<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Vec<Bytes>, D::Error> {
    struct Capped;
    impl<'de> serde::de::Visitor<'de> for Capped {
        type Value = Vec<Bytes>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            write!(
                f,
                "at most {MAX_BATCH_ENCODINGS} encodings of {MIN_ENCODING_BYTES} bytes or more"
            )
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Self::Value, A::Error> {
            let claimed = seq.size_hint().unwrap_or(0);
            if claimed > MAX_BATCH_ENCODINGS {
                return Err(serde::de::Error::invalid_length(claimed, &self));
            }
            // The claim is the object's word: room grows with what comes.
            let mut list = Vec::with_capacity(claimed.min(4_096));
            while let Some(encoding) = seq.next_element::<Bytes>()? {
                if encoding.len() < MIN_ENCODING_BYTES || list.len() == MAX_BATCH_ENCODINGS {
                    return Err(serde::de::Error::invalid_length(list.len() + 1, &self));
                }
                list.push(encoding);
            }
            Ok(list)
        }
    }
    deserializer.deserialize_seq(Capped)
}

impl ArchivedBatch {
    /// The batch's encoding, as stored.
    pub fn encode(&self) -> Vec<u8> {
        soma_types::codec::encode(self)
    }

    /// At least the length of [`Self::encode`]: the bytes of every
    /// encoding, and the most each length (and the two indexes) takes.
    pub fn most_encoded_bytes(&self) -> u64 {
        const MOST_VARINT: u64 = 9;
        let lists = [&self.commits, &self.certifiers, &self.blocks];
        let encodings: u64 = lists
            .iter()
            .flat_map(|l| l.iter())
            .map(|b| b.len() as u64 + MOST_VARINT)
            .sum();
        encodings + MOST_VARINT * (lists.len() as u64 + 2)
    }

    /// Decodes a stored batch of at most `limit` bytes.
    pub fn decode(bytes: &[u8], limit: usize) -> Result<Self, soma_types::Error> {
        soma_types::codec::decode(bytes, limit)
    }
}

/// `head.json`.
#[derive(Debug, Serialize, Deserialize)]
struct Head {
    chain_id: String,
    next: CommitIndex,
    /// The first commit of the batch written last, which ends at
    /// `next - 1`: a restarted writer checks the head against that batch
    /// without listing the archive (a WebDAV archive is listed whole).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    last: Option<CommitIndex>,
}

/// What `head.json` says: the next commit the writer will archive, and
/// the first commit of the batch it wrote last, if named.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct HeadRecord {
    pub(crate) next: CommitIndex,
    pub(crate) last: Option<CommitIndex>,
}

/// What the archive did, for metrics and status.
#[derive(Debug, Default)]
pub struct ArchiveStats {
    next: AtomicU64,
    batches_written: AtomicU64,
    write_errors: AtomicU64,
    batches_read: AtomicU64,
    objects_read: AtomicU64,
    read_misses: AtomicU64,
    read_errors: AtomicU64,
    reads_deferred: AtomicU64,
    refused: AtomicU64,
    writer_restarts: AtomicU64,
}

/// A snapshot of [`ArchiveStats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchiveStatus {
    /// The next commit the writer will archive (0 before it has read the
    /// archive's head, and when it does not write).
    pub next: CommitIndex,
    /// Batches written.
    pub batches_written: u64,
    /// Failed writes (each retried).
    pub write_errors: u64,
    /// Reads whose data was handed to verification.
    pub batches_read: u64,
    /// Batch objects fetched from the archive's store (a reader's reads
    /// of one batch at once are merged into one).
    #[serde(default)]
    pub objects_read: u64,
    /// Reads of a range the archive does not hold.
    pub read_misses: u64,
    /// Reads that failed (store errors, timeouts, oversized objects).
    pub read_errors: u64,
    /// Reads not made: the archive failed the last one, and the reader
    /// waits out a pause (doubling from `min_retry` to `max_retry` while
    /// reads go on failing) before asking it again.
    #[serde(default)]
    pub reads_deferred: u64,
    /// Archive data refused by verification (corrupt or forged).
    pub refused: u64,
    /// Times the writer task panicked and was started again.
    #[serde(default)]
    pub writer_restarts: u64,
}

impl ArchiveStats {
    /// A snapshot.
    pub fn status(&self) -> ArchiveStatus {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ArchiveStatus {
            next: get(&self.next),
            batches_written: get(&self.batches_written),
            write_errors: get(&self.write_errors),
            batches_read: get(&self.batches_read),
            objects_read: get(&self.objects_read),
            read_misses: get(&self.read_misses),
            read_errors: get(&self.read_errors),
            reads_deferred: get(&self.reads_deferred),
            refused: get(&self.refused),
            writer_restarts: get(&self.writer_restarts),
        }
    }

    fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// The body of `result`, a chunk at a time, refused as soon as it passes
/// the size the object claimed (checked against `max_object_bytes` before):
/// a server may send a body longer than its `Content-Length` (with a
/// chunked transfer encoding beside it, hyper reads the body to its end),
/// and object_store's own `bytes()` collects whatever comes. A body that
/// ends short of the claim is refused too.
async fn body(path: &Path, result: object_store::GetResult) -> Result<Bytes, ArchiveError> {
    use futures::StreamExt;
    let claimed = result.meta.size;
    let mut body = Vec::with_capacity(usize::try_from(claimed).unwrap_or(0));
    let mut stream = result.into_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        let size = (body.len() + chunk.len()) as u64;
        if size > claimed {
            return Err(ArchiveError::TooLarge {
                path: path.to_string(),
                size,
                max: claimed,
            });
        }
        body.extend_from_slice(&chunk);
    }
    if body.len() as u64 != claimed {
        return Err(ArchiveError::Malformed {
            path: path.to_string(),
            reason: format!("its body ended at {} of {claimed} bytes", body.len()),
        });
    }
    Ok(Bytes::from(body))
}

/// The object at `file` of a local archive, `None` if there is none: not
/// through a symbolic link, and only a regular file of at most `max`
/// bytes ([`crate::files::read_bounded`]).
fn read_local(
    file: &std::path::Path,
    max: u64,
    path: String,
) -> Result<Option<Bytes>, ArchiveError> {
    use crate::files::{ReadError, read_bounded};
    let malformed = |reason: String| ArchiveError::Malformed {
        path: path.clone(),
        reason,
    };
    match read_bounded(file, max, false) {
        Ok(body) => Ok(Some(Bytes::from(body))),
        Err(ReadError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(ReadError::TooLarge { size, max }) => Err(ArchiveError::TooLarge { path, size, max }),
        Err(e @ (ReadError::SymbolicLink | ReadError::NotRegular)) => Err(malformed(e.to_string())),
        Err(ReadError::Io(e)) => Err(ArchiveError::Source(format!("reading {path}: {e}"))),
    }
}

/// Opens the object store `url` names, every answer's body bounded
/// (`http`).
#[cfg(feature = "cloud")]
fn open_remote(
    url: &url::Url,
    options: impl IntoIterator<Item = (String, String)>,
    max_body_bytes: u64,
) -> Result<(Box<dyn ObjectStore>, Path), object_store::Error> {
    http::open(url, options, max_body_bytes)
}

/// The bound a body was cut at, if `error` is that cut.
#[cfg(feature = "cloud")]
fn body_cut_at(error: &object_store::Error) -> Option<u64> {
    http::body_cut_at(error)
}

/// Without the `cloud` feature no body is cut.
#[cfg(not(feature = "cloud"))]
fn body_cut_at(_error: &object_store::Error) -> Option<u64> {
    None
}

/// Without the `cloud` feature only local archives open.
#[cfg(not(feature = "cloud"))]
fn open_remote(
    url: &url::Url,
    _options: impl IntoIterator<Item = (String, String)>,
    _max_body_bytes: u64,
) -> Result<(Box<dyn ObjectStore>, Path), String> {
    Err(format!(
        "{}:// archives need a build with the `cloud` feature of soma-actors (the node binary has it)",
        url.scheme()
    ))
}

/// Syncs `file` and the directory that names it.
fn sync_durably(file: &std::path::Path) -> std::io::Result<()> {
    std::fs::File::open(file)?.sync_all()?;
    match file.parent() {
        Some(dir) => std::fs::File::open(dir)?.sync_all(),
        None => Ok(()),
    }
}

/// An open archive.
#[derive(Clone, Debug)]
pub struct Archive {
    store: Arc<dyn ObjectStore>,
    root: Path,
    /// The directory of a local archive: only its regular files are read.
    local: Option<std::path::PathBuf>,
    chain_id: ChainId,
    config: Config,
    stats: Arc<ArchiveStats>,
    /// Places for reads and syncs of a local archive on the blocking pool,
    /// each held until its thread returns: a timed-out call's thread runs
    /// on (a hung mount), and without a bound each retry would take one
    /// more of the threads that serve peers and write the store.
    local_ops: Arc<tokio::sync::Semaphore>,
}

impl Archive {
    /// Opens the archive `config.url` names for the chain `chain_id`. A
    /// local directory is created if missing.
    pub fn open(config: Config, chain_id: ChainId) -> Result<Self, ArchiveError> {
        let bad = |reason: String| ArchiveError::Url {
            url: config.url.clone(),
            reason,
        };
        let mut local = None;
        let (store, root): (Arc<dyn ObjectStore>, Path) = match url::Url::parse(&config.url) {
            Ok(url) if url.scheme() != "file" => {
                // Credentials and endpoints come from the environment.
                let options = std::env::vars()
                    .filter(|(k, _)| k.starts_with("AWS_") || k.starts_with("GOOGLE_"))
                    .chain(config.options.iter().cloned());
                let (store, root) = open_remote(&url, options, config.max_object_bytes)
                    .map_err(|e| bad(e.to_string()))?;
                (Arc::from(store), root)
            }
            parsed => {
                let dir = match parsed {
                    Ok(url) => url
                        .to_file_path()
                        .map_err(|()| bad("not a local path".into()))?,
                    Err(_) => std::path::PathBuf::from(&config.url),
                };
                std::fs::create_dir_all(&dir).map_err(|e| bad(e.to_string()))?;
                let store = object_store::local::LocalFileSystem::new_with_prefix(&dir)
                    .map_err(|e| bad(e.to_string()))?;
                local = Some(dir);
                (Arc::new(store), Path::default())
            }
        };
        Ok(Archive {
            local,
            ..Self::with_store(store, root, config, chain_id)
        })
    }

    /// An archive on `store` under `root`.
    pub fn with_store(
        store: Arc<dyn ObjectStore>,
        root: Path,
        config: Config,
        chain_id: ChainId,
    ) -> Self {
        Archive {
            store,
            root,
            local: None,
            chain_id,
            local_ops: Arc::new(tokio::sync::Semaphore::new(
                config.cached_batches.max(1) + 2,
            )),
            config,
            stats: Arc::new(ArchiveStats::default()),
        }
    }

    /// Runs `op` on the blocking pool in one of the local archive's places
    /// (waiting for one, within the caller's timeout).
    async fn local_op<T: Send + 'static>(
        &self,
        op: impl FnOnce() -> Result<T, ArchiveError> + Send + 'static,
    ) -> Result<T, ArchiveError> {
        let place = (self.local_ops.clone().acquire_owned().await)
            .map_err(|e| ArchiveError::Source(e.to_string()))?;
        tokio::task::spawn_blocking(move || {
            let _place = place;
            op()
        })
        .await
        .map_err(|e| ArchiveError::Source(format!("the call failed: {e}")))?
    }

    /// An archive in memory, for tests.
    #[cfg(test)]
    pub(crate) fn in_memory(config: Config, chain_id: ChainId) -> Self {
        let store = Arc::new(object_store::memory::InMemory::new());
        Self::with_store(store, Path::default(), config, chain_id)
    }

    /// Its settings.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// What it did so far.
    pub fn stats(&self) -> &Arc<ArchiveStats> {
        &self.stats
    }

    /// The object of the batch starting at `first`.
    pub fn batch_path(&self, first: CommitIndex) -> Path {
        self.root
            .clone()
            .join("batches")
            .join(format!("{first:020}.batch"))
    }

    fn head_path(&self) -> Path {
        self.root.clone().join("head.json")
    }

    async fn timed<T, E: Into<ArchiveError>>(
        &self,
        call: impl std::future::Future<Output = Result<T, E>>,
    ) -> Result<T, ArchiveError> {
        tokio::time::timeout(self.config.request_timeout, call)
            .await
            .map_err(|_| ArchiveError::Timeout(self.config.request_timeout))?
            .map_err(Into::into)
    }

    /// The object at `path`, `None` if there is none; refused past
    /// `max_object_bytes` before its body is read, and as soon as its body
    /// passes the size the object claimed (see [`body`]). In a local
    /// archive only a regular file is read: opening a FIFO planted at a
    /// batch's path would block a thread of the blocking pool until a
    /// writer came, a thread per read, until the pool that serves peers
    /// and writes the store had none left.
    async fn get(&self, path: &Path) -> Result<Option<Bytes>, ArchiveError> {
        self.get_within(path, self.config.max_object_bytes).await
    }

    /// [`Archive::get`], refusing objects past `max` bytes.
    async fn get_within(&self, path: &Path, max: u64) -> Result<Option<Bytes>, ArchiveError> {
        if let Some(dir) = &self.local {
            let (file, name) = (dir.join(path.as_ref()), path.to_string());
            let read = self.local_op(move || read_local(&file, max, name));
            return self.timed(read).await;
        }
        // One deadline for the answer's head and its body together: a
        // store that sends its head just in time, then its body just in
        // time, takes one `request_timeout`, not two.
        let read = async {
            let result = match self.store.get(path).await {
                Ok(r) => r,
                Err(object_store::Error::NotFound { .. }) => return Ok(None),
                Err(e) => return Err(ArchiveError::from(e)),
            };
            let size = result.meta.size;
            if size > max {
                return Err(ArchiveError::TooLarge {
                    path: path.to_string(),
                    size,
                    max,
                });
            }
            body(path, result).await.map(Some)
        };
        self.timed(read).await
    }

    /// Writes `bytes` at `path`, durably: in a local archive the file and
    /// its directory are synced before this returns (object_store renames
    /// a written file into place without syncing it), since what the
    /// writer puts lets pruning delete the same commits from the store,
    /// and a power loss must not take both copies.
    async fn put(&self, path: &Path, bytes: Vec<u8>) -> Result<(), ArchiveError> {
        let payload = PutPayload::from(bytes);
        self.timed(self.store.put(path, payload)).await?;
        if let Some(dir) = &self.local {
            let file = dir.join(path.as_ref());
            let synced = self.local_op(move || {
                sync_durably(&file).map_err(|source| {
                    ArchiveError::Store(object_store::Error::Generic {
                        store: "local",
                        source: Box::new(source),
                    })
                })
            });
            self.timed(synced).await?;
        }
        Ok(())
    }

    /// The batch starting at `first`, if the archive holds one.
    pub async fn batch(&self, first: CommitIndex) -> Result<Option<ArchivedBatch>, ArchiveError> {
        let path = self.batch_path(first);
        let Some(bytes) = self.get(&path).await? else {
            return Ok(None);
        };
        ArchiveStats::count(&self.stats.objects_read);
        let limit = usize::try_from(self.config.max_object_bytes).unwrap_or(usize::MAX);
        // Up to 64 MiB: decoded on the blocking pool, not a runtime thread.
        let decoded = tokio::task::spawn_blocking(move || ArchivedBatch::decode(&bytes, limit));
        let batch = decoded
            .await
            .map_err(|e| ArchiveError::Source(format!("the decode failed: {e}")))?
            .map_err(|e| ArchiveError::Malformed {
                path: path.to_string(),
                reason: e.to_string(),
            })?;
        // One encoding per commit claimed: a batch claiming more would,
        // cached, answer for every index it claims without the archive
        // being read again.
        let claimed = batch.last.checked_sub(first).map(|n| n.saturating_add(1));
        if batch.first != first || claimed != Some(batch.commits.len() as u64) {
            return Err(ArchiveError::Malformed {
                path: path.to_string(),
                reason: format!(
                    "it claims commits {}..={} in {} encodings",
                    batch.first,
                    batch.last,
                    batch.commits.len()
                ),
            });
        }
        Ok(Some(batch))
    }

    /// The first commit of the stored batch that would hold `index`, in
    /// batches of at most `longest` commits: the greatest batch start at or
    /// before it, from a listing of the batches past `index - longest`
    /// (names sort as their numbers), so a long archive is not listed
    /// whole. The listing is read an entry at a time, keeping only the
    /// best so far, and at most [`MOST_LISTED`] entries of it
    /// ([`ArchiveError::ListingTooLong`]): a store chooses how many pages
    /// a listing has, and the entries of one that never ends it were held
    /// in memory until the request timed out. No entry past `index` ends
    /// the walk: listings of a local directory or WebDAV come in no order.
    /// The walk has one `request_timeout`.
    pub async fn batch_holding(
        &self,
        index: CommitIndex,
        longest: u64,
    ) -> Result<Option<CommitIndex>, ArchiveError> {
        self.batch_holding_within(index, longest, MOST_LISTED).await
    }

    async fn batch_holding_within(
        &self,
        index: CommitIndex,
        longest: u64,
        most: u64,
    ) -> Result<Option<CommitIndex>, ArchiveError> {
        use futures::StreamExt;
        let prefix = self.root.clone().join("batches");
        let offset = self.batch_path(index.saturating_sub(longest));
        let walk = async {
            let mut listing = self.store.list_with_offset(Some(&prefix), &offset);
            let (mut best, mut listed) = (None, 0u64);
            while let Some(meta) = listing.next().await {
                listed += 1;
                let too_long = |reason| ArchiveError::ListingTooLong {
                    from: offset.to_string(),
                    reason,
                };
                if listed > most {
                    return Err(too_long(format!("passed {most} entries")));
                }
                let meta = match meta {
                    Ok(meta) => meta,
                    Err(e) => match body_cut_at(&e) {
                        Some(bound) => return Err(too_long(format!("passed {bound} bytes"))),
                        None => return Err(e.into()),
                    },
                };
                let first = (meta.location.filename())
                    .and_then(|name| name.strip_suffix(".batch")?.parse::<CommitIndex>().ok());
                best = best.max(first.filter(|first| *first <= index));
            }
            Ok(best)
        };
        self.timed(walk).await
    }

    /// Stores `batch` under its first commit.
    pub async fn put_batch(&self, batch: &ArchivedBatch) -> Result<(), ArchiveError> {
        let bytes = batch.encode();
        if bytes.len() as u64 > self.config.max_object_bytes {
            return Err(ArchiveError::TooLarge {
                path: self.batch_path(batch.first).to_string(),
                size: bytes.len() as u64,
                max: self.config.max_object_bytes,
            });
        }
        let path = self.batch_path(batch.first);
        let size = bytes.len() as u64;
        self.put(&path, bytes).await?;
        // A local archive's file was written and synced by this node.
        if self.local.is_some() {
            return Ok(());
        }
        self.confirm(&path, size).await
    }

    /// Checks that the store holds `path` at `size` bytes after a write it
    /// reported done: the writer publishes what it archived for pruning,
    /// so a store that answers a write with success and keeps nothing (or
    /// less: a gateway without a backend, a bucket rule that drops
    /// objects) would have the node delete commits no copy holds. One HEAD
    /// request, not a read back: it catches a store that drops or cuts
    /// writes and says so when asked, not one that lies to each request on
    /// purpose (an archive is only as safe as its credentials). A store
    /// that shows a write late (a cached 404) fails the write, which is
    /// written again after the writer's pause.
    async fn confirm(&self, path: &Path, size: u64) -> Result<(), ArchiveError> {
        let found = match self.timed(self.store.head(path)).await {
            Ok(meta) => Some(meta.size),
            Err(ArchiveError::Store(object_store::Error::NotFound { .. })) => None,
            Err(e) => return Err(e),
        };
        if found != Some(size) {
            return Err(ArchiveError::NotKept {
                path: path.to_string(),
                size,
                found,
            });
        }
        Ok(())
    }

    /// The next commit the writer will archive, from `head.json`; `None`
    /// for an empty archive. Refuses an archive of another chain.
    pub async fn head(&self) -> Result<Option<CommitIndex>, ArchiveError> {
        Ok(self.head_record().await?.map(|head| head.next))
    }

    /// `head.json` whole; `None` for an empty archive. Refuses an archive
    /// of another chain.
    pub(crate) async fn head_record(&self) -> Result<Option<HeadRecord>, ArchiveError> {
        let path = self.head_path();
        let Some(bytes) = self.get_within(&path, MAX_HEAD_BYTES).await? else {
            return Ok(None);
        };
        let head: Head = serde_json::from_slice(&bytes).map_err(|e| ArchiveError::Malformed {
            path: path.to_string(),
            reason: e.to_string(),
        })?;
        let ours = hex::encode(self.chain_id.0.0);
        if head.chain_id != ours {
            return Err(ArchiveError::WrongChain {
                found: head.chain_id,
                ours,
            });
        }
        Ok(Some(HeadRecord {
            next: head.next,
            last: head.last,
        }))
    }

    /// Writes `head.json`: `next`, and `last`, the first commit of the
    /// batch that ends at `next - 1`.
    async fn set_head(
        &self,
        next: CommitIndex,
        last: Option<CommitIndex>,
    ) -> Result<(), ArchiveError> {
        let head = Head {
            chain_id: hex::encode(self.chain_id.0.0),
            next,
            last,
        };
        let bytes = serde_json::to_vec(&head).expect("a head encodes");
        self.put(&self.head_path(), bytes).await
    }
}

/// `label` padded to an encoding a batch may hold, for tests.
#[cfg(test)]
pub(crate) fn encoding(label: &str) -> Bytes {
    Bytes::from(format!("{label:<MIN_ENCODING_BYTES$}"))
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;
    use object_store::memory::InMemory;
    use object_store::{GetResult, GetResultPayload};

    use super::*;

    /// A result claiming `claimed` bytes whose body is `chunks` chunks of
    /// 64 KiB (`None`: without end).
    async fn result(claimed: u64, chunks: Option<usize>) -> GetResult {
        let store = InMemory::new();
        let path = Path::from("object");
        store.put(&path, PutPayload::from(vec![1u8])).await.unwrap();
        let mut meta = store.head(&path).await.unwrap();
        meta.size = claimed;
        let chunk = || Ok(Bytes::from(vec![7u8; 64 << 10]));
        let stream = match chunks {
            Some(n) => futures::stream::iter((0..n).map(move |_| chunk())).boxed(),
            None => futures::stream::repeat_with(chunk).boxed(),
        };
        GetResult {
            payload: GetResultPayload::Stream(stream),
            range: 0..claimed,
            meta,
            attributes: Default::default(),
        }
    }

    /// A server may send more than the size it announced (a chunked body
    /// beside a Content-Length): the body is cut as soon as it passes the
    /// claim, so an endless one costs at most the claim and one chunk.
    #[tokio::test]
    async fn a_body_past_the_size_its_object_claimed_is_refused_at_once() {
        let path = Path::from("object");
        let endless = body(&path, result(100_000, None).await).await;
        match endless {
            Err(ArchiveError::TooLarge { size, max, .. }) => {
                assert_eq!((size, max), (2 * 65_536, 100_000));
            }
            other => panic!("{other:?}"),
        }
        // Short of the claim: refused; the claim exactly: read whole.
        match body(&path, result(3 * 65_536, Some(2)).await).await {
            Err(ArchiveError::Malformed { reason, .. }) => {
                assert_eq!(reason, "its body ended at 131072 of 196608 bytes");
            }
            other => panic!("{other:?}"),
        }
        let whole = body(&path, result(2 * 65_536, Some(2)).await).await;
        assert_eq!(whole.unwrap().len(), 2 * 65_536);
    }

    /// A FIFO planted at a batch's path in a local archive is refused
    /// without blocking (an open for reading would block a thread until a
    /// writer came, past the request timeout), and a symbolic link is not
    /// followed.
    #[tokio::test]
    async fn a_local_archive_reads_only_regular_files() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config {
            request_timeout: Duration::from_secs(5),
            ..Config::new(dir.path().to_str().unwrap())
        };
        let archive = Archive::open(config, ChainId(soma_types::Digest([3; 32]))).unwrap();
        let at = dir.path().join(archive.batch_path(1).as_ref());
        std::fs::create_dir_all(at.parent().unwrap()).unwrap();
        let fifo = std::ffi::CString::new(at.to_str().unwrap()).unwrap();
        // SAFETY: a valid, NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        match archive.batch(1).await {
            Err(ArchiveError::Malformed { reason, .. }) => assert_eq!(reason, "not a regular file"),
            other => panic!("{other:?}"),
        }
        // A symbolic link is not followed, even to a regular file.
        let target = dir.path().join("elsewhere");
        std::fs::write(&target, b"x").unwrap();
        let link = dir.path().join(archive.batch_path(201).as_ref());
        std::os::unix::fs::symlink(&target, &link).unwrap();
        match archive.batch(201).await {
            Err(ArchiveError::Malformed { reason, .. }) => assert_eq!(reason, "a symbolic link"),
            other => panic!("{other:?}"),
        }
        // Nothing there: none, as before.
        assert!(archive.batch(101).await.unwrap().is_none());
    }

    /// A batch whose range claims more commits than it holds is refused:
    /// cached, it would have answered for every index it claims.
    #[tokio::test]
    async fn a_batch_claiming_more_commits_than_it_holds_is_refused() {
        let archive =
            Archive::in_memory(Config::new("memory"), ChainId(soma_types::Digest([3; 32])));
        let batch = |last| ArchivedBatch {
            first: 1,
            last,
            commits: vec![encoding("c1"), encoding("c2")],
            certifiers: Vec::new(),
            blocks: Vec::new(),
        };
        for last in [u64::MAX, 3, 1] {
            archive.put_batch(&batch(last)).await.unwrap();
            match archive.batch(1).await {
                Err(ArchiveError::Malformed { .. }) => {}
                other => panic!("last {last}: {other:?}"),
            }
        }
        archive.put_batch(&batch(2)).await.unwrap();
        assert_eq!(archive.batch(1).await.unwrap(), Some(batch(2)));
    }

    /// `head.json` is read up to `MAX_HEAD_BYTES`, not `max-object-bytes`.
    #[tokio::test]
    async fn a_head_past_its_bound_is_refused() {
        let id = ChainId(soma_types::Digest([3; 32]));
        let archive = Archive::in_memory(Config::new("memory"), id);
        archive.set_head(301, Some(201)).await.unwrap();
        assert_eq!(archive.head().await.unwrap(), Some(301));
        let record = archive.head_record().await.unwrap();
        assert_eq!(
            record,
            Some(HeadRecord {
                next: 301,
                last: Some(201)
            })
        );
        // A head written before `last` was kept reads as naming no batch.
        let old = format!(r#"{{"chain_id": "{}", "next": 301}}"#, hex::encode(id.0.0));
        archive
            .put(&archive.head_path(), old.into_bytes())
            .await
            .unwrap();
        let record = archive.head_record().await.unwrap();
        assert_eq!(
            record,
            Some(HeadRecord {
                next: 301,
                last: None
            })
        );
        let padded = format!(r#"{{"chain_id": "{}", "next": 301}}"#, " ".repeat(4_096));
        let size = padded.len() as u64;
        let path = archive.head_path();
        archive.put(&path, padded.into_bytes()).await.unwrap();
        match archive.head().await {
            Err(ArchiveError::TooLarge {
                size: found, max, ..
            }) => {
                assert_eq!((found, max), (size, MAX_HEAD_BYTES))
            }
            other => panic!("{other:?}"),
        }
    }

    /// A list of encodings shorter than any commit or block (empty: one
    /// byte each in the object but about 64 in memory) is refused as it is
    /// read: the codec's bound on memory per encoded byte does not cover
    /// it. So is a list longer than `MAX_BATCH_ENCODINGS`, before anything
    /// is allocated for it.
    #[test]
    fn padded_or_overlong_lists_are_refused_as_they_are_decoded() {
        let batch = |blocks: Vec<Bytes>| ArchivedBatch {
            first: 1,
            last: 1,
            commits: vec![encoding("c1")],
            certifiers: Vec::new(),
            blocks,
        };
        let limit = soma_types::codec::MAX_DECODE_BYTES;
        let short = Bytes::from(vec![b'b'; MIN_ENCODING_BYTES - 1]);
        for padding in [Bytes::new(), Bytes::from_static(b"b"), short] {
            let padded = batch(vec![padding; 1_000]).encode();
            let e = ArchivedBatch::decode(&padded, limit).unwrap_err();
            assert!(
                e.to_string().contains("encodings of 64 bytes or more"),
                "{e}"
            );
        }
        // A list of blocks claiming one encoding more than the most (more
        // than 64 MiB of them could hold): its length, the last field,
        // 0 in the encoding, put as the codec writes a u32.
        let mut overlong = batch(Vec::new()).encode();
        assert_eq!(overlong.pop(), Some(0));
        overlong.push(0xfc);
        overlong.extend_from_slice(&(MAX_BATCH_ENCODINGS as u32 + 1).to_le_bytes());
        let e = ArchivedBatch::decode(&overlong, limit).unwrap_err();
        assert!(
            e.to_string()
                .contains(&format!("{}", MAX_BATCH_ENCODINGS + 1)),
            "{e}"
        );
        let honest = batch(vec![encoding("b"); 1_000]);
        assert_eq!(
            ArchivedBatch::decode(&honest.encode(), limit).unwrap(),
            honest
        );
    }
}
