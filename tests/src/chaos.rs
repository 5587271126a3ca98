//! The chaos campaign: N BlueMind pairs migrate in the network lab while faults land at
//! random moments from a seed (a run replays its fault schedule exactly): orchestrator SIGKILL
//! and SIGTERM, agent SIGKILL on origins and targets, network partitions of one host or of the
//! orchestrator (link down for a while), a target's BlueMind API answering 500 or hanging, a
//! target's PostgreSQL crashing. Invariants are checked while it runs (the service IP
//! of every instance held by at most one host, sampled 10 times a second) and at the end (every
//! instance finished; Done ones have every delivered message and the databases; rolled-back
//! ones serve on the origin; no grant left valid, no replication slot or role on an origin,
//! no standby left on a target, no rsync left running). `bmfleet-lab chaos`
//! runs it; `tests/tests/chaos.rs` runs a short fixed-seed version.

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::lab_fleet::{service_ip, LabFleet, LabParams};
use crate::SeededRng;

/// A campaign's size and seed.
#[derive(Debug, Clone, Copy)]
pub struct ChaosParams {
    /// Origin/target pairs.
    pub pairs: usize,
    /// The seed of the fault schedule.
    pub seed: u64,
    /// Faults to inject.
    pub faults: usize,
    /// Messages per origin spool.
    pub messages: usize,
    /// Rows of the biggest table per origin.
    pub db_rows: u64,
    /// Longest partition, seconds.
    pub max_partition_secs: u64,
    /// Longest pause between two faults, ms (the shortest is a tenth of it).
    pub max_gap_ms: u64,
    /// Seconds between two cold syncs (spreads the migration over the faults).
    pub stagger_secs: u64,
    /// Every instance must be finished this long after the last fault.
    pub deadline_secs: u64,
}

impl Default for ChaosParams {
    fn default() -> Self {
        ChaosParams {
            pairs: 20,
            seed: 1,
            faults: 120,
            messages: 300,
            db_rows: 2000,
            max_partition_secs: 60,
            max_gap_ms: 3000,
            stagger_secs: 10,
            deadline_secs: 1800,
        }
    }
}

/// One fault injected.
#[derive(Debug, Clone)]
pub struct Fault {
    /// Seconds since the apply.
    pub at_secs: f64,
    /// Its kind.
    pub kind: &'static str,
    /// Where.
    pub target: String,
}

/// What a campaign saw.
#[derive(Debug, Default)]
pub struct ChaosReport {
    /// Faults injected, in order.
    pub faults: Vec<Fault>,
    /// Instances by final phase.
    pub phases: BTreeMap<String, usize>,
    /// Invariant violations (must be none).
    pub violations: Vec<String>,
    /// Downtimes of the Done instances, seconds, sorted.
    pub downtimes: Vec<f64>,
    /// Service-IP samples taken.
    pub samples: u64,
    /// Samples that saw both hosts of a pair holding the IP, not confirmed by reading them
    /// again at once in the other order (a cutover or rollback between two reads).
    pub sample_races: u64,
}

impl ChaosReport {
    /// The report as a table.
    pub fn table(&self, seed: u64) -> String {
        let mut by_kind: BTreeMap<&str, usize> = BTreeMap::new();
        for f in &self.faults {
            *by_kind.entry(f.kind).or_default() += 1;
        }
        let mut out = format!("seed {seed}\n\n| faults injected | count |\n| --- | ---: |\n");
        for (k, n) in &by_kind {
            out += &format!("| {k} | {n} |\n");
        }
        out += "\n| instances | count |\n| --- | ---: |\n";
        for (p, n) in &self.phases {
            out += &format!("| {p} | {n} |\n");
        }
        let pick = |q: f64| {
            self.downtimes
                .get(((self.downtimes.len() as f64 - 1.0) * q).round() as usize)
                .copied()
                .unwrap_or(0.0)
        };
        out += &format!(
            "\n| invariant violations | {} |\n| service-IP samples | {} ({} single-sample races) |\n| downtime min / median / max | {:.2} / {:.2} / {:.2} s |\n",
            self.violations.len(),
            self.samples,
            self.sample_races,
            pick(0.0),
            pick(0.5),
            pick(1.0)
        );
        for v in &self.violations {
            out += &format!("\nVIOLATION: {v}");
        }
        out
    }
}

/// A pause between `from` and `to` ms, from the campaign's generator.
fn millis(rng: &mut SeededRng, from: u64, to: u64) -> Duration {
    Duration::from_millis(from + rng.below(to.saturating_sub(from) + 1))
}

