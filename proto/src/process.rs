//! What every bmfleet daemon does at start and stop.

/// Sets up logging to stderr (`RUST_LOG`, default `info`) and the ring crypto provider.
pub fn init_daemon() {
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    crate::install_crypto_provider();
}

/// Completes on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {},
                _ = term.recv() => {},
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGTERM; stopping on SIGINT only");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    tracing::info!("shutting down");
}

/// Re-reads the revocation list of `trust` on every SIGHUP (`systemctl reload`), logging what
/// it now revokes; a list that cannot be read leaves the one in force.
pub fn reload_on_sighup(trust: std::sync::Arc<crate::tls::TrustStore>) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hangup = match signal(SignalKind::hangup()) {
        Ok(h) => h,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGHUP: the revocation list is read at start only");
            return;
        }
    };
    tokio::spawn(async move {
        while hangup.recv().await.is_some() {
            match trust.reload() {
                Ok(revoked) => tracing::info!(revoked, "revocation list reloaded"),
                Err(e) => {
                    tracing::error!(error = %e, "revocation list not reloaded; the previous one stays in force")
                }
            }
        }
    });
}
