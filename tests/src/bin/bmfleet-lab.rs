//! `bmfleet-lab demo [--pairs N] [--messages N] [--db-rows N] [--preinstalled] [--stand-in-mail]`:
//! builds the network lab (N BlueMind origin/target pairs, an orchestrator, and a sender host
//! with the real mail stack), enrolls every host's agent over SSH (`bmctl fleet enroll`),
//! migrates the whole fleet with bmctl while mail is sent and read, prints a per-instance
//! summary and mail line, tears the lab down, and exits 0 only if every instance is Done and
//! verified (its mail too). The last line of output is one JSON object.

use std::process::ExitCode;
use std::time::Duration;

use bmfleet_tests::lab_fleet::{LabFleet, LabParams};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about)]
struct Args {
    #[command(subcommand)]
    command: Mode,
}

/// `bmfleet-lab demo`'s options.
#[derive(clap::Args)]
struct Demo {
    /// Origin/target pairs.
    #[arg(long, default_value_t = 3)]
    pairs: usize,
    /// Messages per origin spool.
    #[arg(long, default_value_t = 2000)]
    messages: usize,
    /// Rows of the biggest table per origin database.
    #[arg(long, default_value_t = 50_000)]
    db_rows: u64,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 900)]
    timeout_secs: u64,
    /// Start with every agent installed and listed in the orchestrator's configuration
    /// (by default the hosts run only sshd, and `bmctl fleet enroll` installs, enrolls
    /// and starts every agent first).
    #[arg(long)]
    preinstalled: bool,
    /// The stand-in's mail (banners, messages written straight into the spool) instead of
    /// the real mail stack (Debian's Postfix and Cyrus IMAP on every host, the internet's
    /// mail sent from a sender host, clients acting over IMAP, every message checked through
    /// the service IP after Done).
    #[arg(long)]
    stand_in_mail: bool,
}

#[derive(Subcommand)]
enum Mode {
    /// Build the lab, migrate every instance, report, tear down.
    Demo(Demo),
    /// The chaos campaign: pairs migrating while faults land at random moments (orchestrator
    /// SIGKILL/SIGTERM, agent SIGKILL, partitions, BlueMind API errors, PostgreSQL crashes,
    /// full disks, slow links, windows closing during a cold sync); invariants checked while
    /// it runs and at the end, alerts in a real Prometheus included. Exits 0 only with no
    /// violation.
    Chaos {
        /// Origin/target pairs.
        #[arg(long, default_value_t = 20)]
        pairs: usize,
        /// The fault schedule's seed (a run replays it).
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Faults to inject.
        #[arg(long, default_value_t = 120)]
        faults: usize,
        /// Longest partition, seconds.
        #[arg(long, default_value_t = 60)]
        max_partition_secs: u64,
        /// Messages per origin spool.
        #[arg(long, default_value_t = 300)]
        messages: usize,
        /// Seconds between two cold syncs (the migration's length).
        #[arg(long, default_value_t = 10)]
        stagger_secs: u64,
        /// Longest pause between two faults, ms.
        #[arg(long, default_value_t = 3000)]
        max_gap_ms: u64,
        /// Every instance's downtime budget, seconds.
        #[arg(long, default_value_t = 20)]
        budget_secs: u64,
        /// The stand-in's mail instead of the real mail stack (Postfix, Cyrus, the sender's
        /// mail and the IMAP clients, every message counted at the end).
        #[arg(long)]
        stand_in_mail: bool,
    },
}

