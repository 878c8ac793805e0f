//! A node serving its chain, as a `soma-p2p run` process, attacked from
//! this test's process (`soma_testkit::attack`) while an honest node,
//! another `soma-p2p run` process, syncs the whole chain from it.
//!
//! The attacked node does not exempt loopback callers, so each attacking
//! host, bound to an address of 127.0.0.0/8 of its own, meets the caps a
//! remote host would. Each attack starts first; the honest node starts
//! once the attack has reached its aim (every fetch slot held, the host's
//! whole connection share held, the hammerer's allowance used up, every
//! fresh identity having called in). The honest node must then sync the
//! whole chain from the attacked node alone while the attack goes on, the
//! attacked node's peak memory must stay within what its settings allow,
//! and what the node did to the attack is checked exactly. One more test
//! uses an unread answer only to hold the node's drain while it stops, and
//! checks that a second SIGTERM then ends the process at once.

use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use soma_chain::{Chain, ChainBuilder};
use soma_testkit::attack::{self, Target, Unread};
use soma_types::{Committee, KeyPair, PeerId, SignedNodeInfo, codec};
use soma_wire::proto;
use soma_wire::tls::NodeIdentity;

mod common;
use common::*;

/// Commits of the chain the attacked node serves.
const TIP: u64 = 600;
/// Validators of the genesis; only the first one runs, as the attacked node.
const VALIDATORS: u16 = 4;
/// A safety net on each wait; each test takes far less.
const PATIENCE: Duration = Duration::from_secs(120);
/// The attacked node's send deadline.
const SEND_TIMEOUT: Duration = Duration::from_secs(2);
/// The never-reading test's, longer than the honest sync.
const LONG_SEND_TIMEOUT: Duration = Duration::from_secs(120);
/// Its fetch slots, in all and per caller.
const FETCHES: usize = 32;
const FETCHES_PER_PEER: usize = 2;
/// Its bytes of unsent answers per connection.
const BUFFERED_PER_CONNECTION: u64 = 4 << 20;
/// Its inbound connections: in all, reserved, per address, per /24.
const INBOUND: usize = 64;
const RESERVED: usize = 8;
const PER_IP: usize = 8;
const PER_PREFIX: usize = 32;
/// Its discovery table: in all, per source, per prefix.
const KNOWN: usize = 16;
const PER_SOURCE: usize = 4;

/// The attacked node, running, and what the honest node needs to reach it.
struct Attacked {
    dir: tempfile::TempDir,
    chain: Arc<Chain>,
    committee: Committee,
    node: Spawned,
    address: String,
    metrics: String,
    /// Its peak memory once serving, before any attack.
    idle_peak: u64,
}

impl Attacked {
    /// Starts validator 0 of a fresh local network holding the whole
    /// chain, with the test's settings and `lines`, and waits until it
    /// serves.
    fn start(lines: &[&str]) -> Attacked {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let port = free_ports(VALIDATORS);
        let genesis = local_genesis(d, VALIDATORS, port, 10_000);
        let committee = genesis_committee(&genesis);
        let chain = Arc::new(ChainBuilder::new(chain_config(&genesis)).build(TIP));
        hold(
            &d.join("validator-0/data/chain.redb"),
            &committee,
            &chain,
            1..=TIP,
        );
        let address = format!("127.0.0.1:{port}");
        let metrics = format!("127.0.0.1:{}", free_port());
        let settings = [
            format!("metrics-address = \"{metrics}\""),
            "inbound-exempt-loopback = false".to_string(),
            format!("send-timeout = \"{}ms\"", SEND_TIMEOUT.as_millis()),
            format!("max-buffered-bytes-per-connection = {BUFFERED_PER_CONNECTION}"),
            format!("max-concurrent-fetches = {FETCHES}"),
            format!("max-concurrent-fetches-per-peer = {FETCHES_PER_PEER}"),
            format!("max-inbound-connections = {INBOUND}"),
            format!("reserved-inbound-connections = {RESERVED}"),
            format!("max-inbound-per-ip = {PER_IP}"),
            format!("max-inbound-per-prefix = {PER_PREFIX}"),
            "timeout = \"2s\"".to_string(),
            "tls-handshake-timeout = \"1s\"".to_string(),
            "inbound-idle-timeout = \"3s\"".to_string(),
            format!("max-known-peers = {KNOWN}"),
            format!("max-known-peers-per-source = {PER_SOURCE}"),
            format!("max-known-peers-per-prefix = {PER_SOURCE}"),
            format!("max-new-peers-per-source-per-interval = {PER_SOURCE}"),
        ];
        let all: Vec<&str> = settings
            .iter()
            .map(String::as_str)
            .chain(lines.iter().copied())
            .collect();
        let config = node_config(d, "validator-0", port, &[], &all);
        let log = d.join("validator-0.log");
        let mut node = run_node(&config, &log);
        wait_or_report(
            "the attacked node to serve",
            PATIENCE,
            || {
                node.assert_running(&log);
                height(&address) == Some(TIP)
            },
            || std::fs::read_to_string(&log).unwrap_or_default(),
        );
        let idle_peak = soma_testkit::peak_rss_of(node.child.id()).unwrap();
        Attacked {
            dir,
            chain,
            committee,
            node,
            address,
            metrics,
            idle_peak,
        }
    }

