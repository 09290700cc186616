//! The journal's durable records: one `pledge-log` record each, a protobuf payload (prost's
//! derive), the type byte naming the schema. A checkpoint writes the same records for the state
//! it keeps, so replay needs no second format.

use bytes::Bytes;
use pledge_proto::{BranchId, Gtid, ResourceId, Xid};
use prost::Message;

use crate::Outcome;

/// The journal's own facts: when it was created, and up to which GTID time answers may have
/// been forgotten. First record of a new journal and of every checkpoint.
pub const TYPE_META: u8 = 1;
/// Work began in a branch: after a restart the branch is known to have lost its work.
pub const TYPE_OPENED: u8 = 2;
/// A branch is prepared at the resource (synced before the vote).
pub const TYPE_PREPARED: u8 = 3;
/// A one-phase commit is about to be sent to the resource (synced before it is).
pub const TYPE_COMMITTING: u8 = 4;
/// A branch ended; the answer given (synced before it is given).
pub const TYPE_FINISHED: u8 = 5;
/// Three-phase commit: a prepared branch is pre-committed, with its do-commit deadline
/// (synced before the PreCommit is answered). Follows the branch's Prepared record, in the log
/// and in checkpoints.
pub const TYPE_PRECOMMITTED: u8 = 6;
/// Three-phase commit: a coordinator at a higher epoch was answered about an undecided branch
/// (synced before the answer).
pub const TYPE_EPOCH: u8 = 7;

#[derive(Clone, PartialEq, Message)]
pub struct MetaPb {
    #[prost(uint64, tag = "1")]
    pub created_ms: u64,
    #[prost(uint64, tag = "2")]
    pub forgotten_through_ms: u64,
}

#[derive(Clone, PartialEq, Message)]
pub struct XidPb {
    #[prost(string, tag = "1")]
    pub resource: String,
    #[prost(bytes = "vec", tag = "2")]
    pub gtid: Vec<u8>,
    #[prost(string, tag = "3")]
    pub branch: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct OpenedPb {
    #[prost(message, optional, tag = "1")]
    pub xid: Option<XidPb>,
    #[prost(uint64, tag = "2")]
    pub at_ms: u64,
}

/// Prepared or Committing: the coordinator, and what the resource needs to finish or resolve
/// the branch (the vote metadata).
#[derive(Clone, PartialEq, Message)]
pub struct InFlightPb {
    #[prost(message, optional, tag = "1")]
    pub xid: Option<XidPb>,
    #[prost(string, tag = "2")]
    pub coordinator_id: String,
    #[prost(bytes = "bytes", tag = "3")]
    pub metadata: Bytes,
    #[prost(uint64, tag = "4")]
    pub at_ms: u64,
    /// Request ids the branch took (exactly-once), held until it ends.
    #[prost(string, repeated, tag = "5")]
    pub claims: Vec<String>,
    /// Prepared under three-phase commit: when it aborts itself without a PreCommit (Unix ms).
    /// 0 (absent in journals written before three-phase commit): two-phase.
    #[prost(uint64, tag = "6")]
    pub wait_deadline_ms: u64,
    /// Three-phase: the highest coordinator epoch answered about the branch.
    #[prost(uint64, tag = "7")]
    pub epoch: u64,
}

/// A prepared branch pre-committed: it commits itself at `deadline_ms` (Unix ms).
#[derive(Clone, PartialEq, Message)]
pub struct PreCommittedPb {
    #[prost(message, optional, tag = "1")]
    pub xid: Option<XidPb>,
    #[prost(uint64, tag = "2")]
    pub deadline_ms: u64,
    #[prost(uint64, tag = "3")]
    pub epoch: u64,
    #[prost(uint64, tag = "4")]
    pub at_ms: u64,
}

/// The highest coordinator epoch answered about an undecided three-phase branch.
#[derive(Clone, PartialEq, Message)]
pub struct EpochPb {
    #[prost(message, optional, tag = "1")]
    pub xid: Option<XidPb>,
    #[prost(uint64, tag = "2")]
    pub epoch: u64,
}

/// How a branch ended, on disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, prost::Enumeration)]
#[repr(i32)]
pub enum EndPb {
    Unspecified = 0,
    ReadOnly = 1,
    Committed = 2,
    Aborted = 3,
    HeuristicCommit = 4,
    HeuristicRollback = 5,
    HeuristicMixed = 6,
    HeuristicHazard = 7,
}

#[derive(Clone, PartialEq, Message)]
pub struct FinishedPb {
    #[prost(message, optional, tag = "1")]
    pub xid: Option<XidPb>,
    #[prost(enumeration = "EndPb", tag = "2")]
    pub end: i32,
    #[prost(string, tag = "3")]
    pub reason: String,
    #[prost(uint64, tag = "4")]
    pub at_ms: u64,
    /// A committed branch keeps its request ids for as long as its answer is kept.
    #[prost(string, repeated, tag = "5")]
    pub claims: Vec<String>,
}

pub fn xid_pb(xid: &Xid) -> XidPb {
    XidPb { resource: xid.resource.to_string(), gtid: xid.gtid.as_bytes().to_vec(), branch: xid.branch.to_string() }
}

pub fn xid_of(pb: Option<XidPb>) -> Result<Xid, String> {
    let pb = pb.ok_or("record without xid")?;
    Ok(Xid {
        resource: ResourceId::parse_field("resource", &pb.resource).map_err(|e| e.to_string())?,
        gtid: Gtid::from_slice(&pb.gtid).map_err(|len| format!("gtid of {len} bytes"))?,
        branch: BranchId::parse_field("branch", &pb.branch).map_err(|e| e.to_string())?,
    })
}

/// A branch's end as the journal keeps it: the answer a repeated request gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// Voted READ_ONLY: nothing to commit or roll back.
    ReadOnly,
    Outcome(Outcome),
}

