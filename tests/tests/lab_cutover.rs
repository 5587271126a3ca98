//! The service IP moves between two hosts of the network lab: the origin releases it, the
//! target takes it and announces it, the switch's neighbour table follows; and back (rollback).

use std::time::{Duration, Instant};

use bmfleet_proto::identity::Role;
use bmfleet_proto::v1::IpRequest;
use bmfleet_tests::lab::Lab;
use bmfleet_tests::{agent_client, binary, open_tempdir, TestPki};

const SERVICE_IP: &str = "198.18.0.100";

fn agent_toml(pki_files: &bmfleet_proto::tls::TlsFiles, root: &std::path::Path) -> String {
    format!(
        "listen = \"0.0.0.0:7443\"\ndata_root = \"{root}\"\nstate_dir = \"{root}/var/lib/bmfleet-agent\"\n\
         [tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n[network]\nannounce_count = 3\nannounce_period_ms = 600\n",
        pki_files.ca.display(),
        pki_files.cert.display(),
        pki_files.key.display(),
        root = root.display()
    )
}

/// Makes the switch resolve the service IP (as a router would before the move).
fn switch_talks_to_service_ip(lab: &Lab) {
    lab.run_in("switch", || {
        let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        let _ = s.send_to(b"hello", format!("{SERVICE_IP}:9"));
    });
}

fn wait_for_neighbour(lab: &Lab, mac: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if lab.switch_neighbour(SERVICE_IP).as_deref() == Some(mac) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the switch still maps {SERVICE_IP} to {:?}, not {mac}",
            lab.switch_neighbour(SERVICE_IP)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn the_service_ip_moves_to_the_target_and_back_and_the_neighbours_follow() {
    bmfleet_proto::install_crypto_provider();
    let lab = Lab::new(&["orch", "origin", "target"]);
    let pki = TestPki::new();
    let dir = open_tempdir();
    for name in ["origin", "target"] {
        let files = pki.issue(name, Role::Agent);
        let root = dir.path().join(name);
        std::fs::create_dir_all(&root).unwrap();
        let config = dir.path().join(format!("{name}.toml"));
        std::fs::write(&config, agent_toml(&files, &root)).unwrap();
        let mut cmd = lab.command(name, binary("bmfleet-agent"));
        cmd.arg("--config")
            .arg(&config)
            .stderr(std::fs::File::create(dir.path().join(format!("{name}.log"))).unwrap());
        lab.spawn(cmd);
    }
    lab.ip(
        "origin",
        &["addr", "add", &format!("{SERVICE_IP}/24"), "dev", "eth0"],
    );
    switch_talks_to_service_ip(&lab);
    wait_for_neighbour(&lab, &lab.mac("origin"));

    let orch = pki.issue("orchestrator", Role::Orchestrator);
    let (origin_ip, target_ip) = (lab.host("origin").ip, lab.host("target").ip);
    let request = |op: &str| IpRequest {
        operation_id: op.into(),
        address: format!("{SERVICE_IP}/24"),
        interface: "eth0".into(),
    };
    // The orchestrator's side runs inside its own host of the lab.
    let (released, taken, again) = lab.run_in("orch", || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async {
                let origin = agent_client(
                    &pki.ca_path(),
                    Some(&orch),
                    Role::Orchestrator,
                    (origin_ip, 7443).into(),
                    "origin",
                );
                let target = agent_client(
                    &pki.ca_path(),
                    Some(&orch),
                    Role::Orchestrator,
                    (target_ip, 7443).into(),
                    "target",
                );
                let connect_deadline = Instant::now() + Duration::from_secs(20);
                let released = loop {
                    match origin.clone().release_ip(request("m/mail/release/1")).await {
                        Ok(r) => break r.into_inner(),
                        Err(e) if Instant::now() < connect_deadline => {
                            let _ = e;
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                        Err(e) => panic!("origin agent: {e}"),
                    }
                };
                let taken = target
                    .clone()
                    .take_ip(request("m/mail/take/1"))
                    .await
                    .unwrap()
                    .into_inner();
                let again = target
                    .clone()
                    .take_ip(request("m/mail/take/1"))
                    .await
                    .unwrap()
                    .into_inner();
                (released, taken, again)
            })
    });
    assert!(released.ok && released.changed, "{released:?}");
    assert!(taken.ok && taken.changed, "{taken:?}");
    assert!(again.replayed, "a repeated operation id must not run twice");
    assert!(!lab.ip("origin", &["-o", "addr"]).contains(SERVICE_IP));
    assert!(lab
        .ip("target", &["-o", "addr", "show", "dev", "eth0"])
        .contains(&format!("{SERVICE_IP}/24")));
    // Gratuitous ARP: the switch now sends the service IP's traffic to the target.
    wait_for_neighbour(&lab, &lab.mac("target"));
    let persisted = std::fs::read_to_string(
        dir.path()
            .join("target/etc/network/interfaces.d/bmfleet-service-ip"),
    )
    .unwrap();
    assert!(
        persisted.contains(&format!("address {SERVICE_IP}/24")),
        "{persisted}"
    );

    // Rollback: the target lets it go, the origin takes it back, the neighbours follow again.
    let (back_released, back_taken) = lab.run_in("orch", || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async {
                let origin = agent_client(
                    &pki.ca_path(),
                    Some(&orch),
                    Role::Orchestrator,
                    (origin_ip, 7443).into(),
                    "origin",
                );
                let target = agent_client(
                    &pki.ca_path(),
                    Some(&orch),
                    Role::Orchestrator,
                    (target_ip, 7443).into(),
                    "target",
                );
                let r = target
                    .clone()
                    .release_ip(request("m/mail/rollback-release/1"))
                    .await
                    .unwrap()
                    .into_inner();
                let t = origin
                    .clone()
                    .take_ip(request("m/mail/rollback-take/1"))
                    .await
                    .unwrap()
                    .into_inner();
                (r, t)
            })
    });
    assert!(
        back_released.ok && back_taken.ok,
        "{back_released:?} {back_taken:?}"
    );
    assert!(!lab.ip("target", &["-o", "addr"]).contains(SERVICE_IP));
    assert!(!dir
        .path()
        .join("target/etc/network/interfaces.d/bmfleet-service-ip")
        .exists());
    wait_for_neighbour(&lab, &lab.mac("origin"));
}

