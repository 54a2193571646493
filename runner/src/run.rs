//! `archy-chaos run`: scenarios and suites on one or more nodes (a fresh local node-in-a-box
//! per scenario, or a real host over SSH), nodes in parallel, one report, one exit code.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::RwLock;

use anyhow::{bail, ensure, Context, Result};
use archy_agent::manifest::Catalog;

use crate::node::local::UpOptions;
use crate::node::ssh::{SshNode, SshOptions};
use crate::node::{Backend, LocalNode, Node};
use crate::report::model::Environment;
use crate::report::{exit, NodeReport, Report, ScenarioReport, SuiteRecord};
use crate::scenario::{self, Scenario, Verdict};

/// What survives a local node's power cut (`--durability`).
#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
pub enum Durability {
    Kernel,
    Lazy,
}

/// Why a local node is not there, with the way out when its lazy mount may be to blame.
pub fn up_failed(lazy: bool) -> &'static str {
    match lazy {
        true => "cannot bring up a local node with a lazy data root (--durability kernel runs without)",
        false => "cannot bring up a local node",
    }
}

impl Durability {
    /// Whether local nodes get the lazy data root: asked, or where this machine has FUSE.
    pub fn lazy(asked: Option<Durability>) -> bool {
        asked.map_or_else(|| Path::new("/dev/fuse").exists(), |d| d == Durability::Lazy)
    }

    /// The replay's flag, as it ran: the default depends on the machine.
    pub fn flag(asked: Option<Durability>) -> &'static str {
        if Durability::lazy(asked) {
            " --durability lazy"
        } else {
            " --durability kernel"
        }
    }
}

#[derive(clap::Args)]
pub struct RunArgs {
    /// Scenarios (`scenarios/<id>.yml`, e.g. `reboot-survive`) and suites
    /// (`scenarios/suites/<id>.yml`: `smoke`, `release`, `nightly`), run in order.
    /// `archy-chaos list` shows them.
    #[arg(required = true)]
    pub targets: Vec<String>,
    /// Iterations of every scenario [default: the suite's, else the scenario's].
    #[arg(long)]
    pub iterations: Option<u32>,
    /// Seed of every random choice [default: random; the report prints it].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Run these apps instead of each scenario's own (comma separated).
    #[arg(long, value_delimiter = ',')]
    pub apps: Vec<String>,
    /// Where to run; repeat for several nodes, run in parallel (a release runs on two):
    /// `local` (a fresh node-in-a-box per scenario), `local:NAME` (the same, named), or
    /// `ssh://user@host[:port]` (a host set up with `archy-chaos node provision`).
    #[arg(long, default_values_t = ["local".to_string()])]
    pub node: Vec<String>,
    /// Backend of the local nodes' agents (an SSH host runs what it was provisioned with).
    #[arg(long, value_enum, default_value = "quadlet")]
    pub backend: Backend,
    #[command(flatten)]
    pub ssh: SshOptions,
    /// Stop at the first iteration that does not pass (the report says what did not run).
    #[arg(long)]
    pub fail_fast: bool,
    #[arg(long, default_value = "scenarios")]
    pub scenarios: PathBuf,
    #[arg(long, default_value = "apps")]
    pub catalog: PathBuf,
    /// Where the JSON report goes (`archy-chaos report FILE` renders it).
    #[arg(long, default_value = "reports/out")]
    pub report_dir: PathBuf,
    /// Keep the last local node afterwards (to look at it; `archy-chaos node down NAME`);
    /// runs on one lane.
    #[arg(long)]
    pub keep_node: bool,
    /// Local nodes per `--node local`, each a fresh node taking the next share of a scenario's
    /// iterations (an L6 scenario runs whole, alone on the machine). On the 2-core testbed 2
    /// lanes take 0.68 of the time of 1 (lifecycle-matrix, secret-deleted and kill9-random x6:
    /// 161 s against 236 s); the report has one section per `--node` whatever the lanes.
    #[arg(long, default_value_t = 2)]
    pub lanes: u32,
    /// Deliberately broken node for proving the suite (podman backend): podman runs in the
    /// agent's cgroup, the platform's FM3.
    #[arg(long)]
    pub fm3: bool,
    /// What a local node's power cut keeps: `lazy` (only what the node fsynced, as on real
    /// hardware: its data root and Quadlet unit directory are the lazy filesystem,
    /// `archy-chaos lazyfs`, and each cut's evidence says what was lost) or `kernel` (every
    /// write, as the page cache survives the killed processes). Default: lazy where this
    /// machine has FUSE (/dev/fuse), else kernel. A host over SSH keeps what its own power
    /// cut keeps; asking it for lazy makes its scenarios unknown.
    #[arg(long, value_enum)]
    pub durability: Option<Durability>,
    /// Deliberately broken agent behaviour, for proving that the suite catches it (never on
    /// a real node): secrets never re-checked after install, state written in place,
    /// ports published under host networking, a secret, the state or a directory after a
    /// rename never fsynced (caught only with `--durability lazy`).
    #[arg(long = "break", value_delimiter = ',', value_parser = clap::builder::PossibleValuesParser::new(archy_agent::failpoint::BREAKAGES))]
    pub breakages: Vec<String>,
    /// Apps a destructive scenario must not hurt (on a synced node a cycle costs hours of
    /// chain resync), comma separated.
    #[arg(long, value_delimiter = ',')]
    pub protected: Vec<String>,
    /// Run destructive scenarios on protected apps anyway.
    #[arg(long)]
    pub allow_protected: bool,
    /// Push the results to a Prometheus pushgateway, e.g. http://127.0.0.1:9091.
    #[arg(long)]
    pub pushgateway: Option<String>,
    /// Print the JSON report on stdout instead of the summary table.
    #[arg(long)]
    pub json: bool,
    #[arg(long, default_value = "archy")]
    pub user: String,
}

