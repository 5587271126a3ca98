//! `bmctl fleet status` and `bmctl fleet audit`: the orchestrator's view, as a table or JSON.

use bmfleet_proto::v1::{AgentStatus, AuditEntry, AuditRequest, StatusRequest};
use serde::Serialize;

use crate::{Connection, Output};

/// `bmctl fleet status --output json` (stable schema, see README.md).
#[derive(Serialize)]
struct StatusJson {
    orchestrator: String,
    generated_at_unix_ms: i64,
    agents: Vec<AgentJson>,
    migration: Option<String>,
    fleet_paused: bool,
    approved: bool,
    fleet_eta_unix_ms: Option<i64>,
    instances: Vec<InstanceJson>,
    notifications_undelivered: u64,
    notifications_error: Option<String>,
    /// Every instance of the fleet (`instances` may list fewer), by phase.
    instances_total: u32,
    phases: std::collections::BTreeMap<String, u32>,
    bytes_moved_total: u64,
    /// Every agent (`agents` may list fewer), and how many are up.
    agents_total: u32,
    agents_up: u32,
}

#[derive(Serialize)]
struct InstanceJson {
    name: String,
    phase: String,
    origin: String,
    target: String,
    hot_passes: u32,
    last_changed_files: u64,
    last_changed_bytes: u64,
    bytes_moved: u64,
    not_converging: bool,
    downtime_start_unix_ms: Option<i64>,
    downtime_end_unix_ms: Option<i64>,
    downtime_budget_secs: u64,
    last_error: Option<String>,
    running: Vec<String>,
    progress_percent: u32,
    eta_unix_ms: Option<i64>,
    window_end_unix_ms: Option<i64>,
    paused: bool,
    pause_pending: bool,
    databases: Option<String>,
    databases_why: Option<String>,
}

impl From<&bmfleet_proto::v1::InstanceStatus> for InstanceJson {
    fn from(i: &bmfleet_proto::v1::InstanceStatus) -> Self {
        InstanceJson {
            name: i.name.clone(),
            phase: i.phase.clone(),
            origin: i.origin.clone(),
            target: i.target.clone(),
            hot_passes: i.hot_passes,
            last_changed_files: i.last_changed_files,
            last_changed_bytes: i.last_changed_bytes,
            bytes_moved: i.bytes_moved,
            not_converging: i.not_converging,
            downtime_start_unix_ms: non_zero(i.downtime_start_unix_ms),
            downtime_end_unix_ms: non_zero(i.downtime_end_unix_ms),
            downtime_budget_secs: i.downtime_budget_secs,
            last_error: non_empty(&i.last_error),
            running: i.running.clone(),
            progress_percent: i.progress_percent,
            eta_unix_ms: non_zero(i.eta_unix_ms),
            window_end_unix_ms: non_zero(i.window_end_unix_ms),
            paused: i.paused,
            pause_pending: i.pause_pending,
            databases: non_empty(&i.databases),
            databases_why: non_empty(&i.databases_why),
        }
    }
}

/// Downtime so far (or in all) for an instance, seconds.
fn downtime_secs(i: &InstanceJson, now_ms: i64) -> Option<i64> {
    let start = i.downtime_start_unix_ms?;
    Some((i.downtime_end_unix_ms.unwrap_or(now_ms) - start) / 1000)
}

#[derive(Serialize)]
struct AgentJson {
    name: String,
    address: String,
    up: bool,
    last_seen_unix_ms: Option<i64>,
    last_check_unix_ms: Option<i64>,
    last_error: Option<String>,
    hostname: Option<String>,
    bluemind_version: Option<String>,
    postgresql_version: Option<String>,
    data_dirs: Vec<DataDirJson>,
    missing_spool_users: Vec<String>,
}

#[derive(Serialize)]
struct DataDirJson {
    path: String,
    exists: bool,
    used_bytes: Option<u64>,
    entries: Option<u64>,
    free_bytes: u64,
}

fn non_zero(v: i64) -> Option<i64> {
    (v != 0).then_some(v)
}

fn non_empty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_string())
}

