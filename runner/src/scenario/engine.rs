//! The engine: runs a scenario's iterations on any node, through the node's primitives and
//! the agent's API only. Steps act, invariants check, and every error of the runner itself
//! becomes `unknown`, never `pass`.

use std::collections::BTreeMap;
use std::time::Instant;

use archy_agent::manifest::Catalog;
use archy_agent::runtime::BackendKind;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::history::Entry;
use super::model::{kpi, Invariant, Scenario, Step};
use super::{invariants, steps};
use crate::agent_client::AgentClient;
use crate::evidence::Evidence;
use crate::node::Node;

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

/// What one iteration found.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Iteration {
    pub n: u32,
    /// The apps this iteration exercised.
    pub apps: Vec<String>,
    /// A per-app scenario: each app is scored on its own (the scorecard), and an app that
    /// fails a step leaves the iteration while the others go on.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub per_app: bool,
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
    /// Wall time of the iteration, its invariants included (0: not recorded).
    #[serde(default)]
    pub seconds: f64,
}

/// One step as it ran: its evidence, or the error that ended the iteration.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepRecord {
    /// The step as written in the scenario.
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

/// What an iteration remembers between its steps and its invariants.
#[derive(Debug, Default)]
pub struct Memory {
    /// Files written by `write-data`: (path under the node's root, sha256).
    pub files: Vec<(String, String)>,
    /// `snapshot-containers`: every container's name, id and pid.
    pub containers: Option<String>,
    /// `kill-agent-at` armed a kill point that has not fired yet.
    pub armed: bool,
    /// Each app's secret files (name, sha256) as the agent had written them when the last
    /// fault struck (`secrets-unchanged`); `None` before any fault.
    pub acked_secrets: Option<invariants::SecretSums>,
    /// Each app's desired state as its last acknowledged request left it (`state-unchanged`).
    pub acked_desired: BTreeMap<String, archy_agent::store::Desired>,
    /// State files already moved aside when the iteration began (`state-valid`).
    pub aside_before: Vec<String>,
    /// Requests and catalog changes of `op` and `catalog` steps (`model`), shared with the
    /// concurrent clients of `explore`.
    pub history: std::sync::Arc<super::history::History>,
    /// What the last `model` check saw.
    pub seen: super::checker::Seen,
}

/// Everything a step or an invariant needs: the scenario, the node and its agent, the node's
/// own catalog, the apps, the iteration's number and random source, and what it remembers.
pub struct StepCtx<'a> {
    pub s: &'a Scenario,
    pub node: &'a dyn Node,
    pub agent: &'a AgentClient<'a>,
    pub catalog: Catalog,
    pub backend: BackendKind,
    /// The apps still in the iteration (a per-app scenario drops those that failed).
    pub apps: Vec<String>,
    pub n: u32,
    pub rng: rand::rngs::StdRng,
    pub memory: Memory,
}

/// Runs one iteration. Infrastructure errors become `unknown`, never `pass`.
pub fn iterate(
    s: &Scenario,
    node: &dyn Node,
    agent: &AgentClient,
    apps: &[String],
    n: u32,
    seed: u64,
) -> Iteration {
    let mut it = Iteration {
        n,
        apps: apps.to_vec(),
        per_app: s.per_app,
        verdict: Verdict::Pass,
        steps: Vec::new(),
        failures: Vec::new(),
        unknowns: Vec::new(),
        measures: BTreeMap::new(),
        log: String::new(),
        seconds: 0.0,
    };
    let started = Instant::now();
    // The node's own catalog (what its agent runs) and backend, read once per iteration (a
    // `write-file` into the catalog changes files, not manifests), and the state files already
    // moved aside (a host keeps those of earlier scenarios).
    let prepared = (|| -> anyhow::Result<_> {
        let aside = match s.checks().contains(&Invariant::StateValid) {
            true => invariants::states_aside(node)?,
            false => Vec::new(),
        };
        Ok((node.catalog()?, agent.status()?.backend, aside))
    })();
    let (catalog, backend, aside_before) = match prepared {
        Ok(p) => p,
        Err(e) => {
            it.unknowns.push(format!("reading the node's catalog, agent status and data root: {e:#}"));
            it.seconds = started.elapsed().as_secs_f64();
            return finish(it, node);
        }
    };
    let mut ctx = StepCtx {
        s,
        node,
        agent,
        catalog,
        backend,
        apps: apps.to_vec(),
        n,
        rng: rand::rngs::StdRng::seed_from_u64(seed),
        memory: Memory { aside_before, ..Memory::default() },
    };
    run_steps(&mut ctx, &mut it);
    // A history's faults may miss (the model counts them indeterminate): its model is
    // checked whatever they did.
    if it.failures.is_empty() && (it.unknowns.is_empty() || s.is_history()) {
        check_invariants(&ctx, &mut it);
    }
    it.seconds = started.elapsed().as_secs_f64();
    finish(it, node)
}

