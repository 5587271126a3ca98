//! The target's side of a physical standby: during the hot phase this host's cluster follows
//! the origin's; at the cutover it catches up and is promoted, so the downtime holds no dump
//! and no restore.
//!
//! Following: the origin makes a replication role and slot under the grant and streams a
//! base backup (tar). The target stops its cluster, sets its own data directory aside, and
//! unpacks the backup into a fresh one as *data only*: directories and regular files with
//! plain relative names, owned by the cluster's user — a link, a device, a tablespace or a
//! name that climbs out is refused. The origin's configuration files are not used: the
//! target's own `postgresql.conf`, `pg_hba.conf`, `pg_ident.conf` and
//! `postgresql.auto.conf` come back from the set-aside directory, and the standby settings
//! are the agent's. The standby's WAL receiver connects to the agent's relay (a Unix socket
//! in `postgresql.relay_dir`), which opens a tunnel to the origin's data plane under the
//! grant: the replication connection rides the agents' mutual TLS, no port opens between
//! hosts. Any failure puts the set-aside directory back and starts the cluster again.
//!
//! Promoting (MoveDatabases with `promote`, origin services stopped): the origin's WAL insert
//! position is read through the data plane; the standby is polled (as BlueMind's owner role,
//! `search_path` pinned: the cluster now holds the origin's roles and databases) until it has
//! replayed up to it; `pg_ctl promote` (a signal, no SQL); the target's own
//! `postgresql.auto.conf` is put back; then every table is compared with the origin's.
//! A physical standby brings the origin's PostgreSQL roles along (accepted in DESIGN.md's
//! trust boundaries); the agent runs no SQL as a superuser in it.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bmfleet_proto::v1::{DatabaseMove, FollowDatabasesReply, OriginEndpoint};
use tokio::task::JoinHandle;

use crate::config::AgentConfig;
use crate::db::compare::origin_checksums;
use crate::db::follow::{follow_reply, following, set_following, Following};
use crate::db::pg::{literal, Connection, Session};
use crate::db::replication::FollowTicket;
use crate::db::wal::{major, parse_lsn, stop_position};
use crate::plane::tunnel::{self, receive_framed, TunnelRequest};

/// The configuration files a cluster keeps in its data directory; the target's own are used.
const OWN_FILES: [&str; 4] = [
    "postgresql.conf",
    "pg_hba.conf",
    "pg_ident.conf",
    "postgresql.auto.conf",
];

/// The port in the relay socket's name (`.s.PGSQL.5432`).
pub const RELAY_PORT: u16 = 5432;

/// The relay from the standby's WAL receiver to the origin (one listener at a time).
#[derive(Default)]
pub struct Relay {
    task: Mutex<Option<JoinHandle<()>>>,
}