impl End {
    pub fn to_pb(&self) -> (EndPb, &str) {
        match self {
            End::ReadOnly => (EndPb::ReadOnly, ""),
            End::Outcome(Outcome::Committed) => (EndPb::Committed, ""),
            End::Outcome(Outcome::Aborted { reason }) => (EndPb::Aborted, reason),
            End::Outcome(Outcome::HeuristicCommit { reason }) => (EndPb::HeuristicCommit, reason),
            End::Outcome(Outcome::HeuristicRollback { reason }) => (EndPb::HeuristicRollback, reason),
            End::Outcome(Outcome::HeuristicMixed { reason }) => (EndPb::HeuristicMixed, reason),
            End::Outcome(Outcome::HeuristicHazard { reason }) => (EndPb::HeuristicHazard, reason),
        }
    }

    pub fn from_pb(end: i32, reason: String) -> Result<End, String> {
        Ok(match EndPb::try_from(end).map_err(|_| format!("unknown end {end}"))? {
            EndPb::Unspecified => return Err("end not given".into()),
            EndPb::ReadOnly => End::ReadOnly,
            EndPb::Committed => End::Outcome(Outcome::Committed),
            EndPb::Aborted => End::Outcome(Outcome::Aborted { reason }),
            EndPb::HeuristicCommit => End::Outcome(Outcome::HeuristicCommit { reason }),
            EndPb::HeuristicRollback => End::Outcome(Outcome::HeuristicRollback { reason }),
            EndPb::HeuristicMixed => End::Outcome(Outcome::HeuristicMixed { reason }),
            EndPb::HeuristicHazard => End::Outcome(Outcome::HeuristicHazard { reason }),
        })
    }

    /// The branch's work took effect (its request ids stay taken).
    pub fn committed(&self) -> bool {
        matches!(self, End::Outcome(Outcome::Committed | Outcome::HeuristicCommit { .. }))
    }

    /// A short name, for messages.
    pub fn name(&self) -> &'static str {
        match self {
            End::ReadOnly => "read-only",
            End::Outcome(Outcome::Committed) => "committed",
            End::Outcome(Outcome::Aborted { .. }) => "aborted",
            End::Outcome(_) => "ended with a heuristic outcome",
        }
    }
}
