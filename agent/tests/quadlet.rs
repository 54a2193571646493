//! Quadlet rendering: golden files for every app, and the real generator's verdict.

mod support;

use std::path::{Path, PathBuf};

use archy_agent::manifest::Catalog;
use archy_agent::quadlet::{render, whole_hash, PodmanVersion, Target, LABEL_SPEC_HASH};
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

/// `units-intact` reads a unit's own hash label: a unit cut short by a power cut, or torn in
/// the middle, no longer matches it.
#[test]
fn a_whole_unit_matches_its_hash_label_and_a_torn_one_does_not() {
    for m in catalog().apps.values() {
        let unit = render(m, &target("4.3.1"));
        assert_eq!(whole_hash(&unit.text), Some(unit.hash.as_str()), "{}", m.id);
        for cut in [0, unit.text.len() / 3, unit.text.len() - 1] {
            assert_eq!(whole_hash(&unit.text[..cut]), None, "{} cut at {cut}", m.id);
        }
        let edited = unit.text.replacen("Restart=", "Restart=no\n#", 1);
        assert_eq!(whole_hash(&edited), None, "{}", m.id);
    }
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

// Property tests: whatever text a valid manifest holds, each value stays one value.

mod roundtrip {
    use std::collections::BTreeMap;
    use std::path::Path;
    use std::time::Duration;

    use archy_agent::manifest::{Dur, EnvValue, Health, Manifest};
    use archy_agent::quadlet::{render, Unit};
    use proptest::prelude::*;

    use super::target;
    use crate::support::{quadlet_dryrun, systemd_words};

    /// Characters systemd, Quadlet or a shell give a meaning to, and look-alikes.
    const TRICKY: &[char] = &[
        'a', 'Z', '0', '-', '/', ' ', '"', '\'', '\\', '%', '$', '`', '=', ';', '#', '{', '}', '(', ')', '*',
        '!', '&', '|', '<', '>', '~', ',', ':', '@', 'é', '\u{a0}', '\u{2028}', '\u{feff}',
    ];
    /// Line breaks and other control characters: validation must reject every one.
    const CONTROL: &[char] = &['\n', '\r', '\t', '\0', '\u{b}', '\u{c}', '\u{1b}', '\u{7f}', '\u{85}'];

    /// Text of tricky characters; with `dirty`, one in six also holds control characters.
    fn text(dirty: bool) -> impl Strategy<Value = String> {
        let clean = proptest::collection::vec(prop::sample::select(TRICKY), 0..10);
        let with_control = proptest::collection::vec(
            prop_oneof![6 => prop::sample::select(TRICKY), 1 => prop::sample::select(CONTROL)],
            1..10,
        );
        let chars = if dirty { prop_oneof![5 => clean, 1 => with_control].boxed() } else { clean.boxed() };
        chars.prop_map(|v| v.into_iter().collect())
    }

    #[derive(Debug, Clone)]
    struct Input {
        name: String,
        environment: BTreeMap<String, String>,
        command: Vec<String>,
        health: Option<String>,
        depends_on: Vec<String>,
        podman5: bool,
    }

    fn input(dirty: bool) -> impl Strategy<Value = Input> {
        (
            text(dirty),
            proptest::collection::btree_map("[A-Z_][A-Z0-9_]{0,5}", text(dirty), 0..4),
            proptest::collection::vec(text(dirty), 0..4),
            proptest::option::of(text(dirty)),
            proptest::collection::vec(
                prop_oneof![3 => "[a-z][a-z0-9-]{0,6}[a-z0-9]", 1 => text(dirty)],
                0..3,
            ),
            any::<bool>(),
        )
            .prop_map(|(name, environment, command, health, depends_on, podman5)| Input {
                name,
                environment,
                command,
                health,
                depends_on,
                podman5,
            })
    }

    fn manifest(i: &Input) -> Manifest {
        let mut m = Manifest::parse(
            Path::new("t/manifest.yml"),
            "id: t\nname: T\nversion: '1'\nimage: localhost/t:1\n",
        )
        .unwrap();
        m.name = i.name.clone();
        m.environment = i.environment.iter().map(|(k, v)| (k.clone(), EnvValue::Text(v.clone()))).collect();
        m.command = i.command.clone();
        m.health = i.health.clone().map(|command| Health {
            command,
            interval: Dur(Duration::from_secs(30)),
            timeout: Dur(Duration::from_secs(5)),
            retries: 3,
            start_period: Dur(Duration::from_secs(0)),
        });
        m.depends_on = i.depends_on.clone();
        m
    }

    /// Every field holding a control character, as validation names it.
    fn fields_with_control_chars(i: &Input) -> Vec<String> {
        let control = |s: &String| s.chars().any(char::is_control);
        let mut out = Vec::new();
        if control(&i.name) {
            out.push("name".to_string());
        }
        out.extend(i.environment.iter().filter(|(_, v)| control(v)).map(|(k, _)| format!("environment.{k}")));
        out.extend(
            i.command.iter().enumerate().filter(|(_, a)| control(a)).map(|(n, _)| format!("command[{n}]")),
        );
        out.extend(i.health.iter().filter(|h| control(h)).map(|_| "health.command".to_string()));
        out.extend(
            i.depends_on
                .iter()
                .enumerate()
                .filter(|(_, d)| control(d))
                .map(|(n, _)| format!("depends_on[{n}]")),
        );
        out
    }

    /// The manifest if it passes validation; otherwise checks that every field holding a
    /// control character is among the problems, and returns `None`.
    fn validated(i: &Input) -> Option<Manifest> {
        let m = manifest(i);
        let problems: Vec<String> =
            m.validate(Path::new("t/manifest.yml")).into_iter().map(|p| p.field).collect();
        for field in fields_with_control_chars(i) {
            assert!(problems.contains(&field), "{field} holds a control character, yet passed: {problems:?}");
        }
        problems.is_empty().then_some(m)
    }

    /// The unit's lines reduced to their keys (section headers and the comment as they are).
    fn keys(text: &str) -> Vec<&str> {
        text.lines().map(|l| l.split_once('=').map_or(l, |(k, _)| k)).collect()
    }

    /// `m` with every free-text value replaced by a plain word: what its unit's shape must be.
    fn plain(m: &Manifest) -> Manifest {
        let mut p = m.clone();
        p.name = "x".into();
        p.environment.values_mut().for_each(|v| *v = EnvValue::Text("x".into()));
        p.command.iter_mut().for_each(|a| *a = "x".into());
        if let Some(h) = p.health.as_mut() {
            h.command = "x".into();
        }
        p
    }

    /// `--flag=value` and `--flag value` as (flag, value) pairs, sorted, then the image and
    /// the command. Drops what differs by design between a systemd unit and the podman
    /// backend: Quadlet's own flags and the health timer (the podman backend disables it).
    fn normalize(mut words: impl Iterator<Item = String>) -> (Vec<(String, String)>, Vec<String>) {
        let quadlet_only = ["--cidfile", "--replace", "--rm", "--cgroups", "--sdnotify", "-d"];
        let mut flags = Vec::new();
        let mut rest = Vec::new();
        while let Some(w) = words.next() {
            if !w.starts_with('-') {
                rest.push(w);
                rest.extend(words.by_ref());
                break;
            }
            let (flag, value) = match w.split_once('=') {
                Some((f, v)) => (f.to_string(), v.to_string()),
                None if quadlet_only.contains(&w.as_str()) => (w, String::new()),
                None => {
                    let v = words.next().unwrap_or_default();
                    (w, v)
                }
            };
            let flag = if flag == "-v" { "--volume".to_string() } else { flag };
            if !quadlet_only.contains(&flag.as_str()) && flag != "--health-interval" {
                flags.push((flag, value));
            }
        }
        flags.sort();
        (flags, rest)
    }

    /// The `podman run` words the real generator makes of `unit`.
    fn generated(unit: &Unit) -> Vec<String> {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(&unit.file_name), &unit.text).unwrap();
        let out = quadlet_dryrun(dir.path()).unwrap_or_else(|e| panic!("unit rejected:\n{}\n{e}", unit.text));
        let exec = out.lines().find_map(|l| l.strip_prefix("ExecStart=")).expect("no ExecStart");
        let words = systemd_words(exec);
        assert!(words.len() > 2 && words[0].ends_with("podman") && words[1] == "run", "{exec}");
        words[2..].to_vec()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// No process: a value never adds, removes or moves a line of the unit.
        #[test]
        fn every_value_of_a_valid_manifest_stays_on_its_own_line(i in input(true)) {
            let Some(m) = validated(&i) else { return Ok(()) };
            for t in [target("4.3.1"), target("5.4.2")] {
                let text = render(&m, &t).text;
                let shape = render(&plain(&m), &t).text;
                prop_assert_eq!(keys(&text), keys(&shape), "{}", text);
                prop_assert!(!text.contains('\r'), "{}", text);
            }
        }
    }

    proptest! {
        // Each case runs the real generator: a process spawn. About half the inputs are
        // invalid (names with surrounding spaces, a trailing `\`, ...) and drawn again.
        #![proptest_config(ProptestConfig { cases: 64, max_global_rejects: 4096, ..ProptestConfig::default() })]

        /// The real generator reads back exactly the values rendered, each as one argument,
        /// and nothing else: the same container the podman backend runs.
        #[test]
        fn the_real_generator_reads_back_exactly_what_was_rendered(i in input(false)) {
            // Rejections are the test above's business; here every case should run the generator.
            let Some(m) = validated(&i) else { return Err(TestCaseError::reject("invalid manifest")) };
            let unit = render(&m, &target(if i.podman5 { "5.4.2" } else { "4.3.1" }));
            let (flags, rest) = normalize(generated(&unit).into_iter());
            let (want_flags, want_rest) = normalize(unit.podman_args.iter().cloned());
            prop_assert_eq!(&flags, &want_flags, "{}", unit.text);
            prop_assert_eq!(&rest, &want_rest, "{}", unit.text);

            // And those are the manifest's own values, not only the renderer's.
            prop_assert_eq!(rest.first().map(String::as_str), Some("localhost/t:1"));
            prop_assert_eq!(&rest[1..], m.command.as_slice());
            let env: Vec<String> = flags.iter().filter(|(f, _)| f == "--env").map(|(_, v)| v.clone()).collect();
            let mut want_env: Vec<String> = i.environment.iter().map(|(k, v)| format!("{k}={v}")).collect();
            want_env.sort();
            prop_assert_eq!(env, want_env);
            let health: Vec<&String> = flags.iter().filter(|(f, _)| f == "--health-cmd").map(|(_, v)| v).collect();
            prop_assert_eq!(health, i.health.iter().collect::<Vec<_>>());
        }
    }
}
