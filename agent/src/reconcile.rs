//! The level-triggered reconciler. Each tick: observe (one podman call), ensure secrets,
//! [`plan`] (a pure function of what was read), apply, report. Nothing relies on having seen
//! an event: whatever happened between two ticks, the next one drives the node back to the
//! desired state.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::exec::{Exec, Tool};
use crate::failpoint;
use crate::manifest::{Catalog, Manifest, Problem, Restart};
use crate::metrics::Metrics;
use crate::quadlet::{self, Target};
use crate::runtime::{BackendKind, Container, ContainerState, Health, Op, Runtime};
use crate::secrets::{self, Outcome};
use crate::store::{AppState, Desired, State, Store};

/// Why an action is taken: shown in logs, the API and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    Install,
    Start,
    Stop,
    Restart,
    Uninstall,
    Orphan,
    /// The container or unit no longer matches the manifest: `spec`, `ports`, `unit_file`, `image`.
    Drift(&'static str),
    SecretChanged,
    Crashed,
    Health,
    UnitChanged,
}

/// What to do. The desired-state actions carry the generation of the app's entry they were
/// planned for, and do nothing once a later request changed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Op(Op, Reason),
    /// Delete the app's data and secrets (uninstall with purge).
    Purge {
        app: String,
        generation: u64,
    },
    /// Drop an uninstalled app from the desired state.
    Forget {
        app: String,
        generation: u64,
    },
    /// A requested restart is done.
    ClearRestart {
        app: String,
        generation: u64,
    },
}

impl Action {
    pub fn describe(&self) -> String {
        match self {
            Action::Op(op, reason) => {
                format!("{} {} ({reason:?})", op.kind(), op.app().unwrap_or("-")).to_lowercase()
            }
            Action::Purge { app, .. } => format!("purge {app}"),
            Action::Forget { app, .. } => format!("forget {app}"),
            Action::ClearRestart { app, .. } => format!("clear_restart {app}"),
        }
    }

    pub fn app(&self) -> Option<&str> {
        match self {
            Action::Op(op, _) => op.app(),
            Action::Purge { app, .. } | Action::Forget { app, .. } | Action::ClearRestart { app, .. } => {
                Some(app)
            }
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Action::Op(op, _) => op.kind(),
            Action::Purge { .. } => "purge",
            Action::Forget { .. } => "forget",
            Action::ClearRestart { .. } => "clear_restart",
        }
    }

    /// Starts back off through `held` in the plan; every other action through a retry delay.
    fn starts(&self) -> bool {
        matches!(self, Action::Op(Op::Run { .. } | Op::Start { .. } | Op::Build { .. } | Op::Probe { .. }, _))
    }

    /// Whether it destroys something of the app: a container, a unit file, data.
    pub fn destroys(&self) -> bool {
        matches!(self, Action::Purge { .. } | Action::Forget { .. })
            || matches!(self, Action::Op(Op::Stop { .. } | Op::Remove { .. } | Op::RemoveUnit { .. }, _))
    }
}

/// Whose a container carrying the app label is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    /// Made by another store (another agent or data root of the same user): never touched.
    Other,
    /// Not the app's container: another name, or made by hand (no store identity) for an app
    /// this node neither has nor knows. Removed.
    Stray,
    /// The app's container. If the state does not know the app, the state lost it: adopted.
    App,
}

/// The one rule telling a stray container from one the store lost (ARCHITECTURE.md).
pub fn owner(c: &Container, target: &Target, state: &State, catalog: &Catalog) -> Owner {
    match c.store.as_deref() {
        Some(s) if s != target.store => Owner::Other,
        _ if c.name != crate::runtime::container_name(&c.app) => Owner::Stray,
        Some(_) => Owner::App,
        None if state.apps.contains_key(&c.app) || catalog.get(&c.app).is_some() => Owner::App,
        None => Owner::Stray,
    }
}

/// Everything [`plan`] looks at, read once per tick.
pub struct World<'a> {
    pub backend: BackendKind,
    pub catalog: &'a Catalog,
    pub target: &'a Target,
    pub state: &'a State,
    pub observed: &'a [Container],
    /// Unit files on disk by app (quadlet backend).
    pub unit_files: &'a BTreeMap<String, String>,
    /// systemd's `ActiveState` of units of apps that should run but have no container.
    pub unit_states: &'a BTreeMap<String, String>,
    /// Apps whose own secrets were rewritten this tick.
    pub secrets_changed: &'a BTreeSet<String>,
    /// Apps that must not be (re)started this tick: backing off, or in error.
    pub held: &'a BTreeSet<String>,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Plan {
    pub actions: Vec<Action>,
    /// Apps not acted on yet, and why (a dependency not up, backing off, starting).
    pub waiting: BTreeMap<String, String>,
}

/// Running and, when it has a health check, healthy.
pub fn is_up(c: &Container, m: &Manifest) -> bool {
    c.state == ContainerState::Running && (m.health.is_none() || c.health == Health::Healthy)
}

fn ports_match(c: &Container, unit_ports: &[(String, u16, u16, String)]) -> bool {
    let mut want: Vec<_> = unit_ports.to_vec();
    want.sort();
    let mut got: Vec<_> = c
        .ports
        .iter()
        .map(|b| (b.host_ip.clone(), b.host_port, b.container_port, b.protocol.clone()))
        .collect();
    got.sort();
    want == got
}

