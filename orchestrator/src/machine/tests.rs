//! Table tests of every transition, and a property test over random event sequences.

use super::*;
use proptest::prelude::*;

const RULES: Rules = Rules {
    timing: Timing {
        sync_deadline_ms: 1_000_000,
        databases_deadline_ms: 500_000,
        step_deadline_ms: 10_000,
        retries: 1,
        hot_retries: 2,
        rollback_retries: 2,
    },
    convergence: Convergence {
        max_files: 100,
        max_bytes: 1_000_000,
        max_passes: 3,
    },
};

fn ok(step: Step, attempt: u32) -> Event {
    Event::Succeeded {
        step,
        attempt,
        stats: None,
        databases: None,
        gate: String::new(),
        mail_queue: String::new(),
        evidence: String::new(),
        elapsed_ms: 0,
    }
}

/// A preflight that chose how the databases move.
fn preflight(stream: bool) -> Event {
    Event::Succeeded {
        step: Step::Preflight,
        attempt: 1,
        stats: None,
        databases: Some(DbPlan {
            stream,
            logical: false,
            why: "test".into(),
        }),
        gate: String::new(),
        mail_queue: String::new(),
        evidence: String::new(),
        elapsed_ms: 0,
    }
}

fn to_following() -> Vec<Event> {
    vec![Event::Begin, preflight(true)]
}

fn pass(step: Step, attempt: u32, files_changed: u64) -> Event {
    Event::Succeeded {
        step,
        attempt,
        stats: Some(PassStats {
            files_changed,
            bytes_changed: files_changed * 1000,
            ..Default::default()
        }),
        databases: None,
        gate: String::new(),
        mail_queue: String::new(),
        evidence: String::new(),
        elapsed_ms: 0,
    }
}

fn fail(step: Step, attempt: u32) -> Event {
    Event::Failed {
        step,
        attempt,
        error: "boom".into(),
        permanent: false,
    }
}

/// A failure only an operator can mend.
fn fail_for_good(step: Step, attempt: u32) -> Event {
    Event::Failed {
        step,
        attempt,
        error: "the target has served".into(),
        permanent: true,
    }
}

fn run(step: Step, attempt: u32) -> Action {
    Action::Run { step, attempt }
}

/// Applies events in order at time 1000, asserting none is ignored; returns the instance.
fn after(events: &[Event]) -> Instance {
    let mut i = Instance::default();
    for e in events {
        let o = handle(&i, e, 1000, &RULES);
        assert_eq!(o.ignored, None, "{e:?} ignored in {:?}", i.phase);
        i = o.instance;
    }
    i
}

fn to_hot() -> Vec<Event> {
    vec![Event::Begin, ok(Step::Preflight, 1)]
}

fn to_converged() -> Vec<Event> {
    let mut e = to_hot();
    e.extend([
        Event::GrantHotPass,
        pass(Step::HotPass, 1, 500),
        Event::GrantHotPass,
        pass(Step::HotPass, 2, 5),
    ]);
    e
}

fn to_cold() -> Vec<Event> {
    let mut e = to_converged();
    e.extend([
        Event::GrantColdSync {
            window_end_ms: 50_000,
        },
        ok(Step::PreWindowPass, 1),
    ]);
    e
}

fn to_data() -> Vec<Event> {
    let mut e = to_cold();
    e.extend([ok(Step::StopOrigin, 1), ok(Step::StopTarget, 1)]);
    e
}

fn to_cutover() -> Vec<Event> {
    let mut e = to_data();
    e.extend([
        ok(Step::FinalPass, 1),
        ok(Step::Databases, 1),
        ok(Step::Config, 1),
    ]);
    e
}

fn to_start() -> Vec<Event> {
    let mut e = to_cutover();
    e.extend([ok(Step::OriginReleaseIp, 1), ok(Step::TargetTakeIp, 1)]);
    e
}

fn to_post() -> Vec<Event> {
    let mut e = to_start();
    e.push(ok(Step::StartTarget, 1));
    e
}

struct Row {
    name: &'static str,
    from: Vec<Event>,
    event: Event,
    now: i64,
    phase: Phase,
    actions: Vec<Action>,
}

