//! The BlueMind configuration file set: listed by the origin from its patterns (the target
//! never names an origin file), copied in one rsync transfer, then the postfix maps are
//! rebuilt on the target because `.db` maps are tied to the distribution's libdb. The target
//! stages a copy while the service still runs; in the window it compares the origin's
//! [`states`] with it ([`staged_equal`]) and pulls the set again only when they differ.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::command;
use crate::files::manifest::{self, PathState};

/// The entries matching `patterns` under `root`, as paths relative to `root`, sorted so that
/// rsync's `--files-from` walks each parent dir once. Missing entries are skipped.
pub fn list(patterns: &[String], root: &Path) -> Vec<String> {
    let mut entries = Vec::new();
    for pattern in patterns {
        let relative = pattern.trim_start_matches('/');
        let (parent, last) = match relative.rsplit_once('/') {
            Some((p, l)) => (p, l),
            None => ("", relative),
        };
        if !last.contains('*') {
            if root.join(relative).symlink_metadata().is_ok() {
                entries.push(relative.to_string());
            }
            continue;
        }
        let Ok(dir) = std::fs::read_dir(root.join(parent)) else {
            continue;
        };
        for entry in dir.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if glob_match(last, name) {
                entries.push(if parent.is_empty() {
                    name.to_string()
                } else {
                    format!("{parent}/{name}")
                });
            }
        }
    }
    entries.sort();
    entries.dedup();
    entries
}

/// The state of every path of the set `entries` under `root`: each entry and, for a dir,
/// everything below it (symbolic links not followed), owners by name, in path order.
pub fn states(entries: &[String], root: &Path) -> Result<Vec<PathState>, String> {
    let mut states = Vec::new();
    for entry in entries {
        let top = root.join(entry);
        for found in walkdir::WalkDir::new(&top).sort_by_file_name() {
            let found = found.map_err(|e| format!("reading {}: {e}", top.display()))?;
            let rel = found.path().strip_prefix(root).map_err(|e| e.to_string())?;
            let rel = rel
                .to_str()
                .ok_or_else(|| format!("{} is not a UTF-8 name", rel.display()))?;
            states.push(manifest::named_path_state(rel, found.path())?);
        }
    }
    states.sort_by(|a, b| a.path.cmp(&b.path));
    states.dedup_by(|a, b| a.path == b.path);
    Ok(states)
}

/// Whether the copy staged in `tree` holds exactly the origin's set `theirs` (its
/// [`states`]): the same paths, the dirs on the way to them apart, in the same states
/// (contents, modes, owners by name, times, extended attributes). How many paths were
/// compared, or the first difference. A dir's time is not compared but taken: rsync can set
/// it before an entry lands in the dir (the journal pass meets the same), and the dir is
/// installed with the origin's.
pub fn staged_equal(theirs: &[PathState], tree: &Path) -> Result<usize, String> {
    let mut listed = std::collections::BTreeMap::new();
    let mut ancestors = std::collections::BTreeSet::new();
    for state in theirs {
        let path = Path::new(&state.path);
        let clean = !state.path.is_empty()
            && path
                .components()
                .all(|c| matches!(c, std::path::Component::Normal(_)));
        if !clean {
            return Err(format!("the origin's set names {:?}", state.path));
        }
        listed.insert(state.path.as_str(), state);
        ancestors.extend(path.ancestors().skip(1).filter_map(|a| a.to_str()));
    }
    let mut seen = 0;
    for found in walkdir::WalkDir::new(tree).min_depth(1).sort_by_file_name() {
        let found = found.map_err(|e| format!("reading the staged set: {e}"))?;
        let rel = found.path().strip_prefix(tree).map_err(|e| e.to_string())?;
        let rel = rel.to_str().unwrap_or_default();
        match listed.get(rel) {
            Some(wanted) => {
                let mut here = manifest::named_path_state(rel, found.path())?;
                if here.dir && wanted.dir && here.mtime != wanted.mtime {
                    if let Some((secs, nanos)) = wanted.mtime {
                        let time = std::time::UNIX_EPOCH
                            + Duration::from_secs(u64::try_from(secs).unwrap_or(0))
                            + Duration::from_nanos(u64::try_from(nanos).unwrap_or(0));
                        std::fs::File::open(found.path())
                            .and_then(|d| d.set_modified(time))
                            .map_err(|e| format!("{}: {e}", found.path().display()))?;
                        here.mtime = wanted.mtime;
                    }
                }
                if here != **wanted {
                    return Err(format!("staged {here:?}, on the origin {wanted:?}"));
                }
                seen += 1;
            }
            None if found.file_type().is_dir() && ancestors.contains(rel) => {}
            None => return Err(format!("{rel} is staged but not in the origin's set")),
        }
    }
    if seen != listed.len() {
        return Err(format!(
            "{} of the origin's {} paths are staged",
            seen,
            listed.len()
        ));
    }
    Ok(seen)
}

