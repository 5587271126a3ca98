//! The per-instance state machine. Pure: `(instance, event, now) -> (instance, actions)`, no
//! I/O and no clock of its own, so every path (rollback included) is a table test.
//!
//! Pending → Preflight → HotSync (passes) → Converged → PreWindowPass → ColdSync (stop both
//! sides, then final pass ∥ databases ∥ config) → Cutover (origin releases the IP, then the
//! target takes it) → StartServices → PostMigration → Verify → Done.
//! Any failure before the target serves rolls back (RollingBack → RolledBack: the target lets
//! the IP go, the origin takes it back and serves). After that it stops in Failed for an
//! operator. Pending…Converged can be Paused; anything before the target serves can be Aborted.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

/// A unit of work the machine asks an agent to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Step {
    /// Both agents' facts checked (versions, disk, users, services).
    Preflight,
    /// The target's cluster becomes a streaming standby of the origin's (when the preflight
    /// chose it), before the hot passes.
    FollowDatabases,
    /// A live rsync pass of every data dir.
    HotPass,
    /// The fresh pass right before the window's cold sync.
    PreWindowPass,
    /// Stop BlueMind on the origin: downtime starts.
    StopOrigin,
    /// Make sure BlueMind is stopped on the target.
    StopTarget,
    /// The last rsync pass, services stopped.
    FinalPass,
    /// Dump and restore bj (and bj-data), or promote the standby that follows the origin.
    Databases,
    /// The configuration file set, maps rebuilt.
    Config,
    /// The origin releases the service IP.
    OriginReleaseIp,
    /// The target takes and announces the service IP.
    TargetTakeIp,
    /// Start BlueMind on the target: downtime ends, no way back without a reverse sync.
    StartTarget,
    /// Firewall, postfix maps and mynetworks through BlueMind's API.
    PostMigration,
    /// Services answer and data matches the origin's manifest.
    Verify,
    /// Rollback: stop what may have started on the target.
    RollbackStopTarget,
    /// Rollback: the target lets the service IP go.
    RollbackTargetReleaseIp,
    /// Rollback: the origin takes the service IP back.
    RollbackOriginTakeIp,
    /// Rollback: BlueMind starts again on the origin: downtime ends.
    RollbackStartOrigin,
}

impl Step {
    /// Whether running the step again is safe (it converges to the same end state).
    /// Starting the target is not: a half-started target may already have taken mail.
    pub fn retryable(self) -> bool {
        self != Step::StartTarget
    }

    /// Name used in operation ids and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Step::Preflight => "preflight",
            Step::FollowDatabases => "follow-databases",
            Step::HotPass => "hot-pass",
            Step::PreWindowPass => "pre-window-pass",
            Step::StopOrigin => "stop-origin",
            Step::StopTarget => "stop-target",
            Step::FinalPass => "final-pass",
            Step::Databases => "databases",
            Step::Config => "config",
            Step::OriginReleaseIp => "origin-release-ip",
            Step::TargetTakeIp => "target-take-ip",
            Step::StartTarget => "start-target",
            Step::PostMigration => "post-migration",
            Step::Verify => "verify",
            Step::RollbackStopTarget => "rollback-stop-target",
            Step::RollbackTargetReleaseIp => "rollback-target-release-ip",
            Step::RollbackOriginTakeIp => "rollback-origin-take-ip",
            Step::RollbackStartOrigin => "rollback-start-origin",
        }
    }
}

/// Where an instance stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Phase {
    /// Not started.
    Pending,
    /// Checking both hosts.
    Preflight,
    /// Hot passes until converged.
    HotSync,
    /// Converged: waiting for a window.
    Converged,
    /// A fresh pass before the cold sync, inside a granted window.
    PreWindowPass,
    /// Downtime: services stopped, final data moving.
    ColdSync,
    /// Downtime: the service IP moving.
    Cutover,
    /// Downtime: starting the target.
    StartServices,
    /// The target serves; BlueMind's post-migration calls.
    PostMigration,
    /// The target serves; checking it.
    Verify,
    /// Migrated and verified.
    Done,
    /// Undoing a failed cold sync or cutover.
    RollingBack,
    /// The origin serves again, untouched.
    RolledBack,
    /// Stopped; an operator must look (the reason is in `last_error`).
    Failed,
    /// Held by an operator.
    Paused,
    /// Withdrawn by an operator before any downtime.
    Aborted,
}

