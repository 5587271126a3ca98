//! The engine: the I/O edge around the pure state machine and scheduler. It asks the
//! scheduler what may start, feeds events to the machine, writes every transition to SQLite
//! before running its actions, runs actions through an [`AgentPort`], and on start re-attaches
//! to the steps that were in flight (same operation ids, so agents answer from their journal).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::mpsc;

use crate::clock::Clock;
use crate::fleet::{FleetFile, InstanceSpec};
use crate::machine::{self, Action, DbPlan, Event, Instance, PassStats, Phase, Rules, Step};
use crate::scheduler::{self, FleetState, Grant};
use crate::state::{HistoryEntry, State, StateError, TransitionRecord};

/// One step for an agent to run.
#[derive(Debug, Clone)]
pub struct Job {
    /// The migration's name.
    pub migration: String,
    /// The instance.
    pub instance: InstanceSpec,
    /// The step.
    pub step: Step,
    /// Its attempt.
    pub attempt: u32,
    /// `migration/instance/step/attempt`: the same on every retry of this attempt.
    pub operation_id: String,
    /// Bandwidth limit for sync steps, KiB/s (0: none).
    pub bwlimit_kib: u32,
    /// When the step must have answered, Unix ms (what a grant for it lives until).
    pub deadline_ms: i64,
    /// The final pass: the operation id of the full pass that preceded it (the pre-window
    /// pass's last attempt), from whose start the origin's change journal counts.
    pub full_pass_operation: Option<String>,
    /// A live pass (hot after the first, pre-window): the last good pass's operation, whose
    /// start the origin's journal marked; what changed since is carried comparing contents.
    pub carry_operation: Option<String>,
    /// The databases step promotes the standby that follows the origin (the preflight chose
    /// streaming) instead of dumping.
    pub promote_databases: bool,
    /// The databases follow by logical replication (FollowDatabases subscribes).
    pub logical_databases: bool,
    /// A pre-window pass: a round that took longer than this (ms) is followed by another…
    pub pre_window_round_ms: u64,
    /// …up to this many rounds.
    pub pre_window_rounds: u32,
    /// The Databases step: the origin's WAL position its agent read at StopOrigin (none: the
    /// target asks the origin, as after an orchestrator restart).
    pub origin_wal: Option<bmfleet_proto::v1::WalPosition>,
    /// The Config step: the origin's Postfix queue held no message at its StopOrigin (false
    /// when not known, as after an orchestrator restart: the queue is pulled).
    pub origin_queue_empty: bool,
}

/// What a step that succeeded reports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StepOutput {
    /// A sync pass's statistics.
    pub stats: Option<PassStats>,
    /// The preflight's choice of how the databases move.
    pub databases: Option<DbPlan>,
    /// The databases' move: what their gate compared.
    pub gate: String,
    /// The mail queue: drained before the stop, or carried at cold sync.
    pub mail_queue: String,
    /// What the step saw that proves it did its work (the final pass's comparison, the
    /// BlueMind tasks the post-migration ran, the final checks' answers), for the report.
    pub evidence: String,
    /// StopOrigin: the origin's WAL position once stopped, for the Databases step.
    pub origin_wal: Option<bmfleet_proto::v1::WalPosition>,
    /// StopOrigin: its Postfix queue held no message, for the Config step.
    pub origin_queue_empty: bool,
}

impl From<PassStats> for StepOutput {
    fn from(stats: PassStats) -> Self {
        StepOutput {
            stats: Some(stats),
            ..StepOutput::default()
        }
    }
}

/// Why a step failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepError {
    /// What an operator reads.
    pub message: String,
    /// No retry can change it: the step is not retried.
    pub permanent: bool,
}

impl StepError {
    /// A failure only an operator can mend (the step is not retried).
    pub fn permanent(message: String) -> Self {
        StepError {
            message,
            permanent: true,
        }
    }
}

impl From<String> for StepError {
    fn from(message: String) -> Self {
        StepError {
            message,
            permanent: false,
        }
    }
}

impl From<&str> for StepError {
    fn from(message: &str) -> Self {
        message.to_string().into()
    }
}

/// How a step ended.
pub type StepResult = Result<StepOutput, StepError>;

