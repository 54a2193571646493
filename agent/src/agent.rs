//! Wires the agent together: config -> exec -> runtime -> store -> reconciler thread + API.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc, Mutex};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use nix::fcntl::{Flock, FlockArg};

use crate::api::{self, Api};
use crate::config::{BackendChoice, Config};
use crate::exec::Exec;
use crate::metrics::Metrics;
use crate::quadlet::{PodmanVersion, Target};
use crate::reconcile::{Reconciler, Shared};
use crate::runtime::{self, BackendKind, Runtime};
use crate::store::Store;

/// Podman assumed when it cannot be asked: the oldest this agent renders for.
const FALLBACK_PODMAN: PodmanVersion = PodmanVersion { major: 4, minor: 0, patch: 0 };
/// Where the Quadlet generator is installed as systemd's user generator.
pub const USER_GENERATOR: &str = "/usr/lib/systemd/user-generators/podman-user-generator";

/// Quadlet when a systemd user manager answers on its private socket and the generator is
/// installed; podman otherwise.
pub fn detect_backend(choice: BackendChoice) -> BackendKind {
    match choice {
        BackendChoice::Podman => BackendKind::Podman,
        BackendChoice::Quadlet => BackendKind::Quadlet,
        BackendChoice::Auto => {
            let manager = std::env::var_os("XDG_RUNTIME_DIR")
                .is_some_and(|d| std::path::Path::new(&d).join("systemd/private").exists());
            if manager && std::path::Path::new(USER_GENERATOR).exists() {
                BackendKind::Quadlet
            } else {
                BackendKind::Podman
            }
        }
    }
}

/// The node's podman version, asked of podman once per podman binary: the answer is kept in
/// the data root keyed by the binary's path, size and mtime (asking costs ~30 ms of start-up).
fn podman_version(exec: &Exec, config: &Config) -> PodmanVersion {
    use std::os::unix::fs::MetadataExt;
    let bin = if config.podman.components().count() > 1 {
        Some(config.podman.clone())
    } else {
        std::env::var_os("PATH")
            .and_then(|p| std::env::split_paths(&p).map(|d| d.join(&config.podman)).find(|p| p.is_file()))
    };
    let stamp = bin.as_ref().and_then(|b| {
        std::fs::metadata(b).ok().map(|m| format!("{} {} {}", b.display(), m.len(), m.mtime()))
    });
    let cache = config.data_root.join("agent/podman-version");
    if let (Some(stamp), Ok(text)) = (&stamp, std::fs::read_to_string(&cache)) {
        if let Some(v) = text.strip_prefix(stamp.as_str()).and_then(|rest| rest.trim().parse().ok()) {
            return v;
        }
    }
    match exec.podman(&["--version"]).map(|v| v.parse::<PodmanVersion>()) {
        Ok(Ok(v)) => {
            if let Some(stamp) = stamp {
                let _ = std::fs::create_dir_all(config.data_root.join("agent"));
                let _ = crate::atomic::write(
                    &config.data_root.join("agent"),
                    "podman-version",
                    format!("{stamp} {v}\n").as_bytes(),
                    0o600,
                    crate::atomic::Kind::Other,
                );
            }
            v
        }
        other => {
            tracing::error!(answer = ?other, "cannot ask podman its version; assuming {FALLBACK_PODMAN}");
            FALLBACK_PODMAN
        }
    }
}

/// Whether containers started by this process can get memory limits: always on cgroup v1
/// (rootless podman ignores them there itself), on v2 only with the memory controller
/// available in this process's cgroup.
pub fn memory_controller() -> bool {
    if !std::path::Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        return true;
    }
    let own = std::fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("0::").map(str::to_string)))
        .unwrap_or_default();
    std::fs::read_to_string(format!("/sys/fs/cgroup{}/cgroup.controllers", own.trim_end_matches('/')))
        .is_ok_and(|c| c.split_whitespace().any(|x| x == "memory"))
}