impl Relay {
    /// Serves `state`'s origin on the relay socket, replacing any previous relay.
    pub fn start(
        &self,
        config: &AgentConfig,
        tls: Arc<rustls::ClientConfig>,
        state: &Following,
    ) -> Result<(), String> {
        let dir = &config.postgresql.relay_dir;
        let owner = relay_owner(config)?;
        std::fs::create_dir_all(dir)
            .and_then(|()| std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)))
            .and_then(|()| std::os::unix::fs::chown(dir, Some(owner.0), Some(owner.1)))
            .map_err(|e| format!("preparing the relay dir {}: {e}", dir.display()))?;
        let socket = dir.join(format!(".s.PGSQL.{RELAY_PORT}"));
        let _ = std::fs::remove_file(&socket);
        let listener = tokio::net::UnixListener::bind(&socket)
            .map_err(|e| format!("listening on {}: {e}", socket.display()))?;
        std::os::unix::fs::chown(&socket, Some(owner.0), Some(owner.1))
            .and_then(|()| {
                std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))
            })
            .map_err(|e| format!("securing {}: {e}", socket.display()))?;
        let origin = state.endpoint();
        let timeout = Duration::from_secs(config.data_plane.connect_timeout_secs);
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut local, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                let (origin, tls) = (origin.clone(), tls.clone());
                tokio::spawn(async move {
                    let request = TunnelRequest::Replication {
                        grant: origin.grant_id.clone(),
                    };
                    match tunnel::open(&origin, tls, &request, timeout).await {
                        Ok(mut remote) => {
                            let _ = tokio::io::copy_bidirectional(&mut local, &mut remote).await;
                        }
                        Err(e) => {
                            tracing::warn!(origin = %origin.name, error = %e, "standby relay: the origin refused or cannot be reached")
                        }
                    }
                });
            }
        });
        if let Some(previous) = self.lock().replace(task) {
            previous.abort();
        }
        Ok(())
    }

    /// Stops relaying.
    pub fn stop(&self) {
        if let Some(task) = self.lock().take() {
            task.abort();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<JoinHandle<()>>> {
        self.task.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn data_dir(config: &AgentConfig) -> Result<PathBuf, String> {
    if let Some(why) = config.postgresql.standby_unavailable() {
        return Err(format!("this host cannot follow its origin: {why}"));
    }
    config
        .postgresql
        .data_dir
        .clone()
        .ok_or_else(|| "postgresql.data_dir is not set".into())
}

fn aside_dir(data_dir: &Path) -> PathBuf {
    let mut name = data_dir.as_os_str().to_owned();
    name.push(".bmfleet-target");
    PathBuf::from(name)
}

/// The cluster's user and group: the owner of its data directory (or of the set-aside one).
fn cluster_owner(config: &AgentConfig) -> Result<(u32, u32), String> {
    let dir = data_dir(config)?;
    let aside = aside_dir(&dir);
    let meta = std::fs::metadata(&aside)
        .or_else(|_| std::fs::metadata(&dir))
        .map_err(|e| format!("reading {}: {e}", dir.display()))?;
    Ok((meta.uid(), meta.gid()))
}

/// Who may use the relay socket: the cluster's user (its data directory's owner, else the
/// `postgres` account: a subscriber needs no data directory configured).
fn relay_owner(config: &AgentConfig) -> Result<(u32, u32), String> {
    if let Ok(owner) = cluster_owner(config) {
        return Ok(owner);
    }
    nix::unistd::User::from_name("postgres")
        .ok()
        .flatten()
        .map(|u| (u.uid.as_raw(), u.gid.as_raw()))
        .ok_or_else(|| {
            "postgresql.data_dir is not set and there is no postgres account: who runs the \
             cluster is unknown"
                .into()
        })
}

/// The major version in a data directory's `PG_VERSION` (e.g. 15).
fn data_dir_major(dir: &Path) -> Result<u32, String> {
    let path = dir.join("PG_VERSION");
    std::fs::read_to_string(&path)
        .map_err(|e| format!("reading {}: {e}", path.display()))?
        .trim()
        .parse()
        .map_err(|e| format!("{}: {e}", path.display()))
}

async fn server(config: &AgentConfig, start: bool) -> Result<(), String> {
    let pg = &config.postgresql;
    let (what, argv) = if start {
        ("start", &pg.server_start)
    } else {
        ("stop", &pg.server_stop)
    };
    let result = crate::command::run("postgresql", argv, Duration::from_secs(300)).await;
    if crate::command::succeeded(&result) {
        Ok(())
    } else {
        Err(format!(
            "the cluster did not {what}: {}",
            crate::command::failure_summary(&result)
        ))
    }
}

/// Runs `pg_ctl ARGS -D data_dir` as the cluster's administrator (a signal or a file, no SQL).
async fn pg_ctl(config: &AgentConfig, args: &[&str]) -> Result<(), String> {
    let pg = &config.postgresql;
    let dir = data_dir(config)?;
    let mut argv = vec![crate::db::pg::bin_dir(pg)
        .join("pg_ctl")
        .display()
        .to_string()];
    argv.extend(args.iter().map(|a| a.to_string()));
    argv.extend(["-D".to_string(), dir.display().to_string()]);
    let result = crate::command::run_behind(
        "postgresql",
        &pg.admin_command_prefix,
        &argv,
        Duration::from_secs(300),
    )
    .await;
    if crate::command::succeeded(&result) {
        Ok(())
    } else {
        Err(crate::command::failure_summary(&result))
    }
}

/// Makes this host's cluster a standby of `origin` (grant with the replication scope).
/// Never fails as a call: the reply says what happened.
pub async fn follow(
    config: &AgentConfig,
    tls: Arc<rustls::ClientConfig>,
    relay: &Relay,
    origin: &OriginEndpoint,
) -> FollowDatabasesReply {
    let started = Instant::now();
    follow_reply(started, follow_inner(config, tls, relay, origin).await)
}

async fn follow_inner(
    config: &AgentConfig,
    tls: Arc<rustls::ClientConfig>,
    relay: &Relay,
    origin: &OriginEndpoint,
) -> Result<u64, String> {
    if let Some(state) = following(config).filter(|s| s.logical.is_some() && !s.promoted) {
        return Err(format!(
            "this host's databases subscribe to {}: it cannot be a standby as well",
            state.name
        ));
    }
    let dir = data_dir(config)?;
    let aside = aside_dir(&dir);
    let first = !aside.exists();
    let own = if first { &dir } else { &aside };
    let own_major = data_dir_major(own)?;
    if first {
        refuse_foreign_databases(config).await?;
    }
    let timeout = Duration::from_secs(config.data_plane.connect_timeout_secs);
    let request = TunnelRequest::BaseBackup {
        grant: origin.grant_id.clone(),
    };
    let (mut stream, ticket): (_, FollowTicket) = tunnel::ask(
        origin,
        tls.clone(),
        &request,
        timeout,
        "the origin's replication ticket",
    )
    .await?;
    if major(ticket.server_version_num) != own_major {
        return Err(format!(
            "the origin runs PostgreSQL {} and this host {own_major}: a physical standby needs \
             the same major (use db_sync = \"dump\")",
            major(ticket.server_version_num)
        ));
    }
    relay.stop();
    let (uid, gid) = cluster_owner(config)?;
    if std::fs::metadata(dir.join("postmaster.pid")).is_ok() {
        server(config, false).await?;
    }
    if first {
        if let Err(e) = std::fs::rename(&dir, &aside) {
            // Nothing moved: the cluster starts again as it was.
            let restarted = server(config, true).await;
            return Err(format!(
                "setting the cluster's data dir {} aside: {e}{}",
                dir.display(),
                restarted
                    .err()
                    .map(|r| format!("; starting it again failed: {r}"))
                    .unwrap_or_default()
            ));
        }
    } else if dir.exists() {
        // A previous attempt's standby or partial copy: the target's own is the set-aside one.
        std::fs::remove_dir_all(&dir).map_err(|e| format!("removing {}: {e}", dir.display()))?;
    }
    let state = Following {
        address: origin.address.clone(),
        name: origin.name.clone(),
        grant_id: origin.grant_id.clone(),
        promoted: false,
        logical: None,
        verified: None,
    };
    let installed = async {
        let bytes = unpack(&mut stream, &dir, uid, gid).await?;
        configure(
            &dir,
            &aside,
            &ticket,
            &config.postgresql.relay_dir,
            uid,
            gid,
        )?;
        set_following(config, Some(&state))?;
        relay.start(config, tls.clone(), &state)?;
        server(config, true).await?;
        wait_standby(config).await?;
        Ok::<u64, String>(bytes)
    }
    .await;
    match installed {
        Ok(bytes) => {
            tracing::info!(origin = %origin.name, bytes, "the cluster follows the origin");
            Ok(bytes)
        }
        Err(error) => Err(match put_back(config, relay).await {
            Ok(()) => format!("{error} (this host's cluster is back as it was)"),
            Err(e) => format!("{error}; putting this host's cluster back failed: {e}"),
        }),
    }
}

/// Stops following and puts this host's own cluster (the set-aside directory) back, started.
pub async fn put_back(config: &AgentConfig, relay: &Relay) -> Result<(), String> {
    let dir = data_dir(config)?;
    let aside = aside_dir(&dir);
    // Without the set-aside cluster, the data dir may be the only copy: it stays.
    if !aside.is_dir() {
        return Err(format!(
            "the set-aside cluster {} is missing: {} is left as it is",
            aside.display(),
            dir.display()
        ));
    }
    relay.stop();
    set_following(config, None)?;
    if std::fs::metadata(dir.join("postmaster.pid")).is_ok() {
        server(config, false).await?;
    }
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(|e| format!("removing {}: {e}", dir.display()))?;
    }
    std::fs::rename(&aside, &dir)
        .map_err(|e| format!("putting {} back as {}: {e}", aside.display(), dir.display()))?;
    server(config, true).await
}

/// The agent is the last word on its disk: a cluster holding databases other than
/// BlueMind's is not replaced.
async fn refuse_foreign_databases(config: &AgentConfig) -> Result<(), String> {
    let pg = &config.postgresql;
    let out = Connection::admin(pg)
        .psql(
            "postgres",
            "SELECT datname FROM pg_catalog.pg_database WHERE datname NOT IN ('postgres', 'template0', 'template1') ORDER BY 1;\n",
        )
        .await
        .map_err(|e| format!("listing this host's databases: {e}"))?;
    let foreign: Vec<&str> = out
        .lines()
        .filter(|d| !d.is_empty() && !pg.databases.iter().any(|b| b == d))
        .collect();
    if foreign.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "this host's cluster holds databases that are not BlueMind's ({}): a standby would \
             replace them; move them elsewhere or use db_sync = \"dump\"",
            foreign.join(", ")
        ))
    }
}

