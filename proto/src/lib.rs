//! The bmfleet wire contract and the fleet's identities.
//!
//! - [`v1`]: the generated gRPC code for the `Agent` and `Fleet` services.
//! - [`identity`]: who a certificate says its holder is (name and role).
//! - [`pki`]: the fleet CA and the certificates it issues (`bmctl fleet pki`).
//! - [`tls`]: mutual-TLS servers and clients that enforce name and role.
//! - [`error_chain`]: turning a failed call into a reason an operator can act on.
#![forbid(unsafe_code)]

pub mod admission;
pub mod config_file;
pub mod error_chain;
pub mod identity;
pub mod metrics_http;
pub mod network;
pub mod pki;
pub mod process;
pub mod tls;

/// Generated code of `proto/bmfleet.proto` (package `bmfleet.v1`).
#[allow(missing_docs, clippy::all)]
pub mod v1 {
    tonic::include_proto!("bmfleet.v1");
}

/// BlueMind's data dirs (the seed procedure's), synced from origin to target.
pub const BLUEMIND_DATA_DIRS: [&str; 7] = [
    "/var/spool/cyrus",
    "/var/lib/cyrus",
    "/var/spool/bm-hsm",
    "/var/spool/sieve",
    "/var/spool/bm-elasticsearch",
    "/var/spool/bm-docs",
    "/var/spool/bm-filehosting",
];

/// Trees no data dir may be, contain or lie inside: a slip here would copy a host's system
/// onto another (`/` contains them all).
pub const SYSTEM_TREES: [&str; 15] = [
    "/etc",
    "/root",
    "/usr",
    "/boot",
    "/proc",
    "/sys",
    "/dev",
    "/bin",
    "/sbin",
    "/lib",
    "/lib64",
    "/run",
    "/home",
    "/var/lib/bmfleet",
    "/var/lib/bmfleet-agent",
];

/// Why `dir` may not be synced between hosts as a data dir, if it may not: not a clean
/// absolute path, `/`, or overlapping a system tree (equal to it, inside it or containing it).
pub fn refuse_data_dir(dir: &str) -> Option<String> {
    let path = std::path::Path::new(dir);
    let clean = path.is_absolute() && !dir.split('/').any(|c| c == "." || c == "..");
    if !clean || dir.contains('\\') || dir.contains('\0') {
        return Some("must be an absolute path without '.', '..', '\\' or NUL".into());
    }
    if path.parent().is_none() {
        return Some("'/' is the whole host: only data dirs are synced".into());
    }
    SYSTEM_TREES.iter().find_map(|tree| {
        let tree = std::path::Path::new(tree);
        if path.starts_with(tree) {
            Some(format!(
                "{} is inside the system tree {}",
                dir,
                tree.display()
            ))
        } else if tree.starts_with(path) {
            Some(format!(
                "{} contains the system tree {}",
                dir,
                tree.display()
            ))
        } else {
            None
        }
    })
}

/// Makes `path` a file only its owner reads and writes (0600), creating it empty when missing:
/// state databases hold grants, journals and the audit log. SQLite gives its -wal and -shm
/// files the database file's mode.
pub fn private_file(path: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
}

/// Installs ring as the process-wide rustls crypto provider. Call once at the start of every
/// binary and test; repeated calls are harmless.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_trees_and_root_are_never_data_dirs() {
        for refused in [
            "/",
            "/etc",
            "/etc/",
            "/etc/cron.d",
            "/root/.ssh",
            "/usr",
            "/var/lib/bmfleet/state",
            "/var/lib/bmfleet-agent",
            "/var/lib/bmfleet-agent/grants",
            "/var/lib",
            "/var",
            "relative",
            "/var/spool/../../etc",
            "/var/./spool",
        ] {
            assert!(refuse_data_dir(refused).is_some(), "{refused}");
        }
        for allowed in BLUEMIND_DATA_DIRS
            .iter()
            .chain(&["/var/spool/bm-custom", "/srv/mail"])
        {
            assert_eq!(refuse_data_dir(allowed), None, "{allowed}");
        }
    }
}