impl From<&AgentStatus> for AgentJson {
    fn from(a: &AgentStatus) -> Self {
        let facts = a.facts.as_ref();
        let version =
            |v: Option<&bmfleet_proto::v1::VersionFact>| v.and_then(|v| non_empty(&v.version));
        AgentJson {
            name: a.name.clone(),
            address: a.address.clone(),
            up: a.up,
            last_seen_unix_ms: non_zero(a.last_seen_unix_ms),
            last_check_unix_ms: non_zero(a.last_check_unix_ms),
            last_error: non_empty(&a.last_error),
            hostname: facts.and_then(|f| non_empty(&f.hostname)),
            bluemind_version: version(facts.and_then(|f| f.bluemind.as_ref())),
            postgresql_version: version(facts.and_then(|f| f.postgresql.as_ref())),
            data_dirs: facts
                .map(|f| {
                    f.data_dirs
                        .iter()
                        .map(|d| DataDirJson {
                            path: d.path.clone(),
                            exists: d.exists,
                            used_bytes: d.usage_measured.then_some(d.used_bytes),
                            entries: d.usage_measured.then_some(d.entries),
                            free_bytes: d.free_bytes,
                        })
                        .collect()
                })
                .unwrap_or_default(),
            missing_spool_users: facts
                .map(|f| {
                    f.spool_users
                        .iter()
                        .filter(|u| !u.exists)
                        .map(|u| u.name.clone())
                        .collect()
                })
                .unwrap_or_default(),
        }
    }
}

/// "12s ago", "4m ago", "never".
fn ago(now_ms: i64, then_ms: Option<i64>) -> String {
    let Some(then) = then_ms else {
        return "never".into();
    };
    let secs = (now_ms - then).max(0) / 1000;
    match secs {
        0..=119 => format!("{secs}s ago"),
        120..=7199 => format!("{}m ago", secs / 60),
        _ => format!("{}h ago", secs / 3600),
    }
}

/// A Unix-ms instant as RFC 3339 UTC, to the second.
pub fn utc(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(ms.div_euclid(1000))
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| ms.to_string())
}

/// Left-aligned columns separated by two spaces.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  "));
            }
        }
        out.trim_end().to_string() + "\n"
    };
    let mut out = line(header.to_vec());
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

/// `bmctl fleet status`.
/// "1h05m", "4m12s", "37s".
fn duration(ms: i64) -> String {
    let secs = ms.max(0) / 1000;
    match secs {
        0..=59 => format!("{secs}s"),
        60..=3599 => format!("{}m{:02}s", secs / 60, secs % 60),
        _ => format!("{}h{:02}m", secs / 3600, (secs % 3600) / 60),
    }
}

/// How many instances (and agents) the table lists: those that most need a look first.
const TABLE_LIMIT: u32 = 50;

async fn fetch(connection: &Connection, limit: u32) -> anyhow::Result<StatusJson> {
    let mut client = connection.client()?;
    let reply = connection
        .call(client.status(StatusRequest { limit }))
        .await?
        .into_inner();
    Ok(StatusJson {
        orchestrator: reply.orchestrator.clone(),
        generated_at_unix_ms: reply.generated_at_unix_ms,
        agents: reply.agents.iter().map(AgentJson::from).collect(),
        migration: non_empty(&reply.migration),
        fleet_paused: reply.fleet_paused,
        approved: reply.approved,
        fleet_eta_unix_ms: non_zero(reply.fleet_eta_unix_ms),
        instances: reply.instances.iter().map(InstanceJson::from).collect(),
        notifications_undelivered: reply.notifications_undelivered,
        notifications_error: non_empty(&reply.notifications_error),
        instances_total: reply.instances_total,
        phases: reply
            .phases
            .iter()
            .map(|p| (p.phase.clone(), p.count))
            .collect(),
        bytes_moved_total: reply.bytes_moved_total,
        agents_total: reply.agents_total,
        agents_up: reply.agents_up,
    })
}

