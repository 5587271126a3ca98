//! `bmfleet-agent enroll` and `bmfleet-agent configure`: what `bmctl fleet enroll` runs on a
//! host over SSH (an operator may run them by hand too).
//!
//! - `enroll` makes the host's private key here (it never leaves the host), sends only a
//!   signing request and a one-time join token (read from stdin, never argv) to the
//!   orchestrator's Enrollment service, whose certificate it checks against the fleet CA it was
//!   given, and writes the certificate it gets back. Already enrolled (a certificate of that
//!   name, from that CA, valid 30 more days, with its key): nothing is redeemed.
//! - `configure` writes agent.toml from a base file (site-wide settings) and what it finds
//!   here: the newest PostgreSQL bin dir, BlueMind's data dirs present, the interfaces (as a
//!   comment, for the fleet file). An existing file is kept unless `--force`.

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use bmfleet_agent::config::AgentConfig;
use bmfleet_proto::identity::{peer_identity, Role};
use bmfleet_proto::tls::{client_config, connect, load_roots, LocalIdentity, TlsFiles};
use bmfleet_proto::v1::enrollment_client::EnrollmentClient;
use bmfleet_proto::v1::EnrollRequest;
use clap::Args;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

/// `bmfleet-agent enroll`.
#[derive(Args)]
pub struct EnrollArgs {
    /// This agent's fleet name (the join token's).
    #[arg(long)]
    name: String,
    /// host:port of the orchestrator's Enrollment service (not needed with --check).
    #[arg(long)]
    orchestrator: Option<String>,
    /// The name the orchestrator's certificate must carry.
    #[arg(long, default_value = "orchestrator")]
    orchestrator_name: String,
    /// The directory of this agent's identity: ca.pem (the fleet CA, given), agent.pem and
    /// agent-key.pem (made here).
    #[arg(long, default_value = "/etc/bmfleet/tls")]
    dir: PathBuf,
    /// Seconds to wait for the orchestrator.
    #[arg(long, default_value_t = 15)]
    timeout: u64,
    /// Only say whether this host is enrolled (exit 0) or needs a token (exit 3); redeems
    /// nothing.
    #[arg(long)]
    check: bool,
}

/// The exit status of `enroll --check` when the host needs enrolling.
pub const NEEDS_ENROLLMENT: u8 = 3;

/// What `enroll` did.
pub enum Enrolled {
    /// Enrolled now, or already.
    Yes,
    /// `--check`: not enrolled (the reason is printed).
    Needed,
}

/// The identity files of an enrolled agent in `dir`.
pub fn identity_files(dir: &Path) -> TlsFiles {
    TlsFiles {
        ca: dir.join("ca.pem"),
        cert: dir.join("agent.pem"),
        key: dir.join("agent-key.pem"),
        crl: None,
    }
}

/// Days a certificate must still be valid for a re-run to keep it.
const KEEP_DAYS: u64 = 30;

/// Whether `dir` already holds a usable identity for `name`: why not, when it does not.
fn already_enrolled(files: &TlsFiles, name: &str) -> Result<(), String> {
    let identity = LocalIdentity::load(files, Role::Agent).map_err(|e| e.to_string())?;
    if identity.identity().name != name {
        return Err(format!(
            "the certificate there is for {}",
            identity.identity()
        ));
    }
    identity.server_config().map_err(|e| e.to_string())?;
    let pem = std::fs::read(&files.cert).map_err(|e| e.to_string())?;
    let der = CertificateDer::from_pem_slice(&pem).map_err(|e| e.to_string())?;
    // Signed by the CA given now (a host moved to another fleet re-enrolls), and still valid
    // in KEEP_DAYS.
    let roots = load_roots(&files.ca).map_err(|e| e.to_string())?;
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        roots,
        std::sync::Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .map_err(|e| e.to_string())?;
    let later = std::time::SystemTime::now() + Duration::from_secs(KEEP_DAYS * 86_400);
    verifier
        .verify_client_cert(&der, &[], rustls::pki_types::UnixTime::since_unix_epoch(
            later.duration_since(std::time::UNIX_EPOCH).unwrap_or_default(),
        ))
        .map(|_| ())
        .map_err(|e| {
            format!("the certificate there is not from this fleet's CA or expires within {KEEP_DAYS} days: {e}")
        })
}