fn row(
    name: &'static str,
    from: Vec<Event>,
    event: Event,
    phase: Phase,
    actions: Vec<Action>,
) -> Row {
    Row {
        name,
        from,
        event,
        now: 1000,
        phase,
        actions,
    }
}

#[test]
fn every_transition() {
    use Phase::*;
    let rows = vec![
        row(
            "begin",
            vec![],
            Event::Begin,
            Preflight,
            vec![run(Step::Preflight, 1)],
        ),
        row(
            "preflight ok",
            vec![Event::Begin],
            ok(Step::Preflight, 1),
            HotSync,
            vec![],
        ),
        row(
            "preflight chose a standby: it follows first",
            vec![Event::Begin],
            preflight(true),
            HotSync,
            vec![run(Step::FollowDatabases, 1)],
        ),
        row(
            "preflight chose a dump",
            vec![Event::Begin],
            preflight(false),
            HotSync,
            vec![],
        ),
        row(
            "the standby follows: hot passes may begin",
            to_following(),
            ok(Step::FollowDatabases, 1),
            HotSync,
            vec![],
        ),
        row(
            "following retried",
            to_following(),
            fail(Step::FollowDatabases, 1),
            HotSync,
            vec![run(Step::FollowDatabases, 2)],
        ),
        row(
            "following retried again: the hot phases wait longer",
            {
                let mut e = to_following();
                e.push(fail(Step::FollowDatabases, 1));
                e
            },
            fail(Step::FollowDatabases, 2),
            HotSync,
            vec![run(Step::FollowDatabases, 3)],
        ),
        row(
            "following fails: the origin never stopped",
            {
                let mut e = to_following();
                e.extend([
                    fail(Step::FollowDatabases, 1),
                    fail(Step::FollowDatabases, 2),
                ]);
                e
            },
            fail(Step::FollowDatabases, 3),
            Failed,
            vec![],
        ),
        row(
            "a pause asked while following holds after it",
            {
                let mut e = to_following();
                e.push(Event::Pause);
                e
            },
            ok(Step::FollowDatabases, 1),
            Paused,
            vec![],
        ),
        row(
            "aborted while following",
            to_following(),
            Event::Abort,
            Aborted,
            vec![],
        ),
        row(
            "preflight retried",
            vec![Event::Begin],
            fail(Step::Preflight, 1),
            Preflight,
            vec![run(Step::Preflight, 2)],
        ),
        row(
            "preflight retried again: the hot phases wait longer",
            vec![Event::Begin, fail(Step::Preflight, 1)],
            fail(Step::Preflight, 2),
            Preflight,
            vec![run(Step::Preflight, 3)],
        ),
        row(
            "preflight fails",
            vec![
                Event::Begin,
                fail(Step::Preflight, 1),
                fail(Step::Preflight, 2),
            ],
            fail(Step::Preflight, 3),
            Failed,
            vec![],
        ),
        row(
            "hot pass granted",
            to_hot(),
            Event::GrantHotPass,
            HotSync,
            vec![run(Step::HotPass, 1)],
        ),
        row(
            "pass not converged",
            {
                let mut e = to_hot();
                e.push(Event::GrantHotPass);
                e
            },
            pass(Step::HotPass, 1, 500),
            HotSync,
            vec![],
        ),
        row(
            "the first pass (the initial copy) never converges",
            {
                let mut e = to_hot();
                e.push(Event::GrantHotPass);
                e
            },
            pass(Step::HotPass, 1, 5),
            HotSync,
            vec![],
        ),
        row(
            "pass converged",
            {
                let mut e = to_hot();
                e.extend([
                    Event::GrantHotPass,
                    pass(Step::HotPass, 1, 5),
                    Event::GrantHotPass,
                ]);
                e
            },
            pass(Step::HotPass, 2, 100),
            Converged,
            vec![],
        ),
        row(
            "max passes: not converging",
            {
                let mut e = to_hot();
                e.extend([
                    Event::GrantHotPass,
                    pass(Step::HotPass, 1, 500),
                    Event::GrantHotPass,
                    pass(Step::HotPass, 2, 500),
                    Event::GrantHotPass,
                ]);
                e
            },
            pass(Step::HotPass, 3, 500),
            Converged,
            vec![],
        ),
        row(
            "a preflight refused for good is not retried",
            vec![Event::Begin],
            fail_for_good(Step::Preflight, 1),
            Failed,
            vec![],
        ),
        row(
            "a cold step failing for good rolls back at once",
            to_data(),
            fail_for_good(Step::Databases, 1),
            RollingBack,
            vec![run(Step::RollbackStartOrigin, 1)],
        ),
        row(
            "a hot pass failing after good ones is retried: passes are not retries",
            {
                let mut e = to_hot();
                e.extend([
                    Event::GrantHotPass,
                    pass(Step::HotPass, 1, 500),
                    Event::GrantHotPass,
                    pass(Step::HotPass, 2, 500),
                    Event::GrantHotPass,
                ]);
                e
            },
            fail(Step::HotPass, 3),
            HotSync,
            vec![run(Step::HotPass, 4)],
        ),
        row(
            "hot pass fails",
            {
                let mut e = to_hot();
                e.extend([
                    Event::GrantHotPass,
                    fail(Step::HotPass, 1),
                    fail(Step::HotPass, 2),
                ]);
                e
            },
            fail(Step::HotPass, 3),
            Failed,
            vec![],
        ),
        row(
            "cold sync granted",
            to_converged(),
            Event::GrantColdSync {
                window_end_ms: 50_000,
            },
            PreWindowPass,
            vec![run(Step::PreWindowPass, 1)],
        ),
        row(
            "pre-window pass done inside the window: services stop",
            {
                let mut e = to_converged();
                e.push(Event::GrantColdSync {
                    window_end_ms: 50_000,
                });
                e
            },
            ok(Step::PreWindowPass, 1),
            ColdSync,
            vec![run(Step::StopOrigin, 1), run(Step::StopTarget, 1)],
        ),
        Row {
            name: "pre-window pass done after the window closed: wait",
            from: {
                let mut e = to_converged();
                e.push(Event::GrantColdSync {
                    window_end_ms: 50_000,
                });
                e
            },
            event: ok(Step::PreWindowPass, 1),
            now: 50_000,
            phase: Converged,
            actions: vec![],
        },
        row(
            "one side stopped",
            to_cold(),
            ok(Step::StopOrigin, 1),
            ColdSync,
            vec![],
        ),
        row(
            "both stopped: data moves in parallel",
            {
                let mut e = to_cold();
                e.push(ok(Step::StopOrigin, 1));
                e
            },
            ok(Step::StopTarget, 1),
            ColdSync,
            vec![
                run(Step::FinalPass, 1),
                run(Step::Databases, 1),
                run(Step::Config, 1),
            ],
        ),
        row(
            "data in place: origin releases the IP",
            {
                let mut e = to_data();
                e.extend([ok(Step::FinalPass, 1), ok(Step::Databases, 1)]);
                e
            },
            ok(Step::Config, 1),
            Cutover,
            vec![run(Step::OriginReleaseIp, 1)],
        ),
        row(
            "origin released: target takes",
            to_cutover(),
            ok(Step::OriginReleaseIp, 1),
            Cutover,
            vec![run(Step::TargetTakeIp, 1)],
        ),
        row(
            "target took: start it",
            {
                let mut e = to_cutover();
                e.push(ok(Step::OriginReleaseIp, 1));
                e
            },
            ok(Step::TargetTakeIp, 1),
            StartServices,
            vec![run(Step::StartTarget, 1)],
        ),
        row(
            "target serves",
            to_start(),
            ok(Step::StartTarget, 1),
            PostMigration,
            vec![run(Step::PostMigration, 1)],
        ),
        row(
            "post-migration done",
            to_post(),
            ok(Step::PostMigration, 1),
            Verify,
            vec![run(Step::Verify, 1)],
        ),
        row(
            "verified",
            {
                let mut e = to_post();
                e.push(ok(Step::PostMigration, 1));
                e
            },
            ok(Step::Verify, 1),
            Done,
            vec![],
        ),
        row(
            "cold step retried",
            to_data(),
            fail(Step::Databases, 1),
            ColdSync,
            vec![run(Step::Databases, 2)],
        ),
        row(
            "cold step fails: roll back (origin start)",
            {
                let mut e = to_data();
                e.push(fail(Step::Databases, 1));
                e
            },
            fail(Step::Databases, 2),
            RollingBack,
            vec![run(Step::RollbackStartOrigin, 1)],
        ),
        row(
            "target cannot start: roll back from the target",
            to_start(),
            fail(Step::StartTarget, 1),
            RollingBack,
            vec![run(Step::RollbackStopTarget, 1)],
        ),
        row(
            "rollback: target stopped, it lets the IP go",
            {
                let mut e = to_start();
                e.push(fail(Step::StartTarget, 1));
                e
            },
            ok(Step::RollbackStopTarget, 1),
            RollingBack,
            vec![run(Step::RollbackTargetReleaseIp, 1)],
        ),
        row(
            "rollback: origin takes the IP back",
            {
                let mut e = to_start();
                e.extend([fail(Step::StartTarget, 1), ok(Step::RollbackStopTarget, 1)]);
                e
            },
            ok(Step::RollbackTargetReleaseIp, 1),
            RollingBack,
            vec![run(Step::RollbackOriginTakeIp, 1)],
        ),
        row(
            "rollback: origin serves again",
            {
                let mut e = to_start();
                e.extend([
                    fail(Step::StartTarget, 1),
                    ok(Step::RollbackStopTarget, 1),
                    ok(Step::RollbackTargetReleaseIp, 1),
                ]);
                e
            },
            ok(Step::RollbackOriginTakeIp, 1),
            RollingBack,
            vec![run(Step::RollbackStartOrigin, 1)],
        ),
        row(
            "rolled back",
            {
                let mut e = to_start();
                e.extend([
                    fail(Step::StartTarget, 1),
                    ok(Step::RollbackStopTarget, 1),
                    ok(Step::RollbackTargetReleaseIp, 1),
                    ok(Step::RollbackOriginTakeIp, 1),
                ]);
                e
            },
            ok(Step::RollbackStartOrigin, 1),
            RolledBack,
            vec![],
        ),
        row(
            "rollback step retried longer than a cold step",
            {
                let mut e = to_data();
                e.extend([
                    fail(Step::Databases, 1),
                    fail(Step::Databases, 2),
                    fail(Step::RollbackStartOrigin, 1),
                ]);
                e
            },
            fail(Step::RollbackStartOrigin, 2),
            RollingBack,
            vec![run(Step::RollbackStartOrigin, 3)],
        ),
        row(
            "rollback step fails for good: operator",
            {
                let mut e = to_data();
                e.extend([
                    fail(Step::Databases, 1),
                    fail(Step::Databases, 2),
                    fail(Step::RollbackStartOrigin, 1),
                    fail(Step::RollbackStartOrigin, 2),
                ]);
                e
            },
            fail(Step::RollbackStartOrigin, 3),
            Failed,
            vec![],
        ),
        row(
            "post-migration fails after serving: operator, no rollback",
            {
                let mut e = to_post();
                e.push(fail(Step::PostMigration, 1));
                e
            },
            fail(Step::PostMigration, 2),
            Failed,
            vec![],
        ),
        Row {
            name: "deadline passes: retried",
            from: to_start(),
            event: Event::Tick,
            now: 1000 + RULES.timing.step_deadline_ms,
            phase: RollingBack,
            actions: vec![run(Step::RollbackStopTarget, 1)],
        },
        Row {
            name: "sync deadline passes: retried",
            from: to_data(),
            event: Event::Tick,
            now: 1000 + RULES.timing.step_deadline_ms,
            phase: ColdSync,
            actions: vec![run(Step::Config, 2)],
        },
        row(
            "pause when idle",
            to_converged(),
            Event::Pause,
            Paused,
            vec![],
        ),
        row(
            "resume",
            {
                let mut e = to_converged();
                e.push(Event::Pause);
                e
            },
            Event::Resume,
            Converged,
            vec![],
        ),
        row(
            "pause during a pass waits",
            {
                let mut e = to_hot();
                e.push(Event::GrantHotPass);
                e
            },
            Event::Pause,
            HotSync,
            vec![],
        ),
        row(
            "the pass ends: paused",
            {
                let mut e = to_hot();
                e.extend([Event::GrantHotPass, Event::Pause]);
                e
            },
            pass(Step::HotPass, 1, 500),
            Paused,
            vec![],
        ),
        row(
            "abort before downtime",
            to_converged(),
            Event::Abort,
            Aborted,
            vec![],
        ),
        row(
            "abort during downtime rolls back",
            to_data(),
            Event::Abort,
            RollingBack,
            vec![run(Step::RollbackStartOrigin, 1)],
        ),
    ];
    for r in rows {
        let from = after(&r.from);
        let o = handle(&from, &r.event, r.now, &RULES);
        assert_eq!(o.instance.phase, r.phase, "{}: {:?}", r.name, o.ignored);
        assert_eq!(o.actions, r.actions, "{}", r.name);
    }
}

