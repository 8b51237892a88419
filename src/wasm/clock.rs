//! The epoch clock behind the plugins' CPU deadlines: it ticks every `EPOCH_TICK` while
//! guest code runs (`Running`) and parks while none does.

use super::*;

/// How often the epoch advances: the resolution of CPU deadlines.
pub(super) const EPOCH_TICK: Duration = Duration::from_millis(2);

/// One host's epoch clock.
#[derive(Default)]
pub(super) struct Clock {
    /// Guest calls running now, on any thread: the epoch clock only ticks while there are
    /// any, so an idle tollgate with plugins loaded does not wake 500 times a second.
    pub in_guest: AtomicUsize,
    /// The epoch clock is parked (or about to park) and must be woken by the next call.
    pub parked: AtomicBool,
    pub thread: OnceLock<std::thread::Thread>,
}

/// Held while guest code runs (every call into a store of the host's engine): keeps the
/// epoch clock, and with it the CPU deadline, ticking.
pub(crate) struct Running(&'static Clock);

impl Running {
    pub(crate) fn enter(host: &'static Host) -> Running {
        let c = &host.clock;
        c.in_guest.fetch_add(1, SeqCst);
        if c.parked.load(SeqCst) {
            if let Some(t) = c.thread.get() {
                t.unpark();
            }
        }
        Running(c)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.0.in_guest.fetch_sub(1, SeqCst);
    }
}

pub fn deadline_ticks(d: Duration) -> u64 {
    (d.as_millis() as u64)
        .div_ceil(EPOCH_TICK.as_millis() as u64)
        .max(1)
        + 1
}