/// Writes `contents` to `path` through a temporary file and a rename, with `mode`.
fn write_atomically(path: &Path, contents: &[u8], mode: u32) -> anyhow::Result<()> {
    use std::io::Write;
    let temporary = path.with_extension("new");
    let _ = std::fs::remove_file(&temporary);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&temporary)
        .with_context(|| format!("cannot write {}", temporary.display()))?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write {}", temporary.display()))?;
    std::fs::rename(&temporary, path).with_context(|| format!("cannot write {}", path.display()))
}

/// Runs `bmfleet-agent enroll`: the join token comes on stdin.
pub async fn enroll(args: EnrollArgs) -> anyhow::Result<Enrolled> {
    bmfleet_proto::identity::validate_name(&args.name)
        .map_err(|m| anyhow::anyhow!("--name: {m}"))?;
    let files = identity_files(&args.dir);
    if !files.ca.exists() {
        bail!(
            "{} is missing: put the fleet CA there first (bmctl fleet enroll does)",
            files.ca.display()
        );
    }
    match already_enrolled(&files, &args.name) {
        Ok(()) => {
            println!(
                "already enrolled as {} ({})",
                args.name,
                files.cert.display()
            );
            return Ok(Enrolled::Yes);
        }
        Err(why) if args.check => {
            println!("not enrolled: {why}");
            return Ok(Enrolled::Needed);
        }
        Err(why) if files.cert.exists() => eprintln!("enrolling again: {why}"),
        Err(_) => {}
    }
    let Some(orchestrator) = &args.orchestrator else {
        bail!("--orchestrator HOST:PORT (its Enrollment service) is needed to enroll");
    };
    let mut token = String::new();
    std::io::stdin()
        .take(4096)
        .read_to_string(&mut token)
        .context("reading the join token from stdin")?;
    let token = token.trim();
    if token.is_empty() {
        bail!(
            "no join token on stdin (`bmctl fleet agents token {}` makes one)",
            args.name
        );
    }
    let (key_pem, csr_pem) = bmfleet_proto::pki::signing_request(&args.name)?;
    let roots = load_roots(&files.ca)?;
    let tls = client_config(roots, None, Role::Orchestrator)?;
    let timeout = Duration::from_secs(args.timeout);
    let channel = connect(orchestrator, &args.orchestrator_name, tls, timeout)?;
    let mut client = EnrollmentClient::new(channel);
    let mut request = tonic::Request::new(EnrollRequest {
        token: token.to_string(),
        csr_pem,
    });
    request.set_timeout(timeout);
    let reply = client
        .enroll(request)
        .await
        .map_err(|s| {
            anyhow::anyhow!(
                "the orchestrator's enrollment at {} refused or failed: {}",
                orchestrator,
                bmfleet_proto::error_chain::describe_status(&s)
            )
        })?
        .into_inner();
    let der = CertificateDer::from_pem_slice(reply.cert_pem.as_bytes())
        .context("the orchestrator sent no certificate")?;
    let id = peer_identity(&der)?;
    if id.name != args.name || id.role != Role::Agent {
        bail!(
            "the orchestrator sent a certificate for {id}, not agent {}",
            args.name
        );
    }
    // The key first (only this host ever holds it), then the certificate that goes with it.
    write_atomically(&files.key, key_pem.as_bytes(), 0o600)?;
    write_atomically(&files.cert, reply.cert_pem.as_bytes(), 0o644)?;
    already_enrolled(&files, &args.name)
        .map_err(|why| anyhow::anyhow!("the enrolled identity is not usable: {why}"))?;
    println!(
        "enrolled as {} by orchestrator {} ({})",
        args.name,
        reply.orchestrator,
        files.cert.display()
    );
    Ok(Enrolled::Yes)
}

