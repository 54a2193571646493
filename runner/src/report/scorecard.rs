//! The platform's scorecard: apps x states, computed from the steps of a per-app scenario's
//! iterations (never kept by hand). The platform's ten states come first, in its order, then
//! any other state the scenario went through.

use std::collections::BTreeMap;

use crate::scenario::engine::StepRecord;
use crate::scenario::probe::NOT_APPLICABLE;

use super::Iteration;

/// The platform's states: the step that reaches each, and the column's name.
pub const PLATFORM: [(&str, &str); 10] = [
    ("container-present", "container present"),
    ("valid-state", "valid state"),
    ("rpc-reachable", "RPC reachable"),
    ("ui-reachable", "UI URL 200"),
    ("stop", "stop"),
    ("start", "start"),
    ("restart", "restart"),
    ("reinstall", "reinstall"),
    ("reboot", "reboot survives"),
    ("restart-agent", "agent-restart survives"),
];

/// One cell: the app's iterations that reached the state and held it, of all its iterations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cell {
    Runs {
        ok: u32,
        of: u32,
    },
    /// Every run found nothing to check: the manifest declares no such thing.
    NotApplicable,
}

impl Cell {
    pub fn full(self) -> bool {
        matches!(self, Cell::Runs { ok, of } if ok == of && of > 0)
    }
}

impl std::fmt::Display for Cell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Cell::NotApplicable => f.write_str("n/a"),
            Cell::Runs { ok, of } if ok == of && of > 0 => write!(f, "{ok}/{of} full"),
            Cell::Runs { ok: 0, of } => write!(f, "0/{of} missing"),
            Cell::Runs { ok, of } => write!(f, "{ok}/{of} partial"),
        }
    }
}

#[derive(Debug, Default, PartialEq)]
pub struct Scorecard {
    /// Column names: the platform's, then the scenario's other states.
    pub states: Vec<String>,
    /// Per app, a cell per state.
    pub rows: BTreeMap<String, Vec<Cell>>,
}

impl Scorecard {
    /// (full cells, applicable cells).
    pub fn full(&self) -> (usize, usize) {
        let cells = self.rows.values().flatten().filter(|c| **c != Cell::NotApplicable);
        cells.fold((0, 0), |(f, n), c| (f + c.full() as usize, n + 1))
    }
}

/// A wait after a state is how it is reached: its failure is the state's.
fn is_wait(kind: &str) -> bool {
    kind.starts_with("wait-") || kind == "snapshot-containers"
}

/// Per state of one iteration for one app, in order: held, failed, or n/a (`None`). A state
/// reached twice holds only if it held both times. An app that failed a step (the step's
/// error, or its `failed_apps`) reaches no later state.
fn states(steps: &[StepRecord], app: &str) -> Vec<(String, Option<bool>)> {
    let mut out: Vec<(String, Option<bool>)> = Vec::new();
    let mut last: Option<usize> = None;
    for step in steps {
        let Some(kind) = step.kind() else { continue };
        let failed =
            step.error.is_some() || step.evidence.as_ref().is_some_and(|e| e.failed_apps().contains_key(app));
        if is_wait(kind) {
            if let (true, Some(i)) = (failed, last) {
                out[i].1 = Some(false);
            }
        } else {
            let na = step
                .evidence
                .as_ref()
                .and_then(|e| e.details.get(app))
                .is_some_and(|e| e.get(NOT_APPLICABLE).is_some());
            let held = if na && !failed { None } else { Some(!failed) };
            let i = match out.iter().position(|(k, _)| k == kind) {
                Some(i) => {
                    out[i].1 = match (out[i].1, held) {
                        (None, None) => None,
                        (a, b) => Some(a.unwrap_or(true) && b.unwrap_or(true)),
                    };
                    i
                }
                None => {
                    out.push((kind.to_string(), held));
                    out.len() - 1
                }
            };
            last = Some(i);
        }
        if failed {
            break;
        }
    }
    out
}

