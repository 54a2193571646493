//! The reconciler's decisions as a table (given desired state and observations, expect these
//! actions), and its loop over an in-memory fake runtime: convergence, no-op ticks, backoff.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use archy_agent::exec::{Exec, ExecConfig};
use archy_agent::manifest::Catalog;
use archy_agent::metrics::Metrics;
use archy_agent::quadlet::{render, Target};
use archy_agent::reconcile::{plan, Action, Plan, Reason, Reconciler, Shared, World};
use archy_agent::runtime::{self, BackendKind, Binding, Container, ContainerState, Health, Op, Runtime};
use archy_agent::store::{AppState, Desired, State, Store};
use support::*;

fn catalog() -> Catalog {
    Catalog::load(&repo_root().join("apps")).unwrap()
}

fn target() -> Target {
    Target::new("4.3.1".parse().unwrap(), PathBuf::from("/data"))
}

fn state(apps: &[(&str, Desired)]) -> State {
    State { apps: apps.iter().map(|(a, d)| (a.to_string(), AppState::new(*d))).collect(), ..State::default() }
}

/// A container exactly as the agent would have created it, up and healthy.
fn healthy(c: &Catalog, app: &str) -> Container {
    healthy_on(c, app, &target())
}

fn healthy_on(c: &Catalog, app: &str, target: &Target) -> Container {
    let m = c.get(app).unwrap();
    let unit = render(m, target);
    Container {
        app: app.into(),
        id: format!("id-{app}"),
        name: m.container_name(),
        state: ContainerState::Running,
        health: if m.health.is_some() { Health::Healthy } else { Health::None },
        image: m.image.clone(),
        ports: m
            .ports
            .iter()
            .filter(|_| m.network == archy_agent::manifest::Network::Bridge)
            .map(|p| Binding {
                host_ip: p.bind.to_string(),
                host_port: p.host,
                container_port: p.container_port(),
                protocol: p.protocol.to_string(),
            })
            .collect(),
        spec_hash: Some(unit.hash),
        context_hash: m.context_hash.clone(),
        store: Some(target.store.clone()),
        started_at: 1,
        exit_code: 0,
    }
}

struct Case {
    backend: BackendKind,
    state: State,
    observed: Vec<Container>,
    units: BTreeMap<String, String>,
    unit_states: BTreeMap<String, String>,
    changed: BTreeSet<String>,
    held: BTreeSet<String>,
}

impl Case {
    fn new(backend: BackendKind, apps: &[(&str, Desired)]) -> Case {
        Case {
            backend,
            state: state(apps),
            observed: Vec::new(),
            units: BTreeMap::new(),
            unit_states: BTreeMap::new(),
            changed: BTreeSet::new(),
            held: BTreeSet::new(),
        }
    }

    fn plan(&self, c: &Catalog) -> Plan {
        self.plan_for(c, &target())
    }

    fn plan_for(&self, c: &Catalog, target: &Target) -> Plan {
        plan(&World {
            backend: self.backend,
            catalog: c,
            target,
            state: &self.state,
            observed: &self.observed,
            unit_files: &self.units,
            unit_states: &self.unit_states,
            secrets_changed: &self.changed,
            held: &self.held,
        })
    }
}

/// Actions as short strings: `kind app (reason)`.
fn names(p: &Plan) -> Vec<String> {
    p.actions.iter().map(Action::describe).collect()
}

#[test]
fn install_runs_the_app() {
    let c = catalog();
    let p = Case::new(BackendKind::Podman, &[("fx-web", Desired::Running)]).plan(&c);
    assert_eq!(
        names(&p),
        ["run fx-web (install)", "probe fx-web (health)"],
        "health is checked right after the start"
    );
}

#[test]
fn a_dependent_waits_until_its_dependency_is_up() {
    let c = catalog();
    let mut case =
        Case::new(BackendKind::Podman, &[("fx-web", Desired::Running), ("fx-client", Desired::Running)]);
    assert_eq!(names(&case.plan(&c)), ["run fx-web (install)", "probe fx-web (health)"]);
    let mut starting = healthy(&c, "fx-web");
    starting.health = Health::Starting;
    case.observed = vec![starting];
    let p = case.plan(&c);
    assert_eq!(names(&p), ["probe fx-web (health)"], "the podman backend probes health itself");
    assert_eq!(p.waiting["fx-client"], "waiting for fx-web to be up");
    case.observed = vec![healthy(&c, "fx-web")];
    assert_eq!(names(&case.plan(&c)), ["run fx-client (install)", "probe fx-client (health)"]);
}

