//! The run report: canonical JSON (versioned, [`model`]), a terminal summary, the exit code
//! the release script gates on, and its renderings for people ([`markdown`]) and CI
//! ([`junit`]).

pub mod chart;
pub mod fleet;
pub mod junit;
pub mod markdown;
pub mod model;
pub mod scorecard;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::de::DeserializeOwned;
use serde::Deserialize;

pub use model::{
    Environment, Iteration, Kpi, NodeReport, Report, ScenarioReport, SuiteEntry, SuiteRecord, Threshold,
    Verdict, SCHEMA,
};

use crate::node::Backend;
use crate::scenario::{Planned, Quantile, Scenario};

pub mod exit {
    pub const PASS: u8 = 0;
    pub const FAIL: u8 = 1;
    pub const UNKNOWN: u8 = 2;
    pub const USAGE: u8 = 64;
}

impl SuiteRecord {
    /// The record of a plan: each entry with the iterations a node must report of it.
    pub fn new<'a>(name: String, plan: impl IntoIterator<Item = (&'a Planned, u32)>) -> Result<SuiteRecord> {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        let mut entries = Vec::new();
        for (p, runs) in plan {
            let text = std::fs::read(&p.path).with_context(|| format!("cannot read {}", p.path.display()))?;
            h.update(format!("{} {} {} {}\n", p.scenario.id, p.backend.name(), p.iterations, text.len()));
            h.update(&text);
            let (scenario, backend, iterations) = (p.scenario.id.clone(), p.backend, p.iterations);
            entries.push(SuiteEntry { scenario, backend, iterations, runs });
        }
        Ok(SuiteRecord { name, hash: format!("sha256:{:x}", h.finalize()), entries })
    }
}

impl ScenarioReport {
    pub fn new(s: &Scenario, backend: Backend, iterations: Vec<Iteration>, seconds: f64) -> ScenarioReport {
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
            backend,
            destructive: s.destructive,
            verdict,
            iterations,
            kpis,
            seconds,
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
            if samples.is_empty() {
                None
            } else if v == 0.0 {
                Some(0.0)
            } else {
                let scale = 10f64.powi(2 - v.abs().log10().floor() as i32);
                Some((v * scale).round() / scale)
            }
        };
        let thresholds = limits
            .into_iter()
            .flatten()
            .map(|(q, max)| {
                let value = at(*q);
                let verdict = match value {
                    None => Verdict::Unknown, // a limit on a KPI that was never measured
                    Some(v) if v <= *max => Verdict::Pass,
                    Some(_) => Verdict::Fail,
                };
                Threshold { quantile: *q, max: *max, value, verdict }
            })
            .collect();
        Kpi {
            unit: unit(&name).into(),
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

/// A KPI's unit, by its name: `s`, `ratio` (to a reference measured in the same run) or `calls`.
pub fn unit(kpi: &str) -> &'static str {
    if kpi.ends_with("_ratio") || kpi.contains("_ratio_") {
        "ratio"
    } else if kpi.ends_with("_calls") {
        "calls"
    } else {
        "s"
    }
}

impl NodeReport {
    pub fn new(
        node: String,
        backend: String,
        environment: Option<Environment>,
        scenarios: Vec<ScenarioReport>,
    ) -> NodeReport {
        // Fail beats unknown beats pass; nothing run at all is unknown.
        let verdict = scenarios.iter().map(|s| s.verdict).max().unwrap_or(Verdict::Unknown);
        NodeReport { node, backend, verdict, environment, scenarios }
    }
}

impl Report {
    /// The worst node's; no node at all is unknown.
    pub fn verdict_of(nodes: &[NodeReport]) -> Verdict {
        nodes.iter().map(|n| n.verdict).max().unwrap_or(Verdict::Unknown)
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
        // `run found/<id>` names a scenario in a subdirectory: one file name all the same.
        let path = dir.join(format!("{}-{}.json", name.replace('/', "-"), self.started_unix));
        std::fs::write(&path, serde_json::to_vec_pretty(self)?)
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }

