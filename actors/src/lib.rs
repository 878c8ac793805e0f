//! The actors of soma-p2p: Discovery, StateSync, PeerHeights, Verifier,
//! Connections and the GrpcAdapter, their supervision, the replay harness
//! and the `P2pHandle` a node embeds.
//!
//! Each actor is a sans-I/O core (logic driven by `handle(now, input)`) and a
//! thin actix shell. The actors are added one issue at a time; see
//! `docs/architecture.md`.
