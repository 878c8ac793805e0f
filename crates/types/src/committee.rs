use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::{Digest, Error, PeerId, PreparedKey, PublicKey, Result, codec};

/// An epoch number: the period during which one committee signs the chain.
pub type Epoch = u64;

/// Voting power of an authority.
pub type Stake = u64;

/// Position of an authority in its committee.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
pub struct AuthorityIndex(pub u32);

impl AuthorityIndex {
    /// The index as a `usize`, for indexing the committee.
    pub fn get(self) -> usize {
        self.0 as usize
    }
}

/// A set of authorities of one committee, a bit each: the checks that an
/// authority appears once (a block's ancestors, a certificate's voters)
/// without allocating or hashing.
#[derive(Clone, Debug)]
pub(crate) struct AuthoritySet([u64; MAX_COMMITTEE_SIZE.div_ceil(64)]);

impl AuthoritySet {
    /// The empty set.
    pub(crate) fn new() -> Self {
        AuthoritySet([0; MAX_COMMITTEE_SIZE.div_ceil(64)])
    }

    /// Adds `index`, an authority of a committee (so below
    /// [`MAX_COMMITTEE_SIZE`]); false if it was in the set already. An
    /// index past every committee is never added (false).
    pub(crate) fn insert(&mut self, index: AuthorityIndex) -> bool {
        let i = index.get();
        let Some(word) = self.0.get_mut(i / 64) else {
            return false;
        };
        let bit = 1u64 << (i % 64);
        let fresh = *word & bit == 0;
        *word |= bit;
        fresh
    }
}

impl std::fmt::Display for AuthorityIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// One member of a committee.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Authority {
    /// Voting power.
    pub stake: Stake,
    /// Key that signs this authority's blocks.
    pub protocol_key: PublicKey,
    /// Key that identifies this authority's node on the network.
    pub network_key: PeerId,
    /// Where the node listens, as `host:port`.
    pub address: String,
}

/// The most authorities a committee may have: far above any committee a
/// BFT consensus runs with (a hundred or so), and a bound on the work a
/// committee received from a peer costs before anything of it is verified.
pub const MAX_COMMITTEE_SIZE: usize = 1024;

/// The set of authorities that signs the chain during one epoch.
///
/// A quorum is any set of distinct authorities whose stake is at least
/// [`Committee::quorum_threshold`], that is ⌊2·total/3⌋ + 1: more than two
/// thirds of all stake.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "CommitteeRepr")]
pub struct Committee {
    epoch: Epoch,
    authorities: Vec<Authority>,
    #[serde(skip)]
    total: Stake,
    #[serde(skip)]
    keys: KeyCache,
}

/// The members' protocol keys, decompressed once when the committee is
/// built, since every block signature check needs one, each with whether it
/// is weak (of small order), which costs a scalar multiplication to learn.
#[derive(Clone, Default)]
struct KeyCache(Arc<Vec<PreparedKey>>);

impl PartialEq for KeyCache {
    /// Derived from the authorities, which are compared already.
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for KeyCache {}

impl std::fmt::Debug for KeyCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} keys", self.0.len())
    }
}

impl Committee {
    /// Builds a committee, refusing an empty one, zero stakes, stake totals
    /// that overflow, a network or protocol key held by two authorities,
    /// and protocol keys that are not valid points.
    pub fn new(epoch: Epoch, authorities: Vec<Authority>) -> Result<Self> {
        if authorities.is_empty() {
            return Err(Error::EmptyCommittee);
        }
        // Checked before any key is decompressed: a block ending an epoch
        // carries the next committee, and a 4 MiB one could name some
        // sixty thousand authorities, each key a point decompression.
        if authorities.len() > MAX_COMMITTEE_SIZE {
            return Err(Error::CommitteeTooLarge {
                size: authorities.len(),
                limit: MAX_COMMITTEE_SIZE,
            });
        }
        if u32::try_from(authorities.len()).is_err() {
            return Err(Error::InvalidStake);
        }
        let mut total: Stake = 0;
        for a in &authorities {
            if a.stake == 0 {
                return Err(Error::InvalidStake);
            }
            total = total.checked_add(a.stake).ok_or(Error::InvalidStake)?;
        }
        let mut network = std::collections::HashSet::with_capacity(authorities.len());
        let mut protocol = std::collections::HashSet::with_capacity(authorities.len());
        for (i, a) in authorities.iter().enumerate() {
            if !network.insert(a.network_key) || !protocol.insert(a.protocol_key) {
                return Err(Error::RepeatedKey { index: i as u32 });
            }
        }
        let keys = authorities
            .iter()
            .map(|a| a.protocol_key.prepare())
            .collect::<Result<Vec<_>>>()?;
        Ok(Committee {
            epoch,
            authorities,
            total,
            keys: KeyCache(Arc::new(keys)),
        })
    }

