//! The databases' verified point, and the downtime's gate on what changed since it.
//!
//! A physical standby's checksum gate used to read every table on both sides inside the
//! downtime, so its cost grew with the databases. Now the full comparison happens live, at the
//! pre-window pass ([`establish`]):
//!
//! 1. The origin keeps its WAL from now on (a physical slot, `bmfleet_gate_…`), then locks
//!    BlueMind's tables against writes (`SHARE` mode, each attempt bounded by a 100 ms lock
//!    timeout and a 300 ms statement timeout, so a BlueMind transaction never waits long and
//!    never deadlocks on it), exports a snapshot per database and reads its WAL position `L`.
//! 2. The standby waits until it has replayed `L`, opens a repeatable-read transaction per
//!    database and says so. Nothing wrote to BlueMind's tables between `L` and its snapshot
//!    (the locks), so both snapshots hold the same rows.
//! 3. The origin lets go of its locks (BlueMind's writes were held for a round trip) and both
//!    sides checksum every table in their snapshots, at once. Equal everywhere: the standby
//!    records the verified point (`L` and each table's file).
//!
//! In the downtime ([`compare_changed`]) the stopped origin reads its WAL from `L`
//! (`pg_waldump`) for the heap blocks it names; each table is then compared on both sides in
//! those blocks only (TID range scans), or in full when its file changed since `L` (TRUNCATE,
//! VACUUM FULL, a new table). The gate reads what changed, not what the server holds. Any
//! doubt (no verified point, the WAL gone, a parse error) and the gate compares everything,
//! as before, and says why.
//!
//! What the target runs in its databases (which came from the origin) runs as the owner role
//! with `search_path` pinned to `pg_catalog`; what the origin names (schemas, tables) reaches
//! SQL only quoted, and block numbers only as numbers.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWrite, BufReader};

use crate::config::AgentConfig;
use crate::db::follow::VerifiedPoint;
use crate::db::pg::{ident, literal, Connection, DatabaseManifest, TableManifest};
use crate::db::wal::{caught_up_at, gate_slot, parse_lsn};
use crate::plane::answer::admit;
use crate::plane::tunnel::TableFile;
use crate::plane::tunnel::{self, read_json_line, write_json_line, TunnelRequest};
use bmfleet_proto::v1::OriginEndpoint;

/// How long the origin holds BlueMind's tables for the standby's snapshot.
pub(crate) const HOLD: Duration = Duration::from_secs(5);
/// Attempts at locking BlueMind's tables (each gives up after 300 ms).
const LOCK_ATTEMPTS: u32 = 20;
/// TID ranges per statement of a block comparison.
const RANGES_PER_STATEMENT: usize = 1000;
/// Block ranges one selection names at most, across its tables: past it the closest ranges
/// are merged (the blocks between them compared too), so that a busy day's selection stays
/// one data-plane line ([`tunnel::MAX_LINE`]) instead of falling back to every table.
const MAX_SELECTED_RANGES: usize = 1500;

/// The origin's first answer: its tables are locked, its snapshots taken at `lsn` (or why
/// not: `error`, as the data plane's refusal after admission reads).
#[derive(Debug, Serialize, Deserialize)]
pub struct Held {
    /// `pg_current_wal_insert_lsn()` under the locks.
    #[serde(default)]
    pub lsn: String,
    /// `wal_segment_size` in bytes.
    #[serde(default)]
    pub segment_size: u64,
    /// Why not.
    #[serde(default)]
    pub error: String,
}

/// The standby's answer: its snapshots are taken (at this replay position).
#[derive(Debug, Serialize, Deserialize)]
pub struct Taken {
    /// `pg_last_wal_replay_lsn()` in the snapshot.
    pub replayed: String,
}

/// The origin's last answer to a verified point (or why it failed: `error`).
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct OriginSums {
    /// The standby's snapshot came while the tables were still locked.
    #[serde(default)]
    pub released_in_time: bool,
    /// Every table's rows and checksum in the snapshot.
    #[serde(default)]
    pub databases: Vec<DatabaseManifest>,
    /// Every table's file.
    #[serde(default)]
    pub tables: Vec<TableFile>,
    /// The origin's WAL insert position once its sums were read (flushed): its reads pruned
    /// pages, whose records a standby replays only once its own snapshots are gone.
    #[serde(default)]
    pub end_lsn: String,
    /// Why it failed.
    #[serde(default)]
    pub error: String,
}

/// What the gate compares of one table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableSelection {
    /// The database.
    pub database: String,
    /// Its schema.
    pub schema: String,
    /// The table.
    pub table: String,
    /// Block ranges `[start, end)` named by the WAL since the verified point; `None`: the
    /// whole table (its file changed, or it is new).
    pub blocks: Option<Vec<(u32, u32)>>,
}

/// The origin's first answer to [`TunnelRequest::ChangedBlocks`].
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Selection {
    /// The WAL read: from the verified point…
    #[serde(default)]
    pub since: String,
    /// …to the stopped origin's position.
    #[serde(default)]
    pub until: String,
    /// Every table of BlueMind's databases, and what of it is compared.
    #[serde(default)]
    pub tables: Vec<TableSelection>,
    /// Why not (the origin's refusal arrives as this).
    #[serde(default)]
    pub error: String,
    /// Where the origin's time went before it answered (milliseconds from its admission):
    /// WAL read (position and `pg_waldump`), and its tables listed, side by side.
    #[serde(default)]
    pub origin_ms: (u64, u64),
}

/// The origin's sums over a selection (or why not: `error`).
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct SelectedSums {
    /// Rows and checksums of the selected parts, database by database.
    #[serde(default)]
    pub databases: Vec<DatabaseManifest>,
    /// Why not.
    #[serde(default)]
    pub error: String,
}

/// One block a WAL record names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockRef {
    /// Tablespace oid.
    pub tablespace: u32,
    /// Database oid.
    pub database: u32,
    /// Relation file node.
    pub filenode: u32,
    /// Block number (main fork).
    pub block: u32,
}

/// The `Heap2` records that change no row any snapshot sees (`heap2_identify` in
/// PostgreSQL's `heapdesc.c`: up to 16 `PRUNE`, `VACUUM`, `FREEZE_PAGE`; 17 on the three
/// `PRUNE_*`; all `VISIBLE`).
pub const CLEANUP_RECORDS: [&str; 7] = [
    "PRUNE",
    "VACUUM",
    "FREEZE_PAGE",
    "VISIBLE",
    "PRUNE_ON_ACCESS",
    "PRUNE_VACUUM_SCAN",
    "PRUNE_VACUUM_CLEANUP",
];

/// Whether a `pg_waldump` line is one of [`CLEANUP_RECORDS`].
fn is_cleanup(line: &str) -> bool {
    let Some(rest) = line.strip_prefix("rmgr: Heap2 ") else {
        return false;
    };
    rest.split_once("desc: ")
        .and_then(|(_, desc)| desc.split([' ', ',']).next())
        .is_some_and(|id| CLEANUP_RECORDS.contains(&id))
}

