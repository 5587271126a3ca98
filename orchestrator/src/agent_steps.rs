//! How each step is done with real agents over gRPC: preflight from both hosts' facts, sync
//! passes as grant-scoped pulls, services, the database move, the config copy and the service
//! IP, BlueMind's post-migration API, and verification: the final pass ends by comparing both
//! sides' manifests (services stopped), the database move compares every table, and Verify
//! checks from the orchestrator that the service IP answers IMAP and SMTP.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bmfleet_proto::error_chain::describe_status;
use bmfleet_proto::v1::{
    ClearServedRequest, ConnectionRequest, CopyConfigRequest, DumpFormat, EndFollowingRequest,
    FactsRequest, FollowDatabasesRequest, GrantRequest, IpRequest, ManifestRequest,
    MoveDatabasesRequest, OriginEndpoint, PostMigrationRequest, PullRequest, RevokeGrantRequest,
    ServiceAction, ServicesRequest, VerifyFollowingRequest,
};

use crate::agents::{AgentHandle, AgentPool};
use crate::clock::Clock;
use crate::engine::{AgentPort, Job, StepError, StepOutput, StepResult};
use crate::fleet::InstanceSpec;
use crate::machine::{round_operation, DbPlan, PassStats, Step};

use bmfleet_proto::BLUEMIND_DATA_DIRS as DATA_DIRS;

/// How long an instance's end keeps asking an unreachable origin to withdraw its grants.
pub const END_INSTANCE_RETRY_MS: i64 = 10 * 60 * 1000;

/// How long the grant of a step without a known deadline stays valid.
const FALLBACK_GRANT_MS: i64 = 10 * 60 * 1000;

/// Real agents, reached through the orchestrator's pool.
pub struct GrpcAgents {
    pool: Arc<AgentPool>,
    clock: Arc<dyn Clock>,
    metrics: Arc<crate::metrics::Metrics>,
}

impl GrpcAgents {
    /// Steps over `pool`, timing each in `metrics`.
    pub fn new(
        pool: Arc<AgentPool>,
        clock: Arc<dyn Clock>,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Self {
        GrpcAgents {
            pool,
            clock,
            metrics,
        }
    }
}

fn agent(pool: &AgentPool, name: &str) -> Result<AgentHandle, String> {
    pool.get(name).ok_or_else(|| {
        format!("agent {name} is neither in the orchestrator's configuration nor registered")
    })
}

impl AgentPort for GrpcAgents {
    /// Every grant the instance's target holds on its origin for this migration goes (and
    /// with a replication grant, the origin's slot and role); then a target standby that was
    /// never promoted stops following and gets its own cluster back. A host that does not
    /// answer (restarting, cut off) is asked again, with the steps' retry back-off, for
    /// [`END_INSTANCE_RETRY_MS`]; after that its grants expire with their steps.
    fn end_instance(
        &self,
        migration: String,
        instance: InstanceSpec,
    ) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        let (pool, clock) = (self.pool.clone(), self.clock.clone());
        Box::pin(async move {
            let give_up = clock.now_ms() + END_INSTANCE_RETRY_MS;
            let revoke = || {
                let mut request = tonic::Request::new(RevokeGrantRequest {
                    grant_id: String::new(),
                    target_name: instance.target.clone(),
                    migration: migration.clone(),
                });
                request.set_timeout(std::time::Duration::from_secs(10));
                let origin = pool.get(&instance.origin);
                let name = instance.name.clone();
                async move {
                    let Some(origin) = origin else {
                        return Ok(());
                    };
                    origin
                        .client
                        .clone()
                        .revoke_grant(request)
                        .await
                        .map(|r| {
                            tracing::info!(instance = %name, revoked = r.into_inner().revoked, "grants withdrawn at the instance's end");
                        })
                        .map_err(|s| describe_status(&s))
                }
            };
            // A standby that never got promoted stops following and gives the target its own
            // cluster back.
            let unfollow = || {
                let mut request = tonic::Request::new(EndFollowingRequest {
                    origin_name: instance.origin.clone(),
                });
                request.set_timeout(std::time::Duration::from_secs(600));
                let target = pool.get(&instance.target);
                let name = instance.name.clone();
                async move {
                    let Some(target) = target else {
                        return Ok(());
                    };
                    let reply = target
                        .client
                        .clone()
                        .end_following(request)
                        .await
                        .map_err(|s| describe_status(&s))?
                        .into_inner();
                    if reply.ended {
                        tracing::info!(instance = %name, "the target's standby stopped following; its own cluster is back");
                    }
                    if reply.error.is_empty() {
                        Ok(())
                    } else {
                        Err(reply.error)
                    }
                }
            };
            retry_until(
                &clock,
                give_up,
                &instance.name,
                "withdrawing the instance's grants",
                revoke,
            )
            .await;
            retry_until(
                &clock,
                give_up,
                &instance.name,
                "ending the target's standby",
                unfollow,
            )
            .await;
        })
    }

    fn run(&self, job: Job) -> Pin<Box<dyn Future<Output = StepResult> + Send>> {
        let (pool, metrics) = (self.pool.clone(), self.metrics.clone());
        let now = self.clock.now_ms();
        Box::pin(async move {
            let (method, started) = (
                format!("agent/{}", job.step.as_str()),
                std::time::Instant::now(),
            );
            let result = run_step(&pool, job, now).await;
            metrics.rpc(&method, result.is_ok(), started.elapsed().as_secs_f64());
            result
        })
    }
}

