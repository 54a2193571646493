//! The one place the agent runs podman and systemctl: every call is counted by tool, verb and
//! result, timed, bounded by a timeout, and its failure described (never a panic).

use std::ffi::CString;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use crate::metrics::Metrics;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Tool {
    Podman,
    Systemctl,
}

impl Tool {
    pub fn as_str(self) -> &'static str {
        match self {
            Tool::Podman => "podman",
            Tool::Systemctl => "systemctl",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot run {tool} {verb}: {source} (is {tool} installed and on PATH?)")]
    Spawn { tool: &'static str, verb: String, source: std::io::Error },
    #[error("{tool} {verb} exited with {code}: {stderr}")]
    Failed { tool: &'static str, verb: String, code: i32, stderr: String },
    #[error("{tool} {verb} did not finish within {timeout:?} and was killed")]
    Timeout { tool: &'static str, verb: String, timeout: Duration },
}

impl Error {
    /// Exit code of a call that ran and failed.
    pub fn code(&self) -> Option<i32> {
        match self {
            Error::Failed { code, .. } => Some(*code),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct ExecConfig {
    pub podman: PathBuf,
    /// Global arguments put before every podman verb (e.g. `--root`, `--runroot`).
    pub podman_args: Vec<String>,
    pub systemctl: PathBuf,
    /// A cgroup directory every podman call is moved into before it runs, so that conmon
    /// and slirp4netns live there rather than in the agent's cgroup: a restart of the
    /// agent's service (systemd kills its whole cgroup) then leaves containers alone.
    pub podman_cgroup: Option<PathBuf>,
    pub timeout: Duration,
}

pub struct Exec {
    config: ExecConfig,
    metrics: Arc<Metrics>,
    calls: [AtomicU64; 2],
}

impl Exec {
    pub fn new(config: ExecConfig, metrics: Arc<Metrics>) -> Exec {
        Exec { config, metrics, calls: Default::default() }
    }

    /// Calls made so far with `tool`; the difference across a tick is its cost.
    pub fn calls(&self, tool: Tool) -> u64 {
        self.calls[tool as usize].load(Ordering::Relaxed)
    }

    pub fn podman(&self, args: &[&str]) -> Result<String, Error> {
        self.podman_timeout(args, self.config.timeout)
    }

    pub fn podman_timeout(&self, args: &[&str], timeout: Duration) -> Result<String, Error> {
        let mut cmd = Command::new(&self.config.podman);
        cmd.args(&self.config.podman_args).args(args);
        if let Some(cgroup) = &self.config.podman_cgroup {
            let procs = CString::new(cgroup.join("cgroup.procs").into_os_string().into_encoded_bytes())
                .expect("path without NUL");
            // SAFETY: only async-signal-safe calls (open, write, close) between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    let fd = nix::libc::open(procs.as_ptr(), nix::libc::O_WRONLY | nix::libc::O_CLOEXEC);
                    if fd < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    let ok = nix::libc::write(fd, b"0".as_ptr().cast(), 1) == 1;
                    nix::libc::close(fd);
                    if ok {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                });
            }
        }
        self.run(Tool::Podman, args, cmd, timeout)
    }

    pub fn systemctl(&self, args: &[&str]) -> Result<String, Error> {
        let mut cmd = Command::new(&self.config.systemctl);
        cmd.arg("--user").args(args);
        self.run(Tool::Systemctl, args, cmd, self.config.timeout)
    }

    fn run(&self, tool: Tool, args: &[&str], mut cmd: Command, timeout: Duration) -> Result<String, Error> {
        let verb = verb(args);
        let start = Instant::now();
        self.calls[tool as usize].fetch_add(1, Ordering::Relaxed);
        let result = wait(
            tool,
            &verb,
            cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()),
            timeout,
        );
        let outcome = if result.is_ok() { "ok" } else { "error" };
        self.metrics.exec_calls.with_label_values(&[tool.as_str(), &verb, outcome]).inc();
        self.metrics
            .exec_duration
            .with_label_values(&[tool.as_str(), &verb])
            .observe(start.elapsed().as_secs_f64());
        if let Err(e) = &result {
            tracing::warn!(tool = tool.as_str(), %verb, error = %e, "external call failed");
        } else {
            tracing::debug!(tool = tool.as_str(), %verb, elapsed = ?start.elapsed(), "external call");
        }
        result
    }
}

/// The verb of a call: its first argument that is not a flag (`ps`, `run`, `daemon-reload`),
/// plus the sub-verb for podman's two-level commands (`healthcheck run`).
fn verb(args: &[&str]) -> String {
    let mut words = args.iter().filter(|a| !a.starts_with('-'));
    match words.next() {
        Some(&w @ ("healthcheck" | "image")) => format!("{w} {}", words.next().unwrap_or(&"")),
        Some(w) => w.to_string(),
        None => "none".into(),
    }
}

fn wait(tool: Tool, verb: &str, cmd: &mut Command, timeout: Duration) -> Result<String, Error> {
    let t = tool.as_str();
    let child = cmd.spawn().map_err(|source| Error::Spawn { tool: t, verb: verb.into(), source })?;
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(timeout) {
        Ok(out) => out.map_err(|source| Error::Spawn { tool: t, verb: verb.into(), source })?,
        Err(_) => {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::SIGKILL);
            return Err(Error::Timeout { tool: t, verb: verb.into(), timeout });
        }
    };
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        let stderr = String::from_utf8_lossy(&out.stderr);
        // Podman prefixes noise ("is not a shared mount") to the line that matters: keep the tail.
        let tail: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        let stderr = tail[tail.len().saturating_sub(3)..].join(" | ");
        Err(Error::Failed { tool: t, verb: verb.into(), code: out.status.code().unwrap_or(-1), stderr })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn verbs() {
        assert_eq!(super::verb(&["ps", "-a", "--format", "json"]), "ps");
        assert_eq!(super::verb(&["--log-level=error", "run", "-d"]), "run");
        assert_eq!(super::verb(&["healthcheck", "run", "archy-x"]), "healthcheck run");
        assert_eq!(super::verb(&["daemon-reload"]), "daemon-reload");
        assert_eq!(super::verb(&[]), "none");
    }
}
