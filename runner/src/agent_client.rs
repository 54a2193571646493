//! The runner's one client of the agent's API, typed with the agent's own wire types
//! (`archy_agent::api`), so the runner and the agent cannot disagree about a field.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use archy_agent::api::{code, Accepted, NodeStatus, RpcError};
use archy_agent::reconcile::{AppStatus, TickReport};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};

use crate::interrupt;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The agent answered with a JSON-RPC error.
    #[error("{method}: {source}")]
    Rpc { method: String, source: RpcError },
    /// No answer, or one that is not the API's (agent down, connection refused, bad body).
    #[error("{method} at {addr}: {message}")]
    Transport { method: String, addr: String, message: String },
}

impl Error {
    pub fn code(&self) -> Option<i64> {
        match self {
            Error::Rpc { source, .. } => Some(source.code),
            Error::Transport { .. } => None,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Where the token comes from: a node, or (for an agent the runner started itself) a file.
pub type TokenSource<'n> = Box<dyn Fn() -> anyhow::Result<String> + Send + Sync + 'n>;

pub struct AgentClient<'n> {
    addr: String,
    read_token: TokenSource<'n>,
    /// Read once; read again only when the agent refuses it (a node whose agent made a new one).
    token: Mutex<Option<String>>,
    http: ureq::Agent,
}

impl<'n> AgentClient<'n> {
    /// The agent at `addr` (host:port), its token read by `read_token`.
    pub fn at(addr: String, read_token: TokenSource<'n>) -> AgentClient<'n> {
        // No kept-alive connections: a request on a pooled connection across a partition
        // waits for the global timeout where a new one fails at once (found by the smoke
        // suite's partition scenario). A tick may take long; connecting never should.
        let http = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_idle_connections(0)
            .timeout_connect(Some(Duration::from_secs(10)))
            .timeout_global(Some(Duration::from_secs(900)))
            .build()
            .new_agent();
        AgentClient { addr, read_token, token: Mutex::new(None), http }
    }

    fn transport(&self, method: &str, message: impl std::fmt::Display) -> Error {
        Error::Transport { method: method.into(), addr: self.addr.clone(), message: message.to_string() }
    }

    fn token(&self, method: &str, fresh: bool) -> Result<String> {
        let mut t = self.token.lock().unwrap_or_else(|e| e.into_inner());
        if fresh || t.is_none() {
            *t = Some((self.read_token)().map_err(|e| self.transport(method, format!("{e:#}")))?);
        }
        Ok(t.clone().unwrap_or_default())
    }

    /// One JSON-RPC call, its result read as `T`.
    pub fn rpc<T: DeserializeOwned>(&self, method: &str, params: Value) -> Result<T> {
        let body = json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params});
        let url = format!("http://{}/rpc", self.addr);
        let mut fresh = false;
        let v: Value = loop {
            let token = self.token(method, fresh)?;
            let mut resp = self
                .http
                .post(&url)
                .header("Authorization", &format!("Bearer {token}"))
                .send_json(&body)
                .map_err(|e| self.transport(method, e))?;
            if resp.status() == 401 && !fresh {
                fresh = true;
                continue;
            }
            break resp.body_mut().read_json().map_err(|e| self.transport(method, e))?;
        };
        if let Some(e) = v.get("error") {
            let source: RpcError =
                serde_json::from_value(e.clone()).map_err(|e| self.transport(method, e))?;
            return Err(Error::Rpc { method: method.into(), source });
        }
        serde_json::from_value(v.get("result").cloned().unwrap_or(Value::Null))
            .map_err(|e| self.transport(method, format!("unexpected answer: {e}")))
    }

    pub fn list(&self) -> Result<Vec<AppStatus>> {
        self.rpc("package.list", Value::Null)
    }

    pub fn app(&self, id: &str) -> Result<Option<AppStatus>> {
        Ok(self.list()?.into_iter().find(|a| a.id == id))
    }

    pub fn status(&self) -> Result<NodeStatus> {
        self.rpc("node.status", Value::Null)
    }

    /// A tick now, and what it did.
    pub fn reconcile(&self) -> Result<TickReport> {
        self.rpc("node.reconcile", Value::Null)
    }

    /// `package.<op>` on one app.
    pub fn op(&self, op: &str, id: &str) -> Result<Accepted> {
        self.rpc(&format!("package.{op}"), json!({"id": id}))
    }

    /// Uninstall, with the app's data and secrets when `purge`; not installed is no error.
    pub fn uninstall(&self, id: &str, purge: bool) -> Result<()> {
        match self.rpc::<Accepted>("package.uninstall", json!({"id": id, "purge": purge})) {
            Err(e) if e.code() == Some(code::NOT_INSTALLED) => Ok(()),
            r => r.map(drop),
        }
    }

    /// Until the agent answers and is ready; how long that took.
    pub fn wait_ready(&self, timeout: Duration) -> anyhow::Result<Duration> {
        let start = Instant::now();
        while !self.status().is_ok_and(|s| s.ready) {
            interrupt::check()?;
            anyhow::ensure!(start.elapsed() < timeout, "the agent was not ready within {timeout:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(start.elapsed())
    }

    /// Until every app is in its desired state (up if it should run, gone once uninstalled)
    /// and a tick is a no-op; how long that took.
    pub fn wait_converged(&self, apps: &[String], timeout: Duration) -> anyhow::Result<Duration> {
        let start = Instant::now();
        let mut last = String::new();
        while start.elapsed() < timeout {
            interrupt::check()?;
            match self.list() {
                Ok(list) => {
                    let settled = |id: &String| {
                        list.iter()
                            .find(|a| a.id == *id)
                            .is_none_or(|a| a.desired == archy_agent::store::Desired::Stopped || a.up)
                    };
                    if apps.iter().all(settled) {
                        // An agent that dies during the tick (an armed kill point) is retried.
                        match self.reconcile() {
                            Ok(r) if r.converged => return Ok(start.elapsed()),
                            Ok(r) => last = format!("{r:?}"),
                            Err(e) => last = e.to_string(),
                        }
                    } else {
                        last = format!("{list:?}");
                    }
                }
                Err(e) => last = e.to_string(),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        anyhow::bail!("not converged after {timeout:?}; last: {last}")
    }

    /// The agent's /metrics text.
    pub fn metrics(&self) -> anyhow::Result<String> {
        let url = format!("http://{}/metrics", self.addr);
        Ok(self.http.get(&url).call()?.body_mut().read_to_string()?)
    }

    /// The agent's install steps so far, from its /metrics: step -> (sum of seconds, count).
    pub fn install_steps(&self) -> anyhow::Result<BTreeMap<String, (f64, f64)>> {
        let text = self.metrics()?;
        let mut out: BTreeMap<String, (f64, f64)> = BTreeMap::new();
        for l in text.lines() {
            let Some(rest) = l.strip_prefix("archy_agent_install_step_duration_seconds_") else { continue };
            let (Some(step), Some(v)) = (
                rest.split("step=\"").nth(1).and_then(|s| s.split('"').next()),
                l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()),
            ) else {
                continue;
            };
            let e = out.entry(step.to_string()).or_default();
            if rest.starts_with("sum{") {
                e.0 = v;
            } else if rest.starts_with("count{") {
                e.1 = v;
            }
        }
        Ok(out)
    }

    /// The agent's external calls so far, from its /metrics.
    pub fn exec_calls(&self) -> anyhow::Result<Vec<ExecCalls>> {
        let text = self.metrics()?;
        let label =
            |l: &str, k: &str| l.split(&format!("{k}=\"")).nth(1)?.split('"').next().map(str::to_string);
        Ok(text
            .lines()
            .filter(|l| l.starts_with("archy_agent_exec_calls_total{"))
            .filter_map(|l| {
                Some(ExecCalls {
                    tool: label(l, "tool")?,
                    verb: label(l, "verb")?,
                    result: label(l, "result")?,
                    count: l.rsplit(' ').next()?.parse().ok()?,
                })
            })
            .collect())
    }
}

/// One series of `archy_agent_exec_calls_total`.
#[derive(Debug, Clone)]
pub struct ExecCalls {
    pub tool: String,
    pub verb: String,
    pub result: String,
    pub count: f64,
}
