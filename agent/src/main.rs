//! `bmfleet-agent --config FILE`: serves the Agent API (and data plane) of this host.
//! `bmfleet-agent tunnel HOST COMMAND…`: rsync's remote shell on a target, connecting to an
//! origin's data plane (settings from `BMFLEET_TUNNEL_*`, set by the pulling agent).
//! `bmfleet-agent enroll …` / `configure …`: onboarding (see onboard.rs).

mod onboard;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use bmfleet_agent::config::AgentConfig;
use bmfleet_agent::files::pull::env;
use bmfleet_agent::plane::tunnel::{self, TunnelRequest};
use bmfleet_proto::identity::Role;
use bmfleet_proto::process::{init_daemon, shutdown_signal};
use bmfleet_proto::tls::{LocalIdentity, TlsFiles};
use bmfleet_proto::v1::OriginEndpoint;
use clap::{Parser, Subcommand};
use tokio::io::AsyncWriteExt;

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
    #[command(subcommand)]
    mode: Option<Mode>,
}

#[derive(Subcommand)]
enum Mode {
    /// rsync's remote shell: connect to the origin's data plane (used by the agent itself).
    Tunnel {
        /// The host rsync names (ignored: the origin comes from the environment).
        host: String,
        /// The remote command rsync wants run.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
    /// Get this host's certificate from the orchestrator with a one-time join token (read on
    /// stdin); the private key is made here and never leaves the host.
    Enroll(onboard::EnrollArgs),
    /// Write agent.toml from a base file and what is found on this host.
    Configure(onboard::ConfigureArgs),
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("bmfleet-agent: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match args.mode {
        Some(Mode::Tunnel { command, .. }) => {
            bmfleet_proto::install_crypto_provider();
            let result = runtime.block_on(run_tunnel(command));
            // stdin is read on a blocking thread that may still wait: do not wait for it.
            runtime.shutdown_background();
            result
        }
        Some(Mode::Enroll(args)) => {
            bmfleet_proto::install_crypto_provider();
            match runtime.block_on(onboard::enroll(args)) {
                Ok(onboard::Enrolled::Needed) => return ExitCode::from(onboard::NEEDS_ENROLLMENT),
                Ok(onboard::Enrolled::Yes) => Ok(()),
                Err(e) => Err(e),
            }
        }
        Some(Mode::Configure(args)) => runtime.block_on(onboard::configure(args)),
        None => {
            init_daemon();
            runtime.block_on(serve(args.config))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bmfleet-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: PathBuf) -> anyhow::Result<()> {
    let config = AgentConfig::load(&config)?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    bmfleet_agent::server::serve(config, listener, shutdown_signal()).await?;
    Ok(())
}

fn var(name: &str) -> anyhow::Result<String> {
    std::env::var(name)
        .with_context(|| format!("{name} is not set (the tunnel is started by a pulling agent)"))
}

/// Pipes stdin/stdout to the origin's data plane, as rsync's remote shell.
async fn run_tunnel(command: Vec<String>) -> anyhow::Result<()> {
    let files = TlsFiles {
        ca: var(env::CA)?.into(),
        cert: var(env::CERT)?.into(),
        key: var(env::KEY)?.into(),
        crl: std::env::var_os(env::CRL).map(Into::into),
    };
    let origin = OriginEndpoint {
        address: var(env::ADDRESS)?,
        name: var(env::NAME)?,
        grant_id: var(env::GRANT)?,
    };
    let timeout = Duration::from_secs(var(env::TIMEOUT)?.parse().unwrap_or(15));
    let tls = LocalIdentity::load(&files, Role::Agent)?.client_config(Role::Agent)?;
    let request = TunnelRequest::Rsync {
        grant: origin.grant_id.clone(),
        argv: command,
        journal_since: std::env::var(env::JOURNAL_SINCE).unwrap_or_default(),
    };
    let mut stream = tunnel::open(&origin, tls, &request, timeout).await?;
    let (mut input, mut output) = local_stdio()?;
    // Inverse of the origin's relay: what the origin sends ends the tunnel.
    let (mut from_origin, mut to_origin) = tokio::io::split(&mut stream);
    let outbound = async move {
        let _ = tokio::io::copy(&mut input, &mut to_origin).await;
        let _ = to_origin.shutdown().await;
    };
    let inbound = async move {
        let copied = tokio::io::copy(&mut from_origin, &mut output).await;
        output.shutdown().await.and(copied)
    };
    tokio::pin!(inbound, outbound);
    let copied = tokio::select! {
        copied = &mut inbound => copied,
        _ = &mut outbound => inbound.await,
    };
    copied.context("tunnel to the origin broke")?;
    Ok(())
}

type Input = Box<dyn tokio::io::AsyncRead + Unpin + Send>;
type Output = Box<dyn tokio::io::AsyncWrite + Unpin + Send>;

/// rsync hands its remote shell non-blocking unix sockets as stdin and stdout: drive them as
/// sockets. Anything else (a pipe, a terminal) is read and written in blocking mode.
fn local_stdio() -> anyhow::Result<(Input, Output)> {
    use std::os::fd::AsFd;
    fn socket(fd: std::os::fd::BorrowedFd<'_>) -> anyhow::Result<Option<tokio::net::UnixStream>> {
        let file = std::fs::File::from(fd.try_clone_to_owned()?);
        if !std::os::unix::fs::FileTypeExt::is_socket(&file.metadata()?.file_type()) {
            return Ok(None);
        }
        let stream = std::os::unix::net::UnixStream::from(std::os::fd::OwnedFd::from(file));
        stream.set_nonblocking(true)?;
        Ok(Some(tokio::net::UnixStream::from_std(stream)?))
    }
    let input: Input = match socket(std::io::stdin().as_fd())? {
        Some(s) => Box::new(s),
        None => Box::new(tokio::io::stdin()),
    };
    let output: Output = match socket(std::io::stdout().as_fd())? {
        Some(s) => Box::new(s),
        None => Box::new(tokio::io::stdout()),
    };
    Ok((input, output))
}
