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
//! - `head.json`: `{"chain_id": "<hex>", "next": <index>}`, the next commit
//!   the writer will archive; every commit below it from the first batch up
//!   is archived.
//!
//! A batch is what a peer's FetchCommits answer would hold for the range
//! (up to the highest certified commit within a batch of the writer's
//! `commit-sync-batch-size`, ending at the epoch's last commit if that
//! comes first), with its minimal certificate, plus every block its commits
//! name, in commit order.

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
pub(crate) use writer::{WriterDeps, run_writer};

/// How a node uses an archive.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Config {
    /// Where the archive is: a local directory (a path, or `file:///…`),
    /// `s3://bucket/prefix` (S3 and compatible servers; credentials and
    /// endpoint from the `AWS_*` environment variables),
    /// `gs://bucket/prefix` (`GOOGLE_*`), or `https://host/prefix`
    /// (WebDAV). Object stores other than a local directory need a build
    /// with their support, as the node binary has.
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
    /// First pause after a failed write; it doubles up to `max_retry`.
    pub min_retry: Duration,
    /// Longest pause between retries of a failed write.
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
            max_object_bytes: 256 << 20,
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
    pub commits: Vec<Bytes>,
    /// Blocks voting for the last commit (a minimal quorum), encoded.
    pub certifiers: Vec<Bytes>,
    /// The blocks the commits name, encoded.
    pub blocks: Vec<Bytes>,
}

impl ArchivedBatch {
    /// The batch's encoding, as stored.
    pub fn encode(&self) -> Vec<u8> {
        soma_types::codec::encode(self)
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
}

/// What the archive did, for metrics and status.
#[derive(Debug, Default)]
pub struct ArchiveStats {
    next: AtomicU64,
    batches_written: AtomicU64,
    write_errors: AtomicU64,
    batches_read: AtomicU64,
    read_misses: AtomicU64,
    read_errors: AtomicU64,
    refused: AtomicU64,
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
    /// Reads of a range the archive does not hold.
    pub read_misses: u64,
    /// Reads that failed (store errors, timeouts, oversized objects).
    pub read_errors: u64,
    /// Archive data refused by verification (corrupt or forged).
    pub refused: u64,
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
            read_misses: get(&self.read_misses),
            read_errors: get(&self.read_errors),
            refused: get(&self.refused),
        }
    }

    fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// An open archive.
#[derive(Clone, Debug)]
pub struct Archive {
    store: Arc<dyn ObjectStore>,
    root: Path,
    chain_id: ChainId,
    config: Config,
    stats: Arc<ArchiveStats>,
}

impl Archive {
    /// Opens the archive `config.url` names for the chain `chain_id`. A
    /// local directory is created if missing.
    pub fn open(config: Config, chain_id: ChainId) -> Result<Self, ArchiveError> {
        let bad = |reason: String| ArchiveError::Url {
            url: config.url.clone(),
            reason,
        };
        let (store, root): (Arc<dyn ObjectStore>, Path) = match url::Url::parse(&config.url) {
            Ok(url) if url.scheme() != "file" => {
                // Credentials and endpoints come from the environment.
                let options = std::env::vars()
                    .filter(|(k, _)| k.starts_with("AWS_") || k.starts_with("GOOGLE_"))
                    .chain(config.options.iter().cloned());
                let (store, root) =
                    object_store::parse_url_opts(&url, options).map_err(|e| bad(e.to_string()))?;
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
                (Arc::new(store), Path::default())
            }
        };
        Ok(Self::with_store(store, root, config, chain_id))
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
            chain_id,
            config,
            stats: Arc::new(ArchiveStats::default()),
        }
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

    async fn timed<T>(
        &self,
        call: impl std::future::Future<Output = object_store::Result<T>>,
    ) -> Result<T, ArchiveError> {
        tokio::time::timeout(self.config.request_timeout, call)
            .await
            .map_err(|_| ArchiveError::Timeout(self.config.request_timeout))?
            .map_err(ArchiveError::Store)
    }

    /// The object at `path`, `None` if there is none; refused past
    /// `max_object_bytes` before its body is read.
    async fn get(&self, path: &Path) -> Result<Option<Bytes>, ArchiveError> {
        let result = match self.timed(self.store.get(path)).await {
            Ok(r) => r,
            Err(ArchiveError::Store(object_store::Error::NotFound { .. })) => return Ok(None),
            Err(e) => return Err(e),
        };
        let size = result.meta.size;
        if size > self.config.max_object_bytes {
            return Err(ArchiveError::TooLarge {
                path: path.to_string(),
                size,
                max: self.config.max_object_bytes,
            });
        }
        self.timed(result.bytes()).await.map(Some)
    }

    async fn put(&self, path: &Path, bytes: Vec<u8>) -> Result<(), ArchiveError> {
        let payload = PutPayload::from(bytes);
        self.timed(self.store.put(path, payload)).await.map(|_| ())
    }

    /// The batch starting at `first`, if the archive holds one.
    pub async fn batch(&self, first: CommitIndex) -> Result<Option<ArchivedBatch>, ArchiveError> {
        let path = self.batch_path(first);
        let Some(bytes) = self.get(&path).await? else {
            return Ok(None);
        };
        let limit = usize::try_from(self.config.max_object_bytes).unwrap_or(usize::MAX);
        let batch = ArchivedBatch::decode(&bytes, limit).map_err(|e| ArchiveError::Malformed {
            path: path.to_string(),
            reason: e.to_string(),
        })?;
        if batch.first != first || batch.last < first || batch.commits.is_empty() {
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
        self.put(&self.batch_path(batch.first), bytes).await
    }

    /// The next commit the writer will archive, from `head.json`; `None`
    /// for an empty archive. Refuses an archive of another chain.
    pub async fn head(&self) -> Result<Option<CommitIndex>, ArchiveError> {
        let path = self.head_path();
        let Some(bytes) = self.get(&path).await? else {
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
        Ok(Some(head.next))
    }

    async fn set_head(&self, next: CommitIndex) -> Result<(), ArchiveError> {
        let head = Head {
            chain_id: hex::encode(self.chain_id.0.0),
            next,
        };
        let bytes = serde_json::to_vec(&head).expect("a head encodes");
        self.put(&self.head_path(), bytes).await
    }
}
