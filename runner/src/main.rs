//! `archy-chaos`: runs L3 lifecycle-survival, L5 chaos and L6 performance scenarios
//! against a node and gates a release on the result.

mod agent_client;
mod bench;
mod chart;
mod evidence;
mod fleet;
mod gate;
mod measure;
mod node;
mod push;
mod report;
mod scenario;

use std::path::Path;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Exit code for a run that could not decide (infrastructure error, unknown verdict).
const EXIT_UNKNOWN: u8 = 2;

#[derive(Parser)]
#[command(
    name = "archy-chaos",
    version,
    about = "Chaos and performance gate for rootless Podman/Quadlet apps"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a scenario on a fresh local node-in-a-box and gate on its verdict. Exit code: 0
    /// every iteration passed, 1 one failed, 2 unknown or infrastructure error, 64 bad usage.
    /// Run as root after scripts/setup-host.
    Run(RunArgs),
    /// The scenarios available, with their layer and what each proves.
    List {
        #[arg(long, default_value = "scenarios")]
        scenarios: std::path::PathBuf,
    },
    /// Render a saved run report: `md` (scorecard for people), `junit` (CI), `json`.
    Report {
        report: std::path::PathBuf,
        #[arg(long, default_value = "md")]
        format: String,
        /// Markdown: append SVG charts (the tick scaling curve, latency distributions) inline.
        #[arg(long)]
        charts: bool,
    },
    /// A suite over every node of an inventory, nodes in parallel; a report per node and a
    /// fleet report, worst node first. Exit code: the worst node's, as for `run`.
    Fleet {
        #[command(subcommand)]
        command: FleetCommand,
    },
    /// Local nodes-in-a-box: create, hurt, inspect and remove them (as root).
    Node {
        #[command(subcommand)]
        command: NodeCommand,
    },
    /// Decide whether a run may ship: its own verdict, and its KPIs against a baseline run.
    ///
    /// Exit code: 0 ship; 1 do not ship (the run failed, or a KPI regressed: the output
    /// names it); 2 undecided (the run's verdict is unknown, or --pushgateway failed on a
    /// passing gate): rerun, then look at the run's report; 64 bad usage (the message names
    /// the file and what is wrong). With --write-baseline: 0 written, 1 the run did not
    /// pass (nothing written).
    ///
    /// Rule: every KPI is lower-is-better. For each KPI in both files with at least 5
    /// samples on each side, the ratio median(run)/median(baseline) is bootstrapped (2000
    /// resamples, fixed seed: the same files always give the same answer). A KPI regresses
    /// when the whole 95% interval lies above 1 + tolerance, and is better when it lies
    /// below 1 - tolerance; otherwise it is the same (within noise). Fewer samples: "too few
    /// samples", not judged. In the baseline but not the run: "missing"; in the run but not
    /// the baseline: "new" (neither fails the gate; refresh the baseline). A latency
    /// measured beside raw podman in the same run (X_seconds with X_ratio beside it) is
    /// judged by its ratio, which carries across a busier or slower machine; the raw_*
    /// references describe the machine and are shown, never judged.
    ///
    /// Baseline (schema 1; take one from a passing run with --write-baseline):
    ///   {"schema": 1, "created_unix": 1764100000, "from": "<report path>",
    ///    "environment": {...the run's...},
    ///    "kpis": {"<scenario>/<kpi>": {"unit": "s|ratio|calls", "samples": [0.41, ...]}}}
    #[command(verbatim_doc_comment)]
    Gate(gate::GateArgs),
    /// Benchmarks, each figure beside its raw-podman baseline measured in the same run.
    Bench {
        #[command(subcommand)]
        what: BenchWhat,
    },
}

#[derive(Subcommand)]
enum FleetCommand {
    /// `fleet run --inventory fleet.yml --suite nightly --parallel 2` (as root).
    Run(fleet::FleetArgs),
}

