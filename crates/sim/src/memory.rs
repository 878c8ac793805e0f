//! What this machine's memory costs a simulation: the time of one load that
//! misses every cache, measured where a large network's tables live.
//!
//! A node's Discovery table (1,000 entries, their hash index and two
//! ordered bucket indexes) is read and changed for every info its answers
//! bring, and with thousands of nodes nothing keeps one node's table in the
//! cache until its next answer: each info taken in costs loads from main
//! memory. How long such a load takes depends on how much memory is in use
//! (beyond the caches, then beyond what the TLB maps), so it is measured
//! over a buffer as large as the simulation itself, and the long run reports
//! its CPU per info taken in against it (docs/benchmarks.md, "The
//! simulator's speed").

use std::time::Instant;

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Bytes of a cache line: one load per line.
const LINE: usize = 64;

/// Most lines a chase visits: enough to defeat every cache many times
/// over, few enough that building the chase takes a second or two even
/// where each of its writes misses.
const MAX_LINES: usize = 1 << 21;

/// The mean time, in nanoseconds, of one load that depends on the one
/// before (a pointer chase), over lines spread across a buffer of `bytes`
/// (one line at random in each of up to two million equal stripes, in a
/// random order), `loads` loads in all after one lap to settle. Nothing
/// can be loaded ahead, so each load waits the whole time memory takes to
/// answer; up to 8 GiB (two million stripes of a 4 KiB page or less) the
/// lines are spread over every page of the buffer, so the TLB misses as
/// it would over a table of that size.
pub fn dependent_load_ns(bytes: usize, loads: usize, seed: u64) -> f64 {
    let chase = Chase::new(bytes, MAX_LINES, seed);
    let mut at = chase.start;
    for _ in 0..chase.lines {
        at = chase.memory[at];
    }
    let t = Instant::now();
    for _ in 0..loads {
        at = chase.memory[at];
    }
    let elapsed = t.elapsed();
    std::hint::black_box(at);
    elapsed.as_nanos() as f64 / loads.max(1) as f64
}

/// A buffer whose words name the next word to load: the first word of one
/// line at random in each of `lines` equal stripes, the lines shuffled and
/// each linked to the next, the last to the first: one cycle through all
/// of them in a random order.
struct Chase {
    memory: Vec<usize>,
    start: usize,
    lines: usize,
}

impl Chase {
    /// Over `bytes` (at least one line), at most `max_lines` lines placed.
    fn new(bytes: usize, max_lines: usize, seed: u64) -> Self {
        const WORDS: usize = LINE / std::mem::size_of::<usize>();
        let in_buffer = (bytes / LINE).max(1);
        let lines = in_buffer.min(max_lines.max(1));
        let stripe = in_buffer / lines;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut order: Vec<usize> = (0..lines)
            .map(|i| (i * stripe + rng.random_range(0..stripe)) * WORDS)
            .collect();
        order.shuffle(&mut rng);
        // Zeroed pages are mapped on first touch: only the pages written
        // here are faulted in.
        let mut memory = vec![0usize; in_buffer * WORDS];
        for (k, &at) in order.iter().enumerate() {
            memory[at] = order[(k + 1) % order.len()];
        }
        Chase {
            memory,
            start: order[0],
            lines,
        }
    }
}

/// Memory the system can still give this process without swapping, in
/// bytes (`MemAvailable`), if it says.
pub fn available_bytes() -> Option<u64> {
    std::fs::read_to_string("/proc/meminfo")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib * 1024)
}

/// CPU time this process has used so far, user and system, in seconds,
/// and its peak resident memory in bytes.
pub fn process_usage() -> (f64, u64) {
    // SAFETY: `getrusage` only writes the struct it is given.
    let mut usage = unsafe { std::mem::zeroed::<libc::rusage>() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    (
        seconds(usage.ru_utime) + seconds(usage.ru_stime),
        // Linux gives the peak in KiB.
        usage.ru_maxrss.max(0) as u64 * 1024,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A chase is one cycle through every line it places, one in each
    /// stripe of the buffer: back at its start after as many loads as
    /// lines, and never before.
    #[test]
    fn a_chase_visits_every_line_it_places_once_per_lap() {
        for (bytes, max_lines) in [(1 << 16, 1 << 10), (1 << 16, 100), (100, 8)] {
            let chase = Chase::new(bytes, max_lines, 7);
            let words = LINE / std::mem::size_of::<usize>();
            let in_buffer = (bytes / LINE).max(1);
            assert_eq!(chase.lines, in_buffer.min(max_lines));
            let stripe = in_buffer / chase.lines;
            let mut stripes = std::collections::HashSet::new();
            let mut at = chase.start;
            for _ in 0..chase.lines {
                assert_eq!(at % words, 0, "a line's first word");
                assert!(
                    stripes.insert(at / words / stripe),
                    "a stripe twice in a lap"
                );
                at = chase.memory[at];
            }
            assert_eq!(at, chase.start);
            assert_eq!(stripes.len(), chase.lines);
        }
    }
}
