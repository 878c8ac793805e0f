//! FetchCommits answers kept in memory, so that the batches every syncing
//! peer asks for (the same aligned ranges, again and again) are answered
//! without reading the store on the blocking pool.
//!
//! An answer is kept under the request it answers and the store's
//! [`version`](soma_store::ConsensusStore::version) observed before it was
//! read. It is served only while the store is still at that version, so a
//! hit is exactly what [`serve::fetch_commits`](super::serve::fetch_commits)
//! would read now: any write (a new batch, a certificate, pruning, an
//! epoch's end) empties the cache. Only answers are kept, never refusals;
//! an answer filled to a caller's smaller limit is kept under that limit.
//!
//! Bounded by [`Limits::answer_cache_bytes`](super::core::Limits) (the
//! answers' encoded size); the oldest answers go first. A lock guards the
//! map: it is held only to look up, insert or evict, never across a read.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, PoisonError};

use soma_types::CommitIndex;
use soma_wire::proto;

/// The request an answer answers: its start, its (capped) end, and the
/// bytes of commits it was filled to (the caller's limit, within ours).
type Key = (CommitIndex, CommitIndex, usize);

/// The cache; see the module docs.
#[derive(Debug)]
pub(crate) struct AnswerCache {
    max_bytes: usize,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// The store version every kept answer was read at.
    version: u64,
    answers: HashMap<Key, (proto::FetchCommitsResponse, usize)>,
    /// Keys in insertion order, oldest first.
    order: VecDeque<Key>,
    bytes: usize,
}

impl State {
    /// Forgets everything unless it was read at `version`.
    fn at(&mut self, version: u64) {
        if self.version != version {
            self.answers.clear();
            self.order.clear();
            self.bytes = 0;
            self.version = version;
        }
    }
}

impl AnswerCache {
    /// A cache of at most `max_bytes` of encoded answers; 0 keeps nothing.
    pub(crate) fn new(max_bytes: usize) -> Self {
        AnswerCache {
            max_bytes,
            state: Mutex::default(),
        }
    }

    /// The answer to `(start, end)` filled to `budget` bytes of commits,
    /// read at store version `version`, if kept; `version` must be the
    /// store's current one.
    pub(crate) fn get(
        &self,
        version: u64,
        start: CommitIndex,
        end: CommitIndex,
        budget: usize,
    ) -> Option<proto::FetchCommitsResponse> {
        if self.max_bytes == 0 {
            return None;
        }
        let mut state = self.lock();
        // An older version than the one kept: a call that raced a write.
        if version < state.version {
            return None;
        }
        state.at(version);
        state
            .answers
            .get(&(start, end, budget))
            .map(|(a, _)| a.clone())
    }

    /// Keeps `answer` (of `size` encoded bytes) to `(start, end)` filled
    /// to `budget`, read after observing store version `version`. Dropped
    /// if the store has moved on since, or if it alone exceeds the bound.
    pub(crate) fn insert(
        &self,
        version: u64,
        (start, end, budget): Key,
        answer: &proto::FetchCommitsResponse,
        size: usize,
    ) {
        if size > self.max_bytes {
            return;
        }
        let mut state = self.lock();
        if version < state.version {
            return;
        }
        state.at(version);
        let key = (start, end, budget);
        if state.answers.contains_key(&key) {
            return;
        }
        while state.bytes + size > self.max_bytes {
            let Some(oldest) = state.order.pop_front() else {
                break;
            };
            if let Some((_, freed)) = state.answers.remove(&oldest) {
                state.bytes -= freed;
            }
        }
        state.answers.insert(key, (answer.clone(), size));
        state.order.push_back(key);
        state.bytes += size;
    }

