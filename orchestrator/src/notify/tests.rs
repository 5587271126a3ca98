use super::*;
use crate::machine::Step;

const FLEET: &str = r#"[fleet]
name = "night-1"
notify = ["portal"]
notify_hours_before = 24
canary_count = 1
failure_budget = 2

[[fleet.windows]]
days = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
start = "22:00"
end = "05:00"
timezone = "UTC"

[[instance]]
name = "mail-01"
origin = "origin-1"
target = "target-1"
service_ip = "198.18.0.101/24"
notify = ["mailer", "portal"]
contact = { email = "it@customer.example", ticket = 4711 }

[[instance]]
name = "mail-02"
origin = "origin-2"
target = "target-2"
service_ip = "198.18.0.102/24"
"#;

fn fleet() -> FleetFile {
    FleetFile::parse(FLEET, "fleet.toml").unwrap()
}

fn row(id: i64, instance: &str, event: &Event, phase: &str) -> TransitionRow {
    TransitionRow {
        id,
        at_ms: 1_000 * id,
        instance: instance.into(),
        event: serde_json::to_string(event).unwrap(),
        phase: phase.into(),
        actions: "[]".into(),
    }
}

/// 2026-12-07 12:00 UTC: the next window opens at 22:00, 10 hours on.
const NOON: i64 = 1_796_644_800_000;

#[test]
fn the_signature_is_rfc_4231s_hmac_sha256() {
    // RFC 4231, test case 2.
    assert_eq!(
        sign(b"Jefe", b"what do ya want for nothing?"),
        "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
    );
}

#[test]
fn webhook_urls_are_https_only_and_parsed() {
    let u = WebhookUrl::parse("https://hooks.example.net:8443/bm?x=1").unwrap();
    assert_eq!(
        (u.host.as_str(), u.port, u.path.as_str()),
        ("hooks.example.net", 8443, "/bm?x=1")
    );
    let u = WebhookUrl::parse("https://[2001:db8::1]/").unwrap();
    assert_eq!((u.host.as_str(), u.port), ("2001:db8::1", 443));
    assert_eq!(WebhookUrl::parse("https://h").unwrap().path, "/");
    for bad in [
        "http://h/x",
        "https://:80/",
        "https://h:0/",
        "https://u@h/",
        "https://h/a b",
    ] {
        assert!(WebhookUrl::parse(bad).is_err(), "{bad}");
    }
}

#[test]
fn entering_the_downtime_and_the_outcomes_notify_the_instances_receivers() {
    let f = fleet();
    let started = Event::Succeeded {
        step: Step::PreWindowPass,
        attempt: 1,
        stats: None,
        databases: None,
        gate: String::new(),
        mail_queue: String::new(),
        evidence: String::new(),
        elapsed_ms: 10,
    };
    let r = row(7, "mail-01", &started, "ColdSync");
    let n = from_transition(&f, &r, Some("PreWindowPass"), None).unwrap();
    assert_eq!(n.kind, Kind::DowntimeStarting);
    assert_eq!(n.key, "night-1/mail-01/downtime_starting/7");
    assert_eq!(
        n.receivers,
        ["portal", "mailer"],
        "the fleet's, then its own, each once"
    );
    assert_eq!(n.body["contact"]["ticket"], 4711);
    assert_eq!(n.body["service_ip"], "198.18.0.101");
    // A further transition in the same phase says nothing new.
    assert!(from_transition(&f, &r, Some("ColdSync"), None).is_none());
    // Done carries the downtime.
    let done = Instance {
        downtime_start_ms: Some(10_000),
        downtime_end_ms: Some(10_412),
        ..Instance::default()
    };
    let n = from_transition(
        &f,
        &row(9, "mail-01", &Event::Tick, "Done"),
        Some("Verify"),
        Some(&done),
    )
    .unwrap();
    assert_eq!(
        (n.kind, n.body["downtime_ms"].as_i64()),
        (Kind::CutoverDone, Some(412))
    );
    // Failed carries its error and what to do; mail-02 has only the fleet's receiver.
    let failed = Event::Failed {
        step: Step::Preflight,
        attempt: 3,
        error: "target-2: disk full".into(),
        permanent: true,
    };
    let n = from_transition(
        &f,
        &row(11, "mail-02", &failed, "Failed"),
        Some("Preflight"),
        None,
    )
    .unwrap();
    assert_eq!(n.body["error"], "target-2: disk full");
    assert!(n.body["what_to_do"]
        .as_str()
        .unwrap()
        .contains("bmctl fleet events mail-02"));
    assert_eq!(n.receivers, ["portal"]);
    // Phases that concern nobody outside.
    assert!(from_transition(
        &f,
        &row(12, "mail-02", &Event::Tick, "HotSync"),
        Some("Preflight"),
        None
    )
    .is_none());
}

