//! OpenTelemetry traces across every process, read back from a real Jaeger (started by
//! `integration-tests/scripts/jaeger.sh`): a coordinator and two reference participants export
//! their spans over OTLP; the test is the application, and runs transactions under a trace id
//! of its choosing (a unary one through `ClusterClient`, a pipelined one through
//! `CoordinatorPipeline`), then asks Jaeger for each trace until it holds the application's
//! call, the coordinator's commit call, decision and log sync, and both participants' prepare
//! and commit, every span's parent within the trace. And processes started without an
//! endpoint send nothing.

use std::collections::{HashMap, HashSet};
use std::sync::OnceLock;
use std::time::Duration;

use pledge_integration_tests::*;
use pledge_proto::client::ClusterClient;
use pledge_proto::pipeline::CoordinatorPipeline;
use pledge_proto::telemetry;
use pledge_proto::v1::reference_store_client::ReferenceStoreClient;
use pledge_proto::v1::{self};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::Instrument;

/// How long a trace may take to show in Jaeger in full (the processes export every 100 ms).
const TRACE_WAIT: Duration = Duration::from_secs(60);
/// One query to Jaeger's API.
const QUERY_TIMEOUT: Duration = Duration::from_secs(5);

/// Jaeger's OTLP/gRPC endpoint and query API, as `jaeger.sh env` exports them.
fn jaeger() -> (String, String) {
    let var = |name: &str| {
        std::env::var(name).unwrap_or_else(|_| {
            panic!(
                "{name} is not set: this test needs the real Jaeger the project's scripts start \
                 (bash integration-tests/run.sh does it; by hand: bash integration-tests/scripts/jaeger.sh start \
                 && eval \"$(bash integration-tests/scripts/jaeger.sh env)\")"
            )
        })
    };
    (var("PLEDGE_OTLP_ENDPOINT"), var("PLEDGE_JAEGER_QUERY"))
}

/// This test process is the application: it exports its own spans to Jaeger, under a service
/// name of this run's (returned).
fn application(otlp: &str) -> &'static str {
    static SERVICE: OnceLock<String> = OnceLock::new();
    SERVICE.get_or_init(|| {
        let service = format!("pledge-it-app-{}", random_hex(4));
        let settings = telemetry::Settings::new(&service, "warn").with_otlp_endpoint(Some(otlp.to_string()));
        telemetry::init(settings).expect("the application's telemetry");
        service
    })
}

/// The environment of a process that exports to `otlp` (`None`: export off, whatever this
/// test's own environment holds) as `service`, every 100 ms (the default 5 s would only slow
/// the test down).
fn export_env(otlp: Option<&str>, service: &str) -> Vec<(&'static str, String)> {
    vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.unwrap_or_default().to_string()),
        ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", String::new()),
        ("OTEL_SERVICE_NAME", service.to_string()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100".to_string()),
    ]
}

fn as_env<'a>(vars: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    vars.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

fn random_hex(bytes: usize) -> String {
    (0..bytes).map(|_| format!("{:02x}", fastrand::u8(..))).collect()
}

/// A trace id the application chose, and the span id of its caller (outside the trace's spans).
struct Chosen {
    trace_id: String,
    caller_span: String,
}

impl Chosen {
    fn new() -> Chosen {
        Chosen { trace_id: random_hex(16), caller_span: random_hex(8) }
    }

    /// The application's span for one transaction: a child of the chosen caller, so in the
    /// chosen trace.
    fn span(&self, name: &'static str) -> tracing::Span {
        let traceparent = format!("00-{}-{}-01", self.trace_id, self.caller_span);
        let parent = telemetry::extract(&HashMap::from([("traceparent".to_string(), traceparent)]))
            .expect("a valid traceparent");
        let span =
            tracing::debug_span!(target: "pledge_it", parent: None, "app", otel.name = name, otel.kind = "client");
        telemetry::adopt(&span, [&parent]);
        span
    }
}

