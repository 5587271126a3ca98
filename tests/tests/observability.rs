//! A real Prometheus scrapes the orchestrator during a real lab migration; every expression of
//! the Grafana dashboard returns series, every metric the alert rules use exists, and the
//! downtime Prometheus saw matches the orchestrator's own record within the scrape interval.
//! (That every alert rule returns series when things go wrong: `alerts_live.rs`.)

use std::time::{Duration, Instant};

use bmfleet_tests::lab_fleet::{LabFleet, LabParams};
use bmfleet_tests::prometheus;

const SCRAPE_SECS: u64 = 1;

/// The series `expr` returns now, or why Prometheus did not answer.
fn try_query(fleet: &LabFleet, expr: &str) -> Result<Vec<serde_json::Value>, String> {
    fleet
        .lab
        .run_in("orch", || prometheus::query("127.0.0.1:9090", expr))
}

/// Now, Unix seconds.
fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn query(fleet: &LabFleet, expr: &str) -> Vec<serde_json::Value> {
    try_query(fleet, expr).unwrap_or_else(|e| panic!("{e}"))
}

/// Every `bmfleet_…` metric name an alert rule uses.
fn alert_metrics() -> Vec<String> {
    let mut names: Vec<String> = prometheus::alert_rules()
        .iter()
        .flat_map(|(_, e)| {
            e.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|w| w.starts_with("bmfleet_"))
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect();
    names.sort();
    names.dedup();
    names
}

#[test]
fn prometheus_sees_the_migration_the_dashboard_and_the_alerts_need() {
    // Databases big enough that a downtime usually spans scrapes (a window shorter than the
    // scrape interval can fall between two and never show in `bmfleet_instance_down`: the
    // window counters below show it all the same).
    let fleet = LabFleet::build(LabParams {
        pairs: 2,
        db_rows: 100_000,
        ..LabParams::default()
    });
    let config = fleet.dir().join("prometheus.yml");
    let agents: Vec<String> = fleet
        .lab
        .hosts()
        .iter()
        .filter(|h| h.name != "orch")
        .map(|h| format!("{}:9465", h.ip))
        .collect();
    std::fs::write(
        &config,
        prometheus::config("127.0.0.1:9464", &agents, SCRAPE_SECS),
    )
    .unwrap();
    fleet.lab.spawn(prometheus::command(
        fleet.lab.command("orch", "prometheus"),
        &config,
        fleet.dir(),
        "127.0.0.1:9090",
    ));

    // Prometheus is up and has scraped the orchestrator before the fleet is applied.
    fleet.wait_for_orchestrator().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if try_query(&fleet, "up{job=\"bmfleet\"} == 1").is_ok_and(|r| !r.is_empty()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus never scraped the orchestrator"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let start = unix_now();
    let outcomes = fleet.migrate(Duration::from_secs(300), |_| {}).unwrap();
    assert!(outcomes.iter().all(|o| o.phase == "Done"), "{outcomes:?}");
    // Let Prometheus scrape the final state.
    std::thread::sleep(Duration::from_secs(3 * SCRAPE_SECS));

    // Every dashboard expression shows something over the migration, as Grafana draws it.
    for expr in prometheus::dashboard_expressions() {
        let deadline = Instant::now() + Duration::from_secs(10);
        while fleet
            .lab
            .run_in("orch", || {
                prometheus::query_range("127.0.0.1:9090", &expr, start, unix_now(), SCRAPE_SECS)
            })
            .unwrap_or_else(|e| panic!("{e}"))
            .is_empty()
        {
            assert!(
                Instant::now() < deadline,
                "the dashboard expression returns no series over the migration: {expr}"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    // Every window opened and closed once, however short it was between two scrapes.
    for o in &outcomes {
        for event in ["opened", "closed"] {
            let expr = format!(
                "bmfleet_instance_windows_total{{server=\"{}\",event=\"{event}\"}}",
                o.name
            );
            let value = query(&fleet, &expr)
                .first()
                .and_then(|s| s["value"][1].as_str().map(str::to_string));
            assert_eq!(value.as_deref(), Some("1"), "{expr}");
        }
    }
    // Alert expressions are valid against live data (a clean migration fires none: they
    // fire in alerts_test.yml and alerts_live.rs) …
    for (_, expr) in prometheus::alert_rules() {
        try_query(&fleet, &expr).unwrap_or_else(|e| panic!("alert expression refused: {e}"));
    }
    // … and every metric they use exists.
    for name in alert_metrics() {
        assert!(
            !query(&fleet, &name).is_empty(),
            "the alert rules use {name}, which Prometheus never saw"
        );
    }
    // The agents' own metrics: every target pulled data, every origin served its tunnel.
    for (expr, hosts) in [
        ("bmfleet_agent_pulled_bytes_total > 0", "target"),
        (
            "bmfleet_agent_tunnel_requests_total{request=\"rsync\",outcome=\"served\"} > 0",
            "origin",
        ),
    ] {
        let expected: Vec<String> = fleet
            .lab
            .hosts()
            .iter()
            .filter(|h| h.name.starts_with(hosts))
            .map(|h| format!("{}:9465", h.ip))
            .collect();
        let mut seen: Vec<String> = query(&fleet, expr)
            .iter()
            .filter_map(|s| s["metric"]["instance"].as_str().map(str::to_string))
            .collect();
        seen.sort();
        assert_eq!(seen, expected, "{expr}");
    }
    // Downtime: the seconds Prometheus saw an instance down vs the orchestrator's record.
    for o in &outcomes {
        let seen = query(
            &fleet,
            &format!("count_over_time((bmfleet_instance_down{{server=\"{}\"}} == 1)[15m:{SCRAPE_SECS}s])", o.name),
        );
        let steps: f64 = seen
            .first()
            .and_then(|s| s["value"][1].as_str())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        // Sampling every interval, a window of d seconds is seen in ⌊d/T⌋ or ⌈d/T⌉ samples.
        let seen_secs = steps * SCRAPE_SECS as f64;
        assert!(
            (seen_secs - o.downtime_seconds).abs() <= SCRAPE_SECS as f64,
            "{}: Prometheus saw {seen_secs}s down, the orchestrator recorded {}s",
            o.name,
            o.downtime_seconds
        );
        // The window's length as the orchestrator published it.
        let published = query(
            &fleet,
            &format!(
                "max_over_time(bmfleet_instance_downtime_seconds{{server=\"{}\"}}[15m])",
                o.name
            ),
        );
        let published: f64 = published
            .first()
            .and_then(|s| s["value"][1].as_str())
            .and_then(|v| v.parse().ok())
            .unwrap_or(-1.0);
        assert!(
            (published - o.downtime_seconds).abs() < 0.01,
            "{}: Prometheus holds a {published}s window, the orchestrator recorded {}s",
            o.name,
            o.downtime_seconds
        );
    }
}
