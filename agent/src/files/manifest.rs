//! Manifests of the data dirs for verification: entries, bytes and one content checksum per
//! dir, over every entry's relative path, kind, mode, owner, size and content (or link target),
//! in path order — equal manifests mean equal trees. With a `content_since` time, regular
//! files carry their modification time (to the ns) and only those modified since then are
//! read: a stat per entry instead of reading the whole tree while services are down. Extended
//! attributes (POSIX ACLs included: `system.posix_acl_*`) are part of every entry. Contents
//! are hashed as they are read, in constant memory.

use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use bmfleet_proto::v1::DirManifest;
use sha2::{Digest, Sha256};

/// The manifest of one dir (`host` is its path on this host, `path` its BlueMind name).
/// A missing dir has no entries. `content_since_ms`: 0 reads every file; otherwise see the
/// module's doc.
pub fn of_dir(
    path: &str,
    host: &Path,
    skip: &[&str],
    list: bool,
    content_since_ms: i64,
) -> Result<DirManifest, String> {
    let mut manifest = DirManifest {
        path: path.to_string(),
        ..Default::default()
    };
    let mut sum = Sha256::new();
    if host.exists() {
        let walk = walkdir::WalkDir::new(host).min_depth(1).sort_by_file_name();
        for entry in walk
            .into_iter()
            .filter_entry(|e| !skip.iter().any(|s| e.file_name() == *s))
        {
            let entry = entry.map_err(|e| format!("walking {}: {e}", host.display()))?;
            let meta = entry
                .path()
                .symlink_metadata()
                .map_err(|e| format!("{}: {e}", entry.path().display()))?;
            let rel = entry.path().strip_prefix(host).unwrap_or(entry.path());
            sum.update(rel.as_os_str().as_bytes());
            sum.update([0]);
            let mut attributes = attributes(&meta, entry.path())?;
            let mtime_ms = meta.mtime() * 1000 + meta.mtime_nsec() / 1_000_000;
            if content_since_ms > 0 && meta.is_file() {
                attributes += &format!(" {}.{:09}", meta.mtime(), meta.mtime_nsec());
            }
            sum.update(attributes.as_bytes());
            let digest: Vec<u8> = if meta.file_type().is_symlink() {
                link_target(entry.path())?
            } else if meta.is_file() {
                manifest.bytes += meta.len();
                if content_since_ms == 0 || mtime_ms >= content_since_ms {
                    content_digest(entry.path())?
                } else {
                    b"not read".to_vec()
                }
            } else {
                Vec::new()
            };
            sum.update(&digest);
            sum.update([0]);
            if list {
                let hex: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
                manifest
                    .entries
                    .push(format!("{} {attributes} {hex}", rel.display()));
            }
            manifest.files += 1;
        }
    }
    manifest.checksum = sum.finalize().iter().map(|b| format!("{b:02x}")).collect();
    Ok(manifest)
}

/// An entry's mode, owner, size and extended attributes, as a manifest compares them. A dir's
/// size is the filesystem's business (it never shrinks on ext4, and rsync does not keep it):
/// not part of it.
fn attributes(meta: &std::fs::Metadata, path: &Path) -> Result<String, String> {
    owned_attributes(meta, path, meta.uid().to_string(), meta.gid().to_string())
}

/// [`attributes`] with the owner and group given.
fn owned_attributes(
    meta: &std::fs::Metadata,
    path: &Path,
    owner: String,
    group: String,
) -> Result<String, String> {
    let size = if meta.is_dir() { 0 } else { meta.len() };
    Ok(format!("{:o} {owner} {group} {size}", meta.mode()) + &xattrs(path)?)
}

/// A file's owner and group by name on this host (the number when it has none): what rsync
/// without `--numeric-ids` keeps from one host to another.
fn owner_names(meta: &std::fs::Metadata) -> (String, String) {
    use nix::unistd::{Gid, Group, Uid, User};
    let user = User::from_uid(Uid::from_raw(meta.uid()))
        .ok()
        .flatten()
        .map_or_else(|| meta.uid().to_string(), |u| u.name);
    let group = Group::from_gid(Gid::from_raw(meta.gid()))
        .ok()
        .flatten()
        .map_or_else(|| meta.gid().to_string(), |g| g.name);
    (user, group)
}

