//! The experiments: what a real network needs to know about discovery,
//! answered on the simulated one. Each returns figures; `make sim` prints
//! them into docs/simulation.md and the tests assert their properties.

use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::heights::{HeightSettings, Spread, spread};
use crate::net::{Counts, Latency, NodeView, Settings, Sim};

/// Every node connected to at least `target` peers (or all the others,
/// in a smaller network) and knowing at least as many.
pub fn converged(views: &[NodeView], target: usize) -> bool {
    let up = views.iter().filter(|v| v.up).count();
    let want = target.min(up.saturating_sub(1));
    views
        .iter()
        .filter(|v| v.up)
        .all(|v| v.connected >= want && v.known >= want)
}

/// Whether the connections of the nodes that are up join them into one
/// network (a connection counts both ways).
pub fn one_network(sim: &Sim) -> bool {
    components(sim) == 1
}

/// The number of separate networks the up nodes' connections make.
pub fn components(sim: &Sim) -> usize {
    let n = sim.len();
    let mut parent: Vec<usize> = (0..n).collect();
    fn root(parent: &mut [usize], mut x: usize) -> usize {
        while parent[x] != x {
            parent[x] = parent[parent[x]];
            x = parent[x];
        }
        x
    }
    let views = sim.views();
    for v in views.iter().filter(|v| v.up) {
        for c in sim.connections_of(v.index) {
            let (a, b) = (root(&mut parent, v.index), root(&mut parent, c));
            parent[a] = b;
        }
    }
    let mut roots: Vec<usize> = views
        .iter()
        .filter(|v| v.up)
        .map(|v| root(&mut parent, v.index))
        .collect();
    roots.sort_unstable();
    roots.dedup();
    roots.len()
}

/// How a network of `nodes` converged from `seeds` seed nodes.
#[derive(Clone, Debug, PartialEq)]
pub struct Convergence {
    /// Nodes.
    pub nodes: usize,
    /// The seed of the run.
    pub seed: u64,
    /// Discovery intervals until every node was converged, if it was
    /// within the run.
    pub intervals: Option<u64>,
    /// Virtual time to convergence, in milliseconds.
    pub time_ms: Option<u64>,
    /// GetKnownPeers calls per node per interval, over the run.
    pub calls_per_node_interval: f64,
    /// Answer bytes received per node per interval, over the run.
    pub bytes_per_node_interval: f64,
    /// Known peers per node at the end: fewest and median.
    pub known_min: usize,
    /// Median known peers per node at the end.
    pub known_median: usize,
    /// Connections the targets' inbound rules closed to admit others, and
    /// dials they refused (both 0 without [`Settings::inbound`]).
    pub inbound_evicted: u64,
    /// See `inbound_evicted`.
    pub inbound_refused: u64,
    /// The most inbound connections any node held at the end.
    pub inbound_most: usize,
}

/// Starts every node at once (each seeded with the first `seeds`) and runs
/// until converged or `max_intervals` have passed.
pub fn convergence(settings: Settings, max_intervals: u64) -> Convergence {
    let interval = settings.discovery.interval_ms.max(1);
    let target = settings.discovery.target_concurrent_connections;
    let (nodes, seed) = (settings.nodes, settings.seed);
    let mut sim = Sim::new(settings, None);
    sim.start_all();
    let mut intervals = None;
    let mut ran = 0;
    for i in 1..=max_intervals {
        sim.run_until(i * interval);
        ran = i;
        if converged(&sim.views(), target) {
            intervals = Some(i);
            break;
        }
    }
    let mut known: Vec<usize> = sim.views().iter().map(|v| v.known).collect();
    known.sort_unstable();
    let counts = sim.counts();
    let per = (nodes as u64 * ran.max(1)) as f64;
    Convergence {
        nodes,
        seed,
        intervals,
        time_ms: intervals.map(|i| i * interval),
        calls_per_node_interval: counts.queries as f64 / per,
        bytes_per_node_interval: counts.bytes as f64 / per,
        known_min: known.first().copied().unwrap_or(0),
        known_median: known.get(known.len() / 2).copied().unwrap_or(0),
        inbound_evicted: counts.inbound_evicted,
        inbound_refused: counts.inbound_refused,
        inbound_most: (0..sim.len())
            .map(|i| sim.inbound_open(i))
            .max()
            .unwrap_or(0),
    }
}

