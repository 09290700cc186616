//! Group-commit throughput and latency of `LogWriter::append`, fsync on, on a real disk.
//!
//! ```text
//! cargo bench -p pledge-log --bench append [-- --dir /path/on/real/disk]
//! env: BENCH_SECONDS (default 3) per writer count, BENCH_DIR (instead of --dir),
//!      BENCH_WRITERS (default "1,4,16,64,256"), BENCH_PAYLOAD_BYTES (default 128),
//!      BENCH_PREALLOCATE_CHUNK_BYTES (default: LogConfig's; 0 shows the cost of syncing
//!      file-size changes)
//! ```
//!
//! Each writer is a tokio task that appends and awaits in a loop, so N writers keep at most N
//! records in flight. The default directory is Cargo's target tmp dir; tmpfs would make the
//! numbers meaningless (no real fsync), so the file system type is printed and tmpfs refused.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use pledge_log::LogConfig;

fn main() {
    let seconds: f64 = env_or("BENCH_SECONDS", "3").parse().expect("BENCH_SECONDS: a number of seconds");
    let payload_bytes: usize = env_or("BENCH_PAYLOAD_BYTES", "128").parse().expect("BENCH_PAYLOAD_BYTES");
    let writer_counts: Vec<usize> = env_or("BENCH_WRITERS", "1,4,16,64,256")
        .split(',')
        .map(|n| n.trim().parse().expect("BENCH_WRITERS: comma-separated counts"))
        .collect();
    let mut config = LogConfig::new("");
    if let Ok(chunk) = std::env::var("BENCH_PREALLOCATE_CHUNK_BYTES") {
        config.preallocate_chunk_bytes = chunk.parse().expect("BENCH_PREALLOCATE_CHUNK_BYTES");
    }
    let base = bench_dir();
    std::fs::create_dir_all(&base).unwrap();
    let fs_type = fs_type(&base).unwrap_or_else(|| "unknown".into());
    println!(
        "pledge-log append bench: dir {} ({fs_type}), {seconds} s per row, {payload_bytes}-byte payloads, \
         preallocation chunk {} bytes",
        base.display(),
        config.preallocate_chunk_bytes
    );
    if fs_type == "tmpfs" || fs_type == "ramfs" {
        eprintln!("refusing to benchmark on {fs_type}: fsync costs nothing there. Use --dir or BENCH_DIR.");
        std::process::exit(2);
    }
    println!(
        "{:>8} {:>12} {:>10} {:>14} {:>9} {:>9} {:>9}",
        "writers", "records/s", "syncs/s", "records/batch", "p50 µs", "p99 µs", "max µs"
    );
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    for writers in writer_counts {
        let dir = tempfile::Builder::new().prefix("pledge-log-bench-").tempdir_in(&base).unwrap();
        config.dir = dir.path().to_owned();
        let row = runtime.block_on(run(config.clone(), writers, Duration::from_secs_f64(seconds), payload_bytes));
        println!(
            "{:>8} {:>12.0} {:>10.0} {:>14.1} {:>9} {:>9} {:>9}",
            writers,
            row.records as f64 / row.elapsed.as_secs_f64(),
            row.syncs as f64 / row.elapsed.as_secs_f64(),
            row.records as f64 / row.batches.max(1) as f64,
            row.latency_us.value_at_quantile(0.50),
            row.latency_us.value_at_quantile(0.99),
            row.latency_us.max(),
        );
    }
}

struct Row {
    records: u64,
    syncs: u64,
    batches: u64,
    elapsed: Duration,
    latency_us: Histogram<u64>,
}

async fn run(config: LogConfig, writers: usize, duration: Duration, payload_bytes: usize) -> Row {
    let log = pledge_log::open(config, |_| Ok::<_, std::convert::Infallible>(())).unwrap();
    let before = log.writer().stats();
    let start = Instant::now();
    let deadline = start + duration;
    let tasks: Vec<_> = (0..writers)
        .map(|_| {
            let writer = log.writer();
            tokio::spawn(async move {
                let mut latency_us = new_histogram();
                while Instant::now() < deadline {
                    let sent = Instant::now();
                    writer.append(1, vec![0xAB; payload_bytes]).await.unwrap();
                    latency_us.saturating_record(sent.elapsed().as_micros() as u64);
                }
                latency_us
            })
        })
        .collect();
    let mut latency_us = new_histogram();
    for task in tasks {
        latency_us.add(task.await.unwrap()).unwrap();
    }
    let elapsed = start.elapsed();
    let after = log.writer().stats();
    log.shutdown().await.unwrap();
    Row {
        records: after.records - before.records,
        syncs: after.syncs - before.syncs,
        batches: after.batches - before.batches,
        elapsed,
        latency_us,
    }
}

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).unwrap()
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

/// `--dir PATH` (cargo bench passes its own flags such as `--bench`; they are ignored), else
/// BENCH_DIR, else Cargo's tmp dir under target/.
fn bench_dir() -> PathBuf {
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if arg == "--dir" {
            return args.next().expect("--dir needs a path").into();
        }
        if let Some(dir) = arg.strip_prefix("--dir=") {
            return dir.into();
        }
    }
    std::env::var_os("BENCH_DIR").map_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")), PathBuf::from)
}

/// File system type of the mount holding `dir`, from /proc/self/mounts.
fn fs_type(dir: &Path) -> Option<String> {
    let dir = dir.canonicalize().ok()?;
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (_, mount_point, fs_type) = (fields.next()?, fields.next()?, fields.next()?);
            dir.starts_with(mount_point).then(|| (mount_point.len(), fs_type.to_owned()))
        })
        .max_by_key(|(len, _)| *len)
        .map(|(_, fs_type)| fs_type)
}
