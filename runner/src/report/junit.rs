//! A run report as JUnit XML for CI systems: a suite per node and scenario, a case per
//! iteration and per KPI threshold; fail is a failure, unknown an error.

use std::time::Duration;

use anyhow::Result;
use quick_junit::{NonSuccessKind, Property, TestCase, TestCaseStatus, TestSuite};

use super::model::{Report, Verdict};

pub fn render(r: &Report) -> Result<String> {
    let mut out = quick_junit::Report::new("archy-chaos");
    if let Ok(t) = Duration::try_from_secs_f64(r.duration_seconds) {
        out.set_time(t);
    }
    for node in &r.nodes {
        for sc in &node.scenarios {
            let mut suite = TestSuite::new(format!("{} on {}", sc.label(), node.node));
            // JUnit has no place for a run's properties but its suites'.
            suite.add_properties([
                Property::new("replay", r.replay.as_str()),
                Property::new("seed", r.seed.to_string()),
                Property::new("node", node.node.as_str()),
                Property::new("backend", sc.backend.name()),
            ]);
            let case = |name: String, verdict: Verdict, why: String| {
                let kind = match verdict {
                    Verdict::Pass => None,
                    Verdict::Fail => Some(NonSuccessKind::Failure),
                    Verdict::Unknown => Some(NonSuccessKind::Error),
                };
                let status = match kind {
                    None => TestCaseStatus::success(),
                    Some(kind) => {
                        // A parser folds newlines in an attribute to spaces: the whole text
                        // goes in the element, its first line in the message.
                        let mut s = TestCaseStatus::non_success(kind);
                        s.set_message(why.lines().next().unwrap_or_default());
                        s.set_description(why.as_str());
                        s
                    }
                };
                let mut c = TestCase::new(name, status);
                c.set_classname(format!("archy-chaos.{}", sc.label()));
                c
            };
            for it in &sc.iterations {
                let why: Vec<&str> = it.failures.iter().chain(&it.unknowns).map(String::as_str).collect();
                let name = format!("iteration {}", it.n);
                suite.add_test_case(case(name, it.verdict, why.join("; ")));
            }
            for k in &sc.kpis {
                for t in &k.thresholds {
                    let q = t.quantile.name();
                    let value = t.value.map_or("not measured".into(), |v| v.to_string());
                    let why = format!("{} {q} = {value} (limit {})", k.name, t.max);
                    suite.add_test_case(case(format!("kpi {} {q}", k.name), t.verdict, why));
                }
            }
            out.add_test_suite(suite);
        }
    }
    Ok(out.to_string()? + "\n")
}
