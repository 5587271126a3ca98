//! BlueMind's PostgreSQL from the agent's side: where the client programs are, who connects
//! (BlueMind's user with its password, or the administrator), and per-table manifests.
//! Passwords travel only in the child's environment (PGPASSWORD), never in argv.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

use crate::config::{AgentConfig, PostgresConfig};

/// The newest `/usr/lib/postgresql/N/bin`, or the configured dir.
pub fn bin_dir(config: &PostgresConfig) -> PathBuf {
    if let Some(dir) = &config.bin_dir {
        return dir.clone();
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let major = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            Some((major, e.path().join("bin")))
        })
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, p)| p)
        .unwrap_or_else(|| PathBuf::from("/usr/bin"))
}

/// BlueMind's database password: `password` in the origin's `/etc/bm/bm.ini` (generated from
/// BlueMind 5.2 on), else the configured one.
pub fn bluemind_password(bm_ini: &Path, fallback: &str) -> String {
    std::fs::read_to_string(bm_ini)
        .ok()
        .and_then(|text| ini_value(&text, "password"))
        .unwrap_or_else(|| fallback.to_string())
}

/// The value of `key` in INI text (first occurrence, any section), trimmed of quotes.
pub fn ini_value(text: &str, key: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let line = line.trim();
        if line.starts_with(['#', ';', '[']) {
            return None;
        }
        let (k, v) = line.split_once('=')?;
        (k.trim() == key).then(|| v.trim().trim_matches('"').to_string())
    })
}

/// A way to run PostgreSQL client programs: as BlueMind's user or as the administrator.
#[derive(Clone)]
pub struct Connection {
    prefix: Vec<String>,
    bin: PathBuf,
    host: String,
    port: u16,
    user: String,
    password: Option<String>,
    /// Session settings (PGOPTIONS): [`PINNED`] and more.
    options: String,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

/// A PostgreSQL client program failed.
#[derive(Debug, thiserror::Error)]
#[error("{program} {what}: {detail}")]
pub struct PgError {
    /// The program.
    pub program: String,
    /// What it was doing.
    pub what: String,
    /// Its stderr or the spawn error.
    pub detail: String,
}

/// Settings every connection of the agent pins from the client side (`PGOPTIONS`). A
/// client's settings override what `ALTER DATABASE … SET` and `ALTER ROLE … SET` left in a
/// catalog, and a catalog may have come from another host: functions and operators resolve
/// in `pg_catalog` only, string literals are standard (the agent's quoting relies on it), no
/// library loads for a session, and values print the same on both hosts (the checksums
/// compare their text).
const PINNED: &str = "-c search_path=pg_catalog -c standard_conforming_strings=on \
     -c local_preload_libraries= -c DateStyle=ISO,MDY -c IntervalStyle=postgres \
     -c extra_float_digits=3 -c TimeZone=UTC -c bytea_output=hex";

/// What only a superuser may pin on top of [`PINNED`]: no library a catalog names loads at
/// login, and the session acts as its login role unless the agent says otherwise.
const PINNED_SUPERUSER: &str = "-c session_preload_libraries=";

impl Connection {
    /// BlueMind's user, logging in with `password`: on this origin's own cluster, or into a
    /// database a target made itself and restores a dump into (the role and its settings are
    /// the target's own there). Never on a cluster that came from another host.
    pub fn bluemind(config: &PostgresConfig, password: String) -> Self {
        Connection {
            prefix: Vec::new(),
            bin: bin_dir(config),
            host: config.host.clone(),
            port: config.port,
            user: config.user.clone(),
            password: Some(password),
            options: PINNED.into(),
        }
    }

    /// BlueMind's user on this host's own cluster, its password read from this host's
    /// `/etc/bm/bm.ini` (the configured one when there is none).
    pub fn bluemind_here(config: &AgentConfig) -> Self {
        let pg = &config.postgresql;
        let password =
            bluemind_password(&config.host_path(Path::new("/etc/bm/bm.ini")), &pg.password);
        Self::bluemind(pg, password)
    }

