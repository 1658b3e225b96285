//! Wall-clock time for state that is shown to people or compared across
//! restarts (last use of a model or engine), in milliseconds since the Unix
//! epoch. Durations inside the process use `Instant`.

use std::time::{SystemTime, UNIX_EPOCH};

/// Now, in ms since the Unix epoch (0 if the clock is before 1970).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
