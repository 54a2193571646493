//! The agent on real rootless podman (podman backend), run as the service user: the
//! lifecycle, crashes of the agent itself, and every fault it must heal by itself.

mod support;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::time::Duration;

use serde_json::json;
use support::*;

fn id(a: &TestAgent, app: &str) -> String {
    a.inspect(&format!("archy-{app}"), "{{.Id}}")
        .unwrap_or_else(|| panic!("no container for {app}\n{}", a.log_text()))
}

/// The agent calls podman through a shell script: `body` first (`$REAL` is the real podman),
/// then the real podman with the same arguments.
fn podman_wrapper(a: &mut TestAgent, body: &str) {
    let wrapper = a.podman.home.path().join("podman-wrapper");
    let real = which("podman").unwrap();
    fs::write(&wrapper, format!("#!/bin/sh\nREAL={}\n{body}\nexec \"$REAL\" \"$@\"\n", real.display()))
        .unwrap();
    fs::set_permissions(&wrapper, fs::Permissions::from_mode(0o755)).unwrap();
    a.extra = vec!["--podman".into(), wrapper.display().to_string()];
}

#[test]
fn lifecycle_install_stop_start_restart_uninstall() {
    let a = TestAgent::start(&[]);
    a.rpc("package.install", json!({"id": "fx-web"}));
    a.wait_up(&["fx-web"]);
    let (code, body) = http_get(18080);
    assert_eq!((code, body.trim()), (200, "fx-web"), "the app serves on its published port");
    let first = id(&a, "fx-web");

    a.rpc("package.stop", json!({"id": "fx-web"}));
    a.wait_for("fx-web's container gone", Duration::from_secs(30), |a| {
        a.inspect("archy-fx-web", "{{.Id}}").is_none()
    });
    assert_eq!(a.app("fx-web").unwrap()["desired"], "stopped");

    a.rpc("package.start", json!({"id": "fx-web"}));
    a.wait_up(&["fx-web"]);
    let second = id(&a, "fx-web");
    assert_ne!(first, second);

    a.rpc("package.restart", json!({"id": "fx-web"}));
    a.wait_for("a new fx-web container", Duration::from_secs(30), |a| {
        a.inspect("archy-fx-web", "{{.Id}}").is_some_and(|i| i != second)
    });
    a.wait_up(&["fx-web"]);

    // Data written into the app survives all of it; uninstall without purge keeps it too.
    let data = a.data().join("apps/fx-web/data/www/index.html");
    assert!(data.is_file(), "the app's data volume is on the host");
    a.rpc("package.uninstall", json!({"id": "fx-web"}));
    a.wait_for("fx-web forgotten", Duration::from_secs(30), |a| a.app("fx-web").is_none());
    assert!(a.inspect("archy-fx-web", "{{.Id}}").is_none());
    assert!(data.is_file(), "uninstall without purge keeps data");
    assert_eq!(a.reconcile()["converged"], true);
}

fn http_get(port: u16) -> (u16, String) {
    let agent = ureq::Agent::config_builder().http_status_as_error(false).build().new_agent();
    match agent.get(&format!("http://127.0.0.1:{port}/")).call() {
        Ok(mut r) => (r.status().as_u16(), r.body_mut().read_to_string().unwrap_or_default()),
        Err(e) => (0, e.to_string()),
    }
}

#[test]
fn uninstall_with_purge_deletes_data_and_secrets() {
    let a = TestAgent::start(&[]);
    a.rpc("package.install", json!({"id": "fx-web"}));
    a.wait_up(&["fx-web"]);
    a.rpc("package.uninstall", json!({"id": "fx-web", "purge": true}));
    a.wait_for("fx-web forgotten", Duration::from_secs(30), |a| a.app("fx-web").is_none());
    assert!(!a.data().join("apps/fx-web").exists());
    assert!(!a.data().join("secrets/fx-web").exists());
}

#[test]
fn noop_tick_makes_exactly_one_podman_call_and_writes_nothing() {
    let a = TestAgent::start(&[]);
    a.rpc("package.install", json!({"id": "fx-web"}));
    a.rpc("package.install", json!({"id": "fx-gateway"}));
    a.wait_up(&["fx-web", "fx-gateway"]);
    a.wait_for("convergence", Duration::from_secs(30), |a| a.reconcile()["converged"] == true);
    let state = a.data().join("state.json");
    let before = fs::metadata(&state).unwrap();
    let calls = a.metric("archy_agent_exec_calls_total");
    let r = a.reconcile();
    assert_eq!((r["podman_calls"].as_u64(), r["systemctl_calls"].as_u64()), (Some(1), Some(0)), "{r}");
    assert_eq!(r["actions"], json!([]), "{r}");
    assert_eq!(a.metric("archy_agent_exec_calls_total") - calls, 1.0, "the agent's own counters agree");
    let after = fs::metadata(&state).unwrap();
    assert_eq!(
        (before.ino(), before.mtime_nsec()),
        (after.ino(), after.mtime_nsec()),
        "state.json rewritten"
    );
}

