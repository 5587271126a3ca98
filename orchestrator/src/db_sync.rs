//! How an instance's databases reach its target, chosen at preflight from both hosts' facts
//! (pure): a physical streaming standby when both allow it (the target follows the origin
//! during the hot phase and is promoted in the downtime), else logical replication (a
//! subscription per database, across PostgreSQL majors) when the origin already runs with
//! `wal_level = logical`, else dump and restore. Never changed midway.

use bmfleet_proto::v1::FactsReply;

use crate::fleet::DbSync;
use crate::machine::DbPlan;

/// The PostgreSQL major of a `server_version_num` (150004 → 15).
fn major(version_num: u32) -> u32 {
    version_num / 10_000
}

/// Both servers' versions, or why they are not known.
fn versions(origin: &FactsReply, target: &FactsReply) -> Result<(u32, u32), String> {
    let (o, t) = (origin.postgresql_version_num, target.postgresql_version_num);
    if o == 0 || t == 0 {
        Err("a PostgreSQL server did not say its version".into())
    } else {
        Ok((o, t))
    }
}

/// Why a physical standby cannot carry this pair's databases (empty: it can).
fn standby_obstacles(origin: &FactsReply, target: &FactsReply) -> Vec<String> {
    let mut why = Vec::new();
    if !target.standby_unavailable.is_empty() {
        why.push(format!(
            "the target cannot follow: {}",
            target.standby_unavailable
        ));
    }
    match versions(origin, target) {
        Err(e) => why.push(e),
        Ok((o, t)) if major(o) != major(t) => why.push(format!(
            "PostgreSQL {} on the origin, {} on the target: a standby needs the same major",
            major(o),
            major(t)
        )),
        Ok(_) => {}
    }
    if origin.libc_version.is_empty() || origin.libc_version != target.libc_version {
        why.push(format!(
            "C library {:?} on the origin, {:?} on the target: a standby keeps the origin's text \
             indexes, sorted by the origin's collation",
            origin.libc_version, target.libc_version
        ));
    }
    if origin.postgresql_wal_level == "minimal" {
        why.push("the origin's wal_level is minimal (a standby needs replica)".into());
    }
    why
}

/// Why logical replication cannot carry this pair's databases (empty: it can).
fn logical_obstacles(origin: &FactsReply, target: &FactsReply) -> Vec<String> {
    let mut why = Vec::new();
    match versions(origin, target) {
        Err(e) => why.push(e),
        Ok((o, t)) if major(t) < major(o) => why.push(format!(
            "PostgreSQL {} on the origin, {} on the target: logical replication needs the \
             target's major to be the same or newer",
            major(o),
            major(t)
        )),
        Ok((o, _)) if major(o) < 10 => why.push(format!(
            "PostgreSQL {} on the origin has no logical replication (10 or newer)",
            major(o)
        )),
        Ok(_) => {}
    }
    if origin.postgresql_wal_level != "logical" {
        why.push(format!(
            "the origin's wal_level is {:?}: logical replication needs logical, which takes a \
             restart of the origin's PostgreSQL (ALTER SYSTEM SET wal_level = logical, then \
             restart it at a quiet moment)",
            origin.postgresql_wal_level
        ));
    }
    why
}

fn dump(why: String) -> DbPlan {
    DbPlan {
        stream: false,
        logical: false,
        why,
    }
}

fn standby(origin: &FactsReply) -> DbPlan {
    DbPlan {
        stream: true,
        logical: false,
        why: format!(
            "standby: PostgreSQL {} and {} on both hosts (a copy of the origin's whole \
             cluster: its roles, settings and functions run in the target's PostgreSQL service \
             account; db_sync = \"logical\" or \"dump\" keep them out)",
            major(origin.postgresql_version_num),
            origin.libc_version
        ),
    }
}

fn logical(origin: &FactsReply, target: &FactsReply) -> DbPlan {
    DbPlan {
        stream: true,
        logical: true,
        why: format!(
            "logical replication: PostgreSQL {} to {}",
            major(origin.postgresql_version_num),
            major(target.postgresql_version_num)
        ),
    }
}

