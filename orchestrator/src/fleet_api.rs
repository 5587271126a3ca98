//! The Fleet API served to operators (bmctl). Every call — refused ones included — is written
//! to the audit log with who made it, what it asked, when, and how it ended.

use std::sync::Arc;

use bmfleet_proto::identity::Role;
use bmfleet_proto::tls::{caller_identity, require_role};
use bmfleet_proto::v1::fleet_server::Fleet;
use bmfleet_proto::v1::{
    AddAgentRequest, AgentStatus, ApplyRequest, ApproveRequest, AuditReply, AuditRequest,
    CommandReply, EventsReply, EventsRequest, FleetEvent, InstanceStatus, IssueJoinTokenReply,
    IssueJoinTokenRequest, PhaseCount, RemoveAgentRequest, ReportReply, ReportRequest, StatusReply,
    StatusRequest, TargetRequest, UndeliveredNotification,
};
use tonic::{Request, Response, Status};

use crate::agents::AgentPool;
use crate::clock::Clock;
use crate::conductor::{Conductor, ConductorError};
use crate::config::AgentEntry;
use crate::config::EnrollmentConfig;
use crate::engine::Command;
use crate::fleet::FleetFile;
use std::collections::HashMap;

use crate::state::{AuditRecord, State};

/// Default and maximum number of audit entries returned.
const AUDIT_DEFAULT: u32 = 100;
const AUDIT_MAX: u32 = 10_000;

/// What the Fleet API works on.
pub struct Parts {
    /// The state database.
    pub state: Arc<State>,
    /// Time.
    pub clock: Arc<dyn Clock>,
    /// The applied fleet's engine.
    pub conductor: Arc<Conductor>,
    /// Metrics.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Every agent's client (agents registered here are added to it).
    pub pool: Arc<AgentPool>,
    /// The names of the configuration file's agents (not removable through the API).
    pub configured: Vec<String>,
    /// Enrollment, when configured (join tokens are issued only then).
    pub enrollment: Option<EnrollmentConfig>,
}

/// The Fleet API.
pub struct FleetApi {
    state: Arc<State>,
    clock: Arc<dyn Clock>,
    conductor: Arc<Conductor>,
    metrics: Arc<crate::metrics::Metrics>,
    pool: Arc<AgentPool>,
    configured: Vec<String>,
    enrollment: Option<EnrollmentConfig>,
    orchestrator_name: String,
    audit_policy: AuditPolicy,
    /// Refused calls itemized per caller and minute.
    refusals: crate::refusals::Ledger,
    last_prune_ms: std::sync::atomic::AtomicI64,
    /// The instances' ETAs, computed at most once a second ([`ETA_MAX_AGE_MS`]).
    etas: EtaCache,
}

/// How the audit log stays readable and bounded.
#[derive(Debug, Clone, Copy)]
pub struct AuditPolicy {
    /// Entries older than this are deleted (checked at most hourly).
    pub retention_ms: i64,
}

/// An audited argument or detail longer than this is cut (its length is kept).
pub const AUDIT_FIELD_MAX: usize = 2048;
/// Refused calls itemized per caller and minute; more are counted in the next entry.
pub const REFUSALS_PER_MINUTE: u32 = 20;

/// `text` cut to [`AUDIT_FIELD_MAX`] bytes on a character boundary, saying how long it was.
fn bounded(text: String) -> String {
    if text.len() <= AUDIT_FIELD_MAX {
        return text;
    }
    let mut end = AUDIT_FIELD_MAX;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… (cut: {} bytes in all)", &text[..end], text.len())
}

fn refused(e: ConductorError) -> Status {
    match e {
        ConductorError::Invalid(_)
        | ConductorError::UnknownAgents(_)
        | ConductorError::NoInstance(_) => Status::invalid_argument(e.to_string()),
        ConductorError::UnknownRemigrate(_) => Status::invalid_argument(e.to_string()),
        ConductorError::Busy(_)
        | ConductorError::NoFleet
        | ConductorError::Finished
        | ConductorError::AllMigrated(_) => Status::failed_precondition(e.to_string()),
        ConductorError::State(_) => Status::internal(e.to_string()),
    }
}

/// The audit record's arguments of a pause or resume.
fn target_arguments(req: &TargetRequest) -> String {
    format!("{{\"instance\":{:?},\"all\":{}}}", req.instance, req.all)
}

