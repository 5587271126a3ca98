//! `bmctl fleet agents list|add|remove|token`: the orchestrator's agents at run time.

use bmfleet_proto::v1::{
    AddAgentRequest, IssueJoinTokenReply, IssueJoinTokenRequest, RemoveAgentRequest, StatusRequest,
};
use clap::Subcommand;

use crate::status::{table, utc};
use crate::{Connection, Output};

/// What to do with the orchestrator's agents.
#[derive(Subcommand)]
pub enum AgentsCommand {
    /// Every agent: where it listens, where it comes from, its health.
    List {
        #[command(flatten)]
        connection: Connection,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Register an agent (or move a registered one), without restarting the orchestrator.
    Add {
        #[command(flatten)]
        connection: Connection,
        /// Its fleet name (its certificate's).
        name: String,
        /// host:port of its Agent API.
        address: String,
        /// host:port of its data plane (origins: where the target pulls from).
        #[arg(long)]
        data_address: Option<String>,
    },
    /// Forget a registered agent (refused while an unfinished instance uses it).
    Remove {
        #[command(flatten)]
        connection: Connection,
        /// Its fleet name.
        name: String,
        /// Revoke its certificate too.
        #[arg(long)]
        revoke: bool,
    },
    /// Issue a one-time join token for one agent name (printed on stdout; give it to
    /// `bmfleet-agent enroll` on stdin).
    Token {
        #[command(flatten)]
        connection: Connection,
        /// The agent's fleet name.
        name: String,
        /// Lifetime, seconds (default: the orchestrator's).
        #[arg(long, default_value_t = 0)]
        ttl: u32,
        /// The name is an enrolled agent's: the token replaces its certificate (the old one is
        /// revoked at enrollment).
        #[arg(long)]
        reenroll: bool,
    },
}

/// Issues a join token for `name`.
pub async fn token(
    connection: &Connection,
    name: &str,
    ttl_secs: u32,
    reenroll: bool,
) -> anyhow::Result<IssueJoinTokenReply> {
    let mut client = connection.client()?;
    Ok(connection
        .call(client.issue_join_token(IssueJoinTokenRequest {
            name: name.to_string(),
            ttl_secs,
            reenroll,
        }))
        .await?
        .into_inner())
}

/// Registers an agent; returns the orchestrator's answer.
pub async fn add(
    connection: &Connection,
    name: &str,
    address: &str,
    data_address: Option<&str>,
) -> anyhow::Result<String> {
    let mut client = connection.client()?;
    Ok(connection
        .call(client.add_agent(AddAgentRequest {
            name: name.to_string(),
            address: address.to_string(),
            data_address: data_address.unwrap_or_default().to_string(),
        }))
        .await?
        .into_inner()
        .detail)
}

/// Forgets a registered agent; returns the orchestrator's answer.
pub async fn remove(connection: &Connection, name: &str, revoke: bool) -> anyhow::Result<String> {
    let mut client = connection.client()?;
    Ok(connection
        .call(client.remove_agent(RemoveAgentRequest {
            name: name.to_string(),
            revoke,
        }))
        .await?
        .into_inner()
        .detail)
}

/// Runs one `bmctl fleet agents` command.
pub async fn run(command: AgentsCommand) -> anyhow::Result<()> {
    match command {
        AgentsCommand::List { connection, output } => {
            let mut client = connection.client()?;
            let status = connection
                .call(client.status(StatusRequest::default()))
                .await?
                .into_inner();
            match output {
                Output::Json => {
                    let rows: Vec<serde_json::Value> = status
                        .agents
                        .iter()
                        .map(|a| {
                            serde_json::json!({
                                "name": a.name, "address": a.address,
                                "data_address": a.data_address, "source": a.source,
                                "up": a.up, "last_seen_unix_ms": a.last_seen_unix_ms,
                                "last_error": a.last_error,
                            })
                        })
                        .collect();
                    println!("{}", serde_json::to_string_pretty(&rows)?);
                }
                Output::Table => {
                    let cells: Vec<Vec<String>> = status
                        .agents
                        .iter()
                        .map(|a| {
                            vec![
                                a.name.clone(),
                                a.address.clone(),
                                if a.data_address.is_empty() {
                                    "-".into()
                                } else {
                                    a.data_address.clone()
                                },
                                a.source.clone(),
                                if a.up { "up" } else { "down" }.into(),
                                if a.last_seen_unix_ms > 0 {
                                    utc(a.last_seen_unix_ms)
                                } else {
                                    "never".into()
                                },
                                a.last_error.clone(),
                            ]
                        })
                        .collect();
                    print!(
                        "{}",
                        table(
                            &[
                                "AGENT",
                                "ADDRESS",
                                "DATA",
                                "FROM",
                                "STATE",
                                "LAST SEEN",
                                "LAST ERROR"
                            ],
                            &cells
                        )
                    );
                }
            }
        }
        AgentsCommand::Add {
            connection,
            name,
            address,
            data_address,
        } => println!(
            "{}",
            add(&connection, &name, &address, data_address.as_deref()).await?
        ),
        AgentsCommand::Remove {
            connection,
            name,
            revoke,
        } => println!("{}", remove(&connection, &name, revoke).await?),
        AgentsCommand::Token {
            connection,
            name,
            ttl,
            reenroll,
        } => {
            let reply = token(&connection, &name, ttl, reenroll).await?;
            eprintln!(
                "join token for {name}, valid until {}; on the host: \
                 bmfleet-agent enroll --name {name} --orchestrator {} < token-file",
                utc(reply.expires_unix_ms),
                reply.enroll_address
            );
            println!("{}", reply.token);
        }
    }
    Ok(())
}
