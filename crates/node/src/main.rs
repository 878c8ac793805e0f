//! `soma-p2p`: run a node of the soma-p2p network, make its keys and a local
//! network's genesis, watch a node, replay traces, and run the local network
//! demo.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

mod alone;
mod config;
mod files;
mod genesis;
mod keys;
mod localnet;
mod metrics;
mod producer;
mod role;
mod run;
mod signals;
mod status;

/// The peer-to-peer layer of a soma node: discovery, state sync and the
/// gRPC service, over mutual TLS.
#[derive(Parser, Debug)]
#[command(name = "soma-p2p", version)]
struct Cli {
    /// Log format; the level comes from RUST_LOG (default: info).
    #[arg(long, value_enum, default_value_t = LogFormat::Human, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Human,
    /// One JSON object per line.
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Write a node's keys: network and protocol keys (mode 0600), a TLS key
    /// with a certificate bound to the network key, as PEM, and the public
    /// keys in `public.toml`, for a genesis.
    Keygen {
        /// Directory to write the keys into.
        #[arg(long)]
        out: PathBuf,
        /// Overwrite keys already there.
        #[arg(long)]
        force: bool,
        /// Make only a new TLS pair (`tls.crt`, `tls.key`) for the network
        /// key already in the directory, replacing the pair there (missing,
        /// damaged or bound to another key); the node's identity stays.
        #[arg(long, conflicts_with = "force")]
        tls_only: bool,
    },
    /// Write a genesis (`genesis.toml`, public material only). Either from
    /// validators' public files (`--validator public.toml --stake N
    /// --address HOST:PORT`, repeated, in committee order), or a whole local
    /// network (`--validators N`): the genesis, each validator's keys in its
    /// own directory, and the block producer's secrets in `producer.toml`.
    #[command(group(clap::ArgGroup::new("committee").required(true).args(["validators", "validator"])))]
    Genesis {
        /// Number of validators of a local network on 127.0.0.1.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1000))]
        validators: Option<u32>,
        /// A validator's `public.toml` (from `soma-p2p keygen`); repeat it,
        /// with one --stake and one --address per validator, in order.
        #[arg(long, requires_all = ["stake", "address"])]
        validator: Vec<PathBuf>,
        /// Stake of each --validator, in order.
        #[arg(long, requires = "validator")]
        stake: Vec<u64>,
        /// Address (host:port) of each --validator, in order.
        #[arg(long, requires = "validator")]
        address: Vec<String>,
        /// Directory to write into.
        #[arg(long)]
        out: PathBuf,
        /// First validator port on 127.0.0.1 (local network; the others follow).
        #[arg(long, default_value_t = 7000, conflicts_with = "validator")]
        base_port: u16,
        /// Commits per epoch, for block producers.
        #[arg(long, default_value_t = 1000)]
        commits_per_epoch: u64,
        /// Overwrite files already there.
        #[arg(long)]
        force: bool,
    },
    /// Run one node until Ctrl-C, SIGTERM or SIGHUP.
    Run {
        /// The node's configuration file (`soma-p2p config --default`).
        #[arg(long)]
        config: PathBuf,
        /// Produce blocks and commits at this rate per second (validators of
        /// a local network); overrides the configuration's `[producer]`.
        #[arg(long)]
        commit_rate: Option<f64>,
    },
    /// The demo: validators as separate processes on 127.0.0.1 produce
    /// commits, then a fresh node joins through one seed and syncs.
    Localnet {
        /// Number of validators.
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
        nodes: u32,
        /// Commits produced before the fresh node joins.
        #[arg(long, default_value_t = 2000)]
        commits: u64,
        /// Directory for configs, stores and logs (default: a fresh
        /// temporary directory, removed at the end).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Commits per second each validator produces.
        #[arg(long, default_value_t = 500.0)]
        commit_rate: f64,
        /// Commits per epoch.
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
        commits_per_epoch: u64,
        /// Signed transactions per block.
        #[arg(long, default_value_t = 10)]
        transactions_per_block: usize,
        /// Seconds to wait for production and for sync before giving up
        /// (at most a day).
        #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..=86_400))]
        timeout: u64,
    },
    /// Ask a running node (as an anonymous caller) for its chain, heights,
    /// health and peers.
    Status {
        /// The node's gRPC address, host:port.
        #[arg(long)]
        addr: String,
    },
    /// Replay a recorded actor trace and report the first difference.
    Replay {
        /// The trace (JSON Lines).
        file: PathBuf,
    },
    /// Configuration helpers.
    Config {
        /// Print a commented configuration file with every default.
        #[arg(long)]
        default: bool,
    },
}

