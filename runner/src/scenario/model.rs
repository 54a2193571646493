//! Scenario and suite files (`scenarios/<id>.yml`, `scenarios/suites/<id>.yml`, format
//! version 1): what they may say, and the checks that refuse anything else before a run.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use archy_agent::manifest::Catalog;
use serde::{Deserialize, Serialize};

use crate::node::{Backend, DiskFault, FileFault};

pub const FORMAT_VERSION: u32 = 1;

/// The fixture that answers errors for its first seconds (apps/fx-slow).
pub const SLOW_FIXTURE: &str = "fx-slow";

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
    /// `fixtures` (every fixture that can be healthy), `runnable` (those and every other app
    /// that runs here, [`runs_here`]: the companion UIs) or `all`.
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
    /// Checked after the steps of every iteration, besides the standard ones
    /// ([`Invariant::STANDARD`]), which every scenario checks unless `skip` says why not.
    #[serde(default)]
    pub invariants: Vec<Invariant>,
    /// Standard invariants this scenario does not check, each with the reason.
    #[serde(default)]
    pub skip: BTreeMap<Invariant, String>,
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
    /// The kernel's OOM killer kills the app's main process (`Node::oom_kill`): a real one
    /// where the node lets the runner enforce a memory limit, else a SIGKILL stand-in; the
    /// evidence's `kind` says which.
    Oom {
        app: String,
    },
    /// A file fault on a path under the node's data root, `{app}` substituted per app.
    FileFault {
        path: String,
        fault: FileFault,
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
        /// install, uninstall, start, stop or restart.
        op: ApiOp,
        within: archy_agent::manifest::Dur,
    },
    /// Every podman call of the agent fails (exit 125) for `for`, then podman works again.
    PodmanFail {
        #[serde(rename = "for")]
        duration: archy_agent::manifest::Dur,
    },
    /// The data root's filesystem full or read-only for `for` (one agent tick forced into it),
    /// then as before.
    DiskFault {
        fault: DiskFault,
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
    /// L6: a power cut, then the node's boot: power on to the agent's API answering, with the
    /// apps installed.
    MeasureBoot,
    /// Runs a command inside the node as its service user; with `expect`, its output must
    /// contain that text (a check: a mismatch fails the iteration).
    Exec {
        argv: Vec<String>,
        #[serde(default)]
        expect: Option<String>,
    },
    /// Uninstall keeping data and secrets, until gone, then install again.
    Reinstall,
    /// Podman has one container of each app.
    ContainerPresent,
    /// The agent says each app runs, healthy, and podman agrees.
    ValidState,
    /// Each app's own API answers a request authenticated with the secret the agent
    /// generated for it (manifest `rpc`; n/a without one).
    RpcReachable,
    /// Every UI URL of each app's manifest answers 200 with a body (n/a without `ui`).
    UiReachable,
    /// Writes a file on the node (a path under the node's root, e.g. the catalog's build
    /// context of an app), as a platform update would.
    WriteFile {
        path: String,
        content: String,
    },
    /// One request of the package API on one app (none for `reconcile`), recorded in the
    /// iteration's history with its result: ok, fail or indeterminate (the `model` check).
    Op {
        op: ApiOp,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        app: Option<String>,
    },
    /// A change of the node's catalog, as a platform update makes it.
    Catalog {
        change: CatalogChange,
        app: String,
    },
    /// A quiet point of a history: waits, on the agent's own schedule, for the node to be
    /// what the history's requests imply, then checks it (`scenario::checker`).
    Check,
    /// Does nothing for a while: a history's replay keeps the idle time the exploration had
    /// between two steps (the agent may have acted in it).
    Sleep {
        #[serde(rename = "for")]
        duration: archy_agent::manifest::Dur,
    },
}

/// A request of the package API (`op` steps, `archy-chaos explore`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum ApiOp {
    Install,
    Uninstall,
    /// Uninstall deleting the app's data and secrets too.
    Purge,
    Start,
    Stop,
    Restart,
    /// A reconcile pass now (`node.reconcile`); changes no desired state.
    Reconcile,
}

impl ApiOp {
    /// The operations of an app's lifecycle, in the order `measure-calls` takes them.
    pub const LIFECYCLE: [ApiOp; 5] =
        [ApiOp::Install, ApiOp::Stop, ApiOp::Start, ApiOp::Restart, ApiOp::Uninstall];

    pub fn name(self) -> &'static str {
        match self {
            ApiOp::Install => "install",
            ApiOp::Uninstall => "uninstall",
            ApiOp::Purge => "purge",
            ApiOp::Start => "start",
            ApiOp::Stop => "stop",
            ApiOp::Restart => "restart",
            ApiOp::Reconcile => "reconcile",
        }
    }
}

