//! The Grafana dashboards and Prometheus rules in dashboards/: provisioning-ready JSON, rules
//! that promtool accepts and unit-tests, and every panel and rule query answered by a real
//! Prometheus scraping a real node's agent and the results a real run pushed.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod support;

use serde_json::{json, Value};
use support::{chaos, chaos_cmd, repo_root};

const PROMTOOL: &str = "/usr/bin/promtool";
const PROMETHEUS: &str = "/usr/bin/prometheus";
const PUSHGATEWAY: &str = "/usr/bin/prometheus-pushgateway";
const DASHBOARDS: [(&str, &str); 2] =
    [("agent-kpis.json", "archy-agent-kpis"), ("release-gate.json", "archy-release-gate")];

fn dir(sub: &str) -> PathBuf {
    repo_root().join("dashboards").join(sub)
}

fn dashboard(file: &str) -> Value {
    let path = dir("grafana").join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Panels, including those nested in collapsed rows.
fn panels(d: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for p in d["panels"].as_array().into_iter().flatten() {
        out.push(p);
        out.extend(p["panels"].as_array().into_iter().flatten());
    }
    out
}

/// Never skip: a missing tool is a broken machine, and a skipped check proves nothing.
fn tool(path: &str) -> Command {
    assert!(Path::new(path).is_file(), "{path} missing: run scripts/setup-host (it installs Prometheus)");
    Command::new(path)
}

#[test]
fn dashboards_are_provisioning_ready_and_use_the_datasource_variable() {
    let ds = json!({"type": "prometheus", "uid": "${datasource}"});
    for (file, uid) in DASHBOARDS {
        let d = dashboard(file);
        assert_eq!(d["uid"], uid, "{file}: a stable uid keeps links and provisioning updates working");
        assert!(d.get("id").is_some_and(Value::is_null), "{file}: id must be null (Grafana assigns it)");
        assert_eq!(d["schemaVersion"], 39, "{file}: pinned schemaVersion");
        for key in ["__inputs", "__requires"] {
            assert!(d.get(key).is_none(), "{file}: {key} is for UI export-import only, not provisioning");
        }
        let vars = d["templating"]["list"].as_array().expect("templating.list");
        assert!(
            vars.iter().any(|v| v["type"] == "datasource"
                && v["name"] == "datasource"
                && v["query"] == "prometheus"),
            "{file}: no `datasource` variable"
        );
        // Every datasource reference anywhere (panels, targets, variables) is the variable,
        // so the dashboard works with whatever Prometheus the user picks.
        fn walk(v: &Value, at: &str, file: &str, ds: &Value) {
            match v {
                Value::Object(m) => {
                    for (k, x) in m {
                        if k == "datasource" {
                            assert_eq!(x, ds, "{file}: {at}.datasource");
                        }
                        walk(x, &format!("{at}.{k}"), file, ds);
                    }
                }
                Value::Array(a) => {
                    a.iter().enumerate().for_each(|(i, x)| walk(x, &format!("{at}[{i}]"), file, ds))
                }
                _ => {}
            }
        }
        walk(&d, "", file, &ds);
        for p in panels(&d) {
            let title = p["title"].as_str().unwrap_or_default();
            assert_eq!(p["datasource"], ds, "{file}: panel {title:?} names no datasource");
            assert!(
                p["description"].as_str().is_some_and(|s| s.len() > 30),
                "{file}: panel {title:?} needs a description a person can read"
            );
            let targets = p["targets"].as_array().filter(|t| !t.is_empty());
            for t in targets.unwrap_or_else(|| panic!("{file}: panel {title:?} has no query")) {
                assert_eq!(t["datasource"], ds, "{file}: a target of {title:?} names no datasource");
                assert!(
                    t["expr"].as_str().is_some_and(|e| !e.trim().is_empty()),
                    "{file}: {title:?}: empty expr"
                );
            }
        }
    }
}

#[test]
fn rules_pass_promtool_and_every_alert_is_tested_firing_and_silent() {
    let prom = dir("prometheus");
    for args in [
        ["check", "rules", "rules.yml"],
        ["check", "config", "prometheus.yml"],
        ["test", "rules", "rules.test.yml"],
    ] {
        let out = tool(PROMTOOL).args(args).current_dir(&prom).output().unwrap();
        assert!(
            out.status.success(),
            "promtool {args:?}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // promtool only runs the tests that exist: a new alert without one would pass unseen.
    let yaml = |f: &str| -> serde_yaml::Value {
        serde_yaml::from_str(&std::fs::read_to_string(prom.join(f)).unwrap()).unwrap()
    };
    let tests = yaml("rules.test.yml");
    let cases: Vec<&serde_yaml::Value> = tests["tests"]
        .as_sequence()
        .into_iter()
        .flatten()
        .flat_map(|t| t["alert_rule_test"].as_sequence().into_iter().flatten())
        .collect();
    let rules = yaml("rules.yml");
    for rule in rules["groups"].as_sequence().unwrap().iter().flat_map(|g| g["rules"].as_sequence().unwrap())
    {
        let Some(alert) = rule["alert"].as_str() else { continue };
        for key in ["summary", "runbook"] {
            assert!(rule["annotations"][key].as_str().is_some_and(|s| !s.is_empty()), "{alert}: no {key}");
        }
        let fired = |want: bool| {
            cases.iter().any(|c| {
                c["alertname"].as_str() == Some(alert)
                    && c["exp_alerts"].as_sequence().is_some_and(|a| a.is_empty() != want)
            })
        };
        assert!(fired(true) && fired(false), "{alert}: rules.test.yml must test it both firing and silent");
    }
}

/// A scenario file's threshold: `thresholds.KPI.QUANTILE`.
fn threshold(scenario: &str, kpi: &str, quantile: &str) -> f64 {
    let path = repo_root().join("scenarios").join(format!("{scenario}.yml"));
    let s: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    s["thresholds"][kpi][quantile]
        .as_f64()
        .unwrap_or_else(|| panic!("{}: no thresholds.{kpi}.{quantile}", path.display()))
}

/// The platform's targets live in the scenario files; the dashboards' red lines and the alerts
/// on the agent's own metrics restate them, and must not drift (the pushed results carry
/// their thresholds with them).
#[test]
fn red_lines_and_alerts_are_the_scenario_files_thresholds() {
    let targets = [
        ("tick-scaling", "tick_seconds_20apps", "p99"),
        ("cold-install", "install_seconds", "p99"),
        ("agent-startup", "boot_to_ready_seconds", "p99"),
        ("calls-per-op", "install_podman_calls", "max"),
    ];
    let [tick, install, boot, calls] = targets.map(|(s, k, q)| threshold(s, k, q));
    let d = dashboard("agent-kpis.json");
    let red_line = |title: &str| -> f64 {
        let p = panels(&d)
            .into_iter()
            .find(|p| p["title"] == title)
            .unwrap_or_else(|| panic!("no panel {title:?}"));
        assert_eq!(
            p["fieldConfig"]["defaults"]["custom"]["thresholdsStyle"]["mode"], "line",
            "{title:?}: no line drawn"
        );
        let steps = p["fieldConfig"]["defaults"]["thresholds"]["steps"].as_array().unwrap();
        let red =
            steps.iter().find(|s| s["color"] == "red").unwrap_or_else(|| panic!("{title:?}: no red step"));
        red["value"].as_f64().unwrap()
    };
    assert_eq!(red_line("Reconcile tick p50 / p99"), tick, "tick-scaling.yml: tick_seconds_20apps p99");
    assert_eq!(
        red_line("Install latency p50 / p99 per app"),
        install,
        "cold-install.yml: install_seconds p99"
    );
    assert_eq!(red_line("Agent start-up duration"), boot, "agent-startup.yml: boot_to_ready_seconds p99");
    assert_eq!(red_line("Podman calls per install"), calls, "calls-per-op.yml: install_podman_calls max");

    let rules: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(dir("prometheus").join("rules.yml")).unwrap()).unwrap();
    let above = |alert: &str| -> f64 {
        let rule = rules["groups"]
            .as_sequence()
            .unwrap()
            .iter()
            .flat_map(|g| g["rules"].as_sequence().unwrap())
            .find(|r| r["alert"].as_str() == Some(alert))
            .unwrap_or_else(|| panic!("no alert {alert}"));
        let expr = rule["expr"].as_str().unwrap();
        let (_, limit) =
            expr.rsplit_once('>').unwrap_or_else(|| panic!("{alert}: `{expr}` is no `... > LIMIT`"));
        limit.trim().parse().unwrap_or_else(|e| panic!("{alert}: `{expr}`: {e}"))
    };
    assert_eq!(above("ArchyReconcileTickSlow"), tick, "tick-scaling.yml: tick_seconds_20apps p99");
    assert_eq!(above("ArchyInstallSlow"), install, "cold-install.yml: install_seconds p99");

    // The release gate's targets panel names its KPIs; each must have a threshold to draw.
    let gate = dashboard("release-gate.json");
    let panel = panels(&gate)
        .into_iter()
        .find(|p| p["title"].as_str().is_some_and(|t| t.starts_with("Platform targets")));
    let expr = panel.expect("a Platform targets panel")["targets"][0]["expr"].as_str().unwrap();
    let named =
        expr.split("kpi=~\"").nth(1).and_then(|r| r.split('"').next()).unwrap_or_else(|| panic!("{expr}"));
    let mut kpis: Vec<&str> = named.split('|').collect();
    kpis.sort();
    let mut want: Vec<&str> = targets.iter().map(|(_, k, _)| *k).collect();
    want.sort();
    assert_eq!(kpis, want, "the Platform targets panel draws the platform's four targets");
}

/// A daemon killed and reaped when the test ends, however it ends.
struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    fn start(cmd: &mut Command, log: PathBuf) -> Daemon {
        let file = std::fs::File::create(&log).unwrap();
        let child = cmd.stdout(file.try_clone().unwrap()).stderr(file).spawn().unwrap();
        Daemon { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A local node, removed when the test ends.
struct Node(&'static str);

impl Drop for Node {
    fn drop(&mut self) {
        let _ = chaos(&["node", "down", self.0]);
    }
}

fn ok(args: &[&str]) -> String {
    let (ok, out, err) = chaos(args);
    assert!(ok, "archy-chaos {args:?} failed:\n{out}\n{err}");
    out
}

/// A free port on loopback (the kernel picks it; the daemon binds it right after).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn http() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .new_agent()
}

fn get(url: &str) -> Option<String> {
    let mut r = http().get(url).call().ok()?;
    r.status().is_success().then(|| r.body_mut().read_to_string().unwrap_or_default())
}

/// An instant query: its series, or Prometheus' error.
fn query(prom: &str, q: &str) -> Result<Vec<Value>, String> {
    let mut resp =
        http().get(&format!("{prom}/api/v1/query")).query("query", q).call().map_err(|e| e.to_string())?;
    let body: Value = resp.body_mut().read_json().map_err(|e| e.to_string())?;
    if body["status"] != "success" {
        return Err(format!("{}: {}", body["errorType"], body["error"]));
    }
    match body["data"]["resultType"].as_str() {
        Some("scalar" | "string") => Ok(vec![body["data"]["result"].clone()]),
        _ => Ok(body["data"]["result"].as_array().cloned().unwrap_or_default()),
    }
}

/// What Grafana would send: its interval variables at values that suit a 1 s scrape, and every
/// template variable (`$node`, `${node}`, `${node:regex}`) at "All".
fn substitute(expr: &str) -> String {
    let mut out = String::new();
    let mut rest = expr;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        let (name, len) = match after.strip_prefix('{') {
            Some(b) => {
                let end = b.find('}').unwrap_or_else(|| panic!("unclosed ${{ in {expr}"));
                (b[..end].split(':').next().unwrap_or_default(), end + 2)
            }
            None => {
                let end =
                    after.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(after.len());
                (&after[..end], end)
            }
        };
        out.push_str(match name {
            "" => "$", // a regex anchor, not a variable
            "__rate_interval" => "30s",
            "__interval" => "5s",
            "__range" => "5m",
            _ => ".*",
        });
        rest = &after[len..];
    }
    out.push_str(rest);
    out
}

/// The dashboard's queries as (where, PromQL): every panel target, and every query variable
/// (`label_values(EXPR, LABEL)` asked as `count by (LABEL) (EXPR)`).
fn queries(d: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for v in d["templating"]["list"].as_array().into_iter().flatten().filter(|v| v["type"] == "query") {
        let q = v["query"].as_str().unwrap_or_default();
        let (expr, label) = q
            .strip_prefix("label_values(")
            .and_then(|q| q.strip_suffix(')')?.rsplit_once(','))
            .unwrap_or_else(|| {
                panic!("variable {}: only label_values(EXPR, LABEL) is checked: {q}", v["name"])
            });
        out.push((
            format!("variable ${}", v["name"].as_str().unwrap_or_default()),
            format!("count by ({label}) ({expr})"),
        ));
    }
    for p in panels(d) {
        for t in p["targets"].as_array().into_iter().flatten() {
            out.push((
                format!("panel {:?}", p["title"].as_str().unwrap_or_default()),
                t["expr"].as_str().unwrap_or_default().to_string(),
            ));
        }
    }
    out
}

/// Every problem of a dashboard's queries on a live Prometheus. A wrong metric or label name
/// is no PromQL error, it just selects nothing: so every query must return a series.
fn check_dashboard(prom: &str, d: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    for (at, expr) in queries(d) {
        match query(prom, &substitute(&expr)) {
            Err(e) => problems.push(format!("{at}: `{expr}`: {e}")),
            Ok(series) if series.is_empty() => problems.push(format!("{at}: `{expr}` returned no series")),
            Ok(_) => {}
        }
    }
    problems
}

/// Rule expressions: none may fail; recording rules feed the dashboards, so they must also
/// return series (an alert's expression is empty while it does not fire).
fn check_rules(prom: &str) -> Vec<String> {
    let rules: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(dir("prometheus").join("rules.yml")).unwrap()).unwrap();
    let mut problems = Vec::new();
    for rule in rules["groups"].as_sequence().unwrap().iter().flat_map(|g| g["rules"].as_sequence().unwrap())
    {
        let expr = rule["expr"].as_str().unwrap();
        let name = rule["record"].as_str().or(rule["alert"].as_str()).unwrap();
        match query(prom, expr) {
            Err(e) => problems.push(format!("rule {name}: {e}")),
            Ok(s) if s.is_empty() && rule["record"].is_string() => {
                problems.push(format!("recording rule {name}: `{expr}` returned no series"))
            }
            Ok(_) => {}
        }
    }
    problems
}

/// Whether `done` came true within `limit`.
fn wait_for(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while !done() {
        if start.elapsed() > limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    true
}

#[test]
fn every_panel_and_rule_query_answers_from_a_real_node_and_a_real_run() {
    let started = Instant::now();
    for bin in [PROMETHEUS, PUSHGATEWAY] {
        tool(bin);
    }
    let agent_bin = Path::new(env!("CARGO_BIN_EXE_archy-chaos")).with_file_name("archy-agent");
    assert!(agent_bin.is_file(), "{} missing: cargo build -p archy-agent first", agent_bin.display());
    let tmp = tempfile::tempdir().unwrap();

    // A node whose agent Prometheus scrapes, as on a real host.
    let node = Node("tdash");
    ok(&["node", "up", node.0, "--netns"]);
    let status: Value = serde_json::from_str(&ok(&["node", "status", node.0])).unwrap();
    let agent = status["agent"].as_str().expect("node status names the agent's address").to_string();

    let (pg_port, prom_port) = (free_port(), free_port());
    let pg = format!("http://127.0.0.1:{pg_port}");
    let prom = format!("http://127.0.0.1:{prom_port}");
    let _pushgateway = Daemon::start(
        tool(PUSHGATEWAY).arg(format!("--web.listen-address=127.0.0.1:{pg_port}")),
        tmp.path().join("pushgateway.log"),
    );
    // The repository's example config, pointed at this node and gateway: its job names are
    // the ones the rules and dashboards expect.
    let mut config: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(dir("prometheus").join("prometheus.yml")).unwrap())
            .unwrap();
    for key in ["scrape_interval", "scrape_timeout", "evaluation_interval"] {
        config["global"][key] = "1s".into();
    }
    config["rule_files"] = vec![dir("prometheus").join("rules.yml").display().to_string()].into();
    for job in config["scrape_configs"].as_sequence_mut().unwrap() {
        let target = match job["job_name"].as_str() {
            Some("archy-agent") => agent.clone(),
            Some("pushgateway") => format!("127.0.0.1:{pg_port}"),
            other => panic!("unexpected job {other:?} in the example config"),
        };
        job["static_configs"] = serde_yaml::from_str(&format!("[{{targets: ['{target}']}}]")).unwrap();
    }
    let config_path = tmp.path().join("prometheus.yml");
    std::fs::write(&config_path, serde_yaml::to_string(&config).unwrap()).unwrap();
    let prometheus = Daemon::start(
        tool(PROMETHEUS).args([
            format!("--config.file={}", config_path.display()),
            format!("--storage.tsdb.path={}", tmp.path().join("tsdb").display()),
            format!("--web.listen-address=127.0.0.1:{prom_port}"),
        ]),
        tmp.path().join("prometheus.log"),
    );
    let both_up = || {
        query(&prom, "up == 1").is_ok_and(|s| {
            ["archy-agent", "pushgateway"].iter().all(|j| s.iter().any(|x| x["metric"]["job"] == *j))
        })
    };
    assert!(wait_for(Duration::from_secs(30), both_up), "targets not up after 30 s:\n{}", prometheus.log());

    // An install (install latency, calls, actions), then a crash nobody asked for: the
    // restart series only exists once a restart happened.
    ok(&["node", "rpc", node.0, "package.install", r#"{"id":"fx-web"}"#]);
    let fx_web_up = || {
        let (_, out, _) = chaos(&["node", "rpc", node.0, "package.list"]);
        serde_json::from_str::<Value>(&out)
            .is_ok_and(|l| l.as_array().into_iter().flatten().any(|a| a["id"] == "fx-web" && a["up"] == true))
    };
    assert!(wait_for(Duration::from_secs(60), fx_web_up), "fx-web not up after 60 s");
    // A crash nobody asked for: systemd brings fx-web back while the agent ticks all along;
    // the restart counts exactly once. (The new container is healthy within a second here;
    // a restart first seen during a health probe is `reconcile.rs`'s regression test.)
    ok(&["node", "rpc", node.0, "node.reconcile"]);
    let fx_web = || {
        ok(&[
            "node",
            "exec",
            node.0,
            "podman",
            "ps",
            "--filter",
            "name=archy-fx-web",
            "--format",
            "{{.ID}} {{.Status}}",
        ])
    };
    let metrics = format!("http://{agent}/metrics");
    let restarts = || {
        get(&metrics).and_then(|m| {
            m.lines().find_map(|l| {
                l.strip_prefix("archy_agent_app_restarts_total{app=\"fx-web\"} ")?.parse::<f64>().ok()
            })
        })
    };
    assert_eq!(restarts(), Some(0.0), "the series exists from install on, at 0");
    let before = fx_web();
    ok(&["node", "kill-container", node.0, "fx-web"]);
    let back = wait_for(Duration::from_secs(30), || {
        ok(&["node", "rpc", node.0, "node.reconcile"]);
        let now = fx_web();
        now.contains("(healthy)") && now.split_whitespace().next() != before.split_whitespace().next()
    });
    assert!(back, "fx-web not back and healthy 30 s after the kill:\n{}", fx_web());
    ok(&["node", "rpc", node.0, "node.reconcile"]);
    assert_eq!(restarts(), Some(1.0), "fx-web's restart counted once");

    // A real run pushes its results; the gate pushes them again with its decision. An empty
    // baseline judges the run's verdict alone. lifecycle-matrix runs per app: its scorecard.
    let reports = tmp.path().join("reports");
    let out = chaos_cmd(&[
        "run",
        "agent-startup",
        "lifecycle-matrix",
        "--apps",
        "fx-web",
        "--iterations",
        "1",
        "--pushgateway",
        &pg,
        "--report-dir",
        reports.to_str().unwrap(),
    ])
    .output()
    .unwrap();
    let log = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(matches!(out.status.code(), Some(0..=2)), "archy-chaos run: {:?}\n{log}", out.status);
    let pushed = get(&format!("{pg}/metrics")).unwrap_or_default();
    assert!(pushed.contains("archy_chaos_run_pass{"), "the run pushed nothing:\n{log}");
    assert!(pushed.contains("archy_chaos_scorecard_ok{"), "the run pushed no scorecard:\n{log}");
    let report = std::fs::read_dir(&reports)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "json"));
    let report = report.unwrap_or_else(|| panic!("no report in {}:\n{log}", reports.display()));
    let baseline = tmp.path().join("baseline.json");
    std::fs::write(&baseline, r#"{"schema": 1, "kpis": {}}"#).unwrap();
    let gate = chaos_cmd(&[
        "gate",
        report.to_str().unwrap(),
        "--baseline",
        baseline.to_str().unwrap(),
        "--pushgateway",
        &pg,
    ])
    .stdout(Stdio::null())
    .status()
    .unwrap();
    assert!(matches!(gate.code(), Some(0..=2)), "archy-chaos gate: {gate:?}");

    // Rates need two scrapes and rules an evaluation: ask until everything answers.
    let problems = || {
        let mut p = check_rules(&prom);
        for (file, _) in DASHBOARDS {
            p.extend(check_dashboard(&prom, &dashboard(file)).into_iter().map(|x| format!("{file}: {x}")));
        }
        p
    };
    let start = Instant::now();
    let mut left = problems();
    while !left.is_empty() && start.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_secs(1));
        left = problems();
    }
    assert!(
        left.is_empty(),
        "queries that do not answer:\n{}\n\nprometheus:\n{}",
        left.join("\n"),
        prometheus.log()
    );

    // The checker catches a wrong metric name: a copy with one query's metric misspelt.
    let mut wrong = dashboard("agent-kpis.json");
    let expr = panels(&wrong)
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap())
        .map(|t| t["expr"].as_str().unwrap().to_string())
        .find(|e| e.contains("archy_agent_exec_calls_total"))
        .expect("a panel reads archy_agent_exec_calls_total");
    let json = serde_json::to_string(&wrong).unwrap().replacen(
        &serde_json::to_string(&expr).unwrap(),
        &serde_json::to_string(
            &expr.replace("archy_agent_exec_calls_total", "archy_agent_no_such_metric_total"),
        )
        .unwrap(),
        1,
    );
    wrong = serde_json::from_str(&json).unwrap();
    let found = check_dashboard(&prom, &wrong);
    assert!(
        found.len() == 1
            && found[0].contains("archy_agent_no_such_metric_total")
            && found[0].contains("no series"),
        "{found:?}"
    );
    eprintln!("dashboards checked end to end in {:?}", started.elapsed());
}
