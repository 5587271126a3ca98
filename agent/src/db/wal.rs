//! Write-ahead log positions and the names a grant gives what it makes in a cluster: shared
//! by the origin's replication and the target's standby, subscriber and gate. No I/O but
//! the origin's own WAL position query and the target's question for it.

use std::sync::Arc;
use std::time::Duration;

use bmfleet_proto::v1::OriginEndpoint;
use serde::{Deserialize, Serialize};

use crate::config::AgentConfig;
use crate::db::pg::Connection;
use crate::plane::tunnel::{self, TunnelRequest};

/// The origin's WAL position, asked once its services stopped.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct WalPosition {
    /// `pg_current_wal_insert_lsn()`.
    pub lsn: String,
    /// `wal_segment_size` in bytes.
    pub segment_size: u64,
}

/// The role and slot names of a grant: `bmfleet_` and the grant id's first characters.
pub fn names(grant_id: &str) -> (String, String) {
    let id: String = grant_id
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .map(|c| c.to_ascii_lowercase())
        .take(32)
        .collect();
    (format!("bmfleet_repl_{id}"), format!("bmfleet_slot_{id}"))
}

/// The origin's `wal_level`.
pub async fn wal_level(admin: &Connection) -> Result<String, String> {
    Ok(admin
        .psql("postgres", "SHOW wal_level;")
        .await
        .map_err(|e| e.to_string())?
        .trim()
        .to_string())
}

/// The origin's WAL insert position (its services stopped: nothing more will be written),
/// flushed: what it names is on disk, hence on its way to the followers.
///
/// The same transaction writes a record (a transactional logical message, a no-op for
/// physical followers and for subscriptions that do not ask for messages) and commits
/// synchronously (whatever the cluster's `synchronous_commit`: BlueMind's runs with `off`),
/// so that its commit flushes the WAL past that position: the last records the origin
/// inserted without a flush (its asynchronous commits, the background writer's snapshot of
/// running transactions, pruned pages) reach its followers now, not when the WAL writer
/// next wakes (200 ms, seconds once it hibernates) — a follower's catch-up in the downtime
/// waited for it. A transaction that only took an xid would not do: PostgreSQL commits one
/// that wrote no other record asynchronously (`RecordTransactionCommit`), and its unflushed
/// commit record made the next read wait for the WAL writer. The next statement reads the
/// flush position (checked; waited for up to 10 s if it is short).
pub async fn wal_position(config: &AgentConfig) -> Result<WalPosition, String> {
    let admin = Connection::admin(&config.postgresql);
    let out = admin
        .psql("postgres", POSITION_SQL)
        .await
        .map_err(|e| e.to_string())?;
    settled(&admin, &out).await
}

/// [`wal_position`], and in the same psql the one-row answer of `then` (statements of the
/// administrator's in the `postgres` database). When everything inserted is flushed already
/// (an origin whose stop read its position), the position is only read: nothing written.
pub async fn wal_position_and(
    config: &AgentConfig,
    then: &str,
) -> Result<(WalPosition, String), String> {
    let admin = Connection::admin(&config.postgresql);
    let out = admin
        .psql_warm("postgres", &format!("{READ_SQL}{then}"))
        .await
        .map_err(|e| e.to_string())?;
    let answer = out
        .lines()
        .nth(2)
        .ok_or_else(|| format!("no answer after the WAL position in {out:?}"))?
        .to_string();
    let (position, end, flushed) = read_answer(&out)?;
    if flushed.is_some_and(|f| f >= end) {
        return Ok((position, answer));
    }
    Ok((wal_position(config).await?, answer))
}

/// [`wal_position`] on an administrator's session opened beforehand (while the services
/// stopped): no psql to start and connect once they have.
pub async fn wal_position_on(
    config: &AgentConfig,
    session: crate::db::pg::Session,
) -> Result<WalPosition, String> {
    let out = session
        .finish(POSITION_SQL)
        .await
        .map_err(|e| e.to_string())?;
    settled(&Connection::admin(&config.postgresql), &out).await
}

/// The insert position, then the flush position: read, nothing written.
const READ_SQL: &str = "SELECT pg_catalog.pg_current_wal_insert_lsn(), pg_catalog.current_setting('wal_segment_size');\n\
     SELECT pg_catalog.pg_current_wal_flush_lsn();\n";