/// The `--files-from` content for `entries` (NUL-separated, for `--from0`).
pub fn list_text(entries: &[String]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in entries {
        out.extend_from_slice(e.as_bytes());
        out.push(0);
    }
    out
}

/// `*` matches any run of characters; everything else matches itself.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    let (first, rest) = match parts.split_first() {
        Some(x) => x,
        None => return name.is_empty(),
    };
    let Some(mut remaining) = name.strip_prefix(first) else {
        return false;
    };
    let Some((last, middle)) = rest.split_last() else {
        return remaining.is_empty();
    };
    for part in middle {
        match remaining.find(part) {
            Some(i) => remaining = &remaining[i + part.len()..],
            None => return false,
        }
    }
    remaining.len() >= last.len() && remaining.ends_with(last)
}

/// Where a relative path stands against the configuration patterns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coverage {
    /// A pattern names it, or it lies inside a directory a pattern names.
    Inside,
    /// A directory on the way to a pattern (`etc`, `etc/postfix`): created when missing, never
    /// given the sender's attributes.
    Ancestor,
    /// Neither.
    Outside,
}

/// Where `rel` (relative to the data root, `/`-separated) stands against `patterns`.
pub fn coverage(patterns: &[String], rel: &str) -> Coverage {
    let mut ancestor = false;
    for pattern in patterns {
        let pattern = pattern.trim_matches('/');
        if pattern.is_empty() {
            continue;
        }
        let (parent, last) = match pattern.rsplit_once('/') {
            Some((p, l)) => (p, l),
            None => ("", pattern),
        };
        // A glob names entries of `parent`; anything below a named entry is inside it.
        let inside = if last.contains('*') {
            let rest = if parent.is_empty() {
                Some(rel)
            } else {
                rel.strip_prefix(parent).and_then(|r| r.strip_prefix('/'))
            };
            rest.is_some_and(|r| glob_match(last, r.split('/').next().unwrap_or(r)))
        } else {
            rel == pattern || rel.starts_with(&format!("{pattern}/"))
        };
        if inside {
            return Coverage::Inside;
        }
        if pattern.starts_with(&format!("{rel}/")) || parent == rel {
            ancestor = true;
        }
    }
    if ancestor {
        Coverage::Ancestor
    } else {
        Coverage::Outside
    }
}

/// What a config set received from an origin holds, screened by this host's own patterns.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Screened {
    /// Entries to install (relative paths, parents before children).
    pub accepted: Vec<String>,
    /// Directories on the way to them.
    pub ancestors: Vec<String>,
    /// Entries outside every pattern (their content is not looked at).
    pub refused: Vec<String>,
}

/// Walks a received tree (`staging`) without following symlinks and sorts each entry by this
/// host's `patterns`: what an origin sends beyond them never lands.
pub fn screen(patterns: &[String], staging: &Path) -> Result<Screened, String> {
    let mut screened = Screened::default();
    let mut walk = walkdir::WalkDir::new(staging)
        .min_depth(1)
        .sort_by_file_name()
        .into_iter();
    while let Some(entry) = walk.next() {
        let entry = entry.map_err(|e| format!("reading the received config set: {e}"))?;
        let rel = entry
            .path()
            .strip_prefix(staging)
            .map_err(|e| e.to_string())?;
        let Some(rel) = rel.to_str() else {
            screened.refused.push(rel.to_string_lossy().into_owned());
            if entry.file_type().is_dir() {
                walk.skip_current_dir();
            }
            continue;
        };
        match coverage(patterns, rel) {
            Coverage::Inside => screened.accepted.push(rel.to_string()),
            Coverage::Ancestor if entry.file_type().is_dir() => {
                screened.ancestors.push(rel.to_string())
            }
            _ => {
                screened.refused.push(rel.to_string());
                if entry.file_type().is_dir() {
                    walk.skip_current_dir();
                }
            }
        }
    }
    Ok(screened)
}

