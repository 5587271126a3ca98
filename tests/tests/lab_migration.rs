//! Three BlueMind instances migrate in the network lab, end to end: real agents, rsync,
//! PostgreSQL, iproute2 and arping, the BlueMind stand-ins, the orchestrator and bmctl.

use std::os::unix::fs::MetadataExt;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bmfleet_tests::lab_fleet::{bluemind_version, service_ip, LabFleet, LabParams, CUSTOMER_RELAY};

const LOGIN: &str = "/api/auth/login?login=admin0@global.virt";

/// One lab at a time: each runs several PostgreSQL clusters and agents on two cores.
static LAB: Mutex<()> = Mutex::new(());

fn one_lab() -> std::sync::MutexGuard<'static, ()> {
    LAB.lock().unwrap_or_else(|p| p.into_inner())
}

fn banner(fleet: &LabFleet, i: usize) -> String {
    fleet.banner(i).unwrap_or_else(|e| panic!("{e}"))
}

/// A one-pair lab, migrated: Done.
fn one_pair_migrated() -> LabFleet {
    let fleet = LabFleet::build(LabParams {
        pairs: 1,
        ..LabParams::default()
    });
    let outcomes = fleet.migrate(Duration::from_secs(300), |_| {}).unwrap();
    assert_eq!(outcomes[0].phase, "Done", "{outcomes:?}");
    fleet
}

/// Pair `i` migrated, checked from outside (lab world): who holds and answers on the IP, and
/// the target's data against the origin's by content.
fn migrated(fleet: &LabFleet, i: usize) {
    fleet.check_migrated(i).unwrap_or_else(|e| panic!("{e}"));
}

/// Every grant pair `i`'s origin ever registered for its target is refused when the target
/// presents it on the origin's data plane.
fn no_grant_admitted(fleet: &LabFleet, i: usize) {
    let tried = fleet
        .old_grants_refused(i)
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(tried > 0);
}