fn target(req: &TargetRequest) -> Result<Option<String>, Status> {
    match (req.instance.is_empty(), req.all) {
        (false, false) => Ok(Some(req.instance.clone())),
        (true, true) => Ok(None),
        _ => Err(Status::invalid_argument(
            "name one instance, or ask for --all",
        )),
    }
}

/// The applied fleet's instances as `status` reports them.
#[derive(Debug, Default)]
struct Instances {
    /// The statuses shown (all, or the `limit` that most need a look), in fleet-file order.
    statuses: Vec<InstanceStatus>,
    /// When the whole fleet is expected to be finished (0: unknown).
    fleet_eta_unix_ms: i64,
    /// Every instance, shown or not.
    total: u32,
    /// How many are in each phase (phases with none left out).
    phases: Vec<PhaseCount>,
    /// Bytes moved by every instance's passes.
    bytes_moved: u64,
}

/// How much an instance needs an operator's look, most first: down, failed or rolled back,
/// with an error or not converging, paused, running a step, waiting, then the rest.
fn attention(i: &crate::machine::Instance) -> u8 {
    use crate::machine::Phase;
    if i.phase.is_down() {
        0
    } else if matches!(i.phase, Phase::Failed | Phase::RolledBack) {
        1
    } else if (i.last_error.is_some() && i.phase != Phase::Done) || i.not_converging {
        2
    } else if i.phase == Phase::Paused || i.pause_requested {
        3
    } else if !i.running.is_empty() {
        4
    } else if !i.phase.is_final() && i.phase != Phase::Pending {
        5
    } else {
        6
    }
}

/// The instances a status of at most `limit` lists (0: every one): those that most need a
/// look ([`attention`]), then the first in the fleet file; in fleet-file order.
fn listed(states: &[crate::machine::Instance], limit: usize) -> Vec<usize> {
    let mut shown: Vec<usize> = (0..states.len()).collect();
    if limit > 0 && shown.len() > limit {
        shown.select_nth_unstable_by_key(limit - 1, |&n| (attention(&states[n]), n));
        shown.truncate(limit);
        shown.sort_unstable();
    }
    shown
}

/// How stale a status's ETAs may be: every waiting instance's is placed among the windows,
/// linear in the fleet (10-17 ms at 10,000 instances), and several readers (bmctl, the
/// dashboards' exporters) poll status; an ETA is minutes or hours away.
const ETA_MAX_AGE_MS: i64 = 1000;

/// Every instance's ETA (fleet-file order) and the fleet's, Unix ms.
struct EtaList {
    each: Vec<Option<i64>>,
    fleet_eta: Option<i64>,
}

/// The ETAs computed last, for which fleet (its address and length) and when.
struct Etas {
    key: (usize, usize),
    at_ms: i64,
    each: Arc<EtaList>,
}

/// The ETAs of the applied fleet's instances, shared by the status readers.
#[derive(Default)]
struct EtaCache(std::sync::Mutex<Option<Etas>>);

impl EtaCache {
    /// Every instance's ETA and the fleet's, as computed at most [`ETA_MAX_AGE_MS`] ago for
    /// this fleet, or computed now.
    fn get(
        &self,
        fleet: &FleetFile,
        states: &[crate::machine::Instance],
        now: i64,
    ) -> Arc<EtaList> {
        let mut cached = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let key = (fleet as *const FleetFile as usize, states.len());
        if let Some(etas) = cached
            .as_ref()
            .filter(|e| e.key == key && (0..ETA_MAX_AGE_MS).contains(&(now - e.at_ms)))
        {
            return etas.each.clone();
        }
        let each = crate::eta::finishes(fleet, states, now);
        let fleet_eta = each
            .iter()
            .copied()
            .collect::<Option<Vec<_>>>()
            .and_then(|e| e.into_iter().max());
        let etas = Arc::new(EtaList { each, fleet_eta });
        *cached = Some(Etas {
            key,
            at_ms: now,
            each: etas.clone(),
        });
        etas
    }
}

