//! Pushes a run report to a Prometheus Pushgateway, so that dashboards and alerts see every
//! run (and the gate's decision) without scraping the runner.

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use base64::Engine as _;
use serde_json::Value;

/// PUTs `exposition(report, gate_pass)` to `{url}/metrics/job/archy_chaos/node/{node}`.
/// PUT replaces the node's whole group, so series of an earlier run never linger.
pub fn push(url: &str, report: &Value, gate_pass: Option<bool>) -> Result<()> {
    let node = report["node"].as_str().context("the report names no node")?;
    // The node (`local:run1234`, `ssh://…`) may hold `/`; the Pushgateway's base64 label
    // form carries any value. An empty value is spelled `=`.
    let node = match base64::engine::general_purpose::URL_SAFE.encode(node) {
        s if s.is_empty() => "=".to_string(),
        s => s,
    };
    let target = format!("{}/metrics/job/archy_chaos/node@base64/{node}", url.trim_end_matches('/'));
    let http = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .new_agent();
    let mut resp = http
        .put(&target)
        .header("Content-Type", "text/plain; version=0.0.4")
        .send(exposition(report, gate_pass))
        .with_context(|| format!("pushing to {target}"))?;
    if !resp.status().is_success() {
        let body = resp.body_mut().read_to_string().unwrap_or_default();
        bail!("pushing to {target}: HTTP {}: {}", resp.status(), body.trim());
    }
    Ok(())
}

/// The report in the Prometheus text exposition format (0.0.4), every series a gauge. A
/// KPI's p50/p95/p99/max is the label `stat`: `quantile` is reserved for summaries (promtool).
pub fn exposition(report: &Value, gate_pass: Option<bool>) -> String {
    let mut out = String::new();
    let mut family = |name: &str, help: &str, samples: &[(Vec<(&str, String)>, f64)]| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for (labels, value) in samples {
            let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{}\"", escape(v))).collect();
            let labels = if labels.is_empty() { String::new() } else { format!("{{{}}}", labels.join(",")) };
            let _ = writeln!(out, "{name}{labels} {}", number(*value));
        }
    };
    let str_of = |v: &Value| v.as_str().unwrap_or_default().to_string();
    let flag = |b: bool| if b { 1.0 } else { 0.0 };
    let scenarios = report["scenarios"].as_array().map(Vec::as_slice).unwrap_or_default();

    family(
        "archy_chaos_run_pass",
        "1 if the run's verdict is pass.",
        &[(vec![], flag(report["verdict"] == "pass"))],
    );
    if let Some(pass) = gate_pass {
        family(
            "archy_chaos_gate_pass",
            "1 if archy-chaos gate passed the run (verdict and baseline comparison).",
            &[(vec![], flag(pass))],
        );
    }
    if let Some(t) = report["started_unix"].as_f64() {
        family("archy_chaos_run_timestamp_seconds", "When the run started (Unix time).", &[(vec![], t)]);
    }
    if let Some(d) = report["duration_seconds"].as_f64() {
        family("archy_chaos_run_duration_seconds", "How long the run took.", &[(vec![], d)]);
    }

    let mut pass = Vec::new();
    let mut iterations = Vec::new();
    let mut kpis = Vec::new();
    let mut thresholds = Vec::new();
    for s in scenarios {
        let (scenario, layer) = (str_of(&s["scenario"]), str_of(&s["layer"]));
        let id = || vec![("scenario", scenario.clone()), ("layer", layer.clone())];
        pass.push((id(), flag(s["verdict"] == "pass")));
        // Every result is exported, at 0 too, so a rate or an alert never sees a gap.
        for result in ["pass", "fail", "unknown"] {
            let its = s["iterations"].as_array().map(Vec::as_slice).unwrap_or_default();
            let n = its.iter().filter(|i| i["verdict"] == result).count();
            let mut labels = id();
            labels.push(("result", result.to_string()));
            iterations.push((labels, n as f64));
        }
        for k in s["kpis"].as_array().into_iter().flatten() {
            let kpi = || vec![("scenario", scenario.clone()), ("kpi", str_of(&k["name"]))];
            for q in ["p50", "p95", "p99", "max"] {
                if let Some(v) = k[q].as_f64() {
                    let mut labels = kpi();
                    labels.extend([("unit", str_of(&k["unit"])), ("stat", q.to_string())]);
                    kpis.push((labels, v));
                }
            }
            for t in k["thresholds"].as_array().into_iter().flatten() {
                if let Some(max) = t["max"].as_f64() {
                    let mut labels = kpi();
                    labels.push(("stat", str_of(&t["quantile"])));
                    thresholds.push((labels, max));
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

    #[test]
    fn labels_are_escaped_and_numbers_spelled_for_prometheus() {
        assert_eq!(escape("a\\b\"c\nd"), "a\\\\b\\\"c\\nd");
        assert_eq!(number(f64::INFINITY), "+Inf");
        assert_eq!(number(0.5), "0.5");
    }
}
