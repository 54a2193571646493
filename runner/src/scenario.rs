//! Scenario files (`scenarios/<id>.yml`, format version 1) and the engine that runs them
//! against a node: steady state, steps (actions and faults), invariants, a verdict.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use archy_agent::manifest::Catalog;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::Digest;

use crate::evidence::Evidence;
use crate::node::{FileFault, LocalNode, Node};
use crate::report::model::StepRecord;
pub use crate::report::model::{Iteration, Verdict};

pub const FORMAT_VERSION: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Layer {
    L3,
    L5,
    L6,
}

/// Which apps a scenario exercises.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Apps {
    /// `fixtures` (every fixture that can be healthy) or `all`.
    Named(String),
    List(Vec<String>),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub version: u32,
    pub id: String,
    pub layer: Layer,
    pub description: String,
    pub apps: Apps,
    /// Destructive scenarios refuse protected apps unless allowed.
    #[serde(default)]
    pub destructive: bool,
    #[serde(default = "one")]
    pub iterations: u32,
    #[serde(deserialize_with = "steps")]
    pub steps: Vec<Step>,
    /// Checked after the steps of every iteration (and `converged` also before them).
    pub invariants: Vec<Invariant>,
    /// Run the iterations once per app rather than for all apps together (the lifecycle
    /// matrix): the report's scorecard then has a row per app.
    #[serde(default)]
    pub per_app: bool,
    /// Longest wait for convergence after a fault.
    #[serde(default = "default_converge_timeout")]
    pub converge_timeout: archy_agent::manifest::Dur,
    /// KPI limits: `install_ratio: { p50: 1.5 }`. A KPI over its limit fails the scenario.
    #[serde(default)]
    pub thresholds: BTreeMap<String, BTreeMap<Quantile, f64>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Quantile {
    P50,
    P95,
    P99,
    Max,
}

impl Quantile {
    pub fn fraction(self) -> f64 {
        match self {
            Quantile::P50 => 0.5,
            Quantile::P95 => 0.95,
            Quantile::P99 => 0.99,
            Quantile::Max => 1.0,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Quantile::P50 => "p50",
            Quantile::P95 => "p95",
            Quantile::P99 => "p99",
            Quantile::Max => "max",
        }
    }
}

/// An operation of the package API, for steps that act during one.
#[derive(Debug, Clone, Copy, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum LifecycleOp {
    Install,
    Uninstall,
    Start,
    Stop,
    Restart,
}

impl LifecycleOp {
    pub const ALL: [LifecycleOp; 5] = [
        LifecycleOp::Install,
        LifecycleOp::Stop,
        LifecycleOp::Start,
        LifecycleOp::Restart,
        LifecycleOp::Uninstall,
    ];

    pub fn name(self) -> &'static str {
        match self {
            LifecycleOp::Install => "install",
            LifecycleOp::Uninstall => "uninstall",
            LifecycleOp::Start => "start",
            LifecycleOp::Stop => "stop",
            LifecycleOp::Restart => "restart",
        }
    }
}

/// Steps are written `- install` or `- file-fault: { ... }`; serde_yaml reads enum variants
/// with data only as `!tags`, so single-key maps are turned into tags first.
fn steps<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Step>, D::Error> {
    use serde::de::Error;
    use serde_yaml::value::{Tag, TaggedValue};
    let raw: Vec<serde_yaml::Value> = Deserialize::deserialize(d)?;
    raw.into_iter()
        .enumerate()
        .map(|(i, v)| {
            let v = match v {
                serde_yaml::Value::Mapping(m) if m.len() == 1 => {
                    let (k, value) = m.into_iter().next().expect("one entry");
                    let tag = k
                        .as_str()
                        .map(Tag::new)
                        .ok_or_else(|| D::Error::custom(format!("steps[{i}]: the step name must be text")))?;
                    serde_yaml::Value::Tagged(Box::new(TaggedValue { tag, value }))
                }
                v => v,
            };
            serde_yaml::from_value(v).map_err(|e| D::Error::custom(format!("steps[{i}]: {e}")))
        })
        .collect()
}

fn one() -> u32 {
    1
}

