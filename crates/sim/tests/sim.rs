//! The simulator is deterministic, its traces replay, and the quick
//! scenarios hold their properties.

use soma_actors::discovery::Config;
use soma_actors::replay::replay_text;
use soma_sim::heights::HeightSettings;
use soma_sim::net::{START_UNIX_MS, Settings, Sim};
use soma_sim::scenarios::{churn, converged_network, convergence, partition_and_heal, world};
use soma_sim::sync::{Hostile, SyncRun, SyncSettings, catch_up};

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
fn threads_step_nodes_side_by_side_and_the_run_stays_the_same() {
    // Churn, a partition, losses, sybils answering without their cores and
    // servers at their inbound limit closing connections: every kind of
    // event, on one thread and on two or three. Windows are 3 ms in the
    // world's latencies; one region of 200 ms round trips makes them
    // 91 ms, so a node's events chain, and dials, rotations and evictions
    // fall inside them.
    let inbound = soma_wire::inbound::Config {
        max: 12,
        reserved: 2,
        ..soma_wire::inbound::Config::default()
    };
    let variants = [
        small(11),
        Settings {
            sybils: 12,
            ..small(12)
        },
        Settings {
            inbound: Some(inbound.clone()),
            ..small(13)
        },
        Settings {
            latency: soma_sim::net::Latency::uniform(200),
            inbound: Some(inbound),
            ..small(14)
        },
    ];
    for settings in variants {
        let one = run(settings.clone(), Some(7), 120_000);
        assert_eq!(one.steps_ahead(), 0);
        let answers = one.counts().answers;
        let (digest, counts, views) = (one.digest(), one.counts().clone(), one.views());
        let trace = one.trace().expect("node 7 records");
        for threads in [2, 3] {
            let many = run(
                Settings {
                    threads,
                    ..settings.clone()
                },
                Some(7),
                120_000,
            );
            assert_eq!(many.digest(), digest, "{threads} threads");
            assert_eq!(many.counts(), &counts);
            assert_eq!(many.views(), views);
            // Steps went ahead in numbers: a third as many as there were
            // answers, in a network of 60 whose windows hold few events.
            assert!(
                many.steps_ahead() * 3 > answers,
                "{} steps ahead, {answers} answers",
                many.steps_ahead()
            );
            // Node 7's inputs and outputs, every field, at their times.
            assert_eq!(many.trace().expect("node 7 records"), trace);
        }
    }
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
fn a_node_sends_the_info_it_signed_at_its_last_round_not_one_per_call() {
    // As the Discovery actor does: every node signs its info as it starts
    // (time 0 here) and at each round, a whole interval apart; the calls
    // and answers between carry the last one.
    let settings = Settings {
        loss: 0.0,
        ..small(5)
    };
    let interval = settings.discovery.interval_ms;
    let mut sim = Sim::new(settings, Some(3));
    sim.start_all();
    sim.run_until(60_000);
    let trace = sim.trace().expect("node 3 records");
    let mut stamps: std::collections::BTreeMap<String, std::collections::BTreeSet<u64>> =
        Default::default();
    for line in trace.lines() {
        let event: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
        let input = &event["in"];
        let infos: Vec<&serde_json::Value> = match (&input["learned"], &input["serve"]) {
            (serde_json::Value::Object(l), _) => l["infos"].as_array().unwrap().iter().collect(),
            (_, serde_json::Value::Object(s)) => s.get("info").into_iter().collect(),
            _ => continue,
        };
        for i in infos.into_iter().filter(|i| !i.is_null()) {
            let peer = i["info"]["peer_id"].as_str().unwrap().to_string();
            let ms = i["info"]["timestamp_ms"].as_u64().unwrap() - START_UNIX_MS;
            stamps.entry(peer).or_default().insert(ms);
        }
    }
    // Node 3 heard of most of the network, most peers more than once.
    assert!(stamps.len() >= 50, "{} peers", stamps.len());
    let often = stamps.values().filter(|s| s.len() >= 4).count();
    assert!(often >= 5, "{often} peers with four infos or more");
    for (peer, ms) in &stamps {
        // Besides the one signed at the start, each info a whole number
        // of intervals after the one before.
        let rounds: Vec<u64> = ms.iter().copied().filter(|ms| *ms > 0).collect();
        for pair in rounds.windows(2) {
            assert_eq!((pair[1] - pair[0]) % interval, 0, "{peer}: {ms:?}");
        }
    }
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
fn two_halves_apart_for_ten_minutes_join_again_after_the_heal() {
    // Every node holds its connection target within its half; once the
    // partition heals, only the rotation of connections (one dial past
    // the target a minute) crosses it again, over the nodes of the other
    // half every node still knows.
    let settings = small(6);
    let nodes = settings.nodes;
    let result = partition_and_heal(settings, 12, 600_000, 600_000);
    assert_eq!(result.components_split, 2, "{result:?}");
    assert_eq!(result.knew_across, nodes, "{result:?}");
    assert!(result.heal_ms.is_some(), "{result:?}");
}

#[test]
fn without_rotation_two_halves_stay_apart_after_the_heal() {
    // The same run with rotation off: Discovery dials only below its
    // target, so no connection crosses the healed partition, ever.
    let mut settings = small(6);
    settings.discovery.rotation_interval_ms = 0;
    let result = partition_and_heal(settings, 12, 600_000, 600_000);
    assert_eq!(result.components_split, 2, "{result:?}");
    assert_eq!(result.heal_ms, None, "{result:?}");
}

/// 30 % of 100 nodes an attacker's, answering every call with sybils
/// only, at the limits. Tables of 40 (of 99 others), 10 per source, 20
/// infos an answer, so that the caps bite in a network this small; a
/// rotation every 10 s, so that three minutes of attack hold eighteen.
fn sybil_flood(min_evict_age_ms: u64) -> Settings {
    let mut settings = Settings {
        nodes: 100,
        sybils: 30,
        ..small(8)
    };
    settings.discovery.max_known_peers = 40;
    settings.discovery.max_known_peers_per_source = 10;
    settings.discovery.max_peers_to_send = 20;
    settings.discovery.rotation_interval_ms = 10_000;
    settings.discovery.min_evict_age_ms = min_evict_age_ms;
    settings
}

#[test]
fn sybils_flooding_fresh_infos_never_rotate_an_honest_node_past_its_anchors() {
    // The flood for three minutes after the honest network converged,
    // against tables that give up their oldest entry however fresh: the
    // flood wins the tables, and only the anchors hold.
    let minutes = soma_sim::scenarios::eclipse(sybil_flood(0), 12, 3);
    assert_eq!(minutes.len(), 3);
    // The flood is real: sybils hold more of the tables than their 30 %
    // of the nodes, and rotation moves connections to them.
    let last = &minutes[2];
    assert!(last.table_mean < 0.7, "{last:?}");
    assert!(last.connections_mean < 1.0, "{last:?}");
    // But the anchors, half the target of 8 made before the attack, stay:
    // every honest node keeps at least half its connections honest.
    for m in &minutes {
        assert!(m.connections_min >= 0.5, "{m:?}");
        assert_eq!(m.eclipsed, 0, "{m:?}");
    }
}

#[test]
fn tables_that_keep_entries_younger_than_30_s_stay_honest_under_the_same_flood() {
    // The same flood after convergence, against tables that give a
    // newcomer only the place of an entry seen 30 s before it (or its own
    // source's oldest): honest peers, signing afresh each round, keep
    // their places, and the flood takes only its own sources' buckets.
    let minutes = soma_sim::scenarios::eclipse(sybil_flood(30_000), 12, 3);
    assert_eq!(minutes.len(), 3);
    for m in &minutes {
        assert!(m.table_mean >= 0.9, "{m:?}");
        assert!(m.table_min >= 0.8, "{m:?}");
        assert!(m.connections_min >= 0.75, "{m:?}");
        assert_eq!(m.eclipsed, 0, "{m:?}");
    }
}

/// 300 nodes, tables of 100 (25 per source): full tables. Every 20th
/// node (15 of them) joins once the rest converged.
/// 300 nodes whose tables hold a third of the network, keeping entries
/// seen less than `min_evict_age_ms` before a newcomer.
fn full_tables(min_evict_age_ms: u64) -> Settings {
    let mut settings = Settings {
        nodes: 300,
        ..small(8)
    };
    settings.discovery.max_known_peers = 100;
    settings.discovery.max_known_peers_per_source = 25;
    settings.discovery.min_evict_age_ms = min_evict_age_ms;
    settings
}

fn joining_full_tables(min_evict_age_ms: u64) -> Vec<soma_sim::scenarios::JoinMinute> {
    soma_sim::scenarios::joining(full_tables(min_evict_age_ms), 12, 20, 2)
}

#[test]
fn nodes_joining_a_network_of_full_tables_are_known_to_a_fifth_of_it_within_a_minute() {
    // The cost of keeping young entries: under the default rule a joiner
    // takes the places of the oldest entries and is soon widely known;
    // keeping entries younger than 30 s leaves it almost nowhere, since in
    // a network without churn few entries grow that old.
    let default = joining_full_tables(Config::default().min_evict_age_ms);
    let kept = joining_full_tables(30_000);
    assert_eq!((default.len(), kept.len()), (2, 2));
    for (d, k) in default.iter().zip(&kept) {
        assert!(d.known_by_mean >= 0.2, "{d:?}");
        assert!(d.connections_mean >= 8.0, "{d:?}");
        assert!(k.known_by_mean < 0.1, "{k:?}");
    }
}

#[test]
fn churn_frees_too_few_places_for_newcomers_in_tables_that_keep_young_entries() {
    // The same trade in a network that keeps changing: 2 % of the nodes
    // replaced each minute. Departed peers' entries grow old enough to
    // give up, but too few of them, and not in the buckets searched, for
    // the newcomers: a minute after joining, a node is known by a tenth of
    // the network or less, against a fifth or more under the default.
    let churning = |age| soma_sim::scenarios::churn_joining(full_tables(age), 12, 3, 2.0);
    let default = churning(Config::default().min_evict_age_ms);
    let kept = churning(30_000);
    let sampled = |rows: &[soma_sim::scenarios::JoinMinute]| {
        rows.iter()
            .map(|m| (m.minute, m.joiners))
            .collect::<Vec<_>>()
    };
    // Six nodes join each minute; those of minutes 1 and 2 are sampled a
    // minute later, none of them stopped since.
    assert_eq!(sampled(&default), [(2, 6), (3, 6)]);
    assert_eq!(sampled(&kept), [(2, 6), (3, 6)]);
    for (d, k) in default.iter().zip(&kept) {
        assert!(d.known_by_mean >= 0.2, "{d:?}");
        assert!(k.known_by_mean < 0.1, "{k:?}");
        // Joiners fill their own tables either way: what they lack is a
        // place in the others'.
        assert_eq!((d.known_mean, k.known_mean), (100.0, 100.0), "{d:?} {k:?}");
    }
}

#[test]
fn new_commits_reach_every_node_through_height_queries_and_pushes() {
    // 2,000 commits at the seed nodes (the validators) of a converged
    // network of 60: every node syncs them all, with pushes and without;
    // the same seed gives the same spread.
    let runs = [(true, true), (true, false), (false, false)].map(|(push, hint)| HeightSettings {
        push,
        hint,
        ..HeightSettings::default()
    });
    let spreads = soma_sim::scenarios::heights(small(9), 12, 2_000, &runs);
    let (pushed, unhinted, queried) = (&spreads[0], &spreads[1], &spreads[2]);
    eprintln!("{pushed:?}");
    assert!(pushed.all_synced_ms.is_some(), "{pushed:?}");
    assert!(pushed.all_know_ms <= pushed.all_synced_ms, "{pushed:?}");
    // Every node fetched all 2,000 commits in batches of 400 at most:
    // 5 fetches each for the 58 that are not validators.
    assert_eq!(pushed.fetches, 58 * 5, "{pushed:?}");
    assert!(pushed.pushes_taken > 0 && pushed.pushes_taken <= pushed.pushes);
    assert_eq!(
        soma_sim::scenarios::heights(small(9), 12, 2_000, &runs),
        spreads
    );
    eprintln!("{queried:?}");
    assert!(queried.all_synced_ms.is_some(), "{queried:?}");
    assert_eq!((queried.pushes, queried.pushes_taken), (0, 0));
    // Pushes not taken bring rounds forward, at most one per node and
    // interval; without hints, none.
    let synced_s = pushed.all_synced_ms.unwrap().div_ceil(1_000);
    assert!(pushed.early_rounds > 0, "{pushed:?}");
    assert!(pushed.early_rounds <= 58 * synced_s, "{pushed:?}");
    assert_eq!((unhinted.early_rounds, queried.early_rounds), (0, 0));
    assert_eq!(unhinted.fetches, 58 * 5, "{unhinted:?}");
}

#[test]
fn a_network_converges_with_its_seeds_at_their_inbound_limit() {
    // 200 nodes start at once and dial the same three seeds, whose servers
    // hold 32 ordinary connections at most (the node's rules, scaled down):
    // the seeds close their longest-idle connection for each newcomer, and
    // every node still converges, since a new connection is asked for its
    // peers at once. The rules' clock is virtual: the same seed, the same
    // run.
    let config = soma_wire::inbound::Config {
        max: 40,
        reserved: 8,
        ..soma_wire::inbound::Config::default()
    };
    let settings = || Settings {
        inbound: Some(config.clone()),
        ..world(200, 5)
    };
    let c = convergence(settings(), 120);
    assert!(c.intervals.is_some(), "{c:?}");
    assert_eq!((c.known_min, c.known_median), (199, 199), "{c:?}");
    assert_eq!(c.inbound_most, 32, "{c:?}");
    assert!(c.inbound_evicted > 0, "{c:?}");
    assert_eq!(convergence(settings(), 120), c);
}

/// A converged network of 60 (2 validators) where every other node lacks
/// 2,000 commits, with 30 % of those nodes `hostile`.
fn catch_up_among(
    hostile: Option<Hostile>,
    seed: u64,
    recorded: Option<usize>,
) -> (SyncRun, Option<String>) {
    catch_up_among_share(hostile.map(|h| (h, 0.3)), seed, recorded)
}

/// [`catch_up_among`] with `hostile`'s share of the nodes given.
fn catch_up_among_share(
    hostile: Option<(Hostile, f64)>,
    seed: u64,
    recorded: Option<usize>,
) -> (SyncRun, Option<String>) {
    let (sim, validators, _) = converged_network(small(seed), 12);
    let settings = SyncSettings {
        commits: 2_000,
        hostile,
        ..SyncSettings::default()
    };
    catch_up(&sim, &validators, settings, seed, 600_000, recorded)
}

#[test]
fn a_network_far_behind_catches_up_through_the_state_sync_cores_among_hostile_peers() {
    let chain = soma_types::ChainId(soma_types::Digest([0; 32]));
    let slots = soma_actors::peer_heights::Config::new(chain, 0).max_fetches_per_peer;
    let (honest, _) = catch_up_among(None, 21, None);
    eprintln!("{honest:?}");
    assert_eq!((honest.followers, honest.synced), (58, 58));
    // Nothing is fetched twice: 10 batches of 200 commits (the default
    // size), each one commit fetch and one block fetch (800 blocks), plus
    // the refusals of busy validators, each asked again but those whose
    // hedge, gone on alone, answered.
    let batch = soma_actors::state_sync::DEFAULT_COMMIT_SYNC_BATCH_SIZE;
    assert_eq!(2_000 / batch, 10);
    let asked_again = honest.busy - honest.alone_answered;
    assert_eq!(honest.fetches, 58 * 10 * 2 + asked_again, "{honest:?}");
    assert!(honest.alone_answered <= honest.hedges_alone, "{honest:?}");
    assert_eq!((honest.timeouts, honest.invalid, honest.bans), (0, 0, 0));
    for hostile in [
        Hostile::Silent,
        Hostile::Liar,
        Hostile::Slow { delay_ms: 1_500 },
        Hostile::Creeping,
        Hostile::OneCommit,
        Hostile::Busy,
        Hostile::SilentOrOneCommit,
    ] {
        let (r, _) = catch_up_among(Some(hostile), 21, None);
        eprintln!("{hostile:?}: {r:?}");
        assert_eq!((r.followers, r.hostile), (41, 17), "{r:?}");
        assert_eq!(r.synced, r.followers, "every honest node synced: {r:?}");
        assert!(r.hostile_connections > 0, "{r:?}");
        // A hostile peer costs each node that dialled it at most the
        // fetches it may hold at once: then it ranks below every peer that
        // can serve, or is banned.
        let most = (slots * r.hostile_connections) as u64;
        match hostile {
            Hostile::Silent => {
                // A late fetch asks a second peer, and a hedge late on a
                // silent peer moves on to one not yet asked as soon as it
                // has a slot free: no fetch waits out its timeout here
                // (26 did, the last node syncing in 21.1 s instead of
                // 3.0 s, while a late hedge stayed on its silent peer).
                assert!(r.hedges > 0 && r.hedges_moved > 0, "{r:?}");
                assert_eq!((r.timeouts, r.invalid, r.bans), (0, 0, 0), "{r:?}");
            }
            Hostile::Liar => {
                assert!(r.invalid > 0 && r.invalid <= most, "{r:?}");
                assert_eq!((r.bans, r.timeouts), (r.invalid, 0));
            }
            Hostile::Slow { .. } => {
                assert!(r.hedges > 0, "{r:?}");
                assert_eq!((r.timeouts, r.invalid, r.bans), (0, 0, 0));
            }
            Hostile::Creeping | Hostile::OneCommit => {
                assert_eq!((r.timeouts, r.invalid, r.bans), (0, 0, 0));
            }
            Hostile::SilentOrOneCommit => {
                // Hedges of fetches silent peers hold, answered in part by
                // one-commit peers: each part is held while its silent
                // first peer has its time, and no fetch waits out its
                // timeout.
                assert!(r.parts_held > 0, "{r:?}");
                assert_eq!((r.timeouts, r.invalid, r.bans), (0, 0, 0), "{r:?}");
            }
            Hostile::Busy => {
                // Hedges refused as busy are asked of another peer.
                assert!(r.busy > 0 && r.hedges_asked_again > 0, "{r:?}");
                assert_eq!((r.timeouts, r.invalid, r.bans), (0, 0, 0));
            }
        }
    }
}

#[test]
fn a_catch_up_is_the_same_for_one_seed_and_another_for_another() {
    let (a, _) = catch_up_among(Some(Hostile::Silent), 31, None);
    let (b, _) = catch_up_among(Some(Hostile::Silent), 31, None);
    assert_eq!(a, b);
    let (c, _) = catch_up_among(Some(Hostile::Silent), 32, None);
    assert_ne!(a.digest, c.digest);
}

#[test]
fn a_state_sync_core_from_a_simulated_catch_up_replays_through_the_replay_harness() {
    // The first node that syncs (validators and hostile nodes do not, so
    // they record nothing) records its StateSync core.
    let (run, trace) = (2..60)
        .map(|node| catch_up_among(Some(Hostile::Liar), 21, Some(node)))
        .find_map(|(run, trace)| Some((run, trace?)))
        .expect("a node syncs");
    let (report, rewritten) = replay_text(&trace, false).expect("the trace replays bit-exact");
    assert_eq!(rewritten, trace);
    // At least one input per batch fetched and applied.
    assert!(report.inputs >= 3 * 20, "{report:?} {run:?}");
    assert_eq!(report.restarts, 0, "{report:?}");
}

/// Runs `sim` an interval at a time, at most `intervals` of them, until
/// node `index` knows every other node; whether it did.
fn until_it_knows_everyone(sim: &mut Sim, index: usize, intervals: u64) -> bool {
    let interval = sim.settings().discovery.interval_ms;
    let others = sim.len() - 1;
    for _ in 0..intervals {
        if sim.known_by(index).len() == others {
            return true;
        }
        sim.run_until(sim.now() + interval);
    }
    sim.known_by(index).len() == others
}

#[test]
fn a_stopped_node_holds_no_table_and_a_restart_learns_the_network_again() {
    let mut sim = Sim::new(small(9), None);
    // Stopped before it ever ran: it starts with the core it was made with.
    sim.stop(5);
    sim.start_all();
    assert!(until_it_knows_everyone(&mut sim, 7, 30));
    assert!(until_it_knows_everyone(&mut sim, 5, 30));
    // A departed process keeps nothing: a long run under churn does not
    // carry every departed node's table.
    sim.stop(7);
    assert_eq!(sim.known_by(7), Vec::<usize>::new());
    sim.start(7);
    assert!(until_it_knows_everyone(&mut sim, 7, 30));
}

#[test]
fn peers_answering_just_before_the_hedge_delay_do_not_stretch_it_for_everyone() {
    // 30 % of the nodes serve every fetch validly but hold each answer
    // until a millisecond before the caller would ask another peer (they
    // are told its hedge delay). With one average of every answer time,
    // each such answer raised the delay of every fetch by up to three
    // quarters: over these five networks the last node synced 3.9 times
    // as late as without them. With the lower median of per-peer
    // averages, only where such peers are most of those serving a node.
    let (mut honest, mut creeping) = (0, 0);
    for seed in 20..25 {
        let (h, _) = catch_up_among(None, seed, None);
        let (c, _) = catch_up_among(Some(Hostile::Creeping), seed, None);
        assert_eq!((c.followers, c.synced), (41, 41), "{c:?}");
        assert_eq!((c.timeouts, c.invalid, c.bans), (0, 0, 0), "{c:?}");
        honest += h.all_synced_ms.expect("every honest node synced");
        creeping += c.all_synced_ms.expect("every honest node synced");
    }
    // 1.72 times here.
    assert!(
        creeping * 2 <= honest * 5,
        "{creeping} ms against {honest} ms"
    );
}

#[test]
fn peers_answering_each_commit_fetch_with_one_commit_slow_no_node_by_more_than_a_tenth() {
    // Half the nodes serve every fetch, but answer each commit fetch at
    // once with its first commit alone (legal: an answer may end at any
    // commit its server can certify). Every honest node syncs, with no
    // timeout, ban or invalid answer, the median and the last node at
    // most a tenth later than without them. Their commit answers rank
    // them apart from their block answers, by their share of what was
    // asked, and a validator refusing as busy is asked again within a
    // second; before, the last node here took 3.8 times as long, leased
    // them every commit fetch at a commit per round trip while the
    // validators were ranked failing for their refusals.
    no_node_later_by_more_than_a_tenth(Hostile::OneCommit);
}

/// Over five 60-node networks with half the nodes `hostile`: every honest
/// node syncs, with no timeout, ban or invalid answer, and the sums of the
/// median and of the last node's times are at most a tenth above those
/// of the same networks without them.
fn no_node_later_by_more_than_a_tenth(hostile: Hostile) {
    let times = |r: &SyncRun| {
        let median = r.median_synced_ms.expect("every honest node synced");
        (median, r.all_synced_ms.expect("every honest node synced"))
    };
    let (mut honest, mut among) = ((0, 0), (0, 0));
    for seed in 20..25 {
        let (h, _) = catch_up_among(None, seed, None);
        let (c, _) = catch_up_among_share(Some((hostile, 0.5)), seed, None);
        assert_eq!((c.followers, c.synced), (29, 29), "{c:?}");
        assert_eq!((c.timeouts, c.invalid, c.bans), (0, 0, 0), "{c:?}");
        let (h, c) = (times(&h), times(&c));
        honest = (honest.0 + h.0, honest.1 + h.1);
        among = (among.0 + c.0, among.1 + c.1);
    }
    eprintln!("{hostile:?}, median and last: {among:?} ms against {honest:?} ms");
    assert!(
        among.0 * 10 <= honest.0 * 11,
        "{among:?} against {honest:?}"
    );
    assert!(
        among.1 * 10 <= honest.1 * 11,
        "{among:?} against {honest:?}"
    );
}

#[test]
fn peers_refusing_every_fetch_as_busy_slow_no_node_by_more_than_a_tenth() {
    // Half the nodes claim every commit and refuse every fetch at once as
    // busy, which proves no lie. Every honest node syncs, with no timeout,
    // ban or invalid answer, the median and the last node at most a tenth
    // later than without them (0.75 and 0.87 times here: fewer honest
    // nodes compete for the validators). A refusal costs its fetch a
    // pause of at most a tick: retried after a 2 s pause instead, the
    // last node here took 1.7 times as long. Among these saturated
    // validators neither the hand-on of refusals at the head nor the
    // doubling while of a refusing peer moves the figures (each switched
    // off, the test still passes); the loopback test
    // `a_fetch_the_pipeline_waits_on_refused_as_busy_goes_at_once_to_a_free_peer`
    // proves the hand-on.
    no_node_later_by_more_than_a_tenth(Hostile::Busy);
}
