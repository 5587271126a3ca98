//! The origin's half of the database verbs: a dump, the manifest, a base backup and the
//! replication relay, a publication, the WAL position, a verified point's hold and the
//! changes since it. The listener ([`crate::data_plane`]) has admitted the caller and
//! checked the verb's grant scope; what is checked here is the request's own content.

use std::path::Path;
use std::time::Instant;

use tokio::io::{AsyncBufRead, AsyncWrite, AsyncWriteExt};

use crate::config::AgentConfig;
use crate::db::compare::ManifestReply;
use crate::db::gate::verified_point::{
    checksum_all, import_snapshot, keep_wal, last_answer, lock_all, Held, OriginSums, Taken, HOLD,
};
use crate::db::pg::{self, Connection};
use crate::db::{publication, replication};
use crate::plane::answer::{admit, stream_output, Stream};
use crate::plane::grants::{Grant, GrantStore};
use crate::plane::tunnel::{read_json_line, write_json_line};

/// A standby's or a subscriber's replication connection, relayed to the local cluster: only
/// a replication startup of the grant's own role passes ([`crate::db::startup`]); logical
/// only when the grant published.
pub async fn relay(
    config: &AgentConfig,
    grants: &GrantStore,
    grant: &Grant,
    stream: &mut Stream,
) -> Result<(), String> {
    let made = grants
        .leftover(&grant.id)
        .map_err(|e| e.to_string())?
        .ok_or("refused: this grant made no replication role here (no base backup or publication asked yet)")?;
    let allowed = crate::db::startup::Allowed {
        role: &made.role,
        logical: !made.logical.is_empty(),
        databases: &config.postgresql.databases,
    };
    admit(stream).await?;
    replication::relay_to_server(config, &allowed, stream).await
}

/// Streams one database as a custom-format archive (`pg_dump -Fc`): an archive carries
/// SQL for the server only, never client commands, and the target restores it with
/// pg_restore as the database's owner.
pub async fn dump(
    config: &AgentConfig,
    database: &str,
    schema_only: bool,
    stream: &mut Stream,
) -> Result<(), String> {
    if !config.postgresql.databases.iter().any(|d| d == database) {
        return Err(format!(
            "refused: {database} is not one of BlueMind's databases"
        ));
    }
    let mut pg_dump = pg::Connection::bluemind_here(config).command("pg_dump", database);
    // Uncompressed: the archive crosses the data plane once, and compressing it would
    // spend the origin's CPU inside the downtime.
    pg_dump.args(["--no-sync", "-F", "c", "-Z", "0"]);
    if schema_only {
        pg_dump.arg("--schema-only");
    }
    stream_output("pg_dump", pg_dump, None, stream).await
}

/// Makes the replication role and slot of `grant`, sends their ticket, then streams a
/// base backup of the cluster (`pg_basebackup -Ft -D -`, taken by this host's own
/// administrator; WAL comes afterwards through the slot).
pub async fn base_backup(
    config: &AgentConfig,
    grants: &GrantStore,
    grant: &Grant,
    stream: &mut Stream,
) -> Result<(), String> {
    let ticket = replication::prepare(config, grants, grant).await?;
    let mut pg_basebackup = pg::Connection::admin(&config.postgresql).command("pg_basebackup", "");
    pg_basebackup.args([
        "-D",
        "-",
        "-F",
        "t",
        "-X",
        "none",
        "--checkpoint=fast",
        "--no-manifest",
    ]);
    let ticket = serde_json::to_value(&ticket).map_err(|e| e.to_string())?;
    stream_output("pg_basebackup", pg_basebackup, Some(ticket), stream).await
}

/// Publishes every BlueMind database for the grant's subscriber and sends the ticket.
pub async fn publish(
    config: &AgentConfig,
    grants: &GrantStore,
    grant: &Grant,
    stream: &mut Stream,
) -> Result<(), String> {
    let ticket = publication::prepare(config, grants, grant).await?;
    admit(stream).await?;
    write_json_line(stream, &ticket)
        .await
        .map_err(|e| e.to_string())?;
    stream.shutdown().await.map_err(|e| e.to_string())
}

/// The WAL position of the origin now (its services are stopped: the standby promotes
/// once it has replayed up to it).
pub async fn wal_position(config: &AgentConfig, stream: &mut Stream) -> Result<(), String> {
    let position = crate::db::wal::wal_position(config).await?;
    admit(stream).await?;
    write_json_line(stream, &position)
        .await
        .map_err(|e| e.to_string())?;
    stream.shutdown().await.map_err(|e| e.to_string())
}

