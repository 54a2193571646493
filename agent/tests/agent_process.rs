//! The agent process as its service manager sees it: it exits with an error when its
//! reconciler dies, and refuses to start on a data root another agent holds. Real podman.

mod support;

use std::time::{Duration, Instant};

use support::{describe, free_port, TestAgent};

#[test]
fn a_second_agent_on_the_same_data_root_refuses_to_start() {
    let first = TestAgent::start(&[]);
    let mut cmd = first.command(free_port());
    let mut second =
        cmd.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    let start = Instant::now();
    while second.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(20) {
            let _ = second.kill();
            let out = second.wait_with_output().unwrap();
            panic!("the second agent still runs after 20 s\n{}\n{}", describe(&cmd, &out), first.log_text());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = second.wait_with_output().unwrap();
    let text = describe(&cmd, &out);
    assert!(!out.status.success(), "{text}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("another agent already runs"), "{text}");
    assert!(stderr.contains(&first.data().display().to_string()), "names the data root: {text}");
    assert!(stderr.contains(&format!("pid {}", first.pid())), "names the holder: {text}");
    assert_eq!(first.get("/healthz").unwrap().0, 200, "the first agent is untouched");
}

/// The lock file may exist on a data root that became read-only (a disk fault): it is then
/// opened read-only, and the agent still starts.
#[test]
fn an_agent_starts_with_an_existing_read_only_lock_file() {
    let mut a = TestAgent::start(&[]);
    a.kill();
    let lock = a.data().join(archy_agent::agent::LOCK_FILE);
    std::fs::set_permissions(&lock, std::os::unix::fs::PermissionsExt::from_mode(0o400)).unwrap();
    a.spawn();
    assert_eq!(a.get("/healthz").unwrap().0, 200);
}

#[cfg(feature = "breakage")]
#[test]
fn a_dead_reconciler_ends_the_agent_with_an_error() {
    let mut a = TestAgent::new(&[]);
    a.env.push((archy_agent::failpoint::BREAK_ENV.into(), "reconciler-panic".into()));
    a.spawn(); // ready after the first tick; the second panics
    let status = a.wait_exit(Duration::from_secs(15));
    let log = a.log_text();
    let status = status.unwrap_or_else(|| panic!("the agent still runs with a dead reconciler\n{log}"));
    assert!(!status.success(), "{status}\n{log}");
    assert!(log.contains("deliberate panic in a tick"), "the panic is in the log: {log}");
    assert!(log.contains("the reconciler thread panicked"), "{log}");
}
