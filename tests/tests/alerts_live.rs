//! Every shipped alert rule returns series from a real Prometheus scraping a real orchestrator
//! whose fleet goes wrong in every way the rules watch for. The orchestrator is whole (Fleet
//! API over mutual TLS driven by the real bmctl, engine, SQLite, metrics, health checks of its
//! configured agents); only the migration steps are simulated agents, scripted to fail:
//!
//! - mail-hang: its databases step never answers, so it stays down past its window's end,
//!   over its downtime budget and over twice its projection, with its agents unreachable;
//! - mail-rollback: its databases step fails → rolled back;
//! - mail-failed: its post-migration fails after the target serves → failed;
//! - the two failures spend the failure budget (2);
//! - mail-churn: mail arrives as fast as passes copy it → not converging.
//!
//! The configured agents listen nowhere (closed loopback ports): their health checks fail.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bmfleet_orchestrator::config::OrchestratorConfig;
use bmfleet_orchestrator::machine::Step;
use bmfleet_orchestrator::sim::{Failure, Script, SimAgents};
use bmfleet_orchestrator::StepRunner;
use bmfleet_proto::identity::Role;
use bmfleet_tests::prometheus;
use bmfleet_tests::{
    binary, free_port, open_tempdir, serve_orchestrator_with, ChildGuard, TestPki,
};

const INSTANCES: [&str; 5] = [
    "mail-hang",
    "mail-rollback",
    "mail-failed",
    "mail-churn",
    "mail-ok",
];

/// A window open since two minutes ago that closes on a minute boundary at least 15 s away
/// (windows are minute-precise): "HH:MM" start and end in UTC, and the end's Unix time.
fn window_closing_soon() -> (String, String, i64) {
    let now = jiff::Timestamp::now();
    let minute = now.as_second().div_euclid(60) * 60;
    let mut end = minute + 60;
    if end - now.as_second() < 15 {
        end += 60;
    }
    let hhmm = |secs: i64| {
        let t = jiff::Timestamp::from_second(secs)
            .expect("time")
            .to_zoned(jiff::tz::TimeZone::UTC);
        format!("{:02}:{:02}", t.hour(), t.minute())
    };
    (hhmm(minute - 120), hhmm(end), end)
}

fn fleet_file(start: &str, end: &str) -> String {
    let mut text = format!(
        "[fleet]\nname = \"alerts\"\nnotify = [\"pager\"]\nmax_parallel_hot_syncs = 10\nmax_concurrent_downtime = 5\nmin_stagger_secs = 1\n\
         canary_count = 0\ncanary_approval = false\nfailure_budget = 2\nmax_passes = 3\ndowntime_budget_secs = 600\n\
         [fleet.rates]\nservices_secs = 1.0\n\
         [[fleet.windows]]\ndays = [\"mon\",\"tue\",\"wed\",\"thu\",\"fri\",\"sat\",\"sun\"]\nstart = \"{start}\"\nend = \"{end}\"\ntimezone = \"UTC\"\n"
    );
    for (i, name) in INSTANCES.iter().enumerate() {
        text += &format!(
            "\n[[instance]]\nname = \"{name}\"\norigin = \"origin-{i}\"\ntarget = \"target-{i}\"\nservice_ip = \"198.18.1.{}/24\"\nbluemind = \"5.x\"\nestimate = {{ files = 10000, changed_mib = 1.0, database_mib = 10.0 }}\n",
            10 + i
        );
        if *name == "mail-hang" {
            text += "downtime_budget_secs = 5\n";
        }
    }
    text
}

fn script() -> Script {
    let mut script = Script {
        step_ms: [
            Step::Preflight,
            Step::StopOrigin,
            Step::StopTarget,
            Step::Databases,
            Step::Config,
            Step::OriginReleaseIp,
            Step::TargetTakeIp,
            Step::StartTarget,
            Step::PostMigration,
            Step::Verify,
            Step::RollbackStopTarget,
            Step::RollbackTargetReleaseIp,
            Step::RollbackOriginTakeIp,
            Step::RollbackStartOrigin,
        ]
        .into_iter()
        .map(|s| (s, 100))
        .collect(),
        first_pass_files: 10_000,
        bytes_per_file: 1_000,
        scan_ms: 100,
        ms_per_file: 0.01,
        ..Script::default()
    };
    script.failures = HashMap::from([
        (("mail-hang".into(), Step::Databases), Failure::Hang),
        (("mail-rollback".into(), Step::Databases), Failure::Always),
        (("mail-failed".into(), Step::PostMigration), Failure::Always),
    ]);
    script.churning.insert("mail-churn".into());
    script
}

