//! The origin's data plane: serves pulls to target agents, each admitted by a grant.
//!
//! Every connection is mutual TLS under the fleet CA; the caller must hold an agent
//! certificate whose name is the grant's target. What it may ask: rsync's sender half
//! (argv checked by [`crate::rsync_args`], paths resolved inside the grant), a database dump
//! (framed), or the databases' manifest.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use bmfleet_proto::admission::{Admission, Admitted, Limits};
use bmfleet_proto::identity::{peer_identity, Role};
use bmfleet_proto::tls::{accept_tls, Policy};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::Command;
use tokio_stream::StreamExt;

use crate::change_journal::{self, ChangeJournals};
use crate::config::AgentConfig;
use crate::config_set;
use crate::grants::{AdmitError, Grant, GrantStore};
use crate::pg;
use crate::replication;
use crate::rsync_args::parse_sender;
use crate::tunnel::{
    end_framed, read_json_line, send_framed, write_json_line, TunnelReply, TunnelRequest,
};

/// How long a client has to send its request line.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// What the data plane needs.
pub struct DataPlane {
    /// The agent's configuration.
    pub config: Arc<AgentConfig>,
    /// The grants.
    pub grants: Arc<GrantStore>,
    /// The agent's metrics (tunnel requests served and refused).
    pub metrics: Arc<crate::metrics::AgentMetrics>,
    /// rsync and pg_dump children running, in all and per grant.
    pub children: Admission<String>,
    /// Replication connections relayed, in all and per grant.
    pub relays: Admission<String>,
    /// The change journals of the instances this origin serves.
    pub changes: Arc<ChangeJournals>,
}

/// The most paths a journal-backed pass moves; more and the pass walks everything.
pub const MAX_JOURNAL_PATHS: usize = 200_000;

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

type Connection = Admitted<tokio_rustls::server::TlsStream<TcpStream>>;
type Stream = BufReader<Connection>;