fn main() -> ExitCode {
    let Demo {
        pairs,
        messages,
        db_rows,
        timeout_secs,
        preinstalled,
        stand_in_mail,
    } = match Args::parse().command {
        Mode::Demo(demo) => demo,
        Mode::Chaos {
            pairs,
            seed,
            faults,
            max_partition_secs,
            messages,
            stagger_secs,
            max_gap_ms,
            budget_secs,
            stand_in_mail,
        } => {
            let params = bmfleet_tests::chaos::ChaosParams {
                pairs,
                seed,
                faults,
                messages,
                max_partition_secs,
                stagger_secs,
                max_gap_ms,
                budget_secs,
                real_mail: !stand_in_mail,
                ..Default::default()
            };
            println!("== chaos: {pairs} pairs, {faults} faults, seed {seed}");
            let report = bmfleet_tests::chaos::run(params, |line| println!("{line}"));
            println!("{}", report.table(seed));
            return if report.violations.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            };
        }
    };
    let enroll = !preinstalled;
    println!("== building the lab: {pairs} origin/target pairs, {messages} messages and {db_rows} rows each");
    let fleet = LabFleet::build(LabParams {
        pairs,
        messages,
        db_rows,
        deliver_ms: 40,
        enroll,
        // Pair 3 is a distribution change as the manual means it: its target is newer (its
        // card is ens18, netplan keeps its addresses, it runs PostgreSQL 16) and its
        // databases cross the major by logical replication.
        subscriber_pg16: true,
        real_mail: !stand_in_mail,
        ..LabParams::default()
    });
    if enroll {
        let inventory = fleet.dir().join("hosts.toml");
        if let Err(e) = std::fs::write(&inventory, fleet.enroll_inventory()) {
            eprintln!("demo: {e}");
            return ExitCode::FAILURE;
        }
        println!("== bmctl fleet enroll --inventory {}", inventory.display());
        let out = fleet.bmctl(&[
            "fleet",
            "enroll",
            "--inventory",
            &inventory.display().to_string(),
        ]);
        print!("{}", String::from_utf8_lossy(&out.stdout));
        if !out.status.success() {
            eprintln!(
                "demo: enrollment failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            return ExitCode::FAILURE;
        }
    }
    println!("== fleet file\n{}", fleet.fleet_file());
    if fleet.params.real_mail {
        // Mail that must stay queued through the migration (deferred, held) on each origin.
        for i in 1..=pairs {
            if let Err(e) = fleet.queue_mail_at_origin(i) {
                eprintln!("demo: origin-{i}'s Postfix: {e}");
                return ExitCode::FAILURE;
            }
        }
        println!("== the internet sends mail to every instance through the sender's Postfix (10 a second), clients act over IMAP");
    }
    println!("== bmctl fleet apply, then bmctl fleet status until every instance is finished");
    // Mail clients probe every service IP from outside meanwhile (an IMAP login every 100 ms).
    let watched = bmfleet_tests::mail_traffic::migrate_watched(
        &fleet,
        Duration::from_secs(timeout_secs),
        Duration::from_secs(5),
        |table| println!("{table}"),
    );
    let (result, client_seen) = (watched.outcomes, watched.seen);
    let outcomes = match result {
        Ok(o) => o,
        Err(e) => {
            eprintln!("demo: {e}");
            println!("{}", serde_json::json!({ "instances": [], "error": e }));
            return ExitCode::FAILURE;
        }
    };
    let events = fleet.bmctl(&["fleet", "events", "--limit", "10000"]);
    println!(
        "== transitions\n{}",
        String::from_utf8_lossy(&events.stdout)
    );
    println!("== summary");
    println!(
        "{:<10} {:<10} {:>12} {:>14} {:>9} {:>9} {:>9}",
        "INSTANCE", "PHASE", "DOWNTIME", "BYTES MOVED", "ROWS", "MAIL", "VERIFIED"
    );
    let mut all_ok = true;
    let mut json = Vec::new();
    let mut mail_lines = Vec::new();
    let mut outside: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for (i, o) in outcomes.iter().enumerate() {
        // Verified from outside bmfleet: the target alone holds and answers on the service
        // IP, and its files, tables and sequences equal the origin's by content.
        let checked = if o.phase == "Done" {
            fleet.check_migrated(i + 1)
        } else {
            Err(format!("{} ended {}", o.name, o.phase))
        };
        if let Err(e) = &checked {
            eprintln!("demo: {e}");
        }
        // With the real mail stack, the mail as the internet sent it and its clients left
        // it, read through the service IP with IMAP on the target; the queues as they must be.
        let mail = if fleet.params.real_mail {
            fleet
                .check_queues(i + 1, Duration::from_secs(60))
                .and_then(|_| fleet.check_mail(i + 1))
                .map(Some)
        } else {
            Ok(None)
        };
        if let Err(e) = &mail {
            eprintln!("demo: {e}");
        }
        let verified = checked.is_ok() && mail.is_ok();
        all_ok &= verified;
        let seen = client_seen.get(i).and_then(|v| v.downtime);
        // The longest outage, and every outage as "start+length" seconds since the probes began.
        let outages: Vec<String> = client_seen
            .get(i)
            .map(|v| {
                v.outages
                    .iter()
                    .map(|(at, lasted)| {
                        format!("{:.1}+{:.2}", at.as_secs_f64(), lasted.as_secs_f64())
                    })
                    .collect()
            })
            .unwrap_or_default();
        let seen_text = seen.map_or("none".to_string(), |d| {
            format!("{:.2} s [outages {}]", d.as_secs_f64(), outages.join(", "))
        });
        mail_lines.push(match &mail {
            Ok(Some(m)) => format!(
                "{}: sent {}, delivered {} once each (+{} expunged by clients), duplicated {}, lost {}, flags kept {} of {}, moves kept {v} of {v}, deferred and held mail carried to the target's queue; client-seen downtime {seen_text} (orchestrator {:.2} s)",
                o.name,
                m.sent,
                m.delivered,
                m.expunged,
                m.duplicated,
                m.lost,
                m.flags_kept,
                m.flags_set,
                o.downtime_seconds,
                v = m.moved,
            ),
            Ok(None) => format!(
                "{}: client-seen downtime {seen_text} (orchestrator {:.2} s)",
                o.name, o.downtime_seconds
            ),
            Err(e) => format!("{}: {e}", o.name),
        });
        let files_tables = match &checked {
            Ok(()) => "the target alone holds and answers on the service IP; every data file, table and sequence equals the origin's by content".to_string(),
            Err(e) => format!("FAILED: {e}"),
        };
        outside.insert(
            o.name.clone(),
            vec![files_tables, mail_lines.last().cloned().unwrap_or_default()],
        );
        // What the origin's stand-ins wrote while the migration ran (the origin's BlueMind
        // committing rows, mail arriving and expunged), all compared on the target.
        let origin = format!("origin-{}", i + 1);
        let rows = fleet.rows_committed(&origin).len();
        let writer_errors =
            std::fs::read_to_string(fleet.root(&origin).join("var/log/standin-bluemind.log"))
                .unwrap_or_default();
        if !writer_errors.trim().is_empty() {
            eprintln!("demo: {origin}'s BlueMind stand-in said:\n{writer_errors}");
        }
        println!(
            "{:<10} {:<10} {:>11.2}s {:>14} {:>9} {:>9} {:>9}",
            o.name,
            o.phase,
            o.downtime_seconds,
            o.bytes_moved,
            rows,
            match &mail {
                Ok(Some(m)) => format!("{}/{}", m.delivered, m.sent),
                _ => {
                    let (kept, expunged) = fleet.mail_ledger(&origin);
                    format!("{}-{}", kept.len() + expunged.len(), expunged.len())
                }
            },
            verified
        );
        json.push(serde_json::json!({
            "name": o.name,
            "phase": o.phase,
            "downtime_seconds": o.downtime_seconds,
            "bytes_moved": o.bytes_moved,
            "rows_written": rows,
            "client_seen_downtime_seconds": seen.map(|d| d.as_secs_f64()),
            "mail": mail.as_ref().ok().and_then(|m| m.as_ref()).map(|m| serde_json::json!({
                "sent": m.sent,
                "delivered": m.delivered,
                "expunged": m.expunged,
                "duplicated": m.duplicated,
                "lost": m.lost,
                "flags_kept": m.flags_kept,
                "flags_set": m.flags_set,
                "moved": m.moved,
                "unsure": m.unsure,
            })),
            "verified": verified,
        }));
    }
    // The migration report, kept after the lab goes (the lab's directory does not stay).
    let report_dir = std::env::current_dir()
        .unwrap_or_default()
        .join("target/lab-report");
    // The checks made from outside, beside bmfleet's own evidence in the report.
    let attached = fleet.dir().join("outside-checks.json");
    if let Err(e) = std::fs::write(&attached, serde_json::json!(outside).to_string()) {
        eprintln!("demo: {e}");
    }
    for (format, file) in [("html", "report.html"), ("md", "report.md")] {
        let path = report_dir.join(file);
        let written = std::fs::create_dir_all(&report_dir)
            .map_err(|e| e.to_string())
            .and_then(|_| {
                let out = fleet.bmctl(&[
                    "fleet",
                    "report",
                    "--format",
                    format,
                    "--output",
                    &path.display().to_string(),
                    "--attach",
                    &attached.display().to_string(),
                ]);
                if out.status.success() {
                    Ok(())
                } else {
                    Err(String::from_utf8_lossy(&out.stderr).into_owned())
                }
            });
        match written {
            Ok(()) => println!(
                "== the migration report ({format}) is written to {}",
                path.display()
            ),
            Err(e) => eprintln!("demo: bmctl fleet report --format {format}: {e}"),
        }
    }
    println!("== mail, from outside (what the sender's Postfix accepted against what each service IP serves over IMAP; a probe logs in every 100 ms)");
    for line in &mail_lines {
        println!("{line}");
    }
    drop(fleet);
    println!("== lab torn down");
    println!("{}", serde_json::json!({ "instances": json }));
    if all_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
