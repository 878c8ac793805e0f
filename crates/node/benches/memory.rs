//! Peak memory of a node catching up 10,000 vs 100,000 commits: the syncing
//! node is a separate `soma-p2p run` process (on a RedbStore), so its peak
//! RSS is its own; the chain is served by 3 validators in this process.
//!
//! `cargo bench -p soma-node --bench memory`
//! (`SOMA_BENCH_MEMORY_COMMITS=10000,100000` and
//! `SOMA_BENCH_STORE_CACHE=67108864` by default).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use soma_actors::P2pHandle;
use soma_chain::{Chain, ChainBuilder, ChainConfig};
use soma_wire::convert::Availability;
use soma_wire::proto::{self, p2p_client::P2pClient};

const BIN: &str = env!("CARGO_BIN_EXE_soma-p2p");

fn chain_config() -> ChainConfig {
    ChainConfig {
        seed: [42; 32],
        stakes: vec![1; 4],
        addresses: Some((1..=4).map(|i| format!("127.0.0.1:{i}")).collect()),
        transactions_per_block: 2,
        payload_bytes: 32,
        commits_per_epoch: Some(10_000),
        ..ChainConfig::default()
    }
}

fn store_cache() -> usize {
    std::env::var("SOMA_BENCH_STORE_CACHE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(soma_store::RedbStore::DEFAULT_CACHE_BYTES)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn height(address: &str) -> Option<u64> {
    let (channel, _) = soma_wire::tls::connect(address, None, None, Duration::from_secs(2))
        .await
        .ok()?;
    let r = P2pClient::new(channel)
        .get_commit_availability(proto::GetCommitAvailabilityRequest {})
        .await
        .ok()?;
    Availability::try_from(r.get_ref()).ok().map(|a| a.highest)
}

fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

struct Run {
    commits: u64,
    elapsed: Duration,
    peak_kib: u64,
}

async fn catch_up(chain: &Chain, commits: u64) -> Run {
    let validators: Vec<P2pHandle> = (1..=3)
        .map(|k| soma_testkit::validator_up_to(chain, commits, k))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let c = chain_config();
    std::fs::write(
        d.join("genesis.toml"),
        format!(
            "seed = \"{}\"\nstakes = [1, 1, 1, 1]\naddresses = [{}]\ntransactions-per-block = {}\npayload-bytes = {}\ncommits-per-epoch = {}\n",
            hex::encode(c.seed),
            c.addresses.as_ref().unwrap().iter().map(|a| format!("\"{a}\"")).collect::<Vec<_>>().join(", "),
            c.transactions_per_block,
            c.payload_bytes,
            c.commits_per_epoch.unwrap()
        ),
    )
    .unwrap();
    let keygen = Command::new(BIN)
        .args(["keygen", "--out"])
        .arg(d.join("keys"))
        .output()
        .unwrap();
    assert!(keygen.status.success());
    let port = free_port();
    let seeds: Vec<String> = validators
        .iter()
        .map(|v| {
            format!(
                "{{ peer-id = \"{}\", address = \"{}\" }}",
                hex::encode(v.peer_id().0),
                v.local_addr()
            )
        })
        .collect();
    std::fs::write(
        d.join("node.toml"),
        format!(
            "data-dir = \"data\"\nkeys-dir = \"keys\"\ngenesis = \"genesis.toml\"\nlisten-address = \"127.0.0.1:{port}\"\nstore-cache-bytes = {}\nseed-peers = [{}]\n",
            store_cache(),
            seeds.join(", ")
        ),
    )
    .unwrap();
    let start = Instant::now();
    let mut child = Command::new(BIN)
        .args(["run", "--config"])
        .arg(d.join("node.toml"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let address = format!("127.0.0.1:{port}");
    loop {
        if height(&address).await == Some(commits) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(900),
            "the node did not catch up"
        );
        assert!(child.try_wait().unwrap().is_none(), "the node exited");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let elapsed = start.elapsed();
    let peak_kib = peak_rss_kib(child.id());
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = child.wait();
    for v in validators {
        v.shutdown().await;
    }
    Run {
        commits,
        elapsed,
        peak_kib,
    }
}

fn main() {
    let sizes: Vec<u64> = std::env::var("SOMA_BENCH_MEMORY_COMMITS")
        .unwrap_or_else(|_| "10000,100000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let largest = *sizes.iter().max().unwrap();
    let built = Instant::now();
    let chain = ChainBuilder::new(chain_config()).build(largest);
    println!(
        "chain of {largest} commits built in {:.1}s",
        built.elapsed().as_secs_f64()
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let runs: Vec<Run> = sizes
        .iter()
        .map(|&n| runtime.block_on(catch_up(&chain, n)))
        .collect();
    println!(
        "memory benchmark: the syncing node is a separate process on a RedbStore ({} MiB page cache)",
        store_cache() >> 20
    );
    println!(
        "{:>10} {:>10} {:>12} {:>14} {:>8}",
        "commits", "time", "commits/s", "peak RSS", "ratio"
    );
    let base = runs[0].peak_kib.max(1) as f64;
    for r in &runs {
        println!(
            "{:>10} {:>9.1}s {:>12.0} {:>10.1} MiB {:>8.2}",
            r.commits,
            r.elapsed.as_secs_f64(),
            r.commits as f64 / r.elapsed.as_secs_f64(),
            r.peak_kib as f64 / 1024.0,
            r.peak_kib as f64 / base
        );
    }
}