/// `GET path` from Jaeger's query API (HTTP/1.0: the body ends with the connection).
async fn query(base: &str, path: &str) -> (u16, String) {
    let addr = base.strip_prefix("http://").expect("PLEDGE_JAEGER_QUERY is http://host:port");
    let get = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes()).await?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await?;
        std::io::Result::Ok(response)
    };
    let response = tokio::time::timeout(QUERY_TIMEOUT, get)
        .await
        .unwrap_or_else(|_| panic!("Jaeger at {base} did not answer GET {path} within {QUERY_TIMEOUT:?}"))
        .unwrap_or_else(|e| panic!("GET {base}{path}: {e}"));
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, body.to_string())
}

/// One span of a trace, as Jaeger's query API shows it.
#[derive(Debug, Clone)]
struct Span {
    id: String,
    /// The CHILD_OF reference, if any.
    parent: Option<String>,
    service: String,
    operation: String,
    tags: HashMap<String, String>,
}

/// The spans of trace `trace_id` stored so far (none: not found yet).
async fn trace(base: &str, trace_id: &str) -> Vec<Span> {
    let (status, body) = query(base, &format!("/api/traces/{trace_id}")).await;
    if status == 404 {
        return Vec::new();
    }
    assert_eq!(status, 200, "Jaeger's answer for trace {trace_id}: {body}");
    let json: Value =
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("Jaeger's answer is not JSON ({e}): {body}"));
    let Some(trace) = json["data"].as_array().and_then(|d| d.first()) else { return Vec::new() };
    let processes = &trace["processes"];
    trace["spans"]
        .as_array()
        .expect("a trace's spans")
        .iter()
        .map(|s| Span {
            id: s["spanID"].as_str().expect("spanID").to_string(),
            parent: s["references"].as_array().and_then(|refs| {
                refs.iter()
                    .find(|r| r["refType"] == "CHILD_OF")
                    .map(|r| r["spanID"].as_str().expect("a reference's spanID").to_string())
            }),
            service: processes[s["processID"].as_str().expect("processID")]["serviceName"]
                .as_str()
                .expect("serviceName")
                .to_string(),
            operation: s["operationName"].as_str().expect("operationName").to_string(),
            tags: s["tags"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|t| {
                    let value = match &t["value"] {
                        Value::String(s) => s.clone(),
                        other => other.to_string(),
                    };
                    (t["key"].as_str().unwrap_or_default().to_string(), value)
                })
                .collect(),
        })
        .collect()
}

/// The services Jaeger has received spans from.
async fn services(base: &str) -> HashSet<String> {
    let (status, body) = query(base, "/api/services").await;
    assert_eq!(status, 200, "Jaeger's services: {body}");
    let json: Value = serde_json::from_str(&body).expect("services as JSON");
    json["data"].as_array().into_iter().flatten().filter_map(|s| s.as_str().map(str::to_string)).collect()
}

/// The processes of one run, each exporting under its own service name.
struct Names {
    app: String,
    coordinator: String,
    a: String,
    b: String,
}

