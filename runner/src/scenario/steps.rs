//! One function per step: each acts on the node through its primitives or the agent's API,
//! and returns its evidence.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use archy_agent::failpoint::{
    INSTALL_POINTS_PODMAN, POINTS, UNINSTALL_POINTS_PODMAN, UNINSTALL_POINTS_QUADLET,
};
use archy_agent::runtime::BackendKind;
use archy_agent::store::Desired;
use rand::{Rng, RngCore};
use serde_json::json;
use sha2::Digest;

use super::engine::StepCtx;
use super::history::{self, Entry, History, Outcome};
use super::model::{kpi, ApiOp, CatalogChange, Invariant, Step};
use super::probe;
use crate::evidence::{Evidence, FAILED_APPS};
use crate::node::{DiskFault, FileFault, PODMAN_FAIL_FLAG};
use archy_agent::manifest::Manifest;
use std::collections::BTreeMap;

/// Where the agent looks for an armed kill point, under the node's root.
pub fn failpoint_file() -> String {
    format!("data/{}", archy_agent::failpoint::FILE)
}

pub fn run(ctx: &mut StepCtx, step: &Step) -> Result<Evidence> {
    let timeout = ctx.s.converge_timeout.0;
    match step {
        Step::Install => each(ctx, "install"),
        Step::Uninstall => each(ctx, "uninstall"),
        Step::Purge => purge(ctx),
        Step::Start => each(ctx, "start"),
        Step::Stop => each(ctx, "stop"),
        Step::Restart => each(ctx, "restart"),
        Step::WaitConverged => wait_converged(ctx),
        Step::WaitReady => {
            Ok(Evidence::default().with("seconds", ctx.agent.wait_ready(timeout)?.as_secs_f64()))
        }
        Step::WriteData => write_data(ctx),
        Step::PowerCut => {
            acknowledge(ctx)?;
            ctx.node.power_cut()
        }
        Step::Boot => Ok(Evidence::default().with("ready_seconds", ctx.node.boot()?.as_secs_f64())),
        Step::Reboot => {
            acknowledge(ctx)?;
            let (e, ready) = ctx.node.power_cycle()?;
            Ok(e.with("ready_seconds", ready.as_secs_f64()))
        }
        Step::GracefulReboot => {
            acknowledge(ctx)?;
            ctx.node.graceful_reboot()
        }
        Step::KillAgent { signal } => {
            acknowledge(ctx)?;
            ctx.node.kill_agent(signal)
        }
        Step::RestartAgent => ctx.node.restart_agent(),
        Step::KillContainer { app, signal } => ctx.node.kill_container(app, signal),
        Step::Oom { app } => ctx.node.oom_kill(app),
        Step::FileFault { path, fault } => file_fault(ctx, path, *fault),
        Step::Partition => {
            let e = ctx.node.partition()?;
            // Evidence: the agent no longer answers from outside the node (over SSH, once the
            // host's own command has cut the link and the connection has noticed).
            let start = Instant::now();
            let cut = loop {
                if ctx.agent.status().is_err() {
                    break true;
                }
                if start.elapsed() > Duration::from_secs(15) {
                    break false;
                }
                std::thread::sleep(Duration::from_millis(200));
            };
            Ok(e.effect(cut).with("cut_after_seconds", start.elapsed().as_secs_f64()))
        }
        Step::Heal => ctx.node.heal(),
        Step::SnapshotContainers => {
            let now = super::invariants::containers(ctx.node)?;
            ctx.memory.containers = Some(now.clone());
            Ok(Evidence::default().with("containers", now))
        }
        Step::KillAgentAt { point } => kill_agent_at(ctx, point),
        Step::KillAgentDuring { op, within } => kill_agent_during(ctx, *op, within.0),
        Step::PodmanFail { duration } => podman_fail(ctx, duration.0),
        Step::DiskFault { fault, duration } => disk_fault(ctx, *fault, duration.0),
        Step::MeasureInstall => {
            super::measure::install(ctx.node, ctx.agent, &ctx.catalog, &ctx.apps, timeout, ctx.n)
        }
        Step::MeasureTicks { counts, ticks } => {
            super::measure::ticks(ctx.node, ctx.agent, counts, *ticks, timeout)
        }
        Step::MeasureCalls => super::measure::calls(ctx.agent, &ctx.apps, timeout),
        Step::MeasureStartup => {
            let start = Instant::now();
            let e = ctx.node.restart_agent()?;
            let ready = ctx.agent.wait_ready(timeout)?;
            Ok(e.measure(kpi::STARTUP, vec![start.elapsed().as_secs_f64()])
                .with("ready_after_restart_seconds", ready.as_secs_f64()))
        }
        Step::MeasureBoot => {
            let (e, ready) = ctx.node.power_cycle()?;
            Ok(e.measure(kpi::BOOT_TO_READY, vec![ready.as_secs_f64()]))
        }
        Step::Exec { argv, expect } => exec(ctx, argv, expect.as_deref()),
        Step::Reinstall => {
            let mut failed = apart(ctx, &ctx.apps, |app| Ok(ctx.agent.uninstall(app, false)?))?;
            let apps: Vec<String> = ctx.apps.iter().filter(|a| !failed.contains_key(*a)).cloned().collect();
            failed.extend(settle(ctx, &apps)?);
            let apps: Vec<String> = apps.into_iter().filter(|a| !failed.contains_key(a)).collect();
            let (again, _) = each_of(ctx, &apps, "install")?;
            failed.extend(again.failed_apps());
            Ok(again.with(FAILED_APPS, failed))
        }
        Step::ContainerPresent => per_app(ctx, |ctx, m| probe::container_present(ctx.node, &m.id)),
        Step::ValidState => per_app(ctx, |ctx, m| probe::valid_state(ctx.node, ctx.agent, m)),
        Step::RpcReachable => per_app(ctx, |ctx, m| probe::rpc(ctx.node, m)),
        Step::UiReachable => per_app(ctx, |ctx, m| probe::ui(ctx.node, m)),
        Step::Op { op, app } => {
            let index = ctx.memory.history.len();
            let e = history::request(ctx.agent, &ctx.memory.history, index, 0, *op, app.as_deref(), timeout);
            Ok(Evidence::default().with("outcome", e.outcome).with("message", e.message))
        }
        Step::Sleep { duration } => {
            std::thread::sleep(duration.0);
            Ok(Evidence::default())
        }
        Step::Check => {
            let entries = ctx.memory.history.entries();
            let seen = &mut ctx.memory.seen;
            super::checker::check(ctx.node, ctx.agent, &ctx.catalog, &ctx.apps, &entries, seen, timeout)?;
            Ok(Evidence::default().with("up", seen.ups.last().map(|(_, up)| up.clone()).unwrap_or_default()))
        }
        Step::Catalog { change, app } => {
            let index = ctx.memory.history.len();
            catalog_change(ctx.node, &ctx.memory.history, index, 0, *change, app)
        }
        Step::WriteFile { path, content } => {
            let before = ctx.node.hash(path)?;
            ctx.node.write(path, content.as_bytes())?;
            Ok(Evidence::default()
                .with("path", path)
                .with("sha256_before", before)
                .with("sha256_after", format!("{:x}", sha2::Sha256::digest(content.as_bytes()))))
        }
    }
}

