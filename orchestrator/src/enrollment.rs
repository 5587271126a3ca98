//! Enrollment: one-time join tokens, and the service that turns a token plus a signing request
//! into an agent certificate (the kubeadm / SPIRE pattern: the key is made on the host and
//! never leaves it; only the request and a short-lived secret travel).
//!
//! - An operator asks the Fleet API for a token for one agent name (`IssueJoinToken`); the
//!   orchestrator stores only the secret's SHA-256, with the name and an expiry.
//! - The host calls `Enroll` on the enrollment listener (TLS with the orchestrator's
//!   certificate, which the host checks against the fleet CA it was given; no client
//!   certificate). The token is redeemed once, in one transaction; the certificate gets the
//!   token's name and role agent whatever the request says; it is written into the PKI
//!   directory (`NAME.pem`), so that `bmctl fleet pki revoke NAME` and `agents remove
//!   --revoke` work on it. A re-enrollment of a name revokes its previous certificate.
//! - Every attempt, refused ones included, is audited (caller "-", its address).

use std::sync::Arc;

use bmfleet_proto::admission::Limits;
use bmfleet_proto::identity::Role;
use bmfleet_proto::pki::{self, IssueRequest};
use bmfleet_proto::tls::{accept_tls, bounded_server, LocalIdentity, Policy, TrustStore};
use bmfleet_proto::v1::enrollment_server::{Enrollment, EnrollmentServer};
use bmfleet_proto::v1::{EnrollReply, EnrollRequest};
use sha2::{Digest, Sha256};
use tonic::{Request, Response, Status};

use crate::clock::Clock;
use crate::config::EnrollmentConfig;
use crate::error::OrchestratorError;
use crate::state::{AuditRecord, State, StoredToken};

/// The version prefix of a join token.
const TOKEN_PREFIX: &str = "bmj1";

/// A freshly made join token: the text to give the host, and what the orchestrator stores.
#[derive(Debug, Clone)]
pub struct NewToken {
    /// `bmj1.ID.SECRET`.
    pub text: String,
    /// Stored form (no secret).
    pub stored: StoredToken,
}

