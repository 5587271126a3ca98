//! Every listener is bounded: an agent and an orchestrator run as processes limited to 1,024
//! file descriptors; each of their ports (Agent API, data plane, metrics, Fleet API) is flooded
//! with 1,100 idle TCP connections from another loopback address (bounded loops, loopback
//! only), and the legitimate callers are still answered. A certificate of the wrong role
//! cannot hold a connection to the Agent API.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use bmfleet_proto::identity::Role;
use bmfleet_proto::tls::{LocalIdentity, TlsFiles};
use bmfleet_proto::v1::FactsRequest;
use bmfleet_tests::{agent_client, binary, free_port, ChildGuard};
use tokio::io::AsyncReadExt;

const FLOOD: usize = 1_100;

fn files(pki: &Path, name: &str) -> TlsFiles {
    TlsFiles {
        ca: pki.join("ca.pem"),
        cert: pki.join(format!("{name}.pem")),
        key: pki.join(format!("{name}-key.pem")),
        crl: None,
    }
}

fn bmctl(args: &[&str]) -> std::process::Output {
    Command::new(binary("bmctl"))
        .args(args)
        .env_remove("BMFLEET_ORCHESTRATOR")
        .output()
        .expect("bmctl")
}

/// Opens `n` idle TCP connections to `to` from 127.0.0.2 and keeps them; a refused or reset
/// connection still counts (the point is the server's side).
async fn flood(to: SocketAddr, n: usize) -> Vec<tokio::net::TcpStream> {
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.bind("127.0.0.2:0".parse().unwrap()).expect("bind");
        if let Ok(Ok(s)) = tokio::time::timeout(Duration::from_secs(2), socket.connect(to)).await {
            held.push(s);
        }
    }
    held
}

/// Every flood must have held more connections than any listener lets one peer keep (32),
/// or it tested nothing.
fn flooded(held: &[tokio::net::TcpStream], port: &str) {
    assert!(
        held.len() > 32,
        "the flood of {port} held only {} connections",
        held.len()
    );
}