impl Phase {
    /// No further event changes it.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            Phase::Done | Phase::RolledBack | Phase::Failed | Phase::Aborted
        )
    }

    /// The instance is inside its downtime (origin stopped, target not yet serving).
    pub fn is_down(self) -> bool {
        matches!(
            self,
            Phase::ColdSync | Phase::Cutover | Phase::StartServices | Phase::RollingBack
        )
    }
}

/// Statistics of a sync pass, as the agent measured them.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PassStats {
    /// Entries in the file list.
    pub files_scanned: u64,
    /// Entries changed.
    pub files_changed: u64,
    /// Bytes changed.
    pub bytes_changed: u64,
    /// Time building the file list, ms.
    pub scan_ms: u64,
    /// Whole pass, ms.
    pub elapsed_ms: u64,
    /// The final pass moved and verified only the paths the origin's change journal
    /// recorded (this many), instead of walking everything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub journal_paths: Option<u64>,
    /// Why the final pass walked everything although a journal was asked for.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub journal_fallback: String,
    /// The pre-window pass of a standby: the verified point taken with the origin (what was
    /// compared), or `none: …` and why (the downtime then compares every table).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub verified_point: String,
    /// A journal pass's time by phase (its fixed costs, for the downtime's accounting).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phases: Option<Box<PassPhases>>,
    /// The pre-window pass: its rounds (each carried what changed during the one before and
    /// advanced the verified point); 0 for other passes.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub rounds: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// The operation id of a pre-window pass's round `round` (the first is the step's own).
pub fn round_operation(operation_id: &str, round: u32) -> String {
    if round <= 1 {
        operation_id.to_string()
    } else {
        format!("{operation_id}/round-{round}")
    }
}

/// A journal pass's time by phase, ms: the data plane's connections opened (TLS, admission),
/// the origin's journal asked for its paths, the transfer, the origin's path states, this
/// host's path states.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PassPhases {
    /// Opening the pass's data-plane connections.
    pub connect_ms: u64,
    /// The origin's journal listing the paths.
    pub list_ms: u64,
    /// The rsync transfer.
    pub transfer_ms: u64,
    /// The origin's path states.
    pub verify_origin_ms: u64,
    /// This host's path states.
    pub verify_here_ms: u64,
}

/// How an instance's databases move, decided at its preflight.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DbPlan {
    /// The target follows the origin from the hot phase on and is promoted in the downtime;
    /// false: dump and restore in the downtime.
    pub stream: bool,
    /// It follows by logical replication (a subscription per database), not as a physical
    /// standby.
    #[serde(default)]
    pub logical: bool,
    /// Why (what the preflight saw), for status and plan.
    pub why: String,
}

impl DbPlan {
    /// The path taken, as status and plan show it: `standby`, `logical` or `dump`.
    pub fn path(&self) -> &'static str {
        match (self.stream, self.logical) {
            (true, true) => "logical",
            (true, false) => "standby",
            (false, _) => "dump",
        }
    }
}

/// What the machine believes about the two hosts, from the steps that succeeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct World {
    /// The origin holds the service IP.
    pub origin_ip: bool,
    /// The target holds (or may hold: a take was attempted) the service IP.
    pub target_ip: bool,
    /// BlueMind runs on the origin.
    pub origin_serving: bool,
    /// BlueMind runs (or may run: a start was attempted) on the target.
    pub target_serving: bool,
}

impl Default for World {
    fn default() -> Self {
        World {
            origin_ip: true,
            target_ip: false,
            origin_serving: true,
            target_serving: false,
        }
    }
}

