//! How the engine's [`LogRecord`]s are stored in the decision log.
//!
//! Each record is one `pledge-log` record: a type byte plus a protobuf payload. Protobuf (via
//! prost's derive, no .proto file: this format is internal) gives compact payloads and lets a
//! later version add fields that an older one skips. The type byte is the schema; never reuse
//! one for a different message.

use std::sync::Arc;

use bytes::Bytes;
use pledge_proto::{BranchKey, Gtid, IdError, ResourceId};
use prost::Message;

use crate::engine::{
    BranchOutcome, CommitRecord, EncodedOnce, EndBranch, EndRecord, LogRecord, LoggedBranch, OnePhaseRecord,
    ResolveAction, ResolveEffect, ResolveRecord, ThreePhaseTimeouts, Vote,
};

pub const TYPE_REGISTER: u8 = 1;
pub const TYPE_COMMIT: u8 = 2;
pub const TYPE_END: u8 = 3;
pub const TYPE_FORGOTTEN: u8 = 4;
pub const TYPE_ONE_PHASE: u8 = 5;
/// Three-phase commit's pre-commit decision: a commit record's payload, read by the
/// termination protocol.
pub const TYPE_PRECOMMIT: u8 = 6;
/// An operator's resolution of a transaction (who, why, what it did).
pub const TYPE_RESOLVE: u8 = 7;

/// Bytes a protobuf field of `len` bytes of data takes at most: a tag (one byte for the field
/// numbers used here) and a length varint (at most 5 bytes for lengths below 4 GiB).
const fn field_bound(len: usize) -> usize {
    1 + 5 + len
}

/// An upper bound of a commit record's size without its branches (gtid, two times, epoch, the
/// idempotency key, three-phase timeouts, the owner, and the branches field's own tags); see
/// [`branch_bytes_bound`].
pub fn commit_bytes_bound(idempotency_key: Option<&str>, owner: Option<&str>) -> usize {
    field_bound(16)
        + 3 * field_bound(10)
        + field_bound(idempotency_key.map_or(0, str::len))
        + field_bound(22)
        + field_bound(owner.map_or(0, str::len))
}

