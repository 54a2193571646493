//! `archy-chaos report` renders a saved run: golden Markdown and JUnit for a real failing run
//! (the FM3 proof), read back by a real CommonMark renderer and real XML parsers; charts as
//! files beside the Markdown; and `list` shows every scenario.

mod support;

use std::path::Path;
use std::process::Command;

use serde_json::Value;
use support::{chaos, chaos_cmd, repo_root};

const FM3: &str = "runner/tests/fixtures/fm3-report.json";
const LIFECYCLE: &str = "runner/tests/fixtures/lifecycle-l6-report.json";

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

fn fixture(path: &str) -> Value {
    serde_json::from_slice(&std::fs::read(repo_root().join(path)).unwrap()).unwrap()
}

/// `archy-chaos report` of a report given as JSON.
fn render(dir: &Path, report: &Value, format: &str) -> String {
    let path = dir.join("run.json");
    std::fs::write(&path, serde_json::to_vec(report).unwrap()).unwrap();
    let (ok, out, err) = chaos(&["report", path.to_str().unwrap(), "--format", format]);
    assert!(ok, "{err}");
    out
}

/// Renders `md` as CommonMark with GFM tables and checks that every table of the source
/// became a table with all its rows, and that no table leaked into a paragraph of pipes.
/// Returns the HTML.
fn commonmark(md: &str) -> String {
    let parser = pulldown_cmark::Parser::new_ext(md, pulldown_cmark::Options::ENABLE_TABLES);
    let mut html = String::new();
    pulldown_cmark::html::push_html(&mut html, parser);
    let delimiters = md.lines().filter(|l| l.starts_with("|---")).count();
    let rows = md.lines().filter(|l| l.starts_with('|') && !l.starts_with("|---")).count();
    assert!(delimiters > 0, "{md}");
    assert_eq!(html.matches("<table>").count(), delimiters, "tables:\n{html}");
    assert_eq!(html.matches("<tr>").count(), rows, "table rows:\n{html}");
    for p in html.split("<p>").skip(1) {
        let p = &p[..p.find("</p>").unwrap()];
        assert!(!p.lines().any(|l| l.trim_start().starts_with('|')), "a table leaked as text: {p}");
    }
    html
}

/// Parses JUnit with a real XML parser and with xmllint; returns the number of test cases.
fn junit(dir: &Path, xml: &str) -> usize {
    let doc = roxmltree::Document::parse(xml).unwrap_or_else(|e| panic!("not XML: {e}\n{xml}"));
    let path = dir.join("junit.xml");
    std::fs::write(&path, xml).unwrap();
    let out = Command::new("xmllint").arg("--noout").arg(&path).output().unwrap_or_else(|e| {
        panic!("xmllint: {e}: install libxml2-utils (scripts/setup-host) to check JUnit")
    });
    assert!(out.status.success(), "xmllint: {}\n{xml}", String::from_utf8_lossy(&out.stderr));
    doc.descendants().filter(|n| n.has_tag_name("testcase")).count()
}

#[test]
fn a_failing_run_renders_as_markdown_and_junit() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, md, err) = chaos(&["report", FM3, "--format", "md"]);
    assert!(ok, "{err}");
    assert!(md.contains("FAIL") && md.contains("containers-unchanged"), "{md}");
    commonmark(&md);
    check_snapshot("fm3-report.md", &md);
    let (ok, xml, err) = chaos(&["report", FM3, "--format", "junit"]);
    assert!(ok, "{err}");
    assert_eq!(junit(dir.path(), &xml), 1, "{xml}");
    assert!(xml.contains("<failure message=\"containers-unchanged"), "{xml}");
    check_snapshot("fm3-report.junit.xml", &xml);
}

#[test]
fn a_per_app_run_renders_its_scorecard_and_kpis() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, md, err) = chaos(&["report", LIFECYCLE]);
    assert!(ok, "{err}");
    assert!(
        md.contains("## Scorecard")
            && md.contains("| fx-web | 2/2 full | 2/2 full | 2/2 full | 2/2 full |")
            && md.contains("| fx-ui | 2/2 full | 2/2 full | n/a | 2/2 full |")
            && md.contains("98/98 cells full")
            && md.contains("| install_ratio | 4 |")
            && md.contains("p50 <= 2.50x: PASS"),
        "{md}"
    );
    commonmark(&md);
    check_snapshot("lifecycle-l6-report.md", &md);
    let (ok, xml, err) = chaos(&["report", LIFECYCLE, "--format", "junit"]);
    assert!(ok, "{err}");
    // One case per iteration (2 of the matrix, 2 + 2 of the L6 scenarios) and per threshold.
    assert_eq!(junit(dir.path(), &xml), 20, "{xml}");
    check_snapshot("lifecycle-l6-report.junit.xml", &xml);
}

