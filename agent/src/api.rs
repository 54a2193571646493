//! The HTTP API: JSON-RPC 2.0 at `POST /rpc` (bearer token), `GET /metrics`, `/healthz`,
//! `/readyz`. The API only changes desired state and wakes the reconciler; it never calls
//! podman or systemctl itself.

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant, SystemTime};

use axum::body::{Body, Bytes};
use axum::extract::{Request, State as AxState};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::exec::Exec;
use crate::manifest::{Catalog, GeneratedSecret, SecretKind};
use crate::reconcile::{AppStatus, Shared, TickReport, Wake};
use crate::runtime::BackendKind;
use crate::secrets;
use crate::store::{AppState, Desired};

/// JSON-RPC error codes: the standard ones and the API's own.
pub mod code {
    pub const PARSE: i64 = -32700;
    pub const INVALID_REQUEST: i64 = -32600;
    pub const METHOD_NOT_FOUND: i64 = -32601;
    pub const INVALID_PARAMS: i64 = -32602;
    pub const INTERNAL: i64 = -32603;
    pub const UNKNOWN_APP: i64 = -32001;
    pub const INVALID_MANIFEST: i64 = -32002;
    pub const NOT_INSTALLED: i64 = -32003;
}

/// `node.status`: the agent process and its last tick.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeStatus {
    pub version: String,
    /// Random per agent process: a changed instance is evidence that the agent restarted.
    pub instance: String,
    pub backend: BackendKind,
    /// The first reconcile pass is done.
    pub ready: bool,
    pub converged: bool,
    /// Unix time of the last tick.
    pub last_tick_at: Option<f64>,
    /// How often the agent ticks by itself when nothing is in motion.
    #[serde(default)]
    pub tick_interval_seconds: f64,
    pub last_tick: Option<TickReport>,
    /// Of the desired state: every accepted change increments it.
    pub generation: u64,
    /// Deliberate breakages switched on (test builds only).
    #[serde(default)]
    pub broken: Vec<String>,
}

/// What `package.install`, `uninstall`, `start`, `stop` and `restart` answer: the request was
/// recorded in the desired state; the reconciler acts on it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Accepted {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired: Option<Desired>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub purge: Option<bool>,
}

/// A JSON-RPC error object; `code` is one of [`code`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, thiserror::Error)]
#[error("{message} (code {code})")]
pub struct RpcError {
    pub code: i64,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
}

impl RpcError {
    fn new(code: i64, message: impl Into<String>) -> RpcError {
        RpcError { code, message: message.into(), data: None }
    }
}

/// Largest request body `/rpc` reads: a request is a method name and an app id.
pub const MAX_BODY: usize = 64 * 1024;
/// How long a client may take to send a request's headers, and how long a kept-alive
/// connection may stay idle: one that sends nothing, or trickles, is closed.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client may take to send a request's body once its headers are in.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a shutdown waits for requests in flight (a `node.reconcile` waits for a tick).
const DRAIN: Duration = Duration::from_secs(30);
/// `/healthz` fails after this many tick intervals without progress (the liveness rule
/// the runner's checker applies from outside).
const LIVENESS_INTERVALS: u32 = 3;

/// Name of the API token file in the agent's own directory.
pub const TOKEN_FILE: &str = "api-token";

/// Creates the API token on first start (hex32, 0600, by the secrets core) and returns its
/// digest: the API compares digests, so the token itself is not kept in memory.
pub fn ensure_token(dir: &std::path::Path) -> Result<[u8; 32], secrets::Error> {
    let spec = GeneratedSecret { target: TOKEN_FILE.into(), kind: SecretKind::Hex32 };
    secrets::ensure_in(dir, std::slice::from_ref(&spec))?;
    let path = dir.join(TOKEN_FILE);
    let token =
        std::fs::read(&path).map_err(|source| secrets::Error::Io { path, op: "read API token", source })?;
    Ok(Sha256::digest(&token).into())
}

pub struct Api {
    pub shared: Arc<Shared>,
    pub wake: std::sync::Mutex<mpsc::Sender<Wake>>,
    pub catalog_dir: PathBuf,
    pub backend: BackendKind,
    pub token_digest: [u8; 32],
    /// Random per agent process: a changed instance is evidence that the agent restarted.
    pub instance: String,
    pub tick_interval: Duration,
    /// The reconciler's executor: a tick busy in a slow podman call is still alive.
    pub exec: Arc<Exec>,
}

