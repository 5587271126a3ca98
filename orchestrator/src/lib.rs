//! The bmfleet orchestrator: the central service that knows the fleet, checks its agents and
//! answers operators.
//!
//! - [`config`]: the TOML configuration (Fleet API listener, agents, state database).
//! - [`state`]: durable state in embedded SQLite (agents' health, audit log).
//! - [`agents`]: one mutual-TLS client per agent, checking the agent's name and role.
//! - [`health`]: the periodic health check of every agent.
//! - [`fleet_api`]: the Fleet API for bmctl, audited.
//! - [`clock`]: injected time.
#![forbid(unsafe_code)]

pub mod agent_steps;
pub mod agents;
pub mod clock;
pub mod conductor;
pub mod config;
pub mod db_sync;
pub mod engine;
pub mod enrollment;
pub mod error;
pub mod eta;
pub mod fleet;
pub mod fleet_api;
pub mod health;
pub mod interfaces;
pub mod machine;
pub mod metrics;
pub mod notify;
pub mod plan;
pub mod refusals;
pub mod report;
pub mod scheduler;
pub mod sim;
pub mod state;
pub mod windows;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bmfleet_proto::admission::Limits;
use bmfleet_proto::identity::Role;
use bmfleet_proto::tls::{accept_tls, bounded_server, LocalIdentity, Policy};
use bmfleet_proto::v1::fleet_server::FleetServer;
use tokio::net::TcpListener;

use crate::agents::AgentPool;
use crate::clock::Clock;
use crate::config::OrchestratorConfig;
use crate::fleet_api::FleetApi;
use crate::state::State;

pub use error::OrchestratorError;

/// Who runs the migration steps.
pub enum StepRunner {
    /// The configured agents, over mutual-TLS gRPC (production).
    Agents,
    /// Simulated agents (tests and rehearsals: everything else, health checks of the
    /// configured agents included, is real).
    Simulated(sim::SimAgents),
}

/// Runs the orchestrator: health checks in the background and the Fleet API on `listener`,
/// until `shutdown` completes.
pub async fn run(
    config: OrchestratorConfig,
    listener: TcpListener,
    clock: Arc<dyn Clock>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), OrchestratorError> {
    run_with(config, listener, clock, StepRunner::Agents, shutdown).await
}

/// [`run`], with the steps run by `steps`.
pub async fn run_with(
    config: OrchestratorConfig,
    listener: TcpListener,
    clock: Arc<dyn Clock>,
    steps: StepRunner,
    shutdown: impl Future<Output = ()>,
) -> Result<(), OrchestratorError> {
    let identity = LocalIdentity::load(&config.tls, Role::Orchestrator)?;
    bmfleet_proto::process::reload_on_sighup(identity.trust());
    let state = Arc::new(State::open(&config.state_db)?);
    // The configuration's agents, and those registered at run time (a name in both is the
    // configuration's).
    let mut agents = config.agent.clone();
    for registered in state.registered_agents()? {
        if !agents.iter().any(|a| a.name == registered.name) {
            agents.push(registered);
        }
    }
    state.sync_agents(&agents)?;
    let timeout = Duration::from_secs(config.rpc_timeout_secs);
    let pool = Arc::new(AgentPool::new(&identity, &agents, timeout)?);
    let metrics = Arc::new(metrics::Metrics::new());
    if let Some(address) = config.metrics_listen {
        let bound = metrics::serve(metrics.clone(), clock.clone(), address).map_err(|source| {
            OrchestratorError::Metrics {
                address: address.to_string(),
                source,
            }
        })?;
        tracing::info!(address = %bound, "metrics serving");
    }
    let port: Arc<dyn engine::AgentPort> = match steps {
        StepRunner::Agents => Arc::new(agent_steps::GrpcAgents::new(
            pool.clone(),
            clock.clone(),
            metrics.clone(),
        )),
        StepRunner::Simulated(agents) => Arc::new(agents),
    };
    let receivers = config
        .notify
        .iter()
        .map(notify::Receiver::load)
        .collect::<Result<Vec<_>, String>>()
        .map_err(OrchestratorError::Notify)?;
    let conductor = Arc::new(
        conductor::Conductor::new(
            state.clone(),
            clock.clone(),
            port,
            pool.clone(),
            metrics.clone(),
        )
        .with_receivers(Arc::new(receivers.clone())),
    );
    conductor.resume_stored()?;
    let notifier = {
        let conductor = conductor.clone();
        tokio::spawn(
            notify::Notifier {
                state: state.clone(),
                fleet: Arc::new(move || conductor.fleet()),
                receivers,
                clock: clock.clone(),
                metrics: metrics.clone(),
            }
            .run(),
        )
    };
    let health = tokio::spawn(health::run(
        pool.clone(),
        metrics.clone(),
        state.clone(),
        clock.clone(),
        Duration::from_secs(config.health_interval_secs),
        Duration::from_secs(config.usage_interval_secs),
        timeout,
    ));
    let name = identity.identity().name.clone();
    tracing::info!(orchestrator = %name, address = ?listener.local_addr().ok(), agents = config.agent.len(), "orchestrator serving");
    let audit = fleet_api::AuditPolicy {
        retention_ms: i64::from(config.audit_retention_days) * 86_400_000,
    };
    let enrollment = match &config.enrollment {
        Some(e) => Some(enrollment::serve(
            e.clone(),
            &identity,
            state.clone(),
            clock.clone(),
        )?),
        None => None,
    };
    let api = FleetApi::new(
        fleet_api::Parts {
            state,
            clock,
            conductor,
            metrics,
            pool,
            configured: config.agent.iter().map(|a| a.name.clone()).collect(),
            enrollment: config.enrollment.clone(),
        },
        name,
        audit,
    );
    let served = bounded_server()
        .add_service(FleetServer::new(api))
        .serve_with_incoming_shutdown(
            accept_tls(
                listener,
                identity.server_config()?,
                Policy {
                    limits: Limits::API,
                    role: Some(Role::Operator),
                },
            ),
            shutdown,
        )
        .await;
    health.abort();
    notifier.abort();
    if let Some(e) = enrollment {
        e.abort();
    }
    served?;
    Ok(())
}
