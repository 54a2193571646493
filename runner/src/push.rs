//! Pushes a run report to a Prometheus Pushgateway, so that dashboards and alerts see every
//! run (and the gate's decision) without scraping the runner.

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use base64::Engine as _;

use crate::report::{NodeReport, Report, Verdict};

/// PUTs each node's `exposition` to `{url}/metrics/job/archy_chaos/node/{node}`, every node
/// tried even when one fails. PUT replaces the node's whole group, so series of an earlier
/// run never linger.
pub fn push(url: &str, report: &Report, gate_pass: Option<bool>) -> Result<()> {
    ensure!(!report.nodes.is_empty(), "the report has no node to push");
    let failed: Vec<String> = report
        .nodes
        .iter()
        .filter_map(|n| push_node(url, report, n, gate_pass).err())
        .map(|e| format!("{e:#}"))
        .collect();
    if !failed.is_empty() {
        bail!("{}", failed.join("; "));
    }
    Ok(())
}

fn push_node(url: &str, report: &Report, node: &NodeReport, gate_pass: Option<bool>) -> Result<()> {
    // The node (`local:run1234`, `ssh://…`) may hold `/`; the Pushgateway's base64 label
    // form carries any value. An empty value is spelled `=`.
    let group = match base64::engine::general_purpose::URL_SAFE.encode(&node.node) {
        s if s.is_empty() => "=".to_string(),
        s => s,
    };
    let target = format!("{}/metrics/job/archy_chaos/node@base64/{group}", url.trim_end_matches('/'));
    let http = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .new_agent();
    let mut resp = http
        .put(&target)
        .header("Content-Type", "text/plain; version=0.0.4")
        .send(exposition(report, node, gate_pass))
        .with_context(|| format!("pushing to {target}"))?;
    if !resp.status().is_success() {
        let body = resp.body_mut().read_to_string().unwrap_or_default();
        bail!("pushing to {target}: HTTP {}: {}", resp.status(), body.trim());
    }
    Ok(())
}