pub fn router(api: Arc<Api>) -> Router {
    Router::new()
        .route("/rpc", post(rpc))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(api)
}

/// Serves the API on `listener` until `shutdown` resolves (its value is returned), then
/// lets requests in flight finish, for at most [`DRAIN`]. Unlike `axum::serve`, every
/// connection has [`HEADER_TIMEOUT`]: a client cannot hold one open by sending nothing.
pub async fn serve<T>(
    listener: tokio::net::TcpListener,
    api: Arc<Api>,
    shutdown: impl Future<Output = T>,
) -> T {
    let app = router(api);
    let (closing, close) = tokio::sync::watch::channel(());
    let mut connections = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    let reason = loop {
        let stream = tokio::select! {
            reason = &mut shutdown => break reason,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, most likely: let connections close first.
                    tracing::warn!(error = %e, "cannot accept an API connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let service = TowerToHyperService::new(app.clone());
        let mut close = close.clone();
        connections.spawn(async move {
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new()).header_read_timeout(HEADER_TIMEOUT);
            let conn = http.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = close.changed() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
        while connections.try_join_next().is_some() {}
    };
    drop(listener);
    let _ = closing.send(());
    let drained = tokio::time::timeout(DRAIN, async { while connections.join_next().await.is_some() {} });
    if drained.await.is_err() {
        tracing::warn!("API requests still in flight after {DRAIN:?}: dropped");
    }
    reason
}

/// Liveness of the reconciler: fails when no tick has completed for three tick intervals
/// (since start before the first), unless the tick in progress is inside, or just out of,
/// an external call still within its own timeout. A slow `podman build` or `stop -t 600`
/// is progress; a tick that neither finishes nor calls anything is stuck.
async fn healthz(AxState(api): AxState<Arc<Api>>) -> Response {
    match stalled(&api) {
        None => (StatusCode::OK, "ok\n").into_response(),
        Some(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")).into_response(),
    }
}

/// Why the reconciler counts as stuck, if it does.
pub fn stalled(api: &Api) -> Option<String> {
    let allowed = api.tick_interval.saturating_mul(LIVENESS_INTERVALS);
    let last = api.shared.status.lock().unwrap_or_else(|e| e.into_inner()).last_tick_at;
    // Wall clock, as the status records it: a clock step back reads as a recent tick, one
    // forward as a stall until the next tick (at most one interval on a live agent).
    let (since, what) = match last {
        Some(t) => (SystemTime::now().duration_since(t).unwrap_or_default(), "since the last one"),
        None => (api.shared.started.elapsed(), "since the agent started"),
    };
    let idle = api.exec.idle_for();
    if since <= allowed || idle <= allowed {
        return None;
    }
    Some(format!(
        "reconciler stuck: no tick completed for {:.1}s ({what}) and no podman or systemctl call for \
         {:.1}s; allowed {:.1}s ({LIVENESS_INTERVALS} tick intervals)",
        since.as_secs_f64(),
        idle.as_secs_f64(),
        allowed.as_secs_f64()
    ))
}

async fn metrics(AxState(api): AxState<Arc<Api>>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], api.shared.metrics.render()).into_response()
}

async fn readyz(AxState(api): AxState<Arc<Api>>) -> Response {
    if api.shared.ready.load(Ordering::SeqCst) {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "first reconcile pass not done\n").into_response()
    }
}

/// Constant time in the length of the digest: no early exit on the first differing byte.
/// The scheme is case-insensitive (RFC 7235): `bearer x` and `BEARER x` are `Bearer x`.
fn authorized(headers: &HeaderMap, digest: &[u8; 32]) -> bool {
    let Some((scheme, token)) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim_start().split_once(' '))
    else {
        return false;
    };
    if !scheme.eq_ignore_ascii_case("bearer") {
        return false;
    }
    let got: [u8; 32] = Sha256::digest(token.trim().as_bytes()).into();
    got.iter().zip(digest).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

fn error(id: Value, e: RpcError) -> Value {
    json!({ "jsonrpc": "2.0", "id": id, "error": e })
}

/// A JSON-RPC error as an HTTP answer with `status`.
fn refuse(status: StatusCode, code: i64, message: impl Into<String>) -> Response {
    (status, axum::Json(error(Value::Null, RpcError::new(code, message)))).into_response()
}

/// The body of an authorized request: at most [`MAX_BODY`] bytes within [`BODY_TIMEOUT`].
async fn read_body(headers: &HeaderMap, body: Body) -> Result<Bytes, Response> {
    let too_large = || {
        refuse(
            StatusCode::PAYLOAD_TOO_LARGE,
            code::INVALID_REQUEST,
            format!("request body over the limit of {MAX_BODY} bytes"),
        )
    };
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok());
    // Refused on the declared length, before any of it is read.
    if declared.is_some_and(|n| n > MAX_BODY as u64) {
        return Err(too_large());
    }
    match tokio::time::timeout(BODY_TIMEOUT, axum::body::to_bytes(body, MAX_BODY)).await {
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(e)) => {
            let over =
                std::error::Error::source(&e).is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
            Err(if over {
                too_large()
            } else {
                refuse(
                    StatusCode::BAD_REQUEST,
                    code::INVALID_REQUEST,
                    format!("cannot read the request body: {e}"),
                )
            })
        }
        Err(_) => Err(refuse(
            StatusCode::REQUEST_TIMEOUT,
            code::INVALID_REQUEST,
            format!("request body not received within {BODY_TIMEOUT:?}"),
        )),
    }
}

