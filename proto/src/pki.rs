//! The fleet PKI: one CA per fleet signs the orchestrator, every agent and every operator.
//!
//! Layout of a PKI directory: `ca.pem` (the CA's certificate), `crl.pem` (the fleet's
//! revocation list), `private/ca-key.pem` (the CA's key, in a 0700 directory of its own, apart
//! from the issued keys), then `NAME.pem` and `NAME-key.pem` per issued identity. Private keys
//! are written mode 0600; no certificate or key is ever overwritten (the revocation list is
//! replaced as a whole on each revocation).

use std::fs::OpenOptions;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

use crate::identity::{validate_name, Role, FLEET_ORGANIZATION};

/// CA certificate file name inside a PKI directory.
pub const CA_CERT_FILE: &str = "ca.pem";
/// CA private key file inside a PKI directory (in a 0700 directory of its own).
pub const CA_KEY_FILE: &str = "private/ca-key.pem";
/// The fleet's certificate revocation list inside a PKI directory.
pub const CRL_FILE: &str = "crl.pem";
/// How long a fleet CA is valid.
pub const CA_VALIDITY_DAYS: i64 = 3650;
/// Default validity of an issued certificate.
pub const DEFAULT_VALIDITY_DAYS: u32 = 397;

/// What can go wrong making or using the fleet PKI.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// A file that would be written exists already.
    #[error("{0} already exists: refusing to overwrite it (move it away first if you mean to replace it)")]
    Exists(PathBuf),
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The CA files are missing or unreadable.
    #[error(
        "no usable fleet CA in {dir}: {detail} (run `bmctl fleet pki init --dir {dir}` first)"
    )]
    NoCa {
        /// The PKI directory.
        dir: PathBuf,
        /// What was wrong.
        detail: String,
    },
    /// The request is invalid (name, validity).
    #[error("{0}")]
    Invalid(String),
    /// rcgen refused to build the certificate.
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
}

/// A fleet CA held in memory, able to issue certificates.
pub struct FleetCa {
    cert_pem: String,
    key_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// What to put in an issued certificate.
#[derive(Debug, Clone)]
pub struct IssueRequest {
    /// The holder's fleet name (subject CN, and a DNS SAN).
    pub name: String,
    /// The holder's role (subject OU).
    pub role: Role,
    /// Extra DNS names.
    pub dns: Vec<String>,
    /// IP addresses.
    pub ips: Vec<IpAddr>,
    /// Start of validity.
    pub not_before: OffsetDateTime,
    /// End of validity.
    pub not_after: OffsetDateTime,
}

impl IssueRequest {
    /// A request valid from five minutes ago (clock skew) for `days` days.
    pub fn new(name: &str, role: Role, days: u32) -> Self {
        let now = OffsetDateTime::now_utc();
        IssueRequest {
            name: name.to_string(),
            role,
            dns: Vec::new(),
            ips: Vec::new(),
            not_before: now - Duration::minutes(5),
            not_after: now + Duration::days(i64::from(days)),
        }
    }
}

/// A certificate and its private key, PEM-encoded.
#[derive(Debug, Clone)]
pub struct IssuedCert {
    /// The certificate.
    pub cert_pem: String,
    /// The private key (PKCS#8).
    pub key_pem: String,
}

impl FleetCa {
    /// Makes a new CA (ECDSA P-256, valid ten years).
    pub fn generate(common_name: &str) -> Result<Self, PkiError> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        dn.push(DnType::OrganizationName, FLEET_ORGANIZATION);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::minutes(5);
        params.not_after = now + Duration::days(CA_VALIDITY_DAYS);
        let key = KeyPair::generate()?;
        let key_pem = key.serialize_pem();
        let certified = CertifiedIssuer::self_signed(params, key)?;
        let cert_pem = certified.pem();
        Self::from_pem(&cert_pem, &key_pem)
    }

