//! TLS and authentication on every hop, as real processes: a two-participant transaction with
//! mutual TLS between the application, the coordinator and both participants (and the CLI);
//! each server refusing a client with no certificate, one from another CA, an expired one and a
//! plaintext one; certificates rotated by SIGHUP under load with no failed call; and calls
//! authenticated (certificate names, bearer tokens) and authorized by role.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use pledge_integration_tests::tls::{Issued, Pki, bundle};
use pledge_integration_tests::*;
use pledge_proto::tls::{ClientTls, ClientTlsFiles};
use pledge_proto::transport::Target;
use pledge_proto::v1::{self, coordinator_client::CoordinatorClient, reference_store_client::ReferenceStoreClient};
use tonic::transport::Channel;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

fn https(p: &Process) -> String {
    format!("https://127.0.0.1:{}", p.port())
}

fn client_tls(ca: &std::path::Path, id: Option<&Issued>) -> ClientTls {
    let files =
        ClientTlsFiles { ca: ca.to_path_buf(), cert: id.map(|i| i.cert.clone()), key: id.map(|i| i.key.clone()) };
    ClientTls::load(files).expect("client TLS")
}

fn channel(p: &Process, tls: &ClientTls) -> Channel {
    Target::parse_with(&https(p), Some(tls)).unwrap().connect_lazy()
}

