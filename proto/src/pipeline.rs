//! Many calls multiplexed over one long-lived bidirectional gRPC stream (a "pipeline"): both
//! ends of `Coordinator.Pipeline` and `Participant.Pipeline`.
//!
//! # Why
//! A unary gRPC call opens an HTTP/2 stream: request headers, response headers and trailers
//! are encoded and parsed, tonic's layers run, and the server spawns a task, every time. Measured
//! on the 2-core benchmark machine with 64 callers (client and server in separate processes):
//! a unary echo call costs 74-88 µs of CPU in all, the same echo as one message each way on an
//! open stream 32-34 µs. A two-participant transaction makes at least six calls (Begin and
//! Commit from the client, Prepare and Commit to each participant), so this is most of its
//! cost.
//!
//! # Semantics
//! Each call on a pipeline carries a caller-chosen id and means exactly what the unary call of
//! the same name means; its reply carries the same id, in whatever order calls finish. A call
//! that fails as a whole gets a [`v1::CallError`], the status the unary call would have ended
//! with. A broken stream fails the calls in flight with UNAVAILABLE, exactly as a broken
//! connection fails unary calls in flight: their outcome is unknown, and the callers' retry
//! rules (idempotent calls) apply unchanged. A call that could not be sent at all is retried
//! on a new stream, since the server never saw it.
//!
//! # Bounds
//! The server takes at most `max_in_flight` calls of one stream at a time and stops reading
//! beyond that (HTTP/2 flow control then holds the client back); the client's queue of calls
//! not yet written holds [`CLIENT_QUEUE_CALLS`]; every client call has a deadline, which covers
//! opening the stream, queueing and the answer.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt;
use futures::stream::{FuturesUnordered, Stream, StreamExt};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::{Code, Status, Streaming};
use tracing::Instrument;

use crate::v1;

/// Calls a client queues for writing before callers wait for room.
pub const CLIENT_QUEUE_CALLS: usize = 1024;
/// After a server answered UNIMPLEMENTED to a pipeline, how long callers use unary calls
/// before asking again (the server may be upgraded meanwhile).
pub const UNSUPPORTED_RECHECK: Duration = Duration::from_secs(60);
/// Longest a server waits for its client to take a reply (HTTP/2 flow control holds it back
/// when the client stops reading) before it gives up on the stream.
pub const REPLY_SEND_TIMEOUT: Duration = Duration::from_secs(30);
/// Streams one call may be tried on: a call is sent again only when the server ended its
/// stream cleanly without having taken it (a server answers every call it takes before it
/// ends a stream), e.g. at a restart.
const MAX_ATTEMPTS: usize = 3;

/// A call envelope: the call (one of a service's calls) plus the id its reply will carry and
/// the caller's deadline.
pub trait CallEnvelope: Clone + Send + 'static {
    /// The calls the pipeline carries (the envelope's `oneof`).
    type Call: Send + 'static;
    fn new(call_id: u64, timeout_ms: u64, call: Self::Call) -> Self;
    fn call_id(&self) -> u64;
    fn set_call_id(&mut self, id: u64);
    /// How long the caller waits, ms (0: no deadline); the server stops the call then.
    fn timeout_ms(&self) -> u64;
    fn set_timeout_ms(&mut self, ms: u64);
    /// The call; `None` if the sender left it out.
    fn into_call(self) -> Option<Self::Call>;
    /// The caller's W3C trace context (see [`crate::telemetry`]), taken out of the envelope.
    fn take_trace_context(&mut self) -> HashMap<String, String>;
    fn set_trace_context(&mut self, trace_context: HashMap<String, String>);
    /// The gRPC method of the unary call `call` stands for (`/pledge.v1.Participant/Prepare`):
    /// its span is named after it.
    fn method(call: &Self::Call) -> &'static str;
}

/// A reply envelope: a call's id and its reply, or the status it failed with.
pub trait ReplyEnvelope: Send + 'static {
    /// The replies the pipeline carries (the envelope's `oneof`, its error arm included).
    type Reply: Send + 'static;
    fn new(call_id: u64, result: Result<Self::Reply, Status>) -> Self;
    fn call_id(&self) -> u64;
    /// The reply, or the status the call failed with.
    fn into_result(self) -> Result<Self::Reply, Status>;
}

macro_rules! envelopes {
    ($call:ty, $call_kind:ident, $reply:ty, $reply_kind:ty, $error:path, $service:literal, [$($method:ident),*]) => {
        impl CallEnvelope for $call {
            type Call = $call_kind::Call;
            fn new(call_id: u64, timeout_ms: u64, call: Self::Call) -> Self {
                Self { call_id, timeout_ms, call: Some(call), trace_context: HashMap::new() }
            }
            fn call_id(&self) -> u64 {
                self.call_id
            }
            fn set_call_id(&mut self, id: u64) {
                self.call_id = id;
            }
            fn timeout_ms(&self) -> u64 {
                self.timeout_ms
            }
            fn set_timeout_ms(&mut self, ms: u64) {
                self.timeout_ms = ms;
            }
            fn into_call(self) -> Option<Self::Call> {
                self.call
            }
            fn take_trace_context(&mut self) -> HashMap<String, String> {
                std::mem::take(&mut self.trace_context)
            }
            fn set_trace_context(&mut self, trace_context: HashMap<String, String>) {
                self.trace_context = trace_context;
            }
            fn method(call: &Self::Call) -> &'static str {
                match call {
                    $($call_kind::Call::$method(_) => concat!("/", $service, "/", stringify!($method)),)*
                }
            }
        }

        impl ReplyEnvelope for $reply {
            type Reply = $reply_kind;
            fn new(call_id: u64, result: Result<Self::Reply, Status>) -> Self {
                let reply = result.unwrap_or_else(|status| $error(error_to_wire(&status)));
                Self { call_id, reply: Some(reply) }
            }
            fn call_id(&self) -> u64 {
                self.call_id
            }
            fn into_result(self) -> Result<Self::Reply, Status> {
                match self.reply {
                    Some($error(e)) => Err(error_from_wire(e)),
                    Some(reply) => Ok(reply),
                    None => Err(Status::internal("a pipeline reply without content")),
                }
            }
        }
    };
}

