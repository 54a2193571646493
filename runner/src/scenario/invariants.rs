//! One function per invariant: what must hold of the whole node at the end of an iteration.
//! Each reads the node through its primitives and the agent's API only.

use std::collections::BTreeMap;

use anyhow::{bail, ensure, Context, Result};
use archy_agent::manifest::{Manifest, Network};
use archy_agent::store::{Desired, State, PREVIOUS_FILE, STATE_FILE};
use serde_json::{json, Value};
use sha2::Digest;

use super::engine::StepCtx;
use super::model::Invariant;
use crate::node::{FileKind, Node};

pub fn check(ctx: &StepCtx, inv: Invariant) -> Result<()> {
    match inv {
        Invariant::Converged => converged(ctx),
        Invariant::AppsUp => apps_up(ctx),
        Invariant::SecretsValid => secrets_valid(ctx),
        Invariant::DataIntact => data_intact(ctx),
        Invariant::AgentReady => {
            let st = ctx.agent.status()?;
            ensure!(st.ready, "agent not ready: {st:?}");
            Ok(())
        }
        Invariant::ContainersUnchanged => containers_unchanged(ctx),
        Invariant::KillPointHit => {
            ensure!(
                ctx.node.stat(&super::steps::failpoint_file())?.is_none(),
                "the armed kill point was never reached: the fault did not take effect"
            );
            Ok(())
        }
        Invariant::NoOrphans => no_orphans(ctx),
        Invariant::StateValid => state_valid(ctx),
        Invariant::PortsMatch => ports_match(ctx),
        Invariant::Model => {
            let entries = ctx.memory.history.entries();
            let mut seen = ctx.memory.seen.clone();
            super::checker::check(
                ctx.node,
                ctx.agent,
                &ctx.catalog,
                &ctx.apps,
                &entries,
                &mut seen,
                ctx.s.converge_timeout.0,
            )
        }
    }
}

/// Desired == observed within the timeout, and the next tick is a no-op with exactly one
/// podman call (observation) and no systemctl call.
fn converged(ctx: &StepCtx) -> Result<()> {
    ctx.agent.wait_converged(&ctx.apps, ctx.s.converge_timeout.0)?;
    let r = ctx.agent.reconcile()?;
    ensure!(
        r.actions.is_empty() && r.podman_calls == 1 && r.systemctl_calls == 0,
        "the tick after convergence was not a no-op: {r:?}"
    );
    Ok(())
}

/// Every app of the scenario up, as seen from outside the agent: its container runs and is
/// healthy by podman on the node, and it answers on its port from inside the node.
fn apps_up(ctx: &StepCtx) -> Result<()> {
    let observed = super::checker::containers(ctx.node)?;
    let mut down = Vec::new();
    for app in &ctx.apps {
        let c = observed.iter().find(|c| &c.app == app);
        if !c.is_some_and(|c| c.running && c.health.as_deref().is_none_or(|h| h == "healthy")) {
            down.push(format!("{app} (container: {c:?})"));
        } else if !super::checker::answers(ctx.node, &ctx.catalog, app)? {
            down.push(format!("{app} (runs, but does not answer on its port)"));
        }
    }
    ensure!(down.is_empty(), "not up: {down:?}");
    Ok(())
}

/// The scenario's apps the agent has installed (running or stopped), by their desired state.
fn installed(ctx: &StepCtx) -> Result<Vec<(String, Desired)>> {
    Ok(ctx
        .agent
        .list()?
        .into_iter()
        .filter(|a| ctx.apps.contains(&a.id) && a.desired != Desired::Absent)
        .map(|a| (a.id, a.desired))
        .collect())
}

/// Generated secrets of every installed app: present, valid, 0600, owned by the service user.
fn secrets_valid(ctx: &StepCtx) -> Result<()> {
    let uid = ctx.node.service_uid()?;
    for (app, _) in installed(ctx)? {
        if let Some(m) = ctx.catalog.get(&app) {
            secrets_of(ctx.node, m, uid)?;
        }
    }
    Ok(())
}

/// Checks the generated secrets of one app as `secrets-valid` does, and returns each file's
/// sha256 (the values themselves never leave this function).
pub fn secrets_of(node: &dyn Node, m: &Manifest, uid: u32) -> Result<Vec<(String, String)>> {
    let app = &m.id;
    let mut sums = Vec::new();
    for g in &m.generated_secrets {
        let mut files = vec![g.target.clone()];
        if g.kind == archy_agent::manifest::SecretKind::Bcrypt {
            files.push(format!("{}{}", g.target, archy_agent::manifest::BCRYPT_PLAINTEXT_SUFFIX));
        }
        let mut values = Vec::new();
        for f in &files {
            let rel = format!("data/secrets/{app}/{f}");
            let st = node.stat(&rel)?.with_context(|| format!("{app}/{f}: missing"))?;
            ensure!(
                st.kind == FileKind::File && st.uid == uid && st.mode == 0o600,
                "{app}/{f}: {:?} owner {} mode {:o} (want a file, owner {uid}, mode 600)",
                st.kind,
                st.uid,
                st.mode
            );
            let value = node.read(&rel)?.with_context(|| format!("{app}/{f}: vanished"))?;
            sums.push((f.clone(), format!("{:x}", sha2::Sha256::digest(&value))));
            values.push(value);
        }
        if let Some(reason) = archy_agent::secrets::problem(g.kind, &values[0], values.get(1)) {
            bail!("{app}/{}: {}", g.target, reason.as_str());
        }
    }
    Ok(sums)
}