/// Receives the base backup's tar and unpacks it into `dir` (created here), data only.
async fn unpack(
    stream: &mut tunnel::Tunnel,
    dir: &Path,
    uid: u32,
    gid: u32,
) -> Result<u64, String> {
    let (mut writer, reader) = tokio::io::duplex(1 << 20);
    let reader = tokio_util::io::SyncIoBridge::new(reader);
    let dir_owned = dir.to_path_buf();
    let unpacking = tokio::task::spawn_blocking(move || unpack_tar(reader, &dir_owned, uid, gid));
    let received = receive_framed(stream, &mut writer).await;
    drop(writer);
    // An entry refused stops the unpacking (and so the receiving): its reason comes first.
    unpacking
        .await
        .map_err(|e| format!("unpacking the base backup stopped: {e}"))??;
    let (outcome, bytes) = received.map_err(|e| format!("receiving the base backup: {e}"))?;
    if !outcome.ok {
        return Err(format!(
            "the origin's base backup failed: {}",
            outcome.error
        ));
    }
    Ok(bytes)
}

/// Unpacks a tar of a data directory: directories and regular files only, every name plain
/// and relative, everything owned by `uid:gid` with modes 0700/0600.
pub fn unpack_tar<R: std::io::Read>(
    reader: R,
    dir: &Path,
    uid: u32,
    gid: u32,
) -> Result<(), String> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let mkdir = |path: &Path| -> Result<(), String> {
        match std::fs::DirBuilder::new().mode(0o700).create(path) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                return Err(format!("creating {}: {e}", path.display()))
            }
            _ => {}
        }
        let meta =
            std::fs::symlink_metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
        if !meta.is_dir() {
            return Err(format!("{} is not a directory", path.display()));
        }
        std::os::unix::fs::lchown(path, Some(uid), Some(gid))
            .map_err(|e| format!("chown {}: {e}", path.display()))
    };
    mkdir(dir)?;
    let mut archive = tar::Archive::new(reader);
    let entries = archive
        .entries()
        .map_err(|e| format!("reading the base backup: {e}"))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| format!("reading the base backup: {e}"))?;
        let name = entry
            .path()
            .map_err(|e| format!("a base backup entry's name: {e}"))?
            .into_owned();
        let mut relative = PathBuf::new();
        for component in name.components() {
            match component {
                Component::Normal(part) => relative.push(part),
                Component::CurDir => {}
                _ => {
                    return Err(format!(
                        "refused: the base backup names {}, outside the data directory",
                        name.display()
                    ))
                }
            }
        }
        if relative.as_os_str().is_empty() {
            continue;
        }
        let kind = entry.header().entry_type();
        let target = dir.join(&relative);
        if kind.is_dir() {
            // Parents first (a tar may list a file before its dir); none of them can be a
            // link: nothing but dirs and files is ever created here.
            let mut at = dir.to_path_buf();
            for part in relative.components() {
                at.push(part);
                mkdir(&at)?;
            }
        } else if kind.is_file() {
            if let Some(parent) = relative.parent() {
                let mut at = dir.to_path_buf();
                for part in parent.components() {
                    at.push(part);
                    mkdir(&at)?;
                }
            }
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(nix::libc::O_NOFOLLOW)
                .open(&target)
                .map_err(|e| format!("creating {}: {e}", target.display()))?;
            std::io::copy(&mut entry, &mut file)
                .map_err(|e| format!("writing {}: {e}", target.display()))?;
            std::os::unix::fs::fchown(&file, Some(uid), Some(gid))
                .map_err(|e| format!("chown {}: {e}", target.display()))?;
        } else if relative.starts_with("pg_tblspc") {
            return Err(
                "refused: the origin's cluster has tablespaces (pg_tblspc/…): a standby \
                 would write outside its data directory; use db_sync = \"dump\""
                    .into(),
            );
        } else {
            return Err(format!(
                "refused: the base backup holds {} of type {:?}: only directories and \
                 regular files are accepted",
                name.display(),
                kind
            ));
        }
    }
    Ok(())
}