/// Waits until some instance satisfies `pred`; returns it.
fn wait_for(
    fleet: &LabFleet,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(i) = fleet.instances().into_iter().find(|i| pred(i)) {
            return i;
        }
        assert!(
            Instant::now() < deadline,
            "never saw {what}: {:?}",
            fleet.instances()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The last 1,000 events (of `instance` when given), as `bmctl fleet events` prints them.
fn events(fleet: &LabFleet, instance: &[&str]) -> String {
    let mut args = vec!["fleet", "events"];
    args.extend_from_slice(instance);
    args.extend_from_slice(&["--limit", "1000"]);
    String::from_utf8_lossy(&fleet.bmctl(&args).stdout).into_owned()
}

fn all_done(fleet: &LabFleet) {
    let outcomes = fleet.follow(Duration::from_secs(300), |_| {}).unwrap();
    let events = events(fleet, &[]);
    for i in 1..=outcomes.len() {
        no_grant_admitted(fleet, i);
    }
    for o in &outcomes {
        assert_eq!(o.phase, "Done", "{o:?}\n{events}");
    }
}

#[test]
fn a_target_that_refuses_to_start_rolls_back_by_itself() {
    let _one = one_lab();
    // mail-2 follows by logical replication: its rollback leaves no publication behind.
    let fleet = LabFleet::build(LabParams {
        pairs: 2,
        logical_pair: Some(2),
        ..LabParams::default()
    });
    // mail-2 (not the canary, which must succeed for the fleet to go on) cannot start.
    std::fs::write(
        fleet.root("target-2").join("etc/bm/standin-refuse-start"),
        b"",
    )
    .unwrap();
    let outcomes = fleet.migrate(Duration::from_secs(300), |_| {}).unwrap();
    let phases: Vec<(&str, &str)> = outcomes
        .iter()
        .map(|o| (o.name.as_str(), o.phase.as_str()))
        .collect();
    assert_eq!(phases, [("mail-1", "Done"), ("mail-2", "RolledBack")]);
    // Nothing granted is left, on the finished instance's origin nor the rolled-back one's,
    // and no replication slot or role either.
    for (i, origin) in [(1, "origin-1"), (2, "origin-2")] {
        no_grant_admitted(&fleet, i);
        let target = origin.replace("origin", "target");
        fleet
            .wait_replication_gone(origin, &target, Duration::from_secs(20))
            .unwrap();
    }
    // The origin holds the IP again and serves; the target let it go.
    assert!(fleet
        .lab
        .ip("origin-2", &["-o", "addr"])
        .contains(&format!("{}/24", service_ip(2))));
    assert!(!fleet
        .lab
        .ip("target-2", &["-o", "addr"])
        .contains(&service_ip(2)));
    // The origin serves with its data intact: every message it received and no client
    // expunged, every row its BlueMind committed (through the rollback too); the canary
    // migrated, its data equal by content.
    fleet
        .check_origin_serves(2)
        .unwrap_or_else(|e| panic!("{e}"));
    migrated(&fleet, 1);
    // The downtime ended when the origin served again.
    assert!(outcomes[1].downtime_seconds > 0.0);
}

#[test]
fn an_orchestrator_killed_during_a_cold_sync_finishes_the_migration() {
    let _one = one_lab();
    let fleet = LabFleet::build(LabParams {
        pairs: 1,
        db_rows: 300_000,
        ..LabParams::default()
    });
    fleet.apply().unwrap();
    wait_for(&fleet, "a cold sync", |i| i["phase"] == "ColdSync");
    fleet.restart_orchestrator();
    all_done(&fleet);
    migrated(&fleet, 1);
    let log = std::fs::read_to_string(fleet.dir().join("orchestrator.log")).unwrap();
    assert!(
        log.contains("re-attaching"),
        "the restarted orchestrator did not re-attach"
    );
}

#[test]
fn an_orchestrator_killed_during_a_hot_pass_costs_no_attempt() {
    let _one = one_lab();
    let fleet = LabFleet::build(LabParams {
        pairs: 1,
        messages: 30_000,
        ..LabParams::default()
    });
    fleet.apply().unwrap();
    wait_for(&fleet, "a hot pass", |i| {
        i["running"]
            .as_array()
            .is_some_and(|r| r.iter().any(|s| s == "hot-pass"))
    });
    // SIGKILL in the middle of the pass: the restarted engine re-sends the identical request
    // under the same operation id, and the target answers it (the pass still running, or
    // from its journal).
    fleet.restart_orchestrator();
    all_done(&fleet);
    let events = events(&fleet, &["mail-1"]);
    assert!(
        !events.contains("\"Failed\""),
        "a step failed across the restart:\n{events}"
    );
    assert!(
        events.contains("{\"Succeeded\":{\"step\":\"HotPass\",\"attempt\":1,"),
        "{events}"
    );
    let log = std::fs::read_to_string(fleet.dir().join("orchestrator.log")).unwrap();
    assert!(log.contains("re-attaching"), "nothing was re-attached");
    migrated(&fleet, 1);
}

/// Notifications: a customer portal's HTTPS webhook (its own CA; it checks every signature,
/// refuses the first two tries of each notice, and refuses everything while the orchestrator
/// is killed and restarted in the downtime) and a command hook. Every notice arrives, signed,
/// with one idempotency key however often it was sent, and the same notices reach the hook.
#[test]
fn notifications_reach_a_webhook_and_a_hook_across_an_orchestrator_crash() {
    let _one = one_lab();
    let fleet = LabFleet::build(LabParams {
        pairs: 1,
        messages: 300,
        ..LabParams::default()
    });
    let secret = "a shared secret the portal holds";
    let listener = fleet
        .lab
        .run_in("orch", || std::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let portal = bmfleet_tests::receiver::Receiver::start(listener, secret, fleet.dir());
    let hooked = fleet.dir().join("hook.jsonl");
    fleet.extend_orchestrator_config(&format!(
        "[[notify]]\nname = \"portal\"\nwebhook = \"https://localhost:{}/bmfleet/events\"\nsecret_file = \"{}\"\nca_file = \"{}\"\n\
         [[notify]]\nname = \"ops\"\ncommand = [\"/bin/sh\", \"-c\", \"cat >> {} && echo >> {}\"]\n",
        portal.port,
        portal.secret_file.display(),
        portal.ca_file.display(),
        hooked.display(),
        hooked.display(),
    ));
    // A receiver the orchestrator does not have is refused with its line.
    let text = fleet.fleet_file().replacen(
        "[fleet]\n",
        "[fleet]\nnotify = [\"portal\", \"pager\"]\n",
        1,
    );
    let refused = fleet.apply_text(&text).unwrap_err();
    assert!(
        refused.contains(":2: fleet.notify[1]") && refused.contains("no receiver 'pager'"),
        "{refused}"
    );
    let text = fleet
        .fleet_file()
        .replacen("[fleet]\n", "[fleet]\nnotify = [\"portal\"]\n", 1)
        + "notify = [\"ops\"]\ncontact = { email = \"it@customer.example\", ticket = 4711 }\n";
    portal.hold(true);
    fleet.apply_text(&text).unwrap();
    wait_for(&fleet, "the downtime", |i| {
        i["phase"] == "ColdSync" || i["phase"] == "Cutover" || i["phase"] == "StartServices"
    });
    // While the portal refuses everything, the events and the status say what waits.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let shown = events(&fleet, &["mail-1"]);
        let status =
            String::from_utf8_lossy(&fleet.bmctl(&["fleet", "status"]).stdout).into_owned();
        if shown.contains("notification downtime_starting to portal not delivered")
            && shown.contains("503")
            && status.contains("not delivered yet")
        {
            break;
        }
        assert!(Instant::now() < deadline, "{shown}\n{status}");
        std::thread::sleep(Duration::from_millis(300));
    }
    // Killed while the portal refuses everything: the notices wait in the outbox.
    fleet.restart_orchestrator();
    portal.hold(false);
    all_done(&fleet);
    let wanted = ["window_scheduled", "downtime_starting", "cutover_done"];
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let delivered: Vec<String> = portal
            .requests()
            .iter()
            .filter(|r| r.status == 200)
            .map(|r| r.kind.clone())
            .collect();
        let hook = std::fs::read_to_string(&hooked).unwrap_or_default();
        if wanted.iter().all(|k| delivered.iter().any(|d| d == k))
            && wanted
                .iter()
                .all(|k| hook.contains(&format!("\"kind\":\"{k}\"")))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "delivered {delivered:?}; the hook got:\n{hook}\n{}",
            String::from_utf8_lossy(&fleet.bmctl(&["fleet", "status"]).stdout)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let requests = portal.requests();
    assert!(requests.iter().all(|r| r.signed), "{requests:?}");
    for kind in wanted {
        let of_kind: Vec<&bmfleet_tests::receiver::Request> =
            requests.iter().filter(|r| r.kind == kind).collect();
        // Retried (the first two tries refused), never with another key.
        assert!(of_kind.len() >= 3, "{kind}: {of_kind:?}");
        assert!(
            of_kind
                .iter()
                .all(|r| r.key == of_kind[0].key && r.body == of_kind[0].body),
            "{kind}: {of_kind:?}"
        );
        let body = &of_kind[0].body;
        assert_eq!(body["instance"], "mail-1");
        assert_eq!(body["key"], of_kind[0].key);
        assert_eq!(body["contact"]["ticket"], 4711, "contact passed through");
    }
    let done = requests.iter().find(|r| r.kind == "cutover_done").unwrap();
    let status = &fleet.instances()[0];
    assert_eq!(
        done.body["downtime_ms"].as_i64(),
        Some(
            status["downtime_end_unix_ms"].as_i64().unwrap()
                - status["downtime_start_unix_ms"].as_i64().unwrap()
        )
    );
    // The hook got the same notices, with the same keys.
    let hook: Vec<serde_json::Value> = std::fs::read_to_string(&hooked)
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for kind in wanted {
        let web = requests.iter().find(|r| r.kind == kind).unwrap();
        assert!(
            hook.iter()
                .any(|h| h["kind"] == kind && h["key"] == web.key.as_str()),
            "{kind}: {hook:?}"
        );
    }
    // Nothing left undelivered.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = fleet.bmctl(&["fleet", "status", "--output", "json"]);
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        if status["notifications_undelivered"] == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{status}");
        std::thread::sleep(Duration::from_millis(500));
    }
    migrated(&fleet, 1);
}

#[test]
fn an_orchestrator_killed_as_each_step_runs_costs_no_attempt() {
    let _one = one_lab();
    let fleet = LabFleet::build(LabParams {
        pairs: 1,
        messages: 3_000,
        db_rows: 50_000,
        ..LabParams::default()
    });
    fleet.apply().unwrap();
    // Every step seen running gets the orchestrator killed under it (SIGKILL) once.
    let mut killed_under: Vec<String> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let instances = fleet.instances();
        let Some(i) = instances.first() else {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        if matches!(
            i["phase"].as_str(),
            Some("Done" | "RolledBack" | "Failed" | "Aborted")
        ) {
            break;
        }
        let fresh: Vec<String> = i["running"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s.as_str().map(str::to_string))
            .filter(|s| !killed_under.contains(s))
            .collect();
        if !fresh.is_empty() {
            fleet.restart_orchestrator();
            killed_under.extend(fresh);
            if let Err(e) = fleet.wait_for_orchestrator() {
                let log = std::fs::read_to_string(fleet.dir().join("orchestrator.log"))
                    .unwrap_or_default();
                panic!(
                    "{e} (killed under {killed_under:?}); its log's tail:\n{}",
                    log.lines().rev().take(30).collect::<Vec<_>>().join("\n")
                );
            }
        }
        assert!(Instant::now() < deadline, "never finished: {i}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let outcomes = fleet.follow(Duration::from_secs(60), |_| {}).unwrap();
    let events = events(&fleet, &["mail-1"]);
    assert_eq!(outcomes[0].phase, "Done", "{outcomes:?}\n{events}");
    eprintln!("the orchestrator was killed under: {killed_under:?}");
    assert!(
        killed_under.len() >= 5,
        "too few steps were caught running: {killed_under:?}"
    );
    assert!(
        !events.contains("\"Failed\""),
        "killed under {killed_under:?}, a step failed:\n{events}"
    );
    migrated(&fleet, 1);
}

#[test]
fn an_agent_killed_during_a_hot_pass_comes_back_and_the_migration_converges() {
    let _one = one_lab();
    let fleet = LabFleet::build(LabParams {
        pairs: 1,
        messages: 30_000,
        ..LabParams::default()
    });
    fleet.apply().unwrap();
    wait_for(&fleet, "a hot pass", |i| {
        i["running"]
            .as_array()
            .is_some_and(|r| r.iter().any(|s| s == "hot-pass"))
    });
    fleet.kill_agent("target-1");
    std::thread::sleep(Duration::from_millis(500));
    fleet.start_agent("target-1");
    all_done(&fleet);
    let events = events(&fleet, &["mail-1"]);
    assert!(
        events.contains("\"Failed\":{\"step\":\"HotPass\""),
        "the killed pass was not seen failing:\n{events}"
    );
    migrated(&fleet, 1);
}

#[test]
fn a_bluemind_api_that_hangs_or_errs_is_retried_until_the_post_migration_succeeds() {
    let _one = one_lab();
    let fleet = LabFleet::build(LabParams {
        pairs: 1,
        logical_pair: None,
        ..LabParams::default()
    });
    // The target's core hangs on the first call (the agent gives up after 5 s) and answers
    // HTTP 500 to the first two.
    let bm = fleet.root("target-1").join("etc/bm");
    for (name, value) in [
        ("standin-api-hang", "1"),
        ("standin-api-hang-ms", "20000"),
        ("standin-api-500", "2"),
    ] {
        std::fs::write(bm.join(name), value).unwrap();
    }
    fleet.apply().unwrap();
    all_done(&fleet);
    let events = events(&fleet, &["mail-1"]);
    let failed: Vec<&str> = events
        .lines()
        .filter(|l| l.contains("\"Failed\":{\"step\":\"PostMigration\""))
        .collect();
    assert_eq!(failed.len(), 2, "{events}");
    assert!(failed.iter().any(|l| l.contains("500")), "{events}");
    // The third attempt did the work: BlueMind kept the target's address, not the origin's.
    let stored: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(bm.join("standin-configuration.json")).unwrap(),
    )
    .unwrap();
    let kept =
        bmfleet_agent::bluemind::post_migration::networks(stored["mynetworks"].as_str().unwrap());
    assert!(kept.contains("198.18.0.3/32"), "{kept:?}");
    assert!(!kept.contains("198.18.0.2/32"), "{kept:?}");
    migrated(&fleet, 1);
}

/// `bmctl fleet report` of a finished fleet: the JSON holds each instance's evidence; the
/// HTML, rendered by Debian's headless Chromium to a PNG, shows each instance's downtime as
/// the status has it and draws each one's window on the time axis.
fn the_report_shows_each_instance_in_a_real_browser(fleet: &LabFleet) {
    let statuses = fleet.instances();
    let dir = fleet.dir();
    let (html, md, json) = (
        dir.join("report.html"),
        dir.join("report.md"),
        dir.join("report.json"),
    );
    // A check made outside bmfleet, shown beside its own; one naming no instance is refused.
    let attach = dir.join("outside.json");
    std::fs::write(&attach, r#"{"mail-2": ["mail: 7 sent, 7 delivered once"]}"#).unwrap();
    let stray = dir.join("stray.json");
    std::fs::write(&stray, r#"{"mail-9": ["?"]}"#).unwrap();
    let out = fleet.bmctl(&["fleet", "report", "--attach", stray.to_str().unwrap()]);
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("mail-9"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (format, path) in [("html", &html), ("md", &md), ("json", &json)] {
        let out = fleet.bmctl(&[
            "fleet",
            "report",
            "--format",
            format,
            "--output",
            path.to_str().unwrap(),
            "--attach",
            attach.to_str().unwrap(),
        ]);
        assert!(
            out.status.success(),
            "bmctl fleet report --format {format}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("report written to"));
    }
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let md = std::fs::read_to_string(&md).unwrap();
    let rendered = bmfleet_tests::browser::render(&html, &dir.join("report.png"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        rendered.png.starts_with(b"\x89PNG\r\n\x1a\n") && rendered.png.len() > 10_000,
        "the screenshot is no PNG of a page ({} bytes)",
        rendered.png.len()
    );
    assert_eq!(
        rendered.dom.matches("class=\"window\"").count(),
        statuses.len(),
        "one window drawn per instance:\n{}",
        rendered.dom
    );
    for (n, status) in statuses.iter().enumerate() {
        let name = status["name"].as_str().unwrap();
        let ms = status["downtime_end_unix_ms"].as_i64().unwrap()
            - status["downtime_start_unix_ms"].as_i64().unwrap();
        let shown = format!("{:.3} s", ms as f64 / 1000.0);
        assert!(
            rendered
                .dom
                .contains(&format!("id=\"downtime-{name}\">{shown}</td>")),
            "{name}'s downtime {shown} is not on the page:\n{}",
            rendered.dom
        );
        assert!(md.contains(&format!("| {name} |")), "{md}");
        let r = &report["instances"][n];
        assert_eq!(r["name"], name);
        assert_eq!(r["downtime_ms"], ms);
        let split: Vec<&str> = r["downtime_split"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["step"].as_str().unwrap())
            .collect();
        for step in [
            "stop-origin",
            "final-pass",
            "databases",
            "config",
            "target-take-ip",
            "start-target",
        ] {
            assert!(split.contains(&step), "{name}: {step} not in {split:?}");
        }
        let checks = r["checks"].to_string();
        assert!(
            checks.contains("kernel holds") && checks.contains(":143 answered"),
            "{name}: {checks}"
        );
        let tasks = r["post_migration"].as_str().unwrap();
        assert!(
            tasks.contains("POST /api/system/maildelivery/mgmt/_repair: task ")
                && tasks.contains(" Success"),
            "{name}: {tasks}"
        );
        assert!(
            r["database_gate"]
                .as_str()
                .unwrap()
                .contains("changes since the verified point"),
            "{name}: {}",
            r["database_gate"]
        );
        // The config set was staged before the window, and the window's Config step
        // installed that copy after comparing it with the origin's set.
        let config = r["steps"]
            .as_array()
            .unwrap()
            .iter()
            .rfind(|s| s["step"] == "config" && s["outcome"] == "succeeded")
            .map(|s| s["detail"].to_string())
            .unwrap_or_default();
        assert!(
            config.contains("configuration set: the copy staged before the window"),
            "{name}: {config}"
        );
    }
    assert!(
        md.contains("Check: checked outside bmfleet: mail: 7 sent, 7 delivered once"),
        "{md}"
    );
    assert_eq!(report["totals"]["done"], statuses.len());
    let acts = report["fleet_acts"].to_string();
    assert!(acts.contains("\"Apply\""), "{acts}");
}

#[test]
fn three_instances_migrate_with_no_mail_lost() {
    let _one = one_lab();
    // Pair 3 moves across PostgreSQL majors (15 to 16), by logical replication.
    let fleet = LabFleet::build(LabParams {
        subscriber_pg16: true,
        ..LabParams::default()
    });
    // `plan` shows each side's card as the agents found it (the fleet file names none):
    // pair 3's target names its card ens18.
    let plan_file = fleet.dir().join("plan.toml");
    std::fs::write(&plan_file, fleet.fleet_file()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let plan = loop {
        let out = fleet.bmctl(&["fleet", "plan", plan_file.to_str().unwrap()]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() && !text.contains('?') {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    for (instance, cards) in [
        ("mail-1", "eth0 → eth0"),
        ("mail-2", "eth0 → eth0"),
        ("mail-3", "eth0 → ens18"),
    ] {
        assert!(
            plan.lines()
                .any(|l| l.starts_with(instance) && l.contains(cards)),
            "{instance} {cards}:\n{plan}"
        );
    }
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
    let events = events(&fleet, &[]);
    for i in 1..=outcomes.len() {
        no_grant_admitted(&fleet, i);
    }
    for o in &outcomes {
        assert_eq!(o.phase, "Done", "{o:?}\n{events}");
        assert!(
            o.downtime_seconds > 0.0 && o.downtime_seconds < whole,
            "{o:?} vs {whole}s"
        );
        assert!(o.bytes_moved > 0, "{o:?}");
    }
    // Each final pass asked for the origin's change journal: it moved the journal's paths, or
    // says why it walked everything (mail arriving all along, a delivery straddling the
    // pre-window pass's start may leave a hard link the journal did not see whole).
    let final_passes: Vec<&str> = events
        .lines()
        .filter(|l| l.contains("{\"Succeeded\":{\"step\":\"FinalPass\""))
        .collect();
    assert_eq!(final_passes.len(), 3, "{events}");
    assert!(
        final_passes
            .iter()
            .all(|l| l.contains("journal_paths") || l.contains("journal_fallback")),
        "{events}"
    );
    assert!(
        final_passes.iter().any(|l| l.contains("journal_paths")),
        "{events}"
    );
    // Each standby's and the subscriber's databases were compared in full at the pre-window
    // pass (the verified point), and the downtime compared only what changed since.
    let verified = events
        .lines()
        .filter(|l| {
            l.contains("{\"Succeeded\":{\"step\":\"PreWindowPass\"")
                && l.contains("\"verified_point\":\"verified point at ")
        })
        .count();
    assert!(verified >= 3, "{events}");
    // Every pair's downtime compared only the changes since that point, and said so in the
    // Databases step's event (the subscriber: each side its own changes).
    let gates = events
        .lines()
        .filter(|l| {
            l.contains("{\"Succeeded\":{\"step\":\"Databases\"")
                && l.contains("changes since the verified point")
        })
        .count();
    assert_eq!(gates, 3, "{events}");
    // Each step's event says how long it ran: the Databases step's share of the downtime.
    let databases_ms: Vec<u64> = events
        .lines()
        .filter(|l| l.contains("{\"Succeeded\":{\"step\":\"Databases\""))
        .filter_map(|l| {
            let at = l.find("\"elapsed_ms\":")? + "\"elapsed_ms\":".len();
            l[at..]
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .collect();
    assert!(
        databases_ms.len() == 3 && databases_ms.iter().all(|ms| *ms > 0),
        "{events}"
    );
    assert_eq!(
        events
            .lines()
            .filter(|l| l.contains("{\"Succeeded\":{\"step\":\"Databases\"")
                && l.contains("changes since the verified point: on the origin "))
            .count(),
        1,
        "{events}"
    );
    // Same PostgreSQL and C library on both hosts of every pair: the preflight chose a
    // standby, which followed its origin before the hot passes and was promoted in the
    // downtime — except pair 3, whose fleet entry asks for logical replication (its origin
    // runs with wal_level = logical); the instance's end removed the origin's slots, roles
    // and publications, and the targets' subscriptions.
    let chosen = events
        .lines()
        .filter(|l| l.contains("\"databases\":{\"stream\":true"))
        .count();
    let followed = events
        .lines()
        .filter(|l| l.contains("{\"Succeeded\":{\"step\":\"FollowDatabases\""))
        .count();
    assert_eq!((chosen, followed), (3, 3), "{events}");
    let logical = events
        .lines()
        .filter(|l| l.contains("\"stream\":true,\"logical\":true"))
        .count();
    assert_eq!(logical, 1, "{events}");
    // The status says the path each took.
    let paths: Vec<(String, String)> = fleet
        .instances()
        .iter()
        .map(|i| {
            (
                i["name"].as_str().unwrap_or_default().to_string(),
                i["databases"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    let wanted: Vec<(String, String)> = [
        ("mail-1", "standby"),
        ("mail-2", "standby"),
        ("mail-3", "logical"),
    ]
    .iter()
    .map(|(n, p)| (n.to_string(), p.to_string()))
    .collect();
    assert_eq!(paths, wanted);
    // Each standby's catch-up waited for the position the origin's agent read right after the
    // stop (passed on by the orchestrator), not for one asked once the downtime's steps ran.
    for (i, _) in paths.iter().filter(|(_, p)| p == "standby") {
        let of = |step: &str| {
            events
                .lines()
                .find(|l| {
                    l.contains(&format!("  {i}  "))
                        && l.contains(&format!("{{\"Succeeded\":{{\"step\":\"{step}\""))
                })
                .unwrap_or_else(|| panic!("{i}: no {step}:\n{events}"))
                .to_string()
        };
        let stop = of("StopOrigin");
        let marker = "WAL position once stopped: ";
        let lsn: String = stop
            [stop.find(marker).unwrap_or_else(|| panic!("{stop}")) + marker.len()..]
            .chars()
            .take_while(|c| c.is_ascii_hexdigit() || *c == '/')
            .collect();
        assert!(lsn.contains('/'), "{stop}");
        let databases = of("Databases");
        assert!(
            databases.contains(&format!(
                "the origin's last position {lsn} (read by its agent at the stop)"
            )),
            "{i}: {lsn}\n{databases}"
        );
    }
    the_report_shows_each_instance_in_a_real_browser(&fleet);
    assert!(
        fleet
            .sql("target-3", "postgres", "SHOW server_version")
            .starts_with("16."),
        "pair 3 moves across majors"
    );
    for i in 1..=3 {
        fleet
            .wait_replication_gone(
                &format!("origin-{i}"),
                &format!("target-{i}"),
                Duration::from_secs(20),
            )
            .unwrap();
    }
    for i in 1..=3 {
        let (origin, target) = (
            fleet.root(&format!("origin-{i}")),
            fleet.root(&format!("target-{i}")),
        );
        // From outside: the target alone holds the IP, the switch maps it to the target's
        // card, the target answers; every file of the seven data dirs has the origin's bytes
        // (the indexes the stand-in rewrote in place all through the hot phase, keeping their
        // size and time, included; the messages clients expunged gone), every table's rows
        // and every sequence are equal (BlueMind's core wrote them all through the hot phase),
        // every row it committed is there.
        migrated(&fleet, i);
        assert!(
            !fleet.rows_committed(&format!("origin-{i}")).is_empty()
                && !fleet.mail_ledger(&format!("origin-{i}")).1.is_empty(),
            "pair {i}: the origin's writers wrote nothing"
        );
        // Attributes arrived (the final pass's manifest gate compared them too).
        let [mail, dir, sparse] = bmfleet_tests::lab_fleet::ODD_FILES;
        let getfacl = |root: &std::path::Path, f: &str| {
            let path = root.join(f);
            bmfleet_tests::tool(
                "getfacl",
                &["-p", "--omit-header", "-n", path.to_str().unwrap()],
            )
        };
        for f in [mail, dir] {
            assert_eq!(getfacl(&origin, f), getfacl(&target, f), "pair {i}: {f}");
        }
        assert!(getfacl(&target, dir).contains("default:user:65534:rwx"));
        let mail_on_target = target.join(mail);
        let attr = bmfleet_tests::tool(
            "getfattr",
            &[
                "--only-values",
                "-n",
                "user.bmfleet.flag",
                mail_on_target.to_str().unwrap(),
            ],
        );
        assert_eq!(attr, "seen", "pair {i}");
        let sparse = std::fs::metadata(target.join(sparse)).unwrap();
        assert!(
            sparse.len() == 64 << 20 && sparse.blocks() * 512 < 1 << 20,
            "pair {i}: the sparse file has {} bytes on disk",
            sparse.blocks() * 512
        );
        // The API stand-in on the target received the three steps with the right bodies.
        let calls: Vec<serde_json::Value> =
            std::fs::read_to_string(target.join("var/log/standin-api.jsonl"))
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
        let posted: Vec<(String, String)> = calls
            .iter()
            .filter(|c| c["method"] == "POST" && c["url"] != LOGIN)
            .map(|c| {
                (
                    c["url"].as_str().unwrap().to_string(),
                    c["body"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        // 5.x regenerates the firewall through bm-core's internal API, 4.x through the old call.
        let firewall = if bluemind_version(i).starts_with('5') {
            "/internal-api/system/firewall/_updatefirewallrules"
        } else {
            "/api/system/security/_updatefirewallrules"
        };
        assert_eq!(posted[0].0, firewall, "pair {i}");
        assert_eq!(posted[1].0, "/api/system/maildelivery/mgmt/_repair");
        assert_eq!(posted[2].0, "/api/configuration");
        let body: serde_json::Value = serde_json::from_str(&posted[2].1).unwrap();
        let origin_host = format!("198.18.0.{}", 2 * i);
        let target_host = format!("198.18.0.{}", 2 * i + 1);
        assert_eq!(
            body["mynetworks"],
            format!("127.0.0.0/8, {target_host}/32, {CUSTOMER_RELAY}"),
            "origin {origin_host} replaced"
        );
        // What BlueMind kept after Done: the customer's relay network, the target's address,
        // not the origin's.
        let stored: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(target.join("etc/bm/standin-configuration.json")).unwrap(),
        )
        .unwrap();
        let kept = bmfleet_agent::bluemind::post_migration::networks(
            stored["mynetworks"].as_str().unwrap(),
        );
        assert!(kept.contains(CUSTOMER_RELAY), "pair {i}: {kept:?}");
        assert!(
            kept.contains(&format!("{target_host}/32")),
            "pair {i}: {kept:?}"
        );
        assert!(
            !kept.contains(&format!("{origin_host}/32")),
            "pair {i}: {kept:?}"
        );
        // BlueMind rebuilt the postfix maps on the target after the repair.
        for map in bmfleet_tests::bluemind_api::POSTFIX_MAPS {
            let db = std::fs::read_to_string(target.join(format!("etc/postfix/{map}.db"))).unwrap();
            assert!(
                db.starts_with(bmfleet_tests::bluemind_api::REBUILT_MAP_MARK),
                "pair {i}: {map}.db: {db}"
            );
        }
        // Pair 2's agent logs in as admin0 with the password, the others use the bm-core
        // token; every other call carries a valid X-BM-ApiKey.
        let logins = calls
            .iter()
            .filter(|c| c["url"] == LOGIN && c["status"] == 200)
            .count();
        assert_eq!(logins, usize::from(i == 2), "pair {i}");
        assert!(
            calls
                .iter()
                .filter(|c| c["url"] != LOGIN)
                .all(|c| c["api_key_valid"] == true),
            "{calls:?}"
        );
        // The target's network configuration keeps the service IP on the target's own card:
        // pair 3's newer target names it ens18 and runs netplan, whose own generator must
        // render the address beside the card's (netplan appends the sequences of two files).
        if i == 3 {
            let netplan =
                std::fs::read_to_string(target.join("etc/netplan/90-bmfleet-service-ip.yaml"))
                    .unwrap();
            assert!(netplan.contains("    ens18:\n"), "{netplan}");
            assert!(!target
                .join("etc/network/interfaces.d/bmfleet-service-ip")
                .exists());
            bmfleet_tests::tool(
                "netplan",
                &["generate", "--root-dir", target.to_str().unwrap()],
            );
            let rendered = std::fs::read_to_string(
                target.join("run/systemd/network/10-netplan-ens18.network"),
            )
            .unwrap();
            assert!(
                rendered.contains("Address=198.18.0.7/24")
                    && rendered.contains(&format!("Address={}/24", service_ip(i))),
                "{rendered}"
            );
            assert!(fleet
                .lab
                .ip("target-3", &["-brief", "address", "show", "ens18"])
                .contains(&format!("{}/24", service_ip(i))));
        } else {
            let persisted =
                std::fs::read_to_string(target.join("etc/network/interfaces.d/bmfleet-service-ip"))
                    .unwrap();
            assert!(
                persisted.contains(&format!(
                    "iface eth0 inet static\n    address {}/24",
                    service_ip(i)
                )),
                "{persisted}"
            );
        }
    }
}

/// A target that served is never synced over: not by re-applying the same file (the
/// orchestrator remembers the outcome), not by an orchestrator that remembers nothing (the
/// target agent keeps its own marker).
#[test]
fn a_served_target_is_never_overwritten_by_a_reapply_or_a_forgetful_orchestrator() {
    let _one = one_lab();
    let fleet = one_pair_migrated();
    // The target serves and takes new mail; then its services stop (maintenance), which
    // is when a stale origin could be pulled over it.
    let target = fleet.root("target-1");
    let newest = target.join("var/spool/cyrus/data/user/alice/after-cutover.");
    std::fs::write(&newest, b"Subject: newest\r\n\r\nonly on the target\r\n").unwrap();
    for service in ["postfix", "bluemind"] {
        assert!(fleet.service("target-1", service, "stop").status.success());
    }
    // The target's data and databases as they stand, by content.
    let state = || {
        (
            fleet.data_digest("target-1"),
            fleet.database_digest("target-1"),
        )
    };
    let before = state();

    // 1. The same file again: refused, nothing runs.
    let refused = fleet.apply().unwrap_err();
    assert!(refused.contains("nothing to migrate"), "{refused}");
    assert!(
        refused.contains("mail-1 (Done from origin-1 to target-1"),
        "{refused}"
    );
    assert!(refused.contains("--remigrate mail-1"), "{refused}");
    // `plan` says it too, from the target agent's own facts, with the time as a time.
    let file = fleet.dir().join("fleet.toml");
    let out = fleet.bmctl(&["fleet", "plan", file.to_str().unwrap()]);
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{said}");
    assert!(said.contains("target target-1 has served"), "{said}");
    assert!(!refused.contains(" ms)"), "{refused}");

    // 2. An orchestrator with a fresh database: the target agent refuses to be synced into.
    fleet.restart_orchestrator_forgetting();
    let outcomes = fleet.migrate(Duration::from_secs(300), |_| {}).unwrap();
    assert_ne!(outcomes[0].phase, "Done", "{outcomes:?}");
    assert!(
        outcomes[0].last_error.contains("has served"),
        "{:?}",
        outcomes[0].last_error
    );
    assert!(state() == before, "the target's data or databases changed");
    assert!(newest.exists());

    // 3. An explicit re-migration must prove the direction: here the target holds the
    // service IP and the origin does not, so it is refused, and the marker stays.
    let out = fleet.bmctl(&[
        "fleet",
        "apply",
        file.to_str().unwrap(),
        "--remigrate",
        "mail-1",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let outcomes = fleet.follow(Duration::from_secs(300), |_| {}).unwrap();
    assert_ne!(outcomes[0].phase, "Done", "{outcomes:?}");
    assert!(
        outcomes[0]
            .last_error
            .contains("does not hold the service IP"),
        "{:?}",
        outcomes[0].last_error
    );
    assert!(state() == before, "the target's data or databases changed");
    assert!(target.join("var/lib/bmfleet-agent/served.json").exists());
    // The operator's act is in the audit log.
    // (Every status poll is audited too: the apply is further back than the default page.)
    let audit = String::from_utf8_lossy(
        &fleet
            .bmctl(&["fleet", "audit", "--limit", "1000", "--output", "json"])
            .stdout,
    )
    .into_owned();
    assert!(audit.contains(r#"\"remigrate\":[\"mail-1\"]"#), "{audit}");
    no_grant_admitted(&fleet, 1);
}

/// A provider rolls a migrated server back by hand (the origin serves again, with its IP),
/// mail and rows arrive there, and the same fleet file is applied again with `--remigrate`:
/// the second run is a migration of its own — nothing is answered from the first run's
/// replies: the new mail and row reach the target, the service IP moves again, and the
/// downtime is a real one.
#[test]
fn a_remigration_after_a_rollback_by_hand_migrates_again() {
    let _one = one_lab();
    let fleet = one_pair_migrated();
    // The rollback, by hand: the target stops serving and lets the IP go, the origin takes
    // it back and starts its services.
    let ip = format!("{}/24", service_ip(1));
    for service in ["postfix", "bluemind"] {
        assert!(fleet.service("target-1", service, "stop").status.success());
    }
    fleet
        .lab
        .ip("target-1", &["address", "del", &ip, "dev", "eth0"]);
    fleet
        .lab
        .ip("origin-1", &["address", "add", &ip, "dev", "eth0"]);
    // The neighbours still map the IP to the target's card: announced, and the third host's
    // stale entry dropped (it asks again).
    let announced = fleet
        .lab
        .command("origin-1", "arping")
        .args([
            "-q",
            "-U",
            "-c",
            "2",
            "-i",
            "eth0",
            "-S",
            &service_ip(1),
            &service_ip(1),
        ])
        .status()
        .unwrap();
    assert!(announced.code().is_some_and(|c| c <= 1), "{announced:?}");
    fleet
        .lab
        .ip("orch", &["neigh", "flush", "to", &service_ip(1)]);
    for service in ["bluemind", "postfix"] {
        assert!(fleet.service("origin-1", service, "start").status.success());
    }
    assert!(
        banner(&fleet, 1).contains("origin-1"),
        "{}",
        banner(&fleet, 1)
    );
    // What the origin gets while it serves again.
    let mail = "var/spool/cyrus/data/user/alice/after-rollback.";
    let content = b"Subject: after the rollback\r\n\r\nonly on the origin so far\r\n";
    std::fs::write(fleet.root("origin-1").join(mail), content).unwrap();
    fleet.sql(
        "origin-1",
        "bj",
        "INSERT INTO t_mailbox (domain_id, login, quota) VALUES (1, 'after-rollback', 1);",
    );
    let row = "SELECT count(*) FROM t_mailbox WHERE login = 'after-rollback';";
    assert_eq!(fleet.sql("target-1", "bj", row).trim(), "0");

    let file = fleet.dir().join("fleet.toml");
    let out = fleet.bmctl(&[
        "fleet",
        "apply",
        file.to_str().unwrap(),
        "--remigrate",
        "mail-1",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let outcomes = fleet.follow(Duration::from_secs(300), |_| {}).unwrap();
    assert_eq!(outcomes[0].phase, "Done", "{outcomes:?}");
    assert!(outcomes[0].downtime_seconds > 0.0, "{outcomes:?}");
    // It moved: the mail and the row are on the target.
    assert_eq!(
        std::fs::read(fleet.root("target-1").join(mail)).unwrap(),
        content.to_vec()
    );
    assert_eq!(fleet.sql("target-1", "bj", row).trim(), "1");
    // And everything else the origin held after the rollback, by content; the target alone
    // holds the IP and answers on it.
    migrated(&fleet, 1);
}

/// Verify proves who answers, not only that something answers: after a migration, a third
/// host takes the service IP's traffic from the orchestrator (an impostor with the same
/// banners, the orchestrator's neighbour entry pointing at it, as an ARP spoofer or a lying
/// origin would arrange). The target still holds the IP and its agent says so; Verify fails
/// because the target's kernel holds no connection from the orchestrator. With the impostor
/// gone, the same Verify passes.
#[test]
fn verify_fails_when_the_answer_on_the_service_ip_is_not_the_targets() {
    use bmfleet_orchestrator::machine::Step;
    use std::io::Write;
    let _one = one_lab();
    let fleet = one_pair_migrated();
    fleet.run_step(1, Step::Verify).expect("Verify after Done");

    // The impostor: the switch holds the service IP too and answers both banners.
    let ip = service_ip(1);
    fleet.lab.ip(
        "switch",
        &["address", "add", &format!("{ip}/32"), "dev", "br0"],
    );
    let listeners = fleet.lab.run_in("switch", || {
        [143u16, 25].map(|port| std::net::TcpListener::bind((ip.as_str(), port)).unwrap())
    });
    for (listener, greeting) in listeners
        .into_iter()
        .zip(["* OK impostor\r\n", "220 impostor\r\n"])
    {
        std::thread::spawn(move || {
            for mut conn in listener.incoming().flatten() {
                let _ = conn.write_all(greeting.as_bytes());
                // Held open: the orchestrator asks the agents while it holds its end.
                std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_secs(30));
                    drop(conn);
                });
            }
        });
    }
    let impostor_mac = fleet
        .lab
        .ip("switch", &["-brief", "link", "show", "br0"])
        .split_whitespace()
        .nth(2)
        .unwrap()
        .to_string();
    fleet.lab.ip(
        "orch",
        &[
            "neigh",
            "replace",
            &ip,
            "lladdr",
            &impostor_mac,
            "dev",
            "eth0",
            "nud",
            "permanent",
        ],
    );
    let seen = fleet.lab.run_in("orch", || {
        use std::io::Read;
        let mut c = std::net::TcpStream::connect((ip.as_str(), 143)).unwrap();
        let mut buf = [0u8; 64];
        let n = c.read(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    });
    assert!(seen.starts_with("* OK impostor"), "{seen}");
    let refused = fleet
        .run_step(1, Step::Verify)
        .expect_err("Verify must fail while the impostor answers");
    assert!(
        refused
            .message
            .contains("came from neither origin-1 nor target-1"),
        "{refused:?}"
    );

    // The impostor gone, the orchestrator asks again: Verify passes.
    fleet.lab.ip("orch", &["neigh", "del", &ip, "dev", "eth0"]);
    fleet.lab.ip(
        "switch",
        &["address", "del", &format!("{ip}/32"), "dev", "br0"],
    );
    assert!(
        banner(&fleet, 1).contains("target-1"),
        "{}",
        banner(&fleet, 1)
    );
    fleet
        .run_step(1, Step::Verify)
        .expect("Verify with the target answering");
}

/// The real mail stack (Debian's Postfix and Cyrus IMAP on every host, BlueMind's mail
/// engines): the internet's mail arrives through the sender's Postfix at a steady rate from
/// before `apply` until after Done, clients flag, unflag, move and expunge over IMAP all
/// through the hot phase (Cyrus rewriting its indexes in place while the passes run), and
/// the origin's queue holds mail that cannot be delivered (deferred, held). After the
/// migration, through the service IP, the target serves every message the sender accepted
/// exactly once (none lost in the window: the sender retried it to the target), in its
/// folder with its flags; the target's queue holds exactly the deferred and held mail
/// (carried, not stranded); Cyrus's own check finds nothing (check_mail runs it).
#[test]
fn every_message_sent_during_the_migration_is_served_once_by_real_postfix_and_cyrus() {
    let _one = one_lab();
    let fleet = LabFleet::build(LabParams {
        pairs: 1,
        real_mail: true,
        ..LabParams::default()
    });
    fleet.queue_mail_at_origin(1).unwrap();
    let watched = bmfleet_tests::mail_traffic::migrate_watched(
        &fleet,
        Duration::from_secs(300),
        Duration::from_secs(5),
        |_| {},
    );
    let (outcomes, seen) = (watched.outcomes.unwrap(), watched.seen);
    eprintln!(
        "client-seen downtime {:?}, the orchestrator's {} s; traffic {:?}",
        seen[0].downtime, outcomes[0].downtime_seconds, watched.traffic
    );
    // The client saw the service go and come back.
    assert!(seen[0].downtime.is_some() && seen[0].up_at_end, "{seen:?}");
    assert_eq!(
        outcomes[0].phase,
        "Done",
        "{outcomes:?}\n{}",
        events(&fleet, &[])
    );
    migrated(&fleet, 1);
    fleet
        .check_queues(1, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}"));
    let mail = fleet.check_mail(1).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("{mail:?}");
    assert!(
        mail.flags_set > 0 && mail.moved > 0 && mail.expunged > 0,
        "the clients did not act during the migration: {mail:?}"
    );
    assert_eq!((mail.lost, mail.duplicated), (0, 0), "{mail:?}");
    assert_eq!(mail.sent, watched.traffic.sent[0], "{mail:?}");
    // Mail kept arriving through the pre-window pass: it ran in rounds, each carrying what
    // landed during the one before, and every message still arrived exactly once.
    let events = events(&fleet, &[]);
    let rounds: Vec<u64> = events
        .lines()
        .filter(|l| l.contains("{\"Succeeded\":{\"step\":\"PreWindowPass\""))
        .filter_map(|l| l.split("\"rounds\":").nth(1))
        .filter_map(|r| r.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok())
        .collect();
    assert!(rounds.iter().any(|r| *r >= 2), "{rounds:?}\n{events}");
}