/// The main-fork blocks one line of `pg_waldump` names (`blkref #0: rel 1663/5/16384 blk 7`;
/// other forks say `fork fsm` or `fork vm` and are left out: they hold no rows).
///
/// A page image logged only because hint bits changed (`FPI_FOR_HINT`: data checksums or
/// `wal_log_hints`, e.g. the verified point's own reads) changes no row: left out. So are
/// vacuum's and pruning's records ([`CLEANUP_RECORDS`]): they remove only tuples no snapshot
/// sees, freeze tuples every snapshot sees, or set visibility flags; a row deleted after the
/// point had its block named by the deletion itself. (Autovacuum of a freshly copied table
/// names every block of it.)
pub fn block_refs(line: &str) -> Vec<BlockRef> {
    let mut found = Vec::new();
    if line.contains("desc: FPI_FOR_HINT") || is_cleanup(line) {
        return found;
    }
    for part in line.split("blkref #").skip(1) {
        let Some((_, rest)) = part.split_once(": rel ") else {
            continue;
        };
        let mut words = rest.split_whitespace();
        let Some(rel) = words.next() else { continue };
        let ids: Vec<u32> = rel
            .trim_end_matches(',')
            .split('/')
            .filter_map(|n| n.parse().ok())
            .collect();
        let [tablespace, database, filenode] = ids[..] else {
            continue;
        };
        let (mut main, mut block) = (true, None);
        while let Some(word) = words.next() {
            match word {
                "fork" => {
                    main = words
                        .next()
                        .is_some_and(|f| f.trim_end_matches(',') == "main")
                }
                "blk" => {
                    block = words
                        .next()
                        .and_then(|b| b.trim_end_matches(',').parse().ok());
                    break;
                }
                _ => break,
            }
        }
        if let (true, Some(block)) = (main, block) {
            found.push(BlockRef {
                tablespace,
                database,
                filenode,
                block,
            });
        }
    }
    found
}

/// Sorted block numbers as `[start, end)` ranges of consecutive blocks.
pub fn ranges(blocks: &BTreeSet<u32>) -> Vec<(u32, u32)> {
    let mut out: Vec<(u32, u32)> = Vec::new();
    for &b in blocks {
        match out.last_mut() {
            Some((_, end)) if *end == b => *end = b.saturating_add(1),
            _ => out.push((b, b.saturating_add(1))),
        }
    }
    out
}

/// A table as the origin's catalog shows it now, located for the WAL's block references.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CurrentTable {
    /// Its file now.
    pub file: TableFile,
    /// Its database's oid.
    pub database_oid: u32,
    /// Its tablespace (the database's default resolved).
    pub tablespace: u32,
}

/// What the gate compares: a table whose file is the verified point's, in the blocks `named`
/// since; any other (rewritten, new) in full.
pub fn select(
    verified: &[TableFile],
    current: &[CurrentTable],
    named: &BTreeSet<BlockRef>,
) -> Vec<TableSelection> {
    let mut by_file: HashMap<(u32, u32, u32), BTreeSet<u32>> = HashMap::new();
    for r in named {
        by_file
            .entry((r.tablespace, r.database, r.filenode))
            .or_default()
            .insert(r.block);
    }
    let mut selection: Vec<TableSelection> = current
        .iter()
        .map(|c| {
            let unchanged = verified.iter().any(|v| v == &c.file);
            let blocks = unchanged.then(|| {
                by_file
                    .get(&(c.tablespace, c.database_oid, c.file.filenode))
                    .map(ranges)
                    .unwrap_or_default()
            });
            TableSelection {
                database: c.file.database.clone(),
                schema: c.file.schema.clone(),
                table: c.file.table.clone(),
                blocks,
            }
        })
        .collect();
    coalesce(&mut selection, MAX_SELECTED_RANGES);
    selection
}

/// Merges the ranges of `selection` separated by the smallest gaps until at most `max` are
/// left (or one per table): the merged ranges cover every block they did, plus the gaps.
pub(crate) fn coalesce(selection: &mut [TableSelection], max: usize) {
    let total: usize = selection
        .iter()
        .filter_map(|t| t.blocks.as_ref().map(Vec::len))
        .sum();
    if total <= max {
        return;
    }
    // Every gap as (its blocks, table, index of the range after it).
    let mut gaps: Vec<(u32, usize, usize)> = selection
        .iter()
        .enumerate()
        .filter_map(|(t, s)| s.blocks.as_ref().map(|r| (t, r)))
        .flat_map(|(t, r)| (1..r.len()).map(move |i| (r[i].0 - r[i - 1].1, t, i)))
        .collect();
    gaps.sort_unstable();
    let mut merge: HashSet<(usize, usize)> = HashSet::new();
    merge.extend(gaps.iter().take(total - max).map(|&(_, t, i)| (t, i)));
    for (t, s) in selection.iter_mut().enumerate() {
        if let Some(r) = s.blocks.as_mut() {
            let mut out: Vec<(u32, u32)> = Vec::with_capacity(r.len());
            for (i, &range) in r.iter().enumerate() {
                match out.last_mut() {
                    Some(last) if merge.contains(&(t, i)) => last.1 = range.1,
                    _ => out.push(range),
                }
            }
            *r = out;
        }
    }
}

/// The SQL that sums the selected parts of one database's tables: one line per statement,
/// `schema.table`, rows, sum (a table's block ranges may take several statements).
pub fn selection_sql(tables: &[&TableSelection]) -> String {
    let mut sql = String::new();
    for t in tables {
        let name = literal(&format!("{}.{}", t.schema, t.table));
        let from = format!("ONLY {}.{} t", ident(&t.schema), ident(&t.table));
        match &t.blocks {
            None => sql.push_str(&format!(
                "SELECT {name}, count(*), coalesce(sum(hashtextextended(t::text, 0)::numeric), 0) FROM {from};\n"
            )),
            Some(ranges) => {
                for chunk in ranges.chunks(RANGES_PER_STATEMENT) {
                    let parts: Vec<String> = chunk
                        .iter()
                        .map(|(lo, hi)| {
                            format!(
                                "SELECT hashtextextended(t::text, 0)::numeric AS h FROM {from} WHERE t.ctid >= '({lo},0)'::tid AND t.ctid < '({hi},0)'::tid"
                            )
                        })
                        .collect();
                    sql.push_str(&format!(
                        "SELECT {name}, count(*), coalesce(sum(h), 0) FROM ({}) x;\n",
                        parts.join(" UNION ALL ")
                    ));
                }
            }
        }
    }
    sql
}

