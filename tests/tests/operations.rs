//! Agent operations over real TLS: services run their configured commands in order, a
//! failing command is reported with its exit code and stderr, and a repeated operation id
//! never runs twice — not even across an agent restart.

use bmfleet_agent::config::AgentConfig;
use bmfleet_proto::identity::Role;
use bmfleet_proto::v1::agent_client::AgentClient;
use bmfleet_proto::v1::{ServiceAction, ServicesReply, ServicesRequest};
use bmfleet_tests::{agent_client, agent_config, serve_agent, stand_in_service, Served, TestPki};
use tonic::transport::Channel;

fn log_lines(path: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// An agent named origin-1 serving `config` on loopback, and the orchestrator's client of it.
async fn agent_and_client(pki: &TestPki, config: AgentConfig) -> (Served, AgentClient<Channel>) {
    let agent = serve_agent(config).await;
    let orch = pki.issue("orchestrator", Role::Orchestrator);
    let client = agent_client(
        &pki.ca_path(),
        Some(&orch),
        Role::Orchestrator,
        agent.addr,
        "origin-1",
    );
    (agent, client)
}

/// A services call that must get an answer.
async fn call(client: &mut AgentClient<Channel>, id: &str, action: ServiceAction) -> ServicesReply {
    client
        .services(request(id, action))
        .await
        .unwrap()
        .into_inner()
}

fn request(id: &str, action: ServiceAction) -> ServicesRequest {
    ServicesRequest {
        operation_id: id.to_string(),
        action: action.into(),
        wal_position: false,
    }
}

#[tokio::test]
async fn stop_runs_in_order_start_in_reverse_and_status_touches_all() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("services.log");
    let services = vec![
        stand_in_service("bluemind", &log, None),
        stand_in_service("postfix", &log, None),
    ];
    let config = agent_config(pki.issue("origin-1", Role::Agent), dir.path(), services);
    let (_agent, mut client) = agent_and_client(&pki, config).await;

    let stop = call(&mut client, "m1/stop/1", ServiceAction::Stop).await;
    assert!(stop.ok && !stop.replayed);
    let start = call(&mut client, "m1/start/1", ServiceAction::Start).await;
    assert!(start.ok);
    let status = call(&mut client, "", ServiceAction::Status).await;
    assert!(status.ok);
    assert_eq!(status.commands.len(), 2);
    assert_eq!(
        log_lines(&log),
        [
            "bluemind stop",
            "postfix stop",
            "postfix start",
            "bluemind start",
            "bluemind status",
            "postfix status"
        ]
    );
}

#[tokio::test]
async fn a_failing_stop_is_reported_with_exit_code_and_stderr_and_stops_there() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("services.log");
    let services = vec![
        stand_in_service("bluemind", &log, Some(3)),
        stand_in_service("postfix", &log, None),
    ];
    let config = agent_config(pki.issue("origin-1", Role::Agent), dir.path(), services);
    let (_agent, mut client) = agent_and_client(&pki, config).await;

    let reply = call(&mut client, "m1/stop/1", ServiceAction::Stop).await;
    assert!(!reply.ok);
    assert_eq!(
        reply.commands.len(),
        1,
        "postfix must not be stopped after bluemind failed"
    );
    let failed = &reply.commands[0];
    assert_eq!(failed.service, "bluemind");
    assert_eq!(failed.exit_code, 3);
    assert_eq!(failed.stderr_tail, "bluemind cannot stop\n");
    assert_eq!(log_lines(&log), ["bluemind stop"]);
}

#[tokio::test]
async fn a_repeated_operation_id_does_not_run_twice_even_after_a_restart() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("services.log");
    let services = vec![stand_in_service("bluemind", &log, None)];
    let agent_files = pki.issue("origin-1", Role::Agent);

    let config = agent_config(agent_files.clone(), dir.path(), services.clone());
    let (agent, mut client) = agent_and_client(&pki, config).await;
    let first = call(&mut client, "m1/stop/1", ServiceAction::Stop).await;
    let again = call(&mut client, "m1/stop/1", ServiceAction::Stop).await;
    assert!(!first.replayed);
    assert!(again.replayed);
    assert_eq!(again.commands, first.commands);
    assert_eq!(log_lines(&log), ["bluemind stop"]);
    agent.stop().await;

    // A new agent process on the same state dir remembers the operation.
    let config = agent_config(agent_files, dir.path(), services);
    let (_agent, mut client) = agent_and_client(&pki, config).await;
    let after_restart = call(&mut client, "m1/stop/1", ServiceAction::Stop).await;
    assert!(after_restart.replayed);
    assert_eq!(after_restart.commands, first.commands);
    assert_eq!(log_lines(&log), ["bluemind stop"]);

    // A new id runs; the same id for another action is refused, not run.
    client
        .services(request("m1/stop/2", ServiceAction::Stop))
        .await
        .unwrap();
    let conflict = client
        .services(request("m1/stop/2", ServiceAction::Start))
        .await
        .unwrap_err();
    assert_eq!(conflict.code(), tonic::Code::AlreadyExists);
    assert_eq!(log_lines(&log), ["bluemind stop", "bluemind stop"]);
}

#[tokio::test]
async fn mutating_calls_without_an_operation_id_are_refused() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("services.log");
    let config = agent_config(
        pki.issue("origin-1", Role::Agent),
        dir.path(),
        vec![stand_in_service("bluemind", &log, None)],
    );
    let (_agent, mut client) = agent_and_client(&pki, config).await;
    let err = client
        .services(request("", ServiceAction::Stop))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("operation_id"), "{}", err.message());
    assert!(!log.exists());
}

