//! The wire: the gRPC protocol of soma-p2p and the authenticated transport.
//!
//! - [`proto`]: the code generated from `proto/soma/p2p/v1/p2p.proto`
//!   (messages, the `P2p` client and server), built by protox and
//!   tonic-prost-build with no system `protoc`.
//! - [`codec`]: the generated code's codec, prost's with each message
//!   encoded into one reservation of its length.
//! - [`convert`]: between proto messages and [`soma_types`], with typed errors.
//! - [`tls`]: mutual TLS 1.3 with each node's identity bound into its
//!   certificate, the only place connections are made.
//! - [`inbound`]: admission of a server's inbound connections: caps in all,
//!   per address and per network, reserved slots, handshake and idle
//!   timeouts.
//! - [`backlog`]: answer bytes handed to HTTP/2 and not yet written, per
//!   inbound connection, which bounds what a client that does not read
//!   leaves in the server's buffers.
#![warn(missing_docs, unreachable_pub)]

pub mod activity;
pub mod backlog;
pub mod codec;
pub mod convert;
pub mod inbound;
pub mod serve;
pub mod tls;

/// Generated protocol code.
#[allow(missing_docs, unreachable_pub, clippy::all)]
pub mod proto {
    tonic::include_proto!("soma.p2p.v1");

    /// Encoded file descriptors of the protocol, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/p2p_descriptor.bin"));
}
