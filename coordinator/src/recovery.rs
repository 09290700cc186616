//! Recovery after a restart, the I/O side (the decisions are the engine's, in
//! `engine/recovery.rs`), in three steps:
//!
//! 1. [`open_log`] replays the decision log (its newest checkpoint, then what followed) into
//!    records; [`Engine::restore`](crate::engine::Engine::restore) rebuilds every committed
//!    transaction that had not finished, every one-phase commit whose answer was not recorded,
//!    and the finished ones still within their retention (heuristic ones until an operator
//!    acts).
//! 2. [`Engine::start`](crate::engine::Engine::start) resumes them: committed branches that
//!    have not acknowledged are told to commit again, and one-phase commits are resent (both
//!    idempotent: a participant answers from its own record).
//! 3. [`scan_in_doubt`] asks every known participant for its in-doubt (prepared) branches, at
//!    start and then every `recovery_interval_ms` (participants unreachable now are asked
//!    again later), page by page; the engine resolves each against the log: commit if there
//!    is a commit record, abort if there is none (presumed abort), leave it alone if its
//!    transaction is still being decided, and wait for a newer list if the transaction was
//!    forgotten after this list was made.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context;
use pledge_log::{Log, LogConfig, OpenError};
use pledge_proto::v1;
use tokio::sync::mpsc;

use crate::driver::participant::{ParticipantHandle, parse_xid, status_text};
use crate::engine::{Event, InDoubtBranch, LogRecord, Millis};
use crate::records::{self, DecodeError};

/// Most pages of one recovery scan (500 branches a page, see the SDK's `MAX_RECOVER_PAGE`).
const MAX_RECOVER_PAGES: usize = 1_000;

/// Opens the decision log and decodes every record to replay. Refuses to start on corruption
/// (naming the file and offset) and on a record this version cannot read (naming its LSN).
pub fn open_log(config: LogConfig) -> anyhow::Result<(Log, Vec<LogRecord>)> {
    let dir = config.dir.clone();
    let mut replayed = Vec::new();
    let log = pledge_log::open(config, |record| {
        replayed.push(records::decode(record.rtype, &record.payload)?);
        Ok::<(), DecodeError>(())
    })
    .map_err(|e| match e {
        OpenError::Replay { lsn, source } => {
            anyhow::anyhow!("decision log {}: record at LSN {lsn} cannot be read: {source}", dir.display())
        }
        other => anyhow::Error::from(other),
    })
    .context("refusing to start: the decision log cannot be opened")?;
    Ok((log, replayed))
}

/// Asks every participant for its in-doubt branches (skipping one whose previous scan is
/// still under way); each page of answers comes back to the engine as an [`Event::InDoubt`]
/// stamped with `listed_ms`, the time the scan started.
pub fn scan_in_doubt<'a>(
    participants: impl Iterator<Item = &'a ParticipantHandle>,
    events: &mpsc::UnboundedSender<Event>,
    listed_ms: Millis,
    interval: Duration,
) {
    for handle in participants {
        let resource = handle.resource.clone();
        let events = events.clone();
        let page = {
            let resource = resource.clone();
            move |branches: Vec<InDoubtBranch>| {
                if !branches.is_empty() {
                    tracing::info!(resource = %resource, count = branches.len(), "resolving in-doubt branches");
                    let _ = events.send(Event::InDoubt {
                        resource: resource.clone(),
                        branches,
                        listed_ms,
                        confirmed: None,
                    });
                }
            }
        };
        let Some(scan) = scan(handle, page) else { continue };
        let interval_ms = interval.as_millis() as u64;
        tokio::spawn(async move {
            if let Err(error) = scan.await {
                tracing::warn!(resource = %resource, error, retry_in_ms = interval_ms, "recovery scan failed");
            }
        });
    }
}

/// Asks one participant, page by page, for the branches it holds prepared for this
/// coordinator; each page is handed to `page` as it arrives. `None` if a scan of this
/// participant is already under way (scans never overlap).
fn scan<F>(
    handle: &ParticipantHandle,
    mut page: F,
) -> Option<impl Future<Output = Result<usize, String>> + Send + 'static>
where
    F: FnMut(Vec<InDoubtBranch>) + Send + 'static,
{
    let backlog = handle.aborts_pending.load(Ordering::Acquire);
    if backlog > handle.config.max_batch_branches * handle.config.max_inflight_calls {
        tracing::info!(resource = %handle.resource, backlog, "aborts still queued; recovery scan skipped this time");
        return None;
    }
    if handle.scanning.swap(true, Ordering::AcqRel) {
        return None;
    }
    let scanning = handle.scanning.clone();
    let mut client = handle.client.clone();
    let config = handle.config.clone();
    let resource = handle.resource.clone();
    Some(async move {
        let scan = async {
            let (mut after, mut total) = (None, 0);
            for _ in 0..MAX_RECOVER_PAGES {
                let mut request = tonic::Request::new(v1::RecoverRequest {
                    coordinator_id: config.coordinator_id.clone(),
                    resource_ids: vec![resource.to_string()],
                    after: after.take(),
                    limit: 0,
                });
                request.set_timeout(config.rpc_timeout);
                let started = std::time::Instant::now();
                let response = client.recover(request).await;
                let (code, listed) = match &response {
                    Ok(r) => (tonic::Code::Ok, r.get_ref().branches.len()),
                    Err(status) => (status.code(), 0),
                };
                crate::metrics::participant_call(&resource, "Recover", listed, code, started.elapsed());
                let response = response.map_err(status_text)?.into_inner();
                let mut branches = Vec::with_capacity(response.branches.len());
                for b in response.branches {
                    let xid = b.xid.ok_or("in-doubt branch without xid")?;
                    let (gtid, branch) = parse_xid(&xid).map_err(|e| format!("in-doubt branch: {e}"))?;
                    if branch.resource != resource {
                        return Err(format!("listed a branch of resource {:?}", branch.resource.as_str()));
                    }
                    branches.push(InDoubtBranch { gtid, branch, metadata: b.metadata.into() });
                    after = Some(xid);
                }
                total += branches.len();
                page(branches);
                if !response.truncated || after.is_none() {
                    return Ok(total);
                }
            }
            Err(format!("more than {MAX_RECOVER_PAGES} pages of in-doubt branches; the rest waits for the next scan"))
        };
        let result = scan.await;
        scanning.store(false, Ordering::Release);
        result
    })
}
