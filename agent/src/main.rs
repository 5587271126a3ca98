//! `bmfleet-agent --config FILE`: serves the Agent API of this host.

use std::path::PathBuf;

use anyhow::Context;
use bmfleet_agent::config::AgentConfig;
use bmfleet_proto::process::{init_daemon, shutdown_signal};
use clap::Parser;

/// The bmfleet agent of an origin or target host.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// The agent's configuration file (TOML).
    #[arg(
        long,
        env = "BMFLEET_AGENT_CONFIG",
        default_value = "/etc/bmfleet/agent.toml"
    )]
    config: PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    init_daemon();
    let config = AgentConfig::load(&args.config)?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    bmfleet_agent::server::serve(config, listener, shutdown_signal()).await?;
    Ok(())
}
