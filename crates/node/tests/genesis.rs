//! A network described by a public genesis: validators who each made their
//! own keys with `soma-p2p keygen`, a genesis assembled from their public
//! files with `soma-p2p genesis --validator`, and the refusals of a genesis
//! that describes no valid committee.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;
use std::time::Duration;

use soma_chain::{ChainBuilder, ChainConfig};
use soma_store::RedbStore;
use soma_types::{ChainId, KeyPair};

mod common;
use common::*;

const VALIDATORS: u16 = 4;
const COMMITS: u64 = 600;
const COMMITS_PER_EPOCH: u64 = 250;
const PATIENCE: Duration = Duration::from_secs(90);

fn path(p: &Path) -> &str {
    p.to_str().expect("temporary paths are UTF-8")
}

/// `soma-p2p keygen --out dir`, checked.
fn keygen(dir: &Path) {
    let out = soma(&["keygen", "--out", path(dir)]);
    assert!(out.status.success(), "{}", stderr(&out));
}

/// The key pair in a key file `keygen` wrote.
fn read_key(file: &Path) -> KeyPair {
    let mut seed = [0u8; 32];
    hex::decode_to_slice(fs::read_to_string(file).unwrap().trim(), &mut seed).unwrap();
    KeyPair::from_seed(seed)
}

/// `soma-p2p genesis --out out` with one `--validator`, `--stake` and
/// `--address` per entry, and epochs of [`COMMITS_PER_EPOCH`].
fn genesis_of(out: &Path, entries: &[(&Path, &str, &str)]) -> Output {
    let epoch = COMMITS_PER_EPOCH.to_string();
    let mut args = vec!["genesis", "--out", path(out), "--commits-per-epoch", &epoch];
    for (public, stake, address) in entries {
        args.extend([
            "--validator",
            path(public),
            "--stake",
            stake,
            "--address",
            address,
        ]);
    }
    soma(&args)
}

/// Checks `output` is a usage failure whose one-line message contains
/// each of `needles`.
fn assert_refused(output: &Output, needles: &[&str]) {
    let err = stderr(output);
    assert_eq!(output.status.code(), Some(2), "stderr: {err}");
    assert_eq!(err.lines().count(), 1, "one line expected, got:\n{err}");
    for needle in needles {
        assert!(err.contains(needle), "`{needle}` missing from: {err}");
    }
}

#[test]
fn validators_with_their_own_keys_and_a_public_genesis_serve_a_fresh_node() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = free_ports(VALIDATORS);
    let addresses: Vec<String> = (0..VALIDATORS)
        .map(|i| format!("127.0.0.1:{}", base + i))
        .collect();

    // Each validator makes its keys on its own; only the public files meet.
    let key_dirs: Vec<PathBuf> = (0..VALIDATORS)
        .map(|i| d.join(format!("validator-{i}/keys")))
        .collect();
    for keys in &key_dirs {
        keygen(keys);
    }
    let publics: Vec<PathBuf> = key_dirs.iter().map(|k| k.join("public.toml")).collect();
    let stakes: Vec<String> = (1..=VALIDATORS).map(|s| s.to_string()).collect();
    let entries: Vec<(&Path, &str, &str)> = (0..VALIDATORS as usize)
        .map(|i| {
            (
                publics[i].as_path(),
                stakes[i].as_str(),
                addresses[i].as_str(),
            )
        })
        .collect();
    let out = genesis_of(d, &entries);
    assert!(out.status.success(), "{}", stderr(&out));
    let printed_id = field(&stdout(&out), "chain id")
        .expect("genesis prints the chain id")
        .to_string();

    // The genesis holds public keys only, and no producer secret is made.
    let genesis = d.join("genesis.toml");
    let text = fs::read_to_string(&genesis).unwrap();
    assert!(!d.join("producer.toml").exists());
    for keys in &key_dirs {
        for secret in ["network.key", "protocol.key"] {
            let secret = fs::read_to_string(keys.join(secret)).unwrap();
            assert!(!text.contains(secret.trim()), "a secret key in:\n{text}");
        }
    }
    let committee = genesis_committee(&genesis);
    assert_eq!(
        hex::encode(ChainId::from_genesis(&committee).0.0),
        printed_id
    );
    assert_eq!(committee.total_stake(), 10);

    // Consensus is not part of this binary: the test plays the committee,
    // each validator signing with the protocol key it made.
    let keys: Vec<(KeyPair, KeyPair)> = key_dirs
        .iter()
        .map(|k| {
            (
                read_key(&k.join("network.key")),
                read_key(&k.join("protocol.key")),
            )
        })
        .collect();
    let chain = ChainBuilder::new(ChainConfig {
        stakes: (1..=VALIDATORS as u64).collect(),
        addresses: Some(addresses.clone()),
        commits_per_epoch: Some(COMMITS_PER_EPOCH),
        keys: Some(Arc::new(keys)),
        ..ChainConfig::default()
    })
    .build(COMMITS);
    assert_eq!(chain.genesis(), &committee);
    let stores: Vec<PathBuf> = (0..VALIDATORS)
        .map(|i| d.join(format!("validator-{i}/data/chain.redb")))
        .collect();
    fs::create_dir_all(stores[0].parent().unwrap()).unwrap();
    {
        let store = RedbStore::open(&stores[0], &committee).unwrap();
        chain.write_to(&store, BATCH).unwrap();
    }
    for store in &stores[1..] {
        fs::create_dir_all(store.parent().unwrap()).unwrap();
        fs::copy(&stores[0], store).unwrap();
    }

    let (addresses, configs, logs) = validator_network(d, base, VALIDATORS);
    let _validators: Vec<Spawned> = (0..VALIDATORS as usize)
        .map(|i| run_node(&configs[i], &logs[i]))
        .collect();
    for address in &addresses {
        wait_for("a validator to serve", PATIENCE, || {
            height(address) == Some(COMMITS)
        });
    }

    // A full node: the genesis and keys of its own, one seed by address.
    keygen(&d.join("joiner/keys"));
    let jport = free_port();
    let jmetrics = format!("127.0.0.1:{}", free_port());
    let config = node_config(
        d,
        "joiner",
        jport,
        &addresses[..1],
        &[&format!("metrics-address = \"{jmetrics}\"")],
    );
    let jlog = d.join("joiner.log");
    let mut joiner = run_node(&config, &jlog);
    let joiner_address = format!("127.0.0.1:{jport}");
    let report = || fs::read_to_string(&jlog).unwrap_or_default();
    wait_or_report(
        "the fresh node to sync",
        PATIENCE,
        || height(&joiner_address) == Some(COMMITS),
        report,
    );
    wait_or_report(
        "the fresh node to discover every validator",
        PATIENCE,
        || metric(&jmetrics, "soma_known_peers") == Some(VALIDATORS as f64),
        report,
    );

    nix::sys::signal::kill(joiner.pid(), nix::sys::signal::Signal::SIGTERM).unwrap();
    let exit = joiner.wait_for(PATIENCE).expect("the fresh node stops");
    assert!(exit.success(), "{exit}\n{}", report());
    assert_eq!(
        check_store(&d.join("joiner/data/chain.redb"), &committee, &chain),
        COMMITS
    );
}

