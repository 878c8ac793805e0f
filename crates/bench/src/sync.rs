//! Catch-up sync over loopback against its two limits, and how it scales with
//! serving peers and committee size.
//!
//! The crypto limit is every signature of the synced blocks through raw
//! `verify_batch`, batches prepared beforehand, on all cores. The transport
//! limit is the same requests a syncing node makes (commit batches, then
//! their blocks in chunks, as many at once as the node runs) answered by the
//! bare tonic service over the same mutual TLS, with nothing decoded.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use rayon::prelude::*;
use soma_actors::{P2pConfig, P2pHandle};
use soma_chain::{Chain, ChainBuilder, ChainConfig};
use soma_store::{ConsensusStore, MemStore};
use soma_types::Limits;
use soma_types::verify::{SignatureBatch, check_block};
use soma_wire::proto::{self, p2p_client::P2pClient};
use soma_wire::tls::{self, NodeIdentity};

use crate::bare::Bare;
use crate::report::{Cell, Section};
use crate::{Size, runtime};

/// A chain of `validators` with blocks of 10 signed transactions.
pub fn chain(validators: usize, commits: u64) -> Arc<Chain> {
    chain_of_payloads(validators, commits, ChainConfig::default().payload_bytes)
}

/// Payload of each transaction in the chain of large blocks: blocks of 10
/// transactions of about 20 KB.
const LARGE_PAYLOAD_BYTES: usize = 1_900;

/// A chain of `validators` with blocks of 10 signed transactions of
/// `payload_bytes` each.
fn chain_of_payloads(validators: usize, commits: u64, payload_bytes: usize) -> Arc<Chain> {
    Arc::new(
        ChainBuilder::new(ChainConfig {
            transactions_per_block: 10,
            payload_bytes,
            ..ChainConfig::validators(validators)
        })
        .build(commits),
    )
}

/// Every signature of `chain`'s blocks (and their transactions), in
/// batches of 100 blocks' worth, as the Verifier would check them.
fn signature_batches(chain: &Chain) -> Vec<SignatureBatch> {
    let limits = Limits::default();
    let blocks: Vec<_> = (1..=chain.tip()).flat_map(|i| chain.blocks_of(i)).collect();
    blocks
        .chunks(100)
        .map(|chunk| {
            let mut batch = SignatureBatch::default();
            for b in chunk {
                let committee = chain
                    .committee(b.block().epoch)
                    .expect("a built chain has every epoch's committee");
                check_block(&b.to_unverified(), committee, &limits, Some(&mut batch))
                    .expect("a built block passes every rule");
            }
            batch
        })
        .collect()
}

/// The signatures of every synced block of `chain` and the time raw
/// `verify_batch` takes for them on all cores (the global rayon pool).
pub fn crypto_limit(chain: &Chain) -> (usize, Duration) {
    let batches = signature_batches(chain);
    (signatures(&batches), verify_all(&batches))
}

/// Signatures in `batches`.
fn signatures(batches: &[SignatureBatch]) -> usize {
    batches.iter().map(SignatureBatch::len).sum()
}

/// The time raw `verify_batch` takes for `batches` on all cores.
fn verify_all(batches: &[SignatureBatch]) -> Duration {
    let t = Instant::now();
    batches
        .par_iter()
        .for_each(|b| b.verify().expect("built signatures verify"));
    t.elapsed()
}

/// The time plain ed25519-dalek `verify_batch` (cofactorless, so its
/// verdict on torsion components depends on the batch: the rule the
/// project used before) takes for the same signatures as
/// [`crypto_limit`], batches prepared beforehand, on all cores: what the
/// project's signature rule costs against it.
pub fn previous_rule(chain: &Chain) -> Duration {
    type Prepared = (
        Vec<[u8; 48]>,
        Vec<ed25519_dalek::Signature>,
        Vec<ed25519_dalek::VerifyingKey>,
    );
    let batches: Vec<Prepared> = signature_batches(chain)
        .iter()
        .map(|batch| {
            let mut prepared: Prepared = (Vec::new(), Vec::new(), Vec::new());
            for (key, message, signature) in batch.entries() {
                prepared.0.push(*message);
                prepared
                    .1
                    .push(ed25519_dalek::Signature::from_bytes(signature));
                prepared
                    .2
                    .push(ed25519_dalek::VerifyingKey::from_bytes(key).expect("built keys decode"));
            }
            prepared
        })
        .collect();
    let t = Instant::now();
    batches.par_iter().for_each(|(messages, signatures, keys)| {
        let messages: Vec<&[u8]> = messages.iter().map(|m| &m[..]).collect();
        ed25519_dalek::verify_batch(&messages, signatures, keys).expect("built signatures verify");
    });
    t.elapsed()
}