/// Installs the screened entries from `staging` into the host's data root: missing
/// ancestors created (0755, root), then each accepted entry with its owner, its mode without
/// setuid/setgid bits, its extended attributes (POSIX ACLs among them) and its modification
/// time. A file whose content here already equals the staged one keeps its inode and takes
/// the attributes only (contents compared, not sizes and times: a freshly installed file can
/// have the origin's size and mtime with other content); any other file or symbolic link is
/// written beside its place and renamed into it, so a reader sees the old one or the new one.
/// Nothing is deleted; an ancestor that exists keeps its own attributes. In the agent, not a
/// local rsync: the step is in the downtime, and three processes reading every file twice
/// took the CPU the window's other steps needed.
pub async fn install(
    config: &crate::config::AgentConfig,
    staging: &Path,
    screened: &Screened,
) -> Result<(), String> {
    if screened.accepted.is_empty() {
        return Ok(());
    }
    let (root, staging, screened) = (
        config.data_root.clone(),
        staging.to_path_buf(),
        screened.clone(),
    );
    tokio::task::spawn_blocking(move || {
        for dir in &screened.ancestors {
            let target = root.join(dir);
            if target.symlink_metadata().is_err() {
                std::fs::create_dir_all(&target)
                    .map_err(|e| format!("cannot create {}: {e}", target.display()))?;
            }
        }
        for rel in &screened.accepted {
            install_entry(&staging.join(rel), &root.join(rel))
                .map_err(|e| format!("installing the config set's /{rel}: {e}"))?;
        }
        Ok(())
    })
    .await
    .map_err(|e| format!("installing the config set: {e}"))?
}

/// Installs one staged entry (a file, a directory or a symbolic link) at `dest`.
fn install_entry(src: &Path, dest: &Path) -> std::io::Result<()> {
    use std::io::{Error, ErrorKind};
    let meta = std::fs::symlink_metadata(src)?;
    let here = std::fs::symlink_metadata(dest).ok();
    let kind = meta.file_type();
    if kind.is_dir() {
        match &here {
            Some(h) if h.is_dir() => {}
            Some(_) => {
                std::fs::remove_file(dest)?;
                std::fs::create_dir(dest)?;
            }
            None => std::fs::create_dir(dest)?,
        }
        return set_attributes(&meta, src, dest);
    }
    if here.as_ref().is_some_and(|h| h.is_dir()) {
        return Err(Error::other(
            "a directory here where the origin has no directory",
        ));
    }
    let parent = dest
        .parent()
        .ok_or_else(|| Error::new(ErrorKind::InvalidInput, "no parent directory"))?;
    let mut staged = tempfile::Builder::new();
    staged.prefix(".bmfleet-install.");
    let written = if kind.is_file() {
        let same = match &here {
            Some(h) if h.is_file() && h.len() == meta.len() => same_content(src, dest)?,
            _ => false,
        };
        if same {
            return set_attributes(&meta, src, dest);
        }
        let mut file = staged.tempfile_in(parent)?;
        std::io::copy(&mut std::fs::File::open(src)?, file.as_file_mut())?;
        file.into_temp_path()
    } else if kind.is_symlink() {
        let link = std::fs::read_link(src)?;
        staged
            .make_in(parent, |path| std::os::unix::fs::symlink(&link, path))?
            .into_temp_path()
    } else {
        return Err(Error::other(
            "neither a file, a directory nor a symbolic link",
        ));
    };
    set_attributes(&meta, src, &written)?;
    written.persist(dest).map_err(|e| e.error)
}

/// Whether two regular files hold the same bytes.
fn same_content(a: &Path, b: &Path) -> std::io::Result<bool> {
    use std::io::Read;
    let (mut a, mut b) = (std::fs::File::open(a)?, std::fs::File::open(b)?);
    let (mut x, mut y) = (vec![0u8; 64 * 1024], vec![0u8; 64 * 1024]);
    loop {
        let n = a.read(&mut x)?;
        if n == 0 {
            return Ok(b.read(&mut y[..1])? == 0);
        }
        b.read_exact(&mut y[..n])?;
        if x[..n] != y[..n] {
            return Ok(false);
        }
    }
}

/// Gives `path` the owner, the mode (without setuid and setgid), the extended attributes and
/// the modification time `meta` (of `src`) has; a symbolic link takes its owner and time.
fn set_attributes(meta: &std::fs::Metadata, src: &Path, path: &Path) -> std::io::Result<()> {
    use nix::sys::stat::{utimensat, UtimensatFlags};
    use nix::sys::time::TimeSpec;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    std::os::unix::fs::lchown(path, Some(meta.uid()), Some(meta.gid()))?;
    if !meta.file_type().is_symlink() {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(meta.mode() & 0o1777))?;
        // Every attribute of the staged entry, and none it lacks (ACLs are among them).
        let wanted: Vec<std::ffi::OsString> = xattr::list(src)?.collect();
        for name in xattr::list(path)? {
            if !wanted.contains(&name) {
                xattr::remove(path, &name)?;
            }
        }
        for name in &wanted {
            if let Some(value) = xattr::get(src, name)? {
                xattr::set(path, name, &value)?;
            }
        }
    }
    let mtime = TimeSpec::new(meta.mtime(), meta.mtime_nsec());
    utimensat(
        nix::fcntl::AT_FDCWD,
        path,
        &TimeSpec::UTIME_OMIT,
        &mtime,
        UtimensatFlags::NoFollowSymlink,
    )
    .map_err(std::io::Error::from)
}

