//! The engine against simulated agents, on simulated time (tokio's paused clock): whole fleets
//! over several nights run in seconds, every transition is checked, and the orchestrator is
//! stopped and restarted at every step boundary.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};

use bmfleet_orchestrator::clock::{Clock, SimulatedClock};
use bmfleet_orchestrator::engine::{rules_for, Command, Engine, Stop};
use bmfleet_orchestrator::fleet::FleetFile;
use bmfleet_orchestrator::machine::{Event, Phase, Step};
use bmfleet_orchestrator::sim::{Failure, Script, SimAgents};
use bmfleet_orchestrator::state::State;
use bmfleet_orchestrator::windows;
use tokio::sync::mpsc;

/// Monday 2026-12-07 12:00 UTC.
const START: &str = "2026-12-07T12:00:00Z";

fn start_ms() -> i64 {
    START.parse::<jiff::Timestamp>().unwrap().as_millisecond()
}

fn fleet_text(n: usize, canaries: u32, failure_budget: u32, max_down: u32) -> String {
    let mut text = format!(
        r#"[fleet]
name = "sim"
max_parallel_hot_syncs = 40
max_concurrent_downtime = {max_down}
min_stagger_secs = 60
canary_count = {canaries}
canary_approval = true
failure_budget = {failure_budget}
downtime_budget_secs = 1800
"#
    );
    for i in 0..n {
        let (tz, start) = if i % 2 == 0 {
            ("Europe/Paris", "22:00")
        } else {
            ("America/Montreal", "23:00")
        };
        text += &format!(
            r#"
[[instance]]
name = "mail-{i:03}"
origin = "origin-{i:03}"
target = "target-{i:03}"
service_ip = "198.18.{}.{}/16"
[[instance.windows]]
days = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
start = "{start}"
end = "05:00"
timezone = "{tz}"
"#,
            i / 250,
            i % 250 + 1
        );
    }
    text
}

fn counts(instances: &[bmfleet_orchestrator::machine::Instance]) -> BTreeMap<String, usize> {
    let mut c = BTreeMap::new();
    for i in instances {
        *c.entry(format!("{:?}", i.phase)).or_insert(0) += 1;
    }
    c
}

#[tokio::test(start_paused = true)]
async fn two_hundred_instances_with_canaries_two_zones_and_failures() {
    let n = 200;
    let fleet = FleetFile::parse(&fleet_text(n, 2, 50, 2), "sim.toml").unwrap();
    let mut script = Script::default();
    let (mut rolled_back, mut failed) = (HashSet::new(), HashSet::new());
    for i in 2..n {
        let name = format!("mail-{i:03}");
        if i % 29 == 3 {
            script
                .failures
                .insert((name.clone(), Step::Databases), Failure::Always);
            rolled_back.insert(name.clone());
        } else if i % 37 == 6 {
            // A stuck host: only the step's deadline gets the instance out of it.
            script
                .failures
                .insert((name.clone(), Step::StopOrigin), Failure::Hang);
            rolled_back.insert(name.clone());
        } else if i % 31 == 4 {
            script
                .failures
                .insert((name.clone(), Step::PostMigration), Failure::Always);
            failed.insert(name.clone());
        } else if i % 13 == 5 {
            script
                .failures
                .insert((name.clone(), Step::HotPass), Failure::Once);
        }
    }
    let agents = SimAgents::new(script);
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(State::open(&dir.path().join("state.db")).unwrap());
    let clock = Arc::new(SimulatedClock::starting_at(start_ms()));
    let rules = rules_for(&fleet);
    let mut engine =
        Engine::open(fleet.clone(), store, Arc::new(agents.clone()), clock, rules).unwrap();
    let (commands, rx) = mpsc::unbounded_channel();
    let violations = Arc::new(Mutex::new(Vec::<String>::new()));
    let cold_starts = Arc::new(Mutex::new(0usize));
    {
        let (violations, cold_starts, commands) =
            (violations.clone(), cold_starts.clone(), commands.clone());
        let max_down = fleet.policy.max_concurrent_downtime as usize;
        let mut approved = false;
        engine.observe(Box::new(move |t| {
            let down = t.instances.iter().filter(|i| i.phase.is_down()).count();
            if down > max_down {
                violations
                    .lock()
                    .unwrap()
                    .push(format!("{down} instances down at {}", t.now_ms));
            }
            if let Event::GrantColdSync { .. } = t.event {
                *cold_starts.lock().unwrap() += 1;
                let now = jiff::Timestamp::from_millisecond(t.now_ms).unwrap();
                if windows::open_at(&t.instance.windows, now).is_none() {
                    violations
                        .lock()
                        .unwrap()
                        .push(format!("{} started outside its window", t.instance.name));
                }
            }
            // Canaries first, alone; an operator approves once both are done.
            let canaries_done = t.instances[..2].iter().all(|i| i.phase == Phase::Done);
            if !canaries_done && t.instances[2..].iter().any(|i| i.phase.is_down()) {
                violations
                    .lock()
                    .unwrap()
                    .push("a non-canary went down before the canaries were done".into());
            }
            if canaries_done && !approved {
                approved = true;
                let _ = commands.send(Command::Approve);
            }
        }));
    }
    let stop = engine.run(rx, None).await.unwrap();
    assert_eq!(stop, Stop::AllFinal);
    assert_eq!(*violations.lock().unwrap(), Vec::<String>::new());
    let c = counts(engine.instances());
    assert_eq!(
        c.get("RolledBack").copied().unwrap_or(0),
        rolled_back.len(),
        "{c:?}"
    );
    assert_eq!(c.get("Failed").copied().unwrap_or(0), failed.len(), "{c:?}");
    assert_eq!(
        c.get("Done").copied().unwrap_or(0),
        n - rolled_back.len() - failed.len(),
        "{c:?}"
    );
    assert_eq!(*cold_starts.lock().unwrap(), n);
    for i in engine.instances().iter().filter(|i| i.phase == Phase::Done) {
        let (start, end) = (i.downtime_start_ms.unwrap(), i.downtime_end_ms.unwrap());
        assert!(end > start);
    }
    let ops = agents.executed();
    let unique: HashSet<_> = ops.iter().collect();
    assert_eq!(unique.len(), ops.len(), "an operation ran twice");
}