/// `bmfleet-agent configure`.
#[derive(Args)]
pub struct ConfigureArgs {
    /// This agent's fleet name.
    #[arg(long)]
    name: String,
    /// Where to write the configuration.
    #[arg(long, default_value = "/etc/bmfleet/agent.toml")]
    out: PathBuf,
    /// Site-wide settings (TOML, agent.toml's fields) kept as they are; what it leaves out is
    /// filled from this host.
    #[arg(long)]
    base: Option<PathBuf>,
    /// The identity directory `enroll` wrote.
    #[arg(long, default_value = "/etc/bmfleet/tls")]
    tls_dir: PathBuf,
    /// The orchestrator names this agent obeys.
    #[arg(long, default_value = "orchestrator")]
    orchestrator_name: Vec<String>,
    /// An address the orchestrator connects from (repeatable): the Agent API keeps places
    /// for it whatever strangers hold.
    #[arg(long)]
    orchestrator_address: Vec<std::net::IpAddr>,
    /// Where the Agent API listens.
    #[arg(long, default_value = "0.0.0.0:7443")]
    listen: String,
    /// Where the data plane listens (origins).
    #[arg(long)]
    data_listen: Option<String>,
    /// Where the agent's /metrics listens.
    #[arg(long)]
    metrics_listen: Option<String>,
    /// Every BlueMind path is taken under this directory.
    #[arg(long)]
    data_root: Option<PathBuf>,
    /// The agent's state directory.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Replace an existing configuration file.
    #[arg(long)]
    force: bool,
}

/// The host's interfaces with their IPv4/IPv6 addresses (`ip -brief address`), for the
/// fleet file's `interface`.
fn interfaces() -> Vec<String> {
    std::process::Command::new("ip")
        .args(["-brief", "address", "show"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
                .filter(|l| !l.starts_with("lo "))
                .collect()
        })
        .unwrap_or_default()
}

