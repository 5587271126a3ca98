//! The target's side of the database move. The origin dumps (it runs only a read-only
//! `pg_dump -Fc` under the grant); the target trusts nothing from it but data: the database
//! names and the owner role are the target's own configuration, the administrator only drops
//! and re-creates those databases and creates extensions from a fixed list, and the archive
//! is restored by pg_restore **as the owner role** (never a superuser: a superuser owner is
//! demoted for the restore and given its attributes back after), `--no-owner
//! --no-privileges`, with `search_path` pinned to `pg_catalog`. The origin's password is set
//! on the owner as a SCRAM verifier computed here, never as SQL text. Then both sides'
//! tables are compared.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bmfleet_proto::v1::{DatabaseMove, DumpFormat, MoveDatabasesReply, OriginEndpoint};
use tokio::io::AsyncWriteExt;

use crate::config::AgentConfig;
use crate::db::compare::ManifestReply;
use crate::db::compare::{compare, origin_manifest, reply};
use crate::db::pg::{ident, literal, Checksum, Connection, DatabaseManifest};
use crate::plane::tunnel::{self, receive_framed, TunnelRequest};

/// Moves every BlueMind database present on the origin. Never fails as a call: the reply
/// says what moved and what did not.
pub async fn move_databases(
    config: &AgentConfig,
    tls: Arc<rustls::ClientConfig>,
    origin: &OriginEndpoint,
    format: DumpFormat,
    jobs: u32,
) -> MoveDatabasesReply {
    let mut moved = reply(run(config, tls, origin, format, jobs).await, "the move");
    if !moved.databases.is_empty() {
        moved.gate = "every table compared (dump and restore)".into();
    }
    moved
}

async fn run(
    config: &AgentConfig,
    tls: Arc<rustls::ClientConfig>,
    origin: &OriginEndpoint,
    format: DumpFormat,
    jobs: u32,
) -> Result<Vec<DatabaseMove>, String> {
    // First what the move needs (which databases exist there, the password): quick.
    let found = origin_manifest(config, tls.clone(), origin, false).await?;
    let pg_config = &config.postgresql;
    // The target's own names; the origin only says which of them it has.
    let names: Vec<String> = pg_config
        .databases
        .iter()
        .filter(|d| found.databases.iter().any(|o| &o.name == *d))
        .cloned()
        .collect();
    let admin = Connection::admin(pg_config);
    let owner = &pg_config.user;
    let verifier = crate::db::pg::scram_verifier(&found.password)?;
    let demoted = prepare_owner(&admin, owner, &verifier).await?;
    let moved = move_all(config, tls, origin, &found, &names, format, jobs).await;
    if let Some(attributes) = demoted {
        // The owner's own attributes come back whatever the restore did.
        admin
            .psql(
                "postgres",
                &format!("ALTER ROLE {} WITH {attributes};\n", ident(owner)),
            )
            .await
            .map_err(|e| format!("giving {owner} its attributes back ({attributes}): {e}"))?;
    }
    moved
}

async fn move_all(
    config: &AgentConfig,
    tls: Arc<rustls::ClientConfig>,
    origin: &OriginEndpoint,
    found: &ManifestReply,
    names: &[String],
    format: DumpFormat,
    jobs: u32,
) -> Result<Vec<DatabaseMove>, String> {
    // Then every database moves at once, while the origin checksums its tables (read-only:
    // BlueMind is stopped there).
    let mut moving = tokio::task::JoinSet::new();
    for (index, name) in names.iter().enumerate() {
        let (config, tls, origin) = (config.clone(), tls.clone(), origin.clone());
        let how = Restore {
            password: found.password.clone(),
            format,
            jobs,
            checksum: Checksum::for_origin(found.server_version_num),
            extensions: found
                .extensions
                .iter()
                .filter(|e| &e.database == name)
                .map(|e| (e.name.clone(), e.schema.clone()))
                .collect(),
        };
        let name = name.clone();
        moving.spawn(async move {
            let moved = move_one(&config, tls, &origin, &name, how).await;
            (index, moved)
        });
    }
    let checksums = origin_manifest(config, tls, origin, true).await;
    let mut moved = Vec::new();
    while let Some(done) = moving.join_next().await {
        let (index, result) = done.map_err(|e| format!("a database move stopped: {e}"))?;
        moved.push((index, result?));
    }
    let checksums = checksums?;
    moved.sort_by_key(|(index, _)| *index);
    Ok(moved
        .into_iter()
        .map(|(_, (mut m, target_db))| {
            let empty = DatabaseManifest {
                name: m.name.clone(),
                tables: Vec::new(),
                sequences: Vec::new(),
            };
            let origin_db = checksums
                .databases
                .iter()
                .find(|d| d.name == m.name)
                .unwrap_or(&empty);
            m.tables = compare(origin_db, &target_db);
            m
        })
        .collect())
}

