//! The origin's side of logical replication (across PostgreSQL majors).
//!
//! Under a grant with the replication scope, the origin prepares, in each of BlueMind's
//! databases present here: the replication role of [`crate::db::replication::make_role`] with
//! `SELECT` on the published tables (for the initial copy), a publication of every table
//! (`FOR TABLE …`, made by BlueMind's own role, which owns them: no superuser needed), a
//! logical slot per database made by this host's administrator, and a replica identity for
//! every table that has none usable. Without one, an `UPDATE` or `DELETE` on a published
//! table fails **on the origin** (BlueMind itself would break): a table without a primary key
//! gets `REPLICA IDENTITY USING INDEX` on a unique index of non-null columns when it has one,
//! else `FULL`. Each original identity is recorded in the grant store before it is changed,
//! and everything is undone once the grant is gone (revoked, expired, or found at start):
//! walsenders stopped, slots dropped (with the table-sync slots a vanished subscription left
//! in these databases), the publication dropped, identities put back, the role's privileges
//! and the role removed.
//!
//! The subscriber's connections reach PostgreSQL only through the data plane's relay, as a
//! standby's do.

use serde::{Deserialize, Serialize};

use crate::config::AgentConfig;
use crate::db::pg::{ident, literal, Connection, Extension};
use crate::plane::grants::{Grant, GrantStore, Leftover};

/// What the target needs to subscribe (one JSON line).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PublishTicket {
    /// The replication role.
    pub role: String,
    /// Its password (the origin keeps only the verifier).
    pub password: String,
    /// The origin's `server_version_num`.
    pub server_version_num: u32,
    /// The databases published (BlueMind's, present here).
    pub databases: Vec<PublishedDatabase>,
    /// Their extensions (the target creates those of its own list).
    pub extensions: Vec<Extension>,
}

/// One database's publication and slot.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PublishedDatabase {
    /// The database.
    pub name: String,
    /// Its publication.
    pub publication: String,
    /// Its logical slot (the subscription uses it, never makes one).
    pub slot: String,
}

/// What a grant made and changed in one database, recorded before it is done.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Published {
    /// Per database.
    pub databases: Vec<PublishedRecord>,
}

/// One database's record.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct PublishedRecord {
    /// The database.
    pub name: String,
    /// The publication.
    pub publication: String,
    /// The slot.
    pub slot: String,
    /// Tables whose replica identity was changed, with their original one.
    pub identities: Vec<ChangedIdentity>,
}

/// A table's replica identity before the grant changed it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ChangedIdentity {
    /// Schema.
    pub schema: String,
    /// Table.
    pub table: String,
    /// `DEFAULT` or `NOTHING`.
    pub original: String,
}

/// A table as the catalog describes it, for the publication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableInfo {
    /// Schema.
    pub schema: String,
    /// Name.
    pub table: String,
    /// `r` (table or partition) or `p` (partitioned table).
    pub kind: char,
    /// `relreplident`: d (default), n (nothing), f (full), i (index).
    pub identity: char,
    /// A partition (published through its parent).
    pub partition: bool,
    /// Owned by BlueMind's role (the one that publishes).
    pub owned: bool,
    /// Has a primary key.
    pub primary_key: bool,
    /// A unique index on non-null columns usable as the replica identity ("" if none).
    pub usable_index: String,
    /// `relpersistence`: p (permanent), u (unlogged).
    pub persistence: char,
}

/// What to do to a table's replica identity so that its updates and deletes can be
/// published: `None` when it has one already.
pub fn identity_change(table: &TableInfo) -> Option<String> {
    let missing = table.kind == 'r'
        && (table.identity == 'n' || (table.identity == 'd' && !table.primary_key));
    if !missing {
        return None;
    }
    Some(if table.usable_index.is_empty() {
        "FULL".to_string()
    } else {
        format!("USING INDEX {}", ident(&table.usable_index))
    })
}

/// The tables a publication lists: partitioned tables and plain ones (partitions come with
/// their parent).
pub fn published(tables: &[TableInfo]) -> Vec<&TableInfo> {
    tables.iter().filter(|t| !t.partition).collect()
}

/// The publication, slot and role-derived names of a grant in database number `index`.
pub fn names(grant_id: &str, index: usize) -> (String, String) {
    let (role, _) = crate::db::wal::names(grant_id);
    let id = role.trim_start_matches("bmfleet_repl_");
    (
        format!("bmfleet_pub_{id}"),
        format!("bmfleet_slot_{id}_{index}"),
    )
}