use v1::{coordinator_call, participant_call};

envelopes!(
    v1::ParticipantCall,
    participant_call,
    v1::ParticipantReply,
    v1::participant_reply::Reply,
    v1::participant_reply::Reply::Error,
    "pledge.v1.Participant",
    [Prepare, Commit, Abort, PreCommit, QueryState]
);
envelopes!(
    v1::CoordinatorCall,
    coordinator_call,
    v1::CoordinatorReply,
    v1::coordinator_reply::Reply,
    v1::coordinator_reply::Reply::Error,
    "pledge.v1.Coordinator",
    [Begin, Enlist, Commit, Abort]
);

/// A failed call's status, as a pipeline reply carries it.
pub fn error_to_wire(status: &Status) -> v1::CallError {
    v1::CallError { code: status.code() as i32, message: status.message().to_string() }
}

/// ... and back.
pub fn error_from_wire(e: v1::CallError) -> Status {
    Status::new(Code::from_i32(e.code), e.message)
}

/// The stream of replies a server hands back to tonic.
pub type ReplyStream<R> = Pin<Box<dyn Stream<Item = Result<R, Status>> + Send>>;

/// Serves one pipeline: reads calls from `calls`, runs `handle` on each (at most
/// `max_in_flight` at a time, concurrently, in one task) and streams the replies back as they
/// finish, each in its envelope (a failed call's status as its error arm; an envelope without
/// a call is answered INVALID_ARGUMENT). A call whose deadline (`timeout_ms`) passes is stopped and answered
/// DEADLINE_EXCEEDED, as tonic stops a unary call, so calls whose callers gave up cannot hold
/// the stream's places; a call that panics is answered INTERNAL.
///
/// Every call taken is answered before the stream ends, so a caller whose call is still
/// unanswered when the stream ends cleanly knows it never ran. The stream ends once the client
/// has ended its side, or when `closing` is cancelled (the server is shutting down: a
/// long-lived stream must not hold up a graceful shutdown), or with the error status of a call
/// that cannot be decoded (too large, malformed) after the calls taken before it are answered.
pub fn serve<C, R, F, Fut>(
    mut calls: Streaming<C>,
    closing: CancellationToken,
    max_in_flight: usize,
    mut handle: F,
) -> ReplyStream<R>
where
    C: CallEnvelope,
    R: ReplyEnvelope,
    F: FnMut(C::Call) -> Fut + Send + 'static,
    Fut: Future<Output = Result<R::Reply, Status>> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(max_in_flight.max(1));
    tokio::spawn(async move {
        let mut running = FuturesUnordered::new();
        let mut reading = true;
        let mut broken = None;
        while reading || !running.is_empty() {
            tokio::select! {
                biased;
                Some(reply) = running.next(), if !running.is_empty() => {
                    match tokio::time::timeout(REPLY_SEND_TIMEOUT, tx.send(Ok(reply))).await {
                        Ok(Ok(())) => {}
                        Ok(Err(_)) => return, // the client is gone
                        Err(_) => {
                            tracing::warn!("pipeline client took no reply for {REPLY_SEND_TIMEOUT:?}; ending its stream");
                            return;
                        }
                    }
                }
                _ = closing.cancelled(), if reading => reading = false,
                next = calls.message(), if reading && running.len() < max_in_flight => match next {
                    Ok(Some(mut call)) => {
                        let (id, timeout_ms) = (call.call_id(), call.timeout_ms());
                        let trace_context = call.take_trace_context();
                        // With trace export on, each call runs in its own span, a child of its
                        // caller's (the stream's span is no transaction's).
                        let call = call.into_call().map(|call| {
                            let span = crate::telemetry::pipeline_call_span(C::method(&call), &trace_context);
                            let running = handle(call).instrument(span.clone().unwrap_or_else(tracing::Span::none));
                            (std::panic::AssertUnwindSafe(running).catch_unwind(), span)
                        });
                        running.push(async move {
                            let Some((call, span)) = call else {
                                return R::new(id, Err(Status::invalid_argument("call: is required")));
                            };
                            let finished = match timeout_ms {
                                0 => Ok(call.await),
                                ms => tokio::time::timeout(Duration::from_millis(ms), call).await,
                            };
                            let result = match finished {
                                Ok(Ok(result)) => result,
                                Ok(Err(_)) => Err(Status::internal("the call failed unexpectedly (panic)")),
                                Err(_) => Err(Status::deadline_exceeded(format!("deadline of {timeout_ms} ms passed"))),
                            };
                            if let Some(span) = span {
                                crate::telemetry::record_call_result(&span, &result);
                            }
                            R::new(id, result)
                        });
                    }
                    Ok(None) => reading = false,
                    Err(status) => {
                        // A call that cannot be decoded, or the client's side broke: read no
                        // more, answer what was taken, then end with the error.
                        tracing::debug!(%status, "pipeline stream unreadable");
                        reading = false;
                        broken = Some(status);
                    }
                },
            }
        }
        if let Some(status) = broken {
            let _ = tokio::time::timeout(REPLY_SEND_TIMEOUT, tx.send(Err(status))).await;
        }
    }
    .in_current_span());
    Box::pin(ReceiverStream::new(rx))
}

