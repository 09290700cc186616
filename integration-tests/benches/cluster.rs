//! The coordinator cluster: throughput on each decision store, and how long a dead instance's
//! in-doubt transactions wait.
//!
//! One invocation, so the ratios are meaningful, each run with two reference participants and
//! the same load as `benches/e2e.rs` (BENCH_CLIENTS, 64 by default; BENCH_SECONDS; BENCH_API):
//! * the local store (one coordinator, its log in BENCH_DIR): the baseline;
//! * the PostgreSQL store with one instance;
//! * the PostgreSQL store with three instances (each client keeps to one).
//!
//! Then BENCH_KILLS times (20): under a lighter load (16 clients), kill -9 one of three
//! instances and time (a) until every shard has a live owner again and (b) until every branch
//! the participants held prepared in the dead instance's shards at the kill is resolved;
//! restart it and wait for the shards to balance before the next kill.
//!
//! The store is a PostgreSQL primary with a synchronous streaming standby started for the run
//! (see `pledge_integration_tests::store`); the test server's binaries must be installed
//! (`integration-tests/scripts/postgres.sh start` does it).
//! ```sh
//! cargo build --release -p pledge-coordinator -p pledge-sdk --bins
//! cargo bench -p pledge-integration-tests --bench cluster
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use pledge_integration_tests::bench::e2e::{load, print, run};
use pledge_integration_tests::bench::env_or;
use pledge_integration_tests::cluster::{StoreView, shard_of};
use pledge_integration_tests::store::StorePair;
use pledge_integration_tests::{Process, TestDir, branch};
use pledge_proto::v1::{self, participant_client::ParticipantClient, reference_store_client::ReferenceStoreClient};

/// The coordinator's defaults, not the tests' quicker ones.
const RECOVERY: &[&str] = &["--recovery-interval-ms", "30000"];
const DEFAULTS: &[&str] =
    &["--recovery-interval-ms", "30000", "--lease-ms", "5000", "--lease-renew-interval-ms", "1000"];

async fn instance(dir: &TestDir, name: &str, store: &str, participants: &[(&str, String)], listen: &str) -> Process {
    let args = [DEFAULTS, &["--listen", listen]].concat();
    dir.cluster_instance(name, store, "bench-cluster", participants, &args).await
}

