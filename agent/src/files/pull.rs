//! The target's side of a data-dir sync: real rsync pulling from the origin through the
//! agents' tunnel (`-e "bmfleet-agent tunnel"`), with pass statistics read from rsync's own
//! itemized output and `--stats`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bmfleet_proto::tls::TlsFiles;
use bmfleet_proto::v1::{OriginEndpoint, PullEvent, SyncStats};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::Command;
use tokio::sync::mpsc;

use crate::config::AgentConfig;

/// Where partial files wait between interrupted passes (protected from --delete by rsync).
pub const PARTIAL_DIR: &str = ".bmfleet-partial";
/// How often progress is streamed.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// Environment variables that tell `bmfleet-agent tunnel` where and how to connect.
pub mod env {
    /// Origin data-plane address.
    pub const ADDRESS: &str = "BMFLEET_TUNNEL_ADDRESS";
    /// Origin agent name.
    pub const NAME: &str = "BMFLEET_TUNNEL_NAME";
    /// Grant id.
    pub const GRANT: &str = "BMFLEET_TUNNEL_GRANT";
    /// Fleet CA file.
    pub const CA: &str = "BMFLEET_TUNNEL_CA";
    /// Target certificate file.
    pub const CERT: &str = "BMFLEET_TUNNEL_CERT";
    /// Target key file.
    pub const KEY: &str = "BMFLEET_TUNNEL_KEY";
    /// Admission deadline, seconds.
    pub const TIMEOUT: &str = "BMFLEET_TUNNEL_TIMEOUT";
    /// The fleet's revocation list, when the agent has one.
    pub const CRL: &str = "BMFLEET_TUNNEL_CRL";
    /// A journal pass: the full pass's grant id the journal counts from.
    pub const JOURNAL_SINCE: &str = "BMFLEET_TUNNEL_JOURNAL_SINCE";
}

/// The error of a pull whose caller went away (rsync was stopped).
pub const CANCELLED: &str = "cancelled by the caller";

/// An rsync run through the tunnel, as a command ready to spawn.
pub struct RsyncRun {
    /// The command (stdout and stderr piped).
    pub command: Command,
}

/// The agent's own binary as rsync's remote shell. When a package upgrade replaced it while
/// the agent runs, Linux names the running one `… (deleted)`: the new binary at the same path
/// serves (its `tunnel` is the same wire), and the agent should be restarted.
fn replaced_binary(exe: std::path::PathBuf) -> std::path::PathBuf {
    let text = exe.display().to_string();
    match text.strip_suffix(" (deleted)") {
        Some(original) if std::path::Path::new(original).is_file() => {
            tracing::warn!(binary = %original, "the agent's binary was replaced while it runs: restart the agent");
            std::path::PathBuf::from(original)
        }
        _ => exe,
    }
}