/// The lock file that makes an agent the only one on its data root.
pub const LOCK_FILE: &str = "agent/agent.lock";

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "another agent already runs on the data root {root}{holder}: stop it, or give this one its own --data-root"
    )]
    Held { root: PathBuf, holder: String },
    #[error(
        "cannot open the lock file {path}: {source} (is the data root there and writable by this user?)"
    )]
    Open { path: PathBuf, source: std::io::Error },
    #[error("cannot lock {path}: {source}")]
    Lock { path: PathBuf, source: nix::errno::Errno },
}

/// Takes the data root for this process (released when the lock is dropped, or the process
/// ends): two agents on one data root would both write its state and start its apps.
pub fn lock_data_root(root: &Path) -> Result<Flock<File>, LockError> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let path = root.join(LOCK_FILE);
    let open_err = |source| LockError::Open { path: path.clone(), source };
    // An existing lock file is opened read-only (flock needs no write access), so an agent
    // restarted on a read-only data root (a disk fault) still starts. std opens it
    // close-on-exec: podman and conmon never inherit the lock and outlive us holding it.
    let file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // The data root and the agent's own directory 0700, as the store and the API
            // token need them (a data root made 0755 here would be tightened later, warned).
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(root.join("agent"))
                .map_err(open_err)?;
            // Created, then opened read-only like an existing one: a file held open for
            // writing makes the data root's remount read-only fail ("busy").
            drop(
                std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .mode(0o600)
                    .open(&path)
                    .map_err(open_err)?,
            );
            File::open(&path).map_err(open_err)?
        }
        Err(e) => return Err(open_err(e)),
    };
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(lock),
        Err((file, nix::errno::Errno::EWOULDBLOCK)) => {
            let holder = holder(&file).map(|pid| format!(" (pid {pid})")).unwrap_or_default();
            Err(LockError::Held { root: root.into(), holder })
        }
        Err((_, source)) => Err(LockError::Lock { path, source }),
    }
}

/// The pid holding a flock on `file`, from /proc/locks (`1: FLOCK ADVISORY WRITE PID
/// MAJ:MIN:INODE 0 EOF`); 0 there means a process of another pid namespace.
fn holder(file: &File) -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    let meta = file.metadata().ok()?;
    let dev = meta.dev();
    let id = format!("{:02x}:{:02x}:{}", nix::sys::stat::major(dev), nix::sys::stat::minor(dev), meta.ino());
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    locks.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let (kind, pid, at) = (f.get(1)?, f.get(4)?, f.get(5)?);
        (*kind == "FLOCK" && *at == id).then(|| pid.parse().ok()).flatten().filter(|p| *p != 0)
    })
}

/// Logs every panic through tracing (the agent's log), with the thread it happened on.
fn log_panics() {
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        tracing::error!(thread = thread.name().unwrap_or("unnamed"), "{info}");
    }));
}

/// Runs `body` on a thread named `name`. If it ends, by returning or by a panic, while
/// `stopping` says no shutdown was asked for, `dead` gets why: a dead reconciler must end
/// the process (for systemd to restart it), not leave an API that answers for nobody.
pub fn supervise(
    name: &'static str,
    body: impl FnOnce() + Send + 'static,
    stopping: impl Fn() -> bool + Send + 'static,
    dead: tokio::sync::oneshot::Sender<String>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new().name(name.into()).spawn(move || {
        let how = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)) {
            Ok(()) => "returned".to_string(),
            Err(payload) => {
                let message = payload
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "no message".into());
                format!("panicked: {message}")
            }
        };
        if !stopping() {
            let _ = dead.send(format!("the {name} thread {how}"));
        }
    })
}

