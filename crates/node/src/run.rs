//! `soma-p2p run`: one node, until Ctrl-C, SIGTERM or SIGHUP.

use std::path::Path;
use std::sync::Arc;

use soma_actors::P2pBuilder;
use soma_store::{ConsensusStore, RedbStore};
use tokio::signal::unix::{SignalKind, signal};

use crate::config::NodeConfig;
use crate::genesis::{GenesisFile, ProducerFile};
use crate::keys;

/// File name of the store in the data directory.
pub const STORE_FILE: &str = "chain.redb";

/// Runs the node configured by `config_path`, producing blocks at
/// `commit_rate` if given. Returns when the node has stopped gracefully
/// after a signal, or with an error naming the actor when the node stopped
/// itself because an actor failed past its restarts. `arenas` is the
/// malloc arena limit the program set (logged once the config is read).
pub async fn run(
    config_path: &Path,
    commit_rate: Option<f64>,
    arenas: Option<usize>,
) -> Result<(), crate::Failure> {
    let mut config = NodeConfig::load(config_path).map_err(crate::Failure::usage)?;
    if let Some(rate) = commit_rate {
        if !(0.1..=10_000.0).contains(&rate) {
            return Err(crate::Failure::usage(format!(
                "--commit-rate must be between 0.1 and 10000, got {rate}"
            )));
        }
        let max_commits = config.producer.as_ref().map_or(0, |p| p.max_commits);
        config.producer = Some(crate::config::ProducerConfig {
            commit_rate: rate,
            max_commits,
        });
    }
    let genesis = GenesisFile::load(&config.genesis)
        .map_err(|e| crate::Failure::usage(format!("genesis: {e}")))?;
    let committee = genesis.committee().map_err(crate::Failure::usage)?;
    let keys = keys::read_keys(&config.keys_dir).map_err(|e| {
        let fix = match &e {
            // Nothing at all there (a link to a volume not mounted yet
            // is something: no hint to make keys over it).
            keys::KeyError::Io { .. }
                if std::fs::symlink_metadata(config.keys_dir.join(keys::NETWORK_KEY)).is_err() =>
            {
                format!(
                    "; keys-dir is {}: point it at the node's keys (a validator's are those \
                     its genesis entry names), or, for a new node only, make them with \
                     `soma-p2p keygen --out {}`",
                    config.keys_dir.display(),
                    config.keys_dir.display()
                )
            }
            _ => String::new(),
        };
        crate::Failure::usage(format!("{e}{fix}"))
    })?;
    match arenas {
        Some(arenas) => tracing::info!(arenas, "malloc arenas limited to one per core"),
        None => tracing::info!(
            variable = soma_actors::system::ARENA_ENV,
            "malloc arenas left to the C library"
        ),
    }
    // Before the store opens: a signal during its repair after a crash
    // waits for the repair to end rather than cut it short, and the
    // node then stops at once, cleanly.
    let signal_failed = |e: std::io::Error| crate::Failure::run(format!("signal handler: {e}"));
    let mut terminate = signal(SignalKind::terminate()).map_err(signal_failed)?;
    let mut interrupt = signal(SignalKind::interrupt()).map_err(signal_failed)?;
    // A hang-up (the terminal the node was started from closed) stops it
    // as SIGTERM does; left to its default it killed the node mid-write.
    // Not under `nohup`: a node started so runs on after a logout.
    let mut hangup = match crate::signals::hangup_ignored() {
        true => None,
        false => Some(signal(SignalKind::hangup()).map_err(signal_failed)?),
    };
    // What can be refused is refused before the node starts.
    let producing = match &config.producer {
        Some(producer) => {
            let secrets = ProducerFile::path_beside(&config.genesis);
            let chain = ProducerFile::load(&secrets)
                .and_then(|p| p.chain_config(&genesis))
                .map_err(|e| crate::Failure::usage(format!("{}: {e}", secrets.display())))?;
            Some((chain, producer.clone()))
        }
        None => None,
    };
    let metrics_listener = match config.metrics_address {
        Some(address) => Some(tokio::net::TcpListener::bind(address).await.map_err(|e| {
            crate::Failure::usage(format!(
                "metrics-address {address}: {e}; choose a free port, or leave the key out"
            ))
        })?),
        None => None,
    };
    std::fs::create_dir_all(&config.data_dir).map_err(|e| {
        crate::Failure::usage(format!(
            "data-dir {}: {e}; point data-dir at a directory the node may create and write",
            config.data_dir.display()
        ))
    })?;
    let store_path = config.data_dir.join(STORE_FILE);
    let wrong_chain = || {
        crate::Failure::usage(format!(
            "store {}: it belongs to another chain than genesis {} names; point data-dir \
             elsewhere, or use the genesis the store was made with",
            store_path.display(),
            config.genesis.display()
        ))
    };
    let store: Arc<dyn ConsensusStore> = Arc::new(
        RedbStore::open_with_cache(&store_path, &committee, config.store_cache_bytes).map_err(
            |e| match e {
                soma_store::Error::WrongChain => wrong_chain(),
                e => crate::Failure::run(format!("store {}: {e}", store_path.display())),
            },
        )?,
    );
    let peer_id = keys.peer_id();
    let handle = P2pBuilder::new(config.p2p_config(), keys.network, committee.clone(), store)
        .identity(keys.identity)
        .runtime(tokio::runtime::Handle::current())
        .start()
        .map_err(|e| match e {
            soma_actors::system::StartError::WrongChain => wrong_chain(),
            e => crate::Failure::run(e.to_string()),
        })?;
    tracing::info!(
        peer_id = %hex::encode(peer_id.0),
        address = %handle.local_addr(),
        "node running"
    );
    let advertised: Vec<String> = if config.external_addresses.is_empty() {
        vec![handle.local_addr().to_string()]
    } else {
        config.external_addresses.clone()
    };
    let advertised: Vec<String> = (advertised.iter())
        .map(|a| soma_actors::discovery::canonical_address(a))
        .collect();
    for note in crate::role::notes(&committee, peer_id, &keys.protocol, &advertised) {
        match note.warning {
            true => tracing::warn!("{}", note.text),
            false => tracing::info!("{}", note.text),
        }
    }

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    if let Some(listener) = metrics_listener {
        let mut stop = stop_rx.clone();
        let handle = handle.clone();
        let limits = config.metrics_limits();
        tokio::spawn(async move {
            let shutdown = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            if let Err(e) = crate::metrics::serve(handle, listener, limits, shutdown).await {
                tracing::error!(%e, "metrics server failed");
            }
        });
    }
    // A node with seeds that holds no connection says so (a node without
    // seeds may be a network's first, alone on purpose).
    let alone =
        (!config.seed_peers.is_empty()).then(|| tokio::spawn(crate::alone::watch(handle.clone())));
    let producer = producing.map(|(chain, producer)| {
        tokio::spawn(crate::producer::produce(
            handle.clone(),
            chain,
            producer.commit_rate,
            producer.max_commits,
        ))
    });

    let (failure, signalled) = tokio::select! {
        _ = interrupt.recv() => {
            tracing::info!("interrupted");
            (None, true)
        }
        _ = terminate.recv() => {
            tracing::info!("terminated");
            (None, true)
        }
        _ = crate::signals::recv(&mut hangup) => {
            tracing::info!("hung up");
            (None, true)
        }
        failure = handle.failed() => (failure, false),
    };
    // Stopped by a signal, a second one while the node stops (its server
    // drains for up to 5 s, a hung disk's store call holds it longer) ends
    // the process at once, with the shell's code for that signal: the
    // store's commits are atomic, so its next start finds the last one
    // whole, after a repair pass, as after a crash. (Stopped by a failure,
    // its error and exit code 1 are not cut short.)
    if signalled {
        // Not a second hang-up: a closing terminal often sends two (the
        // shell forwards one, the kernel sends another).
        tracing::info!("stopping; a second interrupt or terminate signal exits at once");
        tokio::spawn(async move {
            let code = tokio::select! {
                _ = interrupt.recv() => 130,
                _ = terminate.recv() => 143,
            };
            tracing::warn!("second signal: exiting without waiting for the node to stop");
            std::process::exit(code);
        });
    }
    // The producer goes first, and is gone before anything else stops: a
    // commit it offers a stopping node is refused, and its warning would
    // otherwise come after the error `run` ends with.
    if let Some(producer) = producer {
        producer.abort();
        let _ = producer.await;
    }
    if let Some(alone) = alone {
        alone.abort();
    }
    let _ = stop_tx.send(true);
    handle.shutdown().await;
    match failure {
        None => Ok(()),
        Some(failure) => Err(crate::Failure::run(failure)),
    }
}
