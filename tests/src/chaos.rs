//! The chaos campaign: N BlueMind pairs migrate in the network lab while faults land at
//! random moments from a seed (a run replays its fault schedule exactly): orchestrator SIGKILL
//! and SIGTERM, agent SIGKILL on origins and targets, network partitions of a host, a pair or
//! the orchestrator (links down for a while), a target's BlueMind API answering 500 or
//! hanging, a target's PostgreSQL crashing, a target's disk full (its `/var/spool` is a small
//! loop-mounted ext4), a slow link (tc `tbf`), a window closing during a cold sync (the pair
//! cut off until past its end and its budget; every window is a minute long). A real
//! Prometheus scrapes the orchestrator with the shipped alert rules.
//!
//! Invariants are checked while it runs (the service IP of every instance held by at most one
//! host, sampled 10 times a second, the switch's neighbour table beside) and at the end: every
//! instance finished; Done ones have every data dir equal (content and attributes), every
//! delivered message and the databases; rolled-back ones serve on the origin; exactly the
//! holder answers ARP for the service IP at the switch; no grant left valid, no replication
//! slot or role on an origin, no standby left on a target, no rsync left running; every downtime over its budget or past its window was an
//! alert. `bmfleet-lab chaos` runs it; `tests/tests/chaos.rs` runs a short fixed-seed version.

use std::collections::{BTreeMap, BTreeSet};
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
    /// Every instance's downtime budget, seconds (faults push some over it: an alert).
    pub budget_secs: u64,
    /// Size of each target's `/var/spool` filesystem, MiB.
    pub spool_mib: u64,
    /// The real mail stack (Postfix and Cyrus on every host, the sender's mail and the IMAP
    /// clients all through the campaign, every message counted at the end).
    pub real_mail: bool,
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
            budget_secs: 20,
            spool_mib: 256,
            real_mail: true,
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
    /// Samples where the switch's neighbour table sent a service IP's traffic to a host that
    /// did not hold it while another did (a gratuitous ARP not yet seen or lost: the entry
    /// is checked again on its next use, so this is counted, not a violation; the end check
    /// asks by ARP who answers).
    pub switch_stale_samples: u64,
    /// Every Failed instance with its reason.
    pub failures: Vec<String>,
    /// Per alert rule: the instances whose downtime had to raise it, and the instances it was
    /// raised for (Prometheus's own record). A missing or an unexpected one is a violation.
    pub alerts: BTreeMap<&'static str, (BTreeSet<String>, BTreeSet<String>)>,
    /// With the real mail stack: every instance's mail counted through the IMAP of whoever
    /// serves it, summed (a lost or duplicated message is also a violation).
    pub mail: Option<crate::world::MailCount>,
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
            "\n| invariant violations | {} |\n| service-IP samples | {} ({} single-sample races, {} with the switch's entry on a host not holding it) |\n| downtime min / median / max | {:.2} / {:.2} / {:.2} s |\n",
            self.violations.len(),
            self.samples,
            self.sample_races,
            self.switch_stale_samples,
            pick(0.0),
            pick(0.5),
            pick(1.0)
        );
        for (alert, (expected, seen)) in &self.alerts {
            out += &format!("| {alert} | raised for {seen:?}, needed for {expected:?} |\n");
        }
        if let Some(m) = &self.mail {
            out += &format!(
                "| mail (all instances) | sent {}, delivered once {}, expunged by clients {}, duplicated {}, lost {}, flags kept {} of {}, moves {}, acts without an answer {} |\n",
                m.sent, m.delivered, m.expunged, m.duplicated, m.lost, m.flags_kept, m.flags_set, m.moved, m.unsure
            );
        }
        for f in &self.failures {
            out += &format!("\nFailed: {f}");
        }
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
        .args(["-all", "netns", "exec", "ip", "-4", "-br", "addr", "show"])
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

