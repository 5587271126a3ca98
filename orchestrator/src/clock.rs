//! Time, injected: the orchestrator never reads the system clock directly, so schedules,
//! windows and deadlines are tested with simulated time instead of sleeps.

use std::future::Future;
use std::pin::Pin;

/// A sleep that completes after the clock moved on.
pub type Sleep = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A source of wall-clock time in Unix milliseconds, and of sleeps on that time.
pub trait Clock: Send + Sync + 'static {
    /// Now, in milliseconds since the Unix epoch.
    fn now_ms(&self) -> i64;
    /// Completes `ms` milliseconds from now.
    fn sleep(&self, ms: u64) -> Sleep;
}

/// The system's real-time clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
            .unwrap_or(0)
    }

    fn sleep(&self, ms: u64) -> Sleep {
        Box::pin(tokio::time::sleep(std::time::Duration::from_millis(ms)))
    }
}

/// Wall time that follows tokio's clock from a chosen start. Under a paused tokio runtime
/// (`start_paused`) time jumps ahead whenever every task waits, so a simulated night of
/// migrations runs in seconds.
#[derive(Debug, Clone, Copy)]
pub struct SimulatedClock {
    start_ms: i64,
    origin: tokio::time::Instant,
}

impl SimulatedClock {
    /// A clock showing `start_ms` now.
    pub fn starting_at(start_ms: i64) -> Self {
        SimulatedClock {
            start_ms,
            origin: tokio::time::Instant::now(),
        }
    }
}

impl Clock for SimulatedClock {
    fn now_ms(&self) -> i64 {
        self.start_ms + self.origin.elapsed().as_millis() as i64
    }

    fn sleep(&self, ms: u64) -> Sleep {
        Box::pin(tokio::time::sleep(std::time::Duration::from_millis(ms)))
    }
}
