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

/// Bytes a protobuf `bytes` field adds to its content besides the length
/// prefix: the one-byte key of a field numbered below 16.
const FIELD_KEY_BYTES: usize = 1;

/// Length of the protobuf varint encoding `value`: 7 bits per byte.
const fn varint_bytes(value: usize) -> usize {
    let bits = usize::BITS - value.leading_zeros();
    if bits == 0 {
        1
    } else {
        bits.div_ceil(7) as usize
    }
}

impl Limits {
    /// The largest FetchCommits response an honest server sends, in encoded
    /// protobuf bytes, for a server reading commits within
    /// `commit_budget_bytes` from an epoch whose committee has
    /// `committee_size` members.
    ///
    /// What a server promises, and this bound adds up:
    /// - the commits' encodings total at most `commit_budget_bytes`, except
    ///   that the first commit always goes (so a caller always makes
    ///   progress): at most `max(commit_budget_bytes, max_commit_bytes)`;
    /// - there are at most `max_commits_per_batch` commits (a verifier
    ///   refuses more);
    /// - the certifier blocks are a minimal quorum, one block per author:
    ///   at most `committee_size` blocks of at most `max_block_bytes` each;
    /// - each commit and block is a protobuf `bytes` field: a one-byte key
    ///   and a varint length prefix around its encoding.
    ///
    /// A server refuses to send more, and a client sets its decoding cap for
    /// one FetchCommits call to this value with the committee of the epoch
    /// it expects. Saturates instead of overflowing.
    pub fn max_fetch_commits_response_bytes(
        &self,
        commit_budget_bytes: usize,
        committee_size: usize,
    ) -> usize {
        let commit_field = FIELD_KEY_BYTES + varint_bytes(self.max_commit_bytes);
        let block_field = FIELD_KEY_BYTES + varint_bytes(self.max_block_bytes);
        let commits = commit_budget_bytes
            .max(self.max_commit_bytes)
            .saturating_add(self.max_commits_per_batch.saturating_mul(commit_field));
        let certifiers =
            committee_size.saturating_mul(self.max_block_bytes.saturating_add(block_field));
        commits.saturating_add(certifiers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varint_bytes_counts_seven_bits_per_byte() {
        assert_eq!(varint_bytes(0), 1);
        assert_eq!(varint_bytes(127), 1);
        assert_eq!(varint_bytes(128), 2);
        assert_eq!(varint_bytes(16_383), 2);
        assert_eq!(varint_bytes(16_384), 3);
        assert_eq!(varint_bytes(1 << 20), 3);
        assert_eq!(varint_bytes(4 << 20), 4);
        assert_eq!(varint_bytes(usize::MAX), 10);
    }

    #[test]
    fn fetch_commits_response_bound_adds_commits_certifiers_and_framing() {
        let limits = Limits::default();
        // 4 MiB of commits, 1000 commit fields of 1 + 3 bytes, and four
        // blocks of 4 MiB with 1 + 4 bytes each.
        assert_eq!(
            limits.max_fetch_commits_response_bytes(4 << 20, 4),
            (4 << 20) + 1_000 * 4 + 4 * ((4 << 20) + 5)
        );
        // A budget below one commit still lets the largest commit through.
        assert_eq!(
            limits.max_fetch_commits_response_bytes(0, 1),
            (1 << 20) + 1_000 * 4 + (4 << 20) + 5
        );
        assert_eq!(
            limits.max_fetch_commits_response_bytes(usize::MAX, 4),
            usize::MAX
        );
    }
}
