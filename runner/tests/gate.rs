//! `archy-chaos gate` as a release manager runs it: the verdict, the baseline comparison, the
//! usage errors, and a push to a real Pushgateway on loopback.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{chaos_cmd, repo_root};

const PUSHGATEWAY: &str = "/usr/bin/prometheus-pushgateway";

fn fixture_path() -> PathBuf {
    repo_root().join("runner/tests/fixtures/gate-run.json")
}

/// The scenario files and suite (`gate-fixture`) the fixture report is a run of.
fn fixture_scenarios() -> PathBuf {
    repo_root().join("runner/tests/fixtures/gate-scenarios")
}

fn fixture() -> Value {
    serde_json::from_slice(&std::fs::read(fixture_path()).unwrap()).unwrap()
}

/// `archy-chaos ARGS` must exit with `code`; prints everything otherwise. Returns stdout + stderr.
fn expect(code: i32, args: &[&str]) -> String {
    let out = chaos_cmd(args).output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        out.status.code(),
        Some(code),
        "archy-chaos {}\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        args.join(" ")
    );
    format!("{stdout}{stderr}")
}

/// `archy-chaos gate ARGS`, gating for the fixture's suite, must exit with `code`.
fn gate(code: i32, args: &[&str]) -> String {
    let scenarios = fixture_scenarios();
    let mut all = vec!["gate"];
    all.extend(args);
    all.extend(["--suite", "gate-fixture", "--scenarios", s(&scenarios)]);
    expect(code, &all)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn write(dir: &Path, name: &str, v: &Value) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, serde_json::to_vec_pretty(v).unwrap()).unwrap();
    p
}

/// A baseline taken from the unchanged fixture.
fn baseline(dir: &Path) -> PathBuf {
    let p = dir.join("baseline.json");
    gate(0, &[s(&fixture_path()), "--write-baseline", s(&p)]);
    p
}

/// The fixture with `f` applied to the samples of the KPI `<scenario>/<kpi>`, or of every KPI
/// but the call counts (they are not timings).
fn edit_samples(only: Option<&str>, f: impl Fn(&[f64]) -> Vec<f64>) -> Value {
    let mut r = fixture();
    for sc in r["nodes"][0]["scenarios"].as_array_mut().unwrap() {
        let scenario = sc["scenario"].as_str().unwrap().to_string();
        for k in sc["kpis"].as_array_mut().unwrap() {
            let key = format!("{scenario}/{}", k["name"].as_str().unwrap());
            if only.map_or(k["unit"] != "calls", |o| o == key) {
                let xs: Vec<f64> =
                    k["samples"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
                k["samples"] = serde_json::json!(f(&xs));
            }
        }
    }
    r
}

/// `gate --json` rows: kpi -> verdict.
fn verdicts(out: &str) -> BTreeMap<String, String> {
    let v: Value = serde_json::from_str(out).unwrap_or_else(|e| panic!("not JSON ({e}):\n{out}"));
    v["comparisons"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["kpi"].as_str().unwrap().to_string(), c["verdict"].as_str().unwrap().to_string()))
        .collect()
}

#[test]
fn the_same_samples_pass_and_every_kpi_is_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let b = baseline(dir.path());
    let out = gate(0, &[s(&fixture_path()), "--baseline", s(&b), "--json"]);
    let rows = verdicts(&out);
    assert_eq!(rows.len(), 4, "{out}");
    // install_seconds has install_ratio beside it: the ratio is what is judged.
    assert_eq!(rows["cold-install/install_seconds"], "by ratio", "{out}");
    // No ratio beside it: another day's seconds are not judged, the run's thresholds are.
    assert_eq!(rows["reboot-survive/recovery_seconds"], "by threshold", "{out}");
    assert_eq!(rows["cold-install/install_ratio"], "same", "{out}");
    assert_eq!(rows["reboot-survive/podman_calls"], "same", "{out}");
    // Deterministic: the same files give the same intervals.
    assert_eq!(out, gate(0, &[s(&fixture_path()), "--baseline", s(&b), "--json"]));
    let table = gate(0, &[s(&fixture_path()), "--baseline", s(&b)]);
    assert!(table.contains("bootstrap") && table.contains("gate: PASS"), "{table}");
}

