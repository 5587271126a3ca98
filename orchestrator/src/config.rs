//! The orchestrator's configuration file (TOML).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use bmfleet_proto::config_file::{self, ConfigError};
use bmfleet_proto::identity::validate_name;
use bmfleet_proto::tls::TlsFiles;
use serde::Deserialize;

/// Everything `bmfleet-orchestrator --config FILE` reads.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrchestratorConfig {
    /// Address the Fleet API (for bmctl) listens on.
    pub listen: std::net::SocketAddr,
    /// Where `/metrics` (Prometheus) is served; none when absent.
    #[serde(default)]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// The embedded state database.
    #[serde(default = "default_state_db")]
    pub state_db: PathBuf,
    /// Seconds between two health checks of every agent.
    #[serde(default = "default_health_interval")]
    pub health_interval_secs: u64,
    /// Seconds between two measurements of the data dirs' usage (a full walk on the agent).
    #[serde(default = "default_usage_interval")]
    pub usage_interval_secs: u64,
    /// Deadline of one Agent call made by a health check.
    #[serde(default = "default_rpc_timeout")]
    pub rpc_timeout_secs: u64,
    /// Audit entries older than this many days are deleted (checked hourly).
    #[serde(default = "default_audit_retention")]
    pub audit_retention_days: u32,
    /// The orchestrator's identity (role `orchestrator`).
    pub tls: TlsFiles,
    /// Every agent known from the start (more may be registered at run time through the
    /// Fleet API: `bmctl fleet agents add`, `bmctl fleet enroll`).
    #[serde(default)]
    pub agent: Vec<AgentEntry>,
    /// Enrollment with one-time join tokens; absent: no enrollment listener.
    #[serde(default)]
    pub enrollment: Option<EnrollmentConfig>,
    /// Who hears about the migrations: receivers fleet files name (`notify = ["name"]`).
    /// Here, not in fleet files: a webhook's secret and a command to run on this host are the
    /// orchestrator host's to give.
    #[serde(default)]
    pub notify: Vec<ReceiverConfig>,
}

/// A receiver of notifications: an HTTPS webhook (a JSON body signed with HMAC-SHA256 over
/// a shared secret) or a command (argv, no shell; the JSON on its standard input).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiverConfig {
    /// The name fleet files use.
    pub name: String,
    /// `https://host[:port]/path`: POSTed each notification.
    #[serde(default)]
    pub webhook: Option<String>,
    /// The file holding the webhook's shared secret (the signature's key), read at start.
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    /// CA certificates (PEM) the webhook's server certificate must chain to (default:
    /// Debian's bundle, /etc/ssl/certs/ca-certificates.crt).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// A program and its arguments, run once per notification (absolute path).
    #[serde(default)]
    pub command: Option<Vec<String>>,
    /// One delivery's deadline, seconds.
    #[serde(default = "default_notify_timeout")]
    pub timeout_secs: u64,
}

fn default_notify_timeout() -> u64 {
    10
}

/// A checked `https://host[:port]/path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookUrl {
    /// The host (a name or an address) the certificate must name.
    pub host: String,
    /// Its port (443 unless given).
    pub port: u16,
    /// The path and query ("/" when none).
    pub path: String,
}

impl WebhookUrl {
    /// Parses a webhook's URL: HTTPS only (the network is hostile).
    pub fn parse(url: &str) -> Result<Self, String> {
        let rest = url
            .strip_prefix("https://")
            .ok_or_else(|| format!("'{url}' is not an https:// URL (webhooks go over TLS only)"))?;
        let (authority, path) = match rest.find('/') {
            Some(at) => (&rest[..at], &rest[at..]),
            None => (rest, "/"),
        };
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (host, after) = v6
                .split_once(']')
                .ok_or_else(|| format!("'{url}': unclosed [ in the host"))?;
            (host, after.strip_prefix(':'))
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        let port = match port {
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| format!("'{url}': bad port '{p}'"))?,
            None => 443,
        };
        if host.is_empty() || authority.contains('@') || path.contains(['\r', '\n', ' ']) {
            return Err(format!("'{url}' is not a usable URL"));
        }
        Ok(WebhookUrl {
            host: host.to_string(),
            port,
            path: path.to_string(),
        })
    }
}

