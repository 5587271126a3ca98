//! Agent operations over real TLS: services run their configured commands in order, a
//! failing command is reported with its exit code and stderr, and a repeated operation id
//! never runs twice — not even across an agent restart.

use bmfleet_proto::identity::Role;
use bmfleet_proto::v1::{ServiceAction, ServicesRequest};
use bmfleet_tests::{agent_client, agent_config, serve_agent, stand_in_service, TestPki};

fn log_lines(path: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

fn request(id: &str, action: ServiceAction) -> ServicesRequest {
    ServicesRequest {
        operation_id: id.to_string(),
        action: action.into(),
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
    let agent = serve_agent(config).await;
    let orch = pki.issue("orchestrator", Role::Orchestrator);
    let mut client = agent_client(
        &pki.ca_path(),
        Some(&orch),
        Role::Orchestrator,
        agent.addr,
        "origin-1",
    );

    let stop = client
        .services(request("m1/stop/1", ServiceAction::Stop))
        .await
        .unwrap()
        .into_inner();
    assert!(stop.ok && !stop.replayed);
    let start = client
        .services(request("m1/start/1", ServiceAction::Start))
        .await
        .unwrap()
        .into_inner();
    assert!(start.ok);
    let status = client
        .services(request("", ServiceAction::Status))
        .await
        .unwrap()
        .into_inner();
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
    let agent = serve_agent(config).await;
    let orch = pki.issue("orchestrator", Role::Orchestrator);
    let mut client = agent_client(
        &pki.ca_path(),
        Some(&orch),
        Role::Orchestrator,
        agent.addr,
        "origin-1",
    );

    let reply = client
        .services(request("m1/stop/1", ServiceAction::Stop))
        .await
        .unwrap()
        .into_inner();
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
    let orch = pki.issue("orchestrator", Role::Orchestrator);

    let config = agent_config(agent_files.clone(), dir.path(), services.clone());
    let agent = serve_agent(config).await;
    let mut client = agent_client(
        &pki.ca_path(),
        Some(&orch),
        Role::Orchestrator,
        agent.addr,
        "origin-1",
    );
    let first = client
        .services(request("m1/stop/1", ServiceAction::Stop))
        .await
        .unwrap()
        .into_inner();
    let again = client
        .services(request("m1/stop/1", ServiceAction::Stop))
        .await
        .unwrap()
        .into_inner();
    assert!(!first.replayed);
    assert!(again.replayed);
    assert_eq!(again.commands, first.commands);
    assert_eq!(log_lines(&log), ["bluemind stop"]);
    agent.stop().await;

    // A new agent process on the same state dir remembers the operation.
    let config = agent_config(agent_files, dir.path(), services);
    let agent = serve_agent(config).await;
    let mut client = agent_client(
        &pki.ca_path(),
        Some(&orch),
        Role::Orchestrator,
        agent.addr,
        "origin-1",
    );
    let after_restart = client
        .services(request("m1/stop/1", ServiceAction::Stop))
        .await
        .unwrap()
        .into_inner();
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
    let agent = serve_agent(config).await;
    let orch = pki.issue("orchestrator", Role::Orchestrator);
    let mut client = agent_client(
        &pki.ca_path(),
        Some(&orch),
        Role::Orchestrator,
        agent.addr,
        "origin-1",
    );
    let err = client
        .services(request("", ServiceAction::Stop))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("operation_id"), "{}", err.message());
    assert!(!log.exists());
}
