//! The XA transaction identifier of every Pledge branch: what the MySQL/MariaDB participant
//! gives the server, and what Get, List and the CLI show for every branch (at any resource), so
//! an operator can match a branch with what a resource manager lists.
//!
//! An XA XID is (format id, gtrid, bqual), gtrid and bqual at most 64 bytes each. Pledge's:
//!
//! * **format id** [`FORMAT_ID`] = 0x504C4447 (`"PLDG"` in ASCII), so `XA RECOVER` tells
//!   Pledge's branches from other applications' at a glance;
//! * **gtrid** = `<coordinator id>:` followed by the 16 bytes of the GTID (a UUIDv7), so one
//!   coordinator's branches share a prefix (recovery lists exactly those). Coordinator ids
//!   used with this adapter are at most [`MAX_COORDINATOR_ID_BYTES`] (47) bytes;
//! * **bqual** = the 4 bytes of the resource tag (CRC32C of the resource id: XIDs are unique
//!   per server, and one server may hold two resources with a branch of the same id), then
//!   the branch id, at most [`MAX_BRANCH_ID_BYTES`] (60) bytes.
//!
//! Both are written as hex literals (`XA START X'…',X'…',1347175495`), so no byte of an id can
//! end up in the SQL text unescaped.

use std::fmt;

use crate::{BranchId, Gtid, ResourceId, Xid};

/// Pledge's XA format id: `"PLDG"`.
pub const FORMAT_ID: u32 = u32::from_be_bytes(*b"PLDG");
/// XA's limit on gtrid and on bqual, in bytes.
pub const MAX_PART_BYTES: usize = 64;
/// The longest coordinator id that fits a gtrid beside its separator and the 16-byte GTID.
pub const MAX_COORDINATOR_ID_BYTES: usize = MAX_PART_BYTES - 1 - 16;
/// The longest branch id that fits a bqual beside the 4-byte resource tag.
pub const MAX_BRANCH_ID_BYTES: usize = MAX_PART_BYTES - 4;

/// A branch's XA XID.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct XaXid {
    pub gtrid: Vec<u8>,
    pub bqual: Vec<u8>,
}

/// The resource tag in a bqual.
pub fn resource_tag(resource: &ResourceId) -> [u8; 4] {
    crc32c::crc32c(resource.as_str().as_bytes()).to_be_bytes()
}

/// The gtrid prefix of every branch of `coordinator_id`.
pub fn coordinator_prefix(coordinator_id: &str) -> Vec<u8> {
    let mut p = coordinator_id.as_bytes().to_vec();
    p.push(b':');
    p
}

impl XaXid {
    /// The XID of `xid` prepared for `coordinator_id`, or why there can be none.
    pub fn new(coordinator_id: &str, xid: &Xid) -> Result<XaXid, String> {
        let cid = ResourceId::parse_field("coordinator_id", coordinator_id).map_err(|e| e.to_string())?;
        if cid.as_str().len() > MAX_COORDINATOR_ID_BYTES {
            return Err(format!(
                "coordinator id {cid:?} is {} bytes; an XA gtrid holds at most {MAX_COORDINATOR_ID_BYTES} bytes of it",
                cid.as_str().len()
            ));
        }
        let branch = xid.branch.as_str();
        if branch.len() > MAX_BRANCH_ID_BYTES {
            return Err(format!(
                "branch id {branch:?} is {} bytes; an XA bqual holds at most {MAX_BRANCH_ID_BYTES} bytes of it",
                branch.len()
            ));
        }
        let mut gtrid = coordinator_prefix(cid.as_str());
        gtrid.extend_from_slice(xid.gtid.as_bytes());
        let mut bqual = resource_tag(&xid.resource).to_vec();
        bqual.extend_from_slice(branch.as_bytes());
        Ok(XaXid { gtrid, bqual })
    }

