//! `archy-agent`: the thin binary over the `archy_agent` library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use archy_agent::manifest::{Catalog, Problems};
use archy_agent::quadlet::{self, PodmanVersion};
use archy_agent::secrets::{self, Outcome};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "archy-agent", version, about = "On-node agent for rootless Podman/Quadlet apps")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent: reconciler, JSON-RPC API and metrics. Run it as the service user.
    Run(Box<archy_agent::config::RunArgs>),
    /// Check that this user and host can run rootless apps; names each problem and its fix.
    Doctor(Box<archy_agent::config::RunArgs>),
    /// Validate every manifest of a catalog; exits 1 listing every problem found.
    Check {
        /// Catalog directory holding `<id>/manifest.yml`.
        #[arg(default_value = "apps")]
        dir: PathBuf,
    },
    /// Print the Quadlet `.container` unit of one app.
    Render {
        app: String,
        #[arg(long, default_value = "apps")]
        catalog: PathBuf,
        /// Version of the podman that will run the container (e.g. `podman --version` on the node).
        #[arg(long, default_value = "4.3.1")]
        podman_version: PodmanVersion,
        /// Node data root: app data in `DATA_ROOT/apps/<id>`, secrets in `DATA_ROOT/secrets`.
        #[arg(long, default_value = "/var/lib/archy")]
        data_root: PathBuf,
    },
    /// Operator commands for generated secrets.
    Secrets {
        #[command(subcommand)]
        command: SecretsCommand,
    },
}

#[derive(Subcommand)]
enum SecretsCommand {
    /// Create missing and heal damaged secrets of one app; never rotates a valid one.
    /// Run it as the service user: the files it writes are owned by whoever runs it.
    Ensure {
        app: String,
        /// Secrets root; the app's secrets go to `DIR/<app>/`. Created 0700 if missing; an
        /// existing one must be the user's with mode 0700 (it is never chmod-ed).
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value = "apps")]
        catalog: PathBuf,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("ARCHY_LOG"))
        .with_writer(std::io::stderr)
        // Colours only on a terminal: under systemd the log is read from files and journals.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes, each said once: the crate's errors already show their source
/// in their own message, which anyhow's `{:#}` would print a second time.
fn chain(e: &anyhow::Error) -> String {
    let mut out = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !out.contains(&cause) {
            out = format!("{out}: {cause}");
        }
    }
    out
}

fn load(dir: &std::path::Path) -> Result<Catalog> {
    Catalog::load(dir).map_err(|Problems(p)| {
        let n = p.len();
        anyhow::anyhow!("{}\n{n} problem(s) in catalog {}", Problems(p), dir.display())
    })
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Run(args) => {
            let config = archy_agent::config::Config::resolve(*args)?;
            return archy_agent::agent::run(config).map(|()| ExitCode::SUCCESS);
        }
        Command::Doctor(args) => {
            let config = archy_agent::config::Config::resolve(*args)?;
            let ok = archy_agent::doctor::run(&config);
            return Ok(if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE });
        }
        Command::Check { dir } => {
            let catalog = load(&dir)?;
            println!("{}: {} apps, all valid", dir.display(), catalog.apps.len());
        }
        Command::Render { app, catalog, podman_version, data_root } => {
            let catalog = load(&catalog)?;
            let m = catalog.get(&app).with_context(|| format!("no app `{app}` in the catalog"))?;
            let unit = quadlet::render(m, &quadlet::Target::new(podman_version, data_root));
            print!("{}", unit.text);
        }
        Command::Secrets { command: SecretsCommand::Ensure { app, dir, catalog } } => {
            let catalog = load(&catalog)?;
            let m = catalog.get(&app).with_context(|| format!("no app `{app}` in the catalog"))?;
            // Everything that can refuse does so before anything is written.
            secrets::check_root(&dir)?;
            let missing = secrets::check_complete(&dir, m, &catalog)?;
            for i in &missing {
                println!(
                    "{app}: reads {} which is {}: run `archy-agent secrets ensure {}` first",
                    i.reference,
                    i.reason.as_str(),
                    i.reference.app
                );
            }
            if !missing.is_empty() {
                return Ok(ExitCode::from(3));
            }
            for e in secrets::ensure(&dir, m)? {
                let what = match e.outcome {
                    Outcome::Kept => "kept".to_string(),
                    Outcome::Generated => "generated".to_string(),
                    Outcome::Healed(r) => format!("healed ({})", r.as_str()),
                };
                println!("{app}/{} ({}): {what}", e.target, e.kind.as_str());
            }
            secrets::write_env_file(&dir, m)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