/// `--tls-cert`, `--tls-key` and `--tls-client-ca` for a server with `id`, requiring clients
/// from `client_ca`.
fn server_args(id: &Issued, client_ca: &std::path::Path) -> Vec<String> {
    [("--tls-cert", &id.cert), ("--tls-key", &id.key), ("--tls-client-ca", &client_ca.to_path_buf())]
        .iter()
        .flat_map(|(flag, path)| [flag.to_string(), path.display().to_string()])
        .collect()
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// Whether a health check over `tls` at `p` is answered.
async fn answers(p: &Process, tls: &ClientTls) -> Result<(), tonic::Status> {
    let mut h = HealthClient::new(channel(p, tls));
    h.check(HealthCheckRequest { service: String::new() }).await.map(drop)
}

async fn transfer(c: &mut CoordinatorClient<Channel>, stores: &mut [ReferenceStoreClient<Channel>; 2], key: &str) {
    let gtid = begin(c, &[("p1", "b"), ("p2", "b")]).await;
    put(&mut stores[0], &gtid, "b", key, "out").await;
    put(&mut stores[1], &gtid, "b", key, "in").await;
    let r = commit(c, &gtid, true).await.unwrap();
    assert_eq!((r.outcome(), r.completed), (v1::Outcome::Committed, true), "{}", r.reason);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_on_every_hop_and_each_server_refuses_clients_without_a_valid_certificate() {
    let dir = TestDir::new("tls");
    let pki = Pki::new(dir.path(), "main");
    let other = Pki::new(dir.path(), "other");
    let (p1_id, p2_id, coordinator_id, app) =
        (pki.issue("p1", false), pki.issue("p2", false), pki.issue("coordinator", false), pki.issue("app", false));
    let p1 = dir.participant("p1", 0, &strs(&server_args(&p1_id, &pki.ca)), &[]).await;
    let p2 = dir.participant("p2", 0, &strs(&server_args(&p2_id, &pki.ca)), &[]).await;
    let mut args = server_args(&coordinator_id, &pki.ca);
    for (flag, path) in [
        ("--client-tls-ca", &pki.ca),
        ("--client-tls-cert", &coordinator_id.cert),
        ("--client-tls-key", &coordinator_id.key),
    ] {
        args.extend([flag.to_string(), path.display().to_string()]);
    }
    let coordinator = dir.coordinator_for(&[("p1", https(&p1)), ("p2", https(&p2))], &strs(&args), &[]).await;

    // The application's calls, the coordinator's, all over mutual TLS.
    let tls = client_tls(&pki.ca, Some(&app));
    let mut c = CoordinatorClient::new(channel(&coordinator, &tls));
    let mut stores = [ReferenceStoreClient::new(channel(&p1, &tls)), ReferenceStoreClient::new(channel(&p2, &tls))];
    transfer(&mut c, &mut stores, "k1").await;
    assert_eq!(read(&mut stores[1], "k1").await.as_deref(), Some("in"));
    let gtid = begin(&mut c, &[("p1", "b")]).await;
    let shown = std::process::Command::new(bin("pledge"))
        .args(["txn", "get", &gtid, "--coordinator", &https(&coordinator), "--tls-ca"])
        .arg(&pki.ca)
        .arg("--tls-cert")
        .arg(&app.cert)
        .arg("--tls-key")
        .arg(&app.key)
        .output()
        .unwrap();
    assert!(shown.status.success(), "{}", String::from_utf8_lossy(&shown.stderr));
    assert!(String::from_utf8_lossy(&shown.stdout).contains("ACTIVE"));

    // Each server refuses: no certificate, one from another CA, an expired one, plaintext.
    let expired = pki.issue("expired", true);
    let stranger = other.issue("stranger", false);
    for server in [&coordinator, &p1] {
        assert!(answers(server, &tls).await.is_ok());
        let refusals = || server.log().matches("TLS handshake refused").count();
        for (what, refused) in [
            ("no certificate", client_tls(&pki.ca, None)),
            ("another CA's certificate", client_tls(&pki.ca, Some(&stranger))),
            ("an expired certificate", client_tls(&pki.ca, Some(&expired))),
        ] {
            let before = refusals();
            // (Over TLS 1.3 the client may finish its side first and hear of the refusal only
            // as the connection closes: the status varies, the refusal does not.)
            answers(server, &refused).await.expect_err(what);
            eventually(&format!("{what}: refused by the server"), || async { (refusals() > before).then_some(()) })
                .await;
        }
        let before = refusals();
        let plain = Target::parse(&server.endpoint()).unwrap().connect_lazy();
        HealthClient::new(plain).check(HealthCheckRequest { service: String::new() }).await.expect_err("plaintext");
        eventually("plaintext: refused by the server", || async { (refusals() > before).then_some(()) }).await;
    }
    // A server certificate from a CA the client does not trust is refused by the client.
    let e = answers(&coordinator, &client_tls(&other.ca, Some(&stranger))).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e}");
}

/// Every certificate is replaced by one from a new CA (clients trust both) and every process
/// gets SIGHUP, while clients run transfers over connections they keep and over new ones: no
/// call fails, and new connections get the new certificates (a client trusting only the new
/// CA is refused before, answered after).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotated_by_sighup_under_load_fail_no_call() {
    let dir = TestDir::new("tls-rotate");
    let (old, new) = (Pki::new(dir.path(), "old"), Pki::new(dir.path(), "new"));
    let both = bundle(&dir.path().join("both-ca.pem"), &[&old, &new]);
    // Each process's files, at fixed paths the rotation overwrites.
    let place = |name: &str, from: &Issued| {
        let id = Issued { cert: dir.path().join(format!("{name}.pem")), key: dir.path().join(format!("{name}.key")) };
        std::fs::copy(&from.cert, &id.cert).unwrap();
        std::fs::copy(&from.key, &id.key).unwrap();
        id
    };
    let names = ["p1", "p2", "coordinator"];
    let ids: Vec<Issued> = names.iter().map(|n| place(n, &old.issue(n, false))).collect();
    let p1 = dir.participant("p1", 0, &strs(&server_args(&ids[0], &both)), &[]).await;
    let p2 = dir.participant("p2", 0, &strs(&server_args(&ids[1], &both)), &[]).await;
    let mut args = server_args(&ids[2], &both);
    for (flag, path) in
        [("--client-tls-ca", &both), ("--client-tls-cert", &ids[2].cert), ("--client-tls-key", &ids[2].key)]
    {
        args.extend([flag.to_string(), path.display().to_string()]);
    }
    let coordinator = dir.coordinator_for(&[("p1", https(&p1)), ("p2", https(&p2))], &strs(&args), &[]).await;
    let app = old.issue("app", false);
    let tls = client_tls(&both, Some(&app));
    let only_new = client_tls(&new.ca, Some(&new.issue("app2", false)));
    assert!(answers(&coordinator, &only_new).await.is_err(), "the old certificate is not the new CA's");

    // Load: 4 clients on their own connections, 1 making a new connection for every transfer.
    let (stop, done, failed) =
        (Arc::new(AtomicBool::new(false)), Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut load = Vec::new();
    for worker in 0..5 {
        let (stop, done, failed, tls) = (stop.clone(), done.clone(), failed.clone(), tls.clone());
        let targets = [https(&coordinator), https(&p1), https(&p2)];
        load.push(tokio::spawn(async move {
            let connect = |t: &str| Target::parse_with(t, Some(&tls)).unwrap().connect_lazy();
            let mut kept = (
                CoordinatorClient::new(connect(&targets[0])),
                [ReferenceStoreClient::new(connect(&targets[1])), ReferenceStoreClient::new(connect(&targets[2]))],
            );
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                if worker == 4 {
                    kept = (
                        CoordinatorClient::new(connect(&targets[0])),
                        [
                            ReferenceStoreClient::new(connect(&targets[1])),
                            ReferenceStoreClient::new(connect(&targets[2])),
                        ],
                    );
                }
                let (c, stores) = &mut kept;
                let ok = async {
                    let gtid = c.begin(v1::BeginRequest {
                        branches: vec![branch("p1", "b"), branch("p2", "b")],
                        ..Default::default()
                    });
                    let gtid = gtid.await?.into_inner().gtid;
                    for s in stores.iter_mut() {
                        let key = format!("w{worker}-{n}");
                        s.put(v1::PutRequest { gtid: gtid.clone(), branch_id: "b".into(), key, value: b"v".to_vec() })
                            .await?;
                    }
                    let r = c.commit(v1::CommitRequest { gtid, wait_for_completion: true, ..Default::default() });
                    let r = r.await?.into_inner();
                    Ok::<bool, tonic::Status>(r.outcome() == v1::Outcome::Committed && r.completed)
                }
                .await;
                match ok {
                    Ok(true) => done.fetch_add(1, Ordering::Relaxed),
                    other => {
                        eprintln!("worker {worker}: transfer failed: {other:?}");
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        }));
    }
    let progressed = |at_least: usize| {
        let done = done.clone();
        async move {
            eventually("transfers go on", || async { (done.load(Ordering::Relaxed) >= at_least).then_some(()) }).await
        }
    };
    progressed(50).await;

    // Rotate: every certificate (the coordinator's client certificate with its server one).
    for (name, id) in names.iter().zip(&ids) {
        let fresh = new.issue(&format!("{name}-new"), false);
        std::fs::copy(&fresh.cert, &id.cert).unwrap();
        std::fs::copy(&fresh.key, &id.key).unwrap();
    }
    for p in [&p1, &p2, &coordinator] {
        p.signal(libc::SIGHUP);
    }
    for p in [&p1, &p2, &coordinator] {
        eventually("the certificates reloaded", || async { p.log().contains("SIGHUP: reloaded").then_some(()) }).await;
    }
    let before = done.load(Ordering::Relaxed);
    progressed(before + 50).await;
    stop.store(true, Ordering::Relaxed);
    for task in load {
        task.await.unwrap();
    }
    assert_eq!(failed.load(Ordering::Relaxed), 0, "no call fails across the rotation");
    for p in [&coordinator, &p1, &p2] {
        answers(p, &only_new).await.unwrap_or_else(|e| panic!("new connections get the new certificate: {e}"));
    }
}

/// A principals file with `entries` (name, role, credential: `token:<token>` or `cn:<name>`).
fn principals(path: &std::path::Path, entries: &[(&str, &str, &str)]) -> std::path::PathBuf {
    use std::fmt::Write;
    let mut toml = String::new();
    for (name, role, credential) in entries {
        let line = match credential.split_once(':') {
            Some(("token", t)) => {
                let digest = std::process::Command::new("sha256sum")
                    .stdin(std::process::Stdio::piped())
                    .stdout(std::process::Stdio::piped())
                    .spawn()
                    .and_then(|mut c| {
                        use std::io::Write;
                        c.stdin.take().unwrap().write_all(t.as_bytes())?;
                        c.wait_with_output()
                    })
                    .unwrap();
                let hex = String::from_utf8(digest.stdout).unwrap();
                format!("token_sha256 = \"{}\"", hex.split_whitespace().next().unwrap())
            }
            Some(("cn", cn)) => format!("cert_cn = \"{cn}\""),
            _ => panic!("{credential}"),
        };
        write!(toml, "[[principal]]\nname = \"{name}\"\nrole = \"{role}\"\n{line}\n\n").unwrap();
    }
    std::fs::write(path, toml).unwrap();
    path.to_path_buf()
}

/// Calls with a bearer token.
fn with_token(token: &str) -> impl tonic::service::Interceptor + Clone + use<> {
    let value: tonic::metadata::MetadataValue<_> = format!("Bearer {token}").parse().unwrap();
    move |mut r: tonic::Request<()>| {
        r.metadata_mut().insert("authorization", value.clone());
        Ok(r)
    }
}

/// Every call authenticated (client certificates by name, bearer tokens) and authorized by
/// role: an application commits its transactions but may not list or resolve, nor call a
/// participant's Participant service; an operator's token lists and resolves (and is the
/// operator a resolution records); unknown credentials are UNAUTHENTICATED; health checks need
/// none; a token added to the file works after SIGHUP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_are_authenticated_and_authorized_by_role() {
    let dir = TestDir::new("auth");
    let pki = Pki::new(dir.path(), "main");
    let ids: Vec<Issued> =
        ["p1", "p2", "coordinator", "app", "laptop", "stranger"].iter().map(|n| pki.issue(n, false)).collect();
    let (coordinator_id, app, laptop, stranger) = (&ids[2], &ids[3], &ids[4], &ids[5]);
    let participant_auth = principals(
        &dir.path().join("participant-auth.toml"),
        &[("coordinator", "coordinator", "cn:coordinator"), ("app", "application", "cn:app")],
    );
    let coordinator_auth = dir.path().join("coordinator-auth.toml");
    let entries = [
        ("app", "application", "cn:app"),
        ("ops", "operator", "token:0ps-t0ken"),
        ("coordinator", "coordinator", "cn:coordinator"),
    ];
    principals(&coordinator_auth, &entries);
    let participant = |name: &'static str, id: &Issued| {
        let mut args = server_args(id, &pki.ca);
        args.extend(["--auth-file".to_string(), participant_auth.display().to_string()]);
        let dir = &dir;
        async move { dir.participant(name, 0, &strs(&args), &[]).await }
    };
    let (p1, p2) = (participant("p1", &ids[0]).await, participant("p2", &ids[1]).await);
    let mut args = server_args(coordinator_id, &pki.ca);
    for (flag, path) in [
        ("--client-tls-ca", &pki.ca),
        ("--client-tls-cert", &coordinator_id.cert),
        ("--client-tls-key", &coordinator_id.key),
        ("--auth-file", &coordinator_auth),
    ] {
        args.extend([flag.to_string(), path.display().to_string()]);
    }
    let coordinator = dir.coordinator_for(&[("p1", https(&p1)), ("p2", https(&p2))], &strs(&args), &[]).await;

    // The application: its transaction commits (the coordinator's calls to the participants
    // are authenticated by its certificate).
    let app_tls = client_tls(&pki.ca, Some(app));
    let mut c = CoordinatorClient::new(channel(&coordinator, &app_tls));
    let mut stores =
        [ReferenceStoreClient::new(channel(&p1, &app_tls)), ReferenceStoreClient::new(channel(&p2, &app_tls))];
    transfer(&mut c, &mut stores, "k1").await;
    let e = c.list(v1::ListRequest::default()).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
    assert!(e.message().contains("app (Application) may not call /pledge.v1.Coordinator/List"), "{e}");
    let gtid = begin(&mut c, &[("p1", "b")]).await;
    let resolve = v1::ResolveRequest {
        gtid: gtid.clone(),
        action: v1::ResolveAction::Commit as i32,
        reason: "x".into(),
        operator: "app".into(),
        ..Default::default()
    };
    assert_eq!(c.resolve(resolve.clone()).await.unwrap_err().code(), tonic::Code::PermissionDenied);
    let mut participant_api = pledge_proto::v1::participant_client::ParticipantClient::new(channel(&p1, &app_tls));
    let prepare = v1::PrepareRequest { coordinator_id: "x".into(), branches: vec![] };
    let e = participant_api.prepare(prepare).await.unwrap_err();
    assert_eq!(
        e.code(),
        tonic::Code::PermissionDenied,
        "only coordinators call a participant's Participant service: {e}"
    );

    // The operator's token (its certificate names no principal: the token decides).
    let laptop_tls = client_tls(&pki.ca, Some(laptop));
    let mut ops = CoordinatorClient::with_interceptor(channel(&coordinator, &laptop_tls), with_token("0ps-t0ken"));
    let listed = ops.list(v1::ListRequest::default()).await.unwrap().into_inner().transactions;
    assert!(listed.iter().any(|t| t.gtid == gtid));
    let mut abort_then_forget = CoordinatorClient::new(channel(&coordinator, &app_tls));
    abort_then_forget.abort(v1::AbortRequest { gtid: gtid.clone() }).await.unwrap();
    let r = ops.resolve(resolve).await.unwrap_err();
    assert_eq!(r.code(), tonic::Code::FailedPrecondition, "the operator may resolve; this one contradicts: {r}");
    let shown = std::process::Command::new(bin("pledge"))
        .args(["txn", "list", "--coordinator", &https(&coordinator), "--tls-ca"])
        .arg(&pki.ca)
        .arg("--tls-cert")
        .arg(&laptop.cert)
        .arg("--tls-key")
        .arg(&laptop.key)
        .env("PLEDGE_TOKEN", "0ps-t0ken")
        .output()
        .unwrap();
    assert!(shown.status.success(), "{}", String::from_utf8_lossy(&shown.stderr));
    assert!(String::from_utf8_lossy(&shown.stdout).contains(&gtid));

    // Unknown credentials.
    let mut wrong = CoordinatorClient::with_interceptor(channel(&coordinator, &laptop_tls), with_token("guess"));
    assert_eq!(wrong.list(v1::ListRequest::default()).await.unwrap_err().code(), tonic::Code::Unauthenticated);
    let mut nobody = CoordinatorClient::new(channel(&coordinator, &client_tls(&pki.ca, Some(stranger))));
    let e = nobody.begin(v1::BeginRequest::default()).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e}");
    assert!(e.message().contains("\"stranger\""), "{e}");
    assert!(
        answers(&coordinator, &client_tls(&pki.ca, Some(stranger))).await.is_ok(),
        "health checks need no principal"
    );
    assert!(coordinator.log().contains("call refused"));

    // A principal added to the file works once the coordinator got SIGHUP.
    principals(&coordinator_auth, &[entries.as_slice(), &[("ops2", "operator", "token:n3w")]].concat());
    coordinator.signal(libc::SIGHUP);
    let mut ops2 = CoordinatorClient::with_interceptor(channel(&coordinator, &laptop_tls), with_token("n3w"));
    eventually("the new token accepted", || {
        let mut ops2 = ops2.clone();
        async move { ops2.list(v1::ListRequest::default()).await.ok() }
    })
    .await;
    ops2.list(v1::ListRequest::default()).await.unwrap();
}

