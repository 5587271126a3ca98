//! Grants: the orchestrator's permission for one target to read a scope of this origin
//! (data dirs, the config file set, the databases) until an expiry. The origin's data plane
//! serves nothing without one. Grants arrive over the orchestrator's mutual-TLS channel, so
//! their authenticity is that channel's; they are kept in SQLite across restarts.

use std::path::{Component, Path, PathBuf};
use std::sync::Mutex;

use bmfleet_proto::v1::GrantRequest;
use rusqlite::{params, Connection, OptionalExtension};

/// A path that is not a clean absolute path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("refused: path {0:?} must be absolute, without '.', '..', '\\\\' or NUL")]
pub struct NotClean(pub String);

/// Checks that `p` is absolute, free of `.` and `..` components (rsync reads `/./` as where a
/// relative path starts), backslashes and NUL, and returns it as a path.
pub fn clean_absolute(p: &str) -> Result<PathBuf, NotClean> {
    let path = Path::new(p);
    let clean = path.is_absolute()
        && !p.contains('\\')
        && !p.contains('\0')
        && !p.split('/').any(|c| c == "." || c == "..")
        && path
            .components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
    if clean {
        Ok(path.to_path_buf())
    } else {
        Err(NotClean(p.to_string()))
    }
}

/// Now, Unix milliseconds (the agent's only clock read, at its edge).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// A grant as the origin keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// Unguessable id.
    pub id: String,
    /// The only target agent allowed to use it.
    pub target_name: String,
    /// The migration it belongs to.
    pub migration: String,
    /// BlueMind data dirs that may be read (and everything below them).
    pub paths: Vec<PathBuf>,
    /// The configuration file set may be copied.
    pub config_set: bool,
    /// The databases may be dumped.
    pub databases: bool,
    /// The cluster may be followed (base backup, then WAL streamed): a physical standby.
    pub replication: bool,
    /// Expiry, Unix ms.
    pub expires_at_ms: i64,
}

/// What a grant may cover; each data-plane verb needs one of a list of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Some data dirs (and the change journal of them).
    DataDirs,
    /// The configuration file set.
    ConfigSet,
    /// The databases: dumps, manifests, the downtime's gate.
    Databases,
    /// Following the cluster: a base backup, a publication, the replication relay, a
    /// verified point.
    Replication,
}

/// Why the origin refuses to serve a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The id is unknown (never granted, revoked, or forged).
    #[error("refused: no grant {0} on this origin (never issued, revoked, or forged)")]
    Unknown(String),
    /// Past its expiry.
    #[error("refused: grant {id} expired at {expired_at_ms} (Unix ms)")]
    Expired {
        /// The grant.
        id: String,
        /// When it expired.
        expired_at_ms: i64,
    },
    /// Issued to another target.
    #[error("refused: grant {id} was issued to '{granted}', not to '{caller}'")]
    WrongTarget {
        /// The grant.
        id: String,
        /// Its target.
        granted: String,
        /// Who presented it.
        caller: String,
    },
    /// The grant does not cover what was asked.
    #[error("refused: grant {id} does not cover {what}")]
    OutOfScope {
        /// The grant.
        id: String,
        /// What was asked.
        what: String,
    },
}

/// A grant store failure.
#[derive(Debug, thiserror::Error)]
#[error("grant store {path}: {source}")]
pub struct GrantStoreError {
    path: String,
    source: rusqlite::Error,
}

/// An invalid grant request.
#[derive(Debug, thiserror::Error)]
#[error("invalid grant: {0}")]
pub struct InvalidGrant(pub String);