#[test]
fn a_genesis_is_refused_naming_the_bad_entry() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let publics: Vec<PathBuf> = (0..3)
        .map(|i| {
            let keys = d.join(format!("v{i}"));
            keygen(&keys);
            keys.join("public.toml")
        })
        .collect();
    let (a, b, c) = (&*publics[0], &*publics[1], &*publics[2]);
    let out = d.join("out");

    // A malformed key, named with its file.
    let text = fs::read_to_string(c).unwrap();
    let broken = d.join("broken.toml");
    let protocol_line = text
        .lines()
        .find(|l| l.starts_with("protocol-key = "))
        .unwrap();
    fs::write(
        &broken,
        text.replace(protocol_line, "protocol-key = \"0123\""),
    )
    .unwrap();
    assert_refused(
        &genesis_of(&out, &[(a, "1", "h:7001"), (&broken, "1", "h:7003")]),
        &[
            path(&broken),
            "protocol-key must be 64 hex characters, got \"0123\"",
        ],
    );

    // A repeated key.
    assert_refused(
        &genesis_of(
            &out,
            &[(a, "1", "h:7001"), (b, "1", "h:7002"), (a, "1", "h:7003")],
        ),
        &["validator 3 (h:7003): network-key repeats the network key of validator 1"],
    );

    // A zero stake.
    assert_refused(
        &genesis_of(&out, &[(a, "1", "h:7001"), (b, "0", "h:7002")]),
        &["validator 2 (h:7002): stake must be positive"],
    );

    // A total that overflows.
    let max = u64::MAX.to_string();
    assert_refused(
        &genesis_of(&out, &[(a, &max, "h:7001"), (b, "1", "h:7002")]),
        &["validator 2 (h:7002): the total stake overflows 2^64 - 1"],
    );

    // An address that is not host:port.
    assert_refused(
        &genesis_of(&out, &[(a, "1", "h:7001"), (b, "1", "h")]),
        &["validator 2 (h): address \"h\" must be host:port"],
    );

    // An address peers refuse to dial.
    assert_refused(
        &genesis_of(&out, &[(a, "1", "h:7001"), (b, "1", "h:22")]),
        &["validator 2 (h:22)", "another service's port"],
    );

    // Each validator needs its stake and address.
    assert_refused(
        &soma(&[
            "genesis",
            "--out",
            path(&out),
            "--validator",
            path(a),
            "--validator",
            path(b),
            "--stake",
            "1",
            "--address",
            "h:7001",
            "--address",
            "h:7002",
        ]),
        &["got 2 validators, 1 stakes, 2 addresses"],
    );
    assert!(!out.join("genesis.toml").exists(), "nothing written");

    // A genesis edited by hand is checked again when a node starts.
    let ok = genesis_of(
        &out,
        &[(a, "1", "h:7001"), (b, "2", "h:7002"), (c, "3", "h:7003")],
    );
    assert!(ok.status.success(), "{}", stderr(&ok));
    let genesis = out.join("genesis.toml");
    let text = fs::read_to_string(&genesis).unwrap();
    assert_eq!(text.matches("stake = 2\n").count(), 1, "{text}");
    fs::write(&genesis, text.replace("stake = 2\n", "stake = 0\n")).unwrap();
    let mut config = default_config();
    config = set_line(
        &config,
        "genesis",
        &format!("genesis = \"{}\"", path(&genesis)),
    );
    config = set_line(
        &config,
        "keys-dir",
        &format!("keys-dir = \"{}\"", path(&d.join("v0"))),
    );
    let config_path = d.join("node.toml");
    fs::write(&config_path, config).unwrap();
    assert_refused(
        &soma(&["run", "--config", path(&config_path)]),
        &[
            path(&genesis),
            "validator 2 (h:7002): stake must be positive",
        ],
    );
}