/// The standby's settings: the target's own configuration files (from the set-aside dir),
/// then the agent's lines for following the origin through the relay.
fn configure(
    dir: &Path,
    aside: &Path,
    ticket: &FollowTicket,
    relay_dir: &Path,
    uid: u32,
    gid: u32,
) -> Result<(), String> {
    for name in OWN_FILES {
        let (theirs, ours) = (dir.join(name), aside.join(name));
        let _ = std::fs::remove_file(&theirs);
        if ours.exists() {
            copy_owned(&ours, &theirs, uid, gid)?;
        }
    }
    let conninfo = format!(
        "host={} port={RELAY_PORT} user={} password={} application_name=bmfleet",
        conninfo_value(&relay_dir.display().to_string()),
        conninfo_value(&ticket.role),
        conninfo_value(&ticket.password),
    );
    let lines = format!(
        "\n# bmfleet: this cluster follows its origin until the cutover\n\
         primary_conninfo = {}\n\
         primary_slot_name = {}\n\
         # the verified point's checksums run on the standby: replay waits for them, and the\n\
         # origin keeps the rows they read\n\
         hot_standby_feedback = on\n\
         max_standby_streaming_delay = -1\n",
        literal(&conninfo),
        literal(&ticket.slot)
    );
    let auto = dir.join("postgresql.auto.conf");
    append_owned(&auto, &lines, uid, gid)?;
    append_owned(&dir.join("standby.signal"), "", uid, gid)
}

