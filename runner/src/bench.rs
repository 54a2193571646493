//! `archy-chaos bench agent`: the agent's speed and size, each figure next to the raw podman
//! operation it wraps, measured interleaved in the same run so that machine noise hits both.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use archy_agent::manifest::Catalog;
use archy_agent::quadlet::{self, Target};
use serde_json::{json, Value};

use crate::agent_client::AgentClient;

#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Apps installed for the no-op tick and start-up figures (copies of fixture fx-web).
    #[arg(long, default_value_t = 10)]
    pub apps: usize,
    /// Samples per figure; medians are reported.
    #[arg(long, default_value_t = 10)]
    pub samples: usize,
    /// Service user the agent and podman run as (when started as root).
    #[arg(long, default_value = "archy")]
    pub user: String,
    /// Fixture image root filesystem made by scripts/setup-host.
    #[arg(long, default_value = "/var/lib/archy-chaos/fixture-rootfs.tar")]
    pub rootfs: PathBuf,
    /// The fixture catalog to copy fx-web from.
    #[arg(long, default_value = "apps")]
    pub catalog: PathBuf,
    /// Print the figures as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// A throw-away node: its own HOME, podman storage and runtime dir, owned by the user.
struct Home {
    dir: PathBuf,
    user: Option<(String, u32, u32)>,
}

impl Home {
    fn new(user: &str) -> Result<Home> {
        let me = nix::unistd::geteuid();
        let user = if me.is_root() {
            let u = nix::unistd::User::from_name(user)?
                .with_context(|| format!("no user `{user}`: run scripts/setup-host"))?;
            Some((u.name, u.uid.as_raw(), u.gid.as_raw()))
        } else {
            None
        };
        let dir = std::env::temp_dir().join(format!("archy-bench-{}", std::process::id()));
        std::fs::create_dir_all(dir.join(".config/containers"))?;
        std::fs::create_dir_all(dir.join("run"))?;
        std::fs::write(
            dir.join(".config/containers/containers.conf"),
            "[engine]\nruntime = \"runc\"\n[containers]\ndefault_ulimits = [\"nofile=1024:1024\", \"nproc=1024:1024\"]\n",
        )?;
        std::fs::write(dir.join(".config/containers/storage.conf"), "[storage]\ndriver = \"vfs\"\n")?;
        let home = Home { dir, user };
        if let Some((_, uid, gid)) = &home.user {
            crate::exec::run(Command::new("chown").arg("-R").arg(format!("{uid}:{gid}")).arg(&home.dir))?;
        }
        std::fs::set_permissions(home.dir.join("run"), std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
        Ok(home)
    }

    /// `program` as the node's user, in the node's environment.
    fn cmd(&self, program: &Path) -> Command {
        let mut cmd = match &self.user {
            Some((name, ..)) => {
                let mut c = Command::new("setpriv");
                c.args(["--reuid", name, "--regid", name, "--init-groups", "--"]).arg(program);
                c
            }
            None => Command::new(program),
        };
        cmd.env("HOME", &self.dir).env("XDG_RUNTIME_DIR", self.dir.join("run")).stdin(Stdio::null());
        cmd
    }

    fn podman(&self, args: &[&str]) -> Result<Duration> {
        let start = Instant::now();
        crate::exec::run(self.cmd(Path::new("podman")).args(args))?;
        Ok(start.elapsed())
    }
}

impl Drop for Home {
    fn drop(&mut self) {
        let _ = crate::exec::output(self.cmd(Path::new("podman")).args(["rm", "-af", "-t", "0"]));
        if let Ok(pid) = std::fs::read_to_string(self.dir.join("run/libpod/tmp/pause.pid")) {
            if let Ok(pid) = pid.trim().parse() {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL);
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

struct Agent<'a> {
    home: &'a Home,
    bin: PathBuf,
    catalog: PathBuf,
    port: u16,
    child: Option<Child>,
    http: ureq::Agent,
}

impl Agent<'_> {
    fn spawn(&mut self) -> Result<Duration> {
        let start = Instant::now();
        let log = std::fs::File::create(self.home.dir.join("agent.log"))?;
        let child = crate::exec::spawn(
            self.home
                .cmd(&self.bin)
                .arg("run")
                .args(["--backend", "podman", "--tick-interval", "30s"])
                .arg("--catalog")
                .arg(&self.catalog)
                .arg("--data-root")
                .arg(self.home.dir.join("data"))
                .arg("--listen")
                .arg(format!("127.0.0.1:{}", self.port))
                .stdout(Stdio::null())
                .stderr(log),
        )?;
        self.child = Some(child);
        let url = format!("http://127.0.0.1:{}/readyz", self.port);
        while start.elapsed() < Duration::from_secs(30) {
            if self.http.get(&url).call().is_ok_and(|r| r.status() == 200) {
                return Ok(start.elapsed());
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        bail!("the agent was not ready within 30 s; see {}", self.home.dir.join("agent.log").display())
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ =
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), nix::sys::signal::SIGTERM);
            let _ = c.wait();
        }
    }

