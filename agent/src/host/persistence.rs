//! The service IP kept across a reboot of the target, in the network configuration system
//! the host runs: ifupdown (Debian's `/etc/network/interfaces` sourcing `interfaces.d`), a
//! systemd-networkd `.network` file for the card (a drop-in beside it adds the address:
//! systemd.network(5), drop-ins "parsed after the main file", `Address=` may repeat), or
//! netplan (a file of its own whose sequences netplan appends to the card's: "if the values
//! are sequences, the sequences are concatenated", netplan-generate(8)). Anything else is
//! refused: facts say why, and the preflight refuses such a target. All paths under
//! data_root.

use std::path::{Path, PathBuf};

use crate::config::AgentConfig;

/// The ifupdown stanza's file.
pub const IFUPDOWN_FILE: &str = "etc/network/interfaces.d/bmfleet-service-ip";
/// The netplan file.
pub const NETPLAN_FILE: &str = "etc/netplan/90-bmfleet-service-ip.yaml";
/// The name of the systemd-networkd drop-in, in the card's `.network.d/`.
pub const NETWORKD_DROP_IN: &str = "bmfleet-service-ip.conf";

/// A network configuration system that can keep the service IP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum System {
    /// `/etc/network/interfaces` sourcing `interfaces.d`.
    Ifupdown,
    /// systemd-networkd (the `.network` file for the card is found when the IP is taken).
    Networkd,
    /// netplan.
    Netplan,
    /// `network.persist = "none"`: the operator keeps it.
    None,
}

impl System {
    /// Its name in facts and messages.
    pub fn as_str(&self) -> &'static str {
        match self {
            System::Ifupdown => "ifupdown",
            System::Networkd => "systemd-networkd",
            System::Netplan => "netplan",
            System::None => "none",
        }
    }
}

fn files_with(dir: &Path, suffixes: &[&str]) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| !n.starts_with('.') && suffixes.iter().any(|s| n.ends_with(s)))
        })
        .collect();
    found.sort();
    found
}

/// The system this host keeps its addresses in (`network.persist`, "auto": found under
/// data_root: netplan first, as it renders networkd's files itself), or why none is
/// supported.
pub fn system(config: &AgentConfig) -> Result<System, String> {
    let root = &config.data_root;
    let netplan = || !files_with(&root.join("etc/netplan"), &[".yaml", ".yml"]).is_empty();
    let networkd = || !files_with(&root.join("etc/systemd/network"), &[".network"]).is_empty();
    let ifupdown = || -> Result<bool, String> {
        let Ok(text) = std::fs::read_to_string(root.join("etc/network/interfaces")) else {
            return Ok(false);
        };
        let sources = text.lines().map(str::trim).any(|l| {
            (l.starts_with("source ") || l.starts_with("source-directory "))
                && l.contains("/etc/network/interfaces.d")
        });
        if sources {
            Ok(true)
        } else {
            Err(
                "/etc/network/interfaces does not source /etc/network/interfaces.d: add \
                 `source /etc/network/interfaces.d/*`, or set network.persist"
                    .into(),
            )
        }
    };
    match config.network.persist.as_str() {
        "none" => Ok(System::None),
        "ifupdown" => Ok(System::Ifupdown),
        "networkd" => Ok(System::Networkd),
        "netplan" => Ok(System::Netplan),
        _ if netplan() => Ok(System::Netplan),
        _ if networkd() => Ok(System::Networkd),
        _ if ifupdown()? => Ok(System::Ifupdown),
        _ => Err(
            "no supported network configuration system found (netplan files in \
                  /etc/netplan, systemd-networkd .network files in /etc/systemd/network, or \
                  ifupdown's /etc/network/interfaces): the service IP would not survive a \
                  reboot; set network.persist = \"none\" to keep it yourself"
                .into(),
        ),
    }
}

