/// Size limits applied when decoding and verifying data from the network.
///
/// Every limit is named so a node's configuration can set it; the defaults
/// suit the reference network.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Limits {
    /// Largest transaction payload, in bytes.
    pub max_transaction_payload_bytes: usize,
    /// Most transactions in one block.
    pub max_transactions_per_block: usize,
    /// Largest encoded block, in bytes.
    pub max_block_bytes: usize,
    /// Most commit votes one block may carry.
    pub max_votes_per_block: usize,
    /// Most blocks one commit may name.
    pub max_blocks_per_commit: usize,
    /// Largest encoded commit, in bytes.
    pub max_commit_bytes: usize,
    /// Most commits in one fetched batch.
    pub max_commits_per_batch: usize,
    /// Most addresses a node info may list.
    pub max_node_addresses: usize,
    /// Longest address in a node info, in bytes.
    pub max_address_bytes: usize,
    /// Largest encoded node info, in bytes.
    pub max_node_info_bytes: usize,
    /// Oldest node info accepted, in milliseconds of age.
    pub node_info_max_age_ms: u64,
    /// How far in the future a node info's timestamp may be, in milliseconds.
    pub node_info_max_skew_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_transaction_payload_bytes: 64 << 10,
            max_transactions_per_block: 10_000,
            max_block_bytes: 4 << 20,
            max_votes_per_block: 1_000,
            max_blocks_per_commit: 10_000,
            max_commit_bytes: 1 << 20,
            max_commits_per_batch: 1_000,
            max_node_addresses: 4,
            max_address_bytes: 256,
            max_node_info_bytes: 2 << 10,
            node_info_max_age_ms: 24 * 60 * 60 * 1000,
            node_info_max_skew_ms: 30 * 1000,
        }
    }
}
