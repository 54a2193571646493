//! `archy-chaos explore` end to end on real nodes: it finds a real bug of today's agent by
//! itself, shrinks it to a scenario `run` replays, and refuses bad usage naming the flag.

mod support;

use std::path::Path;

use serde_json::Value;

/// Nodes share the machine's two cores: one exploration at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn chaos(args: &[&str]) -> (i32, String) {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let out = support::chaos_cmd(args).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

fn report(dir: &Path) -> Value {
    let path = std::fs::read_dir(dir).unwrap().flatten().next().expect("a report").path();
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

#[test]
fn bad_usage_exits_64_naming_the_flag() {
    for (args, want) in [
        (&["--clients", "0"][..], "--clients"),
        (&["--ops", "0"], "--ops"),
        (&["--faults", "kill,meteor"], "--faults"),
        (&["--budget", "soon"], "--budget"),
        (&["--apps", "nope"], "--apps"),
        (&["--node", "somewhere"], "--node"),
        (&["--node", "ssh://archy@127.0.0.1", "--faults", "disk"], "--faults disk"),
        (
            &["--node", "ssh://archy@127.0.0.1", "--faults", "kill", "--durability", "lazy"],
            "--durability lazy",
        ),
    ] {
        let mut argv = vec!["explore"];
        argv.extend(args);
        let (code, text) = chaos(&argv);
        assert_eq!(code, 64, "{args:?}: {text}");
        assert!(text.contains(want), "{args:?}: {text}");
    }
}

/// Bug 1 of the explore issue: a catalog update that breaks an installed app's manifest
/// panicked the reconciler thread. The agent is fixed; the bug lives on as the breakage
/// `catalog-panic`, so that explore keeps proving it finds a real bug from a seed, says so
/// from outside (the agent, which now exits when its reconciler dies, panics again on the
/// first tick of every restart: never ready), shrinks it, and writes a scenario that
/// `archy-chaos run` replays with the same failure.
#[test]
fn explore_finds_the_panicking_reconciler_and_shrinks_it_to_a_scenario_run_replays() {
    let reports = tempfile::tempdir().unwrap();
    let found = tempfile::tempdir().unwrap();
    let (code, text) = chaos(&[
        "explore",
        "--seed",
        "8",
        "--ops",
        "8",
        "--clients",
        "2",
        "--apps",
        "fx-web,fx-client",
        "--faults",
        "catalog",
        "--quiet-every",
        "8",
        "--shrink-budget",
        "3m",
        "--break",
        "catalog-panic",
        "--converge-timeout",
        "15s",
        "--report-dir",
        reports.path().to_str().unwrap(),
        "--found-dir",
        found.path().to_str().unwrap(),
    ]);
    assert_eq!(code, 1, "{text}");
    let r = report(reports.path());
    // As for `run`: a local node is lazy by default where FUSE is, and the replay says which ran.
    let durability = if Path::new("/dev/fuse").exists() { "lazy" } else { "kernel" };
    assert_eq!(r["nodes"][0]["environment"]["durability"], durability, "{text}");
    assert!(r["replay"].as_str().unwrap().ends_with(&format!(" --durability {durability}")), "{r}");
    let x = &r["explore"];
    let f = &x["found"];
    assert!(f["failure"].as_str().unwrap().contains("not ready"), "{text}");
    assert_eq!(f["reproduced"], true, "{text}");
    let (orig, min) =
        (f["shrunk"]["original_len"].as_u64().unwrap(), f["shrunk"]["minimal_len"].as_u64().unwrap());
    assert!(min < orig && min >= 2, "{orig} -> {min}: {text}");
    // Every step is in the history with its outcome and times.
    let history = x["history"].as_array().unwrap();
    assert_eq!(history.len(), 8, "{text}");
    assert!(history.iter().all(|e| e["completed"].as_f64() >= e["invoked"].as_f64()));

    let file = Path::new(f["scenario"].as_str().unwrap());
    let id = file.file_stem().unwrap().to_str().unwrap();
    let written = std::fs::read_to_string(file).unwrap();
    assert!(written.contains("catalog:") && written.contains("change: break"), "{written}");
    let replays = tempfile::tempdir().unwrap();
    let (code, text) = chaos(&[
        "run",
        id,
        "--scenarios",
        found.path().to_str().unwrap(),
        "--break",
        "catalog-panic",
        "--report-dir",
        replays.path().to_str().unwrap(),
    ]);
    assert_eq!(code, 1, "{text}");
    let r = report(replays.path());
    let it = &r["nodes"][0]["scenarios"][0]["iterations"][0];
    // The agent dies on every start: the check meets it not ready, or not even listening.
    let failure = it["failures"][0].as_str().unwrap();
    assert!(failure.contains("not ready") || failure.contains("refused"), "{it}");
    assert!(it["log"].as_str().unwrap().contains("panicked"), "{it}");
}

/// What explore found and shrank is committed under `scenarios/found/`, each file saying
/// what it found: the agent's regression suite. Each replays through `run` and passes.
#[test]
fn every_found_scenario_passes_on_todays_agent() {
    let dir = support::repo_root().join("scenarios/found");
    let ids: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.strip_suffix(".yml").map(|s| format!("found/{s}")))
        .collect();
    assert!(ids.len() >= 3, "bug 1, bug 2 and defect A of the explore issue each have a scenario: {ids:?}");
    let reports = tempfile::tempdir().unwrap();
    let mut argv = vec!["run"];
    argv.extend(ids.iter().map(String::as_str));
    argv.extend(["--report-dir", reports.path().to_str().unwrap()]);
    let (code, text) = chaos(&argv);
    assert_eq!(code, 0, "{text}");
    let r = report(reports.path());
    let scenarios = r["nodes"][0]["scenarios"].as_array().unwrap();
    assert_eq!(scenarios.len(), ids.len(), "{text}");
    for s in scenarios {
        assert_eq!(s["verdict"], "pass", "{}: {}", s["scenario"], s["iterations"][0]["failures"]);
    }
}