/// Tokens of two applications and an operator. An application acts only on the transactions it
/// began: another's GTID gets PERMISSION_DENIED from Get, Enlist, Commit and Abort (unary and
/// pipelined) and changes nothing, and a GTID nobody began gets the same answer (whether
/// another's exists is not told); the same idempotency key begins each its own transaction. The
/// operator sees and acts on every transaction. Who began a transaction is durable: after a
/// kill -9 and restart the same calls get the same answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_application_acts_only_on_its_own_transactions() {
    let dir = TestDir::new("ownership");
    let pki = Pki::new(dir.path(), "main");
    let server_id = pki.issue("coordinator", false);
    let auth = principals(
        &dir.path().join("auth.toml"),
        &[
            ("payments", "application", "token:pay-t0ken"),
            ("reports", "application", "token:rep-t0ken"),
            ("ops", "operator", "token:0ps-t0ken"),
        ],
    );
    let p1 = dir.participant("p1", 0, &[], &[]).await;
    let p2 = dir.participant("p2", 0, &[], &[]).await;
    let args = [
        "--tls-cert".to_string(),
        server_id.cert.display().to_string(),
        "--tls-key".to_string(),
        server_id.key.display().to_string(),
        "--auth-file".to_string(),
        auth.display().to_string(),
    ];
    let participants = [("p1", p1.endpoint()), ("p2", p2.endpoint())];
    let mut coordinator = dir.coordinator_for(&participants, &strs(&args), &[]).await;
    let server_only = client_tls(&pki.ca, None);
    let as_ = |token: &str, coordinator: &Process| {
        CoordinatorClient::with_interceptor(channel(coordinator, &server_only), with_token(token))
    };
    let (mut payments, mut reports) = (as_("pay-t0ken", &coordinator), as_("rep-t0ken", &coordinator));

    let begin_request = |key: &str| v1::BeginRequest {
        idempotency_key: key.into(),
        branches: vec![branch("p1", "b"), branch("p2", "b")],
        ..Default::default()
    };
    let gtid = payments.begin(begin_request("order-1")).await.unwrap().into_inner().gtid;
    put(&mut store_client(&p1).await, &gtid, "b", "alice", "90").await;
    let unknown = {
        // A GTID nobody began: this coordinator's, but issued to no one.
        let mut t = get_as(&mut payments, &gtid).await.unwrap();
        t.gtid.replace_range(t.gtid.len() - 4.., "ffff");
        t.gtid
    };

    let refusals = |reports: &mut CoordinatorClient<_>, gtid: String| {
        let mut reports: CoordinatorClient<_> = reports.clone();
        async move {
            let g = || gtid.clone();
            let mut codes = vec![
                reports.get(v1::GetRequest { gtid: g() }).await.map(drop),
                reports.enlist(v1::EnlistRequest { gtid: g(), branches: vec![branch("p1", "c")] }).await.map(drop),
                reports.commit(v1::CommitRequest { gtid: g(), ..Default::default() }).await.map(drop),
                reports.abort(v1::AbortRequest { gtid: g() }).await.map(drop),
            ];
            let piped = pipelined_abort(&mut reports, &gtid).await;
            codes.push(piped);
            codes.into_iter().map(|r| r.unwrap_err()).collect::<Vec<_>>()
        }
    };
    let check = |errors: Vec<tonic::Status>, gtid: &str| {
        for e in &errors {
            assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
            assert_eq!(
                e.message(),
                format!(
                    "transaction {gtid} is not one that reports began here: an application may act only on its own transactions"
                ),
            );
        }
    };
    check(refusals(&mut reports, gtid.clone()).await, &gtid);
    check(refusals(&mut reports, unknown.clone()).await, &unknown);
    let theirs = reports.begin(begin_request("order-1")).await.unwrap().into_inner();
    assert!(!theirs.existing && theirs.gtid != gtid, "another's idempotency key names nothing of its: {theirs:?}");
    reports.abort(v1::AbortRequest { gtid: theirs.gtid }).await.unwrap();

    // Nothing changed: still active with one branch, and its owner can go on.
    let t = get_as(&mut payments, &gtid).await.unwrap();
    assert_eq!((t.state(), t.branches.len(), t.owner.as_str()), (v1::TransactionState::Active, 2, "payments"));
    let again = payments.begin(begin_request("order-1")).await.unwrap().into_inner();
    assert_eq!((again.gtid.as_str(), again.existing), (gtid.as_str(), true));
    put(&mut store_client(&p2).await, &gtid, "b", "bob", "110").await;
    let r = payments.commit(v1::CommitRequest { gtid: gtid.clone(), wait_for_completion: true, ..Default::default() });
    assert_eq!(r.await.unwrap().into_inner().outcome(), v1::Outcome::Committed);

    // The operator sees it (and the CLI shows whose it is).
    let mut ops = as_("0ps-t0ken", &coordinator);
    assert_eq!(get_as(&mut ops, &gtid).await.unwrap().owner, "payments");

    // Durable: the same answers after kill -9 and a restart.
    coordinator.kill9().await;
    let coordinator = dir.coordinator_for(&participants, &strs(&args), &[]).await;
    let (mut payments, mut reports) = (as_("pay-t0ken", &coordinator), as_("rep-t0ken", &coordinator));
    let e = reports.get(v1::GetRequest { gtid: gtid.clone() }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
    let t = get_as(&mut payments, &gtid).await.unwrap();
    assert_eq!((t.state(), t.owner.as_str()), (v1::TransactionState::Committed, "payments"));
    let shown = std::process::Command::new(bin("pledge"))
        .args(["txn", "get", &gtid, "--coordinator", &https(&coordinator), "--tls-ca"])
        .arg(&pki.ca)
        .env("PLEDGE_TOKEN", "0ps-t0ken")
        .output()
        .unwrap();
    assert!(shown.status.success(), "{}", String::from_utf8_lossy(&shown.stderr));
    assert!(String::from_utf8_lossy(&shown.stdout).contains("owner:      payments"));
}