    /// Bytes of answers kept.
    #[cfg(test)]
    fn bytes(&self) -> usize {
        self.lock().bytes
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;
    use soma_chain::{Chain, ChainBuilder, ChainConfig};
    use soma_store::{ConsensusStore, MemStore};
    use tonic::Status;

    use super::*;
    use crate::grpc::core::Limits;
    use crate::grpc::serve;

    /// The commit bytes every answer here is filled to: the default limit.
    const BUDGET: usize = 4 << 20;

    /// What the service does: a kept answer if the store is still at the
    /// version it was read at, else a read, kept for the next call.
    fn cached(
        cache: &AnswerCache,
        store: &dyn ConsensusStore,
        start: CommitIndex,
        end: CommitIndex,
    ) -> Result<proto::FetchCommitsResponse, Status> {
        let version = store.version();
        if let Some(answer) = cache.get(version, start, end, BUDGET) {
            return Ok(answer);
        }
        let answer = plain(store, start, end)?;
        cache.insert(version, (start, end, BUDGET), &answer, answer.encoded_len());
        Ok(answer)
    }

    fn plain(
        store: &dyn ConsensusStore,
        start: CommitIndex,
        end: CommitIndex,
    ) -> Result<proto::FetchCommitsResponse, Status> {
        serve::fetch_commits(
            store,
            start,
            end,
            &Limits::default(),
            &soma_types::Limits::default(),
        )
    }

    type Outcome = Result<proto::FetchCommitsResponse, (tonic::Code, String)>;

    fn outcome(r: Result<proto::FetchCommitsResponse, Status>) -> Outcome {
        r.map_err(|s| (s.code(), s.message().to_owned()))
    }

    /// Every range asked, twice through the cache (a miss, then a hit
    /// unless the first was refused), gives exactly what the plain path
    /// reads now. Returns how many were answered.
    fn all_agree(cache: &AnswerCache, store: &dyn ConsensusStore, step: &str) -> usize {
        let mut answered = 0;
        for start in [1, 40, 51, 101, 140, 150, 151, 201, 299, 301, 351, 399, 401] {
            for end in [start, start + 9, start + 99, start + 1_000] {
                let want = outcome(plain(store, start, end));
                for round in ["first", "second"] {
                    let got = outcome(cached(cache, store, start, end));
                    assert_eq!(got, want, "{step}: {start}..={end}, {round} call");
                }
                answered += usize::from(want.is_ok());
            }
        }
        answered
    }

    fn chain() -> Chain {
        ChainBuilder::new(ChainConfig {
            commits_per_epoch: Some(150),
            ..ChainConfig::validators(4)
        })
        .build(400)
    }

    #[test]
    fn a_cached_answer_is_the_plain_answer_through_batches_epochs_certificates_and_pruning() {
        let chain = chain();
        assert_eq!(
            chain.epoch_last(0),
            Some(150),
            "the chain ends epoch 0 at 150"
        );
        assert_eq!(chain.epoch_last(1), Some(300));
        let store = MemStore::new(chain.genesis());
        let cache = AnswerCache::new(Limits::default().answer_cache_bytes);
        assert_eq!(all_agree(&cache, &store, "empty store"), 0);
        let mut answered = Vec::new();
        for range in chain.batch_ranges(50) {
            let step = format!("after writing {range:?}");
            store.write_synced_batch(chain.batch(range)).unwrap();
            answered.push(all_agree(&cache, &store, &step));
        }
        // A certificate for a commit inside a batch extends what a range
        // ending there may serve.
        let inside = (1..=400)
            .find(|i| i % 50 != 0 && chain.is_certified(*i) && *i > 110)
            .expect("the chain certifies commits between batch ends");
        store
            .insert_certificate(inside, chain.certificate(inside).to_vec())
            .unwrap();
        all_agree(&cache, &store, "after a certificate inside a batch");
        for lowest in [101, 151, 301] {
            store.prune_below(lowest).unwrap();
            let served = all_agree(&cache, &store, &format!("after pruning below {lowest}"));
            answered.push(served);
        }
        // Writes made more ranges answerable, pruning fewer.
        assert!(
            answered.windows(2).take(7).all(|w| w[0] <= w[1]),
            "{answered:?}"
        );
        assert!(answered[answered.len() - 1] < answered[7], "{answered:?}");
    }

    #[test]
    fn answers_are_bounded_by_bytes_oldest_first() {
        let chain = chain();
        let store = MemStore::new(chain.genesis());
        chain.write_to(&store, 50).unwrap();
        let answer = plain(&store, 1, 50).unwrap();
        let size = answer.encoded_len();
        let cache = AnswerCache::new(size * 3);
        let version = store.version();
        for start in [1, 51, 101, 151] {
            cache.insert(version, (start, start + 49, BUDGET), &answer, size);
        }
        assert_eq!(cache.bytes(), size * 3);
        assert_eq!(cache.get(version, 1, 50, BUDGET), None, "the oldest went");
        for start in [51, 101, 151] {
            assert_eq!(
                cache.get(version, start, start + 49, BUDGET).as_ref(),
                Some(&answer)
            );
        }
        // Too large alone, or read before the store moved on: not kept.
        let small = AnswerCache::new(size - 1);
        small.insert(version, (1, 50, BUDGET), &answer, size);
        assert_eq!(small.get(version, 1, 50, BUDGET), None);
        cache.insert(version + 1, (201, 250, BUDGET), &answer, size);
        cache.insert(version, (251, 300, BUDGET), &answer, size);
        assert_eq!(cache.get(version + 1, 251, 300, BUDGET), None);
        assert_eq!(
            cache.bytes(),
            size,
            "only the answer read at the newer version"
        );
        assert_eq!(AnswerCache::new(0).get(version, 201, 250, BUDGET), None);
    }

    /// An answer filled to a caller's smaller limit is kept apart from the
    /// one filled to ours: each caller gets what its own request reads.
    #[test]
    fn answers_filled_to_other_limits_are_kept_apart() {
        let chain = chain();
        let store = MemStore::new(chain.genesis());
        chain.write_to(&store, 50).unwrap();
        let version = store.version();
        let answer = plain(&store, 1, 50).unwrap();
        let cache = AnswerCache::new(4 * answer.encoded_len());
        cache.insert(version, (1, 50, BUDGET), &answer, answer.encoded_len());
        let small = 64 << 10;
        assert_eq!(cache.get(version, 1, 50, small), None);
        let other = plain(&store, 1, 10).unwrap();
        cache.insert(version, (1, 50, small), &other, other.encoded_len());
        assert_eq!(cache.get(version, 1, 50, small).as_ref(), Some(&other));
        assert_eq!(cache.get(version, 1, 50, BUDGET).as_ref(), Some(&answer));
    }
}