impl FleetApi {
    /// A Fleet API over `parts`, answering as `orchestrator_name`.
    pub fn new(parts: Parts, orchestrator_name: String, audit_policy: AuditPolicy) -> Self {
        FleetApi {
            state: parts.state,
            clock: parts.clock,
            conductor: parts.conductor,
            metrics: parts.metrics,
            pool: parts.pool,
            configured: parts.configured,
            enrollment: parts.enrollment,
            orchestrator_name,
            audit_policy,
            refusals: crate::refusals::Ledger::new(REFUSALS_PER_MINUTE),
            last_prune_ms: std::sync::atomic::AtomicI64::new(0),
            etas: EtaCache::default(),
        }
    }

    /// Deletes audit entries past their retention, at most once an hour.
    fn prune_audit(&self, now_ms: i64) {
        use std::sync::atomic::Ordering;
        let last = self.last_prune_ms.load(Ordering::Relaxed);
        if now_ms - last < 3_600_000
            || self
                .last_prune_ms
                .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        match self
            .state
            .prune_audit(now_ms - self.audit_policy.retention_ms)
        {
            Ok(0) => {}
            Ok(n) => tracing::info!(deleted = n, "audit entries past their retention deleted"),
            Err(e) => tracing::warn!(error = %e, "pruning the audit log failed"),
        }
    }

    /// The applied fleet's instances: the status of at most `limit` of them (0: every one),
    /// those that most need a look first ([`attention`]), and what covers them all.
    fn instances(&self, limit: usize) -> Result<Instances, Status> {
        // The engine's own snapshot, read in place, not the state DB: the engine writes it at
        // every transition, and a fleet of thousands would wait for it.
        let fleet_paused = self.state.fleet_state().map_err(Self::internal)?.paused;
        let now = self.clock.now_ms();
        let read = self.conductor.read_states(|fleet, states| {
            self.listed_instances(fleet, states, limit, fleet_paused, now)
        });
        Ok(read.unwrap_or_default())
    }

    /// [`FleetApi::instances`] on the engine's snapshot.
    fn listed_instances(
        &self,
        fleet: &FleetFile,
        states: &[crate::machine::Instance],
        limit: usize,
        fleet_paused: bool,
        now: i64,
    ) -> Instances {
        let etas = self.etas.get(fleet, states, now);
        let mut phases = [0u32; crate::metrics::PHASES.len()];
        for i in states {
            if let Some(k) = crate::metrics::PHASES.iter().position(|p| *p == i.phase) {
                phases[k] += 1;
            }
        }
        let shown = listed(states, limit);
        let status = |n: usize| {
            let (spec, i, eta) = (&fleet.instances[n], &states[n], etas.each[n]);
            InstanceStatus {
                progress_percent: u32::from(crate::eta::progress_percent(i)),
                eta_unix_ms: eta.unwrap_or(0),
                window_end_unix_ms: i.window_end_ms.unwrap_or(0),
                name: spec.name.clone(),
                phase: format!("{:?}", i.phase),
                origin: spec.origin.clone(),
                target: spec.target.clone(),
                hot_passes: i.hot_passes,
                last_changed_files: i.last_pass.as_ref().map_or(0, |p| p.files_changed),
                last_changed_bytes: i.last_pass.as_ref().map_or(0, |p| p.bytes_changed),
                not_converging: i.not_converging,
                downtime_start_unix_ms: i.downtime_start_ms.unwrap_or(0),
                downtime_end_unix_ms: i.downtime_end_ms.unwrap_or(0),
                downtime_budget_secs: spec.downtime_budget_secs,
                // A Done instance's last error was retried away: the events keep it.
                last_error: if i.phase == crate::machine::Phase::Done {
                    String::new()
                } else {
                    i.last_error.clone().unwrap_or_default()
                },
                paused: !i.phase.is_final()
                    && (i.phase == crate::machine::Phase::Paused || fleet_paused),
                pause_pending: i.pause_requested,
                databases: i
                    .databases
                    .as_ref()
                    .map(|d| d.path().to_string())
                    .unwrap_or_default(),
                databases_why: i
                    .databases
                    .as_ref()
                    .map(|d| d.why.clone())
                    .unwrap_or_default(),
                running: i.running.keys().map(|s| s.as_str().to_string()).collect(),
                last_pass_scan_ms: i.last_pass.as_ref().map_or(0, |p| p.scan_ms),
                last_pass_elapsed_ms: i.last_pass.as_ref().map_or(0, |p| p.elapsed_ms),
                bytes_moved: i.bytes_moved,
            }
        };
        Instances {
            statuses: shown.into_iter().map(status).collect(),
            fleet_eta_unix_ms: etas.fleet_eta.unwrap_or(0),
            total: states.len() as u32,
            phases: crate::metrics::PHASES
                .iter()
                .zip(phases)
                .filter(|(_, count)| *count > 0)
                .map(|(phase, count)| PhaseCount {
                    phase: format!("{phase:?}"),
                    count,
                })
                .collect(),
            bytes_moved: states.iter().map(|i| i.bytes_moved).sum(),
        }
    }

