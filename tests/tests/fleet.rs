//! A fleet driven the way an operator does it: real orchestrator process, two agents serving
//! over mutual TLS, `bmctl fleet apply|status|events|pause|resume|abort`, real rsync hot passes
//! through the data plane, and an orchestrator killed with SIGKILL and restarted.

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use bmfleet_agent::config::ServiceCommands;
use bmfleet_proto::identity::Role;
use bmfleet_proto::tls::TlsFiles;
use bmfleet_tests::{
    agent_config, argv, binary, free_port, open_tempdir, serve_agent, ChildGuard, TestPki,
};

struct Operator {
    orchestrator: String,
    files: TlsFiles,
}

impl Operator {
    fn bmctl(&self, args: &[&str]) -> Output {
        Command::new(binary("bmctl"))
            .args(args)
            .args(["--orchestrator", &self.orchestrator])
            .env("BMFLEET_CA", &self.files.ca)
            .env("BMFLEET_CERT", &self.files.cert)
            .env("BMFLEET_KEY", &self.files.key)
            .output()
            .expect("bmctl")
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.bmctl(args);
        assert!(
            out.status.success(),
            "bmctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn instance(&self) -> serde_json::Value {
        let status: serde_json::Value =
            serde_json::from_str(&self.ok(&["fleet", "status", "--output", "json"])).unwrap();
        status["instances"][0].clone()
    }

    /// Waits until the orchestrator answers (it was just started).
    fn wait_up(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.bmctl(&["fleet", "status"]).status.success() {
            assert!(
                Instant::now() < deadline,
                "the orchestrator did not come up"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn wait_for_phase(&self, phase: &str) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let out = self.bmctl(&["fleet", "status", "--output", "json"]);
            if out.status.success() {
                let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
                if v["instances"][0]["phase"] == phase {
                    return v["instances"][0].clone();
                }
                assert!(
                    Instant::now() < deadline,
                    "never reached {phase}: {}",
                    v["instances"][0]
                );
            } else {
                assert!(
                    Instant::now() < deadline,
                    "bmctl: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }
}

/// GET /metrics from the orchestrator.
fn scrape(port: u16) -> String {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).expect("metrics endpoint");
    conn.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut response = String::new();
    conn.read_to_string(&mut response).unwrap();
    response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default()
}

fn service(name: &str, log: &Path, running: bool) -> ServiceCommands {
    let cmd = |action: &str| {
        argv(&[
            "sh",
            "-c",
            &format!("echo '{name} {action}' >> '{}'", log.display()),
        ])
    };
    ServiceCommands {
        name: name.into(),
        start: cmd("start"),
        stop: cmd("stop"),
        status: argv(&[if running { "true" } else { "false" }]),
    }
}

/// A window of ten minutes, twelve hours from now: the instance converges and waits.
fn far_window() -> String {
    let at = jiff::Timestamp::now() + jiff::SignedDuration::from_hours(12);
    let z = at.to_zoned(jiff::tz::TimeZone::UTC);
    let end = z.clone() + jiff::SignedDuration::from_mins(10);
    let day = z.strftime("%a").to_string().to_lowercase();
    format!(
        "[[fleet.windows]]\ndays = [\"{day}\"]\nstart = \"{}\"\nend = \"{}\"\ntimezone = \"UTC\"\n",
        z.strftime("%H:%M"),
        end.strftime("%H:%M")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_applies_watches_pauses_and_aborts_a_fleet_across_an_orchestrator_crash() {
    let pki = TestPki::new();
    let dir = open_tempdir();
    let log = dir.path().join("services.log");

    let mut origin = agent_config(
        pki.issue("origin-1", Role::Agent),
        &dir.path().join("origin"),
        vec![service("bluemind", &log, true)],
    );
    let data_port = free_port();
    origin.data_listen = Some(format!("127.0.0.1:{data_port}").parse().unwrap());
    origin.facts.spool_users = vec!["root".into()];
    let mut target = agent_config(
        pki.issue("target-1", Role::Agent),
        &dir.path().join("target"),
        vec![service("bluemind", &log, false)],
    );
    target.facts.spool_users = vec!["root".into()];
    for d in bmfleet_proto::BLUEMIND_DATA_DIRS {
        std::fs::create_dir_all(origin.data_root.join(d.trim_start_matches('/'))).unwrap();
    }
    std::fs::write(
        origin.data_root.join("var/spool/cyrus/1."),
        b"Subject: hot\r\n\r\npass\r\n",
    )
    .unwrap();
    std::fs::write(
        origin.data_root.join("var/spool/sieve/alice.sieve"),
        b"keep;",
    )
    .unwrap();
    let origin_root = origin.data_root.clone();
    let target_root = target.data_root.clone();
    let origin_agent = serve_agent(origin).await;
    let target_agent = serve_agent(target).await;

    let orch = pki.issue("orchestrator", Role::Orchestrator);
    let port = free_port();
    let metrics_port = free_port();
    let config = dir.path().join("orchestrator.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:{port}\"\nmetrics_listen = \"127.0.0.1:{metrics_port}\"\nstate_db = \"{}\"\nhealth_interval_secs = 1\n[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n\
             [[agent]]\nname = \"origin-1\"\naddress = \"{}\"\ndata_address = \"127.0.0.1:{data_port}\"\n\
             [[agent]]\nname = \"target-1\"\naddress = \"{}\"\n",
            dir.path().join("state/orchestrator.db").display(),
            orch.ca.display(),
            orch.cert.display(),
            orch.key.display(),
            origin_agent.addr,
            target_agent.addr,
        ),
    )
    .unwrap();
    let start_orchestrator = || {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.path().join("orchestrator.log"))
            .unwrap();
        ChildGuard::spawn(
            Command::new(binary("bmfleet-orchestrator"))
                .arg("--config")
                .arg(&config)
                .stderr(log),
        )
    };
    let mut orchestrator = start_orchestrator();
    let op = Operator {
        orchestrator: format!("127.0.0.1:{port}"),
        files: pki.issue("alice", Role::Operator),
    };
    op.wait_up();

    // A broken fleet file is refused with its line and field, and nothing is applied.
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[fleet]\nname = \"night\"\n[[instance]]\nname = \"mail-01\"\norigin = \"origin-1\"\ntarget = \"origin-1\"\nservice_ip = \"198.18.0.101/24\"\n").unwrap();
    let out = op.bmctl(&["fleet", "apply", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.toml:6: instance[0].target: origin and target must be different agents"),
        "{err}"
    );

    let fleet = dir.path().join("fleet.toml");
    std::fs::write(
        &fleet,
        format!(
            "[fleet]\nname = \"night-1\"\ncanary_count = 0\n{}\n[[instance]]\nname = \"mail-01\"\norigin = \"origin-1\"\ntarget = \"target-1\"\nservice_ip = \"198.18.0.101/24\"\ninterface = \"lo\"\nestimate = {{ files = 6000000 }}\n",
            far_window()
        ),
    )
    .unwrap();
    let applied = op.ok(&["fleet", "apply", fleet.to_str().unwrap()]);
    assert!(
        applied.contains("fleet night-1 applied: 1 instances"),
        "{applied}"
    );

    // Preflight, then real hot passes through the data plane, until converged.
    let converged = op.wait_for_phase("Converged");
    assert!(converged["hot_passes"].as_u64().unwrap() >= 1);
    for f in ["var/spool/cyrus/1.", "var/spool/sieve/alice.sieve"] {
        assert_eq!(
            std::fs::read(origin_root.join(f)).unwrap(),
            std::fs::read(target_root.join(f)).unwrap(),
            "{f}"
        );
    }
    assert!(!log.exists(), "no service was touched outside a window");

    // The operator's view: progress, window, ETA, and the instance's step history.
    let table = op.ok(&["fleet", "status"]);
    assert!(
        table.contains("PROGRESS") && table.contains("ETA"),
        "{table}"
    );
    assert!(
        table.contains("mail-01") && table.contains("40%"),
        "{table}"
    );
    assert!(
        table.contains("fleet night-1: 1 instances, 0 done"),
        "{table}"
    );
    let status = op.instance();
    let eta = status["eta_unix_ms"].as_i64().expect("an ETA");
    let window_opens = jiff::Timestamp::now() + jiff::SignedDuration::from_hours(11);
    assert!(
        eta > window_opens.as_millisecond(),
        "the ETA must wait for the window 12 h away: {status}"
    );
    let history = op.ok(&["fleet", "status", "mail-01"]);
    assert!(
        history.contains("Preflight") && history.contains("HotPass") && history.contains(" ok"),
        "{history}"
    );
    assert!(
        history.trim_end().ends_with("mail-01: Converged"),
        "{history}"
    );

    // The metrics say the same, in a format promtool accepts.
    let scrape = scrape(metrics_port);
    assert!(
        scrape.contains("bmfleet_instance_phase{server=\"mail-01\",phase=\"Converged\"} 1"),
        "{scrape}"
    );
    assert!(
        scrape.contains("bmfleet_agent_up{agent=\"origin-1\"} 1"),
        "{scrape}"
    );
    assert!(
        scrape.contains("bmfleet_sync_passes_total{server=\"mail-01\",kind=\"hot\"}"),
        "{scrape}"
    );
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (deploy/setup.sh installs prometheus)");
    std::io::Write::write_all(&mut promtool.stdin.take().unwrap(), scrape.as_bytes()).unwrap();
    let checked = promtool.wait_with_output().unwrap();
    assert!(
        checked.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );

    // The plan from the file alone projects 60 s of services + 100 s scanning 6M files; with the
    // orchestrator reachable, the measured pass (a few files) replaces that estimate.
    let plan_of = |args: &[&str]| -> i64 {
        let out = op.bmctl(args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        rows[0]["projected_downtime_secs"].as_i64().unwrap()
    };
    let measured = plan_of(&["fleet", "plan", fleet.to_str().unwrap(), "--output", "json"]);
    let out = Command::new(binary("bmctl"))
        .args(["fleet", "plan", fleet.to_str().unwrap(), "--output", "json"])
        .env_remove("BMFLEET_CA")
        .output()
        .unwrap();
    let estimated: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(estimated[0]["projected_downtime_secs"], 160);
    assert!(
        measured < 100,
        "the plan ignored the measured pass: {measured}s"
    );

    // The orchestrator dies; its successor resumes from its state database.
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(orchestrator.0.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
    let _ = orchestrator.0.wait();
    orchestrator = start_orchestrator();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !op.bmctl(&["fleet", "status"]).status.success() {
        assert!(
            Instant::now() < deadline,
            "the orchestrator did not come back"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(op.instance()["phase"], "Converged");

    op.ok(&["fleet", "pause", "mail-01"]);
    op.wait_for_phase("Paused");
    op.ok(&["fleet", "resume", "mail-01"]);
    op.wait_for_phase("Converged");
    let out = op.bmctl(&["fleet", "abort", "mail-99"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("no instance named 'mail-99'"));
    op.ok(&["fleet", "abort", "mail-01"]);
    op.wait_for_phase("Aborted");

    // With every instance finished, the fleet can be applied again: it starts afresh.
    op.ok(&["fleet", "apply", fleet.to_str().unwrap()]);
    let again = op.wait_for_phase("Converged");
    // Converged after its initial copy and one pass that measured the changes, counted
    // afresh (the earlier application's passes would make it more).
    assert_eq!(
        again["hot_passes"], 2,
        "a new application starts from its first pass: {again}"
    );
    op.ok(&["fleet", "abort", "mail-01"]);
    op.wait_for_phase("Aborted");

    let events = op.ok(&["fleet", "events", "mail-01", "--output", "json"]);
    let phases: Vec<String> = events
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["phase"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    for p in ["Preflight", "HotSync", "Converged", "Paused", "Aborted"] {
        assert!(phases.iter().any(|x| x == p), "{p} missing from {phases:?}");
    }
    let audit = op.ok(&["fleet", "audit", "--output", "json", "--limit", "500"]);
    let audit: Vec<serde_json::Value> = serde_json::from_str(&audit).unwrap();
    let calls: Vec<(String, String)> = audit
        .iter()
        .filter(|e| e["method"] != "Status" && e["method"] != "Audit")
        .map(|e| {
            (
                e["method"].as_str().unwrap().to_string(),
                e["outcome"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let expected: Vec<(String, String)> = [
        ("Apply", "ok"),
        ("Events", "ok"),
        ("Pause", "ok"),
        ("Resume", "ok"),
        ("Abort", "error"),
        ("Abort", "ok"),
        ("Apply", "ok"),
        ("Abort", "ok"),
        ("Events", "ok"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    assert_eq!(calls, expected);
    assert!(audit.iter().all(|e| e["who"] == "alice"));
    drop(orchestrator);
}