/// An upper bound of one branch's share of a commit record with `metadata_bytes` of vote
/// metadata: the engine refuses a vote that would push the record past the log's
/// `max_record_bytes` (a test checks the bound against the real encoding).
pub fn branch_bytes_bound(key: &BranchKey, metadata_bytes: usize) -> usize {
    let fields = field_bound(key.resource.as_str().len())
        + field_bound(key.branch.as_str().len())
        + field_bound(metadata_bytes)
        + 3 * field_bound(10);
    field_bound(fields)
}

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("unknown record type {0}")]
    UnknownType(u8),
    #[error("undecodable payload: {0}")]
    Protobuf(#[from] prost::DecodeError),
    #[error("invalid id: {0}")]
    Id(#[from] IdError),
    #[error("gtid must be 16 bytes, found {0}")]
    GtidLength(usize),
    #[error("invalid enum value {value} in {field}")]
    Enum { field: &'static str, value: i32 },
}

#[derive(Clone, PartialEq, Message)]
struct RegisterPb {
    #[prost(string, tag = "1")]
    resource_id: String,
    #[prost(string, tag = "2")]
    endpoint: String,
}

#[derive(Clone, PartialEq, Message)]
struct ForgottenPb {
    #[prost(uint64, tag = "1")]
    through_ms: u64,
}

#[derive(Clone, PartialEq, Message)]
struct BranchPb {
    #[prost(string, tag = "1")]
    resource_id: String,
    #[prost(string, tag = "2")]
    branch_id: String,
    /// 0 none, 1 prepared, 2 read-only, 3 aborted.
    #[prost(int32, tag = "3")]
    vote: i32,
    #[prost(bytes = "bytes", tag = "4")]
    metadata: Bytes,
    /// 0 none, else [`BranchOutcome`] + 1.
    #[prost(int32, tag = "5")]
    outcome: i32,
    #[prost(uint64, tag = "6")]
    prepared_ms: u64,
}

#[derive(Clone, PartialEq, Message)]
struct CommitPb {
    #[prost(bytes = "vec", tag = "1")]
    gtid: Vec<u8>,
    #[prost(uint64, tag = "2")]
    created_ms: u64,
    #[prost(uint64, tag = "3")]
    decided_ms: u64,
    #[prost(string, optional, tag = "4")]
    idempotency_key: Option<String>,
    #[prost(message, repeated, tag = "5")]
    branches: Vec<BranchPb>,
    #[prost(uint64, tag = "6")]
    epoch: u64,
    /// Absent: two-phase.
    #[prost(message, optional, tag = "7")]
    three_phase: Option<ThreePhasePb>,
    /// The application that began it; absent when calls were not authenticated.
    #[prost(string, optional, tag = "8")]
    owner: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Message)]
struct ThreePhasePb {
    #[prost(uint64, tag = "1")]
    precommit_wait_ms: u64,
    #[prost(uint64, tag = "2")]
    docommit_wait_ms: u64,
}

impl From<ThreePhaseTimeouts> for ThreePhasePb {
    fn from(t: ThreePhaseTimeouts) -> Self {
        ThreePhasePb { precommit_wait_ms: t.precommit_wait_ms, docommit_wait_ms: t.docommit_wait_ms }
    }
}

impl From<ThreePhasePb> for ThreePhaseTimeouts {
    fn from(t: ThreePhasePb) -> Self {
        ThreePhaseTimeouts { precommit_wait_ms: t.precommit_wait_ms, docommit_wait_ms: t.docommit_wait_ms }
    }
}

#[derive(Clone, PartialEq, Message)]
struct OnePhasePb {
    #[prost(bytes = "vec", tag = "1")]
    gtid: Vec<u8>,
    #[prost(uint64, tag = "2")]
    created_ms: u64,
    #[prost(uint64, tag = "3")]
    decided_ms: u64,
    #[prost(string, optional, tag = "4")]
    idempotency_key: Option<String>,
    #[prost(string, tag = "5")]
    resource_id: String,
    #[prost(string, tag = "6")]
    branch_id: String,
    #[prost(bool, tag = "7")]
    may_be_empty: bool,
    #[prost(uint64, tag = "8")]
    epoch: u64,
    #[prost(string, optional, tag = "9")]
    owner: Option<String>,
}

#[derive(Clone, PartialEq, Message)]
struct EndPb {
    #[prost(bytes = "vec", tag = "1")]
    gtid: Vec<u8>,
    #[prost(bool, tag = "2")]
    committed: bool,
    #[prost(string, optional, tag = "3")]
    reason: Option<String>,
    #[prost(uint64, tag = "4")]
    created_ms: u64,
    #[prost(uint64, tag = "5")]
    decided_ms: u64,
    #[prost(uint64, tag = "6")]
    completed_ms: u64,
    #[prost(bool, tag = "7")]
    one_phase: bool,
    #[prost(string, optional, tag = "8")]
    idempotency_key: Option<String>,
    #[prost(message, repeated, tag = "9")]
    branches: Vec<BranchPb>,
    #[prost(message, optional, tag = "10")]
    three_phase: Option<ThreePhasePb>,
    /// Absent in records written before resolutions existed: then any heuristic outcome.
    #[prost(bool, optional, tag = "11")]
    kept_for_operator: Option<bool>,
    #[prost(string, optional, tag = "12")]
    owner: Option<String>,
}

#[derive(Clone, PartialEq, Message)]
struct ResolvePb {
    #[prost(bytes = "vec", tag = "1")]
    gtid: Vec<u8>,
    #[prost(uint64, tag = "2")]
    epoch: u64,
    #[prost(uint64, tag = "3")]
    at_ms: u64,
    /// 1 commit, 2 rollback, 3 forget.
    #[prost(int32, tag = "4")]
    action: i32,
    /// Both empty: the whole transaction.
    #[prost(string, tag = "5")]
    resource_id: String,
    #[prost(string, tag = "6")]
    branch_id: String,
    #[prost(string, tag = "7")]
    operator: String,
    #[prost(string, tag = "8")]
    peer: String,
    #[prost(string, tag = "9")]
    reason: String,
    /// 1 retried, 2 branch settled, 3 decided, 4 forgotten.
    #[prost(int32, tag = "10")]
    effect: i32,
    #[prost(bool, tag = "11")]
    releases: bool,
    /// 0 none, else [`BranchOutcome`] + 1.
    #[prost(int32, tag = "12")]
    branch_outcome: i32,
    #[prost(message, repeated, tag = "13")]
    hazards: Vec<BranchKeyPb>,
}

#[derive(Clone, PartialEq, Message)]
struct BranchKeyPb {
    #[prost(string, tag = "1")]
    resource_id: String,
    #[prost(string, tag = "2")]
    branch_id: String,
}

const ACTIONS: [ResolveAction; 3] = [ResolveAction::Commit, ResolveAction::Rollback, ResolveAction::Forget];
const EFFECTS: [ResolveEffect; 4] =
    [ResolveEffect::Retried, ResolveEffect::BranchSettled, ResolveEffect::Decided, ResolveEffect::Forgotten];

/// The 1-based code of `value` in `table` (0 is never written: it is a missing field).
fn code_of<T: PartialEq>(table: &[T], value: &T) -> i32 {
    table.iter().position(|x| x == value).expect("every value is in its table") as i32 + 1
}

fn from_code<T: Copy>(table: &[T], field: &'static str, value: i32) -> Result<T, DecodeError> {
    usize::try_from(value)
        .ok()
        .and_then(|c| c.checked_sub(1))
        .and_then(|i| table.get(i).copied())
        .ok_or(DecodeError::Enum { field, value })
}

fn resolve_pb(r: &ResolveRecord) -> ResolvePb {
    let (resource_id, branch_id) =
        r.branch.as_ref().map(|b| (b.resource.to_string(), b.branch.to_string())).unwrap_or_default();
    ResolvePb {
        gtid: r.gtid.as_bytes().to_vec(),
        epoch: r.epoch,
        at_ms: r.at_ms,
        action: code_of(&ACTIONS, &r.action),
        resource_id,
        branch_id,
        operator: r.operator.clone(),
        peer: r.peer.clone(),
        reason: r.reason.clone(),
        effect: code_of(&EFFECTS, &r.effect),
        releases: r.releases,
        branch_outcome: outcome_code(r.branch_outcome),
        hazards: r
            .hazards
            .iter()
            .map(|k| BranchKeyPb { resource_id: k.resource.to_string(), branch_id: k.branch.to_string() })
            .collect(),
    }
}

fn resolve_from(payload: &[u8]) -> Result<ResolveRecord, DecodeError> {
    let pb = ResolvePb::decode(payload)?;
    let branch = match pb.resource_id.is_empty() && pb.branch_id.is_empty() {
        true => None,
        false => Some(BranchKey::new(&pb.resource_id, &pb.branch_id)?),
    };
    Ok(ResolveRecord {
        gtid: gtid_from(&pb.gtid)?,
        epoch: pb.epoch,
        at_ms: pb.at_ms,
        action: from_code(&ACTIONS, "action", pb.action)?,
        branch,
        operator: pb.operator,
        peer: pb.peer,
        reason: pb.reason,
        effect: from_code(&EFFECTS, "effect", pb.effect)?,
        branch_outcome: outcome_from(pb.branch_outcome)?,
        hazards: pb.hazards.iter().map(|k| BranchKey::new(&k.resource_id, &k.branch_id)).collect::<Result<_, _>>()?,
        releases: pb.releases,
    })
}

fn vote_code(vote: Option<Vote>) -> i32 {
    match vote {
        None => 0,
        Some(Vote::Prepared) => 1,
        Some(Vote::ReadOnly) => 2,
        Some(Vote::Aborted) => 3,
    }
}

fn vote_from(code: i32) -> Result<Option<Vote>, DecodeError> {
    Ok(match code {
        0 => None,
        1 => Some(Vote::Prepared),
        2 => Some(Vote::ReadOnly),
        3 => Some(Vote::Aborted),
        value => return Err(DecodeError::Enum { field: "vote", value }),
    })
}

const OUTCOMES: [BranchOutcome; 6] = [
    BranchOutcome::Committed,
    BranchOutcome::Aborted,
    BranchOutcome::HeuristicCommit,
    BranchOutcome::HeuristicRollback,
    BranchOutcome::HeuristicMixed,
    BranchOutcome::HeuristicHazard,
];

fn outcome_code(outcome: Option<BranchOutcome>) -> i32 {
    outcome.map_or(0, |o| OUTCOMES.iter().position(|x| *x == o).unwrap() as i32 + 1)
}

fn outcome_from(code: i32) -> Result<Option<BranchOutcome>, DecodeError> {
    match code {
        0 => Ok(None),
        c if (1..=OUTCOMES.len() as i32).contains(&c) => Ok(Some(OUTCOMES[c as usize - 1])),
        value => Err(DecodeError::Enum { field: "outcome", value }),
    }
}

fn branch_pb(
    key: &BranchKey,
    vote: Option<Vote>,
    metadata: Bytes,
    outcome: Option<BranchOutcome>,
    prepared_ms: u64,
) -> BranchPb {
    BranchPb {
        resource_id: key.resource.to_string(),
        branch_id: key.branch.to_string(),
        vote: vote_code(vote),
        metadata,
        outcome: outcome_code(outcome),
        prepared_ms,
    }
}

fn gtid_from(bytes: &[u8]) -> Result<Gtid, DecodeError> {
    Gtid::from_slice(bytes).map_err(DecodeError::GtidLength)
}

/// The record type byte and protobuf payload of a record.
pub fn encode(record: &LogRecord) -> (u8, Bytes) {
    match record {
        LogRecord::Register { resource, endpoint } => (
            TYPE_REGISTER,
            RegisterPb { resource_id: resource.to_string(), endpoint: endpoint.clone() }.encode_to_vec().into(),
        ),
        LogRecord::Commit(c) => (TYPE_COMMIT, commit_pb(c).encode_to_vec().into()),
        LogRecord::PreCommit(c) => (TYPE_PRECOMMIT, commit_pb(c).encode_to_vec().into()),
        LogRecord::OnePhase(o) => {
            let pb = OnePhasePb {
                gtid: o.gtid.as_bytes().to_vec(),
                created_ms: o.created_ms,
                decided_ms: o.decided_ms,
                idempotency_key: o.idempotency_key.clone(),
                resource_id: o.branch.resource.to_string(),
                branch_id: o.branch.branch.to_string(),
                may_be_empty: o.may_be_empty,
                epoch: o.epoch,
                owner: o.owner.as_deref().map(str::to_string),
            };
            (TYPE_ONE_PHASE, pb.encode_to_vec().into())
        }
        // Encoded once and shared: a retained End record goes into every checkpoint.
        LogRecord::End(e) => (TYPE_END, e.encoded.get_or_init(|| end_pb(e).encode_to_vec())),
        LogRecord::Forgotten { through_ms } => {
            (TYPE_FORGOTTEN, ForgottenPb { through_ms: *through_ms }.encode_to_vec().into())
        }
        LogRecord::Resolve(r) => (TYPE_RESOLVE, resolve_pb(r).encode_to_vec().into()),
    }
}

fn commit_pb(c: &CommitRecord) -> CommitPb {
    CommitPb {
        gtid: c.gtid.as_bytes().to_vec(),
        created_ms: c.created_ms,
        decided_ms: c.decided_ms,
        idempotency_key: c.idempotency_key.clone(),
        branches: c
            .branches
            .iter()
            .map(|b| branch_pb(&b.key, Some(b.vote), b.metadata.clone(), None, b.prepared_ms))
            .collect(),
        epoch: c.epoch,
        three_phase: c.three_phase.map(ThreePhasePb::from),
        owner: c.owner.as_deref().map(str::to_string),
    }
}

fn commit_from(payload: &[u8]) -> Result<CommitRecord, DecodeError> {
    let pb = CommitPb::decode(payload)?;
    let mut branches = Vec::with_capacity(pb.branches.len());
    for b in &pb.branches {
        let vote = vote_from(b.vote)?.ok_or(DecodeError::Enum { field: "vote", value: 0 })?;
        branches.push(LoggedBranch {
            key: BranchKey::new(&b.resource_id, &b.branch_id)?,
            vote,
            metadata: b.metadata.clone(),
            prepared_ms: b.prepared_ms,
        });
    }
    Ok(CommitRecord {
        gtid: gtid_from(&pb.gtid)?,
        epoch: pb.epoch,
        created_ms: pb.created_ms,
        decided_ms: pb.decided_ms,
        idempotency_key: pb.idempotency_key,
        branches,
        three_phase: pb.three_phase.map(ThreePhaseTimeouts::from),
        owner: pb.owner.map(Arc::from),
    })
}

fn end_pb(e: &EndRecord) -> EndPb {
    EndPb {
        gtid: e.gtid.as_bytes().to_vec(),
        committed: e.committed,
        reason: e.reason.clone(),
        created_ms: e.created_ms,
        decided_ms: e.decided_ms,
        completed_ms: e.completed_ms,
        one_phase: e.one_phase,
        idempotency_key: e.idempotency_key.clone(),
        branches: e.branches.iter().map(|b| branch_pb(&b.key, b.vote, Bytes::new(), b.outcome, 0)).collect(),
        three_phase: e.three_phase.map(ThreePhasePb::from),
        kept_for_operator: Some(e.kept_for_operator),
        owner: e.owner.as_deref().map(str::to_string),
    }
}

pub fn decode(rtype: u8, payload: &[u8]) -> Result<LogRecord, DecodeError> {
    let key = |b: &BranchPb| BranchKey::new(&b.resource_id, &b.branch_id);
    Ok(match rtype {
        TYPE_REGISTER => {
            let pb = RegisterPb::decode(payload)?;
            LogRecord::Register {
                resource: ResourceId::parse_field("resource_id", &pb.resource_id)?,
                endpoint: pb.endpoint,
            }
        }
        TYPE_COMMIT => LogRecord::Commit(commit_from(payload)?),
        TYPE_PRECOMMIT => LogRecord::PreCommit(commit_from(payload)?),
        TYPE_END => {
            let pb = EndPb::decode(payload)?;
            let mut branches = Vec::with_capacity(pb.branches.len());
            for b in &pb.branches {
                branches.push(EndBranch { key: key(b)?, vote: vote_from(b.vote)?, outcome: outcome_from(b.outcome)? });
            }
            let kept_for_operator = pb
                .kept_for_operator
                .unwrap_or_else(|| branches.iter().any(|b| b.outcome.is_some_and(BranchOutcome::is_heuristic)));
            LogRecord::End(Arc::new(EndRecord {
                kept_for_operator,
                gtid: gtid_from(&pb.gtid)?,
                committed: pb.committed,
                reason: pb.reason,
                created_ms: pb.created_ms,
                decided_ms: pb.decided_ms,
                completed_ms: pb.completed_ms,
                one_phase: pb.one_phase,
                three_phase: pb.three_phase.map(ThreePhaseTimeouts::from),
                idempotency_key: pb.idempotency_key,
                branches,
                // Replayed records go into the next checkpoint as they are.
                encoded: EncodedOnce::from(payload.to_vec()),
                owner: pb.owner.map(Arc::from),
            }))
        }
        TYPE_ONE_PHASE => {
            let pb = OnePhasePb::decode(payload)?;
            LogRecord::OnePhase(OnePhaseRecord {
                gtid: gtid_from(&pb.gtid)?,
                epoch: pb.epoch,
                created_ms: pb.created_ms,
                decided_ms: pb.decided_ms,
                idempotency_key: pb.idempotency_key,
                branch: BranchKey::new(&pb.resource_id, &pb.branch_id)?,
                may_be_empty: pb.may_be_empty,
                owner: pb.owner.map(Arc::from),
            })
        }
        TYPE_FORGOTTEN => LogRecord::Forgotten { through_ms: ForgottenPb::decode(payload)?.through_ms },
        TYPE_RESOLVE => LogRecord::Resolve(Arc::new(resolve_from(payload)?)),
        other => return Err(DecodeError::UnknownType(other)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        let k1 = BranchKey::new("db1", "b1").unwrap();
        let k2 = BranchKey::new("kafka", "out").unwrap();
        let records = vec![
            LogRecord::Register { resource: "db1".parse().unwrap(), endpoint: "http://127.0.0.1:1".into() },
            LogRecord::Commit(CommitRecord {
                gtid: Gtid::from_parts(1_700_000_000_000, 7),
                epoch: 3,
                created_ms: 1,
                decided_ms: 2,
                idempotency_key: Some("k".into()),
                branches: vec![
                    LoggedBranch {
                        key: k1.clone(),
                        vote: Vote::Prepared,
                        metadata: Bytes::from_static(b"pid=4"),
                        prepared_ms: 9,
                    },
                    LoggedBranch { key: k2.clone(), vote: Vote::ReadOnly, metadata: Bytes::new(), prepared_ms: 0 },
                ],
                three_phase: None,
                owner: Some(Arc::from("payments")),
            }),
            LogRecord::PreCommit(CommitRecord {
                gtid: Gtid::from_parts(1_700_000_000_000, 10),
                epoch: 5,
                created_ms: 1,
                decided_ms: 2,
                idempotency_key: None,
                branches: vec![LoggedBranch {
                    key: k1.clone(),
                    vote: Vote::Prepared,
                    metadata: Bytes::from_static(b"x"),
                    prepared_ms: 3,
                }],
                three_phase: Some(ThreePhaseTimeouts { precommit_wait_ms: 15_000, docommit_wait_ms: 10_000 }),
                owner: None,
            }),
            LogRecord::End(Arc::new(EndRecord {
                gtid: Gtid::from_parts(1_700_000_000_000, 8),
                committed: false,
                reason: Some("no".into()),
                created_ms: 1,
                decided_ms: 2,
                completed_ms: 3,
                one_phase: true,
                three_phase: Some(ThreePhaseTimeouts { precommit_wait_ms: 1, docommit_wait_ms: 2 }),
                idempotency_key: None,
                branches: vec![EndBranch {
                    key: k2.clone(),
                    vote: None,
                    outcome: Some(BranchOutcome::HeuristicHazard),
                }],
                kept_for_operator: true,
                encoded: Default::default(),
                owner: None,
            })),
            LogRecord::Resolve(Arc::new(ResolveRecord {
                gtid: Gtid::from_parts(1_700_000_000_000, 8),
                epoch: 2,
                at_ms: 1_700_000_001_000,
                action: ResolveAction::Rollback,
                branch: Some(k2),
                operator: "alice".into(),
                peer: "127.0.0.1:4000".into(),
                reason: "restored the row by hand".into(),
                effect: ResolveEffect::BranchSettled,
                branch_outcome: Some(BranchOutcome::HeuristicRollback),
                hazards: vec![],
                releases: true,
            })),
            LogRecord::Resolve(Arc::new(ResolveRecord {
                gtid: Gtid::from_parts(1_700_000_000_000, 11),
                epoch: 0,
                at_ms: 5,
                action: ResolveAction::Rollback,
                branch: None,
                operator: String::new(),
                peer: String::new(),
                reason: "x".into(),
                effect: ResolveEffect::Decided,
                branch_outcome: None,
                hazards: vec![k1.clone(), BranchKey::new("db2", "x").unwrap()],
                releases: false,
            })),
            LogRecord::Forgotten { through_ms: 1_800_000_000_000 },
            LogRecord::OnePhase(OnePhaseRecord {
                gtid: Gtid::from_parts(1_700_000_000_000, 9),
                epoch: 4,
                created_ms: 4,
                decided_ms: 5,
                idempotency_key: Some("once".into()),
                branch: BranchKey::new("db1", "only").unwrap(),
                may_be_empty: true,
                owner: Some(Arc::from("orders")),
            }),
        ];
        for r in records {
            let (t, payload) = encode(&r);
            let decoded = decode(t, &payload).unwrap();
            assert_eq!(decoded, r);
            // Encoding again (an End record's is kept) and re-encoding what was read agree.
            assert_eq!(encode(&r), (t, payload.clone()));
            assert_eq!(encode(&decoded), (t, payload));
        }
        assert!(matches!(decode(99, &[]), Err(DecodeError::UnknownType(99))));
    }

    /// The engine bounds commit records with `commit_bytes_bound` + `branch_bytes_bound`; the
    /// real encoding must never be larger, for the longest ids and any metadata and times.
    #[test]
    fn commit_record_size_bound_holds() {
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..200 {
            let n = rng.usize(0..=200);
            let id = |rng: &mut fastrand::Rng| {
                let len = rng.usize(1..=pledge_proto::types::MAX_ID_BYTES);
                std::iter::repeat_with(|| rng.alphanumeric()).take(len).collect::<String>()
            };
            let branches: Vec<LoggedBranch> = (0..n)
                .map(|_| LoggedBranch {
                    key: BranchKey::new(&id(&mut rng), &id(&mut rng)).unwrap(),
                    vote: if rng.bool() { Vote::Prepared } else { Vote::ReadOnly },
                    metadata: Bytes::from(vec![7u8; rng.usize(0..=pledge_proto::MAX_VOTE_METADATA_BYTES)]),
                    prepared_ms: rng.u64(..),
                })
                .collect();
            let key = rng.bool().then(|| "k".repeat(rng.usize(0..=128)));
            let owner: Option<Arc<str>> = rng.bool().then(|| "o".repeat(rng.usize(0..=256)).into());
            let bound = commit_bytes_bound(key.as_deref(), owner.as_deref())
                + branches.iter().map(|b| branch_bytes_bound(&b.key, b.metadata.len())).sum::<usize>();
            let record = LogRecord::Commit(CommitRecord {
                gtid: Gtid::from_parts(rng.u64(..1 << 47), rng.u64(..)),
                epoch: rng.u64(..),
                created_ms: rng.u64(..),
                decided_ms: rng.u64(..),
                idempotency_key: key,
                branches,
                three_phase: rng
                    .bool()
                    .then(|| ThreePhaseTimeouts { precommit_wait_ms: rng.u64(..), docommit_wait_ms: rng.u64(..) }),
                owner,
            });
            let (_, payload) = encode(&record);
            assert!(payload.len() <= bound, "{} bytes encoded, bound {bound}", payload.len());
        }
    }
}
