//! The target's side of a data-dir sync: real rsync pulling from the origin through the
//! agents' tunnel (`-e "bmfleet-agent tunnel"`), with pass statistics read from rsync's own
//! itemized output and `--stats`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
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
}

/// The error of a pull whose caller went away (rsync was stopped).
pub const CANCELLED: &str = "cancelled by the caller";

/// An rsync run through the tunnel, as a command ready to spawn.
pub struct RsyncRun {
    /// The command (stdout and stderr piped).
    pub command: Command,
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
        None => {
            std::env::current_exe().map_err(|e| format!("cannot find the agent binary: {e}"))?
        }
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
    options.push(crate::rsync_args::timeout_option());
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
                    stats: Some(stats),
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
    let clean = crate::rsync_args::clean_absolute(path).map_err(|e| e.to_string())?;
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
#[derive(Debug, Clone, Copy, Default)]
pub struct PassOptions {
    /// Bandwidth limit, KiB/s (0: none).
    pub bwlimit_kib: u32,
    /// Compress on the wire.
    pub compress: bool,
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
    let failed = |error: String| PullEvent {
        done: true,
        exit_code: -1,
        error,
        ..Default::default()
    };
    if paths.is_empty() {
        return failed("no data dir to pull".into());
    }
    for path in paths {
        if let Err(e) = destination(config, path) {
            return failed(e);
        }
    }
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
