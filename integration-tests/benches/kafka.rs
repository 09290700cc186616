//! Kafka transactions through Pledge beside a plain rdkafka transactional producer doing the
//! same sends, in one invocation with the same number of concurrent clients.
//!
//! * baseline: each client has its own transactional producer and loops begin_transaction,
//!   send one record (and wait for its delivery), commit_transaction;
//! * Pledge, 1 branch: Begin (Kafka branch) -> Produce (the same record) -> Commit (one-phase:
//!   the adapter's producer commits);
//! * Pledge, 2 branches: Begin (PostgreSQL + Kafka) -> Execute (an UPDATE) -> Produce -> Commit
//!   (two-phase: both prepare, the decision is logged, both commit).
//!
//! ```sh
//! bash integration-tests/scripts/services.sh start && eval "$(bash integration-tests/scripts/services.sh env)"
//! cargo build --release -p pledge-coordinator -p pledge-postgres -p pledge-kafka --bins
//! cargo bench -p pledge-integration-tests --bench kafka
//! ```
//! Settings (environment): BENCH_CLIENTS (1,8), BENCH_SECONDS (10).

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use pledge_integration_tests::bench::{Load, Run, env_or, measure, report_error};
use pledge_integration_tests::{Process, TestDir, branch, kafka_bootstrap, pg_url};
use pledge_proto::pipeline::CoordinatorPipeline;
use pledge_proto::v1::kafka_branch_client::KafkaBranchClient;
use pledge_proto::v1::postgres_branch_client::PostgresBranchClient;
use pledge_proto::v1::{self, value::Kind};
use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use tonic::transport::{Channel, Endpoint};

/// The benchmark's coordinator id: its GIDs are `pledge:bench-kafka:...`.
const COORDINATOR_ID: &str = "bench-kafka";

fn line(run: &Run, name: &str, baseline: Option<f64>) -> String {
    format!(
        "  {name:<28} {:>8.0} txn/s   p50 {:>6.2} ms   p99 {:>6.2} ms{}{}",
        run.rate(),
        run.ms(0.5),
        run.ms(0.99),
        baseline.map(|b| format!("   ratio {:.2}", run.rate() / b)).unwrap_or_default(),
        if run.errors > 0 { format!("   ({} errors)", run.errors) } else { String::new() }
    )
}

fn load(clients: usize, seconds: u64) -> Load {
    Load { clients, warmup: Duration::from_secs(1), measure: Duration::from_secs(seconds), rate_per_second: 0 }
}

async fn baseline(clients: usize, seconds: u64, topic: &str, run_id: u32) -> Run {
    let mut producers = Vec::new();
    for i in 0..clients {
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", kafka_bootstrap())
            .set("transactional.id", format!("bench-baseline-{run_id}-{i}"))
            .set("linger.ms", "1")
            .create()
            .unwrap();
        let producer = Arc::new(producer);
        let p = producer.clone();
        tokio::task::spawn_blocking(move || p.init_transactions(Duration::from_secs(30))).await.unwrap().unwrap();
        producers.push(producer);
    }
    let topic = topic.to_string();
    measure(load(clients, seconds), |i| {
        let (producer, topic) = (producers[i].clone(), topic.clone());
        move || {
            let (producer, topic) = (producer.clone(), topic.clone());
            Box::pin(async move {
                let p = producer.clone();
                if tokio::task::spawn_blocking(move || p.begin_transaction()).await.unwrap().is_err() {
                    return false;
                }
                let sent = producer
                    .send(FutureRecord::to(&topic).partition(0).key("k").payload("value"), Duration::from_secs(10))
                    .await
                    .is_ok();
                let p = producer.clone();
                let committed =
                    tokio::task::spawn_blocking(move || p.commit_transaction(Duration::from_secs(10))).await.unwrap();
                sent && committed.is_ok()
            }) as BoxFuture<'static, bool>
        }
    })
    .await
}

#[derive(Clone)]
struct Pledge {
    /// Begin, Commit and Abort on the coordinator's pipeline stream.
    coordinator: CoordinatorPipeline,
    kafka: Channel,
    pg: Channel,
    topic: String,
    update: String,
}

impl Pledge {
    /// One transaction; on failure it is aborted (so it holds nothing) and `false` returned.
    async fn txn(self, with_postgres: bool) -> bool {
        let c = self.coordinator.clone();
        let mut branches = vec![branch("kafka", "out")];
        if with_postgres {
            branches.push(branch("db", "row"));
        }
        let Ok(r) = c.begin(v1::BeginRequest { branches, ..Default::default() }).await else { return false };
        let gtid = r.gtid;
        match self.work(&c, &gtid, with_postgres).await {
            Ok(committed) => committed,
            Err(e) => {
                report_error(format_args!("{:?}: {}", e.code(), e.message()));
                let _ = c.abort(v1::AbortRequest { gtid }).await;
                false
            }
        }
    }

