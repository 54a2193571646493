//! Test harness shared by the agent's integration tests: paths, snapshots, and a command
//! runner that prints everything when an expectation fails.

#![allow(dead_code)] // each test binary uses its own subset

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

pub fn agent_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_archy-agent"))
}

/// Runs `cmd`, returning its output; describes the command for failure messages.
pub fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// Everything a failed expectation should show.
pub fn describe(cmd: &Command, out: &Output) -> String {
    format!(
        "command: {cmd:?}\nstatus: {}\n--- stdout\n{}--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs `cmd` and asserts it exits with `code`, printing everything if not.
pub fn expect_code(cmd: &mut Command, code: i32) -> Output {
    let out = run(cmd);
    assert_eq!(out.status.code(), Some(code), "{}", describe(cmd, &out));
    out
}

/// Compares `actual` with the snapshot file at `path`. With `ARCHY_BLESS=1` the snapshot is
/// (re)written instead, for reviewing in the diff.
pub fn assert_snapshot(path: &Path, actual: &str) {
    if std::env::var_os("ARCHY_BLESS").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(path).unwrap_or_else(|e| {
        panic!("snapshot {} unreadable ({e}); run with ARCHY_BLESS=1 to create it", path.display())
    });
    if expected != actual {
        panic!(
            "snapshot {} differs (ARCHY_BLESS=1 rewrites it)\n--- expected\n{expected}--- actual\n{actual}",
            path.display()
        );
    }
}

/// The real Quadlet generator, installed by scripts/setup-host. Missing is a failure, never
/// a skip: these tests are the proof that rendered units are valid.
pub fn quadlet_bin() -> PathBuf {
    let path = std::env::var_os("ARCHY_QUADLET")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/libexec/podman/quadlet"));
    assert!(
        path.is_file(),
        "Quadlet generator not found at {}: run scripts/setup-host (or set ARCHY_QUADLET)",
        path.display()
    );
    path
}

/// Runs `quadlet -dryrun -user` over the units in `dir`. Returns the generated services,
/// or every line the generator said about a problem: it can exit 0 after a conversion
/// error, so what it prints is read, not only its status.
pub fn quadlet_dryrun(dir: &Path) -> Result<String, String> {
    let mut cmd = Command::new(quadlet_bin());
    cmd.args(["-dryrun", "-user"]).env("QUADLET_UNIT_DIRS", dir);
    let out = run(&mut cmd);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let complaints: Vec<&str> =
        stderr.lines().filter(|l| !l.contains("Loading source unit file") && !l.trim().is_empty()).collect();
    if out.status.success() && complaints.is_empty() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(describe(&cmd, &out))
    }
}

/// The service user the tests run rootless work as, created by scripts/setup-host.
pub fn service_user() -> (String, u32, u32) {
    let name = std::env::var("ARCHY_SERVICE_USER").unwrap_or_else(|_| "archy".into());
    let user = nix::unistd::User::from_name(&name).ok().flatten().unwrap_or_else(|| {
        panic!("service user `{name}` does not exist: run scripts/setup-host as root first")
    });
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test switches to the service user and plants root-owned files: run the tests as root"
    );
    (name, user.uid.as_raw(), user.gid.as_raw())
}

/// `cmd` run as the service user with a private HOME and runtime dir, no privilege kept.
pub fn as_user(user: &str, home: &Path, program: &Path) -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid", user, "--regid", user, "--init-groups", "--"])
        .arg(program)
        .env("HOME", home)
        .env("XDG_RUNTIME_DIR", home.join("run"));
    cmd
}

/// Rootless podman as the service user, with its own HOME, storage and runtime dir so it
/// never shares state with another test or node, and the fixture image imported.
pub struct UserPodman {
    pub user: String,
    pub home: tempfile::TempDir,
}