#[test]
fn a_kpi_half_again_slower_fails_the_gate_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let b = baseline(dir.path());
    let slow = edit_samples(Some("cold-install/install_ratio"), |xs| xs.iter().map(|x| x * 1.5).collect());
    let run = write(dir.path(), "slow.json", &slow);
    let out = gate(1, &[s(&run), "--baseline", s(&b)]);
    assert!(out.contains("gate: FAIL: regression in cold-install/install_ratio\n"), "{out}");
    let rows = verdicts(&gate(1, &[s(&run), "--baseline", s(&b), "--json"]));
    assert_eq!(rows["cold-install/install_ratio"], "regression");
    assert_eq!(rows.values().filter(|v| *v == "regression").count(), 1, "{rows:?}");
}

#[test]
fn five_percent_slower_with_noise_is_within_a_ten_percent_tolerance() {
    let dir = tempfile::tempdir().unwrap();
    let b = baseline(dir.path());
    let noise = [0.03, -0.02, 0.01, -0.03, 0.02, 0.0, -0.01, 0.03, -0.02, 0.01];
    let run = edit_samples(None, |xs| {
        xs.iter().zip(noise.iter().cycle()).map(|(x, n)| x * 1.05 * (1.0 + n)).collect()
    });
    let run = write(dir.path(), "noisy.json", &run);
    let out = gate(0, &[s(&run), "--baseline", s(&b), "--tolerance", "0.10", "--json"]);
    assert!(verdicts(&out).values().all(|v| v == "same" || v.starts_with("by ")), "{out}");
}

#[test]
fn three_ratio_samples_are_too_few_to_judge() {
    let dir = tempfile::tempdir().unwrap();
    let b = baseline(dir.path());
    let run =
        edit_samples(Some("cold-install/install_ratio"), |xs| xs[..3].iter().map(|x| x * 2.0).collect());
    let run = write(dir.path(), "few.json", &run);
    let rows = verdicts(&gate(0, &[s(&run), "--baseline", s(&b), "--json"]));
    assert_eq!(rows["cold-install/install_ratio"], "too few samples");
}

/// Issue 14: "missing" never failed, so a KPI that stopped being measured passed the gate.
#[test]
fn a_baseline_kpi_missing_from_the_run_fails() {
    let dir = tempfile::tempdir().unwrap();
    let b = baseline(dir.path());
    let mut run = fixture();
    run["nodes"][0]["scenarios"][0]["kpis"].as_array_mut().unwrap().retain(|k| k["name"] != "install_ratio");
    let run = write(dir.path(), "gone.json", &run);
    let rows = verdicts(&gate(1, &[s(&run), "--baseline", s(&b), "--json"]));
    assert_eq!(rows["cold-install/install_ratio"], "missing");
    let out = gate(1, &[s(&run), "--baseline", s(&b)]);
    assert!(out.contains("gate: FAIL: not measured by the run: cold-install/install_ratio"), "{out}");
}

/// Issue 14: counts were never judged (3 samples are "too few"), so podman calls per install
/// could grow and ship.
#[test]
fn calls_per_install_1_to_2_fails() {
    let dir = tempfile::tempdir().unwrap();
    let b = baseline(dir.path());
    let mut run = edit_samples(Some("reboot-survive/podman_calls"), |xs| xs[..3].to_vec());
    run["nodes"][0]["scenarios"][1]["kpis"][1]["samples"] = serde_json::json!([1.0, 2.0, 1.0]);
    let run = write(dir.path(), "more-calls.json", &run);
    let out = gate(1, &[s(&run), "--baseline", s(&b)]);
    assert!(out.contains("gate: FAIL: regression in reboot-survive/podman_calls\n"), "{out}");
}

/// Issue 14: an L6 run on a busier machine failed on start-up and recovery seconds against
/// another day's baseline while every ratio held.
#[test]
fn every_absolute_figure_doubled_with_every_ratio_unchanged_passes() {
    let dir = tempfile::tempdir().unwrap();
    let b = baseline(dir.path());
    let mut run = fixture();
    for sc in run["nodes"][0]["scenarios"].as_array_mut().unwrap() {
        for k in sc["kpis"].as_array_mut().unwrap().iter_mut().filter(|k| k["unit"] == "s") {
            let doubled: Vec<f64> =
                k["samples"].as_array().unwrap().iter().map(|x| 2.0 * x.as_f64().unwrap()).collect();
            k["samples"] = serde_json::json!(doubled);
        }
    }
    let run = write(dir.path(), "doubled.json", &run);
    let out = gate(0, &[s(&run), "--baseline", s(&b)]);
    assert!(out.contains("gate: PASS"), "{out}");
}