/// Calls `call` until it succeeds or `give_up` (Unix ms) passes, with the steps' back-off.
async fn retry_until<F, Fut>(
    clock: &Arc<dyn Clock>,
    give_up: i64,
    instance: &str,
    what: &str,
    call: F,
) where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    for attempt in 1u32.. {
        let Err(error) = call().await else {
            return;
        };
        if clock.now_ms() >= give_up {
            tracing::warn!(%instance, %error, "{what} failed; giving up");
            return;
        }
        tracing::info!(%instance, %error, attempt, "{what} failed; asking again");
        clock
            .sleep(crate::engine::retry_backoff_ms(attempt + 1))
            .await;
    }
}

async fn run_step(pool: &AgentPool, job: Job, now_ms: i64) -> StepResult {
    if job.step == Step::Preflight {
        let origin = &agent(pool, &job.instance.origin)?;
        let target = &agent(pool, &job.instance.target)?;
        return preflight(origin, target, &job)
            .await
            .map(|plan| StepOutput {
                databases: Some(plan),
                ..StepOutput::default()
            });
    }
    Ok(other_step(pool, job, now_ms).await?)
}

/// A step's outcome below [`run_step`]: a retryable failure's message.
type Done = Result<StepOutput, String>;

async fn other_step(pool: &AgentPool, job: Job, now_ms: i64) -> Done {
    let origin = &agent(pool, &job.instance.origin)?;
    let target = &agent(pool, &job.instance.target)?;
    match job.step {
        // `run_step` runs it apart: its refusals may be for good.
        Step::Preflight => Err("the preflight runs apart".into()),
        Step::FollowDatabases => follow_databases(origin, target, &job, now_ms).await,
        Step::HotPass => granted_pass(origin, target, &job, now_ms)
            .await
            .map(Into::into),
        Step::PreWindowPass => pre_window_pass(origin, target, &job, now_ms).await,
        Step::FinalPass => {
            let stats = granted_pass(origin, target, &job, now_ms).await?;
            // Services are stopped on both sides: the trees must now be equal. A journal pass
            // was verified by the target against the origin, path by path (contents
            // included); a walk is compared here.
            let evidence = match stats.journal_paths {
                None => compare_manifests(origin, target, &job, now_ms - CONTENT_CHECK_MS).await?,
                Some(paths) => format!(
                    "{paths} paths the origin's journal saw change since the last pre-window round, each verified by {} against {}'s state of it (contents included)",
                    target.name, origin.name
                ),
            };
            Ok(StepOutput {
                evidence,
                ..stats.into()
            })
        }
        Step::StopOrigin => {
            // The follower's catch-up needs the stopped origin's position: read at once.
            let read_wal = job.promote_databases;
            services_reading_wal(origin, &job, ServiceAction::Stop, read_wal).await
        }
        Step::StopTarget | Step::RollbackStopTarget => {
            services(target, &job, ServiceAction::Stop).await
        }
        Step::RollbackStartOrigin => services(origin, &job, ServiceAction::Start).await,
        Step::StartTarget => services(target, &job, ServiceAction::Start).await,
        Step::Databases => {
            granted(origin, &job, now_ms, Scope::Databases, |endpoint| {
                move_databases(target, &job, endpoint)
            })
            .await
        }
        Step::Config => {
            granted(origin, &job, now_ms, Scope::ConfigSet, |endpoint| {
                copy_config(origin, target, &job, endpoint)
            })
            .await
        }
        Step::OriginReleaseIp | Step::RollbackTargetReleaseIp => {
            let host = if job.step == Step::OriginReleaseIp {
                origin
            } else {
                target
            };
            service_ip(host, &job, false).await
        }
        Step::TargetTakeIp | Step::RollbackOriginTakeIp => {
            let host = if job.step == Step::TargetTakeIp {
                target
            } else {
                origin
            };
            service_ip(host, &job, true).await
        }
        Step::PostMigration => post_migration(origin, target, &job).await,
        Step::Verify => verify(origin, target, &job).await,
    }
}

/// How long a replication grant lives: the standby follows from the hot phase to the
/// cutover (the instance's end revokes it; its expiry is the backstop).
const REPLICATION_GRANT_MS: i64 = 14 * 24 * 3600 * 1000;

/// The target's cluster becomes a standby of the origin's, under a replication grant that
/// outlives the step (until the instance ends) and is revoked at once if the step fails.
async fn follow_databases(
    origin: &AgentHandle,
    target: &AgentHandle,
    job: &Job,
    now_ms: i64,
) -> Done {
    let endpoint = grant(origin, job, now_ms, Scope::Replication).await?;
    let reply = target
        .client
        .clone()
        .follow_databases(FollowDatabasesRequest {
            operation_id: job.operation_id.clone(),
            origin: Some(endpoint.clone()),
            logical: job.logical_databases,
        })
        .await
        .map(|r| r.into_inner())
        .map_err(|s| describe_status(&s));
    match reply {
        Ok(r) if r.ok => {
            tracing::info!(instance = %job.instance.name, bytes = r.base_backup_bytes, elapsed_ms = r.elapsed_ms, "the target's databases follow the origin");
            Ok(StepOutput::default())
        }
        Ok(r) => {
            revoke(origin, &endpoint.grant_id).await;
            Err(r.error)
        }
        Err(e) => {
            revoke(origin, &endpoint.grant_id).await;
            Err(e)
        }
    }
}

