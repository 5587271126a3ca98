//! A subscriber's verified point: each side's sums block by block, so that the downtime's
//! gate re-sums only the blocks each side's own WAL names since.
//!
//! A physical standby's tables are the origin's files, block for block: the gate compares the
//! same blocks on both sides ([`crate::db::gate::verified_point`]). A logical subscriber's are other
//! files, its rows elsewhere, so each side keeps its own account instead:
//!
//! 1. Live, at the pre-window pass ([`establish`]): the target keeps its own WAL from now on
//!    (a physical slot of its own); the origin keeps its WAL, locks BlueMind's tables, takes
//!    its snapshots at its position `L_o` and says so; the target waits until its
//!    subscriptions have applied `L_o`, locks its own tables (the apply is idle: nothing is
//!    written on the origin), takes its snapshots at its own position `L_t` and says so; both
//!    let go. Each side sums every table *block by block* in its snapshots (`ctid`'s block)
//!    and keeps those sums on its own disk; the totals are compared. Equal everywhere: the
//!    target records the point (`L_o`; its own sums hold `L_t`).
//! 2. In the downtime ([`totals_since`], on each side, the origin stopped and the target
//!    caught up): the blocks its own WAL names since its own point are summed again; a table's
//!    total is the point's, less those blocks' sums then, plus their sums now (a table whose
//!    file changed, or a new one, is summed in full). The two sides' totals are compared.
//!    Nothing changes a block's visible rows without the WAL naming the block once no writer
//!    is in flight, which the locks at the point guarantee on both sides.
//!
//! Any doubt (no point, a point for another position, the WAL gone) and the gate compares
//! every table in full, and says why. What the target runs in its databases (which came from
//! the origin) runs as the owner role with `search_path` pinned to `pg_catalog`; the origin's
//! sums reach the target only as numbers to compare.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufRead, AsyncWrite};

use crate::config::AgentConfig;
use crate::db::follow::Following;
use crate::db::gate::verified_point::{
    blocks_in, select, selection_sql, selection_sums, OriginSums, TableSelection, Taken,
};
use crate::db::pg::{literal, Connection, DatabaseManifest, TableManifest};
use crate::db::wal::{gate_slot, parse_lsn};
use crate::plane::tunnel::TableFile;
use crate::plane::tunnel::{self, read_json_line, write_json_line, TunnelRequest};
use bmfleet_proto::v1::OriginEndpoint;

/// The origin's point (for the replication grant it was taken under), in its state dir.
const ORIGIN_FILE: &str = "block-point-origin.json";
/// The target's own point, in its state dir.
const TARGET_FILE: &str = "block-point-target.json";

/// One block's rows and the sum of their hashes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockSum {
    /// The block number.
    pub block: u32,
    /// Visible rows in it.
    pub rows: u64,
    /// The sum of their `hashtextextended(row::text, 0)`.
    pub sum: i128,
}

/// One table's sums, block by block (blocks without rows left out).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableBlocks {
    /// The table and its file.
    pub file: TableFile,
    /// Ascending by block.
    pub blocks: Vec<BlockSum>,
}

/// One side's verified point, kept on its own disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockPoint {
    /// The replication grant it was taken under (the origin's; empty on the target).
    #[serde(default)]
    pub grant_id: String,
    /// This side's WAL position at its snapshots.
    pub lsn: String,
    /// Every table's sums then.
    pub tables: Vec<TableBlocks>,
}

/// The origin's answer to [`TunnelRequest::ChangedTotals`].
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct PointTotals {
    /// Every table's rows and sum now.
    #[serde(default)]
    pub databases: Vec<DatabaseManifest>,
    /// What was summed again.
    #[serde(default)]
    pub covered: String,
    /// Why not.
    #[serde(default)]
    pub error: String,
}

impl BlockPoint {
    /// Every table's total (rows and sum), database by database.
    pub fn totals(&self) -> Vec<DatabaseManifest> {
        let mut by_db: BTreeMap<String, Vec<TableManifest>> = BTreeMap::new();
        for t in &self.tables {
            let (rows, sum) = t
                .blocks
                .iter()
                .fold((0u64, 0i128), |(r, s), b| (r + b.rows, s + b.sum));
            by_db
                .entry(t.file.database.clone())
                .or_default()
                .push(total(&t.file.schema, &t.file.table, rows, sum));
        }
        manifests(by_db)
    }

