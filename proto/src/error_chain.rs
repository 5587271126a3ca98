//! Turning nested transport errors into one line an operator can act on.
//!
//! A refused TLS 1.3 client learns it late: the connection opens and the first call fails
//! with a bare "transport error"; the real reason (a TLS alert, a certificate check) lies deep
//! in the error's `source()` chain, sometimes wrapped inside an `io::Error`.

use std::error::Error;

use rustls::{AlertDescription, CertificateError};

/// Every message of the chain, outermost first, skipping ones already said.
pub fn describe(err: &(dyn Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut current = Some(err);
    while let Some(e) = current {
        let msg = e.to_string();
        if !msg.is_empty() && !parts.iter().any(|p| p.contains(&msg)) {
            parts.retain(|p| !msg.contains(p.as_str()));
            parts.push(msg);
        }
        current = e.source();
    }
    let mut line = parts.join(": ");
    if let Some(hint) = tls_hint(err) {
        line = format!("{hint} ({line})");
    }
    line
}

/// Describes a failed gRPC call: the status message, its cause chain and a hint when TLS
/// refused the connection.
pub fn describe_status(status: &tonic::Status) -> String {
    let mut line = match status.code() {
        tonic::Code::PermissionDenied => format!("permission denied: {}", status.message()),
        tonic::Code::Unauthenticated => format!("not authenticated: {}", status.message()),
        tonic::Code::DeadlineExceeded => format!("timed out: {}", status.message()),
        _ => status.message().to_string(),
    };
    if let Some(source) = status.source() {
        let cause = describe(source);
        if !line.contains(&cause) {
            line = if line.is_empty() {
                cause
            } else {
                format!("{line}: {cause}")
            };
        }
    }
    if line.is_empty() {
        line = format!("{:?}", status.code());
    }
    line
}

/// The rustls error somewhere in the chain, also when wrapped in an `io::Error`.
pub fn find_rustls_error<'a>(err: &'a (dyn Error + 'static)) -> Option<&'a rustls::Error> {
    let mut current = Some(err);
    while let Some(e) = current {
        if let Some(r) = e.downcast_ref::<rustls::Error>() {
            return Some(r);
        }
        if let Some(inner) = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            if let Some(r) = inner.downcast_ref::<rustls::Error>() {
                return Some(r);
            }
        }
        current = e.source();
    }
    None
}

/// A sentence explaining a TLS refusal, by who refused and why.
fn tls_hint(err: &(dyn Error + 'static)) -> Option<String> {
    let hint = match find_rustls_error(err)? {
        rustls::Error::AlertReceived(alert) => match alert {
            AlertDescription::CertificateRequired => {
                "the peer requires a client certificate and we presented none".to_string()
            }
            AlertDescription::UnknownCA => {
                "the peer does not trust our certificate: it was not signed by its fleet CA"
                    .to_string()
            }
            AlertDescription::CertificateExpired => {
                "the peer refused our certificate: it has expired (or is not yet valid)"
                    .to_string()
            }
            AlertDescription::BadCertificate | AlertDescription::UnsupportedCertificate => {
                "the peer refused our certificate as malformed or unusable".to_string()
            }
            AlertDescription::AccessDenied => "the peer refused our certificate".to_string(),
            other => format!("the peer ended the TLS handshake ({other:?})"),
        },
        rustls::Error::InvalidCertificate(cert) => match cert {
            CertificateError::UnknownIssuer => {
                "we refused the peer's certificate: not signed by our fleet CA".to_string()
            }
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                "we refused the peer's certificate: it has expired".to_string()
            }
            other => format!("we refused the peer's certificate: {other}"),
        },
        other => format!("TLS failed: {other}"),
    };
    Some(hint)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_rustls_alert_inside_io_error() {
        let io = std::io::Error::other(rustls::Error::AlertReceived(
            AlertDescription::CertificateRequired,
        ));
        let text = describe(&io);
        assert!(text.starts_with("the peer requires a client certificate"), "{text}");
        assert!(text.contains("CertificateRequired"), "{text}");
    }

    #[test]
    fn plain_errors_are_joined_without_repetition() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused");
        assert_eq!(describe(&io), "connection refused");
    }
}