/// One minute of a network under churn.
#[derive(Clone, Debug, PartialEq)]
pub struct ChurnMinute {
    /// Minutes since churn began.
    pub minute: u64,
    /// Known-peer entries of up nodes that name a node that is down, over
    /// all their entries.
    pub stale_fraction: f64,
    /// Dials that failed this minute, over the dials of the minute.
    pub dial_failure_fraction: f64,
    /// Nodes up for at least six intervals and connected to fewer than
    /// the target (a node that just joined is still dialling).
    pub under_target: usize,
}

/// A run under churn, minute by minute, and how it ended.
#[derive(Clone, Debug, PartialEq)]
pub struct Churn {
    /// Each minute of churn.
    pub minutes: Vec<ChurnMinute>,
    /// Nodes under their connection target once the churn stopped and a
    /// call timeout and three intervals passed: nodes that did not recover.
    pub under_target_after: usize,
    /// Counts over the whole run, the convergence before the churn
    /// included.
    pub counts: Counts,
}

/// A converged network whose nodes (never a seed) are replaced at a
/// steady rate, as the churn scenarios run it.
struct Churning {
    sim: Sim,
    rng: ChaCha8Rng,
    per_minute: usize,
}

impl Churning {
    /// Starts every node of `settings`, runs `warmup_intervals`, and makes
    /// ready to replace `percent_per_minute` of the nodes each minute.
    fn converge(settings: Settings, warmup_intervals: u64, percent_per_minute: f64) -> Self {
        let interval = settings.discovery.interval_ms.max(1);
        let rng = ChaCha8Rng::seed_from_u64(settings.seed ^ 0xc4u64);
        let per_minute = ((settings.nodes as f64) * percent_per_minute / 100.0).round() as usize;
        let mut sim = Sim::new(settings, None);
        sim.start_all();
        sim.run_until(warmup_intervals * interval);
        Churning {
            sim,
            rng,
            per_minute,
        }
    }

    /// Runs a minute, the replacements spread over it, one leave and one
    /// join at a time: a node up drawn at random stops, and a new one
    /// starts. The new nodes.
    fn minute(&mut self) -> Vec<usize> {
        let (sim, per_minute) = (&mut self.sim, self.per_minute);
        let seeds = sim.settings().seeds;
        let start = sim.now();
        let mut joined = Vec::with_capacity(per_minute);
        for k in 0..per_minute {
            let at = start + (k as u64 + 1) * 60_000 / (per_minute as u64 + 1);
            sim.run_until(at);
            let up: Vec<usize> = (seeds..sim.len()).filter(|&i| sim.is_up(i)).collect();
            if let Some(&gone) = up.choose(&mut self.rng) {
                sim.stop(gone);
            }
            let node = sim.add_node();
            sim.start(node);
            joined.push(node);
        }
        sim.run_until(start + 60_000);
        joined
    }
}

/// Converges `settings` (for `warmup_intervals`), then each minute for
/// `minutes` replaces `percent_per_minute` % of the nodes: as many leave
/// as join, fresh, seeded like the others. The seed nodes stay.
pub fn churn(
    settings: Settings,
    warmup_intervals: u64,
    minutes: u64,
    percent_per_minute: f64,
) -> Churn {
    let timeout = settings.call_timeout_ms;
    let interval = settings.discovery.interval_ms.max(1);
    let target = settings.discovery.target_concurrent_connections;
    let mut churning = Churning::converge(settings, warmup_intervals, percent_per_minute);
    let mut out = Vec::new();
    for minute in 1..=minutes {
        let before = churning.sim.counts().clone();
        churning.minute();
        let sim = &churning.sim;
        let views = sim.views();
        let (mut stale, mut entries) = (0, 0);
        for v in views.iter().filter(|v| v.up) {
            stale += v.known - v.known_up;
            entries += v.known;
        }
        let after = sim.counts();
        let dials = after.dials - before.dials;
        let failed = after.dials_failed - before.dials_failed;
        let want = target.min(views.iter().filter(|v| v.up).count().saturating_sub(1));
        out.push(ChurnMinute {
            minute,
            stale_fraction: stale as f64 / entries.max(1) as f64,
            dial_failure_fraction: failed as f64 / dials.max(1) as f64,
            under_target: views
                .iter()
                .filter(|v| v.up && v.connected < want)
                .filter(|v| sim.now() - v.started_ms >= 6 * interval)
                .count(),
        });
    }
    let mut sim = churning.sim;
    sim.run_until(sim.now() + timeout + 3 * interval);
    let views = sim.views();
    let want = target.min(views.iter().filter(|v| v.up).count().saturating_sub(1));
    let under_target_after = views.iter().filter(|v| v.up && v.connected < want).count();
    Churn {
        minutes: out,
        under_target_after,
        counts: sim.counts().clone(),
    }
}