/// Now, Unix ms.
fn unix_ms() -> i64 {
    jiff::Timestamp::now().as_millisecond()
}

/// Daily windows a minute long each, back to back, from the minute of `from` for `minutes`:
/// every cold sync gets a window that closes within a minute.
fn minute_windows(from: jiff::Timestamp, minutes: i64) -> Vec<(String, String)> {
    let hhmm = |minute: i64| {
        let minute = minute.rem_euclid(24 * 60);
        format!("{:02}:{:02}", minute / 60, minute % 60)
    };
    let first = from.as_second().div_euclid(60);
    (first..first + minutes.min(24 * 60))
        .map(|m| (hhmm(m), hhmm(m + 1)))
        .collect()
}

/// Cuts `hosts` off (their links down) for `pause`.
fn partition(fleet: &LabFleet, hosts: &[String], pause: Duration) {
    for h in hosts {
        fleet
            .lab
            .ip(h, &["link", "set", &fleet.lab.card(h), "down"]);
    }
    std::thread::sleep(pause);
    for h in hosts {
        fleet.lab.ip(h, &["link", "set", &fleet.lab.card(h), "up"]);
    }
}

/// The first instance seen in its cold sync within `wait`, with the later of its window's
/// end and the end of its downtime budget (`budget_ms`), Unix ms.
fn next_cold_sync(fleet: &LabFleet, wait: Duration, budget_ms: i64) -> Option<(String, i64)> {
    let deadline = Instant::now() + wait;
    while Instant::now() < deadline {
        let found = fleet.instances().into_iter().find_map(|i| {
            let end = i["window_end_unix_ms"].as_i64()?;
            let over_budget = i["downtime_start_unix_ms"].as_i64()? + budget_ms;
            (i["phase"] == "ColdSync" && end > unix_ms()).then(|| {
                (
                    i["name"].as_str().unwrap_or_default().to_string(),
                    end.max(over_budget),
                )
            })
        });
        if found.is_some() {
            return found;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

/// Where the campaign's Prometheus answers, inside the orchestrator's namespace.
const PROMETHEUS: &str = "127.0.0.1:9090";

/// A real Prometheus in the orchestrator's namespace (its links may go down; loopback stays),
/// scraping the orchestrator every second with the shipped alert rules.
fn start_prometheus(fleet: &LabFleet) -> Result<(), String> {
    let dir = fleet.dir().join("prometheus");
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        crate::prometheus::alerting_config("127.0.0.1:9464", 1),
    )
    .map_err(|e| e.to_string())?;
    fleet.lab.spawn(crate::prometheus::command(
        fleet.lab.command("orch", "prometheus"),
        &config,
        &dir,
        PROMETHEUS,
    ));
    let deadline = Instant::now() + Duration::from_secs(30);
    while fleet
        .lab
        .run_in("orch", || crate::prometheus::query(PROMETHEUS, "up"))
        .is_err()
    {
        if Instant::now() > deadline {
            return Err("Prometheus did not start (see its log in the lab dir)".into());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

/// Every downtime over its budget (by more than a second) raised `BmfleetDowntimeOverBudget`,
/// and every one still running 3 s past its window's end `BmfleetWindowRunningPastItsEnd`
/// (Prometheus evaluates every second), as the orchestrator recorded them.
fn check_alerts(fleet: &LabFleet, report: &mut ChaosReport) {
    let instances = fleet.instances();
    // Per rule: the instances that must have raised it (clearly past the line: evaluation
    // and scrape intervals blur the edge) and those that may have (past it at all).
    let mut must: BTreeMap<&'static str, BTreeSet<String>> = BTreeMap::new();
    let mut may: BTreeMap<&'static str, BTreeSet<String>> = BTreeMap::new();
    for i in &instances {
        let name = i["name"].as_str().unwrap_or_default().to_string();
        let (Some(start), Some(end)) = (
            i["downtime_start_unix_ms"].as_i64(),
            i["downtime_end_unix_ms"].as_i64(),
        ) else {
            continue;
        };
        let budget_ms = i["downtime_budget_secs"].as_i64().unwrap_or(0) * 1000;
        let over = end - start - budget_ms;
        let past = i["window_end_unix_ms"].as_i64().map(|w| end - w);
        for (alert, by, edge) in [
            ("BmfleetDowntimeOverBudget", Some(over), 1000),
            ("BmfleetWindowRunningPastItsEnd", past, 3000),
        ] {
            if by.is_some_and(|by| by > 0) {
                may.entry(alert).or_default().insert(name.clone());
            }
            if by.is_some_and(|by| by > edge) {
                must.entry(alert).or_default().insert(name.clone());
            }
        }
    }
    for alert in [
        "BmfleetDowntimeOverBudget",
        "BmfleetWindowRunningPastItsEnd",
    ] {
        let wanted = must.remove(alert).unwrap_or_default();
        let allowed = may.remove(alert).unwrap_or_default();
        // The last evaluation may still be on its way.
        let deadline = Instant::now() + Duration::from_secs(10);
        let seen = loop {
            let expr =
                format!("max_over_time(ALERTS{{alertname=\"{alert}\",alertstate=\"firing\"}}[6h])");
            let seen: BTreeSet<String> = fleet
                .lab
                .run_in("orch", || crate::prometheus::query(PROMETHEUS, &expr))
                .unwrap_or_default()
                .iter()
                .filter_map(|s| s["metric"]["server"].as_str().map(str::to_string))
                .collect();
            if wanted.is_subset(&seen) || Instant::now() > deadline {
                break seen;
            }
            std::thread::sleep(Duration::from_secs(1));
        };
        for missing in wanted.difference(&seen) {
            report
                .violations
                .push(format!("{missing}: no {alert} alert in Prometheus"));
        }
        for spurious in seen.difference(&allowed) {
            report.violations.push(format!(
                "{spurious}: {alert} raised, but its downtime never crossed that line"
            ));
        }
        report.alerts.insert(alert, (wanted, seen));
    }
}

/// Runs a campaign.
pub fn run(params: ChaosParams, mut progress: impl FnMut(&str)) -> ChaosReport {
    let fleet = LabFleet::build(LabParams {
        pairs: params.pairs,
        messages: params.messages,
        db_rows: params.db_rows,
        deliver_ms: 40,
        enroll: false,
        target_spool_mib: Some(params.spool_mib),
        real_mail: params.real_mail,
        ..LabParams::default()
    });
    let mut report = ChaosReport::default();
    if params.real_mail {
        for i in 1..=params.pairs {
            if let Err(e) = fleet.queue_mail_at_origin(i) {
                report.violations.push(format!("origin-{i}'s Postfix: {e}"));
                return report;
            }
        }
    }
    if let Err(e) = start_prometheus(&fleet) {
        report.violations.push(e);
        return report;
    }
    let windows = minute_windows(jiff::Timestamp::now(), 180);
    let windows: Vec<(&str, &str)> = windows
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    // No canary: a canary that rolls back (a legitimate outcome of a window cut during its
    // cold sync) holds every other instance for an operator, by design, so the campaign
    // would check nothing more; here every instance's outcome is checked on its own. The
    // canary's hold is the scheduler's tests' and the simulation's.
    let text = fleet
        .fleet_file_with_windows(&windows)
        .replace(
            "min_stagger_secs = 1\n",
            &format!(
                "min_stagger_secs = {}\ndowntime_budget_secs = {}\n",
                params.stagger_secs, params.budget_secs
            ),
        )
        .replace("canary_count = 1\n", "canary_count = 0\n")
        + "\n[fleet.rates]\nservices_secs = 2.0\n";
    if !text.contains("canary_count = 0\n") || !text.contains("downtime_budget_secs") {
        report.violations.push(format!(
            "the lab's fleet file changed its policy lines: {text}"
        ));
        return report;
    }
    if let Err(e) = fleet.apply_text(&text) {
        report
            .violations
            .push(format!("the fleet could not be applied: {e}"));
        return report;
    }
    let started = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let stop_mail = AtomicBool::new(false);
    let violations = Arc::new(Mutex::new(Vec::<String>::new()));
    let samples = std::thread::scope(|scope| {
        // The internet's mail and the IMAP clients, all through the campaign.
        let traffic = params.real_mail.then(|| {
            scope.spawn(|| crate::mail_traffic::run(&fleet, Duration::from_millis(100), &stop_mail))
        });
        // The service IP is never on both hosts of a pair, sampled 10 times a second. One
        // sample reads the namespaces one after the other, not at one instant: a cutover
        // between the origin's read and the target's would show both. So a pair seen on both
        // is read again at once, target first then origin (a cutover releases on the origin
        // before it takes on the target, a rollback the other way round): both again is a
        // violation; otherwise it was a race between two reads, counted.
        let sampler = {
            let (stop, violations, fleet) = (stop.clone(), violations.clone(), &fleet);
            let owners: BTreeMap<String, String> = fleet
                .lab
                .hosts()
                .iter()
                .map(|h| (fleet.lab.mac(&h.name), h.name.clone()))
                .collect();
            scope.spawn(move || {
                let (mut samples, mut races, mut stale) = (0u64, 0u64, 0u64);
                while !stop.load(Ordering::Relaxed) {
                    let held = holders(fleet);
                    let neighbours = fleet.lab.switch_neighbours();
                    samples += 1;
                    for i in 1..=params.pairs {
                        let ip = service_ip(i);
                        if let (Some(holders), Some(mac)) = (held.get(&ip), neighbours.get(&ip)) {
                            if owners.get(mac).is_some_and(|o| !holders.contains(o)) {
                                stale += 1;
                            }
                        }
                    }
                    for i in 1..=params.pairs {
                        if held.get(&service_ip(i)).is_none_or(|h| h.len() < 2) {
                            continue;
                        }
                        let on = |host: String| {
                            let text = fleet.lab.ip(
                                &host,
                                &["-4", "-br", "addr", "show", "dev", &fleet.lab.card(&host)],
                            );
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
                (samples, races, stale)
            })
        };
        let mut rng = SeededRng::new(params.seed);
        let hosts: Vec<String> = fleet
            .lab
            .hosts()
            .iter()
            .skip(1)
            .filter(|h| h.name != crate::lab_fleet::SENDER)
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
            // Kills are the most frequent (3 in 10 each for the orchestrator and the agents),
            // partitions next (3 in 20), every other kind 1 in 20.
            let (kind, target) = match rng.below(20) {
                0..=3 => {
                    fleet.restart_orchestrator();
                    ("orchestrator SIGKILL", "orch".to_string())
                }
                4 | 5 => {
                    fleet.lab.signal_matching(
                        "orch",
                        "bmfleet-orchestrator",
                        nix::sys::signal::Signal::SIGTERM,
                    );
                    fleet.start_orchestrator();
                    ("orchestrator SIGTERM", "orch".to_string())
                }
                6..=11 => {
                    fleet.kill_agent(&host);
                    std::thread::sleep(millis(&mut rng, 200, 2000));
                    fleet.start_agent(&host);
                    ("agent SIGKILL", host)
                }
                12..=14 => {
                    let pair = host.rsplit('-').next().unwrap_or_default().to_string();
                    let (names, kind, target) = match rng.below(4) {
                        0 => (
                            vec!["orch".to_string()],
                            "orchestrator partition",
                            "orch".into(),
                        ),
                        1 => (
                            vec![format!("origin-{pair}"), format!("target-{pair}")],
                            "pair partition",
                            format!("pair {pair}"),
                        ),
                        _ => (vec![host.clone()], "host partition", host),
                    };
                    let pause = millis(&mut rng, 1000, params.max_partition_secs * 1000);
                    partition(&fleet, &names, pause);
                    (kind, target)
                }
                15 => {
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
                16 => {
                    // The target's PostgreSQL crashes (restore, catch-up, promotion, or a
                    // standby following) and comes back.
                    let pause = millis(&mut rng, 200, 3000);
                    if !fleet.pg(&target_host).crash_and_restart(pause) {
                        continue;
                    }
                    ("target PostgreSQL crash", target_host)
                }
                17 => {
                    // The target's data disk fills up for a while (another process's files).
                    if !fleet.fill_spool(&target_host) {
                        continue;
                    }
                    std::thread::sleep(millis(&mut rng, 1000, params.max_partition_secs * 1000));
                    fleet.free_spool(&target_host);
                    ("target disk full", target_host)
                }
                18 => {
                    let rate = ["1mbit", "4mbit", "16mbit"][rng.below(3) as usize];
                    fleet.lab.shape(&host, Some(rate));
                    std::thread::sleep(millis(&mut rng, 1000, params.max_partition_secs * 1000));
                    fleet.lab.shape(&host, None);
                    ("slow link", host)
                }
                _ => {
                    // The next cold sync outlives its window and its downtime budget: its pair
                    // is cut off until a few seconds past both.
                    let overrun = millis(&mut rng, 3000, 8000);
                    let Some((name, end_ms)) = next_cold_sync(
                        &fleet,
                        Duration::from_secs(30),
                        params.budget_secs as i64 * 1000,
                    ) else {
                        continue;
                    };
                    let pair = name.trim_start_matches("mail-").to_string();
                    let until = Duration::from_millis((end_ms - unix_ms()).max(0) as u64);
                    partition(
                        &fleet,
                        &[format!("origin-{pair}"), format!("target-{pair}")],
                        until + overrun,
                    );
                    ("window closes during a cold sync", name)
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
        let samples = sampler.join().unwrap_or((0, 0, 0));
        if let Some(traffic) = traffic {
            // Mail keeps coming a little after the last instance finished.
            std::thread::sleep(Duration::from_secs(5));
            stop_mail.store(true, Ordering::SeqCst);
            let _ = traffic.join();
        }
        match outcomes {
            Err(e) => report.violations.push(e),
            Ok(outcomes) => {
                check_outcomes(&fleet, &outcomes, &mut report);
                check_alerts(&fleet, &mut report);
            }
        }
        samples
    });
    (
        report.samples,
        report.sample_races,
        report.switch_stale_samples,
    ) = samples;
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
        // Who gets the service IP's traffic: exactly the host that holds it.
        let answering = fleet.lab.arp_answers(&service_ip(pair));
        let holder = match o.phase.as_str() {
            "Done" => Some(&target),
            "RolledBack" | "Aborted" => Some(&origin),
            _ => None,
        };
        let wanted = holder.map(|h| BTreeSet::from([fleet.lab.mac(h)]));
        if wanted.as_ref().is_some_and(|w| *w != answering) || answering.len() > 1 {
            report.violations.push(format!(
                "{}: {} but ARP for {} is answered by {answering:?} (wanted {wanted:?})",
                o.name,
                o.phase,
                service_ip(pair)
            ));
        }
        match o.phase.as_str() {
            "Done" => {
                report.downtimes.push(o.downtime_seconds);
                if held != [target.clone()] {
                    report.violations.push(format!(
                        "{}: Done but the service IP is on {held:?}",
                        o.name
                    ));
                }
                // Every data dir's attributes (mode, owner, xattrs and ACLs), read by the
                // harness itself, not asked of the agents.
                for dir in bmfleet_proto::BLUEMIND_DATA_DIRS {
                    // A real Cyrus keeps writing its dirs on the target once it serves: they
                    // are checked through IMAP below.
                    if fleet.params.real_mail
                        && ["/var/spool/cyrus", "/var/lib/cyrus"].contains(&dir)
                    {
                        continue;
                    }
                    let rel = dir.trim_start_matches('/');
                    let manifest = |host: &str| {
                        bmfleet_agent::files::manifest::of_dir(
                            dir,
                            &fleet.root(host).join(rel),
                            &[],
                            false,
                            0,
                        )
                        .map(|m| m.checksum)
                    };
                    match (manifest(&origin), manifest(&target)) {
                        (Ok(a), Ok(b)) if a == b => {}
                        (a, b) => report.violations.push(format!(
                            "{}: {dir} differs between origin and target ({a:?} / {b:?})",
                            o.name
                        )),
                    }
                }
                // From outside: the target serves; every file's bytes, every table's rows and
                // sequence, every message and committed row the origin's writers recorded.
                if let Err(e) = fleet.check_migrated(pair) {
                    report.violations.push(format!("{}: Done but {e}", o.name));
                }
            }
            "RolledBack" | "Aborted" => {
                if held != [origin.clone()] {
                    report.violations.push(format!(
                        "{}: {} but the service IP is on {held:?}",
                        o.name, o.phase
                    ));
                }
                // The origin serves, with all its mail and rows (what arrived during the
                // attempt included).
                if let Err(e) = fleet.check_origin_serves(pair) {
                    report
                        .violations
                        .push(format!("{}: {} but {e}", o.name, o.phase));
                }
            }
            "Failed" => {
                report
                    .failures
                    .push(format!("{}: {}", o.name, o.last_error));
                if o.last_error.is_empty() {
                    report
                        .violations
                        .push(format!("{}: Failed without a reason", o.name));
                }
                // Failed is the operator's to act on, but whoever serves must hold the whole
                // instance: the target (the failure came after its start) with the origin's
                // data, or the origin with its own.
                let serving = if held == [target.clone()] {
                    fleet.check_migrated(pair)
                } else {
                    fleet.check_origin_serves(pair)
                };
                if let Err(e) = serving {
                    report
                        .violations
                        .push(format!("{}: Failed, and {e}", o.name));
                }
            }
            other => report
                .violations
                .push(format!("{}: ended in {other}", o.name)),
        }
        // The mail, from outside: whoever serves holds every message sent once, with the
        // clients' flags and folders, and the queue that must stay.
        if fleet.params.real_mail {
            match fleet
                .check_queues(pair, Duration::from_secs(60))
                .and_then(|_| fleet.check_mail(pair))
            {
                Ok(m) => {
                    let sum = report.mail.get_or_insert_with(Default::default);
                    sum.add(&m);
                }
                Err(e) => report
                    .violations
                    .push(format!("{}: {} but {e}", o.name, o.phase)),
            }
        }
        // Every grant the origin ever registered for the target, tried on its data plane.
        if let Err(e) = fleet.old_grants_refused(pair) {
            report.violations.push(format!("{}: {e}", o.name));
        }
        // No replication slot or role on the origin, no standby left on the target.
        if let Err(left) = fleet.wait_replication_gone(&origin, &target, Duration::from_secs(30)) {
            report.violations.push(format!("{}: {left}", o.name));
        }
    }
    // A transfer cut off with its pair ends once the data plane's keepalives give up (about
    // 30 s): no `rsync --server` (origin side, or a tunnel carrying its argv) outlives that.
    let deadline = Instant::now() + Duration::from_secs(60);
    let left = loop {
        let pids = Command::new("pgrep")
            .args(["-f", "rsync --server"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        if pids.trim().is_empty() || Instant::now() > deadline {
            break pids;
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    for pid in left.split_whitespace() {
        let host = Command::new("ip")
            .args(["netns", "identify", pid])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        let argv = std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
            .unwrap_or_default();
        report.violations.push(format!(
            "rsync still running a minute after the end: pid {pid} in {host}: {argv}"
        ));
    }
    report.downtimes.sort_by(f64::total_cmp);
}