/// How a catalog changes under a running node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CatalogChange {
    /// A new version: the version, an environment variable and the stop timeout change, so
    /// the app's container must be replaced.
    Upgrade,
    /// The manifest no longer parses (a bad update); `repair` puts the last good one back.
    Break,
    Repair,
    /// The app leaves the catalog (its manifest moved aside); `restore` brings it back.
    Remove,
    Restore,
}

impl Step {
    /// Steps that hurt the node (the rest act through the API, wait or look).
    pub fn is_fault(&self) -> bool {
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
                | Step::Reinstall
                | Step::ContainerPresent
                | Step::ValidState
                | Step::RpcReachable
                | Step::UiReachable
                | Step::Boot
                | Step::MeasureInstall
                | Step::MeasureTicks { .. }
                | Step::MeasureCalls
                | Step::Op { .. }
                | Step::Check
                | Step::Sleep { .. }
        )
    }

    /// The step's name as written in scenario files.
    pub fn name(&self) -> String {
        match serde_json::to_value(self) {
            Ok(serde_json::Value::String(s)) => s,
            Ok(serde_json::Value::Object(m)) => m.keys().next().cloned().unwrap_or_default(),
            _ => String::new(),
        }
    }
}

fn five() -> u32 {
    5
}

fn kill() -> String {
    "KILL".into()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Invariant {
    /// Desired == observed within the timeout, and the next tick is a no-op with exactly one
    /// podman call (observation) and no systemctl call.
    Converged,
    /// Every app of the scenario up and healthy, seen from outside the agent (podman on the
    /// node, and the app's own port).
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
    /// The node, observed from outside the agent, is what the history of `op` and `catalog`
    /// steps implies (`scenario::history`), reached on the agent's own schedule.
    Model,
    /// Every secret file the agent had written when the last fault struck is identical at
    /// the end: come back, not regenerated (an app that encrypted data with it is locked out).
    SecretsUnchanged,
    /// Each app's desired state is what its last acknowledged request made it: a request the
    /// agent answered must survive any fault.
    StateUnchanged,
    /// Every installed app's Quadlet unit is there and whole (its bytes match its own hash
    /// label), and a running container was made from it; the podman backend leaves none.
    UnitsIntact,
}

impl Invariant {
    /// What every scenario checks of the whole node at the end of each iteration.
    pub const STANDARD: [Invariant; 6] = [
        Invariant::Converged,
        Invariant::AppsUp,
        Invariant::SecretsValid,
        Invariant::PortsMatch,
        Invariant::NoOrphans,
        Invariant::StateValid,
    ];

    pub fn name(self) -> String {
        serde_json::to_value(self).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default()
    }
}

/// KPI names, defined once for the steps that record them and the checks of thresholds.
pub mod kpi {
    /// From the start of the first fault to convergence.
    pub const RECOVERY: &str = "recovery_seconds";
    pub const INSTALL: &str = "install_seconds";
    pub const RAW_RUN: &str = "raw_run_seconds";
    pub const INSTALL_RATIO: &str = "install_ratio";
    /// The agent's unit installed by hand: written, daemon-reload, start, healthy.
    pub const RAW_QUADLET: &str = "raw_quadlet_seconds";
    /// The agent's install over the raw Quadlet floor: the agent's own overhead.
    pub const INSTALL_QUADLET_RATIO: &str = "install_quadlet_ratio";
    /// The raw Quadlet floor over raw `podman run`: what running under systemd costs.
    pub const QUADLET_PODMAN_RATIO: &str = "quadlet_podman_ratio";
    pub const STARTUP: &str = "startup_seconds";
    /// Power on (the start of the node's boot) to the agent's /readyz answering.
    pub const BOOT_TO_READY: &str = "boot_to_ready_seconds";
    pub const TICK: &str = "tick_seconds";
    pub const RAW_PS: &str = "raw_ps_seconds";
    pub const TICK_RATIO: &str = "tick_ratio";

    /// A tick KPI at `n` installed apps: `tick_seconds_05apps`.
    pub fn at_apps(kpi: &str, n: usize) -> String {
        format!("{kpi}_{n:02}apps")
    }

    /// One step of the agent's install (`archy_agent::metrics::INSTALL_STEPS`), from its
    /// metrics: informative, with no `_ratio` twin and no `raw_` prefix.
    pub fn install_step(step: &str) -> String {
        format!("install_step_{step}_seconds")
    }

    /// Calls of `tool` (`podman`, `systemctl`) for one lifecycle operation.
    pub fn calls(op: &str, tool: &str) -> String {
        format!("{op}_{tool}_calls")
    }
}

impl Scenario {
    /// The invariants checked after each iteration: the standard ones not skipped, then the
    /// scenario's own, in order, each once.
    pub fn checks(&self) -> Vec<Invariant> {
        let mut out: Vec<Invariant> =
            Invariant::STANDARD.into_iter().filter(|i| !self.skip.contains_key(i)).collect();
        for i in &self.invariants {
            if !out.contains(i) {
                out.push(*i);
            }
        }
        out
    }

    /// A history (`explore`'s, or one it found): checked by the model of its requests.
    pub fn is_history(&self) -> bool {
        self.invariants.contains(&Invariant::Model)
    }

    /// Parses a scenario file; every error names the file (and line, where serde knows it).
    pub fn load(path: &Path) -> Result<Scenario> {
        let s: Scenario = crate::yaml::load(path)?;
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
        for (inv, why) in &s.skip {
            if !Invariant::STANDARD.contains(inv) {
                bail!(
                    "{}: skip: `{}` is not a standard invariant (standard: {})",
                    path.display(),
                    inv.name(),
                    Invariant::STANDARD.map(Invariant::name).join(", ")
                );
            }
            if why.trim().is_empty() || s.invariants.contains(inv) {
                bail!(
                    "{}: skip: `{}` needs a reason, and must not also be listed under invariants",
                    path.display(),
                    inv.name()
                );
            }
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
                Step::WaitConverged if fault => out.push(kpi::RECOVERY.into()),
                Step::MeasureInstall => {
                    out.extend(
                        [
                            kpi::INSTALL,
                            kpi::RAW_RUN,
                            kpi::INSTALL_RATIO,
                            kpi::RAW_QUADLET,
                            kpi::INSTALL_QUADLET_RATIO,
                            kpi::QUADLET_PODMAN_RATIO,
                        ]
                        .map(String::from),
                    );
                    out.extend(archy_agent::metrics::INSTALL_STEPS.iter().map(|s| kpi::install_step(s)));
                }
                Step::MeasureTicks { counts, .. } => {
                    for n in counts {
                        for k in [kpi::TICK, kpi::RAW_PS, kpi::TICK_RATIO] {
                            out.push(kpi::at_apps(k, *n));
                        }
                    }
                }
                Step::MeasureCalls => {
                    for op in ApiOp::LIFECYCLE {
                        out.push(kpi::calls(op.name(), "podman"));
                        out.push(kpi::calls(op.name(), "systemctl"));
                    }
                }
                Step::MeasureStartup => out.push(kpi::STARTUP.into()),
                Step::MeasureBoot => out.push(kpi::BOOT_TO_READY.into()),
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
            Apps::Named(n) if n == "fixtures" || n == "runnable" => catalog
                .apps
                .values()
                // Never healthy, or slow on purpose: explore's, not every scenario's.
                .filter(|m| {
                    (m.fixture || (n == "runnable" && runs_here(m)))
                        && !super::checker::NEVER_HEALTHY.contains(&m.id.as_str())
                        && m.id != SLOW_FIXTURE
                })
                .map(|m| m.id.clone())
                .collect(),
            Apps::Named(n) if n == "all" => catalog.apps.keys().cloned().collect(),
            Apps::Named(n) => {
                bail!("{}: apps: `{n}` is neither `fixtures`, `runnable`, `all` nor a list", file.display())
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

/// Whether an app runs on a test node, which has no registry: a fixture, or an app whose
/// image the node builds (the platform's companion UIs, built FROM the imported fixture
/// image). `apps: runnable` is these (the lifecycle matrix: the companion UIs are scored like
/// the fixtures); `apps: fixtures` keeps the fixtures, so a fault scenario's twenty
/// iterations do not pay three image builds per node for apps the matrix already scores.
pub fn runs_here(m: &archy_agent::manifest::Manifest) -> bool {
    m.fixture || m.build.is_some()
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
    /// Run these scenarios once under each of these agent backends [default: the run's
    /// `--backend`]: what only one backend can get wrong (FM3) needs both in a release.
    #[serde(default)]
    pub backends: Vec<Backend>,
}

impl Suite {
    pub fn load(path: &Path) -> Result<Suite> {
        let suite: Suite = crate::yaml::load(path)?;
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

/// One entry of what `run` was asked for, expanded: a scenario (with its file), the agent
/// backend it runs under, and how many times.
#[derive(Debug, Clone)]
pub struct Planned {
    pub path: PathBuf,
    pub scenario: Scenario,
    pub backend: Backend,
    pub iterations: u32,
}

/// What `run` was asked for, expanded. A target is a scenario (`scenarios/<id>.yml`) or a
/// suite (`scenarios/suites/<id>.yml`); `backend` is the one of entries that name none.
pub fn resolve(dir: &Path, targets: &[String], backend: Backend) -> Result<Vec<Planned>> {
    let mut out: Vec<Planned> = Vec::new();
    for t in targets {
        let path = dir.join(format!("{t}.yml"));
        if path.is_file() {
            let scenario = Scenario::load(&path)?;
            let iterations = scenario.iterations;
            add(&mut out, Planned { path, scenario, backend, iterations });
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
            let backends = if run.backends.is_empty() { vec![backend] } else { run.backends.clone() };
            for (p, s) in picked.into_iter().filter(|(_, s)| !run.except.contains(&s.id)) {
                for &backend in &backends {
                    let iterations = run.iterations.unwrap_or(s.iterations);
                    add(&mut out, Planned { path: p.clone(), scenario: s.clone(), backend, iterations });
                }
            }
        }
    }
    Ok(out)
}

/// A scenario named twice for one backend (the nightly's soak of release scenarios) runs once
/// with the iterations added: one entry per scenario and backend in the report, so KPIs and
/// verdicts stay unique.
fn add(out: &mut Vec<Planned>, p: Planned) {
    match out.iter_mut().find(|o| o.scenario.id == p.scenario.id && o.backend == p.backend) {
        Some(entry) => entry.iterations += p.iterations,
        None => out.push(p),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The nightly named reboot-survive twice (release x20, soak x100): its report had two
    /// reboot-survive entries, and the gate kept the KPIs of one of them only.
    #[test]
    fn a_scenario_named_twice_in_a_suite_runs_once_with_the_iterations_added() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios");
        let plan = resolve(&dir, &["nightly".into()], Backend::Quadlet).unwrap();
        let mut ids: Vec<(&str, Backend)> =
            plan.iter().map(|p| (p.scenario.id.as_str(), p.backend)).collect();
        let n = ids.len();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), n, "{ids:?}");
        let reboot =
            plan.iter().find(|p| p.scenario.id == "reboot-survive" && p.backend == Backend::Quadlet).unwrap();
        assert_eq!(reboot.iterations, 120);
    }

    /// `apps: runnable` is every app a node without a registry runs: the fixtures that can be
    /// healthy and the companion UIs the node builds, never an app of an upstream image;
    /// `apps: fixtures` the fixtures alone.
    #[test]
    fn runnable_apps_are_the_apps_that_run_here_and_can_be_healthy() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let catalog = Catalog::load(&root.join("apps")).unwrap();
        let s: Scenario = serde_yaml::from_str(
            "version: 1\nid: x\nlayer: L3\ndescription: x\napps: runnable\nsteps: [install]\n",
        )
        .unwrap();
        let apps = s.apps(&catalog, Path::new("x.yml")).unwrap();
        let mut fixtures = s.clone();
        fixtures.apps = Apps::Named("fixtures".into());
        let fixtures = fixtures.apps(&catalog, Path::new("x.yml")).unwrap();
        assert!(
            fixtures.iter().all(|a| catalog.get(a).unwrap().fixture)
                && fixtures.contains(&"fx-ui".to_string())
        );
        assert_eq!(apps.len(), fixtures.len() + 3, "{apps:?} {fixtures:?}");
        for id in ["fx-web", "fx-ui", "archy-bitcoin-ui", "archy-lnd-ui", "archy-electrs-ui"] {
            assert!(apps.iter().any(|a| a == id), "{id} missing from {apps:?}");
        }
        for id in ["fx-crashloop", SLOW_FIXTURE, "bitcoin-knots", "bitcoin-core", "lnd"] {
            assert!(!apps.iter().any(|a| a == id), "{id} in {apps:?}");
        }
        for id in &apps {
            let m = catalog.get(id).unwrap();
            assert!(m.fixture || m.image.starts_with("localhost/"), "{id}: {}", m.image);
        }
    }

    #[test]
    fn disk_fault_steps_parse_as_faults_and_unknown_faults_are_refused() {
        let scenario = |fault: &str| {
            serde_yaml::from_str::<Scenario>(&format!(
                "version: 1\nid: x\nlayer: L3\ndescription: x\napps: fixtures\nsteps:\n  - disk-fault: {{ fault: {fault}, for: 10s }}\n"
            ))
        };
        let s = scenario("read-only").unwrap();
        assert!(
            matches!(s.steps[0], Step::DiskFault { fault: DiskFault::ReadOnly, duration } if duration.0 == Duration::from_secs(10)),
            "{:?}",
            s.steps
        );
        assert!(s.steps[0].is_fault());
        assert_eq!(s.steps[0].name(), "disk-fault");
        assert!(matches!(scenario("full").unwrap().steps[0], Step::DiskFault { fault: DiskFault::Full, .. }));
        let err = scenario("melted").unwrap_err().to_string();
        assert!(err.contains("steps[0]") && err.contains("melted"), "{err}");
    }
}