/// The pre-window pass, right before the stop, in rounds: each carries what the origin's
/// journal saw change since the previous one began and, when the target's databases follow,
/// advances the verified point (their full comparison, live, so that the downtime's gate
/// compares only what changed since). A round that took more than the fleet's
/// `pre_window_round_secs` (2 s: a day carried, a verified point with much to compare, or
/// just a big server's walk and full comparison) is followed by another that carries what
/// landed meanwhile, up to `pre_window_rounds` (4; a server whose changes outrun them goes
/// into its window with what the last one left): the downtime then faces what changed
/// during the last one. A round that carried nothing does not end them: the databases may
/// have changed meanwhile, and only the next verified point would say.
/// Round k's operation is [`round_operation`]'s, so no round's reply stands in for another's
/// and the final pass counts the journal from the last round's start.
async fn pre_window_pass(
    origin: &AgentHandle,
    target: &AgentHandle,
    job: &Job,
    now_ms: i64,
) -> Done {
    let mut round = job.clone();
    let mut total = PassStats::default();
    let rounds = job.pre_window_rounds.max(1);
    for k in 1..=rounds {
        let stats = granted_pass(origin, target, &round, now_ms).await?;
        let (verified, verify_ms) = if job.promote_databases {
            verify_following(target, &round).await
        } else {
            (String::new(), 0)
        };
        let took = stats.elapsed_ms + verify_ms;
        total = PassStats {
            files_scanned: total.files_scanned + stats.files_scanned,
            files_changed: total.files_changed + stats.files_changed,
            bytes_changed: total.bytes_changed + stats.bytes_changed,
            scan_ms: total.scan_ms + stats.scan_ms,
            elapsed_ms: total.elapsed_ms + took,
            verified_point: verified,
            rounds: k,
            ..stats
        };
        if took <= job.pre_window_round_ms {
            break;
        }
        if k < rounds {
            tracing::info!(instance = %job.instance.name, round = k, took_ms = took, files = stats.files_changed, "the pre-window round took long: another one carries what changed meanwhile");
            round.carry_operation = Some(round.operation_id.clone());
            round.operation_id = round_operation(&job.operation_id, k + 1);
        }
    }
    stage_config(origin, target, job, now_ms).await;
    Ok(total.into())
}

/// Stages the origin's configuration set on the target while the service still runs, under
/// a config-set grant and an operation of its own: the window's `Config` step then compares
/// the origin's set with it instead of pulling it. A failed staging costs only that (the
/// window pulls the set), so it does not fail the pass.
async fn stage_config(origin: &AgentHandle, target: &AgentHandle, job: &Job, now_ms: i64) {
    let mut staging = job.clone();
    staging.operation_id = format!("{}/config-staged", job.operation_id);
    let staged = granted(
        origin,
        &staging,
        now_ms,
        Scope::ConfigSet,
        |endpoint| async {
            let reply = target
                .client
                .clone()
                .copy_config(CopyConfigRequest {
                    operation_id: staging.operation_id.clone(),
                    origin: Some(endpoint),
                    origin_queue_empty: true,
                    stage: true,
                })
                .await
                .map_err(|s| describe_status(&s))?
                .into_inner();
            if reply.ok {
                Ok(StepOutput::default())
            } else {
                Err(reply.error)
            }
        },
    )
    .await;
    match staged {
        Ok(_) => {
            tracing::info!(instance = %job.instance.name, "the configuration set is staged on the target")
        }
        Err(e) => {
            tracing::warn!(instance = %job.instance.name, error = %e, "the configuration set could not be staged: the window pulls it")
        }
    }
}

/// One pass of `job` (a hot, pre-window or final pass), under a data-dirs grant of its own.
async fn granted_pass(
    origin: &AgentHandle,
    target: &AgentHandle,
    job: &Job,
    now_ms: i64,
) -> Result<PassStats, String> {
    let output = granted(origin, job, now_ms, Scope::DataDirs, |endpoint| async {
        sync_pass(target, job, endpoint).await.map(StepOutput::from)
    })
    .await?;
    Ok(output.stats.unwrap_or_default())
}

/// Asks the target for a verified point with the origin its standby follows; what it says
/// (taken, or why not: then the downtime compares every table) and how long it took, ms.
async fn verify_following(target: &AgentHandle, job: &Job) -> (String, u64) {
    let reply = target
        .client
        .clone()
        .verify_following(VerifyFollowingRequest {
            operation_id: job.operation_id.clone(),
            origin_name: job.instance.origin.clone(),
        })
        .await
        .map(|r| r.into_inner())
        .map_err(|s| describe_status(&s));
    match reply {
        Ok(r) if r.ok => {
            tracing::info!(instance = %job.instance.name, summary = %r.summary, "verified point taken");
            (r.summary, r.elapsed_ms)
        }
        Ok(r) => {
            tracing::warn!(instance = %job.instance.name, error = %r.error, "no verified point: the downtime compares every table");
            (format!("none: {}", r.error), r.elapsed_ms)
        }
        Err(e) => {
            tracing::warn!(instance = %job.instance.name, error = %e, "no verified point: the downtime compares every table");
            (format!("none: {e}"), 0)
        }
    }
}