/// A symbolic link's target, as bytes.
fn link_target(path: &Path) -> Result<Vec<u8>, String> {
    let target = std::fs::read_link(path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(target.as_os_str().as_bytes().to_vec())
}

/// One path's state, for a journal pass's verification: kind and mode, owner, size (not a
/// dir's), modification time to the ns (files and dirs), extended attributes and ACLs, and
/// the whole content's SHA-256 (or a link's target). Empty attributes: the path does not exist.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PathState {
    /// The BlueMind path.
    pub path: String,
    /// `mode uid gid size xattrs`, or empty when absent.
    pub attributes: String,
    /// Modification time (s, ns) of a file or dir.
    pub mtime: Option<(i64, i64)>,
    /// SHA-256 of a file's content, or a link's target, hex.
    pub digest: String,
    /// Whether it is a directory.
    pub dir: bool,
}

/// The state of `bluemind_path`, found at `host` on this host.
pub fn path_state(bluemind_path: &str, host: &Path) -> Result<PathState, String> {
    state_of(bluemind_path, host, false)
}

/// [`path_state`] with the owner and group by name: a copy rsync made on another host (owners
/// mapped by name) compares equal to its original.
pub fn named_path_state(bluemind_path: &str, host: &Path) -> Result<PathState, String> {
    state_of(bluemind_path, host, true)
}

fn state_of(bluemind_path: &str, host: &Path, by_name: bool) -> Result<PathState, String> {
    let mut state = PathState {
        path: bluemind_path.to_string(),
        attributes: String::new(),
        mtime: None,
        digest: String::new(),
        dir: false,
    };
    let meta = match host.symlink_metadata() {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(state),
        Err(e) => return Err(format!("{}: {e}", host.display())),
    };
    state.attributes = if by_name {
        let (owner, group) = owner_names(&meta);
        owned_attributes(&meta, host, owner, group)?
    } else {
        attributes(&meta, host)?
    };
    state.dir = meta.is_dir();
    let digest = if meta.file_type().is_symlink() {
        link_target(host)?
    } else if meta.is_file() {
        content_digest(host)?
    } else {
        Vec::new()
    };
    if meta.is_file() || meta.is_dir() {
        state.mtime = Some((meta.mtime(), meta.mtime_nsec()));
    }
    state.digest = digest.iter().map(|b| format!("{b:02x}")).collect();
    Ok(state)
}

