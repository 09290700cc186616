use clap::Parser;
use pledge_coordinator::cli::{self, Cli, Command, LogCommand};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

/// glibc's malloc costs this service 5-10% of its CPU (its arenas consolidate on the many
/// short-lived buffers of the gRPC stack); mimalloc's thread-local pages do not.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // The server logs at info by default; client commands only warn.
    let default_level = if matches!(cli.command, Command::Serve(_)) { "info" } else { "warn" };
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level)))
        .with_writer(std::io::stderr)
        .init();
    install_crash_points();

    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve(args) => {
                let config = args.into_config()?;
                pledge_coordinator::server::serve(config, CancellationToken::new(), true).await
            }
            Command::Txn { client, command } => cli::txn(client, command).await,
            Command::Participant { client, command } => cli::participant(client, command).await,
            Command::Cluster { command } => cli::cluster(command).await,
            Command::Log { command: LogCommand::Inspect { data_dir } } => cli::log_inspect(data_dir),
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // Logged once, here, where it ends the process.
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(cli::exit_code(&e))
        }
    }
}

/// With the `failpoints` feature, `PLEDGE_CRASH_AT` kills this process at named crash points
/// (see `pledge-crashpoints`); without it the points compile to nothing.
fn install_crash_points() {
    #[cfg(feature = "failpoints")]
    pledge_crashpoints::install();
}
