//! The manager's REST API (axum, JSON bodies). The OpenAPI document is generated from these
//! handlers and the types in `vnode_manager_client::types` ([`ApiDoc`]); it is committed as
//! `docs/api/manager.openapi.json` and a test fails when it is stale.
//!
//! Every error is a JSON [`ErrorBody`] with a 4xx status for what the caller got wrong (invalid
//! JSON, bad sizes, unknown ids, nothing fits) and 503 (naming the leader) on a follower; a 500
//! means a bug or a failed store. Each mutation is written to the store before it is
//! acknowledged.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use tokio::sync::{Mutex, MutexGuard};
use utoipa::OpenApi;
use vnode_manager_client::types::*;

use crate::registry::{HostRecord, Registry, RegistryError};
use crate::store::{Role, Store, StoreError};

/// What every handler shares.
pub struct App {
    reg: Mutex<Registry>,
    /// The leadership term the registry was loaded in (0: never loaded).
    loaded: std::sync::atomic::AtomicU64,
    store: Arc<dyn Store>,
    me: String,
}

#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    body: ErrorBody,
}

impl ApiError {
    fn new(status: StatusCode, msg: impl Into<String>) -> ApiError {
        ApiError {
            status,
            body: ErrorBody {
                error: msg.into(),
                leader: None,
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body)).into_response()
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> ApiError {
        let status = match e {
            RegistryError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
            RegistryError::NoFit(_) | RegistryError::NameTaken(_) => StatusCode::CONFLICT,
            RegistryError::KindMismatch { .. } => StatusCode::CONFLICT,
            RegistryError::UnknownHost(_) => StatusCode::NOT_FOUND,
        };
        ApiError::new(status, e.to_string())
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        match e {
            StoreError::NotLeader => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "this manager lost the leadership; retry",
            ),
            e => {
                tracing::error!(error = %e, "store write failed");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("state store: {e}"),
                )
            }
        }
    }
}

type ApiResult<T> = Result<T, ApiError>;

fn parse<T: serde::de::DeserializeOwned>(body: &Bytes) -> ApiResult<T> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("invalid JSON body: {e}")))
}

impl App {
    pub fn new(reg: Registry, store: Arc<dyn Store>, me: String) -> Arc<App> {
        Arc::new(App {
            reg: Mutex::new(reg),
            loaded: 0.into(),
            store,
            me,
        })
    }

    /// The registry, if this manager leads, reloaded from the store when leadership is new.
    async fn lead(&self) -> ApiResult<MutexGuard<'_, Registry>> {
        use std::sync::atomic::Ordering;
        let term = match self.store.role() {
            Role::Leader { term } => term,
            Role::Follower { leader } => {
                return Err(ApiError {
                    status: StatusCode::SERVICE_UNAVAILABLE,
                    body: ErrorBody {
                        error: match &leader {
                            Some(l) => format!("not the leader: the leader is {l}"),
                            None => "not the leader, and no leader is elected yet; retry".into(),
                        },
                        leader,
                    },
                })
            }
        };
        let mut reg = self.reg.lock().await;
        if self.loaded.load(Ordering::Acquire) != term {
            let snap = self.store.load().await?;
            tracing::info!(
                term,
                hosts = snap.hosts.len(),
                vnodes = snap.vnodes.len(),
                "state loaded"
            );
            reg.load(snap.hosts, snap.vnodes, Instant::now());
            self.loaded.store(term, Ordering::Release);
        }
        Ok(reg)
    }

    /// After a failed write the in-memory state may be ahead of the store: reload next time.
    fn invalidate(&self) {
        self.loaded.store(0, std::sync::atomic::Ordering::Release);
    }
}

