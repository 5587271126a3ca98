//! The host's Postfix queue at the stop (mail Postfix accepted and has not delivered yet),
//! which the manual procedure forgets: on the origin, before the services stop, the queue is
//! flushed and given a bounded time to deliver into Cyrus while Cyrus still runs; what is
//! left (deferred to a destination that is down, held, in flight) is carried to the target
//! during the cold sync's Config step, put in place as Postfix documents for queue files
//! restored from another machine (`postsuper -s`, its structure check: names matched to
//! inodes, files moved to their hashed dirs), and flushed once the target's services run.
//!
//! Carrying copies: the origin keeps its queue until the target serves (a rollback restarts
//! it with every message). A carry repeated after a retried Config step installs nothing twice:
//! a staged file whose content the target's queue already holds (under any name: the structure
//! check may have renamed it) is skipped.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bmfleet_proto::v1::MailQueueState;
use sha2::{Digest, Sha256};

use crate::command;
use crate::config::AgentConfig;

/// Postfix's queues and the per-message logs beside them, as `queue_directory`'s subdirs:
/// what is carried. (`flush`, `saved`, `pid`, `public` and `private` are the host's own.)
pub const QUEUE_SUBDIRS: [&str; 9] = [
    "maildrop", "incoming", "active", "deferred", "hold", "corrupt", "bounce", "defer", "trace",
];

/// The queues that hold messages (the others hold their logs).
const MESSAGE_QUEUES: [&str; 6] = [
    "maildrop", "incoming", "active", "deferred", "hold", "corrupt",
];

/// The queues a drain waits on: mail Postfix is about to deliver.
const MOVING_QUEUES: [&str; 3] = ["maildrop", "incoming", "active"];

/// The queue directory under this host's data root.
fn queue_dir(config: &AgentConfig) -> PathBuf {
    config.host_path(&config.mail_queue.dir)
}

/// Regular files under `dir` (recursively, no symlink followed, `dir` itself included: a
/// queue dir that is a symlink holds nothing), as paths relative to `base`.
fn files_under(dir: &Path, base: &Path) -> Vec<PathBuf> {
    walkdir::WalkDir::new(dir)
        .follow_links(false)
        .follow_root_links(false)
        .sort_by_file_name()
        .into_iter()
        .flatten()
        .filter(|e| e.file_type().is_file())
        .filter_map(|e| e.path().strip_prefix(base).ok().map(Path::to_path_buf))
        .collect()
}

/// The messages in each of Postfix's queues on this host (files, counted on disk: it works
/// whether Postfix runs or not).
pub fn count(config: &AgentConfig) -> BTreeMap<String, u32> {
    let dir = queue_dir(config);
    MESSAGE_QUEUES
        .iter()
        .map(|q| (q.to_string(), files_under(&dir.join(q), &dir).len() as u32))
        .filter(|(_, n)| *n > 0)
        .collect()
}

/// The origin's half of the carry: every queue file, as relative paths under the data root
/// (for rsync's `--files-from`), sorted.
pub fn list(config: &AgentConfig) -> Vec<String> {
    let dir = queue_dir(config);
    QUEUE_SUBDIRS
        .iter()
        .flat_map(|q| files_under(&dir.join(q), &config.data_root))
        .filter_map(|p| p.to_str().map(str::to_string))
        .collect()
}

