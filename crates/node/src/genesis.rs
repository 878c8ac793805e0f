//! The genesis: the public description of a network's first committee.
//!
//! `genesis.toml` holds, for each validator, its network key (its peer id),
//! its protocol key (which signs its blocks), its stake and its address, in
//! committee order, plus the epoch parameters. It holds no secret: a node
//! needs only this file and its own keys. The chain id is the digest of the
//! committee it describes ([`ChainId::from_genesis`], docs/protocol.md).
//!
//! A local network (`soma-p2p genesis --validators N`) also has a block
//! producer that plays every validator; its secret, the seed its keys are
//! derived from, is kept in [`PRODUCER_FILE`] beside the genesis, never in
//! it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use soma_chain::ChainConfig;
use soma_types::{Authority, ChainId, Committee, PeerId, PublicKey, Stake};

/// File name of the genesis.
pub const GENESIS_FILE: &str = "genesis.toml";
/// File name, beside the genesis, of a local network's producer secrets.
pub const PRODUCER_FILE: &str = "producer.toml";
/// File name, in a key directory, of the node's public keys.
pub const PUBLIC_FILE: &str = "public.toml";

/// The genesis file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct GenesisFile {
    /// Commits per epoch for block producers; absent: one epoch. Epochs end
    /// in the chain itself (a leader block's end of epoch), so a syncing
    /// node does not read it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commits_per_epoch: Option<u64>,
    /// The genesis committee, in authority order.
    #[serde(rename = "validator")]
    pub validators: Vec<ValidatorEntry>,
}

/// One validator of the genesis committee.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ValidatorEntry {
    /// Network public key, the validator's peer id (64 hex characters).
    pub network_key: String,
    /// Protocol public key, which signs its blocks (64 hex characters).
    pub protocol_key: String,
    /// Voting power, positive.
    pub stake: Stake,
    /// Where it listens, `host:port`.
    pub address: String,
}

/// A node's public keys (`public.toml`, written by `soma-p2p keygen`): what
/// a genesis needs of a validator.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct PublicFile {
    /// The peer id: the network public key, as peers see it.
    pub peer_id: String,
    /// Network public key (64 hex characters).
    pub network_key: String,
    /// Protocol public key (64 hex characters).
    pub protocol_key: String,
}

impl PublicFile {
    /// The public file of a network and a protocol key.
    pub fn new(network: &PublicKey, protocol: &PublicKey) -> Self {
        PublicFile {
            peer_id: hex::encode(network.to_bytes()),
            network_key: hex::encode(network.to_bytes()),
            protocol_key: hex::encode(protocol.to_bytes()),
        }
    }

    /// Reads a public file, checking its keys are valid and agree.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = crate::files::read_text(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let file: PublicFile =
            toml::from_str(&text).map_err(|e| format!("{}: {}", path.display(), e.message()))?;
        let at = |e: String| format!("{}: {e}", path.display());
        parse_key("network-key", &file.network_key).map_err(at)?;
        parse_key("protocol-key", &file.protocol_key).map_err(at)?;
        if file.peer_id != file.network_key {
            return Err(at("peer-id differs from network-key (the peer id is the \
                 network key); write the file again with `soma-p2p keygen`"
                .into()));
        }
        Ok(file)
    }
}

/// The secrets of a local network's block producer: the seed every
/// validator key and the chain are derived from, and the shape of its
/// blocks. Written beside the genesis, mode 0600.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ProducerFile {
    /// Seed of every validator key and of the payloads (64 hex characters).
    pub seed: String,
    /// Signed transactions per block.
    pub transactions_per_block: usize,
    /// Payload bytes per transaction.
    pub payload_bytes: usize,
}

/// A key in hex, as a public key, or why not.
fn parse_key(field: &str, hex_key: &str) -> Result<PublicKey, String> {
    let mut bytes = [0u8; 32];
    hex::decode_to_slice(hex_key, &mut bytes)
        .map_err(|_| format!("{field} must be 64 hex characters, got {hex_key:?}"))?;
    let key = PublicKey::from_bytes(&bytes)
        .map_err(|_| format!("{field} {hex_key} is not an ed25519 public key"))?;
    if key.is_weak() {
        return Err(format!(
            "{field} {hex_key} is a weak key (of small order: anyone can sign for it)"
        ));
    }
    Ok(key)
}

