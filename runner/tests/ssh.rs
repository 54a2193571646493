//! The SSH driver against a real OpenSSH server this test starts in a network namespace of
//! its own, with key authentication, and a local node behind it. The commands the driver runs
//! on that "host" drive the local node, so each fault really happens.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod support;

use serde_json::Value;
use support::{chaos, nodes_dir};

const NS: &str = "archy-sshtest";
const VETH: &str = "ar-sshtest";
const HOST: &str = "10.213.250.2";
const HOST_NS: &str = "archy-sshhost";

fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// sshd in its own network namespace, reachable only through the test's veth pair.
struct Sshd {
    child: Child,
    dir: PathBuf,
}

impl Sshd {
    fn start() -> Sshd {
        for ssh in ["/usr/sbin/sshd", "/usr/bin/ssh", "/usr/bin/ssh-keygen"] {
            assert!(Path::new(ssh).is_file(), "{ssh} missing: run scripts/setup-host");
        }
        let _ = Command::new("ip").args(["link", "del", VETH]).output();
        let _ = Command::new("ip").args(["netns", "del", NS]).output();
        sh(&["ip", "route", "replace", "unreachable", "10.213.0.0/16", "metric", "4294967295"]);
        sh(&["ip", "netns", "add", NS]);
        // A name for this machine's own network namespace, where the commands run on the
        // "host" go back to reach the node (entering PID 1's may be refused). sshd is entered
        // into its network namespace only: `ip netns exec` would hide the cgroup mounts.
        let _ = Command::new("ip").args(["netns", "del", HOST_NS]).output();
        sh(&["ip", "netns", "attach", HOST_NS, &std::process::id().to_string()]);
        sh(&["ip", "link", "add", VETH, "type", "veth", "peer", "name", "eth0", "netns", NS]);
        sh(&["ip", "addr", "add", "10.213.250.1/30", "dev", VETH]);
        sh(&["ip", "-n", NS, "addr", "add", "10.213.250.2/30", "dev", "eth0"]);
        sh(&["ip", "link", "set", VETH, "up"]);
        sh(&["ip", "-n", NS, "link", "set", "eth0", "up"]);
        sh(&["ip", "-n", NS, "link", "set", "lo", "up"]);
        let dir = std::env::temp_dir().join("archy-sshtest");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let d = |f: &str| dir.join(f).display().to_string();
        sh(&["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", &d("host_key")]);
        sh(&["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", &d("id")]);
        sh(&["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", &d("other")]);
        std::fs::copy(dir.join("id.pub"), dir.join("authorized_keys")).unwrap();
        std::fs::write(
            dir.join("sshd_config"),
            format!(
                "ListenAddress {HOST}\nPort 22\nHostKey {}\nPidFile {}\nAuthorizedKeysFile {}\nPermitRootLogin prohibit-password\n\
                 PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n",
                d("host_key"),
                d("sshd.pid"),
                d("authorized_keys")
            ),
        )
        .unwrap();
        std::fs::create_dir_all("/run/sshd").unwrap();
        let child = Command::new("nsenter")
            .args([
                &format!("--net=/run/netns/{NS}"),
                "--",
                "/usr/sbin/sshd",
                "-D",
                "-e",
                "-f",
                &d("sshd_config"),
            ])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("sshd.log")).unwrap())
            .spawn()
            .unwrap();
        let s = Sshd { child, dir };
        let start = Instant::now();
        loop {
            let (ok, _, err) = s.remote(&["exec", "--", "true"], "id");
            if ok {
                break;
            }
            assert!(start.elapsed() < Duration::from_secs(15), "sshd did not come up: {err}\n{}", s.log());
            std::thread::sleep(Duration::from_millis(100));
        }
        s
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("sshd.log")).unwrap_or_default()
    }

    /// `archy-chaos node remote ssh://root@HOST ... <action>` with the given key.
    fn remote(&self, action: &[&str], key: &str) -> (bool, String, String) {
        let api = std::fs::read_to_string(self.dir.join("api")).unwrap_or_else(|_| "127.0.0.1:9".into());
        let url = format!("ssh://root@{HOST}");
        let identity = self.dir.join(key).display().to_string();
        let commands = self.dir.join("commands.yml").display().to_string();
        let known = self.dir.join("known_hosts").display().to_string();
        let mut args =
            vec!["node", "remote", &url, "--api", &api, "--identity", &identity, "--known-hosts", &known];
        args.extend(["--reboot-timeout", "60s"]);
        if Path::new(&commands).exists() {
            args.extend(["--commands", &commands]);
        }
        args.extend(action);
        chaos(&args)
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = Command::new("ip").args(["link", "del", VETH]).output();
        let _ = Command::new("ip").args(["netns", "del", NS]).output();
        let _ = Command::new("ip").args(["netns", "del", HOST_NS]).output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn ssh_driver_hurts_a_node_behind_a_real_sshd() {
    let sshd = Sshd::start();
    let (ok, out, err) = sshd.remote(&["exec", "--", "id", "-un"], "id");
    assert!(ok && out.trim() == "root", "{out}{err}\n{}", sshd.log());

    // The node behind the server.
    let (ok, _, err) = chaos(&["node", "up", "tssh", "--netns"]);
    assert!(ok, "{err}");
    let status: Value = serde_json::from_str(&chaos(&["node", "status", "tssh"]).1).unwrap();
    std::fs::write(sshd.dir.join("api"), status["agent"].as_str().unwrap()).unwrap();
    // What the "host" runs for each primitive: the local node's own commands, run in the
    // machine's network namespace (the server lives in the test's).
    let bin = env!("CARGO_BIN_EXE_archy-chaos");
    let node = |cmd: &str| {
        format!(
            "nsenter --net=/run/netns/{HOST_NS} -- env ARCHY_NODES_DIR={} {bin} node {cmd}",
            nodes_dir().display()
        )
    };
    let yaml = [
        ("power_cut", node("reboot tssh")),
        ("reboot", node("reboot tssh --graceful")),
        ("kill_agent", node("kill-agent tssh --signal {signal}")),
        ("restart_agent", node("restart-agent tssh")),
        ("agent_pid", node("exec tssh systemctl --user show -p MainPID --value archy-agent.service")),
        ("kill_container", node("kill-container tssh {app} --signal {signal}")),
        ("partition", node("partition tssh")),
        ("heal", node("heal tssh")),
        ("token", format!("cat {}/tssh/data/agent/api-token", nodes_dir().display())),
    ]
    .iter()
    .map(|(k, v)| format!("{k}: \"{}\"\n", v.replace('"', "\\\"")))
    .collect::<String>();
    std::fs::write(sshd.dir.join("commands.yml"), yaml).unwrap();

    let (ok, out, err) = sshd.remote(&["rpc", "package.install", r#"{"id":"fx-web"}"#], "id");
    assert!(ok, "{out}{err}");
    let wait_up = || {
        let start = Instant::now();
        loop {
            let (ok, out, _) = sshd.remote(&["rpc", "package.list"], "id");
            if ok && out.contains("\"up\": true") {
                return;
            }
            assert!(start.elapsed() < Duration::from_secs(60), "fx-web not up: {out}");
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    wait_up();

    let (ok, out, err) = sshd.remote(&["power-cut"], "id");
    assert!(ok, "{out}{err}");
    let e: Value = serde_json::from_str(&out).unwrap();
    assert_ne!(e["agent_instance_before"], e["agent_instance_after"], "the power cut took no effect: {e}");
    wait_up();

    let (ok, out, err) = sshd.remote(&["restart-agent"], "id");
    assert!(ok && out.contains("\"took_effect\": true"), "{out}{err}");

    // Batch mode: a key the server does not know fails at once, never prompts.
    let start = Instant::now();
    let (ok, _, err) = sshd.remote(&["exec", "--", "true"], "other");
    assert!(!ok && err.contains("Permission denied"), "{err}");
    assert!(start.elapsed() < Duration::from_secs(10));

    let (ok, _, err) = chaos(&["node", "down", "tssh"]);
    assert!(ok, "{err}");
}

#[test]
fn ssh_urls_are_checked() {
    for (url, want) in
        [("root@host", "is not ssh://"), ("ssh://host", "needs a user"), ("ssh://a@b:port", "bad port")]
    {
        let (ok, _, err) = chaos(&["node", "remote", url, "--api", "127.0.0.1:9", "boot"]);
        assert!(!ok && err.contains(want), "{url}: {err}");
    }
}
