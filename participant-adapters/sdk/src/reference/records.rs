//! The reference participant's durable records (one `pledge-log` record each; protobuf payload
//! via prost's derive, type byte = schema).

use pledge_proto::{BranchId, Gtid};
use prost::Message;

pub const TYPE_PREPARED: u8 = 1;
pub const TYPE_COMMITTED: u8 = 2;
pub const TYPE_ABORTED: u8 = 3;
pub const TYPE_DATA: u8 = 4;
pub const TYPE_OPENED: u8 = 5;
/// Three-phase commit: a prepared branch was pre-committed (follows its Prepared record, in the
/// log and in checkpoints).
pub const TYPE_PRECOMMITTED: u8 = 6;
/// Three-phase commit: a higher coordinator epoch was answered about an undecided branch.
pub const TYPE_EPOCH: u8 = 7;

/// Work began in a branch (synced before the first write is acknowledged): after a restart
/// the branch is known to have lost its staged writes.
#[derive(Clone, PartialEq, Message)]
pub struct OpenedPb {
    #[prost(bytes = "vec", tag = "1")]
    pub gtid: Vec<u8>,
    #[prost(string, tag = "2")]
    pub branch_id: String,
    #[prost(uint64, tag = "3")]
    pub at_ms: u64,
}

#[derive(Clone, PartialEq, Message)]
pub struct WritePb {
    #[prost(string, tag = "1")]
    pub key: String,
    #[prost(bytes = "vec", tag = "2")]
    pub value: Vec<u8>,
}

/// A branch was prepared, with the writes it will apply when committed.
#[derive(Clone, PartialEq, Message)]
pub struct PreparedPb {
    #[prost(bytes = "vec", tag = "1")]
    pub gtid: Vec<u8>,
    #[prost(string, tag = "2")]
    pub branch_id: String,
    #[prost(string, tag = "3")]
    pub coordinator_id: String,
    #[prost(uint64, tag = "4")]
    pub prepared_ms: u64,
    #[prost(message, repeated, tag = "5")]
    pub writes: Vec<WritePb>,
    /// Prepared under three-phase commit: when it aborts itself without a PreCommit (Unix ms).
    /// 0 (absent from logs written before three-phase commit): two-phase.
    #[prost(uint64, tag = "6")]
    pub wait_deadline_ms: u64,
    /// Three-phase: the highest coordinator epoch answered about the branch.
    #[prost(uint64, tag = "7")]
    pub epoch: u64,
}

/// A prepared branch was pre-committed: it commits itself at `deadline_ms` (Unix ms).
#[derive(Clone, PartialEq, Message)]
pub struct PreCommittedPb {
    #[prost(bytes = "vec", tag = "1")]
    pub gtid: Vec<u8>,
    #[prost(string, tag = "2")]
    pub branch_id: String,
    #[prost(uint64, tag = "3")]
    pub deadline_ms: u64,
    #[prost(uint64, tag = "4")]
    pub epoch: u64,
    #[prost(uint64, tag = "5")]
    pub at_ms: u64,
}

/// The highest coordinator epoch answered about an undecided three-phase branch.
#[derive(Clone, PartialEq, Message)]
pub struct EpochPb {
    #[prost(bytes = "vec", tag = "1")]
    pub gtid: Vec<u8>,
    #[prost(string, tag = "2")]
    pub branch_id: String,
    #[prost(uint64, tag = "3")]
    pub epoch: u64,
}

/// A branch committed. A two-phase commit applies the writes of its Prepared record; a
/// one-phase commit carries its own.
#[derive(Clone, PartialEq, Message)]
pub struct CommittedPb {
    #[prost(bytes = "vec", tag = "1")]
    pub gtid: Vec<u8>,
    #[prost(string, tag = "2")]
    pub branch_id: String,
    #[prost(uint64, tag = "3")]
    pub at_ms: u64,
    #[prost(message, repeated, tag = "4")]
    pub writes: Vec<WritePb>,
    /// Voted READ_ONLY (a branch declared possibly empty that did nothing): nothing applied.
    #[prost(bool, tag = "5")]
    pub read_only: bool,
}

/// A branch rolled back.
#[derive(Clone, PartialEq, Message)]
pub struct AbortedPb {
    #[prost(bytes = "vec", tag = "1")]
    pub gtid: Vec<u8>,
    #[prost(string, tag = "2")]
    pub branch_id: String,
    #[prost(uint64, tag = "3")]
    pub at_ms: u64,
    /// Why, when the participant decided it itself (a three-phase wait deadline passed).
    #[prost(string, tag = "4")]
    pub reason: String,
}

/// A committed key-value pair (checkpoints only).
#[derive(Clone, PartialEq, Message)]
pub struct DataPb {
    #[prost(string, tag = "1")]
    pub key: String,
    #[prost(bytes = "vec", tag = "2")]
    pub value: Vec<u8>,
}

pub fn gtid_of(bytes: &[u8]) -> Result<Gtid, String> {
    Gtid::from_slice(bytes).map_err(|len| format!("gtid of {len} bytes"))
}

pub fn branch_of(s: &str) -> Result<BranchId, String> {
    BranchId::parse_field("branch_id", s).map_err(|e| e.to_string())
}
