//! The BlueMind configuration file set: listed by the origin from its patterns (the target
//! never names an origin file), copied in one rsync transfer, then the postfix maps are
//! rebuilt on the target because `.db` maps are tied to the distribution's libdb.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::command;

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

/// One rebuilt postfix map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RebuiltMap {
    /// The `-flat` source.
    pub flat: PathBuf,
    /// The `.db` written.
    pub db: PathBuf,
}

/// Rebuilds every `/etc/postfix/*-flat` map under `root` with `postmap` (the flat file's path
/// appended), then renames `NAME-flat.db` to `NAME.db`.
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
            p.is_file()
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.ends_with("-flat"))
        })
        .collect();
    flats.sort();
    let mut rebuilt = Vec::new();
    for flat in flats {
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
        rebuilt.push(RebuiltMap { flat, db });
    }
    Ok(rebuilt)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_only_the_last_component() {
        assert!(glob_match("imapd*", "imapd.conf"));
        assert!(glob_match("*-flat", "virtual_domains-flat"));
        assert!(!glob_match("*-flat", "virtual_domains-flat.db"));
        assert!(glob_match("*.db", "transport.db"));
        assert!(glob_match("a*b*c", "axxbyyc"));
        assert!(!glob_match("a*b*c", "axxc"));
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
