//! A node-in-a-box on this machine: its own PID, mount and cgroup namespaces (and optionally
//! network namespace), its own HOME, podman storage and runtime dir, a real `systemd --user`
//! manager as the user's init, and the agent as a user service of it. Faults are real: a power
//! cut is a SIGKILL of the node's PID 1.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use archy_agent::manifest::Catalog;
use serde_json::{json, Value};

use super::{checked, Backend, DiskFault, Evidence, FileFault, FileKind, Node, Stat, PODMAN_FAIL_FLAG};

mod oom;

const INIT: &str = include_str!("node-init.sh");
/// The range of node addresses: 10.213.<index>.0/30 per node, host side .1, node side .2.
const NODE_NET: &str = "10.213.0.0/16";
/// Port the agent listens on inside a node with its own network namespace.
const NETNS_AGENT_PORT: u16 = 8719;
/// Size of the filesystem under a node's data root: quick to fill, ample for the fixtures.
const DATA_SIZE: u64 = 128 << 20;
/// The file a `full` disk fault fills the data root with.
const FILL_FILE: &str = ".archy-chaos-fill";
/// Free space under which the data root counts as full: less than one small write.
const FULL_BELOW: u64 = 64 << 10;

fn yes() -> bool {
    true
}

/// What `node up` remembers between commands.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct NodeSpec {
    pub name: String,
    pub user: String,
    pub backend: Backend,
    /// Index of the node's /30 on its veth pair, when it has its own network namespace.
    pub netns: Option<u8>,
    /// Agent port on the host's loopback (nodes without their own network namespace).
    pub port: u16,
    /// Podman backend: podman calls run in a cgroup of their own, not the agent's. Off, the
    /// node reproduces the platform's FM3 (containers die when the agent restarts).
    #[serde(default = "yes")]
    pub podman_cgroup: bool,
    /// No agent: a host for `node provision` to install one on (its boot waits for the user
    /// manager, not for an agent).
    #[serde(default)]
    pub bare: bool,
    /// The data root is the lazy filesystem (`lazyfs`) over the image mounted at `data.lower`:
    /// a power cut loses what the node never synced, as real hardware does.
    #[serde(default)]
    pub lazy: bool,
}

/// How `node up` makes a node.
#[derive(Debug, Clone)]
pub struct UpOptions {
    pub name: String,
    pub user: String,
    pub backend: Backend,
    /// Own network namespace with a veth pair (side-by-side nodes, partitions).
    pub netns: bool,
    /// Podman backend: leave podman in the agent's cgroup, the platform's FM3 bug.
    pub fm3: bool,
    /// Deliberate agent bugs (`archy_agent::failpoint::BREAKAGES`), for proving the suite.
    pub breakages: Vec<String>,
    /// The data root forgets unsynced writes on a power cut (`NodeSpec::lazy`).
    pub lazy: bool,
}

pub struct LocalNode {
    pub spec: NodeSpec,
    pub root: PathBuf,
    /// Held while the node boots, is cut or shuts down: two boots at once from concurrent
    /// clients (explore) would start two inits, one of them unknown to `launcher.pid`.
    power: std::sync::Mutex<()>,
}

/// Where local nodes live.
pub fn nodes_dir() -> PathBuf {
    std::env::var_os("ARCHY_NODES_DIR")
        .map_or_else(|| PathBuf::from("/var/lib/archy-chaos/nodes"), PathBuf::from)
}

use crate::exec::run;

/// A free network index (10.213.<i>.0/30) under a machine-wide lock, returned with it: nodes
/// of other directories (another run, a test) share this machine's routes, and two veths on
/// one /30 misroute both.
fn allocate_index(netns: bool) -> Result<(Option<u8>, std::fs::File)> {
    std::fs::create_dir_all(nodes_dir())?;
    let lock = std::fs::File::create("/run/archy-chaos-nodes.lock")?;
    lock.lock()?;
    if !netns {
        return Ok((None, lock));
    }
    let mut used: Vec<u8> = std::fs::read_dir(nodes_dir())
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| LocalNode::open(&e.file_name().to_string_lossy()).ok()?.spec.netns)
        .collect();
    let addrs = run(Command::new("ip").args(["-o", "-4", "addr", "show", "to", NODE_NET]))?;
    used.extend(
        String::from_utf8_lossy(&addrs.stdout)
            .split_whitespace()
            .filter_map(|w| w.strip_prefix("10.213.")?.split('.').next()?.parse::<u8>().ok()),
    );
    let index = (1..=250).find(|i| !used.contains(i)).context("no free node network index")?;
    Ok((Some(index), lock))
}

/// A node's HOME as a booting machine has it: podman's and the user manager's configuration.
fn write_home(root: &Path) -> Result<()> {
    let home = root.join("home");
    for d in [
        "home/.config/containers/systemd",
        "home/.config/systemd/user/default.target.wants",
        "home/.config/archy",
        "run",
        "data",
        "bin",
    ] {
        std::fs::create_dir_all(root.join(d))?;
    }
    std::fs::write(
        home.join(".config/containers/containers.conf"),
        "[engine]\nruntime = \"runc\"\n[containers]\ndefault_ulimits = [\"nofile=1024:1024\", \"nproc=1024:1024\"]\n",
    )?;
    std::fs::write(home.join(".config/containers/storage.conf"), "[storage]\ndriver = \"vfs\"\n")?;
    // No journald in a node: every unit's output goes to the manager's, i.e. node.log.
    std::fs::write(
        home.join(".config/systemd/user.conf"),
        "[Manager]\nDefaultStandardOutput=inherit\nDefaultStandardError=inherit\n",
    )?;
    Ok(())
}

/// A lazy filesystem of a node (`lazyfs`): the view at `mount` over the directory `lower`,
/// served with its control socket, pid file and log at `<name>.sock`, `.pid` and `.log`.
#[derive(Clone, Copy)]
struct Lazy {
    lower: &'static str,
    mount: &'static str,
    name: &'static str,
}

/// The data root, over the data image. Podman's storage is not lazy: its images come back
/// by a pull or build, its containers from units, and it is podman's crash-safety, not the
/// agent's; a cut of it would fail scenarios on what no agent can fix (vfs copies of image
/// layers through FUSE would also cost seconds per container).
impl Lazy {
    /// `<root>/<name>.<ext>`: its control socket, pid file or log.
    fn file(self, root: &Path, ext: &str) -> PathBuf {
        root.join(format!("{}.{ext}", self.name))
    }
}

