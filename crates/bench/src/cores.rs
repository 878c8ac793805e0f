//! Catch-up on 1 core, then on 2: how throughput grows with cores, and
//! where the pipeline (signatures off) would stop on a machine with many.
//!
//! The whole catch-up (the syncing node, the 3 validators serving it, their
//! runtimes, actor threads and verifier pools) is confined to the first N
//! cores with `sched_setaffinity`, set on the bench's thread before any of
//! them is started, so every thread they start inherits it. CPU time is
//! read per thread from `/proc/self/task/*/schedstat` at the start and at
//! the tip.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use soma_actors::P2pConfig;
use soma_store::{ConsensusStore, MemStore};
use std::sync::Arc;

use crate::report::{Cell, Section};
use crate::sync::{chain, stop, validators};
use crate::{Size, runtime};

/// The CPUs the calling thread may run on.
fn allowed() -> std::io::Result<libc::cpu_set_t> {
    // SAFETY: a zeroed cpu_set_t is an empty set; the call writes only the
    // set passed with its size.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(set)
    }
}

/// Confines the calling thread, and every thread it starts from now on,
/// to `set`.
fn confine_to(set: &libc::cpu_set_t) -> std::io::Result<()> {
    // SAFETY: the call reads only the set passed with its size.
    if unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), set) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The first `cores` CPUs of `allowed`.
fn first(allowed: &libc::cpu_set_t, cores: usize) -> libc::cpu_set_t {
    // SAFETY: a zeroed cpu_set_t is an empty set; the macros index within
    // CPU_SETSIZE.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        let mut taken = 0;
        for cpu in 0..libc::CPU_SETSIZE as usize {
            if taken < cores && libc::CPU_ISSET(cpu, allowed) {
                libc::CPU_SET(cpu, &mut set);
                taken += 1;
            }
        }
        set
    }
}

/// CPU time of each thread of this process, by thread id, with the
/// thread's name: the first field of `/proc/self/task/<tid>/schedstat`
/// (nanoseconds on a CPU).
fn thread_times() -> HashMap<u64, (String, Duration)> {
    let mut times = HashMap::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return times;
    };
    for task in tasks.flatten() {
        let path = task.path();
        let (Ok(stat), Ok(name)) = (
            std::fs::read_to_string(path.join("schedstat")),
            std::fs::read_to_string(path.join("comm")),
        ) else {
            continue;
        };
        let ns = stat.split_whitespace().next().and_then(|f| f.parse().ok());
        let tid = task.file_name().to_str().and_then(|t| t.parse().ok());
        if let (Some(tid), Some(ns)) = (tid, ns) {
            times.insert(tid, (name.trim().to_string(), Duration::from_nanos(ns)));
        }
    }
    times
}

/// What one catch-up on `cores` cores took.
struct Run {
    elapsed: Duration,
    /// CPU time of every thread of the process during the run.
    cpu: Duration,
    /// The busiest thread during the run: its name and CPU time.
    busiest: (String, Duration),
}

/// A catch-up of `chain` from 3 validators, everything confined to `cores`.
fn run(chain: &soma_chain::Chain, cores: usize, signatures: bool, key: u8) -> Run {
    let all = allowed().expect("the bench may read its CPU affinity");
    confine_to(&first(&all, cores)).expect("the bench may set its CPU affinity");
    let rt = runtime(2);
    let run = rt.block_on(async {
        let peers = validators(chain, 3);
        let config = P2pConfig {
            seed_peers: soma_testkit::seeds(&peers.iter().collect::<Vec<_>>()),
            verify_synced_block_signatures: signatures,
            ..P2pConfig::default()
        };
        let store: Arc<dyn ConsensusStore> = Arc::new(MemStore::new(chain.genesis()));
        let before = thread_times();
        let start = Instant::now();
        let node = soma_testkit::node(chain, key, config, store);
        soma_testkit::wait_applied(&node, chain.tip(), Duration::from_secs(1_800)).await;
        let elapsed = start.elapsed();
        let after = thread_times();
        node.shutdown().await;
        stop(peers).await;
        let mut cpu = Duration::ZERO;
        let mut busiest = (String::new(), Duration::ZERO);
        for (tid, (name, t)) in after {
            let used = t.saturating_sub(before.get(&tid).map_or(Duration::ZERO, |b| b.1));
            cpu += used;
            if used > busiest.1 {
                busiest = (name, used);
            }
        }
        Run {
            elapsed,
            cpu,
            busiest,
        }
    });
    drop(rt);
    confine_to(&all).expect("the bench may set its CPU affinity");
    run
}

/// Benchmark: the catch-up on 1 and 2 cores.
pub fn section(size: &Size) -> Section {
    let commits = size.cores_commits;
    let chain = chain(4, commits);
    let available = crate::cores();
    let counts: Vec<usize> = [1, 2].into_iter().filter(|c| *c <= available).collect();
    let mut s = Section::new(
        "cores",
        "Catch-up on 1 core, then on 2",
        format!(
            "The catch-up of the sync section ({commits} commits, {} blocks of 10 signed \
             transactions, from 3 validator nodes on a MemStore, default settings), with the \
             whole process (the syncing node, the validators, their runtimes, actor threads \
             and verifier pools) confined to the first N cores by CPU affinity. CPU: the time \
             every thread of the process spent on a core during the catch-up (from \
             /proc/self/task/*/schedstat); \
             busiest thread: the one thread that used the most, the part no added core can \
             share.",
            chain.block_count()
        ),
        &[
            "cores, signatures",
            "time (s)",
            "commits/s",
            "of 1 core",
            "CPU (s)",
            "CPU ms per 1,000 commits",
            "busiest thread (CPU s)",
        ],
    );
    let mut ceiling = None;
    for signatures in [true, false] {
        let mut one = None;
        for &cores in &counts {
            let r = run(&chain, cores, signatures, 110 + cores as u8);
            let rate = commits as f64 / r.elapsed.as_secs_f64();
            let base = *one.get_or_insert(rate);
            let per_thousand = r.cpu.as_secs_f64() * 1e3 / (commits as f64 / 1e3);
            s.row(
                format!(
                    "{cores} core{}, signatures {}",
                    if cores == 1 { "" } else { "s" },
                    if signatures { "checked" } else { "off" }
                ),
                vec![
                    Cell::secs(r.elapsed),
                    Cell::rate(commits as f64, r.elapsed),
                    Cell::Ratio(rate / base),
                    Cell::secs(r.cpu),
                    Cell::num(per_thousand, 0),
                    Cell::Text(format!(
                        "{} ({:.2})",
                        r.busiest.0,
                        r.busiest.1.as_secs_f64()
                    )),
                ],
            );
            if !signatures && cores == *counts.last().expect("at least one core") {
                ceiling = Some((r.cpu, r.busiest.clone()));
            }
        }
    }
    if let Some((cpu, (name, busiest))) = ceiling {
        let per_core = commits as f64 / cpu.as_secs_f64();
        let serial = commits as f64 / busiest.as_secs_f64().max(1e-3);
        s.notes.push(format!(
            "Projected ceiling with signatures off: the CPU of the whole catch-up (servers \
             included) is {per_core:.0} commits/s per core, so 16 cores would allow about \
             {:.0} commits/s if the work spread over them; the busiest thread ({name}) alone \
             caps it at {serial:.0} commits/s, whatever the cores.",
            per_core * 16.0
        ));
    }
    s
}
