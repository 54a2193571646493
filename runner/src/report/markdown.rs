//! A run report in Markdown (CommonMark with GFM tables) for people: per node, a scorecard,
//! KPIs against their thresholds, and every iteration that did not pass with its evidence.

use std::collections::{BTreeMap, BTreeSet};

use super::model::{ExploreReport, Iteration, NodeReport, Report, ScenarioReport, Verdict};
use crate::scenario::history::Outcome;

pub fn render(r: &Report) -> String {
    let mut out = format!("# archy-chaos run — {}\n\n| | |\n|---|---|\n", upper(r.verdict));
    // A single node reads as a run on that node; several get a section each.
    let single = match &r.nodes[..] {
        [node] => Some(node),
        _ => None,
    };
    if let Some(n) = single {
        out.push_str(&format!("| node | {} ({}) |\n", cell(&n.node), cell(&n.backend)));
    }
    out.push_str(&format!(
        "| seed | {} |\n| replay | `{}` |\n| duration | {:.0} s |\n",
        r.seed,
        cell(&r.replay),
        r.duration_seconds
    ));
    match single {
        Some(n) => out.push_str(&format!("| environment | {} |\n\n{}", environment(n), node_body(n, 2))),
        None => {
            out.push_str("\n| node | backend | scenarios passed | verdict |\n|---|---|---|---|\n");
            for n in &r.nodes {
                let passed = n.scenarios.iter().filter(|s| s.verdict == Verdict::Pass).count();
                out.push_str(&format!(
                    "| {} | {} | {passed}/{} | {} |\n",
                    cell(&n.node),
                    cell(&n.backend),
                    n.scenarios.len(),
                    n.verdict.name()
                ));
            }
            for n in &r.nodes {
                out.push_str(&format!(
                    "\n## node {} — {}\n\n| | |\n|---|---|\n| backend | {} |\n| environment | {} |\n\n{}",
                    n.node,
                    upper(n.verdict),
                    cell(&n.backend),
                    environment(n),
                    node_body(n, 3)
                ));
            }
        }
    }
    if let Some(x) = &r.explore {
        out.push_str(&explore(x));
    }
    out.push_str(&format!("\n{}\n", r.nondeterminism));
    out
}

/// What `archy-chaos explore` prints at the end: the verdict, the history's size and outcomes,
/// and what was found.
pub fn explore_summary(r: &Report) -> String {
    let mut out = format!("archy-chaos explore — {}\n", upper(r.verdict));
    if let Some(x) = &r.explore {
        out.push_str(&explore(x));
    }
    out
}

fn explore(x: &ExploreReport) -> String {
    let count = |o: Outcome| x.history.iter().filter(|e| e.outcome == o).count();
    let mut out = format!(
        "\n## Exploration\n\n| | |\n|---|---|\n| seed | {} |\n| steps | {} run of {} generated, {} clients |\n| faults | {} |\n| outcomes | {} ok, {} fail, {} indeterminate |\n",
        x.seed,
        x.steps_run,
        x.ops,
        x.clients,
        cell(&x.faults.join(", ")),
        count(Outcome::Ok),
        count(Outcome::Fail),
        count(Outcome::Indeterminate),
    );
    match &x.found {
        None => out.push_str("| found | nothing |\n"),
        Some(f) => {
            out.push_str(&format!(
                "| found | {} |\n| after | {} steps |\n| reproduced one step at a time | {} |\n",
                cell(&f.failure),
                f.steps,
                f.reproduced
            ));
            if let Some(s) = &f.shrunk {
                out.push_str(&format!(
                    "| shrunk | {} → {} steps in {} replays, {:.0} s{} |\n",
                    s.original_len,
                    s.minimal_len,
                    s.replays,
                    s.seconds,
                    if s.budget_exhausted { " (budget spent)" } else { "" }
                ));
            }
            if let Some(p) = &f.scenario {
                out.push_str(&format!("| scenario | `{}` |\n", cell(p)));
            }
        }
    }
    out.push_str(&timeline(x));
    out
}