macro_rules! stored {
    ($app:expr, $e:expr) => {
        match $e.await {
            Ok(v) => v,
            Err(e) => {
                $app.invalidate();
                return Err(e.into());
            }
        }
    };
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "vNode manager",
        description = "Registry, placement and vNode lifecycle."
    ),
    paths(
        register_host,
        heartbeat,
        list_hosts,
        get_host,
        create_vnode,
        list_vnodes,
        get_vnode,
        delete_vnode,
        stats,
        leader
    ),
    components(schemas(
        ErrorBody,
        Size,
        HostKind,
        Capacity,
        RegisterHost,
        HostView,
        CreateVnode,
        Placement,
        RegionPlacement,
        DiskPlacement,
        VnodeState,
        VnodeView,
        VnodeReport,
        Heartbeat,
        Assignment,
        ExportSpec,
        ServedExport,
        HeartbeatReply,
        LeaderView,
        ClusterStats
    ))
)]
pub struct ApiDoc;

/// The router with every route, plus JSON 404/405 fallbacks.
pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/hosts", get(list_hosts))
        .route("/hosts/{id}", put(register_host).get(get_host))
        .route("/hosts/{id}/heartbeat", post(heartbeat))
        .route("/vnodes", post(create_vnode).get(list_vnodes))
        .route("/vnodes/{id}", get(get_vnode).delete(delete_vnode))
        .route("/stats", get(stats))
        .route("/leader", get(leader))
        .route("/openapi.json", get(openapi))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such endpoint") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method not allowed here")
        })
        .with_state(app)
}

async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

/// Register a host (idempotent: again after each restart).
#[utoipa::path(put, path = "/hosts/{id}", request_body = RegisterHost,
    params(("id" = String, Path, description = "host name")),
    responses((status = 200, body = HostView), (status = 400, body = ErrorBody),
              (status = 409, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn register_host(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<Json<HostView>> {
    let r: RegisterHost = parse(&body)?;
    if id.is_empty() || id.len() > 64 || !id.chars().all(|c| c.is_ascii_graphic()) {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "a host id is 1 to 64 printable characters",
        ));
    }
    let rec = HostRecord {
        id,
        kind: r.kind,
        addr: r.addr,
        capacity: r.capacity,
    };
    let mut reg = app.lead().await?;
    let now = Instant::now();
    if let Some(changed) = reg.register(rec.clone(), now)? {
        stored!(app, app.store.put_host(&changed));
        tracing::info!(host = %rec.id, kind = %rec.kind, addr = %rec.addr, "host registered");
    }
    Ok(Json(reg.host_view(&rec, now)))
}

/// A host's heartbeat: its usage and vNodes; the reply says what it must run, keep and serve.
#[utoipa::path(post, path = "/hosts/{id}/heartbeat", request_body = Heartbeat,
    params(("id" = String, Path, description = "host name")),
    responses((status = 200, body = HeartbeatReply), (status = 404, body = ErrorBody),
              (status = 400, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn heartbeat(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<Json<HeartbeatReply>> {
    let hb: Heartbeat = parse(&body)?;
    let mut reg = app.lead().await?;
    let (changed, reply) = reg.heartbeat(&id, hb, Instant::now())?;
    for v in &changed {
        stored!(app, app.store.put_vnode(v));
        tracing::info!(vnode = v.id, state = ?v.state, exit_code = ?v.exit_code, "vnode state");
    }
    Ok(Json(reply))
}

/// Every host: capacity, allocation, reported usage, up or down, and what it hosts.
#[utoipa::path(get, path = "/hosts", responses((status = 200, body = Vec<HostView>)))]
async fn list_hosts(State(app): State<Arc<App>>) -> ApiResult<Json<Vec<HostView>>> {
    Ok(Json(app.lead().await?.hosts(Instant::now())))
}

/// One host.
#[utoipa::path(get, path = "/hosts/{id}", params(("id" = String, Path, description = "host name")),
    responses((status = 200, body = HostView), (status = 404, body = ErrorBody)))]
async fn get_host(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
) -> ApiResult<Json<HostView>> {
    let reg = app.lead().await?;
    let h = reg
        .host(&id)
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("no host {id:?}")))?;
    Ok(Json(reg.host_view(h, Instant::now())))
}

/// Place and create a vNode. 409 when nothing fits (the message names the resource and hosts).
#[utoipa::path(post, path = "/vnodes", request_body = CreateVnode,
    responses((status = 201, body = VnodeView), (status = 400, body = ErrorBody),
              (status = 409, body = ErrorBody), (status = 422, body = ErrorBody),
              (status = 503, body = ErrorBody)))]
