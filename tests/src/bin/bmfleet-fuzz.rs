//! `bmfleet-fuzz [TARGET…] [--secs N] [--seed S]`: a fuzz campaign over the parsers of input
//! from outside a process (see `bmfleet_tests::fuzz`). Every target when none is named; exits
//! non-zero at the first finding, whose input is kept under `target/fuzz-findings/`.

use std::process::ExitCode;
use std::time::Duration;

use bmfleet_tests::fuzz;
use clap::Parser;

#[derive(Parser)]
#[command(about)]
struct Args {
    /// Targets to run (default: all): fleet_file, agent_config, orchestrator_config,
    /// tunnel_request, rsync_argv, tunnel_framing, manifests, mynetworks, join_token,
    /// signing_request.
    targets: Vec<String>,
    /// Seconds per target.
    #[arg(long, default_value_t = 600)]
    secs: u64,
    /// The campaign's seed (a run replays exactly from it).
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let findings = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/fuzz-findings");
    let mut failed = false;
    for target in fuzz::targets() {
        if !args.targets.is_empty() && !args.targets.iter().any(|t| t == target.name) {
            continue;
        }
        let corpus = fuzz::corpus(&fuzz::corpus_dir(), target.name);
        let report = fuzz::campaign(
            &target,
            &corpus,
            Duration::from_secs(args.secs),
            args.seed,
            &findings,
        );
        match &report.finding {
            None => println!(
                "{:<20} {:>10} inputs ({} in the corpus), seed {}: no crash, panic or hang",
                report.target, report.executions, report.corpus, args.seed
            ),
            Some(f) => {
                failed = true;
                println!(
                    "{:<20} FINDING after {} inputs: {} (input: {})",
                    report.target,
                    report.executions,
                    f.what,
                    f.input.display()
                );
            }
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