/// Asks Jaeger for the trace until `complete` says it is whole (bounded by [`TRACE_WAIT`]).
async fn wait_for_trace(base: &str, trace_id: &str, what: &str, complete: impl Fn(&[Span]) -> bool) -> Vec<Span> {
    let deadline = tokio::time::Instant::now() + TRACE_WAIT;
    loop {
        let spans = trace(base, trace_id).await;
        if complete(&spans) {
            return spans;
        }
        if tokio::time::Instant::now() >= deadline {
            let shown: Vec<String> =
                spans.iter().map(|s| format!("{} {} {:?}", s.service, s.operation, s.tags)).collect();
            panic!("trace {trace_id} ({what}) is incomplete after {TRACE_WAIT:?}; it holds:\n{}", shown.join("\n"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn find<'a>(spans: &'a [Span], service: &str, operation: &str) -> Vec<&'a Span> {
    spans.iter().filter(|s| s.service == service && s.operation == operation).collect()
}

fn by_id<'a>(spans: &'a [Span], id: &str) -> &'a Span {
    spans.iter().find(|s| s.id == id).unwrap_or_else(|| panic!("span {id} is not in the trace"))
}

/// The spans one committed two-participant transaction must leave in its trace, `entry` being
/// how the application's calls reached the coordinator (unary or pipelined, named the same).
fn whole(spans: &[Span], n: &Names, app_operation: &str) -> bool {
    let has = |service: &str, operation: &str| !find(spans, service, operation).is_empty();
    let per_resource = |operation: &str| {
        let resources: HashSet<&str> = find(spans, &n.coordinator, operation)
            .iter()
            .filter_map(|s| s.tags.get("resource").map(String::as_str))
            .collect();
        resources.contains("db1") && resources.contains("db2")
    };
    has(&n.app, app_operation)
        && has(&n.coordinator, "pledge.v1.Coordinator/Begin")
        && has(&n.coordinator, "pledge.v1.Coordinator/Commit")
        && has(&n.coordinator, "Commit")
        && has(&n.coordinator, "decide")
        && has(&n.coordinator, "decision_log.sync")
        && per_resource("participant.prepare")
        && per_resource("participant.phase2")
        && [&n.a, &n.b].iter().all(|p| {
            has(p, "pledge.v1.ReferenceStore/Put")
                && has(p, "pledge.v1.Participant/Prepare")
                && has(p, "pledge.v1.Participant/Commit")
                && has(p, "prepare")
                && has(p, "commit")
        })
}

/// The links of a whole trace: the application's span is the root (its parent the chosen
/// caller); every other span's parent is in the trace, and the spans hang where they belong.
fn check_parents(spans: &[Span], n: &Names, chosen: &Chosen, app_operation: &str) {
    let ids: HashSet<&str> = spans.iter().map(|s| s.id.as_str()).collect();
    let app = find(spans, &n.app, app_operation);
    assert_eq!(app.len(), 1, "one application span: {app:?}");
    assert_eq!(
        app[0].parent.as_deref(),
        Some(chosen.caller_span.as_str()),
        "the application's span is the caller's child"
    );
    for s in spans.iter().filter(|s| s.id != app[0].id) {
        let parent =
            s.parent.as_deref().unwrap_or_else(|| panic!("{} {} has no parent: {s:?}", s.service, s.operation));
        assert!(ids.contains(parent), "{} {}: its parent {parent} is not in the trace", s.service, s.operation);
    }
    let parent_of = |s: &Span| by_id(spans, s.parent.as_deref().expect("a parent")).clone();
    let parent_is = |s: &Span, service: &str, operation: &str| {
        let p = parent_of(s);
        assert!(
            p.service == service && p.operation == operation,
            "{} {}: parent is {} {}, expected {service} {operation}",
            s.service,
            s.operation,
            p.service,
            p.operation
        );
    };
    // The coordinator: its call spans under the application's; the commit's work under it.
    for call in ["pledge.v1.Coordinator/Begin", "pledge.v1.Coordinator/Commit"] {
        for s in find(spans, &n.coordinator, call) {
            parent_is(s, &n.app, app_operation);
        }
    }
    for s in find(spans, &n.coordinator, "Commit") {
        parent_is(s, &n.coordinator, "pledge.v1.Coordinator/Commit");
    }
    for s in find(spans, &n.coordinator, "decide") {
        parent_is(s, &n.coordinator, "Commit");
        assert_eq!(s.tags.get("decision").map(String::as_str), Some("commit"), "{s:?}");
    }
    for s in find(spans, &n.coordinator, "decision_log.sync") {
        parent_is(s, &n.coordinator, "Commit");
    }
    for s in find(spans, &n.coordinator, "participant.prepare") {
        parent_is(s, &n.coordinator, "decide");
    }
    for s in find(spans, &n.coordinator, "participant.phase2") {
        parent_is(s, &n.coordinator, "Commit");
    }
    // Each participant: its calls under the coordinator's call to it (for its resource), the
    // application's work under the application's span.
    for (service, resource) in [(&n.a, "db1"), (&n.b, "db2")] {
        for (call, caller) in [
            ("pledge.v1.Participant/Prepare", "participant.prepare"),
            ("pledge.v1.Participant/Commit", "participant.phase2"),
        ] {
            let calls = find(spans, service, call);
            assert!(!calls.is_empty(), "{service} {call}");
            for s in calls {
                let p = parent_of(s);
                assert_eq!((p.service.as_str(), p.operation.as_str()), (n.coordinator.as_str(), caller), "{s:?}");
                assert_eq!(p.tags.get("resource").map(String::as_str), Some(resource), "{p:?}");
            }
        }
        for s in find(spans, service, "prepare") {
            parent_is(s, service, "pledge.v1.Participant/Prepare");
        }
        for s in find(spans, service, "commit") {
            parent_is(s, service, "pledge.v1.Participant/Commit");
        }
        for s in find(spans, service, "pledge.v1.ReferenceStore/Put") {
            parent_is(s, &n.app, app_operation);
        }
    }
}

async fn put(p: &Process, gtid: &str, branch: &str, key: &str, value: &str) {
    let mut store = ReferenceStoreClient::new(p.channel().await);
    let request = v1::PutRequest { gtid: gtid.into(), branch_id: branch.into(), key: key.into(), value: value.into() };
    // The application's work carries its trace context too.
    store.put(telemetry::with_trace_context(tonic::Request::new(request))).await.expect("put");
}

fn branches() -> Vec<v1::BranchRef> {
    [("db1", "debit"), ("db2", "credit")]
        .into_iter()
        .map(|(r, b)| v1::BranchRef { resource_id: r.into(), branch_id: b.into(), ..Default::default() })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_spans_the_application_the_coordinator_and_both_participants() {
    let (otlp, query_api) = jaeger();
    let run = random_hex(4);
    let n = Names {
        app: application(&otlp).to_string(),
        coordinator: format!("pledge-coordinator-{run}"),
        a: format!("pledge-participant-a-{run}"),
        b: format!("pledge-participant-b-{run}"),
    };
    let dir = TestDir::new("tracing");
    let (env_a, env_b) = (export_env(Some(&otlp), &n.a), export_env(Some(&otlp), &n.b));
    let p1 = dir.participant("db1", 0, &[], &as_env(&env_a)).await;
    let p2 = dir.participant("db2", 0, &[], &as_env(&env_b)).await;
    let env_c = export_env(Some(&otlp), &n.coordinator);
    let coordinator = dir.coordinator(&[("db1", &p1), ("db2", &p2)], &as_env(&env_c)).await;
    for p in [&p1, &p2, &coordinator] {
        assert!(p.log().contains("exporting traces over OTLP"), "export is on:\n{}", p.log_tail());
    }

    // Unary: Begin, the work at both participants, Commit, each a call of its own.
    let unary = Chosen::new();
    let span = unary.span("app.unary");
    async {
        let client = ClusterClient::new(vec![coordinator.endpoint()]).unwrap();
        let begun = client.begin(v1::BeginRequest { branches: branches(), ..Default::default() }).await.unwrap();
        put(&p1, &begun.gtid, "debit", "alice", "90").await;
        put(&p2, &begun.gtid, "credit", "bob", "110").await;
        let committed =
            client.commit(v1::CommitRequest { gtid: begun.gtid, wait_for_completion: true, ..Default::default() });
        let r = committed.await.unwrap();
        assert_eq!((r.outcome(), r.completed), (v1::Outcome::Committed, true));
    }
    .instrument(span)
    .await;

    // Pipelined: Begin and Commit on the coordinator's pipeline stream, each call carrying its
    // own trace context.
    let pipelined = Chosen::new();
    let span = pipelined.span("app.pipelined");
    async {
        let pipeline = CoordinatorPipeline::new(coordinator.channel().await, Duration::from_secs(30));
        let begun = pipeline.begin(v1::BeginRequest { branches: branches(), ..Default::default() }).await.unwrap();
        put(&p1, &begun.gtid, "debit", "carol", "5").await;
        put(&p2, &begun.gtid, "credit", "dave", "6").await;
        let r = pipeline
            .commit(v1::CommitRequest { gtid: begun.gtid, wait_for_completion: true, ..Default::default() })
            .await
            .unwrap();
        assert_eq!((r.outcome(), r.completed), (v1::Outcome::Committed, true));
    }
    .instrument(span)
    .await;
    telemetry::flush();

    for (chosen, operation) in [(&unary, "app.unary"), (&pipelined, "app.pipelined")] {
        let spans = wait_for_trace(&query_api, &chosen.trace_id, operation, |s| whole(s, &n, operation)).await;
        check_parents(&spans, &n, chosen, operation);
    }
}

/// Export is off unless asked for: a coordinator and a participant started without an endpoint
/// send nothing, though the application's calls to them carry its trace context (and its own
/// spans of the same trace reach Jaeger, which is how the test knows it waited long enough).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_without_an_endpoint_send_nothing() {
    let (otlp, query_api) = jaeger();
    let run = random_hex(4);
    let app = application(&otlp);
    let (off_coordinator, off_participant) =
        (format!("pledge-off-coordinator-{run}"), format!("pledge-off-participant-{run}"));
    let dir = TestDir::new("tracing-off");
    let (env_p, env_c) = (export_env(None, &off_participant), export_env(None, &off_coordinator));
    let mut p1 = dir.participant("db1", 0, &[], &as_env(&env_p)).await;
    let mut coordinator = dir.coordinator(&[("db1", &p1)], &as_env(&env_c)).await;

    let chosen = Chosen::new();
    let span = chosen.span("app.off");
    async {
        let client = ClusterClient::new(vec![coordinator.endpoint()]).unwrap();
        let refs = vec![v1::BranchRef { resource_id: "db1".into(), branch_id: "b".into(), ..Default::default() }];
        let begun = client.begin(v1::BeginRequest { branches: refs, ..Default::default() }).await.unwrap();
        put(&p1, &begun.gtid, "b", "k", "v").await;
        let committed =
            client.commit(v1::CommitRequest { gtid: begun.gtid, wait_for_completion: true, ..Default::default() });
        assert_eq!(committed.await.unwrap().outcome(), v1::Outcome::Committed);
    }
    .instrument(span)
    .await;
    // A clean stop: a process that exported would send its queued spans now.
    for p in [&mut coordinator, &mut p1] {
        assert!(p.terminate().await.success());
        assert!(!p.log().contains("exporting traces"), "export is off:\n{}", p.log_tail());
    }
    // Only now the application's span: once Jaeger has it, it has whatever the others sent
    // before they exited (it stores a span before it answers the export).
    telemetry::flush();
    let spans = wait_for_trace(&query_api, &chosen.trace_id, "the application's span", |s| !s.is_empty()).await;
    let senders: HashSet<&str> = spans.iter().map(|s| s.service.as_str()).collect();
    assert_eq!(senders, HashSet::from([app]), "only the application exported: {spans:?}");
    let known = services(&query_api).await;
    assert!(known.contains(app), "Jaeger lists the application: {known:?}");
    for silent in [&off_coordinator, &off_participant] {
        assert!(!known.contains(silent), "{silent} sent spans with export off");
    }
}

/// A collector that does not answer costs no transaction, and one log line per process: the
/// failed exports are counted (`pledge_trace_export_failures_total`), which is how the test
/// knows the exporters kept trying.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_collector_costs_no_transaction_and_logs_once() {
    // A port nothing listens on (bound, then released).
    let dead = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", listener.local_addr().unwrap())
    };
    let dir = TestDir::new("tracing-dead");
    let metrics = ["--metrics-listen", "127.0.0.1:0"];
    let env_p = export_env(Some(&dead), "pledge-dead-participant");
    let p1 = dir.participant("db1", 0, &metrics, &as_env(&env_p)).await;
    let env_c = export_env(Some(&dead), "pledge-dead-coordinator");
    let coordinator = dir.coordinator_with(&[("db1", &p1)], &metrics, &as_env(&env_c)).await;
    let client = ClusterClient::new(vec![coordinator.endpoint()]).unwrap();

    // Transactions, one after another, until each process has failed at least three exports.
    const FAILURES: f64 = 3.0;
    let deadline = tokio::time::Instant::now() + TRACE_WAIT;
    let mut committed = 0;
    loop {
        let refs = vec![v1::BranchRef { resource_id: "db1".into(), branch_id: "b".into(), ..Default::default() }];
        let begun = client.begin(v1::BeginRequest { branches: refs, ..Default::default() }).await.unwrap();
        put(&p1, &begun.gtid, "b", &format!("k{committed}"), "v").await;
        let r = client.commit(v1::CommitRequest { gtid: begun.gtid, wait_for_completion: true, ..Default::default() });
        assert_eq!(r.await.unwrap().outcome(), v1::Outcome::Committed);
        committed += 1;
        let failures = |m: Metrics| m.value(telemetry::EXPORT_FAILURES).unwrap_or(0.0);
        let (at_p1, at_coordinator) = (failures(p1.metrics().await), failures(coordinator.metrics().await));
        if at_p1 >= FAILURES && at_coordinator >= FAILURES {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "after {committed} transactions in {TRACE_WAIT:?}, failed exports: participant {at_p1}, coordinator \
             {at_coordinator}; expected {FAILURES} each"
        );
    }
    for p in [&p1, &coordinator] {
        let logged = p.log().matches("trace export failed").count();
        assert_eq!(logged, 1, "the failure is logged once per outage, not per export:\n{}", p.log_tail());
    }
}