    fn command(&self, command: Command) -> Result<CommandReply, Status> {
        let detail = format!("{command} accepted");
        self.conductor.command(command).map_err(refused)?;
        Ok(CommandReply { detail })
    }

    /// Checks the caller's role, runs `handler`, and audits the call whatever happens.
    fn audited<T, R>(
        &self,
        request: &Request<T>,
        method: &str,
        arguments: String,
        handler: impl FnOnce() -> Result<R, Status>,
    ) -> Result<Response<R>, Status> {
        let (who, role) = match caller_identity(request) {
            Ok(id) => (id.name, id.role.to_string()),
            Err(_) => ("-".to_string(), "-".to_string()),
        };
        let started = std::time::Instant::now();
        let result = require_role(request, Role::Operator, "Fleet API").and_then(|_| handler());
        self.metrics.rpc(
            &format!("fleet/{method}"),
            result.is_ok(),
            started.elapsed().as_secs_f64(),
        );
        let (outcome, detail) = match &result {
            Ok(_) => ("ok", String::new()),
            Err(s) if s.code() == tonic::Code::PermissionDenied => ("denied", s.message().into()),
            Err(s) if s.code() == tonic::Code::Unauthenticated => ("denied", s.message().into()),
            Err(s) => ("error", s.message().into()),
        };
        let now = self.clock.now_ms();
        let mut detail = detail;
        if outcome == "denied" {
            match self.refusals.itemize(&format!("{who} ({role})"), now) {
                None => return result.map(Response::new),
                Some(0) => {}
                Some(skipped) => detail.push_str(&format!(
                    " ({skipped} more refused calls of this caller in the previous minute were \
                     not itemized)"
                )),
            }
        }
        let record = AuditRecord {
            who,
            role,
            method: method.to_string(),
            arguments: bounded(arguments),
            outcome: outcome.to_string(),
            detail: bounded(detail),
        };
        self.prune_audit(now);
        if let Err(e) = self.state.audit(&record, now) {
            tracing::error!(error = %e, ?record, "cannot write the audit log");
            return Err(Status::internal(format!("audit log unavailable: {e}")));
        }
        result.map(Response::new)
    }

    fn internal(e: crate::state::StateError) -> Status {
        Status::internal(e.to_string())
    }

    /// Every agent's health, with where its entry comes from and its data address.
    fn agent_statuses(&self) -> Result<Vec<AgentStatus>, Status> {
        let mut agents = self.state.agents().map_err(Self::internal)?;
        for agent in &mut agents {
            agent.source = if self.configured.contains(&agent.name) {
                "config"
            } else {
                "registered"
            }
            .into();
            if let Some(handle) = self.pool.get(&agent.name) {
                agent.data_address = handle.data_address.unwrap_or_default();
            }
        }
        Ok(agents)
    }

    /// The unfinished instance of the applied fleet that uses `agent`, if any.
    fn instance_using(&self, agent: &str) -> Result<Option<String>, Status> {
        let Some(fleet) = self.conductor.fleet() else {
            return Ok(None);
        };
        let finished: HashMap<String, bool> = self
            .state
            .instances()
            .map_err(Self::internal)?
            .into_iter()
            .map(|(name, i)| (name, i.phase.is_final()))
            .collect();
        Ok(fleet
            .instances
            .iter()
            .filter(|i| i.origin == agent || i.target == agent)
            .find(|i| finished.get(&i.name) != Some(&true))
            .map(|i| i.name.clone()))
    }
}

