//! `archy-chaos fleet run`: one suite over every node of an inventory, in parallel, each node
//! with its own `archy-chaos run` (a child process: a node's failure or crash stays its own),
//! its own report, and a fleet report that puts the worst node first.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::report::exit;

/// `fleet.yml`, format version 1.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Inventory {
    pub version: u32,
    pub nodes: Vec<FleetNode>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetNode {
    /// `local:NAME` (a node-in-a-box on this machine) or `ssh://user@host[:port]`.
    pub node: String,
    /// Apps destructive scenarios must leave alone on this node.
    #[serde(default)]
    pub protected: Vec<String>,
    /// Per-node overrides of the fleet command's settings.
    #[serde(default)]
    pub iterations: Option<u32>,
    #[serde(default)]
    pub apps: Vec<String>,
    #[serde(default)]
    pub backend: Option<crate::node::Backend>,
    /// Deliberate agent bugs (`run --break`), for proving the fleet report; never on real nodes.
    #[serde(default, rename = "break")]
    pub breakages: Vec<String>,
    /// SSH nodes: private key, and the YAML file of per-primitive commands (`run --help`).
    #[serde(default)]
    pub identity: Option<PathBuf>,
    #[serde(default)]
    pub ssh_commands: Option<PathBuf>,
}

#[derive(clap::Args)]
pub struct FleetArgs {
    /// The fleet: `nodes: [{node: local:alpha, protected: [bitcoin-knots]}, ...]` (see README).
    #[arg(long)]
    pub inventory: PathBuf,
    /// Suite or scenario run on every node, e.g. `nightly`, `smoke`, `reboot-survive`.
    #[arg(long)]
    pub suite: String,
    /// Nodes run at once.
    #[arg(long, default_value_t = 2)]
    pub parallel: usize,
    /// Iterations of every scenario [default: the suite's], unless a node overrides it.
    #[arg(long)]
    pub iterations: Option<u32>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Each node's report goes to DIR/<node>/, the fleet's to DIR/fleet-<time>.json.
    #[arg(long, default_value = "reports/out/fleet")]
    pub report_dir: PathBuf,
    /// Passed to every node's run: each pushes its results, grouped by node.
    #[arg(long)]
    pub pushgateway: Option<String>,
}

impl Inventory {
    pub fn load(path: &Path) -> Result<Inventory> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
        let inv: Inventory =
            serde_yaml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        if inv.version != 1 {
            bail!(
                "{}: version {} is not supported (this runner reads version 1)",
                path.display(),
                inv.version
            );
        }
        if inv.nodes.is_empty() {
            bail!("{}: no nodes", path.display());
        }
        let mut seen = Vec::new();
        for n in &inv.nodes {
            let name = n.name().with_context(|| format!("{}: node `{}`", path.display(), n.node))?;
            if seen.contains(&name) {
                bail!("{}: node `{}` is listed twice", path.display(), n.node);
            }
            seen.push(name);
        }
        Ok(inv)
    }
}

impl FleetNode {
    /// A name for the node's report directory; a bad entry is refused here, before anything
    /// runs, rather than failing half-way through the night.
    fn name(&self) -> Result<String> {
        match self.node.split_once(':') {
            Some(("local", name)) if !name.is_empty() => Ok(name.to_string()),
            Some(("ssh", _)) => {
                let n = crate::node::ssh::SshNode::parse(&self.node, "", None, Default::default())?;
                Ok(format!("{}-{}", n.destination.replace('@', "-at-"), n.port))
            }
            _ => bail!("expected `local:NAME` or `ssh://user@host[:port]`"),
        }
    }
}

pub fn run(args: &FleetArgs) -> ExitCode {
    match fleet(args) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("archy-chaos: {e:#}");
            ExitCode::from(exit::USAGE)
        }
    }
}