/// Adds up [`selection_sql`]'s lines into one manifest per table (a selection's checksum is
/// labelled with what it covers, so it never equals a whole-table one by accident).
pub fn selection_manifest(
    database: &str,
    tables: &[&TableSelection],
    out: &str,
) -> Result<DatabaseManifest, String> {
    let sums = selection_sums(out)?;
    let mut manifest = DatabaseManifest {
        name: database.to_string(),
        tables: Vec::new(),
        sequences: Vec::new(),
    };
    for t in tables {
        let name = format!("{}.{}", t.schema, t.table);
        let (rows, sum) = sums.get(&name).copied().unwrap_or_default();
        let what = match &t.blocks {
            None => "full".to_string(),
            Some(r) => format!("blocks {}", blocks_in(r)),
        };
        manifest.tables.push(TableManifest {
            table: name,
            rows,
            checksum: format!("h64 {what}: {sum}"),
        });
    }
    manifest.tables.sort_by(|a, b| a.table.cmp(&b.table));
    Ok(manifest)
}

/// How many blocks `ranges` cover.
pub fn blocks_in(ranges: &[(u32, u32)]) -> u64 {
    ranges.iter().map(|(a, b)| u64::from(b - a)).sum()
}

/// [`selection_sql`]'s lines added up: `schema.table` → (rows, sum).
pub fn selection_sums(out: &str) -> Result<BTreeMap<String, (u64, i128)>, String> {
    let mut sums: BTreeMap<String, (u64, i128)> = BTreeMap::new();
    for line in out.lines().filter(|l| !l.is_empty()) {
        let mut parts = line.split('\t');
        let (Some(table), Some(rows), Some(sum)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(format!("unexpected checksum line {line:?}"));
        };
        let rows: u64 = rows
            .parse()
            .map_err(|_| format!("unexpected row count in {line:?}"))?;
        let sum: i128 = sum
            .parse()
            .map_err(|_| format!("unexpected sum in {line:?}"))?;
        let entry = sums.entry(table.to_string()).or_default();
        entry.0 += rows;
        entry.1 += sum;
    }
    Ok(sums)
}

/// The SQL listing every table of a database with its file and its database's oid and default
/// tablespace, as one JSON line.
const TABLES_SQL: &str = "SELECT pg_catalog.json_build_object('oid', d.oid::int8, 'tablespace', d.dattablespace::int8, 'tables', coalesce((\
     SELECT pg_catalog.json_agg(pg_catalog.json_build_array(n.nspname, c.relname, pg_catalog.pg_relation_filenode(c.oid)::int8, c.reltablespace::int8) ORDER BY n.nspname, c.relname) \
     FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
     WHERE c.relkind = 'r' AND c.relpersistence = 'p' AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%'), '[]')) \
     FROM pg_catalog.pg_database d WHERE d.datname = pg_catalog.current_database();";

#[derive(Deserialize)]
struct TablesAnswer {
    oid: u32,
    tablespace: u32,
    tables: Vec<(String, String, Option<u32>, u32)>,
}

fn current_tables(database: &str, json: &str) -> Result<Vec<CurrentTable>, String> {
    let answer: TablesAnswer = serde_json::from_str(json.trim())
        .map_err(|e| format!("reading {database}'s tables: {e}"))?;
    Ok(answer
        .tables
        .into_iter()
        .map(|(schema, table, filenode, tablespace)| CurrentTable {
            file: TableFile {
                database: database.to_string(),
                schema,
                table,
                filenode: filenode.unwrap_or(0),
            },
            database_oid: answer.oid,
            tablespace: if tablespace == 0 {
                answer.tablespace
            } else {
                tablespace
            },
        })
        .collect())
}

/// BlueMind's databases on this host, and every table of theirs, as `conn` sees them: one
/// psql that finds which of them exist and reconnects to each (a psql process costs more
/// CPU to start than its queries take, on cores the downtime's other steps share).
pub(crate) async fn tables_here(
    config: &AgentConfig,
    conn: &Connection,
) -> Result<(Vec<String>, Vec<CurrentTable>), String> {
    let wanted = &config.postgresql.databases;
    let out = conn
        .psql_warm("postgres", &tables_script(wanted))
        .await
        .map_err(|e| e.to_string())?;
    tables_answer(wanted, &out)
}

/// The psql script of [`tables_here`]: which of `wanted` exist (`\gset`), then for each that
/// does a marker line, a reconnection to it and [`TABLES_SQL`].
fn tables_script(wanted: &[String]) -> String {
    let mut script = String::new();
    for (i, db) in wanted.iter().enumerate() {
        script.push_str(&format!(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_database WHERE datname = {}) AS bmfleet_db{i} \\gset\n",
            literal(db)
        ));
    }
    for (i, db) in wanted.iter().enumerate() {
        // A meta-command's argument: single-quoted, quotes doubled, backslashes escaped.
        let name = db.replace('\\', "\\\\").replace('\'', "''");
        script.push_str(&format!(
            "\\if :bmfleet_db{i}\n\\echo {TABLES_MARKER} {i}\n\\c '{name}'\n{TABLES_SQL}\n\\endif\n"
        ));
    }
    script
}

/// The line [`tables_script`] prints before a database's tables.
const TABLES_MARKER: &str = "bmfleet-database";

/// Reads what [`tables_script`] printed: the databases of `wanted` that exist, in order, and
/// their tables.
fn tables_answer(wanted: &[String], out: &str) -> Result<(Vec<String>, Vec<CurrentTable>), String> {
    let (mut databases, mut tables) = (Vec::new(), Vec::new());
    let mut lines = out.lines().filter(|l| !l.trim().is_empty());
    while let Some(line) = lines.next() {
        let db = line
            .strip_prefix(TABLES_MARKER)
            .and_then(|i| wanted.get(i.trim().parse::<usize>().ok()?))
            .ok_or_else(|| format!("unexpected line {line:?} among the tables"))?;
        let json = lines
            .next()
            .ok_or_else(|| format!("no tables of {db} in the answer"))?;
        tables.extend(current_tables(db, json)?);
        databases.push(db.clone());
    }
    Ok((databases, tables))
}

/// A whole-table checksum of every table, as [`crate::db::pg::Connection::manifest`] computes it,
/// but generated by the server (`\gexec`) so that it runs inside a session's snapshot.
const MANIFEST_GEXEC: &str = "SELECT pg_catalog.format('SELECT %L, count(*), ''h64:'' || coalesce(sum(hashtextextended(t::text, 0)::numeric), 0) FROM ONLY %I.%I t', n.nspname || '.' || c.relname, n.nspname, c.relname) \
     FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
     WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%' ORDER BY 1 \\gexec\n";

fn manifest_of(database: &str, out: &str) -> DatabaseManifest {
    let mut tables: Vec<TableManifest> = out
        .lines()
        .filter_map(|line| {
            let mut parts = line.split('\t');
            Some(TableManifest {
                table: parts.next()?.to_string(),
                rows: parts.next()?.parse().ok()?,
                checksum: parts.next()?.to_string(),
            })
        })
        .collect();
    tables.sort_by(|a, b| a.table.cmp(&b.table));
    DatabaseManifest {
        name: database.to_string(),
        tables,
        sequences: Vec::new(),
    }
}

