//! The operation journal: every mutating call carries an operation id, and the agent answers a
//! repeated id with the stored reply instead of running the operation again — also across
//! agent restarts (the journal is an SQLite file in the state dir).

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use rusqlite::{params, Connection, OptionalExtension};
use sha2::{Digest, Sha256};

/// What the journal knows about an operation id before it runs.
#[derive(Debug, PartialEq, Eq)]
pub enum Begin {
    /// Never seen: it is now recorded as running and must be run.
    Fresh,
    /// Finished earlier: here is the stored reply (protobuf bytes).
    Done(Vec<u8>),
    /// Started by an earlier agent process that stopped before it finished.
    Interrupted {
        /// When it started (Unix ms).
        started_at_ms: i64,
    },
    /// The id was used for a different request.
    Conflict {
        /// The kind of operation recorded under that id.
        kind: String,
    },
}

/// A journal failure.
#[derive(Debug, thiserror::Error)]
#[error("operation journal {path}: {source}")]
pub struct JournalError {
    path: String,
    source: rusqlite::Error,
}

/// A journal row.
struct Recorded {
    kind: String,
    digest: String,
    state: String,
    reply: Option<Vec<u8>>,
    started_at_ms: i64,
}

/// The operation journal of one agent.
pub struct Journal {
    conn: Mutex<Connection>,
    path: String,
    /// One lock per operation id, so that concurrent duplicates wait for the first.
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl Journal {
    /// Opens (or creates) the journal at `path`.
    pub fn open(path: &Path) -> Result<Self, JournalError> {
        let err = |source| JournalError {
            path: path.display().to_string(),
            source,
        };
        let conn = Connection::open(path).map_err(err)?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = FULL;
             CREATE TABLE IF NOT EXISTS operations (
                 id TEXT PRIMARY KEY,
                 kind TEXT NOT NULL,
                 request_digest TEXT NOT NULL,
                 state TEXT NOT NULL CHECK (state IN ('running', 'done')),
                 reply BLOB,
                 started_at_ms INTEGER NOT NULL,
                 finished_at_ms INTEGER
             );",
        )
        .map_err(err)?;
        Ok(Journal {
            conn: Mutex::new(conn),
            path: path.display().to_string(),
            locks: Mutex::new(HashMap::new()),
        })
    }

