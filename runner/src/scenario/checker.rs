//! The model checker: is the node, observed from outside the agent, what the history
//! implies? It believes nothing the agent says about its apps: containers are podman's
//! answer on the node, "up" is the app answering its own endpoint, secrets are read from the
//! node's disk. It waits on the agent's own schedule and never forces a tick, so an agent that
//! stopped ticking cannot be prodded into passing.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{ensure, Result};
use archy_agent::manifest::Catalog;

use super::history::{self, AppModel, Desired, Entry, InCatalog};
use crate::agent_client::AgentClient;
use crate::node::Node;

/// Fixtures that never become healthy, by design.
pub const NEVER_HEALTHY: &[&str] = &["fx-crashloop"];

/// What the checks so far saw, for the next one.
#[derive(Debug, Default, Clone)]
pub struct Seen {
    /// History time of the last check.
    pub at: f64,
    /// Secret values by `app/file` (sha256).
    pub secrets: BTreeMap<String, String>,
    /// Each check's history time and the apps it saw up.
    pub ups: Vec<(f64, BTreeSet<String>)>,
}

/// A managed container as podman on the node lists it.
#[derive(Debug, Clone)]
pub struct Container {
    pub name: String,
    pub app: String,
    pub running: bool,
    /// `healthy`, `unhealthy`, `starting`; none without a health check.
    pub health: Option<String>,
}

pub fn containers(node: &dyn Node) -> Result<Vec<Container>> {
    let out = node.exec(&[
        "podman",
        "ps",
        "-a",
        "--filter",
        "label=io.archy.app",
        "--format",
        "{{.Names}}|{{.State}}|{{.Status}}|{{index .Labels \"io.archy.app\"}}",
    ])?;
    ensure!(out.status.success(), "podman ps on the node: {}", String::from_utf8_lossy(&out.stderr).trim());
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split('|').collect();
            let [name, state, status, app] = f[..] else { return None };
            let health = ["healthy", "unhealthy", "starting"]
                .into_iter()
                .find(|h| status.contains(&format!("({h})")))
                .map(str::to_string);
            Some(Container {
                name: name.into(),
                app: app.into(),
                running: state == "running" || status.starts_with("Up"),
                health,
            })
        })
        .collect())
}

/// Whether the app answers HTTP on its first published port, from inside the node.
pub fn answers(node: &dyn Node, catalog: &Catalog, app: &str) -> Result<bool> {
    let Some(port) = catalog.get(app).and_then(|m| m.ports.first()) else { return Ok(true) };
    let url = format!("http://127.0.0.1:{}/", port.host);
    Ok(node.exec(&["wget", "-q", "-T", "3", "-O", "/dev/null", &url])?.status.success())
}

/// What does not match the model now (empty: the node is as the history implies), and the
/// apps seen up.
fn mismatches(
    node: &dyn Node,
    catalog: &Catalog,
    models: &BTreeMap<String, AppModel>,
) -> Result<(Vec<String>, BTreeSet<String>)> {
    let observed = containers(node)?;
    let mut out = Vec::new();
    let mut up = BTreeSet::new();
    for (app, m) in models {
        let mine: Vec<&Container> = observed.iter().filter(|c| &c.app == app).collect();
        if mine.len() > 1 {
            out.push(format!("{app}: {} containers for one app", mine.len()));
        }
        let c = mine.first();
        let deps_up = catalog.get(app).is_some_and(|man| {
            man.depends_on.iter().all(|d| {
                models.get(d).is_some_and(|dm| {
                    dm.certain() == Some(Desired::Running) && dm.manifest == InCatalog::Valid
                })
            })
        });
        match m.certain() {
            Some(Desired::Running) if m.manifest == InCatalog::Valid && deps_up => {
                // A crash loop is between a death and systemd's restart as often as not.
                if NEVER_HEALTHY.contains(&app.as_str()) {
                } else if !c.is_some_and(|c| c.running && c.health.as_deref().is_none_or(|h| h == "healthy"))
                {
                    out.push(format!("{app}: desired running, but its container is {c:?}"));
                } else if !answers(node, catalog, app)? {
                    out.push(format!("{app}: its container runs, but it does not answer on its port"));
                } else {
                    up.insert(app.clone());
                }
            }
            Some(Desired::Stopped) if c.is_some_and(|c| c.running) => {
                out.push(format!("{app}: desired stopped, but its container runs"));
            }
            Some(Desired::Absent) => {
                if let Some(c) = c {
                    out.push(format!("{app}: uninstalled, but container {} is still there", c.name));
                }
                if m.purged {
                    for dir in [format!("data/secrets/{app}"), format!("data/apps/{app}")] {
                        if node.stat(&dir)?.is_some() {
                            out.push(format!("{app}: purged, but {dir} is still there"));
                        }
                    }
                }
            }
            _ => {}
        }
    }
    Ok((out, up))
}