/// One sample's value from a classic-format scrape (None when absent).
fn sample(scrape: &str, series: &str) -> Option<f64> {
    scrape
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

#[tokio::test]
async fn the_agent_counts_its_operations_in_its_own_metrics() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("services.log");
    let mut config = agent_config(
        pki.issue("origin-1", Role::Agent),
        dir.path(),
        vec![stand_in_service("bluemind", &log, Some(3))],
    );
    let metrics = format!("127.0.0.1:{}", bmfleet_tests::free_port());
    config.metrics_listen = Some(metrics.parse().unwrap());
    let (_agent, mut client) = agent_and_client(&pki, config).await;
    // Ran and succeeded; ran and failed (the stop command exits 3); answered from the journal;
    // refused (an id reused for another request).
    let start = call(&mut client, "m1/start/1", ServiceAction::Start).await;
    assert!(start.ok);
    let stop = call(&mut client, "m1/stop/1", ServiceAction::Stop).await;
    assert!(!stop.ok);
    let again = call(&mut client, "m1/start/1", ServiceAction::Start).await;
    assert!(again.replayed);
    assert!(client
        .services(request("m1/start/1", ServiceAction::Stop))
        .await
        .is_err());

    let url = format!("http://{metrics}/metrics");
    let scrape =
        tokio::task::spawn_blocking(move || ureq::get(&url).call().unwrap().into_string().unwrap())
            .await
            .unwrap();
    for (series, value) in [
        (
            r#"bmfleet_agent_operations_total{kind="services",outcome="ok"}"#,
            1.0,
        ),
        (
            r#"bmfleet_agent_operations_total{kind="services",outcome="failed"}"#,
            1.0,
        ),
        (
            r#"bmfleet_agent_operations_total{kind="services",outcome="replayed"}"#,
            1.0,
        ),
        (
            r#"bmfleet_agent_operations_total{kind="services",outcome="refused"}"#,
            1.0,
        ),
        (
            r#"bmfleet_agent_operation_duration_seconds_count{kind="services"}"#,
            2.0,
        ),
        (
            r#"bmfleet_agent_operations_in_flight{kind="services"}"#,
            0.0,
        ),
        ("bmfleet_agent_pulled_bytes_total", 0.0),
    ] {
        assert_eq!(
            sample(&scrape, series),
            Some(value),
            "{series} in:\n{scrape}"
        );
    }
    // The scrape passes Prometheus's own linter.
    let file = dir.path().join("scrape.prom");
    std::fs::write(&file, &scrape).unwrap();
    let out = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::fs::File::open(&file).unwrap())
        .output()
        .expect("promtool (deploy/setup.sh installs prometheus)");
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The origin's stop position in a databases move is a hint: the same operation re-sent
/// without it (by an orchestrator restarted since, which no longer has it) is answered as the
/// same operation, not refused as another one; a different move under the id still is.
#[tokio::test]
async fn a_databases_move_resent_without_the_stop_position_is_the_same_operation() {
    use bmfleet_proto::v1::{MoveDatabasesRequest, OriginEndpoint, WalPosition};
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let config = agent_config(pki.issue("origin-1", Role::Agent), dir.path(), Vec::new());
    let (_agent, mut client) = agent_and_client(&pki, config).await;
    let request = |hint: Option<WalPosition>, promote: bool| MoveDatabasesRequest {
        operation_id: "m1/mail-01/databases/1".into(),
        origin: Some(OriginEndpoint {
            address: "127.0.0.1:9".into(),
            name: "origin-2".into(),
            grant_id: "g1".into(),
        }),
        promote,
        origin_wal_position: hint,
        ..Default::default()
    };
    let hint = WalPosition {
        lsn: "0/3000148".into(),
        segment_size: 16 << 20,
    };
    let first = client
        .move_databases(request(Some(hint), true))
        .await
        .unwrap()
        .into_inner();
    assert!(!first.ok, "this host follows nothing: {first:?}");
    let again = client
        .move_databases(request(None, true))
        .await
        .unwrap()
        .into_inner();
    assert!(again.replayed, "{again:?}");
    assert_eq!(again.error, first.error);
    let other = client
        .move_databases(request(None, false))
        .await
        .unwrap_err();
    assert_eq!(other.code(), tonic::Code::AlreadyExists);
}

/// Whether the origin's queue was empty at its stop is a hint too: a config copy re-sent
/// without it is the same operation; another copy under the id is refused.
#[tokio::test]
async fn a_config_copy_resent_without_the_queue_hint_is_the_same_operation() {
    use bmfleet_proto::v1::{CopyConfigRequest, OriginEndpoint};
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let config = agent_config(pki.issue("origin-1", Role::Agent), dir.path(), Vec::new());
    let (_agent, mut client) = agent_and_client(&pki, config).await;
    let request = |queue_empty: bool, grant: &str| CopyConfigRequest {
        operation_id: "m1/mail-01/config/1".into(),
        origin: Some(OriginEndpoint {
            address: "127.0.0.1:9".into(),
            name: "origin-2".into(),
            grant_id: grant.into(),
        }),
        origin_queue_empty: queue_empty,
        ..Default::default()
    };
    let first = client
        .copy_config(request(true, "g1"))
        .await
        .unwrap()
        .into_inner();
    assert!(!first.ok, "no origin answers: {first:?}");
    let again = client
        .copy_config(request(false, "g1"))
        .await
        .unwrap()
        .into_inner();
    assert!(again.replayed, "{again:?}");
    assert_eq!(again.error, first.error);
    let other = client.copy_config(request(false, "g2")).await.unwrap_err();
    assert_eq!(other.code(), tonic::Code::AlreadyExists);
}