/// Whether a networkd `Name=` pattern (shell globs, several space-separated) matches `card`.
fn name_matches(patterns: &str, card: &str) -> bool {
    fn glob(p: &[u8], s: &[u8]) -> bool {
        match (p.first(), s.first()) {
            (None, None) => true,
            (Some(b'*'), _) => glob(&p[1..], s) || (!s.is_empty() && glob(p, &s[1..])),
            (Some(b'?'), Some(_)) => glob(&p[1..], &s[1..]),
            (Some(a), Some(b)) if a == b => glob(&p[1..], &s[1..]),
            _ => false,
        }
    }
    patterns
        .split_whitespace()
        .any(|p| glob(p.as_bytes(), card.as_bytes()))
}

/// The `.network` file systemd-networkd applies to `card`: the first in name order whose
/// `[Match]` `Name=` matches it (networkd applies only the first match).
fn networkd_file(config: &AgentConfig, card: &str) -> Result<PathBuf, String> {
    let dir = config.data_root.join("etc/systemd/network");
    files_with(&dir, &[".network"])
        .into_iter()
        .find(|f| {
            let text = std::fs::read_to_string(f).unwrap_or_default();
            let mut in_match = false;
            text.lines().map(str::trim).any(|l| {
                if l.starts_with('[') {
                    in_match = l == "[Match]";
                    return false;
                }
                in_match
                    && l.strip_prefix("Name=")
                        .is_some_and(|patterns| name_matches(patterns, card))
            })
        })
        .ok_or_else(|| {
            format!(
                "systemd-networkd has no .network file matching {card} in /etc/systemd/network: \
                 the service IP would not survive a reboot"
            )
        })
}

/// Writes the service IP `cidr` on `card` into this host's network configuration; returns
/// the file written (None for `persist = "none"`).
pub fn write(config: &AgentConfig, card: &str, cidr: &str) -> Result<Option<PathBuf>, String> {
    let header =
        "# Written by bmfleet: the BlueMind service IP, moved here from the origin host.\n";
    let (path, text, private) = match system(config)? {
        System::None => return Ok(None),
        System::Ifupdown => {
            let family = if cidr.contains(':') { "inet6" } else { "inet" };
            (
                config.data_root.join(IFUPDOWN_FILE),
                format!("{header}auto {card}\niface {card} {family} static\n    address {cidr}\n"),
                false,
            )
        }
        System::Networkd => {
            let file = networkd_file(config, card)?;
            let mut dir = file.clone().into_os_string();
            dir.push(".d");
            (
                PathBuf::from(dir).join(NETWORKD_DROP_IN),
                format!("{header}[Network]\nAddress={cidr}\n"),
                false,
            )
        }
        System::Netplan => (
            config.data_root.join(NETPLAN_FILE),
            format!(
                "{header}network:\n  version: 2\n  ethernets:\n    {card}:\n      addresses:\n        - \"{cidr}\"\n"
            ),
            // netplan warns about (and newer releases refuse) files others can read.
            true,
        ),
    };
    let written = path
        .parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .and_then(|_| std::fs::write(&path, text))
        .and_then(|_| {
            if private {
                bmfleet_proto::private_file(&path)
            } else {
                Ok(())
            }
        });
    written.map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    Ok(Some(path))
}