/// Issue 14: a one-iteration smoke run, or an L6-only run, gated as a release.
#[test]
fn a_smoke_report_gated_as_release_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let b = baseline(dir.path());
    let mut smoke = fixture();
    smoke["suite"]["name"] = "smoke".into();
    let smoke = write(dir.path(), "smoke.json", &smoke);
    // The default suite is the release, defined by the repository's scenarios/.
    let out = expect(1, &["gate", s(&smoke), "--baseline", s(&b)]);
    assert!(
        out.contains(
            "gate: FAIL: not a whole `release` run: the run is of `smoke`, not of the suite `release`"
        ),
        "{out}"
    );
    let out = expect(1, &["gate", s(&fixture_path()), "--baseline", s(&b)]);
    assert!(out.contains("the run is of `gate-fixture`"), "{out}");
    // A report from before suites were recorded proves nothing either.
    let mut old = fixture();
    old.as_object_mut().unwrap().remove("suite");
    let old = write(dir.path(), "old.json", &old);
    let out = gate(1, &[s(&old), "--baseline", s(&b)]);
    assert!(out.contains("the report records no suite"), "{out}");
}

#[test]
fn a_run_of_fewer_iterations_than_its_suite_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let b = baseline(dir.path());
    // `run gate-fixture --iterations 3`: another suite than the one defined.
    let mut short = fixture();
    for e in short["suite"]["entries"].as_array_mut().unwrap() {
        e["iterations"] = 3.into();
    }
    short["suite"]["hash"] = "sha256:0".into();
    let short = write(dir.path(), "short.json", &short);
    let out = gate(1, &[s(&short), "--baseline", s(&b)]);
    assert!(out.contains("cold-install ran 3 iterations of 10"), "{out}");
    // Cut short (fail-fast, a crash): a node reports fewer iterations than the suite's.
    let mut cut = fixture();
    cut["nodes"][0]["scenarios"][1]["iterations"].as_array_mut().unwrap().truncate(4);
    let cut = write(dir.path(), "cut.json", &cut);
    let out = gate(1, &[s(&cut), "--baseline", s(&b)]);
    assert!(out.contains("local:run1234: reboot-survive has 4 of 10 iterations"), "{out}");
    // And no baseline is taken from either.
    let refused = dir.path().join("refused.json");
    gate(1, &[s(&cut), "--write-baseline", s(&refused)]);
    assert!(!refused.exists());
}

#[test]
fn the_run_verdict_decides_first_fail_exits_1_and_unknown_2() {
    let dir = tempfile::tempdir().unwrap();
    let b = baseline(dir.path());
    for (verdict, code) in [("fail", 1), ("unknown", 2)] {
        let mut r = fixture();
        r["verdict"] = verdict.into();
        let run = write(dir.path(), &format!("{verdict}.json"), &r);
        let out = gate(code, &[s(&run), "--baseline", s(&b)]);
        assert!(out.contains(&format!("the run's verdict is {verdict}")), "{out}");
    }
}

#[test]
fn bad_files_are_usage_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let b = baseline(dir.path());
    let mut old = fixture();
    old["schema"] = 1.into();
    let old = write(dir.path(), "old.json", &old);
    let out = gate(64, &[s(&old), "--baseline", s(&b)]);
    assert!(
        out.contains(s(&old)) && out.contains("schema 1") && out.contains("reads report schema 3"),
        "{out}"
    );

    let junk = dir.path().join("junk.json");
    std::fs::write(&junk, "not json {").unwrap();
    let out = gate(64, &[s(&junk), "--baseline", s(&b)]);
    assert!(out.contains(s(&junk)) && out.contains("not JSON"), "{out}");

    let gone = dir.path().join("gone.json");
    let out = gate(64, &[s(&gone), "--baseline", s(&b)]);
    assert!(out.contains(s(&gone)) && out.contains("cannot read"), "{out}");

    let out = gate(64, &[s(&fixture_path()), "--baseline", s(&gone)]);
    assert!(out.contains(s(&gone)) && out.contains("--write-baseline"), "{out}");
}

