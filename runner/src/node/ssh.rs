//! A real node over the OpenSSH client: the same primitives as a local node, each a command
//! run on the node (configurable, since platforms differ in how they reboot or where the agent
//! keeps its token), in batch mode so nothing ever waits for a password.
//!
//! One multiplexed connection per node (`ControlMaster`), so a command costs no new TCP or SSH
//! handshake; it also carries the agent's API (a local port forwarded to the agent's loopback
//! address on the host). Every ssh invocation is built, counted and timed by [`Ssh::call`].

use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use archy_agent::manifest::Catalog;
use serde::Deserialize;
use serde_json::json;

use super::{checked, DiskFault, Evidence, FileFault, FileKind, Node, Stat};

/// The command run on the node for each primitive. `{signal}`, `{app}`, `{path}` and
/// `{lines}` are substituted.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SshCommands {
    pub power_cut: String,
    pub reboot: String,
    pub kill_agent: String,
    pub restart_agent: String,
    pub agent_pid: String,
    pub kill_container: String,
    /// Makes the kernel OOM-kill `{app}`'s main process (a memory limit the host enforces and
    /// something growing past it) and prints, as the last line, the kernel's OOM-kill count
    /// of that memory cgroup before and after: two numbers. None: the `oom` step's SIGKILL
    /// stand-in (`kill_container`), said so in its evidence.
    pub oom_kill: Option<String>,
    pub partition: Option<String>,
    pub heal: Option<String>,
    /// Prints the agent's API token [default: the file `data/agent/api-token` under the root].
    pub token: Option<String>,
    /// Makes `{path}` (absolute, quoted) owned by root, for the chown-root file fault.
    pub chown_root: String,
    /// Prints the last `{lines}` lines of the agent's and its units' log.
    pub log: String,
}

impl Default for SshCommands {
    fn default() -> SshCommands {
        SshCommands {
            // sysrq "b": an immediate reset without syncing or unmounting, a real power cut.
            power_cut: "sudo sh -c 'echo b > /proc/sysrq-trigger'".into(),
            reboot: "sudo systemctl reboot".into(),
            kill_agent: "systemctl --user kill -s {signal} archy-agent.service".into(),
            restart_agent: "systemctl --user restart archy-agent.service".into(),
            agent_pid: "systemctl --user show -p MainPID --value archy-agent.service".into(),
            kill_container: "kill -s {signal} $(podman inspect -f '{{.State.Pid}}' archy-{app})".into(),
            oom_kill: None,
            partition: None,
            heal: None,
            token: None,
            chown_root: "sudo -n chown 0:0 {path}".into(),
            log: "journalctl --user -u archy-agent.service -n {lines} --no-pager".into(),
        }
    }
}

/// The node's root on a host unless `--root` says otherwise.
pub const DEFAULT_ROOT: &str = "~/.local/share/archy";

/// How to reach hosts over SSH: the options of `node remote|provision|deprovision` and of
/// `run` and `fleet` for their ssh:// nodes.
#[derive(Debug, Clone, clap::Args)]
pub struct SshOptions {
    /// SSH: private key for the connection.
    #[arg(long)]
    pub identity: Option<PathBuf>,
    /// SSH: known-hosts file [default: the user's]
    #[arg(long)]
    pub known_hosts: Option<PathBuf>,
    /// SSH: the node's root on the host (data/, catalog/ and bin/ live there).
    #[arg(long, default_value = DEFAULT_ROOT)]
    pub root: String,
    /// SSH: the agent's listen address on the host (keep it on loopback: the API is forwarded).
    #[arg(long, default_value = archy_agent::config::DEFAULT_LISTEN)]
    pub listen: String,
    /// SSH: YAML file overriding the command run on the host for each primitive (README).
    #[arg(long, alias = "commands")]
    pub ssh_commands: Option<PathBuf>,
}

impl SshOptions {
    /// The node at `url` (ssh://user@host[:port]) with these options; nothing is run yet.
    pub fn node(&self, url: &str) -> Result<SshNode> {
        let mut n = SshNode::parse(url)?;
        n.identity = self.identity.clone();
        n.known_hosts = self.known_hosts.clone();
        n.root = self.root.clone();
        n.listen = self.listen.clone();
        if let Some(path) = &self.ssh_commands {
            n.commands = crate::yaml::load(path)?;
        }
        Ok(n)
    }
}

