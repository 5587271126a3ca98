//! Notifications around the night: a customer hears before a window and when the server is
//! back, an operator's tools hear about rollbacks, failures, a spent failure budget and an
//! awaited approval.
//!
//! Durable and at least once: the notifier reads the transitions the engine stored (after a
//! cursor kept in the state database), derives the notices from them and from the fleet's
//! state, and puts them in an outbox in the same transaction that advances the cursor; it
//! then delivers what is due, retrying with back-off, across restarts. Each notice carries an
//! idempotency key derived from what caused it (the transition's id, the window's start), so a
//! receiver that sees it twice knows. It runs beside the engine and never blocks or fails a
//! migration; what it could not deliver shows in `bmctl fleet status` and in a metric.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::clock::Clock;
use crate::config::{ReceiverConfig, WebhookUrl};
use crate::fleet::{FleetFile, InstanceSpec};
use crate::machine::{Event, Instance, Phase};
use crate::scheduler::FleetState;
use crate::state::{OutboxRow, Queued, State, StateError, TransitionRow};

/// What a notice is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A window for the instance opens within the fleet's `notify_hours_before`.
    WindowScheduled,
    /// The origin stops: the downtime starts.
    DowntimeStarting,
    /// The target serves and was verified (with the downtime).
    CutoverDone,
    /// The downtime was undone: the origin serves again.
    RolledBack,
    /// An operator must look (with the error).
    Failed,
    /// The failure budget is spent: no new window opens.
    FleetPaused,
    /// The canaries are done: the fleet waits for `bmctl fleet approve`.
    ApprovalAwaited,
}

impl Kind {
    /// Its name in bodies and headers.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::WindowScheduled => "window_scheduled",
            Kind::DowntimeStarting => "downtime_starting",
            Kind::CutoverDone => "cutover_done",
            Kind::RolledBack => "rolled_back",
            Kind::Failed => "failed",
            Kind::FleetPaused => "fleet_paused",
            Kind::ApprovalAwaited => "approval_awaited",
        }
    }
}

/// A notice for some receivers.
#[derive(Debug, Clone, PartialEq)]
pub struct Notice {
    /// Its idempotency key (the same for every receiver and every retry).
    pub key: String,
    /// What it is about.
    pub kind: Kind,
    /// The instance ("" for the fleet).
    pub instance: String,
    /// The JSON body.
    pub body: serde_json::Value,
    /// Who gets it.
    pub receivers: Vec<String>,
}

/// The receivers of `spec`: the fleet's and its own, each once.
fn receivers_of(fleet: &FleetFile, spec: &InstanceSpec) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for n in fleet.policy.notify.iter().chain(&spec.notify) {
        if !names.contains(&n.name) {
            names.push(n.name.clone());
        }
    }
    names
}

fn instance_body(
    fleet: &FleetFile,
    spec: &InstanceSpec,
    kind: Kind,
    key: &str,
    at_ms: i64,
) -> serde_json::Value {
    json!({
        "key": key,
        "kind": kind.as_str(),
        "migration": fleet.policy.name,
        "instance": spec.name,
        "origin": spec.origin,
        "target": spec.target,
        "service_ip": spec.service_ip.to_string(),
        "at_unix_ms": at_ms,
        "downtime_budget_secs": spec.downtime_budget_secs,
        "contact": spec.contact.clone().unwrap_or(serde_json::Value::Null),
    })
}