/// How a command failed, and so the exit code.
#[derive(Debug)]
pub(crate) enum Failure {
    /// Bad usage or configuration: exit code 2.
    Usage(String),
    /// The command ran and failed: exit code 1.
    Run(String),
}

impl Failure {
    pub(crate) fn usage(e: impl ToString) -> Self {
        Failure::Usage(e.to_string())
    }

    pub(crate) fn run(e: impl ToString) -> Self {
        Failure::Run(e.to_string())
    }
}

fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    // A log line that cannot be written is dropped: tracing-subscriber
    // would otherwise report it with `eprintln!`, which panics once stderr
    // is a closed pipe (a `| tee` or a log shipper that went away), and
    // every actor logging then panicked and the node stopped uncleanly.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .log_internal_errors(false)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    // Before any thread starts: every thread's allocations then share one
    // arena per core, and the node's memory stays flat.
    let arenas = soma_actors::system::limit_allocator_arenas();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            say_error(&format!("cannot start: {e}"));
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(execute(cli, arenas));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(message)) => {
            say_error(&message);
            ExitCode::from(2)
        }
        Err(Failure::Run(message)) => {
            say_error(&message);
            ExitCode::from(1)
        }
    }
}

/// Writes `error: {message}` to stderr, if it can: with stderr closed the
/// exit code still says what happened (`eprintln!` would panic instead).
fn say_error(message: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "error: {message}");
}

/// Runs the command; `arenas` is the malloc arena limit `main` set, if any.
async fn execute(cli: Cli, arenas: Option<usize>) -> Result<(), Failure> {
    match cli.command {
        Command::Keygen {
            out,
            tls_only: true,
            ..
        } => {
            let peer = keys::write_tls(&out).map_err(Failure::usage)?;
            println!("peer id {}", hex::encode(peer.0));
            println!("a new TLS pair written to {}", out.display());
            Ok(())
        }
        Command::Keygen { out, force, .. } => {
            let keys = keys::write_keys(&out, None, None, force).map_err(|e| match e {
                keys::KeyError::Exists(_) => Failure::usage(e),
                e => Failure::run(e),
            })?;
            println!("peer id {}", hex::encode(keys.peer_id().0));
            println!("keys written to {}", out.display());
            println!(
                "public keys, for a genesis: {}",
                out.join(genesis::PUBLIC_FILE).display()
            );
            Ok(())
        }
        Command::Genesis {
            validators,
            validator,
            stake,
            address,
            out,
            base_port,
            commits_per_epoch,
            force,
        } => match validators {
            Some(n) => write_local_genesis(n as usize, &out, base_port, commits_per_epoch, force),
            None => {
                write_public_genesis(&validator, &stake, &address, &out, commits_per_epoch, force)
            }
        },
        Command::Run {
            config,
            commit_rate,
        } => {
            init_logs(cli.log_format);
            run::run(&config, commit_rate, arenas).await
        }
        Command::Localnet {
            nodes,
            commits,
            dir,
            commit_rate,
            commits_per_epoch,
            transactions_per_block,
            timeout,
        } => {
            localnet::run(localnet::Localnet {
                nodes: nodes as usize,
                commits,
                dir,
                commit_rate,
                commits_per_epoch,
                transactions_per_block,
                timeout: Duration::from_secs(timeout),
            })
            .await
        }
        Command::Status { addr } => {
            let s = status::query(&addr, Duration::from_secs(5))
                .await
                .map_err(Failure::run)?;
            status::print(&addr, &s);
            Ok(())
        }
        Command::Replay { file } => match soma_actors::replay::replay(&file) {
            Ok(report) => {
                let restarts = match report.restarts {
                    0 => String::new(),
                    1 => ", across 1 restart".to_owned(),
                    n => format!(", across {n} restarts"),
                };
                println!(
                    "{}: {} inputs, {} outputs of {} replayed exactly{restarts}{}",
                    file.display(),
                    report.inputs,
                    report.outputs,
                    report.actor,
                    if report.rewritten { " (rewritten)" } else { "" }
                );
                Ok(())
            }
            Err(e @ soma_actors::replay::ReplayError::Io(_)) => {
                Err(Failure::usage(format!("{}: {e}", file.display())))
            }
            Err(e) => Err(Failure::run(format!("{}: {e}", file.display()))),
        },
        Command::Config { default } => {
            if default {
                print!("{}", config::default_file());
                Ok(())
            } else {
                Err(Failure::usage(
                    "nothing to do: `soma-p2p config --default` prints a commented default file",
                ))
            }
        }
    }
}

