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
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::stream::{FuturesUnordered, Stream, StreamExt};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::{Code, Status, Streaming};

use crate::v1;

/// Calls a client queues for writing before callers wait for room.
pub const CLIENT_QUEUE_CALLS: usize = 1024;
/// After a server answered UNIMPLEMENTED to a pipeline, how long callers use unary calls
/// before asking again (the server may be upgraded meanwhile).
pub const UNSUPPORTED_RECHECK: Duration = Duration::from_secs(60);

/// A call envelope: the request plus the id its reply will carry.
pub trait CallEnvelope: Send + 'static {
    fn set_call_id(&mut self, id: u64);
}

/// A reply envelope.
pub trait ReplyEnvelope: Send + 'static {
    fn call_id(&self) -> u64;
}

impl CallEnvelope for v1::ParticipantCall {
    fn set_call_id(&mut self, id: u64) {
        self.call_id = id;
    }
}

impl ReplyEnvelope for v1::ParticipantReply {
    fn call_id(&self) -> u64 {
        self.call_id
    }
}

impl CallEnvelope for v1::CoordinatorCall {
    fn set_call_id(&mut self, id: u64) {
        self.call_id = id;
    }
}

impl ReplyEnvelope for v1::CoordinatorReply {
    fn call_id(&self) -> u64 {
        self.call_id
    }
}

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
/// finish.
///
/// Ends the reply stream once the client has ended its side and every call taken has been
/// answered, or, when `closing` is cancelled (the server is shutting down), once the calls
/// already taken are answered: a long-lived stream must not hold up a graceful shutdown.
pub fn serve<C, R, F, Fut>(
    mut calls: Streaming<C>,
    closing: CancellationToken,
    max_in_flight: usize,
    mut handle: F,
) -> ReplyStream<R>
where
    C: Send + 'static,
    R: Send + 'static,
    F: FnMut(C) -> Fut + Send + 'static,
    Fut: Future<Output = R> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(max_in_flight.max(1));
    tokio::spawn(async move {
        let mut running = FuturesUnordered::new();
        let mut reading = true;
        while reading || !running.is_empty() {
            tokio::select! {
                biased;
                Some(reply) = running.next(), if !running.is_empty() => {
                    if tx.send(Ok(reply)).await.is_err() {
                        return; // the client is gone
                    }
                }
                _ = closing.cancelled(), if reading => reading = false,
                next = calls.message(), if reading && running.len() < max_in_flight => match next {
                    Ok(Some(call)) => running.push(handle(call)),
                    Ok(None) => reading = false,
                    Err(status) => {
                        // The client's side broke: nobody is left to answer.
                        tracing::debug!(%status, "pipeline stream broken by the client");
                        return;
                    }
                },
            }
        }
    });
    Box::pin(ReceiverStream::new(rx))
}

type Pending<R> = HashMap<u64, oneshot::Sender<Result<R, Status>>>;

/// What the stream's reader and its callers share: the calls waiting for replies, `None` once
/// the stream is closed.
struct Shared<R> {
    pending: Mutex<Option<Pending<R>>>,
}

impl<R> Shared<R> {
    fn is_open(&self) -> bool {
        self.pending.lock().unwrap().is_some()
    }

    /// Fails every call in flight and refuses new ones.
    fn close(&self, why: &str) {
        let pending = self.pending.lock().unwrap().take();
        for (_, waiter) in pending.into_iter().flatten() {
            let _ = waiter.send(Err(Status::unavailable(format!("pipeline stream closed: {why}"))));
        }
    }
}

/// One open stream.
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

struct Inner<C, R> {
    open: Opener<C, R>,
    current: Mutex<Option<Arc<Conn<C, R>>>>,
    /// Opening is done by one caller at a time; the others wait for its stream.
    opening: tokio::sync::Mutex<()>,
    /// Set when the server answered UNIMPLEMENTED: until then, calls fail at once with it.
    unsupported_until: Mutex<Option<Instant>>,
    next_id: AtomicU64,
}

