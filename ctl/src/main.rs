//! `bmctl`: the operator's command line for a bmfleet fleet.

mod agents;
mod control;
mod enroll;
mod pki;
mod plan;
mod report;
mod status;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use bmfleet_proto::error_chain::describe_status;
use bmfleet_proto::identity::Role;
use bmfleet_proto::tls::{connect, LocalIdentity, TlsFiles};
use bmfleet_proto::v1::fleet_client::FleetClient;
use clap::{Args, Parser, Subcommand, ValueEnum};
use tonic::transport::Channel;

/// Drive and watch a bmfleet migration fleet.
#[derive(Parser)]
#[command(name = "bmctl", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Top,
}

#[derive(Subcommand)]
enum Top {
    /// Fleet operations.
    Fleet {
        #[command(subcommand)]
        command: Box<FleetCommand>,
    },
    /// Print a shell completion script (bash, zsh, fish, …) on stdout.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

/// Which hosts `enroll` and `decommission` work on.
#[derive(Args)]
struct Hosts {
    /// An inventory file (TOML: [defaults] and [[host]] entries; see README "Onboard a fleet").
    #[arg(long)]
    inventory: Option<PathBuf>,
    /// Hosts as DEST=NAME:origin|target (DEST: an ssh destination), besides the inventory's.
    #[arg(value_name = "HOST")]
    hosts: Vec<String>,
    /// Only these agent names of the inventory. Repeatable.
    #[arg(long = "only", value_name = "NAME")]
    only: Vec<String>,
    /// Hosts worked on at once.
    #[arg(long, default_value_t = 16)]
    parallel: usize,
}

impl Hosts {
    fn inventory(&self) -> anyhow::Result<enroll::Inventory> {
        let mut inventory = match &self.inventory {
            Some(path) => enroll::Inventory::load(path)?,
            None => enroll::Inventory::default(),
        };
        inventory
            .host
            .extend(enroll::Inventory::from_args(&self.hosts)?.host);
        Ok(inventory)
    }
}

#[derive(Subcommand)]
enum FleetCommand {
    /// The fleet PKI: make the CA, issue certificates.
    Pki {
        #[command(subcommand)]
        command: pki::PkiCommand,
    },
    /// Check a fleet file and print its projected schedule (changes nothing). With connection
    /// settings, the orchestrator's measured passes replace the file's estimates.
    Plan {
        /// The fleet file.
        file: PathBuf,
        #[command(flatten)]
        connection: OptionalConnection,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Start migrating the fleet of a fleet file.
    Apply {
        #[command(flatten)]
        connection: Connection,
        /// The fleet file.
        file: PathBuf,
        /// Migrate this instance again although its target already served (audited; its
        /// preflight proves the origin serves and holds the service IP). Repeatable.
        #[arg(long, value_name = "INSTANCE")]
        remigrate: Vec<String>,
    },
    /// Hold one instance (or the whole fleet with --all): nothing new starts.
    Pause {
        #[command(flatten)]
        connection: Connection,
        /// The instance.
        instance: Option<String>,
        /// The whole fleet.
        #[arg(long)]
        all: bool,
    },
    /// Release one instance (or the whole fleet with --all).
    Resume {
        #[command(flatten)]
        connection: Connection,
        /// The instance.
        instance: Option<String>,
        /// The whole fleet.
        #[arg(long)]
        all: bool,
    },
    /// Withdraw one instance; during its downtime this rolls it back.
    Abort {
        #[command(flatten)]
        connection: Connection,
        /// The instance.
        instance: String,
    },
    /// Let the fleet go on after its canaries.
    Approve {
        #[command(flatten)]
        connection: Connection,
    },
    /// Every transition of the fleet, or of one instance.
    Events {
        #[command(flatten)]
        connection: Connection,
        /// Only this instance.
        instance: Option<String>,
        /// How many of the newest.
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// Keep printing new ones.
        #[arg(long)]
        follow: bool,
        /// Output format (json: one object per line).
        #[arg(long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Every agent's health as the orchestrator sees it.
    Status {
        #[command(flatten)]
        connection: Connection,
        /// One instance's step history with timings.
        instance: Option<String>,
        /// Refresh every 2 s in place (Ctrl-C to stop).
        #[arg(long)]
        watch: bool,
        /// List every instance and agent in the table (by default, at most 50 of each: those
        /// that most need a look first; the totals always cover the whole fleet).
        #[arg(long)]
        all: bool,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// The orchestrator's agents: list, register, remove, issue join tokens.
    Agents {
        #[command(subcommand)]
        command: agents::AgentsCommand,
    },
    /// Install, enroll (one-time join token; the key is made on the host), configure and start
    /// the agent of every host over SSH, register it, and wait until the orchestrator reaches
    /// it. Idempotent.
    Enroll {
        #[command(flatten)]
        connection: Connection,
        #[command(flatten)]
        hosts: Hosts,
        /// Hosts whose agent is enrolled already but lost its identity (reinstalled) get a
        /// new certificate; the old one is revoked. Without it they are refused.
        #[arg(long)]
        reenroll: bool,
    },
    /// After Done: stop and remove the agents of an instance's hosts over SSH, revoke their
    /// certificates and remove them from the orchestrator.
    Decommission {
        #[command(flatten)]
        connection: Connection,
        /// The instances (their origin and target hosts must be in the inventory).
        #[arg(long = "instance", value_name = "INSTANCE")]
        instances: Vec<String>,
        /// Every Done instance.
        #[arg(long)]
        all_done: bool,
        #[command(flatten)]
        hosts: Hosts,
    },
    /// The audit log of Fleet API calls.
    /// The migration report: per instance its timeline, downtime and its split, bytes and
    /// files moved, the databases' gate, the final checks' evidence, BlueMind's tasks,
    /// problems and what came of them, operator acts; the fleet's windows drawn on a time
    /// axis (HTML).
    Report {
        #[command(flatten)]
        connection: Connection,
        /// Only these instances (default: every instance of the applied fleet).
        instances: Vec<String>,
        /// html (one self-contained file), md or json.
        #[arg(long, value_enum, default_value_t = report::Format::Html)]
        format: report::Format,
        /// Write it here (default: standard output).
        #[arg(long)]
        output: Option<std::path::PathBuf>,
        /// Checks made outside bmfleet to show beside each instance's own (a JSON object:
        /// instance name → list of lines, e.g. a mail check's counts).
        #[arg(long)]
        attach: Option<std::path::PathBuf>,
    },
    Audit {
        #[command(flatten)]
        connection: Connection,
        /// How many of the newest entries.
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Only entries older than this id (the first ID of the page shown before).
        #[arg(long, default_value_t = 0)]
        before: i64,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
}

/// Table for people, JSON for tools.
#[derive(Clone, Copy, ValueEnum)]
pub enum Output {
    /// Aligned columns.
    Table,
    /// One JSON document (schema documented in README.md).
    Json,
}

/// How to reach the orchestrator's Fleet API.
#[derive(Args)]
struct Connection {
    /// host:port of the Fleet API.
    #[arg(long, env = "BMFLEET_ORCHESTRATOR", default_value = "127.0.0.1:7400")]
    orchestrator: String,
    /// The name the orchestrator's certificate must carry.
    #[arg(
        long,
        env = "BMFLEET_ORCHESTRATOR_NAME",
        default_value = "orchestrator"
    )]
    orchestrator_name: String,
    /// The fleet CA certificate.
    #[arg(long, env = "BMFLEET_CA")]
    ca: PathBuf,
    /// Your operator certificate.
    #[arg(long, env = "BMFLEET_CERT")]
    cert: PathBuf,
    /// Your operator private key.
    #[arg(long, env = "BMFLEET_KEY")]
    key: PathBuf,
    /// Seconds to wait for the orchestrator.
    #[arg(long, env = "BMFLEET_TIMEOUT", default_value_t = 10)]
    timeout: u64,
}

/// Connection settings that may be absent (`bmctl fleet plan` works without an orchestrator).
#[derive(Args)]
struct OptionalConnection {
    /// host:port of the Fleet API.
    #[arg(long, env = "BMFLEET_ORCHESTRATOR", default_value = "127.0.0.1:7400")]
    orchestrator: String,
    /// The name the orchestrator's certificate must carry.
    #[arg(
        long,
        env = "BMFLEET_ORCHESTRATOR_NAME",
        default_value = "orchestrator"
    )]
    orchestrator_name: String,
    /// The fleet CA certificate.
    #[arg(long, env = "BMFLEET_CA")]
    ca: Option<PathBuf>,
    /// Your operator certificate.
    #[arg(long, env = "BMFLEET_CERT")]
    cert: Option<PathBuf>,
    /// Your operator private key.
    #[arg(long, env = "BMFLEET_KEY")]
    key: Option<PathBuf>,
    /// Seconds to wait for the orchestrator.
    #[arg(long, env = "BMFLEET_TIMEOUT", default_value_t = 5)]
    timeout: u64,
}

impl OptionalConnection {
    /// The connection, when the identity is given.
    fn complete(self) -> Option<Connection> {
        Some(Connection {
            orchestrator: self.orchestrator,
            orchestrator_name: self.orchestrator_name,
            ca: self.ca?,
            cert: self.cert?,
            key: self.key?,
            timeout: self.timeout,
        })
    }
}

impl Connection {
    fn client(&self) -> anyhow::Result<FleetClient<Channel>> {
        let files = TlsFiles {
            ca: self.ca.clone(),
            cert: self.cert.clone(),
            key: self.key.clone(),
            crl: None,
        };
        let identity = LocalIdentity::load(&files, Role::Operator)
            .context("your operator identity is not usable")?;
        let config = identity.client_config(Role::Orchestrator)?;
        let channel = connect(
            &self.orchestrator,
            &self.orchestrator_name,
            config,
            Duration::from_secs(self.timeout),
        )?;
        Ok(FleetClient::new(channel))
    }

