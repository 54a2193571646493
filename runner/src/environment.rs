//! Where a run ran: what every report records about the machine, the node and the agent, to
//! tell a noisy or different machine from a slow agent.

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use crate::report::model::Environment;

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
pub fn environment(node: &crate::node::LocalNode, cpu_before: (u64, u64, u64)) -> Environment {
    let read = |p: &str| std::fs::read_to_string(p).map(|s| s.trim().to_string()).unwrap_or_default();
    let podman = node
        .exec(&["podman", "version", "--format", "{{.Client.Version}}"])
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    // The agent's own answer; one that does not answer leaves its fields null.
    #[derive(Default, Deserialize)]
    struct Status {
        version: Option<String>,
        backend: Option<String>,
        broken: Option<Vec<String>>,
    }
    let agent: Status = crate::node::Node::rpc(node, "node.status", Value::Null)
        .ok()
        .and_then(|v| serde_json::from_value(v).ok())
        .unwrap_or_default();
    let after = cpu_times();
    let total = after.0.saturating_sub(cpu_before.0).max(1) as f64;
    Environment {
        kernel: read("/proc/sys/kernel/osrelease"),
        podman,
        oci_runtime: "runc".into(),
        storage_driver: "vfs".into(),
        cgroup: if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() { "v2" } else { "hybrid" }.into(),
        cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
        loadavg_end: read("/proc/loadavg"),
        cpu_busy_fraction: after.1.saturating_sub(cpu_before.1) as f64 / total,
        cpu_steal_fraction: after.2.saturating_sub(cpu_before.2) as f64 / total,
        agent_version: agent.version,
        agent_backend: agent.backend,
        agent_broken: agent.broken,
        runner_version: env!("CARGO_PKG_VERSION").into(),
    }
}