/// A libpq connection-string value, quoted.
fn conninfo_value(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
}

fn copy_owned(from: &Path, to: &Path, uid: u32, gid: u32) -> Result<(), String> {
    std::fs::copy(from, to)
        .and_then(|_| std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o600)))
        .and_then(|()| std::os::unix::fs::lchown(to, Some(uid), Some(gid)))
        .map_err(|e| format!("copying {} to {}: {e}", from.display(), to.display()))
}

fn append_owned(path: &Path, text: &str, uid: u32, gid: u32) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .and_then(|()| std::os::unix::fs::lchown(path, Some(uid), Some(gid)))
        .map_err(|e| format!("writing {}: {e}", path.display()))
}

/// Waits until the standby accepts connections (as the owner role) and is in recovery.
async fn wait_standby(config: &AgentConfig) -> Result<(), String> {
    let owner = Connection::owner(&config.postgresql);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let answer = owner
            .psql("postgres", "SELECT pg_catalog.pg_is_in_recovery();\n")
            .await;
        match answer {
            Ok(out) if out.trim() == "t" => return Ok(()),
            Ok(out) => {
                return Err(format!(
                    "the cluster started but is not a standby (in recovery: {})",
                    out.trim()
                ))
            }
            // Still starting (or replaying up to a consistent state): wait; anything else
            // (a refused password, say) will not change by waiting.
            Err(e) if Instant::now() < deadline && still_starting(&e.detail) => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(e) => return Err(format!("the standby does not answer: {e}")),
        }
    }
}

/// A connection error that a server still starting gives.
fn still_starting(detail: &str) -> bool {
    [
        "starting up",
        "not yet accepting connections",
        "Connection refused",
        "No such file or directory",
        "consistent recovery state",
    ]
    .iter()
    .any(|m| detail.contains(m))
}

