//! The agent's configuration file (TOML).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use bmfleet_proto::config_file::{self, ConfigError};
use bmfleet_proto::tls::TlsFiles;
use serde::Deserialize;

pub use bmfleet_proto::BLUEMIND_DATA_DIRS;

/// Everything `bmfleet-agent --config FILE` reads.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Address the Agent API listens on.
    pub listen: SocketAddr,
    /// Address the data plane listens on (targets pull from here under a grant). None: this
    /// host serves no pulls.
    #[serde(default)]
    pub data_listen: Option<SocketAddr>,
    /// Where the agent's own `/metrics` (Prometheus) is served; none when absent.
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    /// Every BlueMind path is taken under this directory ("/" in production; the lab gives
    /// each simulated host its own).
    #[serde(default = "default_data_root")]
    pub data_root: PathBuf,
    /// Where the agent keeps its operation journal.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// The agent's identity (its certificate must have role `agent`).
    pub tls: TlsFiles,
    /// How facts are read.
    #[serde(default)]
    pub facts: FactsConfig,
    /// The BlueMind services of this host.
    #[serde(default)]
    pub services: ServicesConfig,
    /// How files move (rsync through the agents' tunnel).
    #[serde(default)]
    pub data_plane: DataPlaneConfig,
    /// BlueMind's PostgreSQL on this host.
    #[serde(default)]
    pub postgresql: PostgresConfig,
    /// The BlueMind configuration file set.
    #[serde(default)]
    pub config_set: ConfigSetConfig,
    /// Moving the service IP.
    #[serde(default)]
    pub network: NetworkConfig,
    /// The host's Postfix queue: drained before a stop, carried to the target at cold sync.
    #[serde(default)]
    pub mail_queue: MailQueueConfig,
    /// BlueMind's API, for the post-migration steps.
    #[serde(default)]
    pub bluemind_api: BlueMindApiConfig,
    /// The orchestrator certificate names this agent obeys (role orchestrator and one of
    /// these names); another orchestrator-role certificate is refused.
    #[serde(default = "default_orchestrators")]
    pub orchestrators: Vec<String>,
    /// The addresses the orchestrator connects from: the Agent API keeps places for them
    /// outside its connection cap, so strangers filling it cannot lock the orchestrator out.
    #[serde(default)]
    pub orchestrator_addresses: Vec<std::net::IpAddr>,
}

fn default_orchestrators() -> Vec<String> {
    vec!["orchestrator".into()]
}

/// How the agent reaches BlueMind's API on its own host.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BlueMindApiConfig {
    /// bm-core's local HTTP endpoint.
    pub url: String,
    /// The bm-core token file (under data_root), used as X-BM-ApiKey.
    pub token_file: PathBuf,
    /// admin0@global.virt's password: when set, the agent logs in instead of using the token.
    pub admin0_password: Option<String>,
    /// Deadline of each long task, seconds.
    pub task_timeout_secs: u64,
    /// Deadline of each HTTP call, seconds (a hung core fails the step, which is retried).
    pub request_timeout_secs: u64,
}

impl Default for BlueMindApiConfig {
    fn default() -> Self {
        BlueMindApiConfig {
            url: "http://127.0.0.1:8090".into(),
            token_file: PathBuf::from("/etc/bm/bm-core.tok"),
            admin0_password: None,
            task_timeout_secs: 300,
            request_timeout_secs: 30,
        }
    }
}

/// How the service IP is moved and announced.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkConfig {
    /// The ip program (iproute2).
    pub ip: String,
    /// Gratuitous ARP announcements after taking the IP…
    pub announce_count: u32,
    /// …spread over this many milliseconds (the first one right away).
    pub announce_period_ms: u64,
    /// Where the address is made persistent, under data_root: "auto" (netplan, else
    /// systemd-networkd, else ifupdown, whichever the host runs; host/persistence.rs),
    /// "ifupdown", "networkd", "netplan", or "none" (the operator keeps it).
    pub persist: String,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        NetworkConfig {
            ip: "ip".into(),
            announce_count: 5,
            announce_period_ms: 10_000,
            persist: "auto".into(),
        }
    }
}

/// How files move between agents.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataPlaneConfig {
    /// The rsync program, on both sides.
    pub rsync: String,
    /// The program rsync runs as its remote shell: this agent's binary in tunnel mode.
    /// Empty: the running agent binary itself.
    pub tunnel_program: Option<PathBuf>,
    /// Deadline for connecting to an origin and being admitted.
    pub connect_timeout_secs: u64,
}

