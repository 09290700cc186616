//! Where the runtime's work for a transaction shows in its trace (with trace export on; see
//! `pledge_proto::telemetry`).
//!
//! The engine knows transactions by GTID only, and free of I/O it has no business with spans;
//! the participant calls are made by batchers in other tasks, each call for whatever branches
//! were pending. So the runtime keeps, by GTID, the trace context of the API call that asked
//! for a transaction's outcome (Commit or Abort, carried over the API channel with the request)
//! and puts its own spans under it:
//!
//! ```text
//! Commit (the API call)
//! ├── decide               the prepare round: first Prepare sent → decision (`decision` field)
//! │   └── participant.prepare      one per batched call (its participant's spans under it)
//! ├── decision_log.sync    the decision record, appended → durable (`record` field)
//! └── participant.phase2   one per batched Commit/Abort call
//! ```
//!
//! A context, not the call's span, is kept: a span held here would stay open (and keep its
//! parents open) until the transaction ends, long after its call was answered. Entries go when
//! the transaction's end record is appended, and after [`MAX_TRACED_AGE`] whatever happens (a
//! shard handed over, a participant down for long); at most [`MAX_TRACED_TRANSACTIONS`] are
//! kept, and past that a transaction's calls are traced without the link to its commit. With
//! export off nothing is kept, and every method returns at its first test.

use std::collections::HashMap;
use std::time::Duration;

use pledge_proto::Gtid;
use pledge_proto::telemetry::{self, TraceContext};
use tokio::time::Instant;
use tracing::Span;

use super::ApiRequest;
use crate::engine::{LogRecord, Phase2Op};

/// Most transactions whose trace context is kept at once.
pub const MAX_TRACED_TRANSACTIONS: usize = 10_000;
/// Longest a transaction's trace context is kept.
pub const MAX_TRACED_AGE: Duration = Duration::from_secs(600);

struct Traced {
    /// The context of the API call that asked for the outcome.
    call: TraceContext,
    /// The prepare round's span, from the first Prepare to the decision.
    decide: Option<(Span, TraceContext)>,
    since: Instant,
}

#[derive(Default)]
pub(crate) struct Traces {
    txns: HashMap<Gtid, Traced>,
}

impl Traces {
    /// Keeps the trace context of a Commit or Abort call (the first one, if retried).
    pub(crate) fn requested(&mut self, request: &ApiRequest, trace: Option<TraceContext>) {
        let Some(call) = trace else { return };
        let gtid = match request {
            ApiRequest::Commit { gtid, .. } | ApiRequest::Abort { gtid } => *gtid,
            _ => return,
        };
        if self.txns.len() >= MAX_TRACED_TRANSACTIONS && !self.txns.contains_key(&gtid) {
            return;
        }
        self.txns.entry(gtid).or_insert_with(|| Traced { call, decide: None, since: Instant::now() });
    }

    /// The parent of the Prepare calls for `gtid`: its prepare round, begun by the first.
    pub(crate) fn prepare(&mut self, gtid: Gtid) -> Option<TraceContext> {
        let t = self.txns.get_mut(&gtid)?;
        let (_, cx) = t.decide.get_or_insert_with(|| {
            let span = tracing::debug_span!(parent: None, "decide", %gtid, decision = tracing::field::Empty);
            telemetry::adopt(&span, [&t.call]);
            let cx = telemetry::context_of(&span).unwrap_or_else(|| t.call.clone());
            (span, cx)
        });
        Some(cx.clone())
    }

    /// The span of appending `record` and (if `synced`) waiting for it to be durable, when the
    /// record is a decision or end of a traced transaction (`Span::none()` otherwise). A
    /// decision ends the prepare round; the end record ends the tracing of the transaction.
    pub(crate) fn append(&mut self, record: &LogRecord, synced: bool) -> Span {
        if self.txns.is_empty() {
            return Span::none();
        }
        let (gtid, kind) = match record {
            LogRecord::Commit(c) => (c.gtid, "commit"),
            LogRecord::PreCommit(c) => (c.gtid, "pre-commit"),
            LogRecord::OnePhase(o) => (o.gtid, "one-phase"),
            LogRecord::End(e) => (e.gtid, "end"),
            _ => return Span::none(),
        };
        let Some(t) = self.txns.get_mut(&gtid) else { return Span::none() };
        if kind != "end" {
            decided(t, kind);
        }
        let span = match synced {
            true => {
                let span = tracing::debug_span!(parent: None, "decision_log.sync", %gtid, record = kind);
                telemetry::adopt(&span, [&t.call]);
                span
            }
            false => Span::none(),
        };
        if kind == "end" {
            self.txns.remove(&gtid);
        }
        span
    }

    /// The parent of a phase-2 call for `gtid`: the API call (the decision is `op` by now).
    pub(crate) fn phase2(&mut self, gtid: Gtid, op: Phase2Op) -> Option<TraceContext> {
        let t = self.txns.get_mut(&gtid)?;
        decided(
            t,
            match op {
                Phase2Op::Commit => "commit",
                Phase2Op::Abort => "abort",
            },
        );
        Some(t.call.clone())
    }

    /// The parent of a three-phase state call (PreCommit, QueryState) for `gtid`.
    pub(crate) fn call(&self, gtid: Gtid) -> Option<TraceContext> {
        self.txns.get(&gtid).map(|t| t.call.clone())
    }

    /// Forgets transactions traced for longer than [`MAX_TRACED_AGE`].
    pub(crate) fn sweep(&mut self) {
        let now = Instant::now();
        self.txns.retain(|_, t| now.duration_since(t.since) < MAX_TRACED_AGE);
    }
}

/// Ends the prepare round (if one is open), naming the decision.
fn decided(t: &mut Traced, decision: &'static str) {
    if let Some((span, _)) = t.decide.take() {
        span.record("decision", decision);
    }
}