impl DataPlane {
    /// Serves the data plane on `listener` with the agent's TLS server configuration.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, tls: Arc<rustls::ServerConfig>) {
        let mut incoming = accept_tls(
            listener,
            tls,
            Policy {
                limits: Limits::API,
                role: None,
            },
        );
        while let Some(conn) = incoming.next().await {
            let Ok(conn) = conn else { continue };
            let plane = self.clone();
            tokio::spawn(async move { plane.handle(conn).await });
        }
    }

    async fn handle(&self, conn: Connection) {
        let peer = conn.get_ref().get_ref().0.peer_addr().ok();
        crate::tunnel::keep_alive(conn.get_ref().get_ref().0);
        let caller = conn
            .get_ref()
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| peer_identity(c));
        let mut stream = BufReader::new(conn);
        let request: TunnelRequest =
            match tokio::time::timeout(HEADER_TIMEOUT, read_json_line(&mut stream)).await {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => {
                    tracing::warn!(?peer, error = %e, "data plane: bad request line");
                    self.metrics.tunnel("unknown", "refused");
                    let _ = refuse(&mut stream, format!("bad request line: {e}")).await;
                    return;
                }
                Err(_) => return,
            };
        let kind = request.kind();
        let caller = match caller {
            Some(Ok(id)) if id.role == Role::Agent => id,
            Some(Ok(id)) => {
                self.metrics.tunnel(kind, "refused");
                let _ = refuse(&mut stream, format!("certificate {id} is not an agent's")).await;
                return;
            }
            _ => {
                self.metrics.tunnel(kind, "refused");
                let _ = refuse(&mut stream, "no usable client certificate".into()).await;
                return;
            }
        };
        let grant_id = request.grant().to_string();
        let now = crate::server::now_ms();
        let grant = match self.grants.admit(&grant_id, &caller.name, now) {
            Ok(g) => g,
            Err(e) => {
                if let AdmitError::Store(_) = e {
                    tracing::error!(error = %e, "grant store failed");
                }
                tracing::warn!(?peer, caller = %caller, error = %e, "data plane: refused");
                self.metrics.tunnel(kind, "refused");
                let _ = refuse(&mut stream, e.to_string()).await;
                return;
            }
        };
        // Each request runs one child (rsync, pg_dump) or a query: bounded per grant and in all.
        let admission = match request {
            TunnelRequest::Replication { .. } => &self.relays,
            _ => &self.children,
        };
        let _child = match admission.admit(grant.id.clone()) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(?peer, caller = %caller, grant = %grant.id, reason = %e, "data plane: too many transfers");
                self.metrics.tunnel(kind, "refused");
                let _ = refuse(&mut stream, format!("busy: {e}; retry later")).await;
                return;
            }
        };
        let outcome = match request {
            TunnelRequest::Rsync {
                argv,
                journal_since,
                ..
            } => self.rsync(&grant, &argv, &journal_since, &mut stream).await,
            TunnelRequest::Changes {
                since, manifest, ..
            } => self.changes(&grant, &since, manifest, &mut stream).await,
            TunnelRequest::DumpDatabase {
                database,
                schema_only,
                ..
            } => self.dump(&grant, &database, schema_only, &mut stream).await,
            TunnelRequest::DatabaseManifest { names_only, .. } => {
                self.manifest(&grant, names_only, &mut stream).await
            }
            TunnelRequest::BaseBackup { .. } => self.base_backup(&grant, &mut stream).await,
            TunnelRequest::Publish { .. } => self.publish(&grant, &mut stream).await,
            TunnelRequest::Replication { .. } => match grant.require_replication() {
                Ok(()) => match admit(&mut stream).await {
                    Ok(()) => replication::relay_to_server(&self.config, &mut stream).await,
                    Err(e) => Err(e),
                },
                Err(e) => Err(e.to_string()),
            },
            TunnelRequest::WalPosition { .. } => self.wal_position(&grant, &mut stream).await,
            TunnelRequest::VerifiedPoint { per_block, .. } => match grant.require_replication() {
                Ok(()) => {
                    crate::verified_point::serve_hold(
                        &self.config,
                        &self.bluemind_connection(),
                        &grant.id,
                        per_block,
                        &mut stream,
                    )
                    .await
                }
                Err(e) => Err(e.to_string()),
            },
            TunnelRequest::ChangedTotals { since, .. } => match grant.require_databases() {
                Ok(()) => {
                    crate::block_point::serve_totals(
                        &self.config,
                        &self.bluemind_connection(),
                        &since,
                        &mut stream,
                    )
                    .await
                }
                Err(e) => Err(e.to_string()),
            },
            TunnelRequest::ChangedBlocks { since, tables, .. } => match grant.require_databases() {
                Ok(()) => {
                    crate::verified_point::serve_changed(
                        &self.config,
                        &self.bluemind_connection(),
                        &since,
                        &tables,
                        &mut stream,
                    )
                    .await
                }
                Err(e) => Err(e.to_string()),
            },
        };
        match outcome {
            Ok(()) => {
                self.metrics.tunnel(kind, "served");
                tracing::info!(?peer, caller = %caller.name, grant = %grant.id, "data plane: served")
            }
            Err(reason) => {
                self.metrics.tunnel(kind, "failed");
                tracing::warn!(?peer, caller = %caller.name, grant = %grant.id, %reason, "data plane: refused or failed");
                let _ = refuse(&mut stream, reason).await;
            }
        }
    }

    /// The BlueMind paths the change journal of `grant`'s instance recorded since the full
    /// pass of grant `since` began, sorted; or why the journal cannot tell. Only paths inside
    /// the grant's dirs whose every directory below the data root is a real directory (no
    /// symlink: rsync would follow it) are listed; anything else makes the journal unusable.
    async fn journal_paths(&self, grant: &Grant, since: &str) -> Result<Vec<String>, String> {
        grant.require_data_dirs().map_err(|e| e.to_string())?;
        let journal = self
            .changes
            .get(&change_journal::key(&grant.migration, &grant.target_name))
            .ok_or("no change journal runs for this instance (the agent restarted since?)")?;
        let since = since.to_string();
        let changed = tokio::task::spawn_blocking(move || journal.changes_since(&since))
            .await
            .map_err(|e| e.to_string())??;
        if changed.len() > MAX_JOURNAL_PATHS {
            return Err(format!(
                "{} paths changed, more than a journal pass moves ({MAX_JOURNAL_PATHS})",
                changed.len()
            ));
        }
        let config = self.config.clone();
        let granted = grant.paths.clone();
        tokio::task::spawn_blocking(move || {
            let root = &config.data_root;
            let dirs: Vec<PathBuf> = granted.iter().map(|p| config.host_path(p)).collect();
            let mut real_dirs = std::collections::HashSet::new();
            let mut listed = Vec::with_capacity(changed.len());
            for path in changed {
                let Some(under) = dirs.iter().find(|d| path.starts_with(d)) else {
                    return Err(format!("{} is outside the grant", path.display()));
                };
                let mut dir = path.parent().map(Path::to_path_buf);
                while let Some(d) = dir.filter(|d| d.starts_with(under) && d != under) {
                    if !real_dirs.contains(&d) {
                        match std::fs::symlink_metadata(&d) {
                            Ok(m) if m.file_type().is_symlink() => {
                                return Err(format!("{} is a symbolic link", d.display()))
                            }
                            _ => {
                                real_dirs.insert(d.clone());
                            }
                        }
                    }
                    dir = d.parent().map(Path::to_path_buf);
                }
                let below = path
                    .strip_prefix(root)
                    .map_err(|_| format!("{} is outside the data root", path.display()))?;
                let below = below
                    .to_str()
                    .ok_or_else(|| format!("{} is not a UTF-8 name", path.display()))?;
                listed.push(format!("/{below}"));
            }
            Ok(listed)
        })
        .await
        .map_err(|e| e.to_string())?
    }

    /// Answers a `changes` request: the journal's paths (NUL-separated), or their states
    /// (`manifest::PathState`, JSON), as data frames, then whether the journal is complete.
    async fn changes(
        &self,
        grant: &Grant,
        since: &str,
        manifest: bool,
        stream: &mut Stream,
    ) -> Result<(), String> {
        // Refused before admission, like every request outside its grant's scope.
        grant.require_data_dirs().map_err(|e| e.to_string())?;
        let mut listed = self.journal_paths(grant, since).await;
        if manifest {
            if let Ok(paths) = listed {
                let config = self.config.clone();
                listed = tokio::task::spawn_blocking(move || {
                    paths
                        .iter()
                        .map(|p| {
                            let state =
                                crate::manifest::path_state(p, &config.host_path(Path::new(p)))?;
                            serde_json::to_string(&state).map_err(|e| e.to_string())
                        })
                        .collect::<Result<Vec<String>, String>>()
                })
                .await
                .map_err(|e| e.to_string())?;
            }
        }
        admit(stream).await?;
        let outcome = match listed {
            Ok(paths) => {
                let mut text = Vec::new();
                for p in &paths {
                    text.extend_from_slice(p.as_bytes());
                    text.push(0);
                }
                crate::tunnel::send_framed(&mut text.as_slice(), stream)
                    .await
                    .map_err(|e| e.to_string())?;
                TunnelReply {
                    ok: true,
                    error: String::new(),
                }
            }
            Err(why) => TunnelReply {
                ok: false,
                error: why,
            },
        };
        crate::tunnel::end_framed(stream, &outcome)
            .await
            .map_err(|e| e.to_string())?;
        stream.shutdown().await.map_err(|e| e.to_string())
    }

    /// rsync's sender half. Refusals are returned before anything is admitted.
    async fn rsync(
        &self,
        grant: &Grant,
        argv: &[String],
        journal_since: &str,
        stream: &mut Stream,
    ) -> Result<(), String> {
        let args = parse_sender(argv).map_err(|e| e.to_string())?;
        let root = &self.config.data_root;
        let list_file;
        let (host_paths, list) = if args.journal {
            if args.paths != ["/"] {
                return Err("refused: the journal's paths are pulled from \"/\" only".into());
            }
            let paths = self
                .journal_paths(grant, journal_since)
                .await
                .map_err(|why| format!("the change journal cannot list the changes: {why}"))?;
            let mut text = String::new();
            for p in &paths {
                text.push_str(p.trim_start_matches('/'));
                text.push('\0');
            }
            list_file = tempfile::NamedTempFile::new_in(&self.config.state_dir)
                .map_err(|e| format!("cannot write the file list: {e}"))?;
            std::fs::write(list_file.path(), text)
                .map_err(|e| format!("cannot write the file list: {e}"))?;
            (vec![format!("{}/", root.display())], Some(list_file.path()))
        } else if args.config_set {
            grant.require_config_set().map_err(|e| e.to_string())?;
            if args.paths != ["/"] {
                return Err("refused: the configuration file set is pulled from \"/\" only".into());
            }
            let entries = config_set::list(&self.config.config_set.patterns, root);
            list_file = tempfile::NamedTempFile::new_in(&self.config.state_dir)
                .map_err(|e| format!("cannot write the file list: {e}"))?;
            std::fs::write(list_file.path(), config_set::list_text(&entries))
                .map_err(|e| format!("cannot write the file list: {e}"))?;
            (vec![format!("{}/", root.display())], Some(list_file.path()))
        } else {
            let mut paths = Vec::new();
            for p in &args.paths {
                let resolved = grant.resolve(p, root).map_err(|e| e.to_string())?;
                // Relative (one run for several dirs): the path below the data root, marked
                // with rsync's `/./`, so that it arrives at the same BlueMind path; checked
                // above, resolved (symlinks followed) inside the grant.
                paths.push(if args.relative {
                    format!("{}/.{p}", root.display().to_string().trim_end_matches('/'))
                } else {
                    resolved
                });
            }
            // A full pass: the journal counts changes from its start (its walk sees older ones).
            if let Some(journal) = self
                .changes
                .get(&change_journal::key(&grant.migration, &grant.target_name))
            {
                let id = grant.id.clone();
                let _ = tokio::task::spawn_blocking(move || journal.mark(&id)).await;
            }
            (paths, None)
        };
        let server_argv = args.server_argv(&host_paths, list);
        // rsync's "." and any relative path resolve against its working directory: an empty
        // one of its own, never the agent's (`/` under systemd).
        let workdir = tempfile::tempdir_in(&self.config.state_dir)
            .map_err(|e| format!("cannot make rsync's working directory: {e}"))?;
        let mut child = Command::new(&self.config.data_plane.rsync)
            .args(&server_argv[1..])
            .current_dir(workdir.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot start rsync on the origin: {e}"))?;
        admit(stream).await?;
        let (Some(stdin), Some(stdout), Some(mut stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            return Ok(());
        };
        let errors = tokio::spawn(async move {
            let mut text = String::new();
            let _ = stderr.read_to_string(&mut text).await;
            text
        });
        // rsync's output ends when the transfer does (or rsync dies): that ends the relay.
        // The client's input is relayed meanwhile; when the client goes away, rsync loses its
        // input, ends, and so does the relay.
        let copied = crate::tunnel::relay(stream, stdout, stdin).await;
        let status = child.wait().await;
        let stderr = errors.await.unwrap_or_default();
        if let Err(e) = copied {
            tracing::info!(error = %e, "rsync tunnel closed");
        }
        match status {
            Ok(s) if s.success() => {}
            Ok(s) => {
                tracing::warn!(status = %s, stderr = %stderr.trim(), "origin rsync ended with an error")
            }
            Err(e) => tracing::warn!(error = %e, "origin rsync"),
        }
        Ok(())
    }

    fn bluemind_connection(&self) -> pg::Connection {
        let pg_config = &self.config.postgresql;
        let password = pg::bluemind_password(
            &self.config.host_path(Path::new("/etc/bm/bm.ini")),
            &pg_config.password,
        );
        pg::Connection::bluemind(pg_config, password)
    }

    /// Streams one database as a custom-format archive (`pg_dump -Fc`): an archive carries
    /// SQL for the server only, never client commands, and the target restores it with
    /// pg_restore as the database's owner.
    async fn dump(
        &self,
        grant: &Grant,
        database: &str,
        schema_only: bool,
        stream: &mut Stream,
    ) -> Result<(), String> {
        // A subscriber's schema comes under its replication grant; data only under databases.
        if !(schema_only && grant.require_replication().is_ok()) {
            grant.require_databases().map_err(|e| e.to_string())?;
        }
        if !self
            .config
            .postgresql
            .databases
            .iter()
            .any(|d| d == database)
        {
            return Err(format!(
                "refused: {database} is not one of BlueMind's databases"
            ));
        }
        let mut pg_dump = self.bluemind_connection().command("pg_dump", database);
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
    async fn base_backup(&self, grant: &Grant, stream: &mut Stream) -> Result<(), String> {
        grant.require_replication().map_err(|e| e.to_string())?;
        let ticket = replication::prepare(&self.config, &self.grants, grant).await?;
        let mut pg_basebackup =
            pg::Connection::admin(&self.config.postgresql).command("pg_basebackup", "");
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
    async fn publish(&self, grant: &Grant, stream: &mut Stream) -> Result<(), String> {
        grant.require_replication().map_err(|e| e.to_string())?;
        let ticket = crate::publication::prepare(&self.config, &self.grants, grant).await?;
        admit(stream).await?;
        write_json_line(stream, &ticket)
            .await
            .map_err(|e| e.to_string())?;
        stream.shutdown().await.map_err(|e| e.to_string())
    }

    /// The WAL position of the origin now (its services are stopped: the standby promotes
    /// once it has replayed up to it).
    async fn wal_position(&self, grant: &Grant, stream: &mut Stream) -> Result<(), String> {
        if grant.require_databases().is_err() {
            grant.require_replication().map_err(|e| e.to_string())?;
        }
        let position = replication::wal_position(&self.config).await?;
        admit(stream).await?;
        write_json_line(stream, &position)
            .await
            .map_err(|e| e.to_string())?;
        stream.shutdown().await.map_err(|e| e.to_string())
    }

    async fn manifest(
        &self,
        grant: &Grant,
        names_only: bool,
        stream: &mut Stream,
    ) -> Result<(), String> {
        grant.require_databases().map_err(|e| e.to_string())?;
        let conn = self.bluemind_connection();
        let existing = conn
            .existing_databases(&self.config.postgresql.databases)
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
        let pg_config = &self.config.postgresql;
        let reply = ManifestReply {
            databases,
            server_version_num,
            extensions,
            user: pg_config.user.clone(),
            password: pg::bluemind_password(
                &self.config.host_path(Path::new("/etc/bm/bm.ini")),
                &pg_config.password,
            ),
        };
        admit(stream).await?;
        write_json_line(stream, &reply)
            .await
            .map_err(|e| e.to_string())?;
        stream.shutdown().await.map_err(|e| e.to_string())
    }
}

/// Tells the client its request is admitted (what follows is the answer).
async fn admit(stream: &mut Stream) -> Result<(), String> {
    write_json_line(
        stream,
        &TunnelReply {
            ok: true,
            error: String::new(),
        },
    )
    .await
    .map_err(|e| e.to_string())
}

/// Starts `command`, admits the client (then sends `preamble` as a JSON line, if any),
/// streams the command's stdout as data frames and ends with its outcome (exit status and
/// stderr).
async fn stream_output(
    program: &str,
    mut command: Command,
    preamble: Option<serde_json::Value>,
    stream: &mut Stream,
) -> Result<(), String> {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {program}: {e}"))?;
    admit(stream).await?;
    if let Some(preamble) = preamble {
        write_json_line(stream, &preamble)
            .await
            .map_err(|e| e.to_string())?;
    }
    let mut stdout = child
        .stdout
        .take()
        .ok_or_else(|| format!("{program} has no stdout"))?;
    let sent = send_framed(&mut stdout, stream).await;
    let out = child.wait_with_output().await;
    let outcome = finish(program, sent.map(|_| ()), out);
    end_framed(stream, &outcome)
        .await
        .map_err(|e| e.to_string())
}

/// The end-frame outcome of a streamed child.
fn finish(
    program: &str,
    sent: std::io::Result<()>,
    out: std::io::Result<std::process::Output>,
) -> TunnelReply {
    let error = match (sent, out) {
        (Err(e), _) => format!("streaming {program}'s output: {e}"),
        (_, Err(e)) => format!("waiting for {program}: {e}"),
        (Ok(()), Ok(out)) if !out.status.success() => format!(
            "{program} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        _ => String::new(),
    };
    TunnelReply {
        ok: error.is_empty(),
        error,
    }
}

async fn refuse(stream: &mut Stream, error: String) -> std::io::Result<()> {
    write_json_line(stream, &TunnelReply { ok: false, error }).await?;
    stream.shutdown().await
}
