//! A deterministic simulator of soma-p2p networks: thousands of nodes made
//! of the production sans-I/O cores, in virtual time, from one seed.
//!
//! [`net`] is the network (links, churn, partitions) around the real
//! Discovery core; [`heights`] spreads new commits over a network it made,
//! through the real PeerHeights core; [`sync`] has a network far behind catch up,
//! every node running the real StateSync and PeerHeights cores, among
//! hostile peers; [`memory`] measures what a load from main memory costs
//! here, the bound of a large network's speed; [`scenarios`] are the experiments `make sim` runs and
//! writes to docs/simulation.md. The same seed gives the same run, bit for
//! bit ([`net::Sim::digest`]), and any node's inputs can be written as a
//! trace the replay harness replays.

mod digest;
pub mod heights;
mod inbound;
pub mod memory;
pub mod net;
mod queue;
pub mod scenarios;
pub mod sync;
