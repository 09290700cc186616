//! Prometheus metrics shared by every Pledge server: the exposition endpoint
//! (`GET /metrics`, text format), and the per-call RPC metrics every service records.
//!
//! Components record through the [`metrics`] facade (`metrics::counter!` and friends), which
//! costs nothing until a recorder is installed; [`serve`] installs the Prometheus recorder
//! and serves it. Each binary takes a `--metrics-listen` address for that; without it no
//! recorder is installed and the calls stay no-ops.
//!
//! Names follow Prometheus conventions: `pledge_` prefix, `_total` on counters, base units
//! (`_seconds`, `_bytes`). Histograms of seconds get [`LATENCY_BUCKETS`].

use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use metrics::{Unit, counter, describe_counter, describe_histogram, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder};
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status};

/// Bucket bounds of every `_seconds` histogram: 100 µs to 30 s, finest where a commit's
/// latency usually lies (a few fsyncs and round trips).
pub const LATENCY_BUCKETS: &[f64] =
    &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// How often histograms are compacted when nobody scrapes (the recorder keeps raw samples
/// until then, so this bounds its memory).
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Calls handled, by method and gRPC status code.
pub const RPC_REQUESTS: &str = "pledge_rpc_requests_total";
/// Time from receiving a call to answering it, by method.
pub const RPC_DURATION: &str = "pledge_rpc_duration_seconds";

/// A Prometheus recorder configured for Pledge (buckets for `_seconds` histograms).
pub fn recorder() -> PrometheusRecorder {
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
        .expect("LATENCY_BUCKETS is not empty")
        .build_recorder()
}

/// Installs Pledge's Prometheus recorder as the process's recorder and serves it on `listen`
/// (`GET /metrics`) until `shutdown` is cancelled. Returns the bound address (port 0 picks a
/// free one). `describe` runs once the recorder is installed, to register the metrics' help
/// texts. Fails if the port cannot be bound or a recorder is already installed.
pub async fn serve(
    listen: SocketAddr,
    describe: impl FnOnce(),
    shutdown: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let recorder = recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder)
        .map_err(|e| std::io::Error::other(format!("cannot install the metrics recorder: {e}")))?;
    describe_rpc();
    describe();
    serve_handle(listener, handle, shutdown)
}

/// Most scrapes served at once; further connections are closed at once.
const MAX_CONNECTIONS: usize = 16;
/// Longest a client may take to send its request headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest one connection may last (a scrape takes milliseconds).
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves `handle` on `listener` (the part of [`serve`] that does not touch the global
/// recorder; tests use it with a local one): `GET /metrics` answers the text exposition,
/// anything else 404. One request per connection, at most [`MAX_CONNECTIONS`] at a time, each
/// bounded in time.
pub fn serve_handle(
    listener: tokio::net::TcpListener,
    handle: PrometheusHandle,
    shutdown: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let addr = listener.local_addr()?;
    let upkeep = handle.clone();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(UPKEEP_INTERVAL);
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = ticks.tick() => upkeep.run_upkeep(),
            }
        }
    });
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    tokio::spawn(async move {
        loop {
            let stream = tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // Out of file descriptors and the like: wait a little, then go on.
                        tracing::warn!(error = %e, "metrics endpoint cannot accept a connection");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else { continue };
            let handle = handle.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request| {
                    std::future::ready(Ok::<_, std::convert::Infallible>(respond(&handle, &request)))
                });
                let connection = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(HEADER_READ_TIMEOUT)
                    .keep_alive(false)
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
                // Errors here are a client's (closed early, bad request): nothing to handle.
                let _ = tokio::time::timeout(CONNECTION_TIMEOUT, connection).await;
                drop(slot);
            });
        }
    });
    Ok(addr)
}