/// One scenario to run, resolved: its apps, backend and iteration count.
struct Work {
    scenario: Scenario,
    apps: Vec<String>,
    backend: Backend,
    iterations: u32,
}

impl Work {
    fn label(&self) -> String {
        crate::report::model::label(&self.scenario.id, self.backend)
    }

    /// Iterations a node reports: one per app of a per-app scenario.
    fn runs(&self) -> u32 {
        self.iterations
    }
}

/// Where to run, parsed from `--node`.
enum Target {
    /// A fresh node-in-a-box per scenario, under this name.
    Local(String),
    Ssh(Box<SshNode>),
}

impl Target {
    fn label(&self) -> String {
        match self {
            Target::Local(name) => format!("local:{name}"),
            Target::Ssh(n) => n.url(),
        }
    }
}

pub fn run(args: RunArgs) -> ExitCode {
    let usage = |e: anyhow::Error| {
        eprintln!("archy-chaos: {e:#}");
        ExitCode::from(exit::USAGE)
    };
    let (work, suite) = match plan(&args) {
        Ok(w) => w,
        Err(e) => return usage(e),
    };
    let targets = match targets(&args) {
        Ok(t) => t,
        Err(e) => return usage(e),
    };
    // Every SSH host answers, has podman and the node's root, before anything runs.
    for t in &targets {
        if let Target::Ssh(n) = t {
            if let Err(e) = n.root() {
                eprintln!("archy-chaos: --node {}: {e:#}", t.label());
                return ExitCode::from(exit::UNKNOWN);
            }
        }
    }
    if let Err(e) = crate::interrupt::install() {
        return usage(anyhow::anyhow!("installing the signal handlers: {e}"));
    }
    let seed = args.seed.unwrap_or_else(rand::random);
    let started = std::time::SystemTime::now();
    CPU_BEFORE.get_or_init(crate::environment::cpu_times);
    let per_node: u64 = work.iter().map(|w| u64::from(w.runs())).sum();
    let bar = progress(per_node * targets.len() as u64);
    eprintln!(
        "archy-chaos: {} scenario(s), {per_node} iteration(s) on {}, seed {seed}",
        work.len(),
        targets.iter().map(Target::label).collect::<Vec<_>>().join(" and ")
    );
    let stop = AtomicBool::new(false);
    let measuring = RwLock::new(());
    let work = &work;
    let nodes: Vec<NodeReport> = std::thread::scope(|s| {
        let handles: Vec<_> = targets
            .iter()
            .map(|t| {
                let d =
                    Driver { args: &args, label: t.label(), bar: &bar, stop: &stop, measuring: &measuring };
                s.spawn(move || run_node(d, t, work, seed))
            })
            .collect();
        handles
            .into_iter()
            .zip(&targets)
            .map(|(h, t)| {
                // A node whose run panicked ran nothing that counts: unknown.
                h.join().unwrap_or_else(|_| NodeReport::new(t.label(), String::new(), None, Vec::new()))
            })
            .collect()
    });
    bar.finish_and_clear();
    let interrupted = crate::interrupt::signal();
    let mut verdict = Report::verdict_of(&nodes);
    if interrupted.is_some() || (args.fail_fast && stop.load(Ordering::SeqCst)) {
        verdict = verdict.max(Verdict::Unknown); // what did not run proves nothing
    }
    let r = Report {
        schema: crate::report::SCHEMA,
        verdict,
        seed,
        replay: replay(&args, seed),
        nondeterminism: "the seed fixes the data written, the kill instants and every random choice of the runner; podman's and systemd's timing and the kernel's scheduling are not fixed by it".into(),
        started_unix: started.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        duration_seconds: started.elapsed().map_or(0.0, |d| d.as_secs_f64()),
        nodes,
        suite: Some(suite),
        explore: None,
    };
    let path = match r.write(&args.report_dir, &args.targets.join("+")) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("archy-chaos: cannot write the report: {e:#}");
            return ExitCode::from(exit::UNKNOWN);
        }
    };
    if let Some(url) = &args.pushgateway {
        if let Err(e) = crate::push::push(url, &r, None) {
            eprintln!("archy-chaos: pushing to {url}: {e:#}");
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
    } else {
        println!("{}", r.summary());
        println!("verdict: {:?}; report: {}; replay: {}", r.verdict, path.display(), r.replay);
    }
    match interrupted {
        Some(sig) => {
            eprintln!("archy-chaos: interrupted (signal {sig}); the report holds what ran");
            ExitCode::from(crate::interrupt::exit_code(sig))
        }
        None => ExitCode::from(r.exit_code()),
    }
}

