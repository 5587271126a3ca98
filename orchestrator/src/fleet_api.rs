//! The Fleet API served to operators (bmctl). Every call — refused ones included — is written
//! to the audit log with who made it, what it asked, when, and how it ended.

use std::sync::Arc;

use bmfleet_proto::identity::Role;
use bmfleet_proto::tls::{caller_identity, require_role};
use bmfleet_proto::v1::fleet_server::Fleet;
use bmfleet_proto::v1::{AuditReply, AuditRequest, StatusReply, StatusRequest};
use tonic::{Request, Response, Status};

use crate::clock::Clock;
use crate::state::{AuditRecord, State};

/// Default and maximum number of audit entries returned.
const AUDIT_DEFAULT: u32 = 100;
const AUDIT_MAX: u32 = 10_000;

/// The Fleet API.
pub struct FleetApi {
    state: Arc<State>,
    clock: Arc<dyn Clock>,
    orchestrator_name: String,
}

impl FleetApi {
    /// A Fleet API over `state`, answering as `orchestrator_name`.
    pub fn new(state: Arc<State>, clock: Arc<dyn Clock>, orchestrator_name: String) -> Self {
        FleetApi {
            state,
            clock,
            orchestrator_name,
        }
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
        let result = require_role(request, Role::Operator, "Fleet API").and_then(|_| handler());
        let (outcome, detail) = match &result {
            Ok(_) => ("ok", String::new()),
            Err(s) if s.code() == tonic::Code::PermissionDenied => ("denied", s.message().into()),
            Err(s) if s.code() == tonic::Code::Unauthenticated => ("denied", s.message().into()),
            Err(s) => ("error", s.message().into()),
        };
        let record = AuditRecord {
            who,
            role,
            method: method.to_string(),
            arguments,
            outcome: outcome.to_string(),
            detail,
        };
        if let Err(e) = self.state.audit(&record, self.clock.now_ms()) {
            tracing::error!(error = %e, ?record, "cannot write the audit log");
            return Err(Status::internal(format!("audit log unavailable: {e}")));
        }
        result.map(Response::new)
    }

    fn internal(e: crate::state::StateError) -> Status {
        Status::internal(e.to_string())
    }
}

#[tonic::async_trait]
impl Fleet for FleetApi {
    async fn status(
        &self,
        request: Request<StatusRequest>,
    ) -> Result<Response<StatusReply>, Status> {
        self.audited(&request, "Status", "{}".into(), || {
            Ok(StatusReply {
                orchestrator: self.orchestrator_name.clone(),
                generated_at_unix_ms: self.clock.now_ms(),
                agents: self.state.agents().map_err(Self::internal)?,
            })
        })
    }

    async fn audit(&self, request: Request<AuditRequest>) -> Result<Response<AuditReply>, Status> {
        let limit = match request.get_ref().limit {
            0 => AUDIT_DEFAULT,
            n => n.min(AUDIT_MAX),
        };
        let arguments = format!("{{\"limit\":{limit}}}");
        self.audited(&request, "Audit", arguments, || {
            Ok(AuditReply {
                entries: self.state.audit_log(limit).map_err(Self::internal)?,
            })
        })
    }
}
