use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use soma_types::{
    Authority, AuthorityIndex, Block, BlockRef, ChainId, Commit, CommitIndex, CommitRef, Committee,
    Digest, EndOfEpoch, Epoch, KeyPair, PeerId, Round, Stake, Transaction, TrustedCommit,
    VerifiedBlock, genesis_block_refs, genesis_commit,
};

/// What chain to build.
#[derive(Clone, Debug)]
pub struct ChainConfig {
    /// Seed of every key and payload: the same seed gives the same chain.
    pub seed: [u8; 32],
    /// Stake of each validator; its length is the committee size.
    pub stakes: Vec<Stake>,
    /// Stakes of every committee after the genesis one, if they differ
    /// (a committee that grows or shrinks at the first epoch change); the
    /// validators are the first ones of `stakes`' and more, by index.
    pub later_stakes: Option<Vec<Stake>>,
    /// Listening address of each validator; `None` gives placeholder
    /// addresses on 127.0.0.1.
    pub addresses: Option<Vec<String>>,
    /// Signed transactions in each block.
    pub transactions_per_block: usize,
    /// Payload size of each transaction, in bytes.
    pub payload_bytes: usize,
    /// Commits per epoch; `None` keeps one epoch forever.
    pub commits_per_epoch: Option<u64>,
    /// Timestamp of the first round, in milliseconds.
    pub start_ms: u64,
    /// Time between rounds, in milliseconds.
    pub round_interval_ms: u64,
    /// Whether each epoch's committee is a new set of validators (network
    /// keys of their own); `false` keeps the same validators, with fresh
    /// protocol keys, in every epoch.
    pub rotate_validators: bool,
    /// Keys of each validator, `(network, protocol)`, kept in every epoch
    /// instead of keys derived from `seed`: a committee whose members made
    /// their own keys. Its length must match `stakes`.
    pub keys: Option<Arc<Vec<(KeyPair, KeyPair)>>>,
}

impl Default for ChainConfig {
    fn default() -> Self {
        ChainConfig {
            seed: [7; 32],
            stakes: vec![1; 4],
            later_stakes: None,
            addresses: None,
            transactions_per_block: 2,
            payload_bytes: 32,
            commits_per_epoch: None,
            start_ms: 1_700_000_000_000,
            round_interval_ms: 100,
            rotate_validators: false,
            keys: None,
        }
    }
}

impl ChainConfig {
    /// `n` validators of equal stake, other settings default.
    pub fn validators(n: usize) -> Self {
        ChainConfig {
            stakes: vec![1; n],
            ..ChainConfig::default()
        }
    }

    /// The network key of validator `index` of the genesis committee (and
    /// of every committee unless `rotate_validators`).
    pub fn network_key(&self, index: usize) -> KeyPair {
        self.network_key_in(0, index)
    }

    /// The network key of validator `index` of the committee of `epoch`.
    pub fn network_key_in(&self, epoch: Epoch, index: usize) -> KeyPair {
        if let Some(keys) = &self.keys {
            return keys[index].0.clone();
        }
        let epoch = if self.rotate_validators { epoch } else { 0 };
        derive_key(&self.seed, b"network", epoch, index as u64)
    }

    /// The protocol key of validator `index` in `epoch`.
    pub fn protocol_key(&self, epoch: Epoch, index: usize) -> KeyPair {
        if let Some(keys) = &self.keys {
            return keys[index].1.clone();
        }
        derive_key(&self.seed, b"protocol", epoch, index as u64)
    }
}

impl ChainConfig {
    /// The committee of `epoch`: the configured stakes and addresses, with
    /// each validator's keys for that epoch.
    pub fn committee(&self, epoch: Epoch) -> Committee {
        committee_for(self, epoch)
    }

    /// The stakes of the committee of `epoch`.
    pub fn stakes_of(&self, epoch: Epoch) -> &[Stake] {
        match &self.later_stakes {
            Some(later) if epoch > 0 => later,
            _ => &self.stakes,
        }
    }
}

/// What one round produced.
#[derive(Clone, Debug, Default)]
pub struct RoundOutput {
    /// The blocks of the round, by author.
    pub blocks: Vec<VerifiedBlock>,
    /// The commit decided this round, with its blocks in commit order and,
    /// if it ends the epoch, the next committee.
    pub commit: Option<(TrustedCommit, Vec<VerifiedBlock>, Option<Committee>)>,
    /// Commits certified by this round's votes, with their certifier blocks.
    pub certified: Vec<(CommitIndex, Vec<VerifiedBlock>)>,
}

