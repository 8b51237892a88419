// Copyright 2026 Cloudflare, Inc.
//
// Licensed under the Apache License, Version 2.0 (the "License");
// you may not use this file except in compliance with the License.
// You may obtain a copy of the License at
//
// http://www.apache.org/licenses/LICENSE-2.0
//
// Unless required by applicable law or agreed to in writing, software
// distributed under the License is distributed on an "AS IS" BASIS,
// WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
// See the License for the specific language governing permissions and
// limitations under the License.

//! tollgate patch: the keep-alive pool of upstream streams, without a task per connection.
//!
//! pingora's `ConnectionPool` spawns an `idle_poll` task for every stream put back (an
//! `Arc<Mutex>`, a oneshot, a `Notify` and an LRU update with it), which cost a proxied
//! keep-alive request ~4.5k instructions. Here a stream put back is a plain entry in a map;
//! whether it is still usable is decided when it is taken (its idle deadline, and a
//! non-blocking read: EOF, an error or unexpected bytes mean the backend closed or broke it,
//! and the next entry is tried), so a request is never sent on a connection the backend has
//! already closed. One sweeper task per pool (not per connection) closes, once a second, the
//! entries that timed out or that the backend closed while nobody asked for them, so idle
//! sockets do not linger in CLOSE_WAIT when traffic stops.

use super::{test_reusable_stream, PoolCallback};
use crate::protocols::Stream;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

/// How often the sweeper looks at the streams nobody took.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

struct Idle {
    stream: Stream,
    since: Instant,
    deadline: Option<Instant>,
}

impl Idle {
    fn expired(&self, now: Instant) -> bool {
        self.deadline.is_some_and(|d| d <= now)
    }
}

#[derive(Default)]
struct Entries {
    /// Per reuse key, oldest first: taken from the back (the most recently used, whose
    /// backend is least likely to have timed it out), evicted and swept from the front.
    by_key: HashMap<u64, Vec<Idle>>,
    count: usize,
}

impl Entries {
    fn push(&mut self, key: u64, idle: Idle) {
        self.by_key.entry(key).or_default().push(idle);
        self.count += 1;
    }

    fn pop(&mut self, key: u64) -> Option<Idle> {
        let list = self.by_key.get_mut(&key)?;
        let idle = list.pop();
        if list.is_empty() {
            self.by_key.remove(&key);
        }
        if idle.is_some() {
            self.count -= 1;
        }
        idle
    }

    /// The least recently put back entry of all keys.
    fn pop_oldest(&mut self) -> Option<Idle> {
        let key = *self
            .by_key
            .iter()
            .filter_map(|(k, list)| list.first().map(|i| (k, i.since)))
            .min_by_key(|(_, since)| *since)?
            .0;
        let list = self.by_key.get_mut(&key)?;
        let idle = list.remove(0);
        if list.is_empty() {
            self.by_key.remove(&key);
        }
        self.count -= 1;
        Some(idle)
    }

    /// Every entry idle since before `before`, removed (the sweeper tests them unlocked).
    fn take_older(&mut self, before: Instant) -> Vec<(u64, Idle)> {
        let mut out = Vec::new();
        self.by_key.retain(|key, list| {
            let n = list.iter().take_while(|i| i.since < before).count();
            out.extend(list.drain(..n).map(|i| (*key, i)));
            !list.is_empty()
        });
        self.count -= out.len();
        out
    }

    /// Entries the sweeper found alive, put back in front of their key's newer ones.
    fn restore(&mut self, alive: Vec<(u64, Idle)>) {
        for (key, idle) in alive.into_iter().rev() {
            self.by_key.entry(key).or_default().insert(0, idle);
            self.count += 1;
        }
    }
}

pub(crate) struct IdlePool {
    entries: Mutex<Entries>,
    size: usize,
    sweeping: AtomicBool,
    /// Told how long a stream sat idle when it leaves the pool without being reused.
    callback: Option<PoolCallback>,
    /// Streams found holding bytes nobody asked for.
    unexpected_data: Arc<AtomicU64>,
}

