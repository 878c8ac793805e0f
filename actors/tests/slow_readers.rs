//! Clients that ask for commits and blocks and never read the answers,
//! from more identities than there are fetch slots, while an honest peer
//! syncs from the node. Each unread answer is cut at the send deadline,
//! which frees its slot: the honest sync completes and new fetches are
//! admitted again.

#[path = "support/slow_readers.rs"]
mod support;

use std::sync::Arc;
use std::time::Duration;

use soma_actors::P2pConfig;
use soma_actors::grpc::FetchesRefused;
use soma_chain::{ChainBuilder, ChainConfig};
use soma_store::{ConsensusStore, MemStore};
use soma_testkit::{assert_same_chain, seeds, wait_synced};
use soma_types::KeyPair;
use soma_wire::proto;
use soma_wire::tls::NodeIdentity;
use support::{block_refs, client, server, wait_fetches};
use tonic::Code;

/// Identities of the clients that never read; each takes two slots.
const READERS: u8 = 16;
const SEND_TIMEOUT: Duration = Duration::from_secs(3);
const DEADLINE: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_reading_clients_lose_their_fetch_slots_at_the_send_deadline() {
    let chain = Arc::new(ChainBuilder::new(ChainConfig::validators(4)).build(300));
    let slots = 2 * READERS as usize;
    let mut config = P2pConfig::default();
    config.grpc.max_concurrent_fetches = slots;
    config.grpc.max_concurrent_fetches_per_peer = 2;
    config.grpc.send_timeout = SEND_TIMEOUT;
    // The deadline alone frees the slots here: no stalled answer gives its
    // slot to a newer fetch (crates/node/tests/under_attack.rs covers that).
    config.grpc.fetch_stall_timeout = Duration::from_secs(3_600);
    let node = server(&chain, config, Arc::new(MemStore::new(chain.genesis())));

    // Connected first, so all the fetches below start within one deadline.
    let mut readers =
        futures::future::join_all((0..READERS).map(|i| client(&node, [100 + i; 32], 0))).await;
    let mut late = client(&node, [99; 32], 65_535).await;
    let refs = block_refs(&chain, 100);
    let mut streams = Vec::new();
    let mut unary = Vec::new();
    for reader in &mut readers {
        // The headers come at once; no byte of the body can.
        let request = proto::FetchBlocksRequest {
            refs: refs.clone(),
            ..Default::default()
        };
        streams.push(reader.fetch_blocks(request).await.expect("admitted"));
        let mut reader = reader.clone();
        unary.push(tokio::spawn(async move {
            let request = proto::FetchCommitsRequest {
                start: 1,
                end: 100,
                ..Default::default()
            };
            reader.fetch_commits(request).await
        }));
    }
    wait_fetches(&node, slots, SEND_TIMEOUT).await;
    let refused = late
        .fetch_commits(proto::FetchCommitsRequest {
            start: 1,
            end: 100,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");

    let (honest, store) = honest_beside(&node, &chain);
    wait_synced(&honest, chain.tip(), DEADLINE).await;
    assert_same_chain(&chain, store.as_ref());

    // Every unread answer was cut; no slot stays taken.
    wait_fetches(&node, 0, DEADLINE).await;
    assert_eq!(node.responses_cut(), slots as u64);
    assert!(unary.iter().all(|call| !call.is_finished()));

    // A client that reads is served in full.
    let request = proto::FetchBlocksRequest {
        refs: refs.clone(),
        ..Default::default()
    };
    let stream = late.fetch_blocks(request).await.unwrap().into_inner();
    let blocks = blocks_read(stream).await;
    assert_eq!(blocks, refs.len());
    assert_eq!(node.fetches_in_flight(), 0);

    for call in unary {
        call.abort();
    }
    drop(streams);
    honest.shutdown().await;
    node.shutdown().await;
}

/// Clients that read their answers, but a little at a time: each opens
/// its stream's window by 16 KiB every 300 ms, so the transport asks for
/// a frame far more often than the stall timeout and none of them is ever
/// silent. They hold every fetch slot, and each answer would take longer
/// than the send deadline at that rate. An honest fetch still gets a
/// slot: the slowest answer's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_reading_too_slowly_give_their_slots_to_new_fetches() {
    use soma_testkit::attack::{self, Trickle};
    use std::sync::atomic::{AtomicU64, Ordering};

    const TRICKLERS: usize = 4;
    let chain = Arc::new(ChainBuilder::new(ChainConfig::validators(4)).build(300));
    let mut config = P2pConfig::default();
    config.grpc.max_concurrent_fetches = TRICKLERS;
    config.grpc.max_concurrent_fetches_per_peer = 1;
    // 4 MiB in 20 s: answers read at under 210 KB/s are too slow.
    config.grpc.send_timeout = Duration::from_secs(20);
    config.grpc.fetch_stall_timeout = Duration::from_secs(1);
    let node = server(&chain, config, Arc::new(MemStore::new(chain.genesis())));
    let target = target(&node);
    // About 1.6 MB each: half a minute at the rate they read.
    let refs = block_refs(&chain, 250);
    let how = Trickle {
        window: 16 << 10,
        pause: Duration::from_millis(300),
    };
    let read: Vec<Arc<AtomicU64>> = (0..TRICKLERS).map(|_| Arc::default()).collect();
    let tricklers: Vec<_> = (0..TRICKLERS)
        .map(|i| {
            let identity = NodeIdentity::generate(&KeyPair::from_seed([200 + i as u8; 32]))
                .expect("an identity");
            let request = proto::FetchBlocksRequest {
                refs: refs.clone(),
                ..Default::default()
            };
            let read = read[i].clone();
            tokio::spawn(async move {
                attack::trickle(target, attack::host(i as u8), &identity, request, how, read).await
            })
        })
        .collect();

    // Every slot is held by an answer read for longer than it takes to be
    // judged by its rate (four stall timeouts): fourteen chunks read,
    // 300 ms apart, after the first.
    wait_fetches(&node, TRICKLERS, DEADLINE).await;
    let start = std::time::Instant::now();
    while read.iter().any(|r| r.load(Ordering::Relaxed) < 15) {
        assert!(start.elapsed() < DEADLINE, "the tricklers did not read");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(node.responses_preempted(), 0);

    // An honest fetch takes the slot of one of them and is served in full.
    let mut honest = client(&node, [99; 32], 65_535).await;
    let few = block_refs(&chain, 10);
    let stream = honest
        .fetch_blocks(proto::FetchBlocksRequest {
            refs: few.clone(),
            ..Default::default()
        })
        .await
        .expect("admitted in place of a slow answer")
        .into_inner();
    let blocks = blocks_read(stream).await;
    assert_eq!(blocks, few.len());
    assert_eq!(node.responses_preempted(), 1);

    // Exactly one trickler was cut; the others still read.
    let start = std::time::Instant::now();
    while !tricklers.iter().any(|t| t.is_finished()) {
        assert!(start.elapsed() < DEADLINE, "no trickler saw its cut");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut cut = 0;
    for t in tricklers {
        if t.is_finished() {
            let ended = t.await.unwrap();
            assert!(ended.is_err(), "a cut answer ended in full: {ended:?}");
            cut += 1;
        } else {
            t.abort();
        }
    }
    assert_eq!(cut, 1);
    node.shutdown().await;
}

/// A FetchCommits behind answers its connection does not read waits for
/// them on its slot. A newer fetch takes the slot of the unread answer
/// first (silent answers go before waiting fetches), which lets the
/// waiting fetch go on: the reader's two fetches never hold out a reader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetch_waiting_behind_its_connections_unread_answers_holds_out_no_newer_fetch() {
    let chain = Arc::new(ChainBuilder::new(ChainConfig::validators(4)).build(300));
    let mut config = P2pConfig::default();
    config.grpc.max_concurrent_fetches = 2;
    config.grpc.max_concurrent_fetches_per_peer = 2;
    // One unread FetchBlocks of 100 commits' blocks (about 650 KB) leaves
    // no room for a FetchCommits' 4 MiB estimate.
    config.grpc.max_buffered_bytes_per_connection = 1 << 20;
    config.grpc.send_timeout = Duration::from_secs(30);
    config.grpc.fetch_stall_timeout = Duration::from_millis(200);
    let node = server(&chain, config, Arc::new(MemStore::new(chain.genesis())));

    let mut reader = client(&node, [120; 32], 0).await;
    let request = proto::FetchBlocksRequest {
        refs: block_refs(&chain, 100),
        ..Default::default()
    };
    let unread = reader.fetch_blocks(request).await.expect("admitted");
    wait_fetches(&node, 1, DEADLINE).await;
    // The transport takes one slice of the answer into its buffer, window
    // or not, then asks no more: the answer is silent from then on. Only
    // then does the FetchCommits start to wait, so that the answer has
    // been silent for longer whenever both are judged.
    soma_testkit::wait_until(
        "the transport to take a first slice",
        DEADLINE,
        async || {
            node.inbound_connections().unwritten_bytes == soma_actors::grpc::SLICE_BYTES as u64
        },
    )
    .await;
    let waiting = tokio::spawn(async move {
        reader
            .fetch_commits(proto::FetchCommitsRequest {
                start: 1,
                end: 100,
                ..Default::default()
            })
            .await
    });
    let start = std::time::Instant::now();
    while node.fetches_waiting_for_budget() != 1 {
        assert!(start.elapsed() < DEADLINE, "the FetchCommits never waited");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // Both slots are held. A reader's fetch is refused until the unread
    // answer has been silent for the stall timeout, then takes its slot.
    let mut honest = client(&node, [99; 32], 65_535).await;
    let answer = loop {
        let request = proto::FetchCommitsRequest {
            start: 1,
            end: 100,
            ..Default::default()
        };
        match honest.fetch_commits(request).await {
            Ok(answer) => break answer.into_inner(),
            Err(status) if status.code() == Code::ResourceExhausted => {
                assert!(start.elapsed() < DEADLINE, "never admitted: {status:?}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(status) => panic!("{status:?}"),
        }
    };
    assert_eq!(answer.commits.len(), 100);
    assert_eq!(node.responses_preempted(), 1);
    // The waiting fetch got its budget and holds its slot with an answer
    // of its own, unread.
    while node.fetches_waiting_for_budget() != 0 || node.fetches_in_flight() != 1 {
        assert!(
            start.elapsed() < DEADLINE,
            "the waiting fetch never went on"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!waiting.is_finished());
    waiting.abort();
    drop(unread);
    node.shutdown().await;
}

/// Identities are free where anyone may connect, so the fetch slots one
/// network's callers hold are capped whatever identities they use: four
/// identities from four hosts of one /24 hold no more than its two; a
/// committee member of that /24, and a caller from another network, are
/// served beside them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_networks_callers_hold_at_most_its_fetch_slots_whatever_their_identities() {
    use soma_testkit::attack;

    let (node, chain) = counted_by_address(|grpc| {
        grpc.max_concurrent_fetches = 8;
        grpc.max_concurrent_fetches_per_peer = 4;
        grpc.max_concurrent_fetches_per_network = 2;
    });
    let target = target(&node);
    let refs = block_refs(&chain, 10);

    // Four identities, from 127.10.0.1 to 127.10.0.4, never reading.
    let mut streams = Vec::new();
    let mut refused = Vec::new();
    for i in 1..=4u8 {
        let identity =
            NodeIdentity::generate(&KeyPair::from_seed([210 + i; 32])).expect("an identity");
        let source = std::net::IpAddr::from([127, 10, 0, i]);
        let mut reader = attack::client(target, source, Some(&identity), Some(0))
            .await
            .expect("connects");
        let request = proto::FetchBlocksRequest {
            refs: refs.clone(),
            ..Default::default()
        };
        match reader.fetch_blocks(request).await {
            Ok(stream) => streams.push(stream),
            Err(status) => refused.push(status),
        }
    }
    assert_eq!(streams.len(), 2);
    assert_eq!(node.fetches_in_flight(), 2);
    assert_eq!(refused.len(), 2);
    let at_network = FetchesRefused {
        network: 2,
        ..FetchesRefused::default()
    };
    assert_eq!(node.fetches_refused(), at_network);
    for status in &refused {
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        assert!(
            status.message().contains("network of 127.10.0.0"),
            "{status:?}"
        );
    }

    // A committee member of the same network holds a reserved slot: its
    // fetches are not counted in the network's.
    let member = NodeIdentity::generate(&chain.config().network_key(0)).expect("an identity");
    let source = std::net::IpAddr::from([127, 10, 0, 5]);
    let mut member = attack::client(target, source, Some(&member), None)
        .await
        .expect("connects");
    let answer = member
        .fetch_commits(proto::FetchCommitsRequest {
            start: 1,
            end: 10,
            ..Default::default()
        })
        .await
        .expect("a committee member is admitted")
        .into_inner();
    assert_eq!(answer.commits.len(), 10);

    // A caller of another network is served in full.
    let mut honest = client(&node, [99; 32], 65_535).await;
    let stream = honest
        .fetch_blocks(proto::FetchBlocksRequest {
            refs: refs.clone(),
            ..Default::default()
        })
        .await
        .expect("admitted beside the full network")
        .into_inner();
    let blocks = blocks_read(stream).await;
    assert_eq!(blocks, refs.len());
    drop(streams);
    node.shutdown().await;
}

/// Within a network, one host's identities share the host's fetch slots:
/// a machine with four identities that never reads its answers holds its
/// host's four slots, not its /24's eight, and a neighbour of that /24
/// (neither a committee member nor allowlisted) is served in full beside
/// it, with no stalled answer to take a slot from.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_hosts_identities_leave_its_neighbours_their_networks_slots() {
    use soma_testkit::attack;

    let (node, chain) = counted_by_address(|grpc| {
        grpc.max_concurrent_fetches = 16;
        grpc.max_concurrent_fetches_per_peer = 2;
        grpc.max_concurrent_fetches_per_network = 8;
        grpc.max_concurrent_fetches_per_host = 4;
    });
    let target = target(&node);
    let refs = block_refs(&chain, 10);
    let request = || proto::FetchBlocksRequest {
        refs: refs.clone(),
        ..Default::default()
    };

    // The attacker: four identities on 127.10.1.1, two fetches each,
    // never reading.
    let attacker = std::net::IpAddr::from([127, 10, 1, 1]);
    let mut streams = Vec::new();
    let mut refused = Vec::new();
    for i in 1..=4u8 {
        let identity =
            NodeIdentity::generate(&KeyPair::from_seed([230 + i; 32])).expect("an identity");
        let mut reader = attack::client(target, attacker, Some(&identity), Some(0))
            .await
            .expect("connects");
        for _ in 0..2 {
            match reader.fetch_blocks(request()).await {
                Ok(stream) => streams.push(stream),
                Err(status) => refused.push(status),
            }
        }
    }
    assert_eq!((streams.len(), refused.len()), (4, 4));
    assert_eq!(node.fetches_in_flight(), 4);
    let at_host = FetchesRefused {
        host: 4,
        ..FetchesRefused::default()
    };
    assert_eq!(node.fetches_refused(), at_host);
    for status in &refused {
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        assert_eq!(
            status.message(),
            "at most 4 fetches at once from 127.10.1.1",
            "{status:?}"
        );
    }

    // Two neighbours in the same /24 take the network's other four slots
    // at once, and read every block.
    let mut fetches = Vec::new();
    for (i, host) in [(1u8, 2u8), (2, 3)] {
        let identity =
            NodeIdentity::generate(&KeyPair::from_seed([240 + i; 32])).expect("an identity");
        let source = std::net::IpAddr::from([127, 10, 1, host]);
        let neighbour = attack::client(target, source, Some(&identity), None)
            .await
            .expect("connects");
        for _ in 0..2 {
            let mut neighbour = neighbour.clone();
            let request = request();
            fetches.push(tokio::spawn(async move {
                let stream = neighbour.fetch_blocks(request).await?.into_inner();
                Ok::<_, tonic::Status>(blocks_read(stream).await)
            }));
        }
    }
    for fetch in fetches {
        let blocks = fetch.await.expect("the task ends").expect("admitted");
        assert_eq!(blocks, refs.len());
    }
    assert_eq!(node.fetches_refused(), at_host);
    drop(streams);
    node.shutdown().await;
}

/// A host that asks for answers and drops each unread (it resets the
/// call once the answer's headers came), with a fresh identity every
/// time, is refused as soon as it has dropped its host's allowance, for
/// both kinds of fetch: the reads it never downloads stop there, not at
/// its share of the fetch slots. A neighbour in its /24 is served in
/// full, and an honest node syncs from the same server meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_dropping_answers_unread_is_refused_once_its_allowance_is_gone() {
    use soma_testkit::attack;
    use soma_testkit::wait_until;

    const DROPPED: u64 = 3;
    let (node, chain) = counted_by_address(|grpc| {
        // The host holds one caller's allowance; none refills.
        grpc.max_concurrent_fetches_per_peer = 4;
        grpc.max_concurrent_fetches_per_host = 4;
        grpc.abandoned_fetch_burst = DROPPED as u32;
        grpc.abandoned_fetches_per_minute = 0;
    });
    let (honest, store) = honest_beside(&node, &chain);

    let target = target(&node);
    let refs = block_refs(&chain, 10);
    let request = || proto::FetchBlocksRequest {
        refs: refs.clone(),
        ..Default::default()
    };
    let attacker = std::net::IpAddr::from([127, 10, 2, 1]);
    let fresh = |i| fresh_identity(7, i);
    for i in 0..DROPPED {
        let identity = fresh(i as usize);
        let mut dropper = attack::client(target, attacker, Some(&identity), Some(0))
            .await
            .expect("connects");
        // Admitted: the headers came; the blocks wait for a window that
        // never opens, and the call is reset.
        let answer = dropper.fetch_blocks(request()).await.expect("admitted");
        drop(answer);
        wait_until(
            "the server to see the answer dropped",
            DEADLINE,
            async || node.fetches_abandoned() == i + 1,
        )
        .await;
    }
    let refusal = NONE_REFILLED;
    let identity = fresh(3);
    let mut late = attack::client(target, attacker, Some(&identity), Some(0))
        .await
        .expect("connects");
    let refused = late.fetch_blocks(request()).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert_eq!(refused.message(), refusal);
    let commits = proto::FetchCommitsRequest {
        start: 1,
        end: 10,
        ..Default::default()
    };
    let refused = late.fetch_commits(commits).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert_eq!(refused.message(), refusal);
    let held = FetchesRefused {
        abandoning: 2,
        ..FetchesRefused::default()
    };
    assert_eq!(node.fetches_refused(), held);

    // A neighbour on another host of the /24 reads its answer in full.
    let identity = fresh(4);
    let neighbour = std::net::IpAddr::from([127, 10, 2, 2]);
    let mut reader = attack::client(target, neighbour, Some(&identity), None)
        .await
        .expect("connects");
    let stream = reader.fetch_blocks(request()).await.expect("admitted");
    assert_eq!(blocks_read(stream.into_inner()).await, refs.len());

    wait_synced(&honest, chain.tip(), DEADLINE).await;
    assert_same_chain(&chain, store.as_ref());
    // Only the attacker's answers went unread; the honest node, fetching
    // from its one peer, dropped none.
    assert_eq!(node.fetches_abandoned(), DROPPED);
    assert_eq!(node.fetches_refused(), held);
    honest.shutdown().await;
    node.shutdown().await;
}

/// A host that lets its unread answers be cut rather than reset them
/// pays for them all the same: each newer fetch of its own that takes
/// the slot of one of its stalled answers (as a host at its cap may) is
/// charged for the answer cut, and once its allowance is gone its next
/// fetch is refused for it, though a stalled answer of its own is there
/// to take. An honest node syncs from the server meanwhile and pays
/// nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_whose_idle_answers_are_cut_for_its_newer_fetches_pays_for_them() {
    use soma_testkit::attack;
    use soma_testkit::wait_until;

    const CHARGED: u64 = 2;
    let (node, chain) = counted_by_address(|grpc| {
        grpc.max_concurrent_fetches_per_peer = 2;
        grpc.max_concurrent_fetches_per_host = 2;
        grpc.abandoned_fetch_burst = CHARGED as u32;
        grpc.abandoned_fetches_per_minute = 0;
        grpc.fetch_stall_timeout = Duration::from_millis(200);
    });
    // Asking no more at once than the server allows it: at its cap, a
    // fetch of its own would take the slot of one of its answers it had
    // not read for the stall timeout (a busy machine), and be charged.
    let (honest, store) = honest_beside_with(&node, &chain, |c| c.max_fetches_per_peer = 2);

    let target = target(&node);
    let refs = block_refs(&chain, 10);
    let request = || proto::FetchBlocksRequest {
        refs: refs.clone(),
        ..Default::default()
    };
    let attacker = std::net::IpAddr::from([127, 10, 3, 1]);
    let fresh = |i| fresh_identity(8, i);
    // The host's two slots, held by answers never read.
    let identity = fresh(0);
    let mut holder = attack::client(target, attacker, Some(&identity), Some(0))
        .await
        .expect("connects");
    let mut unread = Vec::new();
    for _ in 0..2 {
        unread.push(holder.fetch_blocks(request()).await.expect("admitted"));
    }
    let at_cap = "at most 2 fetches at once from 127.10.3.1";
    for i in 0..CHARGED {
        let identity = fresh(1 + i as usize);
        let mut newer = attack::client(target, attacker, Some(&identity), Some(0))
            .await
            .expect("connects");
        // Refused at the host's cap until one of its answers has been
        // idle for the stall timeout; then it takes that answer's slot.
        let mut taken = None;
        wait_until(
            "a newer fetch to take an idle answer's slot",
            DEADLINE,
            async || {
                match newer.fetch_blocks(request()).await {
                    Ok(stream) => taken = Some(stream),
                    Err(status) => assert_eq!(status.message(), at_cap, "{status:?}"),
                }
                taken.is_some()
            },
        )
        .await;
        unread.extend(taken);
        wait_until("the cut answer to be charged", DEADLINE, async || {
            node.fetches_abandoned() == i + 1
        })
        .await;
    }
    // Its allowance is gone: the next fetch is refused for it, whatever
    // idle answer of its host it could have taken.
    let identity = fresh(3);
    let mut last = attack::client(target, attacker, Some(&identity), Some(0))
        .await
        .expect("connects");
    let refused = last.fetch_blocks(request()).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert_eq!(refused.message(), NONE_REFILLED);
    assert_eq!(node.fetches_refused().abandoning, 1);

    wait_synced(&honest, chain.tip(), DEADLINE).await;
    assert_same_chain(&chain, store.as_ref());
    assert_eq!(node.fetches_abandoned(), CHARGED);
    drop(unread);
    honest.shutdown().await;
    node.shutdown().await;
}

/// The refusal of a fetch whose host dropped its allowance of answers
/// unread, where none refills.
const NONE_REFILLED: &str = "too many fetches dropped before their answers were read: \
                             at most 0 a minute may go unread";

/// Fresh identity `i` of attack `attack`.
fn fresh_identity(attack: u8, i: usize) -> NodeIdentity {
    NodeIdentity::generate(&soma_testkit::attack::fresh_key(attack, i)).expect("an identity")
}

/// An honest node syncing `chain` from `node` alone, on a store of its own.
fn honest_beside(
    node: &soma_actors::P2pHandle,
    chain: &soma_chain::Chain,
) -> (soma_actors::P2pHandle, Arc<dyn ConsensusStore>) {
    honest_beside_with(node, chain, |_| {})
}

/// [`honest_beside`], its settings changed by `configure`.
fn honest_beside_with(
    node: &soma_actors::P2pHandle,
    chain: &soma_chain::Chain,
    configure: impl FnOnce(&mut P2pConfig),
) -> (soma_actors::P2pHandle, Arc<dyn ConsensusStore>) {
    let store: Arc<dyn ConsensusStore> = Arc::new(MemStore::new(chain.genesis()));
    let mut config = P2pConfig {
        seed_peers: seeds(&[node]),
        ..P2pConfig::default()
    };
    configure(&mut config);
    (soma_testkit::node(chain, 9, config, store.clone()), store)
}

/// A node serving a chain of 300 commits whose loopback callers count by
/// address (not exempt), with the fetch caps `caps` sets, and unread
/// answers keeping their slots for the whole test unless `caps` says
/// otherwise.
fn counted_by_address(
    caps: impl FnOnce(&mut soma_actors::grpc::Limits),
) -> (soma_actors::P2pHandle, Arc<soma_chain::Chain>) {
    let chain = Arc::new(ChainBuilder::new(ChainConfig::validators(4)).build(300));
    let mut config = P2pConfig::default();
    config.grpc.inbound_exempt_loopback = false;
    config.grpc.send_timeout = Duration::from_secs(600);
    config.grpc.fetch_stall_timeout = Duration::from_secs(3_600);
    caps(&mut config.grpc);
    let node = server(&chain, config, Arc::new(MemStore::new(chain.genesis())));
    (node, chain)
}

/// `node` as the testkit's attacks name their target.
fn target(node: &soma_actors::P2pHandle) -> soma_testkit::attack::Target {
    soma_testkit::attack::Target {
        address: node.local_addr(),
        peer_id: Some(node.peer_id()),
    }
}

/// Reads a FetchBlocks answer to its end; the blocks it held. Panics on
/// an error status.
async fn blocks_read(mut stream: tonic::Streaming<proto::FetchBlocksResponse>) -> usize {
    let mut blocks = 0;
    while let Some(chunk) = stream.message().await.expect("the stream is served") {
        blocks += chunk.blocks.len();
    }
    blocks
}

/// A client that declares windows of 1 GiB, as if it read everything, and
/// stops reading its socket after the handshake leaves at most
/// `max-unwritten-bytes-per-connection` of its answers in the server's
/// transport buffers, however many answers it asked for at once: the
/// rest wait, unsent and not counted as answered (their fetch slots held,
/// not kept for its next fetches), as any answer its client does not
/// read. Its bytes stay within the cap throughout, while an honest node
/// syncs from the server beside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_a_client_does_not_read_leave_at_most_the_cap_unwritten() {
    use std::sync::atomic::{AtomicU64, Ordering};

    use soma_actors::grpc::SLICE_BYTES;
    use soma_testkit::{attack, wait_until};

    const CAP: u64 = 256 << 10;
    const CALLS: usize = 48;
    let (node, chain) = counted_by_address(|grpc| {
        grpc.max_unwritten_bytes_per_connection = CAP as usize;
        // Every call of the client admitted at once, with room left for
        // the honest node.
        grpc.max_concurrent_fetches_per_peer = CALLS;
        grpc.max_concurrent_fetches_per_host = CALLS;
        grpc.max_concurrent_fetches_per_network = CALLS;
        grpc.max_concurrent_fetches = 2 * CALLS;
        // The client reads no ping either: kept however long the test.
        grpc.http2_keepalive_interval = Duration::from_secs(3_600);
    });
    let unwritten = |node: &soma_actors::P2pHandle| node.inbound_connections().unwritten_bytes;
    // The most bytes unwritten at once, sampled until the end of the
    // test: [the client alone, beside the honest node].
    let most = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
    let beside = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = tokio::spawn({
        let (node, most, beside) = (node.clone(), most.clone(), beside.clone());
        async move {
            loop {
                let phase = usize::from(beside.load(Ordering::Relaxed));
                most[phase].fetch_max(unwritten(&node), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    });

    // About 314 KB each, 15 MB in all: far more than the server's socket
    // buffer (4 MiB at most here) and the cap hold.
    let refs = block_refs(&chain, 150);
    let identity = fresh_identity(10, 0);
    let attacker = std::net::IpAddr::from([127, 10, 5, 1]);
    let client =
        attack::client_that_stops_reading(target(&node), attacker, Some(&identity), 64 << 10)
            .await
            .expect("connects");
    let calls: Vec<_> = (0..CALLS)
        .map(|_| {
            let mut client = client.clone();
            let request = proto::FetchBlocksRequest {
                refs: refs.clone(),
                ..Default::default()
            };
            // Each call keeps its answer, unread, until the test ends: a
            // stream dropped would be reset, and its slot given back.
            tokio::spawn(async move {
                let _unread = client.fetch_blocks(request).await;
                std::future::pending::<()>().await
            })
        })
        .collect();
    // The cap reached: the next slice of any answer would pass it.
    let at_cap = async || unwritten(&node) > CAP - SLICE_BYTES as u64;
    wait_until("the cap to be reached", DEADLINE, at_cap).await;

    beside.store(true, Ordering::Relaxed);
    let (honest, store) = honest_beside(&node, &chain);
    wait_synced(&honest, chain.tip(), DEADLINE).await;
    assert_same_chain(&chain, store.as_ref());
    honest.shutdown().await;
    wait_until(
        "the honest node's connection to close",
        DEADLINE,
        async || node.inbound_connections().open == 1,
    )
    .await;
    beside.store(false, Ordering::Relaxed);

    // The client's bytes are still there, past all but a slice of the cap.
    wait_until("the client's answers to wait at the cap", DEADLINE, at_cap).await;
    // Its answers beyond what the socket took are not answered: their
    // slots are held, not kept.
    let in_flight = node.fetches_in_flight();
    assert!(in_flight > 0 && in_flight <= CALLS, "{in_flight}");
    assert_eq!(
        node.fetches_abandoned(),
        0,
        "the client reset none of its calls"
    );
    sampler.abort();
    let alone = most[0].load(Ordering::Relaxed);
    assert!(alone <= CAP, "{alone} bytes unwritten at once");
    // The honest node's answers counted beside the client's, each
    // connection within the cap.
    let beside = most[1].load(Ordering::Relaxed);
    assert!(beside <= 2 * CAP, "{beside} bytes unwritten at once");
    for call in calls {
        call.abort();
    }
    node.shutdown().await;
}
