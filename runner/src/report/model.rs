//! The run report as `archy-chaos run` writes it and every reader reads it back: JSON schema
//! 3, documented in `reports/README.md`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::node::Backend;
pub use crate::scenario::engine::{Iteration, Verdict};
use crate::scenario::{Layer, Quantile};

/// Version of the report's JSON schema.
pub const SCHEMA: u32 = 3;

/// One run of `archy-chaos run`: scenarios on one or more nodes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub schema: u32,
    /// The worst node's.
    pub verdict: Verdict,
    pub seed: u64,
    /// The command that replays this run.
    pub replay: String,
    /// What the seed cannot fix.
    pub nondeterminism: String,
    pub started_unix: u64,
    pub duration_seconds: f64,
    pub nodes: Vec<NodeReport>,
    /// What the run was asked to run (null in an exploration, and in reports of runners
    /// before it was recorded: no gate takes those as a suite).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suite: Option<SuiteRecord>,
    /// `archy-chaos explore`: the history, and what was found.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub explore: Option<ExploreReport>,
}

/// The suite (or scenarios) a run was asked for, resolved, so a gate can tell a release from a
/// smoke run of the same scenarios.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SuiteRecord {
    /// The targets as given to `run`, joined by `+`: `release`, `reboot-survive+partition`.
    pub name: String,
    /// `sha256:` over every entry (scenario, backend, iterations) and its scenario file's bytes:
    /// another iteration count, backend or scenario text is another suite.
    pub hash: String,
    pub entries: Vec<SuiteEntry>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SuiteEntry {
    pub scenario: String,
    pub backend: Backend,
    pub iterations: u32,
    /// Iterations each node must report: `iterations`, times the apps of a per-app scenario.
    pub runs: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeReport {
    /// The node driver and name: `local:run1234`, `ssh://archy@10.0.0.2`.
    pub node: String,
    /// The agent's backend on the node.
    pub backend: String,
    /// The worst of its scenarios; nothing run at all is unknown.
    pub verdict: Verdict,
    /// Null when no node came up to be asked.
    pub environment: Option<Environment>,
    pub scenarios: Vec<ScenarioReport>,
}

/// Where a node's scenarios ran (probed by `environment.rs`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Environment {
    pub kernel: String,
    pub podman: String,
    pub oci_runtime: String,
    pub storage_driver: String,
    /// As podman on the node reports it: `v1` (this machine's hybrid) or `v2`.
    pub cgroup: String,
    pub cpus: usize,
    pub loadavg_end: String,
    /// Over the whole run.
    pub cpu_busy_fraction: f64,
    pub cpu_steal_fraction: f64,
    /// The agent's own answer (`node.status`); null when it did not answer.
    pub agent_version: Option<String>,
    pub agent_backend: Option<String>,
    /// Deliberate breakages (`--break`): never empty on a proof run.
    pub agent_broken: Option<Vec<String>>,
    pub runner_version: String,
    /// What a power cut keeps: `lazy` (only what the node fsynced, local nodes' lazy data
    /// root), `kernel` (every write) or `host` (what a real host's own power cut keeps).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub durability: Option<String>,
    /// The runner's own external commands (ssh, nsenter, ip...) by program, so far in the
    /// run: what driving this kind of node costs.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub runner_calls: BTreeMap<String, RunnerCalls>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunnerCalls {
    pub calls: u64,
    pub seconds: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScenarioReport {
    pub scenario: String,
    pub description: String,
    pub layer: Layer,
    /// The agent backend it ran under (reports before it was recorded ran under Quadlet).
    #[serde(default = "quadlet")]
    pub backend: Backend,
    pub destructive: bool,
    /// The worst of the iterations and the KPI thresholds.
    pub verdict: Verdict,
    pub iterations: Vec<Iteration>,
    pub kpis: Vec<Kpi>,
    /// Wall time of the scenario on its node, node set-up and teardown included (the
    /// runner's own throughput; 0 in reports before it was recorded).
    #[serde(default)]
    pub seconds: f64,
}

impl SuiteEntry {
    pub fn label(&self) -> String {
        label(&self.scenario, self.backend)
    }
}

fn quadlet() -> Backend {
    Backend::Quadlet
}

impl ScenarioReport {
    /// The scenario and, beside the platform's Quadlet backend, the backend it ran under:
    /// `cold-install`, `cold-install@podman`. Unique within a node's report.
    pub fn label(&self) -> String {
        label(&self.scenario, self.backend)
    }
}

/// `id`, or `id@backend` beside the platform's Quadlet backend.
pub fn label(id: &str, backend: Backend) -> String {
    match backend {
        Backend::Quadlet => id.to_string(),
        other => format!("{id}@{}", other.name()),
    }
}

/// A KPI over every sample of a scenario, from an HDR histogram (3 significant digits);
/// quantiles are null when nothing was measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Kpi {
    pub name: String,
    /// `s`, `ratio` (to the raw podman baseline of the same run) or `calls`.
    pub unit: String,
    pub count: u64,
    pub p50: Option<f64>,
    pub p95: Option<f64>,
    pub p99: Option<f64>,
    pub max: Option<f64>,
    pub samples: Vec<f64>,
    pub thresholds: Vec<Threshold>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Threshold {
    pub quantile: Quantile,
    pub max: f64,
    /// Null when the KPI was never measured (the threshold is then unknown).
    pub value: Option<f64>,
    pub verdict: Verdict,
}

/// What an exploration adds to a run report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExploreReport {
    pub seed: u64,
    pub ops: u32,
    pub clients: u32,
    pub faults: Vec<String>,
    /// Steps run before the budget or the first failure ended the exploration.
    pub steps_run: usize,
    pub history: Vec<crate::scenario::history::Entry>,
    /// The first failure and its shrunk scenario.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub found: Option<Found>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Found {
    pub failure: String,
    /// The steps up to the failing quiet point.
    pub steps: usize,
    /// Whether replaying those steps one at a time on a fresh node failed the same way.
    pub reproduced: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shrunk: Option<Shrunk>,
    /// The scenario written (`archy-chaos run found/<id>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scenario: Option<String>,
}

/// What shrinking did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Shrunk {
    pub original_len: usize,
    pub minimal_len: usize,
    pub replays: usize,
    pub seconds: f64,
    /// The budget ran out before no single step could be removed.
    pub budget_exhausted: bool,
}