#[test]
fn kill9_mid_install_then_restart_converges() {
    let mut a = TestAgent::start(&[]);
    a.rpc("package.install", json!({"id": "fx-web"}));
    a.rpc("package.install", json!({"id": "fx-client"}));
    // Die somewhere in the middle of the install: secrets written, fx-web created or not.
    std::thread::sleep(Duration::from_millis(300));
    a.kill();
    a.spawn();
    a.wait_up(&["fx-web", "fx-client"]);
    assert_eq!(a.reconcile()["converged"], true);
}

#[test]
fn bug_a_container_left_half_made_by_a_killed_podman_run_was_started_forever() {
    // The agent's first `podman run` dies after the create, before the start, with the
    // container's storage not yet made: what CI saw when kill9_mid_install killed a run
    // midway. `podman start` fails on it every time ("unable to determine if .../shm is
    // mounted"); the agent must make it anew.
    let mut a = TestAgent::new(&[]);
    let flag = a.podman.home.path().join("run-killed");
    let flag_s = flag.display();
    podman_wrapper(
        &mut a,
        &format!(
            "if [ \"$1\" = run ] && [ ! -e {flag_s} ]; then\n  : > {flag_s}\n  shift 2\n  \
             id=$(\"$REAL\" create \"$@\") || exit 125\n  \
             rm -rf \"$HOME/.local/share/containers/storage/vfs-containers/$id\"\n  kill -9 $$\nfi"
        ),
    );
    a.spawn();
    a.rpc("package.install", json!({"id": "fx-web"}));
    a.wait_up(&["fx-web"]);
    assert!(flag.exists(), "the wrapper's killed run happened");
    assert!(a.log_text().contains("action=run fx-web (start)"), "made anew, not started\n{}", a.log_text());
}

#[test]
fn corrupt_state_file_is_recovered_and_containers_are_untouched() {
    let mut a = TestAgent::start(&[]);
    a.rpc("package.install", json!({"id": "fx-web"}));
    a.wait_up(&["fx-web"]);
    let before = id(&a, "fx-web");
    a.kill();
    fs::write(a.data().join("state.json"), b"{\"version\": 1, \"apps\": {\"fx-w").unwrap();
    a.spawn();
    a.wait_up(&["fx-web"]);
    assert_eq!(id(&a, "fx-web"), before, "the running container was left alone");
    assert_eq!(a.metric("archy_agent_state_recoveries_total{reason=\"corrupt\"}"), 1.0);
    let aside: Vec<_> = fs::read_dir(a.data())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("state.json.corrupt-"))
        .collect();
    assert_eq!(aside.len(), 1, "the bad file is kept aside for a person to look at");
}

#[test]
fn deleted_state_file_is_rebuilt_from_running_containers() {
    let mut a = TestAgent::start(&[]);
    a.rpc("package.install", json!({"id": "fx-web"}));
    a.wait_up(&["fx-web"]);
    a.kill();
    fs::remove_file(a.data().join("state.json")).unwrap();
    fs::remove_file(a.data().join("state.json.prev")).unwrap();
    let before = id(&a, "fx-web");
    a.spawn();
    a.wait_up(&["fx-web"]);
    assert_eq!(id(&a, "fx-web"), before, "adopted, not removed as an orphan");
    assert_eq!(a.metric("archy_agent_state_recoveries_total{reason=\"adopted\"}"), 1.0);
}

#[test]
fn deleted_secret_is_regenerated_and_its_readers_restarted() {
    let a = TestAgent::start(&[]);
    a.rpc("package.install", json!({"id": "fx-web"}));
    a.rpc("package.install", json!({"id": "fx-client"}));
    a.wait_up(&["fx-web", "fx-client"]);
    let token = a.data().join("secrets/fx-web/api-token");
    let old = fs::read_to_string(&token).unwrap();
    let (web, client) = (id(&a, "fx-web"), id(&a, "fx-client"));
    fs::remove_file(&token).unwrap();
    a.reconcile();
    assert_ne!(fs::read_to_string(&token).unwrap(), old);
    a.wait_up(&["fx-web", "fx-client"]);
    assert_ne!(id(&a, "fx-client"), client, "the reader must be recreated to see the new secret");
    assert_ne!(id(&a, "fx-web"), web);
    assert_eq!(a.metric("archy_agent_secrets_healed_total{reason=\"missing\"}"), 1.0);
}

