//! `archy-chaos fleet run`: three local nodes in parallel, each in its own network namespace,
//! one with a deliberately broken agent; the fleet report must show exactly that node failing.

mod support;

use serde_json::Value;

#[test]
fn a_fleet_report_shows_exactly_the_broken_node_failing() {
    let dir = tempfile::tempdir().unwrap();
    let inventory = dir.path().join("fleet.yml");
    std::fs::write(
        &inventory,
        "version: 1\nnodes:\n  - node: local:fleeta\n  - node: local:fleetb\n    break: [no-secret-heal]\n  - node: local:fleetc\n    protected: [lnd]\n",
    )
    .unwrap();
    let reports = dir.path().join("reports");
    let out = support::chaos_cmd(&[
        "fleet",
        "run",
        "--inventory",
        inventory.to_str().unwrap(),
        "--suite",
        "secret-wrong-mode",
        "--iterations",
        "1",
        "--parallel",
        "3",
        "--seed",
        "5",
        "--report-dir",
        reports.to_str().unwrap(),
    ])
    .output()
    .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(1), "the worst node failed:\n{text}");
    let path = std::fs::read_dir(&reports)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.file_name().unwrap().to_str().unwrap().starts_with("fleet-"))
        .expect("a fleet report");
    let fleet: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let verdicts: Vec<(String, String)> = fleet["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| (n["node"].as_str().unwrap().into(), n["verdict"].as_str().unwrap_or("none").into()))
        .collect();
    // Worst first, then by name.
    assert_eq!(
        verdicts,
        [
            ("fleetb".into(), "fail".into()),
            ("fleeta".into(), "pass".into()),
            ("fleetc".into(), "pass".into())
        ],
        "{text}"
    );
    assert_eq!(fleet["verdict"], "fail");
    let failed = &fleet["nodes"][0]["report"];
    assert_eq!(
        failed["nodes"][0]["environment"]["agent_broken"],
        serde_json::json!(["no-secret-heal"]),
        "{failed}"
    );
    assert!(
        failed["nodes"][0]["scenarios"][0]["iterations"][0]["failures"].to_string().contains("secrets-valid"),
        "{failed}"
    );
    // Each node ran in its own namespace: three different node names in the reports.
    for n in ["fleeta", "fleetb", "fleetc"] {
        assert!(reports.join(n).join("run.log").is_file(), "{n} has its own log");
    }
    // The Markdown fleet report: the table, worst first, and each node's section.
    assert!(text.contains("| fleetb | fail | 0/1 | secret-wrong-mode |"), "{text}");
    let (ok, md, err) = support::chaos(&["report", path.to_str().unwrap()]);
    assert!(ok && md.contains("# node fleetb") && md.contains("secrets-valid"), "{md}{err}");
}

#[test]
fn bad_inventories_are_refused_naming_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    for (body, want) in [
        ("version: 1\nnodes:\n  - node: ssh://node1\n", "`ssh://node1` needs a user"),
        ("version: 1\nnodes:\n  - node: ssh://archy@node1:70000\n", "bad port in `ssh://archy@node1:70000`"),
        ("version: 1\nnodes:\n  - node: ssh://archy@node1:0\n", "bad port in `ssh://archy@node1:0`"),
        ("version: 1\nnodes:\n  - node: local:a\n  - node: local:a\n", "listed twice"),
        ("version: 1\nnodes:\n  - node: local:a\n    colour: red\n", "unknown field `colour`"),
        ("version: 2\nnodes: []\n", "version 2"),
        ("version: 1\nnodes:\n  - node: nowhere\n", "expected `local:NAME`"),
    ] {
        let inventory = dir.path().join("fleet.yml");
        std::fs::write(&inventory, body).unwrap();
        let out = support::chaos_cmd(&[
            "fleet",
            "run",
            "--inventory",
            inventory.to_str().unwrap(),
            "--suite",
            "smoke",
        ])
        .output()
        .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{body}: {err}");
        assert!(err.contains(want) && err.contains("fleet.yml"), "{body}: {err}");
    }
}

#[test]
fn the_nightly_units_and_inventory_are_valid() {
    let root = support::repo_root().join("examples/nightly");
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(root.join("archy-chaos-nightly.service"))
        .arg(root.join("archy-chaos-nightly.timer"))
        .output()
        .expect("systemd-analyze (scripts/setup-host installs systemd)");
    let err = String::from_utf8_lossy(&out.stderr);
    // Only the absent working tree may be reported: the units themselves must be clean.
    let problems: Vec<&str> = err.lines().filter(|l| !l.contains("/opt/archy-chaos")).collect();
    assert!(out.status.success() || problems.is_empty(), "{err}");
    assert!(problems.is_empty(), "{err}");
    let inv = std::fs::read_to_string(root.join("fleet.yml")).unwrap();
    let v: serde_yaml::Value = serde_yaml::from_str(&inv).unwrap();
    assert_eq!(v["nodes"].as_sequence().unwrap().len(), 3);
}