    /// Loads a CA from its certificate and key PEM.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let key = KeyPair::from_pem(key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)?;
        Ok(FleetCa {
            cert_pem: cert_pem.to_string(),
            key_pem: key_pem.to_string(),
            issuer,
        })
    }

    /// Loads the CA of a PKI directory.
    pub fn load(dir: &Path) -> Result<Self, PkiError> {
        let read = |file: &str| {
            std::fs::read_to_string(dir.join(file)).map_err(|e| PkiError::NoCa {
                dir: dir.to_path_buf(),
                detail: format!("{file}: {e}"),
            })
        };
        if !dir.join(CA_KEY_FILE).exists() && dir.join("ca-key.pem").exists() {
            return Err(PkiError::NoCa {
                dir: dir.to_path_buf(),
                detail: format!(
                    "the CA key is beside the issued keys: move ca-key.pem to {CA_KEY_FILE} \
                     (mkdir -m 0700 private; mv ca-key.pem {CA_KEY_FILE})"
                ),
            });
        }
        let (cert, key) = (read(CA_CERT_FILE)?, read(CA_KEY_FILE)?);
        Self::from_pem(&cert, &key).map_err(|e| PkiError::NoCa {
            dir: dir.to_path_buf(),
            detail: e.to_string(),
        })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Issues a certificate for a fleet identity (server and client use, so agents can serve
    /// and dial, and the orchestrator can serve bmctl and dial agents).
    pub fn issue(&self, req: &IssueRequest) -> Result<IssuedCert, PkiError> {
        let params = certificate_params(req)?;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Signs the public key of a PKCS#10 request (PEM) whose subject CN is `req.name`. Only
    /// the request's key is taken (its signature proves the holder has the private key):
    /// names, role, usages and validity all come from `req`.
    pub fn sign_request(&self, csr_pem: &str, req: &IssueRequest) -> Result<String, PkiError> {
        let csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| {
            PkiError::Invalid(format!(
                "the signing request is not a valid PKCS#10 request: {e}"
            ))
        })?;
        let cn = csr
            .params
            .distinguished_name
            .get(&DnType::CommonName)
            .and_then(dn_text)
            .unwrap_or_default();
        if cn != req.name {
            return Err(PkiError::Invalid(format!(
                "the signing request names '{cn}', the token was issued for '{}'",
                req.name
            )));
        }
        let params = certificate_params(req)?;
        Ok(params.signed_by(&csr.public_key, &self.issuer)?.pem())
    }

    /// Writes the CA into a new PKI directory (created if needed), with an empty revocation
    /// list. Refuses if a CA is there.
    pub fn write_new(&self, dir: &Path) -> Result<(), PkiError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| PkiError::Io { path, source }
        };
        let (cert, key) = (dir.join(CA_CERT_FILE), dir.join(CA_KEY_FILE));
        refuse_existing(&[&cert, &key, &dir.join("ca-key.pem")])?;
        let private = dir.join("private");
        std::fs::create_dir_all(&private).map_err(io(&private))?;
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700))
            .map_err(io(&private))?;
        write_new_file(&key, &self.key_pem, 0o600)?;
        write_new_file(&cert, &self.cert_pem, 0o644)?;
        self.write_crl(dir, &[])
    }

    /// Signs a revocation list of `revoked` (serial, when) and writes it as the PKI
    /// directory's `crl.pem`, replacing the previous one atomically.
    fn write_crl(&self, dir: &Path, revoked: &[(Vec<u8>, OffsetDateTime)]) -> Result<(), PkiError> {
        let now = OffsetDateTime::now_utc();
        let params = rcgen::CertificateRevocationListParams {
            this_update: now,
            next_update: now + Duration::days(CA_VALIDITY_DAYS),
            crl_number: rcgen::SerialNumber::from_slice(&now.unix_timestamp().to_be_bytes()),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|(serial, at)| rcgen::RevokedCertParams {
                    serial_number: rcgen::SerialNumber::from_slice(serial),
                    revocation_time: *at,
                    reason_code: None,
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        let pem = params.signed_by(&self.issuer)?.pem()?;
        let path = dir.join(CRL_FILE);
        let temporary = dir.join(format!(".{CRL_FILE}.new"));
        let _ = std::fs::remove_file(&temporary);
        write_new_file(&temporary, &pem, 0o644)?;
        std::fs::rename(&temporary, &path).map_err(|source| PkiError::Io { path, source })
    }
}

/// The text of a distinguished-name value, for the string kinds a request may use.
fn dn_text(value: &rcgen::DnValue) -> Option<String> {
    match value {
        rcgen::DnValue::Utf8String(s) => Some(s.clone()),
        rcgen::DnValue::PrintableString(s) => Some(s.as_str().to_string()),
        rcgen::DnValue::Ia5String(s) => Some(s.as_str().to_string()),
        _ => None,
    }
}

/// The parameters of a fleet identity's certificate.
fn certificate_params(req: &IssueRequest) -> Result<CertificateParams, PkiError> {
    validate_name(&req.name).map_err(PkiError::Invalid)?;
    if req.not_after <= req.not_before {
        return Err(PkiError::Invalid(
            "the certificate would expire before it becomes valid".into(),
        ));
    }
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, req.name.as_str());
    dn.push(DnType::OrganizationalUnitName, req.role.as_str());
    dn.push(DnType::OrganizationName, FLEET_ORGANIZATION);
    params.distinguished_name = dn;
    let mut dns = vec![req.name.clone()];
    dns.extend(req.dns.iter().filter(|d| **d != req.name).cloned());
    for name in dns {
        let ia5 = name
            .clone()
            .try_into()
            .map_err(|_| PkiError::Invalid(format!("invalid DNS name '{name}'")))?;
        params.subject_alt_names.push(SanType::DnsName(ia5));
    }
    params
        .subject_alt_names
        .extend(req.ips.iter().map(|ip| SanType::IpAddress(*ip)));
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    params.not_before = req.not_before;
    params.not_after = req.not_after;
    Ok(params)
}

