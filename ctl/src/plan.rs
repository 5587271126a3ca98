//! `bmctl fleet plan FILE`: checks a fleet file and prints the projected schedule. Works
//! without an orchestrator (the file's estimates and rates); changes nothing.

use std::path::Path;

use bmfleet_orchestrator::fleet::FleetFile;
use bmfleet_orchestrator::plan::plan;
use serde::Serialize;

use bmfleet_orchestrator::machine::{Instance, PassStats};

use crate::status::table;
use crate::{Connection, Output};

#[derive(Serialize)]
struct PlanJson {
    instance: String,
    canary: bool,
    start: Option<String>,
    start_local: Option<String>,
    projected_downtime_secs: i64,
    downtime_budget_secs: u64,
    /// "standby", "logical", "dump", or "auto"/"stream"/… still to be decided at preflight.
    databases: String,
    databases_why: String,
    /// The service IP's card on each side, "origin → target" (named in the file, or found
    /// in the agents' facts).
    interfaces: String,
    note: String,
}

/// How `spec`'s databases would move, from the agents' last facts: ("standby" | "logical" |
/// "dump", why);
/// a `stream` instance that cannot is a problem.
fn databases_path(
    status: &bmfleet_proto::v1::StatusReply,
    spec: &bmfleet_orchestrator::fleet::InstanceSpec,
    problems: &mut Vec<String>,
) -> (String, String) {
    let facts = |name: &str| {
        status
            .agents
            .iter()
            .find(|a| a.name == name)
            .and_then(|a| a.facts.as_ref())
    };
    match (facts(&spec.origin), facts(&spec.target)) {
        (Some(o), Some(t)) => match bmfleet_orchestrator::db_sync::choose(spec.db_sync, o, t) {
            Ok(plan) => (plan.path().into(), plan.why),
            Err(e) => {
                problems.push(format!("instance {}: {e}", spec.name));
                ("refused".into(), e)
            }
        },
        _ => (
            spec.db_sync.as_str().into(),
            "decided at preflight (no facts from both agents yet)".into(),
        ),
    }
}

/// What the orchestrator's agents lack for `fleet`: agents it does not know, origins without
/// a data address, a target that has served (once per agent); an interface or an extra dir an
/// instance asks and its agent lacks (per instance).
fn agent_problems(status: &bmfleet_proto::v1::StatusReply, fleet: &FleetFile) -> Vec<String> {
    let mut problems = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for spec in &fleet.instances {
        for (name, origin) in [(&spec.origin, true), (&spec.target, false)] {
            let Some(a) = status.agents.iter().find(|a| &a.name == name) else {
                if seen.insert((name.clone(), origin)) {
                    problems.push(format!(
                        "instance {}: the orchestrator does not know agent {name} (register it: \
                         `bmctl fleet enroll` or `bmctl fleet agents add`, or list it in its \
                         configuration)",
                        spec.name
                    ));
                }
                continue;
            };
            // What is the agent's own, said once per agent.
            if seen.insert((name.clone(), origin)) {
                if origin && a.data_address.is_empty() {
                    problems.push(format!(
                        "instance {}: origin agent {name} has no data_address (where its target \
                         pulls from): add it to its [[agent]] entry or `bmctl fleet agents add \
                         {name} {} --data-address HOST:PORT`",
                        spec.name, a.address
                    ));
                }
                if !origin && a.facts.as_ref().is_some_and(|f| f.served) {
                    problems.push(format!(
                        "instance {}: target {name} has served (its own marker is set): it \
                         is never synced over; `bmctl fleet apply --remigrate {}` migrates \
                         again once the origin serves",
                        spec.name, spec.name
                    ));
                }
            }
            // What each instance asks of it: what preflight would refuse, from its last facts.
            let Some(facts) = a.facts.as_ref() else {
                continue;
            };
            let card = if origin {
                bmfleet_orchestrator::interfaces::origin_card(spec, facts)
            } else {
                bmfleet_orchestrator::interfaces::target_card(spec, facts)
            };
            if let Err(e) = card {
                problems.push(format!("instance {}: {e}", spec.name));
            }
            if !origin && !facts.network_persistence_unavailable.is_empty() {
                problems.push(format!(
                    "instance {}: target {name} cannot keep the service IP across a reboot: {}",
                    spec.name, facts.network_persistence_unavailable
                ));
            }
            for dir in &spec.extra_dirs {
                if !facts.data_dirs.iter().any(|d| &d.path == dir) {
                    problems.push(format!(
                        "instance {}: {name} does not list {dir} among its data dirs: add it to \
                         facts.extra_data_dirs in its agent.toml, or remove it from the instance",
                        spec.name
                    ));
                }
            }
        }
    }
    problems
}