#[test]
fn secrets_owned_by_root_or_world_readable_are_healed_within_one_tick() {
    let a = TestAgent::start(&[]);
    a.rpc("package.install", json!({"id": "fx-web"}));
    a.rpc("package.install", json!({"id": "fx-client"}));
    a.wait_up(&["fx-web", "fx-client"]);
    let token = a.data().join("secrets/fx-web/api-token");
    let client_id = a.data().join("secrets/fx-client/client-id");
    nix::unistd::chown(&token, Some(0.into()), Some(0.into())).unwrap();
    fs::set_permissions(&client_id, fs::Permissions::from_mode(0o644)).unwrap();
    a.reconcile();
    let (_, uid, _) = service_user();
    for p in [&token, &client_id] {
        let m = fs::metadata(p).unwrap();
        assert_eq!((m.uid(), m.mode() & 0o777), (uid, 0o600), "{} not healed in one tick", p.display());
    }
    a.wait_up(&["fx-web", "fx-client"]);
}

#[test]
fn orphan_container_is_removed() {
    let a = TestAgent::start(&[]);
    let mut cmd = a.podman.podman();
    cmd.args([
        "run",
        "-d",
        "--name",
        "ghost",
        "--label",
        "io.archy.app=ghost",
        "localhost/archy-fixture:1",
        "sleep",
        "600",
    ]);
    expect_code(&mut cmd, 0);
    a.reconcile();
    assert!(a.inspect("ghost", "{{.Id}}").is_none(), "orphan still there\n{}", a.log_text());
    assert_eq!(a.metric("archy_agent_orphans_removed_total{kind=\"container\"}"), 1.0);
}

#[test]
fn container_recreated_by_hand_with_another_port_is_repaired() {
    let a = TestAgent::start(&[]);
    a.rpc("package.install", json!({"id": "fx-web"}));
    a.wait_up(&["fx-web"]);
    // The platform's "port drift": same labels (spec hash included), another host port.
    let labels =
        a.inspect("archy-fx-web", "{{range $k, $v := .Config.Labels}}{{$k}}={{$v}}\n{{end}}").unwrap();
    let mut cmd = a.podman.podman();
    cmd.args(["run", "-d", "--replace", "--name", "archy-fx-web", "-p", "127.0.0.1:18099:8080"]);
    for l in labels.lines().filter(|l| !l.is_empty()) {
        cmd.arg("--label").arg(l);
    }
    cmd.args(["localhost/archy-fixture:1", "sh", "-c", "trap 'exit 0' TERM; sleep 600 & wait"]);
    expect_code(&mut cmd, 0);
    a.reconcile();
    a.wait_up(&["fx-web"]);
    let ports = a.inspect(
        "archy-fx-web",
        "{{range $p, $b := .HostConfig.PortBindings}}{{$p}}={{(index $b 0).HostPort}}{{end}}",
    );
    assert_eq!(ports.as_deref(), Some("8080/tcp=18080"));
    assert_eq!(a.metric("archy_agent_drift_repairs_total{kind=\"ports\"}"), 1.0);
}

#[test]
fn podman_failing_for_a_while_is_survived() {
    // A podman that fails while a flag file exists: the agent must stay up, report the
    // failed passes, and converge once podman works again.
    let mut a = TestAgent::new(&[]);
    let flag = a.podman.home.path().join("podman-broken");
    podman_wrapper(
        &mut a,
        &format!("[ -e {} ] && {{ echo 'simulated failure' >&2; exit 125; }}", flag.display()),
    );
    a.spawn();
    a.rpc("package.install", json!({"id": "fx-web"}));
    a.wait_up(&["fx-web"]);

    fs::write(&flag, "").unwrap();
    let errors = a.metric("archy_agent_reconcile_ticks_total{result=\"error\"}");
    let r = a.reconcile();
    assert!(r["error"].as_str().is_some_and(|e| e.contains("simulated failure")), "{r}");
    assert_eq!(a.get("/healthz").unwrap().0, 200, "the agent stays up");
    assert!(a.metric("archy_agent_reconcile_ticks_total{result=\"error\"}") > errors);

    fs::remove_file(&flag).unwrap();
    a.wait_for("convergence after podman recovers", Duration::from_secs(30), |a| {
        a.reconcile()["converged"] == true
    });
    a.wait_up(&["fx-web"]);
}