/// Removes whatever bmfleet wrote for the service IP, in every system (a host may have
/// changed systems since). Idempotent.
pub fn remove(config: &AgentConfig) -> Result<(), String> {
    let root = &config.data_root;
    let mut files = vec![root.join(IFUPDOWN_FILE), root.join(NETPLAN_FILE)];
    for network in files_with(&root.join("etc/systemd/network"), &[".network"]) {
        let mut dir = network.into_os_string();
        dir.push(".d");
        files.push(PathBuf::from(dir).join(NETWORKD_DROP_IN));
    }
    for file in files.iter().filter(|f| f.exists()) {
        std::fs::remove_file(file).map_err(|e| format!("cannot remove {}: {e}", file.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(files: &[(&str, &str)], persist: &str) -> (tempfile::TempDir, AgentConfig) {
        let dir = tempfile::tempdir().unwrap();
        for (path, text) in files {
            let p = dir.path().join(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        }
        let text = format!(
            "listen = \"127.0.0.1:7443\"\ndata_root = \"{}\"\n[tls]\nca = \"/pki/ca.pem\"\ncert = \"/pki/a.pem\"\nkey = \"/pki/a-key.pem\"\n[network]\npersist = \"{persist}\"\n",
            dir.path().display()
        );
        let config = AgentConfig::parse(&text, Path::new("agent.toml")).unwrap();
        (dir, config)
    }

    #[test]
    fn each_system_gets_the_card_and_the_address_and_gives_them_back() {
        let cidr = "198.18.0.101/24";
        // ifupdown, sourcing interfaces.d.
        let (_d, c) = host(
            &[(
                "etc/network/interfaces",
                "auto lo\niface lo inet loopback\nsource /etc/network/interfaces.d/*\n",
            )],
            "auto",
        );
        let file = write(&c, "eth0", cidr).unwrap().unwrap();
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(
            text.contains("iface eth0 inet static\n    address 198.18.0.101/24"),
            "{text}"
        );
        remove(&c).unwrap();
        assert!(!file.exists());
        // networkd: the drop-in of the file whose Name= matches the card, not the other one.
        let (_d, c) = host(
            &[
                (
                    "etc/systemd/network/10-mgmt.network",
                    "[Match]\nName=eth1\n[Network]\nDHCP=yes\n",
                ),
                (
                    "etc/systemd/network/20-lan.network",
                    "[Match]\nName=en* eth0\n[Network]\nAddress=198.18.0.3/24\n",
                ),
            ],
            "auto",
        );
        let file = write(&c, "ens18", cidr).unwrap().unwrap();
        assert!(
            file.ends_with("etc/systemd/network/20-lan.network.d/bmfleet-service-ip.conf"),
            "{file:?}"
        );
        assert!(std::fs::read_to_string(&file)
            .unwrap()
            .contains("[Network]\nAddress=198.18.0.101/24\n"));
        let refused = write(&c, "wlan0", cidr).unwrap_err();
        assert!(
            refused.contains("no .network file matching wlan0"),
            "{refused}"
        );
        remove(&c).unwrap();
        assert!(!file.exists());
        // netplan wins over the networkd files it renders, and its file is private.
        let (_d, c) = host(
            &[
                ("etc/netplan/50-cloud-init.yaml", "network:\n  version: 2\n  ethernets:\n    ens18:\n      addresses: [198.18.0.3/24]\n"),
                ("etc/systemd/network/10-x.network", "[Match]\nName=ens18\n"),
            ],
            "auto",
        );
        let file = write(&c, "ens18", cidr).unwrap().unwrap();
        assert!(file.ends_with(NETPLAN_FILE));
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(
            text.contains("    ens18:\n      addresses:\n        - \"198.18.0.101/24\"\n"),
            "{text}"
        );
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    #[test]
    fn a_host_without_a_supported_system_is_refused_unless_the_operator_keeps_it() {
        let (_d, c) = host(&[], "auto");
        assert!(system(&c)
            .unwrap_err()
            .contains("no supported network configuration system"));
        let (_d, c) = host(
            &[(
                "etc/network/interfaces",
                "auto eth0\niface eth0 inet dhcp\n",
            )],
            "auto",
        );
        assert!(system(&c).unwrap_err().contains("does not source"));
        let (_d, c) = host(&[], "none");
        assert_eq!(write(&c, "eth0", "198.18.0.101/24").unwrap(), None);
    }

    #[test]
    fn networkd_names_match_as_globs() {
        assert!(name_matches("en*", "ens18"));
        assert!(name_matches("eth0 ens1?", "ens18"));
        assert!(!name_matches("eth*", "ens18"));
    }
}