/// One node's part of a report in the Prometheus text exposition format (0.0.4), every
/// series a gauge. A KPI's p50/p95/p99/max is the label `stat`: `quantile` is reserved for
/// summaries (promtool).
pub fn exposition(report: &Report, node: &NodeReport, gate_pass: Option<bool>) -> String {
    let mut out = String::new();
    let mut family = |name: &str, help: &str, samples: &[(Vec<(&str, String)>, f64)]| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for (labels, value) in samples {
            let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{}\"", escape(v))).collect();
            let labels = if labels.is_empty() { String::new() } else { format!("{{{}}}", labels.join(",")) };
            let _ = writeln!(out, "{name}{labels} {}", number(*value));
        }
    };
    let flag = |b: bool| if b { 1.0 } else { 0.0 };

    family(
        "archy_chaos_run_pass",
        "1 if the run's verdict on this node is pass.",
        &[(vec![], flag(node.verdict == Verdict::Pass))],
    );
    if let Some(pass) = gate_pass {
        family(
            "archy_chaos_gate_pass",
            "1 if archy-chaos gate passed the run (verdict and baseline comparison).",
            &[(vec![], flag(pass))],
        );
    }
    family(
        "archy_chaos_run_timestamp_seconds",
        "When the run started (Unix time).",
        &[(vec![], report.started_unix as f64)],
    );
    family(
        "archy_chaos_run_duration_seconds",
        "How long the run took.",
        &[(vec![], report.duration_seconds)],
    );

    let mut pass = Vec::new();
    let mut iterations = Vec::new();
    let mut kpis = Vec::new();
    let mut thresholds = Vec::new();
    let (mut cells_ok, mut cells_runs) = (Vec::new(), Vec::new());
    for s in &node.scenarios {
        // `cold-install@podman` beside `cold-install`: one series per scenario and backend.
        let scenario = s.label();
        let id = || vec![("scenario", scenario.clone()), ("layer", format!("{:?}", s.layer))];
        pass.push((id(), flag(s.verdict == Verdict::Pass)));
        // Every result is exported, at 0 too, so a rate or an alert never sees a gap.
        for result in [Verdict::Pass, Verdict::Fail, Verdict::Unknown] {
            let n = s.iterations.iter().filter(|i| i.verdict == result).count();
            let mut labels = id();
            labels.push(("result", result.name().to_string()));
            iterations.push((labels, n as f64));
        }
        for k in &s.kpis {
            let kpi = || vec![("scenario", scenario.clone()), ("kpi", k.name.clone())];
            for (q, v) in [("p50", k.p50), ("p95", k.p95), ("p99", k.p99), ("max", k.max)] {
                if let Some(v) = v {
                    let mut labels = kpi();
                    labels.extend([("unit", k.unit.clone()), ("stat", q.to_string())]);
                    kpis.push((labels, v));
                }
            }
            for t in &k.thresholds {
                let mut labels = kpi();
                labels.push(("stat", t.quantile.name().to_string()));
                thresholds.push((labels, t.max));
            }
        }
        // n/a cells are left out: a panel counts full cells of those that apply.
        if let Some(card) = crate::report::scorecard::scorecard(&s.iterations) {
            for (app, cells) in &card.rows {
                for (state, cell) in card.states.iter().zip(cells) {
                    if let crate::report::scorecard::Cell::Runs { ok, of } = *cell {
                        let labels = || {
                            vec![
                                ("scenario", scenario.clone()),
                                ("app", app.clone()),
                                ("state", state.clone()),
                            ]
                        };
                        cells_ok.push((labels(), ok as f64));
                        cells_runs.push((labels(), of as f64));
                    }
                }
            }
        }
    }
    family("archy_chaos_scenario_pass", "1 if the scenario's verdict is pass.", &pass);
    family("archy_chaos_scenario_iterations", "Iterations of the scenario by result.", &iterations);
    family("archy_chaos_kpi", "A KPI's quantile over the run's samples, in its unit.", &kpis);
    family(
        "archy_chaos_kpi_threshold",
        "The most a KPI's quantile may be for the scenario to pass.",
        &thresholds,
    );
    if !cells_runs.is_empty() {
        family(
            "archy_chaos_scorecard_runs",
            "Scorecard cell: the app's iterations that should have reached the state (n/a cells absent).",
            &cells_runs,
        );
        family(
            "archy_chaos_scorecard_ok",
            "Scorecard cell: the iterations that reached the state and held it.",
            &cells_ok,
        );
    }
    out
}

/// Label value escaping of the text format: backslash, double quote and line feed.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Rust spells infinity `inf`; the text format wants `+Inf`.
fn number(v: f64) -> String {
    if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.to_string()
    } else {
        v.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each node of the gate's fixture, as promtool reads it.
    #[test]
    fn the_exposition_passes_promtool() {
        use std::io::Write as _;
        use std::process::{Command, Stdio};
        const PROMTOOL: &str = "/usr/bin/promtool";
        let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gate-run.json");
        let report = crate::report::load(&fixture).unwrap();
        let text = exposition(&report, &report.nodes[0], Some(true));
        let mut child = Command::new(PROMTOOL)
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{PROMTOOL}: {e}: run scripts/setup-host"));
        child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
            "promtool check metrics: {}\n{}{}\n--- exposition\n{text}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // Every result is present, at 0 too.
        assert!(text.contains(
            "archy_chaos_scenario_iterations{scenario=\"cold-install\",layer=\"L6\",result=\"unknown\"} 0\n"
        ));
    }

    #[test]
    fn labels_are_escaped_and_numbers_spelled_for_prometheus() {
        assert_eq!(escape("a\\b\"c\nd"), "a\\\\b\\\"c\\nd");
        assert_eq!(number(f64::INFINITY), "+Inf");
        assert_eq!(number(0.5), "0.5");
    }
}
