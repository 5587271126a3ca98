//! A short, fixed-seed chaos campaign on the real mail stack: two pairs migrate while mail
//! flows and clients act, the orchestrator and agents are killed, a link slowed, a target's
//! disk filled, a cold sync outlives its window and its budget, a pair is cut off; every
//! invariant of the campaign must hold, alerts and every message included (the harness of
//! `bmfleet-lab chaos` cannot rot).

use bmfleet_tests::chaos::{run, ChaosParams};

#[test]
fn a_short_chaos_campaign_keeps_every_invariant() {
    let params = ChaosParams {
        pairs: 2,
        seed: 20265554,
        faults: 8,
        messages: 3000,
        max_partition_secs: 4,
        max_gap_ms: 1500,
        stagger_secs: 8,
        deadline_secs: 600,
        ..Default::default()
    };
    let report = run(params, |line| eprintln!("{line}"));
    let table = report.table(params.seed);
    eprintln!("{table}");
    assert!(report.violations.is_empty(), "{table}");
    assert!(report.samples > 50, "{table}");
    assert_eq!(report.phases.values().sum::<usize>(), 2, "{table}");
    assert!(report.faults.len() >= 3, "{table}");
    // The real mail stack ran all through it: every message counted where it is served.
    let mail = report.mail.expect("the campaign counted the mail");
    assert!(
        mail.sent > 0 && mail.delivered > 0 && (mail.lost, mail.duplicated) == (0, 0),
        "{table}"
    );
    // The seed's schedule starts with a slow link and a full disk (then a window closing, a
    // PostgreSQL crash, kills and partitions: a fault that finds nothing to act on, such as
    // no cold sync within 30 s for the window, is skipped, which shifts the rest).
    for kind in ["slow link", "target disk full"] {
        assert!(
            report.faults.iter().any(|f| f.kind == kind),
            "{kind}: {table}"
        );
    }
    // The alerts: each rule checked (a missing or a spurious one is a violation above), and
    // the window that closed during a cold sync raised both for its instance.
    let raised: Vec<&str> = report.alerts.keys().copied().collect();
    assert_eq!(
        raised,
        [
            "BmfleetDowntimeOverBudget",
            "BmfleetWindowRunningPastItsEnd"
        ],
        "{table}"
    );
    if let Some(cut) = report
        .faults
        .iter()
        .find(|f| f.kind == "window closes during a cold sync")
    {
        for (alert, (needed, seen)) in &report.alerts {
            assert!(
                needed.contains(&cut.target) && seen.contains(&cut.target),
                "{alert} for {}: {table}",
                cut.target
            );
        }
    }
}