/// Why a call got no reply on its stream.
enum Failure {
    /// The server ended the stream cleanly without taking the call: it never ran.
    NotTaken,
    Status(Status),
}

type Waiter<R> = oneshot::Sender<Result<R, Failure>>;

/// What the stream's reader and its callers share.
struct Shared<R> {
    /// The calls waiting for replies; `None` once the stream is closed.
    pending: Mutex<Option<HashMap<u64, Waiter<R>>>>,
    /// New calls may go on this stream (false once it is known to be ending).
    accepting: AtomicBool,
}

impl<R> Shared<R> {
    /// Ends the stream for its callers: each call still waiting gets `failure()`.
    fn close(&self, failure: impl Fn() -> Failure) {
        self.accepting.store(false, Ordering::Release);
        let pending = self.pending.lock().unwrap().take();
        for (_, waiter) in pending.into_iter().flatten() {
            let _ = waiter.send(Err(failure()));
        }
    }
}

/// One stream.
struct Conn<C, R> {
    tx: mpsc::Sender<C>,
    shared: Arc<Shared<R>>,
}

/// Removes a call's entry if its caller stops waiting (deadline, cancellation).
struct Unregister<'a, R> {
    shared: &'a Shared<R>,
    id: u64,
}

impl<R> Drop for Unregister<'_, R> {
    fn drop(&mut self) {
        if let Some(pending) = self.shared.pending.lock().unwrap().as_mut() {
            pending.remove(&self.id);
        }
    }
}

type Opener<C, R> =
    Box<dyn Fn(ReceiverStream<C>) -> Pin<Box<dyn Future<Output = Result<Streaming<R>, Status>> + Send>> + Send + Sync>;

/// Set when the server answered UNIMPLEMENTED: until then, calls fail at once with it.
type Unsupported = Arc<Mutex<Option<Instant>>>;

struct Inner<C, R> {
    open: Opener<C, R>,
    current: Mutex<Option<Arc<Conn<C, R>>>>,
    unsupported_until: Unsupported,
    next_id: AtomicU64,
}

/// The client end of a pipeline: cheap to clone, shared by every caller. Opens its stream on
/// first use and again after the stream ended.
pub struct Pipeline<C, R> {
    inner: Arc<Inner<C, R>>,
}

impl<C, R> Clone for Pipeline<C, R> {
    fn clone(&self) -> Self {
        Pipeline { inner: self.inner.clone() }
    }
}