#[test]
fn a_converged_node_plans_nothing() {
    let c = catalog();
    for backend in [BackendKind::Podman, BackendKind::Quadlet] {
        let mut case = Case::new(backend, &[("fx-web", Desired::Running), ("fx-hostnet", Desired::Running)]);
        case.observed = vec![healthy(&c, "fx-web"), healthy(&c, "fx-hostnet")];
        if backend == BackendKind::Quadlet {
            for app in ["fx-web", "fx-hostnet"] {
                case.units.insert(app.into(), render(c.get(app).unwrap(), &target()).text);
            }
        }
        assert_eq!(case.plan(&c), Plan::default(), "{backend:?}");
    }
}

/// Found by the port-drift scenario: a hand-made container with the app's label but another
/// name hid the real one (the app showed as down, yet every tick was a no-op).
#[test]
fn stray_container_with_an_apps_label_is_removed() {
    let c = catalog();
    for backend in [BackendKind::Podman, BackendKind::Quadlet] {
        let mut case = Case::new(backend, &[("fx-web", Desired::Running)]);
        let mut stray = healthy(&c, "fx-web");
        stray.name = "fx-web".into();
        stray.spec_hash = None;
        case.observed = vec![healthy(&c, "fx-web"), stray];
        if backend == BackendKind::Quadlet {
            case.units.insert("fx-web".into(), render(c.get("fx-web").unwrap(), &target()).text);
        }
        assert_eq!(names(&case.plan(&c)), ["remove fx-web (orphan)"], "{backend:?}");
    }
}

#[test]
fn drift_of_spec_or_ports_recreates() {
    let c = catalog();
    let mut case = Case::new(BackendKind::Podman, &[("fx-web", Desired::Running)]);
    let mut stale = healthy(&c, "fx-web");
    stale.spec_hash = Some("older".into());
    case.observed = vec![stale];
    assert_eq!(names(&case.plan(&c)), ["run fx-web (drift(\"spec\"))", "probe fx-web (health)"]);
    let mut moved = healthy(&c, "fx-web");
    moved.ports[0].host_port = 8080; // the platform's REST port stuck on 8080
    case.observed = vec![moved];
    assert_eq!(names(&case.plan(&c)), ["run fx-web (drift(\"ports\"))", "probe fx-web (health)"]);
}

#[test]
fn a_regenerated_secret_recreates_the_owner_and_its_readers() {
    let c = catalog();
    let mut case =
        Case::new(BackendKind::Podman, &[("fx-web", Desired::Running), ("fx-client", Desired::Running)]);
    case.observed = vec![healthy(&c, "fx-web"), healthy(&c, "fx-client")];
    case.changed.insert("fx-web".into());
    assert_eq!(
        names(&case.plan(&c)),
        [
            "run fx-web (secretchanged)",
            "probe fx-web (health)",
            "run fx-client (secretchanged)",
            "probe fx-client (health)"
        ]
    );
}

#[test]
fn stopping_removes_the_container_dependents_first() {
    let c = catalog();
    let mut case =
        Case::new(BackendKind::Podman, &[("fx-web", Desired::Stopped), ("fx-client", Desired::Stopped)]);
    case.observed = vec![healthy(&c, "fx-web"), healthy(&c, "fx-client")];
    assert_eq!(names(&case.plan(&c)), ["remove fx-client (stop)", "remove fx-web (stop)"]);
}

#[test]
fn quadlet_stop_is_a_unit_stop_and_the_unit_file_goes() {
    let c = catalog();
    let mut case = Case::new(BackendKind::Quadlet, &[("fx-web", Desired::Stopped)]);
    case.observed = vec![healthy(&c, "fx-web")];
    case.units.insert("fx-web".into(), render(c.get("fx-web").unwrap(), &target()).text);
    assert_eq!(
        names(&case.plan(&c)),
        ["stop fx-web (stop)", "remove_unit fx-web (stop)", "daemon_reload - (unitchanged)"]
    );
}

/// The rule telling a stray from a lost app (ARCHITECTURE.md): a container made by hand for an
/// app this node does not have is removed; a container or unit of this store that the state
/// does not know is left for adoption; another store's container is never touched.
#[test]
fn strays_are_removed_lost_apps_kept_and_other_stores_untouched() {
    let c = catalog();
    let mut case = Case::new(BackendKind::Quadlet, &[]);
    let mut ghost = healthy(&c, "fx-web");
    (ghost.app, ghost.name, ghost.store) = ("ghost".into(), "archy-ghost".into(), None);
    let lost = healthy(&c, "fx-gateway");
    let mut other = healthy(&c, "fx-ui");
    other.store = Some("another-store".into());
    let mut theirs_stray = healthy(&c, "fx-client");
    (theirs_stray.name, theirs_stray.store) = ("ghost-client".into(), Some("another-store".into()));
    case.observed = vec![ghost, lost, other, theirs_stray];
    case.units.insert("old-app".into(), "# Generated by archy-agent ...".into());
    assert_eq!(names(&case.plan(&c)), ["remove ghost (orphan)"]);

    let mut case = Case::new(BackendKind::Podman, &[("fx-web", Desired::Absent)]);
    case.state.apps.get_mut("fx-web").unwrap().purge = true;
    assert_eq!(names(&case.plan(&c)), ["purge fx-web", "forget fx-web"]);
}

