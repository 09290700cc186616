//! An exactly-once pipeline through Pledge: consume from topic A, write a row to PostgreSQL,
//! produce to topic B, and commit the consumed offsets, all in one global transaction.
//!
//! The consumed offsets are committed by the Kafka branch, so they advance if and only if the
//! row and the output record commit. After a crash anywhere, the pipeline starts again from the
//! committed offset: everything after it was either never committed anywhere (it is redone) or
//! committed everywhere (it is not seen again). While a decided transaction is still finishing
//! phase 2, its offsets are "unstable" and the consumer waits for them (KIP-447), so a restart
//! cannot read the old offset of a transaction that is about to commit.
//!
//! ```sh
//! cargo run -p pledge-kafka --example exactly_once_pipeline -- \
//!   --coordinator http://127.0.0.1:7600 --kafka-adapter http://127.0.0.1:7901 \
//!   --postgres-adapter http://127.0.0.1:7801 --bootstrap 127.0.0.1:59092 \
//!   --input in --output out --group pipeline --table processed
//! ```
//! The table needs (topic text, part int, off bigint, payload text). Prints `processed N` after
//! every committed batch.

use std::time::Duration;

use clap::Parser;
use pledge_proto::v1::{self, coordinator_client::CoordinatorClient, value::Kind};
use pledge_proto::v1::{kafka_branch_client::KafkaBranchClient, postgres_branch_client::PostgresBranchClient};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use tonic::transport::Channel;

#[derive(Parser, Debug)]
struct Args {
    #[arg(long)]
    coordinator: String,
    #[arg(long)]
    kafka_adapter: String,
    #[arg(long)]
    postgres_adapter: String,
    #[arg(long)]
    bootstrap: String,
    #[arg(long)]
    input: String,
    #[arg(long)]
    output: String,
    #[arg(long)]
    group: String,
    #[arg(long)]
    table: String,
    /// Resource ids of the two participants, as the coordinator knows them.
    #[arg(long, default_value = "kafka")]
    kafka_resource: String,
    #[arg(long, default_value = "db")]
    postgres_resource: String,
    /// Messages per global transaction.
    #[arg(long, default_value_t = 10)]
    batch: usize,
    /// Transaction timeout, ms: an abandoned transaction (crash) holds the group's offsets
    /// unstable until the coordinator aborts it.
    #[arg(long, default_value_t = 5_000)]
    txn_timeout_ms: u64,
}

struct Clients {
    coordinator: CoordinatorClient<Channel>,
    kafka: KafkaBranchClient<Channel>,
    postgres: PostgresBranchClient<Channel>,
}

fn consumer(args: &Args) -> anyhow::Result<BaseConsumer> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &args.bootstrap)
        .set("group.id", &args.group)
        // Offsets move only with the Kafka branch of a committed transaction.
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        // Only committed input; also makes offset fetches wait for pending transactional ones.
        .set("isolation.level", "read_committed")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&args.input, 0, Offset::Stored)?;
    consumer.assign(&tpl)?;
    Ok(consumer)
}

/// One global transaction for `batch` (offset, key, value) messages. On failure the
/// transaction is aborted (if it still can be), so it holds nothing while the batch is redone.
async fn process(args: &Args, c: &mut Clients, batch: &[(i64, String, String)]) -> anyhow::Result<()> {
    let (kafka, db) = (args.kafka_resource.as_str(), args.postgres_resource.as_str());
    let gtid = c
        .coordinator
        .begin(v1::BeginRequest {
            timeout_ms: Some(args.txn_timeout_ms),
            idempotency_key: String::new(),
            protocol: v1::Protocol::TwoPhase as i32,
            branches: vec![
                v1::BranchRef { resource_id: db.into(), branch_id: "rows".into(), may_be_empty: false },
                v1::BranchRef { resource_id: kafka.into(), branch_id: "out".into(), may_be_empty: false },
            ],
        })
        .await?
        .into_inner()
        .gtid;
    let result = work(args, c, &gtid, batch).await;
    if result.is_err() {
        // Best effort: an abort after the decision is refused (and changes nothing), and a
        // transaction nobody aborts ends at its timeout.
        let _ = c.coordinator.abort(v1::AbortRequest { gtid }).await;
    }
    result
}

