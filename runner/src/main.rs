//! `archy-chaos`: runs L3 lifecycle-survival, L5 chaos and L6 performance scenarios
//! against a node and gates a release on the result.

mod bench;

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
    /// Run a scenario against the local node-in-a-box (the default) and gate on its verdict.
    Run {
        /// Scenario id, e.g. `reboot-survive`.
        scenario: String,
    },
    /// Benchmarks, each figure beside its raw-podman baseline measured in the same run.
    Bench {
        #[command(subcommand)]
        what: BenchWhat,
    },
}

#[derive(Subcommand)]
enum BenchWhat {
    /// The agent (podman backend): no-op tick, install latency, podman calls, start-up, RSS.
    /// Run as root (it switches to the service user) after scripts/setup-host.
    Agent(bench::BenchArgs),
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Run { scenario } => {
            // The scenario engine and the local node arrive with their own issues; until
            // then every run is honestly "unknown", never a pass.
            eprintln!("archy-chaos: cannot run `{scenario}`: the scenario engine is not built yet (verdict: unknown)");
            ExitCode::from(EXIT_UNKNOWN)
        }
        Command::Bench { what: BenchWhat::Agent(args) } => match bench::agent(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("archy-chaos: bench failed: {e:#}");
                ExitCode::from(EXIT_UNKNOWN)
            }
        },
    }
}
