//! `archy-chaos report` renders a saved run: golden Markdown and JUnit for a real failing run
//! (the FM3 proof), and `list` shows every scenario.

mod support;

use support::{chaos, repo_root};

fn check_snapshot(name: &str, actual: &str) {
    let path = repo_root().join("runner/tests/snapshots").join(name);
    if std::env::var_os("ARCHY_BLESS").is_some() {
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (ARCHY_BLESS=1 creates it)", path.display()));
    assert_eq!(expected, actual, "{} differs (ARCHY_BLESS=1 rewrites it)", path.display());
}

#[test]
fn a_failing_run_renders_as_markdown_and_junit() {
    let fixture = "runner/tests/fixtures/fm3-report.json";
    let (ok, md, err) = chaos(&["report", fixture, "--format", "md"]);
    assert!(ok, "{err}");
    assert!(md.contains("FAIL") && md.contains("containers-unchanged"), "{md}");
    check_snapshot("fm3-report.md", &md);
    let (ok, junit, err) = chaos(&["report", fixture, "--format", "junit"]);
    assert!(ok, "{err}");
    assert_eq!(junit.matches("<testcase ").count(), 1, "{junit}");
    assert!(junit.contains("<failure message=\"containers-unchanged"), "{junit}");
    check_snapshot("fm3-report.junit.xml", &junit);
}

#[test]
fn a_per_app_run_renders_its_scorecard_and_kpis() {
    let fixture = "runner/tests/fixtures/lifecycle-l6-report.json";
    let (ok, md, err) = chaos(&["report", fixture]);
    assert!(ok, "{err}");
    assert!(
        md.contains("## Scorecard")
            && md.contains("| fx-web | 4/4 full | 2/2 full |")
            && md.contains("45/45 cells full")
            && md.contains("| install_ratio | 4 |")
            && md.contains("p50 <= 4.00x: PASS"),
        "{md}"
    );
    check_snapshot("lifecycle-l6-report.md", &md);
    let (ok, junit, err) = chaos(&["report", fixture, "--format", "junit"]);
    assert!(ok, "{err}");
    // One case per iteration (10 per-app, 2 + 2 for the L6 scenarios) and per threshold (2 + 3).
    assert_eq!(junit.matches("<testcase ").count(), 19, "{junit}");
    check_snapshot("lifecycle-l6-report.junit.xml", &junit);
}

#[test]
fn report_and_list_refuse_bad_input() {
    let (ok, _, err) = chaos(&["report", "runner/tests/fixtures/fm3-report.json", "--format", "pdf"]);
    assert!(!ok && err.contains("unknown format `pdf`"), "{err}");
    let (ok, _, err) = chaos(&["report", "no/such/report.json"]);
    assert!(!ok && err.contains("no/such/report.json"), "{err}");
    let old = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(old.path(), r#"{"schema": 1, "scenario": "x"}"#).unwrap();
    let (ok, _, err) = chaos(&["report", old.path().to_str().unwrap()]);
    assert!(!ok && err.contains("report schema 1 is not the one this runner reads (2)"), "{err}");
    let (ok, out, err) = chaos(&["list"]);
    assert!(
        ok && out.contains("reboot-survive") && out.contains("L5") && out.contains("release"),
        "{out}{err}"
    );
}
