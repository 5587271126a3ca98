//! The follow's two ends, whichever kind this host follows by (a physical standby or
//! subscriptions): the promotion at the cutover, and the end of an instance that was never
//! promoted. Above [`crate::db::standby`] and [`crate::db::subscription`], which never call
//! each other for this.

use std::sync::Arc;

use bmfleet_proto::v1::{DatabaseMove, MoveDatabasesReply, OriginEndpoint, WalPosition};

use crate::config::AgentConfig;
use crate::db::follow::{following, set_following};
use crate::db::standby::{self, Relay};
use crate::db::subscription;

/// Catches this host's databases up with the stopped origin, promotes them, and compares
/// them with the origin's. `origin` carries the databases grant of the step.
pub async fn promote(
    config: &AgentConfig,
    tls: Arc<rustls::ClientConfig>,
    relay: &Relay,
    origin: &OriginEndpoint,
    known: Option<&WalPosition>,
) -> MoveDatabasesReply {
    let (moved, gate) = match promote_inner(config, tls, relay, origin, known).await {
        Ok((moved, gate)) => (Ok(moved), gate),
        Err(e) => (Err(e), String::new()),
    };
    MoveDatabasesReply {
        gate,
        ..crate::db::compare::reply(moved, "the promotion")
    }
}

async fn promote_inner(
    config: &AgentConfig,
    tls: Arc<rustls::ClientConfig>,
    relay: &Relay,
    origin: &OriginEndpoint,
    known: Option<&WalPosition>,
) -> Result<(Vec<DatabaseMove>, String), String> {
    let state = following(config).ok_or(
        "this host does not follow an origin (FollowDatabases did not run or was undone): \
         its databases cannot be promoted",
    )?;
    if state.name != origin.name {
        return Err(format!(
            "this host follows {}, not {}",
            state.name, origin.name
        ));
    }
    if state.logical.is_some() {
        subscription::promote(config, tls, relay, origin, state, known).await
    } else {
        standby::promote(config, tls, relay, origin, state, known).await
    }
}

/// The instance ended without a promotion: what followed `origin_name` stops following and
/// this host's own databases come back. Returns whether there was one.
pub async fn end_following(
    config: &AgentConfig,
    relay: &Relay,
    origin_name: &str,
) -> Result<bool, String> {
    match following(config) {
        // Promoted: the cluster is the instance's now; only the record goes.
        Some(state) if state.name == origin_name && state.promoted => {
            set_following(config, None)?;
            Ok(false)
        }
        Some(state) if state.name == origin_name && state.logical.is_some() => {
            subscription::end(config, relay, &state).await?;
            tracing::info!(origin = %origin_name, "the subscriptions ended; this host's own databases are back");
            Ok(true)
        }
        Some(state) if state.name == origin_name => {
            standby::put_back(config, relay).await?;
            tracing::info!(origin = %origin_name, "the standby stopped following; this host's own cluster is back");
            Ok(true)
        }
        _ => Ok(false),
    }
}
