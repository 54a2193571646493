//! `archy-chaos explore`: generated histories of concurrent requests, catalog changes and
//! faults on one node, checked against a model at every quiet point, and a failure shrunk to
//! an ordinary scenario (`scenarios/found/<id>.yml`) that `archy-chaos run` replays.
//!
//! The generator ([`generate`]) writes scenario steps; C clients take them in order from one
//! queue, so requests overlap each other and the faults; the history records each with its
//! invocation, completion and outcome (`scenario::history`). Every `--quiet-every` steps the
//! clients drain, the checker (`scenario::checker`) waits for the node to match the model on
//! the agent's own schedule, and a sampler watches for what must never be seen even briefly.

pub mod generate;
pub mod shrink;

use std::collections::{BTreeSet, VecDeque};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use archy_agent::manifest::{Catalog, Dur};
use rand::{Rng, SeedableRng};

use crate::node::local::UpOptions;
use crate::node::ssh::{SshNode, SshOptions};
use crate::node::{Backend, LocalNode, Node};
use crate::report::model::{ExploreReport, Found};
use crate::report::{exit, NodeReport, Report, ScenarioReport};
use crate::run::Durability;
use crate::scenario::checker::{self, Seen, NEVER_HEALTHY};
use crate::scenario::engine::{Iteration, Memory, StepCtx, StepRecord};
use crate::scenario::history::{self, Entry, History};
use crate::scenario::{steps, Scenario, Step, Verdict};
pub use generate::Fault;

#[derive(clap::Args)]
pub struct ExploreArgs {
    /// Where: `local` (a fresh node-in-a-box, and one per shrinking replay), `local:NAME`, or
    /// `ssh://user@host[:port]` (a provisioned host; shrinking replays on it after removing
    /// every app but the protected ones).
    #[arg(long, default_value = "local")]
    pub node: String,
    /// Seed of the generator and every random choice [default: random; the report prints it].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Steps to generate (requests, catalog changes and faults).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub ops: u32,
    /// Concurrent clients taking the steps in order.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=32))]
    pub clients: u32,
    /// Kinds of fault to interleave, comma separated [default: all].
    #[arg(long, value_delimiter = ',', value_enum)]
    pub faults: Option<Vec<Fault>>,
    /// Longest exploration (steps not run by then are left out; shrinking has its own).
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    pub budget: Duration,
    /// Longest pause of a client between two steps (each pause is uniform from zero), so
    /// requests and faults meet the reconciler at work rather than all at once.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub stagger: Duration,
    /// Steps between quiet points, where the clients drain and the checker runs.
    #[arg(long, default_value_t = 25, value_parser = clap::value_parser!(u32).range(1..))]
    pub quiet_every: u32,
    /// Longest wait for the node to match the model at a quiet point.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub converge_timeout: Duration,
    /// Longest shrinking of a failure; 0 does not shrink.
    #[arg(long, default_value = "15m", value_parser = parse_duration)]
    pub shrink_budget: Duration,
    /// The apps the clients use [default: every fixture, the crash-looping one included].
    #[arg(long, value_delimiter = ',')]
    pub apps: Vec<String>,
    /// Where a shrunk failure is written as a scenario.
    #[arg(long, default_value = "scenarios/found")]
    pub found_dir: PathBuf,
    #[arg(long, default_value = "apps")]
    pub catalog: PathBuf,
    #[arg(long, default_value = "reports/out")]
    pub report_dir: PathBuf,
    /// Backend of local nodes' agents.
    #[arg(long, value_enum, default_value = "quadlet")]
    pub backend: Backend,
    /// Deliberately broken agent behaviour, for proving that explore catches it.
    #[arg(long = "break", value_delimiter = ',', value_parser = clap::builder::PossibleValuesParser::new(archy_agent::failpoint::BREAKAGES))]
    pub breakages: Vec<String>,
    /// What a local node's power cut keeps: `lazy` (only what was fsynced) or `kernel`
    /// (every write). Default: lazy where this machine has FUSE (see `run --help`).
    #[arg(long, value_enum)]
    pub durability: Option<Durability>,
    #[command(flatten)]
    pub ssh: SshOptions,
    /// Apps an SSH host keeps (never touched).
    #[arg(long, value_delimiter = ',')]
    pub protected: Vec<String>,
    /// Keep the exploring local node afterwards.
    #[arg(long)]
    pub keep_node: bool,
    #[arg(long, default_value = "archy")]
    pub user: String,
    /// Print the JSON report on stdout instead of the summary.
    #[arg(long)]
    pub json: bool,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    s.parse::<Dur>().map(|d| d.0).map_err(|e| format!("`{s}` is not a duration such as 90s or 10m: {e}"))
}

