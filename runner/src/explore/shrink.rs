//! Shrinking: a failing history cut down to the fewest steps that still fail the same way.
//!
//! Delta debugging over the steps' sequence (Zeller's ddmin, complements only): each
//! candidate is an ordinary scenario replayed on a fresh node, so what comes out is a file
//! `archy-chaos run` replays. Proptest's state-machine shrinking was the alternative; it
//! shrinks values generated inside one process, while a candidate here is a minute of a real
//! node, replayed sequentially, and ddmin's count of replays is what bounds the cost.

use std::time::{Duration, Instant};

pub use crate::report::model::Shrunk;
use crate::scenario::Step;

/// The smallest sub-sequence of `steps` for which `fails` holds (`fails(steps)` is assumed),
/// within `budget`: removes chunks of halving size, then single steps, while the rest fails.
pub fn ddmin(
    steps: Vec<Step>,
    budget: Duration,
    mut fails: impl FnMut(&[Step]) -> bool,
) -> (Vec<Step>, Shrunk) {
    let start = Instant::now();
    let original_len = steps.len();
    let mut cur = steps;
    let mut replays = 0;
    let mut n = 2usize;
    let mut exhausted = false;
    'outer: while cur.len() >= 2 {
        let chunk = cur.len().div_ceil(n);
        let mut reduced = None;
        for i in 0..n {
            if start.elapsed() >= budget || crate::interrupt::signal().is_some() {
                exhausted = true;
                break 'outer;
            }
            let (lo, hi) = (i * chunk, ((i + 1) * chunk).min(cur.len()));
            if lo >= hi {
                continue;
            }
            let candidate: Vec<Step> = cur[..lo].iter().chain(&cur[hi..]).cloned().collect();
            replays += 1;
            if fails(&candidate) {
                reduced = Some(candidate);
                break;
            }
        }
        match reduced {
            Some(smaller) => {
                cur = smaller;
                n = (n - 1).max(2);
            }
            None if n >= cur.len() => break,
            None => n = (2 * n).min(cur.len()),
        }
    }
    let minimal_len = cur.len();
    let shrunk = Shrunk {
        original_len,
        minimal_len,
        replays,
        seconds: start.elapsed().as_secs_f64(),
        budget_exhausted: exhausted,
    };
    (cur, shrunk)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::ApiOp;

    fn op(app: &str) -> Step {
        Step::Op { op: ApiOp::Install, app: Some(app.into()) }
    }

    fn apps(steps: &[Step]) -> Vec<String> {
        steps
            .iter()
            .filter_map(|s| match s {
                Step::Op { app, .. } => app.clone(),
                _ => None,
            })
            .collect()
    }

    /// A failure that needs two steps in order, among forty.
    #[test]
    fn shrinks_to_the_steps_the_failure_needs_in_order() {
        let mut steps: Vec<Step> = (0..40).map(|i| op(&format!("a{i}"))).collect();
        steps[7] = Step::RestartAgent;
        steps[31] = op("victim");
        let fails = |s: &[Step]| {
            let restart = s.iter().position(|s| matches!(s, Step::RestartAgent));
            let victim = s.iter().position(|s| matches!(s, Step::Op { app: Some(a), .. } if a == "victim"));
            matches!((restart, victim), (Some(r), Some(v)) if r < v)
        };
        let (min, shrunk) = ddmin(steps, Duration::from_secs(60), fails);
        assert_eq!(min.len(), 2, "{min:?}");
        assert_eq!(apps(&min), ["victim"]);
        assert_eq!((shrunk.original_len, shrunk.minimal_len), (40, 2));
        assert!(shrunk.replays < 60, "{shrunk:?}");
        assert!(!shrunk.budget_exhausted);
    }

    #[test]
    fn a_spent_budget_returns_the_best_so_far() {
        let steps: Vec<Step> = (0..10).map(|i| op(&format!("a{i}"))).collect();
        let (min, shrunk) = ddmin(steps, Duration::ZERO, |_| true);
        assert_eq!(min.len(), 10);
        assert!(shrunk.budget_exhausted);
    }
}
