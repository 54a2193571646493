//! `archy-chaos gate`: whether a run may ship, from its own verdict and from its KPIs against
//! a baseline run.
//!
//! Baseline file (schema 1), written by `gate RUN.json --write-baseline PATH` from a run
//! that passed; every KPI of that run, keyed `<scenario>/<kpi>`, with its raw samples (a run
//! over several nodes pools them, and records each node's environment by node):
//!
//! ```json
//! {"schema": 1, "created_unix": 1764100000, "from": "reports/out/smoke-1764100000.json",
//!  "environment": {"kernel": "6.1.0", "podman": "4.3.1", "cpus": 2},
//!  "kpis": {"cold-install/install_seconds": {"unit": "s", "samples": [0.41, 0.39]}}}
//! ```
//!
//! Rule: see [`rule`]. Every KPI is lower-is-better.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{ensure, Context, Result};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::report::{exit, Report, Verdict};

const BASELINE_SCHEMA: u64 = 1;
const MIN_SAMPLES: usize = 5;
const RESAMPLES: usize = 2000;
/// Fixed, so the same two files always give the same intervals (and the same exit code).
const BOOTSTRAP_SEED: u64 = 0x6172_6368_795f_6761;

#[derive(clap::Args)]
pub struct GateArgs {
    /// The run's JSON report (schema 3), as `archy-chaos run` wrote it.
    pub report: PathBuf,
    /// Baseline to compare the run's KPIs with (see the format above).
    #[arg(long, default_value = "reports/baseline.json")]
    pub baseline: PathBuf,
    /// How much worse a median may get before it is a regression: 0.10 is 10%.
    #[arg(long, default_value_t = 0.10)]
    pub tolerance: f64,
    /// Instead of gating, write a baseline from this run (which must have passed) to PATH.
    #[arg(long, value_name = "PATH", conflicts_with_all = ["baseline", "tolerance", "json", "pushgateway"])]
    pub write_baseline: Option<PathBuf>,
    /// Print one JSON object (verdict, exit_code, report_verdict, comparisons) instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Also push the run's metrics and the gate's decision to this Prometheus Pushgateway
    /// (job `archy_chaos`, grouped by node). A failed push makes a passing gate exit 2.
    #[arg(long, value_name = "URL")]
    pub pushgateway: Option<String>,
}

/// A baseline as `--write-baseline` writes it (see the format above).
#[derive(Debug, Serialize, Deserialize)]
struct Baseline {
    schema: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    created_unix: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    from: Option<String>,
    /// For people comparing machines; never judged.
    #[serde(default)]
    environment: Value,
    kpis: BTreeMap<String, Samples>,
}

/// One KPI's samples, keyed `<scenario>/<kpi>` in a baseline and in a run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Samples {
    pub unit: String,
    pub samples: Vec<f64>,
}

/// What the comparison of one KPI found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Within the tolerance, or not told apart from it by the samples.
    Same,
    Better,
    Regression,
    TooFewSamples,
    /// In the baseline, not in the run.
    Missing,
    /// In the run, not in the baseline (refresh the baseline to gate on it).
    New,
    /// Raw podman measured beside the agent in the same run: it describes the machine.
    Reference,
    /// An absolute latency with a ratio to raw podman beside it: the ratio is judged.
    ByRatio,
}

impl Change {
    pub fn label(self) -> &'static str {
        match self {
            Change::Same => "same",
            Change::Better => "better",
            Change::Regression => "regression",
            Change::TooFewSamples => "too few samples",
            Change::Missing => "missing",
            Change::New => "new",
            Change::Reference => "reference",
            Change::ByRatio => "by ratio",
        }
    }
}

impl Serialize for Change {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.label())
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    /// `<scenario>/<kpi>`
    pub kpi: String,
    pub unit: String,
    pub baseline_p50: Option<f64>,
    pub run_p50: Option<f64>,
    /// median(run) / median(baseline)
    pub ratio: Option<f64>,
    /// 95% percentile bootstrap interval of `ratio`.
    pub interval: Option<[f64; 2]>,
    pub verdict: Change,
}

/// The rule, as the help and the output state it.
pub fn rule(tolerance: f64) -> String {
    format!(
        "a KPI regresses when the 95% bootstrap interval ({RESAMPLES} resamples, fixed seed) of \
         median(run)/median(baseline) lies entirely above {:.2} (1 + tolerance), and is better when it lies \
         below {:.2}; KPIs with fewer than {MIN_SAMPLES} samples on either side are not judged; every KPI is \
         lower-is-better; a latency measured beside raw podman is judged by its ratio (X_ratio for X_seconds), \
         and the raw_* references describe the machine, not the agent",
        1.0 + tolerance,
        1.0 - tolerance
    )
}