/// The plan for `wanted` given both hosts' facts; an error when `stream` or `logical` was
/// asked and is not possible (the preflight fails with it).
pub fn choose(wanted: DbSync, origin: &FactsReply, target: &FactsReply) -> Result<DbPlan, String> {
    match wanted {
        DbSync::Dump => Ok(dump("dump and restore (db_sync = dump)".into())),
        DbSync::Stream => {
            let why = standby_obstacles(origin, target);
            if why.is_empty() {
                Ok(standby(origin))
            } else {
                Err(format!(
                    "db_sync = stream is not possible: {}; use auto, logical or dump",
                    why.join("; ")
                ))
            }
        }
        DbSync::Logical => {
            let why = logical_obstacles(origin, target);
            if why.is_empty() {
                Ok(logical(origin, target))
            } else {
                Err(format!(
                    "db_sync = logical is not possible: {}; use auto or dump",
                    why.join("; ")
                ))
            }
        }
        DbSync::Auto => {
            let no_standby = standby_obstacles(origin, target);
            if no_standby.is_empty() {
                return Ok(standby(origin));
            }
            let no_logical = logical_obstacles(origin, target);
            if no_logical.is_empty() {
                return Ok(DbPlan {
                    why: format!(
                        "{} (no standby: {})",
                        logical(origin, target).why,
                        no_standby.join("; ")
                    ),
                    ..logical(origin, target)
                });
            }
            Ok(dump(format!(
                "dump and restore: {}; no logical replication: {}",
                no_standby.join("; "),
                no_logical.join("; ")
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(version: u32, libc: &str, unavailable: &str, wal: &str) -> FactsReply {
        FactsReply {
            postgresql_version_num: version,
            libc_version: libc.into(),
            standby_unavailable: unavailable.into(),
            postgresql_wal_level: wal.into(),
            ..Default::default()
        }
    }

    #[test]
    fn the_standby_is_chosen_only_when_both_hosts_allow_it() {
        let good = facts(150004, "glibc 2.36", "", "replica");
        let logical16 = facts(160002, "glibc 2.36", "", "replica");
        let origin_logical = facts(150004, "glibc 2.31", "", "logical");
        // Expected: Ok((follows, logically)) or the refusal's words.
        type Row = (
            DbSync,
            FactsReply,
            FactsReply,
            Result<(bool, bool), &'static str>,
        );
        let table: Vec<Row> = vec![
            (DbSync::Auto, good.clone(), good.clone(), Ok((true, false))),
            (
                DbSync::Stream,
                good.clone(),
                good.clone(),
                Ok((true, false)),
            ),
            (DbSync::Dump, good.clone(), good.clone(), Ok((false, false))),
            (
                DbSync::Auto,
                good.clone(),
                facts(160002, "glibc 2.36", "", "replica"),
                Ok((false, false)),
            ),
            (
                DbSync::Stream,
                good.clone(),
                facts(160002, "glibc 2.36", "", "replica"),
                Err("same major"),
            ),
            (
                DbSync::Stream,
                facts(150004, "glibc 2.31", "", "replica"),
                good.clone(),
                Err("collation"),
            ),
            (
                DbSync::Stream,
                good.clone(),
                facts(
                    150004,
                    "glibc 2.36",
                    "postgresql.data_dir not set",
                    "replica",
                ),
                Err("postgresql.data_dir"),
            ),
            (
                DbSync::Stream,
                facts(150004, "glibc 2.36", "", "minimal"),
                good.clone(),
                Err("wal_level"),
            ),
            (
                DbSync::Stream,
                facts(0, "glibc 2.36", "", "replica"),
                good.clone(),
                Err("version"),
            ),
            (
                DbSync::Auto,
                facts(150004, "", "", "replica"),
                facts(150004, "", "", "replica"),
                Ok((false, false)),
            ),
            // Logical: the origin's wal_level decides; the target's major may be newer.
            (
                DbSync::Auto,
                origin_logical.clone(),
                logical16.clone(),
                Ok((true, true)),
            ),
            (
                DbSync::Logical,
                origin_logical.clone(),
                logical16.clone(),
                Ok((true, true)),
            ),
            (
                DbSync::Logical,
                good.clone(),
                good.clone(),
                Err("wal_level = logical"),
            ),
            (
                DbSync::Logical,
                facts(160002, "glibc 2.36", "", "logical"),
                good.clone(),
                Err("same or newer"),
            ),
            (
                DbSync::Logical,
                facts(90624, "glibc 2.36", "", "logical"),
                good.clone(),
                Err("10 or newer"),
            ),
            // Same major, different C library: logical rebuilds the indexes on the target.
            (
                DbSync::Auto,
                origin_logical.clone(),
                good.clone(),
                Ok((true, true)),
            ),
            // A standby possible: auto prefers it even when logical is too.
            (
                DbSync::Auto,
                facts(150004, "glibc 2.36", "", "logical"),
                good.clone(),
                Ok((true, false)),
            ),
            (
                DbSync::Stream,
                origin_logical.clone(),
                logical16.clone(),
                Err("same major"),
            ),
        ];
        for (n, (wanted, origin, target, expected)) in table.into_iter().enumerate() {
            let got = choose(wanted, &origin, &target);
            match (expected, got) {
                (Ok(path), Ok(plan)) => {
                    assert_eq!((plan.stream, plan.logical), path, "row {n}: {plan:?}");
                    let shown = match path {
                        (true, true) => "logical",
                        (true, false) => "standby",
                        _ => "dump",
                    };
                    assert_eq!(plan.path(), shown, "row {n}");
                    assert!(!plan.why.is_empty());
                    // The standby's reason says what it gives the origin.
                    assert_eq!(
                        plan.why.contains("target's PostgreSQL service account"),
                        path == (true, false),
                        "row {n}: {}",
                        plan.why
                    );
                }
                (Err(needle), Err(e)) => assert!(e.contains(needle), "row {n}: {e}"),
                (expected, got) => panic!("row {n}: expected {expected:?}, got {got:?}"),
            }
        }
    }

    #[test]
    fn a_dump_chosen_by_auto_says_why() {
        let plan = choose(
            DbSync::Auto,
            &facts(150004, "glibc 2.31", "", "replica"),
            &facts(150004, "glibc 2.36", "", "replica"),
        )
        .unwrap();
        assert!(!plan.stream);
        assert!(
            plan.why.starts_with("dump and restore: C library")
                && plan
                    .why
                    .contains("no logical replication: the origin's wal_level"),
            "{}",
            plan.why
        );
    }
}
