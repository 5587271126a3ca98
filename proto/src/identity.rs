//! Fleet identities: a certificate's subject carries the holder's name (CN) and its role (OU).
//!
//! The role decides what a peer may do: only the orchestrator drives agents, only operators
//! call the Fleet API, and an agent's certificate can drive nothing.

use std::fmt;
use std::str::FromStr;

use rustls::pki_types::CertificateDer;
use x509_parser::prelude::{FromDer, X509Certificate};

/// The organisation every fleet certificate names in its subject.
pub const FLEET_ORGANIZATION: &str = "bmfleet";

/// What a certificate's holder is allowed to be in the fleet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// The central service: drives agents, serves the Fleet API.
    Orchestrator,
    /// An origin or target host's agent: serves the Agent API.
    Agent,
    /// A person or tool using `bmctl`: calls the Fleet API.
    Operator,
}

impl Role {
    /// The role as written in certificates and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Orchestrator => "orchestrator",
            Role::Agent => "agent",
            Role::Operator => "operator",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A role name that is not one of orchestrator, agent, operator.
#[derive(Debug, thiserror::Error)]
#[error("unknown role '{0}': expected orchestrator, agent or operator")]
pub struct UnknownRole(pub String);

impl FromStr for Role {
    type Err = UnknownRole;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "orchestrator" => Ok(Role::Orchestrator),
            "agent" => Ok(Role::Agent),
            "operator" => Ok(Role::Operator),
            other => Err(UnknownRole(other.to_string())),
        }
    }
}

/// The name and role a fleet certificate states.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    /// The subject's common name: the agent, orchestrator or operator name.
    pub name: String,
    /// The subject's organisational unit, parsed.
    pub role: Role,
}

impl fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "'{}' (role {})", self.name, self.role)
    }
}

/// Why a certificate does not state a usable fleet identity.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The DER could not be parsed as X.509.
    #[error("certificate is not valid X.509: {0}")]
    Unparsable(String),
    /// No common name in the subject.
    #[error("certificate subject has no common name (CN): it was not issued by bmctl fleet pki")]
    NoName,
    /// No organisational unit in the subject.
    #[error(
        "certificate '{0}' carries no role (subject OU): it was not issued by bmctl fleet pki"
    )]
    NoRole(String),
    /// The organisational unit is not a role.
    #[error("certificate '{name}' carries an unknown role: {source}")]
    BadRole {
        /// The certificate's name.
        name: String,
        /// The parse error.
        source: UnknownRole,
    },
}

/// Reads the fleet identity (CN = name, OU = role) out of a DER certificate.
pub fn peer_identity(cert: &CertificateDer<'_>) -> Result<PeerIdentity, IdentityError> {
    let (_, x509) = X509Certificate::from_der(cert.as_ref())
        .map_err(|e| IdentityError::Unparsable(e.to_string()))?;
    let subject = x509.subject();
    let name = subject
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .ok_or(IdentityError::NoName)?
        .to_string();
    let role = subject
        .iter_organizational_unit()
        .next()
        .and_then(|ou| ou.as_str().ok())
        .ok_or_else(|| IdentityError::NoRole(name.clone()))?;
    let role = role.parse().map_err(|source| IdentityError::BadRole {
        name: name.clone(),
        source,
    })?;
    Ok(PeerIdentity { name, role })
}

/// Checks that a fleet name is usable as a certificate name and a DNS name: 1 to 63
/// characters of lowercase letters, digits, '-' and '.', starting and ending alphanumeric.
pub fn validate_name(name: &str) -> Result<(), String> {
    let ok_chars = name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.');
    let ends_ok = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric())
        && name
            .chars()
            .last()
            .is_some_and(|c| c.is_ascii_alphanumeric());
    if name.is_empty() || name.len() > 63 || !ok_chars || !ends_ok || name.contains("..") {
        return Err(format!(
            "invalid name '{name}': use 1 to 63 lowercase letters, digits, '-' and '.', \
             starting and ending with a letter or digit"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_round_trip_and_unknown_is_refused() {
        for role in [Role::Orchestrator, Role::Agent, Role::Operator] {
            assert_eq!(role.as_str().parse::<Role>().unwrap(), role);
        }
        let err = "admin".parse::<Role>().unwrap_err();
        assert!(err.to_string().contains("'admin'"));
    }

    #[test]
    fn names_are_dns_safe() {
        for good in ["agent-1", "origin.mail-03", "o", "a1.b2"] {
            assert!(validate_name(good).is_ok(), "{good}");
        }
        for bad in ["", "-a", "a-", "A", "a b", "a/b", "a..b", &"x".repeat(64)] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }
}