async fn rpc(AxState(api): AxState<Arc<Api>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    // The token before the body: an unauthenticated client gets none of it read.
    if !authorized(&parts.headers, &api.token_digest) {
        let body = error(Value::Null, RpcError::new(code::INVALID_REQUEST, "missing or wrong bearer token"));
        return (StatusCode::UNAUTHORIZED, [(header::WWW_AUTHENTICATE, "Bearer")], axum::Json(body))
            .into_response();
    }
    let body = match read_body(&parts.headers, body).await {
        Ok(body) => body,
        Err(refused) => return refused,
    };
    let req: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return axum::Json(error(Value::Null, RpcError::new(code::PARSE, format!("not JSON: {e}"))))
                .into_response()
        }
    };
    let id = req.get("id").cloned().unwrap_or(Value::Null);
    let (Some("2.0"), Some(method)) =
        (req.get("jsonrpc").and_then(Value::as_str), req.get("method").and_then(Value::as_str))
    else {
        return axum::Json(error(
            id,
            RpcError::new(
                code::INVALID_REQUEST,
                "expected {\"jsonrpc\": \"2.0\", \"method\": ..., \"id\": ...}",
            ),
        ))
        .into_response();
    };
    let params = req.get("params").cloned().unwrap_or(Value::Null);
    let method = method.to_string();
    // Store writes fsync and node.reconcile waits for a tick: off the async threads.
    let response = tokio::task::spawn_blocking(move || match call(&api, &method, &params) {
        Ok(result) => json!({ "jsonrpc": "2.0", "id": id, "result": result }),
        Err(e) => error(id, e),
    })
    .await
    .unwrap_or_else(|e| error(Value::Null, RpcError::new(code::INTERNAL, format!("handler failed: {e}"))));
    axum::Json(response).into_response()
}

