//! The orchestrator's durable state, in an embedded SQLite database: the agents and their
//! last health check, and the audit log of every Fleet API call.

use std::path::Path;
use std::sync::Mutex;

use bmfleet_proto::v1::{AgentStatus, AuditEntry, FactsReply};
use prost::Message;
use rusqlite::{params, Connection, OptionalExtension};

use crate::config::AgentEntry;
use crate::machine::{Action, Event, Instance};
use crate::scheduler::FleetState;

/// One transition as [`State::save_transition`] writes it.
pub struct TransitionRecord<'a> {
    /// The instance's name.
    pub name: &'a str,
    /// The event.
    pub event: &'a Event,
    /// The instance's state after it.
    pub instance: &'a Instance,
    /// The actions about to run.
    pub actions: &'a [Action],
    /// The fleet-wide state, when the transition changed it.
    pub fleet: Option<&'a FleetState>,
    /// The bandwidth limit of the instance's hot passes (KiB/s, 0: none).
    pub hot_pass_kib: u32,
    /// When, Unix ms.
    pub now_ms: i64,
}

/// One stored transition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransitionRow {
    /// Sequence number.
    pub id: i64,
    /// When, Unix ms.
    pub at_ms: i64,
    /// Which instance.
    pub instance: String,
    /// The event (JSON).
    pub event: String,
    /// The phase after it.
    pub phase: String,
    /// The actions it started (JSON).
    pub actions: String,
}

/// A `transitions` row (id, at_ms, instance, event, phase, actions).
fn transition_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<TransitionRow> {
    Ok(TransitionRow {
        id: r.get(0)?,
        at_ms: r.get(1)?,
        instance: r.get(2)?,
        event: r.get(3)?,
        phase: r.get(4)?,
        actions: r.get(5)?,
    })
}

/// A notice to put in the outbox, once for each of its receivers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queued {
    /// The idempotency key.
    pub key: String,
    /// What it is about.
    pub kind: String,
    /// The instance ("" for the fleet).
    pub instance: String,
    /// The JSON body.
    pub body: String,
    /// Who gets it.
    pub receivers: Vec<String>,
}

/// A notification in the outbox, for one receiver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxRow {
    /// Its row.
    pub id: i64,
    /// The idempotency key.
    pub key: String,
    /// The receiver's name.
    pub receiver: String,
    /// What it is about (`cutover_done`…).
    pub kind: String,
    /// The instance ("" for the fleet).
    pub instance: String,
    /// The JSON body.
    pub body: String,
    /// Attempts so far.
    pub attempts: u32,
    /// When it was delivered (None: not yet).
    pub delivered_ms: Option<i64>,
    /// When it was queued.
    pub created_ms: i64,
    /// Why the last attempt failed.
    pub last_error: String,
}

/// A stored value as JSON (these types always serialise).
fn json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_default()
}

/// A state database failure.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// SQLite failed.
    #[error("state database {path}: {source}")]
    Db {
        /// The database file.
        path: String,
        /// Why.
        source: rusqlite::Error,
    },
    /// The database's directory could not be created.
    #[error("state database directory {path}: {source}")]
    Dir {
        /// The directory.
        path: String,
        /// Why.
        source: std::io::Error,
    },
}

/// The outcome of one health check of one agent.
#[derive(Debug, Clone)]
pub enum HealthCheck {
    /// The agent answered with its facts.
    Up(Box<FactsReply>),
    /// The agent did not answer, or was refused; the reason.
    Down(String),
}

/// What the operator chose when a fleet file was applied.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AppliedChoices {
    /// Instances left out: their target already served.
    pub skipped: Vec<String>,
    /// Instances migrated again on purpose.
    pub remigrate: Vec<String>,
}

/// One instance's outcome, kept across every later apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryEntry {
    /// When, Unix ms.
    pub at_ms: i64,
    /// The migration (fleet) name.
    pub migration: String,
    /// The instance.
    pub instance: String,
    /// Done, RolledBack, Failed or Aborted.
    pub outcome: String,
    /// The origin agent.
    pub origin: String,
    /// The target agent.
    pub target: String,
    /// The service IP.
    pub service_ip: String,
}

/// A join token as stored: the secret only as its SHA-256.
#[derive(Debug, Clone)]
pub struct StoredToken {
    /// The public part (`bmj1.ID.…`).
    pub id: String,
    /// SHA-256 of the secret part.
    pub secret_sha256: [u8; 32],
    /// The agent name it enrolls.
    pub name: String,
    /// When it was issued.
    pub issued_ms: i64,
    /// The operator's certificate name.
    pub issued_by: String,
    /// It is refused from then on.
    pub expires_ms: i64,
    /// It may replace the certificate of an agent of that name (the operator said so).
    pub reenroll: bool,
}