    /// The terminal summary: one row per scenario.
    pub fn summary(&self) -> String {
        let mut t = tabled::builder::Builder::default();
        t.push_record(["node", "scenario", "layer", "pass/fail/unknown", "time", "it/min", "verdict", "why"]);
        for (node, s) in self.nodes.iter().flat_map(|n| n.scenarios.iter().map(move |s| (&n.node, s))) {
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
                node.clone(),
                s.label(),
                format!("{:?}", s.layer),
                format!("{}/{}/{}", count(Verdict::Pass), count(Verdict::Fail), count(Verdict::Unknown)),
                format!("{:.0} s", s.seconds),
                per_minute(s.iterations.len(), s.seconds),
                s.verdict.name().to_string(),
                why.first().map(|w| w.chars().take(120).collect()).unwrap_or_default(),
            ]);
        }
        let total: usize =
            self.nodes.iter().map(|n| n.scenarios.iter().map(|s| s.iterations.len()).sum::<usize>()).sum();
        format!(
            "{}\n{total} iterations in {:.0} s: {} per minute",
            t.build().with(tabled::settings::Style::sharp()),
            self.duration_seconds,
            per_minute(total, self.duration_seconds)
        )
    }
}

/// Iterations per minute, the runner's own throughput.
pub fn per_minute(iterations: usize, seconds: f64) -> String {
    match seconds > 0.0 {
        true => format!("{:.1}", iterations as f64 * 60.0 / seconds),
        false => "-".into(),
    }
}

/// Reads a JSON file of a given schema; every error names the file and what is wrong.
pub fn load_json<T: DeserializeOwned>(path: &Path, what: &str, schema: u64) -> Result<T> {
    #[derive(Deserialize)]
    struct Header {
        schema: Option<serde_json::Value>,
    }
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read the {what}", path.display()))?;
    let header: Header = serde_json::from_slice(&bytes)
        .with_context(|| format!("{}: the {what} is not JSON", path.display()))?;
    // The schema first: a file of another schema fails on its first field, not on its version.
    match header.schema.as_ref().and_then(serde_json::Value::as_u64) {
        Some(s) if s == schema => {}
        Some(s) => {
            bail!("{}: {what} of schema {s}; this runner reads {what} schema {schema}", path.display())
        }
        None => {
            bail!("{}: not a {what}: no numeric `schema` (this runner reads schema {schema})", path.display())
        }
    }
    serde_json::from_slice(&bytes)
        .with_context(|| format!("{}: not a valid {what} of schema {schema}", path.display()))
}

/// A saved run report.
pub fn load(path: &Path) -> Result<Report> {
    load_json(path, "report", SCHEMA.into())
}

/// A saved report as Markdown (for people), JUnit XML (for CI systems) or canonical JSON.
pub fn render(report: &Report, format: &str) -> Result<String> {
    match format {
        "md" => Ok(markdown::render(report)),
        "junit" => junit::render(report),
        "json" => Ok(serde_json::to_string_pretty(report)? + "\n"),
        other => bail!("unknown format `{other}`: md, junit or json"),
    }
}

/// `archy-chaos report`: a saved run or fleet report rendered to standard output, or to
/// `out`, with the charts as files beside it.
pub fn command(path: &Path, format: &str, out: Option<&Path>, charts: bool) -> Result<()> {
    #[derive(Deserialize)]
    struct Kind {
        kind: Option<String>,
    }
    if charts && (out.is_none() || format != "md") {
        bail!("--charts writes SVG files beside the Markdown: give --out FILE.md (and --format md)");
    }
    let kind =
        std::fs::read(path).ok().and_then(|b| serde_json::from_slice::<Kind>(&b).ok()).and_then(|k| k.kind);
    let text = if kind.as_deref() == Some("fleet") {
        if format != "md" || charts {
            bail!("{}: a fleet report renders as Markdown, without --charts", path.display());
        }
        fleet::render(&fleet::load(path)?)
    } else {
        let report = load(path)?;
        let mut text = render(&report, format)?;
        if let (true, Some(out)) = (charts, out) {
            text.push_str(&chart::write(&report, out)?);
        }
        text
    };
    match out {
        Some(out) => std::fs::write(out, text).with_context(|| format!("{}: cannot write", out.display())),
        None => {
            print!("{text}");
            Ok(())
        }
    }
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
        let n: u32 = crate::scenario::resolve(dir, std::slice::from_ref(&id), Backend::Quadlet)?
            .iter()
            .map(|p| p.iterations)
            .sum();
        suites.push_record([suite.id, n.to_string(), suite.description]);
    }
    Ok(format!(
        "{}\n{}",
        t.build().with(tabled::settings::Style::sharp()),
        suites.build().with(tabled::settings::Style::sharp())
    ))
}