fn call(api: &Api, method: &str, params: &Value) -> Result<Value, RpcError> {
    let app = || -> Result<String, RpcError> {
        params.get("id").and_then(Value::as_str).map(str::to_string).ok_or_else(|| {
            RpcError::new(code::INVALID_PARAMS, format!("{method} needs params {{\"id\": APP}}"))
        })
    };
    match method {
        "package.install" => {
            let id = app()?;
            let (catalog, problems) = Catalog::load_lenient(&api.catalog_dir);
            if catalog.get(&id).is_none() {
                let dir = api.catalog_dir.join(&id);
                let mine: Vec<String> =
                    problems.iter().filter(|p| p.file.starts_with(&dir)).map(ToString::to_string).collect();
                return Err(if mine.is_empty() {
                    RpcError::new(code::UNKNOWN_APP, format!("no app `{id}` in the catalog"))
                } else {
                    RpcError {
                        code: code::INVALID_MANIFEST,
                        message: format!("the manifest of `{id}` is invalid"),
                        data: Some(json!(mine)),
                    }
                });
            }
            set(api, &id, |s| {
                let was = s.apps.get(&id).map(|a| a.desired);
                s.apps.insert(id.clone(), AppState::new(Desired::Running));
                // Timed from before the wake: the tick it wakes must find the install pending.
                if !matches!(was, Some(Desired::Running)) {
                    let install = crate::reconcile::Install::new(Instant::now());
                    api.shared.installs.lock().unwrap_or_else(|e| e.into_inner()).insert(id.clone(), install);
                }
                Ok(())
            })?;
            reply(Accepted { id, desired: Some(Desired::Running), purge: None })
        }
        "package.uninstall" => {
            let id = app()?;
            let purge = params.get("purge").and_then(Value::as_bool).unwrap_or(false);
            set(api, &id, |s| {
                installed(s, &id)?;
                s.apps.insert(id.clone(), AppState { purge, ..AppState::new(Desired::Absent) });
                Ok(())
            })?;
            reply(Accepted { id, desired: Some(Desired::Absent), purge: Some(purge) })
        }
        "package.start" | "package.stop" | "package.restart" => {
            let id = app()?;
            // Checked in the same update: the tick may forget an uninstalled app in between.
            set(api, &id, |s| {
                let a = installed(s, &id)?;
                match method {
                    "package.start" => a.desired = Desired::Running,
                    "package.stop" => a.desired = Desired::Stopped,
                    _ => a.restart = true,
                }
                Ok(())
            })?;
            reply(Accepted { id, desired: None, purge: None })
        }
        "package.list" => {
            let status = api.shared.status.lock().unwrap_or_else(|e| e.into_inner());
            let store = api.shared.store.lock().unwrap_or_else(|e| e.into_inner());
            // Desired state is authoritative; status fills in what the last tick observed.
            let apps: Vec<AppStatus> = store
                .state()
                .apps
                .iter()
                .map(|(id, a)| match status.apps.get(id) {
                    Some(s) => AppStatus { desired: a.desired, ..s.clone() },
                    None => AppStatus {
                        id: id.clone(),
                        desired: a.desired,
                        state: None,
                        health: None,
                        up: false,
                        waiting: None,
                        error: None,
                    },
                })
                .collect();
            reply(apps)
        }
        "container-list" => {
            let status = api.shared.status.lock().unwrap_or_else(|e| e.into_inner());
            Ok(json!(status.containers))
        }
        "node.status" => {
            let status = api.shared.status.lock().unwrap_or_else(|e| e.into_inner());
            let generation = api.shared.store.lock().unwrap_or_else(|e| e.into_inner()).state().generation;
            let at = status
                .last_tick_at
                .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                .map(|d| d.as_secs_f64());
            reply(NodeStatus {
                version: env!("CARGO_PKG_VERSION").into(),
                instance: api.instance.clone(),
                backend: api.backend,
                ready: api.shared.ready.load(Ordering::SeqCst),
                converged: status.last_tick.as_ref().is_some_and(|t| t.converged),
                last_tick_at: at,
                tick_interval_seconds: api.tick_interval.as_secs_f64(),
                last_tick: status.last_tick.clone(),
                generation,
                broken: crate::failpoint::breakages().to_vec(),
            })
        }
        "node.reconcile" => {
            let (tx, rx) = mpsc::channel();
            wake(api, Some(tx));
            let report = rx
                .recv_timeout(std::time::Duration::from_secs(900))
                .map_err(|_| RpcError::new(code::INTERNAL, "the reconciler did not answer"))?;
            reply(report)
        }
        _ => Err(RpcError::new(code::METHOD_NOT_FOUND, format!("no method `{method}`"))),
    }
}

fn reply(v: impl Serialize) -> Result<Value, RpcError> {
    serde_json::to_value(v).map_err(|e| RpcError::new(code::INTERNAL, format!("encoding the answer: {e}")))
}

/// The app's desired state, if it is installed.
fn installed<'a>(state: &'a mut crate::store::State, id: &str) -> Result<&'a mut AppState, RpcError> {
    match state.apps.get_mut(id) {
        Some(a) if a.desired != Desired::Absent => Ok(a),
        _ => Err(RpcError::new(code::NOT_INSTALLED, format!("`{id}` is not installed"))),
    }
}

/// Changes desired state, persists it, and wakes the reconciler; `f` refusing changes
/// nothing and wakes nothing.
fn set<R>(
    api: &Api,
    id: &str,
    f: impl FnOnce(&mut crate::store::State) -> Result<R, RpcError>,
) -> Result<R, RpcError> {
    let r = {
        let mut store = api.shared.store.lock().unwrap_or_else(|e| e.into_inner());
        // Decided on a copy under the lock: a refused request writes nothing.
        let mut next = store.state().clone();
        let r = f(&mut next)?;
        store.request(id, |s| *s = next).map_err(|e| {
            RpcError::new(code::INTERNAL, format!("cannot save the desired state of `{id}`: {e}"))
        })?;
        r
    };
    wake(api, None);
    Ok(r)
}

fn wake(api: &Api, reply: Wake) {
    let _ = api.wake.lock().unwrap_or_else(|e| e.into_inner()).send(reply);
}
