//! Test harness shared by the agent's integration tests: paths, snapshots, and a command
//! runner that prints everything when an expectation fails.

#![allow(dead_code)] // each test binary uses its own subset

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

pub fn agent_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_archy-agent"))
}

/// Runs `cmd`, returning its output; describes the command for failure messages.
pub fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// Everything a failed expectation should show.
pub fn describe(cmd: &Command, out: &Output) -> String {
    format!(
        "command: {cmd:?}\nstatus: {}\n--- stdout\n{}--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs `cmd` and asserts it exits with `code`, printing everything if not.
pub fn expect_code(cmd: &mut Command, code: i32) -> Output {
    let out = run(cmd);
    assert_eq!(out.status.code(), Some(code), "{}", describe(cmd, &out));
    out
}

/// Compares `actual` with the snapshot file at `path`. With `ARCHY_BLESS=1` the snapshot is
/// (re)written instead, for reviewing in the diff.
pub fn assert_snapshot(path: &Path, actual: &str) {
    if std::env::var_os("ARCHY_BLESS").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(path).unwrap_or_else(|e| {
        panic!("snapshot {} unreadable ({e}); run with ARCHY_BLESS=1 to create it", path.display())
    });
    if expected != actual {
        panic!(
            "snapshot {} differs (ARCHY_BLESS=1 rewrites it)\n--- expected\n{expected}--- actual\n{actual}",
            path.display()
        );
    }
}

/// The real Quadlet generator, installed by scripts/setup-host. Missing is a failure, never
/// a skip: these tests are the proof that rendered units are valid.
pub fn quadlet_bin() -> PathBuf {
    let path = std::env::var_os("ARCHY_QUADLET")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/libexec/podman/quadlet"));
    assert!(
        path.is_file(),
        "Quadlet generator not found at {}: run scripts/setup-host (or set ARCHY_QUADLET)",
        path.display()
    );
    path
}

/// Runs `quadlet -dryrun -user` over the units in `dir`. Returns the generated services,
/// or every line the generator said about a problem: it can exit 0 after a conversion
/// error, so what it prints is read, not only its status.
pub fn quadlet_dryrun(dir: &Path) -> Result<String, String> {
    let mut cmd = Command::new(quadlet_bin());
    cmd.args(["-dryrun", "-user"]).env("QUADLET_UNIT_DIRS", dir);
    let out = run(&mut cmd);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let complaints: Vec<&str> =
        stderr.lines().filter(|l| !l.contains("Loading source unit file") && !l.trim().is_empty()).collect();
    if out.status.success() && complaints.is_empty() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(describe(&cmd, &out))
    }
}

/// The service user the tests run rootless work as, created by scripts/setup-host.
pub fn service_user() -> (String, u32, u32) {
    let name = std::env::var("ARCHY_SERVICE_USER").unwrap_or_else(|_| "archy".into());
    let user = nix::unistd::User::from_name(&name).ok().flatten().unwrap_or_else(|| {
        panic!("service user `{name}` does not exist: run scripts/setup-host as root first")
    });
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test switches to the service user and plants root-owned files: run the tests as root"
    );
    (name, user.uid.as_raw(), user.gid.as_raw())
}

/// `cmd` run as the service user with a private HOME and runtime dir, no privilege kept.
pub fn as_user(user: &str, home: &Path, program: &Path) -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid", user, "--regid", user, "--init-groups", "--"])
        .arg(program)
        .env("HOME", home)
        .env("XDG_RUNTIME_DIR", home.join("run"));
    cmd
}