/// Plays a committee of validators, producing a signed DAG round by round.
pub struct ChainBuilder {
    config: ChainConfig,
    genesis: Committee,
    committee: Committee,
    protocol_keys: Vec<KeyPair>,
    senders: Vec<KeyPair>,
    nonce: u64,
    /// Last produced round of the current epoch (0 = only genesis).
    round: Round,
    /// Rounds produced since the start of the chain, for timestamps.
    total_rounds: u64,
    /// Each authority's latest block reference.
    latest: Vec<BlockRef>,
    /// Blocks of the current epoch not yet in any commit.
    uncommitted: BTreeMap<(Round, AuthorityIndex), VerifiedBlock>,
    /// Votes each authority will put in its next block.
    pending_votes: Vec<Vec<CommitRef>>,
    /// The last commit made.
    last_commit: CommitRef,
    /// Set once the commit ending the epoch is made: (its ref, next committee).
    epoch_ending: Option<(CommitRef, Committee)>,
}

impl ChainBuilder {
    /// A builder at genesis.
    pub fn new(config: ChainConfig) -> Self {
        assert!(!config.stakes.is_empty(), "a chain needs validators");
        if let Some(keys) = &config.keys {
            assert_eq!(
                keys.len(),
                config.stakes.len(),
                "one key pair per validator"
            );
            assert!(
                config.later_stakes.is_none(),
                "later committees are of derived keys"
            );
        }
        if let Some(later) = &config.later_stakes {
            assert!(!later.is_empty(), "a later committee needs validators");
        }
        let genesis = committee_for(&config, 0);
        let protocol_keys = protocol_keys(&config, 0);
        let senders = (0..16)
            .map(|i| derive_key(&config.seed, b"sender", 0, i))
            .collect();
        let latest = genesis_block_refs(&genesis);
        let n = genesis.size();
        ChainBuilder {
            last_commit: genesis_commit(&genesis).reference(),
            committee: genesis.clone(),
            genesis,
            protocol_keys,
            senders,
            nonce: 0,
            round: 0,
            total_rounds: 0,
            latest,
            uncommitted: BTreeMap::new(),
            pending_votes: vec![Vec::new(); n],
            epoch_ending: None,
            config,
        }
    }

    /// The genesis committee.
    pub fn genesis(&self) -> &Committee {
        &self.genesis
    }

    /// The chain id.
    pub fn chain_id(&self) -> ChainId {
        ChainId::from_genesis(&self.genesis)
    }

    /// The committee of the epoch being built.
    pub fn committee(&self) -> &Committee {
        &self.committee
    }

    /// The last commit made.
    pub fn last_commit(&self) -> CommitRef {
        self.last_commit
    }

    /// The configuration the chain is built from.
    pub fn config(&self) -> &ChainConfig {
        &self.config
    }

    /// Produces one round: every validator's block, possibly a commit, and
    /// the certificates its votes complete.
    pub fn produce_round(&mut self) -> RoundOutput {
        let epoch = self.committee.epoch();
        self.round += 1;
        self.total_rounds += 1;
        let round = self.round;
        let n = self.committee.size();
        let leader = self.leader(round);
        let announce_end = self.config.commits_per_epoch.is_some_and(|k| {
            // Commit number j of an epoch has its leader at round j.
            u64::from(round) == k && self.epoch_ending.is_none()
        });

        let mut blocks = Vec::with_capacity(n);
        for author in 0..n {
            let author_index = AuthorityIndex(author as u32);
            let mut ancestors = Vec::with_capacity(n);
            ancestors.push(self.latest[author]);
            ancestors.extend((0..n).filter(|&a| a != author).map(|a| self.latest[a]));
            let end_of_epoch = (announce_end && author_index == leader).then(|| EndOfEpoch {
                next_committee: committee_for(&self.config, epoch + 1),
            });
            let block = Block {
                epoch,
                round,
                author: author_index,
                timestamp_ms: self.config.start_ms
                    + self.total_rounds * self.config.round_interval_ms,
                ancestors,
                transactions: self.transactions(),
                commit_votes: std::mem::take(&mut self.pending_votes[author]),
                end_of_epoch,
            };
            blocks.push(VerifiedBlock::sign(block, &self.protocol_keys[author]));
        }
        for (author, block) in blocks.iter().enumerate() {
            self.latest[author] = block.reference();
            self.uncommitted
                .insert((round, AuthorityIndex(author as u32)), block.clone());
        }

        let mut output = RoundOutput {
            certified: self.certified_by(&blocks),
            blocks,
            commit: None,
        };

        if let Some((last, next)) = self.epoch_ending.clone() {
            // The epoch's last commit is certified by this round: start the
            // next epoch above its genesis blocks.
            if output.certified.iter().any(|(i, _)| *i == last.index) {
                self.start_epoch(next);
            }
        } else if round >= 3 {
            output.commit = Some(self.commit_leader_of(round - 2));
        }
        output
    }

    /// Builds a finished chain of `commits` commits, producing rounds until
    /// the last one is certified.
    pub fn build(mut self, commits: CommitIndex) -> crate::Chain {
        let mut chain = crate::Chain::new(self.config.clone(), self.genesis.clone());
        while chain.tip() < commits || !chain.is_certified(chain.tip()) {
            let out = self.produce_round();
            chain.absorb(out, commits);
        }
        chain
    }