/// Checks an agent entry given to `AddAgent`.
fn agent_entry(req: &AddAgentRequest) -> Result<AgentEntry, Status> {
    bmfleet_proto::identity::validate_name(&req.name)
        .map_err(|m| Status::invalid_argument(format!("name: {m}")))?;
    let address = |field: &str, value: &str| -> Result<(), Status> {
        match value.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) => {
                Ok(())
            }
            _ => Err(Status::invalid_argument(format!(
                "{field}: '{value}' is not host:port"
            ))),
        }
    };
    address("address", &req.address)?;
    if !req.data_address.is_empty() {
        address("data_address", &req.data_address)?;
    }
    Ok(AgentEntry {
        name: req.name.clone(),
        address: req.address.clone(),
        data_address: (!req.data_address.is_empty()).then(|| req.data_address.clone()),
    })
}

#[tonic::async_trait]
impl Fleet for FleetApi {
    async fn status(
        &self,
        request: Request<StatusRequest>,
    ) -> Result<Response<StatusReply>, Status> {
        let limit = request.get_ref().limit as usize;
        let arguments = if limit > 0 {
            format!("{{\"limit\":{limit}}}")
        } else {
            "{}".into()
        };
        self.audited(&request, "Status", arguments, || {
            let fleet_state = self.state.fleet_state().map_err(Self::internal)?;
            let instances = self.instances(limit)?;
            let (notifications_undelivered, notifications_error) = self
                .state
                .undelivered_notifications()
                .map_err(Self::internal)?;
            let mut agents = self.agent_statuses()?;
            let (agents_total, agents_up) = (
                agents.len() as u32,
                agents.iter().filter(|a| a.up).count() as u32,
            );
            if limit > 0 && agents.len() > limit {
                // Those down or erring first, then by name.
                agents.sort_by(|a, b| {
                    (a.up && a.last_error.is_empty(), &a.name)
                        .cmp(&(b.up && b.last_error.is_empty(), &b.name))
                });
                agents.truncate(limit);
                agents.sort_by(|a, b| a.name.cmp(&b.name));
            }
            Ok(StatusReply {
                orchestrator: self.orchestrator_name.clone(),
                generated_at_unix_ms: self.clock.now_ms(),
                agents,
                agents_total,
                agents_up,
                instances_total: instances.total,
                phases: instances.phases,
                bytes_moved_total: instances.bytes_moved,
                migration: self
                    .conductor
                    .fleet()
                    .map(|f| f.policy.name.clone())
                    .unwrap_or_default(),
                fleet_paused: fleet_state.paused,
                approved: fleet_state.approved,
                instances: instances.statuses,
                fleet_eta_unix_ms: instances.fleet_eta_unix_ms,
                notifications_undelivered,
                notifications_error,
            })
        })
    }

    async fn apply(
        &self,
        request: Request<ApplyRequest>,
    ) -> Result<Response<CommandReply>, Status> {
        let req = request.get_ref();
        let arguments = format!(
            "{{\"file\":{:?},\"bytes\":{},\"remigrate\":{:?}}}",
            req.file_name,
            req.fleet_file.len(),
            req.remigrate
        );
        self.audited(&request, "Apply", arguments, || {
            let applied = self
                .conductor
                .apply(&req.fleet_file, &req.file_name, &req.remigrate)
                .map_err(refused)?;
            let mut detail = format!(
                "fleet {} applied: {} instances",
                applied.fleet.policy.name,
                applied.fleet.instances.len()
            );
            if !req.remigrate.is_empty() {
                detail += &format!("; migrated again on request: {}", req.remigrate.join(", "));
            }
            for why in &applied.skipped {
                detail += &format!("\nskipped {why}");
            }
            Ok(CommandReply { detail })
        })
    }

    async fn pause(
        &self,
        request: Request<TargetRequest>,
    ) -> Result<Response<CommandReply>, Status> {
        let arguments = target_arguments(request.get_ref());
        self.audited(&request, "Pause", arguments, || {
            self.command(Command::Pause(target(request.get_ref())?))
        })
    }

    async fn resume(
        &self,
        request: Request<TargetRequest>,
    ) -> Result<Response<CommandReply>, Status> {
        let arguments = target_arguments(request.get_ref());
        self.audited(&request, "Resume", arguments, || {
            self.command(Command::Resume(target(request.get_ref())?))
        })
    }

    async fn abort(
        &self,
        request: Request<TargetRequest>,
    ) -> Result<Response<CommandReply>, Status> {
        let arguments = format!("{{\"instance\":{:?}}}", request.get_ref().instance);
        self.audited(&request, "Abort", arguments, || {
            let name = target(request.get_ref())?
                .ok_or_else(|| Status::invalid_argument("abort names one instance"))?;
            self.command(Command::Abort(name))
        })
    }

