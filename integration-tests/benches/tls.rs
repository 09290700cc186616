//! What mutual TLS on every hop costs end to end: the e2e load (benches/e2e.rs: BENCH_CLIENTS
//! clients, each transaction a Begin with a branch at each of two reference participants, a Put
//! in each, a Commit) against plaintext processes and against processes with mutual TLS on
//! every hop (clients to coordinator and participants, coordinator to participants), in one
//! invocation, BENCH_ROUNDS rounds alternating, fresh processes for each run.
//!
//! ```sh
//! cargo build --release -p pledge-coordinator -p pledge-sdk --bins
//! cargo bench -p pledge-integration-tests --bench tls
//! ```
//! Settings as in benches/e2e.rs (BENCH_CLIENTS, BENCH_SECONDS, BENCH_API, BENCH_CHANNELS),
//! and BENCH_ROUNDS (2).

use pledge_integration_tests::bench::e2e::{load, print, run};
use pledge_integration_tests::bench::{Run, env_or};
use pledge_integration_tests::tls::{Issued, Pki};
use pledge_integration_tests::{Process, TestDir};
use pledge_proto::tls::{ClientTls, ClientTlsFiles};

/// The coordinator's own recovery interval, not the tests' 500 ms.
const RECOVERY_DEFAULT: &[&str] = &["--recovery-interval-ms", "30000"];

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn flags(pairs: &[(&str, &std::path::Path)]) -> Vec<String> {
    pairs.iter().flat_map(|(flag, path)| [flag.to_string(), path.display().to_string()]).collect()
}

/// Two participants and a coordinator in fresh directories, with mutual TLS on every hop when
/// `pki` is given; the clients' TLS with them.
async fn start(pki: Option<(&Pki, &Issued)>) -> (TestDir, Process, Process, Process) {
    let dir = TestDir::new("bench-tls");
    let server = |id: &Issued, ca: &std::path::Path| {
        flags(&[("--tls-cert", &id.cert), ("--tls-key", &id.key), ("--tls-client-ca", ca)])
    };
    let (mut a1, mut a2, mut ac) =
        (Vec::new(), Vec::new(), RECOVERY_DEFAULT.iter().map(|s| s.to_string()).collect::<Vec<_>>());
    if let Some((pki, _)) = pki {
        let (i1, i2, ic) = (pki.issue("db1", false), pki.issue("db2", false), pki.issue("coordinator", false));
        a1 = server(&i1, &pki.ca);
        a2 = server(&i2, &pki.ca);
        ac.extend(server(&ic, &pki.ca));
        ac.extend(flags(&[
            ("--client-tls-ca", &pki.ca),
            ("--client-tls-cert", &ic.cert),
            ("--client-tls-key", &ic.key),
        ]));
    }
    let client = pki.map(|(pki, app)| {
        let files = ClientTlsFiles { ca: pki.ca.clone(), cert: Some(app.cert.clone()), key: Some(app.key.clone()) };
        ClientTls::load(files).expect("client TLS")
    });
    let tls = |p: Process| match &client {
        Some(t) => p.with_tls(t.clone()),
        None => p,
    };
    let p1 = tls(dir.participant("db1", 0, &strs(&a1), &[]).await);
    let p2 = tls(dir.participant("db2", 0, &strs(&a2), &[]).await);
    let participants = [("db1", p1.endpoint()), ("db2", p2.endpoint())];
    let coordinator = tls(dir.coordinator_for(&participants, &strs(&ac), &[]).await);
    (dir, coordinator, p1, p2)
}

async fn measure(pki: Option<(&Pki, &Issued)>) -> Run {
    let (_dir, coordinator, p1, p2) = start(pki).await;
    run(&[&coordinator], &[("db1", &p1), ("db2", &p2)]).await
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let l = load();
        let rounds = env_or("BENCH_ROUNDS", 2);
        println!(
            "TLS benchmark: {} clients, {} s per run, {rounds} rounds of plaintext then mutual TLS on every hop, \
             binaries from {}",
            l.clients,
            l.measure.as_secs(),
            pledge_integration_tests::bin_dir().display()
        );
        let pki_dir = TestDir::new("bench-pki");
        let pki = Pki::new(pki_dir.path(), "bench");
        let app = pki.issue("app", false);
        for round in 1..=rounds {
            let plain = measure(None).await;
            let tls = measure(Some((&pki, &app))).await;
            println!("round {round}");
            print("plaintext", &plain);
            print("mutual TLS", &tls);
            println!(
                "ratio TLS / plaintext: throughput {:.2}, p50 latency {:.2}, p99 latency {:.2}, CPU per transaction {}",
                tls.rate() / plain.rate(),
                tls.ms(0.5) / plain.ms(0.5),
                tls.ms(0.99) / plain.ms(0.99),
                match (tls.cpu_us_per_txn(), plain.cpu_us_per_txn()) {
                    (Some(t), Some(p)) => format!("{:.2}", t / p),
                    _ => "-".into(),
                }
            );
        }
    });
}
