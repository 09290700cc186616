//! Logs and traces for every Pledge process: `tracing` to stderr (`RUST_LOG`), and, when an
//! endpoint is configured, OpenTelemetry spans exported over OTLP/gRPC, so that one trace shows
//! an application's call, the coordinator's decision and decision-log sync, and each
//! participant's prepare and commit.
//!
//! # Turning export on
//! Off by default: nothing is sent anywhere, and tracing costs what it cost before (the spans
//! below are debug-level callsites, disabled unless `RUST_LOG` asks for them). On when an
//! endpoint is set, by the standard variables `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (in that order), or else by the process's own setting (the
//! coordinator's `otlp_endpoint`); `OTEL_SDK_DISABLED=true` keeps it off whatever is set. The
//! endpoint is an OTLP/gRPC receiver, `http://host:4317`: plaintext, so a collector or agent
//! on the host or on a trusted network (TLS to the collector is not built in).
//!
//! Each process names itself (`service.name`: `pledge-coordinator`, an adapter's binary name);
//! `OTEL_SERVICE_NAME` overrides it and `OTEL_RESOURCE_ATTRIBUTES` adds attributes. Sampling is
//! parent-based, always-on at the root, unless `OTEL_TRACES_SAMPLER` (and `_ARG`) say otherwise:
//! under load, sample (`parentbased_traceidratio`), since every call makes spans.
//!
//! # Never at the transactions' expense
//! Spans go to a bounded queue (2048 spans, `OTEL_BSP_MAX_QUEUE_SIZE`) that a background thread
//! exports in batches (`OTEL_BSP_SCHEDULE_DELAY`, `OTEL_BSP_MAX_EXPORT_BATCH_SIZE`); when the
//! queue is full, spans are dropped, never waited for. An export that fails (collector down) is
//! logged once, with the error, and once more when export works again: not per span, not per
//! batch. The exporter runs on its own thread and Tokio runtime, apart from the process's. At
//! shutdown [`shutdown`] (or [`flush`]) sends what is queued.
//!
//! # Propagation
//! W3C trace context (`traceparent`, `tracestate`): in the metadata of unary gRPC calls
//! ([`inject`]; every server extracts it, see [`TraceLayer`]), and in each pipeline call's
//! `trace_context` field ([`crate::pipeline`]), since one pipeline stream carries the calls of
//! many traces. A malformed or oversized context is ignored (the call starts a new trace), as
//! the W3C recommendation says: a call is never refused for its trace context.
//!
//! # What is exported
//! Spans of Pledge's own crates (targets `pledge*`) at DEBUG and above, and events at INFO and
//! above as events of the span they happen in. Every server call has a span named after its
//! method (`pledge.v1.Participant/Prepare`, kind server, child of the caller's span), health
//! checks and reflection excepted; inside it, the service's own spans.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::task::{Context as TaskContext, Poll};

use opentelemetry::Context;
use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::trace::{BatchSpanProcessor, SdkTracerProvider, SpanData, SpanExporter};
use tracing::{Instrument, Level, Metadata, Span};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// The standard variables ([OTLP exporter configuration]).
///
/// [OTLP exporter configuration]: https://opentelemetry.io/docs/specs/otel/protocol/exporter/
pub const ENDPOINT_ENV: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
pub const TRACES_ENDPOINT_ENV: &str = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT";
pub const SERVICE_NAME_ENV: &str = "OTEL_SERVICE_NAME";
pub const SDK_DISABLED_ENV: &str = "OTEL_SDK_DISABLED";

/// The W3C trace context keys, in gRPC metadata and in a pipeline call's `trace_context`.
pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";
/// Most entries of a pipeline call's `trace_context` that are looked at; more: ignored.
pub const MAX_TRACE_CONTEXT_ENTRIES: usize = 8;
/// Longest `trace_context` value looked at, in bytes (W3C `tracestate` is at most 32 members,
/// recommended under 512 bytes); longer: the context is ignored.
pub const MAX_TRACE_CONTEXT_VALUE_BYTES: usize = 1024;
/// Failed export calls (each a batch of spans, dropped), for an alert on a collector that is
/// down: the log says so once per outage.
pub const EXPORT_FAILURES: &str = "pledge_trace_export_failures_total";
/// How long [`shutdown`] waits for the queued spans to go out.
pub const SHUTDOWN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Export is on (set once by [`init`] or [`enable_propagation`]): the hot paths test this
/// before anything else, so with export off propagation costs one relaxed load per call.
static ENABLED: AtomicBool = AtomicBool::new(false);
/// What [`shutdown`] and [`flush`] act on.
static EXPORT: OnceLock<Mutex<Option<Export>>> = OnceLock::new();

