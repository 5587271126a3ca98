//! Onboarding in the network lab: six hosts with sshd and no agent are enrolled in parallel by
//! `bmctl fleet enroll` (the real openssh crate, a one-time join token per host, the key made
//! on the host), then migrated, then decommissioned. Join tokens are refused when reused,
//! expired or forged; a host without sshd and a host without systemd are reported by name
//! while the others go on.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use bmfleet_tests::binary;
use bmfleet_tests::lab_fleet::{bluemind_version, service_ip, LabFleet, LabParams};

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs `bmfleet-agent enroll` in the orchestrator's host with `token` on stdin.
fn enroll_by_hand(fleet: &LabFleet, name: &str, token: &str, dir: &std::path::Path) -> Output {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::copy(fleet.dir().join("pki/ca.pem"), dir.join("ca.pem")).unwrap();
    let orch_ip = fleet.lab.host("orch").ip;
    let mut child = fleet
        .lab
        .command("orch", binary("bmfleet-agent"))
        .args(["enroll", "--name", name, "--orchestrator"])
        .arg(format!("{orch_ip}:7446"))
        .arg("--dir")
        .arg(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(token.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn token(fleet: &LabFleet, name: &str, ttl: &str) -> String {
    let out = fleet.bmctl(&["fleet", "agents", "token", name, "--ttl", ttl]);
    assert!(out.status.success(), "{}", text(&out));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Whether an agent process runs from `bin` (a path unique to its lab host).
fn agent_running(bin: &std::path::Path) -> bool {
    Command::new("pgrep")
        .arg("-f")
        .arg(bin)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

#[test]
fn six_hosts_enrolled_from_nothing_then_migrated_then_decommissioned() {
    let fleet = LabFleet::build(LabParams {
        pairs: 3,
        messages: 300,
        db_rows: 2000,
        deliver_ms: 40,
        enroll: true,
        logical_pair: None,
        ..LabParams::default()
    });
    fleet.wait_for_orchestrator().unwrap();
    let scratch = fleet.dir().join("scratch");
    // Before enrollment the orchestrator knows no agent: plan (with connection settings) and
    // apply both say so, as refusals.
    let fleet_file = fleet.dir().join("fleet.toml");
    std::fs::write(&fleet_file, fleet.fleet_file()).unwrap();
    let fleet_path = fleet_file.display().to_string();
    let out = fleet.bmctl(&["fleet", "plan", &fleet_path]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("the orchestrator does not know agent origin-1"),
        "{}",
        text(&out)
    );
    let out = fleet.bmctl(&["fleet", "apply", &fleet_path]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("refused") && !text(&out).contains("did not answer"),
        "{}",
        text(&out)
    );
    // Two hosts that cannot be enrolled: nothing listens on ssh at the orchestrator's
    // address; origin-1 answers ssh but systemd is not its PID 1.
    let mut inventory = fleet.enroll_inventory();
    inventory += &format!(
        "\n[[host]]\nssh = \"root@{}\"\nname = \"no-sshd\"\nrole = \"target\"\n\
         \n[[host]]\nssh = \"root@{}\"\nname = \"wants-systemd\"\nrole = \"target\"\n\
         supervisor = \"systemd\"\nconfig_dir = \"{}\"\n",
        fleet.lab.host("orch").ip,
        fleet.lab.host("origin-1").ip,
        scratch.join("etc").display()
    );
    let path = fleet.dir().join("hosts.toml");
    std::fs::write(&path, inventory).unwrap();
    let inventory = path.display().to_string();
    let out = fleet.bmctl(&["fleet", "enroll", "--inventory", &inventory]);
    let report = text(&out);
    assert!(
        !out.status.success(),
        "two hosts cannot be enrolled:\n{report}"
    );
    assert!(report.contains("2 of 8 hosts not enrolled"), "{report}");
    let line = |name: &str| {
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no line for {name}:\n{report}"))
            .to_string()
    };
    assert!(
        line("no-sshd").contains("FAILED") && line("no-sshd").contains("Connection refused"),
        "{report}"
    );
    assert!(
        line("wants-systemd").contains("FAILED") && line("wants-systemd").contains("no systemd"),
        "{report}"
    );
    let hosts: Vec<String> = (1..=3)
        .flat_map(|i| [format!("origin-{i}"), format!("target-{i}")])
        .collect();
    for host in &hosts {
        assert!(
            line(host).contains(" ok ")
                && line(host).contains("certificate issued")
                && line(host).ends_with("up"),
            "{report}"
        );
        // The private key was made on the host and stays there: 0600, and the CA's
        // directory holds the host's certificate only.
        let key = fleet.root(host).join("etc/bmfleet/tls/agent-key.pem");
        let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", key.display());
        assert!(fleet.dir().join(format!("pki/{host}.pem")).exists());
        // agent.toml was written from the base and what the host has.
        let written =
            std::fs::read_to_string(fleet.root(host).join("etc/bmfleet/agent.toml")).unwrap();
        let pair: usize = host.rsplit('-').next().unwrap().parse().unwrap();
        assert!(
            written.starts_with(&format!(
                "# BlueMind {} found here.",
                bluemind_version(pair)
            )),
            "{written}"
        );
        // The lab's third target is of a newer distribution: its card is ens18.
        let card = if host == "target-3" {
            bmfleet_tests::lab_fleet::RENAMED_CARD
        } else {
            "eth0"
        };
        assert!(
            written.contains(&format!("# interface: {card}")),
            "{written}"
        );
        assert!(!fleet.dir().join(format!("pki/{host}-key.pem")).exists());
    }

    // The orchestrator knows them without a restart, origins with their data plane.
    let out = fleet.bmctl(&["fleet", "agents", "list", "--output", "json"]);
    let agents: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let agents = agents.as_array().unwrap();
    assert_eq!(agents.len(), 6, "{agents:?}");
    for a in agents {
        assert_eq!(a["source"], "registered", "{a}");
        assert_eq!(a["up"], true, "{a}");
        let origin = a["name"].as_str().unwrap().starts_with("origin");
        assert_eq!(
            a["data_address"].as_str().unwrap().ends_with(":7444"),
            origin,
            "{a}"
        );
    }

    // A re-run changes nothing on a host that is done.
    let out = fleet.bmctl(&[
        "fleet",
        "enroll",
        "--inventory",
        &inventory,
        "--only",
        "target-2",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("already enrolled, up"),
        "{}",
        text(&out)
    );

    // Join tokens: one enrollment each, before they expire, and only as issued.
    let once = token(&fleet, "spare-1", "600");
    let first = enroll_by_hand(&fleet, "spare-1", &once, &scratch.join("a"));
    assert!(first.status.success(), "{}", text(&first));
    let again = enroll_by_hand(&fleet, "spare-1", &once, &scratch.join("b"));
    assert!(!again.status.success());
    assert!(text(&again).contains("already used"), "{}", text(&again));
    let short = token(&fleet, "spare-2", "1");
    std::thread::sleep(Duration::from_millis(2100));
    let late = enroll_by_hand(&fleet, "spare-2", &short, &scratch.join("c"));
    assert!(text(&late).contains("expired"), "{}", text(&late));
    let (id, _) = once.rsplit_once('.').unwrap();
    let forged = format!("{id}.{}", "0".repeat(32));
    let out = enroll_by_hand(&fleet, "spare-1", &forged, &scratch.join("d"));
    assert!(text(&out).contains("unknown join token"), "{}", text(&out));
    let other = token(&fleet, "spare-3", "600");
    let out = enroll_by_hand(&fleet, "spare-4", &other, &scratch.join("e"));
    assert!(
        text(&out).contains("issued for 'spare-3'"),
        "{}",
        text(&out)
    );
    assert!(!scratch.join("e/agent.pem").exists());
    // The refused request did not spend the token: the host it was issued for enrolls.
    let out = enroll_by_hand(&fleet, "spare-3", &other, &scratch.join("e3"));
    assert!(out.status.success(), "{}", text(&out));

    // A token never names another identity of the PKI dir: the orchestrator, an operator,
    // the CA or the revocation list, a private key's file, or an enrolled agent (unless the
    // operator asks to re-enroll it). Nothing there changes.
    let pki = fleet.dir().join("pki");
    let files = |dir: &std::path::Path| -> Vec<(String, Vec<u8>)> {
        let mut all: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .filter(|e| e.path().is_file())
            .map(|e| {
                (
                    e.file_name().to_string_lossy().into_owned(),
                    std::fs::read(e.path()).unwrap(),
                )
            })
            .collect();
        all.sort();
        all
    };
    let before = files(&pki);
    for (name, why) in [
        ("orchestrator", "reserved"),
        ("ca", "reserved"),
        ("crl", "reserved"),
        ("target-2-key", "reserved"),
        ("operator", "role operator"),
        ("target-2", "enrolled already"),
    ] {
        let out = fleet.bmctl(&["fleet", "agents", "token", name]);
        assert!(!out.status.success(), "{name}: {}", text(&out));
        assert!(text(&out).contains(why), "{name}: {}", text(&out));
    }
    assert_eq!(files(&pki), before, "a refused token changed the PKI dir");
    // Re-enrolling an agent is the operator's explicit choice; its old certificate is
    // revoked at enrollment.
    let out = fleet.bmctl(&["fleet", "agents", "token", "spare-1", "--reenroll"]);
    assert!(out.status.success(), "{}", text(&out));
    let again = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let out = enroll_by_hand(&fleet, "spare-1", &again, &scratch.join("f"));
    assert!(out.status.success(), "{}", text(&out));
    // The fleet has a revocation list now: a re-run of enroll wires it into the host's
    // agent.toml and keeps its copy current.
    let out = fleet.bmctl(&[
        "fleet",
        "enroll",
        "--inventory",
        &inventory,
        "--only",
        "target-2",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("revocation list updated"),
        "{}",
        text(&out)
    );
    let tls = fleet.root("target-2").join("etc/bmfleet/tls");
    assert_eq!(
        std::fs::read(tls.join("crl.pem")).unwrap(),
        std::fs::read(pki.join("crl.pem")).unwrap()
    );
    let config =
        std::fs::read_to_string(fleet.root("target-2").join("etc/bmfleet/agent.toml")).unwrap();
    assert!(
        config.contains(&format!("crl = \"{}\"", tls.join("crl.pem").display())),
        "{config}"
    );
    let audit = fleet.bmctl(&["fleet", "audit", "--limit", "200"]);
    assert!(
        String::from_utf8_lossy(&audit.stdout)
            .matches("Enroll")
            .count()
            >= 10,
        "{}",
        text(&audit)
    );

    // The enrolled fleet plans cleanly, and migrates.
    let out = fleet.bmctl(&["fleet", "plan", &fleet_path]);
    assert!(out.status.success(), "{}", text(&out));
    let outcomes = fleet.migrate(Duration::from_secs(600), |_| {}).unwrap();
    for (i, o) in outcomes.iter().enumerate() {
        assert_eq!(o.phase, "Done", "{o:?}");
        // Seen from outside: the target serves with the origin's data, by content.
        fleet
            .check_migrated(i + 1)
            .unwrap_or_else(|e| panic!("{e}"));
    }

    // Decommission: the first pair's agents go, certificates revoked; the server stays.
    let out = fleet.bmctl(&[
        "fleet",
        "decommission",
        "--instance",
        "mail-1",
        "--inventory",
        &inventory,
    ]);
    assert!(out.status.success(), "{}", text(&out));
    for host in ["origin-1", "target-1"] {
        let root = fleet.root(host);
        let bin = root.join("usr/local/bin/bmfleet-agent");
        assert!(!bin.exists() && !agent_running(&bin), "{host}");
        assert!(!root.join("etc/bmfleet/tls").exists(), "{host}");
        assert!(!root.join("etc/bmfleet/agent.toml").exists(), "{host}");
        assert!(!root.join("var/lib/bmfleet-agent").exists(), "{host}");
    }
    assert!(agent_running(
        &fleet.root("origin-2").join("usr/local/bin/bmfleet-agent")
    ));
    let out = fleet.bmctl(&["fleet", "agents", "list", "--output", "json"]);
    let agents: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = agents
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["origin-2", "origin-3", "target-2", "target-3"]);
    let crl = std::fs::read(fleet.dir().join("pki/crl.pem")).unwrap();
    let (_, pem) = x509_parser::pem::parse_x509_pem(&crl).unwrap();
    let (_, crl) = x509_parser::parse_x509_crl(&pem.contents).unwrap();
    // spare-1's first certificate (re-enrolled) and the decommissioned pair are revoked.
    assert_eq!(crl.iter_revoked_certificates().count(), 3);
    // The migrated server still serves its address, without bmfleet.
    let addresses = fleet
        .lab
        .ip("target-1", &["-brief", "address", "show", "eth0"]);
    assert!(addresses.contains(&service_ip(1)), "{addresses}");
}