/// Where explore runs.
enum Where {
    Local(String),
    Ssh(Box<SshNode>),
}

pub fn explore(args: ExploreArgs) -> ExitCode {
    let usage = |e: anyhow::Error| {
        eprintln!("archy-chaos: {e:#}");
        ExitCode::from(exit::USAGE)
    };
    let catalog = match Catalog::load(&args.catalog) {
        Ok(c) => c,
        Err(e) => return usage(anyhow::anyhow!("--catalog {}: {e}", args.catalog.display())),
    };
    let apps: Vec<String> = if args.apps.is_empty() {
        catalog
            .apps
            .values()
            .filter(|m| m.fixture && m.network != archy_agent::manifest::Network::Host)
            .map(|m| m.id.clone())
            .collect()
    } else {
        args.apps.clone()
    };
    if let Some(bad) = apps.iter().find(|a| catalog.get(a).is_none()) {
        return usage(anyhow::anyhow!("--apps: `{bad}` is not in the catalog {}", args.catalog.display()));
    }
    let place = match args.node.as_str() {
        "local" => Where::Local(format!("x{}", std::process::id())),
        n if n.starts_with("local:") => Where::Local(n["local:".len()..].to_string()),
        n if n.starts_with("ssh://") => match args.ssh.node(n) {
            Ok(s) => Where::Ssh(Box::new(s)),
            Err(e) => return usage(e.context("--node")),
        },
        n => return usage(anyhow::anyhow!("--node: `{n}` is neither local, local:NAME nor ssh://user@host")),
    };
    let faults: BTreeSet<Fault> = match &args.faults {
        Some(f) => f.iter().copied().collect(),
        None => <Fault as clap::ValueEnum>::value_variants().iter().copied().collect(),
    };
    if let (Where::Ssh(_), true) = (&place, faults.contains(&Fault::Disk)) {
        return usage(anyhow::anyhow!("--faults disk needs a local node (its data root is a filesystem of its own); leave it out over SSH"));
    }
    if let (Where::Ssh(_), Some(Durability::Lazy)) = (&place, args.durability) {
        return usage(anyhow::anyhow!(
            "--durability lazy is for local nodes: a host over SSH keeps what its own power cut keeps"
        ));
    }
    if let Err(e) = crate::interrupt::install() {
        return usage(anyhow::anyhow!("installing the signal handlers: {e}"));
    }
    let seed = args.seed.unwrap_or_else(rand::random);
    let started = SystemTime::now();
    // The quiet points are steps of the plan, so a replay checks where the exploration did.
    let plan: Vec<Step> = generate::generate(seed, args.ops as usize, &faults, &catalog, &apps)
        .chunks(args.quiet_every as usize)
        .flat_map(|c| c.iter().cloned().chain([Step::Check]))
        .collect();
    eprintln!(
        "archy-chaos: exploring {} steps with {} clients on {} (faults: {}), seed {seed}",
        plan.len(),
        args.clients,
        args.node,
        faults.iter().map(|f| f.name()).collect::<Vec<_>>().join(",")
    );
    let ex = Explorer { args: &args, catalog: &catalog, apps: &apps, seed };
    let result = match &place {
        Where::Local(name) => ex.on_local(name, &plan),
        Where::Ssh(n) => ex.on_host(n.as_ref(), &plan),
    };
    let (explored, found) = match result {
        Ok(r) => r,
        Err(e) => {
            eprintln!("archy-chaos: explore could not run (verdict: unknown): {e:#}");
            return ExitCode::from(exit::UNKNOWN);
        }
    };
    let interrupted = crate::interrupt::signal();
    let mut verdict = if found.is_some() { Verdict::Fail } else { explored.verdict() };
    if interrupted.is_some() {
        verdict = verdict.max(Verdict::Unknown);
    }
    let scenario = ScenarioReport {
        scenario: format!("explore-{seed}"),
        description: format!("{} generated steps, {} clients", plan.len(), args.clients),
        layer: crate::scenario::Layer::L5,
        backend: args.backend,
        destructive: true,
        verdict,
        iterations: explored.checks.clone(),
        kpis: Vec::new(),
        seconds: started.elapsed().map_or(0.0, |d| d.as_secs_f64()),
    };
    let node_report = NodeReport::new(
        args.node.clone(),
        args.backend.name().to_string(),
        explored.environment.clone(),
        vec![scenario],
    );
    let mut r = Report {
        schema: crate::report::SCHEMA,
        verdict,
        seed,
        replay: replay(&args, seed),
        nondeterminism: "the seed fixes the generated steps and every random choice of the runner; which client takes which step when, podman's and systemd's timing and the kernel's scheduling are not fixed by it".into(),
        started_unix: started.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        duration_seconds: started.elapsed().map_or(0.0, |d| d.as_secs_f64()),
        nodes: vec![node_report],
        suite: None,
        explore: None,
    };
    r.explore = Some(ExploreReport {
        seed,
        ops: args.ops,
        clients: args.clients,
        faults: faults.iter().map(|f| f.name()).collect(),
        steps_run: explored.steps_run,
        history: explored.history,
        found,
    });
    let path = match r.write(&args.report_dir, &format!("explore-{seed}")) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("archy-chaos: cannot write the report: {e:#}");
            return ExitCode::from(exit::UNKNOWN);
        }
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
    } else {
        println!("{}", crate::report::markdown::explore_summary(&r));
        println!("verdict: {:?}; report: {}; replay: {}", r.verdict, path.display(), r.replay);
    }
    match interrupted {
        Some(sig) => ExitCode::from(crate::interrupt::exit_code(sig)),
        None => ExitCode::from(r.exit_code()),
    }
}

