//! Preflight against real agents: a fleet-file slip that only the target's host can reveal
//! (an interface it does not have, an extra dir its agent does not list) stops the instance
//! before anything is synced, naming the host and the fix.

use std::time::{Duration, Instant};

use bmfleet_orchestrator::config::{AgentEntry, OrchestratorConfig};
use bmfleet_proto::identity::Role;
use bmfleet_proto::tls::{connect, LocalIdentity};
use bmfleet_proto::v1::fleet_client::FleetClient;
use bmfleet_proto::v1::{ApplyRequest, StatusRequest};
use bmfleet_tests::{agent_config, serve_agent, serve_orchestrator, TestPki};

#[tokio::test]
async fn a_missing_interface_an_unlisted_extra_dir_or_no_network_system_stops_the_instance_at_preflight(
) {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let origin = serve_agent(agent_config(
        pki.issue("origin-1", Role::Agent),
        &dir.path().join("o"),
        vec![],
    ))
    .await;
    // The target keeps no network configuration the agent knows (its root is empty).
    let mut target_config = agent_config(
        pki.issue("target-1", Role::Agent),
        &dir.path().join("t"),
        vec![],
    );
    target_config.network.persist = "auto".into();
    let target = serve_agent(target_config).await;
    let entry = |name: &str, addr: std::net::SocketAddr| AgentEntry {
        name: name.into(),
        address: addr.to_string(),
        data_address: None,
    };
    let orchestrator = serve_orchestrator(OrchestratorConfig {
        metrics_listen: None,
        listen: "127.0.0.1:0".parse().unwrap(),
        state_db: dir.path().join("state.db"),
        health_interval_secs: 3600,
        usage_interval_secs: 3600,
        rpc_timeout_secs: 5,
        audit_retention_days: 30,
        tls: pki.issue("orchestrator", Role::Orchestrator),
        agent: vec![
            entry("origin-1", origin.addr),
            entry("target-1", target.addr),
        ],
        enrollment: None,
        notify: Vec::new(),
    })
    .await;
    let operator =
        LocalIdentity::load(&pki.issue("alice", Role::Operator), Role::Operator).unwrap();
    let mut fleet = FleetClient::new(
        connect(
            &orchestrator.addr.to_string(),
            "orchestrator",
            operator.client_config(Role::Orchestrator).unwrap(),
            Duration::from_secs(5),
        )
        .unwrap(),
    );
    let file = "[fleet]\nname = \"night-1\"\ncanary_count = 0\n\
                [[fleet.windows]]\ndays = [\"mon\", \"tue\", \"wed\", \"thu\", \"fri\", \"sat\", \"sun\"]\n\
                start = \"00:00\"\nend = \"23:59\"\ntimezone = \"UTC\"\n\
                [[instance]]\nname = \"mail-01\"\norigin = \"origin-1\"\ntarget = \"target-1\"\n\
                service_ip = \"198.18.0.101/24\"\ninterface = \"nonexistent0\"\n\
                extra_dirs = [\"/var/spool/bm-custom\"]\n";
    fleet
        .apply(ApplyRequest {
            fleet_file: file.into(),
            file_name: "fleet.toml".into(),
            remigrate: vec![],
        })
        .await
        .unwrap();
    let until = Instant::now() + Duration::from_secs(60);
    let instance = loop {
        let status = fleet
            .status(StatusRequest::default())
            .await
            .unwrap()
            .into_inner();
        let i = status.instances[0].clone();
        if !i.last_error.is_empty() {
            break i;
        }
        assert!(Instant::now() < until, "preflight never failed: {i:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let error = &instance.last_error;
    assert!(
        error.contains("the target target-1 has no interface nonexistent0")
            && error.contains("the origin origin-1 has no interface nonexistent0"),
        "{error}"
    );
    assert!(
        error.contains("the target target-1 cannot keep the service IP across a reboot")
            && error.contains("no supported network configuration system"),
        "{error}"
    );
    assert!(
        error.contains("origin-1 does not list /var/spool/bm-custom")
            && error.contains("target-1 does not list /var/spool/bm-custom"),
        "{error}"
    );
    assert!(error.contains("facts.extra_data_dirs"), "{error}");
    // An origin the orchestrator knows no data address of is caught before any pass.
    assert!(
        error.contains("agent origin-1 has no data_address"),
        "{error}"
    );
    // Only an operator can mend these: the instance fails at once, not after its retries.
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let status = fleet
            .status(StatusRequest::default())
            .await
            .unwrap()
            .into_inner();
        if status.instances[0].phase == "Failed" {
            break;
        }
        assert!(
            Instant::now() < until,
            "still {} after a refusal for good",
            status.instances[0].phase
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Nothing was synced.
    assert!(!dir.path().join("t/root/var/spool/cyrus").exists());
}
