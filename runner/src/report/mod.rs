//! The run report: canonical JSON (versioned), a terminal summary, and the exit code the
//! release script gates on.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Serialize;
use serde_json::{json, Value};

use std::collections::BTreeMap;

use crate::scenario::{Iteration, Quantile, Verdict};

/// Version of the report's JSON schema (documented in `reports/README.md`).
pub const SCHEMA: u32 = 2;

pub mod exit {
    pub const PASS: u8 = 0;
    pub const FAIL: u8 = 1;
    pub const UNKNOWN: u8 = 2;
    pub const USAGE: u8 = 64;
}

/// One run of `archy-chaos run`: one or more scenarios on one node.
#[derive(Debug, Serialize)]
pub struct Report {
    pub schema: u32,
    pub verdict: Verdict,
    pub node: String,
    pub backend: String,
    pub seed: u64,
    /// The command that replays this run.
    pub replay: String,
    /// What the seed cannot fix.
    pub nondeterminism: &'static str,
    pub started_unix: u64,
    pub duration_seconds: f64,
    pub environment: Value,
    pub scenarios: Vec<ScenarioReport>,
}

#[derive(Debug, Serialize)]
pub struct ScenarioReport {
    pub scenario: String,
    pub description: String,
    pub layer: crate::scenario::Layer,
    pub destructive: bool,
    /// The worst of the iterations and the KPI thresholds.
    pub verdict: Verdict,
    pub iterations: Vec<Iteration>,
    pub kpis: Vec<Kpi>,
}

/// A KPI over every sample of a scenario, from an HDR histogram (3 significant digits).
#[derive(Debug, Serialize)]
pub struct Kpi {
    pub name: String,
    /// `s`, `ratio` (to the raw podman baseline of the same run) or `calls`.
    pub unit: &'static str,
    pub count: u64,
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
    pub samples: Vec<f64>,
    pub thresholds: Vec<Threshold>,
}

#[derive(Debug, Serialize)]
pub struct Threshold {
    pub quantile: Quantile,
    pub max: f64,
    pub value: Option<f64>,
    pub verdict: Verdict,
}

impl ScenarioReport {
    pub fn new(s: &crate::scenario::Scenario, iterations: Vec<Iteration>) -> ScenarioReport {
        let mut samples: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        for it in &iterations {
            for (k, v) in &it.measures {
                samples.entry(k.clone()).or_default().extend(v);
            }
        }
        for k in s.thresholds.keys() {
            samples.entry(k.clone()).or_default();
        }
        let kpis: Vec<Kpi> = samples
            .into_iter()
            .map(|(name, samples)| Kpi::new(name.clone(), samples, s.thresholds.get(&name)))
            .collect();
        let verdict = iterations
            .iter()
            .map(|i| i.verdict)
            .chain(kpis.iter().flat_map(|k| k.thresholds.iter().map(|t| t.verdict)))
            .max()
            .unwrap_or(Verdict::Unknown);
        ScenarioReport {
            scenario: s.id.clone(),
            description: s.description.clone(),
            layer: s.layer,
            destructive: s.destructive,
            verdict,
            iterations,
            kpis,
        }
    }
}

impl Kpi {
    fn new(name: String, samples: Vec<f64>, limits: Option<&BTreeMap<Quantile, f64>>) -> Kpi {
        // Micro-units: microseconds, millionths of a ratio; calls stay exact below 1000.
        let mut h = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 1_000_000_000_000, 3)
            .expect("valid histogram bounds");
        for v in &samples {
            h.saturating_record((v.max(0.0) * 1e6).round() as u64);
        }
        let at = |q: Quantile| {
            let raw = if q == Quantile::Max { h.max() } else { h.value_at_quantile(q.fraction()) };
            // Rounded to the histogram's precision, so that 1 call reads 1, not 1.0004.
            let v = h.highest_equivalent(raw).min(h.max()) as f64 / 1e6;
            if samples.is_empty() || v == 0.0 {
                if samples.is_empty() {
                    f64::NAN
                } else {
                    0.0
                }
            } else {
                let scale = 10f64.powi(2 - v.abs().log10().floor() as i32);
                (v * scale).round() / scale
            }
        };
        let thresholds = limits
            .into_iter()
            .flatten()
            .map(|(q, max)| {
                let value = (!samples.is_empty()).then(|| at(*q));
                let verdict = match value {
                    None => Verdict::Unknown, // a limit on a KPI that was never measured
                    Some(v) if v <= *max => Verdict::Pass,
                    Some(_) => Verdict::Fail,
                };
                Threshold { quantile: *q, max: *max, value, verdict }
            })
            .collect();
        let unit = if name.ends_with("_ratio") || name.contains("_ratio_") {
            "ratio"
        } else if name.ends_with("_calls") {
            "calls"
        } else {
            "s"
        };
        Kpi {
            unit,
            count: samples.len() as u64,
            p50: at(Quantile::P50),
            p95: at(Quantile::P95),
            p99: at(Quantile::P99),
            max: at(Quantile::Max),
            samples,
            thresholds,
            name,
        }
    }
}

