//! The API's routes: each handler is one call on [`RunningVm`], its OpenAPI description next to
//! it (utoipa), and every error a JSON [`ErrorBody`] with a 4xx status for a client's mistake.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use utoipa::OpenApi;
use vnode_api::{
    paths, Counters, ErrorBody, ExCacheResize, MemSpare, ShutdownRequest, SnapshotInfo,
    SnapshotRequest, VmInfo, DEFAULT_SHUTDOWN_DEADLINE_SECS,
};

use crate::vm::{LifecycleError, RunningVm};

/// The OpenAPI document of the API, generated from the handlers below.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "vNode control API",
        description = "A running vnode's API on its Unix socket (`vnode run --api-socket PATH`)."
    ),
    paths(
        get_vm,
        get_counters,
        get_metrics,
        put_pause,
        put_resume,
        put_shutdown,
        put_stop,
        put_excache,
        put_mem_spare,
        put_snapshot
    )
)]
pub struct ApiDoc;

/// How long `PUT /vm/stop` waits for the VM to stop.
const STOP_WAIT: Duration = Duration::from_secs(30);

/// An error answer: a status and `{"error": "..."}`.
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(ErrorBody { error: self.1 })).into_response()
    }
}

impl From<LifecycleError> for ApiError {
    fn from(e: LifecycleError) -> Self {
        let status = match &e {
            LifecycleError::WrongState(_)
            | LifecycleError::NoExCache
            | LifecycleError::NotSnapshottable(_)
            | LifecycleError::Memory(crate::memory::RemoteMemError::Spare(_)) => {
                StatusCode::CONFLICT
            }
            LifecycleError::Memory(crate::memory::RemoteMemError::Limit { .. }) => {
                StatusCode::BAD_REQUEST
            }
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(status, e.to_string())
    }
}

type Vm = State<Arc<RunningVm>>;
type ApiResult<T> = Result<Json<T>, ApiError>;

/// The router for `vm`.
pub fn router(vm: Arc<RunningVm>) -> Router {
    Router::new()
        .route(paths::VM, get(get_vm))
        .route(paths::COUNTERS, get(get_counters))
        .route(paths::METRICS, get(get_metrics))
        .route(paths::PAUSE, put(put_pause))
        .route(paths::RESUME, put(put_resume))
        .route(paths::SHUTDOWN, put(put_shutdown))
        .route(paths::STOP, put(put_stop))
        .route(paths::EXCACHE, put(put_excache))
        .route(paths::MEM_SPARE, put(put_mem_spare))
        .route(paths::SNAPSHOT, put(put_snapshot))
        .method_not_allowed_fallback(|| async {
            ApiError(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed here".into(),
            )
        })
        .fallback(|uri: axum::http::Uri| async move {
            ApiError(
                StatusCode::NOT_FOUND,
                format!("no such path: {}", uri.path()),
            )
        })
        .with_state(vm)
}

/// Runs a lifecycle call that may block (a pause waits for vCPUs) off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, LifecycleError> + Send + 'static,
) -> ApiResult<T> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map(Json).map_err(ApiError::from),
        Err(e) => Err(ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("request failed: {e}"),
        )),
    }
}

/// Parses a JSON body (an empty body is the type's default when `empty_ok`).
fn parse<T: DeserializeOwned + Default>(body: &Bytes, empty_ok: bool) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) && empty_ok {
        return Ok(T::default());
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("bad request body: {e}")))
}

/// The VM's state and configuration.
#[utoipa::path(get, path = "/vm", responses((status = 200, body = VmInfo)))]
async fn get_vm(State(vm): Vm) -> Json<VmInfo> {
    Json(vm.info())
}

/// Every counter of the VM (the object `--stats` prints at exit).
#[utoipa::path(get, path = "/vm/counters", responses((status = 200, body = Counters)))]
async fn get_counters() -> Json<Counters> {
    Json(crate::metrics::counters())
}

/// The counters and the ExCache's fault-latency histograms in Prometheus text format.
#[utoipa::path(get, path = "/metrics", responses(
    (status = 200, description = "Prometheus text exposition format 0.0.4", body = String, content_type = "text/plain")
))]
async fn get_metrics() -> Response {
    let body = super::metrics::exposition();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

/// Pauses every vCPU (each out of KVM_RUN) and device; answers once all are parked.
#[utoipa::path(put, path = "/vm/pause", responses(
    (status = 200, body = VmInfo),
    (status = 409, description = "the VM is not running", body = ErrorBody),
    (status = 500, description = "some vCPUs or devices did not park in time", body = ErrorBody)
))]
async fn put_pause(State(vm): Vm) -> ApiResult<VmInfo> {
    blocking(move || vm.pause()).await
}

/// Lets a paused VM go on.
#[utoipa::path(put, path = "/vm/resume", responses(
    (status = 200, body = VmInfo),
    (status = 409, description = "the VM is not paused", body = ErrorBody)
))]
async fn put_resume(State(vm): Vm) -> ApiResult<VmInfo> {
    blocking(move || vm.resume()).await
}

