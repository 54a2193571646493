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

/// Renders a saved JSON report as Markdown (for people) or JUnit XML (for CI systems).
pub fn render(report: &Value, format: &str) -> Result<String> {
    let s = |v: &Value| v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string());
    let iterations = report["iterations"].as_array().cloned().unwrap_or_default();
    match format {
        "json" => Ok(serde_json::to_string_pretty(report)?),
        "md" => {
            let mut out = format!(
                "# {} — {}\n\n{}\n\n| | |\n|---|---|\n| layer | {} |\n| node | {} ({}) |\n| seed | {} |\n| replay | `{}` |\n| environment | {} |\n\n",
                s(&report["scenario"]),
                s(&report["verdict"]).to_uppercase(),
                s(&report["description"]),
                s(&report["layer"]),
                s(&report["node"]),
                s(&report["backend"]),
                report["seed"],
                s(&report["replay"]),
                report["environment"],
            );
            out.push_str(&scorecard(&iterations));
            out.push_str("| iteration | verdict | recovery |\n|---|---|---|\n");
            for it in &iterations {
                let recovery =
                    it["measures"]["recovery_seconds"].as_f64().map_or("-".into(), |r| format!("{r:.2} s"));
                let n = match it["subject"].as_str() {
                    Some(app) => format!("{app} #{}", it["n"]),
                    None => it["n"].to_string(),
                };
                out.push_str(&format!("| {n} | {} | {recovery} |\n", s(&it["verdict"])));
            }
            for it in iterations.iter().filter(|i| i["verdict"] != "pass") {
                out.push_str(&format!("\n## Iteration {}: {}\n\n", it["n"], s(&it["verdict"])));
                for why in it["failures"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .chain(it["unknowns"].as_array().into_iter().flatten())
                {
                    out.push_str(&format!("- {}\n", s(why)));
                }
                out.push_str("\nSteps and evidence:\n\n");
                for step in it["steps"].as_array().into_iter().flatten() {
                    out.push_str(&format!(
                        "- `{}`: {}\n",
                        step["step"],
                        step.get("evidence").or(step.get("error")).unwrap_or(&Value::Null)
                    ));
                }
            }
            out.push_str(&format!("\n{}\n", s(&report["nondeterminism"])));
            Ok(out)
        }
        "junit" => {
            let esc = |t: &str| {
                t.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
            };
            let failures = iterations.iter().filter(|i| i["verdict"] == "fail").count();
            let errors = iterations.iter().filter(|i| i["verdict"] == "unknown").count();
            let scenario = esc(&s(&report["scenario"]));
            let mut out = format!(
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<testsuite name=\"{scenario}\" tests=\"{}\" failures=\"{failures}\" errors=\"{errors}\">\n",
                iterations.len()
            );
            for it in &iterations {
                let why: Vec<String> = it["failures"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .chain(it["unknowns"].as_array().into_iter().flatten())
                    .map(&s)
                    .collect();
                out.push_str(&format!(
                    "  <testcase classname=\"archy-chaos.{scenario}\" name=\"iteration {}\">\n",
                    it["n"]
                ));
                match it["verdict"].as_str() {
                    Some("fail") => {
                        out.push_str(&format!("    <failure message=\"{}\"/>\n", esc(&why.join("; "))))
                    }
                    Some("unknown") => {
                        out.push_str(&format!("    <error message=\"{}\"/>\n", esc(&why.join("; "))))
                    }
                    _ => {}
                }
                out.push_str("  </testcase>\n");
            }
            out.push_str(&format!(
                "  <system-out>{}</system-out>\n</testsuite>\n",
                esc(&s(&report["replay"]))
            ));
            Ok(out)
        }
        other => anyhow::bail!("unknown format `{other}`: md, junit or json"),
    }
}

/// Apps x states, computed from the steps of per-app iterations (never kept by hand): each
/// cell counts the iterations whose step of that kind succeeded, marked full, partial or
/// missing. Empty unless the scenario ran per app.
fn scorecard(iterations: &[Value]) -> String {
    use std::collections::BTreeMap;
    let mut states: Vec<String> = Vec::new();
    let mut cells: BTreeMap<(String, String), (u32, u32)> = BTreeMap::new();
    for it in iterations {
        let Some(app) = it["subject"].as_str().map(str::to_string) else { continue };
        let mut last: Option<(String, String)> = None;
        for step in it["steps"].as_array().into_iter().flatten() {
            let state = match &step["step"] {
                Value::String(s) => s.clone(),
                Value::Object(m) => m.keys().next().cloned().unwrap_or_default(),
                _ => continue,
            };
            let ok = step.get("error").is_none();
            if state.starts_with("wait-") || state == "snapshot-containers" {
                // A wait is how a state is reached: its failure is the state's.
                if let (false, Some(key)) = (ok, &last) {
                    if let Some(cell) = cells.get_mut(key) {
                        cell.0 = cell.0.saturating_sub(1);
                    }
                }
                continue;
            }
            if !states.contains(&state) {
                states.push(state.clone());
            }
            let key = (app.clone(), state);
            let cell = cells.entry(key.clone()).or_default();
            cell.1 += 1;
            cell.0 += ok as u32;
            last = Some(key);
        }
    }
    if cells.is_empty() {
        return String::new();
    }
    let apps: Vec<&String> =
        cells.keys().map(|(a, _)| a).collect::<std::collections::BTreeSet<_>>().into_iter().collect();
    let mut out =
        format!("## Scorecard\n\n| app | {} |\n|---|{}\n", states.join(" | "), "---|".repeat(states.len()));
    let (mut full, mut total) = (0, 0);
    for app in apps {
        out.push_str(&format!("| {app} |"));
        for state in &states {
            total += 1;
            let cell = match cells.get(&(app.clone(), state.clone())) {
                Some((ok, n)) if ok == n => {
                    full += 1;
                    format!(" {ok}/{n} full |")
                }
                Some((0, n)) => format!(" 0/{n} missing |"),
                Some((ok, n)) => format!(" {ok}/{n} partial |"),
                None => " - missing |".to_string(),
            };
            out.push_str(&cell);
        }
        out.push('\n');
    }
    out.push_str(&format!("\n{full}/{total} cells full.\n\n"));
    out
}

/// The scenarios of `dir`, for `archy-chaos list`.
pub fn list(dir: &Path) -> Result<String> {
    let mut rows = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?.flatten() {
        let path = e.path();
        if path.extension().and_then(|x| x.to_str()) == Some("yml") {
            let s = crate::scenario::Scenario::load(&path)?;
            rows.push([
                s.id,
                format!("{:?}", s.layer),
                s.destructive.to_string(),
                s.iterations.to_string(),
                s.description,
            ]);
        }
    }
    rows.sort();
    let mut t = tabled::builder::Builder::default();
    t.push_record(["scenario", "layer", "destructive", "iterations", "what it proves"]);
    for r in rows {
        t.push_record(r);
    }
    Ok(t.build().with(tabled::settings::Style::sharp()).to_string())
}