async fn move_databases(target: &AgentHandle, job: &Job, endpoint: OriginEndpoint) -> Done {
    let reply = target
        .client
        .clone()
        .move_databases(MoveDatabasesRequest {
            operation_id: job.operation_id.clone(),
            origin: Some(endpoint),
            format: DumpFormat::Streamed.into(),
            jobs: 0,
            promote: job.promote_databases,
            origin_wal_position: job.origin_wal.clone(),
        })
        .await
        .map_err(|s| describe_status(&s))?
        .into_inner();
    if !reply.gate.is_empty() {
        tracing::info!(instance = %job.instance.name, gate = %reply.gate, "the databases' gate");
    }
    if reply.ok {
        Ok(StepOutput {
            gate: reply.gate,
            ..StepOutput::default()
        })
    } else {
        Err(reply.error)
    }
}

async fn copy_config(
    origin: &AgentHandle,
    target: &AgentHandle,
    job: &Job,
    endpoint: OriginEndpoint,
) -> Done {
    let reply = target
        .client
        .clone()
        .copy_config(CopyConfigRequest {
            operation_id: job.operation_id.clone(),
            origin: Some(endpoint),
            origin_queue_empty: job.origin_queue_empty,
            stage: false,
        })
        .await
        .map_err(|s| describe_status(&s))?
        .into_inner();
    if !reply.refused.is_empty() {
        tracing::warn!(
            instance = %job.instance.name,
            origin = %origin.name,
            refused = ?reply.refused,
            "the origin sent config entries outside the target's config_set patterns; \
             the target did not install them"
        );
    }
    if reply.ok {
        Ok(StepOutput {
            mail_queue: format!(
                "{} queue files carried into {}'s Postfix queue{}",
                reply.queue_files.len(),
                target.name,
                match reply.queue_files_already {
                    0 => String::new(),
                    n => format!(" ({n} already there from an earlier attempt)"),
                }
            ),
            evidence: format!("configuration set: {}", reply.set_from),
            ..StepOutput::default()
        })
    } else {
        Err(reply.error)
    }
}

/// What a stop's drain or a start's flush left in a host's Postfix queue, in words.
fn describe_queue(host: &str, state: &bmfleet_proto::v1::MailQueueState) -> String {
    let mut left: Vec<String> = state
        .messages
        .iter()
        .map(|(queue, n)| format!("{queue} {n}"))
        .collect();
    left.sort();
    format!(
        "{host}'s Postfix queue after {} ms: {}{}",
        state.waited_ms,
        if left.is_empty() {
            "empty".to_string()
        } else {
            left.join(", ")
        },
        if state.note.is_empty() {
            String::new()
        } else {
            format!(" ({})", state.note)
        }
    )
}

/// Both agents answer, the BlueMind versions match, PostgreSQL answers on both, the target
/// has room for the origin's data and the spool's users, and its services are stopped.
/// Returns how the databases will move (a standby when both hosts allow it).
/// An agent's facts, asked now.
async fn facts(a: &AgentHandle, usage: bool) -> Result<bmfleet_proto::v1::FactsReply, String> {
    a.client
        .clone()
        .facts(FactsRequest {
            measure_usage: usage,
        })
        .await
        .map(|r| r.into_inner())
        .map_err(|s| format!("{} does not answer: {}", a.name, describe_status(&s)))
}