/// A partition and its healing.
#[derive(Clone, Debug, PartialEq)]
pub struct PartitionHeal {
    /// Separate networks at the end of the partition.
    pub components_split: usize,
    /// Virtual time from the heal to one connected network again, in
    /// milliseconds, if within the run.
    pub heal_ms: Option<u64>,
    /// Nodes that knew a node of the other half when the partition ended.
    pub knew_across: usize,
}

/// Converges, splits the network into two halves for `split_ms`, heals it,
/// and measures (every interval) the time until its connections join it
/// into one network again, up to `max_ms`.
pub fn partition_and_heal(
    settings: Settings,
    warmup_intervals: u64,
    split_ms: u64,
    max_ms: u64,
) -> PartitionHeal {
    let interval = settings.discovery.interval_ms.max(1);
    let nodes = settings.nodes;
    let half = |i: usize| i.is_multiple_of(2);
    let mut sim = Sim::new(settings, None);
    sim.start_all();
    sim.run_until(warmup_intervals * interval);
    sim.partition(half);
    sim.run_until(sim.now() + split_ms);
    let components_split = components(&sim);
    let knew_across = (0..nodes)
        .filter(|&i| sim.known_by(i).iter().any(|&k| half(k) != half(i)))
        .count();
    sim.heal();
    let healed_at = sim.now();
    let mut heal_ms = None;
    while sim.now() < healed_at + max_ms {
        sim.run_until(sim.now() + interval);
        if one_network(&sim) {
            heal_ms = Some(sim.now() - healed_at);
            break;
        }
    }
    PartitionHeal {
        components_split,
        heal_ms,
        knew_across,
    }
}

/// The honest nodes' state at one minute of an eclipse attempt.
#[derive(Clone, Debug, PartialEq)]
pub struct EclipseMinute {
    /// Minutes since the sybils started.
    pub minute: u64,
    /// Honest entries over all entries of an honest node's known-peer
    /// table: the mean over honest nodes, and the lowest.
    pub table_mean: f64,
    /// The lowest honest-entry fraction of any honest node.
    pub table_min: f64,
    /// Honest peers over all peers an honest node holds a connection to:
    /// the mean over honest nodes.
    pub connections_mean: f64,
    /// The lowest honest-connection fraction of any honest node.
    pub connections_min: f64,
    /// Honest nodes whose every connection is to a sybil: eclipsed.
    pub eclipsed: usize,
}

/// Converges the honest nodes of `settings` (its sybils not yet started)
/// for `warmup_intervals`, then starts the sybils and samples every
/// minute for `minutes`.
pub fn eclipse(settings: Settings, warmup_intervals: u64, minutes: u64) -> Vec<EclipseMinute> {
    let (mut sim, honest, _) = in_two_waves(settings, warmup_intervals, Sim::is_sybil);
    let started = sim.now();
    let fraction = |of: &[usize], sim: &Sim| {
        let good = of.iter().filter(|&&k| !sim.is_sybil(k)).count();
        good as f64 / of.len().max(1) as f64
    };
    (1..=minutes)
        .map(|minute| {
            sim.run_until(started + minute * 60_000);
            let tables: Vec<f64> = honest
                .iter()
                .map(|&i| fraction(&sim.known_by(i), &sim))
                .collect();
            let conns: Vec<Vec<usize>> = honest.iter().map(|&i| sim.connections_of(i)).collect();
            let held: Vec<f64> = conns.iter().map(|c| fraction(c, &sim)).collect();
            let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
            let min = |v: &[f64]| v.iter().copied().fold(1.0, f64::min);
            EclipseMinute {
                minute,
                table_mean: mean(&tables),
                table_min: min(&tables),
                connections_mean: mean(&held),
                connections_min: min(&held),
                eclipsed: conns
                    .iter()
                    .filter(|c| !c.is_empty() && c.iter().all(|&k| sim.is_sybil(k)))
                    .count(),
            }
        })
        .collect()
}

