//! The service IP moves between two hosts of the network lab: the origin releases it, the
//! target takes it and announces it, the switch's neighbour table follows; and back (rollback).
//! IPv4 with gratuitous ARP, IPv6 with an unsolicited neighbour advertisement.

use std::time::{Duration, Instant};

use bmfleet_proto::identity::Role;
use bmfleet_proto::tls::TlsFiles;
use bmfleet_proto::v1::{IpReply, IpRequest};
use bmfleet_tests::lab::Lab;
use bmfleet_tests::{agent_client, binary, open_tempdir, TestPki};

const SERVICE_IP: &str = "198.18.0.100";

/// An orchestrator host and two agents (origin, target) in a lab.
struct CutoverLab {
    lab: Lab,
    pki: TestPki,
    dir: tempfile::TempDir,
    orchestrator: TlsFiles,
}

impl CutoverLab {
    fn new() -> Self {
        bmfleet_proto::install_crypto_provider();
        let lab = Lab::new(&["orch", "origin", "target"]);
        let pki = TestPki::new();
        let dir = open_tempdir();
        for name in ["origin", "target"] {
            let files = pki.issue(name, Role::Agent);
            let root = dir.path().join(name);
            std::fs::create_dir_all(&root).unwrap();
            let config = dir.path().join(format!("{name}.toml"));
            std::fs::write(
                &config,
                format!(
                    "listen = \"0.0.0.0:7443\"\ndata_root = \"{root}\"\nstate_dir = \"{root}/var/lib/bmfleet-agent\"\n\
                     [tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n[network]\nannounce_count = 3\nannounce_period_ms = 600\npersist = \"ifupdown\"\n",
                    files.ca.display(),
                    files.cert.display(),
                    files.key.display(),
                    root = root.display()
                ),
            )
            .unwrap();
            let mut cmd = lab.command(name, binary("bmfleet-agent"));
            cmd.arg("--config")
                .arg(&config)
                .stderr(std::fs::File::create(dir.path().join(format!("{name}.log"))).unwrap());
            lab.spawn(cmd);
        }
        let orchestrator = pki.issue("orchestrator", Role::Orchestrator);
        CutoverLab {
            lab,
            pki,
            dir,
            orchestrator,
        }
    }