/// The scorecard of a scenario's iterations; `None` unless it ran per app.
pub fn scorecard(iterations: &[Iteration]) -> Option<Scorecard> {
    let scored: Vec<&Iteration> = iterations.iter().filter(|it| it.per_app).collect();
    let mut names: Vec<String> = PLATFORM.iter().map(|(_, n)| n.to_string()).collect();
    let mut kinds: Vec<String> = PLATFORM.iter().map(|(k, _)| k.to_string()).collect();
    for step in scored.iter().flat_map(|it| &it.steps) {
        match step.kind() {
            Some(k) if !is_wait(k) && !kinds.iter().any(|x| x == k) => {
                kinds.push(k.to_string());
                names.push(k.to_string());
            }
            _ => {}
        }
    }
    // Per (app, state): (held, n/a runs); and each app's iterations.
    let mut counts: BTreeMap<&str, BTreeMap<String, (u32, u32)>> = BTreeMap::new();
    let mut runs: BTreeMap<&str, u32> = BTreeMap::new();
    for it in &scored {
        for app in &it.apps {
            *runs.entry(app).or_default() += 1;
            let row = counts.entry(app).or_default();
            for (kind, held) in states(&it.steps, app) {
                let cell = row.entry(kind).or_default();
                match held {
                    None => cell.1 += 1,
                    Some(ok) => cell.0 += ok as u32,
                }
            }
        }
    }
    if runs.is_empty() {
        return None;
    }
    let mut rows = BTreeMap::new();
    for (app, n) in runs {
        let row = &counts[app];
        let cells = kinds
            .iter()
            .map(|k| match row.get(k) {
                // Every run had nothing to check.
                Some((0, na)) if *na == n => Cell::NotApplicable,
                Some((ok, na)) => Cell::Runs { ok: *ok, of: n - na },
                // Never reached (or not a step of this scenario): missing, never full.
                None => Cell::Runs { ok: 0, of: n },
            })
            .collect();
        rows.insert(app.to_string(), cells);
    }
    Some(Scorecard { states: names, rows })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::evidence::{Evidence, FAILED_APPS};
    use crate::scenario::Verdict;
    use serde_json::json;

    fn step(kind: &str, evidence: Option<Evidence>, error: Option<&str>) -> StepRecord {
        StepRecord { step: json!(kind), seconds: None, evidence, error: error.map(str::to_string) }
    }

    fn ok(kind: &str) -> StepRecord {
        step(kind, Some(Evidence::default()), None)
    }

    fn iteration(steps: Vec<StepRecord>) -> Iteration {
        Iteration {
            n: 1,
            apps: vec!["a".into(), "b".into()],
            per_app: true,
            verdict: Verdict::Pass,
            steps,
            failures: vec![],
            unknowns: vec![],
            measures: Default::default(),
            log: String::new(),
            seconds: 0.0,
        }
    }

    fn cell(card: &Scorecard, app: &str, state: &str) -> Cell {
        let i = card.states.iter().position(|s| s == state).unwrap_or_else(|| panic!("no column {state}"));
        card.rows[app][i]
    }

    #[test]
    fn the_platforms_ten_columns_come_first_and_unreached_states_are_missing() {
        let card = scorecard(&[iteration(vec![ok("install"), ok("wait-converged"), ok("stop")])]).unwrap();
        assert_eq!(card.states[..10], PLATFORM.map(|(_, n)| n.to_string()));
        assert_eq!(card.states[10..], ["install".to_string()]);
        assert_eq!(cell(&card, "a", "stop"), Cell::Runs { ok: 1, of: 1 });
        assert_eq!(cell(&card, "a", "reboot survives").to_string(), "0/1 missing");
        assert_eq!(card.full(), (4, 22));
    }

    #[test]
    fn an_app_without_an_api_is_na_never_full() {
        let rpc = Evidence::of(json!({"a": {NOT_APPLICABLE: "no RPC"}, "b": {"url": "x"}}));
        let card = scorecard(&[iteration(vec![step("rpc-reachable", Some(rpc), None)])]).unwrap();
        assert_eq!(cell(&card, "a", "RPC reachable"), Cell::NotApplicable);
        assert_eq!(cell(&card, "a", "RPC reachable").to_string(), "n/a");
        assert!(!Cell::NotApplicable.full());
        assert_eq!(cell(&card, "b", "RPC reachable").to_string(), "1/1 full");
    }

    /// One app failing a step fails its own cells only: it leaves the iteration, the others
    /// go on (a wait's failure is the state's it waited for).
    #[test]
    fn an_app_that_fails_leaves_the_iteration_alone() {
        let failed = |app: &str| Evidence::default().with(FAILED_APPS, json!({app: "not settled"}));
        let good = iteration(vec![ok("start"), ok("wait-converged"), ok("restart"), ok("wait-converged")]);
        let bad = iteration(vec![
            ok("start"),
            step("wait-converged", Some(failed("b")), None),
            ok("restart"),
            ok("wait-converged"),
        ]);
        let card = scorecard(&[good, bad]).unwrap();
        assert_eq!(cell(&card, "a", "start").to_string(), "2/2 full");
        assert_eq!(cell(&card, "a", "restart").to_string(), "2/2 full");
        assert_eq!(cell(&card, "b", "start").to_string(), "1/2 partial");
        assert_eq!(cell(&card, "b", "restart").to_string(), "1/2 partial");
        // A step's own error is every app's.
        let card = scorecard(&[iteration(vec![step("reboot", None, Some("boot failed"))])]).unwrap();
        assert_eq!(cell(&card, "a", "reboot survives").to_string(), "0/1 missing");
        assert_eq!(cell(&card, "b", "reboot survives").to_string(), "0/1 missing");
    }

    #[test]
    fn a_scenario_that_is_not_per_app_has_no_scorecard() {
        let mut it = iteration(vec![ok("install")]);
        it.per_app = false;
        assert_eq!(scorecard(&[it]), None);
    }
}