/// The insert position in a transaction that commits synchronously, then the flush position.
const POSITION_SQL: &str = "BEGIN; SET LOCAL synchronous_commit = on;\n\
     SELECT pg_catalog.pg_current_wal_insert_lsn(), pg_catalog.current_setting('wal_segment_size'), \
     pg_catalog.pg_logical_emit_message(true, 'bmfleet', 'position') IS NOT NULL;\n\
     COMMIT;\n\
     SELECT pg_catalog.pg_current_wal_flush_lsn();\n";

/// What [`POSITION_SQL`] or [`READ_SQL`] printed: the position, the replay position that
/// holds everything before it ([`caught_up_at`]) and the flush position.
fn read_answer(out: &str) -> Result<(WalPosition, u64, Option<u64>), String> {
    let mut lines = out.lines();
    let first = lines.next().unwrap_or_default();
    let mut columns = first.trim().split('\t');
    let (lsn, size) = columns
        .next()
        .zip(columns.next())
        .ok_or_else(|| format!("unexpected WAL position {out:?}"))?;
    let position = WalPosition {
        lsn: lsn.to_string(),
        segment_size: parse_size(size).ok_or_else(|| format!("wal_segment_size {size:?}"))?,
    };
    let end = parse_lsn(lsn)
        .map(|l| caught_up_at(l, position.segment_size))
        .ok_or_else(|| format!("the WAL position {lsn:?} is not an LSN"))?;
    Ok((position, end, lines.next().and_then(parse_lsn)))
}