/// Clears the pool's `sweeping` flag when its sweeper task ends or is dropped with its
/// runtime, so the next `put` starts another.
struct SweepGuard(Weak<IdlePool>);

impl Drop for SweepGuard {
    fn drop(&mut self) {
        if let Some(pool) = self.0.upgrade() {
            pool.sweeping.store(false, Ordering::Release);
        }
    }
}

impl IdlePool {
    pub(crate) fn new(
        size: usize,
        callback: Option<PoolCallback>,
        unexpected_data: Arc<AtomicU64>,
    ) -> Self {
        IdlePool {
            entries: Mutex::new(Entries::default()),
            size,
            sweeping: AtomicBool::new(false),
            callback,
            unexpected_data,
        }
    }

    fn gone(&self, idle: &Idle, now: Instant) {
        if let Some(callback) = &self.callback {
            callback(now.saturating_duration_since(idle.since));
        }
    }

    /// Still open, and nothing unread (the backend never speaks first on an idle stream).
    fn alive(&self, stream: &mut Stream) -> bool {
        test_reusable_stream(stream, &self.unexpected_data)
    }

    /// A live stream for `key` that `matches` accepts, the most recently put back first.
    /// Entries past their idle deadline, closed or broken by the backend, or refused by
    /// `matches` are closed and the next one tried.
    pub(crate) fn take(
        &self,
        key: u64,
        mut matches: impl FnMut(&Stream) -> bool,
    ) -> Option<Stream> {
        loop {
            let mut idle = self.entries.lock().pop(key)?;
            let now = Instant::now();
            if !idle.expired(now) && matches(&idle.stream) && self.alive(&mut idle.stream) {
                return Some(idle.stream);
            }
            self.gone(&idle, now);
            // dropped here, outside the lock: the close is a syscall
        }
    }

    /// Put a stream back for `key`. Beyond the pool's size the least recently put back
    /// entry (of any key) is closed. Whether the stream is still clean is asked when it is
    /// taken (a read here too would be a second syscall per request for the same answer).
    pub(crate) fn put(self: &Arc<Self>, key: u64, stream: Stream, idle_timeout: Option<Duration>) {
        if self.size == 0 {
            return;
        }
        let now = Instant::now();
        let idle = Idle {
            stream,
            since: now,
            deadline: idle_timeout.map(|t| now + t),
        };
        let evicted = {
            let mut entries = self.entries.lock();
            entries.push(key, idle);
            if entries.count > self.size {
                entries.pop_oldest()
            } else {
                None
            }
        };
        if let Some(old) = evicted {
            self.gone(&old, now);
        }
        if !self.sweeping.load(Ordering::Relaxed) && !self.sweeping.swap(true, Ordering::AcqRel) {
            let guard = SweepGuard(Arc::downgrade(self));
            pingora_runtime::current_handle().spawn(sweep(guard));
        }
    }

    /// One sweep: the entries idle for a full period are taken out, tested without the lock
    /// and the live ones put back. Returns how many were closed.
    pub(crate) fn sweep_once(&self) -> usize {
        let now = Instant::now();
        let Some(before) = now.checked_sub(SWEEP_EVERY) else {
            return 0;
        };
        let old = self.entries.lock().take_older(before);
        if old.is_empty() {
            return 0;
        }
        let total = old.len();
        let mut alive = Vec::with_capacity(total);
        for (key, mut idle) in old {
            if !idle.expired(now) && self.alive(&mut idle.stream) {
                alive.push((key, idle));
            } else {
                self.gone(&idle, now);
            }
        }
        let closed = total - alive.len();
        self.entries.lock().restore(alive);
        closed
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries.lock().count
    }
}

async fn sweep(guard: SweepGuard) {
    loop {
        tokio::time::sleep(SWEEP_EVERY).await;
        let Some(pool) = guard.0.upgrade() else {
            return;
        };
        pool.sweep_once();
    }
}
