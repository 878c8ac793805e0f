//! What the StateSync actor is made from, and how its parts are built
//! from it: at start and after a restart alike.

use std::sync::Arc;
use std::time::Duration;

use actix::Addr;
use soma_store::ConsensusStore;
use soma_types::{CommitIndex, CommittedSubDag, Committee, Epoch, Limits};
use soma_wire::convert::Availability;
use tokio::sync::{broadcast, watch};

use super::core::{Config, Init, commit_answer_bytes};
use super::hedging::{HedgeBudget, Hedging};
use super::messages::TaskId;
use super::prune;
use super::worker::{PeerCalls, Worker};
use crate::archive::ArchiveReader;
use crate::connections::{Connections, Outbound};
use crate::faults::Faults;
use crate::peer_heights::PeerHeights;
use crate::system::Execution;
use crate::verifier::{Verifier, stored_committees};

/// What the StateSync actor is made from; kept across restarts. Its
/// watermark and epoch are read from the store, at start and after a
/// restart alike.
#[derive(Clone)]
pub struct Deps {
    /// The core's settings.
    pub config: Config,
    /// The epoch of the genesis committee.
    pub genesis_epoch: Epoch,
    /// How often the core is ticked.
    pub tick: Duration,
    /// Time allowed for one request.
    pub timeout: Duration,
    /// Whether synced block signatures are checked (digests always are).
    pub verify_synced_block_signatures: bool,
    /// The verification limits, which bound what peers may send.
    pub limits: Limits,
    /// Bytes of commits a server puts in one FetchCommits answer (the
    /// network's `max-fetch-response-bytes`); certifier blocks come on top.
    pub commit_budget_bytes: usize,
    /// The chain.
    pub store: Arc<dyn ConsensusStore>,
    /// Checks what peers send.
    pub verifier: Addr<Verifier>,
    /// Peers' heights and fetch slots.
    pub heights: Addr<PeerHeights>,
    /// Clients of connected peers.
    pub connections: Addr<Connections>,
    /// The runtime workers, queries and store writes run on.
    pub runtime: tokio::runtime::Handle,
    /// Where applied commits are broadcast.
    pub commits: broadcast::Sender<CommittedSubDag>,
    /// The node's availability, published for the gRPC service to read
    /// without asking an actor.
    pub availability: watch::Sender<Availability>,
    /// The registered executor's progress: sync keeps within
    /// `max_lead_over_execution` of it, pruning below it.
    pub(crate) execution: Execution,
    /// What the store keeps, and how it is pruned.
    pub prune: prune::Config,
    /// Capacity of its mailbox.
    pub mailbox_capacity: usize,
    /// Local commits' writes in flight at once at most (`P2pConfig`'s
    /// `max_local_writes` places); one more is refused as busy.
    pub local_writes: Arc<tokio::sync::Semaphore>,
    /// Height queries on their way at once at most, one per peer at most:
    /// the connections held at most (Connections' `max_connections`), so
    /// that every connected peer is asked each round, whoever else never
    /// answers.
    pub max_queries: usize,
    /// Pushes of the advertised height on their way at once at most (one
    /// per peer at most; PeerHeights' `max_tracked_peers` bounds the peers
    /// asked, this the peers gone since with a push still on its way).
    pub max_pushes: usize,
    /// Where batches no connected peer holds are read, if anywhere.
    pub archive: Option<Arc<ArchiveReader>>,
    /// The next commit the archive writer will archive, if the node
    /// writes an archive: nothing from it on is pruned.
    pub archived: Option<watch::Receiver<CommitIndex>>,
    pub(crate) faults: Faults,
}

impl Deps {
    /// The core's init from the store: its watermark, and the last
    /// committee it holds (the epoch of the next commit to sync).
    pub(super) fn init(&self, first_task: TaskId) -> Result<Init, soma_store::Error> {
        let synced = self.store.highest_synced_commit()?;
        let committees = stored_committees(self.store.as_ref(), self.genesis_epoch, 1)?;
        let last = committees.last();
        Ok(Init {
            config: self.config.clone(),
            synced,
            epoch: last.map_or(self.genesis_epoch, Committee::epoch),
            commit_answer_bytes: last.map_or(0, |c| self.commit_answer_bytes(c)),
            first_task,
            executed: self.execution.executed(),
        })
    }

    /// The largest FetchCommits answer of `committee`'s epoch.
    pub(super) fn commit_answer_bytes(&self, committee: &Committee) -> u64 {
        commit_answer_bytes(&self.limits, self.commit_budget_bytes, committee)
    }

    /// What each sync worker is given.
    pub(super) fn worker(&self) -> Worker {
        Worker {
            heights: self.heights.clone(),
            outbound: self.outbound(),
            verifier: self.verifier.clone(),
            check_signatures: self.verify_synced_block_signatures,
            config: self.config.clone(),
            faults: self.faults.clone(),
            archive: self.archive.clone(),
            hedging: Default::default(),
            hedge_budget: HedgeBudget::new(self.config.max_hedged_bytes),
            lies_in_hedges: Default::default(),
            hedges_won: Default::default(),
            hedges_late: Default::default(),
            hedges_given_way: Default::default(),
            hedges_moved: Default::default(),
            hedges_alone: Default::default(),
            hedge_parts_held: Default::default(),
        }
    }

    /// The calls to peers besides fetches; height queries' answer times
    /// go to the workers' `hedging`.
    pub(super) fn calls(&self, hedging: Hedging) -> PeerCalls {
        PeerCalls {
            outbound: self.outbound(),
            heights: self.heights.clone(),
            connections: self.connections.clone(),
            hedging,
        }
    }

    fn outbound(&self) -> Outbound {
        Outbound::new(self.connections.clone(), self.timeout)
    }
}
