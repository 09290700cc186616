//! Global transaction identifiers of prepared branches in PostgreSQL.
//!
//! Format: `pledge:<coordinator id>:<gtid>:<resource tag>:<branch id>`, e.g.
//! `pledge:east-1:01920000-0000-7000-8000-000000000001:5f1c29ab:debit`.
//!
//! * The `pledge:` prefix and the coordinator id let recovery find exactly this coordinator's
//!   branches in `pg_prepared_xacts`, beside other applications' and other coordinators'.
//! * GIDs are unique across a whole PostgreSQL cluster, not per database, while a transaction
//!   may have a branch with the same id at two databases of one cluster: the resource tag (the
//!   CRC32C of the resource id, 8 hex digits) keeps them apart. (The resource id itself could
//!   make the GID too long.)
//! * PostgreSQL takes a GID only as a string literal (not a bind parameter), under 200 bytes.
//!   Every part is validated on its own ([A-Za-z0-9._-], at most 64 bytes each; the GTID is a
//!   UUID; the tag is hex), so the longest GID is 7 + 64 + 1 + 36 + 1 + 8 + 1 + 64 = 182 bytes
//!   and no part can contain a quote: the literal is safe to format into the statement.

use std::fmt;

use pledge_proto::{BranchId, Gtid, ResourceId};

pub const PREFIX: &str = "pledge:";
/// PostgreSQL's limit on a GID, in bytes (exclusive).
pub const MAX_GID_BYTES: usize = 200;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Gid {
    pub coordinator_id: ResourceId,
    pub gtid: Gtid,
    pub resource_tag: String,
    pub branch: BranchId,
}

/// The tag of a resource id in its GIDs.
pub fn resource_tag(resource: &ResourceId) -> String {
    format!("{:08x}", crc32c::crc32c(resource.as_str().as_bytes()))
}

impl Gid {
    pub fn new(coordinator_id: &str, resource: &ResourceId, gtid: Gtid, branch: BranchId) -> Result<Gid, String> {
        let coordinator_id = ResourceId::parse_field("coordinator_id", coordinator_id).map_err(|e| e.to_string())?;
        Ok(Gid { coordinator_id, gtid, resource_tag: resource_tag(resource), branch })
    }

    /// The prefix of every GID of `coordinator_id`, for recovery scans.
    pub fn coordinator_prefix(coordinator_id: &ResourceId) -> String {
        format!("{PREFIX}{coordinator_id}:")
    }

    /// Parses a GID found in `pg_prepared_xacts`; `None` for GIDs that are not ours.
    pub fn parse(gid: &str) -> Option<Gid> {
        let rest = gid.strip_prefix(PREFIX)?;
        let mut parts = rest.splitn(4, ':');
        let (coordinator, gtid, tag, branch) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if tag.len() != 8 || !tag.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        Some(Gid {
            coordinator_id: ResourceId::parse_field("coordinator_id", coordinator).ok()?,
            gtid: Gtid::parse_field("gtid", gtid).ok()?,
            resource_tag: tag.to_string(),
            branch: BranchId::parse_field("branch_id", branch).ok()?,
        })
    }

    /// The GID as a quoted SQL literal. Safe by construction (see the module docs).
    pub fn literal(&self) -> String {
        let gid = self.to_string();
        debug_assert!(gid.len() < MAX_GID_BYTES && !gid.contains('\''));
        format!("'{gid}'")
    }
}

impl fmt::Display for Gid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}{}:{}:{}:{}", self.coordinator_id, self.gtid, self.resource_tag, self.branch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gid_round_trips_and_stays_under_the_limit() {
        let gtid = Gtid::from_parts(1_800_000_000_000, 7);
        let resource = ResourceId::parse_field("r", &"r".repeat(64)).unwrap();
        let branch = BranchId::parse_field("b", &"b".repeat(64)).unwrap();
        let longest = Gid::new(&"c".repeat(64), &resource, gtid, branch).unwrap();
        let text = longest.to_string();
        assert_eq!(text.len(), 182);
        assert!(text.len() < MAX_GID_BYTES);
        assert_eq!(Gid::parse(&text), Some(longest.clone()));
        assert_eq!(longest.literal(), format!("'{text}'"));
        assert!(text.starts_with(&Gid::coordinator_prefix(&longest.coordinator_id)));
    }

    #[test]
    fn the_same_branch_at_two_resources_gets_two_gids() {
        let (gtid, branch) = (Gtid::new_v7(), BranchId::parse_field("b", "main").unwrap());
        let a = Gid::new("c1", &"db_a".parse().unwrap(), gtid, branch.clone()).unwrap();
        let b = Gid::new("c1", &"db_b".parse().unwrap(), gtid, branch).unwrap();
        assert_ne!(a.to_string(), b.to_string());
    }

    #[test]
    fn foreign_or_malformed_gids_are_not_ours() {
        assert_eq!(Gid::parse("my-app-gid"), None);
        assert_eq!(Gid::parse("pledge:c1:not-a-uuid:00000000:b"), None);
        assert_eq!(Gid::parse("pledge:c1:01900000-0000-7000-8000-000000000000:b"), None);
        assert_eq!(Gid::parse("pledge:c1:01900000-0000-7000-8000-000000000000:xyz:b"), None);
        assert_eq!(Gid::parse("pledge:c 1:01900000-0000-7000-8000-000000000000:00000000:b"), None);
        let r: ResourceId = "db".parse().unwrap();
        assert!(Gid::new("bad'id", &r, Gtid::new_v7(), BranchId::parse_field("b", "b").unwrap()).is_err());
    }
}