/// What moving the chain through the bare service took.
pub struct Transport {
    /// Wall time.
    pub elapsed: Duration,
    /// Bytes of blocks received (what the node's MB/s counts).
    pub block_bytes: u64,
}

/// The transport limit: the requests a node syncing `chain` from `peers`
/// connections makes, answered by bare services, `parallel` at once.
pub fn transport_limit(chain: &Arc<Chain>, peers: usize, config: &P2pConfig) -> Transport {
    let server = runtime(2);
    let bare = Bare::new(chain.clone(), config.grpc.max_fetch_response_bytes);
    let servers: Vec<_> = (0..peers)
        .map(|i| {
            bare.clone().serve(
                &server,
                &soma_types::KeyPair::from_seed([150 + i as u8; 32]),
            )
        })
        .collect();
    let sync = &config.state_sync;
    let jobs: Vec<_> = chain
        .batch_ranges(sync.commit_sync_batch_size)
        .into_iter()
        .map(|range| {
            let refs: Vec<proto::BlockRef> = range
                .clone()
                .flat_map(|i| chain.blocks_of(i))
                .map(|b| b.reference().into())
                .collect();
            (range, refs)
        })
        .collect();
    let chunk = sync.max_blocks_per_fetch;
    let parallel = sync.parallel_fetches;
    let client = runtime(2);
    client.block_on(async move {
        let identity =
            NodeIdentity::generate(&soma_types::KeyPair::from_seed([149; 32])).expect("identity");
        let mut clients = Vec::new();
        for (address, peer) in &servers {
            let (channel, _) = tls::connect(
                address,
                Some(&identity),
                Some(*peer),
                Duration::from_secs(5),
            )
            .await
            .expect("the bare service accepts");
            clients.push(P2pClient::new(channel).max_decoding_message_size(usize::MAX));
        }
        let start = Instant::now();
        let bytes: Vec<u64> = futures::stream::iter(jobs.into_iter().enumerate())
            .map(|(n, (range, refs))| {
                let mut client = clients[n % clients.len()].clone();
                async move {
                    let commits = client
                        .fetch_commits(proto::FetchCommitsRequest {
                            start: *range.start(),
                            end: *range.end(),
                            ..Default::default()
                        })
                        .await
                        .expect("commits served")
                        .into_inner();
                    assert_eq!(
                        commits.commits.len() as u64,
                        range.end() - range.start() + 1
                    );
                    let mut bytes = 0;
                    for refs in refs.chunks(chunk) {
                        let mut stream = client
                            .fetch_blocks(proto::FetchBlocksRequest {
                                refs: refs.to_vec(),
                                ..Default::default()
                            })
                            .await
                            .expect("blocks served")
                            .into_inner();
                        while let Some(response) = stream.next().await {
                            let response = response.expect("a chunk");
                            bytes += response.blocks.iter().map(|b| b.len() as u64).sum::<u64>();
                        }
                    }
                    bytes
                }
            })
            .buffer_unordered(parallel)
            .collect()
            .await;
        Transport {
            elapsed: start.elapsed(),
            block_bytes: bytes.iter().sum(),
        }
    })
}

/// One catch-up: the node's time and what its status reported.
pub struct CatchUp {
    /// From the node's start to its watermark at the tip.
    pub elapsed: Duration,
    /// Bytes of blocks fetched.
    pub bytes: u64,
    /// Sync workers restarted.
    pub restarts: u64,
}