/// Makes the owner role ready to restore: created if missing (LOGIN, nothing more), its
/// password set from a verifier, and no power beyond its own databases. A superuser,
/// CREATEROLE, REPLICATION or BYPASSRLS owner (BlueMind's installer may make `bj` a superuser)
/// loses those for the restore; the attributes to give back are returned. A member of a role
/// with such powers is refused: a restore could `SET ROLE` to it.
pub async fn prepare_owner(
    admin: &Connection,
    owner: &str,
    verifier: &str,
) -> Result<Option<String>, String> {
    let role = ident(owner);
    let name = literal(owner);
    let sql = format!(
        "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = {name}) THEN CREATE ROLE {role} LOGIN; END IF; END $$;\n\
         SELECT rolsuper, rolcreaterole, rolreplication, rolbypassrls FROM pg_catalog.pg_roles WHERE rolname = {name};\n\
         WITH RECURSIVE m(roleid) AS ( \
           SELECT a.roleid FROM pg_catalog.pg_auth_members a JOIN pg_catalog.pg_roles o ON o.oid = a.member WHERE o.rolname = {name} \
           UNION SELECT a.roleid FROM pg_catalog.pg_auth_members a JOIN m ON a.member = m.roleid) \
         SELECT string_agg(r.rolname, ', ' ORDER BY r.rolname) FROM m JOIN pg_catalog.pg_roles r ON r.oid = m.roleid \
           WHERE r.rolsuper OR r.rolcreaterole OR r.rolname IN ('pg_execute_server_program', 'pg_read_server_files', 'pg_write_server_files');\n"
    );
    let out = admin
        .psql("postgres", &sql)
        .await
        .map_err(|e| format!("preparing the role {owner} on the target: {e}"))?;
    let mut lines = out.lines();
    let flags: Vec<bool> = lines
        .next()
        .unwrap_or_default()
        .split('\t')
        .map(|f| f == "t")
        .collect();
    if let Some(powerful) = lines.next().filter(|l| !l.trim().is_empty()) {
        return Err(format!(
            "the role {owner} is a member of {powerful} on the target: a restore as {owner} could \
             act as them; revoke that membership (REVOKE … FROM {owner})"
        ));
    }
    let powers = ["SUPERUSER", "CREATEROLE", "REPLICATION", "BYPASSRLS"];
    let held: Vec<&str> = powers
        .iter()
        .zip(flags.iter().chain(std::iter::repeat(&false)))
        .filter(|(_, on)| **on)
        .map(|(p, _)| *p)
        .collect();
    let dropped: Vec<String> = held.iter().map(|p| format!("NO{p}")).collect();
    let mut alter = format!(
        "ALTER ROLE {role} WITH LOGIN PASSWORD {}",
        literal(verifier)
    );
    for d in &dropped {
        alter.push(' ');
        alter.push_str(d);
    }
    admin
        .psql("postgres", &format!("{alter};\n"))
        .await
        .map_err(|e| format!("setting {owner}'s password and attributes on the target: {e}"))?;
    Ok((!held.is_empty()).then(|| held.join(" ")))
}

