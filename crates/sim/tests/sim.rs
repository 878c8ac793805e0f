//! The simulator is deterministic, its traces replay, and the quick
//! scenarios hold their properties.

use soma_actors::discovery::Config;
use soma_actors::replay::replay_text;
use soma_sim::net::{Settings, Sim};
use soma_sim::scenarios::{churn, convergence, partition_and_heal, world};

fn small(seed: u64) -> Settings {
    Settings {
        nodes: 60,
        seeds: 2,
        seed,
        loss: 0.01,
        ..Settings::default()
    }
}

fn run(settings: Settings, recorded: Option<usize>, until_ms: u64) -> Sim {
    let mut sim = Sim::new(settings, recorded);
    sim.start_all();
    sim.run_until(until_ms / 2);
    // Churn and a partition, so that every kind of event is in the run.
    sim.stop(7);
    sim.partition(|i| i < 30);
    sim.run_until(until_ms * 3 / 4);
    sim.heal();
    sim.start(7);
    sim.run_until(until_ms);
    sim
}

#[test]
fn one_seed_gives_the_same_run_bit_for_bit_and_another_seed_another() {
    let a = run(small(11), None, 120_000);
    let b = run(small(11), None, 120_000);
    assert_eq!(a.digest(), b.digest());
    assert_eq!(a.counts(), b.counts());
    assert_eq!(a.views(), b.views());
    let c = run(small(12), None, 120_000);
    assert_ne!(a.digest(), c.digest());
}

#[test]
fn a_nodes_inputs_from_a_simulated_run_replay_through_the_replay_harness() {
    // Node 7 leaves and comes back: its trace holds a restart too.
    let sim = run(small(5), Some(7), 120_000);
    let trace = sim.trace().expect("node 7 records");
    assert!(
        trace.lines().count() > 50,
        "a real run: {} lines",
        trace.lines().count()
    );
    let (report, rewritten) = replay_text(&trace, false).expect("the trace replays bit-exact");
    assert_eq!(rewritten, trace);
    assert!(report.inputs > 50, "{report:?}");
    assert_eq!(report.restarts, 1, "{report:?}");
}

#[test]
fn a_hundred_nodes_in_five_regions_from_three_seeds_converge() {
    let result = convergence(world(100, 3), 60);
    assert!(result.intervals.is_some(), "{result:?}");
    let target = Config::default().target_concurrent_connections;
    assert!(result.known_min >= target, "{result:?}");
}

#[test]
fn a_network_under_churn_goes_back_to_its_connection_target_once_churn_stops() {
    let run = churn(small(4), 12, 3, 5.0);
    assert_eq!(run.minutes.len(), 3);
    assert_eq!(run.under_target_after, 0, "{run:?}");
    // 5 % of 60 nodes leave each minute: entries of the departed linger.
    assert!(run.minutes[2].stale_fraction > 0.0, "{run:?}");
}

#[test]
fn two_halves_apart_for_ten_minutes_stay_apart_after_the_heal() {
    // What the simulator found: every node holds its connection target
    // within its half, and Discovery dials only below the target, so once
    // the partition heals no connection crosses it again (though every
    // node still knows nodes of the other half when it heals).
    let settings = small(6);
    let nodes = settings.nodes;
    let result = partition_and_heal(settings, 12, 600_000, 120_000);
    assert_eq!(result.components_split, 2, "{result:?}");
    assert_eq!(result.knew_across, nodes, "{result:?}");
    assert_eq!(result.heal_ms, None, "{result:?}");
}