/// The position [`POSITION_SQL`] printed, once the flush position is past it (asked again
/// every 20 ms, for up to 10 s, while it is not).
async fn settled(admin: &Connection, out: &str) -> Result<WalPosition, String> {
    let (position, end, mut flushed) = read_answer(out)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while flushed.is_none_or(|f| f < end) {
        if std::time::Instant::now() > deadline {
            return Err(format!(
                "the WAL here is not flushed up to {}",
                position.lsn
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        let out = admin
            .psql(
                "postgres",
                "SELECT pg_catalog.pg_current_wal_flush_lsn();\n",
            )
            .await
            .map_err(|e| e.to_string())?;
        flushed = parse_lsn(&out);
    }
    Ok(position)
}

/// A PostgreSQL size setting as `current_setting` shows it ("16MB", "1GB", "8192").
fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let digits = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let number: u64 = text[..digits].parse().ok()?;
    let unit = match &text[digits..] {
        "" | "B" => 1,
        "kB" => 1 << 10,
        "MB" => 1 << 20,
        "GB" => 1 << 30,
        _ => return None,
    };
    number.checked_mul(unit)
}

/// The major of a `server_version_num` (150004 → 15).
pub fn major(server_version_num: u32) -> u32 {
    server_version_num / 10_000
}

/// A number as an LSN ("16/B374D848").
pub fn lsn_text(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

/// An LSN ("16/B374D848") as a number.
pub fn parse_lsn(text: &str) -> Option<u64> {
    let (high, low) = text.trim().split_once('/')?;
    let high = u64::from_str_radix(high, 16).ok()?;
    let low = u64::from_str_radix(low, 16).ok()?;
    (high <= u32::MAX as u64 && low <= u32::MAX as u64).then_some((high << 32) | low)
}

/// WAL pages (XLOG_BLCKSZ) and their headers' sizes (short, and long at a segment's start).
const WAL_PAGE: u64 = 8192;

const SHORT_PAGE_HEADER: u64 = 24;

const LONG_PAGE_HEADER: u64 = 40;

/// The replay position that proves a standby has everything the origin inserted before
/// `insert_lsn`. An insert position right after a page header means the last record ended at
/// the page's boundary (PostgreSQL's `XLogBytePosToRecPtr` skips the header), and a standby's
/// replay position is a record's end: the boundary itself.
pub fn caught_up_at(insert_lsn: u64, segment_size: u64) -> u64 {
    if segment_size > 0 && insert_lsn % segment_size == LONG_PAGE_HEADER {
        insert_lsn - LONG_PAGE_HEADER
    } else if insert_lsn % WAL_PAGE == SHORT_PAGE_HEADER {
        insert_lsn - SHORT_PAGE_HEADER
    } else {
        insert_lsn
    }
}

/// The stopped origin's WAL insert position, and the position a follower must reach to hold
/// everything written before it ([`caught_up_at`]).
async fn position_to_reach(
    config: &AgentConfig,
    tls: Arc<rustls::ClientConfig>,
    origin: &OriginEndpoint,
) -> Result<(WalPosition, u64), String> {
    let timeout = Duration::from_secs(config.data_plane.connect_timeout_secs);
    let request = TunnelRequest::WalPosition {
        grant: origin.grant_id.clone(),
    };
    let (_, position): (_, WalPosition) =
        tunnel::ask(origin, tls, &request, timeout, "the origin's WAL position").await?;
    let insert = parse_lsn(&position.lsn)
        .ok_or_else(|| format!("the origin's WAL position {:?} is not an LSN", position.lsn))?;
    let wanted = caught_up_at(insert, position.segment_size);
    Ok((position, wanted))
}

/// The stopped origin's position and the one a follower must reach: `known` (read by the
/// origin's own agent right after its stop, passed on by the orchestrator) when given, else
/// asked now over the data plane.
pub async fn stop_position(
    config: &AgentConfig,
    tls: Arc<rustls::ClientConfig>,
    origin: &OriginEndpoint,
    known: Option<&bmfleet_proto::v1::WalPosition>,
) -> Result<(WalPosition, u64), String> {
    let Some(known) = known else {
        return position_to_reach(config, tls, origin).await;
    };
    let insert = parse_lsn(&known.lsn)
        .ok_or_else(|| format!("the origin's WAL position {:?} is not an LSN", known.lsn))?;
    Ok((
        WalPosition {
            lsn: known.lsn.clone(),
            segment_size: known.segment_size,
        },
        caught_up_at(insert, known.segment_size),
    ))
}

/// The gate's replication slot for `grant_id` (kept WAL from the verified point on; dropped
/// with the grant's other leftovers).
pub fn gate_slot(grant_id: &str) -> String {
    let (_, slot) = crate::db::wal::names(grant_id);
    slot.replacen("bmfleet_slot_", "bmfleet_gate_", 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_postgres_identifiers_of_the_grant() {
        let (role, slot) = names("0123456789ABCDEF-xyz");
        assert_eq!(role, "bmfleet_repl_0123456789abcdefxyz");
        assert_eq!(slot, "bmfleet_slot_0123456789abcdefxyz");
        let (role, _) = names(&"a".repeat(100));
        assert!(role.len() <= 63);
    }

    #[test]
    fn sizes_parse_as_postgres_shows_them() {
        assert_eq!(parse_size("16MB"), Some(16 << 20));
        assert_eq!(parse_size("1GB"), Some(1 << 30));
        assert_eq!(parse_size("8192"), Some(8192));
        assert_eq!(parse_size("64kB"), Some(64 << 10));
        assert_eq!(parse_size("lots"), None);
        assert_eq!(parse_size("16TB"), None);
    }

    #[test]
    fn lsns_parse() {
        assert_eq!(parse_lsn("0/3000148"), Some(0x0300_0148));
        for lsn in [0, 0x0300_0148, (0x16 << 32) | 0xB374_D848] {
            assert_eq!(parse_lsn(&lsn_text(lsn)), Some(lsn));
        }
        assert_eq!(lsn_text(0x0800_0000), "0/8000000");
        assert_eq!(parse_lsn("16/B374D848"), Some((0x16 << 32) | 0xB374_D848));
        assert_eq!(parse_lsn("nope"), None);
        assert_eq!(parse_lsn("1/"), None);
    }

    #[test]
    fn an_insert_position_after_a_page_header_means_its_boundary() {
        let seg = 16 << 20;
        // Mid-page: exact.
        assert_eq!(caught_up_at(0x0300_0148, seg), 0x0300_0148);
        // Right after a short page header.
        assert_eq!(caught_up_at(0x0300_2018, seg), 0x0300_2000);
        // Right after a segment's long header.
        assert_eq!(caught_up_at(0x0400_0028, seg), 0x0400_0000);
        // Offset 40 in a page that does not start a segment is a real position.
        assert_eq!(caught_up_at(0x0300_2028, seg), 0x0300_2028);
    }
}