#[tokio::test(start_paused = true)]
async fn the_failure_budget_stops_new_cold_syncs() {
    let n = 12;
    let fleet = FleetFile::parse(&fleet_text(n, 0, 2, 1), "sim.toml").unwrap();
    let mut script = Script::default();
    for i in 0..n {
        script
            .failures
            .insert((format!("mail-{i:03}"), Step::Databases), Failure::Always);
    }
    let run = simulate(&fleet, None, SimAgents::new(script)).await;
    assert_eq!(run.stop, Stop::Stalled);
    let c = counts(run.engine.instances());
    // One instance down at a time: the second failure spends the budget, nothing else starts.
    assert_eq!(c.get("RolledBack").copied(), Some(2), "{c:?}");
    assert_eq!(c.get("Converged").copied(), Some(n - 2), "{c:?}");
}

/// Every hot and pre-window pass ran (at least once), each with `kib` KiB/s.
fn live_passes_limited_to(limits: &[(Step, u32)], kib: u32) {
    for step in [Step::HotPass, Step::PreWindowPass] {
        let of_step: Vec<u32> = limits
            .iter()
            .filter(|(s, _)| *s == step)
            .map(|(_, k)| *k)
            .collect();
        assert!(!of_step.is_empty(), "{step:?} never ran: {limits:?}");
        assert!(of_step.iter().all(|k| *k == kib), "{step:?}: {of_step:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn the_bandwidth_budget_throttles_the_live_passes_not_the_final_one() {
    let text = fleet_text(3, 0, 0, 3).replace(
        "downtime_budget_secs = 1800\n",
        "downtime_budget_secs = 1800\nbandwidth_budget_mib = 80\n",
    );
    let fleet = FleetFile::parse(&text, "sim.toml").unwrap();
    let agents = SimAgents::new(Script::default());
    let run = simulate(&fleet, None, agents.clone()).await;
    assert_eq!(run.stop, Stop::AllFinal);
    assert!(run
        .engine
        .instances()
        .iter()
        .all(|i| i.phase == Phase::Done));
    let limits = agents.bandwidth_limits();
    // 80 MiB/s shared by at most 40 hot syncs: 2 MiB/s each.
    live_passes_limited_to(&limits, 2048);
    let final_passes: Vec<u32> = limits
        .iter()
        .filter(|(s, _)| *s == Step::FinalPass)
        .map(|(_, k)| *k)
        .collect();
    assert_eq!(
        final_passes,
        [0, 0, 0],
        "the downtime's pass runs at full speed"
    );
}

#[tokio::test(start_paused = true)]
async fn the_next_cold_sync_starts_when_the_stagger_ends_not_at_the_next_tick() {
    // Instances 0 and 2 share a window (1 is in another zone), 60 s of stagger (fleet_text),
    // the engine's tick at 30 s: the second cold sync must start the moment the stagger
    // allows it, not up to a tick later.
    let fleet = FleetFile::parse(&fleet_text(3, 0, 0, 2), "sim.toml").unwrap();
    let run = simulate(&fleet, None, SimAgents::new(Script::default())).await;
    assert_eq!(run.stop, Stop::AllFinal);
    let grants: Vec<i64> = run
        .transitions
        .iter()
        .filter(|(_, e)| matches!(e, Event::GrantColdSync { .. }))
        .map(|(t, _)| *t)
        .collect();
    assert_eq!(grants.len(), 3, "{grants:?}");
    assert_eq!(grants[1] - grants[0], 60_000, "{grants:?}");
}

/// Runs one instance to its end, stopping and re-opening the engine after every transition
/// (`bandwidth_mib`: the fleet's bandwidth budget, 0 none); the agents keep what they ran.
async fn run_with_restarts(
    script: Script,
    dir: &std::path::Path,
    bandwidth_mib: u32,
) -> (Phase, SimAgents, usize) {
    let text = fleet_text(1, 0, 3, 1).replace(
        "downtime_budget_secs = 1800\n",
        &format!("downtime_budget_secs = 1800\nbandwidth_budget_mib = {bandwidth_mib}\n"),
    );
    let fleet = FleetFile::parse(&text, "sim.toml").unwrap();
    let agents = SimAgents::new(script);
    let clock: Arc<dyn Clock> = Arc::new(SimulatedClock::starting_at(start_ms()));
    let db = dir.join("state.db");
    let mut restarts = 0;
    loop {
        let store = Arc::new(State::open(&db).unwrap());
        let mut engine = Engine::open(
            fleet.clone(),
            store,
            Arc::new(agents.clone()),
            clock.clone(),
            rules_for(&fleet),
        )
        .unwrap();
        let (_commands, rx) = mpsc::unbounded_channel();
        match engine.run(rx, Some(1)).await.unwrap() {
            Stop::TransitionLimit => restarts += 1,
            Stop::AllFinal => return (engine.instances()[0].phase, agents, restarts),
            other => panic!("unexpected stop {other:?}"),
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_restart_at_every_step_boundary_finishes_the_same_and_runs_nothing_twice() {
    let dir = tempfile::tempdir().unwrap();
    let (phase, agents, restarts) = run_with_restarts(Script::default(), dir.path(), 0).await;
    let executed = agents.executed();
    assert_eq!(phase, Phase::Done);
    assert!(restarts >= 15, "only {restarts} step boundaries");
    let unique: HashSet<_> = executed.iter().collect();
    assert_eq!(
        unique.len(),
        executed.len(),
        "an operation ran twice: {executed:?}"
    );

    // The same with a failing target start: the rollback survives restarts too.
    let dir = tempfile::tempdir().unwrap();
    let mut script = Script::default();
    script
        .failures
        .insert(("mail-000".into(), Step::StartTarget), Failure::Always);
    let (phase, agents, _) = run_with_restarts(script, dir.path(), 0).await;
    let executed = agents.executed();
    assert_eq!(phase, Phase::RolledBack);
    assert!(
        executed
            .iter()
            .any(|op| op.ends_with("rollback-start-origin/1")),
        "{executed:?}"
    );
    let unique: HashSet<_> = executed.iter().collect();
    assert_eq!(
        unique.len(),
        executed.len(),
        "an operation ran twice: {executed:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_pass_resent_after_a_restart_keeps_the_bandwidth_limit_it_was_granted() {
    // The limit lives in the instance's stored row: every live pass, sent by an engine opened
    // from the state DB after the grant (the engine is re-opened after every transition),
    // carries the one its grant gave (80 MiB/s over at most 40 hot syncs: 2 MiB/s).
    let dir = tempfile::tempdir().unwrap();
    let (phase, agents, restarts) = run_with_restarts(Script::default(), dir.path(), 80).await;
    assert_eq!(phase, Phase::Done);
    assert!(restarts >= 15, "only {restarts} step boundaries");
    live_passes_limited_to(&agents.bandwidth_limits(), 2048);
    // And the fleet state is no longer where the limits are kept.
    let store = State::open(&dir.path().join("state.db")).unwrap();
    assert!(store.fleet_state().unwrap().hot_pass_kib.is_empty());
    assert_eq!(
        store.hot_pass_limits().unwrap().get("mail-000").copied(),
        Some(2048)
    );
}

/// A simulated run: the engine after it, its clock, every transition's time and event, and
/// why it stopped.
struct Run {
    engine: Engine,
    clock: Arc<SimulatedClock>,
    transitions: Vec<(i64, Event)>,
    stop: Stop,
}

impl Run {
    fn times(&self) -> Vec<i64> {
        self.transitions.iter().map(|(t, _)| *t).collect()
    }
}

#[tokio::test(start_paused = true)]
async fn the_final_pass_counts_the_journal_from_the_pre_window_pass_last_round() {
    let fleet = FleetFile::parse(&fleet_text(1, 0, 0, 1), "sim.toml").unwrap();
    for (rounds, suffix) in [(0, ""), (1, ""), (3, "/round-3")] {
        let agents = SimAgents::new(Script {
            pre_window_rounds: rounds,
            ..Script::default()
        });
        let run = simulate(&fleet, None, agents.clone()).await;
        assert_eq!(run.stop, Stop::AllFinal);
        let journals = agents.journal_origins();
        let pre_window = journals
            .iter()
            .find(|j| j.operation_id.contains("/pre-window-pass/"))
            .expect("a pre-window pass ran");
        let last_hot = journals
            .iter()
            .rfind(|j| j.operation_id.contains("/hot-pass/"))
            .expect("hot passes ran");
        // The pre-window pass carries from the last hot pass.
        assert_eq!(
            pre_window.carry_operation.as_deref(),
            Some(last_hot.operation_id.as_str())
        );
        let final_pass = journals
            .iter()
            .find(|j| j.operation_id.contains("/final-pass/"))
            .expect("a final pass ran");
        assert_eq!(
            final_pass.full_pass_operation,
            Some(format!("{}{suffix}", pre_window.operation_id)),
            "{rounds} rounds"
        );
    }
}

/// Runs a fleet to its end (or `limit` transitions).
async fn simulate(fleet: &FleetFile, limit: Option<u64>, agents: SimAgents) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(State::open(&dir.path().join("state.db")).unwrap());
    let clock = Arc::new(SimulatedClock::starting_at(start_ms()));
    let mut engine = Engine::open(
        fleet.clone(),
        store,
        Arc::new(agents),
        clock.clone(),
        rules_for(fleet),
    )
    .unwrap();
    let transitions = Arc::new(Mutex::new(Vec::new()));
    let seen = transitions.clone();
    engine.observe(Box::new(move |t| {
        seen.lock().unwrap().push((t.now_ms, t.event.clone()))
    }));
    let (_commands, rx) = mpsc::unbounded_channel();
    let stop = engine.run(rx, limit).await.unwrap();
    let transitions = transitions.lock().unwrap().clone();
    Run {
        engine,
        clock,
        transitions,
        stop,
    }
}

#[tokio::test(start_paused = true)]
async fn the_eta_halfway_through_is_within_a_fifth_of_the_actual_remaining_time() {
    let fleet = FleetFile::parse(&fleet_text(60, 0, 50, 2), "sim.toml").unwrap();
    let times = simulate(&fleet, None, SimAgents::new(Script::default()))
        .await
        .times();
    let (first, last) = (times[0], *times.last().unwrap());
    let half = first + (last - first) / 2;
    let k = times.iter().position(|t| *t >= half).unwrap() as u64;
    let Run { engine, clock, .. } =
        simulate(&fleet, Some(k), SimAgents::new(Script::default())).await;
    let now = clock.now_ms();
    let eta =
        bmfleet_orchestrator::eta::fleet_finish(&fleet, engine.instances(), now).expect("an ETA");
    let (estimated, actual) = ((eta - now) as f64, (last - now) as f64);
    eprintln!(
        "ETA check: estimated {:.1} min, actual {:.1} min",
        estimated / 60_000.0,
        actual / 60_000.0
    );
    assert!(
        (estimated - actual).abs() <= 0.2 * actual,
        "ETA {:.0} min from now, actually {:.0} min ({} of {} transitions)",
        estimated / 60_000.0,
        actual / 60_000.0,
        k,
        times.len()
    );
}

/// The window gate: asked before each downtime; its refusal holds the instance (paused, with
/// why, audited) and no downtime begins; once an operator resumes it, the gate is asked again
/// and, letting it go, the migration finishes.
#[tokio::test(start_paused = true)]
async fn a_window_gates_refusal_holds_the_instance_until_it_lets_it_go() {
    let text =
        fleet_text(1, 0, 5, 1).replacen("[fleet]\n", "[fleet]\ngate = \"change-board\"\n", 1);
    let fleet = FleetFile::parse(&text, "sim.toml").unwrap();
    assert_eq!(
        fleet.instances[0].gate.as_ref().unwrap().name,
        "change-board"
    );
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(State::open(&dir.path().join("state.db")).unwrap());
    let clock = Arc::new(SimulatedClock::starting_at(start_ms()));
    let mut engine = Engine::open(
        fleet.clone(),
        store.clone(),
        Arc::new(SimAgents::new(Script::default())),
        clock.clone(),
        rules_for(&fleet),
    )
    .unwrap();
    let asked = Arc::new(Mutex::new(Vec::<(String, String)>::new()));
    let approve = Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        let (asked, approve) = (asked.clone(), approve.clone());
        engine.set_gate(Arc::new(move |gate, spec, _end| {
            asked.lock().unwrap().push((gate, spec.name.clone()));
            let yes = approve.load(std::sync::atomic::Ordering::SeqCst);
            Box::pin(async move {
                if yes {
                    Ok(())
                } else {
                    Err("CHG-4711 is not approved".to_string())
                }
            })
        }));
    }
    let downs = Arc::new(Mutex::new(Vec::new()));
    {
        let downs = downs.clone();
        engine.observe(Box::new(move |t| {
            if let Event::GrantColdSync { .. } = t.event {
                downs.lock().unwrap().push(t.now_ms);
            }
        }));
    }
    let (commands, rx) = mpsc::unbounded_channel();
    let handle = tokio::spawn(async move {
        let stop = engine.run(rx, None).await.unwrap();
        (engine, stop)
    });
    // Refused: held, with why; no downtime began.
    let deadline = clock.now_ms() + 48 * 3_600_000;
    loop {
        tokio::time::sleep(std::time::Duration::from_secs(60)).await;
        let held = store
            .instances()
            .unwrap()
            .into_iter()
            .any(|(_, i)| i.phase == Phase::Paused);
        if held {
            break;
        }
        assert!(clock.now_ms() < deadline, "never held");
    }
    let (_, i) = store.instances().unwrap().remove(0);
    assert!(
        i.last_error
            .as_deref()
            .unwrap_or_default()
            .contains("CHG-4711 is not approved"),
        "{i:?}"
    );
    assert!(downs.lock().unwrap().is_empty());
    assert_eq!(
        asked.lock().unwrap().clone(),
        [("change-board".to_string(), "mail-000".to_string())]
    );
    let audit = store.audit_log(100, 0).unwrap();
    assert!(
        audit.iter().any(|a| a.method == "Gate"
            && a.who == "gate change-board"
            && a.outcome == "denied"
            && a.detail.contains("CHG-4711")),
        "{audit:?}"
    );
    // Resumed after the change was approved: asked again, let go, migrated.
    approve.store(true, std::sync::atomic::Ordering::SeqCst);
    commands.send(Command::Resume(None)).unwrap();
    commands
        .send(Command::Resume(Some("mail-000".into())))
        .unwrap();
    let (engine, stop) = handle.await.unwrap();
    assert_eq!(stop, Stop::AllFinal);
    assert_eq!(engine.instances()[0].phase, Phase::Done);
    assert_eq!(asked.lock().unwrap().len(), 2);
    assert_eq!(downs.lock().unwrap().len(), 1);
    assert!(store
        .audit_log(100, 0)
        .unwrap()
        .iter()
        .any(|a| a.method == "Gate" && a.outcome == "ok"));
}