fn replay(args: &ExploreArgs, seed: u64) -> String {
    let mut r = format!(
        "archy-chaos explore --node {} --seed {seed} --ops {} --clients {} --quiet-every {} --stagger {}ms --backend {}",
        args.node,
        args.ops,
        args.clients,
        args.quiet_every,
        args.stagger.as_millis(),
        args.backend.name()
    );
    if let Some(f) = &args.faults {
        r.push_str(&format!(" --faults {}", f.iter().map(|f| f.name()).collect::<Vec<_>>().join(",")));
    }
    if !args.apps.is_empty() {
        r.push_str(&format!(" --apps {}", args.apps.join(",")));
    }
    if !args.breakages.is_empty() {
        r.push_str(&format!(" --break {}", args.breakages.join(",")));
    }
    if args.node.starts_with("local") {
        r.push_str(Durability::flag(args.durability));
    }
    r
}

/// What exploring one node gave.
struct Explored {
    history: Vec<Entry>,
    /// One per quiet point: the steps since the last one, and what the checker found.
    checks: Vec<Iteration>,
    steps_run: usize,
    /// The first failure: its message and how many steps led to it.
    failure: Option<(String, usize)>,
    environment: Option<crate::report::model::Environment>,
}

impl Explored {
    fn verdict(&self) -> Verdict {
        self.checks.iter().map(|c| c.verdict).max().unwrap_or(Verdict::Unknown)
    }
}

struct Explorer<'a> {
    args: &'a ExploreArgs,
    catalog: &'a Catalog,
    apps: &'a [String],
    seed: u64,
}