/// Explore bug 1 (found-8-9): an installed app's manifest broken by a catalog change panicked
/// the reconciler at `w.catalog.apps[app]` (the app is still named by a dependent's
/// `depends_on`), and nothing was reconciled again.
#[test]
fn bug1_an_app_missing_from_the_catalog_does_not_panic_the_planner() {
    let mut c = catalog();
    let web = healthy(&c, "fx-web");
    c.apps.remove("fx-web");
    let mut case = Case::new(
        BackendKind::Quadlet,
        &[("fx-web", Desired::Running), ("fx-client", Desired::Running), ("fx-gateway", Desired::Running)],
    );
    case.observed = vec![web];
    let p = case.plan(&c);
    assert!(!p.actions.iter().any(|a| a.describe().contains("fx-web")), "fx-web is left as it is: {p:?}");
    assert_eq!(p.waiting.get("fx-client").map(String::as_str), Some("waiting for fx-web to be up"));
}

#[test]
fn quadlet_install_writes_units_and_reloads_once() {
    let c = catalog();
    let case =
        Case::new(BackendKind::Quadlet, &[("fx-web", Desired::Running), ("fx-gateway", Desired::Running)]);
    assert_eq!(
        names(&case.plan(&c)),
        [
            // Dependency order: fx-client (not installed) pulls fx-web ahead of fx-gateway.
            "write_unit fx-web (install)",
            "write_unit fx-gateway (install)",
            "daemon_reload - (unitchanged)",
            // Podman 4: a start ends once the container runs, so its health check follows.
            "run fx-web (install)",
            "probe fx-web (health)",
            "run fx-gateway (install)",
            "probe fx-gateway (health)"
        ]
    );
    let podman5 = Target::new("5.0.0".parse().unwrap(), PathBuf::from("/data"));
    let p = case.plan_for(&c, &podman5);
    assert!(
        p.actions.iter().all(|a| !matches!(a, Action::Op(Op::Probe { .. } | Op::Run { wait: true, .. }, _))),
        "a start gated on health (Notify=healthy) is not waited for: {p:?}"
    );
}

#[test]
fn quadlet_leaves_a_starting_unit_to_systemd_and_resets_a_failed_one() {
    let c = catalog();
    let mut case = Case::new(BackendKind::Quadlet, &[("fx-web", Desired::Running)]);
    case.units.insert("fx-web".into(), render(c.get("fx-web").unwrap(), &target()).text);
    case.unit_states.insert("fx-web".into(), "activating".into());
    let p = case.plan(&c);
    assert_eq!(names(&p), Vec::<String>::new());
    assert_eq!(p.waiting["fx-web"], "systemd unit activating");
    case.unit_states.insert("fx-web".into(), "failed".into());
    let p = case.plan(&c);
    assert!(
        matches!(&p.actions[..], [Action::Op(Op::Run { reset_failed: true, .. }, Reason::Crashed)]),
        "{p:?}"
    );
}

#[test]
fn a_created_container_is_run_anew_by_the_podman_backend_and_started_by_its_unit_under_quadlet() {
    let c = catalog();
    let mut case = Case::new(BackendKind::Podman, &[("fx-web", Desired::Running)]);
    let mut created = healthy(&c, "fx-web");
    created.state = ContainerState::Created;
    case.observed.push(created);
    assert_eq!(names(&case.plan(&c)), ["run fx-web (start)", "probe fx-web (health)"]);
    case.backend = BackendKind::Quadlet;
    case.units.insert("fx-web".into(), render(c.get("fx-web").unwrap(), &target()).text);
    assert_eq!(names(&case.plan(&c)), ["start fx-web (start)"]);
}