#[test]
fn the_fleet_notices_windows_the_approval_and_the_failure_budget() {
    let f = fleet();
    let mut instances = vec![Instance::default(), Instance::default()];
    let state = FleetState::default();
    // Both pending: each window is announced once (its key holds the window's start).
    let n = from_fleet(&f, &instances, &state, NOON);
    let windows: Vec<&str> = n.iter().map(|n| n.key.as_str()).collect();
    assert_eq!(
        windows,
        [
            "night-1/mail-01/window_scheduled/1796680800000",
            "night-1/mail-02/window_scheduled/1796680800000"
        ]
    );
    assert_eq!(n[0].body["window_start_unix_ms"], 1_796_680_800_000i64);
    // Announced 2 hours before: not at noon, at 20:00.
    let short = FleetFile::parse(
        &FLEET.replace("notify_hours_before = 24", "notify_hours_before = 2"),
        "fleet.toml",
    )
    .unwrap();
    assert!(from_fleet(&short, &instances, &state, NOON).is_empty());
    assert_eq!(
        from_fleet(&short, &instances, &state, NOON + 8 * 3_600_000).len(),
        2
    );
    // The canary done, the other waiting: the approval is awaited (to the fleet's receivers).
    instances[0].phase = Phase::Done;
    instances[1].phase = Phase::Converged;
    let n = from_fleet(&f, &instances, &state, NOON);
    let approval = n.iter().find(|n| n.kind == Kind::ApprovalAwaited).unwrap();
    assert_eq!(approval.key, "night-1/fleet/approval_awaited");
    assert_eq!(approval.receivers, ["portal"]);
    let approved = FleetState {
        approved: true,
        ..FleetState::default()
    };
    assert!(from_fleet(&f, &instances, &approved, NOON)
        .iter()
        .all(|n| n.kind != Kind::ApprovalAwaited));
    // Two failures spend the budget.
    instances[0].phase = Phase::Failed;
    instances[1].phase = Phase::RolledBack;
    let n = from_fleet(&f, &instances, &state, NOON);
    assert!(n
        .iter()
        .any(|n| n.kind == Kind::FleetPaused && n.key == "night-1/fleet/fleet_paused"));
    assert!(
        n.iter().all(|n| n.kind != Kind::WindowScheduled),
        "nobody waits for a window"
    );
}

#[test]
fn the_outbox_queues_a_notice_once_and_retries_with_back_off() {
    let dir = tempfile::tempdir().unwrap();
    let state = State::open(&dir.path().join("s.db")).unwrap();
    let f = fleet();
    let notices = from_fleet(
        &f,
        &[Instance::default(), Instance::default()],
        &FleetState::default(),
        NOON,
    );
    state.enqueue_notices(&queued(&notices), 5, NOON).unwrap();
    // Derived again after a restart: nothing more.
    state
        .enqueue_notices(&queued(&notices), 5, NOON + 1)
        .unwrap();
    assert_eq!(state.notify_cursor().unwrap(), 5);
    let all = state.notifications().unwrap();
    // mail-01: portal and mailer; mail-02: portal.
    assert_eq!(all.len(), 3);
    assert_eq!(
        state.undelivered_notifications().unwrap(),
        (3, String::new())
    );
    let due = state.due_notifications(NOON, 10).unwrap();
    state
        .notification_failed(due[0].id, NOON + backoff_ms(1), "503")
        .unwrap();
    state.notification_delivered(due[1].id, NOON).unwrap();
    let due: Vec<i64> = state
        .due_notifications(NOON + 1, 10)
        .unwrap()
        .iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(due, [all[2].id], "the failed one waits for its back-off");
    let later = state.due_notifications(NOON + backoff_ms(1), 10).unwrap();
    assert_eq!(later.len(), 2);
    assert_eq!(later[0].attempts, 1);
    let (count, error) = state.undelivered_notifications().unwrap();
    assert_eq!(count, 2);
    assert!(
        error.contains("503") && error.contains(&all[0].key),
        "{error}"
    );
    assert_eq!(
        (backoff_ms(1), backoff_ms(3), backoff_ms(30)),
        (2_000, 8_000, 600_000)
    );
}