    async fn work(self, c: &CoordinatorPipeline, gtid: &str, with_postgres: bool) -> Result<bool, tonic::Status> {
        if with_postgres {
            PostgresBranchClient::new(self.pg)
                .execute(v1::ExecuteRequest {
                    resource_id: "db".into(),
                    gtid: gtid.into(),
                    branch_id: "row".into(),
                    statements: vec![v1::Statement {
                        sql: self.update,
                        params: vec![v1::Value { kind: Some(Kind::Int(fastrand::i64(1..=1000))) }],
                    }],
                    request_id: String::new(),
                })
                .await?;
        }
        KafkaBranchClient::new(self.kafka)
            .produce(v1::ProduceRequest {
                resource_id: "kafka".into(),
                gtid: gtid.into(),
                branch_id: "out".into(),
                records: vec![v1::KafkaRecord {
                    topic: self.topic,
                    partition: Some(0),
                    key: b"k".to_vec(),
                    value: b"value".to_vec(),
                    headers: vec![],
                }],
                request_id: String::new(),
            })
            .await?;
        let r = c.commit(v1::CommitRequest { gtid: gtid.into(), ..Default::default() }).await?;
        let committed = r.outcome() == v1::Outcome::Committed;
        if !committed {
            report_error(format_args!("{:?}: {}", r.outcome(), r.reason));
        }
        Ok(committed)
    }
}

async fn channel(p: &Process) -> Channel {
    Endpoint::from_shared(p.endpoint()).unwrap().connect().await.unwrap()
}

fn main() {
    let clients: Vec<usize> = env_or("BENCH_CLIENTS", "1,8".to_string())
        .split(',')
        .map(|c| c.trim().parse().expect("BENCH_CLIENTS: comma-separated client counts"))
        .collect();
    let seconds: u64 = env_or("BENCH_SECONDS", 10);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let run_id = fastrand::u32(..);
        let topic = format!("bench-kafka-{run_id:08x}");
        let table = "pledge_bench_kafka_rows";
        pledge_integration_tests::roll_back_leftovers(COORDINATOR_ID).await;
        let db = sqlx::PgPool::connect(&pg_url('a')).await.unwrap();
        for sql in [
            format!("DROP TABLE IF EXISTS {table}"),
            format!("CREATE TABLE {table} (id int PRIMARY KEY, n bigint NOT NULL)"),
            format!("INSERT INTO {table} SELECT g, 0 FROM generate_series(1, 1000) g"),
        ] {
            sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&db).await.unwrap();
        }
        // A producer stays with its branch until phase 2 ends, after the client has its answer
        // and moved on: two per client keep clients from waiting for one.
        let producers = (2 * clients.iter().max().copied().unwrap_or(1)).to_string();
        let dir = TestDir::new("bench-kafka");
        let kafka = dir
            .kafka_adapter(
                "kafka",
                0,
                &format!("bench-{run_id:08x}"),
                &["--producers", &producers],
                &[("RUST_LOG", "warn")],
            )
            .await;
        let pg = dir.postgres_adapter("pg", 0, &[("db", pg_url('a'))], &[], &[("RUST_LOG", "warn")]).await;
        let coordinator =
            dir.coordinator_with(&[("kafka", &kafka), ("db", &pg)], &["--coordinator-id", COORDINATOR_ID], &[]).await;
        let pledge = Pledge {
            coordinator: CoordinatorPipeline::new(channel(&coordinator).await, Duration::from_secs(30)),
            kafka: channel(&kafka).await,
            pg: channel(&pg).await,
            topic: topic.clone(),
            update: format!("UPDATE {table} SET n = n + 1 WHERE id = $1"),
        };
        println!("Kafka transactions: {seconds} s per run, one 5-byte record per transaction");
        for &n in &clients {
            println!("{n} client(s):");
            let base = baseline(n, seconds, &topic, run_id).await;
            let base_rate = base.rate();
            println!("{}", line(&base, "rdkafka transactional producer", None));
            for (with_postgres, name) in [(false, "Pledge, Kafka (1 branch)"), (true, "Pledge, PostgreSQL + Kafka")] {
                let p = pledge.clone();
                let run = measure(load(n, seconds), move |_| {
                    let p = p.clone();
                    move || Box::pin(p.clone().txn(with_postgres)) as BoxFuture<'static, bool>
                })
                .await;
                println!("{}", line(&run, name, Some(base_rate)));
                pledge_integration_tests::drain(&coordinator).await;
            }
        }
    });
}