/// A step in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Running {
    /// Attempt number (part of the operation id).
    pub attempt: u32,
    /// When it must have answered, Unix ms.
    pub deadline_ms: i64,
}

/// One instance's whole state, persisted as is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    /// Where it stands.
    pub phase: Phase,
    /// The phase a pause will resume to.
    pub paused_from: Option<Phase>,
    /// A pause asked while a hot pass ran: takes effect when it ends.
    pub pause_requested: bool,
    /// Steps in flight.
    pub running: BTreeMap<Step, Running>,
    /// Attempts made per step (operation ids never repeat across attempts).
    pub attempts: BTreeMap<Step, u32>,
    /// Failed attempts of each step since its last success: what retries count and what a
    /// retry waits for (a hot pass after a good one is not a retry).
    #[serde(default)]
    pub failures: BTreeMap<Step, u32>,
    /// The last live pass that succeeded (hot or pre-window) and its attempt: the next live
    /// pass carries, comparing contents, what the origin's journal saw change since it began.
    #[serde(default)]
    pub last_good_pass: Option<(Step, u32)>,
    /// The rounds of the last pre-window pass that succeeded: the final pass counts the
    /// origin's journal from its last round's start.
    #[serde(default)]
    pub pre_window_rounds: u32,
    /// Steps done in the current cold sync.
    pub cold_done: BTreeSet<Step>,
    /// Hot passes completed.
    pub hot_passes: u32,
    /// The last pass's statistics.
    pub last_pass: Option<PassStats>,
    /// Bytes moved by every pass so far.
    #[serde(default)]
    pub bytes_moved: u64,
    /// Max passes reached without converging.
    pub not_converging: bool,
    /// End of the window granted for the cold sync, Unix ms.
    pub window_end_ms: Option<i64>,
    /// The hosts, as far as the machine knows.
    pub world: World,
    /// Downtime start and end, Unix ms.
    pub downtime_start_ms: Option<i64>,
    /// Set when the origin or the target serves again.
    pub downtime_end_ms: Option<i64>,
    /// Why the last failure happened.
    pub last_error: Option<String>,
    /// When it reached a final phase, Unix ms.
    #[serde(default)]
    pub finished_ms: Option<i64>,
    /// How its databases move (set by the preflight).
    #[serde(default)]
    pub databases: Option<DbPlan>,
    /// The target's databases follow the origin's (FollowDatabases succeeded).
    #[serde(default)]
    pub following: bool,
}

impl Default for Instance {
    fn default() -> Self {
        Instance {
            phase: Phase::Pending,
            paused_from: None,
            pause_requested: false,
            running: BTreeMap::new(),
            attempts: BTreeMap::new(),
            failures: BTreeMap::new(),
            last_good_pass: None,
            pre_window_rounds: 0,
            cold_done: BTreeSet::new(),
            hot_passes: 0,
            last_pass: None,
            bytes_moved: 0,
            not_converging: false,
            window_end_ms: None,
            world: World::default(),
            downtime_start_ms: None,
            downtime_end_ms: None,
            last_error: None,
            finished_ms: None,
            databases: None,
            following: false,
        }
    }
}

