//! Every limit of the coordinator, with the range it must lie in. [`Config::validate`]
//! checks each at start and names the key of any value out of range, so a mistyped setting
//! stops the start instead of surfacing later as a hang or a refusal (a retention of 0 used to
//! leave a one-phase Commit unanswered).
//!
//! [`Config::validate`]: crate::config::Config::validate

use crate::config::Config;

/// Upper limit of `max_branches_per_transaction`. The engine also bounds each commit record by
/// its real size (a vote whose metadata would overflow `max_record_bytes` aborts its
/// transaction), so this is a bound on work per transaction, not the record's only guard.
pub const MAX_BRANCHES_LIMIT: usize = 200;
/// Upper limit of `participant_max_batch_branches`: a batched call must stay under the 4 MiB a
/// participant accepts.
pub const MAX_BATCH_LIMIT: usize = 500;

const SECOND_MS: u64 = 1_000;
/// What an explicit `precommit_wait_ms` must leave for the forced pre-commit write at least.
const PRECOMMIT_WRITE_MS: u64 = SECOND_MS;
const HOUR_MS: u64 = 3_600 * SECOND_MS;
const DAY_MS: u64 = 24 * HOUR_MS;
const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

/// One setting: its key (as in the config file), its value and the range it must lie in.
pub struct Limit {
    pub key: &'static str,
    pub value: u64,
    pub min: u64,
    pub max: u64,
    /// Why the range is what it is, said when a value is refused.
    pub why: &'static str,
}

/// Every numeric setting of `config` with its range.
pub fn of(c: &Config) -> Vec<Limit> {
    let limit = |key, value: u64, min, max, why| Limit { key, value, min, max, why };
    vec![
        limit("default_txn_timeout_ms", c.default_txn_timeout_ms, 1, 7 * DAY_MS, "at most max_txn_timeout_ms"),
        limit("max_txn_timeout_ms", c.max_txn_timeout_ms, 1, 7 * DAY_MS, "a transaction holds locks at its resources"),
        limit("prepare_timeout_ms", c.prepare_timeout_ms, 1, HOUR_MS, "prepared branches hold locks"),
        limit(
            "precommit_wait_ms",
            c.precommit_wait_ms(),
            1,
            HOUR_MS,
            "a prepared branch holds locks; participants take at most 1 h",
        ),
        limit(
            "docommit_wait_ms",
            c.docommit_wait_ms,
            1,
            HOUR_MS,
            "a pre-committed branch holds locks; participants take at most 1 h",
        ),
        limit("participant_rpc_timeout_ms", c.participant_rpc_timeout_ms, 1, HOUR_MS, "one call to a participant"),
        limit("retry_initial_backoff_ms", c.retry_initial_backoff_ms, 1, HOUR_MS, "at most retry_max_backoff_ms"),
        limit("retry_max_backoff_ms", c.retry_max_backoff_ms, 1, HOUR_MS, "phase 2 is retried until acknowledged"),
        limit("recovery_interval_ms", c.recovery_interval_ms, 100, DAY_MS, "each scan asks every participant"),
        limit("max_live_transactions", c.max_live_transactions as u64, 1, 10_000_000, "memory"),
        limit(
            "max_branches_per_transaction",
            c.max_branches_per_transaction as u64,
            1,
            MAX_BRANCHES_LIMIT as u64,
            "a commit record carries every branch",
        ),
        limit(
            "completed_retention_ms",
            c.completed_retention_ms,
            SECOND_MS,
            7 * DAY_MS,
            "the window in which a retried call still gets its answer",
        ),
        limit("max_retained_transactions", c.max_retained_transactions as u64, 1_000, 100_000_000, "memory"),
        limit(
            "participant_max_batch_branches",
            c.participant_max_batch_branches as u64,
            1,
            MAX_BATCH_LIMIT as u64,
            "a batched call must fit in what a participant accepts",
        ),
        limit(
            "participant_max_inflight_calls",
            c.participant_max_inflight_calls as u64,
            1,
            1_024,
            "calls per participant",
        ),
        limit("max_request_wait_ms", c.max_request_wait_ms, 1, HOUR_MS, "a client call's wait"),
        limit("max_request_bytes", c.max_request_bytes as u64, 64 * KIB, 64 * MIB, "one gRPC request"),
        limit("log_segment_size_bytes", c.log_segment_size_bytes, 4 * KIB, 4 * 1024 * MIB, "one segment file"),
        limit(
            "log_max_batch_bytes",
            c.log_max_batch_bytes as u64,
            64 * KIB,
            64 * MIB,
            "one group commit; also how much of the log's tail a crash may tear",
        ),
        limit("log_queue_capacity", c.log_queue_capacity as u64, 1, 1_000_000, "records waiting for the log writer"),
        limit("checkpoint_every_records", c.checkpoint_every_records, 1, 100_000_000, "replay length after a crash"),
        limit("cluster_shards", c.cluster_shards, 1, 4_096, "each shard is a lease renewed every interval"),
        limit("lease_ms", c.lease_ms, 500, 10 * 60 * SECOND_MS, "how long a dead instance's shards wait"),
        limit("lease_renew_interval_ms", c.lease_renew_interval_ms, 100, 60 * SECOND_MS, "at most lease_ms / 2"),
        limit("handover_drain_ms", c.handover_drain_ms, 1, 10 * 60 * SECOND_MS, "a shutdown waits this long"),
        limit("store_max_batch_records", c.store_max_batch_records, 1, 100_000, "one store transaction"),
        limit("store_writer_lanes", c.store_writer_lanes, 1, 64, "a store connection each"),
        limit("store_timeout_ms", c.store_timeout_ms, 100, 10 * 60 * SECOND_MS, "one store round trip"),
    ]
}

