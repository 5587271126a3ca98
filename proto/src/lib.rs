//! The bmfleet wire contract and the fleet's identities.
//!
//! - [`v1`]: the generated gRPC code for the `Agent` and `Fleet` services.
//! - [`identity`]: who a certificate says its holder is (name and role).
//! - [`pki`]: the fleet CA and the certificates it issues (`bmctl fleet pki`).
//! - [`tls`]: mutual-TLS servers and clients that enforce name and role.
//! - [`error_chain`]: turning a failed call into a reason an operator can act on.
#![forbid(unsafe_code)]

pub mod config_file;
pub mod error_chain;
pub mod identity;
pub mod metrics_http;
pub mod pki;
pub mod process;
pub mod tls;

/// Generated code of `proto/bmfleet.proto` (package `bmfleet.v1`).
#[allow(missing_docs, clippy::all)]
pub mod v1 {
    tonic::include_proto!("bmfleet.v1");
}

/// BlueMind's data dirs (the seed procedure's), synced from origin to target.
pub const BLUEMIND_DATA_DIRS: [&str; 7] = [
    "/var/spool/cyrus",
    "/var/lib/cyrus",
    "/var/spool/bm-hsm",
    "/var/spool/sieve",
    "/var/spool/bm-elasticsearch",
    "/var/spool/bm-docs",
    "/var/spool/bm-filehosting",
];

/// Installs ring as the process-wide rustls crypto provider. Call once at the start of every
/// binary and test; repeated calls are harmless.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