/// What happened to an instance.
// A step's success carries what it reports (stats, gate, evidence): one event per step, made
// once and stored as JSON, never held in bulk; boxing would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    /// The scheduler starts the instance.
    Begin,
    /// The scheduler lets a hot pass run now.
    GrantHotPass,
    /// The scheduler opens the cold sync: a window is open until `window_end_ms` and the
    /// projected downtime fits it and the budget.
    GrantColdSync {
        /// When the window closes.
        window_end_ms: i64,
    },
    /// A step's operation succeeded.
    Succeeded {
        /// The step.
        step: Step,
        /// Its attempt.
        attempt: u32,
        /// Pass statistics, for sync steps.
        stats: Option<PassStats>,
        /// The preflight's choice of how the databases move.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        databases: Option<DbPlan>,
        /// The databases' move: what their gate compared (the changes since the verified
        /// point, or every table and why), for `bmctl fleet events`.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        gate: String,
        /// The mail queue: what the origin's drain left before the stop, what the Config
        /// step carried into the target's queue, for `bmctl fleet events`.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        mail_queue: String,
        /// What the step saw that proves it did its work (the final pass's comparison, the
        /// BlueMind tasks of the post-migration, the final checks' answers), for the report.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        evidence: String,
        /// How long the step ran, ms (its share of a downtime, in `bmctl fleet events`).
        #[serde(default)]
        elapsed_ms: u64,
    },
    /// A step's operation failed.
    Failed {
        /// The step.
        step: Step,
        /// Its attempt.
        attempt: u32,
        /// Why.
        error: String,
        /// No retry can change it (the target has served, an interface is missing): an
        /// operator must act, so the step is not retried.
        #[serde(default)]
        permanent: bool,
    },
    /// Time passed: deadlines are checked.
    Tick,
    /// An operator holds the instance.
    Pause,
    /// The fleet's window gate refused its downtime (or could not be asked): held as an
    /// operator's pause holds it, with why, until an operator resumes it.
    Hold {
        /// The gate's answer.
        reason: String,
    },
    /// An operator releases it.
    Resume,
    /// An operator withdraws it (rolls back if it is down).
    Abort,
}

/// What the machine asks the edges to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Action {
    /// Run `step` (operation id: migration/instance/step/attempt).
    Run {
        /// The step.
        step: Step,
        /// The attempt.
        attempt: u32,
    },
}

/// Deadlines and retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// Deadline of a sync step (hot, pre-window, final pass), ms.
    pub sync_deadline_ms: i64,
    /// Deadline of the databases move, ms.
    pub databases_deadline_ms: i64,
    /// Deadline of any other step, ms.
    pub step_deadline_ms: i64,
    /// Extra attempts of a retryable step once the origin has stopped.
    pub retries: u32,
    /// Extra attempts of a step of the hot phases (preflight, following, hot and pre-window
    /// passes): the origin is untouched and serving, so an agent restarting or a host cut
    /// off for a minute is waited for (with the engine's back-off: 2, 4, 8, 16, 32 s)
    /// instead of failing the instance.
    pub hot_retries: u32,
    /// Extra attempts of a rollback step: the origin is down until the rollback ends, and
    /// the only other way out is an operator, so a host that does not answer is waited for
    /// (2, 4, 8, 16, 32 s, then every minute: about six minutes).
    pub rollback_retries: u32,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            sync_deadline_ms: 6 * 3600 * 1000,
            databases_deadline_ms: 2 * 3600 * 1000,
            step_deadline_ms: 10 * 60 * 1000,
            retries: 2,
            hot_retries: 5,
            rollback_retries: 10,
        }
    }
}

impl Timing {
    fn deadline(&self, step: Step) -> i64 {
        match step {
            Step::HotPass | Step::PreWindowPass | Step::FinalPass => self.sync_deadline_ms,
            Step::Databases | Step::FollowDatabases => self.databases_deadline_ms,
            _ => self.step_deadline_ms,
        }
    }
}

/// Convergence thresholds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Convergence {
    /// At most this many files changed…
    pub max_files: u64,
    /// …and at most this many bytes.
    pub max_bytes: u64,
    /// Passes before "not converging".
    pub max_passes: u32,
}

/// The machine's parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rules {
    /// Deadlines and retries.
    pub timing: Timing,
    /// When hot syncs stop.
    pub convergence: Convergence,
}

/// The result of handling one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The new state.
    pub instance: Instance,
    /// What to run now.
    pub actions: Vec<Action>,
    /// Why the event changed nothing, if it did not.
    pub ignored: Option<&'static str>,
}

const COLD_DATA: [Step; 3] = [Step::FinalPass, Step::Databases, Step::Config];

struct Ctx<'a> {
    i: Instance,
    actions: Vec<Action>,
    now: i64,
    rules: &'a Rules,
}