/// Whether spans are exported (and trace context propagated) by this process.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// For an application that set up OpenTelemetry itself (a `tracing-opentelemetry` layer and
/// the global W3C propagator) instead of calling [`init`]: Pledge's clients then inject the
/// current span's context into their calls too.
pub fn enable_propagation() {
    ENABLED.store(true, Ordering::Relaxed);
}

/// How a process sets up its logs and traces.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `service.name` unless `OTEL_SERVICE_NAME` is set.
    pub service_name: String,
    /// The log filter when `RUST_LOG` is not set (`info`, `warn`).
    pub default_log_filter: String,
    /// The process's own OTLP endpoint setting (a flag or config key); the standard variables
    /// take precedence over it. `None`, and no variable: export off.
    pub otlp_endpoint: Option<String>,
}

impl Settings {
    pub fn new(service_name: impl Into<String>, default_log_filter: impl Into<String>) -> Settings {
        Settings {
            service_name: service_name.into(),
            default_log_filter: default_log_filter.into(),
            otlp_endpoint: None,
        }
    }

    /// `service_name` named after this process's executable (`pledge-postgres-adapter`), or
    /// `fallback` when it has no name.
    pub fn for_executable(fallback: &str, default_log_filter: impl Into<String>) -> Settings {
        let name = std::env::args_os()
            .next()
            .and_then(|arg0| std::path::Path::new(&arg0).file_name().map(|n| n.to_string_lossy().into_owned()))
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| fallback.to_string());
        Settings::new(name, default_log_filter)
    }

    pub fn with_otlp_endpoint(mut self, endpoint: Option<String>) -> Settings {
        self.otlp_endpoint = endpoint;
        self
    }
}

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error(
        "{setting}: {value:?} is not an OTLP/gRPC endpoint: expected http://host:port (e.g. http://127.0.0.1:4317)"
    )]
    BadEndpoint { setting: &'static str, value: String },
    #[error(
        "{setting}: {value:?}: OTLP over TLS is not built in; export to a collector on this host or a trusted \
         network over http://"
    )]
    TlsEndpoint { setting: &'static str, value: String },
    #[error("cannot start the OTLP exporter: {0}")]
    Exporter(String),
    #[error("logging is already set up in this process")]
    AlreadyInitialized,
}

/// The endpoint export goes to, if any: the standard variables, then `configured`.
pub fn resolve_endpoint(configured: Option<&str>) -> Result<Option<String>, InitError> {
    let var = |name: &str| std::env::var(name).ok().map(|v| v.trim().to_string()).filter(|v| !v.is_empty());
    if var(SDK_DISABLED_ENV).is_some_and(|v| v.eq_ignore_ascii_case("true")) {
        return Ok(None);
    }
    let (setting, value) = match (var(TRACES_ENDPOINT_ENV), var(ENDPOINT_ENV), configured) {
        (Some(v), _, _) => (TRACES_ENDPOINT_ENV, v),
        (None, Some(v), _) => (ENDPOINT_ENV, v),
        (None, None, Some(v)) if !v.trim().is_empty() => ("otlp_endpoint", v.trim().to_string()),
        _ => return Ok(None),
    };
    check_endpoint(setting, &value)?;
    Ok(Some(value))
}

fn check_endpoint(setting: &'static str, value: &str) -> Result<(), InitError> {
    let uri: http::Uri = value.parse().map_err(|_| InitError::BadEndpoint { setting, value: value.to_string() })?;
    match (uri.scheme_str(), uri.host()) {
        (Some("http"), Some(_)) => Ok(()),
        (Some("https"), Some(_)) => Err(InitError::TlsEndpoint { setting, value: value.to_string() }),
        _ => Err(InitError::BadEndpoint { setting, value: value.to_string() }),
    }
}

