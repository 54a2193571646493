//! Test mechanisms, inert in production.
//!
//! Kill points: named steps of an operation at which the agent can be made to die, so the
//! runner can enumerate every step boundary of an install deterministically. Inert unless the
//! file `DATA_ROOT/agent/failpoint` names a point; one-shot: the file is removed before dying.
//!
//! Breakages: deliberate bugs of the platform's past, compiled in only with the `breakage`
//! feature (the runner's tests) and switched on by the environment variable
//! `ARCHY_AGENT_BREAK` (comma separated), so the runner can prove that its scenarios catch
//! them. The agent logs each loudly and reports them in `node.status`.

use std::path::Path;
use std::sync::OnceLock;

/// Every point, in the order an install passes them under Quadlet.
pub const POINTS: &[&str] = &[
    "state_write",
    "secrets_ensured",
    "unit_written",
    "daemon_reloaded",
    "container_started",
    "health_checked",
];

/// The points an uninstall passes under Quadlet (stop the unit, remove its file, reload) and
/// under the podman backend (remove the container).
pub const UNINSTALL_POINTS_QUADLET: &[&str] =
    &["state_write", "container_stopped", "unit_removed", "daemon_reloaded"];
pub const UNINSTALL_POINTS_PODMAN: &[&str] = &["state_write", "container_removed"];
/// The points an install passes under the podman backend: no unit, no daemon-reload.
pub const INSTALL_POINTS_PODMAN: &[&str] =
    &["state_write", "secrets_ensured", "container_started", "health_checked"];

pub const FILE: &str = "agent/failpoint";

/// The breakages there are: generated secrets are never checked after install; the state
/// file is truncated and rewritten in place; ports are published under host networking;
/// the reconciler thread panics in its second tick; it panics on an installed app missing
/// from the catalog (explore's bug 1); a secret's file, the state file, or a directory after
/// a rename is never fsynced (caught only by a data root that forgets, `--durability lazy`).
pub const BREAKAGES: &[&str] = &[
    "no-secret-heal",
    "non-atomic-state",
    "publish-host-ports",
    "reconciler-panic",
    "catalog-panic",
    "no-secret-fsync",
    "no-state-fsync",
    "no-dir-fsync",
];

pub const BREAK_ENV: &str = "ARCHY_AGENT_BREAK";

/// The breakages switched on for this process (unknown names are ignored with an error log).
pub fn breakages() -> &'static [String] {
    static ON: OnceLock<Vec<String>> = OnceLock::new();
    ON.get_or_init(|| {
        let raw = std::env::var(BREAK_ENV).unwrap_or_default();
        if !cfg!(feature = "breakage") {
            if !raw.is_empty() {
                tracing::error!(
                    requested = raw,
                    "this agent is built without breakages: {BREAK_ENV} ignored"
                );
            }
            return Vec::new();
        }
        raw.split(',')
            .map(str::trim)
            .filter(|b| !b.is_empty())
            .filter(|b| {
                let known = BREAKAGES.contains(b);
                if known {
                    tracing::error!(breakage = b, "DELIBERATELY BROKEN AGENT (test mechanism)");
                } else {
                    tracing::error!(breakage = b, known = ?BREAKAGES, "unknown breakage ignored");
                }
                known
            })
            .map(str::to_string)
            .collect()
    })
}

pub fn broken(what: &str) -> bool {
    cfg!(feature = "breakage") && breakages().iter().any(|b| b == what)
}

/// Dies by SIGKILL (nothing flushed, like `kill -9`) if `point` is armed.
pub fn hit(data_root: &Path, point: &str) {
    let file = data_root.join(FILE);
    match std::fs::read_to_string(&file) {
        Ok(armed) if armed.trim() == point => {
            let _ = std::fs::remove_file(&file);
            if let Some(dir) = file.parent().and_then(|d| std::fs::File::open(d).ok()) {
                let _ = dir.sync_all(); // disarmed for the next life
            }
            tracing::warn!(point, "failpoint armed: dying");
            let _ = nix::sys::signal::kill(nix::unistd::getpid(), nix::sys::signal::SIGKILL);
        }
        _ => {}
    }
}