    async fn approve(
        &self,
        request: Request<ApproveRequest>,
    ) -> Result<Response<CommandReply>, Status> {
        self.audited(&request, "Approve", "{}".into(), || {
            self.command(Command::Approve)
        })
    }

    async fn events(
        &self,
        request: Request<EventsRequest>,
    ) -> Result<Response<EventsReply>, Status> {
        let req = request.get_ref();
        let limit = match req.limit {
            0 => AUDIT_DEFAULT,
            n => n.min(AUDIT_MAX),
        };
        let instance = (!req.instance.is_empty()).then_some(req.instance.as_str());
        let arguments = format!("{{\"instance\":{:?},\"limit\":{limit}}}", req.instance);
        self.audited(&request, "Events", arguments, || {
            let rows = self
                .state
                .transitions(instance, req.after_id, limit)
                .map_err(Self::internal)?;
            let undelivered = self
                .state
                .undelivered()
                .map_err(Self::internal)?
                .into_iter()
                .filter(|n| instance.is_none_or(|i| n.instance == i || n.instance.is_empty()))
                .map(|n| UndeliveredNotification {
                    key: n.key,
                    receiver: n.receiver,
                    kind: n.kind,
                    instance: n.instance,
                    attempts: n.attempts,
                    last_error: n.last_error,
                    created_unix_ms: n.created_ms,
                })
                .collect();
            Ok(EventsReply {
                undelivered,
                events: rows
                    .into_iter()
                    .map(|r| FleetEvent {
                        id: r.id,
                        at_unix_ms: r.at_ms,
                        instance: r.instance,
                        event: r.event,
                        phase: r.phase,
                        actions: r.actions,
                    })
                    .collect(),
            })
        })
    }

    async fn report(
        &self,
        request: Request<ReportRequest>,
    ) -> Result<Response<ReportReply>, Status> {
        let wanted = request.get_ref().instances.clone();
        let arguments = format!("{{\"instances\":{wanted:?}}}");
        self.audited(&request, "Report", arguments, || {
            let statuses = self.instances(0)?.statuses;
            if let Some(unknown) = wanted
                .iter()
                .find(|w| !statuses.iter().any(|s| &s.name == *w))
            {
                return Err(Status::not_found(format!(
                    "no instance {unknown} in the applied fleet"
                )));
            }
            let statuses: Vec<InstanceStatus> = statuses
                .into_iter()
                .filter(|s| wanted.is_empty() || wanted.contains(&s.name))
                .collect();
            // This fleet's record: an earlier fleet's transitions and acts on the same names
            // stay in the database, for history, and are not this migration's.
            let applied = self
                .state
                .fleet_applied_ms()
                .map_err(Self::internal)?
                .unwrap_or(0);
            let mut transitions = Vec::new();
            for s in &statuses {
                transitions.extend(
                    self.state
                        .transitions(Some(&s.name), 0, u32::MAX)
                        .map_err(Self::internal)?
                        .into_iter()
                        .filter(|t| t.at_ms >= applied),
                );
            }
            let audit: Vec<_> = self
                .state
                .audit_log(u32::MAX, 0)
                .map_err(Self::internal)?
                .into_iter()
                .filter(|a| a.at_unix_ms >= applied)
                .collect();
            let migration = self
                .conductor
                .fleet()
                .map(|f| f.policy.name.clone())
                .unwrap_or_default();
            let report = crate::report::build(
                &migration,
                &self.orchestrator_name,
                self.clock.now_ms(),
                &statuses,
                &transitions,
                &audit,
            );
            let report_json = serde_json::to_string(&report)
                .map_err(|e| Status::internal(format!("the report: {e}")))?;
            Ok(ReportReply { report_json })
        })
    }

    async fn audit(&self, request: Request<AuditRequest>) -> Result<Response<AuditReply>, Status> {
        let limit = match request.get_ref().limit {
            0 => AUDIT_DEFAULT,
            n => n.min(AUDIT_MAX),
        };
        let before_id = request.get_ref().before_id;
        let arguments = format!("{{\"limit\":{limit},\"before_id\":{before_id}}}");
        self.audited(&request, "Audit", arguments, || {
            Ok(AuditReply {
                entries: self
                    .state
                    .audit_log(limit, before_id)
                    .map_err(Self::internal)?,
            })
        })
    }

