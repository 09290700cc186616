//! Any instance answers any call: a call about a GTID of a shard another instance owns is
//! forwarded to that owner, and the reply names the owner in its `pledge-owner` metadata so a
//! client can send its next call there directly. A forwarded call carries `pledge-forwarded`
//! and is never forwarded again (an owner that lost the shard meanwhile answers UNAVAILABLE,
//! and the client retries).

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pledge_proto::tls::ClientTls;
use pledge_proto::transport::Target;
use pledge_proto::v1::coordinator_client::CoordinatorClient;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use super::ClusterState;

/// Request metadata of a forwarded call.
pub const FORWARDED: &str = "pledge-forwarded";
/// The address of the caller of a forwarded call (logged where the call is answered).
pub const FORWARDED_FOR: &str = "pledge-forwarded-for";
/// The authenticated principal of the caller of a forwarded call (believed only from a
/// coordinator principal).
pub const FORWARDED_PRINCIPAL: &str = "pledge-forwarded-principal";
/// ... and, when it is an application, its name again: the owner restricts the call to the
/// application's own transactions.
pub const FORWARDED_APPLICATION: &str = "pledge-forwarded-application";
/// Response metadata naming the instance that owns the call's shard.
pub const OWNER: &str = pledge_proto::client::OWNER_METADATA;

pub enum Route {
    Local,
    Remote(String),
}

pub struct Router {
    pub state: Arc<ClusterState>,
    pool: sqlx::PgPool,
    clients: Mutex<HashMap<String, CoordinatorClient<Channel>>>,
    timeout: Duration,
    /// TLS of the calls to other instances (their advertised addresses are then https://).
    tls: Option<ClientTls>,
}

impl Router {
    pub fn new(state: Arc<ClusterState>, pool: sqlx::PgPool, timeout: Duration, tls: Option<ClientTls>) -> Router {
        Router { state, pool, clients: Mutex::new(HashMap::new()), timeout, tls }
    }

    /// Where a call about `shard` is answered. The owners are as of the last lease round; a
    /// shard with none then is looked up in the store (it may have been taken since).
    pub async fn route(&self, shard: u16) -> Result<Route, Status> {
        if self.state.epoch_of(shard).is_some() {
            return Ok(Route::Local);
        }
        if let Some(owner) = self.state.owner_of(shard)
            && owner.instance != self.state.instance_id
        {
            return Ok(Route::Remote(owner.address));
        }
        let looked_up: Result<Option<(String, String)>, sqlx::Error> = sqlx::query_as(
            "SELECT l.holder, i.address FROM pledge_lease l JOIN pledge_instance i ON i.id = l.holder
             WHERE l.shard = $1 AND l.expires_at > now() AND i.expires_at > now()",
        )
        .bind(i32::from(shard))
        .fetch_optional(&self.pool)
        .await;
        match looked_up {
            Ok(Some((instance, address))) if instance != self.state.instance_id => Ok(Route::Remote(address)),
            _ => Err(Status::unavailable(format!(
                "shard {shard} has no live owner at the moment (an instance is taking it over); retry"
            ))),
        }
    }

    /// Where a Begin without an idempotency key goes: here if this instance owns a shard,
    /// else to an instance that does.
    pub fn route_begin(&self) -> Result<Route, Status> {
        if !self.state.owned().is_empty() {
            return Ok(Route::Local);
        }
        let me = &self.state.instance_id;
        (0..self.state.shard_count)
            .filter_map(|s| self.state.owner_of(s))
            .find(|o| o.instance != *me)
            .map(|o| Route::Remote(o.address))
            .ok_or_else(|| Status::unavailable("no instance of the cluster owns a shard at the moment; retry"))
    }