    fn leader(&self, round: Round) -> AuthorityIndex {
        let n = self.committee.size() as u64;
        AuthorityIndex(((u64::from(round) + self.committee.epoch()) % n) as u32)
    }

    fn transactions(&mut self) -> Vec<Transaction> {
        (0..self.config.transactions_per_block)
            .map(|_| {
                self.nonce += 1;
                let sender = &self.senders[(self.nonce % self.senders.len() as u64) as usize];
                let payload = payload(&self.config.seed, self.nonce, self.config.payload_bytes);
                Transaction::new(sender, self.nonce, payload)
            })
            .collect()
    }

    fn certified_by(&self, blocks: &[VerifiedBlock]) -> Vec<(CommitIndex, Vec<VerifiedBlock>)> {
        let mut votes: BTreeMap<CommitRef, Vec<VerifiedBlock>> = BTreeMap::new();
        for block in blocks {
            for vote in &block.block().commit_votes {
                votes.entry(*vote).or_default().push(block.clone());
            }
        }
        votes
            .into_iter()
            .filter(|(_, voters)| {
                let stake = voters
                    .iter()
                    .map(|b| self.committee.stake(b.block().author))
                    .sum();
                self.committee.is_quorum(stake)
            })
            .map(|(r, voters)| (r.index, voters))
            .collect()
    }

    fn commit_leader_of(
        &mut self,
        leader_round: Round,
    ) -> (TrustedCommit, Vec<VerifiedBlock>, Option<Committee>) {
        let leader_author = self.leader(leader_round);
        // Every block of an earlier round is in the leader's causal history:
        // each block builds on all blocks of the round before.
        let keys: Vec<_> = self
            .uncommitted
            .range(..(leader_round, AuthorityIndex(0)))
            .map(|(k, _)| *k)
            .chain(std::iter::once((leader_round, leader_author)))
            .collect();
        let blocks: Vec<VerifiedBlock> = keys
            .iter()
            .filter_map(|k| self.uncommitted.remove(k))
            .collect();
        let leader = blocks.last().expect("the leader block exists").clone();
        let commit = TrustedCommit::new_trusted(Commit {
            index: self.last_commit.index + 1,
            previous_digest: self.last_commit.digest,
            timestamp_ms: leader.block().timestamp_ms,
            leader: leader.reference(),
            blocks: blocks.iter().map(VerifiedBlock::reference).collect(),
            epoch: self.committee.epoch(),
        });
        self.last_commit = commit.reference();
        for votes in &mut self.pending_votes {
            votes.push(commit.reference());
        }
        let next = leader
            .block()
            .end_of_epoch
            .as_ref()
            .map(|e| e.next_committee.clone());
        if let Some(next) = &next {
            self.epoch_ending = Some((commit.reference(), next.clone()));
        }
        (commit, blocks, next)
    }

    fn start_epoch(&mut self, committee: Committee) {
        let epoch = committee.epoch();
        self.protocol_keys = protocol_keys(&self.config, epoch);
        self.latest = genesis_block_refs(&committee);
        self.pending_votes = vec![Vec::new(); committee.size()];
        self.committee = committee;
        self.round = 0;
        self.uncommitted.clear();
        self.epoch_ending = None;
    }
}

fn derive_key(seed: &[u8; 32], label: &[u8], a: u64, b: u64) -> KeyPair {
    let digest = Digest::of_parts(&[seed, label, &a.to_le_bytes(), &b.to_le_bytes()]);
    KeyPair::from_seed(digest.0)
}

fn protocol_keys(config: &ChainConfig, epoch: Epoch) -> Vec<KeyPair> {
    (0..config.stakes_of(epoch).len())
        .map(|i| config.protocol_key(epoch, i))
        .collect()
}

fn committee_for(config: &ChainConfig, epoch: Epoch) -> Committee {
    let authorities = config
        .stakes_of(epoch)
        .iter()
        .enumerate()
        .map(|(i, &stake)| Authority {
            stake,
            protocol_key: config.protocol_key(epoch, i).public(),
            network_key: PeerId::from(config.network_key_in(epoch, i).public()),
            address: config
                .addresses
                .as_ref()
                .and_then(|a| a.get(i).cloned())
                .unwrap_or_else(|| format!("127.0.0.1:{}", 20_000 + i)),
        })
        .collect();
    Committee::new(epoch, authorities).expect("configured stakes are valid")
}

fn payload(seed: &[u8; 32], nonce: u64, len: usize) -> Bytes {
    let mut out = Vec::with_capacity(len);
    let mut counter = 0u64;
    while out.len() < len {
        let block = Digest::of_parts(&[
            seed,
            b"payload",
            &nonce.to_le_bytes(),
            &counter.to_le_bytes(),
        ]);
        out.extend_from_slice(&block.0);
        counter += 1;
    }
    out.truncate(len);
    Bytes::from(out)
}
