use super::*;
use crate::machine::PassStats;

fn row(id: i64, at_ms: i64, event: &Event, phase: &str, runs: &[(Step, u32)]) -> TransitionRow {
    let actions: Vec<Action> = runs
        .iter()
        .map(|&(step, attempt)| Action::Run { step, attempt })
        .collect();
    TransitionRow {
        id,
        at_ms,
        instance: "mail-1".into(),
        event: serde_json::to_string(event).unwrap(),
        phase: phase.into(),
        actions: serde_json::to_string(&actions).unwrap(),
    }
}

fn ok(step: Step, attempt: u32, elapsed_ms: u64) -> Event {
    with(step, attempt, elapsed_ms, None, "", "")
}

fn with(
    step: Step,
    attempt: u32,
    elapsed_ms: u64,
    stats: Option<PassStats>,
    gate: &str,
    evidence: &str,
) -> Event {
    Event::Succeeded {
        step,
        attempt,
        stats,
        databases: None,
        gate: gate.into(),
        mail_queue: String::new(),
        evidence: evidence.into(),
        elapsed_ms,
    }
}

fn status() -> InstanceStatus {
    InstanceStatus {
        name: "mail-1".into(),
        origin: "origin-1".into(),
        target: "target-1".into(),
        phase: "Done".into(),
        databases: "standby".into(),
        downtime_start_unix_ms: 10_000,
        downtime_end_unix_ms: 10_400,
        downtime_budget_secs: 1,
        ..InstanceStatus::default()
    }
}

/// A migration with a hot pass that failed once, its downtime, and its checks.
fn history() -> Vec<TransitionRow> {
    let stats = PassStats {
        files_changed: 5_000,
        bytes_changed: 70_000_000,
        ..PassStats::default()
    };
    let pass = with(Step::HotPass, 2, 3_000, Some(stats), "", "");
    let gate = with(
        Step::Databases,
        1,
        250,
        None,
        "0 blocks of 5 tables compared",
        "",
    );
    let checked = |step, evidence: &str, elapsed| with(step, 1, elapsed, None, "", evidence);
    let failed = Event::Failed {
        step: Step::HotPass,
        attempt: 1,
        error: "origin-1: connection refused".into(),
        permanent: false,
    };
    vec![
        row(1, 1_000, &Event::Tick, "HotSync", &[(Step::HotPass, 1)]),
        row(2, 2_000, &failed, "HotSync", &[(Step::HotPass, 2)]),
        row(3, 9_000, &pass, "Converged", &[]),
        row(
            4,
            9_500,
            &Event::Tick,
            "PreWindowPass",
            &[(Step::PreWindowPass, 1)],
        ),
        row(
            5,
            10_000,
            &ok(Step::PreWindowPass, 1, 500),
            "ColdSync",
            &[(Step::StopOrigin, 1), (Step::StopTarget, 1)],
        ),
        row(6, 10_030, &ok(Step::StopTarget, 1, 20), "ColdSync", &[]),
        row(
            7,
            10_040,
            &ok(Step::StopOrigin, 1, 40),
            "ColdSync",
            &[(Step::FinalPass, 1), (Step::Databases, 1)],
        ),
        row(
            8,
            10_200,
            &checked(Step::FinalPass, "42 paths verified", 160),
            "ColdSync",
            &[],
        ),
        row(9, 10_290, &gate, "Cutover", &[(Step::TargetTakeIp, 1)]),
        row(
            10,
            10_300,
            &ok(Step::TargetTakeIp, 1, 10),
            "StartServices",
            &[(Step::StartTarget, 1)],
        ),
        row(
            11,
            10_400,
            &ok(Step::StartTarget, 1, 100),
            "PostMigration",
            &[(Step::PostMigration, 1)],
        ),
        row(
            12,
            12_000,
            &checked(Step::PostMigration, "POST /api/x: task 7 Success", 1_600),
            "Verify",
            &[(Step::Verify, 1)],
        ),
        row(
            13,
            12_100,
            &checked(Step::Verify, "the service IP is on target-1", 100),
            "Done",
            &[],
        ),
    ]
}