/// Each instance's service-IP cards, "origin → target": from the agents' last facts when
/// the orchestrator has them, else as the file names them ("found by the agent" when not).
fn interfaces(status: Option<&bmfleet_proto::v1::StatusReply>, fleet: &FleetFile) -> Vec<String> {
    let facts = |name: &str| {
        status?
            .agents
            .iter()
            .find(|a| a.name == name)
            .and_then(|a| a.facts.as_ref())
    };
    fleet
        .instances
        .iter()
        .map(|spec| {
            let origin = match facts(&spec.origin) {
                Some(f) => bmfleet_orchestrator::interfaces::origin_card(spec, f).ok(),
                None => spec.origin_interface.clone(),
            };
            let target = match facts(&spec.target) {
                Some(f) => bmfleet_orchestrator::interfaces::target_card(spec, f).ok(),
                None => spec.target_interface.clone(),
            };
            let show = |c: Option<String>| c.unwrap_or_else(|| "?".into());
            format!("{} → {}", show(origin), show(target))
        })
        .collect()
}

/// The orchestrator's measured passes for the instances of `fleet`, in file order, and what
/// its agents lack for the fleet.
async fn measured(
    connection: &Connection,
    fleet: &FleetFile,
) -> anyhow::Result<(
    Vec<Instance>,
    Vec<String>,
    Vec<(String, String)>,
    Vec<String>,
)> {
    let mut client = connection.client()?;
    let status = connection
        .call(client.status(bmfleet_proto::v1::StatusRequest::default()))
        .await?
        .into_inner();
    let mut problems = agent_problems(&status, fleet);
    let cards = interfaces(Some(&status), fleet);
    let databases = fleet
        .instances
        .iter()
        .map(|spec| databases_path(&status, spec, &mut problems))
        .collect();
    let measured = fleet
        .instances
        .iter()
        .map(|spec| {
            let mut i = Instance::default();
            if let Some(s) = status
                .instances
                .iter()
                .find(|s| s.name == spec.name && s.last_pass_elapsed_ms > 0)
            {
                i.last_pass = Some(PassStats {
                    files_changed: s.last_changed_files,
                    bytes_changed: s.last_changed_bytes,
                    scan_ms: s.last_pass_scan_ms,
                    elapsed_ms: s.last_pass_elapsed_ms,
                    ..Default::default()
                });
            }
            i
        })
        .collect();
    Ok((measured, problems, databases, cards))
}

/// Prints the plan of `file`, or fails naming the line and field at fault.
pub async fn run(
    file: &Path,
    connection: Option<Connection>,
    output: Output,
) -> anyhow::Result<()> {
    let fleet = FleetFile::load(file)?;
    let (measured, problems, databases, cards) = match &connection {
        Some(c) => match measured(c, &fleet).await {
            Ok(m) => {
                eprintln!(
                    "using the passes measured by the orchestrator at {}",
                    c.orchestrator
                );
                m
            }
            Err(e) => {
                eprintln!("bmctl: {e:#}; planning from the file's estimates");
                Default::default()
            }
        },
        None => Default::default(),
    };
    let cards = if cards.is_empty() {
        interfaces(None, &fleet)
    } else {
        cards
    };
    let rows = plan(&fleet, jiff::Timestamp::now(), &measured);
    let json: Vec<PlanJson> = rows
        .iter()
        .map(|r| {
            let spec = fleet.instances.iter().position(|s| s.name == r.instance);
            let (databases, databases_why) = spec
                .and_then(|n| databases.get(n).cloned())
                .unwrap_or_else(|| {
                    let chosen = spec.map_or("auto", |n| fleet.instances[n].db_sync.as_str());
                    (chosen.into(), "decided at preflight".into())
                });
            PlanJson {
                instance: r.instance.clone(),
                canary: r.canary,
                start: r.start.map(|t| t.to_string()),
                start_local: r.start.and_then(|t| {
                    let tz = jiff::tz::TimeZone::get(&r.zone).ok()?;
                    Some(t.to_zoned(tz).strftime("%a %Y-%m-%d %H:%M %Z").to_string())
                }),
                projected_downtime_secs: r.projected_secs,
                downtime_budget_secs: r.budget_secs,
                databases,
                databases_why,
                interfaces: spec.and_then(|n| cards.get(n).cloned()).unwrap_or_default(),
                note: r.note.clone(),
            }
        })
        .collect();
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&json)?),
        Output::Table => {
            let cells: Vec<Vec<String>> = json
                .iter()
                .map(|r| {
                    vec![
                        r.instance.clone(),
                        if r.canary { "canary" } else { "" }.into(),
                        r.start_local.clone().unwrap_or_else(|| "-".into()),
                        r.start.clone().unwrap_or_else(|| "-".into()),
                        format!("{}s", r.projected_downtime_secs),
                        format!("{}s", r.downtime_budget_secs),
                        r.databases.clone(),
                        r.interfaces.clone(),
                        r.note.clone(),
                    ]
                })
                .collect();
            print!(
                "{}",
                table(
                    &[
                        "INSTANCE",
                        "",
                        "COLD SYNC (LOCAL)",
                        "START (UTC)",
                        "PROJECTED",
                        "BUDGET",
                        "DB",
                        "CARDS",
                        "NOTE"
                    ],
                    &cells
                )
            );
            println!(
                "{} instances, policy {}: at most {} down at once, {}s between starts",
                json.len(),
                fleet.policy.name,
                fleet.policy.max_concurrent_downtime,
                fleet.policy.min_stagger_secs
            );
        }
    }
    if !problems.is_empty() {
        anyhow::bail!(
            "the fleet cannot run on this orchestrator as it is:\n  {}",
            problems.join("\n  ")
        );
    }
    Ok(())
}
