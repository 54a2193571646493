//! `archy-agent check`: the real catalog passes, and every bad catalog under
//! `tests/bad-catalogs/` fails with exactly the problems in its `expected.txt`.

mod support;

use std::process::Command;

use support::*;

#[test]
fn real_catalog_is_valid() {
    let out = expect_code(Command::new(agent_bin()).arg("check").arg("apps").current_dir(repo_root()), 0);
    assert!(String::from_utf8_lossy(&out.stdout).contains("21 apps, all valid"), "{out:?}");
}

#[test]
fn every_bad_catalog_fails_with_its_expected_problems() {
    let root = repo_root().join("agent/tests/bad-catalogs");
    let mut cases: Vec<_> = std::fs::read_dir(&root).unwrap().map(|e| e.unwrap().path()).collect();
    cases.sort();
    assert!(cases.len() >= 15, "expected at least 15 bad catalogs, found {}", cases.len());
    for case in cases {
        let name = case.file_name().unwrap().to_string_lossy().to_string();
        // Relative paths keep the snapshots independent of where the repo is checked out.
        let mut cmd = Command::new(agent_bin());
        cmd.arg("check").arg(&name).current_dir(&root);
        let out = expect_code(&mut cmd, 1);
        assert!(out.stdout.is_empty(), "{}", describe(&cmd, &out));
        assert_snapshot(&case.join("expected.txt"), &String::from_utf8_lossy(&out.stderr));
    }
}