pub struct SshNode {
    /// `user@host`
    pub destination: String,
    pub port: u16,
    pub identity: Option<PathBuf>,
    /// Known-hosts file; the user's own by default. A new host's key is accepted on first
    /// use, a changed one refused.
    pub known_hosts: Option<PathBuf>,
    /// The agent's API address as the runner reaches it; `None`: a local port forwarded over
    /// the connection to `listen`, so the API never leaves the host's loopback.
    pub api: Option<String>,
    /// The agent's listen address on the host.
    pub listen: String,
    /// The node's root on the host (`~/` is the login user's home): `data/`, `catalog/`, `bin/`.
    pub root: String,
    pub commands: SshCommands,
    /// How long a reboot may take to go down and come back.
    pub reboot_timeout: Duration,
    /// Local end of the API forward, chosen once so that it survives reconnections.
    forward_port: OnceLock<u16>,
    link: OnceLock<Link>,
    connecting: Mutex<()>,
}

/// What connecting learnt of the host, and the connection.
struct Link {
    ssh: Arc<Ssh>,
    keeper: Option<std::thread::JoinHandle<()>>,
    uid: u32,
    home: PathBuf,
    root: PathBuf,
    podman: String,
}

/// Ordinary commands; a reboot or a transfer gets its own bound.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);
/// Exit status by which the file commands below say "nothing there".
const ABSENT: i32 = 3;

/// Single-quotes `s` for a POSIX shell.
pub fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

impl SshNode {
    /// `ssh://user@host[:port]`.
    pub fn parse(url: &str) -> Result<SshNode> {
        let rest =
            url.strip_prefix("ssh://").with_context(|| format!("`{url}` is not ssh://user@host[:port]"))?;
        let (dest, port) = match rest.rsplit_once(':') {
            Some((d, p)) if !rest.ends_with(']') => {
                let port = p.parse::<u16>().ok().filter(|p| *p > 0);
                (d, port.with_context(|| format!("bad port in `{url}`: expected a number from 1 to 65535"))?)
            }
            _ => (rest, 22),
        };
        let (user, host) = dest.split_once('@').unwrap_or(("", dest));
        ensure!(!user.is_empty(), "`{url}` needs a user: ssh://user@host");
        let host = host.trim_start_matches('[').trim_end_matches(']');
        ensure!(!host.is_empty() && !host.contains(['@', '/', ' ']), "`{url}`: bad host `{host}`");
        Ok(SshNode {
            destination: format!("{user}@{host}"),
            port,
            identity: None,
            known_hosts: None,
            api: None,
            listen: archy_agent::config::DEFAULT_LISTEN.into(),
            root: DEFAULT_ROOT.into(),
            commands: SshCommands::default(),
            reboot_timeout: Duration::from_secs(600),
            forward_port: OnceLock::new(),
            link: OnceLock::new(),
            connecting: Mutex::new(()),
        })
    }

    /// `user@host:port`, as errors name the host.
    pub fn host(&self) -> String {
        format!("{}:{}", self.destination, self.port)
    }

    /// The connection, made on first use: the master, the API forward, and what the host is.
    fn link(&self) -> Result<&Link> {
        if let Some(l) = self.link.get() {
            return Ok(l);
        }
        let _one = self.connecting.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(l) = self.link.get() {
            return Ok(l);
        }
        let forward = match &self.api {
            Some(_) => None,
            None => {
                let listen: std::net::SocketAddr = self.listen.parse().with_context(|| {
                    format!("--listen {}: expected the agent's IP:PORT on {}", self.listen, self.host())
                })?;
                let to = match listen {
                    std::net::SocketAddr::V4(a) => a.to_string(),
                    std::net::SocketAddr::V6(a) => format!("[{}]:{}", a.ip(), a.port()),
                };
                Some(format!("127.0.0.1:{}:{to}", self.forward_port()))
            }
        };
        let ssh = Ssh::new(self, forward)?;
        // One round trip: the host has podman, who we are, and where the root is.
        let root = match self.root.strip_prefix('~') {
            Some(r) if r.is_empty() || r.starts_with('/') => format!("\"$HOME\"{}", quote(r)),
            _ => quote(&self.root),
        };
        let probe =
            format!("command -v podman || exit 97; id -u; printf '%s\\n' \"$HOME\"; realpath -m -- {root}");
        // Bounded: a host that takes the connection but never answers fails fast too.
        let out = ssh.call(&probe, None, Duration::from_secs(15))?;
        if out.status.code() == Some(97) {
            bail!(
                "{}: no podman on the host (`command -v podman` found nothing in the login's PATH): \
                 install podman (4.4 or later) there; the agent runs every app with rootless podman",
                self.host()
            );
        }
        let text = ssh.ok(&probe, out)?;
        let lines: Vec<&str> = text.lines().collect();
        let [podman, uid, home, root] = lines[..] else {
            bail!("{}: unexpected answer to the connection probe: {text:?}", self.host())
        };
        let uid = uid.parse().with_context(|| format!("{}: `id -u` said {uid:?}", self.host()))?;
        ensure!(
            root.starts_with('/') && root != "/" && Path::new(root) != Path::new(home),
            "{}: --root {} resolves to `{root}`: give a directory of its own",
            self.host(),
            self.root
        );
        // Reconnects (and re-forwards) by itself when the master dies, e.g. the host rebooted.
        let weak = Arc::downgrade(&ssh);
        let keeper = Some(std::thread::spawn(move || keep(weak)));
        let link =
            Link { ssh, keeper, uid, home: home.into(), root: root.into(), podman: podman.trim().into() };
        Ok(self.link.get_or_init(|| link))
    }

