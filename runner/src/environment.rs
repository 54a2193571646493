//! Where a run ran: what every report records about the machine, the node and the agent, to
//! tell a noisy or different machine from a slow agent.

use crate::node::Node;
use crate::report::model::{Environment, RunnerCalls};

/// CPU steal and busy time from `/proc/stat`, to tell a noisy machine from a slow agent.
pub fn cpu_times() -> (u64, u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total, total - idle, v.get(7).copied().unwrap_or(0))
}

/// What every report records about where it ran; `cpu_before` is [`cpu_times`] at the start.
/// The node is asked about itself (it may be another machine); the CPU figures are the
/// runner's machine's, where a local node's load shows.
pub fn environment(node: &dyn Node, cpu_before: (u64, u64, u64)) -> Environment {
    let on_node = |argv: &[&str]| {
        node.exec(argv)
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    let info = on_node(&[
        "podman",
        "info",
        "--format",
        "{{.Version.Version}}|{{.Host.OCIRuntime.Name}}|{{.Store.GraphDriverName}}|{{.Host.CgroupsVersion}}",
    ]);
    let mut info = info.split('|').map(str::to_string);
    let mut next = || info.next().unwrap_or_default();
    let (podman, oci_runtime, storage_driver, cgroup) = (next(), next(), next(), next());
    let agent = crate::node::agent(node).status().ok();
    let after = cpu_times();
    let total = after.0.saturating_sub(cpu_before.0).max(1) as f64;
    Environment {
        kernel: on_node(&["uname", "-r"]),
        podman,
        oci_runtime,
        storage_driver,
        cgroup,
        cpus: on_node(&["nproc"]).parse().unwrap_or(0),
        loadavg_end: on_node(&["cat", "/proc/loadavg"]),
        cpu_busy_fraction: after.1.saturating_sub(cpu_before.1) as f64 / total,
        cpu_steal_fraction: after.2.saturating_sub(cpu_before.2) as f64 / total,
        agent_version: agent.as_ref().map(|a| a.version.clone()),
        agent_backend: agent.as_ref().map(|a| a.backend.as_str().to_string()),
        agent_broken: agent.map(|a| a.broken),
        runner_version: env!("CARGO_PKG_VERSION").into(),
        durability: Some(node.durability().into()),
        runner_calls: crate::exec::calls()
            .into_iter()
            .map(|(program, calls, seconds)| (program, RunnerCalls { calls, seconds }))
            .collect(),
    }
}
