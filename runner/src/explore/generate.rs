//! The generator: from one seeded RNG, a sequence of requests of concurrent clients on every
//! app, catalog changes and faults, written as scenario steps so that any part of it replays
//! as an ordinary scenario.

use std::collections::BTreeSet;
use std::time::Duration;

use archy_agent::manifest::{Catalog, Dur};
use archy_agent::store::{PREVIOUS_FILE, STATE_FILE};
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::node::{DiskFault, FileFault};
use crate::scenario::{ApiOp, CatalogChange, Step};

/// The kinds of fault `--faults` can ask for.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, clap::ValueEnum, Serialize, Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Fault {
    /// kill -9 of the agent, at a random instant or at a kill point.
    Kill,
    /// Power cut and boot.
    Power,
    /// Graceful reboot.
    Reboot,
    /// Every podman call of the agent fails for a while.
    Podman,
    /// The data root full, or read-only, for a while.
    Disk,
    /// state.json (and its previous copy) deleted or corrupted, then the agent restarted.
    State,
    /// A generated secret deleted, corrupted, chmod 644 or chowned to root.
    Secrets,
    /// A manifest broken and repaired, an app removed from the catalog and restored.
    Catalog,
    /// An app upgraded: a new version with a changed environment.
    Upgrade,
    /// An app's main process killed, as the OOM killer would.
    Container,
}

impl Fault {
    pub fn name(self) -> String {
        serde_json::to_value(self).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default()
    }
}

/// `n` steps from `seed`: about one in four a fault or catalog change when `faults` allows.
/// The generator keeps a rough idea of what is installed so that most requests mean
/// something (a start of an installed app), and installs an app's dependencies first.
pub fn generate(
    seed: u64,
    n: usize,
    faults: &BTreeSet<Fault>,
    catalog: &Catalog,
    apps: &[String],
) -> Vec<Step> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = Vec::with_capacity(n);
    let mut installed: BTreeSet<String> = BTreeSet::new();
    let mut broken: BTreeSet<String> = BTreeSet::new();
    let mut removed: BTreeSet<String> = BTreeSet::new();
    let faults: Vec<Fault> = faults.iter().copied().collect();
    let op = |op: ApiOp, app: &str| Step::Op { op, app: Some(app.to_string()) };
    while out.len() < n {
        if !faults.is_empty() && rng.random_bool(0.25) {
            let f = *faults.choose(&mut rng).expect("not empty");
            out.extend(fault(&mut rng, f, catalog, apps, &installed, &mut broken, &mut removed));
            continue;
        }
        let app = apps.choose(&mut rng).expect("apps").clone();
        let deps = catalog.get(&app).map(|m| m.depends_on.clone()).unwrap_or_default();
        let r: f64 = rng.random();
        if !installed.contains(&app) || r < 0.15 {
            for d in deps {
                if installed.insert(d.clone()) {
                    out.push(op(ApiOp::Install, &d));
                }
            }
            out.push(op(ApiOp::Install, &app));
            installed.insert(app);
            continue;
        }
        // Dependents first: uninstalling an app others need is refused or leaves them waiting.
        let dependents: Vec<String> = installed
            .iter()
            .filter(|a| catalog.get(a).is_some_and(|m| m.depends_on.contains(&app)))
            .cloned()
            .collect();
        let step = match r {
            r if r < 0.30 => ApiOp::Stop,
            r if r < 0.45 => ApiOp::Start,
            r if r < 0.55 => ApiOp::Restart,
            r if r < 0.60 => ApiOp::Reconcile,
            r if r < 0.80 && dependents.is_empty() => ApiOp::Uninstall,
            _ if dependents.is_empty() => ApiOp::Purge,
            _ => ApiOp::Restart,
        };
        if matches!(step, ApiOp::Uninstall | ApiOp::Purge) {
            installed.remove(&app);
        }
        out.push(match step {
            ApiOp::Reconcile => Step::Op { op: ApiOp::Reconcile, app: None },
            s => op(s, &app),
        });
    }
    out.truncate(n);
    out
}

fn secs(rng: &mut StdRng, lo: u64, hi: u64) -> Dur {
    Dur(Duration::from_secs(rng.random_range(lo..=hi)))
}

