//! The configuration file set and the Postfix queue, target side: the set staged while the
//! service still runs ([`stage`]), then in the window ([`copy`]) compared path by path with
//! the origin's (contents, modes, owners by name, times, extended attributes) and installed
//! from the staged copy when equal, or pulled again when anything differs; the queue pulled
//! beside it; the set screened by this host's own patterns, installed, maps rebuilt.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bmfleet_proto::v1::{CopyConfigReply, OriginEndpoint, SyncStats};
use tokio::sync::mpsc;

use crate::config::AgentConfig;
use crate::files::rsync_args::{CONFIG_SET_TOKEN, MAIL_QUEUE_TOKEN};
use crate::files::{config_set, mail_queue, pull};

/// Where the staged set lives in the agent's state dir: `origin` (the origin's name) and
/// `tree` (the set as it arrived).
const STAGED: &str = "config-staged";

/// Pulls `origin`'s configuration set into this host's staging place (replacing what an
/// earlier staging left), installing nothing: live, before the window, so that the window
/// only compares. Its transfer's statistics.
pub async fn stage(config: &AgentConfig, origin: &OriginEndpoint) -> CopyConfigReply {
    let failed = |error: String, stats: Option<SyncStats>| CopyConfigReply {
        ok: false,
        error,
        stats,
        ..Default::default()
    };
    let fresh = match tempfile::tempdir_in(&config.state_dir) {
        Ok(d) => d,
        Err(e) => return failed(format!("cannot make the config staging dir: {e}"), None),
    };
    let tree = fresh.path().join("tree");
    if let Err(e) = std::fs::create_dir(&tree) {
        return failed(format!("cannot make the config staging dir: {e}"), None);
    }
    let stats = match pull_listed(config, origin, CONFIG_SET_TOKEN, &tree).await {
        Ok(stats) => stats,
        Err((stats, e)) => return failed(e, stats),
    };
    if let Err(e) = std::fs::write(fresh.path().join("origin"), &origin.name) {
        return failed(
            format!("cannot record the staged set's origin: {e}"),
            Some(stats),
        );
    }
    let place = config.state_dir.join(STAGED);
    let _ = discard(&place);
    if let Err(e) = std::fs::rename(fresh.path(), &place) {
        return failed(format!("cannot keep the staged set: {e}"), Some(stats));
    }
    // Renamed away: the temporary dir's drop finds nothing to delete.
    drop(fresh);
    CopyConfigReply {
        ok: true,
        stats: Some(stats),
        set_from: format!("staged from {}", origin.name),
        ..Default::default()
    }
}