    /// Every table's total now: the point's, with the blocks `selection` names summed again
    /// (`now`: database → `schema.table` → rows and sum of the selected part), or in full.
    pub fn totals_after(
        &self,
        selection: &[TableSelection],
        now: &BTreeMap<String, BTreeMap<String, (u64, i128)>>,
    ) -> Vec<DatabaseManifest> {
        let mut by_db: BTreeMap<String, Vec<TableManifest>> = BTreeMap::new();
        for t in selection {
            let name = format!("{}.{}", t.schema, t.table);
            let (now_rows, now_sum) = now
                .get(&t.database)
                .and_then(|d| d.get(&name))
                .copied()
                .unwrap_or_default();
            let (mut rows, mut sum) = (i128::from(now_rows), now_sum);
            if let Some(ranges) = &t.blocks {
                let point = self.tables.iter().find(|p| {
                    p.file.database == t.database
                        && p.file.schema == t.schema
                        && p.file.table == t.table
                });
                for b in point.map(|p| p.blocks.as_slice()).unwrap_or_default() {
                    if !in_ranges(ranges, b.block) {
                        rows += i128::from(b.rows);
                        sum += b.sum;
                    }
                }
            }
            by_db.entry(t.database.clone()).or_default().push(total(
                &t.schema,
                &t.table,
                u64::try_from(rows).unwrap_or(0),
                sum,
            ));
        }
        manifests(by_db)
    }

    fn files(&self) -> Vec<TableFile> {
        self.tables.iter().map(|t| t.file.clone()).collect()
    }
}

/// Whether `block` lies in one of `ranges` (ascending, disjoint `[start, end)`, as
/// [`crate::db::gate::verified_point::ranges`] makes them): a binary search, the downtime runs it for
/// every block of every table the WAL names.
fn in_ranges(ranges: &[(u32, u32)], block: u32) -> bool {
    let after = ranges.partition_point(|(_, end)| *end <= block);
    ranges.get(after).is_some_and(|(start, _)| *start <= block)
}

fn total(schema: &str, table: &str, rows: u64, sum: i128) -> TableManifest {
    TableManifest {
        table: format!("{schema}.{table}"),
        rows,
        checksum: format!("h64 total: {sum}"),
    }
}

fn manifests(by_db: BTreeMap<String, Vec<TableManifest>>) -> Vec<DatabaseManifest> {
    by_db
        .into_iter()
        .map(|(name, mut tables)| {
            tables.sort_by(|a, b| a.table.cmp(&b.table));
            DatabaseManifest {
                name,
                tables,
                sequences: Vec::new(),
            }
        })
        .collect()
}

/// Every permanent table's sums block by block, generated by the server (`\gexec`) so that
/// it runs inside a session's snapshot: `schema.table`, block, rows, sum per line.
const BLOCK_SUMS_GEXEC: &str = "SELECT pg_catalog.format('SELECT %L, (t.ctid::text::point)[0]::int8, count(*), sum(hashtextextended(t::text, 0)::numeric) FROM ONLY %I.%I t GROUP BY 2', n.nspname || '.' || c.relname, n.nspname, c.relname) \
     FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
     WHERE c.relkind = 'r' AND c.relpersistence = 'p' AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%' ORDER BY 1 \\gexec\n";

/// [`BLOCK_SUMS_GEXEC`]'s lines, for the tables of `files` in `database`.
pub fn parse_block_sums(
    database: &str,
    files: &[TableFile],
    out: &str,
) -> Result<Vec<TableBlocks>, String> {
    let mut by_table: BTreeMap<&str, Vec<BlockSum>> = BTreeMap::new();
    for line in out.lines().filter(|l| !l.is_empty()) {
        let mut parts = line.split('\t');
        let (Some(table), Some(block), Some(rows), Some(sum), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(format!("unexpected block sum line {line:?}"));
        };
        let bad = || format!("unexpected block sum line {line:?}");
        by_table.entry(table).or_default().push(BlockSum {
            block: block.parse().map_err(|_| bad())?,
            rows: rows.parse().map_err(|_| bad())?,
            sum: sum.parse().map_err(|_| bad())?,
        });
    }
    Ok(files
        .iter()
        .filter(|f| f.database == database)
        .map(|f| {
            let mut blocks = by_table
                .remove(format!("{}.{}", f.schema, f.table).as_str())
                .unwrap_or_default();
            blocks.sort_by_key(|b| b.block);
            TableBlocks {
                file: f.clone(),
                blocks,
            }
        })
        .collect())
}

