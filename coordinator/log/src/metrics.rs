//! The log's metrics (see the crate docs).

use std::time::Duration;

use metrics::{Unit, counter, describe_counter, describe_histogram, histogram};

const RECORDS: &str = "pledge_log_records_total";
const SYNCS: &str = "pledge_log_syncs_total";
const BYTES_WRITTEN: &str = "pledge_log_bytes_written_total";
const CHECKPOINTS: &str = "pledge_log_checkpoints_total";
const SYNC_DURATION: &str = "pledge_log_sync_duration_seconds";
const CHECKPOINT_DURATION: &str = "pledge_log_checkpoint_duration_seconds";

/// Registers the help texts of the log's metrics with the installed recorder.
pub fn describe_metrics() {
    describe_counter!(RECORDS, "records written to the log (appends and checkpoint records)");
    describe_counter!(
        SYNCS,
        "fdatasync calls on log files (one per group-commit batch, plus rotations and checkpoints)"
    );
    describe_counter!(
        BYTES_WRITTEN,
        Unit::Bytes,
        "batch, frame and header bytes written to the log (preallocation excluded)"
    );
    describe_counter!(CHECKPOINTS, "checkpoints written (each lets older segments be deleted)");
    describe_histogram!(SYNC_DURATION, Unit::Seconds, "time to write and fdatasync one group-commit batch");
    describe_histogram!(
        CHECKPOINT_DURATION,
        Unit::Seconds,
        "time to write, sync and install one checkpoint (on its own thread, off the commit path)"
    );
}

/// Counts what one batch, checkpoint, rotation or segment trim wrote.
pub(crate) fn written(records: u64, syncs: u64, bytes: u64) {
    counter!(RECORDS).increment(records);
    counter!(SYNCS).increment(syncs);
    counter!(BYTES_WRITTEN).increment(bytes);
}

pub(crate) fn batch_synced(took: Duration) {
    histogram!(SYNC_DURATION).record(took);
}

pub(crate) fn checkpoint(took: Duration) {
    counter!(CHECKPOINTS).increment(1);
    histogram!(CHECKPOINT_DURATION).record(took);
}