/// Refuses to overwrite `path` unless `force`.
fn check_new(path: &std::path::Path, force: bool) -> Result<(), Failure> {
    if path.exists() && !force {
        return Err(Failure::usage(format!(
            "{} already exists; pass --force to overwrite it",
            path.display()
        )));
    }
    Ok(())
}

fn write_file(path: &std::path::Path, text: &str) -> Result<(), Failure> {
    keys::write_whole(path, text.as_bytes(), true).map_err(|e| Failure::run(e.to_string()))
}

/// Writes `genesis` as `out/genesis.toml` and prints its chain id.
fn write_genesis_file(
    out: &std::path::Path,
    genesis: &genesis::GenesisFile,
) -> Result<(), Failure> {
    let chain_id = genesis.chain_id().map_err(Failure::usage)?;
    std::fs::create_dir_all(out).map_err(|e| Failure::run(format!("{}: {e}", out.display())))?;
    let text = toml::to_string(genesis).map_err(Failure::run)?;
    write_file(&out.join(genesis::GENESIS_FILE), &text)?;
    println!("chain id {}", hex::encode(chain_id.0.0));
    Ok(())
}

fn write_public_genesis(
    validators: &[PathBuf],
    stakes: &[u64],
    addresses: &[String],
    out: &std::path::Path,
    commits_per_epoch: u64,
    force: bool,
) -> Result<(), Failure> {
    if stakes.len() != validators.len() || addresses.len() != validators.len() {
        return Err(Failure::usage(format!(
            "each --validator needs one --stake and one --address, in the same order: \
             got {} validators, {} stakes, {} addresses",
            validators.len(),
            stakes.len(),
            addresses.len()
        )));
    }
    check_new(&out.join(genesis::GENESIS_FILE), force)?;
    let entries = validators
        .iter()
        .zip(stakes)
        .zip(addresses)
        .map(|((path, &stake), address)| {
            let public = genesis::PublicFile::load(path)?;
            Ok(genesis::ValidatorEntry {
                network_key: public.network_key,
                protocol_key: public.protocol_key,
                stake,
                address: address.clone(),
            })
        })
        .collect::<Result<Vec<_>, String>>()
        .map_err(Failure::usage)?;
    let genesis = genesis::GenesisFile {
        commits_per_epoch: Some(commits_per_epoch),
        validators: entries,
    };
    // What a genesis file may hold first, then what peers could dial.
    genesis.chain_id().map_err(Failure::usage)?;
    for (n, address) in addresses.iter().enumerate() {
        genesis::check_validator_address(address)
            .map_err(|e| Failure::usage(format!("validator {} ({address}): {e}", n + 1)))?;
    }
    write_genesis_file(out, &genesis)?;
    println!(
        "genesis of {} validators written to {}",
        validators.len(),
        out.join(genesis::GENESIS_FILE).display()
    );
    Ok(())
}

fn write_local_genesis(
    validators: usize,
    out: &std::path::Path,
    base_port: u16,
    commits_per_epoch: u64,
    force: bool,
) -> Result<(), Failure> {
    check_new(&out.join(genesis::GENESIS_FILE), force)?;
    check_new(&out.join(genesis::PRODUCER_FILE), force)?;
    if base_port as usize + validators - 1 > u16::MAX as usize {
        return Err(Failure::usage(format!(
            "--base-port {base_port} leaves no port for validator {}: ports go up to 65535",
            validators - 1
        )));
    }
    let addresses: Vec<String> = (0..validators)
        .map(|i| format!("127.0.0.1:{}", base_port as usize + i))
        .collect();
    for address in &addresses {
        genesis::check_validator_address(address).map_err(|e| {
            Failure::usage(format!(
                "--base-port {base_port}: {e}; choose a range of ports clear of them"
            ))
        })?;
    }
    let (genesis, producer, chain) =
        genesis::local_network(&vec![1; validators], addresses, Some(commits_per_epoch), 10);
    // Checked before any key is written: a refused genesis leaves nothing
    // behind for the corrected run to trip on.
    genesis.chain_id().map_err(Failure::usage)?;
    for i in 0..validators {
        let dir = out.join(format!("validator-{i}")).join("keys");
        keys::write_keys(
            &dir,
            Some(chain.network_key(i)),
            Some(chain.protocol_key(0, i)),
            force,
        )
        .map_err(|e| match e {
            keys::KeyError::Exists(_) => Failure::usage(e),
            e => Failure::run(e),
        })?;
    }
    write_genesis_file(out, &genesis)?;
    keys::write_secret(
        &out.join(genesis::PRODUCER_FILE),
        toml::to_string(&producer).map_err(Failure::run)?.as_bytes(),
    )
    .map_err(Failure::run)?;
    println!(
        "genesis of {validators} validators written to {}",
        out.display()
    );
    Ok(())
}
