//! Mutual TLS for every fleet connection.
//!
//! Servers ([`TlsAcceptor`]) accept only clients whose certificate the fleet CA signed and that
//! is valid now; each service then checks the caller's *role* per call ([`require_role`]), so a
//! refused caller learns exactly why. Clients ([`connect`]) check that the server's certificate
//! carries the name and role they expect for that address, not merely that the CA signed it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use serde::Deserialize;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status};

use crate::identity::{peer_identity, IdentityError, PeerIdentity, Role};

/// How long a TLS handshake may take before the connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a process finds its fleet identity: the CA bundle, its certificate and its key.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// The fleet CA certificate(s), PEM (a bundle eases CA rotation).
    pub ca: PathBuf,
    /// This process's certificate, PEM.
    pub cert: PathBuf,
    /// This process's private key, PEM.
    pub key: PathBuf,
    /// The fleet's certificate revocation list (`bmctl fleet pki revoke` writes it); read at
    /// start and on SIGHUP. Absent: nothing is revoked.
    #[serde(default)]
    pub crl: Option<PathBuf>,
}

/// Why a TLS identity or connection could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or holds no PEM of the expected kind.
    #[error("{path}: {detail}")]
    File {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        detail: String,
    },
    /// The certificate does not state a fleet identity.
    #[error("{path}: {source}")]
    Identity {
        /// The certificate file.
        path: PathBuf,
        /// Why.
        source: IdentityError,
    },
    /// The certificate states another role than this process needs.
    #[error("{path} is a certificate for {identity}, but this process needs role {needed}: issue one with `bmctl fleet pki issue --role {needed}`")]
    WrongRole {
        /// The certificate file.
        path: PathBuf,
        /// What it says.
        identity: PeerIdentity,
        /// What was needed.
        needed: Role,
    },
    /// rustls refused the configuration (key does not match certificate, bad CA…).
    #[error("TLS configuration: {0}")]
    Config(String),
    /// The address is not usable for a connection.
    #[error("invalid address '{address}': {detail}")]
    Address {
        /// The address given.
        address: String,
        /// Why.
        detail: String,
    },
}

/// What a process trusts: the fleet CA roots, less what the fleet's revocation list names.
/// The list is re-read by [`TrustStore::reload`] (on SIGHUP); every handshake after that
/// uses it.
pub struct TrustStore {
    roots: Arc<RootCertStore>,
    crl: Option<PathBuf>,
    current: std::sync::RwLock<Verifiers>,
}

struct Verifiers {
    client: Arc<dyn rustls::server::danger::ClientCertVerifier>,
    server: Arc<WebPkiServerVerifier>,
    revoked: usize,
}

impl std::fmt::Debug for TrustStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrustStore")
            .field("crl", &self.crl)
            .finish_non_exhaustive()
    }
}

impl TrustStore {
    /// `roots`, less the certificates `crl` (a PEM file) revokes.
    pub fn new(roots: Arc<RootCertStore>, crl: Option<PathBuf>) -> Result<Self, TlsError> {
        let current = Self::verifiers(&roots, crl.as_deref())?;
        Ok(TrustStore {
            roots,
            crl,
            current: std::sync::RwLock::new(current),
        })
    }

    fn verifiers(roots: &Arc<RootCertStore>, crl: Option<&Path>) -> Result<Verifiers, TlsError> {
        let crls = match crl {
            Some(path) => {
                let file_err = |detail: String| TlsError::File {
                    path: path.to_path_buf(),
                    detail,
                };
                rustls::pki_types::CertificateRevocationListDer::pem_file_iter(path)
                    .map_err(|e| file_err(format!("cannot read the revocation list: {e}")))?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| file_err(format!("not a revocation list: {e}")))?
            }
            None => Vec::new(),
        };
        let revoked = crls
            .iter()
            .filter_map(|c| {
                x509_parser::parse_x509_crl(c)
                    .ok()
                    .map(|(_, l)| l.iter_revoked_certificates().count())
            })
            .sum();
        let client = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
            .with_crls(crls.clone())
            .only_check_end_entity_revocation()
            .allow_unknown_revocation_status()
            .build()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let server = WebPkiServerVerifier::builder_with_provider(roots.clone(), provider())
            .with_crls(crls)
            .only_check_end_entity_revocation()
            .allow_unknown_revocation_status()
            .build()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        Ok(Verifiers {
            client,
            server,
            revoked,
        })
    }

    /// Re-reads the revocation list; returns how many certificates it revokes. On an error
    /// the list in force stays.
    pub fn reload(&self) -> Result<usize, TlsError> {
        let fresh = Self::verifiers(&self.roots, self.crl.as_deref())?;
        let revoked = fresh.revoked;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = fresh;
        Ok(revoked)
    }

    /// Whether a client's certificate chain (as its handshake presented it) is still trusted
    /// now: unexpired and not revoked by the revocation list in force (re-read by
    /// [`TrustStore::reload`]). A connection admitted earlier asks this to outlive neither.
    pub fn still_trusts_client(
        &self,
        chain: &[rustls::pki_types::CertificateDer<'static>],
    ) -> bool {
        let Some((end_entity, intermediates)) = chain.split_first() else {
            return false;
        };
        self.client()
            .verify_client_cert(end_entity, intermediates, UnixTime::now())
            .is_ok()
    }

    fn client(&self) -> Arc<dyn rustls::server::danger::ClientCertVerifier> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .client
            .clone()
    }

    fn server(&self) -> Arc<WebPkiServerVerifier> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .server
            .clone()
    }
}