impl Default for DataPlaneConfig {
    fn default() -> Self {
        DataPlaneConfig {
            rsync: "rsync".into(),
            tunnel_program: None,
            connect_timeout_secs: 15,
        }
    }
}

/// BlueMind's PostgreSQL: how the origin dumps it and how the target restores it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PostgresConfig {
    /// Directory of pg_dump, pg_restore, psql. Empty: the newest /usr/lib/postgresql/*/bin.
    /// On an origin, its pg_dump must be at least as new as the target's server.
    pub bin_dir: Option<PathBuf>,
    /// Where BlueMind's user connects (host name, address or socket dir).
    pub host: String,
    /// Port of the server.
    pub port: u16,
    /// BlueMind's database user (owner of its databases).
    pub user: String,
    /// Its password when `/etc/bm/bm.ini` has none (BlueMind before 5.2 uses "bj").
    pub password: String,
    /// BlueMind's databases; those that do not exist on the origin are skipped
    /// (bj-data exists from BlueMind 4 on).
    pub databases: Vec<String>,
    /// The administrator connection used on a target to re-create databases and restore.
    pub admin_host: String,
    /// Administrator's role.
    pub admin_user: String,
    /// Runs the administrator's commands as the OS user peer authentication expects
    /// (`runuser -u USER --` is carried out by the agent itself: [`crate::command::prefixed`]).
    pub admin_command_prefix: Vec<String>,
    /// The extensions a target's administrator may create before a restore (BlueMind's need
    /// a superuser; the restore itself runs as `user`): only those the origin's database has,
    /// in its schema when that is `public` or `pg_catalog`.
    pub extensions: Vec<String>,
    /// The cluster's data directory (Debian: /var/lib/postgresql/N/main). Needed on a target
    /// that becomes a physical standby of its origin; empty: it cannot.
    pub data_dir: Option<PathBuf>,
    /// Starts the cluster (Debian: `pg_ctlcluster N main start`); needed with `data_dir`.
    pub server_start: Vec<String>,
    /// Stops it (Debian: `pg_ctlcluster N main stop -m fast`).
    pub server_stop: Vec<String>,
    /// Where a standby's WAL receiver finds the agent's relay to the origin (a Unix socket
    /// dir, owned by the cluster's user).
    pub relay_dir: PathBuf,
    /// On an origin whose `max_slot_wal_keep_size` is unlimited: the cap set while a standby
    /// follows it (a vanished target must not fill the origin's disk), MB. Reset after.
    pub replication_wal_cap_mb: u64,
}

impl PostgresConfig {
    /// Why this host's cluster cannot become a physical standby, if it cannot.
    pub fn standby_unavailable(&self) -> Option<String> {
        let mut missing = Vec::new();
        if self.data_dir.is_none() {
            missing.push("postgresql.data_dir");
        }
        if self.server_start.is_empty() {
            missing.push("postgresql.server_start");
        }
        if self.server_stop.is_empty() {
            missing.push("postgresql.server_stop");
        }
        (!missing.is_empty()).then(|| format!("{} not set in agent.toml", missing.join(", ")))
    }
}

impl Default for PostgresConfig {
    fn default() -> Self {
        PostgresConfig {
            bin_dir: None,
            host: "localhost".into(),
            port: 5432,
            user: "bj".into(),
            password: "bj".into(),
            databases: vec!["bj".into(), "bj-data".into()],
            admin_host: "/var/run/postgresql".into(),
            admin_user: "postgres".into(),
            admin_command_prefix: argv(&["runuser", "-u", "postgres", "--"]),
            extensions: argv(&["hstore", "btree_gin", "ltree", "unaccent"]),
            data_dir: None,
            server_start: Vec::new(),
            server_stop: Vec::new(),
            relay_dir: PathBuf::from("/run/bmfleet-agent/pg-relay"),
            replication_wal_cap_mb: 8192,
        }
    }
}

/// The BlueMind configuration file set copied at cold sync.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConfigSetConfig {
    /// Absolute paths; `*` may appear in the last component. Dirs are copied whole.
    pub patterns: Vec<String>,
    /// Rebuilds one postfix map: the `-flat` file's path is appended. The resulting
    /// `NAME-flat.db` is renamed `NAME.db`, as BlueMind does.
    pub postmap_command: Vec<String>,
}

