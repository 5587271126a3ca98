//! The origin's half of the file verbs: rsync's sender (data dirs, the config set, a journal
//! pass's list) and the change journal's paths or their states. The listener
//! ([`crate::data_plane`]) has admitted the caller and checked the verb's grant scope; what
//! is checked here is the request's own content (rsync's argv, paths inside the grant).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

use crate::config::AgentConfig;
use crate::files::change_journal::{self, ChangeJournals};
use crate::files::rsync_args::parse_sender;
use crate::files::{config_set, mail_queue};
use crate::plane::answer::{admit, Stream};
use crate::plane::grants::Grant;
use crate::plane::tunnel::TunnelReply;

/// The most paths a journal-backed pass moves; more and the pass walks everything.
pub const MAX_JOURNAL_PATHS: usize = 200_000;

/// The BlueMind paths the change journal of `grant`'s instance recorded since the full
/// pass of grant `since` began, sorted; or why the journal cannot tell. Only paths inside
/// the grant's dirs whose every directory below the data root is a real directory (no
/// symlink: rsync would follow it) are listed; anything else makes the journal unusable.
pub async fn journal_paths(
    config: &Arc<AgentConfig>,
    changes: &ChangeJournals,
    grant: &Grant,
    since: &str,
) -> Result<Vec<String>, String> {
    grant.require_data_dirs().map_err(|e| e.to_string())?;
    let journal = changes
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
    let config = config.clone();
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
pub async fn changes(
    config: &Arc<AgentConfig>,
    changes: &ChangeJournals,
    grant: &Grant,
    since: &str,
    manifest: bool,
    stream: &mut Stream,
) -> Result<(), String> {
    // Refused before admission, like every request outside its grant's scope.
    grant.require_data_dirs().map_err(|e| e.to_string())?;
    let mut listed = journal_paths(config, changes, grant, since).await;
    if manifest {
        if let Ok(paths) = listed {
            let config = config.clone();
            listed = tokio::task::spawn_blocking(move || {
                paths
                    .iter()
                    .map(|p| {
                        let state =
                            crate::files::manifest::path_state(p, &config.host_path(Path::new(p)))?;
                        serde_json::to_string(&state).map_err(|e| e.to_string())
                    })
                    .collect::<Result<Vec<String>, String>>()
            })
            .await
            .map_err(|e| e.to_string())?;
        }
    }
    admit(stream).await?;
    send_items(listed, stream).await
}

/// Answers a `config_manifest` request: the state of every path of this host's
/// configuration set (the entries its patterns list and everything below a listed dir),
/// owners by name, as JSON data frames: what a target compares the copy it staged while the
/// service ran against, in the window, instead of pulling the set again.
pub async fn config_manifest(
    config: &Arc<AgentConfig>,
    grant: &Grant,
    stream: &mut Stream,
) -> Result<(), String> {
    grant.require_config_set().map_err(|e| e.to_string())?;
    let config = config.clone();
    let states = tokio::task::spawn_blocking(move || {
        let entries = config_set::list(&config.config_set.patterns, &config.data_root);
        config_set::states(&entries, &config.data_root)?
            .iter()
            .map(|s| serde_json::to_string(s).map_err(|e| e.to_string()))
            .collect::<Result<Vec<String>, String>>()
    })
    .await
    .map_err(|e| e.to_string())?;
    admit(stream).await?;
    send_items(states, stream).await
}

/// Sends `items` NUL-separated as data frames, then the end frame (ok, or why not).
async fn send_items(items: Result<Vec<String>, String>, stream: &mut Stream) -> Result<(), String> {
    let outcome = match items {
        Ok(paths) => {
            let mut text = Vec::new();
            for p in &paths {
                text.extend_from_slice(p.as_bytes());
                text.push(0);
            }
            crate::plane::tunnel::send_framed(&mut text.as_slice(), stream)
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
    crate::plane::tunnel::end_framed(stream, &outcome)
        .await
        .map_err(|e| e.to_string())?;
    stream.shutdown().await.map_err(|e| e.to_string())
}

/// rsync's sender half. Refusals are returned before anything is admitted.
pub async fn rsync(
    config: &Arc<AgentConfig>,
    changes: &ChangeJournals,
    grant: &Grant,
    argv: &[String],
    journal_since: &str,
    stream: &mut Stream,
) -> Result<(), String> {
    let args = parse_sender(argv).map_err(|e| e.to_string())?;
    let root = &config.data_root;
    let list_file;
    let (host_paths, list) = if args.journal {
        if args.paths != ["/"] {
            return Err("refused: the journal's paths are pulled from \"/\" only".into());
        }
        let paths = journal_paths(config, changes, grant, journal_since)
            .await
            .map_err(|why| format!("the change journal cannot list the changes: {why}"))?;
        let mut text = String::new();
        for p in &paths {
            text.push_str(p.trim_start_matches('/'));
            text.push('\0');
        }
        list_file = tempfile::NamedTempFile::new_in(&config.state_dir)
            .map_err(|e| format!("cannot write the file list: {e}"))?;
        std::fs::write(list_file.path(), text)
            .map_err(|e| format!("cannot write the file list: {e}"))?;
        (vec![format!("{}/", root.display())], Some(list_file.path()))
    } else if args.config_set || args.mail_queue {
        // The Postfix queue travels with the configuration, at cold sync, under its grant.
        grant.require_config_set().map_err(|e| e.to_string())?;
        if args.paths != ["/"] {
            return Err(
                "refused: the configuration file set and the mail queue are pulled from \"/\" only"
                    .into(),
            );
        }
        let entries = if args.mail_queue {
            mail_queue::list(config)
        } else {
            config_set::list(&config.config_set.patterns, root)
        };
        list_file = tempfile::NamedTempFile::new_in(&config.state_dir)
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
        if let Some(journal) =
            changes.get(&change_journal::key(&grant.migration, &grant.target_name))
        {
            let id = grant.id.clone();
            let _ = tokio::task::spawn_blocking(move || journal.mark(&id)).await;
        }
        (paths, None)
    };
    let server_argv = args.server_argv(&host_paths, list);
    // rsync's "." and any relative path resolve against its working directory: an empty
    // one of its own, never the agent's (`/` under systemd).
    let workdir = tempfile::tempdir_in(&config.state_dir)
        .map_err(|e| format!("cannot make rsync's working directory: {e}"))?;
    let mut child = Command::new(&config.data_plane.rsync)
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
    let copied = crate::plane::tunnel::relay(stream, stdout, stdin).await;
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