/// The history as a Mermaid Gantt chart: a lane per client, a bar per step (seconds).
fn timeline(x: &ExploreReport) -> String {
    let mut out = String::from(
        "\n```mermaid\ngantt\n  title history (s since start)\n  dateFormat X\n  axisFormat %S\n",
    );
    let clients: BTreeSet<usize> = x.history.iter().map(|e| e.client).collect();
    for c in clients {
        out.push_str(&format!("  section client {c}\n"));
        for e in x.history.iter().filter(|e| e.client == c) {
            let tag = match e.outcome {
                Outcome::Ok if e.step.is_fault() => "crit, ",
                Outcome::Ok => "",
                Outcome::Fail => "done, ",
                Outcome::Indeterminate => "active, ",
            };
            let name = match &e.step {
                crate::scenario::Step::Op { op, app } => {
                    format!("{} {}", op.name(), app.as_deref().unwrap_or(""))
                }
                crate::scenario::Step::Catalog { change, app } => format!("catalog {change:?} {app}"),
                s => s.name(),
            };
            // Mermaid's X format counts whole seconds; a bar is at least one long.
            let (a, b) =
                (e.invoked.floor() as u64, (e.completed.ceil() as u64).max(e.invoked.floor() as u64 + 1));
            out.push_str(&format!("  {} :{tag}{a}, {b}\n", name.replace([':', '#', ';'], " ")));
        }
    }
    out.push_str("```\n");
    out
}

/// A node's scenario table and scenario sections, the latter headed at `level`.
fn node_body(n: &NodeReport, level: usize) -> String {
    let mut out = String::from("| scenario | layer | iterations passed | verdict |\n|---|---|---|---|\n");
    for sc in &n.scenarios {
        let passed = sc.iterations.iter().filter(|i| i.verdict == Verdict::Pass).count();
        out.push_str(&format!(
            "| {} | {:?} | {passed}/{} | {} |\n",
            sc.label(),
            sc.layer,
            sc.iterations.len(),
            sc.verdict.name()
        ));
    }
    for sc in &n.scenarios {
        out.push_str(&scenario(sc, level));
    }
    out
}

/// One scenario's section: scorecard, KPIs against their thresholds, iterations, and every
/// iteration that did not pass with its steps and evidence.
fn scenario(sc: &ScenarioReport, level: usize) -> String {
    let h = "#".repeat(level);
    let mut out =
        format!("\n{h} {} ({:?}) — {}\n\n{}\n\n", sc.label(), sc.layer, upper(sc.verdict), sc.description);
    out.push_str(&scorecard(&sc.iterations, &h));
    if !sc.kpis.is_empty() {
        out.push_str("| KPI | n | p50 | p95 | p99 | max | threshold |\n|---|---|---|---|---|---|---|\n");
        for k in &sc.kpis {
            let limits: Vec<String> = k
                .thresholds
                .iter()
                .map(|t| {
                    format!("{} <= {}: {}", t.quantile.name(), num(Some(t.max), &k.unit), upper(t.verdict))
                })
                .collect();
            out.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} |\n",
                k.name,
                k.count,
                num(k.p50, &k.unit),
                num(k.p95, &k.unit),
                num(k.p99, &k.unit),
                num(k.max, &k.unit),
                if limits.is_empty() { "-".into() } else { limits.join(", ") }
            ));
        }
        out.push('\n');
    }
    out.push_str("| iteration | verdict | recovery |\n|---|---|---|\n");
    for it in &sc.iterations {
        let recovery = it
            .measures
            .get("recovery_seconds")
            .and_then(|r| r.first())
            .map_or("-".into(), |r| format!("{r:.2} s"));
        out.push_str(&format!("| {} | {} | {recovery} |\n", it.n, it.verdict.name()));
    }
    out.push_str(&fault_kinds(&sc.iterations));
    for it in sc.iterations.iter().filter(|i| i.verdict != Verdict::Pass) {
        out.push_str(&format!("\n{h}# {} iteration {}: {}\n\n", sc.label(), it.n, it.verdict.name()));
        for why in it.failures.iter().chain(&it.unknowns) {
            out.push_str(&format!("- {why}\n"));
        }
        out.push_str("\nSteps and evidence:\n\n");
        for step in &it.steps {
            let seen = match (&step.evidence, &step.error) {
                (_, Some(e)) => serde_json::to_string(e),
                (Some(e), None) => serde_json::to_string(e),
                (None, None) => Ok("null".into()),
            };
            out.push_str(&format!("- `{}`: {}\n", step.step, seen.unwrap_or_default()));
        }
        if !it.log.is_empty() {
            // Longer than any backtick run in the log, so the log cannot close it.
            let longest = it.log.split(|c| c != '`').map(str::len).max().unwrap_or(0);
            let fence = "`".repeat(longest.max(2) + 1);
            out.push_str(&format!("\nNode log (last lines):\n\n{fence}\n{}\n{fence}\n", it.log));
        }
    }
    out
}

