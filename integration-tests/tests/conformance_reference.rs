//! The participant conformance kit against the reference participant: as a library, and as
//! the `pledge-conformance` binary a participant written in any language is checked with.

use std::net::TcpListener;

use pledge_conformance::{Options, Target};
use pledge_integration_tests::*;

struct Reference {
    dir: TestDir,
    process: Process,
}

impl Target for Reference {
    fn endpoint(&self) -> String {
        self.process.endpoint()
    }

    fn resource(&self) -> String {
        "ref".into()
    }

    async fn work(&mut self, gtid: &str, branch: &str, key: &str) -> Result<(), String> {
        let request = pledge_proto::v1::PutRequest {
            gtid: gtid.into(),
            branch_id: branch.into(),
            key: key.into(),
            value: b"v".to_vec(),
        };
        store_client(&self.process).await.put(request).await.map(drop).map_err(|e| e.to_string())
    }

    async fn visible(&mut self, key: &str) -> Result<bool, String> {
        Ok(read(&mut store_client(&self.process).await, key).await.is_some())
    }

    async fn restart(&mut self) -> Result<(), String> {
        self.process.kill9().await;
        self.process = self.dir.participant("ref", self.process.port(), &[], &[]).await;
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reference_participant_conforms() {
    let dir = TestDir::new("conformance-reference");
    let process = dir.participant("ref", 0, &[], &[]).await;
    let report = pledge_conformance::run(&mut Reference { dir, process }, &Options::default()).await;
    assert!(report.ok(), "{report}");
    assert!(report.skipped.is_empty(), "{report}");
    // Three-phase commit is offered and checked, self-deadlines included.
    assert!(report.passed.contains(&"a_pre_committed_branch_commits_itself_at_its_do_commit_deadline"), "{report}");
    assert!(report.passed.contains(&"three_phase_deadlines_and_epochs_survive_a_restart"), "{report}");
}

/// The binary, as someone with a participant of their own runs it: given the endpoint and a
/// shell command that kill -9s and restarts the participant (here a script around the
/// reference participant's binary, as a supervisor would), it runs every check, restarts
/// included, and exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_conformance_binary_checks_a_participant_it_restarts_itself() {
    let dir = TestDir::new("conformance-binary");
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let d = dir.path().display();
    let participant = bin("pledge-reference-participant").display().to_string();
    let start = format!(
        "nohup {participant} --listen 127.0.0.1:{port} --resource-id orders --data-dir {d}/data \
         >>{d}/participant.out 2>>{d}/participant.log </dev/null & echo $! > {d}/pid"
    );
    let restart =
        format!("kill -9 $(cat {d}/pid); while kill -0 $(cat {d}/pid) 2>/dev/null; do sleep 0.05; done; {start}");
    assert!(std::process::Command::new("sh").arg("-c").arg(&start).status().unwrap().success());
    let output = tokio::process::Command::new(bin("pledge-conformance"))
        .args(["--endpoint", &format!("http://127.0.0.1:{port}"), "--resource", "orders", "--work", "reference"])
        .args(["--restart-command", &restart])
        .output()
        .await
        .unwrap();
    let _ = std::process::Command::new("sh").arg("-c").arg(format!("kill -9 $(cat {d}/pid)")).status();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains("ok       answers_survive_a_restart"), "{stdout}");
    assert!(stdout.contains("ok       three_phase_deadlines_and_epochs_survive_a_restart"), "{stdout}");
    assert!(stdout.contains("0 failed, 0 skipped"), "{stdout}");
}
