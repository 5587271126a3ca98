//! What a host is: names, versions, data dirs and the users that own the spool.
//! Read-only; feeds the orchestrator's preflight and health view.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bmfleet_proto::v1::{DataDir, FactsReply, SpoolUser, VersionFact};
use nix::sys::statvfs::statvfs;
use nix::unistd::User;

use crate::command;
use crate::config::AgentConfig;

/// Gathers the host's facts; `measure_usage` walks every data dir.
pub async fn gather(config: &AgentConfig, agent_name: &str, measure_usage: bool) -> FactsReply {
    let timeout = Duration::from_secs(config.facts.command_timeout_secs);
    let persistence = crate::host::persistence::system(config);
    let cards = interface_addresses();
    let (bluemind, postgresql) = tokio::join!(
        version("BlueMind", &config.facts.bluemind_version_command, timeout),
        version(
            "PostgreSQL",
            &config.facts.postgresql_version_command,
            timeout
        ),
    );
    // One psql for both (Facts runs at every health check).
    let admin = crate::db::pg::Connection::admin(&config.postgresql);
    let server = tokio::time::timeout(
        timeout,
        admin.psql(
            "postgres",
            "SELECT current_setting('server_version_num'), current_setting('wal_level');",
        ),
    );
    let (postgresql_version_num, postgresql_wal_level) = match server.await {
        Ok(Ok(out)) => {
            let (version, wal_level) = out.trim().split_once('\t').unwrap_or_default();
            (version.parse().unwrap_or(0), wal_level.to_string())
        }
        _ => (0, String::new()),
    };
    let dirs: Vec<(PathBuf, PathBuf)> = config
        .all_data_dirs()
        .map(|d| (d.clone(), config.host_path(d)))
        .collect();
    let data_dirs = tokio::task::spawn_blocking(move || {
        dirs.iter()
            .map(|(path, host)| data_dir(path, host, measure_usage))
            .collect()
    })
    .await
    .unwrap_or_default();
    FactsReply {
        agent_name: agent_name.to_string(),
        hostname: nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_default(),
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        data_root: config.data_root.display().to_string(),
        bluemind: Some(bluemind),
        postgresql: Some(postgresql),
        data_dirs,
        interfaces: nix::net::if_::if_nameindex()
            .map(|list| {
                list.iter()
                    .map(|i| i.name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default(),
        addresses: {
            // Every address, from the same reading as the cards' (without the prefixes).
            let mut all: Vec<String> = cards
                .iter()
                .flat_map(|(_, addresses)| addresses.iter())
                .filter_map(|a| a.split('/').next().map(str::to_string))
                .collect();
            all.sort();
            all.dedup();
            all
        },
        interface_addresses: cards
            .into_iter()
            .map(|(name, addresses)| bmfleet_proto::v1::InterfaceFact { name, addresses })
            .collect(),
        network_persistence: persistence
            .as_ref()
            .map(|s| s.as_str().to_string())
            .unwrap_or_default(),
        network_persistence_unavailable: persistence.err().unwrap_or_default(),
        served: crate::host::served::get(&config.state_dir).is_some(),
        libc_version: libc_version().await,
        standby_unavailable: config.postgresql.standby_unavailable().unwrap_or_default(),
        postgresql_version_num,
        postgresql_wal_level,
        spool_users: config
            .facts
            .spool_users
            .iter()
            .map(|u| spool_user(u))
            .collect(),
    }
}

/// The C library's version (`getconf GNU_LIBC_VERSION`, e.g. "glibc 2.36"); empty if unknown.
async fn libc_version() -> String {
    let argv = ["getconf".to_string(), "GNU_LIBC_VERSION".to_string()];
    let out = command::run("getconf", &argv, Duration::from_secs(5)).await;
    if command::succeeded(&out) {
        out.stdout_tail.trim().to_string()
    } else {
        String::new()
    }
}

/// The BlueMind version of this host (empty when it cannot be read).
pub async fn bluemind_version(config: &AgentConfig) -> String {
    let timeout = Duration::from_secs(config.facts.command_timeout_secs);
    version("BlueMind", &config.facts.bluemind_version_command, timeout)
        .await
        .version
}

async fn version(what: &str, argv: &[String], timeout: Duration) -> VersionFact {
    if argv.is_empty() {
        return VersionFact {
            version: String::new(),
            error: format!("no command configured to read the {what} version"),
        };
    }
    let result = command::run(what, argv, timeout).await;
    let version = result.stdout_tail.trim().to_string();
    if command::succeeded(&result) && !version.is_empty() {
        VersionFact {
            version,
            error: String::new(),
        }
    } else if command::succeeded(&result) {
        VersionFact {
            version: String::new(),
            error: format!("`{}` printed no version", argv.join(" ")),
        }
    } else {
        VersionFact {
            version: String::new(),
            error: command::failure_summary(&result),
        }
    }
}

fn data_dir(path: &Path, host: &Path, measure_usage: bool) -> DataDir {
    let mut dir = DataDir {
        path: path.display().to_string(),
        exists: host.is_dir(),
        ..Default::default()
    };
    // A target host does not have the dirs yet: report the filesystem that will hold them.
    match host.ancestors().find(|a| a.exists()).map(statvfs) {
        // statvfs field types differ across platforms (u32 on some 32-bit ones).
        #[allow(clippy::useless_conversion)]
        Some(Ok(fs)) => {
            let fragment = u64::from(fs.fragment_size());
            dir.free_bytes = u64::from(fs.blocks_available()) * fragment;
            dir.total_bytes = u64::from(fs.blocks()) * fragment;
        }
        Some(Err(e)) => dir.error = format!("statvfs {}: {e}", host.display()),
        None => dir.error = format!("no existing ancestor of {}", host.display()),
    }
    if measure_usage && dir.exists {
        match usage(host) {
            Ok((bytes, entries)) => {
                dir.used_bytes = bytes;
                dir.entries = entries;
                dir.usage_measured = true;
            }
            Err(e) => dir.error = format!("walking {}: {e}", host.display()),
        }
    }
    dir
}

/// Apparent bytes of regular files (hard-linked inodes once) and number of entries below `root`.
fn usage(root: &Path) -> Result<(u64, u64), walkdir::Error> {
    let mut seen = HashSet::new();
    let (mut bytes, mut entries) = (0u64, 0u64);
    for entry in walkdir::WalkDir::new(root).min_depth(1) {
        let entry = entry?;
        entries += 1;
        let meta = entry.metadata()?;
        if meta.is_file() && (meta.nlink() == 1 || seen.insert((meta.dev(), meta.ino()))) {
            bytes += meta.len();
        }
    }
    Ok((bytes, entries))
}

fn spool_user(name: &str) -> SpoolUser {
    match User::from_name(name) {
        Ok(Some(u)) => SpoolUser {
            name: name.to_string(),
            exists: true,
            uid: u.uid.as_raw(),
            gid: u.gid.as_raw(),
        },
        _ => SpoolUser {
            name: name.to_string(),
            exists: false,
            uid: 0,
            gid: 0,
        },
    }
}

/// Every interface of this host with its addresses as "address/prefix", in name order.
pub fn interface_addresses() -> Vec<(String, Vec<String>)> {
    let mut by_name: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    let Ok(list) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    for entry in list {
        let (Some(address), netmask) = (entry.address, entry.netmask) else {
            continue;
        };
        let with_prefix = if let Some(v4) = address.as_sockaddr_in() {
            let bits = netmask
                .and_then(|m| m.as_sockaddr_in().map(|m| u32::from(m.ip()).count_ones()))
                .unwrap_or(32);
            format!("{}/{bits}", v4.ip())
        } else if let Some(v6) = address.as_sockaddr_in6() {
            let bits = netmask
                .and_then(|m| m.as_sockaddr_in6().map(|m| u128::from(m.ip()).count_ones()))
                .unwrap_or(128);
            format!("{}/{bits}", v6.ip())
        } else {
            continue;
        };
        by_name
            .entry(entry.interface_name)
            .or_default()
            .push(with_prefix);
    }
    by_name.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_counts_hard_links_once() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("a")).unwrap();
        std::fs::write(dir.path().join("a/1."), vec![0u8; 1000]).unwrap();
        std::fs::hard_link(dir.path().join("a/1."), dir.path().join("2.")).unwrap();
        std::fs::write(dir.path().join("3."), vec![0u8; 10]).unwrap();
        let (bytes, entries) = usage(dir.path()).unwrap();
        assert_eq!(bytes, 1010);
        assert_eq!(entries, 4);
    }

    #[test]
    fn missing_dir_reports_free_space_of_its_filesystem() {
        let dir = tempfile::tempdir().unwrap();
        let d = data_dir(
            Path::new("/var/spool/cyrus"),
            &dir.path().join("var/spool/cyrus"),
            true,
        );
        assert!(!d.exists);
        assert!(d.total_bytes > 0 && d.error.is_empty(), "{d:?}");
        assert!(!d.usage_measured);
    }

    #[test]
    fn root_exists_and_nobody_does_not() {
        assert!(spool_user("root").exists);
        assert!(!spool_user("no-such-user-bmfleet").exists);
    }
}