impl Default for ConfigSetConfig {
    fn default() -> Self {
        ConfigSetConfig {
            patterns: [
                "/etc/bm",
                "/etc/bm-hps",
                "/etc/ssl/certs/bm_cert.pem",
                "/var/lib/bm-ca",
                "/usr/share/bm-elasticsearch/config/elasticsearch.yml",
                "/etc/imapd*",
                "/etc/cyrus*",
                "/etc/postfix/main.cf",
                "/etc/postfix/master.cf",
                "/etc/postfix/*-flat",
                "/etc/postfix/*.db",
                "/etc/bm-webmail",
            ]
            .iter()
            .map(|p| p.to_string())
            .collect(),
            postmap_command: argv(&["postmap"]),
        }
    }
}

/// The host's Postfix queue (mail accepted and not yet delivered). Before the services stop,
/// the queue is flushed and given `drain_secs` to deliver into Cyrus while it still runs;
/// what is left (deferred, held, in flight) is carried to the target at cold sync, put in
/// place with `postsuper -s` (Postfix's structure check, the documented step after queue
/// files were restored from another machine) and flushed once the target's services run.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MailQueueConfig {
    /// Postfix's `queue_directory`, a BlueMind path (under `data_root`).
    pub dir: PathBuf,
    /// `postqueue` (`-f` is appended); empty: no drain and no flush.
    pub postqueue_command: Vec<String>,
    /// `postsuper` (`-s` is appended); empty: carried files are not structure-checked.
    pub postsuper_command: Vec<String>,
    /// The longest wait for the queue to drain before a stop, seconds.
    pub drain_secs: u64,
}

impl Default for MailQueueConfig {
    fn default() -> Self {
        MailQueueConfig {
            dir: PathBuf::from("/var/spool/postfix"),
            postqueue_command: argv(&["postqueue"]),
            postsuper_command: argv(&["postsuper"]),
            drain_secs: 10,
        }
    }
}

/// How the agent reads its host's facts.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FactsConfig {
    /// Prints the BlueMind version on stdout.
    pub bluemind_version_command: Vec<String>,
    /// Prints the PostgreSQL server version on stdout.
    pub postgresql_version_command: Vec<String>,
    /// The BlueMind data dirs (absolute, taken under `data_root`).
    pub data_dirs: Vec<PathBuf>,
    /// Dirs synced in addition to `data_dirs`.
    pub extra_data_dirs: Vec<PathBuf>,
    /// Users that own the spool and must exist on a target host.
    pub spool_users: Vec<String>,
    /// How long a version command may run.
    pub command_timeout_secs: u64,
}

impl Default for FactsConfig {
    fn default() -> Self {
        FactsConfig {
            bluemind_version_command: argv(&["dpkg-query", "-W", "-f=${Version}", "bm-core"]),
            postgresql_version_command: argv(&[
                "runuser",
                "-u",
                "postgres",
                "--",
                "psql",
                "-XAtc",
                "SHOW server_version",
            ]),
            data_dirs: BLUEMIND_DATA_DIRS.iter().map(PathBuf::from).collect(),
            extra_data_dirs: Vec::new(),
            spool_users: vec!["cyrus".into(), "postfix".into()],
            command_timeout_secs: 30,
        }
    }
}

/// The BlueMind services, each with its own commands (argv lists, never shell strings).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServicesConfig {
    /// Stopped in this order, started in the reverse order.
    pub service: Vec<ServiceCommands>,
    /// How long one command may run before it is killed and reported as failed.
    pub command_timeout_secs: u64,
}

impl Default for ServicesConfig {
    fn default() -> Self {
        let service =
            |name: &str, start: &[&str], stop: &[&str], status: &[&str]| ServiceCommands {
                name: name.into(),
                start: argv(start),
                stop: argv(stop),
                status: argv(status),
            };
        ServicesConfig {
            // Postfix stops first (its queue drained into Cyrus, which still runs) and starts
            // last (Cyrus takes its deliveries from the start).
            service: vec![
                service(
                    "postfix",
                    &["service", "postfix", "start"],
                    &["service", "postfix", "stop"],
                    &["service", "postfix", "status"],
                ),
                service(
                    "bluemind",
                    &["bmctl", "start"],
                    &["bmctl", "stop"],
                    &["bmctl", "status"],
                ),
            ],
            command_timeout_secs: 600,
        }
    }
}

/// One service's start, stop and status commands.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceCommands {
    /// Name shown in replies and logs.
    pub name: String,
    /// Starts the service.
    pub start: Vec<String>,
    /// Stops the service.
    pub stop: Vec<String>,
    /// Exits 0 when the service runs.
    pub status: Vec<String>,
}

fn argv(words: &[&str]) -> Vec<String> {
    words.iter().map(|w| w.to_string()).collect()
}

fn default_data_root() -> PathBuf {
    PathBuf::from("/")
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/bmfleet-agent")
}