/// A new private key (PEM, PKCS#8) and a signing request for fleet name `name` (made where
/// the key will live: only the request travels).
pub fn signing_request(name: &str) -> Result<(String, String), PkiError> {
    validate_name(name).map_err(PkiError::Invalid)?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    let csr = params.serialize_request(&key)?;
    Ok((key.serialize_pem(), csr.pem()?))
}

/// The enrollment's signing: signs `csr_pem` for `req` with the CA of `dir` and writes the
/// certificate there as `NAME.pem` (so that `pki revoke NAME` works on it). A previous
/// certificate of that name is revoked first (the host re-keyed). Returns the certificate and
/// Names a join token may never carry: the PKI dir's own files (`ca.pem`, `crl.pem`) and
/// every private key's name (`NAME-key.pem`).
fn reserved_file(name: &str) -> bool {
    matches!(name, "ca" | "crl" | "private") || name.ends_with("-key")
}

/// Whether `name` may be enrolled as an agent into `dir`: a new name, or (with `reenroll`,
/// the operator's explicit choice) one whose `NAME.pem` is an agent's certificate. The PKI
/// dir's own files, `reserved` names (the orchestrator's), and any name whose `NAME.pem` is
/// not an agent's certificate (an operator's, the orchestrator's, anything unreadable) are
/// refused. Returns whether an agent's certificate would be replaced.
pub fn check_enrollable(
    dir: &Path,
    name: &str,
    reenroll: bool,
    reserved: &[&str],
) -> Result<bool, PkiError> {
    validate_name(name).map_err(PkiError::Invalid)?;
    if reserved_file(name) || reserved.contains(&name) {
        return Err(PkiError::Invalid(format!(
            "{name:?} is not an agent's name: it is reserved for the fleet's own files or \
             identities (the CA, the revocation list, private keys, the orchestrator)"
        )));
    }
    let path = dir.join(format!("{name}.pem"));
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(source) => return Err(PkiError::Io { path, source }),
    };
    let der = CertificateDer::from_pem_slice(text.as_bytes()).ok();
    let role = der
        .as_ref()
        .and_then(|der| crate::identity::peer_identity(der).ok())
        .map(|id| id.role);
    // A revoked agent's (a decommissioned host's) name is free again.
    let revoked = || -> Result<bool, PkiError> {
        let serial = der
            .as_ref()
            .and_then(|d| x509_parser::parse_x509_certificate(d.as_ref()).ok())
            .map(|(_, c)| c.raw_serial().to_vec());
        Ok(serial.is_some_and(|s| read_revoked(dir).is_ok_and(|r| r.iter().any(|(x, _)| *x == s))))
    };
    match role {
        Some(Role::Agent) if revoked()? => Ok(false),
        Some(Role::Agent) if reenroll => Ok(true),
        Some(Role::Agent) => Err(PkiError::Invalid(format!(
            "an agent named {name:?} is enrolled already; to replace its certificate (a \
             reinstalled host), ask a token that re-enrolls it (--reenroll)"
        ))),
        Some(role) => Err(PkiError::Invalid(format!(
            "{} holds the certificate of {name:?} with role {role}: a join token never \
             replaces it",
            path.display()
        ))),
        None => Err(PkiError::Invalid(format!(
            "{} is not a fleet certificate: a join token never replaces it",
            path.display()
        ))),
    }
}