/// Builds the rsync command that pulls `sources` (rsync source specs such as
/// `origin:/var/spool/cyrus/`, then `:/var/lib/cyrus/` for more from the same origin) into
/// `dest`, with `extra` options, through the tunnel.
pub fn rsync_through_tunnel(
    config: &AgentConfig,
    origin: &OriginEndpoint,
    extra: &[String],
    sources: &[String],
    dest: &str,
) -> Result<RsyncRun, String> {
    let program = match &config.data_plane.tunnel_program {
        Some(p) => p.clone(),
        None => replaced_binary(
            std::env::current_exe().map_err(|e| format!("cannot find the agent binary: {e}"))?,
        ),
    };
    let program = program.display().to_string();
    if program.contains(['\'', '"', ' ']) {
        return Err(format!(
            "the tunnel program path {program:?} must not contain quotes or spaces"
        ));
    }
    let tls: &TlsFiles = &config.tls;
    let mut command = Command::new(&config.data_plane.rsync);
    command
        .args(extra)
        .arg("-e")
        .arg(format!("{program} tunnel"))
        .args(sources)
        .arg(dest)
        .env(env::ADDRESS, &origin.address)
        .env(env::NAME, &origin.name)
        .env(env::GRANT, &origin.grant_id)
        .env(env::CA, &tls.ca)
        .env(env::CERT, &tls.cert)
        .env(env::KEY, &tls.key)
        .env_remove(env::CRL)
        .env(
            env::TIMEOUT,
            config.data_plane.connect_timeout_secs.to_string(),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Some(crl) = &tls.crl {
        command.env(env::CRL, crl);
    }
    Ok(RsyncRun { command })
}

/// The options of a data-dir pass: archive with hard links, POSIX ACLs, extended attributes
/// and sparse files kept sparse, deletions, owners mapped by name (no --numeric-ids), partial files kept aside, itemized output and statistics.
/// `--modify-window=-1` compares modification times to the nanosecond: a file rewritten
/// with the same size within the second of the previous pass (a cyrus index after a flag
/// change) is not skipped.
pub fn pass_options(bwlimit_kib: u32) -> Vec<String> {
    let mut options: Vec<String> = [
        "-aHAXS",
        "--delete",
        "--modify-window=-1",
        "--partial-dir",
        PARTIAL_DIR,
        "--stats",
        "--out-format=%i %l %n",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    options.push(crate::files::rsync_args::timeout_option());
    if bwlimit_kib > 0 {
        options.push(format!("--bwlimit={bwlimit_kib}"));
    }
    options
}

/// Counts what an itemized line says changed. Returns (changed entries, bytes, deleted).
fn itemized(line: &str) -> Option<(u64, u64, u64)> {
    let (code, rest) = line.split_once(' ')?;
    if code == "*deleting" {
        return Some((0, 0, 1));
    }
    let mut chars = code.chars();
    let (kind, what) = (chars.next()?, chars.next()?);
    if code.len() != 11 || !"<>ch.".contains(kind) || !"fdLDS".contains(what) {
        return None;
    }
    let size: u64 = rest.trim_start().split(' ').next()?.parse().ok()?;
    let bytes = if kind == '>' || kind == '<' { size } else { 0 };
    Some((1, bytes, 0))
}

/// A number as rsync prints it ("1,234,567" or "0.012").
fn number(text: &str) -> f64 {
    text.split_whitespace()
        .next()
        .unwrap_or("0")
        .replace(',', "")
        .parse()
        .unwrap_or(0.0)
}

/// Applies one `--stats` line to `stats`. Returns whether the line was a stats line.
pub fn stats_line(line: &str, stats: &mut SyncStats) -> bool {
    let Some((key, value)) = line.split_once(": ") else {
        return false;
    };
    let v = number(value);
    match key {
        "Number of files" => stats.files_scanned = v as u64,
        "Number of deleted files" => stats.entries_deleted = v as u64,
        "Total file size" => stats.bytes_scanned = v as u64,
        "Total transferred file size" => stats.bytes_changed = v as u64,
        "Literal data" => stats.literal_bytes = v as u64,
        "Total bytes received" => stats.bytes_received = v as u64,
        "File list generation time" => stats.scan_ms = (v * 1000.0) as u64,
        _ => return false,
    }
    true
}

/// The outcome of one rsync run.
pub struct RunOutcome {
    /// Final statistics.
    pub stats: SyncStats,
    /// rsync's exit code (-1 when it did not exit normally).
    pub exit_code: i32,
    /// stderr tail.
    pub stderr: String,
    /// The caller went away and rsync was killed.
    pub cancelled: bool,
}

/// Runs an rsync command to its end, streaming progress on `progress` at most every second.
/// If the receiver of `progress` goes away, rsync is killed (cancel).
pub async fn run_rsync(
    mut run: RsyncRun,
    progress: &mpsc::Sender<PullEvent>,
) -> Result<RunOutcome, String> {
    let started = Instant::now();
    let mut child = run
        .command
        .spawn()
        .map_err(|e| format!("cannot start rsync: {e}"))?;
    let (Some(stdout), Some(mut stderr)) = (child.stdout.take(), child.stderr.take()) else {
        return Err("rsync has no stdout".into());
    };
    let errors = tokio::spawn(async move {
        let mut buf = Vec::new();
        let _ = stderr.read_to_end(&mut buf).await;
        let start = buf.len().saturating_sub(4096);
        String::from_utf8_lossy(&buf[start..]).into_owned()
    });
    let mut stats = SyncStats::default();
    let mut lines = BufReader::new(stdout);
    let mut line = Vec::new();
    let mut ticker = tokio::time::interval(PROGRESS_EVERY);
    ticker.tick().await;
    let mut cancelled = false;
    loop {
        line.clear();
        tokio::select! {
            read = lines.read_until(b'\n', &mut line) => {
                match read {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
            _ = ticker.tick() => {
                stats.elapsed_ms = started.elapsed().as_millis() as u64;
                let _ = progress.try_send(PullEvent {
                    stats: Some(stats.clone()),
                    ..Default::default()
                });
                continue;
            }
            _ = progress.closed() => {
                cancelled = true;
                let _ = child.kill().await;
                break;
            }
        }
        let text = String::from_utf8_lossy(&line);
        let text = text.trim_end_matches('\n');
        if let Some((changed, bytes, _)) = itemized(text) {
            stats.files_changed += changed;
            stats.bytes_changed += bytes;
        } else {
            stats_line(text, &mut stats);
        }
    }
    let status = child
        .wait()
        .await
        .map_err(|e| format!("waiting for rsync: {e}"))?;
    stats.elapsed_ms = started.elapsed().as_millis() as u64;
    Ok(RunOutcome {
        stats,
        exit_code: status.code().unwrap_or(-1),
        stderr: errors.await.unwrap_or_default(),
        cancelled,
    })
}

/// Where a BlueMind data dir lives on this host (created when missing).
pub fn destination(config: &AgentConfig, path: &str) -> Result<PathBuf, String> {
    let clean = crate::files::rsync_args::clean_absolute(path).map_err(|e| e.to_string())?;
    let dest = config.host_path(&clean);
    std::fs::create_dir_all(&dest).map_err(|e| format!("cannot create {}: {e}", dest.display()))?;
    Ok(dest)
}

/// The attributes of the directories above the data dirs (`/var`, `/var/spool`…), taken before
/// a pass and put back after it: the pass asks the origin not to send them
/// (`--no-implied-dirs`), and a hostile origin that sends them anyway changes nothing there.
struct Ancestors(Vec<(PathBuf, u32, u32, u32)>);

impl Ancestors {
    fn record(config: &AgentConfig, paths: &[String]) -> Self {
        use std::os::unix::fs::MetadataExt;
        let mut seen = std::collections::BTreeSet::new();
        for p in paths {
            let mut dir = Path::new(p).parent();
            while let Some(d) = dir.filter(|d| d.parent().is_some()) {
                seen.insert(config.host_path(d));
                dir = d.parent();
            }
        }
        Ancestors(
            seen.into_iter()
                .filter_map(|d| {
                    let m = d.symlink_metadata().ok()?;
                    m.is_dir().then(|| (d, m.mode() & 0o7777, m.uid(), m.gid()))
                })
                .collect(),
        )
    }

    fn restore(&self) {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        for (dir, mode, uid, gid) in &self.0 {
            let Ok(now) = dir.symlink_metadata() else {
                continue;
            };
            if (now.mode() & 0o7777, now.uid(), now.gid()) != (*mode, *uid, *gid) {
                tracing::warn!(dir = %dir.display(), "the origin changed a directory above the data dirs: restored");
                let _ = std::os::unix::fs::lchown(dir, Some(*uid), Some(*gid));
                let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(*mode));
            }
        }
    }
}

/// How a pass moves data.
#[derive(Debug, Clone, Default)]
pub struct PassOptions {
    /// Bandwidth limit, KiB/s (0: none).
    pub bwlimit_kib: u32,
    /// Compress on the wire.
    pub compress: bool,
    /// Move only what the origin's change journal recorded since the full pass under this
    /// grant id began (empty: walk everything).
    pub journal_since: String,
    /// A live pass after another: walk everything, then carry (every listed file sent) what
    /// the journal recorded since the full pass under this grant id began (empty: walk only).
    pub carry_since: String,
    /// The run's first pass: into dirs that already hold data, compare every file's contents.
    pub first_pass: bool,
    /// The target's identity toward the origin's data plane (the journal's queries).
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

/// The most bytes of journal data (paths or manifest lines) a target accepts.
const MAX_JOURNAL_BYTES: u64 = 256 << 20;

/// A writer that refuses to grow past a bound (what an origin sends is not trusted).
struct Capped(Vec<u8>);

impl tokio::io::AsyncWrite for Capped {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if self.0.len() as u64 + buf.len() as u64 > MAX_JOURNAL_BYTES {
            return std::task::Poll::Ready(Err(std::io::Error::other(
                "the origin's answer is too long",
            )));
        }
        self.0.extend_from_slice(buf);
        std::task::Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

/// Asks the origin for its journal's paths since `since` (or their manifest lines): the
/// items, or why the journal cannot give them. `connect_ms` gains the time the connection
/// took to open (TLS and the origin's admission).
async fn journal_items(
    config: &AgentConfig,
    tls: Arc<rustls::ClientConfig>,
    origin: &OriginEndpoint,
    since: &str,
    manifest: bool,
    connect_ms: &mut u64,
) -> Result<Vec<String>, String> {
    let request = crate::plane::tunnel::TunnelRequest::Changes {
        grant: origin.grant_id.clone(),
        since: since.to_string(),
        manifest,
    };
    origin_items(config, tls, origin, &request, connect_ms).await
}

/// The origin's configuration set, each path's state (owners by name), for the staged copy's
/// comparison.
pub async fn config_states(
    config: &AgentConfig,
    tls: Arc<rustls::ClientConfig>,
    origin: &OriginEndpoint,
) -> Result<Vec<crate::files::manifest::PathState>, String> {
    let request = crate::plane::tunnel::TunnelRequest::ConfigManifest {
        grant: origin.grant_id.clone(),
    };
    let items = origin_items(config, tls, origin, &request, &mut 0).await?;
    parse_states(&items)
}

/// Sends `request` to the origin and reads its NUL-separated UTF-8 items (at most
/// [`Capped`]'s bytes), or why it could not tell. `connect_ms` gains the time the connection
/// took to open (TLS and the origin's admission).
async fn origin_items(
    config: &AgentConfig,
    tls: Arc<rustls::ClientConfig>,
    origin: &OriginEndpoint,
    request: &crate::plane::tunnel::TunnelRequest,
    connect_ms: &mut u64,
) -> Result<Vec<String>, String> {
    let timeout = Duration::from_secs(config.data_plane.connect_timeout_secs);
    let opening = Instant::now();
    let mut stream = crate::plane::tunnel::open(origin, tls, request, timeout)
        .await
        .map_err(|e| e.to_string())?;
    *connect_ms += opening.elapsed().as_millis() as u64;
    let mut data = Capped(Vec::new());
    let (outcome, _) = crate::plane::tunnel::receive_framed(&mut stream, &mut data)
        .await
        .map_err(|e| format!("reading the origin's {}: {e}", request.kind()))?;
    if !outcome.ok {
        return Err(outcome.error);
    }
    data.0
        .split(|b| *b == 0)
        .filter(|item| !item.is_empty())
        .map(|item| {
            String::from_utf8(item.to_vec()).map_err(|_| {
                format!(
                    "the origin's {} holds a name that is not UTF-8",
                    request.kind()
                )
            })
        })
        .collect()
}

/// The origin's path states (its journal's manifest lines).
fn parse_states(items: &[String]) -> Result<Vec<crate::files::manifest::PathState>, String> {
    items
        .iter()
        .map(|i| serde_json::from_str::<crate::files::manifest::PathState>(i))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("the origin's path states: {e}"))
}

/// Whether the journal's `paths` may be moved into this host: each inside one of the pulled
/// data dirs, clean, and with no symbolic link between its data dir and it here (rsync would
/// follow it out of the tree). Why not, otherwise.
fn journal_paths_fit(
    config: &AgentConfig,
    dirs: &[String],
    paths: &[String],
) -> Result<(), String> {
    let mut checked = std::collections::HashSet::new();
    for path in paths {
        let clean = crate::files::rsync_args::clean_absolute(path).map_err(|e| e.to_string())?;
        let Some(dir) = dirs
            .iter()
            .map(|d| Path::new(d.trim_end_matches('/')))
            .find(|d| clean.starts_with(d))
        else {
            return Err(format!("{path} is outside the pulled data dirs"));
        };
        let top = config.host_path(dir);
        let mut ancestor = config.host_path(&clean).parent().map(Path::to_path_buf);
        while let Some(a) = ancestor.filter(|a| a.starts_with(&top) && *a != top) {
            if checked.insert(a.clone()) {
                if let Ok(m) = std::fs::symlink_metadata(&a) {
                    if m.file_type().is_symlink() {
                        return Err(format!("{} is a symbolic link here", a.display()));
                    }
                }
            }
            ancestor = a.parent().map(Path::to_path_buf);
        }
    }
    Ok(())
}

/// How a journal pass ended: its final event, or why the pass must walk everything.
enum JournalPass {
    Done(PullEvent),
    Fallback(String),
}

/// The dirs (here) holding a listed path that are not listed themselves, with their
/// modification times now.
fn unlisted_parents(
    config: &AgentConfig,
    paths: &[String],
) -> Vec<(PathBuf, std::time::SystemTime)> {
    let listed: std::collections::HashSet<&str> = paths.iter().map(String::as_str).collect();
    let parents: std::collections::BTreeSet<&str> = paths
        .iter()
        .filter_map(|p| p.rsplit_once('/').map(|(dir, _)| dir))
        .filter(|dir| !dir.is_empty() && !listed.contains(dir))
        .collect();
    parents
        .into_iter()
        .filter_map(|dir| {
            let host = config.host_path(Path::new(dir));
            let time = std::fs::symlink_metadata(&host).ok()?.modified().ok()?;
            Some((host, time))
        })
        .collect()
}

/// A journal pass: the origin's journal paths moved (`--files-from`, deletions included,
/// every listed file sent whatever its size and time), then each verified against the
/// origin's own manifest line for it.
async fn journal_pass(
    config: &AgentConfig,
    origin: &OriginEndpoint,
    dirs: &[String],
    how: &PassOptions,
    since: &str,
    verify: bool,
    progress: &mpsc::Sender<PullEvent>,
) -> JournalPass {
    let started = Instant::now();
    let Some(tls) = how.tls.clone() else {
        return JournalPass::Fallback("no identity to query the origin's journal".into());
    };
    // Each phase's time, for the pass's statistics.
    let mut phases = SyncStats::default();
    let listing = Instant::now();
    // The final pass (`verify`: the origin's services are stopped, its files stay as they
    // are) asks once for the paths' states, the paths with them; a file the origin changed
    // after all would differ here after the transfer and fail the pass. A live carry asks for
    // the paths only (its states, read after the transfer, give the dirs their times).
    let listed = journal_items(
        config,
        tls.clone(),
        origin,
        since,
        verify,
        &mut phases.connect_ms,
    )
    .await;
    let (paths, early_states) = match (listed, verify) {
        (Ok(items), true) => match parse_states(&items) {
            Ok(states) => (
                states.iter().map(|s| s.path.clone()).collect(),
                Some(states),
            ),
            Err(why) => return JournalPass::Fallback(why),
        },
        (Ok(paths), false) => (paths, None),
        (Err(why), _) => return JournalPass::Fallback(why),
    };
    phases.list_ms = listing.elapsed().as_millis() as u64;
    if let Err(why) = journal_paths_fit(config, dirs, &paths) {
        return JournalPass::Fallback(why);
    }
    let failed = |error: String, stats: Option<SyncStats>| {
        JournalPass::Done(PullEvent {
            done: true,
            exit_code: -1,
            error,
            stats,
            ..Default::default()
        })
    };
    let mut stats = SyncStats::default();
    if !paths.is_empty() {
        // A pass's options, without the walk's (deletions come as missing args, every
        // listed file is sent whatever its size and time). Whole files: the origin and the
        // target share the service IP's network, where sending a rewritten Cyrus index
        // costs less than both sides' checksums of it (rsync's delta algorithm, CPU that
        // the window's other steps need on the same cores).
        let mut options: Vec<String> = pass_options(0)
            .into_iter()
            .filter(|o| o != "--delete" && o != "--modify-window=-1")
            .collect();
        options.extend(
            [
                "--ignore-times",
                "--whole-file",
                "--files-from=:bmfleet-journal",
                "--from0",
                "--delete-missing-args",
                "--force",
                "--no-implied-dirs",
            ]
            .map(String::from),
        );
        let dest = format!("{}/", config.data_root.display());
        let mut run = match rsync_through_tunnel(
            config,
            origin,
            &options,
            &["origin:/".to_string()],
            &dest,
        ) {
            Ok(r) => r,
            Err(e) => return failed(e, None),
        };
        run.command.env(env::JOURNAL_SINCE, since);
        // rsync writes a changed file through a temporary one renamed into place, which
        // touches its dir here; a dir the journal does not list did not change on the origin:
        // its time here is put back.
        let unlisted = unlisted_parents(config, &paths);
        let transferring = Instant::now();
        let outcome = match run_rsync(run, progress).await {
            Ok(o) => o,
            Err(e) => return failed(e, None),
        };
        for (dir, time) in &unlisted {
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.set_modified(*time);
            }
        }
        stats = outcome.stats;
        phases.transfer_ms = transferring.elapsed().as_millis() as u64;
        if outcome.cancelled {
            return failed(CANCELLED.into(), Some(stats));
        }
        if !matches!(outcome.exit_code, 0 | 24) {
            return failed(
                format!("journal pass: {}", outcome.stderr.trim()),
                Some(stats),
            );
        }
    }
    let done = |mut stats: SyncStats, phases: &SyncStats| {
        stats.journal = true;
        stats.journal_paths = paths.len() as u64;
        stats.elapsed_ms = started.elapsed().as_millis() as u64;
        (
            stats.connect_ms,
            stats.list_ms,
            stats.transfer_ms,
            stats.verify_origin_ms,
            stats.verify_here_ms,
        ) = (
            phases.connect_ms,
            phases.list_ms,
            phases.transfer_ms,
            phases.verify_origin_ms,
            phases.verify_here_ms,
        );
        JournalPass::Done(PullEvent {
            stats: Some(stats),
            done: true,
            exit_code: 0,
            ok: true,
            error: String::new(),
            replayed: false,
        })
    };
    // The dirs take the origin's modification times (rsync without recursion sets a dir's
    // time before the entries it then adds or deletes in it); then, unless this is a live
    // pass's carry (the origin goes on writing: a later pass carries what changes after this
    // one, and the final pass verifies), every journal path is verified, here and on the
    // origin (contents included).
    let asking = Instant::now();
    let theirs = match early_states {
        Some(states) => Ok(states),
        None => journal_items(config, tls, origin, since, true, &mut phases.connect_ms)
            .await
            .and_then(|items| parse_states(&items)),
    };
    let theirs = match theirs {
        Ok(t) => t,
        Err(why) => return failed(format!("verifying the journal pass: {why}"), Some(stats)),
    };
    phases.verify_origin_ms = asking.elapsed().as_millis() as u64;
    let here = Instant::now();
    let root = config.clone();
    let listed = paths.clone();
    let origin_dirs = theirs.clone();
    let ours = tokio::task::spawn_blocking(move || {
        // Only the listed paths (checked above), whatever else the origin names.
        let allowed: std::collections::HashSet<&String> = listed.iter().collect();
        for state in origin_dirs.iter().filter(|s| s.dir) {
            if let (Some((secs, nanos)), true) = (state.mtime, allowed.contains(&state.path)) {
                let host = root.host_path(Path::new(&state.path));
                let time = std::time::UNIX_EPOCH
                    + Duration::from_secs(u64::try_from(secs).unwrap_or(0))
                    + Duration::from_nanos(u64::try_from(nanos).unwrap_or(0));
                if let Ok(dir) = std::fs::File::open(&host) {
                    let _ = dir.set_modified(time);
                }
            }
        }
        if !verify {
            return Ok(Vec::new());
        }
        listed
            .iter()
            .map(|p| crate::files::manifest::path_state(p, &root.host_path(Path::new(p))))
            .collect::<Result<Vec<_>, String>>()
    })
    .await
    .map_err(|e| e.to_string())
    .and_then(|r| r);
    let ours = match ours {
        Ok(states) => states,
        Err(why) => return failed(format!("verifying the journal pass: {why}"), Some(stats)),
    };
    phases.verify_here_ms = here.elapsed().as_millis() as u64;
    if !verify {
        return done(stats, &phases);
    }
    if ours != theirs {
        let first = ours
            .iter()
            .zip(theirs.iter())
            .find(|(a, b)| a != b)
            .map(|(a, b)| format!("here {a:?}, on the origin {b:?}"))
            .unwrap_or_else(|| {
                format!("{} paths here, {} on the origin", ours.len(), theirs.len())
            });
        return failed(
            format!("the journal pass left a difference: {first}"),
            Some(stats),
        );
    }
    done(stats, &phases)
}

/// One pass pulling the data dirs `paths` from the origin in one rsync run (relative to the
/// data root, so that hard links across dirs are kept and one tunnel serves them all). The
/// final event has `done` set.
pub async fn pull(
    config: &AgentConfig,
    origin: &OriginEndpoint,
    paths: &[String],
    how: PassOptions,
    progress: &mpsc::Sender<PullEvent>,
) -> PullEvent {
    if paths.is_empty() {
        return failed("no data dir to pull".into());
    }
    for path in paths {
        if let Err(e) = destination(config, path) {
            return failed(e);
        }
    }
    if !how.journal_since.is_empty() {
        // The final pass: only what the journal saw change since the pre-window pass began.
        match journal_pass(
            config,
            origin,
            paths,
            &how,
            &how.journal_since,
            true,
            progress,
        )
        .await
        {
            JournalPass::Done(event) => return event,
            JournalPass::Fallback(why) => {
                tracing::warn!(origin = %origin.name, reason = %why, "the change journal cannot list the changes: walking everything, comparing contents");
                let walked = walk(config, origin, paths, &how, true, progress).await;
                return with_fallback(walked, format!("{why}: every file compared by content"));
            }
        }
    }
    if how.first_pass {
        // Nothing to carry from: an older copy here (a remigration's, a failed attempt's) may
        // hold files the origin rewrote in place since, keeping their size and time.
        if let Some(held) = holds_data(config, paths) {
            tracing::info!(origin = %origin.name, dir = %held, "the first pass finds data here already: comparing every file's contents");
            let walked = walk(config, origin, paths, &how, true, progress).await;
            return with_fallback(
                walked,
                format!(
                    "{held} held data before the run's first pass: every file compared by content"
                ),
            );
        }
    }
    let walked = walk(config, origin, paths, &how, false, progress).await;
    if how.carry_since.is_empty() || !walked.ok {
        return walked;
    }
    // A live pass after another: what the walk's quick check may have missed (a rewrite that
    // kept its size and time) since the last good pass began, carried with every listed file
    // sent.
    match journal_pass(
        config,
        origin,
        paths,
        &how,
        &how.carry_since,
        false,
        progress,
    )
    .await
    {
        JournalPass::Done(carried) if carried.ok => with_carried(walked, carried.stats),
        JournalPass::Done(failed) => failed,
        JournalPass::Fallback(why) => {
            tracing::warn!(origin = %origin.name, reason = %why, "the change journal cannot list what changed since the last pass: walking again, comparing contents");
            let walked = walk(config, origin, paths, &how, true, progress).await;
            with_fallback(walked, format!("{why}: every file compared by content"))
        }
    }
}

/// The first of `paths` whose directory here holds an entry already, if any.
fn holds_data(config: &AgentConfig, paths: &[String]) -> Option<String> {
    paths.iter().find_map(|p| {
        let dir = destination(config, p).ok()?;
        let mut entries = std::fs::read_dir(dir).ok()?;
        entries.next().is_some().then(|| p.clone())
    })
}

/// A pass's statistics saying why it compared every file's contents (the journal could not
/// be used, or the first pass found an older copy).
fn with_fallback(mut event: PullEvent, why: String) -> PullEvent {
    event
        .stats
        .get_or_insert_with(SyncStats::default)
        .journal_fallback = why;
    event
}

/// A walk's statistics with a carry's added (entries and bytes it moved, the paths it
/// carried).
fn with_carried(mut walked: PullEvent, carried: Option<SyncStats>) -> PullEvent {
    if let (Some(stats), Some(carried)) = (walked.stats.as_mut(), carried) {
        stats.files_changed += carried.files_changed;
        stats.bytes_changed += carried.bytes_changed;
        stats.journal_paths = carried.journal_paths;
        stats.elapsed_ms += carried.elapsed_ms;
    }
    walked
}

/// A pass that ended before or without rsync, with `error`.
fn failed(error: String) -> PullEvent {
    PullEvent {
        done: true,
        exit_code: -1,
        error,
        ..Default::default()
    }
}

/// One rsync run over every data dir (`-R`: paths relative to the data root, hard links
/// across dirs kept, one tunnel); `by_content`: every file's contents compared (`--checksum`),
/// not its size and time.
async fn walk(
    config: &AgentConfig,
    origin: &OriginEndpoint,
    paths: &[String],
    how: &PassOptions,
    by_content: bool,
    progress: &mpsc::Sender<PullEvent>,
) -> PullEvent {
    let ancestors = Ancestors::record(config, paths);
    let sources: Vec<String> = paths
        .iter()
        .enumerate()
        .map(|(k, p)| {
            let host = if k == 0 { "origin:" } else { ":" };
            format!("{host}{}/", p.trim_end_matches('/'))
        })
        .collect();
    let dest = format!("{}/", config.data_root.display());
    let mut options = pass_options(how.bwlimit_kib);
    options.extend(["-R".to_string(), "--no-implied-dirs".to_string()]);
    if by_content {
        options.push("--checksum".to_string());
    }
    if how.compress {
        // zlib level 1 where the origin's rsync predates zstd: zeros and mail compress well,
        // for little CPU.
        options.extend(["-z".to_string(), "--compress-level=1".to_string()]);
    }
    let run = match rsync_through_tunnel(config, origin, &options, &sources, &dest) {
        Ok(r) => r,
        Err(e) => return failed(e),
    };
    let outcome = run_rsync(run, progress).await;
    ancestors.restore();
    match outcome {
        Err(e) => failed(e),
        Ok(outcome) => {
            // 24: some files vanished on the origin during the pass (it is live): not an error.
            let ok = !outcome.cancelled && matches!(outcome.exit_code, 0 | 24);
            PullEvent {
                stats: Some(outcome.stats),
                done: true,
                exit_code: outcome.exit_code,
                ok,
                error: if outcome.cancelled {
                    CANCELLED.into()
                } else if ok {
                    String::new()
                } else {
                    outcome.stderr.trim().to_string()
                },
                replayed: false,
            }
        }
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_binary_replaced_while_running_is_found_at_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let agent = dir.path().join("bmfleet-agent");
        let deleted = std::path::PathBuf::from(format!("{} (deleted)", agent.display()));
        // Nothing at the path yet: the name is kept (and refused later for its space).
        assert_eq!(replaced_binary(deleted.clone()), deleted);
        std::fs::write(&agent, b"new binary").unwrap();
        assert_eq!(replaced_binary(deleted), agent);
        assert_eq!(replaced_binary(agent.clone()), agent);
    }

    use super::*;

    #[test]
    fn itemized_lines_count_changes_and_bytes() {
        assert_eq!(itemized(">f+++++++++ 1200 user/a/1."), Some((1, 1200, 0)));
        assert_eq!(itemized("cd+++++++++ 4096 user/a/"), Some((1, 0, 0)));
        assert_eq!(itemized(".f...p..... 10 user/a/2."), Some((1, 0, 0)));
        assert_eq!(
            itemized("hf+++++++++ 10 user/b/1. => user/a/1."),
            Some((1, 0, 0))
        );
        assert_eq!(itemized("*deleting   0 user/a/3."), Some((0, 0, 1)));
        assert_eq!(itemized("Number of files: 3 (reg: 1, dir: 2)"), None);
    }

    #[test]
    fn stats_are_read_from_rsync_output() {
        let out = "Number of files: 1,203 (reg: 1,000, dir: 203)\nNumber of created files: 2\n\
                   Number of deleted files: 7\nNumber of regular files transferred: 1\n\
                   Total file size: 12,345,678 bytes\nTotal transferred file size: 3,000 bytes\n\
                   Literal data: 2,500 bytes\nMatched data: 500 bytes\nFile list size: 78\n\
                   File list generation time: 0.250 seconds\nTotal bytes received: 4,096\n";
        let mut stats = SyncStats::default();
        for line in out.lines() {
            stats_line(line, &mut stats);
        }
        assert_eq!(stats.files_scanned, 1203);
        assert_eq!(stats.entries_deleted, 7);
        assert_eq!(stats.bytes_scanned, 12_345_678);
        assert_eq!(stats.bytes_changed, 3000);
        assert_eq!(stats.literal_bytes, 2500);
        assert_eq!(stats.scan_ms, 250);
        assert_eq!(stats.bytes_received, 4096);
    }
}