async fn preflight(
    origin: &AgentHandle,
    target: &AgentHandle,
    job: &Job,
) -> Result<DbPlan, StepError> {
    let (o, t) = tokio::join!(facts(origin, true), facts(target, false));
    let (o, t) = (o?, t?);
    // What a retry may mend (an agent or PostgreSQL that does not answer yet, services
    // still stopping, space being freed), and what only an operator can (`operator`): then
    // the preflight fails at once.
    let mut problems = Vec::new();
    let mut operator = Vec::new();
    if origin.data_address.is_none() {
        operator.push(format!(
            "agent {} has no data_address (where targets pull from): add it to its [[agent]] \
             entry, or register it with `bmctl fleet agents add {} ADDRESS --data-address HOST:PORT`",
            origin.name, origin.name
        ));
    }
    let version = |f: &bmfleet_proto::v1::FactsReply| {
        f.bluemind
            .as_ref()
            .map(|v| v.version.clone())
            .unwrap_or_default()
    };
    let (ov, tv) = (version(&o), version(&t));
    if ov.is_empty() || ov != tv {
        operator.push(format!(
            "BlueMind versions differ (origin {ov:?}, target {tv:?}): install the origin's version on the target"
        ));
    }
    for (name, f) in [(&origin.name, &o), (&target.name, &t)] {
        if let Some(pg) = &f.postgresql {
            if pg.version.is_empty() {
                problems.push(format!(
                    "PostgreSQL does not answer on {name}: {}",
                    pg.error
                ));
            }
        }
    }
    let used: u64 = o.data_dirs.iter().map(|d| d.used_bytes).sum();
    let free = t.data_dirs.iter().map(|d| d.free_bytes).min().unwrap_or(0);
    if used > free {
        problems.push(format!(
            "the target has {free} bytes free for {used} bytes of data: grow its filesystem"
        ));
    }
    let plan = crate::db_sync::choose(job.instance.db_sync, &o, &t);
    if let Err(e) = &plan {
        operator.push(e.clone());
    }
    if !t.network_persistence_unavailable.is_empty() {
        operator.push(format!(
            "the target {} cannot keep the service IP across a reboot: {}",
            target.name, t.network_persistence_unavailable
        ));
    }
    // Each side's card for the service IP: named in the fleet file, or found on the host.
    for card in [
        crate::interfaces::origin_card(&job.instance, &o),
        crate::interfaces::target_card(&job.instance, &t),
    ] {
        if let Err(e) = card {
            operator.push(e);
        }
    }
    // Each agent is the last word on its disk: an extra dir it does not list is refused.
    for dir in &job.instance.extra_dirs {
        for (name, f) in [(&origin.name, &o), (&target.name, &t)] {
            if !f.data_dirs.iter().any(|d| &d.path == dir) {
                operator.push(format!(
                    "{name} does not list {dir} among its data dirs: add it to \
                     facts.extra_data_dirs in its agent.toml, or remove it from the instance"
                ));
            }
        }
    }
    for u in t.spool_users.iter().filter(|u| !u.exists) {
        operator.push(format!(
            "user {} does not exist on the target: install BlueMind's packages there",
            u.name
        ));
    }
    let status = service_status(target).await?;
    let running: Vec<_> = status
        .commands
        .iter()
        .filter(|c| c.exit_code == 0)
        .map(|c| c.service.clone())
        .collect();
    if !running.is_empty() {
        problems.push(format!(
            "services run on the target ({}): stop them before migrating",
            running.join(", ")
        ));
    }
    let service_ip = job.instance.service_ip.to_string();
    if job.instance.remigrate {
        // Migrating onto a host that served: prove the direction first (the origin serves
        // and holds the service IP, the target holds neither).
        if !o.addresses.contains(&service_ip) {
            operator.push(format!(
                "--remigrate: the origin {} does not hold the service IP {service_ip}: it is \
                 not the side that serves; check which host has the newest mail",
                origin.name
            ));
        }
        if t.addresses.contains(&service_ip) {
            operator.push(format!(
                "--remigrate: the target {} holds the service IP {service_ip}: it serves; \
                 nothing is synced over a serving host",
                target.name
            ));
        }
        if !service_status(origin).await?.ok {
            operator.push(format!(
                "--remigrate: services do not all run on the origin {}: it is not the side \
                 that serves",
                origin.name
            ));
        }
    } else if t.served {
        operator.push(format!(
            "the target {} has served since bmfleet started its services: it is never synced \
             into again; `bmctl fleet apply --remigrate {}` migrates onto it after proving \
             the direction",
            target.name, job.instance.name
        ));
    }
    if !operator.is_empty() {
        operator.extend(problems);
        return Err(StepError::permanent(operator.join("; ")));
    }
    if !problems.is_empty() {
        return Err(problems.join("; ").into());
    }
    if job.instance.remigrate && t.served {
        let cleared = target
            .client
            .clone()
            .clear_served(ClearServedRequest {
                operation_id: job.operation_id.clone(),
                reason: format!(
                    "operator re-migration of {} from {}",
                    job.instance.name, origin.name
                ),
            })
            .await
            .map_err(|s| format!("{}: {}", target.name, describe_status(&s)))?
            .into_inner();
        tracing::warn!(instance = %job.instance.name, target = %target.name, since = cleared.since_unix_ms, set_by = %cleared.set_by, "re-migration: the target's served marker was cleared");
    }
    plan.map_err(StepError::from)
}

/// The services' status on `agent` (read-only: no operation id).
async fn service_status(agent: &AgentHandle) -> Result<bmfleet_proto::v1::ServicesReply, String> {
    agent
        .client
        .clone()
        .services(ServicesRequest {
            operation_id: String::new(),
            action: ServiceAction::Status.into(),
            wal_position: false,
        })
        .await
        .map(|r| r.into_inner())
        .map_err(|s| format!("{}: {}", agent.name, describe_status(&s)))
}

/// What a step's grant lets the target take from the origin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scope {
    /// The instance's data dirs (sync passes).
    DataDirs,
    /// The configuration file set.
    ConfigSet,
    /// The databases.
    Databases,
    /// Following the cluster (base backup, WAL).
    Replication,
}

/// The grant id of one step attempt: derived from its operation id, so that a step re-sent
/// after a restart is the identical request (the target answers it from its journal). It is
/// useless with any certificate but the target's.
fn grant_id(operation_id: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(format!("bmfleet-grant\0{operation_id}").as_bytes());
    digest.iter().take(16).map(|b| format!("{b:02x}")).collect()
}

/// Runs `body` under a grant of `scope` on the origin, registered for this step attempt
/// only and living until the step's deadline, then revokes it whatever the outcome.
async fn granted<F, Fut>(
    origin: &AgentHandle,
    job: &Job,
    now_ms: i64,
    scope: Scope,
    body: F,
) -> Done
where
    F: FnOnce(OriginEndpoint) -> Fut,
    Fut: Future<Output = Done>,
{
    let endpoint = grant(origin, job, now_ms, scope).await?;
    let result = body(endpoint.clone()).await;
    // Withdrawn beside what follows, not before it: in the downtime a round trip to the
    // origin (and its grant store's write) would delay every next step. Until it lands the
    // grant serves only this step's own target, for what it already had; it expires with the
    // step anyway.
    let (origin, grant_id) = (origin.clone(), endpoint.grant_id.clone());
    tokio::spawn(async move { revoke(&origin, &grant_id).await });
    result
}

