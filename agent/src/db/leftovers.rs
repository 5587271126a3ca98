//! What replication grants that are gone left in this origin's cluster, removed: the
//! walsender and every session of the grant's role ended, the slots (physical, logical,
//! table-sync, the gate's) and the role dropped, a publication's changes undone, the WAL cap
//! reset, the gate's sums forgotten. Run at every grant, revocation and start.

use crate::config::AgentConfig;
use crate::db::pg::{ident, literal, Connection};
use crate::plane::grants::{GrantStore, Leftover};

/// Removes from the cluster what replication grants that are gone made. A leftover whose
/// removal fails is kept for the next call (at the next grant, revocation or start).
pub async fn clean_leftovers(config: &AgentConfig, grants: &GrantStore, now_ms: i64) {
    let (orphans, live) = match grants.orphan_leftovers(now_ms) {
        Ok(found) => found,
        Err(e) => {
            tracing::error!(error = %e, "reading the replication leftovers");
            return;
        }
    };
    let admin = Connection::admin(&config.postgresql);
    for leftover in orphans {
        match remove(config, &admin, &leftover, !live).await {
            Ok(()) => {
                tracing::info!(grant = %leftover.grant_id, role = %leftover.role, slot = %leftover.slot, "replication slot and role removed");
                if let Err(e) = grants.forget_leftover(&leftover.grant_id) {
                    tracing::error!(error = %e, "forgetting a replication leftover");
                }
            }
            Err(e) => {
                tracing::warn!(grant = %leftover.grant_id, error = %e, "removing a replication slot and role failed; asked again later")
            }
        }
    }
}

async fn remove(
    config: &AgentConfig,
    admin: &Connection,
    leftover: &Leftover,
    reset_cap: bool,
) -> Result<(), String> {
    let (role, slot) = (literal(&leftover.role), literal(&leftover.slot));
    if !leftover.logical.is_empty() {
        crate::db::publication::remove(config, leftover).await?;
    }
    // The walsender holds the slot: stop it (and any session of the role) first; its end
    // takes a moment, so the drop is retried.
    let terminate = format!(
        "SELECT pg_catalog.pg_terminate_backend(pid) FROM pg_catalog.pg_stat_activity WHERE usename = {role};\n\
         SELECT pg_catalog.pg_terminate_backend(active_pid) FROM pg_catalog.pg_replication_slots WHERE slot_name = {slot} AND active_pid IS NOT NULL;\n"
    );
    let drop = format!(
        "SELECT pg_catalog.pg_drop_replication_slot(slot_name) FROM pg_catalog.pg_replication_slots WHERE slot_name IN ({slot}, {gate});\n\
         DROP ROLE IF EXISTS {};\n",
        ident(&leftover.role),
        gate = literal(&crate::db::wal::gate_slot(&leftover.grant_id)),
    );
    let mut last = String::new();
    for _ in 0..50 {
        admin
            .psql("postgres", &terminate)
            .await
            .map_err(|e| e.to_string())?;
        match admin.psql("postgres", &drop).await {
            Ok(_) => {
                last.clear();
                break;
            }
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    if !last.is_empty() {
        return Err(last);
    }
    crate::db::gate::block_point::forget(config, Some(&leftover.grant_id));
    if leftover.cap_set && reset_cap {
        admin
            .psql(
                "postgres",
                "ALTER SYSTEM RESET max_slot_wal_keep_size;\nSELECT pg_catalog.pg_reload_conf();\n",
            )
            .await
            .map_err(|e| format!("resetting max_slot_wal_keep_size: {e}"))?;
    }
    Ok(())
}