    /// Runs `moves` in order from the orchestrator's host: (agent, take or release, op id).
    fn move_ip(&self, address: &str, moves: &[(&str, bool, &str)]) -> Vec<IpReply> {
        let hosts: Vec<_> = moves
            .iter()
            .map(|(h, _, _)| (h.to_string(), self.lab.host(h).ip))
            .collect();
        self.lab.run_in("orch", || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(async {
                    let mut replies = Vec::new();
                    for ((name, ip), (_, take, op)) in hosts.iter().zip(moves) {
                        let client = agent_client(
                            &self.pki.ca_path(),
                            Some(&self.orchestrator),
                            Role::Orchestrator,
                            (*ip, 7443).into(),
                            name,
                        );
                        let request = IpRequest {
                            operation_id: op.to_string(),
                            address: address.to_string(),
                            interface: "eth0".into(),
                        };
                        // The agents may still be starting.
                        let deadline = Instant::now() + Duration::from_secs(20);
                        let reply = loop {
                            let mut c = client.clone();
                            let answer = if *take {
                                c.take_ip(request.clone()).await
                            } else {
                                c.release_ip(request.clone()).await
                            };
                            match answer {
                                Ok(r) => break r.into_inner(),
                                Err(_) if Instant::now() < deadline => {
                                    tokio::time::sleep(Duration::from_millis(200)).await
                                }
                                Err(e) => panic!("{name}: {e}"),
                            }
                        };
                        replies.push(reply);
                    }
                    replies
                })
        })
    }

    /// Waits until the switch maps `addr` to `host`'s MAC; `talk` sends it traffic meanwhile
    /// (so the switch resolves it, as a router would).
    fn wait_for_neighbour(&self, addr: &str, host: &str, talk: impl Fn()) {
        let mac = self.lab.mac(host);
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.lab.switch_neighbour(addr).as_deref() != Some(mac.as_str()) {
            assert!(
                Instant::now() < deadline,
                "the switch maps {addr} to {:?}, not {host}'s {mac}",
                self.lab.switch_neighbour(addr)
            );
            talk();
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

#[test]
fn the_service_ip_moves_to_the_target_and_back_and_the_neighbours_follow() {
    let c = CutoverLab::new();
    c.lab.ip(
        "origin",
        &["addr", "add", &format!("{SERVICE_IP}/24"), "dev", "eth0"],
    );
    let talk = || {
        c.lab.run_in("switch", || {
            let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
            let _ = s.send_to(b"hello", format!("{SERVICE_IP}:9"));
        })
    };
    c.wait_for_neighbour(SERVICE_IP, "origin", talk);

    let cidr = format!("{SERVICE_IP}/24");
    let replies = c.move_ip(
        &cidr,
        &[
            ("origin", false, "m/mail/release/1"),
            ("target", true, "m/mail/take/1"),
            ("target", true, "m/mail/take/1"),
        ],
    );
    assert!(replies[0].ok && replies[0].changed, "{replies:?}");
    assert!(replies[1].ok && replies[1].changed, "{replies:?}");
    assert!(
        replies[2].replayed,
        "a repeated operation id must not run twice"
    );
    assert!(!c.lab.ip("origin", &["-o", "addr"]).contains(SERVICE_IP));
    assert!(c
        .lab
        .ip("target", &["-o", "addr", "show", "dev", "eth0"])
        .contains(&cidr));
    // Gratuitous ARP: the switch now sends the service IP's traffic to the target.
    c.wait_for_neighbour(SERVICE_IP, "target", || {});
    let persisted_file = c
        .dir
        .path()
        .join("target/etc/network/interfaces.d/bmfleet-service-ip");
    let persisted = std::fs::read_to_string(&persisted_file).unwrap();
    assert!(
        persisted.contains(&format!("address {cidr}")),
        "{persisted}"
    );

    // Rollback: the target lets it go, the origin takes it back, the neighbours follow again.
    let back = c.move_ip(
        &cidr,
        &[
            ("target", false, "m/mail/rollback-release/1"),
            ("origin", true, "m/mail/rollback-take/1"),
        ],
    );
    assert!(back.iter().all(|r| r.ok), "{back:?}");
    assert!(!c.lab.ip("target", &["-o", "addr"]).contains(SERVICE_IP));
    assert!(!persisted_file.exists());
    c.wait_for_neighbour(SERVICE_IP, "origin", || {});
}

#[test]
fn an_ipv6_service_address_is_announced_with_an_unsolicited_neighbour_advertisement() {
    // A link-local address: the hosts' own IPv6 space, nothing routable.
    const V6: &str = "fe80::bf:100";
    let c = CutoverLab::new();
    c.lab.ip(
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
    let br0: u32 = c
        .lab
        .ip("switch", &["-o", "link", "show", "br0"])
        .split(':')
        .next()
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // The switch's own link-local address may still be tentative at first: keep talking.
    c.wait_for_neighbour(V6, "origin", || {
        c.lab.run_in("switch", move || {
            let s = std::net::UdpSocket::bind("[::]:0").unwrap();
            let _ = s.send_to(
                b"hello",
                std::net::SocketAddrV6::new(V6.parse().unwrap(), 9, 0, br0),
            );
        })
    });
    let cidr = format!("{V6}/64");
    let replies = c.move_ip(
        &cidr,
        &[
            ("origin", false, "m/v6/release/1"),
            ("target", true, "m/v6/take/1"),
        ],
    );
    assert!(replies.iter().all(|r| r.ok && r.changed), "{replies:?}");
    assert!(c
        .lab
        .ip("target", &["-6", "-o", "addr", "show", "dev", "eth0"])
        .contains(&cidr));
    // Without traffic, only the unsolicited neighbour advertisement can move the entry.
    c.wait_for_neighbour(V6, "target", || {});
}