#[test]
fn a_gate_refusal_holds_a_converged_instance_until_it_is_resumed() {
    let i = after(&to_converged());
    let hold = Event::Hold {
        reason: "the window gate change-board refused: CHG-4711 not approved".into(),
    };
    let o = handle(&i, &hold, 1000, &RULES);
    assert_eq!(o.instance.phase, Phase::Paused);
    assert!(o.actions.is_empty());
    assert_eq!(
        o.instance.last_error.as_deref(),
        Some("the window gate change-board refused: CHG-4711 not approved")
    );
    let o = handle(&o.instance, &Event::Resume, 2000, &RULES);
    assert_eq!(o.instance.phase, Phase::Converged);
}

#[test]
fn downtime_runs_from_origin_stop_to_target_start() {
    let mut i = after(&to_start());
    assert_eq!(i.downtime_start_ms, Some(1000));
    i = handle(&i, &ok(Step::StartTarget, 1), 9000, &RULES).instance;
    assert_eq!(i.downtime_end_ms, Some(9000));
}

#[test]
fn events_that_do_not_fit_are_ignored_and_change_nothing() {
    let cases = [
        (to_converged(), Event::Begin),
        (
            to_hot(),
            Event::GrantColdSync {
                window_end_ms: 50_000,
            },
        ),
        (to_converged(), Event::GrantColdSync { window_end_ms: 500 }),
        (to_data(), ok(Step::Databases, 7)),
        (to_following(), Event::GrantHotPass),
        (to_data(), Event::Pause),
        (to_post(), Event::Abort),
        (to_converged(), Event::Tick),
        (
            to_hot(),
            Event::Hold {
                reason: "refused".into(),
            },
        ),
    ];
    for (from, event) in cases {
        let i = after(&from);
        let o = handle(&i, &event, 1000, &RULES);
        assert!(o.ignored.is_some(), "{event:?} in {:?}", i.phase);
        assert_eq!(o.instance, i);
        assert!(o.actions.is_empty());
    }
}

