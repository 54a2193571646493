//! The run report: canonical JSON (versioned), a terminal summary, and the exit code the
//! release script gates on.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Serialize;
use serde_json::{json, Value};

use crate::scenario::{Iteration, Verdict};

/// Version of the report's JSON schema.
pub const SCHEMA: u32 = 1;

pub mod exit {
    pub const PASS: u8 = 0;
    pub const FAIL: u8 = 1;
    pub const UNKNOWN: u8 = 2;
    pub const USAGE: u8 = 64;
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub schema: u32,
    pub scenario: String,
    pub description: String,
    pub layer: crate::scenario::Layer,
    pub destructive: bool,
    pub node: String,
    pub backend: String,
    pub seed: u64,
    /// The command that replays this run.
    pub replay: String,
    /// What the seed cannot fix.
    pub nondeterminism: &'static str,
    pub verdict: Verdict,
    pub iterations: Vec<Iteration>,
    pub environment: Value,
}

impl Report {
    /// Fail beats unknown beats pass; no iteration at all is unknown.
    pub fn verdict_of(iterations: &[Iteration]) -> Verdict {
        iterations.iter().map(|i| i.verdict).max().unwrap_or(Verdict::Unknown)
    }

    pub fn exit_code(&self) -> u8 {
        match self.verdict {
            Verdict::Pass => exit::PASS,
            Verdict::Fail => exit::FAIL,
            Verdict::Unknown => exit::UNKNOWN,
        }
    }

    pub fn write(&self, dir: &Path) -> Result<PathBuf> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let stamp =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let path = dir.join(format!("{}-{stamp}.json", self.scenario));
        std::fs::write(&path, serde_json::to_vec_pretty(self)?)?;
        Ok(path)
    }

    pub fn summary(&self) -> String {
        let mut t = tabled::builder::Builder::default();
        t.push_record(["iteration", "verdict", "recovery", "why"]);
        for it in &self.iterations {
            let why = it.failures.iter().chain(&it.unknowns).cloned().collect::<Vec<_>>().join("; ");
            let recovery = it.measures.get("recovery_seconds").map_or("-".into(), |s| format!("{s:.2} s"));
            let verdict = serde_json::to_value(it.verdict)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            t.push_record([it.n.to_string(), verdict, recovery, why.chars().take(160).collect()]);
        }
        t.build().with(tabled::settings::Style::sharp()).to_string()
    }
}

/// What every report records about where it ran.
pub fn environment(node: &crate::node::LocalNode) -> Value {
    let read = |p: &str| std::fs::read_to_string(p).map(|s| s.trim().to_string()).unwrap_or_default();
    let podman = node
        .exec(&["podman", "version", "--format", "{{.Client.Version}}"])
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    json!({
        "kernel": read("/proc/sys/kernel/osrelease"),
        "podman": podman,
        "oci_runtime": "runc",
        "storage_driver": "vfs",
        "cgroup": if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() { "v2" } else { "hybrid" },
        "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "loadavg": read("/proc/loadavg"),
        "runner_version": env!("CARGO_PKG_VERSION"),
    })
}
