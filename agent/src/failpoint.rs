//! Kill points: named steps of an operation at which the agent can be made to die, so the
//! runner can enumerate every step boundary of an install deterministically. Inert unless the
//! file `DATA_ROOT/agent/failpoint` names a point; one-shot: the file is removed before dying.

use std::path::Path;

/// Every point, in the order an install passes them.
pub const POINTS: &[&str] =
    &["secrets_ensured", "unit_written", "daemon_reloaded", "container_started", "health_checked"];

pub const FILE: &str = "agent/failpoint";

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
