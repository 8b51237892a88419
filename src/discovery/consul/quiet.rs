//! The quiescence window's clock (a timerfd).

use super::*;

/// The quiescence window's clock: a timerfd, good to tens of microseconds. tokio's timers
/// fire on whole milliseconds, rounded up, so the default 2 ms window was 3.2 ms on average
/// (measured in benches/consul_convergence.py), a third of tollgate's convergence time.
/// Without a timerfd (it cannot be created), tokio's clock.
pub(super) struct Quiet(pub(super) Option<tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>>);

impl Quiet {
    pub(super) fn new() -> Quiet {
        use std::os::fd::FromRawFd;
        // SAFETY: timerfd_create has no preconditions; a non-negative result is a new fd
        // that nothing else owns.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            tracing::debug!(error = %std::io::Error::last_os_error(), "no timerfd: the quiescence window uses tokio's clock");
            return Quiet(None);
        }
        // SAFETY: see above
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        // SAFETY: an OwnedFd's descriptor stays open, and the same, until it is dropped,
        // which is when the AsyncFd is
        let fd = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
        };
        Quiet(fd.ok())
    }

    pub(super) async fn wait(&self, d: Duration) {
        use std::os::fd::AsRawFd;
        let Some(fd) = &self.0 else {
            return tokio::time::sleep(d).await;
        };
        if d.is_zero() {
            return; // a zero it_value would disarm the timer, not fire it
        }
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: d.as_secs() as libc::time_t,
                tv_nsec: d.subsec_nanos() as libc::c_long,
            },
        };
        // SAFETY: a valid timerfd and itimerspec; the old value is not asked for. Arming
        // anew also clears an expiry left unread by a wait that was cancelled.
        if unsafe { libc::timerfd_settime(fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) } != 0 {
            return tokio::time::sleep(d).await;
        }
        loop {
            let Ok(mut ready) = fd.readable().await else {
                return tokio::time::sleep(d).await;
            };
            let mut expiries = [0u8; 8];
            // SAFETY: reads 8 bytes into an 8-byte buffer
            let read = ready.try_io(|fd| {
                let n = unsafe { libc::read(fd.as_raw_fd(), expiries.as_mut_ptr().cast(), 8) };
                if n < 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(())
                }
            });
            match read {
                Ok(Ok(())) => return,
                Ok(Err(_)) => return tokio::time::sleep(d).await,
                Err(_would_block) => continue, // a stale readiness: wait again
            }
        }
    }
}