/// Signs an agent's request for `req.name` (checked as [`check_enrollable`] does) without
/// writing anything: the certificate's PEM.
pub fn sign_agent_request(
    dir: &Path,
    csr_pem: &str,
    req: &IssueRequest,
    reenroll: bool,
    reserved: &[&str],
) -> Result<String, PkiError> {
    if req.role != Role::Agent {
        return Err(PkiError::Invalid("only agents enroll".into()));
    }
    check_enrollable(dir, &req.name, reenroll, reserved)?;
    FleetCa::load(dir)?.sign_request(csr_pem, req)
}

/// Installs an agent's signed certificate as `NAME.pem`, revoking the one it replaces
/// (checked again: the dir may have changed since it was signed). Returns whether one was
/// replaced.
pub fn install_agent_cert(
    dir: &Path,
    name: &str,
    cert_pem: &str,
    reenroll: bool,
    reserved: &[&str],
) -> Result<bool, PkiError> {
    let replaced = check_enrollable(dir, name, reenroll, reserved)?;
    let path = dir.join(format!("{name}.pem"));
    if replaced {
        revoke_in_dir(dir, name)?;
    }
    let temporary = dir.join(format!(".{name}.pem.new"));
    let _ = std::fs::remove_file(&temporary);
    write_new_file(&temporary, cert_pem, 0o644)?;
    std::fs::rename(&temporary, &path).map_err(|source| PkiError::Io { path, source })?;
    Ok(replaced)
}

/// `bmctl fleet pki revoke`: adds `name`'s certificate to the PKI directory's revocation list.
/// Returns the list's path and how many certificates it now revokes.
pub fn revoke_in_dir(dir: &Path, name: &str) -> Result<(PathBuf, usize), PkiError> {
    validate_name(name).map_err(PkiError::Invalid)?;
    let ca = FleetCa::load(dir)?;
    let cert_path = dir.join(format!("{name}.pem"));
    let pem = std::fs::read(&cert_path).map_err(|source| PkiError::Io {
        path: cert_path.clone(),
        source,
    })?;
    let invalid = |detail: String| PkiError::Invalid(format!("{}: {detail}", cert_path.display()));
    let (_, parsed) = x509_parser::pem::parse_x509_pem(&pem).map_err(|e| invalid(e.to_string()))?;
    let cert = parsed.parse_x509().map_err(|e| invalid(e.to_string()))?;
    let serial = cert.raw_serial().to_vec();
    let mut revoked = read_revoked(dir)?;
    if !revoked.iter().any(|(s, _)| *s == serial) {
        revoked.push((serial, OffsetDateTime::now_utc()));
    }
    ca.write_crl(dir, &revoked)?;
    Ok((dir.join(CRL_FILE), revoked.len()))
}

