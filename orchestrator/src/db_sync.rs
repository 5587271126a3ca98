//! How an instance's databases reach its target, chosen at preflight from both hosts' facts
//! (pure): a physical streaming standby when both allow it — the target follows the origin
//! during the hot phase and is promoted in the downtime — else dump and restore.

use bmfleet_proto::v1::FactsReply;

use crate::fleet::DbSync;
use crate::machine::DbPlan;

/// The PostgreSQL major of a `server_version_num` (150004 → 15).
fn major(version_num: u32) -> u32 {
    version_num / 10_000
}

/// Why a physical standby cannot carry this pair's databases (empty: it can).
fn obstacles(origin: &FactsReply, target: &FactsReply) -> Vec<String> {
    let mut why = Vec::new();
    if !target.standby_unavailable.is_empty() {
        why.push(format!(
            "the target cannot follow: {}",
            target.standby_unavailable
        ));
    }
    let (o, t) = (origin.postgresql_version_num, target.postgresql_version_num);
    if o == 0 || t == 0 {
        why.push("a PostgreSQL server did not say its version".into());
    } else if major(o) != major(t) {
        why.push(format!(
            "PostgreSQL {} on the origin, {} on the target: a standby needs the same major \
             (logical replication across majors is not available yet)",
            major(o),
            major(t)
        ));
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

/// The plan for `wanted` given both hosts' facts; an error when `stream` was asked and is
/// not possible (the preflight fails with it).
pub fn choose(wanted: DbSync, origin: &FactsReply, target: &FactsReply) -> Result<DbPlan, String> {
    if wanted == DbSync::Dump {
        return Ok(DbPlan {
            stream: false,
            why: "dump and restore (db_sync = dump)".into(),
        });
    }
    let why = obstacles(origin, target);
    if why.is_empty() {
        return Ok(DbPlan {
            stream: true,
            why: format!(
                "standby: PostgreSQL {} and {} on both hosts",
                major(origin.postgresql_version_num),
                origin.libc_version
            ),
        });
    }
    match wanted {
        DbSync::Stream => Err(format!(
            "db_sync = stream is not possible: {}; use auto or dump",
            why.join("; ")
        )),
        _ => Ok(DbPlan {
            stream: false,
            why: format!("dump and restore: {}", why.join("; ")),
        }),
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
        let table: Vec<(DbSync, FactsReply, FactsReply, Result<bool, &str>)> = vec![
            (DbSync::Auto, good.clone(), good.clone(), Ok(true)),
            (DbSync::Stream, good.clone(), good.clone(), Ok(true)),
            (DbSync::Dump, good.clone(), good.clone(), Ok(false)),
            (
                DbSync::Auto,
                good.clone(),
                facts(160002, "glibc 2.36", "", "replica"),
                Ok(false),
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
                Ok(false),
            ),
        ];
        for (n, (wanted, origin, target, expected)) in table.into_iter().enumerate() {
            let got = choose(wanted, &origin, &target);
            match (expected, got) {
                (Ok(stream), Ok(plan)) => {
                    assert_eq!(plan.stream, stream, "row {n}: {plan:?}");
                    assert!(!plan.why.is_empty());
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
            plan.why.starts_with("dump and restore: C library"),
            "{}",
            plan.why
        );
    }
}