/// One agent: the name its certificate must carry and where it listens.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentEntry {
    /// The agent's fleet name (its certificate's CN and DNS name).
    pub name: String,
    /// host:port of its Agent API.
    pub address: String,
    /// host:port of its data plane, where targets pull from it (origins only).
    #[serde(default)]
    pub data_address: Option<String>,
}

fn default_audit_retention() -> u32 {
    400
}

fn default_state_db() -> PathBuf {
    PathBuf::from("/var/lib/bmfleet/orchestrator.db")
}
fn default_health_interval() -> u64 {
    10
}
fn default_usage_interval() -> u64 {
    300
}
fn default_rpc_timeout() -> u64 {
    10
}

impl OrchestratorConfig {
    /// Reads and checks a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::parse(&config_file::read(path)?, path)
    }

    /// Parses and checks configuration text; `path` is used in messages.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let config: OrchestratorConfig = config_file::parse(text, path)?;
        let invalid = |field: String, message: String| config_file::invalid(path, field, message);
        for (field, value) in [
            ("health_interval_secs", config.health_interval_secs),
            ("usage_interval_secs", config.usage_interval_secs),
            ("rpc_timeout_secs", config.rpc_timeout_secs),
        ] {
            if value == 0 {
                return Err(invalid(field.into(), "must be at least 1".into()));
            }
        }
        if let Some(e) = &config.enrollment {
            if e.certificate_days == 0 {
                return Err(invalid(
                    "enrollment.certificate_days".into(),
                    "must be at least 1".into(),
                ));
            }
            if e.token_ttl_secs == 0 || e.token_ttl_secs > e.token_max_ttl_secs {
                return Err(invalid(
                    "enrollment.token_ttl_secs".into(),
                    format!(
                        "must be between 1 and token_max_ttl_secs ({})",
                        e.token_max_ttl_secs
                    ),
                ));
            }
        }
        let mut names = HashMap::new();
        let mut addresses = HashMap::new();
        for (i, agent) in config.agent.iter().enumerate() {
            validate_name(&agent.name).map_err(|m| invalid(format!("agent[{i}].name"), m))?;
            if let Some(first) = names.insert(agent.name.as_str(), i) {
                return Err(invalid(
                    format!("agent[{i}].name"),
                    format!("'{}' is already agent[{first}]", agent.name),
                ));
            }
            if !agent.address.contains(':') {
                return Err(invalid(
                    format!("agent[{i}].address"),
                    format!("'{}' needs a port (host:port)", agent.address),
                ));
            }
            if let Some(first) = addresses.insert(agent.address.as_str(), i) {
                return Err(invalid(
                    format!("agent[{i}].address"),
                    format!("{} is already the address of agent[{first}]", agent.address),
                ));
            }
        }
        let mut receivers = HashMap::new();
        for (i, r) in config.notify.iter().enumerate() {
            let field = |f: &str| format!("notify[{i}].{f}");
            validate_name(&r.name).map_err(|m| invalid(field("name"), m))?;
            if let Some(first) = receivers.insert(r.name.as_str(), i) {
                return Err(invalid(
                    field("name"),
                    format!("'{}' is already notify[{first}]", r.name),
                ));
            }
            match (&r.webhook, &r.command) {
                (Some(url), None) => {
                    WebhookUrl::parse(url).map_err(|m| invalid(field("webhook"), m))?;
                    if r.secret_file.is_none() {
                        return Err(invalid(
                            field("secret_file"),
                            "a webhook needs a shared secret (the receiver checks the signature with it)".into(),
                        ));
                    }
                }
                (None, Some(argv)) => {
                    if !argv.first().is_some_and(|p| p.starts_with('/')) {
                        return Err(invalid(
                            field("command"),
                            "give the program's absolute path first, then its arguments".into(),
                        ));
                    }
                }
                _ => {
                    return Err(invalid(
                        field("webhook"),
                        "give a receiver either a webhook or a command".into(),
                    ))
                }
            }
            if r.timeout_secs == 0 {
                return Err(invalid(field("timeout_secs"), "must be at least 1".into()));
            }
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
listen = "127.0.0.1:7400"
[tls]
ca = "ca.pem"
cert = "o.pem"
key = "o-key.pem"
[[agent]]
name = "origin-1"
address = "198.18.0.2:7443"
"#;

    #[test]
    fn parses_agents_with_defaults() {
        let c = OrchestratorConfig::parse(BASE, Path::new("o.toml")).unwrap();
        assert_eq!(c.agent.len(), 1);
        assert_eq!(c.health_interval_secs, 10);
        assert_eq!(
            c.state_db,
            PathBuf::from("/var/lib/bmfleet/orchestrator.db")
        );
    }

    #[test]
    fn the_shipped_example_parses() {
        let text = include_str!("../../deploy/examples/orchestrator.toml");
        let c = OrchestratorConfig::parse(text, Path::new("orchestrator.toml")).unwrap();
        assert_eq!(c.agent.len(), 2);
    }

    #[test]
    fn duplicate_agent_is_refused_with_its_index() {
        let text = format!("{BASE}[[agent]]\nname = \"origin-1\"\naddress = \"198.18.0.3:7443\"\n");
        let err = OrchestratorConfig::parse(&text, Path::new("o.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("agent[1].name") && err.contains("agent[0]"),
            "{err}"
        );
    }

    #[test]
    fn receivers_are_checked() {
        let ok = format!(
            "{BASE}[[notify]]\nname = \"portal\"\nwebhook = \"https://hooks.example.net:8443/bmfleet\"\nsecret_file = \"/etc/bmfleet/portal.secret\"\n[[notify]]\nname = \"mailer\"\ncommand = [\"/usr/local/bin/notify\", \"--fleet\"]\n"
        );
        let c = OrchestratorConfig::parse(&ok, Path::new("o.toml")).unwrap();
        assert_eq!(c.notify.len(), 2);
        for (bad, field) in [
            (
                "name = \"x\"\nwebhook = \"http://h/x\"\nsecret_file = \"/s\"\n",
                "notify[0].webhook",
            ),
            (
                "name = \"x\"\nwebhook = \"https://h/x\"\n",
                "notify[0].secret_file",
            ),
            (
                "name = \"x\"\ncommand = [\"notify\"]\n",
                "notify[0].command",
            ),
            ("name = \"x\"\n", "notify[0].webhook"),
        ] {
            let text = format!("{BASE}[[notify]]\n{bad}");
            let err = OrchestratorConfig::parse(&text, Path::new("o.toml"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(field), "{bad}: {err}");
        }
    }

    #[test]
    fn unknown_field_names_line_and_field() {
        let text = format!("{BASE}adress = \"x\"\n");
        let err = OrchestratorConfig::parse(&text, Path::new("o.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("adress") && err.contains("line 10"), "{err}");
    }
}

/// The `[enrollment]` section of the orchestrator's configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollmentConfig {
    /// Where the Enrollment service listens (TLS without client certificates).
    pub listen: SocketAddr,
    /// host:port hosts dial to enroll (default: `listen`); `bmctl fleet enroll` writes it
    /// into each host's command line.
    #[serde(default)]
    pub advertise: Option<String>,
    /// The fleet's PKI directory (`bmctl fleet pki init`): its CA key signs the requests.
    pub pki_dir: PathBuf,
    /// Validity of an enrolled agent's certificate, days.
    #[serde(default = "default_certificate_days")]
    pub certificate_days: u32,
    /// Lifetime of a join token when the operator asks none, seconds.
    #[serde(default = "default_token_ttl")]
    pub token_ttl_secs: u32,
    /// The longest lifetime an operator may ask, seconds.
    #[serde(default = "default_token_max_ttl")]
    pub token_max_ttl_secs: u32,
}

fn default_certificate_days() -> u32 {
    365
}
fn default_token_ttl() -> u32 {
    900
}
fn default_token_max_ttl() -> u32 {
    86_400
}

impl EnrollmentConfig {
    /// The address hosts dial.
    pub fn enroll_address(&self) -> String {
        self.advertise
            .clone()
            .unwrap_or_else(|| self.listen.to_string())
    }
}