/// Presses the guest's ACPI power button and stops the VM at the deadline if the guest has not
/// powered off by then. Answers at once.
#[utoipa::path(put, path = "/vm/shutdown", request_body(content = Option<ShutdownRequest>), responses(
    (status = 202, body = VmInfo),
    (status = 400, description = "bad body or deadline", body = ErrorBody),
    (status = 409, description = "the VM is already stopping", body = ErrorBody)
))]
async fn put_shutdown(State(vm): Vm, body: Bytes) -> Result<(StatusCode, Json<VmInfo>), ApiError> {
    let req: ShutdownRequest = parse(&body, true)?;
    let secs = req.deadline_secs.unwrap_or(DEFAULT_SHUTDOWN_DEADLINE_SECS);
    let deadline = Duration::try_from_secs_f64(secs)
        .ok()
        .filter(|d| *d <= Duration::from_secs(24 * 3600))
        .ok_or_else(|| {
            ApiError(
                StatusCode::BAD_REQUEST,
                format!("deadline_secs {secs} must be between 0 and 86400"),
            )
        })?;
    let info = blocking(move || vm.shutdown(deadline)).await?;
    Ok((StatusCode::ACCEPTED, info))
}

/// Stops the VM now; answers once vCPUs and devices are stopped. vnode then frees guest RAM on
/// the memory servers and exits.
#[utoipa::path(put, path = "/vm/stop", responses(
    (status = 200, body = VmInfo),
    (status = 409, description = "the VM is already stopped", body = ErrorBody)
))]
async fn put_stop(State(vm): Vm) -> ApiResult<VmInfo> {
    blocking(move || {
        if vm.state() == vnode_api::VmState::Stopped {
            return Err(LifecycleError::WrongState(vnode_api::VmState::Stopped));
        }
        Ok(vm.stop_and_wait("stopped through the API", STOP_WAIT))
    })
    .await
}

/// Grows or shrinks the ExCache of a running guest: shrinking evicts down to the new size in the
/// background (the guest sees only misses).
#[utoipa::path(put, path = "/vm/excache", request_body = ExCacheResize, responses(
    (status = 200, body = VmInfo),
    (status = 400, description = "bad body or size", body = ErrorBody),
    (status = 409, description = "no ExCache, or the VM is stopping", body = ErrorBody)
))]
async fn put_excache(State(vm): Vm, body: Bytes) -> ApiResult<VmInfo> {
    let req: Option<ExCacheResize> = parse(&body, false)?;
    let req = req.ok_or_else(|| ApiError(StatusCode::BAD_REQUEST, "a body is required".into()))?;
    let bytes = req
        .local_mem
        .bytes()
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.to_string()))?;
    blocking(move || vm.resize_excache(bytes)).await
}

/// Gives replicated guest RAM a spare memory server: when a replica is lost (now or later), a
/// new copy is made there in the background while the guest runs (`excache.replication` in
/// the counters shows `re-replicating`, then `healthy`).
#[utoipa::path(put, path = "/vm/mem/spare", request_body = MemSpare, responses(
    (status = 200, body = VmInfo),
    (status = 400, description = "bad body", body = ErrorBody),
    (status = 409, description = "guest RAM is not replicated, or the VM is stopping", body = ErrorBody)
))]
async fn put_mem_spare(State(vm): Vm, body: Bytes) -> ApiResult<VmInfo> {
    let req: Option<MemSpare> = parse(&body, false)?;
    let req = req.ok_or_else(|| ApiError(StatusCode::BAD_REQUEST, "a body is required".into()))?;
    if !req.server.contains(':') {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("server {:?} is not HOST:PORT", req.server),
        ));
    }
    blocking(move || vm.add_mem_spare(&req.server)).await
}

/// Pauses the VM (if it runs), writes its vCPU, VM and device state and its configuration to
/// `path` on the vnode's host (with guest RAM when it is local; with remote RAM the ExCache's
/// dirty pages go to the memory servers first), and leaves it paused. `PUT /vm/stop` then keeps
/// guest RAM on the servers for `vnode restore --snapshot PATH`; `PUT /vm/resume` goes on here.
#[utoipa::path(put, path = "/vm/snapshot", request_body = SnapshotRequest, responses(
    (status = 200, body = SnapshotInfo),
    (status = 400, description = "bad body", body = ErrorBody),
    (status = 409, description = "the VM is stopping, or cannot be snapshotted (--mem-server local)", body = ErrorBody),
    (status = 500, description = "the pause, the flush or the write failed", body = ErrorBody)
))]
async fn put_snapshot(State(vm): Vm, body: Bytes) -> ApiResult<SnapshotInfo> {
    let req: Option<SnapshotRequest> = parse(&body, false)?;
    let req = req.ok_or_else(|| ApiError(StatusCode::BAD_REQUEST, "a body is required".into()))?;
    if req.path.is_empty() {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "path must not be empty".into(),
        ));
    }
    blocking(move || vm.snapshot(std::path::Path::new(&req.path))).await
}

/// The OpenAPI document as pretty JSON (what `docs/api/vnode.openapi.json` holds).
pub fn openapi_json() -> String {
    ApiDoc::openapi()
        .to_pretty_json()
        .expect("the OpenAPI document always serializes")
}

#[cfg(test)]
mod tests {
    /// The committed document is what the code generates: regenerate it with
    /// `cargo run --bin vnode -- openapi > docs/api/vnode.openapi.json`.
    #[test]
    fn committed_openapi_document_is_current() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../docs/api/vnode.openapi.json"
        );
        let committed = std::fs::read_to_string(path).expect("docs/api/vnode.openapi.json");
        assert!(
            committed.trim_end() == super::openapi_json().trim_end(),
            "docs/api/vnode.openapi.json is stale: run \
             `cargo run --bin vnode -- openapi > docs/api/vnode.openapi.json`"
        );
    }
}