    fn target(&self) -> Target {
        Target {
            address: self.address.parse().unwrap(),
            peer_id: None,
        }
    }

    /// The attack's counts and the node's series, for a failed wait.
    fn report(&self, tally: &attack::Tally) -> String {
        let series = metrics(&self.metrics).unwrap_or_default();
        let series: Vec<&str> = series.lines().filter(|l| l.starts_with("soma_")).collect();
        format!("{tally:?}\n{}", series.join("\n"))
    }

    fn metric(&self, name: &str) -> f64 {
        metric(&self.metrics, name).unwrap_or(0.0)
    }

    /// Starts a fresh honest node seeded with the attacked one alone and
    /// waits until it holds the whole chain; returns how long that took,
    /// its store, once it stopped, and its peer id.
    fn sync_honest(&self) -> (Duration, PathBuf, String) {
        let d = self.dir.path();
        let out = soma(&["keygen", "--out", d.join("honest/keys").to_str().unwrap()]);
        assert!(out.status.success(), "{}", stderr(&out));
        let peer_id = field(&stdout(&out), "peer id").unwrap().to_owned();
        let port = free_port();
        let config = node_config(d, "honest", port, std::slice::from_ref(&self.address), &[]);
        let log = d.join("honest.log");
        let mut honest = run_node(&config, &log);
        let started = Instant::now();
        let address = format!("127.0.0.1:{port}");
        wait_or_report(
            "the honest node to sync the whole chain",
            PATIENCE,
            || height(&address) == Some(TIP),
            || {
                let log = std::fs::read_to_string(&log).unwrap_or_default();
                let series = metrics(&self.metrics).unwrap_or_default();
                format!("honest node's log:\n{log}\nattacked node's metrics:\n{series}")
            },
        );
        let took = started.elapsed();
        kill(honest.pid(), Signal::SIGTERM).unwrap();
        assert!(
            honest
                .wait_for(PATIENCE)
                .expect("the honest node stops")
                .success()
        );
        (took, d.join("honest/data/chain.redb"), peer_id)
    }