#[test]
fn exited_containers_follow_the_restart_policy() {
    let c = catalog();
    for (app, code, want) in [
        ("fx-crashloop", 1, vec!["start fx-crashloop (crashed)"]), // restart: always
        ("fx-client", 1, vec!["start fx-client (crashed)", "probe fx-client (health)"]), // on-failure, failed
        ("fx-client", 0, vec![]),                                  // on-failure, clean exit
    ] {
        let mut case = Case::new(BackendKind::Podman, &[(app, Desired::Running)]);
        if app == "fx-client" {
            case.state.apps.insert("fx-web".into(), AppState::new(Desired::Running));
            case.observed.push(healthy(&c, "fx-web"));
        }
        let mut exited = healthy(&c, app);
        exited.state = ContainerState::Exited;
        exited.exit_code = code;
        case.observed.push(exited.clone());
        assert_eq!(names(&case.plan(&c)), want, "{app} exit {code}");
        case.held.insert(app.into());
        assert!(names(&case.plan(&c)).is_empty(), "{app} is held by backoff");
    }
}

#[test]
fn a_local_image_is_built_before_its_container_and_rebuilt_when_its_context_changes() {
    let c = catalog();
    let mut case = Case::new(BackendKind::Podman, &[("fx-ui", Desired::Running)]);
    assert_eq!(
        names(&case.plan(&c)),
        ["build fx-ui (install)", "run fx-ui (install)", "probe fx-ui (health)"]
    );
    case.observed = vec![healthy(&c, "fx-ui")];
    assert!(names(&case.plan(&c)).is_empty());
    let mut old = healthy(&c, "fx-ui");
    old.context_hash = Some("before".into());
    old.spec_hash = Some("before".into()); // the hash label is part of the unit
    case.observed = vec![old];
    assert_eq!(
        names(&case.plan(&c)),
        ["build fx-ui (drift(\"image\"))", "run fx-ui (drift(\"spec\"))", "probe fx-ui (health)"]
    );
}

/// An in-memory runtime: containers appear healthy on Run (a new one each time), vanish on
/// Remove; apps in `crashes` exit after every start.
struct Fake {
    world: FakeWorld,
    catalog: Catalog,
    target: Target,
}

/// Something that happens while the reconciler applies an operation (a request landing).
type During = Box<dyn FnOnce() + Send>;

/// What a test changes under a running reconciler: which apps crash, the containers and unit
/// files, operations (by kind) that fail, and what happens during the next operation.
#[derive(Clone, Default)]
struct FakeWorld {
    crashes: Arc<Mutex<BTreeSet<String>>>,
    containers: Arc<Mutex<Vec<Container>>>,
    units: Arc<Mutex<BTreeMap<String, String>>>,
    failing: Arc<Mutex<BTreeSet<&'static str>>>,
    during: Arc<Mutex<Vec<During>>>,
    applied: Arc<Mutex<Vec<String>>>,
}

impl Runtime for Fake {
    fn kind(&self) -> BackendKind {
        BackendKind::Podman
    }
    fn observe(&self) -> Result<Vec<Container>, runtime::Error> {
        if self.world.failing.lock().unwrap().contains("ps") {
            let source = std::io::Error::other("podman failing");
            return Err(runtime::Error::Io { path: "/fake".into(), source });
        }
        Ok(self.world.containers.lock().unwrap().clone())
    }
    fn unit_files(&self) -> Result<BTreeMap<String, String>, runtime::Error> {
        Ok(self.world.units.lock().unwrap().clone())
    }
    fn unit_states(&self, _: &[&str]) -> Result<BTreeMap<String, String>, runtime::Error> {
        Ok(BTreeMap::new())
    }
    fn probe(&self, _: &str) -> Result<bool, runtime::Error> {
        Ok(false) // healthy() containers are already healthy; probes are not needed here
    }
    fn apply(&self, op: &Op) -> Result<(), runtime::Error> {
        for f in std::mem::take(&mut *self.world.during.lock().unwrap()) {
            f();
        }
        self.world.applied.lock().unwrap().push(op.kind().to_string());
        if self.world.failing.lock().unwrap().contains(op.kind()) {
            let source = std::io::Error::other("injected");
            return Err(runtime::Error::Io { path: "/fake".into(), source });
        }
        let mut cs = self.world.containers.lock().unwrap();
        match op {
            Op::Run { app, .. } | Op::Start { app } => {
                let n = cs.iter().map(|c| c.started_at).max().unwrap_or(0) + 1;
                cs.retain(|c| &c.app != app);
                let mut c = healthy_on(&self.catalog, app, &self.target);
                (c.id, c.started_at) = (format!("id-{app}-{n}"), n);
                if self.world.crashes.lock().unwrap().contains(app) {
                    c.state = ContainerState::Exited;
                    c.exit_code = 1;
                }
                cs.push(c);
            }
            Op::Remove { app, .. } => cs.retain(|c| &c.app != app),
            _ => {}
        }
        Ok(())
    }
}