#[test]
fn an_ipv6_service_address_is_announced_with_an_unsolicited_neighbour_advertisement() {
    // A link-local address: the hosts' own IPv6 space, nothing routable.
    const V6: &str = "fe80::bf:100";
    bmfleet_proto::install_crypto_provider();
    let lab = Lab::new(&["orch", "origin", "target"]);
    let pki = TestPki::new();
    let dir = open_tempdir();
    for name in ["origin", "target"] {
        let files = pki.issue(name, Role::Agent);
        let root = dir.path().join(name);
        std::fs::create_dir_all(&root).unwrap();
        let config = dir.path().join(format!("{name}.toml"));
        std::fs::write(&config, agent_toml(&files, &root)).unwrap();
        let mut cmd = lab.command(name, binary("bmfleet-agent"));
        cmd.arg("--config")
            .arg(&config)
            .stderr(std::fs::File::create(dir.path().join(format!("{name}.log"))).unwrap());
        lab.spawn(cmd);
    }
    lab.ip(
        "origin",
        &[
            "-6",
            "addr",
            "add",
            &format!("{V6}/64"),
            "dev",
            "eth0",
            "nodad",
        ],
    );
    let br0: u32 = lab
        .ip("switch", &["-o", "link", "show", "br0"])
        .split(':')
        .next()
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let wait_for = |mac: String, talk: bool| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while lab.switch_neighbour(V6).as_deref() != Some(mac.as_str()) {
            assert!(
                Instant::now() < deadline,
                "the switch maps {V6} to {:?}, not {mac}",
                lab.switch_neighbour(V6)
            );
            if talk {
                // The switch talks to the address (its own link-local address may still be
                // tentative at first): its neighbour table learns who holds it.
                lab.run_in("switch", move || {
                    let s = std::net::UdpSocket::bind("[::]:0").unwrap();
                    let _ = s.send_to(
                        b"hello",
                        std::net::SocketAddrV6::new(V6.parse().unwrap(), 9, 0, br0),
                    );
                });
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    wait_for(lab.mac("origin"), true);
    let orch = pki.issue("orchestrator", Role::Orchestrator);
    let (origin_ip, target_ip) = (lab.host("origin").ip, lab.host("target").ip);
    let request = |op: &str| IpRequest {
        operation_id: op.into(),
        address: format!("{V6}/64"),
        interface: "eth0".into(),
    };
    let (released, taken) = lab.run_in("orch", || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async {
                let origin = agent_client(
                    &pki.ca_path(),
                    Some(&orch),
                    Role::Orchestrator,
                    (origin_ip, 7443).into(),
                    "origin",
                );
                let target = agent_client(
                    &pki.ca_path(),
                    Some(&orch),
                    Role::Orchestrator,
                    (target_ip, 7443).into(),
                    "target",
                );
                let deadline = Instant::now() + Duration::from_secs(20);
                let released = loop {
                    match origin.clone().release_ip(request("m/v6/release/1")).await {
                        Ok(r) => break r.into_inner(),
                        Err(_) if Instant::now() < deadline => {
                            tokio::time::sleep(Duration::from_millis(200)).await
                        }
                        Err(e) => panic!("origin agent: {e}"),
                    }
                };
                let taken = target
                    .clone()
                    .take_ip(request("m/v6/take/1"))
                    .await
                    .unwrap()
                    .into_inner();
                (released, taken)
            })
    });
    assert!(released.ok && released.changed, "{released:?}");
    assert!(taken.ok && taken.changed, "{taken:?}");
    assert!(lab
        .ip("target", &["-6", "-o", "addr", "show", "dev", "eth0"])
        .contains(&format!("{V6}/64")));
    // The switch follows the unsolicited neighbour advertisement.
    wait_for(lab.mac("target"), false);
}
