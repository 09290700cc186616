//! Validated identifiers shared by the coordinator and every participant.
//!
//! Resource and branch ids end up inside PostgreSQL GIDs and Kafka transactional ids, so they
//! are restricted to a small, quoting-free alphabet and a short length here, once, rather than
//! escaped at every use.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use uuid::Uuid;

use crate::v1;

/// Longest resource or branch id, in bytes.
pub const MAX_ID_BYTES: usize = 64;
/// Largest vote metadata a participant may return, in bytes (the coordinator logs it with its
/// decision, once per branch).
pub const MAX_VOTE_METADATA_BYTES: usize = 4096;
/// Longest reason or error text kept from a peer, in bytes; longer ones are cut (they end up
/// in log records and replies, which have bounds of their own).
pub const MAX_REASON_BYTES: usize = 1024;

/// Cuts `text` to [`MAX_REASON_BYTES`] at a character boundary, marking the cut.
pub fn bounded_reason(mut text: String) -> String {
    if text.len() > MAX_REASON_BYTES {
        let mut end = MAX_REASON_BYTES - 3;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push_str("...");
    }
    text
}

/// Why an identifier was refused. The message names the field and the rule it broke.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("{field}: must not be empty")]
    Empty { field: &'static str },
    #[error("{field}: {len} bytes is longer than the limit of {max} bytes")]
    TooLong { field: &'static str, len: usize, max: usize },
    #[error("{field}: character {ch:?} is not allowed (use A-Z a-z 0-9 . _ -)")]
    BadChar { field: &'static str, ch: char },
    #[error("{field}: {value:?} is not a UUID: {reason}")]
    BadGtid { field: &'static str, value: String, reason: String },
    #[error("{field}: is required")]
    Missing { field: &'static str },
}

/// A global transaction id: a UUIDv7 issued by the coordinator's Begin. Its first 48 bits are
/// the issue time in Unix milliseconds, which participants use to bound how long they must
/// remember aborted branches.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Gtid(Uuid);

impl Gtid {
    /// A new GTID for the current time.
    pub fn new_v7() -> Self {
        Gtid(Uuid::now_v7())
    }

    pub fn from_uuid(uuid: Uuid) -> Self {
        Gtid(uuid)
    }

    /// Deterministic GTID for tests and simulations: `n` in the low bits, `unix_ms` as the
    /// UUIDv7 timestamp.
    pub fn from_parts(unix_ms: u64, n: u64) -> Self {
        let mut bytes = [0u8; 16];
        bytes[..6].copy_from_slice(&unix_ms.to_be_bytes()[2..]);
        bytes[6] = 0x70; // version 7
        bytes[8] = 0x80; // RFC 4122 variant
        bytes[9..].copy_from_slice(&n.to_be_bytes()[1..]);
        Gtid(Uuid::from_bytes(bytes))
    }

    /// A new GTID for the current time in `shard` of `shard_count` (see [`Gtid::shard`]): a
    /// UUIDv7 whose last two bytes are chosen so; 58 random bits remain.
    pub fn new_v7_in_shard(shard: u16, shard_count: u16) -> Self {
        assert!(shard_count > 0 && shard < shard_count, "shard {shard} of {shard_count}");
        let mut bytes = *Uuid::now_v7().as_bytes();
        let slots = (u32::from(u16::MAX) + 1) / u32::from(shard_count);
        let tail = u32::from(shard) + u32::from(shard_count) * fastrand::u32(..slots);
        bytes[14..].copy_from_slice(&(tail as u16).to_be_bytes());
        Gtid(Uuid::from_bytes(bytes))
    }

    /// The shard of a coordinator cluster this GTID belongs to: its last two bytes modulo
    /// `shard_count`. Fixed for the GTID's life, so any instance can tell which shard owner
    /// decides it.
    pub fn shard(&self, shard_count: u16) -> u16 {
        let b = self.0.as_bytes();
        u16::from_be_bytes([b[14], b[15]]) % shard_count.max(1)
    }

    pub fn as_uuid(&self) -> &Uuid {
        &self.0
    }

    pub fn as_bytes(&self) -> &[u8; 16] {
        self.0.as_bytes()
    }

    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        Gtid(Uuid::from_bytes(bytes))
    }

    /// A GTID from its 16 bytes as stored in log records; `Err` carries the wrong length.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, usize> {
        bytes.try_into().map(Gtid::from_bytes).map_err(|_| bytes.len())
    }

    /// The issue time of a UUIDv7 GTID in Unix milliseconds; `None` for other UUID versions.
    pub fn unix_ms(&self) -> Option<u64> {
        if self.0.get_version_num() != 7 {
            return None;
        }
        let b = self.0.as_bytes();
        let mut ms = [0u8; 8];
        ms[2..].copy_from_slice(&b[..6]);
        Some(u64::from_be_bytes(ms))
    }

    /// Parses a wire field, naming it in the error.
    pub fn parse_field(field: &'static str, value: &str) -> Result<Self, IdError> {
        if value.is_empty() {
            return Err(IdError::Missing { field });
        }
        Uuid::try_parse(value).map(Gtid).map_err(|e| IdError::BadGtid {
            field,
            value: truncate_for_error(value),
            reason: e.to_string(),
        })
    }
}

impl fmt::Display for Gtid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0.hyphenated(), f)
    }
}

impl fmt::Debug for Gtid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Gtid {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Gtid::parse_field("gtid", s)
    }
}

fn truncate_for_error(value: &str) -> String {
    let mut end = value.len().min(80);
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    value[..end].to_string()
}