    /// The administrator (peer or trust authentication through the command prefix), every
    /// login-time setting of its role and of the database neutralised.
    pub fn admin(config: &PostgresConfig) -> Self {
        Connection {
            prefix: config.admin_command_prefix.clone(),
            bin: bin_dir(config),
            host: config.admin_host.clone(),
            port: config.port,
            user: config.admin_user.clone(),
            password: None,
            options: format!("{PINNED} {PINNED_SUPERUSER} -c role=none"),
        }
    }

    /// BlueMind's owner role in databases that came from another host (a restore, a
    /// standby's copy, a subscriber's databases): the administrator's login, neutralised as
    /// in [`Connection::admin`], acting as the owner role (`role`, as `SET ROLE` does). No
    /// password is needed, none of the owner role's own login-time settings applies (a
    /// non-superuser login could not clear `session_preload_libraries`), and every statement
    /// runs with the owner's privileges, never a superuser's.
    pub fn owner(config: &PostgresConfig) -> Self {
        let admin = Self::admin(config);
        Connection {
            options: format!("{PINNED} {PINNED_SUPERUSER} -c role={}", config.user),
            ..admin
        }
    }

    /// A command running `program` (pg_dump, psql, pg_restore) against `database` (none
    /// when empty).
    pub fn command(&self, program: &str, database: &str) -> Command {
        let exe = self.bin.join(program);
        let mut argv: Vec<String> = vec![exe.display().to_string()];
        argv.extend([
            "-h".into(),
            self.host.clone(),
            "-p".into(),
            self.port.to_string(),
            "-U".into(),
            self.user.clone(),
            "-w".into(),
        ]);
        // pg_basebackup's -d is a connection string: it is given none.
        if !database.is_empty() {
            argv.extend(["-d".into(), database.to_string()]);
        }
        let mut cmd = crate::command::prefixed(&self.prefix, &argv);
        cmd.kill_on_drop(true).env_remove("PGPASSWORD");
        if let Some(pw) = &self.password {
            cmd.env("PGPASSWORD", pw);
        }
        cmd.env("PGOPTIONS", &self.options);
        cmd
    }

