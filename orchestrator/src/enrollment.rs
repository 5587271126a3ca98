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
use crate::refusals::{Account, Ledger};
use crate::state::{AuditRecord, State, StoredToken};

/// Enrollment attempts processed per source address and minute; more are refused
/// unprocessed (a host enrolls once; an operator retrying by hand stays far below).
pub const ENROLL_ATTEMPTS_PER_MINUTE: u32 = 20;

const TOO_MANY: &str = "too many enrollment attempts from this address: wait a minute";

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

/// Makes a join token for `name`, valid `ttl_ms` from `now_ms` (`reenroll`: it may replace
/// the certificate of an agent of that name).
pub fn new_token(
    name: &str,
    by: &str,
    now_ms: i64,
    ttl_ms: i64,
    reenroll: bool,
) -> Result<NewToken, Status> {
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
            reenroll,
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
    /// Attempts per source address and minute.
    attempts: Ledger,
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
            attempts: Ledger::new(ENROLL_ATTEMPTS_PER_MINUTE),
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
        let reserved = [self.orchestrator_name.as_str()];
        let dir = &self.config.pki_dir;
        // The request is checked and signed before the token is spent: a refused request
        // leaves the token usable.
        let (name, cert_pem, reenroll) = self
            .state
            .redeem_join_token(id, &sha256(secret), from, now, |name, reenroll| {
                let issue = IssueRequest::new(name, Role::Agent, self.config.certificate_days);
                pki::sign_agent_request(dir, &req.csr_pem, &issue, reenroll, &reserved)
                    .map(|cert| (name.to_string(), cert, reenroll))
            })
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|refusal| Status::unauthenticated(refusal.to_string()))?
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let replaced = pki::install_agent_cert(dir, &name, &cert_pem, reenroll, &reserved)
            .map_err(|e| Status::failed_precondition(e.to_string()))?;
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
        let remote = request.remote_addr();
        let from = remote.map_or_else(|| "-".to_string(), |a| a.to_string());
        // Bounded before anything is read, audited or logged: a source's first attempts of a
        // minute are processed, the rest refused unprocessed and counted (said once in the
        // log, and with the source's next audited attempt).
        let source = remote.map_or_else(|| "-".to_string(), |a| a.ip().to_string());
        let counted_before = match self.attempts.account(&source, self.clock.now_ms()) {
            Account::Itemize(n) => n,
            Account::FirstCounted => {
                tracing::warn!(%source, "more than {ENROLL_ATTEMPTS_PER_MINUTE} enrollment attempts from one address this minute: the rest are refused unprocessed");
                return Err(Status::resource_exhausted(TOO_MANY));
            }
            Account::Counted => return Err(Status::resource_exhausted(TOO_MANY)),
        };
        let req = request.into_inner();
        let id = parse_token(&req.token).map_or("-", |(id, _)| id);
        let result = self.enroll_now(&req, &from);
        let (outcome, mut detail) = match &result {
            Ok(_) => ("ok", String::new()),
            Err(s) if s.code() == tonic::Code::Unauthenticated => ("denied", s.message().into()),
            Err(s) => ("error", s.message().into()),
        };
        if counted_before > 0 {
            detail.push_str(&format!(
                " ({counted_before} more attempts from {source} in the previous minute were \
                 refused unprocessed)"
            ));
        }
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

    /// A clock the test sets.
    struct SetClock(std::sync::atomic::AtomicI64);

    impl Clock for SetClock {
        fn now_ms(&self) -> i64 {
            self.0.load(std::sync::atomic::Ordering::Relaxed)
        }
        fn sleep(&self, ms: u64) -> crate::clock::Sleep {
            Box::pin(tokio::time::sleep(std::time::Duration::from_millis(ms)))
        }
    }

    /// A tracing writer keeping what it is given.
    #[derive(Clone, Default)]
    struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn from(ip: &str) -> Request<EnrollRequest> {
        let mut request = Request::new(EnrollRequest {
            token: "bmj1.0011223344556677.00112233445566778899aabbccddeeff".into(),
            csr_pem: "not a request".into(),
        });
        request
            .extensions_mut()
            .insert(tonic::transport::server::TcpConnectInfo {
                local_addr: None,
                remote_addr: Some(format!("{ip}:40000").parse().unwrap()),
            });
        request
    }

    #[test]
    fn an_enrollment_flood_leaves_the_state_db_and_the_log_within_bounds() {
        let dir = tempfile::tempdir().unwrap();
        let pki_dir = dir.path().join("pki");
        pki::init_dir(&pki_dir).unwrap();
        let db = dir.path().join("state.db");
        let state = Arc::new(State::open(&db).unwrap());
        let clock = Arc::new(SetClock(std::sync::atomic::AtomicI64::new(
            1_700_000_000_000,
        )));
        let roots = bmfleet_proto::tls::load_roots(&pki_dir.join(pki::CA_CERT_FILE)).unwrap();
        let api = EnrollmentApi::new(
            state.clone(),
            clock.clone(),
            EnrollmentConfig {
                listen: "127.0.0.1:0".parse().unwrap(),
                advertise: None,
                pki_dir,
                certificate_days: 30,
                token_ttl_secs: 900,
                token_max_ttl_secs: 86_400,
            },
            "orchestrator".into(),
            Arc::new(TrustStore::new(roots, None).unwrap()),
        );
        let log = Captured::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer({
                let log = log.clone();
                move || log.clone()
            })
            .with_ansi(false)
            .finish();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let audited = || state.audit_log(100_000, i64::MAX).unwrap().len();
        tracing::subscriber::with_default(subscriber, || {
            runtime.block_on(async {
                // 30,000 bogus calls from one address within a minute.
                let mut exhausted = 0;
                for _ in 0..30_000 {
                    let refused = api.enroll(from("198.18.7.7")).await.unwrap_err();
                    if refused.code() == tonic::Code::ResourceExhausted {
                        exhausted += 1;
                    }
                }
                assert_eq!(exhausted, 30_000 - ENROLL_ATTEMPTS_PER_MINUTE as usize);
                // Another address is not locked out by the flood.
                let other = api.enroll(from("198.18.7.8")).await.unwrap_err();
                assert_eq!(other.code(), tonic::Code::Unauthenticated, "{other:?}");
            })
        });
        // Bounded: one audit row per processed attempt, one log line per refusal and one for
        // the flood.
        let bound = ENROLL_ATTEMPTS_PER_MINUTE as usize + 1;
        assert_eq!(audited(), bound);
        let text = String::from_utf8(log.0.lock().unwrap().clone()).unwrap();
        assert!(
            text.lines().count() <= bound + 1,
            "{} log lines",
            text.lines().count()
        );
        assert!(text.contains("the rest are refused unprocessed"), "{text}");
        let size = std::fs::metadata(&db).unwrap().len()
            + std::fs::metadata(db.with_extension("db-wal")).map_or(0, |m| m.len());
        assert!(size < 1 << 20, "state DB {size} bytes after the flood");
        // The next minute, the source's first attempt is audited with the count.
        clock
            .0
            .fetch_add(60_000, std::sync::atomic::Ordering::Relaxed);
        runtime.block_on(async {
            api.enroll(from("198.18.7.7")).await.unwrap_err();
        });
        let newest = state.audit_log(1, i64::MAX).unwrap();
        assert!(
            newest[0].detail.contains(&format!(
                "{} more attempts from 198.18.7.7 in the previous minute were refused unprocessed",
                30_000 - ENROLL_ATTEMPTS_PER_MINUTE
            )),
            "{:?}",
            newest[0]
        );
    }

    #[test]
    fn tokens_parse_back_and_hold_no_secret_in_storage() {
        let t = new_token("origin-1", "operator", 1_000, 60_000, false).unwrap();
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