/// The client end of a pipeline: cheap to clone, shared by every caller. Opens its stream on
/// first use and again after the stream broke.
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
                opening: tokio::sync::Mutex::new(()),
                unsupported_until: Mutex::new(None),
                next_id: AtomicU64::new(1),
            }),
        }
    }

    /// Sends `call` and waits for its reply, at most `timeout` in all. UNIMPLEMENTED means the
    /// server offers no pipeline (the caller should make the unary call instead).
    pub async fn call(&self, mut call: C, timeout: Duration) -> Result<R, Status> {
        let deadline = Instant::now() + timeout;
        let attempt = async {
            // A call that could not be handed to a stream was never seen by the server, so it
            // is safe to try once more on a new stream; one that was handed over is not.
            for _ in 0..2 {
                let conn = self.conn().await?;
                let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
                let (tx, rx) = oneshot::channel();
                match conn.shared.pending.lock().unwrap().as_mut() {
                    Some(pending) => pending.insert(id, tx),
                    None => continue, // closed since we got it
                };
                let _unregister = Unregister { shared: &conn.shared, id };
                call.set_call_id(id);
                if let Err(mpsc::error::SendError(back)) = conn.tx.send(call).await {
                    call = back;
                    conn.shared.close("the stream ended");
                    continue;
                }
                return match rx.await {
                    Ok(reply) => reply,
                    Err(_) => Err(Status::unavailable("pipeline stream closed")),
                };
            }
            Err(Status::unavailable("pipeline stream closed twice while sending"))
        };
        match tokio::time::timeout_at(deadline, attempt).await {
            Ok(result) => result,
            Err(_) => Err(Status::deadline_exceeded(format!("no reply within {} ms", timeout.as_millis()))),
        }
    }

    /// The open stream, opening one if there is none.
    async fn conn(&self) -> Result<Arc<Conn<C, R>>, Status> {
        if let Some(conn) = self.live() {
            return Ok(conn);
        }
        let _opening = self.inner.opening.lock().await;
        if let Some(conn) = self.live() {
            return Ok(conn); // another caller opened it meanwhile
        }
        if let Some(until) = *self.inner.unsupported_until.lock().unwrap()
            && Instant::now() < until
        {
            return Err(Status::unimplemented("the server offers no pipeline"));
        }
        let (tx, rx) = mpsc::channel(CLIENT_QUEUE_CALLS);
        let replies = match (self.inner.open)(ReceiverStream::new(rx)).await {
            Ok(replies) => replies,
            Err(status) => {
                if status.code() == Code::Unimplemented {
                    *self.inner.unsupported_until.lock().unwrap() = Some(Instant::now() + UNSUPPORTED_RECHECK);
                }
                return Err(status);
            }
        };
        let shared = Arc::new(Shared { pending: Mutex::new(Some(HashMap::new())) });
        tokio::spawn(read_replies(replies, shared.clone()));
        let conn = Arc::new(Conn { tx, shared });
        *self.inner.current.lock().unwrap() = Some(conn.clone());
        Ok(conn)
    }

    fn live(&self) -> Option<Arc<Conn<C, R>>> {
        self.inner.current.lock().unwrap().as_ref().filter(|c| c.shared.is_open()).cloned()
    }
}

/// Hands each reply to its caller until the stream ends, then fails whatever is left. Holds
/// no sender of the call queue, so dropping every [`Pipeline`] ends the stream.
async fn read_replies<R: ReplyEnvelope>(mut replies: Streaming<R>, shared: Arc<Shared<R>>) {
    let why = loop {
        match replies.message().await {
            Ok(Some(reply)) => {
                let waiter = shared.pending.lock().unwrap().as_mut().and_then(|p| p.remove(&reply.call_id()));
                // No waiter: the caller gave up (deadline) before the reply came.
                if let Some(waiter) = waiter {
                    let _ = waiter.send(Ok(reply));
                }
            }
            Ok(None) => break "the server ended it".to_string(),
            Err(status) => break format!("{:?}: {}", status.code(), status.message()),
        }
    };
    tracing::debug!(why, "pipeline stream closed");
    shared.close(&why);
}

/// The Participant service's pipeline, for the coordinator (and tests): Prepare, Commit and
/// Abort as on the unary client.
#[derive(Clone)]
pub struct ParticipantPipeline {
    pipeline: Pipeline<v1::ParticipantCall, v1::ParticipantReply>,
}

impl ParticipantPipeline {
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

    async fn call(
        &self,
        call: v1::participant_call::Call,
        timeout: Duration,
    ) -> Result<v1::participant_reply::Reply, Status> {
        use v1::participant_reply::Reply;
        let reply = self.pipeline.call(v1::ParticipantCall { call_id: 0, call: Some(call) }, timeout).await?;
        match reply.reply {
            Some(Reply::Error(e)) => Err(error_from_wire(e)),
            Some(reply) => Ok(reply),
            None => Err(Status::internal("participant sent a pipeline reply without content")),
        }
    }

    pub async fn prepare(&self, r: v1::PrepareRequest, timeout: Duration) -> Result<v1::PrepareResponse, Status> {
        match self.call(v1::participant_call::Call::Prepare(r), timeout).await? {
            v1::participant_reply::Reply::Prepare(r) => Ok(r),
            _ => Err(mismatched("Prepare")),
        }
    }

