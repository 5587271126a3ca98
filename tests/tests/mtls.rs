//! Mutual TLS over real loopback sockets: who may talk to whom, and what a refused peer is told.

use bmfleet_proto::error_chain::describe_status;
use bmfleet_proto::identity::Role;
use bmfleet_proto::tls::{connect, LocalIdentity, TlsFiles};
use bmfleet_proto::v1::agent_client::AgentClient;
use bmfleet_proto::v1::fleet_client::FleetClient;
use bmfleet_proto::v1::{FactsRequest, StatusRequest};
use bmfleet_tests::{agent_client, agent_config, serve_agent, serve_orchestrator, TestPki};
use std::time::Duration;

async fn facts_error(
    client: &mut bmfleet_proto::v1::agent_client::AgentClient<tonic::transport::Channel>,
) -> String {
    let status = client
        .facts(FactsRequest::default())
        .await
        .expect_err("the call must be refused");
    describe_status(&status)
}

struct Fixture {
    pki: TestPki,
    _dir: tempfile::TempDir,
    agent: bmfleet_tests::Served,
}

async fn agent_named(name: &str) -> Fixture {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let config = agent_config(pki.issue(name, Role::Agent), dir.path(), vec![]);
    let agent = serve_agent(config).await;
    Fixture {
        pki,
        _dir: dir,
        agent,
    }
}

