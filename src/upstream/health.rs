//! Passive health of one backend: consecutive transport failures eject it for a backoff that
//! doubles with each ejection in a row. Times are milliseconds on a clock the caller passes.

use crate::config::HealthPolicy;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};

/// Health and load of one backend, kept across Snapshot rebuilds (see `Registry`).
#[derive(Debug, Default)]
pub struct BackendState {
    pub inflight: AtomicU64,
    fails: AtomicU32,
    /// Ejections in a row (reset by a success); drives the backoff.
    streak: AtomicU32,
    ejected_until_ms: AtomicU64,
    pub ejections_total: AtomicU64,
}

impl BackendState {
    pub fn is_available(&self, now_ms: u64) -> bool {
        self.ejected_until_ms.load(Relaxed) <= now_ms
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
