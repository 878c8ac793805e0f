//! The archive of certified batches, on real nodes.
//!
//! - A node writes every certified batch of its store into a local archive,
//!   one object per batch, at the boundaries a peer serves.
//! - When every peer has pruned what a fresh node needs, it syncs from
//!   genesis to the tip through the archive, each batch verified as a
//!   peer's answer is, and the rest from its peers.
//! - A corrupt archive object is refused, counted and never applied; once
//!   it is repaired, sync goes on.
//! - A failing archive is counted and retried, never holds sync up, and
//!   nothing is pruned before it is archived.
//! - The same on a real S3-compatible server (s3s-fs), when one is
//!   installed: `make archive-s3-test` installs it from crates.io.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use soma_actors::archive::{ArchiveStatus, ArchivedBatch, Config};
use soma_actors::state_sync::prune;
use soma_actors::system::Retention;
use soma_actors::{P2pConfig, P2pHandle};
use soma_chain::{Chain, ChainBuilder, ChainConfig};
use soma_store::{ConsensusStore, MemStore};
use soma_testkit::{assert_same_chain, init_tracing, seeds, validator_with, wait_synced};

const DEADLINE: Duration = Duration::from_secs(120);
const TIP: u64 = 1_500;
/// What the pruned peers keep: commits above `TIP - KEPT`.
const KEPT: u64 = 300;
/// Commits per sync batch, so per archived object: the batches the tests
/// name (301..=400 corrupted, an epoch's end at 550 closing one early).
const BATCH: u64 = 100;

/// The default settings, syncing and serving in batches of [`BATCH`].
fn config() -> P2pConfig {
    P2pConfig::default().with_commit_sync_batch_size(BATCH)
}

/// A chain of small commits whose epochs end at 550 and 1,100, inside
/// batches, so archived batches end at epoch ends too.
fn chain() -> Chain {
    ChainBuilder::new(ChainConfig {
        transactions_per_block: 1,
        commits_per_epoch: Some(550),
        ..ChainConfig::validators(4)
    })
    .build(TIP)
}

/// [`soma_testkit::wait_until`] with [`DEADLINE`].
async fn wait_until(what: &str, done: impl AsyncFnMut() -> bool) {
    soma_testkit::wait_until(what, DEADLINE, done).await
}

/// A local archive in `dir`, with the test's short intervals.
fn local(dir: &Path) -> Config {
    Config {
        interval: Duration::from_millis(20),
        min_retry: Duration::from_millis(10),
        max_retry: Duration::from_millis(100),
        ..Config::new(dir.to_str().expect("temporary paths are UTF-8"))
    }
}

/// `base`, only written, or only read.
fn only(base: &Config, write: bool) -> Config {
    Config {
        write,
        read: !write,
        ..base.clone()
    }
}

fn status(node: &P2pHandle) -> ArchiveStatus {
    node.archive_status().expect("the node has an archive")
}