/// The client-certificate check of a server: the trust store's current one.
#[derive(Debug)]
struct FleetClientVerifier(Arc<TrustStore>);

impl rustls::server::danger::ClientCertVerifier for FleetClientVerifier {
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        // Fixed for the process's life (the roots never change): the first verifier's.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        self.0
            .client()
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.client().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.client().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.client().supported_verify_schemes()
    }
}

/// A loaded identity: the fleet CA roots, this process's certificate chain and key.
#[derive(Clone)]
pub struct LocalIdentity {
    roots: Arc<RootCertStore>,
    trust: Arc<TrustStore>,
    chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
    identity: PeerIdentity,
}

impl std::fmt::Debug for LocalIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalIdentity")
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads every certificate of a PEM file as trust roots.
pub fn load_roots(path: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let file_err = |detail: String| TlsError::File {
        path: path.to_path_buf(),
        detail,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err(e.to_string()))?;
    if certs.is_empty() {
        return Err(file_err("no certificate in this file".into()));
    }
    let mut roots = RootCertStore::empty();
    for cert in certs {
        roots
            .add(cert)
            .map_err(|e| file_err(format!("not a usable CA certificate: {e}")))?;
    }
    Ok(Arc::new(roots))
}

impl LocalIdentity {
    /// Loads the identity files and checks that the certificate is for `role`.
    pub fn load(files: &TlsFiles, role: Role) -> Result<Self, TlsError> {
        let roots = load_roots(&files.ca)?;
        let file_err = |path: &Path, detail: String| TlsError::File {
            path: path.to_path_buf(),
            detail,
        };
        let chain = CertificateDer::pem_file_iter(&files.cert)
            .map_err(|e| file_err(&files.cert, e.to_string()))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| file_err(&files.cert, e.to_string()))?;
        let leaf = chain
            .first()
            .ok_or_else(|| file_err(&files.cert, "no certificate in this file".into()))?;
        let identity = peer_identity(leaf).map_err(|source| TlsError::Identity {
            path: files.cert.clone(),
            source,
        })?;
        if identity.role != role {
            return Err(TlsError::WrongRole {
                path: files.cert.clone(),
                identity,
                needed: role,
            });
        }
        let key = PrivateKeyDer::from_pem_file(&files.key)
            .map_err(|e| file_err(&files.key, format!("no usable private key: {e}")))?;
        let trust = Arc::new(TrustStore::new(roots.clone(), files.crl.clone())?);
        Ok(LocalIdentity {
            trust,
            roots,
            chain,
            key: Arc::new(key),
            identity,
        })
    }

    /// The name and role this identity's certificate states.
    pub fn identity(&self) -> &PeerIdentity {
        &self.identity
    }

    /// The fleet CA roots.
    pub fn roots(&self) -> Arc<RootCertStore> {
        self.roots.clone()
    }

    /// What this identity trusts (reload its revocation list on SIGHUP).
    pub fn trust(&self) -> Arc<TrustStore> {
        self.trust.clone()
    }

    /// A server configuration that requires a client certificate signed by the fleet CA and
    /// not revoked.
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let verifier = Arc::new(FleetClientVerifier(self.trust.clone()));
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| TlsError::Config(format!("certificate and key do not match: {e}")))?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }

    /// A server configuration asking no client certificate: only for the enrollment listener,
    /// whose callers have none yet and prove themselves with a join token instead.
    pub fn server_config_without_client_auth(&self) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| TlsError::Config(format!("certificate and key do not match: {e}")))?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }

    /// A client configuration presenting this identity, accepting only servers of `role`.
    pub fn client_config(&self, role: Role) -> Result<Arc<rustls::ClientConfig>, TlsError> {
        client_config_with(self.trust.clone(), Some(self), role)
    }
}

/// A client configuration trusting `roots`, presenting `identity` (or no certificate at all),
/// and accepting only a server certificate of `server_role` whose name is the one dialled.
pub fn client_config(
    roots: Arc<RootCertStore>,
    identity: Option<&LocalIdentity>,
    server_role: Role,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let trust = match identity {
        Some(id) => id.trust.clone(),
        None => Arc::new(TrustStore::new(roots, None)?),
    };
    client_config_with(trust, identity, server_role)
}