/// `package.<op>` for every app. An agent that died at its armed kill point during the
/// request is asked again once it is back, as any client would. Each answered request is
/// what `state-unchanged` holds the agent to; a kill point that fires (then or in a later
/// tick) is a fault, whose secrets `secrets-unchanged` holds it to.
fn each(ctx: &mut StepCtx, op: &str) -> Result<Evidence> {
    let apps = ctx.apps.clone();
    let (e, at_death) = each_of(ctx, &apps, op)?;
    let desired = match op {
        "install" | "start" | "restart" => Desired::Running,
        "stop" => Desired::Stopped,
        _ => Desired::Absent,
    };
    let failed = e.failed_apps();
    for app in apps.iter().filter(|a| !failed.contains_key(*a)) {
        ctx.memory.acked_desired.insert(app.clone(), desired);
    }
    if let Some(sums) = at_death {
        ctx.memory.acked_secrets = Some(sums);
        ctx.memory.armed = false;
        return Ok(e.with("kill_point_fired", "during a request"));
    }
    if !ctx.memory.armed {
        return Ok(e);
    }
    // The point fires in a tick after the requests: the agent is dead from then until its
    // manager restarts it (1 s), which is when what it had written is looked at.
    let start = Instant::now();
    while ctx.node.stat(&failpoint_file())?.is_some() && start.elapsed() < ctx.s.converge_timeout.0 {
        std::thread::sleep(Duration::from_millis(20));
    }
    acknowledge(ctx)?;
    ctx.memory.armed = false;
    Ok(e.with("kill_point_fired", format!("{:.2} s after the requests", start.elapsed().as_secs_f64())))
}