const LAZY_DATA: Lazy = Lazy { lower: "data.lower", mount: "data", name: "lazyfs" };
/// The Quadlet unit directory, over a directory of this machine's disk: not the data image,
/// whose disk faults are the data root's alone.
const LAZY_UNITS: Lazy =
    Lazy { lower: "units.lower", mount: "home/.config/containers/systemd", name: "lazyfs-units" };

/// Makes `<root>/data` a filesystem of its own (created once, mounted if it is not): a sparse
/// ext4 image loop-mounted in this machine's mount namespace, where the runner reads the
/// node's files and from which every boot's namespace copies its mounts. Its own filesystem
/// makes disk faults real for every process of the node: full is ENOSPC, read-only EROFS.
/// No root reserve (`-m 0`), so full is full for the service user too. A lazy node has the
/// image at `data.lower`, and the lazy views of it and of its unit directory over them.
fn mount_data(root: &Path, lazy: bool) -> Result<()> {
    let (img, data) = (root.join("data.img"), root.join(if lazy { LAZY_DATA.lower } else { "data" }));
    if mount_at(&data)?.is_none() {
        std::fs::create_dir_all(&data).with_context(|| format!("creating {}", data.display()))?;
        if !img.exists() {
            ensure!(
                std::fs::read_dir(&data)?.next().is_none(),
                "{} holds files but there is no {}: the node was made by an older archy-chaos; take it down (`archy-chaos node down NAME`) and up again",
                data.display(),
                img.display()
            );
            // Formatted under another name first: an image that exists is a whole filesystem.
            let new = root.join("data.img.new");
            std::fs::File::create(&new)
                .and_then(|f| f.set_len(DATA_SIZE))
                .with_context(|| format!("creating {}", new.display()))?;
            run(Command::new("mkfs.ext4").args(["-q", "-m", "0"]).arg(&new).stdin(Stdio::null()))?;
            std::fs::rename(&new, &img)?;
        }
        run(Command::new("mount").args(["-o", "loop"]).arg(&img).arg(&data))?;
    }
    for l in [LAZY_DATA, LAZY_UNITS].into_iter().filter(|_| lazy) {
        if mount_at(&root.join(l.mount))?.is_none() {
            mount_lazy(root, l)?;
        }
    }
    Ok(())
}