fn reconciler(dir: &std::path::Path, crashes: &[&str], apps: &[(&str, Desired)]) -> Reconciler {
    let world = FakeWorld::default();
    world.crashes.lock().unwrap().extend(crashes.iter().map(|s| s.to_string()));
    reconciler_in(dir, world, apps)
}

fn reconciler_in(dir: &std::path::Path, world: FakeWorld, apps: &[(&str, Desired)]) -> Reconciler {
    let metrics = Arc::new(Metrics::new("podman"));
    let exec = Arc::new(Exec::new(
        ExecConfig {
            podman: "/nonexistent/podman".into(),
            podman_args: vec![],
            systemctl: "/nonexistent/systemctl".into(),
            podman_cgroup: None,
            timeout: std::time::Duration::from_secs(1),
        },
        metrics.clone(),
    ));
    let (mut store, _) = Store::open(dir).unwrap();
    store.update(|s| *s = state(apps)).unwrap();
    let shared = Arc::new(Shared::new(store, metrics, Instant::now()));
    let target = Target::new("4.3.1".parse().unwrap(), dir.to_path_buf());
    let fake = Fake { world, catalog: catalog(), target: target.clone() };
    Reconciler::new(Box::new(fake), exec, repo_root().join("apps"), target, shared)
}

#[test]
fn fake_node_converges_and_then_ticks_are_no_ops() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = reconciler(dir.path(), &[], &[("fx-web", Desired::Running), ("fx-client", Desired::Running)]);
    let first = r.tick();
    assert_eq!(first.actions, ["run fx-web (install)", "probe fx-web (health)"], "{first:?}");
    let second = r.tick();
    assert_eq!(second.actions, ["run fx-client (install)", "probe fx-client (health)"], "{second:?}");
    let third = r.tick();
    assert!(third.converged && third.actions.is_empty(), "{third:?}");
    // Secrets were made on the way, in the data root's secrets directory.
    assert!(dir.path().join("secrets/fx-web/api-token").is_file());
    assert!(dir.path().join("secrets/fx-client/.env").is_file());
}

#[test]
fn a_crash_loop_backs_off_instead_of_spinning() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = reconciler(dir.path(), &["fx-crashloop"], &[("fx-crashloop", Desired::Running)]);
    let actions: Vec<String> = (0..20).flat_map(|_| r.tick().actions).collect();
    // Install, then one restart right away; every later one waits 1 s, 2 s, ... .
    assert!(
        (1..=3).contains(&actions.len()),
        "{} starts in 20 back-to-back ticks: {actions:?}",
        actions.len()
    );
    let status = r.shared.status.lock().unwrap();
    assert_eq!(status.apps["fx-crashloop"].waiting.as_deref(), Some("backing off after a failure"));
}

#[test]
fn an_app_whose_secret_source_is_not_installed_waits_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = reconciler(dir.path(), &[], &[("fx-client", Desired::Running)]);
    let t = r.tick();
    assert!(t.actions.is_empty(), "{t:?}");
    let status = r.shared.status.lock().unwrap();
    assert_eq!(
        status.apps["fx-client"].waiting.as_deref(),
        Some("secrets not ready: fx-web/api-token (missing)")
    );
}

/// Release run, secret scenarios x20: fx-client crash-looped while fx-web's secret was gone,
/// and once the agent healed it, fx-client stayed "backing off after a failure" for longer
/// than any convergence window. A healed secret forgives its readers' earlier failures.
#[test]
fn a_healed_secret_resets_its_readers_backoff() {
    let dir = tempfile::tempdir().unwrap();
    let world = FakeWorld::default();
    world.crashes.lock().unwrap().insert("fx-client".into());
    let mut r = reconciler_in(
        dir.path(),
        world.clone(),
        &[("fx-web", Desired::Running), ("fx-client", Desired::Running)],
    );
    for _ in 0..20 {
        r.tick();
    }
    assert_eq!(
        r.shared.status.lock().unwrap().apps["fx-client"].waiting.as_deref(),
        Some("backing off after a failure")
    );
    // The cause goes away and the secret it read is regenerated.
    world.crashes.lock().unwrap().clear();
    std::fs::remove_file(dir.path().join("secrets/fx-web/api-token")).unwrap();
    let healed = r.tick();
    assert!(healed.actions.contains(&"run fx-client (secretchanged)".to_string()), "{healed:?}");
    let next = r.tick();
    assert!(next.converged, "{next:?}");
}