/// Catches the standby up with the stopped origin, promotes it, and compares every table
/// with the origin's (`state`: what this host follows, a physical standby of `origin`).
pub async fn promote(
    config: &AgentConfig,
    tls: Arc<rustls::ClientConfig>,
    relay: &Relay,
    origin: &OriginEndpoint,
    state: Following,
    known: Option<&bmfleet_proto::v1::WalPosition>,
) -> Result<(Vec<DatabaseMove>, String), String> {
    let started = Instant::now();
    let owner = Connection::owner(&config.postgresql);
    if state.promoted {
        // A repeated request (the agent restarted after promoting): compare only.
        let (theirs, ours) = tokio::join!(
            crate::db::compare::origin_manifest(config, tls, origin, true),
            crate::db::compare::own_manifests(config, &owner)
        );
        return Ok((
            crate::db::compare::compare_all(&theirs?, &ours?, 0),
            "every table compared (a repeated request)".into(),
        ));
    }
    // The origin is stopped: its half of the comparison starts now, beside the catch-up —
    // what changed since the verified point when there is one, else every table.
    let gate = match &state.verified {
        Some(verified) => {
            let (config, tls, origin, verified) = (
                config.clone(),
                tls.clone(),
                origin.clone(),
                verified.clone(),
            );
            Gate::Changed(tokio::spawn(async move {
                crate::db::gate::verified_point::ask_changed(&config, tls, &origin, &verified).await
            }))
        }
        None => Gate::Full(origin_checksums(config, tls.clone(), origin)),
    };
    // One session watches the replay and the promotion (a psql started per look cost
    // ~25 ms each), opened while the origin is asked for its position (unless its agent read
    // it at the stop).
    let (position, watch) = tokio::join!(
        stop_position(config, tls.clone(), origin, known),
        owner.warm_session("postgres")
    );
    let (position, wanted) = position?;
    let mut watch = watch.map_err(|e| format!("watching the standby's replay: {e}"))?;
    let position_ms = started.elapsed().as_millis();
    let mut last_seen = String::new();
    let already_promoted = loop {
        let out = watch
            .line("SELECT pg_catalog.pg_is_in_recovery(), pg_catalog.pg_last_wal_replay_lsn();")
            .await
            .map_err(|e| format!("asking the standby how far it replayed: {e}"))?;
        let (recovery, replayed) = out.trim().split_once('\t').unwrap_or((out.trim(), ""));
        // Out of recovery: promoted by an earlier request that did not finish (it promotes
        // only once caught up); the comparison below is the proof either way.
        if recovery != "t" {
            break true;
        }
        if parse_lsn(replayed).is_some_and(|r| r >= wanted) {
            break false;
        }
        if replayed != last_seen {
            tracing::info!(replayed, wanted = %position.lsn, "the standby catches up");
            last_seen = replayed.to_string();
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let caught_up_ms = started.elapsed().as_millis() as u64;
    // Replayed up to the origin's last write: the data is final.
    let theirs = match gate {
        Gate::Changed(asked) => {
            let (promoted, compared) = tokio::join!(
                async {
                    promote_and_settle(config, relay, &state, already_promoted, watch).await?;
                    Ok::<_, String>(started.elapsed().as_millis())
                },
                async {
                    // This host's tables are read while the origin still reads its WAL.
                    let (asked, here) = tokio::join!(
                        asked,
                        crate::db::gate::verified_point::tables_here(config, &owner)
                    );
                    let (stream, selection) = asked
                        .map_err(|e| format!("asking for the changed blocks stopped: {e}"))??;
                    let compared = crate::db::gate::verified_point::compare_selection(
                        &owner, here?, stream, selection,
                    )
                    .await;
                    compared.map(|c| (c, started.elapsed().as_millis()))
                }
            );
            let promoted_ms = promoted?;
            tracing::info!(origin = %origin.name, caught_up_ms, promoted_ms, "the standby is promoted");
            match compared {
                Ok(((theirs, ours, covered), compared_ms)) => {
                    // Where the step's time went, from its start: the gate's own account.
                    let covered = format!(
                        "{covered}; the origin's last position {lsn} ({source}) known at {position_ms} ms, replayed at {caught_up_ms} ms, promoted at {promoted_ms} ms, compared at {compared_ms} ms",
                        lsn = position.lsn,
                        source = if known.is_some() { "read by its agent at the stop" } else { "asked now" },
                    );
                    tracing::info!(origin = %origin.name, %covered, "the databases' gate");
                    return Ok((
                        crate::db::compare::compare_manifests(&theirs, &ours, caught_up_ms),
                        covered,
                    ));
                }
                Err(why) => {
                    tracing::warn!(origin = %origin.name, %why, "the gate on the changes since the verified point failed: every table is compared");
                    let fallback = format!("every table compared: the changes since the verified point could not be ({why})");
                    let (theirs, ours) = tokio::join!(
                        crate::db::compare::origin_manifest(config, tls, origin, true),
                        crate::db::compare::own_manifests(config, &owner)
                    );
                    return Ok((
                        crate::db::compare::compare_all(&theirs?, &ours?, caught_up_ms),
                        fallback,
                    ));
                }
            }
        }
        Gate::Full(theirs) => theirs,
    };
    // This host's checksums run beside the promotion (sessions outlive it).
    let (promoted, ours) = tokio::join!(
        promote_and_settle(config, relay, &state, already_promoted, watch),
        crate::db::compare::own_manifests(config, &owner)
    );
    promoted?;
    let ours = ours?;
    tracing::info!(origin = %origin.name, caught_up_ms, "the standby is promoted");
    let theirs = theirs
        .await
        .map_err(|e| format!("the origin's checksums stopped: {e}"))??;
    Ok((
        crate::db::compare::compare_all(&theirs, &ours, caught_up_ms),
        "every table compared: no verified point".into(),
    ))
}

/// The origin's half of the downtime's comparison, under way during the catch-up.
enum Gate {
    /// The blocks changed since the verified point (the tunnel then carries the sums).
    Changed(
        JoinHandle<
            Result<
                (
                    crate::plane::tunnel::Tunnel,
                    crate::db::gate::verified_point::Selection,
                ),
                String,
            >,
        >,
    ),
    /// Every table's checksum.
    Full(JoinHandle<Result<crate::db::compare::ManifestReply, String>>),
}

/// Promotes the standby (`pg_ctl promote`, a signal), puts the target's own settings back
/// (the standby lines carried the replication password) and records the promotion.
async fn promote_and_settle(
    config: &AgentConfig,
    relay: &Relay,
    state: &Following,
    already_promoted: bool,
    watch: Session,
) -> Result<(), String> {
    if !already_promoted {
        // pg_ctl's own wait looks every 100 ms: the signal alone, then a closer look.
        pg_ctl(config, &["promote", "-W"]).await?;
        wait_promoted(watch).await?;
    }
    relay.stop();
    // The copy holds the origin's catalog, with the replication role the origin made for this
    // grant (LOGIN REPLICATION, a password the origin knows): it goes.
    // The target's own settings come back beside it.
    // Both in one administrator's session warmed ahead (a psql and a pg_ctl started here
    // cost ~45 ms in the downtime); both may run twice.
    let (role, _) = crate::db::wal::names(&state.grant_id);
    let dir = data_dir(config)?;
    let aside = aside_dir(&dir);
    let (uid, gid) = cluster_owner(config)?;
    let auto = dir.join("postgresql.auto.conf");
    let _ = std::fs::remove_file(&auto);
    if aside.join("postgresql.auto.conf").exists() {
        copy_owned(&aside.join("postgresql.auto.conf"), &auto, uid, gid)?;
    }
    let drop_and_reload = format!(
        "DROP ROLE IF EXISTS {};\nSELECT pg_catalog.pg_reload_conf();\n",
        crate::db::pg::ident(&role)
    );
    Connection::admin(&config.postgresql)
        .psql_warm("postgres", &drop_and_reload)
        .await
        .map_err(|e| {
            format!(
                "dropping the origin's replication role here and reloading the own settings: {e}"
            )
        })?;
    set_following(
        config,
        Some(&Following {
            promoted: true,
            ..state.clone()
        }),
    )?;
    // The set-aside cluster goes: renamed at once (no later follow may take a half-removed
    // copy for this host's own cluster), removed off the downtime's critical path.
    let mut discarded = aside.clone().into_os_string();
    discarded.push(".discarded");
    let discarded = PathBuf::from(discarded);
    let _ = std::fs::remove_dir_all(&discarded);
    let gone = if std::fs::rename(&aside, &discarded).is_ok() {
        discarded
    } else {
        aside
    };
    // Removed by a thread of the lowest CPU priority: the downtime's other steps share the
    // host's cores, and the removal can wait for an idle one.
    let _ = std::thread::Builder::new().name("set-aside".into()).spawn(move || {
        // Linux keeps a nice value per thread: this one only.
        let _ = rustix::process::setpriority_process(Some(rustix::thread::gettid()), 19);
        if let Err(e) = std::fs::remove_dir_all(&gone) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(dir = %gone.display(), error = %e, "removing the set-aside cluster failed");
            }
        }
    });
    Ok(())
}