/// Gives this host's owner role BlueMind's password (the origin's, from its bm.ini: the config
/// copy brings that file, and BlueMind logs in with it).
pub async fn set_owner_password(config: &AgentConfig, password: &str) -> Result<(), String> {
    let verifier = crate::db::pg::scram_verifier(password)?;
    Connection::admin(&config.postgresql)
        .psql(
            "postgres",
            &format!(
                "ALTER ROLE {} WITH PASSWORD {};\n",
                ident(&config.postgresql.user),
                literal(&verifier)
            ),
        )
        .await
        .map(|_| ())
        .map_err(|e| {
            format!(
                "setting {}'s password on the target: {e}",
                config.postgresql.user
            )
        })
}

/// How one database is restored and checked.
#[derive(Clone)]
struct Restore {
    /// The owner's password (the origin's, now set on this host's owner role): the restore
    /// logs in as the owner, into a database made here, whose role and settings are this
    /// host's own (an archive restored without `--create` carries no database or role setting).
    password: String,
    format: DumpFormat,
    jobs: u32,
    checksum: Checksum,
    /// The origin database's extensions (name, schema).
    extensions: Vec<(String, String)>,
}

/// Drops and re-creates database `name` owned by the owner role, with the origin's
/// `extensions` (name, schema) that this target's list allows, created by the administrator.
pub async fn recreate(
    config: &AgentConfig,
    name: &str,
    extensions: &[(String, String)],
) -> Result<(), String> {
    let pg_config = &config.postgresql;
    let admin = Connection::admin(pg_config);
    admin
        .psql(
            "postgres",
            &format!(
                "DROP DATABASE IF EXISTS {db} WITH (FORCE);\nCREATE DATABASE {db} OWNER {owner};\n",
                db = ident(name),
                owner = ident(&pg_config.user)
            ),
        )
        .await
        .map_err(|e| e.to_string())?;
    let mut sql = String::new();
    for (extension, schema) in extensions {
        let Some(allowed) = pg_config.extensions.iter().find(|e| *e == extension) else {
            return Err(format!(
                "{name} on the origin uses the extension {extension:?}, which is not in this \
                 target's postgresql.extensions: add it there if BlueMind needs it"
            ));
        };
        let Some(schema) = ["public", "pg_catalog"].iter().find(|s| *s == schema) else {
            return Err(format!(
                "{name} on the origin has the extension {allowed} in schema {schema:?}: only \
                 public and pg_catalog are accepted"
            ));
        };
        sql.push_str(&format!(
            "CREATE EXTENSION IF NOT EXISTS {} SCHEMA {};\n",
            ident(allowed),
            ident(schema)
        ));
    }
    if !sql.is_empty() {
        admin
            .psql(name, &sql)
            .await
            .map_err(|e| format!("creating the extensions of {name}: {e}"))?;
    }
    Ok(())
}

/// Re-creates one database owned by the owner role, creates its extensions (those of the
/// target's list), restores the origin's archive as the owner, and reads back its manifest.
async fn move_one(
    config: &AgentConfig,
    tls: Arc<rustls::ClientConfig>,
    origin: &OriginEndpoint,
    name: &str,
    how: Restore,
) -> Result<(DatabaseMove, DatabaseManifest), String> {
    let started = Instant::now();
    let timeout = Duration::from_secs(config.data_plane.connect_timeout_secs);
    let pg_config = &config.postgresql;
    recreate(config, name, &how.extensions).await?;
    let request = TunnelRequest::DumpDatabase {
        grant: origin.grant_id.clone(),
        database: name.to_string(),
        schema_only: false,
    };
    let mut stream = tunnel::open(origin, tls, &request, timeout)
        .await
        .map_err(|e| e.to_string())?;
    let owner = Connection::bluemind(pg_config, how.password.clone());
    let dump_bytes = match how.format {
        DumpFormat::Streamed => restore_streamed(&owner, name, &mut stream).await?,
        DumpFormat::Parallel => {
            restore_parallel(config, &owner, name, how.jobs.max(1), &mut stream).await?
        }
    };
    let target_db = owner
        .manifest(name, how.checksum)
        .await
        .map_err(|e| e.to_string())?;
    Ok((
        DatabaseMove {
            name: name.to_string(),
            dump_bytes,
            elapsed_ms: started.elapsed().as_millis() as u64,
            tables: Vec::new(),
        },
        target_db,
    ))
}