fn random_hex(bytes: usize) -> Result<String, Status> {
    use ring::rand::SecureRandom;
    let mut buf = vec![0u8; bytes];
    ring::rand::SystemRandom::new()
        .fill(&mut buf)
        .map_err(|_| Status::internal("no randomness for a join token"))?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

fn sha256(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// Makes a join token for `name`, valid `ttl_ms` from `now_ms`.
pub fn new_token(name: &str, by: &str, now_ms: i64, ttl_ms: i64) -> Result<NewToken, Status> {
    let (id, secret) = (random_hex(8)?, random_hex(16)?);
    Ok(NewToken {
        text: format!("{TOKEN_PREFIX}.{id}.{secret}"),
        stored: StoredToken {
            id,
            secret_sha256: sha256(&secret),
            name: name.to_string(),
            issued_ms: now_ms,
            issued_by: by.to_string(),
            expires_ms: now_ms.saturating_add(ttl_ms),
        },
    })
}

/// Splits a token into its public id and its secret; `None` when it is not one.
pub fn parse_token(text: &str) -> Option<(&str, &str)> {
    let mut parts = text.trim().split('.');
    let (prefix, id, secret) = (parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit());
    (prefix == TOKEN_PREFIX && hex(id, 16) && hex(secret, 32) && parts.next().is_none())
        .then_some((id, secret))
}

/// The Enrollment service.
pub struct EnrollmentApi {
    state: Arc<State>,
    clock: Arc<dyn Clock>,
    config: EnrollmentConfig,
    orchestrator_name: String,
    /// The orchestrator's own trust, reloaded when an enrollment revokes a certificate.
    trust: Arc<TrustStore>,
}

/// The longest signing request accepted, bytes.
const CSR_MAX: usize = 16 * 1024;

impl EnrollmentApi {
    /// The service over `state`, signing with `config.pki_dir`'s CA.
    pub fn new(
        state: Arc<State>,
        clock: Arc<dyn Clock>,
        config: EnrollmentConfig,
        orchestrator_name: String,
        trust: Arc<TrustStore>,
    ) -> Self {
        EnrollmentApi {
            state,
            clock,
            config,
            orchestrator_name,
            trust,
        }
    }

    fn enroll_now(&self, req: &EnrollRequest, from: &str) -> Result<EnrollReply, Status> {
        let (id, secret) = parse_token(&req.token).ok_or_else(|| {
            Status::unauthenticated(
                "not a join token (bmj1.ID.SECRET from `bmctl fleet agents token`)",
            )
        })?;
        if req.csr_pem.len() > CSR_MAX {
            return Err(Status::invalid_argument("the signing request is too long"));
        }
        let now = self.clock.now_ms();
        let name = self
            .state
            .redeem_join_token(id, &sha256(secret), from, now)
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|refusal| Status::unauthenticated(refusal.to_string()))?;
        let issue = IssueRequest::new(&name, Role::Agent, self.config.certificate_days);
        let (cert_pem, replaced) = pki::sign_into_dir(&self.config.pki_dir, &req.csr_pem, &issue)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if replaced {
            tracing::info!(agent = %name, "re-enrolled: the previous certificate is revoked");
            if let Err(e) = self.trust.reload() {
                tracing::error!(error = %e, "cannot reload the revocation list");
            }
        }
        Ok(EnrollReply {
            cert_pem,
            orchestrator: self.orchestrator_name.clone(),
        })
    }
}

#[tonic::async_trait]
impl Enrollment for EnrollmentApi {
    async fn enroll(
        &self,
        request: Request<EnrollRequest>,
    ) -> Result<Response<EnrollReply>, Status> {
        let from = request
            .remote_addr()
            .map_or_else(|| "-".to_string(), |a| a.to_string());
        let req = request.into_inner();
        let id = parse_token(&req.token).map_or("-", |(id, _)| id);
        let result = self.enroll_now(&req, &from);
        let (outcome, detail) = match &result {
            Ok(_) => ("ok", String::new()),
            Err(s) if s.code() == tonic::Code::Unauthenticated => ("denied", s.message().into()),
            Err(s) => ("error", s.message().into()),
        };
        let record = AuditRecord {
            who: "-".into(),
            role: "-".into(),
            method: "Enroll".into(),
            arguments: format!("{{\"token_id\":{id:?},\"from\":{from:?}}}"),
            outcome: outcome.into(),
            detail,
        };
        if let Err(e) = self.state.audit(&record, self.clock.now_ms()) {
            tracing::error!(error = %e, "cannot write the audit log");
            return Err(Status::internal(format!("audit log unavailable: {e}")));
        }
        if let Err(s) = &result {
            tracing::warn!(%from, token = id, reason = s.message(), "refused an enrollment");
        }
        result.map(Response::new)
    }
}

/// Binds the enrollment listener and serves the Enrollment service on it (TLS with the
/// orchestrator's certificate, no client certificate, the API's connection limits).
pub fn serve(
    config: EnrollmentConfig,
    identity: &LocalIdentity,
    state: Arc<State>,
    clock: Arc<dyn Clock>,
) -> Result<tokio::task::JoinHandle<()>, OrchestratorError> {
    let address = config.listen;
    let bind_err = |source| OrchestratorError::Enrollment {
        address: address.to_string(),
        source,
    };
    let std_listener = std::net::TcpListener::bind(address).map_err(bind_err)?;
    std_listener.set_nonblocking(true).map_err(bind_err)?;
    let listener = tokio::net::TcpListener::from_std(std_listener).map_err(bind_err)?;
    let tls = identity.server_config_without_client_auth()?;
    let api = EnrollmentApi::new(
        state,
        clock,
        config,
        identity.identity().name.clone(),
        identity.trust(),
    );
    tracing::info!(%address, "enrollment serving");
    Ok(tokio::spawn(async move {
        let served = bounded_server()
            .add_service(EnrollmentServer::new(api))
            .serve_with_incoming(accept_tls(
                listener,
                tls,
                Policy {
                    limits: Limits::API,
                    role: None,
                },
            ))
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "the enrollment listener stopped");
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_parse_back_and_hold_no_secret_in_storage() {
        let t = new_token("origin-1", "operator", 1_000, 60_000).unwrap();
        let (id, secret) = parse_token(&t.text).unwrap();
        assert_eq!(id, t.stored.id);
        assert_eq!(sha256(secret), t.stored.secret_sha256);
        assert!(!format!("{:?}", t.stored).contains(secret));
        assert_eq!(t.stored.expires_ms, 61_000);
        for bad in [
            "",
            "bmj1",
            "bmj2.0011223344556677.00112233445566778899aabbccddeeff",
            "bmj1.zz11223344556677.00112233445566778899aabbccddeeff",
            "bmj1.0011223344556677.00112233445566778899aabbccddeeff.x",
        ] {
            assert!(parse_token(bad).is_none(), "{bad}");
        }
    }
}