fn expected_ports(m: &Manifest) -> Vec<(String, u16, u16, String)> {
    if m.network == crate::manifest::Network::Host {
        return Vec::new();
    }
    m.ports.iter().map(|p| (p.bind.to_string(), p.host, p.container_port(), p.protocol.to_string())).collect()
}

/// Apps in dependency order (dependencies first); the catalog is acyclic.
fn order(catalog: &Catalog) -> Vec<&str> {
    fn visit<'a>(c: &'a Catalog, id: &'a str, out: &mut Vec<&'a str>) {
        if out.contains(&id) {
            return;
        }
        if let Some(m) = c.get(id) {
            for d in &m.depends_on {
                visit(c, d, out);
            }
        }
        out.push(id);
    }
    let mut out = Vec::new();
    for id in catalog.apps.keys() {
        visit(catalog, id, &mut out);
    }
    out
}

/// Decides what to do. Pure: the same world gives the same plan.
pub fn plan(w: &World) -> Plan {
    let mut p = Plan::default();
    let quadlet = w.backend == BackendKind::Quadlet;
    let whose = |c: &Container| owner(c, w.target, w.state, w.catalog);
    let containers: BTreeMap<&str, &Container> =
        w.observed.iter().filter(|c| whose(c) == Owner::App).map(|c| (c.app.as_str(), c)).collect();
    let desired = |app: &str| w.state.apps.get(app).map(|a| a.desired);
    let mut stops = Vec::new();
    let mut units = Vec::new();
    let mut starts = Vec::new();
    let mut after = Vec::new();
    let mut reload = false;

    // Containers and units of apps that should not run: stop, remove, forget. Only what the
    // desired state says explicitly: an app it does not know is adopted, never removed.
    for c in w.observed {
        let timeout = w.catalog.get(&c.app).map_or(10, |m| m.stop_timeout.0.as_secs());
        let (app, container) = (c.app.clone(), c.name.clone());
        let reason = match (whose(c), desired(&c.app)) {
            (Owner::Other, _) | (Owner::App, None | Some(Desired::Running)) => continue,
            (Owner::Stray, _) => Reason::Orphan,
            (Owner::App, Some(Desired::Stopped)) => Reason::Stop,
            (Owner::App, Some(Desired::Absent)) => Reason::Uninstall,
        };
        // A stopped app has no container under either backend (Quadlet runs `--rm`), so an
        // exited container of an app that should run is always a crash.
        if reason != Reason::Orphan && quadlet && w.unit_files.contains_key(&c.app) {
            stops.push(Action::Op(Op::Stop { app, timeout }, reason));
        } else {
            stops.push(Action::Op(Op::Remove { app, container, timeout }, reason));
        }
    }
    for app in w.unit_files.keys() {
        let reason = match desired(app) {
            None | Some(Desired::Running) => continue,
            Some(Desired::Absent) => Reason::Uninstall,
            Some(Desired::Stopped) => Reason::Stop,
        };
        units.push(Action::Op(Op::RemoveUnit { app: app.clone() }, reason));
    }
    for (app, s) in &w.state.apps {
        if s.desired == Desired::Absent
            && !containers.contains_key(app.as_str())
            && !w.unit_files.contains_key(app)
        {
            let generation = s.generation;
            if s.purge {
                after.push(Action::Purge { app: app.clone(), generation });
            }
            after.push(Action::Forget { app: app.clone(), generation });
        }
    }

    // Apps that should run, dependencies first. One whose manifest does not load is left as
    // it is: its error is its status.
    for app in order(w.catalog) {
        let Some(AppState { desired: Desired::Running, restart, generation, .. }) = w.state.apps.get(app)
        else {
            continue;
        };
        let Some(m) = w.catalog.get(app) else { continue };
        let unit = quadlet::render(m, w.target);
        let c = containers.get(app).copied();
        let mut run: Option<Reason> = None;
        let mut unit_written = false;

        if quadlet && w.unit_files.get(app) != Some(&unit.text) {
            let reason =
                if w.unit_files.contains_key(app) { Reason::Drift("unit_file") } else { Reason::Install };
            units.push(Action::Op(Op::WriteUnit { app: app.into(), unit: unit.clone() }, reason));
            unit_written = true;
            if c.is_some() {
                run = Some(Reason::UnitChanged);
            }
        }
        let deps_down: Vec<&str> = m
            .depends_on
            .iter()
            .filter(|d| !containers.get(d.as_str()).zip(w.catalog.get(d)).is_some_and(|(c, dm)| is_up(c, dm)))
            .map(String::as_str)
            .collect();
        if let Some(c) = c {
            if c.spec_hash.as_deref() != Some(unit.hash.as_str()) {
                run = run.or(Some(Reason::Drift("spec")));
            } else if c.state == ContainerState::Running && !ports_match(c, &expected_ports(m)) {
                run = run.or(Some(Reason::Drift("ports")));
            }
            let readers_of = |owner: &str| owner == app || m.secret_files.iter().any(|r| r.app == owner);
            if w.secrets_changed.iter().any(|o| readers_of(o)) {
                run = run.or(Some(Reason::SecretChanged));
            }
            if *restart {
                run = run.or(Some(Reason::Restart));
                after.push(Action::ClearRestart { app: app.into(), generation: *generation });
            }
        }
        let build = m
            .build
            .as_ref()
            .filter(|_| c.and_then(|c| c.context_hash.as_ref()) != m.context_hash.as_ref() || c.is_none());

        let mut op = match (c, run) {
            (_, Some(reason)) => Some((
                Op::Run { app: app.into(), unit: unit.clone(), reset_failed: false, wait: false },
                reason,
            )),
            (None, None) => {
                // Under quadlet a missing container is systemd's business while its unit is
                // starting or restarting; once systemd gave up (failed, start limit) or the
                // unit is new, the agent starts it, resetting the failure first.
                let state = w.unit_states.get(app).map(String::as_str);
                if quadlet
                    && !unit_written
                    && matches!(state, Some("active" | "activating" | "reloading" | "deactivating"))
                {
                    p.waiting.insert(app.into(), format!("systemd unit {}", state.unwrap_or_default()));
                    continue;
                }
                // Written, but never loaded (the agent died before its daemon-reload): an
                // install to finish, not a crash.
                let loaded = state != Some(crate::runtime::NOT_LOADED);
                reload |= quadlet && !unit_written && !loaded;
                let crashed = quadlet && !unit_written && loaded;
                if crashed && m.restart == Restart::No {
                    p.waiting.insert(app.into(), "exited (restart: no)".into());
                    continue;
                }
                let reason = if crashed { Reason::Crashed } else { Reason::Install };
                // An install waits for its start (nothing to stop; the pull is as inline as
                // `podman run`'s) so that its health check follows at once, not a tick later.
                let wait = quadlet && reason == Reason::Install && !w.target.start_waits_for_health(m);
                Some((
                    Op::Run {
                        app: app.into(),
                        unit: unit.clone(),
                        reset_failed: state == Some("failed"),
                        wait,
                    },
                    reason,
                ))
            }
            (Some(c), None) => match c.state {
                // Not healthy yet: the agent checks now rather than wait for podman's timer
                // (the podman backend has none; under Quadlet the first is one interval away).
                ContainerState::Running if !is_up(c, m) && m.health.is_some() => {
                    Some((Op::Probe { app: app.into() }, Reason::Health))
                }
                ContainerState::Running | ContainerState::Stopping | ContainerState::Paused => None,
                // A `podman run` that never got to start: killed midway, its storage may be
                // half made, which `podman start` never heals. `run --replace` makes it anew
                // (under Quadlet the unit's own `run --replace` does).
                ContainerState::Created if !quadlet => Some((
                    Op::Run { app: app.into(), unit: unit.clone(), reset_failed: false, wait: false },
                    Reason::Start,
                )),
                ContainerState::Created => Some((Op::Start { app: app.into() }, Reason::Start)),
                ContainerState::Exited | ContainerState::Other => {
                    let restart = match m.restart {
                        Restart::Always => true,
                        Restart::OnFailure => c.exit_code != 0,
                        Restart::No => false,
                    };
                    if quadlet || !restart {
                        // systemd owns restarts under quadlet; `restart: no` means what it says.
                        p.waiting.insert(app.into(), format!("exited with code {}", c.exit_code));
                        None
                    } else {
                        Some((Op::Start { app: app.into() }, Reason::Crashed))
                    }
                }
            },
        };
        let starting = matches!(op, Some((Op::Run { .. } | Op::Start { .. }, _)));
        if starting && !deps_down.is_empty() {
            p.waiting.insert(app.into(), format!("waiting for {} to be up", deps_down.join(", ")));
            op = None;
        } else if starting && w.held.contains(app) {
            p.waiting.insert(app.into(), "backing off after a failure".into());
            op = None;
        }
        if let Some((op, reason)) = op {
            if let (Some(b), Op::Run { .. }) = (build, &op) {
                starts.push(Action::Op(
                    Op::Build {
                        app: app.into(),
                        image: m.image.clone(),
                        context: w.catalog.dir.join(app),
                        containerfile: b.containerfile.clone(),
                        context_hash: m.context_hash.clone().unwrap_or_default(),
                    },
                    if c.is_some() { Reason::Drift("image") } else { Reason::Install },
                ));
            }
            if matches!(op, Op::Probe { .. }) {
                p.waiting.insert(app.into(), "waiting for its health check".into());
            }
            // Health is checked right after a start the agent waited for, not a tick later.
            let probe = m.health.is_some()
                && match op {
                    Op::Run { wait, .. } => wait || !quadlet,
                    Op::Start { .. } => !quadlet,
                    _ => false,
                };
            starts.push(Action::Op(op, reason));
            if probe {
                starts.push(Action::Op(Op::Probe { app: app.into() }, Reason::Health));
            }
        } else if c.is_some_and(|c| !is_up(c, m)) && !p.waiting.contains_key(app) {
            p.waiting.insert(app.into(), "starting".into());
        }
    }

    p.actions.extend(stops.into_iter().rev()); // dependents stop before their dependencies
    let reload = reload || !units.is_empty();
    p.actions.extend(units);
    if reload {
        p.actions.push(Action::Op(Op::DaemonReload, Reason::UnitChanged));
    }
    p.actions.extend(starts);
    p.actions.extend(after);
    p
}