/// Files written by `write-data` still there with the same checksum.
fn data_intact(ctx: &StepCtx) -> Result<()> {
    for (path, sum) in &ctx.memory.files {
        let now = ctx.node.hash(path)?.with_context(|| format!("{path} lost"))?;
        ensure!(&now == sum, "{path} changed: sha256 {sum} -> {now}");
    }
    Ok(())
}

/// Every container (name, id, main pid), sorted, as podman in the node lists them.
pub fn containers(node: &dyn Node) -> Result<String> {
    let out = node.exec(&["podman", "ps", "--format", "{{.Names}} {{.ID}} {{.Pid}}"])?;
    ensure!(out.status.success(), "podman ps: {}", String::from_utf8_lossy(&out.stderr));
    let mut lines: Vec<&str> = std::str::from_utf8(&out.stdout)?.lines().collect();
    lines.sort();
    Ok(lines.join("\n"))
}

/// Every container seen by `snapshot-containers` still runs: same id, same main process.
fn containers_unchanged(ctx: &StepCtx) -> Result<()> {
    let before = ctx.memory.containers.as_ref().context("the scenario has no snapshot-containers step")?;
    let now = containers(ctx.node)?;
    ensure!(&now == before, "containers were restarted or replaced:\nbefore: {before}\nafter:  {now}");
    Ok(())
}

/// No managed container of an app that is not installed, nor one under another name than
/// the app's (a stray).
fn no_orphans(ctx: &StepCtx) -> Result<()> {
    let out = ctx.node.exec(&[
        "podman",
        "ps",
        "-a",
        "--format",
        "{{.Names}} {{index .Labels \"io.archy.app\"}}",
        "--filter",
        "label=io.archy.app",
    ])?;
    ensure!(out.status.success(), "podman ps: {}", String::from_utf8_lossy(&out.stderr).trim());
    let installed: Vec<String> = ctx.agent.list()?.into_iter().map(|a| a.id).collect();
    let orphans: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| {
            let mut f = l.split_whitespace();
            let (name, app) = (f.next().unwrap_or_default(), f.next().unwrap_or_default());
            !installed.iter().any(|i| i == app)
                || ctx.catalog.get(app).is_none_or(|m| m.container_name() != name)
        })
        .map(str::to_string)
        .collect();
    ensure!(orphans.is_empty(), "orphan containers: {orphans:?}");
    Ok(())
}

/// The state file parses and the agent never had to recover it: a crash must not damage it.
fn state_valid(ctx: &StepCtx) -> Result<()> {
    let rel = format!("data/{STATE_FILE}");
    let bytes = ctx.node.read(&rel)?.with_context(|| format!("{rel} missing"))?;
    serde_json::from_slice::<State>(&bytes).with_context(|| format!("{rel} does not parse"))?;
    // Only what this iteration moved aside: a host keeps the files of earlier scenarios.
    let aside: Vec<String> =
        states_aside(ctx.node)?.into_iter().filter(|n| !ctx.memory.aside_before.contains(n)).collect();
    ensure!(
        aside.is_empty(),
        "the agent found its state file damaged and moved it aside ({aside:?}): a crash must never damage the state"
    );
    Ok(())
}

/// State files the agent moved aside after finding them damaged.
pub fn states_aside(node: &dyn Node) -> Result<Vec<String>> {
    Ok(node
        .list("data")?
        .into_iter()
        .filter(|n| n.starts_with("state.json.") && n != PREVIOUS_FILE)
        .collect())
}

/// Each running app's live port bindings are those of its manifest, and nothing is published
/// under host networking. One `podman inspect` for every app (a round trip over SSH each).
fn ports_match(ctx: &StepCtx) -> Result<()> {
    let running: Vec<&archy_agent::manifest::Manifest> = installed(ctx)?
        .iter()
        .filter(|(_, d)| *d == Desired::Running)
        .filter_map(|(app, _)| ctx.catalog.get(app))
        .collect();
    if running.is_empty() {
        return Ok(());
    }
    let names: Vec<String> = running.iter().map(|m| m.container_name()).collect();
    let mut argv = vec![
        "podman",
        "inspect",
        "--format",
        "{{.Name}}|{{json .HostConfig.PortBindings}}|{{json .Config.CreateCommand}}",
    ];
    argv.extend(names.iter().map(String::as_str));
    let out = ctx.node.exec(&argv)?;
    let text = String::from_utf8_lossy(&out.stdout);
    for m in running {
        let app = &m.id;
        let line = text.lines().find(|l| l.split('|').next() == Some(m.container_name().as_str()));
        let line = line.with_context(|| format!("{app}: no container to inspect"))?;
        let mut fields = line.splitn(3, '|').skip(1);
        let (bindings, command) = (fields.next().unwrap_or("{}"), fields.next().unwrap_or("[]"));
        let command: Vec<String> = serde_json::from_str(command).unwrap_or_default();
        let published: Vec<&String> =
            command.iter().filter(|a| a.starts_with("--publish") || a.starts_with("-p")).collect();
        if m.network == Network::Host {
            ensure!(
                published.is_empty(),
                "{app} runs with host networking but was created with {published:?} (podman 4 discards the mapping with a warning, podman 5 refuses it with exit 125)"
            );
            continue;
        }
        let live: BTreeMap<String, Vec<Value>> = serde_json::from_str(bindings).unwrap_or_default();
        let mut want: BTreeMap<String, Vec<Value>> = BTreeMap::new();
        for p in &m.ports {
            want.entry(format!("{}/{}", p.container_port(), p.protocol))
                .or_default()
                .push(json!({"HostIp": p.bind.to_string(), "HostPort": p.host.to_string()}));
        }
        ensure!(live == want, "{app}: live port bindings {live:?}, manifest {want:?}");
    }
    Ok(())
}