/// Which lab hosts hold which service IPs now (one `ip` run over every namespace).
fn holders(fleet: &LabFleet) -> BTreeMap<String, Vec<String>> {
    let out = Command::new("ip")
        .args([
            "-all", "netns", "exec", "ip", "-4", "-br", "addr", "show", "dev", "eth0",
        ])
        .output();
    let text = out
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let names: BTreeMap<String, String> = fleet
        .lab
        .hosts()
        .iter()
        .map(|h| (h.ns.clone(), h.name.clone()))
        .collect();
    let mut held: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut host = None;
    for line in text.lines() {
        if let Some(ns) = line.strip_prefix("netns: ") {
            host = names.get(ns.trim()).cloned();
            continue;
        }
        let Some(h) = &host else { continue };
        for word in line.split_whitespace().skip(2) {
            let ip = word.split('/').next().unwrap_or_default().to_string();
            held.entry(ip).or_default().push(h.clone());
        }
    }
    held
}

/// Runs a campaign.
pub fn run(params: ChaosParams, mut progress: impl FnMut(&str)) -> ChaosReport {
    let fleet = LabFleet::build(LabParams {
        pairs: params.pairs,
        messages: params.messages,
        db_rows: params.db_rows,
        deliver_ms: 40,
        enroll: false,
        ..LabParams::default()
    });
    let mut report = ChaosReport::default();
    let text = fleet.fleet_file().replace(
        "min_stagger_secs = 1\n",
        &format!("min_stagger_secs = {}\n", params.stagger_secs),
    );
    if let Err(e) = fleet.apply_text(&text) {
        report
            .violations
            .push(format!("the fleet could not be applied: {e}"));
        return report;
    }
    let started = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let violations = Arc::new(Mutex::new(Vec::<String>::new()));
    let samples = std::thread::scope(|scope| {
        // The service IP is never on both hosts of a pair, sampled 10 times a second. One
        // sample reads the namespaces one after the other, not at one instant: a cutover
        // between the origin's read and the target's would show both. So a pair seen on both
        // is read again at once, target first then origin (a cutover releases on the origin
        // before it takes on the target, a rollback the other way round): both again is a
        // violation; otherwise it was a race between two reads, counted.
        let sampler = {
            let (stop, violations, fleet) = (stop.clone(), violations.clone(), &fleet);
            scope.spawn(move || {
                let (mut samples, mut races) = (0u64, 0u64);
                while !stop.load(Ordering::Relaxed) {
                    let held = holders(fleet);
                    samples += 1;
                    for i in 1..=params.pairs {
                        if held.get(&service_ip(i)).is_none_or(|h| h.len() < 2) {
                            continue;
                        }
                        let on = |host: String| {
                            let text = fleet
                                .lab
                                .ip(&host, &["-4", "-br", "addr", "show", "dev", "eth0"]);
                            text.split_whitespace()
                                .any(|w| w.split('/').next() == Some(service_ip(i).as_str()))
                        };
                        let target = on(format!("target-{i}"));
                        let origin = on(format!("origin-{i}"));
                        if !(target && origin) {
                            races += 1;
                            continue;
                        }
                        if let Ok(mut v) = violations.lock() {
                            v.push(format!(
                                "{:.1} s: {} held by origin-{i} and target-{i}",
                                started.elapsed().as_secs_f64(),
                                service_ip(i),
                            ));
                        }
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                (samples, races)
            })
        };
        let mut rng = SeededRng::new(params.seed);
        let hosts: Vec<String> = fleet
            .lab
            .hosts()
            .iter()
            .skip(1)
            .map(|h| h.name.clone())
            .collect();
        let finished = |fleet: &LabFleet| {
            let instances = fleet.instances();
            !instances.is_empty()
                && instances.iter().all(|i| {
                    matches!(
                        i["phase"].as_str(),
                        Some("Done" | "RolledBack" | "Failed" | "Aborted")
                    )
                })
        };
        while report.faults.len() < params.faults && !finished(&fleet) {
            std::thread::sleep(millis(&mut rng, params.max_gap_ms / 10, params.max_gap_ms));
            let at_secs = started.elapsed().as_secs_f64();
            let host = hosts[rng.below(hosts.len() as u64) as usize].clone();
            let target_host = format!("target-{}", 1 + rng.below(params.pairs as u64));
            let (kind, target) = match rng.below(10) {
                0 | 1 => {
                    fleet.restart_orchestrator();
                    ("orchestrator SIGKILL", "orch".to_string())
                }
                2 => {
                    fleet.lab.signal_matching(
                        "orch",
                        "bmfleet-orchestrator",
                        nix::sys::signal::Signal::SIGTERM,
                    );
                    fleet.start_orchestrator();
                    ("orchestrator SIGTERM", "orch".to_string())
                }
                3..=5 => {
                    fleet.kill_agent(&host);
                    std::thread::sleep(millis(&mut rng, 200, 2000));
                    fleet.start_agent(&host);
                    ("agent SIGKILL", host)
                }
                6 | 7 => {
                    let (name, kind) = if rng.below(4) == 0 {
                        ("orch".to_string(), "orchestrator partition")
                    } else {
                        (host, "host partition")
                    };
                    fleet.lab.ip(&name, &["link", "set", "eth0", "down"]);
                    std::thread::sleep(millis(&mut rng, 1000, params.max_partition_secs * 1000));
                    fleet.lab.ip(&name, &["link", "set", "eth0", "up"]);
                    (kind, name)
                }
                8 => {
                    // The target's core answers the next call with HTTP 500, or hangs on it
                    // longer than the agent waits: the post-migration step retries.
                    let bm = fleet.root(&target_host).join("etc/bm");
                    let kind = if rng.below(2) == 0 {
                        let _ = std::fs::write(bm.join("standin-api-500"), "1");
                        "BlueMind API 500"
                    } else {
                        let _ = std::fs::write(bm.join("standin-api-hang"), "1");
                        "BlueMind API hang"
                    };
                    (kind, target_host)
                }
                _ => {
                    // The target's PostgreSQL crashes (restore, catch-up, promotion, or a
                    // standby following) and comes back.
                    let pause = millis(&mut rng, 200, 3000);
                    if !fleet.pg(&target_host).crash_and_restart(pause) {
                        continue;
                    }
                    ("target PostgreSQL crash", target_host)
                }
            };
            progress(&format!("{at_secs:>7.1} s  {kind:<24} {target}"));
            report.faults.push(Fault {
                at_secs,
                kind,
                target,
            });
        }
        let outcomes = fleet.follow(Duration::from_secs(params.deadline_secs), |_| {});
        stop.store(true, Ordering::Relaxed);
        let samples = sampler.join().unwrap_or((0, 0));
        match outcomes {
            Err(e) => report.violations.push(e),
            Ok(outcomes) => check_outcomes(&fleet, &outcomes, &mut report),
        }
        samples
    });
    (report.samples, report.sample_races) = samples;
    if let Ok(v) = violations.lock() {
        report.violations.extend(v.iter().cloned());
    }
    report
}

/// The end-state invariants.
fn check_outcomes(
    fleet: &LabFleet,
    outcomes: &[crate::lab_fleet::InstanceOutcome],
    report: &mut ChaosReport,
) {
    let holders = holders(fleet);
    for (i, o) in outcomes.iter().enumerate() {
        let pair = i + 1;
        *report.phases.entry(o.phase.clone()).or_default() += 1;
        let (origin, target) = (format!("origin-{pair}"), format!("target-{pair}"));
        let held = holders.get(&service_ip(pair)).cloned().unwrap_or_default();
        match o.phase.as_str() {
            "Done" => {
                report.downtimes.push(o.downtime_seconds);
                if held != [target.clone()] {
                    report.violations.push(format!(
                        "{}: Done but the service IP is on {held:?}",
                        o.name
                    ));
                }
                let delivered = std::fs::read_to_string(
                    fleet.root(&origin).join("var/log/standin-delivered.log"),
                )
                .unwrap_or_default();
                for rel in delivered.lines() {
                    let on_target = std::fs::read(fleet.root(&target).join(rel)).ok();
                    let on_origin = std::fs::read(fleet.root(&origin).join(rel)).ok();
                    if on_target.is_none() || on_target != on_origin {
                        report
                            .violations
                            .push(format!("{}: {rel} not on the target as delivered", o.name));
                        break;
                    }
                }
                for (db, q) in [
                    (
                        "bj",
                        "SELECT count(*), md5(string_agg(login, ',' ORDER BY id)) FROM t_mailbox",
                    ),
                    ("bj-data", "SELECT count(*) FROM t_message_body"),
                ] {
                    if fleet.sql(&origin, db, q) != fleet.sql(&target, db, q) {
                        report.violations.push(format!("{}: {db} differs", o.name));
                    }
                }
            }
            "RolledBack" | "Aborted" => {
                if held != [origin.clone()] {
                    report.violations.push(format!(
                        "{}: {} but the service IP is on {held:?}",
                        o.name, o.phase
                    ));
                }
                let status = fleet.service(&origin, "postfix", "status");
                if !status.status.success() {
                    report.violations.push(format!(
                        "{}: {} but the origin does not serve",
                        o.name, o.phase
                    ));
                }
            }
            "Failed" => {
                if o.last_error.is_empty() {
                    report
                        .violations
                        .push(format!("{}: Failed without a reason", o.name));
                }
            }
            other => report
                .violations
                .push(format!("{}: ended in {other}", o.name)),
        }
        let grants = fleet.valid_grants(&origin, Duration::from_secs(10));
        if !grants.is_empty() {
            report.violations.push(format!(
                "{}: grants still valid on {origin}: {grants:?}",
                o.name
            ));
        }
        // No replication slot or role on the origin, no standby left on the target.
        if let Err(left) = fleet.wait_replication_gone(&origin, &target, Duration::from_secs(30)) {
            report.violations.push(format!("{}: {left}", o.name));
        }
    }
    let rsync = Command::new("pgrep")
        .args(["-f", "rsync --server"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    if !rsync.is_empty() {
        report
            .violations
            .push(format!("rsync still running: pids {rsync}"));
    }
    report.downtimes.sort_by(f64::total_cmp);
}