#[derive(Subcommand)]
enum BenchWhat {
    /// The agent (podman backend): no-op tick, install latency, podman calls, start-up, RSS.
    /// Run as root (it switches to the service user) after scripts/setup-host.
    Agent(bench::BenchArgs),
    /// A local node: boot to ready, power cut to every fixture app healthy, node memory.
    /// Run as root after scripts/setup-host.
    Node(bench::NodeBenchArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    /// Scenarios (`scenarios/<id>.yml`, e.g. `reboot-survive`) and suites
    /// (`scenarios/suites/<id>.yml`: `smoke`, `release`, `nightly`), run in order, each
    /// scenario on a fresh local node. `archy-chaos list` shows them.
    #[arg(required = true)]
    targets: Vec<String>,
    /// Iterations of every scenario [default: the suite's, else the scenario's].
    #[arg(long)]
    iterations: Option<u32>,
    /// Seed of every random choice [default: random; the report prints it].
    #[arg(long)]
    seed: Option<u64>,
    /// Run these apps instead of each scenario's own (comma separated).
    #[arg(long, value_delimiter = ',')]
    apps: Vec<String>,
    /// The node: `local` (a fresh node-in-a-box per scenario) or `local:NAME` to name it.
    #[arg(long, default_value = "local")]
    node: String,
    #[arg(long, value_enum, default_value = "quadlet")]
    backend: node::Backend,
    #[arg(long, default_value = "scenarios")]
    scenarios: std::path::PathBuf,
    #[arg(long, default_value = "apps")]
    catalog: std::path::PathBuf,
    /// Where the JSON report goes (`archy-chaos report FILE` renders it).
    #[arg(long, default_value = "reports/out")]
    report_dir: std::path::PathBuf,
    /// Keep the last node afterwards (to look at it; `archy-chaos node down NAME` removes it).
    #[arg(long)]
    keep_node: bool,
    /// Deliberately broken node for proving the suite (podman backend): podman runs in the
    /// agent's cgroup, the platform's FM3.
    #[arg(long)]
    fm3: bool,
    /// Deliberately broken agent behaviour, for proving that the suite catches it (never on
    /// a real node): secrets never re-checked after install, state written in place,
    /// ports published under host networking.
    #[arg(long = "break", value_delimiter = ',', value_parser = clap::builder::PossibleValuesParser::new(archy_agent::failpoint::BREAKAGES))]
    breakages: Vec<String>,
    /// Apps a destructive scenario must not hurt (on a synced node a cycle costs hours of
    /// chain resync), comma separated.
    #[arg(long, value_delimiter = ',')]
    protected: Vec<String>,
    /// Run destructive scenarios on protected apps anyway.
    #[arg(long)]
    allow_protected: bool,
    /// Push the results to a Prometheus pushgateway, e.g. http://127.0.0.1:9091.
    #[arg(long)]
    pushgateway: Option<String>,
    /// Print the JSON report on stdout instead of the summary table.
    #[arg(long)]
    json: bool,
    #[arg(long, default_value = "archy")]
    user: String,
}

fn run_scenarios(args: RunArgs) -> ExitCode {
    let usage = |e: anyhow::Error| {
        eprintln!("archy-chaos: {e:#}");
        ExitCode::from(report::exit::USAGE)
    };
    let plan = match scenario::resolve(&args.scenarios, &args.targets) {
        Ok(p) => p,
        Err(e) => return usage(e),
    };
    let catalog = match archy_agent::manifest::Catalog::load(&args.catalog) {
        Ok(c) => c,
        Err(e) => return usage(anyhow::anyhow!("{e}")),
    };
    let mut work = Vec::new();
    for (path, s, iterations) in plan {
        let apps = if args.apps.is_empty() {
            s.apps(&catalog, &path)
        } else {
            let mut s2 = s.clone();
            s2.apps = scenario::Apps::List(args.apps.clone());
            s2.apps(&catalog, Path::new("--apps"))
        };
        let apps = match apps {
            Ok(a) => a,
            Err(e) => return usage(e),
        };
        let hurt: Vec<&String> = apps.iter().filter(|a| args.protected.contains(a)).collect();
        if s.destructive && !hurt.is_empty() && !args.allow_protected {
            return usage(anyhow::anyhow!(
                "{} is destructive and would hurt protected apps {hurt:?}: leave them out (--apps), or pass --allow-protected",
                s.id
            ));
        }
        work.push((s, apps, args.iterations.unwrap_or(iterations)));
    }
    let seed = args.seed.unwrap_or_else(rand::random);
    let name = match args.node.split_once(':') {
        None if args.node == "local" => format!("run{}", std::process::id() % 1_000_000),
        Some(("local", name)) if node::LocalNode::open(name).is_err() => name.to_string(),
        Some(("local", name)) => {
            return usage(anyhow::anyhow!(
                "node {name} exists: run brings up a fresh node per scenario (`archy-chaos node down {name}` first)"
            ))
        }
        Some(("ssh", _)) => {
            return usage(anyhow::anyhow!(
                "scenario runs over SSH are not supported yet: `archy-chaos node remote` drives a real node's primitives"
            ))
        }
        _ => return usage(anyhow::anyhow!("--node {}: expected `local` or `local:NAME`", args.node)),
    };
    let bin = match std::env::current_exe() {
        Ok(p) => p.with_file_name("archy-agent"),
        Err(e) => return usage(e.into()),
    };
    let started = std::time::SystemTime::now();
    let cpu_before = report::cpu_times();
    let total: u64 =
        work.iter().map(|(s, apps, n)| u64::from(*n) * if s.per_app { apps.len() as u64 } else { 1 }).sum();
    let bar = indicatif::ProgressBar::new(total).with_style(
        indicatif::ProgressStyle::with_template(
            "{msg:>24} [{bar:30}] {pos}/{len} iterations, {elapsed} (ETA {eta})",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    eprintln!(
        "archy-chaos: {} scenario(s), {total} iteration(s) on local node {name}, seed {seed}",
        work.len()
    );
    let mut scenarios = Vec::new();
    let mut environment = serde_json::Value::Null;
    for (i, (s, apps, iterations)) in work.iter().enumerate() {
        bar.set_message(s.id.clone());
        let opts = node::local::UpOptions {
            name: name.clone(),
            user: args.user.clone(),
            backend: args.backend,
            netns: true,
            fm3: args.fm3,
            breakages: args.breakages.clone(),
        };
        let node = match node::LocalNode::up(&opts, &bin, &args.catalog) {
            Ok(n) => n,
            Err(e) => {
                bar.println(format!(
                    "archy-chaos: cannot bring up a local node for {} (verdict: unknown): {e:#}",
                    s.id
                ));
                scenarios.push(report::ScenarioReport::new(s, Vec::new()));
                continue;
            }
        };
        let results = scenario::engine::run_scenario(
            s,
            &node,
            apps,
            *iterations,
            seed ^ (i as u64) << 32,
            |group, it| {
                let line = format!(
                    "{} [{}] iteration {}/{iterations}: {:?}",
                    s.id,
                    group.join(","),
                    it.n,
                    it.verdict
                );
                if bar.is_hidden() {
                    eprintln!("{line}"); // no terminal (CI): the log still shows progress
                } else {
                    bar.println(line);
                }
                bar.inc(1);
                true
            },
        );
        scenarios.push(report::ScenarioReport::new(s, results));
        if i + 1 == work.len() {
            environment = report::environment(&node, cpu_before);
        }
        if !(args.keep_node && i + 1 == work.len()) {
            if let Err(e) = node.down() {
                bar.println(format!("archy-chaos: removing node {name}: {e:#}"));
            }
        }
    }
    bar.finish_and_clear();
    let mut replay = format!(
        "archy-chaos run {} --node {} --seed {seed} --backend {:?}",
        args.targets.join(" "),
        args.node,
        args.backend
    );
    if let Some(n) = args.iterations {
        replay.push_str(&format!(" --iterations {n}"));
    }
    if !args.apps.is_empty() {
        replay.push_str(&format!(" --apps {}", args.apps.join(",")));
    }
    if !args.breakages.is_empty() {
        replay.push_str(&format!(" --break {}", args.breakages.join(",")));
    }
    if args.fm3 {
        replay.push_str(" --fm3");
    }
    let r = report::Report {
        schema: report::SCHEMA,
        verdict: report::Report::verdict_of(&scenarios),
        node: format!("local:{name}"),
        backend: format!("{:?}", args.backend).to_lowercase(),
        seed,
        replay: replay.to_lowercase(),
        nondeterminism: "the seed fixes the data written, the kill instants and every random choice of the runner; podman's and systemd's timing and the kernel's scheduling are not fixed by it",
        started_unix: started.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        duration_seconds: started.elapsed().map_or(0.0, |d| d.as_secs_f64()),
        environment,
        scenarios,
    };
    let path = match r.write(&args.report_dir, &args.targets.join("+")) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("archy-chaos: cannot write the report: {e:#}");
            return ExitCode::from(report::exit::UNKNOWN);
        }
    };
    if let Some(url) = &args.pushgateway {
        let pushed =
            serde_json::to_value(&r).map_err(anyhow::Error::from).and_then(|v| push::push(url, &v, None));
        if let Err(e) = pushed {
            eprintln!("archy-chaos: pushing to {url}: {e:#}");
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
    } else {
        println!("{}", r.summary());
        println!("verdict: {:?}; report: {}; replay: {}", r.verdict, path.display(), r.replay);
    }
    ExitCode::from(r.exit_code())
}

#[derive(Subcommand)]
enum NodeCommand {
    /// Create a node (idempotent) and boot it: its user manager starts the agent.
    Up {
        name: String,
        #[arg(long, value_enum, default_value = "quadlet")]
        backend: node::Backend,
        /// Give the node its own network namespace (needed for several nodes running the same
        /// fixtures, and for partitions).
        #[arg(long)]
        netns: bool,
        /// Podman backend only: run podman in the agent's own cgroup, reproducing the
        /// platform's FM3 (a restart of the agent kills its containers).
        #[arg(long)]
        fm3: bool,
        /// Deliberately broken agent behaviour, for proving the suite (see `run --help`).
        #[arg(long = "break", value_delimiter = ',', value_parser = clap::builder::PossibleValuesParser::new(archy_agent::failpoint::BREAKAGES))]
        breakages: Vec<String>,
        #[arg(long, default_value = "archy")]
        user: String,
        #[arg(long, default_value = "apps")]
        catalog: std::path::PathBuf,
        /// No agent: a fresh host for `node provision` (boot waits for the user manager only).
        #[arg(long)]
        bare: bool,
    },
    /// Remove every process, mount, namespace, cgroup, veth and file of the node.
    Down { name: String },
    /// Whether the node is up, its agent's address, and its processes.
    Status { name: String },
    /// Start a node that is down and wait for its agent.
    Boot { name: String },
    /// SIGKILL the node's PID 1: every process dies at once, tmpfs vanishes.
    PowerCut { name: String },
    /// Power cut (or clean shutdown with --graceful) and boot.
    Reboot {
        name: String,
        #[arg(long)]
        graceful: bool,
    },
    /// Send a signal to the agent through the user manager.
    KillAgent {
        name: String,
        #[arg(long, default_value = "KILL")]
        signal: String,
    },
    /// Restart the agent's service: systemd kills its whole cgroup.
    RestartAgent { name: String },
    /// Kill an app's main process, as the OOM killer would.
    KillContainer {
        name: String,
        app: String,
        #[arg(long, default_value = "KILL")]
        signal: String,
    },
    /// Cut the node's network link (needs --netns at up).
    Partition { name: String },
    /// Restore the node's network link.
    Heal { name: String },
    /// Damage a file on the node, e.g. `data/secrets/fx-web/api-token`.
    Fault {
        name: String,
        path: String,
        #[arg(value_enum)]
        fault: node::FileFault,
    },
    /// Run a command inside the node as its service user (e.g. `podman ps`), with this
    /// command's stdin and output; exits with its status.
    Exec {
        name: String,
        #[arg(trailing_var_arg = true, required = true)]
        argv: Vec<String>,
    },
    /// Call the node's agent: `rpc NAME package.install '{"id":"fx-web"}'`.
    Rpc {
        name: String,
        method: String,
        #[arg(default_value = "null")]
        params: String,
    },
    /// The same primitives on a real node over SSH (OpenSSH client, batch mode).
    Remote {
        #[command(flatten)]
        ssh: SshArgs,
        /// The agent's API address as reachable from here [default: a local port forwarded
        /// over the SSH connection to --listen]
        #[arg(long)]
        api: Option<String>,
        /// YAML file overriding the command run for each primitive (see README).
        #[arg(long)]
        commands: Option<std::path::PathBuf>,
        /// How long a reboot or power cut may take until a new agent answers.
        #[arg(long, default_value = "600s")]
        reboot_timeout: archy_agent::manifest::Dur,
        #[command(subcommand)]
        action: RemoteAction,
    },
    /// Install the agent on a host over SSH as a user service of the login user (idempotent).
    Provision {
        #[command(flatten)]
        ssh: SshArgs,
        /// The catalog to install with it.
        #[arg(long, default_value = "apps")]
        catalog: std::path::PathBuf,
        /// Also import the fixture image from /var/lib/archy-chaos/fixture-rootfs.tar if missing.
        #[arg(long)]
        fixtures: bool,
    },
    /// Remove what `provision` installed: the agent's unit and config, every app container
    /// and unit, and the root.
    Deprovision {
        #[command(flatten)]
        ssh: SshArgs,
    },
}

/// How to reach a host over SSH.
#[derive(clap::Args)]
struct SshArgs {
    /// ssh://user@host[:port]
    url: String,
    /// Private key for the connection.
    #[arg(long)]
    identity: Option<std::path::PathBuf>,
    /// Known-hosts file [default: the user's]
    #[arg(long)]
    known_hosts: Option<std::path::PathBuf>,
    /// The node's root on the host: data/, catalog/ and bin/ live there.
    #[arg(long, default_value = node::ssh::DEFAULT_ROOT)]
    root: String,
    /// The agent's listen address on the host (keep it on loopback: the API is forwarded).
    #[arg(long, default_value = archy_agent::config::DEFAULT_LISTEN)]
    listen: String,
}

impl SshArgs {
    fn node(self) -> anyhow::Result<node::ssh::SshNode> {
        let mut n = node::ssh::SshNode::parse(&self.url)?;
        n.identity = self.identity;
        n.known_hosts = self.known_hosts;
        n.root = self.root;
        n.listen = self.listen;
        Ok(n)
    }
}

#[derive(Subcommand)]
enum RemoteAction {
    /// Wait for the agent's /readyz.
    Boot,
    PowerCut,
    Reboot,
    KillAgent {
        #[arg(long, default_value = "KILL")]
        signal: String,
    },
    RestartAgent,
    KillContainer {
        app: String,
        #[arg(long, default_value = "KILL")]
        signal: String,
    },
    Partition,
    Heal,
    Exec {
        #[arg(trailing_var_arg = true, required = true)]
        argv: Vec<String>,
    },
    Rpc {
        method: String,
        #[arg(default_value = "null")]
        params: String,
    },
    /// Print a file under the node's root, e.g. `data/agent/state.json`.
    Read {
        path: String,
    },
    /// Replace a file under the node's root with this command's stdin.
    Write {
        path: String,
    },
    Stat {
        path: String,
    },
    Hash {
        path: String,
    },
    Ls {
        path: String,
    },
    Rm {
        path: String,
    },
    /// Damage a file under the node's root, with the evidence.
    Fault {
        path: String,
        #[arg(value_enum)]
        fault: node::FileFault,
    },
    /// The last lines of the agent's log on the node.
    Log {
        #[arg(long, default_value_t = 50)]
        lines: usize,
    },
    /// The apps of the catalog the node's agent runs.
    Catalog,
    /// What driving the node costs: a remote command through the connection and over a fresh
    /// one, and agent polls per second over the API.
    Ping {
        #[arg(long, default_value = "3s")]
        window: archy_agent::manifest::Dur,
    },
}

fn ssh_commands(commands: Option<std::path::PathBuf>) -> anyhow::Result<node::ssh::SshCommands> {
    Ok(match commands {
        Some(path) => {
            let text =
                std::fs::read_to_string(&path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            serde_yaml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
        }
        None => node::ssh::SshCommands::default(),
    })
}

fn remote_command(n: &node::ssh::SshNode, action: RemoteAction) -> anyhow::Result<()> {
    use node::Node;
    fn show(v: impl serde::Serialize) {
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default())
    }
    match action {
        RemoteAction::Boot => println!("{} ready in {:?}", n.name(), n.boot()?),
        RemoteAction::PowerCut => show(n.power_cut()?),
        RemoteAction::Reboot => show(n.graceful_reboot()?),
        RemoteAction::KillAgent { signal } => show(n.kill_agent(&signal)?),
        RemoteAction::RestartAgent => show(n.restart_agent()?),
        RemoteAction::KillContainer { app, signal } => show(n.kill_container(&app, &signal)?),
        RemoteAction::Partition => show(n.partition()?),
        RemoteAction::Heal => show(n.heal()?),
        RemoteAction::Exec { argv } => {
            let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
            let out = n.exec(&argv)?;
            print!("{}", String::from_utf8_lossy(&out.stdout));
            eprint!("{}", String::from_utf8_lossy(&out.stderr));
            anyhow::ensure!(out.status.success(), "exited with {}", out.status);
        }
        RemoteAction::Rpc { method, params } => {
            let params: serde_json::Value =
                serde_json::from_str(&params).map_err(|e| anyhow::anyhow!("params are not JSON: {e}"))?;
            show(agent_client::AgentClient::new(n).rpc::<serde_json::Value>(&method, params)?);
        }
        RemoteAction::Read { path } => {
            let bytes = n.read(&path)?.ok_or_else(|| anyhow::anyhow!("{}: no {path}", n.host()))?;
            std::io::Write::write_all(&mut std::io::stdout(), &bytes)?;
        }
        RemoteAction::Write { path } => {
            let mut bytes = Vec::new();
            std::io::Read::read_to_end(&mut std::io::stdin(), &mut bytes)?;
            n.write(&path, &bytes)?;
        }
        RemoteAction::Stat { path } => show(n.stat(&path)?),
        RemoteAction::Hash { path } => show(n.hash(&path)?),
        RemoteAction::Ls { path } => show(n.list(&path)?),
        RemoteAction::Rm { path } => show(n.remove(&path)?),
        RemoteAction::Fault { path, fault } => show(n.file_fault(&path, fault)?),
        RemoteAction::Log { lines } => println!("{}", n.log(lines)?),
        RemoteAction::Catalog => show(n.catalog()?.apps.keys().collect::<Vec<_>>()),
        RemoteAction::Ping { window } => show(n.ping(window.0)?),
    }
    Ok(())
}

fn node_command(cmd: NodeCommand) -> anyhow::Result<()> {
    use node::{LocalNode, Node};
    fn show(v: impl serde::Serialize) {
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default())
    }
    match cmd {
        NodeCommand::Up { name, backend, netns, fm3, breakages, user, catalog, bare } => {
            let bin = std::env::current_exe()?.with_file_name("archy-agent");
            let opts = node::local::UpOptions { name: name.clone(), user, backend, netns, fm3, breakages };
            if bare {
                LocalNode::up_bare(&opts)?;
                println!("node {name} up, without an agent");
            } else {
                let n = LocalNode::up(&opts, &bin, &catalog)?;
                println!("node {name} up; agent at http://{}", n.api_addr());
            }
        }
        NodeCommand::Down { name } => LocalNode::open(&name)?.down()?,
        NodeCommand::Status { name } => {
            let n = LocalNode::open(&name)?;
            show(serde_json::json!({
                "name": name,
                "up": n.init_pid().is_some(),
                "init_pid": n.init_pid(),
                "processes": n.processes().len(),
                "agent": n.api_addr(),
                "backend": n.spec.backend,
                "root": n.root,
            }));
        }
        NodeCommand::Boot { name } => {
            let took = LocalNode::open(&name)?.boot()?;
            println!("node {name} ready in {took:?}");
        }
        NodeCommand::PowerCut { name } => show(LocalNode::open(&name)?.power_cut()?),
        NodeCommand::Reboot { name, graceful } => {
            let n = LocalNode::open(&name)?;
            show(if graceful { n.shutdown()? } else { n.power_cut()? });
            println!("node {name} ready in {:?}", n.boot()?);
        }
        NodeCommand::KillAgent { name, signal } => show(LocalNode::open(&name)?.kill_agent(&signal)?),
        NodeCommand::RestartAgent { name } => show(LocalNode::open(&name)?.restart_agent()?),
        NodeCommand::KillContainer { name, app, signal } => {
            show(LocalNode::open(&name)?.kill_container(&app, &signal)?)
        }
        NodeCommand::Partition { name } => show(LocalNode::open(&name)?.partition()?),
        NodeCommand::Heal { name } => show(LocalNode::open(&name)?.heal()?),
        NodeCommand::Fault { name, path, fault } => show(LocalNode::open(&name)?.file_fault(&path, fault)?),
        NodeCommand::Exec { name, argv } => {
            let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
            // Streams (a test host's SSH login pipes uploads through here) and keeps the status.
            let status =
                LocalNode::open(&name)?.command(&argv)?.stdin(std::process::Stdio::inherit()).status()?;
            anyhow::ensure!(status.code().is_some(), "{} killed by a signal ({status})", argv[0]);
            if !status.success() {
                std::process::exit(status.code().unwrap_or(1));
            }
        }
        NodeCommand::Remote { ssh, api, commands, reboot_timeout, action } => {
            let mut n = ssh.node()?;
            n.api = api;
            n.commands = ssh_commands(commands)?;
            n.reboot_timeout = reboot_timeout.0;
            remote_command(&n, action)?
        }
        NodeCommand::Provision { ssh, catalog, fixtures } => {
            let agent = std::env::current_exe()?.with_file_name("archy-agent");
            node::provision::provision(&ssh.node()?, &node::provision::Options { agent, catalog, fixtures })?
        }
        NodeCommand::Deprovision { ssh } => node::provision::deprovision(&ssh.node()?)?,
        NodeCommand::Rpc { name, method, params } => {
            let params: serde_json::Value =
                serde_json::from_str(&params).map_err(|e| anyhow::anyhow!("params are not JSON: {e}"))?;
            let n = LocalNode::open(&name)?;
            show(agent_client::AgentClient::new(&n).rpc::<serde_json::Value>(&method, params)?);
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Run(args) => run_scenarios(args),
        Command::List { scenarios } => match report::list(&scenarios) {
            Ok(t) => {
                println!("{t}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("archy-chaos: {e:#}");
                ExitCode::from(report::exit::USAGE)
            }
        },
        Command::Report { report: path, format, charts } => {
            let rendered = std::fs::read(&path)
                .map_err(anyhow::Error::from)
                .and_then(|b| Ok(serde_json::from_slice::<serde_json::Value>(&b)?))
                .and_then(|v| match v["kind"].as_str() {
                    Some("fleet") if format == "md" => fleet::render(&v),
                    _ if charts && format == "md" => Ok(report::render(&v, &format)? + &chart::markdown(&v)?),
                    _ => report::render(&v, &format),
                })
                .map_err(|e| anyhow::anyhow!("{}: {e:#}", path.display()));
            match rendered {
                Ok(text) => {
                    print!("{text}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("archy-chaos: {e}");
                    ExitCode::from(report::exit::USAGE)
                }
            }
        }
        Command::Fleet { command: FleetCommand::Run(args) } => fleet::run(&args),
        Command::Node { command } => match node_command(command) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("archy-chaos: {e:#}");
                ExitCode::from(EXIT_UNKNOWN)
            }
        },
        Command::Gate(args) => gate::run(&args),
        Command::Bench { what } => match match what {
            BenchWhat::Agent(args) => bench::agent(&args),
            BenchWhat::Node(args) => bench::node(&args),
        } {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("archy-chaos: bench failed: {e:#}");
                ExitCode::from(EXIT_UNKNOWN)
            }
        },
    }
}
