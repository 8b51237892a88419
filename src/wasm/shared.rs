//! State plugins share across every instance of a VM id (all worker threads), kept beside the
//! Snapshot so it survives reloads: key/value data with compare-and-swap, and queues.
//! Semantics follow Envoy's: a CAS of 0 writes unconditionally, a set bumps the CAS, a CAS
//! that does not match the stored one is refused.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

#[derive(Default)]
pub struct SharedData {
    inner: Mutex<DataInner>,
}

#[derive(Default)]
struct DataInner {
    next_cas: u32,
    /// vm_id → key → (value, cas); nested so a lookup borrows its keys
    map: HashMap<String, HashMap<String, (Vec<u8>, u32)>>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum SetResult {
    Ok,
    CasMismatch,
}

impl SharedData {
    pub fn get(&self, vm_id: &str, key: &str) -> Option<(Vec<u8>, u32)> {
        let mut v = Vec::new();
        let cas = self.get_into(vm_id, key, &mut v)?;
        Some((v, cas))
    }

    /// Append the value of `key` to `out` (a buffer the caller reuses); its CAS.
    pub fn get_into(&self, vm_id: &str, key: &str, out: &mut Vec<u8>) -> Option<u32> {
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let (v, cas) = g.map.get(vm_id)?.get(key)?;
        out.extend_from_slice(v);
        Some(*cas)
    }

    pub fn set(&self, vm_id: &str, key: &str, value: &[u8], cas: u32) -> SetResult {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.next_cas = g.next_cas.wrapping_add(1).max(1);
        let next = g.next_cas;
        if !g.map.contains_key(vm_id) {
            g.map.insert(vm_id.to_string(), HashMap::new());
        }
        let space = g.map.get_mut(vm_id).expect("inserted above");
        match space.get_mut(key) {
            Some(e) => {
                if cas != 0 && cas != e.1 {
                    return SetResult::CasMismatch;
                }
                e.0.clear();
                e.0.extend_from_slice(value);
                e.1 = next;
            }
            None => {
                space.insert(key.to_string(), (value.to_vec(), next));
            }
        }
        SetResult::Ok
    }

    /// How many keys a VM id holds (admin view).
    pub fn len(&self, vm_id: &str) -> usize {
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.map.get(vm_id).map_or(0, HashMap::len)
    }
}

/// Queues bounded in length so a plugin that only enqueues cannot grow the host without end.
pub const QUEUE_MAX_ITEMS: usize = 10_000;

#[derive(Default)]
pub struct SharedQueues {
    inner: Mutex<QueueInner>,
}

#[derive(Default)]
struct QueueInner {
    next_id: u32,
    by_name: HashMap<(String, String), u32>,
    queues: HashMap<u32, Queue>,
}

struct Queue {
    items: VecDeque<Vec<u8>>,
    /// Who registered it: a notification goes to that plugin's instances.
    owner: String,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Dequeue {
    Item(Vec<u8>),
    Empty,
    NotFound,
}

impl SharedQueues {
    /// Register (or find again) a queue owned by `owner` (a plugin name).
    pub fn register(&self, vm_id: &str, name: &str, owner: &str) -> u32 {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let key = (vm_id.to_string(), name.to_string());
        if let Some(id) = g.by_name.get(&key).copied() {
            if let Some(q) = g.queues.get_mut(&id) {
                q.owner = owner.to_string();
            }
            return id;
        }
        g.next_id = g.next_id.wrapping_add(1).max(1);
        let id = g.next_id;
        g.by_name.insert(key, id);
        g.queues.insert(
            id,
            Queue {
                items: VecDeque::new(),
                owner: owner.to_string(),
            },
        );
        id
    }

    pub fn resolve(&self, vm_id: &str, name: &str) -> Option<u32> {
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.by_name
            .get(&(vm_id.to_string(), name.to_string()))
            .copied()
    }

    /// Append; returns the owner to notify, or None when the queue does not exist. A full
    /// queue drops its oldest item.
    pub fn enqueue(&self, id: u32, value: &[u8]) -> Option<String> {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let q = g.queues.get_mut(&id)?;
        if q.items.len() >= QUEUE_MAX_ITEMS {
            q.items.pop_front();
        }
        q.items.push_back(value.to_vec());
        Some(q.owner.clone())
    }

    pub fn dequeue(&self, id: u32) -> Dequeue {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        match g.queues.get_mut(&id) {
            None => Dequeue::NotFound,
            Some(q) => match q.items.pop_front() {
                Some(v) => Dequeue::Item(v),
                None => Dequeue::Empty,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cas_rules_follow_envoy() {
        let d = SharedData::default();
        assert_eq!(d.get("vm", "k"), None);
        assert_eq!(d.set("vm", "k", b"1", 0), SetResult::Ok);
        let (v, cas) = d.get("vm", "k").unwrap();
        assert_eq!(v, b"1");
        assert_ne!(cas, 0);
        assert_eq!(d.set("vm", "k", b"2", cas + 7), SetResult::CasMismatch);
        assert_eq!(d.set("vm", "k", b"2", cas), SetResult::Ok);
        // the old cas is now stale
        assert_eq!(d.set("vm", "k", b"3", cas), SetResult::CasMismatch);
        assert_eq!(d.get("vm", "k").unwrap().0, b"2");
        // vm ids are separate namespaces
        assert_eq!(d.get("other", "k"), None);
        assert_eq!(d.len("vm"), 1);
    }

    #[test]
    fn queues_register_resolve_and_bound() {
        let q = SharedQueues::default();
        let id = q.register("vm", "jobs", "p1");
        assert_eq!(q.register("vm", "jobs", "p1"), id);
        assert_eq!(q.resolve("vm", "jobs"), Some(id));
        assert_eq!(q.resolve("vm", "nope"), None);
        assert_eq!(q.dequeue(id), Dequeue::Empty);
        assert_eq!(q.dequeue(id + 99), Dequeue::NotFound);
        assert_eq!(q.enqueue(id, b"a").as_deref(), Some("p1"));
        assert_eq!(q.enqueue(id + 99, b"a"), None);
        for i in 0..QUEUE_MAX_ITEMS {
            q.enqueue(id, format!("{i}").as_bytes());
        }
        // the first item ("a") was dropped to stay within the bound
        assert_eq!(q.dequeue(id), Dequeue::Item(b"0".to_vec()));
    }
}
