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
//!
//! Before any KPI, the report must be a whole run of the suite gated for (`--suite`, release by
//! default): the suite's name and hash as the run recorded them, and every entry's iterations
//! on every node ([`suite_problems`]).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{ensure, Context, Result};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::node::Backend;
use crate::report::{exit, Report, SuiteRecord, Verdict};

const BASELINE_SCHEMA: u64 = 1;
const MIN_SAMPLES: usize = 5;
const RESAMPLES: usize = 2000;
/// Fixed, so the same two files always give the same intervals (and the same exit code).
const BOOTSTRAP_SEED: u64 = 0x6172_6368_795f_6761;

#[derive(clap::Args)]
#[command(after_help = AFTER_HELP)]
pub struct GateArgs {
    /// The run's JSON report (schema 3), as `archy-chaos run` wrote it.
    pub report: PathBuf,
    /// The suite the run must be, whole: the name it was run as (`release`, or scenarios joined
    /// by `+` as in `run a b`), the same scenario files, backends and iteration counts, and every
    /// iteration on every node. A smoke run, an L6-only run or a run cut short is refused.
    #[arg(long, default_value = "release")]
    pub suite: String,
    /// Where the suite's scenario files are.
    #[arg(long, default_value = "scenarios")]
    pub scenarios: PathBuf,
    /// Baseline to compare the run's KPIs with (see the format above).
    #[arg(long, default_value = "reports/baseline.json")]
    pub baseline: PathBuf,
    /// How much worse a median may get before it is a regression: 0.10 is 10%.
    #[arg(long, default_value_t = 0.10)]
    pub tolerance: f64,
    /// Instead of gating, write a baseline from this run (a whole passing run of --suite) to PATH.
    #[arg(long, value_name = "PATH", conflicts_with_all = ["baseline", "tolerance", "json", "pushgateway"])]
    pub write_baseline: Option<PathBuf>,
    /// Print one JSON object (verdict, exit_code, report_verdict, suite_problems, comparisons)
    /// instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Also push the run's metrics and the gate's decision to this Prometheus Pushgateway
    /// (job `archy_chaos`, grouped by node). A failed push makes a passing gate exit 2.
    #[arg(long, value_name = "URL")]
    pub pushgateway: Option<String>,
}

