//! The quadlet backend's file side, with the real agent and real podman observing: unit
//! files written atomically with exactly the rendered text, one daemon-reload per tick of
//! changes, systemctl verbs per operation, unit files removed on uninstall. systemctl is a
//! recorder here; the same backend under a real user manager is the node testbed's test.

mod support;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::time::Duration;

use archy_agent::manifest::Catalog;
use archy_agent::quadlet::{render, Target};
use serde_json::json;
use support::*;

#[test]
fn quadlet_backend_writes_units_reloads_once_and_removes_them() {
    let mut a = TestAgent::new(&[]);
    let home = a.podman.home.path().to_path_buf();
    let (units, calls, recorder) = (home.join("units"), home.join("systemctl.log"), home.join("systemctl"));
    // Answers `show` as systemd would for units it is starting; records every call.
    fs::write(
        &recorder,
        format!(
            "#!/bin/sh\necho \"$*\" >> {log}\ncase \"$*\" in *show*) for u in \"$@\"; do case $u in *.service) printf 'Id=%s\\nActiveState=activating\\n\\n' $u;; esac; done;; esac\n",
            log = calls.display()
        ),
    )
    .unwrap();
    fs::set_permissions(&recorder, fs::Permissions::from_mode(0o755)).unwrap();
    a.extra = ["--backend", "quadlet", "--podman-version", "4.3.1", "--systemctl"]
        .iter()
        .map(|s| s.to_string())
        .chain([recorder.display().to_string(), "--quadlet-dir".into(), units.display().to_string()])
        .collect();
    a.spawn();
    let log = || fs::read_to_string(&calls).unwrap_or_default();

    a.rpc("package.install", json!({"id": "fx-web"}));
    a.rpc("package.install", json!({"id": "fx-gateway"}));
    let r = a.reconcile();
    let unit_path = units.join("fx-web.container");
    a.wait_for("unit files", Duration::from_secs(10), |_| {
        unit_path.is_file() && units.join("fx-gateway.container").is_file()
    });
    let catalog = Catalog::load(&repo_root().join("apps")).unwrap();
    let target = Target::new("4.3.1".parse().unwrap(), a.data());
    assert_eq!(fs::read_to_string(&unit_path).unwrap(), render(catalog.get("fx-web").unwrap(), &target).text);
    let meta = fs::metadata(&unit_path).unwrap();
    assert_eq!((meta.mode() & 0o777, meta.uid()), (0o644, service_user().1));
    let reloads = log().lines().filter(|l| l.contains("daemon-reload")).count();
    assert_eq!(reloads, 1, "one daemon-reload for both units:\n{}\nlast tick: {r}", log());
    for app in ["fx-web", "fx-gateway"] {
        // Podman 4: an install waits for its start, which ends once the container runs.
        assert!(log().contains(&format!("--user restart {app}.service")), "{}", log());
    }
    // One observation, and at most a health check right after each start: systemd runs them.
    assert!(r["podman_calls"].as_u64().is_some_and(|n| (1..=3).contains(&n)), "{r}");
    let acting = log().lines().filter(|l| !l.contains(" show ")).count();
    assert!(acting <= 3 * 2, "at most 3 systemctl calls per install, {acting} for 2:\n{}", log());

    // While systemd says the units are starting, the agent leaves them alone.
    let before = log().lines().count();
    let quiet = a.reconcile();
    assert_eq!(quiet["actions"], json!([]), "{quiet}");
    assert!(log().lines().skip(before).all(|l| l.contains("show")), "{}", log());

    a.rpc("package.uninstall", json!({"id": "fx-web"}));
    a.wait_for("fx-web's unit removed", Duration::from_secs(10), |_| !unit_path.exists());
    a.wait_for("fx-web forgotten", Duration::from_secs(10), |a| a.app("fx-web").is_none());
    assert_eq!(log().lines().filter(|l| l.contains("daemon-reload")).count(), 2, "{}", log());
    assert!(units.join("fx-gateway.container").is_file(), "other units untouched");
    let leftovers: Vec<_> = fs::read_dir(&units).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(leftovers.len(), 1, "no temp files left: {leftovers:?}");
}

#[test]
fn quadlet_backend_never_touches_units_it_did_not_write() {
    let mut a = TestAgent::new(&[]);
    let home = a.podman.home.path().to_path_buf();
    let units = home.join("units");
    fs::create_dir_all(&units).unwrap();
    let mine = "[Container]\nImage=localhost/someone-else:1\n";
    fs::write(units.join("someone.container"), mine).unwrap();
    a.extra = vec![
        "--backend".into(),
        "quadlet".into(),
        "--systemctl".into(),
        "/bin/true".into(),
        "--quadlet-dir".into(),
        units.display().to_string(),
    ];
    a.spawn();
    let r = a.reconcile();
    assert_eq!(r["actions"], json!([]), "{r}");
    assert_eq!(fs::read_to_string(units.join("someone.container")).unwrap(), mine);
}