impl Explorer<'_> {
    fn up(&self, name: &str) -> Result<LocalNode> {
        let opts = UpOptions {
            name: name.to_string(),
            user: self.args.user.clone(),
            backend: self.args.backend,
            netns: true,
            fm3: false,
            breakages: self.args.breakages.clone(),
            lazy: Durability::lazy(self.args.durability),
        };
        let bin = std::env::current_exe()?.with_file_name("archy-agent");
        LocalNode::up(&opts, &bin, &self.args.catalog).context(crate::run::up_failed(opts.lazy))
    }

    fn on_local(&self, name: &str, plan: &[Step]) -> Result<(Explored, Option<Found>)> {
        let node = self.up(name)?;
        let explored = self.run(&node, plan);
        // A node that will not go down is worth a message, not the exploration's report.
        if !self.args.keep_node {
            if let Err(e) = node.down() {
                eprintln!("archy-chaos: removing node {name}: {e:#}");
            }
        }
        let explored = explored?;
        let found = self.found(&explored, plan, &|steps: &[Step]| {
            let node = self.up(&format!("{name}s"))?;
            let it = self.replay_on(&node, steps);
            node.down()?;
            it
        });
        Ok((explored, found))
    }

    fn on_host(&self, node: &SshNode, plan: &[Step]) -> Result<(Explored, Option<Found>)> {
        node.root().context("the host")?;
        self.clean(node)?;
        let explored = self.run(node, plan)?;
        let found = self.found(&explored, plan, &|steps: &[Step]| {
            self.clean(node)?;
            self.replay_on(node, steps)
        });
        Ok((explored, found))
    }

    /// Every app but the protected ones removed, the catalog as it was.
    fn clean(&self, node: &dyn Node) -> Result<()> {
        let agent = crate::node::agent(node);
        agent.wait_ready(self.args.converge_timeout)?;
        for app in node.list("catalog-aside")? {
            let change = if app.ends_with(".good.yml") {
                crate::scenario::CatalogChange::Repair
            } else {
                crate::scenario::CatalogChange::Restore
            };
            let app = app.trim_end_matches(".good.yml").to_string();
            steps::catalog_change(node, &History::default(), 0, 0, change, &app)?;
        }
        let installed: Vec<String> =
            agent.list()?.into_iter().map(|a| a.id).filter(|a| !self.args.protected.contains(a)).collect();
        crate::scenario::engine::clean(&agent, &installed, self.args.converge_timeout)
    }

    /// The scenario a sequence of steps is, as `scenarios/found/<id>.yml` holds it.
    fn scenario_text(&self, id: &str, description: &str, steps: &[Step]) -> Result<String> {
        use serde_yaml::Value;
        let why = "explore's model decides from the history, observed from outside the agent";
        let skip: serde_yaml::Mapping = [
            ("converged", "it forces ticks; the model waits on the agent's own schedule"),
            ("apps-up", why),
            ("secrets-valid", "the model checks the secrets of every app installed, and their rotation"),
            ("ports-match", why),
            ("no-orphans", why),
            ("state-valid", "the history damages the state file on purpose"),
        ]
        .into_iter()
        .map(|(k, v)| (Value::from(k), Value::from(v)))
        .collect();
        let doc: serde_yaml::Mapping = [
            ("version", Value::from(crate::scenario::FORMAT_VERSION)),
            ("id", id.into()),
            ("layer", "L5".into()),
            ("description", description.into()),
            ("apps", serde_yaml::to_value(self.apps)?),
            ("destructive", true.into()),
            ("converge_timeout", format!("{}s", self.args.converge_timeout.as_secs()).into()),
            ("steps", serde_yaml::to_value(serde_json::to_value(steps)?)?),
            ("invariants", serde_yaml::to_value(["model"])?),
            ("skip", Value::Mapping(skip)),
        ]
        .into_iter()
        .map(|(k, v)| (Value::from(k), v))
        .collect();
        Ok(serde_yaml::to_string(&doc)?)
    }

    /// One replay of `steps` as a scenario on `node`: its iteration.
    fn replay_on(&self, node: &dyn Node, steps: &[Step]) -> Result<Iteration> {
        let text = self.scenario_text("replay", "a shrinking candidate", steps)?;
        let s: Scenario = serde_yaml::from_str(&text).context("a candidate scenario")?;
        let agent = crate::node::agent(node);
        Ok(crate::scenario::engine::iterate(&s, node, &agent, self.apps, 1, self.seed))
    }

    /// Replays the failing prefix one step at a time; if it fails the same way, shrinks it
    /// and writes the scenario.
    fn found(
        &self,
        explored: &Explored,
        plan: &[Step],
        replay: &dyn Fn(&[Step]) -> Result<Iteration>,
    ) -> Option<Found> {
        let (failure, n) = explored.failure.clone()?;
        let want = signatures(&failure);
        let fails = |steps: &[Step]| match replay(steps) {
            Ok(it) => {
                let same = it.failures.iter().any(|f| signatures(f).iter().any(|s| want.contains(s)));
                let what: String =
                    it.failures.first().or(it.unknowns.first()).map_or("", |s| s).chars().take(160).collect();
                eprintln!(
                    "archy-chaos: replay of {} steps: {} {what}",
                    steps.len(),
                    if same { "fails the same way:" } else { it.verdict.name() }
                );
                it.verdict == Verdict::Fail && same
            }
            Err(e) => {
                eprintln!("archy-chaos: a replay could not run: {e:#}");
                false
            }
        };
        let prefix = as_happened(&plan[..n], &explored.history);
        let mut found =
            Found { failure: failure.clone(), steps: n, reproduced: false, shrunk: None, scenario: None };
        if self.args.shrink_budget.is_zero() {
            return Some(found);
        }
        eprintln!("archy-chaos: found after {n} steps: {failure}\narchy-chaos: replaying the {n} steps one at a time");
        // Twice before giving up: what a race found may need a second chance to show.
        found.reproduced = fails(&prefix) || fails(&prefix);
        if !found.reproduced {
            eprintln!("archy-chaos: the failure did not reproduce sequentially; the report keeps the concurrent history");
            return Some(found);
        }
        let (min, shrunk) = shrink::ddmin(prefix, self.args.shrink_budget, fails);
        eprintln!(
            "archy-chaos: shrunk {} -> {} steps in {} replays",
            shrunk.original_len, shrunk.minimal_len, shrunk.replays
        );
        let id = format!("found-{}-{}", self.seed, n);
        let short: String = failure.chars().take(300).collect();
        let description = format!(
            "Found by `{}`: {short}. Shrunk from {} to {} steps in {} replays.",
            self::replay(self.args, self.seed),
            shrunk.original_len,
            shrunk.minimal_len,
            shrunk.replays
        );
        match self.write_found(&id, &description, &min) {
            Ok(p) => found.scenario = Some(p.display().to_string()),
            Err(e) => eprintln!("archy-chaos: cannot write the found scenario: {e:#}"),
        }
        found.shrunk = Some(shrunk);
        Some(found)
    }

    fn write_found(&self, id: &str, description: &str, steps: &[Step]) -> Result<PathBuf> {
        std::fs::create_dir_all(&self.args.found_dir)
            .with_context(|| format!("creating {}", self.args.found_dir.display()))?;
        let path = self.args.found_dir.join(format!("{id}.yml"));
        let text = self.scenario_text(id, description, steps)?;
        std::fs::write(
            &path,
            format!("# Written by archy-chaos explore; replay: archy-chaos run found/{id}\n{text}"),
        )
        .with_context(|| format!("writing {}", path.display()))?;
        Scenario::load(&path)?; // what was written replays
        Ok(path)
    }

    /// Explores `plan` on `node` until its end, the budget or the first failure.
    fn run(&self, node: &dyn Node, plan: &[Step]) -> Result<Explored> {
        let history = Arc::new(History::default());
        let text = self.scenario_text("explore", "explore", &[Step::WaitReady])?;
        let s: Scenario = serde_yaml::from_str(&text)?;
        let agent = crate::node::agent(node);
        let backend = agent.status().context("asking the agent")?.backend;
        let start = Instant::now();
        let cpu_before = crate::environment::cpu_times();
        let mut seen = Seen::default();
        let mut checks = Vec::new();
        let mut steps_run = 0;
        let bar = indicatif::ProgressBar::new(plan.len() as u64);
        // Segments end at the plan's `check` steps, the quiet points.
        for (k, with_check) in plan.split_inclusive(|s| matches!(s, Step::Check)).enumerate() {
            let segment = match with_check.split_last() {
                Some((Step::Check, rest)) => rest,
                _ => with_check,
            };
            if start.elapsed() >= self.args.budget || crate::interrupt::signal().is_some() {
                break;
            }
            let offset = steps_run;
            let violations = Mutex::new(Vec::new());
            let done = AtomicBool::new(false);
            let queue = Mutex::new(
                segment.iter().cloned().enumerate().map(|(i, s)| (offset + i, s)).collect::<VecDeque<_>>(),
            );
            std::thread::scope(|sc| {
                let sampler =
                    sc.spawn(|| sample(node, self.catalog, self.apps, &history, &done, &violations));
                let clients: Vec<_> = (0..self.args.clients as usize)
                    .map(|c| {
                        let (queue, history, s, bar) = (&queue, &history, &s, &bar);
                        sc.spawn(move || {
                            let agent = crate::node::agent(node);
                            let mut ctx = StepCtx {
                                s,
                                node,
                                agent: &agent,
                                catalog: self.catalog.clone(),
                                backend,
                                apps: self.apps.to_vec(),
                                n: (k * 64 + c) as u32 + 1,
                                rng: rand::rngs::StdRng::seed_from_u64(
                                    self.seed ^ ((k as u64) << 16) ^ c as u64,
                                ),
                                memory: Memory { history: history.clone(), ..Memory::default() },
                            };
                            loop {
                                let pause = ctx.rng.random_range(0.0..=self.args.stagger.as_secs_f64());
                                std::thread::sleep(Duration::from_secs_f64(pause));
                                let next = queue.lock().unwrap_or_else(|e| e.into_inner()).pop_front();
                                let Some((i, step)) = next else { break };
                                perform(&mut ctx, history, i, c, &step, self.args.converge_timeout);
                                bar.inc(1);
                            }
                        })
                    })
                    .collect();
                for c in clients {
                    let _ = c.join();
                }
                done.store(true, Ordering::SeqCst);
                let _ = sampler.join();
            });
            steps_run += with_check.len();
            let entries = history.entries();
            let mut failures: Vec<String> = violations.into_inner().unwrap_or_default();
            let timeout = self.args.converge_timeout;
            let check = checker::check(node, &agent, self.catalog, self.apps, &entries, &mut seen, timeout);
            let mut unknowns = Vec::new();
            match check {
                // A check cut short by Ctrl-C proves nothing either way.
                Err(e) if crate::interrupt::signal().is_some() => unknowns.push(format!("{e:#}")),
                Err(e) => failures.push(format!("{e:#}")),
                Ok(()) => {}
            }
            let records: Vec<StepRecord> = entries
                .iter()
                .filter(|e| e.index >= offset && e.index < steps_run)
                .map(|e| StepRecord {
                    step: serde_json::to_value(&e.step).unwrap_or_default(),
                    seconds: Some(e.completed - e.invoked),
                    evidence: Some(
                        crate::evidence::Evidence::default()
                            .with("outcome", e.outcome)
                            .with("client", e.client)
                            .with("message", &e.message),
                    ),
                    error: None,
                })
                .collect();
            let verdict = match (failures.is_empty(), unknowns.is_empty()) {
                (false, _) => Verdict::Fail,
                (true, false) => Verdict::Unknown,
                (true, true) => Verdict::Pass,
            };
            // Enough to tell which defect of the agent a failure is: its log, what it says of
            // its apps and what its state file holds (never used to judge, only to explain).
            let log = match failures.is_empty() {
                true => String::new(),
                false => format!(
                    "{}\n--- the agent's package.list: {}\n--- data/{}: {}",
                    node.log(300).unwrap_or_default(),
                    agent
                        .list()
                        .map(|l| serde_json::to_string(&l).unwrap_or_default())
                        .unwrap_or_else(|e| e.to_string()),
                    archy_agent::store::STATE_FILE,
                    node.read(&format!("data/{}", archy_agent::store::STATE_FILE))
                        .ok()
                        .flatten()
                        .map(|b| String::from_utf8_lossy(&b).into_owned())
                        .unwrap_or_default()
                ),
            };
            checks.push(Iteration {
                n: k as u32 + 1,
                apps: self.apps.to_vec(),
                per_app: false,
                verdict,
                steps: records,
                failures: failures.clone(),
                unknowns,
                measures: Default::default(),
                log,
                seconds: 0.0,
            });
            if !failures.is_empty() {
                bar.finish_and_clear();
                return Ok(Explored {
                    history: history.entries(),
                    checks,
                    steps_run,
                    failure: Some((failures.join("; "), steps_run)),
                    environment: Some(crate::environment::environment(node, cpu_before)),
                });
            }
        }
        bar.finish_and_clear();
        Ok(Explored {
            history: history.entries(),
            checks,
            steps_run,
            failure: None,
            environment: Some(crate::environment::environment(node, cpu_before)),
        })
    }
}