fn metric(r: &Reconciler, series: &str) -> Option<f64> {
    let text = r.shared.metrics.render();
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Dashboard work: under Quadlet, systemd restarts a crashed container and the agent first
/// sees the new one while probing its health; such restarts went uncounted, so the crash-loop
/// alert could not fire for apps with a health check.
#[test]
fn restarts_first_seen_during_a_health_probe_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    let world = FakeWorld::default();
    let mut r = reconciler_in(dir.path(), world.clone(), &[("fx-web", Desired::Running)]);
    for _ in 0..3 {
        r.tick();
    }
    let restarts = "archy_agent_app_restarts_total{app=\"fx-web\"}";
    assert_eq!(metric(&r, restarts), Some(0.0), "the agent's own install is no restart");
    for n in 1..=2 {
        // Restarted behind the agent's back, not healthy yet: the agent probes it.
        let mut cs = world.containers.lock().unwrap();
        let c = cs.iter_mut().find(|c| c.app == "fx-web").unwrap();
        (c.id, c.started_at, c.health) = (format!("restarted-{n}"), 100 + n, Health::Starting);
        drop(cs);
        r.tick();
        let waiting = r.shared.status.lock().unwrap().apps["fx-web"].waiting.clone();
        assert_eq!(waiting.as_deref(), Some("waiting for its health check"));
        assert_eq!(metric(&r, restarts), Some(n as f64));
    }
    // A restart the agent asks for (a changed secret) is not counted.
    std::fs::remove_file(dir.path().join("secrets/fx-web/api-token")).unwrap();
    for _ in 0..3 {
        r.tick();
    }
    assert_eq!(metric(&r, restarts), Some(2.0));
}

/// Dashboard work: `app_up` of an uninstalled app stayed at its last value (ArchyAppDown on an
/// app that is gone) and a stopped app looked like a down one.
#[test]
fn app_series_say_the_desired_state_and_go_with_the_app() {
    let dir = tempfile::tempdir().unwrap();
    let mut r =
        reconciler(dir.path(), &[], &[("fx-web", Desired::Running), ("fx-gateway", Desired::Stopped)]);
    r.tick();
    let desired = |r: &Reconciler, app: &str, state: &str| {
        metric(r, &format!("archy_agent_app_desired{{app=\"{app}\",state=\"{state}\"}}"))
    };
    assert_eq!(desired(&r, "fx-web", "running"), Some(1.0));
    assert_eq!(desired(&r, "fx-web", "stopped"), Some(0.0));
    assert_eq!(desired(&r, "fx-gateway", "stopped"), Some(1.0));
    assert_eq!(metric(&r, "archy_agent_app_up{app=\"fx-gateway\"}"), Some(0.0));

    r.shared
        .store
        .lock()
        .unwrap()
        .update(|s| s.apps.get_mut("fx-web").unwrap().desired = Desired::Absent)
        .unwrap();
    for _ in 0..3 {
        r.tick();
    }
    assert!(!r.shared.status.lock().unwrap().apps.contains_key("fx-web"), "fx-web forgotten");
    let text = r.shared.metrics.render();
    for gone in [
        "archy_agent_app_up{app=\"fx-web\"}",
        "archy_agent_app_desired{app=\"fx-web\"",
        "archy_agent_app_error{app=\"fx-web\"}",
    ] {
        assert!(!text.contains(gone), "{gone} stays after uninstall:\n{text}");
    }
}

/// Explore defect C (proof seeds 204-206): purge acknowledged, install acknowledged 0.6 s
/// later, and the app was gone: the tick's Forget, planned for the purge, erased the install.
#[test]
fn a_forget_planned_for_a_purge_does_not_erase_a_later_install() {
    let dir = tempfile::tempdir().unwrap();
    let world = FakeWorld::default();
    let mut r = reconciler_in(dir.path(), world.clone(), &[("fx-web", Desired::Running)]);
    r.tick();
    let secret = dir.path().join("secrets/fx-web/api-token");
    let before = std::fs::read(&secret).unwrap();
    let purge = |s: &mut State| {
        s.apps.insert("fx-web".into(), AppState { purge: true, ..AppState::new(Desired::Absent) })
    };
    r.shared.store.lock().unwrap().request("fx-web", purge).unwrap();
    r.tick(); // removes the container
              // The next tick purges and forgets; the install lands during its first operation.
    r.shared
        .store
        .lock()
        .unwrap()
        .request("fx-gateway", |s| s.apps.insert("fx-gateway".into(), AppState::new(Desired::Running)))
        .unwrap();
    let shared = r.shared.clone();
    world.during.lock().unwrap().push(Box::new(move || {
        let install = |s: &mut State| s.apps.insert("fx-web".into(), AppState::new(Desired::Running));
        shared.store.lock().unwrap().request("fx-web", install).unwrap();
    }));
    let t = r.tick();
    assert!(t.actions.iter().any(|a| a == "forget fx-web"), "{t:?}");
    let state = r.shared.store.lock().unwrap().state().clone();
    assert_eq!(state.apps.get("fx-web").map(|a| a.desired), Some(Desired::Running), "{state:?}");
    assert_eq!(
        std::fs::read(&secret).ok(),
        Some(before),
        "the purge of the old request spared the new install"
    );
    let t = r.tick();
    assert!(t.actions.contains(&"run fx-web (install)".to_string()), "{t:?}");
}