/// A network of `settings` started in two waves: the nodes `late` does
/// not name, then, once they ran `warmup_intervals`, those it names. The
/// network, and the nodes of each wave.
fn in_two_waves(
    settings: Settings,
    warmup_intervals: u64,
    late: impl Fn(&Sim, usize) -> bool,
) -> (Sim, Vec<usize>, Vec<usize>) {
    let interval = settings.discovery.interval_ms.max(1);
    let mut sim = Sim::new(settings, None);
    let (second, first): (Vec<usize>, Vec<usize>) = (0..sim.len()).partition(|&i| late(&sim, i));
    for &i in &first {
        sim.start(i);
    }
    sim.run_until(warmup_intervals * interval);
    for &i in &second {
        sim.start(i);
    }
    (sim, first, second)
}

/// How far nodes that joined a converged network have spread, at one
/// minute after they joined.
#[derive(Clone, Debug, PartialEq)]
pub struct JoinMinute {
    /// Minutes since the joiners started (in [`churn_joining`], since the
    /// churn started: the joiners are those of the minute before).
    pub minute: u64,
    /// Joiners sampled.
    pub joiners: usize,
    /// The fraction of the nodes up before them whose tables hold a
    /// joiner: the mean over joiners.
    pub known_by_mean: f64,
    /// The lowest such fraction of any joiner.
    pub known_by_min: f64,
    /// Connections a joiner dialled, and those earlier nodes dialled to
    /// it: the mean over joiners.
    pub connections_mean: f64,
    /// Peers in a joiner's own table: the mean over joiners.
    pub known_mean: f64,
}

/// Converges every node of `settings` but every `every`-th (never a seed)
/// for `warmup_intervals`, then starts those, the joiners, and samples
/// every minute for `minutes` how far they are known: what a newcomer's
/// place in full tables costs it.
pub fn joining(
    settings: Settings,
    warmup_intervals: u64,
    every: usize,
    minutes: u64,
) -> Vec<JoinMinute> {
    let (seeds, every) = (settings.seeds, every.max(1));
    let (mut sim, first, joiners) = in_two_waves(settings, warmup_intervals, |_, i| {
        i >= seeds && i % every == every - 1
    });
    let started = sim.now();
    (1..=minutes)
        .map(|minute| {
            sim.run_until(started + minute * 60_000);
            join_spread(&sim, minute, &joiners, &first)
        })
        .collect()
}

/// How far `joiners` have spread through the tables of `earlier` (those
/// of them up) at `minute`.
fn join_spread(sim: &Sim, minute: u64, joiners: &[usize], earlier: &[usize]) -> JoinMinute {
    let earlier: Vec<usize> = earlier.iter().copied().filter(|&k| sim.is_up(k)).collect();
    let mut holders = vec![0usize; sim.len()];
    for &k in &earlier {
        for j in sim.known_by(k) {
            holders[j] += 1;
        }
    }
    let known_by: Vec<f64> = joiners
        .iter()
        .map(|&j| holders[j] as f64 / earlier.len().max(1) as f64)
        .collect();
    let of_joiners =
        |f: &dyn Fn(usize) -> usize| joiners.iter().map(|&j| f(j)).sum::<usize>() as f64;
    let per_joiner = joiners.len().max(1) as f64;
    JoinMinute {
        minute,
        joiners: joiners.len(),
        known_by_mean: known_by.iter().sum::<f64>() / per_joiner,
        known_by_min: known_by.iter().copied().fold(1.0, f64::min),
        connections_mean: of_joiners(&|j| {
            earlier
                .iter()
                .filter(|&&k| sim.holds_connection(k, j))
                .count()
                + sim.connections_of(j).len()
        }) / per_joiner,
        known_mean: of_joiners(&|j| sim.known_by(j).len()) / per_joiner,
    }
}