/// The scenarios asked for, each with its apps, protected apps refused for destructive ones,
/// and the record of them the report keeps.
fn plan(args: &RunArgs) -> Result<(Vec<Work>, SuiteRecord)> {
    let catalog = Catalog::load(&args.catalog).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut planned = scenario::resolve(&args.scenarios, &args.targets, args.backend)?;
    if let Some(n) = args.iterations {
        planned.iter_mut().for_each(|p| p.iterations = n);
    }
    let mut work = Vec::new();
    for scenario::Planned { path, scenario: s, backend, iterations } in planned.iter().cloned() {
        let apps = if args.apps.is_empty() {
            s.apps(&catalog, &path)?
        } else {
            let mut s2 = s.clone();
            s2.apps = scenario::Apps::List(args.apps.clone());
            s2.apps(&catalog, Path::new("--apps"))?
        };
        let hurt: Vec<&String> = apps.iter().filter(|a| args.protected.contains(a)).collect();
        if s.destructive && !hurt.is_empty() && !args.allow_protected {
            bail!(
                "{} is destructive and would hurt protected apps {hurt:?}: leave them out (--apps), or pass --allow-protected",
                s.id
            );
        }
        work.push(Work { scenario: s, apps, backend, iterations });
    }
    // `work` is `planned`, entry for entry.
    let suite = SuiteRecord::new(args.targets.join("+"), planned.iter().zip(work.iter().map(Work::runs)))?;
    Ok((work, suite))
}

/// Every `--node`, checked before anything runs: a bad URL is a usage error naming it.
fn targets(args: &RunArgs) -> Result<Vec<Target>> {
    let mut out: Vec<Target> = Vec::new();
    for (i, n) in args.node.iter().enumerate() {
        let t = match n.split_once(':') {
            None if n == "local" => {
                Target::Local(format!("run{}{}", std::process::id() % 100_000, if i > 0 { i.to_string() } else { String::new() }))
            }
            Some(("local", name)) if LocalNode::open(name).is_ok() => bail!(
                "--node {n}: node {name} exists: run brings up a fresh node per scenario (`archy-chaos node down {name}` first)"
            ),
            Some(("local", name)) if args.lanes > 1 && name.len() + 1 + (args.lanes - 1).to_string().len() > 12 => bail!(
                "--node {n}: with --lanes {} the nodes are named {name}x1 and so on, which must fit in 12 characters: use a shorter name or --lanes 1",
                args.lanes
            ),
            Some(("local", name)) => Target::Local(name.to_string()),
            Some(("ssh", _)) => Target::Ssh(Box::new(
                args.ssh.node(n).with_context(|| format!("--node {n}"))?,
            )),
            _ => bail!("--node {n}: expected `local`, `local:NAME` or `ssh://user@host[:port]`"),
        };
        if out.iter().any(|o| o.label() == t.label()) {
            bail!("--node {n} is given twice");
        }
        out.push(t);
    }
    Ok(out)
}

