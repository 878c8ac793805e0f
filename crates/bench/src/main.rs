//! `soma-bench`: every performance figure of soma-p2p in one run, each beside
//! its reference measured in the same run on the same machine. Prints the
//! tables and writes them as Markdown (into `docs/benchmarks.md`, between
//! its marks) and JSON (`docs/benchmarks.json`).
//!
//! `make bench` runs the full harness in release mode (under 15 minutes on 2
//! cores); `--quick` runs every benchmark at a tiny size, for development
//! and for the test suite, and writes under `target/bench-quick/`.

mod adversarial;
mod bare;
mod cores;
mod discovery;
mod grpc;
mod latency;
mod load;
mod machine;
mod memory;
mod report;
mod sync;
mod under_attack;
mod verifier;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};

use crate::machine::Machine;
use crate::report::Report;

/// The benchmarks, in the order they run.
const SECTIONS: [&str; 11] = [
    "sync",
    "cores",
    "latency",
    "verifier",
    "grpc",
    "discovery",
    "memory",
    "scaling",
    "load",
    "adversarial",
    "attack",
];

#[derive(Parser, Debug)]
#[command(
    name = "soma-bench",
    about = "Runs every soma-p2p benchmark and writes docs/benchmarks.md and docs/benchmarks.json",
    long_about = None
)]
struct Cli {
    /// Every benchmark at a tiny size (about a minute); writes under
    /// target/bench-quick/ unless --markdown/--json say otherwise.
    #[arg(long)]
    quick: bool,
    /// Only these benchmarks, comma-separated (sync, cores, latency, verifier,
    /// grpc, discovery, memory, scaling, load, adversarial, attack); writes under target/bench-partial/
    /// unless --markdown/--json say otherwise.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Markdown file to write the tables into (between its marks, or a new
    /// file).
    #[arg(long)]
    markdown: Option<PathBuf>,
    /// JSON file to write.
    #[arg(long)]
    json: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

/// A steady load to profile, and the children the harness starts itself
/// (hidden).
#[derive(Subcommand, Debug)]
enum Command {
    /// Catches the sync section's chain up again and again, from 3
    /// validators in this process, printing each catch-up's time and the
    /// CPU the process spent on it (servers and the node's shutdown
    /// included): a steady load to
    /// profile (`perf record -g -- soma-bench catch-ups`) or to compare
    /// builds, without the chain's building in the figures.
    #[command(name = "catch-ups")]
    CatchUps {
        /// Catch-ups to run, one after another.
        #[arg(long, default_value_t = 10)]
        times: usize,
        /// Commits of the chain (blocks of 10 signed transactions).
        #[arg(long, default_value_t = 20_000)]
        commits: u64,
        /// Check the synced blocks' signatures (off by default: the
        /// pipeline without the crypto).
        #[arg(long)]
        signatures: bool,
    },
    /// One discovery run.
    #[command(hide = true, name = "child-discovery")]
    Discovery { nodes: usize, interval_ms: u64 },
    /// The loaded node of the load benchmark.
    #[command(hide = true, name = "child-serve")]
    Serve,
    /// The syncing node of the memory benchmark.
    #[command(hide = true, name = "child-memory")]
    Memory {
        commits: u64,
        cache_bytes: usize,
        seeds: String,
    },
    /// The syncing node of the adversarial benchmark's flood runs.
    #[command(hide = true, name = "child-flood")]
    Flood {
        commits: u64,
        epoch: u64,
        budget: u64,
        timeout_ms: u64,
        seeds: String,
        liar: String,
    },
    /// The served node of the under-attack benchmark.
    #[command(hide = true, name = "child-attacked")]
    Attacked { commits: u64, seed: String },
}

/// How big each benchmark is.
#[derive(Clone, Debug)]
pub struct Size {
    /// Commits of the catch-up chain.
    pub sync_commits: u64,
    /// Commits of the catch-up chain of large blocks.
    pub large_commits: u64,
    /// Runs of each catch-up and of its transport limit (the median is
    /// reported).
    pub sync_runs: usize,
    /// Commits of the chain caught up on 1 core, then 2.
    pub cores_commits: u64,
    /// Commits of the chain caught up through impaired links.
    pub latency_commits: u64,
    /// The reset period of the latency benchmark's row with resets.
    pub latency_reset_every: Duration,
    /// Commits of the chain for the serving-peers scaling.
    pub scaling_commits: u64,
    /// About how many blocks each committee-scaling chain has.
    pub scaling_blocks: u64,
    /// Commits of the Verifier benchmark's chain.
    pub verifier_commits: u64,
    /// Rounds of the Verifier benchmark, each timing every row once; each
    /// row's best round counts. Fifteen, not five: a row's best of five
    /// moved its ratio to raw by a tenth from one run to the next here.
    pub runs: usize,
    /// Length of each gRPC load.
    pub grpc_run: Duration,
    /// Concurrent GetCommitAvailability clients.
    pub grpc_clients: usize,
    /// Discovery network sizes.
    pub discovery_nodes: Vec<usize>,
    /// Discovery interval, ms.
    pub discovery_interval_ms: u64,
    /// Timed discovery runs per size.
    pub discovery_runs: usize,
    /// The short and the long chain of the memory benchmark.
    pub memory_commits: (u64, u64),
    /// Runs per memory figure (the median is reported).
    pub memory_runs: usize,
    /// Connections and calls in flight per connection of the load benchmark.
    pub load: (usize, usize),
    /// Commits of the adversarial benchmark's chain.
    pub adversarial_commits: u64,
    /// Commits per epoch of that chain.
    pub adversarial_epoch: u64,
    /// Runs of each adversarial setup (the median is reported).
    pub adversarial_runs: usize,
    /// The request timeout of the adversarial benchmark's nodes.
    pub adversarial_timeout: Duration,
    /// Commits of the under-attack benchmark's chain.
    pub attack_commits: u64,
    /// Runs of each under-attack setup (the median is reported).
    pub attack_runs: usize,
}

impl Size {
    /// The sizes the issue and the docs quote.
    fn full() -> Self {
        Size {
            sync_commits: 20_000,
            large_commits: 4_000,
            sync_runs: 5,
            cores_commits: 10_000,
            latency_commits: 40_000,
            latency_reset_every: Duration::from_secs(10),
            scaling_commits: 5_000,
            scaling_blocks: 20_000,
            verifier_commits: 500,
            runs: 15,
            grpc_run: Duration::from_secs(4),
            grpc_clients: 64,
            discovery_nodes: vec![8, 16, 32],
            discovery_interval_ms: 500,
            discovery_runs: 3,
            memory_commits: (10_000, 100_000),
            memory_runs: 3,
            load: (500, 10),
            adversarial_commits: 1_000,
            adversarial_epoch: 200,
            adversarial_runs: 3,
            adversarial_timeout: Duration::from_secs(10),
            attack_commits: 20_000,
            attack_runs: 3,
        }
    }

