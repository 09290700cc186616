//! Pledge's gRPC contract and the domain types validated from it.
//!
//! `v1` is the code generated from `proto/pledge/v1/*.proto`. [`types`] holds the validated
//! domain types (GTID, resource id, branch id); every server converts wire messages into them
//! once, on receipt, and a malformed field becomes `Status::invalid_argument` naming the field.
//! [`transport`] is how servers listen and clients dial (TCP or Unix sockets); [`pipeline`]
//! multiplexes many calls over one stream, for callers that make many; [`client`] is a client
//! of a coordinator cluster that sends each call to its transaction's owner; [`telemetry`] sets
//! up logs and OpenTelemetry trace export, and carries trace context across every call.

pub mod auth;
pub mod client;
pub mod metrics;
pub mod pipeline;
pub mod telemetry;
pub mod tls;
pub mod transport;
pub mod types;
pub mod xa;

/// Generated code for package `pledge.v1`.
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("pledge.v1");
}

/// The encoded descriptor set of every `pledge.v1` file, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/pledge_descriptor.bin"));

pub use types::{
    BranchId, BranchKey, Gtid, IdError, MAX_REASON_BYTES, MAX_VOTE_METADATA_BYTES, ResourceId, Xid, bounded_reason,
};