fn client_config_with(
    trust: Arc<TrustStore>,
    identity: Option<&LocalIdentity>,
    server_role: Role,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(FleetServerVerifier {
            trust,
            role: server_role,
        }));
    let mut config = match identity {
        Some(id) => builder
            .with_client_auth_cert(id.chain.clone(), id.key.clone_key())
            .map_err(|e| TlsError::Config(format!("certificate and key do not match: {e}")))?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// A server certificate that the CA signed but that is not the peer we meant to reach.
#[derive(thiserror::Error)]
pub enum PeerMismatch {
    /// The certificate's role is not the one expected at this address.
    #[error("the server's certificate is for {found}, expected role {expected}")]
    WrongRole {
        /// What the certificate says.
        found: PeerIdentity,
        /// The role expected.
        expected: Role,
    },
    /// The certificate names another peer.
    #[error("the server's certificate names {found}, expected '{expected}' at this address")]
    WrongName {
        /// What the certificate says.
        found: PeerIdentity,
        /// The name expected.
        expected: String,
    },
    /// The certificate states no fleet identity.
    #[error("the server's certificate is not a fleet identity: {0}")]
    NoIdentity(IdentityError),
}

// rustls prints the cause of a refused certificate with `Debug`: make that the sentence.
impl std::fmt::Debug for PeerMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

/// Verifies a server certificate as WebPKI does for the dialled name, then checks that its
/// subject names exactly that peer with the expected role.
#[derive(Debug)]
struct FleetServerVerifier {
    trust: Arc<TrustStore>,
    role: Role,
}

fn mismatch(e: PeerMismatch) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(e))))
}

impl ServerCertVerifier for FleetServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.trust.server().verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        let found = peer_identity(end_entity).map_err(|e| mismatch(PeerMismatch::NoIdentity(e)))?;
        if found.role != self.role {
            return Err(mismatch(PeerMismatch::WrongRole {
                found,
                expected: self.role,
            }));
        }
        let expected = server_name.to_str();
        if found.name != expected {
            return Err(mismatch(PeerMismatch::WrongName {
                found,
                expected: expected.into_owned(),
            }));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.trust
            .server()
            .verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.trust
            .server()
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.trust.server().supported_verify_schemes()
    }
}

/// A lazily connecting gRPC channel to `address` (host:port) over mutual TLS, accepting only a
/// server whose certificate names `expected_name`. Connection errors surface on the first call.
/// `connect_timeout` bounds connecting; each call sets its own deadline (a database move
/// takes minutes, a health check seconds).
pub fn connect(
    address: &str,
    expected_name: &str,
    config: Arc<rustls::ClientConfig>,
    connect_timeout: Duration,
) -> Result<Channel, TlsError> {
    let addr_err = |detail: String| TlsError::Address {
        address: address.to_string(),
        detail,
    };
    let server_name = ServerName::try_from(expected_name.to_string())
        .map_err(|e| addr_err(format!("expected peer name '{expected_name}': {e}")))?;
    let endpoint = Endpoint::from_shared(format!("http://{address}"))
        .map_err(|e| addr_err(e.to_string()))?
        .connect_timeout(connect_timeout);
    let target = address.to_string();
    let connector = tower::service_fn(move |_uri: tonic::transport::Uri| {
        let (config, server_name, target) = (config.clone(), server_name.clone(), target.clone());
        async move {
            let tcp = TcpStream::connect(target.as_str()).await?;
            tcp.set_nodelay(true)?;
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(server_name, tcp)
                .await?;
            Ok::<_, std::io::Error>(TokioIo::new(tls))
        }
    });
    Ok(endpoint.connect_with_connector_lazy(connector))
}

/// Accepted TLS connections, ready for `tonic::transport::Server::serve_with_incoming`.
pub type TlsIncoming = tokio_stream::wrappers::ReceiverStream<
    Result<crate::admission::Admitted<tokio_rustls::server::TlsStream<TcpStream>>, std::io::Error>,
>;

/// A gRPC server builder with the fleet's bounds on every connection: HTTP/2 keepalive pings
/// (a silent peer is dropped), and a cap on concurrent streams per connection.
pub fn bounded_server() -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .max_concurrent_streams(Some(64))
}

/// How long a connection whose certificate has another role than the listener's lasts: long
/// enough to be told why its calls are refused, not long enough to be held.
pub const FOREIGN_ROLE_LIFETIME: Duration = Duration::from_secs(10);

/// How a TLS listener admits connections.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// Connections held at once, in all and per peer address (checked before the handshake).
    pub limits: crate::admission::Limits,
    /// The role the listener serves: connections with another role's certificate are closed
    /// after [`FOREIGN_ROLE_LIFETIME`].
    pub role: Option<Role>,
}

