//! Global transaction identifiers of prepared branches in PostgreSQL.
//!
//! Format: `pledge:<coordinator id>:<gtid>:<branch id>`, e.g.
//! `pledge:east-1:01920000-0000-7000-8000-000000000001:debit`.
//!
//! * The `pledge:` prefix and the coordinator id let recovery find exactly this coordinator's
//!   branches in `pg_prepared_xacts`, beside other applications' and other coordinators'.
//! * PostgreSQL takes a GID only as a string literal (not a bind parameter), under 200 bytes.
//!   Every part is validated on its own ([A-Za-z0-9._-], at most 64 bytes each; the GTID is a
//!   UUID), so the longest GID is 7 + 64 + 1 + 36 + 1 + 64 = 173 bytes and no part can contain
//!   a quote: the literal is safe to format into the statement.

use std::fmt;

use pledge_proto::{BranchId, Gtid, ResourceId};

pub const PREFIX: &str = "pledge:";
/// PostgreSQL's limit on a GID, in bytes (exclusive).
pub const MAX_GID_BYTES: usize = 200;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Gid {
    pub coordinator_id: ResourceId,
    pub gtid: Gtid,
    pub branch: BranchId,
}

impl Gid {
    pub fn new(coordinator_id: &str, gtid: Gtid, branch: BranchId) -> Result<Gid, String> {
        let coordinator_id = ResourceId::parse_field("coordinator_id", coordinator_id).map_err(|e| e.to_string())?;
        Ok(Gid { coordinator_id, gtid, branch })
    }

    /// The prefix of every GID of `coordinator_id`, for recovery scans.
    pub fn coordinator_prefix(coordinator_id: &ResourceId) -> String {
        format!("{PREFIX}{coordinator_id}:")
    }

    /// Parses a GID found in `pg_prepared_xacts`; `None` for GIDs that are not ours.
    pub fn parse(gid: &str) -> Option<Gid> {
        let rest = gid.strip_prefix(PREFIX)?;
        let mut parts = rest.splitn(3, ':');
        let (coordinator, gtid, branch) = (parts.next()?, parts.next()?, parts.next()?);
        Some(Gid {
            coordinator_id: ResourceId::parse_field("coordinator_id", coordinator).ok()?,
            gtid: Gtid::parse_field("gtid", gtid).ok()?,
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
        write!(f, "{PREFIX}{}:{}:{}", self.coordinator_id, self.gtid, self.branch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gid_round_trips_and_stays_under_the_limit() {
        let gtid = Gtid::from_parts(1_800_000_000_000, 7);
        let longest = Gid::new(&"c".repeat(64), gtid, BranchId::parse_field("b", &"b".repeat(64)).unwrap()).unwrap();
        let text = longest.to_string();
        assert_eq!(text.len(), 173);
        assert!(text.len() < MAX_GID_BYTES);
        assert_eq!(Gid::parse(&text), Some(longest.clone()));
        assert_eq!(longest.literal(), format!("'{text}'"));
        assert!(text.starts_with(&Gid::coordinator_prefix(&longest.coordinator_id)));
    }

    #[test]
    fn foreign_or_malformed_gids_are_not_ours() {
        assert_eq!(Gid::parse("my-app-gid"), None);
        assert_eq!(Gid::parse("pledge:c1:not-a-uuid:b"), None);
        assert_eq!(Gid::parse("pledge:c1:01900000-0000-7000-8000-000000000000"), None);
        assert_eq!(Gid::parse("pledge:c 1:01900000-0000-7000-8000-000000000000:b"), None);
        assert!(Gid::new("bad'id", Gtid::new_v7(), BranchId::parse_field("b", "b").unwrap()).is_err());
    }
}