impl Report {
    /// Fail beats unknown beats pass; nothing run at all is unknown.
    pub fn verdict_of(scenarios: &[ScenarioReport]) -> Verdict {
        scenarios.iter().map(|s| s.verdict).max().unwrap_or(Verdict::Unknown)
    }

    pub fn exit_code(&self) -> u8 {
        match self.verdict {
            Verdict::Pass => exit::PASS,
            Verdict::Fail => exit::FAIL,
            Verdict::Unknown => exit::UNKNOWN,
        }
    }

    pub fn write(&self, dir: &Path, name: &str) -> Result<PathBuf> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join(format!("{name}-{}.json", self.started_unix));
        std::fs::write(&path, serde_json::to_vec_pretty(self)?)?;
        Ok(path)
    }

    /// The terminal summary: one row per scenario.
    pub fn summary(&self) -> String {
        let mut t = tabled::builder::Builder::default();
        t.push_record(["scenario", "layer", "pass/fail/unknown", "verdict", "why"]);
        for s in &self.scenarios {
            let count = |v| s.iterations.iter().filter(|i| i.verdict == v).count();
            let mut why: Vec<String> =
                s.iterations.iter().flat_map(|i| i.failures.iter().chain(&i.unknowns)).cloned().collect();
            why.extend(s.kpis.iter().flat_map(|k| {
                k.thresholds
                    .iter()
                    .filter(|t| t.verdict != Verdict::Pass)
                    .map(move |t| format!("{} {} {:?} > {}", k.name, t.quantile.name(), t.value, t.max))
            }));
            t.push_record([
                s.scenario.clone(),
                format!("{:?}", s.layer),
                format!("{}/{}/{}", count(Verdict::Pass), count(Verdict::Fail), count(Verdict::Unknown)),
                verdict_name(s.verdict).to_string(),
                why.first().map(|w| w.chars().take(120).collect()).unwrap_or_default(),
            ]);
        }
        t.build().with(tabled::settings::Style::sharp()).to_string()
    }
}

fn verdict_name(v: Verdict) -> &'static str {
    match v {
        Verdict::Pass => "pass",
        Verdict::Fail => "fail",
        Verdict::Unknown => "unknown",
    }
}

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
pub fn environment(node: &crate::node::LocalNode, cpu_before: (u64, u64, u64)) -> Value {
    let read = |p: &str| std::fs::read_to_string(p).map(|s| s.trim().to_string()).unwrap_or_default();
    let podman = node
        .exec(&["podman", "version", "--format", "{{.Client.Version}}"])
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let agent = crate::node::Node::rpc(node, "node.status", Value::Null).unwrap_or(Value::Null);
    let after = cpu_times();
    let total = after.0.saturating_sub(cpu_before.0).max(1) as f64;
    json!({
        "kernel": read("/proc/sys/kernel/osrelease"),
        "podman": podman,
        "oci_runtime": "runc",
        "storage_driver": "vfs",
        "cgroup": if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() { "v2" } else { "hybrid" },
        "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "loadavg_end": read("/proc/loadavg"),
        "cpu_busy_fraction": after.1.saturating_sub(cpu_before.1) as f64 / total,
        "cpu_steal_fraction": after.2.saturating_sub(cpu_before.2) as f64 / total,
        "agent_version": agent["version"],
        "agent_backend": agent["backend"],
        "agent_broken": agent["broken"],
        "runner_version": env!("CARGO_PKG_VERSION"),
    })
}