    fn forward_port(&self) -> u16 {
        *self.forward_port.get_or_init(|| {
            std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map_or(0, |a| a.port())
        })
    }

    /// Runs `remote` (a shell command line) on the node as the login user; `stdin` is fed to it.
    pub fn run_with(&self, remote: &str, stdin: Option<&[u8]>, timeout: Duration) -> Result<Output> {
        self.link()?.ssh.call(remote, stdin, timeout)
    }

    /// Runs `remote` on the node.
    pub fn run(&self, remote: &str) -> Result<Output> {
        self.run_with(remote, None, COMMAND_TIMEOUT)
    }

    /// Runs `remote`; its stdout, or an error naming the host, the command and its stderr.
    pub fn run_ok(&self, remote: &str) -> Result<String> {
        let link = self.link()?;
        let out = link.ssh.call(remote, None, COMMAND_TIMEOUT)?;
        link.ssh.ok(remote, out)
    }

    /// ssh invocations so far and their total time (connection set-up included).
    pub fn calls(&self) -> (u64, Duration) {
        self.link.get().map_or((0, Duration::ZERO), |l| {
            (l.ssh.calls.load(Ordering::Relaxed), Duration::from_nanos(l.ssh.nanos.load(Ordering::Relaxed)))
        })
    }

    /// What driving this host costs: one remote command through the master and over a fresh
    /// connection (medians), and agent status polls per second over `api_addr` for `window`.
    pub fn ping(&self, window: Duration) -> Result<serde_json::Value> {
        fn median(mut v: Vec<Duration>) -> f64 {
            v.sort();
            v[v.len() / 2].as_secs_f64() * 1000.0
        }
        let ssh = &self.link()?.ssh;
        let timed = |fresh: bool| -> Result<Duration> {
            let start = Instant::now();
            let out = ssh.call_with("true", None, COMMAND_TIMEOUT, fresh)?;
            ssh.ok("true", out)?;
            Ok(start.elapsed())
        };
        let master = (0..20).map(|_| timed(false)).collect::<Result<Vec<_>>>()?;
        let fresh = (0..5).map(|_| timed(true)).collect::<Result<Vec<_>>>()?;
        let client = super::agent(self);
        client.status().with_context(|| format!("{}: the agent does not answer", self.host()))?;
        let (start, mut polls) = (Instant::now(), 0u32);
        while start.elapsed() < window {
            client.status()?;
            polls += 1;
        }
        Ok(json!({
            "host": self.host(),
            "api": self.api_addr(),
            "forwarded": self.api.is_none(),
            "command_ms_master": median(master),
            "command_ms_fresh_connection": median(fresh),
            "status_polls_per_second": f64::from(polls) / start.elapsed().as_secs_f64(),
        }))
    }

    /// The login user's home on the host.
    pub fn home(&self) -> Result<PathBuf> {
        Ok(self.link()?.home.clone())
    }

    /// The root on the host, absolute.
    pub fn root(&self) -> Result<PathBuf> {
        Ok(self.link()?.root.clone())
    }

    /// Where `podman` is on the host.
    pub fn podman(&self) -> Result<String> {
        Ok(self.link()?.podman.clone())
    }

