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

/// What stopping a container may take beyond its stop timeout: podman waits that long before
/// SIGKILL, then still has to remove and clean up. The executor's stop calls and systemd's
/// `TimeoutStopSec` (quadlet) both grant it.
pub const STOP_MARGIN: Duration = Duration::from_secs(30);

/// How long after a call was killed for its timeout the executor waits to reap it.
const REAP_WAIT: Duration = Duration::from_secs(5);

pub struct Exec {
    config: ExecConfig,
    metrics: Arc<Metrics>,
    calls: [AtomicU64; 2],
    origin: Instant,
    /// Milliseconds after `origin` until which the caller counts as making progress: the
    /// end of the last call or, while one runs, its deadline (for `/healthz`).
    progress: AtomicU64,
}

impl Exec {
    pub fn new(config: ExecConfig, metrics: Arc<Metrics>) -> Exec {
        Exec {
            config,
            metrics,
            calls: Default::default(),
            origin: Instant::now(),
            progress: AtomicU64::new(0),
        }
    }

    /// How long since the last call ended; zero while a call runs within its timeout. A
    /// tick busy with slow calls is alive; one making none and finishing none is not.
    pub fn idle_for(&self) -> Duration {
        let until = self.origin + Duration::from_millis(self.progress.load(Ordering::Relaxed));
        Instant::now().saturating_duration_since(until)
    }

    fn mark_progress(&self, until: Instant) {
        let ms = until.saturating_duration_since(self.origin).as_millis();
        self.progress.store(u64::try_from(ms).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// The timeout of a call that passes `stop` to podman as its stop timeout (`stop -t`,
    /// `rm -f -t`): podman may rightly take that long, so the call gets at least that plus
    /// [`STOP_MARGIN`], never less than the usual timeout.
    pub fn stop_call_timeout(&self, stop: Duration) -> Duration {
        self.config.timeout.max(stop.saturating_add(STOP_MARGIN))
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
            // A config path with a NUL byte makes an empty path: the call then fails to
            // spawn (ENOENT) instead of the agent panicking.
            let procs = CString::new(cgroup.join("cgroup.procs").into_os_string().into_encoded_bytes())
                .unwrap_or_default();
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
        self.mark_progress(start + timeout);
        let result = wait(
            tool,
            &verb,
            cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()),
            timeout,
        );
        self.mark_progress(Instant::now());
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
    // Its own process group, so that a timeout kills what it started too: a helper left
    // alive would hold the output pipes (and the reader thread) and whatever it locked.
    let child =
        cmd.process_group(0).spawn().map_err(|source| Error::Spawn { tool: t, verb: verb.into(), source })?;
    let group = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX));
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(timeout) {
        Ok(out) => out.map_err(|source| Error::Spawn { tool: t, verb: verb.into(), source })?,
        Err(_) => {
            let _ = nix::sys::signal::killpg(group, nix::sys::signal::SIGKILL);
            // The group's end closes the pipes: the reader thread then reaps the child. A
            // process that left the group (setsid) may keep them open; not waited for.
            if rx.recv_timeout(REAP_WAIT).is_err() {
                tracing::warn!(
                    tool = t,
                    verb,
                    "killed call not reaped: a process it started holds its output"
                );
            }
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
    use std::os::unix::fs::PermissionsExt;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use super::{Error, Exec, ExecConfig, STOP_MARGIN};
    use crate::metrics::Metrics;

    fn exec(podman: &std::path::Path, timeout: Duration) -> Exec {
        let config = ExecConfig {
            podman: podman.into(),
            podman_args: vec![],
            systemctl: "/nonexistent/systemctl".into(),
            podman_cgroup: None,
            timeout,
        };
        Exec::new(config, Arc::new(Metrics::new("podman")))
    }

    /// Live (not zombie) processes whose process group is `group`.
    fn group_members(group: i32) -> Vec<String> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
            // pid (comm) state ppid pgrp ...: comm may hold spaces, so split after its ')'.
            let Some((_, rest)) = stat.rsplit_once(')') else { continue };
            let fields: Vec<&str> = rest.split_whitespace().collect();
            if fields.get(2) == Some(&group.to_string().as_str()) && fields.first() != Some(&"Z") {
                out.push(stat);
            }
        }
        out
    }

    #[test]
    fn a_timed_out_call_is_killed_with_every_process_it_started() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("podman");
        let pidfile = dir.path().join("pid");
        std::fs::write(
            &script,
            format!("#!/bin/sh\necho $$ > {}\nsleep 1000 & sleep 1000\n", pidfile.display()),
        )
        .unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let start = Instant::now();
        let err = exec(&script, Duration::from_millis(500)).podman(&["ps"]).unwrap_err();
        assert!(matches!(err, Error::Timeout { .. }), "{err}");
        assert!(start.elapsed() < Duration::from_secs(5), "not reaped promptly: {:?}", start.elapsed());
        let group: i32 = std::fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();
        let left = group_members(group);
        assert!(left.is_empty(), "processes of the killed call still alive: {left:?}");
    }

    #[test]
    fn a_stop_with_a_long_stop_timeout_is_not_cut_at_the_default_timeout() {
        let e = exec(std::path::Path::new("/nonexistent/podman"), Duration::from_secs(120));
        assert_eq!(e.stop_call_timeout(Duration::from_secs(600)), Duration::from_secs(600) + STOP_MARGIN);
        assert_eq!(e.stop_call_timeout(Duration::from_secs(10)), Duration::from_secs(120));
        assert_eq!(e.stop_call_timeout(Duration::MAX), Duration::MAX);
    }

    #[test]
    fn verbs() {
        assert_eq!(super::verb(&["ps", "-a", "--format", "json"]), "ps");
        assert_eq!(super::verb(&["--log-level=error", "run", "-d"]), "run");
        assert_eq!(super::verb(&["healthcheck", "run", "archy-x"]), "healthcheck run");
        assert_eq!(super::verb(&["daemon-reload"]), "daemon-reload");
        assert_eq!(super::verb(&[]), "none");
    }
}