/// The steps in the order the clients invoked them (between two checks, a later step may
/// have started first), each after the idle time the exploration had before it (a `sleep`
/// step, when it was 100 ms or more: the agent may have acted in it), so the sequential
/// replay meets the agent as the exploration did.
fn as_happened(steps: &[Step], history: &[Entry]) -> Vec<Step> {
    let entry = |i: usize| history.iter().find(|e| e.index == i);
    let invoked = |i: usize| entry(i).map_or(f64::MAX, |e| e.invoked);
    let mut out = Vec::with_capacity(steps.len());
    let mut base = 0;
    for segment in steps.split_inclusive(|s| matches!(s, Step::Check)) {
        let (body, check) = match segment.split_last() {
            Some((Step::Check, body)) => (body, Some(Step::Check)),
            _ => (segment, None),
        };
        let mut order: Vec<usize> = (base..base + body.len()).collect();
        order.sort_by(|a, b| invoked(*a).total_cmp(&invoked(*b)));
        let mut idle_from: Option<f64> = None;
        for i in order {
            let e = entry(i);
            if let (Some(from), Some(e)) = (idle_from, e) {
                let idle = ((e.invoked - from) * 10.0).floor() / 10.0;
                if idle >= 0.1 {
                    let duration = archy_agent::manifest::Dur(Duration::from_secs_f64(idle));
                    out.push(Step::Sleep { duration });
                }
            }
            idle_from = e.map(|e| e.completed).or(idle_from);
            out.push(steps[i].clone());
        }
        out.extend(check);
        base += segment.len();
    }
    out
}