/// The orchestrator's way of making agents do a step (gRPC to real agents, or a simulation).
pub trait AgentPort: Send + Sync + 'static {
    /// Runs `job` to its end.
    fn run(&self, job: Job) -> Pin<Box<dyn Future<Output = StepResult> + Send>>;

    /// The instance reached a final phase: whatever it was granted on its hosts is withdrawn.
    fn end_instance(
        &self,
        _migration: String,
        _instance: InstanceSpec,
    ) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        Box::pin(async {})
    }
}

/// An operator's command for the engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Hold one instance, or the fleet when None.
    Pause(Option<String>),
    /// Release one instance, or the fleet.
    Resume(Option<String>),
    /// Withdraw one instance (rolls back if it is down).
    Abort(String),
    /// Let the fleet go on after the canaries.
    Approve,
}

impl std::fmt::Display for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Pause(Some(name)) => write!(f, "pause of {name}"),
            Command::Pause(None) => write!(f, "pause of the fleet"),
            Command::Resume(Some(name)) => write!(f, "resume of {name}"),
            Command::Resume(None) => write!(f, "resume of the fleet"),
            Command::Abort(name) => write!(f, "abort of {name}"),
            Command::Approve => write!(f, "approval of the fleet after its canaries"),
        }
    }
}

/// What one transition looked like, for observers (metrics, tests).
pub struct Transition<'a> {
    /// When, Unix ms.
    pub now_ms: i64,
    /// Which instance.
    pub instance: &'a InstanceSpec,
    /// Its position in the fleet file.
    pub n: usize,
    /// The event.
    pub event: &'a Event,
    /// Every instance's state after it.
    pub instances: &'a [Instance],
    /// The same, grouped by phase.
    pub index: &'a scheduler::Index,
    /// The fleet-wide state after it.
    pub fleet: &'a FleetState,
}

/// Called after every transition.
pub type Observer = Box<dyn FnMut(&Transition<'_>) + Send>;

/// Asks the window gate named (the receiver's name) whether an instance's downtime may begin
/// now, its window ending at the given time (Unix ms): Ok lets it, Err holds it with why.
pub type GateAsk = Arc<
    dyn Fn(String, InstanceSpec, i64) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>>
        + Send
        + Sync,
>;

/// Why the engine returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// Every instance is finished.
    AllFinal,
    /// Nothing can move any more: the failure budget is spent and nothing is in flight.
    Stalled,
    /// The transition limit given to `run` was reached.
    TransitionLimit,
    /// The command channel closed (shutdown).
    Shutdown,
}

/// The instances' states as the engine holds them, for readers outside its task (the Fleet
/// API's status): kept current transition by transition, read without the state DB.
#[derive(Debug, Default)]
pub struct Snapshot {
    instances: std::sync::RwLock<Vec<Instance>>,
}

impl Snapshot {
    /// Runs `read` on every instance's state now, in fleet-file order, without copying them
    /// (a fleet of thousands; the engine's next transition waits for it: keep it short).
    pub fn read<R>(&self, read: impl FnOnce(&[Instance]) -> R) -> R {
        read(&self.instances.read().unwrap_or_else(|p| p.into_inner()))
    }

    fn set(&self, n: usize, instance: &Instance) {
        let mut all = self.instances.write().unwrap_or_else(|p| p.into_inner());
        if let Some(slot) = all.get_mut(n) {
            *slot = instance.clone();
        }
    }
}

/// The engine of one fleet.
pub struct Engine {
    fleet: FleetFile,
    instances: Vec<Instance>,
    state: FleetState,
    store: Arc<State>,
    port: Arc<dyn AgentPort>,
    clock: Arc<dyn Clock>,
    rules: Rules,
    results_tx: mpsc::UnboundedSender<(usize, Event)>,
    results_rx: mpsc::UnboundedReceiver<(usize, Event)>,
    bwlimit: Vec<u32>,
    observer: Option<Observer>,
    tick_ms: u64,
    gate: Option<GateAsk>,
    gate_tx: mpsc::UnboundedSender<(usize, i64, Result<(), String>)>,
    gate_rx: mpsc::UnboundedReceiver<(usize, i64, Result<(), String>)>,
    // Instances whose gate is being asked, and those it let go (until their window's end).
    gating: std::collections::HashSet<usize>,
    gate_passed: std::collections::HashMap<usize, i64>,
    // What each instance's origin said at its last StopOrigin (in memory: after a restart
    // the target asks the origin for its position again and pulls its queue).
    stop_facts: Arc<std::sync::Mutex<std::collections::HashMap<usize, StopFacts>>>,
    // The fleet state changed since it was last written (it is written with the next
    // transition, not with every one).
    fleet_dirty: bool,
    // The instances grouped as the scheduler looks at them, kept current by `apply`.
    index: scheduler::Index,
    // When each running step must have answered: (deadline, instance), soonest first. An
    // entry outlives its step (looked at, then dropped, when its time comes).
    deadlines: std::collections::BinaryHeap<std::cmp::Reverse<(i64, usize)>>,
    snapshot: Arc<Snapshot>,
}