/// Whether `address` is `host:port` with a port in 1..=65535.
pub(crate) fn check_address(address: &str) -> Result<(), String> {
    let (host, port) = address
        .rsplit_once(':')
        .ok_or_else(|| format!("address {address:?} must be host:port"))?;
    let port: u16 = port
        .parse()
        .map_err(|_| format!("address {address:?} has no valid port"))?;
    if host.is_empty() || port == 0 {
        return Err(format!("address {address:?} must be host:port"));
    }
    // An IPv6 address is bracketed: `2001:db8::1` would read as host
    // `2001:db8:` and port 1.
    if host.contains(':') && !(host.starts_with('[') && host.ends_with(']')) {
        return Err(format!(
            "address {address:?}: write an IPv6 address in brackets, [addr]:port"
        ));
    }
    Ok(())
}

/// Whether peers could dial a validator at `address`, as the `genesis`
/// command writes it: [`check_address`], and neither every address
/// (`0.0.0.0`, `::`: where a node listens, not where it is reached) nor
/// another service's port, which peers refuse to dial. A genesis already
/// written is not held to this: its chain id is fixed.
pub(crate) fn check_validator_address(address: &str) -> Result<(), String> {
    check_address(address)?;
    let (host, port) = address.rsplit_once(':').unwrap_or((address, ""));
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host
        .parse::<std::net::IpAddr>()
        .is_ok_and(|ip| ip.is_unspecified())
    {
        return Err(format!(
            "address {address:?} is every address of a host, which peers cannot dial: \
             give the address peers reach the validator at"
        ));
    }
    if port
        .parse()
        .is_ok_and(soma_actors::discovery::is_service_port)
    {
        return Err(format!(
            "address {address:?} is at another service's port (SSH, mail, databases... \
             soma_actors::discovery::SERVICE_PORTS), which peers refuse to dial; \
             7000 is usual"
        ));
    }
    Ok(())
}

impl GenesisFile {
    /// Reads and checks a genesis file.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = crate::files::read_text(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let file: GenesisFile =
            toml::from_str(&text).map_err(|e| format!("{}: {}", path.display(), e.message()))?;
        file.committee()
            .map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(file)
    }

    /// The genesis of `committee`, with the epoch parameter for producers.
    pub fn of(committee: &Committee, commits_per_epoch: Option<u64>) -> Self {
        GenesisFile {
            commits_per_epoch,
            validators: committee
                .authorities()
                .map(|(_, a)| ValidatorEntry {
                    network_key: hex::encode(a.network_key.0),
                    protocol_key: hex::encode(a.protocol_key.to_bytes()),
                    stake: a.stake,
                    address: a.address.clone(),
                })
                .collect(),
        }
    }

    /// The genesis committee (epoch 0), or why the file does not describe
    /// one: the message names the entry (1-based, in file order) and what
    /// is wrong with it.
    pub fn committee(&self) -> Result<Committee, String> {
        if self.validators.is_empty() {
            return Err("the genesis has no [[validator]]".into());
        }
        if self.commits_per_epoch == Some(0) {
            return Err("commits-per-epoch must be positive (or absent: one epoch)".into());
        }
        let mut networks: HashMap<&str, usize> = HashMap::new();
        let mut protocols: HashMap<&str, usize> = HashMap::new();
        let mut total: Stake = 0;
        let mut authorities = Vec::with_capacity(self.validators.len());
        for (i, v) in self.validators.iter().enumerate() {
            let n = i + 1;
            let at = |e: String| format!("validator {n} ({}): {e}", v.address);
            let network = parse_key("network-key", &v.network_key).map_err(at)?;
            let protocol = parse_key("protocol-key", &v.protocol_key).map_err(at)?;
            if let Some(first) = networks.insert(&v.network_key, n) {
                return Err(at(format!(
                    "network-key repeats the network key of validator {first}"
                )));
            }
            if let Some(first) = protocols.insert(&v.protocol_key, n) {
                return Err(at(format!(
                    "protocol-key repeats the protocol key of validator {first}"
                )));
            }
            if v.stake == 0 {
                return Err(at("stake must be positive".into()));
            }
            total = total
                .checked_add(v.stake)
                .ok_or_else(|| at("the total stake overflows 2^64 - 1".into()))?;
            check_address(&v.address).map_err(at)?;
            authorities.push(Authority {
                stake: v.stake,
                protocol_key: protocol,
                network_key: PeerId::from(network),
                address: v.address.clone(),
            });
        }
        Committee::new(0, authorities).map_err(|e| e.to_string())
    }

    /// The chain id.
    pub fn chain_id(&self) -> Result<ChainId, String> {
        Ok(ChainId::from_genesis(&self.committee()?))
    }
}

