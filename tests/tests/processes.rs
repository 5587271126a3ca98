//! The real binaries as an operator runs them: `bmctl fleet pki`, an orchestrator and two
//! agents as separate processes over mutual TLS on loopback, and `bmctl fleet status`.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use bmfleet_tests::{binary, free_port, ChildGuard};

fn bmctl(args: &[&str], env: &[(&str, &Path)]) -> Output {
    let mut cmd = Command::new(binary("bmctl"));
    cmd.args(args).env_remove("BMFLEET_ORCHESTRATOR");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run bmctl")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn issue(pki: &Path, name: &str, role: &str, extra: &[&str]) {
    let dir = pki.to_str().unwrap();
    let mut args = vec![
        "fleet", "pki", "issue", "--dir", dir, "--name", name, "--role", role,
    ];
    args.extend_from_slice(extra);
    let out = bmctl(&args, &[]);
    assert!(out.status.success(), "issue {name}: {}", text(&out.stderr));
}

#[test]
fn pki_init_and_issue_write_0600_keys_and_never_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    let p = pki.to_str().unwrap();
    let out = bmctl(&["fleet", "pki", "init", "--dir", p], &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    // The CA key lives apart from the issued keys.
    assert_eq!(mode(&pki.join("private")), 0o700);
    assert_eq!(mode(&pki.join("private/ca-key.pem")), 0o600);
    assert!(!pki.join("ca-key.pem").exists());
    let ca_key = std::fs::read(pki.join("private/ca-key.pem")).unwrap();

    let again = bmctl(&["fleet", "pki", "init", "--dir", p], &[]);
    assert!(!again.status.success());
    assert!(
        text(&again.stderr).contains("already exists"),
        "{}",
        text(&again.stderr)
    );
    assert_eq!(
        std::fs::read(pki.join("private/ca-key.pem")).unwrap(),
        ca_key
    );

    issue(
        &pki,
        "origin-1",
        "agent",
        &["--ip", "127.0.0.1", "--days", "30"],
    );
    assert_eq!(mode(&pki.join("origin-1-key.pem")), 0o600);
    let key = std::fs::read(pki.join("origin-1-key.pem")).unwrap();
    let again = bmctl(
        &[
            "fleet", "pki", "issue", "--dir", p, "--name", "origin-1", "--role", "agent",
        ],
        &[],
    );
    assert!(!again.status.success());
    assert!(text(&again.stderr).contains("already exists"));
    assert_eq!(std::fs::read(pki.join("origin-1-key.pem")).unwrap(), key);

    let bad = bmctl(
        &[
            "fleet", "pki", "issue", "--dir", p, "--name", "x", "--role", "admin",
        ],
        &[],
    );
    assert!(!bad.status.success());
    assert!(
        text(&bad.stderr).contains("unknown role 'admin'"),
        "{}",
        text(&bad.stderr)
    );
}

fn write_agent_config(dir: &Path, pki: &Path, name: &str, port: u16) -> std::path::PathBuf {
    let root = dir.join(name);
    std::fs::create_dir_all(root.join("var/spool/cyrus/user")).unwrap();
    std::fs::write(
        root.join("var/spool/cyrus/user/1."),
        b"Subject: hi\r\n\r\nhello\r\n",
    )
    .unwrap();
    let config = dir.join(format!("{name}.toml"));
    std::fs::write(
        &config,
        format!(
            r#"listen = "127.0.0.1:{port}"
data_root = "{root}"
state_dir = "{root}/state"
[tls]
ca = "{pki}/ca.pem"
cert = "{pki}/{name}.pem"
key = "{pki}/{name}-key.pem"
[facts]
bluemind_version_command = ["echo", "5.1.2"]
postgresql_version_command = ["echo", "15.18"]
[[services.service]]
name = "bluemind"
start = ["true"]
stop = ["true"]
status = ["true"]
"#,
            root = root.display(),
            pki = pki.display()
        ),
    )
    .unwrap();
    config
}