const TABLES_SQL: &str = "SELECT n.nspname, c.relname, c.relkind, c.relreplident, c.relispartition,
       c.relowner = (SELECT oid FROM pg_catalog.pg_roles WHERE rolname = current_user),
       EXISTS (SELECT 1 FROM pg_catalog.pg_index i WHERE i.indrelid = c.oid AND i.indisprimary),
       COALESCE((SELECT ic.relname FROM pg_catalog.pg_index i
                 JOIN pg_catalog.pg_class ic ON ic.oid = i.indexrelid
                 WHERE i.indrelid = c.oid AND i.indisunique AND i.indimmediate AND i.indisvalid
                   AND i.indpred IS NULL AND i.indexprs IS NULL
                   AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a
                                   WHERE a.attrelid = c.oid
                                     AND a.attnum = ANY (i.indkey::pg_catalog.int2[])
                                     AND NOT a.attnotnull)
                 ORDER BY i.indnatts, ic.relname LIMIT 1), ''),
       c.relpersistence
FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p') AND c.relpersistence <> 't'
  AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%'
ORDER BY 1, 2;\n";

fn parse_tables(out: &str) -> Vec<TableInfo> {
    let first = |s: &str| s.chars().next().unwrap_or(' ');
    out.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split('\t').collect();
            (f.len() == 9).then(|| TableInfo {
                schema: f[0].to_string(),
                table: f[1].to_string(),
                kind: first(f[2]),
                identity: first(f[3]),
                partition: f[4] == "t",
                owned: f[5] == "t",
                primary_key: f[6] == "t",
                usable_index: f[7].to_string(),
                persistence: first(f[8]),
            })
        })
        .collect()
}

fn qualified(schema: &str, table: &str) -> String {
    format!("{}.{}", ident(schema), ident(table))
}

/// Prepares every BlueMind database here for a subscriber under `grant` and returns the
/// ticket. Refuses (before changing anything in a database) when the origin cannot publish
/// it: `wal_level` not logical, a table BlueMind's role does not own, an unlogged table.
pub async fn prepare(
    config: &AgentConfig,
    grants: &GrantStore,
    grant: &Grant,
) -> Result<PublishTicket, String> {
    let pg_config = &config.postgresql;
    let admin = Connection::admin(pg_config);
    let level = crate::db::wal::wal_level(&admin).await?;
    if level != "logical" {
        return Err(format!(
            "the origin's wal_level is {level}: logical replication needs logical (ALTER SYSTEM \
             SET wal_level = logical, then a restart of its PostgreSQL), or use db_sync = \"dump\""
        ));
    }
    let owner = Connection::bluemind_here(config);
    let present = owner
        .existing_databases(&pg_config.databases)
        .await
        .map_err(|e| e.to_string())?;
    // Every database is read first: a refusal changes nothing anywhere.
    let mut found = Vec::new();
    for (index, name) in present.iter().enumerate() {
        let tables = parse_tables(
            &owner
                .psql(name, TABLES_SQL)
                .await
                .map_err(|e| e.to_string())?,
        );
        if let Some(t) = tables.iter().find(|t| !t.owned) {
            return Err(format!(
                "{name}: the table {}.{} is not owned by {}: it cannot be published by \
                 BlueMind's role; use db_sync = \"dump\"",
                t.schema, t.table, pg_config.user
            ));
        }
        if let Some(t) = tables.iter().find(|t| t.persistence == 'u') {
            return Err(format!(
                "{name}: the table {}.{} is unlogged: logical replication cannot carry it; use \
                 db_sync = \"dump\"",
                t.schema, t.table
            ));
        }
        let (publication, slot) = names(&grant.id, index);
        found.push((name.clone(), publication, slot, tables));
    }
    let mut record = Published {
        databases: found
            .iter()
            .map(|(name, publication, slot, _)| PublishedRecord {
                name: name.clone(),
                publication: publication.clone(),
                slot: slot.clone(),
                identities: Vec::new(),
            })
            .collect(),
    };
    let json = |r: &Published| serde_json::to_string(r).map_err(|e| e.to_string());
    let mut made =
        crate::db::replication::make_role(config, grants, grant, String::new(), json(&record)?)
            .await?;
    let mut extensions = Vec::new();
    for (n, (name, publication, slot, tables)) in found.iter().enumerate() {
        // Recorded before changed.
        record.databases[n].identities = tables
            .iter()
            .filter(|t| identity_change(t).is_some())
            .map(|t| ChangedIdentity {
                schema: t.schema.clone(),
                table: t.table.clone(),
                original: if t.identity == 'n' {
                    "NOTHING".into()
                } else {
                    "DEFAULT".into()
                },
            })
            .collect();
        made.leftover.logical = json(&record)?;
        grants
            .put_leftover(&made.leftover)
            .map_err(|e| e.to_string())?;
        publish(&owner, name, publication, &made.role, tables).await?;
        make_slot(&admin, name, slot).await?;
        extensions.extend(owner.extensions(name).await.map_err(|e| e.to_string())?);
    }
    crate::db::replication::cap_wal(config, grants, &mut made.leftover).await?;
    tracing::info!(grant = %grant.id, target = %grant.target_name, role = %made.role, databases = found.len(), "publications ready");
    Ok(PublishTicket {
        role: made.role,
        password: made.password,
        server_version_num: made.server_version_num,
        databases: found
            .into_iter()
            .map(|(name, publication, slot, _)| PublishedDatabase {
                name,
                publication,
                slot,
            })
            .collect(),
        extensions,
    })
}