/// Every table's sums block by block in each session's snapshot (the sessions at once),
/// each session's transaction ended.
pub async fn block_sums(
    sessions: Vec<(String, crate::db::pg::Session)>,
    files: &[TableFile],
) -> Result<Vec<TableBlocks>, String> {
    let running: Vec<_> = sessions
        .into_iter()
        .map(|(db, session)| {
            let files = files.to_vec();
            tokio::spawn(async move {
                let out = session
                    .finish(&format!("{BLOCK_SUMS_GEXEC}COMMIT;\n"))
                    .await
                    .map_err(|e| e.to_string())?;
                parse_block_sums(&db, &files, &out)
            })
        })
        .collect();
    let mut tables = Vec::new();
    for task in running {
        tables.extend(task.await.map_err(|e| e.to_string())??);
    }
    Ok(tables)
}

fn path(config: &AgentConfig, file: &str) -> std::path::PathBuf {
    config.state_dir.join(file)
}

fn save(config: &AgentConfig, file: &str, point: &BlockPoint) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let path = path(config, file);
    let tmp = path.with_extension("json.tmp");
    let json = serde_json::to_vec(point).map_err(|e| e.to_string())?;
    std::fs::write(&tmp, json)
        .and_then(|()| std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)))
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map_err(|e| format!("writing {}: {e}", path.display()))
}

