//! The exactly-once pipeline example (participant-adapters/kafka/examples): consume from topic
//! A, write to PostgreSQL, produce to topic B, offsets committed in the Kafka branch. It is
//! killed with SIGKILL at random points and restarted; in the end every input message is
//! reflected exactly once in PostgreSQL and in B (read_committed).

use std::process::Stdio;
use std::time::Duration;

use pledge_integration_tests::*;
use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const MESSAGES: i64 = 300;

/// Starts the pipeline; its progress ("processed N") is published on the returned channel.
fn start_pipeline(args: &[String], log: &std::path::Path) -> (Child, tokio::sync::watch::Receiver<u64>) {
    let mut child = Command::new(bin_dir().join("examples").join("exactly_once_pipeline"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .expect("the pipeline example is built by `cargo test` (target/<profile>/examples)");
    let (tx, rx) = tokio::sync::watch::channel(0);
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(n) = line.strip_prefix("processed ").and_then(|n| n.parse().ok()) {
                let _ = tx.send(n);
            }
        }
    });
    (child, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_input_is_reflected_exactly_once_despite_kill_9_at_random_points() {
    let dir = TestDir::new("pipeline");
    let suffix = format!("{:08x}", fastrand::u32(..));
    let (input, output, group, table) =
        (format!("in-{suffix}"), format!("out-{suffix}"), format!("pipeline-{suffix}"), format!("processed_{suffix}"));
    let db = sqlx::PgPool::connect(&pg_url('a')).await.unwrap();
    let ddl =
        format!("CREATE TABLE {table} (topic text NOT NULL, part int NOT NULL, off bigint NOT NULL, payload text)");
    sqlx::query(sqlx::AssertSqlSafe(ddl)).execute(&db).await.unwrap();

    let producer: FutureProducer = ClientConfig::new().set("bootstrap.servers", kafka_bootstrap()).create().unwrap();
    for i in 0..MESSAGES {
        let (key, value) = (format!("m-{i}"), format!("payload-{i}"));
        producer
            .send(FutureRecord::to(&input).partition(0).key(&key).payload(&value), Duration::from_secs(10))
            .await
            .unwrap();
    }

    let kafka = dir.kafka_adapter("kafka", 0, &format!("pipeline-{suffix}"), &[], &[]).await;
    let pg = dir.postgres_adapter("pg", 0, &[("db", pg_url('a'))], &[], &[]).await;
    let coordinator = dir.coordinator(&[("kafka", &kafka), ("db", &pg)], &[]).await;
    let args: Vec<String> = [
        ("--coordinator", coordinator.endpoint()),
        ("--kafka-adapter", kafka.endpoint()),
        ("--postgres-adapter", pg.endpoint()),
        ("--bootstrap", kafka_bootstrap()),
        ("--input", input.clone()),
        ("--output", output.clone()),
        ("--group", group),
        ("--table", table.clone()),
        ("--batch", "7".into()),
    ]
    .into_iter()
    .flat_map(|(k, v)| [k.to_string(), v])
    .collect();
    let log = dir.path().join("pipeline.log");

    // Three kills at random points, each after the run in progress has committed something.
    for kill in 0..3 {
        let (mut child, mut progress) = start_pipeline(&args, &log);
        progress.wait_for(|n| *n > 0).await.unwrap_or_else(|_| panic!("pipeline run {kill} made no progress"));
        tokio::time::sleep(Duration::from_millis(fastrand::u64(0..300))).await;
        child.start_kill().unwrap();
        child.wait().await.unwrap();
    }
    let (_child, _progress) = start_pipeline(&args, &log);

    let count = format!("SELECT count(*) FROM {table}");
    eventually("every input message in PostgreSQL", || async {
        let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(count.clone())).fetch_one(&db).await.unwrap();
        (n >= MESSAGES).then_some(())
    })
    .await;
    let per_offset = format!("SELECT off, count(*) FROM {table} GROUP BY off HAVING count(*) <> 1");
    let duplicated: Vec<(i64, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(per_offset)).fetch_all(&db).await.unwrap();
    assert!(duplicated.is_empty(), "inputs written more than once: {duplicated:?}");
    let distinct: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT count(DISTINCT off) FROM {table}")))
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(distinct, MESSAGES);

    // A transaction the kills abandoned keeps its records on B open (and read_committed readers
    // stop before them) until the coordinator aborts it at its timeout.
    let out = eventually("every output record readable", || async {
        let out = read_committed(&output).await;
        (out.len() as i64 >= MESSAGES).then_some(out)
    })
    .await;
    let mut keys: Vec<&str> = out.iter().map(|(k, _)| k.as_str()).collect();
    keys.sort();
    let mut want: Vec<String> = (0..MESSAGES).map(|i| format!("m-{i}")).collect();
    want.sort();
    assert_eq!(keys, want, "output topic: every input exactly once");
    assert!(out.iter().all(|(k, v)| v == &format!("PAYLOAD-{}", &k[2..])));
}