fn default_converge_timeout() -> archy_agent::manifest::Dur {
    archy_agent::manifest::Dur(Duration::from_secs(120))
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub enum Step {
    /// Install the scenario's apps (idempotent).
    Install,
    Uninstall,
    /// Uninstall deleting the apps' data and secrets too.
    Purge,
    Start,
    Stop,
    Restart,
    /// Until every desired app is up and the next tick is a no-op.
    WaitConverged,
    /// Until the agent answers /readyz (after a fault that restarted it).
    WaitReady,
    /// A file with random content into each app's first data volume, remembered by checksum.
    WriteData,
    PowerCut,
    Boot,
    /// Power cut, then boot.
    Reboot,
    GracefulReboot,
    KillAgent {
        #[serde(default = "kill")]
        signal: String,
    },
    RestartAgent,
    KillContainer {
        app: String,
        #[serde(default = "kill")]
        signal: String,
    },
    /// A file fault on a path under the node's data root, `{app}` substituted per app.
    FileFault {
        path: String,
        fault: FaultKind,
    },
    Partition,
    Heal,
    /// Remembers every container (name, id, pid) for `containers-unchanged`.
    SnapshotContainers,
    /// Arms a kill point: the agent dies by SIGKILL when it passes it (during the next
    /// steps). `each` takes point (iteration - 1) of the agent's list, so iterations
    /// enumerate every step boundary of an install in order.
    KillAgentAt {
        point: String,
    },
    /// Starts `op` on the apps, then SIGKILLs the agent at a random instant (from the run's
    /// seeded RNG) within `within`.
    KillAgentDuring {
        op: LifecycleOp,
        within: archy_agent::manifest::Dur,
    },
    /// Every podman call of the agent fails (exit 125) for `for`, then podman works again.
    PodmanFail {
        #[serde(rename = "for")]
        duration: archy_agent::manifest::Dur,
    },
    /// L6: per app, install request -> up (a cold install: run after `purge`) beside a raw
    /// `podman run -d` of the same container until its health check passes.
    MeasureInstall,
    /// L6: no-op reconcile ticks with `counts` copies of fx-web installed, each tick beside
    /// the bare `podman ps` it is built on (the scaling curve).
    MeasureTicks {
        counts: Vec<usize>,
        #[serde(default = "five")]
        ticks: u32,
    },
    /// L6: podman and systemctl calls of each lifecycle operation on the first app.
    MeasureCalls,
    /// L6: agent restart to ready, with the apps installed.
    MeasureStartup,
    /// Runs a command inside the node as its service user; with `expect`, its output must
    /// contain that text (a check: a mismatch fails the iteration).
    Exec {
        argv: Vec<String>,
        #[serde(default)]
        expect: Option<String>,
    },
    /// Each app with a published port answers HTTP on it, from inside the node.
    Reachable,
    /// Writes a file on the node (a path under the node's root, e.g. the catalog's build
    /// context of an app), as a platform update would.
    WriteFile {
        path: String,
        content: String,
    },
}

fn five() -> u32 {
    5
}

fn kill() -> String {
    "KILL".into()
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FaultKind {
    Delete,
    Truncate,
    Corrupt,
    ChownRoot,
    Chmod,
}

impl From<FaultKind> for FileFault {
    fn from(k: FaultKind) -> FileFault {
        match k {
            FaultKind::Delete => FileFault::Delete,
            FaultKind::Truncate => FileFault::Truncate,
            FaultKind::Corrupt => FileFault::Corrupt,
            FaultKind::ChownRoot => FileFault::ChownRoot,
            FaultKind::Chmod => FileFault::Chmod,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Invariant {
    /// Desired == observed within the timeout, and the next tick is a no-op with exactly one
    /// podman call (observation) and no systemctl call.
    Converged,
    /// Every app of the scenario up and healthy.
    AppsUp,
    /// Generated secrets of every app: present, valid, 0600, owned by the service user.
    SecretsValid,
    /// Files written by `write-data` still there with the same checksum.
    DataIntact,
    /// The agent answers and is ready.
    AgentReady,
    /// Every container seen by `snapshot-containers` still runs: same id, same main process.
    ContainersUnchanged,
    /// The kill point armed by `kill-agent-at` was reached (the agent died there).
    KillPointHit,
    /// No managed container of an app that is not installed.
    NoOrphans,
    /// The state file parses and the agent never had to recover it: a crash must not damage
    /// the state.
    StateValid,
    /// Each app's live port bindings are those of its manifest (and nothing is published
    /// under host networking).
    PortsMatch,
}

impl Scenario {
    /// Parses a scenario file; every error names the file (and line, where serde knows it).
    pub fn load(path: &Path) -> Result<Scenario> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
        let s: Scenario =
            serde_yaml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        if s.version != FORMAT_VERSION {
            bail!(
                "{}: version {} is not supported (this runner reads version {FORMAT_VERSION})",
                path.display(),
                s.version
            );
        }
        if s.iterations == 0 || s.steps.is_empty() {
            bail!("{}: a scenario needs at least one iteration and one step", path.display());
        }
        let measured = s.measures();
        for (kpi, limits) in &s.thresholds {
            if !measured.contains(kpi) {
                bail!(
                    "{}: thresholds: `{kpi}` is not measured by this scenario's steps; they measure: {}",
                    path.display(),
                    if measured.is_empty() { "nothing".to_string() } else { measured.join(", ") }
                );
            }
            for (q, v) in limits {
                if !v.is_finite() || *v <= 0.0 {
                    bail!("{}: thresholds: {kpi}.{}: {v} is not a positive number", path.display(), q.name());
                }
            }
        }
        Ok(s)
    }

    /// The KPIs this scenario's steps record.
    pub fn measures(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut fault = false;
        for step in &self.steps {
            fault |= step.is_fault();
            match step {
                Step::WaitConverged if fault => out.push("recovery_seconds".into()),
                Step::MeasureInstall => {
                    out.extend(["install_seconds", "raw_run_seconds", "install_ratio"].map(String::from))
                }
                Step::MeasureTicks { counts, .. } => {
                    for n in counts {
                        for k in ["tick_seconds", "raw_ps_seconds", "tick_ratio"] {
                            out.push(format!("{k}_{n:02}apps"));
                        }
                    }
                }
                Step::MeasureCalls => {
                    for op in LifecycleOp::ALL {
                        out.push(format!("{}_podman_calls", op.name()));
                        out.push(format!("{}_systemctl_calls", op.name()));
                    }
                }
                Step::MeasureStartup => out.push("startup_seconds".into()),
                _ => {}
            }
        }
        out.sort();
        out.dedup();
        out
    }

    /// The apps this scenario runs, checked against the catalog.
    pub fn apps(&self, catalog: &Catalog, file: &Path) -> Result<Vec<String>> {
        let ids: Vec<String> = match &self.apps {
            Apps::Named(n) if n == "fixtures" => catalog
                .apps
                .values()
                .filter(|m| m.fixture && m.id != "fx-crashloop") // never healthy, by design
                .map(|m| m.id.clone())
                .collect(),
            Apps::Named(n) if n == "all" => catalog.apps.keys().cloned().collect(),
            Apps::Named(n) => {
                bail!("{}: apps: `{n}` is neither `fixtures`, `all` nor a list", file.display())
            }
            Apps::List(l) => l.clone(),
        };
        for id in &ids {
            if catalog.get(id).is_none() {
                bail!("{}: apps: `{id}` is not in the catalog {}", file.display(), catalog.dir.display());
            }
        }
        Ok(ids)
    }
}

/// A named selection of scenarios with iteration counts (`scenarios/suites/<id>.yml`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Suite {
    pub version: u32,
    pub id: String,
    pub description: String,
    pub runs: Vec<SuiteRun>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SuiteRun {
    /// `all`, a layer (`L3`, `L5`, `L6`), or a list of scenario ids.
    pub scenarios: Apps,
    /// Overrides each scenario's own count.
    #[serde(default)]
    pub iterations: Option<u32>,
    #[serde(default)]
    pub except: Vec<String>,
}

impl Suite {
    pub fn load(path: &Path) -> Result<Suite> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
        let suite: Suite =
            serde_yaml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        if suite.version != FORMAT_VERSION {
            bail!("{}: version {} is not supported", path.display(), suite.version);
        }
        if Some(suite.id.as_str()) != path.file_stem().and_then(|s| s.to_str()) {
            bail!("{}: id `{}` must be the file's name", path.display(), suite.id);
        }
        Ok(suite)
    }
}

/// The ids of `dir/*.yml`, sorted.
pub fn ids(dir: &Path) -> Vec<String> {
    let mut ids: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().is_file())
        .filter_map(|e| e.file_name().to_str()?.strip_suffix(".yml").map(str::to_string))
        .collect();
    ids.sort();
    ids
}

/// What `run` was asked for, expanded: each scenario with its file and iteration count.
/// A target is a scenario (`scenarios/<id>.yml`) or a suite (`scenarios/suites/<id>.yml`).
pub fn resolve(dir: &Path, targets: &[String]) -> Result<Vec<(PathBuf, Scenario, u32)>> {
    let mut out: Vec<(PathBuf, Scenario, u32)> = Vec::new();
    for t in targets {
        let path = dir.join(format!("{t}.yml"));
        if path.is_file() {
            let s = Scenario::load(&path)?;
            let n = s.iterations;
            add(&mut out, path, s, n);
            continue;
        }
        let suite_path = dir.join("suites").join(format!("{t}.yml"));
        if !suite_path.is_file() {
            bail!(
                "unknown scenario or suite `{t}`; scenarios: {}; suites: {}",
                ids(dir).join(", "),
                ids(&dir.join("suites")).join(", ")
            );
        }
        let suite = Suite::load(&suite_path)?;
        let all: Vec<(PathBuf, Scenario)> = ids(dir)
            .into_iter()
            .map(|id| {
                let p = dir.join(format!("{id}.yml"));
                Scenario::load(&p).map(|s| (p, s))
            })
            .collect::<Result<_>>()?;
        for run in &suite.runs {
            let picked: Vec<&(PathBuf, Scenario)> = match &run.scenarios {
                Apps::Named(n) if n == "all" => all.iter().collect(),
                Apps::Named(layer) => {
                    let l: Layer = serde_yaml::from_str(layer).map_err(|_| {
                        anyhow::anyhow!(
                            "{}: scenarios: `{layer}` is neither `all`, L3, L5, L6 nor a list",
                            suite_path.display()
                        )
                    })?;
                    all.iter().filter(|(_, s)| s.layer == l).collect()
                }
                Apps::List(ids) => ids
                    .iter()
                    .map(|id| {
                        all.iter().find(|(_, s)| &s.id == id).with_context(|| {
                            format!("{}: scenarios: no scenario `{id}`", suite_path.display())
                        })
                    })
                    .collect::<Result<_>>()?,
            };
            for (p, s) in picked.into_iter().filter(|(_, s)| !run.except.contains(&s.id)) {
                add(&mut out, p.clone(), s.clone(), run.iterations.unwrap_or(s.iterations));
            }
        }
    }
    Ok(out)
}

/// A scenario named twice (the nightly's soak of release scenarios) runs once with the
/// iterations added: one entry per scenario in the report, so KPIs and verdicts stay unique.
fn add(out: &mut Vec<(PathBuf, Scenario, u32)>, path: PathBuf, s: Scenario, n: u32) {
    match out.iter_mut().find(|(_, o, _)| o.id == s.id) {
        Some(entry) => entry.2 += n,
        None => out.push((path, s, n)),
    }
}

impl Iteration {
    fn measure(&mut self, name: &str, v: f64) {
        self.measures.entry(name.to_string()).or_default().push(v);
    }
}

/// Runs one iteration. Infrastructure errors become `unknown`, never `pass`.
pub fn iterate(
    s: &Scenario,
    node: &LocalNode,
    apps: &[String],
    n: u32,
    rng: &mut rand::rngs::StdRng,
) -> Iteration {
    let mut it = Iteration {
        n,
        apps: apps.to_vec(),
        subject: s.per_app.then(|| apps.last().cloned()).flatten(),
        verdict: Verdict::Pass,
        steps: Vec::new(),
        failures: Vec::new(),
        unknowns: Vec::new(),
        measures: BTreeMap::new(),
        log: String::new(),
    };
    // The node's own copy of the catalog (what its agent runs), read once per iteration;
    // a `write-file` into it changes files, not manifests.
    let catalog = match Catalog::load(&node.root.join("catalog")) {
        Ok(c) => c,
        Err(e) => {
            it.unknowns.push(format!("the node's catalog: {e}"));
            it.verdict = Verdict::Unknown;
            return it;
        }
    };
    let mut data: Vec<(PathBuf, String)> = Vec::new();
    let mut fault_at: Option<Instant> = None;
    for step in &s.steps {
        let started = Instant::now();
        if step.is_fault() {
            fault_at.get_or_insert(started);
        }
        match run_step(s, node, &catalog, apps, step, &mut data, rng, n) {
            Ok(evidence) => {
                if evidence.get("took_effect") == Some(&json!(false)) {
                    it.unknowns.push(format!("{step:?} did not take effect: {evidence}"));
                }
                // Recovery: from the start of the first fault to convergence.
                if matches!(step, Step::WaitConverged) {
                    if let Some(t) = fault_at.take() {
                        it.measure("recovery_seconds", t.elapsed().as_secs_f64());
                    }
                }
                // Measuring steps hand their samples over in their evidence.
                if let Some(m) = evidence.get("measures").and_then(Value::as_object) {
                    for (k, v) in m {
                        for x in v.as_array().into_iter().flatten().filter_map(Value::as_f64) {
                            it.measure(k, x);
                        }
                    }
                }
                it.steps.push(StepRecord {
                    step: json!(step),
                    seconds: Some(started.elapsed().as_secs_f64()),
                    evidence: Some(
                        serde_json::from_value(evidence.clone()).unwrap_or_else(|_| Evidence::of(evidence)),
                    ),
                    error: None,
                });
            }
            Err(e) => {
                // A convergence that never came is the system's failure; anything else is ours.
                let msg = format!("{step:?}: {e:#}");
                if matches!(step, Step::WaitConverged) {
                    it.failures.push(format!("converged: {msg}"));
                } else if matches!(step, Step::WaitReady) {
                    // An agent that does not come back after a fault is the system's failure.
                    it.failures.push(format!("agent-ready: {msg}"));
                } else if matches!(step, Step::Exec { expect: Some(_), .. } | Step::Reachable) {
                    it.failures.push(format!("check: {msg}"));
                } else {
                    it.unknowns.push(msg);
                }
                it.steps.push(StepRecord {
                    step: json!(step),
                    seconds: None,
                    evidence: None,
                    error: Some(format!("{e:#}")),
                });
                break;
            }
        }
    }
    if it.failures.is_empty() && it.unknowns.is_empty() {
        for inv in &s.invariants {
            if let Err(e) = check(s, node, &catalog, apps, *inv, &data) {
                let msg = format!(
                    "{}: {e:#}",
                    serde_json::to_value(inv).unwrap_or_default().as_str().unwrap_or("?")
                );
                // A kill point never reached is a fault without effect: unknown, not fail.
                if *inv == Invariant::KillPointHit {
                    it.unknowns.push(msg);
                } else {
                    it.failures.push(msg);
                }
            }
        }
    }
    it.verdict = if !it.failures.is_empty() {
        Verdict::Fail
    } else if !it.unknowns.is_empty() {
        Verdict::Unknown
    } else {
        Verdict::Pass
    };
    if it.verdict != Verdict::Pass {
        let log = std::fs::read_to_string(node.root.join("node.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        it.log = lines[lines.len().saturating_sub(30)..].join("\n");
    }
    it
}

#[allow(clippy::too_many_arguments)] // the iteration's context, passed as it is
fn run_step(
    s: &Scenario,
    node: &LocalNode,
    catalog: &Catalog,
    apps: &[String],
    step: &Step,
    data: &mut Vec<(PathBuf, String)>,
    rng: &mut rand::rngs::StdRng,
    iteration: u32,
) -> Result<Value> {
    use rand::{Rng, RngCore};
    let failpoint = node.path(&format!("data/{}", archy_agent::failpoint::FILE))?;
    let each = |method: &str| -> Result<Value> {
        let mut retried = Vec::new();
        for app in apps {
            let armed = failpoint.exists();
            if let Err(e) = node.rpc(method, json!({"id": app})) {
                // The agent died at its armed kill point during the request: like any client,
                // retry once it is back.
                anyhow::ensure!(armed && !failpoint.exists(), e);
                wait_ready(node, s.converge_timeout.0)?;
                node.rpc(method, json!({"id": app}))?;
                retried.push(app);
            }
        }
        Ok(json!({"apps": apps, "retried_after_agent_death": retried}))
    };
    Ok(match step {
        Step::Install => each("package.install")?,
        Step::Uninstall => each("package.uninstall")?,
        Step::Purge => {
            for app in apps {
                // Not installed is already the goal.
                if let Err(e) = node.rpc("package.uninstall", json!({"id": app, "purge": true})) {
                    anyhow::ensure!(e.to_string().contains("-32003"), e);
                }
            }
            json!({"apps": apps, "purge": true})
        }
        Step::Start => each("package.start")?,
        Step::Stop => each("package.stop")?,
        Step::Restart => each("package.restart")?,
        Step::WaitConverged => {
            let t = wait_converged(node, apps, s.converge_timeout.0)?;
            json!({"seconds": t.as_secs_f64()})
        }
        Step::WriteData => {
            let mut written = Vec::new();
            for app in apps {
                let Some(vol) = catalog.get(app).and_then(|m| m.volumes.first()) else { continue };
                let dir = node.root.join("data/apps").join(app).join(&vol.name);
                let path = dir.join(format!("archy-chaos-{:08x}.bin", rng.next_u32()));
                let mut bytes = vec![0u8; 4096];
                rng.fill_bytes(&mut bytes);
                std::fs::write(&path, &bytes).with_context(|| format!("writing {}", path.display()))?;
                let sum = format!("{:x}", sha2::Sha256::digest(&bytes));
                written.push(json!({"path": path, "sha256": sum}));
                data.push((path, sum));
            }
            json!({"written": written})
        }
        Step::PowerCut => node.power_cut()?,
        Step::Boot => json!({"ready_seconds": Node::boot(node)?.as_secs_f64()}),
        Step::WaitReady => json!({"seconds": wait_ready(node, s.converge_timeout.0)?.as_secs_f64()}),
        Step::Reboot => {
            let mut e = node.power_cut()?;
            e["ready_seconds"] = json!(Node::boot(node)?.as_secs_f64());
            e
        }
        Step::GracefulReboot => Node::graceful_reboot(node)?,
        Step::KillAgent { signal } => Node::kill_agent(node, signal)?,
        Step::RestartAgent => Node::restart_agent(node)?,
        Step::KillContainer { app, signal } => Node::kill_container(node, app, signal)?,
        Step::FileFault { path, fault } => {
            // `{app}` expands per app (else the path is hit once); a last component `*` means
            // every file of that directory but hidden ones (locks, the env file).
            let per_app: Vec<String> = if path.contains("{app}") {
                apps.iter().map(|a| path.replace("{app}", a)).collect()
            } else {
                vec![path.clone()]
            };
            let mut targets = Vec::new();
            for p in per_app {
                let rel = format!("data/{p}");
                match rel.strip_suffix("/*") {
                    Some(dir) => {
                        let mut names: Vec<String> = std::fs::read_dir(node.path(dir)?)
                            .into_iter()
                            .flatten()
                            .flatten()
                            .filter_map(|e| e.file_name().to_str().map(str::to_string))
                            .filter(|n| !n.starts_with('.'))
                            .collect();
                        names.sort();
                        targets.extend(names.into_iter().map(|n| format!("{dir}/{n}")));
                    }
                    None if node.path(&rel)?.exists() => targets.push(rel),
                    None => {}
                }
            }
            let out =
                targets.iter().map(|t| node.file_fault(t, (*fault).into())).collect::<Result<Vec<_>>>()?;
            json!({"faults": out, "took_effect": !out.is_empty()})
        }
        Step::Partition => {
            let mut e = Node::partition(node)?;
            // Evidence: the agent no longer answers from outside the node.
            e["took_effect"] = json!(node.rpc("node.status", Value::Null).is_err());
            e
        }
        Step::Heal => Node::heal(node)?,
        Step::KillAgentAt { point } => {
            use archy_agent::failpoint::{POINTS, UNINSTALL_POINTS_PODMAN, UNINSTALL_POINTS_QUADLET};
            let nth = |list: &[&'static str]| list[(iteration as usize - 1) % list.len()];
            let point = match point.as_str() {
                "each" => nth(POINTS),
                "each-uninstall" if node.spec.backend == crate::node::Backend::Quadlet => {
                    nth(UNINSTALL_POINTS_QUADLET)
                }
                "each-uninstall" => nth(UNINSTALL_POINTS_PODMAN),
                p => POINTS
                    .iter()
                    .chain(UNINSTALL_POINTS_QUADLET)
                    .chain(UNINSTALL_POINTS_PODMAN)
                    .find(|x| **x == p)
                    .copied()
                    .with_context(|| {
                        format!("unknown kill point `{p}`; known: {POINTS:?}, each, each-uninstall")
                    })?,
            };
            let file = failpoint.clone();
            std::fs::write(&file, point)?;
            let uid = nix::unistd::User::from_name(&node.spec.user)?.context("service user")?.uid;
            nix::unistd::chown(&file, Some(uid), None)?;
            json!({"armed": point})
        }
        Step::Exec { argv, expect } => {
            let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
            let out = node.exec(&argv)?;
            let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
            if let Some(want) = expect {
                anyhow::ensure!(
                    out.status.success() && stdout.contains(want.as_str()),
                    "{argv:?} printed {stdout:?} ({}), expected {want:?}",
                    out.status
                );
            } else {
                anyhow::ensure!(
                    out.status.success(),
                    "{argv:?}: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            json!({"argv": argv, "stdout": stdout.chars().take(200).collect::<String>()})
        }
        Step::Reachable => {
            let mut answered = Vec::new();
            for app in apps {
                let Some(port) = catalog.get(app).and_then(|m| m.ports.first()) else { continue };
                let url = format!("http://127.0.0.1:{}/", port.host);
                let out = node.exec(&["wget", "-q", "-O", "/dev/null", &url])?;
                anyhow::ensure!(out.status.success(), "{app} does not answer on {url}");
                answered.push(url);
            }
            json!({"answered": answered})
        }
        Step::WriteFile { path, content } => {
            let file = node.path(path)?;
            let before = std::fs::read(&file).ok().map(|b| format!("{:x}", sha2::Sha256::digest(b)));
            std::fs::write(&file, content).with_context(|| format!("writing {}", file.display()))?;
            json!({"path": path, "sha256_before": before, "sha256_after": format!("{:x}", sha2::Sha256::digest(content.as_bytes()))})
        }
        Step::KillAgentDuring { op, within } => {
            let delay = Duration::from_secs_f64(rng.random_range(0.0..within.0.as_secs_f64().max(0.001)));
            each(&format!("package.{}", op.name()))?;
            std::thread::sleep(delay);
            let mut e = Node::kill_agent(node, "KILL")?;
            e["delay_seconds"] = json!(delay.as_secs_f64());
            e
        }
        Step::PodmanFail { duration } => {
            let flag = node.path(PODMAN_FAIL_FLAG)?;
            let errors = || -> Result<f64> {
                Ok(exec_calls(node)?.iter().filter(|c| c.2 == "error").map(|c| c.3).sum())
            };
            let before = errors()?;
            std::fs::write(&flag, "")?;
            let start = Instant::now();
            // A tick now, so the fault meets the agent whatever its tick interval.
            let tick = node.rpc("node.reconcile", Value::Null);
            std::thread::sleep(duration.0.saturating_sub(start.elapsed()));
            let after = errors();
            std::fs::remove_file(&flag)?;
            let failed = after? - before;
            json!({"failed_podman_calls": failed, "tick_during": tick.map_err(|e| e.to_string()), "took_effect": failed > 0.0})
        }
        Step::MeasureInstall => {
            crate::measure::install(node, catalog, apps, s.converge_timeout.0, iteration)?
        }
        Step::MeasureTicks { counts, ticks } => {
            crate::measure::ticks(node, counts, *ticks, s.converge_timeout.0)?
        }
        Step::MeasureCalls => crate::measure::calls(node, apps, s.converge_timeout.0)?,
        Step::MeasureStartup => {
            let start = Instant::now();
            let mut e = Node::restart_agent(node)?;
            let ready = wait_ready(node, s.converge_timeout.0)?;
            e["measures"] = json!({"startup_seconds": [start.elapsed().as_secs_f64()]});
            e["ready_after_restart_seconds"] = json!(ready.as_secs_f64());
            e
        }
        Step::SnapshotContainers => {
            let now = containers(node)?;
            data.retain(|(p, _)| p.as_os_str() != CONTAINERS_KEY);
            data.push((PathBuf::from(CONTAINERS_KEY), now.clone()));
            json!({"containers": now})
        }
    })
}

/// While this file exists (under the node's root), the node's podman fails for its agent.
pub const PODMAN_FAIL_FLAG: &str = "data/agent/podman-fail";

/// The agent's external calls so far: (tool, verb, result, count), from its /metrics.
pub fn exec_calls(node: &LocalNode) -> Result<Vec<(String, String, String, f64)>> {
    let text =
        ureq::get(&format!("http://{}/metrics", Node::api_addr(node))).call()?.body_mut().read_to_string()?;
    let label = |l: &str, k: &str| l.split(&format!("{k}=\"")).nth(1)?.split('"').next().map(str::to_string);
    Ok(text
        .lines()
        .filter(|l| l.starts_with("archy_agent_exec_calls_total{"))
        .filter_map(|l| {
            Some((
                label(l, "tool")?,
                label(l, "verb")?,
                label(l, "result")?,
                l.rsplit(' ').next()?.parse().ok()?,
            ))
        })
        .collect())
}

/// Until the agent answers and is ready; how long that took.
pub fn wait_ready(node: &LocalNode, timeout: Duration) -> Result<Duration> {
    let start = Instant::now();
    while !node.rpc("node.status", Value::Null).is_ok_and(|s| s["ready"] == true) {
        if start.elapsed() > timeout {
            bail!("the agent was not ready within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(start.elapsed())
}

/// Where the container snapshot is kept among the remembered data (not a file).
const CONTAINERS_KEY: &str = "<containers>";

fn containers(node: &LocalNode) -> Result<String> {
    let out = node.exec(&["podman", "ps", "--format", "{{.Names}} {{.ID}} {{.Pid}}"])?;
    anyhow::ensure!(out.status.success(), "podman ps: {}", String::from_utf8_lossy(&out.stderr));
    let mut lines: Vec<&str> = std::str::from_utf8(&out.stdout)?.lines().collect();
    lines.sort();
    Ok(lines.join("\n"))
}

impl Step {
    fn is_fault(&self) -> bool {
        !matches!(
            self,
            Step::Install
                | Step::Uninstall
                | Step::Purge
                | Step::Start
                | Step::Stop
                | Step::Restart
                | Step::WaitConverged
                | Step::WaitReady
                | Step::WriteData
                | Step::SnapshotContainers
                | Step::Exec { expect: Some(_), .. }
                | Step::Reachable
                | Step::Boot
                | Step::MeasureInstall
                | Step::MeasureTicks { .. }
                | Step::MeasureCalls
        )
    }
}

/// Waits until every app is up and a tick is a no-op; returns how long that took.
pub fn wait_converged(node: &LocalNode, apps: &[String], timeout: Duration) -> Result<Duration> {
    let start = Instant::now();
    let mut last = Value::Null;
    while start.elapsed() < timeout {
        if let Ok(list) = node.rpc("package.list", Value::Null) {
            // Each app in its desired state: up if it should run, gone once uninstalled.
            let entry = |id: &String| list.as_array().into_iter().flatten().find(|a| a["id"] == *id).cloned();
            let settled =
                |id: &String| entry(id).is_none_or(|a| a["desired"] == "stopped" || a["up"] == true);
            if apps.iter().all(settled) {
                // An agent that dies during the tick (an armed kill point) is retried.
                match node.rpc("node.reconcile", Value::Null) {
                    Ok(r) if r["converged"] == true => return Ok(start.elapsed()),
                    Ok(r) => last = r,
                    Err(e) => last = json!(e.to_string()),
                }
            } else {
                last = list;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("not converged after {timeout:?}; last: {last}")
}

fn check(
    s: &Scenario,
    node: &LocalNode,
    catalog: &Catalog,
    apps: &[String],
    inv: Invariant,
    data: &[(PathBuf, String)],
) -> Result<()> {
    match inv {
        Invariant::Converged => {
            wait_converged(node, apps, s.converge_timeout.0)?;
            let r = node.rpc("node.reconcile", Value::Null)?;
            let noop = r["actions"] == json!([]) && r["podman_calls"] == 1 && r["systemctl_calls"] == 0;
            if !noop {
                bail!("the tick after convergence was not a no-op: {r}");
            }
        }
        Invariant::AppsUp => {
            let list = node.rpc("package.list", Value::Null)?;
            let down: Vec<&String> = apps
                .iter()
                .filter(|id| {
                    !list.as_array().into_iter().flatten().any(|a| a["id"] == **id && a["up"] == true)
                })
                .collect();
            if !down.is_empty() {
                bail!("not up: {down:?}");
            }
        }
        Invariant::SecretsValid => {
            use std::os::unix::fs::MetadataExt;
            let uid = nix::unistd::User::from_name(&node.spec.user)?.context("service user")?.uid.as_raw();
            for app in apps {
                let Some(m) = catalog.get(app) else { continue };
                let dir = node.root.join("data/secrets").join(app);
                for g in &m.generated_secrets {
                    if let Some(reason) = archy_agent::secrets::inspect_as(&dir, g, uid)? {
                        bail!("{app}/{}: {}", g.target, reason.as_str());
                    }
                    let meta = std::fs::metadata(dir.join(&g.target))?;
                    if meta.uid() != uid || meta.mode() & 0o777 != 0o600 {
                        bail!("{app}/{}: owner {} mode {:o}", g.target, meta.uid(), meta.mode() & 0o777);
                    }
                }
            }
        }
        Invariant::ContainersUnchanged => {
            let before = data.iter().find(|(p, _)| p.as_os_str() == CONTAINERS_KEY).map(|(_, s)| s.clone());
            let before = before.context("the scenario has no snapshot-containers step")?;
            let now = containers(node)?;
            if now != before {
                bail!("containers were restarted or replaced:\nbefore: {before}\nafter:  {now}");
            }
        }
        Invariant::DataIntact => {
            for (path, sum) in data.iter().filter(|(p, _)| p.as_os_str() != CONTAINERS_KEY) {
                let bytes = std::fs::read(path).with_context(|| format!("{} lost", path.display()))?;
                let now = format!("{:x}", sha2::Sha256::digest(&bytes));
                if &now != sum {
                    bail!("{} changed: sha256 {sum} -> {now}", path.display());
                }
            }
        }
        Invariant::KillPointHit => {
            if node.path(&format!("data/{}", archy_agent::failpoint::FILE))?.exists() {
                bail!("the armed kill point was never reached: the fault did not take effect");
            }
        }
        Invariant::NoOrphans => {
            let out = node.exec(&[
                "podman",
                "ps",
                "-a",
                "--format",
                "{{.Names}} {{index .Labels \"io.archy.app\"}}",
                "--filter",
                "label=io.archy.app",
            ])?;
            let list = node.rpc("package.list", Value::Null)?;
            let installed: Vec<&str> =
                list.as_array().into_iter().flatten().filter_map(|a| a["id"].as_str()).collect();
            let orphans: Vec<String> = String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter(|l| {
                    let mut f = l.split_whitespace();
                    let (name, app) = (f.next().unwrap_or_default(), f.next().unwrap_or_default());
                    // Not installed, or not the name the app's container has (a stray).
                    !installed.contains(&app) || catalog.get(app).is_none_or(|m| m.container_name() != name)
                })
                .map(str::to_string)
                .collect();
            if !orphans.is_empty() {
                bail!("orphan containers: {orphans:?}");
            }
        }
        Invariant::StateValid => {
            let path = node.root.join("data").join(archy_agent::store::STATE_FILE);
            let bytes = std::fs::read(&path).with_context(|| format!("{} missing", path.display()))?;
            serde_json::from_slice::<archy_agent::store::State>(&bytes)
                .with_context(|| format!("{} does not parse", path.display()))?;
            let aside: Vec<String> = std::fs::read_dir(node.root.join("data"))?
                .flatten()
                .filter_map(|e| e.file_name().to_str().map(str::to_string))
                .filter(|n| n.starts_with("state.json.") && n != archy_agent::store::PREVIOUS_FILE)
                .collect();
            if !aside.is_empty() {
                bail!("the agent found its state file damaged and moved it aside ({aside:?}): a crash must never damage the state");
            }
        }
        Invariant::PortsMatch => {
            for app in apps {
                let Some(m) = catalog.get(app) else { continue };
                let out = node.exec(&[
                    "podman",
                    "inspect",
                    &m.container_name(),
                    "--format",
                    "{{json .HostConfig.PortBindings}}|{{json .Config.CreateCommand}}",
                ])?;
                anyhow::ensure!(out.status.success(), "{app}: no container to inspect");
                let text = String::from_utf8_lossy(&out.stdout);
                let (bindings, command) = text.trim().split_once('|').context("podman inspect output")?;
                let command: Vec<String> = serde_json::from_str(command).unwrap_or_default();
                let published: Vec<&String> =
                    command.iter().filter(|a| a.starts_with("--publish") || a.starts_with("-p")).collect();
                if m.network == archy_agent::manifest::Network::Host {
                    if !published.is_empty() {
                        bail!("{app} runs with host networking but was created with {published:?} (podman 4 discards the mapping with a warning, podman 5 refuses it with exit 125)");
                    }
                    continue;
                }
                let live: BTreeMap<String, Vec<Value>> = serde_json::from_str(bindings).unwrap_or_default();
                let mut want: BTreeMap<String, Vec<Value>> = BTreeMap::new();
                for p in &m.ports {
                    want.entry(format!("{}/{}", p.container_port(), p.protocol))
                        .or_default()
                        .push(json!({"HostIp": p.bind.to_string(), "HostPort": p.host.to_string()}));
                }
                if live != want {
                    bail!("{app}: live port bindings {live:?}, manifest {want:?}");
                }
            }
        }
        Invariant::AgentReady => {
            let st = node.rpc("node.status", Value::Null)?;
            if st["ready"] != true {
                bail!("agent not ready: {st}");
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The nightly named reboot-survive twice (release x20, soak x100): its report had two
    /// reboot-survive entries, and the gate kept the KPIs of one of them only.
    #[test]
    fn a_scenario_named_twice_in_a_suite_runs_once_with_the_iterations_added() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios");
        let plan = resolve(&dir, &["nightly".into()]).unwrap();
        let mut ids: Vec<&str> = plan.iter().map(|(_, s, _)| s.id.as_str()).collect();
        let n = ids.len();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), n, "{ids:?}");
        let reboot = plan.iter().find(|(_, s, _)| s.id == "reboot-survive").unwrap();
        assert_eq!(reboot.2, 120);
    }
}