/// The operator's view: agents, then one line per instance and the fleet's totals.
fn render(json: &StatusJson) -> String {
    let now = json.generated_at_unix_ms;
    let rows: Vec<Vec<String>> = json
        .agents
        .iter()
        .map(|a| {
            vec![
                a.name.clone(),
                a.address.clone(),
                if a.up { "up" } else { "DOWN" }.into(),
                ago(now, a.last_seen_unix_ms),
                a.bluemind_version.clone().unwrap_or_else(|| "-".into()),
                a.postgresql_version.clone().unwrap_or_else(|| "-".into()),
                a.last_error.clone().unwrap_or_default(),
            ]
        })
        .collect();
    let mut out = table(
        &[
            "AGENT",
            "ADDRESS",
            "STATE",
            "LAST SEEN",
            "BLUEMIND",
            "POSTGRESQL",
            "ERROR",
        ],
        &rows,
    );
    out += &format!(
        "{}/{} agents up (orchestrator {}){}\n",
        json.agents_up,
        json.agents_total,
        json.orchestrator,
        if json.agents.len() < json.agents_total as usize {
            format!("; {} listed, those down or erring first", json.agents.len())
        } else {
            String::new()
        }
    );
    let Some(migration) = &json.migration else {
        return out;
    };
    let rows: Vec<Vec<String>> = json
        .instances
        .iter()
        .map(|i| {
            vec![
                i.name.clone(),
                if i.pause_pending {
                    format!("{} (pausing)", i.phase)
                } else if i.paused && i.phase != "Paused" {
                    format!("{} (held)", i.phase)
                } else {
                    i.phase.clone()
                },
                format!("{}%", i.progress_percent),
                i.databases.clone().unwrap_or_else(|| "-".into()),
                i.hot_passes.to_string(),
                format!(
                    "{} files / {} B",
                    i.last_changed_files, i.last_changed_bytes
                ),
                i.window_end_unix_ms
                    .map(|w| format!("ends in {}", duration(w - now)))
                    .unwrap_or_else(|| "-".into()),
                downtime_secs(i, now)
                    .map(|d| format!("{d}s / {}s", i.downtime_budget_secs))
                    .unwrap_or_else(|| "-".into()),
                match (i.phase.as_str(), i.eta_unix_ms) {
                    ("Done" | "RolledBack" | "Failed" | "Aborted", _) => "-".into(),
                    _ if i.paused || i.pause_pending => "paused".into(),
                    (_, Some(eta)) => format!("in {}", duration(eta - now)),
                    (_, None) => "none in horizon".into(),
                },
                i.last_error.clone().unwrap_or_default(),
            ]
        })
        .collect();
    out += "\n";
    out += &table(
        &[
            "INSTANCE",
            "PHASE",
            "PROGRESS",
            "DB",
            "PASSES",
            "LAST PASS CHANGED",
            "WINDOW",
            "DOWNTIME/BUDGET",
            "ETA",
            "LAST ERROR",
        ],
        &rows,
    );
    let count =
        |phases: &[&str]| -> u32 { phases.iter().filter_map(|p| json.phases.get(*p)).sum() };
    let moved = json.bytes_moved_total;
    if json.instances.len() < json.instances_total as usize {
        let by_phase: Vec<String> = json
            .phases
            .iter()
            .map(|(phase, n)| format!("{phase} {n}"))
            .collect();
        out += &format!(
            "{} of {} instances listed: those that most need a look (down, failed, erring, paused, running) first; by phase: {}; `bmctl fleet status --all` lists every one\n",
            json.instances.len(),
            json.instances_total,
            by_phase.join(", ")
        );
    }
    out += &format!(
        "fleet {migration}: {} instances, {} done, {} down, {} rolled back, {} failed; {moved} B moved; {}{}{}\n",
        json.instances_total,
        count(&["Done"]),
        count(&["ColdSync", "Cutover", "StartServices", "RollingBack"]),
        count(&["RolledBack"]),
        count(&["Failed"]),
        json.fleet_eta_unix_ms
            .map(|e| format!("finished in {}", duration(e - now)))
            .unwrap_or_else(|| "no ETA".into()),
        if json.fleet_paused { ", paused" } else { "" },
        if json.approved { ", approved after canaries" } else { "" },
    );
    if json.notifications_undelivered > 0 {
        out += &format!(
            "notifications: {} not delivered yet (retried){}\n",
            json.notifications_undelivered,
            json.notifications_error
                .as_ref()
                .map(|e| format!("; the oldest: {e}"))
                .unwrap_or_default()
        );
    }
    out
}