    async fn issue_join_token(
        &self,
        request: Request<IssueJoinTokenRequest>,
    ) -> Result<Response<IssueJoinTokenReply>, Status> {
        let req = request.get_ref();
        let arguments = format!(
            "{{\"name\":{:?},\"ttl_secs\":{},\"reenroll\":{}}}",
            req.name, req.ttl_secs, req.reenroll
        );
        self.audited(&request, "IssueJoinToken", arguments, || {
            let config = self.enrollment.as_ref().ok_or_else(|| {
                Status::failed_precondition(
                    "enrollment is not configured: add an [enrollment] section (listen, \
                     pki_dir) to the orchestrator's configuration",
                )
            })?;
            bmfleet_proto::identity::validate_name(&req.name)
                .map_err(|m| Status::invalid_argument(format!("name: {m}")))?;
            bmfleet_proto::pki::check_enrollable(
                &config.pki_dir,
                &req.name,
                req.reenroll,
                &[self.orchestrator_name.as_str()],
            )
            .map_err(|e| Status::failed_precondition(format!("name {}: {e}", req.name)))?;
            let ttl = match req.ttl_secs {
                0 => config.token_ttl_secs,
                n if n > config.token_max_ttl_secs => {
                    return Err(Status::invalid_argument(format!(
                        "a join token lives at most {} s (enrollment.token_max_ttl_secs)",
                        config.token_max_ttl_secs
                    )))
                }
                n => n,
            };
            let by = caller_identity(&request).map_or_else(|_| "-".into(), |id| id.name);
            let token = crate::enrollment::new_token(
                &req.name,
                &by,
                self.clock.now_ms(),
                i64::from(ttl) * 1000,
                req.reenroll,
            )?;
            self.state
                .store_join_token(&token.stored)
                .map_err(Self::internal)?;
            Ok(IssueJoinTokenReply {
                token: token.text,
                expires_unix_ms: token.stored.expires_ms,
                enroll_address: config.enroll_address(),
            })
        })
    }

    async fn add_agent(
        &self,
        request: Request<AddAgentRequest>,
    ) -> Result<Response<CommandReply>, Status> {
        let req = request.get_ref();
        let arguments = format!(
            "{{\"name\":{:?},\"address\":{:?},\"data_address\":{:?}}}",
            req.name, req.address, req.data_address
        );
        self.audited(&request, "AddAgent", arguments, || {
            let entry = agent_entry(req)?;
            if self.configured.contains(&entry.name) {
                return Err(Status::failed_precondition(format!(
                    "agent {} is in the orchestrator's configuration file: change it there",
                    entry.name
                )));
            }
            if let Some(other) = self
                .pool
                .handles()
                .into_iter()
                .find(|a| a.address == entry.address && a.name != entry.name)
            {
                return Err(Status::already_exists(format!(
                    "{} is already the address of agent {}",
                    entry.address, other.name
                )));
            }
            let moved = self.pool.get(&entry.name).is_some();
            if moved {
                if let Some(instance) = self.instance_using(&entry.name)? {
                    return Err(Status::failed_precondition(format!(
                        "agent {} is part of instance {instance}, not finished: it cannot move now",
                        entry.name
                    )));
                }
            }
            let by = caller_identity(&request).map_or_else(|_| "-".into(), |id| id.name);
            self.state
                .register_agent(&entry, &by, self.clock.now_ms())
                .map_err(Self::internal)?;
            self.pool
                .insert(&entry)
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
            Ok(CommandReply {
                detail: format!(
                    "agent {} {} at {}{}",
                    entry.name,
                    if moved { "moved" } else { "registered" },
                    entry.address,
                    entry
                        .data_address
                        .as_ref()
                        .map(|d| format!(" (data plane {d})"))
                        .unwrap_or_default()
                ),
            })
        })
    }