fn progress(total: u64) -> indicatif::ProgressBar {
    indicatif::ProgressBar::new(total).with_style(
        indicatif::ProgressStyle::with_template(
            "{msg:>24} [{bar:30}] {pos}/{len} iterations, {elapsed} (ETA {eta})",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    )
}

/// What a node's thread shares: the run's arguments, its progress bar and its stop flag.
struct Driver<'a> {
    args: &'a RunArgs,
    label: String,
    bar: &'a indicatif::ProgressBar,
    stop: &'a AtomicBool,
    /// Held shared by every scenario, alone by an L6 one (see `run_node`).
    measuring: &'a RwLock<()>,
}

impl Driver<'_> {
    fn say(&self, line: String) {
        if self.bar.is_hidden() {
            eprintln!("{line}"); // no terminal (CI): the log still shows progress
        } else {
            self.bar.println(line);
        }
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst) || crate::interrupt::signal().is_some()
    }

    /// Told of each iteration as it ends: progress, and whether to go on.
    fn each(&self, w: &Work, group: &[String], it: &scenario::Iteration) -> bool {
        let (id, n, verdict) = (w.label(), it.n, it.verdict);
        self.say(format!(
            "{} {id} [{}] iteration {n}/{}: {verdict:?}",
            self.label,
            group.join(","),
            w.iterations
        ));
        self.bar.inc(1);
        if self.args.fail_fast && verdict != Verdict::Pass {
            self.stop.store(true, Ordering::SeqCst);
        }
        !self.stopped()
    }

    /// One scenario on a fresh local node, taken down after it (also when the run is
    /// interrupted) unless `--keep-node` keeps the last.
    fn local(
        &self,
        name: &str,
        w: &Work,
        range: std::ops::RangeInclusive<u32>,
        seed: u64,
        last: bool,
        env: &mut Option<Environment>,
    ) -> Result<Vec<scenario::Iteration>> {
        let args = self.args;
        let opts = UpOptions {
            name: name.to_string(),
            user: args.user.clone(),
            backend: w.backend,
            netns: true,
            fm3: args.fm3,
            breakages: args.breakages.clone(),
            lazy: Durability::lazy(args.durability),
        };
        let bin = std::env::current_exe()?.with_file_name("archy-agent");
        let node = LocalNode::up(&opts, &bin, &args.catalog).context(up_failed(opts.lazy))?;
        let results = scenario::engine::run_scenario(&w.scenario, &node, &w.apps, range, seed, |g, it| {
            self.each(w, g, it)
        });
        if last || self.stopped() {
            *env = Some(crate::environment::environment(&node, self.cpu_before()));
        }
        if !(args.keep_node && (last || self.stopped())) {
            if let Err(e) = node.down() {
                self.say(format!("archy-chaos: removing node {name}: {e:#}"));
            }
        }
        Ok(results)
    }

    /// One scenario on a host over SSH, from a clean host as a fresh local node would be: every
    /// app installed there is removed first (with purge), but the protected ones.
    fn ssh(
        &self,
        node: &SshNode,
        w: &Work,
        range: std::ops::RangeInclusive<u32>,
        seed: u64,
        last: bool,
        env: &mut Option<Environment>,
    ) -> Result<Vec<scenario::Iteration>> {
        let s = &w.scenario;
        ensure!(
            self.args.durability != Some(Durability::Lazy),
            "--durability lazy is for local nodes: a host over SSH keeps what its own power cut keeps"
        );
        let agent = crate::node::agent(node);
        let installed = agent.list().context("listing the host's apps")?;
        let (kept, others): (Vec<String>, Vec<String>) =
            installed.into_iter().map(|a| a.id).partition(|a| self.args.protected.contains(a));
        scenario::engine::clean(&agent, &others, s.converge_timeout.0)
            .context("removing the apps installed")?;
        // The host runs the backend it was provisioned with; an entry for the other one runs
        // it for that scenario only, on a host with nothing installed.
        let switched = crate::node::provision::switch_backend(node, w.backend, &kept)?;
        let results =
            scenario::engine::run_scenario(s, node, &w.apps, range, seed, |g, it| self.each(w, g, it));
        if let Some(switched) = switched {
            let installed: Vec<String> = agent.list()?.into_iter().map(|a| a.id).collect();
            scenario::engine::clean(&agent, &installed, s.converge_timeout.0)?;
            switched.restore(node)?;
        }
        // Once, at the end (five remote commands).
        if last || self.stopped() {
            *env = Some(crate::environment::environment(node, self.cpu_before()));
        }
        Ok(results)
    }

    fn cpu_before(&self) -> (u64, u64, u64) {
        *CPU_BEFORE.get_or_init(crate::environment::cpu_times)
    }
}