/// The notice a stored transition causes, if any: entering the downtime, Done, RolledBack or
/// Failed (`previous` is the instance's phase before it; `instance` its state now).
pub fn from_transition(
    fleet: &FleetFile,
    row: &TransitionRow,
    previous: Option<&str>,
    instance: Option<&Instance>,
) -> Option<Notice> {
    if previous == Some(row.phase.as_str()) {
        return None;
    }
    let spec = fleet.instances.iter().find(|s| s.name == row.instance)?;
    let kind = match row.phase.as_str() {
        "ColdSync" => Kind::DowntimeStarting,
        "Done" => Kind::CutoverDone,
        "RolledBack" => Kind::RolledBack,
        "Failed" => Kind::Failed,
        _ => return None,
    };
    let key = format!(
        "{}/{}/{}/{}",
        fleet.policy.name,
        spec.name,
        kind.as_str(),
        row.id
    );
    let mut body = instance_body(fleet, spec, kind, &key, row.at_ms);
    let error = match serde_json::from_str::<Event>(&row.event) {
        Ok(Event::Failed { error, .. }) => Some(error),
        _ => instance.and_then(|i| i.last_error.clone()),
    };
    match kind {
        Kind::CutoverDone => {
            if let Some((start, end)) =
                instance.and_then(|i| i.downtime_start_ms.zip(i.downtime_end_ms))
            {
                body["downtime_start_unix_ms"] = json!(start);
                body["downtime_end_unix_ms"] = json!(end);
                body["downtime_ms"] = json!(end - start);
            }
        }
        Kind::RolledBack => {
            body["error"] = json!(error.unwrap_or_default());
            body["what_to_do"] = json!(format!(
                "nothing is lost: {} serves again as before the window; the operator finds why in `bmctl fleet events {}` and migrates it again",
                spec.origin, spec.name
            ));
        }
        Kind::Failed => {
            body["error"] = json!(error.unwrap_or_default());
            body["what_to_do"] = json!(format!(
                "an operator must look: `bmctl fleet events {}` says what failed and `bmctl fleet report {}` what was done; the instance is held until then",
                spec.name, spec.name
            ));
        }
        _ => {}
    }
    Some(Notice {
        key,
        kind,
        instance: spec.name.clone(),
        body,
        receivers: receivers_of(fleet, spec),
    })
}

/// Notices the fleet's state causes now: windows opening within the fleet's
/// `notify_hours_before` for instances not yet down (one per window), the failure budget
/// spent and the approval awaited (one per migration). `instances` are in the fleet's order.
pub fn from_fleet(
    fleet: &FleetFile,
    instances: &[Instance],
    state: &FleetState,
    now_ms: i64,
) -> Vec<Notice> {
    let mut notices = Vec::new();
    let policy = &fleet.policy;
    let fleet_receivers: Vec<String> = policy.notify.iter().map(|n| n.name.clone()).collect();
    let fleet_notice = |kind: Kind, detail: serde_json::Value| {
        let key = format!("{}/fleet/{}", policy.name, kind.as_str());
        let mut body = json!({
            "key": key,
            "kind": kind.as_str(),
            "migration": policy.name,
            "instance": null,
            "at_unix_ms": now_ms,
        });
        if let (Some(b), Some(d)) = (body.as_object_mut(), detail.as_object()) {
            b.extend(d.clone());
        }
        Notice {
            key,
            kind,
            instance: String::new(),
            body,
            receivers: fleet_receivers.clone(),
        }
    };
    let failed = instances
        .iter()
        .filter(|i| matches!(i.phase, Phase::Failed | Phase::RolledBack))
        .count();
    if policy.failure_budget > 0 && failed >= policy.failure_budget as usize {
        notices.push(fleet_notice(
            Kind::FleetPaused,
            json!({
                "failed": failed,
                "failure_budget": policy.failure_budget,
                "what_to_do": "no new window opens: look at the failed instances (`bmctl fleet status`), then re-apply the fleet file",
            }),
        ));
    }
    let canaries = (policy.canary_count as usize).min(instances.len());
    let canaries_done = instances[..canaries].iter().all(|i| i.phase.is_final());
    let waiting = instances[canaries..].iter().any(|i| !i.phase.is_final());
    if canaries > 0 && policy.canary_approval && !state.approved && canaries_done && waiting {
        notices.push(fleet_notice(
            Kind::ApprovalAwaited,
            json!({
                "canaries": fleet.instances[..canaries].iter().map(|s| s.name.clone()).collect::<Vec<_>>(),
                "what_to_do": "check the canaries (`bmctl fleet report`), then `bmctl fleet approve`",
            }),
        ));
    }
    let horizon =
        i64::try_from(policy.notify_hours_before.saturating_mul(3_600_000)).unwrap_or(i64::MAX);
    let Ok(now) = jiff::Timestamp::from_millisecond(now_ms) else {
        return notices;
    };
    for (spec, i) in fleet.instances.iter().zip(instances) {
        let before_downtime = matches!(
            i.phase,
            Phase::Pending | Phase::Preflight | Phase::HotSync | Phase::Converged
        );
        if !before_downtime || receivers_of(fleet, spec).is_empty() {
            continue;
        }
        let Some(opening) = crate::windows::next_opening(&spec.windows, now) else {
            continue;
        };
        let (start, end) = (opening.start.as_millisecond(), opening.end.as_millisecond());
        if start - now_ms > horizon {
            continue;
        }
        let kind = Kind::WindowScheduled;
        let key = format!("{}/{}/{}/{start}", policy.name, spec.name, kind.as_str());
        let mut body = instance_body(fleet, spec, kind, &key, now_ms);
        body["window_start_unix_ms"] = json!(start);
        body["window_end_unix_ms"] = json!(end);
        notices.push(Notice {
            key,
            kind,
            instance: spec.name.clone(),
            body,
            receivers: receivers_of(fleet, spec),
        });
    }
    notices
}