fn fault(
    rng: &mut StdRng,
    f: Fault,
    catalog: &Catalog,
    apps: &[String],
    installed: &BTreeSet<String>,
    broken: &mut BTreeSet<String>,
    removed: &mut BTreeSet<String>,
) -> Vec<Step> {
    let any_app = apps.choose(rng).expect("apps").clone();
    let some_installed = installed.iter().collect::<Vec<_>>().choose(rng).map(|a| a.to_string());
    match f {
        Fault::Kill if rng.random_bool(0.5) => vec![Step::KillAgent { signal: "KILL".into() }],
        Fault::Kill => {
            let point = archy_agent::failpoint::POINTS.choose(rng).expect("points").to_string();
            vec![Step::KillAgentAt { point }]
        }
        Fault::Power => vec![Step::Reboot],
        Fault::Reboot => vec![Step::GracefulReboot],
        Fault::Podman => vec![Step::PodmanFail { duration: secs(rng, 2, 6) }],
        // A third of the time the data root fills up, the state is lost and the agent restarts
        // (the disk-fault step holds its client; the next clients take the rest meanwhile):
        // no save can undo the loss, and what the agent learns then it cannot save. Corrupted,
        // not deleted: a deletion would free the blocks the agent's next save needs. (On a
        // read-only data root the agent does not start at all.)
        Fault::Disk if rng.random_bool(0.33) => vec![
            Step::DiskFault { fault: DiskFault::Full, duration: secs(rng, 8, 12) },
            Step::FileFault { path: STATE_FILE.to_string(), fault: FileFault::Corrupt },
            Step::FileFault { path: PREVIOUS_FILE.to_string(), fault: FileFault::Corrupt },
            Step::RestartAgent,
        ],
        Fault::Disk => {
            let fault = if rng.random_bool(0.5) { DiskFault::Full } else { DiskFault::ReadOnly };
            vec![Step::DiskFault { fault, duration: secs(rng, 3, 10) }]
        }
        Fault::State => {
            let fault = if rng.random_bool(0.5) { FileFault::Delete } else { FileFault::Corrupt };
            let mut v = vec![Step::FileFault { path: STATE_FILE.to_string(), fault }];
            if rng.random_bool(0.5) {
                v.push(Step::FileFault { path: PREVIOUS_FILE.to_string(), fault });
            }
            // The agent reads its state at start: the loss matters from its next life.
            v.push(if rng.random_bool(0.5) {
                Step::RestartAgent
            } else {
                Step::KillAgent { signal: "KILL".into() }
            });
            v
        }
        Fault::Secrets => {
            let app = some_installed.unwrap_or(any_app);
            let Some(secret) = catalog.get(&app).and_then(|m| m.generated_secrets.choose(rng)) else {
                return vec![Step::Op { op: ApiOp::Reconcile, app: None }];
            };
            let fault = *[
                FileFault::Delete,
                FileFault::Corrupt,
                FileFault::Chmod,
                FileFault::ChownRoot,
                FileFault::Truncate,
                FileFault::Symlink,
                FileFault::Directory,
                FileFault::Fifo,
            ]
            .choose(rng)
            .expect("faults");
            vec![Step::FileFault { path: format!("secrets/{app}/{}", secret.target), fault }]
        }
        Fault::Catalog => {
            // Repair what is broken and restore what was removed, more often than not.
            if let Some(app) = broken.iter().next().cloned().filter(|_| rng.random_bool(0.6)) {
                broken.remove(&app);
                return vec![Step::Catalog { change: CatalogChange::Repair, app }];
            }
            if let Some(app) = removed.iter().next().cloned().filter(|_| rng.random_bool(0.6)) {
                removed.remove(&app);
                return vec![Step::Catalog { change: CatalogChange::Restore, app }];
            }
            // Dependencies of installed apps are the interesting ones to break.
            let needed: Vec<String> = installed
                .iter()
                .filter_map(|a| catalog.get(a))
                .flat_map(|m| m.depends_on.clone())
                .filter(|d| !broken.contains(d) && !removed.contains(d))
                .collect();
            let app = needed.choose(rng).cloned().unwrap_or(any_app);
            if broken.contains(&app) || removed.contains(&app) {
                return vec![Step::Op { op: ApiOp::Reconcile, app: None }];
            }
            if rng.random_bool(0.7) {
                broken.insert(app.clone());
                vec![Step::Catalog { change: CatalogChange::Break, app }]
            } else {
                removed.insert(app.clone());
                vec![Step::Catalog { change: CatalogChange::Remove, app }]
            }
        }
        Fault::Upgrade => {
            let app = some_installed.unwrap_or(any_app);
            vec![Step::Catalog { change: CatalogChange::Upgrade, app }]
        }
        Fault::Container => match some_installed {
            Some(app) => vec![Step::KillContainer { app, signal: "KILL".into() }],
            None => vec![Step::Op { op: ApiOp::Reconcile, app: None }],
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn catalog() -> Catalog {
        Catalog::load(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../apps")).unwrap()
    }

    #[test]
    fn one_seed_one_history() {
        let c = catalog();
        let apps: Vec<String> = vec!["fx-web".into(), "fx-client".into(), "fx-crashloop".into()];
        let all: BTreeSet<Fault> = [Fault::Kill, Fault::State, Fault::Catalog, Fault::Secrets].into();
        let a = generate(7, 80, &all, &c, &apps);
        let b = generate(7, 80, &all, &c, &apps);
        assert_eq!(serde_json::to_string(&a).unwrap(), serde_json::to_string(&b).unwrap());
        assert_eq!(a.len(), 80);
        assert_ne!(
            serde_json::to_string(&a).unwrap(),
            serde_json::to_string(&generate(8, 80, &all, &c, &apps)).unwrap()
        );
        // Faults of every kind asked for, and none of the others.
        let names: BTreeSet<String> = a.iter().filter(|s| s.is_fault()).map(Step::name).collect();
        for want in ["kill-agent", "file-fault", "catalog"] {
            assert!(names.contains(want), "{want} missing from {names:?}");
        }
        assert!(!names.contains("reboot") && !names.contains("podman-fail"), "{names:?}");
        // The client installs a dependency before the app that needs it.
        let first_client = a
            .iter()
            .position(|s| matches!(s, Step::Op { op: ApiOp::Install, app: Some(x) } if x == "fx-client"));
        let first_web = a
            .iter()
            .position(|s| matches!(s, Step::Op { op: ApiOp::Install, app: Some(x) } if x == "fx-web"));
        if let Some(c) = first_client {
            assert!(first_web.is_some_and(|w| w < c), "{a:?}");
        }
    }

    #[test]
    fn without_faults_only_requests() {
        let c = catalog();
        let apps: Vec<String> = vec!["fx-web".into()];
        let h = generate(1, 50, &BTreeSet::new(), &c, &apps);
        assert!(h.iter().all(|s| matches!(s, Step::Op { .. })), "{h:?}");
    }
}