/// Renders a saved JSON report as Markdown (for people) or JUnit XML (for CI systems).
pub fn render(report: &Value, format: &str) -> Result<String> {
    anyhow::ensure!(
        report["schema"] == SCHEMA,
        "report schema {} is not the one this runner reads ({SCHEMA})",
        report["schema"]
    );
    let s = |v: &Value| v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string());
    let list = |v: &Value| v.as_array().cloned().unwrap_or_default();
    let scenarios = list(&report["scenarios"]);
    match format {
        "json" => Ok(serde_json::to_string_pretty(report)?),
        "md" => {
            let mut out = format!(
                "# archy-chaos run — {}\n\n| | |\n|---|---|\n| node | {} ({}) |\n| seed | {} |\n| replay | `{}` |\n| duration | {:.0} s |\n| environment | {} |\n\n",
                s(&report["verdict"]).to_uppercase(),
                s(&report["node"]),
                s(&report["backend"]),
                report["seed"],
                s(&report["replay"]),
                report["duration_seconds"].as_f64().unwrap_or(0.0),
                report["environment"],
            );
            out.push_str("| scenario | layer | iterations passed | verdict |\n|---|---|---|---|\n");
            for sc in &scenarios {
                let its = list(&sc["iterations"]);
                let passed = its.iter().filter(|i| i["verdict"] == "pass").count();
                out.push_str(&format!(
                    "| {} | {} | {passed}/{} | {} |\n",
                    s(&sc["scenario"]),
                    s(&sc["layer"]),
                    its.len(),
                    s(&sc["verdict"])
                ));
            }
            for sc in &scenarios {
                out.push_str(&scenario_md(sc));
            }
            out.push_str(&format!("\n{}\n", s(&report["nondeterminism"])));
            Ok(out)
        }
        "junit" => {
            let esc = |t: &str| {
                t.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
            };
            let mut out = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<testsuites>\n");
            for sc in &scenarios {
                // One case per iteration, and one per KPI threshold.
                let mut cases: Vec<(String, String, Vec<String>)> = Vec::new();
                for it in list(&sc["iterations"]) {
                    let why = list(&it["failures"]).iter().chain(&list(&it["unknowns"])).map(&s).collect();
                    let name = match it["subject"].as_str() {
                        Some(app) => format!("{app} iteration {}", it["n"]),
                        None => format!("iteration {}", it["n"]),
                    };
                    cases.push((name, s(&it["verdict"]), why));
                }
                for k in list(&sc["kpis"]) {
                    for t in list(&k["thresholds"]) {
                        let why = format!(
                            "{} {} = {} (limit {})",
                            s(&k["name"]),
                            s(&t["quantile"]),
                            t["value"],
                            t["max"]
                        );
                        cases.push((
                            format!("kpi {} {}", s(&k["name"]), s(&t["quantile"])),
                            s(&t["verdict"]),
                            vec![why],
                        ));
                    }
                }
                let scenario = esc(&s(&sc["scenario"]));
                let count = |v: &str| cases.iter().filter(|c| c.1 == v).count();
                out.push_str(&format!(
                    "  <testsuite name=\"{scenario}\" tests=\"{}\" failures=\"{}\" errors=\"{}\">\n",
                    cases.len(),
                    count("fail"),
                    count("unknown")
                ));
                for (name, verdict, why) in &cases {
                    out.push_str(&format!(
                        "    <testcase classname=\"archy-chaos.{scenario}\" name=\"{}\">\n",
                        esc(name)
                    ));
                    match verdict.as_str() {
                        "fail" => {
                            out.push_str(&format!("      <failure message=\"{}\"/>\n", esc(&why.join("; "))))
                        }
                        "unknown" => {
                            out.push_str(&format!("      <error message=\"{}\"/>\n", esc(&why.join("; "))))
                        }
                        _ => {}
                    }
                    out.push_str("    </testcase>\n");
                }
                out.push_str("  </testsuite>\n");
            }
            out.push_str(&format!("  <!-- replay: {} -->\n</testsuites>\n", esc(&s(&report["replay"]))));
            Ok(out)
        }
        other => anyhow::bail!("unknown format `{other}`: md, junit or json"),
    }
}

