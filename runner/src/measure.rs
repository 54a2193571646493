//! L6 measurements inside a node, each beside the raw podman baseline it is built on, taken in
//! the same run and interleaved so that the machine's noise hits both alike. Samples go back
//! as `{"measures": {name: [seconds...]}}` in a step's evidence.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use archy_agent::manifest::Catalog;
use archy_agent::quadlet;
use serde_json::{json, Value};

use crate::node::{LocalNode, Node};
use crate::scenario::{exec_calls, wait_converged};

/// Polls `done` every 20 ms until it holds.
fn until(what: &str, timeout: Duration, mut done: impl FnMut() -> Result<bool>) -> Result<()> {
    let start = Instant::now();
    while !done()? {
        ensure!(start.elapsed() < timeout, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn app_entry(node: &LocalNode, app: &str) -> Result<Option<Value>> {
    let list = node.rpc("package.list", Value::Null)?;
    Ok(list.as_array().into_iter().flatten().find(|a| a["id"] == app).cloned())
}

/// Runs `script` in the node's shell with `args` as `$@`; its stdout, which must be a number
/// of nanoseconds measured inside the node (so the cost of entering the node is not counted).
fn timed_in_node(node: &LocalNode, script: &str, args: &[String]) -> Result<f64> {
    let mut argv = vec!["sh", "-c", script, "sh"];
    argv.extend(args.iter().map(String::as_str));
    let out = node.exec(&argv)?;
    ensure!(out.status.success(), "{script}: {}", String::from_utf8_lossy(&out.stderr).trim());
    let ns: f64 = String::from_utf8_lossy(&out.stdout).trim().parse().context("timing output")?;
    Ok(ns / 1e9)
}

/// Cold install (request -> up) of each app beside `podman run -d` of the same container
/// until its health check passes. Odd iterations measure the agent first, even ones the
/// baseline first.
pub fn install(
    node: &LocalNode,
    catalog: &Catalog,
    apps: &[String],
    timeout: Duration,
    n: u32,
) -> Result<Value> {
    let version = node.exec(&["podman", "version", "--format", "{{.Client.Version}}"])?;
    let version = String::from_utf8_lossy(&version.stdout).trim().parse().map_err(anyhow::Error::msg)?;
    let mut target = quadlet::Target::new(version, node.root.join("data"));
    // The node's cgroup view has no memory controller: the agent leaves limits out there too.
    target.memory_limits = false;
    let (mut agent, mut raw) = (Vec::new(), Vec::new());
    for app in apps {
        let m = catalog.get(app).with_context(|| format!("{app} is not in the node's catalog"))?;
        let measure_agent = || -> Result<f64> {
            let start = Instant::now();
            node.rpc("package.install", json!({"id": app}))?;
            until(&format!("{app} up"), timeout, || {
                Ok(app_entry(node, app)?.is_some_and(|a| a["up"] == true))
            })?;
            let t = start.elapsed().as_secs_f64();
            // Removed again (secrets and data kept) so the baseline can use the same name and ports.
            node.rpc("package.uninstall", json!({"id": app}))?;
            until(&format!("{app} uninstalled"), timeout, || Ok(app_entry(node, app)?.is_none()))?;
            Ok(t)
        };
        let measure_raw = || -> Result<f64> {
            ensure!(
                node.root.join("data/secrets").join(app).exists() || m.generated_secrets.is_empty(),
                "the baseline reuses {app}'s secrets: measure the agent first"
            );
            let unit = quadlet::render(m, &target);
            let args: Vec<String> =
                unit.podman_args.iter().filter(|a| !a.starts_with("--label=io.archy")).cloned().collect();
            let probe = if m.health.is_some() {
                "i=0; until podman healthcheck run \"$name\" >/dev/null 2>&1; do i=$((i+1)); [ $i -lt 3000 ] || exit 1; done"
            } else {
                ":"
            };
            let script = format!(
                "name={name}; s=$(date +%s%N); podman run -d \"$@\" >/dev/null || exit 1; {probe}; e=$(date +%s%N); podman rm -f -t 0 \"$name\" >/dev/null; echo $((e-s))",
                name = m.container_name()
            );
            timed_in_node(node, &script, &args)
        };
        // The agent goes first on the first sample: the baseline needs the secrets it made.
        if n % 2 == 1 || agent.is_empty() {
            agent.push(measure_agent()?);
            raw.push(measure_raw()?);
        } else {
            raw.push(measure_raw()?);
            agent.push(measure_agent()?);
        }
    }
    let ratio: Vec<f64> = agent.iter().zip(&raw).map(|(a, r)| a / r).collect();
    Ok(
        json!({"apps": apps, "measures": {"install_seconds": agent, "raw_run_seconds": raw, "install_ratio": ratio}}),
    )
}

/// No-op ticks at each app count, each beside `podman ps` (the tick's one observation call)
/// timed inside the node. The apps are copies of fx-web written into the node's catalog.
pub fn ticks(node: &LocalNode, counts: &[usize], ticks: u32, timeout: Duration) -> Result<Value> {
    let max = counts.iter().copied().max().unwrap_or(0);
    ensure!((1..=60).contains(&max), "counts must be between 1 and 60 apps");
    let catalog = node.root.join("catalog");
    crate::bench::bench_catalog(&catalog, &catalog, max)?;
    let ids: Vec<String> = (1..=max).map(|i| format!("bench-{i:02}")).collect();
    let mut measures = serde_json::Map::new();
    let mut sorted = counts.to_vec();
    sorted.sort_unstable();
    let result = (|| -> Result<()> {
        for n in sorted {
            for id in &ids[..n] {
                node.rpc("package.install", json!({"id": id}))?;
            }
            wait_converged(node, &ids[..n], timeout)?;
            let (mut tick, mut ps, mut ratio) = (Vec::new(), Vec::new(), Vec::new());
            for _ in 0..ticks {
                let raw = timed_in_node(
                    node,
                    "s=$(date +%s%N); podman ps -a --format json --filter label=io.archy.app >/dev/null || exit 1; e=$(date +%s%N); echo $((e-s))",
                    &[],
                )?;
                let r = node.rpc("node.reconcile", Value::Null)?;
                if r["actions"] != json!([]) {
                    bail!("a tick of the converged node with {n} apps did something: {r}");
                }
                let t = r["duration_seconds"].as_f64().context("tick duration")?;
                tick.push(t);
                ps.push(raw);
                ratio.push(t / raw);
            }
            measures.insert(format!("tick_seconds_{n:02}apps"), json!(tick));
            measures.insert(format!("raw_ps_seconds_{n:02}apps"), json!(ps));
            measures.insert(format!("tick_ratio_{n:02}apps"), json!(ratio));
        }
        Ok(())
    })();
    // The copies go whatever happened, so the scenario's invariants see only its own apps.
    for id in &ids {
        let _ = node.rpc("package.uninstall", json!({"id": id, "purge": true}));
    }
    until("the scale apps removed", timeout, || {
        Ok(ids.iter().all(|id| app_entry(node, id).is_ok_and(|e| e.is_none())))
    })?;
    result?;
    Ok(json!({"counts": counts, "measures": measures}))
}

/// Podman calls (beyond the per-tick `podman ps`) and systemctl calls the agent makes for
/// each lifecycle operation on the first app, from the operation to convergence.
pub fn calls(node: &LocalNode, apps: &[String], timeout: Duration) -> Result<Value> {
    use crate::scenario::LifecycleOp;
    let app = apps.first().context("no app")?;
    let count = || -> Result<(f64, f64)> {
        let calls = exec_calls(node)?;
        let sum = |tool: &str| calls.iter().filter(|c| c.0 == tool && c.1 != "ps").map(|c| c.3).sum();
        Ok((sum("podman"), sum("systemctl")))
    };
    let mut measures = serde_json::Map::new();
    for op in LifecycleOp::ALL {
        let before = count()?;
        node.rpc(&format!("package.{}", op.name()), json!({"id": app}))?;
        wait_converged(node, std::slice::from_ref(app), timeout)?;
        let after = count()?;
        measures.insert(format!("{}_podman_calls", op.name()), json!([after.0 - before.0]));
        measures.insert(format!("{}_systemctl_calls", op.name()), json!([after.1 - before.1]));
    }
    Ok(json!({"app": app, "measures": measures}))
}