async fn work(args: &Args, c: &mut Clients, gtid: &str, batch: &[(i64, String, String)]) -> anyhow::Result<()> {
    let (kafka, db) = (args.kafka_resource.as_str(), args.postgres_resource.as_str());
    let gtid = gtid.to_string();
    let insert = format!("INSERT INTO {} (topic, part, off, payload) VALUES ($1, 0, $2, $3)", args.table);
    let text = |s: &str| v1::Value { kind: Some(Kind::Text(s.into())) };
    let statements = batch
        .iter()
        .map(|(offset, _, value)| v1::Statement {
            sql: insert.clone(),
            params: vec![text(&args.input), v1::Value { kind: Some(Kind::Int(*offset)) }, text(value)],
        })
        .collect();
    c.postgres
        .execute(v1::ExecuteRequest {
            resource_id: db.into(),
            gtid: gtid.clone(),
            branch_id: "rows".into(),
            statements,
            request_id: String::new(),
        })
        .await?;
    let records = batch
        .iter()
        .map(|(_, key, value)| v1::KafkaRecord {
            topic: args.output.clone(),
            partition: Some(0),
            key: key.as_bytes().to_vec(),
            value: value.to_uppercase().into_bytes(),
            headers: vec![],
        })
        .collect();
    c.kafka
        .produce(v1::ProduceRequest {
            resource_id: kafka.into(),
            gtid: gtid.clone(),
            branch_id: "out".into(),
            records,
            request_id: String::new(),
        })
        .await?;
    let next = batch.last().map(|(o, _, _)| o + 1).unwrap_or_default();
    c.kafka
        .add_offsets(v1::AddOffsetsRequest {
            resource_id: kafka.into(),
            gtid: gtid.clone(),
            branch_id: "out".into(),
            group_id: args.group.clone(),
            offsets: vec![v1::TopicPartitionOffset { topic: args.input.clone(), partition: 0, offset: next }],
        })
        .await?;
    let r = c
        .coordinator
        .commit(v1::CommitRequest { gtid: gtid.clone(), branches: vec![], wait_for_completion: true })
        .await?
        .into_inner();
    anyhow::ensure!(r.outcome() == v1::Outcome::Committed, "transaction {gtid} aborted: {}", r.reason);
    // A heuristic outcome means some participant did not follow the decision: an operator must
    // look at it; this pipeline stops rather than carry on as if all was well.
    anyhow::ensure!(!r.heuristic, "transaction {gtid} committed with a heuristic outcome; see `pledge txn get {gtid}`");
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut clients = Clients {
        coordinator: CoordinatorClient::connect(args.coordinator.clone()).await?,
        kafka: KafkaBranchClient::connect(args.kafka_adapter.clone()).await?,
        postgres: PostgresBranchClient::connect(args.postgres_adapter.clone()).await?,
    };
    let mut processed = 0u64;
    loop {
        // (Re)start from the group's committed offset.
        let source = consumer(&args)?;
        loop {
            let mut batch = Vec::with_capacity(args.batch);
            while batch.len() < args.batch {
                let timeout = if batch.is_empty() { Duration::from_secs(1) } else { Duration::from_millis(20) };
                let message = tokio::task::block_in_place(|| source.poll(timeout));
                match message {
                    Some(Ok(m)) => batch.push((
                        m.offset(),
                        String::from_utf8_lossy(m.key().unwrap_or_default()).to_string(),
                        String::from_utf8_lossy(m.payload().unwrap_or_default()).to_string(),
                    )),
                    Some(Err(e)) => eprintln!("consuming: {e}"),
                    None => break,
                }
            }
            if batch.is_empty() {
                continue;
            }
            match process(&args, &mut clients, &batch).await {
                Ok(()) => {
                    processed += batch.len() as u64;
                    println!("processed {processed}");
                }
                Err(e) if e.to_string().contains("heuristic outcome") => return Err(e),
                Err(e) => {
                    // Either the batch took effect everywhere (its offsets moved on) or nowhere:
                    // read again from the committed offset, which says which.
                    eprintln!("batch failed, starting again from the committed offset: {e}");
                    break;
                }
            }
        }
    }
}