fn ours(dir: &std::path::Path, app: &str) -> Container {
    healthy_on(&catalog(), app, &Target::new("4.3.1".parse().unwrap(), dir.to_path_buf()))
}

/// Explore bug 2 (found-22-52): after the state and its copy were lost, a request landing
/// before the first tick cleared the adoption and the tick removed running apps as orphans.
#[test]
fn bug2_apps_the_state_lost_are_adopted_even_after_a_request_lands_first() {
    let dir = tempfile::tempdir().unwrap();
    let world = FakeWorld::default();
    world.containers.lock().unwrap().push(ours(dir.path(), "fx-web"));
    let mut r = reconciler_in(dir.path(), world.clone(), &[]);
    r.shared
        .store
        .lock()
        .unwrap()
        .request("fx-ui", |s| s.apps.insert("fx-ui".into(), AppState::new(Desired::Running)))
        .unwrap();
    let t = r.tick();
    assert!(!t.actions.iter().any(|a| a.contains("fx-web") && a.contains("remove")), "{t:?}");
    let state = r.shared.store.lock().unwrap().state().clone();
    assert_eq!(state.apps.get("fx-web").map(|a| a.desired), Some(Desired::Running), "adopted: {state:?}");
    assert!(world.containers.lock().unwrap().iter().any(|c| c.app == "fx-web"));
}

/// Explore bug 3 (seed 35): the adoption cleared its flag before its save, the save failed on
/// a full data root, and the next tick removed every container. A failed save of the adoption
/// means no action at all; the next tick adopts again.
#[test]
fn bug3_an_adoption_that_cannot_be_saved_does_nothing_until_it_can() {
    let dir = tempfile::tempdir().unwrap();
    let world = FakeWorld::default();
    world.containers.lock().unwrap().push(ours(dir.path(), "fx-web"));
    let mut r = reconciler_in(dir.path(), world.clone(), &[]);
    // A directory where the state file goes: every save fails, even for root.
    let state_file = dir.path().join("state.json");
    std::fs::remove_file(&state_file).ok();
    std::fs::create_dir(&state_file).unwrap();
    for _ in 0..3 {
        let t = r.tick();
        assert!(t.error.as_deref().is_some_and(|e| e.contains("cannot save the adoption")), "{t:?}");
        assert!(t.actions.is_empty() && world.applied.lock().unwrap().is_empty(), "{t:?}");
    }
    std::fs::remove_dir(&state_file).unwrap();
    let t = r.tick();
    assert!(t.error.is_none() && !t.actions.iter().any(|a| a.contains("remove")), "{t:?}");
    assert!(r.shared.store.lock().unwrap().state().apps.contains_key("fx-web"));
    assert_eq!(world.containers.lock().unwrap().len(), 1);
}

/// Explore defect D (proof seed 202): adoption looked at running containers only, so an app
/// whose container was between two starts lost its Quadlet unit as an orphan. The unit file
/// is evidence too.
#[test]
fn an_app_seen_only_by_its_unit_file_is_adopted_not_removed() {
    let dir = tempfile::tempdir().unwrap();
    let world = FakeWorld::default();
    world.units.lock().unwrap().insert("fx-web".into(), "# Generated by archy-agent".into());
    let mut r = reconciler_in(dir.path(), world.clone(), &[]);
    let t = r.tick();
    assert!(!t.actions.iter().any(|a| a.contains("remove")), "{t:?}");
    let state = r.shared.store.lock().unwrap().state().clone();
    assert_eq!(state.apps.get("fx-web").map(|a| a.desired), Some(Desired::Running), "{state:?}");
}