/// Notices as the outbox stores them.
pub fn queued(notices: &[Notice]) -> Vec<Queued> {
    notices
        .iter()
        .map(|n| Queued {
            key: n.key.clone(),
            kind: n.kind.as_str().into(),
            instance: n.instance.clone(),
            body: n.body.to_string(),
            receivers: n.receivers.clone(),
        })
        .collect()
}

/// `sha256=` and the hex HMAC-SHA256 of `body` under `secret`: the signature header's value.
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let tag = ring::hmac::sign(&key, body);
    let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256={hex}")
}

/// A receiver ready to deliver.
#[derive(Clone)]
pub struct Receiver {
    /// Its name.
    pub name: String,
    how: How,
    timeout: Duration,
}

#[derive(Clone)]
enum How {
    Webhook {
        url: WebhookUrl,
        secret: Vec<u8>,
        tls: Arc<rustls::ClientConfig>,
    },
    Command(Vec<String>),
}

/// Debian's CA bundle, the webhooks' roots unless a receiver names its own.
const SYSTEM_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";

impl Receiver {
    /// Reads a receiver's secret and roots.
    pub fn load(config: &ReceiverConfig) -> Result<Self, String> {
        let how = match (&config.webhook, &config.command) {
            (Some(url), _) => {
                let url = WebhookUrl::parse(url)?;
                let secret_file = config
                    .secret_file
                    .as_ref()
                    .ok_or_else(|| format!("receiver {}: no secret_file", config.name))?;
                let secret = std::fs::read(secret_file).map_err(|e| {
                    format!("receiver {}: {}: {e}", config.name, secret_file.display())
                })?;
                let secret = secret.trim_ascii().to_vec();
                if secret.is_empty() {
                    return Err(format!(
                        "receiver {}: {} is empty",
                        config.name,
                        secret_file.display()
                    ));
                }
                let roots_file = config
                    .ca_file
                    .clone()
                    .unwrap_or_else(|| SYSTEM_ROOTS.into());
                let roots = bmfleet_proto::tls::load_roots(&roots_file)
                    .map_err(|e| format!("receiver {}: {e}", config.name))?;
                let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
                    rustls::crypto::ring::default_provider(),
                ))
                .with_safe_default_protocol_versions()
                .map_err(|e| format!("receiver {}: {e}", config.name))?
                .with_root_certificates(roots)
                .with_no_client_auth();
                How::Webhook {
                    url,
                    secret,
                    tls: Arc::new(tls),
                }
            }
            (None, Some(argv)) => How::Command(argv.clone()),
            (None, None) => {
                return Err(format!(
                    "receiver {}: neither webhook nor command",
                    config.name
                ))
            }
        };
        Ok(Receiver {
            name: config.name.clone(),
            how,
            timeout: Duration::from_secs(config.timeout_secs),
        })
    }

    /// Delivers one notice: a 2xx answer, or the command's exit status 0.
    pub async fn deliver(&self, row: &OutboxRow) -> Result<(), String> {
        match tokio::time::timeout(self.timeout, self.try_deliver(row)).await {
            Ok(done) => done,
            Err(_) => Err(format!("no answer within {} s", self.timeout.as_secs())),
        }
    }

    async fn try_deliver(&self, row: &OutboxRow) -> Result<(), String> {
        match &self.how {
            How::Webhook { url, secret, tls } => {
                let status = post(url, tls.clone(), secret, row).await?;
                if (200..300).contains(&status) {
                    Ok(())
                } else {
                    Err(format!(
                        "{}:{}{} answered {status}",
                        url.host, url.port, url.path
                    ))
                }
            }
            How::Command(argv) => run_command(argv, row).await,
        }
    }
}