    /// A client of this agent (a new one per call: the agent's address is fixed, its token
    /// file is read at the first request).
    fn client(&self) -> AgentClient<'_> {
        let token = self.home.dir.join("data/agent/api-token");
        AgentClient::at(
            format!("127.0.0.1:{}", self.port),
            Box::new(move || Ok(std::fs::read_to_string(&token)?.trim().to_string())),
        )
    }

    fn up(&self, app: &str) -> Result<bool> {
        Ok(self.client().app(app)?.is_some_and(|a| a.up))
    }

    fn gone(&self, app: &str) -> Result<bool> {
        Ok(self.client().app(app)?.is_none())
    }

    fn wait(&self, what: &str, mut ok: impl FnMut() -> Result<bool>) -> Result<()> {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(60) {
            if ok()? {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        bail!("timed out waiting for {what}; see {}", self.home.dir.join("agent.log").display())
    }

    fn podman_calls(&self) -> Result<Vec<(String, f64)>> {
        let calls = self.client().exec_calls()?;
        Ok(calls.into_iter().filter(|c| c.tool == "podman").map(|c| (c.verb, c.count)).collect())
    }

    fn rss_bytes(&self) -> Result<u64> {
        let pid = self.child.as_ref().context("agent not running")?.id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .context("no VmRSS")?;
        Ok(kb * 1024)
    }
}

impl Drop for Agent<'_> {
    fn drop(&mut self) {
        self.stop();
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

pub fn agent(args: &BenchArgs) -> Result<()> {
    ensure!(args.apps >= 1 && args.samples >= 1, "--apps and --samples must be at least 1");
    let home = Home::new(&args.user)?;
    let catalog = home.dir.join("catalog");
    let fx_web =
        std::fs::read_to_string(args.catalog.join("fx-web/manifest.yml")).context("reading fx-web")?;
    for (id, text) in crate::scenario::measure::fixture_copies(&fx_web, args.apps) {
        std::fs::create_dir_all(catalog.join(&id))?;
        std::fs::write(catalog.join(&id).join("manifest.yml"), text)?;
    }
    let rootfs = args.rootfs.to_string_lossy();
    home.podman(&["import", "-q", &rootfs, "localhost/archy-fixture:1"])?;
    let bin = std::env::current_exe()?.with_file_name("archy-agent");
    ensure!(bin.is_file(), "{} not found: build the workspace first", bin.display());
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let http = ureq::Agent::config_builder().http_status_as_error(false).build().new_agent();
    let mut agent = Agent { home: &home, bin, catalog: catalog.clone(), port, child: None, http };
    agent.spawn()?;
    let ids: Vec<String> = (1..=args.apps).map(|i| format!("bench-{i:02}")).collect();
    eprintln!("bench: installing {} apps", ids.len());
    for id in &ids {
        agent.client().op("install", id)?;
    }
    agent.wait("every app up", || Ok(ids.iter().all(|id| agent.up(id).unwrap_or(false))))?;
    agent.wait("convergence", || Ok(agent.client().reconcile()?.converged))?;

    // 1. No-op tick vs the bare `podman ps` it is built on, interleaved.
    eprintln!("bench: no-op ticks");
    let (mut tick, mut ps, mut calls) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..args.samples {
        ps.push(
            home.podman(&["ps", "-a", "--format", "json", "--filter", "label=io.archy.app"])?.as_secs_f64(),
        );
        let r = agent.client().reconcile()?;
        ensure!(r.actions.is_empty(), "a tick of the converged node did something: {r:?}");
        tick.push(r.duration_seconds);
        calls.push(r.podman_calls as f64);
    }

    // 2. Install (request -> healthy) vs raw `podman run -d` + health probes until one passes.
    eprintln!("bench: installs");
    let c = Catalog::load(&catalog).map_err(|e| anyhow::anyhow!("{e}"))?;
    let app = &ids[0];
    let target = Target::new("4.3.1".parse().expect("version"), home.dir.join("data"));
    let unit = quadlet::render(c.get(app).expect("bench app"), &target);
    let raw_args: Vec<String> = unit
        .podman_args
        .iter()
        .filter(|a| !a.starts_with("--label=io.archy"))
        .map(|a| if a.starts_with("--name=") { "--name=raw-bench".to_string() } else { a.clone() })
        .collect();
    agent.client().uninstall(app, false)?;
    agent.wait("bench app removed", || agent.gone(app))?;
    let (mut install, mut raw, mut mutating, mut probes) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..args.samples {
        let start = Instant::now();
        let mut run = vec!["run", "-d"];
        run.extend(raw_args.iter().map(String::as_str));
        home.podman(&run)?;
        while home.podman(&["healthcheck", "run", "raw-bench"]).is_err() {
            ensure!(start.elapsed() < Duration::from_secs(60), "raw container never became healthy");
        }
        raw.push(start.elapsed().as_secs_f64());
        home.podman(&["rm", "-f", "-t", "0", "raw-bench"])?;

        let before = agent.podman_calls()?;
        let start = Instant::now();
        agent.client().op("install", app)?;
        agent.wait("install", || agent.up(app))?;
        install.push(start.elapsed().as_secs_f64());
        let after = agent.podman_calls()?;
        let delta = |f: &dyn Fn(&str) -> bool| -> f64 {
            after.iter().filter(|(v, _)| f(v)).map(|(_, n)| n).sum::<f64>()
                - before.iter().filter(|(v, _)| f(v)).map(|(_, n)| n).sum::<f64>()
        };
        mutating.push(delta(&|v| v != "ps" && v != "healthcheck run"));
        probes.push(delta(&|v| v == "healthcheck run"));
        agent.client().uninstall(app, false)?;
        agent.wait("uninstall", || agent.gone(app))?;
    }
    agent.client().op("install", app)?;
    agent.wait("every app up", || Ok(ids.iter().all(|id| agent.up(id).unwrap_or(false))))?;

    // 3. Start-up to /readyz with every app installed and running, then idle RSS.
    eprintln!("bench: start-ups");
    let mut startup = Vec::new();
    for _ in 0..args.samples.min(5) {
        agent.stop();
        startup.push(agent.spawn()?.as_secs_f64());
    }
    agent.wait("convergence", || Ok(agent.client().reconcile()?.converged))?;
    std::thread::sleep(Duration::from_secs(2));
    let rss = agent.rss_bytes()? as f64;

    let figures = json!({
        "apps": args.apps,
        "samples": args.samples,
        "noop_tick_seconds": median(tick.clone()),
        "podman_ps_seconds": median(ps.clone()),
        "noop_tick_ratio": median(tick) / median(ps),
        "noop_tick_podman_calls": median(calls),
        "install_seconds": median(install.clone()),
        "raw_run_and_probe_seconds": median(raw.clone()),
        "install_ratio": median(install) / median(raw),
        "install_mutating_podman_calls": median(mutating),
        "install_health_probes": median(probes),
        "startup_seconds": median(startup),
        "idle_rss_bytes": rss,
    });
    if args.json {
        println!("{}", serde_json::to_string_pretty(&figures)?);
    } else {
        println!("{}", agent_table(args.apps, &figures));
    }
    Ok(())
}

/// The agent's figures beside their same-run baselines and targets, for a terminal.
fn agent_table(apps: usize, figures: &Value) -> String {
    let f = |k: &str| figures[k].as_f64().unwrap_or(f64::NAN);
    let mut t = tabled::builder::Builder::default();
    t.push_record(["figure", "agent", "baseline (same run)", "ratio", "target"]);
    t.push_record([
        format!("no-op tick, {apps} apps"),
        format!("{:.1} ms, {} podman call(s)", f("noop_tick_seconds") * 1e3, f("noop_tick_podman_calls")),
        format!("podman ps {:.1} ms", f("podman_ps_seconds") * 1e3),
        format!("{:.2}x", f("noop_tick_ratio")),
        "1 call, <= 1.5x".into(),
    ]);
    t.push_record([
        "install, request -> healthy".to_string(),
        format!("{:.0} ms", f("install_seconds") * 1e3),
        format!("podman run -d + probes {:.0} ms", f("raw_run_and_probe_seconds") * 1e3),
        format!("{:.2}x", f("install_ratio")),
        "<= 1.5x".into(),
    ]);
    t.push_record([
        "podman calls per install".to_string(),
        format!(
            "{} mutating + {} health probe(s)",
            f("install_mutating_podman_calls"),
            f("install_health_probes")
        ),
        "-".into(),
        "-".into(),
        "<= 2".into(),
    ]);
    t.push_record([
        format!("start-up to /readyz, {apps} apps"),
        format!("{:.0} ms", f("startup_seconds") * 1e3),
        "-".into(),
        "-".into(),
        "<= 100 ms".into(),
    ]);
    t.push_record([
        "idle RSS".to_string(),
        format!("{:.1} MiB", f("idle_rss_bytes") / 1048576.0),
        "-".into(),
        "-".into(),
        "<= 20 MiB".into(),
    ]);
    t.build().with(tabled::settings::Style::sharp()).to_string()
}

#[derive(Debug, Clone, clap::Args)]
pub struct NodeBenchArgs {
    /// Power cuts measured (per node); medians are reported.
    #[arg(long, default_value_t = 5)]
    pub samples: usize,
    #[arg(long, default_value = "archy")]
    pub user: String,
    #[arg(long, default_value = "apps")]
    pub catalog: PathBuf,
    #[arg(long)]
    pub json: bool,
}

/// The fixture apps a node runs for the recovery figure (fx-crashloop never gets healthy).
const NODE_APPS: [&str; 5] = ["fx-web", "fx-client", "fx-gateway", "fx-hostnet", "fx-ui"];

/// `archy-chaos bench node`: boot to agent ready, power cut to every app healthy again, and
/// the memory of everything one node runs.
pub fn node(args: &NodeBenchArgs) -> Result<()> {
    use crate::node::local::UpOptions;
    use crate::node::{Backend, LocalNode};
    let name = format!("bench{}", std::process::id() % 100000);
    let opts = UpOptions {
        name: name.clone(),
        user: args.user.clone(),
        backend: Backend::Quadlet,
        netns: true,
        fm3: false,
        breakages: Vec::new(),
        lazy: false,
    };
    let bin = std::env::current_exe()?.with_file_name("archy-agent");
    let node = LocalNode::up(&opts, &bin, &args.catalog)?;
    let client = crate::node::agent(&node);
    let result = (|| -> Result<Value> {
        for app in NODE_APPS {
            client.op("install", app)?;
        }
        let all_up = |_: &LocalNode| -> Result<bool> {
            let list = client.list()?;
            Ok(NODE_APPS.iter().all(|id| list.iter().any(|a| a.id == *id && a.up)))
        };
        let start = Instant::now();
        while !all_up(&node).unwrap_or(false) {
            ensure!(start.elapsed() < Duration::from_secs(120), "the fixture apps never came up");
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_secs(2));
        let rss: u64 = node
            .processes()
            .iter()
            .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
            .filter_map(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))?
                    .split_whitespace()
                    .next()?
                    .parse::<u64>()
                    .ok()
            })
            .sum::<u64>()
            * 1024;
        let processes = node.processes().len();
        let (mut ready, mut recovered) = (Vec::new(), Vec::new());
        for i in 0..args.samples {
            eprintln!("bench: power cut {}/{}", i + 1, args.samples);
            node.power_cut()?;
            let start = Instant::now();
            ready.push(LocalNode::boot(&node)?.as_secs_f64());
            while !all_up(&node).unwrap_or(false) {
                ensure!(start.elapsed() < Duration::from_secs(120), "apps not back after a power cut");
                std::thread::sleep(Duration::from_millis(10));
            }
            recovered.push(start.elapsed().as_secs_f64());
        }
        Ok(json!({
            "apps": NODE_APPS.len(),
            "samples": args.samples,
            "boot_to_ready_seconds": median(ready),
            "power_cut_to_all_healthy_seconds": median(recovered),
            "node_rss_bytes": rss,
            "node_processes": processes,
        }))
    })();
    node.down()?;
    let figures = result?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&figures)?);
        return Ok(());
    }
    let f = |k: &str| figures[k].as_f64().unwrap_or(f64::NAN);
    let mut t = tabled::builder::Builder::default();
    t.push_record(["figure", "measured", "target"]);
    t.push_record([
        "boot to agent ready".to_string(),
        format!("{:.0} ms", f("boot_to_ready_seconds") * 1e3),
        "<= 1 s".into(),
    ]);
    t.push_record([
        format!("power cut + boot, {} apps healthy", NODE_APPS.len()),
        format!("{:.2} s", f("power_cut_to_all_healthy_seconds")),
        "<= 2 s".into(),
    ]);
    t.push_record([
        "one node's RSS (all its processes)".to_string(),
        format!("{:.1} MiB in {} processes", f("node_rss_bytes") / 1048576.0, f("node_processes")),
        "reported".into(),
    ]);
    println!("{}", t.build().with(tabled::settings::Style::sharp()));
    Ok(())
}