/// One step by client `c`, recorded in the history whatever happens.
fn perform(ctx: &mut StepCtx, history: &History, i: usize, c: usize, step: &Step, patience: Duration) {
    match step {
        Step::Op { op, app } => {
            history::request(ctx.agent, history, i, c, *op, app.as_deref(), patience);
        }
        Step::Catalog { change, app } => {
            let _ = steps::catalog_change(ctx.node, history, i, c, *change, app);
        }
        _ => {
            let invoked = history.now();
            let result = steps::run(ctx, step);
            history.record(Entry::of_step(i, c, step, invoked, history, &result));
        }
    }
}

/// Until `done`: what must never be seen even for a moment. Two containers for one app; a
/// secret readable by others still so after a tick that began after it was first seen so
/// (the agent had its chance and did not heal it); an app the agent has just called up that
/// does not answer while podman says its container runs unhealthy (up before its health check
/// passed).
fn sample(
    node: &dyn Node,
    catalog: &Catalog,
    apps: &[String],
    history: &History,
    done: &AtomicBool,
    violations: &Mutex<Vec<String>>,
) {
    let agent = crate::node::agent(node);
    let mut exposed: std::collections::BTreeMap<String, f64> = Default::default();
    let mut was_up: BTreeSet<String> = BTreeSet::new();
    let now = || SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
    while !done.load(Ordering::SeqCst) && crate::interrupt::signal().is_none() {
        std::thread::sleep(Duration::from_secs(2));
        let mut found = Vec::new();
        if let Ok(cs) = checker::containers(node) {
            for app in apps {
                let n = cs.iter().filter(|c| &c.app == app).count();
                if n > 1 {
                    found.push(format!("sampled: {app} had {n} containers at once"));
                }
            }
        }
        let up: BTreeSet<String> =
            agent.list().map(|l| l.into_iter().filter(|a| a.up).map(|a| a.id).collect()).unwrap_or_default();
        // The agent's list is its last tick's: a fault since (a container killed and restarted
        // by systemd) can make a stale "up" look early. Judged in quiet moments only.
        let at = history.now();
        let quiet = !history.entries().iter().any(|e| e.step.is_fault() && at - e.completed < 10.0);
        for app in up.difference(&was_up).filter(|_| quiet) {
            if !checker::answers(node, catalog, app).unwrap_or(true) {
                let cs = checker::containers(node).unwrap_or_default();
                if cs.iter().any(|c| &c.app == app && c.running && c.health.as_deref() != Some("healthy")) {
                    found.push(format!("sampled: the agent said {app} up while it did not answer and podman called it unhealthy"));
                }
            }
        }
        was_up = up;
        let last_tick = agent.status().ok().and_then(|s| s.last_tick_at);
        // Secrets are the agent's to heal while their app is installed (by the history) and
        // its manifest loads (explore seed 406: a broken manifest's secrets are unknown to it).
        let models = checker::model(&history.entries(), apps, &[], catalog);
        let installed = |app: &String| {
            models.get(app).is_some_and(|m| {
                m.manifest == crate::scenario::history::InCatalog::Valid
                    && m.certain().is_some_and(|d| d != crate::scenario::history::Desired::Absent)
            })
        };
        for app in apps.iter().filter(|a| !NEVER_HEALTHY.contains(&a.as_str()) && installed(a)) {
            for f in node.list(&format!("data/secrets/{app}")).unwrap_or_default() {
                if f.starts_with('.') {
                    continue;
                }
                let key = format!("{app}/{f}");
                let open = node
                    .stat(&format!("data/secrets/{key}"))
                    .ok()
                    .flatten()
                    .is_some_and(|st| st.mode & 0o077 != 0);
                match (open, exposed.get(&key)) {
                    (false, _) => {
                        exposed.remove(&key);
                    }
                    (true, None) => {
                        exposed.insert(key, now());
                    }
                    (true, Some(&since)) => {
                        // A tick that began after we saw it (ticks take < 2 s) and left it.
                        if last_tick.is_some_and(|t| t > since + 2.0) {
                            found.push(format!(
                                "sampled: secret {key} stayed readable by others across a tick"
                            ));
                        }
                    }
                }
            }
        }
        if !found.is_empty() {
            let mut v = violations.lock().unwrap_or_else(|e| e.into_inner());
            for f in found {
                if !v.contains(&f) {
                    v.push(f);
                }
            }
        }
    }
}