/// The steps in order, each with its evidence, until one fails.
fn run_steps(ctx: &mut StepCtx, it: &mut Iteration) {
    let mut fault_at: Option<Instant> = None;
    for step in &ctx.s.steps {
        let started = Instant::now();
        if step.is_fault() {
            fault_at.get_or_insert(started);
        }
        let record = serde_json::to_value(step).unwrap_or(Value::Null);
        let invoked = ctx.memory.history.now();
        let result = steps::run(ctx, step);
        if !matches!(step, Step::Op { .. } | Step::Catalog { .. } | Step::Check) {
            ctx.memory.history.record(Entry::of_step(
                ctx.memory.history.len(),
                0,
                step,
                invoked,
                &ctx.memory.history,
                &result,
            ));
        }
        match result {
            Ok(evidence) => {
                let failed = evidence.failed_apps();
                for (app, why) in &failed {
                    it.failures.push(format!("{app}: {}: {why}", step.name()));
                }
                ctx.apps.retain(|a| !failed.contains_key(a));
                if evidence.took_effect == Some(false) {
                    it.unknowns.push(format!("{} did not take effect: {:?}", step.name(), evidence.details));
                }
                if matches!(step, Step::WaitConverged) {
                    if let Some(t) = fault_at.take() {
                        it.measures.entry(kpi::RECOVERY.into()).or_default().push(t.elapsed().as_secs_f64());
                    }
                }
                for (k, v) in &evidence.measures {
                    it.measures.entry(k.clone()).or_default().extend(v);
                }
                let seconds = Some(started.elapsed().as_secs_f64());
                it.steps.push(StepRecord { step: record, seconds, evidence: Some(evidence), error: None });
                if ctx.apps.is_empty() {
                    return;
                }
            }
            // A history's fault that could not act (a kill of a container that is not there)
            // is part of the history, recorded above; the model decides.
            Err(_) if ctx.s.is_history() && step.is_fault() => {}
            Err(e) => {
                let msg = format!("{}: {e:#}", step.name());
                match step.failure_of_the_system() {
                    // A wait cut short by Ctrl-C proves nothing either way.
                    Some(what) if crate::interrupt::signal().is_none() => {
                        it.failures.push(format!("{what}: {msg}"))
                    }
                    _ => it.unknowns.push(msg),
                }
                it.steps.push(StepRecord {
                    step: record,
                    seconds: None,
                    evidence: None,
                    error: Some(format!("{e:#}")),
                });
                return;
            }
        }
    }
}

/// Every invariant of the scenario, each failure recorded.
fn check_invariants(ctx: &StepCtx, it: &mut Iteration) {
    for inv in ctx.s.checks() {
        if let Err(e) = invariants::check(ctx, inv) {
            let msg = format!("{}: {e:#}", inv.name());
            // A kill point never reached is a fault without effect: unknown, not fail; so is
            // a check cut short by Ctrl-C.
            if inv == Invariant::KillPointHit || crate::interrupt::signal().is_some() {
                it.unknowns.push(msg);
            } else {
                it.failures.push(msg);
            }
        }
    }
}

fn finish(mut it: Iteration, node: &dyn Node) -> Iteration {
    it.verdict = if !it.failures.is_empty() {
        Verdict::Fail
    } else if !it.unknowns.is_empty() {
        Verdict::Unknown
    } else {
        Verdict::Pass
    };
    if it.verdict != Verdict::Pass {
        it.log = node.log(30).unwrap_or_else(|e| format!("(the node's log: {e:#})"));
    }
    it
}

impl Step {
    /// A step whose error is the system's failure rather than the runner's, and the check it
    /// stands for: a convergence that never came, an agent that did not come back, a check.
    fn failure_of_the_system(&self) -> Option<&'static str> {
        match self {
            Step::WaitConverged => Some("converged"),
            Step::WaitReady => Some("agent-ready"),
            Step::Check => Some("model"),
            Step::Exec { expect: Some(_), .. }
            | Step::ContainerPresent
            | Step::ValidState
            | Step::RpcReachable
            | Step::UiReachable => Some("check"),
            _ => None,
        }
    }
}

/// The iterations of one scenario on a node, all its apps together. A per-app scenario (the
/// lifecycle matrix) scores each app on its own and starts every iteration from a clean
/// node. `each` is told of every iteration as it ends (progress); `stop` ends the run early
/// (a signal, or --fail-fast after a failure).
pub fn run_scenario(
    s: &Scenario,
    node: &dyn Node,
    apps: &[String],
    iterations: std::ops::RangeInclusive<u32>,
    seed: u64,
    mut each: impl FnMut(&[String], &Iteration) -> bool,
) -> Vec<Iteration> {
    let agent = crate::node::agent(node);
    // The apps with the dependencies they need, dependencies first.
    let catalog = node.catalog().ok();
    let mut all: Vec<String> = Vec::new();
    let mut todo: Vec<String> = apps.iter().rev().cloned().collect();
    while let Some(a) = todo.pop() {
        if all.contains(&a) {
            continue;
        }
        let deps = catalog.as_ref().and_then(|c| c.get(&a)).map(|m| m.depends_on.clone()).unwrap_or_default();
        match deps.iter().filter(|d| !all.contains(d)).cloned().collect::<Vec<_>>() {
            missing if missing.is_empty() => all.push(a),
            missing => {
                todo.push(a);
                todo.extend(missing);
            }
        }
    }
    let apps = &all;
    let mut results = Vec::new();
    for n in iterations {
        let it = iterate(s, node, &agent, apps, n, seed ^ u64::from(n));
        let go_on = each(apps, &it);
        results.push(it);
        if !go_on {
            break;
        }
        if s.per_app {
            // A clean node for the next iteration, whatever this one left.
            let _ = clean(&agent, apps, s.converge_timeout.0);
        }
    }
    results
}

/// Uninstalls (with purge) `apps` and waits until the agent lists none of them.
pub fn clean(agent: &AgentClient, apps: &[String], timeout: std::time::Duration) -> anyhow::Result<()> {
    for app in apps {
        agent.uninstall(app, true)?;
    }
    let start = Instant::now();
    while agent.list()?.iter().any(|a| apps.contains(&a.id)) {
        anyhow::ensure!(start.elapsed() < timeout, "{apps:?} still installed after {timeout:?}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    Ok(())
}