const AFTER_HELP: &str = "\
How a run is judged (exit 0 ship, 1 do not ship, 2 undecided, 64 bad usage):
  1. The report must be the --suite, whole (see --suite), else exit 1 naming what is missing.
  2. The run's own verdict: every iteration and every threshold of the scenario files (the
     platform's targets: cold install p99, tick p99 at 20 apps, calls per install, start-up
     from boot). A failed run exits 1, an unknown one 2.
  3. Against the baseline, by unit:
     ratio  (to raw podman or Quadlet measured in the same run): regression when the 95%
            bootstrap interval of median(run)/median(baseline) lies above 1 + tolerance;
     calls  exact: any run sample above the baseline's largest fails, whatever the count;
     s      never against another day: judged through its ratio twin (X_ratio for
            X_seconds) where the run has one, else by the scenario's thresholds only;
            raw_* figures describe the machine.
     A KPI in the baseline that the run did not produce fails.";

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
    /// The suite of the run it was taken from (`release sha256:...`); for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    suite: Option<String>,
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
    /// In the baseline, not in the run: fails, a KPI that stopped being measured proves nothing.
    Missing,
    /// In the run, not in the baseline (refresh the baseline to gate on it).
    New,
    /// Raw podman measured beside the agent in the same run: it describes the machine.
    Reference,
    /// An absolute latency with a ratio to raw podman beside it: the ratio is judged.
    ByRatio,
    /// An absolute figure with no same-run reference: judged by the run's thresholds only.
    ByThreshold,
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
            Change::ByThreshold => "by threshold",
        }
    }

    /// Whether this verdict stops a release.
    pub fn fails(self) -> bool {
        matches!(self, Change::Regression | Change::Missing)
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
        "ratios regress when the 95% bootstrap interval ({RESAMPLES} resamples, fixed seed) of \
         median(run)/median(baseline) lies entirely above {:.2} (1 + tolerance), and are better below {:.2} \
         (fewer than {MIN_SAMPLES} samples on either side: not judged); calls are exact: any sample above the \
         baseline's largest regresses; seconds are judged through their ratio twin (X_ratio for X_seconds) \
         or by the run's thresholds only, never against another day; raw_* figures describe the machine; \
         a baseline KPI the run lacks fails; every KPI is lower-is-better",
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
    let role = |key: &str, unit: &str| {
        let (scenario, name) = key.split_once('/').unwrap_or(("", key));
        let twin = format!("{scenario}/{}", name.replacen("_seconds", "_ratio", 1));
        match unit {
            "ratio" | "calls" => None,
            _ if name.starts_with("raw_") => Some(Change::Reference),
            _ if name.contains("_seconds") && keys.contains(&twin) => Some(Change::ByRatio),
            // Another day's absolute seconds say more about that day's machine than the agent
            // (an L6 run on a busier machine failed start-up and recovery with every ratio held).
            _ => Some(Change::ByThreshold),
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
                (Some(b), Some(r)) => match role(key, &c.unit) {
                    Some(role) => role,
                    // Counts are exact and few (3 samples): no interval, no tolerance.
                    None if c.unit == "calls" => {
                        let most = |xs: &[f64]| xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                        let (rm, bm) = (most(&r.samples), most(&b.samples));
                        c.ratio = Some(ratio(rm, bm));
                        match rm.total_cmp(&bm) {
                            std::cmp::Ordering::Greater => Change::Regression,
                            std::cmp::Ordering::Less => Change::Better,
                            std::cmp::Ordering::Equal => Change::Same,
                        }
                    }
                    None if b.samples.len() < MIN_SAMPLES || r.samples.len() < MIN_SAMPLES => {
                        Change::TooFewSamples
                    }
                    None => {
                        let [lo, hi] = bootstrap(&r.samples, &b.samples);
                        c.interval = Some([lo, hi]);
                        if lo > 1.0 + tolerance {
                            Change::Regression
                        } else if hi < 1.0 - tolerance {
                            Change::Better
                        } else {
                            Change::Same
                        }
                    }
                },
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
            let pooled = out.entry(format!("{}/{}", s.label(), k.name)).or_default();
            pooled.unit.clone_from(&k.unit);
            pooled.samples.extend(&k.samples);
        }
    }
    out
}

/// The suite `name` as the scenario files in `dir` define it today.
fn expected_suite(dir: &Path, name: &str) -> Result<SuiteRecord> {
    let targets: Vec<String> = name.split('+').map(str::to_string).collect();
    let plan = crate::scenario::resolve(dir, &targets, Backend::Quadlet)
        .with_context(|| format!("--suite {name}"))?;
    SuiteRecord::new(name.to_string(), plan.iter().map(|p| (p, 0)))
}