fn load(config: &AgentConfig, file: &str) -> Result<BlockPoint, String> {
    let path = path(config, file);
    let text = std::fs::read(&path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    serde_json::from_slice(&text).map_err(|e| format!("reading {}: {e}", path.display()))
}

/// Forgets a point this host keeps (the target's own, or the origin's for `grant_id`).
pub fn forget(config: &AgentConfig, grant_id: Option<&str>) {
    let file = match grant_id {
        None => TARGET_FILE,
        Some(grant) => match load(config, ORIGIN_FILE) {
            Ok(point) if point.grant_id == grant => ORIGIN_FILE,
            _ => return,
        },
    };
    let _ = std::fs::remove_file(path(config, file));
}

/// Origin side of [`establish`], once the target's snapshots are taken: sums every table
/// block by block in `readers`' snapshots, keeps them (for `grant_id`, at `lsn`), and
/// answers the totals.
pub async fn origin_point(
    config: &AgentConfig,
    grant_id: &str,
    lsn: &str,
    readers: Vec<(String, crate::db::pg::Session)>,
    files: Vec<TableFile>,
) -> Result<Vec<DatabaseManifest>, String> {
    let point = BlockPoint {
        grant_id: grant_id.to_string(),
        lsn: lsn.to_string(),
        tables: block_sums(readers, &files).await?,
    };
    save(config, ORIGIN_FILE, &point)?;
    Ok(point.totals())
}

/// Drops this host's gate slot (the point is used or void) and forgets its point.
pub async fn release_own_wal(config: &AgentConfig, grant_id: &str) -> Result<(), String> {
    forget(config, None);
    let slot = literal(&gate_slot(grant_id));
    Connection::admin(&config.postgresql)
        .psql(
            "postgres",
            &format!(
                "SELECT pg_catalog.pg_drop_replication_slot(slot_name) FROM pg_catalog.pg_replication_slots WHERE slot_name = {slot};\n"
            ),
        )
        .await
        .map(|_| ())
        .map_err(|e| format!("dropping this host's gate slot: {e}"))
}

/// Target side: takes a verified point with the origin this host subscribes to (see the
/// module's doc). Returns what was compared; the point is recorded only when every table
/// matched, and this host keeps its WAL only then.
pub async fn establish(
    config: &AgentConfig,
    tls: Arc<rustls::ClientConfig>,
    state: Following,
) -> Result<String, String> {
    let grant_id = state.grant_id.clone();
    let taken = establish_inner(config, tls, state).await;
    if taken.is_err() {
        if let Err(e) = release_own_wal(config, &grant_id).await {
            tracing::warn!(error = %e, "no verified point, and this host's gate slot stays");
        }
    }
    taken
}

async fn establish_inner(
    config: &AgentConfig,
    tls: Arc<rustls::ClientConfig>,
    state: Following,
) -> Result<String, String> {
    let logical = state
        .logical
        .clone()
        .ok_or("this host does not subscribe to an origin")?;
    // A point taken before is void from now on.
    crate::db::follow::set_following(
        config,
        Some(&Following {
            verified: None,
            ..state.clone()
        }),
    )?;
    forget(config, None);
    crate::db::gate::verified_point::keep_wal(config, &state.grant_id).await?;
    let owner = Connection::owner(&config.postgresql);
    let own_version = owner
        .server_version_num()
        .await
        .map_err(|e| e.to_string())?;
    let (mut stream, held, wanted) =
        crate::db::gate::verified_point::ask_hold(config, tls, &state.endpoint(), true).await?;
    let deadline = Instant::now() + crate::db::gate::verified_point::HOLD - Duration::from_secs(1);
    loop {
        let progress = crate::db::follow::progress(&owner, &logical, own_version).await?;
        if progress.not_ready == 0 && progress.lowest.is_some_and(|l| l >= wanted) {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "the subscriptions did not apply the origin's {} in time ({} tables not ready)",
                held.lsn, progress.not_ready
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The apply is idle (the origin's tables are held): this host's own tables are locked
    // too, so that no write of the apply is in flight when the snapshots are taken.
    let databases = owner
        .existing_databases(&config.postgresql.databases)
        .await
        .map_err(|e| e.to_string())?;
    let locked = crate::db::gate::verified_point::lock_all(&owner, &databases).await?;
    let mut lockers = Vec::new();
    let mut readers = Vec::new();
    let mut files = Vec::new();
    for (db, (locker, snapshot, tables)) in databases.iter().zip(locked) {
        let reader =
            crate::db::gate::verified_point::import_snapshot(&owner, db, &snapshot).await?;
        files.extend(tables.into_iter().map(|t| t.file));
        lockers.push(locker);
        readers.push((db.clone(), reader));
    }
    let own = crate::db::wal::wal_position(config).await?;
    for locker in lockers {
        locker
            .finish("COMMIT;\n")
            .await
            .map_err(|e| e.to_string())?;
    }
    write_json_line(
        &mut stream,
        &Taken {
            replayed: own.lsn.clone(),
        },
    )
    .await
    .map_err(|e| e.to_string())?;
    let started = Instant::now();
    let ours = block_sums(readers, &files);
    let theirs = read_json_line::<_, OriginSums>(&mut stream);
    let (ours, theirs) = tokio::join!(ours, theirs);
    let ours = BlockPoint {
        grant_id: String::new(),
        lsn: own.lsn,
        tables: ours?,
    };
    let theirs = crate::db::gate::verified_point::origin_sums(theirs)?;
    let compared = crate::db::gate::verified_point::compare_at(
        &held,
        &theirs.databases,
        &ours.totals(),
        "the subscriber",
    )?;
    save(config, TARGET_FILE, &ours)?;
    let blocks: usize = ours.tables.iter().map(|t| t.blocks.len()).sum();
    crate::db::follow::set_following(
        config,
        Some(&Following {
            verified: Some(crate::db::follow::VerifiedPoint {
                lsn: held.lsn.clone(),
                tables: Vec::new(),
            }),
            ..state
        }),
    )?;
    Ok(format!(
        "verified point at {} (here {}): {} tables in {} databases equal, {blocks} blocks summed ({} ms)",
        held.lsn,
        ours.lsn,
        ours.tables.len(),
        compared.len(),
        started.elapsed().as_millis()
    ))
}

/// This host's totals now, from its own point: the blocks its WAL names since summed again.
/// Returns the totals and what was summed.
pub async fn totals_since(
    config: &AgentConfig,
    conn: &Connection,
    point: &BlockPoint,
) -> Result<(Vec<DatabaseManifest>, String), String> {
    let started = Instant::now();
    let (until, named) =
        crate::db::gate::verified_point::blocks_named_since(config, &point.lsn).await?;
    let read_ms = started.elapsed().as_millis();
    let (databases, current) = crate::db::gate::verified_point::tables_here(config, conn).await?;
    let selection = select(&point.files(), &current, &named);
    let mut now = BTreeMap::new();
    for db in &databases {
        let tables: Vec<&TableSelection> = selection.iter().filter(|t| &t.database == db).collect();
        if tables.is_empty() {
            continue;
        }
        let out = conn
            .psql(db, &selection_sql(&tables))
            .await
            .map_err(|e| e.to_string())?;
        now.insert(db.clone(), selection_sums(&out)?);
    }
    let blocks: u64 = selection
        .iter()
        .filter_map(|t| t.blocks.as_deref())
        .map(blocks_in)
        .sum();
    let full: Vec<String> = selection
        .iter()
        .filter(|t| t.blocks.is_none())
        .map(|t| format!("{}.{}.{}", t.database, t.schema, t.table))
        .collect();
    let wal = parse_lsn(&until)
        .zip(parse_lsn(&point.lsn))
        .map_or(0, |(u, s)| u.saturating_sub(s));
    let covered = format!(
        "{blocks} blocks ({} KiB of WAL since {} read in {read_ms} ms, {} ms in all){}",
        wal / 1024,
        point.lsn,
        started.elapsed().as_millis(),
        if full.is_empty() {
            String::new()
        } else {
            format!(", in full: {}", full.join(", "))
        }
    );
    Ok((point.totals_after(&selection, &now), covered))
}

/// Origin side of the downtime's gate: its totals from the point taken at `since`
/// ([`PointTotals`], admitted first).
pub async fn serve_totals<S>(
    config: &AgentConfig,
    bluemind: &Connection,
    since: &str,
    stream: &mut S,
) -> Result<(), String>
where
    S: AsyncBufRead + AsyncWrite + Unpin,
{
    let point = load(config, ORIGIN_FILE)?;
    if point.lsn != since {
        return Err(format!(
            "the origin's point is at {}, not at {since}",
            point.lsn
        ));
    }
    crate::plane::answer::admit(stream).await?;
    let answer = match totals_since(config, bluemind, &point).await {
        Ok((databases, covered)) => PointTotals {
            databases,
            covered,
            error: String::new(),
        },
        Err(error) => PointTotals {
            error,
            ..Default::default()
        },
    };
    crate::db::gate::verified_point::last_answer(stream, &answer).await
}

/// Target side of the downtime's gate, first half (started as soon as the origin stopped):
/// the origin's totals since the point at `since`. `origin` carries the step's databases
/// grant.
pub async fn ask_totals(
    config: &AgentConfig,
    tls: Arc<rustls::ClientConfig>,
    origin: &OriginEndpoint,
    since: &str,
) -> Result<PointTotals, String> {
    let timeout = Duration::from_secs(config.data_plane.connect_timeout_secs);
    let request = TunnelRequest::ChangedTotals {
        grant: origin.grant_id.clone(),
        since: since.to_string(),
    };
    let (_, totals): (_, PointTotals) = tunnel::ask(
        origin,
        tls,
        &request,
        timeout,
        "the origin's totals since the verified point",
    )
    .await?;
    if !totals.error.is_empty() {
        return Err(totals.error);
    }
    Ok(totals)
}

/// Target side of the downtime's gate, second half (this host's databases final): this
/// host's totals from its own point, and what was summed again.
pub async fn own_totals(
    config: &AgentConfig,
    owner: &Connection,
) -> Result<(Vec<DatabaseManifest>, String), String> {
    let point = load(config, TARGET_FILE)?;
    totals_since(config, owner, &point).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(table: &str) -> TableFile {
        TableFile {
            database: "bj".into(),
            schema: "public".into(),
            table: table.into(),
            filenode: 16384,
        }
    }

    fn point() -> BlockPoint {
        BlockPoint {
            grant_id: String::new(),
            lsn: "0/1000000".into(),
            tables: vec![
                TableBlocks {
                    file: file("t_big"),
                    blocks: vec![
                        BlockSum {
                            block: 0,
                            rows: 3,
                            sum: 10,
                        },
                        BlockSum {
                            block: 1,
                            rows: 2,
                            sum: -7,
                        },
                        BlockSum {
                            block: 5,
                            rows: 1,
                            sum: i128::from(i64::MAX),
                        },
                    ],
                },
                TableBlocks {
                    file: file("t_other"),
                    blocks: vec![BlockSum {
                        block: 0,
                        rows: 4,
                        sum: 1,
                    }],
                },
            ],
        }
    }

    #[test]
    fn a_point_totals_its_blocks_and_survives_its_file() {
        let p = point();
        let totals = p.totals();
        assert_eq!(totals.len(), 1);
        assert_eq!(
            totals[0].tables,
            [
                total("public", "t_big", 6, 3 + i128::from(i64::MAX)),
                total("public", "t_other", 4, 1)
            ]
        );
        // The sums exceed 64 bits: kept exactly across a save.
        let json = serde_json::to_string(&p).unwrap();
        assert_eq!(serde_json::from_str::<BlockPoint>(&json).unwrap(), p);
    }

    #[test]
    fn totals_after_replace_the_named_blocks_and_sum_rewritten_tables_in_full() {
        let p = point();
        let selection = vec![
            TableSelection {
                database: "bj".into(),
                schema: "public".into(),
                table: "t_big".into(),
                // Block 1 (in the point) and block 7 (new) named by the WAL.
                blocks: Some(vec![(1, 2), (7, 8)]),
            },
            TableSelection {
                database: "bj".into(),
                schema: "public".into(),
                table: "t_other".into(),
                blocks: None,
            },
        ];
        let now: BTreeMap<String, BTreeMap<String, (u64, i128)>> = [(
            "bj".to_string(),
            [
                ("public.t_big".to_string(), (5, 100)),
                ("public.t_other".to_string(), (1, 9)),
            ]
            .into_iter()
            .collect(),
        )]
        .into_iter()
        .collect();
        let totals = p.totals_after(&selection, &now);
        assert_eq!(
            totals[0].tables,
            [
                // Blocks 0 and 5 from the point, 1 and 7 now.
                total(
                    "public",
                    "t_big",
                    3 + 1 + 5,
                    10 + i128::from(i64::MAX) + 100
                ),
                total("public", "t_other", 1, 9)
            ]
        );
        // Nothing named, nothing summed: the point's totals.
        let untouched = vec![TableSelection {
            blocks: Some(Vec::new()),
            ..selection[0].clone()
        }];
        assert_eq!(
            p.totals_after(&untouched, &BTreeMap::new())[0].tables,
            [total("public", "t_big", 6, 3 + i128::from(i64::MAX))]
        );
    }

    #[test]
    fn a_block_is_found_in_sorted_ranges() {
        let ranges = [(1, 2), (7, 10), (20, 21)];
        for (block, inside) in [
            (0, false),
            (1, true),
            (2, false),
            (6, false),
            (7, true),
            (9, true),
            (10, false),
            (20, true),
            (21, false),
        ] {
            assert_eq!(in_ranges(&ranges, block), inside, "{block}");
        }
        assert!(!in_ranges(&[], 0));
    }

    #[test]
    fn block_sum_lines_are_read_strictly() {
        let files = [file("t_big"), file("t_empty")];
        let tables = parse_block_sums(
            "bj",
            &files,
            "public.t_big\t3\t2\t-5\npublic.t_big\t0\t1\t99999999999999999999\n",
        )
        .unwrap();
        assert_eq!(
            tables[0].blocks,
            [
                BlockSum {
                    block: 0,
                    rows: 1,
                    sum: 99_999_999_999_999_999_999
                },
                BlockSum {
                    block: 3,
                    rows: 2,
                    sum: -5
                }
            ]
        );
        assert!(tables[1].blocks.is_empty());
        for bad in [
            "public.t_big\t3\t2",
            "public.t_big\tx\t2\t1",
            "public.t_big\t3\t2\t1\textra",
        ] {
            assert!(parse_block_sums("bj", &files, bad).is_err(), "{bad}");
        }
    }
}