    /// Awaits a Fleet call within the timeout; a failure becomes an operator-readable error.
    async fn call<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, tonic::Status>>,
    ) -> anyhow::Result<T> {
        let failed = |why: String| {
            anyhow::anyhow!(
                "the orchestrator at {} did not answer: {why}",
                self.orchestrator
            )
        };
        match tokio::time::timeout(Duration::from_secs(self.timeout), call).await {
            Ok(Ok(reply)) => Ok(reply),
            // It answered, and said no.
            Ok(Err(status))
                if !matches!(
                    status.code(),
                    tonic::Code::Unavailable
                        | tonic::Code::Unknown
                        | tonic::Code::DeadlineExceeded
                        | tonic::Code::Cancelled
                ) =>
            {
                Err(anyhow::anyhow!(
                    "the orchestrator at {} refused: {}",
                    self.orchestrator,
                    describe_status(&status)
                ))
            }
            Ok(Err(status)) => Err(failed(describe_status(&status))),
            Err(_) => Err(failed(format!("no answer within {}s", self.timeout))),
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    bmfleet_proto::install_crypto_provider();
    let cli = Cli::parse();
    let command = match cli.command {
        Top::Fleet { command } => *command,
        Top::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(shell, &mut Cli::command(), "bmctl", &mut std::io::stdout());
            return ExitCode::SUCCESS;
        }
    };
    let result = match command {
        FleetCommand::Pki { command } => pki::run(command),
        FleetCommand::Plan {
            file,
            connection,
            output,
        } => plan::run(&file, connection.complete(), output).await,
        FleetCommand::Apply {
            connection,
            file,
            remigrate,
        } => control::apply(&connection, &file, remigrate).await,
        FleetCommand::Pause {
            connection,
            instance,
            all,
        } => control::target(&connection, control::Verb::Pause, instance, all).await,
        FleetCommand::Resume {
            connection,
            instance,
            all,
        } => control::target(&connection, control::Verb::Resume, instance, all).await,
        FleetCommand::Abort {
            connection,
            instance,
        } => control::target(&connection, control::Verb::Abort, Some(instance), false).await,
        FleetCommand::Approve { connection } => control::approve(&connection).await,
        FleetCommand::Events {
            connection,
            instance,
            limit,
            follow,
            output,
        } => control::events(&connection, instance, limit, follow, output).await,
        FleetCommand::Status {
            connection,
            instance,
            watch,
            all,
            output,
        } => status::status(&connection, output, instance, watch, all).await,
        FleetCommand::Report {
            connection,
            instances,
            format,
            output,
            attach,
        } => report::report(&connection, instances, format, output, attach).await,
        FleetCommand::Audit {
            connection,
            limit,
            before,
            output,
        } => status::audit(&connection, limit, before, output).await,
        FleetCommand::Agents { command } => agents::run(command).await,
        FleetCommand::Enroll {
            connection,
            hosts,
            reenroll,
        } => match hosts.inventory() {
            Ok(inventory) => {
                enroll::enroll(connection, inventory, &hosts.only, hosts.parallel, reenroll).await
            }
            Err(e) => Err(e),
        },
        FleetCommand::Decommission {
            connection,
            instances,
            all_done,
            hosts,
        } => match hosts.inventory() {
            Ok(inventory) => {
                enroll::decommission(connection, inventory, &instances, all_done, hosts.parallel)
                    .await
            }
            Err(e) => Err(e),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bmctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}
