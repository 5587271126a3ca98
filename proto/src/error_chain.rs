//! Turning nested transport errors into one line an operator can act on.
//!
//! A refused TLS 1.3 client learns it late: the connection opens and the first call fails
//! with a bare "transport error"; the real reason (a TLS alert, a certificate check) lies deep
//! in the error's `source()` chain, sometimes wrapped inside an `io::Error`.

use std::error::Error;

/// Every message of the chain, outermost first, skipping ones already said, behind a hint
/// when TLS refused the connection.
pub fn describe(err: &(dyn Error + 'static)) -> String {
    with_hint(chain(err))
}

fn chain(err: &(dyn Error + 'static)) -> String {
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
    parts.join(": ")
}

fn with_hint(line: String) -> String {
    match tls_hint(&line) {
        Some(hint) => format!("{hint} ({line})"),
        None => line,
    }
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
        let cause = chain(source);
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
    with_hint(line)
}

/// What a TLS failure means, by the text rustls puts in it. The text is all that survives:
/// HTTP/2 keeps only the kind and message of an I/O error, not the rustls error itself.
const TLS_HINTS: &[(&str, &str)] = &[
    (
        "received fatal alert: CertificateRequired",
        "the peer requires a client certificate and we presented none",
    ),
    (
        "received fatal alert: UnknownCA",
        "the peer does not trust our certificate: it was not signed by its fleet CA",
    ),
    (
        "received fatal alert: DecryptError",
        "the peer could not verify our certificate: it was signed by another CA of the same name",
    ),
    (
        "received fatal alert: CertificateExpired",
        "the peer refused our certificate: it has expired (or is not valid yet)",
    ),
    (
        "received fatal alert: BadCertificate",
        "the peer refused our certificate as unusable",
    ),
    (
        "received fatal alert: AccessDenied",
        "the peer refused our certificate",
    ),
    (
        "received fatal alert: CertificateRevoked",
        "the peer refused our certificate: it has been revoked (the fleet's revocation list names it)",
    ),
    (
        "invalid peer certificate: Revoked",
        "we refused the peer's certificate: it has been revoked (the fleet's revocation list names it)",
    ),
    (
        "invalid peer certificate: UnknownIssuer",
        "we refused the peer's certificate: it was not signed by our fleet CA",
    ),
    (
        "invalid peer certificate: certificate expired",
        "we refused the peer's certificate: it has expired",
    ),
    (
        "invalid peer certificate",
        "we refused the peer's certificate",
    ),
    ("received fatal alert", "the peer ended the TLS handshake"),
];

/// A sentence explaining a TLS refusal, by who refused and why.
fn tls_hint(description: &str) -> Option<&'static str> {
    TLS_HINTS
        .iter()
        .find(|(needle, _)| description.contains(needle))
        .map(|(_, hint)| *hint)
}

#[cfg(test)]
mod tests {
    use super::*;

    use rustls::AlertDescription;

    #[test]
    fn finds_rustls_alert_inside_io_error() {
        let io = std::io::Error::other(rustls::Error::AlertReceived(
            AlertDescription::CertificateRequired,
        ));
        let text = describe(&io);
        assert!(
            text.starts_with("the peer requires a client certificate"),
            "{text}"
        );
        assert!(text.contains("CertificateRequired"), "{text}");
    }

    #[test]
    fn plain_errors_are_joined_without_repetition() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused");
        assert_eq!(describe(&io), "connection refused");
    }
}