/// Every BlueMind database's tables (or, `names_only`, its name and sequences), the
/// origin's version, extensions and BlueMind's database credentials.
pub async fn manifest(
    config: &AgentConfig,
    names_only: bool,
    stream: &mut Stream,
) -> Result<(), String> {
    let conn = pg::Connection::bluemind_here(config);
    let existing = conn
        .existing_databases(&config.postgresql.databases)
        .await
        .map_err(|e| e.to_string())?;
    let server_version_num = conn.server_version_num().await.map_err(|e| e.to_string())?;
    let checksum = pg::Checksum::for_origin(server_version_num);
    let mut databases = Vec::new();
    let mut extensions = Vec::new();
    for db in existing {
        extensions.extend(conn.extensions(&db).await.map_err(|e| e.to_string())?);
        databases.push(if names_only {
            let sequences = conn.sequences(&db).await.map_err(|e| e.to_string())?;
            pg::DatabaseManifest {
                name: db,
                tables: Vec::new(),
                sequences,
            }
        } else {
            let mut manifest = conn
                .manifest(&db, checksum)
                .await
                .map_err(|e| e.to_string())?;
            manifest.sequences = conn.sequences(&db).await.map_err(|e| e.to_string())?;
            manifest
        });
    }
    let pg_config = &config.postgresql;
    let reply = ManifestReply {
        databases,
        server_version_num,
        extensions,
        user: pg_config.user.clone(),
        password: pg::bluemind_password(
            &config.host_path(Path::new("/etc/bm/bm.ini")),
            &pg_config.password,
        ),
    };
    admit(stream).await?;
    write_json_line(stream, &reply)
        .await
        .map_err(|e| e.to_string())?;
    stream.shutdown().await.map_err(|e| e.to_string())
}

/// Origin side of [`establish`]: keeps the WAL, locks BlueMind's tables, takes the snapshots,
/// then (admitted) answers [`Held`], waits for the standby's [`Taken`] (at most
/// [`HOLD`]), lets go of the locks and answers [`OriginSums`].
///
/// `per_block` (a subscriber's point, [`crate::db::gate::block_point`]): the sums are taken block by
/// block and kept here; the totals are answered.
pub async fn verified_point<S>(
    config: &AgentConfig,
    bluemind: &Connection,
    grant_id: &str,
    per_block: bool,
    stream: &mut S,
) -> Result<(), String>
where
    S: AsyncBufRead + AsyncWrite + Unpin,
{
    if bluemind
        .server_version_num()
        .await
        .map_err(|e| e.to_string())?
        < 140_000
    {
        return Err(
            "the origin's PostgreSQL is older than 14 (no TID range scans): no verified point, \
             the downtime compares every table"
                .into(),
        );
    }
    keep_wal(config, grant_id).await?;
    let databases = bluemind
        .existing_databases(&config.postgresql.databases)
        .await
        .map_err(|e| e.to_string())?;
    // Admitted before the locks (they may take seconds on a busy day): what fails from here
    // on reaches the target as the `error` of its `Held`.
    admit(stream).await?;
    let locked = lock_all(bluemind, &databases).await?;
    let mut lockers = Vec::new();
    let mut readers = Vec::new();
    let mut files = Vec::new();
    for (db, (locker, snapshot, tables)) in databases.iter().zip(locked) {
        let reader = import_snapshot(bluemind, db, &snapshot).await?;
        files.extend(tables.into_iter().map(|t| t.file));
        lockers.push(locker);
        readers.push((db.clone(), reader));
    }
    let position = crate::db::wal::wal_position(config).await?;
    let held_at = Instant::now();
    write_json_line(
        stream,
        &Held {
            lsn: position.lsn.clone(),
            segment_size: position.segment_size,
            error: String::new(),
        },
    )
    .await
    .map_err(|e| e.to_string())?;
    let taken = tokio::time::timeout(HOLD, read_json_line::<_, Taken>(stream)).await;
    for locker in lockers {
        locker
            .finish("COMMIT;\n")
            .await
            .map_err(|e| e.to_string())?;
    }
    let released_in_time = matches!(taken, Ok(Ok(_)));
    tracing::info!(lsn = %position.lsn, held_ms = held_at.elapsed().as_millis() as u64, released_in_time, "BlueMind's tables were held for the standby's snapshot");
    let sums = if per_block {
        crate::db::gate::block_point::origin_point(
            config,
            grant_id,
            &position.lsn,
            readers,
            files.clone(),
        )
        .await
    } else {
        checksum_all(readers).await
    };
    let answer = match sums {
        Ok(databases) => OriginSums {
            released_in_time,
            databases,
            tables: files,
            // Its reads pruned pages: where the follower's replay must go (and flushed, so
            // that it gets there without waiting for the WAL writer).
            end_lsn: crate::db::wal::wal_position(config)
                .await
                .map(|p| p.lsn)
                .unwrap_or_default(),
            error: String::new(),
        },
        Err(error) => OriginSums {
            error,
            ..Default::default()
        },
    };
    last_answer(stream, &answer).await
}