/// Snapshots the secrets a fault striking now must leave as they are (`secrets-unchanged`).
fn acknowledge(ctx: &mut StepCtx) -> Result<()> {
    if ctx.s.checks().contains(&Invariant::SecretsUnchanged) {
        ctx.memory.acked_secrets = Some(super::invariants::secret_sums(ctx)?);
    }
    Ok(())
}

/// [`each`] for `apps`, and the secrets as they were when an armed kill point cut a request.
fn each_of(
    ctx: &StepCtx,
    apps: &[String],
    op: &str,
) -> Result<(Evidence, Option<super::invariants::SecretSums>)> {
    let failpoint = failpoint_file();
    let mut retried = Vec::new();
    let mut at_death = None;
    let watch = ctx.s.checks().contains(&Invariant::SecretsUnchanged);
    let failed = apart(ctx, apps, |app| {
        // Only a kill point armed in this iteration can cut a request (and a look at the
        // node's disk costs a round trip over SSH).
        let armed = ctx.memory.armed && ctx.node.stat(&failpoint)?.is_some();
        if let Err(e) = ctx.agent.op(op, app) {
            ensure!(armed && ctx.node.stat(&failpoint)?.is_none(), e);
            if watch {
                at_death = Some(super::invariants::secret_sums(ctx)?);
            }
            ctx.agent.wait_ready(ctx.s.converge_timeout.0)?;
            ctx.agent.op(op, app)?;
            retried.push(app.to_string());
        }
        Ok(())
    })?;
    let e = Evidence::default()
        .with("apps", apps)
        .with("retried_after_agent_death", retried)
        .with(FAILED_APPS, failed);
    Ok((e, at_death))
}

/// `f` for each app. In a per-app scenario an app's error fails that app alone and the
/// others go on (the returned map, for `FAILED_APPS`); elsewhere the first error ends the step.
fn apart(
    ctx: &StepCtx,
    apps: &[String],
    mut f: impl FnMut(&str) -> Result<()>,
) -> Result<BTreeMap<String, String>> {
    let mut failed = BTreeMap::new();
    for app in apps {
        match f(app) {
            Err(e) if ctx.s.per_app => {
                failed.insert(app.clone(), format!("{e:#}"));
            }
            r => r?,
        }
    }
    Ok(failed)
}

/// `wait-converged`. In a per-app scenario, the apps that are not up (or gone) by the timeout
/// fail alone: the tick cannot converge with them, but the others have.
fn wait_converged(ctx: &StepCtx) -> Result<Evidence> {
    let start = Instant::now();
    let failed = settle(ctx, &ctx.apps)?;
    Ok(Evidence::default().with("seconds", start.elapsed().as_secs_f64()).with(FAILED_APPS, failed))
}

fn settle(ctx: &StepCtx, apps: &[String]) -> Result<BTreeMap<String, String>> {
    let Err(e) = ctx.agent.wait_converged(apps, ctx.s.converge_timeout.0) else { return Ok(BTreeMap::new()) };
    if !ctx.s.per_app {
        return Err(e);
    }
    let list = ctx.agent.list()?;
    let failed: BTreeMap<String, String> = list
        .into_iter()
        .filter(|a| apps.contains(&a.id) && a.desired != archy_agent::store::Desired::Stopped && !a.up)
        .map(|a| (a.id.clone(), format!("not settled within {:?}: {a:?}", ctx.s.converge_timeout.0)))
        .collect();
    // Every app settled, yet no tick converged: the node's failure, not one app's.
    if failed.is_empty() {
        return Err(e);
    }
    Ok(failed)
}

fn purge(ctx: &mut StepCtx) -> Result<Evidence> {
    // Not installed is already the goal.
    let failed = apart(ctx, &ctx.apps, |app| Ok(ctx.agent.uninstall(app, true)?))?;
    for app in ctx.apps.iter().filter(|a| !failed.contains_key(*a)) {
        ctx.memory.acked_desired.insert(app.clone(), Desired::Absent);
    }
    Ok(Evidence::default().with("apps", &ctx.apps).with("purge", true).with(FAILED_APPS, failed))
}

