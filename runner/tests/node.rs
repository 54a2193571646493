//! Local nodes-in-a-box, driven through `archy-chaos node ...` as a person would: each fault
//! primitive is real and checked for its effect, and `down` leaves nothing behind.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

mod support;

use serde_json::{json, Value};
use support::{chaos, nodes_dir};

/// Nodes publish the fixtures' fixed ports inside their own network namespaces, but they
/// share the veth index pool and the host's two cores: one test at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

struct TestNode {
    name: String,
}

impl TestNode {
    fn up(name: &str, extra: &[&str]) -> TestNode {
        let agent = Path::new(env!("CARGO_BIN_EXE_archy-chaos")).with_file_name("archy-agent");
        assert!(
            agent.is_file(),
            "{} missing: run the workspace's tests (cargo test --workspace)",
            agent.display()
        );
        let mut args = vec!["node", "up", name, "--netns"];
        args.extend(extra);
        let n = TestNode { name: name.into() };
        n.ok(&args);
        n
    }

    fn ok(&self, args: &[&str]) -> String {
        let (ok, out, err) = chaos(args);
        assert!(ok, "archy-chaos {args:?} failed:\n{out}\n{err}\n{}", self.log());
        out
    }

    fn json(&self, args: &[&str]) -> Value {
        serde_json::from_str(&self.ok(args)).unwrap()
    }

    fn rpc(&self, method: &str, params: Value) -> Value {
        self.json(&["node", "rpc", &self.name, method, &params.to_string()])
    }