/// A call forwarded within a cluster stays in its trace: the owner's span for it is a child of
/// the span of the instance that forwarded it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_call_joins_the_callers_trace() {
    use pledge_integration_tests::cluster::StoreView;
    use pledge_integration_tests::cluster::fresh_database;

    let (otlp, query_api) = jaeger();
    let app = application(&otlp);
    let run = random_hex(4);
    let (service_a, service_b) = (format!("pledge-instance-a-{run}"), format!("pledge-instance-b-{run}"));
    let dir = TestDir::new("tracing-cluster");
    let store_url = fresh_database("tracing").await;
    let cluster_id = format!("trace-{run}");
    let (env_a, env_b) = (export_env(Some(&otlp), &service_a), export_env(Some(&otlp), &service_b));
    let a = dir.cluster_instance_with_env("a", &store_url, &cluster_id, &[], &[], &as_env(&env_a)).await;
    let b = dir.cluster_instance_with_env("b", &store_url, &cluster_id, &[], &[], &as_env(&env_b)).await;
    let store = StoreView::connect(&store_url).await;
    let ids = [store.instance_id(&a).await, store.instance_id(&b).await];
    store.wait_owned_evenly_by(&ids, Duration::from_secs(30)).await;

    // A transaction of b's (begun there: b issues GTIDs in its own shards), asked about at a.
    let mut at_b = v1::coordinator_client::CoordinatorClient::new(b.channel().await);
    let gtid = at_b.begin(v1::BeginRequest::default()).await.unwrap().into_inner().gtid;
    let chosen = Chosen::new();
    let span = chosen.span("app.forwarded");
    let answered = async {
        let mut at_a = v1::coordinator_client::CoordinatorClient::new(a.channel().await);
        at_a.get(telemetry::with_trace_context(tonic::Request::new(v1::GetRequest { gtid }))).await.unwrap()
    }
    .instrument(span)
    .await;
    let owner = answered.metadata().get("pledge-owner").and_then(|v| v.to_str().ok()).map(str::to_string);
    assert_eq!(owner, Some(b.endpoint()), "the call was forwarded to b");
    telemetry::flush();

    let get = "pledge.v1.Coordinator/Get";
    let spans = wait_for_trace(&query_api, &chosen.trace_id, "a forwarded Get", |s| {
        !find(s, &service_a, get).is_empty() && !find(s, &service_b, get).is_empty()
    })
    .await;
    let (at_a, at_b) = (find(&spans, &service_a, get)[0], find(&spans, &service_b, get)[0]);
    let app_span = find(&spans, app, "app.forwarded")[0];
    assert_eq!(at_a.parent.as_deref(), Some(app_span.id.as_str()), "a's span is the application's child");
    assert_eq!(at_b.parent.as_deref(), Some(at_a.id.as_str()), "b's span is a's child: {spans:?}");
}
