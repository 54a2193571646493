//! Runtime backends: how the agent observes and drives containers.
//!
//! Both backends observe the same way, with ONE `podman ps` call per tick over every
//! container carrying the app label. They differ in how they act: `podman` runs containers
//! itself (`podman run -d`), `quadlet` writes unit files and lets systemd run them.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use crate::exec::{self, Exec};
use crate::quadlet::{Unit, LABEL_APP, LABEL_CONTEXT_HASH, LABEL_SPEC_HASH, LABEL_STORE};
use crate::{atomic, quadlet};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    Podman,
    Quadlet,
}

impl BackendKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Podman => "podman",
            BackendKind::Quadlet => "quadlet",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ContainerState {
    Running,
    Created,
    Exited,
    Paused,
    Stopping,
    Other,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// No health check, or none recorded yet.
    None,
    Starting,
    Healthy,
    Unhealthy,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Deserialize, serde::Serialize)]
pub struct Binding {
    pub host_ip: String,
    pub host_port: u16,
    pub container_port: u16,
    pub protocol: String,
}

/// One managed container as observed.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
pub struct Container {
    pub app: String,
    pub id: String,
    pub name: String,
    pub state: ContainerState,
    pub health: Health,
    pub image: String,
    pub ports: Vec<Binding>,
    pub spec_hash: Option<String>,
    pub context_hash: Option<String>,
    /// The store that made it ([`quadlet::Target::store`]); none on a container made by hand
    /// or by an agent before stores had identities.
    #[serde(default)]
    pub store: Option<String>,
    pub started_at: i64,
    pub exit_code: i32,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct PsEntry {
    id: String,
    #[serde(default)]
    names: Vec<String>,
    #[serde(default)]
    image: String,
    #[serde(default)]
    state: String,
    #[serde(default)]
    status: String,
    #[serde(default)]
    labels: Option<BTreeMap<String, String>>,
    #[serde(default)]
    ports: Option<Vec<PsPort>>,
    #[serde(default)]
    started_at: i64,
    #[serde(default)]
    exit_code: i32,
}

#[derive(Deserialize)]
struct PsPort {
    #[serde(default)]
    host_ip: String,
    container_port: u16,
    host_port: u16,
    #[serde(default = "one")]
    range: u16,
    #[serde(default)]
    protocol: String,
}

fn one() -> u16 {
    1
}

/// Parses `podman ps -a --format json`; entries without the app label are not ours.
pub fn parse_ps(json: &str) -> Result<Vec<Container>, serde_json::Error> {
    let entries: Vec<PsEntry> = if json.trim().is_empty() { Vec::new() } else { serde_json::from_str(json)? };
    let mut out = Vec::new();
    for e in entries {
        let labels = e.labels.unwrap_or_default();
        let Some(app) = labels.get(LABEL_APP) else { continue };
        let mut ports = Vec::new();
        for p in e.ports.unwrap_or_default() {
            for i in 0..p.range.max(1) {
                let host_ip = if p.host_ip.is_empty() { "0.0.0.0".into() } else { p.host_ip.clone() };
                ports.push(Binding {
                    host_ip,
                    host_port: p.host_port.saturating_add(i),
                    container_port: p.container_port.saturating_add(i),
                    protocol: if p.protocol.is_empty() { "tcp".into() } else { p.protocol.clone() },
                });
            }
        }
        ports.sort();
        let health = if e.status.contains("(healthy)") {
            Health::Healthy
        } else if e.status.contains("(unhealthy)") {
            Health::Unhealthy
        } else if e.status.contains("(starting)") {
            Health::Starting
        } else {
            Health::None
        };
        let state = match e.state.as_str() {
            "running" => ContainerState::Running,
            "created" | "configured" | "initialized" => ContainerState::Created,
            "exited" | "stopped" => ContainerState::Exited,
            "paused" => ContainerState::Paused,
            "stopping" => ContainerState::Stopping,
            _ => ContainerState::Other,
        };
        out.push(Container {
            app: app.clone(),
            id: e.id,
            name: e.names.first().cloned().unwrap_or_default(),
            state,
            health,
            image: e.image,
            ports,
            spec_hash: labels.get(LABEL_SPEC_HASH).cloned(),
            context_hash: labels.get(LABEL_CONTEXT_HASH).cloned(),
            store: labels.get(LABEL_STORE).cloned(),
            started_at: e.started_at,
            exit_code: e.exit_code,
        });
    }
    Ok(out)
}

/// What a backend is asked to do. Each carries what it needs, so applying is mechanical.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Build a local image from the app's context directory.
    Build {
        app: String,
        image: String,
        context: PathBuf,
        containerfile: String,
        context_hash: String,
    },
    /// Quadlet: write the unit file (atomically).
    WriteUnit {
        app: String,
        unit: Unit,
    },
    /// Quadlet: delete the unit file.
    RemoveUnit {
        app: String,
    },
    /// Quadlet: one `systemctl --user daemon-reload` for every unit change of the tick.
    DaemonReload,
    /// Create (or recreate) and start the container.
    Run {
        app: String,
        unit: Unit,
        reset_failed: bool,
        /// Quadlet: wait for systemd's start job, so the health check can follow at once (an
        /// install, with nothing to stop, whose start ends once the container runs).
        wait: bool,
    },
    Start {
        app: String,
    },
    Stop {
        app: String,
        timeout: u64,
    },
    /// Remove the container (by name), stopping it first.
    Remove {
        app: String,
        container: String,
        timeout: u64,
    },
    /// Podman backend: run the health check once and record its result.
    Probe {
        app: String,
    },
}