#[test]
fn orchestrator_sees_two_agents_and_bmctl_reports_them() {
    bmfleet_proto::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    let out = bmctl(
        &["fleet", "pki", "init", "--dir", pki.to_str().unwrap()],
        &[],
    );
    assert!(out.status.success());
    issue(&pki, "orchestrator", "orchestrator", &[]);
    issue(&pki, "origin-1", "agent", &[]);
    issue(&pki, "target-1", "agent", &[]);
    issue(&pki, "alice", "operator", &[]);

    let (p1, p2, po) = (free_port(), free_port(), free_port());
    let daemon = |bin: &str, config: &Path, log: &str| {
        let log = std::fs::File::create(dir.path().join(log)).unwrap();
        ChildGuard::spawn(
            Command::new(binary(bin))
                .arg("--config")
                .arg(config)
                .stdout(std::process::Stdio::null())
                .stderr(log),
        )
    };
    let c1 = write_agent_config(dir.path(), &pki, "origin-1", p1);
    let c2 = write_agent_config(dir.path(), &pki, "target-1", p2);
    let _a1 = daemon("bmfleet-agent", &c1, "origin-1.log");
    let a2 = daemon("bmfleet-agent", &c2, "target-1.log");
    let orch_config = dir.path().join("orchestrator.toml");
    std::fs::write(
        &orch_config,
        format!(
            r#"listen = "127.0.0.1:{po}"
state_db = "{state}"
health_interval_secs = 1
[tls]
ca = "{pki}/ca.pem"
cert = "{pki}/orchestrator.pem"
key = "{pki}/orchestrator-key.pem"
[[agent]]
name = "origin-1"
address = "127.0.0.1:{p1}"
[[agent]]
name = "target-1"
address = "127.0.0.1:{p2}"
"#,
            state = dir.path().join("state/orchestrator.db").display(),
            pki = pki.display()
        ),
    )
    .unwrap();
    let _orch = daemon("bmfleet-orchestrator", &orch_config, "orchestrator.log");

    let orchestrator = format!("127.0.0.1:{po}");
    let as_alice = [
        ("BMFLEET_CA", pki.join("ca.pem")),
        ("BMFLEET_CERT", pki.join("alice.pem")),
        ("BMFLEET_KEY", pki.join("alice-key.pem")),
    ];
    let env: Vec<(&str, &Path)> = as_alice.iter().map(|(k, v)| (*k, v.as_path())).collect();
    let status_json = |env: &[(&str, &Path)]| {
        let out = bmctl(
            &[
                "fleet",
                "status",
                "--orchestrator",
                &orchestrator,
                "--output",
                "json",
            ],
            env,
        );
        (out.status.success(), text(&out.stdout), text(&out.stderr))
    };
    let wait_for = |what: &str, pred: &dyn Fn(&serde_json::Value) -> bool| -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (ok, stdout, stderr) = status_json(&env);
            if ok {
                let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
                if pred(&v) {
                    return v;
                }
            }
            assert!(
                Instant::now() < deadline,
                "never saw {what}: {stdout} {stderr}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let all_up = |v: &serde_json::Value| {
        v["agents"]
            .as_array()
            .is_some_and(|a| a.len() == 2 && a.iter().all(|x| x["up"] == true))
    };
    let v = wait_for("both agents up", &all_up);
    assert_eq!(v["orchestrator"], "orchestrator");
    let agents = v["agents"].as_array().unwrap();
    assert_eq!(agents[0]["name"], "origin-1");
    assert_eq!(agents[1]["name"], "target-1");
    for a in agents {
        assert_eq!(a["bluemind_version"], "5.1.2");
        assert_eq!(a["postgresql_version"], "15.18");
        assert!(a["last_seen_unix_ms"].as_i64().unwrap() > 0);
    }
    // State is readable by its owner only.
    assert_eq!(mode(&dir.path().join("state/orchestrator.db")), 0o600);
    assert_eq!(mode(&dir.path().join("origin-1/state")), 0o700);
    assert_eq!(
        mode(&dir.path().join("origin-1/state/operations.db")),
        0o600
    );
    // The first check measured the spool: one message of 22 bytes on origin-1.
    let cyrus = &agents[0]["data_dirs"][0];
    assert_eq!(cyrus["path"], "/var/spool/cyrus");
    assert_eq!(cyrus["used_bytes"], 22);

    // The table for people.
    let out = bmctl(&["fleet", "status", "--orchestrator", &orchestrator], &env);
    let table = text(&out.stdout);
    assert!(out.status.success());
    assert!(table.starts_with("AGENT"), "{table}");
    assert!(table.contains("2/2 agents up"), "{table}");

    // An agent goes away: the orchestrator marks it down with the reason.
    drop(a2);
    let v = wait_for("target-1 down", &|v| v["agents"][1]["up"] == false);
    let error = v["agents"][1]["last_error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        error.contains("onnection refused") || error.contains("no answer"),
        "{error}"
    );

    // An agent's certificate may not use the Fleet API.
    let as_agent = [
        ("BMFLEET_CA", pki.join("ca.pem")),
        ("BMFLEET_CERT", pki.join("origin-1.pem")),
        ("BMFLEET_KEY", pki.join("origin-1-key.pem")),
    ];
    let env_agent: Vec<(&str, &Path)> = as_agent.iter().map(|(k, v)| (*k, v.as_path())).collect();
    let out = bmctl(
        &["fleet", "status", "--orchestrator", &orchestrator],
        &env_agent,
    );
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("role operator"), "{err}");

    // Nobody listening: a clear message, not a panic.
    let nowhere = format!("127.0.0.1:{}", free_port());
    let out = bmctl(&["fleet", "status", "--orchestrator", &nowhere], &env);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains(&format!("the orchestrator at {nowhere} did not answer")),
        "{err}"
    );
    assert!(err.contains("onnection refused"), "{err}");
}

#[test]
fn bmctl_plans_the_example_fleet_and_names_the_line_and_field_of_a_broken_one() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/fleet.example.toml");
    let out = bmctl(
        &[
            "fleet",
            "plan",
            example.to_str().unwrap(),
            "--output",
            "json",
        ],
        &[],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<_> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["instance"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["mail-01", "mail-02", "mail-03"]);
    assert!(
        rows.as_array()
            .unwrap()
            .iter()
            .all(|r| r["start"].is_string()),
        "{rows}"
    );
    assert_eq!(rows[0]["canary"], true);

    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("fleet.toml");
    std::fs::write(
        &broken,
        std::fs::read_to_string(&example).unwrap().replace(
            "service_ip = \"198.18.0.102/24\"",
            "service_ip = \"198.18.0.101/24\"",
        ),
    )
    .unwrap();
    let out = bmctl(&["fleet", "plan", broken.to_str().unwrap()], &[]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("fleet.toml:") && err.contains("instance[1].service_ip: 198.18.0.101 is already the service IP of instance 'mail-01'"), "{err}");
}
