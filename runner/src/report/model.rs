//! The run report as `archy-chaos run` writes it and every reader reads it back: JSON schema
//! 3, documented in `reports/README.md`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::evidence::Evidence;
use crate::scenario::{Layer, Quantile};

/// Version of the report's JSON schema.
pub const SCHEMA: u32 = 3;

/// Ordered so that the worst wins a `max`: fail beats unknown beats pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Pass,
    Unknown,
    Fail,
}

impl Verdict {
    pub fn name(self) -> &'static str {
        match self {
            Verdict::Pass => "pass",
            Verdict::Unknown => "unknown",
            Verdict::Fail => "fail",
        }
    }
}

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

/// Where a node's scenarios ran (see `crate::environment`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Environment {
    pub kernel: String,
    pub podman: String,
    pub oci_runtime: String,
    pub storage_driver: String,
    /// `v2` or `hybrid`.
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
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScenarioReport {
    pub scenario: String,
    pub description: String,
    pub layer: Layer,
    pub destructive: bool,
    /// The worst of the iterations and the KPI thresholds.
    pub verdict: Verdict,
    pub iterations: Vec<Iteration>,
    pub kpis: Vec<Kpi>,
}

/// What one iteration found.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Iteration {
    pub n: u32,
    /// The apps this iteration exercised.
    pub apps: Vec<String>,
    /// The app under test of a per-app scenario (the others are its dependencies).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    pub verdict: Verdict,
    /// Each step with its evidence, in order.
    pub steps: Vec<StepRecord>,
    /// Invariants that did not hold, and why.
    pub failures: Vec<String>,
    /// Why the verdict is unknown (a fault that did not take effect, an error of the run).
    pub unknowns: Vec<String>,
    /// KPI samples this iteration recorded, by name.
    pub measures: BTreeMap<String, Vec<f64>>,
    /// The node's last log lines, for an iteration that did not pass.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub log: String,
}

/// One step of an iteration: what it saw, or the error that ended the iteration.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepRecord {
    /// The scenario's step as written: `"power-cut"`, `{"write-file": {...}}`.
    pub step: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seconds: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evidence: Option<Evidence>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl StepRecord {
    /// The step's kind: `power-cut` for `"power-cut"` and for `{"power-cut": {...}}`.
    pub fn kind(&self) -> Option<&str> {
        match &self.step {
            Value::String(s) => Some(s),
            Value::Object(m) => m.keys().next().map(String::as_str),
            _ => None,
        }
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