/// Every KPI of the run or the baseline, in key order. Pure and deterministic.
pub fn compare(
    run: &BTreeMap<String, Samples>,
    base: &BTreeMap<String, Samples>,
    tolerance: f64,
) -> Vec<Comparison> {
    let keys: BTreeSet<&String> = base.keys().chain(run.keys()).collect();
    // A machine that is slower today makes raw podman and the agent slower together; only
    // their ratio says something about the agent (release run 2026-11-26: install_seconds
    // x1.20 and raw_run_seconds x1.19 "regressed" while install_ratio was x0.96).
    let role = |key: &str| {
        let (scenario, name) = key.split_once('/').unwrap_or(("", key));
        let twin = format!("{scenario}/{}", name.replacen("_seconds", "_ratio", 1));
        if name.starts_with("raw_") {
            Some(Change::Reference)
        } else {
            (name.contains("_seconds") && keys.contains(&twin)).then_some(Change::ByRatio)
        }
    };
    keys.iter()
        .map(|&key| {
            let (b, r) = (base.get(key), run.get(key));
            let mut c = Comparison {
                kpi: key.clone(),
                unit: r.or(b).map(|s| s.unit.clone()).unwrap_or_default(),
                baseline_p50: b.and_then(|s| median(&s.samples)),
                run_p50: r.and_then(|s| median(&s.samples)),
                ratio: None,
                interval: None,
                verdict: Change::Same,
            };
            if let (Some(rm), Some(bm)) = (c.run_p50, c.baseline_p50) {
                c.ratio = Some(ratio(rm, bm));
            }
            c.verdict = match (b, r) {
                (None, _) => Change::New,
                (_, None) => Change::Missing,
                (Some(b), Some(r)) if b.samples.len() < MIN_SAMPLES || r.samples.len() < MIN_SAMPLES => {
                    Change::TooFewSamples
                }
                (Some(b), Some(r)) => {
                    let [lo, hi] = bootstrap(&r.samples, &b.samples);
                    c.interval = Some([lo, hi]);
                    if let Some(role) = role(key) {
                        role
                    } else if lo > 1.0 + tolerance {
                        Change::Regression
                    } else if hi < 1.0 - tolerance {
                        Change::Better
                    } else {
                        Change::Same
                    }
                }
            };
            c
        })
        .collect()
}

/// `<scenario>/<kpi>` -> samples of a report, pooled across its nodes.
pub fn samples(report: &Report) -> BTreeMap<String, Samples> {
    let mut out: BTreeMap<String, Samples> = BTreeMap::new();
    for s in report.nodes.iter().flat_map(|n| &n.scenarios) {
        for k in &s.kpis {
            let pooled = out.entry(format!("{}/{}", s.scenario, k.name)).or_default();
            pooled.unit.clone_from(&k.unit);
            pooled.samples.extend(&k.samples);
        }
    }
    out
}

/// Percentile interval of median(run)/median(base) over paired resamples with replacement.
fn bootstrap(run: &[f64], base: &[f64]) -> [f64; 2] {
    let mut rng = rand::rngs::StdRng::seed_from_u64(BOOTSTRAP_SEED);
    let mut draw = |xs: &[f64]| {
        let resample: Vec<f64> = (0..xs.len()).map(|_| xs[rng.random_range(0..xs.len())]).collect();
        median(&resample).unwrap_or(f64::NAN)
    };
    let mut ratios: Vec<f64> = (0..RESAMPLES).map(|_| ratio(draw(run), draw(base))).collect();
    ratios.sort_by(f64::total_cmp);
    let at = |q: f64| ratios[((RESAMPLES - 1) as f64 * q).round() as usize];
    [at(0.025), at(0.975)]
}

fn median(xs: &[f64]) -> Option<f64> {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(v[n / 2]),
        _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

/// A KPI that stays at 0 (e.g. podman calls) is unchanged; one that leaves 0 is infinitely worse.
fn ratio(run: f64, base: f64) -> f64 {
    if base != 0.0 {
        run / base
    } else if run == 0.0 {
        1.0
    } else {
        f64::INFINITY
    }
}

/// A baseline from a passing report; returns how many KPIs it holds.
fn write_baseline(report: &Report, from: &Path, out: &Path) -> Result<usize> {
    let environment = match &report.nodes[..] {
        [one] => serde_json::to_value(&one.environment)?,
        nodes => {
            serde_json::to_value(nodes.iter().map(|n| (&n.node, &n.environment)).collect::<BTreeMap<_, _>>())?
        }
    };
    let doc = Baseline {
        schema: BASELINE_SCHEMA,
        created_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .ok()
            .map(|d| d.as_secs()),
        from: Some(from.display().to_string()),
        environment,
        kpis: samples(report),
    };
    let n = doc.kpis.len();
    let name = out.file_name().and_then(|n| n.to_str()).context("the baseline path names no file")?;
    let dir = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let mut bytes = serde_json::to_vec_pretty(&doc)?;
    bytes.push(b'\n');
    // Atomic, so a gate reading it concurrently never sees half a baseline.
    archy_agent::atomic::write(dir, name, &bytes, 0o644)?;
    Ok(n)
}

pub fn run(args: &GateArgs) -> ExitCode {
    match gate(args) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("archy-chaos: gate: {e:#}");
            ExitCode::from(exit::USAGE)
        }
    }
}