/// What an origin's stop reported that the downtime's next steps use.
#[derive(Debug, Clone, Default)]
struct StopFacts {
    /// Its WAL position once stopped (for the Databases step).
    wal: Option<bmfleet_proto::v1::WalPosition>,
    /// Its Postfix queue held no message (for the Config step).
    queue_empty: bool,
}

/// How long attempt `attempt` of a step waits before it runs, ms.
pub fn retry_backoff_ms(attempt: u32) -> u64 {
    (2_000u64 << attempt.saturating_sub(2).min(5)).min(60_000)
}

/// Machine rules for a fleet's policy.
pub fn rules_for(fleet: &FleetFile) -> Rules {
    Rules {
        timing: machine::Timing::default(),
        convergence: machine::Convergence {
            max_files: fleet.policy.converge_max_files,
            max_bytes: fleet.policy.converge_max_mib * 1024 * 1024,
            max_passes: fleet.policy.max_passes,
        },
    }
}

/// A fresh run identity: 16 random hex digits (an apply's operations can never take
/// another's ids); without system randomness, the clock's milliseconds.
fn new_run_id(now_ms: i64) -> String {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 8];
    if ring::rand::SystemRandom::new().fill(&mut bytes).is_err() {
        return format!("t{now_ms:x}");
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Engine {
    /// An engine for `fleet`, resuming every instance from `store` where it stood.
    pub fn open(
        fleet: FleetFile,
        store: Arc<State>,
        port: Arc<dyn AgentPort>,
        clock: Arc<dyn Clock>,
        rules: Rules,
    ) -> Result<Self, StateError> {
        let mut stored: std::collections::HashMap<String, Instance> =
            store.instances()?.into_iter().collect();
        let instances: Vec<Instance> = fleet
            .instances
            .iter()
            .map(|spec| stored.remove(&spec.name).unwrap_or_default())
            .collect();
        let mut state = store.fleet_state()?;
        // The limits in the instances' rows; a state DB from before kept them in the fleet
        // state, which the first save leaves out.
        let mut limits = store.hot_pass_limits()?;
        let legacy = std::mem::take(&mut state.hot_pass_kib);
        let fleet_dirty = !legacy.is_empty();
        for (name, kib) in legacy {
            limits.entry(name).or_insert(kib);
        }
        if state.run.is_empty() {
            state.run = new_run_id(clock.now_ms());
            store.save_fleet_state(&state)?;
        }
        let bwlimit = fleet
            .instances
            .iter()
            .map(|i| limits.get(&i.name).copied().unwrap_or(0))
            .collect();
        let (results_tx, results_rx) = mpsc::unbounded_channel();
        let (gate_tx, gate_rx) = mpsc::unbounded_channel();
        let index = scheduler::Index::new(&fleet.instances, &instances);
        let deadlines = instances
            .iter()
            .enumerate()
            .flat_map(|(n, i): (usize, &Instance)| {
                i.running
                    .values()
                    .map(move |r| std::cmp::Reverse((r.deadline_ms, n)))
            })
            .collect();
        let snapshot = Arc::new(Snapshot {
            instances: std::sync::RwLock::new(instances.clone()),
        });
        Ok(Engine {
            snapshot,
            index,
            deadlines,
            gate: None,
            gate_tx,
            gate_rx,
            gating: Default::default(),
            gate_passed: Default::default(),
            stop_facts: Default::default(),
            fleet_dirty,
            fleet,
            instances,
            state,
            store,
            port,
            clock,
            rules,
            results_tx,
            results_rx,
            bwlimit,
            observer: None,
            tick_ms: 30_000,
        })
    }

    /// Calls `observer` after every transition.
    pub fn observe(&mut self, observer: Observer) {
        self.observer = Some(observer);
    }

    /// Asks `gate` before each downtime of an instance that names a window gate.
    pub fn set_gate(&mut self, gate: GateAsk) {
        self.gate = Some(gate);
    }

    /// Whether instance `n` may open its cold sync now that the scheduler lets it: without a
    /// gate, yes; with one, once it said yes for this window (asked once at a time; a
    /// refusal holds the instance, audited).
    fn gate_lets(&mut self, n: usize, window_end_ms: i64, now: i64) -> bool {
        let Some(name) = self.fleet.instances[n]
            .gate
            .as_ref()
            .map(|g| g.name.clone())
        else {
            return true;
        };
        if self.gate_passed.get(&n).is_some_and(|end| now < *end) {
            self.gate_passed.remove(&n);
            return true;
        }
        let Some(ask) = self.gate.clone() else {
            // The conductor checked that every gate exists: without any, hold.
            let _ = self.gate_tx.send((
                n,
                window_end_ms,
                Err(format!("the window gate {name} is not configured")),
            ));
            self.gating.insert(n);
            return false;
        };
        if self.gating.insert(n) {
            let (tx, spec) = (self.gate_tx.clone(), self.fleet.instances[n].clone());
            tokio::spawn(async move {
                let answer = ask(name, spec, window_end_ms).await;
                let _ = tx.send((n, window_end_ms, answer));
            });
        }
        false
    }

    /// A gate's answer: let the instance go at the scheduler's next turn, or hold it.
    fn gate_answered(
        &mut self,
        n: usize,
        window_end_ms: i64,
        answer: Result<(), String>,
    ) -> Result<u64, StateError> {
        self.gating.remove(&n);
        let spec = &self.fleet.instances[n];
        let gate = spec
            .gate
            .as_ref()
            .map(|g| g.name.clone())
            .unwrap_or_default();
        let now = self.clock.now_ms();
        let record = crate::state::AuditRecord {
            who: format!("gate {gate}"),
            role: "hook".into(),
            method: "Gate".into(),
            arguments:
                serde_json::json!({"instance": spec.name, "window_end_unix_ms": window_end_ms})
                    .to_string(),
            outcome: if answer.is_ok() { "ok" } else { "denied" }.into(),
            detail: answer.as_ref().err().cloned().unwrap_or_default(),
        };
        self.store.audit(&record, now)?;
        match answer {
            Ok(()) => {
                tracing::info!(instance = %spec.name, gate = %gate, "the window gate lets the downtime begin");
                self.gate_passed.insert(n, window_end_ms);
                Ok(0)
            }
            Err(reason) => {
                tracing::warn!(instance = %spec.name, gate = %gate, %reason, "the window gate holds the instance");
                Ok(u64::from(self.apply(n, Event::Hold { reason })?))
            }
        }
    }

    /// How often deadlines and windows are looked at when nothing happens.
    pub fn set_tick_ms(&mut self, ms: u64) {
        self.tick_ms = ms.max(1);
    }

    /// The instances' current states, in fleet-file order.
    pub fn instances(&self) -> &[Instance] {
        &self.instances
    }

    /// The same, for readers outside the engine's task.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.clone()
    }

    fn operation_id(&self, n: usize, step: Step, attempt: u32) -> String {
        format!(
            "{}/{}/{}/{}/{}",
            self.fleet.policy.name,
            self.state.run,
            self.fleet.instances[n].name,
            step.as_str(),
            attempt
        )
    }

    /// The operation of a live pass that succeeded whose start the origin's journal marked
    /// last: a pre-window pass's last round.
    fn pass_operation(&self, n: usize, step: Step, attempt: u32) -> String {
        let id = self.operation_id(n, step, attempt);
        if step == Step::PreWindowPass {
            crate::machine::round_operation(&id, self.instances[n].pre_window_rounds)
        } else {
            id
        }
    }

    fn dispatch(&self, n: usize, step: Step, attempt: u32) {
        let mut job = Job {
            migration: self.fleet.policy.name.clone(),
            instance: self.fleet.instances[n].clone(),
            step,
            attempt,
            operation_id: self.operation_id(n, step, attempt),
            // The bandwidth budget shares the live passes; the final pass runs in the
            // downtime, at full speed.
            bwlimit_kib: if step == Step::FinalPass {
                0
            } else {
                self.bwlimit[n]
            },
            deadline_ms: self.instances[n]
                .running
                .get(&step)
                .map_or(0, |r| r.deadline_ms),
            full_pass_operation: (step == Step::FinalPass && self.fleet.policy.final_pass_journal)
                .then(|| {
                    self.instances[n]
                        .attempts
                        .get(&Step::PreWindowPass)
                        .copied()
                })
                .flatten()
                .map(|a| self.pass_operation(n, Step::PreWindowPass, a)),
            carry_operation: (matches!(step, Step::HotPass | Step::PreWindowPass)
                && self.fleet.policy.final_pass_journal)
                .then_some(self.instances[n].last_good_pass)
                .flatten()
                .map(|(s, a)| self.pass_operation(n, s, a)),
            promote_databases: self.instances[n]
                .databases
                .as_ref()
                .is_some_and(|d| d.stream),
            logical_databases: self.instances[n]
                .databases
                .as_ref()
                .is_some_and(|d| d.logical),
            pre_window_round_ms: self.fleet.policy.pre_window_round_secs.saturating_mul(1000),
            pre_window_rounds: self.fleet.policy.pre_window_rounds,
            origin_wal: None,
            origin_queue_empty: false,
        };
        let stop_facts = self.stop_facts.clone();
        {
            let mut known = stop_facts.lock().unwrap_or_else(|p| p.into_inner());
            match step {
                // A new stop: the previous one's facts are no one's any more.
                Step::StopOrigin => {
                    known.remove(&n);
                }
                Step::Databases => job.origin_wal = known.get(&n).and_then(|f| f.wal.clone()),
                Step::Config => {
                    job.origin_queue_empty = known.get(&n).is_some_and(|f| f.queue_empty)
                }
                _ => {}
            }
        }
        let port = self.port.clone();
        let tx = self.results_tx.clone();
        // A retry waits a little (2 s, 4 s, … up to a minute): a restarting agent gets the
        // time to come back. Only a retry: the next hot pass after a good one starts at once.
        let failures = self.instances[n].failures.get(&step).copied().unwrap_or(0);
        let backoff = (failures > 0).then(|| self.clock.sleep(retry_backoff_ms(failures + 1)));
        let clock = self.clock.clone();
        tokio::spawn(async move {
            if let Some(wait) = backoff {
                wait.await;
            }
            let started = clock.now_ms();
            let result = port.run(job).await;
            let elapsed_ms = u64::try_from(clock.now_ms() - started).unwrap_or(0);
            if let (Step::StopOrigin, Ok(output)) = (step, &result) {
                stop_facts.lock().unwrap_or_else(|p| p.into_inner()).insert(
                    n,
                    StopFacts {
                        wal: output.origin_wal.clone(),
                        queue_empty: output.origin_queue_empty,
                    },
                );
            }
            let event = match result {
                Ok(output) => Event::Succeeded {
                    step,
                    attempt,
                    stats: output.stats,
                    databases: output.databases,
                    gate: output.gate,
                    mail_queue: output.mail_queue,
                    evidence: output.evidence,
                    elapsed_ms,
                },
                Err(error) => Event::Failed {
                    step,
                    attempt,
                    error: error.message,
                    permanent: error.permanent,
                },
            };
            let _ = tx.send((n, event));
        });
    }

    /// Feeds one event to instance `n`: persists the transition, then runs its actions.
    /// Returns whether anything changed.
    fn apply(&mut self, n: usize, event: Event) -> Result<bool, StateError> {
        let now = self.clock.now_ms();
        let outcome = machine::handle(&self.instances[n], &event, now, &self.rules);
        if outcome.ignored.is_some() {
            return Ok(false);
        }
        if let Event::GrantColdSync { .. } = event {
            self.state.last_cold_start_ms = Some(now);
            self.fleet_dirty = true;
        }
        let spec = &self.fleet.instances[n];
        self.store.save_transition(&TransitionRecord {
            name: &spec.name,
            event: &event,
            instance: &outcome.instance,
            actions: &outcome.actions,
            fleet: self.fleet_dirty.then_some(&self.state),
            hot_pass_kib: self.bwlimit[n],
            now_ms: now,
        })?;
        self.fleet_dirty = false;
        if outcome.instance.phase != self.instances[n].phase {
            tracing::info!(instance = %spec.name, from = ?self.instances[n].phase, to = ?outcome.instance.phase, "transition");
        }
        let ended = outcome.instance.phase.is_final() && !self.instances[n].phase.is_final();
        self.index.update(n, &self.instances[n], &outcome.instance);
        for r in outcome.instance.running.values() {
            if self.instances[n]
                .running
                .values()
                .all(|was| was.deadline_ms != r.deadline_ms)
            {
                self.deadlines.push(std::cmp::Reverse((r.deadline_ms, n)));
            }
        }
        self.instances[n] = outcome.instance;
        self.snapshot.set(n, &self.instances[n]);
        if ended {
            self.store.record_outcome(&HistoryEntry {
                at_ms: now,
                migration: self.fleet.policy.name.clone(),
                instance: spec.name.clone(),
                outcome: format!("{:?}", self.instances[n].phase),
                origin: spec.origin.clone(),
                target: spec.target.clone(),
                service_ip: spec.service_ip.to_string(),
            })?;
            let end = self
                .port
                .end_instance(self.fleet.policy.name.clone(), spec.clone());
            tokio::spawn(end);
        }
        for Action::Run { step, attempt } in outcome.actions {
            self.dispatch(n, step, attempt);
        }
        if let Some(observer) = self.observer.as_mut() {
            observer(&Transition {
                now_ms: now,
                instance: &self.fleet.instances[n],
                n,
                event: &event,
                instances: &self.instances,
                index: &self.index,
                fleet: &self.state,
            });
        }
        Ok(true)
    }

    fn command(&mut self, command: Command) -> Result<u64, StateError> {
        let named = |name: &Option<String>| -> Vec<usize> {
            self.fleet
                .instances
                .iter()
                .enumerate()
                .filter(|(_, s)| name.as_ref().is_none_or(|n| *n == s.name))
                .map(|(i, _)| i)
                .collect()
        };
        let mut changed = 0;
        match command {
            Command::Pause(None) => self.state.paused = true,
            Command::Resume(None) => self.state.paused = false,
            Command::Approve => self.state.approved = true,
            Command::Pause(name) => {
                for n in named(&name) {
                    changed += u64::from(self.apply(n, Event::Pause)?);
                }
            }
            Command::Resume(name) => {
                for n in named(&name) {
                    changed += u64::from(self.apply(n, Event::Resume)?);
                }
            }
            Command::Abort(name) => {
                for n in named(&Some(name)) {
                    changed += u64::from(self.apply(n, Event::Abort)?);
                }
            }
        }
        self.store.save_fleet_state(&self.state)?;
        Ok(changed)
    }

    fn schedule(&mut self) -> Result<u64, StateError> {
        let now = self.clock.now_ms();
        let mut changed = 0;
        let grants = scheduler::decide(
            &self.fleet.policy,
            &self.fleet.instances,
            &self.instances,
            &self.index,
            &self.state,
            now,
        );
        for grant in grants {
            let (n, event) = match grant {
                Grant::Begin(n) => (n, Event::Begin),
                Grant::HotPass(n, kib) => {
                    // Persisted with the transition that starts the pass (the instance's row).
                    self.bwlimit[n] = kib;
                    (n, Event::GrantHotPass)
                }
                Grant::ColdSync(n, end) => {
                    if !self.gate_lets(n, end, now) {
                        continue;
                    }
                    (n, Event::GrantColdSync { window_end_ms: end })
                }
            };
            changed += u64::from(self.apply(n, event)?);
        }
        // The steps whose time is up, from the deadline queue (not a walk of the fleet).
        let mut due = Vec::new();
        while let Some(&std::cmp::Reverse((at, n))) = self.deadlines.peek() {
            if at > now {
                break;
            }
            self.deadlines.pop();
            due.push(n);
        }
        due.sort_unstable();
        due.dedup();
        for n in due {
            let still = self.instances[n]
                .running
                .values()
                .any(|r| now >= r.deadline_ms);
            if still {
                changed += u64::from(self.apply(n, Event::Tick)?);
            }
        }
        Ok(changed)
    }

    /// How long the loop may wait for an event: the tick, or less when a converged instance
    /// waits only for the stagger to pass or for its window to open (a cold sync must not
    /// lose up to a tick of its window).
    fn sleep_ms(&self) -> u64 {
        let now = self.clock.now_ms();
        let mut wake = now + self.tick_ms as i64;
        if self.index.in_phase(Phase::Converged) == 0 {
            return self.tick_ms;
        }
        // Every distinct list of windows of the fleet (most instances share the fleet's):
        // waking at an opening no converged instance waits for costs one turn of the loop.
        let windows: Vec<&[crate::windows::Window]> = self
            .index
            .window_lists()
            .iter()
            .map(|&n| self.fleet.instances[n].windows.as_slice())
            .collect();
        if let Some(last) = self.state.last_cold_start_ms {
            let stagger_end = last + self.fleet.policy.min_stagger_secs as i64 * 1000;
            if stagger_end > now {
                wake = wake.min(stagger_end);
            }
        }
        if let Ok(at) = jiff::Timestamp::from_millisecond(now) {
            for opening in windows
                .iter()
                .filter_map(|w| crate::windows::next_opening(w, at))
            {
                let start = opening.start.as_millisecond();
                if start > now {
                    wake = wake.min(start);
                }
            }
        }
        (wake - now).max(1) as u64
    }

    fn stop_reason(&self) -> Option<Stop> {
        if self.index.all_final() {
            return Some(Stop::AllFinal);
        }
        let policy = &self.fleet.policy;
        let budget_spent =
            policy.failure_budget > 0 && self.index.failed() >= policy.failure_budget as usize;
        (budget_spent && !self.index.busy()).then_some(Stop::Stalled)
    }

    /// Runs until every instance is finished, nothing can move, `max_transitions` transitions
    /// were made, or `commands` closes.
    pub async fn run(
        &mut self,
        mut commands: mpsc::UnboundedReceiver<Command>,
        max_transitions: Option<u64>,
    ) -> Result<Stop, StateError> {
        // Re-attach: steps in flight when the orchestrator stopped run again under the same
        // operation ids; agents answer a finished one from their journal. An instance that
        // ended before the stop has its grants withdrawn again (the withdrawal may not have
        // reached its origin; it is idempotent).
        for (n, i) in self.instances.iter().enumerate() {
            if i.phase.is_final() {
                let spec = self.fleet.instances[n].clone();
                tokio::spawn(self.port.end_instance(self.fleet.policy.name.clone(), spec));
            }
            for (step, r) in &i.running {
                tracing::info!(instance = %self.fleet.instances[n].name, step = step.as_str(), attempt = r.attempt, "re-attaching");
                self.dispatch(n, *step, r.attempt);
            }
        }
        let mut transitions = 0u64;
        let limit = max_transitions.unwrap_or(u64::MAX);
        loop {
            transitions += self.schedule()?;
            if transitions >= limit {
                return Ok(Stop::TransitionLimit);
            }
            if let Some(stop) = self.stop_reason() {
                return Ok(stop);
            }
            let sleep = self.clock.sleep(self.sleep_ms());
            tokio::select! {
                Some((n, event)) = self.results_rx.recv() => {
                    transitions += u64::from(self.apply(n, event)?);
                    // The results that arrived meanwhile are applied before the next
                    // schedule, which walks every instance: once per batch, not per result.
                    while transitions < limit {
                        let Ok((n, event)) = self.results_rx.try_recv() else {
                            break;
                        };
                        transitions += u64::from(self.apply(n, event)?);
                    }
                }
                Some((n, end, answer)) = self.gate_rx.recv() => {
                    transitions += self.gate_answered(n, end, answer)?;
                }
                command = commands.recv() => match command {
                    Some(c) => transitions += self.command(c)?,
                    None => return Ok(Stop::Shutdown),
                },
                _ = sleep => {}
            }
            if transitions >= limit {
                return Ok(Stop::TransitionLimit);
            }
        }
    }
}