/// Prepared branches the participants hold for the cluster, as (gtid, participant).
async fn in_doubt(participants: &[&Process]) -> Vec<(String, usize)> {
    let mut found = Vec::new();
    for (i, p) in participants.iter().enumerate() {
        let Ok(mut c) = ParticipantClient::connect(p.endpoint()).await else { continue };
        let mut after = None;
        loop {
            let request = v1::RecoverRequest { coordinator_id: "bench-cluster".into(), after, ..Default::default() };
            let Ok(r) = c.recover(request).await else { break };
            let r = r.into_inner();
            after = r.branches.last().and_then(|b| b.xid.clone());
            found.extend(r.branches.into_iter().filter_map(|b| b.xid).map(|x| (x.gtid, i)));
            if !r.truncated {
                break;
            }
        }
    }
    found
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        if let Some(dir) = std::env::var_os("BENCH_DIR") {
            // SAFETY: single-threaded at this point of the benchmark's start-up.
            unsafe { std::env::set_var("TMPDIR", dir) };
        }
        let l = load();
        println!(
            "cluster benchmark: {} clients, {} s per run, binaries from {}",
            l.clients,
            l.measure.as_secs(),
            pledge_integration_tests::bin_dir().display()
        );
        let pdir = TestDir::new("bench-cluster-participants");
        let p1 = pdir.participant("db1", 0, &[], &[]).await;
        let p2 = pdir.participant("db2", 0, &[], &[]).await;
        let parts = [("db1", &p1), ("db2", &p2)];
        let endpoints = [("db1", p1.endpoint()), ("db2", p2.endpoint())];

        let dir = TestDir::new("bench-cluster-local");
        let local = dir.coordinator_with(&parts, RECOVERY, &[]).await;
        let local_run = run(&[&local], &parts).await;
        drop(local);
        print("local store, 1 coordinator", &local_run);

        let store = StorePair::start().await;
        let url = store.url();
        let dir = TestDir::new("bench-cluster-pg1");
        let one = instance(&dir, "c0", &url, &endpoints, "127.0.0.1:0").await;
        let view = StoreView::connect(&url).await;
        let id = view.instance_id(&one).await;
        view.wait_owned_evenly_by(&[id], Duration::from_secs(60)).await;
        let one_run = run(&[&one], &parts).await;
        drop(one);
        print("postgres store, 1 instance", &one_run);
        // Its leases lapse; the three instances take the shards over.
        let mut three = Vec::new();
        let mut ids = Vec::new();
        for i in 0..3 {
            let p = instance(&dir, &format!("c{}", i + 1), &url, &endpoints, "127.0.0.1:0").await;
            ids.push(view.instance_id(&p).await);
            three.push(p);
        }
        view.wait_owned_evenly_by(&ids, Duration::from_secs(60)).await;
        let refs: Vec<&Process> = three.iter().collect();
        let three_run = run(&refs, &parts).await;
        print("postgres store, 3 instances", &three_run);
        println!(
            "ratios to the local store: 1 instance {:.2}, 3 instances {:.2} (throughput)",
            one_run.rate() / local_run.rate(),
            three_run.rate() / local_run.rate()
        );

        // Kills, under a lighter load through every instance.
        let kills = env_or("BENCH_KILLS", 20usize);
        let stop = Arc::new(AtomicBool::new(false));
        let mut load_tasks = Vec::new();
        let shard_count = view.shard_count().await;
        for i in 0..16 {
            let endpoints: Vec<String> = three.iter().map(Process::endpoint).collect();
            let (stop, s1, s2) = (stop.clone(), p1.endpoint(), p2.endpoint());
            load_tasks.push(tokio::spawn(async move {
                let (Ok(mut r1), Ok(mut r2)) =
                    (ReferenceStoreClient::connect(s1).await, ReferenceStoreClient::connect(s2).await)
                else {
                    return;
                };
                let mut at = i;
                while !stop.load(Ordering::Relaxed) {
                    let Ok(mut c) = v1::coordinator_client::CoordinatorClient::connect(endpoints[at % 3].clone()).await
                    else {
                        at += 1;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    };
                    while !stop.load(Ordering::Relaxed) {
                        let branches = vec![branch("db1", "b"), branch("db2", "b")];
                        let Ok(b) = c.begin(v1::BeginRequest { branches, ..Default::default() }).await else { break };
                        let gtid = b.into_inner().gtid;
                        for r in [&mut r1, &mut r2] {
                            let put = v1::PutRequest {
                                gtid: gtid.clone(),
                                branch_id: "b".into(),
                                key: format!("k{}", fastrand::u16(..)),
                                value: b"v".to_vec(),
                            };
                            let _ = r.put(put).await;
                        }
                        if c.commit(v1::CommitRequest { gtid, ..Default::default() }).await.is_err() {
                            break;
                        }
                    }
                    at += 1;
                }
            }));
        }
        let (mut owned_ms, mut resolved_ms) = (Vec::new(), Vec::new());
        let participants = [&p1, &p2];
        for k in 0..kills {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            let victim = k % 3;
            let shards = view.shards_of(&ids[victim]).await;
            let port = three[victim].port();
            three[victim].kill9().await;
            let killed = Instant::now();
            let stranded: Vec<(String, usize)> = in_doubt(&participants)
                .await
                .into_iter()
                .filter(|(g, _)| shards.contains(&shard_of(g, shard_count)))
                .collect();
            let live: Vec<String> =
                ids.iter().enumerate().filter(|(i, _)| *i != victim).map(|(_, id)| id.clone()).collect();
            view.wait_owned_evenly_by(&live, Duration::from_secs(60)).await;
            owned_ms.push(killed.elapsed().as_secs_f64() * 1e3);
            loop {
                let now = in_doubt(&participants).await;
                if !stranded.iter().any(|s| now.contains(s)) {
                    break;
                }
                assert!(killed.elapsed() < Duration::from_secs(120), "in-doubt branches not resolved in 2 minutes");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            resolved_ms.push(killed.elapsed().as_secs_f64() * 1e3);
            println!(
                "kill {}: {} shards owned elsewhere after {:.0} ms; its {} in-doubt branches resolved after {:.0} ms",
                k + 1,
                shards.len(),
                owned_ms[k],
                stranded.len(),
                resolved_ms[k]
            );
            // The load's clients know the old endpoints: the new instance takes the same port.
            let listen = format!("127.0.0.1:{port}");
            let p = instance(&dir, &format!("c{}-{k}", victim + 1), &url, &endpoints, &listen).await;
            ids[victim] = view.instance_id(&p).await;
            three[victim] = p;
            view.wait_owned_evenly_by(&ids, Duration::from_secs(60)).await;
        }
        stop.store(true, Ordering::Relaxed);
        for t in load_tasks {
            let _ = t.await;
        }
        let summary = |name: &str, v: &mut Vec<f64>| {
            if v.is_empty() {
                return;
            }
            v.sort_by(f64::total_cmp);
            println!("{name}: p50 {:.0} ms, max {:.0} ms over {} kills", v[v.len() / 2], v[v.len() - 1], v.len());
        };
        summary("kill -9 to shards owned elsewhere", &mut owned_ms);
        summary("kill -9 to its in-doubt branches resolved", &mut resolved_ms);
    });
}