impl<C: CallEnvelope, R: ReplyEnvelope> Pipeline<C, R> {
    /// `open` starts the stream (e.g. `client.pipeline(calls)`) and answers its replies.
    pub fn new<F, Fut>(open: F) -> Self
    where
        F: Fn(ReceiverStream<C>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<tonic::Response<Streaming<R>>, Status>> + Send + 'static,
    {
        let open: Opener<C, R> = Box::new(move |calls| {
            let response = open(calls);
            Box::pin(async move { response.await.map(tonic::Response::into_inner) })
        });
        Pipeline {
            inner: Arc::new(Inner {
                open,
                current: Mutex::new(None),
                unsupported_until: Arc::default(),
                next_id: AtomicU64::new(1),
            }),
        }
    }

    /// Whether the server answered UNIMPLEMENTED to the pipeline lately (within
    /// [`UNSUPPORTED_RECHECK`]): calls then fail with UNIMPLEMENTED without being sent, and
    /// the caller should make unary calls.
    pub fn unsupported(&self) -> bool {
        self.inner.unsupported_until.lock().unwrap().is_some_and(|until| Instant::now() < until)
    }

    /// Sends `call` and waits for its reply, at most `timeout` in all (the server is told the
    /// deadline and stops the call then).
    pub async fn call(&self, call: C::Call, timeout: Duration) -> Result<R::Reply, Status> {
        let mut call = C::new(0, 0, call);
        // The caller's span, so the server's span for this call joins its trace.
        call.set_trace_context(crate::telemetry::current_trace_context());
        let deadline = Instant::now() + timeout;
        let attempts = async {
            for _ in 0..MAX_ATTEMPTS {
                let conn = self.conn()?;
                let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
                let (tx, rx) = oneshot::channel();
                match conn.shared.pending.lock().unwrap().as_mut() {
                    Some(pending) => pending.insert(id, tx),
                    None => continue, // closed since we got it
                };
                let _unregister = Unregister { shared: &conn.shared, id };
                let mut sent = call.clone();
                sent.set_call_id(id);
                let left = deadline.saturating_duration_since(Instant::now());
                sent.set_timeout_ms((left.as_millis() as u64).max(1));
                if conn.tx.send(sent).await.is_err() {
                    // The stream's sending side is gone, so it is ending: the call was not
                    // sent. Its reader fails or releases the calls already on it.
                    conn.shared.accepting.store(false, Ordering::Release);
                    continue;
                }
                match rx.await {
                    Ok(Ok(reply)) => return reply.into_result(),
                    Ok(Err(Failure::Status(status))) => return Err(status),
                    Ok(Err(Failure::NotTaken)) => continue,
                    Err(_) => return Err(Status::unavailable("pipeline stream closed")),
                }
            }
            Err(Status::unavailable(format!("pipeline streams ended {MAX_ATTEMPTS} times before taking the call")))
        };
        match tokio::time::timeout_at(deadline, attempts).await {
            Ok(result) => result,
            Err(_) => Err(Status::deadline_exceeded(format!("no reply within {} ms", timeout.as_millis()))),
        }
    }

    /// The stream calls go on now, starting one if there is none. Calls queue on a new stream
    /// at once, without waiting for the server's response headers: some servers send those
    /// only with their first reply.
    fn conn(&self) -> Result<Arc<Conn<C, R>>, Status> {
        let mut current = self.inner.current.lock().unwrap();
        if let Some(conn) = current.as_ref().filter(|c| c.shared.accepting.load(Ordering::Acquire)) {
            return Ok(conn.clone());
        }
        if self.unsupported() {
            return Err(Status::unimplemented("the server offers no pipeline"));
        }
        let (tx, rx) = mpsc::channel(CLIENT_QUEUE_CALLS);
        let shared = Arc::new(Shared { pending: Mutex::new(Some(HashMap::new())), accepting: AtomicBool::new(true) });
        let opened = (self.inner.open)(ReceiverStream::new(rx));
        // In no span: the stream outlives the call that opened it, and would hold that call's
        // span open (unexported) for as long as it lasts. Its calls carry their own spans.
        let run = run_stream(opened, shared.clone(), self.inner.unsupported_until.clone());
        tokio::spawn(run.instrument(tracing::Span::none()));
        let conn = Arc::new(Conn { tx, shared });
        *current = Some(conn.clone());
        Ok(conn)
    }
}

/// Waits for the stream to open, then hands each reply to its caller until the stream ends,
/// and then settles whatever is left. Holds no sender of the call queue, so dropping every
/// [`Pipeline`] ends the stream.
async fn run_stream<R: ReplyEnvelope>(
    opened: impl Future<Output = Result<Streaming<R>, Status>>,
    shared: Arc<Shared<R>>,
    unsupported: Unsupported,
) {
    let mut replies = match opened.await {
        Ok(replies) => replies,
        Err(status) => {
            tracing::debug!(%status, "pipeline stream refused");
            if status.code() == Code::Unimplemented {
                *unsupported.lock().unwrap() = Some(Instant::now() + UNSUPPORTED_RECHECK);
            }
            return shared.close(|| Failure::Status(status.clone()));
        }
    };
    let end = loop {
        match replies.message().await {
            Ok(Some(reply)) => {
                let waiter = shared.pending.lock().unwrap().as_mut().and_then(|p| p.remove(&reply.call_id()));
                // No waiter: the caller gave up (deadline) before the reply came.
                if let Some(waiter) = waiter {
                    let _ = waiter.send(Ok(reply));
                }
            }
            Ok(None) => break None,
            Err(status) => break Some(status),
        }
    };
    tracing::debug!(?end, "pipeline stream ended");
    match end {
        // A clean end comes after every call the server took was answered.
        None => shared.close(|| Failure::NotTaken),
        Some(status) if status.code() == Code::Unimplemented => {
            *unsupported.lock().unwrap() = Some(Instant::now() + UNSUPPORTED_RECHECK);
            shared.close(|| Failure::Status(status.clone()))
        }
        Some(status) => shared.close(|| {
            Failure::Status(Status::unavailable(format!(
                "pipeline stream broke ({:?}: {}); the call's outcome is unknown",
                status.code(),
                status.message()
            )))
        }),
    }
}

/// The Participant service's pipeline, for the coordinator (and tests): Prepare, Commit, Abort,
/// PreCommit and QueryState as on the unary client.
#[derive(Clone)]
pub struct ParticipantPipeline {
    pipeline: Pipeline<v1::ParticipantCall, v1::ParticipantReply>,
}

impl ParticipantPipeline {
    /// See [`Pipeline::unsupported`].
    pub fn unsupported(&self) -> bool {
        self.pipeline.unsupported()
    }

    /// Over `channel`; replies larger than `max_reply_bytes` fail their stream.
    pub fn new(channel: Channel, max_reply_bytes: usize) -> Self {
        let client = v1::participant_client::ParticipantClient::new(channel).max_decoding_message_size(max_reply_bytes);
        ParticipantPipeline {
            pipeline: Pipeline::new(move |calls| {
                let mut client = client.clone();
                async move { client.pipeline(calls).await }
            }),
        }
    }

    pub async fn prepare(&self, r: v1::PrepareRequest, timeout: Duration) -> Result<v1::PrepareResponse, Status> {
        match self.pipeline.call(v1::participant_call::Call::Prepare(r), timeout).await? {
            v1::participant_reply::Reply::Prepare(r) => Ok(r),
            _ => Err(mismatched("Prepare")),
        }
    }