/// Sets up this process's logging (stderr, `RUST_LOG` or `settings.default_log_filter`) and,
/// when an endpoint is configured (see the module documentation), span export. Call once, at
/// start; call [`shutdown`] before the process exits so the queued spans go out.
pub fn init(settings: Settings) -> Result<(), InitError> {
    let Some(endpoint) = resolve_endpoint(settings.otlp_endpoint.as_deref())? else {
        return init_logs(&settings.default_log_filter);
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&settings.default_log_filter));
    let logs = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_filter(filter);
    let service_name = std::env::var(SERVICE_NAME_ENV)
        .ok()
        .filter(|n| !n.trim().is_empty())
        .unwrap_or_else(|| settings.service_name.clone());
    let export = Export::start(&endpoint, &service_name)?;
    let tracer = export.provider.tracer("pledge");
    let spans = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        // Each enter/exit would otherwise attach the span's context to the thread, and time
        // the span's busy and idle periods: work on every poll that nothing here reads.
        .with_context_activation(false)
        .with_tracked_inactivity(false)
        .with_threads(false)
        .with_filter(tracing_subscriber::filter::filter_fn(exported).with_max_level_hint(Level::DEBUG));
    let installed = tracing_subscriber::registry().with(logs).with(spans).try_init();
    if installed.is_err() {
        let _ = export.provider.shutdown();
        return Err(InitError::AlreadyInitialized);
    }
    opentelemetry::global::set_text_map_propagator(opentelemetry_sdk::propagation::TraceContextPropagator::new());
    EXPORT.get_or_init(|| Mutex::new(None)).lock().expect("telemetry").replace(export);
    ENABLED.store(true, Ordering::Relaxed);
    tracing::info!(endpoint, service_name, "exporting traces over OTLP");
    Ok(())
}

/// Sets up logging only (stderr, `RUST_LOG` or `default_log_filter`), whatever the OTLP
/// variables say: for short-lived commands (a CLI call) whose spans no one needs.
pub fn init_logs(default_log_filter: &str) -> Result<(), InitError> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_log_filter));
    let logs = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_filter(filter);
    tracing_subscriber::registry().with(logs).try_init().map_err(|_| InitError::AlreadyInitialized)
}

/// What the span layer takes: Pledge's spans at DEBUG and above, and events at INFO and above
/// (as events of their span; an event outside every exported span is dropped by the layer).
fn exported(meta: &Metadata<'_>) -> bool {
    if meta.is_span() {
        meta.target().starts_with("pledge") && *meta.level() <= Level::DEBUG
    } else {
        *meta.level() <= Level::INFO
    }
}

/// Sends the spans queued so far, waiting at most [`SHUTDOWN_TIMEOUT`] (a process whose last
/// spans matter, e.g. a server that stopped serving, calls it on its way out). Export goes on.
pub fn flush() {
    let provider = EXPORT.get().and_then(|e| e.lock().expect("telemetry").as_ref().map(|e| e.provider.clone()));
    let Some(provider) = provider else { return };
    // The provider's own flush waits as long as an export may take (OTEL_BSP_EXPORT_TIMEOUT,
    // 30 s): too long for a process on its way out, so it is waited for here, bounded.
    let (done_tx, done) = std::sync::mpsc::channel();
    let flushing = std::thread::Builder::new().name("pledge-otlp-flush".into()).spawn(move || {
        let _ = done_tx.send(provider.force_flush());
    });
    match flushing.map(|_| done.recv_timeout(SHUTDOWN_TIMEOUT)) {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => tracing::debug!(error = %e, "flushing the trace export"),
        Ok(Err(_)) => tracing::warn!(timeout = ?SHUTDOWN_TIMEOUT, "the last spans may not have been exported"),
        Err(e) => tracing::debug!(error = %e, "cannot start a thread to flush the trace export"),
    }
}

/// Sends the queued spans and stops exporting (spans ended afterwards are dropped). For the end
/// of `main`; does nothing when export is off or already stopped.
pub fn shutdown() {
    let export = EXPORT.get().and_then(|e| e.lock().expect("telemetry").take());
    if let Some(export) = export {
        export.stop();
    }
}

/// The export machinery: the provider (its batch processor owns a thread) and the thread whose
/// Tokio runtime drives the exporter's gRPC channel.
struct Export {
    provider: SdkTracerProvider,
    runtime_stop: tokio::sync::oneshot::Sender<()>,
    runtime_thread: std::thread::JoinHandle<()>,
}

