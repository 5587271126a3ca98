//! `bmctl fleet enroll` and `bmctl fleet decommission`: agents installed, enrolled, started
//! and removed over SSH, one multiplexed session per host (the `openssh` crate driving the
//! system ssh's ControlMaster: key authentication as the operator's ssh already does), hosts
//! in parallel, each host's failure reported with its reason while the others go on.
//!
//! Enrolling a host: probe it (systemd, free space), upload the agent binary when it differs
//! (sha256), put the fleet CA there, run `bmfleet-agent enroll` with a one-time join token on
//! its stdin (the key is made on the host), `bmfleet-agent configure` (agent.toml from the
//! inventory's base file and what it finds), start it (systemd unit, or a detached process
//! where systemd is not PID 1 and the inventory says `supervisor = "none"`), register it with
//! the orchestrator, and wait until the orchestrator's health check (a real Facts call) sees
//! it up. Every step is idempotent: a re-run changes nothing on a host that is done.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use openssh::{KnownHosts, Session, SessionBuilder, Stdio};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use crate::Connection;

/// Settings for every host, each overridable per host.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostSettings {
    /// The agent binary (on this machine) uploaded to the host.
    pub agent_binary: Option<PathBuf>,
    /// Site-wide agent settings (TOML, on this machine): services, PostgreSQL, BlueMind API…
    pub base: Option<PathBuf>,
    /// An ssh_config file (`ssh -F`).
    pub ssh_config: Option<PathBuf>,
    /// Where the binary goes on the host.
    pub bin_path: Option<String>,
    /// The host's configuration directory (agent.toml, tls/).
    pub config_dir: Option<String>,
    /// The agent's state directory.
    pub state_dir: Option<String>,
    /// BlueMind's paths are under this directory ("/" on a real host).
    pub data_root: Option<String>,
    /// "systemd" (default; a host without it is reported) or "none" (a detached process:
    /// containers and the lab, where something else supervises it).
    pub supervisor: Option<String>,
    /// Ports of the Agent API, the data plane (origins) and /metrics.
    pub agent_port: Option<u16>,
    /// Data plane port.
    pub data_port: Option<u16>,
    /// Metrics port.
    pub metrics_port: Option<u16>,
    /// The orchestrator's Enrollment address as the hosts reach it (default: what the
    /// orchestrator advertises).
    pub enroll_address: Option<String>,
}

impl HostSettings {
    fn or(self, defaults: &HostSettings) -> HostSettings {
        let d = defaults.clone();
        HostSettings {
            agent_binary: self.agent_binary.or(d.agent_binary),
            base: self.base.or(d.base),
            ssh_config: self.ssh_config.or(d.ssh_config),
            bin_path: self.bin_path.or(d.bin_path),
            config_dir: self.config_dir.or(d.config_dir),
            state_dir: self.state_dir.or(d.state_dir),
            data_root: self.data_root.or(d.data_root),
            supervisor: self.supervisor.or(d.supervisor),
            agent_port: self.agent_port.or(d.agent_port),
            data_port: self.data_port.or(d.data_port),
            metrics_port: self.metrics_port.or(d.metrics_port),
            enroll_address: self.enroll_address.or(d.enroll_address),
        }
    }
}

/// One host of the inventory.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostEntry {
    /// ssh destination (`[user@]host[:port]` or `ssh://…`).
    pub ssh: String,
    /// The agent's fleet name.
    pub name: String,
    /// "origin" (its data plane listens) or "target".
    pub role: String,
    /// The address the orchestrator dials (default: the ssh destination's host).
    #[serde(default)]
    pub address: Option<String>,
    /// Per-host settings.
    #[serde(flatten)]
    pub settings: HostSettings,
}

/// The inventory file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Inventory {
    /// Settings every host gets unless it says otherwise.
    #[serde(default)]
    pub defaults: HostSettings,
    /// The hosts.
    #[serde(default)]
    pub host: Vec<HostEntry>,
}

