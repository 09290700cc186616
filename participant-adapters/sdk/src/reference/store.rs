//! The reference participant's work API (`pledge.v1.ReferenceStore`): Put stages a write in a
//! branch, Read reads committed data, BranchStatus tells a branch's state.

use pledge_proto::v1::{self, reference_store_server::ReferenceStore};
use pledge_proto::{BranchId, Gtid};
use tonic::{Request, Response, Status};
use tracing::Instrument;

use super::{BranchState, ReferenceParticipant};

/// The reference participant's work API (`pledge.v1.ReferenceStore`).
pub struct StoreService {
    participant: ReferenceParticipant,
}

impl StoreService {
    pub fn new(participant: ReferenceParticipant) -> Self {
        StoreService { participant }
    }
}

fn ids(gtid: &str, branch: &str) -> Result<(Gtid, BranchId), Status> {
    let g = Gtid::parse_field("gtid", gtid).map_err(|e| Status::invalid_argument(e.to_string()))?;
    let b = BranchId::parse_field("branch_id", branch).map_err(|e| Status::invalid_argument(e.to_string()))?;
    Ok((g, b))
}

#[tonic::async_trait]
impl ReferenceStore for StoreService {
    async fn put(&self, request: Request<v1::PutRequest>) -> Result<Response<v1::PutResponse>, Status> {
        let span = tracing::debug_span!("Put", gtid = request.get_ref().gtid, branch = request.get_ref().branch_id);
        pledge_proto::metrics::observe(
            "Put",
            async {
                let r = request.into_inner();
                let (gtid, branch) = ids(&r.gtid, &r.branch_id)?;
                self.participant.put(gtid, branch, r.key, r.value.into()).await?;
                Ok(Response::new(v1::PutResponse {}))
            }
            .instrument(span),
        )
        .await
    }

    async fn read(&self, request: Request<v1::ReadRequest>) -> Result<Response<v1::ReadResponse>, Status> {
        let span = tracing::debug_span!("Read", key = request.get_ref().key);
        pledge_proto::metrics::observe(
            "Read",
            async {
                let value =
                    self.participant.read(request.into_inner().key).await.map_err(|e| Status::unavailable(e.0))?;
                Ok(Response::new(v1::ReadResponse {
                    found: value.is_some(),
                    value: value.map(|v| v.to_vec()).unwrap_or_default(),
                }))
            }
            .instrument(span),
        )
        .await
    }

    async fn branch_status(
        &self,
        request: Request<v1::BranchStatusRequest>,
    ) -> Result<Response<v1::BranchStatusResponse>, Status> {
        let span =
            tracing::debug_span!("BranchStatus", gtid = request.get_ref().gtid, branch = request.get_ref().branch_id);
        pledge_proto::metrics::observe(
            "BranchStatus",
            async {
                let r = request.into_inner();
                let (gtid, branch) = ids(&r.gtid, &r.branch_id)?;
                let state = self.participant.status(gtid, branch).await.map_err(|e| Status::unavailable(e.0))?;
                let state = match state {
                    BranchState::Unknown => v1::BranchState::Unknown,
                    BranchState::Active => v1::BranchState::Active,
                    BranchState::Prepared => v1::BranchState::Prepared,
                    BranchState::PreCommitted => v1::BranchState::Precommitted,
                    BranchState::Committed => v1::BranchState::Committed,
                    BranchState::Aborted => v1::BranchState::Aborted,
                };
                Ok(Response::new(v1::BranchStatusResponse { state: state as i32 }))
            }
            .instrument(span),
        )
        .await
    }
}