/// Waits (up to 300 s, looking every 5 ms in `watch`) until the cluster has left recovery.
async fn wait_promoted(mut watch: Session) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let out = watch
            .line("SELECT pg_catalog.pg_is_in_recovery();")
            .await
            .map_err(|e| format!("asking the promoted standby whether it left recovery: {e}"))?;
        if out.trim() == "f" {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err("the standby was promoted but did not leave recovery within 300 s".into());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Whether `config`'s relay should run at start (this host follows an origin).
pub fn resume(config: &AgentConfig, tls: Arc<rustls::ClientConfig>, relay: &Relay) {
    if let Some(state) = following(config).filter(|s| !s.promoted) {
        match relay.start(config, tls, &state) {
            Ok(()) => tracing::info!(origin = %state.name, "standby relay resumed"),
            Err(e) => tracing::error!(error = %e, "the standby relay cannot resume"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_of(entries: &[(&str, tar::EntryType, &[u8])]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (name, kind, data) in entries {
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(*kind);
            header.set_size(data.len() as u64);
            header.set_mode(0o777);
            if *kind == tar::EntryType::Symlink {
                header.set_link_name("/etc").unwrap();
            }
            // Raw names: the builder's own checks would refuse the hostile ones.
            let raw = &mut header.as_old_mut().name;
            raw[..name.len()].copy_from_slice(name.as_bytes());
            header.set_cksum();
            builder.append(&header, *data).unwrap();
        }
        builder.into_inner().unwrap()
    }

    #[test]
    fn a_base_backup_unpacks_as_data_only() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("data");
        let (uid, gid) = (
            nix::unistd::getuid().as_raw(),
            nix::unistd::getgid().as_raw(),
        );
        let good = tar_of(&[
            ("PG_VERSION", tar::EntryType::Regular, b"15\n"),
            ("base/1/1259", tar::EntryType::Regular, b"page"),
            ("pg_wal/", tar::EntryType::Directory, b""),
        ]);
        unpack_tar(&good[..], &dir, uid, gid).unwrap();
        assert_eq!(std::fs::read(dir.join("base/1/1259")).unwrap(), b"page");
        let mode = std::fs::metadata(dir.join("PG_VERSION")).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(dir.join("pg_wal").is_dir());
        for (hostile, kind, why) in [
            ("../escape", tar::EntryType::Regular, "outside"),
            ("/etc/passwd", tar::EntryType::Regular, "outside"),
            ("pg_tblspc/16384", tar::EntryType::Symlink, "tablespaces"),
            ("link", tar::EntryType::Symlink, "only directories"),
            ("fifo", tar::EntryType::Fifo, "only directories"),
            ("hard", tar::EntryType::Link, "only directories"),
        ] {
            let dir = root.path().join(format!("d{}", hostile.len()));
            let bad = tar_of(&[(hostile, kind, b"x")]);
            let error = unpack_tar(&bad[..], &dir, uid, gid).unwrap_err();
            assert!(error.contains(why), "{hostile}: {error}");
        }
        assert!(!root.path().join("escape").exists());
        // A file already there (say, planted) is never written through.
        let dir = root.path().join("again");
        std::fs::create_dir(&dir).unwrap();
        std::os::unix::fs::symlink("/etc/hostname", dir.join("PG_VERSION")).unwrap();
        let error = unpack_tar(&good[..], &dir, uid, gid).unwrap_err();
        assert!(error.contains("PG_VERSION"), "{error}");
    }
}
