//! The clocks every module reads: a process-wide monotonic millisecond clock (health and
//! balancing decisions, wasm's monotonic clocks) and Unix time (what is shown and saved).

use std::sync::OnceLock;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Milliseconds on a process-wide monotonic clock (the clock health decisions use).
pub fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// Seconds since the Unix epoch (0 if the system clock is before it).
pub fn unix_secs() -> u64 {
    unix().as_secs()
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms() -> u64 {
    unix().as_millis() as u64
}

/// Nanoseconds since the Unix epoch.
pub fn unix_nanos() -> u64 {
    unix().as_nanos() as u64
}

fn unix() -> std::time::Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    #[test]
    fn clocks_agree_and_move_forward() {
        let a = super::now_ms();
        let (s, ms, ns) = (super::unix_secs(), super::unix_ms(), super::unix_nanos());
        assert!(s > 1_600_000_000, "after 2020");
        assert!(ms / 1000 >= s && ms / 1000 <= s + 1);
        assert!(ns / 1_000_000 >= ms && ns / 1_000_000 <= ms + 1000);
        std::thread::sleep(std::time::Duration::from_millis(5));
        assert!(super::now_ms() >= a + 5);
    }
}