/// `bmctl fleet status [INSTANCE] [--watch]`.
pub async fn status(
    connection: &Connection,
    output: Output,
    instance: Option<String>,
    watch: bool,
    all: bool,
) -> anyhow::Result<()> {
    if let Some(name) = instance {
        return history(connection, &name, output).await;
    }
    // The table lists the instances that most need a look; JSON (and --all) every one.
    let limit = match output {
        Output::Table if !all => TABLE_LIMIT,
        _ => 0,
    };
    loop {
        let json = fetch(connection, limit).await?;
        match output {
            Output::Json => println!("{}", serde_json::to_string_pretty(&json)?),
            // Refresh in place: clear the screen, then draw.
            Output::Table if watch => print!("\x1b[2J\x1b[H{}", render(&json)),
            Output::Table => print!("{}", render(&json)),
        }
        if !watch {
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    }
}

/// One step's run, from the transitions.
#[derive(Serialize)]
struct StepRun {
    step: String,
    attempt: u64,
    started_unix_ms: i64,
    ended_unix_ms: Option<i64>,
    outcome: String,
}

/// `bmctl fleet status INSTANCE`: every step with its timing, from the transitions.
async fn history(connection: &Connection, name: &str, output: Output) -> anyhow::Result<()> {
    let mut client = connection.client()?;
    let events = connection
        .call(client.events(bmfleet_proto::v1::EventsRequest {
            instance: name.to_string(),
            limit: 10_000,
            after_id: 0,
        }))
        .await?
        .into_inner()
        .events;
    if events.is_empty() {
        anyhow::bail!("no transitions for instance {name} (is it in the applied fleet?)");
    }
    let mut runs: Vec<StepRun> = Vec::new();
    for e in &events {
        let actions: serde_json::Value = serde_json::from_str(&e.actions).unwrap_or_default();
        for a in actions.as_array().into_iter().flatten() {
            runs.push(StepRun {
                step: a["Run"]["step"].as_str().unwrap_or_default().to_string(),
                attempt: a["Run"]["attempt"].as_u64().unwrap_or(0),
                started_unix_ms: e.at_unix_ms,
                ended_unix_ms: None,
                outcome: "running".into(),
            });
        }
        let event: serde_json::Value = serde_json::from_str(&e.event).unwrap_or_default();
        for (key, outcome) in [("Succeeded", "ok"), ("Failed", "failed")] {
            let ended = &event[key];
            if let Some(step) = ended["step"].as_str() {
                let attempt = ended["attempt"].as_u64().unwrap_or(0);
                if let Some(run) = runs
                    .iter_mut()
                    .rev()
                    .find(|r| r.step == step && r.attempt == attempt)
                {
                    run.ended_unix_ms = Some(e.at_unix_ms);
                    run.outcome = match ended["error"].as_str() {
                        Some(err) => format!("{outcome}: {err}"),
                        None => outcome.into(),
                    };
                }
            }
        }
    }
    let phase = events.last().map(|e| e.phase.clone()).unwrap_or_default();
    match output {
        Output::Json => println!(
            "{}",
            serde_json::json!({ "instance": name, "phase": phase, "steps": runs })
        ),
        Output::Table => {
            let rows: Vec<Vec<String>> = runs
                .iter()
                .map(|r| {
                    vec![
                        utc(r.started_unix_ms),
                        r.step.clone(),
                        r.attempt.to_string(),
                        r.ended_unix_ms
                            .map(|e| duration(e - r.started_unix_ms))
                            .unwrap_or_else(|| "-".into()),
                        r.outcome.clone(),
                    ]
                })
                .collect();
            print!(
                "{}",
                table(
                    &["STARTED (UTC)", "STEP", "ATTEMPT", "TOOK", "OUTCOME"],
                    &rows
                )
            );
            println!("{name}: {phase}");
        }
    }
    Ok(())
}

#[derive(Serialize)]
struct AuditJson {
    id: i64,
    at_unix_ms: i64,
    who: String,
    role: String,
    method: String,
    arguments: String,
    outcome: String,
    detail: String,
}

impl From<&AuditEntry> for AuditJson {
    fn from(e: &AuditEntry) -> Self {
        AuditJson {
            id: e.id,
            at_unix_ms: e.at_unix_ms,
            who: e.who.clone(),
            role: e.role.clone(),
            method: e.method.clone(),
            arguments: e.arguments.clone(),
            outcome: e.outcome.clone(),
            detail: e.detail.clone(),
        }
    }
}

/// `bmctl fleet audit`.
pub async fn audit(
    connection: &Connection,
    limit: u32,
    before_id: i64,
    output: Output,
) -> anyhow::Result<()> {
    let mut client = connection.client()?;
    let reply = connection
        .call(client.audit(AuditRequest { limit, before_id }))
        .await?
        .into_inner();
    let entries: Vec<AuditJson> = reply.entries.iter().map(AuditJson::from).collect();
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&entries)?),
        Output::Table => {
            let rows: Vec<Vec<String>> = entries
                .iter()
                .map(|e| {
                    vec![
                        e.id.to_string(),
                        utc(e.at_unix_ms),
                        format!("{} ({})", e.who, e.role),
                        e.method.clone(),
                        e.outcome.clone(),
                        e.detail.clone(),
                    ]
                })
                .collect();
            print!(
                "{}",
                table(
                    &["ID", "AT (UTC)", "WHO", "METHOD", "OUTCOME", "DETAIL"],
                    &rows
                )
            );
            if let (Some(first), true) = (entries.first(), entries.len() as u32 >= limit) {
                println!("older entries: bmctl fleet audit --before {}", first.id);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns() {
        let t = table(
            &["A", "BB"],
            &[vec!["xxx".into(), "y".into()], vec!["z".into(), "".into()]],
        );
        assert_eq!(t, "A    BB\nxxx  y\nz\n");
    }

    #[test]
    fn audit_times_are_rfc3339() {
        assert_eq!(utc(1_000_500), "1970-01-01T00:16:40Z");
    }

    #[test]
    fn a_pause_shows_in_the_phase_and_the_eta() {
        let instance = |phase: &str, paused: bool, pause_pending: bool| {
            InstanceJson::from(&bmfleet_proto::v1::InstanceStatus {
                name: format!("mail-{phase}"),
                phase: phase.into(),
                eta_unix_ms: 2_000_000,
                paused,
                pause_pending,
                ..Default::default()
            })
        };
        let json = StatusJson {
            orchestrator: "orchestrator".into(),
            generated_at_unix_ms: 1_000_000,
            agents: vec![],
            migration: Some("night".into()),
            fleet_paused: false,
            approved: false,
            fleet_eta_unix_ms: None,
            notifications_undelivered: 0,
            notifications_error: None,
            instances: vec![
                instance("HotSync", false, true),
                instance("Converged", true, false),
                instance("Pending", false, false),
            ],
            instances_total: 3,
            phases: [("HotSync", 1), ("Converged", 1), ("Pending", 1)]
                .map(|(p, n)| (p.to_string(), n))
                .into(),
            bytes_moved_total: 0,
            agents_total: 0,
            agents_up: 0,
        };
        let text = render(&json);
        let line = |name: &str| {
            text.lines()
                .find(|l| l.starts_with(name))
                .unwrap()
                .to_string()
        };
        assert!(line("mail-HotSync").contains("HotSync (pausing)"), "{text}");
        assert!(line("mail-HotSync").contains("paused"), "{text}");
        assert!(
            line("mail-Converged").contains("Converged (held)"),
            "{text}"
        );
        assert!(!line("mail-Pending").contains("paused"), "{text}");
        let value = serde_json::to_value(&json.instances[0]).unwrap();
        assert_eq!(value["pause_pending"], true);
    }

    #[test]
    fn ago_is_human() {
        assert_eq!(ago(10_000, None), "never");
        assert_eq!(ago(10_000, Some(7_000)), "3s ago");
        assert_eq!(ago(1_000_000, Some(0)), "16m ago");
    }
}
