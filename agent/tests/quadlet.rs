//! Quadlet rendering: golden files for every app, and the real generator's verdict.

mod support;

use std::path::{Path, PathBuf};

use archy_agent::manifest::Catalog;
use archy_agent::quadlet::{render, PodmanVersion, Target, LABEL_SPEC_HASH};
use support::*;

fn catalog() -> Catalog {
    Catalog::load(&repo_root().join("apps")).unwrap()
}

fn target(podman: &str) -> Target {
    Target::new(podman.parse().unwrap(), PathBuf::from("/var/lib/archy"))
}

fn snapshot(name: &str) -> PathBuf {
    repo_root().join("agent/tests/snapshots/quadlet").join(name)
}

#[test]
fn every_app_renders_its_golden_unit() {
    let c = catalog();
    for (id, m) in &c.apps {
        assert_snapshot(&snapshot(&format!("{id}.container")), &render(m, &target("4.3.1")).text);
    }
    // Podman 5 targets: health-gated start, no cidfile workaround.
    let web = c.get("fx-web").unwrap();
    assert_snapshot(&snapshot("fx-web.podman5.container"), &render(web, &target("5.4.2")).text);
}

#[test]
fn host_network_publishes_nothing() {
    let c = catalog();
    let unit = render(c.get("fx-hostnet").unwrap(), &target("4.3.1"));
    assert!(unit.text.contains("\nNetwork=host\n"), "{}", unit.text);
    assert!(
        !unit.text.contains("PublishPort"),
        "podman rejects PublishPort with Network=host:\n{}",
        unit.text
    );
    let bridged = render(c.get("fx-web").unwrap(), &target("4.3.1"));
    assert!(bridged.text.contains("PublishPort=127.0.0.1:18080:8080/tcp"), "{}", bridged.text);
}

#[test]
fn notify_healthy_and_cidfile_cleanup_follow_the_podman_version() {
    let c = catalog();
    let web = c.get("fx-web").unwrap();
    let v4 = render(web, &target("4.3.1")).text;
    let v5 = render(web, &target("5.0.0")).text;
    assert!(v4.contains("ExecStartPre=-/bin/rm -f %t/%N.cid") && !v4.contains("Notify=healthy"), "{v4}");
    assert!(!v5.contains("ExecStartPre") && v5.contains("Notify=healthy"), "{v5}");
    // No health check, no health gate, whatever the version.
    let crash = render(c.get("fx-crashloop").unwrap(), &target("5.0.0")).text;
    assert!(!crash.contains("Notify=healthy"), "{crash}");
}

#[test]
fn spec_hash_labels_the_rendered_bytes() {
    let c = catalog();
    let mut m = c.get("fx-web").unwrap().clone();
    let a = render(&m, &target("4.3.1"));
    assert_eq!(a, render(&m, &target("4.3.1")), "rendering is deterministic");
    assert!(a.text.contains(&format!("Label={LABEL_SPEC_HASH}={}\n", a.hash)));
    assert_eq!(a.hash.len(), 64);
    m.ports[0].host += 1;
    assert_ne!(a.hash, render(&m, &target("4.3.1")).hash, "a port change must change the hash");
    assert_ne!(a.hash, render(&c.get("fx-web").unwrap().clone(), &target("5.4.2")).hash);
}