impl Receiver {
    /// Asks this receiver, as a window gate, whether `instance`'s downtime may begin now: a
    /// 2xx answer or exit status 0 lets it; anything else (a refusal, no answer, a failure to
    /// ask) holds it, with why.
    pub async fn ask_gate(
        &self,
        fleet: &FleetFile,
        spec: &InstanceSpec,
        window_end_ms: i64,
        now_ms: i64,
    ) -> Result<(), String> {
        let kind = "window_gate";
        let key = format!("{}/{}/{kind}/{now_ms}", fleet.policy.name, spec.name);
        let mut body = instance_body(fleet, spec, Kind::DowntimeStarting, &key, now_ms);
        body["kind"] = json!(kind);
        body["window_end_unix_ms"] = json!(window_end_ms);
        let row = OutboxRow {
            id: 0,
            key,
            receiver: self.name.clone(),
            kind: kind.into(),
            instance: spec.name.clone(),
            body: body.to_string(),
            attempts: 0,
            delivered_ms: None,
            last_error: String::new(),
            created_ms: now_ms,
        };
        self.deliver(&row).await.map_err(|e| {
            format!(
                "the window gate {} refused {}'s downtime: {e}",
                self.name, spec.name
            )
        })
    }
}

/// POSTs `row`'s body over TLS; the answer's status code.
async fn post(
    url: &WebhookUrl,
    tls: Arc<rustls::ClientConfig>,
    secret: &[u8],
    row: &OutboxRow,
) -> Result<u16, String> {
    let tcp = tokio::net::TcpStream::connect((url.host.as_str(), url.port))
        .await
        .map_err(|e| format!("{}:{}: {e}", url.host, url.port))?;
    let name = rustls::pki_types::ServerName::try_from(url.host.clone())
        .map_err(|e| format!("{}: {e}", url.host))?;
    let mut stream = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS with {}:{}: {e}", url.host, url.port))?;
    let body = row.body.as_bytes();
    let host = if url.host.contains(':') {
        format!("[{}]:{}", url.host, url.port)
    } else {
        format!("{}:{}", url.host, url.port)
    };
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: bmfleet-orchestrator\r\nContent-Type: application/json\r\nContent-Length: {len}\r\nX-Bmfleet-Event: {kind}\r\nIdempotency-Key: {key}\r\nX-Bmfleet-Signature-256: {sig}\r\nConnection: close\r\n\r\n",
        path = url.path,
        len = body.len(),
        kind = row.kind,
        key = row.key,
        sig = sign(secret, body),
    );
    stream
        .write_all(head.as_bytes())
        .await
        .and(stream.write_all(body).await)
        .and(stream.flush().await)
        .map_err(|e| format!("sending to {host}: {e}"))?;
    // The status line is all that is needed.
    let mut answer = Vec::new();
    let mut buf = [0u8; 1024];
    while !answer.windows(2).any(|w| w == b"\r\n") && answer.len() < 8192 {
        let n = stream
            .read(&mut buf)
            .await
            .map_err(|e| format!("reading {host}'s answer: {e}"))?;
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&answer);
    line.split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .filter(|_| line.starts_with("HTTP/1."))
        .ok_or_else(|| {
            format!(
                "{host} gave no HTTP answer: {:?}",
                line.lines().next().unwrap_or_default()
            )
        })
}

/// Runs the receiver's command with the body on its standard input.
async fn run_command(argv: &[String], row: &OutboxRow) -> Result<(), String> {
    let (program, args) = argv.split_first().ok_or("an empty command")?;
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .env("BMFLEET_EVENT", &row.kind)
        .env("BMFLEET_KEY", &row.key)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start {program}: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(row.body.as_bytes())
            .await
            .map_err(|e| format!("{program}'s standard input: {e}"))?;
    }
    let out = child
        .wait_with_output()
        .await
        .map_err(|e| format!("{program}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        // The end of what it said, where the reason usually is (its last 300 characters).
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stderr = stderr.trim();
        let tail = stderr
            .char_indices()
            .rev()
            .nth(299)
            .map_or(stderr, |(at, _)| &stderr[at..]);
        Err(format!("{program} exited {}: {tail}", out.status))
    }
}