/// One scenario's section: scorecard, KPIs against their thresholds, iterations, and every
/// iteration that did not pass with its steps and evidence.
fn scenario_md(sc: &Value) -> String {
    let s = |v: &Value| v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string());
    let list = |v: &Value| v.as_array().cloned().unwrap_or_default();
    let iterations = list(&sc["iterations"]);
    let mut out = format!(
        "\n## {} ({}) — {}\n\n{}\n\n",
        s(&sc["scenario"]),
        s(&sc["layer"]),
        s(&sc["verdict"]).to_uppercase(),
        s(&sc["description"])
    );
    out.push_str(&scorecard(&iterations));
    let kpis = list(&sc["kpis"]);
    if !kpis.is_empty() {
        let num = |v: &Value, unit: &Value| match (v.as_f64(), unit.as_str()) {
            (None, _) => "-".to_string(),
            (Some(x), Some("s")) => format!("{:.1} ms", x * 1e3),
            (Some(x), Some("ratio")) => format!("{x:.2}x"),
            (Some(x), _) => format!("{x:.0}"),
        };
        out.push_str("| KPI | n | p50 | p95 | p99 | max | threshold |\n|---|---|---|---|---|---|---|\n");
        for k in &kpis {
            let limits: Vec<String> = list(&k["thresholds"])
                .iter()
                .map(|t| {
                    format!(
                        "{} <= {}: {}",
                        s(&t["quantile"]),
                        num(&t["max"], &k["unit"]),
                        s(&t["verdict"]).to_uppercase()
                    )
                })
                .collect();
            out.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} |\n",
                s(&k["name"]),
                k["count"],
                num(&k["p50"], &k["unit"]),
                num(&k["p95"], &k["unit"]),
                num(&k["p99"], &k["unit"]),
                num(&k["max"], &k["unit"]),
                if limits.is_empty() { "-".into() } else { limits.join(", ") }
            ));
        }
        out.push('\n');
    }
    out.push_str("| iteration | verdict | recovery |\n|---|---|---|\n");
    for it in &iterations {
        let recovery =
            it["measures"]["recovery_seconds"][0].as_f64().map_or("-".into(), |r| format!("{r:.2} s"));
        let n = match it["subject"].as_str() {
            Some(app) => format!("{app} #{}", it["n"]),
            None => it["n"].to_string(),
        };
        out.push_str(&format!("| {n} | {} | {recovery} |\n", s(&it["verdict"])));
    }
    for it in iterations.iter().filter(|i| i["verdict"] != "pass") {
        out.push_str(&format!(
            "\n### {} iteration {}: {}\n\n",
            s(&sc["scenario"]),
            it["n"],
            s(&it["verdict"])
        ));
        for why in list(&it["failures"]).iter().chain(&list(&it["unknowns"])) {
            out.push_str(&format!("- {}\n", s(why)));
        }
        out.push_str("\nSteps and evidence:\n\n");
        for step in list(&it["steps"]) {
            out.push_str(&format!(
                "- `{}`: {}\n",
                step["step"],
                step.get("evidence").or(step.get("error")).unwrap_or(&Value::Null)
            ));
        }
        if let Some(log) = it["log"].as_str().filter(|l| !l.is_empty()) {
            out.push_str(&format!("\nNode log (last lines):\n\n```\n{log}\n```\n"));
        }
    }
    out
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
    let mut suites = tabled::builder::Builder::default();
    suites.push_record(["suite", "scenarios x iterations", "what it is for"]);
    for id in crate::scenario::ids(&dir.join("suites")) {
        let suite = crate::scenario::Suite::load(&dir.join("suites").join(format!("{id}.yml")))?;
        let n: u32 = crate::scenario::resolve(dir, std::slice::from_ref(&id))?.iter().map(|r| r.2).sum();
        suites.push_record([suite.id, n.to_string(), suite.description]);
    }
    Ok(format!(
        "{}\n{}",
        t.build().with(tabled::settings::Style::sharp()),
        suites.build().with(tabled::settings::Style::sharp())
    ))
}