impl ProducerFile {
    /// A fresh producer: a random seed.
    pub fn generate(transactions_per_block: usize, payload_bytes: usize) -> Self {
        ProducerFile {
            seed: hex::encode(soma_types::KeyPair::generate().secret_bytes()),
            transactions_per_block,
            payload_bytes,
        }
    }

    /// The producer file beside the genesis at `genesis`.
    pub fn path_beside(genesis: &Path) -> PathBuf {
        genesis
            .parent()
            .unwrap_or_else(|| Path::new("."))
            .join(PRODUCER_FILE)
    }

    /// Reads the producer file at `path`.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = crate::files::read_text(path).map_err(|e| {
            format!(
                "cannot read {}: {e}; block production needs the local network's \
                 producer secrets, written by `soma-p2p genesis --validators N`",
                path.display()
            )
        })?;
        toml::from_str(&text).map_err(|e| format!("{}: {}", path.display(), e.message()))
    }

    /// The chain this producer builds on `genesis`, checked to start from
    /// the genesis committee.
    pub fn chain_config(&self, genesis: &GenesisFile) -> Result<ChainConfig, String> {
        let mut seed = [0u8; 32];
        hex::decode_to_slice(&self.seed, &mut seed)
            .map_err(|_| "seed must be 64 hex characters".to_string())?;
        let limits = soma_types::Limits::default();
        if self.transactions_per_block > limits.max_transactions_per_block {
            return Err(format!(
                "transactions-per-block must be at most {}, got {}",
                limits.max_transactions_per_block, self.transactions_per_block
            ));
        }
        if self.payload_bytes > limits.max_transaction_payload_bytes {
            return Err(format!(
                "payload-bytes must be at most {}, got {}",
                limits.max_transaction_payload_bytes, self.payload_bytes
            ));
        }
        let chain = ChainConfig {
            seed,
            stakes: genesis.validators.iter().map(|v| v.stake).collect(),
            addresses: Some(
                genesis
                    .validators
                    .iter()
                    .map(|v| v.address.clone())
                    .collect(),
            ),
            transactions_per_block: self.transactions_per_block,
            payload_bytes: self.payload_bytes,
            commits_per_epoch: genesis.commits_per_epoch,
            ..ChainConfig::default()
        };
        let committee = genesis.committee()?;
        if chain.committee(0) != committee {
            return Err(
                "the producer's seed does not derive the genesis committee's keys: \
                 this producer belongs to another genesis"
                    .into(),
            );
        }
        Ok(chain)
    }
}

/// A local network of `stakes.len()` validators at `addresses`: its
/// genesis and its producer.
pub fn local_network(
    stakes: &[Stake],
    addresses: Vec<String>,
    commits_per_epoch: Option<u64>,
    transactions_per_block: usize,
) -> (GenesisFile, ProducerFile, ChainConfig) {
    let producer = ProducerFile::generate(transactions_per_block, 32);
    let mut seed = [0u8; 32];
    hex::decode_to_slice(&producer.seed, &mut seed).expect("a generated seed is hex");
    let chain = ChainConfig {
        seed,
        stakes: stakes.to_vec(),
        addresses: Some(addresses),
        transactions_per_block,
        payload_bytes: producer.payload_bytes,
        commits_per_epoch,
        ..ChainConfig::default()
    };
    let genesis = GenesisFile::of(&chain.committee(0), commits_per_epoch);
    (genesis, producer, chain)
}

#[cfg(test)]
mod tests {
    use soma_types::KeyPair;

    use super::*;

    fn entry(i: u8, stake: Stake) -> ValidatorEntry {
        ValidatorEntry {
            network_key: hex::encode(KeyPair::from_seed([i; 32]).public().to_bytes()),
            protocol_key: hex::encode(KeyPair::from_seed([100 + i; 32]).public().to_bytes()),
            stake,
            address: format!("10.0.0.{i}:7000"),
        }
    }

    fn genesis(validators: Vec<ValidatorEntry>) -> GenesisFile {
        GenesisFile {
            commits_per_epoch: None,
            validators,
        }
    }

    fn refusal(validators: Vec<ValidatorEntry>) -> String {
        genesis(validators).committee().unwrap_err()
    }

