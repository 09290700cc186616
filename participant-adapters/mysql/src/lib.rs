//! MySQL and MariaDB as a Pledge participant, through XA (issue 15). **In progress**: this
//! crate holds the XID mapping ([`xid`]) so far; the branch resource, the `MysqlBranch.Execute`
//! work API and the `pledge-mysql-adapter` server follow. What they will do, as designed:
//!
//! * A branch is an XA transaction on a connection the adapter pins to it from `XA START` to
//!   `XA PREPARE`; XA statements go over the text protocol (they cannot be prepared
//!   statements), with the XID as hex literals ([`xid::XaXid::sql`]).
//! * XA START needs the XID, and the XID names the coordinator (the gtrid prefix that
//!   `XA RECOVER` is filtered by), before any coordinator has spoken to the branch: so the
//!   adapter is configured with the coordinator id it serves (a cluster's instances share one),
//!   and a Prepare from another coordinator votes no.
//! * Prepare: `XA END` + `XA PREPARE`; then the connection is closed rather than reused, which
//!   detaches the prepared transaction from it (MariaDB ≥ 10.5 and MySQL ≥ 8.0 keep prepared XA
//!   transactions across disconnects and crashes; older servers are refused at start).
//!   Commit `XA COMMIT`, one-phase `XA COMMIT … ONE PHASE`, abort `XA ROLLBACK` (after `XA END`
//!   for a branch still active), recovery `XA RECOVER` filtered by format id, gtrid prefix and
//!   the resource's tag.
//! * No outcome without proof: the branch's first statement inserts a fence row
//!   (`pledge_xa_fence`, keyed by the XID) inside the XA transaction, so the row exists iff
//!   the branch committed. An `XA COMMIT` answered "unknown XID" (1397) is settled by it
//!   (committed; or rolled back outside Pledge: a heuristic rollback), and so is a one-phase
//!   commit whose answer was lost, once the session that ran it (its connection id, in the vote
//!   metadata) is gone from the server; fence rows older than their retention make it a
//!   heuristic hazard.
//! * Checked at start, refusing clearly: the server version, the privilege `XA RECOVER`
//!   needs, and the settings that make a prepared XA transaction durable
//!   (`innodb_flush_log_at_trx_commit = 1`, and `sync_binlog = 1` when the binary log is on).
//! * The branch journal, repeated answers, unknown branches and restarts are the SDK's
//!   (`pledge_sdk::journaled`), as for PostgreSQL and Kafka; three-phase commit comes with it.

pub mod xid;

pub use xid::XaXid;
