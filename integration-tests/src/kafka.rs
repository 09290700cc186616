//! Helpers for tests against the real Kafka broker the project's scripts start: the adapter's
//! work API and read_committed reads.

use std::time::Duration;

use pledge_proto::v1::{self, kafka_branch_client::KafkaBranchClient};
use tonic::transport::Channel;

use crate::{EVENTUALLY_TIMEOUT, Process, read_committed};

pub fn unique(name: &str) -> String {
    format!("{name}-{:08x}", fastrand::u32(..))
}

pub async fn kafka_client(p: &Process) -> KafkaBranchClient<Channel> {
    KafkaBranchClient::connect(p.endpoint()).await.unwrap()
}

pub async fn produce(
    k: &mut KafkaBranchClient<Channel>,
    gtid: &str,
    branch_id: &str,
    topic: &str,
    records: &[(&str, &str)],
) -> Result<v1::ProduceResponse, tonic::Status> {
    k.produce(v1::ProduceRequest {
        resource_id: "kafka".into(),
        gtid: gtid.into(),
        branch_id: branch_id.into(),
        records: records
            .iter()
            .map(|(key, value)| v1::KafkaRecord {
                topic: topic.into(),
                partition: Some(0),
                key: key.as_bytes().to_vec(),
                value: value.as_bytes().to_vec(),
                headers: vec![],
            })
            .collect(),
        request_id: String::new(),
    })
    .await
    .map(tonic::Response::into_inner)
}

/// The keys a read_committed reader sees in `topic` once they are `want`, or what it sees when
/// the tests' patience runs out (for the assertion to show). A commit is answered before the
/// broker has written the transaction's markers, and a reader sees the records only after.
pub async fn committed_keys(topic: &str, want: &[&str]) -> Vec<String> {
    let deadline = tokio::time::Instant::now() + EVENTUALLY_TIMEOUT;
    loop {
        let seen: Vec<String> = read_committed(topic).await.into_iter().map(|(k, _)| k).collect();
        if seen == want || tokio::time::Instant::now() >= deadline {
            return seen;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
