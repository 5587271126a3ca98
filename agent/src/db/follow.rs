//! What this host follows (kept in the state dir across restarts): the origin, the
//! replication grant, a subscriber's subscriptions, the last verified point. Shared by the
//! standby, the subscriber and the gate, below all three.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::Instant;

use bmfleet_proto::v1::{FollowDatabasesReply, OriginEndpoint};
use serde::{Deserialize, Serialize};

use crate::config::AgentConfig;
use crate::db::pg::{literal, Connection};
use crate::plane::tunnel::TableFile;

/// What this host follows, kept in the state dir across restarts.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Following {
    /// The origin's data plane (address, name) and the replication grant.
    pub address: String,
    /// The origin's name.
    pub name: String,
    /// The replication grant.
    pub grant_id: String,
    /// Promoted already (a repeated promotion only compares; the instance's end forgets it).
    #[serde(default)]
    pub promoted: bool,
    /// Following by logical replication (subscriptions), not as a physical standby.
    #[serde(default)]
    pub logical: Option<crate::db::follow::LogicalFollow>,
    /// The last verified point with the origin (taken at the pre-window pass): the
    /// downtime's gate compares only what changed since. A subscriber's holds only the
    /// origin's position: each side keeps its own sums ([`crate::db::gate::block_point`]).
    #[serde(default)]
    pub verified: Option<crate::db::follow::VerifiedPoint>,
}

impl Following {
    /// The origin's data plane under the replication grant.
    pub fn endpoint(&self) -> OriginEndpoint {
        OriginEndpoint {
            address: self.address.clone(),
            name: self.name.clone(),
            grant_id: self.grant_id.clone(),
        }
    }
}

fn state_path(config: &AgentConfig) -> PathBuf {
    config.state_dir.join("standby.json")
}

/// What this host follows, if it does.
pub fn following(config: &AgentConfig) -> Option<Following> {
    let text = std::fs::read_to_string(state_path(config)).ok()?;
    serde_json::from_str(&text).ok()
}

/// Records (or, with `None`, forgets) what this host follows.
pub fn set_following(config: &AgentConfig, state: Option<&Following>) -> Result<(), String> {
    let path = state_path(config);
    match state {
        None => match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(format!("removing {}: {e}", path.display()))
            }
            _ => Ok(()),
        },
        Some(state) => {
            let json = serde_json::to_vec(state).map_err(|e| e.to_string())?;
            let tmp = path.with_extension("json.tmp");
            std::fs::write(&tmp, json)
                .and_then(|()| {
                    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
                })
                .and_then(|()| std::fs::rename(&tmp, &path))
                .map_err(|e| format!("writing {}: {e}", path.display()))
        }
    }
}

/// The reply to a follow that started at `started`: the bytes copied, or why it failed.
pub fn follow_reply(started: Instant, followed: Result<u64, String>) -> FollowDatabasesReply {
    let elapsed_ms = started.elapsed().as_millis() as u64;
    match followed {
        Ok(bytes) => FollowDatabasesReply {
            ok: true,
            base_backup_bytes: bytes,
            elapsed_ms,
            ..Default::default()
        },
        Err(error) => FollowDatabasesReply {
            error,
            elapsed_ms,
            ..Default::default()
        },
    }
}

/// A logical follow, kept with the standby state.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct LogicalFollow {
    /// The subscriptions' owner.
    pub role: String,
    /// (database, subscription).
    pub subscriptions: Vec<(String, String)>,
    /// The owner role's attributes taken away while it applies the origin's rows (given back
    /// at the end).
    #[serde(default)]
    pub owner_attributes: Option<String>,
}

/// How far the subscriptions are.
#[derive(Debug, Default)]
pub(crate) struct Progress {
    /// Tables whose initial copy is not finished.
    pub(crate) not_ready: u64,
    /// The lowest position a subscription reported to the origin (0: one has none yet).
    pub(crate) lowest: Option<u64>,
    /// Errors copying or applying.
    pub(crate) errors: u64,
    /// Subscriptions without a running apply worker.
    pub(crate) stopped: u64,
}

pub(crate) async fn progress(
    owner: &Connection,
    logical: &LogicalFollow,
    own_version: u32,
) -> Result<Progress, String> {
    let mut p = Progress::default();
    for (database, subscription) in &logical.subscriptions {
        let sub = literal(subscription);
        let error_count = if crate::db::wal::major(own_version) >= 15 {
            format!("(SELECT apply_error_count + sync_error_count FROM pg_catalog.pg_stat_subscription_stats WHERE subname = {sub})")
        } else {
            "0".to_string()
        };
        let out = owner
            .psql(
                database,
                &format!(
                    "SELECT (SELECT count(*) FROM pg_catalog.pg_subscription_rel r JOIN pg_catalog.pg_subscription s ON s.oid = r.srsubid WHERE s.subname = {sub} AND r.srsubstate <> 'r'),\n\
                            (SELECT latest_end_lsn FROM pg_catalog.pg_stat_subscription WHERE subname = {sub} AND relid IS NULL),\n\
                            COALESCE({error_count}, 0),\n\
                            (SELECT count(*) FROM pg_catalog.pg_stat_subscription WHERE subname = {sub} AND relid IS NULL AND pid IS NOT NULL);\n"
                ),
            )
            .await
            .map_err(|e| format!("asking {database}'s subscription how far it is: {e}"))?;
        let fields: Vec<&str> = out.trim().split('\t').collect();
        let number = |n: usize, default: u64| {
            fields
                .get(n)
                .and_then(|f| f.parse().ok())
                .unwrap_or(default)
        };
        p.not_ready += number(0, 1);
        let position = fields
            .get(1)
            .and_then(|f| crate::db::wal::parse_lsn(f))
            .unwrap_or(0);
        p.lowest = Some(p.lowest.map_or(position, |l| l.min(position)));
        p.errors += number(2, 0);
        if number(3, 0) == 0 {
            p.stopped += 1;
        }
    }
    Ok(p)
}

/// The point both sides were found equal at: the origin's WAL position and its tables' files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifiedPoint {
    /// The origin's WAL insert position while its tables were locked.
    pub lsn: String,
    /// Every table's file then.
    pub tables: Vec<TableFile>,
}
