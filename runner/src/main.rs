//! `archy-chaos`: runs L3 lifecycle-survival, L5 chaos and L6 performance scenarios
//! against a node and gates a release on the result.

mod agent_client;
mod bench;
mod environment;
mod evidence;
mod exec;
mod explore;
mod fleet;
mod gate;
mod interrupt;
mod lazyfs;
mod node;
mod push;
mod report;
mod run;
mod scenario;
mod yaml;

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
    /// Run scenarios and suites on nodes (a fresh local node-in-a-box per scenario, or real
    /// hosts over SSH) and gate on the verdict. Exit code: 0 every iteration passed, 1 one
    /// failed, 2 unknown or infrastructure error, 64 bad usage, 130/143 interrupted by
    /// SIGINT/SIGTERM (nodes torn down, the report so far written). Run as root after
    /// scripts/setup-host.
    Run(run::RunArgs),
    /// Generated histories: N steps (requests of C concurrent clients on every fixture app,
    /// catalog changes, faults) from one seed, checked against a model of what the history
    /// implies at every quiet point, observed from outside the agent; a failure is shrunk to
    /// the fewest steps that still fail and written as `scenarios/found/<id>.yml`, which
    /// `archy-chaos run found/<id>` replays. Exit code: 0 nothing found, 1 a failure found,
    /// 2 unknown (the node could not be driven), 64 bad usage, 130/143 interrupted.
    Explore(explore::ExploreArgs),
    /// The scenarios available, with their layer and what each proves.
    List {
        #[arg(long, default_value = "scenarios")]
        scenarios: std::path::PathBuf,
    },
    /// Render a saved run (or fleet) report: `md` (scorecard for people), `junit` (CI),
    /// `json`. Exit code: 0 rendered, 64 bad usage or an unreadable report.
    Report {
        report: std::path::PathBuf,
        #[arg(long, default_value = "md")]
        format: String,
        /// Write the rendering to FILE instead of standard output.
        #[arg(long, value_name = "FILE")]
        out: Option<std::path::PathBuf>,
        /// Markdown: also draw SVG charts (the tick scaling curve, latency distributions), each
        /// a file in FILE-charts/ beside `--out FILE.md`, linked by a relative path. Needs --out.
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
    /// The lazy data root (as root): mount BACKING at MOUNT through a FUSE layer that keeps
    /// an undo of everything not yet fsynced, and serve CONTROL, a unix socket taking one
    /// line: `cut SEED [tear]` drops every unsynced byte and directory change (answers what
    /// was lost as JSON) and unmounts, as a power cut would; `flush` keeps everything, as a
    /// clean shutdown syncs; `unmount` flushes and unmounts. Runs until cut or unmounted.
    Lazyfs { backing: std::path::PathBuf, mount: std::path::PathBuf, control: std::path::PathBuf },
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
    /// What the lazy data root (`run --durability lazy`) costs the agent: no-op tick, install
    /// and a whole reboot-survive iteration, each as a ratio to the kernel path, on two nodes
    /// measured in turn. Run as root after scripts/setup-host.
    Durability(bench::DurabilityBenchArgs),
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
        /// What the node's power cut keeps: `lazy` (only what was fsynced) or `kernel` (every
        /// write). Default: lazy where this machine has FUSE (see `run --help`).
        #[arg(long, value_enum)]
        durability: Option<run::Durability>,
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
    /// Make the kernel OOM-kill an app's main process (a memory limit on its container and
    /// processes growing past it); SIGKILL stands in where no limit can be enforced
    Oom { name: String, app: String },
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
    /// Make the node's data root full or read-only (`--off`: as before), with the evidence.
    DiskFault {
        name: String,
        #[arg(value_enum)]
        fault: node::DiskFault,
        #[arg(long)]
        off: bool,
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

/// A host over SSH.
#[derive(clap::Args)]
struct SshArgs {
    /// ssh://user@host[:port]
    url: String,
    #[command(flatten)]
    options: node::ssh::SshOptions,
}

impl SshArgs {
    fn node(self) -> anyhow::Result<node::ssh::SshNode> {
        self.options.node(&self.url)
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
    /// The kernel OOM-kills the app (the host's `oom_kill` command), else the SIGKILL stand-in.
    Oom {
        app: String,
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
        RemoteAction::Oom { app } => show(n.oom_kill(&app)?),
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
            show(node::agent(n).rpc::<serde_json::Value>(&method, params)?);
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
    use anyhow::Context;
    use node::{LocalNode, Node};
    fn show(v: impl serde::Serialize) {
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default())
    }
    match cmd {
        NodeCommand::Up { name, backend, netns, fm3, breakages, durability, user, catalog, bare } => {
            let bin = std::env::current_exe()?.with_file_name("archy-agent");
            let opts = node::local::UpOptions {
                name: name.clone(),
                user,
                backend,
                netns,
                fm3,
                breakages,
                lazy: run::Durability::lazy(durability),
            };
            if bare {
                LocalNode::up_bare(&opts).context(run::up_failed(opts.lazy))?;
                println!("node {name} up, without an agent");
            } else {
                let n = LocalNode::up(&opts, &bin, &catalog).context(run::up_failed(opts.lazy))?;
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
        NodeCommand::Oom { name, app } => show(LocalNode::open(&name)?.oom_kill(&app)?),
        NodeCommand::Partition { name } => show(LocalNode::open(&name)?.partition()?),
        NodeCommand::Heal { name } => show(LocalNode::open(&name)?.heal()?),
        NodeCommand::Fault { name, path, fault } => show(LocalNode::open(&name)?.file_fault(&path, fault)?),
        NodeCommand::DiskFault { name, fault, off } => show(LocalNode::open(&name)?.disk_fault(fault, !off)?),
        NodeCommand::Exec { name, argv } => {
            let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
            // Streams (a test host's SSH login pipes uploads through here) and keeps the status.
            let status = crate::exec::status(
                LocalNode::open(&name)?.command(&argv)?.stdin(std::process::Stdio::inherit()),
            )?;
            anyhow::ensure!(status.code().is_some(), "{} killed by a signal ({status})", argv[0]);
            if !status.success() {
                std::process::exit(status.code().unwrap_or(1));
            }
        }
        NodeCommand::Remote { ssh, api, reboot_timeout, action } => {
            let mut n = ssh.node()?;
            n.api = api;
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
            show(node::agent(&n).rpc::<serde_json::Value>(&method, params)?);
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    // Bad usage exits 64 as the help says, not clap's 2 (which means "unknown" here).
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { report::exit::USAGE } else { 0 });
        }
    };
    match cli.command {
        Command::Run(args) => run::run(args),
        Command::Explore(args) => explore::explore(args),
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
        Command::Report { report: path, format, out, charts } => {
            match report::command(&path, &format, out.as_deref(), charts) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("archy-chaos: {e:#}");
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
        Command::Lazyfs { backing, mount, control } => match lazyfs::serve(&backing, &mount, &control) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("archy-chaos: lazyfs: {e:#}");
                ExitCode::from(EXIT_UNKNOWN)
            }
        },
        Command::Bench { what } => match match what {
            BenchWhat::Agent(args) => bench::agent(&args),
            BenchWhat::Node(args) => bench::node(&args),
            BenchWhat::Durability(args) => bench::durability(&args),
        } {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("archy-chaos: bench failed: {e:#}");
                ExitCode::from(EXIT_UNKNOWN)
            }
        },
    }
}