#[tokio::test]
async fn agent_answers_the_orchestrator() {
    let f = agent_named("origin-1").await;
    let orch = f.pki.issue("orchestrator", Role::Orchestrator);
    let mut client = agent_client(
        &f.pki.ca_path(),
        Some(&orch),
        Role::Orchestrator,
        f.agent.addr,
        "origin-1",
    );
    let facts = client
        .facts(FactsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(facts.agent_name, "origin-1");
    assert_eq!(facts.bluemind.unwrap().version, "5.1.2");
    assert_eq!(facts.postgresql.unwrap().version, "15.18");
    assert_eq!(facts.data_dirs.len(), 7);
}

#[tokio::test]
async fn agent_refuses_a_client_without_certificate() {
    let f = agent_named("origin-1").await;
    let mut client = agent_client(
        &f.pki.ca_path(),
        None,
        Role::Orchestrator,
        f.agent.addr,
        "origin-1",
    );
    let err = facts_error(&mut client).await;
    assert!(err.contains("requires a client certificate"), "{err}");
    assert!(err.contains("CertificateRequired"), "{err}");
}

#[tokio::test]
async fn agent_refuses_a_certificate_from_another_ca() {
    let f = agent_named("origin-1").await;
    let other = TestPki::new();
    let stranger = other.issue("orchestrator", Role::Orchestrator);
    // Trust the real fleet CA for the server, but present the other fleet's certificate.
    let files = bmfleet_proto::tls::TlsFiles {
        ca: f.pki.ca_path(),
        ..stranger
    };
    let mut client = agent_client(
        &f.pki.ca_path(),
        Some(&files),
        Role::Orchestrator,
        f.agent.addr,
        "origin-1",
    );
    let err = facts_error(&mut client).await;
    assert!(err.contains("not signed by its fleet CA"), "{err}");
    assert!(err.contains("UnknownCA"), "{err}");
}

#[tokio::test]
async fn agent_refuses_an_expired_certificate() {
    let f = agent_named("origin-1").await;
    let expired = f.pki.issue_expired("orchestrator", Role::Orchestrator);
    let mut client = agent_client(
        &f.pki.ca_path(),
        Some(&expired),
        Role::Orchestrator,
        f.agent.addr,
        "origin-1",
    );
    let err = facts_error(&mut client).await;
    assert!(err.contains("has expired"), "{err}");
    assert!(err.contains("CertificateExpired"), "{err}");
}

#[tokio::test]
async fn agent_refuses_operator_and_agent_roles() {
    let f = agent_named("origin-1").await;
    for (name, role) in [("alice", Role::Operator), ("origin-2", Role::Agent)] {
        let files = f.pki.issue(name, role);
        let mut client = agent_client(
            &f.pki.ca_path(),
            Some(&files),
            role,
            f.agent.addr,
            "origin-1",
        );
        let status = client.facts(FactsRequest::default()).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
        let msg = status.message();
        assert!(msg.contains(&format!("'{name}' (role {role})")), "{msg}");
        assert!(msg.contains("accepts only role orchestrator"), "{msg}");
    }
}

#[tokio::test]
async fn orchestrator_refuses_an_agent_whose_certificate_names_another_agent() {
    // The agent at this address presents origin-2's certificate, but we expect origin-1.
    let f = agent_named("origin-2").await;
    let orch = f.pki.issue("orchestrator", Role::Orchestrator);
    let mut client = agent_client(
        &f.pki.ca_path(),
        Some(&orch),
        Role::Orchestrator,
        f.agent.addr,
        "origin-1",
    );
    let err = facts_error(&mut client).await;
    assert!(err.contains("we refused the peer's certificate"), "{err}");
    assert!(err.contains("origin-1"), "{err}");
}

#[tokio::test]
async fn a_client_refuses_a_server_of_the_wrong_role() {
    // A client that dials "origin-1" expecting an orchestrator must refuse the agent of that
    // name: the check is by role as well as by name.
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let config = agent_config(pki.issue("origin-1", Role::Agent), dir.path(), vec![]);
    let agent = serve_agent(config).await;
    let orch = pki.issue("orchestrator", Role::Orchestrator);
    let identity = LocalIdentity::load(&orch, Role::Orchestrator).unwrap();
    let channel = connect(
        &agent.addr.to_string(),
        "origin-1",
        identity.client_config(Role::Orchestrator).unwrap(),
        Duration::from_secs(5),
    )
    .unwrap();
    let mut client = bmfleet_proto::v1::agent_client::AgentClient::new(channel);
    let err = facts_error(&mut client).await;
    assert!(err.contains("we refused the peer's certificate"), "{err}");
    assert!(
        err.contains("is for 'origin-1' (role agent), expected role orchestrator"),
        "{err}"
    );
}

#[tokio::test]
async fn fleet_api_refuses_an_agent_certificate_and_audits_it() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let config = bmfleet_orchestrator::config::OrchestratorConfig {
        metrics_listen: None,
        listen: "127.0.0.1:0".parse().unwrap(),
        state_db: dir.path().join("state.db"),
        health_interval_secs: 3600,
        usage_interval_secs: 3600,
        rpc_timeout_secs: 5,
        audit_retention_days: 30,
        tls: pki.issue("orchestrator", Role::Orchestrator),
        agent: vec![],
        enrollment: None,
        notify: Vec::new(),
    };
    let orchestrator = serve_orchestrator(config).await;
    let fleet_client = |files: &bmfleet_proto::tls::TlsFiles, role: Role| {
        let identity = LocalIdentity::load(files, role).unwrap();
        let channel = connect(
            &orchestrator.addr.to_string(),
            "orchestrator",
            identity.client_config(Role::Orchestrator).unwrap(),
            Duration::from_secs(5),
        )
        .unwrap();
        FleetClient::new(channel)
    };
    let agent_files = pki.issue("origin-1", Role::Agent);
    let status = fleet_client(&agent_files, Role::Agent)
        .status(StatusRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    assert!(
        status
            .message()
            .contains("'origin-1' (role agent) may not call the Fleet API"),
        "{}",
        status.message()
    );

    let operator = pki.issue("alice", Role::Operator);
    let mut alice = fleet_client(&operator, Role::Operator);
    alice.status(StatusRequest::default()).await.unwrap();
    let log = alice
        .audit(bmfleet_proto::v1::AuditRequest {
            limit: 10,
            before_id: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .entries;
    let summary: Vec<_> = log
        .iter()
        .map(|e| {
            (
                e.who.as_str(),
                e.role.as_str(),
                e.method.as_str(),
                e.outcome.as_str(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("origin-1", "agent", "Status", "denied"),
            ("alice", "operator", "Status", "ok"),
        ]
    );
    assert!(log.iter().all(|e| e.at_unix_ms > 0));

    // A flood of refused calls is itemized up to a bound per caller and minute, and huge
    // arguments are cut: the audit log stays readable.
    let mut intruder = fleet_client(&agent_files, Role::Agent);
    for _ in 0..100 {
        let _ = intruder.status(StatusRequest::default()).await;
    }
    let huge = "x".repeat(3_900_000);
    for _ in 0..10 {
        let e = alice
            .pause(bmfleet_proto::v1::TargetRequest {
                instance: huge.clone(),
                all: false,
            })
            .await
            .unwrap_err();
        assert_ne!(e.code(), tonic::Code::Ok);
    }
    let log = alice
        .audit(bmfleet_proto::v1::AuditRequest {
            limit: 1000,
            before_id: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .entries;
    // Per calendar minute of the ledger (the flood may straddle one): at most 20 itemized,
    // and the minute that took most of the 101 refusals itemized exactly 20.
    let mut per_minute: std::collections::BTreeMap<i64, usize> = Default::default();
    for e in log.iter().filter(|e| e.outcome == "denied") {
        *per_minute
            .entry(e.at_unix_ms.div_euclid(60_000))
            .or_default() += 1;
    }
    assert!(
        per_minute.values().all(|n| *n <= 20) && per_minute.values().max() == Some(&20),
        "itemized refusals of origin-1 per minute: {per_minute:?}"
    );
    let pauses: Vec<_> = log.iter().filter(|e| e.method == "Pause").collect();
    assert_eq!(pauses.len(), 10);
    assert!(
        pauses
            .iter()
            .all(|e| e.arguments.len() < 3_000 && e.arguments.contains("cut: ")),
        "{:?}",
        pauses[0].arguments.len()
    );
    let db_size: u64 = ["state.db", "state.db-wal"]
        .iter()
        .filter_map(|f| std::fs::metadata(dir.path().join(f)).ok())
        .map(|m| m.len())
        .sum();
    assert!(
        db_size < 4_000_000,
        "the state database grew to {db_size} bytes"
    );
}

#[tokio::test]
async fn agent_obeys_only_the_orchestrator_names_it_lists() {
    let f = agent_named("origin-1").await;
    // Signed by the fleet CA, role orchestrator, but not the name the agent lists.
    let rogue = f.pki.issue("orchestrator-rogue", Role::Orchestrator);
    let mut client = agent_client(
        &f.pki.ca_path(),
        Some(&rogue),
        Role::Orchestrator,
        f.agent.addr,
        "origin-1",
    );
    let e = client.facts(FactsRequest::default()).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    assert!(
        e.message()
            .contains("'orchestrator-rogue' (role orchestrator) may not call the Agent API: it accepts only orchestrator 'orchestrator'"),
        "{}",
        e.message()
    );
}

/// A PKI made by the real `bmctl fleet pki`, as operators make it.
fn bmctl_pki(dir: &std::path::Path, names: &[(&str, &str)]) -> std::path::PathBuf {
    let pki = dir.join("pki");
    let run = |args: &[&str]| {
        let out = std::process::Command::new(bmfleet_tests::binary("bmctl"))
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let p = pki.to_str().unwrap();
    run(&["fleet", "pki", "init", "--dir", p]);
    for (name, role) in names {
        run(&[
            "fleet", "pki", "issue", "--dir", p, "--name", name, "--role", role,
        ]);
    }
    pki
}

fn pki_files(pki: &std::path::Path, name: &str) -> TlsFiles {
    TlsFiles {
        ca: pki.join("ca.pem"),
        cert: pki.join(format!("{name}.pem")),
        key: pki.join(format!("{name}-key.pem")),
        crl: Some(pki.join("crl.pem")),
    }
}

#[tokio::test]
async fn a_revoked_certificate_is_refused_after_a_reload_and_says_so() {
    bmfleet_proto::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let pki = bmctl_pki(
        dir.path(),
        &[("orchestrator", "orchestrator"), ("origin-1", "agent")],
    );
    let agent = serve_agent(agent_config(
        pki_files(&pki, "origin-1"),
        &dir.path().join("agent"),
        vec![],
    ))
    .await;
    let call = || {
        let mut client = agent_client(
            &pki.join("ca.pem"),
            Some(&pki_files(&pki, "orchestrator")),
            Role::Orchestrator,
            agent.addr,
            "origin-1",
        );
        async move { client.facts(FactsRequest::default()).await }
    };
    call().await.expect("valid before the revocation");
    let out = std::process::Command::new(bmfleet_tests::binary("bmctl"))
        .args([
            "fleet",
            "pki",
            "revoke",
            "--dir",
            pki.to_str().unwrap(),
            "--name",
            "orchestrator",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The agent reads the list again on SIGHUP.
    nix::sys::signal::raise(nix::sys::signal::Signal::SIGHUP).unwrap();
    let until = std::time::Instant::now() + Duration::from_secs(10);
    let refusal = loop {
        match call().await {
            Err(e) => break bmfleet_proto::error_chain::describe_status(&e),
            Ok(_) if std::time::Instant::now() < until => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Ok(_) => panic!("the revoked certificate is still accepted"),
        }
    };
    assert!(refusal.contains("it has been revoked"), "{refusal}");

    // And a client with the list refuses a revoked server.
    let out = std::process::Command::new(bmfleet_tests::binary("bmctl"))
        .args([
            "fleet",
            "pki",
            "revoke",
            "--dir",
            pki.to_str().unwrap(),
            "--name",
            "origin-1",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let orchestrator_files = TlsFiles {
        cert: pki.join("orchestrator.pem"),
        key: pki.join("orchestrator-key.pem"),
        ..pki_files(&pki, "origin-1")
    };
    let orchestrator = LocalIdentity::load(&orchestrator_files, Role::Orchestrator).unwrap();
    let channel = connect(
        &agent.addr.to_string(),
        "origin-1",
        orchestrator.client_config(Role::Agent).unwrap(),
        Duration::from_secs(5),
    )
    .unwrap();
    let e = AgentClient::new(channel)
        .facts(FactsRequest::default())
        .await
        .unwrap_err();
    let text = bmfleet_proto::error_chain::describe_status(&e);
    assert!(
        text.contains("we refused the peer's certificate: it has been revoked"),
        "{text}"
    );
}
