//! The Debian packages: `deploy/packages.sh` (cargo-deb) builds bmfleet-agent,
//! bmfleet-orchestrator and bmctl; their contents, dependencies, conffiles and maintainer
//! scripts are checked, their systemd units pass `systemd-analyze verify` without a warning,
//! and the packaged binaries run.

use std::path::{Path, PathBuf};
use std::process::Command;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .to_path_buf()
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run");
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn deb(name: &str) -> PathBuf {
    let dir = workspace().join("target/debian");
    std::fs::read_dir(&dir)
        .expect("target/debian")
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("{name}_")) && n.ends_with(".deb"))
        })
        .unwrap_or_else(|| panic!("no {name} package in {}", dir.display()))
}

/// Extracts a package into a new directory.
fn extract(package: &Path) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    run(Command::new("dpkg-deb")
        .arg("-x")
        .arg(package)
        .arg(dir.path()));
    dir
}

/// `systemd-analyze verify` of a packaged unit, its binary pointed at the extracted one: no
/// error and no warning (an unknown or misspelled directive only warns).
fn verify_unit(root: &Path, unit: &str, binary: &str) {
    let text = std::fs::read_to_string(root.join("usr/lib/systemd/system").join(unit)).unwrap();
    let extracted = root.join("usr/bin").join(binary);
    let copy = root.join(unit);
    std::fs::write(
        &copy,
        text.replace(
            &format!("/usr/bin/{binary}"),
            &extracted.display().to_string(),
        ),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let complaints: Vec<&str> = stderr
        .lines()
        // Outside a booted systemd these two are about the machine, not the unit.
        .filter(|l| !l.contains("sysinit.target") && !l.contains("/bin/kill"))
        .collect();
    assert!(
        out.status.success() && complaints.is_empty(),
        "{unit}: {stderr}"
    );
}

#[test]
fn the_packages_hold_what_a_host_needs() {
    run(Command::new("bash")
        .arg(workspace().join("deploy/packages.sh"))
        .env("PROFILE", "dev")
        .env("FAST", "1"));

    let contents = |name: &str| run(Command::new("dpkg-deb").arg("-c").arg(deb(name)));
    let field = |name: &str, f: &str| {
        run(Command::new("dpkg-deb").arg("-f").arg(deb(name)).arg(f))
            .trim()
            .to_string()
    };

    // The agent: binary, disabled hardened unit, no agent.toml (written per host), its tools.
    let agent = contents("bmfleet-agent");
    for path in [
        "./usr/bin/bmfleet-agent",
        "./usr/lib/systemd/system/bmfleet-agent.service",
        "./usr/share/doc/bmfleet-agent/examples/agent.toml",
    ] {
        assert!(agent.contains(path), "{path} missing:\n{agent}");
    }
    assert!(!agent.contains("./etc/bmfleet/agent.toml"), "{agent}");
    let depends = field("bmfleet-agent", "Depends");
    for dep in ["rsync", "iproute2", "acl", "attr"] {
        assert!(depends.contains(dep), "{depends}");
    }
    // The agent announces a moved service IP itself (an ARP frame on a packet socket).
    assert!(!depends.contains("arping"), "{depends}");
    let root = extract(&deb("bmfleet-agent"));
    verify_unit(root.path(), "bmfleet-agent.service", "bmfleet-agent");
    let unit = std::fs::read_to_string(
        root.path()
            .join("usr/lib/systemd/system/bmfleet-agent.service"),
    )
    .unwrap();
    for directive in ["ProtectSystem=true", "ProtectHome=yes", "PrivateTmp=yes"] {
        assert!(unit.contains(directive), "{unit}");
    }
    let help = run(Command::new(root.path().join("usr/bin/bmfleet-agent")).arg("--help"));
    assert!(
        help.contains("enroll") && help.contains("configure"),
        "{help}"
    );

    // The orchestrator: its configuration a conffile, the unit without any capability.
    let orchestrator = contents("bmfleet-orchestrator");
    for path in [
        "./usr/bin/bmfleet-orchestrator",
        "./etc/bmfleet/orchestrator.toml",
        "./usr/lib/systemd/system/bmfleet-orchestrator.service",
        "./usr/share/bmfleet-orchestrator/prometheus/alerts.yml",
        "./usr/share/bmfleet-orchestrator/grafana/bmfleet-dashboard.json",
    ] {
        assert!(
            orchestrator.contains(path),
            "{path} missing:\n{orchestrator}"
        );
    }
    let control = tempfile::tempdir().unwrap();
    run(Command::new("dpkg-deb")
        .arg("-e")
        .arg(deb("bmfleet-orchestrator"))
        .arg(control.path()));
    let conffiles = std::fs::read_to_string(control.path().join("conffiles")).unwrap();
    assert_eq!(conffiles.trim(), "/etc/bmfleet/orchestrator.toml");
    let postinst = std::fs::read_to_string(control.path().join("postinst")).unwrap();
    assert!(
        postinst.contains("/etc/bmfleet/pki") && postinst.contains("deb-systemd-helper"),
        "{postinst}"
    );
    let root = extract(&deb("bmfleet-orchestrator"));
    verify_unit(
        root.path(),
        "bmfleet-orchestrator.service",
        "bmfleet-orchestrator",
    );
    let config = root.path().join("etc/bmfleet/orchestrator.toml");
    bmfleet_orchestrator::config::OrchestratorConfig::load(&config).unwrap();

    // bmctl: the command line and its completions.
    let bmctl = contents("bmctl");
    for path in [
        "./usr/bin/bmctl",
        "./usr/share/bash-completion/completions/bmctl",
        "./usr/share/zsh/vendor-completions/_bmctl",
        "./usr/share/fish/vendor_completions.d/bmctl.fish",
    ] {
        assert!(bmctl.contains(path), "{path} missing:\n{bmctl}");
    }
    assert!(field("bmctl", "Depends").contains("openssh-client"));
    let root = extract(&deb("bmctl"));
    let completion = std::fs::read_to_string(
        root.path()
            .join("usr/share/bash-completion/completions/bmctl"),
    )
    .unwrap();
    assert!(
        completion.contains("decommission") && completion.contains("enroll"),
        "the bash completion knows the commands"
    );
    let help = run(Command::new(root.path().join("usr/bin/bmctl")).args(["fleet", "--help"]));
    assert!(help.contains("enroll") && help.contains("agents"), "{help}");
}
