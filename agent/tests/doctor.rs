//! `archy-agent doctor` as the service user: a good environment passes, each broken part is
//! named with its fix.

mod support;

use support::*;

fn doctor(strip_runtime_dir: bool) -> (i32, String) {
    let (user, uid, gid) = service_user();
    let home = tempfile::tempdir().unwrap();
    std::fs::create_dir(home.path().join("run")).unwrap();
    for p in [home.path().to_path_buf(), home.path().join("run")] {
        nix::unistd::chown(&p, Some(uid.into()), Some(gid.into())).unwrap();
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    }
    let mut cmd = as_user(&user, home.path(), &agent_bin());
    cmd.arg("doctor")
        .arg("--catalog")
        .arg(repo_root().join("apps"))
        .arg("--data-root")
        .arg(home.path().join("data"));
    if strip_runtime_dir {
        cmd.env_remove("XDG_RUNTIME_DIR");
    }
    let out = run(&mut cmd);
    kill_pause_process(home.path());
    (
        out.status.code().unwrap_or(-1),
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
    )
}

#[test]
fn doctor_passes_for_the_prepared_service_user() {
    let (code, out) = doctor(false);
    assert_eq!(code, 0, "{out}");
    for row in ["service user", "subuid range", "podman 4.", "rootless true", "data root"] {
        assert!(out.contains(row), "{row} missing:\n{out}");
    }
}

#[test]
fn doctor_names_a_missing_runtime_dir_and_its_fix() {
    let (code, out) = doctor(true);
    assert_eq!(code, 1, "{out}");
    let row = out.lines().find(|l| l.contains("XDG_RUNTIME_DIR")).unwrap_or_else(|| panic!("{out}"));
    assert!(row.contains("FAIL") && row.contains("loginctl enable-linger"), "{row}");
}

#[test]
fn doctor_refuses_root() {
    let data = tempfile::tempdir().unwrap();
    let out = run(std::process::Command::new(agent_bin()).arg("doctor").arg("--data-root").arg(data.path()));
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.lines().any(|l| l.contains("FAIL") && l.contains("service user")), "{text}");
}