fn validate_id(field: &'static str, value: &str) -> Result<(), IdError> {
    if value.is_empty() {
        return Err(IdError::Empty { field });
    }
    if value.len() > MAX_ID_BYTES {
        return Err(IdError::TooLong { field, len: value.len(), max: MAX_ID_BYTES });
    }
    if let Some(ch) = value.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))) {
        return Err(IdError::BadChar { field, ch });
    }
    Ok(())
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $field:literal) => {
        $(#[$doc])*
        ///
        /// 1-64 bytes of `[A-Za-z0-9._-]`. Cheap to clone (shared string).
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Arc<str>);

        impl $name {
            /// Validates `value`, naming `field` in the error.
            pub fn parse_field(field: &'static str, value: &str) -> Result<Self, IdError> {
                validate_id(field, value)?;
                Ok($name(Arc::from(value)))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                $name::parse_field($field, s)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&*self.0, f)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

id_type!(
    /// The id under which a participant (one resource: a database, a Kafka cluster, a service)
    /// is registered with the coordinator.
    ResourceId,
    "resource_id"
);
id_type!(
    /// Tells apart the branches of one transaction at the same resource.
    BranchId,
    "branch_id"
);

/// A branch of a transaction as the coordinator knows it: at which resource, under which id.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BranchKey {
    pub resource: ResourceId,
    pub branch: BranchId,
}

impl BranchKey {
    pub fn new(resource: &str, branch: &str) -> Result<Self, IdError> {
        Ok(BranchKey {
            resource: ResourceId::parse_field("resource_id", resource)?,
            branch: BranchId::parse_field("branch_id", branch)?,
        })
    }
}

impl fmt::Display for BranchKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.resource, self.branch)
    }
}

impl fmt::Debug for BranchKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl TryFrom<&v1::BranchRef> for BranchKey {
    type Error = IdError;
    fn try_from(r: &v1::BranchRef) -> Result<Self, Self::Error> {
        BranchKey::new(&r.resource_id, &r.branch_id)
    }
}

impl From<&BranchKey> for v1::BranchRef {
    fn from(k: &BranchKey) -> Self {
        v1::BranchRef { resource_id: k.resource.to_string(), branch_id: k.branch.to_string(), may_be_empty: false }
    }
}

/// A branch as a participant sees it: (resource, gtid, branch).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct Xid {
    pub resource: ResourceId,
    pub gtid: Gtid,
    pub branch: BranchId,
}

impl fmt::Display for Xid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.gtid, self.resource, self.branch)
    }
}

impl TryFrom<&v1::BranchXid> for Xid {
    type Error = IdError;
    fn try_from(x: &v1::BranchXid) -> Result<Self, Self::Error> {
        Ok(Xid {
            resource: ResourceId::parse_field("resource_id", &x.resource_id)?,
            gtid: Gtid::parse_field("gtid", &x.gtid)?,
            branch: BranchId::parse_field("branch_id", &x.branch_id)?,
        })
    }
}

impl From<&Xid> for v1::BranchXid {
    fn from(x: &Xid) -> Self {
        v1::BranchXid { resource_id: x.resource.to_string(), gtid: x.gtid.to_string(), branch_id: x.branch.to_string() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gtid_round_trips_and_reports_its_time() {
        let g = Gtid::from_parts(1_700_000_000_123, 42);
        assert_eq!(g.unix_ms(), Some(1_700_000_000_123));
        let parsed: Gtid = g.to_string().parse().unwrap();
        assert_eq!(parsed, g);
        let now = Gtid::new_v7();
        assert!(now.unix_ms().unwrap() > 1_700_000_000_000);
    }

    #[test]
    fn a_gtid_issued_in_a_shard_maps_back_to_it() {
        for count in [1u16, 3, 64, 1000, u16::MAX] {
            for shard in [0, count / 2, count - 1] {
                for _ in 0..50 {
                    let g = Gtid::new_v7_in_shard(shard, count);
                    assert_eq!(g.shard(count), shard, "shard {shard} of {count}");
                    assert_eq!(g.as_uuid().get_version_num(), 7);
                    assert!(g.unix_ms().unwrap() > 1_700_000_000_000);
                }
            }
        }
        // Random GTIDs spread over every shard.
        let mut seen = [false; 64];
        for _ in 0..10_000 {
            seen[Gtid::new_v7().shard(64) as usize] = true;
        }
        assert!(seen.iter().all(|&s| s));
    }

    #[test]
    fn malformed_ids_name_the_field() {
        let e = Gtid::parse_field("gtid", "not-a-uuid").unwrap_err();
        assert!(e.to_string().starts_with("gtid: \"not-a-uuid\" is not a UUID"), "{e}");
        assert_eq!(Gtid::parse_field("gtid", "").unwrap_err(), IdError::Missing { field: "gtid" });
        let e = ResourceId::parse_field("resource_id", "db 1").unwrap_err();
        assert_eq!(e, IdError::BadChar { field: "resource_id", ch: ' ' });
        let long = "x".repeat(MAX_ID_BYTES + 1);
        assert!(matches!(BranchId::parse_field("branch_id", &long), Err(IdError::TooLong { len: 65, .. })));
        assert!(BranchId::parse_field("branch_id", &"x".repeat(MAX_ID_BYTES)).is_ok());
        assert!(BranchKey::new("orders-db", "b.1_x").is_ok());
        // a quote would break a PostgreSQL GID literal
        assert!(BranchKey::new("db", "it's").is_err());
    }
}
