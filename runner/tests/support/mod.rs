//! Harness shared by the runner's tests: where test nodes live, and the CLI as a person runs it.

#![allow(dead_code)] // each test binary uses its own subset

use std::path::{Path, PathBuf};
use std::process::Command;

/// Test nodes live here (the service user must be able to traverse it).
pub fn nodes_dir() -> PathBuf {
    let dir = std::env::temp_dir().join("archy-test-nodes");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    dir
}

pub fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
}

/// `archy-chaos ARGS` from the repository root: (success, stdout, stderr).
pub fn chaos(args: &[&str]) -> (bool, String, String) {
    let out = chaos_cmd(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub fn chaos_cmd(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_archy-chaos"));
    cmd.args(args).env("ARCHY_NODES_DIR", nodes_dir()).current_dir(repo_root());
    cmd
}