#[test]
fn every_alert_rule_returns_series_when_the_fleet_goes_wrong() {
    bmfleet_proto::install_crypto_provider();
    let dir = open_tempdir();
    let pki = TestPki::new();
    let orchestrator = pki.issue("orchestrator", Role::Orchestrator);
    let operator = pki.issue("operator", Role::Operator);
    let mut agents = String::new();
    for i in 0..INSTANCES.len() {
        for side in ["origin", "target"] {
            // A port that was free a moment ago: nothing listens there.
            agents += &format!(
                "[[agent]]\nname = \"{side}-{i}\"\naddress = \"127.0.0.1:{}\"\n",
                free_port()
            );
        }
    }
    let metrics = format!("127.0.0.1:{}", free_port());
    let config = OrchestratorConfig::parse(
        &format!(
            "listen = \"127.0.0.1:0\"\nmetrics_listen = \"{metrics}\"\nstate_db = \"{}\"\nhealth_interval_secs = 1\nrpc_timeout_secs = 1\n\
             [tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n{agents}\
             [[notify]]\nname = \"pager\"\ncommand = [\"/bin/false\"]\n",
            dir.path().join("state.db").display(),
            orchestrator.ca.display(),
            orchestrator.cert.display(),
            orchestrator.key.display()
        ),
        &dir.path().join("orchestrator.toml"),
    )
    .expect("orchestrator configuration");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let served = runtime.block_on(serve_orchestrator_with(
        config,
        StepRunner::Simulated(SimAgents::new(script())),
    ));

    let api = format!("127.0.0.1:{}", free_port());
    let prometheus_config = dir.path().join("prometheus.yml");
    std::fs::write(&prometheus_config, prometheus::config(&metrics, &[], 1)).expect("config");
    let _prometheus = ChildGuard::spawn(&mut prometheus::command(
        std::process::Command::new("prometheus"),
        &prometheus_config,
        dir.path(),
        &api,
    ));

    let (start, end, end_unix) = window_closing_soon();
    let fleet = dir.path().join("fleet.toml");
    std::fs::write(&fleet, fleet_file(&start, &end)).expect("fleet file");
    let bmctl = |args: &[&str]| {
        std::process::Command::new(binary("bmctl"))
            .args(args)
            .env("BMFLEET_ORCHESTRATOR", served.addr.to_string())
            .env("BMFLEET_CA", &operator.ca)
            .env("BMFLEET_CERT", &operator.cert)
            .env("BMFLEET_KEY", &operator.key)
            .output()
            .expect("bmctl")
    };
    let applied = bmctl(&["fleet", "apply", &fleet.display().to_string()]);
    assert!(
        applied.status.success(),
        "bmctl fleet apply: {}",
        String::from_utf8_lossy(&applied.stderr)
    );

    // Every rule's expression returns at least one series before the hung instance's window
    // has been over for long (it stays down: its step never answers).
    let deadline = Instant::now()
        + Duration::from_secs((end_unix - jiff::Timestamp::now().as_second()).max(0) as u64 + 60);
    let mut waiting = prometheus::alert_rules();
    assert_eq!(waiting.len(), 10, "{waiting:?}");
    while !waiting.is_empty() {
        waiting.retain(|(_, expr)| prometheus::query(&api, expr).map_or(true, |r| r.is_empty()));
        if waiting.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "these alert rules never returned a series: {waiting:?}\n{}\n{}",
            String::from_utf8_lossy(&bmctl(&["fleet", "status"]).stdout),
            String::from_utf8_lossy(&bmctl(&["fleet", "events", "--limit", "200"]).stdout)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // Each rule named the instance (or agent) that earned it.
    let names = |expr: &str, label: &str| -> Vec<String> {
        let mut v: Vec<String> = prometheus::query(&api, expr)
            .unwrap_or_default()
            .iter()
            .filter_map(|s| s["metric"][label].as_str().map(str::to_string))
            .collect();
        v.sort();
        v.dedup();
        v
    };
    let rules: HashMap<String, String> = prometheus::alert_rules().into_iter().collect();
    for (rule, label, expected) in [
        ("BmfleetDowntimeOverBudget", "server", vec!["mail-hang"]),
        (
            "BmfleetWindowRunningPastItsEnd",
            "server",
            vec!["mail-hang"],
        ),
        ("BmfleetDowntimeOverProjection", "server", vec!["mail-hang"]),
        ("BmfleetInstanceFailed", "server", vec!["mail-failed"]),
        ("BmfleetInstanceRolledBack", "server", vec!["mail-rollback"]),
        ("BmfleetNotConverging", "server", vec!["mail-churn"]),
        (
            "BmfleetAgentDownDuringWindow",
            "agent",
            vec!["origin-0", "target-0"],
        ),
    ] {
        assert_eq!(names(&rules[rule], label), expected, "{rule}");
    }
    drop(served);
    runtime.shutdown_timeout(Duration::from_secs(5));
}