    /// Checks the honest node's store is the chain, and the attacked
    /// node's peak memory is within `allowed` over its peak when idle;
    /// stops the attacked node.
    fn finish(mut self, store: &Path, allowed: u64) -> u64 {
        assert_eq!(check_store(store, &self.committee, &self.chain), TIP);
        let grown = soma_testkit::peak_rss_of(self.node.child.id())
            .unwrap()
            .saturating_sub(self.idle_peak);
        assert!(
            grown <= allowed,
            "the attacked node's peak memory grew by {} KiB, over the {} KiB its settings allow",
            grown >> 10,
            allowed >> 10
        );
        kill(self.node.pid(), Signal::SIGTERM).unwrap();
        assert!(
            self.node
                .wait_for(PATIENCE)
                .expect("the attacked node stops")
                .success()
        );
        grown
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

/// Memory the honest node's own sync may cost the attacked node: its
/// answers in flight on its one connection.
const HONEST_ALLOWANCE: u64 = BUFFERED_PER_CONNECTION + (16 << 20);

#[test]
fn clients_that_never_read_from_sixteen_identities_do_not_stop_an_honest_sync() {
    // Neither the send deadline nor the idle timeout frees a slot while
    // the honest node syncs: only a newer fetch taking a stalled answer's
    // slot can. (The benchmark's attackers also ask again at each
    // deadline; see docs/reliability.md.)
    let attacked = Attacked::start(&[
        &format!("send-timeout = \"{}s\"", LONG_SEND_TIMEOUT.as_secs()),
        "inbound-idle-timeout = \"1h\"",
    ]);
    let rt = runtime();
    // Each identity holds its two slots with a FetchBlocks on one
    // connection and a FetchCommits on another (one unread answer fills a
    // connection's budget of unsent bytes).
    let identities = FETCHES / FETCHES_PER_PEER;
    let blocks: Vec<proto::BlockRef> = (1..=100)
        .flat_map(|i| attacked.chain.blocks_of(i).iter())
        .map(|b| b.reference().into())
        .collect();
    let unread = |fetch_blocks, fetch_commits| Unread {
        blocks: Vec::clone(&blocks),
        commits: proto::FetchCommitsRequest {
            start: 1,
            end: 100,
            ..Default::default()
        },
        fetch_blocks,
        fetch_commits,
        hold: LONG_SEND_TIMEOUT + Duration::from_millis(50),
    };
    let target = attacked.target();
    let attack = rt.block_on(attack::never_reading(target, identities, 0, unread(1, 0)));
    let commits_attack = rt.block_on(attack::never_reading(
        target,
        identities,
        identities as u8,
        unread(0, 1),
    ));
    // Every fetch slot is held by a client that never reads.
    wait_or_report(
        "every fetch slot held",
        PATIENCE,
        || attacked.metric("soma_fetches_in_flight") == FETCHES as f64,
        || attacked.report(&attack.tally()),
    );
    assert_eq!(attack.tally().answered, 0);

    let (took, store, _) = attacked.sync_honest();
    // The honest fetches took their slots from stalled answers, and from
    // nothing else: no answer reached its deadline.
    let report = || attacked.report(&attack.tally());
    let stalled = attacked.metric("soma_responses_cut_total{reason=\"stalled\"}");
    assert!(stalled > 0.0, "honest sync in {took:?}\n{}", report());
    let cut = attacked.metric("soma_responses_cut_total{reason=\"deadline\"}");
    assert_eq!(cut, 0.0, "{}", report());
    let tally = attack.stop();
    let commits_tally = commits_attack.stop();
    // Nothing unread was ever answered in full.
    assert_eq!(
        tally.answered + commits_tally.answered,
        0,
        "{tally:?} {commits_tally:?}"
    );
    // Each connection holds at most its budget of unsent answers.
    let allowed = 2 * identities as u64 * BUFFERED_PER_CONNECTION + HONEST_ALLOWANCE;
    let grown = attacked.finish(&store, allowed);
    println!(
        "never-reading clients: honest sync in {took:?}; {tally:?}; {cut} cut at the \
         deadline, {stalled} for newer fetches; peak memory +{} KiB",
        grown >> 10
    );
}

/// Stops a node with `first` while an answer no one reads keeps its
/// server draining (for up to its 4 s), then sends `second` once it says
/// it is stopping: its exit status, its log, and whether the unread answer
/// was ever answered whole.
fn signalled_while_draining(first: Signal, second: Signal) -> (ExitStatus, String, bool) {
    let mut attacked = Attacked::start(&[
        &format!("send-timeout = \"{}s\"", LONG_SEND_TIMEOUT.as_secs()),
        "inbound-idle-timeout = \"1h\"",
    ]);
    let rt = runtime();
    let blocks: Vec<proto::BlockRef> = (1..=100)
        .flat_map(|i| attacked.chain.blocks_of(i).iter())
        .map(|b| b.reference().into())
        .collect();
    let unread = Unread {
        blocks,
        commits: proto::FetchCommitsRequest::default(),
        fetch_blocks: 1,
        fetch_commits: 0,
        hold: LONG_SEND_TIMEOUT,
    };
    let attack = rt.block_on(attack::never_reading(attacked.target(), 1, 0, unread));
    wait_or_report(
        "the unread answer to hold its fetch slot",
        PATIENCE,
        || attacked.metric("soma_fetches_in_flight") == 1.0,
        || attacked.report(&attack.tally()),
    );
    let log_path = attacked.dir.path().join("validator-0.log");
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    kill(attacked.node.pid(), first).unwrap();
    wait_or_report(
        "the node to say it is stopping",
        PATIENCE,
        || log().contains("a second interrupt or terminate signal exits at once"),
        log,
    );
    // The unread answer's call is still held: the node is draining.
    assert_eq!(attack.tally().cut, 0, "{}", log());
    kill(attacked.node.pid(), second).unwrap();
    let exit = attacked
        .node
        .wait_for(PATIENCE)
        .unwrap_or_else(|| panic!("the node did not exit\n{}", log()));
    let answered = attack.stop().answered > 0;
    (exit, log(), answered)
}

#[test]
fn a_second_sigterm_while_an_unread_answer_holds_the_drain_exits_at_once() {
    let (exit, log, answered) = signalled_while_draining(Signal::SIGTERM, Signal::SIGTERM);
    // The shell's code for SIGTERM, from the node's own exit: the drain,
    // had it ended first, would have exited 0.
    assert_eq!(exit.code(), Some(143), "{exit}\n{log}");
    assert!(
        log.contains("second signal: exiting without waiting for the node to stop"),
        "{log}"
    );
    assert!(!answered);
}

/// A closing terminal often sends two hang-ups (the shell forwards one,
/// the kernel sends another): the second does not cut the stop short.
#[test]
fn a_second_hangup_while_the_node_drains_lets_it_stop_cleanly() {
    let (exit, log, _) = signalled_while_draining(Signal::SIGHUP, Signal::SIGHUP);
    assert_eq!(exit.code(), Some(0), "{exit}\n{log}");
    assert!(log.contains("hung up"), "{log}");
    assert!(!log.contains("second signal"), "{log}");
}

#[test]
fn one_host_opening_twice_the_inbound_connections_does_not_stop_an_honest_sync() {
    let attacked = Attacked::start(&[]);
    let rt = runtime();
    let _guard = rt.enter();
    let attack = attack::connection_flood(attacked.target(), 0, 2 * INBOUND);
    // The host holds its whole share, not one more, and is refused the rest.
    wait_for(
        "the host's share held and the rest refused",
        PATIENCE,
        || {
            attacked.metric("soma_inbound_connections") == PER_IP as f64
                && attacked.metric("soma_inbound_connections_refused_total{reason=\"per_ip\"}")
                    > 0.0
        },
    );
    let (took, store, _) = attacked.sync_honest();
    // The node cut both kinds of squatter: idle after the handshake and
    // never finishing it.
    wait_or_report(
        "idle and stalled connections closed",
        PATIENCE,
        || {
            attacked.metric("soma_inbound_connections_closed_total{reason=\"idle\"}") > 0.0
                && attacked
                    .metric("soma_inbound_connections_closed_total{reason=\"handshake_timeout\"}")
                    > 0.0
        },
        || attacked.report(&attack.tally()),
    );
    let tally = attack.stop();
    let refused = attacked.metric("soma_inbound_connections_refused_total{reason=\"per_ip\"}");
    // Nothing but the host's own cap: no slot beyond it was ever refused
    // for being full.
    assert_eq!(
        attacked.metric("soma_inbound_connections_refused_total{reason=\"full\"}"),
        0.0
    );
    let grown = attacked.finish(&store, HONEST_ALLOWANCE);
    println!(
        "connection flood: honest sync in {took:?}; {tally:?}; {refused} refused per ip; \
         peak memory +{} KiB",
        grown >> 10
    );
}

#[test]
fn an_anonymous_client_hammering_cheap_calls_does_not_stop_an_honest_sync() {
    let attacked = Attacked::start(&[
        "cheap-calls-per-second = 20",
        "cheap-call-burst = 40",
        "known-peers-calls-per-minute = 30",
        "known-peers-burst = 5",
    ]);
    let rt = runtime();
    let started = Instant::now();
    let attack = rt.block_on(attack::hammer(attacked.target(), 0));
    // Its allowance is used up: calls are being refused.
    wait_for("the hammerer refused", PATIENCE, || {
        attack.tally().refused > 0
    });
    let (took, store, _) = attacked.sync_honest();
    let tally = attack.stop();
    // What one connection may have: both bursts, then the refill rates.
    let seconds = started.elapsed().as_secs_f64().ceil();
    let allowance = (40.0 + 20.0 * seconds) + (5.0 + 30.0 * seconds / 60.0);
    assert!(
        tally.answered as f64 <= allowance,
        "{tally:?} in {seconds} s, allowance {allowance}"
    );
    // Every call that was not answered was refused: none failed otherwise.
    assert_eq!(tally.cut, 0, "{tally:?}");
    let grown = attacked.finish(&store, HONEST_ALLOWANCE);
    println!(
        "hammer: honest sync in {took:?}; {tally:?}; peak memory +{} KiB",
        grown >> 10
    );
}

#[test]
fn a_thousand_identities_and_a_peer_full_of_fakes_do_not_eclipse_the_node() {
    let rt = runtime();
    // The malicious peer, reached as a seed: 200 of its 1,000 fakes in
    // every answer, stamped 25 s ahead, at a host of their own.
    let fake_peer = rt.block_on(attack::serve_fake_infos(
        KeyPair::from_seed([66; 32]),
        1,
        1_000,
        "127.11.0.1:9",
        25_000,
        200,
    ));
    let seed = format!(
        "seed-peers = [{{ address = \"{}\", peer-id = \"{}\" }}]",
        fake_peer.address,
        hex::encode(fake_peer.peer_id.0)
    );
    let attacked = Attacked::start(&[&seed]);
    let target = attacked.target();
    let sybils = rt.block_on(async {
        let flood = attack::sybil_infos(target, 0, 1_000, "127.10.0.1:9".into(), 25_000, 16);
        flood.finished().await
    });
    assert_eq!(sybils.sent, 1_000);
    // The malicious peer has answered many times since.
    let answers = fake_peer.answers();
    wait_for("the malicious peer asked again", PATIENCE, || {
        fake_peer.answers() >= answers + 10
    });

    // An honest node syncs from the attacked one and is learnt by it.
    let (_, store, honest) = attacked.sync_honest();
    let honest = peer_id_from_hex(&honest);
    let known = rt.block_on(known_peers(target));
    let sybil_ids: Vec<PeerId> = (0..1_000)
        .map(|i| PeerId::from(attack::fresh_key(2, i).public()))
        .collect();
    let from_sybils = known.iter().filter(|p| sybil_ids.contains(p)).count();
    let from_fakes = known
        .iter()
        .filter(|p| fake_peer.fakes.contains(p) || **p == fake_peer.peer_id)
        .count();
    assert!(known.contains(&honest), "{known:?}");
    // One bucket of connect-back infos for the host of the thousand
    // identities, one for the malicious peer's answers (itself included).
    assert!(from_sybils <= PER_SOURCE, "{from_sybils} sybils known");
    assert!(from_fakes <= PER_SOURCE + 1, "{from_fakes} fakes known");
    assert_eq!(known.len(), from_sybils + from_fakes + 1, "{known:?}");
    attacked.finish(&store, HONEST_ALLOWANCE);
    println!(
        "eclipse: {} known, {from_sybils} connect-back sybils, {from_fakes} from the malicious \
         peer, the honest node kept",
        known.len()
    );
}

/// A peer id from its hex form, as `soma-p2p keygen` prints it.
fn peer_id_from_hex(hex_id: &str) -> PeerId {
    PeerId(hex::decode(hex_id).unwrap().try_into().unwrap())
}

/// The peers a fresh caller is told of by `target`.
async fn known_peers(target: Target) -> Vec<PeerId> {
    let key = attack::fresh_key(9, 0);
    let identity = NodeIdentity::generate(&key).unwrap();
    let mut client = attack::client(target, attack::host(200), Some(&identity), None)
        .await
        .unwrap();
    let answer = client
        .get_known_peers(proto::GetKnownPeersRequest::default())
        .await
        .unwrap()
        .into_inner();
    answer
        .known_peers
        .iter()
        .map(|b| {
            codec::decode::<SignedNodeInfo>(b, 4096)
                .unwrap()
                .info
                .peer_id
        })
        .collect()
}
