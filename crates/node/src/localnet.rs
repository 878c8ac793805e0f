//! `soma-p2p localnet`: the demo. Validators run as separate processes on
//! 127.0.0.1 and produce commits; then a fresh node joins through one seed
//! (known by address only), discovers the others and syncs, with a progress
//! bar and a summary.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

use crate::Failure;
use crate::config::{NodeConfig, P2pSection, ProducerConfig, SeedConfig};
use crate::genesis::{GENESIS_FILE, PRODUCER_FILE};
use crate::keys;

/// The demo's settings.
#[derive(Debug, Clone)]
pub struct Localnet {
    /// Validators.
    pub nodes: usize,
    /// Commits the validators produce before the fresh node joins.
    pub commits: u64,
    /// Where configs, stores and logs go (a temporary directory if `None`).
    pub dir: Option<PathBuf>,
    /// Commits per second each validator produces.
    pub commit_rate: f64,
    /// Commits per epoch.
    pub commits_per_epoch: u64,
    /// Signed transactions per block.
    pub transactions_per_block: usize,
    /// Give up if the fresh node has not synced after this long.
    pub timeout: Duration,
}

fn free_port() -> Result<u16, Failure> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| Failure::run(format!("no free port: {e}")))
}

fn write(path: &Path, text: String) -> Result<(), Failure> {
    keys::write_whole(path, text.as_bytes(), true).map_err(|e| Failure::run(e.to_string()))
}

fn node_config(
    listen: u16,
    seeds: Vec<SeedConfig>,
    metrics: Option<u16>,
    producer: Option<ProducerConfig>,
) -> NodeConfig {
    NodeConfig {
        data_dir: "data".into(),
        keys_dir: "keys".into(),
        genesis: "../genesis.toml".into(),
        listen_address: ([127, 0, 0, 1], listen).into(),
        external_addresses: Vec::new(),
        access: Default::default(),
        allowlist: Vec::new(),
        seed_peers: seeds,
        metrics_address: metrics.map(|p| ([127, 0, 0, 1], p).into()),
        metrics_max_connections: crate::metrics::Limits::default().connections,
        metrics_max_connections_per_network: crate::metrics::Limits::default().per_network,
        metrics_connection_lifetime: crate::metrics::Limits::default().lifetime,
        metrics_allowed_networks: Vec::new(),
        store_cache_bytes: soma_store::RedbStore::DEFAULT_CACHE_BYTES,
        producer,
        archive: None,
        p2p: P2pSection {
            interval: Duration::from_millis(500),
            // Every node of the demo is on 127.0.0.1: per-address caps
            // would count them as one host.
            inbound_exempt_loopback: true,
            ..P2pSection::default()
        },
    }
}

/// A running child node.
struct NodeProcess {
    name: String,
    child: Child,
    /// Where its output goes.
    log: PathBuf,
}

/// An error naming the first child that has exited, with its log, if
/// one has: the demo cannot go on without it.
fn exited(nodes: &mut [NodeProcess]) -> Result<(), Failure> {
    for node in nodes.iter_mut() {
        if let Ok(Some(status)) = node.child.try_wait() {
            return Err(Failure::run(format!(
                "{} exited ({status}); its log is {}",
                node.name,
                node.log.display()
            )));
        }
    }
    Ok(())
}

async fn spawn(name: &str, dir: &Path) -> Result<NodeProcess, Failure> {
    let exe = std::env::current_exe().map_err(|e| Failure::run(e.to_string()))?;
    let log_path = dir.join("node.log");
    let log = std::fs::File::create(&log_path)
        .map_err(|e| Failure::run(format!("{}: {e}", dir.display())))?;
    let err = log.try_clone().map_err(|e| Failure::run(e.to_string()))?;
    let child = Command::new(exe)
        .args(["run", "--config"])
        .arg(dir.join("node.toml"))
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(err)
        .kill_on_drop(true)
        // A group of its own: a Ctrl-C at the terminal reaches this
        // command alone, which stops each node with one signal (a node
        // takes a second signal as an order to exit at once).
        .process_group(0)
        .spawn()
        .map_err(|e| Failure::run(format!("cannot start {name}: {e}")))?;
    Ok(NodeProcess {
        name: name.to_string(),
        child,
        log: log_path,
    })
}

/// Stops every child with SIGTERM, waiting for each (SIGKILL after 10 s).
async fn stop_all(nodes: &mut [NodeProcess]) {
    for node in nodes.iter() {
        if let Some(id) = node.child.id() {
            let _ = kill(Pid::from_raw(id as i32), Signal::SIGTERM);
        }
    }
    for node in nodes.iter_mut() {
        if tokio::time::timeout(Duration::from_secs(10), node.child.wait())
            .await
            .is_err()
        {
            // Not `eprintln!`: after a hang-up the terminal is gone.
            let _ = std::io::Write::write_fmt(
                &mut std::io::stderr(),
                format_args!("{} did not stop in time; killing it\n", node.name),
            );
            let _ = node.child.kill().await;
        }
    }
}

