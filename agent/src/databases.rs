//! The target's side of the database move: the origin dumps (it runs only read-only
//! pg_dump under the grant), the target drops and re-creates each database owned by
//! BlueMind's user and restores the stream, then both sides' tables are compared.

use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bmfleet_proto::v1::{
    DatabaseMove, DumpFormat, MoveDatabasesReply, OriginEndpoint, TableComparison,
};
use tokio::io::AsyncWriteExt;

use crate::config::AgentConfig;
use crate::data_plane::ManifestReply;
use crate::pg::{ident, literal, Checksum, Connection, DatabaseManifest};
use crate::tunnel::{self, read_json_line, receive_framed, TunnelRequest};

/// Moves every BlueMind database present on the origin. Never fails as a call: the reply
/// says what moved and what did not.
pub async fn move_databases(
    config: &AgentConfig,
    tls: Arc<rustls::ClientConfig>,
    origin: &OriginEndpoint,
    format: DumpFormat,
    jobs: u32,
) -> MoveDatabasesReply {
    match run(config, tls, origin, format, jobs).await {
        Ok(databases) => {
            let ok = databases.iter().all(|d| d.tables.iter().all(|t| t.equal));
            MoveDatabasesReply {
                ok,
                error: if ok {
                    String::new()
                } else {
                    "tables differ between origin and target after the move".into()
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

async fn run(
    config: &AgentConfig,
    tls: Arc<rustls::ClientConfig>,
    origin: &OriginEndpoint,
    format: DumpFormat,
    jobs: u32,
) -> Result<Vec<DatabaseMove>, String> {
    // First what the move needs (database names, BlueMind's credentials): quick.
    let names = origin_manifest(config, tls.clone(), origin, false).await?;
    let admin = Connection::admin(&config.postgresql);
    ensure_role(&admin, &names.user, &names.password).await?;
    // Then every database moves at once, while the origin checksums its tables (read-only:
    // BlueMind is stopped there).
    let mut moving = tokio::task::JoinSet::new();
    for (index, db) in names.databases.iter().enumerate() {
        let (config, tls, origin) = (config.clone(), tls.clone(), origin.clone());
        let (name, owner) = (db.name.clone(), names.user.clone());
        let checksum = Checksum::for_origin(names.server_version_num);
        moving.spawn(async move {
            let how = Restore {
                format,
                jobs,
                checksum,
            };
            let moved = move_one(&config, tls, &origin, &name, &owner, how).await;
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

/// The origin's databases: names and credentials, with every table's rows and checksum when
/// `checksums`.
async fn origin_manifest(
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
    let mut stream = tunnel::open(origin, tls, &request, timeout)
        .await
        .map_err(|e| e.to_string())?;
    read_json_line(&mut stream)
        .await
        .map_err(|e| format!("reading the origin's database manifest: {e}"))
}

/// How one database is restored and checked.
#[derive(Clone, Copy)]
struct Restore {
    format: DumpFormat,
    jobs: u32,
    checksum: Checksum,
}

/// Re-creates one database owned by `owner`, restores the origin's dump into it as it
/// streams, and reads back its manifest.
async fn move_one(
    config: &AgentConfig,
    tls: Arc<rustls::ClientConfig>,
    origin: &OriginEndpoint,
    name: &str,
    owner: &str,
    how: Restore,
) -> Result<(DatabaseMove, DatabaseManifest), String> {
    let started = Instant::now();
    let timeout = Duration::from_secs(config.data_plane.connect_timeout_secs);
    let admin = Connection::admin(&config.postgresql);
    admin
        .psql(
            "postgres",
            &format!(
                "DROP DATABASE IF EXISTS {db} WITH (FORCE);\nCREATE DATABASE {db} OWNER {owner};\n",
                db = ident(name),
                owner = ident(owner)
            ),
        )
        .await
        .map_err(|e| e.to_string())?;
    let directory_jobs = match how.format {
        DumpFormat::Plain => 0,
        DumpFormat::Directory => how.jobs.max(1),
    };
    let request = TunnelRequest::DumpDatabase {
        grant: origin.grant_id.clone(),
        database: name.to_string(),
        directory_jobs,
    };
    let mut stream = tunnel::open(origin, tls, &request, timeout)
        .await
        .map_err(|e| e.to_string())?;
    let dump_bytes = if directory_jobs == 0 {
        restore_plain(&admin, name, &mut stream).await?
    } else {
        restore_directory(config, &admin, name, directory_jobs, &mut stream).await?
    };
    let target_db = admin
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

/// Creates BlueMind's role if missing and gives it the origin's password (the copied bm.ini
/// will hold that one). The SQL goes through stdin, never argv.
async fn ensure_role(admin: &Connection, user: &str, password: &str) -> Result<(), String> {
    let sql = format!(
        "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = {name}) THEN CREATE ROLE {role} LOGIN; END IF; END $$;\n\
         ALTER ROLE {role} WITH LOGIN PASSWORD {password};\n",
        name = literal(user),
        role = ident(user),
        password = literal(password),
    );
    admin.psql("postgres", &sql).await.map(|_| ()).map_err(|e| {
        // The statement holds the password: report the failure without it.
        format!(
            "cannot create or update the role {user} on the target: {}",
            e.detail.replace(password, "***")
        )
    })
}

async fn restore_plain(
    admin: &Connection,
    db: &str,
    stream: &mut tunnel::Tunnel,
) -> Result<u64, String> {
    let mut psql = admin
        .command("psql", db)
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "--single-transaction"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start psql: {e}"))?;
    let mut stdin = psql.stdin.take().ok_or("psql has no stdin")?;
    let received = receive_framed(stream, &mut stdin).await;
    let _ = stdin.shutdown().await;
    drop(stdin);
    let out = psql
        .wait_with_output()
        .await
        .map_err(|e| format!("waiting for psql: {e}"))?;
    let (outcome, bytes) = received.map_err(|e| format!("receiving the dump of {db}: {e}"))?;
    if !outcome.ok {
        return Err(format!("dumping {db} on the origin: {}", outcome.error));
    }
    if !out.status.success() {
        return Err(format!(
            "restoring {db}: psql {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(bytes)
}

async fn restore_directory(
    config: &AgentConfig,
    admin: &Connection,
    db: &str,
    jobs: u32,
    stream: &mut tunnel::Tunnel,
) -> Result<u64, String> {
    let dir = tempfile::tempdir_in(&config.state_dir)
        .map_err(|e| format!("cannot make a restore dir: {e}"))?;
    give_to_admin(&config.postgresql.admin_command_prefix, dir.path());
    let prefix = &config.postgresql.admin_command_prefix;
    let mut argv: Vec<String> = prefix.clone();
    argv.extend([
        "tar".into(),
        "-C".into(),
        dir.path().display().to_string(),
        "-xf".into(),
        "-".into(),
    ]);
    let mut tar = tokio::process::Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start tar: {e}"))?;
    let mut stdin = tar.stdin.take().ok_or("tar has no stdin")?;
    let received = receive_framed(stream, &mut stdin).await;
    let _ = stdin.shutdown().await;
    drop(stdin);
    let out = tar
        .wait_with_output()
        .await
        .map_err(|e| format!("waiting for tar: {e}"))?;
    let (outcome, bytes) = received.map_err(|e| format!("receiving the dump of {db}: {e}"))?;
    if !outcome.ok {
        return Err(format!("dumping {db} on the origin: {}", outcome.error));
    }
    if !out.status.success() {
        return Err(format!(
            "unpacking the dump of {db}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let out = admin
        .command("pg_restore", db)
        .args(["--exit-on-error", "-j", &jobs.to_string()])
        .arg(dir.path())
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| format!("cannot start pg_restore: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "restoring {db}: pg_restore {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(bytes)
}

/// Lets the OS user of the administrator prefix (`runuser -u USER --`) own `dir`.
fn give_to_admin(prefix: &[String], dir: &Path) {
    let user = prefix
        .windows(2)
        .find(|w| w[0] == "-u")
        .map(|w| w[1].as_str());
    if let Some(Ok(Some(u))) = user.map(nix::unistd::User::from_name) {
        let _ = nix::unistd::chown(dir, Some(u.uid), Some(u.gid));
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pg::TableManifest;

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