/// Every table's checksum in each session's snapshot (the sessions at once), each session's
/// transaction ended.
pub(crate) async fn checksum_all(
    sessions: Vec<(String, crate::db::pg::Session)>,
) -> Result<Vec<DatabaseManifest>, String> {
    let running: Vec<_> = sessions
        .into_iter()
        .map(|(db, session)| {
            tokio::spawn(async move {
                let out = session
                    .finish(&format!("{MANIFEST_GEXEC}COMMIT;\n"))
                    .await
                    .map_err(|e| e.to_string())?;
                Ok::<_, String>(manifest_of(&db, &out))
            })
        })
        .collect();
    let mut manifests = Vec::new();
    for task in running {
        manifests.push(task.await.map_err(|e| e.to_string())??);
    }
    Ok(manifests)
}

/// This host's gate slot for `grant_id`, made anew: it keeps this host's WAL from now on.
pub(crate) async fn keep_wal(config: &AgentConfig, grant_id: &str) -> Result<(), String> {
    let slot = literal(&gate_slot(grant_id));
    Connection::admin(&config.postgresql)
        .psql(
            "postgres",
            &format!(
                "SELECT pg_catalog.pg_drop_replication_slot(slot_name) FROM pg_catalog.pg_replication_slots WHERE slot_name = {slot};\n\
                 SELECT pg_catalog.pg_create_physical_replication_slot({slot}, true);\n"
            ),
        )
        .await
        .map(|_| ())
        .map_err(|e| format!("keeping this host's WAL for the gate: {e}"))
}

/// A session of `database` in the snapshot another session exported.
pub(crate) async fn import_snapshot(
    conn: &Connection,
    database: &str,
    snapshot: &str,
) -> Result<crate::db::pg::Session, String> {
    let mut reader = conn.session(database).await.map_err(|e| e.to_string())?;
    reader
        .line(&format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ; SET TRANSACTION SNAPSHOT {}; SELECT 1;",
            literal(snapshot)
        ))
        .await
        .map_err(|e| format!("importing {database}'s snapshot: {e}"))?;
    Ok(reader)
}

/// Sends the last answer and closes the sending side.
pub(crate) async fn last_answer<S: AsyncWrite + Unpin, T: Serialize>(
    stream: &mut S,
    answer: &T,
) -> Result<(), String> {
    use tokio::io::AsyncWriteExt;
    write_json_line(stream, answer)
        .await
        .map_err(|e| e.to_string())?;
    stream.shutdown().await.map_err(|e| e.to_string())
}

/// A database's tables held: the session holding the locks, its exported snapshot, the
/// tables.
pub(crate) type Locked = (crate::db::pg::Session, String, Vec<CurrentTable>);

/// Locks every table of every database in SHARE mode, all at once or none: an attempt that
/// finds one busy (BlueMind writing) lets go of every lock it took, waits and tries again, so
/// BlueMind's writers never wait more than one attempt (300 ms at most) on a busy day.
pub(crate) async fn lock_all(
    bluemind: &Connection,
    databases: &[String],
) -> Result<Vec<Locked>, String> {
    let mut last = String::new();
    for attempt in 0..LOCK_ATTEMPTS {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(50 + 50 * attempt as u64)).await;
        }
        let mut held = Vec::new();
        for db in databases {
            match lock(bluemind, db).await {
                Ok(locked) => held.push(locked),
                Err(e) => {
                    last = e;
                    break;
                }
            }
        }
        if held.len() == databases.len() {
            return Ok(held);
        }
        // Dropping the sessions ends their transactions: the locks go.
    }
    Err(format!(
        "BlueMind's writers kept its tables busy ({LOCK_ATTEMPTS} attempts): {last}"
    ))
}

/// One attempt at locking every table of `database` in SHARE mode and exporting a snapshot.
async fn lock(bluemind: &Connection, database: &str) -> Result<Locked, String> {
    let mut session = bluemind
        .session(database)
        .await
        .map_err(|e| e.to_string())?;
    let snapshot = session
        .line(
            "BEGIN; SET LOCAL lock_timeout = '100ms'; SET LOCAL statement_timeout = '300ms';\n\
             DO $$ BEGIN EXECUTE coalesce((SELECT 'LOCK TABLE ' || pg_catalog.string_agg(pg_catalog.format('ONLY %I.%I', n.nspname, c.relname), ', ') || ' IN SHARE MODE' \
             FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%'), 'SELECT 1'); END $$;\n\
             SET LOCAL statement_timeout = 0; SELECT pg_catalog.pg_export_snapshot();",
        )
        .await
        .map_err(|e| e.to_string())?;
    if snapshot.is_empty() || !snapshot.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
        return Err(format!("unexpected snapshot name {snapshot:?}"));
    }
    let tables = session
        .line(TABLES_SQL)
        .await
        .map_err(|e| format!("listing {database}'s tables: {e}"))?;
    let tables = current_tables(database, &tables)?;
    Ok((session, snapshot, tables))
}

/// Target side: takes a verified point with the origin this standby follows (see the
/// module's doc). Returns what was compared; the point is recorded only when every table
/// matched.
pub async fn establish(
    config: &AgentConfig,
    tls: Arc<rustls::ClientConfig>,
) -> Result<String, String> {
    let state = crate::db::follow::following(config)
        .filter(|s| s.logical.is_none() && !s.promoted)
        .ok_or("this host is not a standby following an origin: no verified point to take")?;
    // A point taken before is void from now on (the origin's gate slot is made anew).
    crate::db::follow::set_following(
        config,
        Some(&crate::db::follow::Following {
            verified: None,
            ..state.clone()
        }),
    )?;
    let owner = Connection::owner(&config.postgresql);
    let (mut stream, held, wanted) = ask_hold(config, tls, &state.endpoint(), false).await?;
    let deadline = Instant::now() + HOLD - Duration::from_secs(1);
    loop {
        let replayed = owner
            .psql("postgres", "SELECT pg_catalog.pg_last_wal_replay_lsn();\n")
            .await
            .map_err(|e| format!("asking the standby how far it replayed: {e}"))?;
        if parse_lsn(&replayed).is_some_and(|r| r >= wanted) {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "the standby did not replay the origin's {} in time (at {})",
                held.lsn,
                replayed.trim()
            ));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let databases = owner
        .existing_databases(&config.postgresql.databases)
        .await
        .map_err(|e| e.to_string())?;
    let mut sessions = Vec::new();
    let mut replayed = String::new();
    for db in &databases {
        let mut session = owner.session(db).await.map_err(|e| e.to_string())?;
        replayed = session
            .line("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT pg_catalog.pg_last_wal_replay_lsn();")
            .await
            .map_err(|e| format!("taking {db}'s snapshot on the standby: {e}"))?;
        sessions.push((db.clone(), session));
    }
    write_json_line(&mut stream, &Taken { replayed })
        .await
        .map_err(|e| e.to_string())?;
    let started = Instant::now();
    let ours = checksum_all(sessions);
    let theirs = read_json_line::<_, OriginSums>(&mut stream);
    let (ours, theirs) = tokio::join!(ours, theirs);
    let ours = ours?;
    let theirs = origin_sums(theirs)?;
    let compared = compare_at(&held, &theirs.databases, &ours, "the standby")?;
    let tables: usize = compared.iter().map(|d| d.tables.len()).sum();
    let replay_ms = replay_past(&owner, &theirs.end_lsn, held.segment_size).await;
    crate::db::follow::set_following(
        config,
        Some(&crate::db::follow::Following {
            verified: Some(VerifiedPoint {
                lsn: held.lsn.clone(),
                tables: theirs.tables,
            }),
            ..state
        }),
    )?;
    Ok(format!(
        "verified point at {}: {tables} tables in {} databases equal ({} ms; then {replay_ms} ms replaying the origin's pruning)",
        held.lsn,
        compared.len(),
        started.elapsed().as_millis()
    ))
}