/// The wait before attempt `attempts + 1`: 2, 4, 8 … s, at most 10 minutes.
pub fn backoff_ms(attempts: u32) -> i64 {
    (1_000i64 << attempts.min(10)).min(600_000)
}

/// What the notifier needs.
pub struct Notifier {
    /// The state database (transitions in, outbox out).
    pub state: Arc<State>,
    /// The applied fleet, when there is one.
    pub fleet: Arc<dyn Fn() -> Option<Arc<FleetFile>> + Send + Sync>,
    /// The receivers of the orchestrator's configuration.
    pub receivers: Vec<Receiver>,
    /// Time.
    pub clock: Arc<dyn Clock>,
    /// Metrics.
    pub metrics: Arc<crate::metrics::Metrics>,
}

impl Notifier {
    /// Collects and delivers, once a second, until the task is dropped.
    pub async fn run(self) {
        loop {
            if let Err(e) = self.collect() {
                tracing::warn!(error = %e, "notifications: cannot read the transitions");
            }
            self.deliver_due().await;
            self.clock.sleep(1_000).await;
        }
    }

    /// Derives the notices of the transitions stored since the cursor and of the fleet's
    /// state, and puts them in the outbox with the new cursor, in one transaction.
    pub fn collect(&self) -> Result<(), StateError> {
        let Some(fleet) = (self.fleet)() else {
            return Ok(());
        };
        let now = self.clock.now_ms();
        let applied = self.state.fleet_applied_ms()?.unwrap_or(0);
        let stored: std::collections::HashMap<String, Instance> =
            self.state.instances()?.into_iter().collect();
        let mut notices = Vec::new();
        let cursor = self.state.notify_cursor()?;
        let rows = self.state.transitions_from(cursor, 1_000)?;
        for row in rows.iter().filter(|r| r.at_ms >= applied) {
            let previous = self.state.previous_phase(&row.instance, row.id, applied)?;
            notices.extend(from_transition(
                &fleet,
                row,
                previous.as_deref(),
                stored.get(&row.instance),
            ));
        }
        let instances: Vec<Instance> = fleet
            .instances
            .iter()
            .map(|s| stored.get(&s.name).cloned().unwrap_or_default())
            .collect();
        notices.extend(from_fleet(
            &fleet,
            &instances,
            &self.state.fleet_state()?,
            now,
        ));
        let new_cursor = rows.last().map_or(cursor, |r| r.id);
        self.state
            .enqueue_notices(&queued(&notices), new_cursor, now)
    }

    /// Tries every due delivery once.
    pub async fn deliver_due(&self) {
        let now = self.clock.now_ms();
        let due = match self.state.due_notifications(now, 100) {
            Ok(due) => due,
            Err(e) => {
                tracing::warn!(error = %e, "notifications: cannot read the outbox");
                return;
            }
        };
        for row in due {
            let result = match self.receivers.iter().find(|r| r.name == row.receiver) {
                Some(receiver) => receiver.deliver(&row).await,
                None => Err(format!(
                    "no receiver '{}' in the orchestrator's configuration any more",
                    row.receiver
                )),
            };
            self.metrics
                .notification_attempt(&row.receiver, result.is_ok());
            let now = self.clock.now_ms();
            let stored = match &result {
                Ok(()) => self.state.notification_delivered(row.id, now),
                Err(e) => {
                    tracing::warn!(receiver = %row.receiver, key = %row.key, attempt = row.attempts + 1, error = %e, "notification not delivered: retried");
                    self.state
                        .notification_failed(row.id, now + backoff_ms(row.attempts + 1), e)
                }
            };
            if let Err(e) = stored {
                tracing::warn!(error = %e, "notifications: cannot update the outbox");
            }
        }
        if let Ok((count, _)) = self.state.undelivered_notifications() {
            self.metrics.notifications_undelivered(count);
        }
    }
}

#[cfg(test)]
mod tests;