/// The lazy filesystem `l`, served by `archy-chaos lazyfs` in a process group of its own (a
/// Ctrl-C of the runner is not a power cut of the node's files).
fn mount_lazy(root: &Path, l: Lazy) -> Result<()> {
    let (lower, mount) = (root.join(l.lower), root.join(l.mount));
    let (control, log_file) = (l.file(root, "sock"), l.file(root, "log"));
    std::fs::create_dir_all(&lower)?;
    std::fs::create_dir_all(&mount)?;
    let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_file)?;
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.arg("lazyfs").arg(&lower).arg(&mount).arg(&control);
    cmd.stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log).process_group(0);
    let child = crate::exec::spawn(&mut cmd).context("starting a lazy filesystem")?;
    std::fs::write(l.file(root, "pid"), child.id().to_string())?;
    std::mem::forget(child); // reaped by `reap_lazy` once it has unmounted
    let start = Instant::now();
    while !(control.exists() && mount_at(&mount)?.is_some()) {
        ensure!(
            start.elapsed() < Duration::from_secs(10),
            "the lazy filesystem did not mount at {} (is /dev/fuse here?); see {}",
            mount.display(),
            log_file.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Waits (10 s at most) for the lazy filesystem `l` to be unmounted, and reaps its server
/// if this process started it.
fn reap_lazy(root: &Path, l: Lazy) -> Result<()> {
    let start = Instant::now();
    while mount_at(&root.join(l.mount))?.is_some() {
        ensure!(
            start.elapsed() < Duration::from_secs(10),
            "the lazy filesystem at {0} stays mounted: a process outside the node may hold a file \
             in it open (`fuser -vm {0}` lists them)",
            root.join(l.mount).display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    if let Ok(pid) = std::fs::read_to_string(l.file(root, "pid")) {
        let pid = nix::unistd::Pid::from_raw(pid.trim().parse().unwrap_or(0));
        let _ = nix::sys::wait::waitpid(pid, Some(nix::sys::wait::WaitPidFlag::WNOHANG));
    }
    Ok(())
}

/// One command to the lazy filesystem `l` (`lazyfs::serve`); its answer, JSON.
fn lazy_control(root: &Path, l: Lazy, command: &str) -> Result<Value> {
    use std::io::{BufRead, Write};
    let socket = l.file(root, "sock");
    let mut s = std::os::unix::net::UnixStream::connect(&socket)
        .with_context(|| format!("the lazy filesystem's control {}", socket.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    writeln!(s, "{command}")?;
    let mut answer = String::new();
    std::io::BufReader::new(&s).read_line(&mut answer)?;
    serde_json::from_str(&answer).with_context(|| format!("lazyfs answered {answer:?} to {command}"))
}

/// What is mounted at `path` in this process's mount namespace: (the mount's options, the
/// filesystem's options) of the topmost mount there, `None` if nothing is.
fn mount_at(path: &Path) -> Result<Option<(String, String)>> {
    let Ok(path) = std::fs::canonicalize(path) else { return Ok(None) };
    let table = std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    // Mount points are written with octal escapes for space, tab, newline and backslash.
    let unescape = |p: &str| {
        p.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")
    };
    Ok(table
        .lines()
        .filter_map(|l| {
            let (mine, fs) = l.split_once(" - ")?;
            let f: Vec<&str> = mine.split(' ').collect();
            if Path::new(&unescape(f.get(4)?)) != path {
                return None;
            }
            Some((f.get(5)?.to_string(), fs.split(' ').nth(2)?.to_string()))
        })
        .next_back())
}

/// Free bytes of the filesystem holding `path`, as an unprivileged writer sees them.
fn free_bytes(path: &Path) -> Result<u64> {
    let st = nix::sys::statvfs::statvfs(path).with_context(|| format!("statvfs {}", path.display()))?;
    Ok(st.blocks_available() * st.fragment_size())
}

/// Fills the filesystem of `path` with that one file, as root (the agent can neither remove
/// nor shrink it): fallocate what is free, then write until ENOSPC what fallocate left (its
/// extents' own blocks come out of the same free space, so it fails short of the end), down
/// to the last byte.
fn fill(path: &Path) -> Result<()> {
    use std::io::Write;
    let dir = path.parent().context("the fill file has no directory")?;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    let (start, free) = (f.metadata()?.len(), free_bytes(dir)?);
    match nix::fcntl::fallocate(&f, nix::fcntl::FallocateFlags::empty(), start as i64, free as i64) {
        Ok(()) | Err(nix::errno::Errno::ENOSPC) => {}
        Err(e) => return Err(e).with_context(|| format!("fallocate {}", path.display())),
    }
    // Smaller and smaller writes down to one byte: not one block is left for the agent.
    for size in [64 << 10, 4 << 10, 1] {
        let chunk = vec![0u8; size];
        loop {
            match f.write_all(&chunk) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(nix::libc::ENOSPC) => break,
                Err(e) => return Err(e).with_context(|| format!("writing {}", path.display())),
            }
        }
    }
    Ok(())
}

/// The cgroup of the service user's own (beside its manager's units, delegated) that the
/// podman backend moves podman's calls into, so that conmon outlives an agent restart (FM3).
pub fn podman_cgroup(uid: impl std::fmt::Display) -> String {
    format!("/sys/fs/cgroup/user.slice/user-{uid}.slice/user@{uid}.service/archy-podman")
}

/// The agent as the node's user service: its binary, the catalog, its config and unit, and
/// the podman it calls (the real one, unless the runner's fault flag says it fails).
fn install_agent(
    root: &Path,
    spec: &NodeSpec,
    opts: &UpOptions,
    agent_bin: &Path,
    catalog: &Path,
    uid: u32,
) -> Result<()> {
    let (home, cat) = (root.join("home"), root.join("catalog"));
    ensure!(
        agent_bin.is_file(),
        "{} not found: the agent is built beside archy-chaos (`cargo build --release` builds both)",
        agent_bin.display()
    );
    // Copy then rename: the running agent of a node being re-created keeps its inode.
    std::fs::copy(agent_bin, root.join("bin/.archy-agent.new")).context("copying the agent binary")?;
    std::fs::rename(root.join("bin/.archy-agent.new"), root.join("bin/archy-agent"))?;
    if !cat.exists() {
        run(Command::new("cp").arg("-r").arg(catalog).arg(&cat))?;
    }
    let port = spec.port;
    let listen = if spec.netns.is_some() { format!("0.0.0.0:{port}") } else { format!("127.0.0.1:{port}") };
    std::fs::write(
        home.join(".config/archy/agent.yml"),
        format!(
            "data_root: {data}\ncatalog: {cat}\nlisten: \"{listen}\"\ntick_interval: 5s\nbackend: {backend}\nquadlet_dir: {home}/.config/containers/systemd\npodman: {podman}\n{cgroup}",
            podman = root.join("bin/podman").display(),
            data = root.join("data").display(),
            cat = cat.display(),
            backend = spec.backend.name(),
            home = home.display(),
            cgroup = if opts.fm3 {
                String::new()
            } else {
                format!("podman_cgroup: {}\n", podman_cgroup(uid))
            },
        ),
    )?;
    let broken = if opts.breakages.is_empty() {
        String::new()
    } else {
        format!("Environment={}={}\n", archy_agent::failpoint::BREAK_ENV, opts.breakages.join(","))
    };
    std::fs::write(
        home.join(".config/systemd/user/archy-agent.service"),
        agent_unit(&root.join("bin/archy-agent"), &home.join(".config/archy/agent.yml"), &broken),
    )?;
    let wants = home.join(".config/systemd/user/default.target.wants/archy-agent.service");
    if !wants.exists() {
        std::os::unix::fs::symlink("../archy-agent.service", &wants)?;
    }
    std::fs::write(root.join("bin/podman"), podman_wrapper(root, "/usr/bin/podman"))?;
    std::fs::set_permissions(root.join("bin/podman"), std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// Makes `cmd`'s process join the cgroup `dir` (host path) before it runs, and with
/// `new_session` leave the runner's session (a node's init must outlive the runner).
fn join_cgroup(cmd: &mut Command, dir: &Path, new_session: bool) -> Result<()> {
    let procs = std::ffi::CString::new(dir.join("cgroup.procs").into_os_string().into_encoded_bytes())?;
    // SAFETY: only async-signal-safe calls (setsid, open, write, close) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if new_session {
                nix::libc::setsid();
            }
            let fd = nix::libc::open(procs.as_ptr(), nix::libc::O_WRONLY | nix::libc::O_CLOEXEC);
            let ok = fd >= 0 && nix::libc::write(fd, b"0".as_ptr().cast(), 1) == 1;
            if fd >= 0 {
                nix::libc::close(fd);
            }
            if ok {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
    Ok(())
}

/// The unified cgroup hierarchy of this host (pure v2, or the `unified` mount of hybrid).
fn cgroup2_root() -> PathBuf {
    if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        PathBuf::from("/sys/fs/cgroup")
    } else {
        PathBuf::from("/sys/fs/cgroup/unified")
    }
}

fn pids_of(ppid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| s.rsplit(')').next()?.split_whitespace().nth(1)?.parse::<u32>().ok())
                == Some(ppid)
        })
        .collect()
}

impl LocalNode {
    pub fn open(name: &str) -> Result<LocalNode> {
        let root = nodes_dir().join(name);
        let text = std::fs::read_to_string(root.join("node.json"))
            .with_context(|| format!("no node `{name}` (run `archy-chaos node up {name}` first)"))?;
        Ok(LocalNode { spec: serde_json::from_str(&text)?, root, power: Default::default() })
    }

    /// Creates the node's files (idempotent) and boots it.
    pub fn up(opts: &UpOptions, agent_bin: &Path, catalog: &Path) -> Result<LocalNode> {
        LocalNode::create(opts, Some((agent_bin, catalog)))
    }

    /// A node with its user manager but no agent, as a fresh host is before `node provision`.
    pub fn up_bare(opts: &UpOptions) -> Result<LocalNode> {
        LocalNode::create(opts, None)
    }

    fn create(opts: &UpOptions, agent: Option<(&Path, &Path)>) -> Result<LocalNode> {
        let UpOptions { name, user, backend, netns, fm3, breakages, lazy } = opts;
        let (name, user, backend, netns) = (name.as_str(), user.as_str(), *backend, *netns);
        ensure!(
            !name.is_empty()
                && name.len() <= 12
                && name.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()),
            "node names are 1-12 lowercase letters or digits (they name a veth and a cgroup)"
        );
        ensure!(
            nix::unistd::geteuid().is_root(),
            "local nodes are made by root (namespaces, mounts, cgroups)"
        );
        let u = nix::unistd::User::from_name(user)?
            .with_context(|| format!("no user `{user}`: run scripts/setup-host"))?;
        let root = nodes_dir().join(name);
        if let Ok(existing) = LocalNode::open(name) {
            if existing.init_pid().is_some() {
                return Ok(existing);
            }
        }
        // Held until the node's veth exists: the index is taken then.
        let (index, _lock) = allocate_index(netns)?;
        let port = if netns {
            NETNS_AGENT_PORT
        } else {
            std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port()
        };
        let spec = NodeSpec {
            name: name.into(),
            user: user.into(),
            backend,
            netns: index,
            port,
            podman_cgroup: !fm3,
            bare: agent.is_none(),
            lazy: *lazy,
        };

        let home = root.join("home");
        write_home(&root)?;
        mount_data(&root, spec.lazy)?; // before the chown below, which then owns the filesystem's root
        let cat = root.join("catalog");
        if let Some((agent_bin, catalog)) = agent {
            install_agent(&root, &spec, opts, agent_bin, catalog, u.uid.as_raw())?;
        }
        std::fs::write(root.join("init.sh"), INIT)?;
        std::fs::set_permissions(root.join("init.sh"), std::fs::Permissions::from_mode(0o755))?;
        std::fs::write(root.join("node.json"), serde_json::to_vec_pretty(&spec)?)?;
        run(Command::new("chown")
            .arg("-R")
            .arg(format!("{}:{}", u.uid, u.gid))
            .arg(&home)
            .arg(root.join("data"))
            .arg(root.join("run")))?;
        if cat.exists() {
            run(Command::new("chown").arg("-R").arg(format!("{}:{}", u.uid, u.gid)).arg(&cat))?;
        }
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755))?;

        let node = LocalNode { spec, root, power: Default::default() };
        // A node that cannot come up whole is taken down, not left running unseen.
        let ready = (|| -> Result<()> {
            if let Some(i) = index {
                node.create_netns(i)?;
            }
            node.boot()?;
            if node.spec.bare {
                return Ok(()); // `node provision --fixtures` imports it, as on a real host
            }
            if !breakages.is_empty() {
                let on = super::agent(&node).status()?.broken;
                ensure!(
                    &on == breakages,
                    "node {name}: the agent reports breakages {on:?}, not {breakages:?}: it was built without them (the runner's tests build it with the agent's `breakage` feature: `cargo build -p archy-agent --features breakage`)"
                );
            }
            node.import_fixture()
        })();
        match ready {
            Ok(()) => Ok(node),
            Err(e) => match node.down() {
                Ok(()) => Err(e),
                Err(down) => Err(e.context(format!("and taking the node down failed too: {down:#}"))),
            },
        }
    }

    /// The fixture image, imported into this node's own storage from inside the node.
    fn import_fixture(&self) -> Result<()> {
        let out = self.exec(&["podman", "image", "exists", "localhost/archy-fixture:1"])?;
        if !out.status.success() {
            let rootfs = "/var/lib/archy-chaos/fixture-rootfs.tar";
            ensure!(Path::new(rootfs).is_file(), "{rootfs} missing: run scripts/setup-host");
            let out = self.exec(&["podman", "import", "-q", rootfs, "localhost/archy-fixture:1"])?;
            ensure!(
                out.status.success(),
                "importing the fixture image: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    fn netns_name(&self) -> String {
        format!("archy-{}", self.spec.name)
    }

    fn veth(&self) -> String {
        format!("ar-{}", self.spec.name)
    }

    fn create_netns(&self, i: u8) -> Result<()> {
        // Safety net first: node addresses are only ever reachable through their veth. With a
        // link down (a partition), traffic to them must fail here, never follow the default
        // route off this machine.
        run(Command::new("ip").args(["route", "replace", "unreachable", NODE_NET, "metric", "4294967295"]))?;
        let ns = self.netns_name();
        if !Path::new("/run/netns").join(&ns).exists() {
            run(Command::new("ip").args(["netns", "add", &ns]))?;
        }
        let veth = self.veth();
        if !Path::new("/sys/class/net").join(&veth).exists() {
            run(Command::new("ip")
                .args(["link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns]))?;
            run(Command::new("ip").args(["addr", "add", &format!("10.213.{i}.1/30"), "dev", &veth]))?;
            run(Command::new("ip").args([
                "-n",
                &ns,
                "addr",
                "add",
                &format!("10.213.{i}.2/30"),
                "dev",
                "eth0",
            ]))?;
        }
        run(Command::new("ip").args(["link", "set", &veth, "up"]))?;
        run(Command::new("ip").args(["-n", &ns, "link", "set", "eth0", "up"]))?;
        run(Command::new("ip").args(["-n", &ns, "link", "set", "lo", "up"]))?;
        Ok(())
    }

    /// The agent's API address, as seen from the runner.
    pub fn api_addr(&self) -> String {
        match self.spec.netns {
            Some(i) => format!("10.213.{i}.2:{}", self.spec.port),
            None => format!("127.0.0.1:{}", self.spec.port),
        }
    }

    fn cgroup(&self) -> PathBuf {
        cgroup2_root().join("archy-chaos").join(&self.spec.name)
    }

    /// The node's PID 1 (the child `unshare` forked), if the node is up.
    pub fn init_pid(&self) -> Option<u32> {
        let launcher: u32 =
            std::fs::read_to_string(self.root.join("launcher.pid")).ok()?.trim().parse().ok()?;
        let cmdline = std::fs::read(format!("/proc/{launcher}/cmdline")).ok()?;
        if !String::from_utf8_lossy(&cmdline).contains(&*self.root.to_string_lossy()) {
            return None; // a recycled pid
        }
        pids_of(launcher).into_iter().next()
    }

    /// Starts the node: its manager starts the agent and every enabled unit. Returns the time
    /// from start to the agent's /readyz.
    pub fn boot(&self) -> Result<Duration> {
        let _power = self.power.lock().unwrap_or_else(|e| e.into_inner());
        ensure!(self.init_pid().is_none(), "node `{}` is already up", self.spec.name);
        let start = Instant::now();
        // After this machine rebooted (or a cut of the lazy data root) it is not mounted.
        mount_data(&self.root, self.spec.lazy)?;
        let cg = self.cgroup();
        std::fs::create_dir_all(&cg).with_context(|| format!("creating cgroup {}", cg.display()))?;
        let log = std::fs::File::create(self.root.join("node.log"))?;
        let mut cmd = match self.spec.netns {
            Some(_) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/run/netns/{}", self.netns_name())).arg("--").arg("unshare");
                c
            }
            None => Command::new("unshare"),
        };
        cmd.args(["--pid", "--mount", "--cgroup", "--fork", "--mount-proc", "--propagation", "private"])
            .arg(self.root.join("init.sh"))
            .arg(&self.root)
            .arg(&self.spec.user)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // The node's own cgroup becomes the root of its cgroup namespace.
        join_cgroup(&mut cmd, &cg, true)?;
        let child = crate::exec::spawn(&mut cmd).context("starting the node")?;
        std::fs::write(self.root.join("launcher.pid"), child.id().to_string())?;
        // The launcher is reaped by whoever waits last; detach it from this process.
        std::mem::forget(child);
        if self.spec.bare {
            return self.wait_manager(start, Duration::from_secs(60));
        }
        self.wait_ready(start, Duration::from_secs(60))
    }

    /// Until the node's user manager has started every unit it starts at boot.
    fn wait_manager(&self, start: Instant, timeout: Duration) -> Result<Duration> {
        let mut last = String::new();
        while start.elapsed() < timeout {
            match self.exec(&["systemctl", "--user", "is-system-running"]) {
                Ok(out) => {
                    last = String::from_utf8_lossy(&out.stdout).trim().to_string();
                    if matches!(&*last, "running" | "degraded") {
                        return Ok(start.elapsed());
                    }
                }
                Err(e) => last = format!("{e:#}"),
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!(
            "node `{}`: user manager not up after {timeout:?} ({last}); see {}",
            self.spec.name,
            self.root.join("node.log").display()
        )
    }

    fn wait_ready(&self, start: Instant, timeout: Duration) -> Result<Duration> {
        let url = format!("http://{}/readyz", self.api_addr());
        let http = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_millis(500)))
            .build()
            .new_agent();
        while start.elapsed() < timeout {
            if http.get(&url).call().is_ok_and(|r| r.status() == 200) {
                return Ok(start.elapsed());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        bail!(
            "node `{}`: agent not ready at {url} after {timeout:?}; see {}",
            self.spec.name,
            self.root.join("node.log").display()
        )
    }

    /// Every process of the node dies at once; its tmpfs mounts vanish with its namespaces.
    pub fn power_cut(&self) -> Result<Evidence> {
        let _power = self.power.lock().unwrap_or_else(|e| e.into_inner());
        self.cut()
    }

    fn cut(&self) -> Result<Evidence> {
        let init = self.init_pid().context("node is not up")?;
        let before = self.processes().len();
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(init as i32), nix::sys::signal::SIGKILL)?;
        self.wait_gone(Duration::from_secs(10))?;
        let left = self.processes().len();
        let mut ev = Evidence::of(json!({
            "fault": "power_cut",
            "init_pid": init,
            "processes_killed": before,
            "processes_left": left,
        }))
        .effect(before > 0 && left == 0);
        if self.spec.lazy {
            // Every process is dead: now the unsynced writes go, and the views with them.
            ev = ev
                .with("lost", lazy_control(&self.root, LAZY_DATA, "cut 0")?)
                .with("lost_units", lazy_control(&self.root, LAZY_UNITS, "cut 0")?);
            reap_lazy(&self.root, LAZY_DATA)?;
            reap_lazy(&self.root, LAZY_UNITS)?;
        }
        Ok(ev)
    }

    /// Stops the agent and every app unit through the user manager, as a clean shutdown
    /// does, then the manager and the node.
    pub fn shutdown(&self) -> Result<Evidence> {
        let _power = self.power.lock().unwrap_or_else(|e| e.into_inner());
        let init = self.init_pid().context("node is not up")?;
        // Units first, explicitly: under podman 4.3, a quadlet unit's `podman rm` and conmon's
        // cleanup can deadlock when the manager stops them while it exits itself.
        let mut units = vec!["stop".to_string(), "archy-agent.service".to_string()];
        let quadlet = self.root.join("home/.config/containers/systemd");
        for e in std::fs::read_dir(&quadlet).into_iter().flatten().flatten() {
            if let Some(app) = e.file_name().to_string_lossy().strip_suffix(".container") {
                units.push(format!("{app}.service"));
            }
        }
        let args: Vec<&str> = units.iter().map(String::as_str).collect();
        let stopped = self.systemctl(&args).is_ok();
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(init as i32), nix::sys::signal::SIGTERM)?;
        let clean = self.wait_gone(Duration::from_secs(90)).is_ok();
        if !clean {
            self.cut()?;
        } else if self.spec.lazy {
            // A clean shutdown syncs everything.
            lazy_control(&self.root, LAZY_DATA, "flush")?;
            lazy_control(&self.root, LAZY_UNITS, "flush")?;
        }
        Ok(Evidence::of(json!({"fault": "graceful_shutdown", "units_stopped": stopped, "clean": clean}))
            .effect(clean))
    }

    fn wait_gone(&self, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if self.init_pid().is_none() && self.processes().is_empty() {
                if let Ok(pid) = std::fs::read_to_string(self.root.join("launcher.pid")) {
                    // Reap the launcher if it was ours.
                    let _ = nix::sys::wait::waitpid(
                        nix::unistd::Pid::from_raw(pid.trim().parse().unwrap_or(0)),
                        Some(nix::sys::wait::WaitPidFlag::WNOHANG),
                    );
                }
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!("node `{}` still has processes after {timeout:?}", self.spec.name)
    }

    /// Host pids of every process in the node's cgroup subtree.
    pub fn processes(&self) -> Vec<u32> {
        fn walk(dir: &Path, out: &mut Vec<u32>) {
            if let Ok(text) = std::fs::read_to_string(dir.join("cgroup.procs")) {
                out.extend(text.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
            }
            for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    walk(&e.path(), out);
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.cgroup(), &mut out);
        out
    }

    /// Runs `argv` inside the node, as its service user, in its environment.
    pub fn exec(&self, argv: &[&str]) -> Result<Output> {
        crate::exec::output(&mut self.command(argv)?).context("entering the node")
    }

    /// The command that runs `argv` inside the node (stdin closed unless the caller says).
    pub fn command(&self, argv: &[&str]) -> Result<Command> {
        let init = self.init_pid().context("node is not up")?;
        let mut cmd = Command::new("nsenter");
        cmd.args(["-t", &init.to_string(), "-m", "-p", "-C"]);
        if self.spec.netns.is_some() {
            cmd.arg("-n");
        }
        cmd.args([
            "--",
            "setpriv",
            "--reuid",
            &self.spec.user,
            "--regid",
            &self.spec.user,
            "--init-groups",
            "--",
            "env",
        ])
        .arg(format!("HOME={}", self.root.join("home").display()))
        .arg(format!("XDG_RUNTIME_DIR={}", self.root.join("run").display()))
        .arg("PATH=/usr/local/bin:/usr/bin:/bin")
        .args(argv)
        .stdin(Stdio::null());
        // In the node's cgroup, as a login on the node would be: podman inside reads its
        // cgroup from there (`podman info` failed from outside it), and what the command
        // starts (a container's conmon) dies with the node's power.
        join_cgroup(&mut cmd, &self.cgroup(), false)?;
        Ok(cmd)
    }

    fn systemctl(&self, args: &[&str]) -> Result<String> {
        let mut argv = vec!["systemctl", "--user"];
        argv.extend(args);
        let out = self.exec(&argv)?;
        ensure!(
            out.status.success(),
            "systemctl --user {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Main pid of a user unit, 0 when not running.
    pub fn unit_pid(&self, unit: &str) -> Result<u32> {
        Ok(self.systemctl(&["show", "-p", "MainPID", "--value", unit])?.trim().parse().unwrap_or(0))
    }

    pub fn kill_agent(&self, signal: &str) -> Result<Evidence> {
        let before = self.unit_pid("archy-agent.service")?;
        self.systemctl(&["kill", "-s", signal, "archy-agent.service"])?;
        Ok(Evidence::of(json!({"fault": "kill_agent", "signal": signal, "agent_pid_before": before})))
    }

    /// A restart through the manager: the agent's whole cgroup is killed, as systemd does on
    /// the real platform (`KillMode=control-group`).
    pub fn restart_agent(&self) -> Result<Evidence> {
        let before = self.unit_pid("archy-agent.service")?;
        self.systemctl(&["restart", "archy-agent.service"])?;
        let after = self.unit_pid("archy-agent.service")?;
        Ok(Evidence::of(
            json!({"fault": "restart_agent", "agent_pid_before": before, "agent_pid_after": after}),
        )
        .effect(before != after))
    }

    /// The pid of an app's main process in the node's PID namespace.
    fn container_pid(&self, app: &str) -> Result<i32> {
        let out = self.exec(&["podman", "inspect", "--format", "{{.State.Pid}}", &format!("archy-{app}")])?;
        ensure!(
            out.status.success(),
            "no container for `{app}`: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        let pid: i32 = String::from_utf8_lossy(&out.stdout).trim().parse().context("container pid")?;
        ensure!(pid > 0, "`{app}` is not running");
        Ok(pid)
    }

    /// Kills an app's main process, as the OOM killer would.
    pub fn kill_container(&self, app: &str, signal: &str) -> Result<Evidence> {
        // A pid in the node's PID namespace: the signal is sent from inside the node.
        let pid = self.container_pid(app)?;
        let out = self.exec(&["kill", "-s", signal.trim_start_matches("SIG"), &pid.to_string()])?;
        ensure!(out.status.success(), "kill {pid}: {}", String::from_utf8_lossy(&out.stderr).trim());
        Ok(Evidence::of(json!({"fault": "kill_container", "app": app, "pid": pid, "signal": signal})))
    }

    /// Cuts the node's only link; the agent becomes unreachable from outside the node.
    pub fn partition(&self) -> Result<Evidence> {
        ensure!(
            self.spec.netns.is_some(),
            "node `{}` has no network namespace of its own (node up --netns)",
            self.spec.name
        );
        run(Command::new("ip").args(["link", "set", &self.veth(), "down"]))?;
        Ok(Evidence::of(json!({"fault": "partition", "link": self.veth()})))
    }

    pub fn heal(&self) -> Result<Evidence> {
        ensure!(self.spec.netns.is_some(), "node `{}` has no network namespace of its own", self.spec.name);
        run(Command::new("ip").args(["link", "set", &self.veth(), "up"]))?;
        run(Command::new("ip").args(["-n", &self.netns_name(), "link", "set", "eth0", "up"]))?;
        Ok(Evidence::of(json!({"fault": "heal", "link": self.veth()})))
    }

    /// A path on this machine's disk for one relative to the node's root.
    fn path(&self, rel: &str) -> Result<PathBuf> {
        Ok(self.root.join(checked(rel)?))
    }

    /// Where the data image is mounted: the data root itself, or under its lazy view.
    fn lower(&self) -> PathBuf {
        self.root.join(if self.spec.lazy { LAZY_DATA.lower } else { "data" })
    }

    fn user(&self) -> Result<nix::unistd::User> {
        nix::unistd::User::from_name(&self.spec.user)?
            .with_context(|| format!("no user `{}`: run scripts/setup-host", self.spec.user))
    }

    /// Unmounts the data root (lazily if something still holds it) and frees its loop device.
    fn unmount_data(&self) -> Result<()> {
        for l in [LAZY_DATA, LAZY_UNITS] {
            if self.spec.lazy && mount_at(&self.root.join(l.mount))?.is_some() {
                if lazy_control(&self.root, l, "unmount").is_err() {
                    run(Command::new("umount").arg("-l").arg(self.root.join(l.mount)))?;
                }
                reap_lazy(&self.root, l)?;
            }
        }
        let (img, data) = (self.root.join("data.img"), self.lower());
        if mount_at(&data)?.is_some()
            && !crate::exec::output(Command::new("umount").arg(&data))?.status.success()
        {
            run(Command::new("umount").arg("-l").arg(&data))?;
        }
        if img.exists() {
            let out = run(Command::new("losetup").arg("-j").arg(&img))?;
            for dev in String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| l.split(':').next()) {
                // Best effort: `mount -o loop` devices free themselves with their last user
                // (perhaps in between), and -d only marks one still held by a lazy unmount.
                let _ = crate::exec::output(Command::new("losetup").arg("-d").arg(dev));
            }
        }
        Ok(())
    }

    /// A disk fault on the data root's filesystem, with what the runner and the node then see.
    pub fn disk_fault(&self, fault: DiskFault, on: bool) -> Result<Evidence> {
        let (data, view) = (self.lower(), self.root.join("data"));
        ensure!(
            mount_at(&data)?.is_some(),
            "node `{}`: {} is not mounted (boot the node: it mounts its data root)",
            self.spec.name,
            data.display()
        );
        let ev = match fault {
            DiskFault::ReadOnly => {
                // The filesystem's own flag: it holds in the node's mount namespace too.
                let opts = if on { "remount,ro" } else { "remount,rw" };
                run(Command::new("mount").args(["-o", opts]).arg(&data)).with_context(|| {
                    format!(
                        "node `{}`: {opts} of {} (refused while a process holds a file there open for writing)",
                        self.spec.name,
                        data.display()
                    )
                })?;
                // A node booted during the fault copied the read-only mount into its own
                // mount namespace, where the host's remount does not reach: remount it there too.
                if let (false, Some(pid)) = (on, self.init_pid()) {
                    run(Command::new("nsenter")
                        .arg(format!("--target={pid}"))
                        .args(["--mount", "--", "mount", "-o", opts])
                        .arg(&data))
                    .with_context(|| {
                        format!("node `{}`: {opts} of {} in the node", self.spec.name, data.display())
                    })?;
                }
                let ro = mount_at(&data)?.is_some_and(|(_, fs)| fs.split(',').any(|o| o == "ro"));
                // A write as the service user inside the node, when it is up.
                let probe = view.join(".archy-chaos-probe");
                let writable = match self.init_pid() {
                    Some(_) => {
                        let script = format!("touch {0} && rm -f {0}", probe.display());
                        Some(self.exec(&["sh", "-c", &script])?.status.success())
                    }
                    None => None,
                };
                Evidence::of(json!({"fault": "disk_read_only", "writable_in_node": writable}))
                    .effect(ro == on && writable != Some(on))
            }
            DiskFault::Full => {
                let path = data.join(FILL_FILE);
                if on {
                    fill(&path)?;
                } else if path.exists() {
                    std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
                }
                let full = free_bytes(&data)? < FULL_BELOW;
                Evidence::of(json!({"fault": "disk_full"})).effect(full == on)
            }
        };
        Ok(ev.with("on", on).with("free_bytes", free_bytes(&data)?))
    }

    /// Stops the node and removes every process, mount, namespace, cgroup, veth and file.
    pub fn down(&self) -> Result<()> {
        if self.init_pid().is_some() {
            self.power_cut()?;
        }
        // Cgroups bottom-up: rmdir only works on empty leaves.
        fn rmdirs(dir: &Path) {
            for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    rmdirs(&e.path());
                }
            }
            let _ = std::fs::remove_dir(dir);
        }
        rmdirs(&self.cgroup());
        let _ = std::fs::remove_dir(cgroup2_root().join("archy-chaos")); // the last node's
        if self.spec.netns.is_some() {
            let _ = crate::exec::output(Command::new("ip").args(["link", "del", &self.veth()]));
            let _ = crate::exec::output(Command::new("ip").args(["netns", "del", &self.netns_name()]));
        }
        self.unmount_data()?;
        // Podman's storage holds files owned by the user's subordinate ids: root removes all.
        std::fs::remove_dir_all(&self.root).with_context(|| format!("removing {}", self.root.display()))?;
        Ok(())
    }
}

impl Node for LocalNode {
    fn name(&self) -> &str {
        &self.spec.name
    }
    fn url(&self) -> String {
        format!("local:{}", self.spec.name)
    }
    fn api_addr(&self) -> String {
        LocalNode::api_addr(self)
    }
    fn token(&self) -> Result<String> {
        let t = std::fs::read_to_string(self.root.join("data/agent/api-token"))
            .with_context(|| format!("node {}: the agent's API token", self.spec.name))?;
        Ok(t.trim().to_string())
    }
    fn boot(&self) -> Result<Duration> {
        LocalNode::boot(self)
    }
    fn power_cut(&self) -> Result<Evidence> {
        LocalNode::power_cut(self)
    }
    fn graceful_reboot(&self) -> Result<Evidence> {
        let e = self.shutdown()?;
        Ok(e.with("ready_after_seconds", LocalNode::boot(self)?.as_secs_f64()))
    }
    fn kill_agent(&self, signal: &str) -> Result<Evidence> {
        LocalNode::kill_agent(self, signal)
    }
    fn restart_agent(&self) -> Result<Evidence> {
        LocalNode::restart_agent(self)
    }
    fn kill_container(&self, app: &str, signal: &str) -> Result<Evidence> {
        LocalNode::kill_container(self, app, signal)
    }
    fn oom_kill(&self, app: &str) -> Result<Evidence> {
        LocalNode::oom_kill(self, app)
    }
    fn partition(&self) -> Result<Evidence> {
        LocalNode::partition(self)
    }
    fn heal(&self) -> Result<Evidence> {
        LocalNode::heal(self)
    }
    fn exec(&self, argv: &[&str]) -> Result<Output> {
        LocalNode::exec(self, argv)
    }

    fn root_on_node(&self) -> PathBuf {
        self.root.clone()
    }
    fn durability(&self) -> &'static str {
        if self.spec.lazy {
            "lazy"
        } else {
            "kernel"
        }
    }
    fn service_uid(&self) -> Result<u32> {
        Ok(self.user()?.uid.as_raw())
    }
    fn read(&self, rel: &str) -> Result<Option<Vec<u8>>> {
        let path = self.path(rel)?;
        match std::fs::read(&path) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }
    fn write(&self, rel: &str, bytes: &[u8]) -> Result<()> {
        let path = self.path(rel)?;
        let u = self.user()?;
        if let Some(dir) = path.parent().filter(|d| !d.exists()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            nix::unistd::chown(dir, Some(u.uid), Some(u.gid))?;
        }
        std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
        nix::unistd::chown(&path, Some(u.uid), Some(u.gid))
            .with_context(|| format!("chown {}", path.display()))?;
        // Synced, file and directory entry: what the runner wrote is what a power cut of a
        // lazy data root must keep (`data-intact` checks it).
        let dir = path.parent().context("a file without a directory")?;
        std::fs::File::open(&path)
            .and_then(|f| f.sync_all())
            .and_then(|()| std::fs::File::open(dir)?.sync_all())
            .with_context(|| format!("fsync {}", path.display()))
    }
    fn stat(&self, rel: &str) -> Result<Option<Stat>> {
        let path = self.path(rel)?;
        let m = match std::fs::symlink_metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("stat {}", path.display())),
        };
        let t = m.file_type();
        Ok(Some(Stat {
            kind: if t.is_symlink() {
                FileKind::Symlink
            } else if t.is_dir() {
                FileKind::Dir
            } else if t.is_file() {
                FileKind::File
            } else {
                FileKind::Other
            },
            mode: m.mode() & 0o7777,
            uid: m.uid(),
            gid: m.gid(),
            inode: m.ino(),
            size: m.size(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
        }))
    }
    fn hash(&self, rel: &str) -> Result<Option<String>> {
        use sha2::Digest;
        Ok(self.read(rel)?.map(|b| format!("{:x}", sha2::Sha256::digest(b))))
    }
    fn list(&self, rel: &str) -> Result<Vec<String>> {
        let path = self.path(rel)?;
        let mut names: Vec<String> = match std::fs::read_dir(&path) {
            Ok(d) => d.flatten().filter_map(|e| e.file_name().to_str().map(str::to_string)).collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e).with_context(|| format!("listing {}", path.display())),
        };
        names.sort();
        Ok(names)
    }
    fn remove(&self, rel: &str) -> Result<bool> {
        let path = self.path(rel)?;
        let gone = match std::fs::symlink_metadata(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Ok(m) if m.is_dir() => std::fs::remove_dir_all(&path),
            _ => std::fs::remove_file(&path),
        };
        gone.with_context(|| format!("removing {}", path.display()))?;
        Ok(true)
    }
    fn damage(&self, rel: &str, fault: FileFault) -> Result<()> {
        let path = self.path(rel)?;
        let meta = std::fs::symlink_metadata(&path)
            .with_context(|| format!("{} does not exist on the node", path.display()))?;
        match fault {
            FileFault::Delete => {
                self.remove(rel)?;
            }
            FileFault::Truncate => {
                std::fs::OpenOptions::new().write(true).truncate(true).open(&path).map(drop)?
            }
            FileFault::Corrupt => {
                let mut bytes = vec![0u8; meta.len().max(16) as usize];
                rand::RngCore::fill_bytes(&mut rand::rng(), &mut bytes);
                std::fs::write(&path, bytes)?;
            }
            FileFault::ChownRoot => nix::unistd::chown(&path, Some(0.into()), Some(0.into()))?,
            FileFault::Chmod => std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))?,
            FileFault::Symlink | FileFault::Directory | FileFault::Fifo => {
                self.remove(rel)?;
                match fault {
                    FileFault::Symlink => std::os::unix::fs::symlink("/etc/hostname", &path)?,
                    FileFault::Directory => std::fs::create_dir(&path)?,
                    _ => nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600))?,
                }
                // Planted by the service user, as a confused or hostile app would.
                let u = self.user()?;
                std::os::unix::fs::lchown(&path, Some(u.uid.as_raw()), Some(u.gid.as_raw()))?;
            }
        }
        Ok(())
    }
    fn log(&self, lines: usize) -> Result<String> {
        let log = std::fs::read_to_string(self.root.join("node.log")).unwrap_or_default();
        let all: Vec<&str> = log.lines().collect();
        Ok(all[all.len().saturating_sub(lines)..].join("\n"))
    }
    fn catalog(&self) -> Result<Catalog> {
        Catalog::load(&self.root.join("catalog")).map_err(|e| anyhow::anyhow!("node {}: {e}", self.spec.name))
    }
    fn disk_fault(&self, fault: DiskFault, on: bool) -> Result<Evidence> {
        LocalNode::disk_fault(self, fault, on)
    }
}

/// The agent's user unit, on a local node as on a provisioned host.
pub(crate) fn agent_unit(bin: &Path, config: &Path, extra: &str) -> String {
    format!(
        "[Unit]\nDescription=archy agent\n# Never give up restarting: systemd's default (5 starts in 10 s) left a crash-looping\n# agent down for good (found by agent-kill9-survive x20).\nStartLimitIntervalSec=0\n\n[Service]\nExecStart={bin} run --config {config}\nRestart=always\nRestartSec=1\nEnvironment=ARCHY_LOG=info\n{extra}\n[Install]\nWantedBy=default.target\n",
        bin = bin.display(),
        config = config.display(),
    )
}

/// The agent's podman: the real one, unless the runner's fault flag under `root` says it fails.
pub(crate) fn podman_wrapper(root: &Path, podman: &str) -> String {
    format!(
        "#!/bin/sh\nif [ -e {flag} ]; then echo 'Error: podman failing (archy-chaos fault)' >&2; exit 125; fi\nexec {podman} \"$@\"\n",
        flag = root.join(PODMAN_FAIL_FLAG).display()
    )
}