    async fn remove_agent(
        &self,
        request: Request<RemoveAgentRequest>,
    ) -> Result<Response<CommandReply>, Status> {
        let req = request.get_ref();
        let arguments = format!("{{\"name\":{:?},\"revoke\":{}}}", req.name, req.revoke);
        self.audited(&request, "RemoveAgent", arguments, || {
            if self.configured.contains(&req.name) {
                return Err(Status::failed_precondition(format!(
                    "agent {} is in the orchestrator's configuration file: remove it there \
                     and restart",
                    req.name
                )));
            }
            if let Some(instance) = self.instance_using(&req.name)? {
                return Err(Status::failed_precondition(format!(
                    "agent {} is part of instance {instance}, not finished: abort or finish it first",
                    req.name
                )));
            }
            if !self
                .state
                .unregister_agent(&req.name)
                .map_err(Self::internal)?
            {
                return Err(Status::not_found(format!(
                    "no registered agent {}",
                    req.name
                )));
            }
            self.pool.remove(&req.name);
            let mut detail = format!("agent {} removed", req.name);
            if req.revoke {
                let config = self.enrollment.as_ref().ok_or_else(|| {
                    Status::failed_precondition(
                        "removed, but not revoked: the orchestrator has no [enrollment] pki_dir \
                         (run `bmctl fleet pki revoke` where the CA is)",
                    )
                })?;
                let (crl, count) =
                    bmfleet_proto::pki::revoke_in_dir(&config.pki_dir, &req.name).map_err(|e| {
                        Status::failed_precondition(format!("removed, but not revoked: {e}"))
                    })?;
                detail += &format!(
                    "; its certificate is revoked ({} lists {count}; reload the agents that \
                     read it)",
                    crl.display()
                );
            }
            Ok(CommandReply { detail })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::machine::{Instance, Phase, Running, Step};

    /// Status's ETAs are at most a second old: within it readers share one computation,
    /// after it (or for another fleet) they are computed again.
    #[test]
    fn status_etas_are_recomputed_once_a_second() {
        let fleet =
            crate::fleet::FleetFile::parse(crate::fleet::tests::BASE, "fleet.toml").unwrap();
        let now = 1_800_000_000_000;
        let mut states = vec![Instance {
            phase: Phase::Converged,
            ..Instance::default()
        }];
        let cache = EtaCache::default();
        let first = cache.get(&fleet, &states, now);
        assert!(first.each[0].is_some());
        // Done meanwhile: the same ETAs for the rest of the second…
        states[0].phase = Phase::Done;
        states[0].finished_ms = Some(now + 10);
        assert!(Arc::ptr_eq(&first, &cache.get(&fleet, &states, now + 999)));
        // …then the instance's own end.
        let later = cache.get(&fleet, &states, now + 1000);
        assert_eq!(later.each[0], Some(now + 1000));
        // Another fleet (or one of another length) is never answered from this one's.
        let other =
            crate::fleet::FleetFile::parse(crate::fleet::tests::BASE, "fleet.toml").unwrap();
        assert!(!Arc::ptr_eq(
            &later,
            &cache.get(&other, &states, now + 1001)
        ));
    }

    #[test]
    fn a_limited_status_lists_what_needs_a_look_first_in_fleet_order() {
        // 200 instances: mostly done or waiting, a few down, failed, erring, paused, running.
        let mut states: Vec<Instance> = (0..200)
            .map(|n| Instance {
                phase: if n % 2 == 0 {
                    Phase::Done
                } else {
                    Phase::Converged
                },
                ..Instance::default()
            })
            .collect();
        let set = |states: &mut Vec<Instance>, n: usize, phase: Phase| states[n].phase = phase;
        set(&mut states, 150, Phase::ColdSync);
        set(&mut states, 7, Phase::Cutover);
        set(&mut states, 120, Phase::Failed);
        set(&mut states, 121, Phase::RolledBack);
        states[99].last_error = Some("rsync exited with 23".into());
        set(&mut states, 180, Phase::Paused);
        states[60].phase = Phase::HotSync;
        states[60].running.insert(
            Step::HotPass,
            Running {
                attempt: 1,
                deadline_ms: 0,
            },
        );
        let shown = listed(&states, 8);
        // Down, failed/rolled back, erring, paused, running: 7 of them, then the first
        // waiting one (a converged instance before any done one), in fleet order.
        assert_eq!(shown, vec![1, 7, 60, 99, 120, 121, 150, 180]);
        assert_eq!(listed(&states, 0).len(), 200, "0 lists every one");
        assert_eq!(listed(&states, 500).len(), 200);
        // A limit below what is down still shows the down ones first.
        assert_eq!(listed(&states, 2), vec![7, 150]);
    }
}