/// A host with every setting resolved.
#[derive(Debug, Clone)]
struct Host {
    ssh: String,
    name: String,
    origin: bool,
    address: String,
    agent_binary: PathBuf,
    base: Option<PathBuf>,
    ssh_config: Option<PathBuf>,
    bin_path: String,
    config_dir: String,
    state_dir: String,
    data_root: String,
    systemd: bool,
    agent_port: u16,
    data_port: u16,
    metrics_port: u16,
    enroll_address: Option<String>,
}

impl Inventory {
    /// Reads an inventory; errors name the line and field.
    pub fn load(path: &Path) -> anyhow::Result<Inventory> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let inventory: Inventory = toml::from_str(&text).map_err(|e| {
            let line_of = |at: usize| text[..at.min(text.len())].matches('\n').count() + 1;
            // A host's settings are flattened into it: an unknown key's span is its whole
            // table, so find the key's own line in it.
            let unknown = e
                .message()
                .strip_prefix("unknown field `")
                .and_then(|m| m.split('`').next());
            let line = e.span().map(|span| {
                let key_at = unknown.and_then(|key| {
                    // From the table's header to the next header.
                    let mut at = span.start.min(text.len());
                    for (i, l) in text[at..].split_inclusive('\n').enumerate() {
                        if i > 0 && l.trim_start().starts_with('[') {
                            break;
                        }
                        let trimmed = l.trim_start();
                        if trimmed.starts_with(key)
                            && trimmed[key.len()..].trim_start().starts_with('=')
                        {
                            return Some(at);
                        }
                        at += l.len();
                    }
                    None
                });
                line_of(key_at.unwrap_or(span.start))
            });
            anyhow::anyhow!(
                "{}{}: {}",
                path.display(),
                line.map(|l| format!(":{l}")).unwrap_or_default(),
                e.message()
            )
        })?;
        Ok(inventory)
    }

    /// Hosts given on the command line as `DEST=NAME:ROLE`.
    pub fn from_args(hosts: &[String]) -> anyhow::Result<Inventory> {
        let mut inventory = Inventory::default();
        for spec in hosts {
            let (ssh, rest) = spec
                .split_once('=')
                .with_context(|| format!("'{spec}': expected DEST=NAME:origin|target"))?;
            let (name, role) = rest
                .split_once(':')
                .with_context(|| format!("'{spec}': expected DEST=NAME:origin|target"))?;
            inventory.host.push(HostEntry {
                ssh: ssh.into(),
                name: name.into(),
                role: role.into(),
                address: None,
                settings: HostSettings::default(),
            });
        }
        Ok(inventory)
    }

    fn hosts(&self, only: &[String]) -> anyhow::Result<Vec<Host>> {
        let mut seen = BTreeMap::new();
        let mut hosts = Vec::new();
        for (i, entry) in self.host.iter().enumerate() {
            let field = |f: &str| format!("host[{i}].{f}");
            bmfleet_proto::identity::validate_name(&entry.name)
                .map_err(|m| anyhow::anyhow!("{}: {m}", field("name")))?;
            if let Some(first) = seen.insert(entry.name.clone(), i) {
                bail!(
                    "{}: '{}' is already host[{first}]",
                    field("name"),
                    entry.name
                );
            }
            if !only.is_empty() && !only.contains(&entry.name) {
                continue;
            }
            let origin = match entry.role.as_str() {
                "origin" => true,
                "target" => false,
                other => bail!("{}: '{other}' is neither origin nor target", field("role")),
            };
            let s = entry.settings.clone().or(&self.defaults);
            let systemd = match s.supervisor.as_deref().unwrap_or("systemd") {
                "systemd" => true,
                "none" => false,
                other => bail!(
                    "{}: '{other}' is neither systemd nor none",
                    field("supervisor")
                ),
            };
            let ssh_host = entry
                .ssh
                .trim_start_matches("ssh://")
                .rsplit('@')
                .next()
                .unwrap_or_default()
                .split(':')
                .next()
                .unwrap_or_default()
                .to_string();
            let agent_binary = match s.agent_binary {
                Some(p) => p,
                None => std::env::current_exe()
                    .ok()
                    .and_then(|p| p.parent().map(|d| d.join("bmfleet-agent")))
                    .filter(|p| p.exists())
                    .with_context(|| {
                        format!(
                            "{}: no agent binary given and none beside bmctl",
                            field("agent_binary")
                        )
                    })?,
            };
            hosts.push(Host {
                ssh: entry.ssh.clone(),
                name: entry.name.clone(),
                origin,
                address: entry.address.clone().unwrap_or(ssh_host),
                agent_binary,
                base: s.base,
                ssh_config: s.ssh_config,
                bin_path: s
                    .bin_path
                    .unwrap_or_else(|| "/usr/local/bin/bmfleet-agent".into()),
                config_dir: s.config_dir.unwrap_or_else(|| "/etc/bmfleet".into()),
                state_dir: s
                    .state_dir
                    .unwrap_or_else(|| "/var/lib/bmfleet-agent".into()),
                data_root: s.data_root.unwrap_or_else(|| "/".into()),
                systemd,
                agent_port: s.agent_port.unwrap_or(7443),
                data_port: s.data_port.unwrap_or(7444),
                metrics_port: s.metrics_port.unwrap_or(9465),
                enroll_address: s.enroll_address,
            });
        }
        if hosts.is_empty() {
            bail!("no host to work on (an inventory's [[host]] entries, or DEST=NAME:ROLE)");
        }
        Ok(hosts)
    }
}

