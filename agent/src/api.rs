//! The HTTP API: JSON-RPC 2.0 at `POST /rpc` (bearer token), `GET /metrics`, `/healthz`,
//! `/readyz`. The API only changes desired state and wakes the reconciler; it never calls
//! podman or systemctl itself.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Instant, SystemTime};

use axum::extract::State as AxState;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::manifest::{Catalog, GeneratedSecret, SecretKind};
use crate::reconcile::{Shared, Wake};
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
}

pub fn router(api: Arc<Api>) -> Router {
    Router::new()
        .route("/rpc", post(rpc))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(api)
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
fn authorized(headers: &HeaderMap, digest: &[u8; 32]) -> bool {
    let Some(token) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    let got: [u8; 32] = Sha256::digest(token.trim().as_bytes()).into();
    got.iter().zip(digest).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

fn error(id: Value, code: i64, message: impl Into<String>, data: Option<Value>) -> Value {
    let mut e = json!({ "code": code, "message": message.into() });
    if let Some(d) = data {
        e["data"] = d;
    }
    json!({ "jsonrpc": "2.0", "id": id, "error": e })
}

async fn rpc(AxState(api): AxState<Arc<Api>>, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    if !authorized(&headers, &api.token_digest) {
        let body = error(Value::Null, code::INVALID_REQUEST, "missing or wrong bearer token", None);
        return (StatusCode::UNAUTHORIZED, [(header::WWW_AUTHENTICATE, "Bearer")], axum::Json(body))
            .into_response();
    }
    let req: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return axum::Json(error(Value::Null, code::PARSE, format!("not JSON: {e}"), None))
                .into_response()
        }
    };
    let id = req.get("id").cloned().unwrap_or(Value::Null);
    let (Some("2.0"), Some(method)) =
        (req.get("jsonrpc").and_then(Value::as_str), req.get("method").and_then(Value::as_str))
    else {
        return axum::Json(error(
            id,
            code::INVALID_REQUEST,
            "expected {\"jsonrpc\": \"2.0\", \"method\": ..., \"id\": ...}",
            None,
        ))
        .into_response();
    };
    let params = req.get("params").cloned().unwrap_or(Value::Null);
    let method = method.to_string();
    // Store writes fsync and node.reconcile waits for a tick: off the async threads.
    let response = tokio::task::spawn_blocking(move || match call(&api, &method, &params) {
        Ok(result) => json!({ "jsonrpc": "2.0", "id": id, "result": result }),
        Err((code, message, data)) => error(id, code, message, data),
    })
    .await
    .unwrap_or_else(|e| error(Value::Null, code::INTERNAL, format!("handler failed: {e}"), None));
    axum::Json(response).into_response()
}

type RpcError = (i64, String, Option<Value>);

fn call(api: &Api, method: &str, params: &Value) -> Result<Value, RpcError> {
    let app = || -> Result<String, RpcError> {
        params.get("id").and_then(Value::as_str).map(str::to_string).ok_or((
            code::INVALID_PARAMS,
            format!("{method} needs params {{\"id\": APP}}"),
            None,
        ))
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
                    (code::UNKNOWN_APP, format!("no app `{id}` in the catalog"), None)
                } else {
                    (code::INVALID_MANIFEST, format!("the manifest of `{id}` is invalid"), Some(json!(mine)))
                });
            }
            let fresh = set(api, &id, |s| {
                let was = s.apps.get(&id).map(|a| a.desired);
                s.apps.insert(id.clone(), AppState::new(Desired::Running));
                !matches!(was, Some(Desired::Running))
            })?;
            if fresh {
                api.shared
                    .installs
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(id.clone(), Instant::now());
            }
            Ok(json!({ "id": id, "desired": "running" }))
        }
        "package.uninstall" => {
            let id = app()?;
            let purge = params.get("purge").and_then(Value::as_bool).unwrap_or(false);
            installed(api, &id)?;
            set(api, &id, |s| {
                s.apps.insert(id.clone(), AppState { desired: Desired::Absent, purge, restart: false });
            })?;
            Ok(json!({ "id": id, "desired": "absent", "purge": purge }))
        }
        "package.start" | "package.stop" | "package.restart" => {
            let id = app()?;
            installed(api, &id)?;
            set(api, &id, |s| {
                let a = s.apps.get_mut(&id).expect("checked installed");
                match method {
                    "package.start" => a.desired = Desired::Running,
                    "package.stop" => a.desired = Desired::Stopped,
                    _ => a.restart = true,
                }
            })?;
            Ok(json!({ "id": id }))
        }
        "package.list" => {
            let status = api.shared.status.lock().unwrap_or_else(|e| e.into_inner());
            let store = api.shared.store.lock().unwrap_or_else(|e| e.into_inner());
            // Desired state is authoritative; status fills in what the last tick observed.
            let apps: Vec<Value> = store
                .state()
                .apps
                .iter()
                .map(|(id, a)| match status.apps.get(id) {
                    Some(s) => {
                        let mut v = json!(s);
                        v["desired"] = json!(a.desired);
                        v
                    }
                    None => json!({ "id": id, "desired": a.desired, "up": false }),
                })
                .collect();
            Ok(json!(apps))
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
            Ok(json!({
                "version": env!("CARGO_PKG_VERSION"),
                "instance": api.instance,
                "backend": api.backend.as_str(),
                "ready": api.shared.ready.load(Ordering::SeqCst),
                "converged": status.last_tick.as_ref().is_some_and(|t| t.converged),
                "last_tick_at": at,
                "last_tick": status.last_tick,
                "generation": generation,
                "broken": crate::failpoint::breakages(),
            }))
        }
        "node.reconcile" => {
            let (tx, rx) = mpsc::channel();
            wake(api, Some(tx));
            let report = rx
                .recv_timeout(std::time::Duration::from_secs(900))
                .map_err(|_| (code::INTERNAL, "the reconciler did not answer".to_string(), None))?;
            Ok(json!(report))
        }
        _ => Err((code::METHOD_NOT_FOUND, format!("no method `{method}`"), None)),
    }
}

fn installed(api: &Api, id: &str) -> Result<(), RpcError> {
    let store = api.shared.store.lock().unwrap_or_else(|e| e.into_inner());
    match store.state().apps.get(id) {
        Some(a) if a.desired != Desired::Absent => Ok(()),
        _ => Err((code::NOT_INSTALLED, format!("`{id}` is not installed"), None)),
    }
}

/// Changes desired state, persists it, and wakes the reconciler.
fn set<R>(api: &Api, id: &str, f: impl FnOnce(&mut crate::store::State) -> R) -> Result<R, RpcError> {
    let r = {
        let mut store = api.shared.store.lock().unwrap_or_else(|e| e.into_inner());
        store
            .update(f)
            .map_err(|e| (code::INTERNAL, format!("cannot save the desired state of `{id}`: {e}"), None))?
    };
    wake(api, None);
    Ok(r)
}

fn wake(api: &Api, reply: Wake) {
    let _ = api.wake.lock().unwrap_or_else(|e| e.into_inner()).send(reply);
}