impl Export {
    fn start(endpoint: &str, service_name: &str) -> Result<Export, InitError> {
        // tonic's channel needs a Tokio runtime for its connection task, and the process's own
        // runtime may not exist yet (adapters set up logging first) or may stop before the last
        // export: so a small one of its own, on its own thread.
        let (built_tx, built_rx) = std::sync::mpsc::channel();
        let (runtime_stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let endpoint = endpoint.to_string();
        let runtime_thread = std::thread::Builder::new()
            .name("pledge-otlp".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        let _ = built_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                let exporter = runtime.block_on(async {
                    opentelemetry_otlp::SpanExporter::builder().with_tonic().with_endpoint(endpoint).build()
                });
                let _ = built_tx.send(exporter.map_err(|e| e.to_string()));
                runtime.block_on(async {
                    let _ = stop_rx.await;
                });
            })
            .map_err(|e| InitError::Exporter(format!("cannot start its thread: {e}")))?;
        let exporter = built_rx
            .recv()
            .map_err(|_| InitError::Exporter("its thread ended".into()))?
            .map_err(InitError::Exporter)?;
        let resource = opentelemetry_sdk::Resource::builder()
            .with_service_name(service_name.to_string())
            .with_attribute(opentelemetry::KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
            // Tells apart processes of one service (the instances of a cluster).
            .with_attribute(opentelemetry::KeyValue::new("service.instance.id", uuid::Uuid::now_v7().to_string()))
            .build();
        let processor = BatchSpanProcessor::builder(QuietExporter::new(exporter)).build();
        let provider = SdkTracerProvider::builder().with_resource(resource).with_span_processor(processor).build();
        Ok(Export { provider, runtime_stop, runtime_thread })
    }

    fn stop(self) {
        ENABLED.store(false, Ordering::Relaxed);
        if let Err(e) = self.provider.shutdown_with_timeout(SHUTDOWN_TIMEOUT) {
            tracing::warn!(error = %e, "the last spans may not have been exported");
        }
        let _ = self.runtime_stop.send(());
        let _ = self.runtime_thread.join();
    }
}

/// The OTLP exporter, logging a failure once per outage instead of once per batch: a collector
/// that is down must not flood the log, nor slow the transactions (the batch processor drops
/// what its queue cannot hold).
#[derive(Debug)]
struct QuietExporter<E> {
    inner: E,
    failing: AtomicBool,
}

impl<E> QuietExporter<E> {
    fn new(inner: E) -> Self {
        QuietExporter { inner, failing: AtomicBool::new(false) }
    }
}

impl<E: SpanExporter> SpanExporter for QuietExporter<E> {
    async fn export(&self, batch: Vec<SpanData>) -> opentelemetry_sdk::error::OTelSdkResult {
        let spans = batch.len();
        let result = self.inner.export(batch).await;
        match &result {
            Err(e) => {
                if !self.failing.swap(true, Ordering::Relaxed) {
                    // Described here, not at start: the metrics recorder is installed after
                    // logging is set up.
                    metrics::describe_counter!(EXPORT_FAILURES, "Failed trace export calls (their spans are dropped)");
                    tracing::warn!(error = %e, spans,
                        "trace export failed; spans are dropped until the collector answers (logged once)");
                }
                metrics::counter!(EXPORT_FAILURES).increment(1);
            }
            Ok(()) if self.failing.swap(false, Ordering::Relaxed) => tracing::info!("trace export works again"),
            Ok(()) => {}
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: std::time::Duration) -> opentelemetry_sdk::error::OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> opentelemetry_sdk::error::OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        self.inner.set_resource(resource);
    }
}

// ---------------------------------------------------------------------------- propagation

struct MetadataInjector<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        let key = tonic::metadata::MetadataKey::from_bytes(key.as_bytes());
        if let (Ok(key), Ok(value)) = (key, tonic::metadata::MetadataValue::try_from(value)) {
            self.0.insert(key, value);
        }
    }
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// Puts the current span's trace context into a call's metadata (`traceparent`, `tracestate`),
/// so the server's span joins the caller's trace. Does nothing with export off.
pub fn inject(metadata: &mut tonic::metadata::MetadataMap) {
    if !enabled() {
        return;
    }
    let cx = Span::current().context();
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&cx, &mut MetadataInjector(metadata)));
}

/// [`inject`] for a request about to be sent.
pub fn with_trace_context<T>(mut request: tonic::Request<T>) -> tonic::Request<T> {
    inject(request.metadata_mut());
    request
}

/// The current span's trace context as a pipeline call carries it (empty with export off).
pub fn current_trace_context() -> HashMap<String, String> {
    let mut carrier = HashMap::new();
    if enabled() {
        let cx = Span::current().context();
        opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&cx, &mut carrier));
    }
    carrier
}

/// A span's place in its trace, to carry across a channel or a task: what a span made
/// elsewhere later is put under ([`adopt`]).
pub use opentelemetry::Context as TraceContext;

/// The current span's trace context (`None` with export off, or outside every exported span).
pub fn current_context() -> Option<TraceContext> {
    if !enabled() {
        return None;
    }
    context_of(&Span::current())
}