/// Registers the grant of this step attempt on the origin and returns where the target pulls.
async fn grant(
    origin: &AgentHandle,
    job: &Job,
    now_ms: i64,
    scope: Scope,
) -> Result<OriginEndpoint, String> {
    let address = origin.data_address.clone().ok_or_else(|| {
        format!(
            "agent {} has no data_address in the orchestrator's configuration",
            origin.name
        )
    })?;
    let grant_id = grant_id(&job.operation_id);
    let paths: Vec<String> = match scope {
        Scope::DataDirs => DATA_DIRS
            .iter()
            .map(|d| d.to_string())
            .chain(job.instance.extra_dirs.iter().cloned())
            .collect(),
        Scope::ConfigSet | Scope::Databases | Scope::Replication => Vec::new(),
    };
    // Until the step's deadline (a grant outliving its step is revoked when the step or the
    // instance ends); a step without one gets the shortest step deadline.
    let expires_at_unix_ms = if scope == Scope::Replication {
        now_ms + REPLICATION_GRANT_MS
    } else if job.deadline_ms > now_ms {
        job.deadline_ms
    } else {
        now_ms + FALLBACK_GRANT_MS
    };
    origin
        .client
        .clone()
        .grant(GrantRequest {
            grant_id: grant_id.clone(),
            target_name: job.instance.target.clone(),
            migration: job.migration.clone(),
            paths,
            config_set: scope == Scope::ConfigSet,
            databases: scope == Scope::Databases,
            replication: scope == Scope::Replication,
            expires_at_unix_ms,
        })
        .await
        .map_err(|s| format!("{} refused the grant: {}", origin.name, describe_status(&s)))?;
    Ok(OriginEndpoint {
        address,
        name: origin.name.clone(),
        grant_id,
    })
}

/// Withdraws one grant; a failure is logged (the grant still expires with its step).
async fn revoke(origin: &AgentHandle, grant_id: &str) {
    let done = origin
        .client
        .clone()
        .revoke_grant(RevokeGrantRequest {
            grant_id: grant_id.to_string(),
            ..Default::default()
        })
        .await;
    if let Err(s) = done {
        tracing::warn!(agent = %origin.name, grant = grant_id, error = %describe_status(&s), "revoking a grant failed; it expires with its step");
    }
}

/// Pulls every data dir of the instance in one rsync run (hard links across dirs kept, one
/// tunnel) and returns the pass's statistics.
async fn sync_pass(
    target: &AgentHandle,
    job: &Job,
    endpoint: OriginEndpoint,
) -> Result<PassStats, String> {
    let dirs: Vec<String> = DATA_DIRS
        .iter()
        .map(|d| d.to_string())
        .chain(job.instance.extra_dirs.iter().cloned())
        .collect();
    let mut stream = target
        .client
        .clone()
        .pull(PullRequest {
            operation_id: job.operation_id.clone(),
            origin: Some(endpoint),
            path: String::new(),
            bwlimit_kib: job.bwlimit_kib,
            paths: dirs,
            // The live passes compress; the final pass, in the downtime, spends no CPU on it.
            compress: job.step != Step::FinalPass,
            // The final pass moves what the origin's journal saw change since the pre-window
            // pass began (that pass's grant marked it), and verifies it.
            journal_since: job
                .full_pass_operation
                .as_deref()
                .map(grant_id)
                .unwrap_or_default(),
            // A live pass carries what changed since the last good pass began.
            carry_since: job
                .carry_operation
                .as_deref()
                .map(grant_id)
                .unwrap_or_default(),
            // A hot pass with nothing to carry from is the run's first good one to come: the
            // target compares contents if it holds an older copy.
            first_pass: job.step == Step::HotPass && job.carry_operation.is_none(),
        })
        .await
        .map_err(|s| describe_status(&s))?
        .into_inner();
    let mut last = None;
    while let Some(event) = stream.message().await.map_err(|s| describe_status(&s))? {
        if event.done {
            last = Some(event);
            break;
        }
    }
    let event = last.ok_or("the pull ended without a result")?;
    if !event.ok {
        return Err(format!("pulling the data dirs: {}", event.error));
    }
    let s = event.stats.unwrap_or_default();
    Ok(PassStats {
        files_scanned: s.files_scanned,
        files_changed: s.files_changed,
        bytes_changed: s.bytes_changed,
        scan_ms: s.scan_ms,
        elapsed_ms: s.elapsed_ms,
        journal_paths: s.journal.then_some(s.journal_paths),
        journal_fallback: s.journal_fallback,
        verified_point: String::new(),
        phases: s.journal.then(|| {
            Box::new(crate::machine::PassPhases {
                connect_ms: s.connect_ms,
                list_ms: s.list_ms,
                transfer_ms: s.transfer_ms,
                verify_origin_ms: s.verify_origin_ms,
                verify_here_ms: s.verify_here_ms,
            })
        }),
        rounds: 0,
    })
}

/// The host part of an agent's address (`host:port`).
fn host_of(address: &str) -> String {
    address
        .rsplit_once(':')
        .map(|(h, _)| h.trim_matches(['[', ']']).to_string())
        .unwrap_or_default()
}

fn profile_name(profile: crate::fleet::Profile) -> &'static str {
    match profile {
        crate::fleet::Profile::V3_5 => "3.5",
        crate::fleet::Profile::V4 => "4.x",
        crate::fleet::Profile::V5 => "5.x",
        crate::fleet::Profile::Auto => "auto",
    }
}