fn respond<B>(
    handle: &PrometheusHandle,
    request: &hyper::Request<B>,
) -> hyper::Response<http_body_util::Full<bytes::Bytes>> {
    let (status, content_type, body) = if request.method() == hyper::Method::GET && request.uri().path() == "/metrics" {
        (hyper::StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", handle.render())
    } else {
        (hyper::StatusCode::NOT_FOUND, "text/plain; charset=utf-8", "only GET /metrics is served here\n".into())
    };
    hyper::Response::builder()
        .status(status)
        .header(hyper::header::CONTENT_TYPE, content_type)
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
        .expect("a valid response")
}

fn describe_rpc() {
    describe_counter!(RPC_REQUESTS, "gRPC calls handled (pipelined calls included), by method and status code");
    describe_histogram!(RPC_DURATION, Unit::Seconds, "time from receiving a call to answering it, by method");
    describe_counter!(
        crate::tls::HANDSHAKE_FAILURES,
        "connections refused during the TLS handshake (no, an untrusted or an expired client certificate, a \
         plaintext client, a handshake that took too long)"
    );
}

/// Runs one call's handler and records it under `method` (see [`RPC_REQUESTS`],
/// [`RPC_DURATION`]). Unary and pipelined calls of a kind go through the same handler, so
/// both are counted. A handler stopped before it answers (its deadline passed or its client
/// went away, so the server dropped it) counts as `CANCELLED`; one that panicked, as `INTERNAL`.
pub async fn observe<T>(method: &'static str, call: impl Future<Output = Result<T, Status>>) -> Result<T, Status> {
    let mut record = Record { method, started: Instant::now(), code: None };
    let result = call.await;
    record.code = Some(match &result {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    });
    result
}

/// Records one call when dropped: with its answer's code, or as stopped early.
struct Record {
    method: &'static str,
    started: Instant,
    code: Option<Code>,
}

impl Drop for Record {
    fn drop(&mut self) {
        let code = match self.code {
            Some(code) => code,
            None if std::thread::panicking() => Code::Internal,
            None => Code::Cancelled,
        };
        counter!(RPC_REQUESTS, "method" => self.method, "code" => code_name(code)).increment(1);
        histogram!(RPC_DURATION, "method" => self.method).record(self.started.elapsed());
    }
}

/// The canonical name of a gRPC status code (as grpc-go and grpcurl print it).
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        response
    }

    #[tokio::test]
    async fn the_endpoint_serves_what_was_recorded() {
        let recorder = recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            counter!(RPC_REQUESTS, "method" => "Begin", "code" => "OK").increment(3);
            histogram!(RPC_DURATION, "method" => "Begin").record(Duration::from_millis(2));
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let shutdown = CancellationToken::new();
        let addr = serve_handle(listener, handle, shutdown.clone()).unwrap();

        let response = get(addr, "/metrics").await;
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        assert!(response.contains(r#"pledge_rpc_requests_total{method="Begin",code="OK"} 3"#), "{response}");
        // A real histogram with Pledge's buckets: 2 ms falls in the 2.5 ms bucket, not in 1 ms.
        assert!(response.contains(r#"pledge_rpc_duration_seconds_bucket{method="Begin",le="0.001"} 0"#), "{response}");
        assert!(response.contains(r#"pledge_rpc_duration_seconds_bucket{method="Begin",le="0.0025"} 1"#), "{response}");
        assert!(get(addr, "/").await.starts_with("HTTP/1.1 404"));
        shutdown.cancel();
    }

    #[tokio::test]
    async fn observe_counts_each_outcome_under_its_code() {
        let recorder = recorder();
        let handle = recorder.handle();
        let _guard = metrics::set_default_local_recorder(&recorder);
        let ok: Result<(), Status> = observe("Commit", async { Ok(()) }).await;
        assert!(ok.is_ok());
        let err: Result<(), Status> = observe("Commit", async { Err(Status::not_found("no such gtid")) }).await;
        assert_eq!(err.unwrap_err().message(), "no such gtid");
        // A handler dropped before it answers (deadline, client gone) still counts.
        let stopped = tokio::time::timeout(
            Duration::from_millis(1),
            observe("Commit", futures::future::pending::<Result<(), Status>>()),
        )
        .await;
        assert!(stopped.is_err());
        let text = handle.render();
        assert!(text.contains(r#"pledge_rpc_requests_total{method="Commit",code="OK"} 1"#), "{text}");
        assert!(text.contains(r#"pledge_rpc_requests_total{method="Commit",code="NOT_FOUND"} 1"#), "{text}");
        assert!(text.contains(r#"pledge_rpc_requests_total{method="Commit",code="CANCELLED"} 1"#), "{text}");
        assert!(text.contains(r#"pledge_rpc_duration_seconds_count{method="Commit"} 3"#), "{text}");
    }
}