impl Grant {
    /// Checks and converts an orchestrator's grant request.
    pub fn from_request(req: &GrantRequest) -> Result<Self, InvalidGrant> {
        if req.grant_id.len() < 16
            || !req
                .grant_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-')
        {
            return Err(InvalidGrant(
                "grant_id must be at least 16 characters of letters, digits and '-'".into(),
            ));
        }
        bmfleet_proto::identity::validate_name(&req.target_name).map_err(InvalidGrant)?;
        let paths = req
            .paths
            .iter()
            .map(|p| clean_absolute(p).map_err(|e| InvalidGrant(e.to_string())))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Grant {
            id: req.grant_id.clone(),
            target_name: req.target_name.clone(),
            migration: req.migration.clone(),
            paths,
            config_set: req.config_set,
            databases: req.databases,
            replication: req.replication,
            expires_at_ms: req.expires_at_unix_ms,
        })
    }

    /// Checks that `caller` may use this grant at `now_ms`.
    pub fn admit(&self, caller: &str, now_ms: i64) -> Result<(), Refusal> {
        if now_ms >= self.expires_at_ms {
            return Err(Refusal::Expired {
                id: self.id.clone(),
                expired_at_ms: self.expires_at_ms,
            });
        }
        if caller != self.target_name {
            return Err(Refusal::WrongTarget {
                id: self.id.clone(),
                granted: self.target_name.clone(),
                caller: caller.to_string(),
            });
        }
        Ok(())
    }

    fn out_of_scope(&self, what: String) -> Refusal {
        Refusal::OutOfScope {
            id: self.id.clone(),
            what,
        }
    }

    /// Checks the config-set scope.
    pub fn require_config_set(&self) -> Result<(), Refusal> {
        if self.config_set {
            Ok(())
        } else {
            Err(self.out_of_scope("the configuration file set".into()))
        }
    }

    /// Checks the data dirs scope (some dirs granted).
    pub fn require_data_dirs(&self) -> Result<(), Refusal> {
        if self.paths.is_empty() {
            Err(self.out_of_scope("the data dirs".into()))
        } else {
            Ok(())
        }
    }

    /// Checks the databases scope.
    pub fn require_databases(&self) -> Result<(), Refusal> {
        if self.databases {
            Ok(())
        } else {
            Err(self.out_of_scope("the databases".into()))
        }
    }

    /// Checks the replication scope.
    pub fn require_replication(&self) -> Result<(), Refusal> {
        if self.replication {
            Ok(())
        } else {
            Err(self.out_of_scope("following the cluster (replication)".into()))
        }
    }

    /// Checks one scope.
    pub fn require(&self, scope: Scope) -> Result<(), Refusal> {
        match scope {
            Scope::DataDirs => self.require_data_dirs(),
            Scope::ConfigSet => self.require_config_set(),
            Scope::Databases => self.require_databases(),
            Scope::Replication => self.require_replication(),
        }
    }

    /// Checks that the grant covers one of `scopes` (the first one's refusal otherwise).
    pub fn require_any(&self, scopes: &[Scope]) -> Result<(), Refusal> {
        let mut refusal = None;
        for scope in scopes {
            match self.require(*scope) {
                Ok(()) => return Ok(()),
                Err(e) => {
                    refusal.get_or_insert(e);
                }
            }
        }
        Err(refusal.unwrap_or_else(|| self.out_of_scope("anything (no scope named)".into())))
    }

    /// Maps a requested BlueMind path to its host path under `data_root`, refusing anything
    /// outside the granted dirs — symlinks included: the resolved path must stay inside the
    /// resolved granted dir. The trailing slash is kept (it means "the dir's content").
    pub fn resolve(&self, requested: &str, data_root: &Path) -> Result<String, Refusal> {
        let refuse = || self.out_of_scope(format!("path {requested:?}"));
        let asked = clean_absolute(requested).map_err(|_| refuse())?;
        let granted = self
            .paths
            .iter()
            .find(|g| asked.starts_with(g))
            .ok_or_else(refuse)?;
        let under_root = |p: &Path| data_root.join(p.strip_prefix("/").unwrap_or(p));
        let host = under_root(&asked);
        let real = host.canonicalize().map_err(|e| Refusal::OutOfScope {
            id: self.id.clone(),
            what: format!("path {requested:?} ({e})"),
        })?;
        let real_granted = under_root(granted).canonicalize().map_err(|_| refuse())?;
        if !real.starts_with(&real_granted) {
            return Err(self.out_of_scope(format!(
                "path {requested:?}: it resolves to {} outside the granted {}",
                real.display(),
                granted.display()
            )));
        }
        let mut out = real.display().to_string();
        if requested.ends_with('/') && !out.ends_with('/') {
            out.push('/');
        }
        Ok(out)
    }
}