/// A quiet point begins: a kill point armed but never reached is disarmed (it would kill the
/// agent at the next install), and the agent is back (a fault may just have killed it).
fn settle(node: &dyn Node, agent: &AgentClient, timeout: Duration) -> Result<()> {
    node.remove(&super::steps::failpoint_file())?;
    agent.wait_ready(timeout).map(drop)
}

/// Waits (up to `timeout`, on the agent's own schedule) for the node to match the history's
/// What the history allows of each app ([`history::model`]), knowing the catalog.
pub fn model(
    entries: &[Entry],
    apps: &[String],
    ups: &[(f64, BTreeSet<String>)],
    catalog: &Catalog,
) -> BTreeMap<String, AppModel> {
    let mut models = history::model(entries, apps, ups);
    broken_by_references(&mut models, catalog);
    models
}

/// The catalog is validated as a whole: an app whose dependency or secret source was broken
/// or removed does not load either (explore seed 320: fx-web removed, so fx-client's secret
/// reference is invalid and the agent cannot know fx-client's own secrets).
fn broken_by_references(models: &mut BTreeMap<String, AppModel>, catalog: &Catalog) {
    loop {
        let invalid: Vec<String> = models
            .iter()
            .filter(|(_, m)| m.manifest == InCatalog::Valid)
            .filter(|(app, _)| {
                catalog.get(app).is_some_and(|manifest| {
                    let refs = manifest.depends_on.iter().chain(manifest.secret_files.iter().map(|r| &r.app));
                    refs.into_iter().any(|r| models.get(r).is_some_and(|d| d.manifest != InCatalog::Valid))
                })
            })
            .map(|(app, _)| app.clone())
            .collect();
        if invalid.is_empty() {
            return;
        }
        for app in invalid {
            if let Some(m) = models.get_mut(&app) {
                m.manifest = InCatalog::Broken;
            }
        }
    }
}