    fn err(&self, source: rusqlite::Error) -> JournalError {
        JournalError {
            path: self.path.clone(),
            source,
        }
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The lock serialising calls that carry `id`.
    pub fn lock_for(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.entry(id.to_string()).or_default().clone()
    }

    /// Looks `id` up; when fresh, records it as running (durably) before returning.
    pub fn begin(
        &self,
        id: &str,
        kind: &str,
        request_digest: &str,
        now_ms: i64,
    ) -> Result<Begin, JournalError> {
        let conn = self.conn();
        let row = conn
            .query_row(
                "SELECT kind, request_digest, state, reply, started_at_ms
                 FROM operations WHERE id = ?1",
                params![id],
                |r| {
                    Ok(Recorded {
                        kind: r.get(0)?,
                        digest: r.get(1)?,
                        state: r.get(2)?,
                        reply: r.get(3)?,
                        started_at_ms: r.get(4)?,
                    })
                },
            )
            .optional()
            .map_err(|e| self.err(e))?;
        match row {
            None => {
                conn.execute(
                    "INSERT INTO operations (id, kind, request_digest, state, started_at_ms)
                     VALUES (?1, ?2, ?3, 'running', ?4)",
                    params![id, kind, request_digest, now_ms],
                )
                .map_err(|e| self.err(e))?;
                Ok(Begin::Fresh)
            }
            Some(r) if r.kind != kind || r.digest != request_digest => {
                Ok(Begin::Conflict { kind: r.kind })
            }
            Some(Recorded {
                state,
                reply: Some(reply),
                ..
            }) if state == "done" => Ok(Begin::Done(reply)),
            Some(r) => Ok(Begin::Interrupted {
                started_at_ms: r.started_at_ms,
            }),
        }
    }

    /// Forgets an operation that left nothing to remember: its id may run again.
    pub fn forget(&self, id: &str) -> Result<(), JournalError> {
        self.conn()
            .execute("DELETE FROM operations WHERE id = ?1", params![id])
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    /// Stores the reply of a finished operation.
    pub fn finish(&self, id: &str, reply: &[u8], now_ms: i64) -> Result<(), JournalError> {
        self.conn()
            .execute(
                "UPDATE operations SET state = 'done', reply = ?2, finished_at_ms = ?3
                 WHERE id = ?1",
                params![id, reply, now_ms],
            )
            .map_err(|e| self.err(e))?;
        Ok(())
    }
}

/// Runs `operation` once per operation id: a repeated id gets the stored reply and `true`.
/// An id whose first run was cut short by an agent restart, or that was used for another
/// request, is refused with a status saying what to do.
pub async fn once<R, F>(
    journal: &Journal,
    id: &str,
    kind: &str,
    encoded_request: &[u8],
    now_ms: impl Fn() -> i64,
    operation: F,
) -> Result<(R, bool), tonic::Status>
where
    R: prost::Message + Default,
    F: std::future::Future<Output = R>,
{
    once_unless(
        journal,
        id,
        kind,
        encoded_request,
        now_ms,
        operation,
        |_| false,
    )
    .await
}

/// [`once`], except that a reply for which `undone` holds is not kept: the operation left
/// nothing to remember (a pull cancelled because its caller went away), so the identical
/// request, sent again under the same id (an orchestrator re-attaching after a restart), runs
/// it again instead of replaying a cancellation.
pub async fn once_unless<R, F>(
    journal: &Journal,
    id: &str,
    kind: &str,
    encoded_request: &[u8],
    now_ms: impl Fn() -> i64,
    operation: F,
    undone: impl Fn(&R) -> bool,
) -> Result<(R, bool), tonic::Status>
where
    R: prost::Message + Default,
    F: std::future::Future<Output = R>,
{
    use tonic::Status;
    if id.is_empty() {
        return Err(Status::invalid_argument(format!(
            "{kind} is a mutating call: it needs an operation_id"
        )));
    }
    let lock = journal.lock_for(id);
    let _guard = lock.lock().await;
    let digest = request_digest(kind, encoded_request);
    let internal = |e: JournalError| Status::internal(e.to_string());
    match journal
        .begin(id, kind, &digest, now_ms())
        .map_err(internal)?
    {
        Begin::Fresh => {
            let reply = operation.await;
            if undone(&reply) {
                journal.forget(id).map_err(internal)?;
            } else {
                journal
                    .finish(id, &reply.encode_to_vec(), now_ms())
                    .map_err(internal)?;
            }
            Ok((reply, false))
        }
        Begin::Done(bytes) => {
            tracing::info!(
                operation_id = id,
                kind,
                "repeated operation id: replaying stored reply"
            );
            let reply = R::decode(bytes.as_slice())
                .map_err(|e| Status::internal(format!("stored reply of {id}: {e}")))?;
            Ok((reply, true))
        }
        Begin::Interrupted { started_at_ms } => Err(Status::aborted(format!(
            "operation {id} ({kind}) started at {started_at_ms} (Unix ms) in an earlier agent \
             process that stopped before it finished: its outcome is unknown; check the host \
             (e.g. a services STATUS call) and retry under a new operation id"
        ))),
        Begin::Conflict { kind: recorded } => Err(Status::already_exists(format!(
            "operation id {id} was already used for a different {recorded} request; \
             use a new id for a new operation"
        ))),
    }
}

/// A digest identifying a request's kind and content, to detect a reused id.
pub fn request_digest(kind: &str, encoded_request: &[u8]) -> String {
    let mut hasher = Sha256::new();
    hasher.update(kind.as_bytes());
    hasher.update([0]);
    hasher.update(encoded_request);
    hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_finished_operation_is_replayed_after_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal.db");
        let journal = Journal::open(&path).unwrap();
        assert_eq!(
            journal.begin("op-1", "stop", "d1", 1).unwrap(),
            Begin::Fresh
        );
        journal.finish("op-1", b"reply", 2).unwrap();
        drop(journal);
        let journal = Journal::open(&path).unwrap();
        assert_eq!(
            journal.begin("op-1", "stop", "d1", 3).unwrap(),
            Begin::Done(b"reply".to_vec())
        );
    }

    #[test]
    fn unfinished_and_conflicting_ids_are_told_apart() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(&dir.path().join("j.db")).unwrap();
        assert_eq!(
            journal.begin("op-1", "stop", "d1", 7).unwrap(),
            Begin::Fresh
        );
        assert_eq!(
            journal.begin("op-1", "stop", "d1", 8).unwrap(),
            Begin::Interrupted { started_at_ms: 7 }
        );
        assert_eq!(
            journal.begin("op-1", "start", "d2", 9).unwrap(),
            Begin::Conflict {
                kind: "stop".into()
            }
        );
    }

    #[tokio::test]
    async fn an_undone_operation_runs_again_under_the_same_id() {
        use bmfleet_proto::v1::PullEvent;
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(&dir.path().join("j.db")).unwrap();
        let cancelled = || async {
            PullEvent {
                error: "cancelled".into(),
                ..Default::default()
            }
        };
        let undone = |e: &PullEvent| e.error == "cancelled";
        let (first, replayed) =
            once_unless(&journal, "op-1", "pull", b"r", || 1, cancelled(), undone)
                .await
                .unwrap();
        assert!(!replayed && first.error == "cancelled");
        let done = || async {
            PullEvent {
                ok: true,
                ..Default::default()
            }
        };
        let (second, replayed) = once_unless(&journal, "op-1", "pull", b"r", || 2, done(), undone)
            .await
            .unwrap();
        assert!(!replayed && second.ok, "it ran again");
        let (third, replayed) =
            once_unless(&journal, "op-1", "pull", b"r", || 3, cancelled(), undone)
                .await
                .unwrap();
        assert!(replayed && third.ok, "a finished one is replayed");
    }
}
