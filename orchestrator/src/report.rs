//! The migration report: what was done to each instance, from the orchestrator's own record
//! (its transitions, the audit log and the instances' state). Pure: the Fleet API gathers the
//! rows, `bmctl fleet report` renders the result as HTML, Markdown or JSON.

use std::collections::BTreeMap;

use bmfleet_proto::v1::{AuditEntry, InstanceStatus};
use serde::{Deserialize, Serialize};

use crate::machine::{Action, Event, Step};
use crate::state::TransitionRow;

/// The report of a whole fleet (or of the instances asked for).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FleetReport {
    /// The applied fleet's migration name.
    pub migration: String,
    /// The orchestrator that wrote it.
    pub orchestrator: String,
    /// When, Unix ms.
    pub generated_at_unix_ms: i64,
    /// Each instance, in the fleet file's order.
    pub instances: Vec<InstanceReport>,
    /// The fleet's sums.
    pub totals: Totals,
    /// Operator acts on the whole fleet (apply, approve, a pause or resume of all).
    pub fleet_acts: Vec<OperatorAct>,
}

/// The fleet's sums.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Totals {
    /// Instances in the report.
    pub instances: usize,
    /// Migrated and verified.
    pub done: usize,
    /// Rolled back (the origin serves again).
    pub rolled_back: usize,
    /// Failed: an operator must look.
    pub failed: usize,
    /// Neither: still running, paused, or withdrawn.
    pub other: usize,
    /// Downtimes summed, and the longest, ms.
    pub downtime_ms: i64,
    /// The longest downtime, ms.
    pub longest_downtime_ms: i64,
    /// Instances whose downtime exceeded their budget.
    pub over_budget: usize,
    /// Bytes every pass moved.
    pub bytes_moved: u64,
}

/// One instance's record.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct InstanceReport {
    /// Its fleet name, and its origin and target hosts.
    pub name: String,
    /// The origin host.
    pub origin: String,
    /// The target host.
    pub target: String,
    /// Where it stands.
    pub phase: String,
    /// How its databases moved ("standby", "logical", "dump") and why.
    pub databases: String,
    /// Why that path.
    pub databases_why: String,
    /// The downtime: origin stopped → target started, Unix ms (0: none).
    pub downtime_start_unix_ms: i64,
    /// Its end (0: none, or not over).
    pub downtime_end_unix_ms: i64,
    /// Its length, ms (0: none).
    pub downtime_ms: i64,
    /// The budget the fleet file gave it.
    pub downtime_budget_secs: u64,
    /// The phases it went through, in order.
    pub phases: Vec<PhaseSpan>,
    /// Every step it ran, in order of start.
    pub steps: Vec<StepRun>,
    /// The downtime's steps (the last run of each inside the downtime), with their times
    /// from the downtime's start.
    pub downtime_split: Vec<StepShare>,
    /// Bytes and files every pass moved.
    pub bytes_moved: u64,
    /// Files every pass changed.
    pub files_moved: u64,
    /// What the databases' gate compared in the downtime.
    pub database_gate: String,
    /// The final checks' evidence: the final pass's comparison, the checks on the service IP.
    pub checks: Vec<String>,
    /// BlueMind's post-migration tasks.
    pub post_migration: String,
    /// Every failed attempt and what came of it.
    pub problems: Vec<Problem>,
    /// Operator acts that named this instance.
    pub operator_acts: Vec<OperatorAct>,
}

/// A phase, from the transition that entered it to the one that left it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PhaseSpan {
    /// The phase.
    pub phase: String,
    /// Entered, Unix ms.
    pub start_unix_ms: i64,
    /// Left, Unix ms (0: it is still there).
    pub end_unix_ms: i64,
}

/// One attempt of one step.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepRun {
    /// The step's name (`hot-pass`, `databases`…).
    pub step: String,
    /// Its attempt.
    pub attempt: u32,
    /// Started and ended, Unix ms (end 0: still running or never answered).
    pub start_unix_ms: i64,
    /// Ended.
    pub end_unix_ms: i64,
    /// "succeeded", "failed" or "running".
    pub outcome: String,
    /// Why it failed.
    pub error: String,
    /// A pass's changed files and bytes, and its rounds (the pre-window pass).
    pub files_changed: u64,
    /// Bytes changed.
    pub bytes_changed: u64,
    /// Rounds of a pre-window pass.
    pub rounds: u32,
    /// What it saw (the gate, the mail queue, the evidence), when it said.
    pub detail: String,
}

/// One step of the downtime.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepShare {
    /// The step.
    pub step: String,
    /// Its start and length, ms from the downtime's start.
    pub start_ms: i64,
    /// Its length.
    pub ms: i64,
}