impl Ctx<'_> {
    fn run(&mut self, step: Step) {
        let attempt = self.i.attempts.get(&step).copied().unwrap_or(0) + 1;
        self.i.attempts.insert(step, attempt);
        self.i.running.insert(
            step,
            Running {
                attempt,
                deadline_ms: self.now + self.rules.timing.deadline(step),
            },
        );
        // A step that may have half-happened counts as happened for the rollback: a stop may
        // have stopped, a take may have taken. (Undoing is idempotent.)
        match step {
            Step::StopOrigin => self.i.world.origin_serving = false,
            Step::OriginReleaseIp => self.i.world.origin_ip = false,
            Step::TargetTakeIp => self.i.world.target_ip = true,
            Step::StartTarget => self.i.world.target_serving = true,
            _ => {}
        }
        self.actions.push(Action::Run { step, attempt });
    }

    /// Counts a failed attempt of `step`; returns its failures since its last success.
    fn count_failure(&mut self, step: Step) -> u32 {
        let failures = self.i.failures.entry(step).or_insert(0);
        *failures += 1;
        *failures
    }

    fn phase(&mut self, phase: Phase) {
        self.i.phase = phase;
        if phase.is_final() {
            self.i.finished_ms = Some(self.now);
        }
    }

    /// Retries `step` if allowed; else fails the instance as its phase requires.
    fn failed(&mut self, step: Step, error: String, permanent: bool) {
        self.i.last_error = Some(format!("{}: {error}", step.as_str()));
        let failures = self.count_failure(step);
        // Stopping the origin again is only allowed while the window is still open.
        let in_window =
            step != Step::StopOrigin || self.i.window_end_ms.is_some_and(|end| self.now < end);
        let retries = if self.i.phase == Phase::RollingBack {
            self.rules.timing.rollback_retries
        } else {
            self.rules.timing.retries
        };
        let may_retry = step.retryable() && failures <= retries && in_window && !permanent;
        if may_retry {
            self.run(step);
            return;
        }
        match self.i.phase {
            Phase::ColdSync | Phase::Cutover | Phase::StartServices => self.rollback(),
            // A rollback step that keeps failing, or a failure after the target served:
            // an operator must decide.
            _ => {
                self.i.running.clear();
                self.phase(Phase::Failed);
            }
        }
    }

    /// Starts (or continues) the rollback with the next step the world needs.
    fn rollback(&mut self) {
        if self.i.phase != Phase::RollingBack {
            self.phase(Phase::RollingBack);
            // Late results of abandoned cold steps are ignored from now on.
            self.i.running.clear();
        }
        if !self.i.running.is_empty() {
            return;
        }
        let w = self.i.world;
        let next = if w.target_serving {
            Some(Step::RollbackStopTarget)
        } else if w.target_ip {
            Some(Step::RollbackTargetReleaseIp)
        } else if !w.origin_ip {
            Some(Step::RollbackOriginTakeIp)
        } else if !w.origin_serving {
            Some(Step::RollbackStartOrigin)
        } else {
            None
        };
        match next {
            Some(step) => self.run(step),
            None => {
                if self.i.downtime_start_ms.is_some() && self.i.downtime_end_ms.is_none() {
                    self.i.downtime_end_ms = Some(self.now);
                }
                self.phase(Phase::RolledBack);
            }
        }
    }

    fn succeeded(&mut self, step: Step, stats: Option<PassStats>, databases: Option<DbPlan>) {
        let w = &mut self.i.world;
        match step {
            Step::StopOrigin => w.origin_serving = false,
            Step::StopTarget | Step::RollbackStopTarget => w.target_serving = false,
            Step::OriginReleaseIp => w.origin_ip = false,
            Step::RollbackTargetReleaseIp => w.target_ip = false,
            Step::RollbackOriginTakeIp => w.origin_ip = true,
            Step::RollbackStartOrigin => w.origin_serving = true,
            _ => {}
        }
        if let Some(s) = &stats {
            self.i.last_pass = Some(s.clone());
            self.i.bytes_moved += s.bytes_changed;
        }
        match (self.i.phase, step) {
            (Phase::Preflight, Step::Preflight) => {
                let stream = databases.as_ref().is_some_and(|d| d.stream);
                self.i.databases = databases;
                self.phase(Phase::HotSync);
                // The standby first: it takes as long as the databases' size, live.
                if stream {
                    self.run(Step::FollowDatabases);
                }
            }
            (Phase::HotSync, Step::FollowDatabases) => {
                self.i.following = true;
                if self.i.pause_requested {
                    self.pause_now();
                }
            }
            (Phase::HotSync, Step::HotPass) => {
                self.i.hot_passes += 1;
                let c = self.rules.convergence;
                // The first pass is the initial copy: what it moved says nothing of a day's
                // changes, and its time would be the projection of the downtime (an instance
                // small enough to "converge" at once could stay over its budget for ever).
                let converged = self.i.hot_passes >= 2
                    && stats.as_ref().is_some_and(|s| {
                        s.files_changed <= c.max_files && s.bytes_changed <= c.max_bytes
                    });
                if converged {
                    self.phase(Phase::Converged);
                } else if self.i.hot_passes >= c.max_passes {
                    self.i.not_converging = true;
                    self.phase(Phase::Converged);
                }
                if self.i.pause_requested {
                    self.pause_now();
                }
            }
            (Phase::PreWindowPass, Step::PreWindowPass) => {
                if self.i.window_end_ms.is_some_and(|end| self.now < end) {
                    // The origin stops serving now: downtime starts.
                    self.phase(Phase::ColdSync);
                    self.i.cold_done.clear();
                    self.i.downtime_start_ms = Some(self.now);
                    self.i.downtime_end_ms = None;
                    self.run(Step::StopOrigin);
                    self.run(Step::StopTarget);
                } else {
                    // The window closed meanwhile: wait for the next one.
                    self.i.window_end_ms = None;
                    self.phase(Phase::Converged);
                }
            }
            (Phase::ColdSync, s) => {
                self.i.cold_done.insert(s);
                let stopped = self.i.cold_done.contains(&Step::StopOrigin)
                    && self.i.cold_done.contains(&Step::StopTarget);
                if matches!(s, Step::StopOrigin | Step::StopTarget) && stopped {
                    for step in COLD_DATA {
                        self.run(step);
                    }
                } else if COLD_DATA.iter().all(|d| self.i.cold_done.contains(d)) {
                    self.phase(Phase::Cutover);
                    self.run(Step::OriginReleaseIp);
                }
            }
            (Phase::Cutover, Step::OriginReleaseIp) => self.run(Step::TargetTakeIp),
            (Phase::Cutover, Step::TargetTakeIp) => {
                self.phase(Phase::StartServices);
                self.run(Step::StartTarget);
            }
            (Phase::StartServices, Step::StartTarget) => {
                self.i.downtime_end_ms = Some(self.now);
                self.phase(Phase::PostMigration);
                self.run(Step::PostMigration);
            }
            (Phase::PostMigration, Step::PostMigration) => {
                self.phase(Phase::Verify);
                self.run(Step::Verify);
            }
            (Phase::Verify, Step::Verify) => self.phase(Phase::Done),
            (Phase::RollingBack, _) => self.rollback(),
            _ => {}
        }
    }

    fn pause_now(&mut self) {
        self.i.pause_requested = false;
        self.i.paused_from = Some(self.i.phase);
        self.phase(Phase::Paused);
    }
}