pub fn run(config: Config) -> Result<()> {
    let started = Instant::now();
    if nix::unistd::geteuid().is_root() {
        bail!("archy-agent runs rootless: start it as the unprivileged service user, not root");
    }
    log_panics();
    // First: a second agent must stop before it touches anything of the data root.
    let _lock = lock_data_root(&config.data_root)?;
    let backend = detect_backend(config.backend);
    let metrics = Arc::new(Metrics::new(backend.as_str()));
    let exec = Arc::new(Exec::new(config.exec(), metrics.clone()));
    let podman = match &config.podman_version {
        Some(v) => v.parse().map_err(anyhow::Error::msg)?,
        None => podman_version(&exec, &config),
    };
    crate::failpoint::breakages(); // logged at start-up, not at first use
    let (store, recovery) = Store::open(&config.data_root).context("opening the desired state")?;
    if let Some(r) = &recovery {
        tracing::error!(
            reason = r.reason,
            moved_to = ?r.moved_to,
            from_previous = r.from_previous,
            "desired state was unusable and has been recovered"
        );
        metrics.state_recoveries.with_label_values(&[r.reason]).inc();
    }
    let token_digest =
        api::ensure_token(&config.data_root.join("agent")).context("creating the API token")?;
    let runtime: Box<dyn Runtime> = match backend {
        BackendKind::Podman => Box::new(runtime::Podman { exec: exec.clone() }),
        BackendKind::Quadlet => {
            Box::new(runtime::Quadlet { exec: exec.clone(), unit_dir: config.quadlet_dir.clone() })
        }
    };
    let shared = Arc::new(Shared::new(store, metrics, started));
    let mut target = Target::new(podman, config.data_root.clone());
    target.memory_limits = memory_controller();
    if !target.memory_limits {
        tracing::warn!("cgroup v2 without the memory controller: memory limits are not applied (see doctor)");
    }
    let catalog = std::fs::canonicalize(&config.catalog)
        .with_context(|| format!("catalog directory {}", config.catalog.display()))?;
    tracing::info!(backend = backend.as_str(), %podman, listen = %config.listen, "starting");

    let (wake_tx, wake_rx) = mpsc::channel();
    let exec_for_api = exec.clone();
    let reconciler = Reconciler::new(runtime, exec, catalog.clone(), target, shared.clone());
    let interval = config.tick_interval.0;
    let (dead_tx, dead_rx) = tokio::sync::oneshot::channel();
    let stopping = shared.clone();
    let thread = supervise(
        "reconciler",
        move || reconciler.run(interval, wake_rx),
        move || stopping.shutdown.load(Ordering::SeqCst),
        dead_tx,
    )
    .context("starting the reconciler")?;

    let api = Arc::new(Api {
        shared: shared.clone(),
        wake: Mutex::new(wake_tx),
        catalog_dir: catalog,
        backend,
        token_digest,
        instance: format!("{:016x}", rand::random::<u64>()),
        tick_interval: interval,
        exec: exec_for_api,
    });
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let died = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("installing the SIGTERM handler")?;
        let shutdown = async {
            tokio::select! {
                _ = term.recv() => None,
                _ = tokio::signal::ctrl_c() => None,
                // A sender dropped unheard: the thread ended past catch_unwind's reach.
                why = dead_rx => Some(why.unwrap_or_else(|_| "the reconciler thread ended".into())),
            }
        };
        anyhow::Ok(api::serve(listener, api.clone(), shutdown).await)
    })?;
    shared.shutdown.store(true, Ordering::SeqCst);
    if let Some(why) = died {
        tracing::error!("{why}: exiting with an error for the service manager to restart the agent");
        bail!("{why}; the agent stops so that its service manager restarts it");
    }
    // SIGTERM: the reconciler finishes its current action and stops; containers are left as
    // they are, and the desired state is already on disk.
    tracing::info!("shutting down");
    let _ = api.wake.lock().unwrap_or_else(|e| e.into_inner()).send(None);
    drop(api);
    let _ = thread.join();
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::supervise;

    fn outcome(body: impl FnOnce() + Send + 'static, stopping: bool) -> Option<String> {
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        supervise("test", body, move || stopping, tx).unwrap().join().unwrap();
        rx.try_recv().ok()
    }

    #[test]
    fn a_supervised_thread_that_dies_unasked_says_how() {
        let panicked = outcome(|| panic!("boom {}", 1), false);
        assert_eq!(panicked.as_deref(), Some("the test thread panicked: boom 1"));
        let returned = outcome(|| std::thread::sleep(Duration::from_millis(10)), false);
        assert_eq!(returned.as_deref(), Some("the test thread returned"));
        assert_eq!(outcome(|| (), true), None, "an asked-for stop is no death");
    }
}
