//! `pledge-conformance`: checks a running participant against the participant contract, over
//! gRPC, whatever language it is written in. Exit status 0 when every check passes, 1 when one
//! fails, 2 when the kit itself cannot run.
//!
//! ```sh
//! # The PostgreSQL adapter, serving resource db_a:
//! pledge-conformance --endpoint http://127.0.0.1:7801 --resource db_a --work postgres
//! # Any participant, through its own commands, with kill -9 checks:
//! pledge-conformance --endpoint http://127.0.0.1:9000 --resource orders \
//!     --work-command './work.sh {gtid} {branch} {key}' --visible-command './visible.sh {key}' \
//!     --restart-command 'systemctl kill -s KILL orders-participant && systemctl start orders-participant'
//! ```

use std::time::Duration;

use clap::{Parser, ValueEnum};
use pledge_conformance::drivers::{Driven, Work};
use pledge_conformance::{Options, run};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum WorkKind {
    /// The reference participant's store (Put/Read on the same endpoint).
    Reference,
    /// The PostgreSQL adapter's Execute (on the same endpoint), into --table.
    Postgres,
    /// The Kafka adapter's Produce (on the same endpoint), to --topic, read from --bootstrap.
    Kafka,
    /// --work-command and --visible-command.
    Command,
}

#[derive(Parser, Debug)]
#[command(name = "pledge-conformance", version, about = "Checks a Pledge participant against the participant contract")]
struct Args {
    /// The participant's gRPC endpoint: http://host:port or unix:<path>.
    #[arg(long)]
    endpoint: String,
    /// The resource id it serves (one of them).
    #[arg(long)]
    resource: String,
    /// How to do work in a branch and see it committed.
    #[arg(long, value_enum, default_value = "command")]
    work: WorkKind,
    /// With --work postgres: the table the kit writes into (created if missing).
    #[arg(long, default_value = "pledge_conformance")]
    table: String,
    /// With --work kafka: the topic the kit produces to (partition 0).
    #[arg(long, default_value = "pledge-conformance")]
    topic: String,
    /// With --work kafka: bootstrap servers to read the topic back.
    #[arg(long)]
    bootstrap: Option<String>,
    /// With --work command: does work in a branch; {gtid}, {branch} and {key} are filled in.
    /// Exit 0 when done, anything else when the participant refused it.
    #[arg(long)]
    work_command: Option<String>,
    /// With --work command: exit 0 if the work under {key} is visible (committed), 1 if not.
    #[arg(long)]
    visible_command: Option<String>,
    /// Kills the participant with SIGKILL and starts it again on the same state (run with
    /// `sh -c`); the kit then waits for its health check. Without it the restart checks are
    /// skipped.
    #[arg(long)]
    restart_command: Option<String>,
    /// The coordinator id the kit presents.
    #[arg(long, default_value = "conformance")]
    coordinator_id: String,
    /// Deadline of each call, ms.
    #[arg(long, default_value_t = 30_000)]
    call_timeout_ms: u64,
    /// How long committed work may take to become visible, ms.
    #[arg(long, default_value_t = 30_000)]
    visibility_timeout_ms: u64,
    /// The wait and do-commit timeouts of the three-phase self-deadline checks, ms (long
    /// enough for a Prepare to finish within it).
    #[arg(long, default_value_t = 800)]
    self_deadline_wait_ms: u64,
}

fn main() {
    // Logs at warn; with OTEL_EXPORTER_OTLP_ENDPOINT set, its spans are exported too (see
    // `pledge_proto::telemetry`).
    if let Err(e) = pledge_proto::telemetry::init(pledge_proto::telemetry::Settings::new("pledge-conformance", "warn"))
    {
        eprintln!("error: {e}");
        std::process::exit(2);
    }
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    let checked = runtime.block_on(check(args));
    // `exit` runs no destructors: the queued spans are sent first.
    pledge_proto::telemetry::shutdown();
    match checked {
        Ok(true) => std::process::exit(0),
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(2)
        }
    }
}

async fn check(args: Args) -> anyhow::Result<bool> {
    let work = match args.work {
        WorkKind::Reference => Work::Reference,
        WorkKind::Postgres => Work::Postgres { table: args.table },
        WorkKind::Kafka => Work::Kafka {
            topic: args.topic,
            bootstrap: args.bootstrap.ok_or_else(|| anyhow::anyhow!("--work kafka needs --bootstrap"))?,
        },
        WorkKind::Command => Work::Commands {
            work: args.work_command.ok_or_else(|| anyhow::anyhow!("--work command needs --work-command"))?,
            visible: args.visible_command.ok_or_else(|| anyhow::anyhow!("--work command needs --visible-command"))?,
        },
    };
    let mut target = Driven::new(args.endpoint, args.resource, work, args.restart_command);
    pledge_conformance::drivers::serving(&target.endpoint).await.map_err(anyhow::Error::msg)?;
    target.prepare_work().await.map_err(anyhow::Error::msg)?;
    let options = Options {
        coordinator_id: args.coordinator_id,
        call_timeout: Duration::from_millis(args.call_timeout_ms),
        visibility_timeout: Duration::from_millis(args.visibility_timeout_ms),
        self_deadline_wait: Duration::from_millis(args.self_deadline_wait_ms),
    };
    let report = run(&mut target, &options).await;
    println!("{report}");
    Ok(report.ok())
}