/// Runs `bmfleet-agent configure`.
pub async fn configure(args: ConfigureArgs) -> anyhow::Result<()> {
    bmfleet_proto::identity::validate_name(&args.name)
        .map_err(|m| anyhow::anyhow!("--name: {m}"))?;
    if args.out.exists() && !args.force {
        AgentConfig::load(&args.out)?;
        // Kept, but the fleet's revocation list wired in once there is one (`bmctl fleet
        // enroll` writes it beside the CA on every run).
        // One line added under `[tls]`: the operator's file, comments included, stays.
        let crl = args.tls_dir.join("crl.pem");
        let text = std::fs::read_to_string(&args.out)
            .with_context(|| format!("cannot read {}", args.out.display()))?;
        let table: toml::Table = text
            .parse()
            .with_context(|| format!("{} is not TOML", args.out.display()))?;
        let wired = table
            .get("tls")
            .and_then(|t| t.as_table())
            .is_some_and(|t| t.contains_key("crl"));
        let header = text.lines().position(|l| l.trim() == "[tls]");
        if let (false, true, Some(at)) = (wired, crl.exists(), header) {
            let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
            let value = toml::Value::String(crl.display().to_string());
            lines.insert(at + 1, format!("crl = {value}"));
            write_atomically(&args.out, (lines.join("\n") + "\n").as_bytes(), 0o640)?;
            AgentConfig::load(&args.out)?;
            println!(
                "wrote {} (the revocation list wired in)",
                args.out.display()
            );
        } else {
            println!("kept {} (exists; --force replaces it)", args.out.display());
        }
        return Ok(());
    }
    let mut table: toml::Table = match &args.base {
        Some(base) => {
            let text = std::fs::read_to_string(base)
                .with_context(|| format!("cannot read {}", base.display()))?;
            text.parse()
                .with_context(|| format!("{} is not TOML", base.display()))?
        }
        None => toml::Table::new(),
    };
    let text = |s: &str| toml::Value::String(s.to_string());
    let path = |p: &Path| toml::Value::String(p.display().to_string());
    let mut set = |key: &str, value: Option<toml::Value>| {
        if let Some(v) = value {
            table.insert(key.to_string(), v);
        }
    };
    set("listen", Some(text(&args.listen)));
    set("data_listen", args.data_listen.as_deref().map(text));
    set("metrics_listen", args.metrics_listen.as_deref().map(text));
    set("data_root", args.data_root.as_deref().map(path));
    set("state_dir", args.state_dir.as_deref().map(path));
    set(
        "orchestrators",
        Some(toml::Value::Array(
            args.orchestrator_name.iter().map(|n| text(n)).collect(),
        )),
    );
    if !args.orchestrator_address.is_empty() {
        set(
            "orchestrator_addresses",
            Some(toml::Value::Array(
                args.orchestrator_address
                    .iter()
                    .map(|a| text(&a.to_string()))
                    .collect(),
            )),
        );
    }
    let files = identity_files(&args.tls_dir);
    let mut tls = toml::Table::new();
    tls.insert("ca".into(), path(&files.ca));
    tls.insert("cert".into(), path(&files.cert));
    tls.insert("key".into(), path(&files.key));
    let crl = args.tls_dir.join("crl.pem");
    if crl.exists() {
        tls.insert("crl".into(), path(&crl));
    }
    table.insert("tls".into(), toml::Value::Table(tls));
    let root = table
        .get("data_root")
        .and_then(|v| v.as_str())
        .map_or_else(|| PathBuf::from("/"), PathBuf::from);
    let mut found = Vec::new();
    let postgresql = table
        .entry("postgresql")
        .or_insert_with(|| toml::Value::Table(Default::default()));
    if let Some(pg) = postgresql.as_table_mut() {
        if !pg.contains_key("bin_dir") {
            // The agent's own choice (the newest installed major), pinned in the file.
            let bin = bmfleet_agent::db::pg::bin_dir(&Default::default());
            if bin.join("pg_dump").exists() {
                found.push(format!("PostgreSQL client programs in {}", bin.display()));
                pg.insert("bin_dir".into(), path(&bin));
            }
        }
        // Debian's cluster of that major (`N/main`): what a standby needs on a target.
        let major = pg
            .get("bin_dir")
            .and_then(|b| b.as_str())
            .map(PathBuf::from)
            .and_then(|b| Some(b.parent()?.file_name()?.to_string_lossy().into_owned()));
        if let Some(major) = major.filter(|_| !pg.contains_key("data_dir")) {
            let data = PathBuf::from(format!("/var/lib/postgresql/{major}/main"));
            if root
                .join(data.strip_prefix("/").unwrap_or(&data))
                .join("PG_VERSION")
                .exists()
            {
                found.push(format!("the cluster {major}/main ({})", data.display()));
                let argv =
                    |words: &[&str]| toml::Value::Array(words.iter().map(|w| text(w)).collect());
                pg.insert("data_dir".into(), path(&data));
                pg.insert(
                    "server_start".into(),
                    argv(&["pg_ctlcluster", &major, "main", "start"]),
                );
                pg.insert(
                    "server_stop".into(),
                    argv(&["pg_ctlcluster", &major, "main", "stop", "-m", "fast"]),
                );
            }
        }
    }
    let facts = table
        .entry("facts")
        .or_insert_with(|| toml::Value::Table(Default::default()));
    if let Some(facts) = facts.as_table_mut() {
        if !facts.contains_key("data_dirs") {
            let present: Vec<toml::Value> = bmfleet_agent::config::FactsConfig::default()
                .data_dirs
                .iter()
                .filter(|d| root.join(d.strip_prefix("/").unwrap_or(d)).is_dir())
                .map(|d| path(d))
                .collect();
            if !present.is_empty() {
                found.push(format!("{} BlueMind data dirs", present.len()));
                facts.insert("data_dirs".into(), toml::Value::Array(present));
            }
        }
    }
    let interfaces = interfaces();
    let mut out = format!(
        "# Written by `bmfleet-agent configure` for agent {} (bmctl fleet enroll).\n",
        args.name
    );
    for line in &interfaces {
        out += &format!("# interface: {line}\n");
    }
    out += &toml::to_string(&table).context("cannot render the configuration")?;
    let config = AgentConfig::parse(&out, &args.out)?;
    let version = bmfleet_agent::host::facts::bluemind_version(&config).await;
    if version.is_empty() {
        found.push("no BlueMind version (facts.bluemind_version_command found none)".into());
    } else {
        found.insert(0, format!("BlueMind {version}"));
        out = format!("# BlueMind {version} found here.\n{out}");
    }
    if let Some(parent) = args.out.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    write_atomically(&args.out, out.as_bytes(), 0o640)?;
    println!(
        "wrote {} ({})",
        args.out.display(),
        if found.is_empty() {
            "nothing detected beyond the base".to_string()
        } else {
            found.join(", ")
        }
    );
    for line in interfaces {
        println!("interface {line}");
    }
    Ok(())
}