    pub async fn commit(
        &self,
        r: v1::CommitBranchesRequest,
        timeout: Duration,
    ) -> Result<v1::CommitBranchesResponse, Status> {
        match self.pipeline.call(v1::participant_call::Call::Commit(r), timeout).await? {
            v1::participant_reply::Reply::Commit(r) => Ok(r),
            _ => Err(mismatched("Commit")),
        }
    }

    pub async fn abort(
        &self,
        r: v1::AbortBranchesRequest,
        timeout: Duration,
    ) -> Result<v1::AbortBranchesResponse, Status> {
        match self.pipeline.call(v1::participant_call::Call::Abort(r), timeout).await? {
            v1::participant_reply::Reply::Abort(r) => Ok(r),
            _ => Err(mismatched("Abort")),
        }
    }

    pub async fn pre_commit(
        &self,
        r: v1::PreCommitRequest,
        timeout: Duration,
    ) -> Result<v1::PreCommitResponse, Status> {
        match self.pipeline.call(v1::participant_call::Call::PreCommit(r), timeout).await? {
            v1::participant_reply::Reply::PreCommit(r) => Ok(r),
            _ => Err(mismatched("PreCommit")),
        }
    }

    pub async fn query_state(
        &self,
        r: v1::QueryStateRequest,
        timeout: Duration,
    ) -> Result<v1::QueryStateResponse, Status> {
        match self.pipeline.call(v1::participant_call::Call::QueryState(r), timeout).await? {
            v1::participant_reply::Reply::QueryState(r) => Ok(r),
            _ => Err(mismatched("QueryState")),
        }
    }
}

/// The Coordinator service's pipeline, for applications that run many transactions: Begin,
/// Enlist, Commit and Abort as on the unary client, at a fraction of the CPU per call. One
/// `CoordinatorPipeline` (cloned) serves every task of a process.
#[derive(Clone)]
pub struct CoordinatorPipeline {
    pipeline: Pipeline<v1::CoordinatorCall, v1::CoordinatorReply>,
    timeout: Duration,
}

impl CoordinatorPipeline {
    /// Over `channel`; each call waits at most `timeout` for its answer (a Commit's outcome is
    /// then unknown to the caller, and a retried Commit tells it).
    pub fn new(channel: Channel, timeout: Duration) -> Self {
        let client = v1::coordinator_client::CoordinatorClient::new(channel);
        CoordinatorPipeline {
            pipeline: Pipeline::new(move |calls| {
                let mut client = client.clone();
                async move { client.pipeline(calls).await }
            }),
            timeout,
        }
    }

    pub async fn begin(&self, r: v1::BeginRequest) -> Result<v1::BeginResponse, Status> {
        match self.pipeline.call(v1::coordinator_call::Call::Begin(r), self.timeout).await? {
            v1::coordinator_reply::Reply::Begin(r) => Ok(r),
            _ => Err(mismatched("Begin")),
        }
    }

    pub async fn enlist(&self, r: v1::EnlistRequest) -> Result<v1::EnlistResponse, Status> {
        match self.pipeline.call(v1::coordinator_call::Call::Enlist(r), self.timeout).await? {
            v1::coordinator_reply::Reply::Enlist(r) => Ok(r),
            _ => Err(mismatched("Enlist")),
        }
    }

    pub async fn commit(&self, r: v1::CommitRequest) -> Result<v1::CommitResponse, Status> {
        match self.pipeline.call(v1::coordinator_call::Call::Commit(r), self.timeout).await? {
            v1::coordinator_reply::Reply::Commit(r) => Ok(r),
            _ => Err(mismatched("Commit")),
        }
    }