    fn root(&self) -> PathBuf {
        nodes_dir().join(&self.name)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.root().join("node.log")).unwrap_or_default()
    }

    fn exec(&self, argv: &[&str]) -> String {
        let mut args = vec!["node", "exec", &self.name];
        args.extend(argv);
        self.ok(&args)
    }

    fn wait_up(&self, apps: &[&str]) -> Duration {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(90) {
            let (ok, out, _) = chaos(&["node", "rpc", &self.name, "package.list"]);
            if ok {
                let list: Value = serde_json::from_str(&out).unwrap_or(Value::Null);
                let up = |id: &str| {
                    list.as_array().into_iter().flatten().any(|a| a["id"] == id && a["up"] == true)
                };
                if apps.iter().all(|id| up(id)) {
                    return start.elapsed();
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("{apps:?} not up after 90 s on node {}\n{}", self.name, self.exec(&["podman", "ps", "-a"]));
    }

    /// name -> (container id, pid inside the node)
    fn containers(&self) -> Vec<(String, String, String)> {
        let out = self.exec(&["podman", "ps", "--format", "{{.Names}} {{.ID}} {{.Pid}}"]);
        let mut v: Vec<_> = out
            .lines()
            .filter_map(|l| {
                let mut w = l.split_whitespace();
                Some((w.next()?.into(), w.next()?.into(), w.next()?.into()))
            })
            .collect();
        v.sort();
        v
    }

    fn install(&self, apps: &[&str]) {
        for a in apps {
            self.rpc("package.install", json!({"id": a}));
        }
        self.wait_up(apps);
    }

    /// Down, and nothing of the node left: files, cgroup, netns, veth, processes.
    fn down(self) {
        let root = self.root();
        self.ok(&["node", "down", &self.name]);
        assert!(!root.exists(), "{} left behind", root.display());
        let cg = ["/sys/fs/cgroup/archy-chaos", "/sys/fs/cgroup/unified/archy-chaos"]
            .map(|c| Path::new(c).join(&self.name));
        assert!(cg.iter().all(|c| !c.exists()), "cgroup left behind");
        assert!(!Path::new("/run/netns").join(format!("archy-{}", self.name)).exists(), "netns left behind");
        assert!(!Path::new("/sys/class/net").join(format!("ar-{}", self.name)).exists(), "veth left behind");
        let mentions = std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
            .filter(|c| String::from_utf8_lossy(c).contains(&*root.to_string_lossy()))
            .count();
        assert_eq!(mentions, 0, "processes of the node still alive");
        std::mem::forget(self); // Drop would try again
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        let _ = chaos(&["node", "down", &self.name]);
    }
}

#[test]
fn power_cut_kills_every_process_and_boot_brings_apps_and_data_back() {
    let _g = serial();
    let n = TestNode::up("tpower", &[]);
    n.install(&["fx-web", "fx-client", "fx-hostnet"]);
    let www = n.root().join("data/apps/fx-web/data/www");
    // Synced, file and directories, as an app that needs its data back does: the node is lazy
    // by default where FUSE is, and its power cut keeps only that.
    let marker = www.join("marker.txt");
    {
        // Closed before the cut: a file held open keeps the mount busy.
        let mut f = std::fs::File::create(&marker).unwrap();
        f.write_all(b"written before the power cut\n").unwrap();
        f.sync_all().unwrap();
        // Up to the data root: the app made `www` itself and never synced its entry.
        for dir in www.ancestors().take_while(|d| d.starts_with(n.root().join("data"))) {
            std::fs::File::open(dir).unwrap().sync_all().unwrap();
        }
    }
    let unsynced = www.join("unsynced.txt");
    std::fs::write(&unsynced, "never synced\n").unwrap();
    let before = n.containers();

    let cut = n.json(&["node", "power-cut", "tpower"]);
    let lazy = Path::new("/dev/fuse").exists();
    assert_eq!(cut["lost"].is_object(), lazy, "{cut}");
    assert!(cut["processes_killed"].as_u64().unwrap() > 5, "{cut}");
    assert_eq!(cut["processes_left"], 0, "{cut}");
    let status = n.json(&["node", "status", "tpower"]);
    assert_eq!((status["up"].as_bool(), status["processes"].as_u64()), (Some(false), Some(0)), "{status}");
    let alive: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(&*n.root().to_string_lossy()))
        .collect();
    assert!(alive.is_empty(), "processes of the node survived the power cut: {alive:?}");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(&*n.root().join("run").to_string_lossy()), "the runtime dir tmpfs survived");

    n.ok(&["node", "boot", "tpower"]);
    // Nobody asks: the user manager starts the agent and every enabled unit by itself.
    n.wait_up(&["fx-web", "fx-client", "fx-hostnet"]);
    let after = n.containers();
    assert_eq!(after.len(), before.len(), "{after:?}");
    assert_ne!(after, before, "new containers after a power cut");
    assert_eq!(std::fs::read_to_string(&marker).unwrap(), "written before the power cut\n");
    assert_eq!(unsynced.exists(), !lazy, "a lazy node's cut drops what was never synced: {cut}");
    assert!(n
        .exec(&["wget", "-q", "-O-", "http://127.0.0.1:18080/marker.txt"])
        .contains("before the power cut"));
    n.down();
}

#[test]
fn restart_agent_kills_its_cgroup_and_quadlet_containers_keep_running() {
    let _g = serial();
    let n = TestNode::up("tquad", &[]);
    n.install(&["fx-web", "fx-gateway"]);
    let before = n.containers();
    let r = n.json(&["node", "restart-agent", "tquad"]);
    assert_eq!(r["took_effect"], true, "the agent's pid must change: {r}");
    n.wait_up(&["fx-web", "fx-gateway"]);
    assert_eq!(n.containers(), before, "same container ids and pids after the agent restart");
    n.down();
}

#[test]
fn podman_backend_containers_survive_an_agent_restart_only_outside_its_cgroup() {
    let _g = serial();
    for (name, fm3) in [("tfixed", false), ("tfm3", true)] {
        let extra: &[&str] = if fm3 { &["--backend", "podman", "--fm3"] } else { &["--backend", "podman"] };
        let n = TestNode::up(name, extra);
        n.install(&["fx-web"]);
        let before = n.containers();
        n.ok(&["node", "restart-agent", name]);
        n.wait_up(&["fx-web"]);
        let after = n.containers();
        if fm3 {
            // The platform's FM3: conmon lived in the agent's cgroup and died with it; the new
            // agent had to start the container again (new main process).
            assert_ne!(after, before, "FM3 not reproduced: the container survived in the agent's cgroup");
        } else {
            assert_eq!(after, before, "podman placed outside the agent's cgroup keeps containers alive");
        }
        n.down();
    }
}