async fn create_vnode(
    State(app): State<Arc<App>>,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<VnodeView>)> {
    let spec: CreateVnode = parse(&body)?;
    crate::registry::validate(&spec)?;
    let mut reg = app.lead().await?;
    let id = stored!(app, app.store.next_id());
    let now = Instant::now();
    let rec = reg.place(&spec, id, now)?;
    stored!(app, app.store.put_vnode(&rec));
    tracing::info!(vnode = id, name = %rec.name, placement = ?rec.placement, "vnode placed");
    let view = reg.vnode_view(&rec, now);
    reg.insert(rec);
    Ok((StatusCode::CREATED, Json(view)))
}

/// Every vNode.
#[utoipa::path(get, path = "/vnodes", responses((status = 200, body = Vec<VnodeView>)))]
async fn list_vnodes(State(app): State<Arc<App>>) -> ApiResult<Json<Vec<VnodeView>>> {
    Ok(Json(app.lead().await?.vnodes(Instant::now())))
}

fn not_found(key: &str) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, format!("no vNode {key:?}"))
}

/// One vNode, by id or name.
#[utoipa::path(get, path = "/vnodes/{id}", params(("id" = String, Path, description = "id or name")),
    responses((status = 200, body = VnodeView), (status = 404, body = ErrorBody)))]
async fn get_vnode(
    State(app): State<Arc<App>>,
    Path(key): Path<String>,
) -> ApiResult<Json<VnodeView>> {
    let reg = app.lead().await?;
    let v = reg.find(&key).ok_or_else(|| not_found(&key))?;
    Ok(Json(reg.vnode_view(v, Instant::now())))
}

/// Delete a vNode: its agent stops it, its regions and export are freed on the servers.
#[utoipa::path(delete, path = "/vnodes/{id}", params(("id" = String, Path, description = "id or name")),
    responses((status = 200, body = VnodeView), (status = 404, body = ErrorBody)))]
async fn delete_vnode(
    State(app): State<Arc<App>>,
    Path(key): Path<String>,
) -> ApiResult<Json<VnodeView>> {
    let mut reg = app.lead().await?;
    let id = reg.find(&key).ok_or_else(|| not_found(&key))?.id;
    stored!(app, app.store.delete_vnode(id));
    let view = reg.vnode_view(reg.vnode(id).expect("found above"), Instant::now());
    reg.remove(id);
    tracing::info!(vnode = id, "vnode deleted");
    Ok(Json(view))
}

/// Every vNode's counters (ExCache figures) and every server's usage.
#[utoipa::path(get, path = "/stats", responses((status = 200, body = ClusterStats)))]
async fn stats(State(app): State<Arc<App>>) -> ApiResult<Json<ClusterStats>> {
    let reg = app.lead().await?;
    let now = Instant::now();
    Ok(Json(ClusterStats {
        vnodes: reg.vnodes(now),
        hosts: reg.hosts(now),
    }))
}

/// Whether this manager leads, and who does. Answered by followers too.
#[utoipa::path(get, path = "/leader", responses((status = 200, body = LeaderView)))]
async fn leader(State(app): State<Arc<App>>) -> Json<LeaderView> {
    let (leader, leader_url) = match app.store.role() {
        Role::Leader { .. } => (true, Some(app.me.clone())),
        Role::Follower { leader } => (false, leader),
    };
    Json(LeaderView {
        leader,
        leader_url,
        me: app.me.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The committed OpenAPI document is what the code generates (`UPDATE_OPENAPI=1` rewrites it).
    #[test]
    fn openapi_document_is_current() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../docs/api/manager.openapi.json");
        let now = ApiDoc::openapi().to_pretty_json().unwrap() + "\n";
        if std::env::var_os("UPDATE_OPENAPI").is_some() {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &now).unwrap();
        }
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == now,
            "{} is stale: run UPDATE_OPENAPI=1 cargo test -p vnode-manager openapi",
            path.display()
        );
    }
}