    /// Creates or replaces `path` (absolute on the host) with `bytes`, through a temp file in
    /// the same directory and a rename: a reader sees the old file or the new one. `mode`:
    /// the new file's; by default an existing file's, else 0644.
    pub fn put(&self, path: &Path, bytes: &[u8], mode: Option<u32>) -> Result<()> {
        let chmod = match mode {
            Some(m) => format!("chmod {m:o} \"$t\""),
            None => "{ [ -e \"$p\" ] && chmod --reference=\"$p\" \"$t\" || chmod 644 \"$t\"; }".into(),
        };
        let script = format!(
            "p={p}; d=$(dirname -- \"$p\"); mkdir -p -- \"$d\" && t=$(mktemp \"$d/.archy-new.XXXXXX\") && \
             trap 'rm -f -- \"$t\"' EXIT && cat > \"$t\" && {chmod} && mv -f -- \"$t\" \"$p\"",
            p = quote(&path.to_string_lossy())
        );
        let out = self.run_with(&script, Some(bytes), COMMAND_TIMEOUT)?;
        ensure!(
            out.status.success(),
            "{}: writing {}: {}",
            self.host(),
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(())
    }

    /// Runs `script` on the file `rel` under the root, with `$p` its absolute path, after
    /// refusing a path that leaves the root (here and, through symlinks, on the host).
    /// `Ok(None)`: the script said the file is absent.
    fn file(&self, what: &str, rel: &str, script: &str, stdin: Option<&[u8]>) -> Result<Option<Vec<u8>>> {
        let rel = checked(rel)?;
        let root = self.root()?;
        let p = root.join(rel);
        let guard = format!(
            "r={r}; p={p}; inside() {{ case \"$(realpath -m -- \"$1\")/\" in \"$r\"/*) ;; *) \
             echo \"$p leaves the node's root $r\" >&2; exit 4;; esac; }}; inside \"$(dirname -- \"$p\")\"; ",
            r = quote(&root.to_string_lossy()),
            p = quote(&p.to_string_lossy()),
        );
        let out = self.run_with(&format!("{guard}{script}"), stdin, COMMAND_TIMEOUT)?;
        match out.status.code() {
            Some(0) => Ok(Some(out.stdout)),
            Some(ABSENT) => Ok(None),
            _ => bail!(
                "{}: {what} {}: {}",
                self.host(),
                p.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        }
    }

    /// The agent's instance id, if it answers.
    fn instance(&self) -> Option<String> {
        super::agent(self).status().ok().map(|s| s.instance)
    }

    /// Fires a command that may take the host, and so the connection, down: ssh's own 255
    /// (connection lost) is expected; any other failure is the command's. Whether it was lost.
    fn fire(&self, remote: &str) -> Result<bool> {
        let out = self.run_with(remote, None, self.reboot_timeout)?;
        ensure!(
            out.status.success() || out.status.code() == Some(255),
            "{}: `{remote}` failed ({}): {}",
            self.host(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(out.status.code() == Some(255))
    }

    /// Fires a command that restarts the node, and waits until an agent answers again as a
    /// new process. The changed instance is the evidence that the fault took effect.
    fn restart_with(&self, fault: &str, remote: &str) -> Result<Evidence> {
        let before = self.instance().context("the agent does not answer before the fault")?;
        let start = Instant::now();
        let lost = self.fire(remote)?;
        loop {
            ensure!(
                start.elapsed() < self.reboot_timeout,
                "{}: no new agent within {:?}",
                self.host(),
                self.reboot_timeout
            );
            if let Some(now) = self.instance().filter(|i| *i != before) {
                return Ok(Evidence::of(json!({
                    "fault": fault,
                    "host": self.host(),
                    "agent_instance_before": before,
                    "agent_instance_after": now,
                    "connection_lost": lost,
                    "back_after_seconds": start.elapsed().as_secs_f64(),
                })));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn wait_ready(&self, start: Instant) -> Result<Duration> {
        let http =
            ureq::Agent::config_builder().timeout_global(Some(Duration::from_secs(2))).build().new_agent();
        let url = format!("http://{}/readyz", self.api_addr());
        while start.elapsed() < self.reboot_timeout {
            if http.get(&url).call().is_ok_and(|r| r.status() == 200) {
                return Ok(start.elapsed());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        bail!("{}: agent not ready at {url} within {:?}", self.host(), self.reboot_timeout)
    }

    fn agent_pid(&self) -> Result<u32> {
        Ok(self.run_ok(&self.commands.agent_pid)?.trim().parse().unwrap_or(0))
    }
}

/// Keeps a master up while the node lives: a dead one (the host rebooted, the network blinked)
/// is replaced by the next call, but the API forward must come back even when only HTTP runs.
fn keep(ssh: Weak<Ssh>) {
    loop {
        std::thread::park_timeout(Duration::from_millis(500));
        let Some(ssh) = ssh.upgrade() else { return };
        if ssh.stop.load(Ordering::Relaxed) {
            return;
        }
        if !ssh.alive() {
            let _ = ssh.call("true", None, Duration::from_secs(30));
        }
    }
}

/// The OpenSSH client with this node's options: the one place an ssh command is built.
struct Ssh {
    host: String,
    args: Vec<String>,
    destination: String,
    control: PathBuf,
    /// One would-be master at a time: two would race for the socket and the forward's port.
    connecting: Mutex<()>,
    stop: AtomicBool,
    calls: AtomicU64,
    nanos: AtomicU64,
}

/// This process's private directory of control sockets (0700: a socket is a login).
fn control_dir() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("archy-chaos-ssh-{}", std::process::id()));
    match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e).with_context(|| format!("creating {}", dir.display())),
    }
    let m = std::fs::symlink_metadata(&dir)?;
    ensure!(
        m.is_dir() && m.uid() == nix::unistd::geteuid().as_raw() && m.mode() & 0o077 == 0,
        "{} is not a private directory of this user: remove it",
        dir.display()
    );
    Ok(dir)
}

impl Ssh {
    fn new(node: &SshNode, forward: Option<String>) -> Result<Arc<Ssh>> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let control = control_dir()?.join(NEXT.fetch_add(1, Ordering::Relaxed).to_string());
        let mut args: Vec<String> = [
            "BatchMode=yes",
            "StrictHostKeyChecking=accept-new",
            "LogLevel=ERROR",
            "ConnectTimeout=10",
            // A dead host is noticed within ~6 s, and the master then exits.
            "ServerAliveInterval=2",
            "ServerAliveCountMax=2",
            "ControlMaster=auto",
            // Outlives a runner killed without clean-up by ten idle minutes, no more.
            "ControlPersist=10m",
        ]
        .iter()
        .flat_map(|o| ["-o".to_string(), o.to_string()])
        .collect();
        args.extend(["-o".into(), format!("ControlPath={}", control.display())]);
        args.extend(["-p".into(), node.port.to_string()]);
        if let Some(k) = &node.known_hosts {
            args.extend(["-o".into(), format!("UserKnownHostsFile={}", k.display())]);
        }
        if let Some(id) = &node.identity {
            args.extend(["-i".into(), id.display().to_string(), "-o".into(), "IdentitiesOnly=yes".into()]);
        }
        if let Some(f) = forward {
            // On every invocation: the one that becomes the master sets it up; a client asking
            // the master for a forward it already has is a no-op.
            args.extend(["-L".into(), f]);
        }
        Ok(Arc::new(Ssh {
            host: node.host(),
            args,
            destination: node.destination.clone(),
            control,
            connecting: Mutex::new(()),
            stop: AtomicBool::new(false),
            calls: AtomicU64::new(0),
            nanos: AtomicU64::new(0),
        }))
    }

    /// Whether a master listens on the control socket (no process, no network).
    fn alive(&self) -> bool {
        std::os::unix::net::UnixStream::connect(&self.control).is_ok()
    }

    /// Every remote command: `remote` run by the login shell, `stdin` fed to it, killed after
    /// `timeout`. ssh's own failures (status 255 before the command ran) are described.
    fn call(&self, remote: &str, stdin: Option<&[u8]>, timeout: Duration) -> Result<Output> {
        self.call_with(remote, stdin, timeout, false)
    }

    /// `call`, or with `fresh` over a connection of its own (to measure what the master saves).
    fn call_with(
        &self,
        remote: &str,
        stdin: Option<&[u8]>,
        timeout: Duration,
        fresh: bool,
    ) -> Result<Output> {
        let start = Instant::now();
        let _master = if fresh || self.alive() { None } else { Some(self.connecting.lock()) };
        let mut cmd = Command::new("ssh");
        if fresh {
            cmd.args(["-o", "ControlPath=none", "-o", "ControlMaster=no", "-o", "ClearAllForwardings=yes"]);
        }
        cmd.args(&self.args).arg(&self.destination).arg("--").arg(remote);
        let out = crate::exec::bounded(&mut cmd, stdin, timeout)?;
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.nanos.fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
        let Some(out) = out else {
            bail!("{}: `{remote}` did not finish within {timeout:?}; killed", self.host)
        };
        if out.status.code() == Some(255) {
            let err = String::from_utf8_lossy(&out.stderr);
            if let Some(hint) = connection_problem(&err) {
                bail!("{}: cannot connect over SSH: {}; {hint}", self.host, err.trim());
            }
        }
        Ok(out)
    }

    /// `out`'s stdout if the command succeeded, else an error naming the host and command.
    fn ok(&self, remote: &str, out: Output) -> Result<String> {
        ensure!(
            out.status.success(),
            "{}: `{remote}` failed ({}): {}",
            self.host,
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// What to do about ssh's own error, if it is one (else the remote command said 255).
fn connection_problem(stderr: &str) -> Option<&'static str> {
    let has = |s: &str| stderr.contains(s);
    Some(if has("Permission denied (") || has("Too many authentication failures") {
        "the key was refused: check --identity and that its public key is in the user's ~/.ssh/authorized_keys on the host"
    } else if has("Connection refused") {
        "nothing listens there: check the port and that sshd runs on the host"
    } else if has("timed out") || has("No route to host") || has("Network is unreachable") {
        "the host is unreachable: check its address and that it is up"
    } else if has("Could not resolve hostname") {
        "the host name does not resolve: check it"
    } else if has("Host key verification failed") || has("IDENTIFICATION HAS CHANGED") {
        "the host's key is not the known one: if it was reinstalled, `ssh-keygen -R HOST` (or --known-hosts)"
    } else {
        return None;
    })
}

impl Drop for Link {
    fn drop(&mut self) {
        // The keeper first: a reconnection it has under way would leave a master behind.
        self.ssh.stop.store(true, Ordering::Relaxed);
        if let Some(k) = self.keeper.take() {
            k.thread().unpark();
            let _ = k.join();
        }
    }
}

impl Drop for Ssh {
    fn drop(&mut self) {
        // Stops the master (and the forward); no network involved.
        let _ = crate::exec::output(
            Command::new("ssh")
                .args(&self.args)
                .args(["-O", "exit"])
                .arg(&self.destination)
                .stdin(Stdio::null()),
        );
        let _ = std::fs::remove_file(&self.control);
        // The last node of this process takes the directory with it.
        if let Some(dir) = self.control.parent() {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// The two numbers of the `oom_kill` command's last line: the OOM-kill count before and after.
fn oom_counts(out: &str) -> Option<(u64, u64)> {
    let mut f = out.lines().rev().find(|l| !l.trim().is_empty())?.split_whitespace();
    let counts = (f.next()?.parse().ok()?, f.next()?.parse().ok()?);
    f.next().is_none().then_some(counts)
}

fn stdout(bytes: Vec<u8>) -> String {
    String::from_utf8_lossy(&bytes).into_owned()
}

impl Node for SshNode {
    fn name(&self) -> &str {
        &self.destination
    }

    fn url(&self) -> String {
        format!("ssh://{}:{}", self.destination, self.port)
    }

    fn api_addr(&self) -> String {
        match &self.api {
            Some(api) => api.clone(),
            None => format!("127.0.0.1:{}", self.forward_port()),
        }
    }

    fn token(&self) -> Result<String> {
        let token = match &self.commands.token {
            Some(cmd) => self.run_ok(cmd)?,
            None => stdout(
                self.read("data/agent/api-token")?
                    .with_context(|| format!("{}: the agent has no API token yet", self.host()))?,
            ),
        };
        Ok(token.trim().to_string())
    }

    fn boot(&self) -> Result<Duration> {
        // A real host boots by itself after a power cut; booting means waiting for it.
        self.wait_ready(Instant::now())
    }

    fn power_cut(&self) -> Result<Evidence> {
        self.restart_with("power_cut", &self.commands.power_cut)
    }

    /// A host powers on by itself right after its power-cut command (sysrq `b` resets, it does
    /// not shut down), and the runner cannot see the instant it does: the time runs from the
    /// runner firing that command, an upper bound (firmware and reconnection included).
    fn power_cycle(&self) -> Result<(Evidence, Duration)> {
        let start = Instant::now();
        let e = self.power_cut()?;
        let ready = self.wait_ready(start)?;
        Ok((e.with("boot_timed_from", "the power-cut command, fired by the runner"), ready))
    }

    fn graceful_reboot(&self) -> Result<Evidence> {
        self.restart_with("graceful_reboot", &self.commands.reboot)
    }

    fn kill_agent(&self, signal: &str) -> Result<Evidence> {
        let before = self.agent_pid()?;
        self.run_ok(&self.commands.kill_agent.replace("{signal}", signal))?;
        Ok(Evidence::of(json!({"fault": "kill_agent", "signal": signal, "agent_pid_before": before})))
    }

    fn restart_agent(&self) -> Result<Evidence> {
        let before = self.agent_pid()?;
        self.run_ok(&self.commands.restart_agent)?;
        let after = self.agent_pid()?;
        Ok(Evidence::of(
            json!({"fault": "restart_agent", "agent_pid_before": before, "agent_pid_after": after}),
        )
        .effect(before != after))
    }

    fn kill_container(&self, app: &str, signal: &str) -> Result<Evidence> {
        self.run_ok(&self.commands.kill_container.replace("{signal}", signal).replace("{app}", app))?;
        Ok(Evidence::of(json!({"fault": "kill_container", "app": app, "signal": signal})))
    }

    fn oom_kill(&self, app: &str) -> Result<Evidence> {
        let Some(cmd) = &self.commands.oom_kill else {
            return self
                .oom_stand_in(app, "no oom_kill command is configured for this host (--ssh-commands)");
        };
        let out = self.run_ok(&cmd.replace("{app}", app))?;
        let (before, after) = oom_counts(&out).with_context(|| {
            format!(
                "{}: the oom_kill command's last line is not two OOM-kill counts (before after): {out:?}",
                self.host()
            )
        })?;
        Ok(Evidence::of(json!({
            "fault": "oom_kill",
            "kind": super::OOM_KERNEL,
            "app": app,
            "oom_kill_before": before,
            "oom_kill_after": after,
        }))
        .effect(after > before))
    }

    fn partition(&self) -> Result<Evidence> {
        let cmd =
            self.commands.partition.as_deref().context("no partition command configured for this node")?;
        self.fire(cmd)?;
        Ok(Evidence::of(json!({"fault": "partition", "host": self.host()})))
    }

    /// The heal command, once the host answers again: a partition cuts the link SSH uses, so
    /// the host may only come back when its own partition command heals it.
    fn heal(&self) -> Result<Evidence> {
        let cmd = self.commands.heal.as_deref().context("no heal command configured for this node")?;
        let start = Instant::now();
        loop {
            match self.run_ok(cmd) {
                Ok(_) => break,
                Err(e)
                    if start.elapsed() < self.reboot_timeout
                        && format!("{e:#}").contains("cannot connect") =>
                {
                    crate::interrupt::check()?;
                    std::thread::sleep(Duration::from_millis(500));
                }
                Err(e) => return Err(e),
            }
        }
        Ok(Evidence::of(
            json!({"fault": "heal", "host": self.host(), "answered_after_seconds": start.elapsed().as_secs_f64()}),
        ))
    }

    fn exec(&self, argv: &[&str]) -> Result<Output> {
        let line: Vec<String> = argv.iter().map(|a| quote(a)).collect();
        self.run(&line.join(" "))
    }

    fn durability(&self) -> &'static str {
        "host"
    }
    fn root_on_node(&self) -> PathBuf {
        self.root().unwrap_or_else(|_| PathBuf::from(&self.root))
    }

    fn service_uid(&self) -> Result<u32> {
        Ok(self.link()?.uid)
    }

    fn read(&self, rel: &str) -> Result<Option<Vec<u8>>> {
        self.file("reading", rel, "inside \"$p\"; [ -e \"$p\" ] || exit 3; cat -- \"$p\"", None)
    }

    fn write(&self, rel: &str, bytes: &[u8]) -> Result<()> {
        checked(rel)?;
        // The guard first, then the same temp-and-rename as every other upload.
        self.file("writing", rel, "true", None)?;
        self.put(&self.root()?.join(rel), bytes, None)
    }

    fn stat(&self, rel: &str) -> Result<Option<Stat>> {
        let script = "[ -e \"$p\" ] || [ -L \"$p\" ] || exit 3; stat -c '%f %u %g %i %s %.9Y' -- \"$p\"";
        let Some(out) = self.file("stat", rel, script, None)? else { return Ok(None) };
        let text = stdout(out);
        let f: Vec<&str> = text.split_whitespace().collect();
        let bad = || anyhow::anyhow!("{}: unexpected stat output for {rel}: {text:?}", self.host());
        let [raw, uid, gid, inode, size, mtime] = f[..] else { return Err(bad()) };
        let raw = u32::from_str_radix(raw, 16).map_err(|_| bad())?;
        let (secs, nanos) = mtime.split_once('.').ok_or_else(bad)?;
        let num = |s: &str| s.parse::<i128>().map_err(|_| bad());
        Ok(Some(Stat {
            kind: match raw & 0o170000 {
                0o100000 => FileKind::File,
                0o040000 => FileKind::Dir,
                0o120000 => FileKind::Symlink,
                _ => FileKind::Other,
            },
            mode: raw & 0o7777,
            uid: num(uid)? as u32,
            gid: num(gid)? as u32,
            inode: num(inode)? as u64,
            size: num(size)? as u64,
            mtime_ns: num(secs)? * 1_000_000_000 + num(nanos)?,
        }))
    }

    fn hash(&self, rel: &str) -> Result<Option<String>> {
        let script = "inside \"$p\"; [ -e \"$p\" ] || exit 3; sha256sum -- \"$p\"";
        Ok(self.file("hashing", rel, script, None)?.map(|o| stdout(o).chars().take(64).collect()))
    }

    fn list(&self, rel: &str) -> Result<Vec<String>> {
        let script = "inside \"$p\"; [ -e \"$p\" ] || exit 3; cd -- \"$p\" && ls -A1";
        let mut names: Vec<String> = self
            .file("listing", rel, script, None)?
            .map(|o| stdout(o).lines().map(str::to_string).collect())
            .unwrap_or_default();
        names.sort();
        Ok(names)
    }

    fn remove(&self, rel: &str) -> Result<bool> {
        let script = "[ -e \"$p\" ] || [ -L \"$p\" ] || exit 3; rm -rf -- \"$p\"";
        Ok(self.file("removing", rel, script, None)?.is_some())
    }

    fn damage(&self, rel: &str, fault: FileFault) -> Result<()> {
        let chown;
        let action = match fault {
            FileFault::Delete => return self.remove(rel).map(drop),
            FileFault::Truncate => "truncate -s 0 -- \"$p\"",
            FileFault::Corrupt => {
                "n=$(stat -c %s -- \"$p\") && { [ \"$n\" -ge 16 ] || n=16; } && head -c \"$n\" /dev/urandom > \"$p\""
            }
            FileFault::ChownRoot => {
                chown = self.commands.chown_root.replace("{path}", "\"$p\"");
                &chown
            }
            FileFault::Chmod => "chmod 0644 -- \"$p\"",
            FileFault::Symlink => "rm -rf -- \"$p\" && ln -s /etc/hostname \"$p\"",
            FileFault::Directory => "rm -rf -- \"$p\" && mkdir -- \"$p\"",
            FileFault::Fifo => "rm -rf -- \"$p\" && mkfifo -m 600 -- \"$p\"",
        };
        let script = format!("inside \"$p\"; [ -e \"$p\" ] || exit 3; {action}");
        self.file("damaging", rel, &script, None)?.with_context(|| {
            format!("{}: {rel} does not exist under {}", self.host(), self.root_on_node().display())
        })?;
        Ok(())
    }

    fn log(&self, lines: usize) -> Result<String> {
        self.run_ok(&self.commands.log.replace("{lines}", &lines.to_string()))
    }

    fn catalog(&self) -> Result<Catalog> {
        let root = self.root()?;
        let tar = self.run_with(
            &format!("cd {} && tar -cf - catalog", quote(&root.to_string_lossy())),
            None,
            COMMAND_TIMEOUT,
        )?;
        ensure!(
            tar.status.success(),
            "{}: reading the catalog under {}: {}",
            self.host(),
            root.display(),
            String::from_utf8_lossy(&tar.stderr).trim()
        );
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "archy-catalog-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir)?;
        let loaded = (|| {
            let untar = crate::exec::bounded(
                Command::new("tar").arg("-xf").arg("-").arg("-C").arg(&dir),
                Some(&tar.stdout),
                COMMAND_TIMEOUT,
            )?;
            ensure!(untar.is_some_and(|o| o.status.success()), "unpacking the catalog of {}", self.host());
            let mut c =
                Catalog::load(&dir.join("catalog")).map_err(|e| anyhow::anyhow!("{}: {e}", self.host()))?;
            c.dir = root.join("catalog"); // where it is, for messages
            Ok(c)
        })();
        let _ = std::fs::remove_dir_all(&dir);
        loaded
    }

    fn disk_fault(&self, _fault: DiskFault, _on: bool) -> Result<Evidence> {
        bail!(
            "disk faults need a local node: {} is a host over SSH, whose disks the runner does not own (run the scenario on a local node: `--node local`)",
            self.host()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::oom_counts;

    #[test]
    fn oom_kill_command_output() {
        assert_eq!(oom_counts("limit set\n0 1\n"), Some((0, 1)));
        assert_eq!(oom_counts("2 2\n\n"), Some((2, 2)));
        for bad in ["", "1", "1 2 3", "a b", "-1 2", "1\n"] {
            assert_eq!(oom_counts(bad), None, "{bad:?}");
        }
    }
}
