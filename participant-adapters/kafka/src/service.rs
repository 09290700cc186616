//! `pledge.v1.KafkaBranch`: produce records and add consumer offsets inside a branch.

use pledge_proto::v1::{self, kafka_branch_server::KafkaBranch};
use pledge_proto::{BranchId, Gtid, IdError, ResourceId};
use tonic::{Request, Response, Status};
use tracing::Instrument;

use pledge_sdk::status_of;

use crate::{KafkaParticipant, Record};

pub struct BranchService {
    participant: KafkaParticipant,
}

impl BranchService {
    pub fn new(participant: KafkaParticipant) -> Self {
        BranchService { participant }
    }
}

fn ids(resource: &str, gtid: &str, branch: &str) -> Result<(ResourceId, Gtid, BranchId), Status> {
    let invalid = |e: IdError| Status::invalid_argument(e.to_string());
    Ok((
        ResourceId::parse_field("resource_id", resource).map_err(invalid)?,
        Gtid::parse_field("gtid", gtid).map_err(invalid)?,
        BranchId::parse_field("branch_id", branch).map_err(invalid)?,
    ))
}

#[tonic::async_trait]
impl KafkaBranch for BranchService {
    async fn produce(&self, request: Request<v1::ProduceRequest>) -> Result<Response<v1::ProduceResponse>, Status> {
        pledge_proto::metrics::observe("Produce", async {
            let r = request.into_inner();
            let (resource, gtid, branch) = ids(&r.resource_id, &r.gtid, &r.branch_id)?;
            if let Some((i, _)) = r.records.iter().enumerate().find(|(_, rec)| rec.topic.is_empty()) {
                return Err(Status::invalid_argument(format!("records[{i}].topic: is required")));
            }
            let records = r
                .records
                .into_iter()
                .map(|rec| Record {
                    topic: rec.topic,
                    partition: rec.partition,
                    key: rec.key,
                    value: rec.value,
                    headers: rec.headers.into_iter().map(|h| (h.key, h.value)).collect(),
                })
                .collect();
            let request_id = (!r.request_id.is_empty()).then_some(r.request_id);
            let span = tracing::debug_span!("produce", %resource, %gtid, branch = %branch, request_id);
            let positions = self
                .participant
                .produce(&resource, gtid, branch, records, request_id)
                .instrument(span)
                .await
                .map_err(|e| status_of(&e))?;
            Ok(Response::new(v1::ProduceResponse {
                positions: positions
                    .into_iter()
                    .map(|(partition, offset)| v1::RecordPosition { partition, offset })
                    .collect(),
            }))
        })
        .await
    }

    async fn add_offsets(
        &self,
        request: Request<v1::AddOffsetsRequest>,
    ) -> Result<Response<v1::AddOffsetsResponse>, Status> {
        pledge_proto::metrics::observe("AddOffsets", async {
            let r = request.into_inner();
            let (resource, gtid, branch) = ids(&r.resource_id, &r.gtid, &r.branch_id)?;
            if r.group_id.is_empty() {
                return Err(Status::invalid_argument("group_id: is required"));
            }
            let offsets = r.offsets.into_iter().map(|o| (o.topic, o.partition, o.offset)).collect();
            let span = tracing::debug_span!("add_offsets", %resource, %gtid, branch = %branch, group = r.group_id);
            let participant = self.participant.clone();
            let work = async move { participant.add_offsets(&resource, gtid, branch, &r.group_id, offsets).await };
            pledge_sdk::server::detached(work.instrument(span)).await?.map_err(|e| status_of(&e))?;
            Ok(Response::new(v1::AddOffsetsResponse {}))
        })
        .await
    }
}