#[test]
fn unauthenticated_rpc_is_refused() {
    let a = TestAgent::start(&[]);
    let body = r#"{"jsonrpc":"2.0","id":1,"method":"package.install","params":{"id":"fx-web"}}"#;
    for token in [None, Some("wrong"), Some("")] {
        let (code, v) = a.post(token, body);
        assert_eq!(code, 401, "token {token:?}: {v}");
    }
    let state: serde_json::Value = serde_json::from_slice(
        &fs::read(a.data().join("state.json")).unwrap_or_else(|_| b"{\"apps\":{}}".to_vec()),
    )
    .unwrap();
    assert!(state["apps"].get("fx-web").is_none(), "a refused call changed desired state");
}

#[test]
fn rpc_errors_are_specific() {
    let a = TestAgent::start(&[]);
    let t = a.token();
    let call = |body: &str| a.post(Some(&t), body).1;
    let code = |v: &serde_json::Value| v["error"]["code"].as_i64();
    assert_eq!(code(&call("not json")), Some(-32700));
    assert_eq!(code(&call(r#"{"id":1,"method":"package.list"}"#)), Some(-32600));
    assert_eq!(code(&call(r#"{"jsonrpc":"2.0","id":1,"method":"package.frobnicate"}"#)), Some(-32601));
    assert_eq!(
        code(&call(r#"{"jsonrpc":"2.0","id":1,"method":"package.install","params":{}}"#)),
        Some(-32602)
    );
    let unknown = call(r#"{"jsonrpc":"2.0","id":1,"method":"package.install","params":{"id":"nope"}}"#);
    assert_eq!(code(&unknown), Some(-32001), "{unknown}");
    let not_installed = call(r#"{"jsonrpc":"2.0","id":1,"method":"package.stop","params":{"id":"fx-web"}}"#);
    assert_eq!(code(&not_installed), Some(-32003), "{not_installed}");
}

#[test]
fn sigterm_exits_zero_and_leaves_containers_running() {
    let mut a = TestAgent::start(&[]);
    a.rpc("package.install", json!({"id": "fx-web"}));
    a.wait_up(&["fx-web"]);
    let before = id(&a, "fx-web");
    let status = a.terminate();
    assert!(status.success(), "{status:?}\n{}", a.log_text());
    assert_eq!(a.inspect("archy-fx-web", "{{.State.Status}}").as_deref(), Some("running"));
    assert_eq!(id(&a, "fx-web"), before);
}

#[test]
fn metrics_pass_promtool() {
    let a = TestAgent::start(&[]);
    a.rpc("package.install", json!({"id": "fx-web"}));
    a.wait_up(&["fx-web"]);
    let (_, text) = a.get("/metrics").unwrap();
    for name in [
        "archy_agent_reconcile_tick_duration_seconds_bucket",
        "archy_agent_install_duration_seconds_bucket{app=\"fx-web\"",
        "archy_agent_app_up{app=\"fx-web\"} 1",
        "archy_agent_last_successful_reconcile_timestamp_seconds",
        "archy_agent_build_info{backend=\"podman\"",
        "process_resident_memory_bytes",
    ] {
        assert!(text.contains(name), "{name} missing from /metrics:\n{text}");
    }
    let promtool = which("promtool").expect("promtool missing: run scripts/setup-host");
    let mut child = std::process::Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(), "promtool: {out:?}");
}

#[test]
fn a_changed_build_context_reaches_the_running_app() {
    // The platform's stale companion image: a fix in the build context must end up running.
    let mut a = TestAgent::new(&[]);
    let catalog = a.podman.home.path().join("catalog");
    let ui = catalog.join("fx-ui");
    fs::create_dir_all(&ui).unwrap();
    for f in ["manifest.yml", "Containerfile", "index.html"] {
        fs::copy(repo_root().join("apps/fx-ui").join(f), ui.join(f)).unwrap();
    }
    let (_, uid, gid) = service_user();
    for p in [&catalog, &ui] {
        nix::unistd::chown(p.as_path(), Some(uid.into()), Some(gid.into())).unwrap();
    }
    a.catalog = catalog;
    a.spawn();
    a.rpc("package.install", json!({"id": "fx-ui"}));
    a.wait_up(&["fx-ui"]);
    assert_eq!(http_get(18083).1.trim(), "<h1>fx-ui</h1>");

    fs::write(ui.join("index.html"), "<h1>fx-ui, fixed</h1>\n").unwrap();
    a.reconcile();
    a.wait_for("the rebuilt image serving", Duration::from_secs(60), |_| http_get(18083).1.contains("fixed"));
    assert_eq!(
        a.metric("archy_agent_drift_repairs_total{kind=\"image\"}"),
        1.0,
        "rebuilt once; the build at install is no drift"
    );
}
