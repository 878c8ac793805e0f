//! `soma-impair`: one impaired link as a process, for tests that run nodes
//! as processes (the network-namespace test, where the kernel has no
//! netem). Listens on `--listen`, forwards every connection to
//! `--upstream` with the delay, jitter, bandwidth limit and resets asked
//! for, and runs until it is killed. Prints `listening on <address>` once
//! it accepts, then its counters every `--report-every-s` seconds.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use soma_testkit::impair::{DEFAULT_QUEUE_BYTES, ImpairedLink, Impairment, Stall};

#[derive(Parser, Debug)]
#[command(
    name = "soma-impair",
    about = "A TCP forwarder with latency, jitter, a bandwidth limit, stalls and resets"
)]
struct Cli {
    /// Address to listen on (port 0: a free one, printed).
    #[arg(long)]
    listen: SocketAddr,
    /// Address every accepted connection is forwarded to.
    #[arg(long)]
    upstream: SocketAddr,
    /// Delay added each way, in milliseconds (a round trip is twice this).
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
    /// Each chunk's delay is drawn within delay ± jitter, in milliseconds.
    #[arg(long, default_value_t = 0)]
    jitter_ms: u64,
    /// Bytes per second each way; 0: unlimited.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Reset every live connection on this period, in seconds; 0: never.
    #[arg(long, default_value_t = 0.0)]
    reset_every_s: f64,
    /// Hold every byte back for --stall-ms on this period, in seconds; 0: never.
    #[arg(long, default_value_t = 0.0)]
    stall_every_s: f64,
    /// Length of each stall, in milliseconds.
    #[arg(long, default_value_t = 0)]
    stall_ms: u64,
    /// Bytes on the way in one direction of one connection at most.
    #[arg(long, default_value_t = DEFAULT_QUEUE_BYTES)]
    queue_bytes: usize,
    /// Print the counters on this period, in seconds; 0: never.
    #[arg(long, default_value_t = 0)]
    report_every_s: u64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let seconds = |s: f64| (s > 0.0).then(|| Duration::from_secs_f64(s));
    let impairment = Impairment {
        one_way_delay: Duration::from_millis(cli.delay_ms),
        jitter: Duration::from_millis(cli.jitter_ms),
        bandwidth_bytes_per_s: (cli.rate > 0).then_some(cli.rate),
        reset_every: seconds(cli.reset_every_s),
        stall: seconds(cli.stall_every_s).map(|every| Stall {
            every,
            length: Duration::from_millis(cli.stall_ms),
        }),
        queue_bytes: cli.queue_bytes,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    runtime.block_on(async {
        let listener = match tokio::net::TcpListener::bind(cli.listen).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("soma-impair: cannot listen on {}: {e}", cli.listen);
                return ExitCode::FAILURE;
            }
        };
        let link = ImpairedLink::start(listener, cli.upstream, impairment);
        println!("listening on {} -> {}", link.local_addr(), cli.upstream);
        if cli.report_every_s == 0 {
            std::future::pending::<()>().await;
        }
        let mut every = tokio::time::interval(Duration::from_secs(cli.report_every_s));
        every.tick().await;
        loop {
            every.tick().await;
            println!("{:?}", link.stats());
        }
    })
}