    /// The decompressed protocol key of the authority at `index`, with its
    /// weakness (of small order), both computed once when the committee was
    /// built.
    pub fn protocol_verifying_key(&self, index: AuthorityIndex) -> Option<&PreparedKey> {
        self.keys.0.get(index.get())
    }

    /// The epoch this committee signs.
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// Number of authorities.
    pub fn size(&self) -> usize {
        self.authorities.len()
    }

    /// All authorities, by index.
    pub fn authorities(&self) -> impl ExactSizeIterator<Item = (AuthorityIndex, &Authority)> {
        self.authorities
            .iter()
            .enumerate()
            .map(|(i, a)| (AuthorityIndex(i as u32), a))
    }

    /// The authority at `index`, if any.
    pub fn authority(&self, index: AuthorityIndex) -> Option<&Authority> {
        self.authorities.get(index.get())
    }

    /// Stake of the authority at `index` (0 if out of range).
    pub fn stake(&self, index: AuthorityIndex) -> Stake {
        self.authority(index).map_or(0, |a| a.stake)
    }

    /// Sum of all stakes.
    pub fn total_stake(&self) -> Stake {
        self.total
    }

    /// Smallest stake that forms a quorum: ⌊2·total/3⌋ + 1.
    pub fn quorum_threshold(&self) -> Stake {
        ((2 * self.total as u128) / 3) as Stake + 1
    }

    /// Smallest stake that surely includes one honest authority:
    /// ⌊(total − 1)/3⌋ + 1.
    pub fn validity_threshold(&self) -> Stake {
        (self.total - 1) / 3 + 1
    }

    /// Whether `stake` reaches quorum.
    pub fn is_quorum(&self, stake: Stake) -> bool {
        stake >= self.quorum_threshold()
    }

    /// Index of the authority whose network key is `peer`.
    pub fn index_of_peer(&self, peer: &PeerId) -> Option<AuthorityIndex> {
        self.authorities
            .iter()
            .position(|a| a.network_key == *peer)
            .map(|i| AuthorityIndex(i as u32))
    }

    /// Digest of the committee's encoding.
    pub fn digest(&self) -> Digest {
        Digest::of(&codec::encode(self))
    }
}

/// The encoded shape of a committee; decoding goes through
/// [`Committee::new`] so a decoded committee is always valid.
#[derive(Deserialize)]
struct CommitteeRepr {
    epoch: Epoch,
    authorities: Vec<Authority>,
}

impl TryFrom<CommitteeRepr> for Committee {
    type Error = Error;
    fn try_from(r: CommitteeRepr) -> Result<Self> {
        Committee::new(r.epoch, r.authorities)
    }
}

/// Identity of a chain: the digest of its genesis committee. Nodes never sync
/// from a peer that reports another chain id.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize)]
pub struct ChainId(pub Digest);

impl ChainId {
    /// The chain id of a chain started by `genesis`.
    pub fn from_genesis(genesis: &Committee) -> ChainId {
        ChainId(Digest::of_parts(&[
            b"soma-p2p/chain/1",
            &codec::encode(genesis),
        ]))
    }
}