/// Status of one installed app, as `package.list` answers it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AppStatus {
    pub id: String,
    pub desired: Desired,
    pub state: Option<ContainerState>,
    pub health: Option<Health>,
    pub up: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waiting: Option<String>,
    /// A terminal error: not retried until the manifest or request changes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What one tick did, as `node.reconcile` answers it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TickReport {
    pub actions: Vec<String>,
    pub failed: Vec<String>,
    pub podman_calls: u64,
    pub systemctl_calls: u64,
    pub duration_seconds: f64,
    pub converged: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Something was just started or is becoming healthy: look again soon.
    #[serde(skip)]
    pub in_motion: bool,
}

#[derive(Debug, Default)]
pub struct Status {
    pub last_tick: Option<TickReport>,
    pub last_tick_at: Option<SystemTime>,
    pub apps: BTreeMap<String, AppStatus>,
    pub containers: Vec<Container>,
}

/// State shared between the reconciler thread and the API.
pub struct Shared {
    pub store: Mutex<Store>,
    pub metrics: Arc<Metrics>,
    pub status: Mutex<Status>,
    /// Install requests not yet up, for the install-latency histograms.
    pub installs: Mutex<HashMap<String, Install>>,
    pub ready: AtomicBool,
    pub shutdown: AtomicBool,
    pub started: Instant,
}