/// Every JUnit file was malformed: the replay command went into a closing comment, and a
/// comment may not hold `--`, which every replay command does (`--node local --seed 5`).
#[test]
fn junit_is_well_formed_xml_whatever_the_replay_command_holds() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = fixture(FM3);
    let replay = "archy-chaos run x --node local --seed 5 -- <a href=\"&amp;\"> ]]> --> '";
    r["replay"] = replay.into();
    r["nodes"][0]["scenarios"][0]["iterations"][0]["failures"][0] =
        "broke \u{1}\u{1b}[31m <![CDATA[ -- ".into();
    let xml = render(dir.path(), &r, "junit");
    junit(dir.path(), &xml);
    let doc = roxmltree::Document::parse(&xml).unwrap();
    let property =
        doc.descendants().find(|n| n.attribute("name") == Some("replay")).expect("replay property");
    assert_eq!(property.attribute("value"), Some(replay), "{xml}");
}

#[test]
fn a_run_over_two_nodes_has_a_section_and_suites_per_node() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = fixture(FM3);
    let other = fixture(LIFECYCLE)["nodes"][0].clone();
    r["nodes"].as_array_mut().unwrap().push(other);
    let md = render(dir.path(), &r, "md");
    assert!(
        md.starts_with("# archy-chaos run — FAIL\n")
            && md.contains("| local:run15619 | podman | 0/1 | fail |\n")
            && md.contains("| local:run15520 | quadlet | 3/3 | pass |\n")
            && md.contains("\n## node local:run15619 — FAIL\n")
            && md.contains("\n### agent-restart-survive@podman (L3) — FAIL\n")
            && md.contains("\n#### agent-restart-survive@podman iteration 1: fail\n")
            && md.contains("\n## node local:run15520 — PASS\n")
            && md.contains("\n### Scorecard\n"),
        "{md}"
    );
    commonmark(&md);
    let xml = render(dir.path(), &r, "junit");
    assert_eq!(junit(dir.path(), &xml), 1 + 20, "{xml}");
    let doc = roxmltree::Document::parse(&xml).unwrap();
    let suites: Vec<&str> = doc
        .descendants()
        .filter(|n| n.has_tag_name("testsuite"))
        .filter_map(|n| n.attribute("name"))
        .collect();
    assert_eq!(
        suites,
        [
            "agent-restart-survive@podman on local:run15619",
            "lifecycle-matrix on local:run15520",
            "cold-install on local:run15520",
            "calls-per-op on local:run15520"
        ]
    );
}

#[test]
fn charts_are_svg_files_beside_the_markdown_linked_relatively() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run.md");
    let (ok, stdout, err) = chaos(&["report", LIFECYCLE, "--charts", "--out", out.to_str().unwrap()]);
    assert!(ok && stdout.is_empty(), "{stdout}{err}");
    let md = std::fs::read_to_string(&out).unwrap();
    assert!(!md.contains("data:"), "{md}");
    let images: Vec<String> = pulldown_cmark::Parser::new(&md)
        .filter_map(|e| match e {
            pulldown_cmark::Event::Start(pulldown_cmark::Tag::Image { dest_url, .. }) => {
                Some(dest_url.to_string())
            }
            _ => None,
        })
        .collect();
    assert_eq!(images, ["run-charts/lifecycle-matrix-latency.svg", "run-charts/cold-install-latency.svg"]);
    for src in &images {
        let svg = std::fs::read_to_string(dir.path().join(src)).unwrap();
        let doc = roxmltree::Document::parse(&svg).unwrap_or_else(|e| panic!("{src}: not XML: {e}"));
        assert_eq!(doc.root_element().tag_name().name(), "svg", "{src}");
    }
}

#[test]
fn report_and_list_refuse_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, _, err) = chaos(&["report", FM3, "--format", "pdf"]);
    assert!(!ok && err.contains("unknown format `pdf`"), "{err}");
    let (ok, _, err) = chaos(&["report", "no/such/report.json"]);
    assert!(!ok && err.contains("no/such/report.json"), "{err}");
    let refused = |body: &str, want: &str| {
        let path = dir.path().join("bad.json");
        std::fs::write(&path, body).unwrap();
        let out = chaos_cmd(&["report", path.to_str().unwrap()]).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{body}: {err}");
        assert!(err.contains(path.to_str().unwrap()) && err.contains(want), "{body}: {err}");
    };
    refused(r#"{"schema": 2, "scenario": "x"}"#, "report of schema 2; this runner reads report schema 3");
    refused("not json {", "not JSON");
    refused(r#"{"schema": 3, "verdict": "pass"}"#, "missing field `seed`");
    let out = chaos_cmd(&["report", FM3, "--charts"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.code() == Some(64) && err.contains("--out FILE.md"), "{err}");
    let (ok, out, err) = chaos(&["list"]);
    assert!(
        ok && out.contains("reboot-survive") && out.contains("L5") && out.contains("release"),
        "{out}{err}"
    );
}