impl std::fmt::Display for ChainId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::KeyPair;

    #[test]
    fn an_authority_set_holds_each_index_once_up_to_the_largest_committee() {
        let mut set = AuthoritySet::new();
        for i in [0, 1, 63, 64, 65, 511, 1_023] {
            assert!(set.insert(AuthorityIndex(i)), "{i} is new");
        }
        for i in [0, 1, 63, 64, 65, 511, 1_023] {
            assert!(!set.insert(AuthorityIndex(i)), "{i} is held");
        }
        // Neighbours of the indices held are not.
        for i in [2, 62, 66, 510, 512, 1_022] {
            assert!(set.insert(AuthorityIndex(i)), "{i} is new");
        }
        // Past every committee: never added.
        let past = u32::try_from(MAX_COMMITTEE_SIZE).unwrap();
        assert!(!set.insert(AuthorityIndex(past)));
        assert!(!set.insert(AuthorityIndex(u32::MAX)));
    }

    fn committee(stakes: &[Stake]) -> Result<Committee> {
        let authorities = stakes
            .iter()
            .enumerate()
            .map(|(i, &stake)| {
                // Distinct seeds for up to 2^16 authorities.
                let seed = |kind: u8| {
                    let mut seed = [kind; 32];
                    seed[..2].copy_from_slice(&(i as u16).to_le_bytes());
                    seed
                };
                Authority {
                    stake,
                    protocol_key: KeyPair::from_seed(seed(1)).public(),
                    network_key: PeerId(KeyPair::from_seed(seed(2)).public().to_bytes()),
                    address: format!("127.0.0.1:{}", 9000 + i),
                }
            })
            .collect();
        Committee::new(0, authorities)
    }

    #[test]
    fn quorum_is_more_than_two_thirds() {
        assert_eq!(committee(&[1, 1, 1, 1]).unwrap().quorum_threshold(), 3);
        assert_eq!(committee(&[1, 1, 1]).unwrap().quorum_threshold(), 3);
        assert_eq!(committee(&[1; 10]).unwrap().quorum_threshold(), 7);
        assert_eq!(committee(&[10, 20, 30, 40]).unwrap().quorum_threshold(), 67);
        assert_eq!(committee(&[1]).unwrap().quorum_threshold(), 1);
    }

    #[test]
    fn validity_is_more_than_one_third() {
        assert_eq!(committee(&[1, 1, 1, 1]).unwrap().validity_threshold(), 2);
        assert_eq!(committee(&[1; 3]).unwrap().validity_threshold(), 1);
    }

    #[test]
    fn quorum_does_not_overflow_near_max_stake() {
        let c = committee(&[u64::MAX / 2, u64::MAX / 2]).unwrap();
        assert!(c.quorum_threshold() > c.total_stake() / 3 * 2);
        assert!(c.quorum_threshold() <= c.total_stake());
    }

    #[test]
    fn rejects_empty_zero_stake_and_overflow() {
        assert_eq!(committee(&[]), Err(Error::EmptyCommittee));
        assert_eq!(committee(&[1, 0]), Err(Error::InvalidStake));
        assert_eq!(committee(&[u64::MAX, 1]), Err(Error::InvalidStake));
    }

    #[test]
    fn rejects_a_committee_past_the_largest_allowed() {
        assert_eq!(committee(&[1; MAX_COMMITTEE_SIZE]).unwrap().size(), 1024);
        assert_eq!(
            committee(&[1; MAX_COMMITTEE_SIZE + 1]),
            Err(Error::CommitteeTooLarge {
                size: 1025,
                limit: 1024
            })
        );
    }

    #[test]
    fn rejects_a_key_held_by_two_authorities() {
        let mut c = committee(&[1, 1, 1]).unwrap();
        c.authorities[2].network_key = c.authorities[0].network_key;
        assert_eq!(
            Committee::new(0, c.authorities.clone()),
            Err(Error::RepeatedKey { index: 2 })
        );
        let mut c = committee(&[1, 1, 1]).unwrap();
        c.authorities[1].protocol_key = c.authorities[0].protocol_key;
        assert_eq!(
            Committee::new(0, c.authorities.clone()),
            Err(Error::RepeatedKey { index: 1 })
        );
        // Decoding goes through the same check.
        assert!(codec::decode::<Committee>(&codec::encode(&c), 1 << 16).is_err());
    }

    #[test]
    fn decoded_committee_recomputes_total() {
        let c = committee(&[3, 4]).unwrap();
        let d: Committee = codec::decode(&codec::encode(&c), 1 << 16).unwrap();
        assert_eq!(d.total_stake(), 7);
        assert_eq!(d, c);
    }

    #[test]
    fn decoding_refuses_zero_stake() {
        let mut c = committee(&[3, 4]).unwrap();
        c.authorities[1].stake = 0;
        assert!(codec::decode::<Committee>(&codec::encode(&c), 1 << 16).is_err());
    }
}