async fn get_as<S>(c: &mut CoordinatorClient<S>, gtid: &str) -> Result<v1::Transaction, tonic::Status>
where
    S: tonic::client::GrpcService<tonic::body::Body>,
    S::Error: Into<tonic::codegen::StdError>,
    S::ResponseBody: tonic::codegen::Body<Data = tonic::codegen::Bytes> + Send + 'static,
    <S::ResponseBody as tonic::codegen::Body>::Error: Into<tonic::codegen::StdError> + Send,
{
    let r = c.get(v1::GetRequest { gtid: gtid.into() }).await?;
    Ok(r.into_inner().transaction.expect("a transaction"))
}

/// Abort of `gtid` as one call on a pipeline stream; its error as a status.
async fn pipelined_abort<S>(c: &mut CoordinatorClient<S>, gtid: &str) -> Result<(), tonic::Status>
where
    S: tonic::client::GrpcService<tonic::body::Body>,
    S::Error: Into<tonic::codegen::StdError>,
    S::ResponseBody: tonic::codegen::Body<Data = tonic::codegen::Bytes> + Send + 'static,
    <S::ResponseBody as tonic::codegen::Body>::Error: Into<tonic::codegen::StdError> + Send,
{
    use v1::coordinator_call::Call;
    use v1::coordinator_reply::Reply;
    let call = v1::CoordinatorCall {
        call_id: 1,
        timeout_ms: 10_000,
        call: Some(Call::Abort(v1::AbortRequest { gtid: gtid.into() })),
        ..Default::default()
    };
    let mut replies = c.pipeline(futures::stream::iter([call])).await?.into_inner();
    let reply = replies.message().await?.expect("a reply");
    match reply.reply {
        Some(Reply::Abort(_)) => Ok(()),
        Some(Reply::Error(e)) => Err(tonic::Status::new(tonic::Code::from(e.code), e.message)),
        other => panic!("unexpected reply {other:?}"),
    }
}