/// The batch objects in the local archive at `dir`, by first commit.
fn objects(dir: &Path) -> BTreeSet<u64> {
    std::fs::read_dir(dir.join("batches"))
        .map(|entries| {
            entries
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .filter_map(|n| n.strip_suffix(".batch")?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn object_path(dir: &Path, first: u64) -> PathBuf {
    dir.join("batches").join(format!("{first:020}.batch"))
}

/// Writes the whole of `chain` into the archive `base` names from a node
/// that holds it, and checks it wrote one object per batch a peer serves.
async fn archive_everything(chain: &Chain, base: &Config) -> Vec<u64> {
    let writer = validator_with(
        chain,
        1,
        P2pConfig {
            archive: Some(only(base, true)),
            ..config()
        },
    );
    wait_until("the archive written", async || {
        status(&writer).next == TIP + 1
    })
    .await;
    let firsts: Vec<u64> = chain
        .batch_ranges(BATCH)
        .iter()
        .map(|r| *r.start())
        .collect();
    let written = status(&writer);
    assert_eq!(written.batches_written, firsts.len() as u64, "{written:?}");
    assert_eq!(written.write_errors, 0);
    writer.shutdown().await;
    firsts
}

/// Validators that keep only the last [`KEPT`] commits, pruned already.
async fn pruned_validators(chain: &Chain) -> Vec<P2pHandle> {
    let pruning = P2pConfig {
        prune: prune::Config {
            retention: Retention::Commits(KEPT),
            interval_ms: 20,
            batch_commits: 500,
            grace_ms: 0,
            ..prune::Config::default()
        },
        ..config()
    };
    let validators: Vec<P2pHandle> = (2..=3)
        .map(|k| validator_with(chain, k, pruning.clone()))
        .collect();
    for v in &validators {
        wait_until("a validator pruned", async || {
            v.store().lowest_available_commit().unwrap() == TIP - KEPT + 1
        })
        .await;
    }
    validators
}

/// A fresh node seeded with `peers`, reading the archive `base` names.
fn fresh_node(
    chain: &Chain,
    peers: &[P2pHandle],
    base: &Config,
) -> (P2pHandle, Arc<dyn ConsensusStore>) {
    let store: Arc<dyn ConsensusStore> = Arc::new(MemStore::new(chain.genesis()));
    let mut config = P2pConfig {
        seed_peers: seeds(&peers.iter().collect::<Vec<_>>()),
        archive: Some(only(base, false)),
        ..config()
    };
    config.state_sync.wait_interval_when_no_peer_ms = 50;
    (soma_testkit::node(chain, 9, config, store.clone()), store)
}

/// Calls of `rpc` that `node` answered with `code`.
fn count(node: &P2pHandle, rpc: &str, code: tonic::Code) -> u64 {
    node.rpc_counts()
        .iter()
        .filter(|(r, c, _)| *r == rpc && *c == code)
        .map(|(_, _, n)| n)
        .sum()
}

/// The archived half of the test: every peer pruned below `TIP - KEPT`,
/// a fresh node syncs from genesis through the archive `base` names.
async fn sync_through_archive(chain: &Chain, base: &Config, firsts: &[u64]) {
    let validators = pruned_validators(chain).await;
    let (node, store) = fresh_node(chain, &validators, base);
    wait_synced(&node, TIP, DEADLINE).await;
    assert_same_chain(chain, store.as_ref());

    // Every batch below what the peers keep came from the archive, each
    // read handed to verification, none refused; the peers were never
    // asked for what they pruned.
    let archived_only = firsts.iter().filter(|f| **f <= TIP - KEPT).count() as u64;
    let read = status(&node);
    assert!(read.batches_read >= archived_only, "{read:?}");
    assert_eq!((read.refused, read.read_errors), (0, 0), "{read:?}");
    for v in &validators {
        assert_eq!(count(v, "FetchCommits", tonic::Code::NotFound), 0);
    }
    let sync = node.sync_status().await.unwrap();
    assert_eq!(sync.invalid_responses, 0);
    node.shutdown().await;
    for v in validators {
        v.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_node_syncs_from_genesis_through_the_archive_when_every_peer_pruned() {
    init_tracing();
    let chain = chain();
    let dir = tempfile::tempdir().unwrap();
    let firsts = archive_everything(&chain, &local(dir.path())).await;
    assert_eq!(objects(dir.path()), firsts.iter().copied().collect());
    sync_through_archive(&chain, &local(dir.path()), &firsts).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_archive_object_is_refused_and_never_applied() {
    init_tracing();
    let chain = chain();
    let dir = tempfile::tempdir().unwrap();
    archive_everything(&chain, &local(dir.path())).await;

    // One byte of one block of the batch 301..=400 flipped.
    let path = object_path(dir.path(), 301);
    let original = std::fs::read(&path).unwrap();
    let mut batch = ArchivedBatch::decode(&original, usize::MAX).unwrap();
    assert_eq!((batch.first, batch.last), (301, 400));
    let mut block = batch.blocks[7].to_vec();
    let last = block.len() - 1;
    block[last] ^= 1;
    batch.blocks[7] = block.into();
    std::fs::write(&path, batch.encode()).unwrap();

    let validators = pruned_validators(&chain).await;
    let (node, store) = fresh_node(&chain, &validators, &local(dir.path()));
    // Sync reaches the corrupt batch, and the archive's copy is refused
    // each time it is read again. It may be refused while fetched ahead,
    // before the batches below it are applied: both are waited for.
    wait_until("sync at the corrupt batch, refused twice", async || {
        let synced = node.sync_status().await.unwrap().synced;
        status(&node).refused >= 2 && synced >= 300
    })
    .await;
    // Nothing of it was applied.
    assert_eq!(store.highest_synced_commit().unwrap().index, 300);
    let sync = node.sync_status().await.unwrap();
    assert_eq!(sync.synced, 300, "{sync:?}");

    // Repaired, it is read again and sync completes.
    std::fs::write(&path, &original).unwrap();
    wait_synced(&node, TIP, DEADLINE).await;
    assert_same_chain(&chain, store.as_ref());
    node.shutdown().await;
    for v in validators {
        v.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_archive_is_retried_never_holds_sync_up_and_holds_pruning_back() {
    init_tracing();
    let chain = chain();
    let source = validator_with(&chain, 1, config());
    let dir = tempfile::tempdir().unwrap();
    // A file where the batches' directory must go: every write fails.
    let blocker = dir.path().join("batches");
    std::fs::write(&blocker, b"not a directory").unwrap();

    let store: Arc<dyn ConsensusStore> = Arc::new(MemStore::new(chain.genesis()));
    let config = P2pConfig {
        seed_peers: seeds(&[&source]),
        archive: Some(only(&local(dir.path()), true)),
        prune: prune::Config {
            retention: Retention::Commits(KEPT),
            interval_ms: 20,
            batch_commits: 500,
            grace_ms: 0,
            ..prune::Config::default()
        },
        ..config()
    };
    let node = soma_testkit::node(&chain, 9, config, store.clone());
    wait_synced(&node, TIP, DEADLINE).await;
    // Sync finished while no write succeeded; pruning, which runs every
    // 20 ms, has removed nothing the archive lacks.
    wait_until("ten failed writes", async || {
        status(&node).write_errors >= 10
    })
    .await;
    let failing = status(&node);
    assert_eq!(
        (failing.batches_written, failing.next),
        (0, 1),
        "{failing:?}"
    );
    assert_eq!(store.lowest_available_commit().unwrap(), 1);

    // Repaired, the archive catches up; then pruning goes to its retention.
    std::fs::remove_file(&blocker).unwrap();
    wait_until("the archive caught up", async || {
        status(&node).next == TIP + 1
    })
    .await;
    assert_eq!(
        status(&node).batches_written,
        chain.batch_ranges(BATCH).len() as u64
    );
    wait_until("pruned to the retention", async || {
        store.lowest_available_commit().unwrap() == TIP - KEPT + 1
    })
    .await;
    node.shutdown().await;
    source.shutdown().await;
}

/// An S3-compatible server, when one is installed: `s3s-fs` on the PATH,
/// in `target/tools/bin`, or named by `SOMA_S3S_FS`.
fn s3_server() -> Option<PathBuf> {
    if let Ok(path) = std::env::var("SOMA_S3S_FS") {
        return Some(PathBuf::from(path));
    }
    let tools = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/tools/bin/s3s-fs");
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("s3s-fs"))
            .find(|p| p.is_file())
    });
    on_path.or_else(|| tools.is_file().then_some(tools))
}

/// Kills the server when the test ends, however it ends.
struct Server(std::process::Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs an S3-compatible server: `make archive-s3-test` installs s3s-fs and runs it"]
async fn an_archive_on_an_s3_compatible_server_serves_a_fresh_node() {
    init_tracing();
    let binary = s3_server().expect(
        "no S3-compatible server installed; `make archive-s3-test` installs s3s-fs from \
         crates.io and runs this test against it",
    );
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir(root.path().join("soma")).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let _server = Server(
        std::process::Command::new(&binary)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", "soma", "--secret-key", "soma-secret"])
            .arg(root.path())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{}: {e}", binary.display())),
    );
    wait_until("the S3 server listening", async || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    })
    .await;

    let base = Config {
        options: vec![
            ("aws_endpoint".into(), format!("http://127.0.0.1:{port}")),
            ("aws_allow_http".into(), "true".into()),
            ("aws_access_key_id".into(), "soma".into()),
            ("aws_secret_access_key".into(), "soma-secret".into()),
            ("aws_region".into(), "us-east-1".into()),
        ],
        ..Config {
            url: "s3://soma/archive".into(),
            ..local(root.path())
        }
    };
    let chain = chain();
    let firsts = archive_everything(&chain, &base).await;
    // The server keeps objects as files under the bucket's directory.
    assert_eq!(
        objects(&root.path().join("soma/archive")),
        firsts.iter().copied().collect()
    );
    sync_through_archive(&chain, &base, &firsts).await;
}