async fn post_migration(origin: &AgentHandle, target: &AgentHandle, job: &Job) -> Done {
    let reply = target
        .client
        .clone()
        .post_migration(PostMigrationRequest {
            operation_id: job.operation_id.clone(),
            profile: profile_name(job.instance.profile).into(),
            origin_address: host_of(&origin.address),
            target_address: host_of(&target.address),
            mynetworks: job.instance.mynetworks.clone().unwrap_or_default(),
        })
        .await
        .map_err(|s| format!("{}: {}", target.name, describe_status(&s)))?
        .into_inner();
    if reply.ok {
        let mut done = reply.tasks.clone();
        done.push(format!(
            "mynetworks {} → {}",
            reply.mynetworks_before, reply.mynetworks_after
        ));
        Ok(StepOutput {
            evidence: format!("BlueMind on {}: {}", target.name, done.join("; ")),
            ..StepOutput::default()
        })
    } else {
        Err(format!("BlueMind API on {}: {}", target.name, reply.error))
    }
}

/// Both sides' data dirs are equal (entries, bytes, content checksum); on a difference, the
/// first differing entry is named.
/// The final pass's gate reads the content of files changed within this long before it
/// started (everything the pre-window and final passes moved, with margin for clock skew);
/// older files are compared by size and modification time to the nanosecond, as rsync's own
/// quick check does, and rsync checksummed each of them when it transferred it.
const CONTENT_CHECK_MS: i64 = 3_600_000;

/// Both sides' manifests of the data dirs are equal (then what they hold, per dir); where
/// not, the first differing entry is named. Files modified since `content_since_ms` are
/// compared by content too.
async fn compare_manifests(
    origin: &AgentHandle,
    target: &AgentHandle,
    job: &Job,
    content_since_ms: i64,
) -> Result<String, String> {
    let paths: Vec<String> = DATA_DIRS
        .iter()
        .map(|d| d.to_string())
        .chain(job.instance.extra_dirs.iter().cloned())
        .collect();
    async fn manifest(
        a: &AgentHandle,
        paths: Vec<String>,
        entries: bool,
        since: i64,
    ) -> Result<Vec<bmfleet_proto::v1::DirManifest>, String> {
        a.client
            .clone()
            .manifest(ManifestRequest {
                paths,
                entries,
                content_since_unix_ms: since,
            })
            .await
            .map(|r| r.into_inner().dirs)
            .map_err(|s| format!("manifest of {}: {}", a.name, describe_status(&s)))
    }
    let (o, t) = tokio::join!(
        manifest(origin, paths.clone(), false, content_since_ms),
        manifest(target, paths, false, content_since_ms)
    );
    let (o, t) = (o?, t?);
    let Some((a, _)) = o.iter().zip(&t).find(|(a, b)| a != b) else {
        return if o.len() == t.len() {
            let dirs: Vec<String> = o
                .iter()
                .map(|d| {
                    format!(
                        "{} {} files {} bytes checksum {}",
                        d.path, d.files, d.bytes, d.checksum
                    )
                })
                .collect();
            Ok(format!(
                "the data dirs of {} and {} are equal: {}",
                origin.name,
                target.name,
                dirs.join("; ")
            ))
        } else {
            Err("the manifests list different dirs".into())
        };
    };
    let dir = vec![a.path.clone()];
    let (o, t) = tokio::join!(
        manifest(origin, dir.clone(), true, content_since_ms),
        manifest(target, dir, true, content_since_ms)
    );
    let (o, t) = (o?, t?);
    let (oe, te) = (
        o.first().map(|d| d.entries.clone()).unwrap_or_default(),
        t.first().map(|d| d.entries.clone()).unwrap_or_default(),
    );
    let first = oe
        .iter()
        .zip(&te)
        .find(|(x, y)| x != y)
        .map(|(x, y)| format!("origin `{x}`, target `{y}`"))
        .unwrap_or_else(|| format!("origin {} entries, target {}", oe.len(), te.len()));
    Err(format!(
        "data differs after the final pass in {}: first difference: {first}",
        a.path
    ))
}