/// Deletes a staged set (what it holds is the origin's configuration, secrets included).
fn discard(place: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(place) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// The staged copy of `origin`'s set when it holds exactly what the origin's set holds now
/// (asked of the origin, compared here path by path) and how many paths were compared; else
/// why not.
async fn staged_copy(
    config: &AgentConfig,
    tls: Arc<rustls::ClientConfig>,
    origin: &OriginEndpoint,
) -> Result<(PathBuf, usize), String> {
    let place = config.state_dir.join(STAGED);
    let from = std::fs::read_to_string(place.join("origin"))
        .map_err(|_| "nothing was staged before the window".to_string())?;
    if from != origin.name {
        return Err(format!("the staged set came from {from}"));
    }
    let theirs = pull::config_states(config, tls, origin).await?;
    let tree = place.join("tree");
    let compared = tree.clone();
    let n = tokio::task::spawn_blocking(move || config_set::staged_equal(&theirs, &compared))
        .await
        .map_err(|e| e.to_string())??;
    Ok((tree, n))
}

/// Pulls what the origin lists for `token` (its config set or its mail queue) into `dest` in
/// one rsync transfer; its statistics, or why it failed (with them when rsync ran).
async fn pull_listed(
    config: &AgentConfig,
    origin: &OriginEndpoint,
    token: &str,
    dest: &Path,
) -> Result<SyncStats, (Option<SyncStats>, String)> {
    let options: Vec<String> = [
        "-aAX",
        "-r",
        "-R",
        &format!("--files-from=:{token}"),
        "--from0",
        "--stats",
        "--out-format=%i %l %n",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([crate::files::rsync_args::timeout_option()])
    .collect();
    let dest = format!("{}/", dest.display());
    let run =
        pull::rsync_through_tunnel(config, origin, &options, &["origin:/".to_string()], &dest)
            .map_err(|e| (None, e))?;
    // Nobody listens for progress of these copies; keep the receiver so it is not cancelled.
    let (progress, _keep) = mpsc::channel(1);
    let outcome = pull::run_rsync(run, &progress)
        .await
        .map_err(|e| (None, e))?;
    if outcome.exit_code != 0 {
        return Err((
            Some(outcome.stats),
            format!(
                "rsync exited with {}: {}",
                outcome.exit_code,
                outcome.stderr.trim()
            ),
        ));
    }
    Ok(outcome.stats)
}

/// Copies the configuration file set (the copy staged live when it still equals the origin's
/// set, else in one transfer) and the origin's Postfix queue in another transfer beside it
/// (both services stopped: this is the cold sync), installs the set, rebuilds the postfix
/// maps, then puts the queue in place.
pub async fn copy(
    config: &AgentConfig,
    tls: Arc<rustls::ClientConfig>,
    origin: &OriginEndpoint,
    origin_queue_empty: bool,
) -> CopyConfigReply {
    let failed = |error: String| CopyConfigReply {
        ok: false,
        error,
        ..Default::default()
    };
    // The origin lists the set; it lands in a private staging dir first, and only what this
    // host's own patterns name is installed from there (a hostile origin's /etc/cron.d or
    // /root/.ssh stays in staging, reported, and is deleted with it).
    // The Postfix queue comes in its own staging dir, in a transfer that runs beside the
    // config set's (both are in the downtime), unless the origin's stop found no message in
    // it (a transfer fewer in the downtime).
    let (staging, queue) = match (
        tempfile::tempdir_in(&config.state_dir),
        tempfile::tempdir_in(&config.state_dir),
    ) {
        (Ok(s), Ok(q)) => (s, q),
        (Err(e), _) | (_, Err(e)) => {
            return failed(format!("cannot make the config staging dirs: {e}"))
        }
    };
    let started = std::time::Instant::now();
    // The copy staged while the service ran, when the origin's set (final now: its services
    // are stopped) still holds exactly that; otherwise the set is pulled as a whole.
    let set = async {
        match staged_copy(config, tls, origin).await {
            Ok((tree, n)) => Ok((
                tree,
                SyncStats::default(),
                format!(
                    "the copy staged before the window, equal to {}'s set now ({n} paths compared: contents, modes, owners, times, attributes)",
                    origin.name
                ),
            )),
            Err(why) => pull_listed(config, origin, CONFIG_SET_TOKEN, staging.path())
                .await
                .map(|stats| {
                    (
                        staging.path().to_path_buf(),
                        stats,
                        format!("pulled in the window (no staged copy used: {why})"),
                    )
                }),
        }
    };
    let (set, queued) = tokio::join!(set, async {
        if origin_queue_empty {
            Ok(SyncStats::default())
        } else {
            pull_listed(config, origin, MAIL_QUEUE_TOKEN, queue.path()).await
        }
    });
    let (set_dir, stats, set_from) = match set {
        Ok((dir, stats, from)) => (dir, Some(stats), from),
        Err((stats, e)) => return CopyConfigReply { stats, ..failed(e) },
    };
    let pulled_ms = started.elapsed().as_millis();
    let screened = match config_set::screen(&config.config_set.patterns, &set_dir) {
        Ok(s) => s,
        Err(e) => return CopyConfigReply { stats, ..failed(e) },
    };
    if !screened.refused.is_empty() {
        tracing::warn!(
            origin = %origin.name,
            refused = ?screened.refused,
            "the origin sent config entries outside this host's config_set patterns: not installed"
        );
    }
    let timeout = std::time::Duration::from_secs(config.services.command_timeout_secs);
    if let Err(e) = config_set::install(config, &set_dir, &screened).await {
        return CopyConfigReply { stats, ..failed(e) };
    }
    // Installed: the staged copy (the origin's secrets among it) has served.
    if let Err(e) = discard(&config.state_dir.join(STAGED)) {
        tracing::warn!(error = %e, "cannot delete the staged config set");
    }
    let mut refused: Vec<String> = screened.refused.iter().map(|f| format!("/{f}")).collect();
    let files: Vec<String> = screened.accepted.iter().map(|f| format!("/{f}")).collect();
    let maps = match config_set::rebuild_postfix_maps(
        &config.data_root,
        &config.config_set.postmap_command,
        timeout,
    )
    .await
    {
        Ok(maps) => maps,
        Err(e) => {
            return CopyConfigReply {
                stats,
                refused,
                ..failed(e)
            }
        }
    };
    let maps_ms = started.elapsed().as_millis();
    let maps_rebuilt: Vec<String> = maps.iter().map(|m| m.db.display().to_string()).collect();
    let done = |refused, error: String| CopyConfigReply {
        ok: error.is_empty(),
        files: files.clone(),
        maps_rebuilt: maps_rebuilt.clone(),
        refused,
        stats: stats.clone(),
        error,
        set_from: set_from.clone(),
        ..Default::default()
    };
    // The mail the origin's Postfix had not delivered at the stop: into this host's queue.
    if let Err((_, e)) = queued {
        return done(refused, format!("carrying the mail queue: {e}"));
    }
    let carried = match mail_queue::install(config, queue.path()) {
        Ok(c) => c,
        Err(e) => return done(refused, format!("carrying the mail queue: {e}")),
    };
    if !carried.refused.is_empty() {
        tracing::warn!(origin = %origin.name, refused = ?carried.refused, "the origin sent entries that are not queue files: not installed");
    }
    refused.extend(carried.refused);
    // Postfix's structure check when the queue holds carried files (nothing else of the
    // target's Postfix is touched when the origin's queue was empty).
    let carried_any = !carried.installed.is_empty() || carried.already > 0;
    if carried_any {
        if let Err(e) = mail_queue::structure_check(config, timeout).await {
            return done(refused, e);
        }
    }
    // Where the step's time went (it is in the downtime), from its start.
    tracing::info!(
        origin = %origin.name,
        pulled_ms,
        maps_ms,
        done_ms = started.elapsed().as_millis(),
        "the config set is installed"
    );
    CopyConfigReply {
        queue_files: carried.installed,
        queue_files_already: carried.already,
        ..done(refused, String::new())
    }
}