/// A file with random content into each app's first data volume, remembered by checksum.
fn write_data(ctx: &mut StepCtx) -> Result<Evidence> {
    let mut written = Vec::new();
    for app in &ctx.apps {
        let Some(vol) = ctx.catalog.get(app).and_then(|m| m.volumes.first()) else { continue };
        let path = format!("data/apps/{app}/{}/archy-chaos-{:08x}.bin", vol.name, ctx.rng.next_u32());
        let mut bytes = vec![0u8; 4096];
        ctx.rng.fill_bytes(&mut bytes);
        ctx.node.write(&path, &bytes)?;
        let sum = format!("{:x}", sha2::Sha256::digest(&bytes));
        written.push(json!({"path": path, "sha256": sum}));
        ctx.memory.files.push((path, sum));
    }
    Ok(Evidence::default().with("written", written))
}

/// `{app}` expands per app (else the path is hit once); a last component `*` means every
/// file of that directory but hidden ones (locks, the env file). Paths are under `data/`.
fn file_fault(ctx: &StepCtx, path: &str, fault: FileFault) -> Result<Evidence> {
    let per_app: Vec<String> = if path.contains("{app}") {
        ctx.apps.iter().map(|a| path.replace("{app}", a)).collect()
    } else {
        vec![path.to_string()]
    };
    let mut targets = Vec::new();
    for p in per_app {
        let rel = format!("data/{p}");
        match rel.strip_suffix("/*") {
            Some(dir) => targets.extend(
                ctx.node.list(dir)?.into_iter().filter(|n| !n.starts_with('.')).map(|n| format!("{dir}/{n}")),
            ),
            None if ctx.node.stat(&rel)?.is_some() => targets.push(rel),
            None => {}
        }
    }
    let out = targets.iter().map(|t| ctx.node.file_fault(t, fault)).collect::<Result<Vec<_>>>()?;
    let effect = !out.is_empty() && out.iter().all(|e| e.took_effect != Some(false));
    Ok(Evidence::default().with("faults", out).effect(effect))
}

