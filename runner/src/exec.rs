//! The runner's one seam to the outside world: every external command it runs (ip, nsenter,
//! ssh, podman in a node, its own child runs) starts here, counted and timed by program, and
//! a failure names the whole command with its status and output.

use std::collections::BTreeMap;
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};

/// Calls and seconds per program since the process started.
static CALLS: Mutex<BTreeMap<String, (u64, f64)>> = Mutex::new(BTreeMap::new());

fn program(cmd: &Command) -> String {
    let p = cmd.get_program().to_string_lossy();
    p.rsplit('/').next().unwrap_or(&p).to_string()
}

fn record(cmd: &Command, start: Instant) {
    let seconds = start.elapsed().as_secs_f64();
    let mut calls = CALLS.lock().unwrap_or_else(|e| e.into_inner());
    let e = calls.entry(program(cmd)).or_default();
    e.0 += 1;
    e.1 += seconds;
}

/// Runs `cmd` to its end; its exit status is the caller's to judge.
pub fn output(cmd: &mut Command) -> Result<Output> {
    let start = Instant::now();
    let out = cmd.output().with_context(|| format!("cannot run {cmd:?} (is {} installed?)", program(cmd)));
    record(cmd, start);
    out
}

/// Runs `cmd` to its end and requires success: the error holds the command, its status and
/// everything it printed.
pub fn run(cmd: &mut Command) -> Result<Output> {
    let out = output(cmd)?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(out)
}

/// Runs `cmd` with `stdin` fed to it and its output captured, killing it after `timeout`:
/// `None` when it was killed.
pub fn bounded(cmd: &mut Command, stdin: Option<&[u8]>, timeout: Duration) -> Result<Option<Output>> {
    let start = Instant::now();
    cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child =
        cmd.spawn().with_context(|| format!("cannot run {cmd:?} (is {} installed?)", program(cmd)))?;
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let input = child.stdin.take();
    let out = std::thread::scope(|s| {
        if let (Some(mut w), Some(bytes)) = (input, stdin) {
            s.spawn(move || std::io::Write::write_all(&mut w, bytes));
        }
        let (tx, rx) = std::sync::mpsc::channel();
        s.spawn(move || tx.send(child.wait_with_output()));
        match rx.recv_timeout(timeout) {
            Ok(out) => out.map(Some),
            Err(_) => {
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::SIGKILL);
                rx.recv().map_or(Ok(None), |o| o.map(|_| None))
            }
        }
    });
    record(cmd, start);
    out.with_context(|| format!("running {cmd:?}"))
}

/// Runs `cmd` with the runner's own stdin, stdout and stderr: its exit status.
pub fn status(cmd: &mut Command) -> Result<std::process::ExitStatus> {
    let start = Instant::now();
    let status = cmd.status().with_context(|| format!("cannot run {cmd:?}"));
    record(cmd, start);
    status
}

/// Starts `cmd` in the background (counted when started).
pub fn spawn(cmd: &mut Command) -> Result<Child> {
    let start = Instant::now();
    let child = cmd.spawn().with_context(|| format!("cannot start {cmd:?}"));
    record(cmd, start);
    child
}

/// (program, calls, seconds) of every program run so far, for the report.
pub fn calls() -> Vec<(String, u64, f64)> {
    CALLS.lock().unwrap_or_else(|e| e.into_inner()).iter().map(|(p, (n, s))| (p.clone(), *n, *s)).collect()
}