/// pg_restore's options: objects owned by whoever restores (the owner), no GRANT/REVOKE, no
/// comments (COMMENT ON EXTENSION needs the extension's owner), stop at the first error.
const RESTORE_OPTIONS: [&str; 4] = [
    "--no-owner",
    "--no-privileges",
    "--no-comments",
    "--exit-on-error",
];

/// Streams the archive into pg_restore as it arrives, in one transaction.
pub async fn restore_streamed(
    owner: &Connection,
    db: &str,
    stream: &mut tunnel::Tunnel,
) -> Result<u64, String> {
    let mut restore = owner
        .command("pg_restore", db)
        .args(RESTORE_OPTIONS)
        .arg("--single-transaction")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start pg_restore: {e}"))?;
    let mut stdin = restore.stdin.take().ok_or("pg_restore has no stdin")?;
    let received = receive_framed(stream, &mut stdin).await;
    let _ = stdin.shutdown().await;
    drop(stdin);
    let out = restore
        .wait_with_output()
        .await
        .map_err(|e| format!("waiting for pg_restore: {e}"))?;
    finish_restore(db, received, &out)
}

/// Writes the archive to a private file, then restores it with `jobs` workers.
async fn restore_parallel(
    config: &AgentConfig,
    owner: &Connection,
    db: &str,
    jobs: u32,
    stream: &mut tunnel::Tunnel,
) -> Result<u64, String> {
    let dir = tempfile::tempdir_in(&config.state_dir)
        .map_err(|e| format!("cannot make a restore dir: {e}"))?;
    let path = dir.path().join("archive");
    let mut file = tokio::fs::File::create(&path)
        .await
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    let received = receive_framed(stream, &mut file).await;
    file.flush()
        .await
        .map_err(|e| format!("writing {}: {e}", path.display()))?;
    drop(file);
    if let Ok((outcome, _)) = &received {
        if !outcome.ok {
            return Err(format!("dumping {db} on the origin: {}", outcome.error));
        }
    }
    let out = owner
        .command("pg_restore", db)
        .args(RESTORE_OPTIONS)
        .args(["-j", &jobs.to_string()])
        .arg(&path)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|e| format!("cannot start pg_restore: {e}"))?;
    finish_restore(db, received, &out)
}

fn finish_restore(
    db: &str,
    received: std::io::Result<(tunnel::TunnelReply, u64)>,
    out: &std::process::Output,
) -> Result<u64, String> {
    let (outcome, bytes) = received.map_err(|e| format!("receiving the dump of {db}: {e}"))?;
    if !outcome.ok {
        return Err(format!("dumping {db} on the origin: {}", outcome.error));
    }
    if !out.status.success() {
        return Err(format!(
            "restoring {db}: pg_restore {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::pg::TableManifest;

    fn db(tables: &[(&str, u64, &str)]) -> DatabaseManifest {
        DatabaseManifest {
            name: "bj".into(),
            tables: tables
                .iter()
                .map(|(t, r, c)| TableManifest {
                    table: t.to_string(),
                    rows: *r,
                    checksum: c.to_string(),
                })
                .collect(),
            sequences: Vec::new(),
        }
    }

    #[test]
    fn comparison_flags_differences_and_missing_tables() {
        let origin = db(&[
            ("public.a", 2, "x"),
            ("public.b", 1, "y"),
            ("public.c", 0, "z"),
        ]);
        let target = db(&[
            ("public.a", 2, "x"),
            ("public.b", 1, "other"),
            ("public.d", 3, "w"),
        ]);
        let result: Vec<(String, bool)> = compare(&origin, &target)
            .into_iter()
            .map(|t| (t.table, t.equal))
            .collect();
        assert_eq!(
            result,
            [
                ("public.a".to_string(), true),
                ("public.b".to_string(), false),
                ("public.c".to_string(), false),
                ("public.d".to_string(), false)
            ]
        );
    }
}
