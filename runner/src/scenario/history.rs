//! The history of a run (Jepsen's word): every request, catalog change and fault with when it
//! was invoked, when it completed and its outcome, and the model it implies: what each app's
//! desired state may be now. Pure: the `model` check compares it with the node.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::Instant;

pub use archy_agent::store::Desired;
use serde::{Deserialize, Serialize};

use super::model::{ApiOp, CatalogChange, Step};
use crate::agent_client::{AgentClient, Error as ClientError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// The agent acknowledged it (a fault: it took effect).
    Ok,
    /// The agent answered with an error: it did not take effect.
    Fail,
    /// No answer (the agent died or timed out while it was in flight): it may or may not
    /// have taken effect.
    Indeterminate,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Entry {
    /// Position in the generated sequence (explore) or in the scenario's steps.
    pub index: usize,
    pub client: usize,
    pub step: Step,
    /// Seconds since the history began.
    pub invoked: f64,
    pub completed: f64,
    pub outcome: Outcome,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

impl Entry {
    /// A step other than a request or a catalog change (a fault, a wait), as it ended: ok when
    /// it took effect, indeterminate when it did not, fail on an error.
    pub fn of_step(
        index: usize,
        client: usize,
        step: &Step,
        invoked: f64,
        history: &History,
        result: &anyhow::Result<crate::evidence::Evidence>,
    ) -> Entry {
        let (outcome, message) = match result {
            Ok(ev) if ev.took_effect == Some(false) => (Outcome::Indeterminate, "no effect".to_string()),
            Ok(_) => (Outcome::Ok, String::new()),
            Err(e) => (Outcome::Fail, format!("{e:#}")),
        };
        Entry { index, client, step: step.clone(), invoked, completed: history.now(), outcome, message }
    }
}

/// Shared by the clients of a run; entries are appended as they complete.
#[derive(Debug)]
pub struct History {
    start: Instant,
    entries: Mutex<Vec<Entry>>,
}

impl Default for History {
    fn default() -> History {
        History { start: Instant::now(), entries: Mutex::new(Vec::new()) }
    }
}

impl History {
    pub fn now(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    pub fn record(&self, e: Entry) {
        self.entries.lock().unwrap_or_else(|e| e.into_inner()).push(e);
    }

    /// How many entries so far (the next step's index in a sequential run).
    pub fn len(&self) -> usize {
        self.entries.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn entries(&self) -> Vec<Entry> {
        let mut v = self.entries.lock().unwrap_or_else(|e| e.into_inner()).clone();
        v.sort_by(|a, b| a.invoked.total_cmp(&b.invoked));
        v
    }
}

/// Where an app's manifest stands after the catalog changes of the history.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InCatalog {
    Valid,
    Broken,
    Removed,
}

/// What the history allows of one app now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppModel {
    /// Every desired state the app may have: one when the history is certain.
    pub possible: BTreeSet<Desired>,
    /// A purge may have been applied (the last one possibly applied is a purge).
    pub purged: bool,
    pub manifest: InCatalog,
}

impl AppModel {
    pub fn certain(&self) -> Option<Desired> {
        (self.possible.len() == 1).then(|| *self.possible.iter().next().expect("one"))
    }
}

fn implies(op: ApiOp) -> Option<Desired> {
    match op {
        ApiOp::Install | ApiOp::Start => Some(Desired::Running),
        ApiOp::Uninstall | ApiOp::Purge => Some(Desired::Absent),
        ApiOp::Stop => Some(Desired::Stopped),
        ApiOp::Restart | ApiOp::Reconcile => None,
    }
}

/// The model of every app of `apps` after `entries` (sorted by invocation). An operation may
/// be the last applied unless an acknowledged one was invoked after it completed (the agent
/// applies a request before answering it); a failed one was never applied. With no
/// acknowledged operation the app may also still be as it began: absent.
///
/// A fault that destroys the state file and its copy may make the agent forget what it was
/// asked before (if it restarts before it saves again): from then on, until an acknowledged
/// request, an app may also be stopped or absent, unless it was seen up at the check before
/// the loss and nothing asked anything of it since. Such an app's container runs, and an
/// agent that lost its state must adopt it, never remove it. `ups` holds each check's time
/// and the apps it saw up.
pub fn model(
    entries: &[Entry],
    apps: &[String],
    ups: &[(f64, BTreeSet<String>)],
) -> BTreeMap<String, AppModel> {
    let loss = last_state_loss(entries);
    let mut out = BTreeMap::new();
    for app in apps {
        let ops: Vec<(&Entry, ApiOp, Desired)> = entries
            .iter()
            .filter(|e| e.outcome != Outcome::Fail)
            .filter_map(|e| match &e.step {
                Step::Op { op, app: Some(a) } if a == app => implies(*op).map(|d| (e, *op, d)),
                _ => None,
            })
            .collect();
        let acked = |after: f64| ops.iter().any(|(e, _, _)| e.outcome == Outcome::Ok && e.invoked > after);
        let last: Vec<&(&Entry, ApiOp, Desired)> =
            ops.iter().filter(|(e, _, _)| !acked(e.completed)).collect();
        let mut possible: BTreeSet<Desired> = last.iter().map(|(_, _, d)| *d).collect();
        if !ops.iter().any(|(e, _, _)| e.outcome == Outcome::Ok) {
            possible.insert(Desired::Absent);
        }
        let mut purged = last.iter().any(|(_, op, _)| *op == ApiOp::Purge);
        if let Some(at) = loss.filter(|at| !acked(*at)) {
            let before = ups.iter().rev().find(|(t, _)| *t <= at);
            let untouched = before.is_some_and(|(t, up)| {
                up.contains(app) && !ops.iter().any(|(e, _, _)| e.completed >= *t && e.invoked <= at)
            });
            if !untouched {
                possible.extend([Desired::Stopped, Desired::Absent]);
            }
            purged &= last.iter().all(|(e, op, _)| *op == ApiOp::Purge && e.invoked > at);
        }
        let mut manifest = InCatalog::Valid;
        for e in entries.iter().filter(|e| e.outcome == Outcome::Ok) {
            if let Step::Catalog { change, app: a } = &e.step {
                if a == app {
                    manifest = match change {
                        CatalogChange::Break => InCatalog::Broken,
                        CatalogChange::Remove => InCatalog::Removed,
                        CatalogChange::Repair | CatalogChange::Restore | CatalogChange::Upgrade => {
                            InCatalog::Valid
                        }
                    };
                }
            }
        }
        out.insert(app.clone(), AppModel { possible, purged, manifest });
    }
    out
}

/// When the last fault that destroyed both the state file and its copy completed: a damage
/// of the copy that took effect, after one of the state file.
fn last_state_loss(entries: &[Entry]) -> Option<f64> {
    let hit = |e: &Entry, file: &str| {
        e.outcome == Outcome::Ok && matches!(&e.step, Step::FileFault { path, .. } if path == file)
    };
    entries
        .iter()
        .filter(|e| hit(e, archy_agent::store::PREVIOUS_FILE))
        .filter(|p| entries.iter().any(|s| hit(s, archy_agent::store::STATE_FILE) && s.invoked <= p.invoked))
        .map(|p| p.completed)
        .reduce(f64::max)
}

/// Whether anything in `entries` from `since` on may legitimately have changed `app`'s secret
/// values or data: a purge (acknowledged or not), an upgrade, or a fault aimed at its secrets.
pub fn may_rotate(entries: &[Entry], app: &str, since: f64) -> bool {
    entries.iter().filter(|e| e.completed >= since && e.outcome != Outcome::Fail).any(|e| match &e.step {
        Step::Op { op: ApiOp::Purge, app: Some(a) } => a == app,
        Step::Catalog { change: CatalogChange::Upgrade, app: a } => a == app,
        // Paths are under the data root; `{app}` stands for every app.
        Step::FileFault { path, .. } => {
            path.starts_with(&format!("secrets/{app}/")) || path.starts_with("secrets/{app}/")
        }
        _ => false,
    })
}

/// Sends one request and records it. A request the agent never received (connection refused)
/// is retried while the agent comes back, for up to `patience`; one that may have reached it
/// and got no answer is indeterminate.
pub fn request(
    agent: &AgentClient,
    history: &History,
    index: usize,
    client: usize,
    op: ApiOp,
    app: Option<&str>,
    patience: std::time::Duration,
) -> Entry {
    let invoked = history.now();
    let call = || -> Result<(), ClientError> {
        match (op, app) {
            (ApiOp::Reconcile, _) => agent.reconcile().map(drop),
            // Not through `AgentClient::uninstall`, which takes "not installed" for done: here
            // it is a refusal, and the request had no effect.
            (ApiOp::Uninstall | ApiOp::Purge, Some(a)) => agent
                .rpc::<archy_agent::api::Accepted>(
                    "package.uninstall",
                    serde_json::json!({"id": a, "purge": op == ApiOp::Purge}),
                )
                .map(drop),
            (ApiOp::Install, Some(a)) => agent.op("install", a).map(drop),
            (ApiOp::Start, Some(a)) => agent.op("start", a).map(drop),
            (ApiOp::Stop, Some(a)) => agent.op("stop", a).map(drop),
            (ApiOp::Restart, Some(a)) => agent.op("restart", a).map(drop),
            (_, None) => agent.op("install", "").map(drop), // answered: invalid params
        }
    };
    let start = Instant::now();
    let result = loop {
        match call() {
            Err(ClientError::Transport { message, .. })
                if message.contains("refused") && start.elapsed() < patience =>
            {
                // Soon, as a client waiting on a restarting agent does: the request lands as
                // the API opens, before or during the agent's first tick.
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            r => break r,
        }
    };
    let (outcome, message) = match result {
        Ok(()) => (Outcome::Ok, String::new()),
        Err(e @ ClientError::Rpc { .. }) => (Outcome::Fail, e.to_string()),
        Err(e) if e.to_string().contains("refused") => (Outcome::Fail, e.to_string()),
        Err(e) => (Outcome::Indeterminate, e.to_string()),
    };
    let step = Step::Op { op, app: app.map(str::to_string) };
    let entry = Entry { index, client, step, invoked, completed: history.now(), outcome, message };
    history.record(entry.clone());
    entry
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::FileFault;

    fn fault(path: &str, at: f64) -> Entry {
        let step = Step::FileFault { path: path.into(), fault: FileFault::Delete };
        Entry {
            index: 0,
            client: 0,
            step,
            invoked: at,
            completed: at,
            outcome: Outcome::Ok,
            message: String::new(),
        }
    }

    /// A lost state may forget an app, unless it was up and untouched: that one the agent must
    /// adopt (bug 2 of the explore issue removed it as an orphan).
    #[test]
    fn a_lost_state_may_forget_only_what_was_not_seen_running() {
        use Desired::*;
        let mut h = vec![op(ApiOp::Install, 0.0, 1.0, Outcome::Ok)];
        h.push(fault("state.json", 5.0));
        h.push(fault("state.json.prev", 5.1));
        let seen_up = [(2.0, BTreeSet::from(["a".to_string()]))];
        assert_eq!(model(&h, &["a".into()], &seen_up)["a"].possible, BTreeSet::from([Running]));
        assert_eq!(model(&h, &["a".into()], &[])["a"].possible, BTreeSet::from([Running, Stopped, Absent]));
        // Only the copy destroyed: the state file was there to read.
        let h2 = [op(ApiOp::Install, 0.0, 1.0, Outcome::Ok), fault("state.json.prev", 5.1)];
        assert_eq!(possible(&h2), [Running]);
        // A request acknowledged after the loss decides again.
        h.push(op(ApiOp::Stop, 6.0, 7.0, Outcome::Ok));
        assert_eq!(possible(&h), [Stopped]);
    }

    fn op(op: ApiOp, invoked: f64, completed: f64, outcome: Outcome) -> Entry {
        Entry {
            index: 0,
            client: 0,
            step: Step::Op { op, app: Some("a".into()) },
            invoked,
            completed,
            outcome,
            message: String::new(),
        }
    }

    fn possible(entries: &[Entry]) -> Vec<Desired> {
        model(entries, &["a".into()], &[])["a"].possible.iter().copied().collect()
    }

    #[test]
    fn the_last_acknowledged_request_decides() {
        use Desired::*;
        assert_eq!(possible(&[]), [Absent]);
        let h = [op(ApiOp::Install, 0.0, 1.0, Outcome::Ok), op(ApiOp::Stop, 2.0, 3.0, Outcome::Ok)];
        assert_eq!(possible(&h), [Stopped]);
        // A failed request never took effect.
        let h = [op(ApiOp::Install, 0.0, 1.0, Outcome::Ok), op(ApiOp::Uninstall, 2.0, 3.0, Outcome::Fail)];
        assert_eq!(possible(&h), [Running]);
    }

    #[test]
    fn an_indeterminate_request_may_or_may_not_have_been_applied() {
        use Desired::*;
        let h = [
            op(ApiOp::Install, 0.0, 1.0, Outcome::Ok),
            op(ApiOp::Uninstall, 2.0, 3.0, Outcome::Indeterminate),
        ];
        assert_eq!(possible(&h), [Running, Absent]);
        // ... until an acknowledged request invoked after it.
        let mut h = h.to_vec();
        h.push(op(ApiOp::Stop, 4.0, 5.0, Outcome::Ok));
        assert_eq!(possible(&h), [Stopped]);
        // Alone, it leaves the app possibly as it began.
        assert_eq!(possible(&[op(ApiOp::Install, 0.0, 1.0, Outcome::Indeterminate)]), [Running, Absent]);
    }

    #[test]
    fn concurrent_acknowledged_requests_may_land_in_either_order() {
        use Desired::*;
        let h = [op(ApiOp::Install, 0.0, 2.0, Outcome::Ok), op(ApiOp::Stop, 1.0, 3.0, Outcome::Ok)];
        assert_eq!(possible(&h), [Running, Stopped]);
        let m = &model(&h, &["a".into()], &[])["a"];
        assert_eq!(m.certain(), None);
        assert!(!m.purged);
    }
}