/// One rebuilt postfix map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RebuiltMap {
    /// The `-flat` source.
    pub flat: PathBuf,
    /// The `.db` written.
    pub db: PathBuf,
}

/// Rebuilds every `/etc/postfix/*-flat` map under `root` with `postmap` (the flat file's path
/// appended), then renames `NAME-flat.db` to `NAME.db`. Only regular files: a symlinked map
/// would have postmap read whatever it names.
pub async fn rebuild_postfix_maps(
    root: &Path,
    postmap: &[String],
    timeout: Duration,
) -> Result<Vec<RebuiltMap>, String> {
    let postfix = root.join("etc/postfix");
    let mut flats: Vec<PathBuf> = std::fs::read_dir(&postfix)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.symlink_metadata().is_ok_and(|m| m.is_file())
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.ends_with("-flat"))
        })
        .collect();
    flats.sort();
    // Each map is its own file: all of them at once (the step is in the downtime).
    let postfix = &postfix;
    let each = flats.into_iter().map(|flat| async move {
        let mut argv = postmap.to_vec();
        argv.push(flat.display().to_string());
        let result = command::run("postmap", &argv, timeout).await;
        if !command::succeeded(&result) {
            return Err(format!(
                "rebuilding {}: {}",
                flat.display(),
                command::failure_summary(&result)
            ));
        }
        let name = flat
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix("-flat"))
            .unwrap_or_default()
            .to_string();
        let built = PathBuf::from(format!("{}.db", flat.display()));
        let db = postfix.join(format!("{name}.db"));
        std::fs::rename(&built, &db)
            .map_err(|e| format!("postmap wrote no {}: {e}", built.display()))?;
        Ok(RebuiltMap { flat, db })
    });
    futures_util::future::try_join_all(each).await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A staged copy equals the origin's set only path for path: an extra, a missing or a
    /// changed path, or an origin naming a path outside the tree, is a difference.
    #[test]
    fn a_staged_copy_equals_only_the_very_set_the_origin_describes() {
        let origin = tempfile::tempdir().unwrap();
        let staged = tempfile::tempdir().unwrap();
        for root in [origin.path(), staged.path()] {
            std::fs::create_dir_all(root.join("etc/bm")).unwrap();
            std::fs::create_dir_all(root.join("etc/postfix")).unwrap();
            std::fs::write(root.join("etc/bm/bm.ini"), "password = x\n").unwrap();
            std::fs::write(root.join("etc/postfix/main.cf"), "a = b\n").unwrap();
            // rsync keeps times: both copies carry the same.
            for f in ["etc/bm/bm.ini", "etc/postfix/main.cf", "etc/bm"] {
                let t = std::time::UNIX_EPOCH + Duration::from_secs(1_780_000_000);
                std::fs::File::open(root.join(f))
                    .unwrap()
                    .set_modified(t)
                    .unwrap();
            }
        }
        let entries = vec!["etc/bm".to_string(), "etc/postfix/main.cf".to_string()];
        let theirs = states(&entries, origin.path()).unwrap();
        assert_eq!(
            theirs.iter().map(|s| s.path.as_str()).collect::<Vec<_>>(),
            ["etc/bm", "etc/bm/bm.ini", "etc/postfix/main.cf"]
        );
        // The dirs on the way (etc, etc/postfix) are not part of the set. A dir's time is
        // taken from the origin's.
        std::fs::File::open(staged.path().join("etc/bm"))
            .unwrap()
            .set_modified(std::time::SystemTime::now())
            .unwrap();
        assert_eq!(staged_equal(&theirs, staged.path()), Ok(3));
        assert_eq!(
            std::fs::metadata(staged.path().join("etc/bm"))
                .unwrap()
                .modified()
                .unwrap(),
            std::time::UNIX_EPOCH + Duration::from_secs(1_780_000_000)
        );
        let mut hostile = theirs.clone();
        hostile[1].path = "etc/bm/../../../shadow".into();
        assert!(staged_equal(&hostile, staged.path()).is_err());
        hostile[1].path = "/etc/bm/bm.ini".into();
        assert!(staged_equal(&hostile, staged.path()).is_err());
        std::fs::write(staged.path().join("etc/bm/extra.ini"), "").unwrap();
        let extra = staged_equal(&theirs, staged.path()).unwrap_err();
        assert!(extra.contains("etc/bm/extra.ini"), "{extra}");
        std::fs::remove_file(staged.path().join("etc/bm/extra.ini")).unwrap();
        std::fs::remove_file(staged.path().join("etc/postfix/main.cf")).unwrap();
        assert!(staged_equal(&theirs, staged.path()).is_err());
        std::fs::write(staged.path().join("etc/postfix/main.cf"), "a = c\n").unwrap();
        assert!(staged_equal(&theirs, staged.path()).is_err());
    }

    #[test]
    fn globs_match_only_the_last_component() {
        assert!(glob_match("imapd*", "imapd.conf"));
        assert!(glob_match("*-flat", "virtual_domains-flat"));
        assert!(!glob_match("*-flat", "virtual_domains-flat.db"));
        assert!(glob_match("*.db", "transport.db"));
        assert!(glob_match("a*b*c", "axxbyyc"));
        assert!(!glob_match("a*b*c", "axxc"));
    }

    fn manual_patterns() -> Vec<String> {
        [
            "/etc/bm",
            "/etc/imapd*",
            "/etc/postfix/main.cf",
            "/etc/postfix/*-flat",
            "/etc/ssl/certs/bm_cert.pem",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    #[test]
    fn coverage_follows_the_patterns_only() {
        let p = manual_patterns();
        for inside in [
            "etc/bm",
            "etc/bm/bm.ini",
            "etc/bm/sub/deep",
            "etc/imapd.conf",
            "etc/imapd.d/x",
            "etc/postfix/main.cf",
            "etc/postfix/transport-flat",
            "etc/ssl/certs/bm_cert.pem",
        ] {
            assert_eq!(coverage(&p, inside), Coverage::Inside, "{inside}");
        }
        for ancestor in ["etc", "etc/postfix", "etc/ssl", "etc/ssl/certs"] {
            assert_eq!(coverage(&p, ancestor), Coverage::Ancestor, "{ancestor}");
        }
        for outside in [
            "etc/cron.d",
            "etc/cron.d/evil",
            "root/.ssh/authorized_keys",
            "root",
            "etc/bmx",
            "etc/postfix/transport-flat.db",
            "etc/postfix/master.cf",
            "etc/ssl/certs/other.pem",
            "etc/shadow",
        ] {
            assert_eq!(coverage(&p, outside), Coverage::Outside, "{outside}");
        }
    }

    #[test]
    fn screening_keeps_what_the_patterns_name_and_reports_the_rest() {
        let staging = tempfile::tempdir().unwrap();
        for f in [
            "etc/bm/bm.ini",
            "etc/postfix/main.cf",
            "etc/cron.d/evil",
            "root/.ssh/authorized_keys",
        ] {
            let p = staging.path().join(f);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, b"x").unwrap();
        }
        // A symlinked dir is an entry, never walked into.
        std::os::unix::fs::symlink("/root", staging.path().join("etc/imapd.d")).unwrap();
        let s = screen(&manual_patterns(), staging.path()).unwrap();
        assert_eq!(
            s.accepted,
            [
                "etc/bm",
                "etc/bm/bm.ini",
                "etc/imapd.d",
                "etc/postfix/main.cf"
            ]
        );
        assert_eq!(s.ancestors, ["etc", "etc/postfix"]);
        assert_eq!(s.refused, ["etc/cron.d", "root"]);
    }

    #[test]
    fn the_list_is_sorted_relative_and_skips_what_is_missing() {
        let root = tempfile::tempdir().unwrap();
        for f in [
            "etc/postfix/main.cf",
            "etc/postfix/transport-flat",
            "etc/imapd.conf",
            "etc/bm/bm.ini",
        ] {
            let p = root.path().join(f);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, b"x").unwrap();
        }
        let patterns: Vec<String> = [
            "/etc/postfix/*-flat",
            "/etc/bm",
            "/etc/imapd*",
            "/etc/postfix/main.cf",
            "/etc/bm-hps",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(
            list(&patterns, root.path()),
            [
                "etc/bm",
                "etc/imapd.conf",
                "etc/postfix/main.cf",
                "etc/postfix/transport-flat"
            ]
        );
        assert_eq!(list_text(&["a".into(), "b c".into()]), b"a\0b c\0");
    }
}