/// The grants of one origin.
pub struct GrantStore {
    conn: Mutex<Connection>,
    path: String,
}

impl GrantStore {
    /// Opens (or creates) the grant table in the database at `path`.
    pub fn open(path: &Path) -> Result<Self, GrantStoreError> {
        let display = path.display().to_string();
        let err = |source| GrantStoreError {
            path: display.clone(),
            source,
        };
        let conn = Connection::open(path).map_err(err)?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             CREATE TABLE IF NOT EXISTS grants (
                 id TEXT PRIMARY KEY,
                 target_name TEXT NOT NULL,
                 migration TEXT NOT NULL,
                 paths TEXT NOT NULL,
                 config_set INTEGER NOT NULL,
                 databases INTEGER NOT NULL,
                 expires_at_ms INTEGER NOT NULL
             );
             CREATE TABLE IF NOT EXISTS replication_leftovers (
                 grant_id TEXT PRIMARY KEY,
                 role TEXT NOT NULL,
                 slot TEXT NOT NULL,
                 cap_set INTEGER NOT NULL
             );",
        )
        .map_err(err)?;
        // Grants stored before the replication scope existed.
        let has_replication = conn
            .prepare("SELECT replication FROM grants LIMIT 0")
            .is_ok();
        if !has_replication {
            conn.execute_batch(
                "ALTER TABLE grants ADD COLUMN replication INTEGER NOT NULL DEFAULT 0;",
            )
            .map_err(err)?;
        }
        // Leftovers stored before logical replication existed.
        if conn
            .prepare("SELECT logical FROM replication_leftovers LIMIT 0")
            .is_err()
        {
            conn.execute_batch(
                "ALTER TABLE replication_leftovers ADD COLUMN logical TEXT NOT NULL DEFAULT '';",
            )
            .map_err(err)?;
        }
        Ok(GrantStore {
            conn: Mutex::new(conn),
            path: display,
        })
    }

    fn err(&self, source: rusqlite::Error) -> GrantStoreError {
        GrantStoreError {
            path: self.path.clone(),
            source,
        }
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records (or replaces) a grant.
    pub fn put(&self, grant: &Grant) -> Result<(), GrantStoreError> {
        let paths: Vec<String> = grant
            .paths
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        self.conn()
            .execute(
                "INSERT OR REPLACE INTO grants
                 (id, target_name, migration, paths, config_set, databases, expires_at_ms,
                  replication)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    grant.id,
                    grant.target_name,
                    grant.migration,
                    paths.join("\n"),
                    grant.config_set,
                    grant.databases,
                    grant.expires_at_ms,
                    grant.replication
                ],
            )
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    /// Deletes every grant issued to `target_name` for `migration`; returns how many.
    pub fn revoke_issued(
        &self,
        target_name: &str,
        migration: &str,
    ) -> Result<usize, GrantStoreError> {
        self.conn()
            .execute(
                "DELETE FROM grants WHERE target_name = ?1 AND migration = ?2",
                params![target_name, migration],
            )
            .map_err(|e| self.err(e))
    }

    /// Deletes every grant that expired before `now_ms`; returns how many.
    pub fn purge_expired(&self, now_ms: i64) -> Result<usize, GrantStoreError> {
        self.conn()
            .execute(
                "DELETE FROM grants WHERE expires_at_ms <= ?1",
                params![now_ms],
            )
            .map_err(|e| self.err(e))
    }

    /// Removes a grant; true when it existed.
    pub fn revoke(&self, id: &str) -> Result<bool, GrantStoreError> {
        self.conn()
            .execute("DELETE FROM grants WHERE id = ?1", params![id])
            .map(|n| n > 0)
            .map_err(|e| self.err(e))
    }

    /// The grant `id`, if any.
    pub fn get(&self, id: &str) -> Result<Option<Grant>, GrantStoreError> {
        self.conn()
            .query_row(
                "SELECT id, target_name, migration, paths, config_set, databases, expires_at_ms,
                        replication
                 FROM grants WHERE id = ?1",
                params![id],
                |r| {
                    let paths: String = r.get(3)?;
                    Ok(Grant {
                        id: r.get(0)?,
                        target_name: r.get(1)?,
                        migration: r.get(2)?,
                        paths: paths
                            .lines()
                            .filter(|l| !l.is_empty())
                            .map(PathBuf::from)
                            .collect(),
                        config_set: r.get(4)?,
                        databases: r.get(5)?,
                        expires_at_ms: r.get(6)?,
                        replication: r.get(7)?,
                    })
                },
            )
            .optional()
            .map_err(|e| self.err(e))
    }

    /// The ids of the grants still valid at `now_ms`.
    pub fn valid(&self, now_ms: i64) -> Result<Vec<String>, GrantStoreError> {
        let conn = self.conn();
        let mut statement = conn
            .prepare("SELECT id FROM grants WHERE expires_at_ms > ?1 ORDER BY id")
            .map_err(|e| self.err(e))?;
        let ids = statement
            .query_map(params![now_ms], |r| r.get(0))
            .and_then(|rows| rows.collect::<Result<Vec<String>, _>>())
            .map_err(|e| self.err(e));
        ids
    }

    /// Records what a replication grant made in the cluster (its role, its slot, and whether
    /// it capped the WAL slots keep), to be removed once the grant is gone.
    pub fn put_leftover(&self, leftover: &Leftover) -> Result<(), GrantStoreError> {
        self.conn()
            .execute(
                "INSERT OR REPLACE INTO replication_leftovers (grant_id, role, slot, cap_set, logical)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    leftover.grant_id,
                    leftover.role,
                    leftover.slot,
                    leftover.cap_set,
                    leftover.logical
                ],
            )
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    /// The leftovers of replication grants that no longer exist or expired before `now_ms`,
    /// and whether any valid replication grant remains (the WAL cap stays while one does).
    pub fn orphan_leftovers(&self, now_ms: i64) -> Result<(Vec<Leftover>, bool), GrantStoreError> {
        let conn = self.conn();
        let mut statement = conn
            .prepare(
                "SELECT l.grant_id, l.role, l.slot, l.cap_set, l.logical,
                        g.id IS NOT NULL AND g.expires_at_ms > ?1
                 FROM replication_leftovers l LEFT JOIN grants g ON g.id = l.grant_id
                 ORDER BY l.grant_id",
            )
            .map_err(|e| self.err(e))?;
        let rows = statement
            .query_map(params![now_ms], |r| {
                Ok((
                    Leftover {
                        grant_id: r.get(0)?,
                        role: r.get(1)?,
                        slot: r.get(2)?,
                        cap_set: r.get(3)?,
                        logical: r.get(4)?,
                    },
                    r.get::<_, bool>(5)?,
                ))
            })
            .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
            .map_err(|e| self.err(e))?;
        let live = rows.iter().any(|(_, live)| *live);
        Ok((
            rows.into_iter()
                .filter(|(_, live)| !live)
                .map(|(l, _)| l)
                .collect(),
            live,
        ))
    }

    /// What grant `grant_id` made in the cluster, if anything yet.
    pub fn leftover(&self, grant_id: &str) -> Result<Option<Leftover>, GrantStoreError> {
        self.conn()
            .query_row(
                "SELECT grant_id, role, slot, cap_set, logical FROM replication_leftovers
                 WHERE grant_id = ?1",
                params![grant_id],
                |r| {
                    Ok(Leftover {
                        grant_id: r.get(0)?,
                        role: r.get(1)?,
                        slot: r.get(2)?,
                        cap_set: r.get(3)?,
                        logical: r.get(4)?,
                    })
                },
            )
            .optional()
            .map_err(|e| self.err(e))
    }

    /// Forgets a leftover once it is removed from the cluster.
    pub fn forget_leftover(&self, grant_id: &str) -> Result<(), GrantStoreError> {
        self.conn()
            .execute(
                "DELETE FROM replication_leftovers WHERE grant_id = ?1",
                params![grant_id],
            )
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    /// Finds the grant `id` and checks `caller` may use it now.
    pub fn admit(&self, id: &str, caller: &str, now_ms: i64) -> Result<Grant, AdmitError> {
        let grant = self
            .get(id)?
            .ok_or_else(|| Refusal::Unknown(id.to_string()))?;
        grant.admit(caller, now_ms)?;
        Ok(grant)
    }
}

/// What a replication grant made in the origin's cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leftover {
    /// The grant.
    pub grant_id: String,
    /// The replication role made for it.
    pub role: String,
    /// Its physical replication slot.
    pub slot: String,
    /// It set `max_slot_wal_keep_size` (unlimited before).
    pub cap_set: bool,
    /// What logical replication made and changed in each database (JSON of
    /// `publication::Published`; empty for a physical standby's).
    pub logical: String,
}