/// Converges every node of `settings` for `warmup_intervals`, then
/// replaces `percent_per_minute` of the nodes (never a seed) each minute
/// for `minutes`, as [`churn`] does, and at the end of each minute from
/// the second samples how far the nodes that joined in the minute before
/// (and are still up) have spread through the tables of every other node
/// up: what a newcomer's place in full tables costs it in a network that
/// never stops changing. A minute with no such joiner is left out.
pub fn churn_joining(
    settings: Settings,
    warmup_intervals: u64,
    minutes: u64,
    percent_per_minute: f64,
) -> Vec<JoinMinute> {
    let mut churning = Churning::converge(settings, warmup_intervals, percent_per_minute);
    let mut out = Vec::new();
    let mut joined_before: Vec<usize> = Vec::new();
    for minute in 1..=minutes {
        let joined = churning.minute();
        let sim = &churning.sim;
        let joiners: Vec<usize> = joined_before
            .iter()
            .copied()
            .filter(|&j| sim.is_up(j))
            .collect();
        if !joiners.is_empty() {
            let others: Vec<usize> = (0..sim.len()).filter(|i| !joiners.contains(i)).collect();
            out.push(join_spread(sim, minute, &joiners, &others));
        }
        joined_before = joined;
    }
    out
}

/// How long until every node knew every other, and the calls it took.
#[derive(Clone, Debug, PartialEq)]
pub struct FullKnowledge {
    /// Virtual time until every node knew every other, in milliseconds,
    /// if within the run.
    pub time_ms: Option<u64>,
    /// GetKnownPeers calls made per node until then.
    pub calls_per_node: f64,
}

/// Starts every node at once and runs, looking every 10 ms of virtual
/// time, until every node knows every other or `max_ms` passed: the
/// criterion of the real-node benchmark (docs/benchmarks.md).
pub fn full_knowledge(settings: Settings, max_ms: u64) -> FullKnowledge {
    let nodes = settings.nodes;
    let mut sim = Sim::new(settings, None);
    sim.start_all();
    let mut time_ms = None;
    while sim.now() < max_ms {
        sim.run_until(sim.now() + 10);
        if sim.views().iter().all(|v| v.known + 1 >= nodes) {
            time_ms = Some(sim.now());
            break;
        }
    }
    FullKnowledge {
        time_ms,
        calls_per_node: sim.counts().queries as f64 / nodes.max(1) as f64,
    }
}

/// The real-node benchmark's network: `nodes` on one host (round trips
/// of 1 ms, no jitter), all seeded with node 0, started together, each
/// running its first round as it starts, rounds every 500 ms, 3 peers
/// asked per round.
pub fn like_the_bench(nodes: usize, seed: u64) -> Settings {
    let mut settings = Settings {
        nodes,
        seeds: 1,
        seed,
        latency: Latency {
            regions: vec!["host"],
            rtt_ms: vec![vec![1]],
        },
        jitter: 0.0,
        first_round_at_start: true,
        ..Settings::default()
    };
    settings.discovery.interval_ms = 500;
    settings.discovery.peers_to_query = 3;
    settings
}

/// Converges `settings` for `warmup_intervals`, then spreads `commits`
/// new commits from the seed nodes (the validators) over the connections
/// Discovery made, through the PeerHeights core of every node: once for
/// each of `runs`, on the same network.
pub fn heights(
    settings: Settings,
    warmup_intervals: u64,
    commits: u64,
    runs: &[HeightSettings],
) -> Vec<Spread> {
    let (sim, validators, seed) = converged_network(settings, warmup_intervals);
    runs.iter()
        .map(|run| spread(&sim, &validators, commits, run.clone(), seed, 600_000))
        .collect()
}

/// The network of `settings` after `warmup_intervals` of Discovery, its
/// seed nodes, and its seed.
pub fn converged_network(settings: Settings, warmup_intervals: u64) -> (Sim, Vec<usize>, u64) {
    let interval = settings.discovery.interval_ms.max(1);
    let (seeds, seed) = (settings.seeds, settings.seed);
    let mut sim = Sim::new(settings, None);
    sim.start_all();
    sim.run_until(warmup_intervals * interval);
    (sim, (0..seeds).collect(), seed)
}

/// A network of `nodes` in the five regions of [`Latency::world`], with
/// the default Discovery settings and `seeds` seed nodes.
pub fn world(nodes: usize, seed: u64) -> Settings {
    Settings {
        nodes,
        seeds: 3,
        seed,
        latency: Latency::world(),
        ..Settings::default()
    }
}

/// A seed for scenario `name` at run `k`: fixed, so a report is
/// reproducible.
pub fn seed_of(name: &str, k: u64) -> u64 {
    let mut rng = ChaCha8Rng::seed_from_u64(name.bytes().map(u64::from).sum::<u64>() + k);
    rng.random()
}