    pub async fn commit(
        &self,
        r: v1::CommitBranchesRequest,
        timeout: Duration,
    ) -> Result<v1::CommitBranchesResponse, Status> {
        match self.call(v1::participant_call::Call::Commit(r), timeout).await? {
            v1::participant_reply::Reply::Commit(r) => Ok(r),
            _ => Err(mismatched("Commit")),
        }
    }

    pub async fn abort(
        &self,
        r: v1::AbortBranchesRequest,
        timeout: Duration,
    ) -> Result<v1::AbortBranchesResponse, Status> {
        match self.call(v1::participant_call::Call::Abort(r), timeout).await? {
            v1::participant_reply::Reply::Abort(r) => Ok(r),
            _ => Err(mismatched("Abort")),
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

    async fn call(&self, call: v1::coordinator_call::Call) -> Result<v1::coordinator_reply::Reply, Status> {
        use v1::coordinator_reply::Reply;
        let reply = self.pipeline.call(v1::CoordinatorCall { call_id: 0, call: Some(call) }, self.timeout).await?;
        match reply.reply {
            Some(Reply::Error(e)) => Err(error_from_wire(e)),
            Some(reply) => Ok(reply),
            None => Err(Status::internal("coordinator sent a pipeline reply without content")),
        }
    }

    pub async fn begin(&self, r: v1::BeginRequest) -> Result<v1::BeginResponse, Status> {
        match self.call(v1::coordinator_call::Call::Begin(r)).await? {
            v1::coordinator_reply::Reply::Begin(r) => Ok(r),
            _ => Err(mismatched("Begin")),
        }
    }

    pub async fn enlist(&self, r: v1::EnlistRequest) -> Result<v1::EnlistResponse, Status> {
        match self.call(v1::coordinator_call::Call::Enlist(r)).await? {
            v1::coordinator_reply::Reply::Enlist(r) => Ok(r),
            _ => Err(mismatched("Enlist")),
        }
    }

    pub async fn commit(&self, r: v1::CommitRequest) -> Result<v1::CommitResponse, Status> {
        match self.call(v1::coordinator_call::Call::Commit(r)).await? {
            v1::coordinator_reply::Reply::Commit(r) => Ok(r),
            _ => Err(mismatched("Commit")),
        }
    }

    pub async fn abort(&self, r: v1::AbortRequest) -> Result<v1::AbortResponse, Status> {
        match self.call(v1::coordinator_call::Call::Abort(r)).await? {
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
    /// gtid as metadata; counts calls running at once. `pipeline: false` leaves the pipeline
    /// unimplemented, as a participant written without it would.
    #[derive(Clone)]
    struct Fake {
        pipeline: bool,
        closing: CancellationToken,
        max_in_flight: usize,
        running: Arc<AtomicUsize>,
        most_running: Arc<AtomicUsize>,
    }

    impl Fake {
        fn new(pipeline: bool, max_in_flight: usize) -> Fake {
            Fake {
                pipeline,
                closing: CancellationToken::new(),
                max_in_flight,
                running: Arc::default(),
                most_running: Arc::default(),
            }
        }
    }

    #[tonic::async_trait]
    impl Participant for Fake {
        async fn prepare(&self, r: Request<v1::PrepareRequest>) -> Result<Response<v1::PrepareResponse>, Status> {
            let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
            self.most_running.fetch_max(now, Ordering::SeqCst);
            let r = r.into_inner();
            let b = r.branches.first().ok_or_else(|| Status::invalid_argument("no branch"))?;
            let delay_ms: u64 = b.branch_id.parse().map_err(|_| Status::invalid_argument("branch_id: not a number"))?;
            tokio::time::sleep(Duration::from_millis(delay_ms)).await;
            self.running.fetch_sub(1, Ordering::SeqCst);
            Ok(Response::new(v1::PrepareResponse {
                results: vec![v1::PrepareResult {
                    vote: v1::Vote::Prepared as i32,
                    metadata: b.gtid.clone().into_bytes(),
                    reason: String::new(),
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

        type PipelineStream = ReplyStream<v1::ParticipantReply>;

        async fn pipeline(
            &self,
            r: Request<Streaming<v1::ParticipantCall>>,
        ) -> Result<Response<Self::PipelineStream>, Status> {
            if !self.pipeline {
                return Err(Status::unimplemented("no pipeline here"));
            }
            let fake = self.clone();
            Ok(Response::new(serve(r.into_inner(), self.closing.clone(), self.max_in_flight, move |call| {
                let fake = fake.clone();
                async move {
                    use v1::participant_call::Call;
                    use v1::participant_reply::Reply;
                    let reply = match call.call {
                        Some(Call::Prepare(r)) => {
                            fake.prepare(Request::new(r)).await.map(|r| Reply::Prepare(r.into_inner()))
                        }
                        Some(Call::Commit(r)) => {
                            fake.commit(Request::new(r)).await.map(|r| Reply::Commit(r.into_inner()))
                        }
                        Some(Call::Abort(r)) => fake.abort(Request::new(r)).await.map(|r| Reply::Abort(r.into_inner())),
                        None => Err(Status::invalid_argument("call: is required")),
                    };
                    let reply = reply.unwrap_or_else(|s| Reply::Error(error_to_wire(&s)));
                    v1::ParticipantReply { call_id: call.call_id, reply: Some(reply) }
                }
            })))
        }
    }

    /// Serves `fake` on a free port until `stop` is cancelled (which also closes its pipeline
    /// streams, as a real server's shutdown does); returns the port and the task.
    async fn start(mut fake: Fake, stop: CancellationToken) -> (u16, tokio::task::JoinHandle<()>) {
        fake.closing = stop.clone();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(ParticipantServer::new(fake))
                .serve_with_incoming_shutdown(TcpIncoming::from(listener), stop.cancelled_owned())
                .await
                .unwrap();
        });
        (port, server)
    }

    fn client(port: u16) -> ParticipantPipeline {
        let channel =
            tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}")).unwrap().connect_lazy();
        ParticipantPipeline::new(channel, 1 << 20)
    }

    fn prepare(gtid: &str, delay_ms: u64) -> v1::PrepareRequest {
        v1::PrepareRequest {
            coordinator_id: "c".into(),
            branches: vec![v1::BranchXid {
                resource_id: "r".into(),
                gtid: gtid.into(),
                branch_id: delay_ms.to_string(),
            }],
        }
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

    /// A server without a pipeline answers UNIMPLEMENTED, and the client remembers it: later
    /// calls fail at once, without asking again, so the caller goes straight to unary calls.
    #[tokio::test]
    async fn a_server_without_a_pipeline_is_remembered() {
        let stop = CancellationToken::new();
        let (port, server) = start(Fake::new(false, 64), stop.clone()).await;
        let p = client(port);
        let first = p.prepare(prepare("g", 0), LONG).await.unwrap_err();
        assert_eq!(first.code(), Code::Unimplemented);
        assert_eq!(first.message(), "no pipeline here", "the server's own answer");
        let again = p.prepare(prepare("g", 0), LONG).await.unwrap_err();
        assert_eq!(again.code(), Code::Unimplemented);
        assert_eq!(again.message(), "the server offers no pipeline", "answered from memory");
        stop.cancel();
        server.await.unwrap();
    }

    /// A server shutting down answers the calls it took, ends the stream (so its graceful
    /// shutdown completes), and the next call opens a new stream to the next server.
    #[tokio::test]
    async fn a_closing_server_answers_then_the_client_reopens() {
        let stop = CancellationToken::new();
        let fake = Fake::new(true, 64);
        let running = fake.running.clone();
        let (port, server) = start(fake, stop.clone()).await;
        let p = client(port);
        let slow = tokio::spawn({
            let p = p.clone();
            async move { p.prepare(prepare("slow", 300), LONG).await }
        });
        while running.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await; // until the call is at the server
        }
        stop.cancel();
        assert_eq!(slow.await.unwrap().unwrap().results[0].metadata, b"slow", "the call taken is answered");
        tokio::time::timeout(LONG, server).await.expect("graceful shutdown is not held up by the stream").unwrap();

        // A new server on the same port: the client opens a new stream to it.
        let stop = CancellationToken::new();
        let listener = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
        let mut fake = Fake::new(true, 64);
        fake.closing = stop.clone();
        let server = tokio::spawn({
            let stop = stop.clone();
            async move {
                tonic::transport::Server::builder()
                    .add_service(ParticipantServer::new(fake))
                    .serve_with_incoming_shutdown(TcpIncoming::from(listener), stop.cancelled_owned())
                    .await
                    .unwrap();
            }
        });
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
        let running = fake.running.clone();
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
        let late = p.prepare(prepare("late", 500), Duration::from_millis(50)).await.unwrap_err();
        assert_eq!(late.code(), Code::DeadlineExceeded);
        let conn = p.pipeline.live().expect("the stream stays open");
        assert!(conn.shared.pending.lock().unwrap().as_ref().unwrap().is_empty(), "the timed-out call was removed");

        let stuck = tokio::spawn({
            let p = p.clone();
            async move { p.prepare(prepare("stuck", 60_000), Duration::from_secs(120)).await }
        });
        while running.load(Ordering::SeqCst) < 2 {
            tokio::task::yield_now().await; // until "late" and "stuck" are both at the server
        }
        kill.send(()).unwrap();
        thread.join().unwrap();
        let failed = tokio::time::timeout(LONG, stuck).await.expect("failed at once").unwrap().unwrap_err();
        assert_eq!(failed.code(), Code::Unavailable, "{failed:?}");
    }
}