/// A failed admission: refused, or the store failed.
#[derive(Debug, thiserror::Error)]
pub enum AdmitError {
    /// The request is not allowed.
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] GrantStoreError),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(paths: &[&str]) -> Grant {
        Grant {
            id: "g-0123456789abcdef".into(),
            target_name: "target-1".into(),
            migration: "m1".into(),
            paths: paths.iter().map(PathBuf::from).collect(),
            config_set: false,
            databases: false,
            replication: false,
            expires_at_ms: 1000,
        }
    }

    #[test]
    fn admission_checks_expiry_then_target() {
        let g = grant(&["/var/spool/cyrus"]);
        assert!(g.admit("target-1", 999).is_ok());
        assert!(matches!(
            g.admit("target-1", 1000),
            Err(Refusal::Expired { .. })
        ));
        assert!(matches!(
            g.admit("target-2", 10),
            Err(Refusal::WrongTarget { .. })
        ));
        assert!(matches!(
            g.require_databases(),
            Err(Refusal::OutOfScope { .. })
        ));
    }

    #[test]
    fn paths_resolve_under_data_root_and_symlinks_cannot_escape() {
        let root = tempfile::tempdir().unwrap();
        let spool = root.path().join("var/spool/cyrus");
        std::fs::create_dir_all(spool.join("user")).unwrap();
        std::fs::create_dir_all(root.path().join("etc")).unwrap();
        std::os::unix::fs::symlink(root.path().join("etc"), spool.join("escape")).unwrap();
        let g = grant(&["/var/spool/cyrus"]);
        let real_spool = spool.canonicalize().unwrap();
        assert_eq!(
            g.resolve("/var/spool/cyrus/", root.path()).unwrap(),
            format!("{}/", real_spool.display())
        );
        assert!(g.resolve("/var/spool/cyrus/user", root.path()).is_ok());
        for bad in [
            "/var/spool/cyrus/escape/",
            "/etc",
            "/var/spool/cyrus/../../../etc",
            "/var/spool/cyrusx",
            "/var/spool/cyrus/missing",
        ] {
            assert!(
                matches!(g.resolve(bad, root.path()), Err(Refusal::OutOfScope { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn grants_survive_reopening_and_revocation_removes_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.db");
        let store = GrantStore::open(&path).unwrap();
        let g = grant(&["/var/spool/cyrus", "/var/lib/cyrus"]);
        store.put(&g).unwrap();
        drop(store);
        let store = GrantStore::open(&path).unwrap();
        assert_eq!(store.get(&g.id).unwrap(), Some(g.clone()));
        assert!(store.revoke(&g.id).unwrap());
        assert!(matches!(
            store.admit(&g.id, "target-1", 0),
            Err(AdmitError::Refused(Refusal::Unknown(_)))
        ));
    }
}
