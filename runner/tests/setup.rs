//! scripts/setup-host is idempotent: on a prepared machine a second run changes nothing.

mod support;

#[test]
fn setup_host_run_again_changes_nothing() {
    let out = std::process::Command::new("bash")
        .arg("scripts/setup-host")
        .current_dir(support::repo_root())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    // Everything it would do announces itself; a prepared machine only hears "present"/"ready".
    for verb in ["installing", "creating", "added", "fetching", "building", "made"] {
        assert!(
            !text.contains(&format!("setup-host: {verb}")),
            "setup-host changed something on a prepared machine:\n{text}"
        );
    }
    assert!(text.contains("setup-host: packages present") && text.contains("setup-host: ready"), "{text}");
}
