//! Whether this host has served its BlueMind instance since bmfleet started its services. A
//! host that has served holds the newest copy of its customer's mail: nothing is synced into
//! it again (pulls, config copies and database moves are refused) until an operator's explicit
//! re-migration clears the marker. The agent keeps the marker itself, so no orchestrator,
//! however fresh its memory, can overwrite a serving host by accident.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

const FILE: &str = "served.json";

/// When the marker was set, and by which operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Marker {
    /// Unix ms.
    pub since_ms: i64,
    /// The operation that started the services.
    pub operation_id: String,
}

fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(FILE)
}

/// The marker, if set.
pub fn get(state_dir: &Path) -> Option<Marker> {
    let text = std::fs::read_to_string(path(state_dir)).ok()?;
    // An unreadable marker still counts as set.
    Some(serde_json::from_str(&text).unwrap_or(Marker {
        since_ms: 0,
        operation_id: String::from("unknown"),
    }))
}

/// Sets the marker (kept when already set), durably, before services start.
pub fn set(state_dir: &Path, operation_id: &str, now_ms: i64) -> std::io::Result<()> {
    if get(state_dir).is_some() {
        return Ok(());
    }
    let marker = Marker {
        since_ms: now_ms,
        operation_id: operation_id.to_string(),
    };
    let text = serde_json::to_string(&marker).map_err(std::io::Error::other)?;
    let temporary = state_dir.join(format!(".{FILE}.new"));
    std::fs::write(&temporary, text)?;
    std::fs::File::open(&temporary)?.sync_all()?;
    std::fs::rename(&temporary, path(state_dir))
}

/// Clears the marker; returns what it was.
pub fn clear(state_dir: &Path) -> std::io::Result<Option<Marker>> {
    let was = get(state_dir);
    match std::fs::remove_file(path(state_dir)) {
        Ok(()) => Ok(was),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Refuses a sync into this host when it has served: the reason, for the caller.
pub fn refuse_sync(state_dir: &Path, what: &str) -> Result<(), String> {
    match get(state_dir) {
        None => Ok(()),
        Some(m) => Err(format!(
            "refused: this host has served its BlueMind instance since {} (services started by \
             operation {}): {what} into it would overwrite the newest copy of its mail. To \
             migrate onto it again, apply with --remigrate (the orchestrator clears this \
             marker after proving the direction)",
            m.since_ms, m.operation_id
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_once_refuses_then_clears() {
        let dir = tempfile::tempdir().unwrap();
        assert!(refuse_sync(dir.path(), "a pull").is_ok());
        set(dir.path(), "m/mail-01/start-target/1", 5).unwrap();
        set(dir.path(), "m/mail-01/start-target/2", 9).unwrap();
        let refused = refuse_sync(dir.path(), "a pull").unwrap_err();
        assert!(refused.contains("since 5"), "{refused}");
        assert!(refused.contains("start-target/1"), "{refused}");
        assert_eq!(clear(dir.path()).unwrap().map(|m| m.since_ms), Some(5));
        assert!(refuse_sync(dir.path(), "a pull").is_ok());
        assert_eq!(clear(dir.path()).unwrap(), None);
    }
}