/// Flushes the queue and waits, at most `drain_secs`, until every message that was on its way
/// to delivery when the drain began (in maildrop, incoming or active) has left those queues
/// (delivered, or deferred again). Never fails a stop: what it could not drain is carried.
/// Returns the queue as the drain left it.
pub async fn drain(config: &AgentConfig) -> MailQueueState {
    let started = Instant::now();
    let settings = &config.mail_queue;
    let mut state = MailQueueState::default();
    if settings.postqueue_command.is_empty() {
        state.note = "no postqueue command configured: not drained".into();
    } else if !queue_dir(config).is_dir() {
        state.note = format!("no queue at {}: nothing to drain", settings.dir.display());
    } else {
        if let Err(why) = postqueue_flush(config).await {
            // Postfix is down: nothing delivers now; the queue is carried as it is.
            state.note = format!("not drained: {why}");
        } else {
            // The messages on their way when the drain began (by queue id: a message keeps
            // its file name from incoming to active); mail arriving meanwhile does not make
            // a busy server wait the whole bound.
            let bound = Duration::from_secs(settings.drain_secs);
            let on_their_way = |config: &AgentConfig| -> BTreeSet<std::ffi::OsString> {
                let dir = queue_dir(config);
                MOVING_QUEUES
                    .iter()
                    .flat_map(|q| files_under(&dir.join(q), &dir))
                    .filter_map(|p| p.file_name().map(|n| n.to_os_string()))
                    .collect()
            };
            let waited_for = on_their_way(config);
            loop {
                let left = on_their_way(config).intersection(&waited_for).count();
                if left == 0 {
                    break;
                }
                if started.elapsed() >= bound {
                    state.note = format!(
                        "{left} messages still on their way after {} s: carried",
                        settings.drain_secs
                    );
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    state.messages = count(config).into_iter().collect();
    state.waited_ms = started.elapsed().as_millis() as u64;
    state
}

/// Asks the running Postfix to try every queued message now (after a start, so that mail
/// carried from the origin and deferred there is not left waiting for its back-off). Returns
/// what happened, for the reply.
pub async fn flush(config: &AgentConfig) -> MailQueueState {
    let started = Instant::now();
    let settings = &config.mail_queue;
    let note = if settings.postqueue_command.is_empty() || !queue_dir(config).is_dir() {
        String::new()
    } else {
        match postqueue_flush(config).await {
            Ok(()) => "flushed".into(),
            Err(why) => format!("not flushed: {why}"),
        }
    };
    MailQueueState {
        messages: count(config).into_iter().collect(),
        waited_ms: started.elapsed().as_millis() as u64,
        note,
    }
}

/// `postqueue -f`: asks the running Postfix to try every queued message now. Its refusal is
/// its last line of complaint (Postfix's `fatal: …` says why), or its exit.
async fn postqueue_flush(config: &AgentConfig) -> Result<(), String> {
    let mut argv = config.mail_queue.postqueue_command.clone();
    argv.push("-f".into());
    let result = command::run("postqueue", &argv, Duration::from_secs(10)).await;
    if command::succeeded(&result) {
        return Ok(());
    }
    Err(result
        .stderr_tail
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .map(|l| l.trim().to_string())
        .unwrap_or_else(|| command::failure_summary(&result)))
}

/// What a carry installed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Carried {
    /// Files installed (BlueMind paths).
    pub installed: Vec<String>,
    /// Staged files whose content the queue already held (an earlier attempt's carry).
    pub already: u32,
    /// What the origin sent that is not a queue file (not installed).
    pub refused: Vec<String>,
}

fn digest(path: &Path) -> Result<[u8; 32], String> {
    let mut file =
        std::fs::File::open(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    Ok(hasher.finalize().into())
}

/// The target's half: installs the queue files received in `staging` (the origin's tree,
/// relative to its data root) into this host's queue. Only regular files under the queue's
/// subdirs land, with their owners and modes but never setuid/setgid bits; a file whose
/// content the same subdir already holds is skipped; a name taken by other content fails the
/// carry (nothing of Postfix's own is overwritten). Postfix must be stopped.
pub fn install(config: &AgentConfig, staging: &Path) -> Result<Carried, String> {
    let relative = config
        .mail_queue
        .dir
        .strip_prefix("/")
        .unwrap_or(&config.mail_queue.dir);
    let (received, here) = (staging.join(relative), queue_dir(config));
    let mut carried = Carried::default();
    // Anything else the origin sent is reported, never installed.
    for entry in walkdir::WalkDir::new(staging)
        .min_depth(1)
        .follow_links(false)
        .follow_root_links(false)
        .sort_by_file_name()
        .into_iter()
        .flatten()
    {
        let path = entry.path();
        let inside = QUEUE_SUBDIRS
            .iter()
            .any(|q| path.starts_with(received.join(q)));
        let kind = entry.file_type();
        if (!inside && !kind.is_dir()) || (inside && !kind.is_dir() && !kind.is_file()) {
            let shown = path.strip_prefix(staging).unwrap_or(path);
            carried.refused.push(format!("/{}", shown.display()));
        }
    }
    for queue in QUEUE_SUBDIRS {
        let staged = files_under(&received.join(queue), &received);
        if staged.is_empty() {
            continue;
        }
        let held: BTreeSet<[u8; 32]> = files_under(&here.join(queue), &here)
            .iter()
            .map(|rel| digest(&here.join(rel)))
            .collect::<Result<_, _>>()?;
        for rel in staged {
            let (from, to) = (received.join(&rel), here.join(&rel));
            if held.contains(&digest(&from)?) {
                carried.already += 1;
                continue;
            }
            if to.symlink_metadata().is_ok() {
                return Err(format!(
                    "the carried queue file {} would replace a different message of this host's queue",
                    to.display()
                ));
            }
            place(&from, &to)?;
            carried.installed.push(format!(
                "{}/{}",
                config.mail_queue.dir.display(),
                rel.display()
            ));
        }
    }
    Ok(carried)
}

/// Copies one staged queue file to `to` with its owner and mode (setuid/setgid cleared).
/// Missing parent dirs (a queue or its hash dirs, when this host's Postfix never made them)
/// are made as the origin's were (owner by name, mode without setuid/setgid), or as Postfix
/// makes them (the queue dir's owner, 0700) when the origin sent none.
fn place(from: &Path, to: &Path) -> Result<(), String> {
    let meta = from
        .metadata()
        .map_err(|e| format!("cannot read {}: {e}", from.display()))?;
    let (mut staged_dir, mut dir) = (from.parent(), to.parent());
    let mut missing = Vec::new();
    while let Some(d) = dir.filter(|d| d.symlink_metadata().is_err()) {
        missing.push((d.to_path_buf(), staged_dir.map(Path::to_path_buf)));
        dir = d.parent();
        staged_dir = staged_dir.and_then(Path::parent);
    }
    if let Some(existing) = dir {
        let fallback = existing
            .metadata()
            .map_err(|e| format!("cannot read {}: {e}", existing.display()))?;
        for (made, staged) in missing.iter().rev() {
            let like = staged
                .as_ref()
                .and_then(|s| s.symlink_metadata().ok())
                .filter(|m| m.is_dir());
            let (mode, uid, gid) = match &like {
                Some(m) => (m.mode() & 0o1777, m.uid(), m.gid()),
                None => (0o700, fallback.uid(), fallback.gid()),
            };
            std::fs::create_dir(made)
                .and_then(|_| std::fs::set_permissions(made, std::fs::Permissions::from_mode(mode)))
                .and_then(|_| std::os::unix::fs::chown(made, Some(uid), Some(gid)))
                .map_err(|e| format!("cannot create {}: {e}", made.display()))?;
        }
    }
    std::fs::copy(from, to)
        .and_then(|_| {
            std::fs::set_permissions(to, std::fs::Permissions::from_mode(meta.mode() & 0o1777))
        })
        .and_then(|_| std::os::unix::fs::chown(to, Some(meta.uid()), Some(meta.gid())))
        .map_err(|e| format!("cannot install {}: {e}", to.display()))?;
    Ok(())
}

/// Postfix's structure check on this host's queue (`postsuper -s`): renames carried files
/// whose names do not match their new inodes and moves them to their hashed dirs.
pub async fn structure_check(config: &AgentConfig, timeout: Duration) -> Result<(), String> {
    if config.mail_queue.postsuper_command.is_empty() {
        return Ok(());
    }
    let mut argv = config.mail_queue.postsuper_command.clone();
    argv.push("-s".into());
    let result = command::run("postsuper", &argv, timeout).await;
    if command::succeeded(&result) {
        Ok(())
    } else {
        Err(format!(
            "postsuper -s on the carried queue: {}",
            command::failure_summary(&result)
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(root: &Path) -> AgentConfig {
        let text = format!(
            "listen = \"127.0.0.1:7443\"\ndata_root = \"{}\"\n[tls]\nca = \"/pki/ca.pem\"\ncert = \"/pki/a.pem\"\nkey = \"/pki/a-key.pem\"\n",
            root.display()
        );
        AgentConfig::parse(&text, Path::new("agent.toml")).unwrap()
    }

    fn put(path: &Path, text: &str) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    #[test]
    fn the_queue_is_listed_and_counted_by_its_files_only() {
        let dir = tempfile::tempdir().unwrap();
        let q = dir.path().join("var/spool/postfix");
        put(&q.join("deferred/A/A1B2C3"), "deferred message");
        put(&q.join("defer/A/A1B2C3"), "its defer log");
        put(&q.join("hold/D4E5F6"), "held message");
        put(&q.join("pid/master.pid"), "123");
        put(&q.join("flush/example.net"), "fast flush log");
        std::fs::create_dir_all(q.join("active")).unwrap();
        std::os::unix::fs::symlink("/etc/shadow", q.join("active/LINK")).unwrap();
        // A queue dir that is a symlink lists nothing of where it points.
        std::os::unix::fs::symlink("/etc", q.join("incoming")).unwrap();
        let config = host(dir.path());
        assert_eq!(
            list(&config),
            [
                "var/spool/postfix/deferred/A/A1B2C3",
                "var/spool/postfix/hold/D4E5F6",
                "var/spool/postfix/defer/A/A1B2C3",
            ]
        );
        let counted = count(&config);
        assert_eq!(
            counted,
            BTreeMap::from([("deferred".to_string(), 1), ("hold".to_string(), 1)])
        );
    }

    #[tokio::test]
    async fn a_drain_waits_for_the_mail_on_its_way_not_for_mail_arriving_meanwhile() {
        let dir = tempfile::tempdir().unwrap();
        let q = dir.path().join("var/spool/postfix");
        put(&q.join("active/A1"), "on its way");
        put(&q.join("deferred/D/D1"), "deferred");
        let mut config = host(dir.path());
        // Postfix's flush request, answered by a program that says yes.
        config.mail_queue.postqueue_command = vec!["true".into()];
        config.mail_queue.drain_secs = 5;
        let (active, incoming) = (q.join("active/A1"), q.join("incoming/B2"));
        let postfix = tokio::spawn(async move {
            // A new message arrives and stays; the one on its way is delivered.
            tokio::time::sleep(Duration::from_millis(100)).await;
            put(&incoming, "arrived meanwhile");
            tokio::time::sleep(Duration::from_millis(200)).await;
            std::fs::remove_file(active).unwrap();
        });
        let state = drain(&config).await;
        postfix.await.unwrap();
        // Not the bound (no note), and not before the message on its way left (the queue as
        // the drain left it has no active message, but the one that arrived meanwhile).
        assert_eq!(state.note, "", "{state:?}");
        assert_eq!(
            state.messages,
            std::collections::HashMap::from([
                ("deferred".to_string(), 1),
                ("incoming".to_string(), 1)
            ])
        );
        // Postfix down (its flush refused): nothing waited for, the queue counted as it is.
        config.mail_queue.postqueue_command = vec!["false".into()];
        let state = drain(&config).await;
        assert!(state.note.starts_with("not drained"), "{state:?}");
        assert_eq!(state.messages.len(), 2, "{state:?}");
    }

    #[test]
    fn a_carry_installs_queue_files_once_and_refuses_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let (root, staging) = (dir.path().join("root"), dir.path().join("staging"));
        let q = staging.join("var/spool/postfix");
        put(&q.join("deferred/A/A1B2C3"), "deferred message");
        put(&q.join("hold/D4E5F6"), "held message");
        put(&staging.join("etc/cron.d/evil"), "* * * * * root sh");
        std::os::unix::fs::symlink("/etc/shadow", q.join("hold/LINK")).unwrap();
        std::os::unix::fs::symlink("/etc", q.join("incoming")).unwrap();
        std::fs::set_permissions(
            q.join("hold/D4E5F6"),
            std::fs::Permissions::from_mode(0o4700),
        )
        .unwrap();
        std::fs::create_dir_all(root.join("var/spool/postfix")).unwrap();
        let config = host(&root);
        let carried = install(&config, &staging).unwrap();
        assert_eq!(
            carried.installed,
            [
                "/var/spool/postfix/deferred/A/A1B2C3",
                "/var/spool/postfix/hold/D4E5F6"
            ]
        );
        assert_eq!(
            carried.refused,
            [
                "/etc/cron.d/evil",
                "/var/spool/postfix/hold/LINK",
                "/var/spool/postfix/incoming"
            ]
        );
        assert!(!root.join("etc/cron.d/evil").exists());
        assert!(root
            .join("var/spool/postfix/hold/LINK")
            .symlink_metadata()
            .is_err());
        let held = root.join("var/spool/postfix/hold/D4E5F6");
        assert_eq!(std::fs::read_to_string(&held).unwrap(), "held message");
        assert_eq!(held.metadata().unwrap().mode() & 0o7777, 0o700);
        // The structure check renamed one; a repeated carry installs nothing again.
        std::fs::rename(&held, root.join("var/spool/postfix/hold/RENAMED")).unwrap();
        let again = install(&config, &staging).unwrap();
        assert_eq!((again.installed.len(), again.already), (0, 2));
        // A name the target's queue holds with other content is never overwritten.
        put(&q.join("active/X1"), "one message");
        put(&root.join("var/spool/postfix/active/X1"), "another message");
        let error = install(&config, &staging).unwrap_err();
        assert!(error.contains("would replace"), "{error}");
        assert_eq!(
            std::fs::read_to_string(root.join("var/spool/postfix/active/X1")).unwrap(),
            "another message"
        );
    }
}