/// As BlueMind's role (it owns the tables): replica identities where missing (one short
/// lock per table, waited for at most 5 s), the publication, `SELECT` for the role.
async fn publish(
    owner: &Connection,
    database: &str,
    publication: &str,
    role: &str,
    tables: &[TableInfo],
) -> Result<(), String> {
    let mut sql = String::from("SET lock_timeout = '5s';\n");
    for t in tables {
        if let Some(change) = identity_change(t) {
            sql.push_str(&format!(
                "ALTER TABLE {} REPLICA IDENTITY {change};\n",
                qualified(&t.schema, &t.table)
            ));
        }
    }
    sql.push_str(&format!(
        "DROP PUBLICATION IF EXISTS {};\n",
        ident(publication)
    ));
    let listed: Vec<String> = published(tables)
        .iter()
        .map(|t| qualified(&t.schema, &t.table))
        .collect();
    if listed.is_empty() {
        sql.push_str(&format!("CREATE PUBLICATION {};\n", ident(publication)));
    } else {
        sql.push_str(&format!(
            "CREATE PUBLICATION {} FOR TABLE {};\n",
            ident(publication),
            listed.join(", ")
        ));
    }
    for t in tables.iter().filter(|t| t.kind == 'r') {
        sql.push_str(&format!(
            "GRANT SELECT ON {} TO {};\n",
            qualified(&t.schema, &t.table),
            ident(role)
        ));
    }
    owner
        .psql(database, &sql)
        .await
        .map(|_| ())
        .map_err(|e| format!("publishing {database}: {e}"))
}

/// A fresh logical slot (a previous attempt's is dropped: its position is stale).
async fn make_slot(admin: &Connection, database: &str, slot: &str) -> Result<(), String> {
    drop_slots(admin, database, slot, false).await?;
    admin
        .psql(
            database,
            &format!(
                "SELECT pg_catalog.pg_create_logical_replication_slot({}, 'pgoutput');\n",
                literal(slot)
            ),
        )
        .await
        .map(|_| ())
        .map_err(|e| format!("making the logical slot of {database}: {e}"))
}

