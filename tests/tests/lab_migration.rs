//! Three BlueMind instances migrate in the network lab, end to end: real agents, rsync,
//! PostgreSQL, iproute2 and arping, the BlueMind stand-ins, the orchestrator and bmctl.

use std::time::Duration;

use bmfleet_tests::lab_fleet::{service_ip, LabFleet, LabParams};

#[test]
fn three_instances_migrate_with_no_mail_lost() {
    let fleet = LabFleet::build(LabParams::default());
    let started = std::time::Instant::now();
    let outcomes = fleet
        .migrate(Duration::from_secs(300), |_| {})
        .unwrap_or_else(|e| {
            let log =
                std::fs::read_to_string(fleet.dir().join("orchestrator.log")).unwrap_or_default();
            panic!(
                "{e}\norchestrator log tail:\n{}",
                log.lines().rev().take(40).collect::<Vec<_>>().join("\n")
            )
        });
    let whole = started.elapsed().as_secs_f64();
    let events =
        String::from_utf8_lossy(&fleet.bmctl(&["fleet", "events", "--limit", "1000"]).stdout)
            .into_owned();
    for o in &outcomes {
        assert_eq!(o.phase, "Done", "{o:?}\n{events}");
        assert!(
            o.downtime_seconds > 0.0 && o.downtime_seconds < whole,
            "{o:?} vs {whole}s"
        );
        assert!(o.bytes_moved > 0, "{o:?}");
    }
    for i in 1..=3 {
        let (origin, target) = (
            fleet.root(&format!("origin-{i}")),
            fleet.root(&format!("target-{i}")),
        );
        // Every message the stand-in delivered before its origin stopped is on the target.
        let delivered =
            std::fs::read_to_string(origin.join("var/log/standin-delivered.log")).unwrap();
        assert!(delivered.lines().count() > 0);
        for rel in delivered.lines() {
            let on_target = std::fs::read(target.join(rel))
                .unwrap_or_else(|_| panic!("pair {i}: {rel} is missing on the target"));
            assert_eq!(
                on_target,
                std::fs::read(origin.join(rel)).unwrap(),
                "pair {i}: {rel}"
            );
        }
        // The service IP answers from the target, seen from another host.
        let banner = fleet.lab.run_in("orch", || {
            use std::io::Read;
            let mut c = std::net::TcpStream::connect((service_ip(i).as_str(), 143)).unwrap();
            let mut buf = [0u8; 256];
            let n = c.read(&mut buf).unwrap();
            String::from_utf8_lossy(&buf[..n]).into_owned()
        });
        assert!(
            banner.contains(&format!("target-{i}")),
            "pair {i}: {banner}"
        );
        // The switch's neighbour table follows the gratuitous ARP.
        assert_eq!(
            fleet.lab.switch_neighbour(&service_ip(i)),
            Some(fleet.lab.mac(&format!("target-{i}"))),
            "pair {i}"
        );
        // The databases moved.
        for (db, q) in [
            (
                "bj",
                "SELECT count(*), md5(string_agg(login, ',' ORDER BY id)) FROM t_mailbox",
            ),
            ("bj-data", "SELECT count(*) FROM t_message_body"),
        ] {
            assert_eq!(
                fleet.sql(&format!("origin-{i}"), db, q),
                fleet.sql(&format!("target-{i}"), db, q),
                "pair {i} {db}"
            );
        }
        // The API stand-in on the target received the three steps with the right bodies.
        let calls: Vec<serde_json::Value> =
            std::fs::read_to_string(target.join("var/log/standin-api.jsonl"))
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
        let posted: Vec<(String, String)> = calls
            .iter()
            .filter(|c| c["method"] == "POST")
            .map(|c| {
                (
                    c["url"].as_str().unwrap().to_string(),
                    c["body"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        assert_eq!(
            posted[0].0, "/internal-api/system/firewall/_updatefirewallrules",
            "5.x uses bm-core's firewall call"
        );
        assert_eq!(posted[1].0, "/api/system/maildelivery/mgmt/_repair");
        assert_eq!(posted[2].0, "/api/configuration");
        let body: serde_json::Value = serde_json::from_str(&posted[2].1).unwrap();
        let origin_host = format!("198.18.0.{}", 2 * i);
        let target_host = format!("198.18.0.{}", 2 * i + 1);
        assert_eq!(
            body["mynetworks"],
            format!("127.0.0.0/8, {target_host}"),
            "origin {origin_host} replaced"
        );
        assert!(
            calls.iter().all(|c| c["api_key_valid"] == true),
            "{calls:?}"
        );
        // The target's network configuration holds the service IP.
        let persisted =
            std::fs::read_to_string(target.join("etc/network/interfaces.d/bmfleet-service-ip"))
                .unwrap();
        assert!(persisted.contains(&format!("address {}/24", service_ip(i))));
    }
}
