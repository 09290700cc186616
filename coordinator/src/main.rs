use clap::Parser;
use pledge_coordinator::cli::{self, Cli, Command, LogCommand};
use pledge_proto::telemetry;
use tokio_util::sync::CancellationToken;

/// glibc's malloc costs this service 5-10% of its CPU (its arenas consolidate on the many
/// short-lived buffers of the gRPC stack); mimalloc's thread-local pages do not.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // `serve` reads its configuration before logging starts: it says where traces go. The
    // server logs at info by default and exports traces when configured to; client commands
    // only warn, and export nothing.
    let (command, serve) = match cli.command {
        Command::Serve(args) => match args.into_config() {
            Ok(config) => (None, Some(config)),
            Err(e) => return failed(e),
        },
        command => (Some(command), None),
    };
    let logging = match &serve {
        Some(config) => telemetry::init(
            telemetry::Settings::new("pledge-coordinator", "info").with_otlp_endpoint(config.otlp_endpoint.clone()),
        ),
        None => telemetry::init_logs("warn"),
    };
    if let Err(e) = logging {
        return failed(e.into());
    }
    install_crash_points();

    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let Some(command) = command else {
            let config = serve.expect("serve, when there is no other command");
            return pledge_coordinator::server::serve(config, CancellationToken::new(), true).await;
        };
        match command {
            Command::Serve(_) => unreachable!("taken apart above"),
            Command::Txn { client, command } => cli::txn(client, command).await,
            Command::Participant { client, command } => cli::participant(client, command).await,
            Command::Cluster { command } => cli::cluster(command).await,
            Command::Log { command: LogCommand::Inspect { data_dir } } => cli::log_inspect(data_dir),
            Command::Health(args) => cli::health(args).await,
        }
    });
    // The spans of the last calls, and of the shutdown, go out before the process does.
    telemetry::shutdown();
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => failed(e),
    }
}

/// Ends the process on `e`: logged once, here, where it ends the process.
fn failed(e: anyhow::Error) -> std::process::ExitCode {
    eprintln!("error: {e:#}");
    std::process::ExitCode::from(cli::exit_code(&e))
}

/// With the `failpoints` feature, `PLEDGE_CRASH_AT` kills this process at named crash points
/// (see `pledge-crashpoints`); without it the points compile to nothing.
fn install_crash_points() {
    #[cfg(feature = "failpoints")]
    pledge_crashpoints::install();
}