#[test]
fn partition_cuts_the_agent_off_and_heal_restores_it() {
    let _g = serial();
    let n = TestNode::up("tpart", &[]);
    n.ok(&["node", "partition", "tpart"]);
    let (ok, _, err) = chaos(&["node", "rpc", "tpart", "node.status"]);
    assert!(!ok, "the agent answered through a partition");
    assert!(
        err.contains("rpc") || err.contains("connect") || err.contains("unreachable") || !err.is_empty(),
        "{err}"
    );
    // Inside the node the agent is fine.
    assert!(n.exec(&["wget", "-q", "-O-", "http://127.0.0.1:8719/healthz"]).contains("ok"));
    n.ok(&["node", "heal", "tpart"]);
    assert_eq!(n.rpc("node.status", Value::Null)["ready"], true);
    n.down();
}

#[test]
fn three_nodes_side_by_side_do_not_interfere() {
    let _g = serial();
    let nodes: Vec<TestNode> = ["tside1", "tside2", "tside3"].iter().map(|n| TestNode::up(n, &[])).collect();
    for n in &nodes {
        n.rpc("package.install", json!({"id": "fx-web"}));
    }
    for n in &nodes {
        n.wait_up(&["fx-web"]);
    }
    // The same fixture on the same port in three nodes, each its own container and storage.
    let ids: Vec<String> = nodes.iter().map(|n| n.exec(&["podman", "ps", "-q"])).collect();
    assert!(ids.iter().all(|i| !i.trim().is_empty()), "{ids:?}");
    assert!(ids[0] != ids[1] && ids[1] != ids[2], "{ids:?}");
    // Hurting one leaves the others alone.
    nodes[0].ok(&["node", "power-cut", "tside1"]);
    for (i, n) in nodes.iter().enumerate().skip(1) {
        assert_eq!(n.exec(&["podman", "ps", "-q"]), ids[i], "node {} was hurt", n.name);
        assert_eq!(n.rpc("node.status", Value::Null)["ready"], true);
    }
    for n in nodes {
        n.down();
    }
}

#[test]
fn a_secret_chowned_to_root_on_the_node_is_healed() {
    let _g = serial();
    let n = TestNode::up("tfault", &[]);
    n.install(&["fx-web"]);
    let f = n.json(&["node", "fault", "tfault", "data/secrets/fx-web/api-token", "chown-root"]);
    assert_eq!(f["owner_after"], 0, "{f}");
    n.rpc("node.reconcile", Value::Null);
    let meta = std::fs::metadata(n.root().join("data/secrets/fx-web/api-token")).unwrap();
    assert_ne!(std::os::unix::fs::MetadataExt::uid(&meta), 0, "not healed");
    n.wait_up(&["fx-web"]);
    n.down();
}

#[test]
fn node_commands_refuse_bad_input_clearly() {
    let _g = serial();
    for (args, want) in [
        (vec!["node", "up", "Bad_Name"], "node names are"),
        (vec!["node", "status", "nosuchnode"], "no node `nosuchnode`"),
    ] {
        let (ok, _, err) = chaos(&args);
        assert!(!ok && err.contains(want), "{args:?}: {err}");
    }
    let n = TestNode::up("tinput", &[]);
    let (ok, _, err) = chaos(&["node", "fault", "tinput", "../../etc/passwd", "delete"]);
    assert!(!ok && err.contains("is not a path inside the node's root"), "{err}");
    n.down();
}