/// Drops `slot` (its walsender stopped first; the drop is retried while it ends) and, with
/// `table_sync`, the inactive table-sync slots a subscription left in `database`.
async fn drop_slots(
    admin: &Connection,
    database: &str,
    slot: &str,
    table_sync: bool,
) -> Result<(), String> {
    let mut wanted = format!("slot_name = {}", literal(slot));
    if table_sync {
        wanted =
            format!("({wanted} OR (NOT active AND slot_name ~ '^pg_[0-9]+_sync_[0-9]+_[0-9]+$'))");
    }
    let db = literal(database);
    let sql = format!(
        "SELECT pg_catalog.pg_terminate_backend(active_pid) FROM pg_catalog.pg_replication_slots WHERE database = {db} AND {wanted} AND active_pid IS NOT NULL;\n\
         SELECT pg_catalog.pg_drop_replication_slot(slot_name) FROM pg_catalog.pg_replication_slots WHERE database = {db} AND {wanted};\n"
    );
    let mut last = String::new();
    for _ in 0..50 {
        match admin.psql("postgres", &sql).await {
            Ok(_) => return Ok(()),
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    Err(format!("dropping the slots of {database}: {last}"))
}

/// Undoes what a logical grant made (see the module's doc). The role itself is dropped by the
/// caller afterwards.
pub async fn remove(config: &AgentConfig, leftover: &Leftover) -> Result<(), String> {
    let record: Published = serde_json::from_str(&leftover.logical)
        .map_err(|e| format!("the record of grant {}: {e}", leftover.grant_id))?;
    let pg_config = &config.postgresql;
    let admin = Connection::admin(pg_config);
    admin
        .psql(
            "postgres",
            &format!(
                "SELECT pg_catalog.pg_terminate_backend(pid) FROM pg_catalog.pg_stat_activity WHERE usename = {};\n",
                literal(&leftover.role)
            ),
        )
        .await
        .map_err(|e| e.to_string())?;
    let owner = Connection::bluemind_here(config);
    let present = admin
        .existing_databases(
            &record
                .databases
                .iter()
                .map(|d| d.name.clone())
                .collect::<Vec<_>>(),
        )
        .await
        .map_err(|e| e.to_string())?;
    for db in record
        .databases
        .iter()
        .filter(|d| present.contains(&d.name))
    {
        drop_slots(&admin, &db.name, &db.slot, true).await?;
        // The publication first: an identity put back to NOTHING on a published table would
        // make BlueMind's updates fail.
        let mut sql = format!(
            "SET lock_timeout = '5s';\nDROP PUBLICATION IF EXISTS {};\n",
            ident(&db.publication)
        );
        for c in &db.identities {
            let original = if c.original == "NOTHING" {
                "NOTHING"
            } else {
                "DEFAULT"
            };
            sql.push_str(&format!(
                "DO $$ BEGIN IF pg_catalog.to_regclass({name}) IS NOT NULL THEN ALTER TABLE {table} REPLICA IDENTITY {original}; END IF; END $$;\n",
                name = literal(&qualified(&c.schema, &c.table)),
                table = qualified(&c.schema, &c.table)
            ));
        }
        owner
            .psql(&db.name, &sql)
            .await
            .map_err(|e| format!("unpublishing {}: {e}", db.name))?;
        admin
            .psql(
                &db.name,
                &format!(
                    "DO $$ BEGIN IF EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname OPERATOR(pg_catalog.=) {name}) THEN EXECUTE 'DROP OWNED BY ' OPERATOR(pg_catalog.||) pg_catalog.quote_ident({name}); END IF; END $$;\n",
                    name = literal(&leftover.role)
                ),
            )
            .await
            .map_err(|e| format!("removing the replication role's privileges in {}: {e}", db.name))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(kind: char, identity: char, pk: bool, index: &str, partition: bool) -> TableInfo {
        TableInfo {
            schema: "public".into(),
            table: "t".into(),
            kind,
            identity,
            partition,
            owned: true,
            primary_key: pk,
            usable_index: index.into(),
            persistence: 'p',
        }
    }

    #[test]
    fn tables_without_a_usable_identity_get_one() {
        let rows = [
            // A primary key: the default identity works.
            (table('r', 'd', true, "", false), None),
            // No key: a unique index on non-null columns, else the whole row.
            (
                table('r', 'd', false, "u_idx", false),
                Some("USING INDEX \"u_idx\""),
            ),
            (table('r', 'd', false, "", false), Some("FULL")),
            (table('r', 'n', true, "", false), Some("FULL")),
            // Already set.
            (table('r', 'f', false, "", false), None),
            (table('r', 'i', false, "u_idx", false), None),
            // A partition is a table (its own identity); a partitioned parent holds no rows.
            (table('r', 'd', false, "", true), Some("FULL")),
            (table('p', 'd', false, "", false), None),
        ];
        for (n, (t, want)) in rows.iter().enumerate() {
            assert_eq!(identity_change(t).as_deref(), *want, "row {n}");
        }
        let all = [
            table('p', 'd', false, "", false),
            table('r', 'd', false, "", true),
            table('r', 'd', true, "", false),
        ];
        assert_eq!(published(&all).len(), 2);
    }

    #[test]
    fn the_catalog_answer_parses() {
        let out = "public\tt_a\tr\td\tf\tt\tf\tt_a_key\tp\npublic\tbad line\n";
        let tables = parse_tables(out);
        assert_eq!(tables.len(), 1);
        assert_eq!(tables[0].usable_index, "t_a_key");
        assert!(tables[0].owned && !tables[0].primary_key);
    }

    #[test]
    fn names_fit_postgres_identifiers() {
        let (publication, slot) = names(&"A".repeat(100), 1);
        assert!(publication.len() <= 63 && slot.len() <= 63, "{slot}");
        assert!(slot.ends_with("_1"));
    }
}