impl Shared {
    /// State for an agent that started at `started` (for the start-up metric).
    pub fn new(store: Store, metrics: Arc<Metrics>, started: Instant) -> Shared {
        Shared {
            store: Mutex::new(store),
            metrics,
            status: Mutex::new(Status::default()),
            installs: Mutex::new(HashMap::new()),
            ready: AtomicBool::new(false),
            shutdown: AtomicBool::new(false),
            started,
        }
    }
}

/// An install request not yet up: when it was accepted, and the steps it has ended so far
/// ([`crate::metrics::INSTALL_STEPS`]).
pub struct Install {
    pub accepted: Instant,
    last: Instant,
    done: Vec<&'static str>,
}

impl Install {
    pub fn new(accepted: Instant) -> Install {
        Install { accepted, last: accepted, done: Vec::new() }
    }
}

/// A request to run a tick now, optionally answered with its report.
pub type Wake = Option<std::sync::mpsc::Sender<TickReport>>;

struct Backoff {
    failures: u32,
    until: Instant,
}

/// Delay before retry `n` (1-based): 1 s, 2 s, 4 s ... capped at 5 min, with +-25 % jitter
/// so that many apps failing together do not retry together.
pub fn backoff_delay(n: u32, rng: &mut impl Rng) -> Duration {
    let base = Duration::from_secs(1u64 << n.saturating_sub(1).min(9)).min(Duration::from_secs(300));
    base.mul_f64(rng.random_range(0.75..1.25))
}

fn bump(map: &mut HashMap<String, Backoff>, app: &str) {
    let b = map.entry(app.to_string()).or_insert(Backoff { failures: 0, until: Instant::now() });
    b.failures += 1;
    b.until = Instant::now() + backoff_delay(b.failures, &mut rand::rng());
}

/// Next tick while an app is starting or becoming healthy.
const FAST_REQUEUE: Duration = Duration::from_millis(100);
/// Next tick while waiting on anything else (backoff, a dependency, an error).
const SLOW_REQUEUE: Duration = Duration::from_secs(1);
/// How long after a start the agent keeps looking every [`FAST_REQUEUE`].
const FAST_WINDOW: Duration = Duration::from_secs(60);
/// Up this long, an app's failure count is forgiven.
const STABLE_AFTER: Duration = Duration::from_secs(30);

pub struct Reconciler {
    pub runtime: Box<dyn Runtime>,
    pub exec: Arc<Exec>,
    pub catalog_dir: PathBuf,
    pub target: Target,
    pub shared: Arc<Shared>,
    backoff: HashMap<String, Backoff>,
    /// Failed stops, removals and unit writes: retried after a delay, not every tick.
    retry: HashMap<String, Backoff>,
    /// Apps whose own secrets were rewritten since a pass last got to act on it.
    secrets_changed: BTreeSet<String>,
    /// When each app that is not up began coming up (started by the agent, or seen starting
    /// under systemd): ticks come fast for [`FAST_WINDOW`] of that, once per episode, so a
    /// unit that never gets healthy cannot keep the loop spinning.
    started: HashMap<String, Instant>,
    probed: HashMap<String, Instant>,
    /// Apps whose health check passed during this tick's actions.
    healthy: BTreeSet<String>,
    up_since: HashMap<String, Instant>,
    /// Each app's container as last observed (id, start time): a new one is a restart.
    last_seen: HashMap<String, (String, i64)>,
    /// Apps the agent (re)started for a reason other than a crash since their container was
    /// last seen to change: their next new container is no unasked restart.
    asked: BTreeSet<String>,
    /// Apps whose per-app gauges are exported (the installed ones as of the last tick).
    exported: BTreeSet<String>,
}

impl Reconciler {
    pub fn new(
        runtime: Box<dyn Runtime>,
        exec: Arc<Exec>,
        catalog_dir: PathBuf,
        target: Target,
        shared: Arc<Shared>,
    ) -> Reconciler {
        Reconciler {
            runtime,
            exec,
            catalog_dir,
            target,
            shared,
            backoff: HashMap::new(),
            retry: HashMap::new(),
            secrets_changed: BTreeSet::new(),
            started: HashMap::new(),
            probed: HashMap::new(),
            healthy: BTreeSet::new(),
            up_since: HashMap::new(),
            last_seen: HashMap::new(),
            asked: BTreeSet::new(),
            exported: BTreeSet::new(),
        }
    }