/// The SHA-256 of a file's content, read a block at a time.
pub fn content_digest(path: &Path) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let err = |e: std::io::Error| format!("{}: {e}", path.display());
    let mut file = std::fs::File::open(path).map_err(err)?;
    let mut hasher = Sha256::new();
    let mut block = vec![0u8; 1 << 20];
    loop {
        match file.read(&mut block) {
            Ok(0) => break,
            Ok(n) => hasher.update(&block[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(err(e)),
        }
    }
    Ok(hasher.finalize().to_vec())
}

/// An entry's extended attributes (of the entry itself, not a symlink's target), sorted:
/// ` xattr:NAME=HEXVALUE` each; empty when it has none or the filesystem keeps none. The
/// `user.` and `trusted.` namespaces and POSIX ACLs travel with rsync -X -A; `security.`
/// labels are the receiving system's own (its policy relabels) and are left out.
fn xattrs(path: &Path) -> Result<String, String> {
    let names = match xattr::list(path) {
        Ok(n) => n,
        Err(e) if e.raw_os_error() == Some(nix::libc::ENOTSUP) => return Ok(String::new()),
        Err(e) => return Err(format!("{}: extended attributes: {e}", path.display())),
    };
    let mut names: Vec<_> = names
        .filter(|n| {
            let n = n.to_string_lossy();
            n.starts_with("user.")
                || n.starts_with("trusted.")
                || n.starts_with("system.posix_acl_")
        })
        .collect();
    names.sort();
    let mut out = String::new();
    for name in names {
        let value = xattr::get(path, &name)
            .map_err(|e| format!("{}: {}: {e}", path.display(), name.to_string_lossy()))?
            .unwrap_or_default();
        let hex: String = value.iter().map(|b| format!("{b:02x}")).collect();
        out += &format!(" xattr:{}={hex}", name.to_string_lossy());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_trees_have_equal_manifests_and_any_change_shows() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        for root in [a.path(), b.path()] {
            std::fs::create_dir_all(root.join("user/alice")).unwrap();
            std::fs::write(root.join("user/alice/1."), b"hello").unwrap();
        }
        let m = |p: &Path| of_dir("/var/spool/cyrus", p, &[".bmfleet-partial"], false, 0).unwrap();
        assert_eq!(m(a.path()), m(b.path()));
        assert_eq!((m(a.path()).files, m(a.path()).bytes), (3, 5));
        // A dir that once held more entries is bigger on disk: not a difference.
        for n in 0..200 {
            std::fs::write(
                b.path()
                    .join(format!("user/alice/tmp-{n:03}-with-a-long-name")),
                b"",
            )
            .unwrap();
        }
        for n in 0..200 {
            std::fs::remove_file(
                b.path()
                    .join(format!("user/alice/tmp-{n:03}-with-a-long-name")),
            )
            .unwrap();
        }
        assert_eq!(m(a.path()), m(b.path()));
        std::fs::write(b.path().join("user/alice/1."), b"hellO").unwrap();
        assert_ne!(m(a.path()).checksum, m(b.path()).checksum);
    }

    #[test]
    fn extended_attributes_and_contents_read_in_blocks_are_covered() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        for root in [a.path(), b.path()] {
            // Bigger than one read block.
            std::fs::write(root.join("big"), vec![7u8; 3 << 20]).unwrap();
            xattr::set(root.join("big"), "user.bmfleet", b"one").unwrap();
        }
        let m = |p: &Path| of_dir("/var/spool/cyrus", p, &[], true, 0).unwrap();
        assert_eq!(m(a.path()).checksum, m(b.path()).checksum);
        assert!(m(a.path()).entries[0].contains("xattr:user.bmfleet=6f6e65"));
        xattr::set(b.path().join("big"), "user.bmfleet", b"two").unwrap();
        assert_ne!(m(a.path()).checksum, m(b.path()).checksum);
        xattr::remove(b.path().join("big"), "user.bmfleet").unwrap();
        assert_ne!(m(a.path()).checksum, m(b.path()).checksum);
        assert_eq!(
            content_digest(&a.path().join("big")).unwrap(),
            Sha256::digest(vec![7u8; 3 << 20]).to_vec()
        );
    }

    #[test]
    fn with_a_since_time_old_files_are_compared_by_mtime_and_recent_ones_by_content() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let old = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
        let since_ms = 1_750_000_000_000;
        let put =
            |root: &Path, name: &str, content: &[u8], mtime: Option<std::time::SystemTime>| {
                std::fs::create_dir_all(root.join("user")).unwrap();
                let path = root.join("user").join(name);
                std::fs::write(&path, content).unwrap();
                if let Some(t) = mtime {
                    std::fs::File::options()
                        .write(true)
                        .open(&path)
                        .unwrap()
                        .set_modified(t)
                        .unwrap();
                }
            };
        for root in [a.path(), b.path()] {
            put(root, "old.", b"old mail", Some(old));
        }
        let m = |p: &Path| of_dir("/var/spool/cyrus", p, &[], false, since_ms).unwrap();
        assert_eq!(m(a.path()).checksum, m(b.path()).checksum);
        // Same size and mtime, other content, older than the since time: not read, so equal
        // (rsync's quick check would have skipped it too; its transfer was checksummed).
        put(b.path(), "old.", b"OLD MAIL", Some(old));
        assert_eq!(m(a.path()).checksum, m(b.path()).checksum);
        // Read when every content is asked for.
        let all = |p: &Path| of_dir("/var/spool/cyrus", p, &[], false, 0).unwrap();
        assert_ne!(all(a.path()).checksum, all(b.path()).checksum);
        // Another mtime differs, even for an old file.
        put(
            b.path(),
            "old.",
            b"old mail",
            Some(old + std::time::Duration::from_nanos(1)),
        );
        assert_ne!(m(a.path()).checksum, m(b.path()).checksum);
        // A recent file is read: same size, same mtime, other content differs.
        put(b.path(), "old.", b"old mail", Some(old));
        let recent =
            std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_760_000_000);
        put(a.path(), "new.", b"new mail", Some(recent));
        put(b.path(), "new.", b"NEW MAIL", Some(recent));
        assert_ne!(m(a.path()).checksum, m(b.path()).checksum);
        put(b.path(), "new.", b"new mail", Some(recent));
        assert_eq!(m(a.path()).checksum, m(b.path()).checksum);
    }
}