/// A failed attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    /// When, Unix ms.
    pub at_unix_ms: i64,
    /// The step and its attempt.
    pub step: String,
    /// Its attempt.
    pub attempt: u32,
    /// Why.
    pub error: String,
    /// What came of it: retried and succeeded, rolled back, or open.
    pub resolution: String,
}

/// A mutating Fleet API call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperatorAct {
    /// When, Unix ms.
    pub at_unix_ms: i64,
    /// The caller's certificate name and role.
    pub who: String,
    /// The call (`Pause`, `Abort`…) and its outcome.
    pub method: String,
    /// "ok", "denied" or "error", with the detail.
    pub outcome: String,
}

/// Fleet API calls that change something (the rest only read).
/// (and the window gates' answers, audited as `Gate`).
const ACTS: [&str; 6] = ["Apply", "Pause", "Resume", "Abort", "Approve", "Gate"];

/// Builds the report of `statuses` (the instances asked for, in the fleet file's order) from
/// their transitions and the audit log.
pub fn build(
    migration: &str,
    orchestrator: &str,
    now_ms: i64,
    statuses: &[InstanceStatus],
    transitions: &[TransitionRow],
    audit: &[AuditEntry],
) -> FleetReport {
    let mut by_instance: BTreeMap<&str, Vec<&TransitionRow>> = BTreeMap::new();
    for t in transitions {
        by_instance.entry(t.instance.as_str()).or_default().push(t);
    }
    let acts: Vec<(&AuditEntry, serde_json::Value)> = audit
        .iter()
        .filter(|a| ACTS.contains(&a.method.as_str()))
        .map(|a| (a, serde_json::from_str(&a.arguments).unwrap_or_default()))
        .collect();
    let act = |a: &AuditEntry| OperatorAct {
        at_unix_ms: a.at_unix_ms,
        who: format!("{} ({})", a.who, a.role),
        method: a.method.clone(),
        outcome: if a.detail.is_empty() {
            a.outcome.clone()
        } else {
            format!("{}: {}", a.outcome, a.detail)
        },
    };
    let instances: Vec<InstanceReport> = statuses
        .iter()
        .map(|s| {
            let mut report = instance(s, by_instance.get(s.name.as_str()).map_or(&[], |v| v));
            report.operator_acts = acts
                .iter()
                .filter(|(_, args)| args["instance"] == s.name.as_str())
                .map(|(a, _)| act(a))
                .collect();
            report
        })
        .collect();
    let fleet_acts = acts
        .iter()
        .filter(|(a, args)| matches!(a.method.as_str(), "Apply" | "Approve") || args["all"] == true)
        .map(|(a, _)| act(a))
        .collect();
    FleetReport {
        migration: migration.to_string(),
        orchestrator: orchestrator.to_string(),
        generated_at_unix_ms: now_ms,
        totals: totals(&instances),
        instances,
        fleet_acts,
    }
}

fn totals(instances: &[InstanceReport]) -> Totals {
    let mut t = Totals {
        instances: instances.len(),
        ..Totals::default()
    };
    for i in instances {
        match i.phase.as_str() {
            "Done" => t.done += 1,
            "RolledBack" => t.rolled_back += 1,
            "Failed" => t.failed += 1,
            _ => t.other += 1,
        }
        t.downtime_ms += i.downtime_ms;
        t.longest_downtime_ms = t.longest_downtime_ms.max(i.downtime_ms);
        let budget_ms =
            i64::try_from(i.downtime_budget_secs.saturating_mul(1000)).unwrap_or(i64::MAX);
        if i.downtime_ms > budget_ms {
            t.over_budget += 1;
        }
        t.bytes_moved += i.bytes_moved;
    }
    t
}

/// The step's name as operators read it (`hot-pass`).
fn step_name(step: Step) -> String {
    step.as_str().to_string()
}

