//! The Agent gRPC service: admits only the orchestrator, journals every mutating call.

use std::future::Future;
use std::sync::Arc;

use bmfleet_proto::identity::Role;
use bmfleet_proto::tls::{accept_tls, LocalIdentity, RoleGate};
use bmfleet_proto::v1::agent_server::{Agent, AgentServer};
use bmfleet_proto::v1::{FactsReply, FactsRequest, ServiceAction, ServicesReply, ServicesRequest};
use prost::Message;
use tokio::net::TcpListener;
use tonic::{Request, Response, Status};

use crate::config::AgentConfig;
use crate::operations::{request_digest, Begin, Journal};
use crate::{facts, services};

/// File name of the operation journal inside the state dir.
pub const JOURNAL_FILE: &str = "operations.db";

/// Why the agent could not start or stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Identity files unusable.
    #[error(transparent)]
    Tls(#[from] bmfleet_proto::tls::TlsError),
    /// The state dir could not be created.
    #[error("state dir {path}: {source}")]
    StateDir {
        /// The dir.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The journal could not be opened.
    #[error(transparent)]
    Journal(#[from] crate::operations::JournalError),
    /// The gRPC server failed.
    #[error("serving the Agent API: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// The Agent API of one host.
pub struct AgentService {
    config: Arc<AgentConfig>,
    name: String,
    journal: Journal,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

impl AgentService {
    /// A service for `config`, answering as agent `name`, journaling into the state dir.
    pub fn new(config: AgentConfig, name: String) -> Result<Self, AgentError> {
        std::fs::create_dir_all(&config.state_dir).map_err(|source| AgentError::StateDir {
            path: config.state_dir.display().to_string(),
            source,
        })?;
        let journal = Journal::open(&config.state_dir.join(JOURNAL_FILE))?;
        Ok(AgentService {
            config: Arc::new(config),
            name,
            journal,
        })
    }

    /// Runs `operation` once per operation id: a repeated id gets the stored reply with
    /// `replayed` set by `mark_replayed`.
    async fn once<R, F>(
        &self,
        id: &str,
        kind: &str,
        encoded_request: &[u8],
        operation: F,
    ) -> Result<(R, bool), Status>
    where
        R: Message + Default,
        F: Future<Output = R>,
    {
        if id.is_empty() {
            return Err(Status::invalid_argument(format!(
                "{kind} is a mutating call: it needs an operation_id"
            )));
        }
        let lock = self.journal.lock_for(id);
        let _guard = lock.lock().await;
        let digest = request_digest(kind, encoded_request);
        let internal = |e: crate::operations::JournalError| Status::internal(e.to_string());
        match self
            .journal
            .begin(id, kind, &digest, now_ms())
            .map_err(internal)?
        {
            Begin::Fresh => {
                let reply = operation.await;
                self.journal
                    .finish(id, &reply.encode_to_vec(), now_ms())
                    .map_err(internal)?;
                Ok((reply, false))
            }
            Begin::Done(bytes) => {
                tracing::info!(
                    operation_id = id,
                    kind,
                    "repeated operation id: replaying stored reply"
                );
                let reply = R::decode(bytes.as_slice())
                    .map_err(|e| Status::internal(format!("stored reply of {id}: {e}")))?;
                Ok((reply, true))
            }
            Begin::Interrupted { started_at_ms } => Err(Status::aborted(format!(
                "operation {id} ({kind}) started at {started_at_ms} (Unix ms) in an earlier agent \
                 process that stopped before it finished: its outcome is unknown; check the host \
                 (e.g. a services STATUS call) and retry under a new operation id"
            ))),
            Begin::Conflict { kind: recorded } => Err(Status::already_exists(format!(
                "operation id {id} was already used for a different {recorded} request; \
                 use a new id for a new operation"
            ))),
        }
    }
}

#[tonic::async_trait]
impl Agent for AgentService {
    async fn facts(&self, request: Request<FactsRequest>) -> Result<Response<FactsReply>, Status> {
        let req = request.into_inner();
        Ok(Response::new(
            facts::gather(&self.config, &self.name, req.measure_usage).await,
        ))
    }

    async fn services(
        &self,
        request: Request<ServicesRequest>,
    ) -> Result<Response<ServicesReply>, Status> {
        let req = request.into_inner();
        let action = ServiceAction::try_from(req.action)
            .ok()
            .filter(|a| *a != ServiceAction::Unspecified)
            .ok_or_else(|| {
                Status::invalid_argument("services: action must be STOP, START or STATUS")
            })?;
        if action == ServiceAction::Status {
            let mut reply = services::run(&self.config.services, action).await;
            reply.operation_id = req.operation_id;
            return Ok(Response::new(reply));
        }
        let kind = format!("services/{}", action.as_str_name());
        let run = async {
            tracing::info!(operation_id = %req.operation_id, action = action.as_str_name(), "services");
            services::run(&self.config.services, action).await
        };
        let (mut reply, replayed) = self
            .once(&req.operation_id, &kind, &req.encode_to_vec(), run)
            .await?;
        reply.operation_id = req.operation_id;
        reply.replayed = replayed;
        Ok(Response::new(reply))
    }
}

/// Serves the Agent API on `listener` until `shutdown` completes.
pub async fn serve(
    config: AgentConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    let identity = LocalIdentity::load(&config.tls, Role::Agent)?;
    let tls = identity.server_config()?;
    let name = identity.identity().name.clone();
    let service = AgentService::new(config, name.clone())?;
    tracing::info!(agent = %name, address = ?listener.local_addr().ok(), "agent serving");
    let gate = RoleGate {
        allowed: Role::Orchestrator,
        api: "Agent API",
    };
    tonic::transport::Server::builder()
        .add_service(AgentServer::with_interceptor(service, gate))
        .serve_with_incoming_shutdown(accept_tls(listener, tls), shutdown)
        .await?;
    Ok(())
}