/// Reads the Prometheus text of `http://127.0.0.1:port/metrics`.
async fn scrape(port: u16) -> Option<String> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
}

/// The sum of the samples of `name` in Prometheus text.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    let values: Vec<f64> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.split([' ', '{']).next() == Some(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

async fn highest(address: &str) -> Option<u64> {
    crate::status::query(address, Duration::from_secs(2))
        .await
        .ok()
        .map(|s| s.availability.highest)
}

/// Runs the demo.
pub async fn run(net: Localnet) -> Result<(), Failure> {
    if net.nodes == 0 || net.commits == 0 {
        return Err(Failure::usage("--nodes and --commits must be at least 1"));
    }
    // The children would refuse these at start: said here, not after the
    // timeout.
    if !(0.1..=10_000.0).contains(&net.commit_rate) {
        return Err(Failure::usage(format!(
            "--commit-rate must be between 0.1 and 10000, got {}",
            net.commit_rate
        )));
    }
    let most = soma_types::Limits::default().max_transactions_per_block;
    if net.transactions_per_block > most {
        return Err(Failure::usage(format!(
            "--transactions-per-block must be at most {most}, got {}",
            net.transactions_per_block
        )));
    }
    if let Some(dir) = &net.dir
        && std::fs::read_dir(dir).is_ok_and(|mut entries| entries.next().is_some())
    {
        return Err(Failure::usage(format!(
            "{} is not empty: localnet writes fresh keys, a genesis and stores there; \
             give a new or empty --dir",
            dir.display()
        )));
    }
    let temporary;
    let dir = match &net.dir {
        Some(d) => d.clone(),
        None => {
            temporary = tempfile::Builder::new()
                .prefix("soma-localnet-")
                .tempdir()
                .map_err(|e| Failure::run(e.to_string()))?;
            temporary.path().to_path_buf()
        }
    };
    std::fs::create_dir_all(&dir).map_err(|e| Failure::run(format!("{}: {e}", dir.display())))?;
    println!("localnet in {}", dir.display());

    // Genesis: one committee, addresses on free ports.
    let ports: Vec<u16> = (0..net.nodes)
        .map(|_| free_port())
        .collect::<Result<_, _>>()?;
    let addresses: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let (genesis, producer, chain) = crate::genesis::local_network(
        &vec![1; net.nodes],
        addresses.clone(),
        Some(net.commits_per_epoch),
        net.transactions_per_block,
    );
    write(
        &dir.join(GENESIS_FILE),
        toml::to_string(&genesis).map_err(|e| Failure::run(e.to_string()))?,
    )?;
    keys::write_secret(
        &dir.join(PRODUCER_FILE),
        toml::to_string(&producer)
            .map_err(|e| Failure::run(e.to_string()))?
            .as_bytes(),
    )
    .map_err(|e| Failure::run(e.to_string()))?;

    // Registered before any node starts: a SIGTERM or a hang-up stops them
    // as Ctrl-C does, rather than end this process and leave them running.
    let handler = |kind| {
        tokio::signal::unix::signal(kind).map_err(|e| Failure::run(format!("signal handler: {e}")))
    };
    let mut terminate = handler(tokio::signal::unix::SignalKind::terminate())?;
    let mut hangup = match crate::signals::hangup_ignored() {
        true => None,
        false => Some(handler(tokio::signal::unix::SignalKind::hangup())?),
    };
    let mut children = Vec::new();
    let result = async {
        // Validators, each seeded with validator 0.
        let seed0 = SeedConfig {
            peer_id: Some(soma_types::PeerId::from(chain.network_key(0).public())),
            address: addresses[0].clone(),
        };
        for (i, port) in ports.iter().enumerate() {
            let vdir = dir.join(format!("validator-{i}"));
            keys::write_keys(
                &vdir.join("keys"),
                Some(chain.network_key(i)),
                Some(chain.protocol_key(0, i)),
                true,
            )
            .map_err(|e| Failure::run(e.to_string()))?;
            let seeds = if i == 0 { vec![] } else { vec![seed0.clone()] };
            let producer = ProducerConfig {
                commit_rate: net.commit_rate,
                max_commits: net.commits,
            };
            let config = node_config(*port, seeds, None, Some(producer));
            write(
                &vdir.join("node.toml"),
                toml::to_string(&config).map_err(|e| Failure::run(e.to_string()))?,
            )?;
            children.push(spawn(&format!("validator-{i}"), &vdir).await?);
        }

        // The validators produce the chain.
        let produced = ProgressBar::new(net.commits).with_style(
            ProgressStyle::with_template(
                "producing {bar:40.cyan/blue} {pos}/{len} commits  {per_sec}  eta {eta}",
            )
            .map_err(|e| Failure::run(e.to_string()))?,
        );
        let deadline = Instant::now() + net.timeout;
        loop {
            if let Some(h) = highest(&addresses[0]).await {
                produced.set_position(h.min(net.commits));
                if h >= net.commits {
                    break;
                }
            }
            exited(&mut children)?;
            if Instant::now() > deadline {
                return Err(Failure::run(
                    "the validators did not produce the chain in time",
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        produced.finish();

        // A fresh node joins through validator 0, known by address only.
        let jdir = dir.join("joiner");
        let joiner_keys = keys::write_keys(&jdir.join("keys"), None, None, true)
            .map_err(|e| Failure::run(e.to_string()))?;
        let (jport, mport) = (free_port()?, free_port()?);
        let seeds = vec![SeedConfig {
            peer_id: None,
            address: addresses[0].clone(),
        }];
        write(
            &jdir.join("node.toml"),
            toml::to_string(&node_config(jport, seeds, Some(mport), None))
                .map_err(|e| Failure::run(e.to_string()))?,
        )?;
        let started = Instant::now();
        children.push(spawn("joiner", &jdir).await?);
        let address = format!("127.0.0.1:{jport}");
        let bar = ProgressBar::new(net.commits).with_style(
            ProgressStyle::with_template(
                "syncing   {bar:40.green/blue} {pos}/{len} commits  {per_sec}  eta {eta}",
            )
            .map_err(|e| Failure::run(e.to_string()))?,
        );
        let deadline = Instant::now() + net.timeout;
        loop {
            if let Some(h) = highest(&address).await {
                bar.set_position(h.min(net.commits));
                if h >= net.commits {
                    break;
                }
            }
            if let Err(e) = exited(&mut children) {
                bar.abandon();
                return Err(e);
            }
            if Instant::now() > deadline {
                bar.abandon();
                return Err(Failure::run(format!(
                    "the fresh node did not sync in {:?}; logs in {}",
                    net.timeout,
                    jdir.display()
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let elapsed = started.elapsed();
        bar.finish();

        let joiner_height = highest(&address).await.unwrap_or(0);
        // Discovery runs every 500 ms: give it a few rounds to learn every
        // validator (a short sync can end before the first).
        let discovery_deadline = Instant::now() + Duration::from_secs(5);
        while metric(&scrape(mport).await.unwrap_or_default(), "soma_known_peers").unwrap_or(0.0)
            < net.nodes as f64
            && Instant::now() < discovery_deadline
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let validators_height = highest(&addresses[0]).await.unwrap_or(0);
        let text = scrape(mport).await.unwrap_or_default();
        let commits_metric = metric(&text, "soma_commits_synced_total").unwrap_or(0.0);
        let blocks = metric(&text, "soma_blocks_synced_total").unwrap_or(0.0);
        let bytes = metric(&text, "soma_bytes_fetched_total").unwrap_or(0.0);
        let failures = metric(&text, "soma_verification_failures_total").unwrap_or(0.0);
        let known = metric(&text, "soma_known_peers").unwrap_or(0.0);
        let secs = elapsed.as_secs_f64().max(1e-9);
        println!();
        println!("summary");
        println!(
            "  fresh node            {}",
            hex::encode(&joiner_keys.peer_id().0[..8])
        );
        println!("  validators            {}", net.nodes);
        println!("  peers discovered      {known}");
        println!("  commits synced        {joiner_height}");
        println!(
            "  heights (status)      fresh node {joiner_height}, validators {validators_height}"
        );
        println!("  commits (metrics)     {commits_metric}");
        println!("  blocks synced         {blocks}");
        println!(
            "  throughput            {:.0} commits/s, {:.0} blocks/s, {:.2} MB/s",
            net.commits as f64 / secs,
            blocks / secs,
            bytes / secs / 1e6
        );
        println!("  verification failures {failures}");
        println!(
            "  time                  {:.2} s (start of the node to fully synced)",
            secs
        );
        Ok(())
    };
    let outcome = tokio::select! {
        r = result => r,
        _ = tokio::signal::ctrl_c() => Err(Failure::run("interrupted")),
        _ = terminate.recv() => Err(Failure::run("terminated")),
        _ = crate::signals::recv(&mut hangup) => Err(Failure::run("hung up")),
    };
    stop_all(&mut children).await;
    outcome
}

#[cfg(test)]
mod tests {
    #[test]
    fn metric_sums_every_sample_of_a_series() {
        let text = "# HELP x\nsoma_rpcs_total{method=\"A\"} 3\nsoma_rpcs_total{method=\"B\"} 4\nsoma_known_peers 5\n";
        assert_eq!(super::metric(text, "soma_rpcs_total"), Some(7.0));
        assert_eq!(super::metric(text, "soma_known_peers"), Some(5.0));
        assert_eq!(super::metric(text, "soma_missing"), None);
    }
}