/// Accepts TCP connections on `listener` within `policy`'s limits (others are closed at once)
/// and completes their TLS handshakes concurrently, each within [`HANDSHAKE_TIMEOUT`].
/// Refused handshakes are logged with the peer's address and the reason, and dropped.
pub fn accept_tls(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    policy: Policy,
) -> TlsIncoming {
    accept_tls_reserving(listener, config, policy, Vec::new())
}

/// As [`accept_tls`], with places kept for `reserved` addresses (the orchestrator's, on an
/// agent): connections from them are admitted outside the total, so strangers filling the
/// listener cannot lock them out.
pub fn accept_tls_reserving(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    policy: Policy,
    reserved: Vec<std::net::IpAddr>,
) -> TlsIncoming {
    let (tx, rx) = mpsc::channel(64);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let admission = crate::admission::Admission::reserving(policy.limits, reserved);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                _ = tx.closed() => return,
            };
            let ticket = match admission.admit(peer.ip()) {
                Ok(t) => t,
                Err(e) => {
                    tracing::debug!(%peer, reason = %e, "connection closed on arrival");
                    continue;
                }
            };
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                let _ = tcp.set_nodelay(true);
                let accepting = acceptor.accept(tcp).into_fallible();
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, accepting).await {
                    Ok(Ok(tls)) => {
                        let role = tls
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|c| c.first())
                            .and_then(|c| peer_identity(c).ok())
                            .map(|id| id.role);
                        let mut conn = crate::admission::Admitted::new(tls, ticket);
                        if policy.role.is_some() && role != policy.role {
                            conn = conn.expire_after(FOREIGN_ROLE_LIFETIME);
                        }
                        let _ = tx.send(Ok(conn)).await;
                    }
                    Ok(Err((e, tcp))) => {
                        log_refused(peer, &e);
                        linger(tcp).await;
                    }
                    Err(_) => tracing::warn!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// After a refused handshake (its alert written): the write side is closed and what the
/// client already sent (with TLS 1.3 its certificate is judged after its Finished, often with
/// its first request behind it) is read away, a second at most, before the socket closes.
/// Closed with unread bytes, the kernel would send a reset, and a reset can discard the alert
/// before the client reads it: the client would learn only "connection closed", not why.
async fn linger(mut tcp: TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = tcp.shutdown().await;
    let mut sink = [0u8; 4096];
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let mut read = 0usize;
        while read < 1 << 20 {
            match tcp.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => read += n,
            }
        }
    })
    .await;
}

fn log_refused(peer: SocketAddr, e: &std::io::Error) {
    tracing::warn!(%peer, reason = %crate::error_chain::describe(e), "refused a TLS connection");
}

/// The fleet identity of the caller of a gRPC request, from its TLS client certificate.
pub fn caller_identity<T>(request: &Request<T>) -> Result<PeerIdentity, Status> {
    let certs = request
        .peer_certs()
        .ok_or_else(|| Status::unauthenticated("no client certificate on this connection"))?;
    let leaf = certs
        .first()
        .ok_or_else(|| Status::unauthenticated("no client certificate on this connection"))?;
    peer_identity(leaf).map_err(|e| Status::unauthenticated(e.to_string()))
}

/// The caller's identity if its role is `allowed`, else `PermissionDenied` saying who was
/// refused and what `api` accepts.
pub fn require_role<T>(
    request: &Request<T>,
    allowed: Role,
    api: &str,
) -> Result<PeerIdentity, Status> {
    let who = caller_identity(request)?;
    if who.role != allowed {
        tracing::warn!(caller = %who, api, "refused a call: wrong role");
        return Err(Status::permission_denied(format!(
            "certificate {who} may not call the {api}: it accepts only role {allowed}"
        )));
    }
    Ok(who)
}

/// A tonic interceptor admitting only callers of one role (used for the Agent API), and, when
/// `names` is set, only those certificate names of it (an agent accepts only the
/// orchestrator(s) its configuration lists).
#[derive(Debug, Clone)]
pub struct RoleGate {
    /// The only role admitted.
    pub allowed: Role,
    /// The API's name, for messages.
    pub api: &'static str,
    /// The names admitted; empty: any name of the role.
    pub names: Arc<Vec<String>>,
}

impl tonic::service::Interceptor for RoleGate {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let who = require_role(&request, self.allowed, self.api)?;
        if !self.names.is_empty() && !self.names.contains(&who.name) {
            tracing::warn!(caller = %who, api = self.api, "refused a call: not a listed name");
            return Err(Status::permission_denied(format!(
                "certificate {who} may not call the {api}: it accepts only {role} {names}",
                api = self.api,
                role = self.allowed,
                names = self
                    .names
                    .iter()
                    .map(|n| format!("'{n}'"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        Ok(request)
    }
}