    /// Tiny: every figure produced, none of them meaningful.
    fn quick() -> Self {
        Size {
            sync_commits: 300,
            large_commits: 100,
            sync_runs: 1,
            cores_commits: 100,
            latency_commits: 300,
            // Long enough for a redial and a fetch through a 100 ms link
            // between resets; shorter would reset every connection before
            // its handshake is done.
            latency_reset_every: Duration::from_secs(2),
            scaling_commits: 100,
            scaling_blocks: 400,
            verifier_commits: 30,
            runs: 1,
            grpc_run: Duration::from_millis(300),
            grpc_clients: 8,
            discovery_nodes: vec![4, 6, 8],
            discovery_interval_ms: 200,
            discovery_runs: 1,
            memory_commits: (200, 1_000),
            memory_runs: 1,
            load: (20, 5),
            adversarial_commits: 200,
            adversarial_epoch: 50,
            adversarial_runs: 1,
            adversarial_timeout: Duration::from_secs(1),
            attack_commits: 200,
            attack_runs: 1,
        }
    }
}

/// Logical cores available.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// What a benchmark child process reported on its last line: seconds,
/// peak RSS in KiB, then any further fields. Panics with the child's
/// output if it failed.
pub fn child_report(
    output: &std::process::Output,
    what: &str,
) -> (std::time::Duration, u64, Vec<String>) {
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{what} failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let last = stdout.lines().last().unwrap_or_default();
    let mut fields = last.split_whitespace();
    let seconds: f64 = fields.next().and_then(|f| f.parse().ok()).expect("seconds");
    let peak_kib: u64 = fields
        .next()
        .and_then(|f| f.parse().ok())
        .expect("peak KiB");
    (
        std::time::Duration::from_secs_f64(seconds),
        peak_kib,
        fields.map(str::to_owned).collect(),
    )
}

/// Peak RSS (`VmHWM`) of process `pid`, KiB; 0 if
/// unreadable.
pub fn peak_rss_kib(pid: u32) -> u64 {
    soma_testkit::peak_rss_of(pid).map_or(0, |bytes| bytes / 1024)
}

/// Starts this executable as a serving child with `args`; returns it,
/// with its stdout taken, once it printed its address and peer id (see
/// [`serve_until_stdin_closes`]). Closing its stdin stops it.
pub fn spawn_serving_child(args: &[&str]) -> (std::process::Child, String, soma_types::PeerId) {
    use std::io::BufRead;
    use std::process::{Command, Stdio};
    let mut child = Command::new(std::env::current_exe().expect("this executable"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("the child starts");
    let stdout = child.stdout.take().expect("piped");
    let first = std::io::BufReader::new(stdout)
        .lines()
        .next()
        .expect("the child's address")
        .expect("a line");
    let (address, peer) = first.split_once(' ').expect("address peer-id");
    let peer = peer_id_from_hex(peer).expect("a 32-byte hex peer id");
    (child, address.to_owned(), peer)
}

/// A serving child's life: prints `address peer-id-hex` of `node` for the
/// harness, serves until the harness closes its stdin, then stops it.
pub fn serve_until_stdin_closes(node: soma_actors::P2pHandle) {
    use std::io::{BufRead, Write};
    println!("{} {}", node.local_addr(), hex::encode(node.peer_id().0));
    std::io::stdout().flush().expect("stdout");
    let mut line = String::new();
    while std::io::stdin()
        .lock()
        .read_line(&mut line)
        .is_ok_and(|n| n > 0)
    {
        line.clear();
    }
    runtime(1).block_on(node.shutdown());
}

/// A peer id from its hex form, as children print and take them.
pub fn peer_id_from_hex(text: &str) -> Option<soma_types::PeerId> {
    Some(soma_types::PeerId(hex::decode(text).ok()?.try_into().ok()?))
}

/// The order in which `n` measurements compared with one another take
/// their turns in round `round`: in order, and every other round in
/// reverse, so that a machine that speeds up or slows down over the
/// rounds weighs on each alike.
pub fn turns(round: usize, n: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    if round % 2 == 1 {
        order.reverse();
    }
    order
}

/// A multi-threaded tokio runtime with `workers` workers.
pub fn runtime(workers: usize) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

fn main() -> ExitCode {
    // As the node binary does, so that what is measured is what runs
    // (references included: one process, one allocator).
    soma_actors::system::limit_allocator_arenas();
    let cli = Cli::parse();
    // Logs only when asked for: they would disturb the figures.
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    match cli.command {
        Some(Command::CatchUps {
            times,
            commits,
            signatures,
        }) => {
            sync::catch_ups(times, commits, signatures);
            return ExitCode::SUCCESS;
        }
        Some(Command::Discovery { nodes, interval_ms }) => {
            discovery::child(nodes, interval_ms);
            return ExitCode::SUCCESS;
        }
        Some(Command::Serve) => {
            load::child();
            return ExitCode::SUCCESS;
        }
        Some(Command::Memory {
            commits,
            cache_bytes,
            seeds,
        }) => {
            memory::child(commits, cache_bytes, &seeds);
            return ExitCode::SUCCESS;
        }
        Some(Command::Flood {
            commits,
            epoch,
            budget,
            timeout_ms,
            seeds,
            liar,
        }) => {
            adversarial::child(commits, epoch, budget, timeout_ms, &seeds, &liar);
            return ExitCode::SUCCESS;
        }
        Some(Command::Attacked { commits, seed }) => {
            under_attack::child(commits, &seed);
            return ExitCode::SUCCESS;
        }
        None => {}
    }
    if let Some(unknown) = cli.only.iter().find(|o| !SECTIONS.contains(&o.as_str())) {
        eprintln!(
            "error: unknown benchmark `{unknown}` in --only; choose from {}",
            SECTIONS.join(", ")
        );
        return ExitCode::from(2);
    }
    // The workspace root: crates/bench/../..
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("the crate sits two levels below the workspace root")
        .to_path_buf();
    let out_dir = if cli.quick {
        root.join("target/bench-quick")
    } else if !cli.only.is_empty() {
        root.join("target/bench-partial")
    } else {
        root.join("docs")
    };
    let markdown = cli
        .markdown
        .unwrap_or_else(|| out_dir.join("benchmarks.md"));
    let json = cli.json.unwrap_or_else(|| out_dir.join("benchmarks.json"));
    let size = if cli.quick {
        Size::quick()
    } else {
        Size::full()
    };
    let machine = Machine::detect();
    if !machine.release {
        eprintln!(
            "note: a debug build; figures are not representative (make bench builds release)"
        );
    }
    println!(
        "soma-bench, {} mode: {}",
        if cli.quick { "quick" } else { "full" },
        machine.summary()
    );
    let started = Instant::now();
    let mut sections = Vec::new();
    for key in SECTIONS {
        if !cli.only.is_empty() && !cli.only.iter().any(|o| o == key) {
            continue;
        }
        eprintln!("running {key} ...");
        let t = Instant::now();
        let section = match key {
            "sync" => sync::catch_up_section(&size),
            "cores" => cores::section(&size),
            "latency" => latency::section(&size),
            "verifier" => verifier::section(&size),
            "grpc" => grpc::section(&size),
            "discovery" => discovery::section(&size),
            "memory" => memory::section(&size),
            "scaling" => sync::scaling_section(&size),
            "load" => load::section(&size),
            "adversarial" => adversarial::section(&size),
            "attack" => under_attack::section(&size),
            _ => unreachable!("every key of SECTIONS is handled"),
        };
        eprintln!("  {key} took {:.1}s", t.elapsed().as_secs_f64());
        println!("\n{}", section.text());
        sections.push(section);
    }
    let report = Report {
        machine,
        mode: if cli.quick { "quick" } else { "full" },
        sections,
        elapsed: started.elapsed(),
    };
    if let Err(e) = report.write(&markdown, &json) {
        eprintln!(
            "error: could not write {} or {}: {e}",
            markdown.display(),
            json.display()
        );
        return ExitCode::FAILURE;
    }
    println!(
        "\nall benchmarks in {:.0}s; wrote {} and {}",
        report.elapsed.as_secs_f64(),
        markdown.display(),
        json.display()
    );
    ExitCode::SUCCESS
}