impl UserPodman {
    pub fn new() -> UserPodman {
        let (user, uid, gid) = service_user();
        let home = tempfile::Builder::new().prefix("archy-podman-").tempdir().unwrap();
        let conf = home.path().join(".config/containers");
        std::fs::create_dir_all(&conf).unwrap();
        std::fs::create_dir_all(home.path().join("run")).unwrap();
        // What this machine needs (see testbed-findings): runc, bounded ulimits, vfs.
        std::fs::write(
            conf.join("containers.conf"),
            "[engine]\nruntime = \"runc\"\n[containers]\ndefault_ulimits = [\"nofile=1024:1024\", \"nproc=1024:1024\"]\n",
        )
        .unwrap();
        std::fs::write(conf.join("storage.conf"), "[storage]\ndriver = \"vfs\"\n").unwrap();
        let status =
            Command::new("chown").arg("-R").arg(format!("{uid}:{gid}")).arg(home.path()).status().unwrap();
        assert!(status.success());
        std::fs::set_permissions(
            home.path().join("run"),
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .unwrap();
        let p = UserPodman { user, home };
        let rootfs = "/var/lib/archy-chaos/fixture-rootfs.tar";
        assert!(Path::new(rootfs).is_file(), "{rootfs} missing: run scripts/setup-host");
        expect_code(p.podman().args(["import", "-q", rootfs, "localhost/archy-fixture:1"]), 0);
        p
    }

    pub fn podman(&self) -> Command {
        let podman = which("podman").expect("podman is not installed: run scripts/setup-host");
        as_user(&self.user, self.home.path(), &podman)
    }
}

impl Drop for UserPodman {
    fn drop(&mut self) {
        let _ = self.podman().args(["rm", "-af", "-t", "0"]).output();
        kill_pause_process(self.home.path());
    }
}

/// Rootless podman leaves a pause process holding the user namespace of `home`'s runtime dir.
pub fn kill_pause_process(home: &Path) {
    if let Ok(pid) = std::fs::read_to_string(home.join("run/libpod/tmp/pause.pid")) {
        if let Ok(pid) = pid.trim().parse() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL);
        }
    }
}

pub fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join(program)).find(|p| p.is_file())
}

/// Splits one systemd command line (as Quadlet writes `ExecStart=`) into arguments, undoing
/// its quoting and `$$`/`%%` escapes. Words are separated by systemd's whitespace (space,
/// tab, CR, LF) only: a no-break space is part of a word to systemd, and Quadlet writes it
/// unquoted.
pub fn systemd_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let (mut in_word, mut quoted) = (false, false);
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                quoted = !quoted;
                in_word = true;
            }
            '\\' if quoted => cur.extend(chars.next()),
            ' ' | '\t' | '\n' | '\r' if !quoted => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            c => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        words.push(cur);
    }
    words.into_iter().map(|w| w.replace("$$", "$").replace("%%", "%")).collect()
}

/// A free loopback port (bound then released; the race with another binder is accepted).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A real `archy-agent run` as the service user, on real rootless podman with its own
/// storage, data root and port. Killed (never gracefully) and cleaned up on drop.
pub struct TestAgent {
    // Fixture apps publish fixed host ports: agents of one test binary take turns.
    _serial: std::sync::MutexGuard<'static, ()>,
    pub podman: UserPodman,
    pub port: u16,
    pub extra: Vec<String>,
    /// Environment of the agent process, e.g. `ARCHY_AGENT_BREAK`.
    pub env: Vec<(String, String)>,
    /// The catalog the agent runs with: the repository's unless a test needs its own.
    pub catalog: PathBuf,
    child: Option<std::process::Child>,
    log: PathBuf,
}

impl TestAgent {
    pub fn start(extra: &[&str]) -> TestAgent {
        let mut a = TestAgent::new(extra);
        a.spawn();
        a
    }

