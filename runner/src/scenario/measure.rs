//! L6 measurements inside a node, each beside the raw podman baseline it is built on, taken in
//! the same run and interleaved so that the machine's noise hits both alike. Samples go back
//! in the step's [`Evidence`].

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use archy_agent::manifest::Catalog;
use archy_agent::quadlet;

use crate::agent_client::AgentClient;
use crate::evidence::Evidence;
use crate::node::Node;
use crate::scenario::{kpi, ApiOp};

/// Polls `done` every 20 ms until it holds.
fn until(what: &str, timeout: Duration, mut done: impl FnMut() -> Result<bool>) -> Result<()> {
    let start = Instant::now();
    while !done()? {
        ensure!(start.elapsed() < timeout, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Runs `script` in the node's shell with `args` as `$@`; its stdout, which must be a number
/// of nanoseconds measured inside the node (so the cost of entering the node is not counted).
fn timed_in_node(node: &dyn Node, script: &str, args: &[String]) -> Result<f64> {
    let mut argv = vec!["sh", "-c", script, "sh"];
    argv.extend(args.iter().map(String::as_str));
    let out = node.exec(&argv)?;
    ensure!(out.status.success(), "{script}: {}", String::from_utf8_lossy(&out.stderr).trim());
    let ns: f64 = String::from_utf8_lossy(&out.stdout).trim().parse().context("timing output")?;
    Ok(ns / 1e9)
}

/// Cold install (request -> up) of each app beside two floors of the same container until its
/// health check passes: `podman run -d`, and the agent's own unit installed by hand under
/// systemd (written, daemon-reload, start). The order rotates with the iteration, except that
/// the agent goes first while the app has no secrets (the floors reuse the agent's). The
/// agent's per-step times come from its metrics, read around each of its installs.
pub fn install(
    node: &dyn Node,
    agent: &AgentClient,
    catalog: &Catalog,
    apps: &[String],
    timeout: Duration,
    n: u32,
) -> Result<Evidence> {
    let version = node.exec(&["podman", "version", "--format", "{{.Client.Version}}"])?;
    let version = String::from_utf8_lossy(&version.stdout).trim().parse().map_err(anyhow::Error::msg)?;
    let mut target = quadlet::Target::new(version, node.root_on_node().join("data"));
    // The node's cgroup view has no memory controller: the agent leaves limits out there too.
    target.memory_limits = false;
    let (mut ours, mut raw, mut unit, mut inside) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut steps: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    for app in apps {
        let m = catalog.get(app).with_context(|| format!("{app} is not in the node's catalog"))?;
        let rendered = quadlet::render(m, &target);
        let probe = if m.health.is_some() {
            "i=0; until podman healthcheck run \"$name\" >/dev/null 2>&1; do i=$((i+1)); [ $i -lt 3000 ] || exit 1; done"
        } else {
            ":"
        };
        let mut measure_agent = || -> Result<f64> {
            let before = agent.install_steps()?;
            let start = Instant::now();
            agent.op("install", app)?;
            until(&format!("{app} up"), timeout, || Ok(agent.app(app)?.is_some_and(|a| a.up)))?;
            let t = start.elapsed().as_secs_f64();
            let after = agent.install_steps()?;
            // Steps the backend has (no unit nor daemon-reload under podman), once each; each
            // runs from the end of the one before, so together they are the install by the
            // agent's own clock, from the request to the first healthy probe.
            let mut own = 0.0;
            for step in archy_agent::metrics::INSTALL_STEPS {
                let (a, b) = (
                    after.get(*step).copied().unwrap_or_default(),
                    before.get(*step).copied().unwrap_or_default(),
                );
                if a.1 > b.1 {
                    steps.entry(step).or_default().push(a.0 - b.0);
                    own += a.0 - b.0;
                }
            }
            inside.push(own);
            // Removed again (secrets and data kept) so the floors can use the same name and ports.
            agent.uninstall(app, false)?;
            until(&format!("{app} uninstalled"), timeout, || Ok(agent.app(app)?.is_none()))?;
            Ok(t)
        };
        let measure_raw = || -> Result<f64> {
            let script = format!(
                "name={name}; s=$(date +%s%N); podman run -d \"$@\" >/dev/null || exit 1; {probe}; e=$(date +%s%N); podman rm -f -t 0 \"$name\" >/dev/null; echo $((e-s))",
                name = m.container_name()
            );
            timed_in_node(node, &script, &raw_args(&rendered))
        };
        let measure_unit = || -> Result<f64> {
            // Not the app's unit name: the agent's unit of the app must stay the agent's.
            let script = format!(
                "name={name}; svc=archy-floor-{app}; d=\"$HOME/.config/containers/systemd\"; f=\"$d/$svc.container\"
                 clean() {{ systemctl --user stop \"$svc\" >/dev/null 2>&1; rm -f \"$f\"; systemctl --user daemon-reload >/dev/null 2>&1; podman rm -f -i -t 0 \"$name\" >/dev/null 2>&1; }}
                 s=$(date +%s%N)
                 {{ mkdir -p \"$d\" && printf %s \"$1\" >\"$f\" && systemctl --user daemon-reload && systemctl --user start \"$svc\" && ( {probe} ); }} || {{ clean; exit 1; }}
                 e=$(date +%s%N); clean; echo $((e-s))",
                name = m.container_name()
            );
            timed_in_node(node, &script, &[raw_unit(&rendered)])
        };
        let mut order: Vec<usize> = vec![0, 1, 2];
        order.rotate_left(n as usize % 3);
        if node.stat(&format!("data/secrets/{app}"))?.is_none() && !m.generated_secrets.is_empty() {
            order = vec![0, 1, 2]; // the floors reuse the secrets the agent makes
        }
        for which in order {
            match which {
                0 => ours.push(measure_agent()?),
                1 => raw.push(measure_raw()?),
                _ => unit.push(measure_unit()?),
            }
        }
    }
    let ratio = |a: &[f64], b: &[f64]| -> Vec<f64> { a.iter().zip(b).map(|(a, b)| a / b).collect() };
    let mut evidence = Evidence::default()
        .with("apps", apps)
        .measure(kpi::INSTALL_RATIO, ratio(&ours, &raw))
        // Timed as the floor is, inside the node: by the agent's clock, not through the API
        // and the runner's polls (about 25 ms of a 500 ms install).
        .measure(kpi::INSTALL_QUADLET_RATIO, ratio(&inside, &unit))
        .measure(kpi::QUADLET_PODMAN_RATIO, ratio(&unit, &raw))
        .measure(kpi::INSTALL, ours)
        .measure(kpi::RAW_RUN, raw)
        .measure(kpi::RAW_QUADLET, unit);
    for (step, samples) in steps {
        evidence = evidence.measure(&kpi::install_step(step), samples);
    }
    Ok(evidence)
}

/// The container as `podman run -d` arguments, without the agent's labels (so the agent does
/// not take it for the app's).
fn raw_args(unit: &quadlet::Unit) -> Vec<String> {
    unit.podman_args.iter().filter(|a| !a.starts_with("--label=io.archy")).cloned().collect()
}

/// The unit text as a person would install it: without the agent's labels, nor its header (the
/// agent never reads or touches a unit without it).
fn raw_unit(unit: &quadlet::Unit) -> String {
    unit.text
        .lines()
        .filter(|l| *l != quadlet::HEADER && !l.starts_with("Label=io.archy"))
        .map(|l| format!("{l}\n"))
        .collect()
}

/// No-op ticks at each app count, each beside `podman ps` (the tick's one observation call)
/// timed inside the node. The apps are copies of fx-web written into the node's catalog.
pub fn ticks(
    node: &dyn Node,
    agent: &AgentClient,
    counts: &[usize],
    ticks: u32,
    timeout: Duration,
) -> Result<Evidence> {
    let max = counts.iter().copied().max().unwrap_or(0);
    ensure!((1..=60).contains(&max), "counts must be between 1 and 60 apps");
    let template = node.read("catalog/fx-web/manifest.yml")?.context("the node's catalog has no fx-web")?;
    let copies = fixture_copies(&String::from_utf8_lossy(&template), max);
    for (id, text) in &copies {
        node.write(&format!("catalog/{id}/manifest.yml"), text.as_bytes())?;
    }
    let ids: Vec<String> = copies.into_iter().map(|(id, _)| id).collect();
    let mut evidence = Evidence::default().with("counts", counts);
    let mut sorted = counts.to_vec();
    sorted.sort_unstable();
    let result = (|| -> Result<()> {
        for n in sorted {
            for id in &ids[..n] {
                agent.op("install", id)?;
            }
            agent.wait_converged(&ids[..n], timeout)?;
            let (mut tick, mut ps, mut ratio) = (Vec::new(), Vec::new(), Vec::new());
            let mut acted = 0;
            while tick.len() < ticks as usize {
                let raw = timed_in_node(
                    node,
                    "s=$(date +%s%N); podman ps -a --format json --filter label=io.archy.app >/dev/null || exit 1; e=$(date +%s%N); echo $((e-s))",
                    &[],
                )?;
                let r = agent.reconcile()?;
                if !r.actions.is_empty() {
                    // Not a no-op tick: a health check that timed out on a busy machine makes
                    // the agent probe. The sample is taken again once the node has converged,
                    // unless it keeps happening.
                    acted += 1;
                    ensure!(acted <= 3, "ticks of the converged node with {n} apps keep acting: {r:?}");
                    agent.wait_converged(&ids[..n], timeout)?;
                    continue;
                }
                let t = r.duration_seconds;
                tick.push(t);
                ps.push(raw);
                ratio.push(t / raw);
            }
            evidence = std::mem::take(&mut evidence).with(&format!("ticks_that_acted_{n:02}apps"), acted);
            evidence = std::mem::take(&mut evidence)
                .measure(&kpi::at_apps(kpi::TICK, n), tick)
                .measure(&kpi::at_apps(kpi::RAW_PS, n), ps)
                .measure(&kpi::at_apps(kpi::TICK_RATIO, n), ratio);
        }
        Ok(())
    })();
    // The copies go whatever happened, so the scenario's invariants see only its own apps.
    let cleaned = crate::scenario::engine::clean(agent, &ids, timeout);
    result?;
    cleaned?;
    Ok(evidence)
}

/// `n` copies of the fx-web fixture (`bench-01`...) on distinct host ports, health-checked
/// every 30 s as the catalog's real apps are: (id, manifest). With fx-web's own 2 s, twenty
/// copies ran ten podman health checks a second on two cores, and every fifth second of
/// ticks took over a second (release run of 2026-12-02: tick p99 1.3 s at 20 apps).
pub fn fixture_copies(fx_web: &str, n: usize) -> Vec<(String, String)> {
    (1..=n)
        .map(|i| {
            let id = format!("bench-{i:02}");
            let text = fx_web
                .replace("id: fx-web", &format!("id: {id}"))
                .replace("interval: 2s", "interval: 30s")
                // Its host port, and the ui and rpc entries that name it.
                .replace("18080", &(18100 + i).to_string());
            (id, text)
        })
        .collect()
}

/// Podman calls (beyond the per-tick `podman ps`) and systemctl calls the agent makes for
/// each lifecycle operation on the first app, from the operation to convergence.
pub fn calls(agent: &AgentClient, apps: &[String], timeout: Duration) -> Result<Evidence> {
    let app = apps.first().context("no app")?;
    // Every call but the ticks' `ps`, by "tool verb": the evidence says which calls an
    // operation made, the KPIs how many.
    let count = || -> Result<BTreeMap<String, f64>> {
        let mut by = BTreeMap::new();
        for c in agent.exec_calls()?.into_iter().filter(|c| c.verb != "ps") {
            *by.entry(format!("{} {}", c.tool, c.verb)).or_default() += c.count;
        }
        Ok(by)
    };
    let mut evidence = Evidence::default().with("app", app);
    let mut made = BTreeMap::new();
    for op in ApiOp::LIFECYCLE {
        let before = count()?;
        agent.op(op.name(), app)?;
        agent.wait_converged(std::slice::from_ref(app), timeout)?;
        let delta: BTreeMap<String, f64> = count()?
            .into_iter()
            .filter_map(|(k, n)| {
                let d = n - before.get(&k).copied().unwrap_or(0.0);
                (d > 0.0).then_some((k, d))
            })
            .collect();
        // Folded from 0.0: `Sum` of no f64 is -0.0, which would read as "fewer calls than 0".
        let sum = |tool: &str| {
            delta.iter().filter(|(k, _)| k.starts_with(&format!("{tool} "))).fold(0.0, |a, (_, n)| a + n)
        };
        evidence = evidence
            .measure(&kpi::calls(op.name(), "podman"), vec![sum("podman")])
            .measure(&kpi::calls(op.name(), "systemctl"), vec![sum("systemctl")]);
        made.insert(op.name(), delta);
    }
    Ok(evidence.with("calls", made))
}

#[cfg(test)]
mod tests {
    /// tick-scaling's copies went invalid when fx-web's ui and rpc came to name its host port.
    #[test]
    fn bug_fixture_copies_of_fx_web_are_valid_manifests() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../apps/fx-web");
        let text = std::fs::read_to_string(dir.join("manifest.yml")).unwrap();
        for (id, copy) in super::fixture_copies(&text, 3) {
            let path = dir.join(format!("{id}.yml"));
            if let Err(p) = archy_agent::manifest::Manifest::parse(&path, &copy) {
                panic!("{id}: {p}");
            }
        }
    }
}
