//! Wires the agent together: config -> exec -> runtime -> store -> reconciler thread + API.

use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc, Mutex};
use std::time::Instant;

use anyhow::{bail, Context, Result};

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

pub fn run(config: Config) -> Result<()> {
    let started = Instant::now();
    if nix::unistd::geteuid().is_root() {
        bail!("archy-agent runs rootless: start it as the unprivileged service user, not root");
    }
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
    let thread = std::thread::Builder::new()
        .name("reconciler".into())
        .spawn(move || reconciler.run(interval, wake_rx))
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
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        let shutdown = async {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .expect("signal handler");
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        };
        api::serve(listener, api.clone(), shutdown).await;
        anyhow::Ok(())
    })?;
    // SIGTERM: the reconciler finishes its current action and stops; containers are left as
    // they are, and the desired state is already on disk.
    tracing::info!("shutting down");
    shared.shutdown.store(true, Ordering::SeqCst);
    let _ = api.wake.lock().unwrap_or_else(|e| e.into_inner()).send(None);
    drop(api);
    let _ = thread.join();
    Ok(())
}