    /// psql on `database`: SQL on stdin, unaligned tab-separated rows on stdout, stopping at
    /// the first error.
    fn psql_command(&self, database: &str) -> Command {
        let mut cmd = self.command("psql", database);
        cmd.args(["-X", "-q", "-A", "-t", "-F", "\t", "-v", "ON_ERROR_STOP=1"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    }

    /// Runs SQL (given on stdin, so it never shows in argv) with psql; returns stdout.
    pub async fn psql(&self, database: &str, sql: &str) -> Result<String, PgError> {
        let err = |what: &str, detail: String| PgError {
            program: "psql".into(),
            what: format!("{what} ({database})"),
            detail,
        };
        let mut child = self
            .psql_command(database)
            .spawn()
            .map_err(|e| err("cannot start", e.to_string()))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(sql.as_bytes())
                .await
                .map_err(|e| err("writing SQL", e.to_string()))?;
        }
        let out = child
            .wait_with_output()
            .await
            .map_err(|e| err("waiting", e.to_string()))?;
        if !out.status.success() {
            return Err(err(
                "failed",
                String::from_utf8_lossy(&out.stderr).trim().to_string(),
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// An interactive psql session on `database`: statements sent one at a time, each
    /// answer read before the next is sent (a transaction held open between them).
    pub async fn session(&self, database: &str) -> Result<Session, PgError> {
        let err = |detail: String| PgError {
            program: "psql".into(),
            what: format!("cannot start ({database})"),
            detail,
        };
        let mut child = self
            .psql_command(database)
            .spawn()
            .map_err(|e| err(e.to_string()))?;
        let stdin = child.stdin.take().ok_or_else(|| err("no stdin".into()))?;
        let stdout = child.stdout.take().ok_or_else(|| err("no stdout".into()))?;
        Ok(Session {
            database: database.to_string(),
            child,
            stdin,
            stdout: BufReader::new(stdout),
        })
    }

    /// Starts psql sessions on `database` now (up to `count` waiting), connected and idle, for
    /// [`Connection::warm_session`] and [`Connection::psql_warm`] to take in the downtime (a
    /// psql's start costs more CPU than its queries, on cores the downtime's steps share).
    /// Kept for [`WARM_TTL`] at most; a session that cannot start is simply not there.
    pub async fn warm(&self, database: &str, count: usize) {
        let key = self.warm_key(database);
        let there = warm_pool().iter().filter(|w| w.key == key).count();
        if there >= count {
            return;
        }
        for _ in there..count {
            match self.session(database).await {
                Ok(session) => warm_pool().push(Warm {
                    key: key.clone(),
                    session,
                    since: std::time::Instant::now(),
                }),
                Err(e) => tracing::debug!(error = %e, "a psql session could not be warmed"),
            }
        }
        // Unused ones end with their time.
        tokio::spawn(async {
            tokio::time::sleep(WARM_TTL).await;
            expire(&mut warm_pool());
        });
    }

    /// A session on `database` warmed ahead ([`Connection::warm`]) that still runs, or a new one.
    pub async fn warm_session(&self, database: &str) -> Result<Session, PgError> {
        match self.take_warm(database) {
            Some(session) => Ok(session),
            None => self.session(database).await,
        }
    }

    /// [`Connection::psql`] on a session warmed ahead when there is one. For statements that
    /// read, or may run twice: a warmed session that fails (its server restarted meanwhile)
    /// is followed by a fresh psql.
    pub async fn psql_warm(&self, database: &str, sql: &str) -> Result<String, PgError> {
        if let Some(session) = self.take_warm(database) {
            match session.finish(sql).await {
                Ok(out) => return Ok(out),
                Err(e) => {
                    tracing::info!(error = %e, "a warmed psql session failed: a fresh one runs it")
                }
            }
        }
        self.psql(database, sql).await
    }

    fn take_warm(&self, database: &str) -> Option<Session> {
        let key = self.warm_key(database);
        let mut pool = warm_pool();
        expire(&mut pool);
        let at = pool.iter().position(|w| w.key == key)?;
        Some(pool.swap_remove(at).session)
    }

    /// What makes two sessions interchangeable: the same program, server, login, password,
    /// settings and database.
    fn warm_key(&self, database: &str) -> String {
        format!(
            "{:?}\0{}\0{}\0{}\0{}\0{:?}\0{}\0{database}",
            self.prefix,
            self.bin.display(),
            self.host,
            self.port,
            self.user,
            self.password,
            self.options
        )
    }

    /// Which of `wanted` exist on the server.
    pub async fn existing_databases(&self, wanted: &[String]) -> Result<Vec<String>, PgError> {
        let out = self
            .psql(
                "postgres",
                "SELECT datname FROM pg_database ORDER BY datname;",
            )
            .await?;
        let present: Vec<&str> = out.lines().collect();
        Ok(wanted
            .iter()
            .filter(|w| present.contains(&w.as_str()))
            .cloned()
            .collect())
    }

    /// The extensions installed in `database`, with their schemas.
    pub async fn extensions(&self, database: &str) -> Result<Vec<Extension>, PgError> {
        let out = self
            .psql(
                database,
                "SELECT e.extname, n.nspname FROM pg_catalog.pg_extension e
                 JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace
                 WHERE e.extname <> 'plpgsql' ORDER BY 1;",
            )
            .await?;
        Ok(out
            .lines()
            .filter_map(|l| l.split_once('\t'))
            .map(|(name, schema)| Extension {
                database: database.to_string(),
                name: name.to_string(),
                schema: schema.to_string(),
            })
            .collect())
    }

    /// The server's `server_version_num` (110000 for 11.0).
    pub async fn server_version_num(&self) -> Result<u32, PgError> {
        let out = self.psql("postgres", "SHOW server_version_num;").await?;
        out.trim().parse().map_err(|_| PgError {
            program: "psql".into(),
            what: "SHOW server_version_num".into(),
            detail: format!("unexpected answer {out:?}"),
        })
    }

    /// Every sequence of `database` and its last value (the origin's, for a subscriber to take
    /// at the cutover: logical replication does not carry them).
    pub async fn sequences(&self, database: &str) -> Result<Vec<SequenceValue>, PgError> {
        let out = self
            .psql(
                database,
                "SELECT schemaname || '.' || sequencename, last_value FROM pg_catalog.pg_sequences ORDER BY 1;",
            )
            .await?;
        Ok(out
            .lines()
            .filter_map(|l| l.split_once('\t'))
            .map(|(name, value)| SequenceValue {
                name: name.to_string(),
                last_value: value.parse().ok(),
            })
            .collect())
    }

    /// Rows and a content checksum (by `checksum`) of every table of `database`.
    pub async fn manifest(
        &self,
        database: &str,
        checksum: Checksum,
    ) -> Result<DatabaseManifest, PgError> {
        let tables = self
            .psql(
                database,
                "SELECT n.nspname, c.relname FROM pg_class c
                 JOIN pg_namespace n ON n.oid = c.relnamespace
                 WHERE c.relkind = 'r'
                   AND n.nspname NOT IN ('pg_catalog', 'information_schema')
                   AND n.nspname NOT LIKE 'pg_toast%'
                 ORDER BY 1, 2;",
            )
            .await?;
        let queries: Vec<String> = tables
            .lines()
            .filter_map(|l| l.split_once('\t'))
            .map(|(schema, table)| {
                format!(
                    "SELECT {name}, count(*), {sum} FROM ONLY {s}.{t} t",
                    sum = checksum.sql(),
                    name = literal(&format!("{schema}.{table}")),
                    s = ident(schema),
                    t = ident(table),
                )
            })
            .collect();
        let mut manifest = DatabaseManifest {
            name: database.to_string(),
            tables: Vec::new(),
            sequences: Vec::new(),
        };
        if queries.is_empty() {
            return Ok(manifest);
        }
        let out = self
            .psql(database, &format!("{};", queries.join("\nUNION ALL\n")))
            .await?;
        for line in out.lines() {
            let mut parts = line.split('\t');
            if let (Some(table), Some(rows), Some(sum)) = (parts.next(), parts.next(), parts.next())
            {
                manifest.tables.push(TableManifest {
                    table: table.to_string(),
                    rows: rows.parse().unwrap_or(0),
                    checksum: sum.to_string(),
                });
            }
        }
        manifest.tables.sort_by(|a, b| a.table.cmp(&b.table));
        Ok(manifest)
    }
}

/// How long a session warmed ahead ([`Connection::warm`]) waits to be taken.
pub const WARM_TTL: std::time::Duration = std::time::Duration::from_secs(600);

/// A session warmed ahead, and for which connection and database.
struct Warm {
    key: String,
    session: Session,
    since: std::time::Instant,
}

/// Drops the warmed sessions whose time is up or whose psql has ended.
fn expire(pool: &mut Vec<Warm>) {
    pool.retain_mut(|w| {
        w.since.elapsed() < WARM_TTL && w.session.child.try_wait().is_ok_and(|s| s.is_none())
    });
}

/// The sessions warmed ahead, in this agent.
fn warm_pool() -> std::sync::MutexGuard<'static, Vec<Warm>> {
    static POOL: std::sync::Mutex<Vec<Warm>> = std::sync::Mutex::new(Vec::new());
    POOL.lock().unwrap_or_else(|p| p.into_inner())
}

/// An interactive psql session ([`Connection::session`]). Dropping it kills psql, which ends
/// (rolls back) any transaction it held.
pub struct Session {
    database: String,
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Session {
    fn error(&self, what: &str, detail: String) -> PgError {
        PgError {
            program: "psql".into(),
            what: format!("{what} ({})", self.database),
            detail,
        }
    }

    /// Sends `sql` (statements whose last one answers one row) and returns that row.
    pub async fn line(&mut self, sql: &str) -> Result<String, PgError> {
        self.stdin
            .write_all(format!("{sql}\n").as_bytes())
            .await
            .map_err(|e| self.error("writing SQL", e.to_string()))?;
        self.stdin
            .flush()
            .await
            .map_err(|e| self.error("writing SQL", e.to_string()))?;
        let mut line = String::new();
        let read = self
            .stdout
            .read_line(&mut line)
            .await
            .map_err(|e| self.error("reading an answer", e.to_string()))?;
        if read == 0 {
            // psql stopped (ON_ERROR_STOP): its stderr says why.
            let mut detail = String::new();
            if let Some(mut stderr) = self.child.stderr.take() {
                let _ = stderr.read_to_string(&mut detail).await;
            }
            return Err(self.error("failed", detail.trim().to_string()));
        }
        Ok(line.trim_end_matches('\n').to_string())
    }

    /// Sends `sql` as the session's last input and returns everything it printed.
    pub async fn finish(mut self, sql: &str) -> Result<String, PgError> {
        self.stdin
            .write_all(sql.as_bytes())
            .await
            .map_err(|e| self.error("writing SQL", e.to_string()))?;
        drop(self.stdin);
        let mut out = String::new();
        if let Err(e) = self.stdout.read_to_string(&mut out).await {
            return Err(PgError {
                program: "psql".into(),
                what: format!("reading answers ({})", self.database),
                detail: e.to_string(),
            });
        }
        let mut detail = String::new();
        if let Some(mut stderr) = self.child.stderr.take() {
            let _ = stderr.read_to_string(&mut detail).await;
        }
        let status = self.child.wait().await.map_err(|e| PgError {
            program: "psql".into(),
            what: format!("waiting ({})", self.database),
            detail: e.to_string(),
        })?;
        if !status.success() {
            return Err(PgError {
                program: "psql".into(),
                what: format!("failed ({})", self.database),
                detail: detail.trim().to_string(),
            });
        }
        Ok(out)
    }
}

/// A SCRAM-SHA-256 verifier of `password` (RFC 7677, as PostgreSQL stores it and as psql's
/// `\password` computes it client-side): `ALTER ROLE … PASSWORD 'SCRAM-SHA-256$…'` then sets
/// the password without the password itself ever being in SQL text (statement logs). The
/// password is used as bytes (PostgreSQL applies SASLprep first, which changes only
/// non-ASCII passwords).
pub fn scram_verifier(password: &str) -> Result<String, String> {
    use base64::Engine;
    use ring::{digest, hmac, pbkdf2, rand::SecureRandom};
    const ITERATIONS: u32 = 4096;
    let mut salt = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut salt)
        .map_err(|_| "no randomness for a password salt".to_string())?;
    let mut salted = [0u8; 32];
    pbkdf2::derive(
        pbkdf2::PBKDF2_HMAC_SHA256,
        std::num::NonZeroU32::new(ITERATIONS).ok_or("iterations")?,
        &salt,
        password.as_bytes(),
        &mut salted,
    );
    let key = hmac::Key::new(hmac::HMAC_SHA256, &salted);
    let client_key = hmac::sign(&key, b"Client Key");
    let stored_key = digest::digest(&digest::SHA256, client_key.as_ref());
    let server_key = hmac::sign(&key, b"Server Key");
    let b64 = base64::engine::general_purpose::STANDARD;
    Ok(format!(
        "SCRAM-SHA-256${ITERATIONS}:{}${}:{}",
        b64.encode(salt),
        b64.encode(stored_key.as_ref()),
        b64.encode(server_key.as_ref())
    ))
}

/// A quoted SQL identifier.
pub fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A quoted SQL string literal.
pub fn literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// Rows and checksums of a database's tables.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatabaseManifest {
    /// The database.
    pub name: String,
    /// Its tables, by name.
    pub tables: Vec<TableManifest>,
    /// Its sequences' values, in the origin's answer only (a subscriber takes them at the
    /// cutover: logical replication does not carry them).
    #[serde(default)]
    pub sequences: Vec<SequenceValue>,
}

/// A sequence's value as `pg_sequences` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SequenceValue {
    /// `schema.sequence`.
    pub name: String,
    /// Its last value; `None` when never used (or not readable).
    pub last_value: Option<i64>,
}

/// How a table's rows are summed into its checksum. Both are order-free (a sum over rows, no
/// sort) and labelled, so two manifests made differently never compare equal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checksum {
    /// The sum of the 64-bit `hashtextextended` of every row's text: PostgreSQL 11 and later
    /// (the hash partitioning relies on it staying the same across versions). ~5× faster.
    Hash64,
    /// The sums of both halves of every row's md5: any version.
    Md5,
}

impl Checksum {
    /// The method both sides can use, given the origin's `server_version_num` (the target's
    /// PostgreSQL is at least as new).
    pub fn for_origin(server_version_num: u32) -> Self {
        if server_version_num >= 110_000 {
            Checksum::Hash64
        } else {
            Checksum::Md5
        }
    }

