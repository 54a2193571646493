//! `archy-chaos fleet run`: one suite over every node of an inventory, in parallel, each node
//! with its own `archy-chaos run` (a child process: a node's failure or crash stays its own),
//! its own report, and a fleet report that puts the worst node first.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use crate::report::fleet::{render, FleetEntry, FleetReport, SCHEMA};
use crate::report::{exit, Report, Verdict};

/// `fleet.yml`, format version 1.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Inventory {
    pub version: u32,
    /// Apps protected on every node that does not set its own `protected` (the synced chain
    /// and channels of a real node: hours to resync).
    #[serde(default)]
    pub protected: Vec<String>,
    pub nodes: Vec<FleetNode>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetNode {
    /// `local:NAME` (a node-in-a-box on this machine) or `ssh://user@host[:port]`.
    pub node: String,
    /// Apps destructive scenarios must leave alone on this node, instead of the fleet's
    /// `protected` (`[]`: none).
    #[serde(default)]
    pub protected: Option<Vec<String>>,
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
    /// SSH nodes: private key, known-hosts file, and the YAML file of per-primitive commands
    /// (`run --help`).
    #[serde(default)]
    pub identity: Option<PathBuf>,
    #[serde(default)]
    pub known_hosts: Option<PathBuf>,
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
        let inv: Inventory = crate::yaml::load(path)?;
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

    /// The apps protected on `node`: its own list, else the fleet's.
    pub fn protected<'a>(&'a self, node: &'a FleetNode) -> &'a [String] {
        node.protected.as_deref().unwrap_or(&self.protected)
    }
}

impl FleetNode {
    /// A name for the node's report directory; a bad entry is refused here, before anything
    /// runs, rather than failing half-way through the night.
    fn name(&self) -> Result<String> {
        match self.node.split_once(':') {
            Some(("local", name)) if !name.is_empty() => Ok(name.to_string()),
            Some(("ssh", _)) => {
                let n = crate::node::ssh::SshNode::parse(&self.node)?;
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
                cmd.args(["--backend", b.name()]);
            }
            for (flag, list) in
                [("--apps", &n.apps[..]), ("--protected", inv.protected(n)), ("--break", &n.breakages[..])]
            {
                if !list.is_empty() {
                    cmd.args([flag, &list.join(",")]);
                }
            }
            if let Some(url) = &args.pushgateway {
                cmd.args(["--pushgateway", url]);
            }
            for (flag, path) in [
                ("--identity", &n.identity),
                ("--known-hosts", &n.known_hosts),
                ("--ssh-commands", &n.ssh_commands),
            ] {
                if let Some(p) = path {
                    cmd.arg(flag).arg(p);
                }
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
                let outcome = (|| -> Result<(u8, Option<Report>)> {
                    std::fs::create_dir_all(&dir)?;
                    let log = std::fs::File::create(dir.join("run.log"))?;
                    let out = crate::exec::output(cmd.stderr(log)).context("starting archy-chaos run")?;
                    let code = out.status.code().map_or(exit::UNKNOWN, |c| c as u8);
                    Ok((code, serde_json::from_slice(&out.stdout).ok()))
                })();
                let (code, report, error) = match outcome {
                    Ok((code, report)) => (code, report, None),
                    Err(e) => (exit::UNKNOWN, None, Some(format!("{e:#}"))),
                };
                eprintln!("archy-chaos: node {name}: exit {code}");
                let entry = FleetEntry {
                    verdict: report.as_ref().map(|r| r.verdict),
                    node: name.clone(),
                    exit_code: code,
                    report_dir: dir,
                    report,
                    error,
                };
                results.lock().unwrap_or_else(|e| e.into_inner()).insert(name, entry);
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
    let mut nodes: Vec<FleetEntry> = results.into_values().collect();
    nodes.sort_by_key(|n| (rank(n.exit_code), n.node.clone()));
    let worst = nodes.first().map_or(exit::UNKNOWN, |n| match n.exit_code {
        exit::FAIL | exit::PASS => n.exit_code,
        _ => exit::UNKNOWN,
    });
    let verdict = match worst {
        exit::PASS => Verdict::Pass,
        exit::FAIL => Verdict::Fail,
        _ => Verdict::Unknown,
    };
    let fleet = FleetReport {
        schema: SCHEMA,
        kind: "fleet".into(),
        suite: args.suite.clone(),
        seed,
        verdict,
        started_unix: started.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        duration_seconds: started.elapsed().map_or(0.0, |d| d.as_secs_f64()),
        nodes,
    };
    std::fs::create_dir_all(&args.report_dir)?;
    let path = args.report_dir.join(format!("fleet-{}.json", fleet.started_unix));
    std::fs::write(&path, serde_json::to_vec_pretty(&fleet)?)?;
    println!("{}", render(&fleet));
    println!("fleet verdict: {}; report: {}", verdict.name(), path.display());
    Ok(worst)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inventory(text: &str) -> Inventory {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fleet.yml");
        std::fs::write(&path, text).unwrap();
        Inventory::load(&path).unwrap()
    }

    /// The fleet's `protected` holds on every node unless the node names its own list;
    /// `protected: []` clears it.
    #[test]
    fn fleet_protected_is_every_nodes_default_unless_the_node_overrides_it() {
        let inv = inventory(
            "version: 1\nprotected: [bitcoin-knots, lnd]\nnodes:\n  - node: local:a\n  - node: local:b\n    protected: [electrumx]\n  - node: local:c\n    protected: []\n",
        );
        let got: Vec<&[String]> = inv.nodes.iter().map(|n| inv.protected(n)).collect();
        assert_eq!(got, [&["bitcoin-knots".to_string(), "lnd".into()][..], &["electrumx".to_string()], &[]]);
        let none = inventory("version: 1\nnodes:\n  - node: local:a\n");
        assert!(none.protected(&none.nodes[0]).is_empty());
    }

    /// The example the nightly runs protects what the platform protects on its verification
    /// node, on every node.
    #[test]
    fn the_nightly_example_protects_the_platforms_synced_apps_on_every_node() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/nightly/fleet.yml");
        let inv = Inventory::load(&path).unwrap();
        for n in &inv.nodes {
            let p = inv.protected(n);
            for app in ["bitcoin-knots", "electrumx", "lnd"] {
                assert!(p.iter().any(|a| a == app), "{}: {app} not protected: {p:?}", n.node);
            }
        }
    }
}
