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
    instances: Vec<InstanceJson>,
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
pub async fn status(connection: &Connection, output: Output) -> anyhow::Result<()> {
    let mut client = connection.client()?;
    let reply = connection
        .call(client.status(StatusRequest {}))
        .await?
        .into_inner();
    let json = StatusJson {
        orchestrator: reply.orchestrator.clone(),
        generated_at_unix_ms: reply.generated_at_unix_ms,
        agents: reply.agents.iter().map(AgentJson::from).collect(),
        migration: non_empty(&reply.migration),
        fleet_paused: reply.fleet_paused,
        approved: reply.approved,
        instances: reply.instances.iter().map(InstanceJson::from).collect(),
    };
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&json)?),
        Output::Table => {
            let rows: Vec<Vec<String>> = json
                .agents
                .iter()
                .map(|a| {
                    vec![
                        a.name.clone(),
                        a.address.clone(),
                        if a.up { "up" } else { "DOWN" }.into(),
                        ago(json.generated_at_unix_ms, a.last_seen_unix_ms),
                        a.bluemind_version.clone().unwrap_or_else(|| "-".into()),
                        a.postgresql_version.clone().unwrap_or_else(|| "-".into()),
                        a.last_error.clone().unwrap_or_default(),
                    ]
                })
                .collect();
            let up = json.agents.iter().filter(|a| a.up).count();
            print!(
                "{}",
                table(
                    &[
                        "AGENT",
                        "ADDRESS",
                        "STATE",
                        "LAST SEEN",
                        "BLUEMIND",
                        "POSTGRESQL",
                        "ERROR"
                    ],
                    &rows
                )
            );
            println!(
                "{up}/{} agents up (orchestrator {})",
                json.agents.len(),
                json.orchestrator
            );
            if let Some(migration) = &json.migration {
                let rows: Vec<Vec<String>> = json
                    .instances
                    .iter()
                    .map(|i| {
                        vec![
                            i.name.clone(),
                            i.phase.clone(),
                            i.hot_passes.to_string(),
                            format!(
                                "{} files / {} B",
                                i.last_changed_files, i.last_changed_bytes
                            ),
                            downtime_secs(i, json.generated_at_unix_ms)
                                .map(|d| format!("{d}s / {}s", i.downtime_budget_secs))
                                .unwrap_or_else(|| "-".into()),
                            i.running.join(","),
                            i.last_error.clone().unwrap_or_default(),
                        ]
                    })
                    .collect();
                println!();
                print!(
                    "{}",
                    table(
                        &[
                            "INSTANCE",
                            "PHASE",
                            "PASSES",
                            "LAST PASS CHANGED",
                            "DOWNTIME/BUDGET",
                            "RUNNING",
                            "LAST ERROR"
                        ],
                        &rows
                    )
                );
                println!(
                    "fleet {migration}{}{}",
                    if json.fleet_paused { ", paused" } else { "" },
                    if json.approved {
                        ", approved after canaries"
                    } else {
                        ""
                    }
                );
            }
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
pub async fn audit(connection: &Connection, limit: u32, output: Output) -> anyhow::Result<()> {
    let mut client = connection.client()?;
    let reply = connection
        .call(client.audit(AuditRequest { limit }))
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
                    &["ID", "AT (UNIX MS)", "WHO", "METHOD", "OUTCOME", "DETAIL"],
                    &rows
                )
            );
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
    fn ago_is_human() {
        assert_eq!(ago(10_000, None), "never");
        assert_eq!(ago(10_000, Some(7_000)), "3s ago");
        assert_eq!(ago(1_000_000, Some(0)), "16m ago");
    }
}