/// Arms a kill point: `each` takes point (iteration - 1) of the agent's list, so iterations
/// enumerate every step boundary of an install (or uninstall) in order.
fn kill_agent_at(ctx: &mut StepCtx, point: &str) -> Result<Evidence> {
    let nth = |list: &[&'static str]| list[(ctx.n as usize).saturating_sub(1) % list.len()];
    let point = match point {
        // Under the podman backend an install writes no unit and reloads nothing: those points
        // are never reached (kill9-mid-install@podman: 6 of 20 iterations unknown).
        "each" if ctx.backend == BackendKind::Quadlet => nth(POINTS),
        "each" => nth(INSTALL_POINTS_PODMAN),
        "each-uninstall" if ctx.backend == BackendKind::Quadlet => nth(UNINSTALL_POINTS_QUADLET),
        "each-uninstall" => nth(UNINSTALL_POINTS_PODMAN),
        p => POINTS
            .iter()
            .chain(UNINSTALL_POINTS_QUADLET)
            .chain(UNINSTALL_POINTS_PODMAN)
            .find(|x| **x == p)
            .copied()
            .with_context(|| format!("unknown kill point `{p}`; known: {POINTS:?}, each, each-uninstall"))?,
    };
    ctx.node.write(&failpoint_file(), point.as_bytes())?;
    ctx.memory.armed = true;
    Ok(Evidence::default().with("armed", point))
}

/// Starts `op` on the apps, then SIGKILLs the agent at a seeded random instant within `within`.
fn kill_agent_during(ctx: &mut StepCtx, op: ApiOp, within: Duration) -> Result<Evidence> {
    ensure!(
        ApiOp::LIFECYCLE.contains(&op),
        "kill-agent-during: `{}` is not one of install, uninstall, start, stop, restart",
        op.name()
    );
    let delay = Duration::from_secs_f64(ctx.rng.random_range(0.0..within.as_secs_f64().max(0.001)));
    each(ctx, op.name())?;
    std::thread::sleep(delay);
    let e = ctx.node.kill_agent("KILL")?;
    acknowledge(ctx)?; // at once: its manager restarts it in 1 s
    Ok(e.with("delay_seconds", delay.as_secs_f64()))
}

/// Every podman call of the agent fails (exit 125) for `duration`, then podman works again.
fn podman_fail(ctx: &StepCtx, duration: Duration) -> Result<Evidence> {
    let errors = || -> Result<f64> {
        Ok(ctx.agent.exec_calls()?.iter().filter(|c| c.result == "error").map(|c| c.count).sum())
    };
    let before = errors()?;
    ctx.node.write(PODMAN_FAIL_FLAG, b"")?;
    let start = Instant::now();
    // A tick now, so the fault meets the agent whatever its tick interval.
    let tick = ctx.agent.reconcile().map(|r| r.failed).map_err(|e| e.to_string());
    std::thread::sleep(duration.saturating_sub(start.elapsed()));
    let after = errors();
    ctx.node.remove(PODMAN_FAIL_FLAG)?;
    let failed = after? - before;
    Ok(Evidence::default().with("failed_podman_calls", failed).with("tick_during", tick).effect(failed > 0.0))
}

/// The data root full or read-only for `duration`, met by one agent tick, then off: always,
/// even when turning it on failed halfway, since a node left so would fail every later step.
fn disk_fault(ctx: &StepCtx, fault: DiskFault, duration: Duration) -> Result<Evidence> {
    // One at a time: a full disk cannot be emptied while another client made it read-only,
    // and a fault left on would be blamed on the agent.
    static DISK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = DISK.lock().unwrap_or_else(|e| e.into_inner());
    let start = Instant::now();
    let on = ctx.node.disk_fault(fault, true);
    let mut tick = None;
    if on.is_ok() {
        // A tick now, so the fault meets the agent whatever its tick interval.
        tick = Some(ctx.agent.reconcile().map(|r| r.failed).map_err(|e| e.to_string()));
        std::thread::sleep(duration.saturating_sub(start.elapsed()));
    }
    let off = ctx.node.disk_fault(fault, false);
    let on = match (on, &off) {
        (Ok(on), _) => on,
        (Err(e), Ok(_)) => return Err(e),
        (Err(e), Err(o)) => return Err(e.context(format!("and turning it off failed too: {o:#}"))),
    };
    let off = off.context("turning the disk fault off")?;
    // Left on, it would fail the invariants after this step for no fault of the agent.
    ensure!(
        off.took_effect == Some(true),
        "the disk fault {fault:?} is still on after turning it off: {off:?}"
    );
    let effect = on.took_effect == Some(true);
    Ok(Evidence::default().with("on", on).with("off", off).with("tick_during", tick).effect(effect))
}

/// Runs a command inside the node as its service user; with `expect`, its output must
/// contain that text.
fn exec(ctx: &StepCtx, argv: &[String], expect: Option<&str>) -> Result<Evidence> {
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let out = ctx.node.exec(&argv)?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    match expect {
        Some(want) => ensure!(
            out.status.success() && stdout.contains(want),
            "{argv:?} printed {stdout:?} ({}), expected {want:?}",
            out.status
        ),
        None => ensure!(out.status.success(), "{argv:?}: {}", String::from_utf8_lossy(&out.stderr).trim()),
    }
    Ok(Evidence::default().with("argv", argv).with("stdout", stdout.chars().take(200).collect::<String>()))
}

/// A check of each app: its evidence by app, or the first app's error. A check no app has
/// (no `rpc`, no `ui`) is `n/a`, shown so in the scorecard.
fn per_app(ctx: &StepCtx, check: impl Fn(&StepCtx, &Manifest) -> Result<Evidence>) -> Result<Evidence> {
    let mut by_app = serde_json::Map::new();
    let mut applicable = false;
    let failed = apart(ctx, &ctx.apps, |app| {
        let m = ctx.catalog.get(app).with_context(|| format!("{app} is not in the node's catalog"))?;
        let e = check(ctx, m)?;
        applicable |= !e.details.contains_key(probe::NOT_APPLICABLE);
        by_app.insert(app.to_string(), serde_json::to_value(e)?);
        Ok(())
    })?;
    let e = Evidence::of(by_app.into()).with(FAILED_APPS, failed);
    Ok(if applicable { e } else { e.with(probe::NOT_APPLICABLE, true) })
}

/// Where `catalog` steps keep what they took out of the catalog, under the node's root.
const ASIDE: &str = "catalog-aside";

/// Changes the node's catalog as a platform update would, and records the change in the
/// history (ok, or fail with why: repairing a manifest that is not broken, say).
pub fn catalog_change(
    node: &dyn crate::node::Node,
    history: &History,
    index: usize,
    client: usize,
    change: CatalogChange,
    app: &str,
) -> Result<Evidence> {
    let invoked = history.now();
    let result = change_catalog(node, change, app);
    let (outcome, message) = match &result {
        Ok(()) => (Outcome::Ok, String::new()),
        Err(e) => (Outcome::Fail, format!("{e:#}")),
    };
    let step = Step::Catalog { change, app: app.to_string() };
    history.record(Entry {
        index,
        client,
        step,
        invoked,
        completed: history.now(),
        outcome,
        message: message.clone(),
    });
    Ok(Evidence::default().with("outcome", outcome).with("message", message))
}

fn change_catalog(node: &dyn crate::node::Node, change: CatalogChange, app: &str) -> Result<()> {
    let manifest = format!("catalog/{app}/manifest.yml");
    let good = format!("{ASIDE}/{app}.good.yml");
    let removed = format!("{ASIDE}/{app}");
    let present = node.stat(&manifest)?.is_some();
    let broken = node.stat(&good)?.is_some();
    match change {
        CatalogChange::Upgrade => {
            ensure!(present && !broken, "{app} is not in the catalog or its manifest is broken");
            let text = node.read(&manifest)?.context("manifest vanished")?;
            let mut m: serde_yaml::Value = serde_yaml::from_slice(&text).context("parsing the manifest")?;
            let rev = m.get("version").and_then(|v| v.as_str()).unwrap_or("0").to_string();
            let n = rev.rsplit_once("+u").and_then(|(_, n)| n.parse::<u32>().ok()).unwrap_or(0) + 1;
            let base = rev.rsplit_once("+u").map_or(rev.as_str(), |(b, _)| b).to_string();
            m["version"] = format!("{base}+u{n}").into();
            let env = m.as_mapping_mut().context("a manifest is a mapping")?;
            let environment = env
                .entry("environment".into())
                .or_insert_with(|| serde_yaml::Value::Mapping(Default::default()));
            environment["ARCHY_UPGRADE"] = n.to_string().into();
            // Every other upgrade brings a new secret, as new versions do.
            if n.is_multiple_of(2) {
                let secrets = env
                    .entry("generated_secrets".into())
                    .or_insert_with(|| serde_yaml::Value::Sequence(Vec::new()));
                if let Some(list) = secrets.as_sequence_mut() {
                    let mut s = serde_yaml::Mapping::new();
                    s.insert("target".into(), format!("upgrade-{n}").into());
                    s.insert("kind".into(), "hex32".into());
                    list.push(serde_yaml::Value::Mapping(s));
                }
            }
            node.write(&manifest, serde_yaml::to_string(&m)?.as_bytes())
        }
        CatalogChange::Break => {
            ensure!(present && !broken, "{app} is not in the catalog or already broken");
            node.write(&good, &node.read(&manifest)?.context("manifest vanished")?)?;
            node.write(&manifest, b"id: [this manifest was broken by archy-chaos\n")
        }
        CatalogChange::Repair => {
            ensure!(broken, "{app}'s manifest is not broken");
            node.write(&manifest, &node.read(&good)?.context("the good manifest vanished")?)?;
            node.remove(&good).map(drop)
        }
        CatalogChange::Remove => {
            ensure!(present && !broken, "{app} is not in the catalog or its manifest is broken");
            for f in node.list(&format!("catalog/{app}"))? {
                let bytes = node.read(&format!("catalog/{app}/{f}"))?.context("a catalog file vanished")?;
                node.write(&format!("{removed}/{f}"), &bytes)?;
            }
            node.remove(&format!("catalog/{app}")).map(drop)
        }
        CatalogChange::Restore => {
            ensure!(!present && node.stat(&removed)?.is_some(), "{app} was not removed from the catalog");
            for f in node.list(&removed)? {
                let bytes = node.read(&format!("{removed}/{f}"))?.context("a removed file vanished")?;
                node.write(&format!("catalog/{app}/{f}"), &bytes)?;
            }
            node.remove(&removed).map(drop)
        }
    }
}