/// The serials and revocation times the PKI directory's revocation list holds (none when it
/// has no list yet).
fn read_revoked(dir: &Path) -> Result<Vec<(Vec<u8>, OffsetDateTime)>, PkiError> {
    let path = dir.join(CRL_FILE);
    let pem = match std::fs::read(&path) {
        Ok(p) => p,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(PkiError::Io { path, source }),
    };
    let invalid = |detail: String| PkiError::Invalid(format!("{}: {detail}", path.display()));
    let (_, parsed) = x509_parser::pem::parse_x509_pem(&pem).map_err(|e| invalid(e.to_string()))?;
    let (_, crl) =
        x509_parser::parse_x509_crl(&parsed.contents).map_err(|e| invalid(e.to_string()))?;
    Ok(crl
        .iter_revoked_certificates()
        .map(|r| {
            let at = OffsetDateTime::from_unix_timestamp(r.revocation_date.timestamp())
                .unwrap_or_else(|_| OffsetDateTime::now_utc());
            (r.raw_serial().to_vec(), at)
        })
        .collect())
}

/// The file paths of an identity issued into a PKI directory.
#[derive(Debug, Clone)]
pub struct IssuedFiles {
    /// `NAME.pem`
    pub cert: PathBuf,
    /// `NAME-key.pem`, mode 0600
    pub key: PathBuf,
    /// `ca.pem`
    pub ca: PathBuf,
}

/// `bmctl fleet pki init`: makes a fleet CA in `dir`, refusing to replace an existing one.
pub fn init_dir(dir: &Path) -> Result<PathBuf, PkiError> {
    refuse_existing(&[&dir.join(CA_CERT_FILE), &dir.join(CA_KEY_FILE)])?;
    // A distinct name per CA: certificate paths are built by issuer name, so two fleets' CAs
    // must never share one.
    let name = format!(
        "bmfleet fleet CA {}",
        OffsetDateTime::now_utc().unix_timestamp_nanos()
    );
    FleetCa::generate(&name)?.write_new(dir)?;
    Ok(dir.join(CA_CERT_FILE))
}

/// `bmctl fleet pki issue`: issues a certificate with the CA of `dir` and writes it there,
/// refusing to replace existing files.
pub fn issue_into_dir(dir: &Path, req: &IssueRequest) -> Result<IssuedFiles, PkiError> {
    validate_name(&req.name).map_err(PkiError::Invalid)?;
    let files = IssuedFiles {
        cert: dir.join(format!("{}.pem", req.name)),
        key: dir.join(format!("{}-key.pem", req.name)),
        ca: dir.join(CA_CERT_FILE),
    };
    refuse_existing(&[&files.cert, &files.key])?;
    let issued = FleetCa::load(dir)?.issue(req)?;
    write_new_file(&files.key, &issued.key_pem, 0o600)?;
    write_new_file(&files.cert, &issued.cert_pem, 0o644)?;
    Ok(files)
}

fn refuse_existing(paths: &[&Path]) -> Result<(), PkiError> {
    match paths.iter().find(|p| p.exists()) {
        Some(p) => Err(PkiError::Exists(p.to_path_buf())),
        None => Ok(()),
    }
}