/// Done's evidence, gathered now from both hosts: the target holds the service IP and the
/// origin does not (each agent's own addresses); IMAP and SMTP answer on the IP; and each
/// answer came from the target (while the orchestrator holds the connection open, the
/// target's kernel lists it and the origin's does not). A banner alone proves nothing: the
/// origin could print the same one.
async fn verify(origin: &AgentHandle, target: &AgentHandle, job: &Job) -> Done {
    use tokio::io::AsyncReadExt;
    let ip = job.instance.service_ip.to_string();
    let (o, t) = tokio::join!(facts(origin, false), facts(target, false));
    let (o, t) = (o?, t?);
    let holds = |f: &bmfleet_proto::v1::FactsReply| f.addresses.iter().any(|a| a == &ip);
    match (holds(&o), holds(&t)) {
        (false, true) => {}
        (true, true) => {
            return Err(format!(
                "both {} and {} hold the service IP {ip}: who answers cannot be told",
                origin.name, target.name
            ))
        }
        (true, false) => {
            return Err(format!(
                "the origin {} holds the service IP {ip}, not the target {}",
                origin.name, target.name
            ))
        }
        (false, false) => {
            return Err(format!(
                "neither {} nor {} holds the service IP {ip}",
                origin.name, target.name
            ))
        }
    }
    let mut evidence = vec![format!(
        "the service IP {ip} is on {} and not on {}",
        target.name, origin.name
    )];
    for (port, greeting) in [(143u16, "* OK"), (25, "220")] {
        let address = std::net::SocketAddr::new(job.instance.service_ip, port);
        let (conn, answer) = tokio::time::timeout(std::time::Duration::from_secs(10), async {
            let mut conn = tokio::net::TcpStream::connect(address).await?;
            let mut buf = vec![0u8; 512];
            let n = conn.read(&mut buf).await?;
            Ok::<_, std::io::Error>((conn, String::from_utf8_lossy(&buf[..n]).into_owned()))
        })
        .await
        .map_err(|_| format!("{address} did not answer within 10 s"))?
        .map_err(|e| format!("{address}: {e}"))?;
        if !answer.starts_with(greeting) {
            return Err(format!("{address} answered {answer:?}, not {greeting:?}"));
        }
        let ours = conn
            .local_addr()
            .map_err(|e| format!("{address}: this end's address: {e}"))?;
        let (o, t) = tokio::join!(
            connection(origin, address, ours),
            connection(target, address, ours)
        );
        match (o?, t?) {
            (None, Some(state)) => evidence.push(format!(
                "{address} answered {:?} on a connection from {ours} that {}'s kernel holds ({state}) and {}'s does not",
                answer.lines().next().unwrap_or_default().chars().take(80).collect::<String>(),
                target.name,
                origin.name
            )),
            (Some(state), _) => {
                return Err(format!(
                    "the origin {} holds the connection {ours} → {address} ({state}): the answer came from the origin",
                    origin.name
                ))
            }
            (None, None) => {
                return Err(format!(
                    "the answer on {address} came from neither {} nor {}: neither host's kernel holds the connection from {ours} (another host answers on the service IP, or a NAT between the orchestrator and the hosts rewrites its address)",
                    origin.name, target.name
                ))
            }
        }
        drop(conn);
    }
    Ok(StepOutput {
        evidence: evidence.join("; "),
        ..StepOutput::default()
    })
}

/// The state of the TCP connection `local` ↔ `remote` in `host`'s kernel, if it holds one.
async fn connection(
    host: &AgentHandle,
    local: std::net::SocketAddr,
    remote: std::net::SocketAddr,
) -> Result<Option<String>, String> {
    let reply = host
        .client
        .clone()
        .connection(ConnectionRequest {
            local: local.to_string(),
            remote: remote.to_string(),
        })
        .await
        .map_err(|s| format!("{}: {}", host.name, describe_status(&s)))?
        .into_inner();
    Ok(reply.held.then_some(reply.state))
}

/// Moves the service IP on one host: take (add and announce) or release.
async fn service_ip(host: &AgentHandle, job: &Job, take: bool) -> Done {
    let request = IpRequest {
        operation_id: job.operation_id.clone(),
        address: format!("{}/{}", job.instance.service_ip, job.instance.prefix),
        // The card named for this side in the fleet file; none: the host finds its own.
        interface: if host.name == job.instance.origin {
            job.instance.origin_interface.clone()
        } else {
            job.instance.target_interface.clone()
        }
        .unwrap_or_default(),
    };
    let mut client = host.client.clone();
    let reply = if take {
        client.take_ip(request).await
    } else {
        client.release_ip(request).await
    }
    .map_err(|s| format!("{}: {}", host.name, describe_status(&s)))?
    .into_inner();
    if reply.ok {
        Ok(StepOutput::default())
    } else {
        Err(format!("{}: {}", host.name, reply.error))
    }
}

async fn services(agent: &AgentHandle, job: &Job, action: ServiceAction) -> Done {
    services_reading_wal(agent, job, action, false).await
}

/// [`services`], and with `read_wal` (a stop) the host's WAL position once stopped.
async fn services_reading_wal(
    agent: &AgentHandle,
    job: &Job,
    action: ServiceAction,
    read_wal: bool,
) -> Done {
    let reply = agent
        .client
        .clone()
        .services(ServicesRequest {
            operation_id: job.operation_id.clone(),
            action: action.into(),
            wal_position: read_wal,
        })
        .await
        .map_err(|s| format!("{}: {}", agent.name, describe_status(&s)))?
        .into_inner();
    if reply.ok {
        return Ok(StepOutput {
            mail_queue: reply
                .mail_queue
                .as_ref()
                .map(|q| describe_queue(&agent.name, q))
                .unwrap_or_default(),
            evidence: reply
                .wal_position
                .as_ref()
                .map(|w| format!("{}'s WAL position once stopped: {}", agent.name, w.lsn))
                .unwrap_or_default(),
            origin_wal: reply.wal_position,
            // No message in any of its queues once stopped (not known: pulled).
            origin_queue_empty: reply
                .mail_queue
                .as_ref()
                .is_some_and(|q| q.messages.values().all(|n| *n == 0)),
            ..StepOutput::default()
        });
    }
    let failed = reply
        .commands
        .iter()
        .find(|c| c.exit_code != 0 || !c.error.is_empty())
        .map(|c| {
            format!(
                "`{}` exited {}: {}{}",
                c.argv.join(" "),
                c.exit_code,
                c.error,
                c.stderr_tail.trim()
            )
        })
        .unwrap_or_default();
    Err(format!(
        "{} on {}: {failed}",
        action.as_str_name(),
        agent.name
    ))
}