    /// The branch of `resource` this XID names, if it is one of `coordinator_id`'s (as listed by
    /// `XA RECOVER`: format id, gtrid and bqual).
    pub fn parse(
        coordinator_id: &str,
        resource: &ResourceId,
        format_id: i64,
        gtrid: &[u8],
        bqual: &[u8],
    ) -> Option<Xid> {
        if format_id != i64::from(FORMAT_ID) {
            return None;
        }
        let gtid = gtrid.strip_prefix(coordinator_prefix(coordinator_id).as_slice())?;
        let gtid = Gtid::from_slice(gtid).ok()?;
        let branch = bqual.strip_prefix(resource_tag(resource).as_slice())?;
        let branch = BranchId::parse_field("branch_id", std::str::from_utf8(branch).ok()?).ok()?;
        Some(Xid { resource: resource.clone(), gtid, branch })
    }

    /// `X'<gtrid>',X'<bqual>',<format id>`: the XID as XA statements take it.
    pub fn sql(&self) -> String {
        format!("X'{}',X'{}',{FORMAT_ID}", hex(&self.gtrid), hex(&self.bqual))
    }
}

impl fmt::Display for XaXid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{FORMAT_ID}:{}:{}", hex(&self.gtrid), hex(&self.bqual))
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn xid(resource: &str, branch: &str) -> Xid {
        Xid {
            resource: resource.parse().unwrap(),
            gtid: Gtid::from_parts(1_800_000_000_000, 7),
            branch: BranchId::parse_field("b", branch).unwrap(),
        }
    }

    #[test]
    fn xids_round_trip_at_the_limits_and_are_refused_beyond() {
        let cid = "c".repeat(MAX_COORDINATOR_ID_BYTES);
        let x = xid("orders", &"b".repeat(MAX_BRANCH_ID_BYTES));
        let xa = XaXid::new(&cid, &x).unwrap();
        assert_eq!((xa.gtrid.len(), xa.bqual.len()), (MAX_PART_BYTES, MAX_PART_BYTES));
        assert_eq!(XaXid::parse(&cid, &x.resource, i64::from(FORMAT_ID), &xa.gtrid, &xa.bqual), Some(x.clone()));
        let e = XaXid::new(&"c".repeat(MAX_COORDINATOR_ID_BYTES + 1), &x).unwrap_err();
        assert!(e.contains("at most 47 bytes"), "{e}");
        let e = XaXid::new("c1", &xid("orders", &"b".repeat(MAX_BRANCH_ID_BYTES + 1))).unwrap_err();
        assert!(e.contains("at most 60 bytes"), "{e}");
        assert!(XaXid::new("bad'id", &x).is_err());
    }

    #[test]
    fn other_coordinators_resources_and_formats_are_not_ours() {
        let x = xid("orders", "debit");
        let xa = XaXid::new("c1", &x).unwrap();
        let ours = |cid: &str, resource: &str, format: i64| {
            XaXid::parse(cid, &resource.parse().unwrap(), format, &xa.gtrid, &xa.bqual)
        };
        assert!(ours("c1", "orders", i64::from(FORMAT_ID)).is_some());
        assert_eq!(ours("c2", "orders", i64::from(FORMAT_ID)), None);
        // "c1" is a prefix of "c10": the separator keeps them apart.
        assert_eq!(XaXid::parse("c10", &x.resource, i64::from(FORMAT_ID), &xa.gtrid, &xa.bqual), None);
        assert_eq!(ours("c1", "payments", i64::from(FORMAT_ID)), None);
        assert_eq!(ours("c1", "orders", 1), None);
        assert_ne!(XaXid::new("c1", &xid("payments", "debit")).unwrap(), xa, "one branch id at two resources");
    }

    #[test]
    fn the_sql_form_is_hex_literals_and_the_format_id() {
        let xa = XaXid { gtrid: b"c:\x01".to_vec(), bqual: vec![0xab, b'\''] };
        assert_eq!(xa.sql(), "X'633a01',X'ab27',1347175495");
        assert_eq!(FORMAT_ID, 0x504C_4447);
    }
}