/// Creates `path` exclusively (never replacing a file) with `mode`, and writes `contents`.
fn write_new_file(path: &Path, contents: &str, mode: u32) -> Result<(), PkiError> {
    let io = |source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                PkiError::Exists(path.to_path_buf())
            } else {
                io(e)
            }
        })?;
    file.write_all(contents.as_bytes()).map_err(io)?;
    file.sync_all().map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::peer_identity;
    use std::os::unix::fs::PermissionsExt;

    /// An enrollment that may re-enroll: signed, then installed.
    fn sign_into_dir(
        dir: &Path,
        csr_pem: &str,
        req: &IssueRequest,
    ) -> Result<(String, bool), PkiError> {
        let cert = sign_agent_request(dir, csr_pem, req, true, &[])?;
        let replaced = install_agent_cert(dir, &req.name, &cert, true, &[])?;
        Ok((cert, replaced))
    }

    #[test]
    fn a_join_token_never_names_the_fleets_own_files_or_another_roles_identity() {
        let dir = tempfile::tempdir().unwrap();
        init_dir(dir.path()).unwrap();
        for (name, role) in [
            ("orchestrator", Role::Orchestrator),
            ("op-1", Role::Operator),
            ("origin-1", Role::Agent),
        ] {
            issue_into_dir(dir.path(), &IssueRequest::new(name, role, 30)).unwrap();
        }
        let before: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .filter(|e| e.path().is_file())
            .map(|e| (e.path(), std::fs::read(e.path()).unwrap()))
            .collect();
        let reserved = ["orchestrator"];
        for (name, reenroll, why) in [
            ("ca", true, "reserved"),
            ("crl", true, "reserved"),
            ("origin-1-key", true, "reserved"),
            ("orchestrator", true, "reserved"),
            ("op-1", true, "role operator"),
            ("origin-1", false, "enrolled already"),
        ] {
            let error = check_enrollable(dir.path(), name, reenroll, &reserved)
                .unwrap_err()
                .to_string();
            assert!(error.contains(why), "{name}: {error}");
            let (_, csr) = signing_request(name).unwrap();
            let req = IssueRequest::new(name, Role::Agent, 30);
            assert!(sign_agent_request(dir.path(), &csr, &req, reenroll, &reserved).is_err());
            assert!(install_agent_cert(dir.path(), name, "x", reenroll, &reserved).is_err());
        }
        // A planted non-certificate under an agent's name is not replaced either.
        std::fs::write(dir.path().join("target-7.pem"), "not a certificate").unwrap();
        let error = check_enrollable(dir.path(), "target-7", true, &reserved).unwrap_err();
        assert!(
            error.to_string().contains("not a fleet certificate"),
            "{error}"
        );
        std::fs::remove_file(dir.path().join("target-7.pem")).unwrap();
        // Nothing was written, revoked or replaced.
        for (path, content) in &before {
            assert_eq!(&std::fs::read(path).unwrap(), content, "{}", path.display());
        }
        assert!(
            !dir.path().join(CRL_FILE).exists() || read_revoked(dir.path()).unwrap().is_empty()
        );
        // A new agent, and an enrolled one when re-enrolling is asked, are fine; a revoked
        // (decommissioned) agent's name is free again.
        assert!(!check_enrollable(dir.path(), "target-1", false, &reserved).unwrap());
        assert!(check_enrollable(dir.path(), "origin-1", true, &reserved).unwrap());
        revoke_in_dir(dir.path(), "origin-1").unwrap();
        assert!(!check_enrollable(dir.path(), "origin-1", false, &reserved).unwrap());
    }

    #[test]
    fn issued_certificate_carries_name_and_role() {
        let ca = FleetCa::generate("test CA").unwrap();
        let issued = ca
            .issue(&IssueRequest::new("origin-1", Role::Agent, 30))
            .unwrap();
        let der = CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).unwrap();
        let id = peer_identity(&der).unwrap();
        assert_eq!(id.name, "origin-1");
        assert_eq!(id.role, Role::Agent);
    }

    #[test]
    fn init_then_issue_writes_private_keys_0600_and_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        init_dir(dir.path()).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir.path().join(CA_KEY_FILE)), 0o600);
        let before = std::fs::read(dir.path().join(CA_KEY_FILE)).unwrap();
        assert!(matches!(init_dir(dir.path()), Err(PkiError::Exists(_))));
        assert_eq!(std::fs::read(dir.path().join(CA_KEY_FILE)).unwrap(), before);

        let req = IssueRequest::new("orchestrator", Role::Orchestrator, 10);
        let files = issue_into_dir(dir.path(), &req).unwrap();
        assert_eq!(mode(&files.key), 0o600);
        assert!(matches!(
            issue_into_dir(dir.path(), &req),
            Err(PkiError::Exists(_))
        ));
    }

    #[test]
    fn a_trust_store_stops_trusting_a_client_once_its_revocation_is_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        init_dir(dir.path()).unwrap();
        let files =
            issue_into_dir(dir.path(), &IssueRequest::new("target-1", Role::Agent, 30)).unwrap();
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        // A list in force already (another agent revoked).
        issue_into_dir(dir.path(), &IssueRequest::new("origin-0", Role::Agent, 30)).unwrap();
        let (crl, _) = revoke_in_dir(dir.path(), "origin-0").unwrap();
        let roots = crate::tls::load_roots(&dir.path().join(CA_CERT_FILE)).unwrap();
        let trust = crate::tls::TrustStore::new(roots, Some(crl)).unwrap();
        assert!(trust.still_trusts_client(&chain));
        assert!(!trust.still_trusts_client(&[]));
        revoke_in_dir(dir.path(), "target-1").unwrap();
        // Trusted until the list in force is re-read.
        assert!(trust.still_trusts_client(&chain));
        trust.reload().unwrap();
        assert!(!trust.still_trusts_client(&chain));
    }

    #[test]
    fn a_signed_request_gets_the_requested_name_and_role_only() {
        let dir = tempfile::tempdir().unwrap();
        init_dir(dir.path()).unwrap();
        let (key_pem, csr_pem) = signing_request("target-9").unwrap();
        let req = IssueRequest::new("target-9", Role::Agent, 30);
        let (cert_pem, replaced) = sign_into_dir(dir.path(), &csr_pem, &req).unwrap();
        assert!(!replaced);
        let der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap();
        let id = peer_identity(&der).unwrap();
        assert_eq!((id.name.as_str(), id.role), ("target-9", Role::Agent));
        // The certificate carries the request's key (the pair works together in TLS).
        let files = crate::tls::TlsFiles {
            ca: dir.path().join(CA_CERT_FILE),
            cert: dir.path().join("target-9.pem"),
            key: dir.path().join("k.pem"),
            crl: None,
        };
        std::fs::write(&files.key, &key_pem).unwrap();
        let identity = crate::tls::LocalIdentity::load(&files, Role::Agent).unwrap();
        identity.server_config().unwrap();
        // A second enrollment of the name revokes the first certificate.
        let (_, csr2) = signing_request("target-9").unwrap();
        let (_, replaced) = sign_into_dir(dir.path(), &csr2, &req).unwrap();
        assert!(replaced);
        assert_eq!(read_revoked(dir.path()).unwrap().len(), 1);
        // A request for another name, or garbage, is refused.
        let (_, other) = signing_request("origin-1").unwrap();
        let err = sign_into_dir(dir.path(), &other, &req)
            .unwrap_err()
            .to_string();
        assert!(err.contains("names 'origin-1'"), "{err}");
        // One base64 character of the signature changed: the request no longer proves
        // possession of its key.
        let end = csr_pem.find("-----END").unwrap();
        let mut at = csr_pem[..end].trim_end().len() - 8;
        while !csr_pem.as_bytes()[at].is_ascii_alphanumeric() {
            at -= 1;
        }
        let mut tampered = csr_pem.clone().into_bytes();
        tampered[at] = if tampered[at] == b'A' { b'B' } else { b'A' };
        let tampered = String::from_utf8(tampered).unwrap();
        assert_ne!(tampered, csr_pem);
        let err = sign_into_dir(dir.path(), &tampered, &req).unwrap_err();
        assert!(err.to_string().contains("not a valid PKCS#10"), "{err}");
    }

    #[test]
    fn issue_without_ca_says_to_run_init() {
        let dir = tempfile::tempdir().unwrap();
        let err = issue_into_dir(dir.path(), &IssueRequest::new("a", Role::Agent, 1)).unwrap_err();
        assert!(err.to_string().contains("bmctl fleet pki init"), "{err}");
    }

    #[test]
    fn revocation_lists_each_certificate_once_and_keeps_earlier_ones() {
        let dir = tempfile::tempdir().unwrap();
        init_dir(dir.path()).unwrap();
        assert_eq!(read_revoked(dir.path()).unwrap().len(), 0);
        for name in ["a", "b"] {
            issue_into_dir(dir.path(), &IssueRequest::new(name, Role::Agent, 30)).unwrap();
        }
        assert_eq!(revoke_in_dir(dir.path(), "a").unwrap().1, 1);
        assert_eq!(revoke_in_dir(dir.path(), "a").unwrap().1, 1);
        assert_eq!(revoke_in_dir(dir.path(), "b").unwrap().1, 2);
        assert!(matches!(
            revoke_in_dir(dir.path(), "nobody"),
            Err(PkiError::Io { .. })
        ));
        let private = std::fs::metadata(dir.path().join("private")).unwrap();
        assert_eq!(private.permissions().mode() & 0o777, 0o700);
    }
}