/// The first limit out of its range, or relation broken, as a message naming the key.
pub fn check(c: &Config) -> Result<(), String> {
    for l in of(c) {
        if l.value < l.min || l.value > l.max {
            return Err(format!(
                "{} = {} is out of range: it must be between {} and {} ({})",
                l.key, l.value, l.min, l.max, l.why
            ));
        }
    }
    let relations = [
        ("default_txn_timeout_ms", c.default_txn_timeout_ms, "max_txn_timeout_ms", c.max_txn_timeout_ms),
        ("retry_initial_backoff_ms", c.retry_initial_backoff_ms, "retry_max_backoff_ms", c.retry_max_backoff_ms),
        ("lease_renew_interval_ms", c.lease_renew_interval_ms * 2, "lease_ms", c.lease_ms),
        // A yes vote must outlive the rest of the prepare round and the PreCommit call, or
        // branches abort themselves under a coordinator that is merely slow.
        (
            "prepare_timeout_ms + participant_rpc_timeout_ms + 1000 (the forced pre-commit write)",
            c.prepare_timeout_ms + c.participant_rpc_timeout_ms + PRECOMMIT_WRITE_MS,
            "precommit_wait_ms",
            c.precommit_wait_ms(),
        ),
    ];
    for (key, value, bound_key, bound) in relations {
        if value > bound {
            return Err(format!("{key} = {value} exceeds {bound_key} = {bound}"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_in_range_and_each_key_is_checked() {
        check(&Config::default()).unwrap();
        // Zero is refused for every setting, naming the key (the retention of 0 hung one-phase
        // commits before it was refused).
        for l in of(&Config::default()) {
            let mut c = Config::default();
            set(&mut c, l.key, 0);
            let e = check(&c).expect_err(l.key);
            assert!(e.starts_with(&format!("{} = 0 is out of range", l.key)), "{e}");
        }
        let c = Config { completed_retention_ms: 8 * DAY_MS, ..Config::default() };
        assert!(check(&c).unwrap_err().starts_with("completed_retention_ms = 691200000 is out of range"));
        let c = Config { default_txn_timeout_ms: 10, max_txn_timeout_ms: 5, ..Config::default() };
        assert_eq!(check(&c).unwrap_err(), "default_txn_timeout_ms = 10 exceeds max_txn_timeout_ms = 5");
    }

    /// Three-phase commit's wait for PreCommit must outlast the prepare round and the PreCommit
    /// call. Unset, it follows them, so raising the prepare timeout never invalidates a
    /// configuration that does not use three-phase settings; set, it is checked.
    #[test]
    fn the_precommit_wait_follows_the_prepare_round_unless_set() {
        let c = Config { prepare_timeout_ms: 60_000, ..Config::default() };
        check(&c).unwrap();
        assert_eq!(c.precommit_wait_ms(), 60_000 + 5_000 + crate::config::PRECOMMIT_WAIT_MARGIN_MS);
        let c = Config { prepare_timeout_ms: 60_000, precommit_wait_ms: Some(20_000), ..Config::default() };
        assert_eq!(
            check(&c).unwrap_err(),
            "prepare_timeout_ms + participant_rpc_timeout_ms + 1000 (the forced pre-commit write) = 66000 exceeds \
             precommit_wait_ms = 20000"
        );
    }

    fn set(c: &mut Config, key: &str, v: u64) {
        match key {
            "default_txn_timeout_ms" => c.default_txn_timeout_ms = v,
            "max_txn_timeout_ms" => c.max_txn_timeout_ms = v,
            "prepare_timeout_ms" => c.prepare_timeout_ms = v,
            "precommit_wait_ms" => c.precommit_wait_ms = Some(v),
            "docommit_wait_ms" => c.docommit_wait_ms = v,
            "participant_rpc_timeout_ms" => c.participant_rpc_timeout_ms = v,
            "retry_initial_backoff_ms" => c.retry_initial_backoff_ms = v,
            "retry_max_backoff_ms" => c.retry_max_backoff_ms = v,
            "recovery_interval_ms" => c.recovery_interval_ms = v,
            "max_live_transactions" => c.max_live_transactions = v as usize,
            "max_branches_per_transaction" => c.max_branches_per_transaction = v as usize,
            "completed_retention_ms" => c.completed_retention_ms = v,
            "max_retained_transactions" => c.max_retained_transactions = v as usize,
            "participant_max_batch_branches" => c.participant_max_batch_branches = v as usize,
            "participant_max_inflight_calls" => c.participant_max_inflight_calls = v as usize,
            "max_request_wait_ms" => c.max_request_wait_ms = v,
            "max_request_bytes" => c.max_request_bytes = v as usize,
            "log_segment_size_bytes" => c.log_segment_size_bytes = v,
            "log_max_batch_bytes" => c.log_max_batch_bytes = v as usize,
            "log_queue_capacity" => c.log_queue_capacity = v as usize,
            "checkpoint_every_records" => c.checkpoint_every_records = v,
            "cluster_shards" => c.cluster_shards = v,
            "lease_ms" => c.lease_ms = v,
            "lease_renew_interval_ms" => c.lease_renew_interval_ms = v,
            "handover_drain_ms" => c.handover_drain_ms = v,
            "store_max_batch_records" => c.store_max_batch_records = v,
            "store_writer_lanes" => c.store_writer_lanes = v,
            "store_timeout_ms" => c.store_timeout_ms = v,
            other => panic!("no setter for {other}"),
        }
    }
}