#[derive(Debug, Clone, clap::Args)]
pub struct DurabilityBenchArgs {
    /// Each sample is a round: both nodes measured, one after the other.
    #[command(flatten)]
    pub node: NodeBenchArgs,
    /// The scenario directory reboot-survive is read from.
    #[arg(long, default_value = "scenarios")]
    pub scenarios: PathBuf,
}

/// `archy-chaos bench durability`: what the lazy data root costs the agent, each figure as a
/// ratio to the kernel path. Two nodes of this machine, one of each, are measured in turn in
/// every round (each first every other round), so machine noise hits both: a no-op tick
/// (five per round), fx-web's install from nothing (request to healthy), and a whole
/// reboot-survive iteration as the engine runs it (install, data, power cut, boot,
/// converged, every invariant).
pub fn durability(bench: &DurabilityBenchArgs) -> Result<()> {
    use crate::node::local::{LocalNode, UpOptions};
    use crate::node::Node;
    use crate::scenario::{engine, Scenario, Verdict};
    let args = &bench.node;
    let file = bench.scenarios.join("reboot-survive.yml");
    let s = Scenario::load(&file)?;
    let bin = std::env::current_exe()?.with_file_name("archy-agent");
    let mut nodes = Vec::new();
    let result = (|| -> Result<Value> {
        for (mode, lazy) in [("k", false), ("l", true)] {
            let opts = UpOptions {
                name: format!("bd{mode}{}", std::process::id() % 100000),
                user: args.user.clone(),
                backend: crate::node::Backend::Quadlet,
                netns: true,
                fm3: false,
                breakages: Vec::new(),
                lazy,
            };
            nodes.push(LocalNode::up(&opts, &bin, &args.catalog)?);
        }
        let apps = s.apps(&nodes[0].catalog()?, &file)?;
        let timeout = Duration::from_secs(120);
        let (mut tick, mut install, mut scenario) = ([vec![], vec![]], [vec![], vec![]], [vec![], vec![]]);
        for round in 0..args.samples {
            eprintln!("bench: round {}/{}", round + 1, args.samples);
            // Each goes first every other round: what runs second finds the machine warmer.
            for k in [round % 2, 1 - round % 2] {
                let (node, agent) = (&nodes[k], crate::node::agent(&nodes[k]));
                agent.uninstall("fx-web", true)?;
                let start = Instant::now();
                while agent.app("fx-web")?.is_some() {
                    ensure!(start.elapsed() < timeout, "{}: fx-web not purged", node.spec.name);
                    std::thread::sleep(Duration::from_millis(20));
                }
                let start = Instant::now();
                agent.op("install", "fx-web")?;
                while !agent.app("fx-web")?.is_some_and(|a| a.up) {
                    ensure!(start.elapsed() < timeout, "{}: fx-web not up", node.spec.name);
                    std::thread::sleep(Duration::from_millis(10));
                }
                install[k].push(start.elapsed().as_secs_f64());
                let it = engine::iterate(&s, node, &agent, &apps, round as u32 + 1, round as u64);
                ensure!(
                    it.verdict == Verdict::Pass,
                    "{}: reboot-survive did not pass: {:?} {:?}",
                    node.spec.name,
                    it.failures,
                    it.unknowns
                );
                scenario[k].push(it.seconds);
                for _ in 0..5 {
                    let start = Instant::now();
                    let r = agent.reconcile()?;
                    ensure!(r.actions.is_empty(), "{}: the tick was no no-op: {r:?}", node.spec.name);
                    tick[k].push(start.elapsed().as_secs_f64());
                }
            }
        }
        let figure = |[kernel, lazy]: [Vec<f64>; 2]| {
            let (kernel, lazy) = (median(kernel), median(lazy));
            json!({"kernel": kernel, "lazy": lazy, "ratio": lazy / kernel})
        };
        Ok(json!({
            "samples": args.samples,
            "apps": apps,
            "no_op_tick_seconds": figure(tick),
            "install_seconds": figure(install),
            "reboot_survive_seconds": figure(scenario),
        }))
    })();
    for n in &nodes {
        if let Err(e) = n.down() {
            eprintln!("bench: removing node {}: {e:#}", n.spec.name);
        }
    }
    let figures = result?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&figures)?);
        return Ok(());
    }
    let mut t = tabled::builder::Builder::default();
    t.push_record(["figure (median)", "kernel", "lazy", "lazy / kernel", "goal"]);
    for (key, name) in [
        ("no_op_tick_seconds", "no-op tick".to_string()),
        ("install_seconds", "install fx-web, request to healthy".into()),
        (
            "reboot_survive_seconds",
            format!("reboot-survive iteration, {} apps", figures["apps"].as_array().map_or(0, Vec::len)),
        ),
    ] {
        let f = |k: &str| figures[key][k].as_f64().unwrap_or(f64::NAN);
        t.push_record([
            name,
            format!("{:.3} s", f("kernel")),
            format!("{:.3} s", f("lazy")),
            format!("{:.2}x", f("ratio")),
            "<= 1.2x".into(),
        ]);
    }
    println!("{}", t.build().with(tabled::settings::Style::sharp()));
    Ok(())
}
