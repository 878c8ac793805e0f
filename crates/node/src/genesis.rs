//! The genesis of a local network: the committee's parameters, from which
//! every validator derives the same deterministic chain.

use std::path::Path;

use serde::{Deserialize, Serialize};
use soma_chain::ChainConfig;
use soma_types::{ChainId, Committee, Stake};

/// The genesis file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct GenesisFile {
    /// Seed of every validator key and of the chain (hex, 32 bytes).
    pub seed: String,
    /// Stake of each validator.
    pub stakes: Vec<Stake>,
    /// Address of each validator.
    pub addresses: Vec<String>,
    /// Signed transactions per block.
    pub transactions_per_block: usize,
    /// Payload bytes per transaction.
    pub payload_bytes: usize,
    /// Commits per epoch (absent: one epoch).
    #[serde(default)]
    pub commits_per_epoch: Option<u64>,
}

impl GenesisFile {
    /// Reads a genesis file.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let file: GenesisFile =
            toml::from_str(&text).map_err(|e| format!("{}: {}", path.display(), e.message()))?;
        file.chain_config()
            .map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(file)
    }

    /// The chain parameters.
    pub fn chain_config(&self) -> Result<ChainConfig, String> {
        let mut seed = [0u8; 32];
        hex::decode_to_slice(&self.seed, &mut seed)
            .map_err(|_| "seed must be 64 hex characters".to_string())?;
        if self.stakes.is_empty() || self.stakes.contains(&0) {
            return Err("stakes must be non-empty and positive".into());
        }
        if self.addresses.len() != self.stakes.len() {
            return Err("one address per validator is needed".into());
        }
        Ok(ChainConfig {
            seed,
            stakes: self.stakes.clone(),
            addresses: Some(self.addresses.clone()),
            transactions_per_block: self.transactions_per_block,
            payload_bytes: self.payload_bytes,
            commits_per_epoch: self.commits_per_epoch,
            ..ChainConfig::default()
        })
    }

    /// The genesis committee.
    pub fn committee(&self) -> Result<Committee, String> {
        Ok(soma_chain::ChainBuilder::new(self.chain_config()?)
            .genesis()
            .clone())
    }

    /// The chain id.
    pub fn chain_id(&self) -> Result<ChainId, String> {
        Ok(ChainId::from_genesis(&self.committee()?))
    }
}