#[test]
fn an_instance_report_holds_its_steps_downtime_split_and_evidence() {
    let report = build("m", "orch", 20_000, &[status()], &history(), &[]);
    let i = &report.instances[0];
    assert_eq!(i.downtime_ms, 400);
    let split: Vec<(&str, i64, i64)> = i
        .downtime_split
        .iter()
        .map(|s| (s.step.as_str(), s.start_ms, s.ms))
        .collect();
    assert_eq!(
        split,
        [
            ("stop-origin", 0, 40),
            ("stop-target", 10, 20),
            ("databases", 40, 250),
            ("final-pass", 40, 160),
            ("target-take-ip", 290, 10),
            ("start-target", 300, 100),
        ]
    );
    assert_eq!(i.database_gate, "0 blocks of 5 tables compared");
    assert_eq!(
        i.checks,
        ["42 paths verified", "the service IP is on target-1"]
    );
    assert_eq!(i.post_migration, "POST /api/x: task 7 Success");
    assert_eq!((i.files_moved, i.bytes_moved), (5_000, 70_000_000));
    let phases: Vec<&str> = i.phases.iter().map(|p| p.phase.as_str()).collect();
    assert_eq!(
        phases,
        [
            "HotSync",
            "Converged",
            "PreWindowPass",
            "ColdSync",
            "Cutover",
            "StartServices",
            "PostMigration",
            "Verify",
            "Done"
        ]
    );
    assert_eq!(i.phases[0].end_unix_ms, 9_000);
    assert_eq!(i.phases.last().unwrap().end_unix_ms, 0);
    // The retried pass: its run began when the step began, after the back-off.
    let hot: Vec<(u32, &str, i64, i64)> = i
        .steps
        .iter()
        .filter(|s| s.step == "hot-pass")
        .map(|s| {
            (
                s.attempt,
                s.outcome.as_str(),
                s.start_unix_ms,
                s.end_unix_ms,
            )
        })
        .collect();
    assert_eq!(
        hot,
        [(1, "failed", 1_000, 2_000), (2, "succeeded", 6_000, 9_000)]
    );
    assert_eq!(i.problems.len(), 1);
    assert_eq!(i.problems[0].error, "origin-1: connection refused");
    assert_eq!(i.problems[0].resolution, "retried: attempt 2 succeeded");
    assert_eq!(report.totals.done, 1);
    assert_eq!(report.totals.over_budget, 0);
    assert_eq!(report.totals.longest_downtime_ms, 400);
}

#[test]
fn a_failure_before_a_rollback_is_resolved_by_it_and_budgets_are_counted() {
    let mut rows = history();
    rows.truncate(7);
    let failed = Event::Failed {
        step: Step::Databases,
        attempt: 1,
        error: "the gate found 3 blocks that differ".into(),
        permanent: true,
    };
    rows.push(row(8, 10_500, &failed, "RollingBack", &[]));
    rows.push(row(9, 11_000, &Event::Tick, "RolledBack", &[]));
    let mut s = status();
    s.phase = "RolledBack".into();
    s.downtime_end_unix_ms = 12_000;
    let report = build("m", "orch", 20_000, &[s], &rows, &[]);
    let i = &report.instances[0];
    let last = i.problems.last().unwrap();
    assert_eq!(last.step, "databases");
    assert_eq!(last.resolution, "rolled back: the origin serves again");
    assert_eq!(report.totals.rolled_back, 1);
    assert_eq!(report.totals.over_budget, 1, "2 s against a 1 s budget");
}

#[test]
fn operator_acts_are_the_audits_mutating_calls_for_the_instance_or_the_fleet() {
    let entry = |id, method: &str, arguments: &str| AuditEntry {
        id,
        at_unix_ms: id * 1000,
        who: "alice".into(),
        role: "operator".into(),
        method: method.into(),
        arguments: arguments.into(),
        outcome: "ok".into(),
        detail: String::new(),
    };
    let audit = [
        entry(
            1,
            "Apply",
            r#"{"file":"fleet.toml","bytes":10,"remigrate":[]}"#,
        ),
        entry(2, "Status", "{}"),
        entry(3, "Pause", r#"{"instance":"mail-1","all":false}"#),
        entry(4, "Pause", r#"{"instance":"mail-2","all":false}"#),
        entry(5, "Resume", r#"{"instance":"","all":true}"#),
        entry(6, "Approve", "{}"),
        entry(7, "Abort", r#"{"instance":"mail-1","all":false}"#),
    ];
    let report = build("m", "orch", 0, &[status()], &history(), &audit);
    let mine: Vec<(&str, i64)> = report.instances[0]
        .operator_acts
        .iter()
        .map(|a| (a.method.as_str(), a.at_unix_ms))
        .collect();
    assert_eq!(mine, [("Pause", 3_000), ("Abort", 7_000)]);
    assert_eq!(report.instances[0].operator_acts[0].who, "alice (operator)");
    let fleet: Vec<&str> = report
        .fleet_acts
        .iter()
        .map(|a| a.method.as_str())
        .collect();
    assert_eq!(fleet, ["Apply", "Resume", "Approve"]);
}