#[test]
fn graceful_reboot_kill_agent_and_kill_container_each_take_effect_and_heal() {
    let _g = serial();
    let n = TestNode::up("tmisc", &[]);
    n.install(&["fx-web", "fx-gateway"]);

    // kill -9 of the agent: the manager restarts it; containers are not its business.
    let before = n.containers();
    let pid = |n: &TestNode| {
        n.exec(&["systemctl", "--user", "show", "-p", "MainPID", "--value", "archy-agent.service"])
    };
    let agent = pid(&n);
    n.ok(&["node", "kill-agent", "tmisc", "--signal", "KILL"]);
    let start = Instant::now();
    while pid(&n) == agent || pid(&n).trim() == "0" {
        assert!(start.elapsed() < Duration::from_secs(30), "the agent was not restarted");
        std::thread::sleep(Duration::from_millis(100));
    }
    n.wait_up(&["fx-web", "fx-gateway"]);
    assert_eq!(n.containers(), before);

    // An app's main process killed as by the OOM killer: it comes back as a new process.
    let e = n.json(&["node", "kill-container", "tmisc", "fx-gateway"]);
    let killed = e["pid"].to_string();
    let start = Instant::now();
    loop {
        let now = n.containers();
        let gw = now.iter().find(|c| c.0 == "archy-fx-gateway");
        if gw.is_some_and(|c| c.2 != killed) {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "fx-gateway not back: {now:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    n.wait_up(&["fx-web", "fx-gateway"]);

    // A clean shutdown of the user manager, then a boot.
    let out = n.ok(&["node", "reboot", "tmisc", "--graceful"]);
    assert!(out.contains("\"clean\": true"), "{out}");
    n.wait_up(&["fx-web", "fx-gateway"]);
    n.down();
}

/// Two runs with different node directories (a test beside a user's run) each took index 1:
/// two veths on 10.213.1.0/30, and one node's traffic reached the other's agent ("wrong
/// bearer token"). Indices are taken machine-wide now.
#[test]
fn nodes_of_two_node_directories_never_share_an_address() {
    let _g = serial();
    let other = tempfile::tempdir().unwrap();
    std::fs::set_permissions(other.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let a = TestNode::up("tdira", &["--bare"]);
    let in_other = |args: &[&str]| {
        let out = support::chaos_cmd(args).env("ARCHY_NODES_DIR", other.path()).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    in_other(&["node", "up", "tdirb", "--netns", "--bare"]);
    let addr =
        |status: &str| serde_json::from_str::<Value>(status).unwrap()["agent"].as_str().unwrap().to_string();
    let (x, y) = (addr(&a.ok(&["node", "status", "tdira"])), addr(&in_other(&["node", "status", "tdirb"])));
    in_other(&["node", "down", "tdirb"]);
    a.down();
    assert_ne!(x.split(':').next(), y.split(':').next(), "both nodes on one address");
}

/// The data root is a small filesystem of its own, so a full or read-only disk is real for
/// the agent's service user inside the node; it outlives power cuts and a lost mount (this
/// machine rebooted), and `down` leaves neither its mount nor its loop device. On the kernel
/// path, where the image is the data root itself (lazy: under it, `data.lower`).
#[test]
fn the_data_root_is_its_own_filesystem_and_disk_faults_are_real_inside_the_node() {
    use std::os::unix::fs::MetadataExt;
    let _g = serial();
    let n = TestNode::up("tdisk", &["--durability", "kernel"]);
    let (root, data) = (n.root(), n.root().join("data"));
    let img = root.join("data.img");

    // (a) Its own ext4 of about 128 MiB, owned by the service user as the rest of the node.
    let meta = std::fs::metadata(&data).unwrap();
    assert_ne!(meta.dev(), std::fs::metadata(&root).unwrap().dev(), "data is not a filesystem of its own");
    // The podman-fail flag (`bin/podman-fail`) is not on it: explore seed 401 turned podman
    // failing off while the data root was read-only, and podman failed for good.
    assert_ne!(meta.dev(), std::fs::metadata(root.join("bin")).unwrap().dev());
    assert_eq!(meta.uid(), std::fs::metadata(root.join("home")).unwrap().uid());
    assert_eq!(meta.mode() & 0o7777, 0o700, "the agent keeps its data root to its service user");
    let st = nix::sys::statvfs::statvfs(&data).unwrap();
    let size = st.blocks() * st.fragment_size();
    assert!((100 << 20..=128 << 20).contains(&size), "data root of {size} bytes");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        mounts.lines().any(|l| l.contains(&format!(" {} ", data.display())) && l.contains(" - ext4 ")),
        "{mounts}"
    );

    // A write of 1 MiB as the service user inside the node: (success, stderr).
    let write = |file: &str| {
        let script = format!("head -c 1048576 /dev/zero > {}/{file}", data.display());
        let (ok, _, err) = chaos(&["node", "exec", "tdisk", "sh", "-c", &script]);
        (ok, err)
    };
    assert!(write("before").0, "{}", n.log());

    // (b) Read-only: the filesystem's flag holds in the node's own mount namespace.
    let ro = n.json(&["node", "disk-fault", "tdisk", "read-only"]);
    assert_eq!(
        (ro["took_effect"].as_bool(), ro["writable_in_node"].as_bool()),
        (Some(true), Some(false)),
        "{ro}"
    );
    let (ok, err) = write("while-ro");
    assert!(!ok && err.contains("Read-only file system"), "{err}");
    let rw = n.json(&["node", "disk-fault", "tdisk", "read-only", "--off"]);
    assert_eq!(
        (rw["took_effect"].as_bool(), rw["writable_in_node"].as_bool()),
        (Some(true), Some(true)),
        "{rw}"
    );
    assert!(write("after-ro").0);
    // Explore seed 314: a node rebooted during the fault copied the read-only mount into its
    // new mount namespace, and turning the fault off left the node's data root read-only.
    n.json(&["node", "disk-fault", "tdisk", "read-only"]);
    n.ok(&["node", "reboot", "tdisk", "--graceful"]);
    let rw = n.json(&["node", "disk-fault", "tdisk", "read-only", "--off"]);
    assert_eq!(rw["writable_in_node"].as_bool(), Some(true), "{rw}");
    assert!(write("after-ro-and-reboot").0);

    // (c) Full: no space for the service user either (no root reserve).
    let full = n.json(&["node", "disk-fault", "tdisk", "full"]);
    assert_eq!(full["took_effect"], true, "{full}");
    assert!(full["free_bytes"].as_u64().unwrap() < 64 << 10, "{full}");
    let (ok, err) = write("while-full");
    assert!(!ok && err.contains("No space left on device"), "{err}");
    let freed = n.json(&["node", "disk-fault", "tdisk", "full", "--off"]);
    assert_eq!(freed["took_effect"], true, "{freed}");
    assert!(freed["free_bytes"].as_u64().unwrap() > 100 << 20, "{freed}");
    assert!(write("after-full").0);
    assert_eq!(n.rpc("node.status", Value::Null)["ready"], true);

    // (d) Data written inside the node survives a power cut, and a boot mounts the image again
    // when the mount is gone (as after a reboot of this machine).
    n.exec(&["sh", "-c", &format!("echo kept > {}/marker", data.display())]);
    n.ok(&["node", "power-cut", "tdisk"]);
    let umount = std::process::Command::new("umount").arg(&data).output().unwrap();
    assert!(umount.status.success(), "{}", String::from_utf8_lossy(&umount.stderr));
    assert!(!data.join("marker").exists());
    n.ok(&["node", "boot", "tdisk"]);
    assert_eq!(std::fs::read_to_string(data.join("marker")).unwrap(), "kept\n");
    assert_eq!(n.exec(&["cat", &data.join("marker").to_string_lossy()]), "kept\n");

    let loops = |args: &[&str]| {
        let out = std::process::Command::new("losetup").args(args).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(!loops(&["-j", &img.to_string_lossy()]).is_empty(), "no loop device behind the data root");
    n.down();
    // The image went with the node's files: no loop device may still name it.
    let root_text = root.to_string_lossy().into_owned();
    assert!(!std::fs::read_to_string("/proc/mounts").unwrap().contains(&root_text), "a mount left behind");
    assert!(!loops(&["-a"]).contains(&root_text), "a loop device left behind: {}", loops(&["-a"]));
}
