//! The participant conformance suite against the reference participant.

use pledge_integration_tests::conformance::{self, Target};
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

    async fn work(&mut self, gtid: &str, branch: &str, key: &str) {
        put(&mut store_client(&self.process).await, gtid, branch, key, "v").await;
    }

    async fn visible(&mut self, key: &str) -> bool {
        read(&mut store_client(&self.process).await, key).await.is_some()
    }

    async fn restart(&mut self) {
        self.process.kill9().await;
        self.process = self.dir.participant("ref", self.process.port(), &[], &[]).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reference_participant_conforms() {
    let dir = TestDir::new("conformance-reference");
    let process = dir.participant("ref", 0, &[], &[]).await;
    conformance::run(&mut Reference { dir, process }).await;
}