/// A word quoted for the remote POSIX shell.
fn quote(word: &str) -> String {
    format!("'{}'", word.replace('\'', r"'\''"))
}

/// One host's multiplexed SSH session.
struct Remote {
    session: Session,
    name: String,
}

impl Remote {
    async fn connect(host: &Host, control_dir: &Path) -> anyhow::Result<Remote> {
        let mut builder = SessionBuilder::default();
        builder
            .known_hosts_check(KnownHosts::Strict)
            .connect_timeout(Duration::from_secs(10))
            .server_alive_interval(Duration::from_secs(15))
            .control_directory(control_dir);
        if let Some(config) = &host.ssh_config {
            builder.config_file(config);
        }
        let session = builder
            .connect_mux(&host.ssh)
            .await
            .map_err(|e| anyhow::anyhow!("ssh to {} failed: {}", host.ssh, ssh_reason(&e)))?;
        Ok(Remote {
            session,
            name: host.name.clone(),
        })
    }

    /// Runs `script` with `sh -c`, feeding `input` on stdin; fails with its stderr.
    async fn run(&self, what: &str, script: &str, input: Option<&[u8]>) -> anyhow::Result<String> {
        let mut command = self.session.shell(script);
        command
            .stdin(if input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command
            .spawn()
            .await
            .with_context(|| format!("{}: {what}: cannot run over ssh", self.name))?;
        if let (Some(data), Some(mut stdin)) = (input, child.stdin().take()) {
            stdin
                .write_all(data)
                .await
                .with_context(|| format!("{}: {what}: sending", self.name))?;
            stdin.shutdown().await.ok();
        }
        let out = child
            .wait_with_output()
            .await
            .with_context(|| format!("{}: {what}", self.name))?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            bail!("{}: {what} failed: {}", self.name, stderr.trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// The reason of an ssh failure without openssh's wrapping.
fn ssh_reason(e: &openssh::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text = format!("{text}: {s}");
        source = s.source();
    }
    text
}

/// How one host ended.
#[derive(Debug)]
pub struct HostOutcome {
    /// The agent's name.
    pub name: String,
    /// What was done, or why it failed.
    pub result: Result<String, String>,
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The systemd unit of an enrolled agent: the packaged unit, with the host's paths.
fn unit(host: &Host) -> String {
    include_str!("../../deploy/systemd/bmfleet-agent.service")
        .replace("/usr/bin/bmfleet-agent", &host.bin_path)
        .replace(
            "/etc/bmfleet/agent.toml",
            &format!("{}/agent.toml", host.config_dir),
        )
}

/// The pid file of an agent started without systemd.
fn pid_file(host: &Host) -> String {
    format!("{}/agent.pid", host.config_dir)
}

async fn enroll_host(
    host: Host,
    connection: Arc<Connection>,
    control_dir: PathBuf,
    reenroll: bool,
    progress: impl Fn(&str, &str),
) -> anyhow::Result<String> {
    let binary = std::fs::read(&host.agent_binary)
        .with_context(|| format!("cannot read {}", host.agent_binary.display()))?;
    progress(&host.name, &format!("ssh {}", host.ssh));
    let remote = Remote::connect(&host, &control_dir).await?;
    let probe = remote
        .run(
            "probing the host",
            &format!(
                "if [ -d /run/systemd/system ]; then echo systemd; else echo no-systemd; fi; \
                 mkdir -p {dir} && df -Pk {dir} | tail -1",
                dir = quote(&host.config_dir)
            ),
            None,
        )
        .await?;
    let mut lines = probe.lines();
    if host.systemd && lines.next() != Some("systemd") {
        bail!(
            "{}: no systemd on this host (PID 1 is something else): install the agent's \
             supervision yourself and set supervisor = \"none\" for it",
            host.name
        );
    }
    let free_kib: u64 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|f| f.parse().ok())
        .unwrap_or(u64::MAX);
    let needed_kib = (binary.len() as u64 * 2) / 1024 + 1024;
    if free_kib < needed_kib {
        bail!(
            "{}: disk full: {free_kib} KiB free under {}, {needed_kib} KiB needed",
            host.name,
            host.config_dir
        );
    }
    let mut changed = Vec::new();
    let bin = quote(&host.bin_path);
    let remote_sum = remote
        .run(
            "reading the installed agent",
            &format!("if [ -f {bin} ]; then sha256sum {bin} | cut -d' ' -f1; fi"),
            None,
        )
        .await?;
    if remote_sum.trim() != sha256_hex(&binary) {
        progress(&host.name, "uploading the agent");
        remote
            .run(
                "uploading the agent",
                &format!(
                    "mkdir -p \"$(dirname {bin})\" && cat > {bin}.new && chmod 0755 {bin}.new \
                     && mv {bin}.new {bin}"
                ),
                Some(&binary),
            )
            .await?;
        changed.push("agent installed");
    }
    let tls_dir = format!("{}/tls", host.config_dir);
    // The fleet CA is the operator's own (--ca): written when the host's differs.
    let ca_pem = std::fs::read(&connection.ca)
        .with_context(|| format!("cannot read {}", connection.ca.display()))?;
    let d = quote(&tls_dir);
    remote
        .run(
            "writing the fleet CA",
            &format!(
                "mkdir -p {d} && chmod 0700 {d} && cat > {d}/ca.pem.new && \
                 if cmp -s {d}/ca.pem.new {d}/ca.pem; then rm {d}/ca.pem.new; \
                 else mv {d}/ca.pem.new {d}/ca.pem; fi"
            ),
            Some(&ca_pem),
        )
        .await?;
    // The fleet's revocation list (beside the CA in the PKI dir), kept current on every run:
    // configure wires it into agent.toml, the agent reads it again when it changes.
    let crl_path = connection.ca.with_file_name("crl.pem");
    if let Ok(crl) = std::fs::read(&crl_path) {
        let written = remote
            .run(
                "writing the revocation list",
                &format!(
                    "cat > {d}/crl.pem.new && \
                     if cmp -s {d}/crl.pem.new {d}/crl.pem; then rm {d}/crl.pem.new; echo same; \
                     else mv {d}/crl.pem.new {d}/crl.pem; echo changed; fi"
                ),
                Some(&crl),
            )
            .await?;
        if written.trim() == "changed" {
            changed.push("revocation list updated");
        }
    }
    let enroll = format!(
        "{bin} enroll --name {name} --orchestrator-name {orch} --dir {d}",
        name = quote(&host.name),
        orch = quote(&connection.orchestrator_name),
    );
    // A token only for a host that needs one: `--check` exits 3 then.
    let check = remote
        .run(
            "checking its identity",
            &format!("{enroll} --check; echo \"exit=$?\""),
            None,
        )
        .await?;
    if check.contains("exit=3") {
        let token = crate::agents::token(&connection, &host.name, 0, reenroll)
            .await
            .with_context(|| format!("{}: no join token", host.name))?;
        progress(&host.name, "enrolling");
        let address = host.enroll_address.clone().unwrap_or(token.enroll_address);
        remote
            .run(
                "enrolling",
                &format!("{enroll} --orchestrator {}", quote(&address)),
                Some(token.token.as_bytes()),
            )
            .await?;
        changed.push("certificate issued");
    } else if !check.contains("exit=0") {
        bail!(
            "{}: checking its identity failed: {}",
            host.name,
            check.trim()
        );
    }
    let mut configure = format!(
        "{bin} configure --name {name} --out {out} --tls-dir {d} --orchestrator-name {orch} \
         --listen 0.0.0.0:{port} --metrics-listen 0.0.0.0:{metrics} --data-root {root} \
         --state-dir {state}",
        name = quote(&host.name),
        out = quote(&format!("{}/agent.toml", host.config_dir)),
        d = quote(&tls_dir),
        orch = quote(&connection.orchestrator_name),
        port = host.agent_port,
        metrics = host.metrics_port,
        root = quote(&host.data_root),
        state = quote(&host.state_dir),
    );
    if host.origin {
        configure += &format!(" --data-listen 0.0.0.0:{}", host.data_port);
    }
    if let Some(base) = &host.base {
        let text =
            std::fs::read(base).with_context(|| format!("cannot read {}", base.display()))?;
        let remote_base = format!("{}/base.toml", host.config_dir);
        remote
            .run(
                "writing the base settings",
                &format!("cat > {b}.new && mv {b}.new {b}", b = quote(&remote_base)),
                Some(&text),
            )
            .await?;
        configure += &format!(" --base {}", quote(&remote_base));
    }
    let configured = remote.run("writing agent.toml", &configure, None).await?;
    if configured.starts_with("wrote") {
        changed.push("agent.toml written");
    }
    progress(&host.name, "starting the agent");
    let restart = changed.contains(&"agent installed")
        || changed.contains(&"agent.toml written")
        || changed.contains(&"revocation list updated");
    if host.systemd {
        remote
            .run(
                "installing the systemd unit",
                &format!(
                    "cat > /etc/systemd/system/bmfleet-agent.service && systemctl daemon-reload \
                     && systemctl enable --now bmfleet-agent{}",
                    if restart {
                        " && systemctl restart bmfleet-agent"
                    } else {
                        ""
                    }
                ),
                Some(unit(&host).as_bytes()),
            )
            .await?;
    } else {
        let pid = quote(&pid_file(&host));
        remote
            .run(
                "starting the agent",
                &format!(
                    "if [ -f {pid} ] && kill -0 \"$(cat {pid})\" 2>/dev/null; then \
                       if [ {restart} = true ]; then kill \"$(cat {pid})\"; sleep 1; else exit 0; fi; \
                     fi; \
                     nohup sh -c 'echo $$ > \"$1\"; exec \"$2\" --config \"$3\"' sh {pid} {bin} {config} \
                       >> {log} 2>&1 < /dev/null &",
                    config = quote(&format!("{}/agent.toml", host.config_dir)),
                    log = quote(&format!("{}/agent.log", host.config_dir)),
                ),
                None,
            )
            .await?;
    }
    let data_address = host
        .origin
        .then(|| format!("{}:{}", host.address, host.data_port));
    let address = format!("{}:{}", host.address, host.agent_port);
    crate::agents::add(&connection, &host.name, &address, data_address.as_deref())
        .await
        .with_context(|| format!("{}: registering it", host.name))?;
    progress(&host.name, "waiting for the orchestrator's health check");
    wait_up(&connection, &host.name, Duration::from_secs(90)).await?;
    let _ = remote.session.close().await;
    Ok(if changed.is_empty() {
        "already enrolled, up".to_string()
    } else {
        format!("{}, up", changed.join(", "))
    })
}

/// Waits until the orchestrator reports `name` up from a check made after now.
async fn wait_up(connection: &Connection, name: &str, timeout: Duration) -> anyhow::Result<()> {
    let since = jiff::Timestamp::now().as_millisecond();
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last = String::from("not checked yet");
    let mut client = connection.client()?;
    loop {
        if let Ok(status) = connection
            .call(client.status(bmfleet_proto::v1::StatusRequest::default()))
            .await
        {
            if let Some(a) = status.get_ref().agents.iter().find(|a| a.name == name) {
                if a.up && a.last_check_unix_ms >= since {
                    return Ok(());
                }
                if a.last_check_unix_ms >= since {
                    last = a.last_error.clone();
                }
            }
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "{name}: the orchestrator does not reach it after {}s: {last}",
                timeout.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Runs `work` on every host, at most `parallel` at once, printing each one's progress;
/// returns every host's outcome.
async fn each_host<F, Fut>(hosts: Vec<Host>, parallel: usize, work: F) -> Vec<HostOutcome>
where
    F: Fn(Host, PathBuf) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<String>> + Send + 'static,
{
    // A short control directory: the ssh control socket's path must fit in sun_path.
    let control = match tempfile::Builder::new().prefix("bmctl").tempdir_in("/tmp") {
        Ok(d) => d,
        Err(e) => {
            return hosts
                .into_iter()
                .map(|h| HostOutcome {
                    name: h.name,
                    result: Err(format!("no control directory: {e}")),
                })
                .collect()
        }
    };
    let limit = Arc::new(tokio::sync::Semaphore::new(parallel.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    for host in hosts {
        let name = host.name.clone();
        let future = work(host, control.path().to_path_buf());
        let limit = limit.clone();
        tasks.spawn(async move {
            let _permit = limit.acquire_owned().await;
            let result = future.await.map_err(|e| format!("{e:#}"));
            HostOutcome { name, result }
        });
    }
    let mut outcomes = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        if let Ok(outcome) = joined {
            match &outcome.result {
                Ok(done) => eprintln!("[{}] done: {done}", outcome.name),
                Err(why) => eprintln!("[{}] FAILED: {why}", outcome.name),
            }
            outcomes.push(outcome);
        }
    }
    outcomes.sort_by(|a, b| a.name.cmp(&b.name));
    outcomes
}

fn progress(name: &str, step: &str) {
    eprintln!("[{name}] {step}");
}

/// Summarizes outcomes; an error when a host failed.
fn summary(what: &str, outcomes: &[HostOutcome]) -> anyhow::Result<()> {
    let failed: Vec<&HostOutcome> = outcomes.iter().filter(|o| o.result.is_err()).collect();
    for o in outcomes {
        match &o.result {
            Ok(done) => println!("{:<24} ok      {done}", o.name),
            Err(why) => println!("{:<24} FAILED  {why}", o.name),
        }
    }
    if !failed.is_empty() {
        bail!(
            "{} of {} hosts not {what} (the others are)",
            failed.len(),
            outcomes.len()
        );
    }
    Ok(())
}

/// `bmctl fleet enroll`.
pub async fn enroll(
    connection: Connection,
    inventory: Inventory,
    only: &[String],
    parallel: usize,
    reenroll: bool,
) -> anyhow::Result<()> {
    let hosts = inventory.hosts(only)?;
    let connection = Arc::new(connection);
    let outcomes = each_host(hosts, parallel, |host, control| {
        enroll_host(host, connection.clone(), control, reenroll, progress)
    })
    .await;
    summary("enrolled", &outcomes)
}

async fn decommission_host(
    host: Host,
    connection: Arc<Connection>,
    control_dir: PathBuf,
) -> anyhow::Result<String> {
    progress(&host.name, &format!("ssh {}", host.ssh));
    let remote = Remote::connect(&host, &control_dir).await?;
    progress(&host.name, "stopping and removing the agent");
    let stop = if host.systemd {
        "systemctl disable --now bmfleet-agent 2>/dev/null || true; \
         rm -f /etc/systemd/system/bmfleet-agent.service; systemctl daemon-reload"
            .to_string()
    } else {
        format!(
            "if [ -f {pid} ]; then kill \"$(cat {pid})\" 2>/dev/null || true; fi",
            pid = quote(&pid_file(&host))
        )
    };
    remote
        .run(
            "removing the agent",
            &format!(
                "{stop}; rm -rf {tls} {config} {base} {pid} {state}; rm -f {bin}",
                tls = quote(&format!("{}/tls", host.config_dir)),
                config = quote(&format!("{}/agent.toml", host.config_dir)),
                base = quote(&format!("{}/base.toml", host.config_dir)),
                pid = quote(&pid_file(&host)),
                state = quote(&host.state_dir),
                bin = quote(&host.bin_path),
            ),
            None,
        )
        .await?;
    let _ = remote.session.close().await;
    let detail = crate::agents::remove(&connection, &host.name, true)
        .await
        .with_context(|| format!("{}: removed from the host, but", host.name))?;
    Ok(detail)
}

/// `bmctl fleet decommission`: the agents of the named (or every Done) instance.
pub async fn decommission(
    connection: Connection,
    inventory: Inventory,
    instances: &[String],
    all_done: bool,
    parallel: usize,
) -> anyhow::Result<()> {
    if instances.is_empty() != all_done {
        bail!("name instances, or give --all-done");
    }
    let mut client = connection.client()?;
    let status = connection
        .call(client.status(bmfleet_proto::v1::StatusRequest::default()))
        .await?
        .into_inner();
    let mut agents = Vec::new();
    for i in &status.instances {
        let named = instances.contains(&i.name);
        if !(named || all_done) {
            continue;
        }
        if i.phase != "Done" {
            if named {
                bail!(
                    "instance {} is {}, not Done: only a migrated instance's agents are removed",
                    i.name,
                    i.phase
                );
            }
            continue;
        }
        agents.extend([i.origin.clone(), i.target.clone()]);
    }
    if let Some(missing) = instances
        .iter()
        .find(|n| !status.instances.iter().any(|i| &i.name == *n))
    {
        bail!("no instance {missing} in the applied fleet");
    }
    if agents.is_empty() {
        bail!("no Done instance to decommission");
    }
    let hosts = inventory.hosts(&agents)?;
    let connection = Arc::new(connection);
    let outcomes = each_host(hosts, parallel, |host, control| {
        decommission_host(host, connection.clone(), control)
    })
    .await;
    summary("decommissioned", &outcomes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inventory_errors_name_line_and_field() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hosts.toml");
        std::fs::write(
            &path,
            "[defaults]\nagent_binary = \"/bin/true\"\n[[host]]\nssh = \"root@198.18.0.2\"\nname = \"origin-1\"\nrole = \"origin\"\nsupervisr = \"none\"\n",
        )
        .unwrap();
        let err = Inventory::load(&path).unwrap_err().to_string();
        assert!(err.contains(":7") && err.contains("supervisr"), "{err}");
        std::fs::write(
            &path,
            "[defaults]\nagent_binary = \"/bin/true\"\n[[host]]\nssh = \"root@198.18.0.2\"\nname = \"origin-1\"\nrole = \"source\"\n",
        )
        .unwrap();
        let err = Inventory::load(&path)
            .unwrap()
            .hosts(&[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("host[0].role"), "{err}");
    }

    #[test]
    fn per_host_settings_override_defaults_and_addresses_come_from_ssh() {
        let inv: Inventory = toml::from_str(
            "[defaults]\nagent_binary = \"/bin/true\"\nsupervisor = \"none\"\nconfig_dir = \"/d\"\n\
             [[host]]\nssh = \"root@198.18.0.2:22\"\nname = \"origin-1\"\nrole = \"origin\"\n\
             [[host]]\nssh = \"198.18.0.3\"\nname = \"target-1\"\nrole = \"target\"\nconfig_dir = \"/t\"\n",
        )
        .unwrap();
        let hosts = inv.hosts(&[]).unwrap();
        assert_eq!(hosts[0].address, "198.18.0.2");
        assert_eq!(hosts[0].config_dir, "/d");
        assert_eq!(hosts[1].config_dir, "/t");
        assert!(!hosts[1].systemd && hosts[0].origin && !hosts[1].origin);
        assert_eq!(quote("it's"), r"'it'\''s'");
    }
}