#[test]
fn a_baseline_is_only_written_from_a_passing_run() {
    let dir = tempfile::tempdir().unwrap();
    let b = baseline(dir.path());
    let written: Value = serde_json::from_slice(&std::fs::read(&b).unwrap()).unwrap();
    assert_eq!(written["schema"], 1);
    assert_eq!(written["from"], s(&fixture_path()));
    assert_eq!(written["environment"], fixture()["nodes"][0]["environment"]);
    assert_eq!(written["kpis"]["cold-install/install_seconds"]["unit"], "s");
    assert_eq!(written["kpis"].as_object().unwrap().len(), 4);

    let mut failed = fixture();
    failed["verdict"] = "fail".into();
    let failed = write(dir.path(), "failed.json", &failed);
    let refused = dir.path().join("refused.json");
    let out = gate(1, &[s(&failed), "--write-baseline", s(&refused)]);
    assert!(out.contains("only taken from a whole passing run"), "{out}");
    assert!(!refused.exists());
}

/// The fixture run over two nodes, the same samples on each.
fn two_nodes() -> Value {
    let mut r = fixture();
    let mut other = r["nodes"][0].clone();
    other["node"] = "ssh://archy@10.0.0.2".into();
    r["nodes"].as_array_mut().unwrap().push(other);
    r
}

#[test]
fn a_run_over_several_nodes_pools_each_kpis_samples() {
    let dir = tempfile::tempdir().unwrap();
    let run = write(dir.path(), "two.json", &two_nodes());
    let b = dir.path().join("two-baseline.json");
    gate(0, &[s(&run), "--write-baseline", s(&b)]);
    let written: Value = serde_json::from_slice(&std::fs::read(&b).unwrap()).unwrap();
    let once = fixture()["nodes"][0]["scenarios"][0]["kpis"][0]["samples"].as_array().unwrap().len();
    assert_eq!(
        written["kpis"]["cold-install/install_seconds"]["samples"].as_array().unwrap().len(),
        2 * once
    );
    assert_eq!(written["environment"]["ssh://archy@10.0.0.2"], fixture()["nodes"][0]["environment"]);
    // Pooled, two nodes like the one of a single-node baseline compare as the same.
    let rows = verdicts(&gate(0, &[s(&run), "--baseline", s(&baseline(dir.path())), "--json"]));
    assert!(rows.values().all(|v| v == "same" || v.starts_with("by ")), "{rows:?}");
}

/// A Pushgateway on a free loopback port, in memory only; killed on drop.
struct Pushgateway {
    child: std::process::Child,
    url: String,
}

