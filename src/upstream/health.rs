//! Health of one backend: passive (consecutive transport failures eject it for a backoff that
//! doubles with each ejection in a row) and active (the results of `health_check` probes,
//! with thresholds; a backend is used only when both allow it). Times are milliseconds on a
//! clock the caller passes.

use crate::config::HealthPolicy;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

/// Health and load of one backend, kept across Snapshot rebuilds (see `Registry`).
#[derive(Debug, Default)]
pub struct BackendState {
    pub inflight: AtomicU64,
    fails: AtomicU32,
    /// Ejections in a row (reset by a success); drives the backoff.
    streak: AtomicU32,
    ejected_until_ms: AtomicU64,
    pub ejections_total: AtomicU64,
    /// Taken out by its active health check.
    check_down: AtomicBool,
    /// Probes in a row with the same outcome (passing when up, failing when down count
    /// toward a change).
    check_streak: AtomicU32,
    /// When the next probe is due (0: not scheduled yet).
    pub next_probe_ms: AtomicU64,
    /// The last probe: when (Unix ms) and what it found.
    pub last_probe: Mutex<Option<(u64, String)>>,
}

impl BackendState {
    pub fn is_available(&self, now_ms: u64) -> bool {
        self.ejected_until_ms.load(Relaxed) <= now_ms && !self.check_down.load(Relaxed)
    }

    /// Whether the active health check lets the backend serve.
    pub fn check_up(&self) -> bool {
        !self.check_down.load(Relaxed)
    }

    /// Count one probe; `Some(up)` when it changed whether the check lets the backend serve:
    /// `unhealthy` failing probes in a row take it out, `healthy` passing ones put it back.
    pub fn record_probe(&self, passed: bool, healthy: u32, unhealthy: u32) -> Option<bool> {
        let down = self.check_down.load(Relaxed);
        // a probe that agrees with the current state resets the count toward a change
        if passed != down {
            self.check_streak.store(0, Relaxed);
            return None;
        }
        let n = self.check_streak.fetch_add(1, Relaxed) + 1;
        let needed = if down { healthy } else { unhealthy };
        if n < needed {
            return None;
        }
        self.check_streak.store(0, Relaxed);
        self.check_down.store(!down, Relaxed);
        Some(down)
    }

    pub fn ejected_until_ms(&self) -> u64 {
        self.ejected_until_ms.load(Relaxed)
    }

    pub fn consecutive_failures(&self) -> u32 {
        self.fails.load(Relaxed)
    }

    pub fn record_success(&self) {
        self.fails.store(0, Relaxed);
        self.streak.store(0, Relaxed);
    }

    /// Count a failure; returns the ejection length when this failure ejected the backend.
    pub fn record_failure(&self, now_ms: u64, policy: &HealthPolicy) -> Option<u64> {
        let fails = self.fails.fetch_add(1, Relaxed) + 1;
        if fails < policy.max_fails {
            return None;
        }
        self.fails.store(0, Relaxed);
        let streak = self.streak.fetch_add(1, Relaxed).min(20);
        let base = policy.eject_time.as_millis() as u64;
        let max = policy.eject_max_time.as_millis() as u64;
        let len = base.saturating_mul(1u64 << streak).min(max);
        self.ejected_until_ms.store(now_ms + len, Relaxed);
        self.ejections_total.fetch_add(1, Relaxed);
        Some(len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn active_checks_need_their_thresholds_in_a_row() {
        let s = BackendState::default();
        assert!(s.check_up() && s.is_available(0));
        // unhealthy = 3: two failures and a pass change nothing
        assert_eq!(s.record_probe(false, 2, 3), None);
        assert_eq!(s.record_probe(false, 2, 3), None);
        assert_eq!(s.record_probe(true, 2, 3), None);
        assert_eq!(s.record_probe(false, 2, 3), None);
        assert_eq!(s.record_probe(false, 2, 3), None);
        assert_eq!(s.record_probe(false, 2, 3), Some(false));
        assert!(!s.check_up() && !s.is_available(0));
        // healthy = 2
        assert_eq!(s.record_probe(true, 2, 3), None);
        assert_eq!(s.record_probe(false, 2, 3), None);
        assert_eq!(s.record_probe(true, 2, 3), None);
        assert_eq!(s.record_probe(true, 2, 3), Some(true));
        assert!(s.check_up() && s.is_available(0));
    }

    fn policy() -> HealthPolicy {
        HealthPolicy {
            max_fails: 3,
            eject_time: Duration::from_millis(100),
            eject_max_time: Duration::from_millis(350),
        }
    }

    #[test]
    fn ejects_after_max_fails_in_a_row_with_doubling_backoff() {
        let s = BackendState::default();
        let p = policy();
        assert_eq!(s.record_failure(0, &p), None);
        assert_eq!(s.record_failure(0, &p), None);
        assert_eq!(s.record_failure(10, &p), Some(100));
        assert!(!s.is_available(109));
        assert!(s.is_available(110));
        // back in rotation, fails again: twice as long
        for _ in 0..2 {
            assert_eq!(s.record_failure(120, &p), None);
        }
        assert_eq!(s.record_failure(120, &p), Some(200));
        for _ in 0..2 {
            s.record_failure(400, &p);
        }
        assert_eq!(
            s.record_failure(400, &p),
            Some(350),
            "capped at eject_max_time"
        );
        assert_eq!(s.ejections_total.load(Relaxed), 3);
    }

    #[test]
    fn a_success_resets_the_count_and_the_backoff() {
        let s = BackendState::default();
        let p = policy();
        s.record_failure(0, &p);
        s.record_failure(0, &p);
        s.record_success();
        assert_eq!(s.record_failure(0, &p), None);
        assert_eq!(s.record_failure(0, &p), None);
        assert_eq!(s.record_failure(0, &p), Some(100));
        s.record_success();
        for _ in 0..2 {
            s.record_failure(200, &p);
        }
        assert_eq!(s.record_failure(200, &p), Some(100));
    }
}