    /// Prepared but not started: call [`TestAgent::spawn`].
    pub fn new(extra: &[&str]) -> TestAgent {
        static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let podman = UserPodman::new();
        let log = podman.home.path().join("agent.log");
        TestAgent {
            _serial: serial,
            podman,
            port: free_port(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            env: Vec::new(),
            catalog: repo_root().join("apps"),
            child: None,
            log,
        }
    }

    pub fn data(&self) -> PathBuf {
        self.podman.home.path().join("data")
    }

    /// `archy-agent run` as this agent runs, listening on `port`, output not redirected.
    pub fn command(&self, port: u16) -> Command {
        let mut cmd = as_user(&self.podman.user, self.podman.home.path(), &agent_bin());
        cmd.arg("run")
            .arg("--catalog")
            .arg(&self.catalog)
            .arg("--data-root")
            .arg(self.data())
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .args(["--tick-interval", "2s"])
            .args(&self.extra)
            .env("ARCHY_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        if !self.extra.iter().any(|a| a.starts_with("--backend")) {
            cmd.args(["--backend", "podman"]);
        }
        cmd
    }

    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "agent already running");
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        let mut cmd = self.command(self.port);
        cmd.stdout(log.try_clone().unwrap()).stderr(log);
        self.child = Some(cmd.spawn().unwrap());
        self.wait_for("the agent to be ready", std::time::Duration::from_secs(30), |a| {
            a.get("/readyz").map(|(code, _)| code == 200).unwrap_or(false)
        });
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("agent running").id()
    }

    /// SIGKILL: a crash, nothing flushed.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The exit status once the agent exits by itself, or `None` if it still runs after
    /// `timeout`.
    pub fn wait_exit(&mut self, timeout: std::time::Duration) -> Option<std::process::ExitStatus> {
        let start = std::time::Instant::now();
        while start.elapsed() < timeout {
            if let Some(status) = self.child.as_mut().expect("agent running").try_wait().unwrap() {
                self.child = None;
                return Some(status);
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        None
    }

    /// SIGTERM, and the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("agent running");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), nix::sys::signal::SIGTERM).unwrap();
        c.wait().unwrap()
    }

    pub fn token(&self) -> String {
        std::fs::read_to_string(self.data().join("agent/api-token")).unwrap()
    }

    pub fn get(&self, path: &str) -> Result<(u16, String), String> {
        let url = format!("http://127.0.0.1:{}{path}", self.port);
        let agent = ureq::Agent::config_builder().http_status_as_error(false).build().new_agent();
        let mut r = agent.get(&url).call().map_err(|e| e.to_string())?;
        let code = r.status().as_u16();
        Ok((code, r.body_mut().read_to_string().unwrap_or_default()))
    }

    /// A raw JSON-RPC POST with the given bearer token; returns status and body.
    pub fn post(&self, token: Option<&str>, body: &str) -> (u16, serde_json::Value) {
        let url = format!("http://127.0.0.1:{}/rpc", self.port);
        let agent = ureq::Agent::config_builder().http_status_as_error(false).build().new_agent();
        let mut req = agent.post(&url).header("Content-Type", "application/json");
        if let Some(t) = token {
            req = req.header("Authorization", &format!("Bearer {t}"));
        }
        let mut r = req.send(body).unwrap_or_else(|e| panic!("POST /rpc: {e}\n{}", self.log_text()));
        let code = r.status().as_u16();
        let text = r.body_mut().read_to_string().unwrap_or_default();
        (code, serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)))
    }

    /// Calls a method; panics with the agent's log on an RPC error.
    pub fn rpc(&self, method: &str, params: serde_json::Value) -> serde_json::Value {
        let body = serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params});
        let (code, v) = self.post(Some(&self.token()), &body.to_string());
        assert_eq!(code, 200, "{method}: {v}\n{}", self.log_text());
        match v.get("result") {
            Some(r) => r.clone(),
            None => panic!("{method} failed: {v}\n{}", self.log_text()),
        }
    }

    pub fn reconcile(&self) -> serde_json::Value {
        self.rpc("node.reconcile", serde_json::Value::Null)
    }

    pub fn app(&self, id: &str) -> Option<serde_json::Value> {
        self.rpc("package.list", serde_json::Value::Null)
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["id"] == id)
            .cloned()
    }

    pub fn log_text(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(60).collect();
        format!("--- agent log (last 60 lines)\n{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"))
    }

    pub fn wait_for(&self, what: &str, timeout: std::time::Duration, mut ok: impl FnMut(&TestAgent) -> bool) {
        let start = std::time::Instant::now();
        while start.elapsed() < timeout {
            if ok(self) {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        panic!("timed out after {timeout:?} waiting for {what}\n{}", self.log_text());
    }

    /// Waits until every listed app is up and the node reports converged.
    pub fn wait_up(&self, apps: &[&str]) {
        self.wait_for(&format!("{apps:?} up"), std::time::Duration::from_secs(60), |a| {
            apps.iter().all(|id| a.app(id).is_some_and(|s| s["up"] == true))
        });
    }

    /// `podman inspect` field of a container, as the service user.
    pub fn inspect(&self, container: &str, format: &str) -> Option<String> {
        let out = self.podman.podman().args(["inspect", "--format", format, container]).output().unwrap();
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    pub fn metric(&self, name: &str) -> f64 {
        let (_, text) = self.get("/metrics").unwrap();
        text.lines()
            .filter(|l| {
                l.starts_with(name)
                    && (l.as_bytes().get(name.len()) == Some(&b' ') || l[name.len()..].starts_with('{'))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("{}", self.log_text());
        }
    }
}