impl Op {
    pub fn kind(&self) -> &'static str {
        match self {
            Op::Build { .. } => "build",
            Op::WriteUnit { .. } => "write_unit",
            Op::RemoveUnit { .. } => "remove_unit",
            Op::DaemonReload => "daemon_reload",
            Op::Run { .. } => "run",
            Op::Start { .. } => "start",
            Op::Stop { .. } => "stop",
            Op::Remove { .. } => "remove",
            Op::Probe { .. } => "probe",
        }
    }

    pub fn app(&self) -> Option<&str> {
        match self {
            Op::Build { app, .. }
            | Op::WriteUnit { app, .. }
            | Op::RemoveUnit { app }
            | Op::Run { app, .. }
            | Op::Start { app }
            | Op::Stop { app, .. }
            | Op::Remove { app, .. }
            | Op::Probe { app } => Some(app),
            Op::DaemonReload => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Exec(#[from] exec::Error),
    #[error("cannot parse podman ps output: {0}")]
    Parse(#[from] serde_json::Error),
    #[error(transparent)]
    Write(#[from] atomic::Error),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

/// A container backend. `observe` is the only call a converged tick makes.
pub trait Runtime: Send + Sync {
    fn kind(&self) -> BackendKind;
    fn observe(&self) -> Result<Vec<Container>, Error>;
    /// Unit files the agent manages, by app (quadlet); empty for backends without units.
    fn unit_files(&self) -> Result<BTreeMap<String, String>, Error>;
    /// systemd's `ActiveState` of the apps' units (quadlet), in one call; asked only when an
    /// app that should run has no container, to tell "systemd is starting it" from "gone".
    fn unit_states(&self, apps: &[&str]) -> Result<BTreeMap<String, String>, Error>;
    fn apply(&self, op: &Op) -> Result<(), Error>;
    /// Runs the app's health check once; true when it passed.
    fn probe(&self, app: &str) -> Result<bool, Error>;
}

fn probe(exec: &Exec, app: &str) -> Result<bool, Error> {
    match exec.podman(&["healthcheck", "run", &container_name(app)]) {
        Ok(_) => Ok(true),
        // Exit 1 is "unhealthy", recorded by podman: an answer, not a failure.
        Err(err) if err.code() == Some(1) => Ok(false),
        Err(err) => Err(err.into()),
    }
}

/// The unit state of a unit file systemd has not loaded ([`Runtime::unit_states`]).
pub const NOT_LOADED: &str = "not-loaded";

/// The name of the container the agent makes for `app`: how `owner` tells the app's own.
pub fn container_name(app: &str) -> String {
    format!("archy-{app}")
}

fn observe(exec: &Exec) -> Result<Vec<Container>, Error> {
    if crate::failpoint::broken("reconciler-panic") {
        // From the second tick: the agent first gets ready, then its reconciler dies.
        static TICKS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        if TICKS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) >= 1 {
            panic!("deliberate panic in a tick (breakage reconciler-panic)");
        }
    }
    let out = exec.podman(&["ps", "-a", "--format", "json", "--filter", &format!("label={LABEL_APP}")])?;
    Ok(parse_ps(&out)?)
}

fn build(
    exec: &Exec,
    image: &str,
    context: &std::path::Path,
    containerfile: &str,
    hash: &str,
) -> Result<(), Error> {
    let context = context.to_string_lossy();
    let label = format!("--label={LABEL_CONTEXT_HASH}={hash}");
    // Builds may take minutes; everything else keeps the short timeout.
    exec.podman_timeout(
        &["build", "-q", "-t", image, "-f", &format!("{context}/{containerfile}"), &label, &context],
        Duration::from_secs(1800),
    )?;
    Ok(())
}

/// `podman rm -f -t STOP`: bounded by the stop timeout it passes, not the usual one.
fn remove(exec: &Exec, container: &str, stop: u64) -> Result<String, exec::Error> {
    exec.podman_timeout(
        &["rm", "-f", "-t", &stop.to_string(), container],
        exec.stop_call_timeout(Duration::from_secs(stop)),
    )
}

/// The podman backend: the agent runs containers itself.
pub struct Podman {
    pub exec: Arc<Exec>,
}

impl Runtime for Podman {
    fn kind(&self) -> BackendKind {
        BackendKind::Podman
    }

    fn observe(&self) -> Result<Vec<Container>, Error> {
        observe(&self.exec)
    }

    fn unit_files(&self) -> Result<BTreeMap<String, String>, Error> {
        Ok(BTreeMap::new())
    }

    fn unit_states(&self, _: &[&str]) -> Result<BTreeMap<String, String>, Error> {
        Ok(BTreeMap::new())
    }

    fn apply(&self, op: &Op) -> Result<(), Error> {
        let e = &self.exec;
        match op {
            Op::Build { image, context, containerfile, context_hash, .. } => {
                build(e, image, context, containerfile, context_hash)?
            }
            Op::Run { unit, .. } => {
                let mut args = vec!["run", "-d", "--replace"];
                args.extend(unit.podman_args.iter().map(String::as_str));
                e.podman(&args)?;
            }
            Op::Start { app } => drop(e.podman(&["start", &container_name(app)])?),
            Op::Stop { app, timeout } => drop(e.podman_timeout(
                &["stop", "-t", &timeout.to_string(), &container_name(app)],
                e.stop_call_timeout(Duration::from_secs(*timeout)),
            )?),
            Op::Remove { container, timeout, .. } => drop(remove(e, container, *timeout)?),
            Op::Probe { app } => drop(self.probe(app)?),
            Op::WriteUnit { .. } | Op::RemoveUnit { .. } | Op::DaemonReload => {}
        }
        Ok(())
    }

    fn probe(&self, app: &str) -> Result<bool, Error> {
        probe(&self.exec, app)
    }
}

/// The quadlet backend: unit files in the user's Quadlet directory, run by systemd.
pub struct Quadlet {
    pub exec: Arc<Exec>,
    /// `~/.config/containers/systemd` of the service user.
    pub unit_dir: PathBuf,
}

impl Runtime for Quadlet {
    fn kind(&self) -> BackendKind {
        BackendKind::Quadlet
    }

    fn observe(&self) -> Result<Vec<Container>, Error> {
        observe(&self.exec)
    }

    fn unit_files(&self) -> Result<BTreeMap<String, String>, Error> {
        let io = |source| Error::Io { path: self.unit_dir.clone(), source };
        let mut out = BTreeMap::new();
        let entries = match std::fs::read_dir(&self.unit_dir) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            r => r.map_err(io)?,
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let (Some(stem), Some("container")) =
                (path.file_stem().and_then(|s| s.to_str()), path.extension().and_then(|s| s.to_str()))
            else {
                continue;
            };
            // Units without our header belong to someone else: never touched.
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            if text.starts_with(quadlet::HEADER) {
                out.insert(stem.to_string(), text);
            }
        }
        Ok(out)
    }

    fn unit_states(&self, apps: &[&str]) -> Result<BTreeMap<String, String>, Error> {
        if apps.is_empty() {
            return Ok(BTreeMap::new());
        }
        let mut args = vec!["show", "--property=Id,LoadState,ActiveState"];
        let services: Vec<String> = apps.iter().map(|a| format!("{a}.service")).collect();
        args.extend(services.iter().map(String::as_str));
        let out = self.exec.systemctl(&args)?;
        // Blocks of `Id=x.service` / `ActiveState=active`, separated by blank lines.
        let mut states = BTreeMap::new();
        for block in out.split("\n\n") {
            let field = |k: &str| block.lines().find_map(|l| l.strip_prefix(k)).map(str::to_string);
            if let (Some(id), Some(state)) = (field("Id="), field("ActiveState=")) {
                // A unit file systemd has not loaded yet (the agent died between writing it
                // and the daemon-reload): only a reload makes it startable.
                let state = if field("LoadState=").as_deref() == Some("not-found") {
                    NOT_LOADED.into()
                } else {
                    state
                };
                states.insert(id.trim_end_matches(".service").to_string(), state);
            }
        }
        Ok(states)
    }

    fn apply(&self, op: &Op) -> Result<(), Error> {
        let e = &self.exec;
        let service = |app: &str| format!("{app}.service");
        match op {
            Op::Build { image, context, containerfile, context_hash, .. } => {
                build(e, image, context, containerfile, context_hash)?
            }
            Op::WriteUnit { unit, .. } => {
                atomic::create_dir_all(&self.unit_dir, 0o755)?;
                atomic::write(
                    &self.unit_dir,
                    &unit.file_name,
                    unit.text.as_bytes(),
                    0o644,
                    atomic::Kind::Other,
                )?;
            }
            // Synced: a removed unit that a power cut brings back starts the app at boot.
            Op::RemoveUnit { app } => atomic::remove(&self.unit_dir, &format!("{app}.container"))?,
            Op::DaemonReload => drop(e.systemctl(&["daemon-reload"])?),
            // --no-block unless asked to wait: a health-gated start may take minutes, and so
            // may a stop; the next ticks observe them.
            Op::Run { app, reset_failed, wait, .. } => {
                if *reset_failed {
                    e.systemctl(&["reset-failed", &service(app)])?;
                }
                let service = service(app);
                let args: &[&str] =
                    if *wait { &["restart", &service] } else { &["--no-block", "restart", &service] };
                e.systemctl(args)?;
            }
            Op::Start { app } => drop(e.systemctl(&["--no-block", "start", &service(app)])?),
            Op::Stop { app, .. } => drop(e.systemctl(&["--no-block", "stop", &service(app)])?),
            // A container no unit runs (an orphan, or one left behind): podman removes it.
            Op::Remove { container, timeout, .. } => drop(remove(e, container, *timeout)?),
            Op::Probe { app } => drop(probe(e, app)?),
        }
        Ok(())
    }

    fn probe(&self, app: &str) -> Result<bool, Error> {
        probe(&self.exec, app)
    }
}
