//! Comparing the databases of both sides: the origin's manifest (asked through the data
//! plane), this host's, table by table, and the reply a database move gives.

use std::sync::Arc;

use bmfleet_proto::v1::{DatabaseMove, MoveDatabasesReply, OriginEndpoint};
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;

use crate::config::AgentConfig;
use crate::db::pg::Checksum;
use crate::db::pg::{self, Connection, DatabaseManifest};
use crate::plane::tunnel::{self, TunnelRequest};
use bmfleet_proto::v1::TableComparison;
use std::time::Duration;

/// The manifest reply: every database's tables, and BlueMind's database credentials (sent
/// only to the admitted target, which must give its own role the same password because the
/// config copy brings the origin's bm.ini).
#[derive(Debug, Serialize, Deserialize)]
pub struct ManifestReply {
    /// Databases present on the origin, with their tables.
    pub databases: Vec<pg::DatabaseManifest>,
    /// The origin's PostgreSQL version (`server_version_num`): it decides the checksum.
    #[serde(default)]
    pub server_version_num: u32,
    /// BlueMind's database user (the target uses its own configured one: informative).
    pub user: String,
    /// Its password.
    pub password: String,
    /// The extensions of each database (names only: the target creates those of its own fixed
    /// list, never what an origin names).
    #[serde(default)]
    pub extensions: Vec<pg::Extension>,
}

/// The reply for what moved (ok when every table matches), or why nothing could be compared.
pub fn reply(moved: Result<Vec<DatabaseMove>, String>, what: &str) -> MoveDatabasesReply {
    match moved {
        Ok(databases) => {
            let ok = databases.iter().all(|d| d.tables.iter().all(|t| t.equal));
            MoveDatabasesReply {
                ok,
                error: if ok {
                    String::new()
                } else {
                    format!("tables differ between origin and target after {what}")
                },
                databases,
                ..Default::default()
            }
        }
        Err(error) => MoveDatabasesReply {
            ok: false,
            error,
            ..Default::default()
        },
    }
}

/// Every table of this host's BlueMind databases (as its own configuration names them), as
/// the owner role: the target's half of the comparison.
pub async fn own_manifests(
    config: &AgentConfig,
    owner: &Connection,
) -> Result<Vec<DatabaseManifest>, String> {
    let names = owner
        .existing_databases(&config.postgresql.databases)
        .await
        .map_err(|e| e.to_string())?;
    let checksum = Checksum::for_origin(
        owner
            .server_version_num()
            .await
            .map_err(|e| e.to_string())?,
    );
    let mut manifests = Vec::new();
    for name in &names {
        manifests.push(
            owner
                .manifest(name, checksum)
                .await
                .map_err(|e| e.to_string())?,
        );
    }
    Ok(manifests)
}

/// The origin's tables compared with this host's, database by database (`elapsed_ms`: how
/// long the move took).
pub fn compare_all(
    theirs: &ManifestReply,
    ours: &[DatabaseManifest],
    elapsed_ms: u64,
) -> Vec<DatabaseMove> {
    compare_manifests(&theirs.databases, ours, elapsed_ms)
}

/// The origin's databases compared with this host's, database by database.
pub fn compare_manifests(
    theirs: &[DatabaseManifest],
    ours: &[DatabaseManifest],
    elapsed_ms: u64,
) -> Vec<DatabaseMove> {
    theirs
        .iter()
        .map(|origin_db| {
            let empty = DatabaseManifest {
                name: origin_db.name.clone(),
                tables: Vec::new(),
                sequences: Vec::new(),
            };
            let target_db = ours
                .iter()
                .find(|d| d.name == origin_db.name)
                .unwrap_or(&empty);
            DatabaseMove {
                name: origin_db.name.clone(),
                dump_bytes: 0,
                elapsed_ms,
                tables: compare(origin_db, target_db),
            }
        })
        .collect()
}

/// The origin's databases: names, sequence values and credentials, with every table's rows
/// and checksum when `checksums`.
pub async fn origin_manifest(
    config: &AgentConfig,
    tls: Arc<rustls::ClientConfig>,
    origin: &OriginEndpoint,
    checksums: bool,
) -> Result<ManifestReply, String> {
    let timeout = Duration::from_secs(config.data_plane.connect_timeout_secs);
    let request = TunnelRequest::DatabaseManifest {
        grant: origin.grant_id.clone(),
        names_only: !checksums,
    };
    let (_, manifest) = tunnel::ask(
        origin,
        tls,
        &request,
        timeout,
        "the origin's database manifest",
    )
    .await?;
    Ok(manifest)
}

/// Table by table: rows and checksums on both sides; a table missing on one side differs.
pub fn compare(origin: &DatabaseManifest, target: &DatabaseManifest) -> Vec<TableComparison> {
    let mut names: Vec<&str> = origin
        .tables
        .iter()
        .chain(target.tables.iter())
        .map(|t| t.table.as_str())
        .collect();
    names.sort();
    names.dedup();
    names
        .into_iter()
        .map(|name| {
            let o = origin.tables.iter().find(|t| t.table == name);
            let t = target.tables.iter().find(|t| t.table == name);
            TableComparison {
                table: name.to_string(),
                origin_rows: o.map_or(0, |x| x.rows),
                target_rows: t.map_or(0, |x| x.rows),
                origin_checksum: o.map(|x| x.checksum.clone()).unwrap_or_default(),
                target_checksum: t.map(|x| x.checksum.clone()).unwrap_or_default(),
                equal: matches!((o, t), (Some(a), Some(b)) if a.rows == b.rows && a.checksum == b.checksum),
            }
        })
        .collect()
}

/// The stopped origin's half of the comparison, started at once (it runs beside the
/// catch-up).
pub fn origin_checksums(
    config: &AgentConfig,
    tls: Arc<rustls::ClientConfig>,
    origin: &OriginEndpoint,
) -> JoinHandle<Result<crate::db::compare::ManifestReply, String>> {
    let (config, origin) = (config.clone(), origin.clone());
    tokio::spawn(
        async move { crate::db::compare::origin_manifest(&config, tls, &origin, true).await },
    )
}