    /// The SQL expression over the rows `t` of one table.
    fn sql(self) -> &'static str {
        match self {
            Checksum::Hash64 => {
                "'h64:' || coalesce(sum(hashtextextended(t::text, 0)::numeric), 0)"
            }
            Checksum::Md5 => {
                "'md5:' || coalesce(sum(('x' || substr(md5(t::text), 1, 16))::bit(64)::bigint::numeric), 0) || ':' || coalesce(sum(('x' || substr(md5(t::text), 17, 16))::bit(64)::bigint::numeric), 0)"
            }
        }
    }
}

/// An extension installed in a database.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extension {
    /// The database.
    pub database: String,
    /// The extension.
    pub name: String,
    /// The schema holding its objects.
    pub schema: String,
}

/// One table's rows and checksum (see [`Checksum`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableManifest {
    /// schema.table
    pub table: String,
    /// Row count.
    pub rows: u64,
    /// Content checksum.
    pub checksum: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bm_ini_password_is_read_from_any_section() {
        let ini = "[global]\nhost = 198.18.0.2\n# password = old\ndbtype = PGSQL\npassword = \"s3cr=t\"\n";
        assert_eq!(ini_value(ini, "password").as_deref(), Some("s3cr=t"));
        assert_eq!(ini_value(ini, "login"), None);
    }

    #[test]
    fn missing_bm_ini_falls_back_to_the_configured_password() {
        assert_eq!(
            bluemind_password(Path::new("/nonexistent/bm.ini"), "bj"),
            "bj"
        );
    }

    #[test]
    fn scram_verifiers_are_salted_and_carry_no_password() {
        let a = scram_verifier("it's a secret").unwrap();
        let b = scram_verifier("it's a secret").unwrap();
        assert_ne!(a, b);
        assert!(a.starts_with("SCRAM-SHA-256$4096:"), "{a}");
        assert!(!a.contains("secret") && !a.contains('\''), "{a}");
        assert!(a
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "$:+/=-".contains(c)));
    }

    #[test]
    fn sql_quoting_doubles_quotes() {
        assert_eq!(ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(literal("it's"), "'it''s'");
    }
}
