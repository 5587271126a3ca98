//! Why the orchestrator could not start or stopped serving.

use crate::{conductor, state};

/// Why the orchestrator could not start or stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum OrchestratorError {
    /// Identity files unusable.
    #[error(transparent)]
    Tls(#[from] bmfleet_proto::tls::TlsError),
    /// The state database is unusable.
    #[error(transparent)]
    State(#[from] state::StateError),
    /// The metrics listener could not be bound.
    #[error("cannot serve metrics on {address}: {source}")]
    Metrics {
        /// The address.
        address: String,
        /// Why.
        source: std::io::Error,
    },
    /// The stored fleet could not be resumed.
    #[error("resuming the applied fleet: {0}")]
    Resume(#[from] conductor::ConductorError),
    /// The enrollment listener could not be bound.
    #[error("cannot serve enrollment on {address}: {source}")]
    Enrollment {
        /// The address.
        address: String,
        /// Why.
        source: std::io::Error,
    },
    /// A notification receiver cannot be used (its secret or CA file).
    #[error("notifications: {0}")]
    Notify(String),
    /// The gRPC server failed.
    #[error("serving the Fleet API: {0}")]
    Serve(#[from] tonic::transport::Error),
}