/// `span`'s trace context (`None` with export off, or for a span that is not exported).
pub fn context_of(span: &Span) -> Option<TraceContext> {
    use opentelemetry::trace::TraceContextExt;
    if !enabled() || span.is_disabled() {
        return None;
    }
    let cx = span.context();
    cx.span().span_context().is_valid().then_some(cx)
}

/// The trace context a caller sent (W3C `traceparent`, `tracestate`) by other means than a
/// call's metadata (a message header, a job's fields): `None` when there is none, or when it
/// is malformed or oversized. Put spans under it with [`adopt`].
pub fn extract(trace_context: &HashMap<String, String>) -> Option<TraceContext> {
    use opentelemetry::trace::TraceContextExt;
    let cx = context_from_map(trace_context);
    cx.span().span_context().is_valid().then_some(cx)
}

/// Most other traces a batched call's span is linked to (besides its parent's).
pub const MAX_BATCH_LINKS: usize = 32;

/// Puts `span` (made with `parent: None` and not entered yet) under the first of `contexts` and
/// links it to the others' (at most [`MAX_BATCH_LINKS`], each once): a call made for several
/// transactions at once (a batch) is a child in the first one's trace and referenced from it
/// to the rest.
pub fn adopt<'a>(span: &Span, contexts: impl IntoIterator<Item = &'a TraceContext>) {
    use opentelemetry::trace::TraceContextExt;
    let mut contexts = contexts.into_iter();
    let Some(parent) = contexts.next() else { return };
    let parent_id = parent.span().span_context().span_id();
    let _ = span.set_parent(parent.clone());
    let mut linked = Vec::new();
    for cx in contexts {
        let linked_span = cx.span().span_context().clone();
        let id = linked_span.span_id();
        if id == parent_id || linked.contains(&id) {
            continue;
        }
        if linked.len() == MAX_BATCH_LINKS {
            break;
        }
        linked.push(id);
        span.add_link(linked_span);
    }
}

/// The caller's context a pipeline call carried; empty (a new trace) when there is none, or
/// when it is larger than the bounds above.
fn context_from_map(carrier: &HashMap<String, String>) -> Context {
    let oversized =
        carrier.len() > MAX_TRACE_CONTEXT_ENTRIES || carrier.values().any(|v| v.len() > MAX_TRACE_CONTEXT_VALUE_BYTES);
    if carrier.is_empty() || oversized {
        return Context::new();
    }
    opentelemetry::global::get_text_map_propagator(|p| p.extract(carrier))
}

fn context_from_headers(headers: &http::HeaderMap) -> Context {
    let oversized = headers.get(TRACESTATE).is_some_and(|v| v.len() > MAX_TRACE_CONTEXT_VALUE_BYTES);
    if !headers.contains_key(TRACEPARENT) || oversized {
        return Context::new();
    }
    opentelemetry::global::get_text_map_propagator(|p| p.extract(&HeaderExtractor(headers)))
}

/// The span of one served call (`path` is its gRPC method, `/pledge.v1.Participant/Prepare`),
/// a child of the caller's span in `parent`: the root of this process's part of the trace.
/// `pipelined`: taken from a pipeline stream (else a unary call).
fn server_span(path: &str, parent: Context, pipelined: bool) -> Span {
    let name = path.trim_start_matches('/');
    let (service, method) = name.split_once('/').unwrap_or((name, ""));
    let span = tracing::debug_span!(
        parent: None,
        "grpc.server",
        otel.name = name,
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.service = service,
        rpc.method = method,
        pledge.pipelined = pipelined,
        rpc.grpc.status_code = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
    );
    // Fails only when the span is disabled (then there is nothing to parent).
    let _ = span.set_parent(parent);
    span
}

/// Records a call's gRPC status on its span (a failed call's span is an error).
fn record_status(span: &Span, code: tonic::Code) {
    span.record("rpc.grpc.status_code", code as i32);
    if code != tonic::Code::Ok {
        span.record("otel.status_code", "error");
    }
}

/// The span of one call taken from a pipeline stream, as [`TraceLayer`] makes one for a unary
/// call: named after the call's method, a child of the context the call carried. `None` with
/// export off.
pub fn pipeline_call_span(path: &str, trace_context: &HashMap<String, String>) -> Option<Span> {
    enabled().then(|| server_span(path, context_from_map(trace_context), true))
}

