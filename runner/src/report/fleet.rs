//! The fleet report (`fleet run`): every node's run report, worst node first; read back
//! and rendered as Markdown.

use std::path::{Path, PathBuf};

use anyhow::Result;
use serde::{Deserialize, Serialize};

use super::{Report, Verdict};

/// Version of the fleet report's JSON schema: 2 embeds run reports of schema 3.
pub const SCHEMA: u64 = 2;

/// The fleet report: every node's run, worst first.
#[derive(Debug, Serialize, Deserialize)]
pub struct FleetReport {
    pub schema: u64,
    /// Always `fleet`: tells `archy-chaos report` what it reads.
    pub kind: String,
    pub suite: String,
    pub seed: u64,
    pub verdict: Verdict,
    pub started_unix: u64,
    pub duration_seconds: f64,
    pub nodes: Vec<FleetEntry>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct FleetEntry {
    pub node: String,
    pub exit_code: u8,
    /// The run's, when it left a report.
    pub verdict: Option<Verdict>,
    pub report_dir: PathBuf,
    /// The node's run report, as its `archy-chaos run --json` printed it.
    pub report: Option<Report>,
    /// Why the run could not be started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A saved fleet report.
pub fn load(path: &Path) -> Result<FleetReport> {
    super::load_json(path, "fleet report", SCHEMA)
}

/// The fleet report in Markdown: a table of nodes worst first, then each node's run report
/// (its scorecards, KPIs and failures).
pub fn render(fleet: &FleetReport) -> String {
    let mut out = format!(
        "# archy-chaos fleet — {} — {}\n\nSeed {}, {:.0} s.\n\n| node | verdict | scenarios passed | failing |\n|---|---|---|---|\n",
        fleet.suite,
        fleet.verdict.name().to_uppercase(),
        fleet.seed,
        fleet.duration_seconds
    );
    for n in &fleet.nodes {
        let scenarios: Vec<_> = n.report.iter().flat_map(|r| &r.nodes).flat_map(|n| &n.scenarios).collect();
        let passed = scenarios.iter().filter(|sc| sc.verdict == Verdict::Pass).count();
        let failing: Vec<String> =
            scenarios.iter().filter(|sc| sc.verdict != Verdict::Pass).map(|sc| sc.label()).collect();
        let verdict = match &n.report {
            Some(r) => r.verdict.name(),
            None => "unknown (no report)",
        };
        out.push_str(&format!(
            "| {} | {verdict} | {passed}/{} | {} |\n",
            n.node,
            scenarios.len(),
            failing.join(", ")
        ));
    }
    for n in &fleet.nodes {
        out.push_str(&format!("\n---\n\n# node {}\n\n", n.node));
        match &n.report {
            Some(r) => out.push_str(&super::markdown::render(r).replacen("# ", "## ", 1)),
            None => out.push_str(&format!("No report: see {}/run.log\n", n.report_dir.display())),
        }
    }
    out
}