fn fleet(args: &FleetArgs) -> Result<u8> {
    let inv = Inventory::load(&args.inventory)?;
    anyhow::ensure!(args.parallel >= 1, "--parallel must be at least 1");
    let seed = args.seed.unwrap_or_else(rand::random);
    let bin = std::env::current_exe()?;
    let started = std::time::SystemTime::now();
    let jobs: Vec<(String, Command, PathBuf)> = inv
        .nodes
        .iter()
        .map(|n| {
            let name = n.name()?;
            let dir = args.report_dir.join(&name);
            let mut cmd = Command::new(&bin);
            cmd.args(["run", &args.suite, "--node", &n.node, "--seed", &seed.to_string(), "--json"])
                .arg("--report-dir")
                .arg(&dir);
            if let Some(i) = n.iterations.or(args.iterations) {
                cmd.args(["--iterations", &i.to_string()]);
            }
            if let Some(b) = n.backend {
                cmd.args(["--backend", if b == crate::node::Backend::Podman { "podman" } else { "quadlet" }]);
            }
            for (flag, list) in
                [("--apps", &n.apps), ("--protected", &n.protected), ("--break", &n.breakages)]
            {
                if !list.is_empty() {
                    cmd.args([flag, &list.join(",")]);
                }
            }
            if let Some(url) = &args.pushgateway {
                cmd.args(["--pushgateway", url]);
            }
            if let Some(k) = &n.identity {
                cmd.arg("--identity").arg(k);
            }
            if let Some(c) = &n.ssh_commands {
                cmd.arg("--ssh-commands").arg(c);
            }
            Ok((name, cmd, dir))
        })
        .collect::<Result<_>>()?;
    eprintln!(
        "archy-chaos: fleet of {} node(s), {} at a time, suite {}, seed {seed}",
        jobs.len(),
        args.parallel,
        args.suite
    );

    // A pool of `parallel` workers over the node list; each node's output goes to its log.
    let queue = std::sync::Mutex::new(jobs.into_iter());
    let results = std::sync::Mutex::new(BTreeMap::new());
    std::thread::scope(|s| {
        for _ in 0..args.parallel {
            s.spawn(|| loop {
                let Some((name, mut cmd, dir)) = queue.lock().unwrap_or_else(|e| e.into_inner()).next()
                else {
                    break;
                };
                let outcome = (|| -> Result<(u8, Value)> {
                    std::fs::create_dir_all(&dir)?;
                    let log = std::fs::File::create(dir.join("run.log"))?;
                    let out = crate::exec::output(cmd.stderr(log)).context("starting archy-chaos run")?;
                    let code = out.status.code().map_or(exit::UNKNOWN, |c| c as u8);
                    let report = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
                    Ok((code, report))
                })();
                let (code, report) =
                    outcome.unwrap_or_else(|e| (exit::UNKNOWN, json!({"error": format!("{e:#}")})));
                eprintln!("archy-chaos: node {name}: exit {code}");
                results.lock().unwrap_or_else(|e| e.into_inner()).insert(name, (code, report, dir));
            });
        }
    });
    let results = results.into_inner().unwrap_or_else(|e| e.into_inner());

    // Worst first: fail, then unknown (or a run that left no report), then pass.
    let rank = |code: u8| match code {
        exit::FAIL => 0,
        exit::PASS => 2,
        _ => 1,
    };
    let mut nodes: Vec<(String, u8, Value, PathBuf)> =
        results.into_iter().map(|(n, (c, r, d))| (n, c, r, d)).collect();
    nodes.sort_by_key(|(n, c, _, _)| (rank(*c), n.clone()));
    let worst = nodes.first().map_or(exit::UNKNOWN, |(_, c, _, _)| match *c {
        exit::FAIL | exit::PASS => *c,
        _ => exit::UNKNOWN,
    });
    let verdict = match worst {
        exit::PASS => "pass",
        exit::FAIL => "fail",
        _ => "unknown",
    };
    let fleet = json!({
        "schema": 1,
        "kind": "fleet",
        "suite": args.suite,
        "seed": seed,
        "verdict": verdict,
        "started_unix": started.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        "duration_seconds": started.elapsed().map_or(0.0, |d| d.as_secs_f64()),
        "nodes": nodes.iter().map(|(n, c, r, d)| json!({
            "node": n, "exit_code": c, "verdict": r["verdict"], "report_dir": d, "report": r,
        })).collect::<Vec<_>>(),
    });
    std::fs::create_dir_all(&args.report_dir)?;
    let path = args.report_dir.join(format!("fleet-{}.json", fleet["started_unix"]));
    std::fs::write(&path, serde_json::to_vec_pretty(&fleet)?)?;
    println!("{}", render(&fleet)?);
    println!("fleet verdict: {verdict}; report: {}", path.display());
    Ok(worst)
}

/// The fleet report in Markdown: a table of nodes worst first, then each node's run report
/// (its scorecards, KPIs and failures).
pub fn render(fleet: &Value) -> Result<String> {
    let s = |v: &Value| v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string());
    let nodes = fleet["nodes"].as_array().cloned().unwrap_or_default();
    let mut out = format!(
        "# archy-chaos fleet — {} — {}\n\nSeed {}, {:.0} s.\n\n| node | verdict | scenarios passed | failing |\n|---|---|---|---|\n",
        s(&fleet["suite"]),
        s(&fleet["verdict"]).to_uppercase(),
        fleet["seed"],
        fleet["duration_seconds"].as_f64().unwrap_or(0.0)
    );
    for n in &nodes {
        let scenarios = n["report"]["scenarios"].as_array().cloned().unwrap_or_default();
        let passed = scenarios.iter().filter(|sc| sc["verdict"] == "pass").count();
        let failing: Vec<String> =
            scenarios.iter().filter(|sc| sc["verdict"] != "pass").map(|sc| s(&sc["scenario"])).collect();
        let verdict =
            if n["report"].is_null() { "unknown (no report)".to_string() } else { s(&n["verdict"]) };
        out.push_str(&format!(
            "| {} | {verdict} | {passed}/{} | {} |\n",
            s(&n["node"]),
            scenarios.len(),
            failing.join(", ")
        ));
    }
    for n in &nodes {
        out.push_str(&format!("\n---\n\n# node {}\n\n", s(&n["node"])));
        if n["report"]["schema"].is_null() {
            out.push_str(&format!("No report: see {}/run.log\n", s(&n["report_dir"])));
        } else {
            out.push_str(&crate::report::render(&n["report"], "md")?.replacen("# ", "## ", 1));
        }
    }
    Ok(out)
}