/// CPU counters at the start of the run, for the busy and steal fractions.
static CPU_BEFORE: std::sync::OnceLock<(u64, u64, u64)> = std::sync::OnceLock::new();

/// One share of a scenario's iterations: `first..=last` of work entry `work`.
#[derive(Clone, Copy)]
struct Share {
    work: usize,
    first: u32,
    last: u32,
}

/// The shares of a run on one target: an SSH host (or one lane) takes every scenario whole;
/// `lanes` local nodes split each scenario's iterations between them, but an L6 one, which
/// has the machine to itself anyway.
fn shares(work: &[Work], lanes: u32) -> Vec<Share> {
    let mut out = Vec::new();
    for (i, w) in work.iter().enumerate() {
        if w.iterations == 0 {
            out.push(Share { work: i, first: 1, last: 0 }); // reported, with nothing run
            continue;
        }
        let parts = if w.scenario.layer == scenario::Layer::L6 { 1 } else { lanes.clamp(1, w.iterations) };
        let size = w.iterations.div_ceil(parts);
        let mut first = 1;
        while first <= w.iterations {
            let last = (first + size - 1).min(w.iterations);
            out.push(Share { work: i, first, last });
            first = last + 1;
        }
    }
    out
}

/// Every scenario on one target, in order, until the run stops: a local target runs them on
/// `--lanes` fresh nodes at once, each taking the next share.
fn run_node(d: Driver, target: &Target, work: &[Work], seed: u64) -> NodeReport {
    let args = d.args;
    let lanes = match target {
        Target::Local(_) if !args.keep_node => args.lanes.max(1),
        _ => 1,
    };
    let queue =
        std::sync::Mutex::new(shares(work, lanes).into_iter().collect::<std::collections::VecDeque<_>>());
    let environment = std::sync::Mutex::new(None);
    // Per work entry: its iterations and the node time its shares took.
    let done = std::sync::Mutex::new(vec![(Vec::new(), 0.0f64); work.len()]);
    std::thread::scope(|s| {
        for lane in 0..lanes {
            let (d, queue, environment, done) = (&d, &queue, &environment, &done);
            s.spawn(move || loop {
                if d.stopped() {
                    break;
                }
                let Some((share, last)) =
                    queue.lock().ok().and_then(|mut q| q.pop_front().map(|s| (s, q.is_empty())))
                else {
                    break;
                };
                let w = &work[share.work];
                d.bar.set_message(w.label());
                // An L6 scenario has the machine to itself: the run's other nodes wait between
                // their shares, so it measures the agent on this machine, not the run's other
                // nodes (two nodes at once put raw `podman ps` at 20 apps at 3.9 s p99, against a
                // 250 ms target).
                let _alone = (w.scenario.layer == scenario::Layer::L6)
                    .then(|| d.measuring.write().unwrap_or_else(|e| e.into_inner()));
                let _shared = _alone.is_none().then(|| d.measuring.read().unwrap_or_else(|e| e.into_inner()));
                let scenario_seed = seed ^ ((share.work as u64) << 32);
                let started = std::time::Instant::now();
                let mut env = None;
                let range = share.first..=share.last;
                let results = match target {
                    Target::Local(name) => {
                        let name = if lane == 0 { name.clone() } else { format!("{name}x{lane}") };
                        d.local(&name, w, range, scenario_seed, last, &mut env)
                    }
                    Target::Ssh(node) => d.ssh(node, w, range, scenario_seed, last, &mut env),
                };
                let results = results.unwrap_or_else(|e| {
                    d.say(format!("archy-chaos: {}: {} (verdict: unknown): {e:#}", d.label, w.scenario.id));
                    Vec::new()
                });
                if let Ok(mut done) = done.lock() {
                    done[share.work].0.extend(results);
                    done[share.work].1 += started.elapsed().as_secs_f64();
                }
                if let (Some(env), Ok(mut e)) = (env, environment.lock()) {
                    e.get_or_insert(env);
                }
            });
        }
    });
    let done = done.into_inner().unwrap_or_else(|e| e.into_inner());
    let scenarios = work
        .iter()
        .zip(done)
        // A scenario never started (the run stopped first) is not reported.
        .filter(|(_, (its, secs))| !its.is_empty() || *secs > 0.0)
        .map(|(w, (mut its, secs))| {
            its.sort_by_key(|i| i.n);
            ScenarioReport::new(&w.scenario, w.backend, its, secs)
        })
        .collect();
    let environment = environment.into_inner().unwrap_or_else(|e| e.into_inner());
    let backend = match (target, environment.as_ref().and_then(|e| e.agent_backend.clone())) {
        (Target::Ssh(_), Some(b)) => b,
        (Target::Ssh(_), None) => "unknown".into(),
        (Target::Local(_), _) => format!("{:?}", args.backend).to_lowercase(),
    };
    NodeReport::new(d.label, backend, environment, scenarios)
}