impl AgentConfig {
    /// Reads and checks a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::parse(&config_file::read(path)?, path)
    }

    /// Parses and checks configuration text; `path` is used in messages.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let config: AgentConfig = config_file::parse(text, path)?;
        config.check(path)?;
        Ok(config)
    }

    fn check(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |field: String, message: &str| config_file::invalid(path, field, message);
        if !self.data_root.is_absolute() {
            return Err(invalid("data_root".into(), "must be an absolute path"));
        }
        // The agent's own state and identity are never a data dir, nor inside one.
        let own: Vec<PathBuf> = [
            Some(self.state_dir.clone()),
            self.tls.ca.parent().map(Path::to_path_buf),
            self.tls.cert.parent().map(Path::to_path_buf),
            self.tls.key.parent().map(Path::to_path_buf),
        ]
        .into_iter()
        .flatten()
        .filter(|p| !p.as_os_str().is_empty())
        .collect();
        let dirs = self
            .facts
            .data_dirs
            .iter()
            .enumerate()
            .map(|(i, d)| (format!("facts.data_dirs[{i}]"), d))
            .chain(
                self.facts
                    .extra_data_dirs
                    .iter()
                    .enumerate()
                    .map(|(i, d)| (format!("facts.extra_data_dirs[{i}]"), d)),
            );
        for (field, dir) in dirs {
            let text = dir.to_string_lossy();
            if let Some(reason) = bmfleet_proto::refuse_data_dir(&text) {
                return Err(invalid(field, &reason));
            }
            let host = self.host_path(dir);
            if let Some(p) = own
                .iter()
                .find(|p| host.starts_with(p) || p.starts_with(&host))
            {
                return Err(invalid(
                    field,
                    &format!(
                        "{} overlaps the agent's own state or certificates ({})",
                        host.display(),
                        p.display()
                    ),
                ));
            }
        }
        for (i, s) in self.services.service.iter().enumerate() {
            for (what, cmd) in [
                ("start", &s.start),
                ("stop", &s.stop),
                ("status", &s.status),
            ] {
                if cmd.first().is_none_or(|c| c.is_empty()) {
                    return Err(invalid(
                        format!("services.service[{i}].{what}"),
                        "must be a non-empty argv list, e.g. [\"bmctl\", \"stop\"]",
                    ));
                }
            }
        }
        for (i, pattern) in self.config_set.patterns.iter().enumerate() {
            let parent_has_glob = Path::new(pattern)
                .parent()
                .is_some_and(|p| p.to_string_lossy().contains('*'));
            if !pattern.starts_with('/') || pattern.contains("..") || parent_has_glob {
                return Err(invalid(
                    format!("config_set.patterns[{i}]"),
                    "must be an absolute path without '..', with '*' only in its last component",
                ));
            }
        }
        if !["auto", "ifupdown", "networkd", "netplan", "none"]
            .contains(&self.network.persist.as_str())
        {
            return Err(invalid(
                "network.persist".into(),
                "must be \"auto\", \"ifupdown\", \"networkd\", \"netplan\" or \"none\"",
            ));
        }
        if self.services.command_timeout_secs == 0 || self.facts.command_timeout_secs == 0 {
            return Err(invalid(
                "command_timeout_secs".into(),
                "must be at least 1 second",
            ));
        }
        Ok(())
    }

    /// The data dirs and extra data dirs, as BlueMind paths.
    pub fn all_data_dirs(&self) -> impl Iterator<Item = &PathBuf> {
        self.facts
            .data_dirs
            .iter()
            .chain(self.facts.extra_data_dirs.iter())
    }

    /// Why this host refuses to grant or write `path` (a BlueMind path), if it does: only its
    /// data dirs (BlueMind's and `facts.extra_data_dirs`) and what lies inside them.
    pub fn refuse_data_path(&self, path: &Path) -> Option<String> {
        if self.all_data_dirs().any(|d| path.starts_with(d)) {
            return None;
        }
        Some(format!(
            "{} is not a data dir of this host: it serves and receives only BlueMind's data dirs \
             and its facts.extra_data_dirs",
            path.display()
        ))
    }

    /// Where a BlueMind path lives on this host: under `data_root`.
    pub fn host_path(&self, bluemind_path: &Path) -> PathBuf {
        let relative = bluemind_path.strip_prefix("/").unwrap_or(bluemind_path);
        self.data_root.join(relative)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
listen = "127.0.0.1:7443"
[tls]
ca = "/pki/ca.pem"
cert = "/pki/a.pem"
key = "/pki/a-key.pem"
"#;

    #[test]
    fn system_trees_and_the_agents_own_dirs_are_never_data_dirs() {
        for (extra, reason) in [
            ("\"/\"", "whole host"),
            ("\"/etc\"", "inside the system tree /etc"),
            ("\"/root/.ssh\"", "inside the system tree /root"),
            (
                "\"/pki\"",
                "overlaps the agent's own state or certificates (/pki)",
            ),
            ("\"/srv/state/sub\"", "overlaps the agent's own state"),
        ] {
            let text = format!(
                "state_dir = \"/srv/state\"\n{MINIMAL}[facts]\nextra_data_dirs = [{extra}]\n"
            );
            let e = AgentConfig::parse(&text, Path::new("agent.toml"))
                .unwrap_err()
                .to_string();
            assert!(e.contains("facts.extra_data_dirs[0]"), "{e}");
            assert!(e.contains(reason), "{extra}: {e}");
        }
        let ok = format!("{MINIMAL}[facts]\nextra_data_dirs = [\"/var/spool/bm-custom\"]\n");
        let c = AgentConfig::parse(&ok, Path::new("agent.toml")).unwrap();
        assert_eq!(
            c.refuse_data_path(Path::new("/var/spool/bm-custom/a")),
            None
        );
        assert_eq!(c.refuse_data_path(Path::new("/var/spool/cyrus")), None);
        assert!(c.refuse_data_path(Path::new("/etc")).is_some());
        assert!(c.refuse_data_path(Path::new("/var/spool")).is_some());
    }

    #[test]
    fn minimal_config_takes_bluemind_defaults() {
        let c = AgentConfig::parse(MINIMAL, Path::new("agent.toml")).unwrap();
        assert_eq!(c.data_root, PathBuf::from("/"));
        assert_eq!(c.all_data_dirs().count(), 7);
        let stop: Vec<_> = c
            .services
            .service
            .iter()
            .map(|s| s.stop.join(" "))
            .collect();
        // Postfix first: its queue drains into Cyrus, which stops after it.
        assert_eq!(stop, ["service postfix stop", "bmctl stop"]);
        assert_eq!(
            c.host_path(Path::new("/var/spool/cyrus")),
            PathBuf::from("/var/spool/cyrus")
        );
    }

    #[test]
    fn the_shipped_example_parses_and_equals_the_defaults() {
        let text = include_str!("../../deploy/examples/agent.toml");
        let example = AgentConfig::parse(text, Path::new("agent.toml")).unwrap();
        let minimal = AgentConfig::parse(MINIMAL, Path::new("agent.toml")).unwrap();
        assert_eq!(
            format!("{:?}", example.facts),
            format!("{:?}", minimal.facts)
        );
        assert_eq!(
            format!("{:?}", example.services),
            format!("{:?}", minimal.services)
        );
        assert_eq!(
            format!("{:?}", example.postgresql),
            format!("{:?}", minimal.postgresql)
        );
        assert_eq!(
            format!("{:?}", example.config_set),
            format!("{:?}", minimal.config_set)
        );
        assert_eq!(
            format!("{:?}", example.data_plane),
            format!("{:?}", minimal.data_plane)
        );
        assert_eq!(
            format!("{:?}", example.network),
            format!("{:?}", minimal.network)
        );
        assert_eq!(
            format!("{:?}", example.bluemind_api),
            format!("{:?}", minimal.bluemind_api)
        );
    }

    #[test]
    fn data_root_prefixes_bluemind_paths() {
        let text = format!("data_root = \"/lab/origin-1\"\n{MINIMAL}");
        let c = AgentConfig::parse(&text, Path::new("agent.toml")).unwrap();
        assert_eq!(
            c.host_path(Path::new("/etc/bm/bm.ini")),
            PathBuf::from("/lab/origin-1/etc/bm/bm.ini")
        );
    }

    #[test]
    fn unknown_field_is_named_with_its_line() {
        let text = format!("{MINIMAL}\n[services]\ncommand_timeout = 5\n");
        let err = AgentConfig::parse(&text, Path::new("agent.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("command_timeout"), "{err}");
        assert!(err.contains("line 9"), "{err}");
    }

    #[test]
    fn empty_service_command_is_refused_with_its_field() {
        let text = format!(
            "{MINIMAL}\n[[services.service]]\nname = \"x\"\nstart = []\nstop = [\"a\"]\nstatus = [\"b\"]\n"
        );
        let err = AgentConfig::parse(&text, Path::new("agent.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("services.service[0].start"), "{err}");
    }
}
