//! Bounded accounting of refused (or unprocessed) calls: per caller and minute, the first
//! few are itemized (audited, logged), the rest only counted, and the count is said with
//! the caller's next itemized entry. A flood costs the state DB and the log a bounded
//! number of lines per caller and minute, whatever its rate.

use std::collections::HashMap;
use std::sync::Mutex;

/// Per caller: (minute, itemized this minute, counted only this minute).
pub struct Ledger {
    per_minute: u32,
    entries: Mutex<HashMap<String, (i64, u32, u32)>>,
}

/// The most callers remembered before the ones of past minutes are forgotten.
const MAX_CALLERS: usize = 10_000;

impl Ledger {
    /// A ledger itemizing `per_minute` calls per caller and minute.
    pub fn new(per_minute: u32) -> Self {
        Ledger {
            per_minute,
            entries: Mutex::default(),
        }
    }

    /// Accounts one call of `caller` at `now_ms`: `None` when it is only counted (the
    /// caller's itemized calls of this minute are used up), else `Some(n)`: itemize it,
    /// `n` calls of the caller's previous minute were only counted (0: none).
    pub fn itemize(&self, caller: &str, now_ms: i64) -> Option<u32> {
        match self.account(caller, now_ms) {
            Account::Itemize(counted_before) => Some(counted_before),
            Account::FirstCounted | Account::Counted => None,
        }
    }

    /// As [`Ledger::itemize`], telling the first counted call of a minute apart (the one
    /// to say, once, that the caller's calls are only counted from now on).
    pub fn account(&self, caller: &str, now_ms: i64) -> Account {
        let minute = now_ms.div_euclid(60_000);
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if entries.len() > MAX_CALLERS {
            entries.retain(|_, (m, _, _)| *m == minute);
        }
        let entry = entries.entry(caller.to_string()).or_insert((minute, 0, 0));
        let mut counted_before = 0;
        if entry.0 != minute {
            counted_before = entry.2;
            *entry = (minute, 0, 0);
        }
        if entry.1 >= self.per_minute {
            entry.2 += 1;
            return if entry.2 == 1 {
                Account::FirstCounted
            } else {
                Account::Counted
            };
        }
        entry.1 += 1;
        Account::Itemize(counted_before)
    }
}

/// How one call is accounted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Account {
    /// Itemize it; this many calls of the caller's previous minute were only counted.
    Itemize(u32),
    /// Only counted: the first such call of this caller this minute.
    FirstCounted,
    /// Only counted.
    Counted,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_caller_gets_its_itemized_calls_per_minute_then_a_count() {
        let ledger = Ledger::new(3);
        let at = 5 * 60_000;
        assert_eq!(
            (0..5)
                .map(|i| ledger.itemize("a", at + i))
                .collect::<Vec<_>>(),
            [Some(0), Some(0), Some(0), None, None]
        );
        assert_eq!(ledger.account("a", at + 9), Account::Counted);
        let fresh = Ledger::new(1);
        assert_eq!(fresh.account("c", at), Account::Itemize(0));
        assert_eq!(fresh.account("c", at), Account::FirstCounted);
        assert_eq!(fresh.account("c", at), Account::Counted);
        // Another caller is not affected.
        assert_eq!(ledger.itemize("b", at), Some(0));
        // The next minute: itemized again, with the previous minute's count.
        assert_eq!(ledger.itemize("a", at + 60_000), Some(3));
        assert_eq!(ledger.itemize("a", at + 60_001), Some(0));
    }
}
