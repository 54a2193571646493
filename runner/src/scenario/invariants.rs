//! One function per invariant: what must hold of the whole node at the end of an iteration.
//! Each reads the node through its primitives and the agent's API only.

use std::collections::BTreeMap;

use anyhow::{bail, ensure, Context, Result};
use archy_agent::manifest::{Manifest, Network};
use archy_agent::quadlet::{whole_hash, LABEL_SPEC_HASH};
use archy_agent::runtime::BackendKind;
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
        Invariant::SecretsUnchanged => secrets_unchanged(ctx),
        Invariant::StateUnchanged => state_unchanged(ctx),
        Invariant::UnitsIntact => units_intact(ctx),
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
        let mut values = Vec::new();
        for f in &secret_files(g) {
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

/// Each app's secret files that are whole and valid, with their sha256.
pub type SecretSums = BTreeMap<String, Vec<(String, String)>>;

/// The files of one generated secret: its value, and a bcrypt hash's password beside it.
fn secret_files(g: &archy_agent::manifest::GeneratedSecret) -> Vec<String> {
    let mut files = vec![g.target.clone()];
    if g.kind == archy_agent::manifest::SecretKind::Bcrypt {
        files.push(format!("{}{}", g.target, archy_agent::manifest::BCRYPT_PLAINTEXT_SUFFIX));
    }
    files
}

/// Every secret of the scenario's apps that is whole and valid now (both files of a bcrypt
/// pair), each file with its sha256: what a fault that strikes now must leave as it is
/// (`secrets-unchanged`). One caught half-written was never handed to its app: the agent may
/// make it again.
pub fn secret_sums(ctx: &StepCtx) -> Result<SecretSums> {
    let mut out = BTreeMap::new();
    for m in ctx.apps.iter().filter_map(|a| ctx.catalog.get(a)) {
        let mut sums = Vec::new();
        for g in &m.generated_secrets {
            let files = secret_files(g);
            let mut values = Vec::new();
            for f in &files {
                values.extend(ctx.node.read(&format!("data/secrets/{}/{f}", m.id))?);
            }
            if values.len() == files.len()
                && archy_agent::secrets::problem(g.kind, &values[0], values.get(1)).is_none()
            {
                sums.extend(
                    files.into_iter().zip(values.iter().map(|v| format!("{:x}", sha2::Sha256::digest(v)))),
                );
            }
        }
        out.insert(m.id.clone(), sums);
    }
    Ok(out)
}

/// The secrets there when the last fault struck are there, byte for byte, for every app
/// still installed: a secret the agent lost and made again fails, though it is valid.
fn secrets_unchanged(ctx: &StepCtx) -> Result<()> {
    let acked = ctx.memory.acked_secrets.as_ref().context(
        "no fault struck in this iteration (power-cut, reboot, graceful-reboot, kill-agent, kill-agent-during or an armed kill point), so no secret was snapshotted",
    )?;
    let installed: Vec<String> = installed(ctx)?.into_iter().map(|(app, _)| app).collect();
    let now = secret_sums(ctx)?;
    let mut changed = Vec::new();
    for (app, files) in acked.iter().filter(|(app, _)| installed.contains(app)) {
        for (f, sum) in files {
            match now.get(app).and_then(|n| n.iter().find(|(g, _)| g == f)) {
                Some((_, now)) if now == sum => {}
                Some((_, now)) => changed.push(format!("{app}/{f} (sha256 {sum} -> {now})")),
                None => changed.push(format!("{app}/{f} (gone, or no longer valid)")),
            }
        }
    }
    ensure!(
        changed.is_empty(),
        "secrets the agent had written before the fault did not come back as they were: {changed:?}; every app that used the old values is locked out of its data (was a secret not fsynced, or its directory not synced after the rename?)"
    );
    Ok(())
}

/// Each app's desired state, as the agent reports it, is what the scenario's last
/// acknowledged request for it made it.
fn state_unchanged(ctx: &StepCtx) -> Result<()> {
    let now = ctx.agent.list()?;
    let mut lost = Vec::new();
    for (app, want) in &ctx.memory.acked_desired {
        let has = now.iter().find(|a| &a.id == app).map_or(Desired::Absent, |a| a.desired);
        if has != *want {
            lost.push(format!("{app}: acknowledged {}, now {}", want.as_str(), has.as_str()));
        }
    }
    ensure!(
        lost.is_empty(),
        "the agent lost desired state it had acknowledged: {lost:?} (was the state file not fsynced, or its directory not synced after the rename?)"
    );
    Ok(())
}

/// Under Quadlet, each installed app's unit is there and whole, and the running container
/// carries its hash. No other unit of the scenario's apps is there: not under the podman
/// backend, not of an app uninstalled (either would start a container at boot).
fn units_intact(ctx: &StepCtx) -> Result<()> {
    let out = ctx.node.exec(&[
        "podman",
        "ps",
        "--filter",
        "label=io.archy.app",
        "--format",
        &format!("{{{{index .Labels \"io.archy.app\"}}}} {{{{index .Labels \"{LABEL_SPEC_HASH}\"}}}}"),
    ])?;
    ensure!(out.status.success(), "podman ps: {}", String::from_utf8_lossy(&out.stderr).trim());
    let running: BTreeMap<String, String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once(' ').map(|(a, h)| (a.to_string(), h.trim().to_string())))
        .collect();
    let installed: Vec<String> = installed(ctx)?.into_iter().map(|(app, _)| app).collect();
    // Every app's unit in one command (a round trip each over SSH): a record separator, the
    // app and its unit's bytes, or nothing where it has none (a unit of ours has a header).
    let script = "for a; do printf '\\036%s\\n' \"$a\"; cat -- \"$HOME/.config/containers/systemd/$a.container\" 2>/dev/null; done";
    let mut argv = vec!["sh", "-c", script, "sh"];
    argv.extend(ctx.apps.iter().map(String::as_str));
    let out = ctx.node.exec(&argv)?;
    let text = String::from_utf8_lossy(&out.stdout);
    let units: BTreeMap<&str, &str> =
        text.split('\u{1e}').skip(1).map(|part| part.split_once('\n').unwrap_or((part, ""))).collect();
    let mut bad = Vec::new();
    for app in &ctx.apps {
        let unit = units.get(app.as_str()).copied().filter(|u| !u.is_empty());
        let want = ctx.backend == BackendKind::Quadlet && installed.contains(app);
        match (want, unit) {
            (false, None) => {}
            (false, Some(_)) => bad.push(format!(
                "{app}: a unit, though {}",
                match installed.contains(app) {
                    true => "the podman backend runs it",
                    false => "it is not installed",
                }
            )),
            (true, None) => bad.push(format!("{app}: no unit")),
            (true, Some(unit)) => match (whole_hash(unit), running.get(app)) {
                (None, _) => {
                    bad.push(format!("{app}: the unit is not whole (its bytes do not match its hash label)"))
                }
                (Some(h), Some(r)) if h != r => {
                    bad.push(format!("{app}: the container runs spec {r}, the unit is {h}"))
                }
                _ => {}
            },
        }
    }
    ensure!(bad.is_empty(), "units: {bad:?}");
    Ok(())
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