// ------------------------------------------------------------------ property test

#[derive(Debug, Clone)]
enum Pick {
    Begin,
    Hot,
    Cold(i64),
    Succeed(usize, u64),
    Fail(usize),
    Advance(i64),
    Pause,
    Resume,
    Abort,
}

fn pick() -> impl Strategy<Value = Pick> {
    prop_oneof![
        1 => Just(Pick::Begin),
        2 => Just(Pick::Hot),
        2 => (0i64..100_000).prop_map(Pick::Cold),
        8 => (0usize..4, 0u64..300).prop_map(|(i, f)| Pick::Succeed(i, f)),
        3 => (0usize..4).prop_map(Pick::Fail),
        2 => (0i64..20_000).prop_map(Pick::Advance),
        1 => Just(Pick::Pause),
        1 => Just(Pick::Resume),
        1 => Just(Pick::Abort),
    ]
}

/// What really happened on the hosts, from the steps that succeeded.
#[derive(Default)]
struct Hosts {
    origin_released: bool,
    target_took: bool,
    data: BTreeSet<Step>,
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn invariants_hold_for_any_event_sequence(picks in proptest::collection::vec(pick(), 1..80)) {
        let mut i = Instance::default();
        let mut now = 0i64;
        let mut hosts = Hosts::default();
        for p in picks {
            let running: Vec<(Step, u32)> = i.running.iter().map(|(s, r)| (*s, r.attempt)).collect();
            let event = match p {
                Pick::Begin => Event::Begin,
                Pick::Hot => Event::GrantHotPass,
                Pick::Cold(d) => Event::GrantColdSync { window_end_ms: now + d },
                Pick::Succeed(n, files) if !running.is_empty() => {
                    let (step, attempt) = running[n % running.len()];
                    // A preflight chooses a standby or a dump at random.
                    let databases = (step == Step::Preflight).then(|| DbPlan { stream: files % 2 == 0, logical: files % 4 == 0, why: "x".into() });
                    Event::Succeeded { step, attempt, stats: Some(PassStats { files_changed: files, bytes_changed: files, ..Default::default() }), databases, gate: String::new(), mail_queue: String::new(), evidence: String::new(), elapsed_ms: 0 }
                }
                Pick::Fail(n) if !running.is_empty() => {
                    let (step, attempt) = running[n % running.len()];
                    Event::Failed { step, attempt, error: "x".into(), permanent: false }
                }
                Pick::Advance(d) => { now += d; Event::Tick }
                Pick::Pause => Event::Pause,
                Pick::Resume => Event::Resume,
                Pick::Abort => Event::Abort,
                _ => Event::Tick,
            };
            let o = handle(&i, &event, now, &RULES);
            if let Event::Succeeded { step, .. } = &event {
                if o.ignored.is_none() {
                    match step {
                        Step::OriginReleaseIp => hosts.origin_released = true,
                        Step::TargetTakeIp => hosts.target_took = true,
                        Step::RollbackTargetReleaseIp => hosts.target_took = false,
                        Step::RollbackOriginTakeIp => hosts.origin_released = false,
                        Step::StopOrigin | Step::StopTarget => hosts.data.clear(),
                        s if COLD_DATA.contains(s) => { hosts.data.insert(*s); }
                        _ => {}
                    }
                }
            }
            for a in &o.actions {
                let Action::Run { step, .. } = a;
                match step {
                    // Origin services stop only inside an open window.
                    Step::StopOrigin => prop_assert!(o.instance.window_end_ms.is_some_and(|end| now < end)),
                    // The target takes the IP only once the origin has released it.
                    Step::TargetTakeIp => prop_assert!(hosts.origin_released),
                    // The origin takes it back only once the target has let it go.
                    Step::RollbackOriginTakeIp => prop_assert!(!o.instance.world.target_ip && !o.instance.running.contains_key(&Step::TargetTakeIp)),
                    // No hot pass while the standby is being made; a standby is promoted only
                    // once it follows.
                    Step::HotPass => prop_assert!(!o.instance.running.contains_key(&Step::FollowDatabases)),
                    Step::Databases => prop_assert!(!o.instance.databases.as_ref().is_some_and(|d| d.stream) || o.instance.following),
                    // Target services start only with databases and config (and files) in place.
                    Step::StartTarget => prop_assert!(COLD_DATA.iter().all(|d| hosts.data.contains(d))),
                    _ => {}
                }
            }
            // The service IP is never held by both hosts.
            prop_assert!(hosts.origin_released || !hosts.target_took);
            prop_assert!(!(o.instance.world.origin_ip && o.instance.world.target_ip));
            if o.instance.phase == Phase::RolledBack {
                // A rolled-back instance ends with the origin serving, holding its IP.
                prop_assert!(o.instance.world.origin_ip && o.instance.world.origin_serving && !o.instance.world.target_ip);
                prop_assert!(!hosts.target_took);
            }
            if o.instance.phase.is_final() {
                prop_assert!(o.instance.running.is_empty());
            }
            i = o.instance;
        }
    }
}