/// A fresh node (on a MemStore) catching up `chain` from `peers`.
pub async fn catch_up(chain: &Chain, peers: &[P2pHandle], key: u8, signatures: bool) -> CatchUp {
    let config = P2pConfig {
        seed_peers: soma_testkit::seeds(&peers.iter().collect::<Vec<_>>()),
        verify_synced_block_signatures: signatures,
        ..P2pConfig::default()
    };
    let store: Arc<dyn ConsensusStore> = Arc::new(MemStore::new(chain.genesis()));
    let start = Instant::now();
    let node = soma_testkit::node(chain, key, config, store);
    soma_testkit::wait_applied(&node, chain.tip(), Duration::from_secs(1_800)).await;
    let elapsed = start.elapsed();
    let status = node.sync_status().await.expect("the node runs");
    node.shutdown().await;
    CatchUp {
        elapsed,
        bytes: status.bytes_fetched,
        restarts: status.restarts,
    }
}

/// CPU the process has used so far, all threads (user and system).
fn process_cpu() -> Duration {
    // SAFETY: `getrusage` only writes the struct it is given.
    let mut usage = unsafe { std::mem::zeroed::<libc::rusage>() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let time = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    time(usage.ru_utime) + time(usage.ru_stime)
}

/// `soma-bench catch-ups`: a chain of `commits` caught up `times` times
/// in a row by a fresh node on a MemStore from the same 3 validators,
/// each catch-up's time (to the tip) and CPU (to the node's shutdown,
/// which drops its store) printed, then their medians.
pub fn catch_ups(times: usize, commits: u64, signatures: bool) {
    let built = Instant::now();
    let chain = chain(4, commits);
    eprintln!(
        "chain of {commits} commits, {} blocks, built in {:.1}s; block signatures {}",
        chain.block_count(),
        built.elapsed().as_secs_f64(),
        if signatures { "checked" } else { "off" }
    );
    let rt = runtime(2);
    let (mut walls, mut cpus) = (Vec::new(), Vec::new());
    rt.block_on(async {
        let peers = validators(&chain, 3);
        let abandoned = || peers.iter().map(P2pHandle::fetches_abandoned).sum::<u64>();
        for i in 0..times {
            let cpu = process_cpu();
            let dropped = abandoned();
            // Keys of their own, past the validators' and the limits'.
            let run = catch_up(&chain, &peers, 100 + (i % 100) as u8, signatures).await;
            let cpu = process_cpu().saturating_sub(cpu);
            println!(
                "catch-up {i}: {:.3} s, {:.3} s of CPU, {} worker restarts, \
                 {} fetches dropped unread at the validators",
                run.elapsed.as_secs_f64(),
                cpu.as_secs_f64(),
                run.restarts,
                abandoned() - dropped
            );
            walls.push(run.elapsed);
            cpus.push(cpu);
        }
        stop(peers).await;
    });
    let median = |v: &mut Vec<Duration>| {
        v.sort();
        v.get(v.len() / 2).copied().unwrap_or_default()
    };
    println!(
        "median of {times}: {:.3} s, {:.3} s of CPU",
        median(&mut walls).as_secs_f64(),
        median(&mut cpus).as_secs_f64()
    );
}

/// Starts `n` validators serving `chain`.
pub fn validators(chain: &Chain, n: usize) -> Vec<P2pHandle> {
    (1..=n as u8)
        .map(|k| soma_testkit::validator(chain, k))
        .collect()
}

/// Stops `handles`.
pub async fn stop(handles: Vec<P2pHandle>) {
    for h in handles {
        h.shutdown().await;
    }
}

/// Repeated runs of one measurement, sorted by their time: the median is
/// reported and the spread noted, since one run of a second or less on a
/// shared machine moves by a third from run to run.
struct Runs<T> {
    sorted: Vec<T>,
    times: Vec<Duration>,
}

impl<T> Runs<T> {
    /// `runs` (at least one), timed by `elapsed`.
    fn new(mut runs: Vec<T>, elapsed: impl Fn(&T) -> Duration) -> Self {
        assert!(!runs.is_empty(), "at least one run");
        runs.sort_by_key(&elapsed);
        let times = runs.iter().map(elapsed).collect();
        Runs {
            sorted: runs,
            times,
        }
    }

    /// The median run (the slower of the two middle ones, for an even count).
    fn median(&self) -> &T {
        &self.sorted[self.sorted.len() / 2]
    }

    /// The fastest and the slowest run's time, in seconds, as `a–b`.
    fn spread(&self) -> String {
        // `new` holds at least one run.
        let (first, last) = (self.times[0], self.times[self.times.len() - 1]);
        format!("{:.2}–{:.2} s", first.as_secs_f64(), last.as_secs_f64())
    }

    fn iter(&self) -> impl Iterator<Item = &T> {
        self.sorted.iter()
    }
}

/// One chain's catch-ups, with its limits.
struct Measured {
    chain: Arc<Chain>,
    commits: u64,
    blocks: f64,
    block_bytes: f64,
    signatures: usize,
    crypto: Runs<Duration>,
    transport: Runs<Transport>,
    on: Runs<CatchUp>,
    off: Runs<CatchUp>,
}

/// Builds a chain of `commits` commits of 10 transactions of
/// `payload_bytes`, and times its crypto limit, its transport limit and
/// its catch-up from 3 validators with block signatures checked and off,
/// each `runs` times. A round times each once, in that order, and the
/// next round in reverse, so that a machine changing speed during the
/// section weighs on the limits as on the catch-ups.
fn measure(commits: u64, payload_bytes: usize, config: &P2pConfig, runs: usize) -> Measured {
    let built = Instant::now();
    let chain = chain_of_payloads(4, commits, payload_bytes);
    let blocks = chain.block_count() as f64;
    let block_bytes = (1..=commits)
        .flat_map(|i| chain.blocks_of(i))
        .map(|b| b.serialized().len() as f64)
        .sum::<f64>()
        / blocks;
    eprintln!(
        "  chain of {commits} commits, {blocks} blocks of {block_bytes:.0} bytes built in {:.1}s",
        built.elapsed().as_secs_f64()
    );
    let batches = signature_batches(&chain);
    let rt = runtime(2);
    let peers = rt.block_on(async { validators(&chain, 3) });
    let (mut crypto, mut transport, mut on, mut off) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    {
        let steps: [&mut dyn FnMut(); 4] = [
            &mut || crypto.push(verify_all(&batches)),
            &mut || transport.push(transport_limit(&chain, 3, config)),
            &mut || on.push(rt.block_on(catch_up(&chain, &peers, 101, true))),
            &mut || off.push(rt.block_on(catch_up(&chain, &peers, 102, false))),
        ];
        for round in 0..runs {
            for step in crate::turns(round, steps.len()) {
                steps[step]();
            }
        }
    }
    rt.block_on(stop(peers));
    let elapsed = |run: &CatchUp| run.elapsed;
    Measured {
        chain,
        commits,
        blocks,
        block_bytes,
        signatures: signatures(&batches),
        crypto: Runs::new(crypto, |d: &Duration| *d),
        transport: Runs::new(transport, |t: &Transport| t.elapsed),
        on: Runs::new(on, elapsed),
        off: Runs::new(off, elapsed),
    }
}

/// Benchmark 1: catch-up against the crypto and the transport limit, with
/// the blocks of 10 small transactions, then with blocks of about 20 KB.
pub fn catch_up_section(size: &Size) -> Section {
    let config = P2pConfig::default();
    let runs = size.sync_runs;
    let small = measure(
        size.sync_commits,
        ChainConfig::default().payload_bytes,
        &config,
        runs,
    );
    let previous = previous_rule(&small.chain);
    let large = measure(size.large_commits, LARGE_PAYLOAD_BYTES, &config, runs);

    let mut s = Section::new(
        "sync",
        "Catch-up sync against the crypto and transport limits",
        format!(
            "A fresh node on a MemStore catches up {} commits ({} blocks of 10 signed \
             transactions, {:.0} bytes each on average, {} signatures; 4-validator committee) \
             from 3 validator nodes over mutual TLS on 127.0.0.1, default settings; everything in \
             one process on {} cores. Crypto limit: the same signatures through raw \
             `verify_batch`, batches prepared beforehand, on all cores. Transport limit: the same \
             FetchCommits and FetchBlocks requests, {} at once over 3 connections, answered by a \
             bare tonic service from memory. MB/s counts block bytes. Then the same with \
             transactions of {LARGE_PAYLOAD_BYTES}-byte payloads: {} commits, {} blocks of {:.0} \
             bytes on average, each set of rows against its own limits. Each limit and each \
             catch-up is the median of {runs} runs, taken in rounds that time each once (crypto, \
             transport, checked, off; the next round in reverse), the catch-ups from the same \
             validators; their spread is noted below.",
            small.commits,
            small.blocks,
            small.block_bytes,
            small.signatures,
            crate::cores(),
            config.state_sync.parallel_fetches,
            large.commits,
            large.blocks,
            large.block_bytes,
        ),
        &[
            "path",
            "time (s)",
            "commits/s",
            "blocks/s",
            "signatures/s",
            "MB/s",
            "of crypto limit",
            "of transport limit",
        ],
    );
    small.rows(&mut s, "", Some(previous));
    let large_label = format!(", blocks of {:.0} KB", large.block_bytes / 1e3);
    large.rows(&mut s, &large_label, None);
    for (measured, label) in [(&small, "small blocks"), (&large, "large blocks")] {
        s.notes.push(measured.spread(label));
    }
    s
}

impl Measured {
    /// The runs' spread and the worker restarts in all of them, for the
    /// rows of `label`.
    fn spread(&self, label: &str) -> String {
        let restarts = |runs: &Runs<CatchUp>| runs.iter().map(|r| r.restarts).sum::<u64>();
        format!(
            "Runs with {label} (fastest–slowest): crypto limit {}, transport limit {}, catch-up \
             with signatures checked {}, off {}; worker restarts in all runs: {} checked, {} off.",
            self.crypto.spread(),
            self.transport.spread(),
            self.on.spread(),
            self.off.spread(),
            restarts(&self.on),
            restarts(&self.off),
        )
    }

    /// The crypto limit, the `previous` rule's time if given, the
    /// transport limit, then both catch-ups, each label ending with
    /// `suffix`.
    fn rows(&self, s: &mut Section, suffix: &str, previous: Option<Duration>) {
        let mb = |bytes: u64, d: Duration| Cell::num(bytes as f64 / 1e6 / d.as_secs_f64(), 1);
        let (commits, blocks, signatures) = (self.commits as f64, self.blocks, self.signatures);
        let crypto = *self.crypto.median();
        s.row(
            format!("raw `verify_batch`, all cores (crypto limit){suffix}"),
            vec![
                Cell::secs(crypto),
                Cell::Empty,
                Cell::Empty,
                Cell::rate(signatures as f64, crypto),
                Cell::Empty,
                Cell::Ratio(1.0),
                Cell::Empty,
            ],
        );
        if let Some(previous) = previous {
            s.row(
                "ed25519-dalek `verify_batch`, all cores (the previous, batch-dependent rule)",
                vec![
                    Cell::secs(previous),
                    Cell::Empty,
                    Cell::Empty,
                    Cell::rate(signatures as f64, previous),
                    Cell::Empty,
                    Cell::Ratio(crypto.as_secs_f64() / previous.as_secs_f64()),
                    Cell::Empty,
                ],
            );
        }
        let transport = self.transport.median();
        s.row(
            format!("bare tonic stream, same requests (transport limit){suffix}"),
            vec![
                Cell::secs(transport.elapsed),
                Cell::rate(commits, transport.elapsed),
                Cell::rate(blocks, transport.elapsed),
                Cell::Empty,
                mb(transport.block_bytes, transport.elapsed),
                Cell::Empty,
                Cell::Ratio(1.0),
            ],
        );
        for (label, run, checked) in [
            ("catch-up, block signatures checked", self.on.median(), true),
            ("catch-up, block signatures off", self.off.median(), false),
        ] {
            let sigs = signatures as f64 / run.elapsed.as_secs_f64();
            let crypto_rate = signatures as f64 / crypto.as_secs_f64();
            s.row(
                format!("{label}{suffix}"),
                vec![
                    Cell::secs(run.elapsed),
                    Cell::rate(commits, run.elapsed),
                    Cell::rate(blocks, run.elapsed),
                    if checked {
                        Cell::int(sigs.round())
                    } else {
                        Cell::Empty
                    },
                    mb(run.bytes, run.elapsed),
                    if checked {
                        Cell::Ratio(sigs / crypto_rate)
                    } else {
                        Cell::Empty
                    },
                    Cell::Ratio(transport.elapsed.as_secs_f64() / run.elapsed.as_secs_f64()),
                ],
            );
        }
    }
}

/// Benchmark 6: throughput with 1, 2, 4 serving peers, and with committees
/// of 4, 10, 31 validators (chains of about the same number of blocks).
pub fn scaling_section(size: &Size) -> Section {
    let mut s = Section::new(
        "scaling",
        "Scaling with serving peers and committee size",
        format!(
            "Catch-up as above with block signatures checked and then off. Serving peers: a \
             4-validator chain of {} commits served by 1, 2 or 4 nodes. Committees: chains of \
             about {} blocks each (fewer commits for larger committees), served by 3 nodes; \
             each row's crypto limit is measured on its own chain.",
            size.scaling_commits, size.scaling_blocks
        ),
        &[
            "setup",
            "commits",
            "blocks",
            "time, checked (s)",
            "commits/s, checked",
            "signatures/s, checked",
            "of crypto limit",
            "time, off (s)",
            "commits/s, off",
        ],
    );
    let rt = runtime(2);
    let mut run = |label: String, chain: &Arc<Chain>, peers: usize| {
        let (signatures, crypto) = crypto_limit(chain);
        let (on, off) = rt.block_on(async {
            let handles = validators(chain, peers);
            let on = catch_up(chain, &handles, 103, true).await;
            let off = catch_up(chain, &handles, 104, false).await;
            stop(handles).await;
            (on, off)
        });
        let commits = chain.tip() as f64;
        let sigs = signatures as f64 / on.elapsed.as_secs_f64();
        s.row(
            label,
            vec![
                Cell::int(commits),
                Cell::int(chain.block_count() as f64),
                Cell::secs(on.elapsed),
                Cell::rate(commits, on.elapsed),
                Cell::int(sigs.round()),
                Cell::Ratio(sigs / (signatures as f64 / crypto.as_secs_f64())),
                Cell::secs(off.elapsed),
                Cell::rate(commits, off.elapsed),
            ],
        );
    };
    let four = chain(4, size.scaling_commits);
    for peers in [1, 2, 4] {
        run(
            format!("{peers} serving peer{}", if peers == 1 { "" } else { "s" }),
            &four,
            peers,
        );
    }
    drop(four);
    for validators in [4usize, 10, 31] {
        let commits = (size.scaling_blocks / validators as u64).max(10);
        let chain = chain(validators, commits);
        run(format!("{validators} validators"), &chain, 3);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_report_their_median_run_and_their_spread() {
        let ms = Duration::from_millis;
        let runs = Runs::new(vec![(ms(300), 'a'), (ms(100), 'b'), (ms(200), 'c')], |r| {
            r.0
        });
        assert_eq!(runs.median().1, 'c');
        assert_eq!(runs.spread(), "0.10–0.30 s");
        assert_eq!(runs.iter().map(|r| r.1).collect::<String>(), "bca");
        // Of an even count, the slower of the middle two.
        let runs = Runs::new(
            vec![(ms(40), 1), (ms(10), 2), (ms(30), 3), (ms(20), 4)],
            |r| r.0,
        );
        assert_eq!(runs.median().1, 3);
        let one = Runs::new(vec![(ms(1_500), ())], |r| r.0);
        assert_eq!(one.spread(), "1.50–1.50 s");
    }

    #[test]
    fn measurements_take_turns_in_order_then_in_reverse() {
        let rounds: Vec<Vec<usize>> = (0..3).map(|round| crate::turns(round, 4)).collect();
        assert_eq!(rounds, [[0, 1, 2, 3], [3, 2, 1, 0], [0, 1, 2, 3]]);
    }
}