    fn client(&self, address: &str) -> Result<CoordinatorClient<Channel>, Status> {
        let mut clients = self.clients.lock().expect("router clients");
        if let Some(c) = clients.get(address) {
            return Ok(c.clone());
        }
        let target = Target::parse_with(address, self.tls.as_ref())
            .map_err(|e| Status::internal(format!("instance address {address:?} is invalid: {e}")))?
            .configure(|e| e.connect_timeout(self.timeout).tcp_nodelay(true));
        let client = CoordinatorClient::new(target.connect_lazy());
        clients.insert(address.to_string(), client.clone());
        Ok(client)
    }

    /// Sends `message` to the instance at `address` with `call`, marked as forwarded.
    pub async fn forward<T, R, F, Fut>(&self, address: String, message: T, call: F) -> Result<Response<R>, Status>
    where
        F: FnOnce(CoordinatorClient<Channel>, Request<T>) -> Fut,
        Fut: Future<Output = Result<Response<R>, Status>>,
    {
        self.forward_for(None, address, message, call).await
    }

    /// [`Router::forward`], naming the original caller for the owner to log.
    pub async fn forward_for<T, R, F, Fut>(
        &self,
        caller: Option<Caller>,
        address: String,
        message: T,
        call: F,
    ) -> Result<Response<R>, Status>
    where
        F: FnOnce(CoordinatorClient<Channel>, Request<T>) -> Fut,
        Fut: Future<Output = Result<Response<R>, Status>>,
    {
        let client = self.client(&address)?;
        let mut request = Request::new(message);
        request.metadata_mut().insert(FORWARDED, MetadataValue::from_static("1"));
        // The owner's spans for the call join the caller's trace (with trace export on).
        pledge_proto::telemetry::inject(request.metadata_mut());
        if let Some(caller) = caller {
            if let Ok(v) = MetadataValue::try_from(caller.peer) {
                request.metadata_mut().insert(FORWARDED_FOR, v);
            }
            // The caller's identity must arrive as it left: an application whose name could
            // not be sent would act unrestricted at the owner. Principal names are checked
            // when the principals file is read (`auth::valid_name`), so this is a bug guard.
            let value = |name: String| {
                MetadataValue::try_from(name.as_str())
                    .ok()
                    .filter(|v| v.to_str().ok() == Some(name.as_str()))
                    .ok_or_else(|| {
                        Status::internal(format!("the caller's principal name {name:?} cannot be forwarded"))
                    })
            };
            if let Some(p) = caller.principal {
                request.metadata_mut().insert(FORWARDED_PRINCIPAL, value(p)?);
            }
            if let Some(a) = caller.application {
                request.metadata_mut().insert(FORWARDED_APPLICATION, value(a)?);
            }
        }
        request.set_timeout(self.timeout);
        let mut response = call(client, request).await.map_err(|s| {
            // The owner could not be reached or went away mid-call: the shard may be moving;
            // retriable.
            if s.code() == tonic::Code::Cancelled || pledge_proto::client::is_transport_failure(&s) {
                Status::unavailable(format!("forwarding to the shard's owner at {address} failed: {}", s.message()))
            } else {
                s
            }
        })?;
        if let Ok(v) = MetadataValue::try_from(address.as_str()) {
            response.metadata_mut().insert(OWNER, v);
        }
        Ok(response)
    }
}

/// Whether `request` was forwarded by another instance (it is then answered here, whatever).
pub fn forwarded<T>(request: &Request<T>) -> bool {
    request.metadata().contains_key(FORWARDED)
}

/// Who made a call: its address and, when calls are authenticated, its principal's name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub peer: String,
    pub principal: Option<String>,
    /// The principal, when it is an application: it may act only on its own transactions.
    pub application: Option<String>,
}

/// The original caller of a forwarded call, as the forwarding instance named it.
pub fn forwarded_caller<T>(request: &Request<T>) -> Option<Caller> {
    if !forwarded(request) {
        return None;
    }
    let text = |key| request.metadata().get(key).and_then(|v| v.to_str().ok()).map(str::to_string);
    Some(Caller {
        peer: text(FORWARDED_FOR)?,
        principal: text(FORWARDED_PRINCIPAL),
        application: text(FORWARDED_APPLICATION),
    })
}
