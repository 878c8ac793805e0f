//! Benchmark 7: memory and admission under load. One node, a child process
//! serving a chain from memory, gets `connections` client connections (half
//! authenticated, each its own identity; half anonymous) keeping
//! `connections × calls` FetchBlocks in flight at once. Its peak RSS before
//! and after the storm, and what each call got.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use soma_actors::P2pConfig;
use soma_chain::{Chain, ChainBuilder, ChainConfig};
use soma_store::MemStore;
use soma_testkit::attack::blocks_fetched;
use soma_types::{BlockRef, KeyPair};
use soma_wire::proto::p2p_client::P2pClient;
use soma_wire::tls::{self, NodeIdentity};
use tonic::Code;

use crate::report::{Cell, Section};
use crate::{Size, runtime};

/// Commits of the served chain.
const COMMITS: u64 = 1_500;
/// Commits whose blocks each call asks for.
const COMMITS_PER_CALL: u64 = 30;

fn chain() -> Chain {
    ChainBuilder::new(ChainConfig::validators(4)).build(COMMITS)
}

/// Runs the benchmark.
pub fn section(size: &Size) -> Section {
    let (connections, calls) = size.load;
    let chain = chain();
    let refs: Vec<BlockRef> = (1..=COMMITS_PER_CALL)
        .flat_map(|i| chain.blocks_of(i).iter().map(|b| b.reference()))
        .collect();
    let (mut child, address, peer) = crate::spawn_serving_child(&["child-serve"]);
    let address = address.as_str();
    let pid = child.id();
    let idle_kib = crate::peak_rss_kib(pid);

    let rt = runtime(2);
    let (outcomes, elapsed, honest) = rt.block_on(async {
        let mut clients = Vec::with_capacity(connections);
        for i in 0..connections {
            let identity = (i % 2 == 0).then(|| {
                NodeIdentity::generate(&KeyPair::from_seed([(i % 251) as u8 + 3; 32]))
                    .expect("identity")
            });
            let (channel, _) = tls::connect(
                address,
                identity.as_ref(),
                Some(peer),
                Duration::from_secs(30),
            )
            .await
            .expect("connects");
            clients.push(P2pClient::new(channel).max_decoding_message_size(8 << 20));
        }
        let start = Instant::now();
        let tasks: Vec<_> = clients
            .iter()
            .flat_map(|c| (0..calls).map(move |_| c.clone()))
            .map(|c| tokio::spawn(blocks_fetched(c, refs.clone())))
            .collect();
        let mut outcomes: HashMap<Code, usize> = HashMap::new();
        for t in tasks {
            let code = match t.await.expect("a call task") {
                Ok(n) if n == refs.len() => Code::Ok,
                Ok(_) => Code::DataLoss,
                Err(status) => status.code(),
            };
            *outcomes.entry(code).or_default() += 1;
        }
        let elapsed = start.elapsed();
        // An honest peer is served after the storm.
        let identity = NodeIdentity::generate(&KeyPair::from_seed([250; 32])).expect("identity");
        let (channel, _) =
            tls::connect(address, Some(&identity), Some(peer), Duration::from_secs(5))
                .await
                .expect("connects");
        let honest = blocks_fetched(
            P2pClient::new(channel).max_decoding_message_size(8 << 20),
            refs.clone(),
        )
        .await
        .map_or(0, |n| n);
        drop(clients);
        (outcomes, elapsed, honest == refs.len())
    });
    let loaded_kib = crate::peak_rss_kib(pid);
    // Closing stdin stops the child.
    drop(child.stdin.take());
    let _ = child.wait();

    let total = connections * calls;
    let count = |c: Code| outcomes.get(&c).copied().unwrap_or(0);
    let (ok, exhausted) = (count(Code::Ok), count(Code::ResourceExhausted));
    let defaults = P2pConfig::default().grpc;
    let mut s = Section::new(
        "load",
        "Load: memory and admission under thousands of in-flight fetches",
        format!(
            "One node in a child process serves a {COMMITS}-commit chain from memory (default \
             settings: {} fetches per peer, {} in all, {} inbound connections of which {} are \
             reserved for the committee). {connections} connections to it, half authenticated \
             (each its own identity) and half anonymous (one shared allowance), keep {total} \
             FetchBlocks of {} blocks in flight at once; connections past the {} ordinary slots \
             are closed as they arrive, and their calls end as the connection does (other \
             outcomes). Reference: the node's own peak RSS before the storm.",
            defaults.max_concurrent_fetches_per_peer,
            defaults.max_concurrent_fetches,
            defaults.max_inbound_connections,
            defaults.reserved_inbound_connections,
            refs.len(),
            defaults
                .max_inbound_connections
                .saturating_sub(defaults.reserved_inbound_connections)
        ),
        &[
            "phase",
            "peak RSS (MiB)",
            "of idle",
            "calls served",
            "RESOURCE_EXHAUSTED",
            "other outcomes",
            "time (s)",
        ],
    );
    s.row(
        "idle, serving",
        vec![
            Cell::num(idle_kib as f64 / 1024.0, 1),
            Cell::Ratio(1.0),
            Cell::Empty,
            Cell::Empty,
            Cell::Empty,
            Cell::Empty,
        ],
    );
    s.row(
        format!("{total} fetches in flight"),
        vec![
            Cell::num(loaded_kib as f64 / 1024.0, 1),
            Cell::Ratio(loaded_kib as f64 / idle_kib.max(1) as f64),
            Cell::int(ok as f64),
            Cell::int(exhausted as f64),
            Cell::text((total - ok - exhausted).to_string()),
            Cell::secs(elapsed),
        ],
    );
    s.notes.push(format!(
        "An honest peer was {} after the storm.",
        if honest { "served" } else { "NOT served" }
    ));
    let mut others: Vec<_> = outcomes
        .iter()
        .filter(|(code, _)| !matches!(code, Code::Ok | Code::ResourceExhausted))
        .map(|(code, n)| format!("{n} {code:?}"))
        .collect();
    if !others.is_empty() {
        others.sort();
        s.notes
            .push(format!("Other outcomes, by status: {}.", others.join(", ")));
    }
    s
}

/// The loaded node, in a child process: serves the chain, prints
/// `address peer-id-hex`, and stops when its stdin closes.
pub fn child() {
    let chain = chain();
    let store = MemStore::new(chain.genesis());
    chain.write_to(&store, 100).expect("the chain writes");
    let node = soma_testkit::node(&chain, 1, P2pConfig::default(), Arc::new(store));
    crate::serve_until_stdin_closes(node);
}