/// The exit code of a decided gate; `Err` is bad usage.
fn gate(args: &GateArgs) -> Result<u8> {
    ensure!(
        args.tolerance.is_finite() && (0.0..1.0).contains(&args.tolerance),
        "--tolerance must be at least 0 and below 1 (0.10 is 10%), not {}",
        args.tolerance
    );
    let report = crate::report::load(&args.report)?;
    let report_verdict = report.verdict.name();
    if let Some(out) = &args.write_baseline {
        if report.verdict != Verdict::Pass {
            eprintln!(
                "archy-chaos: gate: {}: verdict {report_verdict}; a baseline is only taken from a passing run, none written",
                args.report.display()
            );
            return Ok(exit::FAIL);
        }
        let n = write_baseline(&report, &args.report, out)
            .with_context(|| format!("{}: cannot write the baseline", out.display()))?;
        println!("baseline {}: {n} KPIs from {}", out.display(), args.report.display());
        return Ok(exit::PASS);
    }
    let baseline: Baseline =
        crate::report::load_json(&args.baseline, "baseline", BASELINE_SCHEMA).map_err(|e| {
            anyhow::anyhow!(
                "{e:#}\n(take a baseline from a passing run: archy-chaos gate RUN.json --write-baseline PATH)"
            )
        })?;

    let rows = compare(&samples(&report), &baseline.kpis, args.tolerance);
    let regressed: Vec<&str> =
        rows.iter().filter(|c| c.verdict == Change::Regression).map(|c| c.kpi.as_str()).collect();
    // Fail beats unknown beats pass, as for a run's iterations.
    let mut code = match report.verdict {
        Verdict::Fail => exit::FAIL,
        _ if !regressed.is_empty() => exit::FAIL,
        Verdict::Unknown => exit::UNKNOWN,
        Verdict::Pass => exit::PASS,
    };
    if let Some(url) = &args.pushgateway {
        if let Err(e) = crate::push::push(url, &report, Some(code == exit::PASS)) {
            eprintln!("archy-chaos: gate: metrics not pushed: {e:#}");
            if code == exit::PASS {
                code = exit::UNKNOWN;
            }
        }
    }
    let verdict = match code {
        exit::PASS => "pass",
        exit::FAIL => "fail",
        _ => "unknown",
    };
    if args.json {
        let out = json!({
            "verdict": verdict,
            "exit_code": code,
            "report_verdict": report_verdict,
            "report": args.report.display().to_string(),
            "baseline": args.baseline.display().to_string(),
            "rule": rule(args.tolerance),
            "comparisons": rows,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(code);
    }
    let mut t = tabled::builder::Builder::default();
    t.push_record(["kpi", "baseline p50", "run p50", "change (run/baseline) [95%]", "verdict"]);
    for c in &rows {
        let value = |v: Option<f64>| match (v, c.unit.as_str()) {
            (None, _) => "-".to_string(),
            (Some(v), "ratio") => format!("{v:.3}"),
            (Some(v), unit) => format!("{v:.3} {unit}"),
        };
        let change = match (c.ratio, c.interval) {
            (Some(r), Some([lo, hi])) => format!("x{r:.2} [{lo:.2}, {hi:.2}]"),
            (Some(r), None) => format!("x{r:.2}"),
            _ => "-".to_string(),
        };
        t.push_record([
            c.kpi.clone(),
            value(c.baseline_p50),
            value(c.run_p50),
            change,
            c.verdict.label().into(),
        ]);
    }
    println!("{}", t.build().with(tabled::settings::Style::sharp()));
    println!("rule: {}", rule(args.tolerance));
    println!(
        "report: {} (verdict {report_verdict}); baseline: {}",
        args.report.display(),
        args.baseline.display()
    );
    let mut why = Vec::new();
    if report.verdict != Verdict::Pass {
        why.push(format!("the run's verdict is {report_verdict}"));
    }
    if !regressed.is_empty() {
        why.push(format!("regression in {}", regressed.join(", ")));
    }
    if why.is_empty() {
        println!("gate: {}", verdict.to_uppercase());
    } else {
        println!("gate: {}: {}", verdict.to_uppercase(), why.join("; "));
    }
    Ok(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kpis(kpis: &[(&str, &[f64])]) -> BTreeMap<String, Samples> {
        kpis.iter().map(|(k, v)| (k.to_string(), Samples { unit: "s".into(), samples: v.to_vec() })).collect()
    }

    fn report(samples: &[f64]) -> BTreeMap<String, Samples> {
        kpis(&[("s/k", samples)])
    }

    fn baseline(samples: &[f64]) -> BTreeMap<String, Samples> {
        report(samples)
    }

    const BASE: [f64; 10] = [0.40, 0.41, 0.39, 0.42, 0.40, 0.38, 0.43, 0.40, 0.41, 0.39];

    #[test]
    fn a_slower_median_beyond_the_tolerance_is_a_regression_and_the_result_is_deterministic() {
        let slow: Vec<f64> = BASE.iter().map(|x| x * 1.5).collect();
        let a = compare(&report(&slow), &baseline(&BASE), 0.1);
        let b = compare(&report(&slow), &baseline(&BASE), 0.1);
        assert_eq!(a[0].verdict, Change::Regression, "{a:?}");
        assert_eq!(a[0].interval, b[0].interval);
        assert_eq!(compare(&report(&BASE), &baseline(&BASE), 0.1)[0].verdict, Change::Same);
        let fast: Vec<f64> = BASE.iter().map(|x| x * 0.5).collect();
        assert_eq!(compare(&report(&fast), &baseline(&BASE), 0.1)[0].verdict, Change::Better);
    }

    /// Release run of 2026-11-26 on a busier machine: raw podman and the agent both ~1.2x
    /// slower, their ratio unchanged; the gate failed the release on the absolute figures.
    #[test]
    fn a_slower_machine_is_not_a_regression_when_the_ratio_holds() {
        let slow: Vec<f64> = BASE.iter().map(|x| x * 1.2).collect();
        let ratios: Vec<f64> = BASE.iter().map(|x| x * 4.0).collect();
        let run = |install: &[f64], raw: &[f64], ratio: &[f64]| {
            kpis(&[
                ("cold/install_seconds", install),
                ("cold/raw_run_seconds", raw),
                ("cold/install_ratio", ratio),
            ])
        };
        let base = run(&BASE, &BASE, &ratios);
        let verdicts = |r: &BTreeMap<String, Samples>| -> Vec<Change> {
            compare(r, &base, 0.1).iter().map(|c| c.verdict).collect()
        };
        // Keys in order: install_ratio, install_seconds, raw_run_seconds.
        assert_eq!(verdicts(&run(&slow, &slow, &ratios)), [Change::Same, Change::ByRatio, Change::Reference]);
        // The agent alone slower: its ratio regresses, so the gate fails.
        let worse: Vec<f64> = ratios.iter().map(|x| x * 1.5).collect();
        assert_eq!(verdicts(&run(&slow, &BASE, &worse))[0], Change::Regression);
    }

    /// The committed baseline must fit the release suite as it is now: a renamed KPI or
    /// scenario would otherwise leave the gate comparing nothing ("missing" never fails).
    #[test]
    fn the_committed_baseline_covers_the_release_suites_kpis() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let baseline: Baseline =
            crate::report::load_json(&root.join("reports/baseline.json"), "baseline", BASELINE_SCHEMA)
                .unwrap();
        let have: std::collections::BTreeSet<&str> = baseline.kpis.keys().map(String::as_str).collect();
        let mut want = std::collections::BTreeSet::new();
        for (_, s, _) in crate::scenario::resolve(&root.join("scenarios"), &["release".into()]).unwrap() {
            want.extend(s.measures().into_iter().map(|k| format!("{}/{k}", s.id)));
        }
        let want: std::collections::BTreeSet<&str> = want.iter().map(String::as_str).collect();
        assert_eq!(
            have, want,
            "refresh it: archy-chaos gate RELEASE_RUN.json --write-baseline reports/baseline.json"
        );
    }

    #[test]
    fn zeros_compare_as_unchanged_and_leaving_zero_as_infinitely_worse() {
        assert_eq!(ratio(0.0, 0.0), 1.0);
        assert_eq!(ratio(1.0, 0.0), f64::INFINITY);
        assert_eq!(median(&[3.0, 1.0, 2.0, 10.0]), Some(2.5));
    }
}