/// How its faults ran, where their evidence says (`kind`: e.g. the kernel's OOM kill or the
/// SIGKILL standing in for it, and why), also when every iteration passed: a stand-in proves
/// less than the real fault, and the reader must see which one the verdict is about.
fn fault_kinds(iterations: &[Iteration]) -> String {
    let mut seen: BTreeMap<(String, String), (usize, BTreeSet<String>)> = BTreeMap::new();
    for step in iterations.iter().flat_map(|i| &i.steps) {
        let Some(details) = step.evidence.as_ref().map(|e| &e.details) else { continue };
        let Some(kind) = details.get("kind").and_then(|k| k.as_str()) else { continue };
        let e = seen.entry((step.kind().unwrap_or_default().to_string(), kind.to_string())).or_default();
        e.0 += 1;
        e.1.extend(details.get("why_no_kernel_oom").and_then(|w| w.as_str()).map(str::to_string));
    }
    if seen.is_empty() {
        return String::new();
    }
    let parts: Vec<String> = seen
        .iter()
        .map(|((step, kind), (n, why))| {
            let why: Vec<&str> = why.iter().map(String::as_str).collect();
            match why.is_empty() {
                true => format!("`{step}` ran as {kind} x{n}"),
                false => format!("`{step}` ran as {kind} x{n} ({})", cell(&why.join("; "))),
            }
        })
        .collect();
    format!("\nFaults as they ran: {}.\n", parts.join(", "))
}

/// Apps x states (`scorecard`), empty unless the scenario ran per app.
fn scorecard(iterations: &[Iteration], h: &str) -> String {
    let Some(card) = super::scorecard::scorecard(iterations) else { return String::new() };
    let mut out = format!(
        "{h} Scorecard\n\n| app | {} |\n|---|{}\n",
        card.states.join(" | "),
        "---|".repeat(card.states.len())
    );
    for (app, cells) in &card.rows {
        let cells: Vec<String> = cells.iter().map(ToString::to_string).collect();
        out.push_str(&format!("| {app} | {} |\n", cells.join(" | ")));
    }
    let (full, of) = card.full();
    out.push_str(&format!("\n{full}/{of} cells full (n/a cells not counted).\n\n"));
    out
}

fn environment(n: &NodeReport) -> String {
    n.environment.as_ref().and_then(|e| serde_json::to_string(e).ok()).map_or("-".into(), |e| cell(&e))
}

fn num(v: Option<f64>, unit: &str) -> String {
    match (v, unit) {
        (None, _) => "-".to_string(),
        (Some(x), "s") => format!("{:.1} ms", x * 1e3),
        (Some(x), "ratio") => format!("{x:.2}x"),
        (Some(x), _) => format!("{x:.0}"),
    }
}

fn upper(v: Verdict) -> String {
    v.name().to_uppercase()
}

/// Text from outside (a command, a node's address) inside a table cell: a pipe would end it.
fn cell(text: &str) -> String {
    text.replace('|', "\\|").replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::evidence::Evidence;
    use crate::scenario::engine::StepRecord;

    fn iteration(n: u32, evidence: Evidence) -> Iteration {
        Iteration {
            n,
            apps: vec!["fx-web".into()],
            per_app: false,
            verdict: Verdict::Pass,
            steps: vec![
                StepRecord { step: "install".into(), seconds: None, evidence: None, error: None },
                StepRecord {
                    step: serde_json::json!({"oom": {"app": "fx-web"}}),
                    seconds: Some(0.3),
                    evidence: Some(evidence),
                    error: None,
                },
            ],
            failures: vec![],
            unknowns: vec![],
            measures: BTreeMap::new(),
            log: String::new(),
            seconds: 0.0,
        }
    }

    #[test]
    fn passing_iterations_still_say_how_their_faults_ran() {
        let kernel = Evidence::default().with("kind", "kernel-oom").effect(true);
        let stand_in = Evidence::default()
            .with("kind", "sigkill-stand-in")
            .with("why_no_kernel_oom", "no oom_kill command | configured");
        let its = [iteration(1, kernel.clone()), iteration(2, kernel), iteration(3, stand_in)];
        assert_eq!(
            fault_kinds(&its),
            "\nFaults as they ran: `oom` ran as kernel-oom x2, `oom` ran as sigkill-stand-in x1 (no oom_kill command \\| configured).\n"
        );
        // Faults whose evidence says nothing of their kind add nothing.
        assert_eq!(fault_kinds(&[iteration(1, Evidence::default())]), "");
    }
}