/// Handles one event at `now` (Unix ms).
pub fn handle(instance: &Instance, event: &Event, now: i64, rules: &Rules) -> Outcome {
    let mut c = Ctx {
        i: instance.clone(),
        actions: Vec::new(),
        now,
        rules,
    };
    let ignored = apply(&mut c, event);
    Outcome {
        instance: c.i,
        actions: c.actions,
        ignored,
    }
}

fn apply(c: &mut Ctx<'_>, event: &Event) -> Option<&'static str> {
    let phase = c.i.phase;
    let idle = c.i.running.is_empty();
    match event {
        _ if phase.is_final() => return Some("the instance is finished"),
        Event::Begin if phase == Phase::Pending => {
            c.phase(Phase::Preflight);
            c.run(Step::Preflight);
        }
        Event::GrantHotPass if phase == Phase::HotSync && idle && !c.i.pause_requested => {
            c.run(Step::HotPass)
        }
        Event::GrantColdSync { window_end_ms }
            if phase == Phase::Converged && *window_end_ms > c.now =>
        {
            c.i.window_end_ms = Some(*window_end_ms);
            c.phase(Phase::PreWindowPass);
            c.run(Step::PreWindowPass);
        }
        Event::Succeeded {
            step,
            attempt,
            stats,
            databases,
            ..
        } => {
            if c.i.running.get(step).map(|r| r.attempt) != Some(*attempt) {
                return Some("not a step in flight (late or repeated result)");
            }
            c.i.running.remove(step);
            c.i.failures.remove(step);
            if matches!(step, Step::HotPass | Step::PreWindowPass) {
                c.i.last_good_pass = Some((*step, *attempt));
            }
            if *step == Step::PreWindowPass {
                c.i.pre_window_rounds = stats.as_ref().map_or(1, |s| s.rounds.max(1));
            }
            c.succeeded(*step, stats.clone(), databases.clone());
        }
        Event::Failed {
            step,
            attempt,
            error,
            permanent,
        } => {
            if c.i.running.get(step).map(|r| r.attempt) != Some(*attempt) {
                return Some("not a step in flight (late or repeated result)");
            }
            c.i.running.remove(step);
            fail(c, *step, error.clone(), *permanent);
        }
        Event::Tick => {
            let expired: Vec<Step> =
                c.i.running
                    .iter()
                    .filter(|(_, r)| c.now >= r.deadline_ms)
                    .map(|(s, _)| *s)
                    .collect();
            if expired.is_empty() {
                return Some("no deadline passed");
            }
            for step in expired {
                if c.i.running.remove(&step).is_some() {
                    fail(
                        c,
                        step,
                        "no answer before the step's deadline".into(),
                        false,
                    );
                }
            }
        }
        Event::Pause
            if matches!(phase, Phase::Pending | Phase::Converged)
                || (phase == Phase::HotSync && idle) =>
        {
            c.pause_now()
        }
        Event::Pause if matches!(phase, Phase::HotSync | Phase::Preflight) => {
            c.i.pause_requested = true
        }
        Event::Hold { reason } if phase == Phase::Converged => {
            c.i.last_error = Some(reason.clone());
            c.pause_now()
        }
        Event::Resume if phase == Phase::Paused => {
            c.i.phase = c.i.paused_from.take().unwrap_or(Phase::Pending);
        }
        Event::Resume if c.i.pause_requested => c.i.pause_requested = false,
        Event::Abort
            if matches!(
                phase,
                Phase::Pending
                    | Phase::Preflight
                    | Phase::HotSync
                    | Phase::Converged
                    | Phase::PreWindowPass
                    | Phase::Paused
            ) =>
        {
            c.i.running.clear();
            c.phase(Phase::Aborted);
        }
        Event::Abort
            if matches!(
                phase,
                Phase::ColdSync | Phase::Cutover | Phase::StartServices
            ) =>
        {
            c.i.last_error = Some("aborted by an operator during the downtime window".into());
            c.rollback();
        }
        _ => return Some("not expected in this phase"),
    }
    None
}

fn fail(c: &mut Ctx<'_>, step: Step, error: String, permanent: bool) {
    match c.i.phase {
        // Hot phases: the origin is untouched and serving; retry, else fail.
        Phase::Preflight | Phase::HotSync | Phase::PreWindowPass => {
            if c.count_failure(step) <= c.rules.timing.hot_retries && !permanent {
                c.i.last_error = Some(format!("{}: {error}", step.as_str()));
                c.run(step);
            } else {
                c.i.last_error = Some(format!("{}: {error}", step.as_str()));
                c.i.running.clear();
                c.phase(Phase::Failed);
            }
        }
        _ => c.failed(step, error, permanent),
    }
}

#[cfg(test)]
mod tests;