/// A failure's kinds, to tell whether a replay fails the same way: each `; `-separated part
/// up to its first comma, without the app or secret it names (a replay may hit another app
/// the same way) and without digits (`desired running`, `liveness: the agent completed...`).
fn signatures(failure: &str) -> BTreeSet<String> {
    failure
        .trim_start_matches("model: ")
        .trim_start_matches("check: ")
        .split("; ")
        .map(|p| {
            let p = p.split(',').next().unwrap_or(p);
            let p = match p.split_once(": ") {
                // An app or `app/secret`; `liveness:` and `sampled:` are kinds themselves.
                Some((subject, rest))
                    if !subject.contains(' ') && !["liveness", "sampled"].contains(&subject) =>
                {
                    rest
                }
                _ => p,
            };
            p.chars().filter(|c| !c.is_ascii_digit()).collect::<String>().trim().to_string()
        })
        .filter(|p| !p.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_replay_takes_the_steps_in_the_order_they_were_invoked_between_checks() {
        let op = |app: &str| Step::Op { op: crate::scenario::ApiOp::Install, app: Some(app.into()) };
        let steps = [op("a"), op("b"), Step::Check, op("c"), Step::RestartAgent];
        let at = |index: usize, invoked: f64| Entry {
            index,
            client: 0,
            step: steps[index].clone(),
            invoked,
            completed: invoked,
            outcome: crate::scenario::history::Outcome::Ok,
            message: String::new(),
        };
        let history = [at(0, 2.0), at(1, 1.0), at(3, 5.0), at(4, 4.0)];
        let names: Vec<String> = as_happened(&steps, &history)
            .iter()
            .map(|s| match s {
                Step::Op { app, .. } => app.clone().unwrap_or_default(),
                Step::Sleep { duration } => format!("sleep {:?}", duration.0),
                s => s.name(),
            })
            .collect();
        // With the idle time between them: b ended at 1.0, a began at 2.0.
        assert_eq!(names, ["b", "sleep 1s", "a", "check", "restart-agent", "sleep 1s", "c"]);
    }

    #[test]
    fn a_failure_and_its_replay_have_the_same_signature() {
        let a = signatures("model: fx-web: desired running, but its container is None; liveness: the agent completed no reconcile tick in the 61 s of this check (last at unix 1764.5)");
        let b = signatures("fx-web: desired running, but its container is Some(..); liveness: the agent completed no reconcile tick in the 45 s of this check (last at unix 1799.1)");
        assert_eq!(a, b);
        // Another app failing the same way is the same failure; another way is not.
        assert!(signatures("fx-client: desired running, but ...").iter().all(|s| a.contains(s)));
        assert!(!signatures("fx-client: desired stopped, but its container runs")
            .iter()
            .any(|s| a.contains(s)));
    }
}
