//! The origin's side of a physical standby (same PostgreSQL major on both hosts).
//!
//! Under a grant with the replication scope, the origin makes what its target's standby
//! needs in its own cluster, as its own administrator: a role with `LOGIN REPLICATION` and
//! nothing more (a random password, set as a SCRAM verifier, valid until the grant expires)
//! and a physical replication slot reserving WAL from before the base backup. While a slot
//! exists, an unlimited `max_slot_wal_keep_size` is capped (`postgresql.
//! replication_wal_cap_mb`): a target that vanishes cannot fill the origin's disk, its slot is
//! lost instead. All of it is recorded before it is made and removed once the grant is gone
//! (revoked, expired, or the agent restarted after it was): the walsender is stopped, the
//! slot and the role dropped, the cap reset when no replication grant remains.
//!
//! The standby's connection reaches PostgreSQL only through [`relay_to_server`]: the data
//! plane admits it with the target's certificate and the grant, then relays bytes to the
//! cluster's own address (BlueMind's PostgreSQL listens on localhost; no port opens between
//! hosts).

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::db::startup;

use crate::config::AgentConfig;
use crate::db::pg::{ident, literal, Connection};
use crate::db::wal::{names, wal_level};
use crate::plane::grants::{Grant, GrantStore, Leftover};

/// What the target needs to follow this origin (sent after admission, before the base
/// backup's frames).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FollowTicket {
    /// The replication role.
    pub role: String,
    /// Its password (the origin keeps only the verifier).
    pub password: String,
    /// The physical slot the standby streams from.
    pub slot: String,
    /// The origin's `server_version_num`.
    pub server_version_num: u32,
}

/// A fresh random password (48 hex digits).
pub fn random_password() -> Result<String, String> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 24];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| "no random bytes for the replication password".to_string())?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Makes (or re-makes) the role and slot of `grant` and returns the ticket. Recorded in the
/// grant store first, so that nothing made here outlives the grant.
pub async fn prepare(
    config: &AgentConfig,
    grants: &GrantStore,
    grant: &Grant,
) -> Result<FollowTicket, String> {
    let admin = Connection::admin(&config.postgresql);
    if wal_level(&admin).await? == "minimal" {
        return Err(
            "the origin's wal_level is minimal: a standby needs replica (PostgreSQL's default); \
             use db_sync = \"dump\" for this instance"
                .into(),
        );
    }
    let (_, slot) = names(&grant.id);
    let mut made = make_role(config, grants, grant, slot.clone(), String::new()).await?;
    admin
        .psql(
            "postgres",
            &format!(
                "SELECT pg_catalog.pg_create_physical_replication_slot({slot}, true) WHERE NOT EXISTS (SELECT 1 FROM pg_catalog.pg_replication_slots WHERE slot_name = {slot});\n",
                slot = literal(&slot)
            ),
        )
        .await
        .map_err(|e| format!("preparing the replication slot: {e}"))?;
    cap_wal(config, grants, &mut made.leftover).await?;
    tracing::info!(grant = %grant.id, target = %grant.target_name, role = %made.role, %slot, "replication role and slot ready");
    Ok(FollowTicket {
        role: made.role,
        password: made.password,
        slot,
        server_version_num: made.server_version_num,
    })
}

/// The replication role of a grant, made (and recorded) for a standby or a subscription.
pub struct Made {
    /// The role.
    pub role: String,
    /// Its password (the cluster keeps only the verifier).
    pub password: String,
    /// The origin's `server_version_num`.
    pub server_version_num: u32,
    /// The record of what the grant made.
    pub leftover: Leftover,
}