#[test]
fn systemd_specifiers_and_variables_are_escaped() {
    let c = catalog();
    let text = render(c.get("fx-client").unwrap(), &target("4.3.1")).text;
    // Literal `%` and `$` reach the container unexpanded only when doubled.
    assert!(text.contains(r#"Environment="GREETING=100%% literal, $$HOME stays as written""#), "{text}");
    assert!(text.contains("& wait $$!\""), "{text}");
}

#[test]
fn podman_version_parses_what_podman_prints() {
    for (s, want) in [
        ("4.3.1", (4, 3, 1)),
        ("podman version 5.4.2", (5, 4, 2)),
        ("5.0", (5, 0, 0)),
        ("4.9.4-dev", (4, 9, 4)),
    ] {
        let v: PodmanVersion = s.parse().unwrap();
        assert_eq!((v.major, v.minor, v.patch), want, "{s}");
    }
    for bad in ["", "five", "4", "4.x.1", "1.2.3.4"] {
        assert!(bad.parse::<PodmanVersion>().is_err(), "{bad:?} should not parse");
    }
}

fn write_units(dir: &Path, podman: &str) -> Vec<String> {
    let mut services = Vec::new();
    for m in catalog().apps.values() {
        let unit = render(m, &target(podman));
        std::fs::write(dir.join(&unit.file_name), &unit.text).unwrap();
        services.push(m.service_name());
    }
    services
}

#[test]
fn real_generator_accepts_every_rendered_unit() {
    for podman in ["4.3.1", "5.4.2"] {
        let dir = tempfile::tempdir().unwrap();
        let services = write_units(dir.path(), podman);
        let out =
            quadlet_dryrun(dir.path()).unwrap_or_else(|e| panic!("podman {podman} units rejected:\n{e}"));
        for s in services {
            assert!(out.contains(&format!("---{s}---")), "no {s} generated for podman {podman}:\n{out}");
        }
    }
}

#[test]
fn real_generator_check_rejects_a_bad_unit() {
    // Proves the check above can fail: an unknown key, which Quadlet reports on stderr.
    let dir = tempfile::tempdir().unwrap();
    let web = render(catalog().get("fx-web").unwrap(), &target("4.3.1"));
    let bad = web.text.replace("NoNewPrivileges=true", "NoNewPrivileges=true\nPrivileged=true");
    std::fs::write(dir.path().join("fx-web.container"), bad).unwrap();
    let err = quadlet_dryrun(dir.path()).expect_err("a unit with an unsupported key must be rejected");
    assert!(err.contains("unsupported key 'Privileged'"), "{err}");
}

/// The `podman run` arguments Quadlet generates for `unit`, minus what only makes sense
/// under systemd (cidfile, sd-notify, cgroup split, detach, replace).
fn generated_podman_args(unit: &archy_agent::quadlet::Unit) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(&unit.file_name), &unit.text).unwrap();
    let out = quadlet_dryrun(dir.path()).unwrap();
    let exec = out.lines().find_map(|l| l.strip_prefix("ExecStart=")).expect("no ExecStart");
    let words = systemd_words(exec);
    assert!(words[0].ends_with("podman") && words[1] == "run", "{exec}");
    words[2..]
        .iter()
        .filter(|w| {
            !(w.starts_with("--cidfile") || w.starts_with("--sdnotify") || w.starts_with("--cgroups"))
        })
        .filter(|w| !["-d", "--replace", "--rm"].contains(&w.as_str()))
        .cloned()
        .collect()
}

#[test]
fn host_network_unit_is_accepted_by_real_podman_and_publishing_would_not_be() {
    let podman = UserPodman::new();
    let m = catalog().get("fx-hostnet").unwrap().clone();
    let unit = render(&m, &target("4.3.1"));
    let mut cmd = podman.podman();
    cmd.arg("create").args(generated_podman_args(&unit));
    let out = expect_code(&mut cmd, 0);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("Port mappings have been discarded"), "{}", describe(&cmd, &out));

    // The combination the renderer avoids: podman 5 rejects it (exit 125); podman 4 drops
    // the mappings with a warning, which the platform would then chase as port drift.
    let bad = archy_agent::quadlet::Unit {
        text: unit.text.replace("Network=host\n", "Network=host\nPublishPort=127.0.0.1:18090:18090\n"),
        ..unit
    };
    let mut cmd = podman.podman();
    cmd.arg("create")
        .arg("--name=published")
        .args(generated_podman_args(&bad).into_iter().filter(|a| !a.starts_with("--name")));
    let out = run(&mut cmd);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.code() == Some(125) || stderr.contains("Port mappings have been discarded"),
        "podman accepted published ports under host networking silently:\n{}",
        describe(&cmd, &out)
    );
}
