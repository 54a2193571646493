//! `archy-chaos bench agent` runs end to end on real podman and reports its figures. Speed
//! is not asserted here (2 noisy cores); call counts are, since they do not depend on speed.

use std::process::Command;

#[test]
fn bench_agent_reports_figures_with_one_podman_call_per_noop_tick() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_archy-chaos"))
        .args(["bench", "agent", "--apps", "2", "--samples", "2", "--json"])
        .current_dir(root)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["noop_tick_podman_calls"], 1.0, "{v}");
    assert_eq!(v["install_mutating_podman_calls"], 1.0, "{v}");
    for k in ["noop_tick_ratio", "install_ratio", "startup_seconds", "idle_rss_bytes"] {
        assert!(v[k].as_f64().is_some_and(|x| x.is_finite() && x > 0.0), "{k}: {v}");
    }
}