fn instance(status: &InstanceStatus, rows: &[&TransitionRow]) -> InstanceReport {
    let mut report = InstanceReport {
        name: status.name.clone(),
        origin: status.origin.clone(),
        target: status.target.clone(),
        phase: status.phase.clone(),
        databases: status.databases.clone(),
        databases_why: status.databases_why.clone(),
        downtime_start_unix_ms: status.downtime_start_unix_ms,
        downtime_end_unix_ms: status.downtime_end_unix_ms,
        downtime_ms: if status.downtime_start_unix_ms > 0 && status.downtime_end_unix_ms > 0 {
            status.downtime_end_unix_ms - status.downtime_start_unix_ms
        } else {
            0
        },
        downtime_budget_secs: status.downtime_budget_secs,
        ..InstanceReport::default()
    };
    // Runs started by an action, by (step, attempt), until their event.
    let mut open: BTreeMap<(String, u32), usize> = BTreeMap::new();
    let mut rolled_back_at: Option<i64> = None;
    for row in rows {
        match report.phases.last_mut() {
            Some(last) if last.phase == row.phase => {}
            last => {
                if let Some(last) = last {
                    last.end_unix_ms = row.at_ms;
                }
                report.phases.push(PhaseSpan {
                    phase: row.phase.clone(),
                    start_unix_ms: row.at_ms,
                    end_unix_ms: 0,
                });
            }
        }
        if row.phase == "RollingBack" && rolled_back_at.is_none() {
            rolled_back_at = Some(row.at_ms);
        }
        if let Ok(event) = serde_json::from_str::<Event>(&row.event) {
            ended(&mut report, &mut open, row.at_ms, event);
        }
        let actions: Vec<Action> = serde_json::from_str(&row.actions).unwrap_or_default();
        for Action::Run { step, attempt } in actions {
            open.insert((step_name(step), attempt), report.steps.len());
            report.steps.push(StepRun {
                step: step_name(step),
                attempt,
                start_unix_ms: row.at_ms,
                outcome: "running".into(),
                ..StepRun::default()
            });
        }
    }
    report.steps.sort_by_key(|s| s.start_unix_ms);
    report.problems = problems(&report.steps, rolled_back_at, &report.phase);
    if report.downtime_ms > 0 {
        let (start, end) = (report.downtime_start_unix_ms, report.downtime_end_unix_ms);
        let mut last: BTreeMap<&str, &StepRun> = BTreeMap::new();
        for s in &report.steps {
            if s.outcome == "succeeded" && s.start_unix_ms >= start && s.end_unix_ms <= end {
                last.insert(s.step.as_str(), s);
            }
        }
        let mut split: Vec<StepShare> = last
            .values()
            .map(|s| StepShare {
                step: s.step.clone(),
                start_ms: s.start_unix_ms - start,
                ms: s.end_unix_ms - s.start_unix_ms,
            })
            .collect();
        split.sort_by_key(|s| (s.start_ms, s.step.clone()));
        report.downtime_split = split;
    }
    report
}

/// Closes the run `event` ends and keeps what it reports.
fn ended(
    report: &mut InstanceReport,
    open: &mut BTreeMap<(String, u32), usize>,
    at_ms: i64,
    event: Event,
) {
    match event {
        Event::Succeeded {
            step,
            attempt,
            stats,
            gate,
            mail_queue,
            evidence,
            elapsed_ms,
            ..
        } => {
            let Some(n) = open.remove(&(step_name(step), attempt)) else {
                return;
            };
            let run = &mut report.steps[n];
            run.end_unix_ms = at_ms;
            // The run began when the step began, not when it was asked (a retry's back-off).
            if elapsed_ms > 0 {
                run.start_unix_ms = at_ms - i64::try_from(elapsed_ms).unwrap_or(0);
            }
            run.outcome = "succeeded".into();
            if let Some(stats) = stats {
                run.files_changed = stats.files_changed;
                run.bytes_changed = stats.bytes_changed;
                run.rounds = stats.rounds;
                report.files_moved += stats.files_changed;
                report.bytes_moved += stats.bytes_changed;
            }
            run.detail = [gate.as_str(), mail_queue.as_str(), evidence.as_str()]
                .iter()
                .filter(|d| !d.is_empty())
                .copied()
                .collect::<Vec<_>>()
                .join("; ");
            match step {
                Step::Databases => report.database_gate = gate,
                Step::FinalPass | Step::Verify if !evidence.is_empty() => {
                    report.checks.push(evidence)
                }
                Step::PostMigration => report.post_migration = evidence,
                _ => {}
            }
        }
        Event::Failed {
            step,
            attempt,
            error,
            ..
        } => {
            if let Some(n) = open.remove(&(step_name(step), attempt)) {
                let run = &mut report.steps[n];
                run.end_unix_ms = at_ms;
                run.outcome = "failed".into();
                run.error = error;
            }
        }
        _ => {}
    }
}

/// Every failed run and its resolution: a later attempt of the same step that succeeded, the
/// rollback that followed, or nothing yet.
fn problems(steps: &[StepRun], rolled_back_at: Option<i64>, phase: &str) -> Vec<Problem> {
    steps
        .iter()
        .filter(|s| s.outcome == "failed")
        .map(|s| {
            let retried = steps
                .iter()
                .find(|r| r.step == s.step && r.attempt > s.attempt && r.outcome == "succeeded");
            let resolution = match (retried, rolled_back_at) {
                (Some(r), _) => format!("retried: attempt {} succeeded", r.attempt),
                (None, Some(at)) if at >= s.end_unix_ms => {
                    "rolled back: the origin serves again".to_string()
                }
                _ if phase == "Failed" => "open: the instance failed, an operator must look".into(),
                _ => "none recorded".into(),
            };
            Problem {
                at_unix_ms: s.end_unix_ms,
                step: s.step.clone(),
                attempt: s.attempt,
                error: s.error.clone(),
                resolution,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests;