/// model, then checks liveness (a tick completed since the check began) and the secrets of
/// every installed app: valid, 0600, owned by the service user, and not rotated since the
/// last check unless the history allows it.
pub fn check(
    node: &dyn Node,
    agent: &AgentClient,
    catalog: &Catalog,
    apps: &[String],
    entries: &[Entry],
    seen: &mut Seen,
    timeout: Duration,
) -> Result<()> {
    settle(node, agent, timeout)?;
    let models = model(entries, apps, &seen.ups, catalog);
    let began = Instant::now();
    let unix = || SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
    let began_unix = unix();
    // Liveness: the reconciler ticks by itself, at least every three intervals (and the time
    // of one tick). A dead one is reported as soon as that is certain, not at the timeout.
    let st = agent.status()?;
    let window = 3.0 * st.tick_interval_seconds.max(1.0) + 10.0;
    let mut last = st.last_tick_at.unwrap_or(0.0);
    // Two ticks completed since the check began: the second began after it (a tick in flight
    // when the check began may be the last one a dying reconciler completes).
    let mut ticks = 0;
    let (mut wrong, mut up) = mismatches(node, catalog, &models)?;
    while (!wrong.is_empty() || ticks < 2) && began.elapsed() < timeout && unix() - last < window {
        crate::interrupt::check()?;
        std::thread::sleep(Duration::from_secs(1));
        let now = agent.status()?.last_tick_at.unwrap_or(0.0);
        if now > last && now >= began_unix {
            ticks += 1;
        }
        last = now;
        if !wrong.is_empty() {
            (wrong, up) = mismatches(node, catalog, &models)?;
        }
    }
    let mut failures = wrong;
    if ticks < 2 {
        failures.push(match last {
            0.0 => "liveness: the agent has completed no reconcile tick since it started".to_string(),
            _ => format!(
                "liveness: the agent completed no reconcile tick for {:.0} s (its interval: {} s)",
                unix() - last,
                st.tick_interval_seconds
            ),
        });
    }
    let uid = node.service_uid()?;
    let now = seen.at.max(entries.iter().map(|e| e.completed).fold(0.0, f64::max));
    let mut secrets = BTreeMap::new();
    for (app, m) in &models {
        let installed = matches!(m.certain(), Some(Desired::Running | Desired::Stopped));
        let Some(manifest) = catalog.get(app).filter(|_| installed && m.manifest == InCatalog::Valid) else {
            continue;
        };
        match super::invariants::secrets_of(node, manifest, uid) {
            Err(e) => failures.push(format!("{e:#}")),
            Ok(values) => {
                secrets.extend(values.into_iter().map(|(file, sum)| (format!("{app}/{file}"), sum)))
            }
        }
    }
    failures.extend(rotated(&seen.secrets, &secrets, entries, seen.at));
    seen.secrets = secrets;
    seen.at = now;
    seen.ups.push((now, up));
    ensure!(failures.is_empty(), "{}", failures.join("; "));
    Ok(())
}

/// Secrets (`app/file` -> sha256) whose value changed since the last check though nothing in
/// the history since `since` allows it. Compared with the last check only: an app not
/// installed then may have been purged and installed again since, with new secrets.
fn rotated(
    before: &BTreeMap<String, String>,
    now: &BTreeMap<String, String>,
    entries: &[Entry],
    since: f64,
) -> Vec<String> {
    now.iter()
        .filter(|(key, sum)| before.get(*key).is_some_and(|b| b != *sum))
        .filter(|(key, _)| !history::may_rotate(entries, key.split('/').next().unwrap_or(""), since))
        .map(|(key, _)| format!("{key}: rotated, though the app was neither purged nor changed and the secret was not damaged"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Explore seed 320 (a false alarm): fx-web was removed from the catalog, which made
    /// fx-client's manifest invalid too (it reads fx-web's secret); the checker still wanted
    /// fx-client's own secrets healed, which the agent can no longer know.
    #[test]
    fn an_app_whose_secret_source_left_the_catalog_is_broken_too() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../apps");
        let catalog = Catalog::load(&root).unwrap();
        let model = |manifest| AppModel { possible: [Desired::Running].into(), purged: false, manifest };
        let mut models = BTreeMap::from([
            ("fx-web".to_string(), model(InCatalog::Removed)),
            ("fx-client".to_string(), model(InCatalog::Valid)),
            ("fx-ui".to_string(), model(InCatalog::Valid)),
        ]);
        broken_by_references(&mut models, &catalog);
        assert_eq!(models["fx-client"].manifest, InCatalog::Broken);
        assert_eq!(models["fx-ui"].manifest, InCatalog::Valid);
    }

    /// Regression: the checker kept secret values across checks where the app was not
    /// installed, so an app purged and installed again was said to have rotated its secret
    /// (explore, seed 206 of the first ten: a false alarm, found accounting for failures).
    #[test]
    fn a_secret_is_compared_with_the_last_check_only() {
        let v = |x: &str| BTreeMap::from([("fx-web/api-token".to_string(), x.to_string())]);
        let none = BTreeMap::new();
        // Installed with A, then purged (absent at the next check), then installed with B.
        assert!(rotated(&v("A"), &none, &[], 0.0).is_empty());
        assert!(rotated(&none, &v("B"), &[], 0.0).is_empty());
        // A change between two checks that saw the app, with nothing to allow it, is one.
        assert_eq!(rotated(&v("A"), &v("B"), &[], 0.0).len(), 1);
    }
}