impl Pushgateway {
    fn start(dir: &Path) -> Self {
        assert!(Path::new(PUSHGATEWAY).exists(), "{PUSHGATEWAY} is missing: run scripts/setup-host");
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let log = dir.join("pushgateway.log");
        let child = Command::new(PUSHGATEWAY)
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--persistence.file=")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let pg = Pushgateway { child, url: format!("http://127.0.0.1:{port}") };
        let start = Instant::now();
        while get(&format!("{}/-/ready", pg.url)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "pushgateway not ready at {}:\n{}",
                pg.url,
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        pg
    }

    /// The series named `name` whose labels include `labels`, by value.
    fn values(&self, name: &str, labels: &[(&str, &str)]) -> Vec<f64> {
        let text = get(&format!("{}/metrics", self.url)).unwrap();
        let found: Vec<f64> = text
            .lines()
            .filter_map(|l| {
                let (series, value) = l.rsplit_once(' ')?;
                let (n, rest) = series.split_once('{').unwrap_or((series, "}"));
                let have: Vec<(&str, &str)> = rest
                    .trim_end_matches('}')
                    .split(',')
                    .filter_map(|kv| kv.split_once('='))
                    .map(|(k, v)| (k, v.trim_matches('"')))
                    .collect();
                (n == name && labels.iter().all(|l| have.contains(l))).then(|| value.parse().unwrap())
            })
            .collect();
        assert!(!found.is_empty(), "no {name} with {labels:?} in the pushgateway's /metrics:\n{text}");
        found
    }
}

impl Drop for Pushgateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn get(url: &str) -> Result<String, ureq::Error> {
    let http = ureq::Agent::config_builder().timeout_global(Some(Duration::from_secs(5))).build().new_agent();
    http.get(url).call()?.body_mut().read_to_string()
}

#[test]
fn gate_pushes_the_run_and_its_decision_to_a_pushgateway() {
    let dir = tempfile::tempdir().unwrap();
    let b = baseline(dir.path());
    let pg = Pushgateway::start(dir.path());
    let node = ("node", "local:run1234");
    let job = ("job", "archy_chaos");

    gate(0, &[s(&fixture_path()), "--baseline", s(&b), "--pushgateway", &pg.url]);
    assert_eq!(pg.values("archy_chaos_gate_pass", &[job, node]), [1.0]);
    assert_eq!(pg.values("archy_chaos_run_pass", &[job, node]), [1.0]);
    let scenario_pass = |scenario| pg.values("archy_chaos_scenario_pass", &[node, ("scenario", scenario)]);
    assert_eq!(scenario_pass("cold-install"), [1.0]);
    assert_eq!(scenario_pass("reboot-survive"), [1.0]);
    let p50 = fixture()["nodes"][0]["scenarios"][0]["kpis"][0]["p50"].as_f64().unwrap();
    let kpi =
        [node, ("scenario", "cold-install"), ("kpi", "install_seconds"), ("unit", "s"), ("stat", "p50")];
    assert_eq!(pg.values("archy_chaos_kpi", &kpi), [p50]);
    let limit = [node, ("scenario", "cold-install"), ("kpi", "install_seconds"), ("stat", "p99")];
    assert_eq!(pg.values("archy_chaos_kpi_threshold", &limit), [5.0]);

    // A failed run replaces the node's group: the gate's decision turns to 0.
    let mut failed = fixture();
    failed["verdict"] = "fail".into();
    failed["nodes"][0]["verdict"] = "fail".into();
    failed["nodes"][0]["scenarios"][1]["verdict"] = "fail".into();
    failed["nodes"][0]["scenarios"][1]["iterations"][0]["verdict"] = "fail".into();
    let failed = write(dir.path(), "failed.json", &failed);
    gate(1, &[s(&failed), "--baseline", s(&b), "--pushgateway", &pg.url]);
    assert_eq!(pg.values("archy_chaos_gate_pass", &[job, node]), [0.0]);
    assert_eq!(scenario_pass("reboot-survive"), [0.0]);
    let fails = [node, ("scenario", "reboot-survive"), ("result", "fail")];
    assert_eq!(pg.values("archy_chaos_scenario_iterations", &fails), [1.0]);

    // Every node of a run is its own group, under the same names and labels.
    let mut two = two_nodes();
    two["verdict"] = "fail".into();
    two["nodes"][1]["verdict"] = "fail".into();
    let two = write(dir.path(), "two.json", &two);
    gate(1, &[s(&two), "--baseline", s(&b), "--pushgateway", &pg.url]);
    let remote = ("node", "ssh://archy@10.0.0.2");
    assert_eq!(pg.values("archy_chaos_run_pass", &[job, node]), [1.0]);
    assert_eq!(pg.values("archy_chaos_run_pass", &[job, remote]), [0.0]);
    assert_eq!(pg.values("archy_chaos_gate_pass", &[job, remote]), [0.0]);
    assert_eq!(pg.values("archy_chaos_kpi", &[remote, kpi[1], kpi[2], kpi[3], kpi[4]]), [p50]);
}

#[test]
fn a_pushgateway_that_refuses_the_push_makes_a_passing_gate_unknown() {
    let dir = tempfile::tempdir().unwrap();
    let b = baseline(dir.path());
    let pg = Pushgateway::start(dir.path());
    // No such route on a Pushgateway: it answers 404, which must name the URL and the status.
    let url = format!("{}/nowhere", pg.url);
    let out = gate(2, &[s(&fixture_path()), "--baseline", s(&b), "--pushgateway", &url]);
    assert!(out.contains("metrics not pushed") && out.contains(&url) && out.contains("404"), "{out}");
}