    /// Ticks every `interval`, sooner while something is in progress, and at once on a wake.
    /// Returns when shutdown is asked for or every waker is gone.
    pub fn run(mut self, interval: Duration, wake: mpsc::Receiver<Wake>) {
        let mut waiters: Vec<mpsc::Sender<TickReport>> = Vec::new();
        loop {
            let report = self.tick();
            for w in waiters.drain(..) {
                let _ = w.send(report.clone());
            }
            if self.shared.shutdown.load(Ordering::SeqCst) {
                return;
            }
            let next = if report.converged && report.error.is_none() {
                interval
            } else if report.in_motion {
                interval.min(FAST_REQUEUE)
            } else {
                interval.min(SLOW_REQUEUE)
            };
            match wake.recv_timeout(next) {
                Ok(w) => {
                    waiters.extend(w);
                    // Coalesce a burst of wakes into one tick.
                    while let Ok(w) = wake.try_recv() {
                        waiters.extend(w);
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            }
            if self.shared.shutdown.load(Ordering::SeqCst) {
                return;
            }
        }
    }

    /// One reconcile pass.
    pub fn tick(&mut self) -> TickReport {
        let started = Instant::now();
        let calls = (self.exec.calls(Tool::Podman), self.exec.calls(Tool::Systemctl));
        let mut report = TickReport::default();
        let result = self.pass(&mut report);
        let m = &self.shared.metrics;
        report.podman_calls = self.exec.calls(Tool::Podman) - calls.0;
        report.systemctl_calls = self.exec.calls(Tool::Systemctl) - calls.1;
        report.duration_seconds = started.elapsed().as_secs_f64();
        m.tick_duration.observe(report.duration_seconds);
        match result {
            Ok(()) => {
                m.ticks.with_label_values(&["ok"]).inc();
                let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
                m.last_success.set(now.as_secs_f64());
            }
            Err(e) => {
                tracing::error!(error = %e, "reconcile pass failed; retrying");
                m.ticks.with_label_values(&["error"]).inc();
                report.error = Some(e);
                report.converged = false;
            }
        }
        if !self.shared.ready.swap(true, Ordering::SeqCst) {
            m.startup_duration.set(self.shared.started.elapsed().as_secs_f64());
        }
        let mut status = self.shared.status.lock().unwrap_or_else(|e| e.into_inner());
        status.last_tick = Some(report.clone());
        status.last_tick_at = Some(SystemTime::now());
        report
    }

    fn pass(&mut self, report: &mut TickReport) -> Result<(), String> {
        let (catalog, problems) = Catalog::load_lenient(&self.catalog_dir);
        // Secrets first: files only, so a damaged secret is healed even while podman or
        // systemd fail. Who must restart for it is kept until a pass gets to act.
        let mut errors: BTreeMap<String, String> = BTreeMap::new();
        let known = self.shared.store.lock().unwrap_or_else(|e| e.into_inner()).state().clone();
        let changed = self.ensure_secrets(&known, &catalog, &mut errors);
        self.secrets_changed.extend(changed);
        let observed = self.runtime.observe().map_err(|e| e.to_string())?;
        let unit_files = self.runtime.unit_files().map_err(|e| e.to_string())?;
        // Durable before any action: if the adoption cannot be saved, nothing is done.
        self.adopt(&observed, &unit_files, &catalog)?;
        // Read as late as possible, so that requests of one burst meet one tick; the secrets
        // of apps that arrived or changed since the start of the pass are ensured now.
        let state = self.shared.store.lock().unwrap_or_else(|e| e.into_inner()).state().clone();
        let arrived = State {
            apps: state
                .apps
                .iter()
                .filter(|(a, s)| known.apps.get(*a) != Some(*s))
                .map(|(a, s)| (a.clone(), s.clone()))
                .collect(),
            ..State::default()
        };
        let changed = self.ensure_secrets(&arrived, &catalog, &mut errors);
        self.secrets_changed.extend(changed);
        let changed = self.secrets_changed.clone();
        if failpoint::broken("catalog-panic") {
            // Explore's bug 1, kept so that explore's own tests have a real bug to find: an
            // installed app whose manifest no longer loads panicked the reconciler thread.
            if let Some(app) = state.apps.keys().find(|a| catalog.get(a).is_none()) {
                panic!("no entry found for key `{app}` (deliberate breakage catalog-panic)");
            }
        }

        // Terminal errors: apps asked for that cannot be rendered. Not retried.
        for app in state.apps.keys().filter(|a| !catalog.apps.contains_key(*a)) {
            let mine: Vec<String> = problems
                .iter()
                .filter(|p| p.file.starts_with(self.catalog_dir.join(app)))
                .map(Problem::to_string)
                .collect();
            let msg =
                if mine.is_empty() { format!("`{app}` is not in the catalog") } else { mine.join("; ") };
            errors.insert(app.clone(), msg);
        }

        if !changed.is_empty() {
            failpoint::hit(&self.target.data_root, "secrets_ensured");
        }
        // A healed secret is a new configuration for its owner and readers: failures under the
        // old one (an app crash-looping on a deleted secret) must not hold back the fixed one.
        self.backoff.retain(|app, _| {
            !catalog.get(app).is_some_and(|m| {
                changed.contains(app) || m.secret_files.iter().any(|r| changed.contains(&r.app))
            })
        });

        // Secret completeness: an app that reads another app's secret does not start before
        // that secret exists and is valid (the platform's gateway cascade).
        let mut incomplete = BTreeMap::new();
        let secrets_root = self.target.secrets_root();
        for (app, s) in &state.apps {
            let Some(m) = catalog.get(app).filter(|_| s.desired == Desired::Running) else { continue };
            match secrets::check_complete(&secrets_root, m, &catalog) {
                Ok(missing) if !missing.is_empty() => {
                    let list: Vec<String> =
                        missing.iter().map(|i| format!("{} ({})", i.reference, i.reason.as_str())).collect();
                    incomplete.insert(app.clone(), format!("secrets not ready: {}", list.join(", ")));
                }
                Ok(_) => {}
                Err(e) => {
                    errors.insert(app.clone(), e.to_string());
                }
            }
        }

        let now = Instant::now();
        let held: BTreeSet<String> = self
            .backoff
            .iter()
            .filter(|(_, b)| b.until > now)
            .map(|(a, _)| a.clone())
            .chain(errors.keys().cloned())
            .chain(incomplete.keys().cloned())
            .collect();
        let missing: Vec<&str> = state
            .apps
            .iter()
            .filter(|(a, s)| s.desired == Desired::Running && !observed.iter().any(|c| &c.app == *a))
            .filter(|(a, _)| unit_files.contains_key(*a))
            .map(|(a, _)| a.as_str())
            .collect();
        let unit_states = self.runtime.unit_states(&missing).map_err(|e| e.to_string())?;
        let plan = plan(&World {
            backend: self.runtime.kind(),
            catalog: &catalog,
            target: &self.target,
            state: &state,
            observed: &observed,
            unit_files: &unit_files,
            unit_states: &unit_states,
            secrets_changed: &changed,
            held: &held,
        });

        let mut failed_apps = BTreeSet::new();
        let mut deferred = BTreeMap::new();
        self.healthy.clear();
        for action in &plan.actions {
            // Health probes: often right after a start, then at the app's own interval.
            if let Action::Op(Op::Probe { app }, _) = action {
                let interval =
                    catalog.get(app).and_then(|m| m.health.as_ref()).map_or(Duration::ZERO, |h| h.interval.0);
                let fast = self.started.get(app).is_some_and(|t| now.duration_since(*t) < FAST_WINDOW);
                let due = fast || self.probed.get(app).is_none_or(|t| now.duration_since(*t) >= interval);
                if !due {
                    continue;
                }
                self.probed.insert(app.clone(), now);
            }
            if self.shared.shutdown.load(Ordering::SeqCst) {
                break; // finish the current action only
            }
            if let Action::Op(op, _) = action {
                if op.app().is_some_and(|a| failed_apps.contains(a)) {
                    continue;
                }
            }
            // Stops, removals, unit writes and state changes that keep failing back off like
            // starts (those are held in the plan).
            let retried = action.app().filter(|_| !action.starts());
            if let Some(app) = retried.filter(|a| self.retry.get(*a).is_some_and(|b| b.until > now)) {
                deferred.insert(app.to_string(), format!("backing off after a failed {}", action.kind()));
                continue;
            }
            let desc = action.describe();
            match self.apply(action, &catalog) {
                Ok(()) => {
                    report.actions.push(desc);
                    if let Some(app) = retried {
                        self.retry.remove(app);
                    }
                }
                Err(e) => {
                    tracing::warn!(action = %desc, error = %e, "action failed; backing off");
                    report.failed.push(format!("{desc}: {e}"));
                    if let Some(app) = action.app() {
                        failed_apps.insert(app.to_string());
                        let map = if action.starts() { &mut self.backoff } else { &mut self.retry };
                        bump(map, app);
                    }
                }
            }
        }
        self.secrets_changed.clear();
        let mut plan = plan;
        for (app, why) in deferred {
            plan.waiting.entry(app).or_insert(why);
        }
        for (app, why) in incomplete {
            if plan.waiting.contains_key(&app) {
                plan.waiting.insert(app, why);
            }
        }
        self.observe_apps(&state, &catalog, &observed, &plan, &errors);
        report.converged = plan.actions.is_empty() && plan.waiting.is_empty() && errors.is_empty();
        let now = Instant::now();
        for (app, why) in &plan.waiting {
            if why.starts_with("systemd unit")
                || why.starts_with("waiting for its health")
                || why == "starting"
            {
                self.started.entry(app.clone()).or_insert(now);
            }
        }
        self.started.retain(|app, _| state.apps.get(app).is_some_and(|a| a.desired == Desired::Running));
        report.in_motion = self.started.values().any(|t| now.duration_since(*t) < FAST_WINDOW);
        Ok(())
    }

    /// Ends `step` of the app's pending install, the first time only: the time since the step
    /// before goes into the per-step histogram.
    fn step(&self, app: &str, step: &'static str) {
        let mut installs = self.shared.installs.lock().unwrap_or_else(|e| e.into_inner());
        let Some(i) = installs.get_mut(app).filter(|i| !i.done.contains(&step)) else { return };
        let now = Instant::now();
        self.shared
            .metrics
            .install_steps
            .with_label_values(&[step])
            .observe(now.duration_since(i.last).as_secs_f64());
        i.last = now;
        i.done.push(step);
    }

    /// Ends `step` of every pending install that ended `after` (a daemon-reload serves them all).
    fn step_all(&self, after: &str, step: &'static str) {
        let apps: Vec<String> = {
            let installs = self.shared.installs.lock().unwrap_or_else(|e| e.into_inner());
            installs.iter().filter(|(_, i)| i.done.contains(&after)).map(|(a, _)| a.clone()).collect()
        };
        for app in apps {
            self.step(&app, step);
        }
    }

    /// Secrets of every installed app, healed before anything starts; the apps whose own
    /// secrets were rewritten.
    fn ensure_secrets(
        &self,
        state: &State,
        catalog: &Catalog,
        errors: &mut BTreeMap<String, String>,
    ) -> BTreeSet<String> {
        let mut changed = BTreeSet::new();
        let secrets_root = self.target.secrets_root();
        for (app, s) in &state.apps {
            let Some(m) = catalog.get(app).filter(|_| s.desired != Desired::Absent) else { continue };
            if failpoint::broken("no-secret-heal") && secrets_root.join(app).exists() {
                continue; // the platform's bug: generated once at install, never checked again
            }
            self.step(app, "accepted");
            let result = secrets::ensure(&secrets_root, m);
            if result.is_ok() {
                self.step(app, "secrets");
            }
            match result {
                Ok(ensured) => {
                    for e in ensured {
                        match e.outcome {
                            Outcome::Kept => {}
                            Outcome::Generated => {
                                self.shared
                                    .metrics
                                    .secrets_generated
                                    .with_label_values(&[e.kind.as_str()])
                                    .inc();
                                changed.insert(app.clone());
                            }
                            Outcome::Healed(r) => {
                                tracing::warn!(%app, secret = %e.target, reason = r.as_str(), "secret healed");
                                self.shared.metrics.secrets_healed.with_label_values(&[r.as_str()]).inc();
                                changed.insert(app.clone());
                            }
                        }
                    }
                }
                Err(e) => {
                    errors.insert(app.clone(), e.to_string());
                }
            }
        }
        changed
    }

    /// Apps of this store that its state does not know, seen by their containers or unit
    /// files, are adopted as running, never removed: only a lost state forgets an app whose
    /// container or unit is still there (a stopped or uninstalled app has neither).
    fn adopt(
        &self,
        observed: &[Container],
        unit_files: &BTreeMap<String, String>,
        catalog: &Catalog,
    ) -> Result<(), String> {
        let mut store = self.shared.store.lock().unwrap_or_else(|e| e.into_inner());
        let state = store.state();
        let adopted: BTreeSet<String> = observed
            .iter()
            .filter(|c| owner(c, &self.target, state, catalog) == Owner::App)
            .map(|c| &c.app)
            .chain(unit_files.keys())
            .filter(|app| !state.apps.contains_key(*app))
            .cloned()
            .collect();
        if adopted.is_empty() {
            return Ok(());
        }
        tracing::error!(apps = ?adopted, "the desired state does not know apps of this node: adopting them");
        store
            .update(|s| {
                for app in &adopted {
                    s.apps.insert(app.clone(), AppState::new(Desired::Running));
                }
            })
            .map_err(|e| format!("cannot save the adoption of {adopted:?}, so nothing is done: {e}"))?;
        self.shared.metrics.state_recoveries.with_label_values(&["adopted"]).inc();
        Ok(())
    }

    fn apply(&mut self, action: &Action, catalog: &Catalog) -> Result<(), String> {
        let m = &self.shared.metrics;
        match action {
            Action::Op(op, reason) => {
                if let (Op::Run { app, .. }, Some(manifest)) = (op, op.app().and_then(|a| catalog.get(a))) {
                    self.prepare(manifest).map_err(|e| format!("preparing {app}: {e}"))?;
                }
                let result = match op {
                    Op::Probe { app } => self.runtime.probe(app).map(|healthy| {
                        if healthy {
                            self.healthy.insert(app.clone());
                        }
                    }),
                    _ => self.runtime.apply(op),
                }
                .map_err(|e| e.to_string());
                m.actions.with_label_values(&[op.kind(), if result.is_ok() { "ok" } else { "error" }]).inc();
                result?;
                tracing::info!(action = %action.describe(), "applied");
                let point = match op {
                    Op::WriteUnit { .. } => Some("unit_written"),
                    Op::DaemonReload => Some("daemon_reloaded"),
                    Op::Run { .. } | Op::Start { .. } => Some("container_started"),
                    Op::Probe { .. } => Some("health_checked"),
                    Op::Stop { .. } => Some("container_stopped"),
                    Op::Remove { .. } => Some("container_removed"),
                    Op::RemoveUnit { .. } => Some("unit_removed"),
                    Op::Build { .. } => None,
                };
                match op {
                    Op::WriteUnit { app, .. } => self.step(app, "unit_written"),
                    Op::DaemonReload => self.step_all("unit_written", "daemon_reload"),
                    Op::Run { app, .. } | Op::Start { app } => self.step(app, "started"),
                    _ => {}
                }
                if let Some(point) = point {
                    failpoint::hit(&self.target.data_root, point);
                }
                match reason {
                    Reason::Drift(kind) => m.drift_repairs.with_label_values(&[kind]).inc(),
                    Reason::Orphan => {
                        let kind = if matches!(op, Op::RemoveUnit { .. }) { "unit" } else { "container" };
                        m.orphans_removed.with_label_values(&[kind]).inc();
                    }
                    _ => {}
                }
                if let Op::Run { app, .. } | Op::Start { app } = op {
                    self.started.entry(app.clone()).or_insert_with(Instant::now);
                    // A restart after a crash still counts as one; one the agent chose does not.
                    if *reason == Reason::Crashed {
                        bump(&mut self.backoff, app);
                    } else {
                        self.asked.insert(app.clone());
                    }
                }
                Ok(())
            }
            Action::Purge { app, generation } => {
                // Under the store's lock: an install landing now waits, and finds no half-purge.
                let store = self.shared.store.lock().unwrap_or_else(|e| e.into_inner());
                if store.state().apps.get(app).map(|a| a.generation) != Some(*generation) {
                    return Ok(()); // a later request; the next tick plans for it
                }
                for dir in
                    [self.target.data_root.join("apps").join(app), self.target.secrets_root().join(app)]
                {
                    match std::fs::remove_dir_all(&dir) {
                        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                            return Err(format!("{}: cannot purge: {e}", dir.display()));
                        }
                        _ => {}
                    }
                    // A purge a power cut undoes would hand the old secrets to the next install.
                    if let Some(parent) = dir.parent().filter(|p| p.is_dir()) {
                        crate::atomic::sync_dir(parent).map_err(|e| e.to_string())?;
                    }
                }
                Ok(())
            }
            Action::Forget { app, generation } | Action::ClearRestart { app, generation } => {
                let forget = matches!(action, Action::Forget { .. });
                let mut store = self.shared.store.lock().unwrap_or_else(|e| e.into_inner());
                store
                    .update(|s| match s.apps.get_mut(app) {
                        Some(a) if a.generation != *generation => {} // a later request
                        Some(_) if forget => drop(s.apps.remove(app)),
                        Some(a) => a.restart = false,
                        None => {}
                    })
                    .map_err(|e| e.to_string())
            }
        }
    }

    /// What a container needs on the host before it is created: data directories and the
    /// environment file with the values read from secrets.
    fn prepare(&self, m: &Manifest) -> Result<(), String> {
        use std::os::unix::fs::PermissionsExt;
        // The app's directory is the service user's alone: apps write files 0644 (LND's
        // macaroons), and only the container, which sees its volumes mounted, reads them.
        let own = self.target.data_root.join("apps").join(&m.id);
        let private = std::fs::Permissions::from_mode(0o700);
        for dir in [own.parent().unwrap_or(&own), &own] {
            crate::atomic::create_dir_all(dir, 0o700).map_err(|e| e.to_string())?;
            std::fs::set_permissions(dir, private.clone()).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        for v in &m.volumes {
            crate::atomic::create_dir_all(&own.join(&v.name), 0o755).map_err(|e| e.to_string())?;
        }
        secrets::write_env_file(&self.target.secrets_root(), m).map_err(|e| e.to_string())?;
        Ok(())
    }

    /// Per-app status, up gauges, install latency, restarts nobody asked for.
    fn observe_apps(
        &mut self,
        state: &State,
        catalog: &Catalog,
        observed: &[Container],
        plan: &Plan,
        errors: &BTreeMap<String, String>,
    ) {
        let m = &self.shared.metrics;
        let now = Instant::now();
        let acted: BTreeSet<&str> = plan
            .actions
            .iter()
            .filter_map(|a| match a {
                Action::Op(op, _) => op.app(),
                _ => None,
            })
            .collect();
        let mut apps = BTreeMap::new();
        // Series of apps no longer installed go, so that nothing alerts on what is not there.
        let installed: BTreeSet<String> = state.apps.keys().cloned().collect();
        for app in std::mem::replace(&mut self.exported, installed).difference(&self.exported) {
            self.last_seen.remove(app);
            self.asked.remove(app);
            let _ = m.app_up.remove_label_values(&[app]);
            let _ = m.app_error.remove_label_values(&[app]);
            for d in Desired::ALL {
                let _ = m.app_desired.remove_label_values(&[app, d.as_str()]);
            }
        }
        for (id, s) in &state.apps {
            let c = observed.iter().find(|c| &c.app == id);
            // What was observed before this tick's actions says nothing about an app acted on,
            // except a health check that passed after them.
            let up = if acted.contains(id.as_str()) {
                self.healthy.contains(id)
            } else {
                c.zip(catalog.get(id)).is_some_and(|(c, manifest)| is_up(c, manifest))
            };
            m.app_up.with_label_values(&[id]).set(up as i64);
            m.app_error.with_label_values(&[id]).set(errors.contains_key(id) as i64);
            for d in Desired::ALL {
                m.app_desired.with_label_values(&[id, d.as_str()]).set((s.desired == d) as i64);
            }
            m.app_restarts.with_label_values(&[id]); // at 0 from install on, for increase()
            if up {
                self.started.remove(id);
                let since = *self.up_since.entry(id.clone()).or_insert(now);
                if now.duration_since(since) >= STABLE_AFTER {
                    self.backoff.remove(id);
                }
                self.step(id, "healthy");
                if let Some(i) = self.shared.installs.lock().unwrap_or_else(|e| e.into_inner()).remove(id) {
                    m.install_duration
                        .with_label_values(&[id])
                        .observe(now.duration_since(i.accepted).as_secs_f64());
                }
            } else {
                self.up_since.remove(id);
            }
            if let Some(c) = c {
                let seen = (c.id.clone(), c.started_at);
                match self.last_seen.insert(id.clone(), seen.clone()) {
                    // A health probe is no restart: under Quadlet, systemd's restarts of a
                    // crashed container are first seen while the agent probes the new one.
                    Some(prev) if prev != seen && c.started_at != 0 && !self.asked.remove(id) => {
                        m.app_restarts.with_label_values(&[id]).inc();
                    }
                    None => {
                        self.asked.remove(id);
                    }
                    _ => {}
                }
            }
            apps.insert(
                id.clone(),
                AppStatus {
                    id: id.clone(),
                    desired: s.desired,
                    state: c.map(|c| c.state),
                    health: c.map(|c| c.health),
                    up,
                    waiting: plan.waiting.get(id).cloned(),
                    error: errors.get(id).cloned(),
                },
            );
        }
        let mut status = self.shared.status.lock().unwrap_or_else(|e| e.into_inner());
        status.apps = apps;
        status.containers = observed.to_vec();
    }
}