    pub async fn abort(&self, r: v1::AbortRequest) -> Result<v1::AbortResponse, Status> {
        match self.pipeline.call(v1::coordinator_call::Call::Abort(r), self.timeout).await? {
            v1::coordinator_reply::Reply::Abort(r) => Ok(r),
            _ => Err(mismatched("Abort")),
        }
    }
}

fn mismatched(call: &str) -> Status {
    Status::internal(format!("the pipeline answered a {call} call with a reply of another kind"))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use tokio::net::TcpListener;
    use tonic::transport::server::TcpIncoming;
    use tonic::{Request, Response};

    use super::*;
    use crate::v1::participant_server::{Participant, ParticipantServer};

    /// A participant whose Prepare answers after `delay_ms` (the branch id, parsed) with the
    /// gtid as metadata; counts calls running at once and Prepares per gtid.
    #[derive(Clone)]
    struct Fake {
        /// false: the pipeline is unimplemented, as in a participant written without it.
        pipeline: bool,
        /// Send the response headers only with the first reply (as grpc-go and grpc-java do).
        lazy_headers: bool,
        /// Cancelled at shutdown: ends every stream.
        closing: CancellationToken,
        /// The streams' own tokens (children of `closing`), to end the open streams only.
        streams: Arc<Mutex<Vec<CancellationToken>>>,
        max_in_flight: usize,
        running: Arc<AtomicUsize>,
        most_running: Arc<AtomicUsize>,
        prepares: Arc<Mutex<HashMap<String, usize>>>,
    }

    impl Fake {
        fn new(pipeline: bool, max_in_flight: usize) -> Fake {
            Fake {
                pipeline,
                lazy_headers: false,
                closing: CancellationToken::new(),
                streams: Arc::default(),
                max_in_flight,
                running: Arc::default(),
                most_running: Arc::default(),
                prepares: Arc::default(),
            }
        }

        /// Ends the streams open now (answering the calls they took); later ones stay open.
        fn end_open_streams(&self) {
            for stream in self.streams.lock().unwrap().drain(..) {
                stream.cancel();
            }
        }

        fn prepares_of(&self, gtid: &str) -> usize {
            self.prepares.lock().unwrap().get(gtid).copied().unwrap_or(0)
        }

        async fn pipelined(self, call: v1::participant_call::Call) -> Result<v1::participant_reply::Reply, Status> {
            use v1::participant_call::Call;
            use v1::participant_reply::Reply;
            match call {
                Call::Prepare(r) => self.prepare(Request::new(r)).await.map(|r| Reply::Prepare(r.into_inner())),
                Call::Commit(r) => self.commit(Request::new(r)).await.map(|r| Reply::Commit(r.into_inner())),
                Call::Abort(r) => self.abort(Request::new(r)).await.map(|r| Reply::Abort(r.into_inner())),
                Call::PreCommit(_) | Call::QueryState(_) => Err(Status::unimplemented("two-phase only")),
            }
        }
    }

    #[tonic::async_trait]
    impl Participant for Fake {
        async fn prepare(&self, r: Request<v1::PrepareRequest>) -> Result<Response<v1::PrepareResponse>, Status> {
            let r = r.into_inner();
            let b =
                r.branches.first().and_then(|b| b.xid.as_ref()).ok_or_else(|| Status::invalid_argument("no branch"))?;
            let delay_ms: u64 = b.branch_id.parse().map_err(|_| Status::invalid_argument("branch_id: not a number"))?;
            *self.prepares.lock().unwrap().entry(b.gtid.clone()).or_default() += 1;
            let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
            self.most_running.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(delay_ms)).await;
            self.running.fetch_sub(1, Ordering::SeqCst);
            Ok(Response::new(v1::PrepareResponse {
                results: vec![v1::PrepareResult {
                    vote: v1::Vote::Prepared as i32,
                    metadata: b.gtid.clone().into_bytes(),
                    reason: String::new(),
                    xid: Some(b.clone()),
                }],
            }))
        }

        async fn commit(
            &self,
            _: Request<v1::CommitBranchesRequest>,
        ) -> Result<Response<v1::CommitBranchesResponse>, Status> {
            Err(Status::failed_precondition("commit refused by the fake"))
        }

        async fn abort(
            &self,
            _: Request<v1::AbortBranchesRequest>,
        ) -> Result<Response<v1::AbortBranchesResponse>, Status> {
            Ok(Response::new(v1::AbortBranchesResponse::default()))
        }

        async fn recover(&self, _: Request<v1::RecoverRequest>) -> Result<Response<v1::RecoverResponse>, Status> {
            Ok(Response::new(v1::RecoverResponse::default()))
        }

        async fn pre_commit(
            &self,
            _: Request<v1::PreCommitRequest>,
        ) -> Result<Response<v1::PreCommitResponse>, Status> {
            Err(Status::unimplemented("two-phase only"))
        }

        async fn query_state(
            &self,
            _: Request<v1::QueryStateRequest>,
        ) -> Result<Response<v1::QueryStateResponse>, Status> {
            Err(Status::unimplemented("two-phase only"))
        }

        type PipelineStream = ReplyStream<v1::ParticipantReply>;

        async fn pipeline(
            &self,
            r: Request<Streaming<v1::ParticipantCall>>,
        ) -> Result<Response<Self::PipelineStream>, Status> {
            if !self.pipeline {
                return Err(Status::unimplemented("no pipeline here"));
            }
            let closing = self.closing.child_token();
            self.streams.lock().unwrap().push(closing.clone());
            let mut calls = r.into_inner();
            let first = match self.lazy_headers {
                true => {
                    let first = calls.message().await?.expect("a first call");
                    let id = first.call_id;
                    let result = self.clone().pipelined(first.call.expect("a call")).await;
                    Some(v1::ParticipantReply::new(id, result))
                }
                false => None,
            };
            let fake = self.clone();
            let rest = serve(calls, closing, self.max_in_flight, move |call| fake.clone().pipelined(call));
            Ok(Response::new(Box::pin(futures::stream::iter(first.map(Ok)).chain(rest))))
        }
    }