/// The command that replays this run.
fn replay(args: &RunArgs, seed: u64) -> String {
    let mut r = format!("archy-chaos run {}", args.targets.join(" "));
    for n in &args.node {
        r.push_str(&format!(" --node {n}"));
    }
    r.push_str(&format!(" --seed {seed} --backend {}", format!("{:?}", args.backend).to_lowercase()));
    if let Some(n) = args.iterations {
        r.push_str(&format!(" --iterations {n}"));
    }
    if !args.apps.is_empty() {
        r.push_str(&format!(" --apps {}", args.apps.join(",")));
    }
    if !args.breakages.is_empty() {
        r.push_str(&format!(" --break {}", args.breakages.join(",")));
    }
    if args.fm3 {
        r.push_str(" --fm3");
    }
    let local = args.node.is_empty() || args.node.iter().any(|n| n.starts_with("local"));
    if args.durability.is_some() || local {
        r.push_str(Durability::flag(args.durability));
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn work(id: &str, layer: &str, iterations: u32) -> Work {
        let text = format!(
            "version: 1\nid: {id}\nlayer: {layer}\ndescription: x\napps: [fx-web]\nsteps: [install]\n"
        );
        let scenario: Scenario = serde_yaml::from_str(&text).unwrap();
        Work { scenario, apps: vec!["fx-web".into()], backend: Backend::Quadlet, iterations }
    }

    /// Lanes split a scenario's iterations into consecutive shares, never an L6 one, and a
    /// scenario of no iterations still gets its (empty) share, so the report names it.
    #[test]
    fn lanes_share_iterations_but_not_an_l6_scenario() {
        let w = [
            work("a", "L3", 20),
            work("b", "L6", 5),
            work("c", "L5", 1),
            work("d", "L3", 0),
            work("e", "L5", 3),
        ];
        let got: Vec<(usize, u32, u32)> = shares(&w, 2).iter().map(|s| (s.work, s.first, s.last)).collect();
        assert_eq!(got, [(0, 1, 10), (0, 11, 20), (1, 1, 5), (2, 1, 1), (3, 1, 0), (4, 1, 2), (4, 3, 3)]);
        let one: Vec<(usize, u32, u32)> = shares(&w, 1).iter().map(|s| (s.work, s.first, s.last)).collect();
        assert_eq!(one, [(0, 1, 20), (1, 1, 5), (2, 1, 1), (3, 1, 0), (4, 1, 3)]);
    }
}
