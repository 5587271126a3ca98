//! `bmctl fleet apply|pause|resume|abort|approve|events`: driving the applied fleet.

use std::path::Path;
use std::time::Duration;

use bmfleet_proto::v1::{ApplyRequest, ApproveRequest, EventsRequest, TargetRequest};

use crate::status::utc;
use crate::{Connection, Output};

/// `bmctl fleet apply FILE [--remigrate INSTANCE]…`: checks the file locally (line and field
/// on error), then applies it.
pub async fn apply(
    connection: &Connection,
    file: &Path,
    remigrate: Vec<String>,
) -> anyhow::Result<()> {
    bmfleet_orchestrator::fleet::FleetFile::load(file)?;
    let text = std::fs::read_to_string(file)?;
    let mut client = connection.client()?;
    let reply = connection
        .call(client.apply(ApplyRequest {
            fleet_file: text,
            file_name: file.display().to_string(),
            remigrate,
        }))
        .await?
        .into_inner();
    println!("{}", reply.detail);
    Ok(())
}

/// Which command to send about an instance or the fleet.
#[derive(Clone, Copy)]
pub enum Verb {
    /// Hold.
    Pause,
    /// Release.
    Resume,
    /// Withdraw (one instance).
    Abort,
}

/// `bmctl fleet pause|resume [INSTANCE|--all]`, `bmctl fleet abort INSTANCE`.
pub async fn target(
    connection: &Connection,
    verb: Verb,
    instance: Option<String>,
    all: bool,
) -> anyhow::Result<()> {
    if instance.is_some() == all {
        anyhow::bail!("name one instance, or give --all");
    }
    let req = TargetRequest {
        instance: instance.unwrap_or_default(),
        all,
    };
    let mut client = connection.client()?;
    let reply = match verb {
        Verb::Pause => connection.call(client.pause(req)).await?,
        Verb::Resume => connection.call(client.resume(req)).await?,
        Verb::Abort => connection.call(client.abort(req)).await?,
    };
    println!("{}", reply.into_inner().detail);
    Ok(())
}

/// `bmctl fleet approve`.
pub async fn approve(connection: &Connection) -> anyhow::Result<()> {
    let mut client = connection.client()?;
    let reply = connection.call(client.approve(ApproveRequest {})).await?;
    println!("{}", reply.into_inner().detail);
    Ok(())
}

/// `bmctl fleet events [--follow] [INSTANCE]`.
pub async fn events(
    connection: &Connection,
    instance: Option<String>,
    limit: u32,
    follow: bool,
    output: Output,
) -> anyhow::Result<()> {
    let mut client = connection.client()?;
    let mut after_id = 0;
    let mut first = true;
    let mut shown: Vec<String> = Vec::new();
    loop {
        let reply = connection
            .call(client.events(EventsRequest {
                instance: instance.clone().unwrap_or_default(),
                limit: if first { limit } else { 10_000 },
                after_id,
            }))
            .await?
            .into_inner();
        for e in &reply.events {
            after_id = after_id.max(e.id);
            match output {
                Output::Json => println!(
                    "{}",
                    serde_json::json!({
                        "id": e.id, "at_unix_ms": e.at_unix_ms, "instance": e.instance,
                        "event": serde_json::from_str::<serde_json::Value>(&e.event).unwrap_or_default(),
                        "phase": e.phase,
                        "actions": serde_json::from_str::<serde_json::Value>(&e.actions).unwrap_or_default(),
                    })
                ),
                Output::Table => println!(
                    "{}  {}  {}  {}  {}",
                    utc(e.at_unix_ms),
                    e.instance,
                    e.phase,
                    e.event,
                    e.actions
                ),
            }
        }
        // What the receivers have not got yet (printed once, and again when it changes).
        let undelivered: Vec<String> = reply
            .undelivered
            .iter()
            .map(|n| match output {
                Output::Json => serde_json::json!({
                    "undelivered_notification": {
                        "key": n.key, "receiver": n.receiver, "kind": n.kind,
                        "instance": n.instance, "attempts": n.attempts,
                        "last_error": n.last_error, "created_unix_ms": n.created_unix_ms,
                    }
                })
                .to_string(),
                Output::Table => format!(
                    "{}  {}  notification {} to {} not delivered ({} tries): {}",
                    utc(n.created_unix_ms),
                    if n.instance.is_empty() {
                        "(fleet)"
                    } else {
                        &n.instance
                    },
                    n.kind,
                    n.receiver,
                    n.attempts,
                    if n.last_error.is_empty() {
                        "not tried yet"
                    } else {
                        &n.last_error
                    }
                ),
            })
            .collect();
        if undelivered != shown {
            for line in &undelivered {
                println!("{line}");
            }
            shown = undelivered;
        }
        first = false;
        if !follow {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
