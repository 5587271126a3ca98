//! A real Prometheus scrapes the orchestrator during a real lab migration; every expression of
//! the Grafana dashboard returns series, every metric the alert rules use exists, and the
//! downtime Prometheus saw matches the orchestrator's own record within the scrape interval.

use std::path::Path;
use std::time::{Duration, Instant};

use bmfleet_tests::lab_fleet::{LabFleet, LabParams};

const SCRAPE_SECS: u64 = 1;

/// The series `expr` returns now, or why Prometheus did not answer.
fn try_query(fleet: &LabFleet, expr: &str) -> Result<Vec<serde_json::Value>, String> {
    let expr = expr.to_string();
    fleet.lab.run_in("orch", move || {
        let answer: serde_json::Value = ureq::get("http://127.0.0.1:9090/api/v1/query")
            .query("query", &expr)
            .call()
            .map_err(|e| format!("{expr}: {e}"))?
            .into_json()
            .map_err(|e| format!("{expr}: {e}"))?;
        if answer["status"] != "success" {
            return Err(format!("{expr}: {answer}"));
        }
        Ok(answer["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    })
}

fn query(fleet: &LabFleet, expr: &str) -> Vec<serde_json::Value> {
    try_query(fleet, expr).unwrap_or_else(|e| panic!("{e}"))
}

/// Every `expr` in the dashboard (panels' targets and annotations).
fn dashboard_expressions() -> Vec<String> {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana/bmfleet-dashboard.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut out = Vec::new();
    fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(map) => {
                for (k, v) in map {
                    match (k.as_str(), v) {
                        ("expr", serde_json::Value::String(e)) => out.push(e.clone()),
                        _ => walk(v, out),
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter().for_each(|i| walk(i, out)),
            _ => {}
        }
    }
    walk(&dashboard, &mut out);
    out
}

/// Every alert rule's expression.
fn alert_expressions() -> Vec<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/prometheus/alerts.yml");
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter_map(|l| l.trim().strip_prefix("expr:"))
        .map(|e| e.trim().to_string())
        .collect()
}

/// Every `bmfleet_…` metric name an alert rule uses.
fn alert_metrics() -> Vec<String> {
    let mut names: Vec<String> = alert_expressions()
        .iter()
        .flat_map(|e| {
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
    let fleet = LabFleet::build(LabParams {
        pairs: 2,
        ..LabParams::default()
    });
    let config = fleet.dir().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: {SCRAPE_SECS}s\n  evaluation_interval: {SCRAPE_SECS}s\nscrape_configs:\n  - job_name: bmfleet\n    static_configs:\n      - targets: [\"127.0.0.1:9464\"]\n"
        ),
    )
    .unwrap();
    let mut prometheus = fleet.lab.command("orch", "prometheus");
    prometheus
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            fleet.dir().join("tsdb").display()
        ))
        .arg("--web.listen-address=127.0.0.1:9090")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(fleet.dir().join("prometheus.log")).unwrap());
    fleet.lab.spawn(prometheus);

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
    let outcomes = fleet.migrate(Duration::from_secs(300), |_| {}).unwrap();
    assert!(outcomes.iter().all(|o| o.phase == "Done"), "{outcomes:?}");
    // Let Prometheus scrape the final state.
    std::thread::sleep(Duration::from_secs(3 * SCRAPE_SECS));

    for expr in dashboard_expressions() {
        let deadline = Instant::now() + Duration::from_secs(10);
        while query(&fleet, &expr).is_empty() {
            assert!(
                Instant::now() < deadline,
                "the dashboard expression returns no series: {expr}"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    // Alert expressions are valid against live data (they fire in alerts_test.yml; a clean
    // migration fires none, so they may return nothing here) …
    for expr in alert_expressions() {
        try_query(&fleet, &expr).unwrap_or_else(|e| panic!("alert expression refused: {e}"));
    }
    // … and every metric they use exists.
    for name in alert_metrics() {
        assert!(
            !query(&fleet, &name).is_empty(),
            "the alert rules use {name}, which Prometheus never saw"
        );
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
        let seen_secs = steps * SCRAPE_SECS as f64;
        assert!(
            (seen_secs - o.downtime_seconds).abs() <= 2.0 * SCRAPE_SECS as f64,
            "{}: Prometheus saw {seen_secs}s down, the orchestrator recorded {}s",
            o.name,
            o.downtime_seconds
        );
    }
}