/// Waits (up to 10 s, live) until the standby replayed the origin's `end_lsn`: the pages
/// the origin's reads pruned (records whose replay waited for this host's snapshots, with
/// the startup process's back-off of up to a second) then cost the downtime's catch-up
/// nothing. Best effort: the catch-up in the downtime waits for whatever is left. Returns
/// the time it took.
async fn replay_past(owner: &Connection, end_lsn: &str, segment_size: u64) -> u128 {
    let started = Instant::now();
    let Some(end) = parse_lsn(end_lsn).map(|l| caught_up_at(l, segment_size)) else {
        return 0;
    };
    while started.elapsed() < Duration::from_secs(10) {
        let replayed = owner
            .psql("postgres", "SELECT pg_catalog.pg_last_wal_replay_lsn();\n")
            .await;
        match replayed {
            Ok(r) if parse_lsn(&r).is_some_and(|r| r >= end) => break,
            Ok(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            Err(e) => {
                tracing::warn!(error = %e, "asking the standby how far it replayed");
                break;
            }
        }
    }
    started.elapsed().as_millis()
}

/// Asks the origin (under the replication grant of `origin`) to hold its tables for a
/// verified point (`per_block`: a subscriber's); returns the tunnel, the origin's [`Held`]
/// and the position this host must have applied to hold the same rows.
pub(crate) async fn ask_hold(
    config: &AgentConfig,
    tls: Arc<rustls::ClientConfig>,
    origin: &OriginEndpoint,
    per_block: bool,
) -> Result<(tunnel::Tunnel, Held, u64), String> {
    let timeout = Duration::from_secs(config.data_plane.connect_timeout_secs);
    let request = TunnelRequest::VerifiedPoint {
        grant: origin.grant_id.clone(),
        per_block,
    };
    let (stream, held): (_, Held) = tunnel::ask(
        origin,
        tls,
        &request,
        timeout,
        "the origin's verified point",
    )
    .await?;
    if !held.error.is_empty() {
        return Err(format!("the origin: {}", held.error));
    }
    let lsn = parse_lsn(&held.lsn)
        .ok_or_else(|| format!("the origin's position {:?} is not an LSN", held.lsn))?;
    let wanted = caught_up_at(lsn, held.segment_size);
    Ok((stream, held, wanted))
}

/// The origin's [`OriginSums`] as read, or why they make no verified point.
pub(crate) fn origin_sums(
    read: Result<OriginSums, tunnel::LineError>,
) -> Result<OriginSums, String> {
    let theirs = read.map_err(|e| format!("reading the origin's sums: {e}"))?;
    if !theirs.error.is_empty() {
        return Err(format!("the origin's sums: {}", theirs.error));
    }
    if !theirs.released_in_time {
        return Err(
            "the origin let go of its tables before this host's snapshot: not a verified point"
                .into(),
        );
    }
    Ok(theirs)
}

/// Both sides' sums at the point compared: every table equal, or which differ (`here`
/// names this host).
pub(crate) fn compare_at(
    held: &Held,
    theirs: &[DatabaseManifest],
    ours: &[DatabaseManifest],
    here: &str,
) -> Result<Vec<bmfleet_proto::v1::DatabaseMove>, String> {
    let compared = crate::db::compare::compare_manifests(theirs, ours, 0);
    let differing: Vec<String> = compared
        .iter()
        .flat_map(|d| {
            d.tables
                .iter()
                .filter(|t| !t.equal)
                .map(move |t| format!("{}.{}", d.name, t.table))
        })
        .collect();
    if differing.is_empty() {
        Ok(compared)
    } else {
        Err(format!(
            "{here} differs from the origin at {}: {}",
            held.lsn,
            differing.join(", ")
        ))
    }
}

/// Origin side of [`compare_changed`]: reads the WAL from `since` to the stopped origin's
/// position, answers the [`Selection`] (admitted first), then the sums of the
/// selected parts ([`SelectedSums`]).
pub async fn serve_changed<S>(
    config: &AgentConfig,
    bluemind: &Connection,
    since: &str,
    verified: &[TableFile],
    stream: &mut S,
) -> Result<(), String>
where
    S: AsyncBufRead + AsyncWrite + Unpin,
{
    parse_lsn(since).ok_or_else(|| format!("{since:?} is not an LSN"))?;
    // Admitted before reading the WAL (a busy day's takes a while): what fails from here on
    // reaches the target as the `error` of its `Selection`.
    admit(stream).await?;
    let started = Instant::now();
    let took = || started.elapsed().as_millis() as u64;
    let ((until, named, wal_ms), (databases, current, tables_ms)) = tokio::try_join!(
        async {
            let (until, named) = blocks_named_since(config, since).await?;
            Ok::<_, String>((until, named, took()))
        },
        async {
            let (databases, current) = tables_here(config, bluemind).await?;
            Ok((databases, current, took()))
        }
    )?;
    let selection = Selection {
        since: since.to_string(),
        until,
        tables: select(verified, &current, &named),
        error: String::new(),
        origin_ms: (wal_ms, tables_ms),
    };
    write_json_line(stream, &selection)
        .await
        .map_err(|e| e.to_string())?;
    let answer = match sums(bluemind, &databases, &selection.tables).await {
        Ok(databases) => SelectedSums {
            databases,
            error: String::new(),
        },
        Err(error) => SelectedSums {
            error,
            ..Default::default()
        },
    };
    last_answer(stream, &answer).await
}

/// This host's WAL position now, and the heap blocks its WAL names from `since` to it
/// (written out first: `pg_waldump` reads files).
pub(crate) async fn blocks_named_since(
    config: &AgentConfig,
    since: &str,
) -> Result<(String, BTreeSet<BlockRef>), String> {
    let start = parse_lsn(since).ok_or_else(|| format!("{since:?} is not an LSN"))?;
    // Flushed (pg_waldump reads files); where pg_waldump and the WAL are, in the same psql
    // (a process fewer on cores the downtime's other steps share).
    let (position, facts) = crate::db::wal::wal_position_and(config, FACTS_SQL).await?;
    let insert =
        parse_lsn(&position.lsn).ok_or_else(|| format!("{:?} is not an LSN", position.lsn))?;
    // An insert position right after a page header (an idle cluster after a segment switch)
    // is the boundary: nothing is written past it until the next record, so nothing waits.
    let end = caught_up_at(insert, position.segment_size);
    let until = crate::db::wal::lsn_text(end);
    let named = if end > start {
        named_blocks(config, &facts, since, &until).await?
    } else {
        BTreeSet::new()
    };
    Ok((until, named))
}

/// The server's data directory and major, as `data_dir\tmajor`.
const FACTS_SQL: &str = "SELECT pg_catalog.current_setting('data_directory'), pg_catalog.current_setting('server_version_num')::int / 10000;\n";

/// The heap blocks this host's WAL names between `since` and `until` (`pg_waldump` of the
/// server's own major, reading `pg_wal`; `facts` as [`FACTS_SQL`] answers).
async fn named_blocks(
    config: &AgentConfig,
    facts: &str,
    since: &str,
    until: &str,
) -> Result<BTreeSet<BlockRef>, String> {
    let (data_dir, major) = facts
        .trim()
        .split_once('\t')
        .ok_or_else(|| format!("unexpected answer {facts:?}"))?;
    let own = std::path::PathBuf::from(format!("/usr/lib/postgresql/{major}/bin/pg_waldump"));
    let exe = if own.exists() {
        own
    } else {
        crate::db::pg::bin_dir(&config.postgresql).join("pg_waldump")
    };
    let wal = std::path::Path::new(data_dir).join("pg_wal");
    let argv: Vec<String> = vec![
        exe.display().to_string(),
        "-p".into(),
        wal.display().to_string(),
        "-s".into(),
        since.into(),
        "-e".into(),
        until.into(),
    ];
    let mut child = crate::command::prefixed(&config.postgresql.admin_command_prefix, &argv)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start pg_waldump: {e}"))?;
    let stdout = child.stdout.take().ok_or("pg_waldump has no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let mut named = BTreeSet::new();
    while let Some(line) = lines.next_line().await.map_err(|e| e.to_string())? {
        named.extend(block_refs(&line));
    }
    let out = child.wait_with_output().await.map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!(
            "pg_waldump {since}..{until} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(named)
}

/// The sums of `selection`'s parts in each of `databases` (tables of other databases left
/// out), by `conn`.
async fn sums(
    conn: &Connection,
    databases: &[String],
    selection: &[TableSelection],
) -> Result<Vec<DatabaseManifest>, String> {
    // One session per database, side by side.
    let each = databases.iter().map(|db| async move {
        let tables: Vec<&TableSelection> = selection.iter().filter(|t| &t.database == db).collect();
        // Nothing selected (no block changed since the verified point): no session at all.
        let sql = selection_sql(&tables);
        let out = if sql.is_empty() {
            String::new()
        } else {
            conn.psql(db, &sql).await.map_err(|e| e.to_string())?
        };
        selection_manifest(db, &tables, &out)
    });
    futures_util::future::try_join_all(each).await
}

/// Target side of the downtime's gate, first half (started as soon as the origin stopped):
/// asks the origin for the blocks changed since `verified`. `origin` carries the step's
/// databases grant.
pub async fn ask_changed(
    config: &AgentConfig,
    tls: Arc<rustls::ClientConfig>,
    origin: &OriginEndpoint,
    verified: &VerifiedPoint,
) -> Result<(tunnel::Tunnel, Selection), String> {
    let timeout = Duration::from_secs(config.data_plane.connect_timeout_secs);
    let request = TunnelRequest::ChangedBlocks {
        grant: origin.grant_id.clone(),
        since: verified.lsn.clone(),
        tables: verified.tables.clone(),
    };
    let (stream, selection): (_, Selection) = tunnel::ask(
        origin,
        tls,
        &request,
        timeout,
        "the blocks changed since the verified point",
    )
    .await?;
    if !selection.error.is_empty() {
        return Err(selection.error);
    }
    Ok((stream, selection))
}

/// The gate's comparison: the origin's sums of what it selected, and this host's (its
/// databases final); and a line saying what was covered.
pub type Compared = (Vec<DatabaseManifest>, Vec<DatabaseManifest>, String);

/// This host's tables as [`compare_selection`] needs them (`tables_here` by `owner`), read
/// once its databases are final, while the origin still reads its WAL.
pub type TablesHere = (Vec<String>, Vec<CurrentTable>);

/// Target side of the downtime's gate, second half (this host's databases are final, `here`
/// read since): sums the origin's selection here while the origin sends its own.
pub async fn compare_selection(
    owner: &Connection,
    here: TablesHere,
    mut stream: tunnel::Tunnel,
    selection: Selection,
) -> Result<Compared, String> {
    let (databases, mine) = here;
    let present: Vec<TableSelection> = selection
        .tables
        .iter()
        .filter(|t| {
            mine.iter().any(|m| {
                m.file.database == t.database
                    && m.file.schema == t.schema
                    && m.file.table == t.table
            })
        })
        .cloned()
        .collect();
    let ours = sums(owner, &databases, &present);
    let theirs = read_json_line::<_, SelectedSums>(&mut stream);
    let (ours, theirs) = tokio::join!(ours, theirs);
    let mut ours = ours?;
    let theirs = theirs.map_err(|e| format!("reading the origin's sums: {e}"))?;
    if !theirs.error.is_empty() {
        return Err(format!("the origin's sums: {}", theirs.error));
    }
    // A table only this host has differs from the origin (which has no such table).
    for extra in mine.iter().filter(|m| {
        !selection.tables.iter().any(|t| {
            m.file.database == t.database && m.file.schema == t.schema && m.file.table == t.table
        })
    }) {
        if let Some(db) = ours.iter_mut().find(|d| d.name == extra.file.database) {
            db.tables.push(TableManifest {
                table: format!("{}.{}", extra.file.schema, extra.file.table),
                rows: 0,
                checksum: "only on the target".into(),
            });
        }
    }
    let blocks: u64 = selection
        .tables
        .iter()
        .filter_map(|t| t.blocks.as_deref())
        .map(blocks_in)
        .sum();
    let full: Vec<String> = selection
        .tables
        .iter()
        .filter(|t| t.blocks.is_none())
        .map(|t| format!("{}.{}.{}", t.database, t.schema, t.table))
        .collect();
    let wal = parse_lsn(&selection.until)
        .zip(parse_lsn(&selection.since))
        .map_or(0, |(u, s)| u.saturating_sub(s));
    let (wal_ms, tables_ms) = selection.origin_ms;
    let summary = format!(
        "changes since the verified point {} ({} KiB of WAL): {blocks} blocks of {} tables compared{} (the origin read its WAL in {wal_ms} ms and listed its tables in {tables_ms} ms)",
        selection.since,
        wal / 1024,
        selection.tables.len(),
        if full.is_empty() {
            String::new()
        } else {
            format!("; in full (rewritten or new): {}", full.join(", "))
        }
    );
    Ok((theirs.databases, ours, summary))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_psql_lists_the_tables_of_the_databases_that_exist() {
        let wanted = vec!["bj".to_string(), "bj-data".to_string(), "it's".to_string()];
        let script = tables_script(&wanted);
        assert!(script.contains("\\c 'bj-data'\n") && script.contains("\\c 'it''s'\n"));
        assert_eq!(script.matches("\\gset").count(), 3);
        // bj-data does not exist here: no marker for it.
        let out = "bmfleet-database 0\n{\"oid\": 16384, \"tablespace\": 1663, \"tables\": [[\"public\", \"t_mailbox\", 16400, 0]]}\n\
                   bmfleet-database 2\n{\"oid\": 16390, \"tablespace\": 1663, \"tables\": []}\n";
        let (databases, tables) = tables_answer(&wanted, out).unwrap();
        assert_eq!(databases, ["bj", "it's"]);
        assert_eq!(tables.len(), 1);
        assert_eq!(
            (
                tables[0].file.database.as_str(),
                tables[0].file.table.as_str(),
                tables[0].file.filenode
            ),
            ("bj", "t_mailbox", 16400)
        );
        assert!(tables_answer(&wanted, "bmfleet-database 7\n{}\n").is_err());
        assert!(tables_answer(&wanted, "bmfleet-database 0\n").is_err());
    }

    #[test]
    fn waldump_lines_name_main_fork_blocks() {
        let line = "rmgr: Heap        len (rec/tot):     80/    80, tx:        725, lsn: 0/027818B0, prev 0/0277F860, desc: UPDATE off 40 xmax 725 flags 0x00 ; new off 82 xmax 0, blkref #0: rel 1663/5/16384 blk 1666, blkref #1: rel 1663/5/16384 blk 833";
        assert_eq!(
            block_refs(line),
            [
                BlockRef {
                    tablespace: 1663,
                    database: 5,
                    filenode: 16384,
                    block: 1666
                },
                BlockRef {
                    tablespace: 1663,
                    database: 5,
                    filenode: 16384,
                    block: 833
                },
            ]
        );
        let fpw = "rmgr: Heap        len (rec/tot):     59/  8243, tx:        725, lsn: 0/0277C248, prev 0/0277BDE8, desc: LOCK off 5: xid 725: flags 0x00 LOCK_ONLY EXCL_LOCK , blkref #0: rel 1663/5/16384 blk 0 FPW";
        assert_eq!(block_refs(fpw).len(), 1);
        let vm = "rmgr: Heap        len (rec/tot):     59/    59, tx:        726, lsn: 0/01, prev 0/00, desc: DELETE xmax: 726, off: 2, infobits: [KEYS_UPDATED], flags: 0x01, blkref #0: rel 1663/5/16384 fork vm blk 0, blkref #1: rel 1663/5/16384 blk 3";
        let multi = "rmgr: Heap2       len (rec/tot):   1160/  1160, tx:        727, lsn: 0/02, prev 0/01, desc: MULTI_INSERT ntuples: 61, flags: 0x00, blkref #0: rel 1663/5/16384 blk 3";
        for line in [vm, multi] {
            assert_eq!(
                block_refs(line),
                [BlockRef {
                    tablespace: 1663,
                    database: 5,
                    filenode: 16384,
                    block: 3
                }],
                "{line}"
            );
        }
        for nothing in [
            "rmgr: XLOG        len (rec/tot):     49/  8241, tx:          0, lsn: 0/0300A0B8, prev 0/0300A080, desc: FPI_FOR_HINT , blkref #0: rel 1663/5/16384 blk 12 FPW",
            // Vacuum and pruning (15/16, then 17's names).
            "rmgr: Heap2       len (rec/tot):     59/    59, tx:          0, lsn: 0/01, prev 0/00, desc: VISIBLE snapshotConflictHorizon: 0, flags: 0x03, blkref #0: rel 1663/5/16384 fork vm blk 0, blkref #1: rel 1663/5/16384 blk 3",
            "rmgr: Heap2       len (rec/tot):     62/    62, tx:          0, lsn: 0/02, prev 0/01, desc: PRUNE snapshotConflictHorizon: 731, nredirected: 0, ndead: 2, isCatalogRel: F, nunused: 0, redirected: [], dead: [4, 5], unused: [], blkref #0: rel 1663/5/16384 blk 7",
            "rmgr: Heap2       len (rec/tot):     58/    58, tx:          0, lsn: 0/03, prev 0/02, desc: PRUNE latestRemovedXid 731 nredirected 0 ndead 2, blkref #0: rel 1663/5/16384 blk 7",
            "rmgr: Heap2       len (rec/tot):     54/    54, tx:          0, lsn: 0/04, prev 0/03, desc: VACUUM nunused: 2, unused: [4, 5], blkref #0: rel 1663/5/16384 blk 7",
            "rmgr: Heap2       len (rec/tot):     64/  8260, tx:          0, lsn: 0/05, prev 0/04, desc: FREEZE_PAGE snapshotConflictHorizon: 730, nplans: 1, isCatalogRel: F, plans: [{ xmax: 0, infomask: 2304, infomask2: 2, ntuples: 61, offsets: [1, 2] }], blkref #0: rel 1663/5/16384 blk 8 FPW",
            "rmgr: Heap2       len (rec/tot):     70/    70, tx:          0, lsn: 0/06, prev 0/05, desc: PRUNE_VACUUM_SCAN snapshotConflictHorizon: 731, isCatalogRel: F, nplans: 0, nredirected: 0, ndead: 0, nunused: 2, unused: [4, 5], blkref #0: rel 1663/5/16384 blk 7",
            "rmgr: Transaction len (rec/tot):     34/    34, tx:        725, lsn: 0/02783A18, prev 0/027839D8, desc: COMMIT 2026-11-30 09:11:42.321088 UTC",
            "blkref #0: rel 1663/5 blk 3",
            "blkref #0: rel x/y/z blk 3",
            "blkref #0: rel 1663/5/16384 blk nope",
            "",
        ] {
            assert!(block_refs(nothing).is_empty(), "{nothing}");
        }
    }

    #[test]
    fn consecutive_blocks_make_one_range() {
        let blocks: BTreeSet<u32> = [0, 1, 2, 5, 7, 8, u32::MAX].into_iter().collect();
        assert_eq!(
            ranges(&blocks),
            [(0, 3), (5, 6), (7, 9), (u32::MAX, u32::MAX)]
        );
        assert!(ranges(&BTreeSet::new()).is_empty());
    }

    type Blocks = Option<Vec<(u32, u32)>>;

    fn file(table: &str, filenode: u32) -> TableFile {
        TableFile {
            database: "bj".into(),
            schema: "public".into(),
            table: table.into(),
            filenode,
        }
    }

    fn current(table: &str, filenode: u32) -> CurrentTable {
        CurrentTable {
            file: file(table, filenode),
            database_oid: 16384,
            tablespace: 1663,
        }
    }

    #[test]
    fn unchanged_files_are_compared_in_their_named_blocks_and_others_in_full() {
        let verified = [file("a", 100), file("b", 200), file("gone", 300)];
        let now = [current("a", 100), current("b", 201), current("new", 400)];
        let named: BTreeSet<BlockRef> = [
            (100, 4),
            (100, 5),
            (100, 9),
            // Another database's file with the same node: not a's.
            (999, 77),
        ]
        .into_iter()
        .map(|(filenode, block)| BlockRef {
            tablespace: 1663,
            database: if filenode == 999 { 1 } else { 16384 },
            filenode: if filenode == 999 { 100 } else { filenode },
            block,
        })
        .collect();
        let chosen = select(&verified, &now, &named);
        let by_name: Vec<(&str, Blocks)> = chosen
            .iter()
            .map(|t| (t.table.as_str(), t.blocks.clone()))
            .collect();
        assert_eq!(
            by_name,
            [
                ("a", Some(vec![(4, 6), (9, 10)])),
                ("b", None),
                ("new", None),
            ]
        );
        // A table unchanged and not named: compared in no block at all.
        let quiet = select(&[file("a", 100)], &[current("a", 100)], &BTreeSet::new());
        assert_eq!(quiet[0].blocks, Some(vec![]));
    }

    #[test]
    fn too_many_ranges_are_merged_across_the_smallest_gaps() {
        let table = |name: &str, blocks: Blocks| TableSelection {
            database: "bj".into(),
            schema: "public".into(),
            table: name.into(),
            blocks,
        };
        let mut chosen = vec![
            table("a", Some(vec![(0, 1), (3, 4), (10, 11)])),
            table("full", None),
            table("b", Some(vec![(100, 101), (102, 103)])),
        ];
        coalesce(&mut chosen, 5);
        assert_eq!(chosen[0].blocks, Some(vec![(0, 1), (3, 4), (10, 11)]));
        coalesce(&mut chosen, 3);
        let blocks: Vec<Blocks> = chosen.iter().map(|t| t.blocks.clone()).collect();
        assert_eq!(
            blocks,
            [Some(vec![(0, 4), (10, 11)]), None, Some(vec![(100, 103)])]
        );
        // Never fewer than one range per table.
        coalesce(&mut chosen, 0);
        assert_eq!(chosen[0].blocks, Some(vec![(0, 11)]));
        assert_eq!(chosen[2].blocks, Some(vec![(100, 103)]));
    }

    #[test]
    fn a_busy_days_selection_of_long_named_tables_stays_one_data_plane_line() {
        // BlueMind's 104 tables with the longest names PostgreSQL allows, each with 500
        // scattered blocks named near the top of the block numbers.
        let long = |c: char, n: usize| format!("{c}{n:03}").repeat(16)[..63].to_string();
        let mut verified = Vec::new();
        let mut now = Vec::new();
        let mut named = BTreeSet::new();
        for n in 0..104u32 {
            let f = TableFile {
                database: long('d', 0),
                schema: long('s', 0),
                table: long('t', n as usize),
                filenode: 20_000 + n,
            };
            verified.push(f.clone());
            now.push(CurrentTable {
                file: f,
                database_oid: 16384,
                tablespace: 1663,
            });
            for k in 0..500u32 {
                named.insert(BlockRef {
                    tablespace: 1663,
                    database: 16384,
                    filenode: 20_000 + n,
                    block: 4_000_000_000 + 7 * k * (n + 1),
                });
            }
        }
        let chosen = select(&verified, &now, &named);
        let ranges: usize = chosen
            .iter()
            .filter_map(|t| t.blocks.as_ref())
            .map(Vec::len)
            .sum();
        assert_eq!(ranges, MAX_SELECTED_RANGES);
        // Every named block is still compared.
        for r in &named {
            let t = &chosen[(r.filenode - 20_000) as usize];
            let covered = t
                .blocks
                .as_ref()
                .is_some_and(|b| b.iter().any(|(lo, hi)| (*lo..*hi).contains(&r.block)));
            assert!(covered, "{r:?}");
        }
        let line = serde_json::to_vec(&Selection {
            since: "FFFFFFFF/FFFFFFFF".into(),
            until: "FFFFFFFF/FFFFFFFF".into(),
            tables: chosen,
            error: String::new(),
            origin_ms: (u64::MAX, u64::MAX),
        })
        .unwrap();
        assert!(line.len() < tunnel::MAX_LINE, "{} bytes", line.len());
    }

    #[test]
    fn selection_sql_quotes_the_origins_names_and_counts_blocks() {
        let hostile = TableSelection {
            database: "bj".into(),
            schema: "public\"; DROP TABLE x; --".into(),
            table: "t'".into(),
            blocks: Some(vec![(3, 5)]),
        };
        let sql = selection_sql(&[&hostile]);
        assert!(
            sql.contains("ONLY \"public\"\"; DROP TABLE x; --\".\"t'\" t"),
            "{sql}"
        );
        assert!(sql.contains("'public\"; DROP TABLE x; --.t'''"), "{sql}");
        assert!(
            sql.contains("t.ctid >= '(3,0)'::tid AND t.ctid < '(5,0)'::tid"),
            "{sql}"
        );
        let many = TableSelection {
            blocks: Some((0..2500).map(|b| (2 * b, 2 * b + 1)).collect()),
            ..hostile.clone()
        };
        assert_eq!(selection_sql(&[&many]).lines().count(), 3);
        let out = "public\"; DROP TABLE x; --.t'\t2\t-5\npublic\"; DROP TABLE x; --.t'\t1\t9223372036854775807\n";
        let m = selection_manifest("bj", &[&many], out).unwrap();
        assert_eq!(m.tables[0].rows, 3);
        assert_eq!(m.tables[0].checksum, "h64 blocks 2500: 9223372036854775802");
        let full = TableSelection {
            blocks: None,
            ..hostile
        };
        let m = selection_manifest("bj", &[&full], "").unwrap();
        assert_eq!(
            (m.tables[0].rows, m.tables[0].checksum.as_str()),
            (0, "h64 full: 0")
        );
        assert!(selection_manifest("bj", &[&full], "garbage").is_err());
    }

    #[test]
    fn the_gate_slot_is_named_after_the_grant() {
        assert_eq!(gate_slot("AbC-123"), "bmfleet_gate_abc123");
    }
}