/// Why `report` is not a whole run of `want` (empty when it is): another suite, another
/// definition of it, or iterations a node did not report.
pub fn suite_problems(report: &Report, want: &SuiteRecord) -> Vec<String> {
    let Some(ran) = &report.suite else {
        return vec![format!("the report records no suite (a runner before suites were recorded, or an exploration); --suite {} needs a run of it", want.name)];
    };
    if ran.name != want.name {
        return vec![format!("the run is of `{}`, not of the suite `{}`", ran.name, want.name)];
    }
    let mut out = Vec::new();
    if ran.hash != want.hash {
        for w in &want.entries {
            match ran.entries.iter().find(|r| r.scenario == w.scenario && r.backend == w.backend) {
                None => out.push(format!("{} was not run", w.label())),
                Some(r) if r.iterations < w.iterations => {
                    out.push(format!("{} ran {} iterations of {}", w.label(), r.iterations, w.iterations))
                }
                Some(_) => {}
            }
        }
        if out.is_empty() {
            out.push(format!(
                "the run's `{}` ({}) is not today's ({}): its scenario files, backends or iteration counts differ; run it again",
                want.name, ran.hash, want.hash
            ));
        }
        return out;
    }
    for node in &report.nodes {
        for e in &ran.entries {
            let done = node
                .scenarios
                .iter()
                .find(|s| s.scenario == e.scenario && s.backend == e.backend)
                .map_or(0, |s| s.iterations.len());
            if done < e.runs as usize {
                out.push(format!("{}: {} has {done} of {} iterations", node.node, e.label(), e.runs));
            }
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
        suite: report.suite.as_ref().map(|s| format!("{} {}", s.name, s.hash)),
        kpis: samples(report),
    };
    let n = doc.kpis.len();
    let name = out.file_name().and_then(|n| n.to_str()).context("the baseline path names no file")?;
    let dir = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let mut bytes = serde_json::to_vec_pretty(&doc)?;
    bytes.push(b'\n');
    // Atomic, so a gate reading it concurrently never sees half a baseline.
    archy_agent::atomic::write(dir, name, &bytes, 0o644, archy_agent::atomic::Kind::Other)?;
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
    let incomplete = suite_problems(&report, &expected_suite(&args.scenarios, &args.suite)?);
    if let Some(out) = &args.write_baseline {
        if report.verdict != Verdict::Pass || !incomplete.is_empty() {
            eprintln!(
                "archy-chaos: gate: {}: verdict {report_verdict}{}; a baseline is only taken from a whole passing run of --suite {}, none written",
                args.report.display(),
                incomplete.iter().map(|p| format!("; {p}")).collect::<String>(),
                args.suite
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
    let failed =
        |c: Change| -> Vec<&str> { rows.iter().filter(|r| r.verdict == c).map(|r| r.kpi.as_str()).collect() };
    let (regressed, missing) = (failed(Change::Regression), failed(Change::Missing));
    // Fail beats unknown beats pass, as for a run's iterations.
    let mut code = match report.verdict {
        Verdict::Fail => exit::FAIL,
        _ if !incomplete.is_empty() || rows.iter().any(|c| c.verdict.fails()) => exit::FAIL,
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
            "suite": args.suite,
            "suite_problems": incomplete,
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
    let ran = report.suite.as_ref().map_or("none".to_string(), |s| format!("{} {}", s.name, s.hash));
    println!(
        "report: {} (verdict {report_verdict}, suite {ran}); baseline: {}",
        args.report.display(),
        args.baseline.display()
    );
    let mut why = Vec::new();
    if !incomplete.is_empty() {
        why.push(format!("not a whole `{}` run: {}", args.suite, incomplete.join("; ")));
    }
    if report.verdict != Verdict::Pass {
        why.push(format!("the run's verdict is {report_verdict}"));
    }
    if !regressed.is_empty() {
        why.push(format!("regression in {}", regressed.join(", ")));
    }
    if !missing.is_empty() {
        why.push(format!("not measured by the run: {}", missing.join(", ")));
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
    use crate::report::model::label;

    /// Samples with each KPI's unit as a report gives it (by name).
    fn kpis(kpis: &[(&str, &[f64])]) -> BTreeMap<String, Samples> {
        kpis.iter()
            .map(|(k, v)| {
                (k.to_string(), Samples { unit: crate::report::unit(k).into(), samples: v.to_vec() })
            })
            .collect()
    }

    fn report(samples: &[f64]) -> BTreeMap<String, Samples> {
        kpis(&[("s/k_ratio", samples)])
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
        for p in
            crate::scenario::resolve(&root.join("scenarios"), &["release".into()], Backend::Quadlet).unwrap()
        {
            let at = label(&p.scenario.id, p.backend);
            // The podman backend's install writes no unit and reloads nothing.
            let absent: Vec<String> = match p.backend {
                Backend::Podman => archy_agent::metrics::QUADLET_ONLY_INSTALL_STEPS
                    .iter()
                    .map(|s| crate::scenario::kpi::install_step(s))
                    .collect(),
                Backend::Quadlet => Vec::new(),
            };
            let kpis = p.scenario.measures().into_iter().filter(|k| !absent.contains(k));
            want.extend(kpis.map(|k| format!("{at}/{k}")));
        }
        let want: std::collections::BTreeSet<&str> = want.iter().map(String::as_str).collect();
        assert_eq!(
            have, want,
            "refresh it: archy-chaos gate RELEASE_RUN.json --write-baseline reports/baseline.json"
        );
    }

    /// Issue 14: calls-per-op yields 3 samples, under the 5 a bootstrap needs, so podman calls
    /// per install could go from 1 to 4 unjudged. Counts are exact.
    #[test]
    fn calls_per_install_from_1_to_2_is_a_regression_however_few_the_samples() {
        let base = kpis(&[("calls-per-op/install_podman_calls", &[1.0, 1.0, 1.0])]);
        let judge = |run: &[f64]| {
            compare(&kpis(&[("calls-per-op/install_podman_calls", run)]), &base, 0.1)[0].verdict
        };
        assert_eq!(judge(&[1.0, 2.0, 1.0]), Change::Regression);
        assert_eq!(judge(&[2.0]), Change::Regression);
        assert_eq!(judge(&[1.0, 1.0, 1.0]), Change::Same);
        assert_eq!(judge(&[0.0, 1.0]), Change::Same);
        assert_eq!(judge(&[0.0, 0.0, 0.0]), Change::Better);
    }

    /// Issue 14: an L6 run on a busier machine failed start-up and recovery seconds against
    /// another day's baseline while every ratio held.
    #[test]
    fn every_absolute_figure_doubled_with_every_ratio_unchanged_passes() {
        let base = kpis(&[
            ("agent-startup/startup_seconds", &BASE),
            ("reboot-survive/recovery_seconds", &BASE),
            ("cold-install/install_seconds", &BASE),
            ("cold-install/raw_run_seconds", &BASE),
            ("cold-install/install_ratio", &BASE),
        ]);
        let doubled: BTreeMap<String, Samples> = base
            .iter()
            .map(|(k, v)| {
                let mut v = v.clone();
                if !k.ends_with("_ratio") {
                    v.samples.iter_mut().for_each(|x| *x *= 2.0);
                }
                (k.clone(), v)
            })
            .collect();
        let rows = compare(&doubled, &base, 0.1);
        assert!(rows.iter().all(|c| !c.verdict.fails()), "{rows:?}");
        let by = |k: &str| rows.iter().find(|c| c.kpi == k).unwrap().verdict;
        assert_eq!(by("agent-startup/startup_seconds"), Change::ByThreshold);
        assert_eq!(by("reboot-survive/recovery_seconds"), Change::ByThreshold);
        assert_eq!(by("cold-install/install_ratio"), Change::Same);
    }

    #[test]
    fn a_baseline_kpi_the_run_did_not_produce_fails() {
        let base = kpis(&[("s/k", &BASE), ("s/gone_ratio", &BASE)]);
        let rows = compare(&kpis(&[("s/k", &BASE)]), &base, 0.1);
        let gone = rows.iter().find(|c| c.kpi == "s/gone_ratio").unwrap();
        assert_eq!(gone.verdict, Change::Missing);
        assert!(gone.verdict.fails());
    }

    #[test]
    fn zeros_compare_as_unchanged_and_leaving_zero_as_infinitely_worse() {
        assert_eq!(ratio(0.0, 0.0), 1.0);
        assert_eq!(ratio(1.0, 0.0), f64::INFINITY);
        assert_eq!(median(&[3.0, 1.0, 2.0, 10.0]), Some(2.5));
    }
}