    #[test]
    fn a_good_genesis_gives_its_committee_in_file_order() {
        let g = genesis(vec![entry(1, 5), entry(2, 7)]);
        let c = g.committee().unwrap();
        assert_eq!(c.epoch(), 0);
        assert_eq!(c.total_stake(), 12);
        let a = c.authority(soma_types::AuthorityIndex(1)).unwrap();
        assert_eq!(hex::encode(a.network_key.0), g.validators[1].network_key);
        assert_eq!(a.address, "10.0.0.2:7000");
        assert_eq!(GenesisFile::of(&c, None), g);
        let text = toml::to_string(&g).unwrap();
        assert_eq!(toml::from_str::<GenesisFile>(&text).unwrap(), g);
    }

    #[test]
    fn each_bad_entry_is_refused_by_its_number() {
        let mut bad_hex = entry(2, 1);
        bad_hex.network_key = "zz".into();
        assert_eq!(
            refusal(vec![entry(1, 1), bad_hex]),
            "validator 2 (10.0.0.2:7000): network-key must be 64 hex characters, got \"zz\""
        );

        // The y coordinate 2 is on no point of the curve.
        let mut off_curve = entry(2, 1);
        off_curve.protocol_key = hex::encode({
            let mut b = [0u8; 32];
            b[0] = 2;
            b
        });
        let message = refusal(vec![entry(1, 1), off_curve]);
        assert!(
            message.starts_with("validator 2 (10.0.0.2:7000): protocol-key 0200")
                && message.ends_with("is not an ed25519 public key"),
            "{message}"
        );

        // The identity point has order 1.
        let mut weak = entry(1, 1);
        weak.protocol_key = hex::encode({
            let mut b = [0u8; 32];
            b[0] = 1;
            b
        });
        let message = refusal(vec![weak]);
        assert!(message.contains("is a weak key"), "{message}");

        let mut repeated_network = entry(3, 1);
        repeated_network.network_key = entry(1, 1).network_key;
        assert_eq!(
            refusal(vec![entry(1, 1), entry(2, 1), repeated_network]),
            "validator 3 (10.0.0.3:7000): network-key repeats the network key of validator 1"
        );

        let mut repeated_protocol = entry(2, 1);
        repeated_protocol.protocol_key = entry(1, 1).protocol_key;
        assert_eq!(
            refusal(vec![entry(1, 1), repeated_protocol]),
            "validator 2 (10.0.0.2:7000): protocol-key repeats the protocol key of validator 1"
        );

        assert_eq!(
            refusal(vec![entry(1, 1), entry(2, 0)]),
            "validator 2 (10.0.0.2:7000): stake must be positive"
        );

        assert_eq!(
            refusal(vec![entry(1, u64::MAX - 1), entry(2, 1), entry(3, 1)]),
            "validator 3 (10.0.0.3:7000): the total stake overflows 2^64 - 1"
        );

        let mut no_port = entry(1, 1);
        no_port.address = "10.0.0.1".into();
        assert_eq!(
            refusal(vec![no_port]),
            "validator 1 (10.0.0.1): address \"10.0.0.1\" must be host:port"
        );

        assert_eq!(refusal(vec![]), "the genesis has no [[validator]]");
    }

    /// The genesis file of the protocol's test vectors reads to the
    /// committee, encoding and chain id the vectors give.
    #[test]
    fn the_test_vector_genesis_gives_its_chain_id() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/test-vectors.json");
        let vectors: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let vector = &vectors["genesis"];
        let file: GenesisFile = toml::from_str(vector["genesis_toml"].as_str().unwrap()).unwrap();
        let committee = file.committee().unwrap();
        assert_eq!(
            hex::encode(soma_types::codec::encode(&committee)),
            vector["encoding"].as_str().unwrap()
        );
        assert_eq!(
            hex::encode(file.chain_id().unwrap().0.0),
            vector["chain_id"].as_str().unwrap()
        );
        // And the file this binary writes for that committee is the same.
        assert_eq!(
            toml::to_string(&GenesisFile::of(&committee, file.commits_per_epoch)).unwrap(),
            vector["genesis_toml"].as_str().unwrap()
        );
    }

    #[test]
    fn a_producer_of_another_genesis_is_refused() {
        let (genesis, producer, chain) =
            local_network(&[1, 1, 1], vec!["127.0.0.1:1".into(); 3], Some(10), 2);
        assert_eq!(producer.chain_config(&genesis).unwrap().seed, chain.seed);
        let (other, _, _) = local_network(&[1, 1, 1], vec!["127.0.0.1:1".into(); 3], Some(10), 2);
        let message = producer.chain_config(&other).unwrap_err();
        assert!(message.contains("belongs to another genesis"), "{message}");
    }
}