/// Records the outcome of a pipelined call on its span (see [`pipeline_call_span`]).
pub fn record_call_result<T>(span: &Span, result: &Result<T, tonic::Status>) {
    record_status(span, result.as_ref().map_or_else(tonic::Status::code, |_| tonic::Code::Ok));
}

/// Calls that get no span: health probes (frequent, and no one's transaction), reflection, and
/// pipeline streams (their calls get a span each, in [`crate::pipeline`]; the stream would
/// make one span lasting as long as it).
fn traced(path: &str) -> bool {
    !(path.starts_with("/grpc.health.") || path.starts_with("/grpc.reflection.") || path.ends_with("/Pipeline"))
}

/// The tower layer every Pledge server runs its calls in ([`crate::transport::server`]): with
/// export on, each call runs in a span named after its method, child of the caller's span
/// (from the call's `traceparent`), with the call's gRPC status. With export off it passes
/// calls through untouched.
#[derive(Clone, Copy, Debug, Default)]
pub struct TraceLayer;

impl<S> tower::Layer<S> for TraceLayer {
    type Service = TraceService<S>;

    fn layer(&self, inner: S) -> TraceService<S> {
        TraceService { inner }
    }
}

#[derive(Clone, Debug)]
pub struct TraceService<S> {
    inner: S,
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for TraceService<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = futures::future::Either<S::Future, BoxFuture<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        if !enabled() || !traced(request.uri().path()) {
            return futures::future::Either::Left(self.inner.call(request));
        }
        let span = server_span(request.uri().path(), context_from_headers(request.headers()), false);
        let response = span.in_scope(|| self.inner.call(request));
        let recorded = span.clone();
        futures::future::Either::Right(Box::pin(
            async move {
                let response = response.await;
                if let Ok(response) = &response {
                    // A failed unary call answers with its status in the headers
                    // ("trailers-only"); a success has it in the trailers, after the body.
                    let code = response
                        .headers()
                        .get("grpc-status")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<i32>().ok())
                        .map_or(tonic::Code::Ok, tonic::Code::from_i32);
                    record_status(&recorded, code);
                }
                response
            }
            .instrument(span),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_checked() {
        check_endpoint("t", "http://127.0.0.1:4317").unwrap();
        check_endpoint("t", "http://collector.internal:4317").unwrap();
        for bad in ["127.0.0.1:4317", "", "ftp://x:1", "http://"] {
            assert!(matches!(check_endpoint("t", bad), Err(InitError::BadEndpoint { .. })), "{bad}");
        }
        let e = check_endpoint("OTEL_EXPORTER_OTLP_ENDPOINT", "https://c:4317").unwrap_err();
        assert!(matches!(e, InitError::TlsEndpoint { .. }));
        assert!(e.to_string().starts_with("OTEL_EXPORTER_OTLP_ENDPOINT: \"https://c:4317\""), "{e}");
    }

    #[test]
    fn which_calls_get_a_span() {
        assert!(traced("/pledge.v1.Participant/Prepare"));
        assert!(traced("/pledge.v1.Coordinator/Commit"));
        assert!(!traced("/pledge.v1.Coordinator/Pipeline"));
        assert!(!traced("/grpc.health.v1.Health/Check"));
        assert!(!traced("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"));
    }

    #[test]
    fn oversized_or_absent_trace_context_is_a_new_trace() {
        use opentelemetry::trace::TraceContextExt;
        opentelemetry::global::set_text_map_propagator(opentelemetry_sdk::propagation::TraceContextPropagator::new());
        let parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let mut carrier = HashMap::from([(TRACEPARENT.to_string(), parent.to_string())]);
        let cx = context_from_map(&carrier);
        assert_eq!(cx.span().span_context().trace_id().to_string(), "0af7651916cd43dd8448eb211c80319c");
        assert!(cx.span().span_context().is_remote());
        carrier.insert(TRACESTATE.into(), "a=".to_string() + &"x".repeat(MAX_TRACE_CONTEXT_VALUE_BYTES));
        assert!(!context_from_map(&carrier).span().span_context().is_valid(), "oversized: ignored");
        assert!(!context_from_map(&HashMap::new()).span().span_context().is_valid());
        let mut headers = http::HeaderMap::new();
        headers.insert(TRACEPARENT, parent.parse().unwrap());
        let cx = context_from_headers(&headers);
        assert_eq!(cx.span().span_context().span_id().to_string(), "b7ad6b7169203331");
        headers.insert(TRACEPARENT, "garbage".parse().unwrap());
        assert!(!context_from_headers(&headers).span().span_context().is_valid(), "malformed: ignored");
    }
}