/// Records `grant`'s leftover (`slot`, and `logical`'s JSON), then makes its role: `LOGIN
/// REPLICATION` and nothing more, a random password set as a SCRAM verifier, valid until
/// the grant expires.
pub async fn make_role(
    config: &AgentConfig,
    grants: &GrantStore,
    grant: &Grant,
    slot: String,
    logical: String,
) -> Result<Made, String> {
    let admin = Connection::admin(&config.postgresql);
    let server_version_num = admin
        .server_version_num()
        .await
        .map_err(|e| e.to_string())?;
    let (role, _) = names(&grant.id);
    let leftover = Leftover {
        grant_id: grant.id.clone(),
        role: role.clone(),
        slot,
        cap_set: false,
        logical,
    };
    grants.put_leftover(&leftover).map_err(|e| e.to_string())?;
    let password = random_password()?;
    let verifier = crate::db::pg::scram_verifier(&password)?;
    let valid_until = time::OffsetDateTime::from_unix_timestamp(grant.expires_at_ms / 1000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .ok_or("the grant's expiry is not a date")?;
    let sql = format!(
        "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = {name}) THEN CREATE ROLE {role}; END IF; END $$;\n\
         ALTER ROLE {role} WITH LOGIN REPLICATION NOSUPERUSER NOCREATEDB NOCREATEROLE NOBYPASSRLS NOINHERIT CONNECTION LIMIT 8 PASSWORD {verifier} VALID UNTIL {until};\n",
        name = literal(&role),
        role = ident(&role),
        verifier = literal(&verifier),
        until = literal(&valid_until),
    );
    admin
        .psql("postgres", &sql)
        .await
        .map_err(|e| format!("preparing the replication role: {e}"))?;
    Ok(Made {
        role,
        password,
        server_version_num,
        leftover,
    })
}

/// While a slot exists, an unlimited `max_slot_wal_keep_size` is capped (recorded first).
pub async fn cap_wal(
    config: &AgentConfig,
    grants: &GrantStore,
    leftover: &mut Leftover,
) -> Result<(), String> {
    let admin = Connection::admin(&config.postgresql);
    let out = admin
        .psql(
            "postgres",
            "SELECT pg_catalog.current_setting('max_slot_wal_keep_size');\n",
        )
        .await
        .map_err(|e| e.to_string())?;
    if out.trim() != "-1" {
        return Ok(());
    }
    let cap = format!("{}MB", config.postgresql.replication_wal_cap_mb.max(1));
    leftover.cap_set = true;
    grants.put_leftover(leftover).map_err(|e| e.to_string())?;
    admin
        .psql(
            "postgres",
            &format!(
                "ALTER SYSTEM SET max_slot_wal_keep_size = {};\nSELECT pg_catalog.pg_reload_conf();\n",
                literal(&cap)
            ),
        )
        .await
        .map_err(|e| format!("capping max_slot_wal_keep_size: {e}"))?;
    tracing::info!(%cap, "max_slot_wal_keep_size was unlimited: capped while a replica follows");
    Ok(())
}

/// Relays an admitted replication connection to the cluster's own address
/// (`postgresql.host`: a socket dir when it starts with `/`) until either side closes, once
/// its startup packet passed [`startup::screen`] for the grant (anything else is refused
/// with a PostgreSQL error before the cluster sees a byte).
pub async fn relay_to_server<S>(
    config: &AgentConfig,
    allowed: &startup::Allowed<'_>,
    stream: &mut S,
) -> Result<(), String>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let startup = match read_startup(stream, allowed).await {
        Ok(packet) => packet,
        Err(why) => {
            let _ = stream.write_all(&startup::refusal(&why)).await;
            let _ = stream.shutdown().await;
            return Err(format!("replication relay refused {why}"));
        }
    };
    let pg = &config.postgresql;
    let copied = if pg.host.starts_with('/') {
        let path = std::path::Path::new(&pg.host).join(format!(".s.PGSQL.{}", pg.port));
        let mut server = tokio::net::UnixStream::connect(&path)
            .await
            .map_err(|e| format!("connecting to PostgreSQL at {}: {e}", path.display()))?;
        server
            .write_all(&startup)
            .await
            .map_err(|e| format!("relaying the startup packet: {e}"))?;
        tokio::io::copy_bidirectional(stream, &mut server).await
    } else {
        let mut server = tokio::net::TcpStream::connect((pg.host.as_str(), pg.port))
            .await
            .map_err(|e| format!("connecting to PostgreSQL at {}:{}: {e}", pg.host, pg.port))?;
        let _ = server.set_nodelay(true);
        server
            .write_all(&startup)
            .await
            .map_err(|e| format!("relaying the startup packet: {e}"))?;
        tokio::io::copy_bidirectional(stream, &mut server).await
    };
    match copied {
        Ok(_) => Ok(()),
        // The walsender stopped (grant revoked) or the standby went: the relay's end.
        Err(e) => {
            tracing::info!(error = %e, "replication relay ended");
            Ok(())
        }
    }
}

/// Reads the client's first packets: encryption requests answered `N`, then the startup
/// message, screened; returns the packet to send on.
async fn read_startup<S>(stream: &mut S, allowed: &startup::Allowed<'_>) -> Result<Vec<u8>, String>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    for _ in 0..3 {
        let mut length = [0u8; 4];
        stream
            .read_exact(&mut length)
            .await
            .map_err(|e| format!("a startup packet that did not come ({e})"))?;
        let length = u32::from_be_bytes(length) as usize;
        if !(8..=startup::MAX_STARTUP).contains(&length) {
            return Err(format!("a startup packet of {length} bytes"));
        }
        let mut body = vec![0u8; length - 4];
        stream
            .read_exact(&mut body)
            .await
            .map_err(|e| format!("a startup packet cut short ({e})"))?;
        match startup::parse(&body)? {
            startup::First::Encryption => {
                stream
                    .write_all(b"N")
                    .await
                    .map_err(|e| format!("answering an encryption request: {e}"))?;
            }
            startup::First::Startup(params) => {
                let kind = startup::screen(&params, allowed)?;
                tracing::info!(?kind, role = %allowed.role, "replication relay: startup admitted");
                return Ok(startup::packet(&params));
            }
        }
    }
    Err("a client that keeps asking for encryption".into())
}