/// Waits until `check` holds (the daemons are starting), at most 30 s.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        match check().await {
            Ok(()) => return,
            Err(e) if Instant::now() > until => panic!("{what}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

struct Daemons {
    dir: tempfile::TempDir,
    pki: PathBuf,
    agent: SocketAddr,
    data: SocketAddr,
    metrics: SocketAddr,
    fleet: SocketAddr,
    _children: Vec<ChildGuard>,
}

impl Daemons {
    fn start() -> Daemons {
        let dir = tempfile::tempdir().unwrap();
        let pki = dir.path().join("pki");
        let p = pki.to_str().unwrap();
        assert!(bmctl(&["fleet", "pki", "init", "--dir", p])
            .status
            .success());
        for (name, role) in [
            ("orchestrator", "orchestrator"),
            ("origin-1", "agent"),
            ("target-1", "agent"),
            ("alice", "operator"),
        ] {
            let out = bmctl(&[
                "fleet", "pki", "issue", "--dir", p, "--name", name, "--role", role,
            ]);
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let port = |_| SocketAddr::from(([127, 0, 0, 1], free_port()));
        let (agent, data, metrics, fleet) = (port(0), port(1), port(2), port(3));
        let root = dir.path().join("origin-1");
        std::fs::create_dir_all(root.join("var/spool/cyrus")).unwrap();
        let agent_toml = dir.path().join("agent.toml");
        std::fs::write(
            &agent_toml,
            format!(
                r#"listen = "{agent}"
data_listen = "{data}"
metrics_listen = "{metrics}"
data_root = "{root}"
state_dir = "{root}/state"
[tls]
ca = "{p}/ca.pem"
cert = "{p}/origin-1.pem"
key = "{p}/origin-1-key.pem"
[facts]
bluemind_version_command = ["echo", "5.1.2"]
postgresql_version_command = ["echo", "15.18"]
"#,
                root = root.display()
            ),
        )
        .unwrap();
        let orchestrator_toml = dir.path().join("orchestrator.toml");
        std::fs::write(
            &orchestrator_toml,
            format!(
                r#"listen = "{fleet}"
state_db = "{state}"
[tls]
ca = "{p}/ca.pem"
cert = "{p}/orchestrator.pem"
key = "{p}/orchestrator-key.pem"
[[agent]]
name = "origin-1"
address = "{agent}"
"#,
                state = dir.path().join("orchestrator.db").display()
            ),
        )
        .unwrap();
        // As deployed hosts often run them: 1,024 file descriptors.
        let daemon = |bin: &str, config: &Path| {
            let log = std::fs::File::create(dir.path().join(format!("{bin}.log"))).unwrap();
            ChildGuard::spawn(
                Command::new("prlimit")
                    .arg("--nofile=1024:1024")
                    .arg(binary(bin))
                    .arg("--config")
                    .arg(config)
                    .stdout(std::process::Stdio::null())
                    .stderr(log),
            )
        };
        let children = vec![
            daemon("bmfleet-agent", &agent_toml),
            daemon("bmfleet-orchestrator", &orchestrator_toml),
        ];
        Daemons {
            dir,
            pki,
            agent,
            data,
            metrics,
            fleet,
            _children: children,
        }
    }

    async fn facts(&self) -> Result<(), String> {
        let orchestrator = files(&self.pki, "orchestrator");
        let mut client = agent_client(
            &self.pki.join("ca.pem"),
            Some(&orchestrator),
            Role::Orchestrator,
            self.agent,
            "origin-1",
        );
        tokio::time::timeout(
            Duration::from_secs(10),
            client.facts(FactsRequest::default()),
        )
        .await
        .map_err(|_| "Facts timed out".to_string())?
        .map(|_| ())
        .map_err(|s| s.to_string())
    }

    /// A data-plane request with a made-up grant: answered means refused by name.
    async fn data_plane(&self) -> Result<(), String> {
        let tls = LocalIdentity::load(&files(&self.pki, "target-1"), Role::Agent)
            .map_err(|e| e.to_string())?
            .client_config(Role::Agent)
            .map_err(|e| e.to_string())?;
        let endpoint = bmfleet_proto::v1::OriginEndpoint {
            address: self.data.to_string(),
            name: "origin-1".into(),
            grant_id: "grant-made-up-0000".into(),
        };
        let request = bmfleet_agent::plane::tunnel::TunnelRequest::DatabaseManifest {
            grant: endpoint.grant_id.clone(),
            names_only: true,
        };
        match bmfleet_agent::plane::tunnel::open(&endpoint, tls, &request, Duration::from_secs(10))
            .await
        {
            Err(bmfleet_agent::plane::tunnel::TunnelError::Refused { reason, .. })
                if reason.contains("no grant") =>
            {
                Ok(())
            }
            Err(e) => Err(e.to_string()),
            Ok(_) => Err("admitted a made-up grant".into()),
        }
    }

    async fn metrics(&self) -> Result<(), String> {
        let url = format!("http://{}/metrics", self.metrics);
        tokio::task::spawn_blocking(move || {
            ureq::AgentBuilder::new()
                .timeout(Duration::from_secs(10))
                .build()
                .get(&url)
                .call()
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| e.to_string())?
    }

    async fn fleet_status(&self) -> Result<(), String> {
        let (p, fleet) = (self.pki.clone(), self.fleet.to_string());
        tokio::task::spawn_blocking(move || {
            let out = Command::new(binary("bmctl"))
                .args(["fleet", "status", "--orchestrator", &fleet])
                .env("BMFLEET_CA", p.join("ca.pem"))
                .env("BMFLEET_CERT", p.join("alice.pem"))
                .env("BMFLEET_KEY", p.join("alice-key.pem"))
                .output()
                .map_err(|e| e.to_string())?;
            if out.status.success() {
                Ok(())
            } else {
                Err(String::from_utf8_lossy(&out.stderr).into_owned())
            }
        })
        .await
        .map_err(|e| e.to_string())?
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flooded_ports_still_answer_their_callers() {
    bmfleet_proto::install_crypto_provider();
    let d = Daemons::start();
    eventually("the agent answers", || d.facts()).await;
    eventually("the orchestrator answers", || d.fleet_status()).await;
    eventually("metrics answer", || d.metrics()).await;

    let held = flood(d.agent, FLOOD).await;
    flooded(&held, "the Agent API");
    d.facts()
        .await
        .expect("the Agent API answers the orchestrator during a flood");
    drop(held);

    let held = flood(d.data, FLOOD).await;
    flooded(&held, "the data plane");
    d.data_plane()
        .await
        .expect("the data plane answers a target during a flood");
    d.facts().await.expect("and the Agent API still answers");
    drop(held);

    let held = flood(d.metrics, FLOOD).await;
    flooded(&held, "the metrics port");
    d.metrics()
        .await
        .expect("a scrape is answered during a flood");
    drop(held);

    let held = flood(d.fleet, FLOOD).await;
    flooded(&held, "the Fleet API");
    d.fleet_status()
        .await
        .expect("the Fleet API answers an operator during a flood");
    drop(held);
    let _ = &d.dir;
}

#[tokio::test]
async fn a_certificate_of_another_role_cannot_hold_an_agent_api_connection() {
    bmfleet_proto::install_crypto_provider();
    let d = Daemons::start();
    eventually("the agent answers", || d.facts()).await;
    // Another agent's certificate: its calls are refused, and the connection is closed by
    // the agent after a short while instead of being held open.
    let tls = LocalIdentity::load(&files(&d.pki, "target-1"), Role::Agent)
        .unwrap()
        .client_config(Role::Agent)
        .unwrap();
    let tcp = tokio::net::TcpStream::connect(d.agent).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("origin-1").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .unwrap();
    let mut buf = [0u8; 4096];
    let closed = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            match tls.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "the agent held another agent's connection open"
    );
}