/// Why a join token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenRefusal {
    /// No such token, or a wrong secret (the two are not told apart).
    #[error("unknown join token (issue one with `bmctl fleet agents token NAME`)")]
    Unknown,
    /// Already redeemed.
    #[error("this join token was already used (at {at_ms} Unix ms, from {from}); a token enrolls once: issue a new one")]
    Used {
        /// When.
        at_ms: i64,
        /// The caller's address.
        from: String,
    },
    /// Past its lifetime.
    #[error("this join token expired at {at_ms} Unix ms: issue a new one")]
    Expired {
        /// When.
        at_ms: i64,
    },
}

/// What an audited Fleet API call did.
#[derive(Debug, Clone)]
pub struct AuditRecord {
    /// The caller's certificate name ("-" when it presented none usable).
    pub who: String,
    /// The caller's role ("-" likewise).
    pub role: String,
    /// The Fleet method.
    pub method: String,
    /// The call's arguments, JSON.
    pub arguments: String,
    /// "ok", "denied" or "error".
    pub outcome: String,
    /// Details of a denial or error.
    pub detail: String,
}

/// The state database.
pub struct State {
    conn: Mutex<Connection>,
    path: String,
}

impl State {
    /// Opens (creating it and its parent dir if needed) the state database.
    pub fn open(path: &Path) -> Result<Self, StateError> {
        let display = path.display().to_string();
        let err = |source| StateError::Db {
            path: display.clone(),
            source,
        };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|source| StateError::Dir {
                path: parent.display().to_string(),
                source,
            })?;
        }
        bmfleet_proto::private_file(path).map_err(|source| StateError::Dir {
            path: display.clone(),
            source,
        })?;
        let conn = Connection::open(path).map_err(err)?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = NORMAL;
             CREATE TABLE IF NOT EXISTS agents (
                 name TEXT PRIMARY KEY,
                 address TEXT NOT NULL,
                 up INTEGER NOT NULL DEFAULT 0,
                 last_seen_ms INTEGER NOT NULL DEFAULT 0,
                 last_check_ms INTEGER NOT NULL DEFAULT 0,
                 last_error TEXT NOT NULL DEFAULT '',
                 facts BLOB
             );
             CREATE TABLE IF NOT EXISTS fleet_file (
                 id INTEGER PRIMARY KEY CHECK (id = 1),
                 text TEXT NOT NULL,
                 applied_ms INTEGER NOT NULL
             );
             CREATE TABLE IF NOT EXISTS fleet_state (
                 id INTEGER PRIMARY KEY CHECK (id = 1),
                 state TEXT NOT NULL
             );
             CREATE TABLE IF NOT EXISTS instances (
                 name TEXT PRIMARY KEY,
                 state TEXT NOT NULL,
                 updated_ms INTEGER NOT NULL
             );
             CREATE TABLE IF NOT EXISTS transitions (
                 id INTEGER PRIMARY KEY AUTOINCREMENT,
                 at_ms INTEGER NOT NULL,
                 instance TEXT NOT NULL,
                 event TEXT NOT NULL,
                 phase TEXT NOT NULL,
                 actions TEXT NOT NULL
             );
             CREATE TABLE IF NOT EXISTS applied_choices (
                 id INTEGER PRIMARY KEY CHECK (id = 1),
                 skipped TEXT NOT NULL,
                 remigrate TEXT NOT NULL
             );
             CREATE TABLE IF NOT EXISTS history (
                 id INTEGER PRIMARY KEY AUTOINCREMENT,
                 at_ms INTEGER NOT NULL,
                 migration TEXT NOT NULL,
                 instance TEXT NOT NULL,
                 outcome TEXT NOT NULL,
                 origin TEXT NOT NULL,
                 target TEXT NOT NULL,
                 service_ip TEXT NOT NULL
             );
             CREATE TABLE IF NOT EXISTS registered_agents (
                 name TEXT PRIMARY KEY,
                 address TEXT NOT NULL,
                 data_address TEXT,
                 registered_ms INTEGER NOT NULL,
                 registered_by TEXT NOT NULL
             );
             CREATE TABLE IF NOT EXISTS join_tokens (
                 id TEXT PRIMARY KEY,
                 secret_sha256 BLOB NOT NULL,
                 name TEXT NOT NULL,
                 issued_ms INTEGER NOT NULL,
                 issued_by TEXT NOT NULL,
                 expires_ms INTEGER NOT NULL,
                 used_ms INTEGER,
                 used_from TEXT,
                 reenroll INTEGER NOT NULL DEFAULT 0
             );
             CREATE TABLE IF NOT EXISTS notify_cursor (
                 id INTEGER PRIMARY KEY CHECK (id = 1),
                 transition_id INTEGER NOT NULL
             );
             CREATE TABLE IF NOT EXISTS notify_outbox (
                 id INTEGER PRIMARY KEY AUTOINCREMENT,
                 key TEXT NOT NULL,
                 receiver TEXT NOT NULL,
                 kind TEXT NOT NULL,
                 instance TEXT NOT NULL,
                 body TEXT NOT NULL,
                 created_ms INTEGER NOT NULL,
                 attempts INTEGER NOT NULL DEFAULT 0,
                 next_ms INTEGER NOT NULL,
                 delivered_ms INTEGER,
                 last_error TEXT NOT NULL DEFAULT '',
                 UNIQUE (key, receiver)
             );
             CREATE TABLE IF NOT EXISTS audit (
                 id INTEGER PRIMARY KEY AUTOINCREMENT,
                 at_ms INTEGER NOT NULL,
                 who TEXT NOT NULL,
                 role TEXT NOT NULL,
                 method TEXT NOT NULL,
                 arguments TEXT NOT NULL,
                 outcome TEXT NOT NULL,
                 detail TEXT NOT NULL
             );",
        )
        .map_err(err)?;
        // Columns a state DB made by an earlier version lacks: re-enrollment became a token's
        // own choice; the hot passes' bandwidth limits were kept in the fleet state
        // (rewritten whole at every transition) before each instance's own row.
        for (table, column) in [("join_tokens", "reenroll"), ("instances", "hot_pass_kib")] {
            let has = conn
                .prepare("SELECT 1 FROM pragma_table_info(?1) WHERE name = ?2")
                .and_then(|mut s| s.exists(params![table, column]))
                .map_err(err)?;
            if !has {
                conn.execute_batch(&format!(
                    "ALTER TABLE {table} ADD COLUMN {column} INTEGER NOT NULL DEFAULT 0;"
                ))
                .map_err(err)?;
            }
        }
        Ok(State {
            conn: Mutex::new(conn),
            path: display,
        })
    }

    fn err(&self, source: rusqlite::Error) -> StateError {
        StateError::Db {
            path: self.path.clone(),
            source,
        }
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes the agents table match the configured agents: new ones are added, moved ones get
    /// their new address, ones no longer configured are removed. Health history is kept.
    pub fn sync_agents(&self, agents: &[AgentEntry]) -> Result<(), StateError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(|e| self.err(e))?;
        {
            let names: Vec<&str> = agents.iter().map(|a| a.name.as_str()).collect();
            let existing: Vec<String> = tx
                .prepare("SELECT name FROM agents")
                .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
                .map_err(|e| self.err(e))?;
            for gone in existing.iter().filter(|n| !names.contains(&n.as_str())) {
                tx.execute("DELETE FROM agents WHERE name = ?1", params![gone])
                    .map_err(|e| self.err(e))?;
            }
            for a in agents {
                tx.execute(
                    "INSERT INTO agents (name, address) VALUES (?1, ?2)
                     ON CONFLICT (name) DO UPDATE SET address = excluded.address",
                    params![a.name, a.address],
                )
                .map_err(|e| self.err(e))?;
            }
        }
        tx.commit().map_err(|e| self.err(e))
    }

    /// The agents registered through the Fleet API (not those of the configuration file).
    pub fn registered_agents(&self) -> Result<Vec<AgentEntry>, StateError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare("SELECT name, address, data_address FROM registered_agents ORDER BY name")
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], |r| {
                Ok(AgentEntry {
                    name: r.get(0)?,
                    address: r.get(1)?,
                    data_address: r.get(2)?,
                })
            })
            .and_then(|rows| rows.collect())
            .map_err(|e| self.err(e))?;
        Ok(rows)
    }

    /// Registers an agent (or moves a registered one) and starts its health record.
    pub fn register_agent(
        &self,
        entry: &AgentEntry,
        by: &str,
        now_ms: i64,
    ) -> Result<(), StateError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(|e| self.err(e))?;
        tx.execute(
            "INSERT INTO registered_agents (name, address, data_address, registered_ms, registered_by)
             VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (name) DO UPDATE SET address = excluded.address,
                 data_address = excluded.data_address, registered_ms = excluded.registered_ms,
                 registered_by = excluded.registered_by",
            params![entry.name, entry.address, entry.data_address, now_ms, by],
        )
        .map_err(|e| self.err(e))?;
        tx.execute(
            "INSERT INTO agents (name, address) VALUES (?1, ?2)
             ON CONFLICT (name) DO UPDATE SET address = excluded.address",
            params![entry.name, entry.address],
        )
        .map_err(|e| self.err(e))?;
        tx.commit().map_err(|e| self.err(e))
    }

    /// Forgets a registered agent and its health record; false when it was not registered.
    pub fn unregister_agent(&self, name: &str) -> Result<bool, StateError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(|e| self.err(e))?;
        let removed = tx
            .execute(
                "DELETE FROM registered_agents WHERE name = ?1",
                params![name],
            )
            .map_err(|e| self.err(e))?;
        if removed > 0 {
            tx.execute("DELETE FROM agents WHERE name = ?1", params![name])
                .map_err(|e| self.err(e))?;
        }
        tx.commit().map_err(|e| self.err(e))?;
        Ok(removed > 0)
    }

    /// Stores a new join token (its secret only as a hash).
    pub fn store_join_token(&self, token: &StoredToken) -> Result<(), StateError> {
        self.conn()
            .execute(
                "INSERT INTO join_tokens (id, secret_sha256, name, issued_ms, issued_by, expires_ms, reenroll)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    token.id,
                    token.secret_sha256.to_vec(),
                    token.name,
                    token.issued_ms,
                    token.issued_by,
                    token.expires_ms,
                    token.reenroll
                ],
            )
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    /// Redeems a join token: it must exist, hold this secret, be unused and unexpired; then
    /// `accept` (given the name it was issued for and whether it may re-enroll) must take
    /// what the host sent. Only then is the token marked used, in the same transaction (a
    /// second redemption, even concurrent, is refused): a request `accept` refuses leaves
    /// the token as it was.
    pub fn redeem_join_token<T, E>(
        &self,
        id: &str,
        secret_sha256: &[u8; 32],
        from: &str,
        now_ms: i64,
        accept: impl FnOnce(&str, bool) -> Result<T, E>,
    ) -> Result<Result<Result<T, E>, TokenRefusal>, StateError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(|e| self.err(e))?;
        type TokenRow = (Vec<u8>, String, i64, Option<i64>, Option<String>, bool);
        let row: Option<TokenRow> = tx
            .query_row(
                "SELECT secret_sha256, name, expires_ms, used_ms, used_from, reenroll FROM join_tokens WHERE id = ?1",
                params![id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?)),
            )
            .optional()
            .map_err(|e| self.err(e))?;
        let Some((hash, name, expires_ms, used_ms, used_from, reenroll)) = row else {
            return Ok(Err(TokenRefusal::Unknown));
        };
        // Compared in constant time: the id is public, the secret is not.
        let same = hash.len() == 32
            && hash
                .iter()
                .zip(secret_sha256.iter())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0;
        if !same {
            return Ok(Err(TokenRefusal::Unknown));
        }
        if let Some(at_ms) = used_ms {
            return Ok(Err(TokenRefusal::Used {
                at_ms,
                from: used_from.unwrap_or_default(),
            }));
        }
        if now_ms >= expires_ms {
            return Ok(Err(TokenRefusal::Expired { at_ms: expires_ms }));
        }
        let accepted = match accept(&name, reenroll) {
            Ok(accepted) => accepted,
            // Not spent: the transaction goes without a change.
            Err(refused) => return Ok(Ok(Err(refused))),
        };
        tx.execute(
            "UPDATE join_tokens SET used_ms = ?2, used_from = ?3 WHERE id = ?1 AND used_ms IS NULL",
            params![id, now_ms, from],
        )
        .map_err(|e| self.err(e))?;
        tx.commit().map_err(|e| self.err(e))?;
        Ok(Ok(Ok(accepted)))
    }

    /// The facts last stored for an agent.
    pub fn last_facts(&self, name: &str) -> Result<Option<FactsReply>, StateError> {
        let blob: Option<Option<Vec<u8>>> = self
            .conn()
            .query_row(
                "SELECT facts FROM agents WHERE name = ?1",
                params![name],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| self.err(e))?;
        Ok(blob
            .flatten()
            .and_then(|b| FactsReply::decode(b.as_slice()).ok()))
    }

    /// Records a health check made at `now_ms`.
    pub fn record_health(
        &self,
        name: &str,
        check: &HealthCheck,
        now_ms: i64,
    ) -> Result<(), StateError> {
        let conn = self.conn();
        let result = match check {
            HealthCheck::Up(facts) => conn.execute(
                "UPDATE agents SET up = 1, last_seen_ms = ?2, last_check_ms = ?2,
                 last_error = '', facts = ?3 WHERE name = ?1",
                params![name, now_ms, facts.encode_to_vec()],
            ),
            HealthCheck::Down(reason) => conn.execute(
                "UPDATE agents SET up = 0, last_check_ms = ?2, last_error = ?3 WHERE name = ?1",
                params![name, now_ms, reason],
            ),
        };
        result.map(|_| ()).map_err(|e| self.err(e))
    }

    /// Every agent's health, by name.
    pub fn agents(&self) -> Result<Vec<AgentStatus>, StateError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(
                "SELECT name, address, up, last_seen_ms, last_check_ms, last_error, facts
                 FROM agents ORDER BY name",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], |r| {
                let facts: Option<Vec<u8>> = r.get(6)?;
                Ok(AgentStatus {
                    name: r.get(0)?,
                    address: r.get(1)?,
                    up: r.get(2)?,
                    last_seen_unix_ms: r.get(3)?,
                    last_check_unix_ms: r.get(4)?,
                    last_error: r.get(5)?,
                    facts: facts.and_then(|b| FactsReply::decode(b.as_slice()).ok()),
                    data_address: String::new(),
                    source: String::new(),
                })
            })
            .and_then(|rows| rows.collect())
            .map_err(|e| self.err(e))?;
        Ok(rows)
    }

    /// Stores a newly applied fleet file, replacing the previous one, and starts its
    /// instances afresh (the previous fleet's states go; its transitions stay, for history).
    pub fn save_fleet_file(
        &self,
        text: &str,
        choices: &AppliedChoices,
        now_ms: i64,
    ) -> Result<(), StateError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(|e| self.err(e))?;
        tx.execute(
            "INSERT OR REPLACE INTO fleet_file (id, text, applied_ms) VALUES (1, ?1, ?2)",
            params![text, now_ms],
        )
        .map_err(|e| self.err(e))?;
        let json = |v: &[String]| serde_json::to_string(v).unwrap_or_else(|_| "[]".into());
        tx.execute(
            "INSERT OR REPLACE INTO applied_choices (id, skipped, remigrate) VALUES (1, ?1, ?2)",
            params![json(&choices.skipped), json(&choices.remigrate)],
        )
        .map_err(|e| self.err(e))?;
        tx.execute_batch("DELETE FROM instances; DELETE FROM fleet_state;")
            .map_err(|e| self.err(e))?;
        tx.commit().map_err(|e| self.err(e))
    }

    /// The applied fleet file, if any.
    pub fn fleet_file(&self) -> Result<Option<String>, StateError> {
        self.conn()
            .query_row("SELECT text FROM fleet_file WHERE id = 1", [], |r| r.get(0))
            .optional()
            .map_err(|e| self.err(e))
    }

    /// The last transition the notifier read (0: none).
    pub fn notify_cursor(&self) -> Result<i64, StateError> {
        self.conn()
            .query_row(
                "SELECT transition_id FROM notify_cursor WHERE id = 1",
                [],
                |r| r.get(0),
            )
            .optional()
            .map(|c| c.unwrap_or(0))
            .map_err(|e| self.err(e))
    }

    /// Up to `limit` transitions after `after_id`, oldest first.
    pub fn transitions_from(
        &self,
        after_id: i64,
        limit: u32,
    ) -> Result<Vec<TransitionRow>, StateError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(
                "SELECT id, at_ms, instance, event, phase, actions FROM transitions
                 WHERE id > ?1 ORDER BY id LIMIT ?2",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(params![after_id, limit], transition_row)
            .and_then(|rows| rows.collect())
            .map_err(|e| self.err(e))?;
        Ok(rows)
    }

    /// `instance`'s phase before transition `before_id`, since `since_ms` (None: it had none).
    pub fn previous_phase(
        &self,
        instance: &str,
        before_id: i64,
        since_ms: i64,
    ) -> Result<Option<String>, StateError> {
        self.conn()
            .query_row(
                "SELECT phase FROM transitions WHERE instance = ?1 AND id < ?2 AND at_ms >= ?3
                 ORDER BY id DESC LIMIT 1",
                params![instance, before_id, since_ms],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| self.err(e))
    }

    /// Puts `notices` in the outbox (once per key and receiver: a notice derived again is
    /// not queued twice) and moves the cursor to `cursor`, in one transaction.
    pub fn enqueue_notices(
        &self,
        notices: &[Queued],
        cursor: i64,
        now_ms: i64,
    ) -> Result<(), StateError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(|e| self.err(e))?;
        for n in notices {
            for receiver in &n.receivers {
                tx.execute(
                    "INSERT OR IGNORE INTO notify_outbox (key, receiver, kind, instance, body, created_ms, next_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6)",
                    params![n.key, receiver, n.kind, n.instance, n.body, now_ms],
                )
                .map_err(|e| self.err(e))?;
            }
        }
        tx.execute(
            "INSERT OR REPLACE INTO notify_cursor (id, transition_id) VALUES (1, ?1)",
            params![cursor],
        )
        .map_err(|e| self.err(e))?;
        tx.commit().map_err(|e| self.err(e))
    }

    fn outbox_rows(
        &self,
        filter: &str,
        args: &[&dyn rusqlite::ToSql],
    ) -> Result<Vec<OutboxRow>, StateError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(&format!(
                "SELECT id, key, receiver, kind, instance, body, attempts, delivered_ms, last_error, created_ms
                 FROM notify_outbox {filter}"
            ))
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(args, |r| {
                Ok(OutboxRow {
                    id: r.get(0)?,
                    key: r.get(1)?,
                    receiver: r.get(2)?,
                    kind: r.get(3)?,
                    instance: r.get(4)?,
                    body: r.get(5)?,
                    attempts: r.get(6)?,
                    delivered_ms: r.get(7)?,
                    last_error: r.get(8)?,
                    created_ms: r.get(9)?,
                })
            })
            .and_then(|rows| rows.collect())
            .map_err(|e| self.err(e))?;
        Ok(rows)
    }

    /// Undelivered notifications whose next attempt is due, oldest first.
    pub fn due_notifications(&self, now_ms: i64, limit: u32) -> Result<Vec<OutboxRow>, StateError> {
        self.outbox_rows(
            "WHERE delivered_ms IS NULL AND next_ms <= ?1 ORDER BY id LIMIT ?2",
            &[&now_ms, &limit],
        )
    }

    /// Every notification of the outbox, oldest first.
    pub fn notifications(&self) -> Result<Vec<OutboxRow>, StateError> {
        self.outbox_rows("ORDER BY id", &[])
    }

    /// The notifications not delivered yet, oldest first.
    pub fn undelivered(&self) -> Result<Vec<OutboxRow>, StateError> {
        self.outbox_rows("WHERE delivered_ms IS NULL ORDER BY id", &[])
    }

    /// Marks a notification delivered.
    pub fn notification_delivered(&self, id: i64, now_ms: i64) -> Result<(), StateError> {
        self.conn()
            .execute(
                "UPDATE notify_outbox SET delivered_ms = ?2, attempts = attempts + 1, last_error = '' WHERE id = ?1",
                params![id, now_ms],
            )
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    /// Records a failed attempt and when to try again.
    pub fn notification_failed(
        &self,
        id: i64,
        next_ms: i64,
        error: &str,
    ) -> Result<(), StateError> {
        self.conn()
            .execute(
                "UPDATE notify_outbox SET attempts = attempts + 1, next_ms = ?2, last_error = ?3 WHERE id = ?1",
                params![id, next_ms, error],
            )
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    /// How many notifications wait for delivery, and the oldest one's last error
    /// ("receiver key: error"; empty when none failed yet).
    pub fn undelivered_notifications(&self) -> Result<(u64, String), StateError> {
        let conn = self.conn();
        let count: i64 = conn
            .query_row(
                "SELECT count(*) FROM notify_outbox WHERE delivered_ms IS NULL",
                [],
                |r| r.get(0),
            )
            .map_err(|e| self.err(e))?;
        let error: Option<String> = conn
            .query_row(
                "SELECT receiver || ' ' || key || ': ' || last_error FROM notify_outbox
                 WHERE delivered_ms IS NULL AND last_error != '' ORDER BY id LIMIT 1",
                [],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| self.err(e))?;
        Ok((u64::try_from(count).unwrap_or(0), error.unwrap_or_default()))
    }

    /// When the stored fleet file was applied, Unix ms.
    pub fn fleet_applied_ms(&self) -> Result<Option<i64>, StateError> {
        self.conn()
            .query_row("SELECT applied_ms FROM fleet_file WHERE id = 1", [], |r| {
                r.get(0)
            })
            .optional()
            .map_err(|e| self.err(e))
    }

    /// What the operator chose when the stored fleet file was applied.
    pub fn applied_choices(&self) -> Result<AppliedChoices, StateError> {
        let row: Option<(String, String)> = self
            .conn()
            .query_row(
                "SELECT skipped, remigrate FROM applied_choices WHERE id = 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(|e| self.err(e))?;
        let list = |j: &str| serde_json::from_str(j).unwrap_or_default();
        Ok(row
            .map(|(s, r)| AppliedChoices {
                skipped: list(&s),
                remigrate: list(&r),
            })
            .unwrap_or_default())
    }

    /// Records an instance's outcome in the migration history, which no apply ever clears.
    pub fn record_outcome(&self, entry: &HistoryEntry) -> Result<(), StateError> {
        self.conn()
            .execute(
                "INSERT INTO history (at_ms, migration, instance, outcome, origin, target, service_ip)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    entry.at_ms,
                    entry.migration,
                    entry.instance,
                    entry.outcome,
                    entry.origin,
                    entry.target,
                    entry.service_ip
                ],
            )
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    /// Every instance's latest recorded outcome.
    pub fn last_outcomes(&self) -> Result<Vec<HistoryEntry>, StateError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(
                "SELECT at_ms, migration, instance, outcome, origin, target, service_ip
                 FROM history h WHERE id = (SELECT max(id) FROM history WHERE instance = h.instance)
                 ORDER BY instance",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], |r| {
                Ok(HistoryEntry {
                    at_ms: r.get(0)?,
                    migration: r.get(1)?,
                    instance: r.get(2)?,
                    outcome: r.get(3)?,
                    origin: r.get(4)?,
                    target: r.get(5)?,
                    service_ip: r.get(6)?,
                })
            })
            .and_then(|rows| rows.collect())
            .map_err(|e| self.err(e));
        rows
    }

    /// The fleet-wide scheduler state.
    pub fn fleet_state(&self) -> Result<FleetState, StateError> {
        let json: Option<String> = self
            .conn()
            .query_row("SELECT state FROM fleet_state WHERE id = 1", [], |r| {
                r.get(0)
            })
            .optional()
            .map_err(|e| self.err(e))?;
        Ok(json
            .and_then(|j| serde_json::from_str(&j).ok())
            .unwrap_or_default())
    }

    /// Stores the fleet-wide scheduler state.
    pub fn save_fleet_state(&self, fleet: &FleetState) -> Result<(), StateError> {
        self.conn()
            .execute(
                "INSERT OR REPLACE INTO fleet_state (id, state) VALUES (1, ?1)",
                params![json(fleet)],
            )
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    /// The bandwidth limit (KiB/s) each instance's last hot pass was granted, by name (the
    /// instances without one are left out).
    pub fn hot_pass_limits(&self) -> Result<std::collections::HashMap<String, u32>, StateError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare("SELECT name, hot_pass_kib FROM instances WHERE hot_pass_kib > 0")
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .and_then(|rows| rows.collect())
            .map_err(|e| self.err(e))?;
        Ok(rows)
    }

    /// Every stored instance state, by name.
    pub fn instances(&self) -> Result<Vec<(String, Instance)>, StateError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare("SELECT name, state FROM instances ORDER BY name")
            .map_err(|e| self.err(e))?;
        let rows: Vec<(String, String)> = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .and_then(|rows| rows.collect())
            .map_err(|e| self.err(e))?;
        Ok(rows
            .into_iter()
            .filter_map(|(name, json)| serde_json::from_str(&json).ok().map(|i| (name, i)))
            .collect())
    }

    /// Writes one transition durably: the instance's new state (and its hot pass's bandwidth
    /// limit), the event and the actions about to run, and the fleet state when it changed,
    /// in one transaction. Called before the actions run.
    pub fn save_transition(&self, t: &TransitionRecord<'_>) -> Result<(), StateError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(|e| self.err(e))?;
        tx.execute(
            "INSERT OR REPLACE INTO instances (name, state, updated_ms, hot_pass_kib) VALUES (?1, ?2, ?3, ?4)",
            params![t.name, json(t.instance), t.now_ms, t.hot_pass_kib],
        )
        .map_err(|e| self.err(e))?;
        tx.execute(
            "INSERT INTO transitions (at_ms, instance, event, phase, actions) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![t.now_ms, t.name, json(t.event), format!("{:?}", t.instance.phase), json(&t.actions)],
        )
        .map_err(|e| self.err(e))?;
        if let Some(fleet) = t.fleet {
            tx.execute(
                "INSERT OR REPLACE INTO fleet_state (id, state) VALUES (1, ?1)",
                params![json(fleet)],
            )
            .map_err(|e| self.err(e))?;
        }
        tx.commit().map_err(|e| self.err(e))
    }

    /// The newest `limit` transitions after `after_id` (of one instance, or all), oldest
    /// first.
    pub fn transitions(
        &self,
        instance: Option<&str>,
        after_id: i64,
        limit: u32,
    ) -> Result<Vec<TransitionRow>, StateError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(
                "SELECT id, at_ms, instance, event, phase, actions FROM
                 (SELECT * FROM transitions WHERE (?1 IS NULL OR instance = ?1) AND id > ?2
                  ORDER BY id DESC LIMIT ?3)
                 ORDER BY id",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(params![instance, after_id, limit], transition_row)
            .and_then(|rows| rows.collect())
            .map_err(|e| self.err(e))?;
        Ok(rows)
    }

    /// Appends one entry to the audit log.
    pub fn audit(&self, record: &AuditRecord, now_ms: i64) -> Result<(), StateError> {
        self.conn()
            .execute(
                "INSERT INTO audit (at_ms, who, role, method, arguments, outcome, detail)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    now_ms,
                    record.who,
                    record.role,
                    record.method,
                    record.arguments,
                    record.outcome,
                    record.detail
                ],
            )
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    /// Deletes the audit entries written before `before_ms`; returns how many.
    pub fn prune_audit(&self, before_ms: i64) -> Result<usize, StateError> {
        self.conn()
            .execute("DELETE FROM audit WHERE at_ms < ?1", params![before_ms])
            .map_err(|e| self.err(e))
    }

    /// The newest `limit` audit entries older than id `before_id` (0: the newest of all),
    /// oldest first.
    pub fn audit_log(&self, limit: u32, before_id: i64) -> Result<Vec<AuditEntry>, StateError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(
                "SELECT id, at_ms, who, role, method, arguments, outcome, detail FROM
                 (SELECT * FROM audit WHERE ?2 = 0 OR id < ?2 ORDER BY id DESC LIMIT ?1)
                 ORDER BY id",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(params![limit, before_id], |r| {
                Ok(AuditEntry {
                    id: r.get(0)?,
                    at_unix_ms: r.get(1)?,
                    who: r.get(2)?,
                    role: r.get(3)?,
                    method: r.get(4)?,
                    arguments: r.get(5)?,
                    outcome: r.get(6)?,
                    detail: r.get(7)?,
                })
            })
            .and_then(|rows| rows.collect())
            .map_err(|e| self.err(e))?;
        Ok(rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, address: &str) -> AgentEntry {
        AgentEntry {
            name: name.into(),
            address: address.into(),
            data_address: None,
        }
    }

    #[test]
    fn health_survives_reopening_and_down_keeps_last_seen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/state.db");
        let state = State::open(&path).unwrap();
        state
            .sync_agents(&[entry("a", "198.18.0.2:1"), entry("b", "198.18.0.3:1")])
            .unwrap();
        let facts = FactsReply {
            hostname: "host-a".into(),
            ..Default::default()
        };
        state
            .record_health("a", &HealthCheck::Up(Box::new(facts)), 1000)
            .unwrap();
        state
            .record_health("a", &HealthCheck::Down("refused".into()), 2000)
            .unwrap();
        drop(state);
        let state = State::open(&path).unwrap();
        let agents = state.agents().unwrap();
        assert_eq!(agents.len(), 2);
        let a = &agents[0];
        assert!(!a.up);
        assert_eq!((a.last_seen_unix_ms, a.last_check_unix_ms), (1000, 2000));
        assert_eq!(a.last_error, "refused");
        assert_eq!(a.facts.as_ref().unwrap().hostname, "host-a");
        assert_eq!(agents[1].last_seen_unix_ms, 0);
    }

    #[test]
    fn sync_agents_removes_unconfigured_and_updates_addresses() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::open(&dir.path().join("s.db")).unwrap();
        state
            .sync_agents(&[entry("a", "198.18.0.2:1"), entry("b", "198.18.0.3:1")])
            .unwrap();
        state.sync_agents(&[entry("a", "198.18.0.9:1")]).unwrap();
        let agents = state.agents().unwrap();
        assert_eq!(agents.len(), 1);
        assert_eq!(agents[0].address, "198.18.0.9:1");
    }

    #[test]
    fn audit_log_returns_newest_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::open(&dir.path().join("s.db")).unwrap();
        for i in 0..5 {
            let rec = AuditRecord {
                who: "alice".into(),
                role: "operator".into(),
                method: format!("m{i}"),
                arguments: "{}".into(),
                outcome: "ok".into(),
                detail: String::new(),
            };
            state.audit(&rec, i).unwrap();
        }
        let log = state.audit_log(2, 0).unwrap();
        let methods: Vec<_> = log.iter().map(|e| e.method.as_str()).collect();
        assert_eq!(methods, ["m3", "m4"]);
        // The page before it.
        let older = state.audit_log(2, log[0].id).unwrap();
        let methods: Vec<_> = older.iter().map(|e| e.method.as_str()).collect();
        assert_eq!(methods, ["m1", "m2"]);
        // Retention: entries written before t=3 go.
        assert_eq!(state.prune_audit(3).unwrap(), 3);
        assert_eq!(state.audit_log(10, 0).unwrap().len(), 2);
    }
}