/// A failing `podman rm` was retried every tick, 10 times a second while anything else was
/// in motion. Removals back off like starts.
#[test]
fn a_removal_that_keeps_failing_backs_off() {
    let dir = tempfile::tempdir().unwrap();
    let world = FakeWorld::default();
    let mut r = reconciler_in(dir.path(), world.clone(), &[("fx-web", Desired::Running)]);
    r.tick();
    world.failing.lock().unwrap().insert("remove");
    r.shared
        .store
        .lock()
        .unwrap()
        .request("fx-web", |s| s.apps.insert("fx-web".into(), AppState::new(Desired::Stopped)))
        .unwrap();
    world.applied.lock().unwrap().clear();
    for _ in 0..20 {
        r.tick();
    }
    let tries = world.applied.lock().unwrap().iter().filter(|k| *k == "remove").count();
    assert!((1..=2).contains(&tries), "{tries} removals in 20 back-to-back ticks");
    let waiting = r.shared.status.lock().unwrap().apps["fx-web"].waiting.clone();
    assert_eq!(waiting.as_deref(), Some("backing off after a failed remove"));
}

/// Data an app writes 0644 (LND's macaroons) was readable by every local user: the app's
/// directory and the data root are the service user's alone.
#[test]
fn app_data_directories_are_not_readable_by_other_users() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut r = reconciler(dir.path(), &[], &[("fx-web", Desired::Running)]);
    r.tick();
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(dir.path()), 0o700, "the data root");
    assert_eq!(mode(&dir.path().join("apps")), 0o700);
    assert_eq!(mode(&dir.path().join("apps/fx-web")), 0o700);
}

/// Explore seed 302: killed at `unit_written` (the unit file written, the daemon-reload not
/// done), the agent came back to a unit file that matched and a unit systemd did not know:
/// `systemctl restart` answered "Unit not found" every backoff, for ever.
#[test]
fn a_unit_written_but_never_loaded_is_reloaded_then_started() {
    let c = catalog();
    let mut case = Case::new(BackendKind::Quadlet, &[("fx-web", Desired::Running)]);
    case.units.insert("fx-web".into(), render(c.get("fx-web").unwrap(), &target()).text);
    case.unit_states.insert("fx-web".into(), runtime::NOT_LOADED.into());
    assert_eq!(
        names(&case.plan(&c)),
        ["daemon_reload - (unitchanged)", "run fx-web (install)", "probe fx-web (health)"]
    );
}

/// Explore seed 311: a secret made world-readable while podman failed stayed so for as long
/// as podman failed (every pass stopped at `podman ps`, before the secrets). Secrets are
/// files: healed first, and the restart of the apps that read them waits for a pass that acts.
#[test]
fn a_damaged_secret_is_healed_while_podman_fails_and_its_app_restarted_after() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let world = FakeWorld::default();
    let mut r = reconciler_in(dir.path(), world.clone(), &[("fx-web", Desired::Running)]);
    r.tick();
    let secret = dir.path().join("secrets/fx-web/api-token");
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    world.failing.lock().unwrap().insert("ps");
    let t = r.tick();
    assert!(t.error.is_some(), "{t:?}");
    assert_eq!(std::fs::metadata(&secret).unwrap().permissions().mode() & 0o777, 0o600);
    world.failing.lock().unwrap().clear();
    let t = r.tick();
    assert!(t.actions.contains(&"run fx-web (secretchanged)".to_string()), "{t:?}");
}

/// Explore seed 314: with the data root read-only, `forget` failed and was retried on every
/// tick (ten a second while anything was in motion). Desired-state writes back off too.
#[test]
fn a_forget_that_cannot_be_saved_backs_off() {
    let dir = tempfile::tempdir().unwrap();
    let world = FakeWorld::default();
    let mut r = reconciler_in(dir.path(), world.clone(), &[("fx-web", Desired::Absent)]);
    let state_file = dir.path().join("state.json");
    std::fs::remove_file(&state_file).unwrap();
    std::fs::create_dir(&state_file).unwrap();
    let failed: usize =
        (0..20).map(|_| r.tick().failed.iter().filter(|f| f.starts_with("forget")).count()).sum();
    assert!((1..=2).contains(&failed), "{failed} failed forgets in 20 back-to-back ticks");
}

/// Suspected in the explore issue: an acknowledged uninstall of an app whose manifest no
/// longer loads was never carried out. It is: removal needs nothing from the manifest.
#[test]
fn an_app_whose_manifest_broke_is_still_uninstalled_and_purged() {
    let mut c = catalog();
    let web = healthy(&c, "fx-web");
    c.apps.remove("fx-web");
    let mut case = Case::new(BackendKind::Podman, &[("fx-web", Desired::Absent)]);
    case.state.apps.get_mut("fx-web").unwrap().purge = true;
    case.observed = vec![web];
    assert_eq!(names(&case.plan(&c)), ["remove fx-web (uninstall)"]);
    case.observed.clear();
    assert_eq!(names(&case.plan(&c)), ["purge fx-web", "forget fx-web"]);
}
