//! Manifests of the data dirs for verification: entries, bytes and one content checksum per
//! dir, over every entry's relative path, kind, mode, owner, size and content (or link target),
//! in path order — equal manifests mean equal trees.

use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use bmfleet_proto::v1::DirManifest;
use sha2::{Digest, Sha256};

/// The manifest of one dir (`host` is its path on this host, `path` its BlueMind name).
/// A missing dir has no entries.
pub fn of_dir(path: &str, host: &Path, skip: &[&str], list: bool) -> Result<DirManifest, String> {
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
            // A dir's size is the filesystem's business (it never shrinks on ext4, and rsync
            // does not keep it): not part of the manifest.
            let size = if meta.is_dir() { 0 } else { meta.len() };
            let attributes = format!("{:o} {} {} {size}", meta.mode(), meta.uid(), meta.gid());
            sum.update(attributes.as_bytes());
            let digest: Vec<u8> = if meta.file_type().is_symlink() {
                let target = std::fs::read_link(entry.path()).map_err(|e| e.to_string())?;
                target.as_os_str().as_bytes().to_vec()
            } else if meta.is_file() {
                let content = std::fs::read(entry.path())
                    .map_err(|e| format!("{}: {e}", entry.path().display()))?;
                manifest.bytes += meta.len();
                Sha256::digest(&content).to_vec()
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
        let m = |p: &Path| of_dir("/var/spool/cyrus", p, &[".bmfleet-partial"], false).unwrap();
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
}
