//! `bmfleet-orchestrator --config FILE`: the central bmfleet service.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use bmfleet_orchestrator::clock::SystemClock;
use bmfleet_orchestrator::config::OrchestratorConfig;
use bmfleet_proto::process::{init_daemon, shutdown_signal};
use clap::Parser;

/// The bmfleet orchestrator.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// The orchestrator's configuration file (TOML).
    #[arg(
        long,
        env = "BMFLEET_ORCHESTRATOR_CONFIG",
        default_value = "/etc/bmfleet/orchestrator.toml"
    )]
    config: PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    init_daemon();
    let config = OrchestratorConfig::load(&args.config)?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    bmfleet_orchestrator::run(config, listener, Arc::new(SystemClock), shutdown_signal()).await?;
    Ok(())
}