    /// Serves `fake` on `port` (0: a free one) until `stop` is cancelled (which also ends its
    /// pipeline streams, as a real server's shutdown does); returns the port and the task.
    async fn start_on(port: u16, mut fake: Fake, stop: CancellationToken) -> (u16, tokio::task::JoinHandle<()>) {
        fake.closing = stop.clone();
        let listener = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(ParticipantServer::new(fake).max_decoding_message_size(16 << 10))
                .serve_with_incoming_shutdown(TcpIncoming::from(listener), stop.cancelled_owned())
                .await
                .unwrap();
        });
        (port, server)
    }

    async fn start(fake: Fake, stop: CancellationToken) -> (u16, tokio::task::JoinHandle<()>) {
        start_on(0, fake, stop).await
    }

    fn client(port: u16) -> ParticipantPipeline {
        let channel =
            tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}")).unwrap().connect_lazy();
        ParticipantPipeline::new(channel, 1 << 20)
    }

    fn prepare(gtid: &str, delay_ms: u64) -> v1::PrepareRequest {
        v1::PrepareRequest {
            coordinator_id: "c".into(),
            branches: vec![v1::PrepareBranch {
                xid: Some(v1::BranchXid {
                    resource_id: "r".into(),
                    gtid: gtid.into(),
                    branch_id: delay_ms.to_string(),
                }),
                may_be_empty: false,
                precommit_wait_ms: 0,
            }],
        }
    }

    /// Waits (bounded) until `running` calls are at the fake.
    async fn until_running(running: &AtomicUsize, n: usize) {
        tokio::time::timeout(Duration::from_secs(10), async {
            while running.load(Ordering::SeqCst) < n {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .await
        .expect("the calls reach the server");
    }

    const LONG: Duration = Duration::from_secs(10);

    /// Calls on one stream, answered out of order, each get their own reply; a failed call
    /// carries its status and leaves the stream usable.
    #[tokio::test]
    async fn concurrent_calls_get_their_own_replies() {
        let stop = CancellationToken::new();
        let (port, server) = start(Fake::new(true, 64), stop.clone()).await;
        let p = client(port);
        // The first call waits longest, so replies come back in the reverse order.
        let calls = (0..20u64).map(|i| {
            let p = p.clone();
            async move { (i, p.prepare(prepare(&format!("g{i}"), 100 - i * 5), LONG).await) }
        });
        for (i, reply) in futures::future::join_all(calls).await {
            let reply = reply.unwrap();
            assert_eq!(reply.results[0].metadata, format!("g{i}").into_bytes(), "call {i} got another call's reply");
        }
        let refused = p.commit(v1::CommitBranchesRequest::default(), LONG).await.unwrap_err();
        assert_eq!((refused.code(), refused.message()), (Code::FailedPrecondition, "commit refused by the fake"));
        let bad = p.prepare(prepare("g", 0), LONG).await.unwrap();
        assert_eq!(bad.results.len(), 1, "the stream still works after a failed call");
        stop.cancel();
        server.await.unwrap();
    }

    /// A server that sends its response headers only with its first reply still gets the
    /// calls: they are queued without waiting for the headers.
    #[tokio::test]
    async fn a_server_sending_headers_late_gets_the_calls() {
        let stop = CancellationToken::new();
        let mut fake = Fake::new(true, 64);
        fake.lazy_headers = true;
        let (port, server) = start(fake, stop.clone()).await;
        let p = client(port);
        let calls = (0..3).map(|i| p.prepare(prepare(&format!("g{i}"), 0), Duration::from_secs(5)));
        for (i, reply) in futures::future::join_all(calls).await.into_iter().enumerate() {
            assert_eq!(reply.unwrap().results[0].metadata, format!("g{i}").into_bytes());
        }
        stop.cancel();
        server.await.unwrap();
    }

    /// The server takes at most `max_in_flight` calls of a stream at a time; the rest wait in
    /// the stream and are answered later, not refused.
    #[tokio::test]
    async fn the_server_bounds_calls_in_flight() {
        let stop = CancellationToken::new();
        let fake = Fake::new(true, 3);
        let (most, running) = (fake.most_running.clone(), fake.running.clone());
        let (port, server) = start(fake, stop.clone()).await;
        let p = client(port);
        let calls = (0..12).map(|i| {
            let p = p.clone();
            async move { p.prepare(prepare(&format!("g{i}"), 30), LONG).await }
        });
        for reply in futures::future::join_all(calls).await {
            reply.unwrap();
        }
        assert_eq!(most.load(Ordering::SeqCst), 3, "never more than 3 calls at once, and 3 when 12 wait");
        assert_eq!(running.load(Ordering::SeqCst), 0);
        stop.cancel();
        server.await.unwrap();
    }

    /// The caller's deadline travels with the call: the server stops a call its caller gave up
    /// on, so such calls cannot hold the stream's places and stall the calls behind them.
    #[tokio::test]
    async fn calls_past_their_deadline_free_their_places() {
        let stop = CancellationToken::new();
        let (port, server) = start(Fake::new(true, 2), stop.clone()).await;
        let p = client(port);
        for i in 0..2 {
            let late = p.prepare(prepare(&format!("stuck{i}"), 60_000), Duration::from_millis(50)).await.unwrap_err();
            assert_eq!(late.code(), Code::DeadlineExceeded);
        }
        let reply = p.prepare(prepare("next", 0), Duration::from_secs(5)).await.expect("the places were freed");
        assert_eq!(reply.results[0].metadata, b"next");
        stop.cancel();
        server.await.unwrap();
    }

    /// A server without a pipeline answers UNIMPLEMENTED, and the client remembers it: later
    /// calls fail at once, without asking again, so the caller goes straight to unary calls.
    #[tokio::test]
    async fn a_server_without_a_pipeline_is_remembered() {
        let stop = CancellationToken::new();
        let (port, server) = start(Fake::new(false, 64), stop.clone()).await;
        let p = client(port);
        assert!(!p.unsupported());
        let first = p.prepare(prepare("g", 0), LONG).await.unwrap_err();
        assert_eq!(first.code(), Code::Unimplemented);
        assert_eq!(first.message(), "no pipeline here", "the server's own answer");
        assert!(p.unsupported());
        let again = p.prepare(prepare("g", 0), LONG).await.unwrap_err();
        assert_eq!(again.code(), Code::Unimplemented);
        assert_eq!(again.message(), "the server offers no pipeline", "answered from memory");
        stop.cancel();
        server.await.unwrap();
    }

    /// A call too large for the server ends the stream with an error, after the calls taken
    /// before it are answered; the next call goes on a new stream.
    #[tokio::test]
    async fn an_oversized_call_fails_and_the_next_gets_a_new_stream() {
        let stop = CancellationToken::new();
        let fake = Fake::new(true, 64);
        let running = fake.running.clone();
        let (port, server) = start(fake, stop.clone()).await;
        let p = client(port);
        let taken = tokio::spawn({
            let p = p.clone();
            async move { p.prepare(prepare("taken", 200), LONG).await }
        });
        until_running(&running, 1).await;
        let huge = p.prepare(prepare(&"x".repeat(64 << 10), 0), LONG).await.unwrap_err();
        assert_eq!(huge.code(), Code::Unavailable, "{huge:?}");
        assert!(huge.message().contains("OutOfRange"), "{huge:?}");
        assert_eq!(taken.await.unwrap().unwrap().results[0].metadata, b"taken", "the call taken before is answered");
        let next = p.prepare(prepare("next", 0), LONG).await.unwrap();
        assert_eq!(next.results[0].metadata, b"next");
        stop.cancel();
        server.await.unwrap();
    }

    /// A server ending a stream (a graceful restart) answers the calls it took; a call queued
    /// behind them that it never took goes on a new stream, and runs exactly once.
    #[tokio::test]
    async fn calls_a_closing_server_did_not_take_go_on_a_new_stream() {
        let stop = CancellationToken::new();
        let fake = Fake::new(true, 1);
        let (port, server) = start(fake.clone(), stop.clone()).await;
        let p = client(port);
        let taken = tokio::spawn({
            let p = p.clone();
            async move { p.prepare(prepare("taken", 200), LONG).await }
        });
        until_running(&fake.running, 1).await;
        let queued = tokio::spawn({
            let p = p.clone();
            async move { p.prepare(prepare("queued", 0), LONG).await }
        });
        // Until "queued" is on the stream: the only place is taken, so it stays unread.
        tokio::time::timeout(LONG, async {
            while p
                .pipeline
                .inner
                .current
                .lock()
                .unwrap()
                .as_ref()
                .unwrap()
                .shared
                .pending
                .lock()
                .unwrap()
                .as_ref()
                .unwrap()
                .len()
                < 2
            {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .await
        .unwrap();
        fake.end_open_streams();
        assert_eq!(taken.await.unwrap().unwrap().results[0].metadata, b"taken");
        assert_eq!(queued.await.unwrap().unwrap().results[0].metadata, b"queued", "retried on a new stream");
        assert_eq!((fake.prepares_of("taken"), fake.prepares_of("queued")), (1, 1), "each ran once");
        stop.cancel();
        tokio::time::timeout(LONG, server).await.expect("graceful shutdown is not held up by the stream").unwrap();

        // A new server on the same port: the client opens a new stream to it.
        let stop = CancellationToken::new();
        let (_, server) = start_on(port, Fake::new(true, 64), stop.clone()).await;
        let reply = p.prepare(prepare("after", 0), LONG).await.unwrap();
        assert_eq!(reply.results[0].metadata, b"after");
        stop.cancel();
        server.await.unwrap();
    }

    /// A call without an answer in time fails with DEADLINE_EXCEEDED and leaves no entry
    /// behind; a server that dies fails the calls in flight at once, not at their deadline.
    #[tokio::test]
    async fn deadlines_and_a_dead_server() {
        // The server in a runtime of its own, so that dropping the runtime kills its
        // connections mid-call, as a crash would.
        let (port_tx, port_rx) = std::sync::mpsc::channel();
        let (kill, killed) = oneshot::channel::<()>();
        let fake = Fake::new(true, 64);
        let seen = fake.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                let (port, _server) = start(fake, CancellationToken::new()).await;
                port_tx.send(port).unwrap();
                let _ = killed.await;
            });
            drop(rt);
        });
        let port = port_rx.recv().unwrap();
        let p = client(port);
        let late = p.prepare(prepare("late", 60_000), Duration::from_millis(50)).await.unwrap_err();
        assert_eq!(late.code(), Code::DeadlineExceeded);
        let conn = p.pipeline.inner.current.lock().unwrap().clone().expect("a stream");
        assert!(conn.shared.pending.lock().unwrap().as_ref().unwrap().is_empty(), "the timed-out call was removed");

        let stuck = tokio::spawn({
            let p = p.clone();
            async move { p.prepare(prepare("stuck", 60_000), Duration::from_secs(120)).await }
        });
        tokio::time::timeout(LONG, async {
            while seen.prepares_of("stuck") == 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .await
        .expect("the call reaches the server");
        kill.send(()).unwrap();
        thread.join().unwrap();
        let failed = tokio::time::timeout(LONG, stuck).await.expect("failed at once").unwrap().unwrap_err();
        assert_eq!(failed.code(), Code::Unavailable, "{failed:?}");
    }
}
